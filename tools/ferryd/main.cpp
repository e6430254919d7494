// ferryd: the per-node daemon. Thin: config, logging, engine, control socket.
#include "common/log.hpp"
#include "config/node_config.hpp"
#include "control/methods.hpp"
#include "control/server.hpp"
#include "engine/engine.hpp"

#include <CLI/CLI.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/use_future.hpp>

#include <csignal>
#include <iostream>

namespace asio = boost::asio;

namespace {

asio::awaitable<ferry::Result<void>> start(ferry::engine::Engine* engine, ferry::control::Server* server) {
    auto r = co_await engine->start();
    if (!r)
        co_return r;
    co_return server->start();
}

} // namespace

int main(int argc, char** argv) {
    CLI::App app{"ferryd: live migration of QEMU VMs"};
    std::string config_path, check_path, log_level;
    app.add_option("--config,-c", config_path, "ferryd.toml")->default_val("/etc/ferry/ferryd.toml");
    app.add_option("--check-config", check_path, "validate a ferryd.toml and exit");
    app.add_option("--log-level", log_level, "override [node] log_level");
    CLI11_PARSE(app, argc, argv);

    if (!check_path.empty()) {
        auto cfg = ferry::config::load_node_config(check_path);
        if (!cfg) {
            std::cerr << cfg.error().message << "\n";
            return 1;
        }
        std::cout << check_path << ": ok (node " << cfg->node.name << ")\n";
        return 0;
    }

    auto cfg = ferry::config::load_node_config(config_path);
    if (!cfg) {
        std::cerr << "ferryd: " << cfg.error().message << "\n";
        return 1;
    }
    if (!ferry::set_log_level(log_level.empty() ? cfg->node.log_level : log_level)) {
        std::cerr << "ferryd: --log-level: unknown level " << log_level << "\n";
        return 2;
    }
    ::signal(SIGPIPE, SIG_IGN);
    auto log = ferry::logger("ferryd");

    asio::io_context io;
    ferry::engine::Engine engine(io.get_executor(), *cfg);
    ferry::control::Server server(io.get_executor(), cfg->node.control_socket,
                                  static_cast<unsigned>(std::stoul(cfg->node.control_socket_mode, nullptr, 8)));
    ferry::control::add_engine_methods(server, engine);

    int exit_code = 0;
    asio::co_spawn(io, start(&engine, &server), [&](std::exception_ptr ep, ferry::Result<void> r) {
        if (ep)
            std::rethrow_exception(ep);
        if (!r) {
            log->critical("{}", r.error().message);
            exit_code = 1;
            io.stop();
            return;
        }
        log->info("node {} ready", cfg->node.name);
    });

    asio::signal_set signals(io, SIGINT, SIGTERM);
    signals.async_wait([&](boost::system::error_code ec, int sig) {
        if (ec)
            return;
        log->info("signal {}: shutting down; VMs keep running", sig);
        server.stop();
        engine.shutdown();
        io.stop();
    });
    io.run();
    return exit_code;
}
