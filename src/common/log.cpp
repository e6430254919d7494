#include "common/log.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <mutex>

namespace ferry {

namespace {
std::mutex mutex;
spdlog::level::level_enum current_level = spdlog::level::info;
} // namespace

std::shared_ptr<spdlog::logger> logger(const std::string& name) {
    std::lock_guard lock(mutex);
    if (auto existing = spdlog::get(name))
        return existing;
    auto created = spdlog::stderr_color_mt(name);
    created->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%n] %v");
    created->set_level(current_level);
    return created;
}

bool set_log_level(const std::string& level) {
    auto parsed = spdlog::level::from_str(level);
    if (parsed == spdlog::level::off && level != "off")
        return false;
    std::lock_guard lock(mutex);
    current_level = parsed;
    spdlog::set_level(parsed);
    return true;
}

} // namespace ferry
