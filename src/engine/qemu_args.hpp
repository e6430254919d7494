#pragma once
// Builds the QEMU command line for a VM spec (pure; unit-tested).
#include "config/vm_spec.hpp"

#include <string>
#include <vector>

namespace ferry::engine {

struct LaunchOptions {
    std::string qemu = "qemu-system-x86_64";
    std::string accel = "kvm:tcg";
    std::string qmp_socket;
    std::string console_socket; // guest serial port (COM1), captured by ferry
    bool incoming = false;      // destination: -incoming defer
    bool start_paused = false;  // -S: ferry resumes once the console is attached
};

std::vector<std::string> qemu_args(const config::VmSpec& spec, const LaunchOptions& opts);

// Longest path a Unix socket accepts (sun_path minus the terminator).
constexpr std::size_t max_socket_path = 107;

} // namespace ferry::engine
