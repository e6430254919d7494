#pragma once
// The migration object (DESIGN.md data model) and the pure policies that
// read QEMU's progress and decide on timeouts.
#include "common/time.hpp"
#include "config/node_config.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace ferry::engine {

using json = nlohmann::json;

enum class Phase { Pending, Scheduling, Scheduled, PreparingTarget, TargetReady, Running, Succeeded, Failed };

std::string_view to_string(Phase p);
std::optional<Phase> phase_from_string(std::string_view s);
inline bool is_final(Phase p) { return p == Phase::Succeeded || p == Phase::Failed; }

struct Progress {
    std::uint64_t total_bytes = 0;
    std::uint64_t transferred_bytes = 0;
    std::uint64_t remaining_bytes = 0;
    std::uint64_t transfer_rate_bps = 0; // bytes per second
    std::uint64_t dirty_rate_bps = 0;    // bytes per second
    std::int64_t iteration = 0;          // dirty-sync rounds
    std::int64_t throttle_percent = 0;
    std::int64_t expected_downtime_ms = 0;
    std::string qemu_status; // QEMU's migration status ("active", ...)
};

struct MigrationResult {
    std::optional<std::int64_t> total_time_ms;
    std::optional<std::int64_t> downtime_ms;
    std::optional<std::int64_t> guest_blackout_ms;
};

struct Migration {
    std::string id;
    std::string vm;
    std::string source_node;
    std::string target_node;
    Phase phase = Phase::Pending;
    std::string mode = "precopy"; // precopy | postcopy
    std::string method = "live";  // live | block
    std::optional<std::string> policy;
    config::MigrationConfig config;
    std::string created_at;
    std::optional<std::string> started_at;
    std::optional<std::string> ended_at;
    bool abort_requested = false;
    std::optional<std::string> abort_status; // Pending | Succeeded | Failed
    std::optional<std::string> failure_reason;
    Progress progress;
    MigrationResult result;
    // Where the destination QEMU lives while the migration runs, so a
    // restarted ferryd can clean it up.
    int target_pid = -1;
    std::string target_dir;
};

void to_json(json& j, const Migration& m);
void from_json(const json& j, Migration& m);

// The migration capabilities ferry sets on both QEMUs: events, the pause
// before switchover the engine answers, and multifd when asked for.
json migration_capabilities(bool multifd);

// Reads query-migrate's answer into progress (rates in bytes per second).
Progress progress_from_query_migrate(const json& info);

// Decides when a running migration has run out of time (KubeVirt meanings):
// no new low in remaining bytes for progress_timeout, or longer than
// completion_timeout_per_gib x data GiB in all. Zero disables a limit.
class TimeoutWatch {
public:
    TimeoutWatch(std::int64_t progress_timeout_s, std::int64_t completion_timeout_per_gib,
                 std::uint64_t data_bytes);
    // A failure reason when a limit is passed, naming the numbers.
    std::optional<std::string> observe(std::chrono::milliseconds elapsed, std::uint64_t remaining_bytes);
    std::chrono::milliseconds completion_limit() const { return completion_limit_; }

private:
    std::chrono::milliseconds progress_limit_;
    std::chrono::milliseconds completion_limit_;
    std::int64_t per_gib_;
    std::uint64_t data_bytes_;
    std::optional<std::uint64_t> lowest_;
    std::chrono::milliseconds lowest_at_{0};
};

} // namespace ferry::engine
