// src/transport: framing, tokens, shaping and PKI as units; the peer
// endpoint's security against real TLS clients over loopback.
#include "support.hpp"
#include "common/fd.hpp"
#include "transport/disk_record.hpp"
#include "transport/frame.hpp"
#include "transport/peer_server.hpp"
#include "transport/pki.hpp"
#include "transport/shaper.hpp"
#include "transport/tokens.hpp"
#include "transport/tunnel.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/use_future.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <openssl/ssl.h>

#include <arpa/inet.h>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <functional>
#include <future>
#include <netinet/in.h>
#include <optional>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <thread>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using namespace ferry::transport;
using ferry::test::run;
using ferry::test::TempDir;
using nlohmann::json;

// --- framing -----------------------------------------------------------------

TEST(Frame, RoundTripsInPieces) {
    auto bytes = encode_frame({{"type", "ping"}, {"n", 1}}) + encode_frame({{"type", "pong"}});
    FrameDecoder d;
    for (char c : bytes) {
        d.feed(&c, 1); // one byte at a time
    }
    auto a = d.next();
    ASSERT_TRUE(a && *a);
    EXPECT_EQ((**a)["type"], "ping");
    auto b = d.next();
    ASSERT_TRUE(b && *b);
    EXPECT_EQ((**b)["type"], "pong");
    EXPECT_FALSE(d.next());
}

TEST(Frame, RejectsOversizeAndGarbage) {
    FrameDecoder big;
    std::string header = "\x7f\xff\xff\xff";
    big.feed(header.data(), 4);
    auto r = big.next();
    ASSERT_TRUE(r);
    EXPECT_FALSE(*r);
    EXPECT_FALSE(*big.next()) << "a broken stream stays broken";

    FrameDecoder garbage;
    std::string g = std::string("\0\0\0\x05", 4) + "hello";
    garbage.feed(g.data(), g.size());
    auto gr = garbage.next();
    ASSERT_TRUE(gr);
    EXPECT_FALSE(*gr);

    FrameDecoder typeless;
    auto t = encode_frame({{"no_type", 1}});
    typeless.feed(t.data(), t.size());
    EXPECT_FALSE(*typeless.next());

    // Nesting is bounded before the parser recurses.
    FrameDecoder deep;
    std::string body = std::string(5000, '[') + std::string(5000, ']');
    std::string frame = {0, 0, static_cast<char>(body.size() >> 8), static_cast<char>(body.size() & 0xff)};
    frame += body;
    deep.feed(frame.data(), frame.size());
    auto d = deep.next();
    ASSERT_TRUE(d);
    ASSERT_FALSE(*d);
    EXPECT_NE(d->error().message.find("nested deeper than 32"), std::string::npos) << d->error().message;
}

// --- tokens ------------------------------------------------------------------

TEST(DiskRecord, RoundTripsEveryKind) {
    using K = DiskRecordKind;
    for (auto r : {DiskRecord{K::data, 3, 1, 4096, max_disk_payload, 2}, DiskRecord{K::zero, 0, 2, 1ULL << 40, 1ULL << 33, 7},
                   DiskRecord{K::round_end, 63, 3, 0, 0, 9}, DiskRecord{K::ack, 0, ~0ULL, 0, 0, 0},
                   DiskRecord{K::end, 0, 5, 0, 0, 0}}) {
        auto bytes = encode_disk_record(r);
        auto back = decode_disk_record(bytes);
        ASSERT_TRUE(back) << back.error().message;
        EXPECT_EQ(*back, r) << to_string(r.kind);
    }
}

TEST(DiskRecord, RejectsWhatAHeaderCanGetWrong) {
    auto why = [](DiskRecord r, std::function<void(std::array<std::byte, disk_record_size>&)> poke = {}) {
        auto bytes = encode_disk_record(r);
        if (poke)
            poke(bytes);
        auto d = decode_disk_record(bytes);
        return d ? std::string("accepted") : d.error().message;
    };
    using K = DiskRecordKind;
    EXPECT_NE(why({K::data, 0, 1, 0, 0, 1}).find("a data record of 0 bytes"), std::string::npos);
    EXPECT_NE(why({K::data, 0, 1, 0, max_disk_payload + 1, 1}).find("a data record of"), std::string::npos);
    EXPECT_NE(why({K::zero, 0, 1, 0, 0, 1}).find("empty zero record"), std::string::npos);
    EXPECT_NE(why({K::ack, 0, 1, 5, 0, 1}).find("ack record with an offset"), std::string::npos);
    EXPECT_NE(why({K::end, 0, 1, 0, 7, 0}).find("end record with an offset or length"), std::string::npos);
    EXPECT_NE(why({K::zero, 0, 1, ~0ULL - 10, 4096, 1}).find("overflows"), std::string::npos);
    EXPECT_NE(why({K::zero, max_disks, 1, 0, 1, 1}).find("at most 64 disks"), std::string::npos);
    EXPECT_NE(why({K::zero, 0, 1, 0, 1, 1}, [](auto& b) { b[0] = std::byte{'X'}; }).find("bad magic"),
              std::string::npos);
    EXPECT_NE(why({K::zero, 0, 1, 0, 1, 1}, [](auto& b) { b[2] = std::byte{9}; }).find("unknown record kind 9"),
              std::string::npos);
    EXPECT_NE(why({K::zero, 0, 1, 0, 1, 1}, [](auto& b) { b[39] = std::byte{1}; }).find("reserved"),
              std::string::npos);
    std::array<std::byte, 12> short_header{};
    auto s = decode_disk_record(short_header);
    ASSERT_FALSE(s);
    EXPECT_EQ(s.error().code, ferry::Errc::protocol);
}

