#pragma once
// Small statistics the benchmark reports share.
#include <algorithm>
#include <vector>

namespace ferry::bench {

// The middle value (the mean of the two middle ones); 0 for none.
inline double median(std::vector<double> v) {
    if (v.empty())
        return 0;
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

} // namespace ferry::bench
