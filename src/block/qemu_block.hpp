#pragma once
// What ferry asks of one QEMU's block layer over QMP: the format node behind
// a disk, dirty bitmaps on it, a private NBD server with exports, and I/O
// throttles. Everything created carries a name prefix ("ferry-..."), so a
// sweep finds what a crash left behind. Knows nothing of migrations.
#include "common/error.hpp"
#include "qmp/client.hpp"

#include <boost/asio/awaitable.hpp>

#include <memory>
#include <string>
#include <vector>

namespace ferry::block {

class QemuBlock {
public:
    explicit QemuBlock(std::shared_ptr<qmp::Client> qmp) : qmp_(std::move(qmp)) {}

    // The format node whose image is `path` (by file name, so that a QEMU
    // started with -drive works too).
    boost::asio::awaitable<Result<std::string>> format_node(std::string path);

    // An enabled, non-persistent bitmap recording every write from now on.
    boost::asio::awaitable<Result<void>> add_bitmap(std::string node, std::string name,
                                                    std::uint32_t granularity = 64 << 10);
    // In one transaction: `next` starts recording and `current` stops, so no
    // write falls between them.
    boost::asio::awaitable<Result<void>> rotate_bitmap(std::string node, std::string current, std::string next,
                                                       std::uint32_t granularity = 64 << 10);
    // Folds `from` into `into` (blocks a failed round must copy again).
    boost::asio::awaitable<Result<void>> merge_bitmap(std::string node, std::string from, std::string into);
    boost::asio::awaitable<Result<void>> remove_bitmap(std::string node, std::string name);
    boost::asio::awaitable<Result<std::vector<std::string>>> bitmaps(std::string node);
    // The bytes a bitmap has recorded as dirty (QEMU's count).
    boost::asio::awaitable<Result<std::uint64_t>> bitmap_dirty_bytes(std::string node, std::string name);

    // The NBD server on a Unix socket (one per QEMU).
    boost::asio::awaitable<Result<void>> start_nbd(std::string socket);
    boost::asio::awaitable<Result<void>> stop_nbd();
    // Exports `node` as NBD export `name` with the given bitmaps as meta contexts.
    boost::asio::awaitable<Result<void>> add_export(std::string name, std::string node, bool writable,
                                                    std::vector<std::string> bitmaps);
    boost::asio::awaitable<Result<void>> remove_export(std::string name);
    boost::asio::awaitable<Result<std::vector<std::string>>> exports();

    // A disk's I/O limits as QEMU holds them: the qdev id that addresses
    // it, and block_set_io_throttle's arguments ("group" only when a
    // throttle is on). The disk is found by its format node.
    struct IoLimits {
        std::string device;
        nlohmann::json limits;
    };
    boost::asio::awaitable<Result<IoLimits>> io_limits(std::string node);
    // Sets them (all zero lifts the throttle).
    boost::asio::awaitable<Result<void>> set_io_limits(std::string device, nlohmann::json limits);
    // `limits` with writes capped at `bytes_per_second` (keeping a lower cap
    // already there, and every other limit) in throttle group `group`.
    static nlohmann::json cap_writes(const nlohmann::json& limits, std::uint64_t bytes_per_second,
                                     const std::string& group);

    // Removes every export and bitmap whose name starts with `prefix`, lifts
    // the write cap of every disk in a throttle group so named (its other
    // limits stay), and stops the NBD server when asked. Returns what it removed
    // ("" when nothing was left).
    boost::asio::awaitable<Result<std::string>> sweep(std::string prefix, bool stop_server);

private:
    // The dirty-bitmaps entries QEMU lists for a node.
    boost::asio::awaitable<Result<nlohmann::json>> node_bitmaps(std::string node);

    std::shared_ptr<qmp::Client> qmp_;
};

} // namespace ferry::block