TEST(Tokens, SingleUseAndRevocable) {
    TokenRegistry reg;
    auto t0 = reg.issue("m1", 0);
    auto t1 = reg.issue("m1", 1);
    auto other = reg.issue("m2", 0);
    EXPECT_EQ(t0.size(), 64U);
    EXPECT_NE(t0, t1);
    auto g = reg.redeem(t1);
    ASSERT_TRUE(g);
    EXPECT_EQ(g->migration, "m1");
    EXPECT_EQ(g->index, 1);
    EXPECT_FALSE(reg.redeem(t1)) << "a token admits one channel only";
    EXPECT_FALSE(reg.redeem("forged"));
    reg.revoke("m1");
    EXPECT_FALSE(reg.redeem(t0));
    EXPECT_TRUE(reg.redeem(other));
}

// --- shaping -----------------------------------------------------------------

TEST(TokenBucket, PacesToTheRate) {
    auto t = ShaperClock::now();
    TokenBucket b(1 << 20); // 1 MiB/s, burst 256 KiB
    b.set_rate(1 << 20, t);
    EXPECT_EQ(b.take(128 << 10, t).count(), 0) << "within the burst";
    EXPECT_EQ(b.take(128 << 10, t).count(), 0);
    // The next MiB must wait one second.
    auto wait = b.take(1 << 20, t);
    EXPECT_NEAR(std::chrono::duration<double>(wait).count(), 1.0, 0.01);
    // Half a second later half of that debt is paid.
    auto later = b.take(0, t + 500ms);
    EXPECT_NEAR(std::chrono::duration<double>(later).count(), 0.5, 0.01);
    TokenBucket unlimited(0);
    EXPECT_EQ(unlimited.take(1ULL << 30, t).count(), 0);
}

TEST(NodeShaper, SharesTheCapFairlyAndAdjustsLive) {
    NodeShaper s(100 << 20);
    s.add("a", 0);
    EXPECT_EQ(s.rate_of("a"), 100U << 20);
    s.add("b", 0);
    EXPECT_EQ(s.rate_of("a"), 50U << 20);
    EXPECT_EQ(s.rate_of("b"), 50U << 20);
    s.add("c", 10 << 20); // limited below its share: keeps its limit
    EXPECT_EQ(s.rate_of("c"), 10U << 20);
    EXPECT_EQ(s.rate_of("a"), 45U << 20);
    s.remove("b");
    EXPECT_EQ(s.rate_of("a"), 90U << 20);
    NodeShaper uncapped(0);
    uncapped.add("x", 64 << 20);
    EXPECT_EQ(uncapped.rate_of("x"), 64U << 20);
}

// --- PKI ---------------------------------------------------------------------

TEST(Pki, InitWritesACaAndNamedNodeCertificates) {
    TempDir dir;
    auto r = init_pki(dir / "pki", {"node-a", "node-b"});
    ASSERT_TRUE(r) << r.error().message;
    for (auto f : {"ca.pem", "ca-key.pem", "node-a.pem", "node-a-key.pem", "node-b.pem", "node-b-key.pem"})
        EXPECT_TRUE(std::filesystem::exists(dir / ("pki/" + std::string(f)))) << f;
    auto perms = std::filesystem::status(dir / "pki/node-a-key.pem").permissions();
    EXPECT_EQ(perms & std::filesystem::perms::others_read, std::filesystem::perms::none);
    auto id = TlsIdentity::load({dir / "pki/ca.pem", dir / "pki/node-a.pem", dir / "pki/node-a-key.pem"}, "node-a");
    ASSERT_TRUE(id) << id.error().message;
    auto wrong = TlsIdentity::load({dir / "pki/ca.pem", dir / "pki/node-a.pem", dir / "pki/node-a-key.pem"}, "node-b");
    ASSERT_FALSE(wrong);
    EXPECT_NE(wrong.error().message.find("names node 'node-a'"), std::string::npos) << wrong.error().message;
    auto again = init_pki(dir / "pki", {"node-c"});
    ASSERT_FALSE(again) << "an existing CA is never overwritten";
    EXPECT_NE(again.error().message.find("pki add"), std::string::npos) << again.error().message;
    EXPECT_FALSE(init_pki(dir / "x", {"Bad_Name"}));
}

