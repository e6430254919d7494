#pragma once
// A block migration's disks on the source: the non-shared disks of the VM,
// copied over their own data channel (shaped with the RAM stream) by a
// DiskSender. Before QEMU starts sending RAM the disks are brought in sync
// (everything allocated, then rounds until what the guest writes during a
// round is small); while RAM moves, rounds keep them in sync in the
// background; with the guest paused before the switchover the last round
// runs, and only then does QEMU continue.
#include "engine/convergence.hpp"
#include "engine/disk_mirror.hpp"
#include "engine/migration.hpp"
#include "transport/channel.hpp"
#include "transport/shaper.hpp"

#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

namespace ferry::engine {

class SourceRun;

// Puts back the I/O limits a disk throttle replaced (m.saved_io_limits),
// keeping in the list those QEMU refused (each logged).
boost::asio::awaitable<void> restore_io_limits(std::shared_ptr<qmp::Client> qmp, Migration& m);

class SourceDisks {
public:
    explicit SourceDisks(SourceRun& run);
    ~SourceDisks();

    // The disks to mirror, each with its virtual size (what the target
    // needs before it launches QEMU): the prepare message's "disks".
    boost::asio::awaitable<Result<json>> describe();
    std::uint64_t total_bytes() const;
    // Written by the guest since the last round began: the last round's
    // work if the switchover came now.
    std::uint64_t tail_bytes() const;
    // A tail larger than this does not fit the downtime: the disk throttle
    // steps (with allow_auto_converge) until it does. 0: no budget yet.
    void set_tail_budget(std::uint64_t bytes) { tail_budget_ = bytes; }

    // How the disks reach the target: its address, the disk channel's
    // token and the migration's shaper bucket; `again` asks the target for
    // a new token after the link broke, and `ping` keeps its control
    // channel alive (each re-dials the control channel if need be, and
    // waits for the other's request to finish).
    struct Link {
        std::string address;
        std::string token;
        std::shared_ptr<transport::TokenBucket> bucket;
        std::function<boost::asio::awaitable<Result<std::string>>()> again;
        std::function<boost::asio::awaitable<Result<void>>()> ping;
    };
    // The target is ready: opens the disk channel, starts tracking writes
    // and copies until the disks are nearly in sync, pinging the target
    // meanwhile. A link that breaks is dialled again for up to
    // peer_timeout, and the round goes on where the target is.
    boost::asio::awaitable<Result<void>> sync(Link link);
    // Keeps copying in the background while RAM moves.
    void keep_up();
    // Why the mirror cannot go on: a failed background round, a broken
    // channel, or a guest that has written its disks faster than they are
    // copied for longer than `progress_timeout` seconds.
    std::optional<Error> failed(std::int64_t progress_timeout) const;
    // The round under way into the migration's progress (how far it got).
    void refresh_progress();
    // The guest is paused: the last round; the stream ends and QEMU is
    // cleaned up. Nothing the guest wrote is left behind.
    boost::asio::awaitable<Result<void>> last_round();
    // However the migration ends: ends the stream, removes bitmaps, exports
    // and the NBD server from the source QEMU (idempotent).
    boost::asio::awaitable<void> stop();

private:
    boost::asio::awaitable<Result<void>> one_round();
    // A disk channel with this token, and the stream the sender writes to it.
    boost::asio::awaitable<Result<DiskStream>> open_channel(const std::string& token);
    // Before RAM moves: a new channel after the old one broke.
    boost::asio::awaitable<Result<DiskStream>> reconnect();
    static boost::asio::awaitable<void> run_round(SourceDisks* self, std::shared_ptr<bool> alive,
                                                  std::optional<Result<void>>* out);
    static boost::asio::awaitable<void> background(SourceDisks* self, std::shared_ptr<bool> alive);
    static boost::asio::awaitable<void> carry(SourceDisks* self, std::shared_ptr<bool> alive, DiskStream end,
                                              std::shared_ptr<transport::Channel> channel, std::uint32_t generation);
    void record_results();
    // allow_auto_converge: caps the guest's disk writes when a round fell
    // behind (DiskThrottle), saving the limits it replaces in the record.
    // Whether it changed the cap.
    boost::asio::awaitable<Result<bool>> throttle(const DiskThrottle::Round& round);
    // The disk throttle may still act (allowed, above its floor, not refused).
    bool may_cap() const;
    bool over_budget(std::uint64_t dirty) const { return tail_budget_ != 0 && dirty > tail_budget_; }
    // Puts back the limits the cap replaced (idempotent).
    boost::asio::awaitable<void> restore_limits();

    SourceRun& run_;
    std::vector<MirrorDisk> disks_;
    std::unique_ptr<DiskSender> sender_;
    Link link_;
    std::uint32_t channel_generation_ = 0; // the current disk channel's
    std::optional<Error> error_;
    bool keeping_up_ = false; // the background loop runs
    bool stopping_ = false;   // it is asked to stop
    bool round_running_ = false;
    // Since when rounds have copied less than the guest wrote meanwhile,
    // with the rates of the last such round.
    std::optional<std::chrono::steady_clock::time_point> behind_since_;
    std::uint64_t copy_rate_bps_ = 0;
    DiskThrottle throttle_;
    std::uint64_t tail_budget_ = 0;
    bool cap_failed_ = false; // QEMU refused the cap: not tried again
    boost::asio::steady_timer idle_; // the background loop's pause, and its end
    std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

} // namespace ferry::engine
