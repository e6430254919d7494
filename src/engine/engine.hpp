#pragma once
// The engine of one node: its VMs, their QEMU processes, and migrations.
// Single-threaded: every call runs on the engine's executor.
#include "config/node_config.hpp"
#include "config/vm_spec.hpp"
#include "engine/migration.hpp"
#include "engine/vm.hpp"
#include "transport/peer_server.hpp"
#include "transport/shaper.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>

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
};

class Engine {
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
    Result<json> abort_migration(const std::string& id);

    // Stops background work; VMs keep running.
    void shutdown();

    const config::NodeConfig& config() const { return config_; }
    // The peer endpoint's port (0 when cross-node migration is off).
    unsigned short peer_port() const { return peer_server_ ? peer_server_->port() : 0; }
    std::uint64_t peer_refusals() const { return peer_server_ ? peer_server_->refused() : 0; }

private:
    struct Vm {
        VmRecord record;
        QemuInstance qemu;
        std::string status = "unknown"; // QEMU run state, or "stopped" when it is gone
        std::optional<std::string> migration_id;
        bool deleting = false; // its QEMU is being stopped on purpose
    };
    struct MigrationState;
    struct Incoming; // a migration arriving from a peer (engine_remote.cpp)

    std::string vm_dir(const std::string& name) const;
    std::string migration_path(const std::string& id) const;
    void persist(const Vm& vm);
    void persist(const Migration& m);
    // Keeps the newest finished_migrations_per_vm ended records of a VM.
    void prune_finished(const std::string& vm);
    json vm_json(const Vm& vm) const;
    // The QMP client of a VM whose QEMU runs, or why there is none.
    Result<std::shared_ptr<qmp::Client>> running_qmp(const std::string& name) const;
    void attach(const std::shared_ptr<Vm>& vm); // subscribes to the QEMU's events and loss
    static boost::asio::awaitable<void> reap_loop(Engine* self);
    boost::asio::awaitable<void> reattach(std::shared_ptr<Vm> vm);
    boost::asio::awaitable<void> recover_migration(Migration m);

    // Migration steps (engine_migrate.cpp).
    static boost::asio::awaitable<void> run_migration(Engine* self, std::shared_ptr<MigrationState> st);
    boost::asio::awaitable<Result<void>> prepare_target(MigrationState& st);
    boost::asio::awaitable<Result<void>> start_source(MigrationState& st);
    // Shared by both kinds: record the run state and follow QEMU's events;
    // then capabilities, parameters (plus downtime-limit) and migrate.
    boost::asio::awaitable<Result<void>> begin_source(MigrationState& st);
    boost::asio::awaitable<Result<void>> send_migration(MigrationState& st, json params, std::string uri);
    boost::asio::awaitable<Result<void>> watch(MigrationState& st);
    // Feeds the model, applies the strategy's decision (engine_converge.cpp).
    boost::asio::awaitable<Result<void>> converge(MigrationState& st, std::chrono::milliseconds elapsed,
                                                  const Progress& qemu);
    // One poll of a post-copy under way: start the VM on the target, keep the
    // control channel alive, recover a broken stream.
    boost::asio::awaitable<Result<void>> follow_postcopy(MigrationState& st, const std::string& status);
    void release_throttle(MigrationState& st);
    boost::asio::awaitable<void> cancel_source(MigrationState& st);
    boost::asio::awaitable<Result<void>> switch_over(MigrationState& st);
    boost::asio::awaitable<void> hand_off(MigrationState& st);
    boost::asio::awaitable<void> fail(MigrationState& st, const Error& error);
    boost::asio::awaitable<void> ensure_source_running(MigrationState& st);
    void set_phase(MigrationState& st, Phase phase);

    // Cross-node migration (engine_remote.cpp): the source side...
    Result<void> start_peer_endpoint();
    const config::Peer* peer(const std::string& name) const;
    boost::asio::awaitable<void> release_remote(MigrationState& st, bool failed);
    boost::asio::awaitable<Result<void>> prepare_remote_target(MigrationState& st);
    boost::asio::awaitable<Result<void>> start_remote_source(MigrationState& st);
    static boost::asio::awaitable<void> accept_tunnels(Engine* self, std::shared_ptr<MigrationState> st);
    boost::asio::awaitable<Result<void>> keepalive(MigrationState& st);
    boost::asio::awaitable<Result<void>> remote_hand_off(MigrationState& st);
    boost::asio::awaitable<Result<nlohmann::json>> request(MigrationState& st, nlohmann::json message,
                                                           std::chrono::milliseconds timeout);
    // In post-copy the control channel may have to be dialled again.
    boost::asio::awaitable<Result<nlohmann::json>> request_reconnecting(MigrationState& st, nlohmann::json message,
                                                                        std::chrono::milliseconds timeout);
    Result<void> listen_tunnels(MigrationState& st, const std::string& path);
    boost::asio::awaitable<Result<void>> start_remote_postcopy(MigrationState& st);
    boost::asio::awaitable<Result<void>> recover_postcopy(MigrationState& st);
    // ...and the target side.
    static boost::asio::awaitable<void> serve_peer(Engine* self, std::shared_ptr<transport::Channel> channel);
    boost::asio::awaitable<nlohmann::json> handle_prepare(std::shared_ptr<Incoming>& in, const nlohmann::json& msg,
                                                          std::shared_ptr<transport::Channel> channel);
    boost::asio::awaitable<nlohmann::json> handle_finish(Incoming& in, const nlohmann::json& msg);
    boost::asio::awaitable<nlohmann::json> handle_start(Incoming& in);
    boost::asio::awaitable<nlohmann::json> handle_recover(Incoming& in);
    static boost::asio::awaitable<void> deliver(std::shared_ptr<Incoming> in, int index,
                                                std::shared_ptr<transport::Channel> channel);
    boost::asio::awaitable<void> drop_incoming(std::shared_ptr<Incoming> in, const std::string& why);

    boost::asio::any_io_executor ex_;
    config::NodeConfig config_;
    std::map<std::string, std::shared_ptr<Vm>> vms_;
    std::map<std::string, std::shared_ptr<MigrationState>> migrations_;
    boost::asio::steady_timer reaper_;
    bool stopping_ = false;
    std::shared_ptr<transport::TlsIdentity> tls_;
    std::unique_ptr<transport::PeerServer> peer_server_;
    transport::NodeShaper shaper_;
    std::map<std::string, std::shared_ptr<Incoming>> incoming_;
};

} // namespace ferry::engine
