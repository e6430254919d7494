// The disk I/O layer: extent arithmetic, raw images through io_uring (and the
// pread/pwrite fallback), and the NBD client against a real qemu-nbd.
#include "block/extent.hpp"
#include "block/image.hpp"
#include "block/nbd.hpp"
#include "block/qemu_block.hpp"
#include "block/ring.hpp"
#include "block/target_image.hpp"
#include "support.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fcntl.h>
#include <random>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

using namespace ferry;
using namespace ferry::block;
using namespace std::chrono_literals;
namespace asio = boost::asio;

namespace {

std::vector<std::byte> random_bytes(std::size_t n, unsigned seed) {
    std::mt19937_64 rng(seed);
    std::vector<std::byte> v(n);
    for (auto& b : v)
        b = static_cast<std::byte>(rng() | 1); // never zero, so no block reads as a hole
    return v;
}

void write_at(const std::string& path, const std::vector<std::byte>& data, off_t offset) {
    int fd = ::open(path.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), offset), static_cast<ssize_t>(data.size()));
    ::close(fd);
}

void make_sparse(const std::string& path, off_t size) {
    int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, size), 0);
    ::close(fd);
}

std::uint64_t allocated_bytes(const std::string& path) {
    struct stat st {};
    ::stat(path.c_str(), &st);
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

int sh(const std::string& cmd) { return std::system(cmd.c_str()); }

} // namespace

// --- extents ------------------------------------------------------------------

TEST(Extents, CoalesceMergesTouchingRangesOfOneKind) {
    std::vector<Extent> in{{100, 50}, {0, 100}, {150, 10, true}, {160, 10, true}, {300, 5}};
    std::vector<Extent> want{{0, 150}, {150, 20, true}, {300, 5}};
    EXPECT_EQ(coalesce(in), want);
}

TEST(Extents, WhereDataAndZerosOverlapDataWins) {
    std::vector<Extent> in{{0, 100, true}, {40, 20}, {90, 30}};
    std::vector<Extent> want{{0, 40, true}, {40, 20}, {60, 30, true}, {90, 30}};
    EXPECT_EQ(coalesce(in), want);
    EXPECT_TRUE(coalesce({}).empty());
    EXPECT_TRUE(coalesce({{5, 0}}).empty());
}

TEST(Extents, SplitCutsOnTheGrid) {
    std::vector<Extent> in{{1000, 5000}, {8192, 4096, true}};
    std::vector<Extent> want{{1000, 3096}, {4096, 1904}, {8192, 4096, true}};
    EXPECT_EQ(split(in, 4096), want);
}

TEST(Extents, ClipAndTotals) {
    std::vector<Extent> in{{0, 10}, {8, 10, true}, {20, 5}};
    auto c = clip(in, 15);
    std::vector<Extent> want{{0, 10}, {8, 7, true}};
    EXPECT_EQ(c, want);
    EXPECT_EQ(total_length(c, false), 10u);
    EXPECT_EQ(total_length(c, true), 7u);
}

TEST(Extents, IsZero) {
    std::vector<std::byte> z(4096 + 7);
    EXPECT_TRUE(is_zero(z));
    for (std::size_t at : {std::size_t{0}, std::size_t{63}, std::size_t{64}, std::size_t{4096 + 6}}) {
        auto v = z;
        v[at] = std::byte{1};
        EXPECT_FALSE(is_zero(v)) << at;
    }
    EXPECT_TRUE(is_zero({}));
}

TEST(Extents, AllocatedExtentsOfASparseFile) {
    test::TempDir dir;
    auto path = dir / "sparse.raw";
    make_sparse(path, 8 << 20);
    write_at(path, random_bytes(64 << 10, 1), 1 << 20);
    write_at(path, random_bytes(128 << 10, 2), 5 << 20);
    int fd = ::open(path.c_str(), O_RDONLY);
    auto ext = allocated_extents(fd, 8 << 20);
    ::close(fd);
    ASSERT_TRUE(ext) << ext.error().message;
    std::vector<Extent> want{{1 << 20, 64 << 10}, {5 << 20, 128 << 10}};
    EXPECT_EQ(*ext, want);
}

// --- raw images through the ring -----------------------------------------------

