#include "control/client.hpp"

#include "common/json.hpp"

#include <boost/asio/read_until.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

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
    auto deadline = Clock::now() + timeout;
    auto id = next_id_++;
    nlohmann::json request{{"id", id}, {"method", method}, {"params", std::move(params)}};
    std::string out = dump_json(request) + "\n";
    boost::system::error_code wec = asio::error::would_block, rec = asio::error::would_block;
    std::size_t n = 0;
    asio::async_write(socket_, asio::buffer(out), [&](boost::system::error_code e, std::size_t) { wec = e; });
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

} // namespace ferry::control
