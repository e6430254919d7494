#include "transport.hpp"

#include "control/client.hpp"
#include "engine/heartbeat.hpp"
#include "engine/process.hpp"
#include "engine/vm.hpp"
#include "transport/pki.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <fmt/format.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace ferry::bench {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr const char* ram_addr = "0x10000000"; // 256 MiB: above the guest's own memory

unsigned short free_port() {
    asio::io_context io;
    asio::ip::tcp::acceptor a(io, {asio::ip::make_address("127.0.0.1"), 0});
    return a.local_endpoint().port();
}

std::string ram_image(const TransportSetup& s) { return s.work_dir + "/ram.img"; }

config::VmSpec spec(const TransportSetup& s) {
    config::VmSpec v;
    v.name = "xfer";
    v.memory = s.ram_bytes + (512ULL << 20);
    v.kernel = s.build_dir + "/tools/guest/ferry-guest.elf";
    // Idle (halted after boot): every byte moved is the RAM image, and the
    // vCPU takes no CPU from the transfer, running or paused.
    v.append = "ws=1 rate=0 halt=1";
    v.extra_args = {"-device", fmt::format("loader,file={},addr={},force-raw=on", ram_image(s), ram_addr)};
    return v;
}

// RSA-2048 certificates made with the openssl tool, the way QEMU's
// documentation has a user make them.
Result<void> openssl_tls_dir(const std::string& dir) {
    fs::create_directories(dir);
    auto cmd = fmt::format(R"((set -e; cd '{}'
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=bench CA" -keyout ca-key.pem -out ca-cert.pem
for who in server:node-b client:node-a; do
  f=${{who%%:*}}; cn=${{who#*:}}
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$cn" -keyout $f-key.pem -out $f.csr
  printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\n' $cn > $f.ext
  openssl x509 -req -days 30 -in $f.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -extfile $f.ext -out $f-cert.pem
done) >/dev/null 2>&1)", dir);
    if (std::system(cmd.c_str()) != 0)
        return make_error(Errc::internal, "openssl could not make the bench's RSA certificates in " + dir);
    return {};
}

double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

asio::awaitable<void> sleep_for(std::chrono::milliseconds d) {
    asio::steady_timer t(co_await asio::this_coro::executor);
    t.expires_after(d);
    co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
}

TransportSample sample_from(const json& info) {
    TransportSample s;
    s.total_ms = info.value("total-time", 0.0);
    s.downtime_ms = info.value("downtime", 0.0);
    s.transferred_mib = info["ram"].value("transferred", 0.0) / (1 << 20);
    s.mib_per_s = s.total_ms > 0 ? s.transferred_mib / (s.total_ms / 1000) : 0;
    return s;
}

asio::awaitable<Result<TransportSample>> qemu_direct(TransportSetup s, bool tls) {
    auto ex = co_await asio::this_coro::executor;
    config::NodeSection node;
    node.accel = "tcg";
    auto vm = spec(s);
    std::string tls_dir = s.work_dir + "/qemu-tls-" + s.qemu_certs;
    if (tls) {
        if (auto r = qemu_tls_dir(tls_dir, s.qemu_certs); !r)
            co_return r.error();
    }
    auto src_spec = vm, dst_spec = vm;
    if (tls) {
        src_spec.extra_args.insert(src_spec.extra_args.end(),
                                   {"-object", fmt::format("tls-creds-x509,id=tls0,dir={},endpoint=client,verify-peer=on", tls_dir)});
        dst_spec.extra_args.insert(dst_spec.extra_args.end(),
                                   {"-object", fmt::format("tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on", tls_dir)});
    }
    std::string dir = s.work_dir + "/direct";
    fs::create_directories(dir);
    // Named requests: a braced temporary inside co_await is destroyed twice by GCC 12.
    engine::LaunchRequest src_req{&node, &src_spec, dir, 1, false};
    engine::LaunchRequest dst_req{&node, &dst_spec, dir, 2, true};
    auto src = co_await engine::launch_qemu(ex, src_req);
    if (!src)
        co_return src.error();
    auto dst = co_await engine::launch_qemu(ex, dst_req);
    if (!dst) {
        co_await engine::destroy_qemu(ex, *src);
        co_return dst.error();
    }
    co_await sleep_for(1500ms); // let the guest boot
    if (!s.guest_running)
        co_await src->qmp->execute("stop");
    auto port = free_port();
    std::string uri = fmt::format("tcp:127.0.0.1:{}", port);
    json params{{"max-bandwidth", 1ULL << 40}};
    if (tls)
        params = {{"max-bandwidth", 1ULL << 40}, {"tls-creds", "tls0"}, {"tls-hostname", "node-b"}};
    json dst_params = tls ? json{{"tls-creds", "tls0"}} : json::object();
    Result<TransportSample> result = make_error(Errc::internal, "not run");
    Result<json> set_dst = ok(json::object());
    if (!dst_params.empty()) // no co_await inside a conditional expression (GCC 12)
        set_dst = co_await dst->qmp->execute("migrate-set-parameters", dst_params);
    json incoming{{"uri", uri}};
    auto listening = co_await dst->qmp->execute("migrate-incoming", incoming);
    auto set_src = co_await src->qmp->execute("migrate-set-parameters", params);
    json migrate{{"uri", uri}};
    Series series;
    series.source = "query-migrate";
    auto t0 = std::chrono::steady_clock::now();
    auto started = co_await src->qmp->execute("migrate", migrate);
    if (!set_dst || !listening || !set_src || !started) {
        result = make_error(Errc::qemu, !set_dst ? set_dst.error().message : !listening ? listening.error().message
                                        : !set_src ? set_src.error().message : started.error().message);
    } else {
        for (;;) {
            auto q = co_await src->qmp->execute("query-migrate");
            if (!q) {
                result = q.error();
                break;
            }
            auto st = (*q).value("status", "");
            bool over = st == "completed" && (*q).value("total-time", 0) > 0;
            series.offer(point_from_query_migrate(ms_since(t0), *q), over);
            if (over) {
                result = sample_from(*q);
                result->series = std::move(series);
                break;
            }
            if (st == "failed" || st == "cancelled") {
                result = make_error(Errc::qemu, (*q).value("error-desc", st));
                break;
            }
            co_await sleep_for(20ms);
        }
    }
    co_await engine::destroy_qemu(ex, *src);
    co_await engine::destroy_qemu(ex, *dst);
    co_return result;
}

struct Ferryd {
    pid_t pid = -1;
    std::string socket;
};

Result<Ferryd> start_ferryd(const std::string& bin, const std::string& config, const std::string& socket,
                            const std::string& log) {
    Ferryd f;
    f.socket = socket;
    fs::remove(socket);
    f.pid = ::fork();
    if (f.pid == 0) {
        std::freopen(log.c_str(), "a", stderr);
        ::execl(bin.c_str(), "ferryd", "--config", config.c_str(), "--log-level", "warn", nullptr);
        _exit(127);
    }
    for (int i = 0; i < 250 && !fs::exists(socket); ++i)
        std::this_thread::sleep_for(20ms);
    if (!fs::exists(socket))
        return make_error(Errc::io, "ferryd did not start: see " + log);
    return f;
}

void stop_ferryd(Ferryd& f) {
    if (f.pid > 0) {
        ::kill(f.pid, SIGTERM);
        ::waitpid(f.pid, nullptr, 0);
    }
}

// Two ferryd processes peered over loopback.
struct Pair {
    std::string dir;
    Ferryd d[2];
    ~Pair() {
        for (int i = 1; i >= 0; --i)
            stop_ferryd(d[i]);
    }
};

Result<std::unique_ptr<Pair>> start_pair(const TransportSetup& s, const std::string& name, bool tls,
                                         const std::string& migration, const std::string& node_extra) {
    auto pair = std::make_unique<Pair>();
    pair->dir = s.work_dir + "/" + name;
    fs::remove_all(pair->dir);
    fs::create_directories(pair->dir);
    if (tls) {
        auto pki = transport::init_pki(pair->dir + "/pki", {"node-a", "node-b"});
        if (!pki)
            return pki.error();
    }
    unsigned short ports[2] = {free_port(), free_port()};
    const char* names[2] = {"node-a", "node-b"};
    for (int i = 0; i < 2; ++i) {
        std::string cfg = fmt::format(R"([node]
name = "{0}"
state_dir = "{1}/s{2}"
control_socket = "{1}/{2}.sock"
listen = "127.0.0.1:{3}"
accel = "tcg"
{8}
[migration]
disable_tls = {4}
{5}
[[peers]]
name = "{6}"
address = "127.0.0.1:{7}"
)", names[i], pair->dir, i, ports[i], tls ? "false" : "true", migration, names[1 - i], ports[1 - i], node_extra);
        if (tls)
            cfg += fmt::format("[tls]\nca = \"{0}/pki/ca.pem\"\ncert = \"{0}/pki/{1}.pem\"\nkey = \"{0}/pki/{1}-key.pem\"\n",
                               pair->dir, names[i]);
        std::ofstream(fmt::format("{}/{}.toml", pair->dir, i)) << cfg;
        auto f = start_ferryd(s.build_dir + "/tools/ferryd", fmt::format("{}/{}.toml", pair->dir, i),
                              fmt::format("{}/{}.sock", pair->dir, i), fmt::format("{}/{}.log", pair->dir, i));
        if (!f)
            return f.error();
        pair->d[i] = *f;
    }
    return pair;
}

std::string vm_toml(const TransportSetup& s, const std::string& name) {
    auto v = spec(s);
    return fmt::format("name = \"{}\"\nmemory = {}\nkernel = \"{}\"\nappend = \"{}\"\nextra_args = [\"{}\", \"{}\"]\n", name,
                       v.memory, *v.kernel, *v.append, v.extra_args[0], v.extra_args[1]);
}

// Creates the VMs on node-a (running, or paused with --guest paused),
// migrates them all to node-b at once, and waits for the ends.
Result<std::vector<TransportSample>> migrate_all(const TransportSetup& s, Pair& pair, const std::vector<std::string>& vms) {
    auto a = control::Client::connect(pair.d[0].socket);
    if (!a)
        return a.error();
    for (auto& name : vms) {
        auto created = (*a)->call("vm.create", {{"spec", vm_toml(s, name)}, {"source", "bench"}});
        if (!created)
            return created.error();
    }
    std::this_thread::sleep_for(1500ms);
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::string> ids;
    for (auto& name : vms) {
        if (!s.guest_running)
            (*a)->call("vm.qmp", {{"name", name}, {"command", "stop"}});
        auto m = (*a)->call("migration.create", {{"vm", name}, {"target_node", "node-b"}});
        if (!m)
            return m.error();
        ids.push_back((*m)["id"]);
    }
    std::vector<TransportSample> out(ids.size());
    std::vector<bool> done(ids.size(), false);
    for (auto& t : out)
        t.series.source = "ferry progress";
    for (std::size_t left = ids.size(); left > 0;) {
        for (std::size_t i = 0; i < ids.size(); ++i) {
            if (done[i])
                continue;
            auto shown = (*a)->call("migration.show", {{"id", ids[i]}});
            if (!shown)
                return shown.error();
            auto phase = (*shown)["phase"];
            out[i].series.offer(point_from_progress(ms_since(t0), (*shown)["progress"]), phase == "Succeeded");
            if (phase == "Failed")
                return make_error(Errc::internal, "ferry migration failed: " + (*shown)["failure_reason"].get<std::string>());
            if (phase == "Succeeded") {
                auto& t = out[i];
                t.total_ms = (*shown)["result"]["total_time_ms"].get<double>();
                t.downtime_ms = (*shown)["result"]["downtime_ms"].get<double>();
                t.transferred_mib = (*shown)["progress"]["transferred_bytes"].get<double>() / (1 << 20);
                t.mib_per_s = t.total_ms > 0 ? t.transferred_mib / (t.total_ms / 1000) : 0;
                done[i] = true;
                --left;
            }
        }
        std::this_thread::sleep_for(20ms);
    }
    if (auto b = control::Client::connect(pair.d[1].socket))
        for (auto& name : vms)
            (*b)->call("vm.delete", {{"name", name}});
    return out;
}

Result<TransportSample> ferry_path(const TransportSetup& s, bool tls) {
    auto pair = start_pair(s, tls ? "ferry-tls" : "ferry-plain", tls,
                           fmt::format("bandwidth_per_migration = 0\nmultifd_channels = {}", s.multifd), "");
    if (!pair)
        return pair.error();
    auto r = migrate_all(s, **pair, {"xfer"});
    if (!r)
        return r.error();
    return r->front();
}

} // namespace

