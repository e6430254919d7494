#pragma once
// Prometheus metrics (docs/metrics.md): what ended is counted as it ends,
// what runs is read at each scrape, and a small HTTP listener serves the
// text format on GET /metrics.
#include "common/error.hpp"
#include "common/throttle.hpp"
#include "control/http.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <nlohmann/json.hpp>

#include <array>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::engine {
class Engine;
}
namespace ferry::scheduler {
class Planner;
}

namespace ferry::control {

// A Prometheus histogram with fixed upper bounds (seconds).
class Histogram {
public:
    explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size(), 0) {}
    void observe(double value);
    // "# TYPE" line and the _bucket, _sum and _count lines, with `labels`
    // (already formatted, e.g. `mode="precopy"`, or "").
    void render(std::string& out, std::string_view name, const std::string& labels) const;
    std::uint64_t count() const { return count_; }

private:
    std::vector<double> bounds_;
    std::vector<std::uint64_t> counts_; // per bucket, not cumulative
    std::uint64_t count_ = 0;
    double sum_ = 0;
};

// What the waiting reasons the scheduler gives come to, as a bounded label:
// source_limit, target_limit, cluster_limit, no_room, max_parallel,
// retry_backoff or other.
std::string_view waiting_reason_kind(std::string_view reason);

// A label value escaped for the text format (\\, \" and \n).
std::string label_value(std::string_view v);


class Metrics {
public:
    Metrics(engine::Engine& engine, scheduler::Planner& planner);
    ~Metrics();

    // Counts one ended migration (the migration object, as show returns it).
    void ended(const nlohmann::json& migration);
    // The whole exposition, read now.
    std::string render() const;

    // Serves GET /metrics on `address` ("host:port"); port 0 picks one.
    Result<void> listen(const std::string& address);
    unsigned short port() const;
    void stop();

private:
    static boost::asio::awaitable<void> accept_loop(Metrics* self);
    static boost::asio::awaitable<void> serve(Metrics* self, boost::asio::ip::tcp::socket socket);
    void refuse_busy(boost::asio::ip::tcp::socket& socket);

    engine::Engine& engine_;
    scheduler::Planner& planner_;
    // outcome ("succeeded"/"failed") x mode ("precopy"/"postcopy")
    std::map<std::pair<std::string, std::string>, std::uint64_t> outcomes_;
    std::uint64_t sent_bytes_ = 0;
    std::map<std::string, Histogram> downtime_, blackout_, duration_; // by mode
    std::unique_ptr<boost::asio::ip::tcp::acceptor> acceptor_;
    std::shared_ptr<std::size_t> connections_ = std::make_shared<std::size_t>(0);
    LogThrottle refused_; // scrapes refused because every slot was taken
};

} // namespace ferry::control
