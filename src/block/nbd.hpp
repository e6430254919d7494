#pragma once
// A client of an NBD export (QEMU's, on a Unix socket), on libnbd's
// asynchronous API driven from an Asio executor: reads, writes, zeroes,
// flushes and block status, including QEMU's dirty bitmaps
// (`qemu:dirty-bitmap:NAME`) and allocation (`base:allocation`). Several
// requests may be in flight; a deadline bounds each.
#include "block/extent.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

struct nbd_handle;

namespace ferry::block {

// One block-status answer: a range and the context's flags for it.
struct Status {
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
    std::uint32_t flags = 0;
};

inline constexpr std::string_view allocation_context = "base:allocation";
std::string dirty_bitmap_context(std::string_view bitmap);

// A dirty bitmap's answer as the ranges to copy (flag bit 0 = dirty).
std::vector<Extent> dirty_extents(std::span<const Status> statuses);
// base:allocation's answer as what to copy: ranges that read as zeros
// become zero extents, everything else data.
std::vector<Extent> allocation_extents(std::span<const Status> statuses);

class NbdClient : public std::enable_shared_from_this<NbdClient> {
public:
    // Connects to the export on a Unix socket and asks for the meta contexts.
    static boost::asio::awaitable<Result<std::shared_ptr<NbdClient>>> connect(
        boost::asio::any_io_executor ex, std::string socket, std::string export_name, std::vector<std::string> contexts,
        std::chrono::milliseconds timeout);
    ~NbdClient();
    NbdClient(const NbdClient&) = delete;
    NbdClient& operator=(const NbdClient&) = delete;

    std::uint64_t size() const { return size_; }
    bool has_context(const std::string& name) const;
    // Deadline for each request (60 s unless set).
    void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }

    // The context's flags over all of [offset, offset + length).
    boost::asio::awaitable<Result<std::vector<Status>>> block_status(std::string context, std::uint64_t offset,
                                                                     std::uint64_t length);
    boost::asio::awaitable<Result<void>> pread(std::span<std::byte> buf, std::uint64_t offset);
    boost::asio::awaitable<Result<void>> pwrite(std::span<const std::byte> data, std::uint64_t offset);
    boost::asio::awaitable<Result<void>> zero(std::uint64_t offset, std::uint64_t length);
    boost::asio::awaitable<Result<void>> flush();
    // Drops the connection; requests in flight fail.
    void close();

    struct Op;

private:
    NbdClient(boost::asio::any_io_executor ex, nbd_handle* h, std::string what);
    // Issues a request (issue returns libnbd's cookie, -1 on error) and waits.
    boost::asio::awaitable<Result<void>> run(std::shared_ptr<Op> op, std::int64_t cookie);
    std::shared_ptr<Op> new_op();
    void start_pump();
    static boost::asio::awaitable<void> pump(std::shared_ptr<NbdClient> self);
    void fail_all(const std::string& why);
    Error nbd_error(const std::string& doing) const;

    boost::asio::any_io_executor ex_;
    nbd_handle* h_;
    std::string what_; // "NBD export X on S", for errors
    std::unique_ptr<boost::asio::posix::stream_descriptor> sd_;
    std::set<Op*> pending_;
    bool pumping_ = false;
    bool connecting_ = false;
    bool closed_ = false;
    std::shared_ptr<Op> connect_op_;
    std::uint64_t size_ = 0;
    std::chrono::milliseconds timeout_{60'000};

    friend struct OpCallbacks;
};

} // namespace ferry::block
