#include "config/node_config.hpp"

#include "config/quantity.hpp"
#include "config/reader.hpp"
#include "config/vm_spec.hpp"

#include <boost/asio/ip/address.hpp>
#include <fmt/ranges.h>

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

// Longest path ferry puts under state_dir: "/vms/" + name + "/r<gen>/migrate-r<n>.sock".
constexpr std::size_t run_path_overhead = 5 + 2 + 6 + 10 + 4 + 5 + 1;
constexpr std::size_t max_socket_path = 107;

void check_path(const toml::table& t, Problems& p, std::string_view key, const std::string& value) {
    auto* n = t.get(key);
    if (!n)
        return;
    if (value.empty())
        p.add(n->source(), fmt::format("key 'node.{}': must not be empty", key));
    else if (value.front() != '/')
        p.add(n->source(), fmt::format("key 'node.{}': \"{}\" must be an absolute path", key, value));
}

void read_node(const toml::table& t, Problems& p, NodeSection& n) {
    TableReader r(t, p, "node");
    r.get_required("name", n.name);
    r.get("state_dir", n.state_dir);
    r.get("control_socket", n.control_socket);
    r.get("control_socket_mode", n.control_socket_mode);
    r.get("control_socket_group", n.control_socket_group);
    r.get("insecure_control_socket", n.insecure_control_socket);
    r.get("control_max_connections", n.control_max_connections, 1, 10000);
    r.get("control_idle_timeout", n.control_idle_timeout, 1, 86400);
    r.get("listen", n.listen);
    r.get_quantity("max_migration_bandwidth", n.max_migration_bandwidth);
    r.get_quantity("console_log_max", n.console_log_max);
    if (n.console_log_max < (64 << 10))
        p.add(t.get("console_log_max")->source(),
              fmt::format("key 'node.console_log_max': {} bytes is less than the least, 64Ki", n.console_log_max));
    r.get("qemu", n.qemu);
    r.get("qemu_wrapper", n.qemu_wrapper);
    for (std::size_t i = 0; i < n.qemu_wrapper.size(); ++i)
        if (n.qemu_wrapper[i].empty())
            p.add(t.get("qemu_wrapper")->source(), fmt::format("key 'node.qemu_wrapper': element {} is empty", i));
    r.get("launcher", n.launcher);
    if (n.launcher != "builtin" && n.launcher != "external")
        p.add(t.get("launcher")->source(),
              fmt::format("key 'node.launcher': \"{}\" is not builtin or external (a wrapper is builtin with "
                          "qemu_wrapper)",
                          n.launcher));
    r.get("external_launch_timeout", n.external_launch_timeout, 5, 85);
    r.get("accel", n.accel);
    r.get("log_level", n.log_level);
    r.get_labels("labels", n.labels);
    r.get("cpu_allocation_ratio", n.cpu_allocation_ratio, 1, 100);
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
    else if ((std::stoul(n.control_socket_mode, nullptr, 8) & 0600) != 0600)
        p.add(t.get("control_socket_mode")->source(),
              fmt::format("key 'node.control_socket_mode': \"{}\" does not let the socket's owner (ferryd's user) "
                          "read and write it, and a client connects by writing it; use \"0600\"",
                          n.control_socket_mode));
    else if (auto mode = std::stoul(n.control_socket_mode, nullptr, 8);
             (mode & 002 || (mode & 020 && n.control_socket_group.empty())) && !n.insecure_control_socket)
        p.add(t.get("control_socket_mode")->source(),
              fmt::format("key 'node.control_socket_mode': \"{}\" lets {} write the control socket, and whoever can "
                          "write it can run programs as ferryd's user (root); use \"0600\"{}, or set "
                          "insecure_control_socket = true if you mean it",
                          n.control_socket_mode, mode & 002 ? "every user" : "ferryd's group",
                          mode & 002 ? ", or \"0660\" with control_socket_group" : ", or name the group that may "
                                                                                  "(control_socket_group)"));
    if (t.contains("name") && t.get("name")->is_string() && !valid_node_name(n.name))
        p.add(t.get("name")->source(),
              fmt::format("key 'node.name': \"{}\" is not a valid node name (1-63 characters of a-z, 0-9 and "
                          "'-', starting and ending with a letter or digit)",
                          n.name));
    check_path(t, p, "state_dir", n.state_dir);
    check_path(t, p, "control_socket", n.control_socket);
    if (n.control_socket.size() > max_socket_path)
        p.add(t.get("control_socket")->source(),
              fmt::format("key 'node.control_socket': the path is {} bytes; a Unix socket path holds at most {}",
                          n.control_socket.size(), max_socket_path));
    if (max_vm_name_length(n.state_dir) < min_vm_name_room) {
        auto* sd = t.get("state_dir");
        auto message = fmt::format("key 'node.state_dir': \"{}\" is {} bytes; QEMU's sockets live under it and a "
                                   "Unix socket path holds {} bytes, so it may be at most {} bytes long",
                                   n.state_dir, n.state_dir.size(), max_socket_path,
                                   max_socket_path - run_path_overhead - min_vm_name_room);
        sd ? p.add(sd->source(), message) : p.add(message);
    }
    if (auto* l = t.get("listen"); l && l->is_string() && !n.listen.empty()) { // "" turns it off
        if (auto a = check_address(n.listen); !a)
            p.add(l->source(), fmt::format("key 'node.listen': {}", a.error().message));
    }
    r.finish();
}

