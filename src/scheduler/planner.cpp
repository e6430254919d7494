#include "scheduler/planner.hpp"

#include "common/log.hpp"
#include "common/time.hpp"
#include "engine/store.hpp"
#include "scheduler/cluster.hpp"
#include "scheduler/policy.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <set>

namespace ferry::scheduler {

namespace asio = boost::asio;
namespace fs = std::filesystem;

namespace {

auto log() {
    static auto l = logger("scheduler");
    return l;
}

constexpr std::size_t max_started_as = 200;

json request_json(const engine::MigrateRequest& r) {
    json j{{"vm", r.vm}};
    if (r.target_node)
        j["target_node"] = *r.target_node;
    if (r.bandwidth)
        j["bandwidth"] = *r.bandwidth;
    if (r.max_downtime_ms)
        j["max_downtime_ms"] = *r.max_downtime_ms;
    if (r.allow_auto_converge)
        j["allow_auto_converge"] = *r.allow_auto_converge;
    if (r.allow_post_copy)
        j["allow_post_copy"] = *r.allow_post_copy;
    return j;
}

// The planner's own file: a wrong type is damage, and the entry is skipped.
std::optional<engine::MigrateRequest> request_from(const json& j) {
    if (!j.is_object() || !j.contains("vm") || !j["vm"].is_string())
        return std::nullopt;
    engine::MigrateRequest r;
    r.vm = j["vm"];
    if (auto it = j.find("target_node"); it != j.end() && it->is_string())
        r.target_node = it->get<std::string>();
    if (auto it = j.find("bandwidth"); it != j.end() && it->is_number_unsigned())
        r.bandwidth = it->get<std::uint64_t>();
    if (auto it = j.find("max_downtime_ms"); it != j.end() && it->is_number_integer())
        r.max_downtime_ms = it->get<std::int64_t>();
    if (auto it = j.find("allow_auto_converge"); it != j.end() && it->is_boolean())
        r.allow_auto_converge = it->get<bool>();
    if (auto it = j.find("allow_post_copy"); it != j.end() && it->is_boolean())
        r.allow_post_copy = it->get<bool>();
    return r;
}

std::string drain_id(const std::string& vm) { return "drain/" + vm; }

// Records in `nodes` (every node's facts) that VM `vm` of `source` is headed
// to `target`, so later placements count its memory and CPUs there.
void commit(std::vector<json>& nodes, const engine::Engine& engine, const std::string& source,
            const std::string& vm, const std::string& target) {
    const auto* spec = engine.vm_spec(vm);
    for (auto& f : nodes)
        if (f.is_object() && f.value("name", std::string()) == target && f.contains("migrations") &&
            f["migrations"].is_array())
            f["migrations"].push_back({{"id", "planned/" + vm},
                                       {"vm", vm},
                                       {"source_node", source},
                                       {"target_node", target},
                                       {"phase", "Scheduling"},
                                       {"memory", spec ? spec->memory : 0},
                                       {"cpus", spec ? spec->cpus : 0}});
}

} // namespace

Planner::Planner(engine::Engine& engine)
    : engine_(engine), timer_(engine.get_executor(), asio::steady_timer::time_point::max()) {}

Planner::~Planner() { stop(); }

std::string Planner::state_path() const { return engine_.config().node.state_dir + "/scheduler.json"; }

Result<void> Planner::start() {
    auto path = state_path();
    std::error_code ec;
    if (fs::exists(fs::symlink_status(path, ec))) {
        auto type = fs::status(path, ec).type();
        auto j = type == fs::file_type::regular     ? engine::read_json_file(path)
                 : type == fs::file_type::directory ? Result<json>(make_error(Errc::invalid_argument,
                                                                              "it is a directory, not a file"))
                                                    : Result<json>(make_error(Errc::invalid_argument,
                                                                              "it is not a regular file"));
        auto load = [&]() -> Result<void> {
            if (!j)
                return j.error();
            if (!j->is_object())
                return make_error(Errc::invalid_argument, "not an object");
            auto ai = j->find("admission");
            if (ai != j->end() && !ai->is_string())
                return make_error(Errc::invalid_argument, "'admission' must be a string");
            std::string a = ai == j->end() ? "ready" : ai->get<std::string>();
            if (a != "ready" && a != "cordoned" && a != "draining")
                return make_error(Errc::invalid_argument, fmt::format("unknown admission '{}'", a));
            admission_ = a;
            if (auto n = j->find("reason"); n != j->end() && n->is_string() && a == "cordoned")
                note_ = n->get<std::string>();
            if (auto d = j->find("drain"); d != j->end() && !d->is_null()) {
                auto drain = drain_from_json(*d);
                if (!drain)
                    return drain.error();
                drain_ = std::move(*drain);
            }
            if (auto w = j->find("waiting"); w != j->end() && w->is_array())
                for (auto& e : *w) {
                    if (!e.is_object() || !e.contains("id") || !e["id"].is_string())
                        continue;
                    auto req = request_from(e.contains("request") ? e["request"] : json());
                    if (!req)
                        continue;
                    std::string created;
                    if (auto c = e.find("created_at"); c != e.end() && c->is_string())
                        created = *c;
                    Labels added;
                    if (auto a = e.find("added_selector"); a != e.end() && a->is_object())
                        for (auto& [k, v] : a->items())
                            if (v.is_string())
                                added[k] = v;
                    waiting_.push_back({e["id"], *req, added, created, "", false});
                }
            if (auto s = j->find("started_as"); s != j->end() && s->is_array())
                for (auto& e : *s)
                    if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string())
                        remember_start(e[0], e[1]);
            if (auto s = j->find("seq"); s != j->end() && s->is_number_unsigned())
                seq_ = s->get<std::uint64_t>();
            return {};
        };
        Result<void> r = make_error(Errc::internal, "not read");
        try {
            r = load();
        } catch (const json::exception& e) { // a value of the wrong type
            r = make_error(Errc::invalid_argument, e.what());
        }
        if (!r) {
            auto why = r.error().message;
            if (why.rfind(path + ": ", 0) == 0)
                why.erase(0, path.size() + 2);
            // What it held is unknown: a cordon, a drain, waiting migrations.
            // The node takes nothing in until an operator has looked, and the
            // file is kept for them to read.
            auto aside = set_aside(path);
            if (!aside)
                return make_error(Errc::io, fmt::format("{}: {}; it cannot be moved aside ({}), so ferryd does not "
                                                        "start: move it away yourself and start ferryd again (the "
                                                        "node then starts uncordoned: cordon it again if it was)",
                                                        path, why, aside.error().message));
            auto& node = engine_.config().node.name;
            admission_ = "cordoned";
            drain_.reset();
            waiting_.clear();
            started_as_.clear();
            start_order_.clear();
            ended_.clear();
            note_ = fmt::format("{} is cordoned: its scheduler state {} was damaged ({}) and was moved to {}; its "
                                "cordon, drain and waiting migrations are unknown, so it takes no migrations in "
                                "until you lift the cordon (ferryctl node uncordon {})",
                                node, path, why, *aside, node);
            log()->error("{}: {}; moved to {}; {} starts cordoned, with no drain or waiting migrations: check what "
                         "it held, then ferryctl node uncordon {}",
                         path, why, *aside, node, node);
            if (!save())
                return make_error(Errc::io, fmt::format("{} cannot be written, so the cordon of {} would not hold "
                                                        "(see the error above)",
                                                        path, node));
        }
    }
    if (drain_)
        for (auto& v : drain_->vms)
            if (v.state == VmDrainState::migrating && !v.migration.empty())
                tracked_[v.migration] = {Kind::drain, v.name};
    set_admission();
    engine_.on_peer_message("scheduler", [this](json msg) { return on_peer(this, std::move(msg)); });
    engine_.on_migration_ended([this](const std::string&) { wake(); });
    started_ = true;
    if (drain_ && drain_->active())
        log()->info("carrying on the drain of {} started {}: {} moved, {} to go", drain_->node, drain_->started_at,
                    drain_->count(VmDrainState::moved),
                    drain_->count(VmDrainState::waiting) + drain_->count(VmDrainState::migrating));
    if (!waiting_.empty())
        log()->info("{} migration(s) wait for a slot", waiting_.size());
    asio::co_spawn(timer_.get_executor(), loop(this), asio::detached);
    return {};
}

