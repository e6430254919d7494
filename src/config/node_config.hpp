#pragma once
// ferryd.toml: the node, its TLS material, cluster migration defaults, peers.
#include "common/error.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace ferry::config {

// Defaults and meanings follow KubeVirt's MigrationConfiguration.
struct MigrationConfig {
    std::int64_t parallel_migrations_per_cluster = 5;
    std::int64_t parallel_outbound_migrations_per_node = 2;
    std::uint64_t bandwidth_per_migration = 64ULL << 20; // bytes/s, 0 = unlimited
    std::int64_t completion_timeout_per_gib = 800;       // seconds per GiB, 0 = none
    std::int64_t progress_timeout = 150;                 // seconds, 0 = none
    bool allow_auto_converge = false;
    bool allow_post_copy = false;
    bool disable_tls = false;
    std::int64_t max_downtime_ms = 300;
    std::int64_t multifd_channels = 0;
    std::int64_t peer_timeout = 30; // seconds of silence after which a peer is dead
};

struct NodeSection {
    std::string name;
    std::string state_dir = "/var/lib/ferry";
    std::string control_socket = "/run/ferry/ferryd.sock";
    std::string control_socket_mode = "0600";
    std::string listen = "0.0.0.0:7410";
    std::uint64_t max_migration_bandwidth = 0;
    std::string qemu = "qemu-system-x86_64";
    std::string accel = "auto"; // auto (kvm if /dev/kvm is usable, else tcg), kvm, tcg
    std::string log_level = "info";
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

struct NodeConfig {
    NodeSection node;
    TlsSection tls;
    MigrationConfig migration;
    std::vector<Peer> peers;
};

Result<NodeConfig> load_node_config(const std::string& path);
Result<NodeConfig> parse_node_config(std::string_view text, const std::string& name);

void to_json(nlohmann::json& j, const MigrationConfig& c);

} // namespace ferry::config
