#pragma once
// ferry-bench scheduler: the planner alone on a simulated cluster (no QEMU,
// no sockets): plan the drain of one node's VMs and place a queue of
// migrations, timing each and reporting the process's peak memory.
#include <string>

namespace ferry::bench {

struct SchedulerOptions {
    int nodes = 1000;
    int vms = 10000;
    int drain_vms = 100; // VMs on the node that is drained
    int queued = 1000;   // migrations queued without a target
    int reps = 5;
    bool json = false;
};

int run_scheduler_bench(const SchedulerOptions& o);

} // namespace ferry::bench
