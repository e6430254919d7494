#pragma once
// Small statistics the benchmark reports share.
#include <algorithm>
#include <cstddef>
#include <numeric>
#include <vector>

namespace ferry::bench {

// The middle value (the mean of the two middle ones); 0 for none.
inline double median(std::vector<double> v) {
    if (v.empty())
        return 0;
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// The q-quantile (0 <= q <= 1) of sorted values, interpolated linearly
// between neighbours (q = 0.5 is the median); 0 for none.
inline double quantile_sorted(const std::vector<double>& sorted, double q) {
    if (sorted.empty())
        return 0;
    double pos = std::clamp(q, 0.0, 1.0) * static_cast<double>(sorted.size() - 1);
    auto lo = static_cast<std::size_t>(pos);
    if (lo + 1 >= sorted.size())
        return sorted.back();
    double frac = pos - static_cast<double>(lo);
    return sorted[lo] + frac * (sorted[lo + 1] - sorted[lo]);
}

// Where a handful of repeated measurements lie.
struct Spread {
    std::size_t n = 0;
    double median = 0, mean = 0, min = 0, max = 0;
    double q1 = 0, q3 = 0; // lower and upper quartiles
    double iqr() const { return q3 - q1; }
    // (max - min) / median: the whole range relative to the typical value
    // (0 when the median is 0).
    double relative_range() const { return median != 0 ? (max - min) / median : 0; }
};

inline Spread spread(std::vector<double> v) {
    Spread s;
    if (v.empty())
        return s;
    std::sort(v.begin(), v.end());
    s.n = v.size();
    s.median = quantile_sorted(v, 0.5);
    s.mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
    s.min = v.front();
    s.max = v.back();
    s.q1 = quantile_sorted(v, 0.25);
    s.q3 = quantile_sorted(v, 0.75);
    return s;
}

} // namespace ferry::bench
