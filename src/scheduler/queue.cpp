#include "scheduler/queue.hpp"

#include <fmt/format.h>

namespace ferry::scheduler {

std::string_view to_string(Priority p) {
    switch (p) {
    case Priority::evacuation: return "evacuation";
    case Priority::user: return "user";
    case Priority::rebalance: return "rebalance";
    }
    return "?";
}

void InFlight::add(const std::string& source, const std::string& target) {
    ++outbound_[source];
    ++inbound_[target];
    ++total_;
}

void InFlight::remove(const std::string& source, const std::string& target) {
    auto drop = [](std::map<std::string, std::int64_t>& m, const std::string& node) {
        auto it = m.find(node);
        if (it != m.end() && --it->second <= 0)
            m.erase(it);
    };
    drop(outbound_, source);
    drop(inbound_, target);
    if (total_ > 0)
        --total_;
}

std::int64_t InFlight::outbound(const std::string& node) const {
    auto it = outbound_.find(node);
    return it == outbound_.end() ? 0 : it->second;
}

std::int64_t InFlight::inbound(const std::string& node) const {
    auto it = inbound_.find(node);
    return it == inbound_.end() ? 0 : it->second;
}

Result<void> Queue::push(Request request) {
    for (auto& [priority, sources] : queues_)
        for (auto& [source, entries] : sources)
            for (auto& e : entries)
                if (e.request.id == request.id)
                    return make_error(Errc::conflict, fmt::format("migration {} is already queued", request.id));
    auto priority = request.priority;
    auto source = request.source;
    queues_[priority][source].push_back({std::move(request), ++seq_, 0});
    ++size_;
    return {};
}

bool Queue::remove(const std::string& id) {
    for (auto& [priority, sources] : queues_)
        for (auto it = sources.begin(); it != sources.end(); ++it)
            for (auto e = it->second.begin(); e != it->second.end(); ++e)
                if (e->request.id == id) {
                    it->second.erase(e);
                    if (it->second.empty())
                        sources.erase(it);
                    --size_;
                    reasons_.erase(id);
                    return true;
                }
    return false;
}

std::string Queue::blocked(const Entry& e, const InFlight& running, const Limits& limits, const Placer& place,
                           std::string& target) const {
    auto& r = e.request;
    if (running.total() >= limits.per_cluster)
        return fmt::format("cluster {}/{}", running.total(), limits.per_cluster);
    if (running.outbound(r.source) >= limits.outbound_per_node)
        return fmt::format("source {} outbound {}/{}", r.source, running.outbound(r.source), limits.outbound_per_node);
    if (!r.target.empty()) {
        if (running.inbound(r.target) >= limits.inbound(r.target))
            return fmt::format("target {} inbound {}/{}", r.target, running.inbound(r.target), limits.inbound(r.target));
        target = r.target;
        return {};
    }
    auto ranked = place(r);
    if (!ranked)
        return ranked.error().message;
    std::string full;
    for (auto& node : *ranked) {
        if (running.inbound(node) < limits.inbound(node)) {
            target = node;
            return {};
        }
        full += fmt::format("{}{} inbound {}/{}", full.empty() ? "" : ", ", node, running.inbound(node),
                            limits.inbound(node));
    }
    return ranked->empty() ? std::string("no node fits") : "every node that fits is full: " + full;
}

namespace {
// A priority's sources in turn: those after `last` by name, then the rest.
template <class Sources>
auto in_turn(Sources& sources, const std::string& last) {
    std::vector<decltype(sources.begin())> order;
    auto first = sources.upper_bound(last);
    for (auto it = first; it != sources.end(); ++it)
        order.push_back(it);
    for (auto it = sources.begin(); it != first; ++it)
        order.push_back(it);
    return order;
}
} // namespace

std::optional<Start> Queue::next(const InFlight& running, const Limits& limits, const Placer& place) {
    reasons_.clear();
    auto s = take(running, limits, place, 0);
    if (s)
        reasons_.clear(); // stale once something started
    return s;
}

std::size_t Queue::start_all(InFlight& running, const Limits& limits, const Placer& place,
                             const std::function<void(const Start&)>& started) {
    reasons_.clear();
    ++pass_;
    std::size_t n = 0;
    while (auto s = take(running, limits, place, pass_)) {
        running.add(s->request.source, s->target);
        started(*s);
        reasons_.erase(s->request.id);
        ++n;
    }
    return n;
}

std::optional<Start> Queue::take(const InFlight& running, const Limits& limits, const Placer& place,
                                 std::uint64_t pass) {
    for (auto& [priority, sources] : queues_) {
        if (sources.empty())
            continue;
        for (auto src : in_turn(sources, last_source_[priority])) {
            auto& entries = src->second;
            for (auto e = entries.begin(); e != entries.end(); ++e) {
                if (pass && e->blocked_in == pass)
                    continue;
                std::string target;
                auto why = blocked(*e, running, limits, place, target);
                if (!why.empty()) {
                    reasons_[e->request.id] = why;
                    e->blocked_in = pass;
                    continue;
                }
                Start s{std::move(e->request), target};
                entries.erase(e);
                last_source_[priority] = src->first;
                if (entries.empty())
                    sources.erase(src);
                --size_;
                return s;
            }
        }
    }
    return std::nullopt;
}

std::string Queue::reason(const std::string& id) const {
    auto it = reasons_.find(id);
    return it == reasons_.end() ? std::string() : it->second;
}

std::vector<Request> Queue::waiting() const {
    std::vector<Request> out;
    for (auto& [priority, sources] : queues_) {
        auto last = last_source_.find(priority);
        auto lists = in_turn(sources, last == last_source_.end() ? std::string() : last->second);
        for (std::size_t depth = 0;; ++depth) {
            bool any = false;
            for (auto l : lists)
                if (depth < l->second.size()) {
                    out.push_back(l->second[depth].request);
                    any = true;
                }
            if (!any)
                break;
        }
    }
    return out;
}

} // namespace ferry::scheduler