void read_migration(const toml::table& t, Problems& p, MigrationConfig& m) {
    TableReader r(t, p, "migration");
    r.get("parallel_migrations_per_cluster", m.parallel_migrations_per_cluster, 1, 1000);
    r.get("parallel_outbound_migrations_per_node", m.parallel_outbound_migrations_per_node, 1, 1000);
    r.get("parallel_inbound_migrations_per_node", m.parallel_inbound_migrations_per_node, 1, 1000);
    r.get_quantity("bandwidth_per_migration", m.bandwidth_per_migration);
    r.get("completion_timeout_per_gib", m.completion_timeout_per_gib, 0, 1'000'000);
    r.get("progress_timeout", m.progress_timeout, 0, 1'000'000);
    r.get("allow_auto_converge", m.allow_auto_converge);
    r.get("allow_post_copy", m.allow_post_copy);
    r.get("postcopy_preempt", m.postcopy_preempt);
    r.get("disable_tls", m.disable_tls);
    r.get("max_downtime_ms", m.max_downtime_ms, 1, 2'000'000);
    r.get("multifd_channels", m.multifd_channels, 0, 255);
    r.get("peer_timeout", m.peer_timeout, 3, 3600);
    r.get("finished_migrations_per_vm", m.finished_migrations_per_vm, 1, 10000);
    // QEMU cannot combine them (engine::postcopy_enabled would drop post-copy).
    if (m.allow_post_copy && m.multifd_channels > 0)
        p.add(t.get("allow_post_copy")->source(),
              fmt::format("key 'migration.allow_post_copy': true together with key 'migration.multifd_channels' = {} "
                          "(line {}): QEMU cannot do post-copy with multifd; set one of them",
                          m.multifd_channels, t.get("multifd_channels")->source().begin.line));
    r.finish();
}

std::string trim_slashes(std::string p) {
    while (p.size() > 1 && p.back() == '/')
        p.pop_back();
    return p;
}

