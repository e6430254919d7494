#pragma once
// Bandwidth shaping of migration traffic (pure; unit-tested).
//
// Each migration has a token bucket. Its rate is the smaller of its own limit
// (bandwidth_per_migration) and its fair share of the node cap
// (max_migration_bandwidth / active migrations), recomputed whenever a
// migration starts or ends.
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <memory>
#include <string>

namespace ferry::transport {

using ShaperClock = std::chrono::steady_clock;

// Thread-safe: the data plane takes, the control plane re-rates.
class TokenBucket {
public:
    // Starts full: the first burst goes out at once.
    explicit TokenBucket(std::uint64_t rate_bps = 0) {
        set_rate(rate_bps, ShaperClock::now());
        tokens_ = burst_;
    }
    // 0 = unlimited.
    void set_rate(std::uint64_t rate_bps, ShaperClock::time_point now);
    std::uint64_t rate() const {
        std::lock_guard lock(mutex_);
        return rate_;
    }
    // Takes n bytes; returns how long the caller must wait before sending
    // them (zero when within the budget).
    std::chrono::nanoseconds take(std::size_t n, ShaperClock::time_point now);

private:
    void refill(ShaperClock::time_point now);
    mutable std::mutex mutex_;
    std::uint64_t rate_ = 0;
    double burst_ = 0;
    double tokens_ = 0; // may go negative: debt to wait out
    ShaperClock::time_point last_{};
};

class NodeShaper {
public:
    explicit NodeShaper(std::uint64_t node_cap_bps = 0) : cap_(node_cap_bps) {}
    // Registers a migration; its bucket is shared with its tunnels.
    std::shared_ptr<TokenBucket> add(const std::string& migration, std::uint64_t own_limit_bps);
    void remove(const std::string& migration);
    void set_cap(std::uint64_t cap_bps);
    std::uint64_t rate_of(const std::string& migration) const;

private:
    void rebalance();
    struct Entry {
        std::uint64_t own_limit;
        std::shared_ptr<TokenBucket> bucket;
    };
    std::uint64_t cap_;
    std::map<std::string, Entry> active_;
};

} // namespace ferry::transport
