// src/scheduler as units: policy precedence, placement filters and score,
// the queue's order and the limits it never exceeds, a drain's record.
#include "scheduler/cluster.hpp"
#include "scheduler/drain.hpp"
#include "scheduler/placement.hpp"
#include "scheduler/policy.hpp"
#include "scheduler/queue.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <random>
#include <set>

using namespace ferry::scheduler;

namespace {
constexpr std::uint64_t gib = 1ULL << 30;

std::string joined(const std::vector<std::string>& v) {
    std::string s;
    for (auto& x : v)
        s += (s.empty() ? "" : " | ") + x;
    return s;
}
} // namespace

// --- policies -------------------------------------------------------------------

TEST(Policy, MostMatchingLabelsWinsThenTheFirstName) {
    std::vector<Policy> policies{
        {"b-web", {{"app", "web"}}, {}, {}},
        {"a-web", {{"app", "web"}}, {}, {}},
        {"web-zone-a", {{"app", "web"}}, {{"zone", "a"}}, {}},
        {"db", {{"app", "db"}}, {}, {}},
        {"everything", {}, {}, {}},
    };
    auto* p = select_policy(policies, {{"app", "web"}, {"tier", "1"}}, {{"zone", "a"}});
    ASSERT_TRUE(p);
    EXPECT_EQ(p->name, "web-zone-a") << "two matching labels beat one";
    p = select_policy(policies, {{"app", "web"}}, {{"zone", "b"}});
    ASSERT_TRUE(p);
    EXPECT_EQ(p->name, "a-web") << "equal counts: the first by name";
    p = select_policy(policies, {{"app", "cache"}}, {});
    ASSERT_TRUE(p);
    EXPECT_EQ(p->name, "everything") << "an empty selector matches anything";
    policies.pop_back();
    EXPECT_EQ(select_policy(policies, {{"app", "cache"}}, {}), nullptr);
    EXPECT_EQ(select_policy(policies, {{"app", "Web"}}, {}), nullptr) << "values match exactly";
}

TEST(Policy, TheRequestBeatsThePolicyWhichBeatsTheDefaults) {
    ferry::config::MigrationConfig defaults;
    defaults.bandwidth_per_migration = 64 << 20;
    defaults.max_downtime_ms = 300;
    defaults.allow_post_copy = false;
    defaults.parallel_outbound_migrations_per_node = 2;
    defaults.disable_tls = false;
    Policy p{"fast", {}, {}, {}};
    p.settings.bandwidth_per_migration = 0;
    p.settings.max_downtime_ms = 500;
    p.settings.allow_post_copy = true;
    MigrationSettings request;
    request.max_downtime_ms = 100;
    auto c = resolve(defaults, &p, request);
    EXPECT_EQ(c.bandwidth_per_migration, 0u) << "the policy's";
    EXPECT_EQ(c.max_downtime_ms, 100) << "the request's";
    EXPECT_TRUE(c.allow_post_copy);
    EXPECT_EQ(c.progress_timeout, defaults.progress_timeout) << "unset: the default";
    EXPECT_EQ(c.parallel_outbound_migrations_per_node, 2) << "limits stay the node's";
    EXPECT_FALSE(c.disable_tls);
    auto plain = resolve(defaults, nullptr, {});
    EXPECT_EQ(plain.bandwidth_per_migration, defaults.bandwidth_per_migration);
}

TEST(Policy, ResolveForUsesTheVmsLabelsAndThisNodesLabels) {
    ferry::config::NodeConfig node;
    node.node.labels = {{"zone", "a"}};
    node.migration.max_downtime_ms = 300;
    node.policies = {Policy{"db-in-b", {{"tier", "db"}}, {{"zone", "b"}}, {}},
                     Policy{"db", {{"tier", "db"}}, {}, {}}};
    node.policies[0].settings.max_downtime_ms = 50;
    node.policies[1].settings.max_downtime_ms = 120;
    auto r = resolve_for(node, {{"tier", "db"}}, {});
    ASSERT_NE(r.policy, nullptr);
    EXPECT_EQ(r.policy->name, "db") << "db-in-b needs a node labelled zone=b";
    EXPECT_EQ(r.config.max_downtime_ms, 120);
    node.node.labels["zone"] = "b";
    r = resolve_for(node, {{"tier", "db"}}, {});
    EXPECT_EQ(r.policy->name, "db-in-b") << "more matching labels";
    MigrationSettings request;
    request.max_downtime_ms = 10;
    EXPECT_EQ(resolve_for(node, {{"tier", "db"}}, request).config.max_downtime_ms, 10);
    r = resolve_for(node, {{"tier", "web"}}, {});
    EXPECT_EQ(r.policy, nullptr);
    EXPECT_EQ(r.config.max_downtime_ms, 300);
}

