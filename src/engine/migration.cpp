#include "engine/migration.hpp"

#include <fmt/format.h>

#include <array>
#include <cmath>

namespace ferry::engine {

namespace {
constexpr std::array<std::pair<Phase, std::string_view>, 9> phase_names{{
    {Phase::Pending, "Pending"},
    {Phase::Scheduling, "Scheduling"},
    {Phase::Scheduled, "Scheduled"},
    {Phase::PreparingTarget, "PreparingTarget"},
    {Phase::TargetReady, "TargetReady"},
    {Phase::Running, "Running"},
    {Phase::Switchover, "Switchover"},
    {Phase::Succeeded, "Succeeded"},
    {Phase::Failed, "Failed"},
}};

template <class T> json opt(const std::optional<T>& v) { return v ? json(*v) : json(nullptr); }
template <class T> std::optional<T> get_opt(const json& j, const char* key) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null())
        return std::nullopt;
    return it->get<T>();
}
json disks_json(const std::optional<DiskProgress>& d) {
    if (!d)
        return nullptr;
    return {{"total_bytes", d->total_bytes},
            {"sent_bytes", d->sent_bytes},
            {"remaining_bytes", d->remaining_bytes},
            {"dirty_rate_bps", d->dirty_rate_bps},
            {"rounds", d->rounds},
            {"round", d->round},
            {"round_bytes", d->round_bytes},
            {"round_sent_bytes", d->round_sent_bytes},
            {"write_cap_bps", d->write_cap_bps}};
}

json disk_results_json(const std::vector<DiskResult>& disks) {
    json out = json::array();
    for (auto& d : disks)
        out.push_back({{"index", d.index}, {"path", d.path}, {"data_bytes", d.data_bytes}, {"zero_bytes", d.zero_bytes}});
    return out;
}
} // namespace

std::string_view to_string(Phase p) {
    for (auto& [phase, name] : phase_names)
        if (phase == p)
            return name;
    return "Failed";
}

std::optional<Phase> phase_from_string(std::string_view s) {
    for (auto& [phase, name] : phase_names)
        if (name == s)
            return phase;
    return std::nullopt;
}

void to_json(json& j, const Migration& m) {
    const auto& p = m.progress;
    j = json{
        {"id", m.id},
        {"vm", m.vm},
        {"source_node", m.source_node},
        {"target_node", m.target_node},
        {"phase", to_string(m.phase)},
        {"mode", m.mode},
        {"method", m.method},
        {"postcopy_continued", m.postcopy_continued},
        {"policy", opt(m.policy)},
        {"config", m.config},
        {"created_at", m.created_at},
        {"started_at", opt(m.started_at)},
        {"ended_at", opt(m.ended_at)},
        {"abort_requested", m.abort_requested},
        {"abort_status", opt(m.abort_status)},
        {"failure_reason", opt(m.failure_reason)},
        {"progress",
         {{"total_bytes", p.total_bytes},
          {"transferred_bytes", p.transferred_bytes},
          {"remaining_bytes", p.remaining_bytes},
          {"transfer_rate_bps", p.transfer_rate_bps},
          {"dirty_rate_bps", p.dirty_rate_bps},
          {"iteration", p.iteration},
          {"throttle_percent", p.throttle_percent},
          {"expected_downtime_ms", p.expected_downtime_ms},
          {"downtime_limit_ms", p.downtime_limit_ms},
          {"converging", opt(p.converging)},
          {"time_left_ms", p.time_left_ms},
          {"qemu_status", p.qemu_status},
          {"peer_silent_ms", p.peer_silent_ms},
          {"disks", disks_json(p.disks)}}},
        {"result",
         {{"total_time_ms", opt(m.result.total_time_ms)},
          {"downtime_ms", opt(m.result.downtime_ms)},
          {"guest_blackout_ms", opt(m.result.guest_blackout_ms)},
          {"disks", disk_results_json(m.result.disks)}}},
        {"target_pid", m.target_pid},
        {"target_dir", m.target_dir},
        {"created_images", m.created_images},
        {"saved_io_limits", m.saved_io_limits},
        {"warnings", m.warnings},
    };
}

