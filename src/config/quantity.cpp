#include "config/quantity.hpp"

#include <fmt/format.h>

#include <array>
#include <charconv>
#include <utility>

namespace ferry::config {

namespace {

constexpr std::array<std::pair<std::string_view, std::uint64_t>, 9> suffixes{{
    {"Ki", 1ULL << 10}, {"Mi", 1ULL << 20}, {"Gi", 1ULL << 30}, {"Ti", 1ULL << 40},
    {"k", 1000ULL}, {"K", 1000ULL}, {"M", 1000ULL * 1000}, {"G", 1000ULL * 1000 * 1000},
    {"T", 1000ULL * 1000 * 1000 * 1000},
}};

Error bad(std::string_view text, std::string_view why) {
    return make_error(Errc::invalid_argument,
                      fmt::format("bad quantity \"{}\": {} (use bytes or a suffix like 64Mi, "
                                  "1Gi, 500M)",
                                  text, why));
}

} // namespace

Result<std::uint64_t> parse_quantity(std::string_view text) {
    if (text.empty())
        return bad(text, "empty");
    std::size_t digits_end = 0;
    while (digits_end < text.size() &&
           ((text[digits_end] >= '0' && text[digits_end] <= '9') || text[digits_end] == '.'))
        ++digits_end;
    std::string_view number = text.substr(0, digits_end);
    std::string_view suffix = text.substr(digits_end);
    if (number.empty())
        return bad(text, "no number");

    std::uint64_t multiplier = 1;
    if (!suffix.empty()) {
        bool found = false;
        for (auto& [name, value] : suffixes) {
            if (suffix == name) {
                multiplier = value;
                found = true;
            }
        }
        if (!found)
            return bad(text, fmt::format("unknown suffix \"{}\"", suffix));
    }

    auto dot = number.find('.');
    std::string_view whole = number.substr(0, dot);
    std::string_view frac = dot == std::string_view::npos ? std::string_view{} : number.substr(dot + 1);
    if (dot != std::string_view::npos && (frac.empty() || frac.find('.') != std::string_view::npos))
        return bad(text, "malformed number");
    if (whole.empty())
        return bad(text, "malformed number");

    std::uint64_t w = 0;
    auto [p, ec] = std::from_chars(whole.data(), whole.data() + whole.size(), w);
    if (ec != std::errc{} || p != whole.data() + whole.size())
        return bad(text, "number too large");
    if (w != 0 && multiplier > UINT64_MAX / w)
        return bad(text, "too large");
    std::uint64_t result = w * multiplier;

    if (!frac.empty()) {
        if (frac.size() > 6)
            return bad(text, "more than 6 decimals");
        std::uint64_t f = 0;
        std::from_chars(frac.data(), frac.data() + frac.size(), f);
        std::uint64_t scale = 1;
        for (std::size_t i = 0; i < frac.size(); ++i)
            scale *= 10;
        // multiplier <= 2^40 and f < 10^6 < 2^20: the product fits in 64 bits.
        std::uint64_t part = f * multiplier;
        if (part % scale != 0)
            return bad(text, "not a whole number of bytes");
        auto add = static_cast<std::uint64_t>(part / scale);
        if (result > UINT64_MAX - add)
            return bad(text, "too large");
        result += add;
    }
    return result;
}

std::string format_quantity(std::uint64_t bytes) {
    constexpr std::array<std::pair<const char*, std::uint64_t>, 4> units{
        {{"Ti", 1ULL << 40}, {"Gi", 1ULL << 30}, {"Mi", 1ULL << 20}, {"Ki", 1ULL << 10}}};
    if (bytes == 0)
        return "0";
    for (auto& [name, value] : units)
        if (bytes % value == 0)
            return fmt::format("{}{}", bytes / value, name);
    return fmt::format("{}", bytes);
}

} // namespace ferry::config
