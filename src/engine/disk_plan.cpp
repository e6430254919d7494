#include "engine/disk_plan.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace ferry::engine {

std::string plan_arriving_disks(const nlohmann::json& disks, const config::VmSpec& spec,
                                const config::BlockSection& block, const std::string& node_name,
                                std::vector<MirrorDisk>& out) {
    out.clear();
    if (!disks.is_array() || disks.size() > spec.disks.size())
        return "bad prepare: disks must be an array of the spec's disks";
    for (auto& d : disks) {
        if (!d.is_object() || !d.contains("index") || !d["index"].is_number_unsigned() || !d.contains("size") ||
            !d["size"].is_number_unsigned() || !d.contains("format") || !d["format"].is_string())
            return "bad prepare: a disk needs index, format and size";
        auto index = d["index"].get<std::uint64_t>();
        if (index >= spec.disks.size())
            return fmt::format("bad prepare: disk index {} (the spec has {} disks)", index, spec.disks.size());
        auto& disk = spec.disks[index];
        if (disk.shared || disk.format != d["format"].get<std::string>())
            return fmt::format("bad prepare: disks[{}] is shared or of another format in the spec", index);
        for (auto& seen : out)
            if (seen.index == index)
                return fmt::format("bad prepare: disks[{}] listed twice", index);
        auto size = d["size"].get<std::uint64_t>();
        if (size == 0 || size > (std::uint64_t{1} << 50))
            return fmt::format("bad prepare: disks[{}] size {}", index, size);
        auto target = config::map_disk_path(block, disk.path);
        // Two disks mapped onto one image would write each other's blocks.
        for (std::size_t i = 0; i < spec.disks.size(); ++i)
            if (i != index && ((spec.disks[i].shared && spec.disks[i].path == target) ||
                               std::any_of(out.begin(), out.end(),
                                           [&](auto& m) { return m.index == i && m.path == target; })))
                return fmt::format("disks[{}] and disks[{}] would both land at {} on {}: map them apart with "
                                   "[block] path_map",
                                   index, i, target, node_name);
        out.push_back({static_cast<std::uint32_t>(index), target, disk.format, size, ""});
    }
    return "";
}

std::string read_shared_disks(const nlohmann::json& disks, const config::VmSpec& spec, std::vector<SharedDisk>& out) {
    out.clear();
    if (!disks.is_array() || disks.size() > spec.disks.size())
        return "bad prepare: shared_disks must be an array of the spec's disks";
    for (auto& d : disks) {
        if (!d.is_object() || !d.contains("index") || !d["index"].is_number_unsigned() || !d.contains("size") ||
            !d["size"].is_number_unsigned() || !d.contains("format") || !d["format"].is_string())
            return "bad prepare: a shared disk needs index, format and size";
        auto index = d["index"].get<std::uint64_t>();
        if (index >= spec.disks.size() || !spec.disks[index].shared)
            return fmt::format("bad prepare: shared_disks names disk {}, not a shared disk of the spec", index);
        if (std::any_of(out.begin(), out.end(), [&](auto& s) { return s.index == index; }))
            return fmt::format("bad prepare: shared disk {} listed twice", index);
        out.push_back({static_cast<std::uint32_t>(index), d["format"].get<std::string>(), d["size"].get<std::uint64_t>()});
    }
    return "";
}

} // namespace ferry::engine
