#include "engine/engine.hpp"

#include "block/qemu_block.hpp"
#include "block/target_image.hpp"
#include "transport/peer_server.hpp"

#include "config/quantity.hpp"
#include "engine/async.hpp"
#include "engine/process.hpp"
#include "engine/qemu_args.hpp"
#include "engine/source_disks.hpp"
#include "engine/source_run.hpp"
#include "engine/store.hpp"
#include "engine/target_run.hpp"
#include "engine/throttle.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>

#include <grp.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <unistd.h>

namespace ferry::engine {

namespace asio = boost::asio;
namespace fs = std::filesystem;

namespace {

Result<void> check_spec_files(const config::VmSpec& spec) {
    // Every file the spec names, each with its key (and line when it came
    // from a file): all at once, in the spec's order.
    std::vector<std::string> problems;
    for (auto [key, path] : {std::pair{"kernel", &spec.kernel}, std::pair{"initrd", &spec.initrd}})
        if (*path && !fs::is_regular_file(**path))
            problems.push_back(fmt::format("{}: {} does not exist or is not a file", spec.where(key), **path));
    for (std::size_t i = 0; i < spec.disks.size(); ++i)
        if (!fs::exists(spec.disks[i].path))
            problems.push_back(fmt::format("{}: {} does not exist", spec.where(fmt::format("disks[{}].path", i)),
                                           spec.disks[i].path));
    if (problems.empty())
        return {};
    return make_error(Errc::invalid_argument, fmt::format("{}", fmt::join(problems, "\n")));
}

std::string random_suffix() {
    static std::mt19937_64 rng{std::random_device{}()};
    return fmt::format("{:06x}", rng() & 0xFFFFFF);
}

} // namespace

Engine::Engine(asio::any_io_executor ex, config::NodeConfig config)
    : ex_(ex), config_(std::move(config)), reaper_(ex) {}

Engine::~Engine() = default;

std::string Engine::vm_dir(const std::string& name) const {
    return config_.node.state_dir + "/vms/" + name;
}

std::string Engine::migration_path(const std::string& id) const {
    return config_.node.state_dir + "/migrations/" + id + ".json";
}

void Engine::persist(const Vm& vm) {
    if (auto r = write_json_file(vm_dir(vm.record.name) + "/vm.json", vm.record); !r)
        engine_log()->error("vm {}: cannot save record: {}", vm.record.name, r.error().message);
}

void Engine::persist(const Migration& m) {
    if (auto r = write_json_file(migration_path(m.id), m); !r)
        engine_log()->error("migration {}: cannot save record: {}", m.id, r.error().message);
    if (is_final(m.phase))
        prune_finished(m.vm);
}

void Engine::prune_finished(const std::string& vm) {
    std::vector<const Migration*> ended;
    for (auto& [id, m] : migrations_)
        if (m->vm == vm && is_final(m->phase))
            ended.push_back(m.get());
    auto keep = static_cast<std::size_t>(config_.migration.finished_migrations_per_vm);
    if (ended.size() <= keep)
        return;
    std::sort(ended.begin(), ended.end(), [](auto* a, auto* b) {
        return a->ended_at.value_or(a->created_at) < b->ended_at.value_or(b->created_at);
    });
    std::vector<std::string> drop;
    for (std::size_t i = 0; i + keep < ended.size(); ++i)
        drop.push_back(ended[i]->id);
    for (auto& id : drop) {
        std::error_code ec;
        fs::remove(migration_path(id), ec);
        migrations_.erase(id);
        engine_log()->debug("migration {}: record removed (keeping the newest {} of {})", id, keep, vm);
    }
}

Result<void> Engine::preflight(const config::NodeConfig& c) {
    if (auto dir = check_state_dir(c.node.state_dir); !dir)
        return make_error(Errc::invalid_argument, fmt::format("{}: {}", c.where("node.state_dir"), dir.error().message));
    auto& tls = c.tls;
    if (!c.migration.disable_tls && !tls.ca.empty()) {
        for (auto [key, path] : {std::pair{"tls.ca", &tls.ca}, std::pair{"tls.cert", &tls.cert},
                                 std::pair{"tls.key", &tls.key}}) {
            std::error_code ec;
            if (!fs::is_regular_file(*path, ec))
                return make_error(Errc::invalid_argument,
                                  fmt::format("{}: {} {}", c.where(key), *path,
                                              fs::exists(*path, ec) ? "is not a regular file" : "does not exist"));
        }
        auto id = transport::TlsIdentity::load({tls.ca, tls.cert, tls.key}, c.node.name);
        if (!id)
            return make_error(Errc::invalid_argument, fmt::format("{}: {}", c.where("tls.cert"), id.error().message));
    }
    if (auto& group = c.node.control_socket_group; !group.empty() && !::getgrnam(group.c_str()))
        return make_error(Errc::invalid_argument,
                          fmt::format("{}: there is no group {} on this machine", c.where("node.control_socket_group"),
                                      group));
    if (!c.hooks.dir.empty()) {
        std::error_code ec;
        if (!fs::is_directory(c.hooks.dir, ec))
            return make_error(Errc::invalid_argument,
                              fmt::format("{}: {} {}", c.where("hooks.dir"), c.hooks.dir,
                                          fs::exists(c.hooks.dir, ec) ? "is not a directory" : "does not exist"));
        // As sshd and cron: nothing another user may change runs as ferryd.
        if (auto trusted = check_hooks(c.hooks.dir); !trusted)
            return make_error(Errc::invalid_argument,
                              fmt::format("{}: {}", c.where("hooks.dir"), trusted.error().message));
    }
    // The QEMU binary and the wrapper's: a path, or a name looked up in PATH.
    auto executable = [](const std::string& program) {
        if (program.find('/') != std::string::npos)
            return ::access(program.c_str(), X_OK) == 0;
        const char* path = std::getenv("PATH");
        std::string_view dirs = path ? path : "";
        while (!dirs.empty()) {
            auto colon = dirs.find(':');
            if (::access(fmt::format("{}/{}", dirs.substr(0, colon), program).c_str(), X_OK) == 0)
                return true;
            dirs = colon == std::string_view::npos ? std::string_view{} : dirs.substr(colon + 1);
        }
        return false;
    };
    for (auto [key, program] : {std::pair{"node.qemu", &c.node.qemu},
                                std::pair{"node.qemu_wrapper", c.node.qemu_wrapper.empty() ? nullptr
                                                                                           : &c.node.qemu_wrapper[0]}})
        if (program && !executable(*program))
            return make_error(Errc::invalid_argument,
                              fmt::format("{}: {} is not an executable{}", c.where(key), *program,
                                          program->find('/') == std::string::npos ? " in PATH" : ""));
    return {};
}

std::vector<std::string> Engine::reload(const config::NodeConfig& fresh) {
    std::vector<std::string> kept;
    auto keep = [&](const char* key, bool same) {
        if (!same)
            kept.push_back(fmt::format("{}: changed in {}; it takes effect when ferryd restarts", key, fresh.file));
    };
    auto& n = config_.node;
    auto& f = fresh.node;
    keep("node.name", n.name == f.name);
    keep("node.state_dir", n.state_dir == f.state_dir);
    keep("node.control_socket", n.control_socket == f.control_socket);
    keep("node.control_socket_mode", n.control_socket_mode == f.control_socket_mode);
    keep("node.control_socket_group", n.control_socket_group == f.control_socket_group);
    keep("node.insecure_control_socket", n.insecure_control_socket == f.insecure_control_socket);
    keep("node.control_max_connections", n.control_max_connections == f.control_max_connections);
    keep("node.control_idle_timeout", n.control_idle_timeout == f.control_idle_timeout);
    keep("node.listen", n.listen == f.listen);
    keep("tls", config_.tls.ca == fresh.tls.ca && config_.tls.cert == fresh.tls.cert && config_.tls.key == fresh.tls.key);
    keep("migration.disable_tls", config_.migration.disable_tls == fresh.migration.disable_tls);
    bool same_peers = config_.peers.size() == fresh.peers.size();
    for (std::size_t i = 0; same_peers && i < config_.peers.size(); ++i)
        same_peers = config_.peers[i].name == fresh.peers[i].name && config_.peers[i].address == fresh.peers[i].address;
    keep("peers", same_peers);
    keep("metrics.listen", config_.metrics.listen == fresh.metrics.listen);

    // What applies from now on.
    n.max_migration_bandwidth = f.max_migration_bandwidth;
    n.qemu = f.qemu;
    n.qemu_wrapper = f.qemu_wrapper;
    n.launcher = f.launcher;
    n.external_launch_timeout = f.external_launch_timeout;
    n.accel = f.accel;
    n.log_level = f.log_level;
    n.labels = f.labels;
    n.cpu_allocation_ratio = f.cpu_allocation_ratio;
    auto disable_tls = config_.migration.disable_tls;
    config_.migration = fresh.migration;
    config_.migration.disable_tls = disable_tls;
    config_.block = fresh.block;
    config_.hooks = fresh.hooks;
    config_.policies = fresh.policies;
    config_.lines = fresh.lines;
    if (peer_server_)
        shaper_.set_cap(n.max_migration_bandwidth);
    return kept;
}

json Engine::vm_json(const Vm& vm) const {
    json j{{"name", vm.record.name},
           {"node", vm.record.node},
           {"status", vm.status},
           {"adopted", vm.record.adopted},
           {"pid", vm.record.pid},
           {"generation", vm.record.generation},
           {"qmp_socket", vm.record.qmp_socket},
           {"console_log", vm_dir(vm.record.name) + "/console.log"},
           {"created_at", vm.record.created_at},
           {"migration", vm.migration_id ? json(*vm.migration_id) : json(nullptr)}};
    j["spec"] = vm.record.spec ? json(*vm.record.spec) : json(nullptr);
    return j;
}

void Engine::attach(const std::shared_ptr<Vm>& vm) {
    auto client = vm->qemu.qmp;
    if (!client)
        return;
    std::weak_ptr<Vm> weak = vm;
    client->subscribe([weak, raw = client.get()](const qmp::Event& e) {
        auto v = weak.lock();
        if (!v || v->qemu.qmp.get() != raw)
            return;
        if (e.name == "RESUME")
            v->status = "running";
        else if (e.name == "STOP")
            v->status = "paused";
        else if (e.name == "SHUTDOWN")
            v->status = "shutdown";
    });
    client->on_close([weak, raw = client.get()](const Error& err) {
        auto v = weak.lock();
        if (!v || v->qemu.qmp.get() != raw || v->deleting)
            return;
        v->status = "stopped";
        engine_log()->warn("vm {}: lost QEMU: {}", v->record.name, err.message);
    });
}

void Engine::add_vm(const std::shared_ptr<Vm>& vm) {
    vms_[vm->record.name] = vm;
    attach(vm);
    persist(*vm);
}

void Engine::add_migration(const Migration& m) { migrations_[m.id] = std::make_shared<Migration>(m); }

Migration* Engine::migration(const std::string& id) {
    auto it = migrations_.find(id);
    return it == migrations_.end() ? nullptr : it->second.get();
}

std::optional<std::string> Engine::vm_using_disk(const std::string& path) const {
    // The same path, or the same file under another name (a link, a bind).
    auto same = [&](const std::string& other) {
        std::error_code ec;
        return fs::path(other).lexically_normal() == fs::path(path).lexically_normal() ||
               fs::equivalent(other, path, ec);
    };
    for (auto& [name, vm] : vms_) {
        if (!vm->record.spec)
            continue;
        for (auto& d : vm->record.spec->disks)
            if (same(d.path))
                return name;
    }
    return std::nullopt;
}

std::optional<std::string> Engine::arriving(const std::string& vm) const {
    for (auto& [id, other] : incoming_)
        if (other->vm_name() == vm)
            return id;
    return std::nullopt;
}

void Engine::add_arriving(const std::shared_ptr<TargetRun>& run) { incoming_[run->migration().id] = run; }

asio::awaitable<Result<json>> Engine::register_target(std::string vm, std::string qmp_socket, int pid,
                                                      std::vector<std::pair<std::string, UniqueFd>> fds) {
    if (config_.node.launcher != "external")
        co_return make_error(Errc::conflict,
                             fmt::format("{} starts its destination QEMUs itself ([node] launcher = \"{}\")",
                                         config_.node.name, config_.node.launcher));
    std::shared_ptr<TargetRun> run;
    for (auto& [id, r] : incoming_)
        if (r->vm_name() == vm)
            run = r;
    if (!run)
        co_return make_error(Errc::not_found, fmt::format("no migration of {} arrives on {}", vm, config_.node.name));
    std::vector<TargetRun::NamedFd> named;
    for (auto& [name, fd] : fds)
        named.push_back({name, std::move(fd)});
    co_return co_await run->register_external(std::move(qmp_socket), pid, std::move(named));
}

asio::awaitable<Result<void>> Engine::start() {
    std::error_code ec;
    if (auto r = preflight(config_); !r)
        co_return r.error();
    host_ = probe_host(config_.node.qemu);
    engine_log()->info("node {}: {} CPUs, {} of memory, QEMU {} ({} machine types, {} CPU models)", config_.node.name,
                       host_.cpus, config::format_quantity(host_.memory), host_.qemu_version,
                       host_.machine_types.size(), host_.cpu_models.size());
    for (auto dir : {config_.node.state_dir + "/vms", config_.node.state_dir + "/migrations"}) {
        fs::create_directories(dir, ec);
        if (ec)
            co_return make_error(Errc::io, fmt::format("creating {}: {}", dir, ec.message()));
    }
    // Records, console logs and QEMU's sockets: for ferryd's user only (the
    // directories are made under its umask 077; state_dir's own mode is the
    // operator's when it existed before).
    for (auto& entry : fs::directory_iterator(config_.node.state_dir + "/vms", ec)) {
        auto rec = read_json_file(entry.path().string() + "/vm.json");
        if (!rec) {
            engine_log()->warn("skipping {}: {}", entry.path().string(), rec.error().message);
            continue;
        }
        auto vm = std::make_shared<Vm>();
        try {
            vm->record = rec->get<VmRecord>();
        } catch (const std::exception& e) {
            engine_log()->warn("skipping {}: bad record: {}", entry.path().string(), e.what());
            continue;
        }
        vms_[vm->record.name] = vm;
        co_await reattach(vm);
    }
    std::vector<Migration> unfinished;
    for (auto& entry : fs::directory_iterator(config_.node.state_dir + "/migrations", ec)) {
        if (entry.path().extension() != ".json")
            continue;
        auto rec = read_json_file(entry.path().string());
        if (!rec)
            continue;
        Migration m;
        try {
            m = rec->get<Migration>();
        } catch (const std::exception& e) {
            engine_log()->warn("skipping {}: bad record: {}", entry.path().string(), e.what());
            continue;
        }
        if (!is_final(m.phase))
            unfinished.push_back(m);
        migrations_[m.id] = std::make_shared<Migration>(m);
    }
    for (auto& m : unfinished)
        co_await recover_migration(m);
    std::set<std::string> with_records;
    for (auto& [id, m] : migrations_)
        with_records.insert(m->vm);
    for (auto& vm : with_records)
        prune_finished(vm);

    if (auto r = start_peer_endpoint(); !r)
        co_return r.error();
    for (auto& [id, target] : abort_at_targets_)
        asio::co_spawn(ex_, abort_at_target(this, id, target), asio::detached);
    abort_at_targets_.clear();
    for (auto& [id, doubt] : in_doubt_)
        asio::co_spawn(ex_, settle(this, id), asio::detached);
    asio::co_spawn(ex_, reap_loop(this), asio::detached);
    engine_log()->info("engine ready: {} VMs, {} migrations on record", vms_.size(), migrations_.size());
    co_return Result<void>{};
}

// Reaps exited QEMU children now and then so none stays a zombie: a VM
// whose QEMU died is polled with process_alive(), which reaps it.
asio::awaitable<void> Engine::reap_loop(Engine* self) {
    while (!self->stopping_) {
        self->reaper_.expires_after(std::chrono::seconds(1));
        auto [ec] = co_await self->reaper_.async_wait(asio::as_tuple(asio::use_awaitable));
        if (ec)
            co_return;
        for (auto& [name, vm] : self->vms_)
            if (vm->record.pid > 0 && vm->status == "stopped")
                process_alive(vm->record.pid);
    }
}

asio::awaitable<void> Engine::reattach(std::shared_ptr<Vm> vm) {
    auto& r = vm->record;
    if (r.qmp_socket.empty() || !fs::exists(r.qmp_socket) || (r.pid > 0 && !process_alive(r.pid))) {
        vm->status = "stopped";
        engine_log()->warn("vm {}: its QEMU is gone", r.name);
        co_return;
    }
    auto c = co_await qmp::Client::connect(ex_, r.qmp_socket, std::chrono::seconds(5));
    if (!c) {
        vm->status = "stopped";
        engine_log()->warn("vm {}: cannot re-attach: {}", r.name, c.error().message);
        co_return;
    }
    vm->qemu.qmp = *c;
    vm->qemu.pid = r.pid;
    // A ferryd that died mid-migration may have left the vCPUs throttled.
    CpuThrottle::release_stale(r.name, r.pid);
    vm->qemu.generation = r.generation;
    vm->qemu.run_dir = r.run_dir;
    vm->qemu.qmp_socket = r.qmp_socket;
    if (!r.run_dir.empty()) {
        vm->qemu.console_file = r.run_dir + "/console.out";
        vm->qemu.console = std::make_shared<ConsoleCapture>(ex_, vm->qemu.console_file,
                                                            vm_dir(r.name) + "/console.log",
                                                            fmt::format("r{}", r.generation),
                                                            ConsoleLimits{config_.node.console_log_max});
        vm->qemu.console->start();
    }
    auto status = co_await vm->qemu.qmp->execute("query-status");
    vm->status = status ? (*status).value("status", "unknown") : "unknown";
    attach(vm);
    engine_log()->info("vm {}: re-attached to QEMU pid {} ({})", r.name, r.pid, vm->status);
}

void Engine::note_peer(const std::string& peer, bool ok, const std::string& why) {
    auto& p = peer_contacts_[peer];
    p.up = ok;
    if (ok) {
        p.last_ok_unix = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    } else {
        ++p.failures;
        p.last_error = why;
    }
}

asio::awaitable<Result<json>> Engine::ask_once(const config::Peer& peer, json message, std::chrono::seconds answer) {
    auto c = co_await transport::open_control(ex_, peer.address, peer.name, config_.node.name, tls_);
    if (!c) {
        note_peer(peer.name, false, c.error().message);
        co_return c.error();
    }
    Result<json> reply = ok(json());
    auto w = co_await (*c)->write_frame(message);
    if (w)
        reply = co_await (*c)->read_frame(answer);
    else
        reply = w.error();
    (*c)->close();
    note_peer(peer.name, static_cast<bool>(reply), reply ? "" : reply.error().message);
    co_return reply;
}

asio::awaitable<Result<json>> Engine::ask_peer(std::string node, json message, std::chrono::seconds answer) {
    auto* p = peer(node);
    if (!p)
        co_return make_error(Errc::not_found, fmt::format("unknown node {} (not in [[peers]])", node));
    if (!peer_server_)
        co_return make_error(Errc::conflict, "cross-node traffic is off on this node (no [tls], no disable_tls)");
    auto reply = co_await ask_once(*p, std::move(message), answer);
    if (!reply)
        co_return reply.error().wrap(fmt::format("node {}", node));
    if (reply->value("type", "") == "error")
        co_return make_error(Errc::conflict, fmt::format("node {}: {}", node, reply->value("message", reply->dump())));
    co_return reply;
}

void Engine::set_admission(std::string state, std::string why) {
    if (state != admission_)
        engine_log()->info("node {} is {}{}", config_.node.name, state, why.empty() ? "" : ": " + why);
    admission_ = std::move(state);
    admission_why_ = std::move(why);
}

asio::awaitable<void> Engine::abort_at_target(Engine* self, std::string id, std::string target) {
    auto* p = self->peer(target);
    if (!p || !self->peer_server_)
        co_return;
    json abort{{"type", "abort"}, {"migration_id", id}};
    auto reply = co_await self->ask_once(*p, abort);
    if (reply)
        engine_log()->info("migration {}: node {} told to give up the arrival", id, target);
    else
        engine_log()->warn("migration {}: telling node {} to give up the arrival: {} (it does so by itself after "
                           "peer_timeout)",
                           id, target, reply.error().message);
}

asio::awaitable<Result<json>> Engine::create_vm(config::VmSpec spec) {
    if (vms_.count(spec.name))
        co_return make_error(Errc::already_exists, fmt::format("VM {} already exists", spec.name));
    if (auto max = config::max_vm_name_length(config_.node.state_dir); spec.name.size() > max)
        co_return make_error(Errc::invalid_argument,
                             fmt::format("VM name {} is {} characters; under state_dir {} QEMU's socket paths "
                                         "leave room for at most {}",
                                         spec.name, spec.name.size(), config_.node.state_dir, max));
    if (auto r = check_spec_files(spec); !r)
        co_return r.error();
    auto vm = std::make_shared<Vm>();
    vm->record.name = spec.name;
    vm->record.node = config_.node.name;
    vm->record.created_at = now_string();
    vm->record.spec = spec;
    vms_[spec.name] = vm; // reserve the name while launching
    std::error_code ec;
    fs::create_directories(vm_dir(spec.name), ec);
    LaunchRequest req{&config_.node, &*vm->record.spec, vm_dir(spec.name), 1, false};
    auto q = co_await launch_qemu(ex_, req);
    if (!q) {
        vms_.erase(spec.name);
        fs::remove_all(vm_dir(spec.name), ec);
        co_return q.error().wrap(fmt::format("creating VM {}", spec.name));
    }
    vm->qemu = std::move(*q);
    vm->record.pid = vm->qemu.pid;
    vm->record.generation = vm->qemu.generation;
    vm->record.run_dir = vm->qemu.run_dir;
    vm->record.qmp_socket = vm->qemu.qmp_socket;
    vm->status = "running";
    attach(vm);
    persist(*vm);
    engine_log()->info("vm {}: running (pid {})", spec.name, vm->record.pid);
    co_return ok(vm_json(*vm));
}

asio::awaitable<Result<json>> Engine::adopt_vm(std::string name, std::string qmp_socket,
                                               std::optional<config::VmSpec> spec) {
    if (!config::valid_vm_name(name))
        co_return make_error(Errc::invalid_argument, fmt::format("'{}' is not a valid VM name", name));
    if (auto max = config::max_vm_name_length(config_.node.state_dir); name.size() > max)
        co_return make_error(Errc::invalid_argument,
                             fmt::format("VM name {} is {} characters; under state_dir {} QEMU's socket paths "
                                         "leave room for at most {}",
                                         name, name.size(), config_.node.state_dir, max));
    if (vms_.count(name))
        co_return make_error(Errc::already_exists, fmt::format("VM {} already exists", name));
    if (spec && spec->name != name)
        co_return make_error(Errc::invalid_argument,
                             fmt::format("the spec names VM {}, not {}", spec->name, name));
    auto vm = std::make_shared<Vm>();
    vm->record.name = name;
    vm->record.node = config_.node.name;
    vm->record.adopted = true; // a delete meanwhile must not stop its QEMU
    vm->status = "adopting";
    vms_[name] = vm; // reserve the name across the QMP round trips
    auto c = co_await qmp::Client::connect(ex_, qmp_socket, std::chrono::seconds(5));
    Result<void> checked;
    json status;
    if (c) {
        auto s = co_await (*c)->execute("query-status");
        if (s)
            status = std::move(*s);
        else
            checked = s.error();
    }
    if (c && checked && spec)
        checked = co_await check_adopted(**c, *spec, resolve_accel(config_.node.accel, kvm_usable()));
    if (c && checked && vms_[name] != vm)
        checked = make_error(Errc::conflict, fmt::format("VM {} was deleted while being adopted", name));
    if (!c || !checked) {
        if (c)
            (*c)->close(); // QEMU serves one QMP client: let the next attempt in
        if (auto it = vms_.find(name); it != vms_.end() && it->second == vm)
            vms_.erase(it);
        co_return (c ? checked.error() : c.error()).wrap(fmt::format("adopting {}", name));
    }
    vm->record.created_at = now_string();
    vm->record.spec = spec;
    vm->record.qmp_socket = qmp_socket;
    vm->record.pid = (*c)->peer_pid();
    vm->qemu.qmp = *c;
    vm->qemu.pid = vm->record.pid;
    vm->qemu.qmp_socket = qmp_socket;
    vm->status = status.value("status", "unknown");
    std::error_code ec;
    fs::create_directories(vm_dir(name), ec);
    attach(vm);
    persist(*vm);
    engine_log()->info("vm {}: adopted QEMU pid {} at {}", name, vm->record.pid, qmp_socket);
    co_return ok(vm_json(*vm));
}

asio::awaitable<Result<json>> Engine::show_vm(std::string name) {
    auto it = vms_.find(name);
    if (it == vms_.end())
        co_return make_error(Errc::not_found, fmt::format("no VM named {}", name));
    auto vm = it->second;
    // In doubt, what the source QEMU says (paused) is not where the VM is.
    bool in_doubt = vm->migration_id && in_doubt_.count(*vm->migration_id);
    if (!in_doubt && vm->qemu.qmp && vm->qemu.qmp->connected()) {
        auto status = co_await vm->qemu.qmp->execute("query-status", {}, std::chrono::seconds(3));
        if (status)
            vm->status = (*status).value("status", vm->status);
    }
    co_return ok(vm_json(*vm));
}

Result<std::shared_ptr<qmp::Client>> Engine::running_qmp(const std::string& name) const {
    auto it = vms_.find(name);
    if (it == vms_.end())
        return make_error(Errc::not_found, fmt::format("no VM named {}", name));
    auto& vm = *it->second;
    if (!vm.qemu.qmp || !vm.qemu.qmp->connected())
        return make_error(Errc::conflict, fmt::format("VM {} has no running QEMU (status {})", name, vm.status));
    return vm.qemu.qmp;
}

asio::awaitable<Result<json>> Engine::qmp_command(std::string name, std::string command, json arguments) {
    auto qmp = running_qmp(name);
    if (!qmp)
        co_return qmp.error();
    co_return co_await (*qmp)->execute(std::move(command), std::move(arguments), std::chrono::seconds(120));
}

asio::awaitable<Result<json>> Engine::dirty_rate(std::string name, int seconds) {
    if (seconds < 1 || seconds > 60)
        co_return make_error(Errc::invalid_argument, fmt::format("seconds: {} is not between 1 and 60", seconds));
    auto found = running_qmp(name);
    if (!found)
        co_return found.error();
    auto qmp = *found;
    json args{{"calc-time", seconds}, {"mode", "page-sampling"}};
    auto started = co_await qmp->execute("calc-dirty-rate", args);
    if (!started)
        co_return started.error(); // QMP's errors name the command already
    auto deadline = Clock::now() + std::chrono::seconds(seconds + 10);
    for (;;) {
        co_await sleep_for(std::chrono::milliseconds(200));
        auto r = co_await qmp->execute("query-dirty-rate");
        if (!r)
            co_return r.error();
        auto status = (*r).value("status", "");
        if (status == "measured") {
            json out{{"vm", name},
                     {"dirty_rate_mib_s", (*r).value("dirty-rate", std::int64_t{0})},
                     {"seconds", (*r).value("calc-time", seconds)},
                     {"mode", (*r).value("mode", "page-sampling")},
                     {"sample_pages", (*r).value("sample-pages", 0)}};
            co_return ok(std::move(out));
        }
        if (Clock::now() > deadline)
            co_return make_error(Errc::timeout, fmt::format("calc-dirty-rate still '{}' after {} s", status, seconds + 10));
    }
}

json Engine::list_vms() const {
    json list = json::array();
    for (auto& [name, vm] : vms_)
        list.push_back(vm_json(*vm));
    return list;
}

std::vector<std::string> Engine::vm_names() const {
    std::vector<std::string> names;
    for (auto& [name, vm] : vms_)
        names.push_back(name);
    return names;
}

asio::awaitable<Result<void>> Engine::delete_vm(std::string name) {
    auto it = vms_.find(name);
    if (it == vms_.end())
        co_return make_error(Errc::not_found, fmt::format("no VM named {}", name));
    auto vm = it->second;
    if (vm->migration_id)
        co_return make_error(Errc::conflict, fmt::format("VM {} is migrating ({}); abort it first",
                                                         name, *vm->migration_id));
    vms_.erase(it);
    vm->deleting = true;
    if (vm->record.adopted) {
        if (vm->qemu.qmp)
            vm->qemu.qmp->close();
        engine_log()->info("vm {}: released (adopted; QEMU left running)", name);
    } else {
        co_await destroy_qemu(ex_, vm->qemu);
        engine_log()->info("vm {}: stopped and deleted", name);
    }
    std::error_code ec;
    fs::remove(vm_dir(name) + "/vm.json", ec);
    fs::remove_all(vm_dir(name), ec);
    // Its migrations' records go with it (a VM that left by migration keeps
    // its newest ones here, finished_migrations_per_vm, as history).
    std::vector<std::string> ended;
    for (auto& [id, m] : migrations_)
        if (m->vm == name && is_final(m->phase))
            ended.push_back(id);
    for (auto& id : ended) {
        fs::remove(migration_path(id), ec);
        migrations_.erase(id);
    }
    co_return Result<void>{};
}

json Engine::facts() const {
    json vms = json::array();
    for (auto& [name, vm] : vms_) {
        json v{{"name", name}, {"status", vm->status}, {"migrating", vm->migration_id.has_value()}};
        if (auto& spec = vm->record.spec) {
            bool local = std::any_of(spec->disks.begin(), spec->disks.end(), [](auto& d) { return !d.shared; });
            v.update({{"memory", spec->memory},
                      {"cpus", spec->cpus},
                      {"cpu_model", spec->cpu_model},
                      {"machine", spec->machine},
                      {"labels", spec->labels},
                      {"node_selector", spec->node_selector},
                      {"local_disks", local}});
        }
        vms.push_back(std::move(v));
    }
    json migrations = json::array();
    for (auto& [id, m] : migrations_) {
        if (is_final(m->phase))
            continue;
        std::uint64_t memory = 0; // the VM's here when leaving, its spec's when arriving
        std::int64_t cpus = 0;
        if (auto in = incoming_.find(id); in != incoming_.end()) {
            memory = in->second->spec().memory;
            cpus = in->second->spec().cpus;
        } else if (auto* spec = vm_spec(m->vm)) {
            memory = spec->memory;
            cpus = spec->cpus;
        }
        migrations.push_back({{"id", id},
                              {"vm", m->vm},
                              {"source_node", m->source_node},
                              {"target_node", m->target_node},
                              {"phase", to_string(m->phase)},
                              {"memory", memory},
                              {"cpus", cpus}});
    }
    return json{{"name", config_.node.name},
                {"state", stopping_ ? "stopping" : admission_},
                {"labels", config_.node.labels},
                {"memory", host_.memory},
                {"cpus", host_.cpus},
                {"vcpus", host_.cpus * config_.node.cpu_allocation_ratio},
                {"host_cpu", host_.host_cpu},
                {"qemu_version", host_.qemu_version},
                {"machine_types", host_.machine_types},
                {"cpu_models", host_.cpu_models},
                {"limits",
                 {{"outbound", config_.migration.parallel_outbound_migrations_per_node},
                  {"inbound", config_.migration.parallel_inbound_migrations_per_node}}},
                {"vms", std::move(vms)},
                {"migrations", std::move(migrations)}};
}

asio::awaitable<Result<json>> Engine::peer_facts(std::string node) {
    auto* p = peer(node);
    if (!p)
        co_return make_error(Errc::not_found, fmt::format("unknown node {} (not in [[peers]])", node));
    if (!peer_server_)
        co_return make_error(Errc::conflict, "cross-node traffic is off on this node (no [tls], no disable_tls)");
    json ask{{"type", "facts"}};
    auto reply = co_await ask_once(*p, ask);
    if (!reply)
        co_return reply.error().wrap(fmt::format("node {}", node));
    if (reply->value("type", "") != "facts" || !reply->contains("node"))
        co_return make_error(Errc::protocol, fmt::format("node {} answered facts with {}", node,
                                                         reply->value("message", reply->dump())));
    co_return ok((*reply)["node"]);
}

const config::VmSpec* Engine::vm_spec(const std::string& name) const {
    auto it = vms_.find(name);
    if (it == vms_.end() || !it->second->record.spec)
        return nullptr;
    return &*it->second->record.spec;
}

Result<json> Engine::migrate(const MigrateRequest& req) {
    if (stopping_)
        return make_error(Errc::conflict, "ferryd is shutting down");
    auto it = vms_.find(req.vm);
    if (it == vms_.end())
        return make_error(Errc::not_found, fmt::format("no VM named {}", req.vm));
    auto vm = it->second;
    if (vm->migration_id)
        return make_error(Errc::conflict, fmt::format("VM {} is already migrating ({})", req.vm, *vm->migration_id));
    if (!vm->record.spec)
        return make_error(Errc::conflict,
                          fmt::format("VM {} was adopted without a spec, so ferry cannot start its "
                                      "destination QEMU; adopt it again with --spec",
                                      req.vm));
    if (!vm->qemu.qmp || !vm->qemu.qmp->connected())
        return make_error(Errc::conflict, fmt::format("VM {} has no running QEMU (status {})", req.vm, vm->status));
    auto outbound = static_cast<std::int64_t>(runs_.size());
    if (outbound >= config_.migration.parallel_outbound_migrations_per_node)
        return make_error(Errc::conflict,
                          fmt::format("{} has {}/{} outbound migrations (parallel_outbound_migrations_per_node); try "
                                      "again when one ends",
                                      config_.node.name, outbound, config_.migration.parallel_outbound_migrations_per_node));
    const config::Peer* target_peer = nullptr;
    if (req.target_node && *req.target_node != config_.node.name) {
        target_peer = peer(*req.target_node);
        if (!target_peer)
            return make_error(Errc::not_found, fmt::format("unknown target node {} (not this node, not in [[peers]])",
                                                           *req.target_node));
        if (!peer_server_)
            return make_error(Errc::conflict,
                              fmt::format("cross-node migration is off on {}: configure [tls] (ferryctl pki "
                                          "init) or set [migration] disable_tls = true",
                                          config_.node.name));
    }
    // Across nodes, local disks move with the VM (a block migration); on
    // one node both QEMUs open the same file.
    bool block = false;
    if (target_peer)
        for (auto& d : vm->record.spec->disks)
            block = block || !d.shared;
    auto record = std::make_shared<Migration>();
    auto& m = *record;
    m.id = fmt::format("{}-{}", req.vm, random_suffix());
    m.vm = req.vm;
    m.source_node = config_.node.name;
    m.target_node = target_peer ? target_peer->name : config_.node.name;
    m.config = req.settings.value_or(config_.migration);
    m.policy = req.policy;
    if (req.bandwidth)
        m.config.bandwidth_per_migration = *req.bandwidth;
    if (req.max_downtime_ms)
        m.config.max_downtime_ms = *req.max_downtime_ms;
    if (req.allow_auto_converge)
        m.config.allow_auto_converge = *req.allow_auto_converge;
    if (req.allow_post_copy)
        m.config.allow_post_copy = *req.allow_post_copy;
    if (block)
        m.method = "block";
    m.created_at = now_string();
    vm->migration_id = m.id;
    migrations_[m.id] = record;
    persist(m);
    engine_log()->info("migration {}: {} from {} to {}", m.id, m.vm, m.source_node, m.target_node);
    Node& node = *this;
    auto run = SourceRun::create(node, record, vm, target_peer);
    runs_[m.id] = run;
    asio::co_spawn(ex_, drive(this, run), asio::detached);
    return ok(json(m));
}

asio::awaitable<void> Engine::drive(Engine* self, std::shared_ptr<SourceRun> run) {
    co_await SourceRun::run(run);
    auto id = run->migration().id;
    self->runs_.erase(id);
    if (auto* m = self->migration(id))
        self->publish("result", m->vm, id, json(*m));
    for (auto& ended : self->ended_)
        ended(id);
}

json Engine::list_migrations() const {
    std::vector<const Migration*> list;
    for (auto& [id, m] : migrations_)
        list.push_back(m.get());
    std::sort(list.begin(), list.end(), [](auto* a, auto* b) { return a->created_at < b->created_at; });
    json out = json::array();
    for (auto* m : list)
        out.push_back(*m);
    return out;
}

Result<json> Engine::show_migration(const std::string& id) const {
    auto it = migrations_.find(id);
    if (it == migrations_.end())
        return make_error(Errc::not_found, fmt::format("no migration {}", id));
    json out = *it->second;
    if (auto doubt = in_doubt_.find(id); doubt != in_doubt_.end())
        out["in_doubt"] = doubt->second.why;
    return ok(std::move(out));
}

Result<json> Engine::abort_migration(const std::string& id, bool target_lost) {
    auto it = migrations_.find(id);
    if (it == migrations_.end())
        return make_error(Errc::not_found, fmt::format("no migration {}", id));
    auto& m = *it->second;
    auto run = runs_.find(id);
    if (m.source_node != config_.node.name)
        return make_error(Errc::conflict, fmt::format("migration {} is driven by node {}: abort it there", id, m.source_node));
    if (is_final(m.phase))
        return make_error(Errc::conflict, fmt::format("migration {} already ended ({})", id, to_string(m.phase)));
    if (auto doubt = in_doubt_.find(id); doubt != in_doubt_.end())
        return resolve_doubt(m, doubt->second, target_lost);
    if (target_lost)
        return make_error(Errc::conflict, fmt::format("migration {} is not in doubt: --target-lost is only for a "
                                                      "migration whose hand-off got no answer",
                                                      id));
    if (m.mode == "postcopy")
        return make_error(Errc::conflict,
                          fmt::format("migration {} is in post-copy: the VM already runs on {} and part of its "
                                      "memory is still only on {}, so neither side can be abandoned; ferry "
                                      "finishes it (and recovers the connection if it breaks)",
                                      id, m.target_node, m.source_node));
    if (run != runs_.end() && run->second->switchover_started())
        return make_error(Errc::conflict,
                          fmt::format("migration {} is switching over: the destination has the VM's "
                                      "final state and cannot be abandoned",
                                      id));
    if (!m.abort_requested) {
        m.abort_requested = true;
        m.abort_status = "Aborting";
        persist(m);
        engine_log()->info("migration {}: abort requested", id);
        if (run != runs_.end())
            run->second->wake_up();
    }
    return ok(json(m));
}

void Engine::shutdown() {
    stopping_ = true;
    reaper_.cancel();
    if (peer_server_)
        peer_server_->stop();
}

} // namespace ferry::engine
