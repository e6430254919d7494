#include "scheduler/drain.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>

namespace ferry::scheduler {

namespace {

constexpr std::array<std::pair<VmDrainState, std::string_view>, 7> vm_states{{
    {VmDrainState::waiting, "waiting"},
    {VmDrainState::migrating, "migrating"},
    {VmDrainState::moved, "moved"},
    {VmDrainState::cannot_move, "cannot_move"},
    {VmDrainState::gave_up, "gave_up"},
    {VmDrainState::not_moved, "not_moved"},
    {VmDrainState::gone, "gone"},
}};
constexpr std::array<std::pair<DrainState, std::string_view>, 4> drain_states{{
    {DrainState::running, "running"},
    {DrainState::completed, "completed"},
    {DrainState::incomplete, "incomplete"},
    {DrainState::cancelled, "cancelled"},
}};

template <class E, std::size_t N>
std::optional<E> parse_enum(const std::array<std::pair<E, std::string_view>, N>& table, const std::string& s) {
    for (auto& [e, name] : table)
        if (name == s)
            return e;
    return std::nullopt;
}

template <class T> Result<T> field(const json& j, const char* key, const std::string& where) {
    auto it = j.find(key);
    if (it == j.end())
        return make_error(Errc::invalid_argument, fmt::format("{}: '{}' is missing", where, key));
    if constexpr (std::is_same_v<T, std::string>) {
        if (!it->is_string())
            return make_error(Errc::invalid_argument, fmt::format("{}: '{}' must be a string", where, key));
    } else {
        if (!it->is_number_integer())
            return make_error(Errc::invalid_argument, fmt::format("{}: '{}' must be an integer", where, key));
    }
    return it->get<T>();
}

} // namespace

std::string_view to_string(VmDrainState s) {
    for (auto& [e, name] : vm_states)
        if (e == s)
            return name;
    return "?";
}

std::string_view to_string(DrainState s) {
    for (auto& [e, name] : drain_states)
        if (e == s)
            return name;
    return "?";
}

VmDrain* Drain::find(const std::string& vm) {
    auto it = std::find_if(vms.begin(), vms.end(), [&](auto& v) { return v.name == vm; });
    return it == vms.end() ? nullptr : &*it;
}

std::int64_t Drain::count(VmDrainState s) const {
    return std::count_if(vms.begin(), vms.end(), [&](auto& v) { return v.state == s; });
}

void Drain::failed(VmDrain& vm, std::string error, std::int64_t now_ms) {
    vm.error = std::move(error);
    if (vm.attempts >= max_attempts) {
        vm.state = VmDrainState::gave_up;
        return;
    }
    vm.state = VmDrainState::waiting;
    std::int64_t backoff = std::min<std::int64_t>(10'000LL << std::clamp(vm.attempts - 1, 0, 5), 300'000);
    vm.retry_at_ms = now_ms + std::max<std::int64_t>(backoff, 0);
}

void Drain::stop_waiting(const std::string& why) {
    for (auto& v : vms)
        if (v.state == VmDrainState::waiting) {
            v.state = VmDrainState::not_moved;
            v.reason.clear();
            if (v.error.empty())
                v.error = why;
            else
                v.error = why + "; last failure: " + v.error;
        }
}

bool Drain::settle(const std::string& now) {
    if (state != DrainState::running || count(VmDrainState::waiting) || count(VmDrainState::migrating))
        return false;
    bool all = std::all_of(vms.begin(), vms.end(),
                           [](auto& v) { return v.state == VmDrainState::moved || v.state == VmDrainState::gone; });
    if (note.empty() && !all)
        note = fmt::format("{} VM(s) still on {}", vms.size() - count(VmDrainState::moved) - count(VmDrainState::gone),
                           node);
    state = all ? DrainState::completed : DrainState::incomplete;
    ended_at = now;
    return true;
}

Result<DrainOptions> drain_options(const json& j) {
    DrainOptions o;
    if (!j.is_object())
        return make_error(Errc::invalid_argument, "drain options must be an object");
    auto read = [&](const char* key, std::int64_t min, std::int64_t max) -> Result<std::optional<std::int64_t>> {
        auto it = j.find(key);
        if (it == j.end() || it->is_null())
            return std::optional<std::int64_t>();
        if (!it->is_number_integer())
            return make_error(Errc::invalid_argument, fmt::format("'{}' must be an integer", key));
        auto v = it->get<std::int64_t>();
        if (v < min || v > max)
            return make_error(Errc::invalid_argument, fmt::format("'{}' must be {} to {}, not {}", key, min, max, v));
        return std::optional<std::int64_t>(v);
    };
    auto mp = read("max_parallel", 0, 1000);
    if (!mp)
        return mp.error();
    auto dl = read("deadline_s", 1, 366LL * 24 * 3600);
    if (!dl)
        return dl.error();
    o.max_parallel = mp->value_or(0);
    o.deadline_s = *dl;
    return o;
}

json to_json(const Drain& d) {
    json vms = json::array();
    for (auto& v : d.vms) {
        json j{{"name", v.name}, {"state", to_string(v.state)}, {"attempts", v.attempts}};
        if (!v.migration.empty())
            j["migration"] = v.migration;
        if (!v.target.empty())
            j["target"] = v.target;
        if (!v.error.empty())
            j["error"] = v.error;
        if (!v.reason.empty())
            j["reason"] = v.reason;
        if (v.retry_at_ms)
            j["retry_at_ms"] = v.retry_at_ms;
        vms.push_back(std::move(j));
    }
    json j{{"node", d.node},
           {"state", to_string(d.state)},
           {"started_at", d.started_at},
           {"max_parallel", d.max_parallel},
           {"vms", std::move(vms)}};
    if (!d.ended_at.empty())
        j["ended_at"] = d.ended_at;
    if (d.deadline_ms)
        j["deadline_ms"] = *d.deadline_ms;
    if (!d.note.empty())
        j["note"] = d.note;
    json counts = json::object();
    for (auto& [e, name] : vm_states)
        if (auto n = d.count(e))
            counts[std::string(name)] = n;
    j["counts"] = std::move(counts);
    return j;
}

Result<Drain> drain_from_json(const json& j) {
    const std::string where = "drain";
    if (!j.is_object())
        return make_error(Errc::invalid_argument, "drain: not an object");
    Drain d;
    auto node = field<std::string>(j, "node", where);
    auto state = field<std::string>(j, "state", where);
    auto started = field<std::string>(j, "started_at", where);
    auto max_parallel = field<std::int64_t>(j, "max_parallel", where);
    if (!node)
        return node.error();
    if (!state)
        return state.error();
    if (!started)
        return started.error();
    if (!max_parallel)
        return max_parallel.error();
    d.node = *node;
    d.started_at = *started;
    d.max_parallel = std::max<std::int64_t>(0, *max_parallel);
    auto s = parse_enum(drain_states, *state);
    if (!s)
        return make_error(Errc::invalid_argument, fmt::format("drain: unknown state '{}'", *state));
    d.state = *s;
    if (j.contains("deadline_ms")) {
        auto dl = field<std::int64_t>(j, "deadline_ms", where);
        if (!dl)
            return dl.error();
        d.deadline_ms = *dl;
    }
    if (auto it = j.find("ended_at"); it != j.end() && it->is_string())
        d.ended_at = *it;
    if (auto it = j.find("note"); it != j.end() && it->is_string())
        d.note = *it;
    auto vms = j.find("vms");
    if (vms == j.end() || !vms->is_array())
        return make_error(Errc::invalid_argument, "drain: 'vms' must be an array");
    for (std::size_t i = 0; i < vms->size(); ++i) {
        auto& v = (*vms)[i];
        auto at = fmt::format("drain vms[{}]", i);
        if (!v.is_object())
            return make_error(Errc::invalid_argument, at + ": not an object");
        VmDrain vm;
        auto name = field<std::string>(v, "name", at);
        if (!name)
            return name.error();
        auto st = field<std::string>(v, "state", at);
        if (!st)
            return st.error();
        auto parsed = parse_enum(vm_states, *st);
        if (!parsed)
            return make_error(Errc::invalid_argument, fmt::format("{}: unknown state '{}'", at, *st));
        vm.name = *name;
        vm.state = *parsed;
        if (auto a = v.find("attempts"); a != v.end() && a->is_number_integer())
            vm.attempts = static_cast<int>(std::clamp<std::int64_t>(a->get<std::int64_t>(), 0, Drain::max_attempts));
        if (auto r = v.find("retry_at_ms"); r != v.end() && r->is_number_integer())
            vm.retry_at_ms = r->get<std::int64_t>();
        for (auto [key, out] : {std::pair{"migration", &vm.migration}, {"target", &vm.target}, {"error", &vm.error}})
            if (auto it = v.find(key); it != v.end() && it->is_string())
                *out = *it;
        if (vm.state == VmDrainState::migrating && vm.migration.empty())
            vm.state = VmDrainState::waiting; // nothing to follow: it starts again
        d.vms.push_back(std::move(vm));
    }
    return d;
}

} // namespace ferry::scheduler
