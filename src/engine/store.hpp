#pragma once
// Durable JSON records: written to a temporary file, synced, renamed.
#include "common/error.hpp"

#include <nlohmann/json.hpp>

#include <string>

namespace ferry::engine {

Result<void> write_json_file(const std::string& path, const nlohmann::json& value);
Result<nlohmann::json> read_json_file(const std::string& path);

// Whether `dir` can be a node's state_dir, before anything is written there:
// missing (ferryd creates it, mode 0700), empty, or one a ferryd used
// before (ferryd.lock or vms/ in it); a directory of ferryd's user that no
// one else may write. Refused: `/`, anything that is not a directory, and
// a directory holding other files (a typo such as /var/lib), which ferry
// would otherwise fill and whose mode it never changes.
Result<void> check_state_dir(const std::string& dir);

} // namespace ferry::engine
