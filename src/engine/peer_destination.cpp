// A cross-node migration's destination: the peer ferryd's side of the
// control protocol, and the tunnels that carry QEMU's stream to it.
#include "engine/peer_destination.hpp"

#include "block/ring.hpp"
#include "block/target_image.hpp"
#include "engine/async.hpp"
#include "engine/process.hpp"
#include "engine/source_run.hpp"
#include "transport/peer_server.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fmt/format.h>

#include <filesystem>

namespace ferry::engine {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using transport::Channel;
using namespace asio::experimental::awaitable_operators;

namespace {

constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);

// The data-channel tokens a target hands out (target_ready, recovering).
Result<std::vector<std::string>> tokens_of(const json& reply, const std::string& node) {
    auto tokens = reply.find("tokens");
    if (tokens == reply.end() || !tokens->is_array() ||
        !std::all_of(tokens->begin(), tokens->end(), [](const json& t) { return t.is_string(); }))
        return make_error(Errc::protocol, fmt::format("node {} answered without data-channel tokens", node));
    return tokens->get<std::vector<std::string>>();
}

} // namespace

asio::awaitable<void> PeerDestination::take_turn() {
    while (requesting_)
        co_await sleep_for(5ms);
    requesting_ = true;
}

namespace {
// Gives the control channel back however the request ends.
struct Turn {
    bool& held;
    ~Turn() { held = false; }
};
} // namespace

asio::awaitable<Result<json>> PeerDestination::exchange(const json& message, std::chrono::milliseconds timeout) {
    auto& target = run_.migration().target_node;
    if (!control_)
        co_return make_error(Errc::disconnected, "no control channel");
    auto w = co_await control_->write_frame(message);
    Result<json> reply = w ? ok(json()) : Result<json>(w.error());
    if (w)
        reply = co_await control_->read_frame(timeout);
    // Keepalives included: what the metrics say of the peer.
    run_.node().note_peer(target, static_cast<bool>(reply), reply ? "" : reply.error().message);
    if (!reply)
        co_return reply.error().wrap(fmt::format("node {}", target));
    if (auto type = reply->find("type"); type != reply->end() && *type == "error") {
        auto text = reply->find("message");
        co_return make_error(Errc::conflict, fmt::format("node {}: {}", target,
                                                         text != reply->end() && text->is_string()
                                                             ? text->get<std::string>()
                                                             : std::string("an error without a message")));
    }
    co_return reply;
}

asio::awaitable<Result<json>> PeerDestination::request(json message, std::chrono::milliseconds timeout) {
    co_await take_turn();
    Turn turn{requesting_};
    co_return co_await exchange(message, timeout);
}

asio::awaitable<Result<json>> PeerDestination::request_reconnecting(json message, std::chrono::milliseconds timeout) {
    auto& m = run_.migration();
    auto& node = run_.node();
    co_await take_turn();
    Turn turn{requesting_};
    message["migration_id"] = m.id;
    auto reply = co_await exchange(message, timeout);
    if (reply || reply.error().code == Errc::conflict) // answered (perhaps with an error)
        co_return reply;
    if (control_)
        control_->close();
    control_.reset();
    auto c = co_await transport::open_control(node.executor(), peer_address_, m.target_node, node.config().node.name,
                                              node.tls());
    node.note_peer(m.target_node, static_cast<bool>(c), c ? "" : c.error().message);
    if (!c)
        co_return c.error().wrap(fmt::format("reconnecting to node {}", m.target_node));
    control_ = *c;
    engine_log()->info("migration {}: control channel to {} re-established", m.id, m.target_node);
    co_return co_await exchange(message, timeout);
}

