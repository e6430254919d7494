// Block mirroring's two ends against a real source QEMU whose guest writes
// its disk while the rounds run: the target image ends byte-identical, holes
// stay holes, and nothing is left in the source QEMU.
#include "block/qemu_block.hpp"
#include "engine/disk_mirror.hpp"
#include "support.hpp"
#include "verify.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/connect_pair.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <gtest/gtest.h>

#include <csignal>
#include <fcntl.h>
#include <random>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

using namespace ferry;
using namespace ferry::engine;
using namespace std::chrono_literals;
namespace asio = boost::asio;

namespace {

int sh(const std::string& cmd) { return std::system(cmd.c_str()); }

std::uint64_t allocated_bytes(const std::string& path) {
    struct stat st {};
    ::stat(path.c_str(), &st);
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

// Random data at an offset of a raw image.
void fill(const std::string& path, std::size_t bytes, off_t offset, unsigned seed) {
    std::mt19937_64 rng(seed);
    std::vector<std::uint64_t> v(bytes / 8);
    for (auto& x : v)
        x = rng();
    int fd = ::open(path.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, v.data(), bytes, offset), static_cast<ssize_t>(bytes));
    ::close(fd);
}

class Mirror : public ::testing::Test {
protected:
    void TearDown() override {
        if (qemu_ > 0) {
            ::kill(qemu_, SIGKILL);
            ::waitpid(qemu_, nullptr, 0);
        }
        if (nbd_server_ > 0) {
            ::kill(nbd_server_, SIGTERM);
            ::waitpid(nbd_server_, nullptr, 0);
        }
    }

