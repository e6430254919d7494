#include "engine/host_facts.hpp"

#include "block/target_image.hpp"
#include "engine/async.hpp"

#include <fstream>
#include <sstream>
#include <unistd.h>

namespace ferry::engine {

namespace {

std::string read_file(const char* path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

} // namespace

HostFacts probe_host(const std::string& qemu) {
    HostFacts f;
    f.memory = parse_meminfo_total(read_file("/proc/meminfo"));
    f.cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
    f.host_cpu = parse_cpu_model_name(read_file("/proc/cpuinfo"));
    auto ask = [&](const std::vector<std::string>& argv) {
        auto out = block::run_tool(argv, std::chrono::seconds(20));
        if (!out) {
            engine_log()->warn("asking {} what it offers: {}", qemu, out.error().message);
            return std::string();
        }
        return *out;
    };
    f.qemu_version = parse_qemu_version(ask({qemu, "--version"}));
    f.machine_types = parse_machine_help(ask({qemu, "-machine", "help"}));
    f.cpu_models = parse_cpu_help(ask({qemu, "-cpu", "help"}));
    return f;
}

} // namespace ferry::engine
