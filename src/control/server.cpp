#include "control/server.hpp"

#include "common/json.hpp"
#include "common/log.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

namespace ferry::control {

namespace asio = boost::asio;
using stream = asio::local::stream_protocol;
using Clock = std::chrono::steady_clock;

namespace {
auto log() {
    static auto l = logger("control");
    return l;
}

// Half the fd limit at most: the rest is for QEMU's sockets, consoles, peers.
std::size_t connection_cap(std::size_t configured) {
    rlimit rl{};
    if (::getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return configured;
    return std::max<std::size_t>(4, std::min<std::size_t>(configured, rl.rlim_cur / 2));
}

std::string describe_peer(int fd) {
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
        return "an unknown peer";
    return fmt::format("uid {} gid {} pid {}", cred.uid, cred.gid, cred.pid);
}

bool out_of_descriptors(const boost::system::error_code& ec) {
    return ec == asio::error::no_descriptors || ec.value() == ENFILE || ec == asio::error::no_buffer_space ||
           ec == asio::error::no_memory;
}
} // namespace

struct Server::Connection {
    Connection(stream::socket s, std::uint64_t n) : socket(std::move(s)), idle_timer(socket.get_executor()), number(n) {}
    stream::socket socket;
    asio::steady_timer idle_timer;
    std::uint64_t number;
    std::string peer;
    Clock::time_point idle_since = Clock::now();
    std::uint64_t deadline_generation = 0;
    bool busy = false;      // a request is being handled
    bool streaming = false; // a stream (busy for its whole life, yet evictable)
    // Descriptors (SCM_RIGHTS) by the line they came with, named by the
    // offset of its first byte in the connection's byte stream.
    struct Fds {
        std::uint64_t line = 0;
        std::vector<UniqueFd> fds;
        bool lost = false; // more than max_request_fds, or cut by the kernel
    };
    std::vector<Fds> fds;
    std::uint64_t consumed = 0; // bytes of whole lines taken so far (the buffer holds what follows)
};

namespace {

// Reads until buf holds a whole line (its length, newline included), taking
// the descriptors that come with it (SCM_RIGHTS) into conn.fds. not_found:
// the line is longer than buf may grow.
template <class Conn>
asio::awaitable<std::pair<boost::system::error_code, std::size_t>> read_line(Conn& conn, asio::streambuf& buf) {
    using Reply = std::pair<boost::system::error_code, std::size_t>;
    for (;;) {
        auto begin = asio::buffers_begin(buf.data());
        auto end = asio::buffers_end(buf.data());
        if (auto nl = std::find(begin, end, '\n'); nl != end)
            co_return Reply{{}, static_cast<std::size_t>(nl - begin) + 1};
        if (buf.size() >= buf.max_size())
            co_return Reply{asio::error::not_found, 0};
        auto [ec] = co_await conn.socket.async_wait(stream::socket::wait_read, asio::as_tuple(asio::use_awaitable));
        if (ec)
            co_return Reply{ec, 0};
        auto room = buf.prepare(std::min<std::size_t>(4096, buf.max_size() - buf.size()));
        iovec iov{room.data(), room.size()};
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_request_fds)];
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof(control);
        ssize_t n = ::recvmsg(conn.socket.native_handle(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            continue;
        if (n < 0)
            co_return Reply{boost::system::error_code(errno, boost::system::system_category()), 0};
        typename Conn::Fds got;
        for (auto* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < count; ++i) {
                int fd;
                std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                UniqueFd owned(fd);
                if (got.fds.size() < max_request_fds)
                    got.fds.push_back(std::move(owned));
                else
                    got.lost = true;
            }
        }
        if (msg.msg_flags & MSG_CTRUNC)
            got.lost = true;
        if (n == 0)
            co_return Reply{asio::error::eof, 0};
        if (!got.fds.empty() || got.lost) {
            // The kernel ends a read with the message that carried
            // descriptors, and a client sends them with a request's first
            // byte: they belong to the last line that starts in this read
            // (or, from a client that sent them mid-line, to that line).
            // The buffer holds no newline yet (else this read would not
            // have happened): its line starts at `consumed`.
            std::uint64_t pre = conn.consumed + buf.size();
            std::uint64_t line = conn.consumed;
            auto* chunk = static_cast<const char*>(room.data());
            for (ssize_t i = 0; i + 1 < n; ++i)
                if (chunk[i] == '\n')
                    line = pre + static_cast<std::uint64_t>(i) + 1;
            got.line = line;
            // Several reads may carry descriptors for one line: at most
            // max_request_fds in all, the rest closed and the line refused.
            if (!conn.fds.empty() && conn.fds.back().line == line) {
                auto& same = conn.fds.back();
                same.lost = same.lost || got.lost;
                for (auto& fd : got.fds) {
                    if (same.fds.size() < max_request_fds)
                        same.fds.push_back(std::move(fd));
                    else
                        same.lost = true;
                }
            } else {
                conn.fds.push_back(std::move(got));
            }
        }
        buf.commit(static_cast<std::size_t>(n));
    }
}

} // namespace

bool socket_in_use(const std::string& path) {
    if (path.empty() || path.size() >= sizeof(sockaddr_un::sun_path))
        return false;
    // Non-blocking: a listener whose backlog is full answers EAGAIN, which
    // also means someone listens.
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    bool live = rc == 0 || errno == EAGAIN || errno == EINPROGRESS;
    ::close(fd);
    return live;
}

Server::Server(asio::any_io_executor ex, std::string path, unsigned mode, ServerLimits limits)
    : ex_(ex), path_(std::move(path)), mode_(mode), limits_(limits), max_connections_(connection_cap(limits.max_connections)),
      acceptor_(ex), backoff_(ex) {}

Server::~Server() { stop(); }

void Server::add(std::string name, Method method, bool changes_state) {
    methods_[std::move(name)] = Entry{std::move(method), changes_state, nullptr};
}

Result<void> Server::start() {
    namespace fs = std::filesystem;
    if (path_.empty() || path_.size() >= sizeof(sockaddr_un::sun_path))
        return make_error(Errc::invalid_argument,
                          fmt::format("control socket path '{}' must be 1 to {} bytes long", path_,
                                      sizeof(sockaddr_un::sun_path) - 1));
    std::error_code ec;
    // A directory ferryd creates is 0755 whatever its umask: the socket's
    // own mode decides who gets in.
    auto dir = fs::path(path_).parent_path();
    if (!dir.empty() && !fs::exists(dir, ec) && fs::create_directories(dir, ec))
        fs::permissions(dir, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                 fs::perms::others_read | fs::perms::others_exec, ec);
    if (fs::exists(path_, ec) || fs::is_symlink(path_, ec)) {
        // A live ferryd answers on it; a stale socket is replaced, anything
        // else is not ferry's to delete.
        if (socket_in_use(path_))
            return make_error(Errc::already_exists,
                              fmt::format("control socket {} is in use by another ferryd", path_));
        if (!fs::is_socket(fs::symlink_status(path_, ec)))
            return make_error(Errc::already_exists,
                              fmt::format("control socket {} exists and is not a socket; remove it or pick another "
                                          "path",
                                          path_));
        fs::remove(path_, ec);
    }
    boost::system::error_code bec;
    acceptor_.open(stream(), bec);
    // No moment in which the socket exists with wider permissions than asked.
    mode_t old_mask = ::umask(0777 & ~mode_);
    if (!bec)
        acceptor_.bind(stream::endpoint(path_), bec);
    ::umask(old_mask);
    if (!bec)
        acceptor_.listen(asio::socket_base::max_listen_connections, bec);
    if (bec)
        return make_error(Errc::io, fmt::format("control socket {}: {}", path_, bec.message()));
    ::chmod(path_.c_str(), mode_);
    asio::co_spawn(ex_, accept_loop(this), asio::detached);
    log()->info("control socket {} (mode {:04o}, at most {} connections, idle ones closed after {} s)", path_, mode_,
                max_connections_, limits_.idle_timeout.count());
    return {};
}

void Server::stop() {
    backoff_.cancel();
    for (auto& c : connections_) {
        boost::system::error_code ec;
        c->socket.close(ec);
        c->idle_timer.cancel();
    }
    if (!acceptor_.is_open())
        return;
    boost::system::error_code ec;
    acceptor_.close(ec);
    std::error_code fec;
    std::filesystem::remove(path_, fec);
}

bool Server::evict_idle() {
    std::shared_ptr<Connection> oldest;
    for (auto& c : connections_)
        if (!c->busy && c->socket.is_open() && (!oldest || c->idle_since < oldest->idle_since))
            oldest = c;
    // Else the oldest stream: its client resumes from the last event it took
    // (ferryctl does), while a request in flight cannot be cut.
    if (!oldest)
        for (auto& c : connections_)
            if (c->streaming && c->socket.is_open() && (!oldest || c->idle_since < oldest->idle_since))
                oldest = c;
    if (!oldest)
        return false;
    if (oldest->streaming)
        log()->info("closing the oldest event stream (connection {}, {}) to make room", oldest->number, oldest->peer);
    else
        log()->debug("closing idle connection {} ({}) to make room", oldest->number, oldest->peer);
    boost::system::error_code ec;
    oldest->socket.close(ec);
    connections_.erase(oldest); // its fd is free now; serve() finds the socket closed
    return true;
}

void Server::throttled_accept_warning(const boost::system::error_code& ec) {
    auto now = Clock::now();
    if (now - last_warning_ < std::chrono::seconds(10)) {
        ++suppressed_warnings_;
        return;
    }
    log()->warn("accept on {}: {}{}; backing off and closing idle connections", path_, ec.message(),
                suppressed_warnings_ ? fmt::format(" ({} more since the last warning)", suppressed_warnings_) : "");
    last_warning_ = now;
    suppressed_warnings_ = 0;
}

asio::awaitable<void> Server::accept_loop(Server* self) {
    auto backoff = std::chrono::milliseconds(10);
    for (;;) {
        auto [ec, socket] = co_await self->acceptor_.async_accept(asio::as_tuple(asio::use_awaitable));
        if (ec == asio::error::operation_aborted || !self->acceptor_.is_open())
            co_return;
        if (ec) {
            self->throttled_accept_warning(ec);
            // Out of fds: an idle connection gives one back at once; else
            // wait (doubling, up to a second) instead of spinning.
            if (out_of_descriptors(ec) && self->evict_idle())
                continue;
            self->backoff_.expires_after(backoff);
            auto [wec] = co_await self->backoff_.async_wait(asio::as_tuple(asio::use_awaitable));
            if (wec || !self->acceptor_.is_open())
                co_return;
            backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::seconds(1));
            continue;
        }
        backoff = std::chrono::milliseconds(10);
        if (self->connections_.size() >= self->max_connections_ && !self->evict_idle()) {
            // Every connection is in the middle of a request: refuse this one.
            auto reply = error_reply(nullptr, make_error(Errc::conflict,
                                                         fmt::format("ferryd is busy with {} connections, the most "
                                                                     "it serves at once; try again",
                                                                     self->connections_.size())));
            std::string out = dump_json(reply) + "\n";
            boost::system::error_code wec;
            socket.non_blocking(true, wec);
            asio::write(socket, asio::buffer(out), wec);
            continue;
        }
        auto conn = std::make_shared<Connection>(std::move(socket), self->next_connection_++);
        conn->peer = describe_peer(conn->socket.native_handle());
        self->connections_.insert(conn);
        asio::co_spawn(self->ex_, serve(self, conn), asio::detached);
    }
}

