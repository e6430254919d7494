#include "scheduler.hpp"

#include "stats.hpp"

#include "scheduler/placement.hpp"
#include "scheduler/queue.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <iostream>
#include <map>
#include <random>
#include <sys/resource.h>

namespace ferry::bench {

namespace {

using scheduler::NodeView;
using scheduler::VmView;

struct Cluster {
    std::vector<NodeView> nodes;
    std::vector<VmView> vms;
    std::map<std::string, std::size_t> vm_index;
    std::map<std::string, std::size_t> node_index;
};

// Nodes of 256 GiB and 64 CPUs in four zones; the first node holds
// `drain_vms` VMs, the rest are spread over the others at random. A tenth of
// the VMs ask for a zone, a twentieth for the host's CPU model.
Cluster make_cluster(const SchedulerOptions& o, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    Cluster c;
    for (int i = 0; i < o.nodes; ++i) {
        NodeView n;
        n.name = fmt::format("node-{:04}", i);
        n.memory = 256ULL << 30;
        n.cpus = 64;
        n.host_cpu = i % 2 ? "EPYC-Milan" : "EPYC-Rome";
        n.cpu_models = {"qemu64", "EPYC", n.host_cpu};
        n.machine_types = {"pc-i440fx-7.2", "pc-q35-7.2"};
        n.qemu_version = "7.2.0";
        n.labels = {{"zone", fmt::format("zone-{}", i % 4)}};
        c.node_index[n.name] = c.nodes.size();
        c.nodes.push_back(std::move(n));
    }
    const std::uint64_t sizes[] = {1ULL << 30, 2ULL << 30, 4ULL << 30, 8ULL << 30};
    const std::int64_t cpus[] = {1, 2, 4};
    for (int i = 0; i < o.vms; ++i) {
        VmView v;
        v.name = fmt::format("vm-{:05}", i);
        auto node = i < o.drain_vms ? 0 : 1 + rng() % static_cast<std::uint64_t>(o.nodes - 1);
        v.node = c.nodes[node].name;
        v.memory = sizes[rng() % 4];
        v.cpus = cpus[rng() % 3];
        v.machine_type = "pc-i440fx-7.2";
        v.labels = {{"app", fmt::format("app-{}", i % 50)}};
        if (i % 10 == 0)
            v.node_selector = {{"zone", fmt::format("zone-{}", rng() % 4)}};
        if (i % 20 == 0) {
            v.cpu_model = "host";
            v.host_cpu = c.nodes[node].host_cpu;
        }
        c.nodes[node].memory_committed += v.memory;
        c.nodes[node].cpus_committed += v.cpus;
        c.vm_index[v.name] = c.vms.size();
        c.vms.push_back(std::move(v));
    }
    return c;
}

void commit(Cluster& c, const VmView& vm, const std::string& target) {
    auto& n = c.nodes[c.node_index.at(target)];
    n.memory_committed += vm.memory;
    n.cpus_committed += vm.cpus;
}

struct DrainResult {
    double ms = 0;
    int placed = 0, unplaceable = 0;
};

// The drain plan: node-0000 draining, each of its VMs placed in turn,
// counting the ones already placed.
DrainResult plan_drain(Cluster c, const SchedulerOptions& o) {
    c.nodes[0].state = scheduler::NodeState::draining;
    DrainResult r;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < o.drain_vms; ++i) {
        auto& vm = c.vms[static_cast<std::size_t>(i)];
        auto p = scheduler::place(vm, c.nodes, {}, false, 1); // the best is all a plan needs
        if (!p.fits()) {
            ++r.unplaceable;
            continue;
        }
        commit(c, vm, p.ranked.front().node);
        ++r.placed;
    }
    r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return r;
}

struct QueueResult {
    double place_ms = 0; // every queued migration placed and started
    double blocked_ms = 0; // one next() on the full queue under the default limits
    int started = 0;
};

QueueResult place_queue(Cluster c, const SchedulerOptions& o, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    scheduler::Queue q;
    scheduler::Queue full;
    for (int i = 0; i < o.queued; ++i) {
        auto& vm = c.vms[static_cast<std::size_t>(o.drain_vms) + rng() % static_cast<std::uint64_t>(o.vms - o.drain_vms)];
        scheduler::Request r{fmt::format("m-{:05}", i), vm.name, vm.node, "",
                             static_cast<scheduler::Priority>(i % 3)};
        (void)full.push(r);
        if (!q.push(std::move(r)))
            --i; // the same VM twice: draw again
    }
    scheduler::InFlight running;
    const scheduler::InFlight* in_flight = &running; // what the queue counts now
    std::int64_t min_inbound = 1 << 20;               // the inbound limit in force
    auto placer = [&](const scheduler::Request& r) -> Result<std::vector<std::string>> {
        auto& vm = c.vms[c.vm_index.at(r.vm)];
        // As the planner asks: the best (in flight / inbound limit + 1) nodes, one of which has room.
        auto p = scheduler::place(vm, c.nodes, {}, false, static_cast<std::size_t>(in_flight->total() / min_inbound) + 1);
        if (!p.fits())
            return make_error(Errc::conflict, scheduler::place(vm, c.nodes).why_none(r.vm));
        std::vector<std::string> names;
        for (auto& cand : p.ranked)
            names.push_back(cand.node);
        return names;
    };
    QueueResult r;
    scheduler::Limits limits{1 << 20, 1 << 20, 1 << 20, {}}; // time the placement, not the waiting
    auto t0 = std::chrono::steady_clock::now();
    r.started = static_cast<int>(q.start_all(running, limits, placer, [&](const scheduler::Start& s) {
        commit(c, c.vms[c.vm_index.at(s.request.vm)], s.target);
    }));
    r.place_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

    // The default limits with five running: a slot frees, the planner asks.
    scheduler::InFlight busy;
    for (int i = 0; i < 5; ++i)
        busy.add(c.nodes[static_cast<std::size_t>(1 + i)].name, c.nodes[static_cast<std::size_t>(10 + i)].name);
    in_flight = &busy;
    min_inbound = scheduler::Limits{}.inbound_per_node;
    t0 = std::chrono::steady_clock::now();
    (void)full.next(busy, scheduler::Limits{}, placer);
    r.blocked_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return r;
}

long peak_rss_kib() {
    rusage u{};
    ::getrusage(RUSAGE_SELF, &u);
    return u.ru_maxrss;
}

} // namespace

