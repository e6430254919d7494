#pragma once
// A cross-node migration: the destination is a peer ferryd, reached over a
// control channel; each connection the source QEMU opens is tunnelled over
// its own data channel (with the target's token), shaped by the node's
// shaper. In post-copy the VM is started on the target, and a broken stream
// is recovered.
#include "engine/destination.hpp"
#include "engine/source_disks.hpp"
#include "transport/channel.hpp"
#include "transport/shaper.hpp"

#include <boost/asio/local/stream_protocol.hpp>

#include <memory>
#include <vector>

namespace ferry::engine {

class SourceRun;
class Node;

class PeerDestination final : public Destination {
public:
    PeerDestination(SourceRun& run, std::string peer_address) : run_(run), peer_address_(std::move(peer_address)) {}

    boost::asio::awaitable<Result<void>> prepare() override;
    boost::asio::awaitable<Result<void>> sync_disks() override;
    // disk_resume: the target's new token for the disk channel.
    boost::asio::awaitable<Result<std::string>> disk_token_again();
    std::uint64_t disk_bytes() const override { return disks_ ? disks_->total_bytes() : 0; }
    std::uint64_t disk_tail_bytes() const override { return disks_ ? disks_->tail_bytes() : 0; }
    void set_disk_tail_budget(std::uint64_t bytes) override {
        if (disks_)
            disks_->set_tail_budget(bytes);
    }
    Result<Stream> open_stream() override;
    boost::asio::awaitable<Result<void>> check() override;
    boost::asio::awaitable<Result<void>> before_continue() override;
    std::optional<Error> lost() const override { return std::nullopt; }
    boost::asio::awaitable<std::optional<Error>> gone() override;
    void abort_requested() override;
    void switching_over() override;
    boost::asio::awaitable<Result<void>> follow_postcopy(const std::string& status) override;
    boost::asio::awaitable<Result<void>> wait_resumed() override;
    boost::asio::awaitable<Result<void>> hand_off() override;
    void log_success() const override;
    boost::asio::awaitable<void> release(bool failed) override;
    boost::asio::awaitable<void> discard() override;
    void close() override;

private:
    // One request at a time on the control channel (the disk copy's pings
    // and its disk_resume run side by side): each waits its turn.
    boost::asio::awaitable<Result<nlohmann::json>> request(nlohmann::json message, std::chrono::milliseconds timeout);
    // The control channel dialled again if it broke (post-copy, and while
    // disks copy).
    boost::asio::awaitable<Result<nlohmann::json>> request_reconnecting(nlohmann::json message,
                                                                        std::chrono::milliseconds timeout);
    // A request and its reply, without waiting for a turn.
    boost::asio::awaitable<Result<nlohmann::json>> exchange(const nlohmann::json& message,
                                                            std::chrono::milliseconds timeout);
    boost::asio::awaitable<void> take_turn();
    // A ping at the keepalive interval; `redial`: on a control channel
    // dialled again if it broke.
    boost::asio::awaitable<Result<void>> keepalive(bool redial = false);
    boost::asio::awaitable<Result<nlohmann::json>> ping(bool redial);
    boost::asio::awaitable<void> show_silence();
    // The target's silence into the progress, once it passes a second.
    void note_silence();
    // The target's failure named in a ping's answer, if any.
    std::optional<Error> target_failure(const nlohmann::json& pong) const;
    static boost::asio::awaitable<Result<nlohmann::json>> describe_shared_disks(const config::VmSpec& spec);
    nlohmann::json finish_message() const;
    Result<void> listen_tunnels(const std::string& path);
    static boost::asio::awaitable<void> accept_tunnels(std::shared_ptr<SourceRun> run, PeerDestination* self);
    static boost::asio::awaitable<void> carry(std::shared_ptr<SourceRun> run, PeerDestination* self,
                                              boost::asio::local::stream_protocol::socket qemu,
                                              std::shared_ptr<transport::Channel> channel, std::size_t index);
    boost::asio::awaitable<Result<void>> start_postcopy();
    boost::asio::awaitable<Result<void>> recover_postcopy();
    boost::asio::awaitable<Result<void>> retry_recovery();

    SourceRun& run_;
    std::string peer_address_;
    std::shared_ptr<transport::Channel> control_;
    std::vector<std::string> tokens_;
    std::unique_ptr<boost::asio::local::stream_protocol::acceptor> tunnel_acceptor_;
    std::string tunnel_socket_;
    std::vector<std::unique_ptr<boost::asio::local::stream_protocol::acceptor>> retired_acceptors_;
    std::shared_ptr<transport::TokenBucket> bucket_;
    std::optional<Error> tunnel_error_;
    Clock::time_point last_ping_;
    // Since the first ping still without an answer (unset while it answers).
    std::optional<Clock::time_point> silent_since_;
    bool requesting_ = false; // a request holds the control channel
    std::unique_ptr<SourceDisks> disks_; // block migrations
    std::string disk_token_;
    bool postcopy_running_ = false; // the destination was told to run
    // An abort while the target prepares: told on a channel of its own, it
    // answers with the step it was at; the prepare's channel is then cut.
    struct PrepareAbort {
        std::shared_ptr<transport::Channel> control; // while the prepare waits on it
        bool sent = false;
        std::optional<std::string> during;
    };
    std::shared_ptr<PrepareAbort> prepare_abort_ = std::make_shared<PrepareAbort>();
    static boost::asio::awaitable<void> abort_prepare(std::shared_ptr<PrepareAbort> state, Node& node,
                                                      std::string address, std::string target, std::string id);
    int recoveries_ = 0;            // post-copy recoveries so far
};

} // namespace ferry::engine
