// The target side of a cross-node migration: one method per message of the
// source's.
#include "engine/target_run.hpp"

#include "block/qemu_block.hpp"
#include "block/ring.hpp"
#include "block/target_image.hpp"
#include "engine/async.hpp"
#include "engine/heartbeat.hpp"
#include "engine/hooks.hpp"
#include "engine/process.hpp"
#include "engine/qemu_args.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/local/connect_pair.hpp>

#include <fmt/format.h>

#include <filesystem>

namespace ferry::engine {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {
constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);
} // namespace

json error_message(const std::string& why) { return {{"type", "error"}, {"message", why}}; }

TargetRun::TargetRun(Node& node, std::string source_node)
    : node_(node), hooks_config_(node.config().hooks), launch_wait_(node.executor()),
      source_node_(std::move(source_node)), order_(node.executor()) {}

std::string TargetRun::check_prepare(const json& msg) {
    try {
        m_ = msg.at("migration").get<Migration>();
        m_.created_images.clear(); // this node's own list, never the peer's
        spec_ = msg.at("spec").get<config::VmSpec>();
        channels_ = msg.at("channels").get<int>();
    } catch (const std::exception& e) {
        return fmt::format("bad prepare: {}", e.what());
    }
    // A peer is authenticated, not infallible: its spec gets the checks a
    // local one gets before any QEMU starts from it.
    if (auto valid = config::validate_vm_spec(spec_); !valid)
        return fmt::format("bad prepare: {}", valid.error().message);
    // The id names a file under state_dir: "<vm>-<suffix>", nothing else.
    auto& id = m_.id;
    bool id_ok = id.size() > spec_.name.size() + 1 && id.rfind(spec_.name + "-", 0) == 0 &&
                 config::valid_vm_name(id.substr(spec_.name.size() + 1)) && id.size() <= 100;
    if (m_.vm != spec_.name || !id_ok)
        return fmt::format("bad prepare: migration '{}' of VM '{}' does not match spec {}", id, m_.vm, spec_.name);
    if (node_.has_migration(id))
        return fmt::format("bad prepare: migration {} is known here already", id);
    auto& config = node_.config();
    if (spec_.name.size() > config::max_vm_name_length(config.node.state_dir))
        return fmt::format("VM name {} is too long for {}'s state_dir", spec_.name, config.node.name);
    if (m_.config.multifd_channels < 0 || m_.config.multifd_channels > 255)
        return fmt::format("bad prepare: multifd_channels {} (0..255)", m_.config.multifd_channels);
    if (channels_ != migration_channels(m_.config))
        return fmt::format("bad prepare: {} data channels for a migration that opens {}", channels_,
                           migration_channels(m_.config));
    if (auto disks = msg.find("disks"); disks != msg.end()) {
        auto bad = plan_arriving_disks(*disks, spec_, node_.config().block, node_.config().node.name, mirrored_);
        if (!bad.empty())
            return bad;
    }
    if (auto shared = msg.find("shared_disks"); shared != msg.end()) {
        auto bad = read_shared_disks(*shared, spec_, shared_);
        if (!bad.empty())
            return bad;
    }
    if (m_.method == "block" && mirrored_.empty())
        return "bad prepare: a block migration without disks";
    return check_arrival();
}

std::string TargetRun::check_arrival() const {
    auto& name = spec_.name;
    auto& node = node_.config().node.name;
    if (node_.has_vm(name))
        return fmt::format("a VM named {} already exists on {}", name, node);
    if (auto id = node_.arriving(name))
        return fmt::format("VM {} is already arriving on {} ({})", name, node, *id);
    if (auto why = node_.refuses_arrivals(); !why.empty())
        return why;
    // This node's own limit, checked and reserved (add_arriving) in one step.
    auto limit = node_.config().migration.parallel_inbound_migrations_per_node;
    if (static_cast<std::int64_t>(node_.arriving_count()) >= limit)
        return fmt::format("{} has {}/{} inbound migrations (parallel_inbound_migrations_per_node); try again when "
                           "one ends",
                           node, node_.arriving_count(), limit);
    if (spec_.kernel && !fs::is_regular_file(*spec_.kernel))
        return fmt::format("kernel {} does not exist on {}", *spec_.kernel, node);
    for (std::size_t i = 0; i < spec_.disks.size(); ++i) {
        auto& d = spec_.disks[i];
        bool copied = std::any_of(mirrored_.begin(), mirrored_.end(), [&](auto& m) { return m.index == i; });
        if (!copied && !fs::exists(d.path))
            return fmt::format("disk {} does not exist on {} (shared disks must be on shared storage)", d.path,
                               node);
    }
    return "";
}

