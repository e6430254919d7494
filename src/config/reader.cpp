#include "config/reader.hpp"

#include "config/quantity.hpp"

#include <fmt/format.h>

#include <algorithm>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <unistd.h>

namespace ferry::config {

void Problems::add(const toml::source_region& where, const std::string& message) {
    list_.push_back({where.begin.line, fmt::format("{}:{}: {}", file_, where.begin.line, message)});
}

void Problems::add(const std::string& message) { list_.push_back({0, fmt::format("{}: {}", file_, message)}); }

Error Problems::error() const {
    // In the file's order, as a reader goes through it.
    auto sorted = list_;
    std::stable_sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.line < b.line; });
    std::string all;
    for (auto& p : sorted) {
        if (!all.empty())
            all += '\n';
        all += p.text;
    }
    return make_error(Errc::invalid_argument, all);
}

TableReader::TableReader(const toml::table& table, Problems& problems, std::string prefix)
    : table_(table), problems_(problems), prefix_(std::move(prefix)) {}

std::string TableReader::path(std::string_view key) const {
    return prefix_.empty() ? std::string(key) : prefix_ + "." + std::string(key);
}

const toml::node* TableReader::node(std::string_view key) {
    seen_.emplace(key);
    return table_.get(key);
}

const toml::node* TableReader::tables(std::string_view key,
                                      const std::function<void(const toml::table&, std::size_t)>& each) {
    auto* n = node(key);
    if (!n)
        return nullptr;
    auto* arr = n->as_array();
    if (!arr) {
        problems_.add(n->source(), fmt::format("key '{}': expected an array of tables ([[{}]])", path(key), path(key)));
        return n;
    }
    for (std::size_t i = 0; i < arr->size(); ++i) {
        if (auto* t = arr->get(i)->as_table())
            each(*t, i);
        else
            problems_.add(arr->get(i)->source(), fmt::format("key '{}[{}]': expected a table", path(key), i));
    }
    return n;
}

namespace {
std::string_view type_name(const toml::node& n) {
    switch (n.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::table: return "a table";
    case toml::node_type::array: return "an array";
    default: return "a date/time";
    }
}
} // namespace

void TableReader::type_error(std::string_view key, const toml::node& n, std::string_view expected) {
    problems_.add(n.source(), fmt::format("key '{}': expected {}, got {}", path(key), expected,
                                          type_name(n)));
}

void TableReader::get(std::string_view key, std::string& out) {
    auto* n = node(key);
    if (!n)
        return;
    if (auto v = n->value<std::string>(); v && n->is_string())
        out = *v;
    else
        type_error(key, *n, "a string");
}

void TableReader::get(std::string_view key, std::optional<std::string>& out) {
    std::string value;
    if (!table_.get(key)) {
        seen_.emplace(key);
        return;
    }
    get(key, value);
    out = value;
}

void TableReader::get(std::string_view key, bool& out) {
    auto* n = node(key);
    if (!n)
        return;
    if (n->is_boolean())
        out = *n->value<bool>();
    else
        type_error(key, *n, "a boolean (true or false)");
}

void TableReader::get(std::string_view key, std::int64_t& out, std::int64_t min, std::int64_t max) {
    auto* n = node(key);
    if (!n)
        return;
    if (!n->is_integer()) {
        type_error(key, *n, "an integer");
        return;
    }
    auto v = *n->value<std::int64_t>();
    if (v < min || v > max) {
        problems_.add(n->source(),
                      fmt::format("key '{}': {} is out of range [{}, {}]", path(key), v, min, max));
        return;
    }
    out = v;
}

void TableReader::get_quantity(std::string_view key, std::uint64_t& out) {
    auto* n = node(key);
    if (!n)
        return;
    if (n->is_integer()) {
        auto v = *n->value<std::int64_t>();
        if (v < 0) {
            problems_.add(n->source(), fmt::format("key '{}': {} is negative", path(key), v));
            return;
        }
        out = static_cast<std::uint64_t>(v);
        return;
    }
    if (!n->is_string()) {
        type_error(key, *n, "a quantity (bytes, or a string like \"64Mi\")");
        return;
    }
    auto parsed = parse_quantity(*n->value<std::string>());
    if (!parsed) {
        problems_.add(n->source(), fmt::format("key '{}': {}", path(key), parsed.error().message));
        return;
    }
    out = *parsed;
}

