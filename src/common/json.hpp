#pragma once
// Parsing JSON that another process or a user wrote: its nesting depth (and,
// where asked, its number of values) is checked in one pass over the text
// before the parser allocates anything; the error says where it went wrong.
#include "common/error.hpp"

#include <nlohmann/json.hpp>

#include <cstddef>
#include <limits>
#include <optional>
#include <string_view>

namespace ferry {

struct JsonLimits {
    std::size_t max_depth = 64; // nested arrays/objects
    // Arrays and objects plus separators (commas): roughly the values a text
    // holds. Unlimited by default: the text's own size bounds it then.
    std::size_t max_values = std::numeric_limits<std::size_t>::max();
};

// Errc::protocol with the byte offset on a syntax error or a limit exceeded.
Result<nlohmann::json> parse_json(std::string_view text, JsonLimits limits = {});

// The offset of the first byte that is not valid UTF-8, if any (JSON text
// and TOML both must be UTF-8).
std::optional<std::size_t> invalid_utf8_at(std::string_view text);

// Serialises for the wire: invalid UTF-8 in a string (a path, a QEMU
// message) becomes U+FFFD instead of an exception.
std::string dump_json(const nlohmann::json& j, int indent = -1);

} // namespace ferry
