#include "engine/disk_mirror.hpp"

#include "engine/async.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include <array>

namespace ferry::engine {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using namespace asio::experimental::awaitable_operators;
using transport::DiskRecord;
using transport::DiskRecordKind;

namespace {

constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);
constexpr std::size_t depth = 8;            // reads in flight
constexpr std::size_t chunk = 1 << 20;      // bytes per data record
constexpr auto ack_timeout = 120s;          // a round's flush on the target
constexpr auto send_timeout = 60s;          // a stream that takes nothing
constexpr auto nbd_timeout = 30s;


// Splits data extents into records' sizes; zero extents stay whole.
std::vector<block::Extent> records_of(const std::vector<block::Extent>& extents) {
    std::vector<block::Extent> out;
    for (auto& e : extents) {
        // Zeros cost a header, however long: 1 GiB each (NBD's requests
        // carry 32-bit lengths).
        auto pieces = block::split(std::span(&e, 1), e.zero ? std::uint64_t{1} << 30 : chunk);
        out.insert(out.end(), pieces.begin(), pieces.end());
    }
    return out;
}

} // namespace

struct DiskSender::Work {
    explicit Work(asio::any_io_executor ex) : done(ex) {}
    struct Item {
        std::size_t disk;
        block::Extent extent;
    };
    std::uint32_t round = 0;
    std::vector<Item> items;
    std::vector<std::uint64_t> item_seq; // per item: the seq it went with, 0 before
    std::size_t next = 0;
    std::uint64_t first_seq = 0; // the round's records come after this one
    std::uint64_t end_seq = 0;   // its round_end's, once sent
    std::vector<std::shared_ptr<block::NbdClient>> readers; // per disk, where NBD serves it this round
    std::vector<std::string> exports;
    struct Frozen {
        std::string node, frozen, current;
    };
    std::vector<Frozen> frozen; // bitmaps that stopped recording this round, removed after it
    int running = 0;
    std::optional<Error> error;
    DiskRoundStats stats;
    asio::steady_timer done;
};

DiskSender::DiskSender(std::shared_ptr<qmp::Client> qmp, std::string prefix, std::string nbd_socket,
                       std::vector<MirrorDisk> disks, DiskStream stream)
    : qemu_(qmp), prefix_(std::move(prefix)), nbd_socket_(std::move(nbd_socket)),
      disks_(std::move(disks)), stream_(std::move(stream)), pool_(depth, chunk), raw_(disks_.size()),
      totals_(disks_.size()), recording_(disks_.size(), 1), write_done_(stream_.get_executor()) {
    write_done_.expires_at(asio::steady_timer::time_point::max()); // only ever cancelled
}

DiskSender::~DiskSender() = default;

std::string DiskSender::bitmap(std::size_t disk, std::uint32_t round) const {
    return fmt::format("{}-d{}-b{}", prefix_, disks_[disk].index, round);
}

std::string DiskSender::export_name(std::size_t disk, std::uint32_t round) const {
    return fmt::format("{}-d{}-r{}", prefix_, disks_[disk].index, round);
}

asio::awaitable<Result<void>> DiskSender::start() {
    ring_ = block::Ring::create(stream_.get_executor(), depth);
    auto reg = ring_->register_buffers(pool_);
    registered_ = ring_->uses_io_uring() && reg;
    if (!reg)
        engine_log()->warn("{}: {} (reads go without registered buffers)", label_, reg.error().message);
    for (std::size_t d = 0; d < disks_.size(); ++d) {
        if (disks_[d].format != "raw")
            continue;
        auto img = block::Image::open(disks_[d].path, block::Image::Access::read);
        if (!img)
            co_return img.error();
        raw_[d].emplace(std::move(*img));
    }
    auto server = co_await qemu_.start_nbd(nbd_socket_);
    if (!server)
        co_return server.error();
    started_ = true;
    for (std::size_t d = 0; d < disks_.size(); ++d) {
        auto added = co_await qemu_.add_bitmap(disks_[d].node, bitmap(d, 1));
        if (!added)
            co_return added.error();
    }
    co_return Result<void>{};
}

