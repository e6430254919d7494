#pragma once
// End-to-end benchmark of a same-node migration: ferry's engine against
// QEMU's own path (plain `migrate` between two QEMUs), same VM, same host.
#include "common/error.hpp"
#include "config/node_config.hpp"
#include "config/vm_spec.hpp"
#include "series.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <optional>
#include <string>

namespace ferry::bench {

struct Sample {
    double wall_ms = 0;     // request to destination running (includes starting it)
    double total_ms = 0;    // QEMU total-time
    double downtime_ms = 0; // QEMU downtime
    std::optional<double> blackout_ms;
    double transferred_mib = 0;
    double first_pass_mib = 0;          // sent by the end of the first pass (the second dirty sync)
    std::string outcome = "succeeded"; // or "failed: <reason>" / "timeout"
    std::string mode = "precopy";
    int throttle_percent = 0;          // the highest reached
    Series series;                     // progress over time, from the migration request
};

struct LocalSetup {
    config::NodeConfig node;
    config::VmSpec spec;
    std::string work_dir;
    bool qemu_auto_converge = false;   // direct path: QEMU's own auto-converge capability
    int qemu_postcopy_after_syncs = 0; // direct path: migrate-start-postcopy after this many rounds (0 = never)
    std::chrono::seconds time_limit{0}; // direct path: cancel after this (0 = never)
    bool keep_failures = false;        // a failed migration is a sample, not an error
};

boost::asio::awaitable<Result<Sample>> run_qemu_direct(LocalSetup setup);
boost::asio::awaitable<Result<Sample>> run_ferry(LocalSetup setup);

} // namespace ferry::bench