namespace {

struct CopyState {
    std::vector<Extent> work;
    std::size_t next = 0;
    int running = 0;
    std::optional<Error> error;
    std::uint64_t data_bytes = 0, zero_bytes = 0;
};

// One of several workers copying extents from src to dst on its own slot;
// all-zero blocks become zero writes, as the mirror sends them.
asio::awaitable<void> copy_worker(std::shared_ptr<Ring> ring, Image* src, Image* dst, BufferPool* pool, int slot,
                                  std::shared_ptr<CopyState> st) {
    auto buf = pool->slot(static_cast<std::size_t>(slot));
    while (st->next < st->work.size() && !st->error) {
        auto e = st->work[st->next++];
        if (e.zero) {
            auto z = co_await dst->write_zeroes(*ring, e.offset, e.length);
            if (!z)
                st->error = z.error();
            st->zero_bytes += e.length;
            continue;
        }
        auto n = co_await src->read(*ring, buf, e.offset, e.length, slot);
        if (!n) {
            st->error = n.error();
            break;
        }
        auto data = buf.first(*n);
        if (is_zero(data)) {
            st->zero_bytes += *n;
            continue; // the target is fresh: its holes read as zeros
        }
        auto w = co_await dst->write(*ring, data, e.offset, slot);
        if (!w)
            st->error = w.error();
        st->data_bytes += *n;
    }
    --st->running;
}

asio::awaitable<void> wait_done(std::shared_ptr<CopyState> st) {
    asio::steady_timer t(co_await asio::this_coro::executor);
    while (st->running > 0) {
        t.expires_after(1ms);
        co_await t.async_wait(asio::use_awaitable);
    }
}

asio::awaitable<Result<void>> flush(std::shared_ptr<Ring> ring, Image* img) { co_return co_await img->flush(*ring); }

class RawImages : public ::testing::TestWithParam<bool> {
protected:
    void SetUp() override {
        if (GetParam())
            ::unsetenv("FERRY_IO_URING");
        else
            ::setenv("FERRY_IO_URING", "0", 1);
    }
    void TearDown() override { ::unsetenv("FERRY_IO_URING"); }

    std::shared_ptr<CopyState> copy(const std::string& from, const std::string& to, int depth) {
        auto src = Image::open(from, Image::Access::read);
        auto dst = Image::open(to, Image::Access::write);
        EXPECT_TRUE(src && dst);
        auto ring = Ring::create(io_.get_executor(), static_cast<unsigned>(depth));
        EXPECT_EQ(ring->uses_io_uring(), GetParam());
        BufferPool pool(static_cast<std::size_t>(depth), 1 << 20);
        EXPECT_TRUE(ring->register_buffers(pool));
        auto st = std::make_shared<CopyState>();
        auto data = src->allocated();
        EXPECT_TRUE(data);
        // Holes become zero extents, as base:allocation reports them.
        std::vector<Extent> all{{0, src->size(), true}};
        all.insert(all.end(), data->begin(), data->end());
        st->work = split(coalesce(all), pool.slot_size());
        st->running = depth;
        for (int i = 0; i < depth; ++i)
            asio::co_spawn(io_, copy_worker(ring, &*src, &*dst, &pool, i, st), asio::detached);
        test::run(io_, wait_done(st));
        auto f = test::run(io_, flush(ring, &*dst));
        EXPECT_TRUE(f) << f.error().message;
        return st;
    }

    asio::io_context io_;
    test::TempDir dir_;
};

} // namespace

TEST_P(RawImages, CopyKeepsEveryByteAndTheHoles) {
    // Not a multiple of 4 KiB, data at unaligned places and at the very end.
    const off_t size = (40 << 20) + 1234;
    auto src = dir_ / "src.raw", dst = dir_ / "dst.raw";
    make_sparse(src, size);
    write_at(src, random_bytes(3 << 20, 3), 1 << 20);
    write_at(src, random_bytes(5000, 4), (17 << 20) + 100);
    write_at(src, std::vector<std::byte>(256 << 10), 20 << 20); // allocated, but zeros
    write_at(src, random_bytes(3000, 5), size - 3000);
    make_sparse(dst, size);
    auto st = copy(src, dst, 8);
    ASSERT_FALSE(st->error) << st->error->message;
    EXPECT_EQ(test::read_file(src), test::read_file(dst));
    // Data only: about 3 MiB + two small pieces, never the 40 MiB.
    EXPECT_LT(st->data_bytes, (3 << 20) + (64 << 10)) << st->data_bytes;
    EXPECT_GE(st->data_bytes, (3u << 20) + 8000);
    EXPECT_LT(allocated_bytes(dst), 4u << 20) << "the target lost its holes";
}

TEST_P(RawImages, WriteZeroesPunchesAHole) {
    auto path = dir_ / "z.raw";
    make_sparse(path, 4 << 20);
    write_at(path, random_bytes(4 << 20, 6), 0);
    auto img = Image::open(path, Image::Access::write);
    ASSERT_TRUE(img);
    auto ring = Ring::create(io_.get_executor(), 4);
    auto zero = [](std::shared_ptr<Ring> r, Image* i) -> asio::awaitable<Result<void>> {
        auto z = co_await i->write_zeroes(*r, 1 << 20, 2 << 20);
        if (!z)
            co_return z;
        co_return co_await i->flush(*r);
    };
    auto r = test::run(io_, zero(ring, &*img));
    ASSERT_TRUE(r) << r.error().message;
    auto bytes = test::read_file(path);
    for (std::size_t i = 1 << 20; i < (3u << 20); i += 4096)
        ASSERT_EQ(bytes[i], 0) << i;
    EXPECT_NE(bytes[(1 << 20) - 1], 0);
    EXPECT_LE(allocated_bytes(path), (2u << 20) + 65536);
}

