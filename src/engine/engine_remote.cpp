// Cross-node migration over ferry's peer transport. The source drives; the
// target prepares a destination QEMU, admits the data channels in the order
// QEMU opened them, and resumes the VM only when the source says "finish".
#include "engine/engine.hpp"

#include "engine/engine_internal.hpp"
#include "engine/process.hpp"
#include "transport/data_plane.hpp"
#include "transport/tunnel.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>

#include <filesystem>

namespace ferry::engine {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using transport::Channel;

namespace {

constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);
// A ping every peer_timeout / 6 (5 s by default); silence for peer_timeout
// ([migration] peer_timeout, 30 s by default) means the peer is dead.
std::chrono::milliseconds keepalive_interval(const config::MigrationConfig& c) {
    return std::chrono::milliseconds(c.peer_timeout * 1000 / 6);
}
std::chrono::milliseconds peer_timeout(const config::MigrationConfig& c) {
    return std::chrono::seconds(c.peer_timeout);
}

json error_message(const std::string& why) { return {{"type", "error"}, {"message", why}}; }

} // namespace

namespace {
// The data-channel tokens a target hands out (target_ready, recovering).
Result<std::vector<std::string>> tokens_of(const json& reply, const std::string& node) {
    auto tokens = reply.find("tokens");
    if (tokens == reply.end() || !tokens->is_array() ||
        !std::all_of(tokens->begin(), tokens->end(), [](const json& t) { return t.is_string(); }))
        return make_error(Errc::protocol, fmt::format("node {} answered without data-channel tokens", node));
    return tokens->get<std::vector<std::string>>();
}
} // namespace

const config::Peer* Engine::peer(const std::string& name) const {
    for (auto& p : config_.peers)
        if (p.name == name)
            return &p;
    return nullptr;
}

Result<void> Engine::start_peer_endpoint() {
    if (config_.node.listen.empty())
        return {};
    if (!config_.migration.disable_tls) {
        if (config_.tls.ca.empty() && config_.tls.cert.empty() && config_.tls.key.empty()) {
            engine_log()->info("no [tls] configured: cross-node migration is off (ferryctl pki init makes "
                               "the files; or set [migration] disable_tls = true)");
            return {};
        }
        auto id = transport::TlsIdentity::load({config_.tls.ca, config_.tls.cert, config_.tls.key}, config_.node.name);
        if (!id)
            return id.error();
        tls_ = *id;
    }
    std::set<std::string> names;
    for (auto& p : config_.peers)
        names.insert(p.name);
    // Peer connections live on the data plane, so that data channels are
    // tunnelled there; control channels are served from here.
    peer_server_ = std::make_unique<transport::PeerServer>(ex_, config_.node.listen, tls_, config_.node.name, names,
                                                           transport::data_plane());
    Engine* self = this;
    peer_server_->on_control([self](std::shared_ptr<Channel> c) {
        asio::co_spawn(self->ex_, serve_peer(self, std::move(c)), asio::detached);
    });
    peer_server_->on_data([self](transport::TokenGrant grant, std::shared_ptr<Channel> c) {
        auto it = self->incoming_.find(grant.migration);
        if (it == self->incoming_.end()) {
            c->close();
            return;
        }
        asio::co_spawn(self->ex_, deliver(it->second, grant.index, std::move(c)), asio::detached);
    });
    shaper_.set_cap(config_.node.max_migration_bandwidth);
    return peer_server_->start();
}

namespace {
// Runs a tunnel on the data plane (which owns both sockets) and resumes the
// caller on its own executor with the outcome.
asio::awaitable<Result<transport::TunnelStats>> tunnel_on_data_plane(asio::local::stream_protocol::socket qemu,
                                                                      std::shared_ptr<Channel> channel,
                                                                      std::shared_ptr<transport::TokenBucket> bucket) {
    auto task = transport::run_tunnel(std::move(qemu), std::move(channel), std::move(bucket));
    auto r = co_await asio::co_spawn(transport::data_plane(), std::move(task), asio::use_awaitable);
    co_return r;
}
} // namespace

// --- source side -------------------------------------------------------------

