#pragma once
// What a listener needs so that a flood costs it neither a log line per
// connection nor a spinning accept loop: a warning let through once per
// interval with the count it stands for, and the accept errors that mean
// "out of descriptors or memory" (wait, do not retry at once).
#include <boost/asio/error.hpp>
#include <boost/system/error_code.hpp>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <optional>

namespace ferry {

// Counts events; lets one through per interval. note() answers, for an event
// let through, how many came since the last one let through (this one
// included) and over how many seconds; for one held back, nothing.
class LogThrottle {
public:
    using Clock = std::chrono::steady_clock;
    struct Report {
        std::uint64_t events = 0;
        std::chrono::seconds over{0};
    };

    explicit LogThrottle(Clock::duration interval = std::chrono::seconds(10)) : interval_(interval) {}

    std::optional<Report> note(Clock::time_point now = Clock::now()) {
        ++pending_;
        if (started_ && now - last_ < interval_)
            return std::nullopt;
        Report r{pending_, started_ ? std::chrono::duration_cast<std::chrono::seconds>(now - last_) : std::chrono::seconds(0)};
        started_ = true;
        last_ = now;
        pending_ = 0;
        return r;
    }

private:
    Clock::duration interval_;
    Clock::time_point last_{};
    bool started_ = false;
    std::uint64_t pending_ = 0;
};

// accept() failed for want of descriptors (EMFILE, ENFILE) or kernel memory:
// retrying at once only spins.
inline bool out_of_descriptors(const boost::system::error_code& ec) {
    return ec == boost::asio::error::no_descriptors || ec.value() == ENFILE ||
           ec == boost::asio::error::no_buffer_space || ec == boost::asio::error::no_memory;
}

} // namespace ferry