    // The test guest writing its IDE disk (disk=KiB/s over the first 4 MiB).
    void start_guest(const std::string& image, const std::string& format, int disk_kib) {
        auto qmp_sock = dir_ / "qmp.sock";
        console_ = dir_ / "console.log";
        qemu_ = ::fork();
        if (qemu_ == 0) {
            int fd = ::open(console_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
            ::dup2(fd, 1);
            auto file = "driver=file,filename=" + image + ",node-name=disk0-file";
            auto fmt_node = "driver=" + format + ",file=disk0-file,node-name=disk0";
            auto qmp = "unix:" + qmp_sock + ",server=on,wait=off";
            auto append = "ws=4 rate=1 hb=100 disk=" + std::to_string(disk_kib) + " dsize=4";
            auto kernel = test::guest_kernel();
            ::execlp("qemu-system-x86_64", "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "64M",
                     "-nodefaults", "-display", "none", "-serial", "stdio", "-qmp", qmp.c_str(), "-kernel",
                     kernel.c_str(), "-append", append.c_str(), "-blockdev", file.c_str(), "-blockdev",
                     fmt_node.c_str(), "-device", "ide-hd,drive=disk0,bus=ide.0,unit=0", nullptr);
            ::_exit(127);
        }
        auto c = test::run(io_, qmp::Client::connect_retry(io_.get_executor(), qmp_sock, 10s));
        ASSERT_TRUE(c) << c.error().message;
        qmp_ = *c;
        for (int i = 0; i < 300 && test::read_file(console_).find("FERRY-DISK-HB") == std::string::npos; ++i)
            std::this_thread::sleep_for(50ms);
        ASSERT_NE(test::read_file(console_).find("FERRY-DISK-HB"), std::string::npos) << test::read_file(console_);
    }

    // Serves a qcow2 target writable over NBD, as the destination QEMU does.
    NbdTarget serve_target(const std::string& image) {
        auto sock = dir_ / "target-nbd.sock";
        nbd_server_ = ::fork();
        if (nbd_server_ == 0) {
            ::execlp("qemu-nbd", "qemu-nbd", "--socket", sock.c_str(), "--format", "qcow2", "--export-name", "t",
                     "--persistent", "--shared", "2", image.c_str(), nullptr);
            ::_exit(127);
        }
        for (int i = 0; i < 200 && !std::filesystem::exists(sock); ++i)
            std::this_thread::sleep_for(10ms);
        return {sock, "t"};
    }

    // Runs rounds while the guest writes, pauses it (I/O drained), runs the
    // last round and ends the stream; returns the receiver's outcome.
    Result<void> mirror(MirrorDisk src, MirrorDisk dst, std::optional<NbdTarget> nbd, int live_rounds) {
        DiskStream a(io_), b(io_);
        asio::local::connect_pair(a, b);
        sender_ = std::make_unique<DiskSender>(qmp_, "ferry-t", dir_ / "src-nbd.sock", std::vector{src},
                                               std::move(a));
        receiver_ = std::make_unique<DiskReceiver>(std::vector{dst}, std::vector{nbd}, std::move(b));
        auto received = std::make_shared<std::optional<Result<void>>>();
        asio::co_spawn(io_, run_receiver(receiver_.get(), received), asio::detached);
        auto started = test::run(io_, sender_->start());
        EXPECT_TRUE(started) << started.error().message;
        for (int i = 0; i < live_rounds; ++i) {
            auto r = test::run(io_, sender_->round());
            EXPECT_TRUE(r) << r.error().message;
            if (r)
                stats_.push_back(*r);
            test::pump(io_, 500ms); // the guest writes on
        }
        auto dirty = test::run(io_, sender_->dirty_bytes());
        EXPECT_TRUE(dirty && *dirty > 0) << "the guest's writes since the last round are counted";
        auto stop = test::run(io_, qmp_->execute("stop"));
        EXPECT_TRUE(stop) << stop.error().message;
        auto last = test::run(io_, sender_->round());
        EXPECT_TRUE(last) << last.error().message;
        if (last)
            stats_.push_back(*last);
        auto ended = test::run(io_, sender_->end_stream());
        EXPECT_TRUE(ended) << ended.error().message;
        test::run(io_, sender_->finish());
        for (int i = 0; i < 200 && !*received; ++i)
            test::pump(io_, 20ms);
        if (!*received)
            return make_error(Errc::timeout, "the receiver did not end");
        return **received;
    }

    static asio::awaitable<void> run_receiver(DiskReceiver* r, std::shared_ptr<std::optional<Result<void>>> out) {
        *out = co_await r->run();
    }

    void expect_nothing_left() {
        block::QemuBlock qb(qmp_);
        auto bitmaps = test::run(io_, qb.bitmaps("disk0"));
        ASSERT_TRUE(bitmaps);
        EXPECT_TRUE(bitmaps->empty()) << (*bitmaps)[0];
        auto exports = test::run(io_, qb.exports());
        ASSERT_TRUE(exports);
        EXPECT_TRUE(exports->empty());
        auto again = test::run(io_, qb.start_nbd(dir_ / "again.sock"));
        EXPECT_TRUE(again) << "the NBD server was not stopped: " << again.error().message;
    }

    asio::io_context io_;
    test::TempDir dir_;
    std::string console_;
    pid_t qemu_ = -1, nbd_server_ = -1;
    std::shared_ptr<qmp::Client> qmp_;
    std::unique_ptr<DiskSender> sender_;
    std::unique_ptr<DiskReceiver> receiver_;
    std::vector<DiskRoundStats> stats_;
};

} // namespace

TEST_F(Mirror, RawDiskWrittenDuringTheRoundsArrivesWholeAndSparse) {
    const std::uint64_t size = (64ULL << 20) + 4096 + 512; // not a multiple of 4 KiB
    auto src = dir_ / "src.raw", dst = dir_ / "dst.raw";
    ASSERT_EQ(sh("truncate -s " + std::to_string(size) + " " + src + " " + dst), 0);
    fill(src, 6 << 20, 16 << 20, 1);
    fill(src, 512, static_cast<off_t>(size - 512), 2); // the very end
    start_guest(src, "raw", 1024);
    auto r = mirror({0, src, "raw", size, "disk0"}, {0, dst, "raw", size, ""}, std::nullopt, 3);
    ASSERT_TRUE(r) << r.error().message;
    ASSERT_GE(stats_.size(), 4u);
    // Round 1 sends what is allocated, not the 64 MiB.
    EXPECT_LT(stats_[0].data_bytes, 12u << 20) << stats_[0].data_bytes;
    EXPECT_GE(stats_[0].data_bytes, 6u << 20);
    EXPECT_GT(stats_[1].data_bytes, 0u) << "the guest wrote during round 1";
    EXPECT_LT(stats_[1].data_bytes, 4u << 20) << "later rounds send only what was written";
    EXPECT_EQ(receiver_->rounds(), static_cast<std::uint32_t>(stats_.size()));
    EXPECT_EQ(test::read_file(src), test::read_file(dst)) << "the target differs from the paused source";
    auto disk = guest::verify_disk_image(dst, 8192);
    ASSERT_TRUE(disk) << disk.error().message;
    EXPECT_LT(allocated_bytes(dst), allocated_bytes(src) + (1u << 20)) << "the target lost its holes";
    EXPECT_EQ(test::read_file(console_).find("FERRY-DISK-BAD"), std::string::npos);
    expect_nothing_left();
}

TEST_F(Mirror, Qcow2ThroughNbdOnBothEnds) {
    auto src = dir_ / "src.qcow2", dst = dir_ / "dst.qcow2";
    ASSERT_EQ(sh("qemu-img create -q -f qcow2 " + src + " 32M"), 0);
    ASSERT_EQ(sh("qemu-io -f qcow2 -c 'write -q -P 0x5a 20M 3M' " + src), 0);
    ASSERT_EQ(sh("qemu-img create -q -f qcow2 " + dst + " 32M"), 0);
    start_guest(src, "qcow2", 1024);
    auto target = serve_target(dst);
    auto r = mirror({0, src, "qcow2", 32 << 20, "disk0"}, {0, dst, "qcow2", 32 << 20, ""}, target, 2);
    ASSERT_TRUE(r) << r.error().message;
    ASSERT_EQ(stats_.size(), 3u);
    EXPECT_LT(stats_[0].data_bytes, 8u << 20) << "only allocated clusters";
    ::kill(nbd_server_, SIGTERM);
    ::waitpid(nbd_server_, nullptr, 0);
    nbd_server_ = -1;
    EXPECT_EQ(sh("qemu-img compare -q -U " + src + " " + dst), 0) << "the images differ";
    expect_nothing_left();
}

TEST_F(Mirror, AFailedRoundPutsItsBlocksBackAndLeavesNothingBehind) {
    auto src = dir_ / "src.raw", dst = dir_ / "dst.raw";
    ASSERT_EQ(sh("truncate -s 16M " + src + " " + dst), 0);
    start_guest(src, "raw", 1024);
    DiskStream a(io_), b(io_);
    asio::local::connect_pair(a, b);
    DiskSender sender(qmp_, "ferry-t", dir_ / "src-nbd.sock", {{0, src, "raw", 16 << 20, "disk0"}}, std::move(a));
    DiskReceiver receiver({{0, dst, "raw", 16 << 20, ""}}, {std::nullopt}, std::move(b));
    auto received = std::make_shared<std::optional<Result<void>>>();
    asio::co_spawn(io_, run_receiver(&receiver, received), asio::detached);
    ASSERT_TRUE(test::run(io_, sender.start()));
    auto first = test::run(io_, sender.round());
    ASSERT_TRUE(first) << first.error().message;
    test::pump(io_, 500ms);
    // The guest stops writing; what it wrote since round 1 is all round 2 has.
    ASSERT_TRUE(test::run(io_, qmp_->execute("stop")));
    auto before = test::run(io_, sender.dirty_bytes());
    ASSERT_TRUE(before);
    ASSERT_GT(*before, 0u);
    // The target goes away mid-stream: round 2 fails...
    receiver.close();
    auto second = test::run(io_, sender.round());
    ASSERT_FALSE(second);
    EXPECT_NE(second.error().message.find("disk round 2"), std::string::npos) << second.error().message;
    // ...and its blocks are back in the bitmap that records now.
    auto after = test::run(io_, sender.dirty_bytes());
    ASSERT_TRUE(after) << after.error().message;
    EXPECT_EQ(*after, *before);
    block::QemuBlock qb(qmp_);
    EXPECT_TRUE(test::run(io_, qb.exports())->empty());
    EXPECT_EQ(test::run(io_, qb.bitmaps("disk0"))->size(), 1u) << "only the recording bitmap";
    auto third = test::run(io_, sender.round());
    ASSERT_FALSE(third) << "a broken stream is not used again";
    test::run(io_, sender.finish());
    expect_nothing_left();
    for (int i = 0; i < 100 && !*received; ++i)
        test::pump(io_, 20ms);
    ASSERT_TRUE(*received);
    EXPECT_FALSE(**received) << "the receiver saw its stream cut";
}

namespace {

// Carries `from` to `to` until `budget` bytes went through, then closes
// both: a link that breaks in the middle of a round (and of a record).
asio::awaitable<void> breaking_link(DiskStream from, DiskStream to, std::size_t budget) {
    std::vector<char> buf(64 << 10);
    while (budget > 0) {
        auto [ec, n] = co_await from.async_read_some(asio::buffer(buf.data(), std::min(buf.size(), budget)),
                                                     asio::as_tuple(asio::use_awaitable));
        if (ec)
            break;
        auto [wec, w] = co_await asio::async_write(to, asio::buffer(buf.data(), n), asio::as_tuple(asio::use_awaitable));
        if (wec)
            break;
        budget -= n;
    }
    boost::system::error_code ignored;
    from.close(ignored);
    to.close(ignored);
}

// The source's side of dialling again: a fresh stream to the same receiver.
asio::awaitable<Result<DiskStream>> dial_again(DiskReceiver* receiver, int* dials) {
    auto ex = co_await asio::this_coro::executor;
    DiskStream mine(ex), theirs(ex);
    asio::local::connect_pair(mine, theirs);
    ++*dials;
    receiver->replace_stream(std::move(theirs));
    co_return ok(std::move(mine));
}

} // namespace

// The link breaks 5 MiB into a 24 MiB round: the round goes on over a new
// stream from the last record the target has, and what arrives is whole.
TEST_F(Mirror, AStreamCutMidRoundResumesAfterTheLastRecordTheTargetHas) {
    const std::uint64_t size = 32 << 20;
    auto src = dir_ / "src.raw", dst = dir_ / "dst.raw";
    ASSERT_EQ(sh("truncate -s " + std::to_string(size) + " " + src + " " + dst), 0);
    fill(src, 24 << 20, 4 << 20, 3);
    start_guest(src, "raw", 1024);
    DiskStream a(io_), relay_in(io_), relay_out(io_), b(io_);
    asio::local::connect_pair(a, relay_in);
    asio::local::connect_pair(relay_out, b);
    asio::co_spawn(io_, breaking_link(std::move(relay_in), std::move(relay_out), (5 << 20) + 777), asio::detached);
    DiskSender sender(qmp_, "ferry-t", dir_ / "src-nbd.sock", {{0, src, "raw", size, "disk0"}}, std::move(a));
    DiskReceiver receiver({{0, dst, "raw", size, ""}}, {std::nullopt}, std::move(b));
    receiver.allow_resume(10s);
    int dials = 0;
    sender.set_reconnect([&receiver, &dials] { return dial_again(&receiver, &dials); });
    auto received = std::make_shared<std::optional<Result<void>>>();
    asio::co_spawn(io_, run_receiver(&receiver, received), asio::detached);
    ASSERT_TRUE(test::run(io_, sender.start()));
    auto first = test::run(io_, sender.round());
    ASSERT_TRUE(first) << first.error().message;
    EXPECT_EQ(dials, 1);
    EXPECT_EQ(sender.resumes(), 1u);
    // Only what was in flight when the link broke goes again, not the round.
    EXPECT_LE(sender.resent_bytes(), 9u << 20) << sender.resent_bytes();
    EXPECT_GE(first->data_bytes, 24u << 20);
    EXPECT_LE(first->data_bytes, (26u << 20) + sender.resent_bytes()); // 24 MiB and what the guest wrote
    test::pump(io_, 300ms);
    ASSERT_TRUE(test::run(io_, qmp_->execute("stop")));
    auto last = test::run(io_, sender.round());
    ASSERT_TRUE(last) << last.error().message;
    auto ended = test::run(io_, sender.end_stream());
    ASSERT_TRUE(ended) << ended.error().message;
    test::run(io_, sender.finish());
    for (int i = 0; i < 200 && !*received; ++i)
        test::pump(io_, 20ms);
    ASSERT_TRUE(*received);
    ASSERT_TRUE(**received) << (*received)->error().message;
    EXPECT_EQ(receiver.rounds(), 2u);
    EXPECT_EQ(test::read_file(src), test::read_file(dst)) << "the target differs from the paused source";
    auto disk = guest::verify_disk_image(dst, 8192);
    EXPECT_TRUE(disk) << disk.error().message;
    expect_nothing_left();
}

// A broken stream the source never replaces: the receiver gives up after
// its grace, saying so, and writes nothing more.
TEST_F(Mirror, AReceiverWhoseSourceNeverComesBackGivesUpAfterItsGrace) {
    auto dst = dir_ / "dst.raw";
    ASSERT_EQ(sh("truncate -s 1M " + dst), 0);
    DiskStream a(io_), b(io_);
    asio::local::connect_pair(a, b);
    DiskReceiver receiver({{0, dst, "raw", 1 << 20, ""}}, {std::nullopt}, std::move(b));
    receiver.allow_resume(500ms);
    auto received = std::make_shared<std::optional<Result<void>>>();
    asio::co_spawn(io_, run_receiver(&receiver, received), asio::detached);
    auto header = transport::encode_disk_record({transport::DiskRecordKind::zero, 0, 1, 0, 4096, 1});
    asio::write(a, asio::buffer(header));
    a.close();
    for (int i = 0; i < 100 && !*received; ++i)
        test::pump(io_, 20ms);
    ASSERT_TRUE(*received);
    ASSERT_FALSE(**received);
    auto why = (*received)->error().message;
    EXPECT_NE(why.find("without the source's end record (after record 1)"), std::string::npos) << why;
    EXPECT_NE(why.find("did not resume within"), std::string::npos) << why;
}
