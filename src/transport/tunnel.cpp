#include "transport/tunnel.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include <sys/socket.h>

#include <vector>

namespace ferry::transport {

namespace {

using unix_socket = asio::local::stream_protocol::socket;
constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);

struct Shared {
    Shared(unix_socket q, std::shared_ptr<Channel> c) : qemu(std::move(q)), channel(std::move(c)) {}
    unix_socket qemu;
    std::shared_ptr<Channel> channel;
    bool closed = false;
    std::optional<Error> error;
    TunnelStats stats;

    void close_all() {
        if (closed)
            return;
        closed = true;
        boost::system::error_code ec;
        qemu.close(ec);
        channel->close();
    }
};

// QEMU -> peer.
asio::awaitable<void> outbound(std::shared_ptr<Shared> s, std::shared_ptr<TokenBucket> bucket) {
    std::vector<char> buf(tunnel_buffer);
    asio::steady_timer pace(s->qemu.get_executor());
    for (;;) {
        auto [ec, n] = co_await s->qemu.async_read_some(asio::buffer(buf), nothrow);
        if (ec) {
            // QEMU closes whole sockets, never one direction: end of stream
            // from QEMU means the connection is over.
            if (ec != asio::error::eof && !s->closed && !s->error)
                s->error = make_error(Errc::io, fmt::format("reading from QEMU: {}", ec.message()));
            s->close_all();
            co_return;
        }
        if (bucket) {
            auto wait = bucket->take(n, ShaperClock::now());
            if (wait.count() > 0) {
                pace.expires_after(wait);
                co_await pace.async_wait(nothrow);
            }
        }
        auto w = co_await s->channel->write_all(asio::buffer(buf.data(), n));
        if (!w) {
            if (!s->closed && !s->error)
                s->error = w.error();
            s->close_all();
            co_return;
        }
        s->stats.to_peer += n;
    }
}

// peer -> QEMU.
asio::awaitable<void> inbound(std::shared_ptr<Shared> s) {
    std::vector<char> buf(tunnel_buffer);
    for (;;) {
        auto r = co_await s->channel->read_some(asio::buffer(buf));
        if (!r) {
            if (r.error().code != Errc::disconnected) {
                if (!s->closed && !s->error)
                    s->error = r.error();
                s->close_all();
                co_return;
            }
            // The peer finished sending: QEMU reads end of stream, and may
            // still write to us until it closes.
            boost::system::error_code ec;
            if (!s->closed)
                s->qemu.shutdown(unix_socket::shutdown_send, ec);
            co_return;
        }
        auto [ec, n] = co_await asio::async_write(s->qemu, asio::buffer(buf.data(), *r), nothrow);
        if (ec) {
            if (!s->closed && !s->error)
                s->error = make_error(Errc::io, fmt::format("writing to QEMU: {}", ec.message()));
            s->close_all();
            co_return;
        }
        s->stats.from_peer += n;
    }
}

// A Unix socket queues ~200 KiB by default: each side of the tunnel would
// stall on the other every few hundred microseconds. Queue a few tunnel
// buffers instead (SO_*BUFFORCE as root, else up to the sysctl limit).
void widen_buffers(int fd) {
    int size = 4 * static_cast<int>(tunnel_buffer);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
}

} // namespace

asio::awaitable<Result<TunnelStats>> run_tunnel(unix_socket qemu, std::shared_ptr<Channel> channel,
                                                std::shared_ptr<TokenBucket> bucket) {
    using namespace asio::experimental::awaitable_operators;
    auto s = std::make_shared<Shared>(std::move(qemu), std::move(channel));
    widen_buffers(s->qemu.native_handle());
    // Both directions run together; a failure in one closes both ends,
    // which stops the other. The peer ending its direction leaves the other
    // open (the return path may still carry data) until QEMU closes.
    co_await (outbound(s, bucket) && inbound(s));
    s->close_all();
    if (s->error)
        co_return *s->error;
    co_return s->stats;
}

} // namespace ferry::transport