asio::awaitable<Result<json>> Engine::request(MigrationState& st, json message, std::chrono::milliseconds timeout) {
    if (!st.control)
        co_return make_error(Errc::disconnected, "no control channel");
    auto w = co_await st.control->write_frame(message);
    if (!w)
        co_return w.error().wrap(fmt::format("node {}", st.m.target_node));
    auto reply = co_await st.control->read_frame(timeout);
    if (!reply)
        co_return reply.error().wrap(fmt::format("node {}", st.m.target_node));
    if (reply->value("type", "") == "error")
        co_return make_error(Errc::conflict, fmt::format("node {}: {}", st.m.target_node, reply->value("message", "?")));
    co_return reply;
}

asio::awaitable<void> Engine::release_remote(MigrationState& st, bool failed) {
    if (st.bucket)
        shaper_.remove(st.m.id);
    if (st.tunnel_acceptor) {
        boost::system::error_code ec;
        st.tunnel_acceptor->close(ec);
        fs::remove(st.tunnel_socket, ec);
    }
    if (failed && st.control && !st.switchover_started) {
        json abort{{"type", "abort"}};
        co_await st.control->write_frame(abort);
    }
}

asio::awaitable<Result<void>> Engine::prepare_remote_target(MigrationState& st) {
    set_phase(st, Phase::PreparingTarget);
    auto c = co_await transport::open_control(ex_, st.peer_address, st.m.target_node, config_.node.name, tls_);
    if (!c)
        co_return c.error().wrap("preparing the destination");
    st.control = *c;
    json prepare{{"type", "prepare"},
                 {"migration", st.m},
                 {"spec", *st.vm->record.spec},
                 {"channels", migration_channels(st.m.config)}};
    auto ready = co_await request(st, prepare, 120s);
    if (!ready)
        co_return ready.error().wrap("preparing the destination");
    if (ready->value("type", "") != "target_ready")
        co_return make_error(Errc::protocol, fmt::format("node {} answered prepare with {}", st.m.target_node,
                                                         ready->value("type", "?")));
    auto tokens = tokens_of(*ready, st.m.target_node);
    if (!tokens)
        co_return tokens.error();
    st.tokens = std::move(*tokens);
    // A target that does not say it set up the preempt channel (a ferryd
    // from before it existed) gets a migration without one.
    auto preempt = ready->find("preempt");
    bool target_preempts = preempt != ready->end() && preempt->is_boolean() && preempt->get<bool>();
    if (preempt_enabled(st.m.config) && !target_preempts) {
        st.m.config.postcopy_preempt = false;
        engine_log()->info("migration {}: node {} does not take post-copy's preempt channel; migrating without it",
                           st.m.id, st.m.target_node);
    }
    st.last_ping = Clock::now();
    set_phase(st, Phase::TargetReady);
    co_return Result<void>{};
}

asio::awaitable<Result<void>> Engine::start_remote_source(MigrationState& st) {
    auto begun = co_await begin_source(st);
    if (!begun)
        co_return begun;
    // QEMU sends to our socket; each connection it opens gets its own data
    // channel, in order.
    auto listening = listen_tunnels(st, vm_dir(st.vm->record.name) + "/tunnel.sock");
    if (!listening)
        co_return listening.error();
    st.bucket = shaper_.add(st.m.id, st.m.config.bandwidth_per_migration);
    asio::co_spawn(ex_, accept_tunnels(this, migrations_[st.m.id]), asio::detached);

    // Shaping happens in ferry's channel, so QEMU itself is not limited.
    json params{{"max-bandwidth", unlimited_bandwidth}};
    if (st.m.config.multifd_channels > 0)
        params["multifd-channels"] = st.m.config.multifd_channels;
    co_return co_await send_migration(st, params, "unix:" + st.tunnel_socket);
}

Result<void> Engine::listen_tunnels(MigrationState& st, const std::string& path) {
    boost::system::error_code ignored;
    if (st.tunnel_acceptor) {
        // Its accept loop still holds it until it sees the close.
        st.tunnel_acceptor->close(ignored);
        fs::remove(st.tunnel_socket, ignored);
        st.retired_acceptors.push_back(std::move(st.tunnel_acceptor));
    }
    fs::remove(path, ignored);
    st.tunnel_socket = path;
    st.tunnel_acceptor = std::make_unique<asio::local::stream_protocol::acceptor>(ex_);
    boost::system::error_code ec;
    st.tunnel_acceptor->open(asio::local::stream_protocol(), ec);
    if (!ec)
        st.tunnel_acceptor->bind(asio::local::stream_protocol::endpoint(path), ec);
    if (!ec)
        st.tunnel_acceptor->listen(16, ec);
    if (ec)
        return make_error(Errc::io, fmt::format("tunnel socket {}: {}", path, ec.message()));
    return {};
}

