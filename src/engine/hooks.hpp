#pragma once
// Hooks: the executables of [hooks] dir, run at each phase of a migration on
// the node where that phase happens (docs/hooks.md is the contract).
#include "config/node_config.hpp"
#include "config/vm_spec.hpp"
#include "engine/migration.hpp"
#include "qmp/client.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <string>
#include <vector>

namespace ferry::engine {

// Where in a migration a hook runs. Before the switchover (prepare,
// launched) a failure aborts the migration; after it (activated, released)
// and on the way out (aborted) it is reported and nothing is rolled back.
enum class HookPhase { Prepare, Launched, Activated, Released, Aborted };
std::string_view to_string(HookPhase p);
inline bool hook_can_abort(HookPhase p) { return p == HookPhase::Prepare || p == HookPhase::Launched; }

struct HookCall {
    HookPhase phase = HookPhase::Prepare;
    std::string role; // "source" or "target"
    const Migration* migration = nullptr;
    const config::VmSpec* spec = nullptr;
    std::string node; // this node's name
    int qemu_pid = -1; // this side's QEMU, when it has one
};

// The hooks of a directory, in the order they run: regular executable files,
// by name (bytewise), skipping hidden files and editor and package leftovers
// (names ending in ~, .dpkg-*, .rpm*, .swp), as run-parts does. Any other
// file it skips (not executable, a directory, a dangling symlink) is logged,
// once per path and reason. An unreadable directory is an error ("" is no
// hooks).
Result<std::vector<std::string>> list_hooks(const std::string& dir);

// Whether `path`, a hooks directory or a hook, may be run as ferryd, as
// sshd, cron and run-parts decide: after its symlinks, it is owned by root or
// by ferryd's effective uid and writable by that owner alone; for a file, so
// is the directory that holds it (after the symlinks). Otherwise, or when
// it cannot be stat'ed, an error that names the path and why.
Result<void> check_hook_path(const std::string& path);

// check_hook_path of `dir` and of each of its hooks; the first that fails
// ("" has no hooks and passes).
Result<void> check_hooks(const std::string& dir);

// What one hook printed on stderr is kept up to this much (its end).
constexpr std::size_t hook_stderr_limit = 4096;

// Runs the hooks of `hooks.dir` for one call, in order. Each gets the
// migration and spec as JSON on stdin, FERRY_* variables, and
// min(hooks.timeout, deadline - now) to finish; then its process group is
// killed. When the phase can abort, the first failure stops the rest and is
// returned as the error; otherwise every hook runs and each failure is one
// entry of the returned list. The directory and its hooks are checked
// (check_hook_path) before any runs: a directory that fails runs none, and
// a hook that fails does not run and counts as failed (when the phase can
// abort, before any hook of it ran).
boost::asio::awaitable<Result<std::vector<std::string>>> run_hooks(boost::asio::any_io_executor ex,
                                                                   const config::HooksSection& hooks,
                                                                   const HookCall& call,
                                                                   std::chrono::steady_clock::time_point deadline);

class Node;
// run_hooks, then a "hooks" event for the run (how many hooks, what
// failed). The failures of a phase that cannot abort are added to
// `warnings`; true when there were some.
boost::asio::awaitable<Result<bool>> run_phase_hooks(Node& node, const config::HooksSection& hooks,
                                                     const HookCall& call,
                                                     std::chrono::steady_clock::time_point deadline,
                                                     std::vector<std::string>& warnings);

// QMP announce-self with QEMU's default timing (RARP/GARP from every NIC,
// 5 rounds 50..550 ms apart), so switches learn where the guest is now.
boost::asio::awaitable<Result<void>> announce_self(qmp::Client& qmp);

// The JSON a hook reads on stdin.
nlohmann::json hook_input(const HookCall& call);

} // namespace ferry::engine
