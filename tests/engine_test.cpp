// src/engine: unit tests of the pure parts, integration tests of migrations
// of the test guest in real QEMU processes.
#include "common/log.hpp"
#include "engine/console.hpp"
#include "engine/convergence.hpp"
#include "engine/disk_plan.hpp"
#include "engine/engine.hpp"
#include "engine/heartbeat.hpp"
#include "engine/hooks.hpp"
#include "engine/migration.hpp"
#include "engine/process.hpp"
#include "engine/host_facts.hpp"
#include "engine/qemu_args.hpp"
#include "engine/throttle.hpp"
#include "support.hpp"
#include "verify.hpp"

#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>

#include <regex>
#include <set>
#include <sstream>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <sys/wait.h>
#include <filesystem>
#include <fmt/format.h>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using namespace ferry::engine;
using ferry::test::run;
using ferry::test::TempDir;

// --- unit ------------------------------------------------------------------

TEST(QemuArgs, SourceStartsPausedDestinationDefersIncoming) {
    ferry::config::VmSpec spec;
    spec.name = "web-1";
    spec.memory = 256ULL << 20;
    spec.cpus = 2;
    spec.kernel = "/k";
    spec.append = "ws=8";
    spec.disks.push_back({"/d.raw", "raw", true, true});
    spec.extra_args = {"-device", "virtio-rng-pci"};
    LaunchOptions o;
    o.accel = "tcg";
    o.qmp_socket = "/r/qmp.sock";
    o.console_file = "/r/console.out";
    o.start_paused = true;
    auto src = qemu_args(spec, o);
    auto has = [](const std::vector<std::string>& v, const std::string& a, const std::string& b) {
        for (std::size_t i = 0; i + 1 < v.size(); ++i)
            if (v[i] == a && v[i + 1] == b)
                return true;
        return false;
    };
    EXPECT_TRUE(has(src, "-m", "262152K")); // 256 MiB + 8 KiB under TCG: see guest_ram
    {
        auto kvm = o;
        kvm.accel = "kvm";
        EXPECT_TRUE(has(qemu_args(spec, kvm), "-m", "262144K"));
    }
    EXPECT_TRUE(has(src, "-smp", "2"));
    EXPECT_TRUE(has(src, "-machine", "pc,accel=tcg"));
    EXPECT_TRUE(has(src, "-qmp", "unix:/r/qmp.sock,server=on,wait=off"));
    EXPECT_TRUE(has(src, "-append", "ws=8"));
    EXPECT_TRUE(has(src, "-blockdev", "driver=file,filename=/d.raw,node-name=disk0-file,read-only=on"));
    EXPECT_TRUE(has(src, "-blockdev", "driver=raw,file=disk0-file,node-name=disk0,read-only=on"));
    EXPECT_TRUE(has(src, "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev"));
    spec.disks.push_back({"/e.raw", "raw", true, false, "ide"});
    EXPECT_TRUE(has(qemu_args(spec, o), "-device", "ide-hd,drive=disk1,id=disk1-dev,bus=ide.0,unit=0"));
    spec.disks.pop_back();
    EXPECT_NE(std::find(src.begin(), src.end(), "-S"), src.end());
    EXPECT_EQ(std::find(src.begin(), src.end(), "-incoming"), src.end());
    EXPECT_EQ(src.back(), "virtio-rng-pci");

    o.start_paused = false;
    o.incoming = true;
    auto dst = qemu_args(spec, o);
    EXPECT_TRUE(has(dst, "-incoming", "defer"));
    EXPECT_EQ(std::find(dst.begin(), dst.end(), "-S"), dst.end());
}

TEST(HostFacts, ParsesWhatQemuAndProcPrint) {
    using namespace ferry::engine;
    EXPECT_EQ(parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"),
              "7.2.22");
    EXPECT_EQ(parse_qemu_version("qemu-kvm 9"), "");
    auto machines = parse_machine_help("Supported machines are:\n"
                                       "microvm              microvm (i386)\n"
                                       "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
                                       "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n"
                                       "none                 empty machine\n");
    EXPECT_EQ(machines, (std::vector<std::string>{"microvm", "pc", "pc-i440fx-7.2", "none"}));
    EXPECT_TRUE(parse_machine_help("pc  no header line\n").empty());
    auto cpus = parse_cpu_help("Available CPUs:\nx86 486                   (alias configured by machine type)\n"
                               "x86 EPYC-v1\n\nRecognized CPUID flags:\n  3dnow 3dnowext\n");
    EXPECT_EQ(cpus, (std::vector<std::string>{"486", "EPYC-v1"}));
    EXPECT_EQ(parse_meminfo_total("MemTotal:       24591852 kB\nMemFree: 1 kB\n"), 24591852ULL * 1024);
    EXPECT_EQ(parse_meminfo_total("MemFree: 1 kB\n"), 0U);
    EXPECT_EQ(parse_cpu_model_name("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nmodel name : other\n"),
              "AMD EPYC 7B13");
    // And this machine's, for real.
    auto f = probe_host("qemu-system-x86_64");
    EXPECT_GT(f.memory, 0U);
    EXPECT_GT(f.cpus, 0);
    EXPECT_FALSE(f.qemu_version.empty());
    EXPECT_NE(std::find(f.machine_types.begin(), f.machine_types.end(), "pc"), f.machine_types.end());
    EXPECT_NE(std::find(f.cpu_models.begin(), f.cpu_models.end(), "qemu64"), f.cpu_models.end());
}

TEST(QemuArgs, AutoAccelPicksKvmOnlyWhenUsable) {
    EXPECT_EQ(resolve_accel("auto", true), "kvm");
    EXPECT_EQ(resolve_accel("auto", false), "tcg");
    EXPECT_EQ(resolve_accel("tcg", true), "tcg");
}

TEST(Heartbeat, ParsesLines) {
    auto hb = parse_heartbeat("FERRY-HB 42 100 pass=3", 1000);
    ASSERT_TRUE(hb);
    EXPECT_EQ(hb->seq, 42U);
    EXPECT_EQ(hb->interval_ms, 100U);
    EXPECT_EQ(hb->host_ms, 1000);
    EXPECT_FALSE(parse_heartbeat("FERRY-HB x 100", 0));
    EXPECT_FALSE(parse_heartbeat("FERRY-HB 4 0", 0));
    EXPECT_FALSE(parse_heartbeat("hello", 0));
}

TEST(Console, LinesEndAtNewlinesAndLongOnesAreCutIntoPieces) {
    LineSplitter lines(8);
    EXPECT_EQ(lines.feed("ab"), std::vector<std::string>{});
    EXPECT_EQ(lines.feed("c\r\nde\n\nf"), (std::vector<std::string>{"abc", "de", ""}));
    EXPECT_EQ(lines.feed("0123456789abcdefghij"), (std::vector<std::string>{"f0123456", "789abcde"}));
    EXPECT_EQ(lines.feed("\n"), std::vector<std::string>{"fghij"});
    EXPECT_EQ(lines.feed("12345678\n"), std::vector<std::string>{"12345678"});
    lines.feed("tail");
    EXPECT_EQ(lines.rest(), "tail");
    EXPECT_EQ(lines.rest(), "");
}

// What QEMU writes to console.out: read as it comes, a 2 MiB line cut
// into pieces (the capture goes on after it), the log rotated at its cap,
// the read part punched out of console.out, and a last unended line kept.
TEST(Console, FollowsQemusFileCutsLongLinesRotatesTheLogAndFreesWhatItRead) {
    TempDir dir;
    asio::io_context io;
    auto out = dir / "console.out";
    auto log = dir / "console.log";
    int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0);
    auto capture = std::make_shared<ConsoleCapture>(io.get_executor(), out, log, "r1", ConsoleLimits{64 << 10, 4096});
    capture->start();
    auto put = [&](const std::string& text) {
        ASSERT_EQ(::write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
    };
    auto until = [&](auto done) {
        for (int i = 0; i < 400 && !done(); ++i)
            io.run_for(10ms);
        return done();
    };
    put("FERRY-HB 1 50 pass=1\n");
    ASSERT_TRUE(until([&] { return capture->heartbeat_list().size() == 1; }));
    put(std::string(2 << 20, 'x') + "\nFERRY-HB 2 50 pass=1\n");
    ASSERT_TRUE(until([&] { return capture->heartbeat_list().size() == 2; }));
    EXPECT_EQ(capture->heartbeat_list()[1].seq, 2u);
    auto text = ferry::test::read_file(log);
    EXPECT_NE(text.find("[r1] FERRY-HB 2 50 pass=1\n"), std::string::npos) << text.substr(0, 200);
    EXPECT_NE(text.find("[r1] " + std::string(4096, 'x') + "\n"), std::string::npos);
    EXPECT_EQ(text.find(std::string(4097, 'x')), std::string::npos) << "a piece longer than line_max";
    EXPECT_LE(std::filesystem::file_size(log), 64u << 10);
    ASSERT_TRUE(std::filesystem::exists(log + ".1"));
    EXPECT_LE(std::filesystem::file_size(log + ".1"), 64u << 10);
    struct stat st {};
    ASSERT_EQ(::stat(out.c_str(), &st), 0);
    EXPECT_GE(static_cast<std::uint64_t>(st.st_size), 2u << 20) << "console.out keeps its size";
    EXPECT_LT(static_cast<std::uint64_t>(st.st_blocks) * 512, 1u << 20) << "what was read still takes space";
    put("the last words");
    capture->stop();
    EXPECT_NE(ferry::test::read_file(log).find("[r1] the last words\n"), std::string::npos);
    ::close(fd);
}

TEST(Heartbeat, BlackoutIsTheGapLessGuestTime) {
    std::vector<Heartbeat> src{{1000, 9, 100}, {1100, 10, 100}};
    // The guest's clock stops while paused: seq 11 arrives 450 ms after seq 10.
    std::vector<Heartbeat> dst{{1550, 11, 100}, {1650, 12, 100}};
    EXPECT_EQ(*guest_blackout_ms(src, dst), 350);
    // A destination heartbeat that repeats the source's sequence is skipped.
    std::vector<Heartbeat> replay{{1300, 10, 100}, {1400, 11, 100}};
    EXPECT_EQ(*guest_blackout_ms(src, replay), 200);
    EXPECT_FALSE(guest_blackout_ms({}, dst));
    EXPECT_FALSE(guest_blackout_ms(src, {}));
    // Never negative.
    std::vector<Heartbeat> early{{1150, 11, 100}};
    EXPECT_EQ(*guest_blackout_ms(src, early), 0);
}

