#pragma once
// Human-readable output for ferryctl.
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace ferryctl {

std::string bytes(std::uint64_t n);     // "1.5 GiB"
std::string rate(std::uint64_t bps);    // "120.0 MiB/s"
std::string progress_line(const nlohmann::json& migration);
// A line cut to fit a terminal `columns` wide (one column spare, so that it
// never wraps); columns 0: left whole.
std::string fit_width(const std::string& line, std::size_t columns);
std::string outlook(const nlohmann::json& progress); // the convergence model's verdict
void print_migration(const nlohmann::json& migration);
void print_migration_table(const nlohmann::json& list);
void print_vm(const nlohmann::json& vm);
void print_vm_table(const nlohmann::json& list);
void print_node_table(const nlohmann::json& nodes);       // node.list
void print_placement(const nlohmann::json& placement);    // migration.create with dry_run
void print_node_state(const nlohmann::json& status);      // node.cordon, node.uncordon, node.drain_status
std::string drain_line(const nlohmann::json& status);     // one line of a drain's progress

// One event as a line: "seq time type vm migration: what".
std::string event_line(const nlohmann::json& event);

} // namespace ferryctl
