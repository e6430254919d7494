#pragma once
// Blocking client for the control socket (used by ferryctl and tests).
#include "common/error.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/streambuf.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <string>

namespace ferry::control {

class Client {
public:
    static Result<std::unique_ptr<Client>> connect(const std::string& path);
    // One request; the reply's "result", or its error as an Error.
    Result<nlohmann::json> call(const std::string& method, nlohmann::json params = nlohmann::json::object(),
                                std::chrono::seconds timeout = std::chrono::seconds(300));

private:
    Client() : socket_(io_) {}
    boost::asio::io_context io_;
    boost::asio::local::stream_protocol::socket socket_;
    boost::asio::streambuf buf_;
    std::string path_;
    std::uint64_t next_id_ = 1;
};

} // namespace ferry::control
