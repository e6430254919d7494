#include "engine/vm.hpp"

#include "common/log.hpp"
#include "engine/process.hpp"
#include "engine/qemu_args.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <fstream>
#include <sstream>

namespace ferry::engine {

namespace asio = boost::asio;
namespace fs = std::filesystem;

void to_json(nlohmann::json& j, const VmRecord& r) {
    j = {{"name", r.name},       {"node", r.node},         {"adopted", r.adopted},
         {"created_at", r.created_at}, {"pid", r.pid},     {"generation", r.generation},
         {"run_dir", r.run_dir}, {"qmp_socket", r.qmp_socket}};
    j["spec"] = r.spec ? nlohmann::json(*r.spec) : nlohmann::json(nullptr);
}

void from_json(const nlohmann::json& j, VmRecord& r) {
    r.name = j.at("name");
    r.node = j.value("node", "");
    r.adopted = j.value("adopted", false);
    r.created_at = j.value("created_at", "");
    r.pid = j.value("pid", -1);
    r.generation = j.value("generation", 0);
    r.run_dir = j.value("run_dir", "");
    r.qmp_socket = j.value("qmp_socket", "");
    if (j.contains("spec") && !j["spec"].is_null())
        r.spec = j["spec"].get<config::VmSpec>();
}

std::string log_tail(const std::string& path, std::size_t max_bytes) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string s = ss.str();
    while (!s.empty() && (s.back() == '\n' || s.back() == ' '))
        s.pop_back();
    if (s.size() > max_bytes)
        s = "..." + s.substr(s.size() - max_bytes);
    for (auto& c : s)
        if (c == '\n')
            c = ' ';
    return s.empty() ? "(no output)" : s;
}

Result<PreparedLaunch> prepare_launch(const LaunchRequest& req) {
    PreparedLaunch p;
    auto& q = p.qemu;
    q.generation = req.generation;
    q.run_dir = fmt::format("{}/r{}", req.vm_dir, req.generation);
    q.qmp_socket = q.run_dir + "/qmp.sock";
    q.console_file = q.run_dir + "/console.out";
    for (auto* path : {&q.qmp_socket}) {
        if (path->size() > max_socket_path)
            return make_error(Errc::invalid_argument,
                              fmt::format("socket path {} is {} bytes, longer than the {} a Unix "
                                          "socket allows: use a shorter [node] state_dir",
                                          *path, path->size(), max_socket_path));
    }
    std::error_code ec;
    fs::remove_all(q.run_dir, ec);
    fs::create_directories(q.run_dir, ec);
    if (ec)
        return make_error(Errc::io, fmt::format("creating {}: {}", q.run_dir, ec.message()));
    LaunchOptions opts;
    opts.qemu = req.node->qemu;
    opts.accel = resolve_accel(req.node->accel, kvm_usable());
    opts.qmp_socket = q.qmp_socket;
    opts.console_file = q.console_file;
    opts.incoming = req.incoming;
    opts.start_paused = !req.incoming || req.hold;
    p.argv = qemu_args(*req.spec, opts);
    return p;
}