TEST(Pki, ARefusedInitWritesNothing) {
    TempDir dir;
    auto twice = init_pki(dir / "pki", {"node-a", "node-a"});
    ASSERT_FALSE(twice);
    EXPECT_NE(twice.error().message.find("'node-a' is named twice"), std::string::npos) << twice.error().message;
    EXPECT_FALSE(std::filesystem::exists(dir / "pki")) << "nothing may be written before every name is checked";
    for (std::string bad : std::vector<std::string>{"Node A/../x", std::string("a\0b", 3), "a\u202eb"}) {
        auto r = init_pki(dir / "pki", {"node-a", bad});
        ASSERT_FALSE(r) << bad;
        EXPECT_FALSE(std::filesystem::exists(dir / "pki/ca.pem"));
    }
    // Once refused, the same directory still works.
    EXPECT_TRUE(init_pki(dir / "pki", {"node-a", "node-b"}));
}

TEST(Pki, AddIssuesMoreNodesFromTheExistingCa) {
    TempDir dir;
    ASSERT_TRUE(init_pki(dir / "pki", {"node-a"}));
    auto ca_before = ferry::test::read_file(dir / "pki/ca.pem");
    auto added = add_pki_nodes(dir / "pki", {"node-b", "node-c"});
    ASSERT_TRUE(added) << added.error().message;
    EXPECT_EQ(added->written.size(), 4U);
    EXPECT_EQ(ferry::test::read_file(dir / "pki/ca.pem"), ca_before) << "the CA stays as it was";
    auto id = TlsIdentity::load({dir / "pki/ca.pem", dir / "pki/node-c.pem", dir / "pki/node-c-key.pem"}, "node-c");
    EXPECT_TRUE(id) << id.error().message;
    auto existing = add_pki_nodes(dir / "pki", {"node-d", "node-a"});
    ASSERT_FALSE(existing);
    EXPECT_NE(existing.error().message.find("node-a.pem exists"), std::string::npos) << existing.error().message;
    EXPECT_FALSE(std::filesystem::exists(dir / "pki/node-d.pem")) << "a refused add writes nothing";
    auto no_ca = add_pki_nodes(dir / "elsewhere", {"node-e"});
    ASSERT_FALSE(no_ca);
    EXPECT_NE(no_ca.error().message.find("CA certificate"), std::string::npos) << no_ca.error().message;
}

// --- the peer endpoint under attack -------------------------------------------

namespace {

struct Pki {
    TempDir dir;
    KeyPair ca = std::move(*make_ca("test CA"));
    KeyPair other_ca = std::move(*make_ca("another CA"));
    std::string file(const std::string& name, const std::string& pem) {
        auto path = dir / name;
        std::filesystem::remove(path);
        write_pem(path, pem, 0600);
        return path;
    }
    // Writes cert+key for node under CA `by`; returns the paths.
    std::pair<std::string, std::string> node(const std::string& name, const KeyPair& by, Validity v = {}, const std::string& tag = "") {
        auto kp = make_node_cert(by, name, v);
        return {file(name + tag + ".pem", kp->cert_pem()), file(name + tag + "-key.pem", kp->key_pem())};
    }
};

// A TLS client context from arbitrary files, without ferry's own checks.
std::shared_ptr<asio::ssl::context> raw_client(const std::string& ca, const std::string& cert, const std::string& key) {
    auto ctx = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_client);
    SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_3_VERSION);
    ctx->load_verify_file(ca);
    if (!cert.empty()) {
        ctx->use_certificate_chain_file(cert);
        ctx->use_private_key_file(key, asio::ssl::context::pem);
    }
    ctx->set_verify_mode(asio::ssl::verify_none);
    return ctx;
}

// Connects (from source, if given: any 127.0.0.0/8 address is loopback),
// handshakes (if ctx), sends raw bytes, returns the server's first frame (or the error).
asio::awaitable<ferry::Result<json>> attempt(unsigned short port, std::shared_ptr<asio::ssl::context> ctx, std::string bytes,
                                             std::string source = "") {
    auto ex = co_await asio::this_coro::executor;
    tcp::socket s(ex);
    if (!source.empty()) {
        boost::system::error_code bec;
        s.open(tcp::v4(), bec);
        if (!bec)
            s.bind({asio::ip::make_address(source), 0}, bec);
        if (bec)
            co_return ferry::make_error(ferry::Errc::io, "binding to " + source + ": " + bec.message());
    }
    auto [cec] = co_await s.async_connect({asio::ip::make_address("127.0.0.1"), port}, asio::as_tuple(asio::use_awaitable));
    if (cec)
        co_return ferry::make_error(ferry::Errc::io, cec.message());
    std::shared_ptr<Channel> ch;
    if (ctx) {
        auto stream = std::make_unique<TlsStream>(std::move(s), *ctx);
        auto [hec] = co_await stream->async_handshake(asio::ssl::stream_base::client, asio::as_tuple(asio::use_awaitable));
        if (hec)
            co_return ferry::make_error(ferry::Errc::io, "handshake: " + hec.message());
        ch = std::make_shared<Channel>(std::move(stream));
    } else {
        ch = std::make_shared<Channel>(std::move(s));
    }
    co_await ch->write_all(asio::buffer(bytes));
    co_return co_await ch->read_frame(2s);
}

