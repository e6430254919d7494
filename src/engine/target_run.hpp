#pragma once
// The incoming side of a cross-node migration: a destination QEMU launched
// from the source's spec, its data channels admitted in the order the source
// QEMU opened them, and the VM taken in only when the source says "finish".
// The peer endpoint (Engine::serve_peer) hands it the source's messages.
#include "config/vm_spec.hpp"
#include "engine/disk_mirror.hpp"
#include "engine/hooks.hpp"
#include "engine/migration.hpp"
#include "engine/node.hpp"
#include "engine/vm.hpp"
#include "transport/channel.hpp"

#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>

#include "common/fd.hpp"

#include <memory>
#include <optional>
#include <vector>
#include <string>

namespace ferry::engine {

class TargetRun : public std::enable_shared_from_this<TargetRun> {
public:
    TargetRun(Node& node, std::string source_node);

    // "prepare": checks what the source sent, launches the destination QEMU
    // and lets it listen; answers target_ready (with the data-channel
    // tokens) or an error. prepared() tells which.
    boost::asio::awaitable<nlohmann::json> prepare(const nlohmann::json& msg);
    // "start": post-copy; the VM runs here from now on.
    boost::asio::awaitable<nlohmann::json> start();
    // "finish": the stream is complete; the VM becomes this node's.
    boost::asio::awaitable<nlohmann::json> finish(const nlohmann::json& msg);
    boost::asio::awaitable<nlohmann::json> finish_steps(const nlohmann::json& msg);
    // The shared disks here are the images the source uses: format and
    // virtual size as the source sees them. "" or why not.
    boost::asio::awaitable<std::string> check_shared_disks();
    // "recover": a broken post-copy stream; listen again, new tokens.
    boost::asio::awaitable<nlohmann::json> recover();
    // "disk_resume": the disk channel broke; a token for a new one.
    nlohmann::json resume_disks();
    // The control channel the source speaks on now (identity only).
    void set_control(const void* channel);
    const void* control() const { return control_; }
    // That channel is gone. While only disks move, the arrival waits
    // peer_timeout for the source to come back on a new one; otherwise (or
    // then) it is given up.
    boost::asio::awaitable<void> control_lost(const void* channel, std::string why);
    // The "qemu" of a pong: "running", or why not.
    std::string qemu_state() const;
    // Gives up the arrival: the destination QEMU goes, the record says why.
    boost::asio::awaitable<void> drop(std::string why);

    // launcher = "external": the QEMU the stack started for this arrival
    // (with the argv of the "launch" event) registers here; ferry checks it
    // (pid, inmigrate, memory, vCPUs), hands it the descriptors (add-fd,
    // with their names as opaque) and drives it from then on.
    struct NamedFd {
        std::string name;
        UniqueFd fd;
    };
    boost::asio::awaitable<Result<nlohmann::json>> register_external(std::string qmp_socket, int pid,
                                                                     std::vector<NamedFd> fds);

    // Connects a data channel to the destination QEMU, in order.
    static boost::asio::awaitable<void> deliver(std::shared_ptr<TargetRun> run, int index,
                                                std::shared_ptr<transport::Channel> channel);

    bool prepared() const { return prepared_; }
    bool finished() const { return finished_; }
    // A "finish" is under way: the guest may be resumed here any moment.
    bool finishing() const { return finishing_; }
    // Why the arrival cannot go on: given up, or its disks could not be
    // written ("" while it goes on or once it arrived).
    std::string failure() const;
    // What the arrival is doing now, for a source that aborts it.
    const std::string& step() const { return step_; }
    const Migration& migration() const { return m_; }
    const std::string& vm_name() const { return spec_.name; }
    const config::VmSpec& spec() const { return spec_; }
    const std::string& source_node() const { return source_node_; }

private:
    // The checks a prepare gets before anything starts; an error text or "".
    std::string check_prepare(const nlohmann::json& msg);
    std::string check_arrival() const;
    // Block migrations: the target images, mapped and made (off the loop).
    boost::asio::awaitable<std::string> prepare_images();
    boost::asio::awaitable<std::string> export_disks();
    static boost::asio::awaitable<void> receive_disks(std::shared_ptr<TargetRun> run,
                                                      std::shared_ptr<transport::Channel> channel);
    boost::asio::awaitable<std::string> wait_disks();
    // Disks arrive and RAM has not started: a broken link can be resumed.
    bool disks_only() const;
    static boost::asio::awaitable<void> await_control(std::shared_ptr<TargetRun> run, std::uint64_t epoch,
                                                      std::string why);
    // The destination QEMU of a block arrival exited: the disk stream stops.
    static boost::asio::awaitable<void> lost_qemu(std::shared_ptr<TargetRun> run, std::string why);
    void remove_created_images();
    boost::asio::awaitable<Result<nlohmann::json>> listen();
    nlohmann::json issue_tokens(int count);
    boost::asio::awaitable<std::string> wait_loaded();
    std::shared_ptr<Vm> take_in(bool resume);
    boost::asio::awaitable<nlohmann::json> measure_blackout(const nlohmann::json& msg, const Vm& vm);

    // Ends the arrival's hold on the VM's name and removes its directory.
    void release();
    static boost::asio::awaitable<void> release_after_hooks(std::shared_ptr<TargetRun> run);
    // This side's hooks of a phase; aborted runs only where prepare did.
    boost::asio::awaitable<Result<void>> hooks(HookPhase phase, Clock::time_point deadline);
    // Publishes the "launch" event and waits for register_external.
    boost::asio::awaitable<Result<QemuInstance>> await_external(std::chrono::seconds wait);
    // announce-self, when [hooks] announce_self; a failure is a warning.
    boost::asio::awaitable<void> announce(qmp::Client& qmp);

    Node& node_;
    config::HooksSection hooks_config_; // as when the arrival began (a reload changes later ones)
    Migration m_;
    bool hooks_started_ = false;
    int qemu_pid_for_hooks_ = -1; // the QEMU the VM runs in once taken in
    config::VmSpec spec_;
    QemuInstance qemu_;
    bool awaiting_launch_ = false;         // launcher = external: the launch event is out
    bool registering_ = false;             // a register_external is being checked
    std::optional<QemuInstance> launched_; // what registered
    boost::asio::steady_timer launch_wait_; // woken when it did (or the arrival ended)
    std::string source_node_;
    int channels_ = 1;
    int next_index_ = 0;              // data channels reach QEMU in this order
    boost::asio::steady_timer order_; // woken when next_index_ moves
    bool prepared_ = false;
    bool finished_ = false;
    bool finishing_ = false;
    std::string dropped_why_;
    std::string step_ = "checking the request";
    const void* control_ = nullptr; // the source's control channel
    std::uint64_t control_epoch_ = 0; // moves with every change of it
    std::string listen_socket_; // where QEMU listens (changes with each post-copy recovery)
    int recoveries_ = 0;

    // Block migrations.
    std::vector<SharedDisk> shared_;                    // as the source sees them
    std::vector<MirrorDisk> mirrored_;                  // path: the target image
    std::vector<std::string> created_;                  // images made here: a failed arrival removes them
    std::vector<std::optional<NbdTarget>> nbd_targets_; // qcow2: the destination QEMU's writable export
    std::unique_ptr<DiskReceiver> receiver_;
    bool disk_channel_taken_ = false;
    std::optional<Result<void>> disks_done_; // the receiver's outcome
};

// An error reply on the control channel.
nlohmann::json error_message(const std::string& why);

} // namespace ferry::engine
