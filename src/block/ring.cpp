#include "block/ring.hpp"

#include "common/log.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>
#include <liburing.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <functional>
#include <new>
#include <sys/eventfd.h>
#include <unistd.h>
#include <unordered_map>
#include <vector>

namespace ferry::block {

namespace asio = boost::asio;

asio::thread_pool& blocking_pool() {
    static asio::thread_pool pool(2);
    return pool;
}

namespace {

constexpr std::size_t page = 4096;

std::shared_ptr<spdlog::logger> block_log() {
    static auto l = logger("block");
    return l;
}

Error errno_error(const char* what, int err) {
    return make_error(Errc::io, fmt::format("{}: {}", what, std::strerror(err)));
}

// fallocate's "not on this file": the caller may do it another way.
Error fallocate_error(int err) {
    bool unsupported = err == EOPNOTSUPP || err == EINVAL || err == ENOTTY || err == ENODEV;
    return make_error(unsupported ? Errc::invalid_argument : Errc::io, fmt::format("fallocate: {}", std::strerror(err)));
}

// --- io_uring -----------------------------------------------------------------

class UringRing final : public Ring {
public:
    UringRing(asio::any_io_executor ex, io_uring ring, int efd)
        : ex_(ex), ring_(ring), efd_(ex, efd) {}

    ~UringRing() override {
        // The reaper holds a reference while requests are in flight, so
        // none are left here.
        io_uring_queue_exit(&ring_);
    }

    bool uses_io_uring() const override { return true; }

    Result<void> register_buffers(const BufferPool& pool) override {
        std::vector<iovec> iov(pool.slots());
        for (std::size_t i = 0; i < pool.slots(); ++i)
            iov[i] = {pool.slot(i).data(), pool.slot(i).size()};
        int r = io_uring_register_buffers(&ring_, iov.data(), static_cast<unsigned>(iov.size()));
        if (r < 0)
            return errno_error("registering io_uring buffers", -r);
        return {};
    }

    asio::awaitable<Result<std::size_t>> read(int fd, std::span<std::byte> buf, std::uint64_t offset,
                                              int fixed) override {
        std::function<void(io_uring_sqe*)> prep = [=](io_uring_sqe* sqe) {
            if (fixed >= 0)
                io_uring_prep_read_fixed(sqe, fd, buf.data(), static_cast<unsigned>(buf.size()), offset, fixed);
            else
                io_uring_prep_read(sqe, fd, buf.data(), static_cast<unsigned>(buf.size()), offset);
        };
        auto res = co_await submit(std::move(prep));
        if (res < 0)
            co_return errno_error("read", -res);
        co_return static_cast<std::size_t>(res);
    }

    asio::awaitable<Result<std::size_t>> write(int fd, std::span<const std::byte> buf, std::uint64_t offset,
                                               int fixed) override {
        std::function<void(io_uring_sqe*)> prep = [=](io_uring_sqe* sqe) {
            if (fixed >= 0)
                io_uring_prep_write_fixed(sqe, fd, buf.data(), static_cast<unsigned>(buf.size()), offset, fixed);
            else
                io_uring_prep_write(sqe, fd, buf.data(), static_cast<unsigned>(buf.size()), offset);
        };
        auto res = co_await submit(std::move(prep));
        if (res < 0)
            co_return errno_error("write", -res);
        co_return static_cast<std::size_t>(res);
    }

    asio::awaitable<Result<void>> fdatasync(int fd) override {
        std::function<void(io_uring_sqe*)> prep = [=](io_uring_sqe* sqe) { io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC); };
        auto res = co_await submit(std::move(prep));
        if (res < 0)
            co_return errno_error("fdatasync", -res);
        co_return Result<void>{};
    }

    asio::awaitable<Result<void>> fallocate(int fd, int mode, std::uint64_t offset, std::uint64_t length) override {
        std::function<void(io_uring_sqe*)> prep = [=](io_uring_sqe* sqe) { io_uring_prep_fallocate(sqe, fd, mode, offset, length); };
        auto res = co_await submit(std::move(prep));
        if (res < 0)
            co_return fallocate_error(-res);
        co_return Result<void>{};
    }

private:
    struct Op {
        explicit Op(asio::any_io_executor ex) : timer(ex) {}
        asio::steady_timer timer;
        int res = 0;
        bool done = false;
    };

    // Queues one request and waits for its completion; returns cqe->res.
    asio::awaitable<int> submit(std::function<void(io_uring_sqe*)> prep) {
        auto op = std::make_shared<Op>(ex_);
        op->timer.expires_at(asio::steady_timer::time_point::max());
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
        if (!sqe) { // the submission queue is full: hand it to the kernel
            io_uring_submit(&ring_);
            sqe = io_uring_get_sqe(&ring_);
        }
        if (!sqe)
            co_return -EAGAIN;
        prep(sqe);
        io_uring_sqe_set_data(sqe, op.get());
        // From here the kernel may see the request: the op lives (in
        // in_flight_) until its completion is reaped.
        in_flight_[op.get()] = op;
        if (!reaping_) {
            reaping_ = true;
            asio::co_spawn(ex_, reap(std::static_pointer_cast<UringRing>(shared_from_this())), asio::detached);
        }
        for (int tries = 0;; ++tries) {
            int r = io_uring_submit(&ring_);
            if (r >= 0)
                break;
            if ((r != -EAGAIN && r != -EBUSY && r != -EINTR) || tries == 1000) {
                // It stays queued: make it harmless for whichever submit
                // carries it, and fail this request.
                io_uring_prep_nop(sqe);
                io_uring_sqe_set_data(sqe, op.get());
                co_return r;
            }
            asio::steady_timer pause(ex_);
            pause.expires_after(std::chrono::milliseconds(1));
            co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
        }
        while (!op->done)
            co_await op->timer.async_wait(asio::as_tuple(asio::use_awaitable));
        co_return op->res;
    }

