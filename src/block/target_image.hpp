#pragma once
// The target node's side of a mirrored disk before anything moves: an image
// of the right format and virtual size at the mapped path, created when it
// is missing (qemu-img, sparse; or the configured create command for raw
// volumes), checked when it exists. Blocking: run it off the event loop.
#include "common/error.hpp"

#include <cstdint>
#include <chrono>
#include <string>
#include <vector>

namespace ferry::block {

struct ImageInfo {
    std::string format;             // as qemu-img probes it
    std::uint64_t virtual_size = 0; // what the guest sees
    std::uint64_t actual_size = 0;  // allocated on the host
};

// qemu-img info (with -U: a running QEMU may hold the image).
Result<ImageInfo> inspect_image(const std::string& path);

struct PreparedImage {
    bool created = false; // ferry made it, so a failed migration removes it
};

// What this node allows at a target path ([block] in ferryd.toml).
struct TargetImageRules {
    std::string create_command; // makes a missing raw volume; empty: qemu-img or a sparse file
    bool reuse_existing = false; // copy into an existing regular file (its content is lost)
};

// A missing image is created exclusively (never through a link, never over
// a file that appears meanwhile): raw with create_command when set ({path},
// {name}, {size} filled in, shell quoted), else a sparse file (qemu-img
// formats it for qcow2). An existing one must have `format` and `size` and
// be either a block device (a volume provisioned for the VM, also reached
// through a link such as /dev/vg0/lv) or, only with reuse_existing, a
// regular file; a symbolic link to anything else, or a dangling one, is
// refused. Errors name the path, what is there and the option that allows it.
Result<PreparedImage> prepare_target_image(const std::string& path, const std::string& format, std::uint64_t size,
                                           const TargetImageRules& rules);

// Removes an image prepare_target_image created: only a regular file at
// `path` itself, never what a link there points to. Whether one was removed.
bool remove_created_image(const std::string& path);

// Whether a process holds a QEMU image lock on `path` (QEMU takes OFD
// locks on the bytes from 100 of every image it opens): a target image in
// use, perhaps by the very VM being migrated when two nodes share a
// machine, must never be written.
bool image_in_use(const std::string& path);

// Runs argv[0] (searched in PATH) and returns what it printed on stdout and
// stderr; a failure names the program, its exit status and its output. One
// that has not finished within `timeout` is killed with everything it
// started (its own process group), and that is the failure.
Result<std::string> run_tool(const std::vector<std::string>& argv,
                             std::chrono::seconds timeout = std::chrono::seconds(300));

// 'it''s' quoting for /bin/sh.
std::string shell_quote(const std::string& s);

} // namespace ferry::block
