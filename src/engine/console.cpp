#include "engine/console.hpp"

#include "common/log.hpp"
#include "common/time.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>

#include <fcntl.h>
#include <fstream>
#include <sys/stat.h>
#include <unistd.h>

namespace ferry::engine {

namespace asio = boost::asio;

namespace {
constexpr std::size_t max_heartbeats = 4096;
constexpr auto connect_window = std::chrono::seconds(30);
} // namespace

ConsoleCapture::ConsoleCapture(asio::any_io_executor ex, std::string socket_path,
                               std::string log_path, std::string tag)
    : socket_(ex), socket_path_(std::move(socket_path)), log_path_(std::move(log_path)),
      tag_(std::move(tag)) {}

void ConsoleCapture::start() {
    // The guest's console may print secrets: only ferryd's user reads it
    // (also for a log an older ferryd created world-readable).
    int fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd >= 0) {
        ::fchmod(fd, 0600);
        ::close(fd);
    }
    asio::co_spawn(socket_.get_executor(), run(shared_from_this()), asio::detached);
}

void ConsoleCapture::stop() {
    stopped_ = true;
    boost::system::error_code ignored;
    socket_.close(ignored);
}

void ConsoleCapture::record(const std::string& line) {
    auto now = SystemClock::now();
    if (auto hb = parse_heartbeat(line, unix_ms(now))) {
        heartbeats_.push_back(*hb);
        if (heartbeats_.size() > max_heartbeats)
            heartbeats_.pop_front();
    }
    std::ofstream out(log_path_, std::ios::app);
    out << format_time(now) << " [" << tag_ << "] " << line << '\n';
}

asio::awaitable<void> ConsoleCapture::run(std::shared_ptr<ConsoleCapture> self) {
    constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);
    auto deadline = std::chrono::steady_clock::now() + connect_window;
    asio::steady_timer timer(self->socket_.get_executor());
    for (;;) {
        if (self->stopped_)
            co_return;
        auto [ec] = co_await self->socket_.async_connect(
            asio::local::stream_protocol::endpoint(self->socket_path_), nothrow);
        if (!ec) {
            self->connected_ = true;
            break;
        }
        boost::system::error_code ignored;
        self->socket_.close(ignored);
        if (std::chrono::steady_clock::now() > deadline) {
            logger("engine")->warn("console {}: cannot connect: {}", self->socket_path_, ec.message());
            co_return;
        }
        timer.expires_after(std::chrono::milliseconds(50));
        co_await timer.async_wait(nothrow);
    }
    asio::streambuf buf(1 << 20);
    for (;;) {
        auto [ec, n] = co_await asio::async_read_until(self->socket_, buf, '\n', nothrow);
        if (ec) {
            if (buf.size() > 0 && !self->stopped_)
                self->record(std::string(asio::buffers_begin(buf.data()), asio::buffers_end(buf.data())));
            co_return;
        }
        std::string line(asio::buffers_begin(buf.data()), asio::buffers_begin(buf.data()) + n - 1);
        buf.consume(n);
        if (!line.empty() && line.back() == '\r')
            line.pop_back();
        self->record(line);
    }
}

} // namespace ferry::engine
