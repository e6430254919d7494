#include "convergence.hpp"

#include "config/quantity.hpp"
#include "local.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <vector>

namespace ferry::bench {

namespace {

using json = nlohmann::json;

std::vector<std::string> split(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream in(s);
    std::string part;
    while (std::getline(in, part, ','))
        if (!part.empty())
            out.push_back(part);
    return out;
}

template <class F> Result<Sample> run_one(F f, LocalSetup setup) {
    boost::asio::io_context io;
    auto fut = boost::asio::co_spawn(io, f(std::move(setup)), boost::asio::use_future);
    io.run();
    return fut.get();
}

std::string short_outcome(const std::string& outcome) {
    if (outcome.rfind("failed: completion timeout", 0) == 0)
        return "failed (timeout)";
    if (outcome.rfind("failed: progress timeout", 0) == 0)
        return "failed (no progress)";
    return outcome.size() > 40 ? outcome.substr(0, 40) : outcome;
}

} // namespace

int run_convergence_bench(const ConvergenceOptions& o) {
    auto mem = config::parse_quantity(o.memory);
    if (!mem) {
        std::cerr << "ferry-bench: --memory: " << mem.error().message << "\n";
        return 2;
    }
    static const std::vector<std::string> known{"ferry-none",        "ferry-throttle", "ferry-postcopy",
                                                "ferry-postcopy-nopreempt", "qemu-autoconverge", "qemu-postcopy",
                                                "qemu-none"};
    for (auto& s : split(o.strategies))
        if (std::find(known.begin(), known.end(), s) == known.end()) {
            std::cerr << "ferry-bench: --strategies: unknown strategy '" << s << "' (known: ferry-none, "
                      << "ferry-throttle, ferry-postcopy, ferry-postcopy-nopreempt, qemu-autoconverge, qemu-postcopy, "
                         "qemu-none)\n";
            return 2;
        }
    double gib = static_cast<double>(*mem) / (1 << 30);
    auto limit = std::chrono::seconds(static_cast<std::int64_t>(std::ceil(o.completion_timeout_per_gib * gib)));

    json rows = json::array();
    for (auto& rate : split(o.rates)) {
        for (auto& bw_text : split(o.bandwidths)) {
            auto bw = config::parse_quantity(bw_text);
            if (!bw || *bw == 0) {
                std::cerr << "ferry-bench: --bandwidths: '" << bw_text << "' is not a non-zero quantity\n";
                return 2;
            }
            for (auto& strategy : split(o.strategies)) {
                for (int rep = 0; rep < o.reps; ++rep) {
                    LocalSetup s;
                    s.node.node.name = "bench";
                    s.node.node.accel = "tcg";
                    s.node.migration.bandwidth_per_migration = *bw;
                    s.node.migration.max_downtime_ms = o.max_downtime_ms;
                    s.node.migration.progress_timeout = 0;
                    s.node.migration.completion_timeout_per_gib = o.completion_timeout_per_gib;
                    s.node.migration.allow_auto_converge = strategy == "ferry-throttle";
                    s.node.migration.allow_post_copy = strategy.rfind("ferry-postcopy", 0) == 0;
                    s.node.migration.postcopy_preempt = strategy == "ferry-postcopy";
                    s.spec.name = "bench";
                    s.spec.memory = *mem;
                    s.spec.kernel = o.kernel;
                    s.spec.append = fmt::format("ws={} rate={} hb=50 stride={}", o.ws_mib, rate, o.stride);
                    s.qemu_auto_converge = strategy == "qemu-autoconverge";
                    s.qemu_postcopy_after_syncs = strategy == "qemu-postcopy" ? 4 : 0; // ferry's switches at about 5
                    s.time_limit = limit;
                    s.keep_failures = true;
                    std::filesystem::remove_all(o.work_dir);
                    std::filesystem::create_directories(o.work_dir);
                    s.work_dir = o.work_dir;
                    bool qemu = strategy.rfind("qemu", 0) == 0;
                    auto r = qemu ? run_one(run_qemu_direct, s) : run_one(run_ferry, s);
                    if (!r) {
                        std::cerr << "ferry-bench: " << strategy << ": " << r.error().message << "\n";
                        return 1;
                    }
                    bool ok = r->outcome == "succeeded";
                    // The aim: the first pass plus the working set once more,
                    // at the bandwidth.
                    double aim_ms = (r->first_pass_mib + o.ws_mib) * (1 << 20) / static_cast<double>(*bw) * 1000.0;
                    json row{{"dirty_mib_s", std::stoi(rate)},
                             {"bandwidth", *bw},
                             {"strategy", strategy},
                             {"outcome", r->outcome},
                             {"mode", r->mode},
                             {"total_ms", ok ? json(r->total_ms) : json(nullptr)},
                             {"wall_ms", r->wall_ms},
                             {"downtime_ms", ok ? json(r->downtime_ms) : json(nullptr)},
                             {"blackout_ms", ok && r->blackout_ms ? json(*r->blackout_ms) : json(nullptr)},
                             {"sent_mib", r->transferred_mib},
                             {"first_pass_mib", r->first_pass_mib},
                             {"aim_ms", r->first_pass_mib > 0 ? json(aim_ms) : json(nullptr)},
                             {"total_over_aim", ok && r->first_pass_mib > 0 ? json(r->total_ms / aim_ms) : json(nullptr)},
                             {"max_throttle_percent", r->throttle_percent}};
                    rows.push_back(row);
                    if (!o.json)
                        std::cerr << fmt::format("  dirty {} MiB/s, bandwidth {}/s, {}: {}\n", rate, bw_text, strategy,
                                                 r->outcome);
                }
            }
        }
    }
    if (!std::getenv("FERRY_BENCH_KEEP")) // keep the last run's logs to look at
        std::filesystem::remove_all(o.work_dir);
    json report{{"scenario", "convergence"},
                {"vm", {{"memory", *mem}, {"ws_mib", o.ws_mib}, {"accel", "tcg"}}},
                {"completion_limit_s", limit.count()},
                {"max_downtime_ms", o.max_downtime_ms},
                {"runs", rows}};
    if (o.json) {
        std::cout << report.dump(2) << "\n";
        return 0;
    }
    auto num = [](const json& v) { return v.is_null() ? std::string("-") : fmt::format("{:.0f}", v.get<double>()); };
    std::cout << fmt::format("\nferry-bench convergence: {} VM, {} MiB working set, same node, completion limit {} s, "
                             "max downtime {} ms\n",
                             o.memory, o.ws_mib, limit.count(), o.max_downtime_ms);
    std::cout << fmt::format("{:>6} {:>9} {:<18} {:<18} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>7}\n", "dirty",
                             "bandwidth", "strategy", "outcome", "total ms", "wall ms", "downtime", "blackout",
                             "sent MiB", "throttle", "x aim");
    auto ratio = [](const json& v) { return v.is_null() ? std::string("-") : fmt::format("{:.2f}", v.get<double>()); };
    for (auto& r : rows)
        std::cout << fmt::format("{:>6} {:>9} {:<18} {:<18} {:>9} {:>9.0f} {:>9} {:>9} {:>8.0f} {:>8}% {:>7}\n",
                                 fmt::format("{}M", r["dirty_mib_s"].get<int>()),
                                 fmt::format("{}M", r["bandwidth"].get<std::uint64_t>() >> 20), r["strategy"].get<std::string>(),
                                 short_outcome(r["outcome"]) + (r["mode"] == "postcopy" ? "*" : ""), num(r["total_ms"]),
                                 r["wall_ms"].get<double>(), num(r["downtime_ms"]), num(r["blackout_ms"]),
                                 r["sent_mib"].get<double>(), r["max_throttle_percent"].get<int>(),
                                 ratio(r["total_over_aim"]));
    std::cout << "* post-copy. dirty: the guest's rate per second of CPU time; wall: request to end.\n"
                 "x aim: total time over (first-pass bytes + working set) / bandwidth; the aims are 1.3 for post-copy, "
                 "2 for auto-converge.\n";
    return 0;
}

} // namespace ferry::bench