void read_block(const toml::table& t, Problems& p, BlockSection& b) {
    TableReader r(t, p, "block");
    r.get("create_command", b.create_command);
    r.get("reuse_existing", b.reuse_existing);
    if (auto* n = t.get("create_command"); n && n->is_string() &&
        b.create_command.find_first_not_of(" \t\n\r\f\v") == std::string::npos)
        p.add(n->source(), "key 'block.create_command': the command is empty; leave the key out when target block "
                           "devices must exist already");
    r.tables("path_map", [&](const toml::table& e, std::size_t i) {
        auto key = fmt::format("block.path_map[{}]", i);
        TableReader er(e, p, key);
        DiskPathMap m;
        er.get_required("from", m.from);
        er.get_required("to", m.to);
        er.finish();
        for (auto [field, value] : {std::pair{"from", &m.from}, std::pair{"to", &m.to}}) {
            if (value->empty() || (*value)[0] == '/')
                continue;
            auto* v = e.get(field);
            p.add(v ? v->source() : e.source(),
                  fmt::format("key '{}.{}': \"{}\" is not an absolute path", key, field, *value));
        }
        m.from = trim_slashes(m.from);
        m.to = trim_slashes(m.to);
        for (std::size_t k = 0; k < b.path_map.size(); ++k)
            if (!m.from.empty() && b.path_map[k].from == m.from)
                p.add(e.source(),
                      fmt::format("key '{}.from': \"{}\" is already block.path_map[{}]", key, m.from, k));
        b.path_map.push_back(m);
    });
    r.finish();
}

void check_peer(const toml::table& t, Problems& p, std::size_t i, const Peer& peer, const NodeConfig& c) {
    if (auto* n = t.get("name"); n && n->is_string()) {
        if (!valid_node_name(peer.name))
            p.add(n->source(), fmt::format("key 'peers[{}].name': \"{}\" is not a valid node name", i, peer.name));
        else if (peer.name == c.node.name)
            p.add(n->source(), fmt::format("key 'peers[{}].name': \"{}\" is this node's own name", i, peer.name));
        for (std::size_t k = 0; k < c.peers.size(); ++k)
            if (c.peers[k].name == peer.name)
                p.add(n->source(), fmt::format("key 'peers[{}].name': \"{}\" is already peers[{}]", i, peer.name, k));
    }
    if (auto* a = t.get("address"); a && a->is_string())
        if (auto r = check_address(peer.address); !r)
            p.add(a->source(), fmt::format("key 'peers[{}].address': {}", i, r.error().message));
}

void read_policy(const toml::table& t, Problems& p, std::size_t i, NodeConfig& c) {
    auto key = fmt::format("policies[{}]", i);
    TableReader r(t, p, key);
    MigrationPolicy pol;
    r.get_required("name", pol.name);
    r.get_labels("vm_selector", pol.vm_selector);
    r.get_labels("node_selector", pol.node_selector);
    auto& s = pol.settings;
    auto quantity = [&](std::string_view k, std::optional<std::uint64_t>& out) {
        if (!t.contains(k))
            return;
        std::uint64_t v = 0;
        r.get_quantity(k, v);
        out = v;
    };
    auto integer = [&](std::string_view k, std::optional<std::int64_t>& out, std::int64_t min, std::int64_t max) {
        if (!t.contains(k))
            return;
        std::int64_t v = min;
        r.get(k, v, min, max);
        out = v;
    };
    auto boolean = [&](std::string_view k, std::optional<bool>& out) {
        if (!t.contains(k))
            return;
        bool v = false;
        r.get(k, v);
        out = v;
    };
    quantity("bandwidth_per_migration", s.bandwidth_per_migration);
    integer("max_downtime_ms", s.max_downtime_ms, 1, 2'000'000);
    integer("completion_timeout_per_gib", s.completion_timeout_per_gib, 0, 1'000'000);
    integer("progress_timeout", s.progress_timeout, 0, 1'000'000);
    boolean("allow_auto_converge", s.allow_auto_converge);
    boolean("allow_post_copy", s.allow_post_copy);
    if (s.allow_post_copy.value_or(false) && c.migration.multifd_channels > 0)
        p.add(t.get("allow_post_copy")->source(),
              fmt::format("key '{}.allow_post_copy': true, but key 'migration.multifd_channels' is {}: QEMU cannot do "
                          "post-copy with multifd",
                          key, c.migration.multifd_channels));
    // What a policy may not change gets its own reason, not "unknown key".
    for (auto k : {"parallel_migrations_per_cluster", "parallel_outbound_migrations_per_node",
                   "parallel_inbound_migrations_per_node", "disable_tls", "postcopy_preempt", "multifd_channels",
                   "peer_timeout", "finished_migrations_per_vm"})
        if (auto* n = r.node(k))
            p.add(n->source(), fmt::format("key '{}.{}': a policy cannot set this; node limits, security and the "
                                           "transport are [migration]'s alone",
                                           key, k));
    r.finish();
    if (auto* n = t.get("name"); n && n->is_string()) {
        if (!valid_node_name(pol.name))
            p.add(n->source(), fmt::format("key '{}.name': \"{}\" is not a valid policy name (1-63 characters of "
                                           "a-z, 0-9 and '-', starting and ending with a letter or digit)",
                                           key, pol.name));
        for (std::size_t k = 0; k < c.policies.size(); ++k)
            if (c.policies[k].name == pol.name)
                p.add(n->source(), fmt::format("key '{}.name': \"{}\" is already policies[{}]", key, pol.name, k));
    }
    c.policies.push_back(std::move(pol));
}

