// What a careless or hostile local user can do to ferryd and ferryctl: each
// test drives a real ferryd (and QEMU where a VM is involved) and checks that
// the daemon answers, keeps running and loses nothing.
#include "ferryd_fixture.hpp"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <regex>

#include <fstream>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

namespace {

// A raw client of the control socket: no ferryctl in between.
class RawClient {
public:
    explicit RawClient(const std::string& path) {
        fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
        connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    }
    ~RawClient() {
        if (fd_ >= 0)
            ::close(fd_);
    }
    RawClient(const RawClient&) = delete;
    RawClient(RawClient&& o) noexcept : fd_(o.fd_), connected_(o.connected_) { o.fd_ = -1; }
    bool connected() const { return connected_; }
    bool send(const std::string& data) {
        std::size_t off = 0;
        while (off < data.size()) {
            auto n = ::send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
            if (n <= 0)
                return false;
            off += static_cast<std::size_t>(n);
        }
        return true;
    }
    // One line, "" on EOF, "<timeout>" when nothing came in time.
    std::string line(std::chrono::milliseconds timeout = 10s) {
        std::string out;
        auto deadline = std::chrono::steady_clock::now() + timeout;
        for (;;) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0)
                return "<timeout>";
            pollfd p{fd_, POLLIN, 0};
            if (::poll(&p, 1, static_cast<int>(left.count())) <= 0)
                continue;
            char c;
            auto n = ::recv(fd_, &c, 1, 0);
            if (n <= 0)
                return out;
            if (c == '\n')
                return out;
            out.push_back(c);
        }
    }

private:
    int fd_ = -1;
    bool connected_ = false;
};

json reply_of(const std::string& line) { return json::parse(line, nullptr, false); }

bool alive(pid_t pid) { return pid > 0 && ::kill(pid, 0) == 0 && ::waitpid(pid, nullptr, WNOHANG) == 0; }

long vm_hwm_kib(pid_t pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/status");
    for (std::string l; std::getline(in, l);)
        if (l.rfind("VmHWM:", 0) == 0)
            return std::stol(l.substr(6));
    return -1;
}

std::size_t count(const std::string& text, const std::string& what) {
    std::size_t n = 0;
    for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1))
        ++n;
    return n;
}

class Robustness : public Ferryd {};

} // namespace

// 1. A deeply nested request is answered with an error; ferryd lives on.
TEST_F(Robustness, DeeplyNestedRequestGetsAnErrorNotACrash) {
    start();
    RawClient c(socket_);
    ASSERT_TRUE(c.connected());
    std::string deep = R"({"id":1,"method":"node.info","params":{"x":)" + std::string(70000, '[') +
                       std::string(70000, ']') + "}}\n";
    ASSERT_TRUE(c.send(deep));
    auto reply = reply_of(c.line());
    EXPECT_EQ(reply["error"]["code"], "protocol") << reply;
    EXPECT_NE(reply["error"]["message"].get<std::string>().find("nested deeper than 32"), std::string::npos) << reply;
    // Found by fuzzing: a number too large for a double.
    ASSERT_TRUE(c.send("{\"id\":1e999,\"method\":\"node.info\"}\n"));
    reply = reply_of(c.line());
    EXPECT_EQ(reply["error"]["code"], "protocol") << reply;
    EXPECT_NE(reply["error"]["message"].get<std::string>().find("number overflow"), std::string::npos) << reply;
    EXPECT_TRUE(alive(pid_));
    EXPECT_EQ(ctl("vm list").status, 0);
    // An empty target is no target: refused, not taken as "let the scheduler pick".
    ASSERT_TRUE(c.send(R"({"id":2,"method":"migration.create","params":{"vm":"demo","target_node":""}})" "\n"));
    reply = reply_of(c.line());
    EXPECT_EQ(reply["error"]["code"], "invalid_argument") << reply;
    EXPECT_NE(reply["error"]["message"].get<std::string>().find("'target_node' is empty"), std::string::npos) << reply;
}

// 2. At its fd limit, with more idle clients than it serves, ferryd neither
// spins nor floods its log, and a real request still gets through.
TEST_F(Robustness, IdleClientsAtTheFdLimitDoNotLockOutFerryctl) {
    start(64);
    std::vector<RawClient> idle;
    for (int i = 0; i < 100; ++i)
        idle.emplace_back(socket_);
    std::this_thread::sleep_for(500ms);
    auto listed = ctl("--timeout 20 vm list");
    EXPECT_EQ(listed.status, 0) << listed.err;
    std::this_thread::sleep_for(1s);
    auto log = ferry::test::read_file(dir_ / "ferryd.log");
    EXPECT_LT(count(log, "accept"), 20U) << log.substr(0, 2000);
    EXPECT_TRUE(alive(pid_));
}

