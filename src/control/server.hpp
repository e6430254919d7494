#pragma once
// The control socket: JSON lines over a Unix socket (docs/control-protocol.md).
#include "common/error.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <memory>
#include <string>

namespace ferry::control {

using json = nlohmann::json;
using Method = std::function<boost::asio::awaitable<Result<json>>(json params)>;

class Server {
public:
    Server(boost::asio::any_io_executor ex, std::string path, unsigned mode);
    ~Server();

    void add(std::string name, Method method) { methods_[std::move(name)] = std::move(method); }

    // Binds the socket (replacing a stale one, refusing a live one) and
    // starts accepting.
    Result<void> start();
    void stop();

    // Handles one request line; public for tests.
    boost::asio::awaitable<json> handle(const std::string& line);

private:
    static boost::asio::awaitable<void> accept_loop(Server* self);
    static boost::asio::awaitable<void> serve(Server* self, boost::asio::local::stream_protocol::socket socket);

    boost::asio::any_io_executor ex_;
    std::string path_;
    unsigned mode_;
    boost::asio::local::stream_protocol::acceptor acceptor_;
    std::map<std::string, Method> methods_;
};

// Error codes on the wire are the names of ferry::Errc.
json error_reply(const json& id, const Error& e);

} // namespace ferry::control
