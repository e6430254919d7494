#include "transport/shaper.hpp"

#include <algorithm>

namespace ferry::transport {

namespace {
// Burst: 50 ms worth, at least 256 KiB so large writes are not chopped.
double burst_for(std::uint64_t rate) { return std::max(rate * 0.05, 256.0 * 1024); }
} // namespace

void TokenBucket::set_rate(std::uint64_t rate_bps, ShaperClock::time_point now) {
    std::lock_guard lock(mutex_);
    refill(now);
    rate_ = rate_bps;
    burst_ = burst_for(rate_bps);
    tokens_ = std::min(tokens_, burst_);
    last_ = now;
}

void TokenBucket::refill(ShaperClock::time_point now) {
    if (rate_ == 0 || last_ == ShaperClock::time_point{}) {
        last_ = now;
        return;
    }
    double dt = std::chrono::duration<double>(now - last_).count();
    if (dt > 0) {
        tokens_ = std::min(burst_, tokens_ + dt * static_cast<double>(rate_));
        last_ = now;
    }
}

std::chrono::nanoseconds TokenBucket::take(std::size_t n, ShaperClock::time_point now) {
    std::lock_guard lock(mutex_);
    if (rate_ == 0)
        return std::chrono::nanoseconds(0);
    refill(now);
    tokens_ -= static_cast<double>(n);
    if (tokens_ >= 0)
        return std::chrono::nanoseconds(0);
    return std::chrono::nanoseconds(static_cast<std::int64_t>(-tokens_ / static_cast<double>(rate_) * 1e9));
}

std::shared_ptr<TokenBucket> NodeShaper::add(const std::string& migration, std::uint64_t own_limit_bps) {
    auto bucket = std::make_shared<TokenBucket>(own_limit_bps);
    active_[migration] = Entry{own_limit_bps, bucket};
    rebalance();
    return bucket;
}

void NodeShaper::remove(const std::string& migration) {
    active_.erase(migration);
    rebalance();
}

void NodeShaper::set_cap(std::uint64_t cap_bps) {
    cap_ = cap_bps;
    rebalance();
}

std::uint64_t NodeShaper::rate_of(const std::string& migration) const {
    auto it = active_.find(migration);
    return it == active_.end() ? 0 : it->second.bucket->rate();
}

void NodeShaper::rebalance() {
    auto now = ShaperClock::now();
    if (active_.empty())
        return;
    // Max-min fairness: migrations limited below the fair share keep their
    // limit; the rest split what is left equally.
    std::uint64_t left = cap_;
    std::size_t open = active_.size();
    std::map<std::string, std::uint64_t> rate;
    bool changed = true;
    while (cap_ != 0 && changed && open > 0) {
        changed = false;
        std::uint64_t share = left / open;
        for (auto& [id, e] : active_) {
            if (rate.count(id))
                continue;
            if (e.own_limit != 0 && e.own_limit <= share) {
                rate[id] = e.own_limit;
                left -= e.own_limit;
                --open;
                changed = true;
            }
        }
    }
    for (auto& [id, e] : active_) {
        std::uint64_t r;
        if (cap_ == 0)
            r = e.own_limit;
        else if (rate.count(id))
            r = rate[id];
        else
            r = open ? left / open : 0;
        e.bucket->set_rate(r, now);
    }
}

} // namespace ferry::transport