void Planner::stop() {
    stopped_ = true;
    timer_.cancel();
    for (auto& [id, t] : submitted_)
        t->cancel();
}

void Planner::wake() {
    dirty_ = true;
    timer_.cancel();
}

void Planner::set_admission() {
    auto& node = engine_.config().node.name;
    if (admission_ == "ready")
        engine_.set_admission("ready", "");
    else if (admission_ == "cordoned" && !note_.empty())
        engine_.set_admission(admission_, note_);
    else
        engine_.set_admission(admission_, fmt::format("{} is {}: it takes no migrations in (ferryctl node uncordon {})",
                                                      node, admission_, node));
}

bool Planner::busy() const {
    return !tracked_.empty() || !waiting_.empty() || (drain_ && drain_->active());
}

void Planner::remember_start(const std::string& queued, const std::string& id) {
    if (!started_as_.count(queued))
        start_order_.push_back(queued);
    started_as_[queued] = id;
    while (start_order_.size() > max_started_as) { // the oldest go
        started_as_.erase(start_order_.front());
        ended_.erase(start_order_.front());
        start_order_.pop_front();
    }
}

void Planner::remember_end(const std::string& queued, json object) {
    remember_start(queued, "");
    ended_[queued] = std::move(object);
}

// The file moved to <path>.damaged (or .damaged.1, ...: an earlier one is
// kept), whatever it is: a file, a directory, a link.
Result<std::string> Planner::set_aside(const std::string& path) {
    std::error_code ec;
    for (int i = 0; i < 100; ++i) {
        auto to = path + ".damaged" + (i ? fmt::format(".{}", i) : std::string());
        if (fs::exists(fs::symlink_status(to, ec)))
            continue;
        fs::rename(path, to, ec);
        if (ec)
            return make_error(Errc::io, fmt::format("renaming it to {}: {}", to, ec.message()));
        return ok(std::move(to));
    }
    return make_error(Errc::io, fmt::format("{}.damaged to {}.damaged.99 all exist", path, path));
}

