#pragma once
// An exclusive lock on a file (flock) held for the life of the process,
// with the holder's pid written into it so a refusal can name the holder.
#include "common/error.hpp"

#include <string>

namespace ferry {

class LockFile {
public:
    // Takes the lock without waiting; already_exists names the holder.
    static Result<LockFile> acquire(const std::string& path);

    LockFile(LockFile&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }
    LockFile& operator=(LockFile&&) = delete;
    LockFile(const LockFile&) = delete;
    ~LockFile();

private:
    LockFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
    int fd_ = -1;
    std::string path_;
};

} // namespace ferry
