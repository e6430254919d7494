#include "block/qemu_block.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>

#include <optional>

namespace ferry::block {

namespace asio = boost::asio;
using json = nlohmann::json;

namespace {

// The image file a node reads (for a format node, its top image).
std::string file_of(const json& node) { return node.value("file", ""); }

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

} // namespace

asio::awaitable<Result<std::string>> QemuBlock::format_node(std::string path) {
    json flat{{"flat", true}};
    auto nodes = co_await qmp_->execute("query-named-block-nodes", flat);
    if (!nodes)
        co_return nodes.error().wrap(fmt::format("finding the block node of {}", path));
    // The format node is the one whose file is `path` and that no other
    // node with that file sits above: the protocol node's driver is file or
    // host_device, the format node's raw or qcow2.
    for (auto& n : *nodes) {
        auto drv = n.value("drv", "");
        if ((drv == "raw" || drv == "qcow2") && file_of(n) == path)
            co_return n.value("node-name", "");
    }
    co_return make_error(Errc::not_found, fmt::format("no block node of this QEMU reads {}", path));
}

asio::awaitable<Result<void>> QemuBlock::add_bitmap(std::string node, std::string name, std::uint32_t granularity) {
    json args{{"node", node}, {"name", name}, {"granularity", granularity}, {"persistent", false}};
    auto r = co_await qmp_->execute("block-dirty-bitmap-add", args);
    if (!r)
        co_return r.error().wrap(fmt::format("adding dirty bitmap {} to {}", name, node));
    co_return Result<void>{};
}

asio::awaitable<Result<void>> QemuBlock::rotate_bitmap(std::string node, std::string current, std::string next,
                                                       std::uint32_t granularity) {
    json add{{"type", "block-dirty-bitmap-add"},
             {"data", {{"node", node}, {"name", next}, {"granularity", granularity}, {"persistent", false}}}};
    json disable{{"type", "block-dirty-bitmap-disable"}, {"data", {{"node", node}, {"name", current}}}};
    json args{{"actions", json::array({add, disable})}};
    auto r = co_await qmp_->execute("transaction", args);
    if (!r)
        co_return r.error().wrap(fmt::format("starting dirty bitmap {} on {}", next, node));
    co_return Result<void>{};
}

asio::awaitable<Result<void>> QemuBlock::merge_bitmap(std::string node, std::string from, std::string into) {
    json args{{"node", node}, {"target", into}, {"bitmaps", json::array({from})}};
    auto r = co_await qmp_->execute("block-dirty-bitmap-merge", args);
    if (!r)
        co_return r.error().wrap(fmt::format("merging dirty bitmap {} into {} on {}", from, into, node));
    co_return Result<void>{};
}

asio::awaitable<Result<void>> QemuBlock::remove_bitmap(std::string node, std::string name) {
    json args{{"node", node}, {"name", name}};
    auto r = co_await qmp_->execute("block-dirty-bitmap-remove", args);
    if (!r)
        co_return r.error().wrap(fmt::format("removing dirty bitmap {} from {}", name, node));
    co_return Result<void>{};
}

asio::awaitable<Result<json>> QemuBlock::node_bitmaps(std::string node) {
    json flat{{"flat", true}};
    auto nodes = co_await qmp_->execute("query-named-block-nodes", flat);
    if (!nodes)
        co_return nodes.error().wrap(fmt::format("listing the dirty bitmaps of {}", node));
    json out = json::array();
    for (auto& n : *nodes) {
        auto bm = n.find("dirty-bitmaps");
        if (n.value("node-name", "") == node && bm != n.end() && bm->is_array())
            out.insert(out.end(), bm->begin(), bm->end());
    }
    co_return ok(std::move(out)); // json converts to anything: name the value
}

asio::awaitable<Result<std::vector<std::string>>> QemuBlock::bitmaps(std::string node) {
    auto list = co_await node_bitmaps(node);
    if (!list)
        co_return list.error();
    std::vector<std::string> out;
    for (auto& b : *list)
        out.push_back(b.value("name", ""));
    co_return out;
}

asio::awaitable<Result<std::uint64_t>> QemuBlock::bitmap_dirty_bytes(std::string node, std::string name) {
    auto list = co_await node_bitmaps(node);
    if (!list)
        co_return list.error();
    for (auto& b : *list) {
        std::uint64_t count = b.value("count", 0ULL);
        if (b.value("name", "") == name)
            co_return count;
    }
    co_return make_error(Errc::not_found, fmt::format("no dirty bitmap {} on {}", name, node));
}

asio::awaitable<Result<void>> QemuBlock::start_nbd(std::string socket) {
    // nbd-server-start takes the legacy socket address form.
    json args{{"addr", {{"type", "unix"}, {"data", {{"path", socket}}}}}};
    auto r = co_await qmp_->execute("nbd-server-start", args);
    if (!r)
        co_return r.error().wrap(fmt::format("starting QEMU's NBD server on {}", socket));
    co_return Result<void>{};
}

asio::awaitable<Result<void>> QemuBlock::stop_nbd() {
    auto r = co_await qmp_->execute("nbd-server-stop");
    if (!r)
        co_return r.error().wrap("stopping QEMU's NBD server");
    co_return Result<void>{};
}

asio::awaitable<Result<void>> QemuBlock::add_export(std::string name, std::string node, bool writable,
                                                    std::vector<std::string> bitmaps) {
    json args{{"type", "nbd"}, {"id", name}, {"node-name", node}, {"name", name}, {"writable", writable}};
    if (!bitmaps.empty())
        args["bitmaps"] = bitmaps;
    auto r = co_await qmp_->execute("block-export-add", args);
    if (!r)
        co_return r.error().wrap(fmt::format("exporting {} as {}", node, name));
    co_return Result<void>{};
}

asio::awaitable<Result<void>> QemuBlock::remove_export(std::string name) {
    // Hard: clients still connected are cut off.
    json args{{"id", name}, {"mode", "hard"}};
    auto r = co_await qmp_->execute("block-export-del", args);
    if (!r)
        co_return r.error().wrap(fmt::format("removing export {}", name));
    // An export with clients goes once they are cut off (BLOCK_EXPORT_DELETED);
    // until then its bitmaps stay busy.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (;;) {
        auto left = co_await exports();
        if (!left)
            co_return left.error();
        if (std::find(left->begin(), left->end(), name) == left->end())
            co_return Result<void>{};
        if (std::chrono::steady_clock::now() >= deadline)
            co_return make_error(Errc::timeout, fmt::format("export {} was still there 10 s after its removal", name));
        boost::asio::steady_timer t(co_await boost::asio::this_coro::executor, std::chrono::milliseconds(10));
        co_await t.async_wait(boost::asio::use_awaitable);
    }
}