TEST_P(RawImages, ErrorsNameThePath) {
    auto missing = Image::open(dir_ / "nope.raw", Image::Access::read);
    ASSERT_FALSE(missing);
    EXPECT_NE(missing.error().message.find("nope.raw"), std::string::npos) << missing.error().message;
    auto dir = Image::open(dir_.path(), Image::Access::read);
    ASSERT_FALSE(dir);
    EXPECT_NE(dir.error().message.find("neither a regular file nor a block device"), std::string::npos)
        << dir.error().message;
    auto path = dir_ / "small.raw";
    make_sparse(path, 8192);
    auto img = Image::open(path, Image::Access::write);
    auto ring = Ring::create(io_.get_executor(), 2);
    auto past = [](std::shared_ptr<Ring> r, Image* i) -> asio::awaitable<Result<void>> {
        std::vector<std::byte> data(4096);
        co_return co_await i->write(*r, data, 8192);
    };
    auto w = test::run(io_, past(ring, &*img));
    ASSERT_FALSE(w);
    EXPECT_NE(w.error().message.find("past the end of"), std::string::npos) << w.error().message;
}

INSTANTIATE_TEST_SUITE_P(Ring, RawImages, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "io_uring" : "pread_pwrite"; });

// --- NBD against qemu-nbd --------------------------------------------------------

namespace {

class Nbd : public ::testing::Test {
protected:
    void SetUp() override {
        image_ = dir_ / "disk.qcow2";
        socket_ = dir_ / "nbd.sock";
        ASSERT_EQ(sh("qemu-img create -q -f qcow2 " + image_ + " 16M"), 0);
        ASSERT_EQ(sh("qemu-img bitmap --add --enable " + image_ + " b0"), 0);
        // Written after the bitmap exists: it records them.
        ASSERT_EQ(sh("qemu-io -f qcow2 -c 'write -q -P 0xab 1M 64k' -c 'write -q -P 0xcd 9M 4k' " + image_), 0);
    }
    void TearDown() override {
        if (server_ > 0) {
            ::kill(server_, SIGTERM);
            ::waitpid(server_, nullptr, 0);
        }
    }
    void serve() {
        server_ = ::fork();
        if (server_ == 0) {
            ::execlp("qemu-nbd", "qemu-nbd", "--socket", socket_.c_str(), "--format", "qcow2", "--persistent",
                     "--shared", "4", "--export-name", "disk", "-B", "b0", image_.c_str(), nullptr);
            ::_exit(127);
        }
        for (int i = 0; i < 200 && !std::filesystem::exists(socket_); ++i)
            std::this_thread::sleep_for(10ms);
        ASSERT_TRUE(std::filesystem::exists(socket_)) << "qemu-nbd did not start";
    }
    std::shared_ptr<NbdClient> connect() {
        std::vector<std::string> contexts{std::string(allocation_context), dirty_bitmap_context("b0")};
        auto c = test::run(io_, NbdClient::connect(io_.get_executor(), socket_, "disk", contexts, 5s));
        EXPECT_TRUE(c) << c.error().message;
        return c ? *c : nullptr;
    }

    asio::io_context io_;
    test::TempDir dir_;
    std::string image_, socket_;
    pid_t server_ = -1;
};

asio::awaitable<Result<std::vector<Status>>> status_of(std::shared_ptr<NbdClient> c, std::string ctx) {
    co_return co_await c->block_status(std::move(ctx), 0, c->size());
}

} // namespace

TEST_F(Nbd, DirtyBitmapAndAllocationComeBackAsExtents) {
    serve();
    auto c = connect();
    ASSERT_TRUE(c);
    EXPECT_EQ(c->size(), 16u << 20);
    EXPECT_TRUE(c->has_context("qemu:dirty-bitmap:b0"));
    auto dirty = test::run(io_, status_of(c, dirty_bitmap_context("b0")));
    ASSERT_TRUE(dirty) << dirty.error().message;
    // The bitmap's granularity is qcow2's 64 KiB cluster.
    std::vector<Extent> want{{1 << 20, 64 << 10}, {9 << 20, 64 << 10}};
    EXPECT_EQ(dirty_extents(*dirty), want);
    auto alloc = test::run(io_, status_of(c, std::string(allocation_context)));
    ASSERT_TRUE(alloc) << alloc.error().message;
    auto ext = allocation_extents(*alloc);
    // Only what was written is data (QEMU may narrow the second cluster to
    // the 4 KiB written in it); the rest reads as zeros.
    auto data = total_length(ext, false);
    EXPECT_GE(data, (64u << 10) + (4u << 10));
    EXPECT_LE(data, (64u << 10) + (64u << 10));
    EXPECT_EQ(total_length(ext, true), (16u << 20) - data);
}

