#include "engine/source_disks.hpp"

#include "block/qemu_block.hpp"
#include "block/ring.hpp"
#include "block/target_image.hpp"
#include "engine/async.hpp"
#include "engine/source_run.hpp"
#include "transport/peer_server.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/local/connect_pair.hpp>
#include <fmt/format.h>

namespace ferry::engine {

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);
// In sync enough to start RAM: a round that copied at most this much.
constexpr std::uint64_t in_sync_bytes = 8ULL << 20;
// Rounds before RAM starts anyway (the rest is copied while RAM moves).
constexpr int max_sync_rounds = 10;
constexpr auto background_pause = 300ms;

} // namespace

SourceDisks::SourceDisks(SourceRun& run) : run_(run), throttle_(in_sync_bytes), idle_(run.node().executor()) {}

SourceDisks::~SourceDisks() { *alive_ = false; }

std::uint64_t SourceDisks::total_bytes() const {
    std::uint64_t total = 0;
    for (auto& d : disks_)
        total += d.size;
    return total;
}

std::uint64_t SourceDisks::tail_bytes() const {
    auto& d = run_.migration().progress.disks;
    return d ? d->remaining_bytes : 0;
}

asio::awaitable<Result<json>> SourceDisks::describe() {
    auto& spec = *run_.vm().record.spec;
    block::QemuBlock qemu(run_.vm().qemu.qmp);
    json out = json::array();
    for (std::size_t i = 0; i < spec.disks.size(); ++i) {
        auto& d = spec.disks[i];
        if (d.shared)
            continue;
        std::string path = d.path;
        std::function<Result<block::ImageInfo>()> inspect = [path] { return block::inspect_image(path); };
        auto info = co_await block::offload(std::move(inspect));
        if (!info)
            co_return info.error().wrap(fmt::format("disks[{}]", i));
        if (info->format != d.format)
            co_return make_error(Errc::conflict, fmt::format("disks[{}] {} is {}, its spec says {}", i, d.path,
                                                             info->format, d.format));
        auto node = co_await qemu.format_node(d.path);
        if (!node)
            co_return node.error().wrap(fmt::format("disks[{}]", i));
        disks_.push_back({static_cast<std::uint32_t>(i), d.path, d.format, info->virtual_size, *node});
        out.push_back({{"index", i}, {"path", d.path}, {"format", d.format}, {"size", info->virtual_size}});
    }
    DiskProgress p;
    p.total_bytes = total_bytes();
    run_.migration().progress.disks = p;
    co_return ok(std::move(out));
}

asio::awaitable<Result<DiskStream>> SourceDisks::open_channel(const std::string& token) {
    auto& m = run_.migration();
    auto& node = run_.node();
    auto channel = co_await transport::open_data(transport::data_plane(), link_.address, m.target_node, token,
                                                 node.tls());
    if (!channel)
        co_return channel.error().wrap("opening the disk channel");
    DiskStream mine(node.executor()), theirs(transport::data_plane());
    boost::system::error_code ec;
    asio::local::connect_pair(mine, theirs, ec);
    if (ec)
        co_return make_error(Errc::io, fmt::format("disk stream: {}", ec.message()));
    asio::co_spawn(node.executor(), carry(this, alive_, std::move(theirs), *channel, ++channel_generation_),
                   asio::detached);
    co_return ok(std::move(mine));
}

asio::awaitable<Result<DiskStream>> SourceDisks::reconnect() {
    auto& m = run_.migration();
    if (keeping_up_ || stopping_)
        co_return make_error(Errc::disconnected, "RAM is moving: the migration cannot go on without the link");
    auto grace = peer_timeout(m.config);
    auto deadline = std::chrono::steady_clock::now() + grace;
    engine_log()->warn("migration {}: the disk channel to {} broke; dialling again for up to {} s", m.id,
                       m.target_node, m.config.peer_timeout);
    for (;;) {
        if (m.abort_requested || stopping_)
            co_return make_error(Errc::aborted, "the migration ended while the disk channel was down");
        auto token = co_await link_.again();
        Error why = token ? Error{} : token.error();
        if (token) {
            auto stream = co_await open_channel(*token);
            if (stream) {
                engine_log()->info("migration {}: disk channel to {} re-established", m.id, m.target_node);
                co_return stream;
            }
            why = stream.error();
        }
        // The target answered, but not with a token: it gave the arrival up.
        if (why.code == Errc::conflict)
            co_return make_error(Errc::conflict, fmt::format("resuming the disk stream: {}", why.message));
        if (std::chrono::steady_clock::now() >= deadline)
            co_return make_error(Errc::disconnected, fmt::format("node {} did not take the disk channel back within "
                                                                 "{} s: {}",
                                                                 m.target_node, m.config.peer_timeout, why.message));
        co_await sleep_for(500ms);
    }
}

