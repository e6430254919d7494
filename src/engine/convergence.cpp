#include "engine/convergence.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace ferry::engine {

namespace {
constexpr double mib = 1024.0 * 1024.0;
// Each round is D/T the size of the one before. Needing more rounds than
// this to get under the downtime limit counts as not converging: the rounds
// would shrink too slowly to finish in any useful time.
constexpr double max_rounds = 6;

double smooth(double old, double sample, double weight) { return old == 0 ? sample : old + weight * (sample - old); }
} // namespace

void ConvergenceModel::observe(const Sample& s) {
    if (!prev_) {
        prev_ = s;
    } else if (auto dt = s.elapsed - prev_->elapsed; dt >= std::chrono::milliseconds(200)) {
        if (s.transferred >= prev_->transferred) {
            double rate = static_cast<double>(s.transferred - prev_->transferred) * 1000.0 / static_cast<double>(dt.count());
            transfer_ = smooth(transfer_, rate, 0.5);
        }
        prev_ = s;
    }
    // QEMU measures the dirty rate at a dirty sync, from the second on, and
    // only when a second has passed since it last did: a sync sooner repeats
    // the old figure, which is no new measurement. The guest dirties in
    // proportion to the CPU time it gets, so each measurement is scaled back
    // to what the guest would dirty unthrottled (the engine changes the
    // throttle right after a measurement, so the window of the next one runs
    // under one throttle); the newest counts most.
    if (s.iteration >= 2 && s.iteration != dirty_iteration_) {
        dirty_iteration_ = s.iteration;
        if (measured_pass_ < 0 || s.dirty_rate_bps != last_raw_) {
            double kept = 1.0 - static_cast<double>(std::clamp<std::int64_t>(s.throttle_percent, 0, 99)) / 100.0;
            unthrottled_ = smooth(unthrottled_, static_cast<double>(s.dirty_rate_bps) / kept, 0.7);
            last_raw_ = s.dirty_rate_bps;
            measured_pass_ = s.iteration;
        }
    }
    last_ = s;
}

Prediction ConvergenceModel::predict(std::int64_t downtime_limit_ms) const {
    Prediction p;
    double kept = 1.0 - static_cast<double>(std::clamp<std::int64_t>(last_.throttle_percent, 0, 99)) / 100.0;
    double dirty = unthrottled_ * kept;
    p.transfer_rate_bps = static_cast<std::uint64_t>(transfer_);
    p.dirty_rate_bps = static_cast<std::uint64_t>(dirty);
    p.unthrottled_dirty_rate_bps = static_cast<std::uint64_t>(unthrottled_);
    p.measured_pass = measured_pass_;
    if (transfer_ <= 0)
        return p;
    double remaining = static_cast<double>(last_.remaining);
    p.expected_downtime_ms = static_cast<std::int64_t>(std::ceil(remaining * 1000.0 / transfer_));
    p.known = measured_pass_ >= 2;
    bool fits = p.expected_downtime_ms <= downtime_limit_ms;
    if (!p.known) {
        p.time_left_ms = static_cast<std::int64_t>(remaining * 1000.0 / transfer_); // the first round
        return p;
    }
    if (fits) {
        p.converges = true;
    } else if (dirty < transfer_) {
        double target = transfer_ * static_cast<double>(std::max<std::int64_t>(downtime_limit_ms, 1)) / 1000.0;
        double rounds = std::log(target / remaining) / std::log(dirty / transfer_);
        p.converges = dirty <= 0 || rounds <= max_rounds;
    }
    if (fits)
        p.time_left_ms = p.expected_downtime_ms;
    else if (p.converges) // the rounds shrink geometrically: remaining / (T - D) in all
        p.time_left_ms = static_cast<std::int64_t>(remaining * 1000.0 / (transfer_ - dirty));
    return p;
}

Strategy::Strategy(const config::MigrationConfig& cfg, std::uint64_t data_bytes, bool postcopy_possible)
    : cfg_(cfg), data_bytes_(data_bytes), postcopy_possible_(postcopy_possible),
      // A low start: most guests converge well under the maximum, and a
      // shorter pause is better for them.
      downtime_(std::max<std::int64_t>(1, std::min<std::int64_t>(cfg.max_downtime_ms, std::max<std::int64_t>(cfg.max_downtime_ms / 4, 30)))) {}

std::string Strategy::rates(const Prediction& p, std::int64_t iteration) const {
    auto dirty = static_cast<double>(p.dirty_rate_bps) / mib;
    auto transfer = static_cast<double>(p.transfer_rate_bps) / mib;
    // A dirty rate measured per round cannot exceed what the round sent
    // (the working set is re-sent whole), so "close to" is the usual sight
    // of a guest that outruns the link.
    auto relation = dirty > transfer ? ">" : dirty > 0.8 * transfer ? "close to" : "<";
    return fmt::format("dirty rate {:.1f} MiB/s {} transfer rate {:.1f} MiB/s after {} iterations (switching over "
                       "would take {} ms, limit {} ms)",
                       dirty, relation, transfer, iteration, p.expected_downtime_ms, downtime_);
}