bool Planner::save() {
    json waiting = json::array();
    for (auto& w : waiting_)
        waiting.push_back({{"id", w.id},
                           {"created_at", w.created_at},
                           {"request", request_json(w.request)},
                           {"added_selector", w.added}});
    json j{{"admission", admission_},
           {"reason", admission_ == "cordoned" && !note_.empty() ? json(note_) : json(nullptr)},
           {"drain", drain_ ? to_json(*drain_) : json(nullptr)},
           {"waiting", std::move(waiting)},
           {"started_as", started_as_json()},
           {"seq", seq_}};
    auto text = j.dump();
    if (text == saved_)
        return true; // nothing changed since the last write
    if (auto r = engine::write_json_file(state_path(), j); !r) {
        log()->error("saving {}: {}", state_path(), r.error().message);
        return false;
    }
    saved_ = std::move(text);
    return true;
}

json Planner::started_as_json() const {
    json out = json::array();
    for (auto& q : start_order_)
        if (auto it = started_as_.find(q); it != started_as_.end() && !it->second.empty())
            out.push_back(json::array({q, it->second}));
    return out;
}

void Planner::release_submitters() {
    for (auto& [id, t] : submitted_)
        t->cancel();
}

asio::awaitable<void> Planner::loop(Planner* self) {
    while (!self->stopped_) {
        self->dirty_ = false;
        try {
            co_await self->pass();
        } catch (const std::exception& e) {
            // A bug, or facts of a shape not foreseen: planning goes on.
            log()->error("planning pass: {}", e.what());
            self->release_submitters();
        }
        if (self->stopped_)
            break;
        if (self->dirty_)
            continue;
        // Woken at once when a migration of this node ends; what frees on
        // other nodes is seen by asking them again.
        auto wait = std::chrono::seconds(3600);
        if (!self->tracked_.empty())
            wait = std::chrono::seconds(1);
        else if (self->busy())
            wait = std::chrono::seconds(2);
        self->timer_.expires_after(wait);
        co_await self->timer_.async_wait(asio::as_tuple(asio::use_awaitable));
    }
}

void Planner::collect() {
    for (auto it = tracked_.begin(); it != tracked_.end();) {
        auto& [id, what] = *it;
        auto m = engine_.show_migration(id);
        std::string phase, error;
        if (m) {
            phase = m->value("phase", std::string());
            if (auto f = m->find("failure_reason"); f != m->end() && f->is_string())
                error = *f;
        } else if (!engine_.holds(what.second)) {
            phase = "Succeeded"; // its record was pruned, and the VM is gone from here
        } else {
            phase = "Failed";
            error = "its migration record is gone";
        }
        if (phase != "Succeeded" && phase != "Failed") {
            ++it;
            continue;
        }
        if (what.first == Kind::drain && drain_) {
            if (auto* v = drain_->find(what.second); v && v->migration == id) {
                if (phase == "Succeeded") {
                    v->state = VmDrainState::moved;
                    v->error.clear();
                    log()->info("drain of {}: {} moved to {}", drain_->node, v->name, v->target);
                } else if (drain_->active()) {
                    drain_->failed(*v, error, unix_ms());
                    log()->warn("drain of {}: migration {} of {} failed (attempt {} of {}): {}{}", drain_->node, id,
                                v->name, v->attempts, Drain::max_attempts, error,
                                v->state == VmDrainState::gave_up ? "; giving up on it" : "; it will be retried");
                } else {
                    v->state = VmDrainState::not_moved;
                    v->error = error;
                }
            }
        }
        it = tracked_.erase(it);
    }
}

