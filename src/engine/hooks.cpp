#include "engine/hooks.hpp"

#include "engine/async.hpp"
#include "engine/node.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace ferry::engine {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string_view to_string(HookPhase p) {
    switch (p) {
    case HookPhase::Prepare: return "prepare";
    case HookPhase::Launched: return "launched";
    case HookPhase::Activated: return "activated";
    case HookPhase::Released: return "released";
    case HookPhase::Aborted: return "aborted";
    }
    return "?";
}

namespace {

bool skipped_name(const std::string& name) {
    auto ends = [&](std::string_view tail) {
        return name.size() >= tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
    };
    return name.empty() || name[0] == '.' || ends("~") || ends(".swp") || name.find(".dpkg-") != std::string::npos ||
           name.find(".rpm") != std::string::npos;
}

// Why a file of a hooks directory with a name run-parts would take is not
// a hook, or nullopt when it is one ("" when it went away meanwhile).
std::optional<std::string> not_a_hook(const fs::directory_entry& entry) {
    std::error_code ec;
    auto st = entry.status(ec); // through a symlink
    if (!fs::exists(st))
        return std::string(entry.is_symlink(ec) ? "is a dangling symlink" : "");
    if (fs::is_directory(st))
        return std::string("is a directory");
    if (!fs::is_regular_file(st))
        return std::string("is not a regular file");
    if (::access(entry.path().c_str(), X_OK) != 0)
        return std::string("is not executable");
    return std::nullopt;
}

// Logs a skipped file once per path and reason, not at every migration:
// ferryd lists its hooks at each phase of each migration.
void log_skipped(const std::string& path, const std::optional<std::string>& why) {
    static std::mutex mutex;
    static std::map<std::string, std::string> logged; // path -> why it was skipped
    std::lock_guard lock(mutex);
    if (!why) {
        logged.erase(path); // a hook now: a later problem is logged again
        return;
    }
    auto [it, fresh] = logged.try_emplace(path, *why);
    if (!fresh && it->second == *why)
        return;
    it->second = *why;
    engine_log()->warn("hooks: {} {}: skipped, it is not run as a hook", path, *why);
}

// Why `st` (of `shown`) may not be run as ferryd, or nullopt.
std::optional<std::string> untrusted(const std::string& shown, const struct stat& st, bool dir) {
    auto euid = ::geteuid();
    if (st.st_uid != 0 && st.st_uid != euid)
        return fmt::format("{} is owned by uid {}, not by root{}; {} must be owned by root or by the user ferryd runs as",
                           shown, st.st_uid, euid == 0 ? "" : fmt::format(" or ferryd's uid {}", euid),
                           dir ? "a directory holding hooks" : "hooks");
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0)
        return fmt::format("{} is writable by group or others (mode {:04o}); {} must be writable only by {} owner",
                           shown, st.st_mode & 07777, dir ? "a directory holding hooks" : "hooks",
                           dir ? "its" : "their");
    return std::nullopt;
}

// What the hook's pipes carry back, shared with their readers.
struct Output {
    std::string err;
    std::string out;
    int open = 2; // readers still reading
};

asio::awaitable<void> read_all(std::shared_ptr<Output> output, std::shared_ptr<asio::posix::stream_descriptor> d,
                               bool is_err) {
    std::array<char, 4096> buf{};
    for (;;) {
        auto [ec, n] = co_await d->async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
        auto& text = is_err ? output->err : output->out;
        text.append(buf.data(), n);
        if (text.size() > 2 * hook_stderr_limit)
            text.erase(0, text.size() - hook_stderr_limit);
        if (ec)
            break;
    }
    --output->open;
}

asio::awaitable<void> write_all(std::shared_ptr<asio::posix::stream_descriptor> d, std::string data) {
    // A hook that does not read its input gets EPIPE here: fine.
    co_await asio::async_write(*d, asio::buffer(data), asio::as_tuple(asio::use_awaitable));
    boost::system::error_code ec;
    d->close(ec);
}

// The end of what a hook printed, fit for one log line and a terminal: its
// lines joined with " | ", every other control character (escape codes
// included) shown as \xNN, so a hook can neither forge a log line nor
// drive the terminal of whoever reads it.
std::string last_lines(std::string text) {
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ' || text.back() == '\r'))
        text.pop_back();
    if (text.size() > hook_stderr_limit)
        text = "..." + text.substr(text.size() - hook_stderr_limit);
    std::string out;
    for (unsigned char c : text) {
        if (c == '\n')
            out += " | ";
        else if (c == '\t')
            out += ' ';
        else if (c < 0x20 || c == 0x7f)
            out += fmt::format("\\x{:02x}", c);
        else
            out += static_cast<char>(c);
    }
    return out;
}

