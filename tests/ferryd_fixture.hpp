#pragma once
// A real ferryd process on a temporary state directory, driven through the
// real ferryctl (tests of the control layer and of the daemon's robustness).
#include "support.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <string>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

namespace {

using namespace std::chrono_literals;
using ferry::test::TempDir;
using nlohmann::json;

struct Output {
    int status = -1;
    std::string out;
    std::string err;
};

Output sh(const std::string& command, const TempDir& dir) {
    auto out = dir / "cmd.out";
    auto err = dir / "cmd.err";
    int rc = std::system((command + " >" + out + " 2>" + err + " </dev/null").c_str());
    return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, ferry::test::read_file(out), ferry::test::read_file(err)};
}

class Ferryd : public ::testing::Test {
protected:
    void SetUp() override {
        socket_ = dir_ / "ferryd.sock";
        write_config();
        ferry::test::write_file(dir_ / "vm.toml", R"(name = "demo"
memory = "128Mi"
kernel = ")" + ferry::test::guest_kernel() + R"("
append = "ws=32 rate=8 hb=50"
)");
    }
    void TearDown() override {
        ctl("vm delete demo");
        stop();
        // ferryd leaves QEMU running by design: a test that ended mid-migration
        // (or failed) leaves its source and destination, which go here.
        ferry::test::kill_processes_mentioning(dir_.path() + "/");
    }
    // ferryd.toml with extra lines in [node] and [migration].
    void write_config(const std::string& node_extra = "", const std::string& migration_extra = "") {
        ferry::test::write_file(dir_ / "ferryd.toml", R"([node]
name = "node-a"
state_dir = ")" + dir_.path() + R"(/state"
control_socket = ")" + socket_ + R"("
accel = "tcg"
log_level = "debug"
)" + node_extra + R"(
[migration]
bandwidth_per_migration = 0
)" + migration_extra);
    }
    // nofile > 0: ferryd runs with that RLIMIT_NOFILE (soft and hard).
    void start(rlim_t nofile = 0) {
        pid_ = ::fork();
        if (pid_ == 0) {
            ::prctl(PR_SET_PDEATHSIG, SIGKILL); // never outlive a crashed test (it would hold meson's pipe)
            if (nofile > 0) {
                rlimit rl{nofile, nofile};
                ::setrlimit(RLIMIT_NOFILE, &rl);
            }
            auto log = dir_ / "ferryd.log";
            std::freopen(log.c_str(), "a", stderr);
            ::execl(ferry::test::ferryd_bin().c_str(), "ferryd", "--config", (dir_ / "ferryd.toml").c_str(), nullptr);
            _exit(127);
        }
        // A restart's recovery (stopping QEMUs, hooks) comes first.
        for (int i = 0; i < 1000 && !std::filesystem::exists(socket_); ++i)
            std::this_thread::sleep_for(20ms);
        ASSERT_TRUE(std::filesystem::exists(socket_)) << ferry::test::read_file(dir_ / "ferryd.log");
    }
    void stop() { stop_with_status(); }
    // SIGTERM, and how ferryd ended (waitpid's status; -1 if it was not running).
    int stop_with_status() {
        if (pid_ <= 0)
            return -1;
        ::kill(pid_, SIGTERM);
        int status = -1;
        ::waitpid(pid_, &status, 0);
        pid_ = -1;
        return status;
    }
    Output ctl(const std::string& args) {
        return sh(ferry::test::ferryctl_bin() + " --socket " + socket_ + " " + args, dir_);
    }
    json ctl_json(const std::string& args) {
        auto o = ctl("--json " + args);
        EXPECT_EQ(o.status, 0) << args << ": " << o.err;
        return json::parse(o.out, nullptr, false);
    }
    void wait_heartbeats() {
        for (int i = 0; i < 300; ++i) {
            if (ferry::test::read_file(dir_ / "state/vms/demo/console.log").find("FERRY-HB 2 ") != std::string::npos)
                return;
            std::this_thread::sleep_for(50ms);
        }
        FAIL() << "no heartbeat from the guest";
    }

    TempDir dir_;
    std::string socket_;
    pid_t pid_ = -1;
};


} // namespace