int run_scheduler_bench(const SchedulerOptions& o) {
    if (o.nodes < 2 || o.vms <= o.drain_vms || o.queued > o.vms - o.drain_vms) {
        std::cerr << "ferry-bench scheduler: need --nodes >= 2, --vms > --drain-vms, --queued <= --vms - --drain-vms\n";
        return 2;
    }
    auto t0 = std::chrono::steady_clock::now();
    auto cluster = make_cluster(o, 42);
    double build_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::vector<double> drain, queue, blocked;
    DrainResult d;
    QueueResult q;
    for (int i = 0; i < o.reps; ++i) {
        d = plan_drain(cluster, o);
        q = place_queue(cluster, o, 7 + static_cast<std::uint64_t>(i));
        drain.push_back(d.ms);
        queue.push_back(q.place_ms);
        blocked.push_back(q.blocked_ms);
    }
    auto rss = peak_rss_kib();
    if (o.json) {
        nlohmann::json j{{"nodes", o.nodes},
                         {"vms", o.vms},
                         {"reps", o.reps},
                         {"build_ms", build_ms},
                         {"drain", {{"vms", o.drain_vms}, {"placed", d.placed}, {"unplaceable", d.unplaceable},
                                    {"ms", drain}, {"median_ms", median(drain)}}},
                         {"queue", {{"migrations", o.queued}, {"started", q.started}, {"ms", queue},
                                    {"median_ms", median(queue)}, {"blocked_next_ms", blocked},
                                    {"blocked_next_median_ms", median(blocked)}}},
                         {"peak_rss_kib", rss}};
        std::cout << j.dump(2) << "\n";
        return 0;
    }
    fmt::print("ferry-bench scheduler: {} nodes, {} VMs, median of {} (aim: below 100 ms each)\n", o.nodes, o.vms,
               o.reps);
    fmt::print("  drain plan of a {}-VM node:         {:8.2f} ms  ({} placed, {} with no node)\n", o.drain_vms,
               median(drain), d.placed, d.unplaceable);
    fmt::print("  place {} queued migrations:        {:8.2f} ms  ({} started)\n", o.queued, median(queue), q.started);
    fmt::print("  next() on {} waiting, limits full: {:8.3f} ms\n", o.queued, median(blocked));
    fmt::print("  cluster model built in {:.1f} ms; peak RSS {:.1f} MiB\n", build_ms, rss / 1024.0);
    return 0;
}

} // namespace ferry::bench
