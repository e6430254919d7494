#pragma once
// Strict reading of a TOML table: every problem names the file, the line and
// the full key; keys nobody asked for are errors too. Problems accumulate so
// an operator sees all of them at once.
#include "common/error.hpp"

#include <cstdint>

#include <toml++/toml.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace ferry::config {

class Problems {
public:
    explicit Problems(std::string file) : file_(std::move(file)) {}
    void add(const toml::source_region& where, const std::string& message);
    void add(const std::string& message); // no line (e.g. a missing key)
    const std::string& file() const { return file_; }
    bool empty() const { return list_.empty(); }
    std::size_t size() const { return list_.size(); }
    Error error() const; // all problems, one per line

private:
    struct Problem {
        std::uint32_t line = 0; // 0: none (listed first)
        std::string text;
    };
    std::string file_;
    std::vector<Problem> list_;
};

class TableReader {
public:
    // prefix is the dotted path of this table ("migration", "disks[0]").
    TableReader(const toml::table& table, Problems& problems, std::string prefix);

    // Each getter leaves out untouched when the key is absent (the default).
    void get(std::string_view key, std::string& out);
    void get(std::string_view key, std::optional<std::string>& out);
    void get(std::string_view key, bool& out);
    void get(std::string_view key, std::int64_t& out, std::int64_t min, std::int64_t max);
    // A quantity: a TOML integer (bytes) or a string like "64Mi".
    void get_quantity(std::string_view key, std::uint64_t& out);
    void get(std::string_view key, std::vector<std::string>& out);
    void get(std::string_view key, std::map<std::string, std::string>& out);
    // Labels or a selector: a table of strings whose keys and values pass
    // label_problem (each problem on its own key's line).
    void get_labels(std::string_view key, std::map<std::string, std::string>& out);
    // Marks key as required: a problem if absent.
    bool require(std::string_view key);
    // A string that must be there.
    void get_required(std::string_view key, std::string& out) {
        if (require(key))
            get(key, out);
    }
    // The raw node, marked as read; nullptr when absent.
    const toml::node* node(std::string_view key);
    // An array of tables ([[key]]): each table goes to `each` with its
    // index; a value that is not an array, or an element that is not a
    // table, is a problem. The array's node (nullptr when absent).
    const toml::node* tables(std::string_view key,
                             const std::function<void(const toml::table&, std::size_t)>& each);
    std::string path(std::string_view key) const;
    Problems& problems() { return problems_; }

    // Reports every key that no getter asked for.
    void finish();

private:
    void type_error(std::string_view key, const toml::node& n, std::string_view expected);

    const toml::table& table_;
    Problems& problems_;
    std::string prefix_;
    std::set<std::string, std::less<>> seen_;
};

// What is wrong with a label (node labels, a VM's labels, a selector), or ""
// when nothing is: a key must be non-empty and free of whitespace and control
// characters, a value free of NUL characters.
std::string label_problem(std::string_view key, std::string_view value);

// Parses a TOML file; a syntax error names the file, line and column.
Result<toml::table> parse_toml_file(const std::string& path);
Result<toml::table> parse_toml_string(std::string_view text, const std::string& name);

} // namespace ferry::config
