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
    // A block migration's last disk round runs in the downtime too, at the
    // rate the link gives RAM (both share it).
    auto tail = destination_->disk_tail_bytes();
    std::int64_t tail_ms = 0;
    if (tail != 0 && prediction.transfer_rate_bps != 0) {
        tail_ms = static_cast<std::int64_t>((tail * 1000 + prediction.transfer_rate_bps - 1) /
                                            prediction.transfer_rate_bps);
        // Half of the downtime now allowed is the disks' (the disk throttle
        // keeps them there).
        destination_->set_disk_tail_budget(static_cast<std::uint64_t>(strategy.downtime_ms()) *
                                           prediction.transfer_rate_bps / 2000);
    }
    // The strategy judges RAM and the disks' tail together: a tail that
    // does not fit makes pre-copy "not converging", so the downtime limit
    // rises (up to max_downtime_ms) where that is enough.
    auto at_max = model_.predict(m_.config.max_downtime_ms);
    if (tail_ms != 0) {
        for (auto* pr : {&prediction, &at_max})
            pr->expected_downtime_ms += tail_ms;
        prediction.converges = prediction.converges && prediction.expected_downtime_ms <= strategy.downtime_ms();
        at_max.converges = at_max.converges && at_max.expected_downtime_ms <= m_.config.max_downtime_ms;
    }
    p.expected_downtime_ms = prediction.expected_downtime_ms;
    p.time_left_ms = prediction.time_left_ms;
    p.converging = prediction.known ? std::optional<bool>(prediction.converges) : std::nullopt;
    p.downtime_limit_ms = strategy.downtime_ms();
    p.throttle_percent = throttle;
    if (m_.abort_requested)
        co_return Result<void>{};

    // Post-copy moves RAM only: a block migration's disks must be nearly in
    // sync first (their last round runs with the guest paused).
    if (tail_ms > strategy.downtime_ms())
        strategy.set_postcopy_ready(false, fmt::format("the disks' tail ({} bytes, {} ms) does not fit the downtime "
                                                       "limit ({} ms)",
                                                       tail, tail_ms, strategy.downtime_ms()));
    else
        strategy.set_postcopy_ready(true);
    auto d = strategy.step(sample, prediction, at_max);
    auto qmp = vm_->qemu.qmp;
    if (d.fail)
        co_return make_error(Errc::timeout, *d.fail);
    if (d.downtime_limit_ms)
        p.downtime_limit_ms = *d.downtime_limit_ms;
    // QEMU switches over once its RAM fits its downtime-limit: what the
    // disks' tail leaves of ferry's (0 while the tail alone is too large:
    // QEMU then switches only at a pass with nothing left to send).
    auto for_qemu = std::max<std::int64_t>(0, strategy.downtime_ms() - tail_ms);
    // Lowered at once; raised not for every wobble of the tail, but by a tenth.
    auto moved = for_qemu - qemu_downtime_ms_;
    if (moved < 0 || (moved > 0 && (d.downtime_limit_ms || moved * 10 >= qemu_downtime_ms_ || qemu_downtime_ms_ == 0))) {
        json params{{"downtime-limit", for_qemu}};
        auto set = co_await qmp->execute("migrate-set-parameters", params);
        if (!set)
            co_return set.error().wrap("setting the downtime limit");
        if (tail_ms != 0 && (for_qemu == 0) != (qemu_downtime_ms_ == 0))
            engine_log()->info("migration {}: {}", m_.id,
                               for_qemu == 0 ? fmt::format("the disks' tail ({} bytes, {} ms) does not fit the "
                                                           "downtime limit ({} ms): the switchover waits",
                                                           tail, tail_ms, strategy.downtime_ms())
                                             : std::string("the disks' tail fits the downtime limit again"));
        qemu_downtime_ms_ = for_qemu;
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