void read_hooks(const toml::table& t, Problems& p, HooksSection& h) {
    TableReader r(t, p, "hooks");
    r.get("dir", h.dir);
    r.get("timeout", h.timeout, 1, 600);
    r.get("announce_self", h.announce_self);
    if (auto* d = t.get("dir"); d && d->is_string() && !h.dir.empty() && h.dir[0] != '/')
        p.add(d->source(), fmt::format("key 'hooks.dir': \"{}\" is not an absolute path", h.dir));
    r.finish();
}

void read_metrics(const toml::table& t, Problems& p, MetricsSection& m) {
    TableReader r(t, p, "metrics");
    r.get("listen", m.listen);
    if (auto* l = t.get("listen"); l && l->is_string() && !m.listen.empty())
        if (auto a = check_address(m.listen); !a)
            p.add(l->source(), fmt::format("key 'metrics.listen': {}", a.error().message));
    r.finish();
}

// Line numbers of the keys that later checks (files, sockets) may name.
void record_lines(const toml::table& root, NodeConfig& c) {
    for (auto section : {"node", "tls", "migration", "block", "hooks", "metrics"}) {
        auto* t = root.get(section) ? root.get(section)->as_table() : nullptr;
        if (!t)
            continue;
        for (auto&& [k, v] : *t)
            c.lines[fmt::format("{}.{}", section, k.str())] = v.source().begin.line;
    }
}

Result<NodeConfig> read(const toml::table& root, const std::string& name) {
    Problems p(name);
    NodeConfig c;
    TableReader r(root, p, "");
    // [tls] and [[peers]] serve the peer endpoint; listen = "" turns it off.
    auto endpoint_off = [&](const toml::source_region& where, std::string_view what, std::string_view why) {
        auto* node = root.get("node");
        auto* listen = node && node->is_table() ? node->as_table()->get("listen") : nullptr;
        if (!listen || !listen->is_string() || !listen->value<std::string>()->empty())
            return;
        p.add(where, fmt::format("{} is set while key 'node.listen' ({}:{}) is \"\", which turns the peer endpoint "
                                 "off, so {}; give node.listen the address peers reach this node at, or remove {}",
                                 what, name, listen->source().begin.line, why, what));
    };
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
        std::vector<std::string> missing;
        for (auto key : {"ca", "cert", "key"})
            if (!t->contains(key))
                missing.push_back(key);
        if (!missing.empty() && missing.size() < 3)
            p.add(t->source(), fmt::format("table 'tls': missing {}: ca, cert and key go together (ferryctl pki "
                                           "init writes them)",
                                           fmt::join(missing, ", ")));
        auto* node = root.get("node");
        if (missing.size() < 3 && node && node->is_table() && !node->as_table()->contains("listen"))
            p.add(t->source(), "table 'tls' needs [node] listen: the address peers reach this node at (e.g. "
                               "\"10.0.0.1:7410\")");
        if (missing.size() < 3)
            endpoint_off(t->source(), "table 'tls'", "nothing would use its certificates");
    }
    if (auto* t = subtable(r, "migration"))
        read_migration(*t, p, c.migration);
    if (auto* t = subtable(r, "block"))
        read_block(*t, p, c.block);
    if (auto* t = subtable(r, "hooks"))
        read_hooks(*t, p, c.hooks);
    if (auto* t = subtable(r, "metrics"))
        read_metrics(*t, p, c.metrics);
    r.tables("peers", [&](const toml::table& t, std::size_t i) {
        TableReader pr(t, p, fmt::format("peers[{}]", i));
        Peer peer;
        pr.get_required("name", peer.name);
        pr.get_required("address", peer.address);
        pr.finish();
        check_peer(t, p, i, peer, c);
        c.peers.push_back(peer);
    });
    if (auto* peers = root.get("peers"); peers && !c.peers.empty())
        endpoint_off(peers->source(), "key 'peers'", "no peer could migrate a VM to this node");
    r.tables("policies", [&](const toml::table& t, std::size_t i) { read_policy(t, p, i, c); });
    r.finish();
    if (!p.empty())
        return p.error();
    c.file = name;
    record_lines(root, c);
    return c;
}

} // namespace

