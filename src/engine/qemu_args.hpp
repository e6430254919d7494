#pragma once
// Builds the QEMU command line for a VM spec (pure; unit-tested).
#include "config/vm_spec.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace ferry::engine {

// "auto" becomes kvm when /dev/kvm is usable, else tcg. (QEMU's own
// "kvm:tcg" fallback runs TCG very slowly on QEMU 7.2, so ferry decides.)
std::string resolve_accel(const std::string& accel, bool kvm_usable);
bool kvm_usable();

struct LaunchOptions {
    std::string qemu = "qemu-system-x86_64";
    std::string accel = "tcg";
    std::string qmp_socket;
    std::string console_file; // guest serial port (COM1): QEMU writes it, ferry follows it
    bool incoming = false;      // destination: -incoming defer
    bool start_paused = false;  // -S: ferry resumes once the console is attached
};

std::vector<std::string> qemu_args(const config::VmSpec& spec, const LaunchOptions& opts);

// The RAM QEMU is given for `memory` bytes of spec under `accel`. Under TCG it
// is 8 KiB more: QEMU before 9.0 loses guest writes during a migration when
// the RAM block is a multiple of 256 KiB. Its dirty-bitmap sync then takes a
// fast path that clears the bits but leaves TCG's TLB entries writable, so a
// page written again after it was sent is not sent again, and the destination
// resumes with stale memory (upstream fix 03bfc2188f, QEMU 9.0). Any other
// size takes the page-by-page path, which re-arms the TLB. Every QEMU ferry
// starts for a VM uses this size on both nodes, so they stay compatible.
std::uint64_t guest_ram(std::uint64_t memory, const std::string& accel);

// Longest path a Unix socket accepts (sun_path minus the terminator).
constexpr std::size_t max_socket_path = 107;

} // namespace ferry::engine
