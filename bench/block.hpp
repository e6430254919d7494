#pragma once
// ferry-bench block: copying a disk of a running QEMU to another image on
// this machine, QEMU's way (blockdev-mirror into an NBD export) beside
// ferry's (its mirror rounds, io_uring for raw, over a disk stream), on a
// raw disk full of random data, the same disk 10% full, and a qcow2.
#include <string>

namespace ferry::bench {

struct BlockOptions {
    std::string size = "2Gi";
    std::string images = "full,tenth,qcow2";
    std::string paths = "qemu-mirror,ferry,qemu-mirror-tls,ferry-tls";
    int reps = 1;
    std::string work_dir = "/tmp/ferry-bench";
    bool json = false;
};

int run_block_bench(const BlockOptions& o);

} // namespace ferry::bench