TEST_F(Robustness, IdleConnectionsAreClosed) {
    write_config("control_idle_timeout = 1");
    start();
    RawClient c(socket_);
    ASSERT_TRUE(c.connected());
    ASSERT_TRUE(c.send(R"({"id":1,"method":"node)")); // half a request, then silence
    auto start_wait = std::chrono::steady_clock::now();
    EXPECT_EQ(c.line(10s), ""); // closed by ferryd
    EXPECT_LT(std::chrono::steady_clock::now() - start_wait, 5s);
    EXPECT_EQ(ctl("vm list").status, 0);
}

// Clients that send requests and never read the replies cannot hold the
// slots: a stuck reply write counts as idle.
TEST_F(Robustness, ClientsThatNeverReadTheirRepliesCannotLockOthersOut) {
    write_config("control_max_connections = 4\ncontrol_idle_timeout = 30");
    start();
    std::string flood;
    for (int i = 0; i < 4000; ++i)
        flood += R"({"id":1,"method":"node.info"})" "\n";
    std::vector<RawClient> stuck;
    for (int i = 0; i < 6; ++i) {
        stuck.emplace_back(socket_);
        ASSERT_TRUE(stuck.back().send(flood));
    }
    std::this_thread::sleep_for(1s);
    auto listed = ctl("--timeout 10 vm list");
    EXPECT_EQ(listed.status, 0) << listed.err;
    EXPECT_TRUE(alive(pid_));
}

// 3. A second ferryd on the same state_dir or socket is refused before it
// touches anything; the first one's VM keeps running.
TEST_F(Robustness, ASecondFerrydIsRefusedBeforeItTouchesAnything) {
    start();
    auto vm = ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    int qemu = vm["pid"];
    auto twin = sh(ferry::test::ferryd_bin() + " --config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(twin.status, 1);
    EXPECT_NE(twin.err.find("is in use by another ferryd"), std::string::npos) << twin.err;
    EXPECT_NE(twin.err.find(fmt::format("held by pid {}", pid_)), std::string::npos) << twin.err;

    // Same state_dir, another socket: refused too (it would list the VM as stopped).
    ferry::test::write_file(dir_ / "other.toml", ferry::test::read_file(dir_ / "ferryd.toml")
                                                     .replace(ferry::test::read_file(dir_ / "ferryd.toml").find(socket_),
                                                              socket_.size(), dir_ / "other.sock"));
    auto other = sh(ferry::test::ferryd_bin() + " --config " + (dir_ / "other.toml"), dir_);
    EXPECT_EQ(other.status, 1);
    EXPECT_NE(other.err.find("in use by another ferryd"), std::string::npos) << other.err;

    // Another state_dir, the same socket: refused before its restart recovery.
    auto cfg = ferry::test::read_file(dir_ / "ferryd.toml");
    auto state = dir_.path() + "/state\"";
    cfg.replace(cfg.find(state), state.size(), dir_.path() + "/state2\"");
    ferry::test::write_file(dir_ / "third.toml", cfg);
    auto third = sh(ferry::test::ferryd_bin() + " --config " + (dir_ / "third.toml"), dir_);
    EXPECT_EQ(third.status, 1);
    EXPECT_NE(third.err.find("control socket " + socket_ + " is in use"), std::string::npos) << third.err;

    EXPECT_TRUE(alive(pid_));
    EXPECT_EQ(ctl_json("vm show demo")["status"], "running");
    EXPECT_EQ(::kill(qemu, 0), 0) << "the first ferryd's QEMU must keep running";
}

// 4. SIGHUP re-reads the file: a broken one keeps the running configuration
// and says why; a good one applies to the migrations started after it, and
// what needs a restart is named.
TEST_F(Robustness, SighupReReadsTheConfigAndABrokenFileKeepsTheRunningOne) {
    start();
    ASSERT_EQ(ctl("vm create --spec " + (dir_ / "vm.toml")).status, 0);
    wait_heartbeats();
    auto log_has = [&](const std::string& text) {
        for (int i = 0; i < 50; ++i) {
            if (ferry::test::read_file(dir_ / "ferryd.log").find(text) != std::string::npos)
                return true;
            std::this_thread::sleep_for(100ms);
        }
        return false;
    };
    write_config("", "bandwidth_per_migration = \"lots\"\n"); // [migration] already has it, on line 9
    ASSERT_EQ(::kill(pid_, SIGHUP), 0);
    EXPECT_TRUE(log_has("SIGHUP: keeping the running configuration; " + (dir_ / "ferryd.toml") + " would not load: "))
        << ferry::test::read_file(dir_ / "ferryd.log");
    EXPECT_TRUE(log_has("ferryd.toml:10"));
    EXPECT_TRUE(alive(pid_));
    auto m = ctl_json("migrate demo --wait");
    EXPECT_EQ(m["phase"], "Succeeded") << m.dump(2);
    EXPECT_EQ(m["config"]["bandwidth_per_migration"], 0) << "the running value";

    ferry::test::write_file(dir_ / "ferryd.toml",
                            std::regex_replace(ferry::test::read_file(dir_ / "ferryd.toml"),
                                               std::regex("bandwidth_per_migration = 0\n(.|\n)*"),
                                               "bandwidth_per_migration = \"1Gi\"\nmax_downtime_ms = 250\n"));
    auto text = ferry::test::read_file(dir_ / "ferryd.toml");
    ferry::test::write_file(dir_ / "ferryd.toml", std::regex_replace(text, std::regex("name = \"node-a\""),
                                                                     "name = \"node-z\""));
    ASSERT_EQ(::kill(pid_, SIGHUP), 0);
    EXPECT_TRUE(log_has("re-read; its settings apply to migrations started from now on"))
        << ferry::test::read_file(dir_ / "ferryd.log");
    EXPECT_TRUE(log_has("SIGHUP: node.name: changed in " + (dir_ / "ferryd.toml") +
                        "; it takes effect when ferryd restarts"));
    m = ctl_json("migrate demo --wait");
    EXPECT_EQ(m["phase"], "Succeeded") << m.dump(2);
    EXPECT_EQ(m["config"]["bandwidth_per_migration"], 1ULL << 30);
    EXPECT_EQ(m["config"]["max_downtime_ms"], 250);
    EXPECT_EQ(m["source_node"], "node-a") << "the name waits for a restart";
    EXPECT_EQ(ctl_json("vm show demo")["status"], "running");
}

// 5. QEMU options ferry owns are refused with the key named; no QEMU is left.
TEST_F(Robustness, OwnedQemuOptionsAreRefusedAndNoProcessIsLeft) {
    start();
    ferry::test::write_file(dir_ / "daemon.toml", R"(name = "sneaky"
memory = "64Mi"
extra_args = ["-device", "virtio-rng-pci", "-daemonize"]
)");
    auto o = ctl("vm create --spec " + (dir_ / "daemon.toml"));
    EXPECT_EQ(o.status, 3) << o.err;
    EXPECT_NE(o.err.find("daemon.toml:3: key 'extra_args[2]': \"-daemonize\" is not allowed"), std::string::npos)
        << o.err;
    auto left = sh("pgrep -f 'guest=sneak[y]'", dir_);
    EXPECT_NE(left.status, 0) << "a QEMU was left behind: " << left.out;
    EXPECT_EQ(ctl_json("vm list").size(), 0U);
}

// 6. ferryctl never dumps core on bad input.
TEST_F(Robustness, FerryctlRejectsLongSocketPathsAndInvalidUtf8) {
    auto long_socket = sh(ferry::test::ferryctl_bin() + " --socket /tmp/" + std::string(200, 'a') + " vm list", dir_);
    EXPECT_EQ(long_socket.status, 3) << long_socket.err;
    EXPECT_NE(long_socket.err.find("a Unix socket path holds"), std::string::npos) << long_socket.err;
    start();
    ferry::test::write_file(dir_ / "latin1.toml", "name = \"caf\xe9\"\nmemory = \"64Mi\"\n");
    auto bad = ctl("vm create --spec " + (dir_ / "latin1.toml"));
    EXPECT_EQ(bad.status, 3) << bad.err;
    EXPECT_NE(bad.err.find("latin1.toml: not valid UTF-8 (byte 11)"), std::string::npos) << bad.err;
}

// 7. A paused VM migrates and stays paused on the destination.
TEST_F(Robustness, APausedVmMigratesAndStaysPaused) {
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    ASSERT_EQ(ctl("vm qmp demo stop").status, 0);
    auto t0 = std::chrono::steady_clock::now();
    auto m = ctl("--json migrate demo --wait");
    ASSERT_EQ(m.status, 0) << m.out << m.err;
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 25s) << "it waited for a resume that never comes";
    auto vm = ctl_json("vm show demo");
    EXPECT_EQ(vm["status"], "paused") << vm;
    EXPECT_EQ(vm["generation"], 2);
    ASSERT_EQ(ctl("vm qmp demo cont").status, 0);
    EXPECT_EQ(ctl_json("vm show demo")["status"], "running");
}

// 8. Memory per connection is bounded: oversized lines are refused early.
TEST_F(Robustness, OversizedRequestsAreRefusedAndMemoryStaysBounded) {
    start();
    std::this_thread::sleep_for(200ms);
    long before = vm_hwm_kib(pid_);
    {
        RawClient c(socket_);
        c.send(std::string(4 << 20, '[')); // 4 MB of unclosed brackets, no newline
        auto reply = reply_of(c.line());
        EXPECT_EQ(reply["error"]["code"], "protocol") << reply;
        EXPECT_NE(reply["error"]["message"].get<std::string>().find("larger than 256 KiB"), std::string::npos);
    }
    std::vector<RawClient> holders;
    for (int i = 0; i < 50; ++i) {
        holders.emplace_back(socket_);
        holders.back().send(R"({"id":1,"method":"vm.list","params":{"pad":")" + std::string(200 << 10, 'x'));
    }
    std::this_thread::sleep_for(1s);
    long after = vm_hwm_kib(pid_);
    // 50 x 200 KiB held: about 10 MiB of buffers, never hundreds.
    EXPECT_LT(after - before, 48 * 1024) << "peak RSS grew from " << before << " to " << after << " KiB";
    EXPECT_EQ(ctl("vm list").status, 0);
}

// 9. A daemon that accepts and never answers: ferryctl gives up, saying so.
TEST_F(Robustness, FerryctlTimesOutOnADaemonThatNeverAnswers) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    auto path = dir_ / "mute.sock";
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ASSERT_EQ(::listen(fd, 8), 0); // never accepts, never answers
    auto t0 = std::chrono::steady_clock::now();
    auto o = sh(ferry::test::ferryctl_bin() + " --socket " + path + " --timeout 2 vm list", dir_);
    EXPECT_EQ(o.status, 8) << o.err;
    EXPECT_NE(o.err.find("did not answer vm.list within 2 s"), std::string::npos) << o.err;
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
    ::close(fd);
}

