#pragma once
// Carries one QEMU connection (a Unix socket) over one peer channel, both
// directions at once, with large buffers reused for the channel's life and
// shaping on the way out.
#include "transport/channel.hpp"
#include "transport/shaper.hpp"

#include <boost/asio/local/stream_protocol.hpp>

#include <atomic>
#include <memory>

namespace ferry::transport {

struct TunnelStats {
    std::uint64_t to_peer = 0;   // bytes from QEMU to the peer
    std::uint64_t from_peer = 0; // bytes from the peer to QEMU
};

// Runs until both directions end or either fails; closes both ends.
// outbound shapes what goes to the peer (null: unshaped).
asio::awaitable<Result<TunnelStats>> run_tunnel(asio::local::stream_protocol::socket qemu,
                                                std::shared_ptr<Channel> channel,
                                                std::shared_ptr<TokenBucket> outbound);

constexpr std::size_t tunnel_buffer = 1 << 20;

} // namespace ferry::transport
