#include "report.hpp"

#include "stats.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <sys/utsname.h>
#include <unistd.h>

namespace ferry::bench {

using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr double mib = 1024.0 * 1024.0;

// ---------------------------------------------------------------- environment

std::string trim(std::string s) {
    auto b = s.find_first_not_of(" \t\r\n");
    auto e = s.find_last_not_of(" \t\r\n");
    return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

std::string shell_quote(const std::string& s) {
    std::string out = "'";
    for (char c : s)
        out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
}

// The first line a command prints (stdout and stderr), "" when it cannot run.
std::string first_line_of(const std::string& command) {
    std::FILE* f = ::popen((command + " 2>&1").c_str(), "r");
    if (!f)
        return "";
    char buf[512];
    std::string line;
    if (std::fgets(buf, sizeof buf, f))
        line = buf;
    while (std::fgets(buf, sizeof buf, f)) {
    }
    int rc = ::pclose(f);
    return rc == 0 ? trim(line) : "";
}

// The file a command name runs, looked up in PATH like a shell does.
std::string resolve_binary(const std::string& name) {
    if (name.find('/') != std::string::npos) {
        std::error_code ec;
        auto p = fs::canonical(name, ec);
        return ec ? name : p.string();
    }
    const char* path = std::getenv("PATH");
    std::stringstream ss(path ? path : "");
    for (std::string dir; std::getline(ss, dir, ':');) {
        auto candidate = fs::path(dir.empty() ? "." : dir) / name;
        if (::access(candidate.c_str(), X_OK) == 0)
            return candidate.string();
    }
    return name;
}

std::string utc_now() {
    std::time_t t = std::time(nullptr);
    std::tm tm{};
    ::gmtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

// ---------------------------------------------------------------- HTML/SVG

std::string esc(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    for (char c : s) {
        switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&quot;"; break;
        default: out += c;
        }
    }
    return out;
}

// A value for people: 3 significant figures, no exponent.
std::string num(double v) {
    double a = std::fabs(v);
    if (a >= 100 || a == 0)
        return fmt::format("{:.0f}", v);
    if (a >= 10)
        return fmt::format("{:.1f}", v);
    return fmt::format("{:.2f}", v);
}

const char* path_color(std::size_t i) {
    static const char* palette[] = {"#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#9c755f", "#76b7b2", "#edc948"};
    return palette[i % (sizeof palette / sizeof palette[0])];
}

const char* rep_dash(int rep) {
    static const char* dashes[] = {"", "7 3", "2 2", "8 3 2 3"};
    return dashes[(rep - 1) % 4];
}

constexpr const char* switchover_color = "#d62728";

std::size_t path_index(const Report& r, const std::string& path) {
    auto it = std::find(r.paths.begin(), r.paths.end(), path);
    return static_cast<std::size_t>(it - r.paths.begin());
}

// The plot area of a chart and its mapping from data to pixels.
struct Frame {
    Frame(double w, double h) : width(w), height(h) {}
    double width, height;
    double left = 58, right = 16, top = 30, bottom = 44;
    double x0 = 0, x1 = 1, y0 = 0, y1 = 1;
    double px(double x) const { return left + (x - x0) / (x1 - x0) * (width - left - right); }
    double py(double y) const { return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom); }
};

std::string svg_open(const Frame& f, const std::string& title, const std::string& y_unit) {
    std::string s = fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{0:.0f}" height="{1:.0f}" viewBox="0 0 {0:.0f} {1:.0f}" font-family="DejaVu Sans, Arial, sans-serif">)",
                                f.width, f.height);
    s += fmt::format(R"(<rect width="100%" height="100%" fill="#fff"/><text x="{:.1f}" y="18" font-size="13" font-weight="bold" fill="#222">{}</text>)",
                     f.left, esc(title));
    double mid = (f.top + f.height - f.bottom) / 2;
    s += fmt::format(R"~(<text x="13" y="{0:.1f}" font-size="11" fill="#444" text-anchor="middle" transform="rotate(-90 13 {0:.1f})">{1}</text>)~",
                     mid, esc(y_unit));
    return s;
}

