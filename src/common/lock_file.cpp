#include "common/lock_file.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

namespace ferry {

Result<LockFile> LockFile::acquire(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return make_error(Errc::io, fmt::format("{}: {}", path, std::strerror(errno)));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int err = errno;
        char buf[32] = {};
        auto n = ::pread(fd, buf, sizeof(buf) - 1, 0);
        ::close(fd);
        std::string holder = n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string("unknown");
        while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' '))
            holder.pop_back();
        if (err == EWOULDBLOCK)
            return make_error(Errc::already_exists, fmt::format("{} is held by pid {}", path, holder));
        return make_error(Errc::io, fmt::format("locking {}: {}", path, std::strerror(err)));
    }
    auto pid = fmt::format("{}\n", ::getpid());
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
        // The lock holds without the pid; only the message gets vaguer.
    }
    return LockFile(fd, path);
}

LockFile::~LockFile() {
    if (fd_ >= 0)
        ::close(fd_); // releases the lock; the file stays (another ferryd may hold it by now)
}

} // namespace ferry
