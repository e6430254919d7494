// The same-node migration state machine: one coroutine per phase.
#include "engine/engine.hpp"

#include "engine/engine_internal.hpp"
#include "engine/process.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/use_awaitable.hpp>
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
    if (kept.dirty_rate_bps > 0) // the model's smoothed rate
        p.dirty_rate_bps = kept.dirty_rate_bps;
}

} // namespace

void Engine::set_phase(MigrationState& st, Phase phase) {
    st.m.phase = phase;
    persist(st.m);
    engine_log()->info("migration {}: {}", st.m.id, to_string(phase));
}

// One migration from start to end; a cross-node one swaps in the remote
// steps. (if/else, not ?:, around co_await: GCC 12.)
asio::awaitable<void> Engine::run_migration(Engine* self, std::shared_ptr<MigrationState> st) {
    st->start = Clock::now();
    st->m.started_at = now_string();
    self->set_phase(*st, Phase::Scheduling);
    // No scheduler yet: the target is the node asked for.
    self->set_phase(*st, Phase::Scheduled);
    Result<void> r;
    if (st->remote)
        r = co_await self->prepare_remote_target(*st);
    else
        r = co_await self->prepare_target(*st);
    if (r && st->m.abort_requested)
        r = make_error(Errc::aborted, "aborted by request before the transfer started");
    if (r) {
        if (st->remote)
            r = co_await self->start_remote_source(*st);
        else
            r = co_await self->start_source(*st);
    }
    if (r)
        r = co_await self->watch(*st);
    self->release_throttle(*st); // however the pre-copy ended
    if (r)
        r = co_await self->switch_over(*st);
    if (r) {
        if (st->remote)
            r = co_await self->remote_hand_off(*st);
        else
            co_await self->hand_off(*st);
    }
    if (st->remote)
        co_await self->release_remote(*st, !r);
    if (!r)
        co_await self->fail(*st, r.error());
    if (st->control)
        st->control->close();
}

asio::awaitable<Result<void>> Engine::prepare_target(MigrationState& st) {
    set_phase(st, Phase::PreparingTarget);
    auto& vm = *st.vm;
    LaunchRequest req{&config_.node, &*vm.record.spec, vm_dir(vm.record.name), vm.record.generation + 1, true};
    auto q = co_await launch_qemu(ex_, req);
    if (!q)
        co_return q.error().wrap("preparing the destination");
    st.target = std::move(*q);
    st.m.target_pid = st.target.pid;
    st.m.target_dir = st.target.run_dir;
    std::weak_ptr<MigrationState> weak = migrations_[st.m.id];
    st.target.qmp->on_close([weak](const Error&) {
        if (auto s = weak.lock())
            s->wake_up();
    });
    json caps_args{{"capabilities", migration_capabilities(false, postcopy_enabled(st.m.config),
                                                           preempt_enabled(st.m.config))}};
    auto caps = co_await st.target.qmp->execute("migrate-set-capabilities", caps_args);
    if (!caps)
        co_return caps.error().wrap("preparing the destination");
    json incoming_args{{"uri", "unix:" + st.target.migrate_socket()}};
    auto incoming = co_await st.target.qmp->execute("migrate-incoming", incoming_args);
    if (!incoming)
        co_return incoming.error().wrap("preparing the destination");
    set_phase(st, Phase::TargetReady);
    co_return Result<void>{};
}

asio::awaitable<Result<void>> Engine::begin_source(MigrationState& st) {
    set_phase(st, Phase::Running);
    auto qmp = st.vm->qemu.qmp;
    auto status = co_await qmp->execute("query-status");
    if (!status)
        co_return status.error().wrap("reading the source's state");
    st.source_was_running = (*status).value("running", false);
    std::uint64_t data_bytes = st.vm->record.spec->memory; // + local disks once they are mirrored
    st.strategy.emplace(st.m.config, data_bytes, postcopy_enabled(st.m.config));

    std::weak_ptr<MigrationState> weak = migrations_[st.m.id];
    st.source_subscription = qmp->subscribe([weak](const qmp::Event& e) {
        auto s = weak.lock();
        if (s && (e.name == "MIGRATION" || e.name == "MIGRATION_PASS"))
            s->wake_up();
    });
    qmp->on_close([weak](const Error&) {
        if (auto s = weak.lock())
            s->wake_up();
    });
    co_return Result<void>{};
}

