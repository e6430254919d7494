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

#include <algorithm>

namespace ferry::transport {

namespace {
constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);
constexpr auto accept_backoff = std::chrono::milliseconds(100);
auto log() {
    static auto l = logger("transport");
    return l;
}

// "a peer connection from A", or for a report that stands for several
// "N peer connections in the last S s (the latest from A)".
std::string connections(const LogThrottle::Report& r, const std::string& from) {
    if (r.events == 1)
        return fmt::format("a peer connection from {}", from);
    return fmt::format("{} peer connections in the last {} s (the latest from {})", r.events, r.over.count(), from);
}

// The handshake deadline: closes the connection when it passes, unless
// disarmed first. Shared with the timer's handler, which may already be
// queued when the coroutine that armed it has moved on.
struct Deadline {
    std::shared_ptr<Channel> channel;
    bool expired = false;
    bool disarmed = false;
};

struct Disarm {
    std::shared_ptr<Deadline> deadline;
    asio::steady_timer& timer;
    void now() {
        deadline->disarmed = true;
        timer.cancel();
    }
    ~Disarm() { now(); }
};
} // namespace

// An unauthenticated connection's place under the caps (taken by
// admissible()), given back once it is authenticated or gone.
class PeerServer::Slot {
public:
    Slot(PeerServer* server, std::string source) : server_(server), alive_(server->alive_), source_(std::move(source)) {}
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    ~Slot() { release(); }
    void release() {
        if (server_ && *alive_) {
            --server_->unauthenticated_;
            auto it = server_->unauthenticated_from_.find(source_);
            if (it != server_->unauthenticated_from_.end() && --it->second == 0)
                server_->unauthenticated_from_.erase(it);
        }
        server_ = nullptr;
    }

private:
    PeerServer* server_;
    std::shared_ptr<bool> alive_;
    std::string source_;
};

nlohmann::json control_hello(const std::string& self) {
    return {{"type", "hello"}, {"version", protocol_version}, {"kind", "control"}, {"node", self}};
}

nlohmann::json data_hello(const std::string& token) {
    return {{"type", "hello"}, {"version", protocol_version}, {"kind", "data"}, {"token", token}};
}

PeerServer::PeerServer(asio::any_io_executor ex, std::string listen, std::shared_ptr<TlsIdentity> tls,
                       std::string self, std::set<std::string> peers, asio::any_io_executor sockets_ex,
                       PeerLimits limits)
    : ex_(ex), sockets_ex_(sockets_ex ? sockets_ex : ex), listen_(std::move(listen)), tls_(std::move(tls)), self_(std::move(self)),
      peers_(std::move(peers)), acceptor_(ex), limits_(limits), backoff_(ex) {}

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
    log()->info("peer endpoint {}: at most {} unauthenticated connections, {} from one address, each closed unless it "
                "sends its hello within {} s",
                listen_, limits_.max_unauthenticated, limits_.max_per_source, limits_.handshake_timeout.count());
    asio::co_spawn(ex_, accept_loop(this), asio::detached);
    return {};
}

void PeerServer::stop() {
    backoff_.cancel();
    boost::system::error_code ec;
    acceptor_.close(ec);
}

void PeerServer::refuse(const std::string& from, const std::string& why) {
    ++refused_;
    if (auto r = refusal_log_.note())
        log()->warn("refused {}: {}", connections(*r, from), why);
}

void PeerServer::note_timeout(const std::string& from, const char* what) {
    ++timed_out_;
    if (auto r = deadline_log_.note())
        log()->warn("closed {}: no {} within {} s", connections(*r, from), what, limits_.handshake_timeout.count());
}

void PeerServer::accept_failed(const boost::system::error_code& ec) {
    ++accept_errors_;
    if (auto r = accept_log_.note())
        log()->warn("accepting on the peer endpoint {}: {}{}; retrying in {} ms", listen_, ec.message(),
                    r->events > 1 ? fmt::format(" ({} times in the last {} s)", r->events, r->over.count()) : "",
                    accept_backoff.count());
}

// Takes a slot for a new connection from source, or says it is over a cap.
bool PeerServer::admissible(const std::string& source) {
    auto it = unauthenticated_from_.find(source);
    std::size_t from_source = it == unauthenticated_from_.end() ? 0 : it->second;
    if (unauthenticated_ >= limits_.max_unauthenticated) {
        ++over_cap_;
        if (auto r = total_cap_log_.note())
            log()->warn("refused {}: over the cap of {} unauthenticated connections", connections(*r, source),
                        limits_.max_unauthenticated);
        return false;
    }
    if (from_source >= limits_.max_per_source) {
        ++over_cap_;
        if (auto r = source_cap_log_.note())
            log()->warn("refused {}: over the cap of {} unauthenticated connections from one address",
                        connections(*r, source), limits_.max_per_source);
        return false;
    }
    ++unauthenticated_;
    ++unauthenticated_from_[source];
    return true;
}

