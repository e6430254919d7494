// ferryd: the per-node daemon. Thin: config, logging, engine, control socket.
#include "common/lock_file.hpp"
#include "common/log.hpp"
#include "config/node_config.hpp"
#include "control/methods.hpp"
#include "control/server.hpp"
#include "control/metrics.hpp"
#include "engine/engine.hpp"
#include "transport/channel.hpp"

#include <CLI/CLI.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include <boost/asio/ip/tcp.hpp>

#include <csignal>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#include <filesystem>
#include <iostream>
#include <cstddef>
#include <cstring>
#include <sys/un.h>
#include <sys/socket.h>
#include <grp.h>
#include <optional>
#include <sys/resource.h>
#include <sys/stat.h>

namespace asio = boost::asio;

namespace {

asio::awaitable<ferry::Result<void>> start(ferry::engine::Engine* engine, ferry::scheduler::Planner* planner,
                                           ferry::control::Server* server, ferry::control::Metrics* metrics) {
    auto r = co_await engine->start();
    if (!r)
        co_return r;
    if (auto p = planner->start(); !p)
        co_return p;
    if (auto& listen = engine->config().metrics.listen; !listen.empty())
        if (auto m = metrics->listen(listen); !m)
            co_return m.error().wrap(engine->config().where("metrics.listen"));
    auto started = server->start();
    if (!started)
        co_return started;
    if (auto& group = engine->config().node.control_socket_group; !group.empty()) {
        auto& socket = engine->config().node.control_socket;
        auto* g = ::getgrnam(group.c_str());
        if (!g || ::chown(socket.c_str(), static_cast<uid_t>(-1), g->gr_gid) != 0)
            co_return ferry::make_error(ferry::Errc::io, fmt::format("{}: giving {} to group {}: {}",
                                                                     engine->config().where("node.control_socket_group"),
                                                                     socket, group, std::strerror(errno)));
    }
    co_return started;
}

// systemd's readiness protocol (Type=notify), without libsystemd: one
// datagram to $NOTIFY_SOCKET. Nothing happens when it is not set.
void notify_systemd(const std::string& state) {
    const char* path = std::getenv("NOTIFY_SOCKET");
    if (!path || (path[0] != '/' && path[0] != '@'))
        return;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::string p = path;
    if (p.size() >= sizeof(addr.sun_path))
        return;
    std::memcpy(addr.sun_path, p.data(), p.size());
    if (p[0] == '@')
        addr.sun_path[0] = '\0'; // an abstract socket
    int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + p.size());
    (void)::sendto(fd, state.data(), state.size(), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&addr), len);
    ::close(fd);
}

// Every check a start makes before it changes anything.
ferry::Result<ferry::config::NodeConfig> load_checked(const std::string& path) {
    auto cfg = ferry::config::load_node_config(path);
    if (!cfg)
        return cfg.error();
    if (auto r = ferry::engine::Engine::preflight(*cfg); !r)
        return r.error();
    return cfg;
}

