#pragma once
// Ranges of a disk image and what is known about them: the unit every copy
// round works in.
#include "common/error.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace ferry::block {

struct Extent {
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
    bool zero = false; // reads as zeros: sent as a zero record, never as data

    std::uint64_t end() const { return offset + length; }
    bool operator==(const Extent&) const = default;
};

// Sorts and merges extents that touch or overlap; a zero extent merges only
// with zero extents, and data wins where the two overlap.
std::vector<Extent> coalesce(std::vector<Extent> extents);

// Cuts extents at every multiple of `piece` (a power of two), so that no
// piece is longer than `piece` and pieces line up with a fixed grid.
std::vector<Extent> split(std::span<const Extent> extents, std::uint64_t piece);

// Clips extents to [0, size).
std::vector<Extent> clip(std::vector<Extent> extents, std::uint64_t size);

std::uint64_t total_length(std::span<const Extent> extents, bool zero);

// True when every byte is zero.
bool is_zero(std::span<const std::byte> data);

// The allocated ranges of an open file (SEEK_DATA/SEEK_HOLE), in order; the
// holes between them read as zeros. A file system or device without hole
// reporting gives one extent for the whole size.
Result<std::vector<Extent>> allocated_extents(int fd, std::uint64_t size);

} // namespace ferry::block
