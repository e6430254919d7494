// Micro-benchmarks of the hot pure code: parsing what QEMU and operators send,
// and the guest memory check.
#include "config/quantity.hpp"
#include "config/vm_spec.hpp"
#include "engine/heartbeat.hpp"
#include "engine/migration.hpp"
#include "verify.hpp"
#include "layout.h"
#include "transport/frame.hpp"
#include "transport/shaper.hpp"

#include <benchmark/benchmark.h>

#include <cstdio>
#include <fstream>
#include <vector>

namespace {

const char* query_migrate_reply =
    R"({"return": {"expected-downtime": 300, "status": "active", "setup-time": 1, "total-time": 188,
    "ram": {"total": 268967936, "postcopy-requests": 0, "dirty-sync-count": 3, "multifd-bytes": 0,
    "pages-per-second": 132759, "downtime-bytes": 0, "page-size": 4096, "remaining": 1531904,
    "postcopy-bytes": 0, "mbps": 3127.23, "transferred": 68154515, "dirty-sync-missed-zero-copy": 0,
    "precopy-bytes": 68154515, "duplicate": 49167, "dirty-pages-rate": 0, "skipped": 0,
    "normal-bytes": 67579904, "normal": 16499}}, "id": 11})";

void BM_ProgressFromQueryMigrate(benchmark::State& state) {
    for (auto _ : state) {
        auto j = nlohmann::json::parse(query_migrate_reply);
        auto p = ferry::engine::progress_from_query_migrate(j["return"]);
        benchmark::DoNotOptimize(p);
    }
}
BENCHMARK(BM_ProgressFromQueryMigrate);

void BM_ParseQuantity(benchmark::State& state) {
    for (auto _ : state)
        benchmark::DoNotOptimize(ferry::config::parse_quantity("1.5Gi"));
}
BENCHMARK(BM_ParseQuantity);

void BM_ParseHeartbeat(benchmark::State& state) {
    for (auto _ : state)
        benchmark::DoNotOptimize(ferry::engine::parse_heartbeat("FERRY-HB 12345 50 pass=17", 1));
}
BENCHMARK(BM_ParseHeartbeat);

void BM_ParseVmSpec(benchmark::State& state) {
    const char* text = "name = \"web-1\"\nmemory = \"1Gi\"\ncpus = 2\nkernel = \"/k\"\n"
                       "labels = { app = \"web\" }\n[[disks]]\npath = \"/d.raw\"\n";
    for (auto _ : state)
        benchmark::DoNotOptimize(ferry::config::parse_vm_spec(text, "vm.toml"));
}
BENCHMARK(BM_ParseVmSpec);

void BM_VerifyDump(benchmark::State& state) {
    const std::uint32_t pages = 16384; // 64 MiB
    std::string path = "/tmp/ferry-micro-dump.bin";
    {
        std::ofstream out(path, std::ios::binary);
        std::vector<std::uint32_t> page(FERRY_GUEST_WORDS);
        for (std::uint32_t p = 0; p < pages; ++p) {
            page[0] = p < pages / 2 ? 2 : 1;
            for (std::uint32_t w = 1; w < FERRY_GUEST_WORDS; ++w)
                page[w] = ferry_guest_pattern(p, w);
            out.write(reinterpret_cast<const char*>(page.data()), FERRY_GUEST_PAGE);
        }
    }
    for (auto _ : state)
        benchmark::DoNotOptimize(ferry::guest::verify_dump(path, pages));
    state.SetBytesProcessed(state.iterations() * std::int64_t(pages) * FERRY_GUEST_PAGE);
    std::remove(path.c_str());
}
BENCHMARK(BM_VerifyDump)->Unit(benchmark::kMillisecond);

void BM_EncodeFrame(benchmark::State& state) {
    nlohmann::json ping{{"type", "pong"}, {"qemu", "running"}};
    for (auto _ : state)
        benchmark::DoNotOptimize(ferry::transport::encode_frame(ping));
}
BENCHMARK(BM_EncodeFrame);

void BM_DecodeFrames(benchmark::State& state) {
    std::string stream;
    for (int i = 0; i < 64; ++i)
        stream += ferry::transport::encode_frame({{"type", "pong"}, {"qemu", "running"}, {"n", i}});
    for (auto _ : state) {
        ferry::transport::FrameDecoder d;
        d.feed(stream.data(), stream.size());
        int frames = 0;
        while (auto f = d.next())
            frames += *f ? 1 : 0;
        benchmark::DoNotOptimize(frames);
    }
    state.SetItemsProcessed(state.iterations() * 64);
}
BENCHMARK(BM_DecodeFrames);

// The shaper's cost per tunnel write (1 MiB buffers): tiny next to the copy.
void BM_TokenBucketTake(benchmark::State& state) {
    ferry::transport::TokenBucket b(64ULL << 20);
    auto now = ferry::transport::ShaperClock::now();
    for (auto _ : state) {
        now += std::chrono::microseconds(100);
        benchmark::DoNotOptimize(b.take(65536, now));
    }
}
BENCHMARK(BM_TokenBucketTake);

void BM_NodeShaperRebalance(benchmark::State& state) {
    ferry::transport::NodeShaper s(1ULL << 30);
    for (int i = 0; i < 8; ++i)
        s.add("m" + std::to_string(i), i % 2 ? 0 : (64ULL << 20));
    for (auto _ : state) {
        s.add("x", 0);
        s.remove("x");
    }
}
BENCHMARK(BM_NodeShaperRebalance);

} // namespace

BENCHMARK_MAIN();
