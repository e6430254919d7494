#pragma once
// ferry-bench transport: the same VM (>= 1 GiB of non-zero RAM) migrated
// between two QEMUs via QEMU's plain TCP, QEMU's native TLS, ferry over TLS
// and ferry plaintext (two real ferryd processes), side by side.
#include "common/error.hpp"
#include "series.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ferry::bench {

// A directory of certificates as QEMU's tls-creds-x509 wants them (ca-cert,
// server-cert/key for node-b, client-cert/key for node-a): "rsa" (RSA-2048
// from `openssl req`, as QEMU's documentation has a user make them) or
// "p256" (ECDSA P-256, ferry's own kind). Kept if it exists.
Result<void> qemu_tls_dir(const std::string& dir, const std::string& certs);

struct TransportSetup {
    std::string work_dir;     // short path (Unix sockets)
    std::string build_dir;    // for ferryd and the guest kernel
    std::uint64_t ram_bytes = 1ULL << 30;
    int multifd = 0;          // ferry paths: multifd_channels
    bool guest_running = true; // every path: leave the guest running (as a user would) or pause it first
    std::string qemu_certs = "rsa"; // QEMU TLS path: "rsa" (RSA-2048 from `openssl req`), "p256" (ferry's own)
};

struct TransportSample {
    double mib_per_s = 0;   // RAM bytes transferred / QEMU total time
    double total_ms = 0;
    double downtime_ms = 0;
    double transferred_mib = 0;
    Series series;          // progress over time, from the migration request
};

// path: "qemu-tcp", "qemu-tls", "ferry-tls", "ferry-plain"
Result<TransportSample> run_transport(const TransportSetup& setup, const std::string& path);

// ferry-bench shaping: one migration under bandwidth_per_migration, then two
// concurrent ones under a node cap ([node] max_migration_bandwidth).
struct ShapingReport {
    std::uint64_t per_migration = 0;
    std::uint64_t node_cap = 0;
    TransportSample single;
    std::vector<TransportSample> concurrent;
};
Result<ShapingReport> run_shaping(const TransportSetup& setup, std::uint64_t per_migration, std::uint64_t node_cap);

// ferry-bench postcopy: a guest that outruns the link, migrated between two
// ferryd over TLS with post-copy, with and without the preempt channel.
struct PostcopySample {
    bool preempt = false;
    double total_ms = 0;                 // QEMU total-time
    std::optional<double> blackout_ms;   // at the switchover
    double worst_stall_ms = 0;           // the longest the guest stood still on the destination afterwards
    double stalled_ms = 0;               // all of that time together
};
Result<PostcopySample> run_postcopy(const TransportSetup& setup, bool preempt, std::uint64_t bandwidth,
                                    const std::string& memory, int ws_mib, int rate, int stride);

// Writes the RAM image (non-zero, not compressible) once.
Result<void> make_ram_image(const std::string& path, std::uint64_t bytes);

} // namespace ferry::bench
