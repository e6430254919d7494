#include "control/server.hpp"

#include "common/log.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include <filesystem>
#include <sys/stat.h>

namespace ferry::control {

namespace asio = boost::asio;
using stream = asio::local::stream_protocol;

namespace {
constexpr std::size_t max_request = 4 << 20;
auto log() {
    static auto l = logger("control");
    return l;
}
} // namespace

json error_reply(const json& id, const Error& e) {
    return {{"id", id}, {"error", {{"code", to_string(e.code)}, {"message", e.message}}}};
}

Server::Server(asio::any_io_executor ex, std::string path, unsigned mode)
    : ex_(ex), path_(std::move(path)), mode_(mode), acceptor_(ex) {}

Server::~Server() { stop(); }

Result<void> Server::start() {
    namespace fs = std::filesystem;
    std::error_code ec;
    auto dir = fs::path(path_).parent_path();
    if (!dir.empty())
        fs::create_directories(dir, ec);
    if (fs::exists(path_)) {
        // A live ferryd answers on it; a stale socket file is replaced.
        stream::socket probe(ex_);
        boost::system::error_code pec;
        probe.connect(stream::endpoint(path_), pec);
        if (!pec)
            return make_error(Errc::already_exists,
                              fmt::format("control socket {} is in use by another ferryd", path_));
        fs::remove(path_, ec);
    }
    boost::system::error_code bec;
    acceptor_.open(stream(), bec);
    if (!bec)
        acceptor_.bind(stream::endpoint(path_), bec);
    if (!bec)
        acceptor_.listen(asio::socket_base::max_listen_connections, bec);
    if (bec)
        return make_error(Errc::io, fmt::format("control socket {}: {}", path_, bec.message()));
    ::chmod(path_.c_str(), mode_);
    asio::co_spawn(ex_, accept_loop(this), asio::detached);
    log()->info("control socket {} (mode {:o})", path_, mode_);
    return {};
}

void Server::stop() {
    if (!acceptor_.is_open())
        return;
    boost::system::error_code ec;
    acceptor_.close(ec);
    std::error_code fec;
    std::filesystem::remove(path_, fec);
}

asio::awaitable<void> Server::accept_loop(Server* self) {
    for (;;) {
        auto [ec, socket] = co_await self->acceptor_.async_accept(asio::as_tuple(asio::use_awaitable));
        if (ec) {
            if (ec == asio::error::operation_aborted || !self->acceptor_.is_open())
                co_return;
            log()->warn("accept: {}", ec.message());
            continue;
        }
        asio::co_spawn(self->ex_, serve(self, std::move(socket)), asio::detached);
    }
}

asio::awaitable<void> Server::serve(Server* self, stream::socket socket) {
    asio::streambuf buf(max_request);
    for (;;) {
        auto [ec, n] = co_await asio::async_read_until(socket, buf, '\n', asio::as_tuple(asio::use_awaitable));
        if (ec) {
            if (ec == asio::error::not_found) {
                auto reply = error_reply(nullptr, make_error(Errc::invalid_argument, "request larger than 4 MiB"));
                std::string out = reply.dump() + "\n";
                co_await asio::async_write(socket, asio::buffer(out), asio::as_tuple(asio::use_awaitable));
            }
            co_return;
        }
        std::string line(asio::buffers_begin(buf.data()), asio::buffers_begin(buf.data()) + n);
        buf.consume(n);
        auto reply = co_await self->handle(line);
        std::string out = reply.dump() + "\n";
        auto [wec, wn] = co_await asio::async_write(socket, asio::buffer(out), asio::as_tuple(asio::use_awaitable));
        if (wec)
            co_return;
    }
}

asio::awaitable<json> Server::handle(const std::string& line) {
    auto request = json::parse(line, nullptr, false);
    if (request.is_discarded() || !request.is_object())
        co_return error_reply(nullptr, make_error(Errc::invalid_argument, "request is not a JSON object"));
    json id = request.value("id", json(nullptr));
    auto method_it = request.find("method");
    if (method_it == request.end() || !method_it->is_string())
        co_return error_reply(id, make_error(Errc::invalid_argument, "request has no \"method\" string"));
    std::string name = *method_it;
    auto it = methods_.find(name);
    if (it == methods_.end())
        co_return error_reply(id, make_error(Errc::not_found, fmt::format("unknown method \"{}\"", name)));
    json params = request.value("params", json::object());
    if (!params.is_object())
        co_return error_reply(id, make_error(Errc::invalid_argument, "\"params\" must be an object"));
    Result<json> result = make_error(Errc::internal, "not run");
    try {
        result = co_await it->second(std::move(params));
    } catch (const json::exception& e) {
        result = make_error(Errc::invalid_argument, fmt::format("{}: bad parameters: {}", name, e.what()));
    }
    if (!result) {
        log()->debug("{}: {}", name, result.error().message);
        co_return error_reply(id, result.error());
    }
    json reply{{"id", id}, {"result", std::move(*result)}};
    co_return reply;
}

} // namespace ferry::control