asio::awaitable<json> TargetRun::prepare(const json& msg) {
    auto bad = check_prepare(msg);
    if (!bad.empty())
        co_return error_message(bad);
    node_.add_arriving(shared_from_this()); // reserve the name
    step_ = "checking the shared disks";
    auto different = co_await check_shared_disks();
    if (!different.empty()) {
        release();
        co_return error_message(different);
    }
    auto& name = spec_.name;
    auto dir = node_.vm_dir(name);
    std::error_code ec;
    // The source waits 120 s for the answer: the prepare hooks get 45 s of
    // it, and the launched hooks what is left of 100 s once QEMU listens.
    auto started = Clock::now();
    step_ = "running its prepare hooks";
    auto hooked = co_await hooks(HookPhase::Prepare, started + 45s);
    if (!hooked || finished_) {
        auto why = hooked ? std::string("the arrival was given up while its prepare hooks ran")
                          : hooked.error().message;
        if (!finished_) // not dropped already (the source left meanwhile)
            co_await drop(why);
        co_return error_message(why);
    }
    // On record once the prepare hooks ran, before QEMU starts and before
    // the first image is made: a restarted ferryd stops the QEMU, removes
    // what a crash left half-copied and runs the aborted hooks.
    m_.phase = Phase::Running;
    node_.add_migration(m_);
    node_.persist(m_);
    if (!mirrored_.empty()) {
        step_ = "creating the target images";
        auto images = co_await prepare_images();
        if (!images.empty()) {
            co_await drop(images);
            co_return error_message(images);
        }
    }
    fs::create_directories(dir, ec);
    Result<QemuInstance> q = make_error(Errc::internal, "not started");
    if (node_.config().node.launcher == "external") {
        // The source waits 120 s for the answer: the wait ends 85 s into the
        // arrival at the latest, leaving the launched hooks 15 s of their 100.
        auto wait = std::min<Clock::duration>(std::chrono::seconds(node_.config().node.external_launch_timeout),
                                              started + 85s - Clock::now());
        step_ = "waiting for the stack to start the destination QEMU (launcher = external)";
        q = co_await await_external(std::max(std::chrono::duration_cast<std::chrono::seconds>(wait), 1s));
    } else {
        LaunchRequest req{&node_.config().node, &spec_, dir, 1, true, true};
        step_ = "starting the destination QEMU";
        q = co_await launch_qemu(node_.executor(), req);
    }
    if (!q && finished_) // given up while waiting for the stack's QEMU: drop() said why
        co_return error_message(q.error().message);
    if (!q) {
        auto why = fmt::format("starting the destination QEMU: {}", q.error().message);
        co_await drop(why);
        co_return error_message(why);
    }
    qemu_ = std::move(*q);
    if (auto* record = node_.migration(m_.id)) {
        // A restarted ferryd stops this QEMU too.
        record->target_pid = qemu_.pid;
        record->target_dir = qemu_.run_dir;
        node_.persist(*record);
    }
    if (!mirrored_.empty()) {
        // Nothing else notices it while only disks move: cut the disk
        // stream at once, so the source fails its round and names why.
        std::weak_ptr<TargetRun> weak = shared_from_this();
        qemu_.qmp->on_close([weak](const Error& e) {
            auto run = weak.lock();
            if (!run || run->finished_)
                return;
            asio::co_spawn(run->node_.executor(), lost_qemu(run, e.message), asio::detached);
        });
    }
    step_ = "setting up the destination QEMU";
    auto listening = co_await listen();
    if (!listening) {
        co_await drop(listening.error().message);
        co_return error_message(fmt::format("preparing the destination QEMU: {}", listening.error().message));
    }
    auto exported = co_await export_disks();
    if (!exported.empty()) {
        co_await drop(exported);
        co_return error_message(exported);
    }
    step_ = "running its launched hooks";
    hooked = co_await hooks(HookPhase::Launched, started + 100s);
    if (!hooked) {
        co_await drop(hooked.error().message);
        co_return error_message(hooked.error().message);
    }
    if (finished_) // given up meanwhile (its QEMU exited, the source left): drop() said why
        co_return error_message("the arrival was given up while its launched hooks ran");
    // Our own record of the arrival: visible here, and cleaned up by a
    // restarted ferryd if we die before the hand-off.
    m_.phase = Phase::Running;
    m_.target_pid = qemu_.pid;
    m_.target_dir = qemu_.run_dir;
    m_.created_images = created_;
    node_.add_migration(m_);
    node_.persist(m_);
    json tokens = issue_tokens(channels_);
    prepared_ = true;
    step_ = "receiving the migration";
    node_.publish("phase", name, m_.id, {{"phase", "Running"}, {"role", "target"}, {"mode", m_.mode}});
    engine_log()->info("migration {}: receiving {} from {}", m_.id, name, source_node_);
    json ready{{"type", "target_ready"}, {"tokens", tokens}, {"preempt", preempt_enabled(m_.config)}};
    if (!mirrored_.empty())
        ready["disk_token"] = node_.tokens()->issue(m_.id, disk_channel_index);
    co_return ready;
}

