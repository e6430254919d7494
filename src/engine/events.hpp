#pragma once
// The node's event log: what happened to its VMs and migrations, numbered.
// Subscribers on the control socket read it live and resume from a sequence
// number after a reconnect (docs/control-protocol.md, "Events").
#include <nlohmann/json.hpp>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ferry::engine {

// type: "phase" (a migration's phase on this node), "progress" (at most once
// a second per migration), "hooks" (a phase's hooks ran), "qemu" (QEMU's
// MIGRATION events), "result" (a migration ended: its whole object).
struct Event {
    std::uint64_t seq = 0; // from 1, one more for every event of this ferryd
    std::string time;      // RFC 3339, UTC, milliseconds
    std::string type;
    std::string vm;
    std::string migration; // "" when not about one
    nlohmann::json data;
};

nlohmann::json to_json(const Event& e);

class EventLog {
public:
    explicit EventLog(std::size_t capacity = 4096);

    // Names this log: a restarted ferryd numbers its events from 1 again,
    // under a new epoch, so a subscriber resuming with the old epoch resyncs.
    const std::string& epoch() const { return epoch_; }

    // Numbers and keeps the event (dropping the oldest past capacity) and
    // tells every listener, in the order they listened.
    const Event& publish(std::string type, std::string vm, std::string migration, nlohmann::json data);

    // The kept events after `seq`. Null when events after it were dropped
    // already (seq + 1 is older than the oldest kept): the caller resyncs.
    std::optional<std::vector<Event>> since(std::uint64_t seq) const;
    std::uint64_t last_seq() const { return next_seq_ - 1; }
    std::uint64_t oldest_seq() const { return events_.empty() ? next_seq_ : events_.front().seq; }

    using Listener = std::function<void(const Event&)>;
    std::uint64_t listen(Listener listener);
    void unlisten(std::uint64_t id);

private:
    std::size_t capacity_;
    std::string epoch_;
    std::deque<Event> events_;
    std::uint64_t next_seq_ = 1;
    std::map<std::uint64_t, Listener> listeners_;
    std::uint64_t next_listener_ = 1;
};

} // namespace ferry::engine
