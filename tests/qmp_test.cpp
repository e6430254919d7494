// src/qmp: unit tests against a scripted fake QMP server, integration tests
// against a real QEMU.
#include "qmp/client.hpp"
#include "support.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <sys/socket.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ferry::Errc;
using ferry::qmp::Client;
using ferry::qmp::json;
using ferry::test::run;
using ferry::test::TempDir;

namespace {

// One connection of the fake server, with blocking I/O.
class Conn {
public:
    explicit Conn(int fd) : fd_(fd) {}
    ~Conn() { close(); }
    void send(const std::string& text) {
        std::string s = text;
        ::send(fd_, s.data(), s.size(), MSG_NOSIGNAL);
    }
    void send_json(const json& j) { send(j.dump() + "\n"); }
    // Reads one line; also returns a passed fd, if any.
    std::string recv_line(int* passed_fd = nullptr) {
        std::string line;
        char c;
        for (;;) {
            char control[CMSG_SPACE(sizeof(int))];
            iovec iov{&c, 1};
            msghdr msg{};
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control;
            msg.msg_controllen = sizeof(control);
            ssize_t n = ::recvmsg(fd_, &msg, 0);
            if (n <= 0)
                return line;
            for (cmsghdr* h = CMSG_FIRSTHDR(&msg); h; h = CMSG_NXTHDR(&msg, h))
                if (h->cmsg_type == SCM_RIGHTS && passed_fd)
                    std::memcpy(passed_fd, CMSG_DATA(h), sizeof(int));
            if (c == '\n')
                return line;
            line += c;
        }
    }
    json recv_json(int* passed_fd = nullptr) { return json::parse(recv_line(passed_fd)); }
    void handshake() {
        send(R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}})" "\n");
        auto j = recv_json();
        send_json(json{{"return", json::object()}, {"id", j["id"]}});
    }
    void close() {
        if (fd_ >= 0)
            ::close(fd_);
        fd_ = -1;
    }

private:
    int fd_;
};

// A fake QMP server that runs one script on one connection in a thread.
class FakeQmp {
public:
    explicit FakeQmp(std::function<void(Conn&)> script) : path_(dir_ / "qmp.sock") {
        listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::strncpy(addr.sun_path, path_.c_str(), sizeof(addr.sun_path) - 1);
        if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(listen_fd_, 1) != 0)
            throw std::runtime_error("fake QMP: cannot listen");
        thread_ = std::thread([this, script] {
            int fd = ::accept(listen_fd_, nullptr, nullptr);
            if (fd < 0)
                return;
            Conn conn(fd);
            script(conn);
        });
    }
    ~FakeQmp() {
        ::shutdown(listen_fd_, SHUT_RDWR);
        ::close(listen_fd_);
        thread_.join();
    }
    const std::string& path() const { return path_; }

private:
    TempDir dir_;
    std::string path_;
    int listen_fd_ = -1;
    std::thread thread_;
};

asio::awaitable<ferry::Result<std::shared_ptr<Client>>> connect(std::string path,
                                                                std::chrono::milliseconds timeout = 2s) {
    co_return co_await Client::connect(co_await asio::this_coro::executor, path, timeout);
}

asio::awaitable<ferry::Result<json>> exec(std::shared_ptr<Client> c, std::string cmd,
                                          std::chrono::milliseconds timeout = 2s) {
    co_return co_await c->execute(cmd, json::object(), timeout);
}

// Two commands in flight at once; the server answers them in reverse order.
asio::awaitable<std::pair<ferry::Result<json>, ferry::Result<json>>> two_at_once(std::shared_ptr<Client> c) {
    auto ex = co_await asio::this_coro::executor;
    auto f1 = asio::co_spawn(ex, exec(c, "first"), asio::use_future);
    auto second = co_await exec(c, "second");
    asio::steady_timer t(ex);
    while (f1.wait_for(0s) != std::future_status::ready) {
        t.expires_after(5ms);
        co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    co_return std::make_pair(f1.get(), std::move(second));
}

} // namespace

