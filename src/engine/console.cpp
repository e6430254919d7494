#include "engine/console.hpp"

#include "common/log.hpp"
#include "common/time.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

namespace ferry::engine {

namespace asio = boost::asio;

namespace {
constexpr std::size_t max_heartbeats = 4096;
constexpr auto open_window = std::chrono::seconds(30);
constexpr std::size_t drain_budget = 1 << 20; // per turn of the event loop
constexpr std::uint64_t punch_every = 1 << 20;
constexpr std::size_t flush_at = 16 << 10;
} // namespace

ConsoleCapture::ConsoleCapture(asio::any_io_executor ex, std::string output_path, std::string log_path,
                               std::string tag, ConsoleLimits limits)
    : notify_(ex), timer_(ex), output_path_(std::move(output_path)), log_path_(std::move(log_path)),
      tag_(std::move(tag)), limits_(limits), lines_(limits.line_max) {}

ConsoleCapture::~ConsoleCapture() { close_fds(); }

void ConsoleCapture::close_fds() {
    boost::system::error_code ignored;
    notify_.close(ignored);
    for (int* fd : {&out_fd_, &log_fd_}) {
        if (*fd >= 0)
            ::close(*fd);
        *fd = -1;
    }
}

void ConsoleCapture::start() { asio::co_spawn(timer_.get_executor(), run(shared_from_this()), asio::detached); }

void ConsoleCapture::stop() {
    if (stopped_)
        return;
    stopped_ = true;
    // QEMU is gone or going: what it wrote last, and a last unended line.
    if (out_fd_ >= 0) {
        while (drain(drain_budget) == drain_budget) {
        }
        if (auto rest = lines_.rest(); !rest.empty())
            write_log(fmt::format("{} [{}] {}\n", format_time(SystemClock::now()), tag_, rest));
    }
    timer_.cancel();
    close_fds();
}

std::size_t ConsoleCapture::drain(std::size_t budget) {
    auto now = SystemClock::now();
    auto stamp = format_time(now);
    std::string text;
    std::size_t total = 0;
    char buf[64 << 10];
    while (total < budget) {
        auto n = ::pread(out_fd_, buf, std::min(sizeof buf, budget - total), static_cast<off_t>(offset_));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        offset_ += static_cast<std::uint64_t>(n);
        total += static_cast<std::size_t>(n);
        for (auto& line : lines_.feed({buf, static_cast<std::size_t>(n)})) {
            if (auto hb = parse_heartbeat(line, unix_ms(now))) {
                heartbeats_.push_back(*hb);
                if (heartbeats_.size() > max_heartbeats)
                    heartbeats_.pop_front();
            }
            text += fmt::format("{} [{}] {}\n", stamp, tag_, line);
            if (text.size() >= flush_at) // small batches: the log never passes its cap
                write_log(std::exchange(text, {}));
        }
    }
    if (total == 0) {
        // Someone truncated it: start over from its new end.
        struct stat st {};
        if (::fstat(out_fd_, &st) == 0 && static_cast<std::uint64_t>(st.st_size) < offset_)
            offset_ = punched_ = static_cast<std::uint64_t>(st.st_size);
    }
    if (!text.empty())
        write_log(text);
    // What was read takes no space on disk any more; the file keeps its size
    // (QEMU appends at its end), so no byte QEMU writes meanwhile is lost.
    auto upto = offset_ & ~std::uint64_t{4095};
    if (upto >= punched_ + punch_every &&
        ::fallocate(out_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(punched_),
                    static_cast<off_t>(upto - punched_)) == 0)
        punched_ = upto;
    return total;
}

void ConsoleCapture::write_log(const std::string& text) {
    // Another capture of the same VM (the other QEMU of a migration on this
    // node) may have rotated the log: follow it to the new file.
    struct stat ours {}, named {};
    if (log_fd_ >= 0 && (::fstat(log_fd_, &ours) != 0 || ::stat(log_path_.c_str(), &named) != 0 ||
                         ours.st_ino != named.st_ino || ours.st_dev != named.st_dev)) {
        ::close(log_fd_);
        log_fd_ = -1;
    }
    for (int attempt = 0; attempt < 2; ++attempt) {
        if (log_fd_ < 0) {
            // The guest's console may print secrets: only ferryd's user reads it.
            log_fd_ = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
            if (log_fd_ < 0)
                return;
            ::fchmod(log_fd_, 0600);
        }
        if (::fstat(log_fd_, &ours) != 0 || ours.st_size == 0 ||
            static_cast<std::uint64_t>(ours.st_size) + text.size() <= limits_.log_max)
            break;
        // Full: it becomes console.log.1 (the one before goes), a new one starts.
        ::rename(log_path_.c_str(), (log_path_ + ".1").c_str());
        ::close(log_fd_);
        log_fd_ = -1;
    }
    if (log_fd_ < 0)
        return;
    std::string_view left = text;
    while (!left.empty()) {
        auto n = ::write(log_fd_, left.data(), left.size());
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        left.remove_prefix(static_cast<std::size_t>(n));
    }
}

asio::awaitable<void> ConsoleCapture::run(std::shared_ptr<ConsoleCapture> self) {
    constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);
    auto deadline = std::chrono::steady_clock::now() + open_window;
    // QEMU creates the file as it starts.
    for (;;) {
        if (self->stopped_)
            co_return;
        self->out_fd_ = ::open(self->output_path_.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
        if (self->out_fd_ >= 0)
            break;
        if (std::chrono::steady_clock::now() > deadline) {
            logger("engine")->warn("console {}: QEMU did not create it within {} s; the guest's console is not "
                                   "captured",
                                   self->output_path_, open_window.count());
            co_return;
        }
        self->timer_.expires_after(std::chrono::milliseconds(20));
        co_await self->timer_.async_wait(nothrow);
    }
    // Woken by every write QEMU makes; a timer where inotify is not to be had.
    int ifd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (ifd >= 0 && ::inotify_add_watch(ifd, self->output_path_.c_str(), IN_MODIFY | IN_DELETE_SELF) >= 0)
        self->notify_.assign(ifd);
    else if (ifd >= 0)
        ::close(ifd);
    for (;;) {
        if (self->stopped_)
            co_return;
        if (self->drain(drain_budget) == drain_budget) {
            // More is there: read on after what else waits on the event loop.
            co_await asio::post(self->timer_.get_executor(), asio::use_awaitable);
            continue;
        }
        if (!self->notify_.is_open()) {
            self->timer_.expires_after(std::chrono::milliseconds(50));
            co_await self->timer_.async_wait(nothrow);
            continue;
        }
        auto [ec] = co_await self->notify_.async_wait(asio::posix::descriptor_base::wait_read, nothrow);
        if (ec || self->stopped_)
            co_return;
        alignas(inotify_event) char events[4096];
        auto n = ::read(self->notify_.native_handle(), events, sizeof events);
        for (std::size_t at = 0; n > 0 && at < static_cast<std::size_t>(n);) {
            auto* e = reinterpret_cast<inotify_event*>(events + at);
            if (e->mask & (IN_DELETE_SELF | IN_IGNORED)) { // the run directory is gone
                self->drain(drain_budget);
                co_return;
            }
            at += sizeof(inotify_event) + e->len;
        }
    }
}

} // namespace ferry::engine
