#pragma once
// The engine of one node: its VMs, their QEMU processes, and migrations.
// Single-threaded: every call runs on the engine's executor.
#include "common/fd.hpp"
#include "config/node_config.hpp"
#include "config/vm_spec.hpp"
#include "engine/migration.hpp"
#include "engine/host_facts.hpp"
#include "engine/events.hpp"
#include "engine/node.hpp"
#include "engine/vm.hpp"
#include "transport/peer_server.hpp"
#include "transport/shaper.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

namespace ferry::engine {

struct MigrateRequest {
    std::string vm;
    std::optional<std::string> target_node; // default: this node
    std::optional<std::uint64_t> bandwidth;  // overrides bandwidth_per_migration
    std::optional<std::int64_t> max_downtime_ms;
    std::optional<bool> allow_auto_converge; // override [migration] for this one
    std::optional<bool> allow_post_copy;
    // Set by the scheduler: the settings it resolved (the node's defaults,
    // then the policy's, then the request's) and the policy that applied.
    // Unset: the node's defaults with the overrides above.
    std::optional<config::MigrationConfig> settings;
    std::optional<std::string> policy;
};

class SourceRun;
class TargetRun;

// The Engine is the Node its migration runs see (engine/node.hpp).
class Engine : private Node {
public:
    Engine(boost::asio::any_io_executor ex, config::NodeConfig config);
    ~Engine();

    // Every check start() makes that does not change anything: the TLS
    // files, the QEMU binary. `ferryd --check-config` runs it too. Errors
    // name the file, line and key.
    static Result<void> preflight(const config::NodeConfig& config);

    // Creates the state directories, loads the records, re-attaches to QEMU
    // processes that still run and cleans up after interrupted migrations.
    // The caller holds the state_dir lock (StateLock).
    boost::asio::awaitable<Result<void>> start();

    boost::asio::awaitable<Result<json>> create_vm(config::VmSpec spec);
    boost::asio::awaitable<Result<json>> adopt_vm(std::string name, std::string qmp_socket,
                                                  std::optional<config::VmSpec> spec);
    boost::asio::awaitable<Result<json>> show_vm(std::string name);
    json list_vms() const;
    // launcher = "external": the stack's QEMU for the VM arriving here
    // (docs/launchers.md); fds are added to it with add-fd under their names.
    boost::asio::awaitable<Result<json>> register_target(std::string vm, std::string qmp_socket, int pid,
                                                         std::vector<std::pair<std::string, UniqueFd>> fds);
    std::vector<std::string> vm_names() const;
    bool holds(const std::string& vm) const { return vms_.count(vm) > 0; }
    // What this node offers and holds, for the schedulers of the cluster:
    // its labels, memory, CPUs, host CPU and QEMU (probed at start), its VMs
    // and the migrations under way from or to it. Peers ask with a "facts"
    // message on a control channel.
    json facts() const;
    // A peer's facts, asked over a new control channel (dial 10 s, answer 10 s).
    boost::asio::awaitable<Result<json>> peer_facts(std::string node);
    // The spec of a VM on this node (null when unknown or adopted without one).
    const config::VmSpec* vm_spec(const std::string& name) const;
    // Stops a VM ferry started; an adopted VM is only forgotten.
    boost::asio::awaitable<Result<void>> delete_vm(std::string name);

    // Runs a QMP command on the VM's current QEMU (ferry holds QEMU's only
    // QMP connection). For debugging and tests: commands that change the
    // migration or run state behind ferry's back are the caller's risk.
    boost::asio::awaitable<Result<json>> qmp_command(std::string name, std::string command, json arguments);
    // Measures how fast the guest dirties memory (QMP calc-dirty-rate,
    // page sampling) over `seconds`; before a migration, to predict it.
    boost::asio::awaitable<Result<json>> dirty_rate(std::string name, int seconds);

    // Validates and starts a migration in the background; returns its object.
    Result<json> migrate(const MigrateRequest& request);
    json list_migrations() const;
    Result<json> show_migration(const std::string& id) const;
    // `target_lost`: for a migration in doubt after a restart, the
    // operator's word that the target does not run the VM and never will
    // (the node is gone): the source resumes it.
    Result<json> abort_migration(const std::string& id, bool target_lost = false);

    // A re-read configuration (SIGHUP), already checked (preflight): the
    // settings that can change while ferryd runs apply to what starts from
    // now on (migrations under way keep the settings they started with);
    // the rest (node identity, sockets, TLS, peers) keep their running
    // values. Returns one line per key kept that way.
    std::vector<std::string> reload(const config::NodeConfig& fresh);