// The outcome of one hook: "" when it succeeded, else why not.
asio::awaitable<std::string> run_one(asio::any_io_executor ex, const std::string& path, const HookCall& call,
                                     const std::string& input, std::chrono::milliseconds timeout) {
    auto& m = *call.migration;
    auto name = fs::path(path).filename().string();
    auto what = fmt::format("hook {} ({} on the {} {})", name, to_string(call.phase), call.role, call.node);
    int in[2], out[2], err[2];
    if (::pipe2(in, O_CLOEXEC) != 0)
        co_return fmt::format("{} could not start: pipe: {}", what, std::strerror(errno));
    if (::pipe2(out, O_CLOEXEC) != 0) {
        ::close(in[0]), ::close(in[1]);
        co_return fmt::format("{} could not start: pipe: {}", what, std::strerror(errno));
    }
    if (::pipe2(err, O_CLOEXEC) != 0) {
        ::close(in[0]), ::close(in[1]), ::close(out[0]), ::close(out[1]);
        co_return fmt::format("{} could not start: pipe: {}", what, std::strerror(errno));
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in[0], 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_adddup2(&actions, err[1], 2);
    posix_spawn_file_actions_addclosefrom_np(&actions, 3);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    // A process group of its own: a timeout kills the hook and what it started.
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    posix_spawnattr_setpgroup(&attr, 0);
    sigset_t empty, all;
    sigemptyset(&empty);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setsigdefault(&attr, &all);

    std::vector<std::string> env;
    for (char** e = environ; *e; ++e)
        if (std::strncmp(*e, "FERRY_", 6) != 0)
            env.emplace_back(*e);
    auto var = [&](const char* key, const std::string& value) { env.push_back(fmt::format("{}={}", key, value)); };
    var("FERRY_VM", m.vm);
    var("FERRY_PHASE", std::string(to_string(call.phase)));
    var("FERRY_ROLE", call.role);
    var("FERRY_MIGRATION_ID", m.id);
    var("FERRY_NODE", call.node);
    var("FERRY_SOURCE_NODE", m.source_node);
    var("FERRY_TARGET_NODE", m.target_node);
    var("FERRY_MODE", m.mode);
    var("FERRY_METHOD", m.method);
    if (call.qemu_pid > 0)
        var("FERRY_QEMU_PID", std::to_string(call.qemu_pid));
    if (m.failure_reason)
        var("FERRY_FAILURE_REASON", *m.failure_reason);
    std::vector<char*> envp;
    for (auto& e : env)
        envp.push_back(e.data());
    envp.push_back(nullptr);
    std::vector<std::string> args{path, m.vm, std::string(to_string(call.phase)), call.role, m.id};
    std::vector<char*> argv;
    for (auto& a : args)
        argv.push_back(a.data());
    argv.push_back(nullptr);

    pid_t pid = -1;
    int rc = ::posix_spawn(&pid, path.c_str(), &actions, &attr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    ::close(in[0]), ::close(out[1]), ::close(err[1]);
    if (rc != 0) {
        ::close(in[1]), ::close(out[0]), ::close(err[0]);
        co_return fmt::format("{} could not start: {}", what, std::strerror(rc));
    }
    auto started = std::chrono::steady_clock::now();
    auto output = std::make_shared<Output>();
    auto d_in = std::make_shared<asio::posix::stream_descriptor>(ex, in[1]);
    auto d_out = std::make_shared<asio::posix::stream_descriptor>(ex, out[0]);
    auto d_err = std::make_shared<asio::posix::stream_descriptor>(ex, err[0]);
    asio::co_spawn(ex, write_all(d_in, input), asio::detached);
    asio::co_spawn(ex, read_all(output, d_out, false), asio::detached);
    asio::co_spawn(ex, read_all(output, d_err, true), asio::detached);

    int status = 0;
    bool timed_out = false, reaped = false, lost = false;
    asio::steady_timer timer(ex);
    for (;;) {
        pid_t r = ::waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            reaped = true;
            break;
        }
        if (r < 0 && errno != EINTR) {
            lost = true; // not ours to wait for any more (reaped elsewhere)
            break;
        }
        auto now = std::chrono::steady_clock::now();
        if (!timed_out && now - started >= timeout) {
            timed_out = true;
            ::kill(-pid, SIGKILL);
        }
        // Killed and still there after 10 s: stuck in the kernel (a hung
        // NFS mount, say). ferryd goes on; the zombie is reaped later.
        if (timed_out && now - started >= timeout + 10s)
            break;
        timer.expires_after(10ms);
        co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    // What the hook wrote last may still be in the pipes; a child it left
    // running may hold them open, so the wait is short.
    for (int i = 0; i < 20 && output->open > 0; ++i) {
        timer.expires_after(10ms);
        co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    boost::system::error_code ec;
    d_in->close(ec), d_out->close(ec), d_err->close(ec);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started);
    auto err_text = last_lines(output->err);
    auto out_text = last_lines(output->out);
    if (!out_text.empty())
        engine_log()->info("migration {}: {} said: {}", m.id, what, out_text);

    std::string failure;
    if (timed_out)
        failure = fmt::format("{} did not finish within {} ms; its process group was killed{}", what, timeout.count(),
                              reaped ? "" : " (and has not exited yet)");
    else if (lost)
        failure = fmt::format("{}: its exit status was lost", what);
    else if (WIFSIGNALED(status))
        failure = fmt::format("{} was killed by signal {}", what, WTERMSIG(status));
    else if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
        failure = fmt::format("{} exited with status {}", what, WEXITSTATUS(status));
    if (failure.empty()) {
        engine_log()->info("migration {}: {} succeeded in {} ms", m.id, what, ms.count());
        if (!err_text.empty())
            engine_log()->info("migration {}: {} stderr: {}", m.id, what, err_text);
        co_return std::string();
    }
    failure += err_text.empty() ? " (nothing on stderr)" : ": " + err_text;
    engine_log()->warn("migration {}: {}", m.id, failure);
    co_return failure;
}

} // namespace

Result<std::vector<std::string>> list_hooks(const std::string& dir) {
    std::vector<std::string> hooks;
    if (dir.empty())
        return hooks;
    std::error_code ec;
    auto it = fs::directory_iterator(dir, ec);
    for (; !ec && it != fs::directory_iterator(); it.increment(ec)) {
        if (skipped_name(it->path().filename().string()))
            continue;
        auto why = not_a_hook(*it);
        if (why && why->empty())
            continue; // removed while we looked
        log_skipped(it->path().string(), why);
        if (!why)
            hooks.push_back(it->path().string());
    }
    if (ec)
        return make_error(Errc::io, fmt::format("reading the hooks directory {}: {}", dir, ec.message()));
    std::sort(hooks.begin(), hooks.end());
    return hooks;
}

Result<void> check_hook_path(const std::string& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
        return make_error(Errc::io, fmt::format("{}: {}", path, std::strerror(errno)));
    std::error_code ec;
    auto real = fs::canonical(path, ec);
    if (ec)
        return make_error(Errc::io, fmt::format("{}: resolving its symlinks: {}", path, ec.message()));
    // A symlink is judged by what it points to, and named with it.
    auto shown = real == fs::path(path).lexically_normal() ? path : fmt::format("{} (-> {})", path, real.string());
    bool dir = S_ISDIR(st.st_mode);
    if (auto why = untrusted(shown, st, dir))
        return make_error(Errc::invalid_argument, *why);
    if (dir)
        return {};
    // Whoever may write the directory holding the file may replace it.
    auto holder = real.parent_path();
    if (::stat(holder.c_str(), &st) != 0)
        return make_error(Errc::io, fmt::format("{}: {}", holder.string(), std::strerror(errno)));
    if (auto why = untrusted(holder.string() + ", which holds " + shown + ",", st, true))
        return make_error(Errc::invalid_argument, *why);
    return {};
}

Result<void> check_hooks(const std::string& dir) {
    if (dir.empty())
        return {};
    if (auto ok = check_hook_path(dir); !ok)
        return ok;
    auto list = list_hooks(dir);
    if (!list)
        return list.error();
    for (auto& path : *list)
        if (auto ok = check_hook_path(path); !ok)
            return ok;
    return {};
}

namespace {
// A "hooks" event for a phase's run: how many hooks, and what failed.
void publish_hooks(Node& node, const config::HooksSection& hooks, const HookCall& call,
                   const Result<std::vector<std::string>>& ran) {
    if (hooks.dir.empty())
        return;
    auto listed = list_hooks(hooks.dir);
    nlohmann::json failures = nlohmann::json::array();
    if (!ran)
        failures.push_back(ran.error().message);
    else
        for (auto& f : *ran)
            failures.push_back(f);
    node.publish("hooks", call.migration->vm, call.migration->id,
                 {{"phase", to_string(call.phase)},
                  {"role", call.role},
                  {"hooks", listed ? listed->size() : 0},
                  {"failures", failures},
                  {"aborts", !ran.has_value()}});
}
} // namespace

asio::awaitable<Result<bool>> run_phase_hooks(Node& node, const config::HooksSection& hooks, const HookCall& call,
                                              std::chrono::steady_clock::time_point deadline,
                                              std::vector<std::string>& warnings) {
    auto ran = co_await run_hooks(node.executor(), hooks, call, deadline);
    publish_hooks(node, hooks, call, ran);
    if (!ran)
        co_return ran.error();
    warnings.insert(warnings.end(), ran->begin(), ran->end());
    co_return !ran->empty();
}

asio::awaitable<Result<void>> announce_self(qmp::Client& qmp) {
    nlohmann::json args{{"initial", 50}, {"max", 550}, {"rounds", 5}, {"step", 100}};
    auto done = co_await qmp.execute("announce-self", args);
    if (!done)
        co_return done.error();
    co_return Result<void>{};
}

nlohmann::json hook_input(const HookCall& call) {
    nlohmann::json in{{"phase", to_string(call.phase)},
                      {"role", call.role},
                      {"node", call.node},
                      {"migration", *call.migration},
                      {"spec", call.spec ? nlohmann::json(*call.spec) : nlohmann::json(nullptr)}};
    in["qemu_pid"] = call.qemu_pid > 0 ? nlohmann::json(call.qemu_pid) : nlohmann::json(nullptr);
    return in;
}

asio::awaitable<Result<std::vector<std::string>>> run_hooks(asio::any_io_executor ex,
                                                            const config::HooksSection& hooks, const HookCall& call,
                                                            std::chrono::steady_clock::time_point deadline) {
    std::vector<std::string> failures;
    // A directory that cannot be read, or that others may write, fails
    // closed: a gate that cannot run does not let the migration through.
    // (Checked again here: the files may have changed since ferryd started.)
    Result<std::vector<std::string>> list = std::vector<std::string>{};
    if (!hooks.dir.empty()) {
        auto trusted = check_hook_path(hooks.dir);
        list = trusted ? list_hooks(hooks.dir) : Result<std::vector<std::string>>(trusted.error());
    }
    if (!list) {
        auto why = fmt::format("{} hooks on the {} {}: {}", to_string(call.phase), call.role, call.node,
                               list.error().message);
        engine_log()->warn("migration {}: {}", call.migration->id, why);
        if (hook_can_abort(call.phase))
            co_return make_error(Errc::conflict, why);
        failures.push_back(why);
        co_return failures;
    }
    if (list->empty())
        co_return failures;
    // A hook that others may change is refused; before a gate runs any.
    std::map<std::string, std::string> refused;
    for (auto& path : *list) {
        auto trusted = check_hook_path(path);
        if (trusted)
            continue;
        auto why = fmt::format("hook {} ({} on the {} {}) refused: {}", fs::path(path).filename().string(),
                               to_string(call.phase), call.role, call.node, trusted.error().message);
        engine_log()->warn("migration {}: {}", call.migration->id, why);
        if (hook_can_abort(call.phase))
            co_return make_error(Errc::conflict, why);
        refused.emplace(path, std::move(why));
    }
    auto input = hook_input(call).dump();
    for (auto& path : *list) {
        if (auto it = refused.find(path); it != refused.end()) {
            failures.push_back(it->second);
            continue;
        }
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        auto timeout = std::clamp<std::chrono::milliseconds>(left, 1ms, std::chrono::seconds(hooks.timeout));
        auto failure = co_await run_one(ex, path, call, input, timeout);
        if (failure.empty())
            continue;
        if (hook_can_abort(call.phase))
            co_return make_error(Errc::conflict, failure);
        failures.push_back(std::move(failure));
    }
    co_return failures;
}

} // namespace ferry::engine