// Closes the connection unless the current wait ends first. A generation
// number tells this deadline from an earlier one whose handler was already
// queued when it was cancelled.
void Server::arm_deadline(const std::shared_ptr<Connection>& conn) {
    auto generation = ++conn->deadline_generation;
    conn->idle_timer.expires_after(limits_.idle_timeout);
    conn->idle_timer.async_wait([weak = std::weak_ptr<Connection>(conn), generation](boost::system::error_code ec) {
        auto c = weak.lock();
        if (ec || !c || c->deadline_generation != generation)
            return;
        boost::system::error_code ignored;
        c->socket.close(ignored);
    });
}

void Server::disarm_deadline(Connection& conn) {
    ++conn.deadline_generation;
    conn.idle_timer.cancel();
}

asio::awaitable<void> Server::serve(Server* self, std::shared_ptr<Connection> conn) {
    // However serve() ends, the connection is closed and its slot freed.
    struct Release {
        Server* server;
        std::shared_ptr<Connection> conn;
        ~Release() {
            boost::system::error_code ignored;
            conn->socket.close(ignored);
            server->connections_.erase(conn);
        }
    } release{self, conn};
    asio::streambuf buf(max_request_bytes); // one line, its newline included
    for (;;) {
        conn->busy = false;
        conn->idle_since = Clock::now();
        self->arm_deadline(conn);
        auto [ec, n] = co_await read_line(*conn, buf);
        self->disarm_deadline(*conn);
        // Closed meanwhile (evicted, or the deadline passed just as the line
        // came): the request is not run, so nothing happens unanswered.
        if (!conn->socket.is_open())
            break;
        if (ec) {
            if (ec == asio::error::not_found) {
                auto reply = error_reply(nullptr, make_error(Errc::protocol,
                                                             fmt::format("request larger than {} KiB",
                                                                         max_request_bytes >> 10)));
                std::string out = dump_json(reply) + "\n";
                self->arm_deadline(conn);
                co_await asio::async_write(conn->socket, asio::buffer(out), asio::as_tuple(asio::use_awaitable));
            }
            break;
        }
        conn->busy = true;
        std::string line(asio::buffers_begin(buf.data()), asio::buffers_begin(buf.data()) + n);
        buf.consume(n);
        // This line's descriptors; any for an earlier line went unclaimed
        // (their line was cut) and are closed.
        std::vector<UniqueFd> fds;
        bool fds_lost = false;
        auto line_start = conn->consumed;
        conn->consumed += n;
        while (!conn->fds.empty() && conn->fds.front().line <= line_start) {
            if (conn->fds.front().line == line_start) {
                fds = std::move(conn->fds.front().fds);
                fds_lost = conn->fds.front().lost;
            }
            conn->fds.erase(conn->fds.begin());
        }
        // A streaming method takes the connection over until it is done; it
        // takes no descriptors, so a request that brings some is refused
        // (and they are closed) before it starts.
        json stream_id;
        std::string stream_with_fds; // the stream method a request with descriptors asked for
        if (auto request = parse_request(line, stream_id); request) {
            if (auto it = self->streams_.find(request->method); it != self->streams_.end()) {
                if (fds_lost || !fds.empty()) {
                    stream_with_fds = request->method;
                } else {
                    conn->streaming = true;
                    conn->idle_since = Clock::now(); // the stream's start: the oldest goes first
                    Stream out(conn->socket, self->limits_.idle_timeout);
                    Result<void> done = make_error(Errc::internal, "not run");
                    try {
                        done = co_await it->second(stream_id, std::move(request->params), out);
                    } catch (const std::exception& e) {
                        log()->error("{}: {}", request->method, e.what());
                        done = make_error(Errc::internal,
                                          fmt::format("{}: internal error: {}", request->method, e.what()));
                    }
                    if (!done && conn->socket.is_open()) {
                        auto error_line = error_reply(stream_id, done.error());
                        co_await out.send(error_line);
                    }
                    break;
                }
            }
        }
        json reply;
        if (fds_lost)
            reply = error_reply(stream_id, make_error(Errc::invalid_argument,
                                                      fmt::format("more than {} file descriptors came with the "
                                                                  "request",
                                                                  max_request_fds)));
        else if (!stream_with_fds.empty())
            reply = error_reply(stream_id, make_error(Errc::invalid_argument,
                                                      fmt::format("{} takes no file descriptors ({} came with the "
                                                                  "request)",
                                                                  stream_with_fds, fds.size())));
        else
            reply = co_await self->handle(std::move(line), conn->peer, std::move(fds));
        std::string out = dump_json(reply) + "\n";
        // A client that does not read its reply gets as long as an idle one,
        // and may be evicted meanwhile: it cannot hold a slot forever.
        conn->busy = false;
        self->arm_deadline(conn);
        auto [wec, wn] = co_await asio::async_write(conn->socket, asio::buffer(out), asio::as_tuple(asio::use_awaitable));
        self->disarm_deadline(*conn);
        if (wec || !conn->socket.is_open())
            break;
    }
}

