#include "engine/heartbeat.hpp"

#include <charconv>

namespace ferry::engine {

std::optional<Heartbeat> parse_heartbeat(std::string_view line, std::int64_t host_ms) {
    constexpr std::string_view tag = "FERRY-HB ";
    auto pos = line.find(tag);
    if (pos == std::string_view::npos)
        return std::nullopt;
    const char* p = line.data() + pos + tag.size();
    const char* end = line.data() + line.size();
    Heartbeat hb;
    hb.host_ms = host_ms;
    auto r1 = std::from_chars(p, end, hb.seq);
    if (r1.ec != std::errc{} || r1.ptr == end || *r1.ptr != ' ')
        return std::nullopt;
    auto r2 = std::from_chars(r1.ptr + 1, end, hb.interval_ms);
    if (r2.ec != std::errc{} || hb.interval_ms == 0)
        return std::nullopt;
    return hb;
}

std::optional<std::int64_t> guest_blackout_ms(const std::vector<Heartbeat>& source,
                                              const std::vector<Heartbeat>& destination) {
    if (source.empty())
        return std::nullopt;
    const Heartbeat& last = source.back();
    for (const Heartbeat& first : destination) {
        if (first.seq <= last.seq)
            continue; // a replay of what the source already printed
        auto guest_time = static_cast<std::int64_t>(first.seq - last.seq) * last.interval_ms;
        auto gap = first.host_ms - last.host_ms;
        return std::max<std::int64_t>(0, gap - guest_time);
    }
    return std::nullopt;
}

std::vector<std::string> LineSplitter::feed(std::string_view data) {
    std::vector<std::string> out;
    auto cut = [&] {
        while (partial_.size() > line_max_) {
            out.push_back(partial_.substr(0, line_max_));
            partial_.erase(0, line_max_);
        }
    };
    while (!data.empty()) {
        auto nl = data.find('\n');
        partial_.append(data.substr(0, nl));
        cut();
        if (nl == std::string_view::npos)
            break;
        if (!partial_.empty() && partial_.back() == '\r')
            partial_.pop_back();
        out.push_back(std::exchange(partial_, {}));
        data.remove_prefix(nl + 1);
    }
    return out;
}

} // namespace ferry::engine