asio::awaitable<void> Engine::accept_tunnels(Engine* self, std::shared_ptr<MigrationState> st) {
    auto data_ex = transport::data_plane();
    for (std::size_t index = 0;; ++index) {
        auto [ec, conn] = co_await st->tunnel_acceptor->async_accept(data_ex, nothrow);
        if (ec)
            co_return;
        if (index >= st->tokens.size()) {
            st->tunnel_error = make_error(Errc::protocol, fmt::format("QEMU opened {} connections, the target expects {}",
                                                                       index + 1, st->tokens.size()));
            st->wake_up();
            co_return;
        }
        // Opened one after the other, so the target sees QEMU's order.
        auto data = co_await transport::open_data(data_ex, st->peer_address, st->m.target_node, st->tokens[index], self->tls_);
        if (!data) {
            st->tunnel_error = data.error().wrap(fmt::format("data channel {}", index));
            st->wake_up();
            co_return;
        }
        asio::co_spawn(
            self->ex_,
            [](std::shared_ptr<MigrationState> s, asio::local::stream_protocol::socket q,
               std::shared_ptr<Channel> c, std::size_t i) -> asio::awaitable<void> {
                // The preempt channel (the second, without multifd) carries
                // only the pages the running guest waits for: unshaped, so
                // they never wait for the bulk stream's tokens.
                bool urgent = preempt_enabled(s->m.config) && i == 1;
                auto bucket = urgent ? nullptr : s->bucket;
                if (urgent)
                    engine_log()->info("migration {}: data channel {} carries post-copy's urgent pages (preempt)",
                                       s->m.id, i);
                auto r = co_await tunnel_on_data_plane(std::move(q), std::move(c), bucket);
                if (!r && !s->tunnel_error && !s->switchover_started) {
                    s->tunnel_error = r.error().wrap(fmt::format("data channel {}", i));
                    s->wake_up();
                }
            }(st, std::move(conn), *data, index),
            asio::detached);
    }
}

asio::awaitable<Result<json>> Engine::request_reconnecting(MigrationState& st, json message,
                                                           std::chrono::milliseconds timeout) {
    message["migration_id"] = st.m.id;
    Result<json> reply = make_error(Errc::disconnected, "no control channel");
    if (st.control)
        reply = co_await request(st, message, timeout);
    if (reply || reply.error().code == Errc::conflict) // answered (perhaps with an error)
        co_return reply;
    if (st.control)
        st.control->close();
    st.control.reset();
    auto c = co_await transport::open_control(ex_, st.peer_address, st.m.target_node, config_.node.name, tls_);
    if (!c)
        co_return c.error().wrap(fmt::format("reconnecting to node {}", st.m.target_node));
    st.control = *c;
    engine_log()->info("migration {}: control channel to {} re-established", st.m.id, st.m.target_node);
    co_return co_await request(st, message, timeout);
}

asio::awaitable<Result<void>> Engine::start_remote_postcopy(MigrationState& st) {
    if (!st.source_was_running) { // a paused VM stays paused until "finish" says otherwise
        st.postcopy_running = true;
        co_return Result<void>{};
    }
    json start{{"type", "start"}};
    auto started = co_await request_reconnecting(st, start, peer_timeout(st.m.config));
    if (!started)
        co_return started.error();
    st.postcopy_running = true;
    engine_log()->info("migration {}: post-copy: {} runs on {} while its memory follows", st.m.id, st.vm->record.name,
                       st.m.target_node);
    co_return Result<void>{};
}