TEST_F(Nbd, ReadsWritesZeroesAndManyInFlight) {
    serve();
    auto c = connect();
    ASSERT_TRUE(c);
    auto body = [](std::shared_ptr<NbdClient> c) -> asio::awaitable<Result<std::string>> {
        std::vector<std::byte> buf(4096);
        auto r = co_await c->pread(buf, 1 << 20);
        if (!r)
            co_return r.error();
        if (buf[0] != std::byte{0xab} || buf[4095] != std::byte{0xab})
            co_return std::string("read the wrong bytes");
        auto data = random_bytes(256 << 10, 7);
        auto w = co_await c->pwrite(data, 4 << 20);
        if (!w)
            co_return w.error();
        auto z = co_await c->zero(1 << 20, 64 << 10);
        if (!z)
            co_return z.error();
        auto f = co_await c->flush();
        if (!f)
            co_return f.error();
        std::vector<std::byte> back(256 << 10);
        r = co_await c->pread(back, 4 << 20);
        if (!r)
            co_return r.error();
        if (back != data)
            co_return std::string("read back differs");
        r = co_await c->pread(buf, 1 << 20);
        if (!r)
            co_return r.error();
        if (!is_zero(buf))
            co_return std::string("zeroed range reads non-zero");
        co_return std::string("ok");
    };
    auto r = test::run(io_, body(c));
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(*r, "ok");

    // 16 reads in flight at once on one connection.
    auto results = std::make_shared<std::vector<std::string>>();
    auto reader = [](std::shared_ptr<NbdClient> c, int i,
                     std::shared_ptr<std::vector<std::string>> out) -> asio::awaitable<void> {
        std::vector<std::byte> b(64 << 10);
        auto r = co_await c->pread(b, static_cast<std::uint64_t>(i) << 20);
        out->push_back(r ? "ok" : r.error().message);
    };
    for (int i = 0; i < 16; ++i)
        asio::co_spawn(io_, reader(c, i, results), asio::detached);
    for (int i = 0; i < 500 && results->size() < 16; ++i)
        test::pump(io_, 10ms);
    ASSERT_EQ(results->size(), 16u);
    for (auto& s : *results)
        EXPECT_EQ(s, "ok");
}

TEST_F(Nbd, ALostServerFailsRequestsInsteadOfHanging) {
    serve();
    auto c = connect();
    ASSERT_TRUE(c);
    ::kill(server_, SIGKILL);
    ::waitpid(server_, nullptr, 0);
    server_ = -1;
    auto read = [](std::shared_ptr<NbdClient> c) -> asio::awaitable<Result<void>> {
        std::vector<std::byte> b(4096);
        co_return co_await c->pread(b, 0);
    };
    auto r = test::run(io_, read(c), 20s);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("disk"), std::string::npos) << r.error().message;
}

TEST_F(Nbd, AStalledServerTimesOutWithoutBlockingTheLoop) {
    serve();
    auto c = connect();
    ASSERT_TRUE(c);
    c->set_timeout(1s);
    ::kill(server_, SIGSTOP);
    auto read = [](std::shared_ptr<NbdClient> c) -> asio::awaitable<Result<void>> {
        std::vector<std::byte> b(4096);
        co_return co_await c->pread(b, 0);
    };
    auto t0 = std::chrono::steady_clock::now();
    auto r = test::run(io_, read(c), 20s);
    auto took = std::chrono::steady_clock::now() - t0;
    ::kill(server_, SIGCONT);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, ferry::Errc::timeout) << r.error().message;
    EXPECT_LT(took, 10s) << "closing waited on the stalled server";
    auto again = test::run(io_, read(c), 20s);
    ASSERT_FALSE(again) << "a closed client refuses further requests";
}

TEST_F(Nbd, ConnectingToNothingNamesTheSocket) {
    auto c = test::run(io_, NbdClient::connect(io_.get_executor(), dir_ / "none.sock", "disk", {}, 2s));
    ASSERT_FALSE(c);
    EXPECT_NE(c.error().message.find("none.sock"), std::string::npos) << c.error().message;
}

// --- QEMU's block layer over QMP ------------------------------------------------

