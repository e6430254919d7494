#include "transport/channel.hpp"

#include "transport/frame.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>
#include <openssl/ssl.h>

namespace ferry::transport {

namespace {
constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);

Error io_error(const boost::system::error_code& ec, std::string_view what) {
    bool closed = ec == asio::error::eof || ec == asio::ssl::error::stream_truncated ||
                  ec == asio::error::connection_reset || ec == asio::error::broken_pipe;
    return make_error(closed ? Errc::disconnected : Errc::io, fmt::format("{}: {}", what, closed ? "connection closed" : ec.message()));
}

// Cancels the socket's work when the deadline passes; tells whether it did.
// The timer runs on the awaiting coroutine's executor, which may not be the
// socket's (data channels live on the data plane), so the timer is only ever
// touched from one thread.
class Deadline {
public:
    Deadline(asio::any_io_executor ex, tcp::socket& socket, std::chrono::milliseconds timeout) : timer_(ex) {
        timer_.expires_after(timeout);
        timer_.async_wait([this, &socket](boost::system::error_code ec) {
            if (!ec) {
                expired_ = true;
                boost::system::error_code ignored;
                socket.cancel(ignored);
            }
        });
    }
    ~Deadline() { timer_.cancel(); }
    bool expired() const { return expired_; }

private:
    asio::steady_timer timer_;
    bool expired_ = false;
};
} // namespace

Channel::Channel(tcp::socket socket) : stream_(std::move(socket)) {}
Channel::Channel(std::unique_ptr<TlsStream> stream) : stream_(std::move(stream)) {}

tcp::socket& Channel::socket() {
    if (auto* s = std::get_if<tcp::socket>(&stream_))
        return *s;
    return std::get<std::unique_ptr<TlsStream>>(stream_)->next_layer();
}

asio::awaitable<Result<std::size_t>> Channel::read_some(asio::mutable_buffer buffer) {
    if (pending_error_) {
        auto ec = pending_error_;
        pending_error_ = {};
        co_return io_error(ec, "reading from " + peer_address);
    }
    if (!pending_.empty()) {
        auto n = std::min(buffer.size(), pending_.size());
        std::memcpy(buffer.data(), pending_.data(), n);
        pending_.erase(0, n);
        co_return n;
    }
    boost::system::error_code ec;
    std::size_t n = 0;
    if (auto* s = std::get_if<tcp::socket>(&stream_)) {
        std::tie(ec, n) = co_await s->async_read_some(buffer, nothrow);
        if (ec)
            co_return io_error(ec, "reading from " + peer_address);
        co_return n;
    }
    // TLS hands over one record (<= 16 KiB) per read. Keep decrypting while
    // data is already there, so the consumer (QEMU loading a migration
    // stream) gets large writes instead of running dry every 16 KiB.
    auto& tls = *std::get<std::unique_ptr<TlsStream>>(stream_);
    std::tie(ec, n) = co_await tls.async_read_some(buffer, nothrow);
    if (ec)
        co_return io_error(ec, "reading from " + peer_address);
    while (n + 16384 <= buffer.size()) {
        boost::system::error_code aec;
        if (SSL_pending(tls.native_handle()) == 0 && tls.next_layer().available(aec) < 16384)
            break;
        auto [rec, more] = co_await tls.async_read_some(asio::buffer(static_cast<char*>(buffer.data()) + n, buffer.size() - n), nothrow);
        if (rec) {
            pending_error_ = rec; // deliver what we have; report the error next time
            break;
        }
        n += more;
    }
    co_return n;
}

asio::awaitable<Result<void>> Channel::write_all(asio::const_buffer buffer) {
    boost::system::error_code ec;
    std::size_t n = 0;
    if (auto* s = std::get_if<tcp::socket>(&stream_))
        std::tie(ec, n) = co_await asio::async_write(*s, buffer, nothrow);
    else
        std::tie(ec, n) = co_await asio::async_write(*std::get<std::unique_ptr<TlsStream>>(stream_), buffer, nothrow);
    if (ec)
        co_return io_error(ec, "writing to " + peer_address);
    co_return Result<void>{};
}

void Channel::close() {
    boost::system::error_code ec;
    socket().shutdown(tcp::socket::shutdown_both, ec);
    socket().close(ec);
}

