// Fuzz target: the "disks" of a block migration's prepare message, as a peer
// sends them, checked against a VM spec and mapped to this node's paths.
#include "engine/disk_plan.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    auto disks = nlohmann::json::parse(data, data + size, nullptr, false);
    if (disks.is_discarded())
        return 0;
    static const ferry::config::VmSpec spec = [] {
        ferry::config::VmSpec s;
        s.name = "web-1";
        s.disks = {{"/vm/shared.raw", "raw", true, false, "virtio"},
                   {"/local/a/root.qcow2", "qcow2", false, false, "virtio"},
                   {"/local/b/data.raw", "raw", false, false, "ide"},
                   {"/local/a/data.raw", "raw", false, false, "virtio"}};
        return s;
    }();
    static const ferry::config::BlockSection block{{{"/local/a", "/target/a"}, {"/local/b", "/target/a"}}, ""};
    std::vector<ferry::engine::MirrorDisk> out;
    auto bad = ferry::engine::plan_arriving_disks(disks, spec, block, "node-b", out);
    // A plan names each disk once, never a shared one, never two on one image.
    if (bad.empty()) {
        for (std::size_t i = 0; i < out.size(); ++i) {
            if (out[i].index >= spec.disks.size() || spec.disks[out[i].index].shared || out[i].size == 0)
                __builtin_trap();
            for (std::size_t j = i + 1; j < out.size(); ++j)
                if (out[i].index == out[j].index || out[i].path == out[j].path)
                    __builtin_trap();
        }
    }
    // The same input as a prepare's "shared_disks": each a shared disk, once.
    std::vector<ferry::engine::SharedDisk> shared;
    if (ferry::engine::read_shared_disks(disks, spec, shared).empty()) {
        for (std::size_t i = 0; i < shared.size(); ++i) {
            if (shared[i].index >= spec.disks.size() || !spec.disks[shared[i].index].shared)
                __builtin_trap();
            for (std::size_t j = i + 1; j < shared.size(); ++j)
                if (shared[i].index == shared[j].index)
                    __builtin_trap();
        }
    }
    return 0;
}
