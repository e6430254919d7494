#include "qmp/message.hpp"

#include "common/json.hpp"

#include <fmt/format.h>

#include <limits>

namespace ferry::qmp {

namespace {

std::string string_member(const json& j, const char* key, const char* fallback) {
    auto it = j.find(key);
    return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
}

constexpr std::int64_t max_timestamp_seconds = std::numeric_limits<std::int64_t>::max() / 1'000'000 - 1;

std::int64_t int_member(const json& j, const char* key) {
    auto it = j.find(key);
    return it != j.end() && it->is_number_integer() ? it->get<std::int64_t>() : 0;
}

} // namespace

Error qemu_error(std::string_view command, const json& error) {
    if (!error.is_object())
        return make_error(Errc::qemu, fmt::format("{}: {}", command, dump_json(error).substr(0, 200)));
    return make_error(Errc::qemu, fmt::format("{}: {}: {}", command, string_member(error, "class", "GenericError"),
                                              string_member(error, "desc", "(no description)")));
}

Result<Message> decode_message(std::string_view line) {
    // QEMU's answers are big (query-qmp-schema) and may nest a level per
    // backing image (query-named-block-nodes); the bound only stops abuse.
    auto parsed = parse_json(line, JsonLimits{1000});
    if (!parsed)
        return parsed.error().wrap("from QEMU");
    if (!parsed->is_object())
        return make_error(Errc::protocol, fmt::format("from QEMU: a JSON {}, not an object", parsed->type_name()));
    auto& j = *parsed;
    Message m;
    if (auto q = j.find("QMP"); q != j.end()) {
        m.kind = Message::Kind::greeting;
        m.greeting = *q;
        return m;
    }
    if (auto ev = j.find("event"); ev != j.end()) {
        if (!ev->is_string())
            return make_error(Errc::protocol, "from QEMU: an event whose name is not a string");
        m.kind = Message::Kind::event;
        m.event.name = ev->get<std::string>();
        auto data = j.find("data");
        m.event.data = data != j.end() ? *data : json::object();
        if (auto ts = j.find("timestamp"); ts != j.end() && ts->is_object()) {
            // QEMU's wall clock; one that does not fit in microseconds is dropped.
            std::int64_t seconds = int_member(*ts, "seconds"), micros = int_member(*ts, "microseconds");
            if (seconds >= 0 && seconds < max_timestamp_seconds && micros >= 0 && micros < 1'000'000)
                m.event.timestamp_us = seconds * 1'000'000 + micros;
        }
        return m;
    }
    if (auto r = j.find("return"); r != j.end())
        m.result = std::move(*r);
    else if (auto e = j.find("error"); e != j.end())
        m.error = std::move(*e);
    else
        return make_error(Errc::protocol,
                          fmt::format("from QEMU: neither return, error nor event: {}", dump_json(j).substr(0, 200)));
    auto id = j.find("id");
    if (id != j.end() && id->is_number_unsigned()) {
        m.kind = Message::Kind::reply;
        m.id = id->get<std::uint64_t>();
    }
    return m;
}

} // namespace ferry::qmp
