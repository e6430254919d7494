// Fuzz target: what QEMU and /proc print, as ferryd reads it for its facts
// (`qemu --version`, `-machine help`, `-cpu help`, /proc/meminfo, /proc/cpuinfo).
#include "engine/host_facts.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view text(reinterpret_cast<const char*>(data), size);
    (void)ferry::engine::parse_qemu_version(text);
    (void)ferry::engine::parse_machine_help(text);
    (void)ferry::engine::parse_cpu_help(text);
    (void)ferry::engine::parse_meminfo_total(text);
    (void)ferry::engine::parse_cpu_model_name(text);
    return 0;
}
