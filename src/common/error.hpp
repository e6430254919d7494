#pragma once
// One typed error for the whole project, carried in Result<T>.
#include <boost/system/result.hpp>

#include <string>
#include <string_view>
#include <type_traits>

namespace ferry {

enum class Errc {
    invalid_argument, // bad input from a user: config, spec, request
    not_found,
    already_exists,
    io,          // sockets, files, processes
    timeout,     // a deadline passed
    disconnected, // the peer (QEMU, ferryd) went away
    protocol,    // the peer sent something we cannot understand
    qemu,        // QEMU answered with an error
    aborted,     // cancelled by request
    conflict,    // the operation is not allowed in the current state
    internal,
};

std::string_view to_string(Errc c);

struct Error {
    Errc code = Errc::internal;
    std::string message;

    // Prefixes context: Error{io, "x"}.wrap("reading a") -> "reading a: x".
    Error wrap(std::string_view context) const;
};

// Used by boost::system::result::value() when it holds an error (a bug path).
[[noreturn]] void throw_exception_from_error(const Error& e, const boost::source_location& loc);

template <class T> using Result = boost::system::result<T, Error>;

// Wraps a value explicitly; needed for types convertible to anything
// (nlohmann::json), where the implicit constructor is ambiguous.
template <class T> Result<std::decay_t<T>> ok(T&& value) {
    return Result<std::decay_t<T>>(boost::system::in_place_value, std::forward<T>(value));
}

inline Error make_error(Errc code, std::string message) { return Error{code, std::move(message)}; }

} // namespace ferry
