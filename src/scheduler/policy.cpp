#include "scheduler/policy.hpp"

namespace ferry::scheduler {

bool matches(const Labels& selector, const Labels& labels) {
    for (auto& [key, value] : selector) {
        auto it = labels.find(key);
        if (it == labels.end() || it->second != value)
            return false;
    }
    return true;
}

const Policy* select_policy(const std::vector<Policy>& policies, const Labels& vm_labels, const Labels& node_labels) {
    const Policy* best = nullptr;
    std::size_t best_labels = 0;
    for (auto& p : policies) {
        if (!matches(p.vm_selector, vm_labels) || !matches(p.node_selector, node_labels))
            continue;
        auto n = p.vm_selector.size() + p.node_selector.size();
        if (!best || n > best_labels || (n == best_labels && p.name < best->name)) {
            best = &p;
            best_labels = n;
        }
    }
    return best;
}

namespace {
template <class T, class U>
void take(T& setting, const std::optional<U>& given) {
    if (given)
        setting = *given;
}

void apply(config::MigrationConfig& c, const MigrationSettings& s) {
    take(c.bandwidth_per_migration, s.bandwidth_per_migration);
    take(c.max_downtime_ms, s.max_downtime_ms);
    take(c.completion_timeout_per_gib, s.completion_timeout_per_gib);
    take(c.progress_timeout, s.progress_timeout);
    take(c.allow_auto_converge, s.allow_auto_converge);
    take(c.allow_post_copy, s.allow_post_copy);
}
} // namespace

config::MigrationConfig resolve(const config::MigrationConfig& defaults, const Policy* policy,
                                const MigrationSettings& request) {
    auto c = defaults;
    if (policy)
        apply(c, policy->settings);
    apply(c, request);
    return c;
}

Resolved resolve_for(const config::NodeConfig& node, const Labels& vm_labels, const MigrationSettings& request) {
    auto* policy = select_policy(node.policies, vm_labels, node.node.labels);
    return {resolve(node.migration, policy, request), policy};
}

} // namespace ferry::scheduler
