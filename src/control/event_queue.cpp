#include "control/event_queue.hpp"

#include <algorithm>

namespace ferry::control {

void EventQueue::push(const engine::Event& e) {
    if (!wants(e) || overflowed_)
        return;
    if (e.type == "progress") {
        // Its older progress gives way; the new one goes last, so the
        // sequence numbers a subscriber sees only grow.
        auto old = std::find_if(queue_.begin(), queue_.end(), [&](const engine::Event& q) {
            return q.type == "progress" && q.migration == e.migration;
        });
        if (old != queue_.end())
            queue_.erase(old);
    }
    if (queue_.size() >= limit_) {
        overflowed_ = true;
        return;
    }
    queue_.push_back(e);
}

std::optional<engine::Event> EventQueue::pop() {
    if (queue_.empty())
        return std::nullopt;
    auto e = std::move(queue_.front());
    queue_.pop_front();
    return e;
}

} // namespace ferry::control