asio::awaitable<void> PeerServer::accept_loop(PeerServer* self) {
    auto alive = self->alive_;
    for (;;) {
        auto [ec, socket] = co_await self->acceptor_.async_accept(self->sockets_ex_, nothrow);
        if (!*alive || !self->acceptor_.is_open() || ec == asio::error::operation_aborted)
            co_return;
        if (ec == asio::error::connection_aborted) // that connection is gone; the next may be fine
            continue;
        if (ec) {
            // Out of descriptors (EMFILE, ENFILE) or memory: retrying at once
            // would only spin. Wait for connections to close.
            self->accept_failed(ec);
            self->backoff_.expires_after(accept_backoff);
            auto [wec] = co_await self->backoff_.async_wait(nothrow);
            if (!*alive || wec || !self->acceptor_.is_open())
                co_return;
            continue;
        }
        boost::system::error_code rec;
        auto remote = socket.remote_endpoint(rec);
        std::string source = rec ? "?" : remote.address().to_string();
        if (!self->admissible(source)) {
            socket.close(rec); // at once: it holds nothing
            continue;
        }
        asio::co_spawn(self->ex_, admit(self, std::move(socket), std::move(source)), asio::detached);
    }
}

asio::awaitable<void> PeerServer::reject(PeerServer* self, std::shared_ptr<Channel> channel, std::string from,
                                         std::string why) {
    self->refuse(from, why);
    nlohmann::json err{{"type", "error"}, {"message", why}};
    co_await channel->write_frame(err);
    channel->close();
}

asio::awaitable<void> PeerServer::admit(PeerServer* self, tcp::socket socket, std::string source) {
    auto alive = self->alive_;
    Slot slot(self, source);
    boost::system::error_code ec;
    auto remote = socket.remote_endpoint(ec);
    std::string from = ec ? "?" : fmt::format("{}:{}", remote.address().to_string(), remote.port());
    socket.set_option(tcp::no_delay(true), ec);

    std::shared_ptr<Channel> channel;
    TlsStream* tls = nullptr;
    if (self->tls_) {
        auto stream = std::make_unique<TlsStream>(std::move(socket), self->tls_->server());
        tls = stream.get();
        channel = std::make_shared<Channel>(std::move(stream));
    } else {
        channel = std::make_shared<Channel>(std::move(socket));
    }
    channel->peer_address = from;

    // One deadline from accept to the hello, whatever the client trickles.
    auto deadline = std::make_shared<Deadline>();
    deadline->channel = channel;
    auto hello_by = std::chrono::steady_clock::now() + self->limits_.handshake_timeout;
    asio::steady_timer timer(self->ex_);
    timer.expires_at(hello_by);
    timer.async_wait([deadline](boost::system::error_code e) {
        if (e || deadline->disarmed)
            return;
        deadline->expired = true;
        deadline->channel->close();
    });
    Disarm disarm{deadline, timer};

    std::string cert_name;
    if (tls) {
        auto [hec] = co_await tls->async_handshake(asio::ssl::stream_base::server, nothrow);
        if (!*alive)
            co_return;
        if (deadline->expired) {
            self->note_timeout(from, "TLS handshake");
            co_return;
        }
        if (hec) {
            long verify = SSL_get_verify_result(tls->native_handle());
            std::string detail = verify != X509_V_OK ? X509_verify_cert_error_string(verify) : hec.message();
            self->refuse(from, fmt::format("TLS handshake failed: {}", detail));
            channel->close();
            co_return;
        }
        X509* peer_cert = SSL_get1_peer_certificate(tls->native_handle());
        if (peer_cert) {
            cert_name = certificate_node_name(peer_cert);
            X509_free(peer_cert);
        }
    }

    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(hello_by - std::chrono::steady_clock::now());
    auto hello = co_await channel->read_frame(std::max(left, std::chrono::milliseconds(1)));
    if (!*alive)
        co_return;
    if (deadline->expired || (!hello && hello.error().code == Errc::timeout)) {
        self->note_timeout(from, "hello");
        channel->close();
        co_return;
    }
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
        if (!*alive || !w || deadline->expired || !self->on_control_)
            co_return;
        disarm.now();
        slot.release();
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
        if (!*alive || !w || deadline->expired || !self->on_data_)
            co_return;
        disarm.now();
        slot.release();
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
