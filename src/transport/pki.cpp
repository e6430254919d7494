#include "transport/pki.hpp"

#include "config/vm_spec.hpp"

#include <fmt/format.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <unistd.h>

namespace ferry::transport {

void KeyDeleter::operator()(void* p) const { EVP_PKEY_free(static_cast<EVP_PKEY*>(p)); }
void CertDeleter::operator()(void* p) const { X509_free(static_cast<X509*>(p)); }

namespace {

Error ssl_error(std::string_view what) {
    unsigned long code = ERR_get_error();
    char buf[256] = "unknown OpenSSL error";
    if (code)
        ERR_error_string_n(code, buf, sizeof buf);
    ERR_clear_error();
    return make_error(Errc::internal, fmt::format("{}: {}", what, buf));
}

std::string bio_string(BIO* bio) {
    char* data = nullptr;
    long n = BIO_get_mem_data(bio, &data);
    return std::string(data, static_cast<std::size_t>(n));
}

bool add_ext(X509* cert, X509* issuer, int nid, const std::string& value) {
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
    if (!ext)
        return false;
    bool ok = X509_add_ext(cert, ext, -1) == 1;
    X509_EXTENSION_free(ext);
    return ok;
}

// A certificate for key, subject CN, signed by signer (itself when null).
Result<KeyPair> make_cert(const std::string& cn, const KeyPair* signer, Validity v,
                          const std::vector<std::pair<int, std::string>>& extensions) {
    KeyPair kp;
    kp.key.reset(EVP_EC_gen("P-256"));
    if (!kp.key)
        return ssl_error("generating a P-256 key");
    auto* key = static_cast<EVP_PKEY*>(kp.key.get());
    kp.cert.reset(X509_new());
    auto* x = static_cast<X509*>(kp.cert.get());
    X509_set_version(x, 2);
    unsigned char serial[16];
    RAND_bytes(serial, sizeof serial);
    serial[0] &= 0x7F;
    BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
    BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x));
    BN_free(bn);
    X509_gmtime_adj(X509_getm_notBefore(x), static_cast<long>(v.not_before.count()));
    X509_gmtime_adj(X509_getm_notAfter(x), static_cast<long>(v.not_after.count()));
    X509_set_pubkey(x, key);
    X509_NAME* name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("ferry"), -1, -1, 0);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
    X509* issuer = signer ? static_cast<X509*>(signer->cert.get()) : x;
    X509_set_issuer_name(x, X509_get_subject_name(issuer));
    for (auto& [nid, value] : extensions)
        if (!add_ext(x, issuer, nid, value))
            return ssl_error(fmt::format("adding extension {}", value));
    auto* signing_key = signer ? static_cast<EVP_PKEY*>(signer->key.get()) : key;
    if (X509_sign(x, signing_key, EVP_sha256()) <= 0)
        return ssl_error("signing the certificate");
    return kp;
}

} // namespace

std::string KeyPair::cert_pem() const {
    BIO* bio = BIO_new(BIO_s_mem());
    PEM_write_bio_X509(bio, static_cast<X509*>(cert.get()));
    auto s = bio_string(bio);
    BIO_free(bio);
    return s;
}

std::string KeyPair::key_pem() const {
    BIO* bio = BIO_new(BIO_s_mem());
    PEM_write_bio_PrivateKey(bio, static_cast<EVP_PKEY*>(key.get()), nullptr, nullptr, 0, nullptr, nullptr);
    auto s = bio_string(bio);
    BIO_free(bio);
    return s;
}

Result<KeyPair> make_ca(const std::string& common_name, Validity validity) {
    return make_cert(common_name, nullptr, validity,
                     {{NID_basic_constraints, "critical,CA:TRUE"},
                      {NID_key_usage, "critical,keyCertSign,cRLSign"},
                      {NID_subject_key_identifier, "hash"}});
}

Result<KeyPair> make_node_cert(const KeyPair& ca, const std::string& node, Validity validity) {
    if (!config::valid_vm_name(node))
        return make_error(Errc::invalid_argument,
                          fmt::format("'{}' is not a valid node name (a-z, 0-9, '-', up to 63)", node));
    return make_cert(node, &ca, validity,
                     {{NID_basic_constraints, "critical,CA:FALSE"},
                      {NID_key_usage, "critical,digitalSignature"},
                      {NID_ext_key_usage, "serverAuth,clientAuth"},
                      {NID_subject_alt_name, "DNS:" + node},
                      {NID_authority_key_identifier, "keyid"}});
}

Result<void> write_pem(const std::string& path, const std::string& pem, unsigned mode) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0)
        return make_error(Errc::io, fmt::format("{}: {}", path, std::strerror(errno)));
    bool ok = ::write(fd, pem.data(), pem.size()) == static_cast<ssize_t>(pem.size());
    ::close(fd);
    if (!ok)
        return make_error(Errc::io, fmt::format("{}: short write", path));
    return {};
}

Result<PkiFiles> init_pki(const std::string& dir, const std::vector<std::string>& nodes) {
    namespace fs = std::filesystem;
    if (nodes.empty())
        return make_error(Errc::invalid_argument, "--nodes: name at least one node");
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec)
        return make_error(Errc::io, fmt::format("{}: {}", dir, ec.message()));
    PkiFiles files;
    files.ca = dir + "/ca.pem";
    if (fs::exists(files.ca))
        return make_error(Errc::already_exists,
                          fmt::format("{} exists: ferry does not overwrite a CA (use another --dir)", files.ca));
    for (auto& n : nodes) {
        if (!config::valid_vm_name(n))
            return make_error(Errc::invalid_argument, fmt::format("--nodes: '{}' is not a valid node name", n));
        if (fs::exists(dir + "/" + n + ".pem"))
            return make_error(Errc::already_exists, fmt::format("{}/{}.pem exists", dir, n));
    }
    auto ca = make_ca("ferry cluster CA");
    if (!ca)
        return ca.error();
    if (auto r = write_pem(dir + "/ca-key.pem", ca->key_pem(), 0600); !r)
        return r.error();
    if (auto r = write_pem(files.ca, ca->cert_pem(), 0644); !r)
        return r.error();
    files.written = {dir + "/ca-key.pem", files.ca};
    for (auto& n : nodes) {
        auto kp = make_node_cert(*ca, n);
        if (!kp)
            return kp.error();
        if (auto r = write_pem(dir + "/" + n + "-key.pem", kp->key_pem(), 0600); !r)
            return r.error();
        if (auto r = write_pem(dir + "/" + n + ".pem", kp->cert_pem(), 0644); !r)
            return r.error();
        files.written.push_back(dir + "/" + n + "-key.pem");
        files.written.push_back(dir + "/" + n + ".pem");
    }
    return files;
}

} // namespace ferry::transport
