#pragma once
// Which disks a block migration mirrors, and where each lands: the pure
// part of a block migration (no I/O), so the target's check of what a peer
// asked for is unit-tested and fuzzed.
#include "config/node_config.hpp"
#include "config/vm_spec.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace ferry::engine {

// One disk a migration mirrors.
struct MirrorDisk {
    std::uint32_t index = 0; // its place in the VM spec: the stream names disks by it
    std::string path;        // the image on this node
    std::string format;      // raw | qcow2
    std::uint64_t size = 0;  // virtual size, bytes
    std::string node;        // source: the disk's format node in the source QEMU
};

// The disks a prepare message names ("disks", from the source node),
// checked against the VM's spec and mapped to this node's paths (`block`'s
// path_map): each a non-shared disk of the spec, once, of the spec's format,
// with a size, and no two landing on one image (nor on a shared disk).
// Returns "" and fills `out`, or why not (the peer gets it as the error).
std::string plan_arriving_disks(const nlohmann::json& disks, const config::VmSpec& spec,
                                const config::BlockSection& block, const std::string& node_name,
                                std::vector<MirrorDisk>& out);

// A shared disk as the source sees it ("shared_disks" of a prepare): the
// target compares its own view of the same path with it before anything
// moves, so a different image there is never taken for the VM's.
struct SharedDisk {
    std::uint32_t index = 0; // in the VM spec
    std::string format;      // as qemu-img probes it on the source
    std::uint64_t size = 0;  // virtual size, bytes
};

// Checks "shared_disks" against the spec: each a shared disk of the spec,
// once, with a format and a size. Returns "" and fills `out`, or why not.
std::string read_shared_disks(const nlohmann::json& disks, const config::VmSpec& spec, std::vector<SharedDisk>& out);

} // namespace ferry::engine
