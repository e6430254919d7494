#include "block/extent.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unistd.h>

namespace ferry::block {

std::vector<Extent> coalesce(std::vector<Extent> extents) {
    // A sweep over every start and end: at each point, count the data and
    // zero extents covering what follows.
    struct Edge {
        std::uint64_t at;
        int data, zero;
    };
    std::vector<Edge> edges;
    for (auto& e : extents) {
        if (e.length == 0)
            continue;
        edges.push_back({e.offset, e.zero ? 0 : 1, e.zero ? 1 : 0});
        edges.push_back({e.end(), e.zero ? 0 : -1, e.zero ? -1 : 0});
    }
    std::sort(edges.begin(), edges.end(), [](const Edge& a, const Edge& b) { return a.at < b.at; });
    std::vector<Extent> out;
    int data = 0, zero = 0;
    for (std::size_t i = 0; i < edges.size();) {
        auto at = edges[i].at;
        for (; i < edges.size() && edges[i].at == at; ++i) {
            data += edges[i].data;
            zero += edges[i].zero;
        }
        if (i == edges.size() || (data == 0 && zero == 0))
            continue;
        Extent piece{at, edges[i].at - at, data == 0};
        if (!out.empty() && out.back().end() == piece.offset && out.back().zero == piece.zero)
            out.back().length += piece.length;
        else
            out.push_back(piece);
    }
    return out;
}

std::vector<Extent> split(std::span<const Extent> extents, std::uint64_t piece) {
    std::vector<Extent> out;
    for (auto e : extents) {
        while (e.length > 0) {
            auto boundary = (e.offset / piece + 1) * piece;
            auto len = std::min(e.length, boundary - e.offset);
            out.push_back({e.offset, len, e.zero});
            e.offset += len;
            e.length -= len;
        }
    }
    return out;
}

std::vector<Extent> clip(std::vector<Extent> extents, std::uint64_t size) {
    std::vector<Extent> out;
    for (auto e : extents) {
        if (e.offset >= size)
            continue;
        e.length = std::min(e.length, size - e.offset);
        if (e.length > 0)
            out.push_back(e);
    }
    return out;
}

std::uint64_t total_length(std::span<const Extent> extents, bool zero) {
    std::uint64_t n = 0;
    for (auto& e : extents)
        if (e.zero == zero)
            n += e.length;
    return n;
}

bool is_zero(std::span<const std::byte> data) {
    // Word at a time; the compiler vectorises the OR.
    std::size_t i = 0;
    auto* p = data.data();
    for (; i + 64 <= data.size(); i += 64) {
        std::uint64_t w[8];
        std::memcpy(w, p + i, sizeof w);
        if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0)
            return false;
    }
    for (; i < data.size(); ++i)
        if (p[i] != std::byte{0})
            return false;
    return true;
}

Result<std::vector<Extent>> allocated_extents(int fd, std::uint64_t size) {
    std::vector<Extent> out;
    off_t pos = 0;
    while (static_cast<std::uint64_t>(pos) < size) {
        off_t data = ::lseek(fd, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO) // nothing but a hole up to the end
                break;
            if (errno == EINVAL || errno == EOPNOTSUPP) // no hole reporting
                return std::vector<Extent>{{0, size, false}};
            return make_error(Errc::io, fmt::format("seeking data: {}", std::strerror(errno)));
        }
        off_t hole = ::lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            return make_error(Errc::io, fmt::format("seeking a hole: {}", std::strerror(errno)));
        auto end = std::min<std::uint64_t>(static_cast<std::uint64_t>(hole), size);
        if (static_cast<std::uint64_t>(data) >= end)
            break;
        out.push_back({static_cast<std::uint64_t>(data), end - static_cast<std::uint64_t>(data), false});
        pos = hole;
    }
    return out;
}

} // namespace ferry::block
