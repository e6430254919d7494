// Runs one fuzz target over its seed corpus and every past finding
// (fuzz/corpus/<target>, fuzz/findings/<target>), so what fuzzing once
// found stays fixed in every build, sanitizers included.
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {
std::vector<std::string> dirs;
}

TEST(FuzzReplay, SeedsAndFindings) {
    std::size_t inputs = 0;
    for (auto& dir : dirs) {
        std::error_code ec;
        if (!std::filesystem::is_directory(dir, ec))
            continue;
        for (auto& entry : std::filesystem::directory_iterator(dir)) {
            if (!entry.is_regular_file())
                continue;
            std::ifstream in(entry.path(), std::ios::binary);
            std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
            SCOPED_TRACE(entry.path().string());
            EXPECT_EQ(LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(data.data()), data.size()), 0);
            ++inputs;
        }
    }
    EXPECT_GT(inputs, 0U) << "no seed corpus found";
}

int main(int argc, char** argv) {
    ::testing::InitGoogleTest(&argc, argv);
    for (int i = 1; i < argc; ++i)
        dirs.push_back(argv[i]);
    return RUN_ALL_TESTS();
}