    // What happened here, numbered, for subscribers (events.subscribe).
    EventLog& events() { return events_; }

    // Stops background work; VMs keep running.
    void shutdown();

    // For the layer above (the scheduler), which the engine knows nothing of.
    // The state facts report: "ready", or e.g. "cordoned" or "draining"; any
    // state but "ready" refuses arriving migrations with `why`.
    void set_admission(std::string state, std::string why);
    const std::string& admission() const { return admission_; }
    // A message type peers may send on a control channel, and its answer.
    using PeerHandler = std::function<boost::asio::awaitable<nlohmann::json>(nlohmann::json)>;
    void on_peer_message(std::string type, PeerHandler handler) { peer_handlers_[std::move(type)] = std::move(handler); }
    // One message to a peer on a control channel of its own, and its answer
    // (dial 10 s, then `answer`); an "error" answer is an error.
    boost::asio::awaitable<Result<nlohmann::json>> ask_peer(std::string node, nlohmann::json message,
                                                            std::chrono::seconds answer = std::chrono::seconds(10));
    // The VM's migration under way (leaving), if any.
    std::optional<std::string> migrating(const std::string& vm) const {
        auto it = vms_.find(vm);
        return it == vms_.end() ? std::nullopt : it->second->migration_id;
    }
    // Called when an outgoing migration's run ends (whatever its outcome);
    // every listener added is called, in the order added.
    void on_migration_ended(std::function<void(const std::string& id)> f) { ended_.push_back(std::move(f)); }
    // The node-wide shaper's rate for a migration (0: not shaped here).
    std::uint64_t shaped_rate(const std::string& id) const { return shaper_.rate_of(id); }

    const config::NodeConfig& config() const override { return config_; }
    boost::asio::any_io_executor get_executor() const { return ex_; }
    // The peer endpoint's port (0 when cross-node migration is off).
    unsigned short peer_port() const { return peer_server_ ? peer_server_->port() : 0; }
    std::uint64_t peer_refusals() const { return peer_server_ ? peer_server_->refused() : 0; }
    // What this node last saw of each peer on a control channel (dialled or
    // accepted): planning, migrations and their keepalives all count.
    struct PeerContact {
        bool up = false;                 // the last contact worked
        double last_ok_unix = 0;         // when one last worked (0: never)
        std::uint64_t failures = 0;      // contacts that failed since ferryd started
        std::string last_error;
    };
    const std::map<std::string, PeerContact>& peer_contacts() const { return peer_contacts_; }
    void note_peer(const std::string& peer, bool ok, const std::string& why = "") override;

private:
    // Node, for the runs.
    boost::asio::any_io_executor executor() const override { return ex_; }
    std::string vm_dir(const std::string& name) const override;
    void persist(const Vm& vm) override;
    void persist(const Migration& m) override;
    void leave_in_doubt(const std::string& id, std::string cause) override;
    void attach(const std::shared_ptr<Vm>& vm) override; // subscribes to the QEMU's events and loss
    bool has_vm(const std::string& name) const override { return vms_.count(name) > 0; }
    void add_vm(const std::shared_ptr<Vm>& vm) override;
    void forget_vm(const std::string& name) override { vms_.erase(name); }
    std::optional<std::string> vm_using_disk(const std::string& path) const override;
    bool has_migration(const std::string& id) const override { return migrations_.count(id) > 0; }
    void add_migration(const Migration& m) override;
    Migration* migration(const std::string& id) override;
    std::shared_ptr<transport::TlsIdentity> tls() const override { return tls_; }
    transport::NodeShaper& shaper() override { return shaper_; }
    transport::TokenRegistry* tokens() override { return peer_server_ ? &peer_server_->tokens() : nullptr; }
    std::optional<std::string> arriving(const std::string& vm) const override;
    void add_arriving(const std::shared_ptr<TargetRun>& run) override;
    void remove_arriving(const std::string& id) override { incoming_.erase(id); }
    std::size_t arriving_count() const override { return incoming_.size(); }
    std::string refuses_arrivals() const override { return admission_ == "ready" ? std::string() : admission_why_; }