bool valid_node_name(std::string_view name) { return valid_vm_name(name); }

Result<void> check_address(std::string_view address) {
    auto colon = address.rfind(':');
    if (colon == std::string_view::npos)
        return make_error(Errc::invalid_argument, fmt::format("\"{}\" has no port (host:port)", address));
    auto host = std::string(address.substr(0, colon));
    auto port = address.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
    else if (host.find(':') != std::string::npos)
        return make_error(Errc::invalid_argument,
                          fmt::format("\"{}\": write an IPv6 address in brackets, like [::1]:7410", address));
    boost::system::error_code ec;
    if (host != "localhost")
        boost::asio::ip::make_address(host, ec);
    if (host.empty() || ec)
        return make_error(Errc::invalid_argument, fmt::format("\"{}\": '{}' is not an IP address", address, host));
    unsigned long value = 0;
    bool digits = !port.empty() && port.size() <= 5;
    for (char ch : port) {
        digits = digits && ch >= '0' && ch <= '9';
        value = value * 10 + static_cast<unsigned long>(ch - '0');
    }
    if (!digits || value < 1 || value > 65535)
        return make_error(Errc::invalid_argument,
                          fmt::format("\"{}\": port '{}' is not a number from 1 to 65535", address, port));
    return {};
}

std::size_t max_vm_name_length(const std::string& state_dir) {
    auto used = state_dir.size() + run_path_overhead;
    return used >= max_socket_path ? 0 : std::min<std::size_t>(63, max_socket_path - used);
}

std::string map_disk_path(const BlockSection& block, const std::string& path) {
    const DiskPathMap* best = nullptr;
    for (auto& m : block.path_map) {
        if (m.from.empty())
            continue;
        bool under = path == m.from || (path.rfind(m.from, 0) == 0 && (m.from == "/" || path[m.from.size()] == '/'));
        if (under && (!best || m.from.size() > best->from.size()))
            best = &m;
    }
    if (!best)
        return path;
    auto rest = path.substr(best->from == "/" ? 0 : best->from.size());
    if (best->to == "/")
        return rest.empty() ? "/" : rest;
    return best->to + rest;
}

std::string NodeConfig::where(const std::string& key) const {
    auto it = lines.find(key);
    if (it == lines.end())
        return fmt::format("{}: key '{}'", file, key);
    return fmt::format("{}:{}: key '{}'", file, it->second, key);
}

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
        {"parallel_inbound_migrations_per_node", c.parallel_inbound_migrations_per_node},
        {"bandwidth_per_migration", c.bandwidth_per_migration},
        {"completion_timeout_per_gib", c.completion_timeout_per_gib},
        {"progress_timeout", c.progress_timeout},
        {"allow_auto_converge", c.allow_auto_converge},
        {"allow_post_copy", c.allow_post_copy},
        {"postcopy_preempt", c.postcopy_preempt},
        {"disable_tls", c.disable_tls},
        {"max_downtime_ms", c.max_downtime_ms},
        {"multifd_channels", c.multifd_channels},
        {"peer_timeout", c.peer_timeout},
        {"finished_migrations_per_vm", c.finished_migrations_per_vm},
    };
}

} // namespace ferry::config