// --- placement ------------------------------------------------------------------

namespace {
NodeView node(const std::string& name, std::uint64_t mem_gib, std::int64_t cpus, std::uint64_t used_gib = 0,
              std::int64_t cpus_used = 0) {
    NodeView n;
    n.name = name;
    n.memory = mem_gib * gib;
    n.cpus = cpus;
    n.memory_committed = used_gib * gib;
    n.cpus_committed = cpus_used;
    n.host_cpu = "Xeon 8375C";
    n.cpu_models = {"qemu64", "Skylake-Server"};
    n.machine_types = {"pc-i440fx-7.2", "pc-q35-7.2"};
    n.qemu_version = "7.2.0";
    n.labels = {{"zone", "a"}};
    return n;
}

VmView vm(std::uint64_t mem_gib = 1, std::int64_t cpus = 1) {
    VmView v;
    v.name = "web-1";
    v.node = "node-a";
    v.memory = mem_gib * gib;
    v.cpus = cpus;
    v.machine_type = "pc-i440fx-7.2";
    v.host_cpu = "Xeon 8375C";
    return v;
}

const Rejection* rejection(const Placement& p, const std::string& name) {
    for (auto& r : p.rejected)
        if (r.node == name)
            return &r;
    return nullptr;
}
} // namespace

TEST(Placement, RanksByMemoryLoadThenCpuLoadThenName) {
    std::vector<NodeView> nodes{node("node-a", 16, 8), node("node-d", 16, 8, 8), node("node-c", 16, 8, 4, 6),
                                node("node-b", 16, 8, 4, 2), node("node-e", 16, 8, 4, 2)};
    auto p = place(vm(), nodes);
    ASSERT_EQ(p.ranked.size(), 4u);
    EXPECT_EQ(p.ranked[0].node, "node-b") << "lowest memory load, lowest CPU load, first name";
    EXPECT_EQ(p.ranked[1].node, "node-e");
    EXPECT_EQ(p.ranked[2].node, "node-c") << "same memory load, more CPUs in use";
    EXPECT_EQ(p.ranked[3].node, "node-d");
    EXPECT_DOUBLE_EQ(p.ranked[0].memory_load, 5.0 / 16);
    ASSERT_TRUE(rejection(p, "node-a"));
    EXPECT_EQ(joined(rejection(p, "node-a")->reasons), "the VM runs there");
    // Only the best two, in the same order, when that is all the caller needs.
    auto top = place(vm(), nodes, {}, false, 2);
    ASSERT_EQ(top.ranked.size(), 2u);
    EXPECT_EQ(top.ranked[0].node, "node-b");
    EXPECT_EQ(top.ranked[1].node, "node-e");
    EXPECT_TRUE(top.rejected.empty()) << "explain = false formats no reasons";
}

TEST(Placement, EveryFilterSaysWhy) {
    auto full = node("node-full", 4, 8, 3, 7);
    auto cordoned = node("node-cordoned", 64, 64);
    cordoned.state = NodeState::cordoned;
    auto gone = node("node-gone", 64, 64);
    gone.state = NodeState::unreachable;
    auto zone_b = node("node-zone-b", 64, 64);
    zone_b.labels = {{"zone", "b"}};
    auto old = node("node-old", 64, 64);
    old.machine_types = {"pc-i440fx-6.2"};
    old.cpu_models = {"qemu64"};
    old.qemu_version = "6.2.0";
    std::vector<NodeView> nodes{full, cordoned, gone, zone_b, old};
    auto v = vm(2, 2);
    v.node_selector = {{"zone", "a"}};
    v.cpu_model = "Skylake-Server";
    auto p = place(v, nodes, {{"disk", "ssd"}});
    EXPECT_FALSE(p.fits());
    EXPECT_EQ(joined(rejection(p, "node-full")->reasons),
              "added selector disk=ssd: the node has no label disk | memory: needs 2Gi, 1Gi free of 4Gi | CPUs: "
              "needs 2, 1 free of 8");
    EXPECT_EQ(rejection(p, "node-cordoned")->reasons.at(0), "cordoned");
    EXPECT_EQ(rejection(p, "node-gone")->reasons.at(0), "unreachable");
    EXPECT_EQ(rejection(p, "node-zone-b")->reasons.at(0), "node_selector zone=a: the node has zone=b");
    EXPECT_EQ(joined(rejection(p, "node-old")->reasons),
              "added selector disk=ssd: the node has no label disk | CPU model Skylake-Server: its QEMU 6.2.0 does "
              "not offer it | machine type pc-i440fx-7.2: its QEMU 6.2.0 does not offer it");
    auto why = p.why_none("web-1");
    EXPECT_EQ(why.rfind("no node fits web-1: node-cordoned: cordoned", 0), 0u) << why;
}

