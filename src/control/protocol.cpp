#include "control/protocol.hpp"

#include "config/quantity.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace ferry::control {

json error_reply(const json& id, const Error& e) {
    return {{"id", id}, {"error", {{"code", to_string(e.code)}, {"message", e.message}}}};
}

Result<Request> parse_request(std::string_view line, json& id) {
    id = nullptr;
    if (line.size() > max_request_bytes)
        return make_error(Errc::protocol, fmt::format("request larger than {} KiB", max_request_bytes >> 10));
    auto parsed = parse_json(line, request_limits);
    if (!parsed)
        return parsed.error().wrap("request");
    if (!parsed->is_object())
        return make_error(Errc::protocol, fmt::format("request is a JSON {}, not an object", parsed->type_name()));
    Request r;
    if (auto it = parsed->find("id"); it != parsed->end())
        r.id = id = *it;
    auto method = parsed->find("method");
    if (method == parsed->end() || !method->is_string())
        return make_error(Errc::protocol, "request has no \"method\" string");
    r.method = method->get<std::string>();
    if (auto params = parsed->find("params"); params != parsed->end() && !params->is_null()) {
        if (!params->is_object())
            return make_error(Errc::protocol, fmt::format("{}: \"params\" must be an object, not a {}", r.method,
                                                          params->type_name()));
        r.params = std::move(*params);
    }
    return r;
}

Result<void> Params::only(const std::vector<std::string_view>& known) const {
    if (!params_.is_object())
        return {};
    for (auto& [key, value] : params_.items())
        if (std::find(known.begin(), known.end(), key) == known.end())
            return make_error(Errc::invalid_argument,
                              known.size() == 0
                                  ? fmt::format("{}: unknown parameter '{}' (it takes none)", method_, key)
                                  : fmt::format("{}: unknown parameter '{}' (it takes {})", method_, key,
                                                fmt::join(known, ", ")));
    return {};
}

const json* Params::find(const char* key) const {
    auto it = params_.find(key);
    if (it == params_.end() || it->is_null())
        return nullptr;
    return &*it;
}

Error Params::wrong(const char* key, std::string_view expected, const json& got) const {
    return make_error(Errc::invalid_argument, fmt::format("{}: parameter \"{}\" must be {}, not a {}", method_, key,
                                                          expected, got.type_name()));
}

Result<std::string> Params::string(const char* key) const {
    auto* v = find(key);
    if (!v)
        return make_error(Errc::invalid_argument, fmt::format("{}: missing string parameter \"{}\"", method_, key));
    if (!v->is_string())
        return wrong(key, "a string", *v);
    return v->get<std::string>();
}

Result<std::optional<std::string>> Params::optional_string(const char* key) const {
    auto* v = find(key);
    if (!v)
        return std::optional<std::string>{};
    if (!v->is_string())
        return wrong(key, "a string", *v);
    return std::optional<std::string>(v->get<std::string>());
}

Result<std::vector<std::string>> Params::optional_strings(const char* key) const {
    std::vector<std::string> out;
    auto* v = find(key);
    if (!v)
        return out;
    if (!v->is_array())
        return wrong(key, "an array of strings", *v);
    for (auto& e : *v) {
        if (!e.is_string())
            return wrong(key, "an array of strings", *v);
        out.push_back(e.get<std::string>());
    }
    return out;
}

Result<std::optional<bool>> Params::optional_bool(const char* key) const {
    auto* v = find(key);
    if (!v)
        return std::optional<bool>{};
    if (!v->is_boolean())
        return wrong(key, "true or false", *v);
    return std::optional<bool>(v->get<bool>());
}

Result<std::optional<std::int64_t>> Params::optional_int(const char* key, std::int64_t min, std::int64_t max) const {
    auto* v = find(key);
    if (!v)
        return std::optional<std::int64_t>{};
    auto range = fmt::format("an integer from {} to {}", min, max);
    if (!v->is_number_integer())
        return wrong(key, range, *v);
    bool too_big = v->is_number_unsigned() && v->get<std::uint64_t>() > static_cast<std::uint64_t>(max);
    if (too_big || v->get<std::int64_t>() < min || v->get<std::int64_t>() > max)
        return make_error(Errc::invalid_argument,
                          fmt::format("{}: parameter \"{}\" must be {}, not {}", method_, key, range, v->dump()));
    return std::optional<std::int64_t>(v->get<std::int64_t>());
}

Result<std::optional<std::uint64_t>> Params::optional_quantity(const char* key) const {
    auto* v = find(key);
    if (!v)
        return std::optional<std::uint64_t>{};
    if (v->is_number_unsigned())
        return std::optional<std::uint64_t>(v->get<std::uint64_t>());
    if (v->is_string()) {
        auto q = config::parse_quantity(v->get<std::string>());
        if (!q)
            return q.error().wrap(fmt::format("{}: parameter \"{}\"", method_, key));
        return std::optional<std::uint64_t>(*q);
    }
    return wrong(key, "a non-negative integer (bytes) or a quantity like \"64Mi\"", *v);
}

Result<json> Params::optional_object(const char* key) const {
    auto* v = find(key);
    if (!v)
        return ok(json::object());
    if (!v->is_object())
        return wrong(key, "an object", *v);
    return ok(*v);
}

} // namespace ferry::control
