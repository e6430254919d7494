#pragma once
// A same-node migration: the destination QEMU runs on this node, QEMU's own
// max-bandwidth shapes the stream, and no channel is encrypted.
#include "engine/destination.hpp"
#include "engine/hooks.hpp"
#include "engine/vm.hpp"

namespace ferry::engine {

class SourceRun;

class LocalDestination final : public Destination {
public:
    explicit LocalDestination(SourceRun& run) : run_(run) {}

    boost::asio::awaitable<Result<void>> prepare() override;
    Result<Stream> open_stream() override;
    boost::asio::awaitable<Result<void>> check() override;
    std::optional<Error> lost() const override;
    void switching_over() override {}
    boost::asio::awaitable<Result<void>> follow_postcopy(const std::string& status) override;
    boost::asio::awaitable<Result<void>> wait_resumed() override;
    boost::asio::awaitable<Result<void>> hand_off() override;
    void log_success() const override;
    boost::asio::awaitable<void> release(bool failed) override;
    boost::asio::awaitable<void> discard() override;
    void close() override {}

private:
    boost::asio::awaitable<void> measure_blackout(const std::vector<Heartbeat>& source_beats);
    // The target side's hooks of a phase (the source's are SourceRun's).
    boost::asio::awaitable<Result<void>> hooks(HookPhase phase);
    bool hooks_started_ = false;

    SourceRun& run_;
    QemuInstance target_;
};

} // namespace ferry::engine
