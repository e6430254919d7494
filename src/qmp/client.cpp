#include "qmp/client.hpp"

#include "common/json.hpp"
#include "common/log.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include <sys/socket.h>

#include <cstring>

namespace ferry::qmp {

namespace {
constexpr auto use_nothrow = asio::as_tuple(asio::use_awaitable);
std::shared_ptr<spdlog::logger> log() {
    static auto l = ferry::logger("qmp");
    return l;
}
constexpr std::size_t max_line = 16 << 20; // a QMP reply larger than this is a broken peer
} // namespace

Client::Client(asio::any_io_executor ex, std::string path)
    : ex_(ex), socket_(ex), buffer_(max_line), path_(std::move(path)) {}

Client::~Client() {
    boost::system::error_code ec;
    socket_.close(ec);
}

asio::awaitable<Result<std::shared_ptr<Client>>>
Client::connect(asio::any_io_executor ex, std::string path, std::chrono::milliseconds timeout) {
    auto client = std::make_shared<Client>(ex, path);
    auto [ec] = co_await client->socket_.async_connect(asio::local::stream_protocol::endpoint(path),
                                                       use_nothrow);
    if (ec)
        co_return make_error(Errc::io, fmt::format("connecting to QMP socket {}: {}", path, ec.message()));

    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(client->socket_.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0)
        client->peer_pid_ = cred.pid;

    auto hs = co_await client->handshake(timeout);
    if (!hs)
        co_return hs.error().wrap(fmt::format("QMP handshake on {}", path));
    client->connected_ = true;
    asio::co_spawn(ex, read_loop(client), asio::detached);
    co_return client;
}

asio::awaitable<Result<std::shared_ptr<Client>>>
Client::connect_retry(asio::any_io_executor ex, std::string path, std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    asio::steady_timer timer(ex);
    Error last{Errc::timeout, "no attempt"};
    while (std::chrono::steady_clock::now() < deadline) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        auto r = co_await connect(ex, path, std::max(left, std::chrono::milliseconds(100)));
        if (r)
            co_return r;
        last = r.error();
        // A handshake that started and failed is final: the peer is there but broken.
        if (last.code != Errc::io)
            co_return last;
        timer.expires_after(50ms);
        co_await timer.async_wait(use_nothrow);
    }
    co_return make_error(Errc::timeout, fmt::format("QMP socket {} not ready within {} ms ({})",
                                                    path, timeout.count(), last.message));
}

asio::awaitable<Result<Message>> Client::read_message(std::chrono::milliseconds timeout) {
    asio::steady_timer timer(ex_);
    timer.expires_after(timeout);
    bool expired = false;
    timer.async_wait([&](boost::system::error_code ec) {
        if (!ec) {
            expired = true;
            boost::system::error_code ignored;
            socket_.cancel(ignored);
        }
    });
    auto [ec, n] = co_await asio::async_read_until(socket_, buffer_, '\n', use_nothrow);
    timer.cancel();
    if (expired)
        co_return make_error(Errc::timeout, fmt::format("no message from QEMU within {} ms", timeout.count()));
    if (ec)
        co_return make_error(Errc::disconnected, fmt::format("reading: {}", ec.message()));
    std::string line(asio::buffers_begin(buffer_.data()), asio::buffers_begin(buffer_.data()) + n);
    buffer_.consume(n);
    co_return decode_message(line);
}

asio::awaitable<Result<void>> Client::handshake(std::chrono::milliseconds timeout) {
    auto greeting = co_await read_message(timeout);
    if (!greeting)
        co_return greeting.error();
    if (greeting->kind != Message::Kind::greeting)
        co_return make_error(Errc::protocol, "expected a QMP greeting first");
    greeting_ = greeting->greeting;
    std::string cmd = R"({"execute":"qmp_capabilities","id":0})" "\n";
    auto [ec, n] = co_await asio::async_write(socket_, asio::buffer(cmd), use_nothrow);
    if (ec)
        co_return make_error(Errc::disconnected, fmt::format("writing: {}", ec.message()));
    // Events cannot come before capabilities are negotiated; the next
    // message is the reply.
    auto reply = co_await read_message(timeout);
    if (!reply)
        co_return reply.error();
    if (reply->error)
        co_return qemu_error("qmp_capabilities", *reply->error);
    if (!reply->result)
        co_return make_error(Errc::protocol, "unexpected reply to qmp_capabilities");
    co_return Result<void>{};
}

