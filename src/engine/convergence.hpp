#pragma once
// Convergence: what a running pre-copy migration will do, and what ferry does
// about it. Pure (no I/O): the engine feeds QEMU's figures in and applies the
// decisions; the unit tests drive both with made-up numbers.
//
// The model. QEMU sends RAM in rounds; each round re-sends what the guest
// dirtied during the previous one. With transfer rate T and dirty rate D the
// rounds shrink by D/T when D < T (pre-copy converges) and stall near the
// working set otherwise. Switching over now would take remaining / T of
// downtime; QEMU switches by itself once that is under its downtime-limit.
#include "config/node_config.hpp"

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace ferry::engine {

struct Sample {
    std::chrono::milliseconds elapsed{0}; // since the migration started
    std::uint64_t transferred = 0;        // bytes
    std::uint64_t remaining = 0;          // bytes
    std::uint64_t dirty_rate_bps = 0;     // QEMU's dirty-pages-rate x page size
    std::int64_t iteration = 0;           // QEMU's dirty-sync-count
    std::int64_t throttle_percent = 0;    // in force while this was measured
};

struct Prediction {
    std::uint64_t transfer_rate_bps = 0; // smoothed
    std::uint64_t dirty_rate_bps = 0;    // smoothed, at the throttle now in force
    std::uint64_t unthrottled_dirty_rate_bps = 0; // what the guest would dirty unthrottled
    bool known = false;                  // false until the first full round
    std::int64_t measured_pass = -1;     // the dirty sync that measured the dirty rate last
    bool converges = false;              // pre-copy finishes within the downtime limit
    std::int64_t expected_downtime_ms = 0; // if QEMU switched over now
    std::int64_t time_left_ms = -1;        // -1: never, at this rate
};

class ConvergenceModel {
public:
    void observe(const Sample& s);
    Prediction predict(std::int64_t downtime_limit_ms) const;

private:
    std::optional<Sample> prev_;
    Sample last_;
    double transfer_ = 0;    // bytes/s, EWMA
    double unthrottled_ = 0; // bytes/s, EWMA per round of the measured rate / (1 - throttle)
    std::int64_t dirty_iteration_ = -1; // the last sync seen
    std::int64_t measured_pass_ = -1;   // the last sync that brought a new measurement
    std::uint64_t last_raw_ = 0;        // its raw rate
};

// What the engine should change now.
struct Decision {
    std::optional<std::int64_t> downtime_limit_ms;
    std::optional<std::int64_t> throttle_percent;
    bool start_postcopy = false;
    std::optional<std::string> fail; // give up, with the reason
    std::string why;                 // for the log
};

// The engine's strategy for one migration (DESIGN.md, convergence). Called
// about once a second, and at once after each of QEMU's dirty syncs (the
// MIGRATION_PASS event), when a new dirty rate has been measured:
// - once the first pass has measured the dirty rate, it picks the lever that
//   can finish: the downtime limit when raising it (up to max_downtime_ms)
//   makes pre-copy converge; otherwise a vCPU throttle sized from the
//   measured rates (allow_auto_converge); otherwise post-copy
//   (allow_post_copy). One change per dirty sync: the next sync measures it.
// - progress is the dirty set at each sync (the size of each pass), not
//   QEMU's `remaining`, which touches zero at the end of every pass;
// - with post-copy possible, no timeout fails the migration: it switches to
//   post-copy instead.
class Strategy {
public:
    // data_bytes: guest RAM plus local disks, for the completion timeout.
    Strategy(const config::MigrationConfig& cfg, std::uint64_t data_bytes, bool postcopy_possible);

    std::int64_t initial_downtime_ms() const { return downtime_; }
    // s: QEMU's latest figures; now: the model's prediction at the current
    // downtime limit; at_max: at max_downtime_ms.
    Decision step(const Sample& s, const Prediction& now, const Prediction& at_max);
    std::int64_t downtime_ms() const { return downtime_; }
    std::int64_t throttle_percent() const { return throttle_; }
    // Whether post-copy may start now (a block migration's disks must be
    // nearly in sync first); why_not says what it waits for. While not
    // ready, post-copy is held back: the levers wait, a timeout fails.
    void set_postcopy_ready(bool ready, std::string why_not = "") {
        postcopy_ready_ = ready;
        postcopy_why_not_ = std::move(why_not);
    }

    static constexpr std::int64_t max_throttle = 99;

private:
    void track(const Sample& s);
    std::optional<std::string> no_progress(const Sample& s) const;
    std::optional<std::int64_t> throttle_needed(const Prediction& p) const;
    std::string rates(const Prediction& p, std::int64_t iteration) const;
    std::string help_allowed() const;
    Decision to_postcopy(std::string why);

    config::MigrationConfig cfg_;
    std::uint64_t data_bytes_;
    bool postcopy_possible_;
    std::int64_t downtime_;
    std::int64_t throttle_ = 0;
    std::int64_t acted_pass_ = 0; // one change per measurement: the next one shows its effect
    bool postcopy_ = false;
    bool postcopy_ready_ = true;
    std::string postcopy_why_not_;

    // Progress: the dirty set at each sync, and bytes moving at all.
    std::int64_t pass_ = -1;              // QEMU's dirty-sync-count last seen
    std::uint64_t last_pass_bytes_ = 0;   // the dirty set at that sync
    std::optional<std::uint64_t> lowest_pass_bytes_;
    std::int64_t lowest_pass_ = 0;
    int passes_since_lowest_ = 0;
    std::chrono::milliseconds shrinking_until_{0}; // when the first pass no smaller than the lowest began
    std::uint64_t transferred_ = 0;
    std::chrono::milliseconds moved_at_{0};
};

// The disk side of auto-converge, for a block migration: a cap on the
// guest's disk writes while ferry's rounds copy less than the guest writes
// meanwhile. The first cap is sized from the measured rates (half of what a
// round copies per second, below what the guest wrote, so the dirty set
// shrinks); each further round still behind halves it, down to floor_bps.
// A dirty set too large for the downtime (over_budget) counts as behind:
// the last round runs with the guest paused.
// The cap stays until the migration ends (lifting it would undo the
// convergence) and is then restored to what it was.
class DiskThrottle {
public:
    struct Round {
        std::uint64_t copied = 0; // bytes the round sent
        std::uint64_t dirty = 0;  // bytes the guest wrote meanwhile (left for the next round)
        std::chrono::milliseconds took{0};
        bool over_budget = false; // the dirty set would not fit the downtime
    };
    // in_sync_bytes: a dirty set this small is left for the last round.
    explicit DiskThrottle(std::uint64_t in_sync_bytes) : in_sync_(in_sync_bytes) {}

    // Whether a round left the disks further behind than they were.
    bool behind(const Round& r) const { return r.dirty > in_sync_ && r.dirty >= r.copied; }
    // After a round (behind or over budget): the new cap in bytes/s, when it changes.
    std::optional<std::uint64_t> after_round(const Round& r);
    std::uint64_t cap_bps() const { return cap_; }
    bool at_floor() const { return cap_ != 0 && cap_ <= floor_bps; }

    static constexpr std::uint64_t floor_bps = 256 << 10;

private:
    std::uint64_t in_sync_;
    std::uint64_t cap_ = 0; // 0: none
};

} // namespace ferry::engine
