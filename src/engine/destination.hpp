#pragma once
// Where an outgoing migration goes: a QEMU on this node, or a peer ferryd.
// Chosen once when the migration is created; the source run's phases call
// it where same-node and cross-node differ.
#include "common/error.hpp"
#include "engine/migration.hpp"

#include <boost/asio/awaitable.hpp>

#include <optional>
#include <string>

namespace ferry::engine {

class Destination {
public:
    virtual ~Destination() = default;

    // Between PreparingTarget and TargetReady: a QEMU waits for the stream.
    virtual boost::asio::awaitable<Result<void>> prepare() = 0;

    // Between TargetReady and the RAM stream: a block migration brings its
    // disks nearly in sync, and keeps them so in the background.
    virtual boost::asio::awaitable<Result<void>> sync_disks() { co_return Result<void>{}; }
    // The local disks' virtual size (they count like RAM for the timeouts).
    virtual std::uint64_t disk_bytes() const { return 0; }
    // What the disks' last round would copy if the switchover came now
    // (written since the last round began), and how much of it the
    // downtime can take: above that, the disk throttle steps.
    virtual std::uint64_t disk_tail_bytes() const { return 0; }
    virtual void set_disk_tail_budget(std::uint64_t /*bytes*/) {}

    // Where the source QEMU sends, and the parameters that go with it
    // (bandwidth, multifd); asked once the source follows its events.
    struct Stream {
        json params;
        std::string uri;
    };
    virtual Result<Stream> open_stream() = 0;

    // Once per poll of the pre-copy: why the migration cannot go on.
    virtual boost::asio::awaitable<Result<void>> check() = 0;
    // The destination QEMU is known to be gone (only a local one is seen).
    virtual std::optional<Error> lost() const = 0;
    // An abort was requested: a destination still being prepared is told
    // at once (the prepare fails with why), not after it answers.
    virtual void abort_requested() {}
    // QEMU reported the migration failed: the destination's side of it
    // (its QEMU exited, the arrival was dropped and why), when it has one.
    virtual boost::asio::awaitable<std::optional<Error>> gone() { co_return lost(); }

    // The guest is paused for the last round (not in post-copy).
    virtual void switching_over() = 0;
    // Paused before the switchover, before QEMU continues: the disks' last
    // round.
    virtual boost::asio::awaitable<Result<void>> before_continue() { co_return Result<void>{}; }
    // One poll of a post-copy under way (status: QEMU's migration status).
    virtual boost::asio::awaitable<Result<void>> follow_postcopy(const std::string& status) = 0;
    // The stream is complete: until the destination runs the VM.
    virtual boost::asio::awaitable<Result<void>> wait_resumed() = 0;
    // The VM moves to the destination; the source QEMU goes.
    virtual boost::asio::awaitable<Result<void>> hand_off() = 0;
    virtual void log_success() const = 0;

    // After the run, success or not: what the destination holds of this node.
    virtual boost::asio::awaitable<void> release(bool failed) = 0;
    // A failed migration: the destination QEMU goes (kept in post-copy).
    virtual boost::asio::awaitable<void> discard() = 0;
    // The very end of the run.
    virtual void close() = 0;
};

} // namespace ferry::engine
