// Fuzz target: one control-protocol request line as a local client sends it,
// then its parameters read the way the methods read them.
#include "control/protocol.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view line(reinterpret_cast<const char*>(data), size);
    ferry::control::json id;
    auto request = ferry::control::parse_request(line, id);
    if (!request)
        return 0;
    ferry::control::Params p(request->method, request->params);
    (void)p.string("name");
    (void)p.optional_string("target_node");
    (void)p.optional_bool("allow_post_copy");
    (void)p.optional_int("max_downtime_ms", 1, 3'600'000);
    (void)p.optional_quantity("bandwidth");
    (void)p.optional_object("arguments");
    (void)ferry::dump_json(ferry::control::error_reply(id, ferry::make_error(ferry::Errc::protocol, "x")));
    return 0;
}