std::string Strategy::help_allowed() const {
    std::string ac = !cfg_.allow_auto_converge ? "auto-converge not allowed"
                                               : fmt::format("auto-converge at {}% was not enough", throttle_);
    std::string pc = !cfg_.allow_post_copy ? "post-copy not allowed"
                     : postcopy_possible_  ? "post-copy allowed"
                                           : "post-copy not possible with multifd";
    if (!cfg_.allow_auto_converge && !cfg_.allow_post_copy)
        return "auto-converge and post-copy not allowed";
    return ac + "; " + pc;
}

void Strategy::track(const Sample& s) {
    if (s.transferred > transferred_ || pass_ < 0) {
        transferred_ = s.transferred;
        moved_at_ = s.elapsed;
    }
    // The first figures after a dirty sync (the engine polls at once on
    // MIGRATION_PASS) give the size of the pass that sync began. (Before the
    // first sync QEMU reports no RAM figures at all.)
    if (s.iteration < 1 || s.iteration == pass_)
        return;
    pass_ = s.iteration;
    last_pass_bytes_ = s.remaining;
    // A new low must be clearly lower: a dirty set that only wobbles is not
    // progress, a shrinking one shows within a round or two.
    if (!lowest_pass_bytes_ || static_cast<double>(s.remaining) < 0.9 * static_cast<double>(*lowest_pass_bytes_)) {
        lowest_pass_bytes_ = s.remaining;
        lowest_pass_ = s.iteration;
        passes_since_lowest_ = 0;
    } else if (++passes_since_lowest_ == 1) {
        // The clock starts with the first pass that is no smaller: however
        // long the passes before it took, they were progress.
        shrinking_until_ = s.elapsed;
    }
}

std::optional<std::string> Strategy::no_progress(const Sample& s) const {
    if (cfg_.progress_timeout <= 0)
        return std::nullopt;
    auto limit = std::chrono::seconds(cfg_.progress_timeout);
    if (passes_since_lowest_ > 0 && s.elapsed - shrinking_until_ > limit)
        return fmt::format("progress timeout: the dirty set did not shrink for {:.1f} s (limit {} s): the smallest "
                           "pass was {:.1f} MiB (pass {}), {} since, the last {:.1f} MiB",
                           (s.elapsed - shrinking_until_).count() / 1000.0, cfg_.progress_timeout,
                           static_cast<double>(*lowest_pass_bytes_) / mib, lowest_pass_, passes_since_lowest_,
                           static_cast<double>(last_pass_bytes_) / mib);
    return std::nullopt;
}

// The throttle that brings the dirty rate under half the transfer rate, or
// nullopt when even the maximum cannot.
std::optional<std::int64_t> Strategy::throttle_needed(const Prediction& p) const {
    double unthrottled = static_cast<double>(p.unthrottled_dirty_rate_bps);
    // A dirty rate measured per pass cannot exceed what the pass re-sent:
    // near the transfer rate it is a floor, the guest may dirty far more.
    // (QEMU measures over the whole pass, the zero pages of a first pass
    // included, so a saturated measure can read well under the transfer
    // rate: 60%, not 100%.)
    // Assume twice as much, so that two steps reach any rate the throttle
    // can tame, instead of creeping up one pass at a time.
    if (static_cast<double>(p.dirty_rate_bps) >= 0.6 * static_cast<double>(p.transfer_rate_bps))
        unthrottled *= 2;
    double target = 0.5 * static_cast<double>(p.transfer_rate_bps);
    if (unthrottled <= target)
        return throttle_ + 10; // measured under the aim, yet not converging: a nudge
    auto need = static_cast<std::int64_t>(std::ceil(100.0 * (1.0 - target / unthrottled)));
    if (need > max_throttle)
        return std::nullopt;
    return std::max(need, throttle_ + 10);
}

Decision Strategy::to_postcopy(std::string why) {
    Decision d;
    postcopy_ = d.start_postcopy = true;
    d.why = std::move(why);
    return d;
}

