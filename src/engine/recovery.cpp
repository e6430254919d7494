// Restart recovery: what a ferryd that starts again does with the
// migrations it left unfinished, and what a target tells a restarted
// source about one.
#include "engine/engine.hpp"

#include "block/qemu_block.hpp"
#include "block/target_image.hpp"
#include "engine/async.hpp"
#include "engine/hooks.hpp"
#include "engine/process.hpp"
#include "engine/source_disks.hpp"
#include "engine/target_run.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>

namespace ferry::engine {

namespace asio = boost::asio;
namespace fs = std::filesystem;

namespace {

constexpr auto settle_interval = std::chrono::seconds(5);

std::string not_asked(const Migration& m) { return fmt::format("{} has not been asked yet", m.target_node); }

// The `aborted` hooks of a migration a restart interrupted, as a failure
// runs them: the target's first (where the VM was arriving here), then the
// source's, within 60 s in all (ferryd answers only once they end). Their
// failures become warnings.
asio::awaitable<void> recovery_hooks(Node& node, const config::HooksSection& hooks, Migration& m,
                                     const config::VmSpec* spec, int source_pid, bool as_target, bool as_source) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (bool target : {true, false}) {
        if (target ? !as_target : !as_source)
            continue;
        HookCall call{HookPhase::Aborted, target ? "target" : "source", &m, spec, node.config().node.name,
                      target ? -1 : source_pid};
        co_await run_phase_hooks(node, hooks, call, deadline, m.warnings); // an aborted hook cannot fail
    }
}

} // namespace

// Whether the VM may already run on the target: only then does the target
// have to be asked before the source may resume. Before the switchover
// (QEMU's migration still active, or paused in pre-switchover) the
// destination cannot have the device state, so it cannot run the guest.
asio::awaitable<bool> Engine::may_have_moved(const Migration& m) {
    if (m.mode == "postcopy" && m.postcopy_continued)
        co_return true;
    auto it = vms_.find(m.vm);
    if (it == vms_.end() || !it->second->qemu.qmp || !it->second->qemu.qmp->connected())
        co_return true; // the source QEMU is gone: the hand-off may have quit it
    auto& qmp = *it->second->qemu.qmp;
    auto migrate = co_await qmp.execute("query-migrate");
    auto status = co_await qmp.execute("query-status");
    if (!migrate || !status)
        co_return true;
    auto state = (*migrate).value("status", "");
    auto run_state = (*status).value("status", "");
    co_return state == "completed" || state.rfind("postcopy", 0) == 0 || run_state == "postmigrate";
}

asio::awaitable<void> Engine::recover_migration(Migration m) {
    bool was_source = m.source_node == config_.node.name;
    bool cross_node = !m.target_node.empty() && m.target_node != config_.node.name;
    // A target that had taken the VM in (resumed it, then ran its activated
    // hooks) when it stopped: the guest ran here. Its QEMU is never killed
    // as a mere destination, and the source is told the truth.
    if (!was_source && m.mode != "postcopy") {
        auto it = vms_.find(m.vm);
        if (it != vms_.end() && m.target_pid > 0 && it->second->record.pid == m.target_pid) {
            bool runs = it->second->status != "stopped";
            m.phase = runs ? Phase::Succeeded : Phase::Failed;
            if (runs)
                m.warnings.push_back(fmt::format("ferryd restarted during the hand-off, after {} was taken over "
                                                 "here; its activated hooks did not finish",
                                                 m.vm));
            else
                m.failure_reason = fmt::format("ferryd restarted during the hand-off, after {} was taken over here, "
                                               "and its QEMU is gone",
                                               m.vm);
            m.target_pid = -1;
            m.target_dir.clear();
            m.ended_at = now_string();
            persist(m);
            *migrations_[m.id] = m;
            engine_log()->warn("migration {}: interrupted after {} was taken over here: {}", m.id, m.vm,
                               runs ? "it runs here" : "its QEMU is gone");
            co_return;
        }
    }
    if (was_source && cross_node && peer(m.target_node)) {
        bool moved = co_await may_have_moved(m);
        if (moved) {
            // The target decides: asked once the peer endpoint is up, and
            // again until it answers. Meanwhile nothing resumes or removes
            // the source, and the VM can neither migrate nor be deleted.
            engine_log()->warn("migration {}: interrupted by a ferryd restart during the hand-off; {} may run {} "
                               "now: asking it before anything changes here",
                               m.id, m.target_node, m.vm);
            if (auto it = vms_.find(m.vm); it != vms_.end()) {
                it->second->migration_id = m.id;
                it->second->status = "unknown";
            }
            m.warnings.push_back(fmt::format("ferryd restarted during the hand-off; whether {} runs on {} is in "
                                             "doubt until {} answers",
                                             m.vm, m.target_node, m.target_node));
            persist(m);
            *migrations_[m.id] = m;
            in_doubt_[m.id] = Doubt{.why = not_asked(m)};
            co_return;
        }
    }
    co_await conclude_stayed(std::move(m));
}

