#pragma once
// ferryd.toml: the node, its TLS material, cluster migration defaults, peers.
#include "common/error.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ferry::config {

// Defaults and meanings follow KubeVirt's MigrationConfiguration.
struct MigrationConfig {
    std::int64_t parallel_migrations_per_cluster = 5;
    std::int64_t parallel_outbound_migrations_per_node = 2;
    std::int64_t parallel_inbound_migrations_per_node = 2;
    std::uint64_t bandwidth_per_migration = 64ULL << 20; // bytes/s, 0 = unlimited
    std::int64_t completion_timeout_per_gib = 800;       // seconds per GiB, 0 = none
    std::int64_t progress_timeout = 150;                 // seconds, 0 = none
    bool allow_auto_converge = false;
    bool allow_post_copy = false;
    bool postcopy_preempt = true; // post-copy's urgent pages on a channel of their own
    bool disable_tls = false;
    std::int64_t max_downtime_ms = 300;
    std::int64_t multifd_channels = 0;
    std::int64_t peer_timeout = 30; // seconds of silence after which a peer is dead
    std::int64_t finished_migrations_per_vm = 5; // records kept per VM once ended
};

struct NodeSection {
    std::string name;
    std::string state_dir = "/var/lib/ferry";
    std::string control_socket = "/run/ferry/ferryd.sock";
    std::string control_socket_mode = "0600";
    // The group the control socket belongs to (its members may use ferryctl;
    // the mode may then let the group write, like "0660"); empty: ferryd's.
    std::string control_socket_group;
    bool insecure_control_socket = false; // allow other users to write the socket
    std::int64_t control_max_connections = 64;
    std::int64_t control_idle_timeout = 60; // seconds without a whole request
    std::string listen = "0.0.0.0:7410";
    std::uint64_t max_migration_bandwidth = 0;
    std::string qemu = "qemu-system-x86_64";
    // The wrapper launcher: an argv prefix QEMU is started through (e.g.
    // ["systemd-run", "--scope", "--quiet"] or ["ip", "netns", "exec", "blue"]).
    // It must exec QEMU in the process ferry starts. Empty: QEMU directly.
    std::vector<std::string> qemu_wrapper;
    // Who starts the QEMU of a migration arriving here: "builtin" (ferry,
    // through qemu_wrapper) or "external" (the stack, told by a "launch"
    // event; it registers the QEMU with migration.register_target).
    std::string launcher = "builtin";
    std::int64_t external_launch_timeout = 60; // seconds ferry waits for that registration
    std::string accel = "auto"; // auto (kvm if /dev/kvm is usable, else tcg), kvm, tcg
    std::string log_level = "info";
    std::map<std::string, std::string> labels; // matched by VMs' node_selector and policies
    // vCPUs the scheduler places per host CPU (KubeVirt's cpuAllocationRatio).
    std::int64_t cpu_allocation_ratio = 10;
    // A VM's console.log rotates to console.log.1 past this size (bytes).
    std::uint64_t console_log_max = 16 << 20;
};

struct TlsSection {
    std::string ca;
    std::string cert;
    std::string key;
};

struct Peer {
    std::string name;
    std::string address;
};

// Where a mirrored disk lands on this node: a disk arriving at a path under
// `from` is written under `to` instead ([[block.path_map]]).
struct DiskPathMap {
    std::string from;
    std::string to;
};

struct BlockSection {
    std::vector<DiskPathMap> path_map;
    // Run (through /bin/sh) to create a missing target block device, with
    // {path}, {name} (its file name) and {size} (bytes) filled in; empty:
    // block devices must exist on the target.
    std::string create_command;
    // An existing regular file at a target path is refused unless this is
    // set; then its content is replaced by the disk's (and a failed
    // migration leaves it partly copied).
    bool reuse_existing = false;
};

// The path a disk at `path` on the source gets on this node: the longest
// `from` that is `path` or a directory above it, replaced by its `to`; the
// same path when none matches.
std::string map_disk_path(const BlockSection& block, const std::string& path);

// [hooks]: the executables run at each phase of a migration on this node
// (docs/hooks.md), and what the node the VM arrives on does for its network.
struct HooksSection {
    std::string dir;            // empty: no hooks
    std::int64_t timeout = 30;  // seconds one hook may run before its process group is killed
    bool announce_self = true;  // QMP announce-self once the guest runs here after a migration
};

// [metrics]: Prometheus metrics over HTTP (docs/metrics.md).
struct MetricsSection {
    std::string listen; // "host:port"; empty: no listener
};

using Labels = std::map<std::string, std::string>;

// Settings a policy (or a request) may set; unset ones fall through to the
// node's [migration] defaults. Node limits and security are not among them.
struct MigrationSettings {
    std::optional<std::uint64_t> bandwidth_per_migration; // bytes/s, 0 = unlimited
    std::optional<std::int64_t> max_downtime_ms;
    std::optional<std::int64_t> completion_timeout_per_gib;
    std::optional<std::int64_t> progress_timeout;
    std::optional<bool> allow_auto_converge;
    std::optional<bool> allow_post_copy;
};

// [[policies]]: settings for the VMs whose labels match vm_selector, on
// nodes whose labels match node_selector.
struct MigrationPolicy {
    std::string name;
    Labels vm_selector;
    Labels node_selector;
    MigrationSettings settings;
};

struct NodeConfig {
    NodeSection node;
    TlsSection tls;
    MigrationConfig migration;
    BlockSection block;
    HooksSection hooks;
    MetricsSection metrics;
    std::vector<Peer> peers;
    std::vector<MigrationPolicy> policies;

    std::string file;                         // where it was read from
    std::map<std::string, std::int64_t> lines; // dotted key -> line, for keys that were set
    // "file:line: key 'tls.cert'" (or "file: key 'tls.cert'" for a default),
    // for errors found after parsing (files, addresses at start-up).
    std::string where(const std::string& key) const;
};

// A node name: the rules of a VM name (1-63 of a-z, 0-9 and '-', starting
// and ending with a letter or digit), so it fits a certificate and a path.
bool valid_node_name(std::string_view name);

// Checks "host:port": host an IP address ([v6] in brackets) or localhost,
// port 1-65535. The error says what is wrong.
Result<void> check_address(std::string_view address);

// QEMU's sockets live under state_dir/vms/<vm>/r<N>/; a Unix socket path
// holds 107 bytes. The longest VM name that fits under state_dir:
std::size_t max_vm_name_length(const std::string& state_dir);
constexpr std::size_t min_vm_name_room = 16; // state_dir must leave this much

Result<NodeConfig> load_node_config(const std::string& path);
Result<NodeConfig> parse_node_config(std::string_view text, const std::string& name);

void to_json(nlohmann::json& j, const MigrationConfig& c);

} // namespace ferry::config