class PeerEndpoint : public ::testing::Test {
protected:
    void SetUp() override {
        auto a = pki_.node("node-a", pki_.ca);
        ca_ = pki_.file("ca.pem", pki_.ca.cert_pem());
        auto id = TlsIdentity::load({ca_, a.first, a.second}, "node-a");
        ASSERT_TRUE(id) << id.error().message;
        server_ = std::make_unique<PeerServer>(io_.get_executor(), "127.0.0.1:0", *id, "node-a", std::set<std::string>{"node-b"});
        server_->on_control([this](std::shared_ptr<Channel> c) { controls_.push_back(c->peer_node); });
        server_->on_data([this](TokenGrant g, std::shared_ptr<Channel>) { data_.push_back(g.index); });
        ASSERT_TRUE(server_->start());
        b_ = pki_.node("node-b", pki_.ca);
    }
    ferry::Result<json> try_with(std::shared_ptr<asio::ssl::context> ctx, const std::string& bytes) {
        return run(io_, attempt(server_->port(), ctx, bytes), 20s);
    }
    asio::io_context io_;
    Pki pki_;
    std::string ca_;
    std::pair<std::string, std::string> b_;
    std::unique_ptr<PeerServer> server_;
    std::vector<std::string> controls_;
    std::vector<int> data_;
};

} // namespace

TEST_F(PeerEndpoint, AcceptsAConfiguredPeerWithItsOwnCertificate) {
    auto r = try_with(raw_client(ca_, b_.first, b_.second), encode_frame(control_hello("node-b")));
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ((*r)["type"], "welcome");
    ferry::test::pump(io_, 50ms);
    ASSERT_EQ(controls_.size(), 1U);
    EXPECT_EQ(controls_[0], "node-b");
    EXPECT_EQ(server_->refused(), 0U);
}

TEST_F(PeerEndpoint, RefusesACertificateFromAnotherCa) {
    auto foreign = pki_.node("node-b", pki_.other_ca, {}, "-foreign");
    auto r = try_with(raw_client(ca_, foreign.first, foreign.second), encode_frame(control_hello("node-b")));
    EXPECT_FALSE(r && (*r)["type"] == "welcome");
    ferry::test::pump(io_, 100ms);
    EXPECT_EQ(server_->refused(), 1U);
    EXPECT_TRUE(controls_.empty());
}

TEST_F(PeerEndpoint, RefusesAnExpiredCertificate) {
    auto expired = pki_.node("node-b", pki_.ca, {std::chrono::hours(-48), std::chrono::hours(-24)}, "-expired");
    auto r = try_with(raw_client(ca_, expired.first, expired.second), encode_frame(control_hello("node-b")));
    EXPECT_FALSE(r && (*r)["type"] == "welcome");
    ferry::test::pump(io_, 100ms);
    EXPECT_EQ(server_->refused(), 1U);
    EXPECT_TRUE(controls_.empty());
}

TEST_F(PeerEndpoint, RefusesACertificateForAnotherNode) {
    auto c = pki_.node("node-c", pki_.ca);
    // node-c pretending to be node-b
    auto r = try_with(raw_client(ca_, c.first, c.second), encode_frame(control_hello("node-b")));
    ASSERT_TRUE(r);
    EXPECT_EQ((*r)["type"], "error");
    EXPECT_NE((*r)["message"].get<std::string>().find("certificate names 'node-c'"), std::string::npos);
    // node-c as itself: not a configured peer
    auto r2 = try_with(raw_client(ca_, c.first, c.second), encode_frame(control_hello("node-c")));
    ASSERT_TRUE(r2);
    EXPECT_NE((*r2)["message"].get<std::string>().find("not in [[peers]]"), std::string::npos);
    EXPECT_EQ(server_->refused(), 2U);
    EXPECT_TRUE(controls_.empty());
}

TEST_F(PeerEndpoint, RefusesAClientWithoutCertificate) {
    auto r = try_with(raw_client(ca_, "", ""), encode_frame(control_hello("node-b")));
    EXPECT_FALSE(r && (*r)["type"] == "welcome");
    ferry::test::pump(io_, 100ms);
    EXPECT_EQ(server_->refused(), 1U);
}

TEST_F(PeerEndpoint, RefusesPlaintextOnTheTlsPort) {
    auto r = try_with(nullptr, encode_frame(control_hello("node-b")));
    EXPECT_FALSE(r && (*r)["type"] == "welcome");
    ferry::test::pump(io_, 100ms);
    EXPECT_EQ(server_->refused(), 1U);
}

TEST_F(PeerEndpoint, AdmitsDataChannelsOnlyWithAFreshToken) {
    auto token = server_->tokens().issue("m1", 3);
    auto client = raw_client(ca_, b_.first, b_.second);
    auto forged = try_with(client, encode_frame(data_hello(std::string(64, 'a'))));
    ASSERT_TRUE(forged);
    EXPECT_EQ((*forged)["type"], "error");
    auto good = try_with(client, encode_frame(data_hello(token)));
    ASSERT_TRUE(good) << good.error().message;
    EXPECT_EQ((*good)["type"], "welcome");
    auto reused = try_with(client, encode_frame(data_hello(token)));
    ASSERT_TRUE(reused);
    EXPECT_EQ((*reused)["type"], "error");
    ferry::test::pump(io_, 50ms);
    ASSERT_EQ(data_.size(), 1U);
    EXPECT_EQ(data_[0], 3);
    EXPECT_EQ(server_->refused(), 2U);
}

