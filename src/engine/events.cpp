#include "engine/events.hpp"

#include "common/time.hpp"

namespace ferry::engine {

EventLog::EventLog(std::size_t capacity) : capacity_(capacity), epoch_(now_string()) {}

nlohmann::json to_json(const Event& e) {
    nlohmann::json j{{"seq", e.seq}, {"time", e.time}, {"type", e.type}, {"vm", e.vm}, {"data", e.data}};
    j["migration"] = e.migration.empty() ? nlohmann::json(nullptr) : nlohmann::json(e.migration);
    return j;
}

const Event& EventLog::publish(std::string type, std::string vm, std::string migration, nlohmann::json data) {
    events_.push_back(Event{next_seq_++, now_string(), std::move(type), std::move(vm), std::move(migration),
                            std::move(data)});
    while (events_.size() > capacity_)
        events_.pop_front();
    const Event& e = events_.back();
    // A listener may unlisten itself (or another) while being told.
    auto ids = std::vector<std::uint64_t>();
    for (auto& [id, l] : listeners_)
        ids.push_back(id);
    for (auto id : ids)
        if (auto it = listeners_.find(id); it != listeners_.end())
            it->second(e);
    return e;
}

std::optional<std::vector<Event>> EventLog::since(std::uint64_t seq) const {
    if (seq + 1 < oldest_seq())
        return std::nullopt;
    std::vector<Event> out;
    for (auto& e : events_)
        if (e.seq > seq)
            out.push_back(e);
    return out;
}

std::uint64_t EventLog::listen(Listener listener) {
    auto id = next_listener_++;
    listeners_.emplace(id, std::move(listener));
    return id;
}

void EventLog::unlisten(std::uint64_t id) { listeners_.erase(id); }

} // namespace ferry::engine
