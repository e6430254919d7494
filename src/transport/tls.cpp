#include "transport/tls.hpp"

#include <fmt/format.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <cstdio>
#include <filesystem>

namespace ferry::transport {

namespace ssl = boost::asio::ssl;

namespace {

X509* read_cert(const std::string& path) {
    FILE* f = std::fopen(path.c_str(), "r");
    if (!f)
        return nullptr;
    X509* x = PEM_read_X509(f, nullptr, nullptr, nullptr);
    std::fclose(f);
    return x;
}

Result<void> configure(ssl::context& ctx, const TlsFiles& files, bool server) {
    SSL_CTX* raw = ctx.native_handle();
    SSL_CTX_set_min_proto_version(raw, TLS1_3_VERSION);
    boost::system::error_code ec;
    ctx.use_certificate_chain_file(files.cert, ec);
    if (ec)
        return make_error(Errc::invalid_argument, fmt::format("[tls] cert {}: {}", files.cert, ec.message()));
    ctx.use_private_key_file(files.key, ssl::context::pem, ec);
    if (ec)
        return make_error(Errc::invalid_argument, fmt::format("[tls] key {}: {}", files.key, ec.message()));
    if (SSL_CTX_check_private_key(raw) != 1)
        return make_error(Errc::invalid_argument,
                          fmt::format("[tls] key {} does not belong to cert {}", files.key, files.cert));
    ctx.load_verify_file(files.ca, ec);
    if (ec)
        return make_error(Errc::invalid_argument, fmt::format("[tls] ca {}: {}", files.ca, ec.message()));
    ctx.set_verify_mode(server ? ssl::verify_peer | ssl::verify_fail_if_no_peer_cert : ssl::verify_peer);
    // No session tickets: every connection authenticates in full.
    SSL_CTX_set_num_tickets(raw, 0);
    SSL_CTX_set_session_cache_mode(raw, SSL_SESS_CACHE_OFF);
    return {};
}

} // namespace

TlsIdentity::TlsIdentity() : server_(ssl::context::tls_server), client_(ssl::context::tls_client) {}

std::string certificate_node_name(void* x509) {
    auto* x = static_cast<X509*>(x509);
    std::string name;
    auto* sans = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(x, NID_subject_alt_name, nullptr, nullptr));
    if (!sans)
        return name;
    for (int i = 0; i < sk_GENERAL_NAME_num(sans) && name.empty(); ++i) {
        const GENERAL_NAME* gn = sk_GENERAL_NAME_value(sans, i);
        if (gn->type == GEN_DNS) {
            const unsigned char* data = ASN1_STRING_get0_data(gn->d.dNSName);
            name.assign(reinterpret_cast<const char*>(data), static_cast<std::size_t>(ASN1_STRING_length(gn->d.dNSName)));
        }
    }
    GENERAL_NAMES_free(sans);
    return name;
}

Result<std::shared_ptr<TlsIdentity>> TlsIdentity::load(const TlsFiles& files, const std::string& self) {
    for (auto [key, path] : {std::pair{"ca", files.ca}, {"cert", files.cert}, {"key", files.key}}) {
        if (path.empty())
            return make_error(Errc::invalid_argument,
                              fmt::format("[tls] {} is not set (ferryctl pki init creates the files; or set "
                                          "[migration] disable_tls = true)",
                                          key));
        if (!std::filesystem::is_regular_file(path))
            return make_error(Errc::invalid_argument, fmt::format("[tls] {}: {} does not exist", key, path));
    }
    auto id = std::make_shared<TlsIdentity>();
    id->self_ = self;
    if (auto r = configure(id->server_, files, true); !r)
        return r.error();
    if (auto r = configure(id->client_, files, false); !r)
        return r.error();

    // Our own certificate must chain to the CA and carry our name.
    X509* cert = read_cert(files.cert);
    if (!cert)
        return make_error(Errc::invalid_argument, fmt::format("[tls] cert {}: not a PEM certificate", files.cert));
    std::string named = certificate_node_name(cert);
    X509_STORE_CTX* sctx = X509_STORE_CTX_new();
    X509_STORE_CTX_init(sctx, SSL_CTX_get_cert_store(id->server_.native_handle()), cert, nullptr);
    int ok = X509_verify_cert(sctx);
    std::string why = ok == 1 ? "" : X509_verify_cert_error_string(X509_STORE_CTX_get_error(sctx));
    X509_STORE_CTX_free(sctx);
    X509_free(cert);
    if (ok != 1)
        return make_error(Errc::invalid_argument,
                          fmt::format("[tls] cert {} does not verify against ca {}: {}", files.cert, files.ca, why));
    if (named != self)
        return make_error(Errc::invalid_argument,
                          fmt::format("[tls] cert {} names node '{}', but this node is '{}'", files.cert, named, self));
    return id;
}

} // namespace ferry::transport
