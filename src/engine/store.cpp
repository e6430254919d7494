#include "engine/store.hpp"

#include "common/json.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <sys/stat.h>
#include <sstream>
#include <unistd.h>

namespace ferry::engine {

Result<void> write_json_file(const std::string& path, const nlohmann::json& value) {
    std::string tmp = path + ".tmp";
    std::string text = dump_json(value, 2) + "\n";
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return make_error(Errc::io, fmt::format("writing {}: {}", tmp, std::strerror(errno)));
    std::size_t off = 0;
    while (off < text.size()) {
        ssize_t n = ::write(fd, text.data() + off, text.size() - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            auto err = errno;
            ::close(fd);
            return make_error(Errc::io, fmt::format("writing {}: {}", tmp, std::strerror(err)));
        }
        off += static_cast<std::size_t>(n);
    }
    ::fsync(fd);
    ::close(fd);
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
        return make_error(Errc::io, fmt::format("renaming {} to {}: {}", tmp, path, std::strerror(errno)));
    return {};
}

Result<nlohmann::json> read_json_file(const std::string& path) {
    std::ifstream in(path);
    if (!in)
        return make_error(Errc::not_found, fmt::format("{}: cannot open", path));
    std::stringstream ss;
    ss << in.rdbuf();
    auto j = nlohmann::json::parse(ss.str(), nullptr, false);
    if (j.is_discarded())
        return make_error(Errc::protocol, fmt::format("{}: not valid JSON", path));
    return ok(std::move(j));
}

Result<void> check_state_dir(const std::string& dir) {
    namespace fs = std::filesystem;
    std::error_code ec;
    auto real = fs::weakly_canonical(dir, ec);
    if (!ec && real == real.root_path())
        return make_error(Errc::invalid_argument, fmt::format("{} is the root directory; give ferry a directory of its "
                                                              "own, such as /var/lib/ferry",
                                                              dir));
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0) {
        if (errno == ENOENT)
            return {}; // made at start, for ferryd's user alone
        return make_error(Errc::invalid_argument, fmt::format("{}: {}", dir, std::strerror(errno)));
    }
    if (!S_ISDIR(st.st_mode))
        return make_error(Errc::invalid_argument, fmt::format("{} exists and is not a directory", dir));
    if (st.st_uid != ::geteuid())
        return make_error(Errc::invalid_argument,
                          fmt::format("{} is owned by uid {}, not by ferryd's user (uid {}); give ferry a directory "
                                      "of its own",
                                      dir, st.st_uid, ::geteuid()));
    if (st.st_mode & (S_IWGRP | S_IWOTH))
        return make_error(Errc::invalid_argument,
                          fmt::format("{} is writable by group or others (mode {:04o}); ferry keeps VM records and "
                                      "QEMU's sockets there: make it 0700",
                                      dir, st.st_mode & 07777));
    std::error_code ignored;
    bool ours = fs::exists(fs::path(dir) / "ferryd.lock", ignored) || fs::is_directory(fs::path(dir) / "vms", ignored);
    if (ours)
        return {};
    if (!fs::is_empty(dir, ec) && !ec)
        return make_error(Errc::invalid_argument,
                          fmt::format("{} holds files that are not ferry's (no ferryd.lock or vms/ in it); give "
                                      "ferry an empty or new directory, such as /var/lib/ferry",
                                      dir));
    if (ec)
        return make_error(Errc::invalid_argument, fmt::format("{}: {}", dir, ec.message()));
    return {};
}

} // namespace ferry::engine
