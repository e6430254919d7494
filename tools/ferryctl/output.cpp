#include "output.hpp"

#include <fmt/format.h>

#include <iostream>

namespace ferryctl {

using nlohmann::json;

namespace {
std::string str(const json& j, const char* key, const char* none = "-") {
    auto it = j.find(key);
    if (it == j.end() || it->is_null())
        return none;
    return it->is_string() ? it->get<std::string>() : it->dump();
}
std::string ms(const json& j, const char* key) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null())
        return "unknown";
    return fmt::format("{} ms", it->get<std::int64_t>());
}
} // namespace

std::string bytes(std::uint64_t n) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = static_cast<double>(n);
    int u = 0;
    while (v >= 1024 && u < 4) {
        v /= 1024;
        ++u;
    }
    return u == 0 ? fmt::format("{} B", n) : fmt::format("{:.1f} {}", v, units[u]);
}

std::string rate(std::uint64_t bps) { return bytes(bps) + "/s"; }

// A block migration's disks on the progress line ("" for others).
std::string disks_part(const json& p) {
    auto d = p.find("disks");
    if (d == p.end() || !d->is_object())
        return "";
    // The round under way, as far as it got (the first copies every
    // allocated block: hours on big disks); between rounds, the last one.
    auto dirty = fmt::format("{} dirty ({})", bytes(d->value("remaining_bytes", std::uint64_t{0})),
                             rate(d->value("dirty_rate_bps", std::uint64_t{0})));
    auto round = d->value("round", 0);
    auto line = round > 0 ? fmt::format("  disks round {}: {} of {} copied, {}", round,
                                        bytes(d->value("round_sent_bytes", std::uint64_t{0})),
                                        bytes(d->value("round_bytes", std::uint64_t{0})), dirty)
                          : fmt::format("  disks {} after round {}", dirty, d->value("rounds", 0));
    if (auto cap = d->value("write_cap_bps", std::uint64_t{0}); cap != 0)
        line += fmt::format(", guest disk writes capped at {}", rate(cap));
    return line;
}

std::string progress_line(const json& m) {
    if (m.value("phase", "") == "Pending" && !m.contains("progress")) // waiting in the queue
        return fmt::format("[Pending] waits for {}", m.value("reason", std::string("a slot")));
    const auto& p = m.at("progress");
    auto total = p.value("total_bytes", std::uint64_t{0});
    auto remaining = p.value("remaining_bytes", std::uint64_t{0});
    double pct = total ? 100.0 * static_cast<double>(total - std::min(total, remaining)) / static_cast<double>(total) : 0.0;
    std::string phase = m.value("phase", "?");
    if (phase != "Running" && phase != "Switchover")
        return fmt::format("[{}]", phase);
    // A silent target first, so a line cut to the terminal keeps it.
    if (auto silent = p.value("peer_silent_ms", std::int64_t{0}); silent >= 1000)
        return fmt::format("[{}] {} has not answered for {} s (given up after {} s)", phase,
                           m.value("target_node", "?"), silent / 1000,
                           m.contains("config") ? m.at("config").value("peer_timeout", 0) : 0);
    std::string qemu = p.value("qemu_status", "");
    auto disks = disks_part(p);
    if (!disks.empty() && (qemu.empty() || qemu == "none" || qemu == "setup"))
        return fmt::format("[{}] copying the disks before RAM:{}", phase, disks);
    if (qemu == "pre-switchover" || qemu == "device")
        return fmt::format("[{}] switching over (guest paused)", phase);
    if (qemu == "completed")
        return fmt::format("[{}] handing off to the destination", phase);
    if (qemu.rfind("postcopy", 0) == 0)
        return fmt::format("[{}] post-copy ({}): the VM runs on {}  remaining {}  {}", phase, qemu,
                           m.value("target_node", "?"), bytes(remaining),
                           rate(p.value("transfer_rate_bps", std::uint64_t{0})));
    return fmt::format("[{}] {:5.1f}%  {}  remaining {}  dirty {}  iteration {}  {}{}{}", phase, pct,
                       rate(p.value("transfer_rate_bps", std::uint64_t{0})), bytes(remaining),
                       rate(p.value("dirty_rate_bps", std::uint64_t{0})), p.value("iteration", 0), outlook(p),
                       p.value("throttle_percent", 0) > 0
                           ? fmt::format("  throttle {}%", p.value("throttle_percent", 0))
                           : std::string(),
                       disks);
}