// A ferryd holds state_dir's lock (tried shared and let go at once; nothing
// is created).
bool state_dir_in_use(const ferry::config::NodeConfig& cfg) {
    int fd = ::open((cfg.node.state_dir + "/ferryd.lock").c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    bool held = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    ::close(fd);
    return held;
}

// The checks only a start makes, which --check-config makes too: what a
// running ferryd holds itself (its control socket, its metrics port) is no
// reason to refuse a SIGHUP, so Engine::preflight leaves these out.
ferry::Result<void> check_start(const ferry::config::NodeConfig& cfg) {
    namespace fs = std::filesystem;
    auto& socket = cfg.node.control_socket;
    auto lock = cfg.node.state_dir + "/ferryd.lock";
    std::error_code ec;
    if (fs::path(socket).lexically_normal() == fs::path(lock).lexically_normal() || fs::equivalent(socket, lock, ec))
        return ferry::make_error(ferry::Errc::invalid_argument,
                                 fmt::format("{}: {} is the lock file of node.state_dir; give the control socket a "
                                             "path of its own",
                                             cfg.where("node.control_socket"), socket));
    auto status = fs::symlink_status(socket, ec);
    if (!ec && fs::exists(status) && !fs::is_socket(status))
        return ferry::make_error(ferry::Errc::invalid_argument,
                                 fmt::format("{}: {} {}; ferryd replaces only a stale socket there: remove it or pick "
                                             "another path",
                                             cfg.where("node.control_socket"), socket,
                                             fs::is_directory(status) ? "is a directory"
                                                                      : "exists and is not a socket"));
    // The ferryd on this state_dir holds the port itself (a start would be
    // refused for the state_dir anyway).
    if (auto& listen = cfg.metrics.listen; !listen.empty() && !state_dir_in_use(cfg)) {
        auto ep = ferry::transport::parse_endpoint(listen);
        if (!ep)
            return ep.error().wrap(cfg.where("metrics.listen"));
        asio::io_context io;
        asio::ip::tcp::acceptor acceptor(io);
        boost::system::error_code bec;
        acceptor.open(ep->protocol(), bec);
        if (!bec)
            acceptor.set_option(asio::ip::tcp::acceptor::reuse_address(true), bec);
        if (!bec)
            acceptor.bind(*ep, bec);
        if (bec)
            return ferry::make_error(ferry::Errc::invalid_argument,
                                     fmt::format("{}: metrics.listen \"{}\": {}", cfg.where("metrics.listen"), listen,
                                                 bec.message()));
    }
    return {};
}

// Before anything reads or changes the state: one ferryd per state_dir, and
// none on a control socket that another ferryd answers on.
ferry::Result<ferry::LockFile> claim(const ferry::config::NodeConfig& cfg) {
    namespace fs = std::filesystem;
    std::error_code ec;
    // Made here (under umask 077: mode 0700) when missing; an existing one
    // passed the preflight and keeps the mode its owner gave it.
    if (!fs::exists(cfg.node.state_dir, ec)) {
        fs::create_directories(cfg.node.state_dir, ec);
        if (ec)
            return ferry::make_error(ferry::Errc::io,
                                     fmt::format("creating state_dir {}: {}", cfg.node.state_dir, ec.message()));
    }
    auto lock = ferry::LockFile::acquire(cfg.node.state_dir + "/ferryd.lock");
    if (!lock && lock.error().code == ferry::Errc::already_exists)
        return lock.error().wrap(fmt::format("state_dir {} is in use by another ferryd", cfg.node.state_dir));
    if (!lock)
        return lock.error().wrap(fmt::format("cannot lock state_dir {}", cfg.node.state_dir));
    if (ferry::control::socket_in_use(cfg.node.control_socket))
        return ferry::make_error(ferry::Errc::already_exists,
                                 fmt::format("control socket {} is in use by another ferryd (with another "
                                             "state_dir); give this one its own [node] control_socket",
                                             cfg.node.control_socket));
    return lock;
}

// A daemon with many clients and VMs needs more than the default 1024 fds.
void raise_fd_limit() {
    rlimit rl{};
    if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        ::setrlimit(RLIMIT_NOFILE, &rl);
    }
}

} // namespace