// 10. --check-config runs the start's checks, naming file:line:key.
TEST_F(Robustness, CheckConfigRunsEveryStartCheck) {
    auto check = [&](const std::string& node_extra, const std::string& tail = "") {
        write_config(node_extra);
        auto text = ferry::test::read_file(dir_ / "ferryd.toml") + tail;
        ferry::test::write_file(dir_ / "ferryd.toml", text);
        return sh(ferry::test::ferryd_bin() + " --check-config " + (dir_ / "ferryd.toml"), dir_);
    };
    auto missing = check("listen = \"127.0.0.1:7410\"",
                         "[tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"/nonexistent/a.pem\"\nkey = \"/nonexistent/a-key.pem\"\n");
    EXPECT_EQ(missing.status, 1);
    EXPECT_NE(missing.err.find("ferryd.toml:11: key 'tls.ca': /nonexistent/ca.pem does not exist"), std::string::npos)
        << missing.err;
    ferry::test::write_file(dir_ / "junk.pem", "not a certificate\n");
    auto junk = check("listen = \"127.0.0.1:7410\"", "[tls]\nca = \"" + (dir_ / "junk.pem") + "\"\ncert = \"" +
                                                         (dir_ / "junk.pem") + "\"\nkey = \"" + (dir_ / "junk.pem") + "\"\n");
    EXPECT_EQ(junk.status, 1);
    EXPECT_NE(junk.err.find("ferryd.toml:12: key 'tls.cert'"), std::string::npos) << junk.err;
    auto partial = check("listen = \"127.0.0.1:7410\"", "[tls]\nca = \"/x/ca.pem\"\n");
    EXPECT_EQ(partial.status, 1);
    EXPECT_NE(partial.err.find("table 'tls': missing cert, key"), std::string::npos) << partial.err;
    auto address = check("listen = \"not-an-address\"");
    EXPECT_EQ(address.status, 1);
    EXPECT_NE(address.err.find("ferryd.toml:7: key 'node.listen': \"not-an-address\" has no port"), std::string::npos)
        << address.err;
    auto port = check("listen = \"127.0.0.1:99999\"");
    EXPECT_NE(port.err.find("port '99999' is not a number from 1 to 65535"), std::string::npos) << port.err;
    auto qemu = check("qemu = \"/nonexistent/qemu\"");
    EXPECT_EQ(qemu.status, 1);
    EXPECT_NE(qemu.err.find("ferryd.toml:7: key 'node.qemu': /nonexistent/qemu is not an executable"), std::string::npos)
        << qemu.err;
    // And a start with the same file fails the same way, before taking anything.
    auto started = sh(ferry::test::ferryd_bin() + " --config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(started.status, 1);
    EXPECT_NE(started.err.find("key 'node.qemu'"), std::string::npos) << started.err;
    EXPECT_FALSE(std::filesystem::exists(socket_));
}

// 10a. What only a start checks (the control socket's path, the metrics
// port, the command line's log level), --check-config says too, the same way;
// a running ferryd's own port is no reason to refuse its SIGHUP.
TEST_F(Robustness, CheckConfigFailsLikeTheStartOnSocketPathPortAndLogLevel) {
    auto config = dir_ / "ferryd.toml";
    auto both = [&](const std::string& flags = "") {
        auto checked = sh(ferry::test::ferryd_bin() + flags + " --check-config " + config, dir_);
        auto started = sh("timeout 60 " + ferry::test::ferryd_bin() + flags + " --config " + config, dir_);
        return std::pair{checked, started};
    };
    auto expect_same = [&](const std::pair<Output, Output>& r, int status, const std::string& why) {
        EXPECT_EQ(r.first.status, status) << r.first.out << r.first.err;
        EXPECT_NE(r.first.err.find(why), std::string::npos) << r.first.err;
        EXPECT_EQ(r.second.status, status) << r.second.err;
        EXPECT_NE(r.second.err.find(why), std::string::npos) << r.second.err;
    };
    // The socket path is a directory.
    std::filesystem::create_directories(socket_);
    expect_same(both(), 1, "ferryd.toml:4: key 'node.control_socket': " + socket_ + " is a directory");
    std::filesystem::remove(socket_);
    // It is the state_dir's lock file.
    auto text = ferry::test::read_file(config);
    auto lock = dir_.path() + "/state/ferryd.lock";
    auto at = text.find(socket_);
    ASSERT_NE(at, std::string::npos);
    ferry::test::write_file(config, std::string(text).replace(at, socket_.size(), lock));
    expect_same(both(), 1, "ferryd.toml:4: key 'node.control_socket': " + lock + " is the lock file of node.state_dir");
    // The metrics port is taken.
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ASSERT_EQ(::listen(fd, 1), 0);
    ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    auto metrics = fmt::format("\n[metrics]\nlisten = \"127.0.0.1:{}\"\n", ntohs(addr.sin_port));
    write_config("", metrics);
    expect_same(both(), 1,
                fmt::format("ferryd.toml:12: key 'metrics.listen': metrics.listen \"127.0.0.1:{}\": Address already "
                            "in use",
                            ntohs(addr.sin_port)));
    // A log level nobody knows, before anything else.
    ::close(fd);
    expect_same(both(" --log-level loud"), 2, "ferryd: --log-level: unknown level loud");
    EXPECT_FALSE(std::filesystem::exists(socket_));

    // A running ferryd holds its metrics port: --check-config and a SIGHUP
    // take that for what it is.
    start();
    auto checked = sh(ferry::test::ferryd_bin() + " --check-config " + config, dir_);
    EXPECT_EQ(checked.status, 0) << checked.err;
    ASSERT_EQ(::kill(pid_, SIGHUP), 0);
    bool reread = false;
    for (int i = 0; i < 50 && !reread; ++i, std::this_thread::sleep_for(100ms))
        reread = ferry::test::read_file(dir_ / "ferryd.log").find("SIGHUP: " + config + " re-read") != std::string::npos;
    auto log = ferry::test::read_file(dir_ / "ferryd.log");
    EXPECT_TRUE(reread) << log;
    EXPECT_EQ(log.find("SIGHUP: keeping the running configuration"), std::string::npos) << log;
}

// 10b. Hooks others may change are refused: by --check-config and a start,
// by a SIGHUP (the running configuration stays), and at run time when one
// changed under a running ferryd (the gate fails closed; the VM stays).
TEST_F(Robustness, HooksOthersMayWriteAreRefusedAtStartReloadAndRunTime) {
    auto d = dir_.path();
    auto hook = d + "/hooks/10-record";
    std::filesystem::create_directories(d + "/hooks");
    ::chmod((d + "/hooks").c_str(), 0755);
    ferry::test::write_file(hook, "#!/bin/sh\necho \"$2 $3\" >> " + d + "/hooks.log\n");
    ::chmod(hook.c_str(), 0775);
    write_config("", "[hooks]\ndir = \"" + d + "/hooks\"\n");
    auto why = hook + " is writable by group or others (mode 0775); hooks must be writable only by their owner";
    auto checked = sh(ferry::test::ferryd_bin() + " --check-config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(checked.status, 1);
    EXPECT_NE(checked.err.find("ferryd.toml:11: key 'hooks.dir': " + why), std::string::npos) << checked.err;
    auto started = sh(ferry::test::ferryd_bin() + " --config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(started.status, 1);
    EXPECT_NE(started.err.find(why), std::string::npos) << started.err;
    EXPECT_FALSE(std::filesystem::exists(socket_));

    ::chmod(hook.c_str(), 0755);
    start();
    ASSERT_EQ(ctl("vm create --spec " + (dir_ / "vm.toml")).status, 0);
    wait_heartbeats();
    ::chmod(hook.c_str(), 0775);
    ASSERT_EQ(::kill(pid_, SIGHUP), 0);
    bool kept = false;
    for (int i = 0; i < 50 && !kept; ++i, std::this_thread::sleep_for(100ms))
        kept = ferry::test::read_file(dir_ / "ferryd.log").find("SIGHUP: keeping the running configuration") !=
               std::string::npos;
    auto log = ferry::test::read_file(dir_ / "ferryd.log");
    EXPECT_TRUE(kept) << log;
    EXPECT_NE(log.find("key 'hooks.dir': " + why), std::string::npos) << log;

    auto refused = ctl("migrate demo --wait");
    EXPECT_NE(refused.status, 0);
    EXPECT_NE((refused.out + refused.err).find("hook 10-record (prepare on the source node-a) refused: " + why),
              std::string::npos)
        << refused.out << refused.err;
    EXPECT_FALSE(std::filesystem::exists(d + "/hooks.log")) << "a refused hook never runs";
    EXPECT_EQ(ctl_json("vm show demo")["status"], "running");

    ::chmod(hook.c_str(), 0755);
    auto m = ctl_json("migrate demo --wait");
    EXPECT_EQ(m["phase"], "Succeeded") << m.dump(2);
    EXPECT_NE(ferry::test::read_file(d + "/hooks.log").find("prepare source\n"), std::string::npos);
}

// 12. A world-writable socket is refused; every change is logged with the caller.
TEST_F(Robustness, ControlSocketAccessIsGuardedAndChangesAreAttributed) {
    write_config("control_socket_mode = \"0666\"");
    auto refused = sh(ferry::test::ferryd_bin() + " --check-config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(refused.status, 1);
    EXPECT_NE(refused.err.find("lets every user write the control socket"), std::string::npos) << refused.err;
    write_config();
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    auto log = ferry::test::read_file(dir_ / "ferryd.log");
    EXPECT_NE(log.find(fmt::format("vm.create requested by uid {} gid {} pid", ::getuid(), ::getgid())),
              std::string::npos)
        << log.substr(0, 3000);
}

// 15. Records and console logs are private; extra_args never reach the log.
TEST_F(Robustness, StateIsPrivateAndExtraArgsAreNotLogged) {
    ferry::test::write_file(dir_ / "vm.toml", ferry::test::read_file(dir_ / "vm.toml") +
                                                  "extra_args = [\"-device\", \"virtio-rng-pci,id=topsecret42\"]\n");
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    struct stat st {};
    ASSERT_EQ(::stat((dir_ / "state").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700U);
    ASSERT_EQ(::stat((dir_ / "state/vms/demo/console.log").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0077, 0U) << std::oct << (st.st_mode & 0777);
    EXPECT_EQ(ferry::test::read_file(dir_ / "ferryd.log").find("topsecret42"), std::string::npos);
}

// 16. --json errors are JSON with the protocol's code; exit codes tell causes apart.
TEST_F(Robustness, JsonErrorsCarryTheCodeAndExitCodesDiffer) {
    start();
    auto missing = ctl("--json vm show ghost");
    EXPECT_EQ(missing.status, 4);
    auto j = json::parse(missing.out, nullptr, false);
    EXPECT_EQ(j["error"]["code"], "not_found") << missing.out;
    EXPECT_NE(j["error"]["message"].get<std::string>().find("no VM named ghost"), std::string::npos);
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    auto twice = ctl("--json vm create --spec " + (dir_ / "vm.toml"));
    EXPECT_EQ(twice.status, 5);
    EXPECT_EQ(json::parse(twice.out, nullptr, false)["error"]["code"], "already_exists") << twice.out;
    auto pki = ctl("--json pki init --dir " + (dir_ / "pki") + " --nodes node-a,node-b");
    EXPECT_EQ(pki.status, 0) << pki.err;
    auto p = json::parse(pki.out, nullptr, false);
    ASSERT_TRUE(p.is_object()) << pki.out;
    EXPECT_EQ(p["written"].size(), 6U);
}

// 17. Messages name the parameter, the argument or the command.
TEST_F(Robustness, MessagesNameWhatIsWrong) {
    start();
    RawClient c(socket_);
    c.send(R"({"id":3,"method":"migration.create","params":{"vm":"demo","max_downtime_ms":"soon"}})" "\n");
    auto r = reply_of(c.line());
    EXPECT_EQ(r["id"], 3);
    EXPECT_EQ(r["error"]["code"], "invalid_argument");
    auto message = r["error"]["message"].get<std::string>();
    EXPECT_NE(message.find("parameter \"max_downtime_ms\" must be an integer from 1 to 3600000, not a string"),
              std::string::npos)
        << message;
    EXPECT_EQ(message.find("json.exception"), std::string::npos) << message;
    c.send("{\"id\":4,\"method\":\n");
    r = reply_of(c.line());
    EXPECT_EQ(r["error"]["code"], "protocol") << r;

    auto downtime = ctl("migrate demo --max-downtime 0");
    EXPECT_EQ(downtime.status, 2);
    EXPECT_LT(downtime.err.size(), 200U) << downtime.err;
    EXPECT_NE(downtime.err.find("from 1 to 3600000"), std::string::npos) << downtime.err;
    auto bogus = ctl("vm bogus");
    EXPECT_EQ(bogus.status, 2);
    EXPECT_NE(bogus.err.find("vm: unknown command 'bogus'"), std::string::npos) << bogus.err;
    auto version = ctl("--version");
    EXPECT_EQ(version.status, 0);
    EXPECT_NE(version.out.find("ferryctl 0."), std::string::npos) << version.out;
    auto dir_config = sh(ferry::test::ferryd_bin() + " --check-config " + dir_.path(), dir_);
    EXPECT_EQ(dir_config.status, 1);
    EXPECT_NE(dir_config.err.find("is a directory"), std::string::npos) << dir_config.err;
}

// 18. Finished migration records are pruned to the newest few per VM.
TEST_F(Robustness, FinishedMigrationRecordsArePruned) {
    write_config("", "finished_migrations_per_vm = 2\n");
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    std::vector<std::string> ids;
    for (int i = 0; i < 3; ++i) {
        auto m = ctl("--json migrate demo --wait");
        ASSERT_EQ(m.status, 0) << m.err;
        ids.push_back(json::parse(m.out)["id"]);
    }
    auto list = ctl_json("migration list");
    ASSERT_EQ(list.size(), 2U) << list;
    EXPECT_EQ(list[0]["id"], ids[1]);
    EXPECT_EQ(list[1]["id"], ids[2]);
    EXPECT_EQ(ctl("migration show " + ids[0]).status, 4);
    std::size_t files = 0;
    for (auto& e : std::filesystem::directory_iterator(dir_ / "state/migrations"))
        files += e.path().extension() == ".json";
    EXPECT_EQ(files, 2U);
    // A restart keeps the same records.
    stop();
    start();
    EXPECT_EQ(ctl_json("migration list").size(), 2U);
    // A deleted VM's records go with it.
    ASSERT_EQ(ctl("vm delete demo").status, 0);
    EXPECT_TRUE(ctl_json("migration list").empty());
    EXPECT_TRUE(std::filesystem::is_empty(dir_ / "state/migrations"));
}

// A state_dir that is not ferry's is refused before anything is written
// there, by --check-config as by a start, and its mode is never changed.
TEST_F(Robustness, AStateDirThatIsNotFerrysIsRefusedAndLeftAsItWas) {
    auto with_state_dir = [&](const std::string& state_dir) {
        write_config();
        auto text = ferry::test::read_file(dir_ / "ferryd.toml");
        auto at = text.find(dir_.path() + "/state\"");
        text.replace(at, dir_.path().size() + 7, state_dir + "\"");
        ferry::test::write_file(dir_ / "ferryd.toml", text);
        return sh(ferry::test::ferryd_bin() + " --check-config " + (dir_ / "ferryd.toml"), dir_);
    };
    auto mode_of = [](const std::string& path) {
        struct stat st {};
        EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
        return st.st_mode & 07777;
    };
    auto root_mode = mode_of("/");
    auto root = with_state_dir("/");
    EXPECT_EQ(root.status, 1);
    EXPECT_NE(root.err.find("ferryd.toml:3: key 'node.state_dir': / is the root directory"), std::string::npos)
        << root.err;
    auto started = sh(ferry::test::ferryd_bin() + " --config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(started.status, 1);
    EXPECT_NE(started.err.find("/ is the root directory"), std::string::npos) << started.err;
    EXPECT_EQ(mode_of("/"), root_mode);
    EXPECT_FALSE(std::filesystem::exists("/ferryd.lock"));

    // A directory holding someone else's files (a typo such as /var/lib).
    auto foreign = dir_ / "lib";
    std::filesystem::create_directories(foreign + "/dpkg");
    ::chmod(foreign.c_str(), 0755);
    auto other = with_state_dir(foreign);
    EXPECT_EQ(other.status, 1);
    EXPECT_NE(other.err.find(foreign + " holds files that are not ferry's"), std::string::npos) << other.err;
    started = sh(ferry::test::ferryd_bin() + " --config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(started.status, 1);
    EXPECT_EQ(mode_of(foreign), 0755U);
    EXPECT_FALSE(std::filesystem::exists(foreign + "/ferryd.lock"));
    EXPECT_FALSE(std::filesystem::exists(foreign + "/vms"));

    auto writable = dir_ / "open";
    std::filesystem::create_directories(writable);
    ::chmod(writable.c_str(), 0777);
    auto open = with_state_dir(writable);
    EXPECT_EQ(open.status, 1);
    EXPECT_NE(open.err.find(writable + " is writable by group or others (mode 0777)"), std::string::npos) << open.err;
    EXPECT_EQ(mode_of(writable), 0777U);

    ferry::test::write_file(dir_ / "file", "x");
    auto file = with_state_dir(dir_ / "file");
    EXPECT_EQ(file.status, 1);
    EXPECT_NE(file.err.find(dir_ / "file" + " exists and is not a directory"), std::string::npos) << file.err;

    // An empty directory of the operator's is taken as it is: its mode stays.
    auto empty = dir_ / "empty";
    std::filesystem::create_directories(empty);
    ::chmod(empty.c_str(), 0750);
    EXPECT_EQ(with_state_dir(empty).status, 0);
    start();
    EXPECT_TRUE(std::filesystem::exists(empty + "/ferryd.lock"));
    EXPECT_EQ(mode_of(empty), 0750U);
    EXPECT_EQ(mode_of(empty + "/vms"), 0700U);
    stop();
    // Used before: accepted again.
    EXPECT_EQ(with_state_dir(empty).status, 0);
}

namespace {
// The last heartbeat sequence number in a console log (0 for none).
std::uint64_t last_heartbeat(const std::string& log) {
    auto at = log.rfind("FERRY-HB ");
    return at == std::string::npos ? 0 : std::strtoull(log.c_str() + at + 9, nullptr, 10);
}
} // namespace

// No state of ferryd stalls a guest: stopped for 20 s while its guest
// prints 256 KiB/s, the guest's heartbeats go on at their pace (QEMU writes
// the console to a file itself; a socket would have filled within a second
// or two and frozen the guest in its serial writes), and ferry's log has
// them all once it runs again.
TEST_F(Robustness, AStoppedFerrydNeverStallsAGuestPrintingToItsConsole) {
    ferry::test::write_file(dir_ / "vm.toml", R"(name = "demo"
memory = "128Mi"
kernel = ")" + ferry::test::guest_kernel() + R"("
append = "ws=8 rate=1 hb=50 noise=256 nline=200"
)");
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    auto console = dir_ / "state/vms/demo/console.log";
    auto before = last_heartbeat(ferry::test::read_file(console));
    auto t0 = std::chrono::steady_clock::now();
    ASSERT_EQ(::kill(pid_, SIGSTOP), 0);
    std::this_thread::sleep_for(20s);
    ASSERT_EQ(::kill(pid_, SIGCONT), 0);
    std::uint64_t after = 0;
    for (int i = 0; i < 100; ++i) { // until the capture has caught up
        std::this_thread::sleep_for(100ms);
        auto now = last_heartbeat(ferry::test::read_file(console));
        if (now == after && now > before)
            break;
        after = now;
    }
    auto elapsed_ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
    auto expected = static_cast<std::uint64_t>(elapsed_ms.count() / 50);
    // A guest blocked in its serial writes prints none while blocked; this
    // one loses no more than what a busy host takes from its vCPU.
    EXPECT_GE(after - before, expected / 2) << "heartbeats " << before << " -> " << after << " in " << elapsed_ms.count()
                                             << " ms";
    auto text = ferry::test::read_file(console);
    EXPECT_NE(text.find("FERRY-NOISE abc"), std::string::npos);
    // And every heartbeat of the stop is in the log, in order, none lost.
    std::uint64_t prev = 0, gaps = 0;
    for (auto at = text.find("FERRY-HB "); at != std::string::npos; at = text.find("FERRY-HB ", at + 1)) {
        auto seq = std::strtoull(text.c_str() + at + 9, nullptr, 10); // no copy of the megabytes after it
        gaps += prev && seq != prev + 1;
        prev = seq;
    }
    EXPECT_EQ(gaps, 0u);
    EXPECT_EQ(ctl_json("vm show demo")["status"], "running");
}
