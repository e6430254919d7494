#pragma once
// TLS 1.3 with mutual authentication between ferryd nodes. A node's
// certificate names the node in its subjectAltName; a peer is accepted only
// with a chain to the cluster CA and, when dialled, only under the name we
// meant to reach.
#include "common/error.hpp"

#include <boost/asio/ssl/context.hpp>

#include <memory>
#include <string>

namespace ferry::transport {

struct TlsFiles {
    std::string ca;
    std::string cert;
    std::string key;
};

class TlsIdentity {
public:
    // Loads and checks the files: the key matches the certificate, the
    // certificate chains to the CA and names `self`.
    static Result<std::shared_ptr<TlsIdentity>> load(const TlsFiles& files, const std::string& self);

    boost::asio::ssl::context& server() { return server_; }
    boost::asio::ssl::context& client() { return client_; }
    const std::string& self() const { return self_; }

    TlsIdentity();

private:
    boost::asio::ssl::context server_;
    boost::asio::ssl::context client_;
    std::string self_;
};

// The node name in a peer certificate's subjectAltName (DNS), or empty.
std::string certificate_node_name(void* x509);

} // namespace ferry::transport
