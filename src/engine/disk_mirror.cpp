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
    std::size_t next = 0;
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
        engine_log()->warn("disk mirror: {} (reads go without registered buffers)", reg.error().message);
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

asio::awaitable<Result<void>> DiskSender::send(const DiskRecord& record, std::span<const std::byte> payload) {
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
    co_return Result<void>{};
}

asio::awaitable<void> DiskSender::copy_worker(DiskSender* self, std::shared_ptr<Work> work, std::size_t slot) {
    auto buf = self->pool_.slot(slot);
    std::span<const std::byte> no_payload;
    while (work->next < work->items.size() && !work->error) {
        auto [d, e] = work->items[work->next++];
        DiskRecord rec{DiskRecordKind::zero, self->disks_[d].index, 0, e.offset, e.length, work->round};
        Result<void> sent;
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
    }
    if (--work->running == 0)
        work->done.cancel();
}

asio::awaitable<Result<void>> DiskSender::end_round(Work& work) {
    DiskRecord end{DiskRecordKind::round_end, 0, 0, 0, 0, work.round};
    std::span<const std::byte> no_payload;
    auto sent = co_await send(end, no_payload);
    if (!sent)
        co_return sent;
    auto want = seq_;
    std::array<std::byte, transport::disk_record_size> h;
    asio::steady_timer deadline(stream_.get_executor());
    deadline.expires_after(ack_timeout);
    auto outcome = co_await (asio::async_read(stream_, asio::buffer(h), nothrow) || deadline.async_wait(nothrow));
    if (outcome.index() == 1) {
        broken_ = true;
        co_return make_error(Errc::timeout, fmt::format("disk round {}: the target did not acknowledge within {} s",
                                                        work.round, ack_timeout.count()));
    }
    auto [ec, n] = std::get<0>(outcome);
    if (ec) {
        broken_ = true;
        co_return make_error(Errc::disconnected, fmt::format("disk round {}: waiting for the target: {}", work.round,
                                                             ec.message()));
    }
    auto ack = transport::decode_disk_record(h);
    if (!ack)
        co_return ack.error();
    if (ack->kind != DiskRecordKind::ack || ack->seq != want)
        co_return make_error(Errc::protocol, fmt::format("disk round {}: the target answered {} {} instead of ack {}",
                                                         work.round, transport::to_string(ack->kind), ack->seq, want));
    co_return Result<void>{};
}

asio::awaitable<void> DiskSender::drop_round_exports(Work& work, bool failed) {
    for (auto& r : work.readers)
        if (r)
            r->close();
    for (auto& name : work.exports) {
        auto removed = co_await qemu_.remove_export(name);
        if (!removed)
            engine_log()->warn("disk mirror: {}", removed.error().message);
    }
    for (auto& f : work.frozen) {
        // A failed round's blocks are still to copy: back into the bitmap
        // that records now.
        if (failed) {
            auto merged = co_await qemu_.merge_bitmap(f.node, f.frozen, f.current);
            if (!merged)
                engine_log()->warn("disk mirror: {}", merged.error().message);
        }
        auto removed = co_await qemu_.remove_bitmap(f.node, f.frozen);
        if (!removed)
            engine_log()->warn("disk mirror: {}", removed.error().message);
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
    if (r) {
        work->running = static_cast<int>(depth);
        for (std::size_t s = 0; s < depth; ++s)
            asio::co_spawn(stream_.get_executor(), copy_worker(this, work, s), asio::detached);
        work->done.expires_at(asio::steady_timer::time_point::max());
        while (work->running > 0)
            co_await work->done.async_wait(nothrow);
        if (work->error)
            r = *work->error;
    }
    if (r)
        r = co_await end_round(*work);
    co_await drop_round_exports(*work, !r);
    round_ = work->round; // its number is used, even when it failed
    if (!r)
        co_return r.error().wrap(fmt::format("disk round {}", work->round));
    base_copied_ = true;
    work->stats.round = work->round;
    work->stats.took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - began);
    co_return work->stats;
}

void DiskSender::abort() {
    broken_ = true;
    boost::system::error_code ec;
    stream_.shutdown(asio::socket_base::shutdown_both, ec);
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
        engine_log()->warn("disk mirror: cleaning up the source QEMU: {}", swept.error().message);
}

// --- target -------------------------------------------------------------------

DiskReceiver::DiskReceiver(std::vector<MirrorDisk> disks, std::vector<std::optional<NbdTarget>> nbd, DiskStream stream)
    : disks_(std::move(disks)), nbd_targets_(std::move(nbd)), stream_(std::move(stream)),
      pool_(depth, chunk), raw_(disks_.size()), nbd_(disks_.size()), totals_(disks_.size()), busy_(depth),
      slot_free_(stream_.get_executor()) {
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
        DiskRecord ack{DiskRecordKind::ack, 0, r.seq, 0, 0, r.round};
        auto h = transport::encode_disk_record(ack);
        auto [ec, n] = co_await asio::async_write(stream_, asio::buffer(h), nothrow);
        if (ec)
            co_return make_error(Errc::disconnected, fmt::format("disk stream: acknowledging round {}: {}", r.round,
                                                                 ec.message()));
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
            co_return make_error(Errc::disconnected, fmt::format("disk stream: in the data of record {}: {}", r.seq,
                                                                 ec.message()));
        }
        totals_[d].data_bytes += r.length;
    }
    asio::co_spawn(stream_.get_executor(), write_slot(this, slot, d, r), asio::detached);
    co_return Result<void>{};
}

void DiskReceiver::close() {
    boost::system::error_code ec;
    stream_.close(ec);
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
    std::array<std::byte, transport::disk_record_size> h;
    for (;;) {
        auto [ec, n] = co_await asio::async_read(stream_, asio::buffer(h), nothrow);
        if (ec == asio::error::eof && n == 0) {
            if (records_in_round_ > 0) // a source that died, not one that finished
                co_return make_error(Errc::disconnected,
                                     fmt::format("disk stream: ended in the middle of a round ({} records after the "
                                                 "last round's end)",
                                                 records_in_round_));
            co_return Result<void>{}; // the source ended the stream
        }
        if (ec)
            co_return make_error(Errc::disconnected, fmt::format("disk stream: {}", ec.message()));
        auto r = transport::decode_disk_record(h);
        if (!r)
            co_return r.error();
        records_in_round_ = r->kind == DiskRecordKind::round_end ? 0 : records_in_round_ + 1;
        auto applied = co_await apply(*r);
        if (!applied)
            co_return applied;
    }
}

} // namespace ferry::engine