asio::awaitable<Result<std::uint64_t>> DiskSender::dirty_bytes() {
    std::uint64_t total = 0;
    for (std::size_t d = 0; d < disks_.size(); ++d) {
        auto n = co_await qemu_.bitmap_dirty_bytes(disks_[d].node, bitmap(d, recording_[d]));
        if (!n)
            co_return n.error();
        total += *n;
    }
    co_return total;
}

asio::awaitable<Result<void>> DiskSender::plan_disk(std::size_t d, Work& work) {
    auto& disk = disks_[d];
    // Until one round has copied everything, a round copies everything.
    bool first = !base_copied_;
    std::vector<block::Extent> extents;
    std::vector<std::string> bitmaps;
    if (work.round > recording_[d]) {
        // The recording bitmap stops, the next one starts, in one step.
        auto frozen = bitmap(d, recording_[d]), next = bitmap(d, work.round);
        auto rotated = co_await qemu_.rotate_bitmap(disk.node, frozen, next);
        if (!rotated)
            co_return rotated.error();
        recording_[d] = work.round;
        work.frozen.push_back({disk.node, frozen, next});
        if (!first)
            bitmaps.push_back(frozen);
    }
    if (first && raw_[d]) {
        // Everything allocated as data, the holes as zeros.
        auto data = raw_[d]->allocated();
        if (!data)
            co_return data.error();
        extents.push_back({0, disk.size, true});
        extents.insert(extents.end(), data->begin(), data->end());
        extents = block::coalesce(std::move(extents));
    } else {
        auto context = first ? std::string(block::allocation_context) : block::dirty_bitmap_context(bitmaps.at(0));
        std::vector<std::string> contexts{context};
        auto name = export_name(d, work.round);
        auto exported = co_await qemu_.add_export(name, disk.node, false, bitmaps);
        if (!exported)
            co_return exported.error();
        work.exports.push_back(name);
        auto ex = stream_.get_executor();
        auto client = co_await block::NbdClient::connect(ex, nbd_socket_, name, contexts, nbd_timeout);
        if (!client)
            co_return client.error();
        work.readers[d] = *client;
        auto status = co_await (*client)->block_status(context, 0, disk.size);
        if (!status)
            co_return status.error();
        extents = first ? block::allocation_extents(*status) : block::dirty_extents(*status);
        extents = block::clip(std::move(extents), disk.size);
    }
    for (auto& e : records_of(extents))
        work.items.push_back({d, e});
    co_return Result<void>{};
}

asio::awaitable<Result<std::uint64_t>> DiskSender::send(const DiskRecord& record, std::span<const std::byte> payload) {
    // One record at a time on the stream, whole.
    while (writing_)
        co_await write_done_.async_wait(nothrow);
    if (broken_)
        co_return make_error(Errc::disconnected, "disk stream: broken by an earlier failure");
    writing_ = true;
    auto r = record;
    r.seq = ++seq_;
    auto header = transport::encode_disk_record(r);
    std::array<asio::const_buffer, 2> bufs{asio::buffer(header), asio::buffer(payload.data(), payload.size())};
    asio::steady_timer deadline(stream_.get_executor());
    deadline.expires_after(send_timeout);
    auto outcome = co_await (asio::async_write(stream_, bufs, nothrow) || deadline.async_wait(nothrow));
    writing_ = false;
    write_done_.cancel();
    if (outcome.index() == 1) {
        broken_ = true;
        co_return make_error(Errc::timeout, fmt::format("disk stream: the target took no data for {} s",
                                                        send_timeout.count()));
    }
    auto [ec, n] = std::get<0>(outcome);
    if (ec) {
        broken_ = true;
        co_return make_error(Errc::disconnected, fmt::format("disk stream: {}", ec.message()));
    }
    co_return ok(r.seq);
}

