#include "control/methods.hpp"

#include "common/time.hpp"
#include "config/quantity.hpp"
#include "control/event_queue.hpp"
#include "control/protocol.hpp"
#include "config/vm_spec.hpp"
#include "scheduler/cluster.hpp"
#include "scheduler/policy.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <limits>

namespace ferry::control {

namespace asio = boost::asio;
using engine::Engine;

namespace {

struct Ctx {
    Engine* engine;
    scheduler::Planner* planner;
};

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

asio::awaitable<Result<json>> vm_create(Ctx* c, json params) {
    Engine* e = c->engine;
    auto spec = spec_param(Params("vm.create", params));
    if (!spec)
        co_return spec.error();
    co_return co_await e->create_vm(std::move(*spec));
}

asio::awaitable<Result<json>> vm_adopt(Ctx* c, json params) {
    Engine* e = c->engine;
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

// migration.register_target: the stack's QEMU for an arrival (launcher =
// "external"), with the descriptors that came with the request, named by
// "fds" in the order they were sent.
asio::awaitable<Result<json>> migration_register_target(Ctx* c, json params, std::vector<UniqueFd> fds) {
    Params p("migration.register_target", params);
    auto vm = p.string("vm");
    if (!vm)
        co_return vm.error();
    auto qmp = p.string("qmp");
    if (!qmp)
        co_return qmp.error();
    auto pid = p.optional_int("pid", 1, std::numeric_limits<int>::max());
    if (!pid)
        co_return pid.error();
    auto names = p.optional_strings("fds");
    if (!names)
        co_return names.error();
    if (names->size() != fds.size())
        co_return make_error(Errc::invalid_argument,
                             fmt::format("migration.register_target: \"fds\" names {} descriptors, {} came with the "
                                         "request",
                                         names->size(), fds.size()));
    std::vector<std::pair<std::string, UniqueFd>> named;
    for (std::size_t i = 0; i < fds.size(); ++i) {
        auto& n = (*names)[i];
        if (auto first = std::find(names->begin(), names->begin() + static_cast<std::ptrdiff_t>(i), n);
            first != names->begin() + static_cast<std::ptrdiff_t>(i))
            co_return make_error(Errc::invalid_argument,
                                 fmt::format("migration.register_target: fds[{}]: \"{}\" is already the name of "
                                             "fds[{}]: each descriptor needs a name of its own",
                                             i, n, first - names->begin()));
        bool ok_name = !n.empty() && n.size() <= 64 &&
                       std::all_of(n.begin(), n.end(), [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.'; });
        if (!ok_name)
            co_return make_error(Errc::invalid_argument,
                                 fmt::format("migration.register_target: fds[{}]: \"{}\" is not a name of 1 to 64 "
                                             "letters, digits, '-', '_' or '.'",
                                             i, n));
        named.emplace_back(n, std::move(fds[i]));
    }
    co_return co_await c->engine->register_target(*vm, *qmp, static_cast<int>(pid->value_or(0)), std::move(named));
}

asio::awaitable<Result<json>> vm_show(Ctx* c, json params) {
    Engine* e = c->engine;
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

asio::awaitable<Result<json>> vm_qmp(Ctx* c, json params) {
    Engine* e = c->engine;
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

asio::awaitable<Result<json>> vm_dirty_rate(Ctx* c, json params) {
    Engine* e = c->engine;
    Params p("vm.dirty_rate", params);
    auto name = p.string("name");
    if (!name)
        co_return name.error();
    auto seconds = p.optional_int("seconds", 1, 60);
    if (!seconds)
        co_return seconds.error();
    auto r = co_await e->dirty_rate(*name, static_cast<int>(seconds->value_or(1)));
    if (!r)
        co_return r.error();
    co_return r;
}

asio::awaitable<Result<json>> vm_list(Ctx* c, json) { co_return ok(c->engine->list_vms()); }

asio::awaitable<Result<json>> vm_delete(Ctx* c, json params) {
    Engine* e = c->engine;
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
    if (req.target_node && req.target_node->empty())
        return make_error(Errc::invalid_argument, "migration.create: 'target_node' is empty: name a node, or leave "
                                                  "it out to let the scheduler choose");
    return req;
}

// "node_selector": labels the target must also have, strings only.
Result<scheduler::Labels> selector_param(const json& params) {
    auto o = Params("migration.create", params).optional_object("node_selector");
    if (!o)
        return o.error();
    scheduler::Labels labels;
    for (auto& [k, v] : o->items()) {
        if (!v.is_string())
            return make_error(Errc::invalid_argument,
                              fmt::format("migration.create: 'node_selector.{}' must be a string", k));
        labels[k] = v.get<std::string>();
    }
    return labels;
}

asio::awaitable<Result<json>> migration_create(Ctx* c, json params) {
    Engine* e = c->engine;
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
    auto added = selector_param(params);
    if (!added)
        co_return added.error();
    if (dry->value_or(false)) {
        auto& cfg = e->config();
        auto nodes = co_await scheduler::gather(*e);
        auto p = scheduler::place_vm(nodes, cfg.node.name, req->vm, true, *added);
        if (!p)
            co_return p.error();
        std::optional<std::string> chosen = req->target_node;
        if (!chosen && cfg.peers.empty())
            chosen = cfg.node.name; // a new QEMU on this node
        if (!chosen && p->fits())
            chosen = p->ranked.front().node;
        auto out = scheduler::to_json(*p);
        out["vm"] = req->vm;
        out["source_node"] = cfg.node.name;
        out["target_node"] = chosen ? json(*chosen) : json(nullptr);
        if (!chosen)
            out["why_none"] = p->why_none(req->vm);
        co_return ok(std::move(out));
    }
    // Without --to, a node with peers lets the scheduler pick the target; a
    // node without any moves the VM into a new QEMU on itself. Over a limit
    // it waits Pending.
    if (req->target_node && !added->empty())
        co_return make_error(Errc::invalid_argument,
                             "migration.create: 'node_selector' is for the scheduler's choice; it cannot go with "
                             "'target_node'");
    co_return co_await c->planner->submit(std::move(*req), std::move(*added));
}

asio::awaitable<Result<json>> migration_list(Ctx* c, json) {
    auto list = c->engine->list_migrations();
    for (auto& w : c->planner->waiting())
        list.push_back(std::move(w));
    co_return ok(std::move(list));
}

asio::awaitable<Result<json>> migration_show(Ctx* c, json params) {
    auto id = Params("migration.show", params).string("id");
    if (!id)
        co_return id.error();
    if (auto r = c->planner->show(*id))
        co_return std::move(*r);
    co_return c->engine->show_migration(*id);
}

asio::awaitable<Result<json>> migration_abort(Ctx* c, json params) {
    Params p("migration.abort", params);
    auto id = p.string("id");
    if (!id)
        co_return id.error();
    auto lost = p.optional_bool("target_lost");
    if (!lost)
        co_return lost.error();
    if (auto r = c->planner->cancel(*id))
        co_return std::move(*r);
    co_return c->engine->abort_migration(*id, lost->value_or(false));
}

asio::awaitable<Result<json>> node_list(Ctx* c, json) {
    auto nodes = co_await scheduler::gather(*c->engine);
    co_return ok(json(std::move(nodes)));
}

asio::awaitable<Result<json>> node_info(Ctx* c, json) {
    auto& n = c->engine->config().node;
    json info{{"name", n.name}, {"state_dir", n.state_dir}, {"qemu", n.qemu}, {"version", FERRY_VERSION}};
    co_return ok(std::move(info));
}

// The node a node.* method is about: "node", or this node.
Result<std::string> node_param(const char* method, const json& params) {
    auto n = Params(method, params).optional_string("node");
    if (!n)
        return n.error();
    return n->value_or("");
}

asio::awaitable<Result<json>> node_cordon(Ctx* c, json params) {
    auto node = node_param("node.cordon", params);
    if (!node)
        co_return node.error();
    co_return co_await c->planner->cordon(*node, true);
}

asio::awaitable<Result<json>> node_uncordon(Ctx* c, json params) {
    auto node = node_param("node.uncordon", params);
    if (!node)
        co_return node.error();
    co_return co_await c->planner->cordon(*node, false);
}

asio::awaitable<Result<json>> node_drain(Ctx* c, json params) {
    auto node = node_param("node.drain", params);
    if (!node)
        co_return node.error();
    json options = params.is_object() ? params : json::object();
    options.erase("node");
    auto o = scheduler::drain_options(options);
    if (!o)
        co_return make_error(Errc::invalid_argument, "node.drain: " + o.error().message);
    co_return co_await c->planner->drain(*node, *o);
}

asio::awaitable<Result<json>> node_drain_status(Ctx* c, json params) {
    auto node = node_param("node.drain_status", params);
    if (!node)
        co_return node.error();
    co_return co_await c->planner->drain_status(*node);
}

// events.subscribe: the first line answers the request with the last
// sequence number; then, when `since` is given, the kept events after it
// (or a "resync" line when some were dropped already), then every new event
// as it happens, and a heartbeat line after `heartbeat_ms` of silence.
asio::awaitable<Result<void>> events_subscribe(Ctx* c, json id, json params, Stream& out) {
    Params p("events.subscribe", params);
    if (auto checked = p.only({"vms", "since", "epoch", "heartbeat_ms"}); !checked)
        co_return checked.error();
    auto vms = p.optional_strings("vms");
    if (!vms)
        co_return vms.error();
    auto since = p.optional_int("since", 0, std::numeric_limits<std::int64_t>::max());
    if (!since)
        co_return since.error();
    auto heartbeat = p.optional_int("heartbeat_ms", 100, 60'000);
    if (!heartbeat)
        co_return heartbeat.error();
    auto epoch = p.optional_string("epoch");
    if (!epoch)
        co_return epoch.error();
    auto& log = c->engine->events();
    auto queue = std::make_shared<EventQueue>(std::set<std::string>(vms->begin(), vms->end()));
    auto wake = std::make_shared<asio::steady_timer>(out.executor());
    auto woken = std::make_shared<bool>(false);
    // Listening before the backlog is read: nothing falls between the two.
    std::vector<engine::Event> backlog;
    std::optional<std::string> resync;
    if (*since) {
        // 0: every event kept; N: the ones after N, or a resync when some
        // of those were dropped already or N is from another ferryd's log.
        auto from = **since == 0 ? log.oldest_seq() - 1 : static_cast<std::uint64_t>(**since);
        std::optional<std::vector<engine::Event>> kept;
        if (*epoch && **epoch != log.epoch())
            resync = fmt::format("ferryd restarted (events of epoch {}, this is {}): read the state again "
                                 "(migration list, vm list); the events kept follow",
                                 **epoch, log.epoch());
        else if (from > log.last_seq())
            resync = fmt::format("event {} has not happened in this ferryd's log (the last is {}; ferryd may have "
                                 "restarted): read the state again (migration list, vm list); the events kept follow",
                                 from, log.last_seq());
        else if (kept = log.since(from); !kept)
            resync = fmt::format("events after {} were dropped (the oldest kept is {}): read the state again "
                                 "(migration list, vm list); the events kept follow",
                                 from, log.oldest_seq());
        if (resync)
            kept = log.since(log.oldest_seq() - 1);
        backlog = std::move(*kept);
    }
    auto listener = log.listen([queue, wake, woken](const engine::Event& e) {
        queue->push(e);
        *woken = true;
        wake->cancel();
    });
    struct Unlisten {
        engine::EventLog& log;
        std::uint64_t id;
        ~Unlisten() { log.unlisten(id); }
    } unlisten{log, listener};
    // Everything up to here is in the backlog (or before `since`); the queue
    // holds what comes after, including what arrives while the first lines
    // are written.
    std::uint64_t last_sent = log.last_seq();

    json first{{"id", id},
               {"result", {{"seq", log.last_seq()}, {"oldest_seq", log.oldest_seq()}, {"epoch", log.epoch()}}}};
    bool open = co_await out.send(first);
    if (open && resync) {
        json line{{"type", "resync"}, {"seq", log.oldest_seq() - 1}, {"message", *resync}};
        open = co_await out.send(line);
    }
    for (auto& e : backlog) {
        if (!open)
            break;
        if (queue->wants(e))
            open = co_await out.send(engine::to_json(e));
    }
    // The client closing its end ends the stream at once.
    auto done = std::make_shared<bool>(false);
    asio::co_spawn(
        out.executor(),
        [](Stream* s, std::shared_ptr<bool> flag, std::shared_ptr<asio::steady_timer> timer) -> asio::awaitable<void> {
            co_await s->client_done();
            *flag = true;
            timer->cancel();
        }(&out, done, wake),
        asio::detached);
    while (open && !*done) {
        while (open) {
            auto e = queue->pop();
            if (!e)
                break;
            if (e->seq <= last_sent)
                continue; // already sent with the backlog
            last_sent = e->seq;
            open = co_await out.send(engine::to_json(*e));
        }
        if (!open || *done)
            break;
        if (queue->overflowed()) {
            json line{{"type", "overflow"},
                      {"seq", last_sent},
                      {"message", fmt::format("this subscriber fell more than 1024 events behind; subscribe again "
                                              "with since = {}",
                                              last_sent)}};
            co_await out.send(line);
            break;
        }
        *woken = false;
        wake->expires_after(std::chrono::milliseconds(heartbeat->value_or(5000)));
        co_await wake->async_wait(asio::as_tuple(asio::use_awaitable));
        if (!*woken && !*done) {
            json beat{{"type", "heartbeat"}, {"seq", log.last_seq()}, {"time", now_string()}};
            open = co_await out.send(beat);
        }
    }
    // The watcher above holds the socket's read: close it so it ends too.
    co_return Result<void>{};
}

// A request refused before its method runs.
asio::awaitable<Result<json>> refused(Error e) { co_return e; }

} // namespace

void add_engine_methods(Server& server, Engine& engine, scheduler::Planner& planner) {
    using Fn = asio::awaitable<Result<json>> (*)(Ctx*, json);
    struct Row {
        const char* name;
        Fn fn;
        bool changes_state; // logged with the caller's credentials
        std::vector<std::string_view> params; // every one it takes: any other is refused
    };
    const Row table[] = {
        {"node.info", node_info, false, {}},
        {"node.list", node_list, false, {}},
        {"node.cordon", node_cordon, true, {"node"}},
        {"node.uncordon", node_uncordon, true, {"node"}},
        {"node.drain", node_drain, true, {"node", "max_parallel", "deadline_s"}},
        {"node.drain_status", node_drain_status, false, {"node"}},
        {"vm.create", vm_create, true, {"spec", "source"}},
        {"vm.adopt", vm_adopt, true, {"name", "qmp", "spec", "source"}},
        {"vm.show", vm_show, false, {"name"}},
        {"vm.list", vm_list, false, {}},
        {"vm.delete", vm_delete, true, {"name"}},
        {"vm.qmp", vm_qmp, true, {"name", "command", "arguments"}},
        {"vm.dirty_rate", vm_dirty_rate, false, {"name", "seconds"}},
        {"migration.create", migration_create, true,
         {"vm", "target_node", "bandwidth", "max_downtime_ms", "allow_auto_converge", "allow_post_copy",
          "node_selector", "dry_run"}},
        {"migration.list", migration_list, false, {}},
        {"migration.show", migration_show, false, {"id"}},
        {"migration.abort", migration_abort, true, {"id", "target_lost"}},
    };
    auto ctx = std::make_shared<Ctx>(Ctx{&engine, &planner});
    for (auto& row : table) {
        Fn fn = row.fn;
        std::string name = row.name;
        server.add(
            row.name,
            [ctx, fn, name, known = row.params](json params) -> asio::awaitable<Result<json>> {
                if (auto checked = Params(name, params).only(known); !checked)
                    return refused(checked.error());
                return fn(ctx.get(), std::move(params));
            },
            row.changes_state);
    }
    server.add_with_fds("migration.register_target", [ctx](json params, std::vector<UniqueFd> fds) {
        if (auto checked = Params("migration.register_target", params).only({"vm", "qmp", "pid", "fds"}); !checked)
            return refused(checked.error());
        return migration_register_target(ctx.get(), std::move(params), std::move(fds));
    });
    server.add_stream("events.subscribe", [ctx](json id, json params, Stream& out) {
        return events_subscribe(ctx.get(), std::move(id), std::move(params), out);
    });
}

} // namespace ferry::control
