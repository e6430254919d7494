// src/control: the request handling as a unit, then ferryd and ferryctl as
// real processes driving real QEMU.
#include "control/client.hpp"
#include "control/event_queue.hpp"
#include "control/metrics.hpp"
#include "control/server.hpp"
#include "output.hpp"
#include "ferryd_fixture.hpp"
#include "proxy.hpp"
#include "support.hpp"
#include "verify.hpp"

#include <gtest/gtest.h>
#include <fmt/format.h>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <regex>
#include <set>
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
// What each descriptor it was handed has to read.
// A stream that answers and then waits for its client to leave.
asio::awaitable<ferry::Result<void>> follow(json id, json, ferry::control::Stream& out) {
    json first;
    first["id"] = id;
    first["result"] = "following";
    co_await out.send(first);
    co_await out.client_done();
    co_return ferry::Result<void>{};
}

asio::awaitable<ferry::Result<json>> read_fds(json, std::vector<ferry::UniqueFd> fds) {
    json got = json::array();
    for (auto& f : fds) {
        char buf[16];
        auto n = ::read(f.get(), buf, sizeof(buf));
        got.push_back(std::string(buf, n > 0 ? static_cast<std::size_t>(n) : 0));
    }
    co_return ferry::ok(json{{"read", got}});
}
} // namespace

TEST(ProgressLine, ShowsTheConvergenceOutlook) {
    json m{{"phase", "Running"}, {"target_node", "node-b"}, {"mode", "precopy"},
           {"progress", {{"total_bytes", 100ULL << 20}, {"remaining_bytes", 40ULL << 20},
                         {"transfer_rate_bps", 16ULL << 20}, {"dirty_rate_bps", 16ULL << 20},
                         {"iteration", 1}, {"throttle_percent", 0}, {"converging", nullptr},
                         {"expected_downtime_ms", 2500}, {"downtime_limit_ms", 75}, {"time_left_ms", 2500},
                         {"qemu_status", "active"}}}};
    EXPECT_NE(ferryctl::progress_line(m).find("first pass"), std::string::npos) << ferryctl::progress_line(m);
    m["progress"]["converging"] = false;
    m["progress"]["iteration"] = 6;
    m["progress"]["throttle_percent"] = 40;
    m["progress"]["downtime_limit_ms"] = 300;
    auto line = ferryctl::progress_line(m);
    EXPECT_NE(line.find("NOT converging (would need 2500 ms downtime, limit 300 ms)"), std::string::npos) << line;
    EXPECT_NE(line.find("throttle 40%"), std::string::npos) << line;
    m["progress"]["converging"] = true;
    m["progress"]["time_left_ms"] = 3200;
    m["progress"]["expected_downtime_ms"] = 40;
    line = ferryctl::progress_line(m);
    EXPECT_NE(line.find("converging, ~3 s left, downtime ~40 ms"), std::string::npos) << line;
    m["progress"]["qemu_status"] = "postcopy-paused";
    line = ferryctl::progress_line(m);
    EXPECT_NE(line.find("post-copy (postcopy-paused): the VM runs on node-b"), std::string::npos) << line;
}

TEST(ProgressLine, SaysFirstThatTheTargetIsSilent) {
    json m{{"phase", "Running"}, {"target_node", "node-b"}, {"mode", "precopy"},
           {"config", {{"peer_timeout", 30}}},
           {"progress", {{"total_bytes", 100ULL << 20}, {"remaining_bytes", 40ULL << 20}, {"iteration", 2},
                         {"converging", true}, {"time_left_ms", 2000}, {"qemu_status", "active"},
                         {"peer_silent_ms", 999}}}};
    EXPECT_EQ(ferryctl::progress_line(m).find("answered"), std::string::npos) << "under a second is no silence";
    m["progress"]["peer_silent_ms"] = 7400;
    auto line = ferryctl::progress_line(m);
    EXPECT_EQ(line.rfind("[Running] node-b has not answered for 7 s (given up after 30 s)", 0), 0u) << line;
    m["progress"]["peer_silent_ms"] = 0;
    EXPECT_EQ(ferryctl::progress_line(m).find("answered"), std::string::npos);
}

TEST(ProgressLine, ShowsTheDisksOfABlockMigration) {
    json m{{"phase", "Running"}, {"target_node", "node-b"}, {"mode", "precopy"},
           {"progress", {{"total_bytes", 0}, {"remaining_bytes", 0}, {"transfer_rate_bps", 0}, {"dirty_rate_bps", 0},
                         {"iteration", 0}, {"throttle_percent", 0}, {"converging", nullptr}, {"qemu_status", ""},
                         {"disks", {{"total_bytes", 64ULL << 30}, {"sent_bytes", 3ULL << 30},
                                    {"remaining_bytes", 2ULL << 20}, {"dirty_rate_bps", 1ULL << 20}, {"rounds", 2}}}}}};
    auto line = ferryctl::progress_line(m);
    EXPECT_NE(line.find("copying the disks before RAM:  disks 2.0 MiB dirty (1.0 MiB/s) after round 2"),
              std::string::npos)
        << line;
    // The first round, as far as it got (it never shows more than it copies).
    m["progress"]["disks"].update({{"round", 1}, {"round_bytes", 48ULL << 30}, {"round_sent_bytes", 3ULL << 30}});
    line = ferryctl::progress_line(m);
    EXPECT_NE(line.find("copying the disks before RAM:  disks round 1: 3.0 GiB of 48.0 GiB copied, 2.0 MiB dirty "
                        "(1.0 MiB/s)"),
              std::string::npos)
        << line;
    m["progress"]["disks"]["round"] = 0;
    m["progress"]["qemu_status"] = "active";
    m["progress"]["total_bytes"] = 100ULL << 20;
    line = ferryctl::progress_line(m);
    EXPECT_NE(line.find("iteration 0  first pass  disks 2.0 MiB dirty"), std::string::npos) << line;
    EXPECT_EQ(line.find("capped"), std::string::npos) << line;
    m["progress"]["disks"]["write_cap_bps"] = 512 << 10;
    line = ferryctl::progress_line(m);
    EXPECT_NE(line.find("after round 2, guest disk writes capped at 512.0 KiB/s"), std::string::npos) << line;
    m["progress"]["disks"] = nullptr;
    EXPECT_EQ(ferryctl::progress_line(m).find("disks"), std::string::npos);
}

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
    // What cannot be read as a request is a protocol error, as documented.
    auto garbage = ask("not json");
    EXPECT_EQ(garbage["error"]["code"], "protocol");
    EXPECT_NE(garbage["error"]["message"].get<std::string>().find("not valid JSON"), std::string::npos) << garbage;
    auto no_method = ask(R"({"id": 1})");
    EXPECT_EQ(no_method["error"]["code"], "protocol");
    EXPECT_EQ(no_method["id"], 1);
    EXPECT_EQ(ask(R"({"id": 1, "method": "echo", "params": [1]})")["error"]["code"], "protocol");
    // Nesting and size are bounded before anything is allocated for them.
    auto deep = ask(R"({"id":2,"method":"echo","params":{"x":)" + std::string(70000, '[') + std::string(70000, ']') + "}}");
    EXPECT_EQ(deep["error"]["code"], "protocol");
    EXPECT_NE(deep["error"]["message"].get<std::string>().find("nested deeper than 32 levels"), std::string::npos);
    std::string wide = R"({"id":2,"method":"echo","params":{"x":[0)";
    for (int i = 0; i < 5000; ++i)
        wide += ",0";
    EXPECT_EQ(ask(wide + "]}}")["error"]["code"], "protocol") << "more than 4096 values";
    EXPECT_EQ(ask(std::string(300 << 10, ' ') + "{}")["error"]["code"], "protocol") << "over 256 KiB";
}

// Descriptors sent with a request (SCM_RIGHTS) reach a method that takes
// them, in order; any other method refuses them; the connection stays in step.
TEST(ControlServer, TakesDescriptorsOnlyWhereAMethodWantsThem) {
    asio::io_context io;
    TempDir dir;
    ferry::control::Server server(io.get_executor(), dir / "s.sock", 0600);
    server.add("echo", echo);
    server.add_with_fds("read", read_fds);
    ASSERT_TRUE(server.start());
    std::vector<std::string> got;
    std::thread client([&] {
        auto c = ferry::control::Client::connect(dir / "s.sock");
        if (!c) {
            got.push_back(c.error().message);
        } else {
            int tap[2], vhost[2];
            EXPECT_EQ(::pipe(tap), 0);
            EXPECT_EQ(::pipe(vhost), 0);
            EXPECT_EQ(::write(tap[1], "tap", 3), 3);
            EXPECT_EQ(::write(vhost[1], "vhost", 5), 5);
            auto r = (*c)->call_with_fds("read", json::object(), {tap[0], vhost[0]});
            got.push_back(r ? r->dump() : r.error().message);
            auto e = (*c)->call_with_fds("echo", {{"a", 1}}, {tap[0]});
            got.push_back(e ? e->dump() : e.error().message);
            auto plain = (*c)->call("echo", {{"a", 2}});
            got.push_back(plain ? plain->dump() : plain.error().message);
            for (int fd : {tap[0], tap[1], vhost[0], vhost[1]})
                ::close(fd);
        }
        asio::post(io, [&] { server.stop(); }); // its connections end, then run() returns
    });
    io.run_for(20s);
    client.join();
    ASSERT_EQ(got.size(), 3U) << got[0];
    EXPECT_EQ(got[0], R"({"read":["tap","vhost"]})");
    EXPECT_EQ(got[1], "echo takes no file descriptors (1 came with the request)");
    EXPECT_EQ(got[2], R"({"echo":{"a":2}})");
}

// The kernel hands a read the bytes of several writes at once, descriptors
// included: they belong to the request they were sent with, not to the one
// that happens to end first in the same read.
TEST(ControlServer, DescriptorsGoToTheRequestTheyCameWithWhenRequestsArePipelined) {
    asio::io_context io;
    TempDir dir;
    ferry::control::Server server(io.get_executor(), dir / "s.sock", 0600);
    server.add("echo", echo);
    server.add_with_fds("read", read_fds);
    ASSERT_TRUE(server.start());
    // Connected and written before the server runs at all: its first read
    // finds all three requests.
    int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::string path = dir / "s.sock";
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    ASSERT_EQ(::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
    int tap[2];
    ASSERT_EQ(::pipe(tap), 0);
    ASSERT_EQ(::write(tap[1], "tap", 3), 3);
    auto send = [&](const std::string& line, int fd) {
        iovec iov{const_cast<char*>(line.data()), line.size()};
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))]{};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        if (fd >= 0) {
            msg.msg_control = control;
            msg.msg_controllen = sizeof control;
            auto* c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
        }
        EXPECT_EQ(::sendmsg(s, &msg, 0), static_cast<ssize_t>(line.size()));
    };
    send(R"({"id": 1, "method": "echo", "params": {"a": 1}})" "\n", -1);
    send(R"({"id": 2, "method": "read"})" "\n", tap[0]);
    send(R"({"id": 3, "method": "echo", "params": {"a": 3}})" "\n", -1);
    std::string replies;
    std::thread client([&] {
        char buf[4096];
        while (std::count(replies.begin(), replies.end(), '\n') < 3) {
            auto n = ::read(s, buf, sizeof buf);
            if (n <= 0)
                break;
            replies.append(buf, static_cast<std::size_t>(n));
        }
        asio::post(io, [&] { server.stop(); });
    });
    io.run_for(20s);
    client.join();
    for (int fd : {s, tap[0], tap[1]})
        ::close(fd);
    EXPECT_EQ(replies, "{\"id\":1,\"result\":{\"echo\":{\"a\":1}}}\n"
                       "{\"id\":2,\"result\":{\"read\":[\"tap\"]}}\n"
                       "{\"id\":3,\"result\":{\"echo\":{\"a\":3}}}\n");
}

// Streams hold their connection for as long as the client follows; when the
// cap is reached and nothing is idle, the oldest stream makes room, so
// followers can never lock requests out.
TEST(ControlServer, TheOldestStreamMakesRoomWhenEveryConnectionIsTaken) {
    asio::io_context io;
    TempDir dir;
    ferry::control::Server server(io.get_executor(), dir / "s.sock", 0600, {4, 60s});
    server.add("echo", echo);
    server.add_stream("follow", follow);
    ASSERT_TRUE(server.start());
    ASSERT_EQ(server.max_connections(), 4U);
    std::vector<std::string> got;
    std::thread client([&] {
        auto text = [](const ferry::Result<json>& r) { return r ? r->dump() : r.error().message; };
        // Every slot a stream, the first the oldest.
        std::vector<std::unique_ptr<ferry::control::Client>> streams;
        for (int i = 0; i < 4; ++i) {
            auto c = ferry::control::Client::connect(dir / "s.sock");
            if (!c)
                break;
            got.push_back(text((*c)->call("follow")));
            streams.push_back(std::move(*c));
            std::this_thread::sleep_for(20ms);
        }
        if (streams.size() == 4) {
            auto more = ferry::control::Client::connect(dir / "s.sock");
            got.push_back(more ? text((*more)->call("echo", {{"a", 1}})) : more.error().message);
            auto cut = streams[0]->next(5s);
            got.push_back(cut                                            ? "first still open"
                          : cut.error().code == ferry::Errc::disconnected ? "first closed"
                                                                          : cut.error().message);
            auto kept = streams[1]->next(300ms);
            got.push_back(!kept && kept.error().code == ferry::Errc::timeout ? "second open" : "second closed");
        }
        asio::post(io, [&] { server.stop(); });
    });
    io.run_for(20s);
    client.join();
    ASSERT_EQ(got.size(), 7U) << (got.empty() ? "" : got.back());
    for (int i = 0; i < 4; ++i)
        EXPECT_EQ(got[i], R"("following")");
    EXPECT_EQ(got[4], R"({"echo":{"a":1}})");
    EXPECT_EQ(got[5], "first closed");
    EXPECT_EQ(got[6], "second open");
}

TEST(ControlParams, NameTheParameterAndWhatItShouldBe) {
    using ferry::control::Params;
    json params{{"vm", 5}, {"seconds", 99}, {"flag", "yes"}, {"bw", "lots"}, {"ok", "64Mi"}, {"args", {1}}};
    Params p("m", params);
    EXPECT_EQ(p.string("vm").error().message, "m: parameter \"vm\" must be a string, not a number");
    EXPECT_EQ(p.string("missing").error().message, "m: missing string parameter \"missing\"");
    EXPECT_EQ(p.optional_int("seconds", 1, 60).error().message,
              "m: parameter \"seconds\" must be an integer from 1 to 60, not 99");
    EXPECT_EQ(p.optional_bool("flag").error().message, "m: parameter \"flag\" must be true or false, not a string");
    EXPECT_NE(p.optional_quantity("bw").error().message.find("m: parameter \"bw\""), std::string::npos);
    EXPECT_EQ(**p.optional_quantity("ok"), 64ULL << 20);
    EXPECT_FALSE(p.optional_object("args"));
    EXPECT_FALSE(*p.optional_int("absent", 1, 2));
    json zero{{"ms", 0}, {"huge", 18446744073709551615ULL}, {"negative", -5}};
    Params z("m", zero);
    EXPECT_FALSE(z.optional_int("ms", 1, 10)) << "0 is below the minimum";
    EXPECT_FALSE(z.optional_int("huge", 1, 10));
    EXPECT_FALSE(z.optional_int("negative", 1, 10));
    EXPECT_EQ(**z.optional_int("ms", 0, 10), 0);
}