engine::MigrateRequest Planner::resolved(engine::MigrateRequest req) const {
    if (const auto* spec = engine_.vm_spec(req.vm)) {
        MigrationSettings given;
        given.bandwidth_per_migration = req.bandwidth;
        given.max_downtime_ms = req.max_downtime_ms;
        given.allow_auto_converge = req.allow_auto_converge;
        given.allow_post_copy = req.allow_post_copy;
        auto r = resolve_for(engine_.config(), spec->labels, given);
        req.settings = r.config;
        if (r.policy)
            req.policy = r.policy->name;
    }
    return req;
}

void Planner::start_one(const Start& s, Kind kind) {
    if (kind == Kind::drain) {
        if (!drain_ || !drain_->active())
            return;
        auto* v = drain_->find(s.request.vm);
        if (!v || v->state != VmDrainState::waiting)
            return;
        engine::MigrateRequest req;
        req.vm = v->name;
        req.target_node = s.target;
        ++v->attempts;
        v->target = s.target;
        v->reason.clear();
        auto m = engine_.migrate(resolved(req));
        if (!m) {
            drain_->failed(*v, m.error().message, unix_ms());
            log()->warn("drain of {}: {} could not start (attempt {} of {}): {}", drain_->node, v->name, v->attempts,
                        Drain::max_attempts, m.error().message);
            return;
        }
        v->state = VmDrainState::migrating;
        v->migration = m->value("id", std::string());
        tracked_[v->migration] = {Kind::drain, v->name};
        log()->info("drain of {}: {} migrates to {} ({})", drain_->node, v->name, s.target, v->migration);
        return;
    }
    auto w = std::find_if(waiting_.begin(), waiting_.end(), [&](auto& e) { return e.id == s.request.id; });
    if (w == waiting_.end())
        return;
    auto req = w->request;
    req.target_node = s.target;
    auto m = engine_.migrate(resolved(req));
    if (m) {
        auto id = m->value("id", std::string());
        remember_start(w->id, id);
        tracked_[id] = {Kind::user, req.vm};
        if (submitted_.count(w->id) == 0)
            log()->info("{} started as {} ({} to {})", w->id, id, req.vm, s.target);
        (*m)["queued_as"] = w->id;
        outcomes_[w->id].result = std::move(m);
    } else {
        log()->warn("{} ({}) could not start: {}", w->id, req.vm, m.error().message);
        outcomes_[w->id].result = Result<json>(m.error());
        remember_end(w->id, failed_json(*w, "it could not start: " + m.error().message));
    }
    if (submitted_.count(w->id) == 0)
        outcomes_.erase(w->id); // nobody waits for it
    waiting_.erase(w);
}

void Planner::check_deadline(std::int64_t now_ms) {
    if (drain_->deadline_ms && now_ms >= *drain_->deadline_ms && drain_->count(VmDrainState::waiting)) {
        drain_->stop_waiting("the drain's deadline passed");
        drain_->note = "the deadline passed before every VM moved";
        log()->warn("drain of {}: the deadline passed; what has not started stays", drain_->node);
    }
}

json Planner::failed_json(const Waiting& w, const std::string& why) const {
    auto j = pending_json(w);
    j.erase("reason");
    j["phase"] = "Failed";
    j["failure_reason"] = why;
    return j;
}

// A VM joining a drain: waiting, or tracked if a migration of it runs.
VmDrain Planner::drain_vm(const std::string& name) {
    VmDrain v;
    v.name = name;
    const auto* spec = engine_.vm_spec(name);
    std::vector<std::string> blockers;
    if (!spec)
        blockers.push_back("adopted without a spec, so ferry cannot start it elsewhere");
    else
        blockers = migration_blockers(*spec);
    if (!blockers.empty()) {
        v.state = VmDrainState::cannot_move;
        v.error = fmt::format("{}", fmt::join(blockers, "; "));
    } else if (auto id = engine_.migrating(name)) {
        v.state = VmDrainState::migrating; // settled when it ends; retried if it fails
        v.migration = *id;
        v.attempts = 1;
        if (auto m = engine_.show_migration(*id); m && m->contains("target_node") && (*m)["target_node"].is_string())
            v.target = (*m)["target_node"];
        tracked_[*id] = {Kind::drain, name};
    }
    return v;
}

