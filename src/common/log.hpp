#pragma once
// One named spdlog logger per layer; levels are set at run time.
#include <spdlog/spdlog.h>

#include <memory>
#include <string>

namespace ferry {

// Returns the named logger, creating it (stderr, shared format) on first use.
std::shared_ptr<spdlog::logger> logger(const std::string& name);

// Sets the level of every logger, present and future. Accepts spdlog level
// names ("trace", "debug", "info", "warn", "error", "critical", "off").
bool set_log_level(const std::string& level);

} // namespace ferry
