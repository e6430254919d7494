// ferry-bench: end-to-end benchmarks against real QEMU.
//   ferry-bench local   same-node migration: ferry's engine vs QEMU's own path
#include "common/log.hpp"
#include "config/quantity.hpp"
#include "convergence.hpp"
#include "local.hpp"
#include "report.hpp"
#include "block.hpp"
#include "scheduler.hpp"
#include "stats.hpp"
#include "transport.hpp"

#include <CLI/CLI.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>

using nlohmann::json;

namespace {
using ferry::bench::median;

template <class F> ferry::Result<ferry::bench::Sample> run_one(F f, ferry::bench::LocalSetup setup) {
    boost::asio::io_context io;
    auto fut = boost::asio::co_spawn(io, f(std::move(setup)), boost::asio::use_future);
    io.run();
    return fut.get();
}

// Where --report writes, and the invocation it records.
struct ReportOut {
    std::string dir; // empty: no report
    int argc = 0;
    char** argv = nullptr;
};

int write_report(const ReportOut& out, const ferry::bench::Report& report, bool quiet) {
    if (auto w = ferry::bench::write_report(out.dir, report); !w) {
        std::cerr << "ferry-bench: --report: " << w.error().message << "\n";
        return 1;
    }
    if (!quiet)
        std::cerr << "ferry-bench: report in " << out.dir << "/index.html\n";
    return 0;
}

json column(const std::vector<ferry::bench::Sample>& samples) {
    std::vector<double> wall, total, down, black, mib;
    for (auto& s : samples) {
        wall.push_back(s.wall_ms);
        total.push_back(s.total_ms);
        down.push_back(s.downtime_ms);
        mib.push_back(s.transferred_mib);
        if (s.blackout_ms)
            black.push_back(*s.blackout_ms);
    }
    auto j = [](std::vector<double> v) {
        auto s = ferry::bench::spread(std::move(v));
        return json{{"mean", s.mean}, {"median", s.median}, {"min", s.min}, {"max", s.max}};
    };
    return {{"runs", samples.size()},  {"wall_ms", j(wall)},
            {"total_ms", j(total)},    {"downtime_ms", j(down)},
            {"blackout_ms", j(black)}, {"transferred_mib", j(mib)}};
}

int run_transport_bench(const std::string& work, const std::string& ram, const std::string& paths_csv, int reps,
                        int multifd, const std::string& guest, const std::string& certs, bool json_out,
                        const ReportOut& report_out) {
    auto bytes = ferry::config::parse_quantity(ram);
    if (!bytes) {
        std::cerr << "ferry-bench: --ram: " << bytes.error().message << "\n";
        return 2;
    }
    ferry::bench::TransportSetup setup;
    setup.work_dir = work;
    setup.build_dir = std::filesystem::canonical("/proc/self/exe").parent_path().parent_path().string();
    setup.ram_bytes = *bytes;
    setup.multifd = multifd;
    setup.guest_running = guest == "running";
    setup.qemu_certs = certs;
    std::filesystem::create_directories(work);
    if (auto r = ferry::bench::make_ram_image(work + "/ram.img", *bytes); !r) {
        std::cerr << "ferry-bench: " << r.error().message << "\n";
        return 1;
    }
    std::vector<std::string> paths;
    std::stringstream ss(paths_csv);
    for (std::string p; std::getline(ss, p, ',');)
        paths.push_back(p);
    std::map<std::string, std::vector<ferry::bench::TransportSample>> samples;
    std::vector<ferry::bench::ReportRun> runs; // in the order they ran
    for (int i = 0; i < reps; ++i) {
        for (auto& p : paths) { // interleaved, so drift hits every path alike
            auto r = ferry::bench::run_transport(setup, p);
            if (!r) {
                std::cerr << "ferry-bench: " << p << " run " << i + 1 << " failed: " << r.error().message << "\n";
                return 1;
            }
            if (!json_out)
                std::cerr << fmt::format("  run {}/{} {:<12} {:7.1f} MiB/s  ({:.0f} MiB in {:.0f} ms, downtime {:.0f} ms)\n",
                                         i + 1, reps, p, r->mib_per_s, r->transferred_mib, r->total_ms, r->downtime_ms);
            if (!report_out.dir.empty())
                runs.push_back({p, i + 1,
                                {{"mib_per_s", r->mib_per_s}, {"total_ms", r->total_ms}, {"downtime_ms", r->downtime_ms},
                                 {"transferred_mib", r->transferred_mib}},
                                r->series});
            samples[p].push_back(*r);
        }
    }
    json report{{"scenario", "transport"}, {"ram_bytes", *bytes}, {"multifd", multifd}, {"reps", reps},
                {"guest", guest}, {"qemu_certs", certs}};
    std::map<std::string, double> med;
    for (auto& [p, list] : samples) {
        std::vector<double> rates, downs;
        for (auto& s : list) {
            rates.push_back(s.mib_per_s);
            downs.push_back(s.downtime_ms);
        }
        med[p] = median(rates);
        report["paths"][p] = {{"mib_per_s_median", med[p]}, {"mib_per_s", rates}, {"downtime_ms_median", median(downs)}};
    }
    auto ratio = [&](const std::string& a, const std::string& b) {
        return med.count(a) && med.count(b) && med[b] > 0 ? med[a] / med[b] : 0.0;
    };
    report["ratios"] = {{"ferry_tls_over_qemu_tls", ratio("ferry-tls", "qemu-tls")},
                        {"ferry_tls_over_qemu_tcp", ratio("ferry-tls", "qemu-tcp")},
                        {"ferry_plain_over_qemu_tcp", ratio("ferry-plain", "qemu-tcp")}};
    std::string title = fmt::format("{} of non-zero guest RAM, guest {}, QEMU TLS with {} certificates, {} runs per path",
                                    ram, guest, certs == "rsa" ? "RSA-2048" : "P-256", reps);
    if (!report_out.dir.empty()) {
        ferry::bench::Report rep;
        rep.scenario = "transport";
        rep.title = title;
        rep.environment = ferry::bench::environment(ferry::config::NodeSection{}.qemu, report_out.argc, report_out.argv);
        rep.parameters = {{"ram", ram}, {"ram_bytes", *bytes}, {"guest", guest}, {"qemu_certs", certs},
                          {"multifd", multifd}, {"reps", reps}, {"paths", paths_csv}};
        rep.paths = paths;
        rep.metrics = {{"mib_per_s", "Throughput", "MiB/s"},
                       {"total_ms", "QEMU total time", "ms"},
                       {"downtime_ms", "Downtime", "ms"},
                       {"transferred_mib", "Transferred", "MiB"}};
        rep.runs = std::move(runs);
        for (auto [key, label, a, b] : std::vector<std::tuple<const char*, const char*, const char*, const char*>>{
                 {"ferry_tls_over_qemu_tls", "ferry TLS / QEMU TLS (MiB/s)", "ferry-tls", "qemu-tls"},
                 {"ferry_tls_over_qemu_tcp", "ferry TLS / QEMU TCP (MiB/s)", "ferry-tls", "qemu-tcp"},
                 {"ferry_plain_over_qemu_tcp", "ferry plain / QEMU TCP (MiB/s)", "ferry-plain", "qemu-tcp"}})
            if (med.count(a) && med.count(b))
                rep.ratios.push_back({key, label, ratio(a, b)});
        if (int rc = write_report(report_out, rep, json_out); rc != 0)
            return rc;
    }
    if (json_out) {
        std::cout << report.dump(2) << "\n";
        return 0;
    }
    std::cout << fmt::format("\nferry-bench transport: {} (median MiB/s)\n", title);
    for (auto& p : paths)
        std::cout << fmt::format("  {:<12} {:8.1f} MiB/s\n", p, med[p]);
    std::cout << fmt::format("  ferry TLS / QEMU TLS    {:.2f}x   (aim >= 3)\n", ratio("ferry-tls", "qemu-tls"));
    std::cout << fmt::format("  ferry TLS / QEMU TCP    {:.2f}x   (aim >= 0.8)\n", ratio("ferry-tls", "qemu-tcp"));
    std::cout << fmt::format("  ferry plain / QEMU TCP  {:.2f}x\n", ratio("ferry-plain", "qemu-tcp"));
    return 0;
}

int run_postcopy_bench(const std::string& work, int reps, const std::string& bandwidth, const std::string& memory,
                       int ws, int rate, int stride, bool json_out) {
    auto bw = ferry::config::parse_quantity(bandwidth);
    if (!bw || *bw == 0) {
        std::cerr << "ferry-bench: --bandwidth: not a non-zero quantity\n";
        return 2;
    }
    ferry::bench::TransportSetup setup;
    setup.work_dir = work;
    setup.build_dir = std::filesystem::canonical("/proc/self/exe").parent_path().parent_path().string();
    std::map<bool, std::vector<ferry::bench::PostcopySample>> samples;
    for (int i = 0; i < reps; ++i) {
        for (bool preempt : {true, false}) { // interleaved
            auto r = ferry::bench::run_postcopy(setup, preempt, *bw, memory, ws, rate, stride);
            if (!r) {
                std::cerr << "ferry-bench: postcopy (preempt " << (preempt ? "on" : "off") << ") run " << i + 1
                          << " failed: " << r.error().message << "\n";
                return 1;
            }
            if (!json_out)
                std::cerr << fmt::format("  run {}/{} preempt {:<3} total {:.0f} ms, blackout {} ms, worst stall {:.0f} ms, "
                                         "stalled {:.0f} ms\n",
                                         i + 1, reps, preempt ? "on" : "off", r->total_ms,
                                         r->blackout_ms ? fmt::format("{:.0f}", *r->blackout_ms) : "-", r->worst_stall_ms,
                                         r->stalled_ms);
            samples[preempt].push_back(*r);
        }
    }
    json report{{"scenario", "postcopy"}, {"bandwidth", *bw}, {"memory", memory}, {"ws_mib", ws},
                {"rate", rate},       {"stride", stride}, {"reps", reps}};
    for (auto& [preempt, list] : samples) {
        std::vector<double> total, black, worst, stalled;
        for (auto& s : list) {
            total.push_back(s.total_ms);
            if (s.blackout_ms)
                black.push_back(*s.blackout_ms);
            worst.push_back(s.worst_stall_ms);
            stalled.push_back(s.stalled_ms);
        }
        report[preempt ? "preempt" : "no_preempt"] = {{"total_ms_median", median(total)},
                                                      {"blackout_ms_median", median(black)},
                                                      {"worst_stall_ms_median", median(worst)},
                                                      {"stalled_ms_median", median(stalled)}};
    }
    if (json_out) {
        std::cout << report.dump(2) << "\n";
        return 0;
    }
    std::cout << fmt::format("\nferry-bench postcopy: two ferryd over TLS, {} VM, {} MiB dirtied at {} MiB/s (stride {}), "
                             "{}/s, {} runs each (medians)\n",
                             memory, ws, rate, stride, bandwidth, reps);
    std::cout << fmt::format("  {:<12} {:>9} {:>9} {:>12} {:>11}\n", "preempt", "total ms", "blackout", "worst stall",
                             "stalled ms");
    for (const char* k : {"preempt", "no_preempt"}) {
        auto& r = report[k];
        std::cout << fmt::format("  {:<12} {:>9.0f} {:>9.0f} {:>12.0f} {:>11.0f}\n", std::string(k) == "preempt" ? "on" : "off",
                                 r["total_ms_median"].get<double>(), r["blackout_ms_median"].get<double>(),
                                 r["worst_stall_ms_median"].get<double>(), r["stalled_ms_median"].get<double>());
    }
    std::cout << "worst stall / stalled: on the destination, heartbeat gaps beyond the interval after the switchover "
                 "(the guest waiting for pages).\n";
    return 0;
}

int run_shaping_bench(const std::string& work, const std::string& rate, const std::string& cap, const std::string& ram,
                      bool json_out) {
    auto r = ferry::config::parse_quantity(rate);
    auto c = ferry::config::parse_quantity(cap);
    auto m = ferry::config::parse_quantity(ram);
    if (!r || !c || !m) {
        std::cerr << "ferry-bench: bad --rate, --cap or --ram\n";
        return 2;
    }
    ferry::bench::TransportSetup setup;
    setup.work_dir = work;
    setup.build_dir = std::filesystem::canonical("/proc/self/exe").parent_path().parent_path().string();
    setup.ram_bytes = *m;
    std::filesystem::create_directories(work);
    if (auto img = ferry::bench::make_ram_image(work + "/ram.img", *m); !img) {
        std::cerr << "ferry-bench: " << img.error().message << "\n";
        return 1;
    }
    auto report = ferry::bench::run_shaping(setup, *r, *c);
    if (!report) {
        std::cerr << "ferry-bench: " << report.error().message << "\n";
        return 1;
    }
    double mib = 1 << 20;
    json j{{"scenario", "shaping"},
           {"single", {{"configured_mib_s", *r / mib}, {"achieved_mib_s", report->single.mib_per_s}}},
           {"node_cap_mib_s", *c / mib}};
    for (auto& t : report->concurrent)
        j["concurrent_achieved_mib_s"].push_back(t.mib_per_s);
    if (json_out) {
        std::cout << j.dump(2) << "\n";
        return 0;
    }
    std::cout << fmt::format("ferry-bench shaping ({} of guest RAM per VM, over TLS)\n", ram);
    std::cout << fmt::format("  one migration, bandwidth_per_migration {:.1f} MiB/s: achieved {:.1f} MiB/s ({:.0f}%)\n",
                             *r / mib, report->single.mib_per_s, 100 * report->single.mib_per_s / (*r / mib));
    std::cout << fmt::format("  two migrations under a node cap of {:.1f} MiB/s:", *c / mib);
    double sum = 0;
    for (auto& t : report->concurrent) {
        std::cout << fmt::format(" {:.1f}", t.mib_per_s);
        sum += t.mib_per_s;
    }
    std::cout << fmt::format(" MiB/s (sum {:.1f}, fair share {:.1f} each)\n", sum, *c / mib / 2);
    return 0;
}

} // namespace

