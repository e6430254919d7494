#pragma once
// A migration's progress over time, sampled while it runs, for the report's
// charts (ferry-bench --report).
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::bench {

struct Point {
    double t_ms = 0;                    // since the migration was requested
    std::uint64_t transferred_bytes = 0;
    double transfer_rate_bps = 0;       // bytes per second, measured: transferred since a kept point
                                        // about every_ms earlier, over that time (set by Series::offer)
    double reported_rate_bps = 0;       // bytes per second as QEMU (mbps) or ferry reports it
    double dirty_rate_bps = 0;          // bytes per second
    std::uint64_t remaining_bytes = 0;
    std::int64_t throttle_percent = 0;  // vCPU throttle
    std::string status;                 // QEMU's migration status
};

// True for the statuses QEMU enters when it leaves "active" to switch over:
// device, pre-switchover, completed, postcopy-active.
bool is_switchover_status(std::string_view status);

// From `query-migrate`'s answer (dirty rate: ram.dirty-pages-rate x page size).
Point point_from_query_migrate(double t_ms, const nlohmann::json& info);
// From a ferry migration's "progress" object (migration.show).
Point point_from_progress(double t_ms, const nlohmann::json& progress);

struct Series {
    std::string source;                 // where the points come from: "query-migrate", "ferry progress"
    std::vector<Point> points;
    std::optional<double> switchover_ms; // when QEMU's status first left "active" for the switchover
    double every_ms = 250;               // keep a point at most this often (status changes always)

    // Called at every poll; cheap. Keeps p when QEMU's status changed, or
    // when every_ms has passed and the numbers moved; `last` keeps it anyway.
    // A kept point gets its measured transfer_rate_bps.
    void offer(Point p, bool last = false);
    nlohmann::json to_json() const;
};

} // namespace ferry::bench