int main(int argc, char** argv) {
    CLI::App app{"ferryd: live migration of QEMU VMs"};
    app.set_version_flag("--version", "ferryd " FERRY_VERSION);
    std::string config_path, check_path, log_level;
    app.add_option("--config,-c", config_path, "ferryd.toml")->default_val("/etc/ferry/ferryd.toml");
    app.add_option("--check-config", check_path, "validate a ferryd.toml as a start would, and exit");
    app.add_option("--log-level", log_level, "override [node] log_level");
    CLI11_PARSE(app, argc, argv);
    // Before anything, as a start would (and for --check-config too).
    if (!log_level.empty() && !ferry::set_log_level(log_level)) {
        std::cerr << "ferryd: --log-level: unknown level " << log_level
                  << " (trace, debug, info, warn, error, critical, off)\n";
        return 2;
    }

    if (!check_path.empty()) {
        auto cfg = load_checked(check_path);
        if (cfg)
            if (auto r = check_start(*cfg); !r)
                cfg = r.error();
        if (!cfg) {
            std::cerr << cfg.error().message << "\n";
            return 1;
        }
        std::cout << check_path << ": ok (node " << cfg->node.name << ")\n";
        return 0;
    }

    auto cfg = load_checked(config_path);
    if (cfg)
        if (auto r = check_start(*cfg); !r)
            cfg = r.error();
    if (!cfg) {
        std::cerr << "ferryd: " << cfg.error().message << "\n";
        return 1;
    }
    if (log_level.empty())
        ferry::set_log_level(cfg->node.log_level); // checked by the config reader
    ::signal(SIGPIPE, SIG_IGN);
    ::umask(077); // records, logs and sockets are ferryd's user's alone
    raise_fd_limit();
    auto log = ferry::logger("ferryd");
    auto lock = claim(*cfg);
    if (!lock) {
        std::cerr << "ferryd: " << lock.error().message << "\n";
        return 1;
    }

    // Declared first, so it outlives everything bound to it; shut down (below)
    // before those go, so the coroutines still suspended at exit (streams,
    // connections, the engine's own) are destroyed while what they refer to
    // still exists.
    struct IoContext : asio::io_context {
        using asio::io_context::shutdown;
    } io;
    ferry::engine::Engine engine(io.get_executor(), *cfg);
    ferry::control::ServerLimits limits{static_cast<std::size_t>(cfg->node.control_max_connections),
                                        std::chrono::seconds(cfg->node.control_idle_timeout)};
    ferry::control::Server server(io.get_executor(), cfg->node.control_socket,
                                  static_cast<unsigned>(std::stoul(cfg->node.control_socket_mode, nullptr, 8)), limits);
    ferry::scheduler::Planner planner(engine);
    ferry::control::add_engine_methods(server, engine, planner);
    ferry::control::Metrics metrics(engine, planner);

    int exit_code = 0;
    asio::co_spawn(io, start(&engine, &planner, &server, &metrics), [&](std::exception_ptr ep, ferry::Result<void> r) {
        if (ep)
            std::rethrow_exception(ep);
        if (!r) {
            log->critical("{}", r.error().message);
            exit_code = 1;
            io.stop();
            return;
        }
        log->info("node {} ready (ferryd {})", cfg->node.name, FERRY_VERSION);
        notify_systemd(fmt::format("READY=1\nSTATUS=node {} ready\nMAINPID={}", cfg->node.name, ::getpid()));
    });

    asio::signal_set signals(io, SIGINT, SIGTERM);
    signals.async_wait([&](boost::system::error_code ec, int sig) {
        if (ec)
            return;
        log->info("signal {}: shutting down; VMs keep running", sig);
        notify_systemd("STOPPING=1");
        server.stop();
        metrics.stop();
        planner.stop();
        engine.shutdown();
        io.stop();
    });
    // SIGHUP: re-read the file. A file that would not load keeps the running
    // configuration, and the log says why.
    asio::signal_set hangup(io, SIGHUP);
    std::function<void(boost::system::error_code, int)> on_hangup = [&](boost::system::error_code ec, int) {
        if (ec)
            return;
        notify_systemd("RELOADING=1");
        auto fresh = load_checked(config_path);
        if (!fresh) {
            log->error("SIGHUP: keeping the running configuration; {} would not load: {}", config_path,
                       fresh.error().message);
        } else {
            auto kept = engine.reload(*fresh);
            if (log_level.empty())
                ferry::set_log_level(fresh->node.log_level);
            log->info("SIGHUP: {} re-read; its settings apply to migrations started from now on", config_path);
            for (auto& k : kept)
                log->warn("SIGHUP: {}", k);
        }
        notify_systemd("READY=1");
        hangup.async_wait(on_hangup);
    };
    hangup.async_wait(on_hangup);
    io.run();
    io.shutdown();
    return exit_code;
}
