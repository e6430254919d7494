// Fuzz target: bytes from a peer's disk stream, cut into record headers (a
// data record's payload skipped), each decoded and, when valid, re-encoded
// to the same bytes.
#include "transport/disk_record.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace ferry::transport;
    std::size_t at = 0;
    while (size - at >= disk_record_size) {
        std::span<const std::byte> header(reinterpret_cast<const std::byte*>(data) + at, disk_record_size);
        auto r = decode_disk_record(header);
        if (!r)
            break;
        auto again = encode_disk_record(*r);
        if (std::memcmp(again.data(), header.data(), disk_record_size) != 0)
            std::abort(); // a header that decodes must encode to itself
        at += disk_record_size;
        if (r->kind == DiskRecordKind::data)
            at += static_cast<std::size_t>(std::min<std::uint64_t>(r->length, size - at));
    }
    return 0;
}
