#include "engine/qemu_args.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <unistd.h>

namespace ferry::engine {

std::string resolve_accel(const std::string& accel, bool kvm_ok) {
    if (accel == "auto")
        return kvm_ok ? "kvm" : "tcg";
    return accel;
}

bool kvm_usable() { return ::access("/dev/kvm", R_OK | W_OK) == 0; }

std::uint64_t guest_ram(std::uint64_t memory, const std::string& accel) {
    return accel == "tcg" ? memory + 8192 : memory;
}

std::vector<std::string> qemu_args(const config::VmSpec& spec, const LaunchOptions& o) {
    std::vector<std::string> a{
        o.qemu,
        "-name", fmt::format("guest={},debug-threads=on", spec.name),
        "-machine", fmt::format("{},accel={}", spec.machine, o.accel),
        "-m", fmt::format("{}K", guest_ram(spec.memory, o.accel) >> 10),
        "-smp", fmt::format("{}", spec.cpus),
        "-cpu", spec.cpu_model,
        "-nodefaults", "-no-user-config", "-display", "none",
        "-qmp", fmt::format("unix:{},server=on,wait=off", o.qmp_socket),
        // A file QEMU writes itself: the guest never waits on ferryd.
        "-chardev", fmt::format("file,id=ferry-console,path={},append=on", o.console_file),
        "-serial", "chardev:ferry-console",
    };
    if (spec.kernel) {
        a.insert(a.end(), {"-kernel", *spec.kernel});
        if (spec.initrd)
            a.insert(a.end(), {"-initrd", *spec.initrd});
        if (spec.append)
            a.insert(a.end(), {"-append", *spec.append});
    }
    // -blockdev with node names, so that QMP can address each disk's format
    // node (dirty bitmaps, NBD exports): disk<i> is the format node,
    // disk<i>-file the file or device under it.
    int ide = 0;
    for (std::size_t i = 0; i < spec.disks.size(); ++i) {
        auto& d = spec.disks[i];
        std::error_code ec;
        auto protocol = std::filesystem::is_block_file(d.path, ec) ? "host_device" : "file";
        auto ro = d.readonly ? "on" : "off";
        a.insert(a.end(), {"-blockdev", fmt::format("driver={},filename={},node-name=disk{}-file,read-only={}",
                                                    protocol, d.path, i, ro)});
        a.insert(a.end(), {"-blockdev", fmt::format("driver={},file=disk{}-file,node-name=disk{},read-only={}",
                                                    d.format, i, i, ro)});
        if (d.bus == "ide") { // primary master, primary slave, secondary master, ...
            a.insert(a.end(), {"-device", fmt::format("ide-hd,drive=disk{},id=disk{}-dev,bus=ide.{},unit={}", i, i,
                                                      ide / 2, ide % 2)});
            ++ide;
        } else {
            a.insert(a.end(), {"-device", fmt::format("virtio-blk-pci,drive=disk{},id=disk{}-dev", i, i)});
        }
    }
    if (o.start_paused)
        a.push_back("-S");
    if (o.incoming)
        a.insert(a.end(), {"-incoming", "defer"});
    a.insert(a.end(), spec.extra_args.begin(), spec.extra_args.end());
    return a;
}

} // namespace ferry::engine
