#include "block/target_image.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>
#include <csignal>
#include <fcntl.h>
#include <poll.h>
#include <filesystem>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace ferry::block {

namespace fs = std::filesystem;

std::string shell_quote(const std::string& s) {
    std::string out = "'";
    for (char c : s) {
        if (c == '\'')
            out += "'\\''";
        else
            out += c;
    }
    return out + "'";
}

Result<std::string> run_tool(const std::vector<std::string>& argv, std::chrono::seconds timeout) {
    int pipefd[2];
    if (::pipe2(pipefd, O_CLOEXEC) < 0)
        return make_error(Errc::io, fmt::format("{}: pipe: {}", argv[0], std::strerror(errno)));
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, pipefd[1], 1);
    posix_spawn_file_actions_adddup2(&actions, pipefd[1], 2);
    std::vector<char*> args;
    for (auto& a : argv)
        args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    // Its own process group, so that a timeout reaches what it started.
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    posix_spawnattr_setpgroup(&attr, 0);
    pid_t pid = -1;
    int rc = ::posix_spawnp(&pid, argv[0].c_str(), &actions, &attr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    ::close(pipefd[1]);
    if (rc != 0) {
        ::close(pipefd[0]);
        return make_error(Errc::io, fmt::format("running {}: {}", argv[0], std::strerror(rc)));
    }
    std::string out;
    char buf[4096];
    auto deadline = std::chrono::steady_clock::now() + timeout;
    bool timed_out = false, reaped = false;
    int status = 0;
    for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        pollfd p{pipefd[0], POLLIN, 0};
        int ready = left.count() > 0 ? ::poll(&p, 1, static_cast<int>(std::min<std::int64_t>(left.count(), 1000))) : 0;
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready == 0) {
            // Exited, and something it left behind holds the pipe: done.
            if (::waitpid(pid, &status, WNOHANG) == pid) {
                reaped = true;
                break;
            }
            if (std::chrono::steady_clock::now() < deadline)
                continue;
            timed_out = true;
            ::kill(-pid, SIGKILL);
            break;
        }
        auto n = ::read(pipefd[0], buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (out.size() < (1 << 20))
            out.append(buf, static_cast<std::size_t>(n));
    }
    ::close(pipefd[0]);
    // It closed its output: it still gets only its timeout to exit, and
    // after SIGKILL a few seconds (a process stuck in the kernel may not die).
    auto reap_by = [&](std::chrono::steady_clock::time_point until) {
        while (!reaped) {
            auto r = ::waitpid(pid, &status, WNOHANG);
            if (r == pid || (r < 0 && errno != EINTR)) {
                reaped = r == pid;
                return true;
            }
            if (std::chrono::steady_clock::now() >= until)
                return false;
            ::usleep(10000);
        }
        return true;
    };
    if (!reap_by(deadline)) {
        timed_out = true;
        ::kill(-pid, SIGKILL);
    }
    if (!reap_by(std::chrono::steady_clock::now() + std::chrono::seconds(5)))
        return make_error(Errc::timeout, fmt::format("{} (pid {}) did not finish within {} s and did not die when "
                                                     "killed",
                                                     argv[0], pid, timeout.count()));
    if (timed_out)
        return make_error(Errc::timeout, fmt::format("{} did not finish within {} s and was killed", argv[0],
                                                     timeout.count()));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        while (!out.empty() && (out.back() == '\n' || out.back() == ' '))
            out.pop_back();
        auto how = WIFEXITED(status) ? fmt::format("exit status {}", WEXITSTATUS(status))
                                     : fmt::format("signal {}", WTERMSIG(status));
        return make_error(Errc::io, fmt::format("{} failed ({}): {}", argv[0], how, out));
    }
    return out;
}

Result<ImageInfo> inspect_image(const std::string& path) {
    auto out = run_tool({"qemu-img", "info", "--output=json", "-U", path});
    if (!out)
        return out.error().wrap(fmt::format("inspecting {}", path));
    auto j = nlohmann::json::parse(*out, nullptr, false);
    if (!j.is_object() || !j.contains("format") || !j["virtual-size"].is_number_unsigned())
        return make_error(Errc::protocol, fmt::format("inspecting {}: qemu-img info printed no image", path));
    return ImageInfo{j.value("format", ""), j["virtual-size"].get<std::uint64_t>(),
                     j.value("actual-size", std::uint64_t{0})};
}

bool image_in_use(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 100; // QEMU's permission bytes, then its "shared" ones
    fl.l_len = 200;
    bool held = ::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
    ::close(fd);
    return held;
}