TEST(Progress, ReadsQueryMigrate) {
    auto info = nlohmann::json::parse(R"({"expected-downtime": 300, "status": "active", "setup-time": 1,
        "total-time": 188, "ram": {"total": 268967936, "dirty-sync-count": 3, "page-size": 4096,
        "remaining": 1531904, "mbps": 800.0, "transferred": 68154515, "dirty-pages-rate": 2560}})");
    auto p = progress_from_query_migrate(info);
    EXPECT_EQ(p.qemu_status, "active");
    EXPECT_EQ(p.total_bytes, 268967936U);
    EXPECT_EQ(p.remaining_bytes, 1531904U);
    EXPECT_EQ(p.transferred_bytes, 68154515U);
    EXPECT_EQ(p.transfer_rate_bps, 100'000'000U); // 800 Mbit/s
    EXPECT_EQ(p.dirty_rate_bps, 2560U * 4096U);
    EXPECT_EQ(p.iteration, 3);
    EXPECT_EQ(p.expected_downtime_ms, 300);
}

namespace {
constexpr std::uint64_t MiB = 1ULL << 20;

// Feeds the model one sample a second: transfer at t MiB/s, the guest
// dirtying d MiB/s, a round every `round` seconds, `remaining` left.
struct Feed {
    ConvergenceModel model;
    std::int64_t second = 0;
    std::uint64_t sent = 0;
    void tick(std::uint64_t t, std::uint64_t d, std::uint64_t remaining, std::int64_t iteration) {
        ++second;
        sent += t * MiB;
        model.observe({std::chrono::milliseconds(second * 1000), sent, remaining, d * MiB, iteration, 0});
    }
};

ferry::config::MigrationConfig strategy_config() {
    ferry::config::MigrationConfig c;
    c.max_downtime_ms = 300;
    c.progress_timeout = 0;
    c.completion_timeout_per_gib = 0;
    return c;
}
} // namespace

TEST(ConvergenceModel, UnknownUntilTheFirstFullRound) {
    Feed f;
    f.tick(64, 0, 500 * MiB, 1);
    f.tick(64, 0, 436 * MiB, 1);
    auto p = f.model.predict(300);
    EXPECT_FALSE(p.known);
    EXPECT_EQ(p.transfer_rate_bps, 64 * MiB);
    EXPECT_NEAR(p.time_left_ms, 436 * 1000 / 64, 2); // the rest of the first round
}

TEST(ConvergenceModel, SlowDirtyingConvergesAndPredictsTimeLeft) {
    Feed f;
    for (int i = 0; i < 5; ++i)
        f.tick(64, 16, 96 * MiB, 2 + i);
    auto p = f.model.predict(300);
    ASSERT_TRUE(p.known);
    EXPECT_TRUE(p.converges);
    EXPECT_EQ(p.dirty_rate_bps, 16 * MiB);
    EXPECT_EQ(p.expected_downtime_ms, 1500); // 96 MiB at 64 MiB/s
    EXPECT_EQ(p.time_left_ms, 2000);         // 96 / (64 - 16)
}

TEST(ConvergenceModel, FastDirtyingDoesNotConverge) {
    Feed f;
    for (int i = 0; i < 5; ++i)
        f.tick(16, 40, 64 * MiB, 2 + i);
    auto p = f.model.predict(300);
    EXPECT_TRUE(p.known);
    EXPECT_FALSE(p.converges);
    EXPECT_EQ(p.time_left_ms, -1);
    EXPECT_EQ(p.expected_downtime_ms, 4000);
    // A limit that covers the whole rest converges at once.
    EXPECT_TRUE(f.model.predict(4000).converges);
}

TEST(ConvergenceModel, TransferRateIsSmoothed) {
    Feed f;
    f.tick(100, 0, 1000 * MiB, 1);
    f.tick(100, 0, 900 * MiB, 1);
    f.tick(20, 0, 880 * MiB, 1); // one slow second
    auto p = f.model.predict(300);
    EXPECT_GT(p.transfer_rate_bps, 20 * MiB);
    EXPECT_LT(p.transfer_rate_bps, 100 * MiB);
}

TEST(ConvergenceModel, ScalesTheDirtyRateByTheThrottleInForce) {
    Feed f;
    f.tick(16, 12, 64 * MiB, 2);
    EXPECT_EQ(f.model.predict(300).unthrottled_dirty_rate_bps, 12 * MiB);
    // A pass at 50% throttle measures 6 MiB/s: the guest's own rate is unchanged.
    f.second++;
    f.model.observe({std::chrono::milliseconds(f.second * 1000), f.sent += 16 * MiB, 32 * MiB, 6 * MiB, 3, 50});
    auto p = f.model.predict(300);
    EXPECT_EQ(p.unthrottled_dirty_rate_bps, 12 * MiB);
    EXPECT_EQ(p.dirty_rate_bps, 6 * MiB);
}

namespace {
// What the model would say: transfer t, dirty d (at throttle `throttle`).
Prediction predicted(std::uint64_t t, std::uint64_t d, bool converges, std::int64_t downtime_ms,
                     std::int64_t throttle = 0) {
    Prediction p;
    p.transfer_rate_bps = t * MiB;
    p.dirty_rate_bps = d * MiB;
    p.unthrottled_dirty_rate_bps = static_cast<std::uint64_t>(static_cast<double>(d * MiB) * 100.0 / static_cast<double>(100 - throttle));
    p.known = true;
    p.converges = converges;
    p.expected_downtime_ms = downtime_ms;
    p.time_left_ms = converges ? downtime_ms : -1;
    return p;
}

// The strategy as the engine calls it: the model's predictions after sample
// `s`, measured at that sync unless `measured` names an earlier one.
Decision step(Strategy& st, const Sample& s, Prediction now, Prediction at_max, std::int64_t measured = -1) {
    if (now.known)
        now.measured_pass = at_max.measured_pass = measured < 0 ? s.iteration : measured;
    return st.step(s, now, at_max);
}

Sample at(std::int64_t ms, std::int64_t pass, std::uint64_t remaining, std::uint64_t transferred = 0) {
    return {std::chrono::milliseconds(ms), transferred == 0 ? static_cast<std::uint64_t>(ms) * 16 * 1024 : transferred,
            remaining, 0, pass, 0};
}
} // namespace

TEST(Strategy, RaisesTheDowntimeLimitOnlyWhenThatCanFinish) {
    Strategy s(strategy_config(), 1ULL << 30, false);
    EXPECT_EQ(s.initial_downtime_ms(), 75); // a quarter of 300
    auto converging = predicted(64, 16, true, 50);
    auto d = step(s, at(5000, 2, 10 * MiB), converging, converging);
    EXPECT_FALSE(d.downtime_limit_ms) << "converging: nothing to do";

    // Converges within the maximum: raise it, as far as needed.
    auto slow = predicted(64, 40, false, 120);
    auto slow_at_max = predicted(64, 40, true, 120);
    d = step(s, at(6000, 3, 8 * MiB), slow, slow_at_max);
    ASSERT_TRUE(d.downtime_limit_ms);
    EXPECT_EQ(*d.downtime_limit_ms, 150); // doubled (120 ms x 1.2 is less)
    d = step(s, at(6500, 3, 7 * MiB), slow, slow_at_max);
    EXPECT_FALSE(d.downtime_limit_ms) << "one change per dirty sync";
    slow.expected_downtime_ms = 1000;
    d = step(s, at(8000, 4, 8 * MiB), slow, slow_at_max);
    ASSERT_TRUE(d.downtime_limit_ms);
    EXPECT_EQ(*d.downtime_limit_ms, 300); // capped at max_downtime_ms
    d = step(s, at(9000, 5, 8 * MiB), slow, slow_at_max);
    EXPECT_FALSE(d.downtime_limit_ms);
    EXPECT_FALSE(d.throttle_percent) << "auto-converge not allowed";
    EXPECT_FALSE(d.start_postcopy);
}

TEST(Strategy, ThrottleIsSizedFromTheMeasuredRatesAtTheFirstSync) {
    auto c = strategy_config();
    c.allow_auto_converge = true;
    Strategy s(c, 1ULL << 30, false);
    EXPECT_FALSE(step(s, at(3000, 1, 40 * MiB), Prediction{}, Prediction{}).throttle_percent) << "first pass";
    // 9 MiB/s against 16 (too many rounds to converge): raising the limit
    // cannot help, so throttle at once, to half the transfer rate
    // (1 - 8/9 = 12%), and take the maximum pause.
    auto stuck = predicted(16, 9, false, 4000);
    auto d = step(s, at(4000, 2, 64 * MiB), stuck, stuck);
    ASSERT_TRUE(d.throttle_percent);
    EXPECT_EQ(*d.throttle_percent, 12);
    ASSERT_TRUE(d.downtime_limit_ms);
    EXPECT_EQ(*d.downtime_limit_ms, 300);
    EXPECT_NE(d.why.find("throttling the vCPUs to 12%, downtime limit raised to 300 ms"), std::string::npos) << d.why;
    EXPECT_FALSE(step(s, at(5000, 2, 50 * MiB), stuck, stuck).throttle_percent) << "wait for the next sync";
}

TEST(Strategy, ASaturatedDirtyRateIsAFloorSoTheThrottleDoublesItsGuess) {
    auto c = strategy_config();
    c.allow_auto_converge = true;
    Strategy s(c, 1ULL << 30, false);
    // Measured near the transfer rate: the pass re-sent the whole working
    // set, the guest may dirty far more. Assume 2 x 15: 1 - 8/30 = 74%.
    auto d = step(s, at(4000, 2, 64 * MiB), predicted(16, 15, false, 4000), predicted(16, 15, false, 4000));
    ASSERT_TRUE(d.throttle_percent);
    EXPECT_EQ(*d.throttle_percent, 74);
    // Still saturated at 74%: 15 / 0.26 x 2 = 115 MiB/s unthrottled -> 94%.
    auto still = predicted(16, 15, false, 4000, 74);
    d = step(s, at(8000, 3, 64 * MiB), still, still);
    ASSERT_TRUE(d.throttle_percent);
    EXPECT_EQ(*d.throttle_percent, 94);
    // Beyond what the throttle can do, and nothing else allowed: the maximum.
    auto hopeless = predicted(16, 15, false, 4000, 94);
    d = step(s, at(12000, 4, 64 * MiB), hopeless, hopeless);
    ASSERT_TRUE(d.throttle_percent);
    EXPECT_EQ(*d.throttle_percent, Strategy::max_throttle);
}

TEST(Strategy, PostcopyAtTheFirstSyncWhenPreCopyCannotFinish) {
    auto c = strategy_config();
    c.allow_post_copy = true;
    Strategy s(c, 1ULL << 30, true);
    EXPECT_FALSE(step(s, at(3000, 1, 40 * MiB), Prediction{}, Prediction{}).start_postcopy) << "first pass";
    auto stuck = predicted(16, 13, false, 4000);
    auto d = step(s, at(4000, 2, 64 * MiB), stuck, stuck);
    EXPECT_TRUE(d.start_postcopy);
    EXPECT_NE(d.why.find("pre-copy will not converge; switching to post-copy"), std::string::npos) << d.why;
    // Once in post-copy no timeout or lever applies.
    EXPECT_FALSE(step(s, at(100000000, 9, 64 * MiB, 1), stuck, stuck).fail);

    // Where the maximum pause can finish, that comes first.
    Strategy raise(c, 1ULL << 30, true);
    d = step(raise, at(4000, 2, 64 * MiB), predicted(64, 40, false, 120), predicted(64, 40, true, 120));
    EXPECT_FALSE(d.start_postcopy);
    EXPECT_TRUE(d.downtime_limit_ms);

    Strategy no_multifd(c, 1ULL << 30, false); // post-copy impossible (multifd)
    for (int i = 2; i < 10; ++i)
        EXPECT_FALSE(step(no_multifd, at(i * 4000, i, 64 * MiB), stuck, stuck).start_postcopy);
}