std::string fit_width(const std::string& line, std::size_t columns) {
    if (columns == 0)
        return line;
    // Columns counted as UTF-8 characters (the line holds no wide ones).
    std::size_t shown = 0;
    for (std::size_t i = 0; i < line.size(); ++i) {
        if ((static_cast<unsigned char>(line[i]) & 0xC0) == 0x80)
            continue; // a continuation byte
        if (shown == columns - 1)
            return line.substr(0, i);
        ++shown;
    }
    return line;
}

// The convergence model's verdict, in words.
std::string outlook(const json& p) {
    auto c = p.find("converging");
    if (c == p.end() || c->is_null())
        return "first pass";
    auto left = p.value("time_left_ms", std::int64_t{-1});
    if (c->get<bool>())
        return fmt::format("converging, ~{:.0f} s left, downtime ~{} ms", static_cast<double>(std::max<std::int64_t>(left, 0)) / 1000.0,
                           p.value("expected_downtime_ms", 0));
    return fmt::format("NOT converging (would need {} ms downtime, limit {} ms)", p.value("expected_downtime_ms", 0),
                       p.value("downtime_limit_ms", 0));
}

void print_migration(const json& m) {
    if (!m.contains("progress")) { // waiting in the queue: not started, nothing moved
        std::cout << fmt::format("id:           {}\n", str(m, "id"));
        std::cout << fmt::format("vm:           {}\n", str(m, "vm"));
        std::cout << fmt::format("from -> to:   {} -> {}\n", str(m, "source_node"),
                                 m.value("target_node", json()).is_string() ? str(m, "target_node")
                                                                            : "(the scheduler picks when it starts)");
        std::cout << fmt::format("phase:        {}\n", str(m, "phase"));
        std::cout << fmt::format("created:      {}\n", str(m, "created_at"));
        if (m.contains("reason"))
            std::cout << fmt::format("waits for:    {}\n", str(m, "reason"));
        if (m.contains("failure_reason"))
            std::cout << fmt::format("failure:      {}\n", str(m, "failure_reason"));
        return;
    }
    std::cout << fmt::format("id:           {}\n", str(m, "id"));
    std::cout << fmt::format("vm:           {}\n", str(m, "vm"));
    std::cout << fmt::format("from -> to:   {} -> {}\n", str(m, "source_node"), str(m, "target_node"));
    std::cout << fmt::format("phase:        {}\n", str(m, "phase"));
    std::cout << fmt::format("mode:         {}\n", str(m, "mode"));
    std::cout << fmt::format("method:       {}\n", m.value("method", "live"));
    std::cout << fmt::format("created:      {}\n", str(m, "created_at"));
    std::cout << fmt::format("started:      {}\n", str(m, "started_at"));
    std::cout << fmt::format("ended:        {}\n", str(m, "ended_at"));
    if (m.value("abort_requested", false))
        std::cout << fmt::format("abort:        {}\n", str(m, "abort_status"));
    if (!m.at("failure_reason").is_null())
        std::cout << fmt::format("failure:      {}\n", str(m, "failure_reason"));
    if (auto doubt = m.find("in_doubt"); doubt != m.end() && doubt->is_string())
        std::cout << fmt::format("in doubt:     whether {} runs on {} ({}); if {} is lost for good, "
                                 "`migration abort {} --target-lost` resumes it here\n",
                                 str(m, "vm"), str(m, "target_node"), doubt->get<std::string>(),
                                 str(m, "target_node"), str(m, "id"));
    if (auto w = m.find("warnings"); w != m.end() && w->is_array())
        for (auto& text : *w)
            if (text.is_string())
                std::cout << fmt::format("warning:      {}\n", text.get<std::string>());
    const auto& p = m.at("progress");
    std::cout << fmt::format("transferred:  {} of {} ({} remaining)\n",
                             bytes(p.value("transferred_bytes", std::uint64_t{0})),
                             bytes(p.value("total_bytes", std::uint64_t{0})),
                             bytes(p.value("remaining_bytes", std::uint64_t{0})));
    std::cout << fmt::format("rates:        transfer {}, dirty {}\n",
                             rate(p.value("transfer_rate_bps", std::uint64_t{0})),
                             rate(p.value("dirty_rate_bps", std::uint64_t{0})));
    std::cout << fmt::format("iteration:    {}\n", p.value("iteration", 0));
    if (auto silent = p.value("peer_silent_ms", std::int64_t{0});
        silent >= 1000 && (m.value("phase", "") == "Running" || m.value("phase", "") == "Switchover"))
        std::cout << fmt::format("peer:         {} has not answered for {} s (given up after {} s)\n",
                                 str(m, "target_node"), silent / 1000, m.at("config").value("peer_timeout", 0));
    if (auto d = disks_part(p); !d.empty())
        std::cout << fmt::format("disks:        {}\n", d.substr(8));
    if (m.value("phase", "") == "Running")
        std::cout << fmt::format("outlook:      {}\n", outlook(p));
    std::cout << fmt::format("limit:        downtime {} ms (max {} ms)\n", p.value("downtime_limit_ms", 0),
                             m.at("config").value("max_downtime_ms", 0));
    if (p.value("throttle_percent", 0) > 0)
        std::cout << fmt::format("throttle:     {}% of the vCPUs' time (ferry's auto-converge)\n",
                                 p.value("throttle_percent", 0));
    const auto& r = m.at("result");
    if (m.value("phase", "") == "Succeeded") {
        std::cout << fmt::format("total time:   {}\n", ms(r, "total_time_ms"));
        std::cout << fmt::format("downtime:     {} (QEMU)\n", ms(r, "downtime_ms"));
        std::cout << fmt::format("blackout:     {} (guest heartbeat)\n", ms(r, "guest_blackout_ms"));
    }
    if (auto d = r.find("disks"); d != r.end() && d->is_array())
        for (auto& disk : *d)
            std::cout << fmt::format("disk {}:       {} sent, {} skipped as zeros ({})\n", disk.value("index", 0),
                                     bytes(disk.value("data_bytes", std::uint64_t{0})),
                                     bytes(disk.value("zero_bytes", std::uint64_t{0})), disk.value("path", "?"));
}

