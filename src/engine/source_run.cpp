// An outgoing migration, one coroutine per phase: prepare the target, start
// the source, watch (and converge), switch over, hand off; or fail.
#include "engine/source_run.hpp"

#include "engine/async.hpp"
#include "engine/hooks.hpp"
#include "engine/local_destination.hpp"
#include "engine/peer_destination.hpp"

#include <fmt/format.h>

namespace ferry::engine {

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

constexpr auto poll_interval = 500ms;

// Takes QEMU's figures (parsed once per poll); ferry's own (the model's
// rates and verdict, the downtime limit, the throttle) stay until converge()
// renews them from the same figures.
void update_progress(Progress& p, const Progress& qemu) {
    auto kept = p;
    p = qemu;
    p.iteration = std::max(kept.iteration, p.iteration);
    p.throttle_percent = kept.throttle_percent;
    p.downtime_limit_ms = kept.downtime_limit_ms;
    p.converging = kept.converging;
    p.time_left_ms = kept.time_left_ms;
    p.disks = kept.disks;
    p.peer_silent_ms = kept.peer_silent_ms;
    if (kept.dirty_rate_bps > 0) // the model's smoothed rate
        p.dirty_rate_bps = kept.dirty_rate_bps;
}

} // namespace

std::shared_ptr<SourceRun> SourceRun::create(Node& node, std::shared_ptr<Migration> m, std::shared_ptr<Vm> vm,
                                             const config::Peer* peer) {
    auto run = std::make_shared<SourceRun>(node, std::move(m), std::move(vm));
    if (peer)
        run->destination_ = std::make_unique<PeerDestination>(*run, peer->address);
    else
        run->destination_ = std::make_unique<LocalDestination>(*run);
    return run;
}

SourceRun::SourceRun(Node& node, std::shared_ptr<Migration> m, std::shared_ptr<Vm> vm)
    : node_(node), record_(std::move(m)), m_(*record_), vm_(std::move(vm)), hooks_config_(node.config().hooks),
      wake_(node.executor()) {}

void SourceRun::wake_up() {
    woken_ = true;
    wake_.cancel();
    if (m_.abort_requested && destination_)
        destination_->abort_requested();
}

void SourceRun::set_phase(Phase phase) {
    m_.phase = phase;
    node_.persist(m_);
    node_.publish("phase", m_.vm, m_.id,
                  {{"phase", to_string(phase)}, {"role", "source"}, {"mode", m_.mode},
                   {"failure_reason", m_.failure_reason ? json(*m_.failure_reason) : json(nullptr)}});
    engine_log()->info("migration {}: {}", m_.id, to_string(phase));
}

asio::awaitable<void> SourceRun::run(std::shared_ptr<SourceRun> self) {
    auto& run = *self;
    run.start_ = Clock::now();
    run.m_.started_at = now_string();
    run.set_phase(Phase::Scheduling);
    // No scheduler yet: the target is the node asked for.
    run.set_phase(Phase::Scheduled);
    auto r = co_await run.prepare_target();
    if (r && run.m_.abort_requested)
        r = make_error(Errc::aborted, "aborted by request before the transfer started");
    if (r)
        r = co_await run.start_source();
    if (r)
        r = co_await run.watch();
    run.release_throttle(); // however the pre-copy ended
    if (r)
        r = co_await run.switch_over();
    if (r)
        r = co_await run.hand_off();
    co_await run.destination_->release(!r);
    if (!r && run.outcome_unknown_)
        run.leave_in_doubt(r.error());
    else if (!r)
        co_await run.fail(r.error());
    run.destination_->close();
}

asio::awaitable<Result<void>> SourceRun::prepare_target() {
    set_phase(Phase::PreparingTarget);
    auto hooked = co_await hooks(HookPhase::Prepare);
    if (!hooked)
        co_return hooked;
    auto prepared = co_await destination_->prepare();
    if (!prepared)
        co_return prepared;
    set_phase(Phase::TargetReady);
    co_return Result<void>{};
}

