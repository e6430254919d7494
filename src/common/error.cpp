#include "common/error.hpp"

#include <stdexcept>

namespace ferry {

std::string_view to_string(Errc c) {
    switch (c) {
    case Errc::invalid_argument: return "invalid_argument";
    case Errc::not_found: return "not_found";
    case Errc::already_exists: return "already_exists";
    case Errc::io: return "io";
    case Errc::timeout: return "timeout";
    case Errc::disconnected: return "disconnected";
    case Errc::protocol: return "protocol";
    case Errc::qemu: return "qemu";
    case Errc::aborted: return "aborted";
    case Errc::conflict: return "conflict";
    case Errc::internal: return "internal";
    }
    return "internal";
}

Error Error::wrap(std::string_view context) const {
    return Error{code, std::string(context) + ": " + message};
}

void throw_exception_from_error(const Error& e, const boost::source_location&) {
    throw std::runtime_error(std::string(to_string(e.code)) + ": " + e.message);
}

} // namespace ferry