void TableReader::get(std::string_view key, std::vector<std::string>& out) {
    auto* n = node(key);
    if (!n)
        return;
    auto* arr = n->as_array();
    if (!arr) {
        type_error(key, *n, "an array of strings");
        return;
    }
    std::vector<std::string> values;
    for (std::size_t i = 0; i < arr->size(); ++i) {
        auto& item = *arr->get(i);
        if (!item.is_string()) {
            problems_.add(item.source(), fmt::format("key '{}[{}]': expected a string, got {}",
                                                     path(key), i, type_name(item)));
            continue;
        }
        values.push_back(*item.value<std::string>());
    }
    out = std::move(values);
}

void TableReader::get(std::string_view key, std::map<std::string, std::string>& out) {
    auto* n = node(key);
    if (!n)
        return;
    auto* tbl = n->as_table();
    if (!tbl) {
        type_error(key, *n, "a table of strings");
        return;
    }
    std::map<std::string, std::string> values;
    for (auto&& [k, v] : *tbl) {
        if (!v.is_string()) {
            problems_.add(v.source(), fmt::format("key '{}.{}': expected a string, got {}",
                                                  path(key), k.str(), type_name(v)));
            continue;
        }
        values[std::string(k.str())] = *v.value<std::string>();
    }
    out = std::move(values);
}

void TableReader::get_labels(std::string_view key, std::map<std::string, std::string>& out) {
    get(key, out);
    auto* n = table_.get(key);
    auto* tbl = n ? n->as_table() : nullptr;
    if (!tbl)
        return;
    for (auto&& [k, v] : *tbl) {
        if (!v.is_string())
            continue;
        auto why = label_problem(k.str(), *v.value<std::string>());
        if (!why.empty())
            problems_.add(k.source().begin.line ? k.source() : v.source(), fmt::format("key '{}': {}", path(key), why));
    }
}

namespace {
// A key as it can be shown: control characters as \xNN.
std::string printable(std::string_view text) {
    std::string out;
    for (unsigned char ch : text)
        out += ch < 0x20 || ch == 0x7f ? fmt::format("\\x{:02x}", ch) : std::string(1, static_cast<char>(ch));
    return out;
}
} // namespace

std::string label_problem(std::string_view key, std::string_view value) {
    if (key.empty())
        return "a label key is empty";
    for (unsigned char ch : key) {
        if (ch == ' ' || (ch >= '\t' && ch <= '\r'))
            return fmt::format("label key \"{}\" holds whitespace", printable(key));
        if (ch < 0x20 || ch == 0x7f)
            return fmt::format("label key \"{}\" holds a control character", printable(key));
    }
    if (value.find('\0') != std::string_view::npos)
        return fmt::format("the value of label \"{}\" holds a NUL character", printable(key));
    return {};
}

bool TableReader::require(std::string_view key) {
    if (table_.contains(key))
        return true;
    // In a table of its own ([[policies]]), the line of its header.
    if (!prefix_.empty() && table_.source().begin.line > 0)
        problems_.add(table_.source(), fmt::format("missing required key '{}'", path(key)));
    else
        problems_.add(fmt::format("missing required key '{}'", path(key)));
    return false;
}

void TableReader::finish() {
    for (auto&& [k, v] : table_) {
        if (seen_.count(k.str()))
            continue;
        problems_.add(k.source(), fmt::format("unknown key '{}'", path(k.str())));
    }
}

Result<toml::table> parse_toml_string(std::string_view text, const std::string& name) {
    try {
        return toml::parse(text, name);
    } catch (const toml::parse_error& e) {
        return make_error(Errc::invalid_argument,
                          fmt::format("{}:{}:{}: {}", name, e.source().begin.line,
                                      e.source().begin.column, e.description()));
    }
}

Result<toml::table> parse_toml_file(const std::string& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    auto status = fs::status(path, ec);
    if (ec && ec != std::errc::no_such_file_or_directory)
        return make_error(Errc::io, fmt::format("{}: {}", path, ec.message()));
    if (!fs::exists(status))
        return make_error(Errc::not_found, fmt::format("{}: no such file", path));
    if (fs::is_directory(status))
        return make_error(Errc::invalid_argument, fmt::format("{}: is a directory, not a TOML file", path));
    if (!fs::is_regular_file(status))
        return make_error(Errc::invalid_argument, fmt::format("{}: not a regular file", path));
    if (::access(path.c_str(), R_OK) != 0)
        return make_error(Errc::io, fmt::format("{}: cannot read: {}", path, std::strerror(errno)));
    try {
        return toml::parse_file(path);
    } catch (const toml::parse_error& e) {
        return make_error(Errc::invalid_argument,
                          fmt::format("{}:{}:{}: {}", path, e.source().begin.line,
                                      e.source().begin.column, e.description()));
    }
}

} // namespace ferry::config