void from_json(const json& j, Migration& m) {
    m.id = j.at("id");
    m.vm = j.at("vm");
    m.source_node = j.value("source_node", "");
    m.target_node = j.value("target_node", "");
    m.phase = phase_from_string(j.value("phase", "Failed")).value_or(Phase::Failed);
    m.mode = j.value("mode", "precopy");
    // A record from before this field: post-copy counts as under way.
    m.postcopy_continued = j.value("postcopy_continued", m.mode == "postcopy");
    m.method = j.value("method", "live");
    m.policy = get_opt<std::string>(j, "policy");
    if (auto c = j.find("config"); c != j.end()) {
        auto& cfg = m.config;
        cfg.parallel_migrations_per_cluster = c->value("parallel_migrations_per_cluster", cfg.parallel_migrations_per_cluster);
        cfg.parallel_outbound_migrations_per_node = c->value("parallel_outbound_migrations_per_node", cfg.parallel_outbound_migrations_per_node);
        cfg.parallel_inbound_migrations_per_node = c->value("parallel_inbound_migrations_per_node", cfg.parallel_inbound_migrations_per_node);
        cfg.bandwidth_per_migration = c->value("bandwidth_per_migration", cfg.bandwidth_per_migration);
        cfg.completion_timeout_per_gib = c->value("completion_timeout_per_gib", cfg.completion_timeout_per_gib);
        cfg.progress_timeout = c->value("progress_timeout", cfg.progress_timeout);
        cfg.allow_auto_converge = c->value("allow_auto_converge", cfg.allow_auto_converge);
        cfg.allow_post_copy = c->value("allow_post_copy", cfg.allow_post_copy);
        // Absent from a record written before it existed: that migration had no preempt channel.
        cfg.postcopy_preempt = c->value("postcopy_preempt", false);
        cfg.disable_tls = c->value("disable_tls", cfg.disable_tls);
        cfg.max_downtime_ms = c->value("max_downtime_ms", cfg.max_downtime_ms);
        cfg.multifd_channels = c->value("multifd_channels", cfg.multifd_channels);
        cfg.peer_timeout = c->value("peer_timeout", cfg.peer_timeout);
    }
    m.created_at = j.value("created_at", "");
    m.started_at = get_opt<std::string>(j, "started_at");
    m.ended_at = get_opt<std::string>(j, "ended_at");
    m.abort_requested = j.value("abort_requested", false);
    m.abort_status = get_opt<std::string>(j, "abort_status");
    m.failure_reason = get_opt<std::string>(j, "failure_reason");
    if (auto p = j.find("progress"); p != j.end()) {
        m.progress.total_bytes = p->value("total_bytes", std::uint64_t{0});
        m.progress.transferred_bytes = p->value("transferred_bytes", std::uint64_t{0});
        m.progress.remaining_bytes = p->value("remaining_bytes", std::uint64_t{0});
        m.progress.transfer_rate_bps = p->value("transfer_rate_bps", std::uint64_t{0});
        m.progress.dirty_rate_bps = p->value("dirty_rate_bps", std::uint64_t{0});
        m.progress.iteration = p->value("iteration", std::int64_t{0});
        m.progress.throttle_percent = p->value("throttle_percent", std::int64_t{0});
        m.progress.expected_downtime_ms = p->value("expected_downtime_ms", std::int64_t{0});
        m.progress.downtime_limit_ms = p->value("downtime_limit_ms", std::int64_t{0});
        m.progress.time_left_ms = p->value("time_left_ms", std::int64_t{-1});
        if (auto c = p->find("converging"); c != p->end() && c->is_boolean())
            m.progress.converging = c->get<bool>();
        m.progress.qemu_status = p->value("qemu_status", "");
        m.progress.peer_silent_ms = p->value("peer_silent_ms", std::int64_t{0});
        if (auto d = p->find("disks"); d != p->end() && d->is_object()) {
            DiskProgress dp;
            dp.total_bytes = d->value("total_bytes", std::uint64_t{0});
            dp.sent_bytes = d->value("sent_bytes", std::uint64_t{0});
            dp.remaining_bytes = d->value("remaining_bytes", std::uint64_t{0});
            dp.dirty_rate_bps = d->value("dirty_rate_bps", std::uint64_t{0});
            dp.write_cap_bps = d->value("write_cap_bps", std::uint64_t{0});
            dp.rounds = d->value("rounds", std::uint32_t{0});
            dp.round = d->value("round", std::uint32_t{0});
            dp.round_bytes = d->value("round_bytes", std::uint64_t{0});
            dp.round_sent_bytes = d->value("round_sent_bytes", std::uint64_t{0});
            m.progress.disks = dp;
        }
    }
    if (auto r = j.find("result"); r != j.end()) {
        m.result.total_time_ms = get_opt<std::int64_t>(*r, "total_time_ms");
        m.result.downtime_ms = get_opt<std::int64_t>(*r, "downtime_ms");
        m.result.guest_blackout_ms = get_opt<std::int64_t>(*r, "guest_blackout_ms");
        if (auto d = r->find("disks"); d != r->end() && d->is_array())
            for (auto& e : *d)
                if (e.is_object())
                    m.result.disks.push_back({e.value("index", std::uint32_t{0}), e.value("path", ""),
                                              e.value("data_bytes", std::uint64_t{0}),
                                              e.value("zero_bytes", std::uint64_t{0})});
    }
    m.target_pid = j.value("target_pid", -1);
    m.target_dir = j.value("target_dir", "");
    if (auto c = j.find("created_images"); c != j.end() && c->is_array())
        for (auto& path : *c)
            if (path.is_string())
                m.created_images.push_back(path.get<std::string>());
    if (auto w = j.find("warnings"); w != j.end() && w->is_array())
        for (auto& text : *w)
            if (text.is_string())
                m.warnings.push_back(text.get<std::string>());
    if (auto s = j.find("saved_io_limits"); s != j.end() && s->is_array())
        for (auto& e : *s)
            if (e.is_object() && e.contains("device") && e["device"].is_string() && e.contains("limits") &&
                e["limits"].is_object())
                m.saved_io_limits.push_back(e);
}