// Format and virtual size of each shared disk as this node sees it: the
// target checks its own view of the same paths against them.
asio::awaitable<Result<json>> PeerDestination::describe_shared_disks(const config::VmSpec& spec) {
    json out = json::array();
    for (std::size_t i = 0; i < spec.disks.size(); ++i) {
        if (!spec.disks[i].shared)
            continue;
        std::string path = spec.disks[i].path;
        std::function<Result<block::ImageInfo>()> inspect = [path] { return block::inspect_image(path); };
        auto info = co_await block::offload(std::move(inspect));
        if (!info)
            co_return info.error().wrap(fmt::format("disks[{}]", i));
        out.push_back({{"index", i}, {"format", info->format}, {"size", info->virtual_size}});
    }
    co_return ok(std::move(out));
}

asio::awaitable<Result<void>> PeerDestination::prepare() {
    auto& m = run_.migration();
    auto& node = run_.node();
    auto c = co_await transport::open_control(node.executor(), peer_address_, m.target_node, node.config().node.name,
                                              node.tls());
    node.note_peer(m.target_node, static_cast<bool>(c), c ? "" : c.error().message);
    if (!c)
        co_return c.error().wrap("preparing the destination");
    control_ = *c;
    json prepare{{"type", "prepare"},
                 {"migration", m},
                 {"spec", *run_.vm().record.spec},
                 {"channels", migration_channels(m.config)}};
    auto shared = co_await describe_shared_disks(*run_.vm().record.spec);
    if (!shared)
        co_return shared.error().wrap("preparing the destination");
    prepare["shared_disks"] = *shared;
    if (m.method == "block") {
        disks_ = std::make_unique<SourceDisks>(run_);
        auto described = co_await disks_->describe();
        if (!described)
            co_return described.error().wrap("preparing the destination");
        prepare["disks"] = *described;
    }
    prepare_abort_->control = control_;
    if (m.abort_requested) // asked for while the source's prepare hooks ran
        abort_requested();
    auto ready = co_await request(prepare, 120s);
    prepare_abort_->control.reset();
    if (prepare_abort_->sent)
        co_return make_error(Errc::aborted,
                             fmt::format("aborted by request while node {} was {}", m.target_node,
                                         prepare_abort_->during.value_or("preparing the destination")));
    if (!ready)
        co_return ready.error().wrap("preparing the destination");
    if (ready->value("type", "") != "target_ready")
        co_return make_error(Errc::protocol,
                             fmt::format("node {} answered prepare with {}", m.target_node, ready->value("type", "?")));
    auto tokens = tokens_of(*ready, m.target_node);
    if (!tokens)
        co_return tokens.error();
    tokens_ = std::move(*tokens);
    if (disks_) {
        auto token = ready->find("disk_token");
        if (token == ready->end() || !token->is_string())
            co_return make_error(Errc::protocol, fmt::format("node {} cannot take local disks (it answered without "
                                                             "a disk channel)",
                                                             m.target_node));
        disk_token_ = token->get<std::string>();
    }
    // A target that does not say it set up the preempt channel (a ferryd
    // from before it existed) gets a migration without one.
    auto preempt = ready->find("preempt");
    bool target_preempts = preempt != ready->end() && preempt->is_boolean() && preempt->get<bool>();
    if (preempt_enabled(m.config) && !target_preempts) {
        m.config.postcopy_preempt = false;
        engine_log()->info("migration {}: node {} does not take post-copy's preempt channel; migrating without it",
                           m.id, m.target_node);
    }
    last_ping_ = Clock::now();
    co_return Result<void>{};
}

// QEMU sends to our socket; each connection it opens gets its own data
// channel, in order.
Result<Destination::Stream> PeerDestination::open_stream() {
    auto& m = run_.migration();
    auto& node = run_.node();
    auto listening = listen_tunnels(node.vm_dir(run_.vm().record.name) + "/tunnel.sock");
    if (!listening)
        return listening.error();
    if (!bucket_)
        bucket_ = node.shaper().add(m.id, m.config.bandwidth_per_migration);
    asio::co_spawn(node.executor(), accept_tunnels(run_.shared_from_this(), this), asio::detached);

    // Shaping happens in ferry's channel, so QEMU itself is not limited.
    json params{{"max-bandwidth", unlimited_bandwidth}};
    if (m.config.multifd_channels > 0)
        params["multifd-channels"] = m.config.multifd_channels;
    return Stream{params, "unix:" + tunnel_socket_};
}