asio::awaitable<Result<void>> SourceRun::start_source() {
    auto followed = co_await follow_source();
    if (!followed)
        co_return followed;
    auto disks = co_await destination_->sync_disks();
    if (!disks)
        co_return disks;
    auto stream = destination_->open_stream();
    if (!stream)
        co_return stream.error();
    co_return co_await send_migration(std::move(*stream));
}

// Records the run state and follows QEMU's events.
asio::awaitable<Result<void>> SourceRun::follow_source() {
    set_phase(Phase::Running);
    auto qmp = vm_->qemu.qmp;
    auto status = co_await qmp->execute("query-status");
    if (!status)
        co_return status.error().wrap("reading the source's state");
    source_was_running_ = (*status).value("running", false);
    std::uint64_t data_bytes = vm_->record.spec->memory + destination_->disk_bytes();
    strategy_.emplace(m_.config, data_bytes, postcopy_enabled(m_.config));

    std::weak_ptr<SourceRun> weak = weak_from_this();
    source_subscription_ = qmp->subscribe([weak](const qmp::Event& e) {
        auto s = weak.lock();
        if (s && (e.name == "MIGRATION" || e.name == "MIGRATION_PASS")) {
            s->node_.publish("qemu", s->m_.vm, s->m_.id, {{"event", e.name}, {"data", e.data}});
            s->wake_up();
        }
    });
    qmp->on_close([weak](const Error&) {
        if (auto s = weak.lock())
            s->wake_up();
    });
    co_return Result<void>{};
}

// Capabilities, parameters (plus downtime-limit) and migrate.
asio::awaitable<Result<void>> SourceRun::send_migration(Destination::Stream stream) {
    auto qmp = vm_->qemu.qmp;
    auto& params = stream.params;
    json caps_args{{"capabilities", migration_capabilities(params.contains("multifd-channels"),
                                                           postcopy_enabled(m_.config), preempt_enabled(m_.config))}};
    auto caps = co_await qmp->execute("migrate-set-capabilities", caps_args);
    if (!caps)
        co_return caps.error().wrap("configuring the source");
    // The strategy starts low and raises it only while it has to.
    params["downtime-limit"] = strategy_->initial_downtime_ms();
    qemu_downtime_ms_ = strategy_->initial_downtime_ms();
    m_.progress.downtime_limit_ms = strategy_->initial_downtime_ms();
    auto set = co_await qmp->execute("migrate-set-parameters", params);
    if (!set)
        co_return set.error().wrap("configuring the source");
    json migrate_args{{"uri", stream.uri}};
    auto started = co_await qmp->execute("migrate", migrate_args);
    if (!started)
        co_return started.error().wrap("starting the migration");
    co_return Result<void>{};
}

asio::awaitable<void> SourceRun::cancel_source() {
    auto qmp = vm_->qemu.qmp;
    co_await qmp->execute("migrate_cancel");
    // Named, not a temporary inside co_await: GCC 12.
    std::function<bool(const std::string&)> ended = [](const std::string& s) {
        return s == "cancelled" || s == "failed" || s == "completed";
    };
    co_await wait_migration_status(*qmp, ended);
}

asio::awaitable<Result<void>> SourceRun::watch() {
    auto qmp = vm_->qemu.qmp;
    for (;;) {
        if (m_.abort_requested && m_.mode != "postcopy") {
            co_await cancel_source();
            co_return make_error(Errc::aborted, "aborted by request");
        }
        if (!qmp->connected())
            co_return make_error(Errc::disconnected, "lost the source QEMU's QMP connection");
        auto healthy = co_await destination_->check();
        if (!healthy) {
            co_await cancel_source();
            co_return healthy;
        }
        auto over = co_await poll();
        if (!over)
            co_return over.error();
        if (*over)
            co_return Result<void>{};
        co_await wait_poll_interval();
    }
}

