// Fuzz target: what a guest prints on its serial console, as ferry reads it
// (cut into lines of at most 64 bytes here, then each read for a heartbeat).
#include "engine/heartbeat.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view text(reinterpret_cast<const char*>(data), size);
    ferry::engine::LineSplitter lines(64);
    // In two reads, split where the first byte says: a line may span reads.
    auto cut = size == 0 ? 0 : data[0] % (size + 1);
    std::size_t bytes = 0;
    for (auto part : {text.substr(0, cut), text.substr(cut)}) {
        for (auto& line : lines.feed(part)) {
            if (line.size() > 64)
                std::abort();
            bytes += line.size();
            (void)ferry::engine::parse_heartbeat(line, 0);
        }
    }
    auto rest = lines.rest();
    if (rest.size() > 64 || bytes + rest.size() > size)
        std::abort();
    return 0;
}