    std::string migration_path(const std::string& id) const;
    // Keeps the newest finished_migrations_per_vm ended records of a VM.
    void prune_finished(const std::string& vm);
    json vm_json(const Vm& vm) const;
    // The QMP client of a VM whose QEMU runs, or why there is none.
    Result<std::shared_ptr<qmp::Client>> running_qmp(const std::string& name) const;
    static boost::asio::awaitable<void> reap_loop(Engine* self);
    // Recovered cross-node migrations this node was the source of: {id, target}.
    std::vector<std::pair<std::string, std::string>> abort_at_targets_;
    boost::asio::awaitable<void> reattach(std::shared_ptr<Vm> vm);
    // Restart recovery (recovery.cpp): an unfinished migration is cancelled
    // and the VM kept where it was, unless the VM may already run on the
    // target (the source QEMU gone or past the switchover): then the target
    // is asked, until it answers, whether it runs it.
    boost::asio::awaitable<void> recover_migration(Migration m);
    boost::asio::awaitable<bool> may_have_moved(const Migration& m);
    // `reason`: the failure to record (a restart's, when empty).
    boost::asio::awaitable<void> conclude_stayed(Migration m, std::string reason = "");
    // `cause`: why the source had to ask (a restart, an unanswered hand-off).
    boost::asio::awaitable<void> conclude_moved(Migration m, std::string cause);
    struct Doubt {
        std::string why;       // what the target last said, or why it did not
        bool settling = false; // answered (or the operator decided): being concluded
        bool by_operator = false;
        std::string cause = "ferryd restarted during the hand-off"; // why the source had to ask
    };
    static boost::asio::awaitable<void> settle(Engine* self, std::string id);
    Result<json> resolve_doubt(Migration& m, Doubt& doubt, bool target_lost);
    // A conclusion of a migration in doubt, then the doubt removed.
    static boost::asio::awaitable<void> conclude_doubt(Engine* self, Migration m, bool moved, std::string reason);
    // In doubt: asked from the start of the peer endpoint until the target
    // answers; kept until the conclusion is on record.
    std::map<std::string, Doubt> in_doubt_;
    // The answer to a restarted source's "outcome" question.
    boost::asio::awaitable<nlohmann::json> outcome(const nlohmann::json& msg, const std::string& peer);
    // One message on a control channel of its own: dial (10 s), send, read
    // the answer (10 s), close.
    boost::asio::awaitable<Result<json>> ask_once(const config::Peer& peer, json message,
                                                  std::chrono::seconds answer = std::chrono::seconds(10));
    // A source that restarted tells the target to give up the arrival it
    // would otherwise keep for peer_timeout (best effort: logged).
    static boost::asio::awaitable<void> abort_at_target(Engine* self, std::string id, std::string target);
    // Runs an outgoing migration, and forgets the run once it ended.
    static boost::asio::awaitable<void> drive(Engine* self, std::shared_ptr<SourceRun> run);

    // The peer endpoint (peer_endpoint.cpp): cross-node migrations arrive
    // here and are handed to their TargetRun.
    Result<void> start_peer_endpoint();
    const config::Peer* peer(const std::string& name) const;
    static boost::asio::awaitable<void> serve_peer(Engine* self, std::shared_ptr<transport::Channel> channel);
    static boost::asio::awaitable<nlohmann::json> answer(Engine* self, std::shared_ptr<TargetRun>& in,
                                                         const nlohmann::json& msg, bool already_finished,
                                                         std::shared_ptr<transport::Channel> channel);
    // A source that dialled again names the migration it continues.
    bool continuing(std::shared_ptr<TargetRun>& in, const nlohmann::json& msg, const std::string& peer) const;

    boost::asio::any_io_executor ex_;
    config::NodeConfig config_;
    std::map<std::string, std::shared_ptr<Vm>> vms_;
    std::map<std::string, std::shared_ptr<Migration>> migrations_; // every record kept here
    std::map<std::string, std::shared_ptr<SourceRun>> runs_;       // outgoing, while they run
    boost::asio::steady_timer reaper_;
    bool stopping_ = false;
    std::shared_ptr<transport::TlsIdentity> tls_;
    std::unique_ptr<transport::PeerServer> peer_server_;
    std::map<std::string, PeerContact> peer_contacts_;
    transport::NodeShaper shaper_;
    std::map<std::string, std::shared_ptr<TargetRun>> incoming_; // arriving from peers
    HostFacts host_;
    std::string admission_ = "ready", admission_why_;
    std::map<std::string, PeerHandler> peer_handlers_;
    std::vector<std::function<void(const std::string&)>> ended_;
    EventLog events_;
    void publish(std::string type, const std::string& vm, const std::string& migration, json data) override {
        events_.publish(std::move(type), vm, migration, std::move(data));
    }
};

} // namespace ferry::engine
