#include "transport/peer_server.hpp"

#include "common/log.hpp"
#include "transport/frame.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>
#include <openssl/ssl.h>

namespace ferry::transport {

namespace {
constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);
constexpr auto handshake_timeout = std::chrono::seconds(10);
auto log() {
    static auto l = logger("transport");
    return l;
}
} // namespace

nlohmann::json control_hello(const std::string& self) {
    return {{"type", "hello"}, {"version", protocol_version}, {"kind", "control"}, {"node", self}};
}

nlohmann::json data_hello(const std::string& token) {
    return {{"type", "hello"}, {"version", protocol_version}, {"kind", "data"}, {"token", token}};
}

PeerServer::PeerServer(asio::any_io_executor ex, std::string listen, std::shared_ptr<TlsIdentity> tls,
                       std::string self, std::set<std::string> peers, asio::any_io_executor sockets_ex)
    : ex_(ex), sockets_ex_(sockets_ex ? sockets_ex : ex), listen_(std::move(listen)), tls_(std::move(tls)), self_(std::move(self)),
      peers_(std::move(peers)), acceptor_(ex) {}

PeerServer::~PeerServer() {
    *alive_ = false;
    stop();
}

Result<void> PeerServer::start() {
    auto ep = parse_endpoint(listen_);
    if (!ep)
        return ep.error().wrap("[node] listen");
    boost::system::error_code ec;
    acceptor_.open(ep->protocol(), ec);
    if (!ec)
        acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec)
        acceptor_.bind(*ep, ec);
    if (!ec)
        acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
        return make_error(Errc::io, fmt::format("[node] listen {}: {}", listen_, ec.message()));
    port_ = acceptor_.local_endpoint().port();
    if (!tls_)
        log()->warn("peer endpoint {} is PLAIN TCP (disable_tls = true): migration traffic is neither "
                    "encrypted nor authenticated",
                    listen_);
    else
        log()->info("peer endpoint {} (TLS 1.3, mutual authentication as {})", listen_, self_);
    asio::co_spawn(ex_, accept_loop(this), asio::detached);
    return {};
}

void PeerServer::stop() {
    boost::system::error_code ec;
    acceptor_.close(ec);
}

void PeerServer::refuse(const std::string& from, const std::string& why) {
    ++refused_;
    log()->warn("refused peer connection from {}: {}", from, why);
}

asio::awaitable<void> PeerServer::accept_loop(PeerServer* self) {
    auto alive = self->alive_;
    for (;;) {
        auto [ec, socket] = co_await self->acceptor_.async_accept(self->sockets_ex_, nothrow);
        if (!*alive || !self->acceptor_.is_open())
            co_return;
        if (ec)
            continue;
        asio::co_spawn(self->ex_, admit(self, std::move(socket)), asio::detached);
    }
}

asio::awaitable<void> PeerServer::reject(PeerServer* self, std::shared_ptr<Channel> channel, std::string from,
                                         std::string why) {
    self->refuse(from, why);
    nlohmann::json err{{"type", "error"}, {"message", why}};
    co_await channel->write_frame(err);
    channel->close();
}