asio::awaitable<Result<QemuInstance>> launch_qemu(asio::any_io_executor ex, LaunchRequest req) {
    auto log = logger("engine");
    auto prepared = prepare_launch(req);
    if (!prepared)
        co_return prepared.error();
    auto& q = prepared->qemu;
    auto& argv = prepared->argv;
    // The wrapper launcher: QEMU's argv after the wrapper's; the wrapper
    // execs it, so the pid ferry tracks is QEMU's.
    argv.insert(argv.begin(), req.node->qemu_wrapper.begin(), req.node->qemu_wrapper.end());
    log->info("vm {}: starting QEMU r{}{}", req.spec->name, req.generation, req.incoming ? " (incoming)" : "");
    // extra_args may carry secrets (-object secret,data=...): never logged.
    log->debug("vm {}: {} (and {} extra_args, not logged)", req.spec->name,
               fmt::join(argv.begin(), argv.end() - static_cast<std::ptrdiff_t>(req.spec->extra_args.size()), " "),
               req.spec->extra_args.size());
    auto pid = spawn_process(argv, q.log_path());
    if (!pid)
        co_return pid.error();
    q.pid = *pid;

    // Connect while watching the process: a QEMU that rejects its arguments
    // exits at once and its log says why.
    asio::steady_timer timer(ex);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    for (;;) {
        if (!process_alive(q.pid))
            co_return make_error(Errc::io, fmt::format("QEMU for {} exited at start: {}",
                                                       req.spec->name, log_tail(q.log_path())));
        if (fs::exists(q.qmp_socket)) {
            auto c = co_await qmp::Client::connect(ex, q.qmp_socket, std::chrono::seconds(10));
            if (c) {
                q.qmp = *c;
                break;
            }
        }
        if (std::chrono::steady_clock::now() > deadline) {
            co_await terminate_process(ex, q.pid, std::chrono::seconds(2));
            co_return make_error(Errc::timeout, fmt::format("QEMU for {} did not open its QMP socket "
                                                            "within 30 s: {}",
                                                            req.spec->name, log_tail(q.log_path())));
        }
        timer.expires_after(std::chrono::milliseconds(20));
        co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
    }

    q.console = std::make_shared<ConsoleCapture>(ex, q.console_file, req.vm_dir + "/console.log",
                                                 fmt::format("r{}", req.generation),
                                                 ConsoleLimits{req.node->console_log_max});
    q.console->start();
    if (!req.incoming) {
        auto cont = co_await q.qmp->execute("cont");
        if (!cont) {
            co_await destroy_qemu(ex, q);
            co_return cont.error();
        }
    }
    co_return q;
}

asio::awaitable<void> destroy_qemu(asio::any_io_executor ex, QemuInstance& q) {
    if (q.qmp && q.qmp->connected())
        co_await q.qmp->execute("quit", {}, std::chrono::seconds(3));
    if (q.pid > 0) {
        // No co_await inside a condition: GCC 12 miscompiles it.
        bool exited = co_await wait_exit(ex, q.pid, std::chrono::seconds(3));
        if (!exited)
            co_await terminate_process(ex, q.pid, std::chrono::seconds(3));
    }
    if (q.console)
        q.console->stop();
    if (q.qmp)
        q.qmp->close();
    if (!q.run_dir.empty()) {
        std::error_code ec;
        fs::remove_all(q.run_dir, ec);
    }
}

// The spec of an adopted VM launches its migration destinations: what QEMU
// can tell (memory, vCPUs) must match, or the migration fails later with a
// cause nobody sees.
// Under TCG the destinations get 8 KiB more than the spec's memory (see
// guest_ram), so the adopted QEMU must have been started that way too.
asio::awaitable<Result<void>> check_adopted(qmp::Client& qmp, const config::VmSpec& spec, const std::string& accel) {
    auto memory = co_await qmp.execute("query-memory-size-summary");
    if (!memory)
        co_return memory.error();
    auto base = (*memory).value("base-memory", std::uint64_t{0});
    auto want = guest_ram(spec.memory, accel);
    if (base != want)
        co_return make_error(
            Errc::invalid_argument,
            want == spec.memory
                ? fmt::format("the spec says memory = {} MiB, the running QEMU has {} KiB", spec.memory >> 20, base >> 10)
                : fmt::format("the spec says memory = {} MiB, which under TCG ferry runs as -m {}K (8 KiB more, so "
                              "that QEMU before 9.0 tracks every guest write during a migration); the running QEMU "
                              "has {} KiB",
                              spec.memory >> 20, want >> 10, base >> 10));
    auto cpus = co_await qmp.execute("query-cpus-fast");
    if (!cpus)
        co_return cpus.error();
    if (!cpus->is_array() || static_cast<std::int64_t>(cpus->size()) != spec.cpus)
        co_return make_error(Errc::invalid_argument,
                             fmt::format("the spec says cpus = {}, the running QEMU has {}", spec.cpus,
                                         cpus->is_array() ? cpus->size() : 0));
    co_return Result<void>{};
}

} // namespace ferry::engine
