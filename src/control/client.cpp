#include "control/client.hpp"

#include <boost/asio/read_until.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include <sys/socket.h>

namespace ferry::control {

namespace asio = boost::asio;

Result<std::unique_ptr<Client>> Client::connect(const std::string& path) {
    std::unique_ptr<Client> c(new Client());
    c->path_ = path;
    boost::system::error_code ec;
    c->socket_.connect(asio::local::stream_protocol::endpoint(path), ec);
    if (ec)
        return make_error(Errc::io, fmt::format("cannot reach ferryd at {}: {} (is ferryd running? "
                                                "--socket or FERRY_SOCKET picks another socket)",
                                                path, ec.message()));
    return c;
}

Result<nlohmann::json> Client::call(const std::string& method, nlohmann::json params,
                                    std::chrono::seconds timeout) {
    timeval tv{static_cast<time_t>(timeout.count()), 0};
    ::setsockopt(socket_.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    auto id = next_id_++;
    nlohmann::json request{{"id", id}, {"method", method}, {"params", std::move(params)}};
    std::string out = request.dump() + "\n";
    boost::system::error_code ec;
    asio::write(socket_, asio::buffer(out), ec);
    if (ec)
        return make_error(Errc::disconnected, fmt::format("sending to ferryd at {}: {}", path_, ec.message()));
    auto n = asio::read_until(socket_, buf_, '\n', ec);
    if (ec)
        return make_error(ec == asio::error::would_block || ec == asio::error::try_again ? Errc::timeout
                                                                                           : Errc::disconnected,
                          fmt::format("waiting for ferryd at {}: {}", path_, ec.message()));
    std::string line(asio::buffers_begin(buf_.data()), asio::buffers_begin(buf_.data()) + n);
    buf_.consume(n);
    auto reply = nlohmann::json::parse(line, nullptr, false);
    if (reply.is_discarded() || !reply.is_object())
        return make_error(Errc::protocol, "ferryd sent a malformed reply");
    if (auto err = reply.find("error"); err != reply.end()) {
        auto code_name = err->value("code", "internal");
        Errc code = Errc::internal;
        for (int i = 0; i <= static_cast<int>(Errc::internal); ++i)
            if (to_string(static_cast<Errc>(i)) == code_name)
                code = static_cast<Errc>(i);
        return make_error(code, err->value("message", "unknown error"));
    }
    return ok(reply.value("result", nlohmann::json(nullptr)));
}

} // namespace ferry::control
