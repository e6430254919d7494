#include "control/metrics.hpp"

#include "common/log.hpp"
#include "engine/engine.hpp"
#include "scheduler/planner.hpp"
#include "transport/channel.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

namespace ferry::control {

namespace asio = boost::asio;
using json = nlohmann::json;
using tcp = asio::ip::tcp;

namespace {

constexpr std::size_t max_request_head = 8192;
constexpr std::size_t max_connections = 16;

std::shared_ptr<spdlog::logger> log() {
    static auto l = logger("metrics");
    return l;
}

std::string number(double v) {
    auto s = fmt::format("{}", v);
    return s;
}

void header(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

std::uint64_t u64(const json& j, const char* key) {
    auto it = j.find(key);
    return it != j.end() && it->is_number_unsigned() ? it->get<std::uint64_t>()
           : it != j.end() && it->is_number_integer() && it->get<std::int64_t>() > 0
               ? static_cast<std::uint64_t>(it->get<std::int64_t>())
               : 0;
}

std::vector<double> blackout_bounds() { return {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}; }
std::vector<double> duration_bounds() { return {1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600}; }

} // namespace

void Histogram::observe(double value) {
    for (std::size_t i = 0; i < bounds_.size(); ++i)
        if (value <= bounds_[i]) {
            ++counts_[i];
            break;
        }
    ++count_;
    sum_ += value;
}

void Histogram::render(std::string& out, std::string_view name, const std::string& labels) const {
    auto sep = labels.empty() ? "" : ",";
    std::uint64_t cumulative = 0;
    for (std::size_t i = 0; i < bounds_.size(); ++i) {
        cumulative += counts_[i];
        out += fmt::format("{}_bucket{{{}{}le=\"{}\"}} {}\n", name, labels, sep, number(bounds_[i]), cumulative);
    }
    out += fmt::format("{}_bucket{{{}{}le=\"+Inf\"}} {}\n", name, labels, sep, count_);
    auto braces = labels.empty() ? std::string() : "{" + labels + "}";
    out += fmt::format("{}_sum{} {}\n{}_count{} {}\n", name, braces, number(sum_), name, braces, count_);
}

std::string_view waiting_reason_kind(std::string_view r) {
    auto starts = [&](std::string_view p) { return r.substr(0, p.size()) == p; };
    if (starts("source "))
        return "source_limit";
    if (starts("target "))
        return "target_limit";
    if (starts("cluster "))
        return "cluster_limit";
    if (starts("every node") || starts("no node"))
        return "no_room";
    if (starts("max-parallel"))
        return "max_parallel";
    if (starts("retry "))
        return "retry_backoff";
    return "other";
}

std::string label_value(std::string_view v) {
    std::string out;
    for (char c : v) {
        if (c == '\\')
            out += "\\\\";
        else if (c == '"')
            out += "\\\"";
        else if (c == '\n')
            out += "\\n";
        else
            out += c;
    }
    return out;
}

Metrics::Metrics(engine::Engine& engine, scheduler::Planner& planner) : engine_(engine), planner_(planner) {
    engine_.on_migration_ended([this](const std::string& id) {
        if (auto m = engine_.show_migration(id))
            ended(*m);
    });
}

Metrics::~Metrics() { stop(); }

void Metrics::ended(const json& m) {
    auto phase = m.value("phase", "");
    if (phase != "Succeeded" && phase != "Failed")
        return;
    auto mode = m.value("mode", "precopy");
    ++outcomes_[{phase == "Succeeded" ? "succeeded" : "failed", mode}];
    if (auto p = m.find("progress"); p != m.end() && p->is_object()) {
        sent_bytes_ += u64(*p, "transferred_bytes");
        if (auto d = p->find("disks"); d != p->end() && d->is_object())
            sent_bytes_ += u64(*d, "sent_bytes");
    }
    if (phase != "Succeeded")
        return;
    auto r = m.find("result");
    if (r == m.end() || !r->is_object())
        return;
    auto seconds = [&](const char* key) -> std::optional<double> {
        auto v = r->find(key);
        if (v == r->end() || !v->is_number())
            return std::nullopt;
        return v->get<double>() / 1000.0;
    };
    auto hist = [&](std::map<std::string, Histogram>& by_mode, std::vector<double> bounds) -> Histogram& {
        return by_mode.try_emplace(mode, std::move(bounds)).first->second;
    };
    if (auto s = seconds("downtime_ms"))
        hist(downtime_, blackout_bounds()).observe(*s);
    if (auto s = seconds("guest_blackout_ms"))
        hist(blackout_, blackout_bounds()).observe(*s);
    if (auto s = seconds("total_time_ms"))
        hist(duration_, duration_bounds()).observe(*s);
}

std::string Metrics::render() const {
    std::string out;
    auto& node = engine_.config().node.name;

    header(out, "ferry_build_info", "gauge", "ferry's version; always 1");
    out += fmt::format("ferry_build_info{{version=\"{}\",node=\"{}\"}} 1\n", label_value(FERRY_VERSION),
                       label_value(node));

    header(out, "ferry_migrations_total", "counter",
           "Migrations that left this node and ended since ferryd started, by outcome and mode");
    for (auto outcome : {"succeeded", "failed"})
        for (auto mode : {"precopy", "postcopy"}) {
            auto it = outcomes_.find({outcome, mode});
            out += fmt::format("ferry_migrations_total{{outcome=\"{}\",mode=\"{}\"}} {}\n", outcome, mode,
                               it == outcomes_.end() ? 0 : it->second);
        }
    header(out, "ferry_migration_sent_bytes_total", "counter",
           "Bytes the ended migrations from this node sent (RAM and disks)");
    out += fmt::format("ferry_migration_sent_bytes_total {}\n", sent_bytes_);

    auto histograms = [&](const std::map<std::string, Histogram>& by_mode, std::string_view name,
                          std::string_view help) {
        header(out, name, "histogram", help);
        for (auto mode : {"precopy", "postcopy"}) {
            auto it = by_mode.find(mode);
            Histogram empty(name == "ferry_migration_duration_seconds" ? duration_bounds() : blackout_bounds());
            (it == by_mode.end() ? empty : it->second).render(out, name, fmt::format("mode=\"{}\"", mode));
        }
    };
    histograms(downtime_, "ferry_migration_downtime_seconds",
               "QEMU's downtime of the successful migrations from this node");
    histograms(blackout_, "ferry_migration_guest_blackout_seconds",
               "The gap the guest saw in its own heartbeat, successful migrations from this node");
    histograms(duration_, "ferry_migration_duration_seconds",
               "Total time of the successful migrations from this node");

    // What runs now.
    auto list = engine_.list_migrations();
    std::uint64_t outbound = 0, inbound = 0;
    std::string remaining, transfer, dirty, throttle, shaped;
    for (auto& m : list) {
        auto phase = m.value("phase", "");
        if (phase == "Succeeded" || phase == "Failed")
            continue;
        bool leaving = m.value("source_node", "") == node;
        ++(leaving ? outbound : inbound);
        if (!leaving)
            continue;
        auto id = m.value("id", "");
        auto labels = fmt::format("id=\"{}\",vm=\"{}\",target_node=\"{}\"", label_value(id),
                                  label_value(m.value("vm", "")), label_value(m.value("target_node", "")));
        auto& p = m["progress"];
        remaining += fmt::format("ferry_migration_remaining_bytes{{{}}} {}\n", labels, u64(p, "remaining_bytes"));
        transfer += fmt::format("ferry_migration_transfer_rate_bytes_per_second{{{}}} {}\n", labels,
                                u64(p, "transfer_rate_bps"));
        dirty += fmt::format("ferry_migration_dirty_rate_bytes_per_second{{{}}} {}\n", labels,
                             u64(p, "dirty_rate_bps"));
        throttle += fmt::format("ferry_migration_throttle_ratio{{{}}} {}\n", labels,
                                number(static_cast<double>(u64(p, "throttle_percent")) / 100.0));
        shaped += fmt::format("ferry_migration_shaper_rate_bytes_per_second{{{}}} {}\n", labels,
                              engine_.shaped_rate(id));
    }
    header(out, "ferry_migrations_in_flight", "gauge", "Migrations under way from and to this node");
    out += fmt::format("ferry_migrations_in_flight{{direction=\"outbound\"}} {}\n", outbound);
    out += fmt::format("ferry_migrations_in_flight{{direction=\"inbound\"}} {}\n", inbound);
    header(out, "ferry_migration_remaining_bytes", "gauge", "RAM left to send, per migration under way from this node");
    out += remaining;
    header(out, "ferry_migration_transfer_rate_bytes_per_second", "gauge", "Measured transfer rate, per migration");
    out += transfer;
    header(out, "ferry_migration_dirty_rate_bytes_per_second", "gauge", "Measured guest dirty rate, per migration");
    out += dirty;
    header(out, "ferry_migration_throttle_ratio", "gauge",
           "Share of the vCPUs' time ferry's auto-converge takes away (0 to 1), per migration");
    out += throttle;
    header(out, "ferry_migration_shaper_rate_bytes_per_second", "gauge",
           "The rate ferry's node-wide shaper gives a cross-node migration now (0: not shaped here)");
    out += shaped;

    // The scheduler.
    auto status = planner_.status_here();
    header(out, "ferry_node_admission", "gauge", "1 for this node's admission state (ready, cordoned, draining)");
    for (auto state : {"ready", "cordoned", "draining"})
        out += fmt::format("ferry_node_admission{{state=\"{}\"}} {}\n", state,
                           status.value("state", "") == state ? 1 : 0);
    std::map<std::string, std::uint64_t> waiting;
    for (auto kind : {"source_limit", "target_limit", "cluster_limit", "no_room", "max_parallel", "retry_backoff",
                      "other"})
        waiting[kind] = 0;
    for (auto& w : status["waiting"])
        ++waiting[std::string(waiting_reason_kind(w.value("reason", "")))];
    std::map<std::string, std::uint64_t> drain_vms;
    if (status["drain"].is_object())
        for (auto& v : status["drain"]["vms"]) {
            auto state = v.value("state", "");
            ++drain_vms[state];
            if (state == "waiting")
                ++waiting[std::string(waiting_reason_kind(v.value("reason", "")))];
        }
    header(out, "ferry_scheduler_waiting_migrations", "gauge",
           "Migrations from this node waiting for a slot (requests and drained VMs), by why they wait");
    for (auto& [kind, n] : waiting)
        out += fmt::format("ferry_scheduler_waiting_migrations{{reason=\"{}\"}} {}\n", kind, n);
    header(out, "ferry_drain_vms", "gauge", "The VMs of this node's last drain, by state (none without a drain)");
    for (auto& [state, n] : drain_vms)
        out += fmt::format("ferry_drain_vms{{state=\"{}\"}} {}\n", label_value(state), n);

    header(out, "ferry_vms", "gauge", "VMs this node holds");
    out += fmt::format("ferry_vms {}\n", engine_.vm_names().size());
    header(out, "ferry_peer_refused_connections_total", "counter",
           "Connections to the peer endpoint refused (TLS, identity, tokens) since ferryd started");
    out += fmt::format("ferry_peer_refused_connections_total {}\n", engine_.peer_refusals());
    // Peers as this node last saw them on a control channel; a peer never
    // contacted since ferryd started has no sample.
    auto& contacts = engine_.peer_contacts();
    header(out, "ferry_peer_up", "gauge",
           "1 when the last control-channel contact with the peer (either way) worked, 0 when it failed");
    for (auto& [peer, c] : contacts)
        out += fmt::format("ferry_peer_up{{peer=\"{}\"}} {}\n", label_value(peer), c.up ? 1 : 0);
    header(out, "ferry_peer_last_contact_timestamp_seconds", "gauge",
           "When a control-channel contact with the peer last worked (Unix time)");
    for (auto& [peer, c] : contacts)
        if (c.last_ok_unix > 0)
            out += fmt::format("ferry_peer_last_contact_timestamp_seconds{{peer=\"{}\"}} {:.3f}\n", label_value(peer),
                               c.last_ok_unix);
    header(out, "ferry_peer_contact_failures_total", "counter",
           "Control-channel contacts with the peer that failed since ferryd started");
    for (auto& [peer, c] : contacts)
        out += fmt::format("ferry_peer_contact_failures_total{{peer=\"{}\"}} {}\n", label_value(peer), c.failures);
    return out;
}

Result<void> Metrics::listen(const std::string& address) {
    auto parsed = transport::parse_endpoint(address);
    if (!parsed)
        return parsed.error();
    auto ep = *parsed;
    boost::system::error_code ec;
    auto acceptor = std::make_unique<tcp::acceptor>(engine_.get_executor());
    acceptor->open(ep.protocol(), ec);
    if (!ec)
        acceptor->set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec)
        acceptor->bind(ep, ec);
    if (!ec)
        acceptor->listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
        return make_error(Errc::io, fmt::format("metrics.listen \"{}\": {}", address, ec.message()));
    acceptor_ = std::move(acceptor);
    log()->info("metrics on http://{}:{}/metrics", ep.address().to_string(), acceptor_->local_endpoint().port());
    asio::co_spawn(engine_.get_executor(), accept_loop(this), asio::detached);
    return {};
}

unsigned short Metrics::port() const { return acceptor_ ? acceptor_->local_endpoint().port() : 0; }

void Metrics::stop() {
    if (acceptor_) {
        boost::system::error_code ec;
        acceptor_->close(ec);
    }
}

// Every slot taken: a short 503 written without waiting (a full socket
// buffer just drops it), and a warning at most once per interval with the
// count of scrapes refused meanwhile.
void Metrics::refuse_busy(tcp::socket& socket) {
    auto body = fmt::format("ferryd serves at most {} scrapes at once; try again\n", max_connections);
    auto reply = fmt::format("HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             "Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{}",
                             body.size(), body);
    boost::system::error_code ec;
    socket.non_blocking(true, ec);
    asio::write(socket, asio::buffer(reply), ec);
    socket.shutdown(tcp::socket::shutdown_send, ec);
    // What the scraper sent already is read, so the close that follows
    // ends the connection plainly instead of resetting it.
    std::array<char, 4096> ignored{};
    boost::system::error_code rec;
    for (int i = 0; i < 4 && !rec; ++i)
        socket.read_some(asio::buffer(ignored), rec);
    if (auto r = refused_.note())
        log()->warn("{} scrape{} refused with 503{}: {} at once is the most served (slow or stuck "
                    "scrapers hold them up to 10 s each)",
                    r->events, r->events == 1 ? "" : "s",
                    r->over.count() > 0 ? fmt::format(" in the last {} s", r->over.count()) : std::string(),
                    max_connections);
}

asio::awaitable<void> Metrics::accept_loop(Metrics* self) {
    for (;;) {
        auto [ec, socket] = co_await self->acceptor_->async_accept(asio::as_tuple(asio::use_awaitable));
        if (ec == asio::error::operation_aborted || !self->acceptor_->is_open())
            co_return;
        if (ec) { // out of fds, say: do not spin
            asio::steady_timer pause(self->acceptor_->get_executor(), std::chrono::milliseconds(100));
            co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
            continue;
        }
        if (*self->connections_ >= max_connections) {
            self->refuse_busy(socket);
            continue; // closed as it goes out of scope
        }
        asio::co_spawn(self->acceptor_->get_executor(), serve(self, std::move(socket)), asio::detached);
    }
}

asio::awaitable<void> Metrics::serve(Metrics* self, tcp::socket socket) {
    // The count outlives the Metrics: a scrape still open when ferryd stops
    // is destroyed with the io_context, after it.
    auto count = self->connections_;
    ++*count;
    struct Leave {
        std::shared_ptr<std::size_t> count;
        ~Leave() { --*count; }
    } leave{count};
    using namespace asio::experimental::awaitable_operators;
    asio::streambuf buf(max_request_head);
    asio::steady_timer timer(socket.get_executor());
    timer.expires_after(std::chrono::seconds(10));
    auto read = asio::async_read_until(socket, buf, "\r\n\r\n", asio::as_tuple(asio::use_awaitable));
    auto outcome = co_await (std::move(read) || timer.async_wait(asio::as_tuple(asio::use_awaitable)));
    std::string status = "200 OK", body, type = "text/plain; version=0.0.4; charset=utf-8";
    if (outcome.index() == 1) {
        co_return; // no whole request within 10 s
    }
    auto [ec, n] = std::get<0>(outcome);
    if (ec) {
        status = "400 Bad Request";
        body = "the request head is larger than 8 KiB or was cut off\n";
    } else {
        std::string head(asio::buffers_begin(buf.data()), asio::buffers_begin(buf.data()) + static_cast<std::ptrdiff_t>(n));
        auto req = parse_http_request(head);
        if (!req) {
            status = "400 Bad Request";
            body = req.error().message + "\n";
        } else if (req->path != "/metrics") {
            status = "404 Not Found";
            body = "ferry serves /metrics only\n";
        } else if (req->method != "GET" && req->method != "HEAD") {
            status = "405 Method Not Allowed";
            body = "GET /metrics\n";
        } else {
            body = self->render();
            if (req->method == "HEAD") {
                auto length = body.size();
                body.clear();
                auto reply = fmt::format("HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: "
                                         "close\r\n\r\n",
                                         type, length);
                co_await asio::async_write(socket, asio::buffer(reply), asio::as_tuple(asio::use_awaitable));
                co_return;
            }
        }
    }
    if (status[0] != '2')
        type = "text/plain; charset=utf-8";
    auto reply = fmt::format("HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                             status, type, body.size(), body);
    timer.expires_after(std::chrono::seconds(10));
    auto write = asio::async_write(socket, asio::buffer(reply), asio::as_tuple(asio::use_awaitable));
    co_await (std::move(write) || timer.async_wait(asio::as_tuple(asio::use_awaitable)));
    boost::system::error_code ignored;
    socket.shutdown(tcp::socket::shutdown_both, ignored);
}

} // namespace ferry::control
