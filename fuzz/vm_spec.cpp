// Fuzz target: a VM spec as a user writes it (vm create --spec).
#include "config/vm_spec.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    auto s = ferry::config::parse_vm_spec(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.toml");
    if (s) {
        // A spec travels as JSON in records: it must round-trip.
        nlohmann::json j = *s;
        auto back = j.get<ferry::config::VmSpec>();
        if (back.name != s->name || back.memory != s->memory || back.disks.size() != s->disks.size())
            __builtin_trap();
    }
    return 0;
}