void Server::add_stream(std::string name, StreamMethod method) { streams_[std::move(name)] = std::move(method); }

void Server::add_with_fds(std::string name, FdMethod method) {
    methods_[std::move(name)] = Entry{nullptr, true, std::move(method)};
}

asio::awaitable<bool> Stream::send(const json& value) {
    if (!socket_.is_open())
        co_return false;
    std::string out = dump_json(value) + "\n";
    asio::steady_timer deadline(socket_.get_executor());
    deadline.expires_after(write_timeout_);
    // Shared with the handler: it may already be queued when the write
    // completes, and then runs after this frame is gone.
    struct State {
        bool expired = false;
        bool written = false;
    };
    auto state = std::make_shared<State>();
    deadline.async_wait([state, socket = &socket_](boost::system::error_code ec) {
        if (ec || state->written)
            return;
        state->expired = true;
        boost::system::error_code ignored;
        socket->close(ignored);
    });
    auto [ec, n] = co_await asio::async_write(socket_, asio::buffer(out), asio::as_tuple(asio::use_awaitable));
    state->written = true;
    deadline.cancel();
    co_return !ec && !state->expired && socket_.is_open();
}

asio::awaitable<void> Stream::client_done() {
    std::array<char, 64> ignored{};
    co_await socket_.async_read_some(asio::buffer(ignored), asio::as_tuple(asio::use_awaitable));
}