json migration_capabilities(bool multifd, bool postcopy, bool preempt) {
    json caps = json::array();
    for (auto name : {"events", "pause-before-switchover"})
        caps.push_back({{"capability", name}, {"state", true}});
    if (multifd)
        caps.push_back({{"capability", "multifd"}, {"state", true}});
    if (postcopy)
        caps.push_back({{"capability", "postcopy-ram"}, {"state", true}});
    if (postcopy && preempt)
        caps.push_back({{"capability", "postcopy-preempt"}, {"state", true}});
    return caps;
}

Progress progress_from_query_migrate(const json& info) {
    Progress p;
    p.qemu_status = info.value("status", "");
    p.expected_downtime_ms = info.value("expected-downtime", std::int64_t{0});
    p.throttle_percent = info.value("cpu-throttle-percentage", std::int64_t{0});
    if (auto ram = info.find("ram"); ram != info.end()) {
        p.total_bytes = ram->value("total", std::uint64_t{0});
        p.transferred_bytes = ram->value("transferred", std::uint64_t{0});
        p.remaining_bytes = ram->value("remaining", std::uint64_t{0});
        // "mbps" is megabits per second (a float).
        double mbps = ram->value("mbps", 0.0);
        p.transfer_rate_bps = static_cast<std::uint64_t>(std::llround(mbps * 1e6 / 8));
        std::uint64_t page_size = ram->value("page-size", std::uint64_t{4096});
        p.dirty_rate_bps = ram->value("dirty-pages-rate", std::uint64_t{0}) * page_size;
        p.iteration = ram->value("dirty-sync-count", std::int64_t{0});
    }
    return p;
}

} // namespace ferry::engine