asio::awaitable<Result<void>> SourceDisks::sync(Link link) {
    auto& m = run_.migration();
    auto& node = run_.node();
    // Until RAM measures the link: half of the largest downtime at the
    // migration's bandwidth is the disks' tail budget.
    if (auto rate = link.bucket ? link.bucket->rate() : 0; rate != 0)
        tail_budget_ = static_cast<std::uint64_t>(m.config.max_downtime_ms) * rate / 2000;
    link_ = std::move(link);
    auto stream = co_await open_channel(link_.token);
    if (!stream)
        co_return stream.error();
    sender_ = std::make_unique<DiskSender>(run_.vm().qemu.qmp, "ferry-" + m.id,
                                           node.vm_dir(run_.vm().record.name) + "/mirror.sock", disks_,
                                           std::move(*stream));
    sender_->set_reconnect([this] { return reconnect(); });
    sender_->set_label("migration " + m.id);
    auto started = co_await sender_->start();
    if (!started)
        co_return started.error().wrap("starting the disk mirror");
    engine_log()->info("migration {}: mirroring {} disk(s), {} bytes", m.id, disks_.size(), total_bytes());
    std::uint64_t last = UINT64_MAX;
    auto last_published = std::chrono::steady_clock::time_point{};
    for (int i = 0; i < max_sync_rounds; ++i) {
        if (m.abort_requested)
            co_return make_error(Errc::aborted, "aborted by request while copying the disks");
        // A round may take long (the first copies everything): an abort
        // cuts it short.
        std::optional<Result<void>> r;
        std::optional<Error> target_failed;
        asio::co_spawn(node.executor(), run_round(this, alive_, &r), asio::detached);
        while (!r) {
            if (m.abort_requested && sender_)
                sender_->abort();
            refresh_progress();
            if (auto now = std::chrono::steady_clock::now(); now - last_published >= std::chrono::seconds(1)) {
                last_published = now; // `migrate --wait` shows how far the round got
                node.publish("progress", m.vm, m.id, json(m)["progress"]);
            }
            // The target hears from us while only disks move (it gives an
            // arrival up after peer_timeout of silence). A failed ping is
            // not the verdict: the disk stream's own errors are.
            if (link_.ping) {
                auto alive = co_await link_.ping();
                if (!alive && alive.error().code == Errc::conflict && !target_failed) {
                    // The target answered that it cannot go on (a disk it
                    // cannot write, its QEMU gone): the round ends now.
                    target_failed = alive.error();
                    if (sender_)
                        sender_->abort();
                } else if (!alive) {
                    engine_log()->debug("migration {}: pinging node {}: {}", m.id, m.target_node,
                                        alive.error().message);
                }
            }
            co_await sleep_for(50ms);
        }
        if (m.abort_requested)
            co_return make_error(Errc::aborted, "aborted by request while copying the disks");
        if (target_failed)
            co_return *target_failed;
        if (!*r)
            co_return *r;
        auto dirty = m.progress.disks->remaining_bytes;
        // While the disk throttle can still bring the tail under its budget,
        // RAM waits (QEMU may switch over whenever its RAM is sent).
        bool capping = may_cap() && over_budget(dirty);
        if (!capping && (dirty <= in_sync_bytes || (i > 0 && dirty >= last)))
            break; // in sync, or not getting closer: the rest goes with RAM
        last = dirty;
    }
    co_return Result<void>{};
}

