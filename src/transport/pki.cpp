#include "transport/pki.hpp"

#include "config/node_config.hpp"

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
    if (!config::valid_node_name(node))
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

namespace {

// Every name is checked, and every file that would be written is free,
// before anything is written: a refused request leaves the directory as it was.
Result<void> check_new_nodes(const std::string& dir, const std::vector<std::string>& nodes) {
    namespace fs = std::filesystem;
    if (nodes.empty())
        return make_error(Errc::invalid_argument, "--nodes: name at least one node");
    for (std::size_t i = 0; i < nodes.size(); ++i) {
        auto& n = nodes[i];
        if (!config::valid_node_name(n))
            return make_error(Errc::invalid_argument,
                              fmt::format("--nodes: '{}' is not a valid node name (1-63 characters of a-z, 0-9 "
                                          "and '-', starting and ending with a letter or digit)",
                                          n));
        for (std::size_t k = 0; k < i; ++k)
            if (nodes[k] == n)
                return make_error(Errc::invalid_argument, fmt::format("--nodes: '{}' is named twice", n));
        for (auto suffix : {".pem", "-key.pem"}) {
            std::error_code ec;
            auto path = fmt::format("{}/{}{}", dir, n, suffix);
            if (fs::exists(path, ec) || fs::is_symlink(path, ec))
                return make_error(Errc::already_exists, fmt::format("{} exists: node {} has a certificate already", path, n));
        }
    }
    return {};
}

// A node certificate never outlives its CA.
Validity within_ca(const KeyPair& ca) {
    Validity v;
    int days = 0, seconds = 0;
    if (ASN1_TIME_diff(&days, &seconds, nullptr, X509_get0_notAfter(static_cast<X509*>(ca.cert.get()))) == 1)
        v.not_after = std::min(v.not_after, std::chrono::seconds(std::int64_t{days} * 86400 + seconds));
    return v;
}

Result<void> issue(const KeyPair& ca, const std::string& dir, const std::vector<std::string>& nodes, PkiFiles& files) {
    for (auto& n : nodes) {
        auto kp = make_node_cert(ca, n, within_ca(ca));
        if (!kp)
            return kp.error();
        if (auto r = write_pem(dir + "/" + n + "-key.pem", kp->key_pem(), 0600); !r)
            return r.error();
        files.written.push_back(dir + "/" + n + "-key.pem");
        if (auto r = write_pem(dir + "/" + n + ".pem", kp->cert_pem(), 0644); !r)
            return r.error();
        files.written.push_back(dir + "/" + n + ".pem");
    }
    return {};
}

Result<std::string> slurp(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return make_error(errno == ENOENT ? Errc::not_found : Errc::io, fmt::format("{}: {}", path, std::strerror(errno)));
    std::string out;
    char buf[4096];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;)
        out.append(buf, static_cast<std::size_t>(n));
    ::close(fd);
    return out;
}

// The CA as init_pki wrote it: ca.pem and ca-key.pem, matching.
Result<KeyPair> load_ca(const std::string& dir) {
    auto cert_pem = slurp(dir + "/ca.pem");
    if (!cert_pem)
        return cert_pem.error().wrap("the CA certificate");
    auto key_pem = slurp(dir + "/ca-key.pem");
    if (!key_pem)
        return key_pem.error().wrap("the CA key (ca-key.pem is needed to add nodes)");
    KeyPair ca;
    BIO* bio = BIO_new_mem_buf(cert_pem->data(), static_cast<int>(cert_pem->size()));
    ca.cert.reset(PEM_read_bio_X509(bio, nullptr, nullptr, nullptr));
    BIO_free(bio);
    if (!ca.cert)
        return make_error(Errc::invalid_argument, fmt::format("{}/ca.pem is not a PEM certificate", dir));
    bio = BIO_new_mem_buf(key_pem->data(), static_cast<int>(key_pem->size()));
    // No passphrase prompt on the terminal: an encrypted key is an error.
    pem_password_cb* no_passphrase = [](char*, int, int, void*) { return 0; };
    ca.key.reset(PEM_read_bio_PrivateKey(bio, nullptr, no_passphrase, nullptr));
    BIO_free(bio);
    if (!ca.key)
        return make_error(Errc::invalid_argument, fmt::format("{}/ca-key.pem is not a PEM private key", dir));
    if (X509_check_private_key(static_cast<X509*>(ca.cert.get()), static_cast<EVP_PKEY*>(ca.key.get())) != 1) {
        ERR_clear_error();
        return make_error(Errc::invalid_argument, fmt::format("{}/ca-key.pem does not belong to {}/ca.pem", dir, dir));
    }
    return ca;
}

} // namespace

Result<PkiFiles> init_pki(const std::string& dir, const std::vector<std::string>& nodes) {
    namespace fs = std::filesystem;
    PkiFiles files;
    files.ca = dir + "/ca.pem";
    std::error_code ec;
    if (fs::exists(files.ca, ec) || fs::exists(dir + "/ca-key.pem", ec))
        return make_error(Errc::already_exists,
                          fmt::format("{} has a CA already: ferry never overwrites one (pki add issues "
                                      "certificates for more nodes from it)",
                                      dir));
    if (auto r = check_new_nodes(dir, nodes); !r)
        return r.error();
    fs::create_directories(dir, ec);
    if (ec)
        return make_error(Errc::io, fmt::format("{}: {}", dir, ec.message()));
    auto ca = make_ca("ferry cluster CA");
    if (!ca)
        return ca.error();
    if (auto r = write_pem(dir + "/ca-key.pem", ca->key_pem(), 0600); !r)
        return r.error();
    if (auto r = write_pem(files.ca, ca->cert_pem(), 0644); !r)
        return r.error();
    files.written = {dir + "/ca-key.pem", files.ca};
    if (auto r = issue(*ca, dir, nodes, files); !r)
        return r.error();
    return files;
}

Result<PkiFiles> add_pki_nodes(const std::string& dir, const std::vector<std::string>& nodes) {
    auto ca = load_ca(dir);
    if (!ca)
        return ca.error();
    if (auto r = check_new_nodes(dir, nodes); !r)
        return r.error();
    PkiFiles files;
    files.ca = dir + "/ca.pem";
    if (auto r = issue(*ca, dir, nodes, files); !r)
        return r.error();
    return files;
}

} // namespace ferry::transport
