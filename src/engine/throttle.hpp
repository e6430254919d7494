#pragma once
// ferry's auto-converge: limits the CPU time of a VM's vCPU threads through
// the cgroup `cpu` controller, so the guest dirties memory more slowly.
//
// The vCPU threads (from query-cpus-fast) move into a child group of the
// cgroup they are in, named ferry-throttle-<vm>: under cgroup v1 in the `cpu`
// hierarchy (cpu.cfs_quota_us), under cgroup v2 as a threaded child
// (cpu.max). Releasing moves them back and removes the group; a restarted
// ferryd releases groups left behind (release_stale), so a throttle never
// outlives its migration.
#include "common/error.hpp"

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

namespace ferry::engine {

class CpuThrottle {
public:
    // Creates the group and moves the threads into it, unthrottled.
    static Result<std::unique_ptr<CpuThrottle>> create(const std::string& vm, pid_t pid, std::vector<pid_t> threads);
    ~CpuThrottle();
    CpuThrottle(const CpuThrottle&) = delete;
    CpuThrottle& operator=(const CpuThrottle&) = delete;

    // 0..99: the share of CPU time taken away from each vCPU.
    Result<void> set(int percent);
    int percent() const { return percent_; }
    // Moves the threads back and removes the group. Idempotent.
    Result<void> release();
    const std::string& group() const { return group_; }

    // Releases every ferry-throttle-<vm> group a dead ferryd left behind
    // around the threads of pid.
    static void release_stale(const std::string& vm, pid_t pid);

private:
    CpuThrottle() = default;
    bool v2_ = false;
    std::string group_;  // the throttle group's directory
    std::string parent_; // where the threads were, and go back to
    pid_t pid_ = -1;
    std::vector<pid_t> threads_;
    int percent_ = 0;
    bool released_ = false;
};

} // namespace ferry::engine