asio::awaitable<Result<void>> SourceDisks::one_round() {
    auto& m = run_.migration();
    round_running_ = true;
    auto r = co_await sender_->round();
    round_running_ = false;
    if (!r) {
        if (!error_)
            error_ = r.error();
        co_return r.error();
    }
    auto dirty = co_await sender_->dirty_bytes();
    auto& p = *m.progress.disks;
    p.rounds = r->round;
    p.sent_bytes += r->data_bytes + r->zero_bytes;
    if (dirty) {
        p.remaining_bytes = *dirty;
        // Written since this round's bitmap started, about as long ago as the round took.
        auto took = std::max<std::int64_t>(r->took.count(), 1);
        p.dirty_rate_bps = *dirty * 1000 / static_cast<std::uint64_t>(took);
    }
    // Falling behind: the guest wrote at least what the round copied, and
    // that is more than fits a last round.
    auto took_ms = static_cast<std::uint64_t>(std::max<std::int64_t>(r->took.count(), 1));
    copy_rate_bps_ = r->data_bytes * 1000 / took_ms;
    // Zero records cost next to nothing: the data is what a round copies.
    DiskThrottle::Round round{r->data_bytes, dirty ? *dirty : 0, r->took};
    round.over_budget = over_budget(round.dirty);
    if (dirty && throttle_.behind(round)) {
        if (!behind_since_)
            behind_since_ = std::chrono::steady_clock::now();
    } else {
        behind_since_.reset();
    }
    if (dirty && may_cap()) {
        // A cap that cannot be set is a lever less, not a failure: the
        // progress timeout still judges the rounds.
        auto capped = co_await throttle(round);
        if (!capped) {
            cap_failed_ = true;
            engine_log()->warn("migration {}: capping the guest's disk writes: {}; going on without a cap", m.id,
                               capped.error().message);
        } else if (*capped && behind_since_) {
            behind_since_ = std::chrono::steady_clock::now(); // the new cap gets its time
        }
    }
    engine_log()->debug("migration {}: disk round {}: {} bytes data, {} zero, {} ms; {} dirty since", m.id, r->round,
                        r->data_bytes, r->zero_bytes, r->took.count(), dirty ? *dirty : 0);
    co_return Result<void>{};
}

asio::awaitable<void> SourceDisks::run_round(SourceDisks* self, std::shared_ptr<bool> alive,
                                             std::optional<Result<void>>* out) {
    auto r = co_await self->one_round();
    if (*alive)
        *out = std::move(r);
}

void SourceDisks::keep_up() {
    if (keeping_up_ || stopping_)
        return;
    keeping_up_ = true;
    asio::co_spawn(run_.node().executor(), background(this, alive_), asio::detached);
}

asio::awaitable<void> SourceDisks::background(SourceDisks* self, std::shared_ptr<bool> alive) {
    auto run = self->run_.shared_from_this(); // keeps the run (and so this) alive
    while (*alive && !self->stopping_) {
        auto r = co_await self->one_round();
        if (!r) {
            run->wake_up();
            break;
        }
        if (self->stopping_)
            break;
        self->idle_.expires_after(background_pause);
        co_await self->idle_.async_wait(nothrow);
    }
    self->keeping_up_ = false;
}

asio::awaitable<void> SourceDisks::carry(SourceDisks* self, std::shared_ptr<bool> alive, DiskStream end,
                                         std::shared_ptr<transport::Channel> channel, std::uint32_t generation) {
    auto run = self->run_.shared_from_this();
    auto bucket = self->link_.bucket;
    auto r = co_await tunnel_on_data_plane(std::move(end), channel, std::move(bucket));
    // Before RAM the sender notices a broken channel itself and dials
    // again; while RAM moves a broken channel ends the migration.
    if (!r && *alive && self->keeping_up_ && !self->stopping_ && !self->error_ &&
        generation == self->channel_generation_) {
        self->error_ = r.error().wrap("disk channel");
        run->wake_up();
    }
}

std::optional<Error> SourceDisks::failed(std::int64_t progress_timeout) const {
    if (error_)
        return error_;
    if (!behind_since_ || !keeping_up_ || progress_timeout <= 0)
        return std::nullopt;
    auto behind = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - *behind_since_);
    if (behind.count() < progress_timeout)
        return std::nullopt;
    auto& d = *run_.migration().progress.disks;
    auto mib = [](std::uint64_t bytes) { return static_cast<double>(bytes) / (1 << 20); };
    auto help = throttle_.cap_bps() != 0
                    ? fmt::format("even with its disk writes capped at {:.2f} MiB/s: raise the bandwidth",
                                  mib(throttle_.cap_bps()))
                    : std::string("allow_auto_converge is off, so ferry does not cap the guest's disk writes: "
                                  "allow it, lower the guest's disk writes or raise the bandwidth");
    return make_error(Errc::timeout,
                      fmt::format("progress timeout: the guest writes its disks at {:.1f} MiB/s, faster than they are "
                                  "copied ({:.1f} MiB/s), for {} s (limit {} s); {:.1f} MiB dirty after round {}, {}",
                                  mib(d.dirty_rate_bps), mib(copy_rate_bps_), behind.count(), progress_timeout,
                                  mib(d.remaining_bytes), d.rounds, help));
}

void SourceDisks::refresh_progress() {
    auto& d = run_.migration().progress.disks;
    if (!d || !sender_)
        return;
    auto p = sender_->round_progress();
    d->round = p ? p->round : 0;
    d->round_bytes = p ? p->total : 0;
    d->round_sent_bytes = p ? p->done : 0;
}

