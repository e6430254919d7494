// The pure half of cluster.hpp: facts (as peers send them) to views, and
// placement over them. Fuzzed.
#include "scheduler/cluster.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace ferry::scheduler {

namespace {

// JSON numbers convert to integers only when they are integers in range:
// a peer's 1e30 or -1 is wrong data, not undefined behaviour.
template <class T>
bool take(const json& v, T& out) {
    if constexpr (std::is_same_v<T, bool>) {
        if (!v.is_boolean())
            return false;
    } else if constexpr (std::is_unsigned_v<T>) {
        if (!v.is_number_unsigned())
            return false;
    } else if constexpr (std::is_integral_v<T>) {
        if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(
                                                                                            std::numeric_limits<T>::max())))
            return false;
    }
    try {
        out = v.get<T>();
    } catch (const std::exception&) {
        return false;
    }
    return true;
}

// More vCPUs or host CPUs than any machine has is wrong data; the bound
// keeps every sum and difference of counts far from overflowing.
constexpr std::int64_t max_cpus = 1 << 20;

// j[key] when j is an object holding a string there, else `none`.
std::string text(const json& j, const char* key, const std::string& none = "") {
    if (!j.is_object())
        return none;
    auto it = j.find(key);
    return it != j.end() && it->is_string() ? it->get<std::string>() : none;
}

template <class T>
Result<void> field(const json& j, const char* key, T& out, const std::string& where) {
    auto it = j.find(key);
    if (it == j.end())
        return make_error(Errc::protocol, fmt::format("{}: no '{}'", where, key));
    if (!take(*it, out))
        return make_error(Errc::protocol, fmt::format("{}: '{}' has the wrong type", where, key));
    return {};
}

template <class T>
void optional_field(const json& j, const char* key, T& out) {
    if (auto it = j.find(key); it != j.end())
        (void)take(*it, out);
}

// A node's or a VM's required memory and cpus, the CPU count in range.
Result<void> size(const json& j, std::uint64_t& memory, std::int64_t& cpus, const std::string& where) {
    for (auto r : {field(j, "memory", memory, where), field(j, "cpus", cpus, where)})
        if (!r)
            return r.error();
    if (cpus < 0 || cpus > max_cpus)
        return make_error(Errc::protocol, fmt::format("{}: 'cpus' {} is out of range", where, cpus));
    return {};
}

} // namespace

Result<NodeView> node_view(const json& facts) {
    if (!facts.is_object())
        return make_error(Errc::protocol, "node facts are not an object");
    NodeView n;
    if (auto r = field(facts, "name", n.name, "node facts"); !r)
        return r.error();
    auto where = "node " + n.name;
    std::string state;
    if (auto r = field(facts, "state", state, where); !r)
        return r.error();
    if (state == "unreachable")
        n.state = NodeState::unreachable;
    else if (state == "cordoned")
        n.state = NodeState::cordoned;
    else if (state == "draining")
        n.state = NodeState::draining;
    else if (state != "ready")
        n.state = NodeState::unreachable; // stopping, or something this version does not know
    if (n.state == NodeState::unreachable)
        return n;
    if (auto r = size(facts, n.memory, n.cpus, where); !r)
        return r.error();
    // What VMs may have: the host's CPUs times its cpu_allocation_ratio.
    std::int64_t vcpus = 0;
    optional_field(facts, "vcpus", vcpus);
    if (vcpus > 0)
        n.cpus = std::min(vcpus, max_cpus);
    optional_field(facts, "host_cpu", n.host_cpu);
    optional_field(facts, "qemu_version", n.qemu_version);
    optional_field(facts, "machine_types", n.machine_types);
    optional_field(facts, "cpu_models", n.cpu_models);
    optional_field(facts, "labels", n.labels);
    if (auto vms = facts.find("vms"); vms != facts.end() && vms->is_array())
        for (auto& v : *vms) {
            std::uint64_t memory = 0;
            std::int64_t cpus = 0;
            if (v.is_object()) {
                optional_field(v, "memory", memory);
                optional_field(v, "cpus", cpus);
                if (auto name = text(v, "name"); !name.empty())
                    n.vms.push_back(std::move(name));
            }
            cpus = std::clamp<std::int64_t>(cpus, 0, max_cpus); // sums stay far from overflowing
            n.memory_committed += memory;
            n.cpus_committed += cpus;
        }
    if (auto ms = facts.find("migrations"); ms != facts.end() && ms->is_array())
        for (auto& m : *ms) {
            std::string source, target;
            std::uint64_t memory = 0;
            std::int64_t cpus = 0;
            if (!m.is_object())
                continue;
            optional_field(m, "source_node", source);
            optional_field(m, "target_node", target);
            optional_field(m, "memory", memory);
            optional_field(m, "cpus", cpus);
            if (target == n.name && source != n.name) { // headed here, not yet among its VMs
                if (auto name = text(m, "vm"); !name.empty())
                    n.arriving.push_back(std::move(name));
                n.memory_committed += memory;
                n.cpus_committed += std::clamp<std::int64_t>(cpus, 0, max_cpus);
            }
        }
    return n;
}

