#pragma once
// Captures a guest's serial console. QEMU writes it to a file of the run
// directory itself (console.out), so nothing ferryd does, or fails to do
// (stopped, crashed, slow, restarting), can make the guest wait on its
// serial port. ferry follows that file: every line goes to the VM's
// console log with a timestamp and the QEMU generation it came from (lines
// cut at a maximum length; the log rotated at a maximum size, keeping one
// older file), heartbeat lines are kept for blackout measurement, and what
// was read is punched out of console.out so it takes no disk space.
#include "engine/heartbeat.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::engine {

struct ConsoleLimits {
    std::uint64_t log_max = 16 << 20; // console.log rotates to console.log.1 past this
    std::size_t line_max = 4096;      // longer lines are cut into pieces of this many bytes
};

class ConsoleCapture : public std::enable_shared_from_this<ConsoleCapture> {
public:
    ConsoleCapture(boost::asio::any_io_executor ex, std::string output_path, std::string log_path, std::string tag,
                   ConsoleLimits limits = {});
    ~ConsoleCapture();
    void start();
    void stop();
    std::vector<Heartbeat> heartbeat_list() const { return {heartbeats_.begin(), heartbeats_.end()}; }

private:
    static boost::asio::awaitable<void> run(std::shared_ptr<ConsoleCapture> self);
    // Reads what QEMU wrote since the last call (at most `budget` bytes);
    // how many bytes it read.
    std::size_t drain(std::size_t budget);
    void write_log(const std::string& text);
    void close_fds();

    boost::asio::posix::stream_descriptor notify_; // inotify on the output file
    boost::asio::steady_timer timer_;
    std::string output_path_;
    std::string log_path_;
    std::string tag_;
    ConsoleLimits limits_;
    LineSplitter lines_;
    int out_fd_ = -1;
    std::uint64_t offset_ = 0;   // read up to here
    std::uint64_t punched_ = 0;  // freed up to here
    int log_fd_ = -1;
    bool stopped_ = false;
    std::deque<Heartbeat> heartbeats_;
};

} // namespace ferry::engine