TEST(Placement, MigrationsHeadedThereCountAndHostCpuNeedsTheSameCpu) {
    auto b = node("node-b", 8, 8, 7); // 7 GiB committed, some of it arriving
    auto c = node("node-c", 8, 8);
    c.host_cpu = "EPYC 7763";
    auto v = vm(2);
    v.cpu_model = "host";
    auto p = place(v, {b, c});
    EXPECT_FALSE(p.fits());
    EXPECT_EQ(rejection(p, "node-b")->reasons.at(0), "memory: needs 2Gi, 1Gi free of 8Gi");
    EXPECT_EQ(rejection(p, "node-c")->reasons.at(0),
              "CPU model host: its CPU is 'EPYC 7763', the VM's node has 'Xeon 8375C'");
    b.memory_committed = 6 * gib;
    p = place(v, {b, c});
    ASSERT_TRUE(p.fits());
    EXPECT_EQ(p.ranked[0].node, "node-b");
    EXPECT_DOUBLE_EQ(p.ranked[0].memory_load, 1.0);
}

TEST(Placement, ANodeThatHoldsOrReceivesAVmOfTheSameNameIsRejected) {
    auto b = node("node-b", 64, 64);
    b.vms = {"db-1", "web-1"};
    auto c = node("node-c", 64, 64);
    c.arriving = {"web-1"};
    auto d = node("node-d", 64, 64);
    d.vms = {"web-10"};
    d.arriving = {"web"};
    auto p = place(vm(), {b, c, d});
    ASSERT_EQ(p.ranked.size(), 1u);
    EXPECT_EQ(p.ranked[0].node, "node-d") << "only the exact name counts";
    ASSERT_TRUE(rejection(p, "node-b"));
    EXPECT_EQ(joined(rejection(p, "node-b")->reasons), "already has a VM named web-1");
    ASSERT_TRUE(rejection(p, "node-c"));
    EXPECT_EQ(joined(rejection(p, "node-c")->reasons), "a VM named web-1 is already arriving there");
    p = place(vm(), {b});
    EXPECT_FALSE(p.fits());
    EXPECT_EQ(p.why_none("web-1"), "no node fits web-1: node-b: already has a VM named web-1");
    EXPECT_FALSE(place(vm(), {b}, {}, false).fits()) << "filtered without explaining too";
}

TEST(Placement, PassthroughDevicesBlockMigration) {
    ferry::config::VmSpec spec;
    spec.extra_args = {"-device", "virtio-rng-pci"};
    EXPECT_TRUE(migration_blockers(spec).empty());
    spec.extra_args = {"-device", "vfio-pci,host=0000:3b:00.0", "-device", "usb-host,vendorid=0x1234"};
    auto why = migration_blockers(spec);
    ASSERT_EQ(why.size(), 2u);
    EXPECT_EQ(why[0], "extra_args passes a host device through ('vfio-pci,host=0000:3b:00.0')");
}

// --- the queue --------------------------------------------------------------------

namespace {
Request req(const std::string& id, const std::string& source, const std::string& target,
            Priority priority = Priority::user) {
    return {id, "vm-" + id, source, target, priority};
}

Queue::Placer nowhere() {
    return [](const Request&) -> ferry::Result<std::vector<std::string>> { return std::vector<std::string>{}; };
}

std::vector<std::string> drain(Queue& q, InFlight& running, const Limits& limits, const Queue::Placer& place) {
    std::vector<std::string> started;
    while (auto s = q.next(running, limits, place)) {
        running.add(s->request.source, s->target);
        started.push_back(s->request.id);
    }
    return started;
}
} // namespace

