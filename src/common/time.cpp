#include "common/time.hpp"

#include <fmt/format.h>

#include <ctime>

namespace ferry {

std::string format_time(SystemClock::time_point t) {
    auto ms_total = unix_ms(t);
    std::time_t secs = static_cast<std::time_t>(ms_total / 1000);
    std::tm tm{};
    gmtime_r(&secs, &tm);
    return fmt::format("{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}.{:03d}Z", tm.tm_year + 1900,
                       tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                       static_cast<int>(ms_total % 1000));
}

std::int64_t unix_ms(SystemClock::time_point t) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

} // namespace ferry
