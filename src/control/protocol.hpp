#pragma once
// The control protocol's messages (docs/control-protocol.md), apart from the
// socket: parsing a request line and reading typed parameters. Pure: no I/O.
#include "common/error.hpp"
#include "common/json.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>
#include <string_view>

namespace ferry::control {

using json = nlohmann::json;

// A request line is at most this long; its JSON at most this deep and big.
constexpr std::size_t max_request_bytes = 256 << 10;
constexpr JsonLimits request_limits{32, 4096};

struct Request {
    json id = nullptr;
    std::string method;
    json params = json::object();
};

// Parses one request line. On an error, `id` holds the request's id when
// the line got that far (so the error reply can echo it), else null.
Result<Request> parse_request(std::string_view line, json& id);

json error_reply(const json& id, const Error& e);

// Typed access to a method's parameters; every error names the method, the
// parameter and what it should have been.
class Params {
public:
    Params(std::string_view method, const json& params) : method_(method), params_(params) {}

    // Refuses a parameter the method does not take, naming it (a misspelt
    // optional one would otherwise be dropped without a word).
    Result<void> only(const std::vector<std::string_view>& known) const;

    Result<std::string> string(const char* key) const;
    Result<std::optional<std::string>> optional_string(const char* key) const;
    Result<std::optional<bool>> optional_bool(const char* key) const;
    Result<std::optional<std::int64_t>> optional_int(const char* key, std::int64_t min, std::int64_t max) const;
    // A quantity: a non-negative integer or a string like "64Mi".
    Result<std::optional<std::uint64_t>> optional_quantity(const char* key) const;
    Result<json> optional_object(const char* key) const; // {} when absent
    // An array of strings; empty when absent.
    Result<std::vector<std::string>> optional_strings(const char* key) const;

private:
    Error wrong(const char* key, std::string_view expected, const json& got) const;
    const json* find(const char* key) const; // nullptr when absent or null

    std::string_view method_;
    const json& params_;
};

} // namespace ferry::control