TEST(Queue, PriorityFirstThenRoundRobinAcrossSourcesThenFifo) {
    Queue q;
    ASSERT_TRUE(q.push(req("a1", "node-a", "node-x", Priority::rebalance)));
    ASSERT_TRUE(q.push(req("a2", "node-a", "node-x")));
    ASSERT_TRUE(q.push(req("a3", "node-a", "node-x")));
    ASSERT_TRUE(q.push(req("a4", "node-a", "node-x")));
    ASSERT_TRUE(q.push(req("b1", "node-b", "node-x")));
    ASSERT_TRUE(q.push(req("b2", "node-b", "node-x")));
    ASSERT_TRUE(q.push(req("c1", "node-c", "node-x", Priority::evacuation)));
    EXPECT_FALSE(q.push(req("b2", "node-b", "node-y"))) << "ids are unique";
    std::vector<std::string> order;
    for (auto& r : q.waiting())
        order.push_back(r.id);
    EXPECT_EQ(joined(order), "c1 | a2 | b1 | a3 | b2 | a4 | a1");
    InFlight running;
    Limits unlimited{100, 100, 100, {}};
    EXPECT_EQ(joined(drain(q, running, unlimited, nowhere())), "c1 | a2 | b1 | a3 | b2 | a4 | a1");
    EXPECT_TRUE(q.empty());
}

TEST(Queue, WaitsWithTheReasonAndSkipsOnlyWhatIsBlocked) {
    Queue q;
    ASSERT_TRUE(q.push(req("1", "node-a", "node-c")));
    ASSERT_TRUE(q.push(req("2", "node-b", "node-c")));
    ASSERT_TRUE(q.push(req("3", "node-b", "node-d")));
    ASSERT_TRUE(q.push(req("4", "node-a", "node-d")));
    InFlight running;
    Limits limits{1, 1, 5, {}};
    EXPECT_EQ(joined(drain(q, running, limits, nowhere())), "1 | 3") << "2 and 4 wait for their sources";
    EXPECT_EQ(q.reason("2"), "source node-b outbound 1/1");
    EXPECT_EQ(q.reason("4"), "source node-a outbound 1/1");
    running.remove("node-a", "node-c");
    EXPECT_TRUE(drain(q, running, limits, nowhere()).empty());
    EXPECT_EQ(q.reason("4"), "target node-d inbound 1/1");
    running.remove("node-b", "node-d");
    EXPECT_EQ(joined(drain(q, running, limits, nowhere())), "4 | 2");
    ASSERT_TRUE(q.push(req("4b", "node-a", "node-d")));
    EXPECT_TRUE(q.remove("4b"));
    EXPECT_FALSE(q.remove("4b"));
    EXPECT_TRUE(q.empty());
    ASSERT_TRUE(q.push(req("5", "node-e", "node-f")));
    Limits cluster{5, 5, 2, {}};
    EXPECT_TRUE(drain(q, running, cluster, nowhere()).empty());
    EXPECT_EQ(q.reason("5"), "cluster 2/2");
}

TEST(Queue, AsksThePlacerForATargetAndTakesTheFirstWithRoom) {
    Queue q;
    ASSERT_TRUE(q.push(req("1", "node-a", "")));
    ASSERT_TRUE(q.push(req("2", "node-a", "")));
    ASSERT_TRUE(q.push(req("3", "node-a", "")));
    Queue::Placer ranked = [](const Request&) -> ferry::Result<std::vector<std::string>> {
        return std::vector<std::string>{"node-b", "node-c"};
    };
    InFlight running;
    Limits limits{5, 1, 5, {}};
    auto first = q.next(running, limits, ranked);
    ASSERT_TRUE(first);
    EXPECT_EQ(first->target, "node-b");
    running.add("node-a", first->target);
    auto second = q.next(running, limits, ranked);
    ASSERT_TRUE(second);
    EXPECT_EQ(second->target, "node-c") << "node-b is full";
    running.add("node-a", second->target);
    EXPECT_FALSE(q.next(running, limits, ranked));
    EXPECT_EQ(q.reason("3"), "every node that fits is full: node-b inbound 1/1, node-c inbound 1/1");
    Queue::Placer none = [](const Request&) -> ferry::Result<std::vector<std::string>> {
        return ferry::make_error(ferry::Errc::not_found, "no node fits vm-3: node-b: cordoned");
    };
    EXPECT_FALSE(q.next(running, limits, none));
    EXPECT_EQ(q.reason("3"), "no node fits vm-3: node-b: cordoned");
}

