// src/control: the request handling as a unit, then ferryd and ferryctl as
// real processes driving real QEMU.
#include "control/server.hpp"
#include "support.hpp"

#include <gtest/gtest.h>

#include <csignal>
#include <filesystem>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ferry::test::TempDir;
using nlohmann::json;

namespace {
asio::awaitable<ferry::Result<json>> echo(json params) { co_return ferry::ok(json{{"echo", params}}); }
asio::awaitable<ferry::Result<json>> refuse(json) {
    co_return ferry::make_error(ferry::Errc::conflict, "not now");
}
} // namespace

TEST(ControlServer, AnswersRequestsAndErrors) {
    asio::io_context io;
    TempDir dir;
    ferry::control::Server server(io.get_executor(), dir / "s.sock", 0600);
    server.add("echo", echo);
    server.add("refuse", refuse);
    auto ask = [&](const std::string& line) { return ferry::test::run(io, server.handle(line)); };

    auto ok = ask(R"({"id": 7, "method": "echo", "params": {"a": 1}})");
    EXPECT_EQ(ok["id"], 7);
    EXPECT_EQ(ok["result"]["echo"]["a"], 1);

    auto err = ask(R"({"id": 8, "method": "refuse"})");
    EXPECT_EQ(err["error"]["code"], "conflict");
    EXPECT_EQ(err["error"]["message"], "not now");

    EXPECT_EQ(ask(R"({"id": 9, "method": "nope"})")["error"]["code"], "not_found");
    EXPECT_EQ(ask("not json")["error"]["code"], "invalid_argument");
    EXPECT_EQ(ask(R"({"id": 1})")["error"]["code"], "invalid_argument");
    EXPECT_EQ(ask(R"({"id": 1, "method": "echo", "params": [1]})")["error"]["code"], "invalid_argument");
}

// --- end to end: ferryd + ferryctl + QEMU -----------------------------------