asio::awaitable<Result<void>> Engine::recover_postcopy(MigrationState& st) {
    // Both QEMUs are paused in post-copy, each with half of the VM: get the
    // target listening again, then resume the stream through new channels.
    engine_log()->warn("migration {}: post-copy connection to {} lost; recovering", st.m.id, st.m.target_node);
    json recover{{"type", "recover"}};
    auto ready = co_await request_reconnecting(st, recover, peer_timeout(st.m.config));
    if (!ready)
        co_return ready.error();
    auto tokens = tokens_of(*ready, st.m.target_node);
    if (!tokens)
        co_return tokens.error();
    st.tokens = std::move(*tokens);
    ++st.recoveries;
    auto listening = listen_tunnels(st, fmt::format("{}/tunnel-r{}.sock", vm_dir(st.vm->record.name), st.recoveries));
    if (!listening)
        co_return listening.error();
    asio::co_spawn(ex_, accept_tunnels(this, migrations_[st.m.id]), asio::detached);
    json args{{"uri", "unix:" + st.tunnel_socket}, {"resume", true}};
    auto resumed = co_await st.vm->qemu.qmp->execute("migrate", args);
    if (!resumed)
        co_return resumed.error().wrap("resuming the post-copy stream");
    // Wait for QEMU to leave postcopy-paused, so the caller does not start
    // another recovery on top of this one.
    std::function<bool(const std::string&)> left = [](const std::string& s) { return s != "postcopy-paused"; };
    co_await wait_migration_status(*st.vm->qemu.qmp, left);
    engine_log()->info("migration {}: post-copy resumed (recovery {})", st.m.id, st.recoveries);
    co_return Result<void>{};
}

asio::awaitable<Result<void>> Engine::keepalive(MigrationState& st) {
    if (st.tunnel_error)
        co_return *st.tunnel_error;
    if (Clock::now() - st.last_ping < keepalive_interval(st.m.config))
        co_return Result<void>{};
    st.last_ping = Clock::now();
    json ping{{"type", "ping"}};
    auto pong = co_await request(st, ping, peer_timeout(st.m.config));
    if (!pong)
        co_return pong.error().wrap(fmt::format("lost node {}", st.m.target_node));
    if (pong->value("qemu", "running") != "running")
        co_return make_error(Errc::disconnected, fmt::format("node {}: the destination QEMU {}", st.m.target_node,
                                                             pong->value("qemu", "?")));
    co_return Result<void>{};
}

asio::awaitable<Result<void>> Engine::remote_hand_off(MigrationState& st) {
    auto vm = st.vm;
    json finish{{"type", "finish"}, {"total_time_ms", st.last_info.value("total-time", 0)},
                {"downtime_ms", st.last_info.value("downtime", 0)}, {"resume", st.source_was_running}};
    if (vm->qemu.console) {
        auto beats = vm->qemu.console->heartbeat_list();
        if (!beats.empty())
            finish["last_heartbeat"] = {{"host_ms", beats.back().host_ms}, {"seq", beats.back().seq},
                                        {"interval_ms", beats.back().interval_ms}};
    }
    // In post-copy the control channel may have been re-dialled (or must be);
    // the target answers a repeated finish for a VM it already runs.
    Result<json> done = make_error(Errc::internal, "unset");
    if (st.m.mode == "postcopy")
        done = co_await request_reconnecting(st, finish, 60s);
    else
        done = co_await request(st, finish, 60s);
    if (!done) {
        if (done.error().code == Errc::conflict) // the target answered: its QEMU did not resume
            co_return done.error().wrap("handing the VM over");
        // No answer: the target may or may not run the VM. Keep the source
        // paused so it never runs twice.
        st.source_was_running = false;
        co_return make_error(Errc::disconnected,
                             fmt::format("handing the VM over: {}; the outcome is unknown, so the source was "
                                         "kept paused (check node {} before resuming it)",
                                         done.error().message, st.m.target_node));
    }
    st.m.result.total_time_ms = st.last_info.value("total-time", std::int64_t{0});
    st.m.result.downtime_ms = st.last_info.value("downtime", std::int64_t{0});
    if (done->contains("guest_blackout_ms") && (*done)["guest_blackout_ms"].is_number_integer())
        st.m.result.guest_blackout_ms = (*done)["guest_blackout_ms"].get<std::int64_t>();

    // The VM lives on the target now: stop the source, forget it here.
    vm->qemu.qmp->unsubscribe(st.source_subscription);
    vm->deleting = true;
    vms_.erase(vm->record.name);
    co_await destroy_qemu(ex_, vm->qemu);
    std::error_code ec;
    fs::remove_all(vm_dir(vm->record.name), ec);
    st.m.ended_at = now_string();
    vm->migration_id.reset();
    set_phase(st, Phase::Succeeded);
    engine_log()->info("migration {}: {} now runs on {}", st.m.id, vm->record.name, st.m.target_node);
    co_return Result<void>{};
}