asio::awaitable<void> Engine::conclude_stayed(Migration m, std::string reason) {
    engine_log()->warn("migration {}: interrupted by a ferryd restart; cleaning up", m.id);
    if (m.mode == "postcopy" && !m.postcopy_continued)
        m.mode = "precopy"; // asked of QEMU, but it never went past pre-switchover: cancel as below
    if (m.mode == "postcopy") {
        // The VM ran on the target already: the source must never resume.
        // (Surviving a ferryd restart in post-copy is not supported yet.)
        m.phase = Phase::Failed;
        m.failure_reason = fmt::format("ferryd restarted during post-copy; both QEMUs were left as they are (the "
                                       "destination, pid {}, runs the VM; the source must not be resumed) for an "
                                       "operator to finish",
                                       m.target_pid);
        m.ended_at = now_string();
        persist(m);
        *migrations_[m.id] = m;
        co_return;
    }
    if (m.target_pid > 0 && process_alive(m.target_pid)) {
        // Only kill it if it still is the QEMU we started (pids get reused).
        std::ifstream cmdline(fmt::format("/proc/{}/cmdline", m.target_pid));
        std::string args((std::istreambuf_iterator<char>(cmdline)), std::istreambuf_iterator<char>());
        if (!m.target_dir.empty() && args.find(m.target_dir) != std::string::npos)
            co_await terminate_process(ex_, m.target_pid, std::chrono::seconds(3));
    }
    if (!m.target_dir.empty()) {
        std::error_code ec;
        fs::remove_all(m.target_dir, ec);
    }
    // An arrival that never became a VM here leaves no directory (its
    // console log included).
    if (m.source_node != config_.node.name && !vms_.count(m.vm)) {
        std::error_code ec;
        fs::remove_all(vm_dir(m.vm), ec);
    }
    for (auto& image : m.created_images) {
        if (block::remove_created_image(image))
            engine_log()->info("migration {}: removed the half-copied target image {}", m.id, image);
    }
    m.created_images.clear();
    // The source QEMU may still be migrating on its own, or paused before
    // the switchover: cancel and resume it.
    bool was_source = m.source_node == config_.node.name;
    if (auto it = vms_.find(m.vm); was_source && it != vms_.end() && it->second->qemu.qmp) {
        auto& qmp = *it->second->qemu.qmp;
        co_await qmp.execute("migrate_cancel");
        // A block migration's bitmaps, exports and NBD server.
        block::QemuBlock block(it->second->qemu.qmp);
        co_await restore_io_limits(it->second->qemu.qmp, m);
        auto swept = co_await block.sweep("ferry-" + m.id, true);
        if (!swept)
            engine_log()->warn("migration {}: cleaning up the source QEMU: {}", m.id, swept.error().message);
        else if (!swept->empty())
            engine_log()->info("migration {}: removed from the source QEMU: {}", m.id, *swept);
        auto status = co_await qmp.execute("query-status");
        if (status && !(*status).value("running", false)) {
            auto s = (*status).value("status", "");
            if (s == "finish-migrate" || s == "postmigrate" || s == "paused" || s == "pre-switchover")
                co_await qmp.execute("cont");
        }
        auto again = co_await qmp.execute("query-status");
        it->second->status = again ? (*again).value("status", "unknown") : "unknown";
    }
    if (auto it = vms_.find(m.vm); was_source && it != vms_.end()) {
        if (!it->second->qemu.qmp || !it->second->qemu.qmp->connected())
            it->second->status = "stopped"; // its QEMU is gone: nothing to resume
        it->second->migration_id.reset();
    }
    if (was_source) {
        // What the source's ferryd listened on for this migration (its
        // tunnels, the mirror's NBD socket) went with the process.
        std::error_code ec;
        for (auto& entry : fs::directory_iterator(vm_dir(m.vm), ec)) {
            auto name = entry.path().filename().string();
            if (entry.is_socket(ec) && (name.rfind("tunnel", 0) == 0 || name == "mirror.sock"))
                fs::remove(entry.path(), ec);
        }
    }
    if (was_source && !m.target_node.empty() && m.target_node != config_.node.name && peer(m.target_node)) {
        if (peer_server_) // settled after the start: tell it now
            asio::co_spawn(ex_, abort_at_target(this, m.id, m.target_node), asio::detached);
        else
            abort_at_targets_.emplace_back(m.id, m.target_node);
    }
    m.phase = Phase::Failed;
    m.failure_reason = !reason.empty() ? reason
                       : was_source    ? "ferryd restarted during the migration; it was cancelled and the VM kept on "
                                         "the source"
                                       : "ferryd restarted while the VM was arriving; the destination was removed";
    m.ended_at = now_string();
    // A target records an arrival once its prepare hooks ran; a same-node
    // migration records its destination once that QEMU started.
    bool arrived_here = m.target_node == config_.node.name && (!was_source || !m.target_dir.empty());
    m.target_pid = -1;
    m.target_dir.clear();
    // Final on disk before the hooks: a restart while they run does not
    // run them again.
    persist(m);
    *migrations_[m.id] = m;
    const config::VmSpec* spec = nullptr;
    int pid = -1;
    if (auto it = vms_.find(m.vm); it != vms_.end()) {
        spec = it->second->record.spec ? &*it->second->record.spec : nullptr;
        pid = it->second->qemu.pid;
    }
    auto warnings = m.warnings.size();
    co_await recovery_hooks(*this, config_.hooks, m, spec, pid, arrived_here, was_source);
    if (m.warnings.size() != warnings) {
        persist(m);
        *migrations_[m.id] = m;
    }
}