asio::awaitable<Result<void>> PeerDestination::sync_disks() {
    if (!disks_)
        co_return Result<void>{};
    auto& m = run_.migration();
    // RAM and disks share one bucket: the migration's bandwidth covers both.
    bucket_ = run_.node().shaper().add(m.id, m.config.bandwidth_per_migration);
    SourceDisks::Link link{peer_address_, disk_token_, bucket_, [this] { return disk_token_again(); },
                           [this] { return keepalive(true); }};
    auto synced = co_await disks_->sync(std::move(link));
    if (!synced && synced.error().code == Errc::conflict)
        co_return synced; // the target said why it cannot go on
    if (!synced) {
        // The disk stream broke: the target may know why (its QEMU died).
        json ping{{"type", "ping"}};
        auto pong = co_await request(ping, 5s);
        auto failed = pong ? target_failure(*pong) : std::nullopt;
        if (failed)
            co_return *failed;
        if (!pong && synced.error().code != Errc::aborted)
            co_return make_error(Errc::disconnected, fmt::format("lost node {} while copying the disks ({}); it "
                                                                 "does not answer: {}",
                                                                 m.target_node, synced.error().message,
                                                                 pong.error().message));
        co_return synced;
    }
    disks_->keep_up();
    co_return Result<void>{};
}

asio::awaitable<Result<std::string>> PeerDestination::disk_token_again() {
    auto& m = run_.migration();
    json resume{{"type", "disk_resume"}};
    auto reply = co_await request_reconnecting(resume, 5s);
    if (!reply)
        co_return reply.error();
    auto token = reply->find("disk_token");
    if (reply->value("type", "") != "disk_resuming" || token == reply->end() || !token->is_string())
        co_return make_error(Errc::protocol, fmt::format("node {} answered disk_resume with {}", m.target_node,
                                                         reply->value("type", "?")));
    co_return ok(token->get<std::string>());
}

asio::awaitable<Result<void>> PeerDestination::check() {
    if (disks_) {
        disks_->refresh_progress();
        if (auto failed = disks_->failed(run_.migration().config.progress_timeout))
            co_return failed->wrap("disk mirror");
    }
    co_return co_await keepalive();
}

asio::awaitable<Result<void>> PeerDestination::before_continue() {
    if (!disks_)
        co_return Result<void>{};
    co_return co_await disks_->last_round();
}

Result<void> PeerDestination::listen_tunnels(const std::string& path) {
    boost::system::error_code ignored;
    if (tunnel_acceptor_) {
        // Its accept loop still holds it until it sees the close.
        tunnel_acceptor_->close(ignored);
        fs::remove(tunnel_socket_, ignored);
        retired_acceptors_.push_back(std::move(tunnel_acceptor_));
    }
    fs::remove(path, ignored);
    tunnel_socket_ = path;
    tunnel_acceptor_ = std::make_unique<asio::local::stream_protocol::acceptor>(run_.node().executor());
    boost::system::error_code ec;
    tunnel_acceptor_->open(asio::local::stream_protocol(), ec);
    if (!ec)
        tunnel_acceptor_->bind(asio::local::stream_protocol::endpoint(path), ec);
    if (!ec)
        tunnel_acceptor_->listen(16, ec);
    if (ec)
        return make_error(Errc::io, fmt::format("tunnel socket {}: {}", path, ec.message()));
    return {};
}

