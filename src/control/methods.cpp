#include "control/methods.hpp"

#include "config/quantity.hpp"
#include "control/protocol.hpp"
#include "config/vm_spec.hpp"
#include "scheduler/cluster.hpp"
#include "scheduler/policy.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace ferry::control {

namespace asio = boost::asio;
using engine::Engine;

namespace {

// Parses a spec sent as TOML text; "source" names the file in errors.
Result<config::VmSpec> spec_param(const Params& p) {
    auto text = p.string("spec");
    if (!text)
        return text.error();
    auto source = p.optional_string("source");
    if (!source)
        return source.error();
    return config::parse_vm_spec(*text, source->value_or("spec"));
}

asio::awaitable<Result<json>> vm_create(Engine* e, json params) {
    auto spec = spec_param(Params("vm.create", params));
    if (!spec)
        co_return spec.error();
    co_return co_await e->create_vm(std::move(*spec));
}

asio::awaitable<Result<json>> vm_adopt(Engine* e, json params) {
    Params p("vm.adopt", params);
    auto name = p.string("name");
    if (!name)
        co_return name.error();
    auto qmp = p.string("qmp");
    if (!qmp)
        co_return qmp.error();
    std::optional<config::VmSpec> spec;
    if (params.contains("spec")) {
        auto s = spec_param(p);
        if (!s)
            co_return s.error();
        spec = std::move(*s);
    }
    co_return co_await e->adopt_vm(*name, *qmp, std::move(spec));
}

asio::awaitable<Result<json>> vm_show(Engine* e, json params) {
    auto name = Params("vm.show", params).string("name");
    if (!name)
        co_return name.error();
    auto vm = co_await e->show_vm(*name);
    if (!vm)
        co_return vm;
    if (!(*vm).value("migration", json()).is_null()) {
        (*vm)["migratable"] = {{"now", false}, {"target", nullptr}, {"reasons", {"it is migrating"}}};
        co_return vm;
    }
    auto nodes = co_await scheduler::gather(*e);
    (*vm)["migratable"] = scheduler::migratability(e->vm_spec(*name), nodes, e->config().node.name, *name);
    co_return vm;
}

asio::awaitable<Result<json>> vm_qmp(Engine* e, json params) {
    Params p("vm.qmp", params);
    auto name = p.string("name");
    if (!name)
        co_return name.error();
    auto command = p.string("command");
    if (!command)
        co_return command.error();
    auto arguments = p.optional_object("arguments");
    if (!arguments)
        co_return arguments.error();
    co_return co_await e->qmp_command(*name, *command, std::move(*arguments));
}

asio::awaitable<Result<json>> vm_dirty_rate(Engine* e, json params) {
    Params p("vm.dirty_rate", params);
    auto name = p.string("name");
    if (!name)
        co_return name.error();
    auto seconds = p.optional_int("seconds", 1, 60);
    if (!seconds)
        co_return seconds.error();
    co_return co_await e->dirty_rate(*name, static_cast<int>(seconds->value_or(1)));
}

asio::awaitable<Result<json>> vm_list(Engine* e, json) { co_return ok(e->list_vms()); }

asio::awaitable<Result<json>> vm_delete(Engine* e, json params) {
    auto name = Params("vm.delete", params).string("name");
    if (!name)
        co_return name.error();
    auto r = co_await e->delete_vm(*name);
    if (!r)
        co_return r.error();
    json deleted{{"deleted", *name}};
    co_return ok(std::move(deleted));
}

// Stores an optional parameter that was read without error.
template <class T> Result<void> into(Result<std::optional<T>> read, std::optional<T>& field) {
    if (!read)
        return read.error();
    field = *read;
    return {};
}

Result<engine::MigrateRequest> migrate_request(const json& params) {
    Params p("migration.create", params);
    engine::MigrateRequest req;
    auto vm = p.string("vm");
    if (!vm)
        return vm.error();
    req.vm = *vm;
    for (auto r : {into(p.optional_string("target_node"), req.target_node),
                   into(p.optional_quantity("bandwidth"), req.bandwidth),
                   into(p.optional_int("max_downtime_ms", 1, 3'600'000), req.max_downtime_ms),
                   into(p.optional_bool("allow_auto_converge"), req.allow_auto_converge),
                   into(p.optional_bool("allow_post_copy"), req.allow_post_copy)})
        if (!r)
            return r.error();
    return req;
}

asio::awaitable<Result<json>> migration_create(Engine* e, json params) {
    auto req = migrate_request(params);
    if (!req)
        co_return req.error();
    auto dry = Params("migration.create", params).optional_bool("dry_run");
    if (!dry)
        co_return dry.error();
    const auto* spec = e->vm_spec(req->vm); // null: the engine says why it cannot move
    if (spec) {
        auto blockers = scheduler::migration_blockers(*spec);
        if (!blockers.empty())
            co_return make_error(Errc::conflict, fmt::format("VM {} cannot migrate: {}", req->vm,
                                                             fmt::join(blockers, "; ")));
    }
    bool dry_run = dry->value_or(false);
    auto& cfg = e->config();
    // Without --to, a node with peers lets the scheduler pick the target; a
    // node without any moves the VM into a new QEMU on itself.
    if (dry_run || (!req->target_node && !cfg.peers.empty())) {
        auto nodes = co_await scheduler::gather(*e);
        auto p = scheduler::place_vm(nodes, cfg.node.name, req->vm);
        if (!p)
            co_return p.error();
        std::optional<std::string> chosen = req->target_node;
        if (!chosen && cfg.peers.empty())
            chosen = cfg.node.name;
        if (!chosen && p->fits())
            chosen = p->ranked.front().node;
        if (dry_run) {
            auto out = scheduler::to_json(*p);
            out["vm"] = req->vm;
            out["source_node"] = cfg.node.name;
            out["target_node"] = chosen ? json(*chosen) : json(nullptr);
            if (!chosen)
                out["why_none"] = p->why_none(req->vm);
            co_return ok(std::move(out));
        }
        if (!chosen)
            co_return make_error(Errc::conflict, p->why_none(req->vm));
        req->target_node = chosen;
    }
    spec = e->vm_spec(req->vm); // again: gather() waited on the peers, the VM may be gone
    if (spec) {
        scheduler::MigrationSettings given;
        given.bandwidth_per_migration = req->bandwidth;
        given.max_downtime_ms = req->max_downtime_ms;
        given.allow_auto_converge = req->allow_auto_converge;
        given.allow_post_copy = req->allow_post_copy;
        auto r = scheduler::resolve_for(e->config(), spec->labels, given);
        req->settings = r.config;
        if (r.policy)
            req->policy = r.policy->name;
    }
    co_return e->migrate(*req);
}

asio::awaitable<Result<json>> migration_list(Engine* e, json) { co_return ok(e->list_migrations()); }

asio::awaitable<Result<json>> migration_show(Engine* e, json params) {
    auto id = Params("migration.show", params).string("id");
    if (!id)
        co_return id.error();
    co_return e->show_migration(*id);
}

asio::awaitable<Result<json>> migration_abort(Engine* e, json params) {
    auto id = Params("migration.abort", params).string("id");
    if (!id)
        co_return id.error();
    co_return e->abort_migration(*id);
}

asio::awaitable<Result<json>> node_list(Engine* e, json) {
    auto nodes = co_await scheduler::gather(*e);
    co_return ok(json(std::move(nodes)));
}

asio::awaitable<Result<json>> node_info(Engine* e, json) {
    auto& n = e->config().node;
    json info{{"name", n.name}, {"state_dir", n.state_dir}, {"qemu", n.qemu}, {"version", FERRY_VERSION}};
    co_return ok(std::move(info));
}

} // namespace

void add_engine_methods(Server& server, Engine& engine) {
    using Fn = asio::awaitable<Result<json>> (*)(Engine*, json);
    struct Row {
        const char* name;
        Fn fn;
        bool changes_state; // logged with the caller's credentials
    };
    const Row table[] = {
        {"node.info", node_info, false},
        {"node.list", node_list, false},
        {"vm.create", vm_create, true},
        {"vm.adopt", vm_adopt, true},
        {"vm.show", vm_show, false},
        {"vm.list", vm_list, false},
        {"vm.delete", vm_delete, true},
        {"vm.qmp", vm_qmp, true},
        {"vm.dirty_rate", vm_dirty_rate, false},
        {"migration.create", migration_create, true},
        {"migration.list", migration_list, false},
        {"migration.show", migration_show, false},
        {"migration.abort", migration_abort, true},
    };
    Engine* e = &engine;
    for (auto& row : table) {
        Fn fn = row.fn;
        server.add(row.name, [e, fn](json params) { return fn(e, std::move(params)); }, row.changes_state);
    }
}

} // namespace ferry::control