TEST_F(PeerEndpoint, SurvivesGarbageAndTruncatedFrames) {
    auto client = raw_client(ca_, b_.first, b_.second);
    EXPECT_FALSE(try_with(client, "GET / HTTP/1.1\r\n\r\n"));
    EXPECT_FALSE(try_with(client, std::string("\0\0\0\x64{\"type\"", 12))); // promises 100 bytes, sends 8
    auto versioned = try_with(client, encode_frame({{"type", "hello"}, {"version", 99}, {"kind", "control"}, {"node", "node-b"}}));
    ASSERT_TRUE(versioned);
    EXPECT_NE((*versioned)["message"].get<std::string>().find("version"), std::string::npos);
    ferry::test::pump(io_, 100ms);
    EXPECT_GE(server_->refused(), 3U);
    // Still serving.
    auto r = try_with(client, encode_frame(control_hello("node-b")));
    ASSERT_TRUE(r);
    EXPECT_EQ((*r)["type"], "welcome");
}

TEST_F(PeerEndpoint, DialRefusesAPeerWithTheWrongName) {
    auto b_id = TlsIdentity::load({ca_, b_.first, b_.second}, "node-b");
    ASSERT_TRUE(b_id);
    auto addr = "127.0.0.1:" + std::to_string(server_->port());
    auto wrong = run(io_, open_control(io_.get_executor(), addr, "node-x", "node-b", *b_id));
    ASSERT_FALSE(wrong);
    EXPECT_NE(wrong.error().message.find("TLS handshake with node-x"), std::string::npos) << wrong.error().message;
    auto right = run(io_, open_control(io_.get_executor(), addr, "node-a", "node-b", *b_id));
    ASSERT_TRUE(right) << right.error().message;
}

// --- the peer endpoint under a flood of unauthenticated connections --------

namespace {

// A TCP connection from source to 127.0.0.1:port that sends nothing.
ferry::UniqueFd idle_from(const std::string& source, unsigned short port) {
    ferry::UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in from{};
    from.sin_family = AF_INET;
    ::inet_pton(AF_INET, source.c_str(), &from.sin_addr);
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(port);
    ::inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&from), sizeof from) != 0 ||
        ::connect(fd.get(), reinterpret_cast<sockaddr*>(&to), sizeof to) != 0)
        ADD_FAILURE() << "connecting from " << source << ": " << std::strerror(errno);
    return fd;
}

// How long until the server closes fd (end of file or a reset), or nothing
// if it is still open after `wait`.
std::optional<std::chrono::milliseconds> closed_within(const ferry::UniqueFd& fd, std::chrono::milliseconds wait) {
    auto t0 = std::chrono::steady_clock::now();
    pollfd p{fd.get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(wait.count())) <= 0)
        return std::nullopt;
    char c;
    if (::recv(fd.get(), &c, 1, MSG_DONTWAIT) > 0)
        return std::nullopt; // the server said something: not closed
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
}

// A TLS peer server with the given limits, run on a thread of its own so
// the test can hold blocking sockets; clients handshake from io_.
class PeerEndpointLimits : public ::testing::Test {
protected:
    void start(PeerLimits limits) {
        auto a = pki_.node("node-a", pki_.ca);
        ca_ = pki_.file("ca.pem", pki_.ca.cert_pem());
        auto id = TlsIdentity::load({ca_, a.first, a.second}, "node-a");
        ASSERT_TRUE(id) << id.error().message;
        server_ = std::make_unique<PeerServer>(server_io_.get_executor(), "127.0.0.1:0", *id, "node-a",
                                               std::set<std::string>{"node-b"}, asio::any_io_executor{}, limits);
        ASSERT_TRUE(server_->start());
        b_ = pki_.node("node-b", pki_.ca);
        thread_ = std::thread([this] { server_io_.run(); });
    }
    // The server's thread stops, so its counters can be read.
    void stop() {
        work_.reset();
        server_io_.stop();
        if (thread_.joinable())
            thread_.join();
    }
    void TearDown() override {
        stop();
        server_.reset();
    }
    // A configured peer's hello from source: the server's first answer.
    ferry::Result<json> hello_from(const std::string& source) {
        return run(io_, attempt(server_->port(), raw_client(ca_, b_.first, b_.second), encode_frame(control_hello("node-b")),
                                source),
                   20s);
    }
    asio::io_context io_;
    asio::io_context server_io_;
    asio::executor_work_guard<asio::io_context::executor_type> work_ = asio::make_work_guard(server_io_);
    std::thread thread_;
    Pki pki_;
    std::string ca_;
    std::pair<std::string, std::string> b_;
    std::unique_ptr<PeerServer> server_;
};

} // namespace

