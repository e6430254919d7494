#include "control/http.hpp"

namespace ferry::control {

Result<HttpRequest> parse_http_request(std::string_view head) {
    auto eol = head.find("\r\n");
    if (eol == std::string_view::npos)
        return make_error(Errc::protocol, "no request line");
    auto line = head.substr(0, eol);
    auto sp1 = line.find(' ');
    auto sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
    if (sp1 == 0 || sp2 == std::string_view::npos || sp2 == sp1 + 1)
        return make_error(Errc::protocol, "the request line is not 'METHOD PATH VERSION'");
    auto version = line.substr(sp2 + 1);
    if (version != "HTTP/1.0" && version != "HTTP/1.1")
        return make_error(Errc::protocol, "not HTTP/1.0 or HTTP/1.1");
    HttpRequest r{std::string(line.substr(0, sp1)), std::string(line.substr(sp1 + 1, sp2 - sp1 - 1))};
    for (char c : r.method)
        if (c < 'A' || c > 'Z')
            return make_error(Errc::protocol, "a method is upper-case letters");
    for (char c : r.path)
        if (static_cast<unsigned char>(c) <= ' ' || c == 0x7f)
            return make_error(Errc::protocol, "a control character or space in the path");
    // The query string does not matter (Prometheus may add one).
    if (auto q = r.path.find('?'); q != std::string::npos)
        r.path.resize(q);
    return r;
}

} // namespace ferry::control