// --- target side -------------------------------------------------------------

asio::awaitable<void> Engine::serve_peer(Engine* self, std::shared_ptr<Channel> channel) {
    std::shared_ptr<Incoming> in;
    for (;;) {
        // Before a prepare, our own setting; after it, the source's.
        auto timeout = peer_timeout(in ? in->m.config : self->config_.migration);
        auto msg = co_await channel->read_frame(timeout);
        if (!msg) {
            if (in && in->m.mode == "postcopy" && !in->finished) {
                // The VM runs here but part of its memory is still on the
                // source: keep it (post-copy paused) for the source to recover.
                engine_log()->warn("migration {}: control channel from {} lost during post-copy: {}; keeping {} for "
                                   "the source to recover",
                                   in->m.id, channel->peer_node, msg.error().message, in->spec.name);
            } else if (in && !in->finished) {
                co_await self->drop_incoming(in, fmt::format("control channel from {} lost: {}", channel->peer_node,
                                                             msg.error().message));
            }
            co_return;
        }
        auto type = msg->value("type", "");
        // A source that lost its control channel dials again and names the
        // migration it is continuing.
        bool already_finished = false;
        if (auto mid = msg->find("migration_id"); !in && mid != msg->end() && mid->is_string() && type != "prepare") {
            auto id = mid->get<std::string>();
            auto it = self->incoming_.find(id);
            if (it != self->incoming_.end() && it->second->source_node == channel->peer_node)
                in = it->second;
            auto done = self->migrations_.find(id);
            already_finished = !in && done != self->migrations_.end() && done->second->m.phase == Phase::Succeeded &&
                               done->second->m.source_node == channel->peer_node;
        }
        json reply;
        if (type == "finish" && already_finished) {
            // The answer to an earlier finish was lost with the connection.
            reply = {{"type", "finished"}, {"guest_blackout_ms", nullptr}};
        } else if (type == "prepare" && !in) {
            reply = co_await self->handle_prepare(in, *msg, channel);
        } else if (type == "ping") {
            reply = {{"type", "pong"}};
            if (in)
                reply["qemu"] = in->qemu.qmp && in->qemu.qmp->connected() && process_alive(in->qemu.pid)
                                    ? "running"
                                    : fmt::format("exited: {}", log_tail(in->qemu.log_path()));
        } else if (type == "finish" && in) {
            reply = co_await self->handle_finish(*in, *msg);
        } else if (type == "start" && in) {
            reply = co_await self->handle_start(*in);
        } else if (type == "recover" && in) {
            reply = co_await self->handle_recover(*in);
        } else if (type == "abort") {
            if (in && !in->finished)
                co_await self->drop_incoming(in, "aborted by the source");
            json bye{{"type", "aborted"}};
            co_await channel->write_frame(bye);
            channel->close();
            co_return;
        } else {
            reply = error_message(fmt::format("unexpected '{}'", type));
        }
        auto w = co_await channel->write_frame(reply);
        if (type == "recover" && in && !in->finished && reply.value("message", "").find(destination_gone) == 0) {
            co_await self->drop_incoming(in, reply.value("message", ""));
            co_return;
        }
        if (!w || (in && in->finished)) {
            if (in && !in->finished && in->m.mode != "postcopy")
                co_await self->drop_incoming(in, "control channel lost");
            co_return;
        }
        if (reply.value("type", "") == "error" && type == "prepare")
            co_return;
    }
}

