#pragma once
// A VM spec (`ferryctl vm create --spec vm.toml`): what QEMU to launch.
#include "common/error.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ferry::config {

struct DiskSpec {
    std::string path;
    std::string format = "raw"; // raw | qcow2
    bool shared = true;         // false: ferry mirrors it (block migration)
    bool readonly = false;
    std::string bus = "virtio"; // virtio (virtio-blk) | ide (for guests without virtio drivers)
};

struct VmSpec {
    std::string name;
    std::uint64_t memory = 0; // bytes, whole MiB
    std::int64_t cpus = 1;
    std::string cpu_model = "qemu64";
    std::string machine = "pc";
    std::optional<std::string> kernel;
    std::optional<std::string> initrd;
    std::optional<std::string> append;
    std::map<std::string, std::string> labels;
    std::map<std::string, std::string> node_selector;
    std::vector<DiskSpec> disks;
    std::vector<std::string> extra_args;

    // Where it was read from (empty for a spec that came as JSON) and the
    // line of each key naming a file ("kernel", "disks[0].path"), so that a
    // check made later (does the file exist?) names them too.
    std::string source;
    std::map<std::string, std::int64_t> lines;
    // "vm.toml:3: key 'kernel'", or "spec key 'kernel'" without a file.
    std::string where(const std::string& key) const;
};

Result<VmSpec> load_vm_spec(const std::string& path);
Result<VmSpec> parse_vm_spec(std::string_view text, const std::string& name);

// The checks of parse_vm_spec for a spec that arrived as JSON (from a peer
// node, or a record): name, memory, cpus, machine, cpu_model, labels,
// node_selector, extra_args, disks.
Result<void> validate_vm_spec(const VmSpec& spec);

// A valid VM name: 1-63 of [a-z0-9-], starting and ending alphanumeric.
bool valid_vm_name(std::string_view name);

// A machine type or CPU model name as QEMU lists them (-machine help, -cpu
// help): 1-128 of [A-Za-z0-9._-], so no options or CPU features.
bool valid_qemu_name(std::string_view name);

void to_json(nlohmann::json& j, const DiskSpec& d);
void from_json(const nlohmann::json& j, DiskSpec& d);
void to_json(nlohmann::json& j, const VmSpec& s);
void from_json(const nlohmann::json& j, VmSpec& s);

} // namespace ferry::config
