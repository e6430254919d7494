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

} // namespace ferry::engine