// A block migration: post-copy waits until the disks' tail fits the
// downtime, then goes; a timeout meanwhile fails, saying what it waited for.
TEST(Strategy, PostcopyWaitsForTheDisks) {
    auto c = strategy_config();
    c.allow_post_copy = true;
    Strategy s(c, 1ULL << 30, true);
    s.set_postcopy_ready(false, "the disks' tail (9 MiB) does not fit");
    auto stuck = predicted(16, 13, false, 4000);
    auto d = step(s, at(4000, 2, 64 * MiB), stuck, stuck);
    EXPECT_FALSE(d.start_postcopy);
    EXPECT_NE(d.why.find("post-copy waits: the disks' tail (9 MiB) does not fit"), std::string::npos) << d.why;
    EXPECT_FALSE(step(s, at(5000, 3, 64 * MiB), stuck, stuck).start_postcopy);
    s.set_postcopy_ready(true);
    EXPECT_TRUE(step(s, at(6000, 4, 64 * MiB), stuck, stuck).start_postcopy);

    c.completion_timeout_per_gib = 80; // 0.125 GiB -> 10 s
    Strategy late(c, 128 * MiB, true);
    late.set_postcopy_ready(false, "the disks' tail (9 MiB) does not fit");
    d = step(late, at(10500, 1, 32 * MiB), Prediction{}, Prediction{});
    ASSERT_TRUE(d.fail);
    EXPECT_FALSE(d.start_postcopy);
    EXPECT_NE(d.fail->find("not switching to post-copy: the disks' tail"), std::string::npos) << *d.fail;
}

TEST(Strategy, ThrottleFirstThenPostcopyWhenBothAreAllowed) {
    auto c = strategy_config();
    c.allow_post_copy = true;
    c.allow_auto_converge = true;
    Strategy s(c, 1ULL << 30, true);
    auto d = step(s, at(4000, 2, 64 * MiB), predicted(16, 9, false, 4000), predicted(16, 9, false, 4000));
    EXPECT_EQ(d.throttle_percent, 12);
    EXPECT_FALSE(d.start_postcopy);
    // Not enough: the throttle steps up to its maximum, then post-copy.
    for (auto [pass, in_force] : {std::pair{3, 12}, {4, 77}, {5, 94}}) {
        auto still = predicted(16, 15, false, 4000, in_force);
        d = step(s, at(pass * 4000, pass, 64 * MiB), still, still);
        ASSERT_TRUE(d.throttle_percent) << pass;
        EXPECT_FALSE(d.start_postcopy);
    }
    EXPECT_EQ(s.throttle_percent(), Strategy::max_throttle);
    auto at_max_throttle = predicted(16, 15, false, 4000, 99);
    d = step(s, at(24000, 6, 64 * MiB), at_max_throttle, at_max_throttle);
    EXPECT_TRUE(d.start_postcopy) << d.why;
    EXPECT_NE(d.why.find("pre-copy will not converge; switching to post-copy"), std::string::npos) << d.why;
    // More than any throttle can tame: post-copy at once.
    Strategy t(c, 1ULL << 30, true);
    d = Decision{};
    auto wild = predicted(16, 15, false, 4000, 98);
    for (int i = 2; i < 4 && !d.start_postcopy; ++i)
        d = step(t, at(i * 4000, i, 64 * MiB), wild, wild);
    EXPECT_TRUE(d.start_postcopy) << d.why;
    EXPECT_NE(d.why.find("a throttle over 99% would be needed"), std::string::npos) << d.why;
}

TEST(Strategy, CompletionTimeoutFailsNamingTheRatesOrSwitchesToPostcopy) {
    auto c = strategy_config();
    c.completion_timeout_per_gib = 80; // 0.125 GiB -> 10 s
    Strategy s(c, 128 * MiB, false);
    auto stuck = predicted(8, 32, false, 4000);
    EXPECT_FALSE(step(s, at(9000, 7, 32 * MiB), stuck, stuck).fail);
    auto d = step(s, at(10500, 7, 30 * MiB), stuck, stuck);
    ASSERT_TRUE(d.fail);
    EXPECT_NE(d.fail->find("completion timeout"), std::string::npos) << *d.fail;
    EXPECT_NE(d.fail->find("dirty rate 32.0 MiB/s > transfer rate 8.0 MiB/s after 7 iterations"), std::string::npos)
        << *d.fail;
    EXPECT_NE(d.fail->find("auto-converge and post-copy not allowed"), std::string::npos) << *d.fail;

    // Post-copy allowed: a timeout during the first pass switches too.
    c.allow_post_copy = true;
    Strategy pc(c, 128 * MiB, true);
    d = step(pc, at(10500, 1, 32 * MiB), Prediction{}, Prediction{});
    EXPECT_FALSE(d.fail);
    EXPECT_TRUE(d.start_postcopy);
    EXPECT_NE(d.why.find("completion timeout"), std::string::npos) << d.why;
}

TEST(Strategy, ProgressIsTheDirtySetAtEachSyncNotRemainingTouchingZero) {
    auto c = strategy_config();
    c.progress_timeout = 10;
    Strategy s(c, 1ULL << 30, false);
    Prediction p = predicted(16, 15, false, 4000);
    p.known = false;
    // A long first pass is progress, however long; `remaining` touching zero
    // at its end means nothing.
    EXPECT_FALSE(step(s, at(0, 1, 512 * MiB), p, p).fail);
    EXPECT_FALSE(step(s, at(20000, 1, 0), p, p).fail);
    EXPECT_FALSE(step(s, at(30000, 2, 64 * MiB), p, p).fail); // new low: pass 2, 64 MiB
    EXPECT_FALSE(step(s, at(33000, 2, 0), p, p).fail);
    EXPECT_FALSE(step(s, at(34000, 3, 62 * MiB), p, p).fail); // a wobble, not a new low
    EXPECT_FALSE(step(s, at(38000, 4, 64 * MiB), p, p).fail);
    // The clock runs from the first pass that was no smaller (pass 3, 34 s),
    // not from the lowest: the first pass took 30 s and was progress.
    EXPECT_FALSE(step(s, at(40500, 4, 1 * MiB), p, p).fail);
    auto d = step(s, at(44500, 4, 1 * MiB), p, p); // 10.5 s since pass 3 began
    ASSERT_TRUE(d.fail);
    EXPECT_NE(d.fail->find("progress timeout: the dirty set did not shrink for 10.5 s (limit 10 s): the smallest "
                           "pass was 64.0 MiB (pass 2), 2 since, the last 64.0 MiB"),
              std::string::npos)
        << *d.fail;

    // Passes that keep shrinking are progress.
    Strategy shrinking(c, 1ULL << 30, false);
    std::uint64_t pass = 64 * MiB;
    for (int i = 2; i < 12; ++i, pass = pass * 8 / 10)
        EXPECT_FALSE(step(shrinking, at(i * 6000, i, pass), p, p).fail) << i;

    // With post-copy allowed, the same stall switches instead of failing.
    c.allow_post_copy = true;
    Strategy pc(c, 1ULL << 30, true);
    for (auto& sample : {at(0, 1, 512 * MiB), at(30000, 2, 64 * MiB), at(34000, 3, 64 * MiB)})
        EXPECT_FALSE(step(pc, sample, p, p).start_postcopy);
    d = step(pc, at(44500, 3, 10 * MiB), p, p);
    EXPECT_FALSE(d.fail);
    EXPECT_TRUE(d.start_postcopy);
    EXPECT_NE(d.why.find("the dirty set did not shrink"), std::string::npos) << d.why;
}

TEST(Strategy, NoPassBeforeQemuReportsOne) {
    auto c = strategy_config();
    c.progress_timeout = 3;
    Strategy s(c, 1ULL << 30, false);
    Prediction p;
    // "setup": no RAM figures yet (pass 0, nothing remaining).
    EXPECT_FALSE(step(s, at(0, 0, 0, 1), p, p).fail);
    EXPECT_FALSE(step(s, at(500, 1, 120 * MiB, 4 * MiB), p, p).fail);
    EXPECT_FALSE(step(s, at(4000, 1, 100 * MiB, 30 * MiB), p, p).fail) << "the first pass is not a stall";
}

TEST(Strategy, ProgressTimeoutWhenNothingIsSent) {
    auto c = strategy_config();
    c.progress_timeout = 10;
    Strategy s(c, 1ULL << 30, false);
    Prediction p;
    EXPECT_FALSE(step(s, at(0, 1, 512 * MiB, 100), p, p).fail);
    EXPECT_FALSE(step(s, at(5000, 1, 500 * MiB, 5000), p, p).fail);
    EXPECT_FALSE(step(s, at(14000, 1, 500 * MiB, 5000), p, p).fail);
    auto d = step(s, at(15500, 1, 500 * MiB, 5000), p, p);
    ASSERT_TRUE(d.fail);
    EXPECT_NE(d.fail->find("progress timeout: nothing sent for 10.5 s (limit 10 s)"), std::string::npos) << *d.fail;
}

TEST(Strategy, ARepeatedDirtyRateIsNoNewMeasurement) {
    auto c = strategy_config();
    c.allow_auto_converge = true;
    Strategy s(c, 1ULL << 30, false);
    auto stuck = predicted(16, 9, false, 4000);
    EXPECT_TRUE(step(s, at(4000, 2, 64 * MiB), stuck, stuck).throttle_percent);
    // A sync within a second of the last measurement repeats QEMU's old
    // figure: no new measurement, so no second step on it.
    EXPECT_FALSE(step(s, at(4600, 3, 64 * MiB), stuck, stuck, 2).throttle_percent);
    EXPECT_TRUE(step(s, at(8000, 4, 64 * MiB), stuck, stuck).throttle_percent);
}

TEST(ConvergenceModel, CountsOnlyNewMeasurements) {
    Feed f;
    f.tick(16, 9, 64 * MiB, 2);
    EXPECT_EQ(f.model.predict(300).measured_pass, 2);
    f.tick(16, 9, 60 * MiB, 3); // the same figure again: QEMU did not measure
    EXPECT_EQ(f.model.predict(300).measured_pass, 2);
    f.tick(16, 10, 58 * MiB, 4);
    EXPECT_EQ(f.model.predict(300).measured_pass, 4);
}