TEST(QmpClient, MatchesRepliesById) {
    FakeQmp server([](Conn& c) {
        c.handshake();
        auto a = c.recv_json();
        auto b = c.recv_json();
        c.send_json(json{{"return", {{"cmd", b["execute"]}}}, {"id", b["id"]}});
        c.send_json(json{{"return", {{"cmd", a["execute"]}}}, {"id", a["id"]}});
        c.recv_line();
    });
    asio::io_context io;
    auto client = run(io, connect(server.path()));
    ASSERT_TRUE(client) << client.error().message;
    auto [first, second] = run(io, two_at_once(*client));
    ASSERT_TRUE(first) << first.error().message;
    ASSERT_TRUE(second) << second.error().message;
    EXPECT_EQ((*first)["cmd"], "first");
    EXPECT_EQ((*second)["cmd"], "second");
    (*client)->close();
}

TEST(QmpClient, SurfacesQemuErrorClassAndDescription) {
    FakeQmp server([](Conn& c) {
        c.handshake();
        auto a = c.recv_json();
        c.send_json(json{{"error", {{"class", "CommandNotFound"}, {"desc", "The command nope has not been found"}}},
                    {"id", a["id"]}});
        c.recv_line();
    });
    asio::io_context io;
    auto client = run(io, connect(server.path()));
    ASSERT_TRUE(client);
    auto r = run(io, exec(*client, "nope"));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, Errc::qemu);
    EXPECT_EQ(r.error().message, "nope: CommandNotFound: The command nope has not been found");
    (*client)->close();
}

TEST(QmpClient, DeliversEventsToSubscribersAndWaiters) {
    FakeQmp server([](Conn& c) {
        c.handshake();
        auto a = c.recv_json();
        c.send(R"({"timestamp": {"seconds": 10, "microseconds": 5}, "event": "STOP"})" "\n");
        c.send(R"({"timestamp": {"seconds": 11, "microseconds": 0}, "event": "MIGRATION", "data": {"status": "active"}})" "\n");
        c.send_json(json{{"return", json::object()}, {"id", a["id"]}});
        c.recv_line();
    });
    asio::io_context io;
    auto client = run(io, connect(server.path()));
    ASSERT_TRUE(client);
    std::vector<std::string> seen;
    (*client)->subscribe([&](const ferry::qmp::Event& e) { seen.push_back(e.name); });
    auto r = run(io, exec(*client, "cont"));
    ASSERT_TRUE(r);
    ASSERT_EQ(seen.size(), 2U);
    EXPECT_EQ(seen[0], "STOP");
    EXPECT_EQ(seen[1], "MIGRATION");
    (*client)->close();
}

TEST(QmpClient, WaitEventMatchesPredicate) {
    FakeQmp server([](Conn& c) {
        c.handshake();
        std::this_thread::sleep_for(50ms);
        c.send(R"({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}})" "\n");
        c.send(R"({"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": {"seconds": 2, "microseconds": 0}})" "\n");
        c.recv_line();
    });
    asio::io_context io;
    auto client = run(io, connect(server.path()));
    ASSERT_TRUE(client);
    auto ev = run(io, [](std::shared_ptr<Client> c) -> asio::awaitable<ferry::Result<ferry::qmp::Event>> {
        co_return co_await c->wait_event(
            [](const ferry::qmp::Event& e) { return e.name == "MIGRATION"; }, 2s);
    }(*client));
    ASSERT_TRUE(ev) << ev.error().message;
    EXPECT_EQ(ev->data["status"], "completed");
    EXPECT_EQ(ev->timestamp_us, 2'000'000);
    (*client)->close();
}

TEST(QmpClient, MalformedJsonFailsWaitersWithProtocolError) {
    FakeQmp server([](Conn& c) {
        c.handshake();
        c.recv_json();
        c.send("{\"return\": {oops\n");
        c.recv_line();
    });
    asio::io_context io;
    auto client = run(io, connect(server.path()));
    ASSERT_TRUE(client);
    bool closed = false;
    (*client)->on_close([&](const ferry::Error& e) { closed = e.code == Errc::protocol; });
    auto r = run(io, exec(*client, "query-status"));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, Errc::protocol);
    EXPECT_NE(r.error().message.find("not valid JSON"), std::string::npos) << r.error().message;
    EXPECT_TRUE(closed);
    EXPECT_FALSE((*client)->connected());
}

