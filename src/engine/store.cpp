#include "engine/store.hpp"

#include "common/json.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <fstream>
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

} // namespace ferry::engine
