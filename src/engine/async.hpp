#pragma once
// Private to the engine's .cpp files: its logger and the small waits the
// migration runs share.
#include "common/log.hpp"
#include "config/node_config.hpp"
#include "qmp/client.hpp"
#include "transport/channel.hpp"
#include "transport/data_plane.hpp"
#include "transport/shaper.hpp"
#include "transport/tunnel.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace ferry::engine {

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

// A ping every peer_timeout / 6 (5 s by default); silence for peer_timeout
// ([migration] peer_timeout, 30 s by default) means the peer is dead.
inline std::chrono::milliseconds keepalive_interval(const config::MigrationConfig& c) {
    return std::chrono::milliseconds(c.peer_timeout * 1000 / 6);
}
inline std::chrono::milliseconds peer_timeout(const config::MigrationConfig& c) {
    return std::chrono::seconds(c.peer_timeout);
}

// Runs a tunnel on the data plane (which owns both sockets) and resumes the
// caller on its own executor with the outcome.
inline boost::asio::awaitable<Result<transport::TunnelStats>>
tunnel_on_data_plane(boost::asio::local::stream_protocol::socket qemu, std::shared_ptr<transport::Channel> channel,
                     std::shared_ptr<transport::TokenBucket> bucket) {
    auto task = transport::run_tunnel(std::move(qemu), std::move(channel), std::move(bucket));
    auto r = co_await boost::asio::co_spawn(transport::data_plane(), std::move(task), boost::asio::use_awaitable);
    co_return r;
}

} // namespace ferry::engine
