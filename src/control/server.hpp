#pragma once
// The control socket: JSON lines over a Unix socket (docs/control-protocol.md).
//
// Bounded: at most `max_connections` at once (fewer when the fd limit is low),
// each holding at most one request line (max_request_bytes), its parsed
// value and its reply; a connection that sends no whole request, or does not
// take its reply, within `idle_timeout` is closed, and when the cap or the fd
// limit is reached the longest-idle connection makes room for the new one,
// or failing that the oldest stream (its client resumes where it was).
#include "common/error.hpp"
#include "common/fd.hpp"
#include "control/protocol.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>

namespace ferry::control {

using Method = std::function<boost::asio::awaitable<Result<json>>(json params)>;

// A method that takes file descriptors: the ones the client sent with its
// request line (SCM_RIGHTS, at most max_request_fds). Any other method
// refuses a request that carries some.
using FdMethod = std::function<boost::asio::awaitable<Result<json>>(json params, std::vector<UniqueFd> fds)>;
constexpr std::size_t max_request_fds = 16;

// The connection of a streaming method, once its request is read: it writes
// JSON lines until either side is done. A client that takes no line for
// the server's idle_timeout is closed.
class Stream {
public:
    Stream(boost::asio::local::stream_protocol::socket& socket, std::chrono::seconds write_timeout)
        : socket_(socket), write_timeout_(write_timeout) {}
    // One value as one line; false once the client is gone or too slow.
    boost::asio::awaitable<bool> send(const json& value);
    // Completes when the client closes its end or sends anything (a stream
    // takes no further requests on its connection).
    boost::asio::awaitable<void> client_done();
    boost::asio::any_io_executor executor() { return socket_.get_executor(); }

private:
    boost::asio::local::stream_protocol::socket& socket_;
    std::chrono::seconds write_timeout_;
};

// A streaming method: the request's id and params, and the stream. It
// answers its request with its first line and returns when the stream is
// over; the connection closes then. An error before the first line is
// answered as any method's error.
using StreamMethod = std::function<boost::asio::awaitable<Result<void>>(json id, json params, Stream& out)>;

struct ServerLimits {
    std::size_t max_connections = 64;
    std::chrono::seconds idle_timeout{60};
};

class Server {
public:
    Server(boost::asio::any_io_executor ex, std::string path, unsigned mode, ServerLimits limits = {});
    ~Server();

    // A method that changes state is logged with the caller's uid and pid.
    void add(std::string name, Method method, bool changes_state = false);
    void add_stream(std::string name, StreamMethod method);
    void add_with_fds(std::string name, FdMethod method); // logged like a change of state

    // Binds the socket (replacing a stale one, refusing a live one) and
    // starts accepting.
    Result<void> start();
    void stop();
    std::size_t connections() const { return connections_.size(); }
    std::size_t max_connections() const { return max_connections_; }

    // Handles one request line; public for tests.
    boost::asio::awaitable<json> handle(std::string line, std::string caller = "test", std::vector<UniqueFd> fds = {});

private:
    struct Connection;
    struct Entry {
        Method method;
        bool changes_state = false;
        FdMethod with_fds; // set instead of method when it takes descriptors
    };
    static boost::asio::awaitable<void> accept_loop(Server* self);
    static boost::asio::awaitable<void> serve(Server* self, std::shared_ptr<Connection> conn);
    bool evict_idle(); // closes the longest-idle connection; false if none is idle
    void arm_deadline(const std::shared_ptr<Connection>& conn);
    static void disarm_deadline(Connection& conn);
    void throttled_accept_warning(const boost::system::error_code& ec);

    boost::asio::any_io_executor ex_;
    std::string path_;
    unsigned mode_;
    ServerLimits limits_;
    std::size_t max_connections_;
    boost::asio::local::stream_protocol::acceptor acceptor_;
    boost::asio::steady_timer backoff_;
    std::map<std::string, Entry> methods_;
    std::map<std::string, StreamMethod> streams_;
    std::set<std::shared_ptr<Connection>> connections_;
    std::uint64_t next_connection_ = 1;
    std::chrono::steady_clock::time_point last_warning_{};
    std::uint64_t suppressed_warnings_ = 0;
};

// Whether a live ferryd answers on the socket at path (a stale file does not).
bool socket_in_use(const std::string& path);

} // namespace ferry::control
