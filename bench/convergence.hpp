#pragma once
// ferry-bench convergence: a guest dirtying faster than the bandwidth, run
// through each strategy (dirty rate x bandwidth x strategy), with QEMU's own
// auto-converge capability beside ferry's throttling.
#include <string>

namespace ferry::bench {

struct ConvergenceOptions {
    std::string memory = "256Mi";
    int ws_mib = 64;
    int stride = 1;                   // the guest's sweep stride (1: in order)
    std::string rates = "32,64";      // guest dirty rates, MiB/s
    std::string bandwidths = "16Mi";  // per-migration bandwidths
    std::string strategies = "ferry-none,ferry-throttle,ferry-postcopy,qemu-autoconverge,qemu-postcopy";
    int completion_timeout_per_gib = 160; // 40 s for 256 MiB
    int max_downtime_ms = 300;
    int reps = 1;
    std::string kernel;
    std::string work_dir = "/tmp/ferry-bench";
    bool json = false;
};

int run_convergence_bench(const ConvergenceOptions& o);

} // namespace ferry::bench