TEST(Strategy, AStalledStreamFailsEvenWithPostcopyAllowed) {
    auto c = strategy_config();
    c.allow_post_copy = true;
    c.progress_timeout = 3;
    Strategy s(c, 1ULL << 30, true);
    Prediction p;
    EXPECT_FALSE(step(s, at(0, 1, 512 * MiB, 100), p, p).fail);
    auto d = step(s, at(3500, 1, 500 * MiB, 100), p, p);
    ASSERT_TRUE(d.fail);
    EXPECT_FALSE(d.start_postcopy);
    EXPECT_NE(d.fail->find("progress timeout: nothing sent for 3.5 s"), std::string::npos) << *d.fail;

    // Nor does the completion timeout move a VM over a stream that stands still.
    c.progress_timeout = 0;
    c.completion_timeout_per_gib = 80; // 10 s for 128 MiB
    Strategy t(c, 128 * MiB, true);
    EXPECT_FALSE(step(t, at(0, 1, 128 * MiB, 100), p, p).fail);
    EXPECT_FALSE(step(t, at(4000, 1, 100 * MiB, 5000), p, p).fail);
    d = step(t, at(10500, 1, 100 * MiB, 5000), p, p);
    ASSERT_TRUE(d.fail);
    EXPECT_FALSE(d.start_postcopy);
    EXPECT_NE(d.fail->find("not switching to post-copy: nothing sent for 6.5 s"), std::string::npos) << *d.fail;
}

TEST(Strategy, ALongFirstPassLeavesTheLeversTheirTurn) {
    auto c = strategy_config();
    c.progress_timeout = 10;
    c.allow_auto_converge = true;
    Strategy s(c, 1ULL << 30, false);
    Prediction first;
    EXPECT_FALSE(step(s, at(0, 1, 100 * MiB), first, first).fail);
    // 30 s of first pass; the second pass is barely smaller (the guest
    // dirties most of its memory): the throttle acts, nothing fails.
    auto stuck = predicted(16, 9, false, 6000);
    auto d = step(s, at(30000, 2, 95 * MiB), stuck, stuck);
    EXPECT_FALSE(d.fail);
    EXPECT_TRUE(d.throttle_percent);
}

// The disk throttle: nothing while the rounds shrink the dirty set; sized
// from the measured rates when a round falls behind; halved while it stays
// behind, down to a floor; never lifted by a good round.
TEST(DiskThrottle, SizedFromTheRatesThenHalvedToAFloor) {
    using ferry::engine::DiskThrottle;
    DiskThrottle t(8 << 20);
    // Copied 64 MiB in 2 s while the guest wrote 16 MiB: shrinking.
    EXPECT_FALSE(t.after_round({64 << 20, 16 << 20, 2000ms}));
    // A small dirty set is the last round's, however it compares.
    EXPECT_FALSE(t.after_round({1 << 20, 4 << 20, 1000ms}));
    EXPECT_EQ(t.cap_bps(), 0u);
    // Copied 8 MiB in 4 s (2 MiB/s) while the guest wrote 24 MiB (6 MiB/s).
    auto first = t.after_round({8 << 20, 24 << 20, 4000ms});
    ASSERT_TRUE(first);
    EXPECT_EQ(*first, 1u << 20); // half the copy rate, below the writer
    // Still behind: halved.
    EXPECT_EQ(t.after_round({9 << 20, 10 << 20, 4000ms}).value_or(0), 512u << 10);
    // Shrinking now: the cap stays.
    EXPECT_FALSE(t.after_round({10 << 20, 2 << 20, 4000ms}));
    EXPECT_EQ(t.cap_bps(), 512u << 10);
    EXPECT_EQ(t.after_round({9 << 20, 10 << 20, 4000ms}).value_or(0), DiskThrottle::floor_bps);
    EXPECT_TRUE(t.at_floor());
    EXPECT_FALSE(t.after_round({9 << 20, 10 << 20, 4000ms}));
    // A writer slower than the copy that still outgrew the round (a long
    // round): the cap is half the writer's rate.
    DiskThrottle slow(8 << 20);
    EXPECT_EQ(slow.after_round({20 << 20, 20 << 20, 10000ms}).value_or(0), 1u << 20);
    // A round that sent only zero records (the guest discarded): sized from
    // what the guest wrote.
    DiskThrottle zeros(8 << 20);
    EXPECT_EQ(zeros.after_round({0, 20 << 20, 10000ms}).value_or(0), 1u << 20);
}

// What a peer's prepare may ask of the target's disks: each a local disk of
// the spec, once, of its format, with a size; mapped by path_map; never two
// onto one image. Each refusal says which disk and why.
TEST(DiskPlan, SharedDisksNamedByThePeerAreTheSpecsSharedOnes) {
    ferry::config::VmSpec spec;
    spec.disks = {{"/vm/shared.raw", "raw", true, false, "virtio"}, {"/local/a.qcow2", "qcow2", false, false, "virtio"}};
    std::vector<ferry::engine::SharedDisk> out;
    auto read = [&](const char* text) { return ferry::engine::read_shared_disks(json::parse(text), spec, out); };
    EXPECT_EQ(read(R"([{"index":0,"format":"raw","size":1048576}])"), "");
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0].size, 1048576u);
    EXPECT_EQ(read("[]"), "");
    EXPECT_TRUE(out.empty());
    EXPECT_EQ(read(R"([{"index":1,"format":"qcow2","size":1}])"),
              "bad prepare: shared_disks names disk 1, not a shared disk of the spec");
    EXPECT_EQ(read(R"([{"index":0,"format":"raw","size":1},{"index":0,"format":"raw","size":1}])"),
              "bad prepare: shared disk 0 listed twice");
    EXPECT_EQ(read(R"([{"index":0,"format":"raw","size":-1}])"), "bad prepare: a shared disk needs index, format and size");
    EXPECT_EQ(read(R"({"index":0})"), "bad prepare: shared_disks must be an array of the spec's disks");
}

TEST(DiskPlan, ChecksThePeersDisksAgainstTheSpecAndMapsThem) {
    using ferry::engine::plan_arriving_disks;
    ferry::config::VmSpec spec;
    spec.disks = {{"/vm/shared.raw", "raw", true, false, "virtio"},
                  {"/local/a/root.qcow2", "qcow2", false, false, "virtio"},
                  {"/local/b/data.raw", "raw", false, false, "ide"}};
    ferry::config::BlockSection block{{{"/local/a", "/target/a"}}, ""};
    std::vector<ferry::engine::MirrorDisk> out;
    auto plan = [&](const char* text) { return plan_arriving_disks(json::parse(text), spec, block, "node-b", out); };
    EXPECT_EQ(plan(R"([{"index":1,"format":"qcow2","size":4294967808},{"index":2,"format":"raw","size":512}])"), "");
    ASSERT_EQ(out.size(), 2u);
    EXPECT_EQ(out[0].path, "/target/a/root.qcow2");
    EXPECT_EQ(out[0].size, 4294967808u);
    EXPECT_EQ(out[1].path, "/local/b/data.raw"); // no map: the same path
    EXPECT_EQ(out[1].index, 2u);
    EXPECT_NE(plan(R"({"index":1})").find("must be an array"), std::string::npos);
    EXPECT_NE(plan(R"([{"index":1,"size":1}])").find("needs index, format and size"), std::string::npos);
    EXPECT_NE(plan(R"([{"index":-1,"format":"raw","size":1}])").find("needs index"), std::string::npos);
    EXPECT_NE(plan(R"([{"index":7,"format":"raw","size":1}])").find("disk index 7 (the spec has 3 disks)"),
              std::string::npos);
    EXPECT_NE(plan(R"([{"index":0,"format":"raw","size":1}])").find("disks[0] is shared"), std::string::npos);
    EXPECT_NE(plan(R"([{"index":1,"format":"raw","size":1}])").find("another format"), std::string::npos);
    EXPECT_NE(plan(R"([{"index":2,"format":"raw","size":1},{"index":2,"format":"raw","size":1}])")
                  .find("disks[2] listed twice"),
              std::string::npos);
    EXPECT_NE(plan(R"([{"index":2,"format":"raw","size":0}])").find("disks[2] size 0"), std::string::npos);
    // Both local disks mapped onto one image, or onto the shared disk.
    block.path_map = {{"/local/a", "/x"}, {"/local/b", "/x"}};
    spec.disks[1].path = "/local/a/d.raw";
    spec.disks[1].format = "raw";
    spec.disks[2].path = "/local/b/d.raw";
    auto both = plan(R"([{"index":1,"format":"raw","size":1},{"index":2,"format":"raw","size":1}])");
    EXPECT_NE(both.find("disks[2] and disks[1] would both land at /x/d.raw on node-b"), std::string::npos) << both;
    block.path_map = {{"/local/b", "/vm"}};
    spec.disks[2].path = "/local/b/shared.raw";
    auto shared = plan(R"([{"index":2,"format":"raw","size":1}])");
    EXPECT_NE(shared.find("disks[2] and disks[0] would both land at /vm/shared.raw"), std::string::npos) << shared;
}

TEST(MigrationObject, CarriesTheDesignFields) {
    Migration m;
    m.id = "x";
    nlohmann::json j = m;
    for (auto key : {"id", "vm", "source_node", "target_node", "phase", "mode", "method", "policy", "config",
                     "created_at", "started_at", "ended_at", "abort_requested", "abort_status",
                     "failure_reason", "progress", "result"})
        EXPECT_TRUE(j.contains(key)) << key;
    for (auto key : {"total_bytes", "transferred_bytes", "remaining_bytes", "transfer_rate_bps",
                     "dirty_rate_bps", "iteration", "throttle_percent", "expected_downtime_ms"})
        EXPECT_TRUE(j["progress"].contains(key)) << key;
    for (auto key : {"total_time_ms", "downtime_ms", "guest_blackout_ms"})
        EXPECT_TRUE(j["result"].contains(key)) << key;
    auto back = j.get<Migration>();
    EXPECT_EQ(back.id, "x");
    EXPECT_EQ(back.phase, Phase::Pending);
}

// What a restarted ferryd needs of a block migration survives the record:
// the limits the disk throttle replaced, and whether post-copy went past
// the switchover (a record from before that field counts as gone past).
TEST(MigrationObject, KeepsWhatARestartNeeds) {
    Migration m;
    m.id = "x";
    m.mode = "postcopy";
    m.saved_io_limits.push_back({{"device", "disk0-dev"}, {"limits", {{"bps_wr", 0}, {"iops_rd", 500}}}});
    m.saved_io_limits.push_back({{"device", 7}}); // not a record ferry wrote: dropped
    nlohmann::json j = m;
    auto back = j.get<Migration>();
    ASSERT_EQ(back.saved_io_limits.size(), 1u);
    EXPECT_EQ(back.saved_io_limits[0]["limits"]["iops_rd"], 500);
    EXPECT_FALSE(back.postcopy_continued);
    j.erase("postcopy_continued");
    EXPECT_TRUE(j.get<Migration>().postcopy_continued);
    j["mode"] = "precopy";
    EXPECT_FALSE(j.get<Migration>().postcopy_continued);
}