asio::awaitable<json> Server::handle(std::string line, std::string caller, std::vector<UniqueFd> fds) {
    json id;
    auto request = parse_request(line, id);
    if (!request)
        co_return error_reply(id, request.error());
    auto it = methods_.find(request->method);
    if (it == methods_.end())
        co_return error_reply(id, make_error(Errc::not_found, fmt::format("unknown method \"{}\"", request->method)));
    if (!fds.empty() && !it->second.with_fds)
        co_return error_reply(id, make_error(Errc::invalid_argument,
                                             fmt::format("{} takes no file descriptors ({} came with the request)",
                                                         request->method, fds.size())));
    if (it->second.changes_state)
        log()->info("{} requested by {}", request->method, caller);
    Result<json> result = make_error(Errc::internal, "not run");
    try {
        if (it->second.with_fds)
            result = co_await it->second.with_fds(std::move(request->params), std::move(fds));
        else
            result = co_await it->second.method(std::move(request->params));
    } catch (const std::exception& e) {
        // A bug (parameters are read through Params): the caller still gets
        // an answer and ferryd keeps running.
        log()->error("{}: {}", request->method, e.what());
        result = make_error(Errc::internal, fmt::format("{}: internal error: {}", request->method, e.what()));
    }
    if (!result) {
        log()->debug("{}: {}", request->method, result.error().message);
        co_return error_reply(id, result.error());
    }
    json reply{{"id", id}, {"result", std::move(*result)}};
    co_return reply;
}

} // namespace ferry::control
