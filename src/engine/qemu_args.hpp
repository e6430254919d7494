#pragma once
// Builds the QEMU command line for a VM spec (pure; unit-tested).
#include "config/vm_spec.hpp"

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
    std::string console_socket; // guest serial port (COM1), captured by ferry
    bool incoming = false;      // destination: -incoming defer
    bool start_paused = false;  // -S: ferry resumes once the console is attached
};

std::vector<std::string> qemu_args(const config::VmSpec& spec, const LaunchOptions& opts);

// Longest path a Unix socket accepts (sun_path minus the terminator).
constexpr std::size_t max_socket_path = 107;

} // namespace ferry::engine
