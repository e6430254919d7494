#pragma once
// The peer endpoint ([node] listen). Every connection starts with a TLS
// handshake (unless TLS is disabled) and a hello frame:
//   {"type":"hello","version":1,"kind":"control","node":"node-a"}
//   {"type":"hello","version":1,"kind":"data","token":"<hex>"}
// A control channel is accepted from a configured peer whose certificate
// names it; a data channel only with a token the target issued. Anything
// else is refused, with the reason logged.
#include "transport/channel.hpp"
#include "transport/tokens.hpp"

#include <functional>
#include <set>

namespace ferry::transport {

class PeerServer {
public:
    using ControlHandler = std::function<void(std::shared_ptr<Channel>)>;
    using DataHandler = std::function<void(TokenGrant, std::shared_ptr<Channel>)>;

    // Handlers run on ex; accepted sockets live on sockets_ex (the data
    // plane in ferryd, so data channels can be tunnelled there), or on ex
    // when none is given.
    PeerServer(asio::any_io_executor ex, std::string listen, std::shared_ptr<TlsIdentity> tls,
               std::string self, std::set<std::string> peers, asio::any_io_executor sockets_ex = {});
    ~PeerServer();

    void on_control(ControlHandler h) { on_control_ = std::move(h); }
    void on_data(DataHandler h) { on_data_ = std::move(h); }
    TokenRegistry& tokens() { return tokens_; }

    Result<void> start();
    void stop();
    unsigned short port() const { return port_; }
    std::uint64_t refused() const { return refused_; }

private:
    static asio::awaitable<void> accept_loop(PeerServer* self);
    static asio::awaitable<void> admit(PeerServer* self, tcp::socket socket);
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
    std::uint64_t refused_ = 0;
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
