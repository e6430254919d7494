#include "transport/disk_record.hpp"

#include <fmt/format.h>

#include <cstring>

namespace ferry::transport {

namespace {

template <class T> void put(std::array<std::byte, disk_record_size>& out, std::size_t at, T v) {
    for (std::size_t i = 0; i < sizeof(T); ++i)
        out[at + i] = static_cast<std::byte>((static_cast<std::uint64_t>(v) >> (8 * i)) & 0xff);
}

template <class T> T get(std::span<const std::byte> in, std::size_t at) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i)
        v |= static_cast<std::uint64_t>(in[at + i]) << (8 * i);
    return static_cast<T>(v);
}

Error bad(const std::string& why) { return make_error(Errc::protocol, "disk stream: " + why); }

} // namespace

std::string_view to_string(DiskRecordKind kind) {
    switch (kind) {
    case DiskRecordKind::data: return "data";
    case DiskRecordKind::zero: return "zero";
    case DiskRecordKind::round_end: return "round_end";
    case DiskRecordKind::ack: return "ack";
    case DiskRecordKind::end: return "end";
    }
    return "?";
}

std::array<std::byte, disk_record_size> encode_disk_record(const DiskRecord& r) {
    std::array<std::byte, disk_record_size> out{};
    out[0] = std::byte{'F'};
    out[1] = std::byte{'D'};
    out[2] = static_cast<std::byte>(r.kind);
    put<std::uint32_t>(out, 4, r.disk);
    put<std::uint64_t>(out, 8, r.seq);
    put<std::uint64_t>(out, 16, r.offset);
    put<std::uint64_t>(out, 24, r.length);
    put<std::uint32_t>(out, 32, r.round);
    return out;
}

Result<DiskRecord> decode_disk_record(std::span<const std::byte> in) {
    if (in.size() != disk_record_size)
        return bad(fmt::format("a record header is {} bytes, not {}", disk_record_size, in.size()));
    if (in[0] != std::byte{'F'} || in[1] != std::byte{'D'})
        return bad("bad magic (not a disk stream, or out of step)");
    if (in[3] != std::byte{0} || get<std::uint32_t>(in, 36) != 0)
        return bad("reserved bytes are not zero");
    DiskRecord r;
    auto kind = static_cast<std::uint8_t>(in[2]);
    if (kind < 1 || kind > 5)
        return bad(fmt::format("unknown record kind {}", kind));
    r.kind = static_cast<DiskRecordKind>(kind);
    r.disk = get<std::uint32_t>(in, 4);
    r.seq = get<std::uint64_t>(in, 8);
    r.offset = get<std::uint64_t>(in, 16);
    r.length = get<std::uint64_t>(in, 24);
    r.round = get<std::uint32_t>(in, 32);
    if (r.disk >= max_disks)
        return bad(fmt::format("disk {} (at most {} disks)", r.disk, max_disks));
    switch (r.kind) {
    case DiskRecordKind::data:
        if (r.length == 0 || r.length > max_disk_payload)
            return bad(fmt::format("a data record of {} bytes (1..{})", r.length, max_disk_payload));
        break;
    case DiskRecordKind::zero:
        if (r.length == 0)
            return bad("an empty zero record");
        break;
    case DiskRecordKind::round_end:
    case DiskRecordKind::ack:
    case DiskRecordKind::end:
        if (r.length != 0 || r.offset != 0)
            return bad(fmt::format("a {} record with an offset or length", to_string(r.kind)));
        break;
    }
    if (r.offset + r.length < r.offset)
        return bad(fmt::format("offset {} + length {} overflows", r.offset, r.length));
    return r;
}

} // namespace ferry::transport