asio::awaitable<void> Planner::pass() {
    collect();
    auto& cfg = engine_.config();
    const auto& self = cfg.node.name;
    auto now_ms = unix_ms();
    // A waiting request whose VM is gone (deleted, or moved by a drain) ends.
    for (auto it = waiting_.begin(); it != waiting_.end();) {
        if (engine_.holds(it->request.vm)) {
            ++it;
            continue;
        }
        auto why = fmt::format("VM {} is no longer on {}", it->request.vm, self);
        log()->warn("{} ends before it started: {}", it->id, why);
        outcomes_[it->id].result = Result<json>(make_error(Errc::not_found, why));
        remember_end(it->id, failed_json(*it, why));
        it = waiting_.erase(it);
    }
    if (drain_ && drain_->active()) {
        // VMs that came meanwhile (an arrival that was under way) go too.
        for (auto& name : engine_.vm_names())
            if (!drain_->find(name))
                drain_->vms.push_back(drain_vm(name));
        for (auto& v : drain_->vms)
            if (v.state == VmDrainState::waiting && !engine_.holds(v.name)) {
                v.state = VmDrainState::gone;
                v.reason.clear();
            }
        check_deadline(now_ms);
        if (drain_->settle(now_string())) {
            admission_ = "cordoned"; // nothing moves back until it is uncordoned
            set_admission();
            log()->info("drain of {} {}: {} moved{}", self, to_string(drain_->state), drain_->count(VmDrainState::moved),
                        drain_->note.empty() ? "" : "; " + drain_->note);
        }
    }
    bool drain_wants = drain_ && drain_->active() && drain_->count(VmDrainState::waiting) > 0;
    if (!drain_wants && waiting_.empty()) {
        save();
        release_submitters();
        co_return;
    }
    std::vector<json> nodes;
    if (cfg.peers.empty())
        nodes.push_back(engine_.facts());
    else
        nodes = co_await gather(engine_);
    if (stopped_)
        co_return;
    now_ms = unix_ms();
    if (drain_ && drain_->active())
        check_deadline(now_ms); // it may have passed while the peers answered

    // What runs now, counted once (a source and its target both list it).
    InFlight running;
    Limits limits{cfg.migration.parallel_outbound_migrations_per_node,
                  cfg.migration.parallel_inbound_migrations_per_node, cfg.migration.parallel_migrations_per_cluster, {}};
    std::set<std::string> counted;
    for (auto& f : nodes) {
        if (!f.is_object())
            continue;
        if (auto l = f.find("limits"); l != f.end() && l->is_object() && f.contains("name") && f["name"].is_string())
            if (auto in = l->find("inbound"); in != l->end() && in->is_number_integer())
                limits.inbound_of[f["name"]] = in->get<std::int64_t>();
        auto ms = f.find("migrations");
        if (ms == f.end() || !ms->is_array())
            continue;
        for (auto& m : *ms) {
            if (!m.is_object() || !m.contains("id") || !m["id"].is_string())
                continue;
            auto phase = m.value("phase", std::string());
            if (phase == "Succeeded" || phase == "Failed" || !counted.insert(m["id"].get<std::string>()).second)
                continue;
            auto source = m.value("source_node", std::string()), target = m.value("target_node", std::string());
            running.add(source, target);
        }
    }
    limits.inbound_of[self] = cfg.migration.parallel_inbound_migrations_per_node;

    Queue queue;
    std::map<std::string, Kind> kinds;
    if (drain_ && drain_->active()) {
        auto migrating = drain_->count(VmDrainState::migrating);
        auto slots = drain_->max_parallel > 0 ? drain_->max_parallel - migrating : std::int64_t(1) << 40;
        for (auto& v : drain_->vms) {
            if (v.state != VmDrainState::waiting)
                continue;
            if (v.retry_at_ms > now_ms) {
                v.reason = fmt::format("retry {} of {} in {} s; it failed: {}", v.attempts + 1, Drain::max_attempts,
                                       (v.retry_at_ms - now_ms + 999) / 1000, v.error);
                continue;
            }
            if (slots <= 0) {
                v.reason = "max-parallel"; // with the count once this pass has started what it may
                continue;
            }
            --slots;
            Request r{drain_id(v.name), v.name, self, "", Priority::evacuation};
            if (queue.push(r))
                kinds[r.id] = Kind::drain;
        }
    }
    for (auto& w : waiting_) {
        w.seen = true;
        std::string target = w.request.target_node.value_or(cfg.peers.empty() ? self : "");
        Request r{w.id, w.request.vm, self, target, Priority::user};
        if (queue.push(r))
            kinds[r.id] = Kind::user;
    }

    std::map<std::string, std::string> unplaceable;
    std::map<std::string, const Labels*> added;
    for (auto& w : waiting_)
        added[w.id] = &w.added;
    static const Labels none;
    std::int64_t min_inbound = limits.inbound_per_node;
    for (auto& [node, limit] : limits.inbound_of)
        min_inbound = std::min(min_inbound, limit);
    min_inbound = std::max<std::int64_t>(min_inbound, 1);
    auto placer = [&](const Request& r) -> Result<std::vector<std::string>> {
        auto a = added.find(r.id);
        const Labels& extra = a == added.end() ? none : *a->second;
        // With n migrations in flight and inbound limits of at least m, at
        // most n / m nodes are full: one of the best n / m + 1 has room.
        auto p = place_vm(nodes, self, r.vm, false, extra,
                          static_cast<std::size_t>(running.total() / min_inbound) + 1);
        if (p && !p->fits())
            p = place_vm(nodes, self, r.vm, true, extra); // again, to say why
        if (!p) {
            unplaceable[r.id] = p.error().message;
            return p.error();
        }
        if (!p->fits()) {
            unplaceable[r.id] = p->why_none(r.vm);
            return make_error(Errc::conflict, unplaceable[r.id]);
        }
        std::vector<std::string> names;
        for (auto& c : p->ranked)
            names.push_back(c.node);
        return names;
    };
    std::vector<Start> starts;
    queue.start_all(running, limits, placer, [&](const Start& s) {
        starts.push_back(s);
        commit(nodes, engine_, self, s.request.vm, s.target); // later placements in this pass see it
    });
    for (auto& s : starts)
        start_one(s, kinds[s.request.id]);
    // Why the rest wait.
    if (drain_ && drain_->active()) {
        for (auto& v : drain_->vms) {
            if (v.state == VmDrainState::waiting && kinds.count(drain_id(v.name)))
                v.reason = queue.reason(drain_id(v.name));
            else if (v.state == VmDrainState::waiting && v.reason == "max-parallel")
                v.reason = fmt::format("max-parallel {}/{}", drain_->count(VmDrainState::migrating),
                                       drain_->max_parallel);
        }
    }
    for (auto it = waiting_.begin(); it != waiting_.end();) {
        // A user's request that fits nowhere is refused, not kept.
        if (auto u = unplaceable.find(it->id); u != unplaceable.end() && submitted_.count(it->id)) {
            outcomes_[it->id].result = Result<json>(make_error(Errc::conflict, u->second));
            it = waiting_.erase(it);
            continue;
        }
        it->reason = queue.reason(it->id);
        ++it;
    }
    save();
    for (auto& [id, t] : submitted_)
        t->cancel();
}

