#pragma once
// Sizes and rates as operators write them: "64Mi", "1Gi", "500M", "4096".
#include "common/error.hpp"

#include <cstdint>
#include <string>
#include <string_view>

namespace ferry::config {

// Binary suffixes Ki Mi Gi Ti (powers of 1024), decimal k/K M G T (powers of
// 1000), or none (bytes). A fraction is allowed with a suffix ("1.5Gi") as
// long as the result is a whole number of bytes.
Result<std::uint64_t> parse_quantity(std::string_view text);

// The shortest exact binary form: 67108864 -> "64Mi", 1000 -> "1000".
std::string format_quantity(std::uint64_t bytes);

} // namespace ferry::config
