#include "config/vm_spec.hpp"

#include "config/quantity.hpp"
#include "config/reader.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace ferry::config {

bool valid_vm_name(std::string_view name) {
    if (name.empty() || name.size() > 63)
        return false;
    auto alnum = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); };
    for (char c : name)
        if (!alnum(c) && c != '-')
            return false;
    return alnum(name.front()) && alnum(name.back());
}

bool valid_qemu_name(std::string_view name) {
    if (name.empty() || name.size() > 128)
        return false;
    for (char c : name)
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
              c == '-'))
            return false;
    return true;
}

namespace {

// What is wrong with a machine type or CPU model name, or "": a name only,
// so no options or CPU features reach QEMU's -machine or -cpu through it.
std::string qemu_name_problem(std::string_view key, const std::string& value) {
    if (valid_qemu_name(value))
        return {};
    return fmt::format("\"{}\" is not a {} name (1-128 of A-Z, a-z, 0-9, '.', '_' and '-'; no options{})", value,
                       key == "machine" ? "machine type" : "CPU model", key == "machine" ? "" : " or features");
}

void read_disk(const toml::table& t, Problems& p, std::size_t i, DiskSpec& d) {
    TableReader r(t, p, fmt::format("disks[{}]", i));
    r.get_required("path", d.path);
    r.get("format", d.format);
    r.get("shared", d.shared);
    r.get("readonly", d.readonly);
    r.get("bus", d.bus);
    if (d.bus != "virtio" && d.bus != "ide")
        p.add(t.get("bus")->source(), fmt::format("key 'disks[{}].bus': \"{}\" is not virtio or ide", i, d.bus));
    if (d.format != "raw" && d.format != "qcow2")
        p.add(t.get("format")->source(),
              fmt::format("key 'disks[{}].format': \"{}\" is not raw or qcow2", i, d.format));
    if (d.path.find(',') != std::string::npos)
        p.add(t.get("path")->source(),
              fmt::format("key 'disks[{}].path': commas are not allowed in disk paths", i));
    // Relative to what? ferryd's working directory is no answer a restart keeps.
    if (!d.path.empty() && d.path.front() != '/')
        p.add(t.get("path")->source(), fmt::format("key 'disks[{}].path': \"{}\" must be an absolute path", i, d.path));
    r.finish();
}

// Options ferry sets itself or that would take the QEMU process out of its
// hands: a second -qmp, -daemonize (an untracked process), -incoming, ...
constexpr std::string_view owned_options[] = {
    "daemonize", "pidfile", "qmp", "qmp-pretty", "monitor", "mon", "incoming", "S", "serial",
    "name", "machine", "M", "m", "smp", "cpu", "kernel", "initrd", "append", "nodefaults",
    "no-user-config", "runas", "chroot", "D", "writeconfig", "readconfig", "preconfig", "loadvm",
    "no-shutdown", "no-reboot", "drive", "hda", "hdb", "hdc", "hdd", "cdrom", "blockdev", "fda", "fdb"};

std::string_view owned_option(std::string_view arg) {
    if (arg.size() < 2 || arg[0] != '-')
        return {};
    arg.remove_prefix(arg[1] == '-' ? 2 : 1); // QEMU takes -opt and --opt alike
    for (auto o : owned_options)
        if (arg == o)
            return o;
    return {};
}

void check_extra_args(const toml::table& root, Problems& p, const std::vector<std::string>& args) {
    auto* arr = root.get("extra_args") ? root.get("extra_args")->as_array() : nullptr;
    for (std::size_t i = 0; i < args.size(); ++i) {
        auto o = owned_option(args[i]);
        if (o.empty())
            continue;
        auto* item = arr && i < arr->size() ? arr->get(i) : nullptr;
        auto message = fmt::format("key 'extra_args[{}]': \"{}\" is not allowed: ferry sets -{} itself or must "
                                   "own what it controls (use the spec's keys: memory, cpus, kernel, disks, ...)",
                                   i, args[i], o);
        item ? p.add(item->source(), message) : p.add(message);
    }
}

Result<VmSpec> read(const toml::table& root, const std::string& file) {
    Problems p(file);
    VmSpec s;
    TableReader r(root, p, "");
    if (r.require("name")) {
        r.get("name", s.name);
        if (root.get("name")->is_string() && !valid_vm_name(s.name))
            p.add(root.get("name")->source(),
                  fmt::format("key 'name': \"{}\" is not a valid VM name (1-63 characters of "
                              "a-z, 0-9 and '-', starting and ending with a letter or digit)",
                              s.name));
    }
    if (r.require("memory")) {
        auto before = p.size();
        r.get_quantity("memory", s.memory);
        auto* n = root.get("memory");
        // A value that did not read has said why: no second message about it.
        if (p.size() == before && (s.memory % (1 << 20) != 0 || s.memory < (16ULL << 20)))
            p.add(n->source(), fmt::format("key 'memory': {} bytes is not a whole number of MiB "
                                           "of at least 16Mi",
                                           s.memory));
    }
    r.get("cpus", s.cpus, 1, 255);
    r.get("cpu_model", s.cpu_model);
    r.get("machine", s.machine);
    for (auto [key, value] : {std::pair{"cpu_model", &s.cpu_model}, std::pair{"machine", &s.machine}})
        if (auto* n = root.get(key); n && n->is_string())
            if (auto why = qemu_name_problem(key, *value); !why.empty())
                p.add(n->source(), fmt::format("key '{}': {}", key, why));
    r.get("kernel", s.kernel);
    r.get("initrd", s.initrd);
    for (auto [key, value] : {std::pair{"kernel", &s.kernel}, std::pair{"initrd", &s.initrd}})
        if (*value && (*value)->substr(0, 1) != "/")
            p.add(root.get(key)->source(), fmt::format("key '{}': \"{}\" must be an absolute path", key, **value));
    r.get("append", s.append);
    r.get_labels("labels", s.labels);
    r.get_labels("node_selector", s.node_selector);
    r.get("extra_args", s.extra_args);
    check_extra_args(root, p, s.extra_args);
    s.source = file;
    for (auto key : {"kernel", "initrd"})
        if (auto* n = root.get(key))
            s.lines[key] = n->source().begin.line;
    auto* disks = r.tables("disks", [&](const toml::table& t, std::size_t i) {
        DiskSpec d;
        read_disk(t, p, i, d);
        if (auto* n = t.get("path"))
            s.lines[fmt::format("disks[{}].path", i)] = n->source().begin.line;
        s.disks.push_back(d);
    });
    auto ide = std::count_if(s.disks.begin(), s.disks.end(), [](const DiskSpec& d) { return d.bus == "ide"; });
    if (ide > 4 && disks)
        p.add(disks->source(), fmt::format("key 'disks': {} ide disks, the machine has 4 IDE slots", ide));
    if ((s.initrd || s.append) && !s.kernel)
        p.add("'initrd' and 'append' need 'kernel'");
    r.finish();
    if (!p.empty())
        return p.error();
    return s;
}

} // namespace

