// The peer endpoint: control channels from peers that migrate VMs here, and
// the data channels their tokens admit. Each arriving migration is a
// TargetRun; serve_peer hands it the source's messages.
#include "engine/engine.hpp"

#include "engine/async.hpp"
#include "engine/target_run.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <fmt/format.h>

#include <set>

namespace ferry::engine {

namespace asio = boost::asio;
using transport::Channel;

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
        self->note_peer(c->peer_node, true);
        asio::co_spawn(self->ex_, serve_peer(self, std::move(c)), asio::detached);
    });
    peer_server_->on_data([self](transport::TokenGrant grant, std::shared_ptr<Channel> c) {
        auto it = self->incoming_.find(grant.migration);
        if (it == self->incoming_.end()) {
            c->close();
            return;
        }
        asio::co_spawn(self->ex_, TargetRun::deliver(it->second, grant.index, std::move(c)), asio::detached);
    });
    shaper_.set_cap(config_.node.max_migration_bandwidth);
    return peer_server_->start();
}

// A source that lost its control channel dials again and names the
// migration it is continuing: sets in to it. True when that migration
// already finished here (the answer to a "finish" was lost).
bool Engine::continuing(std::shared_ptr<TargetRun>& in, const json& msg, const std::string& peer) const {
    auto mid = msg.find("migration_id");
    if (in || mid == msg.end() || !mid->is_string() || msg.value("type", "") == "prepare")
        return false;
    auto id = mid->get<std::string>();
    auto it = incoming_.find(id);
    if (it != incoming_.end() && it->second->source_node() == peer)
        in = it->second;
    auto done = migrations_.find(id);
    return !in && done != migrations_.end() && done->second->phase == Phase::Succeeded &&
           done->second->source_node == peer;
}

asio::awaitable<void> Engine::serve_peer(Engine* self, std::shared_ptr<Channel> channel) {
    std::shared_ptr<TargetRun> in;
    for (;;) {
        // Before a prepare, our own setting; after it, the source's.
        auto timeout = peer_timeout(in ? in->migration().config : self->config_.migration);
        auto msg = co_await channel->read_frame(timeout);
        if (!msg) {
            if (in && in->migration().mode == "postcopy" && !in->finished()) {
                // The VM runs here but part of its memory is still on the
                // source: keep it (post-copy paused) for the source to recover.
                engine_log()->warn("migration {}: control channel from {} lost during post-copy: {}; keeping {} for "
                                   "the source to recover",
                                   in->migration().id, channel->peer_node, msg.error().message, in->vm_name());
            } else if (in && !in->finished()) {
                co_await in->control_lost(
                    channel.get(), fmt::format("control channel from {} lost: {}", channel->peer_node,
                                               msg.error().message));
            }
            co_return;
        }
        auto type = msg->value("type", "");
        if (type == "outcome" && !in) { // a restarted source's question, on a channel of its own
            auto reply = co_await self->outcome(*msg, channel->peer_node);
            co_await channel->write_frame(reply);
            channel->close();
            co_return;
        }
        bool already_finished = self->continuing(in, *msg, channel->peer_node);
        if (type == "abort") {
            json bye{{"type", "aborted"}};
            if (in && !in->finished()) {
                bye["during"] = in->step(); // what the source's abort interrupted here
                co_await in->drop("aborted by the source");
            }
            co_await channel->write_frame(bye);
            channel->close();
            co_return;
        }
        json reply = co_await answer(self, in, *msg, already_finished, channel);
        if (in && in->control() != channel.get())
            in->set_control(channel.get()); // the channel the source speaks on now
        auto w = co_await channel->write_frame(reply);
        if (type == "recover" && in && !in->finished() && reply.value("message", "").find(destination_gone) == 0) {
            co_await in->drop(reply.value("message", ""));
            co_return;
        }
        if (!w || (in && in->finished())) {
            if (in && !in->finished() && in->migration().mode != "postcopy")
                co_await in->control_lost(channel.get(), fmt::format("control channel from {} lost",
                                                                     channel->peer_node));
            co_return;
        }
        if (reply.value("type", "") == "error" && type == "prepare")
            co_return;
    }
}

// The reply to one message of the source's (all but "abort").
asio::awaitable<json> Engine::answer(Engine* self, std::shared_ptr<TargetRun>& in, const json& msg,
                                     bool already_finished, std::shared_ptr<Channel> channel) {
    auto type = msg.value("type", "");
    json reply;
    if (type == "finish" && already_finished) {
        // The answer to an earlier finish was lost with the connection.
        reply = {{"type", "finished"}, {"guest_blackout_ms", nullptr}};
    } else if (type == "prepare" && !in) {
        Node& node = *self;
        auto next = std::make_shared<TargetRun>(node, channel->peer_node);
        reply = co_await next->prepare(msg);
        if (next->prepared())
            in = next;
    } else if (type == "facts" && !in) {
        reply = {{"type", "facts"}, {"node", self->facts()}};
    } else if (auto h = self->peer_handlers_.find(type); h != self->peer_handlers_.end() && !in) {
        auto handler = h->second; // the map may change while it runs
        reply = co_await handler(msg);
    } else if (type == "ping") {
        reply = {{"type", "pong"}};
        if (in)
            reply["qemu"] = in->qemu_state();
        if (auto failed = in ? in->failure() : std::string(); !failed.empty())
            reply["failed"] = failed; // the source fails at once, with this
    } else if (type == "finish" && in) {
        reply = co_await in->finish(msg);
    } else if (type == "start" && in) {
        reply = co_await in->start();
    } else if (type == "recover" && in) {
        reply = co_await in->recover();
    } else if (type == "disk_resume" && in) {
        reply = in->resume_disks();
    } else if (!in && msg.contains("migration_id") && msg["migration_id"].is_string()) {
        reply = error_message(fmt::format("migration {} is not arriving on {} (it ended, or ferryd restarted there)",
                                          msg["migration_id"].get<std::string>(), self->config_.node.name));
    } else {
        reply = error_message(fmt::format("unexpected '{}'", type));
    }
    co_return reply;
}

} // namespace ferry::engine
