#pragma once
// Reads and writes at file offsets as Asio awaitables, through io_uring:
// several requests in flight, registered buffers, completions reaped on the
// caller's executor through an eventfd. Where io_uring is missing or refused
// (old kernel, seccomp, FERRY_IO_URING=0) the same calls run as pread/pwrite
// on a small thread pool.
#include "common/error.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>

namespace ferry::block {

// The few threads blocking work runs on (the fallback ring, qemu-img).
boost::asio::thread_pool& blocking_pool();

namespace detail {
template <class T>
boost::asio::awaitable<std::optional<T>> run_on_pool(std::function<T()> fn) {
    co_return std::optional<T>(fn());
}
} // namespace detail

// Runs fn on the blocking pool and resumes the caller on its own executor.
template <class T>
boost::asio::awaitable<T> offload(std::function<T()> fn) {
    auto task = detail::run_on_pool<T>(std::move(fn));
    auto r = co_await boost::asio::co_spawn(blocking_pool(), std::move(task), boost::asio::use_awaitable);
    co_return std::move(*r);
}

// Page-aligned memory for direct I/O, cut into equal slots; a ring can
// register it so that requests on a slot skip the kernel's page pinning.
class BufferPool {
public:
    BufferPool(std::size_t slots, std::size_t slot_size);
    ~BufferPool();
    BufferPool(const BufferPool&) = delete;
    BufferPool& operator=(const BufferPool&) = delete;

    std::span<std::byte> slot(std::size_t i) const { return {base_ + i * slot_size_, slot_size_}; }
    std::size_t slots() const { return slots_; }
    std::size_t slot_size() const { return slot_size_; }

private:
    std::byte* base_ = nullptr;
    std::size_t slots_;
    std::size_t slot_size_;
};

class Ring : public std::enable_shared_from_this<Ring> {
public:
    // `depth`: requests in flight at most. Never fails: without io_uring the
    // ring works through the fallback.
    static std::shared_ptr<Ring> create(boost::asio::any_io_executor ex, unsigned depth);
    virtual ~Ring() = default;

    virtual bool uses_io_uring() const = 0;
    // Registers the pool's slots; `fixed` in read/write then names a slot.
    // Only one pool per ring. The pool must outlive the ring.
    virtual Result<void> register_buffers(const BufferPool& pool) = 0;

    // One request each; a short count is returned as it is (end of file).
    // `fixed`: the index of the registered slot `buf` lies in, or -1.
    virtual boost::asio::awaitable<Result<std::size_t>> read(int fd, std::span<std::byte> buf, std::uint64_t offset,
                                                             int fixed = -1) = 0;
    virtual boost::asio::awaitable<Result<std::size_t>> write(int fd, std::span<const std::byte> buf,
                                                              std::uint64_t offset, int fixed = -1) = 0;
    virtual boost::asio::awaitable<Result<void>> fdatasync(int fd) = 0;
    // fallocate(2): punching holes, zeroing ranges. Errc::invalid_argument
    // when the file or device does not support the mode.
    virtual boost::asio::awaitable<Result<void>> fallocate(int fd, int mode, std::uint64_t offset,
                                                           std::uint64_t length) = 0;
};

} // namespace ferry::block