// QEMU's tls-creds-x509 wants a directory of fixed names.
Result<void> qemu_tls_dir(const std::string& dir, const std::string& certs) {
    if (fs::exists(dir + "/ca-cert.pem"))
        return {};
    if (certs == "rsa")
        return openssl_tls_dir(dir);
    fs::create_directories(dir);
    auto ca = transport::make_ca("bench CA");
    if (!ca)
        return ca.error();
    auto server = transport::make_node_cert(*ca, "node-b");
    auto client = transport::make_node_cert(*ca, "node-a");
    if (!server || !client)
        return make_error(Errc::internal, "cannot make bench certificates");
    for (auto& [name, pem, mode] : std::vector<std::tuple<std::string, std::string, unsigned>>{
             {"ca-cert.pem", ca->cert_pem(), 0644},
             {"server-cert.pem", server->cert_pem(), 0644},
             {"server-key.pem", server->key_pem(), 0600},
             {"client-cert.pem", client->cert_pem(), 0644},
             {"client-key.pem", client->key_pem(), 0600}})
        if (auto r = transport::write_pem(dir + "/" + name, pem, mode); !r)
            return r;
    return {};
}


namespace {
// Heartbeats from a console log ("<ISO time> [rN] FERRY-HB seq interval ...").
std::vector<engine::Heartbeat> heartbeats_in(const std::string& path) {
    std::vector<engine::Heartbeat> out;
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) {
        auto hb = line.find("FERRY-HB ");
        if (hb == std::string::npos || line.size() < 24)
            continue;
        // Only the time of day matters for gaps: HH:MM:SS.mmm at [11, 23).
        std::int64_t ms = 0;
        try {
            ms = ((std::stoll(line.substr(11, 2)) * 60 + std::stoll(line.substr(14, 2))) * 60 +
                  std::stoll(line.substr(17, 2))) * 1000 + std::stoll(line.substr(20, 3));
        } catch (...) {
            continue;
        }
        if (auto b = engine::parse_heartbeat(line.substr(hb), ms))
            out.push_back(*b);
    }
    return out;
}
} // namespace

