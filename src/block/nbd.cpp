#include "block/nbd.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>
#include <libnbd.h>

#include <cerrno>
#include <cstring>
#include <sys/socket.h>

namespace ferry::block {

namespace asio = boost::asio;
constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);

struct NbdClient::Op {
    explicit Op(asio::any_io_executor ex) : timer(ex) {}
    NbdClient* client = nullptr;
    asio::steady_timer timer;
    bool done = false;
    int error = 0;
    std::string failure;          // set when the connection, not the server, failed it
    std::string context;          // block status: the context asked for
    std::vector<Status> statuses; // block status: what came back
};

struct OpCallbacks {
    using Op = NbdClient::Op;
    static void finish(Op& op, int error, std::string failure = {}) {
        if (op.done)
            return;
        op.done = true;
        op.error = error;
        op.failure = std::move(failure);
        if (op.client)
            op.client->pending_.erase(&op);
        op.timer.cancel();
    }
    static int complete(void* user, int* error) {
        finish(**static_cast<std::shared_ptr<Op>*>(user), *error);
        return 1; // retire the command
    }
    static void free_op(void* user) { delete static_cast<std::shared_ptr<Op>*>(user); }
    static int extent(void* user, const char* context, std::uint64_t offset, std::uint32_t* entries, std::size_t n,
                      int*) {
        auto& op = *static_cast<Op*>(user);
        if (op.context != context)
            return 0;
        for (std::size_t i = 0; i + 1 < n; i += 2) {
            op.statuses.push_back({offset, entries[i], entries[i + 1]});
            offset += entries[i];
        }
        return 0;
    }
    // The completion callback, owning one reference to the op.
    static nbd_completion_callback completion(const std::shared_ptr<Op>& op) {
        return {.callback = complete, .user_data = new std::shared_ptr<Op>(op), .free = free_op};
    }
};

std::string dirty_bitmap_context(std::string_view bitmap) { return fmt::format("qemu:dirty-bitmap:{}", bitmap); }

std::vector<Extent> dirty_extents(std::span<const Status> statuses) {
    std::vector<Extent> out;
    for (auto& s : statuses)
        if (s.flags & 1)
            out.push_back({s.offset, s.length, false});
    return coalesce(std::move(out));
}

std::vector<Extent> allocation_extents(std::span<const Status> statuses) {
    std::vector<Extent> out;
    for (auto& s : statuses)
        out.push_back({s.offset, s.length, (s.flags & LIBNBD_STATE_ZERO) != 0});
    return coalesce(std::move(out));
}

NbdClient::NbdClient(asio::any_io_executor ex, nbd_handle* h, std::string what)
    : ex_(ex), h_(h), what_(std::move(what)) {}

NbdClient::~NbdClient() {
    if (sd_)
        sd_->release(); // libnbd owns the socket
    nbd_close(h_);
}

Error NbdClient::nbd_error(const std::string& doing) const {
    const char* e = nbd_get_error();
    return make_error(Errc::io, fmt::format("{}: {}: {}", what_, doing, e ? e : std::strerror(nbd_get_errno())));
}

bool NbdClient::has_context(const std::string& name) const { return nbd_can_meta_context(h_, name.c_str()) == 1; }

std::shared_ptr<NbdClient::Op> NbdClient::new_op() {
    auto op = std::make_shared<Op>(ex_);
    op->client = this;
    return op;
}

void NbdClient::fail_all(const std::string& why) {
    auto pending = pending_;
    for (auto* op : pending)
        OpCallbacks::finish(*op, EIO, why);
    if (connect_op_)
        OpCallbacks::finish(*connect_op_, EIO, why);
}

void NbdClient::close() {
    // Never nbd_shutdown here: it waits, unbounded, for a server that may be
    // the reason we close. Cutting the socket ends the connection at once;
    // libnbd is not driven again (the pump stops with nothing pending), so
    // it never touches a request's buffer after this.
    closed_ = true;
    int fd = nbd_aio_get_fd(h_);
    if (fd >= 0)
        ::shutdown(fd, SHUT_RDWR);
    fail_all("the connection is closed");
    if (sd_)
        sd_->cancel();
}