asio::awaitable<void> PeerDestination::accept_tunnels(std::shared_ptr<SourceRun> run, PeerDestination* self) {
    auto data_ex = transport::data_plane();
    auto& m = run->migration();
    for (std::size_t index = 0;; ++index) {
        auto [ec, conn] = co_await self->tunnel_acceptor_->async_accept(data_ex, nothrow);
        if (ec)
            co_return;
        if (index >= self->tokens_.size()) {
            self->tunnel_error_ = make_error(Errc::protocol, fmt::format("QEMU opened {} connections, the target expects {}",
                                                                         index + 1, self->tokens_.size()));
            run->wake_up();
            co_return;
        }
        // Opened one after the other, so the target sees QEMU's order.
        auto data = co_await transport::open_data(data_ex, self->peer_address_, m.target_node, self->tokens_[index],
                                                  run->node().tls());
        if (!data) {
            self->tunnel_error_ = data.error().wrap(fmt::format("data channel {}", index));
            run->wake_up();
            co_return;
        }
        asio::co_spawn(run->node().executor(), carry(run, self, std::move(conn), *data, index), asio::detached);
    }
}

// One connection of QEMU's, over its data channel.
asio::awaitable<void> PeerDestination::carry(std::shared_ptr<SourceRun> run, PeerDestination* self,
                                             asio::local::stream_protocol::socket qemu,
                                             std::shared_ptr<Channel> channel, std::size_t index) {
    // The preempt channel (the second, without multifd) carries only the
    // pages the running guest waits for: unshaped, so they never wait for
    // the bulk stream's tokens.
    bool urgent = preempt_enabled(run->migration().config) && index == 1;
    auto bucket = urgent ? nullptr : self->bucket_;
    if (urgent)
        engine_log()->info("migration {}: data channel {} carries post-copy's urgent pages (preempt)",
                           run->migration().id, index);
    auto r = co_await tunnel_on_data_plane(std::move(qemu), std::move(channel), bucket);
    if (!r && !self->tunnel_error_ && !run->switchover_started()) {
        self->tunnel_error_ = r.error().wrap(fmt::format("data channel {}", index));
        run->wake_up();
    }
}

asio::awaitable<Result<void>> PeerDestination::keepalive(bool redial) {
    auto& m = run_.migration();
    if (tunnel_error_) {
        // A data channel broke: the target may know why (its QEMU exited).
        auto why = co_await gone();
        if (why)
            co_return *why;
        co_return *tunnel_error_;
    }
    if (Clock::now() - last_ping_ < keepalive_interval(m.config))
        co_return Result<void>{};
    last_ping_ = Clock::now();
    if (!silent_since_)
        silent_since_ = last_ping_; // unanswered from now until a reply
    // While the answer is awaited, the progress says how long the target
    // has been silent (a frozen node is otherwise seen only after
    // peer_timeout).
    auto answer = co_await (ping(redial) || show_silence());
    auto pong = std::get<0>(std::move(answer));
    if (!pong) {
        note_silence();
        co_return pong.error().wrap(fmt::format("lost node {}", m.target_node));
    }
    silent_since_.reset();
    if (m.progress.peer_silent_ms > 0) {
        engine_log()->info("migration {}: node {} answers again after {:.1f} s", m.id, m.target_node,
                           static_cast<double>(m.progress.peer_silent_ms) / 1000.0);
        m.progress.peer_silent_ms = 0;
        run_.node().publish("progress", m.vm, m.id, json(m)["progress"]);
    }
    if (auto failed = target_failure(*pong))
        co_return *failed;
    co_return Result<void>{};
}

// Never throws: the silence beside it ends only when this does.
asio::awaitable<Result<json>> PeerDestination::ping(bool redial) {
    auto& m = run_.migration();
    json message{{"type", "ping"}};
    try {
        if (redial)
            co_return co_await request_reconnecting(message,
                                                    std::min<std::chrono::milliseconds>(peer_timeout(m.config), 5s));
        co_return co_await request(message, peer_timeout(m.config));
    } catch (const std::exception& e) {
        co_return make_error(Errc::protocol, fmt::format("node {}: pinging: {}", m.target_node, e.what()));
    }
}

