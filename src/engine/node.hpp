#pragma once
// What a migration run may use of the node it runs on. The Engine implements
// it; runs hold a reference and never see the rest of the engine.
#include "config/node_config.hpp"
#include "engine/migration.hpp"
#include "engine/vm.hpp"
#include "transport/shaper.hpp"
#include "transport/tls.hpp"
#include "transport/tokens.hpp"

#include <boost/asio/any_io_executor.hpp>

#include <memory>
#include <optional>
#include <string>

namespace ferry::engine {

class TargetRun;

class Node {
public:
    virtual const config::NodeConfig& config() const = 0;
    virtual boost::asio::any_io_executor executor() const = 0;
    virtual std::string vm_dir(const std::string& name) const = 0;
    virtual void persist(const Migration& m) = 0;

    // VMs: save a record; follow a QEMU's events and loss; take in a VM that
    // arrived (record kept, attached, saved); forget one that left.
    virtual void persist(const Vm& vm) = 0;
    virtual void attach(const std::shared_ptr<Vm>& vm) = 0;
    virtual bool has_vm(const std::string& name) const = 0;
    virtual void add_vm(const std::shared_ptr<Vm>& vm) = 0;
    virtual void forget_vm(const std::string& name) = 0;
    // The VM on this node whose spec names a disk at `path` (the same file,
    // also through a link), if any: a target image must never be its.
    virtual std::optional<std::string> vm_using_disk(const std::string& path) const = 0;

    // Migration records (what list and show report). A run keeps its own
    // copy up to date through the pointer, which is null once pruned.
    virtual bool has_migration(const std::string& id) const = 0;
    virtual void add_migration(const Migration& m) = 0;
    virtual Migration* migration(const std::string& id) = 0;

    // Cross-node: the TLS identity (null with disable_tls), the node-wide
    // shaper, and the data-channel tokens the peer endpoint admits.
    virtual std::shared_ptr<transport::TlsIdentity> tls() const = 0;
    virtual transport::NodeShaper& shaper() = 0;
    virtual transport::TokenRegistry* tokens() = 0;

    // Migrations arriving from peers, by id, while they arrive.
    virtual std::optional<std::string> arriving(const std::string& vm) const = 0;
    virtual std::size_t arriving_count() const = 0;
    // Why this node takes no migrations in now (cordoned), or empty.
    virtual std::string refuses_arrivals() const = 0;
    virtual void add_arriving(const std::shared_ptr<TargetRun>& run) = 0;
    virtual void remove_arriving(const std::string& id) = 0;

    // A contact with a peer over a control channel, either way: whether it
    // worked, and why not (the metrics' peer state).
    virtual void note_peer(const std::string& peer, bool ok, const std::string& why = "") = 0;

    // A migration whose hand-off got no answer: the target may run the VM.
    // The node asks the target until it answers (recovery.cpp), the VM
    // meanwhile neither resumed nor removed here.
    virtual void leave_in_doubt(const std::string& id, std::string cause) = 0;

    // Into the node's event log (events.hpp).
    virtual void publish(std::string type, const std::string& vm, const std::string& migration,
                         nlohmann::json data) = 0;

protected:
    ~Node() = default;
};

} // namespace ferry::engine