// --- integration: real QEMU -------------------------------------------------

namespace {

class EngineIntegration : public ::testing::Test {
protected:
    void SetUp() override {
        config_.node.name = "node-a";
        config_.node.state_dir = dir_ / "state";
        config_.node.accel = "tcg";
        config_.migration.bandwidth_per_migration = 0;
        config_.migration.progress_timeout = 0;
    }
    void TearDown() override {
        if (engine_) {
            for (auto& vm : engine_->list_vms())
                run(io_, engine_->delete_vm(vm["name"]));
            engine_->shutdown();
            ferry::test::pump(io_, 50ms);
        }
    }
    void start() {
        engine_ = std::make_unique<Engine>(io_.get_executor(), config_);
        auto r = run(io_, engine_->start());
        ASSERT_TRUE(r) << r.error().message;
    }
    ferry::config::VmSpec spec(const std::string& append) {
        ferry::config::VmSpec s;
        s.name = "guest";
        s.memory = 128ULL << 20;
        s.kernel = ferry::test::guest_kernel();
        s.append = append;
        return s;
    }
    std::string console_log() { return config_.node.state_dir + "/vms/guest/console.log"; }
    // Waits (running the engine) until the console log has text.
    bool wait_console(const std::string& text, std::chrono::seconds timeout = 30s) {
        auto deadline = std::chrono::steady_clock::now() + timeout;
        while (std::chrono::steady_clock::now() < deadline) {
            if (ferry::test::read_file(console_log()).find(text) != std::string::npos)
                return true;
            ferry::test::pump(io_, 50ms);
        }
        return false;
    }
    nlohmann::json create(const std::string& append) {
        auto vm = run(io_, engine_->create_vm(spec(append)));
        EXPECT_TRUE(vm) << vm.error().message;
        EXPECT_TRUE(wait_console("FERRY-HB 2 ")) << ferry::test::read_file(console_log());
        return vm ? *vm : nlohmann::json();
    }
    nlohmann::json migration(const std::string& id) { return *engine_->show_migration(id); }
    nlohmann::json wait_final(const std::string& id, std::chrono::seconds timeout = 120s) {
        auto deadline = std::chrono::steady_clock::now() + timeout;
        for (;;) {
            auto m = migration(id);
            if (m["phase"] == "Succeeded" || m["phase"] == "Failed")
                return m;
            if (std::chrono::steady_clock::now() > deadline)
                return m;
            ferry::test::pump(io_, 50ms);
        }
    }
    // Waits until the migration is Running and has moved some bytes.
    bool wait_transferring(const std::string& id) {
        for (int i = 0; i < 600; ++i) {
            auto m = migration(id);
            if (m["phase"] == "Running" && m["progress"]["transferred_bytes"].get<std::uint64_t>() > (1U << 20))
                return true;
            if (m["phase"] == "Failed" || m["phase"] == "Succeeded")
                return false;
            ferry::test::pump(io_, 50ms);
        }
        return false;
    }
    ferry::Result<ferry::guest::VerifyReport> verify() {
        EXPECT_TRUE(ferry::guest::guest_ready(console_log()));
        auto pages = ferry::guest::pages_from_console(console_log());
        EXPECT_GT(pages, 0U);
        Engine* e = engine_.get();
        ferry::guest::QmpExec exec = [e](std::string cmd, nlohmann::json args) {
            return e->qmp_command("guest", std::move(cmd), std::move(args));
        };
        return run(io_, ferry::guest::verify_live(exec, pages, dir_ / "dump.bin",
                                                  ferry::guest::stride_from_console(console_log())));
    }
    std::string vm_status() { return (*run(io_, engine_->show_vm("guest")))["status"]; }

    asio::io_context io_;
    TempDir dir_;
    ferry::config::NodeConfig config_;
    std::unique_ptr<Engine> engine_;
};

} // namespace

TEST_F(EngineIntegration, MigratesLiveAndGuestMemorySurvives) {
    start();
    auto vm = create("ws=32 rate=8 hb=50");
    int old_pid = vm["pid"];
    auto m = engine_->migrate({"guest", {}, {}, {}, {}, {}, {}, {}});
    ASSERT_TRUE(m) << m.error().message;
    auto done = wait_final((*m)["id"]);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2);
    EXPECT_EQ(done["mode"], "precopy");
    EXPECT_GT(done["result"]["total_time_ms"].get<int>(), 0);
    EXPECT_GE(done["result"]["downtime_ms"].get<int>(), 0);
    EXPECT_FALSE(done["result"]["guest_blackout_ms"].is_null()) << done.dump(2);
    EXPECT_GT(done["progress"]["transferred_bytes"].get<std::uint64_t>(), 32U << 20);

    auto after = *run(io_, engine_->show_vm("guest"));
    EXPECT_EQ(after["generation"], 2);
    EXPECT_EQ(after["status"], "running");
    EXPECT_NE(after["pid"].get<int>(), old_pid);
    EXPECT_FALSE(process_alive(old_pid)) << "the source QEMU must be gone after the hand-off";
    EXPECT_FALSE(std::filesystem::exists(config_.node.state_dir + "/vms/guest/r1"));

    // The guest keeps running on the destination, and its memory is whole.
    EXPECT_TRUE(wait_console("[r2] FERRY-HB"));
    auto report = verify();
    ASSERT_TRUE(report) << report.error().message;
    EXPECT_GE(report->max_pass, 1U);
    EXPECT_EQ(vm_status(), "running");
}

TEST_F(EngineIntegration, DisksAreBlockdevNodesThatQmpCanAddressAndSurviveASameNodeMove) {
    start();
    auto raw = dir_ / "d0.raw", qcow = dir_ / "d1.qcow2";
    ASSERT_EQ(std::system(("truncate -s 10000000 " + raw).c_str()), 0); // not a multiple of 4 KiB
    ASSERT_EQ(std::system(("qemu-img create -q -f qcow2 " + qcow + " 64M").c_str()), 0);
    auto s = spec("ws=8 rate=2 hb=50");
    s.disks.push_back({raw, "raw", true, false});
    s.disks.push_back({qcow, "qcow2", true, false});
    auto vm = run(io_, engine_->create_vm(s));
    ASSERT_TRUE(vm) << vm.error().message;
    ASSERT_TRUE(wait_console("FERRY-HB 2 ")) << ferry::test::read_file(console_log());
    auto nodes = [&] {
        std::set<std::string> names;
        auto r = run(io_, engine_->qmp_command("guest", "query-named-block-nodes", json::object()));
        EXPECT_TRUE(r) << r.error().message;
        if (r)
            for (auto& n : *r)
                names.insert(n.value("node-name", "") + ":" + n.value("drv", ""));
        return names;
    };
    std::set<std::string> want{"disk0:raw", "disk0-file:file", "disk1:qcow2", "disk1-file:file"};
    EXPECT_EQ(nodes(), want);
    auto m = engine_->migrate({"guest", {}, {}, {}, {}, {}, {}, {}});
    ASSERT_TRUE(m) << m.error().message;
    auto done = wait_final((*m)["id"]);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2);
    EXPECT_EQ(nodes(), want) << "the destination QEMU has the same nodes";
    auto report = verify();
    ASSERT_TRUE(report) << report.error().message;
}

TEST_F(EngineIntegration, TheGuestsDiskWriterSurvivesASameNodeMoveAndItsImageVerifies) {
    start();
    auto disk = dir_ / "w.raw";
    ASSERT_EQ(std::system(("truncate -s 16M " + disk).c_str()), 0);
    auto s = spec("ws=8 rate=2 hb=100 disk=512 dsize=4");
    s.disks.push_back({disk, "raw", true, false, "ide"});
    auto vm = run(io_, engine_->create_vm(s));
    ASSERT_TRUE(vm) << vm.error().message;
    ASSERT_TRUE(wait_console("FERRY-DISK-HB pass=1 lba=")) << ferry::test::read_file(console_log());
    EXPECT_EQ(ferry::guest::disk_sectors_from_console(console_log()), 8192U);
    auto m = engine_->migrate({"guest", {}, {}, {}, {}, {}, {}, {}});
    ASSERT_TRUE(m) << m.error().message;
    auto done = wait_final((*m)["id"]);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2);
    // The writer goes on on the destination, and reads back what it wrote
    // before the move.
    ASSERT_TRUE(wait_console("[r2] FERRY-DISK-HB")) << ferry::test::read_file(console_log());
    ASSERT_TRUE(wait_console("FERRY-DISK-HB pass=2")) << ferry::test::read_file(console_log());
    auto log = ferry::test::read_file(console_log());
    EXPECT_EQ(log.find("FERRY-DISK-BAD"), std::string::npos) << log;
    auto paused = run(io_, engine_->qmp_command("guest", "stop", json::object()));
    ASSERT_TRUE(paused) << paused.error().message;
    auto r = ferry::guest::verify_disk_image(disk, 8192);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_GE(r->max_pass, 2U) << r->summary();
}

TEST_F(EngineIntegration, AbortMidMigrationLeavesSourceRunningAndIntact) {
    start();
    auto vm = create("ws=64 rate=2 hb=50");
    int pid = vm["pid"];
    auto m = engine_->migrate({"guest", {}, 4ULL << 20, {}, {}, {}, {}, {}}); // 64 MiB at 4 MiB/s: ~16 s
    ASSERT_TRUE(m) << m.error().message;
    std::string id = (*m)["id"];
    ASSERT_TRUE(wait_transferring(id)) << migration(id).dump(2);
    std::string target_dir = migration(id)["target_dir"];
    EXPECT_FALSE(target_dir.empty());
    auto aborted = engine_->abort_migration(id);
    ASSERT_TRUE(aborted) << aborted.error().message;
    auto done = wait_final(id);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_EQ(done["abort_requested"], true);
    EXPECT_EQ(done["abort_status"], "Succeeded");
    EXPECT_NE(done["failure_reason"].get<std::string>().find("aborted"), std::string::npos);
    EXPECT_FALSE(std::filesystem::exists(target_dir)) << "destination left behind";

    auto after = *run(io_, engine_->show_vm("guest"));
    EXPECT_EQ(after["pid"], pid);
    EXPECT_EQ(after["generation"], 1);
    EXPECT_EQ(vm_status(), "running");
    auto report = verify();
    ASSERT_TRUE(report) << report.error().message;
    // Still alive afterwards: new heartbeats from the same QEMU.
    auto before = ferry::test::read_file(console_log()).size();
    ferry::test::pump(io_, 300ms);
    EXPECT_GT(ferry::test::read_file(console_log()).size(), before);
    // A finished migration cannot be aborted again.
    EXPECT_FALSE(engine_->abort_migration(id));
}

