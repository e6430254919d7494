#pragma once
// QMP messages as QEMU sends them, decoded apart from the socket: a greeting,
// an event, or a reply to a command (matched by id). Pure: no I/O. Anything
// malformed is an Errc::protocol error, never an exception.
#include "common/error.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ferry::qmp {

using json = nlohmann::json;

struct Event {
    std::string name;
    json data;                     // "data" member, {} when absent
    std::int64_t timestamp_us = 0; // QEMU's wall-clock timestamp
};

struct Message {
    enum class Kind { greeting, event, reply, unmatched } kind = Kind::unmatched;
    Event event;                 // kind == event
    std::uint64_t id = 0;        // kind == reply
    std::optional<json> result;  // reply: "return"
    std::optional<json> error;   // reply: "error"
    json greeting;               // kind == greeting: the "QMP" member
};

// One line from QEMU. A reply without a usable id is `unmatched`.
Result<Message> decode_message(std::string_view line);

// Formats a QMP error reply: "<command>: <class>: <desc>".
Error qemu_error(std::string_view command, const json& error);

} // namespace ferry::qmp