asio::awaitable<Result<nlohmann::json>> Channel::read_frame(std::chrono::milliseconds timeout) {
    auto ex = co_await asio::this_coro::executor;
    Deadline deadline(ex, socket(), timeout);
    FrameDecoder decoder;
    decoder.feed(pending_.data(), pending_.size());
    pending_.clear();
    char buf[4096];
    for (;;) {
        if (auto frame = decoder.next()) {
            pending_ = decoder.take_rest(); // what follows the frame (a data channel's stream)
            co_return std::move(*frame);
        }
        boost::system::error_code ec;
        std::size_t n = 0;
        if (auto* s = std::get_if<tcp::socket>(&stream_))
            std::tie(ec, n) = co_await s->async_read_some(asio::buffer(buf), nothrow);
        else
            std::tie(ec, n) = co_await std::get<std::unique_ptr<TlsStream>>(stream_)->async_read_some(asio::buffer(buf), nothrow);
        if (deadline.expired())
            co_return make_error(Errc::timeout, fmt::format("no message from {} within {} ms", peer_address, timeout.count()));
        if (ec)
            co_return io_error(ec, "reading from " + peer_address);
        decoder.feed(buf, n);
    }
}

asio::awaitable<Result<void>> Channel::write_frame(const nlohmann::json& message) {
    auto bytes = encode_frame(message);
    co_return co_await write_all(asio::buffer(bytes));
}

Result<tcp::endpoint> parse_endpoint(const std::string& address) {
    auto colon = address.rfind(':');
    if (colon == std::string::npos)
        return make_error(Errc::invalid_argument, fmt::format("address '{}' has no port (host:port)", address));
    auto host = address.substr(0, colon);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
    if (host == "localhost")
        host = "127.0.0.1";
    boost::system::error_code ec;
    auto ip = asio::ip::make_address(host, ec);
    if (ec)
        return make_error(Errc::invalid_argument, fmt::format("address '{}': '{}' is not an IP address", address, host));
    int port = 0;
    try {
        port = std::stoi(address.substr(colon + 1));
    } catch (...) {
        port = -1;
    }
    if (port < 0 || port > 65535) // 0: any free port (listening)
        return make_error(Errc::invalid_argument, fmt::format("address '{}': bad port", address));
    return tcp::endpoint(ip, static_cast<unsigned short>(port));
}

asio::awaitable<Result<std::shared_ptr<Channel>>>
dial(asio::any_io_executor ex, const std::string& address, const std::string& expected_node,
     std::shared_ptr<TlsIdentity> tls, std::chrono::milliseconds timeout) {
    auto ep = parse_endpoint(address);
    if (!ep)
        co_return ep.error();
    auto self_ex = co_await asio::this_coro::executor;
    tcp::socket socket(ex);
    {
        Deadline deadline(self_ex, socket, timeout);
        auto [ec] = co_await socket.async_connect(*ep, nothrow);
        if (deadline.expired())
            co_return make_error(Errc::timeout, fmt::format("connecting to {} ({}): no answer within {} ms",
                                                            expected_node, address, timeout.count()));
        if (ec)
            co_return make_error(Errc::io, fmt::format("connecting to {} ({}): {}", expected_node, address, ec.message()));
    }
    socket.set_option(tcp::no_delay(true));
    std::shared_ptr<Channel> channel;
    if (!tls) {
        channel = std::make_shared<Channel>(std::move(socket));
    } else {
        auto stream = std::make_unique<TlsStream>(std::move(socket), tls->client());
        stream->set_verify_callback(asio::ssl::host_name_verification(expected_node));
        Deadline deadline(self_ex, stream->next_layer(), timeout);
        auto [ec] = co_await stream->async_handshake(asio::ssl::stream_base::client, nothrow);
        if (deadline.expired())
            co_return make_error(Errc::timeout, fmt::format("TLS handshake with {} ({}): no answer within {} ms",
                                                            expected_node, address, timeout.count()));
        if (ec)
            co_return make_error(Errc::io, fmt::format("TLS handshake with {} ({}): {} (is it node {}, with a "
                                                       "certificate from our CA?)",
                                                       expected_node, address, ec.message(), expected_node));
        channel = std::make_shared<Channel>(std::move(stream));
    }
    channel->peer_node = expected_node;
    channel->peer_address = address;
    co_return channel;
}

} // namespace ferry::transport