asio::awaitable<Result<void>> Engine::send_migration(MigrationState& st, json params, std::string uri) {
    auto qmp = st.vm->qemu.qmp;
    json caps_args{{"capabilities", migration_capabilities(params.contains("multifd-channels"),
                                                           postcopy_enabled(st.m.config),
                                                           preempt_enabled(st.m.config))}};
    auto caps = co_await qmp->execute("migrate-set-capabilities", caps_args);
    if (!caps)
        co_return caps.error().wrap("configuring the source");
    // The strategy starts low and raises it only while it has to.
    params["downtime-limit"] = st.strategy->initial_downtime_ms();
    st.m.progress.downtime_limit_ms = st.strategy->initial_downtime_ms();
    auto set = co_await qmp->execute("migrate-set-parameters", params);
    if (!set)
        co_return set.error().wrap("configuring the source");
    json migrate_args{{"uri", uri}};
    auto started = co_await qmp->execute("migrate", migrate_args);
    if (!started)
        co_return started.error().wrap("starting the migration");
    co_return Result<void>{};
}

asio::awaitable<Result<void>> Engine::start_source(MigrationState& st) {
    auto begun = co_await begin_source(st);
    if (!begun)
        co_return begun;
    auto bw = st.m.config.bandwidth_per_migration;
    // Same node: QEMU shapes. Post-copy has a limit of its own (unlimited
    // unless set), and the cap holds there too.
    json params{{"max-bandwidth", bw == 0 ? unlimited_bandwidth : bw}, {"max-postcopy-bandwidth", bw}};
    co_return co_await send_migration(st, params, "unix:" + st.target.migrate_socket());
}

asio::awaitable<void> Engine::cancel_source(MigrationState& st) {
    auto qmp = st.vm->qemu.qmp;
    co_await qmp->execute("migrate_cancel");
    // Named, not a temporary inside co_await: GCC 12.
    std::function<bool(const std::string&)> ended = [](const std::string& s) {
        return s == "cancelled" || s == "failed" || s == "completed";
    };
    co_await wait_migration_status(*qmp, ended);
}

asio::awaitable<Result<void>> Engine::watch(MigrationState& st) {
    auto qmp = st.vm->qemu.qmp;
    auto target_gone = [&] { return !st.remote && (!st.target.qmp->connected() || !process_alive(st.target.pid)); };

    for (;;) {
        if (st.m.abort_requested && st.m.mode != "postcopy") {
            co_await cancel_source(st);
            co_return make_error(Errc::aborted, "aborted by request");
        }
        if (!qmp->connected())
            co_return make_error(Errc::disconnected, "lost the source QEMU's QMP connection");
        if (target_gone()) {
            co_await cancel_source(st);
            co_return make_error(Errc::disconnected, fmt::format("the destination QEMU exited: {}",
                                                                 log_tail(st.target.log_path())));
        }
        if (st.remote) {
            auto alive = co_await keepalive(st);
            if (!alive) {
                co_await cancel_source(st);
                co_return alive.error();
            }
        }
        auto info = co_await qmp->execute("query-migrate");
        if (info) {
            st.last_info = *info;
            auto qemu = progress_from_query_migrate(*info);
            update_progress(st.m.progress, qemu);
            auto status = st.m.progress.qemu_status;
            if (status == "pre-switchover" || status == "completed")
                co_return Result<void>{};
            if (status == "failed") {
                if (target_gone())
                    co_return make_error(Errc::disconnected, fmt::format("the destination QEMU exited: {}",
                                                                         log_tail(st.target.log_path())));
                co_return make_error(Errc::qemu, fmt::format("QEMU reports the migration failed: {}",
                                                             (*info).value("error-desc", "no reason given")));
            }
            if (status == "cancelled")
                co_return make_error(Errc::aborted, "the migration was cancelled inside QEMU");
            if (status == "postcopy-active" || status == "postcopy-paused")
                co_return Result<void>{}; // pause-before-switchover did not apply: switch_over follows it
            auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - st.start);
            auto decided = co_await converge(st, elapsed, qemu);
            if (!decided) {
                co_await cancel_source(st);
                co_return decided;
            }
        }
        // An event that came while we were busy must not wait out the poll
        // interval: the guest may be paused in pre-switchover.
        if (!st.woken) {
            st.wake.expires_after(poll_interval);
            co_await st.wake.async_wait(asio::as_tuple(asio::use_awaitable));
        }
        st.woken = false;
    }
}