// One query-migrate: true once the pre-copy is over (or the guest paused
// for the switchover), an error when it failed.
asio::awaitable<Result<bool>> SourceRun::poll() {
    auto info = co_await vm_->qemu.qmp->execute("query-migrate");
    if (!info)
        co_return ok(false);
    last_info_ = *info;
    auto qemu = progress_from_query_migrate(*info);
    update_progress(m_.progress, qemu);
    if (auto now = Clock::now(); now - last_progress_event_ >= std::chrono::seconds(1)) {
        last_progress_event_ = now;
        node_.publish("progress", m_.vm, m_.id, json(m_)["progress"]);
    }
    auto status = m_.progress.qemu_status;
    if (status == "pre-switchover" || status == "completed")
        co_return ok(true);
    if (status == "failed") {
        auto gone = co_await destination_->gone();
        if (gone)
            co_return *gone;
        co_return make_error(Errc::qemu, fmt::format("QEMU reports the migration failed: {}",
                                                     (*info).value("error-desc", "no reason given")));
    }
    if (status == "cancelled")
        co_return make_error(Errc::aborted, "the migration was cancelled inside QEMU");
    if (status == "postcopy-active" || status == "postcopy-paused")
        co_return ok(true); // pause-before-switchover did not apply: switch_over follows it
    auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start_);
    auto decided = co_await converge(elapsed, qemu);
    if (!decided) {
        co_await cancel_source();
        co_return decided.error();
    }
    co_return ok(false);
}

