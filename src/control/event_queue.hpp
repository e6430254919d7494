#pragma once
// What one event subscriber has not been sent yet. Bounded: a migration's
// progress events replace each other (only its newest waits), every other
// event waits its turn, in order; a subscriber more than `limit` events
// behind has overflowed and is told to resume from the last one it got.
#include "engine/events.hpp"

#include <deque>
#include <optional>
#include <set>
#include <string>

namespace ferry::control {

class EventQueue {
public:
    // vms: the VMs asked for; empty for all.
    explicit EventQueue(std::set<std::string> vms = {}, std::size_t limit = 1024)
        : vms_(std::move(vms)), limit_(limit) {}

    bool wants(const engine::Event& e) const { return vms_.empty() || vms_.count(e.vm) > 0; }
    // Queues the event if wanted; past the limit, overflowed() from then on.
    void push(const engine::Event& e);
    std::optional<engine::Event> pop();
    bool overflowed() const { return overflowed_; }
    std::size_t size() const { return queue_.size(); }

private:
    std::set<std::string> vms_;
    std::size_t limit_;
    std::deque<engine::Event> queue_;
    bool overflowed_ = false;
};

} // namespace ferry::control