TEST(Metrics, RequestLinesReasonsLabelsAndHistograms) {
    using ferry::control::parse_http_request;
    auto get = parse_http_request("GET /metrics?name[]=x HTTP/1.1\r\nHost: a\r\n\r\n");
    ASSERT_TRUE(get) << get.error().message;
    EXPECT_EQ(get->method, "GET");
    EXPECT_EQ(get->path, "/metrics");
    EXPECT_FALSE(parse_http_request("GET /metrics HTTP/2\r\n\r\n"));
    EXPECT_FALSE(parse_http_request("GET /metrics"));
    EXPECT_FALSE(parse_http_request("GET  HTTP/1.1\r\n\r\n"));
    EXPECT_FALSE(parse_http_request("get /metrics HTTP/1.1\r\n\r\n"));
    EXPECT_EQ(parse_http_request("GET /a\tb HTTP/1.1\r\n\r\n").error().message,
              "a control character or space in the path");

    using ferry::control::waiting_reason_kind;
    EXPECT_EQ(waiting_reason_kind("source node-a outbound 1/1"), "source_limit");
    EXPECT_EQ(waiting_reason_kind("target node-b inbound 2/2"), "target_limit");
    EXPECT_EQ(waiting_reason_kind("cluster 5/5"), "cluster_limit");
    EXPECT_EQ(waiting_reason_kind("every node that fits is full: ..."), "no_room");
    EXPECT_EQ(waiting_reason_kind("max-parallel 2/2"), "max_parallel");
    EXPECT_EQ(waiting_reason_kind("retry 2 of 5 in 20 s; it failed: x"), "retry_backoff");
    EXPECT_EQ(waiting_reason_kind(""), "other");
    EXPECT_EQ(ferry::control::label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");

    ferry::control::Histogram h({0.1, 1});
    h.observe(0.05);
    h.observe(0.5);
    h.observe(7);
    std::string out;
    h.render(out, "x_seconds", "mode=\"precopy\"");
    EXPECT_EQ(out, "x_seconds_bucket{mode=\"precopy\",le=\"0.1\"} 1\n"
                   "x_seconds_bucket{mode=\"precopy\",le=\"1\"} 2\n"
                   "x_seconds_bucket{mode=\"precopy\",le=\"+Inf\"} 3\n"
                   "x_seconds_sum{mode=\"precopy\"} 7.55\n"
                   "x_seconds_count{mode=\"precopy\"} 3\n");
}

TEST(Events, TheLogNumbersKeepsAndSaysWhenTooMuchWasDropped) {
    ferry::engine::EventLog log(3);
    std::vector<std::uint64_t> told;
    auto id = log.listen([&](const ferry::engine::Event& e) { told.push_back(e.seq); });
    for (int i = 0; i < 5; ++i)
        log.publish("phase", "demo", "demo-1", {{"i", i}});
    EXPECT_EQ(told, (std::vector<std::uint64_t>{1, 2, 3, 4, 5}));
    EXPECT_EQ(log.last_seq(), 5U);
    EXPECT_EQ(log.oldest_seq(), 3U);
    auto after2 = log.since(2);
    ASSERT_TRUE(after2);
    ASSERT_EQ(after2->size(), 3U);
    EXPECT_EQ(after2->front().seq, 3U);
    EXPECT_FALSE(log.since(1)) << "event 2 was dropped: a resync";
    EXPECT_TRUE(log.since(5)->empty());
    log.unlisten(id);
    log.publish("phase", "demo", "", {});
    EXPECT_EQ(told.size(), 5U);
    auto j = ferry::engine::to_json(log.since(5)->front());
    EXPECT_EQ(j["seq"], 6);
    EXPECT_TRUE(j["migration"].is_null());
    EXPECT_EQ(j["time"].get<std::string>().size(), 24U) << j; // 2026-12-05T21:57:07.758Z
}

TEST(Events, AQueueCoalescesProgressKeepsTheRestInOrderAndOverflows) {
    ferry::control::EventQueue q({"demo"}, 4);
    auto ev = [](std::uint64_t seq, std::string type, std::string vm = "demo", std::string m = "demo-1") {
        return ferry::engine::Event{seq, "t", std::move(type), std::move(vm), std::move(m), {}};
    };
    q.push(ev(1, "phase"));
    q.push(ev(2, "progress"));
    q.push(ev(3, "progress", "other")); // not asked for
    q.push(ev(4, "qemu"));
    q.push(ev(5, "progress")); // replaces 2, goes after 4
    q.push(ev(6, "progress", "demo", "demo-2")); // another migration's: kept
    std::vector<std::uint64_t> seqs;
    while (auto e = q.pop())
        seqs.push_back(e->seq);
    EXPECT_EQ(seqs, (std::vector<std::uint64_t>{1, 4, 5, 6}));
    for (std::uint64_t i = 10; i < 15; ++i)
        q.push(ev(i, "phase"));
    EXPECT_TRUE(q.overflowed());
    EXPECT_EQ(q.size(), 4U) << "phase changes are never dropped silently: the subscriber is told";
}

// --- end to end: ferryd + ferryctl + QEMU -----------------------------------

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

TEST_F(Ferryd, APolicyMatchingTheVmsLabelsSetsItsMigrationAndIsRecorded) {
    write_config("labels = { zone = \"a\" }\n", R"(max_downtime_ms = 300
[[policies]]
name = "databases"
vm_selector = { tier = "db" }
node_selector = { zone = "a" }
max_downtime_ms = 120
bandwidth_per_migration = "1Gi"
[[policies]]
name = "other-zone"
vm_selector = { tier = "db" }
node_selector = { zone = "b" }
max_downtime_ms = 50
)");
    ferry::test::write_file(dir_ / "db.toml",
                            ferry::test::guest_spec("demo", "128Mi", "ws=16 rate=4 hb=50", "labels = { tier = \"db\" }\n"));
    start();
    ASSERT_EQ(ctl("vm create --spec " + (dir_ / "db.toml")).status, 0);
    wait_heartbeats();
    auto m = ctl_json("migrate demo --wait");
    EXPECT_EQ(m["phase"], "Succeeded") << m.dump();
    EXPECT_EQ(m["policy"], "databases");
    EXPECT_EQ(m["config"]["max_downtime_ms"], 120);
    EXPECT_EQ(m["config"]["bandwidth_per_migration"], 1ULL << 30);
    EXPECT_EQ(m["config"]["parallel_outbound_migrations_per_node"], 2) << "a node limit, not the policy's";
    // A flag beats the policy; the policy is still recorded.
    m = ctl_json("migrate demo --wait --max-downtime 80");
    EXPECT_EQ(m["policy"], "databases");
    EXPECT_EQ(m["config"]["max_downtime_ms"], 80);
    EXPECT_EQ(m["config"]["bandwidth_per_migration"], 1ULL << 30);
}

// Same node: the source's and the target's phases on one node; a failing
// launched hook stops the destination QEMU and the VM keeps running.
TEST_F(Ferryd, SameNodeHooksRunBothRolesAndAFailingLaunchedHookKeepsTheVmRunning) {
    auto d = dir_.path();
    write_config("", "[hooks]\ndir = \"" + d + "/missing\"\n");
    auto missing = sh(ferry::test::ferryd_bin() + " --check-config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(missing.status, 1);
    EXPECT_NE(missing.err.find("ferryd.toml:11: key 'hooks.dir': " + d + "/missing does not exist"), std::string::npos)
        << missing.err;
    std::filesystem::create_directories(d + "/hooks");
    ferry::test::write_file(d + "/hooks/10-record", "#!/bin/sh\necho \"$2 $3 ${FERRY_QEMU_PID:-none}\" >> " + d +
                                                        "/hooks.log\n"
                                                        "if [ \"$2\" = launched ] && [ -e " + d +
                                                        "/fail ]; then echo 'tap missing' >&2; exit 2; fi\n");
    std::filesystem::permissions(d + "/hooks/10-record", std::filesystem::perms::owner_all);
    write_config("", "[hooks]\ndir = \"" + d + "/hooks\"\n");
    start();
    ASSERT_EQ(ctl("vm create --spec " + (dir_ / "vm.toml")).status, 0);
    wait_heartbeats();
    auto pid = ctl_json("vm show demo")["pid"].get<int>();
    auto phases = [&] {
        std::vector<std::string> lines;
        std::istringstream in(ferry::test::read_file(d + "/hooks.log"));
        for (std::string line; std::getline(in, line);)
            lines.push_back(line.substr(0, line.rfind(' ')));
        std::filesystem::remove(d + "/hooks.log");
        return lines;
    };
    ferry::test::write_file(d + "/fail", "");
    auto failed = ctl("migrate demo --wait");
    EXPECT_NE(failed.status, 0);
    EXPECT_NE((failed.out + failed.err).find("hook 10-record (launched on the target node-a) exited with status 2: tap "
                                             "missing"),
              std::string::npos)
        << failed.out << failed.err;
    EXPECT_EQ(phases(), (std::vector<std::string>{"prepare source", "prepare target", "launched target",
                                                  "aborted target", "aborted source"}));
    auto vm = ctl_json("vm show demo");
    EXPECT_EQ(vm["pid"], pid);
    EXPECT_EQ(vm["status"], "running");
    EXPECT_EQ(sh("pgrep -fc '[q]emu-system.*" + d + "/state/vms/demo/r2'", dir_).out, "0\n")
        << "the destination QEMU outlived the failure";
    std::filesystem::remove(d + "/fail");
    auto m = ctl_json("migrate demo --wait");
    EXPECT_EQ(m["phase"], "Succeeded") << m.dump(2);
    EXPECT_TRUE(m["warnings"].empty()) << m.dump(2);
    EXPECT_EQ(phases(), (std::vector<std::string>{"prepare source", "prepare target", "launched target",
                                                  "activated target", "released source"}));
}

// The wrapper launcher: every QEMU (the VM's and a migration's destination)
// starts through the configured argv prefix, which execs it.
TEST_F(Ferryd, AWrapperLauncherStartsEveryQemuThroughIt) {
    auto d = dir_.path();
    write_config("qemu_wrapper = [\"" + d + "/missing-wrapper\", \"--scope\"]\n");
    auto missing = sh(ferry::test::ferryd_bin() + " --check-config " + (dir_ / "ferryd.toml"), dir_);
    EXPECT_EQ(missing.status, 1);
    EXPECT_NE(missing.err.find("key 'node.qemu_wrapper': " + d + "/missing-wrapper is not an executable"),
              std::string::npos)
        << missing.err;
    ferry::test::write_file(d + "/wrap", "#!/bin/sh\necho \"$WRAP_MARK $*\" >> " + d + "/wrapped.log\nexec \"$@\"\n");
    std::filesystem::permissions(d + "/wrap", std::filesystem::perms::owner_all);
    write_config("qemu_wrapper = [\"/usr/bin/env\", \"WRAP_MARK=wrapped\", \"" + d + "/wrap\"]\n");
    start();
    ASSERT_EQ(ctl("vm create --spec " + (dir_ / "vm.toml")).status, 0);
    wait_heartbeats();
    auto pid = ctl_json("vm show demo")["pid"].get<int>();
    EXPECT_EQ(ferry::test::read_file("/proc/" + std::to_string(pid) + "/cmdline").rfind("qemu-system-x86_64", 0), 0U)
        << "the wrapper execs QEMU in the process ferry started";
    auto m = ctl_json("migrate demo --wait");
    EXPECT_EQ(m["phase"], "Succeeded") << m.dump(2);
    std::vector<std::string> lines;
    std::istringstream in(ferry::test::read_file(d + "/wrapped.log"));
    for (std::string line; std::getline(in, line);)
        lines.push_back(line);
    ASSERT_EQ(lines.size(), 2U) << ferry::test::read_file(d + "/wrapped.log");
    EXPECT_EQ(lines[0].rfind("wrapped qemu-system-x86_64 ", 0), 0U) << lines[0];
    EXPECT_EQ(lines[0].find("-incoming"), std::string::npos) << lines[0];
    EXPECT_NE(lines[1].find("-incoming defer"), std::string::npos) << "the destination, through the wrapper too";
    auto check = sh(ferry::test::build_dir() + "/tools/guest/ferry-guest-check --socket " + socket_ +
                        " --vm demo --dump " + (dir_ / "dump.bin"),
                    dir_);
    EXPECT_EQ(check.status, 0) << check.out << check.err;
}

// The event stream: a subscriber that drops mid-migration resumes after its
// last sequence number with nothing missing; one that never reads holds
// nothing up; ferryctl events prints what happened.
TEST_F(Ferryd, EventSubscribersResumeWithoutAGapAndASlowOneHoldsNothingUp) {
    start();
    ASSERT_EQ(ctl("vm create --spec " + (dir_ / "vm.toml")).status, 0);
    wait_heartbeats();
    using ferry::control::Client;
    auto subscribe = [&](json params) {
        auto c = Client::connect(socket_);
        EXPECT_TRUE(c) << c.error().message;
        auto head = (*c)->call("events.subscribe", params);
        EXPECT_TRUE(head) << head.error().message;
        return std::pair{std::move(*c), head ? *head : json()};
    };
    auto [first, head] = subscribe({{"vms", {"demo"}}, {"heartbeat_ms", 200}});
    auto start_seq = head["seq"].get<std::uint64_t>();
    // One that asks and never reads a line.
    int slow = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, socket_.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(::connect(slow, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    std::string request = R"({"id": 1, "method": "events.subscribe", "params": {"heartbeat_ms": 100}})" "\n";
    ASSERT_EQ(::write(slow, request.data(), request.size()), static_cast<ssize_t>(request.size()));

    // 32 MiB/s for 128 MiB: a few seconds of pre-copy, and fast enough for
    // the guest's 8 MiB/s of dirtying to converge.
    auto id = ctl_json("migrate demo --bandwidth 32Mi")["id"].get<std::string>();
    std::vector<json> got;
    std::uint64_t last = start_seq;
    bool saw_progress = false;
    while (!saw_progress) {
        auto line = first->next(10s);
        ASSERT_TRUE(line) << line.error().message;
        if ((*line)["type"] == "heartbeat")
            continue;
        EXPECT_EQ((*line)["vm"], "demo");
        last = (*line)["seq"].get<std::uint64_t>();
        saw_progress = (*line)["type"] == "progress";
        got.push_back(*line);
    }
    first.reset(); // gone mid-migration
    std::this_thread::sleep_for(1500ms);
    auto [again, head2] = subscribe({{"vms", {"demo"}}, {"since", last}, {"heartbeat_ms", 200}});
    bool resumed_first = true;
    for (;;) {
        auto line = again->next(30s);
        ASSERT_TRUE(line) << line.error().message;
        if ((*line)["type"] == "heartbeat")
            continue;
        ASSERT_NE((*line)["type"], "resync");
        if (resumed_first) {
            EXPECT_EQ((*line)["seq"], last + 1) << "the first event after a resume follows the last one read";
        }
        resumed_first = false;
        got.push_back(*line);
        if ((*line)["type"] == "result")
            break;
    }
    EXPECT_EQ(got.back()["migration"], id);
    EXPECT_EQ(got.back()["data"]["phase"], "Succeeded") << got.back().dump();
    // Against the whole log since the start: every event but coalesced
    // progress reached the subscriber, in order.
    auto [all, head3] = subscribe({{"since", start_seq}, {"heartbeat_ms", 200}});
    std::set<std::uint64_t> seen;
    std::uint64_t previous = 0;
    for (auto& e : got) {
        EXPECT_GT(e["seq"].get<std::uint64_t>(), previous);
        previous = e["seq"].get<std::uint64_t>();
        seen.insert(previous);
    }
    std::set<std::string> phases, types;
    for (std::uint64_t expect = start_seq + 1; expect <= head3["seq"].get<std::uint64_t>(); ++expect) {
        auto line = all->next(10s);
        ASSERT_TRUE(line) << line.error().message;
        EXPECT_EQ((*line)["seq"], expect) << "the log has no gaps";
        types.insert((*line)["type"].get<std::string>());
        if ((*line)["type"] == "phase")
            phases.insert((*line)["data"]["phase"].get<std::string>());
        if ((*line)["type"] != "progress") {
            EXPECT_TRUE(seen.count(expect)) << "missed " << line->dump();
        }
    }
    EXPECT_EQ(phases, (std::set<std::string>{"Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running",
                                             "Switchover", "Succeeded"}));
    EXPECT_EQ(types, (std::set<std::string>{"phase", "progress", "qemu", "result"}));
    // The one that never read is still connected, and held nothing up.
    char byte;
    EXPECT_EQ(::recv(slow, &byte, 1, MSG_DONTWAIT | MSG_PEEK), 1);
    ::close(slow);

    auto text = ctl("events --since " + std::to_string(start_seq) + " --vm demo");
    EXPECT_EQ(text.status, 0) << text.err;
    EXPECT_NE(text.out.find("phase    demo " + id + ": Succeeded (source)"), std::string::npos) << text.out;
    EXPECT_NE(text.out.find("result   demo " + id + ": Succeeded"), std::string::npos) << text.out;
    auto lines = ctl("--json events --since " + std::to_string(start_seq));
    EXPECT_EQ(lines.status, 0);
    EXPECT_EQ(json::parse(lines.out.substr(0, lines.out.find('\n')))["seq"], start_seq + 1);

    // Stopped while a subscriber follows, ferryd ends its stream before the
    // engine the stream listens to is gone: a clean exit, the guest kept.
    auto follower = subscribe({{"heartbeat_ms", 200}}).first;
    ASSERT_TRUE(follower->next(5s)); // a heartbeat: the stream is in its loop
    auto qemu = ctl_json("vm show demo")["pid"].get<int>();
    int status = stop_with_status();
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "status " << status << "\n" << ferry::test::read_file(dir_ / "ferryd.log");
    // What was sent before the stop, then the end of the stream.
    auto end = follower->next(5s);
    for (int i = 0; i < 100 && end; ++i)
        end = follower->next(5s);
    ASSERT_FALSE(end);
    EXPECT_EQ(end.error().code, ferry::Errc::disconnected) << end.error().message;
    EXPECT_EQ(::kill(qemu, 0), 0);
}

TEST_F(Ferryd, AMigrationOverTheOutboundLimitWaitsPendingThenStartsWhenTheSlotFrees) {
    write_config("", "parallel_outbound_migrations_per_node = 1\n");
    ferry::test::write_file(dir_ / "vm2.toml", ferry::test::guest_spec("demo2", "64Mi", "ws=8 rate=2 hb=50"));
    start();
    ASSERT_EQ(ctl("vm create --spec " + (dir_ / "vm.toml")).status, 0);
    ASSERT_EQ(ctl("vm create --spec " + (dir_ / "vm2.toml")).status, 0);
    wait_heartbeats();
    auto first = ctl_json("migrate demo --bandwidth 4Mi"); // 32 MiB of working set: seconds
    auto second = ctl_json("migrate demo2");
    EXPECT_EQ(second["phase"], "Pending") << second;
    EXPECT_EQ(second["reason"], "source node-a outbound 1/1") << second;
    std::string queued = second["id"];
    auto list = ctl_json("migration list");
    ASSERT_EQ(list.size(), 2U) << list;
    EXPECT_EQ(list[1]["id"], queued);
    EXPECT_EQ(ctl_json("migration show " + queued)["phase"], "Pending");
    EXPECT_EQ(ctl_json("vm show demo2")["status"], "running");
    // Nothing else may start while it waits: a second request for it is refused.
    auto again = ctl("migrate demo2");
    EXPECT_NE(again.err.find("already waits to migrate (" + queued + ")"), std::string::npos) << again.err;
    // Aborting the first frees the slot: the waiting one starts by itself.
    ctl("migration abort " + first["id"].get<std::string>());
    auto waited = ctl("migration wait " + queued);
    EXPECT_EQ(waited.status, 0) << waited.out << waited.err;
    auto done = ctl_json("migration show " + queued);
    EXPECT_EQ(done["phase"], "Succeeded") << done;
    EXPECT_EQ(done["vm"], "demo2");
    EXPECT_NE(done["id"], queued) << "shown as the migration it started as";
    EXPECT_EQ(ctl_json("vm show demo2")["status"], "running");
    // A waiting migration can be cancelled; the VM stays where it was.
    ctl_json("migrate demo --bandwidth 4Mi");
    auto third = ctl_json("migrate demo2");
    ASSERT_EQ(third["phase"], "Pending") << third;
    auto cancelled = ctl_json("migration abort " + third["id"].get<std::string>());
    EXPECT_EQ(cancelled["failure_reason"], "cancelled before it started");
    EXPECT_EQ(ctl_json("migration list").size(), 3U) << "the cancelled one is gone, the others recorded";
    ctl("vm delete demo2");
}

TEST_F(Ferryd, ADamagedSchedulerFileIsSetAsideAndTheNodeStartsCordonedUntilUncordonedAndACordonSurvivesARestart) {
    std::filesystem::create_directories(dir_ / "state/vms"); // a state_dir a ferryd used before
    ferry::test::write_file(dir_ / "state/scheduler.json", R"({"admission": 5, "waiting": [7]})");
    start();
    // What it held is unknown (a cordon perhaps): the node takes nothing in.
    auto status = ctl_json("node drain --status");
    EXPECT_EQ(status["state"], "cordoned") << status.dump();
    auto reason = status.value("reason", "");
    EXPECT_NE(reason.find(dir_.path() + "/state/scheduler.json was damaged ('admission' must be a string)"),
              std::string::npos)
        << reason;
    EXPECT_NE(reason.find("moved to " + dir_.path() + "/state/scheduler.json.damaged;"), std::string::npos) << reason;
    EXPECT_NE(reason.find("ferryctl node uncordon node-a"), std::string::npos) << reason;
    EXPECT_EQ(ctl_json("node list")[0]["state"], "cordoned");
    EXPECT_TRUE(std::filesystem::exists(dir_ / "state/scheduler.json.damaged"));
    auto log = ferry::test::read_file(dir_ / "ferryd.log");
    EXPECT_NE(log.find("'admission' must be a string; moved to " + dir_.path() + "/state/scheduler.json.damaged; "
                       "node-a starts cordoned"),
              std::string::npos)
        << log;
    // The cordon and its reason hold across a restart, until an operator lifts it.
    stop();
    start();
    status = ctl_json("node drain --status");
    EXPECT_EQ(status["state"], "cordoned");
    EXPECT_EQ(status.value("reason", ""), reason);
    auto lifted = ctl("node uncordon");
    EXPECT_NE(lifted.out.find("node-a is ready"), std::string::npos) << lifted.out << lifted.err;
    EXPECT_FALSE(ctl_json("node drain --status").contains("reason"));
    // A cordon is stored, and holds across a restart.
    EXPECT_EQ(ctl_json("node cordon")["state"], "cordoned");
    stop();
    start();
    EXPECT_EQ(ctl_json("node drain --status")["state"], "cordoned");
    auto human = ctl("node uncordon");
    EXPECT_NE(human.out.find("node-a is ready"), std::string::npos) << human.out << human.err;
    // A drain of a node with nothing on it completes at once.
    auto drained = ctl("node drain --wait");
    EXPECT_EQ(drained.status, 0) << drained.out << drained.err;
    EXPECT_NE(drained.out.find("drain completed: 0 moved"), std::string::npos) << drained.out;
    EXPECT_EQ(ctl_json("node drain --status")["state"], "cordoned") << "a drained node stays cordoned";
}

// A directory where scheduler.json belongs is really moved aside (beside an
// earlier damaged copy, which stays), and the file is written again.
TEST_F(Ferryd, ADirectoryInPlaceOfTheSchedulerFileIsMovedAsideAndTheStateIsSavedAgain) {
    std::filesystem::create_directories(dir_ / "state/vms");
    std::filesystem::create_directories(dir_ / "state/scheduler.json/inside");
    ferry::test::write_file(dir_ / "state/scheduler.json.damaged", "an earlier one");
    start();
    auto log = ferry::test::read_file(dir_ / "ferryd.log");
    EXPECT_NE(log.find("scheduler.json: it is a directory, not a file; moved to " + dir_.path() +
                       "/state/scheduler.json.damaged.1; node-a starts cordoned"),
              std::string::npos)
        << log;
    EXPECT_TRUE(std::filesystem::is_directory(dir_ / "state/scheduler.json.damaged.1/inside"));
    EXPECT_EQ(ferry::test::read_file(dir_ / "state/scheduler.json.damaged"), "an earlier one");
    ASSERT_TRUE(std::filesystem::is_regular_file(dir_ / "state/scheduler.json")) << "the cordon is saved at once";
    EXPECT_EQ(ctl_json("node drain --status")["state"], "cordoned");
    EXPECT_EQ(ctl_json("node uncordon")["state"], "ready");
    auto saved = json::parse(ferry::test::read_file(dir_ / "state/scheduler.json"), nullptr, false);
    EXPECT_EQ(saved.value("admission", ""), "ready") << saved.dump();
    stop();
    start();
    EXPECT_EQ(ctl_json("node drain --status")["state"], "ready");
    log = ferry::test::read_file(dir_ / "ferryd.log");
    EXPECT_EQ(log.find("saving "), std::string::npos) << log;
}

TEST_F(Ferryd, ClearErrorsForBadInput) {
    start();
    ferry::test::write_file(dir_ / "bad-vm.toml", "name = \"demo\"\nmemory = \"lots\"\n");
    auto bad = ctl("vm create --spec " + (dir_ / "bad-vm.toml"));
    EXPECT_EQ(bad.status, 3); // invalid_argument
    EXPECT_NE(bad.err.find("bad-vm.toml:2: key 'memory': bad quantity \"lots\""), std::string::npos) << bad.err;
    // Files the spec names that are not there: every one, with its line.
    ferry::test::write_file(dir_ / "files.toml", "name = \"demo\"\nmemory = \"64Mi\"\nkernel = \"/nonexistent/k\"\n"
                                                 "[[disks]]\npath = \"/nonexistent/d.raw\"\n");
    auto files = ctl("vm create --spec " + (dir_ / "files.toml"));
    EXPECT_EQ(files.status, 3);
    EXPECT_NE(files.err.find("files.toml:3: key 'kernel': /nonexistent/k does not exist or is not a file"),
              std::string::npos)
        << files.err;
    EXPECT_NE(files.err.find("files.toml:5: key 'disks[0].path': /nonexistent/d.raw does not exist"), std::string::npos)
        << files.err;
    auto missing = ctl("vm create --spec " + (dir_ / "nope.toml"));
    EXPECT_EQ(missing.status, 4); // not_found
    EXPECT_NE(missing.err.find("nope.toml"), std::string::npos);
    auto no_vm = ctl("migrate ghost");
    EXPECT_EQ(no_vm.status, 4);
    EXPECT_NE(no_vm.err.find("no VM named ghost"), std::string::npos) << no_vm.err;
    auto bw = ctl("migrate ghost --bandwidth 5XB");
    EXPECT_EQ(bw.status, 2); // usage
    EXPECT_NE(bw.err.find("--bandwidth"), std::string::npos) << bw.err;
    auto usage = ctl("migrate");
    EXPECT_EQ(usage.status, 2);
    auto empty_to = ctl("migrate ghost --to ''");
    EXPECT_EQ(empty_to.status, 2);
    EXPECT_NE(empty_to.err.find("--to: empty"), std::string::npos) << empty_to.err;
    auto no_daemon = sh(ferry::test::ferryctl_bin() + " --socket " + (dir_ / "none.sock") + " vm list", dir_);
    EXPECT_EQ(no_daemon.status, 7); // ferryd unreachable
    EXPECT_NE(no_daemon.err.find("cannot reach ferryd"), std::string::npos) << no_daemon.err;
}

// --spec takes a regular file no larger than a request may carry: ferryctl
// refuses anything else at once, without reading it (a regression would
// grow until the ulimit below stops it).
TEST_F(Ferryd, SpecIsARegularFileUpToTheRequestLimit) {
    start();
    auto create = [&](const std::string& spec) {
        // A cap on memory stops a runaway read: the address space's, or
        // under AddressSanitizer (whose shadow memory cannot live under
        // that) its own cap on the resident size.
        std::string cap = std::getenv("FERRY_SANITIZE") ? "ASAN_OPTIONS=\"$ASAN_OPTIONS:hard_rss_limit_mb=2000\" "
                                                        : "ulimit -v 2000000; ";
        return sh(cap + "timeout 20 " + ferry::test::ferryctl_bin() + " --socket " + socket_ +
                      " vm create --spec " + spec,
                  dir_);
    };
    auto zero = create("/dev/zero");
    EXPECT_EQ(zero.status, 3) << zero.err;
    EXPECT_NE(zero.err.find("ferryctl: --spec /dev/zero: not a regular file"), std::string::npos) << zero.err;
    ASSERT_EQ(::mkfifo((dir_ / "fifo.toml").c_str(), 0600), 0);
    auto fifo = create(dir_ / "fifo.toml");
    EXPECT_EQ(fifo.status, 3) << fifo.err;
    EXPECT_NE(fifo.err.find("fifo.toml: not a regular file"), std::string::npos) << fifo.err;
    ferry::test::write_file(dir_ / "big.toml", "name = \"big\"\nmemory = \"64Mi\"\n# " + std::string(5 << 20, 'x') + "\n");
    auto big = create(dir_ / "big.toml");
    EXPECT_EQ(big.status, 3) << big.err;
    EXPECT_NE(big.err.find("--spec " + (dir_ / "big.toml") + ": 5 MiB is over the 256 KiB a request may carry"),
              std::string::npos)
        << big.err;
    auto dir = create(dir_.path());
    EXPECT_EQ(dir.status, 3) << dir.err;
    EXPECT_NE(dir.err.find("is a directory"), std::string::npos) << dir.err;
    EXPECT_EQ(ctl_json("vm list").size(), 0U);
}

// ferry-guest-check has QEMU dump into a private directory of its own
// (under $TMPDIR) and removes it, after a failed check too.
TEST_F(Ferryd, GuestCheckLeavesNoDumpBehind) {
    start();
    auto created = ctl("vm create --spec " + (dir_ / "vm.toml"));
    ASSERT_EQ(created.status, 0) << created.err;
    wait_heartbeats();
    auto tmp = dir_ / "tmp";
    std::filesystem::create_directory(tmp);
    auto check = [&](const std::string& args) {
        return sh("TMPDIR=" + tmp + " " + ferry::test::build_dir() + "/tools/guest/ferry-guest-check --socket " +
                      socket_ + " --vm demo " + args,
                  dir_);
    };
    auto good = check("");
    EXPECT_EQ(good.status, 0) << good.out << good.err;
    EXPECT_NE(good.out.find("memory verified"), std::string::npos) << good.out;
    EXPECT_TRUE(std::filesystem::is_empty(tmp)) << "a dump was left in " << tmp;
    // Past the working set: the check fails, and still cleans up.
    auto bad = check("--pages 8200");
    EXPECT_NE(bad.status, 0) << bad.out << bad.err;
    EXPECT_NE(bad.err.find("memory check FAILED"), std::string::npos) << bad.err;
    EXPECT_TRUE(std::filesystem::is_empty(tmp)) << "a failed check left its dump in " << tmp;
}

TEST_F(Ferryd, RestartKeepsVmsAndRecoversAnInterruptedMigration) {
    // Hooks that record their phase, role and migration id, and the
    // migration's phase and reason as they read it on stdin.
    auto d = dir_.path();
    std::filesystem::create_directories(d + "/hooks");
    ferry::test::write_file(d + "/hooks/10-record",
                            "#!/bin/sh\necho \"$2 $3 $4 $(python3 -c 'import json,sys; m=json.load(sys.stdin)"
                            "[\"migration\"]; print(m[\"phase\"], m[\"failure_reason\"])')\" >> " +
                                d + "/hooks.log\n");
    std::filesystem::permissions(d + "/hooks/10-record", std::filesystem::perms::owner_all);
    write_config("", "[hooks]\ndir = \"" + d + "/hooks\"\n");
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
    ASSERT_EQ(ctl_json("migration show " + id)["phase"], "Running");
    int target_pid = ctl_json("migration show " + id)["target_pid"];
    // Someone following it: `migration wait` rides out the restart and
    // reports how the migration ended.
    decltype(ctl("")) waited;
    std::thread waiter([&] { waited = ctl("migration wait " + id); });
    std::this_thread::sleep_for(2s); // subscribed by now
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
    std::filesystem::remove(socket_);
    std::this_thread::sleep_for(1500ms); // no ferryd for a while
    start();
    waiter.join();
    EXPECT_EQ(waited.status, 1) << waited.out << waited.err;
    EXPECT_NE(waited.err.find("waiting up to 2 minutes for ferryd to answer again"), std::string::npos) << waited.err;
    EXPECT_NE(waited.out.find("ferryd restarted during the migration"), std::string::npos) << waited.out;
    auto after = ctl_json("migration show " + id);
    EXPECT_EQ(after["phase"], "Failed");
    EXPECT_NE(after["failure_reason"].get<std::string>().find("restarted"), std::string::npos);
    // The rollback hooks ran at the restart, the target's first, each with
    // the final record.
    auto hooks = ferry::test::read_file(d + "/hooks.log");
    auto reason = after["failure_reason"].get<std::string>();
    EXPECT_NE(hooks.find("launched target " + id + " "), std::string::npos) << hooks;
    EXPECT_NE(hooks.find("aborted target " + id + " Failed " + reason + "\naborted source " + id + " Failed " + reason +
                         "\n"),
              std::string::npos)
        << hooks;
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

// A progress line is cut to the terminal's width, counting characters, not
// bytes; an unknown width cuts nothing.
TEST(ProgressLine, IsCutToTheTerminalsWidth) {
    std::string line = "[Running]  42.0%  1.0 MiB/s  remaining 10.0 MiB  dirty 0 B/s  iteration 3  first pass";
    EXPECT_EQ(ferryctl::fit_width(line, 0), line);
    EXPECT_EQ(ferryctl::fit_width(line, 200), line);
    EXPECT_EQ(ferryctl::fit_width(line, 20), "[Running]  42.0%  1");
    EXPECT_EQ(ferryctl::fit_width("\xc3\xa9t\xc3\xa9 abc", 4), "\xc3\xa9t\xc3\xa9");
}

// A request names only parameters its method takes; descriptors go only to
// the method that takes them (a stream refuses them before it starts and
// closes them), each under a name of its own.
TEST_F(Ferryd, UnknownParametersStrayDescriptorsAndDuplicateFdNamesAreRefused) {
    start();
    auto c = ferry::control::Client::connect(socket_);
    ASSERT_TRUE(c) << c.error().message;
    auto typo = (*c)->call("migration.create", {{"vm", "demo"}, {"targte_node", "node-b"}});
    ASSERT_FALSE(typo);
    EXPECT_EQ(typo.error().code, ferry::Errc::invalid_argument);
    EXPECT_NE(typo.error().message.find("migration.create: unknown parameter 'targte_node'"), std::string::npos)
        << typo.error().message;
    auto none = (*c)->call("vm.list", {{"all", true}});
    ASSERT_FALSE(none);
    EXPECT_EQ(none.error().message, "vm.list: unknown parameter 'all' (it takes none)");
    auto stream_typo = (*c)->call("events.subscribe", {{"sinc", 3}});
    ASSERT_FALSE(stream_typo);
    EXPECT_NE(stream_typo.error().message.find("events.subscribe: unknown parameter 'sinc'"), std::string::npos)
        << stream_typo.error().message;

    auto c2 = ferry::control::Client::connect(socket_);
    ASSERT_TRUE(c2) << c2.error().message;
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    auto held = (*c2)->call_with_fds("events.subscribe", {{"heartbeat_ms", 100}}, {sv[0]});
    ASSERT_FALSE(held);
    EXPECT_EQ(held.error().code, ferry::Errc::invalid_argument);
    EXPECT_EQ(held.error().message, "events.subscribe takes no file descriptors (1 came with the request)");
    ::close(sv[0]);
    // ferryd closed its copy: the other end reads end-of-file, not silence.
    pollfd p{sv[1], POLLIN, 0};
    EXPECT_EQ(::poll(&p, 1, 5000), 1);
    char byte;
    EXPECT_EQ(::recv(sv[1], &byte, 1, MSG_DONTWAIT), 0);
    // The connection is still in step.
    auto info = (*c2)->call("node.info");
    EXPECT_TRUE(info) << info.error().message;

    int a[2], b[2];
    ASSERT_EQ(::pipe(a), 0);
    ASSERT_EQ(::pipe(b), 0);
    auto twice = (*c2)->call_with_fds("migration.register_target",
                                      {{"vm", "demo"}, {"qmp", "/nonexistent/qmp.sock"}, {"fds", {"tap", "tap"}}},
                                      {a[0], b[0]});
    ASSERT_FALSE(twice);
    EXPECT_EQ(twice.error().code, ferry::Errc::invalid_argument);
    EXPECT_NE(twice.error().message.find("fds[1]: \"tap\" is already the name of fds[0]"), std::string::npos)
        << twice.error().message;
    for (int fd : {sv[1], a[0], a[1], b[0], b[1]})
        ::close(fd);
    // What ferryctl sends still passes.
    EXPECT_EQ(ctl("vm list").status, 0);
    EXPECT_EQ(ctl("node drain --status").status, 0);
    EXPECT_EQ(ctl("migrate demo --to node-a --max-downtime 50 --bandwidth 1Mi --no-post-copy --dry-run").status, 4);
}

// Every scrape slot taken: the next scrapes get a short 503 at once, and
// the log one warning with the count, not a line each.
TEST_F(Ferryd, AFullMetricsListenerAnswers503AndWarnsOnce) {
    unsigned short port = 0;
    {
        asio::io_context io;
        asio::ip::tcp::acceptor probe(io, {asio::ip::make_address("127.0.0.1"), 0});
        port = probe.local_endpoint().port();
    }
    write_config("", fmt::format("\n[metrics]\nlisten = \"127.0.0.1:{}\"\n", port));
    start();
    asio::io_context io;
    asio::ip::tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), port);
    std::vector<asio::ip::tcp::socket> holders;
    for (int i = 0; i < 16; ++i) {
        holders.emplace_back(io);
        holders.back().connect(ep);
    }
    std::this_thread::sleep_for(300ms);
    auto scrape = [&]() {
        asio::ip::tcp::socket s(io);
        s.connect(ep);
        std::string request = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        asio::write(s, asio::buffer(request));
        std::string reply;
        boost::system::error_code ec;
        char buf[4096];
        for (;;) {
            auto n = s.read_some(asio::buffer(buf), ec);
            if (ec)
                break;
            reply.append(buf, n);
        }
        return reply;
    };
    for (int i = 0; i < 5; ++i) {
        auto reply = scrape();
        EXPECT_EQ(reply.rfind("HTTP/1.1 503 Service Unavailable\r\n", 0), 0U) << reply;
        EXPECT_NE(reply.find("at most 16 scrapes at once"), std::string::npos) << reply;
        EXPECT_LT(reply.size(), 400U) << reply;
    }
    auto log = ferry::test::read_file(dir_ / "ferryd.log");
    std::regex warning("refused with 503");
    auto warnings = std::distance(std::sregex_iterator(log.begin(), log.end(), warning), std::sregex_iterator());
    EXPECT_EQ(warnings, 1) << log;
    EXPECT_NE(log.find("1 scrape refused with 503"), std::string::npos) << log;
    holders.clear();
    std::this_thread::sleep_for(300ms);
    EXPECT_EQ(scrape().rfind("HTTP/1.1 200 OK\r\n", 0), 0U);
}

// Ctrl-C stops the waiting, not the migration, and says how to stop it.
TEST_F(Ferryd, InterruptingAWaitLeavesTheMigrationRunningAndSaysHowToAbortIt) {
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    auto o = sh("timeout --preserve-status -s INT 3 " + ferry::test::ferryctl_bin() + " --socket " + socket_ +
                    " migrate demo --wait --bandwidth 1Mi",
                dir_);
    EXPECT_EQ(o.status, 130) << o.out << o.err;
    std::smatch m;
    ASSERT_TRUE(std::regex_search(o.err, m,
                                  std::regex("ferryctl: stopped waiting; migration (\\S+) goes on \xe2\x80\x94 "
                                             "`ferryctl migration abort (\\S+)` stops it\n")))
        << o.err;
    EXPECT_EQ(m[1], m[2]);
    std::string id = m[1];
    EXPECT_EQ(ctl_json("migration show " + id)["phase"], "Running");
    auto again = sh("timeout --preserve-status -s INT 2 " + ferry::test::ferryctl_bin() + " --socket " + socket_ +
                        " migration wait " + id,
                    dir_);
    EXPECT_EQ(again.status, 130) << again.out << again.err;
    EXPECT_NE(again.err.find("migration " + id + " goes on"), std::string::npos) << again.err;
    ASSERT_EQ(ctl("migration abort " + id).status, 0);
    json final;
    for (int i = 0; i < 200; ++i) {
        final = ctl_json("migration show " + id);
        if (final["phase"] == "Failed" || final["phase"] == "Succeeded")
            break;
        std::this_thread::sleep_for(100ms);
    }
    EXPECT_EQ(final["phase"], "Failed");
}

// On a terminal narrower than the progress line, the line is cut to fit:
// a wrapped line would not be redrawn in place.
TEST_F(Ferryd, TheProgressLineFitsTheTerminal) {
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    auto o = sh("script -qec 'stty cols 50; " + ferry::test::ferryctl_bin() + " --socket " + socket_ +
                    " migrate demo --wait --bandwidth 16Mi' /dev/null",
                dir_);
    EXPECT_EQ(o.status, 0) << o.out << o.err;
    std::size_t lines = 0;
    for (auto at = o.out.find("\r\033[K"); at != std::string::npos; at = o.out.find("\r\033[K", at + 1)) {
        auto end = o.out.find_first_of("\r\n", at + 4);
        auto line = o.out.substr(at + 4, end == std::string::npos ? std::string::npos : end - at - 4);
        EXPECT_LE(line.size(), 49U) << line;
        ++lines;
    }
    EXPECT_GT(lines, 0U) << o.out;
    EXPECT_NE(o.out.find("phase:        Succeeded"), std::string::npos) << o.out;
}

// vm dirty-rate on a VM whose QEMU dies while it measures: ferryd's error,
// said once, with the exit code of ferryd's answer (not "unreachable").
TEST_F(Ferryd, ADirtyRateWhoseQemuDiesReportsFerrydsErrorOnce) {
    start();
    ctl_json("vm create --spec " + (dir_ / "vm.toml"));
    wait_heartbeats();
    int pid = ctl_json("vm show demo")["pid"];
    Output o;
    std::thread measure([&] { o = ctl("vm dirty-rate demo --seconds 5"); });
    std::this_thread::sleep_for(1500ms);
    ::kill(pid, SIGKILL);
    measure.join();
    EXPECT_NE(o.status, 0) << o.err;
    EXPECT_NE(o.status, 7) << o.err;
    EXPECT_EQ(o.err.rfind("ferryctl: ", 0), 0U) << o.err;
    auto rest = o.err.substr(10);
    auto colon = rest.find(": ");
    ASSERT_NE(colon, std::string::npos) << o.err;
    auto head = rest.substr(0, colon + 2);
    EXPECT_NE(rest.compare(head.size(), head.size(), head), 0) << "doubled prefix: " << o.err;
    EXPECT_EQ(o.err.find("ferryctl: ", 1), std::string::npos) << o.err;
}

// Range errors name the option and the value as given, with readable
// bounds; every positional argument has help text.
TEST_F(Ferryd, CommandLineErrorsSpeakTheUsersTerms) {
    auto deadline = ctl("node drain --deadline -5m");
    EXPECT_EQ(deadline.status, 2);
    EXPECT_NE(deadline.err.find("--deadline"), std::string::npos) << deadline.err;
    EXPECT_NE(deadline.err.find("'-5m'"), std::string::npos) << deadline.err;
    EXPECT_EQ(deadline.err.find("-300"), std::string::npos) << deadline.err;
    EXPECT_LT(deadline.err.size(), 200U) << deadline.err;
    EXPECT_EQ(ctl("node drain --deadline 400d").status, 2);
    auto long_deadline = ctl("node drain --deadline 9000h");
    EXPECT_EQ(long_deadline.status, 2);
    EXPECT_NE(long_deadline.err.find("366 days"), std::string::npos) << long_deadline.err;
    auto since = ctl("events --since -1");
    EXPECT_EQ(since.status, 2);
    EXPECT_NE(since.err.find("--since"), std::string::npos) << since.err;
    EXPECT_NE(since.err.find("'-1'"), std::string::npos) << since.err;
    EXPECT_LT(since.err.size(), 200U) << since.err;
    for (auto [command, positional] :
         {std::pair{"vm show", "name"}, {"vm adopt", "name"}, {"vm delete", "name"}, {"vm qmp", "command"},
          {"vm dirty-rate", "name"}, {"migrate", "name"}, {"migration show", "id"}, {"migration abort", "id"},
          {"migration wait", "id"}, {"migration register-target", "vm"}, {"node drain", "node"}}) {
        auto help = ctl(std::string(command) + " --help");
        EXPECT_EQ(help.status, 0) << command;
        std::smatch m;
        EXPECT_TRUE(std::regex_search(help.out, m, std::regex("\\n +" + std::string(positional) + " [A-Z]+( REQUIRED)? +(?!REQUIRED)\\S")))
            << command << ": " << help.out;
    }
}

// --- two nodes: ferryd processes talking over the peer transport -------------

namespace {

unsigned short free_port() {
    asio::io_context io;
    asio::ip::tcp::acceptor a(io, {asio::ip::make_address("127.0.0.1"), 0});
    return a.local_endpoint().port();
}

// ferryd processes, one per node, each with its own config, socket and log.
class NodeProcesses : public ::testing::Test {
protected:
    struct Node {
        std::string name, socket, config;
        pid_t pid = -1;
        unsigned short port = 0;
    };
    // wrapper: a shell command line ferryd runs at the end of (its own pid
    // all along: each step execs the next), e.g. an unshare.
    void start(Node& n, const std::string& wrapper = "") {
        std::filesystem::remove(n.socket);
        n.pid = ::fork();
        if (n.pid == 0) {
            ::prctl(PR_SET_PDEATHSIG, SIGKILL); // never outlive a crashed test (it would hold meson's pipe)
            auto log = dir_ / (n.name + ".log");
            std::freopen(log.c_str(), "a", stderr);
            if (!wrapper.empty()) {
                auto line = "exec " + wrapper + " " + ferry::test::ferryd_bin() + " --config " + n.config;
                ::execl("/bin/sh", "sh", "-c", line.c_str(), nullptr);
            }
            ::execl(ferry::test::ferryd_bin().c_str(), "ferryd", "--config", n.config.c_str(), nullptr);
            _exit(127);
        }
        for (int i = 0; i < 200 && !std::filesystem::exists(n.socket); ++i)
            std::this_thread::sleep_for(20ms);
        ASSERT_TRUE(std::filesystem::exists(n.socket)) << ferry::test::read_file(dir_ / (n.name + ".log"));
    }
    void stop(Node& n, int sig) {
        if (n.pid <= 0)
            return;
        ::kill(n.pid, sig);
        ::waitpid(n.pid, nullptr, 0);
        n.pid = -1;
    }
    Output ctl(Node& n, const std::string& args) {
        return sh(ferry::test::ferryctl_bin() + " --socket " + n.socket + " " + args, dir_);
    }
    json ctl_json(Node& n, const std::string& args) {
        auto o = ctl(n, "--json " + args);
        EXPECT_EQ(o.status, 0) << n.name << " " << args << ": " << o.err;
        return json::parse(o.out, nullptr, false);
    }
    // A node's ferryd.toml up to its peers: TLS from pki/, debug logs, TCG,
    // `migration` as its [migration] table.
    std::string node_toml(const Node& n, const std::string& migration) const {
        return fmt::format(R"([node]
name = "{0}"
state_dir = "{1}/state-{2}"
control_socket = "{3}"
listen = "127.0.0.1:{4}"
accel = "tcg"
log_level = "debug"
[tls]
ca = "{1}/pki/ca.pem"
cert = "{1}/pki/{0}.pem"
key = "{1}/pki/{0}-key.pem"
[migration]
{5}
)",
                           n.name, dir_.path(), n.name.substr(5), n.socket, n.port, migration);
    }

    TempDir dir_;
};

class TwoNodes : public NodeProcesses {
protected:
    void SetUp() override {
        auto pki = sh(ferry::test::ferryctl_bin() + " pki init --dir " + (dir_ / "pki") + " --nodes node-a,node-b", dir_);
        ASSERT_EQ(pki.status, 0) << pki.err;
        nodes_[0] = {"node-a", dir_ / "a.sock", dir_ / "a.toml"};
        nodes_[1] = {"node-b", dir_ / "b.sock", dir_ / "b.toml"};
        for (auto& n : nodes_)
            n.port = free_port();
        ferry::test::write_file(dir_ / "vm.toml", R"(name = "demo"
memory = "128Mi"
kernel = ")" + ferry::test::guest_kernel() + R"("
append = "ws=32 rate=4 hb=50"
)");
    }
    // node-a and node-b with their own disk directories (path_map), and on
    // node-a a VM with a 64 MiB local raw disk holding 32 MiB of data.
    // A VM on a 64 MiB local raw disk (more if `data_mib` needs it) holding
    // `data_mib` MiB of 0x33 from 8 MiB on.
    void start_local_disk_vm(const std::string& migration, int data_mib = 32) {
        configure(migration, path_map());
        std::filesystem::create_directories(dir_ / "disks-a");
        std::filesystem::create_directories(dir_ / "disks-b");
        local_disk_ = dir_ / "disks-a/local.raw";
        ASSERT_EQ(sh(fmt::format("truncate -s {}M {}", std::max(64, data_mib + 16), local_disk_), dir_).status, 0);
        ASSERT_EQ(sh(fmt::format("qemu-io -f raw -c 'write -q -P 0x33 8M {}M' {}", data_mib, local_disk_), dir_).status,
                  0);
        ferry::test::write_file(dir_ / "vm-local.toml", ferry::test::read_file(dir_ / "vm.toml") +
                                                            "[[disks]]\npath = \"" + local_disk_ +
                                                            "\"\nshared = false\n");
        start(a());
        start(b());
        ctl_json(a(), "vm create --spec " + (dir_ / "vm-local.toml"));
    }
    // Disks under disks-a on the source land under disks-<node> on each node.
    std::string path_map() const {
        return "[[block.path_map]]\nfrom = \"" + dir_.path() + "/disks-a\"\nto = \"" + dir_.path() +
               "/disks-{letter}\"\n";
    }
    std::string local_disk_;
    // Round 1 of migration `id` (of the VM made by start_local_disk_vm) is
    // under way: its first blocks have landed on node-b, the round is not over.
    bool round_one_under_way(const std::string& id) {
        auto dst = dir_ / "disks-b/local.raw";
        for (int i = 0; i < 200; ++i) {
            auto m = ctl_json(a(), "migration show " + id);
            auto& d = m["progress"]["disks"];
            struct stat st {};
            if (m["phase"] == "Running" && d.is_object() && d["sent_bytes"].get<std::uint64_t>() == 0 &&
                ::stat(dst.c_str(), &st) == 0 && st.st_blocks * 512 > (1 << 20))
                return true;
            if (d.is_object() && d["sent_bytes"].get<std::uint64_t>() > 0)
                return false; // too late: round 1 is over
            if (m["phase"] == "Failed" || m["phase"] == "Succeeded")
                return false;
            std::this_thread::sleep_for(50ms);
        }
        return false;
    }
    // Starts both nodes and on node-a a VM whose guest writes its IDE disk
    // (8 MiB at 256 KiB/s) at `path`; returns once it writes.
    void start_disk_writer(const std::string& path, const std::string& format,
                           const std::string& append = "ws=32 rate=4 hb=50 disk=256 dsize=8") {
        ferry::test::write_file(dir_ / "vm-local.toml", R"(name = "demo"
memory = "128Mi"
kernel = ")" + ferry::test::guest_kernel() + R"("
append = ")" + append + R"("
[[disks]]
path = ")" + path + R"("
shared = false
bus = "ide"
format = ")" + format + R"("
)");
        start(a());
        start(b());
        ctl_json(a(), "vm create --spec " + (dir_ / "vm-local.toml"));
        auto console = dir_ / "state-a/vms/demo/console.log";
        for (int i = 0; i < 300 && ferry::test::read_file(console).find("FERRY-DISK-HB") == std::string::npos; ++i)
            std::this_thread::sleep_for(50ms);
        ASSERT_NE(ferry::test::read_file(console).find("FERRY-DISK-HB"), std::string::npos) << "the guest never wrote";
    }
    // On node-b after a block migration: the guest goes on writing its disk
    // there, reading back what it wrote before the move, and its memory
    // (`pages` of working set) verifies; then it is paused, so that its
    // image can be read.
    void expect_writer_arrived(int pages = 8192) {
        std::this_thread::sleep_for(1500ms);
        auto console = ferry::test::read_file(dir_ / "state-b/vms/demo/console.log");
        EXPECT_NE(console.find("FERRY-DISK-HB"), std::string::npos) << console;
        EXPECT_EQ(console.find("FERRY-DISK-BAD"), std::string::npos) << console;
        auto check = check_memory(b(), pages);
        EXPECT_EQ(check.status, 0) << check.out << check.err;
        ASSERT_EQ(ctl(b(), "vm qmp demo stop").status, 0);
    }
    // Both nodes configured with `migration`, and a guest writing (`append`)
    // a 64 MiB sparse raw disk under disks-a (local_disk_).
    void start_raw_disk_writer(const std::string& migration, const std::string& append) {
        configure(migration, path_map());
        std::filesystem::create_directories(dir_ / "disks-a");
        std::filesystem::create_directories(dir_ / "disks-b");
        local_disk_ = dir_ / "disks-a/local.raw";
        ASSERT_EQ(sh("truncate -s 64M " + local_disk_, dir_).status, 0);
        ASSERT_NO_FATAL_FAILURE(start_disk_writer(local_disk_, "raw", append));
    }
    // Migrates a VM whose guest writes a local disk of this format (block migration).
    void block_migration(const std::string& format, const std::string& migration);
    // extra: appended to both nodes' files, {letter} replaced by a or b.
    void configure(const std::string& migration, const std::string& extra = "") {
        for (int i = 0; i < 2; ++i) {
            auto& n = nodes_[i];
            auto& other = nodes_[1 - i];
            std::string letter = n.name.substr(5);
            ferry::test::write_file(n.config, node_toml(n, migration) +
                                                  fmt::format("[[peers]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\n",
                                                              other.name, i == 0 && b_via_ ? b_via_ : other.port) +
                                                  std::regex_replace(extra, std::regex("\\{letter\\}"), letter));
        }
    }
    void TearDown() override {
        for (auto& n : nodes_) {
            if (n.pid <= 0)
                start(n);
            ctl(n, "vm delete demo");
            stop(n, SIGTERM);
        }
        // A test that failed mid-migration leaves QEMUs a delete refused.
        ferry::test::kill_processes_mentioning(dir_.path() + "/");
    }
    void create_on_a() {
        ctl_json(a(), "vm create --spec " + (dir_ / "vm.toml"));
        for (int i = 0; i < 300; ++i) {
            if (ferry::test::read_file(dir_ / "state-a/vms/demo/console.log").find("FERRY-HB 2 ") != std::string::npos)
                return;
            std::this_thread::sleep_for(50ms);
        }
        FAIL() << "no heartbeat from the guest";
    }
    // pages: the guest's working set (ws=32 is 8192 pages).
    Output check_memory(Node& n, int pages = 8192) {
        return sh(ferry::test::build_dir() + "/tools/guest/ferry-guest-check --socket " + n.socket +
                      " --vm demo --pages " + std::to_string(pages) + " --dump " + (dir_ / "dump.bin"),
                  dir_);
    }
    std::string wait_running(Node& n, const std::string& id) {
        for (int i = 0; i < 400; ++i) {
            auto m = ctl_json(n, "migration show " + id);
            if (m["phase"] == "Running" && m["progress"]["transferred_bytes"].get<std::uint64_t>() > (1U << 20))
                return "Running";
            if (m["phase"] == "Failed" || m["phase"] == "Succeeded")
                return m["phase"];
            std::this_thread::sleep_for(50ms);
        }
        return "timeout";
    }
    json wait_final(Node& n, const std::string& id) {
        for (int i = 0; i < 1200; ++i) {
            auto m = ctl_json(n, "migration show " + id);
            if (m["phase"] == "Failed" || m["phase"] == "Succeeded")
                return m;
            std::this_thread::sleep_for(100ms);
        }
        return ctl_json(n, "migration show " + id);
    }
    bool qemu_alive(int pid) {
        return pid > 0 && ::kill(pid, 0) == 0 &&
               ferry::test::read_file("/proc/" + std::to_string(pid) + "/cmdline").find("qemu") != std::string::npos;
    }
    Node& a() { return nodes_[0]; }
    Node& b() { return nodes_[1]; }

    // Both nodes up, the guest on node-a, and a slow (2 MiB/s) migration to
    // node-b under way: what the peer-failure tests break.
    struct Slow {
        int vm_pid = -1;
        std::string id;
        int target_qemu = -1;
    };
    // Both nodes up with demo on node-a; node-b's activated hook (the guest
    // already resumed there) announces itself and takes 8 s while the file
    // <dir>/slow exists (made here).
    void start_with_slow_activated_hook() {
        auto d = dir_.path();
        std::filesystem::create_directories(d + "/hooks-a");
        std::filesystem::create_directories(d + "/hooks-b");
        ferry::test::write_file(d + "/hooks-b/10-slow", "#!/bin/sh\n[ \"$2\" = activated ] || exit 0\n[ -e " + d +
                                                            "/slow ] || exit 0\ntouch " + d +
                                                            "/in-activated\nsleep 8\n");
        std::filesystem::permissions(d + "/hooks-b/10-slow", std::filesystem::perms::owner_all);
        ferry::test::write_file(d + "/slow", "");
        configure("bandwidth_per_migration = \"64Mi\"",
                  "[hooks]\ndir = \"" + d + "/hooks-{letter}\"\ntimeout = 20\n");
        start(a());
        start(b());
        create_on_a();
    }
    // Migrates demo to node-b; returns its id once node-b runs that hook.
    std::string migrate_until_activated() {
        auto flag = dir_ / "in-activated";
        std::filesystem::remove(flag);
        auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
        for (int i = 0; i < 600 && !std::filesystem::exists(flag); ++i)
            std::this_thread::sleep_for(50ms);
        EXPECT_TRUE(std::filesystem::exists(flag)) << ferry::test::read_file(dir_ / "node-a.log");
        return id;
    }
    Slow start_slow_migration(const std::string& extra_migration_config = "") {
        configure("bandwidth_per_migration = \"2Mi\"\n" + extra_migration_config);
        start(a());
        start(b());
        create_on_a();
        Slow m;
        m.vm_pid = ctl_json(a(), "vm show demo")["pid"];
        m.id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
        EXPECT_EQ(wait_running(a(), m.id), "Running");
        m.target_qemu = ctl_json(b(), "migration show " + m.id)["target_pid"];
        return m;
    }
    // The VM still runs in its own QEMU on node-a, memory intact.
    void expect_home_on_a(const Slow& m) {
        auto vm = ctl_json(a(), "vm show demo");
        EXPECT_EQ(vm["status"], "running");
        EXPECT_EQ(vm["pid"], m.vm_pid);
        auto check = check_memory(a());
        EXPECT_EQ(check.status, 0) << check.out << check.err;
    }
    void expect_target_dropped(const Slow& m) {
        for (int i = 0; i < 100 && qemu_alive(m.target_qemu); ++i)
            std::this_thread::sleep_for(100ms);
        EXPECT_FALSE(qemu_alive(m.target_qemu)) << "a leftover destination QEMU on the target";
        // A node just thawed from SIGSTOP works through its backlog first:
        // give it a few seconds to answer at all (a dead one never does).
        auto list = ctl(b(), "--json vm list");
        for (int i = 0; i < 50 && list.status != 0; ++i) {
            std::this_thread::sleep_for(100ms);
            list = ctl(b(), "--json vm list");
        }
        ASSERT_EQ(list.status, 0) << list.out << list.err << ferry::test::read_file(dir_ / "node-b.log");
        EXPECT_TRUE(json::parse(list.out, nullptr, false).empty()) << list.out;
        // Nothing of the arrival stays on disk either (not even its console log).
        auto left = dir_ / "state-b/vms/demo";
        for (int i = 0; i < 100 && std::filesystem::exists(left); ++i)
            std::this_thread::sleep_for(50ms);
        EXPECT_FALSE(std::filesystem::exists(left)) << "the failed arrival's directory stayed on node-b";
    }

    // A guest that dirties 48 MiB/s (per second of CPU time) over 32 MiB,
    // three times what ferry's channel carries (16 MiB/s unless told).
    void fast_dirtier(const std::string& migration) {
        ferry::test::write_file(dir_ / "vm.toml", R"(name = "demo"
memory = "128Mi"
kernel = ")" + ferry::test::guest_kernel() + R"("
append = "ws=32 rate=48 hb=50"
)");
        configure(migration);
        start(a());
        start(b());
        create_on_a();
    }
    json migrate_and_wait(const std::string& flags = "") {
        auto id = ctl_json(a(), "migrate demo --to node-b" + flags)["id"].get<std::string>();
        return wait_final(a(), id);
    }
    // The source QEMU's vCPU threads and whether any is in a throttle group.
    bool vcpus_throttled(int qemu_pid) {
        bool throttled = false;
        for (auto& t : std::filesystem::directory_iterator("/proc/" + std::to_string(qemu_pid) + "/task"))
            if (ferry::test::read_file(t.path() / "cgroup").find("ferry-throttle-demo") != std::string::npos)
                throttled = true;
        return throttled;
    }

    // 4 MiB/s and post-copy from the completion timeout (3 s for 128 MiB): a
    // post-copy phase long enough to break. Returns {source QEMU pid,
    // migration id} once the VM runs on node-b; an empty id on failure.
    std::pair<int, std::string> start_slow_postcopy() {
        fast_dirtier("bandwidth_per_migration = \"4Mi\"\nallow_post_copy = true\ncompletion_timeout_per_gib = 24");
        auto source_pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
        auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
        json m;
        for (int i = 0; i < 300; ++i) {
            m = ctl_json(a(), "migration show " + id);
            if (m["mode"] == "postcopy" || m["phase"] == "Failed" || m["phase"] == "Succeeded")
                break;
            std::this_thread::sleep_for(50ms);
        }
        EXPECT_EQ(m["mode"], "postcopy") << m.dump(2);
        if (m["mode"] != "postcopy")
            return {source_pid, ""};
        std::this_thread::sleep_for(300ms); // the destination runs
        return {source_pid, id};
    }

    Node nodes_[2];
    unsigned short b_via_ = 0; // node-a reaches node-b through this port (a proxy)
};

} // namespace

TEST_F(TwoNodes, MigratesAcrossNodesOverTlsAndBack) {
    configure("bandwidth_per_migration = \"32Mi\"");
    start(a());
    start(b());
    create_on_a();
    auto t0 = std::chrono::steady_clock::now();
    auto m = ctl(a(), "migrate demo --to node-b --wait --json");
    auto elapsed = std::chrono::steady_clock::now() - t0;
    ASSERT_EQ(m.status, 0) << m.out << m.err << ferry::test::read_file(dir_ / "node-b.log");
    auto done = json::parse(m.out);
    EXPECT_EQ(done["target_node"], "node-b");
    EXPECT_GT(done["result"]["total_time_ms"].get<int>(), 0);
    // Shaped in ferry's channel: 32 MiB of guest data at 32 MiB/s cannot take
    // less than about a second (a lower bound only: noise only slows it).
    EXPECT_GE(elapsed, 700ms);
    EXPECT_TRUE(ctl_json(a(), "vm list").empty()) << "the VM record must leave the source";
    auto on_b = ctl_json(b(), "vm show demo");
    EXPECT_EQ(on_b["node"], "node-b");
    EXPECT_EQ(on_b["status"], "running");
    EXPECT_EQ(ctl_json(b(), "migration show " + done["id"].get<std::string>())["phase"], "Succeeded");
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;

    auto back = ctl(b(), "migrate demo --to node-a --wait");
    ASSERT_EQ(back.status, 0) << back.out << back.err;
    EXPECT_TRUE(ctl_json(b(), "vm list").empty());
    EXPECT_EQ(ctl_json(a(), "vm show demo")["status"], "running");
    auto check_a = check_memory(a());
    EXPECT_EQ(check_a.status, 0) << check_a.out << check_a.err;
}

void TwoNodes::block_migration(const std::string& format, const std::string& migration) {
    configure(migration, path_map());
    std::filesystem::create_directories(dir_ / "disks-a");
    std::filesystem::create_directories(dir_ / "disks-b");
    auto src = dir_ / ("disks-a/local." + format);
    // Over 4 GiB, not a multiple of 4 KiB, 190 MiB of it data (one piece
    // past 4 GiB, one in the last sector).
    const std::uint64_t size = (4ULL << 30) + (1 << 20) + 512;
    ASSERT_EQ(sh(fmt::format("qemu-img create -q -f {} {} {}", format, src, size), dir_).status, 0);
    ASSERT_EQ(sh(fmt::format("qemu-io -f {} -c 'write -q -P 0x5a 40M 190M' -c 'write -q -P 0x6b 4G 512K' -c 'write -q "
                             "-P 0x7c {} 512' {}",
                             format, size - 512, src),
                 dir_)
                  .status,
              0);
    ASSERT_NO_FATAL_FAILURE(start_disk_writer(src, format));
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto sectors = ferry::guest::disk_sectors_from_console(dir_ / "state-a/vms/demo/console.log");
    ASSERT_EQ(sectors, 8u << 11) << "the guest writes 8 MiB";
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-a.log")
                                          << ferry::test::read_file(dir_ / "node-b.log");
    EXPECT_EQ(done["method"], "block");
    auto& disks = done["progress"]["disks"];
    ASSERT_TRUE(disks.is_object()) << done.dump(2);
    EXPECT_EQ(disks["total_bytes"], size);
    EXPECT_GE(disks["rounds"].get<int>(), 2);
    auto& result = done["result"]["disks"];
    ASSERT_EQ(result.size(), 1u) << done.dump(2);
    // What the disk holds (190.5 MiB of data and the guest's 8 MiB region,
    // a few blocks of it more than once), not its 4 GiB.
    auto data = result[0]["data_bytes"].get<std::uint64_t>();
    EXPECT_GE(data, 190u << 20) << result.dump();
    EXPECT_LT(data, 230u << 20) << result.dump();
    EXPECT_GT(result[0]["zero_bytes"].get<std::uint64_t>(), 3ULL << 30) << result.dump();
    EXPECT_FALSE(qemu_alive(pid)) << "the source QEMU still runs";
    auto vm = ctl_json(b(), "vm show demo");
    EXPECT_EQ(vm["status"], "running");
    auto dst = dir_ / ("disks-b/local." + format);
    EXPECT_EQ(vm["spec"]["disks"][0]["path"], dst);
    ASSERT_NO_FATAL_FAILURE(expect_writer_arrived());
    // The image there, read with the guest paused, holds every write.
    auto image = dst;
    if (format != "raw") {
        image = dir_ / "dst-as.raw";
        ASSERT_EQ(sh("qemu-img convert -U -f " + format + " -O raw " + dst + " " + image, dir_).status, 0);
        auto info = sh("qemu-img info -U --output=json " + dst, dir_);
        EXPECT_NE(info.out.find("\"format\": \"" + format + "\""), std::string::npos) << info.out;
    }
    auto verified = ferry::guest::verify_disk_image(image, sectors);
    EXPECT_TRUE(verified) << verified.error().message;
    auto same = sh(fmt::format("qemu-io -f raw -r -c 'read -q -P 0x5a 40M 190M' -c 'read -q -P 0x6b 4G 512K' -c "
                               "'read -q -P 0x7c {} 512' -c 'read -q -P 0 230M 64M' -c 'read -q -P 0 3900M 64M' {}",
                               size - 512, image),
                   dir_);
    EXPECT_EQ(same.out + same.err, "") << "the data outside the guest's region differs";
    {
        struct stat st {};
        ASSERT_EQ(::stat(image.c_str(), &st), 0);
        EXPECT_LT(static_cast<std::uint64_t>(st.st_blocks) * 512, 260u << 20) << "the target lost its holes";
    }
    EXPECT_TRUE(std::filesystem::exists(src)) << "the source image stays";
}

// A VM on a local disk the guest keeps writing: ferry copies the disk to
// node-b's directory (path_map) beside the RAM, the guest reads back what
// it wrote before the move, and the image on node-b holds every write up to
// the switchover (a lost last round leaves a second pass boundary).
TEST_F(TwoNodes, BlockMigrationMovesARawDiskOverTls) {
    block_migration("raw", "bandwidth_per_migration = \"128Mi\"");
}

// qcow2: read through the source QEMU's NBD export, written through the
// destination QEMU's; plain TCP.
TEST_F(TwoNodes, BlockMigrationMovesAQcow2DiskOverPlainTcp) {
    block_migration("qcow2", "bandwidth_per_migration = \"128Mi\"\ndisable_tls = true");
}

// Raw block devices on both nodes (loop devices): the source's is read
// with io_uring, the target's made by [block] create_command and written
// the same way.
TEST_F(TwoNodes, BlockMigrationMovesARawBlockDevice) {
    std::filesystem::create_directories(dir_ / "disks-a");
    std::filesystem::create_directories(dir_ / "disks-b");
    auto backing = dir_ / "a-backing.img";
    ASSERT_EQ(sh("truncate -s 64M " + backing + " && qemu-io -f raw -c 'write -q -P 0x5a 40M 2M' " + backing, dir_).status, 0);
    auto loop_a = sh("losetup -f --show " + backing, dir_);
    ASSERT_EQ(loop_a.status, 0) << loop_a.err;
    std::string dev_a = loop_a.out.substr(0, loop_a.out.find('\n'));
    std::vector<std::string> loops{dev_a};
    struct Detach {
        std::vector<std::string>& loops;
        ~Detach() {
            for (auto& l : loops)
                std::system(("losetup -d " + l + " 2>/dev/null").c_str());
        }
    } detach{loops};
    auto src = dir_ / "disks-a/vol";
    std::filesystem::create_symlink(dev_a, src);
    // node-b makes a loop device of the right size and links it at {path}.
    configure("bandwidth_per_migration = \"64Mi\"",
              "[block]\ncreate_command = \"truncate -s {size} " + dir_.path() +
                  "/{letter}-target.img && ln -s $(losetup -f --show " + dir_.path() +
                  "/{letter}-target.img) {path}\"\n[[block.path_map]]\nfrom = \"" + dir_.path() +
                  "/disks-a\"\nto = \"" + dir_.path() + "/disks-{letter}\"\n");
    ASSERT_NO_FATAL_FAILURE(start_disk_writer(src, "raw"));
    auto sectors = ferry::guest::disk_sectors_from_console(dir_ / "state-a/vms/demo/console.log");
    ASSERT_EQ(sectors, 8u << 11);
    EXPECT_NE(ferry::test::read_file(dir_ / "node-a.log").find("driver=host_device"), std::string::npos);
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    auto dst = dir_ / "disks-b/vol";
    if (std::filesystem::is_symlink(dst))
        loops.push_back(std::filesystem::read_symlink(dst).string());
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-b.log");
    EXPECT_EQ(done["method"], "block");
    ASSERT_TRUE(std::filesystem::is_block_file(dst));
    std::this_thread::sleep_for(1000ms);
    auto console = ferry::test::read_file(dir_ / "state-b/vms/demo/console.log");
    EXPECT_NE(console.find("FERRY-DISK-HB"), std::string::npos) << console;
    EXPECT_EQ(console.find("FERRY-DISK-BAD"), std::string::npos) << console;
    ASSERT_EQ(ctl(b(), "vm qmp demo stop").status, 0);
    auto verified = ferry::guest::verify_disk_image(dst, sectors);
    EXPECT_TRUE(verified) << verified.error().message;
    auto same = sh("qemu-io -f raw -r -U -c 'read -q -P 0x5a 40M 2M' -c 'read -q -P 0 48M 16M' " + dst, dir_);
    EXPECT_EQ(same.out + same.err, "");
    ASSERT_EQ(ctl(b(), "vm delete demo").status, 0);
}

// Aborted while the disk is being copied, and with the target killed while
// the disk is copied: the VM runs on where it was, its disk untouched, and
// neither node keeps a bitmap, an export, an NBD server or the half-copied
// image.
TEST_F(TwoNodes, AFailedBlockMigrationLeavesTheVmHomeAndNothingBehind) {
    ASSERT_NO_FATAL_FAILURE(start_local_disk_vm("bandwidth_per_migration = \"4Mi\""));
    auto src = local_disk_;
    auto before = ferry::test::read_file(src);
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto dst = dir_ / "disks-b/local.raw";
    auto expect_clean = [&](const std::string& what) {
        auto vm = ctl_json(a(), "vm show demo");
        EXPECT_EQ(vm["status"], "running") << what;
        EXPECT_EQ(vm["pid"].get<int>(), pid) << what;
        EXPECT_TRUE(qemu_alive(pid)) << what;
        auto blocks = ctl_json(a(), "vm qmp demo query-named-block-nodes");
        for (auto& n : blocks)
            EXPECT_TRUE(!n.contains("dirty-bitmaps") || n["dirty-bitmaps"].empty()) << what << n.dump();
        auto exports = ctl_json(a(), "vm qmp demo query-block-exports");
        EXPECT_TRUE(exports.empty()) << what << exports.dump();
        auto again = ctl(a(), "vm qmp demo nbd-server-start --args '{\"addr\": {\"type\": \"unix\", \"data\": "
                              "{\"path\": \"" + dir_ / "probe.sock" + "\"}}}'");
        EXPECT_EQ(again.status, 0) << what << ": the NBD server was left running: " << again.err;
        ctl(a(), "vm qmp demo nbd-server-stop");
        EXPECT_FALSE(std::filesystem::exists(dst)) << what << ": the half-copied image stayed on node-b";
        EXPECT_TRUE(ferry::test::pids_mentioning(dir_ / "state-b/").empty()) << what << ": a QEMU stayed on node-b";
        EXPECT_EQ(ferry::test::read_file(src).substr(8 << 20, 32 << 20), before.substr(8 << 20, 32 << 20)) << what;
    };

    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    ASSERT_TRUE(round_one_under_way(id)) << ctl(a(), "migration show " + id).out;
    // The first round shows how far it got (nothing is acknowledged yet).
    std::uint64_t sent = 0;
    for (int i = 0; i < 100 && sent == 0; ++i) {
        auto disks = ctl_json(a(), "migration show " + id)["progress"]["disks"];
        if (disks["round"] == 1)
            sent = disks["round_sent_bytes"].get<std::uint64_t>();
        EXPECT_LE(sent, disks["round_bytes"].get<std::uint64_t>());
        if (sent == 0)
            std::this_thread::sleep_for(20ms);
    }
    EXPECT_GT(sent, 0u) << "round 1 showed no progress";
    ASSERT_EQ(ctl(a(), "migration abort " + id).status, 0);
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_EQ(done["abort_status"], "Succeeded") << done.dump(2);
    for (int i = 0; i < 100 && std::filesystem::exists(dst); ++i)
        std::this_thread::sleep_for(50ms);
    expect_clean("after an abort");
    EXPECT_TRUE(ctl_json(b(), "vm list").empty());

    id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    ASSERT_TRUE(round_one_under_way(id)) << ctl(a(), "migration show " + id).out;
    stop(b(), SIGKILL);
    done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_FALSE(done["failure_reason"].is_null());
    // A killed ferryd cannot clean up: its restart removes what it made.
    start(b());
    for (int i = 0; i < 100 && std::filesystem::exists(dst); ++i)
        std::this_thread::sleep_for(50ms);
    expect_clean("after the target ferryd was killed and restarted");

    id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    ASSERT_TRUE(round_one_under_way(id)) << ctl(a(), "migration show " + id).out;
    int target_pid = -1;
    for (int i = 0; i < 100 && target_pid <= 0; ++i) {
        target_pid = ctl_json(b(), "migration show " + id)["target_pid"].get<int>();
        std::this_thread::sleep_for(20ms);
    }
    ASSERT_GT(target_pid, 0);
    ::kill(target_pid, SIGKILL);
    done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_NE(done["failure_reason"].get<std::string>().find("the destination QEMU"), std::string::npos)
        << done["failure_reason"];
    for (int i = 0; i < 100 && std::filesystem::exists(dst); ++i)
        std::this_thread::sleep_for(50ms);
    expect_clean("after the destination QEMU was killed");
}

// A guest that writes its disk faster than the link copies it (~4 MiB/s
// of PIO against 2 MiB/s): the migration fails by the progress timeout,
// naming the disk's rates, and the VM runs on at home.
TEST_F(TwoNodes, ADiskWriterFasterThanTheLinkFailsNamingItsRateAndTheVmStays) {
    ASSERT_NO_FATAL_FAILURE(start_raw_disk_writer("bandwidth_per_migration = \"2Mi\"\nprogress_timeout = 3",
                                                  "ws=32 rate=4 hb=50 disk=8192 dsize=32"));
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed") << done.dump(2);
    auto why = done["failure_reason"].is_string() ? done["failure_reason"].get<std::string>() : "";
    EXPECT_NE(why.find("the guest writes its disks at"), std::string::npos) << why;
    EXPECT_NE(why.find("allow_auto_converge is off"), std::string::npos) << why;
    auto vm = ctl_json(a(), "vm show demo");
    EXPECT_EQ(vm["status"], "running");
    EXPECT_EQ(vm["pid"].get<int>(), pid);
    auto exports = ctl_json(a(), "vm qmp demo query-block-exports");
    EXPECT_TRUE(exports.empty()) << exports.dump();
    auto dst = dir_ / "disks-b/local.raw";
    for (int i = 0; i < 100 && std::filesystem::exists(dst); ++i)
        std::this_thread::sleep_for(50ms);
    EXPECT_FALSE(std::filesystem::exists(dst));
    EXPECT_EQ(ferry::test::read_file(dir_ / "state-a/vms/demo/console.log").find("FERRY-DISK-BAD"), std::string::npos);
}

// A guest writing its disk faster than the link, with allow_auto_converge:
// ferry caps the guest's disk writes and the migration finishes with every
// write on the target. An abort while the cap is on leaves the disk's own
// limits exactly as they were.
TEST_F(TwoNodes, ADiskWriterFasterThanTheLinkIsCappedAndTheMigrationFinishes) {
    ASSERT_NO_FATAL_FAILURE(
        start_raw_disk_writer("bandwidth_per_migration = \"4Mi\"\nallow_auto_converge = true\nprogress_timeout = 30",
                              "ws=4 rate=1 hb=50 disk=8192 dsize=32"));
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto sectors = ferry::guest::disk_sectors_from_console(dir_ / "state-a/vms/demo/console.log");
    ASSERT_EQ(sectors, 32u << 11);
    // The disk's own limits, which ferry's cap must leave as it found them.
    auto set = ctl(a(), R"(vm qmp demo block_set_io_throttle --args '{"id": "disk0-dev", "bps": 0, "bps_rd": 0, )"
                        R"("bps_wr": 0, "iops": 0, "iops_rd": 5000, "iops_wr": 0, "group": "user-g"}')");
    ASSERT_EQ(set.status, 0) << set.err;
    auto limits = [&] {
        for (auto& dev : ctl_json(a(), "vm qmp demo query-block"))
            if (dev.value("qdev", "").find("disk0-dev") != std::string::npos) {
                auto& in = dev["inserted"];
                return json{{"iops_rd", in["iops_rd"]}, {"bps_wr", in["bps_wr"]}, {"group", in.value("group", "")}};
            }
        return json();
    };
    auto own = limits();
    ASSERT_EQ(own["group"], "user-g") << own.dump();
    // Until the cap is on (or the migration is over).
    auto capped = [&](const std::string& id) {
        for (int i = 0; i < 1200; ++i) {
            auto m = ctl_json(a(), "migration show " + id);
            auto& d = m["progress"]["disks"];
            if (d.is_object() && d.value("write_cap_bps", 0) > 0)
                return true;
            if (m["phase"] == "Failed" || m["phase"] == "Succeeded")
                return false;
            std::this_thread::sleep_for(50ms);
        }
        return false;
    };

    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    ASSERT_TRUE(capped(id)) << ctl(a(), "migration show " + id).out << ferry::test::read_file(dir_ / "node-a.log");
    auto during = limits();
    EXPECT_EQ(during["iops_rd"], 5000) << during.dump();
    EXPECT_GT(during["bps_wr"].get<std::uint64_t>(), 0u) << during.dump();
    EXPECT_NE(during["group"], "user-g") << during.dump();
    ASSERT_EQ(ctl(a(), "migration abort " + id).status, 0);
    auto aborted = wait_final(a(), id);
    EXPECT_EQ(aborted["phase"], "Failed");
    EXPECT_EQ(limits(), own) << "the disk's own limits were not restored";
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"].get<int>(), pid);

    // The source ferryd killed with the cap on: restarted, it puts the
    // disk's limits back from the migration's record.
    id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    ASSERT_TRUE(capped(id)) << ctl(a(), "migration show " + id).out;
    stop(a(), SIGKILL);
    start(a());
    EXPECT_EQ(ctl_json(a(), "migration show " + id)["phase"], "Failed");
    EXPECT_EQ(limits(), own) << "a restarted ferryd left the cap on";
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"].get<int>(), pid);
    // node-b gives up the arrival (its control channel is gone).
    auto dst = dir_ / "disks-b/local.raw";
    for (int i = 0; i < 300 && (std::filesystem::exists(dst) || !ctl_json(b(), "vm list").empty()); ++i)
        std::this_thread::sleep_for(50ms);
    ASSERT_FALSE(std::filesystem::exists(dst));

    // Again, to the end.
    id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-a.log");
    auto cap = done["progress"]["disks"]["write_cap_bps"].get<std::uint64_t>();
    EXPECT_GT(cap, 0u) << done.dump(2);
    EXPECT_LT(cap, 4u << 20) << done.dump(2);
    EXPECT_NE(ferry::test::read_file(dir_ / "node-a.log").find("disk writes capped at"), std::string::npos);
    ASSERT_NO_FATAL_FAILURE(expect_writer_arrived(1024));
    auto verified = ferry::guest::verify_disk_image(dst, sectors);
    EXPECT_TRUE(verified) << verified.error().message;
}

// The link between the nodes cut while a disk round is under way: the
// migration fails, the VM stays home with its disk, and neither node keeps
// anything of it.
TEST_F(TwoNodes, ALinkCutDuringADiskRoundLeavesTheVmHomeAndNothingBehind) {
    ferry::test::TcpProxy link(b().port);
    b_via_ = link.port();
    ASSERT_NO_FATAL_FAILURE(start_local_disk_vm("bandwidth_per_migration = \"4Mi\"\npeer_timeout = 6"));
    auto src = local_disk_;
    auto before = ferry::test::read_file(src);
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    ASSERT_TRUE(round_one_under_way(id)) << ctl(a(), "migration show " + id).out;
    link.cut();
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_FALSE(done["failure_reason"].is_null());
    auto vm = ctl_json(a(), "vm show demo");
    EXPECT_EQ(vm["status"], "running");
    EXPECT_EQ(vm["pid"].get<int>(), pid);
    auto blocks = ctl_json(a(), "vm qmp demo query-named-block-nodes");
    for (auto& n : blocks)
        EXPECT_TRUE(!n.contains("dirty-bitmaps") || n["dirty-bitmaps"].empty()) << n.dump();
    EXPECT_TRUE(ctl_json(a(), "vm qmp demo query-block-exports").empty());
    EXPECT_EQ(ferry::test::read_file(src).substr(8 << 20, 32 << 20), before.substr(8 << 20, 32 << 20));
    // node-b gives up the arrival once it hears nothing (peer_timeout).
    auto dst = dir_ / "disks-b/local.raw";
    for (int i = 0; i < 300 && std::filesystem::exists(dst); ++i)
        std::this_thread::sleep_for(50ms);
    EXPECT_FALSE(std::filesystem::exists(dst)) << "the half-copied image stayed on node-b";
    EXPECT_TRUE(ctl_json(b(), "vm list").empty());
}

// The link cut for 2 s in the middle of disk round 1 and restored: both
// channels are dialled again, the round goes on from the last record
// node-b has (not from the start), and the VM arrives with its disk whole.
TEST_F(TwoNodes, ALinkCutDuringADiskRoundAndRestoredResumesTheRound) {
    ferry::test::TcpProxy link(b().port);
    b_via_ = link.port();
    ASSERT_NO_FATAL_FAILURE(start_local_disk_vm("bandwidth_per_migration = \"12Mi\"\npeer_timeout = 10"));
    auto src = local_disk_;
    auto before = ferry::test::read_file(src);
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    ASSERT_TRUE(round_one_under_way(id)) << ctl(a(), "migration show " + id).out;
    link.cut();
    std::this_thread::sleep_for(2s);
    EXPECT_EQ(ctl_json(a(), "migration show " + id)["phase"], "Running");
    link.restore();
    auto done = wait_final(a(), id);
    auto log_a = ferry::test::read_file(dir_ / "node-a.log");
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << log_a << ferry::test::read_file(dir_ / "node-b.log");
    EXPECT_NE(log_a.find("disk channel to node-b re-established"), std::string::npos) << log_a;
    EXPECT_NE(log_a.find("disk round 1 resumes after record"), std::string::npos) << log_a;
    // Round 1 went on: 32 MiB of data and at most what was in flight again.
    auto data = done["result"]["disks"][0]["data_bytes"].get<std::uint64_t>();
    EXPECT_GE(data, 32u << 20);
    EXPECT_LT(data, 44u << 20) << done["result"].dump();
    EXPECT_EQ(ctl_json(b(), "vm show demo")["status"], "running");
    EXPECT_TRUE(ctl_json(a(), "vm list").empty());
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
    ASSERT_EQ(ctl(b(), "vm qmp demo stop").status, 0);
    auto dst = dir_ / "disks-b/local.raw";
    EXPECT_TRUE(ferry::test::read_file(dst) == before) << "the image on node-b differs from the source's";
}

// Copying the disks takes longer than twice peer_timeout: the source keeps
// the target's control channel alive meanwhile (it gives an arrival up
// after peer_timeout of silence), and the VM arrives.
TEST_F(TwoNodes, ADiskCopyLongerThanPeerTimeoutKeepsTheTargetWaiting) {
    ASSERT_NO_FATAL_FAILURE(start_local_disk_vm("bandwidth_per_migration = \"12Mi\"\npeer_timeout = 3", 96));
    auto before = ferry::test::read_file(local_disk_);
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-b.log");
    EXPECT_GE(done["result"]["disks"][0]["data_bytes"].get<std::uint64_t>(), 96u << 20);
    EXPECT_EQ(ctl_json(b(), "vm show demo")["status"], "running");
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
    ASSERT_EQ(ctl(b(), "vm qmp demo stop").status, 0);
    EXPECT_TRUE(ferry::test::read_file(dir_ / "disks-b/local.raw") == before) << "the image on node-b differs";
}

// Two local disks the target's path_map sends to one image: refused before
// anything moves, naming both; nothing is created there.
TEST_F(TwoNodes, TwoDisksMappedOntoOneTargetImageAreRefused) {
    configure("bandwidth_per_migration = \"32Mi\"",
              path_map() + "[[block.path_map]]\nfrom = \"" + dir_.path() + "/disks-a2\"\nto = \"" + dir_.path() +
                  "/disks-{letter}\"\n");
    for (auto d : {"disks-a", "disks-a2", "disks-b"})
        std::filesystem::create_directories(dir_ / d);
    ASSERT_EQ(sh("truncate -s 8M " + (dir_ / "disks-a/x.raw") + " " + (dir_ / "disks-a2/x.raw"), dir_).status, 0);
    ferry::test::write_file(dir_ / "vm-local.toml", ferry::test::read_file(dir_ / "vm.toml") + "[[disks]]\npath = \"" +
                                                        (dir_ / "disks-a/x.raw") + "\"\nshared = false\n" +
                                                        "[[disks]]\npath = \"" + (dir_ / "disks-a2/x.raw") +
                                                        "\"\nshared = false\n");
    start(a());
    start(b());
    ctl_json(a(), "vm create --spec " + (dir_ / "vm-local.toml"));
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    auto why = done["failure_reason"].is_string() ? done["failure_reason"].get<std::string>() : "";
    EXPECT_NE(why.find("disks[1] and disks[0] would both land at " + (dir_ / "disks-b/x.raw")), std::string::npos)
        << why;
    EXPECT_FALSE(std::filesystem::exists(dir_ / "disks-b/x.raw"));
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"].get<int>(), pid);
    EXPECT_TRUE(qemu_alive(pid));
}

// node-b holds its own image at the path the disk would land at: the
// migration is refused before anything moves, naming it and the option that
// allows it, and that image is untouched; a dangling link there is not
// followed. With [block] reuse_existing the existing image is copied into.
TEST_F(TwoNodes, AnExistingImageOrALinkAtTheTargetPathIsNeverWrittenOver) {
    ASSERT_NO_FATAL_FAILURE(start_local_disk_vm("bandwidth_per_migration = \"64Mi\""));
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto theirs = dir_ / "disks-b/local.raw";
    ASSERT_EQ(sh("truncate -s 64M " + theirs + " && qemu-io -f raw -c 'write -q -P 0x77 0 64M' " + theirs, dir_).status,
              0);
    auto before = ferry::test::read_file(theirs);
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    auto why = done["failure_reason"].is_string() ? done["failure_reason"].get<std::string>() : "";
    EXPECT_NE(why.find("target image " + theirs + " already exists"), std::string::npos) << why;
    EXPECT_NE(why.find("[block] reuse_existing = true"), std::string::npos) << why;
    EXPECT_TRUE(ferry::test::read_file(theirs) == before) << "node-b's own image was written";
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"].get<int>(), pid);
    EXPECT_TRUE(qemu_alive(pid));

    // A dangling link: nothing is made where it points, the link stays.
    std::filesystem::remove(theirs);
    auto elsewhere = dir_ / "elsewhere.raw";
    std::filesystem::create_symlink(elsewhere, theirs);
    id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    why = done["failure_reason"].is_string() ? done["failure_reason"].get<std::string>() : "";
    EXPECT_NE(why.find("is a dangling symbolic link (to " + elsewhere + ")"), std::string::npos) << why;
    EXPECT_FALSE(std::filesystem::exists(elsewhere));
    EXPECT_TRUE(std::filesystem::is_symlink(theirs));
    EXPECT_TRUE(qemu_alive(pid));

    // The operator's word: an existing image of the disk's size is copied into.
    std::filesystem::remove(theirs);
    ASSERT_EQ(sh("truncate -s 64M " + theirs + " && qemu-io -f raw -c 'write -q -P 0x77 0 64M' " + theirs, dir_).status,
              0);
    configure("bandwidth_per_migration = \"64Mi\"", path_map() + "[block]\nreuse_existing = true\n");
    ::kill(b().pid, SIGHUP);
    for (int i = 0; i < 200 && ferry::test::read_file(dir_ / "node-b.log").find("SIGHUP:") == std::string::npos; ++i)
        std::this_thread::sleep_for(20ms);
    auto source = ferry::test::read_file(local_disk_);
    id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    done = wait_final(a(), id);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-b.log");
    ASSERT_EQ(ctl(b(), "vm qmp demo stop").status, 0);
    EXPECT_TRUE(ferry::test::read_file(theirs) == source) << "the reused image differs from the source's";
}

// The target runs out of space while the disks copy (its image directory a
// small tmpfs): the source fails at once with the target's own error, not
// after waiting for an acknowledgement that never comes; the VM stays and
// node-b keeps nothing.
TEST_F(TwoNodes, ATargetOutOfSpaceFailsTheMigrationWithItsError) {
    ASSERT_NO_FATAL_FAILURE(start_local_disk_vm("bandwidth_per_migration = \"64Mi\""));
    auto small = dir_ / "disks-b";
    ASSERT_EQ(sh("mount -t tmpfs -o size=8m ferry-test " + small, dir_).status, 0);
    struct Unmount {
        std::string path;
        ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
    } unmount{small};
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    auto why = done["failure_reason"].is_string() ? done["failure_reason"].get<std::string>() : "";
    EXPECT_NE(why.find("node node-b: receiving the disks: "), std::string::npos) << why;
    EXPECT_NE(why.find(small + "/local.raw"), std::string::npos) << why;
    EXPECT_NE(why.find("No space left on device"), std::string::npos) << why;
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"].get<int>(), pid);
    EXPECT_TRUE(qemu_alive(pid));
    for (int i = 0; i < 100 && std::filesystem::exists(small + "/local.raw"); ++i)
        std::this_thread::sleep_for(50ms);
    EXPECT_FALSE(std::filesystem::exists(small + "/local.raw")) << "the half-copied image stayed";
}

// Post-copy of a VM on a local disk: RAM dirtied faster than the link
// goes post-copy once the disk's tail fits the downtime; the disk's last
// round runs with the guest paused before it starts on node-b, where it
// reads back what it wrote and its memory verifies.
TEST_F(TwoNodes, PostCopyMovesAVmOnALocalDiskOnceTheDiskIsInSync) {
    ASSERT_NO_FATAL_FAILURE(start_raw_disk_writer("bandwidth_per_migration = \"8Mi\"\nallow_post_copy = true",
                                                  "ws=32 rate=32 hb=50 disk=256 dsize=8"));
    auto sectors = ferry::guest::disk_sectors_from_console(dir_ / "state-a/vms/demo/console.log");
    ASSERT_EQ(sectors, 8u << 11);
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-a.log");
    EXPECT_EQ(done["method"], "block");
    EXPECT_EQ(done["mode"], "postcopy") << done.dump(2);
    EXPECT_GE(done["progress"]["disks"]["rounds"].get<int>(), 2) << done.dump(2);
    EXPECT_FALSE(qemu_alive(pid));
    // The disk's last round came before the guest ran there.
    auto log = ferry::test::read_file(dir_ / "node-a.log");
    auto synced = log.find("disks in sync after");
    auto started = log.find("post-copy: demo runs on node-b");
    ASSERT_NE(synced, std::string::npos) << log;
    ASSERT_NE(started, std::string::npos) << log;
    EXPECT_LT(synced, started);
    ASSERT_NO_FATAL_FAILURE(expect_writer_arrived());
    auto verified = ferry::guest::verify_disk_image(dir_ / "disks-b/local.raw", sectors);
    EXPECT_TRUE(verified) << verified.error().message;
}

// The destination QEMU killed while RAM moves: the source QEMU only sees its
// connection break, but the failure says what happened on node-b, and the
// VM runs on at home.
TEST_F(TwoNodes, AKilledDestinationQemuIsNamedAsTheCause) {
    auto m = start_slow_migration();
    ASSERT_GT(m.target_qemu, 0);
    ::kill(m.target_qemu, SIGKILL);
    auto done = wait_final(a(), m.id);
    EXPECT_EQ(done["phase"], "Failed");
    auto why = done["failure_reason"].is_string() ? done["failure_reason"].get<std::string>() : "";
    EXPECT_EQ(why.rfind("node node-b: the destination QEMU exited", 0), 0u) << why;
    EXPECT_EQ(why.find("Broken pipe"), std::string::npos) << why;
    expect_home_on_a(m);
}

// A shared disk that is another image on the target (node-b sees another
// file at the same path: its own mount namespace here) is refused before
// anything moves, naming both sides; the VM stays where it runs.
TEST_F(TwoNodes, ASharedDiskThatIsAnotherImageOnTheTargetIsRefused) {
    configure("bandwidth_per_migration = \"64Mi\"");
    auto shared = dir_ / "shared";
    auto view = dir_ / "b-view";
    std::filesystem::create_directories(shared);
    std::filesystem::create_directories(view);
    ASSERT_EQ(sh("truncate -s 64M " + shared + "/disk.raw && truncate -s 32M " + view + "/disk.raw", dir_).status, 0);
    ferry::test::write_file(dir_ / "vm-shared.toml", ferry::test::read_file(dir_ / "vm.toml") + "[[disks]]\npath = \"" +
                                                         shared + "/disk.raw\"\n");
    start(a());
    start(b(), "unshare --mount --propagation private -- sh -c 'mount --bind " + view + " " + shared +
                   " && exec \"$0\" \"$@\"'");
    ctl_json(a(), "vm create --spec " + (dir_ / "vm-shared.toml"));
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    auto why = done["failure_reason"].is_string() ? done["failure_reason"].get<std::string>() : "";
    EXPECT_NE(why.find("shared disks[0] " + shared + "/disk.raw is raw of 33554432 bytes on node-b but raw of "
                       "67108864 bytes on node-a"),
              std::string::npos)
        << why << ferry::test::read_file(dir_ / "node-b.log");
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"].get<int>(), pid);
    EXPECT_TRUE(qemu_alive(pid));
    EXPECT_TRUE(ctl_json(b(), "vm list").empty());
    EXPECT_EQ(std::filesystem::file_size(view + "/disk.raw"), 32u << 20);
}

TEST_F(TwoNodes, OverTheTargetsInboundLimitAMigrationWaitsThenStartsAndTheVmStaysMeanwhile) {
    auto m = start_slow_migration("parallel_inbound_migrations_per_node = 1\n");
    ferry::test::write_file(dir_ / "vm2.toml", ferry::test::guest_spec("demo2", "64Mi", "ws=8 rate=2 hb=50"));
    ctl_json(a(), "vm create --spec " + (dir_ / "vm2.toml"));
    auto pid2 = ctl_json(a(), "vm show demo2")["pid"];
    auto second = ctl_json(a(), "migrate demo2 --to node-b --bandwidth 32Mi");
    EXPECT_EQ(second["phase"], "Pending") << second.dump();
    EXPECT_EQ(second["reason"], "target node-b inbound 1/1") << second.dump();
    auto vm2 = ctl_json(a(), "vm show demo2");
    EXPECT_EQ(vm2["status"], "running");
    EXPECT_EQ(vm2["pid"], pid2);
    EXPECT_EQ(ctl_json(a(), "migration show " + m.id)["phase"], "Running") << "the first one carries on";
    ctl(a(), "migration abort " + m.id);
    wait_final(a(), m.id);
    expect_home_on_a(m);
    // The slot is free: demo2 goes.
    auto done = wait_final(a(), second["id"]);
    EXPECT_EQ(done["phase"], "Succeeded") << done.dump();
    ctl(b(), "vm delete demo2");
}

TEST_F(TwoNodes, WithoutToTheSchedulerPicksTheNodeAndDryRunSaysWhy) {
    configure("");
    // node-b labelled; node-a not.
    auto text = ferry::test::read_file(b().config);
    ferry::test::write_file(b().config, std::regex_replace(text, std::regex("log_level = \"debug\"\n"),
                                                           "log_level = \"debug\"\nlabels = { zone = \"b\" }\n"));
    start(a());
    start(b());
    create_on_a();

    auto nodes = ctl_json(a(), "node list");
    ASSERT_EQ(nodes.size(), 2U) << nodes.dump();
    EXPECT_EQ(nodes[0]["name"], "node-a");
    EXPECT_EQ(nodes[0]["vms"].size(), 1U);
    EXPECT_EQ(nodes[0]["vms"][0]["memory"], 128ULL << 20);
    EXPECT_EQ(nodes[1]["name"], "node-b");
    EXPECT_EQ(nodes[1]["state"], "ready");
    EXPECT_EQ(nodes[1]["labels"]["zone"], "b");
    EXPECT_GT(nodes[1]["memory"].get<std::uint64_t>(), 0U);
    EXPECT_FALSE(nodes[1]["machine_types"].empty());
    auto table = ctl(a(), "node list");
    EXPECT_NE(table.out.find("node-b"), std::string::npos) << table.out << table.err;
    EXPECT_NE(table.out.find("zone=b"), std::string::npos) << table.out;

    auto plan = ctl_json(a(), "migrate demo --dry-run");
    EXPECT_EQ(plan["target_node"], "node-b") << plan.dump();
    ASSERT_EQ(plan["ranked"].size(), 1U);
    EXPECT_EQ(plan["ranked"][0]["node"], "node-b");
    ASSERT_EQ(plan["rejected"].size(), 1U);
    EXPECT_EQ(plan["rejected"][0]["reasons"][0], "the VM runs there");
    EXPECT_EQ(ctl_json(a(), "migration list").size(), 0U) << "a dry run moves nothing";
    auto human = ctl(a(), "migrate demo --dry-run");
    EXPECT_NE(human.out.find("would migrate to node-b"), std::string::npos) << human.out;
    // A selector added to the request filters too (KubeVirt's addedNodeSelector).
    EXPECT_EQ(ctl_json(a(), "migrate demo --dry-run --node-selector zone=b")["target_node"], "node-b");
    auto narrowed = ctl_json(a(), "migrate demo --dry-run --node-selector zone=x");
    EXPECT_TRUE(narrowed["target_node"].is_null()) << narrowed.dump();
    EXPECT_NE(narrowed.value("why_none", "").find("added selector zone=x"), std::string::npos) << narrowed.dump();
    auto refused_sel = ctl(a(), "migrate demo --node-selector zone=x");
    EXPECT_NE(refused_sel.err.find("no node fits demo"), std::string::npos) << refused_sel.err;
    EXPECT_EQ(ctl_json(a(), "migration list").size(), 0U) << "nothing queued for a VM that fits nowhere";
    auto shown = ctl_json(a(), "vm show demo");
    EXPECT_EQ(shown["migratable"]["now"], true) << shown.dump();
    EXPECT_EQ(shown["migratable"]["target"], "node-b");
    EXPECT_NE(ctl(a(), "vm show demo").out.find("migratable:  yes (to node-b)"), std::string::npos);

    auto id = ctl_json(a(), "migrate demo")["id"].get<std::string>();
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Succeeded") << done.dump();
    EXPECT_EQ(done["target_node"], "node-b");
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;

    // A node that already has a VM of that name is no target for it.
    ctl_json(a(), "vm create --spec " + (dir_ / "vm.toml"));
    auto taken = ctl_json(b(), "migrate demo --dry-run");
    EXPECT_TRUE(taken["target_node"].is_null()) << taken.dump();
    EXPECT_NE(taken.value("why_none", "").find("node-a: already has a VM named demo"), std::string::npos)
        << taken.dump();
    ctl(a(), "vm delete demo");

    // From node-b, a VM whose node_selector no node matches stays, named.
    ctl(b(), "vm delete demo");
    ferry::test::write_file(dir_ / "picky.toml", ferry::test::guest_spec("demo", "64Mi", "ws=8 rate=2 hb=50",
                                                                         "node_selector = { zone = \"c\" }\n"));
    ctl_json(b(), "vm create --spec " + (dir_ / "picky.toml"));
    auto refused = ctl(b(), "migrate demo");
    EXPECT_NE(refused.status, 0);
    EXPECT_NE((refused.out + refused.err).find("no node fits demo"), std::string::npos) << refused.err;
    EXPECT_NE((refused.out + refused.err).find("node-a: node_selector zone=c: the node has no label zone"), std::string::npos)
        << refused.err;
    EXPECT_EQ(ctl_json(b(), "vm show demo")["status"], "running");
    EXPECT_TRUE(ctl_json(b(), "migration list").empty()) << "demo's arrival went with the deleted VM";
    plan = ctl_json(b(), "migrate demo --dry-run");
    EXPECT_TRUE(plan["target_node"].is_null());
    shown = ctl_json(b(), "vm show demo");
    EXPECT_EQ(shown["migratable"]["now"], false);
    EXPECT_NE(shown["migratable"]["reasons"][0].get<std::string>().find("node_selector zone=c"), std::string::npos)
        << shown.dump();
    EXPECT_TRUE(plan["ranked"].empty());

    // A peer that is down is reported, not fatal.
    stop(a(), SIGTERM);
    nodes = ctl_json(b(), "node list");
    ASSERT_EQ(nodes.size(), 2U);
    EXPECT_EQ(nodes[1]["name"], "node-a");
    EXPECT_EQ(nodes[1]["state"], "unreachable");
    EXPECT_FALSE(nodes[1]["error"].get<std::string>().empty());
}

// Hooks on both nodes: the order and input docs/hooks.md promises, a
// target's failing prepare hook that keeps the VM home with its message, a
// hook past its timeout killed with what it started, and a failure after
// the switchover reported and not rolled back.
// The external launcher: node-b never starts a destination QEMU itself. A
// stack that follows node-b's events starts one with the launch event's
// argv, registers it with a descriptor of its own, and the VM moves into
// it. Without the stack the migration fails after the wait and the VM stays.
TEST_F(TwoNodes, AnExternallyStartedQemuIsAdoptedAsTheTargetAndGetsTheStacksDescriptors) {
    auto d = dir_.path();
    configure("bandwidth_per_migration = \"64Mi\"");
    auto b_config = ferry::test::read_file(b().config);
    ferry::test::write_file(b().config, std::regex_replace(b_config, std::regex("\\[node\\]\n"),
                                                           "[node]\nlauncher = \"external\"\n"
                                                           "external_launch_timeout = 5\n"));
    start(a());
    start(b());
    create_on_a();
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();

    // Nobody starts it: the wait ends, the VM is home.
    auto alone = ctl(a(), "migrate demo --to node-b --wait");
    EXPECT_NE(alone.status, 0);
    EXPECT_NE((alone.out + alone.err).find("no QEMU registered for demo on node-b within 5 s"), std::string::npos)
        << alone.out << alone.err;
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"], pid);
    EXPECT_EQ(ctl_json(a(), "vm show demo")["status"], "running");
    EXPECT_NE(ctl(a(), "migration list").out.find("Failed"), std::string::npos);

    // The stack: starts what the launch event says, registers it with a
    // pipe's read end as "tap0", and writes down the pid.
    ferry::test::write_file(d + "/stack.py", fmt::format(R"PY(
import json, os, subprocess, sys, time
ferryctl, sock, out = sys.argv[1], sys.argv[2], sys.argv[3]
events = subprocess.Popen([ferryctl, "--socket", sock, "--json", "events", "--follow", "--vm", "demo"],
                          stdout=subprocess.PIPE, text=True)
for line in events.stdout:
    e = json.loads(line)
    if e["type"] != "launch":
        continue
    data = e["data"]
    log = open(data["log"], "a")
    qemu = subprocess.Popen(data["argv"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    while not os.path.exists(data["qmp_socket"]):
        time.sleep(0.02)
    r, w = os.pipe()
    # A wrong pid first: refused, and the arrival waits on for the right one.
    wrong = subprocess.run([ferryctl, "--socket", sock, "migration", "register-target", "demo",
                            "--qmp", data["qmp_socket"], "--pid", "1"], capture_output=True, text=True)
    open(out + ".wrong", "w").write(wrong.stderr)
    done = subprocess.run([ferryctl, "--socket", sock, "--json", "migration", "register-target", "demo",
                           "--qmp", data["qmp_socket"], "--pid", str(qemu.pid), "--fd", "tap0=%d" % r],
                          pass_fds=[r], capture_output=True, text=True)
    with open(out, "w") as f:
        f.write(json.dumps({{"pid": qemu.pid, "status": done.returncode, "out": done.stdout, "err": done.stderr}}))
    events.kill()
    break
)PY"));
    std::string stack_cmd = "timeout 120 /usr/bin/python3 " + d + "/stack.py " + ferry::test::build_dir() +
                            "/tools/ferryctl " + b().socket + " " + d + "/stack.json >" + d +
                            "/stack.out 2>&1 </dev/null";
    std::thread stack([stack_cmd] { (void)std::system(stack_cmd.c_str()); });
    std::this_thread::sleep_for(500ms); // subscribed
    auto moved = ctl(a(), "migrate demo --to node-b --wait");
    EXPECT_EQ(moved.status, 0) << moved.out << moved.err;
    std::string said;
    for (int i = 0; i < 100 && said.empty(); ++i) {
        said = ferry::test::read_file(d + "/stack.json");
        std::this_thread::sleep_for(50ms);
    }
    if (said.empty())
        stack.join(); // gone after its timeout; what it printed says why
    ASSERT_FALSE(said.empty()) << "the stack never registered: " << ferry::test::read_file(d + "/stack.out");
    auto registered = json::parse(said);
    EXPECT_EQ(registered["status"], 0) << registered.dump();
    EXPECT_NE(ferry::test::read_file(d + "/stack.json.wrong")
                  .find("cannot receive demo: pid 1 was given, but the process on that socket is " +
                        std::to_string(registered["pid"].get<int>())),
              std::string::npos)
        << ferry::test::read_file(d + "/stack.json.wrong");
    auto reply = json::parse(registered["out"].get<std::string>());
    EXPECT_EQ(reply["pid"], registered["pid"]);
    ASSERT_EQ(reply["fdsets"].size(), 1U) << reply;
    EXPECT_EQ(reply["fdsets"][0]["name"], "tap0");
    // The VM runs on node-b in the stack's QEMU, which holds the descriptor.
    auto vm = ctl_json(b(), "vm show demo");
    EXPECT_EQ(vm["pid"], registered["pid"]) << vm;
    EXPECT_EQ(vm["status"], "running");
    auto fdsets = ctl_json(b(), "vm qmp demo query-fdsets");
    ASSERT_TRUE(fdsets.is_array() && fdsets.size() == 1U) << fdsets;
    EXPECT_EQ(fdsets[0]["fds"][0]["opaque"], "tap0") << fdsets;
    EXPECT_FALSE(qemu_alive(pid)) << "the source QEMU is gone";
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
    // A registration nobody waits for is refused.
    auto late = ctl(b(), "migration register-target demo --qmp /nonexistent.sock");
    EXPECT_NE(late.status, 0);
    EXPECT_NE(late.err.find("no migration of demo arrives on node-b"), std::string::npos) << late.err;
    stack.join();
}

// The source ferryd SIGKILLed at two steps of the hand-off: while the target
// finishes the arrival (its activated hook runs; the source QEMU is paused
// after the switchover), and once the source QEMU is gone (its released hook
// runs). Restarted, the source asks the target before it changes anything:
// the migration ends Succeeded, the VM is recorded on the target alone (the
// source QEMU never resumed), and its memory is intact there.
TEST_F(TwoNodes, ASourceKilledDuringTheHandOffAsksTheTargetAndRecordsTheTruth) {
    auto d = dir_.path();
    for (auto letter : {"a", "b"}) {
        auto hooks = d + "/hooks-" + letter;
        std::filesystem::create_directories(hooks);
        // Slow in the phase named by the file "slow-<phase>", and says so.
        ferry::test::write_file(hooks + "/10-slow", "#!/bin/sh\n[ -e " + d + "/slow-$2 ] || exit 0\ntouch " + d +
                                                        "/in-$2\nsleep 8\n");
        std::filesystem::permissions(hooks + "/10-slow", std::filesystem::perms::owner_all);
    }
    configure("bandwidth_per_migration = \"64Mi\"", "[hooks]\ndir = \"" + d + "/hooks-{letter}\"\ntimeout = 20\n");
    start(a());
    start(b());
    create_on_a();
    auto kill_source_in = [&](Node& source, Node& target, const std::string& phase) {
        auto pid = ctl_json(source, "vm show demo")["pid"].get<int>();
        ferry::test::write_file(d + "/slow-" + phase, "");
        auto id = ctl_json(source, "migrate demo --to " + target.name)["id"].get<std::string>();
        for (int i = 0; i < 600 && !std::filesystem::exists(d + "/in-" + phase); ++i)
            std::this_thread::sleep_for(50ms);
        ASSERT_TRUE(std::filesystem::exists(d + "/in-" + phase)) << ferry::test::read_file(dir_ / (source.name + ".log"));
        stop(source, SIGKILL);
        std::filesystem::remove(d + "/slow-" + phase);
        std::filesystem::remove(d + "/in-" + phase);
        start(source);
        auto done = wait_final(source, id);
        auto log = ferry::test::read_file(dir_ / (source.name + ".log"));
        ASSERT_EQ(done["phase"], "Succeeded") << phase << ": " << done.dump(2) << log;
        EXPECT_NE(log.find(target.name + " reports that demo runs there"), std::string::npos) << log;
        EXPECT_TRUE(ctl_json(source, "vm list").empty()) << "the source keeps a record of the VM";
        EXPECT_EQ(ctl_json(target, "vm show demo")["status"], "running");
        for (int i = 0; i < 100 && qemu_alive(pid); ++i)
            std::this_thread::sleep_for(50ms);
        EXPECT_FALSE(qemu_alive(pid)) << "the source QEMU still runs";
        auto check = check_memory(target);
        EXPECT_EQ(check.status, 0) << check.out << check.err;
    };
    ASSERT_NO_FATAL_FAILURE(kill_source_in(a(), b(), "activated"));
    ASSERT_NO_FATAL_FAILURE(kill_source_in(b(), a(), "released"));
}

// The source ferryd SIGKILLed during the hand-off, and the target lost with
// it (its ferryd and QEMU killed): restarted, the source cannot learn the
// outcome, so the VM is in doubt. It neither resumes nor is removed; an
// abort is refused, naming the way out; the operator's --target-lost
// resumes it on the source with its memory intact.
TEST_F(TwoNodes, AMigrationInDoubtWaitsForTheTargetUntilTheOperatorDeclaresItLost) {
    start_with_slow_activated_hook();
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = migrate_until_activated();
    stop(a(), SIGKILL);
    stop(b(), SIGKILL);
    ferry::test::kill_processes_mentioning(dir_ / "state-b/");
    start(a());
    json m;
    for (int i = 0; i < 200; ++i) {
        m = ctl_json(a(), "migration show " + id);
        if (m.contains("in_doubt") && m["in_doubt"].get<std::string>().find("has not been asked") == std::string::npos)
            break;
        std::this_thread::sleep_for(50ms);
    }
    ASSERT_TRUE(m.contains("in_doubt")) << m.dump(2);
    EXPECT_FALSE(m["phase"] == "Succeeded" || m["phase"] == "Failed") << m.dump(2);
    EXPECT_EQ(ctl_json(a(), "vm show demo")["status"], "unknown");
    EXPECT_TRUE(qemu_alive(pid)) << "the source QEMU was removed while in doubt";
    auto shown = ctl(a(), "migration show " + id).out;
    EXPECT_NE(shown.find("in doubt:     whether demo runs on node-b"), std::string::npos) << shown;
    auto refused = ctl(a(), "migration abort " + id);
    EXPECT_NE(refused.status, 0);
    EXPECT_NE(refused.err.find("is in doubt"), std::string::npos) << refused.err;
    EXPECT_NE(refused.err.find("migration abort " + id + " --target-lost"), std::string::npos) << refused.err;
    auto moved = ctl(a(), "migrate demo --to node-b");
    EXPECT_NE(moved.status, 0) << "a VM in doubt must not migrate again";
    auto resumed = ctl(a(), "migration abort " + id + " --target-lost");
    ASSERT_EQ(resumed.status, 0) << resumed.err;
    EXPECT_NE(resumed.out.find("ends Failed: node-b was declared lost by the operator"), std::string::npos)
        << resumed.out;
    EXPECT_NE(resumed.out.find("demo was resumed here"), std::string::npos) << resumed.out;
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed") << done.dump(2);
    EXPECT_EQ(done["abort_status"], "Succeeded") << done.dump(2);
    EXPECT_FALSE(done.contains("in_doubt")) << done.dump(2);
    auto vm = ctl_json(a(), "vm show demo");
    EXPECT_EQ(vm["status"], "running") << vm.dump(2);
    EXPECT_EQ(vm["pid"].get<int>(), pid);
    auto check = check_memory(a());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
    auto not_in_doubt = ctl(a(), "migration abort " + id + " --target-lost");
    EXPECT_NE(not_in_doubt.status, 0);
    EXPECT_NE(not_in_doubt.err.find("already ended"), std::string::npos) << not_in_doubt.err;

    // node-b, back, holds what it had taken over: a stopped record of demo
    // (its QEMU gone), for its operator to delete.
    start(b());
    EXPECT_EQ(ctl_json(b(), "vm show demo")["status"], "stopped");
    EXPECT_EQ(ctl(b(), "vm delete demo").status, 0);

    // Again, and both QEMUs lost: node-b answers that it took demo over but
    // its QEMU is gone, which keeps it in doubt (the copy on node-a would be
    // older); --target-lost then leaves demo stopped on node-a, not stuck.
    id = migrate_until_activated();
    stop(a(), SIGKILL);
    stop(b(), SIGKILL);
    ferry::test::kill_processes_mentioning(dir_ / "state-b/");
    ::kill(pid, SIGKILL);
    start(b());
    start(a());
    std::string why;
    for (int i = 0; i < 200 && why.find("its QEMU there is gone") == std::string::npos; ++i) {
        std::this_thread::sleep_for(50ms);
        why = ctl_json(a(), "migration show " + id).value("in_doubt", "");
    }
    EXPECT_NE(why.find("node-b took demo over, but its QEMU there is gone"), std::string::npos) << why;
    auto lost = ctl(a(), "migration abort " + id + " --target-lost");
    ASSERT_EQ(lost.status, 0) << lost.err;
    EXPECT_NE(lost.out.find("the source QEMU was gone too: demo is stopped here"), std::string::npos) << lost.out;
    EXPECT_EQ(wait_final(a(), id)["phase"], "Failed");
    EXPECT_EQ(ctl_json(a(), "vm show demo")["status"], "stopped");
    auto deleted = ctl(a(), "vm delete demo");
    EXPECT_EQ(deleted.status, 0) << deleted.err;
}

// The target ferryd SIGKILLed during its activated hook (the guest already
// resumed there) and restarted: the source got no answer to the hand-off, so
// it keeps its copy paused and asks until the target says it runs the VM;
// the migration then succeeds, the VM in the same QEMU on node-b.
TEST_F(TwoNodes, ATargetKilledDuringTheHandOffKeepsTheVmAndTheSourceLearnsIt) {
    start_with_slow_activated_hook();
    auto source_pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = migrate_until_activated();
    auto target_pid = ctl_json(b(), "vm show demo")["pid"].get<int>();
    stop(b(), SIGKILL);
    std::filesystem::remove(dir_ / "slow");
    json m;
    for (int i = 0; i < 200 && !m.contains("in_doubt"); ++i) {
        std::this_thread::sleep_for(50ms);
        m = ctl_json(a(), "migration show " + id);
    }
    ASSERT_TRUE(m.contains("in_doubt")) << m.dump(2);
    EXPECT_EQ(m["phase"], "Switchover");
    EXPECT_EQ(ctl_json(a(), "vm show demo")["status"], "unknown");
    EXPECT_TRUE(qemu_alive(source_pid));
    start(b());
    auto done = wait_final(a(), id);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-a.log");
    EXPECT_NE(done["warnings"].dump().find("node-b did not answer the hand-off; node-b reported that demo runs there"),
              std::string::npos)
        << done.dump(2);
    EXPECT_EQ(ctl_json(b(), "migration show " + id)["phase"], "Succeeded");
    auto vm = ctl_json(b(), "vm show demo");
    EXPECT_EQ(vm["status"], "running");
    EXPECT_EQ(vm["pid"].get<int>(), target_pid) << "the QEMU the guest resumed in was replaced";
    EXPECT_TRUE(ctl_json(a(), "vm list").empty());
    for (int i = 0; i < 100 && qemu_alive(source_pid); ++i)
        std::this_thread::sleep_for(50ms);
    EXPECT_FALSE(qemu_alive(source_pid));
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
}

// An abort while the target prepares (a slow prepare hook there) reaches
// the target at once, on a channel of its own: the migration fails naming
// what the target was doing, without waiting for the prepare's answer.
TEST_F(TwoNodes, AnAbortWhileTheTargetPreparesReachesItAndNamesItsStep) {
    auto d = dir_.path();
    std::filesystem::create_directories(d + "/hooks-b");
    ferry::test::write_file(d + "/hooks-b/10-slow", "#!/bin/sh\n[ \"$2\" = prepare ] || exit 0\ntouch " + d +
                                                        "/in-prepare\nsleep 40\n");
    std::filesystem::permissions(d + "/hooks-b/10-slow", std::filesystem::perms::owner_all);
    std::filesystem::create_directories(d + "/hooks-a");
    configure("bandwidth_per_migration = \"64Mi\"", "[hooks]\ndir = \"" + d + "/hooks-{letter}\"\ntimeout = 60\n");
    start(a());
    start(b());
    create_on_a();
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    for (int i = 0; i < 400 && !std::filesystem::exists(d + "/in-prepare"); ++i)
        std::this_thread::sleep_for(50ms);
    ASSERT_TRUE(std::filesystem::exists(d + "/in-prepare"));
    EXPECT_EQ(ctl_json(a(), "migration show " + id)["phase"], "PreparingTarget");
    ctl_json(a(), "migration abort " + id);
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_EQ(done["abort_status"], "Succeeded") << done.dump(2);
    EXPECT_EQ(done["failure_reason"], "aborted by request while node node-b was running its prepare hooks")
        << done.dump(2);
    EXPECT_NE(ferry::test::read_file(dir_ / "node-b.log").find("dropping the incoming demo: aborted by the source"),
              std::string::npos);
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"].get<int>(), pid);
    EXPECT_TRUE(qemu_alive(pid));
}

TEST_F(TwoNodes, HooksRunInOrderOnBothNodesAndAFailingPrepareHookKeepsTheVmHome) {
    auto d = dir_.path();
    for (auto letter : {"a", "b"}) {
        auto hooks = d + "/hooks-" + letter;
        std::filesystem::create_directories(hooks);
        // Every phase: one line in a log both nodes share, and its input.
        ferry::test::write_file(hooks + "/10-record", "#!/bin/sh\n"
                                "cat > " + d + "/input-$FERRY_NODE-$2.json\n"
                                "echo \"$FERRY_NODE $2 $3 vm=$1 id=$4 env=$FERRY_VM/$FERRY_PHASE/$FERRY_ROLE/"
                                "$FERRY_MIGRATION_ID pid=${FERRY_QEMU_PID:-none}\" >> " + d + "/hooks.log\n");
        // Skipped: hidden, not executable, an editor's backup.
        for (auto skipped : {"/.hidden", "/15-not-executable", "/10-record~"})
            ferry::test::write_file(hooks + skipped, "#!/bin/sh\necho ran $0 >> " + d + "/skipped.log\nexit 1\n");
        for (auto name : {"/10-record", "/.hidden", "/10-record~"})
            std::filesystem::permissions(hooks + name, std::filesystem::perms::owner_all);
    }
    ferry::test::write_file(d + "/hooks-b/20-gate", "#!/bin/sh\n"
                            "[ \"$2\" = prepare ] || exit 0\n"
                            "if [ -e " + d + "/hang ]; then sleep 987 & wait; fi\n"
                            "if [ -e " + d + "/refuse ]; then echo 'no bridge br-test on node-b' >&2; exit 3; fi\n");
    ferry::test::write_file(d + "/hooks-a/30-late", "#!/bin/sh\n"
                            "[ \"$2\" = released ] || exit 0\necho 'route cleanup failed' >&2\nexit 1\n");
    for (auto name : {"/hooks-b/20-gate", "/hooks-a/30-late"})
        std::filesystem::permissions(d + name, std::filesystem::perms::owner_all);
    configure("bandwidth_per_migration = \"64Mi\"", "[hooks]\ndir = \"" + d + "/hooks-{letter}\"\ntimeout = 2\n");
    start(a());
    start(b());
    create_on_a();
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    // The log once it has `count` lines (the target's aborted hooks run
    // after the source has its answer: they may still be under way).
    auto log_lines = [&](std::size_t count) {
        for (int i = 0; i < 200; ++i) {
            auto text = ferry::test::read_file(d + "/hooks.log");
            if (static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n')) >= count)
                break;
            std::this_thread::sleep_for(50ms);
        }
        std::vector<std::string> lines;
        std::istringstream in(ferry::test::read_file(d + "/hooks.log"));
        // Arguments and environment agree: "<node> <phase> <role> vm=demo id=<id> env=demo/<phase>/<role>/<id>".
        static const std::regex shape("(node-[ab]) ([a-z]+) (source|target) vm=demo id=(demo-[a-z0-9-]+) "
                                      "env=demo/\\2/\\3/\\4 pid=.*");
        for (std::string line; std::getline(in, line);) {
            EXPECT_TRUE(std::regex_match(line, shape)) << line;
            lines.push_back(line.substr(0, line.find(" vm=")));
        }
        std::filesystem::remove(d + "/hooks.log");
        return lines;
    };
    using Lines = std::vector<std::string>;

    // The target refuses in prepare: its message, the VM home, both sides' aborted.
    ferry::test::write_file(d + "/refuse", "");
    auto refused = ctl(a(), "migrate demo --to node-b --wait");
    EXPECT_NE(refused.status, 0);
    EXPECT_NE((refused.out + refused.err).find("hook 20-gate (prepare on the target node-b) exited with status 3: no bridge br-test "
                               "on node-b"),
              std::string::npos)
        << refused.out << refused.err;
    // Each node's aborted hooks run when it gives up: the two do not wait for each other.
    auto refused_lines = log_lines(4);
    ASSERT_EQ(refused_lines.size(), 4U);
    EXPECT_EQ(Lines(refused_lines.begin(), refused_lines.begin() + 2),
              (Lines{"node-a prepare source", "node-b prepare target"}));
    EXPECT_EQ(std::set<std::string>(refused_lines.begin() + 2, refused_lines.end()),
              (std::set<std::string>{"node-b aborted target", "node-a aborted source"}));
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"], pid);
    EXPECT_EQ(ctl_json(a(), "vm show demo")["status"], "running");
    EXPECT_TRUE(ctl_json(b(), "vm list").empty());
    std::filesystem::remove(d + "/refuse");

    // A hook past its 2 s: killed with the child it started; the VM stays.
    ferry::test::write_file(d + "/hang", "");
    auto hung = ctl(a(), "migrate demo --to node-b --wait");
    EXPECT_NE(hung.status, 0);
    EXPECT_NE((hung.out + hung.err).find("hook 20-gate (prepare on the target node-b) did not finish within 2000 ms; its process "
                            "group was killed"),
              std::string::npos)
        << hung.out << hung.err;
    EXPECT_EQ(sh("pgrep -f '[s]leep 987'", dir_).status, 1) << "the hook's child outlived its timeout";
    EXPECT_EQ(ctl_json(a(), "vm show demo")["pid"], pid);
    std::filesystem::remove(d + "/hang");
    // node-b holds the VM's name until its aborted hooks (10-record logs
    // first, 20-gate exits at once) are done.
    EXPECT_EQ(log_lines(4).size(), 4U);
    std::this_thread::sleep_for(500ms);

    // Success: the documented order, the input, and a late failure reported.
    auto done = ctl(a(), "migrate demo --to node-b --wait --json");
    ASSERT_EQ(done.status, 0) << done.out << done.err << ferry::test::read_file(d + "/node-b.log");
    auto m = json::parse(done.out);
    EXPECT_EQ(m["phase"], "Succeeded");
    auto id = m["id"].get<std::string>();
    ASSERT_EQ(m["warnings"].size(), 1U) << m.dump(2);
    EXPECT_EQ(m["warnings"][0], "hook 30-late (released on the source node-a) exited with status 1: route cleanup failed");
    auto lines = log_lines(5);
    EXPECT_EQ(lines, (Lines{"node-a prepare source", "node-b prepare target", "node-b launched target",
                            "node-b activated target", "node-a released source"}));
    auto on_b = ctl_json(b(), "vm show demo");
    auto launched = json::parse(ferry::test::read_file(d + "/input-node-b-launched.json"));
    EXPECT_EQ(launched["phase"], "launched");
    EXPECT_EQ(launched["role"], "target");
    EXPECT_EQ(launched["node"], "node-b");
    EXPECT_EQ(launched["migration"]["id"], id);
    EXPECT_EQ(launched["migration"]["source_node"], "node-a");
    EXPECT_EQ(launched["spec"]["name"], "demo");
    EXPECT_EQ(launched["qemu_pid"], on_b["pid"]) << "launched names the destination QEMU";
    auto released = json::parse(ferry::test::read_file(d + "/input-node-a-released.json"));
    EXPECT_EQ(released["role"], "source");
    EXPECT_TRUE(released["qemu_pid"].is_null()) << "the source QEMU is gone by released";
    EXPECT_EQ(released["migration"]["target_node"], "node-b");
    EXPECT_EQ(json::parse(ferry::test::read_file(d + "/input-node-b-activated.json"))["qemu_pid"], on_b["pid"]);
    EXPECT_FALSE(std::filesystem::exists(d + "/skipped.log")) << ferry::test::read_file(d + "/skipped.log");
    EXPECT_NE(ferry::test::read_file(d + "/node-a.log").find("hook 10-record (released on the source node-a) succeeded"),
              std::string::npos);
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
    EXPECT_FALSE(qemu_alive(pid));
}

// /metrics read by the Prometheus client library's own text parser: the
// counters match the migrations run, and a migration under way shows on
// both nodes with its rate.
TEST_F(TwoNodes, MetricsParseAsPrometheusTextAndCountTheMigrationsRun) {
    auto port_a = free_port(), port_b = free_port();
    configure("bandwidth_per_migration = \"2Mi\"",
              fmt::format("[metrics]\nlisten = \"127.0.0.1:{{port_{{letter}}}}\"\n"));
    for (auto [n, port] : {std::pair{&a(), port_a}, std::pair{&b(), port_b}}) {
        auto text = ferry::test::read_file(n->config);
        text = std::regex_replace(text, std::regex("\\{port_a\\}"), std::to_string(port_a));
        text = std::regex_replace(text, std::regex("\\{port_b\\}"), std::to_string(port_b));
        ferry::test::write_file(n->config, text);
    }
    ferry::test::write_file(dir_ / "scrape.py", R"(import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers["Content-Type"]
    text = r.read().decode()
out = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("id", "vm", "target_node"))
        out[f"{s.name}{{{labels}}}"] = out.get(f"{s.name}{{{labels}}}", 0) + s.value
    out["type:" + family.name] = family.type
print(json.dumps(out))
)");
    auto scrape = [&](unsigned short port) {
        auto o = sh(fmt::format("/usr/bin/python3 {} http://127.0.0.1:{}/metrics", dir_ / "scrape.py", port), dir_);
        EXPECT_EQ(o.status, 0) << o.out << o.err;
        return json::parse(o.out, nullptr, false);
    };
    start(a());
    start(b());
    create_on_a();
    auto idle = scrape(port_a);
    EXPECT_EQ(idle["ferry_migrations_total{mode=precopy,outcome=succeeded}"], 0) << idle.dump(1);
    EXPECT_EQ(idle["type:ferry_migrations"], "counter"); // the parser drops _total from the family name
    EXPECT_EQ(idle["type:ferry_migration_downtime_seconds"], "histogram");
    EXPECT_EQ(idle["ferry_vms{}"], 1);
    EXPECT_EQ(idle["ferry_node_admission{state=ready}"], 1);

    // Under way: both nodes show it; the shaper gives it its 2 MiB/s.
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    ASSERT_EQ(wait_running(a(), id), "Running");
    auto running = scrape(port_a);
    EXPECT_EQ(running["ferry_migrations_in_flight{direction=outbound}"], 1) << running.dump(1);
    EXPECT_GT(running["ferry_migration_remaining_bytes{}"].get<double>(), 0);
    EXPECT_EQ(running["ferry_migration_shaper_rate_bytes_per_second{}"], 2 << 20);
    EXPECT_EQ(scrape(port_b)["ferry_migrations_in_flight{direction=inbound}"], 1);
    ASSERT_EQ(ctl(a(), "migration abort " + id).status, 0);
    EXPECT_EQ(wait_final(a(), id)["phase"], "Failed");

    auto m = ctl_json(a(), "migrate demo --to node-b --bandwidth 1Gi --wait");
    ASSERT_EQ(m["phase"], "Succeeded") << m.dump(2);
    auto after = scrape(port_a);
    EXPECT_EQ(after["ferry_migrations_total{mode=precopy,outcome=succeeded}"], 1) << after.dump(1);
    EXPECT_EQ(after["ferry_migrations_total{mode=precopy,outcome=failed}"], 1);
    EXPECT_EQ(after["ferry_migrations_total{mode=postcopy,outcome=succeeded}"], 0);
    EXPECT_EQ(after["ferry_migration_downtime_seconds_count{mode=precopy}"], 1);
    EXPECT_EQ(after["ferry_migration_duration_seconds_count{mode=precopy}"], 1);
    EXPECT_EQ(after["ferry_migration_duration_seconds_bucket{le=+Inf,mode=precopy}"], 1);
    EXPECT_NEAR(after["ferry_migration_duration_seconds_sum{mode=precopy}"].get<double>(),
                m["result"]["total_time_ms"].get<double>() / 1000, 0.001);
    EXPECT_GE(after["ferry_migration_sent_bytes_total{}"].get<double>(),
              m["progress"]["transferred_bytes"].get<double>());
    EXPECT_EQ(after["ferry_migrations_in_flight{direction=outbound}"], 0);
    EXPECT_EQ(after["ferry_vms{}"], 0);
    EXPECT_EQ(scrape(port_b)["ferry_vms{}"], 1);
    // Peers: each node saw the other on a control channel (dialled or accepted).
    EXPECT_EQ(after["ferry_peer_up{peer=node-b}"], 1);
    EXPECT_GT(after["ferry_peer_last_contact_timestamp_seconds{peer=node-b}"].get<double>(), 1.7e9);
    EXPECT_EQ(after["ferry_peer_contact_failures_total{peer=node-b}"], 0);
    EXPECT_EQ(scrape(port_b)["ferry_peer_up{peer=node-a}"], 1);
    // node-b gone: the next contact (node list asks every peer) fails.
    stop(b(), SIGTERM);
    ctl(a(), "node list");
    auto lost = scrape(port_a);
    EXPECT_EQ(lost["ferry_peer_up{peer=node-b}"], 0) << lost.dump(1);
    EXPECT_GE(lost["ferry_peer_contact_failures_total{peer=node-b}"].get<double>(), 1);
    EXPECT_EQ(lost["ferry_peer_last_contact_timestamp_seconds{peer=node-b}"],
              after["ferry_peer_last_contact_timestamp_seconds{peer=node-b}"]);
    // Anything but GET /metrics gets a plain answer, not the metrics.
    auto other = sh(fmt::format("/usr/bin/python3 -c \"import urllib.request,sys\ntry:\n urllib.request.urlopen("
                                "'http://127.0.0.1:{}/other')\nexcept Exception as e: print(e)\"",
                                port_a),
                    dir_);
    EXPECT_NE(other.out.find("404"), std::string::npos) << other.out << other.err;
}

TEST_F(TwoNodes, MigratesWithTlsDisabledAndMultifd) {
    configure("bandwidth_per_migration = 0\ndisable_tls = true\nmultifd_channels = 3");
    start(a());
    start(b());
    EXPECT_NE(ferry::test::read_file(dir_ / "node-a.log").find("PLAIN TCP"), std::string::npos)
        << "plain TCP must be loudly logged";
    create_on_a();
    auto m = ctl(a(), "migrate demo --to node-b --wait");
    ASSERT_EQ(m.status, 0) << m.out << m.err << ferry::test::read_file(dir_ / "node-b.log");
    EXPECT_NE(ferry::test::read_file(dir_ / "node-a.log").find("\"multifd-bytes\": "), std::string::npos);
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
}

TEST_F(TwoNodes, TargetKilledMidMigrationLeavesTheVmOnTheSource) {
    auto m = start_slow_migration();
    stop(b(), SIGKILL);
    auto done = wait_final(a(), m.id);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_FALSE(done["failure_reason"].is_null());
    expect_home_on_a(m);
    // The target, restarted, removes the destination it had prepared.
    start(b());
    EXPECT_EQ(ctl_json(b(), "migration show " + m.id)["phase"], "Failed");
    expect_target_dropped(m);
}

TEST_F(TwoNodes, SourceKilledMidMigrationLeavesTheVmOnTheSource) {
    auto m = start_slow_migration();
    stop(a(), SIGKILL);
    // The target notices the lost control channel and drops the destination.
    expect_target_dropped(m);
    EXPECT_EQ(ctl_json(b(), "migration show " + m.id)["phase"], "Failed");
    EXPECT_TRUE(std::filesystem::exists(dir_ / "state-a/vms/demo/tunnel.sock")) << "nothing to clean up: no test";
    start(a());
    EXPECT_EQ(ctl_json(a(), "migration show " + m.id)["phase"], "Failed");
    expect_home_on_a(m);
    EXPECT_FALSE(std::filesystem::exists(dir_ / "state-a/vms/demo/tunnel.sock")) << "the dead ferryd's tunnel socket";
}

TEST_F(TwoNodes, AFrozenPeerIsDeclaredDeadAfterPeerTimeout) {
    auto m = start_slow_migration("peer_timeout = 8");
    // Frozen, not dead: its connections stay open but nothing answers.
    ::kill(b().pid, SIGSTOP);
    // Before giving up, the progress says how long the target is silent.
    json seen;
    std::string shown;
    for (int i = 0; i < 160 && shown.find("node-b has not answered for") == std::string::npos; ++i) {
        std::this_thread::sleep_for(50ms);
        shown = ctl(a(), "migration show " + m.id).out;
    }
    seen = ctl_json(a(), "migration show " + m.id); // after the text: the silence only grows until the end
    EXPECT_NE(shown.find("node-b has not answered for"), std::string::npos) << shown;
    EXPECT_NE(shown.find("(given up after 8 s)"), std::string::npos) << shown;
    EXPECT_GE(seen["progress"]["peer_silent_ms"].get<int>(), 1000) << seen.dump(2);
    auto done = wait_final(a(), m.id);
    ::kill(b().pid, SIGCONT);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_NE(done["failure_reason"].get<std::string>().find("lost node node-b"), std::string::npos)
        << done["failure_reason"];
    expect_home_on_a(m);
    // The target, thawed, finds the source gone and drops its destination.
    expect_target_dropped(m);
}

// --- convergence: a guest dirtying 3x faster than the channel carries -------

TEST_F(TwoNodes, WithoutHelpTheMigrationTimesOutNamingTheRates) {
    fast_dirtier("bandwidth_per_migration = \"16Mi\"\ncompletion_timeout_per_gib = 80"); // 10 s for 128 MiB
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    // Measured before migrating: the guest rewrites its 32 MiB working set,
    // so page sampling sees a rate above zero. How much depends on the CPU
    // the guest gets on a loaded machine, and sampling extrapolates (it can
    // read above the working set), so no tighter bound either way.
    auto rate = ctl_json(a(), "vm dirty-rate demo --seconds 1");
    EXPECT_GT(rate["dirty_rate_mib_s"].get<int>(), 0) << rate.dump();
    EXPECT_EQ(rate["mode"], "page-sampling");
    auto done = migrate_and_wait();
    EXPECT_EQ(done["phase"], "Failed");
    auto why = done["failure_reason"].get<std::string>();
    EXPECT_NE(why.find("completion timeout"), std::string::npos) << why;
    EXPECT_NE(why.find("dirty rate "), std::string::npos) << why;
    EXPECT_NE(why.find(" transfer rate "), std::string::npos) << why;
    EXPECT_NE(why.find("auto-converge and post-copy not allowed"), std::string::npos) << why;
    EXPECT_GT(done["progress"]["downtime_limit_ms"].get<int>(), 75) << "the strategy raised the downtime limit first";
    EXPECT_EQ(done["progress"]["converging"], false);
    expect_home_on_a({pid, done["id"].get<std::string>(), -1});
}

TEST_F(TwoNodes, AutoConvergeThrottlesTheVcpusUntilItConvergesAndReleasesThem) {
    fast_dirtier("bandwidth_per_migration = \"16Mi\"\nallow_auto_converge = true");
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    bool seen_throttled = false;
    json done;
    for (int i = 0; i < 1200; ++i) {
        seen_throttled = seen_throttled || vcpus_throttled(pid);
        done = ctl_json(a(), "migration show " + id);
        if (done["phase"] == "Succeeded" || done["phase"] == "Failed")
            break;
        std::this_thread::sleep_for(100ms);
    }
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-a.log");
    EXPECT_GT(done["progress"]["throttle_percent"].get<int>(), 0);
    EXPECT_TRUE(seen_throttled) << "the vCPU threads never were in ferry's throttle group";
    EXPECT_FALSE(std::filesystem::exists("/sys/fs/cgroup/cpu/ferry-throttle-demo")) << "throttle group left behind";
    EXPECT_NE(ferry::test::read_file(dir_ / "node-a.log").find("unthrottled"), std::string::npos);
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
}

TEST_F(TwoNodes, AFailedThrottledMigrationGivesTheVcpusBack) {
    fast_dirtier("bandwidth_per_migration = \"16Mi\"\nallow_auto_converge = true\ncompletion_timeout_per_gib = 64");
    auto pid = ctl_json(a(), "vm show demo")["pid"].get<int>();
    auto id = ctl_json(a(), "migrate demo --to node-b")["id"].get<std::string>();
    bool seen_throttled = false;
    for (int i = 0; i < 300 && !seen_throttled; ++i) {
        seen_throttled = vcpus_throttled(pid);
        std::this_thread::sleep_for(50ms);
    }
    auto done = wait_final(a(), id);
    // Either it failed by the 8 s timeout, or it converged first; in both
    // cases nothing may stay throttled.
    if (done["phase"] == "Failed") {
        EXPECT_NE(done["failure_reason"].get<std::string>().find("auto-converge at"), std::string::npos)
            << done["failure_reason"];
        EXPECT_FALSE(vcpus_throttled(pid)) << "the source's vCPUs are still throttled";
        expect_home_on_a({pid, id, -1});
    }
    EXPECT_TRUE(seen_throttled);
    EXPECT_FALSE(std::filesystem::exists("/sys/fs/cgroup/cpu/ferry-throttle-demo")) << "throttle group left behind";
}

TEST_F(TwoNodes, PostcopySwitchoverWhenPrecopyCannotConverge) {
    // Allowed for this migration only (the node's default is off). A
    // progress timeout shorter than two passes does not fail it: post-copy
    // comes first.
    fast_dirtier("bandwidth_per_migration = \"16Mi\"\nprogress_timeout = 2");
    auto done = migrate_and_wait(" --post-copy");
    EXPECT_EQ(done["config"]["allow_post_copy"], true);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-a.log");
    EXPECT_EQ(done["mode"], "postcopy");
    auto log = ferry::test::read_file(dir_ / "node-a.log");
    // The switch is ferry's decision, logged with its reason. Usually the
    // rates of the first measured pass decide it; on a busy machine the first
    // measurement can raise the downtime limit instead, and the next pass (or
    // the 2 s progress timeout) switches: post-copy either way, never a failure.
    auto decided = log.find("; switching to post-copy");
    ASSERT_NE(decided, std::string::npos) << log;
    auto start = log.rfind('\n', decided) + 1;
    auto line = log.substr(start, log.find('\n', decided) - start);
    EXPECT_TRUE(line.find("pre-copy will not converge") != std::string::npos ||
                line.find("progress timeout") != std::string::npos)
        << line;
    // QEMU's preempt channel went through a data channel of its own.
    EXPECT_NE(log.find("data channel 1 carries post-copy's urgent pages (preempt)"), std::string::npos) << log;
    EXPECT_EQ(ctl_json(b(), "vm show demo")["status"], "running");
    EXPECT_TRUE(ctl_json(a(), "vm list").empty());
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
}

TEST_F(TwoNodes, PostcopyRecoversAfterTheLinkIsCutAndRestored) {
    ferry::test::TcpProxy link(b().port);
    b_via_ = link.port();
    auto [source_pid, id] = start_slow_postcopy();
    ASSERT_FALSE(id.empty());
    link.cut();
    std::this_thread::sleep_for(3s);
    // Both halves are kept; neither side gives up, and abort is refused.
    auto target_pid = ctl_json(b(), "migration show " + id)["target_pid"].get<int>();
    EXPECT_TRUE(qemu_alive(source_pid));
    EXPECT_TRUE(qemu_alive(target_pid));
    EXPECT_EQ(ctl_json(a(), "migration show " + id)["phase"], "Switchover"); // the guest runs on node-b
    auto abort = ctl(a(), "migration abort " + id);
    EXPECT_NE(abort.status, 0);
    EXPECT_NE(abort.err.find("post-copy"), std::string::npos) << abort.err;
    link.restore();
    auto done = wait_final(a(), id);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2) << ferry::test::read_file(dir_ / "node-a.log");
    EXPECT_NE(ferry::test::read_file(dir_ / "node-a.log").find("post-copy resumed"), std::string::npos);
    EXPECT_EQ(ctl_json(b(), "vm show demo")["status"], "running");
    auto check = check_memory(b());
    EXPECT_EQ(check.status, 0) << check.out << check.err;
}

TEST_F(TwoNodes, ADestinationLostInPostcopyFailsAndNeverResumesTheSource) {
    auto [source_pid, id] = start_slow_postcopy();
    ASSERT_FALSE(id.empty());
    auto target_pid = ctl_json(b(), "migration show " + id)["target_pid"].get<int>();
    ASSERT_TRUE(qemu_alive(target_pid));
    ::kill(target_pid, SIGKILL); // the VM dies with it: post-copy cannot avoid that
    auto done = wait_final(a(), id);
    EXPECT_EQ(done["phase"], "Failed");
    auto why = done["failure_reason"].get<std::string>();
    EXPECT_NE(why.find("must not be resumed"), std::string::npos) << why;
    // The source keeps its (stale) copy paused: resuming it would run the
    // guest backwards in time.
    ASSERT_TRUE(qemu_alive(source_pid));
    auto status = ctl_json(a(), "vm qmp demo query-status");
    EXPECT_EQ(status["running"], false) << status.dump();
    EXPECT_EQ(ctl_json(b(), "migration show " + id)["phase"], "Failed");
}

// --- three nodes: the scheduler's cordon, drain and queue ----------------------

namespace {

class ThreeNodes : public NodeProcesses {
protected:
    void SetUp() override {
        auto pki = sh(ferry::test::ferryctl_bin() + " pki init --dir " + (dir_ / "pki") +
                          " --nodes node-a,node-b,node-c",
                      dir_);
        ASSERT_EQ(pki.status, 0) << pki.err;
        for (int i = 0; i < 3; ++i) {
            std::string letter(1, char('a' + i));
            nodes_[i] = {"node-" + letter, dir_ / (letter + ".sock"), dir_ / (letter + ".toml")};
            nodes_[i].port = free_port();
        }
    }
    void TearDown() override {
        for (auto& n : nodes_)
            stop(n, SIGTERM);
        ferry::test::kill_processes_mentioning(dir_.path() + "/");
    }
    // Every node with `migration` under [migration], the other two as peers.
    void configure(const std::string& migration) {
        for (int i = 0; i < 3; ++i) {
            auto& n = nodes_[i];
            std::string text = node_toml(n, migration);
            for (int j = 0; j < 3; ++j)
                if (j != i)
                    text += fmt::format("[[peers]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\n", nodes_[j].name,
                                        nodes_[j].port);
            ferry::test::write_file(n.config, text);
        }
    }
    // Small guests (64 MiB, 8 MiB working set: 2048 pages) on node `n`, each writing.
    void create_vms(Node& n, const std::vector<std::string>& names, const std::string& extra = "") {
        for (auto& name : names) {
            ferry::test::write_file(dir_ / (name + ".toml"),
                                    ferry::test::guest_spec(name, "64Mi", "ws=8 rate=2 hb=50", extra));
            ctl_json(n, "vm create --spec " + (dir_ / (name + ".toml")));
        }
        for (auto& name : names) {
            auto console = dir_ / ("state-" + n.name.substr(5) + "/vms/" + name + "/console.log");
            for (int i = 0; i < 400 && ferry::test::read_file(console).find("FERRY-HB 2 ") == std::string::npos; ++i)
                std::this_thread::sleep_for(50ms);
            ASSERT_NE(ferry::test::read_file(console).find("FERRY-HB 2 "), std::string::npos) << name;
        }
    }
    // The node VM `vm` runs on now ("" if none holds it).
    std::string where(const std::string& vm) {
        for (auto& n : nodes_)
            if (n.pid > 0)
                for (auto& v : ctl_json(n, "vm list"))
                    if (v.value("name", "") == vm)
                        return n.name;
        return "";
    }
    Node& node(const std::string& name) {
        for (auto& n : nodes_)
            if (n.name == name)
                return n;
        throw std::runtime_error("no node " + name);
    }
    Output check_memory(Node& n, const std::string& vm) {
        return sh(ferry::test::build_dir() + "/tools/guest/ferry-guest-check --socket " + n.socket + " --vm " + vm +
                      " --pages 2048 --dump " + (dir_ / "dump.bin"),
                  dir_);
    }
    // node-b's drain status once `count` of its VMs are in `state` (or the
    // last status after `limit`).
    json drain_when(const char* state, int count, std::chrono::seconds limit) {
        json s;
        for (auto end = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < end;) {
            s = ctl_json(b(), "node drain --status");
            if (s["drain"]["counts"].value(state, 0) == count)
                break;
            std::this_thread::sleep_for(100ms);
        }
        return s;
    }
    Node& a() { return nodes_[0]; }
    Node& b() { return nodes_[1]; }
    Node& c() { return nodes_[2]; }

    Node nodes_[3];
};

// Migration records as [created_at, ended_at] per source and target: at no
// moment more than the limits ran.
void expect_within_limits(const json& records, int outbound, int inbound, int cluster) {
    struct Span {
        std::string from, to, begin, end;
    };
    std::vector<Span> spans;
    for (auto& m : records)
        if (m.contains("ended_at") && m["ended_at"].is_string())
            spans.push_back({m["source_node"], m["target_node"], m["created_at"], m["ended_at"]});
    for (auto& s : spans) {
        // Every span that runs at the moment `s` begins.
        int out = 0, in = 0, all = 0;
        for (auto& t : spans)
            if (t.begin <= s.begin && s.begin < t.end) {
                ++all;
                out += t.from == s.from;
                in += t.to == s.to;
            }
        EXPECT_LE(out, outbound) << "outbound of " << s.from << " at " << s.begin;
        EXPECT_LE(in, inbound) << "inbound of " << s.to << " at " << s.begin;
        EXPECT_LE(all, cluster) << "in the cluster at " << s.begin;
    }
}

} // namespace

TEST_F(ThreeNodes, DrainMovesEveryVmUnderTheLimitsAndReportsTheOneThatFitsNowhere) {
    configure("parallel_outbound_migrations_per_node = 1\nparallel_inbound_migrations_per_node = 1\n"
              "parallel_migrations_per_cluster = 2\n");
    for (auto& n : nodes_)
        ASSERT_NO_FATAL_FAILURE(start(n));
    std::vector<std::string> vms{"vm1", "vm2", "vm3", "vm4", "vm5", "vm6"};
    ASSERT_NO_FATAL_FAILURE(create_vms(b(), vms));
    ASSERT_NO_FATAL_FAILURE(create_vms(b(), {"picky"}, "node_selector = { zone = \"nowhere\" }\n"));

    // Asked on node-a, carried out by node-b: the pre-flight says what cannot go.
    auto started = ctl_json(a(), "node drain node-b");
    EXPECT_EQ(started["state"], "draining") << started;
    EXPECT_EQ(started["preflight"]["vms"], 7);
    EXPECT_EQ(started["preflight"]["fit_elsewhere"], 6);
    ASSERT_EQ(started["preflight"]["no_room"].size(), 1U) << started;
    EXPECT_EQ(started["preflight"]["no_room"][0]["vm"], "picky");
    // Cordoned at once: nothing is placed on it, and node list says so.
    auto nodes = ctl_json(a(), "node list");
    EXPECT_EQ(nodes[1]["name"], "node-b");
    EXPECT_EQ(nodes[1]["state"], "draining");

    // The six move; picky waits, with its reason.
    auto s = drain_when("moved", 6, 240s);
    ASSERT_EQ(s["drain"]["counts"].value("moved", 0), 6) << s.dump(2) << ferry::test::read_file(dir_ / "node-b.log");
    EXPECT_EQ(s["drain"]["state"], "running");
    // Its reason is the next planning pass's, once the last slot is free.
    json picky = json::object();
    for (int i = 0; i < 100; ++i) {
        auto status = ctl_json(b(), "node drain --status"); // kept: the loop below reads into it
        for (auto& v : status["drain"]["vms"])
            if (v["name"] == "picky")
                picky = v;
        if (picky.value("reason", "").find("node_selector zone=nowhere") != std::string::npos)
            break;
        std::this_thread::sleep_for(100ms);
    }
    EXPECT_EQ(picky["state"], "waiting");
    EXPECT_NE(picky.value("reason", "").find("node_selector zone=nowhere"), std::string::npos) << picky;
    auto human = ctl(c(), "node drain --status node-b");
    EXPECT_NE(human.out.find("node-b: drain running: 6 moved, 0 migrating, 1 waiting"), std::string::npos) << human.out;

    // Every VM runs elsewhere, whole.
    for (auto& vm : vms) {
        auto at = where(vm);
        ASSERT_TRUE(at == "node-a" || at == "node-c") << vm << " is on '" << at << "'";
        auto check = check_memory(node(at), vm);
        EXPECT_EQ(check.status, 0) << vm << ": " << check.out << check.err;
    }
    EXPECT_EQ(where("picky"), "node-b");
    // The records show the limits held: one out of node-b, one into each, two in all.
    expect_within_limits(ctl_json(b(), "migration list"), 1, 1, 2);

    // Uncordon ends it: picky is reported, not moved.
    auto un = ctl_json(a(), "node uncordon node-b");
    EXPECT_EQ(un["state"], "ready");
    EXPECT_EQ(un["drain"]["state"], "cancelled");
    EXPECT_EQ(un["drain"]["counts"]["not_moved"], 1);
    EXPECT_EQ(ctl_json(b(), "vm show picky")["status"], "running");
    for (auto& vm : vms)
        ctl(node(where(vm)), "vm delete " + vm);
    ctl(b(), "vm delete picky");
}

TEST_F(ThreeNodes, UncordonMidDrainCancelsWhatHasNotStartedAndACordonedNodeTakesNothing) {
    configure("bandwidth_per_migration = \"4Mi\"\n");
    for (auto& n : nodes_)
        ASSERT_NO_FATAL_FAILURE(start(n));
    ASSERT_NO_FATAL_FAILURE(create_vms(b(), {"vm1", "vm2", "vm3"}));
    // node-c cordoned: placement skips it, and sent there anyway it refuses.
    EXPECT_EQ(ctl_json(a(), "node cordon node-c")["state"], "cordoned");
    auto o = ctl(b(), "--json migrate vm3 --to node-c --wait");
    EXPECT_EQ(o.status, 1) << o.err;
    auto refused = json::parse(o.out, nullptr, false);
    EXPECT_EQ(refused["phase"], "Failed");
    EXPECT_NE(refused.value("failure_reason", "").find("node-c is cordoned: it takes no migrations in"),
              std::string::npos)
        << refused;
    EXPECT_EQ(ctl_json(b(), "vm show vm3")["status"], "running");

    auto started = ctl_json(b(), "node drain --max-parallel 1");
    EXPECT_EQ(started["drain"]["max_parallel"], 1);
    // One migrates (to node-a: node-c is cordoned), the others wait for it.
    auto s = drain_when("migrating", 1, 30s);
    ASSERT_EQ(s["drain"]["counts"].value("migrating", 0), 1) << s.dump(2);
    EXPECT_EQ(s["drain"]["counts"].value("waiting", 0), 2);
    std::string moving;
    for (auto& v : s["drain"]["vms"]) {
        if (v["state"] == "migrating") {
            moving = v["name"];
            EXPECT_EQ(v["target"], "node-a");
        } else {
            EXPECT_EQ(v.value("reason", ""), "max-parallel 1/1") << v;
        }
    }
    auto un = ctl_json(b(), "node uncordon");
    EXPECT_EQ(un["drain"]["state"], "cancelled");
    EXPECT_EQ(un["drain"]["counts"].value("not_moved", 0), 2);
    // The one under way finishes; the others stay on node-b, running.
    for (int i = 0; i < 600 && where(moving) != "node-a"; ++i)
        std::this_thread::sleep_for(100ms);
    EXPECT_EQ(where(moving), "node-a");
    auto check = check_memory(a(), moving);
    EXPECT_EQ(check.status, 0) << check.out << check.err;
    std::this_thread::sleep_for(2s); // nothing else starts
    int on_b = 0;
    for (auto& v : ctl_json(b(), "vm list"))
        on_b += v["status"] == "running";
    EXPECT_EQ(on_b, 2);
    s = ctl_json(b(), "node drain --status");
    EXPECT_EQ(s["drain"]["counts"].value("moved", 0), 1) << s.dump(2);
    EXPECT_EQ(s["state"], "ready");
}

TEST_F(ThreeNodes, ADrainSurvivesARestartOfItsPlannerAndCompletes) {
    configure("bandwidth_per_migration = \"4Mi\"\nparallel_outbound_migrations_per_node = 1\n");
    for (auto& n : nodes_)
        ASSERT_NO_FATAL_FAILURE(start(n));
    ASSERT_NO_FATAL_FAILURE(create_vms(b(), {"vm1", "vm2", "vm3"}));
    ctl_json(b(), "node drain");
    auto s = drain_when("migrating", 1, 30s);
    ASSERT_EQ(s["drain"]["counts"].value("migrating", 0), 1) << s.dump(2);
    // node-b's ferryd dies mid-migration; its guests run on.
    stop(b(), SIGKILL);
    std::this_thread::sleep_for(500ms);
    ASSERT_NO_FATAL_FAILURE(start(b()));
    auto waited = ctl(b(), "node drain --status --wait");
    EXPECT_EQ(waited.status, 0) << waited.out << waited.err << ferry::test::read_file(dir_ / "node-b.log");
    EXPECT_NE(waited.out.find("drain completed: 3 moved"), std::string::npos) << waited.out;
    s = ctl_json(b(), "node drain --status");
    EXPECT_EQ(s["drain"]["state"], "completed") << s.dump(2);
    EXPECT_EQ(s["state"], "cordoned") << "a drained node stays cordoned";
    for (auto& vm : {"vm1", "vm2", "vm3"}) {
        auto at = where(vm);
        ASSERT_TRUE(at == "node-a" || at == "node-c") << vm << " is on '" << at << "'";
        auto check = check_memory(node(at), vm);
        EXPECT_EQ(check.status, 0) << vm << ": " << check.out << check.err;
    }
    EXPECT_NE(ferry::test::read_file(dir_ / "node-b.log").find("carrying on the drain of node-b"), std::string::npos);
}
