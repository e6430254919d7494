#include "common/json.hpp"

#include <fmt/format.h>

namespace ferry {

namespace {

// One pass over the text outside strings: depth and a count of values that
// allocate (containers) or separate (commas), before the parser allocates.
Result<void> check_shape(std::string_view text, const JsonLimits& limits) {
    std::size_t depth = 0, values = 0;
    bool in_string = false, escaped = false;
    for (std::size_t i = 0; i < text.size(); ++i) {
        char c = text[i];
        if (in_string) {
            if (escaped)
                escaped = false;
            else if (c == '\\')
                escaped = true;
            else if (c == '"')
                in_string = false;
            continue;
        }
        switch (c) {
        case '"': in_string = true; break;
        case '[':
        case '{':
            if (++depth > limits.max_depth)
                return make_error(Errc::protocol, fmt::format("JSON nested deeper than {} levels at byte {}",
                                                              limits.max_depth, i));
            [[fallthrough]];
        case ',':
            if (++values > limits.max_values)
                return make_error(Errc::protocol,
                                  fmt::format("JSON holds more than {} values (at byte {})", limits.max_values, i));
            break;
        case ']':
        case '}':
            if (depth > 0)
                --depth;
            break;
        default: break;
        }
    }
    return {};
}

} // namespace

Result<nlohmann::json> parse_json(std::string_view text, JsonLimits limits) {
    if (auto shape = check_shape(text, limits); !shape)
        return shape.error();
    try {
        return ok(nlohmann::json::parse(text));
    } catch (const nlohmann::json::exception& e) {
        // A syntax error (parse_error) or a number too large for a double
        // (out_of_range); e.what() starts with "[json.exception.<kind>.<n>] ".
        std::string what = e.what();
        auto text = what.find("] ");
        return make_error(Errc::protocol,
                          fmt::format("not valid JSON: {}", text == std::string::npos ? what : what.substr(text + 2)));
    }
}

std::optional<std::size_t> invalid_utf8_at(std::string_view text) {
    auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
    for (std::size_t i = 0; i < text.size();) {
        unsigned char c = byte(i);
        std::size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        if (len == 0 || i + len > text.size())
            return i;
        std::uint32_t cp = len == 1 ? c : c & (0x7F >> len);
        for (std::size_t k = 1; k < len; ++k) {
            if ((byte(i + k) & 0xC0) != 0x80)
                return i;
            cp = cp << 6 | (byte(i + k) & 0x3F);
        }
        // Overlong forms, surrogates and code points past U+10FFFF are invalid.
        static constexpr std::uint32_t min_for_len[] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_for_len[len] || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
            return i;
        i += len;
    }
    return std::nullopt;
}

std::string dump_json(const nlohmann::json& j, int indent) {
    return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

} // namespace ferry