void print_migration_table(const json& list) {
    std::cout << fmt::format("{:<24} {:<16} {:<16} {:<10} {}\n", "ID", "VM", "PHASE", "MODE", "CREATED");
    for (auto& m : list)
        std::cout << fmt::format("{:<24} {:<16} {:<16} {:<10} {}\n", str(m, "id"), str(m, "vm"),
                                 str(m, "phase"), str(m, "mode"), str(m, "created_at"));
}

void print_vm(const json& vm) {
    std::cout << fmt::format("name:        {}\n", str(vm, "name"));
    std::cout << fmt::format("node:        {}\n", str(vm, "node"));
    std::cout << fmt::format("status:      {}\n", str(vm, "status"));
    std::cout << fmt::format("pid:         {}\n", str(vm, "pid"));
    std::cout << fmt::format("adopted:     {}\n", vm.value("adopted", false) ? "yes" : "no");
    std::cout << fmt::format("qmp:         {}\n", str(vm, "qmp_socket"));
    std::cout << fmt::format("console:     {}\n", str(vm, "console_log"));
    std::cout << fmt::format("migration:   {}\n", str(vm, "migration"));
    if (auto spec = vm.find("spec"); spec != vm.end() && !spec->is_null())
        std::cout << fmt::format("memory/cpus: {} / {}\n", bytes(spec->value("memory", std::uint64_t{0})),
                                 spec->value("cpus", 1));
    if (auto m = vm.find("migratable"); m != vm.end() && m->is_object()) {
        if (m->value("now", false))
            std::cout << fmt::format("migratable:  yes (to {})\n", str(*m, "target"));
        else
            for (auto& reason : m->value("reasons", json::array()))
                std::cout << fmt::format("migratable:  no: {}\n", reason.is_string() ? reason.get<std::string>()
                                                                                      : reason.dump());
    }
}

