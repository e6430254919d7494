#pragma once
// Private to the engine's .cpp files.
#include "common/log.hpp"
#include "engine/convergence.hpp"
#include "engine/engine.hpp"
#include "engine/throttle.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <functional>

namespace ferry::engine {

struct Engine::MigrationState {
    explicit MigrationState(boost::asio::any_io_executor ex) : wake(ex) {}
    Migration m;
    std::shared_ptr<Vm> vm; // null for a finished migration loaded from disk
    QemuInstance target;
    Clock::time_point start;
    bool switchover_started = false;
    bool source_was_running = true;
    std::size_t source_subscription = 0;
    boost::asio::steady_timer wake; // cut short by events and abort requests
    bool woken = false;             // set with every wake-up, so none is lost while busy

    void wake_up() {
        woken = true;
        wake.cancel();
    }
    json last_info;                 // last query-migrate answer from the source

    // Convergence (engine_converge.cpp).
    ConvergenceModel model;
    std::optional<Strategy> strategy;
    std::unique_ptr<CpuThrottle> throttle;
    bool postcopy_running = false; // the destination was told to run
    int recoveries = 0;            // post-copy recoveries so far

    // Cross-node only.
    bool remote = false;
    std::string peer_address;
    std::shared_ptr<transport::Channel> control;
    std::vector<std::string> tokens;
    std::unique_ptr<boost::asio::local::stream_protocol::acceptor> tunnel_acceptor;
    std::string tunnel_socket;
    std::vector<std::unique_ptr<boost::asio::local::stream_protocol::acceptor>> retired_acceptors;
    std::shared_ptr<transport::TokenBucket> bucket;
    std::optional<Error> tunnel_error;
    Clock::time_point last_ping;
};

struct Engine::Incoming {
    explicit Incoming(boost::asio::any_io_executor ex) : order(ex) {}
    Migration m;
    config::VmSpec spec;
    QemuInstance qemu;
    std::string source_node;
    int channels = 1;
    int next_index = 0;              // data channels reach QEMU in this order
    boost::asio::steady_timer order; // woken when next_index moves
    bool finished = false;
    std::string listen_socket;  // where QEMU listens (changes with each post-copy recovery)
    int recoveries = 0;
};

// What a target answers to a post-copy recovery when the VM died with its QEMU.
constexpr std::string_view destination_gone = "the destination QEMU is gone";

// QEMU 7.2 has no "unlimited" max-bandwidth: 1 TiB/s stands for it.
constexpr std::uint64_t unlimited_bandwidth = 1ULL << 40;

inline boost::asio::awaitable<void> sleep_for(std::chrono::milliseconds d) {
    boost::asio::steady_timer t(co_await boost::asio::this_coro::executor);
    t.expires_after(d);
    co_await t.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
}

// Polls query-migrate every 100 ms, up to `tries` times, until its status
// satisfies done; returns the last status ("" once QMP fails).
inline boost::asio::awaitable<std::string> wait_migration_status(qmp::Client& qmp,
                                                                std::function<bool(const std::string&)> done,
                                                                int tries = 100) {
    std::string status;
    for (int i = 0; i < tries; ++i) {
        auto info = co_await qmp.execute("query-migrate");
        status = info ? (*info).value("status", "") : "";
        if (status.empty() || done(status))
            break;
        co_await sleep_for(std::chrono::milliseconds(100));
    }
    co_return status;
}

inline std::shared_ptr<spdlog::logger> engine_log() {
    static auto l = logger("engine");
    return l;
}

} // namespace ferry::engine