asio::awaitable<void> DiskSender::copy_worker(DiskSender* self, std::shared_ptr<Work> work, std::size_t slot) {
    auto buf = self->pool_.slot(slot);
    std::span<const std::byte> no_payload;
    while (work->next < work->items.size() && !work->error) {
        auto item = work->next++;
        auto [d, e] = work->items[item];
        DiskRecord rec{DiskRecordKind::zero, self->disks_[d].index, 0, e.offset, e.length, work->round};
        Result<std::uint64_t> sent = std::uint64_t{0};
        if (e.zero) {
            sent = co_await self->send(rec, no_payload);
            work->stats.zero_bytes += e.length;
            self->totals_[d].zero_bytes += e.length;
        } else {
            auto len = static_cast<std::size_t>(e.length);
            Result<void> read;
            if (self->raw_[d]) {
                auto n = co_await self->raw_[d]->read(*self->ring_, buf, e.offset, len,
                                                      self->registered_ ? static_cast<int>(slot) : -1);
                if (!n)
                    read = n.error();
                else if (*n != len)
                    read = make_error(Errc::io, fmt::format("{}: short read at {}", self->disks_[d].path, e.offset));
            } else {
                read = co_await work->readers[d]->pread(buf.first(len), e.offset);
            }
            if (!read) {
                if (!work->error) // the first failure says why; the others follow from it
                    work->error = read.error();
                break;
            }
            auto data = buf.first(len);
            if (block::is_zero(data)) { // allocated, but zeros: no need to send them
                sent = co_await self->send(rec, no_payload);
                work->stats.zero_bytes += len;
                self->totals_[d].zero_bytes += len;
            } else {
                rec.kind = DiskRecordKind::data;
                sent = co_await self->send(rec, data);
                work->stats.data_bytes += len;
                self->totals_[d].data_bytes += len;
            }
        }
        if (!sent) {
            if (!work->error)
                work->error = sent.error();
            break;
        }
        work->item_seq[item] = *sent;
    }
    if (--work->running == 0)
        work->done.cancel();
}

asio::awaitable<Result<DiskRecord>> DiskSender::read_reply(std::chrono::seconds timeout, const char* waiting_for) {
    std::array<std::byte, transport::disk_record_size> h;
    asio::steady_timer deadline(stream_.get_executor());
    deadline.expires_after(timeout);
    auto outcome = co_await (asio::async_read(stream_, asio::buffer(h), nothrow) || deadline.async_wait(nothrow));
    if (outcome.index() == 1) {
        broken_ = true;
        co_return make_error(Errc::timeout, fmt::format("the target did not send {} within {} s", waiting_for,
                                                        timeout.count()));
    }
    auto [ec, n] = std::get<0>(outcome);
    if (ec) {
        broken_ = true;
        co_return make_error(Errc::disconnected, fmt::format("waiting for {}: {}", waiting_for, ec.message()));
    }
    co_return transport::decode_disk_record(h);
}

asio::awaitable<Result<void>> DiskSender::end_round(Work& work) {
    DiskRecord end{DiskRecordKind::round_end, 0, 0, 0, 0, work.round};
    std::span<const std::byte> no_payload;
    auto sent = co_await send(end, no_payload);
    if (!sent)
        co_return sent.error();
    work.end_seq = *sent;
    auto ack = co_await read_reply(ack_timeout, "the round's ack");
    if (!ack)
        co_return ack.error();
    if (ack->kind != DiskRecordKind::ack || ack->seq != work.end_seq)
        co_return make_error(Errc::protocol, fmt::format("the target answered {} {} instead of ack {}",
                                                         transport::to_string(ack->kind), ack->seq, work.end_seq));
    co_return Result<void>{};
}

asio::awaitable<Result<void>> DiskSender::copy(std::shared_ptr<Work> work) {
    work->item_seq.assign(work->items.size(), 0);
    work->next = 0;
    work->end_seq = 0;
    work->error.reset();
    work->running = static_cast<int>(depth);
    for (std::size_t s = 0; s < depth; ++s)
        asio::co_spawn(stream_.get_executor(), copy_worker(this, work, s), asio::detached);
    work->done.expires_at(asio::steady_timer::time_point::max());
    while (work->running > 0)
        co_await work->done.async_wait(nothrow);
    if (work->error)
        co_return *work->error;
    co_return co_await end_round(*work);
}

