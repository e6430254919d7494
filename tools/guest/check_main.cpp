// ferry-guest-check: verifies the test guest's memory through ferryd
// (ferryd holds the VM's QMP connection): pause, pmemsave, resume, check.
#include "control/client.hpp"
#include "verify.hpp"

#include <CLI/CLI.hpp>

#include <cstdlib>
#include <iostream>
#include <optional>

using nlohmann::json;

int main(int argc, char** argv) {
    CLI::App app{"Verify the ferry test guest's memory (pauses the VM for the dump)"};
    std::string socket, vm, dump;
    const char* env_socket = std::getenv("FERRY_SOCKET");
    socket = env_socket ? env_socket : "/run/ferry/ferryd.sock";
    std::uint32_t pages = 0, stride = 0;
    app.add_option("--socket", socket, "ferryd control socket");
    app.add_option("--vm", vm, "VM name")->required();
    app.add_option("--pages", pages, "working-set pages (default: from the guest's banner)");
    app.add_option("--stride", stride, "the guest's sweep stride (default: from the guest's banner, else 1)");
    app.add_option("--dump", dump,
                   "where QEMU writes the memory dump, kept (default: a private temporary directory, removed after)");
    CLI11_PARSE(app, argc, argv);

    auto client = ferry::control::Client::connect(socket);
    if (!client) {
        std::cerr << "ferry-guest-check: " << client.error().message << "\n";
        return 1;
    }
    auto qmp = [&](const std::string& command, json args) {
        return (*client)->call("vm.qmp", {{"name", vm}, {"command", command}, {"arguments", std::move(args)}});
    };
    auto info = (*client)->call("vm.show", {{"name", vm}});
    if (!info) {
        std::cerr << "ferry-guest-check: " << info.error().message << "\n";
        return 1;
    }
    std::string console = info->value("console_log", "");
    if (!ferry::guest::guest_ready(console)) {
        std::cerr << "ferry-guest-check: the guest has not finished filling its working set yet (no "
                     "FERRY-READY in "
                  << console << ")\n";
        return 1;
    }
    if (pages == 0) {
        pages = ferry::guest::pages_from_console(console);
        if (pages == 0) {
            std::cerr << "ferry-guest-check: no FERRY-GUEST banner in the console log of " << vm
                      << "; give --pages\n";
            return 2;
        }
    }
    // Removed however this ends (every exit is a return from main).
    std::optional<ferry::guest::DumpDir> dump_dir;
    if (dump.empty()) {
        auto made = ferry::guest::DumpDir::create();
        if (!made) {
            std::cerr << "ferry-guest-check: " << made.error().message << "\n";
            return 1;
        }
        dump_dir.emplace(std::move(*made));
        dump = dump_dir->file();
    }
    auto status = qmp("query-status", json::object());
    bool was_running = status && status->value("running", false);
    if (was_running && !qmp("stop", json::object())) {
        std::cerr << "ferry-guest-check: cannot pause " << vm << "\n";
        return 1;
    }
    auto saved = qmp("pmemsave", ferry::guest::dump_plan(pages, dump).pmemsave_args);
    if (was_running) {
        auto cont = qmp("cont", json::object());
        if (!cont) {
            std::cerr << "ferry-guest-check: cannot resume " << vm << ": " << cont.error().message << "\n";
            return 1;
        }
    }
    if (!saved) {
        std::cerr << "ferry-guest-check: " << saved.error().message << "\n";
        return 1;
    }
    if (stride == 0)
        stride = ferry::guest::stride_from_console(console);
    auto r = ferry::guest::verify_dump(dump, pages, stride);
    if (!r) {
        std::cerr << "memory check FAILED: " << r.error().message << "\n";
        return 1;
    }
    std::cout << "memory verified: " << r->summary() << "\n";
    return 0;
}