// Horizontal grid and labels for the y ticks; the two axes.
std::string svg_y_axis(const Frame& f, const std::vector<double>& ticks) {
    std::string s;
    double step = ticks.size() > 1 ? ticks[1] - ticks[0] : 1;
    for (double t : ticks) {
        double y = f.py(t);
        s += fmt::format(R"(<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" stroke="#e6e6e6"/>)", f.left, y,
                         f.width - f.right, y);
        s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" font-size="10" fill="#555" text-anchor="end">{}</text>)",
                         f.left - 5, y + 3.5, tick_label(t, step));
    }
    s += fmt::format(R"(<line x1="{0:.1f}" y1="{1:.1f}" x2="{0:.1f}" y2="{2:.1f}" stroke="#888"/>)", f.left, f.top,
                     f.height - f.bottom);
    s += fmt::format(R"(<line x1="{0:.1f}" y1="{2:.1f}" x2="{1:.1f}" y2="{2:.1f}" stroke="#888"/>)", f.left,
                     f.width - f.right, f.height - f.bottom);
    return s;
}

struct Line {
    std::string color;
    std::string dash;
    std::vector<std::pair<double, double>> xy;
    std::optional<double> marker_x; // the switchover
};

struct LineChart {
    std::string title;
    std::string y_unit;
    double x_max = 1;
    double y_max = 0;            // 0: from the data
    bool label_markers = true;   // "switchover" next to the marker (one line per chart)
    std::vector<Line> lines;
};

std::string svg_line_chart(const LineChart& c, double width, double height) {
    Frame f(width, height);
    double ymax = c.y_max;
    bool all_zero = true;
    for (auto& l : c.lines)
        for (auto& [x, y] : l.xy) {
            ymax = std::max(ymax, y);
            all_zero = all_zero && y == 0;
        }
    auto xt = nice_ticks(0, std::max(c.x_max, 0.001), 5);
    auto yt = nice_ticks(0, ymax, 4);
    f.x0 = xt.front();
    f.x1 = xt.back();
    f.y0 = yt.front();
    f.y1 = yt.back();
    std::string s = svg_open(f, c.title, c.y_unit);
    s += svg_y_axis(f, yt);
    double xstep = xt.size() > 1 ? xt[1] - xt[0] : 1;
    for (double t : xt)
        s += fmt::format(R"(<line x1="{0:.1f}" y1="{1:.1f}" x2="{0:.1f}" y2="{2:.1f}" stroke="#888"/><text x="{0:.1f}" y="{3:.1f}" font-size="10" fill="#555" text-anchor="middle">{4}</text>)",
                         f.px(t), f.height - f.bottom, f.height - f.bottom + 4, f.height - f.bottom + 15,
                         tick_label(t, xstep));
    s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" font-size="11" fill="#444" text-anchor="middle">time since the request (s)</text>)",
                     (f.left + f.width - f.right) / 2, f.height - 8);
    for (auto& l : c.lines) {
        if (!l.marker_x)
            continue;
        double x = f.px(*l.marker_x);
        const char* color = c.label_markers ? switchover_color : l.color.c_str();
        s += fmt::format(R"(<line x1="{0:.1f}" y1="{1:.1f}" x2="{0:.1f}" y2="{2:.1f}" stroke="{3}" stroke-width="1.2" stroke-dasharray="4 3" stroke-opacity="0.8"/>)",
                         x, f.top, f.height - f.bottom, color);
        if (c.label_markers) {
            bool right_half = x > (f.left + f.width - f.right) / 2;
            s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" font-size="10" fill="{}" text-anchor="{}">switchover</text>)",
                             right_half ? x - 4 : x + 4, f.top + 10, switchover_color, right_half ? "end" : "start");
        }
    }
    for (auto& l : c.lines) {
        if (l.xy.empty())
            continue;
        std::string pts;
        for (auto& [x, y] : l.xy)
            pts += fmt::format("{:.1f},{:.1f} ", f.px(x), f.py(y));
        s += fmt::format(R"(<polyline points="{}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"{}/>)", pts,
                         l.color, l.dash.empty() ? "" : fmt::format(R"( stroke-dasharray="{}")", l.dash));
        if (l.xy.size() <= 60)
            for (auto& [x, y] : l.xy)
                s += fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="2.2" fill="{}"/>)", f.px(x), f.py(y), l.color);
    }
    if (all_zero)
        s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" font-size="11" fill="#777" text-anchor="middle">0 throughout</text>)",
                         (f.left + f.width - f.right) / 2, (f.top + f.height - f.bottom) / 2);
    return s + "</svg>";
}