Result<VmSpec> load_vm_spec(const std::string& path) {
    auto table = parse_toml_file(path);
    if (!table)
        return table.error();
    return read(*table, path);
}

Result<VmSpec> parse_vm_spec(std::string_view text, const std::string& name) {
    auto table = parse_toml_string(text, name);
    if (!table)
        return table.error();
    return read(*table, name);
}

std::string VmSpec::where(const std::string& key) const {
    if (source.empty())
        return fmt::format("spec key '{}'", key);
    auto it = lines.find(key);
    if (it == lines.end())
        return fmt::format("{}: key '{}'", source, key);
    return fmt::format("{}:{}: key '{}'", source, it->second, key);
}

Result<void> validate_vm_spec(const VmSpec& s) {
    auto bad = [&](std::string what) {
        return make_error(Errc::invalid_argument, fmt::format("VM spec {}: {}", s.name, what));
    };
    if (!valid_vm_name(s.name))
        return bad("the name is not a valid VM name");
    if (s.memory % (1 << 20) != 0 || s.memory < (16ULL << 20))
        return bad(fmt::format("memory {} is not a whole number of MiB of at least 16Mi", s.memory));
    if (s.cpus < 1 || s.cpus > 255)
        return bad(fmt::format("cpus {} is out of range [1, 255]", s.cpus));
    for (auto [key, value] : {std::pair{"cpu_model", &s.cpu_model}, std::pair{"machine", &s.machine}})
        if (auto why = qemu_name_problem(key, *value); !why.empty())
            return bad(fmt::format("{} {}", key, why));
    for (auto [key, labels] : {std::pair{"labels", &s.labels}, std::pair{"node_selector", &s.node_selector}})
        for (auto& [k, v] : *labels)
            if (auto why = label_problem(k, v); !why.empty())
                return bad(fmt::format("{}: {}", key, why));
    for (std::size_t i = 0; i < s.extra_args.size(); ++i)
        if (auto o = owned_option(s.extra_args[i]); !o.empty())
            return bad(fmt::format("extra_args[{}] \"{}\" is not allowed", i, s.extra_args[i]));
    for (auto [key, value] : {std::pair{"kernel", &s.kernel}, std::pair{"initrd", &s.initrd}})
        if (*value && (*value)->substr(0, 1) != "/")
            return bad(fmt::format("{} \"{}\" is not an absolute path", key, **value));
    for (std::size_t i = 0; i < s.disks.size(); ++i) {
        auto& d = s.disks[i];
        if (!d.path.empty() && d.path.front() != '/')
            return bad(fmt::format("disks[{}].path \"{}\" is not an absolute path", i, d.path));
        if ((d.format != "raw" && d.format != "qcow2") || d.path.empty() || d.path.find(',') != std::string::npos)
            return bad(fmt::format("disks[{}] is not a raw or qcow2 disk with a path free of commas", i));
        if (d.bus != "virtio" && d.bus != "ide")
            return bad(fmt::format("disks[{}].bus \"{}\" is not virtio or ide", i, d.bus));
    }
    auto ide = std::count_if(s.disks.begin(), s.disks.end(), [](const DiskSpec& d) { return d.bus == "ide"; });
    if (ide > 4)
        return bad(fmt::format("{} ide disks: the machine has 4 IDE slots", ide));
    return {};
}