// A drain-like workload with random finishes: the limits hold at every start.
TEST(Queue, LimitsAreNeverExceededWhateverFinishesWhen) {
    std::mt19937 rng(7);
    Limits limits{1, 1, 2, {}};
    Queue q;
    std::vector<std::string> nodes{"node-a", "node-b", "node-c", "node-d"};
    for (int i = 0; i < 60; ++i) {
        auto source = nodes[rng() % 2]; // two nodes drain
        ASSERT_TRUE(q.push(req("m" + std::to_string(i), source, "", i % 3 ? Priority::evacuation : Priority::user)));
    }
    Queue::Placer place = [&](const Request& r) -> ferry::Result<std::vector<std::string>> {
        std::vector<std::string> out;
        for (auto& n : nodes)
            if (n != r.source)
                out.push_back(n);
        return out;
    };
    InFlight running;
    std::vector<std::pair<std::string, std::string>> under_way;
    std::size_t started = 0;
    while (!q.empty() || !under_way.empty()) {
        while (auto s = q.next(running, limits, place)) {
            running.add(s->request.source, s->target);
            under_way.emplace_back(s->request.source, s->target);
            ++started;
            ASSERT_LE(running.total(), limits.per_cluster);
            ASSERT_LE(running.outbound(s->request.source), limits.outbound_per_node);
            ASSERT_LE(running.inbound(s->target), limits.inbound_per_node);
        }
        ASSERT_FALSE(under_way.empty()) << "nothing runs, yet " << q.size() << " wait: "
                                        << q.reason(q.waiting().front().id);
        auto i = rng() % under_way.size();
        running.remove(under_way[i].first, under_way[i].second);
        under_way.erase(under_way.begin() + static_cast<std::ptrdiff_t>(i));
    }
    EXPECT_EQ(started, 60u);
}

TEST(Queue, StartAllStartsWhatRepeatedNextWouldInTheSameOrder) {
    std::mt19937 rng(11);
    std::vector<std::string> nodes{"node-a", "node-b", "node-c", "node-d", "node-e"};
    Queue by_next, at_once;
    for (int i = 0; i < 80; ++i) {
        auto r = req("m" + std::to_string(i), nodes[rng() % 3], i % 7 ? "" : nodes[3 + rng() % 2],
                     static_cast<Priority>(rng() % 3));
        ASSERT_TRUE(by_next.push(r));
        ASSERT_TRUE(at_once.push(r));
    }
    // A placer whose answer shrinks as migrations commit memory: each node
    // takes three, and every ninth request fits nowhere.
    auto placer = [&](std::map<std::string, int>& committed, int& calls) {
        return [&committed, &calls, &nodes](const Request& r) -> ferry::Result<std::vector<std::string>> {
            ++calls;
            if (std::stoi(r.id.substr(1)) % 9 == 0)
                return ferry::make_error(ferry::Errc::conflict, "no node fits " + r.vm);
            std::vector<std::string> out;
            for (auto& n : nodes)
                if (n != r.source && committed[n] < 3)
                    out.push_back(n);
            return out;
        };
    };
    Limits limits{2, 2, 6, {}};
    std::map<std::string, int> committed_a, committed_b;
    int calls_a = 0, calls_b = 0;
    InFlight running_a, running_b;
    std::vector<std::string> order_a, order_b;
    auto place_a = placer(committed_a, calls_a);
    while (auto s = by_next.next(running_a, limits, place_a)) {
        running_a.add(s->request.source, s->target);
        ++committed_a[s->target];
        order_a.push_back(s->request.id + ">" + s->target);
    }
    auto n = at_once.start_all(running_b, limits, placer(committed_b, calls_b), [&](const Start& s) {
        ++committed_b[s.target];
        order_b.push_back(s.request.id + ">" + s.target);
    });
    EXPECT_EQ(order_a, order_b);
    EXPECT_EQ(n, order_b.size());
    EXPECT_EQ(running_b.total(), running_a.total());
    EXPECT_LE(calls_b, calls_a) << "blocked requests are not placed again in one pass";
    for (auto& r : at_once.waiting())
        EXPECT_FALSE(at_once.reason(r.id).empty()) << r.id << " waits without a reason";
}

// --- the cluster's facts as peers send them -------------------------------------

namespace {
nlohmann::json facts(const std::string& name, std::uint64_t memory_gib, nlohmann::json vms = nlohmann::json::array(),
                     nlohmann::json migrations = nlohmann::json::array()) {
    return {{"name", name},           {"state", "ready"},       {"labels", {{"zone", name.substr(5)}}},
            {"memory", memory_gib << 30}, {"cpus", 8},              {"host_cpu", "EPYC"},
            {"qemu_version", "7.2.22"}, {"machine_types", {"pc"}}, {"cpu_models", {"qemu64"}},
            {"vms", vms},             {"migrations", migrations}};
}
nlohmann::json vm(const std::string& name, std::uint64_t memory_gib) {
    return {{"name", name}, {"memory", memory_gib << 30}, {"cpus", 2}, {"cpu_model", "qemu64"}, {"machine", "pc"},
            {"labels", nlohmann::json::object()}, {"node_selector", nlohmann::json::object()}};
}
} // namespace