namespace {

class QemuBlockTest : public ::testing::Test {
protected:
    void SetUp() override {
        raw_ = dir_ / "d0.raw";
        qcow_ = dir_ / "d1.qcow2";
        make_sparse(raw_, 16 << 20);
        ASSERT_EQ(sh("qemu-img create -q -f qcow2 " + qcow_ + " 16M"), 0);
        auto qmp_sock = dir_ / "qmp.sock";
        qemu_ = ::fork();
        if (qemu_ == 0) {
            auto b0 = "driver=file,filename=" + raw_ + ",node-name=disk0-file";
            auto b1 = "driver=file,filename=" + qcow_ + ",node-name=disk1-file";
            auto qmp = "unix:" + qmp_sock + ",server=on,wait=off";
            // disk1 on a device (I/O limits are a device's), disk0 on none.
            ::execlp("qemu-system-x86_64", "qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-nodefaults",
                     "-display", "none", "-S", "-qmp", qmp.c_str(), "-blockdev", b0.c_str(), "-blockdev",
                     "driver=raw,file=disk0-file,node-name=disk0", "-blockdev", b1.c_str(), "-blockdev",
                     "driver=qcow2,file=disk1-file,node-name=disk1", "-device",
                     "virtio-blk-pci,drive=disk1,id=disk1-dev", nullptr);
            ::_exit(127);
        }
        auto c = test::run(io_, qmp::Client::connect_retry(io_.get_executor(), qmp_sock, 10s));
        ASSERT_TRUE(c) << c.error().message;
        qmp_ = *c;
    }
    void TearDown() override {
        if (qemu_ > 0) {
            ::kill(qemu_, SIGKILL);
            ::waitpid(qemu_, nullptr, 0);
        }
    }
    // Writes through QEMU (HMP qemu-io on the node), so its bitmaps see it.
    void guest_write(const std::string& node, const std::string& what) {
        nlohmann::json args{{"command-line", "qemu-io " + node + " \"" + what + "\""}};
        auto r = test::run(io_, qmp_->execute("human-monitor-command", args));
        ASSERT_TRUE(r) << r.error().message;
    }

    asio::io_context io_;
    test::TempDir dir_;
    std::string raw_, qcow_;
    pid_t qemu_ = -1;
    std::shared_ptr<qmp::Client> qmp_;
};

// Runs one QemuBlock call to completion.
template <class F> auto call(asio::io_context& io, F f) { return test::run(io, f()); }

} // namespace

TEST_F(QemuBlockTest, RoundsOfDirtyBitmapsReadThroughAnExportThenNothingIsLeft) {
    QemuBlock qb(qmp_);
    auto node = test::run(io_, qb.format_node(raw_));
    ASSERT_TRUE(node) << node.error().message;
    EXPECT_EQ(*node, "disk0");
    auto qnode = test::run(io_, qb.format_node(qcow_));
    ASSERT_TRUE(qnode);
    EXPECT_EQ(*qnode, "disk1");
    auto none = test::run(io_, qb.format_node("/nowhere.raw"));
    ASSERT_FALSE(none);
    EXPECT_NE(none.error().message.find("/nowhere.raw"), std::string::npos);

    ASSERT_TRUE(test::run(io_, qb.add_bitmap("disk0", "ferry-t-1")));
    guest_write("disk0", "write -P 0xab 1M 64k");
    // Round 1 ends: its bitmap freezes, round 2's records from now on.
    ASSERT_TRUE(test::run(io_, qb.rotate_bitmap("disk0", "ferry-t-1", "ferry-t-2")));
    guest_write("disk0", "write -P 0xcd 5M 4k");
    auto sock = dir_ / "nbd.sock";
    auto started = test::run(io_, qb.start_nbd(sock));
    ASSERT_TRUE(started) << started.error().message;
    // Only a frozen bitmap can be exported (QEMU refuses a recording one).
    auto exported = test::run(io_, qb.add_export("ferry-t-e1", "disk0", false, {"ferry-t-1", "ferry-t-2"}));
    ASSERT_FALSE(exported);
    EXPECT_NE(exported.error().message.find("ferry-t-2"), std::string::npos) << exported.error().message;
    exported = test::run(io_, qb.add_export("ferry-t-e1", "disk0", false, {"ferry-t-1"}));
    ASSERT_TRUE(exported) << exported.error().message;
    auto c = test::run(io_, NbdClient::connect(io_.get_executor(), sock, "ferry-t-e1",
                                               {dirty_bitmap_context("ferry-t-1")}, 5s));
    ASSERT_TRUE(c) << c.error().message;
    auto r1 = test::run(io_, status_of(*c, dirty_bitmap_context("ferry-t-1")));
    ASSERT_TRUE(r1) << r1.error().message;
    std::vector<Extent> want1{{1 << 20, 64 << 10}};
    EXPECT_EQ(dirty_extents(*r1), want1);
    std::vector<std::byte> buf(4096);
    auto read = [](std::shared_ptr<NbdClient> c, std::span<std::byte> b) -> asio::awaitable<Result<void>> {
        co_return co_await c->pread(b, 1 << 20);
    };
    ASSERT_TRUE(test::run(io_, read(*c, buf)));
    EXPECT_EQ(buf[0], std::byte{0xab});
    // Round 2 ends the same way, its own export beside the first.
    ASSERT_TRUE(test::run(io_, qb.rotate_bitmap("disk0", "ferry-t-2", "ferry-t-3")));
    ASSERT_TRUE(test::run(io_, qb.add_export("ferry-t-e2", "disk0", false, {"ferry-t-2"})));
    auto c2 = test::run(io_, NbdClient::connect(io_.get_executor(), sock, "ferry-t-e2",
                                                {dirty_bitmap_context("ferry-t-2")}, 5s));
    ASSERT_TRUE(c2) << c2.error().message;
    auto r2 = test::run(io_, status_of(*c2, dirty_bitmap_context("ferry-t-2")));
    ASSERT_TRUE(r2) << r2.error().message;
    std::vector<Extent> want2{{5 << 20, 64 << 10}};
    EXPECT_EQ(dirty_extents(*r2), want2);
    ASSERT_TRUE(test::run(io_, qb.remove_export("ferry-t-e2")));
    std::vector<std::string> left{"ferry-t-e1"};
    EXPECT_EQ(*test::run(io_, qb.exports()), left);
    // A failed round's blocks go back into the running bitmap.
    ASSERT_TRUE(test::run(io_, qb.merge_bitmap("disk0", "ferry-t-2", "ferry-t-3")));
    ASSERT_TRUE(test::run(io_, qb.remove_bitmap("disk0", "ferry-t-2")));
    auto listed = test::run(io_, qb.bitmaps("disk0"));
    ASSERT_TRUE(listed);
    std::vector<std::string> two{"ferry-t-1", "ferry-t-3"};
    std::sort(listed->begin(), listed->end());
    EXPECT_EQ(*listed, two);

    // A crash leaves all of it: the sweep removes exactly ferry's.
    ASSERT_TRUE(test::run(io_, qb.add_bitmap("disk1", "user-bitmap")));
    auto swept = test::run(io_, qb.sweep("ferry-", true));
    ASSERT_TRUE(swept) << swept.error().message;
    EXPECT_NE(swept->find("export ferry-t-e1"), std::string::npos) << *swept;
    EXPECT_NE(swept->find("bitmap ferry-t-1"), std::string::npos) << *swept;
    EXPECT_NE(swept->find("NBD server"), std::string::npos) << *swept;
    EXPECT_TRUE(test::run(io_, qb.exports())->empty());
    EXPECT_TRUE(test::run(io_, qb.bitmaps("disk0"))->empty());
    std::vector<std::string> user{"user-bitmap"};
    EXPECT_EQ(*test::run(io_, qb.bitmaps("disk1")), user);
    // Nothing left: a second sweep is a no-op, not an error.
    auto again = test::run(io_, qb.sweep("ferry-", true));
    ASSERT_TRUE(again) << again.error().message;
    EXPECT_EQ(*again, "");
}

