#include "block.hpp"
#include "stats.hpp"
#include "transport.hpp"

#include "block/target_image.hpp"
#include "config/quantity.hpp"
#include "engine/async.hpp"
#include "engine/disk_mirror.hpp"
#include "qmp/client.hpp"
#include "transport/channel.hpp"
#include "transport/data_plane.hpp"
#include "transport/pki.hpp"
#include "transport/tls.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/connect_pair.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_future.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <fcntl.h>
#include <filesystem>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

namespace ferry::bench {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

template <class T> T run_sync(asio::io_context& io, asio::awaitable<T> aw) {
    io.restart();
    auto fut = asio::co_spawn(io, std::move(aw), asio::use_future);
    while (fut.wait_for(0s) != std::future_status::ready)
        io.run_one_for(50ms);
    return fut.get();
}

// Random, incompressible data over [offset, offset + bytes).
Result<void> fill_random(const std::string& path, std::uint64_t offset, std::uint64_t bytes, unsigned seed) {
    int fd = ::open(path.c_str(), O_WRONLY);
    if (fd < 0)
        return make_error(Errc::io, fmt::format("{}: {}", path, std::strerror(errno)));
    std::mt19937_64 rng(seed);
    std::vector<std::uint64_t> buf(1 << 17); // 1 MiB
    for (std::uint64_t done = 0; done < bytes;) {
        for (auto& x : buf)
            x = rng();
        auto n = std::min<std::uint64_t>(bytes - done, buf.size() * 8);
        if (::pwrite(fd, buf.data(), n, static_cast<off_t>(offset + done)) != static_cast<ssize_t>(n)) {
            ::close(fd);
            return make_error(Errc::io, fmt::format("{}: {}", path, std::strerror(errno)));
        }
        done += n;
    }
    ::fsync(fd);
    ::close(fd);
    return {};
}

struct Image {
    std::string path, format;
    std::uint64_t data_bytes = 0; // what it holds
};

Result<Image> make_image(const std::string& dir, const std::string& kind, std::uint64_t size) {
    auto raw_full = dir + "/full.raw";
    auto ensure_full = [&]() -> Result<void> {
        if (fs::exists(raw_full) && fs::file_size(raw_full) == size)
            return {};
        auto r = block::run_tool({"truncate", "-s", std::to_string(size), raw_full});
        if (!r)
            return r.error();
        return fill_random(raw_full, 0, size, 1);
    };
    if (kind == "full") {
        auto r = ensure_full();
        if (!r)
            return r.error();
        return Image{raw_full, "raw", size};
    }
    if (kind == "tenth") {
        auto path = dir + "/tenth.raw";
        if (!fs::exists(path) || fs::file_size(path) != size) {
            fs::remove(path);
            auto t = block::run_tool({"truncate", "-s", std::to_string(size), path});
            if (!t)
                return t.error();
            // Ten pieces, one in each tenth of the disk.
            for (int i = 0; i < 10; ++i) {
                auto f = fill_random(path, size / 10 * i, size / 100 / 4096 * 4096, 2 + i);
                if (!f)
                    return f.error();
            }
        }
        return Image{path, "raw", size / 100 / 4096 * 4096 * 10};
    }
    if (kind == "qcow2") {
        auto path = dir + "/full.qcow2";
        // Made from the full raw image: again when that is made again.
        bool stale = fs::exists(path) && (!fs::exists(raw_full) || fs::file_size(raw_full) != size ||
                                          fs::last_write_time(path) < fs::last_write_time(raw_full));
        if (stale)
            fs::remove(path);
        if (!fs::exists(path)) {
            auto r = ensure_full();
            if (!r)
                return r.error();
            auto c = block::run_tool({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw_full, path});
            if (!c)
                return c.error();
        }
        return Image{path, "qcow2", size};
    }
    return make_error(Errc::invalid_argument, fmt::format("--images: unknown image kind '{}'", kind));
}

pid_t spawn(const std::vector<std::string>& argv, const std::string& log) {
    pid_t pid = ::fork();
    if (pid == 0) {
        int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        ::dup2(fd, 1);
        ::dup2(fd, 2);
        std::vector<char*> args;
        for (auto& a : argv)
            args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        ::execvp(args[0], args.data());
        ::_exit(127);
    }
    return pid;
}

void reap(pid_t& pid, int sig = SIGTERM) {
    if (pid > 0) {
        ::kill(pid, sig);
        ::waitpid(pid, nullptr, 0);
    }
    pid = -1;
}

bool wait_path(const std::string& p) {
    for (int i = 0; i < 500 && !fs::exists(p); ++i)
        std::this_thread::sleep_for(10ms);
    return fs::exists(p);
}

// A source QEMU holding the image as node disk0, its vCPUs never started.
struct Source {
    pid_t pid = -1;
    std::shared_ptr<qmp::Client> qmp;
};

// tls_dir: QEMU's TLS client credentials (tls0), for its NBD client.
Result<Source> start_source(asio::io_context& io, const std::string& dir, const Image& img,
                            const std::string& tls_dir = "") {
    Source s;
    auto qmp_sock = dir + "/src-qmp.sock";
    fs::remove(qmp_sock);
    std::vector<std::string> argv{"qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
                                  "-qmp", "unix:" + qmp_sock + ",server=on,wait=off", "-blockdev",
                                  "driver=file,filename=" + img.path + ",node-name=disk0-file,cache.direct=on",
                                  "-blockdev", "driver=" + img.format + ",file=disk0-file,node-name=disk0"};
    if (!tls_dir.empty())
        argv.insert(argv.end(), {"-object", "tls-creds-x509,id=tls0,dir=" + tls_dir + ",endpoint=client"});
    s.pid = spawn(argv, dir + "/src-qemu.log");
    auto c = run_sync(io, qmp::Client::connect_retry(io.get_executor(), qmp_sock, 10s));
    if (!c) {
        reap(s.pid, SIGKILL);
        return c.error();
    }
    s.qmp = *c;
    return s;
}

// A writable NBD export of a fresh target image (qemu-nbd, as a destination
// QEMU would serve it).
// With tls_dir: on TCP port `port` with TLS (QEMU's NBD TLS needs TCP),
// the client's certificate verified.
pid_t serve_target(const std::string& dir, const std::string& target, const std::string& format,
                   const std::string& tls_dir = "", int port = 0) {
    auto sock = dir + "/dst-nbd.sock";
    fs::remove(sock);
    std::vector<std::string> argv{"qemu-nbd", "--format", format, "--export-name", "t", "--persistent", "--shared",
                                  "4", "--cache", "none", "--aio", "native"};
    if (tls_dir.empty()) {
        argv.insert(argv.end(), {"--socket", sock});
    } else {
        argv.insert(argv.end(), {"--bind", "127.0.0.1", "--port", std::to_string(port), "--object",
                                 "tls-creds-x509,id=tls0,dir=" + tls_dir + ",endpoint=server,verify-peer=on",
                                 "--tls-creds", "tls0"});
    }
    argv.push_back(target);
    auto pid = spawn(argv, dir + "/dst-nbd.log");
    if (tls_dir.empty()) {
        wait_path(sock);
    } else {
        for (int i = 0; i < 500; ++i) { // until it listens
            boost::system::error_code ec;
            asio::io_context io;
            asio::ip::tcp::socket probe(io);
            probe.connect({asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)}, ec);
            if (!ec)
                break;
            std::this_thread::sleep_for(10ms);
        }
    }
    return pid;
}