TEST(Cluster, ViewsCountVmsAndArrivalsAndPlacementSaysWhyNot) {
    using ferry::scheduler::node_view;
    std::vector<nlohmann::json> nodes{
        facts("node-a", 16, {vm("web", 4), vm("db", 2)}),
        facts("node-b", 16, {vm("x", 8)},
              {{{"id", "y-1"}, {"vm", "y"}, {"source_node", "node-c"}, {"target_node", "node-b"}, {"memory", 6ULL << 30}}}),
        facts("node-c", 16, {vm("y", 6)}),
        {{"name", "node-d"}, {"state", "unreachable"}, {"error", "dial: connection refused"}},
        {{"name", "node-e"}, {"state", "ready"}}, // no capacity: refused by name
    };
    auto b = node_view(nodes[1]);
    ASSERT_TRUE(b) << b.error().message;
    EXPECT_EQ(b->memory_committed, 14ULL << 30) << "its VM and the one headed there";
    EXPECT_EQ(b->labels.at("zone"), "b");
    auto c = node_view(nodes[2]);
    EXPECT_EQ(c->memory_committed, 6ULL << 30) << "leaving does not free memory until it is gone";
    EXPECT_FALSE(node_view(nodes[4]));
    auto huge = nodes[0];
    huge["cpus"] = std::numeric_limits<std::int64_t>::max();
    EXPECT_NE(node_view(huge).error().message.find("'cpus' 9223372036854775807 is out of range"), std::string::npos);
    huge = nodes[0];
    huge["vms"][0]["cpus"] = std::numeric_limits<std::int64_t>::max(); // counted as the most a VM can have
    EXPECT_EQ(node_view(huge)->cpus_committed, (1 << 20) + 2);
    EXPECT_NE(node_view(nodes[4]).error().message.find("node node-e: no 'memory'"), std::string::npos);

    auto p = ferry::scheduler::place_vm(nodes, "node-a", "web");
    ASSERT_TRUE(p) << p.error().message;
    ASSERT_EQ(p->ranked.size(), 1U);
    EXPECT_EQ(p->ranked[0].node, "node-c");
    std::map<std::string, std::string> why;
    for (auto& r : p->rejected)
        why[r.node] = r.reasons.front();
    EXPECT_EQ(why["node-a"], "the VM runs there");
    EXPECT_NE(why["node-b"].find("memory: needs 4Gi, 2Gi free of 16Gi"), std::string::npos) << why["node-b"];
    EXPECT_NE(why["node-d"].find("unreachable: dial: connection refused"), std::string::npos) << why["node-d"];
    EXPECT_NE(why["node-e"].find("no 'memory'"), std::string::npos) << why["node-e"];
    auto j = ferry::scheduler::to_json(*p);
    EXPECT_EQ(j["ranked"][0]["node"], "node-c");
    EXPECT_EQ(j["rejected"].size(), 4U);

    EXPECT_FALSE(ferry::scheduler::place_vm(nodes, "node-a", "nope"));
    auto adopted = nodes;
    adopted[0]["vms"].push_back({{"name", "bare"}, {"status", "running"}});
    auto bare = ferry::scheduler::place_vm(adopted, "node-a", "bare");
    ASSERT_FALSE(bare);
    EXPECT_NE(bare.error().message.find("adopted without a spec"), std::string::npos);
}

TEST(Cluster, VcpusAreTheAllocationRatiosAndArrivalsCountTheirCpus) {
    auto f = facts("node-b", 8, json::array({vm("x", 1)})); // x: 2 CPUs
    f["cpus"] = 2;
    f["vcpus"] = 20;
    f["migrations"] = json::array({json{{"id", "m"}, {"source_node", "node-a"}, {"target_node", "node-b"}, {"memory", gib},
                                        {"cpus", 3}}});
    auto v = node_view(f);
    ASSERT_TRUE(v) << v.error().message;
    EXPECT_EQ(v->cpus, 20);
    EXPECT_EQ(v->cpus_committed, 2 + 3);
    EXPECT_EQ(v->memory_committed, 2 * gib);
}

