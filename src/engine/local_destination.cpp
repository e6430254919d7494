// A same-node migration's destination: a second QEMU of the VM on this node.
#include "engine/local_destination.hpp"

#include "engine/async.hpp"
#include "engine/hooks.hpp"
#include "engine/process.hpp"
#include "engine/source_run.hpp"

#include <fmt/format.h>

namespace ferry::engine {

namespace asio = boost::asio;
using namespace std::chrono_literals;

asio::awaitable<Result<void>> LocalDestination::prepare() {
    auto& node = run_.node();
    auto& m = run_.migration();
    auto& vm = run_.vm();
    auto hooked = co_await hooks(HookPhase::Prepare);
    if (!hooked)
        co_return hooked;
    LaunchRequest req{&node.config().node, &*vm.record.spec, node.vm_dir(vm.record.name), vm.record.generation + 1,
                      true};
    auto q = co_await launch_qemu(node.executor(), req);
    if (!q)
        co_return q.error().wrap("preparing the destination");
    target_ = std::move(*q);
    m.target_pid = target_.pid;
    m.target_dir = target_.run_dir;
    node.persist(m); // a restarted ferryd stops it and runs the target's aborted hooks
    std::weak_ptr<SourceRun> weak = run_.weak_from_this();
    target_.qmp->on_close([weak](const Error&) {
        if (auto s = weak.lock())
            s->wake_up();
    });
    json caps_args{{"capabilities", migration_capabilities(false, postcopy_enabled(m.config), preempt_enabled(m.config))}};
    auto caps = co_await target_.qmp->execute("migrate-set-capabilities", caps_args);
    if (!caps)
        co_return caps.error().wrap("preparing the destination");
    json incoming_args{{"uri", "unix:" + target_.migrate_socket()}};
    auto incoming = co_await target_.qmp->execute("migrate-incoming", incoming_args);
    if (!incoming)
        co_return incoming.error().wrap("preparing the destination");
    co_return co_await hooks(HookPhase::Launched);
}

asio::awaitable<Result<void>> LocalDestination::hooks(HookPhase phase) {
    if (phase == HookPhase::Prepare)
        hooks_started_ = !run_.hooks_config().dir.empty();
    else if (!hooks_started_)
        co_return Result<void>{};
    if (phase == HookPhase::Aborted)
        hooks_started_ = false; // once
    auto& node = run_.node();
    auto& m = run_.migration();
    auto& vm = run_.vm();
    int pid = phase == HookPhase::Launched ? target_.pid : phase == HookPhase::Activated ? vm.qemu.pid : -1;
    HookCall call{phase, "target", &m, &*vm.record.spec, node.config().node.name, pid};
    auto warned = co_await run_phase_hooks(node, run_.hooks_config(), call, Clock::now() + std::chrono::hours(1),
                                           m.warnings);
    if (!warned)
        co_return warned.error();
    if (*warned)
        node.persist(m);
    co_return Result<void>{};
}

Result<Destination::Stream> LocalDestination::open_stream() {
    auto bw = run_.migration().config.bandwidth_per_migration;
    // Same node: QEMU shapes. Post-copy has a limit of its own (unlimited
    // unless set), and the cap holds there too.
    json params{{"max-bandwidth", bw == 0 ? unlimited_bandwidth : bw}, {"max-postcopy-bandwidth", bw}};
    return Stream{params, "unix:" + target_.migrate_socket()};
}

std::optional<Error> LocalDestination::lost() const {
    if (target_.qmp->connected() && process_alive(target_.pid))
        return std::nullopt;
    return make_error(Errc::disconnected, fmt::format("the destination QEMU exited: {}", log_tail(target_.log_path())));
}

asio::awaitable<Result<void>> LocalDestination::check() {
    if (auto gone = lost())
        co_return *gone;
    co_return Result<void>{};
}

asio::awaitable<Result<void>> LocalDestination::follow_postcopy(const std::string& status) {
    if (status == "postcopy-paused")
        co_return make_error(Errc::qemu, "post-copy paused on a same-node migration (QEMU lost its socket)");
    co_return Result<void>{};
}

asio::awaitable<Result<void>> LocalDestination::wait_resumed() {
    // The destination resumes the guest by itself once the stream is complete;
    // a guest that was paused on the source stays paused there.
    auto deadline = Clock::now() + 30s;
    for (;;) {
        auto status = co_await target_.qmp->execute("query-status");
        if (status && (*status).value("running", false))
            co_return Result<void>{};
        if (status && !run_.source_was_running() && (*status).value("status", "") == "paused")
            co_return Result<void>{};
        if (!target_.qmp->connected() || Clock::now() > deadline)
            co_return make_error(Errc::io, fmt::format("the destination did not resume the VM ({}): {}",
                                                       status ? (*status).value("status", "?") : status.error().message,
                                                       log_tail(target_.log_path())));
        co_await sleep_for(10ms);
    }
}

// The destination QEMU becomes the VM's; the source QEMU only goes once the
// destination runs.
asio::awaitable<Result<void>> LocalDestination::hand_off() {
    auto& vm = run_.vm();
    QemuInstance old = std::move(vm.qemu);
    old.qmp->unsubscribe(run_.source_subscription());
    auto source_beats = old.console ? old.console->heartbeat_list() : std::vector<Heartbeat>{};
    vm.qemu = std::move(target_);
    target_ = QemuInstance{};
    vm.record.pid = vm.qemu.pid;
    vm.record.generation = vm.qemu.generation;
    vm.record.run_dir = vm.qemu.run_dir;
    vm.record.qmp_socket = vm.qemu.qmp_socket;
    vm.record.adopted = false; // ferry started the new QEMU, so it owns it
    vm.status = run_.source_was_running() ? "running" : "paused";
    run_.node().attach(run_.vm_ptr());
    run_.node().persist(vm);
    co_await destroy_qemu(run_.node().executor(), old);

    auto& m = run_.migration();
    m.result.total_time_ms = run_.last_info().value("total-time", std::int64_t{0});
    m.result.downtime_ms = run_.last_info().value("downtime", std::int64_t{0});
    if (!source_beats.empty())
        co_await measure_blackout(source_beats);
    if (run_.hooks_config().announce_self && run_.source_was_running()) {
        auto announced = co_await announce_self(*vm.qemu.qmp);
        if (!announced)
            m.warnings.push_back(fmt::format("announce-self: {}", announced.error().message));
    }
    co_await hooks(HookPhase::Activated);
    co_return Result<void>{};
}

// Waits for the destination's first heartbeat (a few intervals at most).
asio::awaitable<void> LocalDestination::measure_blackout(const std::vector<Heartbeat>& source_beats) {
    auto& vm = run_.vm();
    auto interval = std::chrono::milliseconds(source_beats.back().interval_ms);
    auto deadline = Clock::now() + 3 * interval + 2s;
    while (Clock::now() < deadline) {
        auto blackout = guest_blackout_ms(source_beats, vm.qemu.console->heartbeat_list());
        if (blackout) {
            run_.migration().result.guest_blackout_ms = *blackout;
            break;
        }
        co_await sleep_for(10ms);
    }
}

void LocalDestination::log_success() const {
    auto& m = run_.migration();
    engine_log()->info("migration {}: total {} ms, downtime {} ms, guest blackout {}", m.id, *m.result.total_time_ms,
                       *m.result.downtime_ms,
                       m.result.guest_blackout_ms ? fmt::format("{} ms", *m.result.guest_blackout_ms)
                                                  : std::string("unknown"));
}

asio::awaitable<void> LocalDestination::release(bool) { co_return; }

asio::awaitable<void> LocalDestination::discard() {
    auto& m = run_.migration();
    if (m.mode == "postcopy") {
        // The guest ran on the destination: a destination still alive keeps the VM.
        if (target_.pid > 0 && process_alive(target_.pid))
            engine_log()->error("migration {}: post-copy failed; the destination QEMU (pid {}) is kept for an "
                                "operator, the source stays paused",
                                m.id, target_.pid);
    } else if (target_.pid > 0 || target_.qmp) {
        co_await destroy_qemu(run_.node().executor(), target_);
    }
    target_ = QemuInstance{};
    co_await hooks(HookPhase::Aborted);
}

} // namespace ferry::engine
