#pragma once
// Blocking client for the control socket (used by ferryctl and tests).
// Every call has a deadline: a ferryd that accepts and never answers is
// reported, not waited on forever.
#include "common/error.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/streambuf.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <string>
#include <vector>

namespace ferry::control {

class Client {
public:
    static Result<std::unique_ptr<Client>> connect(const std::string& path,
                                                   std::chrono::milliseconds timeout = std::chrono::seconds(10));
    // One request; the reply's "result", or its error as an Error.
    Result<nlohmann::json> call(const std::string& method, nlohmann::json params = nlohmann::json::object(),
                                std::chrono::milliseconds timeout = std::chrono::seconds(60));
    // The same, handing ferryd these descriptors with the request
    // (SCM_RIGHTS); they stay open here.
    Result<nlohmann::json> call_with_fds(const std::string& method, nlohmann::json params, const std::vector<int>& fds,
                                         std::chrono::milliseconds timeout = std::chrono::seconds(60));

    // The next line of a stream (after call() of a streaming method such as
    // events.subscribe answered): the JSON value, or why there is none
    // (timeout: nothing came within `timeout`; disconnected: ferryd closed).
    Result<nlohmann::json> next(std::chrono::milliseconds timeout);

    // Whether ferryd answered the last call (its error, if any, is ferryd's
    // own: about a VM, QEMU or a peer), rather than the call failing on the
    // way to or from ferryd.
    bool answered() const { return answered_; }

private:
    Result<nlohmann::json> exchange(const std::string& method, nlohmann::json params, const std::vector<int>& fds,
                                    std::chrono::milliseconds timeout);
    Client() : socket_(io_) {}
    // Runs the io_context until done() or the deadline; false on timeout.
    template <class Done> bool run_until(Done done, std::chrono::steady_clock::time_point deadline);
    boost::asio::io_context io_;
    boost::asio::local::stream_protocol::socket socket_;
    boost::asio::streambuf buf_;
    std::string path_;
    std::uint64_t next_id_ = 1;
    bool answered_ = false;
};

// Maps an error code's wire name back to Errc (internal when unknown).
Errc errc_from_string(std::string_view name);

} // namespace ferry::control
