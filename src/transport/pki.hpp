#pragma once
// Node identity: a cluster CA and one certificate per node whose
// subjectAltName is the node's name (OpenSSL API, no shelling out).
#include "common/error.hpp"

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace ferry::transport {

struct KeyDeleter {
    void operator()(void* p) const;
};
struct CertDeleter {
    void operator()(void* p) const;
};

// A certificate with its private key, in memory.
struct KeyPair {
    std::unique_ptr<void, KeyDeleter> key;   // EVP_PKEY
    std::unique_ptr<void, CertDeleter> cert; // X509
    std::string cert_pem() const;
    std::string key_pem() const;
};

struct Validity {
    std::chrono::seconds not_before{-3600};                  // relative to now
    std::chrono::seconds not_after{std::chrono::hours(24 * 3650)}; // relative to now
};

Result<KeyPair> make_ca(const std::string& common_name, Validity validity = {});
Result<KeyPair> make_node_cert(const KeyPair& ca, const std::string& node, Validity validity = {});

// Writes ca.pem, ca-key.pem, <node>.pem, <node>-key.pem into dir (keys 0600).
// Refuses to overwrite an existing CA.
struct PkiFiles {
    std::string ca;
    std::vector<std::string> written;
};
// Validates every name and file first: a refused request writes nothing.
Result<PkiFiles> init_pki(const std::string& dir, const std::vector<std::string>& nodes);
// Issues certificates for more nodes from the CA in dir (ca.pem, ca-key.pem).
Result<PkiFiles> add_pki_nodes(const std::string& dir, const std::vector<std::string>& nodes);

Result<void> write_pem(const std::string& path, const std::string& pem, unsigned mode);

} // namespace ferry::transport
