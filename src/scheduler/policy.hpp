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

using Labels = std::map<std::string, std::string>;

// Settings a policy or a request may set; unset ones fall through.
struct MigrationSettings {
    std::optional<std::uint64_t> bandwidth_per_migration; // bytes/s, 0 = unlimited
    std::optional<std::int64_t> max_downtime_ms;
    std::optional<std::int64_t> completion_timeout_per_gib;
    std::optional<std::int64_t> progress_timeout;
    std::optional<bool> allow_auto_converge;
    std::optional<bool> allow_post_copy;
};

struct Policy {
    std::string name;
    Labels vm_selector;   // matched against the VM's labels
    Labels node_selector; // matched against the labels of the node the VM runs on
    MigrationSettings settings;
};

// Every key of `selector` is in `labels` with the same value (an empty
// selector matches anything).
bool matches(const Labels& selector, const Labels& labels);

// The policy that applies, or null.
const Policy* select_policy(const std::vector<Policy>& policies, const Labels& vm_labels, const Labels& node_labels);

// The node's defaults, overridden by the policy's settings, overridden by
// the request's.
config::MigrationConfig resolve(const config::MigrationConfig& defaults, const Policy* policy,
                                const MigrationSettings& request);

} // namespace ferry::scheduler
