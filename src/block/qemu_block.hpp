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

    // Caps writes to a disk (qdev id) in bytes per second, 0 lifting the cap;
    // the throttle group is named so a sweep can find it.
    boost::asio::awaitable<Result<void>> throttle_writes(std::string device, std::string group,
                                                         std::uint64_t bytes_per_second);

    // Removes every export, bitmap and throttle whose name starts with
    // `prefix`, and stops the NBD server when asked. Returns what it removed
    // ("" when nothing was left).
    boost::asio::awaitable<Result<std::string>> sweep(std::string prefix, bool stop_server);

private:
    // The dirty-bitmaps entries QEMU lists for a node.
    boost::asio::awaitable<Result<nlohmann::json>> node_bitmaps(std::string node);

    std::shared_ptr<qmp::Client> qmp_;
};

} // namespace ferry::block
