// ferry-guest-check: verifies the test guest's memory through its QMP socket.
#include "verify.hpp"

#include <CLI/CLI.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <iostream>

namespace {
boost::asio::awaitable<ferry::Result<ferry::guest::VerifyReport>>
check(boost::asio::any_io_executor ex, std::string qmp_path, std::uint32_t pages, std::string dump,
      bool keep_stopped) {
    auto c = co_await ferry::qmp::Client::connect(ex, qmp_path);
    if (!c)
        co_return c.error();
    auto r = co_await ferry::guest::verify_live(**c, pages, dump, keep_stopped);
    (*c)->close();
    co_return r;
}
} // namespace

int main(int argc, char** argv) {
    CLI::App app{"Verify the ferry test guest's memory (pauses the VM briefly)"};
    std::string qmp_path, dump = "/tmp/ferry-guest-dump.bin", console;
    std::uint32_t pages = 0;
    bool keep_stopped = false;
    app.add_option("--qmp", qmp_path, "QMP socket of the VM")->required();
    app.add_option("--pages", pages, "working-set pages (see the guest banner)");
    app.add_option("--console", console, "console log to read the page count from");
    app.add_option("--dump", dump, "where to write the memory dump");
    app.add_flag("--keep-stopped", keep_stopped, "leave the VM paused after the dump");
    CLI11_PARSE(app, argc, argv);
    if (pages == 0 && !console.empty())
        pages = ferry::guest::pages_from_console(console);
    if (pages == 0) {
        std::cerr << "ferry-guest-check: give --pages, or --console with the guest's banner in it\n";
        return 2;
    }
    boost::asio::io_context io;
    auto fut = boost::asio::co_spawn(io, check(io.get_executor(), qmp_path, pages, dump, keep_stopped),
                                     boost::asio::use_future);
    io.run();
    auto r = fut.get();
    if (!r) {
        std::cerr << "memory check FAILED: " << r.error().message << "\n";
        return 1;
    }
    std::cout << "memory verified: " << r->summary() << "\n";
    return 0;
}
