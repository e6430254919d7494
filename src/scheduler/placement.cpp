#include "scheduler/placement.hpp"

#include "config/quantity.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <utility>
#include <tuple>

namespace ferry::scheduler {

std::string_view to_string(NodeState s) {
    switch (s) {
    case NodeState::ready: return "ready";
    case NodeState::cordoned: return "cordoned";
    case NodeState::draining: return "draining";
    case NodeState::unreachable: return "unreachable";
    }
    return "?";
}

namespace {

bool has(const std::vector<std::string>& list, const std::string& item) {
    return std::find(list.begin(), list.end(), item) != list.end();
}

// Where a node's failed filters go: their reasons, or (when nobody will
// read them) only the fact that one failed, without formatting anything.
struct Why {
    std::vector<std::string>* reasons = nullptr;
    bool any = false;
    template <class... A>
    void add(fmt::format_string<A...> f, A&&... args) {
        any = true;
        if (reasons)
            reasons->push_back(fmt::format(f, std::forward<A>(args)...));
    }
};

void check_selector(const Labels& selector, const char* what, const Labels& labels, Why& why) {
    for (auto& [key, value] : selector) {
        auto it = labels.find(key);
        if (it == labels.end())
            why.add("{} {}={}: the node has no label {}", what, key, value, key);
        else if (it->second != value)
            why.add("{} {}={}: the node has {}={}", what, key, value, key, it->second);
    }
}

void reject_reasons(const VmView& vm, const NodeView& n, const Labels& added, Why& why) {
    if (n.name == vm.node) {
        why.add("the VM runs there");
        return;
    }
    if (n.state != NodeState::ready)
        why.add("{}", to_string(n.state));
    // A VM's name is unique on a node: its arrival would be refused there.
    if (has(n.vms, vm.name))
        why.add("already has a VM named {}", vm.name);
    else if (has(n.arriving, vm.name))
        why.add("a VM named {} is already arriving there", vm.name);
    check_selector(vm.node_selector, "node_selector", n.labels, why);
    check_selector(added, "added selector", n.labels, why);
    auto free_memory = n.memory > n.memory_committed ? n.memory - n.memory_committed : 0;
    if (vm.memory > free_memory)
        why.add("memory: needs {}, {} free of {}", config::format_quantity(vm.memory),
                config::format_quantity(free_memory), config::format_quantity(n.memory));
    auto free_cpus = std::max<std::int64_t>(n.cpus - n.cpus_committed, 0);
    if (vm.cpus > free_cpus)
        why.add("CPUs: needs {}, {} free of {}", vm.cpus, free_cpus, n.cpus);
    if (vm.cpu_model == "host") {
        if (n.host_cpu != vm.host_cpu)
            why.add("CPU model host: its CPU is '{}', the VM's node has '{}'", n.host_cpu, vm.host_cpu);
    } else if (!has(n.cpu_models, vm.cpu_model)) {
        why.add("CPU model {}: its QEMU {} does not offer it", vm.cpu_model, n.qemu_version);
    }
    if (!vm.machine_type.empty() && !has(n.machine_types, vm.machine_type))
        why.add("machine type {}: its QEMU {} does not offer it", vm.machine_type, n.qemu_version);
}

double load(double committed, double add, double total) { return total > 0 ? (committed + add) / total : 1; }

} // namespace

Placement place(const VmView& vm, const std::vector<NodeView>& nodes, const Labels& added_selector, bool explain,
                std::size_t top) {
    Placement p;
    std::vector<std::string> reasons;
    // Ranked by index: swapping three words, not a name.
    struct Ranked {
        double memory_load, cpu_load;
        const NodeView* node;
    };
    std::vector<Ranked> ranked;
    for (auto& n : nodes) {
        Why why{explain ? &reasons : nullptr};
        reject_reasons(vm, n, added_selector, why);
        if (why.any) {
            if (explain)
                p.rejected.push_back({n.name, std::exchange(reasons, {})});
            continue;
        }
        ranked.push_back({load(static_cast<double>(n.memory_committed), static_cast<double>(vm.memory),
                               static_cast<double>(n.memory)),
                          load(static_cast<double>(n.cpus_committed), static_cast<double>(vm.cpus),
                               static_cast<double>(n.cpus)),
                          &n});
    }
    auto better = [](const Ranked& a, const Ranked& b) {
        if (a.memory_load != b.memory_load)
            return a.memory_load < b.memory_load;
        if (a.cpu_load != b.cpu_load)
            return a.cpu_load < b.cpu_load;
        return a.node->name < b.node->name;
    };
    if (top < ranked.size()) {
        std::partial_sort(ranked.begin(), ranked.begin() + static_cast<std::ptrdiff_t>(top), ranked.end(), better);
        ranked.resize(top);
    } else {
        std::sort(ranked.begin(), ranked.end(), better);
    }
    p.ranked.reserve(ranked.size());
    for (auto& r : ranked)
        p.ranked.push_back({r.node->name, r.memory_load, r.cpu_load});
    std::sort(p.rejected.begin(), p.rejected.end(),
              [](const Rejection& a, const Rejection& b) { return a.node < b.node; });
    return p;
}

std::string Placement::why_none(const std::string& vm) const {
    std::string s = fmt::format("no node fits {}", vm);
    if (rejected.empty())
        return s + ": no other node is known";
    const char* sep = ": ";
    for (auto& r : rejected) {
        s += fmt::format("{}{}: {}", sep, r.node, fmt::join(r.reasons, ", "));
        sep = "; ";
    }
    return s;
}

std::vector<std::string> migration_blockers(const config::VmSpec& spec) {
    std::vector<std::string> why;
    for (auto& arg : spec.extra_args)
        for (auto device : {"vfio-", "usb-host", "pci-assign"}) // devices passed through from the host
            if (arg.find(device) != std::string::npos) {
                why.push_back(fmt::format("extra_args passes a host device through ('{}')", arg));
                break;
            }
    return why;
}

} // namespace ferry::scheduler