asio::awaitable<Result<std::vector<std::string>>> QemuBlock::exports() {
    auto r = co_await qmp_->execute("query-block-exports");
    if (!r)
        co_return r.error().wrap("listing exports");
    std::vector<std::string> out;
    for (auto& e : *r)
        out.push_back(e.value("id", ""));
    co_return out;
}

namespace {

// block_set_io_throttle's arguments, as query-block names them too.
constexpr const char* limit_keys[] = {
    "bps",         "bps_rd",         "bps_wr",         "iops",           "iops_rd",           "iops_wr",
    "bps_max",     "bps_rd_max",     "bps_wr_max",     "iops_max",       "iops_rd_max",       "iops_wr_max",
    "bps_max_length", "bps_rd_max_length", "bps_wr_max_length", "iops_max_length", "iops_rd_max_length",
    "iops_wr_max_length", "iops_size", "group"};

json limits_of(const json& inserted) {
    json out = json::object();
    for (auto key : limit_keys)
        if (auto it = inserted.find(key); it != inserted.end())
            out[key] = *it;
    for (auto key : {"bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"})
        if (!out.contains(key))
            out[key] = 0;
    return out;
}

} // namespace

asio::awaitable<Result<QemuBlock::IoLimits>> QemuBlock::io_limits(std::string node) {
    auto block = co_await qmp_->execute("query-block");
    if (!block)
        co_return block.error().wrap(fmt::format("reading the I/O limits of {}", node));
    for (auto& dev : *block) {
        auto inserted = dev.find("inserted");
        if (inserted == dev.end() || inserted->value("node-name", "") != node)
            continue;
        auto qdev = dev.value("qdev", "");
        if (qdev.empty())
            co_return make_error(Errc::not_found, fmt::format("block node {} belongs to no device", node));
        co_return IoLimits{qdev, limits_of(*inserted)};
    }
    co_return make_error(Errc::not_found, fmt::format("no device of this QEMU reads block node {}", node));
}

