#include "scheduler/cluster.hpp"

#include "engine/engine.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/as_tuple.hpp>
#include <fmt/format.h>

#include <memory>

namespace ferry::scheduler {

namespace asio = boost::asio;

namespace {

struct Gathering {
    std::vector<json> results;
    std::size_t pending = 0;
    std::unique_ptr<asio::steady_timer> done;
};

asio::awaitable<void> ask_peer(engine::Engine* engine, std::string name, std::size_t slot,
                               std::shared_ptr<Gathering> g) {
    auto f = co_await engine->peer_facts(name);
    g->results[slot] = f ? *f : json{{"name", name}, {"state", "unreachable"}, {"error", f.error().message}};
    if (--g->pending == 0)
        g->done->cancel();
}

} // namespace

asio::awaitable<std::vector<json>> gather(engine::Engine& engine) {
    auto& peers = engine.config().peers;
    auto ex = co_await asio::this_coro::executor;
    auto g = std::make_shared<Gathering>();
    g->results.resize(peers.size() + 1);
    g->results[0] = engine.facts();
    g->pending = peers.size();
    g->done = std::make_unique<asio::steady_timer>(ex, asio::steady_timer::time_point::max());
    for (std::size_t i = 0; i < peers.size(); ++i)
        asio::co_spawn(ex, ask_peer(&engine, peers[i].name, i + 1, g), asio::detached);
    if (g->pending > 0)
        co_await g->done->async_wait(asio::as_tuple(asio::use_awaitable));
    co_return std::move(g->results);
}

} // namespace ferry::scheduler