asio::awaitable<Result<bool>> DiskSender::resume(Work& work, const Error& why) {
    engine_log()->warn("{}: disk round {}: {}; resuming on a new stream", label_, work.round, why.message);
    boost::system::error_code ignored;
    stream_.close(ignored);
    auto next = co_await reconnect_();
    if (!next)
        co_return make_error(next.error().code, fmt::format("{}; {}", why.message, next.error().message));
    if (aborted_) // while it dialled
        co_return make_error(Errc::aborted, fmt::format("{}; aborted while the link was down", why.message));
    stream_ = std::move(*next);
    broken_ = false;
    // The target's first word: the last record it has written, once what
    // arrived before the break is written (a round's flush may take that).
    auto have = co_await read_reply(ack_timeout, "where to resume");
    if (!have)
        co_return make_error(have.error().code, fmt::format("{}; resuming: {}", why.message, have.error().message));
    if (have->kind != DiskRecordKind::ack || have->seq > seq_ || have->seq < work.first_seq)
        co_return make_error(Errc::protocol,
                             fmt::format("resuming disk round {}: the target has records up to {} ({}), but this "
                                         "round sent {} to {}",
                                         work.round, have->seq, transport::to_string(have->kind), work.first_seq + 1,
                                         seq_));
    ++resumes_;
    seq_ = have->seq;
    if (work.end_seq != 0 && have->seq >= work.end_seq) {
        engine_log()->info("{}: disk round {}: the target has all of it (only its ack was lost)", label_, work.round);
        co_return false;
    }
    std::vector<Work::Item> left;
    std::uint64_t again = 0;
    for (std::size_t i = 0; i < work.items.size(); ++i) {
        auto seq = work.item_seq[i];
        if (seq != 0 && seq <= have->seq)
            continue; // the target has it
        left.push_back(work.items[i]);
        if ((seq != 0 || i < work.next) && !work.items[i].extent.zero)
            again += work.items[i].extent.length;
    }
    resent_bytes_ += again;
    engine_log()->info("{}: disk round {} resumes after record {}: {} of its {} records left, {} bytes of them sent "
                       "before",
                       label_, work.round, have->seq, left.size(), work.items.size(), again);
    work.items = std::move(left);
    co_return true;
}

asio::awaitable<void> DiskSender::drop_round_exports(Work& work, bool failed) {
    for (auto& r : work.readers)
        if (r)
            r->close();
    for (auto& name : work.exports) {
        auto removed = co_await qemu_.remove_export(name);
        if (!removed)
            engine_log()->warn("{}: {}", label_, removed.error().message);
    }
    for (auto& f : work.frozen) {
        // A failed round's blocks are still to copy: back into the bitmap
        // that records now.
        if (failed) {
            auto merged = co_await qemu_.merge_bitmap(f.node, f.frozen, f.current);
            if (!merged)
                engine_log()->warn("{}: {}", label_, merged.error().message);
        }
        auto removed = co_await qemu_.remove_bitmap(f.node, f.frozen);
        if (!removed)
            engine_log()->warn("{}: {}", label_, removed.error().message);
    }
}

asio::awaitable<Result<DiskRoundStats>> DiskSender::round() {
    if (!started_ || finished_)
        co_return make_error(Errc::conflict, "disk mirror: not running");
    if (broken_)
        co_return make_error(Errc::disconnected, "disk mirror: the stream broke in an earlier round");
    auto work = std::make_shared<Work>(stream_.get_executor());
    work->round = round_ + 1;
    work->readers.resize(disks_.size());
    auto began = std::chrono::steady_clock::now();
    Result<void> r;
    for (std::size_t d = 0; d < disks_.size() && r; ++d)
        r = co_await plan_disk(d, *work);
    work->first_seq = seq_;
    current_ = work;
    for (bool more = r.has_value(); more;) {
        r = co_await copy(work);
        // A broken stream resumes where the target is; anything else fails.
        if (r || aborted_ || !broken_ || !reconnect_)
            break;
        auto resumed = co_await resume(*work, r.error());
        if (resumed)
            r = Result<void>{}; // *resumed: records are left to send; else the target has the whole round
        else
            r = resumed.error();
        more = resumed && *resumed;
    }
    current_.reset();
    co_await drop_round_exports(*work, !r);
    round_ = work->round; // its number is used, even when it failed
    if (!r)
        co_return r.error().wrap(fmt::format("disk round {}", work->round));
    base_copied_ = true;
    work->stats.round = work->round;
    work->stats.took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - began);
    co_return work->stats;
}

