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
#include <vector>

namespace ferry::engine {

using json = nlohmann::json;

// Switchover: from the moment the guest pauses for the switchover (or, in
// post-copy, starts on the target) until the hand-off ends.
enum class Phase { Pending, Scheduling, Scheduled, PreparingTarget, TargetReady, Running, Switchover, Succeeded, Failed };

std::string_view to_string(Phase p);
std::optional<Phase> phase_from_string(std::string_view s);
inline bool is_final(Phase p) { return p == Phase::Succeeded || p == Phase::Failed; }

// A block migration's disks, together (ferry's own figures).
struct DiskProgress {
    std::uint64_t total_bytes = 0;     // virtual size of the mirrored disks
    std::uint64_t sent_bytes = 0;      // copied so far, data and zero records
    std::uint64_t remaining_bytes = 0; // written by the guest and not copied yet
    std::uint64_t dirty_rate_bps = 0;  // how fast the guest writes them
    std::uint32_t rounds = 0;          // rounds acknowledged by the target
    std::uint32_t round = 0;           // the round under way (0: none)
    std::uint64_t round_bytes = 0;     // what it copies (the first: every allocated block)
    std::uint64_t round_sent_bytes = 0; // of that, sent so far
    std::uint64_t write_cap_bps = 0;   // ferry's cap on the guest's disk writes (0: none)
};

struct Progress {
    std::uint64_t total_bytes = 0;
    std::uint64_t transferred_bytes = 0;
    std::uint64_t remaining_bytes = 0;
    std::uint64_t transfer_rate_bps = 0; // bytes per second
    std::uint64_t dirty_rate_bps = 0;    // bytes per second
    std::int64_t iteration = 0;          // dirty-sync rounds
    std::int64_t throttle_percent = 0;
    std::int64_t expected_downtime_ms = 0; // ferry's model: if switched over now
    std::int64_t downtime_limit_ms = 0;    // QEMU's downtime-limit, set by ferry's strategy
    std::optional<bool> converging;        // the model's verdict (unset until the first full round)
    std::int64_t time_left_ms = -1;        // the model's estimate; -1 = never at these rates
    std::string qemu_status; // QEMU's migration status ("active", ...)
    // How long the target node has not answered a keepalive that waits for
    // its answer (0 while it answers): shown before peer_timeout gives up.
    std::int64_t peer_silent_ms = 0;
    std::optional<DiskProgress> disks; // block migrations
};

struct DiskResult {
    std::uint32_t index = 0; // in the VM spec's disks
    std::string path;        // on the source
    std::uint64_t data_bytes = 0; // sent as data
    std::uint64_t zero_bytes = 0; // skipped as zeros or holes
};

struct MigrationResult {
    std::optional<std::int64_t> total_time_ms;
    std::optional<std::int64_t> downtime_ms;
    std::optional<std::int64_t> guest_blackout_ms;
    std::vector<DiskResult> disks; // block migrations
};

struct Migration {
    std::string id;
    std::string vm;
    std::string source_node;
    std::string target_node;
    Phase phase = Phase::Pending;
    std::string mode = "precopy"; // precopy | postcopy
    std::string method = "live";  // live | block
    // Post-copy asked of QEMU (mode "postcopy") is not yet post-copy under
    // way: until the source lets QEMU continue past pre-switchover the
    // guest has not left, and a failure (or a restart) resumes it there.
    bool postcopy_continued = false;
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
    // Target side of a block migration: the images this node created, which
    // a failed arrival (or a restart after one) removes.
    std::vector<std::string> created_images;
    // Source side of a block migration: the I/O limits ferry's disk throttle
    // replaced, [{device, limits}], which ending the migration (or a restart
    // after a crash) puts back.
    json saved_io_limits = json::array();
    // What went wrong after the switchover and was not rolled back: hooks
    // that failed once the VM ran on the target.
    std::vector<std::string> warnings;
};

void to_json(json& j, const Migration& m);
void from_json(const json& j, Migration& m);

// The migration capabilities ferry sets on both QEMUs: events, the pause
// before switchover the engine answers, multifd and post-copy when asked for.
json migration_capabilities(bool multifd, bool postcopy = false, bool preempt = false);
// QEMU 7.2 cannot combine post-copy with multifd.
inline bool postcopy_enabled(const config::MigrationConfig& c) { return c.allow_post_copy && c.multifd_channels == 0; }
// Post-copy's preempt channel: the source QEMU opens a second connection at
// the start of the migration (after the main one) for the pages the running
// guest waits for, so they do not queue behind the bulk stream.
inline bool preempt_enabled(const config::MigrationConfig& c) { return postcopy_enabled(c) && c.postcopy_preempt; }
// The connections the source QEMU opens: the main one, multifd's, preempt's.
// The data channel a block migration's disk stream takes (its token's index).
constexpr int disk_channel_index = 1000;

inline int migration_channels(const config::MigrationConfig& c) {
    return 1 + static_cast<int>(c.multifd_channels) + (preempt_enabled(c) ? 1 : 0);
}

// Reads query-migrate's answer into progress (rates in bytes per second).
Progress progress_from_query_migrate(const json& info);

} // namespace ferry::engine