int main(int argc, char** argv) {
    CLI::App app{"ferry-bench: end-to-end migration benchmarks against real QEMU"};
    app.require_subcommand(1);
    std::string work = "/tmp/ferry-bench";
    auto* local = app.add_subcommand("local", "same-node live migration: ferry's engine vs plain QEMU migrate");
    int reps = 3;
    std::string memory = "512Mi", bandwidth = "0", accel = "tcg", qemu = "qemu-system-x86_64";
    int ws = 256, rate = 8, hb = 50, downtime = 300;
    bool json_out = false;
    std::string kernel;
    local->add_option("--reps", reps, "repetitions of each path")->check(CLI::PositiveNumber);
    local->add_option("--memory", memory, "VM memory");
    local->add_option("--ws", ws, "guest working set, MiB of non-zero memory");
    local->add_option("--rate", rate, "guest dirty rate, MiB/s");
    local->add_option("--hb", hb, "guest heartbeat interval, ms");
    local->add_option("--bandwidth", bandwidth, "per-migration bandwidth (0 = unlimited)");
    local->add_option("--max-downtime", downtime, "downtime limit, ms");
    local->add_option("--accel", accel, "QEMU accelerator");
    local->add_option("--qemu", qemu, "QEMU binary");
    local->add_option("--kernel", kernel, "test guest kernel (default: next to this binary)");
    local->add_option("--work-dir", work, "scratch directory (short path: Unix sockets)");
    local->add_flag("--json", json_out, "print the report as JSON");
    ReportOut report_out{"", argc, argv};
    local->add_option("--report", report_out.dir,
                      "also write a report directory: environment, every sample, summary, index.html with charts");
    auto* xfer = app.add_subcommand("transport", "throughput: QEMU TCP, QEMU TLS, ferry TLS, ferry plaintext");
    int xfer_reps = 3, xfer_multifd = 0;
    std::string xfer_ram = "1Gi", xfer_paths = "qemu-tcp,qemu-tls,ferry-tls,ferry-plain";
    bool xfer_json = false;
    xfer->add_option("--reps", xfer_reps, "repetitions of each path")->check(CLI::PositiveNumber);
    xfer->add_option("--ram", xfer_ram, "non-zero guest RAM to move (at least 1Gi for the report)");
    xfer->add_option("--paths", xfer_paths, "comma-separated subset of the paths");
    xfer->add_option("--multifd", xfer_multifd, "multifd channels on the ferry paths");
    std::string xfer_guest = "running", xfer_certs = "rsa";
    xfer->add_option("--guest", xfer_guest, "running (as a user migrates it) or paused before the migration, every path")
        ->check(CLI::IsMember({"running", "paused"}));
    xfer->add_option("--qemu-certs", xfer_certs,
                     "QEMU TLS path's certificates: rsa (RSA-2048 from openssl req, as QEMU's docs make them) or p256 "
                     "(ferry's own kind)")
        ->check(CLI::IsMember({"rsa", "p256"}));
    xfer->add_option("--work-dir", work, "scratch directory (short path)");
    xfer->add_flag("--json", xfer_json, "print the report as JSON");
    xfer->add_option("--report", report_out.dir,
                     "also write a report directory: environment, every sample, summary, index.html with charts");
    auto* shaping = app.add_subcommand("shaping", "achieved vs configured rate; a node cap split between two migrations");
    std::string shape_rate = "32Mi", shape_cap = "48Mi", shape_ram = "256Mi";
    bool shape_json = false;
    shaping->add_option("--rate", shape_rate, "bandwidth_per_migration for the single migration");
    shaping->add_option("--cap", shape_cap, "max_migration_bandwidth for the two concurrent ones");
    shaping->add_option("--ram", shape_ram, "non-zero guest RAM per VM");
    shaping->add_option("--work-dir", work, "scratch directory (short path)");
    shaping->add_flag("--json", shape_json, "print the report as JSON");
    auto* blk = app.add_subcommand("block", "disk copy on this machine: QEMU's blockdev-mirror into NBD vs ferry's mirror");
    ferry::bench::BlockOptions blk_opts;
    blk->add_option("--size", blk_opts.size, "virtual disk size");
    blk->add_option("--images", blk_opts.images, "comma-separated: full (raw, random data), tenth (raw, 10% data), qcow2");
    blk->add_option("--paths", blk_opts.paths, "comma-separated: qemu-mirror, ferry (Unix sockets), qemu-mirror-tls (QEMU NBD TLS over TCP), ferry-tls (ferry's TLS channel), target-alone (qemu-img writing straight into the target's NBD export: the ceiling for qcow2)");
    blk->add_option("--reps", blk_opts.reps, "repetitions of each path")->check(CLI::PositiveNumber);
    blk->add_option("--work-dir", blk_opts.work_dir, "scratch directory (short path; needs 3x --size free)");
    blk->add_flag("--json", blk_opts.json, "print the report as JSON");
    auto* conv = app.add_subcommand("convergence", "dirty rate x bandwidth x strategy: ferry's strategies and QEMU's auto-converge");
    ferry::bench::ConvergenceOptions conv_opts;
    conv->add_option("--memory", conv_opts.memory, "VM memory");
    conv->add_option("--ws", conv_opts.ws_mib, "guest working set, MiB");
    conv->add_option("--stride", conv_opts.stride, "the guest's sweep stride (1: in order; e.g. 4099: scattered)");
    conv->add_option("--rates", conv_opts.rates, "guest dirty rates, MiB/s, comma-separated");
    conv->add_option("--bandwidths", conv_opts.bandwidths, "bandwidths, comma-separated (16Mi,...)");
    conv->add_option("--strategies", conv_opts.strategies,
                     "ferry-none, ferry-throttle, ferry-postcopy, ferry-postcopy-nopreempt, qemu-autoconverge, qemu-postcopy, qemu-none");
    conv->add_option("--completion-timeout-per-gib", conv_opts.completion_timeout_per_gib,
                     "seconds per GiB before a run gives up");
    conv->add_option("--max-downtime", conv_opts.max_downtime_ms, "downtime limit, ms");
    conv->add_option("--reps", conv_opts.reps, "repetitions of each cell")->check(CLI::PositiveNumber);
    conv->add_option("--work-dir", conv_opts.work_dir, "scratch directory (short path)");
    conv->add_flag("--json", conv_opts.json, "print the report as JSON");
    auto* pc = app.add_subcommand("postcopy", "cross-node post-copy (two ferryd over TLS): with and without the preempt channel");
    int pc_reps = 3, pc_ws = 64, pc_rate = 64, pc_stride = 1;
    std::string pc_bw = "16Mi", pc_memory = "512Mi";
    bool pc_json = false;
    pc->add_option("--reps", pc_reps, "repetitions of each")->check(CLI::PositiveNumber);
    pc->add_option("--bandwidth", pc_bw, "bandwidth_per_migration");
    pc->add_option("--memory", pc_memory, "VM memory");
    pc->add_option("--ws", pc_ws, "guest working set, MiB");
    pc->add_option("--rate", pc_rate, "guest dirty rate, MiB/s");
    pc->add_option("--stride", pc_stride, "the guest's sweep stride (1: in order; e.g. 4099: scattered)");
    pc->add_option("--work-dir", work, "scratch directory (short path)");
    pc->add_flag("--json", pc_json, "print the report as JSON");
    auto* sched = app.add_subcommand("scheduler", "the planner alone on a simulated cluster: a drain plan and a queue placed");
    ferry::bench::SchedulerOptions sched_opts;
    sched->add_option("--nodes", sched_opts.nodes, "simulated nodes")->check(CLI::Range(2, 100000));
    sched->add_option("--vms", sched_opts.vms, "simulated VMs")->check(CLI::Range(2, 1000000));
    sched->add_option("--drain-vms", sched_opts.drain_vms, "VMs on the drained node")->check(CLI::Range(1, 100000));
    sched->add_option("--queued", sched_opts.queued, "migrations queued without a target")->check(CLI::Range(1, 100000));
    sched->add_option("--reps", sched_opts.reps, "repetitions")->check(CLI::PositiveNumber);
    sched->add_flag("--json", sched_opts.json, "print the report as JSON");
    CLI11_PARSE(app, argc, argv);
    if (sched->parsed())
        return ferry::bench::run_scheduler_bench(sched_opts);

    ferry::set_log_level(std::getenv("FERRY_BENCH_LOG") ? std::getenv("FERRY_BENCH_LOG") : "warn");
    if (conv->parsed()) {
        conv_opts.kernel = (std::filesystem::canonical("/proc/self/exe").parent_path() / "guest/ferry-guest.elf").string();
        return ferry::bench::run_convergence_bench(conv_opts);
    }
    if (blk->parsed())
        return ferry::bench::run_block_bench(blk_opts);
    if (pc->parsed())
        return run_postcopy_bench(work, pc_reps, pc_bw, pc_memory, pc_ws, pc_rate, pc_stride, pc_json);
    if (shaping->parsed())
        return run_shaping_bench(work, shape_rate, shape_cap, shape_ram, shape_json);
    if (xfer->parsed())
        return run_transport_bench(work, xfer_ram, xfer_paths, xfer_reps, xfer_multifd, xfer_guest, xfer_certs,
                                   xfer_json, report_out);
    auto mem = ferry::config::parse_quantity(memory);
    auto bw = ferry::config::parse_quantity(bandwidth);
    if (!mem || !bw) {
        std::cerr << "ferry-bench: " << (!mem ? "--memory: " + mem.error().message : "--bandwidth: " + bw.error().message) << "\n";
        return 2;
    }
    if (kernel.empty())
        kernel = (std::filesystem::canonical("/proc/self/exe").parent_path() / "guest/ferry-guest.elf").string();

    ferry::bench::LocalSetup setup;
    setup.node.node.name = "bench";
    setup.node.node.accel = accel;
    setup.node.node.qemu = qemu;
    setup.node.migration.bandwidth_per_migration = *bw;
    setup.node.migration.max_downtime_ms = downtime;
    setup.node.migration.progress_timeout = 0;
    setup.spec.name = "bench";
    setup.spec.memory = *mem;
    setup.spec.kernel = kernel;
    setup.spec.append = fmt::format("ws={} rate={} hb={}", ws, rate, hb);

    std::vector<ferry::bench::Sample> direct, ferry_runs;
    std::vector<ferry::bench::ReportRun> runs; // in the order they ran
    for (int i = 0; i < reps; ++i) {
        // Alternate the two paths so drift on a shared machine hits both.
        for (int path = 0; path < 2; ++path) {
            std::filesystem::remove_all(work);
            std::filesystem::create_directories(work);
            setup.work_dir = work;
            auto r = path == 0 ? run_one(ferry::bench::run_qemu_direct, setup) : run_one(ferry::bench::run_ferry, setup);
            if (!r) {
                std::cerr << "ferry-bench: " << (path == 0 ? "QEMU direct" : "ferry") << " run " << i + 1
                          << " failed: " << r.error().message << "\n";
                return 1;
            }
            (path == 0 ? direct : ferry_runs).push_back(*r);
            if (!report_out.dir.empty()) {
                ferry::bench::ReportRun run{path == 0 ? "qemu-direct" : "ferry", i + 1,
                                            {{"wall_ms", r->wall_ms},
                                             {"total_ms", r->total_ms},
                                             {"downtime_ms", r->downtime_ms},
                                             {"transferred_mib", r->transferred_mib},
                                             {"throttle_percent", r->throttle_percent}},
                                            r->series};
                if (r->blackout_ms)
                    run.values["blackout_ms"] = *r->blackout_ms;
                runs.push_back(std::move(run));
            }
            if (!json_out)
                std::cerr << fmt::format("  run {}/{} {:<12} wall {:7.0f} ms  qemu total {:6.0f} ms  downtime {:4.0f} ms  blackout {}\n",
                                         i + 1, reps, path == 0 ? "qemu-direct" : "ferry", r->wall_ms, r->total_ms,
                                         r->downtime_ms, r->blackout_ms ? fmt::format("{:.0f} ms", *r->blackout_ms) : "-");
        }
    }
    std::filesystem::remove_all(work);

    json report{{"scenario", "local"},
                {"vm", {{"memory", *mem}, {"ws_mib", ws}, {"dirty_mib_s", rate}, {"accel", accel}}},
                {"bandwidth", *bw},
                {"qemu_direct", column(direct)},
                {"ferry", column(ferry_runs)}};
    auto ratio = [&](const char* key) {
        double d = report["qemu_direct"][key]["median"];
        double f = report["ferry"][key]["median"];
        return d > 0 ? f / d : 0.0;
    };
    for (auto key : {"wall_ms", "total_ms", "downtime_ms", "blackout_ms"})
        report["ratio_ferry_over_direct"][key] = ratio(key);
    std::string title = fmt::format("{} VM, {} MiB working set dirtied at {} MiB/s, bandwidth {}, accel {}, {} runs each",
                                    memory, ws, rate, *bw ? bandwidth + "/s" : std::string("unlimited"), accel, reps);
    if (!report_out.dir.empty()) {
        ferry::bench::Report rep;
        rep.scenario = "local";
        rep.title = title;
        rep.environment = ferry::bench::environment(qemu, argc, argv);
        rep.parameters = {{"memory", memory}, {"ws_mib", ws}, {"dirty_mib_s", rate}, {"heartbeat_ms", hb},
                          {"bandwidth", *bw ? bandwidth + "/s" : std::string("unlimited")}, {"max_downtime_ms", downtime}, {"accel", accel}, {"reps", reps}};
        rep.paths = {"qemu-direct", "ferry"};
        rep.metrics = {{"wall_ms", "Wall time", "ms"},
                       {"total_ms", "QEMU total time", "ms"},
                       {"downtime_ms", "QEMU downtime", "ms"},
                       {"blackout_ms", "Guest blackout", "ms"},
                       {"transferred_mib", "Transferred", "MiB"},
                       {"throttle_percent", "Highest throttle", "%"}};
        rep.runs = std::move(runs);
        for (auto [key, label] : std::vector<std::pair<const char*, const char*>>{
                 {"wall_ms", "ferry / qemu-direct: wall time"},
                 {"total_ms", "ferry / qemu-direct: QEMU total time"},
                 {"downtime_ms", "ferry / qemu-direct: QEMU downtime"},
                 {"blackout_ms", "ferry / qemu-direct: guest blackout"}})
            rep.ratios.push_back({std::string("ferry_over_direct.") + key, label, ratio(key)});
        if (int rc = write_report(report_out, rep, json_out); rc != 0)
            return rc;
    }
    if (json_out) {
        std::cout << report.dump(2) << "\n";
        return 0;
    }
    std::cout << fmt::format("\nferry-bench local: {}\n", title);
    std::cout << fmt::format("{:<14} {:>24} {:>24} {:>14}\n", "", "qemu-direct", "ferry", "ratio");
    std::cout << fmt::format("{:<14} {:>24} {:>24} {:>14}\n", "", "median mean (min-max)", "median mean (min-max)", "of medians");
    for (auto key : {"wall_ms", "total_ms", "downtime_ms", "blackout_ms"}) {
        auto& d = report["qemu_direct"][key];
        auto& f = report["ferry"][key];
        auto cell = [](const json& c) {
            return fmt::format("{:.0f} {:.0f} ({:.0f}-{:.0f})", c["median"].get<double>(), c["mean"].get<double>(),
                               c["min"].get<double>(), c["max"].get<double>());
        };
        std::cout << fmt::format("{:<14} {:>24} {:>24} {:>14.2f}\n", key, cell(d), cell(f), ratio(key));
    }
    std::cout << "wall_ms: request to destination running, including starting the destination QEMU.\n";
    return 0;
}
