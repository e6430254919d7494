#include "local.hpp"

#include "engine/engine.hpp"
#include "engine/heartbeat.hpp"
#include "engine/vm.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace ferry::bench {

namespace asio = boost::asio;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

asio::awaitable<void> sleep_for(std::chrono::milliseconds d) {
    asio::steady_timer t(co_await asio::this_coro::executor);
    t.expires_after(d);
    co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
}

// Waits until the guest has filled its working set and printed heartbeats.
asio::awaitable<Result<void>> wait_guest(std::string console_log) {
    for (int i = 0; i < 1200; ++i) {
        std::ifstream in(console_log);
        std::stringstream ss;
        ss << in.rdbuf();
        if (ss.str().find("FERRY-HB 3 ") != std::string::npos)
            co_return Result<void>{};
        co_await sleep_for(50ms);
    }
    co_return make_error(Errc::timeout, "the guest did not come up within 60 s");
}

double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

json caps(bool pause, bool auto_converge = false, bool postcopy = false) {
    json c = json::array();
    c.push_back({{"capability", "events"}, {"state", true}});
    if (pause)
        c.push_back({{"capability", "pause-before-switchover"}, {"state", true}});
    if (auto_converge)
        c.push_back({{"capability", "auto-converge"}, {"state", true}});
    if (postcopy)
        c.push_back({{"capability", "postcopy-ram"}, {"state", true}});
    return c;
}

} // namespace

asio::awaitable<Result<Sample>> run_qemu_direct(LocalSetup s) {
    auto ex = co_await asio::this_coro::executor;
    std::string vm_dir = s.work_dir + "/direct";
    std::filesystem::create_directories(vm_dir);
    engine::LaunchRequest src_req{&s.node.node, &s.spec, vm_dir, 1, false};
    auto src = co_await engine::launch_qemu(ex, src_req);
    if (!src)
        co_return src.error();
    auto up = co_await wait_guest(vm_dir + "/console.log");
    if (!up) {
        co_await engine::destroy_qemu(ex, *src);
        co_return up.error();
    }
    Sample out;
    out.series.source = "query-migrate";
    auto t0 = std::chrono::steady_clock::now();
    engine::LaunchRequest dst_req{&s.node.node, &s.spec, vm_dir, 2, true};
    auto dst = co_await engine::launch_qemu(ex, dst_req);
    if (!dst) {
        co_await engine::destroy_qemu(ex, *src);
        co_return dst.error();
    }
    json c{{"capabilities", caps(false, false, s.qemu_postcopy_after_syncs > 0)}};
    co_await dst->qmp->execute("migrate-set-capabilities", c);
    json incoming{{"uri", "unix:" + dst->migrate_socket()}};
    co_await dst->qmp->execute("migrate-incoming", incoming);
    json src_caps{{"capabilities", caps(false, s.qemu_auto_converge, s.qemu_postcopy_after_syncs > 0)}};
    bool postcopy_started = false;
    co_await src->qmp->execute("migrate-set-capabilities", src_caps);
    auto bw = s.node.migration.bandwidth_per_migration;
    json params{{"max-bandwidth", bw == 0 ? (1ULL << 40) : bw},
                {"max-postcopy-bandwidth", bw},
                {"downtime-limit", s.node.migration.max_downtime_ms}};
    co_await src->qmp->execute("migrate-set-parameters", params);
    json migrate{{"uri", "unix:" + dst->migrate_socket()}};
    auto started = co_await src->qmp->execute("migrate", migrate);
    Result<Sample> result = out;
    if (!started)
        result = started.error();
    json info;
    while (result) {
        auto q = co_await src->qmp->execute("query-migrate");
        if (!q) {
            result = q.error();
            break;
        }
        info = *q;
        out.series.offer(point_from_query_migrate(ms_since(t0), info));
        if (out.first_pass_mib == 0 && info.contains("ram") && info["ram"].value("dirty-sync-count", 0) >= 2)
            out.first_pass_mib = info["ram"].value("transferred", 0.0) / (1 << 20);
        out.throttle_percent = std::max(out.throttle_percent, info.value("cpu-throttle-percentage", 0));
        auto status = info.value("status", "");
        if (status == "completed" && info.value("total-time", 0) > 0)
            break;
        if (s.qemu_postcopy_after_syncs > 0 && !postcopy_started && status == "active" &&
            info["ram"].value("dirty-sync-count", 0) > s.qemu_postcopy_after_syncs) {
            co_await src->qmp->execute("migrate-start-postcopy");
            postcopy_started = true;
            out.mode = "postcopy";
        }
        if (s.time_limit.count() > 0 && ms_since(t0) > static_cast<double>(s.time_limit.count()) * 1000.0) {
            co_await src->qmp->execute("migrate_cancel");
            out.outcome = "timeout";
            out.transferred_mib = info["ram"].value("transferred", 0.0) / (1 << 20);
            break;
        }
        if (status == "failed" || status == "cancelled") {
            result = make_error(Errc::qemu, "direct migration " + status);
            break;
        }
        co_await sleep_for(5ms);
    }
    while (result && out.outcome == "succeeded") {
        auto st = co_await dst->qmp->execute("query-status");
        if (st && (*st).value("running", false))
            break;
        co_await sleep_for(2ms);
    }
    if (result && out.outcome != "succeeded") {
        out.wall_ms = ms_since(t0);
        result = out;
    } else if (result) {
        out.wall_ms = ms_since(t0);
        out.total_ms = info.value("total-time", 0);
        out.downtime_ms = info.value("downtime", 0);
        out.transferred_mib = info["ram"].value("transferred", 0.0) / (1 << 20);
        auto src_beats = src->console->heartbeat_list();
        for (int i = 0; i < 100; ++i) {
            if (auto b = engine::guest_blackout_ms(src_beats, dst->console->heartbeat_list())) {
                out.blackout_ms = static_cast<double>(*b);
                break;
            }
            co_await sleep_for(20ms);
        }
        result = out;
    }
    co_await engine::destroy_qemu(ex, *src);
    co_await engine::destroy_qemu(ex, *dst);
    co_return result;
}