TEST_F(PeerEndpointLimits, ClosesConnectionsOverThePerAddressCapAtOnceAndServesOtherAddresses) {
    start({.max_unauthenticated = 16, .max_per_source = 3, .handshake_timeout = 20s});
    std::vector<ferry::UniqueFd> idle;
    for (int i = 0; i < 3; ++i)
        idle.push_back(idle_from("127.0.0.2", server_->port()));
    auto over = idle_from("127.0.0.2", server_->port());
    auto closed = closed_within(over, 5s);
    ASSERT_TRUE(closed) << "the connection over the cap stayed open";
    EXPECT_LT(*closed, 1s);
    for (auto& fd : idle)
        EXPECT_FALSE(closed_within(fd, 0ms)) << "a connection under the cap was closed";
    // Another address is still served, the handshake and hello included.
    auto r = hello_from("127.0.0.3");
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ((*r)["type"], "welcome");
    stop();
    EXPECT_EQ(server_->over_cap(), 1U);
    EXPECT_EQ(server_->refused(), 0U);
}

TEST_F(PeerEndpointLimits, ClosesConnectionsOverTheTotalCapAtOnceUntilSlotsFree) {
    start({.max_unauthenticated = 4, .max_per_source = 2, .handshake_timeout = 20s});
    std::vector<ferry::UniqueFd> idle;
    for (auto* source : {"127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"})
        idle.push_back(idle_from(source, server_->port()));
    auto over = idle_from("127.0.0.4", server_->port());
    auto closed = closed_within(over, 5s);
    ASSERT_TRUE(closed) << "the connection over the cap stayed open";
    EXPECT_LT(*closed, 1s);
    auto refused = hello_from("127.0.0.5");
    EXPECT_FALSE(refused && (*refused)["type"] == "welcome");
    // Idle clients that give up free their slots.
    idle.clear();
    ferry::Result<json> r = ferry::make_error(ferry::Errc::internal, "not tried");
    for (int i = 0; i < 50 && !(r && (*r)["type"] == "welcome"); ++i) {
        std::this_thread::sleep_for(20ms);
        r = hello_from("127.0.0.5");
    }
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ((*r)["type"], "welcome");
    stop();
    EXPECT_GE(server_->over_cap(), 2U);
}

TEST_F(PeerEndpointLimits, ClosesAConnectionWithoutHelloAtTheDeadlineAndFreesItsSlot) {
    start({.max_unauthenticated = 16, .max_per_source = 2, .handshake_timeout = 1s});
    auto silent = idle_from("127.0.0.2", server_->port());
    auto t0 = std::chrono::steady_clock::now();
    // TLS, then no hello.
    auto no_hello = run(io_, attempt(server_->port(), raw_client(ca_, b_.first, b_.second), "", "127.0.0.2"), 20s);
    ASSERT_FALSE(no_hello);
    EXPECT_EQ(no_hello.error().code, ferry::Errc::disconnected) << no_hello.error().message;
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 1900ms);
    auto closed = closed_within(silent, 3s);
    ASSERT_TRUE(closed) << "a connection without a TLS handshake outlived the deadline";
    EXPECT_GE(std::chrono::steady_clock::now() - t0, 900ms);
    // Both slots of 127.0.0.2 are free again.
    std::this_thread::sleep_for(50ms);
    auto r = hello_from("127.0.0.2");
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ((*r)["type"], "welcome");
    stop();
    EXPECT_EQ(server_->timed_out(), 2U);
    EXPECT_EQ(server_->over_cap(), 0U);
}

namespace {
// Runs in a child process (a death test): the fd limit is the process's.
// Fills the fd table, lets a connection wait in the backlog, and checks the
// accept loop retries every 100 ms or so instead of spinning, then takes
// the connection once descriptors are free.
[[noreturn]] void accept_out_of_descriptors() {
    auto fail = [](const std::string& why) {
        std::fprintf(stderr, "%s\n", why.c_str());
        std::fflush(stderr);
        std::_Exit(1);
    };
    asio::io_context io;
    PeerServer server(io.get_executor(), "127.0.0.1:0", nullptr, "node-a", {"node-b"}, asio::any_io_executor{},
                      PeerLimits{.handshake_timeout = 30s});
    if (!server.start())
        fail("start");
    ferry::UniqueFd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    int highest = 0;
    for (auto& e : std::filesystem::directory_iterator("/proc/self/fd"))
        highest = std::max(highest, std::stoi(e.path().filename().string()));
    rlimit rl{};
    ::getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = static_cast<rlim_t>(highest) + 16;
    if (::setrlimit(RLIMIT_NOFILE, &rl) != 0)
        fail("setrlimit");
    std::vector<ferry::UniqueFd> filler;
    for (;;) {
        int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            break;
        filler.emplace_back(fd);
    }
    if (errno != EMFILE)
        fail("filling the fd table: " + std::string(std::strerror(errno)));
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(server.port());
    ::inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    if (::connect(client.get(), reinterpret_cast<sockaddr*>(&to), sizeof to) != 0)
        fail("connect");
    ferry::test::pump(io, 600ms);
    auto errors = server.accept_errors();
    if (errors < 2 || errors > 12)
        fail(fmt::format("{} failed accepts in 600 ms: expected one every 100 ms", errors));
    filler.resize(filler.size() - 2);
    ferry::test::pump(io, 400ms);
    if (server.unauthenticated() != 1)
        fail(fmt::format("{} connections taken once descriptors were free", server.unauthenticated()));
    std::_Exit(0);
}
} // namespace