// The target runs the VM: the migration succeeded. The source's QEMU (if
// it still exists, necessarily paused after the switchover) is quit and the
// VM forgotten here, as the hand-off would have done.
asio::awaitable<void> Engine::conclude_moved(Migration m, std::string cause) {
    auto vm = vms_.find(m.vm) == vms_.end() ? nullptr : vms_[m.vm];
    if (vm && vm->qemu.qmp && vm->qemu.qmp->connected()) {
        auto status = co_await vm->qemu.qmp->execute("query-status");
        if (status && (*status).value("running", false)) {
            // Cannot happen after a switchover ferry held; never kill a
            // running guest on a guess: leave it to the operator, loudly.
            engine_log()->error("migration {}: {} reports {} running, and the source QEMU (pid {}) runs it too; "
                                "left as it is for an operator",
                                m.id, m.target_node, m.vm, vm->qemu.pid);
            m.warnings.push_back(fmt::format("{} runs on {} and on this node: stop one of them", m.vm, m.target_node));
            persist(m);
            *migrations_[m.id] = m;
            co_return;
        }
    }
    if (vm) {
        vm->deleting = true;
        forget_vm(m.vm);
        co_await destroy_qemu(ex_, vm->qemu);
        std::error_code ec;
        fs::remove_all(vm_dir(m.vm), ec);
    }
    m.phase = Phase::Succeeded;
    m.failure_reason.reset();
    m.target_pid = -1;
    m.target_dir.clear();
    m.ended_at = now_string();
    m.warnings.push_back(fmt::format("{}; {} reported that {} runs there", cause, m.target_node, m.vm));
    persist(m);
    *migrations_[m.id] = m;
    engine_log()->info("migration {}: {} reports that {} runs there: the migration succeeded{}", m.id,
                       m.target_node, m.vm, vm ? " and the source QEMU was stopped" : "");
    HookCall call{HookPhase::Released, "source", &m, nullptr, config_.node.name, -1};
    auto warnings = m.warnings.size();
    co_await run_phase_hooks(*this, config_.hooks, call, std::chrono::steady_clock::now() + std::chrono::seconds(60),
                             m.warnings);
    if (m.warnings.size() != warnings) {
        persist(m);
        *migrations_[m.id] = m;
    }
    publish("phase", m.vm, m.id, {{"phase", "Succeeded"}, {"role", "source"}, {"mode", m.mode}});
}

