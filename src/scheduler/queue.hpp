#pragma once
// The migration queue and the limits it never exceeds. Pure: the planner
// asks it for the next migration that may start, records the start, asks
// again; whatever cannot start yet waits with the reason.
//
// Order: by priority (evacuations, then user requests, then rebalancing);
// within a priority, round-robin across source nodes (one drain cannot take
// every slot) and first come, first served within a source. A request held
// back by its own nodes' limits does not hold back the ones behind it; the
// cluster limit holds back everything.
#include "common/error.hpp"

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ferry::scheduler {

enum class Priority { evacuation = 0, user = 1, rebalance = 2 };
std::string_view to_string(Priority p);

struct Limits {
    std::int64_t outbound_per_node = 2;
    std::int64_t inbound_per_node = 2;
    std::int64_t per_cluster = 5;
    // Nodes whose inbound limit is not inbound_per_node (each node's own).
    std::map<std::string, std::int64_t> inbound_of;
    std::int64_t inbound(const std::string& node) const {
        auto it = inbound_of.find(node);
        return it == inbound_of.end() ? inbound_per_node : it->second;
    }
};

// Migrations under way, counted per source, per target and in all.
class InFlight {
public:
    void add(const std::string& source, const std::string& target);
    void remove(const std::string& source, const std::string& target);
    std::int64_t outbound(const std::string& node) const;
    std::int64_t inbound(const std::string& node) const;
    std::int64_t total() const { return total_; }

private:
    std::map<std::string, std::int64_t> outbound_, inbound_;
    std::int64_t total_ = 0;
};

struct Request {
    std::string id;
    std::string vm;
    std::string source;
    std::string target; // empty: the placer chooses when it can start
    Priority priority = Priority::user;
};

struct Start {
    Request request;
    std::string target;
};

class Queue {
public:
    // The nodes a request may go to, best first, or why none fits.
    using Placer = std::function<Result<std::vector<std::string>>(const Request&)>;

    // Queues a request behind those of its priority. Ids are unique.
    Result<void> push(Request request);
    // Takes a request out (cancelled); false if it is not queued.
    bool remove(const std::string& id);
    bool empty() const { return size_ == 0; }
    std::size_t size() const { return size_; }

    // The next request that may start now, taken out of the queue, or none;
    // the caller records the start in `running` before asking again. When
    // none can, reason() says why each waiting one waits.
    std::optional<Start> next(const InFlight& running, const Limits& limits, const Placer& place);
    // Starts everything that may start now, in the order repeated next()
    // calls would, recording each in `running` and handing it to `started`
    // (which commits it where the placer looks). One pass: a start only adds
    // to what is in flight, so a request found blocked stays blocked and is
    // not asked again. Returns how many started; reason() then says why each
    // of the rest waits.
    std::size_t start_all(InFlight& running, const Limits& limits, const Placer& place,
                          const std::function<void(const Start&)>& started);
    // "target node-c inbound 2/2" (empty for a request not known to wait).
    std::string reason(const std::string& id) const;
    // Waiting requests in the order they would start if every limit lifted.
    std::vector<Request> waiting() const;

private:
    struct Entry {
        Request request;
        std::uint64_t seq;
        std::uint64_t blocked_in = 0; // the start_all pass that found it blocked
    };
    // next() without clearing the reasons; pass != 0 skips the entries that
    // pass already found blocked.
    std::optional<Start> take(const InFlight& running, const Limits& limits, const Placer& place, std::uint64_t pass);
    // Why `e` cannot start now; empty with `target` set if it can.
    std::string blocked(const Entry& e, const InFlight& running, const Limits& limits, const Placer& place,
                        std::string& target) const;
    // Per priority, per source, FIFO.
    std::map<Priority, std::map<std::string, std::deque<Entry>>> queues_;
    std::map<Priority, std::string> last_source_; // served last, per priority
    std::map<std::string, std::string> reasons_;
    std::uint64_t seq_ = 0;
    std::uint64_t pass_ = 0;
    std::size_t size_ = 0;
};

} // namespace ferry::scheduler
