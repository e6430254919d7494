#pragma once
// Host-side check of the test guest's memory (see guest.c for the layout).
#include "common/error.hpp"

#include <boost/asio/awaitable.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>

namespace ferry::guest {

struct VerifyReport {
    std::uint32_t pages = 0;
    std::uint32_t min_pass = 0;
    std::uint32_t max_pass = 0;
    std::uint32_t boundary = 0; // first page holding min_pass when they differ
    std::string summary() const;
};

// Checks a raw dump of the working set. An error names the first bad page.
// stride: the guest's sweep order (its `stride=`; 1 = pages in order).
Result<VerifyReport> verify_dump(const std::string& path, std::uint32_t pages, std::uint32_t stride = 1);

// Runs one QMP command on the VM (through ferryd or a QMP client).
using QmpExec = std::function<boost::asio::awaitable<Result<nlohmann::json>>(std::string, nlohmann::json)>;

// The QMP commands of a check, in order: pause (if running), dump, resume.
struct DumpPlan {
    nlohmann::json pmemsave_args;
};
DumpPlan dump_plan(std::uint32_t pages, const std::string& dump_path);

// A private directory for one memory dump: made with mkdtemp (mode 0700)
// under $TMPDIR or /tmp, and removed with what it holds when this goes, on
// every path. QEMU (often root) writes the dump with pmemsave, which follows
// symlinks: a fixed name in /tmp would let any user point it elsewhere.
class DumpDir {
public:
    static Result<DumpDir> create();
    DumpDir(DumpDir&& o) noexcept : path_(std::exchange(o.path_, {})) {}
    DumpDir& operator=(DumpDir&&) = delete;
    DumpDir(const DumpDir&) = delete;
    ~DumpDir();
    const std::string& path() const { return path_; }
    std::string file() const { return path_ + "/memory.dump"; }

private:
    explicit DumpDir(std::string path) : path_(std::move(path)) {}
    std::string path_;
};

// Pauses the VM (if running), dumps the working set with pmemsave to
// dump_path, resumes it, and checks the dump.
boost::asio::awaitable<Result<VerifyReport>> verify_live(QmpExec exec, std::uint32_t pages,
                                                         std::string dump_path, std::uint32_t stride = 1);

// True once the guest printed FERRY-READY or a heartbeat (its working set
// is filled).
bool guest_ready(const std::string& console_log_path);

// Reads ws_pages from the guest's banner in a console log; 0 if absent.
std::uint32_t pages_from_console(const std::string& console_log_path);
// The disk writer's region (FERRY-DISK sectors=), 0 when it is off.
std::uint32_t disk_sectors_from_console(const std::string& console_log_path);

struct DiskReport {
    std::uint32_t sectors = 0;
    std::uint32_t max_pass = 0;
    std::uint32_t boundary = 0; // first sector holding max_pass - 1, 0 when none does
    std::string summary() const;
};

// Checks a raw disk image the guest's disk writer wrote (read with the VM
// stopped or paused): every sector whole and in its place, pass p below one
// boundary and p - 1 (zeros for pass 0) from it on. An error names the first
// bad sector.
Result<DiskReport> verify_disk_image(const std::string& path, std::uint32_t sectors);

// Reads the sweep stride from the banner; 1 if it names none.
std::uint32_t stride_from_console(const std::string& console_log_path);

} // namespace ferry::guest