bool SourceDisks::may_cap() const {
    return run_.migration().config.allow_auto_converge && !throttle_.at_floor() && !cap_failed_;
}

asio::awaitable<Result<bool>> SourceDisks::throttle(const DiskThrottle::Round& round) {
    auto& m = run_.migration();
    auto cap = throttle_.after_round(round);
    if (!cap)
        co_return ok(false);
    block::QemuBlock qemu(run_.vm().qemu.qmp);
    // Shared evenly: the rates are the disks' together.
    auto each = std::max<std::uint64_t>(*cap / disks_.size(), 1);
    for (auto& d : disks_) {
        auto now = co_await qemu.io_limits(d.node);
        if (!now)
            co_return now.error().wrap(fmt::format("capping the disk writes of disks[{}]", d.index));
        // The limits before ferry's first cap are what ending puts back.
        json original;
        for (auto& saved : m.saved_io_limits)
            if (saved["device"] == now->device)
                original = saved["limits"];
        if (original.is_null()) {
            original = now->limits;
            m.saved_io_limits.push_back({{"device", now->device}, {"limits", original}});
            run_.node().persist(m);
        }
        auto group = fmt::format("ferry-{}-disk{}", m.id, d.index);
        auto set = co_await qemu.set_io_limits(now->device, block::QemuBlock::cap_writes(original, each, group));
        if (!set)
            co_return set.error().wrap(fmt::format("capping the disk writes of disks[{}]", d.index));
    }
    m.progress.disks->write_cap_bps = *cap;
    engine_log()->info("migration {}: the guest wrote its disks at {} bytes/s, faster than round {} copied them ({} "
                       "bytes/s): disk writes capped at {} bytes/s",
                       m.id, round.dirty * 1000 / std::max<std::int64_t>(round.took.count(), 1),
                       m.progress.disks->rounds, copy_rate_bps_, *cap);
    co_return ok(true);
}

asio::awaitable<void> restore_io_limits(std::shared_ptr<qmp::Client> qmp, Migration& m) {
    block::QemuBlock qemu(std::move(qmp));
    json left = json::array();
    for (auto& saved : m.saved_io_limits) {
        auto device = saved["device"].get<std::string>();
        auto r = co_await qemu.set_io_limits(device, saved["limits"]);
        if (!r) {
            engine_log()->warn("migration {}: restoring the I/O limits of {}: {}", m.id, device, r.error().message);
            left.push_back(saved);
        } else {
            engine_log()->info("migration {}: restored the I/O limits of {}", m.id, device);
        }
    }
    m.saved_io_limits = std::move(left);
}

asio::awaitable<void> SourceDisks::restore_limits() {
    auto& m = run_.migration();
    if (m.saved_io_limits.empty())
        co_return;
    co_await restore_io_limits(run_.vm().qemu.qmp, m);
    run_.node().persist(m);
}

asio::awaitable<Result<void>> SourceDisks::last_round() {
    auto& m = run_.migration();
    stopping_ = true;
    idle_.cancel();
    while (keeping_up_)
        co_await sleep_for(5ms);
    if (error_)
        co_return *error_;
    if (!sender_)
        co_return make_error(Errc::internal, "the disk mirror never started");
    auto r = co_await one_round();
    if (!r)
        co_return r.error().wrap("the disks' last round");
    auto ended = co_await sender_->end_stream();
    if (!ended)
        co_return ended;
    // The guest is paused: its writes are no longer a concern, and if the
    // switchover fails it resumes here with its own limits.
    co_await restore_limits();
    record_results();
    std::uint64_t data = 0, zero = 0;
    for (auto& t : sender_->totals()) {
        data += t.data_bytes;
        zero += t.zero_bytes;
    }
    engine_log()->info("migration {}: disks in sync after {} rounds ({} bytes sent as data, {} as zero records)",
                       m.id, sender_->rounds(), data, zero);
    co_await sender_->finish();
    co_return Result<void>{};
}

void SourceDisks::record_results() {
    auto& result = run_.migration().result;
    result.disks.clear();
    auto& totals = sender_->totals();
    for (std::size_t d = 0; d < disks_.size(); ++d)
        result.disks.push_back({disks_[d].index, disks_[d].path, totals[d].data_bytes, totals[d].zero_bytes});
}

asio::awaitable<void> SourceDisks::stop() {
    stopping_ = true;
    idle_.cancel();
    if (sender_ && round_running_)
        sender_->abort();
    while (keeping_up_ || round_running_)
        co_await sleep_for(5ms);
    co_await restore_limits();
    if (sender_) {
        record_results();
        co_await sender_->finish();
    }
}

} // namespace ferry::engine