struct BarGroup {
    std::string label;
    std::string color;
    std::vector<double> values; // each run
};

// Bars at the median, a whisker from min to max, a dot per run.
std::string svg_bar_chart(const std::string& title, const std::string& unit, const std::vector<BarGroup>& groups) {
    double width = std::max(300.0, 92.0 * static_cast<double>(groups.size()) + 80);
    Frame f(width, 250);
    f.top = 40;
    double ymax = 0;
    for (auto& g : groups)
        for (double v : g.values)
            ymax = std::max(ymax, v);
    auto yt = nice_ticks(0, ymax, 4);
    f.y0 = yt.front();
    f.y1 = yt.back();
    std::string s = svg_open(f, title, unit);
    s += svg_y_axis(f, yt);
    double slot = (f.width - f.left - f.right) / static_cast<double>(std::max<std::size_t>(groups.size(), 1));
    double bar = std::min(56.0, slot * 0.55);
    for (std::size_t i = 0; i < groups.size(); ++i) {
        auto& g = groups[i];
        double cx = f.left + slot * (static_cast<double>(i) + 0.5);
        s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" font-size="11" fill="#333" text-anchor="middle">{}</text>)", cx,
                         f.height - f.bottom + 16, esc(g.label));
        if (g.values.empty()) {
            s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" font-size="11" fill="#999" text-anchor="middle">n/a</text>)", cx,
                             f.height - f.bottom - 6);
            continue;
        }
        auto st = spread(g.values);
        double ytop = f.py(st.median), ybase = f.py(0);
        s += fmt::format(R"(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="{}" fill-opacity="0.85"/>)",
                         cx - bar / 2, ytop, bar, std::max(ybase - ytop, 0.0), g.color);
        if (st.max > st.min) {
            double ylo = f.py(st.min), yhi = f.py(st.max);
            s += fmt::format(R"(<line x1="{0:.1f}" y1="{1:.1f}" x2="{0:.1f}" y2="{2:.1f}" stroke="#333" stroke-width="1.3"/>)", cx,
                             ylo, yhi);
            for (double y : {ylo, yhi})
                s += fmt::format(R"(<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" stroke="#333" stroke-width="1.3"/>)",
                                 cx - 7, y, cx + 7, y);
        }
        for (std::size_t k = 0; k < g.values.size(); ++k) {
            double dx = (static_cast<double>(k) - static_cast<double>(g.values.size() - 1) / 2) * 5;
            s += fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="3" fill="#fff" stroke="#333" stroke-width="1.2"/>)",
                             cx + dx, f.py(g.values[k]));
        }
        s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" font-size="11" font-weight="bold" fill="#222" text-anchor="middle">{}</text>)",
                         cx, f.py(st.max) - 7, num(st.median));
    }
    return s + "</svg>";
}