// Runs beside a ping until its answer comes (which cancels it).
asio::awaitable<void> PeerDestination::show_silence() {
    asio::steady_timer tick(co_await asio::this_coro::executor);
    for (;;) {
        tick.expires_after(1s);
        co_await tick.async_wait(asio::use_awaitable);
        note_silence();
    }
}

void PeerDestination::note_silence() {
    auto& m = run_.migration();
    if (!silent_since_)
        return;
    auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - *silent_since_).count();
    if (silent < 1000)
        return;
    if (m.progress.peer_silent_ms == 0)
        engine_log()->warn("migration {}: node {} has not answered for {:.1f} s (given up after {} s)", m.id,
                           m.target_node, static_cast<double>(silent) / 1000.0, m.config.peer_timeout);
    m.progress.peer_silent_ms = silent;
    run_.node().publish("progress", m.vm, m.id, json(m)["progress"]);
}

void PeerDestination::abort_requested() {
    if (!prepare_abort_->control || prepare_abort_->sent)
        return;
    prepare_abort_->sent = true;
    auto& m = run_.migration();
    asio::co_spawn(run_.node().executor(),
                   abort_prepare(prepare_abort_, run_.node(), peer_address_, m.target_node, m.id), asio::detached);
}

asio::awaitable<void> PeerDestination::abort_prepare(std::shared_ptr<PrepareAbort> state, Node& node,
                                                     std::string address, std::string target, std::string id) {
    auto c = co_await transport::open_control(node.executor(), address, target, node.config().node.name, node.tls());
    if (c) {
        json abort{{"type", "abort"}, {"migration_id", id}};
        auto written = co_await (*c)->write_frame(abort);
        if (written) {
            auto reply = co_await (*c)->read_frame(30s);
            if (reply && reply->contains("during") && (*reply)["during"].is_string())
                state->during = (*reply)["during"].get<std::string>();
        }
        (*c)->close();
    } else {
        engine_log()->warn("migration {}: telling node {} of the abort: {}", id, target, c.error().message);
    }
    if (state->control) // the prepare still waits: it ends now
        state->control->close();
}

// What the target says of its side, asked at once (the source QEMU only
// saw its connection break): its QEMU exited, or it dropped the arrival.
asio::awaitable<std::optional<Error>> PeerDestination::gone() {
    if (!control_)
        co_return std::nullopt;
    json ping{{"type", "ping"}};
    auto pong = co_await request(ping, 5s);
    if (!pong)
        co_return std::nullopt;
    co_return target_failure(*pong);
}

std::optional<Error> PeerDestination::target_failure(const json& pong) const {
    auto& m = run_.migration();
    // conflict: the target answered, and cannot go on (not a lost link).
    if (auto failed = pong.find("failed"); failed != pong.end() && failed->is_string())
        return make_error(Errc::conflict, fmt::format("node {}: {}", m.target_node, failed->get<std::string>()));
    if (auto q = pong.value("qemu", "running"); q != "running")
        return make_error(Errc::conflict, fmt::format("node {}: the destination QEMU {}", m.target_node, q));
    return std::nullopt;
}

// The guest is paused now: like QEMU with its own max-bandwidth, lift the
// shaping so the last round does not stretch the downtime.
void PeerDestination::switching_over() {
    if (!bucket_)
        return;
    run_.node().shaper().remove(run_.migration().id);
    bucket_->set_rate(0, transport::ShaperClock::now());
}