Result<VmView> vm_view(const json& facts, const std::string& name) {
    std::string node = text(facts, "name");
    auto vms = facts.is_object() ? facts.find("vms") : facts.end();
    if (!facts.is_object() || vms == facts.end() || !vms->is_array())
        return make_error(Errc::protocol, fmt::format("node {}: facts without 'vms'", node));
    for (auto& v : *vms) {
        if (text(v, "name") != name)
            continue;
        if (!v.contains("memory"))
            return make_error(Errc::conflict, fmt::format("VM {} was adopted without a spec: ferry cannot place it",
                                                          name));
        VmView vm;
        vm.name = name;
        vm.node = node;
        auto where = "VM " + name;
        if (auto r = size(v, vm.memory, vm.cpus, where); !r)
            return r.error();
        optional_field(v, "cpu_model", vm.cpu_model);
        optional_field(v, "machine", vm.machine_type);
        optional_field(v, "labels", vm.labels);
        optional_field(v, "node_selector", vm.node_selector);
        optional_field(facts, "host_cpu", vm.host_cpu);
        return vm;
    }
    return make_error(Errc::not_found, fmt::format("no VM named {} on {}", name, node));
}

Result<Placement> place_vm(const std::vector<json>& nodes, const std::string& source, const std::string& name,
                           bool explain, const Labels& added, std::size_t top) {
    std::vector<NodeView> views;
    std::vector<Rejection> broken;
    std::optional<VmView> vm;
    for (auto& f : nodes) {
        auto v = node_view(f);
        if (!v) {
            broken.push_back({text(f, "name", "?"), {v.error().message}});
            continue;
        }
        if (v->name == source) {
            auto mine = vm_view(f, name);
            if (!mine)
                return mine.error();
            vm = *mine;
        }
        if (v->state == NodeState::unreachable) {
            broken.push_back({v->name, {"unreachable: " + text(f, "error", "?")}});
            continue;
        }
        views.push_back(std::move(*v));
    }
    if (!vm)
        return make_error(Errc::not_found, fmt::format("no facts from node {}", source));
    auto p = place(*vm, views, added, explain, top);
    if (explain) {
        p.rejected.insert(p.rejected.end(), broken.begin(), broken.end());
        std::sort(p.rejected.begin(), p.rejected.end(),
                  [](const Rejection& a, const Rejection& b) { return a.node < b.node; });
    }
    return p;
}

json migratability(const config::VmSpec* spec, const std::vector<json>& nodes, const std::string& source,
                   const std::string& name) {
    json reasons = json::array();
    json target = nullptr;
    if (!spec) {
        reasons.push_back("adopted without a spec: ferry cannot start its destination QEMU (adopt it again with --spec)");
    } else {
        for (auto& b : migration_blockers(*spec))
            reasons.push_back(b);
        if (nodes.size() <= 1) {
            target = source; // no peers: a new QEMU on this node
        } else if (auto p = place_vm(nodes, source, name)) {
            if (p->fits())
                target = p->ranked.front().node;
            else
                reasons.push_back(p->why_none(name));
        } else {
            reasons.push_back(p.error().message);
        }
    }
    bool now = reasons.empty();
    return {{"now", now}, {"target", now ? target : json(nullptr)}, {"reasons", reasons}};
}

json to_json(const Placement& p) {
    json ranked = json::array(), rejected = json::array();
    for (auto& c : p.ranked)
        ranked.push_back({{"node", c.node}, {"memory_load", c.memory_load}, {"cpu_load", c.cpu_load}});
    for (auto& r : p.rejected)
        rejected.push_back({{"node", r.node}, {"reasons", r.reasons}});
    return {{"ranked", ranked}, {"rejected", rejected}};
}

} // namespace ferry::scheduler