Decision Strategy::step(const Sample& s, const Prediction& p, const Prediction& at_max) {
    Decision d;
    if (postcopy_)
        return d; // the rest is post-copy's: no timeouts, no levers
    track(s);
    bool can_postcopy = cfg_.allow_post_copy && postcopy_possible_;

    // Timeouts (KubeVirt's meanings), which post-copy pre-empts.
    double gib = static_cast<double>(data_bytes_) / (1024.0 * mib);
    auto completion_limit = std::chrono::milliseconds(
        static_cast<std::int64_t>(std::ceil(static_cast<double>(cfg_.completion_timeout_per_gib) * 1000.0 * gib)));
    // A stream that does not move fails, post-copy or not.
    auto still = s.elapsed - moved_at_;
    if (cfg_.progress_timeout > 0 && still > std::chrono::seconds(cfg_.progress_timeout)) {
        d.fail = fmt::format("progress timeout: nothing sent for {:.1f} s (limit {} s); {}; {}",
                             still.count() / 1000.0, cfg_.progress_timeout, rates(p, s.iteration), help_allowed());
        return d;
    }
    std::optional<std::string> timeout;
    if (cfg_.completion_timeout_per_gib > 0 && s.elapsed > completion_limit)
        timeout = fmt::format("completion timeout: not finished after {:.1f} s (limit {} s per GiB x {:.2f} GiB = "
                              "{:.1f} s)",
                              s.elapsed.count() / 1000.0, cfg_.completion_timeout_per_gib, gib,
                              completion_limit.count() / 1000.0);
    else
        timeout = no_progress(s);
    if (timeout) {
        // Post-copy needs a stream that moves: on a stalled one it would
        // strand the VM between two nodes, unable to abort.
        if (can_postcopy && postcopy_ready_ && still < std::chrono::seconds(5))
            return to_postcopy(*timeout + "; switching to post-copy");
        std::string why = *timeout;
        if (can_postcopy && !postcopy_ready_)
            why += "; not switching to post-copy: " + postcopy_why_not_;
        else if (can_postcopy)
            why += fmt::format("; not switching to post-copy: nothing sent for {:.1f} s", still.count() / 1000.0);
        d.fail = fmt::format("{}; {}; {}", why, rates(p, s.iteration), help_allowed());
        return d;
    }

    // The levers, once the first pass has measured the dirty rate, one
    // change per measurement.
    if (!p.known || p.converges || p.measured_pass <= acted_pass_)
        return d;
    // Post-copy is the lever and it is not ready: wait for it, acting at
    // the next measurement.
    if (can_postcopy && !postcopy_ready_ && downtime_ == cfg_.max_downtime_ms &&
        (!cfg_.allow_auto_converge || throttle_ >= max_throttle))
        return d;
    acted_pass_ = p.measured_pass;
    if (downtime_ < cfg_.max_downtime_ms && at_max.converges) {
        auto needed = static_cast<std::int64_t>(static_cast<double>(p.expected_downtime_ms) * 1.2);
        downtime_ = std::min(cfg_.max_downtime_ms, std::max(downtime_ * 2, needed));
        d.downtime_limit_ms = downtime_;
        d.why = fmt::format("{}: downtime limit raised to {} ms", rates(p, s.iteration), downtime_);
        return d;
    }
    // The downtime limit alone cannot finish. What the user allows for it
    // shortens the end, whichever lever comes next.
    std::string also;
    if (downtime_ < cfg_.max_downtime_ms) {
        downtime_ = cfg_.max_downtime_ms;
        d.downtime_limit_ms = downtime_;
        also = fmt::format(", downtime limit raised to {} ms", downtime_);
    }
    bool can_throttle = cfg_.allow_auto_converge && throttle_ < max_throttle;
    auto throttle = can_throttle ? throttle_needed(p) : std::nullopt;
    if (can_throttle && (throttle || !can_postcopy)) {
        throttle_ = std::min(max_throttle, throttle.value_or(max_throttle));
        d.throttle_percent = throttle_;
        d.why = fmt::format("{}: throttling the vCPUs to {}%{}", rates(p, s.iteration), throttle_, also);
        return d;
    }
    if (can_postcopy && !postcopy_ready_) {
        d.why = fmt::format("{}: pre-copy will not converge{}; post-copy waits: {}", rates(p, s.iteration), also,
                            postcopy_why_not_);
        return d;
    }
    if (can_postcopy) {
        auto why = fmt::format("{}: pre-copy will not converge{}; switching to post-copy", rates(p, s.iteration),
                               can_throttle ? " (a throttle over 99% would be needed)" : "");
        auto pc = to_postcopy(why);
        pc.downtime_limit_ms = d.downtime_limit_ms;
        return pc;
    }
    if (d.downtime_limit_ms)
        d.why = fmt::format("{}: downtime limit raised to {} ms; pre-copy will not converge, no other lever allowed",
                            rates(p, s.iteration), downtime_);
    return d;
}

std::optional<std::uint64_t> DiskThrottle::after_round(const Round& r) {
    if (!(behind(r) || (r.over_budget && r.dirty > 0)) || at_floor())
        return std::nullopt;
    std::uint64_t next;
    if (cap_ == 0) {
        auto ms = static_cast<std::uint64_t>(std::max<std::int64_t>(r.took.count(), 1));
        auto copy_rate = r.copied * 1000 / ms;
        auto write_rate = r.dirty * 1000 / ms;
        // A round of zero records alone measured no copy rate.
        next = (copy_rate != 0 ? std::min(copy_rate, write_rate) : write_rate) / 2;
    } else {
        next = cap_ / 2;
    }
    cap_ = std::max(next, floor_bps);
    return cap_;
}

} // namespace ferry::engine
