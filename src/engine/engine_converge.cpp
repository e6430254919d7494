// Convergence during a running migration: the model's figures go into the
// migration's progress, and the strategy's decisions are applied to QEMU and
// to the guest's vCPU threads.
#include "engine/engine.hpp"

#include "engine/engine_internal.hpp"

#include <fmt/format.h>

namespace ferry::engine {

namespace asio = boost::asio;

asio::awaitable<Result<void>> Engine::converge(MigrationState& st, std::chrono::milliseconds elapsed,
                                               const Progress& qemu) {
    auto& p = st.m.progress;
    auto throttle = st.throttle ? st.throttle->percent() : 0;
    Sample sample{elapsed, qemu.transferred_bytes, qemu.remaining_bytes, qemu.dirty_rate_bps, qemu.iteration, throttle};
    st.model.observe(sample);
    auto& strategy = *st.strategy;
    auto prediction = st.model.predict(strategy.downtime_ms());
    if (prediction.transfer_rate_bps > 0)
        p.transfer_rate_bps = prediction.transfer_rate_bps;
    p.dirty_rate_bps = prediction.dirty_rate_bps;
    p.expected_downtime_ms = prediction.expected_downtime_ms;
    p.time_left_ms = prediction.time_left_ms;
    p.converging = prediction.known ? std::optional<bool>(prediction.converges) : std::nullopt;
    p.downtime_limit_ms = strategy.downtime_ms();
    p.throttle_percent = throttle;
    if (st.m.abort_requested)
        co_return Result<void>{};

    auto d = strategy.step(sample, prediction, st.model.predict(st.m.config.max_downtime_ms));
    auto qmp = st.vm->qemu.qmp;
    if (d.fail)
        co_return make_error(Errc::timeout, *d.fail);
    if (d.downtime_limit_ms) {
        json params{{"downtime-limit", *d.downtime_limit_ms}};
        auto set = co_await qmp->execute("migrate-set-parameters", params);
        if (!set)
            co_return set.error().wrap("raising the downtime limit");
        p.downtime_limit_ms = *d.downtime_limit_ms;
    }
    if (d.throttle_percent) {
        if (!st.throttle) {
            auto cpus = co_await qmp->execute("query-cpus-fast");
            if (!cpus)
                co_return cpus.error().wrap("auto-converge: listing the vCPU threads");
            std::vector<pid_t> threads;
            for (auto& cpu : *cpus)
                threads.push_back(cpu.value("thread-id", 0));
            auto created = CpuThrottle::create(st.vm->record.name, st.vm->qemu.pid, threads);
            if (!created)
                co_return created.error();
            st.throttle = std::move(*created);
        }
        auto set = st.throttle->set(static_cast<int>(*d.throttle_percent));
        if (!set)
            co_return set.error();
        p.throttle_percent = *d.throttle_percent;
    }
    if (d.start_postcopy) {
        auto started = co_await qmp->execute("migrate-start-postcopy");
        if (!started)
            co_return started.error().wrap("switching to post-copy");
        st.m.mode = "postcopy";
        persist(st.m);
    }
    if (!d.why.empty())
        engine_log()->info("migration {}: {}", st.m.id, d.why);
    co_return Result<void>{};
}

void Engine::release_throttle(MigrationState& st) {
    if (!st.throttle)
        return;
    auto r = st.throttle->release();
    if (r)
        engine_log()->info("migration {}: vCPUs of {} unthrottled", st.m.id, st.vm->record.name);
    else
        engine_log()->error("migration {}: unthrottling {}: {}", st.m.id, st.vm->record.name, r.error().message);
    st.throttle.reset();
}

} // namespace ferry::engine