// Asks the target of a migration in doubt what became of it, until it
// answers: it runs the VM (the migration succeeded), or it does not and
// never will (the source resumes it), or it is still finishing (ask again).
// A target whose QEMU died after it took the VM over ("lost") leaves it in
// doubt: resuming the older copy here is the operator's call.
asio::awaitable<void> Engine::settle(Engine* self, std::string id) {
    asio::steady_timer timer(self->ex_);
    std::string last_why;
    while (!self->stopping_) {
        auto it = self->migrations_.find(id);
        if (it == self->migrations_.end() || is_final(it->second->phase))
            co_return;
        Migration m = *it->second;
        json ask{{"type", "outcome"}, {"migration_id", id}};
        auto reply = co_await self->ask_peer(m.target_node, ask, std::chrono::seconds(10));
        auto doubt = self->in_doubt_.find(id);
        std::string state;
        if (auto field = reply ? reply->find("state") : json::iterator{}; reply && field != reply->end() &&
                                                                            field->is_string())
            state = field->get<std::string>();
        if (doubt == self->in_doubt_.end() || doubt->second.settling) {
            if (state == "arrived" && doubt != self->in_doubt_.end() && doubt->second.by_operator) {
                // The operator declared the target lost, and it was not.
                auto twice = fmt::format("{} reports that it runs {}, but it was declared lost and {} was resumed "
                                         "here: stop one of them",
                                         m.target_node, m.vm, m.vm);
                engine_log()->error("migration {}: {}", id, twice);
                self->migrations_[id]->warnings.push_back(twice);
                self->persist(*self->migrations_[id]);
            }
            co_return; // the operator settled it meanwhile (migration abort --target-lost)
        }
        if (state == "arrived" || state == "none") {
            doubt->second.settling = true;
            if (state == "none")
                engine_log()->info("migration {}: {} does not run {}: resuming it here", id, m.target_node, m.vm);
            co_await conclude_doubt(self, std::move(m), state == "arrived",
                                    fmt::format("{}; {} does not run {}: it was resumed here", doubt->second.cause,
                                                m.target_node, m.vm));
            co_return;
        }
        auto why = !reply            ? reply.error().message
                   : state == "lost" ? fmt::format("{} took {} over, but its QEMU there is gone; the copy paused "
                                                   "here is from the switchover",
                                                   m.target_node, m.vm)
                                     : fmt::format("{} is still finishing the arrival", m.target_node);
        doubt->second.why = why;
        if (why != last_why)
            engine_log()->warn("migration {}: {} in doubt: {}; asking again every {} s", id, m.vm, why,
                               settle_interval.count());
        last_why = why;
        timer.expires_after(settle_interval);
        auto [ec] = co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
        if (ec)
            co_return;
    }
}