asio::awaitable<Result<QemuInstance>> TargetRun::await_external(std::chrono::seconds wait) {
    auto& node = node_.config().node;
    auto deadline = Clock::now() + wait;
    // What ferry would have run: the stack may start exactly this, or its
    // own equivalent (same machine, devices, memory; -incoming defer; -S).
    auto prepared = prepare_launch({&node, &spec_, node_.vm_dir(spec_.name), 1, true, true});
    if (!prepared)
        co_return prepared.error();
    auto& q = prepared->qemu;
    auto& argv = prepared->argv;
    auto wait_s = wait.count();
    awaiting_launch_ = true;
    node_.publish("launch", spec_.name, m_.id,
                  {{"argv", argv},
                   {"run_dir", q.run_dir},
                   {"qmp_socket", q.qmp_socket},
                   {"console_file", q.console_file},
                   {"log", q.log_path()},
                   {"timeout_s", wait_s}});
    engine_log()->info("migration {}: waiting up to {} s for the stack to start {}'s destination QEMU "
                       "(launcher = external)",
                       m_.id, wait_s, spec_.name);
    while (!launched_ && !finished_ && Clock::now() < deadline) {
        launch_wait_.expires_at(deadline);
        co_await launch_wait_.async_wait(nothrow);
    }
    // One being checked now finishes first (or is refused).
    while (registering_ && !finished_) {
        launch_wait_.expires_after(50ms);
        co_await launch_wait_.async_wait(nothrow);
    }
    awaiting_launch_ = false;
    if (finished_) {
        if (launched_)
            co_await destroy_qemu(node_.executor(), *launched_);
        co_return make_error(Errc::aborted, "the arrival was given up while waiting for the stack's QEMU");
    }
    if (!launched_)
        co_return make_error(Errc::timeout,
                             fmt::format("no QEMU registered for {} on {} within {} s (launcher = external: start "
                                         "QEMU with the argv of the launch event and register it with ferryctl "
                                         "migration register-target)",
                                         spec_.name, node.name, wait_s));
    auto out = std::move(*launched_);
    launched_.reset();
    co_return out;
}

asio::awaitable<Result<json>> TargetRun::register_external(std::string qmp_socket, int pid, std::vector<NamedFd> fds) {
    auto self = shared_from_this(); // alive across the QMP round trips
    if (!awaiting_launch_ || launched_ || registering_ || finished_)
        co_return make_error(Errc::conflict,
                             fmt::format("the arrival of {} ({}) does not wait for a QEMU{}", spec_.name, m_.id,
                                         launched_ || registering_ ? ": one registered already" : ""));
    registering_ = true;
    struct Done {
        TargetRun* run;
        ~Done() {
            run->registering_ = false;
            run->launch_wait_.cancel();
        }
    } done{this};
    auto c = co_await qmp::Client::connect(node_.executor(), qmp_socket, 5s);
    if (!c)
        co_return c.error().wrap(fmt::format("registering the QEMU for {}", spec_.name));
    auto qmp = *c;
    auto refuse = [&](std::string why) {
        qmp->close(); // QEMU serves one QMP client: let the stack's next attempt in
        return make_error(Errc::invalid_argument, fmt::format("the QEMU at {} cannot receive {}: {}", qmp_socket,
                                                              spec_.name, why));
    };
    if (pid > 0 && qmp->peer_pid() != pid)
        co_return refuse(fmt::format("pid {} was given, but the process on that socket is {}", pid, qmp->peer_pid()));
    auto status = co_await qmp->execute("query-status");
    if (!status)
        co_return refuse(status.error().message);
    if (status->value("status", "") != "inmigrate")
        co_return refuse(fmt::format("its state is {}, not inmigrate (start it with -incoming defer)",
                                     status->value("status", "?")));
    auto fits = co_await check_adopted(*qmp, spec_, resolve_accel(node_.config().node.accel, kvm_usable()));
    if (!fits)
        co_return refuse(fits.error().message);
    json fdsets = json::array();
    for (auto& f : fds) {
        json args{{"opaque", f.name}};
        auto added = co_await qmp->execute_with_fd("add-fd", args, f.fd.get());
        if (!added)
            co_return refuse(fmt::format("add-fd {}: {}", f.name, added.error().message));
        fdsets.push_back({{"name", f.name}, {"fdset_id", added->value("fdset-id", -1)}, {"fd", added->value("fd", -1)}});
    }
    if (finished_)
        co_return refuse("the arrival was given up meanwhile");
    QemuInstance q;
    q.generation = 1;
    q.run_dir = node_.vm_dir(spec_.name) + "/r1";
    q.qmp_socket = qmp_socket;
    q.console_file = q.run_dir + "/console.out";
    q.pid = qmp->peer_pid();
    q.qmp = qmp;
    // Its serial console, when it writes ferry's console file: the guest's
    // heartbeat (blackout) and console log.
    if (fs::exists(q.console_file)) {
        q.console = std::make_shared<ConsoleCapture>(node_.executor(), q.console_file,
                                                     node_.vm_dir(spec_.name) + "/console.log", "r1",
                                                     ConsoleLimits{node_.config().node.console_log_max});
        q.console->start();
    }
    engine_log()->info("migration {}: the stack's QEMU pid {} at {} receives {}{}", m_.id, q.pid, qmp_socket,
                       spec_.name, fds.empty() ? "" : fmt::format(" ({} descriptors added)", fds.size()));
    launched_ = std::move(q);
    co_return ok(json{{"vm", spec_.name}, {"migration", m_.id}, {"pid", launched_->pid}, {"fdsets", fdsets}});
}