// --- target images ---------------------------------------------------------------

TEST(TargetImage, CreatesMissingImagesSparseAndChecksExistingOnes) {
    test::TempDir dir;
    const std::uint64_t size = (4ULL << 30) + 512; // over 4 GiB, not a multiple of 4 KiB
    const TargetImageRules fresh, reuse{"", true};
    auto raw = dir / "a.raw";
    auto made = prepare_target_image(raw, "raw", size, fresh);
    ASSERT_TRUE(made) << made.error().message;
    EXPECT_TRUE(made->created);
    EXPECT_EQ(std::filesystem::file_size(raw), size);
    EXPECT_LT(allocated_bytes(raw), 1u << 20) << "created sparse";
    auto again = prepare_target_image(raw, "raw", size, reuse);
    ASSERT_TRUE(again) << again.error().message;
    EXPECT_FALSE(again->created);

    auto qcow = dir / "b.qcow2";
    made = prepare_target_image(qcow, "qcow2", 64 << 20, fresh);
    ASSERT_TRUE(made) << made.error().message;
    auto info = inspect_image(qcow);
    ASSERT_TRUE(info);
    EXPECT_EQ(info->format, "qcow2");
    EXPECT_EQ(info->virtual_size, 64u << 20);

    auto wrong_size = prepare_target_image(raw, "raw", size + 512, reuse);
    ASSERT_FALSE(wrong_size);
    EXPECT_EQ(wrong_size.error().message,
              fmt::format("target image {} holds {} bytes, the disk {} bytes", raw, size, size + 512));
    auto wrong_format = prepare_target_image(qcow, "raw", 64 << 20, reuse);
    ASSERT_FALSE(wrong_format);
    EXPECT_NE(wrong_format.error().message.find("is qcow2, the disk is raw"), std::string::npos);
    auto no_dir = prepare_target_image(dir / "missing/x.raw", "raw", 4096, fresh);
    ASSERT_FALSE(no_dir);
    EXPECT_NE(no_dir.error().message.find("does not exist"), std::string::npos) << no_dir.error().message;
}