int free_port() {
    asio::io_context io;
    asio::ip::tcp::acceptor a(io, {asio::ip::make_address("127.0.0.1"), 0});
    return a.local_endpoint().port();
}

Result<void> fresh_target(const std::string& path, const Image& img, std::uint64_t size) {
    fs::remove(path);
    auto r = block::prepare_target_image(path, img.format, size, block::TargetImageRules{});
    if (!r)
        return r.error();
    return {};
}

double since_ms(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// server: the NBD server's SocketAddress; tls: through tls0, the server
// authenticated as node-b.
asio::awaitable<Result<void>> qemu_mirror(std::shared_ptr<qmp::Client> qmp, json server, bool tls) {
    json add{{"driver", "nbd"}, {"node-name", "tgt"}, {"export", "t"}, {"server", server}};
    if (tls) {
        add["tls-creds"] = "tls0";
        add["tls-hostname"] = "node-b";
    }
    auto a = co_await qmp->execute("blockdev-add", add);
    if (!a)
        co_return a.error().wrap("blockdev-add nbd");
    json mirror{{"job-id", "m"}, {"device", "disk0"}, {"target", "tgt"}, {"sync", "full"}};
    auto m = co_await qmp->execute("blockdev-mirror", mirror);
    if (!m)
        co_return m.error().wrap("blockdev-mirror");
    asio::steady_timer t(co_await asio::this_coro::executor);
    for (;;) { // ready: source and target hold the same
        auto jobs = co_await qmp->execute("query-block-jobs");
        if (!jobs)
            co_return jobs.error();
        if (jobs->empty())
            co_return make_error(Errc::qemu, "the mirror job ended before it was ready");
        if ((*jobs)[0].value("ready", false))
            break;
        t.expires_after(20ms);
        co_await t.async_wait(asio::use_awaitable);
    }
    json cancel{{"device", "m"}}; // after ready: completes without pivoting
    auto c = co_await qmp->execute("block-job-cancel", cancel);
    if (!c)
        co_return c.error();
    for (;;) {
        auto jobs = co_await qmp->execute("query-block-jobs");
        if (!jobs || jobs->empty())
            break;
        t.expires_after(20ms);
        co_await t.async_wait(asio::use_awaitable);
    }
    json del{{"node-name", "tgt"}}; // flushes and disconnects
    auto d = co_await qmp->execute("blockdev-del", del);
    if (!d)
        co_return d.error().wrap("blockdev-del");
    co_return Result<void>{};
}

asio::awaitable<Result<void>> receive(engine::DiskReceiver* r) { co_return co_await r->run(); }

// A thread of node-b's ferryd: as on two nodes, the receiving end never
// shares a thread with the sending one.
struct Plane {
    asio::io_context io{1};
    asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
    std::thread thread{[this] { io.run(); }};
};
// node-b's data plane (its end of the TLS channel).
asio::any_io_executor far_plane() {
    static auto* plane = new Plane; // never destroyed, like the data plane
    return plane->io.get_executor();
}
// node-b's main thread (its disk receiver).
asio::any_io_executor far_main() {
    static auto* plane = new Plane;
    return plane->io.get_executor();
}

// ferry's TLS channel between two endpoints on this machine, as two ferryd
// would hold it: node-a dials on its data plane, node-b accepts on its own.
struct TlsPair {
    std::shared_ptr<transport::Channel> a, b;
};

asio::awaitable<Result<std::shared_ptr<transport::Channel>>> accept_tls(std::shared_ptr<asio::ip::tcp::acceptor> acc,
                                                                        std::shared_ptr<transport::TlsIdentity> id) {
    auto [ec, sock] = co_await acc->async_accept(asio::as_tuple(asio::use_awaitable));
    if (ec)
        co_return make_error(Errc::io, "accepting: " + ec.message());
    auto stream = std::make_unique<transport::TlsStream>(std::move(sock), id->server());
    auto [hec] = co_await stream->async_handshake(asio::ssl::stream_base::server, asio::as_tuple(asio::use_awaitable));
    if (hec)
        co_return make_error(Errc::io, "TLS handshake: " + hec.message());
    co_return std::make_shared<transport::Channel>(std::move(stream));
}

Result<TlsPair> tls_pair(const std::string& dir) {
    auto pki = dir + "/ferry-pki";
    if (!fs::exists(pki + "/ca.pem"))
        if (auto r = transport::init_pki(pki, {"node-a", "node-b"}); !r)
            return r.error();
    auto ida = transport::TlsIdentity::load({pki + "/ca.pem", pki + "/node-a.pem", pki + "/node-a-key.pem"}, "node-a");
    auto idb = transport::TlsIdentity::load({pki + "/ca.pem", pki + "/node-b.pem", pki + "/node-b-key.pem"}, "node-b");
    if (!ida || !idb)
        return make_error(Errc::internal, "loading the bench's certificates in " + pki);
    auto acc = std::make_shared<asio::ip::tcp::acceptor>(far_plane(),
                                                          asio::ip::tcp::endpoint{asio::ip::make_address("127.0.0.1"), 0});
    auto port = acc->local_endpoint().port();
    auto accepted = asio::co_spawn(far_plane(), accept_tls(acc, *idb), asio::use_future);
    auto dialled = asio::co_spawn(transport::data_plane(),
                                  transport::dial(transport::data_plane(), fmt::format("127.0.0.1:{}", port), "node-b",
                                                  *ida, 10s),
                                  asio::use_future);
    auto a = dialled.get();
    auto b = accepted.get();
    if (!a)
        return a.error().wrap("dialling");
    if (!b)
        return b.error();
    return TlsPair{*a, *b};
}

struct Sample {
    double ms = 0;
    std::uint64_t sent = 0; // data bytes ferry sent (0: not known)
};

// path: qemu-mirror | ferry (Unix sockets on this machine), qemu-mirror-tls
// (QEMU's NBD TLS over TCP) | ferry-tls (ferry's mirror over its TLS channel).
Result<Sample> run_once(asio::io_context& io, const std::string& dir, const Image& img, std::uint64_t size,
                        const std::string& path) {
    bool tls = path.size() > 4 && path.substr(path.size() - 4) == "-tls";
    auto target = dir + "/target." + img.format;
    auto fresh = fresh_target(target, img, size);
    if (!fresh)
        return fresh.error();
    // QEMU gets certificates of ferry's kind (ECDSA P-256): the same cipher work.
    auto qemu_tls = dir + "/qemu-tls-p256";
    if (tls && path.rfind("qemu", 0) == 0)
        if (auto r = qemu_tls_dir(qemu_tls, "p256"); !r)
            return r.error();
    ::sync();
    auto src = start_source(io, dir, img, tls && path.rfind("qemu", 0) == 0 ? qemu_tls : "");
    if (!src)
        return src.error();
    pid_t nbd = -1;
    Sample s;
    Result<void> r;
    auto t0 = std::chrono::steady_clock::now();
    if (path == "qemu-mirror" || path == "qemu-mirror-tls") {
        json server{{"type", "unix"}, {"path", dir + "/dst-nbd.sock"}};
        if (tls) {
            auto port = free_port();
            nbd = serve_target(dir, target, img.format, qemu_tls, port);
            server = {{"type", "inet"}, {"host", "127.0.0.1"}, {"port", std::to_string(port)}};
        } else {
            nbd = serve_target(dir, target, img.format);
        }
        t0 = std::chrono::steady_clock::now();
        r = run_sync(io, qemu_mirror(src->qmp, server, tls));
        reap(nbd); // qemu-nbd flushes on exit
        s.ms = since_ms(t0);
    } else if (path == "ferry" || path == "ferry-tls") {
        std::optional<engine::NbdTarget> nbd_target;
        if (img.format == "qcow2") {
            nbd = serve_target(dir, target, img.format);
            nbd_target = engine::NbdTarget{dir + "/dst-nbd.sock", "t"};
        }
        engine::DiskStream a(io), b(far_main());
        if (tls) {
            // Each end's stream goes through its channel end, as in ferryd.
            auto pair = tls_pair(dir);
            if (!pair) {
                reap(src->pid, SIGKILL);
                reap(nbd);
                return pair.error().wrap(path);
            }
            engine::DiskStream a_far(transport::data_plane()), b_far(far_plane());
            asio::local::connect_pair(a, a_far);
            asio::local::connect_pair(b, b_far);
            t0 = std::chrono::steady_clock::now();
            asio::co_spawn(transport::data_plane(), transport::run_tunnel(std::move(a_far), pair->a, nullptr),
                           asio::detached);
            asio::co_spawn(far_plane(), transport::run_tunnel(std::move(b_far), pair->b, nullptr), asio::detached);
        } else {
            asio::local::connect_pair(a, b);
        }
        fs::remove(dir + "/src-nbd.sock");
        engine::DiskSender sender(src->qmp, "ferry-bench", dir + "/src-nbd.sock",
                                  {{0, img.path, img.format, size, "disk0"}}, std::move(a));
        engine::DiskReceiver receiver({{0, target, img.format, size, ""}}, {nbd_target}, std::move(b));
        if (!tls)
            t0 = std::chrono::steady_clock::now();
        auto received = asio::co_spawn(far_main(), receive(&receiver), asio::use_future);
        r = run_sync(io, sender.start());
        if (r) {
            auto round = run_sync(io, sender.round()); // acknowledged once flushed
            if (!round)
                r = round.error();
        }
        if (r)
            r = run_sync(io, sender.end_stream());
        run_sync(io, sender.finish());
        auto got = received.get();
        if (r && !got)
            r = got.error();
        reap(nbd);
        s.ms = since_ms(t0);
        s.sent = sender.totals()[0].data_bytes;
    } else if (path == "target-alone") {
        // No source QEMU, no transport: qemu-img writes the image into the
        // same NBD export, 8 requests in flight, out of order (-U: beside
        // the source QEMU, whose guest never runs). What the target's writer
        // alone can take bounds every path through it.
        nbd = serve_target(dir, target, img.format);
        t0 = std::chrono::steady_clock::now();
        auto conv = block::run_tool({"qemu-img", "convert", "-U", "-n", "-m", "8", "-W", "-f", img.format, img.path, "-O",
                                     "raw", "nbd+unix:///t?socket=" + dir + "/dst-nbd.sock"},
                                    std::chrono::seconds(600));
        if (!conv)
            r = conv.error();
        reap(nbd); // qemu-nbd flushes on exit
        s.ms = since_ms(t0);
    } else {
        reap(src->pid, SIGKILL);
        return make_error(Errc::invalid_argument,
                          "unknown path " + path + " (qemu-mirror, ferry, qemu-mirror-tls, ferry-tls, target-alone)");
    }
    reap(src->pid, SIGKILL);
    if (!r)
        return r.error().wrap(path);
    // A copy that differs is no result.
    auto same = block::run_tool({"qemu-img", "compare", "-q", "-f", img.format, "-F", img.format, img.path, target});
    if (!same)
        return make_error(Errc::internal, fmt::format("{}: the target differs from the source: {}", path,
                                                      same.error().message));
    return s;
}

std::vector<std::string> csv(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    for (std::string x; std::getline(ss, x, ',');)
        out.push_back(x);
    return out;
}

} // namespace

