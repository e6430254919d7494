#pragma once
// ferry-bench --report DIR: a directory a person can open and a script can
// read. environment.json (machine, kernel, QEMU and ferry versions, the
// command), samples.json (every run with its progress over time),
// summary.json (per path: median and spread of each metric, the ratios) and
// index.html (self-contained: tables and inline SVG charts, no scripts).
#include "common/error.hpp"
#include "series.hpp"

#include <nlohmann/json.hpp>

#include <map>
#include <string>
#include <vector>

namespace ferry::bench {

// A number each run yields, summarized per path and drawn as bars.
struct Metric {
    std::string key;   // in ReportRun::values: "total_ms"
    std::string label; // "QEMU total time"
    std::string unit;  // "ms"
};

// One migration.
struct ReportRun {
    std::string path; // "ferry", "qemu-direct", "qemu-tcp", ...
    int rep = 1;      // 1-based
    std::map<std::string, double> values; // Metric::key -> value; absent: not measured
    Series series;
};

// A comparison the text report prints too: "ferry TLS / QEMU TLS" = 1.36.
struct Ratio {
    std::string key;
    std::string label;
    double value = 0;
};

struct Report {
    std::string scenario;              // "local", "transport"
    std::string title;                 // one line: what ran
    nlohmann::json environment;        // from environment()
    nlohmann::json parameters;         // the scenario's settings
    std::vector<std::string> paths;    // in the order to show them
    std::vector<Metric> metrics;
    std::vector<ReportRun> runs;       // in the order they ran
    std::vector<Ratio> ratios;
};

// This machine and this invocation: CPU model and count (/proc/cpuinfo),
// memory, kernel (uname), `<qemu> --version`, ferry's version, the date (UTC)
// and the command line.
nlohmann::json environment(const std::string& qemu_binary, int argc, char** argv);

nlohmann::json samples_json(const Report& r);
nlohmann::json summary_json(const Report& r);
std::string render_html(const Report& r);

// Writes the four files into dir (created if missing).
Result<void> write_report(const std::string& dir, const Report& r);

// Chart helpers, pure.
// Round tick values covering [lo, hi] with about `about` intervals; the first
// is <= lo and the last >= hi. hi <= lo gives ticks for [lo, lo + 1].
std::vector<double> nice_ticks(double lo, double hi, int about);
// A tick label with no more decimals than the step between ticks needs.
std::string tick_label(double v, double step);

} // namespace ferry::bench
