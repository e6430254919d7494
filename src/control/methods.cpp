#include "control/methods.hpp"

#include "config/quantity.hpp"
#include "config/vm_spec.hpp"

#include <fmt/format.h>

namespace ferry::control {

namespace asio = boost::asio;
using engine::Engine;

namespace {

Result<std::string> need_string(const json& params, const char* method, const char* key) {
    auto it = params.find(key);
    if (it == params.end() || !it->is_string())
        return make_error(Errc::invalid_argument,
                          fmt::format("{}: missing string parameter \"{}\"", method, key));
    return it->get<std::string>();
}

// Parses a spec sent as TOML text; "source" names the file in errors.
Result<config::VmSpec> spec_param(const json& params, const char* method) {
    auto text = need_string(params, method, "spec");
    if (!text)
        return text.error();
    return config::parse_vm_spec(*text, params.value("source", "spec"));
}

asio::awaitable<Result<json>> vm_create(Engine* e, json params) {
    auto spec = spec_param(params, "vm.create");
    if (!spec)
        co_return spec.error();
    co_return co_await e->create_vm(std::move(*spec));
}

asio::awaitable<Result<json>> vm_adopt(Engine* e, json params) {
    auto name = need_string(params, "vm.adopt", "name");
    auto qmp = need_string(params, "vm.adopt", "qmp");
    if (!name)
        co_return name.error();
    if (!qmp)
        co_return qmp.error();
    std::optional<config::VmSpec> spec;
    if (params.contains("spec")) {
        auto s = spec_param(params, "vm.adopt");
        if (!s)
            co_return s.error();
        spec = std::move(*s);
    }
    co_return co_await e->adopt_vm(*name, *qmp, std::move(spec));
}

asio::awaitable<Result<json>> vm_show(Engine* e, json params) {
    auto name = need_string(params, "vm.show", "name");
    if (!name)
        co_return name.error();
    co_return co_await e->show_vm(*name);
}

asio::awaitable<Result<json>> vm_qmp(Engine* e, json params) {
    auto name = need_string(params, "vm.qmp", "name");
    auto command = need_string(params, "vm.qmp", "command");
    if (!name)
        co_return name.error();
    if (!command)
        co_return command.error();
    json arguments = params.value("arguments", json::object());
    co_return co_await e->qmp_command(*name, *command, std::move(arguments));
}

asio::awaitable<Result<json>> vm_dirty_rate(Engine* e, json params) {
    auto name = need_string(params, "vm.dirty_rate", "name");
    if (!name)
        co_return name.error();
    auto seconds = params.value("seconds", 1);
    co_return co_await e->dirty_rate(*name, seconds);
}

asio::awaitable<Result<json>> vm_list(Engine* e, json) { co_return ok(e->list_vms()); }

asio::awaitable<Result<json>> vm_delete(Engine* e, json params) {
    auto name = need_string(params, "vm.delete", "name");
    if (!name)
        co_return name.error();
    auto r = co_await e->delete_vm(*name);
    if (!r)
        co_return r.error();
    co_return ok(json{{"deleted", *name}});
}

asio::awaitable<Result<json>> migration_create(Engine* e, json params) {
    auto vm = need_string(params, "migration.create", "vm");
    if (!vm)
        co_return vm.error();
    engine::MigrateRequest req;
    req.vm = *vm;
    if (auto t = params.find("target_node"); t != params.end() && !t->is_null())
        req.target_node = t->get<std::string>();
    if (auto b = params.find("bandwidth"); b != params.end() && !b->is_null()) {
        auto q = b->is_string() ? config::parse_quantity(b->get<std::string>())
                                : Result<std::uint64_t>(b->get<std::uint64_t>());
        if (!q)
            co_return q.error().wrap("migration.create: parameter \"bandwidth\"");
        req.bandwidth = *q;
    }
    if (auto d = params.find("max_downtime_ms"); d != params.end() && !d->is_null()) {
        auto v = d->get<std::int64_t>();
        if (v < 1)
            co_return make_error(Errc::invalid_argument, "migration.create: \"max_downtime_ms\" must be >= 1");
        req.max_downtime_ms = v;
    }
    for (auto [key, field] : {std::pair{"allow_auto_converge", &req.allow_auto_converge},
                              std::pair{"allow_post_copy", &req.allow_post_copy}}) {
        auto f = params.find(key);
        if (f == params.end() || f->is_null())
            continue;
        if (!f->is_boolean())
            co_return make_error(Errc::invalid_argument, fmt::format("migration.create: \"{}\" must be true or false", key));
        *field = f->get<bool>();
    }
    co_return e->migrate(req);
}

asio::awaitable<Result<json>> migration_list(Engine* e, json) { co_return ok(e->list_migrations()); }

asio::awaitable<Result<json>> migration_show(Engine* e, json params) {
    auto id = need_string(params, "migration.show", "id");
    if (!id)
        co_return id.error();
    co_return e->show_migration(*id);
}

asio::awaitable<Result<json>> migration_abort(Engine* e, json params) {
    auto id = need_string(params, "migration.abort", "id");
    if (!id)
        co_return id.error();
    co_return e->abort_migration(*id);
}

asio::awaitable<Result<json>> node_info(Engine* e, json) {
    auto& n = e->config().node;
    co_return ok(json{{"name", n.name}, {"state_dir", n.state_dir}, {"qemu", n.qemu}, {"version", "0.1.0"}});
}

} // namespace

void add_engine_methods(Server& server, Engine& engine) {
    using Fn = asio::awaitable<Result<json>> (*)(Engine*, json);
    const std::pair<const char*, Fn> table[] = {
        {"node.info", node_info},           {"vm.create", vm_create},
        {"vm.adopt", vm_adopt},             {"vm.show", vm_show},
        {"vm.list", vm_list},               {"vm.delete", vm_delete},
        {"vm.qmp", vm_qmp},
        {"vm.dirty_rate", vm_dirty_rate},
        {"migration.create", migration_create}, {"migration.list", migration_list},
        {"migration.show", migration_show}, {"migration.abort", migration_abort},
    };
    Engine* e = &engine;
    for (auto& [name, fn] : table)
        server.add(name, [e, fn](json params) { return fn(e, std::move(params)); });
}

} // namespace ferry::control
