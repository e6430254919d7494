#pragma once
// The disk stream: ferry's own records on a data channel. The source sends
// data, zero and end-of-round records; the target answers with acks. Each
// record is a fixed 40-byte little-endian header, and a data record's bytes
// follow it:
//
//   0  magic "FD"      2  kind (u8)    3  reserved (0)   4  disk (u32)
//   8  seq (u64)       16 offset (u64) 24 length (u64)
//   32 round (u32)     36 reserved (0)
//
// seq numbers the source's records of one migration from 1, without gaps;
// an ack names the highest seq the target has written (and, for round_end,
// flushed). A stream cut before `end` is broken, not finished: on the new
// stream the source dials, the target's first word is an ack naming the
// last record it has, and the source goes on after it.
#include "common/error.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace ferry::transport {

enum class DiskRecordKind : std::uint8_t {
    data = 1,      // `length` bytes follow, to be written at `offset`
    zero = 2,      // [offset, offset + length) reads as zeros
    round_end = 3, // round `round` of disk `disk` is complete: flush, then ack
    ack = 4,       // target -> source: every record up to `seq` is written
    end = 5,       // the source is done: every round is complete, the stream ends
};

struct DiskRecord {
    DiskRecordKind kind = DiskRecordKind::data;
    std::uint32_t disk = 0;
    std::uint64_t seq = 0;
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
    std::uint32_t round = 0;

    bool operator==(const DiskRecord&) const = default;
};

constexpr std::size_t disk_record_size = 40;
// The largest data record; bigger extents are cut.
constexpr std::uint64_t max_disk_payload = 8 << 20;
// Disks per VM a stream may name.
constexpr std::uint32_t max_disks = 64;

std::string_view to_string(DiskRecordKind kind);

std::array<std::byte, disk_record_size> encode_disk_record(const DiskRecord& record);

// Checks everything a header can get wrong: magic, kind, reserved bytes,
// disk index, a data length of 1..max_disk_payload, lengths of zero records
// and none for round_end/ack, offset + length without overflow.
Result<DiskRecord> decode_disk_record(std::span<const std::byte> header);

} // namespace ferry::transport