TEST_F(EngineIntegration, KilledDestinationLeavesSourceRunningAndIntact) {
    start();
    auto vm = create("ws=64 rate=2 hb=50");
    int pid = vm["pid"];
    auto m = engine_->migrate({"guest", {}, 4ULL << 20, {}, {}, {}, {}, {}});
    ASSERT_TRUE(m) << m.error().message;
    std::string id = (*m)["id"];
    ASSERT_TRUE(wait_transferring(id)) << migration(id).dump(2);
    int target_pid = migration(id)["target_pid"];
    ASSERT_GT(target_pid, 0);
    ASSERT_EQ(::kill(target_pid, SIGKILL), 0);
    auto done = wait_final(id);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_NE(done["failure_reason"].get<std::string>().find("destination QEMU exited"), std::string::npos)
        << done["failure_reason"];
    auto after = *run(io_, engine_->show_vm("guest"));
    EXPECT_EQ(after["pid"], pid);
    EXPECT_EQ(vm_status(), "running");
    auto report = verify();
    ASSERT_TRUE(report) << report.error().message;
    // And it can still migrate afterwards.
    auto again = engine_->migrate({"guest", {}, {}, {}, {}, {}, {}, {}});
    ASSERT_TRUE(again) << again.error().message;
    EXPECT_EQ(wait_final((*again)["id"])["phase"], "Succeeded");
    ASSERT_TRUE(verify());
}

TEST_F(EngineIntegration, ProgressTimeoutAbortsAndKeepsTheSource) {
    config_.migration.progress_timeout = 3;
    start();
    // Dirtying 64 MiB/s against 8 MiB/s of bandwidth can never converge:
    // every pass re-sends the whole 32 MiB working set.
    create("ws=32 rate=64 hb=50");
    auto m = engine_->migrate({"guest", {}, 8ULL << 20, {}, {}, {}, {}, {}});
    ASSERT_TRUE(m) << m.error().message;
    auto done = wait_final((*m)["id"]);
    EXPECT_EQ(done["phase"], "Failed");
    EXPECT_NE(done["failure_reason"].get<std::string>().find("progress timeout: the dirty set did not shrink"),
              std::string::npos)
        << done["failure_reason"];
    // The smallest pass is the working set (32 MiB), re-sent whole each time.
    std::smatch smallest;
    auto why = done["failure_reason"].get<std::string>();
    ASSERT_TRUE(std::regex_search(why, smallest, std::regex("the smallest pass was ([0-9.]+) MiB"))) << why;
    EXPECT_GT(std::stod(smallest[1]), 24.0) << why;
    EXPECT_EQ(vm_status(), "running");
    ASSERT_TRUE(verify());
}

TEST_F(EngineIntegration, PostcopyWithThePreemptChannelSameNode) {
    config_.migration.allow_post_copy = true; // postcopy_preempt is on by default
    config_.migration.bandwidth_per_migration = 8ULL << 20;
    config_.migration.progress_timeout = 2; // shorter than a pass: post-copy comes first
    start();
    // Scattered writes (each 16 MiB from the last): the guest faults on pages
    // the background push has not reached.
    create("ws=32 rate=64 hb=50 stride=4099");
    EXPECT_EQ(ferry::guest::stride_from_console(console_log()), 4099U);
    auto m = engine_->migrate({"guest", {}, {}, {}, {}, {}, {}, {}});
    ASSERT_TRUE(m) << m.error().message;
    auto done = wait_final((*m)["id"]);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2);
    EXPECT_EQ(done["mode"], "postcopy");
    EXPECT_EQ(done["config"]["postcopy_preempt"], true);
    // The QEMU that now runs the VM (the destination) had the capability.
    auto caps = run(io_, engine_->qmp_command("guest", "query-migrate-capabilities", nlohmann::json::object()));
    ASSERT_TRUE(caps) << caps.error().message;
    bool preempt = false;
    for (auto& c : *caps)
        if (c["capability"] == "postcopy-preempt")
            preempt = c["state"].get<bool>();
    EXPECT_TRUE(preempt) << caps->dump();
    EXPECT_TRUE(wait_console("[r2] FERRY-HB"));
    EXPECT_EQ(vm_status(), "running");
    auto report = verify();
    ASSERT_TRUE(report) << report.error().message;
}

TEST_F(EngineIntegration, ThrottlingTheVcpusLowersTheDirtyRateAndReleasingRestoresIt) {
    start();
    // 96 MiB working set dirtied at 32 MiB/s: a 2 s sample sees the rate,
    // not the working set's size.
    create("ws=96 rate=32 hb=50");
    auto measure = [&] {
        auto r = run(io_, engine_->dirty_rate("guest", 2));
        EXPECT_TRUE(r) << r.error().message;
        return r ? (*r)["dirty_rate_mib_s"].get<int>() : -1;
    };
    auto before = measure();
    auto cpus = run(io_, engine_->qmp_command("guest", "query-cpus-fast", json::object()));
    ASSERT_TRUE(cpus) << cpus.error().message;
    std::vector<pid_t> threads;
    for (auto& c : *cpus)
        threads.push_back(c["thread-id"].get<int>());
    auto pid = engine_->list_vms()[0]["pid"].get<int>();
    auto throttle = ferry::engine::CpuThrottle::create("guest", pid, threads);
    ASSERT_TRUE(throttle) << throttle.error().message;
    ASSERT_TRUE((*throttle)->set(75));
    auto throttled = measure();
    auto group = (*throttle)->group();
    EXPECT_TRUE(std::filesystem::exists(group));
    ASSERT_TRUE((*throttle)->release());
    EXPECT_FALSE(std::filesystem::exists(group));
    for (auto tid : threads)
        EXPECT_EQ(ferry::test::read_file(fmt::format("/proc/{}/task/{}/cgroup", pid, tid)).find("ferry-throttle"),
                  std::string::npos);
    auto after = measure();
    RecordProperty("dirty_mib_s_before", before);
    RecordProperty("dirty_mib_s_throttled_75", throttled);
    RecordProperty("dirty_mib_s_after", after);
    // Page sampling is coarse (a few hundred pages): a clear drop, not a ratio.
    // ~32 MiB/s on an idle machine; a busy one gives the guest less CPU.
    EXPECT_GE(before, 8) << "the guest should dirty ~32 MiB/s";
    EXPECT_LT(throttled, before * 0.6) << "before " << before << ", throttled " << throttled;
    EXPECT_GT(after, throttled) << "released: " << after;
    ASSERT_TRUE(verify());
}

TEST_F(EngineIntegration, AdoptsAQemuStartedElsewhereAndMigratesIt) {
    start();
    // A QEMU some other stack started: its own QMP socket, no ferry console,
    // 128 MiB + 8 KiB as ferry runs a 128 MiB spec under TCG (guest_ram).
    std::string qmp = dir_ / "adopted.qmp";
    pid_t pid = ::fork();
    if (pid == 0) {
        ::execlp("qemu-system-x86_64", "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "131080K",
                 "-nodefaults", "-display", "none", "-kernel", ferry::test::guest_kernel().c_str(), "-append",
                 "ws=16 rate=4 hb=50", "-serial", "null", "-qmp", ("unix:" + qmp + ",server=on,wait=off").c_str(),
                 nullptr);
        _exit(127);
    }
    for (int i = 0; i < 200 && !std::filesystem::exists(qmp); ++i)
        ferry::test::pump(io_, 20ms);
    ferry::test::pump(io_, 1000ms); // let the guest fill its working set

    // Without a spec ferry can watch it but not migrate it.
    auto bare = run(io_, engine_->adopt_vm("guest", qmp, std::nullopt));
    ASSERT_TRUE(bare) << bare.error().message;
    EXPECT_EQ((*bare)["adopted"], true);
    EXPECT_EQ((*bare)["pid"], pid);
    auto refused = engine_->migrate({"guest", {}, {}, {}, {}, {}, {}, {}});
    ASSERT_FALSE(refused);
    EXPECT_NE(refused.error().message.find("--spec"), std::string::npos) << refused.error().message;
    ASSERT_TRUE(run(io_, engine_->delete_vm("guest")));
    EXPECT_TRUE(process_alive(pid)) << "releasing an adopted VM must not stop it";

    // A spec that does not describe it is refused, naming what differs.
    auto wrong_memory = spec("ws=16 rate=4 hb=50");
    wrong_memory.memory = 256ULL << 20;
    auto mismatch = run(io_, engine_->adopt_vm("guest", qmp, wrong_memory));
    ASSERT_FALSE(mismatch);
    EXPECT_NE(mismatch.error().message.find("memory = 256 MiB, which under TCG ferry runs as -m 262152K"),
              std::string::npos)
        << mismatch.error().message;
    EXPECT_NE(mismatch.error().message.find("the running QEMU has 131080 KiB"), std::string::npos)
        << mismatch.error().message;
    auto wrong_cpus = spec("ws=16 rate=4 hb=50");
    wrong_cpus.cpus = 2;
    mismatch = run(io_, engine_->adopt_vm("guest", qmp, wrong_cpus));
    ASSERT_FALSE(mismatch);
    EXPECT_NE(mismatch.error().message.find("cpus = 2, the running QEMU has 1"), std::string::npos)
        << mismatch.error().message;
    EXPECT_FALSE(run(io_, engine_->show_vm("guest"))) << "a refused adoption must not leave a record";

    // With a spec describing it, ferry migrates it into a QEMU of its own.
    auto adopted = run(io_, engine_->adopt_vm("guest", qmp, spec("ws=16 rate=4 hb=50")));
    ASSERT_TRUE(adopted) << adopted.error().message;
    auto m = engine_->migrate({"guest", {}, {}, {}, {}, {}, {}, {}});
    ASSERT_TRUE(m) << m.error().message;
    auto done = wait_final((*m)["id"]);
    ASSERT_EQ(done["phase"], "Succeeded") << done.dump(2);
    int status = 0;
    for (int i = 0; i < 100 && ::waitpid(pid, &status, WNOHANG) == 0; ++i)
        ferry::test::pump(io_, 50ms);
    EXPECT_FALSE(process_alive(pid)) << "the adopted source QEMU must be quit after the hand-off";
    auto vm = *run(io_, engine_->show_vm("guest"));
    EXPECT_EQ(vm["adopted"], false);
    EXPECT_EQ(vm["status"], "running");
    EXPECT_TRUE(wait_console("[r1] FERRY-HB"));
    Engine* e = engine_.get();
    ferry::guest::QmpExec exec = [e](std::string cmd, nlohmann::json args) {
        return e->qmp_command("guest", std::move(cmd), std::move(args));
    };
    auto report = run(io_, ferry::guest::verify_live(exec, 16 * 256, dir_ / "dump.bin"));
    ASSERT_TRUE(report) << report.error().message;
}