asio::awaitable<Result<void>> Engine::switch_over(MigrationState& st) {
    auto qmp = st.vm->qemu.qmp;
    st.switchover_started = true;
    engine_log()->info("migration {}: switching over", st.m.id);
    // The guest is paused now: like QEMU with its own max-bandwidth, lift the
    // shaping so the last round does not stretch the downtime.
    // Not in post-copy: the guest runs on, and the cap protects the network
    // for the rest of the copy.
    if (st.bucket && st.m.mode != "postcopy") {
        shaper_.remove(st.m.id);
        st.bucket->set_rate(0, transport::ShaperClock::now());
    }
    if (st.m.progress.qemu_status == "pre-switchover") {
        json continue_args{{"state", "pre-switchover"}};
        auto cont = co_await qmp->execute("migrate-continue", continue_args);
        if (!cont)
            co_return cont.error().wrap("switching over");
    }
    // Pre-copy's last round is short; post-copy lasts as long as the rest of
    // the memory takes, and survives a broken connection (follow_postcopy).
    auto deadline = Clock::now() + 120s;
    std::optional<Clock::time_point> completed_at;
    for (;;) {
        auto info = co_await qmp->execute("query-migrate");
        if (!info)
            co_return info.error().wrap("switching over");
        st.last_info = *info;
        update_progress(st.m.progress, progress_from_query_migrate(*info));
        auto status = st.m.progress.qemu_status;
        // QEMU 7.2 announces "completed" a moment before it fills in
        // total-time and downtime: wait for them (briefly).
        if (status == "completed" && !completed_at)
            completed_at = Clock::now();
        if (completed_at && ((*info).value("total-time", 0) > 0 || Clock::now() > *completed_at + 5s))
            break;
        if (status == "failed" || status == "cancelled")
            co_return make_error(Errc::qemu, fmt::format("the switchover failed: {}",
                                                         (*info).value("error-desc", status)));
        if (st.m.mode == "postcopy") {
            auto followed = co_await follow_postcopy(st, status);
            if (!followed)
                co_return followed;
            co_await sleep_for(100ms);
            continue;
        }
        if (Clock::now() > deadline)
            co_return make_error(Errc::timeout, "the switchover did not complete within 120 s");
        co_await sleep_for(20ms);
    }
    if (st.remote)
        co_return Result<void>{}; // the target resumes it on "finish"
    // The destination resumes the guest by itself once the stream is complete;
    // a guest that was paused on the source stays paused there.
    deadline = Clock::now() + 30s;
    for (;;) {
        auto status = co_await st.target.qmp->execute("query-status");
        if (status && (*status).value("running", false))
            co_return Result<void>{};
        if (status && !st.source_was_running && (*status).value("status", "") == "paused")
            co_return Result<void>{};
        if (!st.target.qmp->connected() || Clock::now() > deadline)
            co_return make_error(Errc::io, fmt::format("the destination did not resume the VM ({}): {}",
                                                       status ? (*status).value("status", "?") : status.error().message,
                                                       log_tail(st.target.log_path())));
        co_await sleep_for(10ms);
    }
}

asio::awaitable<Result<void>> Engine::follow_postcopy(MigrationState& st, const std::string& status) {
    if (!st.remote) {
        if (status == "postcopy-paused")
            co_return make_error(Errc::qemu, "post-copy paused on a same-node migration (QEMU lost its socket)");
        co_return Result<void>{};
    }
    if (status == "postcopy-active" && st.control) {
        // Keeps the target's control channel from timing out over a long
        // post-copy; a dead channel is re-dialled when needed.
        auto alive = co_await keepalive(st);
        if (!alive) {
            engine_log()->debug("migration {}: post-copy keepalive: {}", st.m.id, alive.error().message);
            st.control->close();
            st.control.reset();
        }
    }
    if (status == "postcopy-active" && !st.postcopy_running) {
        auto run = co_await start_remote_postcopy(st);
        if (!run)
            engine_log()->warn("migration {}: starting the VM on {}: {} (retrying)", st.m.id, st.m.target_node,
                               run.error().message);
    }
    if (status != "postcopy-paused")
        co_return Result<void>{};
    auto recovered = co_await recover_postcopy(st);
    if (recovered)
        co_return Result<void>{};
    if (recovered.error().message.find(destination_gone) != std::string::npos) {
        // Nothing left to recover into. The source's copy is older than what
        // the destination ran: never resume it.
        st.source_was_running = false;
        co_return make_error(Errc::disconnected,
                             fmt::format("post-copy to {} cannot finish, {}; the source QEMU is kept paused and must "
                                         "not be resumed (the guest ran on the destination since the switchover)",
                                         st.m.target_node, recovered.error().message));
    }
    engine_log()->warn("migration {}: post-copy recovery: {} (retrying in 2 s; the VM is kept on both nodes until it "
                       "completes)",
                       st.m.id, recovered.error().message);
    co_await sleep_for(2s);
    co_return Result<void>{};
}

