#include "verify.hpp"

#include "layout.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <optional>
#include <regex>
#include <vector>

#include <unistd.h>

namespace ferry::guest {

std::string VerifyReport::summary() const {
    if (min_pass == max_pass)
        return fmt::format("{} pages verified, all at pass {}", pages, max_pass);
    return fmt::format("{} pages verified, pass {} up to page {} and {} after", pages, max_pass,
                       boundary, min_pass);
}

Result<VerifyReport> verify_dump(const std::string& path, std::uint32_t pages, std::uint32_t stride) {
    std::ifstream in(path, std::ios::binary);
    if (!in)
        return make_error(Errc::io, fmt::format("cannot open memory dump {}", path));
    if (pages > 0 && stride != 1 && (stride == 0 || stride >= pages || std::gcd(stride, pages) != 1))
        return make_error(Errc::invalid_argument,
                          fmt::format("sweep stride {} does not visit each of {} pages once", stride, pages));
    VerifyReport r;
    r.pages = pages;
    // The patterns in page order, keeping each page's pass counter; then the
    // counters in the order the guest sweeps the pages.
    std::vector<std::uint32_t> counter(pages);
    std::vector<std::uint32_t> page(FERRY_GUEST_WORDS);
    for (std::uint32_t p = 0; p < pages; ++p) {
        if (!in.read(reinterpret_cast<char*>(page.data()), FERRY_GUEST_PAGE))
            return make_error(Errc::io, fmt::format("memory dump {} ends at page {} of {}", path, p, pages));
        for (std::uint32_t w = 1; w < FERRY_GUEST_WORDS; ++w)
            if (page[w] != ferry_guest_pattern(p, w))
                return make_error(Errc::internal,
                                  fmt::format("guest page {} word {} is {:#x}, expected {:#x}: "
                                              "page content lost or misplaced",
                                              p, w, page[w], ferry_guest_pattern(p, w)));
        counter[p] = page[0];
    }
    std::uint32_t prev = 0, prev_p = 0;
    for (std::uint32_t k = 0, p = 0; k < pages; ++k, p = static_cast<std::uint32_t>((p + stride) % pages)) {
        std::uint32_t c = counter[p];
        if (k == 0) {
            r.max_pass = r.min_pass = c;
        } else if (c > prev) {
            return make_error(Errc::internal,
                              fmt::format("guest page {} holds pass {} but page {} holds {}: a "
                                          "stale page (dirty page not transferred)",
                                          prev_p, prev, p, c));
        } else if (c < prev) {
            if (r.min_pass != r.max_pass || prev - c != 1)
                return make_error(Errc::internal,
                                  fmt::format("guest page {} holds pass {} after pass {}: more than "
                                              "one boundary (a stale page)",
                                              p, c, prev));
            r.min_pass = c;
            r.boundary = p;
        }
        prev = c;
        prev_p = p;
    }
    return r;
}

Result<DumpDir> DumpDir::create() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/ferry-guest-check.XXXXXX";
    if (!::mkdtemp(pattern.data())) // mode 0700
        return make_error(Errc::io, fmt::format("cannot make a directory for the memory dump ({}): {}", pattern,
                                                std::strerror(errno)));
    return DumpDir(std::move(pattern));
}

DumpDir::~DumpDir() {
    if (path_.empty())
        return;
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
}

DumpPlan dump_plan(std::uint32_t pages, const std::string& dump_path) {
    DumpPlan plan;
    plan.pmemsave_args["val"] = FERRY_GUEST_WS_BASE;
    plan.pmemsave_args["size"] = std::uint64_t(pages) * FERRY_GUEST_PAGE;
    plan.pmemsave_args["filename"] = dump_path;
    return plan;
}

boost::asio::awaitable<Result<VerifyReport>> verify_live(QmpExec exec, std::uint32_t pages,
                                                         std::string dump_path, std::uint32_t stride) {
    auto status = co_await exec("query-status", nlohmann::json::object());
    if (!status)
        co_return status.error();
    bool was_running = (*status).value("running", false);
    if (was_running) {
        auto stopped = co_await exec("stop", nlohmann::json::object());
        if (!stopped)
            co_return stopped.error();
    }
    auto saved = co_await exec("pmemsave", dump_plan(pages, dump_path).pmemsave_args);
    if (was_running) {
        auto cont = co_await exec("cont", nlohmann::json::object());
        if (!cont)
            co_return cont.error();
    }
    if (!saved)
        co_return saved.error();
    co_return verify_dump(dump_path, pages, stride);
}

