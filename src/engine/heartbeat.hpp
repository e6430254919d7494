#pragma once
// A guest's console output as lines, and guest heartbeats: a guest that prints "FERRY-HB <seq> <interval_ms> ..." on
// its serial console every interval of its own time lets ferry measure the
// blackout the guest saw during a switchover (pure; unit-tested).
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ferry::engine {

struct Heartbeat {
    std::int64_t host_ms = 0; // when ferry read the line (Unix ms)
    std::uint64_t seq = 0;
    std::uint32_t interval_ms = 0;
};

// Splits console output into lines: whole ones as they end, a line that
// has grown to `line_max` without ending in pieces of that size. Pure.
class LineSplitter {
public:
    explicit LineSplitter(std::size_t line_max) : line_max_(line_max) {}
    // The lines `data` completes ("\r\n" and "\n" end a line).
    std::vector<std::string> feed(std::string_view data);
    // What is left without a newline (at the end of the output).
    std::string rest() { return std::exchange(partial_, {}); }

private:
    std::size_t line_max_;
    std::string partial_;
};

std::optional<Heartbeat> parse_heartbeat(std::string_view line, std::int64_t host_ms);

// The blackout across a switchover: from the last heartbeat the source
// printed to the first the destination printed, less the guest time between
// them (interval x sequence distance). Empty without heartbeats on both sides.
std::optional<std::int64_t> guest_blackout_ms(const std::vector<Heartbeat>& source,
                                              const std::vector<Heartbeat>& destination);

} // namespace ferry::engine