asio::awaitable<Result<void>> PeerDestination::follow_postcopy(const std::string& status) {
    auto& m = run_.migration();
    if (status == "postcopy-active" && control_) {
        // Keeps the target's control channel from timing out over a long
        // post-copy; a dead channel is re-dialled when needed.
        auto alive = co_await keepalive();
        if (!alive) {
            engine_log()->debug("migration {}: post-copy keepalive: {}", m.id, alive.error().message);
            control_->close();
            control_.reset();
        }
    }
    if (status == "postcopy-active" && !postcopy_running_) {
        auto run = co_await start_postcopy();
        if (!run)
            engine_log()->warn("migration {}: starting the VM on {}: {} (retrying)", m.id, m.target_node,
                               run.error().message);
    }
    if (status != "postcopy-paused")
        co_return Result<void>{};
    co_return co_await retry_recovery();
}

asio::awaitable<Result<void>> PeerDestination::start_postcopy() {
    auto& m = run_.migration();
    if (!run_.source_was_running()) { // a paused VM stays paused until "finish" says otherwise
        postcopy_running_ = true;
        co_return Result<void>{};
    }
    json start{{"type", "start"}};
    auto started = co_await request_reconnecting(start, peer_timeout(m.config));
    if (!started)
        co_return started.error();
    postcopy_running_ = true;
    engine_log()->info("migration {}: post-copy: {} runs on {} while its memory follows", m.id, run_.vm().record.name,
                       m.target_node);
    co_return Result<void>{};
}

// A post-copy paused by a broken stream: recover it, or say why it cannot
// finish; a failed attempt is retried at the next poll.
asio::awaitable<Result<void>> PeerDestination::retry_recovery() {
    auto& m = run_.migration();
    auto recovered = co_await recover_postcopy();
    if (recovered)
        co_return Result<void>{};
    if (recovered.error().message.find(destination_gone) != std::string::npos) {
        // Nothing left to recover into. The source's copy is older than what
        // the destination ran: never resume it.
        run_.keep_source_paused();
        co_return make_error(Errc::disconnected,
                             fmt::format("post-copy to {} cannot finish, {}; the source QEMU is kept paused and must "
                                         "not be resumed (the guest ran on the destination since the switchover)",
                                         m.target_node, recovered.error().message));
    }
    engine_log()->warn("migration {}: post-copy recovery: {} (retrying in 2 s; the VM is kept on both nodes until it "
                       "completes)",
                       m.id, recovered.error().message);
    co_await sleep_for(2s);
    co_return Result<void>{};
}

asio::awaitable<Result<void>> PeerDestination::recover_postcopy() {
    auto& m = run_.migration();
    auto& node = run_.node();
    auto qmp = run_.vm().qemu.qmp;
    // Both QEMUs are paused in post-copy, each with half of the VM: get the
    // target listening again, then resume the stream through new channels.
    engine_log()->warn("migration {}: post-copy connection to {} lost; recovering", m.id, m.target_node);
    json recover{{"type", "recover"}};
    auto ready = co_await request_reconnecting(recover, peer_timeout(m.config));
    if (!ready)
        co_return ready.error();
    auto tokens = tokens_of(*ready, m.target_node);
    if (!tokens)
        co_return tokens.error();
    tokens_ = std::move(*tokens);
    ++recoveries_;
    auto listening = listen_tunnels(fmt::format("{}/tunnel-r{}.sock", node.vm_dir(run_.vm().record.name), recoveries_));
    if (!listening)
        co_return listening.error();
    asio::co_spawn(node.executor(), accept_tunnels(run_.shared_from_this(), this), asio::detached);
    json args{{"uri", "unix:" + tunnel_socket_}, {"resume", true}};
    auto resumed = co_await qmp->execute("migrate", args);
    if (!resumed)
        co_return resumed.error().wrap("resuming the post-copy stream");
    // Wait for QEMU to leave postcopy-paused, so the caller does not start
    // another recovery on top of this one.
    std::function<bool(const std::string&)> left = [](const std::string& s) { return s != "postcopy-paused"; };
    co_await wait_migration_status(*qmp, left);
    engine_log()->info("migration {}: post-copy resumed (recovery {})", m.id, recoveries_);
    co_return Result<void>{};
}