TEST(QmpClient, ReplyThatNeverComesTimesOutAndClientStaysUsable) {
    FakeQmp server([](Conn& c) {
        c.handshake();
        c.recv_json(); // ignored: never answered
        auto b = c.recv_json();
        c.send_json(json{{"return", {{"ok", true}}}, {"id", b["id"]}});
        c.recv_line();
    });
    asio::io_context io;
    auto client = run(io, connect(server.path()));
    ASSERT_TRUE(client);
    auto r = run(io, exec(*client, "query-migrate", 200ms));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, Errc::timeout);
    EXPECT_NE(r.error().message.find("query-migrate: no reply"), std::string::npos);
    auto again = run(io, exec(*client, "query-status"));
    ASSERT_TRUE(again) << again.error().message;
    EXPECT_TRUE((*again)["ok"]);
    (*client)->close();
}

TEST(QmpClient, SocketClosedMidReplyFailsEveryWaiter) {
    FakeQmp server([](Conn& c) {
        c.handshake();
        c.recv_json();
        c.send("{\"return\": {\"status\": \"runn");
        c.close();
    });
    asio::io_context io;
    auto client = run(io, connect(server.path()));
    ASSERT_TRUE(client);
    auto r = run(io, exec(*client, "query-status"));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, Errc::disconnected);
    EXPECT_NE(r.error().message.find("lost"), std::string::npos) << r.error().message;
    auto after = run(io, exec(*client, "query-status"));
    ASSERT_FALSE(after);
    EXPECT_EQ(after.error().code, Errc::disconnected);
}

TEST(QmpClient, GreetingThatNeverComesTimesOut) {
    FakeQmp server([](Conn& c) { c.recv_line(); });
    asio::io_context io;
    auto client = run(io, connect(server.path(), 200ms));
    ASSERT_FALSE(client);
    EXPECT_EQ(client.error().code, Errc::timeout);
}

TEST(QmpClient, ConnectToMissingSocketFails) {
    asio::io_context io;
    auto client = run(io, connect("/tmp/no-such-ferry-socket"));
    ASSERT_FALSE(client);
    EXPECT_EQ(client.error().code, Errc::io);
    EXPECT_NE(client.error().message.find("/tmp/no-such-ferry-socket"), std::string::npos);
}

TEST(QmpClient, PassesFileDescriptors) {
    int received = -1;
    FakeQmp server([&](Conn& c) {
        c.handshake();
        auto a = c.recv_json(&received);
        c.send_json(json{{"return", json::object()}, {"id", a["id"]}});
        c.recv_line();
    });
    int pipefd[2];
    ASSERT_EQ(::pipe(pipefd), 0);
    asio::io_context io;
    auto client = run(io, connect(server.path()));
    ASSERT_TRUE(client);
    auto r = run(io, [](std::shared_ptr<Client> c, int fd) -> asio::awaitable<ferry::Result<json>> {
        json args{{"fdname", "mig"}};
        co_return co_await c->execute_with_fd("getfd", args, fd);
    }(*client, pipefd[1]));
    ASSERT_TRUE(r) << r.error().message;
    ASSERT_GE(received, 0);
    // The passed descriptor is the pipe's write end.
    ASSERT_EQ(::write(received, "x", 1), 1);
    char c = 0;
    ASSERT_EQ(::read(pipefd[0], &c, 1), 1);
    EXPECT_EQ(c, 'x');
    ::close(received);
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    (*client)->close();
}

// --- integration: a real QEMU ----------------------------------------------

class RealQemu : public ::testing::Test {
protected:
    void SetUp() override {
        qmp_ = dir_ / "qmp.sock";
        pid_ = ::fork();
        if (pid_ == 0) {
            ::execlp("qemu-system-x86_64", "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "64M",
                     "-nodefaults", "-display", "none", "-S", "-qmp",
                     ("unix:" + qmp_ + ",server=on,wait=off").c_str(), nullptr);
            _exit(127);
        }
    }
    void TearDown() override {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
    }
    asio::io_context io_;
    TempDir dir_;
    std::string qmp_;
    pid_t pid_ = -1;
};

asio::awaitable<ferry::Result<std::shared_ptr<Client>>> connect_retry(std::string path) {
    co_return co_await Client::connect_retry(co_await asio::this_coro::executor, path, 20s);
}