// An abort of a migration in doubt: refused (the target may run the VM),
// unless the operator says the target is lost and does not run it; then
// the source resumes it as though the target had said so.
Result<json> Engine::resolve_doubt(Migration& m, Doubt& doubt, bool target_lost) {
    if (doubt.settling)
        return make_error(Errc::conflict, fmt::format("migration {} is being settled ({}): it ends in a moment",
                                                      m.id, doubt.by_operator ? "by an earlier --target-lost"
                                                                              : m.target_node + " answered"));
    const auto& why = doubt.why;
    if (m.mode == "postcopy" && m.postcopy_continued)
        return make_error(Errc::conflict,
                          fmt::format("migration {} was in post-copy: {} ran on {} and its latest state is there, "
                                      "so this node cannot resume it; bring {} back (ferry then finishes it)",
                                      m.id, m.vm, m.target_node, m.target_node));
    if (!target_lost)
        return make_error(Errc::conflict,
                          fmt::format("migration {} is in doubt: {}, and whether {} runs on {} is not known ({}; "
                                      "asked every {} s). If {} is lost for good and does not run {}, `ferryctl "
                                      "migration abort {} --target-lost` resumes it here",
                                      m.id, doubt.cause, m.vm, m.target_node, why, settle_interval.count(),
                                      m.target_node, m.vm, m.id));
    auto vm = vms_.find(m.vm);
    bool resumable = vm != vms_.end() && vm->second->qemu.qmp && vm->second->qemu.qmp->connected();
    engine_log()->warn("migration {}: the operator says {} is lost and does not run {}: {}", m.id, m.target_node,
                       m.vm, resumable ? "resuming it here" : "its source QEMU is gone too");
    m.abort_requested = true;
    m.abort_status = "Succeeded";
    m.warnings.push_back(fmt::format("{} was declared lost by the operator (migration abort --target-lost) while the "
                                     "outcome was in doubt ({}); {}",
                                     m.target_node, doubt.why,
                                     resumable ? m.vm + " was resumed here"
                                               : "the source QEMU was gone too: " + m.vm + " is stopped here"));
    doubt.settling = true;
    doubt.by_operator = true;
    persist(m);
    asio::co_spawn(ex_,
                   conclude_doubt(this, m, false,
                                  fmt::format("{}; {} was declared lost by the operator", doubt.cause, m.target_node)),
                   asio::detached);
    return ok(json(m));
}

asio::awaitable<void> Engine::conclude_doubt(Engine* self, Migration m, bool moved, std::string reason) {
    auto id = m.id;
    auto cause = self->in_doubt_[id].cause;
    if (moved)
        co_await self->conclude_moved(std::move(m), cause);
    else
        co_await self->conclude_stayed(std::move(m), std::move(reason));
    self->in_doubt_.erase(id);
}

void Engine::leave_in_doubt(const std::string& id, std::string cause) {
    in_doubt_[id] = Doubt{.why = not_asked(*migrations_.at(id)), .cause = std::move(cause)};
    asio::co_spawn(ex_, settle(this, id), asio::detached);
}

// A restarted source asks what became of a migration it cannot finish: an
// arrival still under way here is given up now (unless its finish has
// begun: the source asks again), one that ended here ran the VM or not.
asio::awaitable<json> Engine::outcome(const json& msg, const std::string& peer) {
    auto mid = msg.find("migration_id");
    if (mid == msg.end() || !mid->is_string())
        co_return error_message("outcome: migration_id is missing or not a string");
    auto id = mid->get<std::string>();
    if (auto in = incoming_.find(id); in != incoming_.end()) {
        auto run = in->second; // drop() removes it from the map
        if (run->source_node() != peer)
            co_return error_message(fmt::format("migration {} is not arriving from {}", id, peer));
        json reply{{"type", "outcome"}, {"state", "finishing"}};
        if (run->finishing())
            co_return reply;
        co_await run->drop(fmt::format("the source {} restarted and gave the migration up", peer));
        reply["state"] = "none";
        co_return reply;
    }
    auto rec = migrations_.find(id);
    // The VM of an arrival is recorded here only once it was taken over.
    bool taken = rec != migrations_.end() && rec->second->target_node == config_.node.name &&
                 rec->second->source_node == peer && vms_.count(rec->second->vm) > 0;
    // Taken over, but its QEMU is gone since: the guest ran here, so the
    // source's paused copy is older; only an operator may resume it.
    bool lost = taken && vms_[rec->second->vm]->status == "stopped";
    bool arrived = taken && !lost && rec->second->phase != Phase::Failed;
    json reply{{"type", "outcome"}, {"state", lost ? "lost" : arrived ? "arrived" : "none"}};
    co_return reply;
}

} // namespace ferry::engine
