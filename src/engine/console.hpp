#pragma once
// Captures a guest's serial console from QEMU's console socket: every line
// goes to the VM's console log with a timestamp and the QEMU generation it
// came from, and heartbeat lines are kept for blackout measurement.
#include "engine/heartbeat.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/local/stream_protocol.hpp>

#include <deque>
#include <memory>
#include <string>

namespace ferry::engine {

class ConsoleCapture : public std::enable_shared_from_this<ConsoleCapture> {
public:
    ConsoleCapture(boost::asio::any_io_executor ex, std::string socket_path, std::string log_path,
                   std::string tag);
    void start();
    void stop();
    std::vector<Heartbeat> heartbeat_list() const { return {heartbeats_.begin(), heartbeats_.end()}; }
    bool connected() const { return connected_; }

private:
    static boost::asio::awaitable<void> run(std::shared_ptr<ConsoleCapture> self);
    void record(const std::string& line);

    boost::asio::local::stream_protocol::socket socket_;
    std::string socket_path_;
    std::string log_path_;
    std::string tag_;
    bool stopped_ = false;
    bool connected_ = false;
    std::deque<Heartbeat> heartbeats_;
};

} // namespace ferry::engine