int run_block_bench(const BlockOptions& o) {
    auto size = config::parse_quantity(o.size);
    if (!size || *size < (64u << 20) || *size % 4096) {
        std::cerr << "ferry-bench: --size: a quantity of at least 64Mi, a multiple of 4 KiB\n";
        return 2;
    }
    fs::create_directories(o.work_dir);
    asio::io_context io;
    json report{{"scenario", "block"}, {"size", *size}, {"reps", o.reps}};
    std::map<std::string, std::map<std::string, double>> med;
    for (auto& kind : csv(o.images)) {
        auto img = make_image(o.work_dir, kind, *size);
        if (!img) {
            std::cerr << "ferry-bench: " << img.error().message << "\n";
            return 1;
        }
        std::map<std::string, std::vector<double>> ms;
        std::map<std::string, std::uint64_t> sent;
        for (int i = 0; i < o.reps; ++i) {
            for (auto& path : csv(o.paths)) { // interleaved: drift hits both alike
                auto s = run_once(io, o.work_dir, *img, *size, path);
                if (!s) {
                    std::cerr << "ferry-bench: " << kind << " " << s.error().message << "\n";
                    return 1;
                }
                if (!o.json)
                    std::cerr << fmt::format("  run {}/{} {:<6} {:<12} {:8.0f} ms  {:7.1f} MiB/s of disk\n", i + 1,
                                             o.reps, kind, path, s->ms, (*size >> 20) / (s->ms / 1000));
                ms[path].push_back(s->ms);
                sent[path] = s->sent;
            }
        }
        for (auto& [path, list] : ms) {
            med[kind][path] = median(list);
            report["images"][kind][path] = {{"ms_median", med[kind][path]}, {"ms", list},
                                            {"disk_mib_per_s", (*size >> 20) / (med[kind][path] / 1000)}};
            if (sent[path])
                report["images"][kind][path]["data_bytes_sent"] = sent[path];
        }
        report["images"][kind]["holds_bytes"] = img->data_bytes;
    }
    // QEMU's time over ferry's: above 1, ferry is faster.
    auto ratio = [&](const std::string& kind, const std::string& suffix) {
        auto& m = med[kind];
        auto q = "qemu-mirror" + suffix, f = "ferry" + suffix;
        return m.count(f) && m.count(q) && m[f] > 0 ? m[q] / m[f] : 0.0;
    };
    if (o.json) {
        for (auto& [kind, m] : med) {
            report["ratios"][kind + "_ferry_speedup"] = ratio(kind, "");
            report["ratios"][kind + "_ferry_tls_speedup"] = ratio(kind, "-tls");
        }
        std::cout << report.dump(2) << "\n";
        return 0;
    }
    std::cout << fmt::format("\nferry-bench block: a {} disk copied on this machine, {} run(s) each (median)\n", o.size,
                             o.reps);
    std::cout << fmt::format("  {:<6} {:<6} {:>14} {:>14} {:>10}\n", "image", "link", "qemu-mirror", "ferry",
                             "speedup");
    for (auto& [kind, m] : med)
        for (std::string suffix : {"", "-tls"})
            if (m.count("ferry" + suffix) || m.count("qemu-mirror" + suffix))
                std::cout << fmt::format("  {:<6} {:<6} {:>11.0f} ms {:>11.0f} ms {:>9.2f}x\n", kind,
                                         suffix.empty() ? "plain" : "TLS", m["qemu-mirror" + suffix],
                                         m["ferry" + suffix], ratio(kind, suffix));
    // ferry writes raw images itself; a qcow2 goes through the target's NBD
    // export on both paths, so what that takes alone bounds them both.
    for (auto& [kind, m] : med)
        if (m.count("target-alone") && m["target-alone"] > 0) {
            std::cout << fmt::format("  {}: the target's NBD export alone takes {:.0f} ms", kind, m["target-alone"]);
            if (kind == "qcow2" && m.count("qemu-mirror-tls"))
                std::cout << fmt::format("; both write through it, so over TLS no transport can beat QEMU's mirror by "
                                         "more than {:.2f}x",
                                         m["qemu-mirror-tls"] / m["target-alone"]);
            else if (kind != "qcow2")
                std::cout << " (ferry writes raw images itself, not through it)";
            std::cout << "\n";
        }
    if (med.count("full") && med.count("tenth") && med["full"]["ferry"] > 0)
        std::cout << fmt::format("  ferry: the 10%-full disk takes {:.0f}% of the full disk's time\n",
                                 100 * med["tenth"]["ferry"] / med["full"]["ferry"]);
    return 0;
}

} // namespace ferry::bench