// A file ferry did not create is never written over without the operator's
// word, and no link at a target path is followed to create or remove one.
TEST(TargetImage, AnExistingFileOrALinkAtTheTargetPathIsRefusedAndLeftAlone) {
    test::TempDir dir;
    const TargetImageRules fresh;
    auto theirs = dir / "theirs.raw";
    test::write_file(theirs, std::string(4096, 'x'));
    auto existing = prepare_target_image(theirs, "raw", 4096, fresh);
    ASSERT_FALSE(existing);
    EXPECT_EQ(existing.error().code, Errc::already_exists);
    EXPECT_NE(existing.error().message.find("target image " + theirs + " already exists"), std::string::npos)
        << existing.error().message;
    EXPECT_NE(existing.error().message.find("[block] reuse_existing = true"), std::string::npos);
    EXPECT_EQ(test::read_file(theirs), std::string(4096, 'x'));

    // A dangling link: nothing is created where it points, and it stays.
    auto link = dir / "link.raw";
    auto elsewhere = dir / "elsewhere.raw";
    std::filesystem::create_symlink(elsewhere, link);
    auto dangling = prepare_target_image(link, "raw", 4096, fresh);
    ASSERT_FALSE(dangling);
    EXPECT_NE(dangling.error().message.find("is a dangling symbolic link (to " + elsewhere + ")"), std::string::npos)
        << dangling.error().message;
    EXPECT_FALSE(std::filesystem::exists(elsewhere));
    EXPECT_TRUE(std::filesystem::is_symlink(link));
    // A link to a regular file: refused even where reuse is allowed.
    auto to_file = dir / "to-file.raw";
    std::filesystem::create_symlink(theirs, to_file);
    auto linked = prepare_target_image(to_file, "raw", 4096, TargetImageRules{"", true});
    ASSERT_FALSE(linked);
    EXPECT_NE(linked.error().message.find("ferry writes through a link only to a block device"), std::string::npos)
        << linked.error().message;
    // Removal takes only a regular file at the path itself.
    EXPECT_FALSE(remove_created_image(to_file));
    EXPECT_TRUE(std::filesystem::exists(theirs));
    EXPECT_TRUE(std::filesystem::is_symlink(to_file));
    // A directory is neither an image nor ferry's to replace.
    std::filesystem::create_directories(dir / "d.raw");
    auto directory = prepare_target_image(dir / "d.raw", "raw", 4096, TargetImageRules{"", true});
    ASSERT_FALSE(directory);
    EXPECT_NE(directory.error().message.find("neither a regular file nor a block device"), std::string::npos);
}

TEST(TargetImage, TheCreateCommandGetsQuotedPathNameAndSize) {
    test::TempDir dir;
    auto path = dir / "it's a volume";
    auto made = prepare_target_image(path, "raw", 1 << 20,
                                     {"truncate -s {size} {path} && echo {name} > " + shell_quote(dir / "log")});
    ASSERT_TRUE(made) << made.error().message;
    EXPECT_TRUE(made->created);
    EXPECT_EQ(std::filesystem::file_size(path), 1u << 20);
    EXPECT_EQ(test::read_file(dir / "log"), "it's a volume\n");
    auto failing = prepare_target_image(dir / "v2", "raw", 1 << 20, {"echo no space left >&2; exit 5"});
    ASSERT_FALSE(failing);
    EXPECT_NE(failing.error().message.find("create_command"), std::string::npos) << failing.error().message;
    EXPECT_NE(failing.error().message.find("exit status 5): no space left"), std::string::npos)
        << failing.error().message;
    auto wrong = prepare_target_image(dir / "v3", "raw", 1 << 20, {"truncate -s 4096 {path}"});
    ASSERT_FALSE(wrong);
    EXPECT_NE(wrong.error().message.find("raw of 4096 bytes"), std::string::npos) << wrong.error().message;
    EXPECT_FALSE(std::filesystem::exists(dir / "v3")) << "a created image of the wrong size is left behind";
}

