#include "engine/host_facts.hpp"

namespace ferry::engine {

namespace {

std::vector<std::string_view> lines(std::string_view text) {
    std::vector<std::string_view> out;
    while (!text.empty()) {
        auto nl = text.find('\n');
        out.push_back(text.substr(0, nl));
        text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    }
    return out;
}

std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r'))
        s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r'))
        s.remove_suffix(1);
    return s;
}

std::string_view first_word(std::string_view s) {
    s = trim(s);
    auto end = s.find_first_of(" \t");
    return s.substr(0, end);
}

} // namespace

std::string parse_qemu_version(std::string_view text) {
    constexpr std::string_view marker = "QEMU emulator version ";
    auto at = text.find(marker);
    if (at == std::string_view::npos)
        return "";
    auto rest = text.substr(at + marker.size());
    std::string v;
    for (char c : rest) {
        if ((c < '0' || c > '9') && c != '.')
            break;
        v += c;
    }
    return v;
}

std::vector<std::string> parse_machine_help(std::string_view text) {
    std::vector<std::string> out;
    bool started = false;
    for (auto line : lines(text)) {
        if (!started) {
            started = trim(line).rfind("Supported machines are:", 0) == 0;
            continue;
        }
        auto w = first_word(line);
        if (!w.empty())
            out.emplace_back(w);
    }
    return out;
}

std::vector<std::string> parse_cpu_help(std::string_view text) {
    std::vector<std::string> out;
    for (auto line : lines(text)) {
        auto t = trim(line);
        if (t.rfind("x86 ", 0) != 0)
            continue;
        auto w = first_word(t.substr(4));
        if (!w.empty())
            out.emplace_back(w);
    }
    return out;
}

std::uint64_t parse_meminfo_total(std::string_view text) {
    for (auto line : lines(text)) {
        if (line.rfind("MemTotal:", 0) != 0)
            continue;
        auto rest = trim(line.substr(9));
        std::uint64_t kib = 0;
        std::size_t digits = 0;
        for (char c : rest) {
            if (c < '0' || c > '9' || ++digits > 15)
                break;
            kib = kib * 10 + static_cast<std::uint64_t>(c - '0');
        }
        return kib * 1024;
    }
    return 0;
}

std::string parse_cpu_model_name(std::string_view text) {
    for (auto line : lines(text)) {
        if (line.rfind("model name", 0) != 0)
            continue;
        auto colon = line.find(':');
        if (colon == std::string_view::npos)
            continue;
        return std::string(trim(line.substr(colon + 1)));
    }
    return "";
}

} // namespace ferry::engine