TEST(Cluster, TheNamesOfAPeersVmsAndArrivalsKeepItsNameTakenFromPlacement) {
    std::vector<nlohmann::json> nodes{
        facts("node-a", 16, {vm("web-1", 1), vm("db", 1)}),
        facts("node-b", 16, {vm("web-1", 1)}),
        facts("node-c", 16, {}, {{{"id", "db-7"}, {"vm", "db"}, {"source_node", "node-d"}, {"target_node", "node-c"}}}),
    };
    auto b = node_view(nodes[1]);
    ASSERT_TRUE(b) << b.error().message;
    EXPECT_EQ(b->vms, std::vector<std::string>{"web-1"});
    EXPECT_EQ(node_view(nodes[2])->arriving, std::vector<std::string>{"db"});
    auto p = ferry::scheduler::place_vm(nodes, "node-a", "web-1");
    ASSERT_TRUE(p) << p.error().message;
    ASSERT_EQ(p->ranked.size(), 1U);
    EXPECT_EQ(p->ranked[0].node, "node-c");
    EXPECT_EQ(ferry::scheduler::to_json(*p)["rejected"][1],
              (nlohmann::json{{"node", "node-b"}, {"reasons", nlohmann::json::array({"already has a VM named web-1"})}}));
    p = ferry::scheduler::place_vm(nodes, "node-a", "db");
    ASSERT_TRUE(p) << p.error().message;
    ASSERT_EQ(p->ranked.size(), 1U);
    EXPECT_EQ(p->ranked[0].node, "node-b");
    ASSERT_EQ(p->rejected.size(), 2U);
    EXPECT_EQ(p->rejected[1].node, "node-c");
    EXPECT_EQ(p->rejected[1].reasons, std::vector<std::string>{"a VM named db is already arriving there"});
    nodes[2]["migrations"] = nlohmann::json::array();
    nodes[2]["vms"] = {vm("web-1", 1)};
    ferry::config::VmSpec spec;
    spec.name = "web-1";
    auto m = ferry::scheduler::migratability(&spec, nodes, "node-a", "web-1");
    EXPECT_FALSE(m["now"]);
    EXPECT_EQ(m["reasons"][0], "no node fits web-1: node-a: the VM runs there; node-b: already has a VM named web-1; "
                               "node-c: already has a VM named web-1")
        << m.dump();
}

TEST(Cluster, MigratabilityGivesEveryReason) {
    std::vector<nlohmann::json> nodes{facts("node-a", 16, {vm("web", 4)}), facts("node-b", 16, {vm("x", 14)})};
    ferry::config::VmSpec spec;
    spec.name = "web";
    spec.memory = 4ULL << 30;
    auto m = ferry::scheduler::migratability(&spec, nodes, "node-a", "web");
    EXPECT_FALSE(m["now"]);
    EXPECT_TRUE(m["target"].is_null());
    ASSERT_EQ(m["reasons"].size(), 1U);
    EXPECT_NE(m["reasons"][0].get<std::string>().find("no node fits web: node-a: the VM runs there; node-b: memory"),
              std::string::npos)
        << m.dump();
    nodes[1]["vms"] = nlohmann::json::array();
    m = ferry::scheduler::migratability(&spec, nodes, "node-a", "web");
    EXPECT_TRUE(m["now"]);
    EXPECT_EQ(m["target"], "node-b");
    spec.extra_args = {"-device", "vfio-pci,host=0000:03:00.0"};
    m = ferry::scheduler::migratability(&spec, nodes, "node-a", "web");
    EXPECT_FALSE(m["now"]);
    EXPECT_NE(m["reasons"][0].get<std::string>().find("passes a host device through"), std::string::npos);
    spec.extra_args.clear();
    m = ferry::scheduler::migratability(&spec, {nodes[0]}, "node-a", "web");
    EXPECT_TRUE(m["now"]) << "no peers: a new QEMU on its own node";
    EXPECT_EQ(m["target"], "node-a");
    m = ferry::scheduler::migratability(nullptr, nodes, "node-a", "web");
    EXPECT_FALSE(m["now"]);
    EXPECT_NE(m["reasons"][0].get<std::string>().find("adopted without a spec"), std::string::npos);
}

TEST(Queue, EachNodesOwnInboundLimitCounts) {
    InFlight running;
    running.add("a", "b");
    Limits limits{5, 1, 5, {{"c", 2}}};
    Queue q;
    ASSERT_TRUE(q.push({"1", "vm1", "a", "", Priority::user}));
    auto placer = [](const Request&) -> ferry::Result<std::vector<std::string>> {
        return std::vector<std::string>{"b", "c"};
    };
    auto s = q.next(running, limits, placer);
    ASSERT_TRUE(s);
    EXPECT_EQ(s->target, "c"); // b is full at 1/1
    running.add("a", "c");
    ASSERT_TRUE(q.push({"2", "vm2", "a", "", Priority::user}));
    s = q.next(running, limits, placer);
    ASSERT_TRUE(s);
    EXPECT_EQ(s->target, "c"); // c takes 2
    running.add("a", "c");
    ASSERT_TRUE(q.push({"3", "vm3", "a", "", Priority::user}));
    EXPECT_FALSE(q.next(running, limits, placer));
    EXPECT_EQ(q.reason("3"), "every node that fits is full: b inbound 1/1, c inbound 2/2");
}

