// Fuzz target: the request head a metrics client (any local or remote
// process that reaches [metrics] listen) sends.
#include "control/http.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view head(reinterpret_cast<const char*>(data), size);
    auto r = ferry::control::parse_http_request(head);
    if (!r)
        return 0;
    // What it accepts is a sane request line.
    if (r->method.empty() || r->path.find_first_of(" \r\n?") != std::string::npos)
        __builtin_trap();
    return 0;
}