Result<PostcopySample> run_postcopy(const TransportSetup& s, bool preempt, std::uint64_t bandwidth,
                                    const std::string& memory, int ws_mib, int rate, int stride) {
    PostcopySample out;
    out.preempt = preempt;
    auto pair = start_pair(s, preempt ? "pc-preempt" : "pc-plain", true,
                           fmt::format("bandwidth_per_migration = {}\nallow_post_copy = true\npostcopy_preempt = {}",
                                       bandwidth, preempt ? "true" : "false"),
                           "");
    if (!pair)
        return pair.error();
    auto a = control::Client::connect((*pair)->d[0].socket);
    if (!a)
        return a.error();
    auto spec = fmt::format("name = \"pc\"\nmemory = \"{}\"\nkernel = \"{}\"\nappend = \"ws={} rate={} hb=20 stride={}\"\n",
                            memory, s.build_dir + "/tools/guest/ferry-guest.elf", ws_mib, rate, stride);
    auto created = (*a)->call("vm.create", {{"spec", spec}, {"source", "bench"}});
    if (!created)
        return created.error();
    auto src_console = (*created)["console_log"].get<std::string>();
    for (int i = 0; i < 600; ++i) { // the working set filled and dirtying
        std::ifstream in(src_console);
        std::stringstream ss;
        ss << in.rdbuf();
        if (ss.str().find("FERRY-HB 20 ") != std::string::npos)
            break;
        std::this_thread::sleep_for(50ms);
    }
    auto m = (*a)->call("migration.create", {{"vm", "pc"}, {"target_node", "node-b"}});
    if (!m)
        return m.error();
    json shown;
    for (;;) {
        auto r = (*a)->call("migration.show", {{"id", (*m)["id"]}});
        if (!r)
            return r.error();
        shown = *r;
        if (shown["phase"] == "Failed")
            return make_error(Errc::internal, "post-copy migration failed: " + shown["failure_reason"].get<std::string>());
        if (shown["phase"] == "Succeeded")
            break;
        std::this_thread::sleep_for(20ms);
    }
    if (shown["mode"] != "postcopy")
        return make_error(Errc::internal, "the migration converged without post-copy: make the guest dirty faster");
    out.total_ms = shown["result"]["total_time_ms"].get<double>();
    if (!shown["result"]["guest_blackout_ms"].is_null())
        out.blackout_ms = shown["result"]["guest_blackout_ms"].get<double>();
    // On the destination, every gap between heartbeats beyond the interval is
    // time the guest stood still, waiting for pages.
    auto beats = heartbeats_in((*pair)->dir + "/s1/vms/pc/console.log");
    for (std::size_t i = 1; i < beats.size(); ++i) {
        auto gap = static_cast<double>(beats[i].host_ms - beats[i - 1].host_ms) -
                   static_cast<double>(beats[i].interval_ms) * static_cast<double>(beats[i].seq - beats[i - 1].seq);
        if (gap > 0) {
            out.worst_stall_ms = std::max(out.worst_stall_ms, gap);
            out.stalled_ms += gap;
        }
    }
    if (auto b = control::Client::connect((*pair)->d[1].socket))
        (*b)->call("vm.delete", {{"name", "pc"}});
    return out;
}