asio::awaitable<void> Engine::hand_off(MigrationState& st) {
    auto vm = st.vm;
    QemuInstance old = std::move(vm->qemu);
    old.qmp->unsubscribe(st.source_subscription);
    auto source_beats = old.console ? old.console->heartbeat_list() : std::vector<Heartbeat>{};
    vm->qemu = std::move(st.target);
    st.target = QemuInstance{};
    vm->record.pid = vm->qemu.pid;
    vm->record.generation = vm->qemu.generation;
    vm->record.run_dir = vm->qemu.run_dir;
    vm->record.qmp_socket = vm->qemu.qmp_socket;
    vm->record.adopted = false; // ferry started the new QEMU, so it owns it
    vm->status = st.source_was_running ? "running" : "paused";
    attach(vm);
    persist(*vm);
    co_await destroy_qemu(ex_, old); // the source QEMU only goes once the destination runs

    st.m.result.total_time_ms = st.last_info.value("total-time", std::int64_t{0});
    st.m.result.downtime_ms = st.last_info.value("downtime", std::int64_t{0});
    if (!source_beats.empty()) {
        // Wait for the destination's first heartbeat (a few intervals at most).
        auto interval = std::chrono::milliseconds(source_beats.back().interval_ms);
        auto deadline = Clock::now() + 3 * interval + 2s;
        while (Clock::now() < deadline) {
            auto blackout = guest_blackout_ms(source_beats, vm->qemu.console->heartbeat_list());
            if (blackout) {
                st.m.result.guest_blackout_ms = *blackout;
                break;
            }
            co_await sleep_for(10ms);
        }
    }
    st.m.target_pid = -1;
    st.m.target_dir.clear();
    st.m.ended_at = now_string();
    vm->migration_id.reset();
    set_phase(st, Phase::Succeeded);
    engine_log()->info("migration {}: total {} ms, downtime {} ms, guest blackout {}", st.m.id,
                       *st.m.result.total_time_ms, *st.m.result.downtime_ms,
                       st.m.result.guest_blackout_ms ? fmt::format("{} ms", *st.m.result.guest_blackout_ms)
                                                     : std::string("unknown"));
}

asio::awaitable<void> Engine::ensure_source_running(MigrationState& st) {
    auto qmp = st.vm->qemu.qmp;
    if (!st.source_was_running || !qmp || !qmp->connected())
        co_return;
    // QEMU restarts the source itself after a cancel or failure; make sure.
    for (int i = 0; i < 50; ++i) {
        auto status = co_await qmp->execute("query-status");
        if (!status)
            break;
        if ((*status).value("running", false)) {
            st.vm->status = "running";
            co_return;
        }
        auto s = (*status).value("status", "");
        if (s != "finish-migrate") { // still finishing: wait
            auto cont = co_await qmp->execute("cont");
            if (!cont)
                engine_log()->warn("migration {}: resuming the source: {}", st.m.id, cont.error().message);
        }
        co_await sleep_for(100ms);
    }
    engine_log()->error("migration {}: the source VM did not resume", st.m.id);
}

asio::awaitable<void> Engine::fail(MigrationState& st, const Error& error) {
    engine_log()->warn("migration {}: failed: {}", st.m.id, error.message);
    if (st.m.mode == "postcopy") {
        // The guest ran on the destination: the source's copy is stale and
        // must not run again, and a destination still alive keeps the VM.
        st.source_was_running = false;
        if (st.target.pid > 0 && process_alive(st.target.pid))
            engine_log()->error("migration {}: post-copy failed; the destination QEMU (pid {}) is kept for an "
                                "operator, the source stays paused",
                                st.m.id, st.target.pid);
    } else if (st.target.pid > 0 || st.target.qmp) {
        co_await destroy_qemu(ex_, st.target);
    }
    st.target = QemuInstance{};
    co_await ensure_source_running(st);
    if (st.vm->qemu.qmp)
        st.vm->qemu.qmp->unsubscribe(st.source_subscription);
    st.m.failure_reason = error.message;
    if (st.m.abort_requested)
        st.m.abort_status = error.code == Errc::aborted ? "Succeeded" : "Failed";
    st.m.target_pid = -1;
    st.m.target_dir.clear();
    st.m.ended_at = now_string();
    st.vm->migration_id.reset();
    set_phase(st, Phase::Failed);
}

} // namespace ferry::engine
