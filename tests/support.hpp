#pragma once
// Helpers shared by the test executables: temp dirs, running coroutines to
// completion, and where the build put the binaries.
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <iterator>
#include <unistd.h>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace ferry::test {

inline std::string env_or(const char* name, const char* fallback) {
    const char* v = std::getenv(name);
    return v ? v : fallback;
}

// Set by meson (tests/meson.build).
inline std::string build_dir() { return env_or("FERRY_BUILD_DIR", "build"); }
inline std::string guest_kernel() { return build_dir() + "/tools/guest/ferry-guest.elf"; }
inline std::string ferryd_bin() { return build_dir() + "/tools/ferryd"; }
// A VM spec booting the test guest: `extra` lines follow the guest's own.
inline std::string guest_spec(const std::string& name, const std::string& memory, const std::string& append,
                              const std::string& extra = "") {
    return "name = \"" + name + "\"\nmemory = \"" + memory + "\"\nkernel = \"" + guest_kernel() +
           "\"\nappend = \"" + append + "\"\n" + extra;
}
inline std::string ferryctl_bin() { return build_dir() + "/tools/ferryctl"; }

// A short-lived directory under /tmp with a short path (Unix sockets live there).
class TempDir {
public:
    TempDir() {
        std::string tmpl = "/tmp/ft-XXXXXX";
        path_ = ::mkdtemp(tmpl.data());
    }
    ~TempDir() {
        if (std::getenv("FERRY_KEEP_TEST_DIRS") == nullptr) {
            std::error_code ec;
            std::filesystem::remove_all(path_, ec);
        }
    }
    const std::string& path() const { return path_; }
    std::string operator/(const std::string& name) const { return path_ + "/" + name; }

private:
    std::string path_;
};

// The processes whose command line mentions `text`.
inline std::vector<pid_t> pids_mentioning(const std::string& text) {
    std::vector<pid_t> pids;
    std::error_code ec;
    for (auto& e : std::filesystem::directory_iterator("/proc", ec)) {
        auto name = e.path().filename().string();
        if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos)
            continue;
        std::ifstream in(e.path() / "cmdline", std::ios::binary);
        std::string args((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        pid_t pid = std::stoi(name);
        if (args.find(text) != std::string::npos && pid != ::getpid())
            pids.push_back(pid);
    }
    return pids;
}

// Kills them: what a failed test left running must not slow the next.
inline void kill_processes_mentioning(const std::string& text) {
    for (auto pid : pids_mentioning(text))
        ::kill(pid, SIGKILL);
}

inline void write_file(const std::string& path, const std::string& text) {
    std::ofstream(path) << text;
}

inline std::string read_file(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// Runs an awaitable on io until it completes (other work on io keeps going
// meanwhile), failing the test after timeout.
template <class T>
T run(boost::asio::io_context& io, boost::asio::awaitable<T> aw,
      std::chrono::seconds timeout = std::chrono::seconds(120)) {
    io.restart();
    auto fut = boost::asio::co_spawn(io, std::move(aw), boost::asio::use_future);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (fut.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
        if (std::chrono::steady_clock::now() > deadline)
            throw std::runtime_error("test coroutine timed out");
        io.run_one_for(std::chrono::milliseconds(50));
        if (io.stopped())
            io.restart();
    }
    return fut.get();
}

// Lets background work on io run for a while.
inline void pump(boost::asio::io_context& io, std::chrono::milliseconds d) {
    io.restart();
    auto deadline = std::chrono::steady_clock::now() + d;
    while (std::chrono::steady_clock::now() < deadline) {
        io.run_one_for(std::chrono::milliseconds(20));
        if (io.stopped())
            io.restart();
    }
}

} // namespace ferry::test