void to_json(nlohmann::json& j, const DiskSpec& d) {
    j = {{"path", d.path}, {"format", d.format}, {"shared", d.shared}, {"readonly", d.readonly}, {"bus", d.bus}};
}

void from_json(const nlohmann::json& j, DiskSpec& d) {
    j.at("path").get_to(d.path);
    d.format = j.value("format", "raw");
    d.shared = j.value("shared", true);
    d.readonly = j.value("readonly", false);
    d.bus = j.value("bus", "virtio");
}

void to_json(nlohmann::json& j, const VmSpec& s) {
    j = {{"name", s.name},
         {"memory", s.memory},
         {"cpus", s.cpus},
         {"cpu_model", s.cpu_model},
         {"machine", s.machine},
         {"labels", s.labels},
         {"node_selector", s.node_selector},
         {"disks", s.disks},
         {"extra_args", s.extra_args}};
    if (s.kernel)
        j["kernel"] = *s.kernel;
    if (s.initrd)
        j["initrd"] = *s.initrd;
    if (s.append)
        j["append"] = *s.append;
}

void from_json(const nlohmann::json& j, VmSpec& s) {
    j.at("name").get_to(s.name);
    j.at("memory").get_to(s.memory);
    s.cpus = j.value("cpus", 1);
    s.cpu_model = j.value("cpu_model", "qemu64");
    s.machine = j.value("machine", "pc");
    if (j.contains("kernel"))
        s.kernel = j["kernel"].get<std::string>();
    if (j.contains("initrd"))
        s.initrd = j["initrd"].get<std::string>();
    if (j.contains("append"))
        s.append = j["append"].get<std::string>();
    s.labels = j.value("labels", std::map<std::string, std::string>{});
    s.node_selector = j.value("node_selector", std::map<std::string, std::string>{});
    s.disks = j.value("disks", std::vector<DiskSpec>{});
    s.extra_args = j.value("extra_args", std::vector<std::string>{});
}

} // namespace ferry::config
