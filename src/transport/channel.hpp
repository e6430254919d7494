#pragma once
// One peer connection: TLS 1.3 over TCP, or plain TCP when TLS is disabled.
#include "common/error.hpp"
#include "transport/tls.hpp"

#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <variant>

namespace ferry::transport {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using TlsStream = asio::ssl::stream<tcp::socket>;

class Channel {
public:
    explicit Channel(tcp::socket socket);
    explicit Channel(std::unique_ptr<TlsStream> stream);

    asio::awaitable<Result<std::size_t>> read_some(asio::mutable_buffer buffer);
    asio::awaitable<Result<void>> write_all(asio::const_buffer buffer);
    void close();

    // Framed control messages (frame.hpp), each with a deadline.
    asio::awaitable<Result<nlohmann::json>> read_frame(std::chrono::milliseconds timeout);
    asio::awaitable<Result<void>> write_frame(const nlohmann::json& message);

    bool tls() const { return std::holds_alternative<std::unique_ptr<TlsStream>>(stream_); }
    tcp::socket& socket();
    // The peer's node name: from its certificate (TLS), or as it claimed
    // (plain TCP, unauthenticated).
    std::string peer_node;
    std::string peer_address;

private:
    std::variant<tcp::socket, std::unique_ptr<TlsStream>> stream_;
    std::string pending_; // bytes read past the last frame
    boost::system::error_code pending_error_;
};

// Dials a peer and authenticates it as expected_node (TLS), within timeout.
asio::awaitable<Result<std::shared_ptr<Channel>>>
dial(asio::any_io_executor ex, const std::string& address, const std::string& expected_node,
     std::shared_ptr<TlsIdentity> tls, std::chrono::milliseconds timeout);

// Splits "host:port".
Result<tcp::endpoint> parse_endpoint(const std::string& address);

} // namespace ferry::transport
