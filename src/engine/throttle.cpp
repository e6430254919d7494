#include "engine/throttle.hpp"

#include "common/log.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <optional>
#include <sstream>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

namespace ferry::engine {

namespace {

constexpr long period_us = 100000;

auto log() {
    static auto l = logger("throttle");
    return l;
}

std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> out;
    std::stringstream in(s);
    std::string part;
    while (std::getline(in, part, sep))
        out.push_back(part);
    return out;
}

// One write(2), so the kernel sees the whole value (and its error).
Result<void> write_file(const std::string& path, const std::string& value) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return make_error(Errc::io, fmt::format("{}: {}", path, std::strerror(errno)));
    auto n = ::write(fd, value.data(), value.size());
    int err = errno;
    ::close(fd);
    if (n < 0)
        return make_error(err == ESRCH ? Errc::not_found : Errc::io,
                          fmt::format("writing '{}' to {}: {}", value, path, std::strerror(err)));
    return {};
}

std::vector<pid_t> read_ids(const std::string& path) {
    std::vector<pid_t> ids;
    std::ifstream in(path);
    pid_t id;
    while (in >> id)
        ids.push_back(id);
    return ids;
}

// The mount of the v1 `cpu` hierarchy, or of cgroup2: {mount point, the
// hierarchy path it shows}.
struct Mount {
    std::string point;
    std::string root;
};

std::optional<Mount> find_mount(bool v2) {
    std::ifstream in("/proc/self/mountinfo");
    std::string line;
    while (std::getline(in, line)) {
        auto dash = line.find(" - ");
        if (dash == std::string::npos)
            continue;
        auto pre = split(line.substr(0, dash), ' ');
        auto post = split(line.substr(dash + 3), ' ');
        if (pre.size() < 5 || post.size() < 3)
            continue;
        if (v2 && post[0] == "cgroup2")
            return Mount{pre[4], pre[3]};
        if (!v2 && post[0] == "cgroup") {
            auto opts = split(post[2], ',');
            if (std::find(opts.begin(), opts.end(), "cpu") != opts.end())
                return Mount{pre[4], pre[3]};
        }
    }
    return std::nullopt;
}

std::string join(const Mount& m, const std::string& path) {
    std::string rel = path;
    if (m.root != "/" && rel.rfind(m.root, 0) == 0)
        rel = rel.substr(m.root.size());
    if (rel == "/")
        rel.clear();
    return m.point + rel;
}

std::string group_name(const std::string& vm) { return "ferry-throttle-" + vm; }

// Where a thread sits in the cpu controller.
struct CgroupPlace {
    std::string root;
    std::string path;
    bool v2 = false;
};

Result<CgroupPlace> cpu_cgroup_of(pid_t pid, pid_t tid) {
    auto file = fmt::format("/proc/{}/task/{}/cgroup", pid, tid);
    std::ifstream in(file);
    if (!in)
        return make_error(Errc::not_found, fmt::format("{}: no such thread", file));
    std::string line, v2_path;
    bool has_v2 = false;
    while (std::getline(in, line)) {
        auto first = line.find(':');
        auto second = line.find(':', first + 1);
        if (first == std::string::npos || second == std::string::npos)
            continue;
        auto controllers = split(line.substr(first + 1, second - first - 1), ',');
        auto path = line.substr(second + 1);
        if (std::find(controllers.begin(), controllers.end(), "cpu") != controllers.end()) {
            auto mount = find_mount(false);
            if (!mount)
                return make_error(Errc::not_found, "the cgroup v1 cpu controller is not mounted");
            return CgroupPlace{mount->point, join(*mount, path), false};
        }
        if (line.rfind("0::", 0) == 0) {
            has_v2 = true;
            v2_path = path;
        }
    }
    if (has_v2) {
        auto mount = find_mount(true);
        if (!mount)
            return make_error(Errc::not_found, "cgroup v2 is not mounted");
        std::ifstream controllers(mount->point + "/cgroup.controllers");
        std::string all;
        std::getline(controllers, all);
        auto list = split(all, ' ');
        if (std::find(list.begin(), list.end(), "cpu") == list.end())
            return make_error(Errc::not_found, fmt::format("the cgroup v2 hierarchy at {} has no cpu controller "
                                                           "(cgroup.controllers: '{}')",
                                                           mount->point, all));
        return CgroupPlace{mount->point, join(*mount, v2_path), true};
    }
    return make_error(Errc::not_found, fmt::format("{}: the thread is in no cpu cgroup", file));
}

} // namespace

