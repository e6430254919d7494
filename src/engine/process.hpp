#pragma once
// Starting and stopping QEMU processes.
#include "common/error.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <string>
#include <vector>

namespace ferry::engine {

// Starts argv in its own session (so it outlives ferryd and its signals),
// stdin from /dev/null, stdout and stderr appended to log_path.
Result<int> spawn_process(const std::vector<std::string>& argv, const std::string& log_path);

// True while pid runs. Reaps it if it is our child that exited.
bool process_alive(int pid);

// Waits up to timeout for pid to exit; true if it did.
boost::asio::awaitable<bool> wait_exit(boost::asio::any_io_executor ex, int pid,
                                       std::chrono::milliseconds timeout);

// SIGTERM, then SIGKILL after grace; waits for the exit.
boost::asio::awaitable<void> terminate_process(boost::asio::any_io_executor ex, int pid,
                                               std::chrono::milliseconds grace);

// Reaps any of our children that exited (avoids zombies of processes we no
// longer track).
void reap_children();

} // namespace ferry::engine