Result<void> make_ram_image(const std::string& path, std::uint64_t bytes) {
    if (fs::exists(path) && fs::file_size(path) == bytes)
        return {};
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    std::vector<std::uint64_t> block(1 << 17); // 1 MiB
    std::uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (std::uint64_t done = 0; done < bytes; done += block.size() * 8) {
        for (auto& w : block) {
            x ^= x << 13; // xorshift: cheap, incompressible enough, never a zero page
            x ^= x >> 7;
            x ^= x << 17;
            w = x | 1;
        }
        out.write(reinterpret_cast<const char*>(block.data()), static_cast<std::streamsize>(block.size() * 8));
    }
    if (!out)
        return make_error(Errc::io, "writing " + path);
    return {};
}

Result<ShapingReport> run_shaping(const TransportSetup& s, std::uint64_t per_migration, std::uint64_t node_cap) {
    ShapingReport report;
    report.per_migration = per_migration;
    report.node_cap = node_cap;
    {
        auto pair = start_pair(s, "shape-one", true, fmt::format("bandwidth_per_migration = {}", per_migration), "");
        if (!pair)
            return pair.error();
        auto one = migrate_all(s, **pair, {"one"});
        if (!one)
            return one.error();
        report.single = one->front();
    }
    auto pair = start_pair(s, "shape-two", true, "bandwidth_per_migration = 0",
                           fmt::format("max_migration_bandwidth = {}", node_cap));
    if (!pair)
        return pair.error();
    auto two = migrate_all(s, **pair, {"one", "two"});
    if (!two)
        return two.error();
    report.concurrent = *two;
    return report;
}

Result<TransportSample> run_transport(const TransportSetup& s, const std::string& path) {
    if (path == "ferry-tls" || path == "ferry-plain")
        return ferry_path(s, path == "ferry-tls");
    if (path != "qemu-tcp" && path != "qemu-tls")
        return make_error(Errc::invalid_argument, "unknown path " + path);
    asio::io_context io;
    auto fut = asio::co_spawn(io, qemu_direct(s, path == "qemu-tls"), asio::use_future);
    io.run();
    return fut.get();
}

} // namespace ferry::bench