void print_vm_table(const json& list) {
    std::cout << fmt::format("{:<20} {:<12} {:<10} {:<8} {}\n", "NAME", "STATUS", "NODE", "PID", "MIGRATION");
    for (auto& vm : list)
        std::cout << fmt::format("{:<20} {:<12} {:<10} {:<8} {}\n", str(vm, "name"), str(vm, "status"),
                                 str(vm, "node"), str(vm, "pid"), str(vm, "migration"));
}

void print_node_table(const json& nodes) {
    std::cout << fmt::format("{:<16} {:<12} {:>5} {:>22} {:>4} {:>4} {:<10} {}\n", "NAME", "STATE", "CPUS",
                             "MEMORY (VMS/TOTAL)", "VMS", "MIGR", "QEMU", "LABELS");
    for (auto& n : nodes) {
        if (n.value("state", "") == "unreachable") {
            std::cout << fmt::format("{:<16} {:<12} {}\n", str(n, "name"), "unreachable", str(n, "error"));
            continue;
        }
        std::uint64_t used = 0;
        for (auto& vm : n.value("vms", json::array()))
            used += vm.value("memory", std::uint64_t{0});
        std::string labels;
        auto label_table = n.value("labels", json::object());
        for (auto& [k, v] : label_table.items())
            labels += (labels.empty() ? "" : ",") + k + "=" + (v.is_string() ? v.get<std::string>() : v.dump());
        std::cout << fmt::format("{:<16} {:<12} {:>5} {:>22} {:>4} {:>4} {:<10} {}\n", str(n, "name"),
                                 str(n, "state"), str(n, "cpus"),
                                 bytes(used) + " / " + bytes(n.value("memory", std::uint64_t{0})),
                                 n.value("vms", json::array()).size(), n.value("migrations", json::array()).size(),
                                 str(n, "qemu_version"), labels);
    }
}

void print_placement(const json& p) {
    std::cout << fmt::format("{} on {}: ", str(p, "vm"), str(p, "source_node"));
    if (p.value("target_node", json()).is_string())
        std::cout << "would migrate to " << p["target_node"].get<std::string>() << "\n";
    else
        std::cout << "no node fits\n";
    auto ranked = p.value("ranked", json::array());
    if (!ranked.empty()) {
        std::cout << "candidates, best first:\n";
        for (auto& c : ranked)
            std::cout << fmt::format("  {:<16} memory {:5.1f}%  cpu {:5.1f}%\n", str(c, "node"),
                                     100 * c.value("memory_load", 0.0), 100 * c.value("cpu_load", 0.0));
    }
    auto rejected = p.value("rejected", json::array());
    if (!rejected.empty()) {
        std::cout << "rejected:\n";
        for (auto& r : rejected) {
            std::string why;
            for (auto& reason : r.value("reasons", json::array()))
                why += (why.empty() ? "" : "; ") + reason.get<std::string>();
            std::cout << fmt::format("  {:<16} {}\n", str(r, "node"), why);
        }
    }
}

std::string drain_line(const json& status) {
    auto d = status.value("drain", json());
    if (!d.is_object())
        return fmt::format("{}: {}, no drain", str(status, "node"), str(status, "state"));
    auto counts = d.value("counts", json::object());
    auto n = [&](const char* k) { return counts.value(k, 0); };
    std::string line = fmt::format("{}: drain {}: {} moved, {} migrating, {} waiting", str(d, "node"), str(d, "state"),
                                   n("moved"), n("migrating"), n("waiting"));
    for (auto k : {"cannot_move", "gave_up", "not_moved", "gone"})
        if (n(k))
            line += fmt::format(", {} {}", n(k), std::string(k) == "cannot_move" ? "cannot move"
                                                 : std::string(k) == "gave_up"   ? "gave up"
                                                 : std::string(k) == "not_moved" ? "not moved"
                                                                                 : "gone");
    return line;
}

