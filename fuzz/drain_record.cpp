// Fuzz target: a stored drain (<state_dir>/scheduler.json's "drain", which
// may be damaged) and the drain options a peer's "scheduler" message or a
// control request carries.
#include "scheduler/drain.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    auto j = nlohmann::json::parse(std::string_view(reinterpret_cast<const char*>(data), size), nullptr, false);
    if (j.is_discarded())
        return 0;
    (void)ferry::scheduler::drain_options(j);
    auto d = ferry::scheduler::drain_from_json(j);
    if (!d)
        return 0;
    // What was read writes back and reads again the same.
    auto again = ferry::scheduler::drain_from_json(ferry::scheduler::to_json(*d));
    if (!again || ferry::scheduler::to_json(*again) != ferry::scheduler::to_json(*d))
        __builtin_trap();
    if (!d->vms.empty()) {
        d->failed(d->vms.front(), "x", 0);
        d->stop_waiting("y");
        (void)d->settle("t");
    }
    return 0;
}
