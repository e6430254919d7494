#include "transport/data_plane.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <pthread.h>
#include <thread>

namespace ferry::transport {

namespace {
struct DataPlane {
    boost::asio::io_context io{1};
    boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work{io.get_executor()};
    std::thread thread{[this] {
        pthread_setname_np(pthread_self(), "ferry-data");
        io.run();
    }};
};
} // namespace

boost::asio::any_io_executor data_plane() {
    static auto* plane = new DataPlane; // never destroyed, see the header
    return plane->io.get_executor();
}

} // namespace ferry::transport
