#pragma once
// Single-use tokens that admit data channels: the target issues one per
// expected channel of a migration; a channel presenting it is bound to that
// migration and position. Redeemed once; revoked when the migration ends.
#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace ferry::transport {

struct TokenGrant {
    std::string migration;
    int index = 0; // position in the order QEMU opened its connections
};

class TokenRegistry {
public:
    std::string issue(const std::string& migration, int index);
    std::optional<TokenGrant> redeem(const std::string& token);
    void revoke(const std::string& migration);

private:
    std::map<std::string, TokenGrant> grants_;
};

// 32 random bytes, hex.
std::string random_token();

} // namespace ferry::transport
