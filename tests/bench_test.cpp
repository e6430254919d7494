// The benchmark report's pure parts: statistics, the progress series, the
// chart scales and the self-contained HTML.
#include "report.hpp"
#include "series.hpp"
#include "stats.hpp"

#include <gtest/gtest.h>

using namespace ferry::bench;

TEST(Stats, SpreadOfAFewRuns) {
    auto s = spread({30, 10, 20, 40});
    EXPECT_EQ(s.n, 4u);
    EXPECT_DOUBLE_EQ(s.median, 25);
    EXPECT_DOUBLE_EQ(s.mean, 25);
    EXPECT_DOUBLE_EQ(s.min, 10);
    EXPECT_DOUBLE_EQ(s.max, 40);
    EXPECT_DOUBLE_EQ(s.q1, 17.5);
    EXPECT_DOUBLE_EQ(s.q3, 32.5);
    EXPECT_DOUBLE_EQ(s.iqr(), 15);
    EXPECT_DOUBLE_EQ(s.relative_range(), 30.0 / 25);
    EXPECT_DOUBLE_EQ(spread({7}).iqr(), 0);
    EXPECT_EQ(spread({}).n, 0u);
    EXPECT_DOUBLE_EQ(spread({}).relative_range(), 0);
    EXPECT_DOUBLE_EQ(median({3, 1, 2}), 2);
}

TEST(Ticks, RoundStepsThatCoverTheRange) {
    EXPECT_EQ(nice_ticks(0, 10, 5), (std::vector<double>{0, 2, 4, 6, 8, 10}));
    EXPECT_EQ(nice_ticks(0, 370, 4), (std::vector<double>{0, 100, 200, 300, 400}));
    EXPECT_EQ(nice_ticks(0, 1.1, 5), (std::vector<double>{0, 0.25, 0.5, 0.75, 1, 1.25}));
    EXPECT_EQ(nice_ticks(0, 0, 4), (std::vector<double>{0, 0.25, 0.5, 0.75, 1}));
    auto t = nice_ticks(0, 4321, 4);
    EXPECT_LE(t.front(), 0);
    EXPECT_GE(t.back(), 4321);
    EXPECT_LE(t.size(), 7u);
    EXPECT_EQ(tick_label(1500, 500), "1500");
    EXPECT_EQ(tick_label(0.5, 0.5), "0.5");
    EXPECT_EQ(tick_label(0.75, 0.25), "0.75");
    EXPECT_EQ(tick_label(2, 0.2), "2.0");
}

TEST(Series, KeepsAPointPerIntervalAndEveryStatusChange) {
    Series s;
    s.every_ms = 250;
    auto at = [](double t, std::uint64_t sent, const char* status) {
        Point p;
        p.t_ms = t;
        p.transferred_bytes = sent;
        p.status = status;
        return p;
    };
    s.offer(at(0, 0, "setup"));
    s.offer(at(5, 0, "active"));      // the status changed
    s.offer(at(100, 10, "active"));   // too soon
    s.offer(at(300, 20, "active"));   // due and moved
    s.offer(at(600, 20, "active"));   // due, nothing moved
    s.offer(at(610, 30, "device"));   // the switchover
    s.offer(at(620, 40, "completed"));
    s.offer(at(621, 40, "completed"), true);
    ASSERT_EQ(s.points.size(), 6u);
    EXPECT_DOUBLE_EQ(s.points[2].t_ms, 300);
    ASSERT_TRUE(s.switchover_ms);
    EXPECT_DOUBLE_EQ(*s.switchover_ms, 610);
    EXPECT_TRUE(is_switchover_status("postcopy-active"));
    EXPECT_TRUE(is_switchover_status("pre-switchover"));
    EXPECT_FALSE(is_switchover_status("active"));
}

TEST(Series, MeasuresTheTransferRateOverAboutTheInterval) {
    Series s;
    s.every_ms = 250;
    auto at = [](double t, std::uint64_t mib_sent, const char* status) {
        Point p;
        p.t_ms = t;
        p.transferred_bytes = mib_sent << 20;
        p.status = status;
        return p;
    };
    s.offer(at(0, 0, "active"));
    s.offer(at(300, 30, "active"));
    s.offer(at(310, 31, "device")); // 10 ms later: measured from t = 0, not over 10 ms
    ASSERT_EQ(s.points.size(), 3u);
    EXPECT_DOUBLE_EQ(s.points[0].transfer_rate_bps, 0);
    EXPECT_DOUBLE_EQ(s.points[1].transfer_rate_bps, 100.0 * (1 << 20));
    EXPECT_DOUBLE_EQ(s.points[2].transfer_rate_bps, 31.0 * (1 << 20) / 0.31);
}

TEST(Series, FromQueryMigrate) {
    auto info = nlohmann::json::parse(R"({"status": "active", "cpu-throttle-percentage": 20,
        "ram": {"transferred": 1000, "remaining": 5000, "mbps": 80, "dirty-pages-rate": 10, "page-size": 4096}})");
    auto p = point_from_query_migrate(12, info);
    EXPECT_EQ(p.transferred_bytes, 1000u);
    EXPECT_EQ(p.remaining_bytes, 5000u);
    EXPECT_DOUBLE_EQ(p.reported_rate_bps, 10e6);
    EXPECT_DOUBLE_EQ(p.dirty_rate_bps, 40960);
    EXPECT_EQ(p.throttle_percent, 20);
    EXPECT_EQ(p.status, "active");
}

TEST(Report, SelfContainedHtmlWithEveryChart) {
    Report r;
    r.scenario = "local";
    r.title = "a test";
    r.environment = {{"cpu_model", "CPU <x>"}, {"cpu_count", 2}};
    r.paths = {"qemu-direct", "ferry"};
    r.metrics = {{"total_ms", "QEMU total time", "ms"}, {"blackout_ms", "Guest blackout", "ms"}};
    for (int rep = 1; rep <= 2; ++rep)
        for (auto& path : r.paths) {
            ReportRun run{path, rep, {{"total_ms", 1000.0 * rep}}, {}};
            for (int i = 0; i < 5; ++i) {
                Point p;
                p.t_ms = 250.0 * i;
                p.remaining_bytes = static_cast<std::uint64_t>(4 - i) << 20;
                p.status = i < 4 ? "active" : "completed";
                run.series.offer(p);
            }
            r.runs.push_back(run);
        }
    r.ratios = {{"ferry_over_direct.total_ms", "ferry / qemu-direct: QEMU total time", 1.0}};
    auto html = render_html(r);
    EXPECT_EQ(html.find("<script"), std::string::npos);
    EXPECT_EQ(html.find("<link"), std::string::npos);
    EXPECT_EQ(html.find("src="), std::string::npos);
    EXPECT_NE(html.find("CPU &lt;x&gt;"), std::string::npos);
    // 1 bar chart (no blackout measured), 4 over all runs, 4 per run.
    std::size_t svgs = 0;
    for (auto at = html.find("<svg xmlns"); at != std::string::npos; at = html.find("<svg xmlns", at + 1))
        ++svgs;
    EXPECT_EQ(svgs, 1u + 4 + 4 * 4);
    EXPECT_NE(html.find(">switchover</text>"), std::string::npos);
    auto summary = summary_json(r);
    EXPECT_DOUBLE_EQ(summary["paths"]["ferry"]["total_ms"]["median"].get<double>(), 1500);
    EXPECT_EQ(summary["paths"]["ferry"]["blackout_ms"]["n"].get<int>(), 0);
    EXPECT_EQ(samples_json(r)["runs"].size(), 4u);
}