    void drain() {
        io_uring_cqe* cqe = nullptr;
        while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
            auto* op = static_cast<Op*>(io_uring_cqe_get_data(cqe));
            op->res = cqe->res;
            op->done = true;
            op->timer.cancel();
            in_flight_.erase(op);
            io_uring_cqe_seen(&ring_, cqe);
        }
    }

    // Runs while requests are in flight; the eventfd rings with each completion.
    static asio::awaitable<void> reap(std::shared_ptr<UringRing> self) {
        for (;;) {
            self->drain();
            if (self->in_flight_.empty())
                break;
            co_await self->efd_.async_wait(asio::posix::stream_descriptor::wait_read,
                                           asio::as_tuple(asio::use_awaitable));
            std::uint64_t count = 0;
            [[maybe_unused]] auto n = ::read(self->efd_.native_handle(), &count, sizeof count);
        }
        self->reaping_ = false;
    }

    asio::any_io_executor ex_;
    io_uring ring_;
    asio::posix::stream_descriptor efd_;
    std::unordered_map<Op*, std::shared_ptr<Op>> in_flight_;
    bool reaping_ = false;
};

// --- fallback: pread/pwrite on a thread pool ----------------------------------

// Runs on the pool; co_spawn brings the caller back to its own executor.
asio::awaitable<long> run_blocking(std::function<long()> fn) {
    long r = fn();
    co_return r < 0 ? -errno : r;
}

class BlockingRing final : public Ring {
public:
    bool uses_io_uring() const override { return false; }
    Result<void> register_buffers(const BufferPool&) override { return {}; }

    asio::awaitable<Result<std::size_t>> read(int fd, std::span<std::byte> buf, std::uint64_t offset,
                                              int) override {
        std::function<long()> fn = [=] { return static_cast<long>(::pread(fd, buf.data(), buf.size(), static_cast<off_t>(offset))); };
        auto task = run_blocking(std::move(fn));
        auto r = co_await asio::co_spawn(blocking_pool(), std::move(task), asio::use_awaitable);
        if (r < 0)
            co_return errno_error("read", static_cast<int>(-r));
        co_return static_cast<std::size_t>(r);
    }

    asio::awaitable<Result<std::size_t>> write(int fd, std::span<const std::byte> buf, std::uint64_t offset,
                                               int) override {
        std::function<long()> fn = [=] { return static_cast<long>(::pwrite(fd, buf.data(), buf.size(), static_cast<off_t>(offset))); };
        auto task = run_blocking(std::move(fn));
        auto r = co_await asio::co_spawn(blocking_pool(), std::move(task), asio::use_awaitable);
        if (r < 0)
            co_return errno_error("write", static_cast<int>(-r));
        co_return static_cast<std::size_t>(r);
    }

    asio::awaitable<Result<void>> fdatasync(int fd) override {
        std::function<long()> fn = [=] { return static_cast<long>(::fdatasync(fd)); };
        auto task = run_blocking(std::move(fn));
        auto r = co_await asio::co_spawn(blocking_pool(), std::move(task), asio::use_awaitable);
        if (r < 0)
            co_return errno_error("fdatasync", static_cast<int>(-r));
        co_return Result<void>{};
    }

    asio::awaitable<Result<void>> fallocate(int fd, int mode, std::uint64_t offset, std::uint64_t length) override {
        std::function<long()> fn = [=] {
            return static_cast<long>(::fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length)));
        };
        auto task = run_blocking(std::move(fn));
        auto r = co_await asio::co_spawn(blocking_pool(), std::move(task), asio::use_awaitable);
        if (r < 0)
            co_return fallocate_error(static_cast<int>(-r));
        co_return Result<void>{};
    }
};

} // namespace

BufferPool::BufferPool(std::size_t slots, std::size_t slot_size)
    : slots_(slots), slot_size_((slot_size + page - 1) / page * page) {
    base_ = static_cast<std::byte*>(::operator new(slots_ * slot_size_, std::align_val_t{page}));
}

BufferPool::~BufferPool() { ::operator delete(base_, std::align_val_t{page}); }

std::shared_ptr<Ring> Ring::create(asio::any_io_executor ex, unsigned depth) {
    const char* env = std::getenv("FERRY_IO_URING");
    if (env && std::string_view(env) == "0")
        return std::make_shared<BlockingRing>();
    io_uring ring{};
    int r = io_uring_queue_init(depth, &ring, 0);
    if (r < 0) {
        block_log()->warn("io_uring unavailable ({}): disk I/O falls back to pread/pwrite", std::strerror(-r));
        return std::make_shared<BlockingRing>();
    }
    int efd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0 || io_uring_register_eventfd(&ring, efd) < 0) {
        if (efd >= 0)
            ::close(efd);
        io_uring_queue_exit(&ring);
        block_log()->warn("io_uring eventfd refused: disk I/O falls back to pread/pwrite");
        return std::make_shared<BlockingRing>();
    }
    return std::make_shared<UringRing>(ex, ring, efd);
}

} // namespace ferry::block
