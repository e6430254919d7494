// Convergence during a running migration: the model's figures go into the
// migration's progress, and the strategy's decisions are applied to QEMU and
// to the guest's vCPU threads.
#include "engine/source_run.hpp"

#include "engine/async.hpp"

#include <fmt/format.h>

namespace ferry::engine {

namespace asio = boost::asio;

asio::awaitable<Result<void>> SourceRun::converge(std::chrono::milliseconds elapsed, const Progress& qemu) {
    auto& p = m_.progress;
    auto throttle = throttle_ ? throttle_->percent() : 0;
    Sample sample{elapsed, qemu.transferred_bytes, qemu.remaining_bytes, qemu.dirty_rate_bps, qemu.iteration, throttle};
    model_.observe(sample);
    auto& strategy = *strategy_;
    auto prediction = model_.predict(strategy.downtime_ms());
    if (prediction.transfer_rate_bps > 0)
        p.transfer_rate_bps = prediction.transfer_rate_bps;
    p.dirty_rate_bps = prediction.dirty_rate_bps;
    p.expected_downtime_ms = prediction.expected_downtime_ms;
    p.time_left_ms = prediction.time_left_ms;
    p.converging = prediction.known ? std::optional<bool>(prediction.converges) : std::nullopt;
    p.downtime_limit_ms = strategy.downtime_ms();
    p.throttle_percent = throttle;
    if (m_.abort_requested)
        co_return Result<void>{};

    auto d = strategy.step(sample, prediction, model_.predict(m_.config.max_downtime_ms));
    auto qmp = vm_->qemu.qmp;
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
        if (!throttle_) {
            auto cpus = co_await qmp->execute("query-cpus-fast");
            if (!cpus)
                co_return cpus.error().wrap("auto-converge: listing the vCPU threads");
            std::vector<pid_t> threads;
            for (auto& cpu : *cpus)
                threads.push_back(cpu.value("thread-id", 0));
            auto created = CpuThrottle::create(vm_->record.name, vm_->qemu.pid, threads);
            if (!created)
                co_return created.error();
            throttle_ = std::move(*created);
        }
        auto set = throttle_->set(static_cast<int>(*d.throttle_percent));
        if (!set)
            co_return set.error();
        p.throttle_percent = *d.throttle_percent;
    }
    if (d.start_postcopy) {
        auto started = co_await qmp->execute("migrate-start-postcopy");
        if (!started)
            co_return started.error().wrap("switching to post-copy");
        m_.mode = "postcopy";
        node_.persist(m_);
    }
    if (!d.why.empty())
        engine_log()->info("migration {}: {}", m_.id, d.why);
    co_return Result<void>{};
}

void SourceRun::release_throttle() {
    if (!throttle_)
        return;
    auto r = throttle_->release();
    if (r)
        engine_log()->info("migration {}: vCPUs of {} unthrottled", m_.id, vm_->record.name);
    else
        engine_log()->error("migration {}: unthrottling {}: {}", m_.id, vm_->record.name, r.error().message);
    throttle_.reset();
}

} // namespace ferry::engine
