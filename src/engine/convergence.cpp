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
    // QEMU measures the dirty rate once per round (at each dirty sync), from
    // the second sync on; a throttle change makes older rounds stale, so the
    // newest counts most.
    if (s.iteration >= 2 && s.iteration != dirty_iteration_) {
        dirty_ = smooth(dirty_, static_cast<double>(s.dirty_rate_bps), 0.7);
        dirty_iteration_ = s.iteration;
    }
    last_ = s;
}

Prediction ConvergenceModel::predict(std::int64_t downtime_limit_ms) const {
    Prediction p;
    p.transfer_rate_bps = static_cast<std::uint64_t>(transfer_);
    p.dirty_rate_bps = static_cast<std::uint64_t>(dirty_);
    if (transfer_ <= 0)
        return p;
    double remaining = static_cast<double>(last_.remaining);
    p.expected_downtime_ms = static_cast<std::int64_t>(std::ceil(remaining * 1000.0 / transfer_));
    p.known = dirty_iteration_ >= 2;
    bool fits = p.expected_downtime_ms <= downtime_limit_ms;
    if (!p.known) {
        p.time_left_ms = static_cast<std::int64_t>(remaining * 1000.0 / transfer_); // the first round
        return p;
    }
    if (fits) {
        p.converges = true;
    } else if (dirty_ < transfer_) {
        double target = transfer_ * static_cast<double>(std::max<std::int64_t>(downtime_limit_ms, 1)) / 1000.0;
        double rounds = std::log(target / remaining) / std::log(dirty_ / transfer_);
        p.converges = dirty_ <= 0 || rounds <= max_rounds;
    }
    if (fits)
        p.time_left_ms = p.expected_downtime_ms;
    else if (p.converges) // the rounds shrink geometrically: remaining / (T - D) in all
        p.time_left_ms = static_cast<std::int64_t>(remaining * 1000.0 / (transfer_ - dirty_));
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

Decision Strategy::step(std::chrono::milliseconds elapsed, const Prediction& p, std::int64_t iteration,
                        std::uint64_t remaining) {
    Decision d;
    if (postcopy_)
        return d; // the rest is post-copy's: no timeouts, no levers
    bool can_postcopy = cfg_.allow_post_copy && postcopy_possible_;

    // Timeouts (KubeVirt's meanings).
    if (!lowest_ || remaining < *lowest_) {
        lowest_ = remaining;
        lowest_at_ = elapsed;
    }
    double gib = static_cast<double>(data_bytes_) / (1024.0 * mib);
    auto completion_limit = std::chrono::milliseconds(
        static_cast<std::int64_t>(std::ceil(static_cast<double>(cfg_.completion_timeout_per_gib) * 1000.0 * gib)));
    if (cfg_.completion_timeout_per_gib > 0 && elapsed > completion_limit) {
        auto what = fmt::format("completion timeout: not finished after {:.1f} s (limit {} s per GiB x {:.2f} GiB = "
                                "{:.1f} s)",
                                elapsed.count() / 1000.0, cfg_.completion_timeout_per_gib, gib,
                                completion_limit.count() / 1000.0);
        if (can_postcopy) {
            postcopy_ = d.start_postcopy = true;
            d.why = what + "; switching to post-copy";
            return d;
        }
        d.fail = fmt::format("{}; {}; {}", what, rates(p, iteration), help_allowed());
        return d;
    }
    if (cfg_.progress_timeout > 0 && elapsed - lowest_at_ > std::chrono::seconds(cfg_.progress_timeout)) {
        d.fail = fmt::format("progress timeout: remaining {:.1f} MiB did not fall for {:.1f} s (limit {} s); {}; {}",
                             static_cast<double>(*lowest_) / mib, (elapsed - lowest_at_).count() / 1000.0,
                             cfg_.progress_timeout, rates(p, iteration), help_allowed());
        return d;
    }

    // One lever per round: the next round shows what the last change did.
    if (!p.known || p.converges || iteration <= acted_iteration_)
        return d;
    if (downtime_ < cfg_.max_downtime_ms) {
        auto needed = static_cast<std::int64_t>(static_cast<double>(p.expected_downtime_ms) * 1.2);
        downtime_ = std::min(cfg_.max_downtime_ms, std::max(downtime_ * 2, needed));
        acted_iteration_ = iteration;
        d.downtime_limit_ms = downtime_;
        d.why = fmt::format("{}: downtime limit raised to {} ms", rates(p, iteration), downtime_);
        return d;
    }
    if (cfg_.allow_auto_converge && throttle_ < max_throttle && p.dirty_rate_bps > 0) {
        // The dirty rate scales with the CPU time the guest gets: unthrottled
        // it would be D / (1 - t). Aim for half the transfer rate.
        double unthrottled = static_cast<double>(p.dirty_rate_bps) / (1.0 - static_cast<double>(throttle_) / 100.0);
        double target = 0.5 * static_cast<double>(p.transfer_rate_bps);
        auto need = static_cast<std::int64_t>(std::ceil(100.0 * (1.0 - target / unthrottled)));
        auto next = std::max(throttle_ + 10, std::min(need, throttle_ + 40));
        throttle_ = std::min(max_throttle, next);
        acted_iteration_ = iteration;
        d.throttle_percent = throttle_;
        d.why = fmt::format("{}: throttling the vCPUs to {}%", rates(p, iteration), throttle_);
        return d;
    }
    if (can_postcopy) {
        if (stuck_since_ < 0)
            stuck_since_ = iteration;
        if (iteration - stuck_since_ >= 2) {
            postcopy_ = d.start_postcopy = true;
            d.why = fmt::format("{}: pre-copy will not converge; switching to post-copy", rates(p, iteration));
        }
    }
    return d;
}

} // namespace ferry::engine