// The disk throttle: a cap on writes that keeps every other limit the disk
// had, in ferry's own throttle group; putting the saved limits back restores
// them exactly; a sweep after a crash lifts only the write cap.
TEST_F(QemuBlockTest, AWriteCapKeepsTheDisksOwnLimitsAndComesOffCleanly) {
    QemuBlock qb(qmp_);
    auto none = test::run(io_, qb.io_limits("disk1"));
    ASSERT_TRUE(none) << none.error().message;
    // The qdev id, or the QOM path of a device without one.
    auto dev = none->device;
    EXPECT_NE(dev.find("disk1-dev"), std::string::npos) << dev;
    EXPECT_EQ(none->limits["bps_wr"], 0);
    EXPECT_FALSE(none->limits.contains("group")) << none->limits.dump();
    auto orphan = test::run(io_, qb.io_limits("disk0"));
    ASSERT_FALSE(orphan);
    EXPECT_NE(orphan.error().message.find("disk0"), std::string::npos) << orphan.error().message;

    // The user's own limits, in a group of their own.
    auto user = none->limits;
    user["iops_rd"] = 500;
    user["bps_wr"] = 8 << 20;
    user["group"] = "user-g";
    ASSERT_TRUE(test::run(io_, qb.set_io_limits(dev, user)));
    auto saved = test::run(io_, qb.io_limits("disk1"));
    ASSERT_TRUE(saved);
    EXPECT_EQ(saved->limits["group"], "user-g");
    EXPECT_EQ(saved->limits["iops_rd"], 500);

    // A cap above the user's keeps the user's; below it, it wins.
    auto capped = QemuBlock::cap_writes(saved->limits, 16 << 20, "ferry-t-disk1");
    EXPECT_EQ(capped["bps_wr"], 8 << 20);
    capped = QemuBlock::cap_writes(saved->limits, 1 << 20, "ferry-t-disk1");
    EXPECT_EQ(capped["bps_wr"], 1 << 20);
    EXPECT_EQ(capped["iops_rd"], 500);
    EXPECT_EQ(capped["group"], "ferry-t-disk1");
    ASSERT_TRUE(test::run(io_, qb.set_io_limits(dev, capped)));
    auto now = test::run(io_, qb.io_limits("disk1"));
    ASSERT_TRUE(now);
    EXPECT_EQ(now->limits["bps_wr"], 1 << 20);
    EXPECT_EQ(now->limits["group"], "ferry-t-disk1");

    // Restored from what was saved: exactly the user's limits again.
    ASSERT_TRUE(test::run(io_, qb.set_io_limits(dev, saved->limits)));
    auto back = test::run(io_, qb.io_limits("disk1"));
    ASSERT_TRUE(back);
    EXPECT_EQ(back->limits, saved->limits);

    // A crash with the cap on, and nothing saved: the sweep lifts the cap
    // and leaves the user's read limit.
    ASSERT_TRUE(test::run(io_, qb.set_io_limits(dev, capped)));
    auto swept = test::run(io_, qb.sweep("ferry-", false));
    ASSERT_TRUE(swept) << swept.error().message;
    EXPECT_NE(swept->find("write throttle of " + dev), std::string::npos) << *swept;
    auto lifted = test::run(io_, qb.io_limits("disk1"));
    ASSERT_TRUE(lifted);
    EXPECT_EQ(lifted->limits["bps_wr"], 0);
    EXPECT_EQ(lifted->limits["iops_rd"], 500);
    EXPECT_NE(lifted->limits.value("group", ""), "ferry-t-disk1");

    // A total limit cannot sit beside a write limit: the total is capped.
    auto total = none->limits;
    total["bps"] = 4 << 20;
    auto t = QemuBlock::cap_writes(total, 1 << 20, "ferry-t-disk1");
    EXPECT_EQ(t["bps"], 1 << 20);
    EXPECT_EQ(t["bps_wr"], 0);
    ASSERT_TRUE(test::run(io_, qb.set_io_limits(dev, t)));
    // All zero lifts the throttle altogether.
    ASSERT_TRUE(test::run(io_, qb.set_io_limits(dev, none->limits)));
    auto off = test::run(io_, qb.io_limits("disk1"));
    ASSERT_TRUE(off);
    EXPECT_FALSE(off->limits.contains("group")) << off->limits.dump();
}

// A tool that hangs is killed, with what it started, and named; one that
// exits leaving a child behind on its output is done when it exits.
TEST(RunTool, AHungToolIsKilledAfterItsTimeout) {
    auto hung = run_tool({"sh", "-c", "echo started; sleep 600 & sleep 600"}, std::chrono::seconds(1));
    ASSERT_FALSE(hung);
    EXPECT_NE(hung.error().message.find("sh did not finish within 1 s and was killed"), std::string::npos)
        << hung.error().message;
    auto left = sh("pgrep -f 'slee[p] 600' >/dev/null");
    EXPECT_NE(left, 0) << "the tool's child outlived it";
    auto quick = run_tool({"sh", "-c", "echo done; sleep 600 &"}, std::chrono::seconds(30));
    ASSERT_TRUE(quick) << quick.error().message;
    EXPECT_EQ(*quick, "done\n");
    std::system("pkill -f 'slee[p] 600'");
    // One that closes its output and then hangs gets its timeout too.
    auto start = std::chrono::steady_clock::now();
    auto silent = run_tool({"sh", "-c", "exec >/dev/null 2>&1; sleep 601"}, std::chrono::seconds(1));
    ASSERT_FALSE(silent);
    EXPECT_NE(silent.error().message.find("did not finish within 1 s and was killed"), std::string::npos)
        << silent.error().message;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60)) << "it waited for the tool";
    std::system("pkill -f 'slee[p] 601'");
    auto failed = run_tool({"sh", "-c", "echo nope >&2; exit 3"});
    ASSERT_FALSE(failed);
    EXPECT_NE(failed.error().message.find("sh failed (exit status 3): nope"), std::string::npos)
        << failed.error().message;
}
