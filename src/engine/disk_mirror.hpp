#pragma once
// Block mirroring, both ends of one disk stream. The source copies a VM's
// non-shared disks in rounds: the first round everything allocated, each
// later round what the guest wrote since the previous one, as QEMU's dirty
// bitmaps recorded it (one bitmap per round, switched atomically). The
// target writes what arrives and acknowledges each round once it is on
// stable storage. The stream is a local socket: the engine tunnels it over a
// peer data channel, shaped together with the RAM stream.
#include "block/image.hpp"
#include "engine/disk_plan.hpp"
#include "block/nbd.hpp"
#include "block/qemu_block.hpp"
#include "block/ring.hpp"
#include "transport/disk_record.hpp"

#include <boost/asio/awaitable.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ferry::engine {

using DiskStream = boost::asio::local::stream_protocol::socket;

struct DiskTotals {
    std::uint64_t data_bytes = 0; // sent as data
    std::uint64_t zero_bytes = 0; // sent as zero records (holes, zero blocks)
};

struct DiskRoundStats {
    std::uint32_t round = 0;
    std::uint64_t data_bytes = 0;
    std::uint64_t zero_bytes = 0;
    std::chrono::milliseconds took{0};
};

class DiskSender {
public:
    // `prefix` names everything made in the source QEMU ("ferry-<id>");
    // `nbd_socket` is where its private NBD server listens.
    DiskSender(std::shared_ptr<qmp::Client> qmp, std::string prefix, std::string nbd_socket,
               std::vector<MirrorDisk> disks, DiskStream stream);
    ~DiskSender();

    // Starts QEMU's NBD server and a recording bitmap on every disk: each
    // write from now on lands in the next round.
    boost::asio::awaitable<Result<void>> start();
    // Copies one round and returns once the target has it on stable storage.
    boost::asio::awaitable<Result<DiskRoundStats>> round();
    // Bytes the guest has dirtied since the current round's bitmap started.
    boost::asio::awaitable<Result<std::uint64_t>> dirty_bytes();
    // Every round the target needs is done: tells it so (the end record;
    // a stream that stops without it is a broken one).
    boost::asio::awaitable<Result<void>> end_stream();
    // Ends the stream (without end_stream(), the target sees it cut) and
    // removes the bitmaps, exports and NBD server; safe to call more than
    // once.
    boost::asio::awaitable<void> finish();
    // Cuts the stream both ways: a round under way fails at once (abort).
    void abort();

    // A new stream to the same receiver after this one broke, or why there
    // is none. Without one, a broken stream fails the round.
    using Reconnect = std::function<boost::asio::awaitable<Result<DiskStream>>()>;
    void set_reconnect(Reconnect reconnect) { reconnect_ = std::move(reconnect); }
    // Begins each log line ("migration <id>").
    void set_label(std::string label) { label_ = std::move(label); }

    const std::vector<DiskTotals>& totals() const { return totals_; }
    std::uint32_t rounds() const { return round_; }
    // The round under way: bytes it covers and how many of them have gone
    // (data and zero records). Empty between rounds.
    struct RoundProgress {
        std::uint32_t round = 0;
        std::uint64_t done = 0;
        std::uint64_t total = 0;
    };
    std::optional<RoundProgress> round_progress() const;
    // Times a broken stream was replaced and the round went on, and the
    // bytes sent again because the target did not have them.
    std::uint32_t resumes() const { return resumes_; }
    std::uint64_t resent_bytes() const { return resent_bytes_; }

    struct Work; // one round's shared state
    std::shared_ptr<Work> current_; // the round under way

private:
    std::string bitmap(std::size_t disk, std::uint32_t round) const;
    std::string export_name(std::size_t disk, std::uint32_t round) const;
    // The extents one disk needs this round, and a reader for its data.
    boost::asio::awaitable<Result<void>> plan_disk(std::size_t d, Work& work);
    static boost::asio::awaitable<void> copy_worker(DiskSender* self, std::shared_ptr<Work> work, std::size_t slot);
    // Sends one record whole; its seq.
    boost::asio::awaitable<Result<std::uint64_t>> send(const transport::DiskRecord& record,
                                                       std::span<const std::byte> payload);
    // Copies what the round still has to copy, then ends it.
    boost::asio::awaitable<Result<void>> copy(std::shared_ptr<Work> work);
    boost::asio::awaitable<Result<void>> end_round(Work& work);
    // The stream broke: a new one, and the round's records the target does
    // not have are what is left to send. False: the round is complete.
    boost::asio::awaitable<Result<bool>> resume(Work& work, const Error& why);
    boost::asio::awaitable<Result<transport::DiskRecord>> read_reply(std::chrono::seconds timeout,
                                                                    const char* waiting_for);
    // Closes the round's exports and removes its frozen bitmaps; a failed
    // round's go back into the recording ones first.
    boost::asio::awaitable<void> drop_round_exports(Work& work, bool failed);