json Planner::pending_json(const Waiting& w) const {
    return json{{"id", w.id},
                {"vm", w.request.vm},
                {"source_node", engine_.config().node.name},
                {"target_node", w.request.target_node ? json(*w.request.target_node) : json(nullptr)},
                {"phase", "Pending"},
                {"reason", w.reason},
                {"node_selector", w.added},
                {"created_at", w.created_at},
                {"priority", "user"}};
}

json Planner::waiting() const {
    json out = json::array();
    for (auto& w : waiting_)
        out.push_back(pending_json(w));
    return out;
}

asio::awaitable<Result<json>> Planner::submit(engine::MigrateRequest request, Labels added) {
    if (!started_ || stopped_)
        co_return make_error(Errc::conflict, "ferryd is not ready to plan migrations");
    if (!engine_.holds(request.vm))
        co_return make_error(Errc::not_found, fmt::format("no VM named {}", request.vm));
    for (auto& w : waiting_)
        if (w.request.vm == request.vm)
            co_return make_error(Errc::conflict, fmt::format("VM {} already waits to migrate ({})", request.vm, w.id));
    if (drain_ && drain_->active())
        if (auto* v = drain_->find(request.vm);
            v && (v->state == VmDrainState::waiting || v->state == VmDrainState::migrating))
            co_return make_error(Errc::conflict, fmt::format("VM {} is being moved by the drain of {} (ferryctl node "
                                                             "drain --status)",
                                                             request.vm, drain_->node));
    std::string id = fmt::format("{}-queued-{}", request.vm, ++seq_);
    waiting_.push_back({id, std::move(request), std::move(added), now_string(), "", false});
    auto timer = std::make_shared<asio::steady_timer>(timer_.get_executor(), asio::steady_timer::time_point::max());
    submitted_[id] = timer;
    wake();
    // The planning pass that considers it says whether it started.
    for (;;) {
        co_await timer->async_wait(asio::as_tuple(asio::use_awaitable));
        if (stopped_ || outcomes_.count(id))
            break;
        auto w = std::find_if(waiting_.begin(), waiting_.end(), [&](auto& e) { return e.id == id; });
        if (w == waiting_.end() || w->seen)
            break;
        timer->expires_at(asio::steady_timer::time_point::max());
    }
    submitted_.erase(id);
    if (auto o = outcomes_.find(id); o != outcomes_.end()) {
        auto r = std::move(*o->second.result);
        outcomes_.erase(o);
        co_return r;
    }
    auto shown = show(id);
    if (!shown)
        co_return make_error(Errc::conflict, fmt::format("{} was cancelled", id));
    log()->info("{} waits: {}", id, shown->value().value("reason", std::string()));
    co_return std::move(*shown);
}