Result<std::unique_ptr<CpuThrottle>> CpuThrottle::create(const std::string& vm, pid_t pid, std::vector<pid_t> threads) {
    if (threads.empty())
        return make_error(Errc::invalid_argument, "no vCPU threads to throttle");
    auto place = cpu_cgroup_of(pid, pid);
    if (!place)
        return place.error().wrap("auto-converge");
    release_stale(vm, pid);
    std::unique_ptr<CpuThrottle> t(new CpuThrottle);
    t->v2_ = place->v2;
    t->parent_ = place->path;
    t->group_ = place->path + "/" + group_name(vm);
    t->pid_ = pid;
    if (::mkdir(t->group_.c_str(), 0755) != 0 && errno != EEXIST)
        return make_error(Errc::io, fmt::format("auto-converge: creating {}: {}", t->group_, std::strerror(errno)));
    Result<void> r;
    if (t->v2_) {
        // Thread granularity needs a threaded child with the cpu controller.
        r = write_file(t->group_ + "/cgroup.type", "threaded");
        if (r)
            r = write_file(t->parent_ + "/cgroup.subtree_control", "+cpu");
    } else {
        r = write_file(t->group_ + "/cpu.cfs_period_us", std::to_string(period_us));
        if (r)
            r = write_file(t->group_ + "/cpu.cfs_quota_us", "-1");
    }
    for (auto tid : threads) {
        if (!r)
            break;
        r = write_file(t->group_ + (t->v2_ ? "/cgroup.threads" : "/tasks"), std::to_string(tid));
        if (r)
            t->threads_.push_back(tid);
    }
    if (!r) {
        auto err = r.error().wrap("auto-converge");
        t->release();
        return err;
    }
    log()->info("vm {}: {} vCPU thread(s) in {}", vm, t->threads_.size(), t->group_);
    return t;
}

CpuThrottle::~CpuThrottle() {
    auto r = release();
    if (!r)
        log()->error("releasing {}: {}", group_, r.error().message);
}

Result<void> CpuThrottle::set(int percent) {
    percent = std::clamp(percent, 0, 99);
    long quota = percent == 0 ? -1
                              : std::max<long>(1000, period_us * static_cast<long>(threads_.size()) * (100 - percent) / 100);
    Result<void> r;
    if (v2_)
        r = write_file(group_ + "/cpu.max", quota < 0 ? fmt::format("max {}", period_us)
                                                      : fmt::format("{} {}", quota, period_us));
    else
        r = write_file(group_ + "/cpu.cfs_quota_us", std::to_string(quota));
    if (!r)
        return r.error().wrap("auto-converge");
    percent_ = percent;
    return {};
}

Result<void> CpuThrottle::release() {
    if (released_)
        return {};
    released_ = true;
    Result<void> result;
    auto back = parent_ + (v2_ ? "/cgroup.threads" : "/tasks");
    // Everything in the group goes back, including threads that joined it.
    auto ids = read_ids(group_ + (v2_ ? "/cgroup.threads" : "/tasks"));
    for (auto tid : threads_)
        if (std::find(ids.begin(), ids.end(), tid) == ids.end())
            ids.push_back(tid);
    for (auto tid : ids) {
        auto r = write_file(back, std::to_string(tid));
        if (!r && r.error().code != Errc::not_found && result) // a thread that has exited is fine
            result = r.error();
    }
    for (int i = 0; i < 50; ++i) {
        if (::rmdir(group_.c_str()) == 0 || errno == ENOENT)
            return result;
        std::this_thread::sleep_for(std::chrono::milliseconds(10)); // the kernel frees the group lazily
    }
    if (result)
        result = make_error(Errc::io, fmt::format("removing {}: {}", group_, std::strerror(errno)));
    return result;
}

void CpuThrottle::release_stale(const std::string& vm, pid_t pid) {
    auto place = cpu_cgroup_of(pid, pid);
    if (!place)
        return;
    auto group = place->path + "/" + group_name(vm);
    struct stat sb;
    if (::stat(group.c_str(), &sb) != 0)
        return;
    CpuThrottle stale;
    stale.v2_ = place->v2;
    stale.parent_ = place->path;
    stale.group_ = group;
    auto r = stale.release();
    if (r)
        log()->info("vm {}: released the throttle group {} left behind", vm, group);
    else
        log()->error("vm {}: releasing {}: {}", vm, group, r.error().message);
}

} // namespace ferry::engine
