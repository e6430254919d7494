#include "transport/tokens.hpp"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <fmt/format.h>

namespace ferry::transport {

std::string random_token() {
    unsigned char bytes[32];
    RAND_bytes(bytes, sizeof bytes);
    std::string hex;
    for (auto b : bytes)
        hex += fmt::format("{:02x}", b);
    return hex;
}

std::string TokenRegistry::issue(const std::string& migration, int index) {
    auto token = random_token();
    grants_[token] = TokenGrant{migration, index};
    return token;
}

std::optional<TokenGrant> TokenRegistry::redeem(const std::string& token) {
    // Constant-time comparison against every key would be overkill: the map
    // lookup reveals nothing useful about 256-bit random tokens.
    auto it = grants_.find(token);
    if (it == grants_.end())
        return std::nullopt;
    auto grant = it->second;
    grants_.erase(it);
    return grant;
}

void TokenRegistry::revoke(const std::string& migration) {
    std::erase_if(grants_, [&](const auto& kv) { return kv.second.migration == migration; });
}

} // namespace ferry::transport