std::optional<Result<json>> Planner::show(const std::string& id) const {
    for (auto& w : waiting_)
        if (w.id == id)
            return ok(pending_json(w));
    if (auto e = ended_.find(id); e != ended_.end())
        return ok(e->second);
    if (auto s = started_as_.find(id); s != started_as_.end() && !s->second.empty())
        return engine_.show_migration(s->second);
    return std::nullopt;
}

std::optional<Result<json>> Planner::cancel(const std::string& id) {
    auto w = std::find_if(waiting_.begin(), waiting_.end(), [&](auto& e) { return e.id == id; });
    if (w == waiting_.end()) {
        if (auto e = ended_.find(id); e != ended_.end())
            return Result<json>(make_error(Errc::conflict, fmt::format("{} has ended", id)));
        if (auto s = started_as_.find(id); s != started_as_.end() && !s->second.empty())
            return engine_.abort_migration(s->second);
        return std::nullopt;
    }
    json out = failed_json(*w, "cancelled before it started");
    remember_end(id, out);
    if (auto t = submitted_.find(id); t != submitted_.end())
        t->second->cancel(); // a submit() still waiting learns it at once
    waiting_.erase(w);
    save();
    log()->info("{} cancelled before it started", id);
    return ok(std::move(out));
}

// ---- cordon and drain ----

json Planner::status_here() const {
    json out{{"node", engine_.config().node.name},
             {"state", admission_},
             {"drain", drain_ ? to_json(*drain_) : json(nullptr)},
             {"waiting", waiting()}};
    if (admission_ == "cordoned" && !note_.empty())
        out["reason"] = note_;
    return out;
}

Result<json> Planner::cordon_here(bool on) {
    auto& node = engine_.config().node.name;
    if (on) {
        if (admission_ == "ready") {
            admission_ = "cordoned";
            log()->info("{} cordoned", node);
        }
    } else {
        if (drain_ && drain_->active()) {
            drain_->stop_waiting("cancelled: the node was uncordoned");
            drain_->state = DrainState::cancelled;
            drain_->ended_at = now_string();
            auto running = drain_->count(VmDrainState::migrating);
            drain_->note = running ? fmt::format("uncordoned; {} migration(s) under way finish", running) : "uncordoned";
            log()->info("drain of {} cancelled: {}", node, drain_->note);
        }
        if (admission_ != "ready")
            log()->info("{} uncordoned", node);
        admission_ = "ready";
        note_.clear();
    }
    set_admission();
    save();
    wake();
    return ok(status_here());
}