TEST_F(EngineIntegration, RejectsBadRequestsWithoutTouchingTheVm) {
    start();
    auto bad = spec("ws=8");
    bad.kernel = dir_ / "no-such-kernel";
    auto r = run(io_, engine_->create_vm(bad));
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("no-such-kernel"), std::string::npos) << r.error().message;
    EXPECT_TRUE(engine_->list_vms().empty());

    // QEMU refusing its arguments: the error carries QEMU's own words.
    auto broken = spec("ws=8");
    broken.extra_args = {"-no-such-option"};
    auto q = run(io_, engine_->create_vm(broken));
    ASSERT_FALSE(q);
    EXPECT_NE(q.error().message.find("exited at start"), std::string::npos) << q.error().message;
    EXPECT_NE(q.error().message.find("no-such-option"), std::string::npos) << q.error().message;

    create("ws=8 rate=1 hb=50");
    EXPECT_EQ(engine_->migrate({"nope", {}, {}, {}, {}, {}, {}, {}}).error().code, ferry::Errc::not_found);
    auto unknown = engine_->migrate({"guest", std::string("node-z"), {}, {}, {}, {}, {}, {}});
    ASSERT_FALSE(unknown);
    EXPECT_NE(unknown.error().message.find("node-z"), std::string::npos);
    auto first = engine_->migrate({"guest", {}, 1ULL << 20, {}, {}, {}, {}, {}});
    ASSERT_TRUE(first);
    auto twice = engine_->migrate({"guest", {}, {}, {}, {}, {}, {}, {}});
    ASSERT_FALSE(twice);
    EXPECT_EQ(twice.error().code, ferry::Errc::conflict);
    auto del = run(io_, engine_->delete_vm("guest"));
    EXPECT_FALSE(del) << "deleting a migrating VM must be refused";
    ASSERT_TRUE(engine_->abort_migration((*first)["id"]));
    EXPECT_EQ(wait_final((*first)["id"])["phase"], "Failed");
    EXPECT_EQ(vm_status(), "running");
}

// --- the memory check itself must catch damage -----------------------------

#include "layout.h"

namespace {
// Writes a dump of `pages` pages whose counters are given.
void write_dump(const std::string& path, const std::vector<std::uint32_t>& counters) {
    std::ofstream out(path, std::ios::binary);
    std::vector<std::uint32_t> page(FERRY_GUEST_WORDS);
    for (std::uint32_t p = 0; p < counters.size(); ++p) {
        page[0] = counters[p];
        for (std::uint32_t w = 1; w < FERRY_GUEST_WORDS; ++w)
            page[w] = ferry_guest_pattern(p, w);
        out.write(reinterpret_cast<const char*>(page.data()), FERRY_GUEST_PAGE);
    }
}
} // namespace

TEST(GuestVerify, AcceptsOneBoundary) {
    TempDir dir;
    write_dump(dir / "d", {5, 5, 5, 4, 4});
    auto r = ferry::guest::verify_dump(dir / "d", 5);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->max_pass, 5U);
    EXPECT_EQ(r->min_pass, 4U);
    EXPECT_EQ(r->boundary, 3U);
    write_dump(dir / "e", {7, 7, 7});
    EXPECT_TRUE(ferry::guest::verify_dump(dir / "e", 3));
}

TEST(GuestVerify, FollowsTheGuestsSweepOrder) {
    TempDir dir;
    // Stride 3 over 5 pages sweeps 0, 3, 1, 4, 2: counters 5 5 5 4 4 in that order.
    write_dump(dir / "s", {5, 5, 4, 5, 4});
    EXPECT_FALSE(ferry::guest::verify_dump(dir / "s", 5)) << "in page order it is a stale page";
    auto r = ferry::guest::verify_dump(dir / "s", 5, 3);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->boundary, 4U);
    write_dump(dir / "t", {5, 4, 5, 5, 4}); // sweep order 5 5 4 4 5: the last (page 2) breaks the order
    auto stale = ferry::guest::verify_dump(dir / "t", 5, 3);
    ASSERT_FALSE(stale);
    EXPECT_NE(stale.error().message.find("guest page 4 holds pass 4 but page 2 holds 5"), std::string::npos)
        << stale.error().message;
    write_dump(dir / "u", {1, 1, 1, 1});
    EXPECT_FALSE(ferry::guest::verify_dump(dir / "u", 4, 2)) << "stride 2 misses half the pages";
    EXPECT_FALSE(ferry::guest::verify_dump(dir / "u", 4, 5)) << "a stride past the pages";
}

TEST(GuestVerify, CatchesStalePagesAndDamage) {
    TempDir dir;
    write_dump(dir / "stale", {5, 5, 4, 5, 4}); // page 2 missed a round
    EXPECT_FALSE(ferry::guest::verify_dump(dir / "stale", 5));
    write_dump(dir / "old", {5, 5, 3, 3}); // two passes behind
    EXPECT_FALSE(ferry::guest::verify_dump(dir / "old", 4));
    write_dump(dir / "two", {6, 5, 5, 4}); // two boundaries
    EXPECT_FALSE(ferry::guest::verify_dump(dir / "two", 4));
    write_dump(dir / "zero", {1, 1, 1});
    {
        std::fstream f(dir / "zero", std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(FERRY_GUEST_PAGE + 100);
        std::uint32_t zero = 0;
        f.write(reinterpret_cast<const char*>(&zero), 4); // a lost page shows as zeros
    }
    auto r = ferry::guest::verify_dump(dir / "zero", 3);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("page 1"), std::string::npos) << r.error().message;
    EXPECT_FALSE(ferry::guest::verify_dump(dir / "zero", 4)) << "a short dump must fail";
}

namespace {
// A disk image as the guest's writer leaves it: sector s at passes[s] (0 = zeros).
void write_disk(const std::string& path, const std::vector<std::uint32_t>& passes) {
    std::ofstream out(path, std::ios::binary);
    std::vector<std::uint32_t> w(FERRY_DISK_WORDS);
    for (std::uint32_t s = 0; s < passes.size(); ++s) {
        std::fill(w.begin(), w.end(), 0);
        if (passes[s]) {
            w[0] = FERRY_DISK_MAGIC;
            w[1] = s;
            w[2] = passes[s];
            for (std::uint32_t i = 3; i < FERRY_DISK_WORDS; ++i)
                w[i] = ferry_disk_pattern(s, passes[s], i);
        }
        out.write(reinterpret_cast<const char*>(w.data()), FERRY_DISK_SECTOR);
    }
}
} // namespace

TEST(GuestVerify, DiskImagesHoldOnePassBoundary) {
    TempDir dir;
    write_disk(dir / "a", {3, 3, 2, 2});
    auto r = ferry::guest::verify_disk_image(dir / "a", 4);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->max_pass, 3U);
    EXPECT_EQ(r->boundary, 2U);
    write_disk(dir / "first", {1, 1, 0, 0}); // the first pass, not finished
    EXPECT_TRUE(ferry::guest::verify_disk_image(dir / "first", 4));
    write_disk(dir / "stale", {3, 2, 3, 2});
    auto stale = ferry::guest::verify_disk_image(dir / "stale", 4);
    ASSERT_FALSE(stale);
    EXPECT_NE(stale.error().message.find("disk sector 2 holds pass 3 after pass 2"), std::string::npos)
        << stale.error().message;
    write_disk(dir / "old", {3, 3, 1, 1});
    EXPECT_FALSE(ferry::guest::verify_disk_image(dir / "old", 4)) << "two passes behind";
    write_disk(dir / "torn", {2, 2, 2});
    {
        std::fstream f(dir / "torn", std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(FERRY_DISK_SECTOR + 300);
        f.write("xy", 2);
    }
    auto torn = ferry::guest::verify_disk_image(dir / "torn", 3);
    ASSERT_FALSE(torn);
    EXPECT_NE(torn.error().message.find("disk sector 1 word 75"), std::string::npos) << torn.error().message;
    EXPECT_FALSE(ferry::guest::verify_disk_image(dir / "torn", 4)) << "a short image must fail";
}

TEST(Hooks, RunInNameOrderSkippingWhatRunPartsSkips) {
    ferry::test::TempDir dir;
    for (auto name : {"20-routes", "10-net", "10-net~", ".hidden", "30-x.dpkg-old", "40-x.swp", "05-data",
                      "50-rpm.rpmnew"})
        ferry::test::write_file(dir / name, "#!/bin/sh\n");
    for (auto name : {"20-routes", "10-net", "10-net~", ".hidden", "30-x.dpkg-old", "40-x.swp", "50-rpm.rpmnew"})
        std::filesystem::permissions(dir / name, std::filesystem::perms::owner_all);
    std::filesystem::create_directories(dir / "15-a-directory");
    auto hooks = ferry::engine::list_hooks(dir.path());
    std::vector<std::string> want{dir / "10-net", dir / "20-routes"}; // 05-data is not executable
    ASSERT_TRUE(hooks) << hooks.error().message;
    EXPECT_EQ(*hooks, want);
    EXPECT_TRUE(ferry::engine::list_hooks("")->empty());
    auto missing = ferry::engine::list_hooks(dir / "missing");
    ASSERT_FALSE(missing) << "a directory that went away fails closed";
    EXPECT_NE(missing.error().message.find("reading the hooks directory " + dir / "missing"), std::string::npos);
}

// A hooks dir of 0755 holding a 0755 hook, both root's, and a hook linked
// from a directory of its own: what ferryd accepts.
namespace {
struct HooksFixture {
    TempDir dir; // 0700, root's
    std::string hooks = dir / "hooks", other = dir / "other";
    HooksFixture() {
        namespace fs = std::filesystem;
        fs::create_directories(hooks);
        fs::create_directories(other);
        ferry::test::write_file(hooks + "/10-net", "#!/bin/sh\necho ran >> " + dir / "ran.log" + "\n");
        ferry::test::write_file(other + "/real", "#!/bin/sh\n");
        fs::create_symlink(other + "/real", hooks + "/20-link");
        for (auto p : {hooks, other, hooks + "/10-net", other + "/real"})
            chmod(p, 0755);
    }
    static void chmod(const std::string& path, int mode) { ASSERT_EQ(::chmod(path.c_str(), mode), 0) << path; }
    static void chown(const std::string& path, uid_t uid) {
        ASSERT_EQ(::chown(path.c_str(), uid, 0), 0) << path << ": the tests run as root";
    }
    static std::string refusal(const std::string& path) {
        auto r = check_hook_path(path);
        return r ? "" : r.error().message;
    }
    std::string refusal_of_dir() {
        auto r = check_hooks(hooks);
        return r ? "" : r.error().message;
    }
    // The hooks of one phase of migration demo-1, on the target node b.
    ferry::Result<std::vector<std::string>> run_phase(asio::io_context& io, HookPhase phase) {
        Migration m;
        m.id = "demo-1";
        m.vm = "demo";
        ferry::config::HooksSection section;
        section.dir = hooks;
        HookCall call{phase, "target", &m, nullptr, "b", -1};
        return run(io, run_hooks(io.get_executor(), section, call, std::chrono::steady_clock::now() + 30s));
    }
};
} // namespace