TEST(PeerEndpointFds, AcceptWaitsInsteadOfSpinningWhenOutOfDescriptors) {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    EXPECT_EXIT(accept_out_of_descriptors(), ::testing::ExitedWithCode(0), "");
}

// --- a tunnel carries bytes both ways, shaped --------------------------------

namespace {
asio::awaitable<void> echo_server(asio::local::stream_protocol::acceptor& acc) {
    auto [ec, s] = co_await acc.async_accept(asio::as_tuple(asio::use_awaitable));
    if (ec)
        co_return;
    std::vector<char> buf(65536);
    for (;;) {
        auto [rec, n] = co_await s.async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
        if (rec)
            co_return;
        co_await asio::async_write(s, asio::buffer(buf.data(), n), asio::as_tuple(asio::use_awaitable));
    }
}
} // namespace

namespace {
struct TunnelOutcome {
    bool done = false;
    ferry::Result<TunnelStats> result = ferry::make_error(ferry::Errc::internal, "not run");
};

asio::awaitable<void> tunnel_task(asio::local::stream_protocol::socket q, std::shared_ptr<Channel> c,
                                  std::shared_ptr<TokenBucket> bucket, std::shared_ptr<TunnelOutcome> out) {
    out->result = co_await run_tunnel(std::move(q), std::move(c), bucket);
    out->done = true;
}

// Sends `data` through the peer end and reads the echo back.
asio::awaitable<std::string> round_trip(std::shared_ptr<Channel> peer, std::string data) {
    co_await peer->write_all(asio::buffer(data));
    std::string back;
    std::vector<char> buf(65536);
    while (back.size() < data.size()) {
        auto n = co_await peer->read_some(asio::buffer(buf));
        if (!n)
            break;
        back.append(buf.data(), *n);
    }
    peer->close();
    co_return back;
}
} // namespace

TEST(Tunnel, CarriesBytesBothWaysShapedOnTheWayOut) {
    asio::io_context io;
    TempDir dir;
    asio::local::stream_protocol::acceptor echo(io, asio::local::stream_protocol::endpoint(dir / "echo.sock"));
    asio::co_spawn(io, echo_server(echo), asio::detached);
    tcp::acceptor acc(io, {asio::ip::make_address("127.0.0.1"), 0});
    tcp::socket client(io), server(io);
    client.connect(acc.local_endpoint());
    acc.accept(server);
    asio::local::stream_protocol::socket qemu(io);
    qemu.connect(asio::local::stream_protocol::endpoint(dir / "echo.sock"));

    auto bucket = std::make_shared<TokenBucket>(2 << 20); // 2 MiB/s out of the tunnel
    auto outcome = std::make_shared<TunnelOutcome>();
    asio::co_spawn(io, tunnel_task(std::move(qemu), std::make_shared<Channel>(std::move(server)), bucket, outcome),
                   asio::detached);
    std::string data(1 << 20, '\0');
    for (std::size_t i = 0; i < data.size(); ++i)
        data[i] = static_cast<char>(i * 7 + (i >> 12));
    auto t0 = std::chrono::steady_clock::now();
    auto back = run(io, round_trip(std::make_shared<Channel>(std::move(client)), data));
    auto elapsed = std::chrono::steady_clock::now() - t0;
    EXPECT_EQ(back.size(), data.size());
    EXPECT_TRUE(back == data) << "bytes changed in the tunnel";
    // Shaping can only slow it down: 1 MiB less the 256 KiB burst at 2 MiB/s.
    EXPECT_GE(elapsed, 350ms);
    for (int i = 0; i < 100 && !outcome->done; ++i)
        ferry::test::pump(io, 20ms);
    ASSERT_TRUE(outcome->done) << "the tunnel must end when the peer closes";
    ASSERT_TRUE(outcome->result) << outcome->result.error().message;
    EXPECT_EQ(outcome->result->from_peer, data.size());
    EXPECT_EQ(outcome->result->to_peer, data.size());
}

// --- a TLS channel carries large data both ways at once ------------------------