    block::QemuBlock qemu_;
    std::string prefix_;
    std::string nbd_socket_;
    std::vector<MirrorDisk> disks_;
    DiskStream stream_;
    block::BufferPool pool_; // before ring_: it must outlive the ring
    std::shared_ptr<block::Ring> ring_;
    std::vector<std::optional<block::Image>> raw_; // raw disks read directly
    std::vector<DiskTotals> totals_;
    bool registered_ = false;
    std::uint32_t round_ = 0;            // rounds run (a failed one's number is used too)
    std::vector<std::uint32_t> recording_; // per disk: the round whose bitmap records now
    bool base_copied_ = false;           // a round has copied everything allocated
    bool broken_ = false;                // a write or the ack failed: the stream is unusable
    bool aborted_ = false;               // abort(): nothing resumes
    Reconnect reconnect_;
    std::string label_ = "disk mirror";
    std::uint32_t resumes_ = 0;
    std::uint64_t resent_bytes_ = 0;
    std::uint64_t seq_ = 0;
    bool writing_ = false;
    boost::asio::steady_timer write_done_;
    bool started_ = false;
    bool finished_ = false;
};

// Where the target writes a qcow2 disk: a writable NBD export of the
// destination QEMU (raw disks are written directly).
struct NbdTarget {
    std::string socket;
    std::string export_name;
};

class DiskReceiver {
public:
    // disks[i].path is the target image; nbd[i] is set for qcow2 disks.
    DiskReceiver(std::vector<MirrorDisk> disks, std::vector<std::optional<NbdTarget>> nbd, DiskStream stream);
    // Opens the targets, then writes what arrives (several writes in
    // flight, all of a round done and flushed before its ack) until the
    // source ends the stream (Ok) or it breaks or lies (an error naming the
    // record). Data records carry at most 1 MiB.
    boost::asio::awaitable<Result<void>> run();
    // Cuts the stream (an abort): run() ends with an error.
    void close();
    // A stream that breaks before the source's end record waits this long
    // for the source to come back (replace_stream); 0: it fails at once.
    void allow_resume(std::chrono::milliseconds grace) { grace_ = grace; }
    // The source's new stream: the current one is dropped (if it has not
    // noticed its break yet), what arrived on it is written, and the source
    // hears the last record this side has.
    void replace_stream(DiskStream stream);
    // Begins each log line ("migration <id>").
    void set_label(std::string label) { label_ = std::move(label); }
    const std::vector<DiskTotals>& totals() const { return totals_; }
    std::uint32_t rounds() const { return rounds_; }

private:
    boost::asio::awaitable<Result<void>> open();
    boost::asio::awaitable<Result<void>> receive();
    // Reads one stream until the source's end record (Ok) or an error;
    // stream_broke_ tells a broken stream from a bad record.
    boost::asio::awaitable<Result<void>> receive_stream();
    boost::asio::awaitable<Result<void>> apply(const transport::DiskRecord& r);
    boost::asio::awaitable<std::size_t> take_slot();
    static boost::asio::awaitable<void> write_slot(DiskReceiver* self, std::size_t slot, std::size_t d,
                                                   transport::DiskRecord r);
    // Waits for every write in flight; the first that failed, if any.
    boost::asio::awaitable<Result<void>> drain();
    boost::asio::awaitable<Result<void>> flush_all();

    std::vector<MirrorDisk> disks_;
    std::vector<std::optional<NbdTarget>> nbd_targets_;
    DiskStream stream_;
    block::BufferPool pool_; // before ring_: it must outlive the ring
    std::shared_ptr<block::Ring> ring_;
    std::vector<std::optional<block::Image>> raw_;
    std::vector<std::shared_ptr<block::NbdClient>> nbd_;
    std::vector<DiskTotals> totals_;
    bool registered_ = false;
    std::uint32_t rounds_ = 0;
    std::vector<bool> busy_; // slots with a write in flight
    int in_flight_ = 0;
    std::uint64_t last_seq_ = 0;         // the last record taken whole
    bool stream_broke_ = false;
    bool closed_ = false;
    std::chrono::milliseconds grace_{0};
    std::string label_ = "disk mirror";
    std::optional<DiskStream> next_stream_;
    boost::asio::steady_timer stream_ready_;
    std::optional<Error> write_error_;
    boost::asio::steady_timer slot_free_;
};

} // namespace ferry::engine
