#pragma once
// Durable JSON records: written to a temporary file, synced, renamed.
#include "common/error.hpp"

#include <nlohmann/json.hpp>

#include <string>

namespace ferry::engine {

Result<void> write_json_file(const std::string& path, const nlohmann::json& value);
Result<nlohmann::json> read_json_file(const std::string& path);

} // namespace ferry::engine