namespace {
std::string pattern(std::size_t n, unsigned seed) {
    std::string s(n, '\0');
    for (std::size_t i = 0; i < n; ++i)
        s[i] = static_cast<char>((i * 131 + seed) ^ (i >> 9));
    return s;
}

asio::awaitable<ferry::Result<std::shared_ptr<Channel>>> accept_tls(tcp::acceptor& acc, std::shared_ptr<TlsIdentity> id) {
    auto [ec, s] = co_await acc.async_accept(asio::as_tuple(asio::use_awaitable));
    if (ec)
        co_return ferry::make_error(ferry::Errc::io, ec.message());
    auto stream = std::make_unique<TlsStream>(std::move(s), id->server());
    auto [hec] = co_await stream->async_handshake(asio::ssl::stream_base::server, asio::as_tuple(asio::use_awaitable));
    if (hec)
        co_return ferry::make_error(ferry::Errc::io, "handshake: " + hec.message());
    co_return std::make_shared<Channel>(std::move(stream));
}

// Writes a frame and, in the same write, the first bytes of a stream; then
// the rest of `out` in pieces of many sizes.
asio::awaitable<ferry::Result<void>> send_side(std::shared_ptr<Channel> c, std::string out) {
    auto first = encode_frame(json{{"type", "hello"}, {"bytes", out.size()}}) + out.substr(0, 1000);
    if (auto r = co_await c->write_all(asio::buffer(first)); !r)
        co_return r.error();
    std::size_t at = 1000, step = 1;
    while (at < out.size()) {
        auto n = std::min(out.size() - at, step);
        if (auto r = co_await c->write_all(asio::buffer(out.data() + at, n)); !r)
            co_return r.error();
        at += n;
        step = step * 7 % (3 << 20) + 1;
    }
    co_return ferry::Result<void>{};
}

// Reads the frame, then the stream up to its announced size.
asio::awaitable<ferry::Result<std::string>> receive_side(std::shared_ptr<Channel> c) {
    auto hello = co_await c->read_frame(10s);
    if (!hello)
        co_return hello.error();
    std::size_t want = (*hello)["bytes"];
    std::string in;
    std::vector<char> buf(1 << 20);
    while (in.size() < want) {
        auto n = co_await c->read_some(asio::buffer(buf));
        if (!n)
            co_return n.error();
        in.append(buf.data(), *n);
    }
    co_return in;
}

struct Both {
    ferry::Result<void> sent = ferry::make_error(ferry::Errc::internal, "not run");
    ferry::Result<std::string> received = ferry::make_error(ferry::Errc::internal, "not run");
    int done = 0;
};

asio::awaitable<void> exchange_on(std::shared_ptr<Channel> c, std::string out, std::shared_ptr<Both> both) {
    using namespace asio::experimental::awaitable_operators;
    auto [sent, received] = co_await (send_side(c, std::move(out)) && receive_side(c));
    both->sent = std::move(sent);
    both->received = std::move(received);
    ++both->done;
}
} // namespace

TEST(TlsChannel, CarriesLargeDataBothWaysAtOnceAndWhatFollowsAFrame) {
    Pki pki;
    auto ca = pki.file("ca.pem", pki.ca.cert_pem());
    auto a = pki.node("node-a", pki.ca), b = pki.node("node-b", pki.ca);
    auto ida = TlsIdentity::load({ca, a.first, a.second}, "node-a");
    auto idb = TlsIdentity::load({ca, b.first, b.second}, "node-b");
    ASSERT_TRUE(ida && idb);
    asio::io_context io;
    tcp::acceptor acc(io, {asio::ip::make_address("127.0.0.1"), 0});
    auto accepted = asio::co_spawn(io, accept_tls(acc, *idb), asio::use_future);
    auto dialled = run(io, dial(io.get_executor(), "127.0.0.1:" + std::to_string(acc.local_endpoint().port()), "node-b",
                                *ida, 10s));
    ASSERT_TRUE(dialled) << dialled.error().message;
    for (int i = 0; i < 100 && accepted.wait_for(0s) != std::future_status::ready; ++i)
        ferry::test::pump(io, 10ms);
    auto server = accepted.get();
    ASSERT_TRUE(server) << server.error().message;

    auto to_b = pattern(24 << 20, 1), to_a = pattern((17 << 20) + 12345, 2);
    auto at_a = std::make_shared<Both>(), at_b = std::make_shared<Both>();
    asio::co_spawn(io, exchange_on(*dialled, to_b, at_a), asio::detached);
    asio::co_spawn(io, exchange_on(*server, to_a, at_b), asio::detached);
    for (int i = 0; i < 3000 && at_a->done + at_b->done < 2; ++i)
        ferry::test::pump(io, 10ms);
    ASSERT_EQ(at_a->done + at_b->done, 2) << "both ends finish";
    ASSERT_TRUE(at_a->sent) << at_a->sent.error().message;
    ASSERT_TRUE(at_b->sent) << at_b->sent.error().message;
    ASSERT_TRUE(at_a->received) << at_a->received.error().message;
    ASSERT_TRUE(at_b->received) << at_b->received.error().message;
    EXPECT_TRUE(*at_b->received == to_b) << "node-b got other bytes than node-a sent";
    EXPECT_TRUE(*at_a->received == to_a) << "node-a got other bytes than node-b sent";

    // A closed end: the other's read says so, and does not hang.
    (*dialled)->close();
    std::vector<char> buf(4096);
    auto after = run(io, (*server)->read_some(asio::buffer(buf)), 10s);
    ASSERT_FALSE(after);
    EXPECT_EQ(after.error().code, ferry::Errc::disconnected) << after.error().message;
}
