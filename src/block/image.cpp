#include "block/image.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace ferry::block {

namespace asio = boost::asio;

namespace {

bool aligned(std::uint64_t v) { return v % Image::alignment == 0; }
std::uint64_t round_up(std::uint64_t v) { return (v + Image::alignment - 1) / Image::alignment * Image::alignment; }

} // namespace

Result<Image> Image::open(const std::string& path, Access access) {
    Image img;
    img.path_ = path;
    int flags = (access == Access::write ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    img.fd_ = ::open(path.c_str(), flags);
    if (img.fd_ < 0)
        return make_error(Errc::io, fmt::format("opening disk image {}: {}", path, std::strerror(errno)));
    struct stat st {};
    if (::fstat(img.fd_, &st) < 0)
        return make_error(Errc::io, fmt::format("disk image {}: {}", path, std::strerror(errno)));
    if (S_ISBLK(st.st_mode)) {
        img.block_device_ = true;
        if (::ioctl(img.fd_, BLKGETSIZE64, &img.size_) < 0)
            return make_error(Errc::io, fmt::format("disk image {}: reading the device size: {}", path,
                                                    std::strerror(errno)));
    } else if (S_ISREG(st.st_mode)) {
        img.size_ = static_cast<std::uint64_t>(st.st_size);
    } else {
        return make_error(Errc::invalid_argument,
                          fmt::format("disk image {} is neither a regular file nor a block device", path));
    }
    img.direct_fd_ = ::open(path.c_str(), flags | O_DIRECT);
    // tmpfs and some others refuse O_DIRECT: the page cache serves then.
    if (img.direct_fd_ < 0 && errno != EINVAL)
        return make_error(Errc::io, fmt::format("opening disk image {}: {}", path, std::strerror(errno)));
    return img;
}

Image::Image(Image&& o) noexcept
    : path_(std::move(o.path_)), fd_(o.fd_), direct_fd_(o.direct_fd_), size_(o.size_), block_device_(o.block_device_) {
    o.fd_ = o.direct_fd_ = -1;
}

Image& Image::operator=(Image&& o) noexcept {
    if (this != &o) {
        close();
        path_ = std::move(o.path_);
        fd_ = o.fd_;
        direct_fd_ = o.direct_fd_;
        size_ = o.size_;
        block_device_ = o.block_device_;
        o.fd_ = o.direct_fd_ = -1;
    }
    return *this;
}

Image::~Image() { close(); }

void Image::close() {
    if (fd_ >= 0)
        ::close(fd_);
    if (direct_fd_ >= 0)
        ::close(direct_fd_);
    fd_ = direct_fd_ = -1;
}

int Image::fd_for(const void* buf, std::uint64_t offset, std::size_t length) const {
    if (direct_fd_ >= 0 && aligned(offset) && aligned(length) && aligned(reinterpret_cast<std::uintptr_t>(buf)))
        return direct_fd_;
    return fd_;
}

Result<std::vector<Extent>> Image::allocated() const {
    if (block_device_)
        return std::vector<Extent>{{0, size_, false}};
    auto r = allocated_extents(fd_, size_);
    if (!r)
        return r.error().wrap(fmt::format("disk image {}", path_));
    return r;
}

asio::awaitable<Result<std::size_t>> Image::read(Ring& ring, std::span<std::byte> buf, std::uint64_t offset,
                                                 std::size_t length, int fixed) {
    if (buf.size() < length)
        co_return make_error(Errc::invalid_argument, fmt::format("reading {} bytes of {} into {} bytes", length, path_,
                                                                 buf.size()));
    std::size_t none = 0;
    if (offset >= size_)
        co_return none;
    length = static_cast<std::size_t>(std::min<std::uint64_t>(length, size_ - offset));
    // Direct reads cover whole blocks; the tail of an unaligned image reads
    // short at its end.
    std::size_t request = length;
    if (direct_fd_ >= 0 && aligned(offset) && round_up(length) <= buf.size())
        request = static_cast<std::size_t>(round_up(length));
    std::size_t done = 0;
    while (done < length) {
        auto want = request - done;
        int fd = fd_for(buf.data() + done, offset + done, want);
        auto n = co_await ring.read(fd, buf.subspan(done, want), offset + done, fixed);
        if (!n)
            co_return n.error().wrap(fmt::format("reading {} at {}", path_, offset + done));
        if (*n == 0)
            break;
        done += *n;
    }
    co_return std::min(done, length);
}

asio::awaitable<Result<void>> Image::write(Ring& ring, std::span<const std::byte> data, std::uint64_t offset,
                                           int fixed) {
    if (offset + data.size() > size_)
        co_return make_error(Errc::invalid_argument, fmt::format("writing {} bytes at {} past the end of {} ({} bytes)",
                                                                 data.size(), offset, path_, size_));
    std::size_t done = 0;
    while (done < data.size()) {
        auto rest = data.subspan(done);
        int fd = fd_for(rest.data(), offset + done, rest.size());
        auto n = co_await ring.write(fd, rest, offset + done, fixed);
        if (!n)
            co_return n.error().wrap(fmt::format("writing {} at {}", path_, offset + done));
        if (*n == 0)
            co_return make_error(Errc::io, fmt::format("writing {} at {}: no progress", path_, offset + done));
        done += *n;
    }
    co_return Result<void>{};
}

asio::awaitable<Result<void>> Image::write_zeroes(Ring& ring, std::uint64_t offset, std::uint64_t length) {
    if (offset + length > size_)
        co_return make_error(Errc::invalid_argument, fmt::format("zeroing {} bytes at {} past the end of {}", length,
                                                                 offset, path_));
    int mode = block_device_ ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    auto r = co_await ring.fallocate(fd_, mode, offset, length);
    if (r)
        co_return r;
    if (r.error().code != Errc::invalid_argument) // a real failure, not "not here"
        co_return r.error().wrap(fmt::format("zeroing {} at {}", path_, offset));
    // Neither holes nor zeroed ranges: write the zeros.
    static const std::vector<std::byte> zeros(1 << 20);
    for (std::uint64_t done = 0; done < length;) {
        auto n = std::min<std::uint64_t>(zeros.size(), length - done);
        auto w = co_await ring.write(fd_, std::span(zeros.data(), n), offset + done);
        if (!w)
            co_return w.error().wrap(fmt::format("zeroing {} at {}", path_, offset + done));
        if (*w == 0)
            co_return make_error(Errc::io, fmt::format("zeroing {} at {}: no progress", path_, offset + done));
        done += *w;
    }
    co_return Result<void>{};
}

asio::awaitable<Result<void>> Image::flush(Ring& ring) {
    auto r = co_await ring.fdatasync(fd_);
    if (!r)
        co_return r.error().wrap(fmt::format("flushing {}", path_));
    co_return r;
}

} // namespace ferry::block
