// ferryctl: talks to the local ferryd over its control socket.
#include "config/quantity.hpp"
#include "control/client.hpp"
#include "transport/pki.hpp"
#include "output.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>
#include <unistd.h>

using nlohmann::json;

namespace {

struct Globals {
    std::string socket;
    bool json_output = false;
};

int fail(const std::string& message) {
    std::cerr << "ferryctl: " << message << "\n";
    return 1;
}

ferry::Result<std::string> read_file(const std::string& path) {
    std::ifstream in(path);
    if (!in)
        return ferry::make_error(ferry::Errc::not_found, fmt::format("{}: cannot open", path));
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

ferry::Result<json> call(const Globals& g, const std::string& method, json params) {
    auto c = ferry::control::Client::connect(g.socket);
    if (!c)
        return c.error();
    return (*c)->call(method, std::move(params));
}

// Prints a result as JSON or with the given printer; returns the exit code.
template <class Printer> int show(const Globals& g, const ferry::Result<json>& r, Printer printer) {
    if (!r)
        return fail(r.error().message);
    if (g.json_output)
        std::cout << r->dump(2) << "\n";
    else
        printer(*r);
    return 0;
}

int wait_for(const Globals& g, std::string id) {
    bool tty = ::isatty(STDOUT_FILENO) && !g.json_output;
    std::string last_phase;
    auto last_line = std::chrono::steady_clock::now();
    auto client = ferry::control::Client::connect(g.socket);
    if (!client)
        return fail(client.error().message);
    for (;;) {
        auto r = (*client)->call("migration.show", {{"id", id}}, std::chrono::seconds(30));
        if (!r)
            return fail(r.error().message);
        auto& m = *r;
        std::string phase = m.value("phase", "");
        bool final = phase == "Succeeded" || phase == "Failed";
        auto now = std::chrono::steady_clock::now();
        if (tty) {
            std::cout << "\r\033[K" << ferryctl::progress_line(m) << std::flush;
            if (final)
                std::cout << "\n";
        } else if (!g.json_output && (phase != last_phase || now - last_line > std::chrono::seconds(5))) {
            std::cout << ferryctl::progress_line(m) << std::endl;
            last_line = now;
        }
        last_phase = phase;
        if (final) {
            if (g.json_output)
                std::cout << m.dump(2) << "\n";
            else
                ferryctl::print_migration(m);
            return phase == "Succeeded" ? 0 : 1;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(tty ? 250 : 500));
    }
}

} // namespace

int main(int argc, char** argv) {
    CLI::App app{"ferryctl: control a ferryd node"};
    app.require_subcommand(1);
    app.fallthrough(); // --json and --socket also work after the verb
    Globals g;
    const char* env_socket = std::getenv("FERRY_SOCKET");
    g.socket = env_socket ? env_socket : "/run/ferry/ferryd.sock";
    app.add_option("--socket", g.socket, "ferryd control socket (default $FERRY_SOCKET or /run/ferry/ferryd.sock)");
    app.add_flag("--json", g.json_output, "print JSON objects");

    int rc = 0;
    auto* vm = app.add_subcommand("vm", "manage VMs")->require_subcommand(1);

    std::string spec_path, name, qmp_path;
    auto* vm_create = vm->add_subcommand("create", "launch a VM from a spec file");
    vm_create->add_option("--spec", spec_path, "VM spec (TOML)")->required();
    vm_create->callback([&] {
        auto text = read_file(spec_path);
        if (!text) {
            rc = fail(text.error().message);
            return;
        }
        rc = show(g, call(g, "vm.create", {{"spec", *text}, {"source", spec_path}}), ferryctl::print_vm);
    });

    vm->add_subcommand("list", "list VMs")->callback([&] {
        rc = show(g, call(g, "vm.list", json::object()), ferryctl::print_vm_table);
    });

    auto* vm_show = vm->add_subcommand("show", "show a VM");
    vm_show->add_option("name", name)->required();
    vm_show->callback([&] { rc = show(g, call(g, "vm.show", {{"name", name}}), ferryctl::print_vm); });

    auto* vm_adopt = vm->add_subcommand("adopt", "manage a QEMU started elsewhere");
    vm_adopt->add_option("name", name)->required();
    vm_adopt->add_option("--qmp", qmp_path, "its QMP socket")->required();
    vm_adopt->add_option("--spec", spec_path, "spec to launch its migration destinations from");
    vm_adopt->callback([&] {
        json params{{"name", name}, {"qmp", qmp_path}};
        if (!spec_path.empty()) {
            auto text = read_file(spec_path);
            if (!text) {
                rc = fail(text.error().message);
                return;
            }
            params["spec"] = *text;
            params["source"] = spec_path;
        }
        rc = show(g, call(g, "vm.adopt", params), ferryctl::print_vm);
    });

    auto* vm_delete = vm->add_subcommand("delete", "stop a VM (an adopted VM is only released)");
    vm_delete->add_option("name", name)->required();
    vm_delete->callback([&] {
        rc = show(g, call(g, "vm.delete", {{"name", name}}), [](const json& j) {
            std::cout << "deleted " << j.value("deleted", "") << "\n";
        });
    });

    std::string qmp_command, qmp_args;
    auto* vm_qmp = vm->add_subcommand("qmp", "run a QMP command on the VM's QEMU (debugging)");
    vm_qmp->add_option("name", name)->required();
    vm_qmp->add_option("command", qmp_command)->required();
    vm_qmp->add_option("--args", qmp_args, "arguments as a JSON object");
    vm_qmp->callback([&] {
        json args = json::object();
        if (!qmp_args.empty()) {
            args = json::parse(qmp_args, nullptr, false);
            if (args.is_discarded() || !args.is_object()) {
                rc = fail("--args: not a JSON object: " + qmp_args);
                return;
            }
        }
        auto r = call(g, "vm.qmp", {{"name", name}, {"command", qmp_command}, {"arguments", args}});
        rc = show(g, r, [](const json& j) { std::cout << j.dump(2) << "\n"; });
    });

    int dirty_seconds = 1;
    auto* vm_dirty = vm->add_subcommand("dirty-rate", "measure how fast the guest dirties its memory");
    vm_dirty->add_option("name", name)->required();
    vm_dirty->add_option("--seconds", dirty_seconds, "how long to measure (1-60)")->check(CLI::Range(1, 60));
    vm_dirty->callback([&] {
        auto r = call(g, "vm.dirty_rate", {{"name", name}, {"seconds", dirty_seconds}});
        rc = show(g, r, [](const json& j) {
            std::cout << fmt::format("{}: dirty rate {} MiB/s (measured over {} s, {} sampled pages per GiB)\n",
                                     j.value("vm", ""), j.value("dirty_rate_mib_s", 0), j.value("seconds", 0),
                                     j.value("sample_pages", 0));
        });
    });

    std::string target, bandwidth;
    std::int64_t max_downtime = 0;
    bool wait = false;
    auto* migrate = app.add_subcommand("migrate", "live-migrate a VM");
    migrate->add_option("name", name)->required();
    migrate->add_option("--to", target, "target node (default: this node, a new QEMU process)");
    migrate->add_option("--bandwidth", bandwidth, "per-migration bandwidth, e.g. 64Mi (0 = unlimited)");
    migrate->add_option("--max-downtime", max_downtime, "maximum downtime in ms")->check(CLI::PositiveNumber);
    migrate->add_flag("--wait", wait, "follow the migration to its end; exit non-zero unless it succeeds");
    // Each overrides the node's [migration] setting only when given.
    bool auto_converge = false, no_auto_converge = false, post_copy = false, no_post_copy = false;
    auto* ac = migrate->add_flag("--auto-converge", auto_converge,
                                 "let ferry throttle the vCPUs if pre-copy cannot converge (overrides allow_auto_converge)");
    auto* no_ac = migrate->add_flag("--no-auto-converge", no_auto_converge, "never throttle this migration's vCPUs");
    auto* pc = migrate->add_flag("--post-copy", post_copy,
                                 "let ferry switch to post-copy if pre-copy cannot converge (overrides allow_post_copy)");
    auto* no_pc = migrate->add_flag("--no-post-copy", no_post_copy, "never switch this migration to post-copy");
    ac->excludes(no_ac);
    pc->excludes(no_pc);
    migrate->callback([&] {
        json params{{"vm", name}};
        if (!target.empty())
            params["target_node"] = target;
        if (!bandwidth.empty()) {
            auto q = ferry::config::parse_quantity(bandwidth);
            if (!q) {
                rc = fail("--bandwidth: " + q.error().message);
                return;
            }
            params["bandwidth"] = *q;
        }
        if (max_downtime > 0)
            params["max_downtime_ms"] = max_downtime;
        if (auto_converge || no_auto_converge)
            params["allow_auto_converge"] = auto_converge;
        if (post_copy || no_post_copy)
            params["allow_post_copy"] = post_copy;
        auto r = call(g, "migration.create", params);
        if (!r) {
            rc = fail(r.error().message);
            return;
        }
        if (!wait) {
            rc = show(g, r, [](const json& m) {
                std::cout << "migration " << m.value("id", "") << " created (" << m.value("phase", "") << ")\n";
            });
            return;
        }
        if (!g.json_output)
            std::cout << "migration " << r->value("id", "") << " started\n";
        rc = wait_for(g, r->value("id", ""));
    });

    std::string id;
    auto* migration = app.add_subcommand("migration", "inspect and abort migrations")->require_subcommand(1);
    migration->add_subcommand("list", "list migrations")->callback([&] {
        rc = show(g, call(g, "migration.list", json::object()), ferryctl::print_migration_table);
    });
    auto* mig_show = migration->add_subcommand("show", "show a migration");
    mig_show->add_option("id", id)->required();
    mig_show->callback([&] { rc = show(g, call(g, "migration.show", {{"id", id}}), ferryctl::print_migration); });
    auto* mig_abort = migration->add_subcommand("abort", "abort a migration (before its switchover)");
    mig_abort->add_option("id", id)->required();
    mig_abort->callback([&] {
        rc = show(g, call(g, "migration.abort", {{"id", id}}), [](const json& m) {
            std::cout << "abort requested for " << m.value("id", "") << "\n";
        });
    });
    auto* mig_wait = migration->add_subcommand("wait", "follow a migration to its end");
    mig_wait->add_option("id", id)->required();
    mig_wait->callback([&] { rc = wait_for(g, id); });

    std::string pki_dir, pki_nodes;
    auto* pki = app.add_subcommand("pki", "node certificates for the peer transport")->require_subcommand(1);
    auto* pki_init = pki->add_subcommand("init", "create a cluster CA and one certificate per node");
    pki_init->add_option("--dir", pki_dir, "where to write the files")->required();
    pki_init->add_option("--nodes", pki_nodes, "node names, comma-separated (a,b,c)")->required();
    pki_init->callback([&] {
        std::vector<std::string> nodes;
        std::stringstream ss(pki_nodes);
        for (std::string n; std::getline(ss, n, ',');)
            if (!n.empty())
                nodes.push_back(n);
        auto r = ferry::transport::init_pki(pki_dir, nodes);
        if (!r) {
            rc = fail(r.error().message);
            return;
        }
        for (auto& f : r->written)
            std::cout << "wrote " << f << "\n";
        std::cout << "each node's ferryd.toml: [tls] ca = \"" << r->ca << "\", cert = \"" << pki_dir
                  << "/<node>.pem\", key = \"" << pki_dir << "/<node>-key.pem\" (keep ca-key.pem offline)\n";
    });

    CLI11_PARSE(app, argc, argv);
    return rc;
}
