#include "transport/frame.hpp"

#include "common/json.hpp"

#include <fmt/format.h>

namespace ferry::transport {

std::string encode_frame(const nlohmann::json& message) {
    std::string body = dump_json(message);
    auto n = static_cast<std::uint32_t>(body.size());
    std::string out;
    out.reserve(4 + body.size());
    out.push_back(static_cast<char>(n >> 24));
    out.push_back(static_cast<char>(n >> 16));
    out.push_back(static_cast<char>(n >> 8));
    out.push_back(static_cast<char>(n));
    out += body;
    return out;
}

std::optional<Result<nlohmann::json>> FrameDecoder::next() {
    if (poisoned_)
        return Result<nlohmann::json>(make_error(Errc::protocol, "broken frame stream"));
    if (buffer_.size() < 4)
        return std::nullopt;
    auto byte = [&](std::size_t i) { return static_cast<std::uint32_t>(static_cast<unsigned char>(buffer_[i])); };
    std::uint32_t n = byte(0) << 24 | byte(1) << 16 | byte(2) << 8 | byte(3);
    if (n > max_frame) {
        poisoned_ = true;
        return Result<nlohmann::json>(make_error(Errc::protocol, fmt::format("frame of {} bytes is over the {} limit", n, max_frame)));
    }
    if (buffer_.size() < 4 + n)
        return std::nullopt;
    auto j = parse_json(std::string_view(buffer_).substr(4, n), JsonLimits{32});
    buffer_.erase(0, 4 + n);
    if (!j || !j->is_object() || !j->contains("type") || !(*j)["type"].is_string()) {
        poisoned_ = true;
        return Result<nlohmann::json>(make_error(
            Errc::protocol, j ? "frame is not a JSON object with a \"type\"" : "frame: " + j.error().message));
    }
    return ok(std::move(*j));
}

} // namespace ferry::transport
