#pragma once
// The planner of one node: whether it takes migrations in (cordon), its
// drain, and the migrations from it that wait for a slot. It starts
// migrations through the engine when the limits let them, and keeps what it
// owes in <state_dir>/scheduler.json, so a restart carries on.
//
// Each node plans the migrations that leave it. Limits: this node's
// outbound count and every target's inbound count (from their facts), and
// the cluster's total, counted from every node's facts when planning. Two
// nodes that plan at the same moment may together start one more than
// parallel_migrations_per_cluster; each node's own outbound and inbound
// limits hold exactly (they are checked where the migration starts and
// where it arrives).
#include "engine/engine.hpp"
#include "scheduler/drain.hpp"
#include "scheduler/policy.hpp"
#include "scheduler/queue.hpp"

#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>

#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>

namespace ferry::scheduler {

class Planner {
public:
    explicit Planner(engine::Engine& engine);
    ~Planner();

    // Loads the stored state and carries on: a cordon holds, a drain goes
    // on, waiting migrations wait. After the engine started. A state file
    // that cannot be read is moved aside and the node starts cordoned (what
    // it held is unknown); one that cannot be moved aside is an error.
    Result<void> start();
    void stop();

    // `node` is this node or a peer, which is asked over the peer channel.
    boost::asio::awaitable<Result<json>> cordon(std::string node, bool on);
    // Pre-flight, cordon, then migrate every VM away (evacuation priority).
    boost::asio::awaitable<Result<json>> drain(std::string node, DrainOptions options);
    boost::asio::awaitable<Result<json>> drain_status(std::string node);

    // A user's migration from this node: started at once when the limits
    // let it (the migration's object), else kept Pending with the reason.
    // A VM that fits no node is refused with every node's reason.
    // `added`: labels the target must also have (KubeVirt's addedNodeSelector).
    boost::asio::awaitable<Result<json>> submit(engine::MigrateRequest request, Labels added = {});
    // Migrations waiting for a slot, oldest first.
    json waiting() const;
    // A waiting migration, or the one it started as. Null: not one of these.
    std::optional<Result<json>> show(const std::string& id) const;
    // Takes a waiting migration out of the queue. Null: not one of these.
    std::optional<Result<json>> cancel(const std::string& id);

    // Local operations, also what a peer's "scheduler" message runs.
    Result<json> cordon_here(bool on);
    boost::asio::awaitable<Result<json>> drain_here(DrainOptions options);
    json status_here() const;

private:
    struct Waiting {
        std::string id;
        engine::MigrateRequest request;
        Labels added;
        std::string created_at;
        std::string reason;
        bool seen = false; // a planning pass has considered it
    };
    struct Outcome {
        std::optional<Result<json>> result; // started (the migration) or refused
    };
    enum class Kind { drain, user };

    static boost::asio::awaitable<void> loop(Planner* self);
    void check_deadline(std::int64_t now_ms);
    json pending_json(const Waiting& w) const;
    json failed_json(const Waiting& w, const std::string& why) const;
    VmDrain drain_vm(const std::string& name);
    void remember_start(const std::string& queued, const std::string& id);
    void remember_end(const std::string& queued, json object);
    json started_as_json() const;
    void release_submitters(); // wakes every submit() to look at its request
    static boost::asio::awaitable<json> on_peer(Planner* self, json msg);
    boost::asio::awaitable<void> pass();
    // Settles the migrations it started that have ended.
    void collect();
    void start_one(const Start& s, Kind kind);
    engine::MigrateRequest resolved(engine::MigrateRequest request) const;
    void wake();
    bool save(); // false: it could not be written (logged)
    static Result<std::string> set_aside(const std::string& path);
    bool busy() const; // a drain runs or something waits or is tracked
    void set_admission();
    std::string state_path() const;

    engine::Engine& engine_;
    boost::asio::steady_timer timer_;
    bool dirty_ = false, stopped_ = false, started_ = false;
    std::string admission_ = "ready"; // ready | cordoned | draining
    std::string note_;                // why it is cordoned, when not by an operator (a damaged scheduler.json)
    std::optional<Drain> drain_;
    std::vector<Waiting> waiting_;
    std::map<std::string, std::string> started_as_;  // waiting id -> migration id ("" when it ended unstarted)
    std::map<std::string, json> ended_;              // waiting id -> why it ended without starting
    std::deque<std::string> start_order_;            // waiting ids as they started or ended, oldest first
    std::string saved_;                              // what the file holds
    std::map<std::string, std::pair<Kind, std::string>> tracked_; // migration id -> (kind, VM)
    std::map<std::string, Outcome> outcomes_;        // of submitted requests, until submit() reads them
    std::map<std::string, std::shared_ptr<boost::asio::steady_timer>> submitted_;
    std::uint64_t seq_ = 0;
};

} // namespace ferry::scheduler
