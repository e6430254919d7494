#pragma once
// Control-channel framing: a 4-byte big-endian length, then a JSON object.
// Every frame carries "type"; the hello frame carries the protocol version.
#include "common/error.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

namespace ferry::transport {

// 2: disk streams end with an end record and resume after a cut.
constexpr std::uint32_t protocol_version = 2;
constexpr std::size_t max_frame = 1 << 20;

std::string encode_frame(const nlohmann::json& message);

// Incremental decoder: feed bytes as they come; next() yields whole frames.
// A frame over max_frame, or one that is not a JSON object with a string
// "type", is an error and poisons the decoder (the peer is broken).
class FrameDecoder {
public:
    void feed(const char* data, std::size_t n) { buffer_.append(data, n); }
    // A frame, nothing yet (empty optional), or an error.
    std::optional<Result<nlohmann::json>> next();
    // The bytes fed past the last whole frame (a stream that follows it).
    std::string take_rest() { return std::exchange(buffer_, {}); }

private:
    std::string buffer_;
    bool poisoned_ = false;
};

} // namespace ferry::transport