// The target resumes the VM on "finish".
asio::awaitable<Result<void>> PeerDestination::wait_resumed() { co_return Result<void>{}; }

json PeerDestination::finish_message() const {
    auto& info = run_.last_info();
    auto& vm = run_.vm();
    json finish{{"type", "finish"}, {"total_time_ms", info.value("total-time", 0)},
                {"downtime_ms", info.value("downtime", 0)}, {"resume", run_.source_was_running()}};
    if (vm.qemu.console) {
        auto beats = vm.qemu.console->heartbeat_list();
        if (!beats.empty())
            finish["last_heartbeat"] = {{"host_ms", beats.back().host_ms}, {"seq", beats.back().seq},
                                        {"interval_ms", beats.back().interval_ms}};
    }
    return finish;
}

asio::awaitable<Result<void>> PeerDestination::hand_off() {
    auto& m = run_.migration();
    auto& node = run_.node();
    auto vm = run_.vm_ptr();
    json finish = finish_message();
    // In post-copy the control channel may have been re-dialled (or must be);
    // the target answers a repeated finish for a VM it already runs.
    Result<json> done = make_error(Errc::internal, "unset");
    if (m.mode == "postcopy")
        done = co_await request_reconnecting(finish, 60s);
    else
        done = co_await request(finish, 60s);
    if (!done) {
        if (done.error().code == Errc::conflict) // the target answered: its QEMU did not resume
            co_return done.error().wrap("handing the VM over");
        // No answer: the target may or may not run the VM. Keep the source
        // paused so it never runs twice, and ask the target until it says.
        run_.keep_source_paused();
        run_.outcome_unknown();
        co_return make_error(Errc::disconnected,
                             fmt::format("handing the VM over: {}; whether {} runs on {} is not known: the source "
                                         "is kept paused and {} is asked until it answers",
                                         done.error().message, m.vm, m.target_node, m.target_node));
    }
    auto& info = run_.last_info();
    m.result.total_time_ms = info.value("total-time", std::int64_t{0});
    m.result.downtime_ms = info.value("downtime", std::int64_t{0});
    if (done->contains("guest_blackout_ms") && (*done)["guest_blackout_ms"].is_number_integer())
        m.result.guest_blackout_ms = (*done)["guest_blackout_ms"].get<std::int64_t>();
    // The target's activated hooks that failed: reported here too.
    if (auto w = done->find("warnings"); w != done->end() && w->is_array())
        for (auto& text : *w)
            if (text.is_string())
                m.warnings.push_back(text.get<std::string>());

    // The VM lives on the target now: stop the source, forget it here.
    vm->qemu.qmp->unsubscribe(run_.source_subscription());
    vm->deleting = true;
    node.forget_vm(vm->record.name);
    co_await destroy_qemu(node.executor(), vm->qemu);
    std::error_code ec;
    fs::remove_all(node.vm_dir(vm->record.name), ec);
    co_return Result<void>{};
}

void PeerDestination::log_success() const {
    auto& m = run_.migration();
    engine_log()->info("migration {}: {} now runs on {}", m.id, run_.vm().record.name, m.target_node);
}

asio::awaitable<void> PeerDestination::release(bool failed) {
    if (disks_)
        co_await disks_->stop();
    if (bucket_)
        run_.node().shaper().remove(run_.migration().id);
    if (tunnel_acceptor_) {
        boost::system::error_code ec;
        tunnel_acceptor_->close(ec);
        fs::remove(tunnel_socket_, ec);
    }
    if (failed && control_ && !run_.switchover_started()) {
        json abort{{"type", "abort"}};
        co_await control_->write_frame(abort);
    }
}

// Nothing runs on this node: the target drops its QEMU on "abort" or when
// the control channel closes.
asio::awaitable<void> PeerDestination::discard() { co_return; }

void PeerDestination::close() {
    if (control_)
        control_->close();
}

} // namespace ferry::engine