std::optional<DiskSender::RoundProgress> DiskSender::round_progress() const {
    if (!current_)
        return std::nullopt;
    RoundProgress p{current_->round, current_->stats.data_bytes + current_->stats.zero_bytes, 0};
    for (auto& item : current_->items)
        p.total += item.extent.length;
    p.done = std::min(p.done, p.total); // a resumed round sends a few records again
    return p;
}

void DiskSender::abort() {
    broken_ = true;
    aborted_ = true;
    boost::system::error_code ec;
    stream_.shutdown(asio::socket_base::shutdown_both, ec);
}

asio::awaitable<Result<void>> DiskSender::end_stream() {
    DiskRecord end{DiskRecordKind::end, 0, 0, 0, 0, round_};
    std::span<const std::byte> no_payload;
    auto sent = co_await send(end, no_payload);
    if (!sent)
        co_return sent.error().wrap("ending the disk stream");
    co_return Result<void>{};
}

asio::awaitable<void> DiskSender::finish() {
    if (finished_)
        co_return;
    finished_ = true;
    boost::system::error_code ec;
    stream_.shutdown(asio::socket_base::shutdown_send, ec); // the receiver sees the end
    if (!started_)
        co_return;
    auto swept = co_await qemu_.sweep(prefix_, true);
    if (!swept)
        engine_log()->warn("{}: cleaning up the source QEMU: {}", label_, swept.error().message);
}

// --- target -------------------------------------------------------------------

DiskReceiver::DiskReceiver(std::vector<MirrorDisk> disks, std::vector<std::optional<NbdTarget>> nbd, DiskStream stream)
    : disks_(std::move(disks)), nbd_targets_(std::move(nbd)), stream_(std::move(stream)),
      pool_(depth, chunk), raw_(disks_.size()), nbd_(disks_.size()), totals_(disks_.size()), busy_(depth),
      stream_ready_(stream_.get_executor()), slot_free_(stream_.get_executor()) {
    nbd_targets_.resize(disks_.size());
}

asio::awaitable<Result<void>> DiskReceiver::open() {
    ring_ = block::Ring::create(stream_.get_executor(), 4);
    for (std::size_t d = 0; d < disks_.size(); ++d) {
        if (nbd_targets_[d]) {
            auto ex = stream_.get_executor();
            std::vector<std::string> no_contexts;
            auto c = co_await block::NbdClient::connect(ex, nbd_targets_[d]->socket, nbd_targets_[d]->export_name,
                                                        no_contexts, nbd_timeout);
            if (!c)
                co_return c.error();
            nbd_[d] = *c;
            continue;
        }
        auto img = block::Image::open(disks_[d].path, block::Image::Access::write);
        if (!img)
            co_return img.error();
        if (img->size() < disks_[d].size)
            co_return make_error(Errc::conflict, fmt::format("target image {} holds {} bytes, the disk {}",
                                                             disks_[d].path, img->size(), disks_[d].size));
        raw_[d].emplace(std::move(*img));
    }
    co_return Result<void>{};
}

asio::awaitable<Result<void>> DiskReceiver::flush_all() {
    for (std::size_t d = 0; d < disks_.size(); ++d) {
        Result<void> f;
        if (raw_[d])
            f = co_await raw_[d]->flush(*ring_);
        else if (nbd_[d])
            f = co_await nbd_[d]->flush();
        if (!f)
            co_return f;
    }
    co_return Result<void>{};
}

asio::awaitable<std::size_t> DiskReceiver::take_slot() {
    for (;;) {
        for (std::size_t i = 0; i < busy_.size(); ++i)
            if (!busy_[i]) {
                busy_[i] = true;
                ++in_flight_;
                co_return i;
            }
        slot_free_.expires_at(asio::steady_timer::time_point::max());
        co_await slot_free_.async_wait(nothrow);
    }
}