// The source's capabilities and multifd channels, then migrate-incoming.
asio::awaitable<Result<json>> TargetRun::listen() {
    json caps_args{{"capabilities", migration_capabilities(m_.config.multifd_channels > 0, postcopy_enabled(m_.config),
                                                           preempt_enabled(m_.config))}};
    auto caps = co_await qemu_.qmp->execute("migrate-set-capabilities", caps_args);
    Result<json> set = ok(json::object());
    if (caps && m_.config.multifd_channels > 0) {
        json params{{"multifd-channels", m_.config.multifd_channels}};
        set = co_await qemu_.qmp->execute("migrate-set-parameters", params);
    }
    listen_socket_ = qemu_.migrate_socket();
    json incoming_args{{"uri", "unix:" + listen_socket_}};
    // No co_await inside a conditional expression: GCC 12 miscompiles it.
    Result<json> listening = caps ? (set ? ok(json::object()) : Result<json>(set.error())) : Result<json>(caps.error());
    if (listening)
        listening = co_await qemu_.qmp->execute("migrate-incoming", incoming_args);
    co_return listening;
}

json TargetRun::issue_tokens(int count) {
    json tokens = json::array();
    for (int i = 0; i < count; ++i)
        tokens.push_back(node_.tokens()->issue(m_.id, i));
    return tokens;
}

std::string TargetRun::failure() const {
    if (!dropped_why_.empty())
        return dropped_why_;
    if (disks_done_ && !*disks_done_)
        return fmt::format("receiving the disks: {}", disks_done_->error().message);
    return "";
}

std::string TargetRun::qemu_state() const {
    return qemu_.qmp && qemu_.qmp->connected() && process_alive(qemu_.pid)
               ? "running"
               : fmt::format("exited: {}", log_tail(qemu_.log_path()));
}

asio::awaitable<void> TargetRun::deliver(std::shared_ptr<TargetRun> run, int index,
                                         std::shared_ptr<transport::Channel> channel) {
    if (index == disk_channel_index) {
        co_await receive_disks(std::move(run), std::move(channel));
        co_return;
    }
    // QEMU tells its channels apart partly by accept order: connect them to
    // the destination in the order the source QEMU opened them.
    auto deadline = Clock::now() + 30s;
    while (run->next_index_ != index && Clock::now() < deadline && !run->finished_) {
        run->order_.expires_after(5ms);
        co_await run->order_.async_wait(nothrow);
    }
    asio::local::stream_protocol::socket qemu(transport::data_plane());
    auto [ec] = co_await qemu.async_connect(asio::local::stream_protocol::endpoint(run->listen_socket_), nothrow);
    run->next_index_ = std::max(run->next_index_, index + 1);
    if (ec) {
        engine_log()->warn("migration {}: data channel {}: destination QEMU: {}", run->m_.id, index, ec.message());
        channel->close();
        co_return;
    }
    auto r = co_await tunnel_on_data_plane(std::move(qemu), channel, nullptr);
    if (!r)
        engine_log()->debug("migration {}: data channel {} ended: {}", run->m_.id, index, r.error().message);
}

// The stream is complete on the source; waits until QEMU has loaded it.
// Returns "" or the error to answer.
asio::awaitable<std::string> TargetRun::wait_loaded() {
    auto deadline = Clock::now() + 60s;
    std::string status;
    for (;;) {
        auto s = co_await qemu_.qmp->execute("query-status");
        status = s ? (*s).value("status", "") : s.error().message;
        if (status == "paused" || status == "postmigrate" || status == "running")
            co_return std::string();
        if (!s || Clock::now() > deadline)
            co_return fmt::format("the destination did not load the VM (state {}): {}", status,
                                  log_tail(qemu_.log_path()));
        co_await sleep_for(5ms);
    }
}

