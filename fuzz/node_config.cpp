// Fuzz target: a ferryd.toml as an operator writes it.
#include "config/node_config.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    auto c = ferry::config::parse_node_config(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.toml");
    if (c) {
        nlohmann::json j = c->migration;
        (void)c->where("tls.cert");
    }
    return 0;
}