// One write in flight on its slot (data) or none (zeros); records of one
// round never overlap, so they may land in any order.
asio::awaitable<void> DiskReceiver::write_slot(DiskReceiver* self, std::size_t slot, std::size_t d, DiskRecord r) {
    Result<void> w;
    if (r.kind == DiskRecordKind::zero) {
        if (self->raw_[d])
            w = co_await self->raw_[d]->write_zeroes(*self->ring_, r.offset, r.length);
        else
            w = co_await self->nbd_[d]->zero(r.offset, r.length);
    } else {
        auto buf = self->pool_.slot(slot).first(static_cast<std::size_t>(r.length));
        if (self->raw_[d])
            w = co_await self->raw_[d]->write(*self->ring_, buf, r.offset, self->registered_ ? static_cast<int>(slot) : -1);
        else
            w = co_await self->nbd_[d]->pwrite(buf, r.offset);
    }
    if (!w && !self->write_error_)
        self->write_error_ = w.error().wrap(fmt::format("disk {} record {}", r.disk, r.seq));
    self->busy_[slot] = false;
    --self->in_flight_;
    self->slot_free_.cancel();
}

asio::awaitable<Result<void>> DiskReceiver::drain() {
    while (in_flight_ > 0) {
        slot_free_.expires_at(asio::steady_timer::time_point::max());
        co_await slot_free_.async_wait(nothrow);
    }
    if (write_error_)
        co_return *write_error_;
    co_return Result<void>{};
}

asio::awaitable<Result<void>> DiskReceiver::apply(const DiskRecord& r) {
    auto bad = [&](const std::string& why) {
        return make_error(Errc::protocol, fmt::format("disk stream record {} ({}): {}", r.seq,
                                                      transport::to_string(r.kind), why));
    };
    if (write_error_)
        co_return *write_error_;
    if (r.kind == DiskRecordKind::ack)
        co_return bad("the source does not send acks");
    if (r.kind == DiskRecordKind::round_end) {
        auto f = co_await drain();
        if (f)
            f = co_await flush_all();
        if (!f)
            co_return f;
        ++rounds_;
        last_seq_ = r.seq; // on stable storage: a resumed stream starts after it
        DiskRecord ack{DiskRecordKind::ack, 0, r.seq, 0, 0, r.round};
        auto h = transport::encode_disk_record(ack);
        auto [ec, n] = co_await asio::async_write(stream_, asio::buffer(h), nothrow);
        if (ec) {
            stream_broke_ = true;
            co_return make_error(Errc::disconnected, fmt::format("disk stream: acknowledging round {}: {}", r.round,
                                                                 ec.message()));
        }
        co_return Result<void>{};
    }
    auto it = std::find_if(disks_.begin(), disks_.end(), [&](const MirrorDisk& d) { return d.index == r.disk; });
    if (it == disks_.end())
        co_return bad(fmt::format("disk {} is not one this migration mirrors", r.disk));
    auto d = static_cast<std::size_t>(it - disks_.begin());
    if (r.offset + r.length > it->size)
        co_return bad(fmt::format("{} bytes at {} lie past the end of disk {} ({} bytes)", r.length, r.offset, r.disk,
                                  it->size));
    if (r.kind == DiskRecordKind::data && r.length > pool_.slot_size())
        co_return bad(fmt::format("{} bytes of data in one record (at most {})", r.length, pool_.slot_size()));
    auto slot = co_await take_slot();
    if (r.kind == DiskRecordKind::zero) {
        totals_[d].zero_bytes += r.length;
    } else {
        auto buf = pool_.slot(slot).first(static_cast<std::size_t>(r.length));
        auto [ec, n] = co_await asio::async_read(stream_, asio::buffer(buf.data(), buf.size()), nothrow);
        if (ec) {
            busy_[slot] = false;
            --in_flight_;
            slot_free_.cancel();
            stream_broke_ = true;
            co_return make_error(Errc::disconnected, fmt::format("disk stream: in the data of record {}: {}", r.seq,
                                                                 ec.message()));
        }
        totals_[d].data_bytes += r.length;
    }
    last_seq_ = r.seq;
    asio::co_spawn(stream_.get_executor(), write_slot(this, slot, d, r), asio::detached);
    co_return Result<void>{};
}

