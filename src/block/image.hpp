#pragma once
// A raw disk image, a regular file or a block device, read and written with
// direct I/O where the file system allows it (page cache otherwise), through
// a Ring. Sizes need not be multiples of the block size: the unaligned tail
// goes through the page cache.
#include "block/extent.hpp"
#include "block/ring.hpp"

#include <boost/asio/awaitable.hpp>

#include <string>

namespace ferry::block {

class Image {
public:
    static constexpr std::size_t alignment = 4096;

    enum class Access { read, write };
    // Opens an existing image. Errors name the path.
    static Result<Image> open(const std::string& path, Access access);

    Image(Image&& other) noexcept;
    Image& operator=(Image&& other) noexcept;
    Image(const Image&) = delete;
    Image& operator=(const Image&) = delete;
    ~Image();

    const std::string& path() const { return path_; }
    std::uint64_t size() const { return size_; }
    bool block_device() const { return block_device_; }
    bool direct() const { return direct_fd_ >= 0; }

    // Where data lies (SEEK_DATA/SEEK_HOLE); a block device is all data.
    Result<std::vector<Extent>> allocated() const;

    // Reads [offset, offset + length) into buf (at least length rounded up
    // to the alignment); `fixed` is buf's registered slot or -1. Returns the
    // bytes read, fewer only past the end of the image.
    boost::asio::awaitable<Result<std::size_t>> read(Ring& ring, std::span<std::byte> buf, std::uint64_t offset,
                                                     std::size_t length, int fixed = -1);
    // Writes all of data at offset.
    boost::asio::awaitable<Result<void>> write(Ring& ring, std::span<const std::byte> data, std::uint64_t offset,
                                               int fixed = -1);
    // Makes [offset, offset + length) read as zeros: a hole in a file, a
    // zeroed range on a device; written zeros where neither is supported.
    boost::asio::awaitable<Result<void>> write_zeroes(Ring& ring, std::uint64_t offset, std::uint64_t length);
    boost::asio::awaitable<Result<void>> flush(Ring& ring);

private:
    Image() = default;
    void close();
    // The descriptor for a request: direct when offset, length and buffer
    // are aligned.
    int fd_for(const void* buf, std::uint64_t offset, std::size_t length) const;

    std::string path_;
    int fd_ = -1;        // through the page cache
    int direct_fd_ = -1; // O_DIRECT, or -1 where the file system refuses it
    std::uint64_t size_ = 0;
    bool block_device_ = false;
};

} // namespace ferry::block
