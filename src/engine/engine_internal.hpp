#pragma once
// Private to the engine's .cpp files.
#include "common/log.hpp"
#include "engine/engine.hpp"

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
};

inline std::shared_ptr<spdlog::logger> engine_log() {
    static auto l = logger("engine");
    return l;
}

} // namespace ferry::engine
