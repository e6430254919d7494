#include "block.hpp"
#include "stats.hpp"

#include "block/target_image.hpp"
#include "config/quantity.hpp"
#include "engine/disk_mirror.hpp"
#include "qmp/client.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
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

Result<Source> start_source(asio::io_context& io, const std::string& dir, const Image& img) {
    Source s;
    auto qmp_sock = dir + "/src-qmp.sock";
    fs::remove(qmp_sock);
    s.pid = spawn({"qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp",
                   "unix:" + qmp_sock + ",server=on,wait=off", "-blockdev",
                   "driver=file,filename=" + img.path + ",node-name=disk0-file,cache.direct=on", "-blockdev",
                   "driver=" + img.format + ",file=disk0-file,node-name=disk0"},
                  dir + "/src-qemu.log");
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
pid_t serve_target(const std::string& dir, const std::string& target, const std::string& format) {
    auto sock = dir + "/dst-nbd.sock";
    fs::remove(sock);
    auto pid = spawn({"qemu-nbd", "--socket", sock, "--format", format, "--export-name", "t", "--persistent",
                      "--shared", "4", "--cache", "none", "--aio", "native", target},
                     dir + "/dst-nbd.log");
    wait_path(sock);
    return pid;
}

Result<void> fresh_target(const std::string& path, const Image& img, std::uint64_t size) {
    fs::remove(path);
    auto r = block::prepare_target_image(path, img.format, size, "");
    if (!r)
        return r.error();
    return {};
}

double since_ms(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

asio::awaitable<Result<void>> qemu_mirror(std::shared_ptr<qmp::Client> qmp, std::string nbd_sock) {
    json add{{"driver", "nbd"}, {"node-name", "tgt"}, {"export", "t"},
             {"server", {{"type", "unix"}, {"path", nbd_sock}}}};
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

asio::awaitable<void> receive(engine::DiskReceiver* r, std::shared_ptr<std::optional<Result<void>>> out) {
    *out = co_await r->run();
}

struct Sample {
    double ms = 0;
    std::uint64_t sent = 0; // data bytes ferry sent (0: not known)
};

Result<Sample> run_once(asio::io_context& io, const std::string& dir, const Image& img, std::uint64_t size,
                        const std::string& path) {
    auto target = dir + "/target." + img.format;
    auto fresh = fresh_target(target, img, size);
    if (!fresh)
        return fresh.error();
    ::sync();
    auto src = start_source(io, dir, img);
    if (!src)
        return src.error();
    pid_t nbd = -1;
    Sample s;
    Result<void> r;
    auto t0 = std::chrono::steady_clock::now();
    if (path == "qemu-mirror") {
        nbd = serve_target(dir, target, img.format);
        t0 = std::chrono::steady_clock::now();
        r = run_sync(io, qemu_mirror(src->qmp, dir + "/dst-nbd.sock"));
        reap(nbd); // qemu-nbd flushes on exit
        s.ms = since_ms(t0);
    } else {
        std::optional<engine::NbdTarget> nbd_target;
        if (img.format == "qcow2") {
            nbd = serve_target(dir, target, img.format);
            nbd_target = engine::NbdTarget{dir + "/dst-nbd.sock", "t"};
        }
        engine::DiskStream a(io), b(io);
        asio::local::connect_pair(a, b);
        fs::remove(dir + "/src-nbd.sock");
        engine::DiskSender sender(src->qmp, "ferry-bench", dir + "/src-nbd.sock",
                                  {{0, img.path, img.format, size, "disk0"}}, std::move(a));
        engine::DiskReceiver receiver({{0, target, img.format, size, ""}}, {nbd_target}, std::move(b));
        auto received = std::make_shared<std::optional<Result<void>>>();
        t0 = std::chrono::steady_clock::now();
        asio::co_spawn(io, receive(&receiver, received), asio::detached);
        r = run_sync(io, sender.start());
        if (r) {
            auto round = run_sync(io, sender.round()); // acknowledged once flushed
            if (!round)
                r = round.error();
        }
        run_sync(io, sender.finish());
        while (!*received)
            io.run_one_for(20ms);
        if (r && !**received)
            r = (*received)->error();
        reap(nbd);
        s.ms = since_ms(t0);
        s.sent = sender.totals()[0].data_bytes;
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
    auto ratio = [&](const std::string& kind) {
        auto& m = med[kind];
        return m.count("ferry") && m.count("qemu-mirror") && m["ferry"] > 0 ? m["qemu-mirror"] / m["ferry"] : 0.0;
    };
    if (o.json) {
        for (auto& [kind, m] : med)
            report["ratios"][kind + "_ferry_speedup"] = ratio(kind);
        std::cout << report.dump(2) << "\n";
        return 0;
    }
    std::cout << fmt::format("\nferry-bench block: a {} disk copied on this machine, {} run(s) each (median)\n", o.size,
                             o.reps);
    std::cout << fmt::format("  {:<6} {:>14} {:>14} {:>10}\n", "image", "qemu-mirror", "ferry", "speedup");
    for (auto& [kind, m] : med)
        std::cout << fmt::format("  {:<6} {:>11.0f} ms {:>11.0f} ms {:>9.2f}x\n", kind, m["qemu-mirror"], m["ferry"],
                                 ratio(kind));
    if (med.count("full") && med.count("tenth") && med["full"]["ferry"] > 0)
        std::cout << fmt::format("  ferry: the 10%-full disk takes {:.0f}% of the full disk's time\n",
                                 100 * med["tenth"]["ferry"] / med["full"]["ferry"]);
    return 0;
}

} // namespace ferry::bench
