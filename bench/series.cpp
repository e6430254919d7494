#include "series.hpp"

#include "engine/migration.hpp"

#include <iterator>

namespace ferry::bench {

bool is_switchover_status(std::string_view status) {
    return status == "device" || status == "pre-switchover" || status == "completed" || status == "postcopy-active";
}

Point point_from_query_migrate(double t_ms, const nlohmann::json& info) {
    auto p = engine::progress_from_query_migrate(info);
    Point out;
    out.t_ms = t_ms;
    out.transferred_bytes = p.transferred_bytes;
    out.reported_rate_bps = static_cast<double>(p.transfer_rate_bps);
    out.dirty_rate_bps = static_cast<double>(p.dirty_rate_bps);
    out.remaining_bytes = p.remaining_bytes;
    out.throttle_percent = p.throttle_percent;
    out.status = p.qemu_status;
    return out;
}

Point point_from_progress(double t_ms, const nlohmann::json& progress) {
    Point out;
    out.t_ms = t_ms;
    out.transferred_bytes = progress.value("transferred_bytes", std::uint64_t{0});
    out.reported_rate_bps = progress.value("transfer_rate_bps", 0.0);
    out.dirty_rate_bps = progress.value("dirty_rate_bps", 0.0);
    out.remaining_bytes = progress.value("remaining_bytes", std::uint64_t{0});
    out.throttle_percent = progress.value("throttle_percent", std::int64_t{0});
    out.status = progress.value("qemu_status", "");
    return out;
}

void Series::offer(Point p, bool last) {
    if (!switchover_ms && is_switchover_status(p.status))
        switchover_ms = p.t_ms;
    bool keep = points.empty() || last || p.status != points.back().status;
    if (!keep) {
        auto& prev = points.back();
        bool moved = p.transferred_bytes != prev.transferred_bytes || p.remaining_bytes != prev.remaining_bytes ||
                     p.reported_rate_bps != prev.reported_rate_bps || p.dirty_rate_bps != prev.dirty_rate_bps ||
                     p.throttle_percent != prev.throttle_percent;
        keep = moved && p.t_ms - prev.t_ms >= every_ms;
    }
    if (!keep)
        return;
    // Over about every_ms, not since a status change a moment ago: a rate
    // over a few milliseconds is noise.
    for (auto it = points.rbegin(); it != points.rend(); ++it)
        if (p.t_ms - it->t_ms >= 0.8 * every_ms || std::next(it) == points.rend()) {
            double dt = (p.t_ms - it->t_ms) / 1000;
            if (dt > 0 && p.transferred_bytes >= it->transferred_bytes)
                p.transfer_rate_bps = static_cast<double>(p.transferred_bytes - it->transferred_bytes) / dt;
            break;
        }
    points.push_back(std::move(p));
}

nlohmann::json Series::to_json() const {
    auto pts = nlohmann::json::array();
    for (auto& p : points)
        pts.push_back({{"t_ms", p.t_ms},
                       {"transferred_bytes", p.transferred_bytes},
                       {"transfer_rate_bps", p.transfer_rate_bps},
                       {"reported_rate_bps", p.reported_rate_bps},
                       {"dirty_rate_bps", p.dirty_rate_bps},
                       {"remaining_bytes", p.remaining_bytes},
                       {"throttle_percent", p.throttle_percent},
                       {"status", p.status}});
    return {{"source", source},
            {"every_ms", every_ms},
            {"switchover_ms", switchover_ms ? nlohmann::json(*switchover_ms) : nlohmann::json(nullptr)},
            {"points", pts}};
}

} // namespace ferry::bench