asio::awaitable<void> SourceRun::wait_poll_interval() {
    // An event that came while we were busy must not wait out the poll
    // interval: the guest may be paused in pre-switchover.
    if (!woken_) {
        wake_.expires_after(poll_interval);
        co_await wake_.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    woken_ = false;
}

asio::awaitable<Result<void>> SourceRun::switch_over() {
    auto qmp = vm_->qemu.qmp;
    switchover_started_ = true;
    set_phase(Phase::Switchover); // a tool can tell the guest is leaving (or has left) the source
    // The guest is paused now; not in post-copy, where the guest runs on.
    if (m_.mode != "postcopy")
        destination_->switching_over();
    if (m_.method == "block" && m_.progress.qemu_status != "pre-switchover")
        co_return make_error(Errc::internal, fmt::format("QEMU switched over from '{}' without pausing first: the "
                                                         "disks' last round could not run",
                                                         m_.progress.qemu_status));
    if (m_.progress.qemu_status == "pre-switchover") {
        auto ready = co_await destination_->before_continue();
        if (!ready) {
            co_await cancel_source();
            co_return ready;
        }
        if (m_.mode == "postcopy") {
            // From here the guest may start on the target: never resume it here.
            m_.postcopy_continued = true;
            node_.persist(m_);
        }
        json continue_args{{"state", "pre-switchover"}};
        auto cont = co_await qmp->execute("migrate-continue", continue_args);
        if (!cont)
            co_return cont.error().wrap("switching over");
    }
    auto completed = co_await complete_stream();
    if (!completed)
        co_return completed;
    co_return co_await destination_->wait_resumed();
}

// Pre-copy's last round is short; post-copy lasts as long as the rest of
// the memory takes, and survives a broken connection (follow_postcopy).
asio::awaitable<Result<void>> SourceRun::complete_stream() {
    auto qmp = vm_->qemu.qmp;
    auto deadline = Clock::now() + 120s;
    std::optional<Clock::time_point> completed_at;
    for (;;) {
        auto info = co_await qmp->execute("query-migrate");
        if (!info)
            co_return info.error().wrap("switching over");
        last_info_ = *info;
        update_progress(m_.progress, progress_from_query_migrate(*info));
        auto status = m_.progress.qemu_status;
        // QEMU 7.2 announces "completed" a moment before it fills in
        // total-time and downtime: wait for them (briefly).
        if (status == "completed" && !completed_at)
            completed_at = Clock::now();
        if (completed_at && ((*info).value("total-time", 0) > 0 || Clock::now() > *completed_at + 5s))
            co_return Result<void>{};
        if (status == "failed" || status == "cancelled")
            co_return make_error(Errc::qemu,
                                 fmt::format("the switchover failed: {}", (*info).value("error-desc", status)));
        if (m_.mode == "postcopy") {
            auto followed = co_await destination_->follow_postcopy(status);
            if (!followed)
                co_return followed;
            co_await sleep_for(100ms);
            continue;
        }
        if (Clock::now() > deadline)
            co_return make_error(Errc::timeout, "the switchover did not complete within 120 s");
        co_await sleep_for(20ms);
    }
}

asio::awaitable<Result<void>> SourceRun::hand_off() {
    auto handed = co_await destination_->hand_off();
    if (!handed)
        co_return handed;
    m_.target_pid = -1;
    m_.target_dir.clear();
    m_.ended_at = now_string();
    co_await hooks(HookPhase::Released);
    vm_->migration_id.reset(); // only now may another migration (or a delete) begin
    set_phase(Phase::Succeeded);
    destination_->log_success();
    co_return Result<void>{};
}

asio::awaitable<void> SourceRun::ensure_source_running() {
    auto qmp = vm_->qemu.qmp;
    if (!source_was_running_ || !qmp || !qmp->connected())
        co_return;
    // QEMU restarts the source itself after a cancel or failure; make sure.
    for (int i = 0; i < 50; ++i) {
        auto status = co_await qmp->execute("query-status");
        if (!status)
            break;
        if ((*status).value("running", false)) {
            vm_->status = "running";
            co_return;
        }
        auto s = (*status).value("status", "");
        if (s != "finish-migrate") { // still finishing: wait
            auto cont = co_await qmp->execute("cont");
            if (!cont)
                engine_log()->warn("migration {}: resuming the source: {}", m_.id, cont.error().message);
        }
        co_await sleep_for(100ms);
    }
    engine_log()->error("migration {}: the source VM did not resume", m_.id);
}

// The source QEMU stays paused and the VM bound to this migration (no other
// migration, no delete) until the target says whether it runs the VM.
void SourceRun::leave_in_doubt(const Error& error) {
    engine_log()->warn("migration {}: {}", m_.id, error.message);
    if (vm_->qemu.qmp)
        vm_->qemu.qmp->unsubscribe(source_subscription_);
    vm_->status = "unknown";
    m_.warnings.push_back(error.message);
    node_.persist(m_);
    node_.leave_in_doubt(m_.id, fmt::format("{} did not answer the hand-off", m_.target_node));
}

asio::awaitable<void> SourceRun::fail(const Error& error) {
    engine_log()->warn("migration {}: failed: {}", m_.id, error.message);
    // In post-copy the guest ran on the destination: the source's copy is
    // stale and must not run again. Post-copy asked for but not continued
    // past pre-switchover (a block migration's last disk round failed) has
    // not left: the source resumes.
    if (m_.mode == "postcopy" && m_.postcopy_continued)
        source_was_running_ = false;
    else if (m_.mode == "postcopy")
        m_.mode = "precopy";
    co_await destination_->discard();
    co_await ensure_source_running();
    if (vm_->qemu.qmp)
        vm_->qemu.qmp->unsubscribe(source_subscription_);
    m_.failure_reason = error.message;
    if (m_.abort_requested)
        m_.abort_status = error.code == Errc::aborted ? "Succeeded" : "Failed";
    m_.target_pid = -1;
    m_.target_dir.clear();
    m_.ended_at = now_string();
    co_await hooks(HookPhase::Aborted);
    vm_->migration_id.reset(); // only now may another migration (or a delete) begin
    set_phase(Phase::Failed);
}

asio::awaitable<Result<void>> SourceRun::hooks(HookPhase phase) {
    auto& config = node_.config();
    int pid = phase == HookPhase::Released ? -1 : vm_->qemu.pid;
    HookCall call{phase, "source", &m_, vm_->record.spec ? &*vm_->record.spec : nullptr, config.node.name, pid};
    auto warned = co_await run_phase_hooks(node_, hooks_config_, call, Clock::now() + std::chrono::hours(1), m_.warnings);
    if (!warned)
        co_return warned.error();
    if (*warned)
        node_.persist(m_);
    co_return Result<void>{};
}

} // namespace ferry::engine