asio::awaitable<Result<json>> Planner::drain_here(DrainOptions options) {
    auto& cfg = engine_.config();
    const auto& self = cfg.node.name;
    if (drain_ && drain_->active())
        co_return make_error(Errc::conflict, fmt::format("{} is already draining (since {}); see ferryctl node drain "
                                                         "--status {}, or ferryctl node uncordon {} to cancel it",
                                                         self, drain_->started_at, self, self));
    // Cordon first: nothing new arrives while the pre-flight looks.
    auto before = admission_;
    admission_ = "draining";
    set_admission();
    std::vector<json> nodes;
    if (cfg.peers.empty())
        nodes.push_back(engine_.facts());
    else
        nodes = co_await gather(engine_);
    if (drain_ && drain_->active()) {
        admission_ = "draining";
        co_return make_error(Errc::conflict, fmt::format("{} is already draining", self));
    }
    if (admission_ != "draining") // changed meanwhile
        co_return make_error(Errc::conflict,
                             fmt::format("{} became {} while the drain was planned; nothing was started", self,
                                         admission_));
    Drain d;
    d.node = self;
    d.started_at = now_string();
    d.max_parallel = options.max_parallel;
    if (options.deadline_s)
        d.deadline_ms = unix_ms() + *options.deadline_s * 1000;
    json cannot = json::array(), no_room = json::array();
    std::int64_t fit = 0;
    for (auto& name : engine_.vm_names()) {
        VmDrain v = drain_vm(name);
        if (v.state == VmDrainState::cannot_move) {
            cannot.push_back({{"vm", name}, {"why", v.error}});
            d.vms.push_back(std::move(v));
            continue;
        }
        if (v.state == VmDrainState::migrating) { // already leaving
            ++fit;
            d.vms.push_back(std::move(v));
            continue;
        }
        auto p = place_vm(nodes, self, name, true);
        if (p && p->fits()) {
            ++fit;
            commit(nodes, engine_, self, name, p->ranked.front().node);
        } else {
            no_room.push_back({{"vm", name}, {"why", p ? p->why_none(name) : p.error().message}});
        }
        d.vms.push_back(std::move(v));
    }
    drain_ = std::move(d);
    note_.clear(); // the operator has looked: the drain's own cordon follows
    save();
    log()->info("drain of {} started (was {}): {} VM(s), {} fit elsewhere now, {} cannot move, {} fit nowhere now{}{}",
                self, before, drain_->vms.size(), fit, cannot.size(), no_room.size(),
                options.max_parallel ? fmt::format(", {} at once", options.max_parallel) : "",
                options.deadline_s ? fmt::format(", deadline in {} s", *options.deadline_s) : "");
    wake();
    json out = status_here();
    out["preflight"] = {{"vms", drain_->vms.size()}, {"fit_elsewhere", fit}, {"cannot_move", cannot},
                        {"no_room", no_room}};
    co_return ok(std::move(out));
}

asio::awaitable<json> Planner::on_peer(Planner* self, json msg) {
    auto fail = [](const std::string& why) { return json{{"type", "error"}, {"message", why}}; };
    auto it = msg.find("op");
    if (it == msg.end() || !it->is_string())
        co_return fail("a scheduler message needs a string 'op'");
    std::string op = *it;
    const std::string cordon = "cordon", uncordon = "uncordon", drain = "drain", status = "status";
    Result<json> r = make_error(Errc::internal, "not run");
    if (op == cordon || op == uncordon) {
        r = self->cordon_here(op == cordon);
    } else if (op == drain) {
        auto o = drain_options(msg.value("options", json::object()));
        if (!o)
            co_return fail(o.error().message);
        r = co_await self->drain_here(*o);
    } else if (op == status) {
        r = ok(self->status_here());
    } else {
        co_return fail(fmt::format("unknown scheduler op '{}'", op));
    }
    if (!r)
        co_return fail(r.error().message);
    co_return json{{"type", "scheduler"}, {"result", std::move(*r)}};
}

namespace {
asio::awaitable<Result<json>> ask(engine::Engine& engine, const std::string& node, json msg,
                                  std::chrono::seconds answer = std::chrono::seconds(10)) {
    msg["type"] = "scheduler";
    auto r = co_await engine.ask_peer(node, std::move(msg), answer);
    if (!r)
        co_return r.error();
    if (!r->contains("result"))
        co_return make_error(Errc::protocol, fmt::format("node {} answered without a result", node));
    co_return ok(std::move((*r)["result"]));
}
} // namespace

asio::awaitable<Result<json>> Planner::cordon(std::string node, bool on) {
    if (node.empty() || node == engine_.config().node.name)
        co_return cordon_here(on);
    json msg = json::object();
    msg["op"] = std::string(on ? "cordon" : "uncordon");
    auto r = co_await ask(engine_, node, std::move(msg));
    co_return r;
}

asio::awaitable<Result<json>> Planner::drain(std::string node, DrainOptions options) {
    if (node.empty() || node == engine_.config().node.name)
        co_return co_await drain_here(options);
    json o = json::object();
    if (options.max_parallel)
        o["max_parallel"] = options.max_parallel;
    if (options.deadline_s)
        o["deadline_s"] = *options.deadline_s;
    json msg = json::object();
    msg["op"] = std::string("drain");
    msg["options"] = std::move(o);
    // Its pre-flight asks every node for facts (up to 20 s for one that is down).
    auto r = co_await ask(engine_, node, std::move(msg), std::chrono::seconds(45));
    co_return r;
}

asio::awaitable<Result<json>> Planner::drain_status(std::string node) {
    if (node.empty() || node == engine_.config().node.name)
        co_return ok(status_here());
    json msg = json::object();
    msg["op"] = std::string("status");
    auto r = co_await ask(engine_, node, std::move(msg));
    co_return r;
}

} // namespace ferry::scheduler