asio::awaitable<void> PeerServer::admit(PeerServer* self, tcp::socket socket) {
    auto alive = self->alive_;
    boost::system::error_code ec;
    auto remote = socket.remote_endpoint(ec);
    std::string from = ec ? "?" : fmt::format("{}:{}", remote.address().to_string(), remote.port());
    socket.set_option(tcp::no_delay(true), ec);

    std::shared_ptr<Channel> channel;
    std::string cert_name;
    if (self->tls_) {
        auto stream = std::make_unique<TlsStream>(std::move(socket), self->tls_->server());
        asio::steady_timer timer(self->ex_);
        timer.expires_after(handshake_timeout);
        auto* raw = &stream->next_layer();
        timer.async_wait([raw](boost::system::error_code e) {
            if (!e) {
                boost::system::error_code ignored;
                raw->cancel(ignored);
            }
        });
        auto [hec] = co_await stream->async_handshake(asio::ssl::stream_base::server, nothrow);
        timer.cancel();
        if (!*alive)
            co_return;
        if (hec) {
            long verify = SSL_get_verify_result(stream->native_handle());
            std::string detail = verify != X509_V_OK ? X509_verify_cert_error_string(verify) : hec.message();
            self->refuse(from, fmt::format("TLS handshake failed: {}", detail));
            co_return;
        }
        X509* peer_cert = SSL_get1_peer_certificate(stream->native_handle());
        if (peer_cert) {
            cert_name = certificate_node_name(peer_cert);
            X509_free(peer_cert);
        }
        channel = std::make_shared<Channel>(std::move(stream));
    } else {
        channel = std::make_shared<Channel>(std::move(socket));
    }
    channel->peer_address = from;

    auto hello = co_await channel->read_frame(handshake_timeout);
    if (!*alive)
        co_return;
    if (!hello) {
        self->refuse(from, fmt::format("no valid hello: {}", hello.error().message));
        channel->close();
        co_return;
    }
    auto& h = *hello;
    if (h.value("type", "") != "hello") {
        co_await reject(self, channel, from, "first frame is not a hello");
        co_return;
    }
    if (h.value("version", 0U) != protocol_version) {
        co_await reject(self, channel, from, fmt::format("protocol version {} is not {}", h.value("version", 0U), protocol_version));
        co_return;
    }
    auto kind = h.value("kind", "");
    if (kind == "control") {
        auto node = h.value("node", "");
        if (self->tls_ && node != cert_name) {
            co_await reject(self, channel, from, fmt::format("claims to be node '{}' but its certificate names '{}'", node, cert_name));
            co_return;
        }
        if (!self->peers_.count(node)) {
            co_await reject(self, channel, from, fmt::format("node '{}' is not in [[peers]]", node));
            co_return;
        }
        channel->peer_node = node;
        nlohmann::json welcome{{"type", "welcome"}, {"node", self->self_}, {"version", protocol_version}};
        auto w = co_await channel->write_frame(welcome);
        if (!w || !self->on_control_)
            co_return;
        log()->info("control channel from {} ({})", node, from);
        self->on_control_(channel);
        co_return;
    }
    if (kind == "data") {
        auto grant = self->tokens_.redeem(h.value("token", ""));
        if (!grant) {
            co_await reject(self, channel, from, "data channel with an unknown, used or revoked token");
            co_return;
        }
        channel->peer_node = cert_name;
        nlohmann::json welcome{{"type", "welcome"}, {"node", self->self_}};
        auto w = co_await channel->write_frame(welcome);
        if (!w || !self->on_data_)
            co_return;
        self->on_data_(*grant, channel);
        co_return;
    }
    co_await reject(self, channel, from, fmt::format("unknown channel kind '{}'", kind));
}

namespace {
asio::awaitable<Result<std::shared_ptr<Channel>>>
open(asio::any_io_executor ex, const std::string& address, const std::string& peer, nlohmann::json hello,
     std::shared_ptr<TlsIdentity> tls) {
    auto c = co_await dial(ex, address, peer, tls, std::chrono::seconds(10));
    if (!c)
        co_return c.error();
    auto w = co_await (*c)->write_frame(hello);
    if (!w)
        co_return w.error();
    auto reply = co_await (*c)->read_frame(std::chrono::seconds(10));
    if (!reply)
        co_return reply.error().wrap(fmt::format("greeting node {}", peer));
    if (reply->value("type", "") != "welcome")
        co_return make_error(Errc::protocol, fmt::format("node {} refused us: {}", peer, reply->value("message", reply->dump())));
    co_return *c;
}
} // namespace

asio::awaitable<Result<std::shared_ptr<Channel>>>
open_control(asio::any_io_executor ex, const std::string& address, const std::string& peer,
             const std::string& self, std::shared_ptr<TlsIdentity> tls) {
    co_return co_await open(ex, address, peer, control_hello(self), tls);
}

asio::awaitable<Result<std::shared_ptr<Channel>>>
open_data(asio::any_io_executor ex, const std::string& address, const std::string& peer,
          const std::string& token, std::shared_ptr<TlsIdentity> tls) {
    co_return co_await open(ex, address, peer, data_hello(token), tls);
}

} // namespace ferry::transport
