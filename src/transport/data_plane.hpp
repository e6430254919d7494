#pragma once
// The data plane: one thread with its own io_context that owns every data
// channel's sockets (the TCP/TLS connection and the Unix socket to QEMU).
// Tunnels run there from start to end, so encryption and the bulk copies
// never hold up the control-plane thread (QMP, the control socket, the
// convergence decisions), and no record crosses threads.
//
// Process-wide and never destroyed: sockets created on it may be owned by
// objects of the control plane, which are torn down in any order at exit.
#include <boost/asio/any_io_executor.hpp>

namespace ferry::transport {

boost::asio::any_io_executor data_plane();

} // namespace ferry::transport
