#pragma once
// What a node offers VMs, as its peers' schedulers see it: memory, CPUs,
// the host CPU, and what its QEMU binary can run. The parsers of QEMU's
// `--version`, `-machine help` and `-cpu help` output are pure (fuzzed).
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::engine {

struct HostFacts {
    std::uint64_t memory = 0; // MemTotal
    std::int64_t cpus = 0;    // online CPUs
    std::string host_cpu;     // /proc/cpuinfo "model name"
    std::string qemu_version; // "7.2.19"
    std::vector<std::string> machine_types; // names and aliases, "pc", "pc-i440fx-7.2", ...
    std::vector<std::string> cpu_models;    // "qemu64", "EPYC", ...
};

// "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)" -> "7.2.19"; "" when absent.
std::string parse_qemu_version(std::string_view text);
// The first word of each line after "Supported machines are:"; "none" included.
std::vector<std::string> parse_machine_help(std::string_view text);
// `-cpu help` on x86: lines "x86 <name>  <description>"; the names, in order.
std::vector<std::string> parse_cpu_help(std::string_view text);
// MemTotal in /proc/meminfo, bytes (0 when absent).
std::uint64_t parse_meminfo_total(std::string_view text);
// The first "model name" in /proc/cpuinfo ("" when absent).
std::string parse_cpu_model_name(std::string_view text);

// Reads /proc and asks `qemu` (the binary) what it offers. What cannot be
// found stays empty or 0, and the log says why.
HostFacts probe_host(const std::string& qemu);

} // namespace ferry::engine