void print_node_state(const json& status) {
    std::cout << fmt::format("{} is {}\n", str(status, "node"), str(status, "state"));
    if (auto pre = status.value("preflight", json()); pre.is_object()) {
        std::cout << fmt::format("pre-flight: {} VM(s); {} fit on other nodes now\n", pre.value("vms", 0),
                                 pre.value("fit_elsewhere", 0));
        for (auto& c : pre.value("cannot_move", json::array()))
            std::cout << fmt::format("  cannot move {}: {}\n", str(c, "vm"), str(c, "why"));
        for (auto& c : pre.value("no_room", json::array()))
            std::cout << fmt::format("  no room now for {}: {}\n", str(c, "vm"), str(c, "why"));
    }
    auto d = status.value("drain", json());
    if (d.is_object()) {
        std::cout << drain_line(status) << fmt::format(" (started {}{}{})\n", str(d, "started_at"),
                                                       d.value("max_parallel", 0) ? fmt::format(", max-parallel {}",
                                                                                                d.value("max_parallel", 0))
                                                                                  : "",
                                                       d.contains("ended_at") ? ", ended " + str(d, "ended_at") : "");
        if (d.contains("note"))
            std::cout << "  " << str(d, "note") << "\n";
        for (auto& v : d.value("vms", json::array())) {
            std::string detail;
            if (v.contains("target") && (str(v, "state") == "moved" || str(v, "state") == "migrating"))
                detail = fmt::format("-> {} ({})", str(v, "target"), str(v, "migration"));
            else if (v.contains("reason"))
                detail = str(v, "reason");
            else if (v.contains("error"))
                detail = str(v, "error");
            if (v.value("attempts", 0) > 1)
                detail += fmt::format(" [attempt {}]", v.value("attempts", 0));
            std::cout << fmt::format("  {:<20} {:<12} {}\n", str(v, "name"), str(v, "state"), detail);
        }
    }
    for (auto& w : status.value("waiting", json::array()))
        std::cout << fmt::format("  waiting migration {} ({}): {}\n", str(w, "id"), str(w, "vm"), str(w, "reason"));
}

std::string event_line(const json& e) {
    auto& d = e.contains("data") ? e["data"] : e;
    auto type = e.value("type", "");
    std::string what;
    if (type == "phase") {
        what = fmt::format("{} ({})", d.value("phase", "?"), d.value("role", "?"));
        if (d.contains("failure_reason") && d["failure_reason"].is_string())
            what += ": " + d["failure_reason"].get<std::string>();
    } else if (type == "progress") {
        // Pre-copy sends pages again as the guest dirties them: what was
        // sent grows past the RAM's size.
        what = fmt::format("{} remaining, {} sent (RAM {}), iteration {}, transfer {}, dirty {}",
                           bytes(d.value("remaining_bytes", std::uint64_t{0})),
                           bytes(d.value("transferred_bytes", std::uint64_t{0})),
                           bytes(d.value("total_bytes", std::uint64_t{0})), d.value("iteration", 0),
                           rate(d.value("transfer_rate_bps", std::uint64_t{0})),
                           rate(d.value("dirty_rate_bps", std::uint64_t{0})));
    } else if (type == "hooks") {
        auto failures = d.contains("failures") ? d["failures"] : json::array();
        what = fmt::format("{} hook(s) of {} on the {}: {}", d.value("hooks", 0), d.value("phase", "?"),
                           d.value("role", "?"),
                           failures.empty() ? std::string("ok")
                                            : failures[0].is_string() ? failures[0].get<std::string>() : "failed");
    } else if (type == "qemu") {
        what = fmt::format("{} {}", d.value("event", "?"), d.contains("data") ? d["data"].dump() : "");
    } else if (type == "launch") {
        what = fmt::format("start the destination QEMU (QMP at {}) within {} s and register it", d.value("qmp_socket", "?"),
                           d.value("timeout_s", 0));
    } else if (type == "result") {
        what = d.value("phase", "?");
        if (d.contains("failure_reason") && d["failure_reason"].is_string())
            what += ": " + d["failure_reason"].get<std::string>();
    } else {
        what = d.dump();
    }
    auto migration = e.contains("migration") && e["migration"].is_string() ? e["migration"].get<std::string>() : "-";
    return fmt::format("{:>6} {} {:<8} {} {}: {}", e.value("seq", 0), e.value("time", ""), type, e.value("vm", ""),
                       migration, what);
}

} // namespace ferryctl