namespace {

// What an existing target path holds, checked before anything is written:
// the file it is (a link followed only to a block device), in use or not,
// of the disk's format and size.
Result<PreparedImage> check_existing(const std::string& path, const std::string& format, std::uint64_t size,
                                     const TargetImageRules& rules, const struct stat& link) {
    struct stat st {};
    if (S_ISLNK(link.st_mode)) {
        std::error_code ec;
        auto to = fs::read_symlink(path, ec).string();
        if (::stat(path.c_str(), &st) != 0)
            return make_error(Errc::conflict,
                              fmt::format("target image {} is a dangling symbolic link (to {}); ferry follows no "
                                          "link to create an image: remove it, or map the disk elsewhere with "
                                          "[[block.path_map]]",
                                          path, to));
        if (!S_ISBLK(st.st_mode))
            return make_error(Errc::conflict,
                              fmt::format("target image {} is a symbolic link (to {}); ferry writes through a link "
                                          "only to a block device: map the disk to a real path with "
                                          "[[block.path_map]]",
                                          path, to));
    } else {
        st = link;
    }
    if (S_ISREG(st.st_mode) && !rules.reuse_existing)
        return make_error(Errc::already_exists,
                          fmt::format("target image {} already exists, and ferry does not write over a file it did "
                                      "not create: remove or move it, map the disk elsewhere with "
                                      "[[block.path_map]], or set [block] reuse_existing = true to copy into it",
                                      path));
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
        return make_error(Errc::conflict,
                          fmt::format("target image {} exists and is neither a regular file nor a block device", path));
    if (image_in_use(path))
        return make_error(Errc::conflict, fmt::format("target image {} is in use by another process (a QEMU "
                                                      "holds it); map the disk elsewhere with [[block.path_map]]",
                                                      path));
    auto info = inspect_image(path);
    if (!info)
        return info.error();
    if (info->format != format)
        return make_error(Errc::conflict,
                          fmt::format("target image {} is {}, the disk is {}", path, info->format, format));
    if (info->virtual_size != size)
        return make_error(Errc::conflict, fmt::format("target image {} holds {} bytes, the disk {} bytes", path,
                                                      info->virtual_size, size));
    return PreparedImage{false};
}

// A new file at `path`, made here and nowhere else: O_EXCL refuses anything
// already there (a link included), so nothing is followed or written over.
Result<void> create_exclusive(const std::string& path, const std::string& format, std::uint64_t size) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0)
        return make_error(errno == EEXIST ? Errc::already_exists : Errc::io,
                          fmt::format("creating target image {}: {}", path, std::strerror(errno)));
    int rc = format == "raw" ? ::ftruncate(fd, static_cast<off_t>(size)) : 0; // sparse
    int err = errno;
    ::close(fd);
    if (rc != 0) {
        remove_created_image(path);
        return make_error(Errc::io, fmt::format("creating target image {} of {} bytes: {}", path, size,
                                                std::strerror(err)));
    }
    if (format == "raw")
        return {};
    // qemu-img formats the file just made (it opens it again, without O_EXCL).
    auto r = run_tool({"qemu-img", "create", "-q", "-f", format, path, std::to_string(size)});
    if (!r) {
        remove_created_image(path);
        return r.error().wrap(fmt::format("creating target image {}", path));
    }
    return {};
}

} // namespace

bool remove_created_image(const std::string& path) {
    struct stat st {};
    return ::lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::unlink(path.c_str()) == 0;
}

Result<PreparedImage> prepare_target_image(const std::string& path, const std::string& format, std::uint64_t size,
                                           const TargetImageRules& rules) {
    struct stat link {};
    if (::lstat(path.c_str(), &link) == 0)
        return check_existing(path, format, size, rules, link);
    if (errno != ENOENT)
        return make_error(Errc::io, fmt::format("target image {}: {}", path, std::strerror(errno)));
    std::error_code ec;
    auto dir = fs::path(path).parent_path();
    if (!dir.empty() && !fs::is_directory(dir, ec))
        return make_error(Errc::not_found, fmt::format("target image {}: directory {} does not exist", path,
                                                       dir.string()));
    if (format == "raw" && !rules.create_command.empty()) {
        auto cmd = rules.create_command;
        auto fill = [&](const std::string& key, const std::string& value) {
            for (auto at = cmd.find(key); at != std::string::npos; at = cmd.find(key, at + value.size()))
                cmd.replace(at, key.size(), value);
        };
        fill("{path}", shell_quote(path));
        fill("{name}", shell_quote(fs::path(path).filename().string()));
        fill("{size}", std::to_string(size));
        auto r = run_tool({"/bin/sh", "-c", cmd});
        if (!r)
            return r.error().wrap(fmt::format("creating target image {} ([block] create_command)", path));
    } else if (auto made = create_exclusive(path, format, size); !made) {
        return made.error();
    }
    // Whatever made it, it must now be what the disk needs.
    auto info = inspect_image(path);
    if (!info)
        return info.error();
    if (info->format != format || info->virtual_size != size) {
        remove_created_image(path); // ours, and of no use: gone (a volume is the create command's)
        return make_error(Errc::conflict, fmt::format("created target image {} is {} of {} bytes, the disk {} of {}",
                                                      path, info->format, info->virtual_size, format, size));
    }
    return PreparedImage{true};
}

} // namespace ferry::block