asio::awaitable<Result<json>> Client::execute(std::string command, json arguments,
                                              std::chrono::milliseconds timeout) {
    return send_command(std::move(command), std::move(arguments), -1, timeout);
}

asio::awaitable<Result<json>> Client::execute_with_fd(std::string command, json arguments, int fd,
                                                      std::chrono::milliseconds timeout) {
    return send_command(std::move(command), std::move(arguments), fd, timeout);
}

asio::awaitable<Result<json>> Client::send_command(std::string command, json arguments, int fd,
                                                   std::chrono::milliseconds timeout) {
    if (!connected_)
        co_return make_error(Errc::disconnected, fmt::format("{}: QMP connection to {} is closed",
                                                             command, path_));
    auto self = shared_from_this(); // keep alive while waiting
    auto id = next_id_++;
    json message{{"execute", command}, {"id", id}};
    if (!arguments.is_null() && !arguments.empty())
        message["arguments"] = std::move(arguments);
    auto pending = std::make_shared<Pending>(ex_);
    pending->timer.expires_after(timeout);
    pending_[id] = pending;
    pending_names_[id] = command;
    log()->debug("-> {}", dump_json(message));
    outgoing_.push_back(Outgoing{dump_json(message) + "\n", fd});
    if (!writing_) {
        writing_ = true;
        asio::co_spawn(ex_, write_loop(self), asio::detached);
    }
    co_await pending->timer.async_wait(use_nothrow);
    pending_.erase(id);
    pending_names_.erase(id);
    if (pending->result)
        co_return std::move(*pending->result);
    co_return make_error(Errc::timeout, fmt::format("{}: no reply from QEMU ({}) within {} ms",
                                                    command, path_, timeout.count()));
}