asio::awaitable<json> Engine::handle_prepare(std::shared_ptr<Incoming>& in, const json& msg,
                                             std::shared_ptr<Channel> channel) {
    auto next = std::make_shared<Incoming>(ex_);
    try {
        next->m = msg.at("migration").get<Migration>();
        next->spec = msg.at("spec").get<config::VmSpec>();
        next->channels = msg.at("channels").get<int>();
    } catch (const std::exception& e) {
        co_return error_message(fmt::format("bad prepare: {}", e.what()));
    }
    // A peer is authenticated, not infallible: its spec gets the checks a
    // local one gets before any QEMU starts from it.
    if (auto valid = config::validate_vm_spec(next->spec); !valid)
        co_return error_message(fmt::format("bad prepare: {}", valid.error().message));
    // The id names a file under state_dir: "<vm>-<suffix>", nothing else.
    auto& id = next->m.id;
    bool id_ok = id.size() > next->spec.name.size() + 1 && id.rfind(next->spec.name + "-", 0) == 0 &&
                 config::valid_vm_name(id.substr(next->spec.name.size() + 1)) && id.size() <= 100;
    if (next->m.vm != next->spec.name || !id_ok)
        co_return error_message(fmt::format("bad prepare: migration '{}' of VM '{}' does not match spec {}", id,
                                            next->m.vm, next->spec.name));
    if (migrations_.count(id))
        co_return error_message(fmt::format("bad prepare: migration {} is known here already", id));
    if (next->spec.name.size() > config::max_vm_name_length(config_.node.state_dir))
        co_return error_message(fmt::format("VM name {} is too long for {}'s state_dir", next->spec.name,
                                            config_.node.name));
    next->source_node = channel->peer_node;
    auto& name = next->spec.name;
    if (next->m.config.multifd_channels < 0 || next->m.config.multifd_channels > 255)
        co_return error_message(fmt::format("bad prepare: multifd_channels {} (0..255)", next->m.config.multifd_channels));
    if (next->channels != migration_channels(next->m.config))
        co_return error_message(fmt::format("bad prepare: {} data channels for a migration that opens {}",
                                            next->channels, migration_channels(next->m.config)));
    if (vms_.count(name))
        co_return error_message(fmt::format("a VM named {} already exists on {}", name, config_.node.name));
    for (auto& [id, other] : incoming_)
        if (other->spec.name == name)
            co_return error_message(fmt::format("VM {} is already arriving on {} ({})", name, config_.node.name, id));
    if (next->spec.kernel && !fs::is_regular_file(*next->spec.kernel))
        co_return error_message(fmt::format("kernel {} does not exist on {}", *next->spec.kernel, config_.node.name));
    for (auto& d : next->spec.disks)
        if (!fs::exists(d.path))
            co_return error_message(fmt::format("disk {} does not exist on {} (disks must be on shared storage)",
                                                 d.path, config_.node.name));
    incoming_[next->m.id] = next; // reserve the name
    std::error_code ec;
    fs::create_directories(vm_dir(name), ec);
    LaunchRequest req{&config_.node, &next->spec, vm_dir(name), 1, true, true};
    auto q = co_await launch_qemu(ex_, req);
    if (!q) {
        incoming_.erase(next->m.id);
        fs::remove_all(vm_dir(name), ec);
        co_return error_message(fmt::format("starting the destination QEMU: {}", q.error().message));
    }
    next->qemu = std::move(*q);
    json caps_args{{"capabilities", migration_capabilities(next->m.config.multifd_channels > 0,
                                                           postcopy_enabled(next->m.config),
                                                           preempt_enabled(next->m.config))}};
    auto caps = co_await next->qemu.qmp->execute("migrate-set-capabilities", caps_args);
    Result<json> set = ok(json::object());
    if (caps && next->m.config.multifd_channels > 0) {
        json params{{"multifd-channels", next->m.config.multifd_channels}};
        set = co_await next->qemu.qmp->execute("migrate-set-parameters", params);
    }
    next->listen_socket = next->qemu.migrate_socket();
    json incoming_args{{"uri", "unix:" + next->listen_socket}};
    // No co_await inside a conditional expression: GCC 12 miscompiles it.
    Result<json> listening = caps ? (set ? ok(json::object()) : Result<json>(set.error())) : Result<json>(caps.error());
    if (listening)
        listening = co_await next->qemu.qmp->execute("migrate-incoming", incoming_args);
    if (!listening) {
        co_await drop_incoming(next, listening.error().message);
        co_return error_message(fmt::format("preparing the destination QEMU: {}", listening.error().message));
    }
    // Our own record of the arrival: visible here, and cleaned up by a
    // restarted ferryd if we die before the hand-off.
    next->m.phase = Phase::Running;
    next->m.target_pid = next->qemu.pid;
    next->m.target_dir = next->qemu.run_dir;
    auto record = std::make_shared<MigrationState>(ex_);
    record->m = next->m;
    migrations_[next->m.id] = record;
    persist(next->m);
    json tokens = json::array();
    for (int i = 0; i < next->channels; ++i)
        tokens.push_back(peer_server_->tokens().issue(next->m.id, i));
    in = next;
    engine_log()->info("migration {}: receiving {} from {}", in->m.id, name, in->source_node);
    json ready{{"type", "target_ready"}, {"tokens", tokens}, {"preempt", preempt_enabled(in->m.config)}};
    co_return ready;
}