// --- drains ---------------------------------------------------------------------

namespace {
VmDrain at(const std::string& name, VmDrainState state) {
    VmDrain v;
    v.name = name;
    v.state = state;
    return v;
}
} // namespace

TEST(Drain, FailuresBackOffThenGiveUpAndTheRecordRoundTrips) {
    Drain d;
    d.node = "node-b";
    d.started_at = "t0";
    d.max_parallel = 2;
    d.deadline_ms = 123456;
    d.vms = {at("a", VmDrainState::waiting), at("b", VmDrainState::waiting), at("c", VmDrainState::cannot_move)};
    auto& a = *d.find("a");
    std::vector<std::int64_t> waits;
    for (int i = 1; i <= Drain::max_attempts; ++i) {
        a.attempts = i;
        d.failed(a, "boom " + std::to_string(i), 1000);
        if (a.state == VmDrainState::waiting)
            waits.push_back(a.retry_at_ms - 1000);
    }
    EXPECT_EQ(waits, (std::vector<std::int64_t>{10'000, 20'000, 40'000, 80'000}));
    EXPECT_EQ(a.state, VmDrainState::gave_up);
    EXPECT_EQ(a.error, "boom 5");
    EXPECT_FALSE(d.settle("t1")); // b still waits
    d.find("b")->state = VmDrainState::moved;
    EXPECT_TRUE(d.settle("t1"));
    EXPECT_EQ(d.state, DrainState::incomplete);
    EXPECT_EQ(d.note, "2 VM(s) still on node-b");

    auto back = drain_from_json(to_json(d));
    ASSERT_TRUE(back) << back.error().message;
    EXPECT_EQ(to_json(*back), to_json(d));
    EXPECT_EQ(back->find("a")->attempts, 5);
    EXPECT_EQ(*back->deadline_ms, 123456);
}

TEST(Drain, CompletesWhenEveryVmMovedAndStopWaitingKeepsTheLastFailure) {
    Drain d;
    d.node = "n";
    d.vms = {at("a", VmDrainState::moved), at("b", VmDrainState::gone)};
    EXPECT_TRUE(d.settle("t"));
    EXPECT_EQ(d.state, DrainState::completed);
    EXPECT_FALSE(d.settle("t")); // once

    Drain e;
    e.node = "n";
    e.vms = {at("a", VmDrainState::waiting), at("b", VmDrainState::migrating)};
    e.find("a")->error = "target full";
    e.stop_waiting("cancelled");
    EXPECT_EQ(e.find("a")->state, VmDrainState::not_moved);
    EXPECT_EQ(e.find("a")->error, "cancelled; last failure: target full");
    EXPECT_EQ(e.find("b")->state, VmDrainState::migrating);
}

TEST(Drain, BadRecordsAndOptionsNameTheField) {
    EXPECT_EQ(drain_from_json(json::array()).error().message, "drain: not an object");
    json j{{"node", "n"}, {"state", "running"}, {"started_at", "t"}, {"max_parallel", "2"}, {"vms", json::array()}};
    EXPECT_EQ(drain_from_json(j).error().message, "drain: 'max_parallel' must be an integer");
    j["max_parallel"] = 0;
    j["state"] = "paused";
    EXPECT_EQ(drain_from_json(j).error().message, "drain: unknown state 'paused'");
    j["state"] = "running";
    j["vms"] = json::array({json{{"name", "a"}, {"state", "flying"}}});
    EXPECT_EQ(drain_from_json(j).error().message, "drain vms[0]: unknown state 'flying'");
    j["vms"] = json::array({json{{"name", "a"}, {"state", "migrating"}}}); // no migration to follow
    ASSERT_TRUE(drain_from_json(j));
    EXPECT_EQ(drain_from_json(j)->vms[0].state, VmDrainState::waiting);

    EXPECT_EQ(drain_options(json{{"max_parallel", -1}}).error().message, "'max_parallel' must be 0 to 1000, not -1");
    EXPECT_EQ(drain_options(json{{"deadline_s", "1h"}}).error().message, "'deadline_s' must be an integer");
    auto o = drain_options(json{{"max_parallel", 3}, {"deadline_s", 60}});
    ASSERT_TRUE(o);
    EXPECT_EQ(o->max_parallel, 3);
    EXPECT_EQ(*o->deadline_s, 60);
}