TEST(Hooks, RefusedWhenWritableByGroupOrOthers) {
    HooksFixture f;
    EXPECT_EQ(f.refusal(f.hooks), "");
    EXPECT_EQ(f.refusal(f.hooks + "/10-net"), "");
    EXPECT_EQ(f.refusal(f.hooks + "/20-link"), "");
    EXPECT_EQ(f.refusal_of_dir(), "");
    EXPECT_TRUE(check_hooks("")) << "no hooks dir, nothing to refuse";
    // 0700 and 0500 are fine: only writing by others matters.
    f.chmod(f.hooks + "/10-net", 0500);
    EXPECT_EQ(f.refusal(f.hooks + "/10-net"), "");

    for (int mode : {0775, 0757, 0666}) {
        f.chmod(f.hooks + "/10-net", mode);
        auto why = f.refusal(f.hooks + "/10-net");
        EXPECT_EQ(why, fmt::format("{}/10-net is writable by group or others (mode {:04o}); hooks must be writable "
                                   "only by their owner",
                                   f.hooks, mode));
        if (mode & 0111) {
            EXPECT_EQ(f.refusal_of_dir(), why);
        }
    }
    f.chmod(f.hooks + "/10-net", 0755);

    // The dir itself, and through it each hook it holds.
    f.chmod(f.hooks, 0777);
    EXPECT_EQ(f.refusal(f.hooks), f.hooks + " is writable by group or others (mode 0777); a directory holding hooks "
                                            "must be writable only by its owner");
    EXPECT_EQ(f.refusal_of_dir(), f.refusal(f.hooks));
    EXPECT_NE(f.refusal(f.hooks + "/10-net").find(f.hooks + ", which holds " + f.hooks + "/10-net, is writable"),
              std::string::npos)
        << f.refusal(f.hooks + "/10-net");
    f.chmod(f.hooks, 01777); // sticky or not
    EXPECT_NE(f.refusal(f.hooks), "");
    f.chmod(f.hooks, 0755);

    // A symlink: judged by its target, and the directory that holds that.
    f.chmod(f.other + "/real", 0777);
    EXPECT_EQ(f.refusal(f.hooks + "/20-link"),
              fmt::format("{}/20-link (-> {}/real) is writable by group or others (mode 0777); hooks must be "
                          "writable only by their owner",
                          f.hooks, f.other));
    EXPECT_EQ(f.refusal_of_dir(), f.refusal(f.hooks + "/20-link"));
    f.chmod(f.other + "/real", 0755);
    f.chmod(f.other, 0775);
    EXPECT_NE(f.refusal(f.hooks + "/20-link")
                  .find(fmt::format("{}, which holds {}/20-link (-> {}/real), is writable by group or others (mode "
                                    "0775); a directory holding hooks must be writable only by its owner",
                                    f.other, f.hooks, f.other)),
              std::string::npos)
        << f.refusal(f.hooks + "/20-link");
    f.chmod(f.other, 0755);
    EXPECT_EQ(f.refusal_of_dir(), "");

    EXPECT_NE(f.refusal(f.dir / "missing").find(f.dir / "missing: No such file or directory"), std::string::npos);
}

TEST(Hooks, RefusedWhenOwnedByAnotherUser) {
    HooksFixture f;
    f.chown(f.hooks + "/10-net", 65534);
    auto why = f.refusal(f.hooks + "/10-net");
    EXPECT_EQ(why, f.hooks + "/10-net is owned by uid 65534, not by root; hooks must be owned by root or by the user "
                             "ferryd runs as");
    EXPECT_EQ(f.refusal_of_dir(), why);
    f.chown(f.hooks + "/10-net", 0);
    EXPECT_EQ(f.refusal_of_dir(), "");

    f.chown(f.hooks, 65534);
    EXPECT_EQ(f.refusal_of_dir(), f.hooks + " is owned by uid 65534, not by root; a directory holding hooks must be "
                                            "owned by root or by the user ferryd runs as");
    f.chown(f.hooks, 0);

    f.chown(f.other + "/real", 65534);
    EXPECT_NE(f.refusal(f.hooks + "/20-link").find(f.hooks + "/20-link (-> " + f.other + "/real) is owned by uid 65534"),
              std::string::npos)
        << f.refusal(f.hooks + "/20-link");
    f.chown(f.other + "/real", 0);
    f.chown(f.other, 65534);
    EXPECT_NE(f.refusal(f.hooks + "/20-link").find(f.other + ", which holds"), std::string::npos)
        << f.refusal(f.hooks + "/20-link");
    EXPECT_NE(f.refusal_of_dir(), "");
    f.chown(f.other, 0);
    EXPECT_EQ(f.refusal_of_dir(), "");
}

// ferryd --check-config, its start and SIGHUP all go through preflight.
TEST(Hooks, PreflightRefusesADirOthersMayWriteNamingTheConfigLine) {
    HooksFixture f;
    ferry::config::NodeConfig c;
    c.file = "/etc/ferry/ferryd.toml";
    c.lines["hooks.dir"] = 12;
    c.node.qemu = "/bin/sh";
    c.hooks.dir = f.hooks;
    auto ok = Engine::preflight(c);
    EXPECT_TRUE(ok) << ok.error().message;
    f.chmod(f.hooks + "/10-net", 0775);
    auto bad = Engine::preflight(c);
    ASSERT_FALSE(bad);
    EXPECT_EQ(bad.error().message, "/etc/ferry/ferryd.toml:12: key 'hooks.dir': " + f.hooks +
                                       "/10-net is writable by group or others (mode 0775); hooks must be writable "
                                       "only by their owner");
}

// At run time the files are checked again: they may have changed since
// ferryd started. A gate fails closed before any of its hooks runs; after
// the switchover the refused hook is a failure and the others run.
// What a hook prints reaches the log and `migrate --wait` as one line with
// its control characters shown, never as a forged log line or an escape
// sequence for the reader's terminal.
TEST(Hooks, OutputIsOneLineWithControlCharactersShown) {
    HooksFixture f;
    std::filesystem::remove(f.hooks + "/20-link");
    ferry::test::write_file(f.hooks + "/10-net",
                            "#!/bin/sh\nprintf 'no bridge\\n2026-12-07T00:00:00.000 info [engine] forged\\n"
                            "\\033[2J\\033]0;title\\007bell\\n' >&2\nexit 3\n");
    asio::io_context io;
    auto r = f.run_phase(io, HookPhase::Prepare);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().message,
              "hook 10-net (prepare on the target b) exited with status 3: no bridge | 2026-12-07T00:00:00.000 info "
              "[engine] forged | \\x1b[2J\\x1b]0;title\\x07bell");
}

TEST(Hooks, RunRefusesAHookOthersMayWriteAndAGateFailsClosed) {
    HooksFixture f;
    std::filesystem::remove(f.hooks + "/20-link");
    ferry::test::write_file(f.hooks + "/20-open", "#!/bin/sh\necho open >> " + f.dir / "ran.log" + "\n");
    f.chmod(f.hooks + "/20-open", 0777);
    asio::io_context io;
    auto gate = f.run_phase(io, HookPhase::Prepare);
    ASSERT_FALSE(gate);
    EXPECT_EQ(gate.error().message, "hook 20-open (prepare on the target b) refused: " + f.hooks +
                                        "/20-open is writable by group or others (mode 0777); hooks must be writable "
                                        "only by their owner");
    EXPECT_FALSE(std::filesystem::exists(f.dir / "ran.log")) << "a gate that refuses a hook runs none of them";

    auto after = f.run_phase(io, HookPhase::Activated);
    ASSERT_TRUE(after) << after.error().message;
    ASSERT_EQ(after->size(), 1U);
    EXPECT_EQ((*after)[0], "hook 20-open (activated on the target b) refused: " + f.hooks +
                               "/20-open is writable by group or others (mode 0777); hooks must be writable only by "
                               "their owner");
    EXPECT_EQ(ferry::test::read_file(f.dir / "ran.log"), "ran\n") << "10-net runs, 20-open does not";

    // The dir others may write: nothing in it runs.
    f.chmod(f.hooks + "/20-open", 0755);
    f.chmod(f.hooks, 0757);
    auto dir_gate = f.run_phase(io, HookPhase::Launched);
    ASSERT_FALSE(dir_gate);
    EXPECT_EQ(dir_gate.error().message, "launched hooks on the target b: " + f.hooks +
                                            " is writable by group or others (mode 0757); a directory holding hooks "
                                            "must be writable only by its owner");
    EXPECT_EQ(ferry::test::read_file(f.dir / "ran.log"), "ran\n");
    f.chmod(f.hooks, 0755);
    auto fixed = f.run_phase(io, HookPhase::Prepare);
    ASSERT_TRUE(fixed) << fixed.error().message;
    EXPECT_EQ(ferry::test::read_file(f.dir / "ran.log"), "ran\nran\nopen\n");
}

// A file that is not a hook is logged once, not at every migration.
TEST(Hooks, SkippedFilesAreLoggedOncePerPath) {
    HooksFixture f;
    ferry::test::write_file(f.hooks + "/30-data", "x\n");
    std::filesystem::create_directories(f.hooks + "/40-dir");
    std::filesystem::create_symlink(f.dir / "nowhere", f.hooks + "/50-dangling");
    std::ostringstream seen;
    auto log = ferry::logger("engine");
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(seen);
    log->sinks().push_back(sink);
    for (int i = 0; i < 3; ++i)
        ASSERT_TRUE(list_hooks(f.hooks));
    log->sinks().pop_back();
    auto text = seen.str();
    auto count = [&](const std::string& what) {
        std::size_t n = 0;
        for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1))
            ++n;
        return n;
    };
    EXPECT_EQ(count(f.hooks + "/30-data is not executable: skipped"), 1U) << text;
    EXPECT_EQ(count(f.hooks + "/40-dir is a directory: skipped"), 1U) << text;
    EXPECT_EQ(count(f.hooks + "/50-dangling is a dangling symlink: skipped"), 1U) << text;
    EXPECT_EQ(count("skipped"), 3U) << text;
}

TEST(Hooks, InputCarriesTheMigrationSpecAndPid) {
    ferry::engine::Migration m;
    m.id = "demo-1";
    m.vm = "demo";
    m.source_node = "a";
    m.target_node = "b";
    ferry::config::VmSpec spec;
    spec.name = "demo";
    ferry::engine::HookCall call{ferry::engine::HookPhase::Launched, "target", &m, &spec, "b", 42};
    auto in = ferry::engine::hook_input(call);
    EXPECT_EQ(in["phase"], "launched");
    EXPECT_EQ(in["role"], "target");
    EXPECT_EQ(in["node"], "b");
    EXPECT_EQ(in["qemu_pid"], 42);
    EXPECT_EQ(in["migration"]["id"], "demo-1");
    EXPECT_EQ(in["spec"]["name"], "demo");
    call.qemu_pid = -1;
    EXPECT_TRUE(ferry::engine::hook_input(call)["qemu_pid"].is_null());
    EXPECT_TRUE(ferry::engine::hook_can_abort(ferry::engine::HookPhase::Launched));
    EXPECT_FALSE(ferry::engine::hook_can_abort(ferry::engine::HookPhase::Activated));
}