// The VM is this node's from now on.
std::shared_ptr<Vm> TargetRun::take_in(bool resume) {
    auto vm = std::make_shared<Vm>();
    vm->record.name = spec_.name;
    vm->record.node = node_.config().node.name;
    vm->record.spec = spec_;
    vm->record.created_at = now_string();
    vm->qemu = std::move(qemu_);
    vm->record.pid = vm->qemu.pid;
    vm->record.generation = vm->qemu.generation;
    vm->record.run_dir = vm->qemu.run_dir;
    vm->record.qmp_socket = vm->qemu.qmp_socket;
    vm->status = resume ? "running" : "paused";
    node_.add_vm(vm);
    finished_ = true;
    node_.remove_arriving(m_.id);
    node_.tokens()->revoke(m_.id);
    return vm;
}

asio::awaitable<json> TargetRun::finish(const json& msg) {
    finishing_ = true;
    auto reply = co_await finish_steps(msg);
    finishing_ = false;
    co_return reply;
}

asio::awaitable<json> TargetRun::finish_steps(const json& msg) {
    auto answer_by = Clock::now() + 50s; // the source waits 60 s for the answer
    auto not_loaded = co_await wait_loaded();
    if (!not_loaded.empty())
        co_return error_message(not_loaded);
    auto disks = co_await wait_disks();
    if (!disks.empty())
        co_return error_message(disks);
    // A VM that was paused on the source stays paused here.
    bool resume = msg.value("resume", true);
    if (resume) {
        auto cont = co_await qemu_.qmp->execute("cont");
        if (!cont)
            co_return error_message(fmt::format("resuming the destination: {}", cont.error().message));
    }
    auto vm = take_in(resume);
    json reply{{"type", "finished"}, {"guest_blackout_ms", nullptr}};
    if (resume)
        reply["guest_blackout_ms"] = co_await measure_blackout(msg, *vm);
    if (resume && m_.mode != "postcopy") // post-copy announced when the guest started here
        co_await announce(*vm->qemu.qmp);
    qemu_pid_for_hooks_ = vm->qemu.pid;
    co_await hooks(HookPhase::Activated, std::max(answer_by, Clock::now() + 1s));
    reply["warnings"] = m_.warnings;
    if (auto* record = node_.migration(m_.id)) {
        record->phase = Phase::Succeeded;
        record->ended_at = now_string();
        record->target_pid = -1;
        record->target_dir.clear();
        if (!reply["guest_blackout_ms"].is_null())
            record->result.guest_blackout_ms = reply["guest_blackout_ms"].get<std::int64_t>();
        record->result.total_time_ms = msg.value("total_time_ms", std::int64_t{0});
        record->result.downtime_ms = msg.value("downtime_ms", std::int64_t{0});
        record->warnings = m_.warnings;
        node_.persist(*record);
    }
    engine_log()->info("migration {}: {} arrived from {} and runs here", m_.id, spec_.name, source_node_);
    node_.publish("phase", spec_.name, m_.id, {{"phase", "Succeeded"}, {"role", "target"}, {"mode", m_.mode}});
    co_return reply;
}