void NbdClient::start_pump() {
    if (pumping_) {
        sd_->cancel(); // a new request may change the direction to wait for
        return;
    }
    pumping_ = true;
    asio::co_spawn(ex_, pump(shared_from_this()), asio::detached);
}

// Moves libnbd's state machine while anything waits on it.
asio::awaitable<void> NbdClient::pump(std::shared_ptr<NbdClient> self) {
    while (!self->pending_.empty() || self->connecting_) {
        auto* h = self->h_;
        if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
            self->fail_all(self->nbd_error("connection lost").message);
            self->connecting_ = false;
            break;
        }
        unsigned dir = nbd_aio_get_direction(h);
        int r = 0;
        if (dir & LIBNBD_AIO_DIRECTION_WRITE) {
            auto [ec] = co_await self->sd_->async_wait(asio::posix::stream_descriptor::wait_write, nothrow);
            if (!ec)
                r = nbd_aio_notify_write(h);
        } else {
            auto [ec] = co_await self->sd_->async_wait(asio::posix::stream_descriptor::wait_read, nothrow);
            if (!ec)
                r = nbd_aio_notify_read(h);
        }
        if (r < 0) {
            self->fail_all(self->nbd_error("connection lost").message);
            self->connecting_ = false;
            break;
        }
        if (self->connecting_ && (nbd_aio_is_ready(h) || nbd_aio_is_dead(h) || nbd_aio_is_closed(h))) {
            self->connecting_ = false;
            if (self->connect_op_)
                OpCallbacks::finish(*self->connect_op_, nbd_aio_is_ready(h) ? 0 : EIO);
        }
    }
    self->pumping_ = false;
}

asio::awaitable<Result<void>> NbdClient::run(std::shared_ptr<Op> op, std::int64_t cookie) {
    if (closed_) {
        // Issued on a cut connection: libnbd may have queued it, but it is
        // never driven again.
        co_return make_error(Errc::disconnected, fmt::format("{}: the connection is closed", what_));
    }
    if (cookie < 0)
        co_return nbd_error("sending a request");
    if (!op->done) {
        pending_.insert(op.get());
        start_pump();
    }
    op->timer.expires_after(timeout_);
    while (!op->done) {
        auto [ec] = co_await op->timer.async_wait(nothrow);
        if (!ec && !op->done) { // the deadline, not a completion
            close();
            co_return make_error(Errc::timeout, fmt::format("{}: no answer within {} ms", what_, timeout_.count()));
        }
    }
    if (!op->failure.empty())
        co_return make_error(Errc::disconnected, fmt::format("{}: {}", what_, op->failure));
    if (op->error != 0)
        co_return make_error(Errc::io, fmt::format("{}: the server answered: {}", what_, std::strerror(op->error)));
    co_return Result<void>{};
}

asio::awaitable<Result<std::shared_ptr<NbdClient>>> NbdClient::connect(asio::any_io_executor ex, std::string socket,
                                                                        std::string export_name,
                                                                        std::vector<std::string> contexts,
                                                                        std::chrono::milliseconds timeout) {
    auto what = fmt::format("NBD export '{}' on {}", export_name, socket);
    nbd_handle* h = nbd_create();
    if (!h)
        co_return make_error(Errc::internal, fmt::format("{}: {}", what, nbd_get_error()));
    std::shared_ptr<NbdClient> c(new NbdClient(ex, h, what));
    if (nbd_set_export_name(h, export_name.c_str()) < 0)
        co_return c->nbd_error("export name");
    for (auto& ctx : contexts)
        if (nbd_add_meta_context(h, ctx.c_str()) < 0)
            co_return c->nbd_error(fmt::format("asking for {}", ctx));
    if (nbd_aio_connect_unix(h, socket.c_str()) < 0)
        co_return c->nbd_error("connecting");
    int fd = nbd_aio_get_fd(h);
    if (fd < 0)
        co_return c->nbd_error("connecting");
    c->sd_ = std::make_unique<asio::posix::stream_descriptor>(ex, fd);
    c->connect_op_ = c->new_op();
    c->connect_op_->client = nullptr; // not one of the pending requests
    c->connecting_ = true;
    if (nbd_aio_is_ready(h))
        c->connecting_ = false;
    else
        c->start_pump();
    auto op = c->connect_op_;
    op->timer.expires_after(timeout);
    while (c->connecting_ && !op->done) {
        auto [ec] = co_await op->timer.async_wait(nothrow);
        if (!ec && !op->done) {
            c->close();
            c->connecting_ = false;
            co_return make_error(Errc::timeout, fmt::format("{}: no handshake within {} ms", what, timeout.count()));
        }
    }
    c->connect_op_.reset();
    if (!nbd_aio_is_ready(h))
        co_return c->nbd_error("handshake");
    auto size = nbd_get_size(h);
    if (size < 0)
        co_return c->nbd_error("reading the export size");
    c->size_ = static_cast<std::uint64_t>(size);
    co_return c;
}