namespace {

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
        ferry::test::write_file(dir_ / "ferryd.toml", R"([node]
name = "node-a"
state_dir = ")" + dir_.path() + R"(/state"
control_socket = ")" + socket_ + R"("
accel = "tcg"
log_level = "debug"
[migration]
bandwidth_per_migration = 0
)");
        ferry::test::write_file(dir_ / "vm.toml", R"(name = "demo"
memory = "128Mi"
kernel = ")" + ferry::test::guest_kernel() + R"("
append = "ws=32 rate=8 hb=50"
)");
    }
    void TearDown() override {
        ctl("vm delete demo");
        stop();
    }
    void start() {
        pid_ = ::fork();
        if (pid_ == 0) {
            auto log = dir_ / "ferryd.log";
            std::freopen(log.c_str(), "a", stderr);
            ::execl(ferry::test::ferryd_bin().c_str(), "ferryd", "--config", (dir_ / "ferryd.toml").c_str(), nullptr);
            _exit(127);
        }
        for (int i = 0; i < 200 && !std::filesystem::exists(socket_); ++i)
            std::this_thread::sleep_for(20ms);
        ASSERT_TRUE(std::filesystem::exists(socket_)) << ferry::test::read_file(dir_ / "ferryd.log");
    }
    void stop() {
        if (pid_ <= 0)
            return;
        ::kill(pid_, SIGTERM);
        ::waitpid(pid_, nullptr, 0);
        pid_ = -1;
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

TEST_F(Ferryd, CheckConfigNamesFileLineAndKey) {
    ferry::test::write_file(dir_ / "bad.toml", "[node]\nname = \"a\"\n[migration]\nallow_post_copy = \"yes\"\n");
    auto o = sh(ferry::test::ferryd_bin() + " --check-config " + (dir_ / "bad.toml"), dir_);
    EXPECT_EQ(o.status, 1);
    EXPECT_NE(o.err.find("bad.toml:4: key 'migration.allow_post_copy': expected a boolean"), std::string::npos) << o.err;
    auto good = sh(ferry::test::ferryd_bin() + " --check-config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(good.status, 0) << good.err;
    // Starting with a bad config fails the same way, before touching anything.
    auto start_bad = sh(ferry::test::ferryd_bin() + " --config " + (dir_ / "bad.toml"), dir_);
    EXPECT_EQ(start_bad.status, 1);
    EXPECT_NE(start_bad.err.find("bad.toml:4"), std::string::npos) << start_bad.err;
}

TEST_F(Ferryd, MigratesThroughFerryctlAndReportsTheDesignObject) {
    start();
    struct stat st {};
    ASSERT_EQ(::stat(socket_.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600U);

    auto vm = ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    EXPECT_EQ(vm["status"], "running");
    wait_heartbeats();

    auto m = ctl("migrate demo --wait --json"); // --json after the verb
    ASSERT_EQ(m.status, 0) << m.out << m.err;
    auto done = json::parse(m.out);
    EXPECT_EQ(done["phase"], "Succeeded");
    for (auto key : {"id", "vm", "source_node", "target_node", "phase", "mode", "method", "policy", "config",
                     "created_at", "started_at", "ended_at", "abort_requested", "abort_status",
                     "failure_reason", "progress", "result"})
        EXPECT_TRUE(done.contains(key)) << key;
    EXPECT_GT(done["result"]["total_time_ms"].get<int>(), 0);

    auto shown = ctl_json("migration show " + done["id"].get<std::string>());
    EXPECT_EQ(shown["id"], done["id"]);
    EXPECT_EQ(shown["phase"], "Succeeded");
    EXPECT_EQ(ctl_json("migration list").size(), 1U);

    auto check = sh(ferry::test::build_dir() + "/tools/guest/ferry-guest-check --socket " + socket_ +
                        " --vm demo --dump " + (dir_ / "dump.bin"),
                    dir_);
    EXPECT_EQ(check.status, 0) << check.out << check.err;
    EXPECT_NE(check.out.find("memory verified"), std::string::npos);

    // Human output (not a terminal: one line per phase change, then a summary).
    auto human = ctl("migrate demo --wait");
    EXPECT_EQ(human.status, 0) << human.err;
    EXPECT_NE(human.out.find("phase:        Succeeded"), std::string::npos) << human.out;
    EXPECT_NE(human.out.find("downtime:"), std::string::npos) << human.out;
}

TEST_F(Ferryd, ClearErrorsForBadInput) {
    start();
    ferry::test::write_file(dir_ / "bad-vm.toml", "name = \"demo\"\nmemory = \"lots\"\n");
    auto bad = ctl("vm create --spec " + (dir_ / "bad-vm.toml"));
    EXPECT_EQ(bad.status, 1);
    EXPECT_NE(bad.err.find("bad-vm.toml:2: key 'memory': bad quantity \"lots\""), std::string::npos) << bad.err;
    auto missing = ctl("vm create --spec " + (dir_ / "nope.toml"));
    EXPECT_EQ(missing.status, 1);
    EXPECT_NE(missing.err.find("nope.toml"), std::string::npos);
    auto no_vm = ctl("migrate ghost");
    EXPECT_EQ(no_vm.status, 1);
    EXPECT_NE(no_vm.err.find("no VM named ghost"), std::string::npos) << no_vm.err;
    auto bw = ctl("migrate ghost --bandwidth 5XB");
    EXPECT_EQ(bw.status, 1);
    EXPECT_NE(bw.err.find("--bandwidth"), std::string::npos) << bw.err;
    auto usage = ctl("migrate");
    EXPECT_NE(usage.status, 0);
    auto no_daemon = sh(ferry::test::ferryctl_bin() + " --socket " + (dir_ / "none.sock") + " vm list", dir_);
    EXPECT_EQ(no_daemon.status, 1);
    EXPECT_NE(no_daemon.err.find("cannot reach ferryd"), std::string::npos) << no_daemon.err;
}

TEST_F(Ferryd, RestartKeepsVmsAndRecoversAnInterruptedMigration) {
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    int pid = ctl_json("vm show demo")["pid"];
    // A slow migration, interrupted by a ferryd restart mid-way.
    auto m = ctl_json("migrate demo --bandwidth 1Mi");
    std::string id = m["id"];
    for (int i = 0; i < 200; ++i) {
        if (ctl_json("migration show " + id)["phase"] == "Running")
            break;
        std::this_thread::sleep_for(50ms);
    }
    int target_pid = ctl_json("migration show " + id)["target_pid"];
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
    std::filesystem::remove(socket_);
    start();
    auto after = ctl_json("migration show " + id);
    EXPECT_EQ(after["phase"], "Failed");
    EXPECT_NE(after["failure_reason"].get<std::string>().find("restarted"), std::string::npos);
    auto vm = ctl_json("vm show demo");
    EXPECT_EQ(vm["pid"], pid);
    EXPECT_EQ(vm["status"], "running");
    if (target_pid > 0) {
        std::this_thread::sleep_for(200ms);
        EXPECT_NE(::kill(target_pid, 0) == 0 && std::filesystem::exists("/proc/" + std::to_string(target_pid) + "/cmdline") &&
                      ferry::test::read_file("/proc/" + std::to_string(target_pid) + "/cmdline").find("qemu") != std::string::npos,
                  true)
            << "the interrupted migration's destination QEMU must be gone";
    }
    // The VM is whole and migrates again.
    auto check = sh(ferry::test::build_dir() + "/tools/guest/ferry-guest-check --socket " + socket_ +
                        " --vm demo --dump " + (dir_ / "dump.bin"),
                    dir_);
    EXPECT_EQ(check.status, 0) << check.out << check.err;
    auto again = ctl("migrate demo --wait");
    EXPECT_EQ(again.status, 0) << again.out << again.err;
}

TEST_F(Ferryd, WaitExitsNonZeroWhenTheMigrationFails) {
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    // Follow a slow migration in the background, abort it from here.
    std::string cmd = ferry::test::ferryctl_bin() + " --socket " + socket_ + " migrate demo --wait --bandwidth 1Mi";
    FILE* follower = ::popen((cmd + " 2>&1").c_str(), "r");
    ASSERT_NE(follower, nullptr);
    std::string id;
    for (int i = 0; i < 200 && id.empty(); ++i) {
        auto list = ctl_json("migration list");
        for (auto& m : list)
            if (m["phase"] == "Running")
                id = m["id"];
        std::this_thread::sleep_for(50ms);
    }
    ASSERT_FALSE(id.empty());
    auto abort = ctl("migration abort " + id);
    EXPECT_EQ(abort.status, 0) << abort.err;
    std::string out;
    char buf[512];
    while (std::fgets(buf, sizeof buf, follower))
        out += buf;
    int status = ::pclose(follower);
    EXPECT_EQ(WEXITSTATUS(status), 1) << out;
    EXPECT_NE(out.find("phase:        Failed"), std::string::npos) << out;
    EXPECT_NE(out.find("aborted by request"), std::string::npos) << out;
    EXPECT_EQ(ctl_json("vm show demo")["status"], "running");
}

TEST_F(Ferryd, ShowsALiveProgressLineOnATerminal) {
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    // script(1) gives ferryctl a pseudo-terminal.
    auto o = sh("script -qec '" + ferry::test::ferryctl_bin() + " --socket " + socket_ +
                    " migrate demo --wait --bandwidth 16Mi' /dev/null",
                dir_);
    EXPECT_EQ(o.status, 0) << o.out << o.err;
    EXPECT_NE(o.out.find("\r\033[K[Running]"), std::string::npos) << o.out;
    EXPECT_NE(o.out.find("% "), std::string::npos) << o.out;
    EXPECT_NE(o.out.find("remaining"), std::string::npos) << o.out;
    EXPECT_NE(o.out.find("phase:        Succeeded"), std::string::npos) << o.out;
}