// The guest's blackout from the source's last heartbeat (in "finish") to
// the first here; null when unknown.
asio::awaitable<json> TargetRun::measure_blackout(const json& msg, const Vm& vm) {
    json blackout = nullptr;
    if (!vm.qemu.console) // a stack's QEMU without ferry's console socket: no heartbeat to read
        co_return blackout;
    auto hb = msg.find("last_heartbeat");
    // Numbers from the peer, bounded before they size a wait.
    auto number = [&](const char* key, std::uint64_t max) {
        return hb->is_object() && hb->contains(key) && (*hb)[key].is_number_unsigned() &&
               (*hb)[key].get<std::uint64_t>() <= max;
    };
    if (hb == msg.end() || !number("host_ms", std::uint64_t{1} << 62) || !number("seq", std::uint64_t{1} << 62) ||
        !number("interval_ms", 10'000))
        co_return blackout;
    std::vector<Heartbeat> src{{(*hb)["host_ms"].get<std::int64_t>(), (*hb)["seq"].get<std::uint64_t>(),
                                (*hb)["interval_ms"].get<std::uint32_t>()}};
    auto until = Clock::now() + 3 * std::chrono::milliseconds(src[0].interval_ms) + 2s;
    while (Clock::now() < until) {
        if (auto b = guest_blackout_ms(src, vm.qemu.console->heartbeat_list())) {
            blackout = *b;
            break;
        }
        co_await sleep_for(10ms);
    }
    co_return blackout;
}

asio::awaitable<json> TargetRun::start() {
    // Post-copy: the source has stopped and sent the device state; the VM
    // runs here from now on and pulls missing pages from the source. (cont
    // before QEMU has loaded the device state just marks it to start then.)
    // A block migration's disks came whole first (the source's last round
    // ran before it let QEMU switch over), and their exports go.
    auto disks = co_await wait_disks();
    if (!disks.empty())
        co_return error_message(disks);
    m_.mode = "postcopy"; // from now on a lost control channel does not drop it
    if (auto* record = node_.migration(m_.id)) {
        record->mode = "postcopy";
        node_.persist(*record);
    }
    auto cont = co_await qemu_.qmp->execute("cont");
    if (!cont)
        co_return error_message(fmt::format("starting the VM in post-copy: {}", cont.error().message));
    engine_log()->info("migration {}: {} runs here in post-copy", m_.id, spec_.name);
    co_await announce(*qemu_.qmp);
    json reply{{"type", "started"}};
    co_return reply;
}

asio::awaitable<json> TargetRun::recover() {
    if (!qemu_.qmp || !qemu_.qmp->connected() || !process_alive(qemu_.pid))
        co_return error_message(fmt::format("{}: {}", destination_gone, log_tail(qemu_.log_path())));
    // QEMU notices the broken stream on its own; give it a moment.
    std::function<bool(const std::string&)> paused = [](const std::string& s) { return s == "postcopy-paused"; };
    auto status = co_await wait_migration_status(*qemu_.qmp, paused);
    if (status != "postcopy-paused")
        co_return error_message(
            fmt::format("cannot recover: the destination's migration is '{}', not postcopy-paused", status));
    ++recoveries_;
    listen_socket_ = fmt::format("{}/migrate-r{}.sock", qemu_.run_dir, recoveries_);
    std::error_code ec;
    fs::remove(listen_socket_, ec);
    json args{{"uri", "unix:" + listen_socket_}};
    auto listening = co_await qemu_.qmp->execute("migrate-recover", args);
    if (!listening)
        co_return error_message(fmt::format("migrate-recover: {}", listening.error().message));
    node_.tokens()->revoke(m_.id);
    next_index_ = 0;
    json tokens = issue_tokens(migration_channels(m_.config)); // the main channel, and preempt's
    engine_log()->info("migration {}: post-copy recovery {}: listening again", m_.id, recoveries_);
    json reply{{"type", "recovering"}, {"tokens", tokens}};
    co_return reply;
}

asio::awaitable<void> TargetRun::drop(std::string why) {
    engine_log()->warn("migration {}: dropping the incoming {}: {}", m_.id, spec_.name, why);
    finished_ = true;
    dropped_why_ = why;
    launch_wait_.cancel(); // an await_external gives up
    node_.publish("phase", spec_.name, m_.id,
                  {{"phase", "Failed"}, {"role", "target"}, {"mode", m_.mode}, {"failure_reason", why}});
    if (auto* tokens = node_.tokens())
        tokens->revoke(m_.id);
    if (auto* record = node_.migration(m_.id)) {
        record->phase = Phase::Failed;
        record->failure_reason = why;
        record->ended_at = now_string();
        record->target_pid = -1;
        record->target_dir.clear();
        node_.persist(*record);
    }
    if (receiver_)
        receiver_->close();
    co_await destroy_qemu(node_.executor(), qemu_);
    // The receiver writes nothing more once its stream is cut.
    while (receiver_ && !disks_done_)
        co_await sleep_for(5ms);
    remove_created_images();
    if (auto* record = node_.migration(m_.id); record && !record->created_images.empty()) {
        record->created_images.clear();
        node_.persist(*record);
    }
    // The aborted hooks run after the source has its answer; the VM's name
    // stays reserved here until they and the cleanup are done, so a retry
    // cannot start under them.
    if (hooks_started_)
        asio::co_spawn(node_.executor(), release_after_hooks(shared_from_this()), asio::detached);
    else
        release();
}

void TargetRun::release() {
    node_.remove_arriving(m_.id);
    if (!node_.has_vm(spec_.name)) {
        std::error_code ec;
        fs::remove_all(node_.vm_dir(spec_.name), ec);
    }
}

asio::awaitable<void> TargetRun::release_after_hooks(std::shared_ptr<TargetRun> run) {
    co_await run->hooks(HookPhase::Aborted, Clock::now() + 60s);
    run->release();
}

asio::awaitable<Result<void>> TargetRun::hooks(HookPhase phase, Clock::time_point deadline) {
    if (phase == HookPhase::Prepare)
        hooks_started_ = !hooks_config_.dir.empty();
    else if (!hooks_started_)
        co_return Result<void>{}; // nothing ran here that an aborted hook would undo
    if (phase == HookPhase::Aborted)
        hooks_started_ = false; // once, however many ways the arrival is given up
    auto& config = node_.config();
    int pid = phase == HookPhase::Launched ? qemu_.pid : phase == HookPhase::Activated ? qemu_pid_for_hooks_ : -1;
    HookCall call{phase, "target", &m_, &spec_, config.node.name, pid};
    auto warned = co_await run_phase_hooks(node_, hooks_config_, call, deadline, m_.warnings);
    if (!warned)
        co_return warned.error();
    if (*warned) {
        if (auto* record = node_.migration(m_.id)) {
            record->warnings = m_.warnings;
            node_.persist(*record);
        }
    }
    co_return Result<void>{};
}

asio::awaitable<void> TargetRun::announce(qmp::Client& qmp) {
    if (!hooks_config_.announce_self)
        co_return;
    auto done = co_await announce_self(qmp);
    if (!done) {
        auto why = fmt::format("announce-self on {}: {}", node_.config().node.name, done.error().message);
        engine_log()->warn("migration {}: {}", m_.id, why);
        m_.warnings.push_back(why);
    }
}

asio::awaitable<void> TargetRun::lost_qemu(std::shared_ptr<TargetRun> run, std::string why) {
    if (run->finished_)
        co_return;
    co_await run->drop(fmt::format("the destination QEMU exited ({}): {}", why, log_tail(run->qemu_.log_path())));
}

asio::awaitable<std::string> TargetRun::check_shared_disks() {
    for (auto& s : shared_) {
        std::string path = spec_.disks[s.index].path;
        std::function<Result<block::ImageInfo>()> inspect = [path] { return block::inspect_image(path); };
        auto info = co_await block::offload(std::move(inspect));
        if (!info)
            co_return fmt::format("shared disks[{}]: {}", s.index, info.error().message);
        if (info->format != s.format || info->virtual_size != s.size)
            co_return fmt::format("shared disks[{}] {} is {} of {} bytes on {} but {} of {} bytes on {}: a shared disk "
                                  "must be the same image on both nodes",
                                  s.index, path, info->format, info->virtual_size, node_.config().node.name,
                                  s.format, s.size, source_node_);
    }
    co_return std::string();
}

asio::awaitable<std::string> TargetRun::prepare_images() {
    auto& block = node_.config().block;
    block::TargetImageRules rules{block.create_command, block.reuse_existing};
    for (auto& d : mirrored_) {
        std::string path = d.path, format = d.format;
        auto size = d.size;
        // A disk of a VM this node keeps is never a target, whatever the options.
        if (auto owner = node_.vm_using_disk(path))
            co_return fmt::format("disks[{}]: target image {} is a disk of VM {} on {}; map the disk elsewhere "
                                  "with [[block.path_map]]",
                                  d.index, path, *owner, node_.config().node.name);
        std::function<Result<block::PreparedImage>()> make = [=] {
            return block::prepare_target_image(path, format, size, rules);
        };
        auto made = co_await block::offload(std::move(make));
        if (!made)
            co_return fmt::format("disks[{}]: {}", d.index, made.error().message);
        if (made->created) {
            created_.push_back(path);
            if (auto* record = node_.migration(m_.id)) {
                record->created_images = created_;
                node_.persist(*record);
            }
        }
        spec_.disks[d.index].path = path;
    }
    co_return std::string();
}

void TargetRun::remove_created_images() {
    for (auto& path : created_)
        if (block::remove_created_image(path))
            engine_log()->info("migration {}: removed target image {}", m_.id, path);
    created_.clear();
}

// qcow2 targets are written through the destination QEMU (raw ones directly).
asio::awaitable<std::string> TargetRun::export_disks() {
    nbd_targets_.assign(mirrored_.size(), std::nullopt);
    bool any = std::any_of(mirrored_.begin(), mirrored_.end(), [](auto& d) { return d.format != "raw"; });
    if (!any)
        co_return std::string();
    block::QemuBlock qemu(qemu_.qmp);
    auto socket = qemu_.run_dir + "/mirror.sock";
    auto server = co_await qemu.start_nbd(socket);
    if (!server)
        co_return fmt::format("the destination QEMU's NBD server: {}", server.error().message);
    for (std::size_t i = 0; i < mirrored_.size(); ++i) {
        auto& d = mirrored_[i];
        if (d.format == "raw")
            continue;
        auto node = co_await qemu.format_node(d.path);
        if (!node)
            co_return fmt::format("disks[{}]: {}", d.index, node.error().message);
        auto name = fmt::format("ferry-{}-d{}", m_.id, d.index);
        std::vector<std::string> no_bitmaps;
        auto added = co_await qemu.add_export(name, *node, true, no_bitmaps);
        if (!added)
            co_return fmt::format("disks[{}]: exporting it for writing: {}", d.index, added.error().message);
        nbd_targets_[i] = NbdTarget{socket, name};
    }
    co_return std::string();
}

asio::awaitable<void> TargetRun::receive_disks(std::shared_ptr<TargetRun> run, std::shared_ptr<transport::Channel> channel) {
    bool again = run->disk_channel_taken_;
    if (run->mirrored_.empty() || run->finished_ || (again && (!run->receiver_ || run->disks_done_))) {
        channel->close();
        co_return;
    }
    run->disk_channel_taken_ = true;
    DiskStream mine(run->node_.executor()), theirs(transport::data_plane());
    boost::system::error_code ec;
    asio::local::connect_pair(mine, theirs, ec);
    if (ec) {
        engine_log()->warn("migration {}: disk stream: {}", run->m_.id, ec.message());
        channel->close();
        if (!again)
            run->disks_done_ = make_error(Errc::io, fmt::format("disk stream: {}", ec.message()));
        co_return;
    }
    auto tunnel = tunnel_on_data_plane(std::move(theirs), channel, nullptr);
    asio::co_spawn(run->node_.executor(), std::move(tunnel), asio::detached);
    if (again) {
        // The source dialled again after the link broke (disk_resume).
        engine_log()->info("migration {}: disk channel from {} re-established", run->m_.id, run->source_node_);
        run->receiver_->replace_stream(std::move(mine));
        co_return;
    }
    run->receiver_ = std::make_unique<DiskReceiver>(run->mirrored_, run->nbd_targets_, std::move(mine));
    run->receiver_->allow_resume(peer_timeout(run->m_.config));
    run->receiver_->set_label("migration " + run->m_.id);
    auto r = co_await run->receiver_->run();
    if (!r)
        engine_log()->warn("migration {}: {}", run->m_.id, r.error().message);
    else
        engine_log()->info("migration {}: disks received ({} rounds)", run->m_.id, run->receiver_->rounds());
    run->disks_done_ = std::move(r);
}

json TargetRun::resume_disks() {
    if (finished_) {
        auto* record = node_.migration(m_.id);
        auto why = record && record->failure_reason ? *record->failure_reason : std::string("it ended");
        return error_message(fmt::format("migration {} was given up on {}: {}", m_.id, node_.config().node.name, why));
    }
    if (!disks_only())
        return error_message(fmt::format("migration {} has no disk stream to resume on {}", m_.id,
                                         node_.config().node.name));
    return {{"type", "disk_resuming"}, {"disk_token", node_.tokens()->issue(m_.id, disk_channel_index)}};
}

bool TargetRun::disks_only() const {
    return !mirrored_.empty() && receiver_ && !disks_done_ && next_index_ == 0 && m_.mode != "postcopy";
}

void TargetRun::set_control(const void* channel) {
    control_ = channel;
    ++control_epoch_;
}

asio::awaitable<void> TargetRun::control_lost(const void* channel, std::string why) {
    if (finished_ || channel != control_)
        co_return; // over, or a newer channel took its place
    control_ = nullptr;
    if (!disks_only()) {
        co_await drop(std::move(why));
        co_return;
    }
    engine_log()->warn("migration {}: {}; keeping the arrival {} s for the source to come back", m_.id, why,
                       m_.config.peer_timeout);
    asio::co_spawn(node_.executor(), await_control(shared_from_this(), ++control_epoch_, std::move(why)),
                   asio::detached);
}

asio::awaitable<void> TargetRun::await_control(std::shared_ptr<TargetRun> run, std::uint64_t epoch, std::string why) {
    co_await sleep_for(peer_timeout(run->m_.config));
    if (run->control_epoch_ == epoch && !run->finished_)
        co_await run->drop(fmt::format("{}; the source did not come back within {} s", why,
                                       run->m_.config.peer_timeout));
}

// Block migrations: the source ended the disk stream after its last round;
// the writable exports go before the guest runs here.
asio::awaitable<std::string> TargetRun::wait_disks() {
    if (mirrored_.empty())
        co_return std::string();
    auto deadline = Clock::now() + 60s;
    while (!disks_done_ && Clock::now() < deadline)
        co_await sleep_for(5ms);
    if (!disks_done_)
        co_return std::string("the disk stream did not end");
    if (!*disks_done_)
        co_return fmt::format("the disks did not arrive whole: {}", disks_done_->error().message);
    block::QemuBlock qemu(qemu_.qmp);
    auto swept = co_await qemu.sweep("ferry-", true);
    if (!swept)
        co_return fmt::format("removing the disk exports: {}", swept.error().message);
    co_return std::string();
}

} // namespace ferry::engine
