#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace ferry {

using Clock = std::chrono::steady_clock;
using SystemClock = std::chrono::system_clock;

// "2026-11-23T05:12:55.123Z"
std::string format_time(SystemClock::time_point t);
inline std::string now_string() { return format_time(SystemClock::now()); }

// Milliseconds since the Unix epoch.
std::int64_t unix_ms(SystemClock::time_point t = SystemClock::now());

} // namespace ferry
