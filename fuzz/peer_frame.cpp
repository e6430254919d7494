// Fuzz target: bytes from a peer's control channel, cut into frames.
#include "transport/frame.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    ferry::transport::FrameDecoder decoder;
    // Fed in two pieces: frames split across reads must decode the same.
    std::size_t half = size / 2;
    decoder.feed(reinterpret_cast<const char*>(data), half);
    for (int i = 0; i < 64; ++i) {
        auto f = decoder.next();
        if (!f || !*f)
            break;
    }
    decoder.feed(reinterpret_cast<const char*>(data) + half, size - half);
    for (int i = 0; i < 64; ++i) {
        auto f = decoder.next();
        if (!f || !*f)
            break;
        (void)ferry::transport::encode_frame(**f);
    }
    return 0;
}