asio::awaitable<Result<std::vector<Status>>> NbdClient::block_status(std::string context, std::uint64_t offset,
                                                                     std::uint64_t length) {
    if (!has_context(context))
        co_return make_error(Errc::conflict, fmt::format("{}: the server does not offer {}", what_, context));
    std::vector<Status> out;
    auto end = std::min(offset + length, size_);
    auto pos = offset;
    while (pos < end) {
        auto op = new_op();
        op->context = context;
        auto count = std::min<std::uint64_t>(end - pos, std::uint64_t{1} << 30);
        nbd_extent_callback extents{.callback = OpCallbacks::extent, .user_data = op.get(), .free = nullptr};
        auto cookie = nbd_aio_block_status(h_, count, pos, extents, OpCallbacks::completion(op), 0);
        auto r = co_await run(op, cookie);
        if (!r)
            co_return r.error().wrap(fmt::format("block status of {} at {}", context, pos));
        if (op->statuses.empty() || op->statuses.front().offset != pos)
            co_return make_error(Errc::protocol, fmt::format("{}: block status at {} answered nothing", what_, pos));
        for (auto& s : op->statuses) {
            if (s.offset >= end)
                break;
            s.length = std::min(s.length, end - s.offset);
            out.push_back(s);
        }
        auto next = op->statuses.back().offset + op->statuses.back().length;
        if (next <= pos)
            co_return make_error(Errc::protocol, fmt::format("{}: block status at {} did not advance", what_, pos));
        pos = next;
    }
    co_return out;
}

asio::awaitable<Result<void>> NbdClient::pread(std::span<std::byte> buf, std::uint64_t offset) {
    auto op = new_op();
    auto cookie = nbd_aio_pread(h_, buf.data(), buf.size(), offset, OpCallbacks::completion(op), 0);
    auto r = co_await run(op, cookie);
    if (!r)
        co_return r.error().wrap(fmt::format("reading {} bytes at {}", buf.size(), offset));
    co_return r;
}

asio::awaitable<Result<void>> NbdClient::pwrite(std::span<const std::byte> data, std::uint64_t offset) {
    auto op = new_op();
    auto cookie = nbd_aio_pwrite(h_, data.data(), data.size(), offset, OpCallbacks::completion(op), 0);
    auto r = co_await run(op, cookie);
    if (!r)
        co_return r.error().wrap(fmt::format("writing {} bytes at {}", data.size(), offset));
    co_return r;
}

asio::awaitable<Result<void>> NbdClient::zero(std::uint64_t offset, std::uint64_t length) {
    // NBD requests carry 32-bit lengths: 1 GiB at a time.
    for (std::uint64_t done = 0; done < length;) {
        auto n = std::min<std::uint64_t>(length - done, std::uint64_t{1} << 30);
        auto op = new_op();
        auto cookie = nbd_aio_zero(h_, n, offset + done, OpCallbacks::completion(op), 0);
        auto r = co_await run(op, cookie);
        if (!r)
            co_return r.error().wrap(fmt::format("zeroing {} bytes at {}", n, offset + done));
        done += n;
    }
    co_return Result<void>{};
}

asio::awaitable<Result<void>> NbdClient::flush() {
    auto op = new_op();
    auto cookie = nbd_aio_flush(h_, OpCallbacks::completion(op), 0);
    auto r = co_await run(op, cookie);
    if (!r)
        co_return r.error().wrap("flushing");
    co_return r;
}

} // namespace ferry::block