TEST_F(RealQemu, NegotiatesRunsCommandsAndGetsEvents) {
    auto client = run(io_, connect_retry(qmp_));
    ASSERT_TRUE(client) << client.error().message << " (is qemu-system-x86_64 installed? scripts/setup installs it)";
    auto& c = *client;
    EXPECT_EQ(c->greeting()["version"]["qemu"]["major"].get<int>() >= 7, true);
    EXPECT_EQ(c->peer_pid(), pid_);
    auto status = run(io_, exec(c, "query-status"));
    ASSERT_TRUE(status) << status.error().message;
    EXPECT_EQ((*status)["status"], "prelaunch");

    std::vector<std::string> events;
    c->subscribe([&](const ferry::qmp::Event& e) { events.push_back(e.name); });
    ASSERT_TRUE(run(io_, exec(c, "cont")));
    ferry::test::pump(io_, 200ms);
    ASSERT_FALSE(events.empty());
    EXPECT_EQ(events[0], "RESUME");

    auto missing = run(io_, exec(c, "no-such-command"));
    ASSERT_FALSE(missing);
    EXPECT_EQ(missing.error().code, Errc::qemu);
    EXPECT_NE(missing.error().message.find("CommandNotFound"), std::string::npos);
}

TEST_F(RealQemu, GetfdHandsQemuADescriptor) {
    auto client = run(io_, connect_retry(qmp_));
    ASSERT_TRUE(client) << client.error().message;
    int pipefd[2];
    ASSERT_EQ(::pipe(pipefd), 0);
    auto r = run(io_, [](std::shared_ptr<Client> c, int fd) -> asio::awaitable<ferry::Result<json>> {
        json args{{"fdname", "ferry-test"}};
        co_return co_await c->execute_with_fd("getfd", args, fd);
    }(*client, pipefd[1]));
    ASSERT_TRUE(r) << r.error().message;
    // QEMU now holds the fd under that name: closefd succeeds once, then fails.
    auto close1 = run(io_, [](std::shared_ptr<Client> c) -> asio::awaitable<ferry::Result<json>> {
        json args{{"fdname", "ferry-test"}};
        co_return co_await c->execute("closefd", args);
    }(*client));
    EXPECT_TRUE(close1) << close1.error().message;
    auto close2 = run(io_, [](std::shared_ptr<Client> c) -> asio::awaitable<ferry::Result<json>> {
        json args{{"fdname", "ferry-test"}};
        co_return co_await c->execute("closefd", args);
    }(*client));
    EXPECT_FALSE(close2);
    ::close(pipefd[0]);
    ::close(pipefd[1]);
}

TEST_F(RealQemu, QemuExitFailsPendingCommand) {
    auto client = run(io_, connect_retry(qmp_));
    ASSERT_TRUE(client) << client.error().message;
    bool closed = false;
    (*client)->on_close([&](const ferry::Error&) { closed = true; });
    auto r = run(io_, exec(*client, "quit"));
    ferry::test::pump(io_, 300ms);
    EXPECT_TRUE(closed);
    auto after = run(io_, exec(*client, "query-status"));
    ASSERT_FALSE(after);
    EXPECT_EQ(after.error().code, Errc::disconnected);
}

TEST(QmpMessage, DecodesWithoutThrowingOnOddShapes) {
    using ferry::qmp::decode_message;
    using Kind = ferry::qmp::Message::Kind;
    auto ev = decode_message(R"({"event":"STOP","timestamp":{"seconds":1700000000,"microseconds":5}})");
    ASSERT_TRUE(ev);
    EXPECT_EQ(ev->kind, Kind::event);
    EXPECT_EQ(ev->event.timestamp_us, 1700000000LL * 1000000 + 5);
    // Found by fuzzing: a timestamp past what microseconds hold overflowed.
    auto far = decode_message(R"({"event":"STOP","timestamp":{"seconds":170060000023455}})");
    ASSERT_TRUE(far);
    EXPECT_EQ(far->event.timestamp_us, 0);
    auto odd = decode_message(R"({"id":1,"error":"boom"})");
    ASSERT_TRUE(odd);
    EXPECT_EQ(ferry::qmp::qemu_error("x", *odd->error).message, "x: \"boom\"");
    EXPECT_FALSE(decode_message(R"({"event":5})"));
    auto unmatched = decode_message(R"({"return":{},"id":"a"})");
    ASSERT_TRUE(unmatched);
    EXPECT_EQ(unmatched->kind, Kind::unmatched);
}
