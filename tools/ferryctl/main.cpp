// ferryctl: talks to the local ferryd over its control socket.
#include "config/quantity.hpp"
#include "common/json.hpp"
#include "common/fd.hpp"
#include "control/client.hpp"
#include "control/protocol.hpp"
#include "transport/pki.hpp"
#include "output.hpp"

#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <optional>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

using nlohmann::json;

namespace {

// Exit codes (docs/control-protocol.md, "ferryctl exit codes").
enum Exit {
    exit_ok = 0,
    exit_failed = 1,        // a migration --wait followed did not succeed; other errors
    exit_usage = 2,         // bad command line
    exit_invalid = 3,       // invalid_argument
    exit_not_found = 4,     // not_found
    exit_exists = 5,        // already_exists
    exit_conflict = 6,      // conflict: not allowed now
    exit_unreachable = 7,   // ferryd not running, or the connection dropped
    exit_timeout = 8,       // no answer in time
};

// The last error ferryd itself answered with: a `disconnected` that ferryd
// reports (its QMP connection to a VM's QEMU, or a peer, went away) is not
// ferryd being unreachable.
std::string ferryd_error;

int exit_code(const ferry::Error& e) {
    if (e.code == ferry::Errc::disconnected && e.message == ferryd_error)
        return exit_failed;
    switch (e.code) {
    case ferry::Errc::invalid_argument: return exit_invalid;
    case ferry::Errc::not_found: return exit_not_found;
    case ferry::Errc::already_exists: return exit_exists;
    case ferry::Errc::conflict: return exit_conflict;
    case ferry::Errc::disconnected: return exit_unreachable;
    case ferry::Errc::timeout: return exit_timeout;
    default: return exit_failed;
    }
}

struct Globals {
    std::string socket;
    bool json_output = false;
    int timeout = 60; // seconds for one request
};

// Prints an error as JSON on stdout (--json) or as text on stderr.
int fail(const Globals& g, const ferry::Error& e, int code = -1) {
    if (code < 0)
        code = exit_code(e);
    if (g.json_output)
        std::cout << ferry::dump_json(json{{"error", {{"code", to_string(e.code)}, {"message", e.message}}}}, 2)
                  << "\n";
    else
        std::cerr << "ferryctl: " << e.message << "\n";
    return code;
}

int usage(const Globals& g, const std::string& message) {
    return fail(g, ferry::make_error(ferry::Errc::invalid_argument, message), exit_usage);
}

// "5 MiB", "256 KiB", "17 bytes": a size for a message (rounded down).
std::string rough_size(std::uint64_t bytes) {
    if (bytes >= (1U << 20))
        return fmt::format("{} MiB", bytes >> 20);
    if (bytes >= (1U << 10))
        return fmt::format("{} KiB", bytes >> 10);
    return fmt::format("{} bytes", bytes);
}

// A spec file as text. It travels inside one request, as JSON: a regular
// file (not /dev/zero, a FIFO or a terminal), no larger than a request may
// carry, and UTF-8.
ferry::Result<std::string> read_spec(const std::string& path) {
    constexpr std::uint64_t limit = ferry::control::max_request_bytes;
    auto too_big = [&](std::uint64_t size) {
        return ferry::make_error(ferry::Errc::invalid_argument,
                                 fmt::format("--spec {}: {} is over the {} a request may carry", path,
                                             rough_size(size), rough_size(limit)));
    };
    // Non-blocking: a FIFO opens without waiting for a writer (and is then refused).
    ferry::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
    if (fd.get() < 0)
        return ferry::make_error(errno == ENOENT ? ferry::Errc::not_found : ferry::Errc::io,
                                 fmt::format("--spec {}: cannot open: {}", path, std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0)
        return ferry::make_error(ferry::Errc::io, fmt::format("--spec {}: {}", path, std::strerror(errno)));
    if (S_ISDIR(st.st_mode))
        return ferry::make_error(ferry::Errc::invalid_argument, fmt::format("--spec {}: is a directory, not a file", path));
    if (!S_ISREG(st.st_mode))
        return ferry::make_error(ferry::Errc::invalid_argument, fmt::format("--spec {}: not a regular file", path));
    if (static_cast<std::uint64_t>(st.st_size) > limit)
        return too_big(static_cast<std::uint64_t>(st.st_size));
    // At most one byte past the limit, should the file grow meanwhile.
    std::string text(limit + 1, '\0');
    std::size_t got = 0;
    while (got < text.size()) {
        auto n = ::read(fd.get(), text.data() + got, text.size() - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return ferry::make_error(ferry::Errc::io, fmt::format("--spec {}: reading: {}", path, std::strerror(errno)));
        if (n == 0)
            break;
        got += static_cast<std::size_t>(n);
    }
    if (got > limit)
        return too_big(got);
    text.resize(got);
    if (auto bad = ferry::invalid_utf8_at(text))
        return ferry::make_error(ferry::Errc::invalid_argument,
                                 fmt::format("--spec {}: not valid UTF-8 (byte {})", path, *bad));
    return text;
}

std::chrono::seconds request_timeout(const Globals& g) { return std::chrono::seconds(g.timeout); }

// A call's result, noting whether an error is ferryd's answer.
ferry::Result<json> noted(const ferry::control::Client& c, ferry::Result<json> r) {
    if (!r && c.answered())
        ferryd_error = r.error().message;
    return r;
}

ferry::Result<json> call(const Globals& g, const std::string& method, json params,
                         std::chrono::seconds extra = std::chrono::seconds(0)) {
    auto c = ferry::control::Client::connect(g.socket, request_timeout(g));
    if (!c)
        return c.error();
    return noted(**c, (*c)->call(method, std::move(params), request_timeout(g) + extra));
}

// How wide the terminal on fd is: its window size, else $COLUMNS, else 0
// (unknown: nothing is cut).
std::size_t terminal_columns(int fd) {
    winsize ws{};
    if (::ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    if (const char* env = std::getenv("COLUMNS")) {
        char* end = nullptr;
        auto n = std::strtol(env, &end, 10);
        if (end != env && *end == '\0' && n > 0 && n < 100000)
            return static_cast<std::size_t>(n);
    }
    return 0;
}

// Ctrl-C while waiting stops the waiting, not the migration: say so, and
// how to stop it. Written from the signal handler, so prepared beforehand.
char interrupted_message[1024];
std::size_t interrupted_length = 0;

extern "C" void on_interrupt(int) {
    ssize_t ignored = ::write(STDERR_FILENO, interrupted_message, interrupted_length);
    (void)ignored;
    ::_exit(130);
}

void explain_interrupt(const std::string& id, bool tty) {
    auto text = fmt::format("{}ferryctl: stopped waiting; migration {} goes on \u2014 `ferryctl migration abort {}` "
                            "stops it\n",
                            tty ? "\n" : "", id, id);
    // Not while the handler could be reading it.
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    ::sigprocmask(SIG_BLOCK, &block, &old);
    interrupted_length = std::min(text.size(), sizeof interrupted_message);
    std::memcpy(interrupted_message, text.data(), interrupted_length);
    ::sigprocmask(SIG_SETMASK, &old, nullptr);
    struct sigaction sa {};
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, nullptr);
}

// Prints a result as JSON or with the given printer; returns the exit code.
template <class Printer> int show(const Globals& g, const ferry::Result<json>& r, Printer printer) {
    if (!r)
        return fail(g, r.error());
    if (g.json_output)
        std::cout << ferry::dump_json(*r, 2) << "\n";
    else
        printer(*r);
    return exit_ok;
}

// Follows a migration to its end on the node's event stream: its phase and
// progress events redraw the line, its result event ends the wait. The
// record is read (migration.show) at the start, after every (re)subscription,
// while it waits in the queue (at each heartbeat) and after a resync.
int wait_for(const Globals& g, const std::string& id) {
    using ferry::control::Client;
    bool tty = ::isatty(STDOUT_FILENO) && !g.json_output;
    std::string told_id = id; // the id Ctrl-C names
    explain_interrupt(told_id, tty);
    std::string last_phase;
    auto last_line = std::chrono::steady_clock::now();
    std::unique_ptr<Client> requests, stream;
    // Once connected, a ferryd that goes away is waited for (a restart keeps
    // the migration going) for up to 2 minutes; the first dial fails at once.
    bool connected_once = false;
    auto dial = [&]() {
        auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(2);
        bool told = false;
        for (;;) {
            auto c = Client::connect(g.socket, request_timeout(g));
            if (c)
                connected_once = true;
            if (c || !connected_once || std::chrono::steady_clock::now() > deadline)
                return c;
            if (!told)
                std::cerr << "ferryctl: " << c.error().message << "; waiting up to 2 minutes for ferryd to answer "
                          << "again (the migration goes on without it)" << std::endl;
            told = true;
            std::this_thread::sleep_for(std::chrono::seconds(1));
        }
    };
    int lost_subscriptions = 0; // in a row
    auto show = [&]() -> ferry::Result<json> {
        for (int attempt = 0;; ++attempt) {
            if (!requests) {
                auto c = dial();
                if (!c)
                    return c.error();
                requests = std::move(*c);
            }
            auto r = noted(*requests, requests->call("migration.show", {{"id", id}}, request_timeout(g)));
            // ferryd closes idle connections when it is busy: dial again once.
            if (r || r.error().code != ferry::Errc::disconnected || attempt > 0)
                return r;
            requests.reset();
        }
    };
    json m;
    auto draw = [&]() {
        std::string phase = m.value("phase", "");
        auto now = std::chrono::steady_clock::now();
        if (tty) {
            // Cut to the terminal's width: a wrapped line is not redrawn in place.
            std::cout << "\r\033[K" << ferryctl::fit_width(ferryctl::progress_line(m), terminal_columns(STDOUT_FILENO))
                      << std::flush;
        } else if (!g.json_output && (phase != last_phase || now - last_line > std::chrono::seconds(5))) {
            std::cout << ferryctl::progress_line(m) << std::endl;
            last_line = now;
        }
        last_phase = phase;
    };
    auto ended = [&]() -> int {
        std::string phase = m.value("phase", "");
        if (phase != "Succeeded" && phase != "Failed")
            return -1;
        if (tty)
            std::cout << "\r\033[K" << ferryctl::fit_width(ferryctl::progress_line(m), terminal_columns(STDOUT_FILENO))
                      << "\n";
        if (g.json_output)
            std::cout << ferry::dump_json(m, 2) << "\n";
        else
            ferryctl::print_migration(m);
        return phase == "Succeeded" ? exit_ok : exit_failed;
    };
    std::string epoch;
    std::uint64_t last = 0;
    std::uint64_t quiet = 0; // heartbeats seen
    bool reread = true;
    for (;;) {
        if (reread) {
            auto r = show();
            if (!r)
                return fail(g, r.error());
            m = std::move(*r);
            reread = false;
            // A queued migration starts under an id of its own.
            if (auto now_id = m.value("id", id); now_id != told_id) {
                told_id = now_id;
                explain_interrupt(told_id, tty);
            }
            draw();
            if (int rc = ended(); rc >= 0)
                return rc;
        }
        if (!stream) {
            auto c = dial();
            if (!c)
                return fail(g, c.error());
            json params{{"vms", {m.value("vm", "")}}, {"heartbeat_ms", 2000}};
            if (!epoch.empty()) // resume after the last one read, or resync
                params.update({{"since", last}, {"epoch", epoch}});
            auto head = noted(**c, (*c)->call("events.subscribe", params, request_timeout(g)));
            // Closed before it answered (ferryd stopping, or this idle
            // connection evicted to make room): again.
            if (!head && head.error().code == ferry::Errc::disconnected && ++lost_subscriptions < 120) {
                std::this_thread::sleep_for(std::chrono::seconds(1));
                continue;
            }
            if (!head)
                return fail(g, head.error());
            lost_subscriptions = 0;
            if (epoch.empty())
                last = head->value("seq", std::uint64_t{0});
            epoch = head->value("epoch", "");
            stream = std::move(*c);
            reread = true; // what happened before the subscription
            continue;
        }
        auto e = stream->next(std::chrono::seconds(15));
        if (!e) { // ferryd closed it, or went silent: subscribe again
            stream.reset();
            continue;
        }
        auto type = e->value("type", "");
        last = e->value("seq", last);
        if (type == "overflow") {
            stream.reset();
            reread = true;
            continue;
        }
        // A queued migration starts, or is cancelled, without an event; and
        // every 30 s of silence the record is read anyway.
        if (type == "heartbeat" && (m.value("phase", "") == "Pending" || ++quiet % 15 == 0))
            reread = true;
        if (type == "resync" || type == "heartbeat") {
            reread = reread || type == "resync";
            continue;
        }
        if (!e->contains("migration") || !(*e)["migration"].is_string() || (*e)["migration"] != m.value("id", "")) {
            if (m.value("phase", "") == "Pending" && type == "phase")
                reread = true; // it may have started under its own id
            continue;
        }
        auto& data = (*e)["data"];
        if (type == "result") {
            m = data;
            return ended();
        }
        std::string phase = data.value("phase", "");
        if (type == "phase" && data.value("role", "") != "source" && (phase == "Succeeded" || phase == "Failed")) {
            reread = true; // waited for on the target node: its record is final, no result event comes
            continue;
        }
        if (type == "phase" && data.value("role", "") == "source") {
            m["phase"] = data.value("phase", "");
            m["mode"] = data.value("mode", m.value("mode", ""));
        } else if (type == "progress") {
            m["progress"] = data;
        } else {
            continue;
        }
        if (m.value("phase", "") == "Succeeded" || m.value("phase", "") == "Failed")
            continue; // the result event, with the whole record, follows
        draw();
    }
}

// A duration in whole seconds, minutes or hours ("90s", "30m", "2h"; a bare
// number is seconds), turned into seconds. A bad one is named as it was
// given, with the range in words.
CLI::Validator duration_validator(std::int64_t max_seconds, std::string max_words) {
    return CLI::Validator(
        [max_seconds, max_words](std::string& v) -> std::string {
            auto bad = "'" + v + "' is not a duration from 1s to " + max_words + " (like 90s, 30m or 2h)";
            std::size_t digits = 0;
            while (digits < v.size() && v[digits] >= '0' && v[digits] <= '9')
                ++digits;
            std::string unit = v.substr(digits);
            std::int64_t scale = unit.empty() || unit == "s" ? 1 : unit == "m" ? 60 : unit == "h" ? 3600 : 0;
            if (digits == 0 || digits > 12 || scale == 0)
                return bad;
            auto seconds = std::stoll(v.substr(0, digits)) * scale;
            if (seconds < 1 || seconds > max_seconds)
                return bad;
            v = std::to_string(seconds);
            return "";
        },
        "DURATION");
}

// A whole number, 0 or more, within what an int64 holds; `what` says what
// it is when it is not one.
CLI::Validator whole_number_validator(std::string what) {
    return CLI::Validator(
        [what](std::string& v) -> std::string {
            bool digits = !v.empty() && v.size() <= 18 &&
                          std::all_of(v.begin(), v.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
            return digits ? "" : "'" + v + "' is not " + what;
        },
        "N");
}

std::vector<std::string> split_names(const std::string& list) {
    std::vector<std::string> names;
    std::stringstream ss(list);
    for (std::string n; std::getline(ss, n, ',');)
        names.push_back(n);
    return names;
}

// The first word on the command line that is not an option or its value.
std::optional<std::string> first_word(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        std::string_view a = argv[i];
        if (a == "--socket" || a == "--timeout")
            ++i;
        else if (!a.starts_with("-"))
            return std::string(a);
    }
    return std::nullopt;
}

// A group verb (vm, migration, pki) given no command, or an unknown one.
std::optional<std::string> group_problem(CLI::App* group, int argc, char** argv) {
    if (!group->parsed() || !group->get_subcommands().empty())
        return std::nullopt;
    std::vector<std::string> names;
    for (auto* sub : group->get_subcommands({}))
        names.push_back(sub->get_name());
    // The word after the group's name, if any, is the unknown command.
    std::optional<std::string> word;
    for (int i = 1; i < argc && !word; ++i)
        if (argv[i] == group->get_name())
            word = first_word(argc - i, argv + i);
    if (!word)
        return fmt::format("{}: name a command: {}", group->get_name(), fmt::join(names, ", "));
    return fmt::format("{}: unknown command '{}' (one of: {})", group->get_name(), *word, fmt::join(names, ", "));
}

// Follows a node's drain until it ends: a progress line when it changes (and
// every 10 s); exit 0 when every VM moved.
int wait_for_drain(const Globals& g, const std::string& node) {
    std::string last;
    auto last_time = std::chrono::steady_clock::now();
    for (;;) {
        auto r = call(g, "node.drain_status", {{"node", node}});
        if (!r)
            return fail(g, r.error());
        auto d = r->value("drain", json());
        if (!d.is_object())
            return fail(g, ferry::make_error(ferry::Errc::not_found, fmt::format("{} has no drain", r->value("node", node))));
        auto line = ferryctl::drain_line(*r);
        auto now = std::chrono::steady_clock::now();
        bool ended = d.value("state", "") != "running";
        if (!g.json_output && (line != last || now - last_time > std::chrono::seconds(10) || ended)) {
            std::cout << line << std::endl;
            last = line;
            last_time = now;
        }
        if (ended) {
            if (g.json_output)
                std::cout << ferry::dump_json(*r, 2) << "\n";
            else
                ferryctl::print_node_state(*r);
            return d.value("state", "") == "completed" ? exit_ok : exit_failed;
        }
        std::this_thread::sleep_for(std::chrono::seconds(1));
    }
}

// Prints events (one line each, or JSON lines with --json) from `since`;
// with follow, until interrupted, reconnecting and resuming after the last
// one printed when ferryd restarts.
int follow_events(const Globals& g, const std::vector<std::string>& vms, std::int64_t since, bool follow) {
    // No --since: --follow starts from now, a one-off read prints every event kept.
    bool from_now = since < 0 && follow;
    std::uint64_t last = since < 0 ? 0 : static_cast<std::uint64_t>(since);
    std::string epoch;
    bool first = true;
    for (;;) {
        auto c = ferry::control::Client::connect(g.socket, request_timeout(g));
        if (!c) {
            if (!follow || first)
                return fail(g, c.error());
            std::this_thread::sleep_for(std::chrono::seconds(1));
            continue;
        }
        // since 0: every event kept. Without --follow the VMs are picked
        // here, so the last event read tells when the backlog is over.
        json params{{"vms", follow ? vms : std::vector<std::string>{}}, {"heartbeat_ms", 5000}};
        if (!from_now || !epoch.empty())
            params["since"] = last;
        if (!epoch.empty())
            params["epoch"] = epoch; // a restarted ferryd answers with a resync

        auto head = noted(**c, (*c)->call("events.subscribe", params, request_timeout(g)));
        if (!head)
            return fail(g, head.error());
        first = false;
        auto newest = head->value("seq", std::uint64_t{0});
        if (epoch.empty() && from_now)
            last = newest;
        epoch = head->value("epoch", "");
        for (;;) {
            // Without --follow: what was there when asked, then done.
            if (!follow && last >= newest)
                return exit_ok;
            auto line = (*c)->next(std::chrono::seconds(15));
            if (!line) {
                if (!follow)
                    return fail(g, line.error());
                break; // reconnect and resume after `last`
            }
            auto type = line->value("type", "");
            if (type == "heartbeat")
                continue;
            if (type == "overflow" || type == "resync") {
                std::cerr << "ferryctl: " << line->value("message", type) << "\n";
                last = line->value("seq", last);
                if (type == "overflow")
                    break;
                continue;
            }
            last = line->value("seq", last);
            if (!vms.empty() && std::find(vms.begin(), vms.end(), line->value("vm", "")) == vms.end())
                continue;
            if (g.json_output) {
                std::cout << ferry::dump_json(*line) << std::endl;
                continue;
            }
            std::cout << ferryctl::event_line(*line) << std::endl;
        }
    }
}

} // namespace

static int ferryctl_main(int argc, char** argv) {
    CLI::App app{"ferryctl: control a ferryd node"};
    app.require_subcommand(1);
    app.fallthrough(); // --json and --socket also work after the verb
    app.set_version_flag("--version", "ferryctl " FERRY_VERSION);
    Globals g;
    const char* env_socket = std::getenv("FERRY_SOCKET");
    g.socket = env_socket ? env_socket : "/run/ferry/ferryd.sock";
    app.add_option("--socket", g.socket, "ferryd control socket (default $FERRY_SOCKET or /run/ferry/ferryd.sock)");
    app.add_flag("--json", g.json_output, "print JSON objects (errors too: {\"error\": {code, message}})");
    app.add_option("--timeout", g.timeout, "seconds to wait for ferryd's answer to one request (default 60)")
        ->check(CLI::Range(1, 86400));

    int rc = 0;
    // Groups take at most one command; group_problem() explains a missing or unknown one.
    auto* vm = app.add_subcommand("vm", "manage VMs")->require_subcommand(0, 1)->allow_extras();

    std::string spec_path, name, qmp_path;
    auto* vm_create = vm->add_subcommand("create", "launch a VM from a spec file");
    vm_create->add_option("--spec", spec_path, "VM spec (TOML)")->required();
    vm_create->callback([&] {
        auto text = read_spec(spec_path);
        if (!text) {
            rc = fail(g, text.error());
            return;
        }
        rc = show(g, call(g, "vm.create", {{"spec", *text}, {"source", spec_path}}), ferryctl::print_vm);
    });

    vm->add_subcommand("list", "list VMs")->callback([&] {
        rc = show(g, call(g, "vm.list", json::object()), ferryctl::print_vm_table);
    });

    auto* vm_show = vm->add_subcommand("show", "show a VM");
    vm_show->add_option("name", name, "the VM")->required();
    vm_show->callback([&] { rc = show(g, call(g, "vm.show", {{"name", name}}), ferryctl::print_vm); });

    auto* vm_adopt = vm->add_subcommand("adopt", "manage a QEMU started elsewhere");
    vm_adopt->add_option("name", name, "the name ferry knows the VM by from now on")->required();
    vm_adopt->add_option("--qmp", qmp_path, "its QMP socket")->required();
    vm_adopt->add_option("--spec", spec_path, "spec to launch its migration destinations from");
    vm_adopt->callback([&] {
        json params{{"name", name}, {"qmp", qmp_path}};
        if (!spec_path.empty()) {
            auto text = read_spec(spec_path);
            if (!text) {
                rc = fail(g, text.error());
                return;
            }
            params["spec"] = *text;
            params["source"] = spec_path;
        }
        rc = show(g, call(g, "vm.adopt", params), ferryctl::print_vm);
    });

    auto* vm_delete = vm->add_subcommand("delete", "stop a VM (an adopted VM is only released)");
    vm_delete->add_option("name", name, "the VM")->required();
    vm_delete->callback([&] {
        rc = show(g, call(g, "vm.delete", {{"name", name}}), [](const json& j) {
            std::cout << "deleted " << j.value("deleted", "") << "\n";
        });
    });

    std::string qmp_command, qmp_args;
    auto* vm_qmp = vm->add_subcommand("qmp", "run a QMP command on the VM's QEMU (debugging)");
    vm_qmp->add_option("name", name, "the VM")->required();
    vm_qmp->add_option("command", qmp_command, "the QMP command, e.g. query-status")->required();
    vm_qmp->add_option("--args", qmp_args, "arguments as a JSON object");
    vm_qmp->callback([&] {
        json args = json::object();
        if (!qmp_args.empty()) {
            args = json::parse(qmp_args, nullptr, false);
            if (args.is_discarded() || !args.is_object()) {
                rc = usage(g, "--args: not a JSON object: " + qmp_args);
                return;
            }
        }
        // ferryd gives QEMU up to 120 s for one command.
        auto r = call(g, "vm.qmp", {{"name", name}, {"command", qmp_command}, {"arguments", args}},
                      std::chrono::seconds(120));
        rc = show(g, r, [](const json& j) { std::cout << ferry::dump_json(j, 2) << "\n"; });
    });

    int dirty_seconds = 1;
    auto* vm_dirty = vm->add_subcommand("dirty-rate", "measure how fast the guest dirties its memory");
    vm_dirty->add_option("name", name, "the VM (it must be running)")->required();
    vm_dirty->add_option("--seconds", dirty_seconds, "how long to measure (1-60)")->check(CLI::Range(1, 60));
    vm_dirty->callback([&] {
        auto r = call(g, "vm.dirty_rate", {{"name", name}, {"seconds", dirty_seconds}},
                      std::chrono::seconds(dirty_seconds + 10));
        rc = show(g, r, [](const json& j) {
            std::cout << fmt::format("{}: dirty rate {} MiB/s (measured over {} s, {} sampled pages per GiB)\n",
                                     j.value("vm", ""), j.value("dirty_rate_mib_s", 0), j.value("seconds", 0),
                                     j.value("sample_pages", 0));
        });
    });

    std::string target, bandwidth;
    std::int64_t max_downtime = 0;
    bool wait = false;
    auto* migrate = app.add_subcommand("migrate", "live-migrate a VM");
    migrate->add_option("name", name, "the VM to move")->required();
    auto* to = migrate->add_option("--to", target,
                        "target node (default: the node the scheduler picks among the peers; without peers, "
                        "this node, a new QEMU process)");
    std::vector<std::string> selectors;
    migrate->add_option("--node-selector", selectors,
                        "without --to: a label the target must have as well as the VM's node_selector, KEY=VALUE "
                        "(repeat for more)");
    bool dry_run = false;
    migrate->add_flag("--dry-run", dry_run, "print where the VM would go and why every other node would not; move nothing");
    migrate->add_option("--bandwidth", bandwidth, "per-migration bandwidth, e.g. 64Mi (0 = unlimited)");
    migrate->add_option("--max-downtime", max_downtime, "maximum downtime in ms (1-3600000)")
        ->check(CLI::Validator(
            [](std::string& v) -> std::string {
                try {
                    std::size_t used = 0;
                    auto n = std::stoll(v, &used);
                    if (used == v.size() && n >= 1 && n <= 3'600'000)
                        return "";
                } catch (...) {
                }
                return "must be a whole number of milliseconds from 1 to 3600000, not '" + v + "'";
            },
            "MS"));
    migrate->add_flag("--wait", wait, "follow the migration to its end; exit non-zero unless it succeeds");
    // Each overrides the node's [migration] setting only when given.
    bool auto_converge = false, no_auto_converge = false, post_copy = false, no_post_copy = false;
    auto* ac = migrate->add_flag("--auto-converge", auto_converge,
                                 "let ferry throttle the vCPUs if pre-copy cannot converge (overrides allow_auto_converge)");
    auto* no_ac = migrate->add_flag("--no-auto-converge", no_auto_converge, "never throttle this migration's vCPUs");
    auto* pc = migrate->add_flag("--post-copy", post_copy,
                                 "let ferry switch to post-copy if pre-copy cannot converge (overrides allow_post_copy)");
    auto* no_pc = migrate->add_flag("--no-post-copy", no_post_copy, "never switch this migration to post-copy");
    ac->excludes(no_ac);
    pc->excludes(no_pc);
    migrate->callback([&] {
        json params{{"vm", name}};
        if (to->count() > 0 && target.empty()) {
            rc = usage(g, "--to: empty: name a node, or leave --to out to let the scheduler choose");
            return;
        }
        if (!target.empty())
            params["target_node"] = target;
        if (!bandwidth.empty()) {
            auto q = ferry::config::parse_quantity(bandwidth);
            if (!q) {
                rc = usage(g, "--bandwidth: " + q.error().message);
                return;
            }
            params["bandwidth"] = *q;
        }
        if (max_downtime > 0)
            params["max_downtime_ms"] = max_downtime;
        if (auto_converge || no_auto_converge)
            params["allow_auto_converge"] = auto_converge;
        if (post_copy || no_post_copy)
            params["allow_post_copy"] = post_copy;
        if (!selectors.empty()) {
            json sel = json::object();
            for (auto& kv : selectors) {
                auto eq = kv.find('=');
                if (eq == std::string::npos || eq == 0) {
                    rc = usage(g, "--node-selector: '" + kv + "' is not KEY=VALUE");
                    return;
                }
                sel[kv.substr(0, eq)] = kv.substr(eq + 1);
            }
            params["node_selector"] = sel;
        }
        if (dry_run) {
            params["dry_run"] = true;
            rc = show(g, call(g, "migration.create", params), ferryctl::print_placement);
            return;
        }
        auto r = call(g, "migration.create", params);
        if (!r) {
            rc = fail(g, r.error());
            return;
        }
        if (!wait) {
            rc = show(g, r, [](const json& m) {
                std::cout << "migration " << m.value("id", "") << " created (" << m.value("phase", "") << ")";
                if (m.value("phase", "") == "Pending")
                    std::cout << ": waits for " << m.value("reason", "a slot");
                std::cout << "\n";
            });
            return;
        }
        if (!g.json_output) {
            if (r->value("phase", "") == "Pending")
                std::cout << "migration " << r->value("id", "") << " waits for " << r->value("reason", "a slot")
                          << "\n";
            else
                std::cout << "migration " << r->value("id", "") << " started\n";
        }
        rc = wait_for(g, r->value("id", ""));
    });

    auto* node = app.add_subcommand("node", "the cluster's nodes")->require_subcommand(0, 1)->allow_extras();
    node->add_subcommand("list", "every node as this one sees it: capacity, VMs, migrations, labels")->callback([&] {
        rc = show(g, call(g, "node.list", json::object()), ferryctl::print_node_table);
    });

    std::string node_name;
    auto* cordon = node->add_subcommand("cordon", "take no more migrations in (this node or a peer)");
    cordon->add_option("node", node_name, "the node (default: this one)");
    cordon->callback([&] { rc = show(g, call(g, "node.cordon", {{"node", node_name}}), ferryctl::print_node_state); });
    auto* uncordon = node->add_subcommand("uncordon", "take migrations in again; cancels a drain's VMs that have not "
                                                      "started (those under way finish)");
    uncordon->add_option("node", node_name, "the node (default: this one)");
    uncordon->callback(
        [&] { rc = show(g, call(g, "node.uncordon", {{"node", node_name}}), ferryctl::print_node_state); });
    std::int64_t max_parallel = 0, deadline = 0;
    bool drain_status = false, drain_wait = false;
    auto* drain = node->add_subcommand("drain", "cordon a node and migrate every VM away from it");
    drain->add_option("node", node_name, "the node (default: this one)");
    drain->add_option("--max-parallel", max_parallel, "at most this many of its VMs migrate at once (default: the "
                                                      "limits alone)")
        ->check(CLI::Range(1, 1000));
    drain->add_option("--deadline", deadline, "start nothing new after this long (90s, 30m, 2h; default: none)")
        ->transform(duration_validator(std::int64_t{366} * 24 * 3600, "366 days"));
    drain->add_flag("--status", drain_status, "show the node's drain instead of starting one");
    drain->add_flag("--wait", drain_wait, "follow the drain to its end, one progress line at a time");
    drain->callback([&] {
        if (drain_status && (max_parallel || deadline)) {
            rc = usage(g, "node drain --status takes no --max-parallel or --deadline");
            return;
        }
        json params{{"node", node_name}};
        if (!drain_status) {
            if (max_parallel)
                params["max_parallel"] = max_parallel;
            if (deadline)
                params["deadline_s"] = deadline;
        }
        auto r = call(g, drain_status ? "node.drain_status" : "node.drain", params);
        if (!r || !drain_wait) {
            rc = show(g, r, ferryctl::print_node_state);
            return;
        }
        if (!g.json_output)
            ferryctl::print_node_state(*r);
        rc = wait_for_drain(g, node_name);
    });

    std::string id;
    auto* migration =
        app.add_subcommand("migration", "inspect and abort migrations")->require_subcommand(0, 1)->allow_extras();
    migration->add_subcommand("list", "list migrations")->callback([&] {
        rc = show(g, call(g, "migration.list", json::object()), ferryctl::print_migration_table);
    });
    auto* mig_show = migration->add_subcommand("show", "show a migration");
    mig_show->add_option("id", id, "the migration's id (migration list shows them)")->required();
    mig_show->callback([&] { rc = show(g, call(g, "migration.show", {{"id", id}}), ferryctl::print_migration); });
    auto* mig_abort = migration->add_subcommand("abort", "abort a migration (before its switchover)");
    mig_abort->add_option("id", id, "the migration's id (migration list shows them)")->required();
    bool target_lost = false;
    mig_abort->add_flag("--target-lost", target_lost,
                        "a migration in doubt (its hand-off got no answer): the target node is lost for good and "
                        "does not run the VM; resume it here");
    mig_abort->callback([&] {
        json params{{"id", id}};
        if (target_lost)
            params["target_lost"] = true;
        rc = show(g, call(g, "migration.abort", params), [&](const json& m) {
            auto w = m.find("warnings");
            if (target_lost && w != m.end() && w->is_array() && !w->empty() && w->back().is_string())
                std::cout << "migration " << m.value("id", "") << " ends Failed: " << w->back().get<std::string>()
                          << "\n";
            else
                std::cout << "abort requested for " << m.value("id", "") << "\n";
        });
    });
    auto* mig_register = migration->add_subcommand(
        "register-target", "launcher = external: hand ferryd the QEMU started for a VM arriving on this node");
    std::string reg_vm, reg_qmp;
    int reg_pid = 0;
    std::vector<std::string> reg_fds;
    mig_register->add_option("vm", reg_vm, "the arriving VM")->required();
    mig_register->add_option("--qmp", reg_qmp, "its QMP socket")->required();
    mig_register->add_option("--pid", reg_pid, "its pid (checked against the socket's peer)");
    mig_register->add_option("--fd", reg_fds,
                             "NAME=N: hand QEMU this process's descriptor N (added with add-fd, opaque NAME); "
                             "repeatable");
    mig_register->callback([&] {
        json params{{"vm", reg_vm}, {"qmp", reg_qmp}};
        if (reg_pid > 0)
            params["pid"] = reg_pid;
        std::vector<std::string> names;
        std::vector<int> fds;
        for (auto& f : reg_fds) {
            auto eq = f.find('=');
            int n = -1;
            if (eq != std::string::npos) {
                auto digits = f.substr(eq + 1);
                if (!digits.empty() && digits.size() < 8 &&
                    std::all_of(digits.begin(), digits.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
                    n = std::stoi(digits);
            }
            if (eq == std::string::npos || eq == 0 || n < 0 || ::fcntl(n, F_GETFD) < 0) {
                rc = usage(g, fmt::format("--fd {}: want NAME=N with N a descriptor open in ferryctl", f));
                return;
            }
            names.push_back(f.substr(0, eq));
            fds.push_back(n);
        }
        if (!names.empty())
            params["fds"] = names;
        auto c = ferry::control::Client::connect(g.socket, request_timeout(g));
        if (!c) {
            rc = fail(g, c.error());
            return;
        }
        auto r = noted(**c, (*c)->call_with_fds("migration.register_target", params, fds, request_timeout(g)));
        rc = show(g, r, [](const json& j) {
            std::cout << fmt::format("{}: QEMU pid {} registered for migration {}", j.value("vm", ""),
                                     j.value("pid", 0), j.value("migration", ""));
            for (auto& f : j.value("fdsets", json::array()))
                std::cout << fmt::format("; {} in /dev/fdset/{}", f.value("name", ""), f.value("fdset_id", 0));
            std::cout << "\n";
        });
    });
    auto* mig_wait = migration->add_subcommand("wait", "follow a migration to its end");
    mig_wait->add_option("id", id, "the migration's id (migration list shows them)")->required();
    mig_wait->callback([&] { rc = wait_for(g, id); });

    // events: what happened, numbered; --follow keeps reading.
    std::vector<std::string> event_vms;
    std::int64_t event_since = -1;
    bool follow = false;
    auto* events = app.add_subcommand("events", "the node's events (phases, progress, hooks, QEMU, results)");
    events->add_option("--vm", event_vms, "only these VMs (repeat for more)");
    events->add_option("--since", event_since, "the events after this sequence number (0: every one kept; the default without --follow, "
                                        "which otherwise starts from now)")
        ->check(whole_number_validator("a sequence number: a whole number, 0 or more"));
    events->add_flag("--follow,-f", follow, "keep printing new events until interrupted");
    events->callback([&] { rc = follow_events(g, event_vms, event_since, follow); });

    std::string pki_dir, pki_nodes;
    auto* pki = app.add_subcommand("pki", "node certificates for the peer transport")->require_subcommand(0, 1)->allow_extras();
    auto pki_result = [&](const ferry::Result<ferry::transport::PkiFiles>& r) -> int {
        if (!r)
            return fail(g, r.error());
        if (g.json_output) {
            std::cout << ferry::dump_json(json{{"ca", r->ca}, {"dir", pki_dir}, {"written", r->written}}, 2) << "\n";
            return exit_ok;
        }
        for (auto& f : r->written)
            std::cout << "wrote " << f << "\n";
        std::cout << "each node's ferryd.toml: [tls] ca = \"" << r->ca << "\", cert = \"" << pki_dir
                  << "/<node>.pem\", key = \"" << pki_dir << "/<node>-key.pem\" (keep ca-key.pem offline)\n";
        return exit_ok;
    };
    auto* pki_init = pki->add_subcommand("init", "create a cluster CA and one certificate per node");
    pki_init->add_option("--dir", pki_dir, "where to write the files")->required();
    pki_init->add_option("--nodes", pki_nodes, "node names, comma-separated (a,b,c)")->required();
    pki_init->callback([&] { rc = pki_result(ferry::transport::init_pki(pki_dir, split_names(pki_nodes))); });
    auto* pki_add = pki->add_subcommand("add", "issue certificates for more nodes from an existing CA");
    pki_add->add_option("--dir", pki_dir, "the directory pki init wrote (needs ca.pem and ca-key.pem)")->required();
    pki_add->add_option("--nodes", pki_nodes, "node names, comma-separated (a,b,c)")->required();
    pki_add->callback([&] { rc = pki_result(ferry::transport::add_pki_nodes(pki_dir, split_names(pki_nodes))); });

    // Callbacks run inside parse(); a group's problem is known only after it.
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        for (auto* group : {vm, node, migration, pki})
            if (auto problem = group_problem(group, argc, argv))
                return usage(g, *problem + " (--help lists them)");
        if (app.get_subcommands().empty())
            if (auto verb = first_word(argc, argv)) {
                std::vector<std::string> names;
                for (auto* sub : app.get_subcommands({}))
                    names.push_back(sub->get_name());
                return usage(g, fmt::format("unknown command '{}' (one of: {})", *verb, fmt::join(names, ", ")));
            }
        return usage(g, e.what());
    }
    for (auto* group : {vm, node, migration, pki})
        if (auto problem = group_problem(group, argc, argv))
            return usage(g, *problem + " (--help lists them)");
    return rc;
}

int main(int argc, char** argv) {
    // Never a core dump for a user's mistake: whatever escaped is reported.
    try {
        return ferryctl_main(argc, argv);
    } catch (const std::exception& e) {
        std::cerr << "ferryctl: internal error: " << e.what() << "\n";
        return exit_failed;
    }
}
