#include "config/node_config.hpp"

#include "config/quantity.hpp"
#include "config/reader.hpp"

#include <fmt/format.h>

namespace ferry::config {

namespace {

const toml::table* subtable(TableReader& r, std::string_view key) {
    auto* n = r.node(key);
    if (!n)
        return nullptr;
    if (auto* t = n->as_table())
        return t;
    r.problems().add(n->source(), fmt::format("key '{}': expected a table", key));
    return nullptr;
}

bool valid_mode(const std::string& mode) {
    if (mode.size() < 3 || mode.size() > 4)
        return false;
    for (char c : mode)
        if (c < '0' || c > '7')
            return false;
    return true;
}

void read_node(const toml::table& t, Problems& p, NodeSection& n) {
    TableReader r(t, p, "node");
    if (r.require("name"))
        r.get("name", n.name);
    r.get("state_dir", n.state_dir);
    r.get("control_socket", n.control_socket);
    r.get("control_socket_mode", n.control_socket_mode);
    r.get("listen", n.listen);
    r.get_quantity("max_migration_bandwidth", n.max_migration_bandwidth);
    r.get("qemu", n.qemu);
    r.get("accel", n.accel);
    r.get("log_level", n.log_level);
    static const std::set<std::string> levels{"trace", "debug", "info", "warn", "error", "critical", "off"};
    if (!levels.count(n.log_level))
        p.add(t.get("log_level")->source(),
              fmt::format("key 'node.log_level': \"{}\" is not one of trace, debug, info, warn, "
                          "error, critical, off",
                          n.log_level));
    if (n.accel != "auto" && n.accel != "kvm" && n.accel != "tcg")
        p.add(t.get("accel")->source(),
              fmt::format("key 'node.accel': \"{}\" is not auto, kvm or tcg", n.accel));
    if (!valid_mode(n.control_socket_mode))
        p.add(t.get("control_socket_mode")->source(),
              fmt::format("key 'node.control_socket_mode': \"{}\" is not an octal mode like \"0600\"",
                          n.control_socket_mode));
    if (t.contains("name") && n.name.empty())
        p.add(t.get("name")->source(), "key 'node.name': must not be empty");
    r.finish();
}

void read_migration(const toml::table& t, Problems& p, MigrationConfig& m) {
    TableReader r(t, p, "migration");
    r.get("parallel_migrations_per_cluster", m.parallel_migrations_per_cluster, 1, 1000);
    r.get("parallel_outbound_migrations_per_node", m.parallel_outbound_migrations_per_node, 1, 1000);
    r.get_quantity("bandwidth_per_migration", m.bandwidth_per_migration);
    r.get("completion_timeout_per_gib", m.completion_timeout_per_gib, 0, 1'000'000);
    r.get("progress_timeout", m.progress_timeout, 0, 1'000'000);
    r.get("allow_auto_converge", m.allow_auto_converge);
    r.get("allow_post_copy", m.allow_post_copy);
    r.get("disable_tls", m.disable_tls);
    r.get("max_downtime_ms", m.max_downtime_ms, 1, 2'000'000);
    r.get("multifd_channels", m.multifd_channels, 0, 255);
    r.get("peer_timeout", m.peer_timeout, 3, 3600);
    r.finish();
}

Result<NodeConfig> read(const toml::table& root, const std::string& name) {
    Problems p(name);
    NodeConfig c;
    TableReader r(root, p, "");
    if (!r.require("node")) {
        // fall through to report the rest too
    }
    if (auto* t = subtable(r, "node"))
        read_node(*t, p, c.node);
    if (auto* t = subtable(r, "tls")) {
        TableReader tr(*t, p, "tls");
        tr.get("ca", c.tls.ca);
        tr.get("cert", c.tls.cert);
        tr.get("key", c.tls.key);
        tr.finish();
    }
    if (auto* t = subtable(r, "migration"))
        read_migration(*t, p, c.migration);
    if (auto* n = r.node("peers")) {
        auto* arr = n->as_array();
        if (!arr) {
            p.add(n->source(), "key 'peers': expected an array of tables ([[peers]])");
        } else {
            for (std::size_t i = 0; i < arr->size(); ++i) {
                auto* t = arr->get(i)->as_table();
                if (!t) {
                    p.add(arr->get(i)->source(), fmt::format("key 'peers[{}]': expected a table", i));
                    continue;
                }
                TableReader pr(*t, p, fmt::format("peers[{}]", i));
                Peer peer;
                if (pr.require("name"))
                    pr.get("name", peer.name);
                if (pr.require("address"))
                    pr.get("address", peer.address);
                pr.finish();
                c.peers.push_back(peer);
            }
        }
    }
    r.finish();
    if (!p.empty())
        return p.error();
    return c;
}

} // namespace

Result<NodeConfig> load_node_config(const std::string& path) {
    auto table = parse_toml_file(path);
    if (!table)
        return table.error();
    return read(*table, path);
}

Result<NodeConfig> parse_node_config(std::string_view text, const std::string& name) {
    auto table = parse_toml_string(text, name);
    if (!table)
        return table.error();
    return read(*table, name);
}

void to_json(nlohmann::json& j, const MigrationConfig& c) {
    j = nlohmann::json{
        {"parallel_migrations_per_cluster", c.parallel_migrations_per_cluster},
        {"parallel_outbound_migrations_per_node", c.parallel_outbound_migrations_per_node},
        {"bandwidth_per_migration", c.bandwidth_per_migration},
        {"completion_timeout_per_gib", c.completion_timeout_per_gib},
        {"progress_timeout", c.progress_timeout},
        {"allow_auto_converge", c.allow_auto_converge},
        {"allow_post_copy", c.allow_post_copy},
        {"disable_tls", c.disable_tls},
        {"max_downtime_ms", c.max_downtime_ms},
        {"multifd_channels", c.multifd_channels},
        {"peer_timeout", c.peer_timeout},
    };
}

} // namespace ferry::config
