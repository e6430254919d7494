#pragma once
// Migration policies ([[policies]] in ferryd.toml), with KubeVirt's
// precedence: of the policies whose selectors all match, the one with the
// most matching labels wins, then the first by name. Pure: unit-tested.
//
// A policy sets some migration settings; the rest fall through to the
// node's [migration] defaults, and a setting given with the request beats
// both. Node limits (parallel_*) and security (disable_tls) are never a
// policy's or a request's to change.
#include "config/node_config.hpp"

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ferry::scheduler {

using Labels = config::Labels;
using MigrationSettings = config::MigrationSettings;
using Policy = config::MigrationPolicy; // [[policies]] in ferryd.toml

// Every key of `selector` is in `labels` with the same value (an empty
// selector matches anything).
bool matches(const Labels& selector, const Labels& labels);

// The policy that applies, or null.
const Policy* select_policy(const std::vector<Policy>& policies, const Labels& vm_labels, const Labels& node_labels);

// The node's defaults, overridden by the policy's settings, overridden by
// the request's.
config::MigrationConfig resolve(const config::MigrationConfig& defaults, const Policy* policy,
                                const MigrationSettings& request);

// What a migration of a VM labelled `vm_labels` from this node runs with:
// the policy that applies (by the VM's labels and this node's) and the
// settings resolved from the node's defaults, that policy and the request.
struct Resolved {
    config::MigrationConfig config;
    const Policy* policy = nullptr;
};
Resolved resolve_for(const config::NodeConfig& node, const Labels& vm_labels, const MigrationSettings& request);

} // namespace ferry::scheduler
