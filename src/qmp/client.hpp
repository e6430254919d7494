#pragma once
// Async QMP client over a Unix socket (Asio coroutines, single-threaded use).
//
// Every command carries an id and a deadline; replies are matched by id, so
// commands may overlap. Events go to every subscriber. Losing the connection
// fails every waiting command with Errc::disconnected and tells close
// handlers. Not thread-safe: use it from one strand/io_context thread.
#include "common/error.hpp"
#include "qmp/message.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/streambuf.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

namespace ferry::qmp {

namespace asio = boost::asio;
using json = nlohmann::json;
using namespace std::chrono_literals;

class Client : public std::enable_shared_from_this<Client> {
public:
    using EventHandler = std::function<void(const Event&)>;
    using CloseHandler = std::function<void(const Error&)>;

    // Connects, reads the greeting and negotiates capabilities, all within
    // timeout.
    static asio::awaitable<Result<std::shared_ptr<Client>>>
    connect(asio::any_io_executor ex, std::string path, std::chrono::milliseconds timeout = 10s);

    // Keeps trying to connect (the socket may not exist yet) until timeout.
    static asio::awaitable<Result<std::shared_ptr<Client>>>
    connect_retry(asio::any_io_executor ex, std::string path, std::chrono::milliseconds timeout);

    // Runs a command; the result is QEMU's "return" value, or an Errc::qemu
    // error with QEMU's class and description.
    asio::awaitable<Result<json>> execute(std::string command, json arguments = json::object(),
                                          std::chrono::milliseconds timeout = 10s);

    // Same, passing fd to QEMU with SCM_RIGHTS along with the command (for
    // getfd / add-fd).
    asio::awaitable<Result<json>> execute_with_fd(std::string command, json arguments, int fd,
                                                  std::chrono::milliseconds timeout = 10s);

    // Waits for the next event that satisfies pred. Subscribe before acting
    // if the event may come before this call.
    asio::awaitable<Result<Event>> wait_event(std::function<bool(const Event&)> pred,
                                              std::chrono::milliseconds timeout);

    std::size_t subscribe(EventHandler handler);
    void unsubscribe(std::size_t id);
    void on_close(CloseHandler handler) { close_handlers_.push_back(std::move(handler)); }

    void close();
    bool connected() const { return connected_; }
    const std::string& path() const { return path_; }
    const json& greeting() const { return greeting_; }
    int peer_pid() const { return peer_pid_; } // from SO_PEERCRED, -1 if unknown

    Client(asio::any_io_executor ex, std::string path);
    ~Client();
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;

private:
    struct Pending {
        explicit Pending(asio::any_io_executor ex) : timer(ex) {}
        asio::steady_timer timer;
        std::optional<Result<json>> result;
    };
    struct EventWaiter {
        explicit EventWaiter(asio::any_io_executor ex) : timer(ex) {}
        std::function<bool(const Event&)> pred;
        asio::steady_timer timer;
        std::optional<Event> event;
        bool failed = false;
    };
    struct Outgoing {
        std::string data;
        int fd = -1;
    };

    asio::awaitable<Result<Message>> read_message(std::chrono::milliseconds timeout);
    asio::awaitable<Result<void>> handshake(std::chrono::milliseconds timeout);
    asio::awaitable<Result<json>> send_command(std::string command, json arguments, int fd,
                                               std::chrono::milliseconds timeout);
    static asio::awaitable<void> read_loop(std::shared_ptr<Client> self);
    static asio::awaitable<void> write_loop(std::shared_ptr<Client> self);
    void dispatch(Message message);
    void fail_all(const Error& e);
    Result<void> send_with_fd(const Outgoing& out, std::size_t& sent);

    asio::any_io_executor ex_;
    asio::local::stream_protocol::socket socket_;
    asio::streambuf buffer_;
    std::string path_;
    json greeting_;
    int peer_pid_ = -1;
    bool connected_ = false;
    bool writing_ = false;
    std::uint64_t next_id_ = 1;
    std::map<std::uint64_t, std::shared_ptr<Pending>> pending_;
    std::map<std::uint64_t, std::string> pending_names_;
    std::deque<Outgoing> outgoing_;
    std::map<std::size_t, EventHandler> subscribers_;
    std::size_t next_subscriber_ = 1;
    std::vector<std::shared_ptr<EventWaiter>> event_waiters_;
    std::vector<CloseHandler> close_handlers_;
};

} // namespace ferry::qmp
