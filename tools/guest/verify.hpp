#pragma once
// Host-side check of the test guest's memory (see guest.c for the layout).
#include "common/error.hpp"
#include "qmp/client.hpp"

#include <cstdint>
#include <string>

namespace ferry::guest {

struct VerifyReport {
    std::uint32_t pages = 0;
    std::uint32_t min_pass = 0;
    std::uint32_t max_pass = 0;
    std::uint32_t boundary = 0; // first page holding min_pass when they differ
    std::string summary() const;
};

// Checks a raw dump of the working set. An error names the first bad page.
Result<VerifyReport> verify_dump(const std::string& path, std::uint32_t pages);

// Pauses the VM (if running), dumps the working set with pmemsave to
// dump_path, resumes it unless keep_stopped, and checks the dump.
boost::asio::awaitable<Result<VerifyReport>> verify_live(qmp::Client& qmp, std::uint32_t pages,
                                                         std::string dump_path,
                                                         bool keep_stopped = false);

// Reads ws_pages from the guest's banner in a console log; 0 if absent.
std::uint32_t pages_from_console(const std::string& console_log_path);

} // namespace ferry::guest
