// Fuzz target: one line from QEMU's QMP socket (greeting, event or reply).
#include "qmp/message.hpp"

#include "common/json.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    auto m = ferry::qmp::decode_message(std::string_view(reinterpret_cast<const char*>(data), size));
    if (m && m->error)
        (void)ferry::qmp::qemu_error("fuzz", *m->error);
    if (m && m->result)
        (void)ferry::dump_json(*m->result);
    return 0;
}
