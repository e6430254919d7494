#include "control/client.hpp"

#include "common/json.hpp"

#include <boost/asio/read_until.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include <cstring>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

namespace ferry::control {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

Errc errc_from_string(std::string_view name) {
    for (int i = 0; i <= static_cast<int>(Errc::internal); ++i)
        if (to_string(static_cast<Errc>(i)) == name)
            return static_cast<Errc>(i);
    return Errc::internal;
}

template <class Done> bool Client::run_until(Done done, Clock::time_point deadline) {
    io_.restart();
    while (!done()) {
        auto now = Clock::now();
        if (now >= deadline)
            return false;
        io_.run_one_for(deadline - now);
    }
    return true;
}

Result<std::unique_ptr<Client>> Client::connect(const std::string& path, std::chrono::milliseconds timeout) {
    if (path.empty() || path.size() >= sizeof(sockaddr_un::sun_path))
        return make_error(Errc::invalid_argument,
                          fmt::format("socket path '{}' is {} bytes; a Unix socket path holds 1 to {}", path,
                                      path.size(), sizeof(sockaddr_un::sun_path) - 1));
    std::unique_ptr<Client> c(new Client());
    c->path_ = path;
    boost::system::error_code ec = asio::error::would_block;
    c->socket_.async_connect(asio::local::stream_protocol::endpoint(path),
                             [&](boost::system::error_code e) { ec = e; });
    if (!c->run_until([&] { return ec != asio::error::would_block; }, Clock::now() + timeout))
        return make_error(Errc::timeout, fmt::format("ferryd at {} did not accept the connection within {} s", path,
                                                     std::chrono::duration_cast<std::chrono::seconds>(timeout).count()));
    if (ec == asio::error::access_denied)
        return make_error(Errc::io, fmt::format("cannot use ferryd's socket {}: {} (its control_socket_mode "
                                                "decides who may)",
                                                path, ec.message()));
    if (ec)
        return make_error(Errc::disconnected, fmt::format("cannot reach ferryd at {}: {} (is ferryd running? "
                                                          "--socket or FERRY_SOCKET picks another socket)",
                                                          path, ec.message()));
    return c;
}

Result<nlohmann::json> Client::call(const std::string& method, nlohmann::json params,
                                    std::chrono::milliseconds timeout) {
    return exchange(method, std::move(params), {}, timeout);
}

Result<nlohmann::json> Client::call_with_fds(const std::string& method, nlohmann::json params,
                                             const std::vector<int>& fds, std::chrono::milliseconds timeout) {
    return exchange(method, std::move(params), fds, timeout);
}

namespace {

// The request's first byte carries the descriptors; the rest follows as
// usual. Blocking, bounded by the deadline.
boost::system::error_code send_with_fds(int sock, const std::string& out, const std::vector<int>& fds,
                                        Clock::time_point deadline) {
    std::size_t sent = 0;
    while (sent < out.size()) {
        pollfd p{sock, POLLOUT, 0};
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) == 0)
            return asio::error::timed_out;
        iovec iov{const_cast<char*>(out.data() + sent), sent == 0 ? 1 : out.size() - sent};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        std::vector<char> control;
        if (sent == 0) {
            control.resize(CMSG_SPACE(sizeof(int) * fds.size()));
            msg.msg_control = control.data();
            msg.msg_controllen = control.size();
            auto* c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
            std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
        }
        auto n = ::sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n < 0)
            return boost::system::error_code(errno, boost::system::system_category());
        sent += static_cast<std::size_t>(n);
    }
    return {};
}

} // namespace