asio::awaitable<Result<void>> QemuBlock::set_io_limits(std::string device, json limits) {
    limits["id"] = device;
    auto r = co_await qmp_->execute("block_set_io_throttle", limits);
    if (!r)
        co_return r.error().wrap(fmt::format("setting the I/O limits of {}", device));
    co_return Result<void>{};
}

json QemuBlock::cap_writes(const json& limits, std::uint64_t bytes_per_second, const std::string& group) {
    json out = limits;
    auto capped = [&](const char* key) {
        auto now = out.value(key, std::uint64_t{0});
        out[key] = now == 0 ? bytes_per_second : std::min(now, bytes_per_second);
    };
    // A total limit excludes a write limit: the total is capped instead.
    capped(out.value("bps", std::uint64_t{0}) != 0 ? "bps" : "bps_wr");
    out["group"] = group;
    return out;
}

asio::awaitable<Result<std::string>> QemuBlock::sweep(std::string prefix, bool stop_server) {
    // Everything it can, then the first failure if there was one.
    std::vector<std::string> removed;
    std::optional<Error> failed;
    auto note = [&](const Result<void>& r, std::string what) {
        if (r)
            removed.push_back(std::move(what));
        else if (!failed)
            failed = r.error();
    };
    auto ex = co_await exports();
    if (ex) {
        for (auto& name : *ex) {
            if (!starts_with(name, prefix))
                continue;
            auto r = co_await remove_export(name);
            note(r, "export " + name);
        }
    } else {
        failed = ex.error();
    }
    json flat{{"flat", true}};
    auto nodes = co_await qmp_->execute("query-named-block-nodes", flat);
    if (nodes) {
        for (auto& n : *nodes) {
            auto bm = n.find("dirty-bitmaps");
            if (bm == n.end() || !bm->is_array())
                continue;
            for (auto& b : *bm) {
                auto name = b.value("name", "");
                if (!starts_with(name, prefix))
                    continue;
                auto r = co_await remove_bitmap(n.value("node-name", ""), name);
                note(r, "bitmap " + name);
            }
        }
    } else if (!failed) {
        failed = nodes.error().wrap("sweeping dirty bitmaps");
    }
    auto block = co_await qmp_->execute("query-block");
    if (block) {
        for (auto& dev : *block) {
            auto inserted = dev.find("inserted");
            if (inserted == dev.end() || !starts_with(inserted->value("group", ""), prefix))
                continue;
            // What the cap replaced is not known here: the write limit goes.
            auto qdev = dev.value("qdev", "");
            auto limits = limits_of(*inserted);
            limits["bps_wr"] = 0;
            limits.erase("bps_wr_max");
            limits.erase("bps_wr_max_length");
            limits["group"] = qdev;
            auto r = co_await set_io_limits(qdev, limits);
            note(r, "write throttle of " + qdev);
        }
    } else if (!failed) {
        failed = block.error().wrap("sweeping throttles");
    }
    if (stop_server) {
        auto r = co_await stop_nbd();
        if (r || r.error().message.find("not running") == std::string::npos)
            note(r, "NBD server");
    }
    if (failed)
        co_return failed->wrap(fmt::format("sweeping {}* (removed: {})", prefix,
                                           removed.empty() ? "nothing" : fmt::format("{}", fmt::join(removed, ", "))));
    co_return fmt::format("{}", fmt::join(removed, ", "));
}

} // namespace ferry::block