asio::awaitable<void> Engine::deliver(std::shared_ptr<Incoming> in, int index,
                                      std::shared_ptr<Channel> channel) {
    // QEMU tells its channels apart partly by accept order: connect them to
    // the destination in the order the source QEMU opened them.
    auto deadline = Clock::now() + 30s;
    while (in->next_index != index && Clock::now() < deadline && !in->finished) {
        in->order.expires_after(5ms);
        co_await in->order.async_wait(nothrow);
    }
    asio::local::stream_protocol::socket qemu(transport::data_plane());
    auto [ec] = co_await qemu.async_connect(asio::local::stream_protocol::endpoint(in->listen_socket), nothrow);
    in->next_index = std::max(in->next_index, index + 1);
    if (ec) {
        engine_log()->warn("migration {}: data channel {}: destination QEMU: {}", in->m.id, index, ec.message());
        channel->close();
        co_return;
    }
    auto r = co_await tunnel_on_data_plane(std::move(qemu), channel, nullptr);
    if (!r)
        engine_log()->debug("migration {}: data channel {} ended: {}", in->m.id, index, r.error().message);
}

asio::awaitable<json> Engine::handle_finish(Incoming& in, const json& msg) {
    // The stream is complete on the source; wait until QEMU has loaded it.
    auto deadline = Clock::now() + 60s;
    std::string status;
    for (;;) {
        auto s = co_await in.qemu.qmp->execute("query-status");
        status = s ? (*s).value("status", "") : s.error().message;
        if (status == "paused" || status == "postmigrate" || status == "running")
            break;
        if (!s || Clock::now() > deadline)
            co_return error_message(fmt::format("the destination did not load the VM (state {}): {}", status,
                                                log_tail(in.qemu.log_path())));
        co_await sleep_for(5ms);
    }
    // A VM that was paused on the source stays paused here.
    bool resume = msg.value("resume", true);
    if (resume) {
        auto cont = co_await in.qemu.qmp->execute("cont");
        if (!cont)
            co_return error_message(fmt::format("resuming the destination: {}", cont.error().message));
    }
    auto vm = std::make_shared<Vm>();
    vm->record.name = in.spec.name;
    vm->record.node = config_.node.name;
    vm->record.spec = in.spec;
    vm->record.created_at = now_string();
    vm->qemu = std::move(in.qemu);
    vm->record.pid = vm->qemu.pid;
    vm->record.generation = vm->qemu.generation;
    vm->record.run_dir = vm->qemu.run_dir;
    vm->record.qmp_socket = vm->qemu.qmp_socket;
    vm->status = resume ? "running" : "paused";
    vms_[vm->record.name] = vm;
    attach(vm);
    persist(*vm);
    in.finished = true;
    incoming_.erase(in.m.id);
    peer_server_->tokens().revoke(in.m.id);

    json reply{{"type", "finished"}, {"guest_blackout_ms", nullptr}};
    auto hb = msg.find("last_heartbeat");
    // Numbers from the peer, bounded before they size a wait.
    auto number = [&](const char* key, std::uint64_t max) {
        return hb->is_object() && hb->contains(key) && (*hb)[key].is_number_unsigned() &&
               (*hb)[key].get<std::uint64_t>() <= max;
    };
    if (resume && hb != msg.end() && number("host_ms", std::uint64_t{1} << 62) && number("seq", std::uint64_t{1} << 62) &&
        number("interval_ms", 10'000)) {
        std::vector<Heartbeat> src{{(*hb)["host_ms"].get<std::int64_t>(), (*hb)["seq"].get<std::uint64_t>(),
                                    (*hb)["interval_ms"].get<std::uint32_t>()}};
        auto until = Clock::now() + 3 * std::chrono::milliseconds(src[0].interval_ms) + 2s;
        while (Clock::now() < until) {
            if (auto b = guest_blackout_ms(src, vm->qemu.console->heartbeat_list())) {
                reply["guest_blackout_ms"] = *b;
                break;
            }
            co_await sleep_for(10ms);
        }
    }
    if (auto it = migrations_.find(in.m.id); it != migrations_.end()) {
        auto& record = it->second->m;
        record.phase = Phase::Succeeded;
        record.ended_at = now_string();
        record.target_pid = -1;
        record.target_dir.clear();
        if (!reply["guest_blackout_ms"].is_null())
            record.result.guest_blackout_ms = reply["guest_blackout_ms"].get<std::int64_t>();
        record.result.total_time_ms = msg.value("total_time_ms", std::int64_t{0});
        record.result.downtime_ms = msg.value("downtime_ms", std::int64_t{0});
        persist(record);
    }
    engine_log()->info("migration {}: {} arrived from {} and runs here", in.m.id, in.spec.name, in.source_node);
    co_return reply;
}

asio::awaitable<json> Engine::handle_start(Incoming& in) {
    // Post-copy: the source has stopped and sent the device state; the VM
    // runs here from now on and pulls missing pages from the source. (cont
    // before QEMU has loaded the device state just marks it to start then.)
    in.m.mode = "postcopy"; // from now on a lost control channel does not drop it
    if (auto it = migrations_.find(in.m.id); it != migrations_.end()) {
        it->second->m.mode = "postcopy";
        persist(it->second->m);
    }
    auto cont = co_await in.qemu.qmp->execute("cont");
    if (!cont)
        co_return error_message(fmt::format("starting the VM in post-copy: {}", cont.error().message));
    engine_log()->info("migration {}: {} runs here in post-copy", in.m.id, in.spec.name);
    json reply{{"type", "started"}};
    co_return reply;
}

asio::awaitable<json> Engine::handle_recover(Incoming& in) {
    if (!in.qemu.qmp || !in.qemu.qmp->connected() || !process_alive(in.qemu.pid))
        co_return error_message(fmt::format("{}: {}", destination_gone, log_tail(in.qemu.log_path())));
    // QEMU notices the broken stream on its own; give it a moment.
    std::function<bool(const std::string&)> paused = [](const std::string& s) { return s == "postcopy-paused"; };
    auto status = co_await wait_migration_status(*in.qemu.qmp, paused);
    if (status != "postcopy-paused")
        co_return error_message(fmt::format("cannot recover: the destination's migration is '{}', not postcopy-paused",
                                            status));
    ++in.recoveries;
    in.listen_socket = fmt::format("{}/migrate-r{}.sock", in.qemu.run_dir, in.recoveries);
    std::error_code ec;
    fs::remove(in.listen_socket, ec);
    json args{{"uri", "unix:" + in.listen_socket}};
    auto listening = co_await in.qemu.qmp->execute("migrate-recover", args);
    if (!listening)
        co_return error_message(fmt::format("migrate-recover: {}", listening.error().message));
    peer_server_->tokens().revoke(in.m.id);
    in.next_index = 0;
    json tokens = json::array();
    for (int i = 0; i < migration_channels(in.m.config); ++i) // the main channel, and preempt's
        tokens.push_back(peer_server_->tokens().issue(in.m.id, i));
    engine_log()->info("migration {}: post-copy recovery {}: listening again", in.m.id, in.recoveries);
    json reply{{"type", "recovering"}, {"tokens", tokens}};
    co_return reply;
}

asio::awaitable<void> Engine::drop_incoming(std::shared_ptr<Incoming> in, const std::string& why) {
    engine_log()->warn("migration {}: dropping the incoming {}: {}", in->m.id, in->spec.name, why);
    in->finished = true;
    if (peer_server_)
        peer_server_->tokens().revoke(in->m.id);
    incoming_.erase(in->m.id);
    if (auto it = migrations_.find(in->m.id); it != migrations_.end()) {
        auto& record = it->second->m;
        record.phase = Phase::Failed;
        record.failure_reason = why;
        record.ended_at = now_string();
        record.target_pid = -1;
        record.target_dir.clear();
        persist(record);
    }
    co_await destroy_qemu(ex_, in->qemu);
    if (!vms_.count(in->spec.name)) {
        std::error_code ec;
        fs::remove_all(vm_dir(in->spec.name), ec);
    }
}

} // namespace ferry::engine