void DiskReceiver::close() {
    closed_ = true;
    boost::system::error_code ec;
    stream_.close(ec);
    if (next_stream_)
        next_stream_->close(ec);
    stream_ready_.cancel();
}

void DiskReceiver::replace_stream(DiskStream stream) {
    boost::system::error_code ec;
    if (closed_) {
        stream.close(ec);
        return;
    }
    if (next_stream_)
        next_stream_->close(ec);
    next_stream_.emplace(std::move(stream));
    stream_.close(ec); // a read still waiting on the old one ends
    stream_ready_.cancel();
}

asio::awaitable<Result<void>> DiskReceiver::run() {
    auto r = co_await receive();
    // No write may outlive the receiver; the first failure is the answer.
    auto drained = co_await drain();
    if (r && !drained)
        r = drained;
    co_return r;
}

asio::awaitable<Result<void>> DiskReceiver::receive() {
    auto opened = co_await open();
    if (!opened)
        co_return opened;
    auto reg = ring_->register_buffers(pool_);
    registered_ = ring_->uses_io_uring() && reg; // without, writes still work
    for (;;) {
        stream_broke_ = false;
        auto r = co_await receive_stream();
        if (r || !stream_broke_ || closed_ || grace_.count() == 0)
            co_return r;
        // What arrived is written before the source hears where to go on.
        auto drained = co_await drain();
        if (!drained)
            co_return drained;
        if (closed_) // an abort while the writes finished
            co_return r;
        auto secs = static_cast<double>(grace_.count()) / 1000;
        if (!next_stream_) {
            engine_log()->warn("{}: disk stream broke after record {}: {}; waiting up to {:g} s for the source to resume",
                               label_, last_seq_, r.error().message, secs);
            stream_ready_.expires_after(grace_);
            co_await stream_ready_.async_wait(nothrow);
        }
        if (closed_ || !next_stream_)
            co_return make_error(Errc::disconnected, fmt::format("{}; the source did not resume within {:g} s",
                                                                 r.error().message, secs));
        boost::system::error_code ec;
        stream_.close(ec);
        stream_ = std::move(*next_stream_);
        next_stream_.reset();
        // The source's new stream starts with where this side is.
        DiskRecord have{DiskRecordKind::ack, 0, last_seq_, 0, 0, rounds_};
        auto h = transport::encode_disk_record(have);
        auto [wec, n] = co_await asio::async_write(stream_, asio::buffer(h), nothrow);
        if (wec)
            engine_log()->warn("{}: disk stream: telling the source where to resume: {}", label_, wec.message());
        else
            engine_log()->info("{}: disk stream resumed after record {}", label_, last_seq_);
        // A failed write shows as a broken stream on the next read.
    }
}

asio::awaitable<Result<void>> DiskReceiver::receive_stream() {
    std::array<std::byte, transport::disk_record_size> h;
    for (;;) {
        auto [ec, n] = co_await asio::async_read(stream_, asio::buffer(h), nothrow);
        if (ec) {
            stream_broke_ = true;
            if (ec == asio::error::eof && n == 0)
                co_return make_error(Errc::disconnected,
                                     fmt::format("disk stream: it ended without the source's end record (after "
                                                 "record {})",
                                                 last_seq_));
            co_return make_error(Errc::disconnected, fmt::format("disk stream: {}", ec.message()));
        }
        auto r = transport::decode_disk_record(h);
        if (!r)
            co_return r.error();
        if (r->kind != DiskRecordKind::ack && r->seq != last_seq_ + 1)
            co_return make_error(Errc::protocol,
                                 fmt::format("disk stream record {} ({}) follows record {}: records are missing or "
                                             "repeated",
                                             r->seq, transport::to_string(r->kind), last_seq_));
        if (r->kind == DiskRecordKind::end)
            co_return Result<void>{}; // the source is done
        auto applied = co_await apply(*r);
        if (!applied)
            co_return applied;
    }
}

} // namespace ferry::engine
