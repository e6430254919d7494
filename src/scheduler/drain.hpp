#pragma once
// A node drain as it is stored and reported: the intent (which node, how
// many at once, until when) and each VM's fate. Pure: the planner drives
// it, this says what a VM's next step is and how the record reads and
// writes (<state_dir>/scheduler.json, so a drain survives a restart).
#include "common/error.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ferry::scheduler {

using nlohmann::json;

enum class VmDrainState {
    waiting,     // not started yet (or waiting for its retry)
    migrating,   // a migration of it runs
    moved,       // it runs on another node now
    cannot_move, // nothing can move it (reported by the pre-flight)
    gave_up,     // failed max_attempts times
    not_moved,   // the drain was cancelled or its deadline passed first
    gone,        // deleted from the node while the drain ran
};
std::string_view to_string(VmDrainState s);

struct VmDrain {
    std::string name;
    VmDrainState state = VmDrainState::waiting;
    int attempts = 0;
    std::string migration; // the current or last migration's id
    std::string target;    // its target
    std::string error;     // the last failure, or why it cannot move
    std::string reason;    // why it waits now (not stored)
    std::int64_t retry_at_ms = 0; // Unix ms before which it is not retried
};

enum class DrainState { running, completed, incomplete, cancelled };
std::string_view to_string(DrainState s);

struct Drain {
    static constexpr int max_attempts = 5;

    std::string node;
    std::string started_at;
    std::string ended_at;
    DrainState state = DrainState::running;
    std::int64_t max_parallel = 0;            // 0: only the node and cluster limits
    std::optional<std::int64_t> deadline_ms;  // Unix ms after which nothing new starts
    std::string note;                         // why it ended as it did
    std::vector<VmDrain> vms;

    VmDrain* find(const std::string& vm);
    std::int64_t count(VmDrainState s) const;
    // A failed attempt: waits 10 s, 20 s, 40 s ... (5 min at most) before the
    // next, or gives up after max_attempts.
    void failed(VmDrain& vm, std::string error, std::int64_t now_ms);
    // Stops what has not started (cancel, or the deadline): waiting VMs
    // become not_moved with `why`.
    void stop_waiting(const std::string& why);
    // Ends the drain once nothing waits or migrates: completed when every VM
    // moved, else incomplete. Returns whether it ended now.
    bool settle(const std::string& now);
    bool active() const { return state == DrainState::running; }
};

struct DrainOptions {
    std::int64_t max_parallel = 0; // 0: only the limits
    std::optional<std::int64_t> deadline_s;
};
// {"max_parallel": 0..1000, "deadline_s": 1..366 days}, both optional; from
// a control request or a peer's message. An error names the key.
Result<DrainOptions> drain_options(const json& j);

json to_json(const Drain& d);
// An error names the field that is missing or wrong (the file may be damaged).
Result<Drain> drain_from_json(const json& j);

} // namespace ferry::scheduler