asio::awaitable<Result<Sample>> run_ferry(LocalSetup s) {
    auto ex = co_await asio::this_coro::executor;
    s.node.node.state_dir = s.work_dir + "/ferry";
    engine::Engine engine(ex, s.node);
    auto started = co_await engine.start();
    if (!started)
        co_return started.error();
    auto vm = co_await engine.create_vm(s.spec);
    if (!vm)
        co_return vm.error();
    Result<Sample> result = Sample{};
    auto up = co_await wait_guest((*vm)["console_log"]);
    if (!up)
        result = up.error();
    if (result) {
        auto t0 = std::chrono::steady_clock::now();
        auto m = engine.migrate({s.spec.name, {}, {}, {}, {}, {}, {}, {}});
        if (!m)
            result = m.error();
        // Wall time ends at the hand-off (the VM record points at the running
        // destination), like the direct path; Succeeded comes later, once the
        // guest's blackout has been measured.
        std::optional<double> handed_off;
        double first_pass_mib = 0;
        Series series;
        series.source = "ferry progress";
        while (result) {
            if (!handed_off && engine.list_vms()[0]["generation"].get<int>() > 1)
                handed_off = ms_since(t0);
            auto shown = *engine.show_migration((*m)["id"]);
            bool over = shown["phase"] == "Succeeded" || shown["phase"] == "Failed";
            series.offer(point_from_progress(ms_since(t0), shown["progress"]), over);
            if (first_pass_mib == 0 && shown["progress"]["iteration"].get<int>() >= 2)
                first_pass_mib = shown["progress"]["transferred_bytes"].get<double>() / (1 << 20);
            if (shown["phase"] == "Succeeded") {
                Sample out;
                out.wall_ms = handed_off.value_or(ms_since(t0));
                out.total_ms = shown["result"]["total_time_ms"].get<double>();
                out.downtime_ms = shown["result"]["downtime_ms"].get<double>();
                if (!shown["result"]["guest_blackout_ms"].is_null())
                    out.blackout_ms = shown["result"]["guest_blackout_ms"].get<double>();
                out.transferred_mib = shown["progress"]["transferred_bytes"].get<double>() / (1 << 20);
                out.mode = shown["mode"];
                out.throttle_percent = shown["progress"]["throttle_percent"];
                out.first_pass_mib = first_pass_mib;
                out.series = std::move(series);
                result = out;
                break;
            }
            if (shown["phase"] == "Failed" && s.keep_failures) {
                Sample out;
                out.wall_ms = ms_since(t0);
                out.outcome = "failed: " + shown["failure_reason"].get<std::string>();
                out.mode = shown["mode"];
                out.throttle_percent = shown["progress"]["throttle_percent"];
                out.transferred_mib = shown["progress"]["transferred_bytes"].get<double>() / (1 << 20);
                out.series = std::move(series);
                result = out;
                break;
            }
            if (shown["phase"] == "Failed") {
                result = make_error(Errc::internal, "ferry migration failed: " + shown["failure_reason"].get<std::string>());
                break;
            }
            co_await sleep_for(2ms);
        }
    }
    if (std::getenv("FERRY_BENCH_KEEP")) { // the VM's console and logs, to look at
        std::error_code ec;
        std::filesystem::copy(s.node.node.state_dir + "/vms", s.work_dir + "/kept", std::filesystem::copy_options::recursive, ec);
    }
    co_await engine.delete_vm(s.spec.name);
    engine.shutdown();
    co_return result;
}

} // namespace ferry::bench
