#include "engine/process.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace ferry::engine {

Result<int> spawn_process(const std::vector<std::string>& argv, const std::string& log_path) {
    if (argv.empty())
        return make_error(Errc::invalid_argument, "spawn: empty command");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0640);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    // Nothing else of ferryd's leaks into QEMU: an inherited QMP or control
    // socket would keep a peer from ever seeing ferryd go away.
    posix_spawn_file_actions_addclosefrom_np(&actions, 3);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    sigset_t empty, all;
    sigemptyset(&empty);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setsigdefault(&attr, &all);

    std::vector<char*> args;
    for (auto& a : argv)
        args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    pid_t pid = -1;
    int rc = posix_spawnp(&pid, args[0], &actions, &attr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (rc != 0)
        return make_error(Errc::io, fmt::format("cannot start {}: {}", argv[0], std::strerror(rc)));
    return static_cast<int>(pid);
}

bool process_alive(int pid) {
    if (pid <= 0)
        return false;
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid)
        return false; // our child, now reaped
    if (r == 0)
        return true; // our child, running
    // Not our child (adopted): probe it.
    return ::kill(pid, 0) == 0 || errno == EPERM;
}

boost::asio::awaitable<bool> wait_exit(boost::asio::any_io_executor ex, int pid,
                                       std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    boost::asio::steady_timer timer(ex);
    while (process_alive(pid)) {
        if (std::chrono::steady_clock::now() >= deadline)
            co_return false;
        timer.expires_after(std::chrono::milliseconds(20));
        co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    }
    co_return true;
}

boost::asio::awaitable<void> terminate_process(boost::asio::any_io_executor ex, int pid,
                                               std::chrono::milliseconds grace) {
    if (!process_alive(pid))
        co_return;
    ::kill(pid, SIGTERM);
    // No co_await inside a condition: GCC 12 miscompiles it.
    bool exited = co_await wait_exit(ex, pid, grace);
    if (exited)
        co_return;
    ::kill(pid, SIGKILL);
    co_await wait_exit(ex, pid, std::chrono::seconds(10));
}

void reap_children() {
    int status = 0;
    while (::waitpid(-1, &status, WNOHANG) > 0) {
    }
}

} // namespace ferry::engine
