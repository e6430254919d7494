#pragma once
// The peer endpoint ([node] listen). Every connection starts with a TLS
// handshake (unless TLS is disabled) and a hello frame:
//   {"type":"hello","version":1,"kind":"control","node":"node-a"}
//   {"type":"hello","version":1,"kind":"data","token":"<hex>"}
// A control channel is accepted from a configured peer whose certificate
// names it; a data channel only with a token the target issued. Anything
// else is refused, with the reason logged.
//
// Reachable before anyone is authenticated, so bounded: at most
// max_unauthenticated connections between accept and an accepted hello, at
// most max_per_source of them from one address; one over either cap is
// closed at once. A connection that has not sent its hello within
// handshake_timeout of its accept is closed. Out of descriptors, the accept
// loop waits instead of spinning. Refusals are logged once per 10 s with
// their count.
#include "common/throttle.hpp"
#include "transport/channel.hpp"
#include "transport/tokens.hpp"

#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <set>

namespace ferry::transport {

struct PeerLimits {
    std::size_t max_unauthenticated = 64;
    std::size_t max_per_source = 8;
    std::chrono::seconds handshake_timeout{10}; // from accept to the hello
};

class PeerServer {
public:
    using ControlHandler = std::function<void(std::shared_ptr<Channel>)>;
    using DataHandler = std::function<void(TokenGrant, std::shared_ptr<Channel>)>;

    // Handlers run on ex; accepted sockets live on sockets_ex (the data
    // plane in ferryd, so data channels can be tunnelled there), or on ex
    // when none is given.
    PeerServer(asio::any_io_executor ex, std::string listen, std::shared_ptr<TlsIdentity> tls,
               std::string self, std::set<std::string> peers, asio::any_io_executor sockets_ex = {},
               PeerLimits limits = {});
    ~PeerServer();

    void on_control(ControlHandler h) { on_control_ = std::move(h); }
    void on_data(DataHandler h) { on_data_ = std::move(h); }
    TokenRegistry& tokens() { return tokens_; }

    Result<void> start();
    void stop();
    unsigned short port() const { return port_; }
    // Counters (readable from any thread): refused after a look at what the
    // connection sent; closed at accept for being over a cap; closed at the
    // handshake deadline; failed accepts.
    std::uint64_t refused() const { return refused_; }
    std::uint64_t over_cap() const { return over_cap_; }
    std::uint64_t timed_out() const { return timed_out_; }
    std::uint64_t accept_errors() const { return accept_errors_; }
    // Connections accepted and not yet authenticated (read from the
    // server's executor only).
    std::size_t unauthenticated() const { return unauthenticated_; }

private:
    class Slot;
    static asio::awaitable<void> accept_loop(PeerServer* self);
    bool admissible(const std::string& source);
    void accept_failed(const boost::system::error_code& ec);
    void note_timeout(const std::string& from, const char* what);
    static asio::awaitable<void> admit(PeerServer* self, tcp::socket socket, std::string source);
    static asio::awaitable<void> reject(PeerServer* self, std::shared_ptr<Channel> channel, std::string from,
                                        std::string why);
    void refuse(const std::string& from, const std::string& why);

    asio::any_io_executor ex_;
    asio::any_io_executor sockets_ex_;
    std::string listen_;
    std::shared_ptr<TlsIdentity> tls_;
    std::string self_;
    std::set<std::string> peers_;
    tcp::acceptor acceptor_;
    unsigned short port_ = 0;
    TokenRegistry tokens_;
    ControlHandler on_control_;
    DataHandler on_data_;
    PeerLimits limits_;
    asio::steady_timer backoff_;
    std::size_t unauthenticated_ = 0;
    std::map<std::string, std::size_t> unauthenticated_from_; // by source address
    std::atomic<std::uint64_t> refused_{0};
    std::atomic<std::uint64_t> over_cap_{0};
    std::atomic<std::uint64_t> timed_out_{0};
    std::atomic<std::uint64_t> accept_errors_{0};
    LogThrottle refusal_log_, total_cap_log_, source_cap_log_, deadline_log_, accept_log_;
    std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

// The hello a dialling node sends, and what the server answers.
nlohmann::json control_hello(const std::string& self);
nlohmann::json data_hello(const std::string& token);

// Dials a peer's control channel: TLS, hello, welcome.
asio::awaitable<Result<std::shared_ptr<Channel>>>
open_control(asio::any_io_executor ex, const std::string& address, const std::string& peer,
             const std::string& self, std::shared_ptr<TlsIdentity> tls);
// Dials a data channel for a token.
asio::awaitable<Result<std::shared_ptr<Channel>>>
open_data(asio::any_io_executor ex, const std::string& address, const std::string& peer,
          const std::string& token, std::shared_ptr<TlsIdentity> tls);

} // namespace ferry::transport