constexpr const char* css = R"(
body { font-family: "DejaVu Sans", Arial, sans-serif; color: #222; margin: 24px 32px; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 18px 0 6px; }
p.sub, p.note { color: #555; font-size: 13px; margin: 4px 0 8px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.code { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; word-break: break-all; max-width: 900px; }
small { color: #666; }
.charts { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.charts svg { border: 1px solid #e4e4e4; }
.legend { font-size: 12px; color: #333; margin: 6px 0 2px; display: flex; flex-wrap: wrap; gap: 16px; align-items: center; }
.legend svg { vertical-align: middle; margin-right: 4px; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px; }
)";

std::string legend_line(const std::string& color, const std::string& dash, const std::string& label) {
    return fmt::format(R"(<span><svg width="30" height="10"><line x1="0" y1="5" x2="30" y2="5" stroke="{}" stroke-width="2"{}/></svg>{}</span>)",
                       color, dash.empty() ? "" : fmt::format(R"( stroke-dasharray="{}")", dash), esc(label));
}

std::string switchover_legend(const std::string& color) {
    return fmt::format(R"(<span><svg width="12" height="14"><line x1="6" y1="0" x2="6" y2="14" stroke="{}" stroke-width="1.5" stroke-dasharray="4 2"/></svg>switchover (QEMU's status left "active")</span>)",
                       color);
}

std::string value_cell(const json& v) {
    if (v.is_string())
        return esc(v.get<std::string>());
    if (v.is_number_float())
        return num(v.get<double>());
    return esc(v.dump());
}

// The four quantities over time; `pick` maps a point to a y value.
struct Quantity {
    const char* title;
    const char* unit;
    double fixed_max;
    double (*pick)(const Point&);
};

const Quantity quantities[] = {
    {"Transfer rate", "MiB/s", 0, [](const Point& p) { return p.transfer_rate_bps / mib; }},
    {"Dirty rate", "MiB/s", 0, [](const Point& p) { return p.dirty_rate_bps / mib; }},
    {"Remaining", "MiB", 0, [](const Point& p) { return static_cast<double>(p.remaining_bytes) / mib; }},
    {"Throttle", "% of vCPU time", 100, [](const Point& p) { return static_cast<double>(p.throttle_percent); }},
};

Line line_of(const ReportRun& run, const Quantity& q, std::string color, std::string dash) {
    Line l;
    l.color = std::move(color);
    l.dash = std::move(dash);
    for (auto& p : run.series.points)
        if (!p.status.empty() && p.status != "setup") // before QEMU sends anything
            l.xy.emplace_back(p.t_ms / 1000, q.pick(p));
    if (run.series.switchover_ms)
        l.marker_x = *run.series.switchover_ms / 1000;
    return l;
}

double end_s(const ReportRun& run) {
    double e = run.series.points.empty() ? 0 : run.series.points.back().t_ms;
    if (run.series.switchover_ms)
        e = std::max(e, *run.series.switchover_ms);
    return e / 1000;
}

} // namespace

std::vector<double> nice_ticks(double lo, double hi, int about) {
    if (!(hi > lo))
        hi = lo + 1;
    about = std::max(about, 1);
    double raw = (hi - lo) / about;
    double mag = std::pow(10.0, std::floor(std::log10(raw)));
    double norm = raw / mag;
    double step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
    double start = std::floor(lo / step + 1e-9) * step;
    double end = std::ceil(hi / step - 1e-9) * step;
    std::vector<double> ticks;
    for (int i = 0; start + i * step <= end + step * 1e-6; ++i) {
        double t = start + i * step;
        ticks.push_back(std::fabs(t) < step * 1e-9 ? 0 : t);
    }
    return ticks;
}

std::string tick_label(double v, double step) {
    int decimals = step >= 1 ? 0 : static_cast<int>(std::ceil(-std::log10(step) - 1e-9));
    if (step < 1 && std::fabs(step * std::pow(10.0, decimals) - std::round(step * std::pow(10.0, decimals))) > 1e-6)
        ++decimals; // 0.25
    return fmt::format("{:.{}f}", v, std::clamp(decimals, 0, 6));
}

json environment(const std::string& qemu_binary, int argc, char** argv) {
    json env;
    std::string model;
    int cpus = 0;
    std::ifstream cpuinfo("/proc/cpuinfo");
    for (std::string line; std::getline(cpuinfo, line);) {
        auto colon = line.find(':');
        if (colon == std::string::npos)
            continue;
        auto key = trim(line.substr(0, colon));
        if (key == "processor")
            ++cpus;
        else if (key == "model name" && model.empty())
            model = trim(line.substr(colon + 1));
    }
    env["cpu_model"] = model;
    env["cpu_count"] = cpus;
    env["cpus_online"] = ::sysconf(_SC_NPROCESSORS_ONLN);
    std::ifstream meminfo("/proc/meminfo");
    for (std::string line; std::getline(meminfo, line);)
        if (line.rfind("MemTotal:", 0) == 0) {
            env["memory_bytes"] = std::strtoull(line.c_str() + 9, nullptr, 10) * 1024;
            break;
        }
    struct utsname u {};
    if (::uname(&u) == 0) {
        env["kernel"] = fmt::format("{} {}", u.sysname, u.release);
        env["kernel_version"] = u.version;
        env["machine"] = u.machine;
        env["hostname"] = u.nodename;
    }
    auto qemu = resolve_binary(qemu_binary);
    env["qemu_binary"] = qemu;
    env["qemu_version"] = first_line_of(shell_quote(qemu) + " --version");
    env["ferry_version"] = FERRY_VERSION;
    env["date"] = utc_now();
    std::string cmd;
    for (int i = 0; i < argc; ++i) {
        std::string a = argv[i];
        bool plain = !a.empty() && a.find_first_of(" \t\"'\\$`") == std::string::npos;
        cmd += (i ? " " : "") + (plain ? a : shell_quote(a));
    }
    env["command"] = cmd;
    return env;
}

json samples_json(const Report& r) {
    json runs = json::array();
    for (auto& run : r.runs)
        runs.push_back({{"path", run.path}, {"rep", run.rep}, {"values", run.values}, {"series", run.series.to_json()}});
    return {{"scenario", r.scenario}, {"parameters", r.parameters}, {"runs", runs}};
}

json summary_json(const Report& r) {
    json paths = json::object();
    for (auto& path : r.paths) {
        json p = json::object();
        for (auto& m : r.metrics) {
            std::vector<double> v;
            for (auto& run : r.runs)
                if (run.path == path)
                    if (auto it = run.values.find(m.key); it != run.values.end())
                        v.push_back(it->second);
            auto s = spread(v);
            p[m.key] = {{"unit", m.unit}, {"n", s.n},     {"median", s.median}, {"mean", s.mean},
                        {"min", s.min},   {"max", s.max}, {"q1", s.q1},         {"q3", s.q3},
                        {"iqr", s.iqr()}, {"relative_range", s.relative_range()}};
        }
        paths[path] = p;
    }
    json ratios = json::object();
    for (auto& q : r.ratios)
        ratios[q.key] = q.value;
    return {{"scenario", r.scenario}, {"title", r.title}, {"paths", paths}, {"ratios", ratios}};
}

std::string render_html(const Report& r) {
    auto summary = summary_json(r);
    std::string h = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">";
    h += fmt::format("<title>ferry-bench {}</title><style>{}</style></head><body>\n", esc(r.scenario), css);
    h += fmt::format("<h1>ferry-bench {}</h1>\n<p class=\"sub\">{}</p>\n", esc(r.scenario), esc(r.title));

    // Environment and parameters.
    h += "<h2>Environment</h2>\n<table>";
    auto& e = r.environment;
    auto row = [&](const char* k, const std::string& v, bool code = false) {
        h += fmt::format("<tr><th>{}</th><td{}>{}</td></tr>", k, code ? " class=\"code\"" : "", esc(v));
    };
    row("CPU", fmt::format("{} ({} CPUs)", e.value("cpu_model", "?"), e.value("cpu_count", 0)));
    row("Memory", fmt::format("{:.1f} GiB", static_cast<double>(e.value("memory_bytes", std::uint64_t{0})) / (mib * 1024)));
    row("Kernel", fmt::format("{} ({}, {})", e.value("kernel", "?"), e.value("machine", "?"), e.value("kernel_version", "?")));
    row("QEMU", fmt::format("{} ({})", e.value("qemu_version", "?"), e.value("qemu_binary", "?")));
    row("ferry", e.value("ferry_version", "?"));
    row("Date", e.value("date", "?"));
    row("Command", e.value("command", ""), true);
    h += "</table>\n<table><tr><th colspan=\"2\">Parameters</th></tr>";
    for (auto& [k, v] : r.parameters.items())
        h += fmt::format("<tr><td>{}</td><td class=\"n\">{}</td></tr>", esc(k), value_cell(v));
    h += "</table>\n";

    // Summary table.
    h += "<h2>Summary</h2>\n<p class=\"note\">Median of the runs in bold; below it min&ndash;max, the interquartile "
         "range (IQR), half the min&ndash;max range relative to the median (&plusmn;) and the number of runs.</p>\n<table><tr><th>metric</th>";
    for (auto& p : r.paths)
        h += fmt::format("<th><span class=\"swatch\" style=\"background:{}\"></span>{}</th>", path_color(path_index(r, p)), esc(p));
    h += "</tr>";
    for (auto& m : r.metrics) {
        h += fmt::format("<tr><td>{} ({})</td>", esc(m.label), esc(m.unit));
        for (auto& p : r.paths) {
            auto& c = summary["paths"][p][m.key];
            if (c["n"].get<std::size_t>() == 0) {
                h += "<td class=\"n\">&ndash;</td>";
                continue;
            }
            h += fmt::format("<td class=\"n\"><b>{}</b><br><small>{}&ndash;{} &middot; IQR {} &middot; &plusmn;{:.0f}% &middot; n={}</small></td>",
                             num(c["median"].get<double>()), num(c["min"].get<double>()), num(c["max"].get<double>()),
                             num(c["iqr"].get<double>()), 50 * c["relative_range"].get<double>(),
                             c["n"].get<std::size_t>());
        }
        h += "</tr>";
    }
    h += "</table>\n";
    if (!r.ratios.empty()) {
        h += "<table><tr><th>ratio of medians</th><th></th></tr>";
        for (auto& q : r.ratios)
            h += fmt::format("<tr><td>{}</td><td class=\"n\"><b>{:.2f}x</b></td></tr>", esc(q.label), q.value);
        h += "</table>\n";
    }

    // Bar charts, one per metric.
    h += "<h2>Side by side</h2>\n<div class=\"legend\"><span>bar: median</span><span>whisker: min&ndash;max</span>"
         "<span><svg width=\"10\" height=\"10\"><circle cx=\"5\" cy=\"5\" r=\"3\" fill=\"#fff\" stroke=\"#333\"/></svg>each run</span>"
         "<small>(a metric that was 0 in every run is in the table only)</small></div>\n"
         "<div class=\"charts\">";
    for (auto& m : r.metrics) {
        std::vector<BarGroup> groups;
        bool any = false;
        for (auto& p : r.paths) {
            BarGroup g{p, path_color(path_index(r, p)), {}};
            for (auto& run : r.runs)
                if (run.path == p)
                    if (auto it = run.values.find(m.key); it != run.values.end())
                        g.values.push_back(it->second);
            any = any || std::any_of(g.values.begin(), g.values.end(), [](double v) { return v != 0; });
            groups.push_back(std::move(g));
        }
        if (any)
            h += svg_bar_chart(m.label, m.unit, groups);
    }
    h += "</div>\n";

    // Over time: every run together, then each run on its own.
    double all_end = 0;
    for (auto& run : r.runs)
        all_end = std::max(all_end, end_s(run));
    std::string sources;
    for (auto& run : r.runs)
        if (sources.find(run.series.source) == std::string::npos)
            sources += (sources.empty() ? "" : ", ") + run.series.source;
    h += fmt::format("<h2>Over time, all runs</h2>\n<p class=\"note\">Sampled about every {:.0f} ms while each migration "
                     "ran ({}; a point whenever QEMU's status changed), from the migration request: ferry's times include "
                     "preparing the destination. Lines start once QEMU's migration is past setup. Transfer rate: the bytes "
                     "sent since the sample about {:.0f} ms earlier over that time (what QEMU or ferry estimated itself is "
                     "in samples.json as reported_rate_bps).</p>\n<div class=\"legend\">",
                     r.runs.empty() ? 250.0 : r.runs.front().series.every_ms, esc(sources),
                     r.runs.empty() ? 250.0 : r.runs.front().series.every_ms);
    for (auto& run : r.runs)
        h += legend_line(path_color(path_index(r, run.path)), rep_dash(run.rep), fmt::format("{} #{}", run.path, run.rep));
    h += switchover_legend("#555") + " <small>(in the run's colour)</small></div>\n<div class=\"charts\">";
    for (auto& q : quantities) {
        LineChart c{q.title, q.unit, all_end, q.fixed_max, false, {}};
        for (auto& run : r.runs)
            c.lines.push_back(line_of(run, q, path_color(path_index(r, run.path)), rep_dash(run.rep)));
        h += svg_line_chart(c, 312, 230);
    }
    h += "</div>\n<h2>Each run</h2>\n";
    for (auto& run : r.runs) {
        std::string facts;
        for (auto& m : r.metrics)
            if (auto it = run.values.find(m.key); it != run.values.end())
                facts += fmt::format("{}{} {} {}", facts.empty() ? "" : " &middot; ", esc(m.label), num(it->second), esc(m.unit));
        h += fmt::format("<h3><span class=\"swatch\" style=\"background:{}\"></span>{} &middot; run {}</h3>\n<p class=\"note\">{}"
                         "<br>{} points from {}; switchover at {}</p>\n<div class=\"charts\">",
                         path_color(path_index(r, run.path)), esc(run.path), run.rep, facts, run.series.points.size(),
                         esc(run.series.source),
                         run.series.switchover_ms ? fmt::format("{:.2f} s", *run.series.switchover_ms / 1000) : "not seen");
        double end = end_s(run);
        for (auto& q : quantities) {
            LineChart c{q.title, q.unit, end, q.fixed_max, true, {line_of(run, q, path_color(path_index(r, run.path)), "")}};
            h += svg_line_chart(c, 312, 210);
        }
        h += "</div>\n";
    }
    h += "</body></html>\n";
    return h;
}

Result<void> write_report(const std::string& dir, const Report& r) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec)
        return make_error(Errc::io, fmt::format("creating {}: {}", dir, ec.message()));
    auto put = [&](const std::string& name, const std::string& text) -> Result<void> {
        std::ofstream out(dir + "/" + name, std::ios::trunc);
        out << text;
        out.close();
        if (!out)
            return make_error(Errc::io, "writing " + dir + "/" + name);
        return {};
    };
    for (auto& [name, text] : std::vector<std::pair<std::string, std::string>>{
             {"environment.json", r.environment.dump(2) + "\n"},
             {"samples.json", samples_json(r).dump(1) + "\n"},
             {"summary.json", summary_json(r).dump(2) + "\n"},
             {"index.html", render_html(r)}})
        if (auto w = put(name, text); !w)
            return w;
    return {};
}

} // namespace ferry::bench