Result<void> Client::send_with_fd(const Outgoing& out, std::size_t& sent) {
    iovec iov{const_cast<char*>(out.data.data()), out.data.size()};
    char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), &out.fd, sizeof(int));
    ssize_t n;
    do {
        n = ::sendmsg(socket_.native_handle(), &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return make_error(Errc::io, fmt::format("sendmsg with fd: {}", std::strerror(errno)));
    sent = static_cast<std::size_t>(n);
    return {};
}

asio::awaitable<void> Client::write_loop(std::shared_ptr<Client> self) {
    while (!self->outgoing_.empty() && self->connected_) {
        Outgoing out = std::move(self->outgoing_.front());
        self->outgoing_.pop_front();
        std::size_t sent = 0;
        if (out.fd >= 0) {
            auto [wec] = co_await self->socket_.async_wait(asio::socket_base::wait_write, use_nothrow);
            Result<void> r = wec ? Result<void>(make_error(Errc::io, wec.message()))
                                 : self->send_with_fd(out, sent);
            if (!r) {
                self->fail_all(r.error().wrap("QMP write"));
                break;
            }
        }
        if (sent < out.data.size()) {
            auto [ec, n] = co_await asio::async_write(
                self->socket_, asio::buffer(out.data.data() + sent, out.data.size() - sent), use_nothrow);
            if (ec) {
                self->fail_all(make_error(Errc::disconnected, fmt::format("QMP write to {}: {}",
                                                                          self->path_, ec.message())));
                break;
            }
        }
    }
    self->writing_ = false;
}

asio::awaitable<void> Client::read_loop(std::shared_ptr<Client> self) {
    while (self->connected_) {
        auto [ec, n] = co_await asio::async_read_until(self->socket_, self->buffer_, '\n', use_nothrow);
        if (ec) {
            std::string why = ec == asio::error::eof ? "QEMU closed the connection"
                              : ec == asio::error::not_found ? "message too large"
                                                             : ec.message();
            self->fail_all(make_error(Errc::disconnected,
                                      fmt::format("QMP connection to {} lost: {}", self->path_, why)));
            break;
        }
        std::string line(asio::buffers_begin(self->buffer_.data()),
                         asio::buffers_begin(self->buffer_.data()) + n);
        self->buffer_.consume(n);
        auto message = decode_message(line);
        if (!message) {
            self->fail_all(make_error(Errc::protocol, fmt::format("{} ({}): {}", message.error().message, self->path_,
                                                                  line.substr(0, 200))));
            break;
        }
        log()->debug("<- {}", line.substr(0, line.size() - 1));
        self->dispatch(std::move(*message));
    }
}

void Client::dispatch(Message message) {
    if (message.kind == Message::Kind::event) {
        auto& ev = message.event;
        // Copy: a handler may unsubscribe.
        auto subscribers = subscribers_;
        for (auto& [id, handler] : subscribers)
            handler(ev);
        for (auto& w : event_waiters_) {
            if (!w->event && !w->failed && w->pred(ev)) {
                w->event = ev;
                w->timer.cancel();
            }
        }
        return;
    }
    if (message.kind != Message::Kind::reply) {
        log()->warn("QMP message without a usable id from {}", path_);
        return;
    }
    auto it = pending_.find(message.id);
    if (it == pending_.end()) {
        log()->debug("late or unknown QMP reply id {} from {}", message.id, path_);
        return;
    }
    auto& name = pending_names_[message.id];
    if (message.result)
        it->second->result = ok(std::move(*message.result));
    else
        it->second->result = Result<json>(qemu_error(name, *message.error));
    it->second->timer.cancel();
}

void Client::fail_all(const Error& e) {
    if (!connected_)
        return;
    connected_ = false;
    log()->debug("{}", e.message);
    boost::system::error_code ignored;
    socket_.close(ignored);
    for (auto& [id, p] : pending_) {
        p->result = Result<json>(make_error(e.code, fmt::format("{}: {}", pending_names_[id], e.message)));
        p->timer.cancel();
    }
    for (auto& w : event_waiters_) {
        w->failed = true;
        w->timer.cancel();
    }
    auto handlers = std::move(close_handlers_);
    for (auto& h : handlers)
        h(e);
}

void Client::close() {
    fail_all(make_error(Errc::disconnected, fmt::format("QMP connection to {} closed by ferry", path_)));
}

asio::awaitable<Result<Event>> Client::wait_event(std::function<bool(const Event&)> pred,
                                                  std::chrono::milliseconds timeout) {
    if (!connected_)
        co_return make_error(Errc::disconnected, fmt::format("QMP connection to {} is closed", path_));
    auto self = shared_from_this();
    auto waiter = std::make_shared<EventWaiter>(ex_);
    waiter->pred = std::move(pred);
    waiter->timer.expires_after(timeout);
    event_waiters_.push_back(waiter);
    co_await waiter->timer.async_wait(use_nothrow);
    std::erase(event_waiters_, waiter);
    if (waiter->event)
        co_return std::move(*waiter->event);
    if (waiter->failed)
        co_return make_error(Errc::disconnected, fmt::format("QMP connection to {} lost while waiting for an event", path_));
    co_return make_error(Errc::timeout, fmt::format("no matching event from {} within {} ms", path_, timeout.count()));
}

std::size_t Client::subscribe(EventHandler handler) {
    auto id = next_subscriber_++;
    subscribers_[id] = std::move(handler);
    return id;
}

void Client::unsubscribe(std::size_t id) { subscribers_.erase(id); }

} // namespace ferry::qmp
