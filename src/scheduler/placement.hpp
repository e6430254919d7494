#pragma once
// Where a VM can go: hard filters, then a score, then a deterministic
// tie-break. Pure: the planner feeds it the cluster as this node sees it.
//
// Filters: the node is alive and neither cordoned nor draining, it is not
// where the VM runs, it holds no VM of the same name (nor one arriving), the
// VM's memory and CPUs fit beside what already runs
// there and what is already headed there, its CPU model and machine type
// exist there, and its labels match the VM's node_selector and the
// request's added selector. Score: the lowest memory load the node would
// have with the VM, then the lowest CPU load, then the node's name.
#include "config/vm_spec.hpp"
#include "scheduler/policy.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ferry::scheduler {

enum class NodeState { ready, cordoned, draining, unreachable };
std::string_view to_string(NodeState s);

struct NodeView {
    std::string name;
    NodeState state = NodeState::ready;
    std::uint64_t memory = 0;           // bytes for VMs
    std::int64_t cpus = 0;              // vCPUs it may hold (host CPUs x cpu_allocation_ratio)
    std::uint64_t memory_committed = 0; // its VMs' and those headed there
    std::int64_t cpus_committed = 0;
    std::string host_cpu;                    // the host CPU's model name
    std::vector<std::string> cpu_models;     // named models its QEMU offers
    std::vector<std::string> machine_types;  // machine types its QEMU offers
    std::string qemu_version;
    Labels labels;
    std::vector<std::string> vms;      // names of the VMs it holds
    std::vector<std::string> arriving; // names of the VMs headed there
};

struct VmView {
    std::string name;
    std::string node; // where it runs
    std::uint64_t memory = 0;
    std::int64_t cpus = 1;
    std::string cpu_model = "qemu64";
    std::string machine_type; // as resolved on its node ("pc-i440fx-7.2")
    std::string host_cpu;     // its node's host CPU (for cpu_model "host")
    Labels labels;
    Labels node_selector;
};

struct Candidate {
    std::string node;
    double memory_load = 0; // with the VM there, 0..1
    double cpu_load = 0;
};

struct Rejection {
    std::string node;
    std::vector<std::string> reasons; // every filter it failed
};

struct Placement {
    std::vector<Candidate> ranked; // best first
    std::vector<Rejection> rejected; // by node name
    bool fits() const { return !ranked.empty(); }
    // "no node fits web-1: node-b: cordoned; node-c: memory ..."
    std::string why_none(const std::string& vm) const;
};

// added_selector: labels the request adds to the VM's node_selector.
// explain = false leaves `rejected` empty and formats no reasons: for a
// planner that only needs the ranking (ask again to explain a miss).
// top: rank only the best `top` (the queue needs one node with room, and
// with n migrations in flight at most n nodes can be full).
Placement place(const VmView& vm, const std::vector<NodeView>& nodes, const Labels& added_selector = {},
                bool explain = true, std::size_t top = SIZE_MAX);

// What keeps a VM from migrating anywhere, whatever the nodes: a device
// passed through from its host (in extra_args). Empty: nothing.
std::vector<std::string> migration_blockers(const config::VmSpec& spec);

} // namespace ferry::scheduler
