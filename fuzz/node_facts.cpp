// Fuzz target: the facts a peer sends in answer to "facts" (a JSON array of
// node objects here), turned into views and a placement.
#include "scheduler/cluster.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    auto j = nlohmann::json::parse(std::string_view(reinterpret_cast<const char*>(data), size), nullptr, false);
    if (!j.is_array())
        return 0;
    std::vector<nlohmann::json> nodes(j.begin(), j.end());
    for (auto& n : nodes) {
        (void)ferry::scheduler::node_view(n);
        (void)ferry::scheduler::vm_view(n, "demo");
    }
    std::string source = "node-a";
    if (!nodes.empty() && nodes[0].is_object() && nodes[0].contains("name") && nodes[0]["name"].is_string())
        source = nodes[0]["name"].get<std::string>();
    if (auto p = ferry::scheduler::place_vm(nodes, source, "demo")) {
        (void)ferry::scheduler::to_json(*p);
        (void)p->why_none("demo");
    }
    return 0;
}
