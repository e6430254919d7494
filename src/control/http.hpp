#pragma once
// The little of HTTP/1.x the metrics listener reads: the request line.
#include "common/error.hpp"

#include <string>
#include <string_view>

namespace ferry::control {

struct HttpRequest {
    std::string method;
    std::string path; // without its query string
};

// "GET /metrics HTTP/1.1\r\n..." -> method and path; errors say what is wrong.
Result<HttpRequest> parse_http_request(std::string_view head);

} // namespace ferry::control
