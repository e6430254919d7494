#pragma once
// The cluster as this node sees it: its own facts and those its peers send
// (engine::Engine::facts), turned into the views placement works on.
#include "common/error.hpp"
#include "scheduler/placement.hpp"

#include <boost/asio/awaitable.hpp>
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace ferry::engine {
class Engine;
}

namespace ferry::scheduler {

using nlohmann::json;

// Every node's facts: this node's, then each peer's in [[peers]] order,
// asked at once. A peer that cannot be asked is
// {"name", "state": "unreachable", "error"}.
boost::asio::awaitable<std::vector<json>> gather(engine::Engine& engine);

// Pure (fuzzed: the facts come from peers). A node's view: its capacity, and
// as committed the memory and CPUs of its VMs plus those of the migrations
// headed there. An error names what is missing or of the wrong type.
Result<NodeView> node_view(const json& facts);
// The view of VM `name` in its node's facts; an error when the node does not
// hold it or knows no spec for it (adopted without one).
Result<VmView> vm_view(const json& facts, const std::string& name);
// Placement of VM `name` of `source` among `nodes` (every node's facts);
// unreachable and malformed nodes are rejected with the reason.
// `added`: labels the request adds to the VM's node_selector.
Result<Placement> place_vm(const std::vector<json>& nodes, const std::string& source, const std::string& name,
                           bool explain = true, const Labels& added = {}, std::size_t top = SIZE_MAX);
json to_json(const Placement& p);

// Whether VM `name` of `source` can migrate now, and every reason it cannot:
// no spec (adopted without one), a device passed through from the host, or
// no node that fits (each node's reasons). {now, target (the best node, or
// null), reasons: [...]}. `nodes` as gather() returns them; with no other
// node a VM can always move into a new QEMU on its own node.
json migratability(const config::VmSpec* spec, const std::vector<json>& nodes, const std::string& source,
                   const std::string& name);

} // namespace ferry::scheduler