bool guest_ready(const std::string& console_log_path) {
    std::ifstream in(console_log_path);
    std::string line;
    while (std::getline(in, line))
        // Heartbeats start only after READY (a VM that arrived from another
        // node has only those in its log here).
        if (line.find("FERRY-READY") != std::string::npos || line.find("FERRY-HB ") != std::string::npos)
            return true;
    return false;
}

namespace {
// A number the guest's banner names ("FERRY-GUEST ... key=N"), if it does.
std::optional<std::uint32_t> banner_value(const std::string& console_log_path, const char* key,
                                          const char* banner_name = "FERRY-GUEST") {
    std::ifstream in(console_log_path);
    std::string line;
    const std::regex banner(std::string(banner_name) + R"( .*\b)" + key + R"(=(\d+))");
    std::smatch m;
    while (std::getline(in, line))
        if (std::regex_search(line, m, banner))
            return static_cast<std::uint32_t>(std::stoul(m[1]));
    return std::nullopt;
}
} // namespace

std::uint32_t pages_from_console(const std::string& console_log_path) {
    return banner_value(console_log_path, "ws_pages").value_or(0);
}

std::uint32_t disk_sectors_from_console(const std::string& console_log_path) {
    return banner_value(console_log_path, "sectors", "FERRY-DISK").value_or(0);
}

std::string DiskReport::summary() const {
    if (boundary == 0)
        return fmt::format("{} disk sectors verified, all at pass {}", sectors, max_pass);
    return fmt::format("{} disk sectors verified, pass {} up to sector {} and {} after", sectors, max_pass, boundary,
                       max_pass - 1);
}

Result<DiskReport> verify_disk_image(const std::string& path, std::uint32_t sectors) {
    std::ifstream in(path, std::ios::binary);
    if (!in)
        return make_error(Errc::io, fmt::format("cannot open disk image {}", path));
    DiskReport r;
    r.sectors = sectors;
    std::vector<std::uint32_t> w(FERRY_DISK_WORDS);
    std::optional<std::uint32_t> prev;
    for (std::uint32_t s = 0; s < sectors; ++s) {
        if (!in.read(reinterpret_cast<char*>(w.data()), FERRY_DISK_SECTOR))
            return make_error(Errc::io, fmt::format("disk image {} ends at sector {} of {}", path, s, sectors));
        std::uint32_t pass = 0;
        bool zero = std::all_of(w.begin(), w.end(), [](std::uint32_t v) { return v == 0; });
        if (!zero) {
            if (w[0] != FERRY_DISK_MAGIC || w[1] != s)
                return make_error(Errc::internal, fmt::format("disk sector {} is not one the guest wrote there "
                                                              "(magic {:#x}, sector {}): misplaced or torn",
                                                              s, w[0], w[1]));
            pass = w[2];
            for (std::uint32_t i = 3; i < FERRY_DISK_WORDS; ++i)
                if (w[i] != ferry_disk_pattern(s, pass, i))
                    return make_error(Errc::internal, fmt::format("disk sector {} word {} is {:#x}, expected {:#x}: "
                                                                  "torn or corrupt",
                                                                  s, i, w[i], ferry_disk_pattern(s, pass, i)));
        }
        if (!prev) {
            r.max_pass = pass;
        } else if (pass > *prev) {
            return make_error(Errc::internal, fmt::format("disk sector {} holds pass {} after pass {}: a stale "
                                                          "block (a write that was not copied)",
                                                          s, pass, *prev));
        } else if (pass < *prev) {
            if (r.boundary != 0 || *prev - pass != 1)
                return make_error(Errc::internal, fmt::format("disk sector {} holds pass {} after pass {}: more "
                                                              "than one boundary (a stale block)",
                                                              s, pass, *prev));
            r.boundary = s;
        }
        prev = pass;
    }
    return r;
}

std::uint32_t stride_from_console(const std::string& console_log_path) {
    return banner_value(console_log_path, "stride").value_or(1);
}

} // namespace ferry::guest