Result<nlohmann::json> Client::exchange(const std::string& method, nlohmann::json params, const std::vector<int>& fds,
                                        std::chrono::milliseconds timeout) {
    auto deadline = Clock::now() + timeout;
    answered_ = false;
    auto id = next_id_++;
    nlohmann::json request{{"id", id}, {"method", method}, {"params", std::move(params)}};
    std::string out = dump_json(request) + "\n";
    boost::system::error_code wec = asio::error::would_block, rec = asio::error::would_block;
    std::size_t n = 0;
    if (fds.empty())
        asio::async_write(socket_, asio::buffer(out), [&](boost::system::error_code e, std::size_t) { wec = e; });
    else if ((wec = send_with_fds(socket_.native_handle(), out, fds, deadline)))
        return make_error(Errc::disconnected, fmt::format("sending {} to ferryd at {}: {}", method, path_, wec.message()));
    asio::async_read_until(socket_, buf_, '\n', [&](boost::system::error_code e, std::size_t k) {
        rec = e;
        n = k;
    });
    bool done = run_until([&] { return rec != asio::error::would_block; }, deadline);
    if (done && wec == asio::error::would_block) {
        // ferryd answered before taking the whole request (a refusal): the
        // connection is out of step, and the write's handler must run
        // before its buffer goes away.
        boost::system::error_code ignored;
        socket_.close(ignored);
        run_until([&] { return wec != asio::error::would_block; }, Clock::now() + std::chrono::seconds(1));
    }
    if (!done) {
        boost::system::error_code ignored;
        socket_.close(ignored); // the reply would be out of step now
        run_until([&] { return rec != asio::error::would_block && wec != asio::error::would_block; },
                  Clock::now() + std::chrono::seconds(1));
        return make_error(Errc::timeout,
                          fmt::format("ferryd at {} did not answer {} within {} s (is it stuck? its log may say why)",
                                      path_, method, std::chrono::duration_cast<std::chrono::seconds>(timeout).count()));
    }
    if (rec)
        return make_error(Errc::disconnected, fmt::format("waiting for ferryd at {}: {}", path_,
                                                          rec == asio::error::eof ? "it closed the connection"
                                                                                  : rec.message()));
    std::string line(asio::buffers_begin(buf_.data()), asio::buffers_begin(buf_.data()) + n);
    buf_.consume(n);
    // ferryd's replies wrap QEMU's, which may nest deeply (backing chains).
    auto reply = parse_json(line, JsonLimits{1024});
    if (!reply || !reply->is_object())
        return make_error(Errc::protocol, fmt::format("ferryd at {} sent a malformed reply", path_));
    answered_ = true;
    if (auto err = reply->find("error"); err != reply->end() && err->is_object()) {
        auto code = err->find("code");
        auto message = err->find("message");
        return make_error(code != err->end() && code->is_string() ? errc_from_string(code->get<std::string>())
                                                                   : Errc::internal,
                          message != err->end() && message->is_string() ? message->get<std::string>()
                                                                         : std::string("unknown error"));
    }
    return ok(reply->value("result", nlohmann::json(nullptr)));
}

Result<nlohmann::json> Client::next(std::chrono::milliseconds timeout) {
    boost::system::error_code rec = asio::error::would_block;
    std::size_t n = 0;
    asio::async_read_until(socket_, buf_, '\n', [&](boost::system::error_code e, std::size_t k) {
        rec = e;
        n = k;
    });
    if (!run_until([&] { return rec != asio::error::would_block; }, Clock::now() + timeout)) {
        boost::system::error_code ignored;
        socket_.close(ignored); // a half-read line would be out of step
        run_until([&] { return rec != asio::error::would_block; }, Clock::now() + std::chrono::seconds(1));
        return make_error(Errc::timeout, fmt::format("nothing from ferryd at {} within {} ms", path_, timeout.count()));
    }
    if (rec)
        return make_error(Errc::disconnected, fmt::format("ferryd at {}: {}", path_,
                                                          rec == asio::error::eof ? "it closed the stream"
                                                                                  : rec.message()));
    std::string line(asio::buffers_begin(buf_.data()), asio::buffers_begin(buf_.data()) + n);
    buf_.consume(n);
    auto value = parse_json(line, JsonLimits{1024});
    if (!value || !value->is_object())
        return make_error(Errc::protocol, fmt::format("ferryd at {} sent a malformed line", path_));
    if (auto err = value->find("error"); err != value->end() && err->is_object())
        return make_error(errc_from_string(err->value("code", "internal")), err->value("message", "unknown error"));
    return ok(std::move(*value));
}

} // namespace ferry::control
