#pragma once
// VMs: the persisted record, and the QEMU instance ferry talks to.
#include "config/node_config.hpp"
#include "config/vm_spec.hpp"
#include "engine/console.hpp"
#include "qmp/client.hpp"

#include <boost/asio/awaitable.hpp>
#include <nlohmann/json.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ferry::engine {

// One QEMU process of a VM. A VM's QEMU changes with every migration; each
// launch gets a new generation and its own run directory.
struct QemuInstance {
    int pid = -1;
    int generation = 0;
    std::string run_dir; // empty for an adopted QEMU
    std::string qmp_socket;
    std::string console_file; // the guest's serial output, written by QEMU
    std::shared_ptr<qmp::Client> qmp;
    std::shared_ptr<ConsoleCapture> console;

    std::string migrate_socket() const { return run_dir + "/migrate.sock"; }
    std::string log_path() const { return run_dir + "/qemu.log"; }
};

struct VmRecord {
    std::optional<config::VmSpec> spec; // absent for a VM adopted without one
    std::string name;
    std::string node;
    bool adopted = false;
    std::string created_at;
    int pid = -1;
    int generation = 0;
    std::string run_dir;
    std::string qmp_socket;
};

// A VM this node keeps: its record and the QEMU that runs it now.
struct Vm {
    VmRecord record;
    QemuInstance qemu;
    std::string status = "unknown"; // QEMU run state, or "stopped" when it is gone
    std::optional<std::string> migration_id;
    bool deleting = false; // its QEMU is being stopped on purpose
};

void to_json(nlohmann::json& j, const VmRecord& r);
void from_json(const nlohmann::json& j, VmRecord& r);

struct LaunchRequest {
    const config::NodeSection* node = nullptr;
    const config::VmSpec* spec = nullptr;
    std::string vm_dir;      // <state_dir>/vms/<name>
    int generation = 1;
    bool incoming = false;   // a migration destination (-incoming defer)
    // A cross-node destination stays paused after the stream completes (-S)
    // until the source says so, so the VM never runs on two nodes.
    bool hold = false;
};

// A launch's run directory (made, empty) and QEMU's argv, the wrapper not
// included: what launch_qemu runs, and what an external launcher is asked to.
struct PreparedLaunch {
    QemuInstance qemu; // generation, run_dir and the socket paths
    std::vector<std::string> argv;
};
Result<PreparedLaunch> prepare_launch(const LaunchRequest& request);

// Starts QEMU, connects QMP and the console capture; a source is started
// paused and resumed once the console is attached so no output is lost.
// A QEMU that dies on start gives an error with the end of its log.
boost::asio::awaitable<Result<QemuInstance>> launch_qemu(boost::asio::any_io_executor ex,
                                                         LaunchRequest request);

// Stops an instance: QMP quit, then SIGTERM/SIGKILL; removes its run dir.
boost::asio::awaitable<void> destroy_qemu(boost::asio::any_io_executor ex, QemuInstance& qemu);

// Whether a QEMU that ferry did not start matches the spec: memory (under
// TCG the 8 KiB more guest_ram adds) and vCPUs.
boost::asio::awaitable<Result<void>> check_adopted(qmp::Client& qmp, const config::VmSpec& spec,
                                                   const std::string& accel);

// The last lines of a QEMU log, for error messages.
std::string log_tail(const std::string& path, std::size_t max_bytes = 600);

} // namespace ferry::engine
