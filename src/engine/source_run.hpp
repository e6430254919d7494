#pragma once
// One outgoing migration, same-node or cross-node: its phases in order,
// each a short coroutine. Where the two kinds differ, the Destination does.
#include "engine/convergence.hpp"
#include "engine/destination.hpp"
#include "engine/hooks.hpp"
#include "engine/migration.hpp"
#include "engine/node.hpp"
#include "engine/throttle.hpp"
#include "engine/vm.hpp"

#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <memory>
#include <optional>

namespace ferry::engine {

class SourceRun : public std::enable_shared_from_this<SourceRun> {
public:
    // peer: the target node's entry in [[peers]]; null for this node.
    static std::shared_ptr<SourceRun> create(Node& node, std::shared_ptr<Migration> m, std::shared_ptr<Vm> vm,
                                             const config::Peer* peer);
    SourceRun(Node& node, std::shared_ptr<Migration> m, std::shared_ptr<Vm> vm);

    // The whole migration; the record says how it ended.
    static boost::asio::awaitable<void> run(std::shared_ptr<SourceRun> self);

    // Cuts the current wait short (QEMU events, abort requests).
    void wake_up();
    bool switchover_started() const { return switchover_started_; }

    // For the destination.
    Node& node() { return node_; }
    Migration& migration() { return m_; }
    Vm& vm() { return *vm_; }
    const std::shared_ptr<Vm>& vm_ptr() const { return vm_; }
    const json& last_info() const { return last_info_; }
    bool source_was_running() const { return source_was_running_; }
    // The source's copy is, or may be, older than the destination's: never
    // resume it.
    void keep_source_paused() { source_was_running_ = false; }
    // The hand-off got no answer: whether the target runs the VM is not
    // known. The run ends in doubt, not failed (the node asks the target).
    void outcome_unknown() { outcome_unknown_ = true; }
    std::size_t source_subscription() const { return source_subscription_; }
    void set_phase(Phase phase);
    // [hooks] as it was when the migration was created: a reload (SIGHUP)
    // changes the hooks of later migrations only.
    const config::HooksSection& hooks_config() const { return hooks_config_; }

private:
    boost::asio::awaitable<Result<void>> prepare_target();
    boost::asio::awaitable<Result<void>> start_source();
    boost::asio::awaitable<Result<void>> follow_source();
    boost::asio::awaitable<Result<void>> send_migration(Destination::Stream stream);
    boost::asio::awaitable<Result<void>> watch();
    boost::asio::awaitable<Result<bool>> poll();
    boost::asio::awaitable<void> wait_poll_interval();
    // Feeds the model, applies the strategy's decision (source_run_converge.cpp).
    boost::asio::awaitable<Result<void>> converge(std::chrono::milliseconds elapsed, const Progress& qemu);
    void release_throttle();
    boost::asio::awaitable<void> cancel_source();
    boost::asio::awaitable<Result<void>> switch_over();
    boost::asio::awaitable<Result<void>> complete_stream();
    boost::asio::awaitable<Result<void>> hand_off();
    boost::asio::awaitable<void> fail(const Error& error);
    void leave_in_doubt(const Error& error);
    boost::asio::awaitable<void> ensure_source_running();
    // This side's hooks of a phase: an error before the switchover, warnings
    // on the record after it.
    boost::asio::awaitable<Result<void>> hooks(HookPhase phase);

    Node& node_;
    std::shared_ptr<Migration> record_; // shared with the node's records
    Migration& m_;
    std::shared_ptr<Vm> vm_;
    config::HooksSection hooks_config_;
    std::unique_ptr<Destination> destination_;
    Clock::time_point start_;
    bool switchover_started_ = false;
    bool outcome_unknown_ = false;
    bool source_was_running_ = true;
    std::size_t source_subscription_ = 0;
    boost::asio::steady_timer wake_; // cut short by events and abort requests
    bool woken_ = false;             // set with every wake-up, so none is lost while busy
    json last_info_;                 // last query-migrate answer from the source
    Clock::time_point last_progress_event_{}; // progress events: at most one a second

    // Convergence (source_run_converge.cpp).
    ConvergenceModel model_;
    std::optional<Strategy> strategy_;
    // QEMU's downtime-limit: the strategy's, less the disks' tail.
    std::int64_t qemu_downtime_ms_ = 0;
    std::unique_ptr<CpuThrottle> throttle_;
};

} // namespace ferry::engine
