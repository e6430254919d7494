// Unit tests of src/config: quantities, ferryd.toml, VM specs.
#include "config/node_config.hpp"
#include "config/quantity.hpp"
#include "config/vm_spec.hpp"
#include "support.hpp"

#include <gtest/gtest.h>

using namespace ferry::config;

TEST(Quantity, ParsesBinaryDecimalAndPlain) {
    EXPECT_EQ(*parse_quantity("64Mi"), 64ULL << 20);
    EXPECT_EQ(*parse_quantity("1Gi"), 1ULL << 30);
    EXPECT_EQ(*parse_quantity("500M"), 500'000'000ULL);
    EXPECT_EQ(*parse_quantity("4096"), 4096ULL);
    EXPECT_EQ(*parse_quantity("1.5Gi"), 3ULL << 29);
    EXPECT_EQ(*parse_quantity("2k"), 2000ULL);
    EXPECT_EQ(*parse_quantity("0"), 0ULL);
}

TEST(Quantity, RejectsBadInputWithTheText) {
    for (const char* bad : {"", "Mi", "64MB", "1..5Gi", "-5", "1.5", "0.3Ki", "99999999999999999999",
                            "20000000Ti"}) {
        auto r = parse_quantity(bad);
        ASSERT_FALSE(r) << bad;
        EXPECT_NE(r.error().message.find(std::string("\"") + bad + "\""), std::string::npos)
            << r.error().message;
    }
}

TEST(Quantity, FormatsExactBinaryForms) {
    EXPECT_EQ(format_quantity(64ULL << 20), "64Mi");
    EXPECT_EQ(format_quantity(1000), "1000");
    EXPECT_EQ(format_quantity(0), "0");
}

TEST(NodeConfig, DefaultsFollowKubeVirt) {
    auto c = parse_node_config("[node]\nname = \"a\"\n", "f.toml");
    ASSERT_TRUE(c) << c.error().message;
    EXPECT_EQ(c->migration.parallel_migrations_per_cluster, 5);
    EXPECT_EQ(c->migration.parallel_outbound_migrations_per_node, 2);
    EXPECT_EQ(c->migration.parallel_inbound_migrations_per_node, 2);
    EXPECT_TRUE(c->node.labels.empty());
    EXPECT_TRUE(c->policies.empty());
    EXPECT_EQ(c->migration.bandwidth_per_migration, 64ULL << 20);
    EXPECT_EQ(c->migration.completion_timeout_per_gib, 800);
    EXPECT_EQ(c->migration.progress_timeout, 150);
    EXPECT_FALSE(c->migration.allow_auto_converge);
    EXPECT_FALSE(c->migration.allow_post_copy);
    EXPECT_FALSE(c->migration.disable_tls);
    EXPECT_EQ(c->migration.peer_timeout, 30);
    EXPECT_EQ(c->node.control_socket, "/run/ferry/ferryd.sock");
    EXPECT_EQ(c->node.log_level, "info");
}

TEST(NodeConfig, ReadsEverySection) {
    auto c = parse_node_config(R"(
[node]
name = "node-a"
state_dir = "/s"
control_socket = "/c.sock"
listen = "0.0.0.0:7410"
max_migration_bandwidth = "1Gi"
qemu = "/usr/bin/qemu-system-x86_64"
log_level = "debug"
[tls]
ca = "ca.pem"
cert = "a.pem"
key = "a-key.pem"
[migration]
bandwidth_per_migration = 0
allow_auto_converge = true
multifd_channels = 4
[[peers]]
name = "node-b"
address = "10.0.0.2:7410"
)", "ferryd.toml");
    ASSERT_TRUE(c) << c.error().message;
    EXPECT_EQ(c->node.max_migration_bandwidth, 1ULL << 30);
    EXPECT_EQ(c->migration.bandwidth_per_migration, 0ULL);
    EXPECT_TRUE(c->migration.allow_auto_converge);
    EXPECT_EQ(c->migration.multifd_channels, 4);
    ASSERT_EQ(c->peers.size(), 1U);
    EXPECT_EQ(c->peers[0].address, "10.0.0.2:7410");
    EXPECT_EQ(c->tls.key, "a-key.pem");
}

TEST(NodeConfig, ErrorsNameFileLineAndKey) {
    auto c = parse_node_config(R"([node]
name = "a"
bogus = 1
[migration]
progress_timeout = "soon"
bandwidth_per_migration = "64MB"
)", "ferryd.toml");
    ASSERT_FALSE(c);
    auto msg = c.error().message;
    EXPECT_NE(msg.find("ferryd.toml:3: unknown key 'node.bogus'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("ferryd.toml:5: key 'migration.progress_timeout': expected an integer, got a string"),
              std::string::npos) << msg;
    EXPECT_NE(msg.find("ferryd.toml:6: key 'migration.bandwidth_per_migration': bad quantity \"64MB\""),
              std::string::npos) << msg;
}

TEST(NodeConfig, HooksTakeAnAbsoluteDirAndATimeoutInRange) {
    auto c = parse_node_config("[node]\nname = \"a\"\n[hooks]\ndir = \"/etc/ferry/hooks.d\"\ntimeout = 5\n"
                               "announce_self = false\n",
                               "f.toml");
    ASSERT_TRUE(c) << c.error().message;
    EXPECT_EQ(c->hooks.dir, "/etc/ferry/hooks.d");
    EXPECT_EQ(c->hooks.timeout, 5);
    EXPECT_FALSE(c->hooks.announce_self);
    auto defaults = parse_node_config("[node]\nname = \"a\"\n", "f.toml");
    ASSERT_TRUE(defaults);
    EXPECT_TRUE(defaults->hooks.dir.empty());
    EXPECT_EQ(defaults->hooks.timeout, 30);
    EXPECT_TRUE(defaults->hooks.announce_self);
    auto bad = parse_node_config("[node]\nname = \"a\"\n[hooks]\ndir = \"hooks.d\"\ntimeout = 0\nrun = 1\n", "f.toml");
    ASSERT_FALSE(bad);
    auto msg = bad.error().message;
    EXPECT_NE(msg.find("f.toml:4: key 'hooks.dir': \"hooks.d\" is not an absolute path"), std::string::npos) << msg;
    EXPECT_NE(msg.find("f.toml:5: key 'hooks.timeout': 0 is out of range"), std::string::npos) << msg;
    EXPECT_NE(msg.find("f.toml:6: unknown key 'hooks.run'"), std::string::npos) << msg;
}

TEST(NodeConfig, MissingNameAndSyntaxErrors) {
    auto missing = parse_node_config("[node]\nstate_dir = \"/x\"\n", "f.toml");
    ASSERT_FALSE(missing);
    EXPECT_NE(missing.error().message.find("missing required key 'node.name'"), std::string::npos);
    auto syntax = parse_node_config("[node\nname = 1\n", "f.toml");
    ASSERT_FALSE(syntax);
    EXPECT_EQ(syntax.error().message.rfind("f.toml:1:", 0), 0U) << syntax.error().message;
    auto range = parse_node_config("[node]\nname=\"a\"\n[migration]\nparallel_migrations_per_cluster = 0\n", "f.toml");
    ASSERT_FALSE(range);
    EXPECT_NE(range.error().message.find("f.toml:4: key 'migration.parallel_migrations_per_cluster': 0 is out of range"),
              std::string::npos) << range.error().message;
}

TEST(NodeConfig, LoadsFromFileAndReportsMissingFile) {
    ferry::test::TempDir dir;
    auto missing = load_node_config(dir / "nope.toml");
    ASSERT_FALSE(missing);
    EXPECT_NE(missing.error().message.find("nope.toml: no such file"), std::string::npos);
    ferry::test::write_file(dir / "f.toml", "[node]\nname = \"x\"\nlog_level = \"loud\"\n");
    auto bad = load_node_config(dir / "f.toml");
    ASSERT_FALSE(bad);
    EXPECT_NE(bad.error().message.find("f.toml:3: key 'node.log_level'"), std::string::npos) << bad.error().message;
}

TEST(VmSpec, ParsesTheDesignExample) {
    auto s = parse_vm_spec(R"(
name = "web-1"
memory = "1Gi"
cpus = 2
cpu_model = "qemu64"
kernel = "/path/bzImage"
append = "console=ttyS0"
labels = { app = "web" }
node_selector = { zone = "a" }
extra_args = ["-device", "virtio-rng-pci"]
[[disks]]
path = "/var/lib/images/web-1.raw"
format = "raw"
shared = true
[[disks]]
path = "/var/lib/images/legacy.raw"
bus = "ide"
)", "vm.toml");
    ASSERT_TRUE(s) << s.error().message;
    EXPECT_EQ(s->memory, 1ULL << 30);
    EXPECT_EQ(s->cpus, 2);
    EXPECT_EQ(s->labels.at("app"), "web");
    EXPECT_EQ(s->node_selector.at("zone"), "a");
    ASSERT_EQ(s->disks.size(), 2U);
    EXPECT_TRUE(s->disks[0].shared);
    EXPECT_EQ(s->disks[0].bus, "virtio");
    EXPECT_EQ(s->disks[1].bus, "ide");
    EXPECT_EQ(s->extra_args.size(), 2U);
    // JSON round trip (VM records)
    nlohmann::json j = *s;
    auto back = j.get<VmSpec>();
    EXPECT_EQ(back.memory, s->memory);
    EXPECT_EQ(back.disks[0].path, s->disks[0].path);
    EXPECT_EQ(back.disks[1].bus, "ide");
    EXPECT_EQ(*back.append, "console=ttyS0");
}

TEST(VmSpec, ErrorsNameLineAndKey) {
    auto s = parse_vm_spec(R"(name = "Web_1"
memory = "1000Ki"
cpus = "two"
[[disks]]
format = "vmdk"
colour = "red"
bus = "scsi"
)", "vm.toml");
    ASSERT_FALSE(s);
    auto msg = s.error().message;
    EXPECT_NE(msg.find("vm.toml:1: key 'name': \"Web_1\" is not a valid VM name"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vm.toml:2: key 'memory'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vm.toml:3: key 'cpus': expected an integer"), std::string::npos) << msg;
    EXPECT_NE(msg.find("missing required key 'disks[0].path'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vm.toml:5: key 'disks[0].format': \"vmdk\" is not raw or qcow2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vm.toml:6: unknown key 'disks[0].colour'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vm.toml:7: key 'disks[0].bus': \"scsi\" is not virtio or ide"), std::string::npos) << msg;
}

// Relative to ferryd's working directory, a path would not survive a restart
// from another one: kernel, initrd and disk paths are absolute.
TEST(VmSpec, AMemoryThatDoesNotReadSaysSoOnce) {
    auto s = parse_vm_spec("name = \"demo\"\nmemory = \"16Ei\"\n", "vm.toml");
    ASSERT_FALSE(s);
    auto msg = s.error().message;
    EXPECT_NE(msg.find("vm.toml:2: key 'memory': bad quantity \"16Ei\""), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "one problem, one line: " << msg;
}

TEST(VmSpec, PathsMustBeAbsolute) {
    auto s = parse_vm_spec(R"(name = "web-1"
memory = "64Mi"
kernel = "bzImage"
initrd = "./initrd.img"
[[disks]]
path = "images/web-1.raw"
)", "vm.toml");
    ASSERT_FALSE(s);
    auto msg = s.error().message;
    EXPECT_NE(msg.find("vm.toml:3: key 'kernel': \"bzImage\" must be an absolute path"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vm.toml:4: key 'initrd': \"./initrd.img\" must be an absolute path"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vm.toml:6: key 'disks[0].path': \"images/web-1.raw\" must be an absolute path"),
              std::string::npos)
        << msg;
    auto ok = parse_vm_spec("name = \"web-1\"\nmemory = \"64Mi\"\nkernel = \"/boot/vmlinuz\"\n", "vm.toml");
    ASSERT_TRUE(ok) << ok.error().message;
    // The same from JSON (a spec sent over the control socket).
    auto relative = *ok;
    relative.disks.push_back({"d.raw", "raw", true, false});
    auto r = validate_vm_spec(relative);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("disks[0].path \"d.raw\" is not an absolute path"), std::string::npos)
        << r.error().message;
}

TEST(VmSpec, RequiresNameAndMemory) {
    auto s = parse_vm_spec("cpus = 1\n", "vm.toml");
    ASSERT_FALSE(s);
    EXPECT_NE(s.error().message.find("missing required key 'name'"), std::string::npos);
    EXPECT_NE(s.error().message.find("missing required key 'memory'"), std::string::npos);
}

TEST(VmSpec, ValidNames) {
    EXPECT_TRUE(valid_vm_name("web-1"));
    EXPECT_TRUE(valid_vm_name("a"));
    EXPECT_FALSE(valid_vm_name("-a"));
    EXPECT_FALSE(valid_vm_name("a-"));
    EXPECT_FALSE(valid_vm_name("A"));
    EXPECT_FALSE(valid_vm_name("a/b"));
    EXPECT_FALSE(valid_vm_name(std::string(64, 'a')));
}

namespace {
// The problems a ferryd.toml yields (all of them, one per line), or "".
std::string problems(const std::string& text) {
    auto c = parse_node_config(text, "n.toml");
    return c ? std::string() : c.error().message;
}
} // namespace

TEST(NodeConfig, BlockPathMapPicksTheLongestDirectoryAbove) {
    auto c = parse_node_config(R"([node]
name = "b"
[block]
create_command = "lvcreate -y -L {size}b -n {name} vg0"
[[block.path_map]]
from = "/var/lib/images/"
to = "/srv/b/images"
[[block.path_map]]
from = "/var/lib/images/fast"
to = "/nvme"
)", "n.toml");
    ASSERT_TRUE(c) << c.error().message;
    EXPECT_EQ(c->block.create_command, "lvcreate -y -L {size}b -n {name} vg0");
    ASSERT_EQ(c->block.path_map.size(), 2U);
    EXPECT_EQ(c->block.path_map[0].from, "/var/lib/images");
    EXPECT_EQ(map_disk_path(c->block, "/var/lib/images/web.raw"), "/srv/b/images/web.raw");
    EXPECT_EQ(map_disk_path(c->block, "/var/lib/images/fast/db.qcow2"), "/nvme/db.qcow2");
    EXPECT_EQ(map_disk_path(c->block, "/var/lib/images"), "/srv/b/images");
    // A directory boundary, not a string prefix.
    EXPECT_EQ(map_disk_path(c->block, "/var/lib/images2/x.raw"), "/var/lib/images2/x.raw");
    EXPECT_EQ(map_disk_path(c->block, "/dev/vg0/web"), "/dev/vg0/web");
    BlockSection root{{{"/", "/mnt/b"}}, ""};
    EXPECT_EQ(map_disk_path(root, "/a/b.raw"), "/mnt/b/a/b.raw");
    EXPECT_EQ(map_disk_path(BlockSection{}, "/a/b.raw"), "/a/b.raw");
}

TEST(NodeConfig, BlockPathMapErrorsNameTheLine) {
    auto c = parse_node_config(R"([node]
name = "b"
[[block.path_map]]
from = "images"
to = "/srv"
[[block.path_map]]
from = "/x"
[[block.path_map]]
from = "/x/"
to = "/y"
)", "n.toml");
    ASSERT_FALSE(c);
    auto msg = c.error().message;
    EXPECT_NE(msg.find("n.toml:4: key 'block.path_map[0].from': \"images\" is not an absolute path"), std::string::npos)
        << msg;
    EXPECT_NE(msg.find("missing required key 'block.path_map[1].to'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("key 'block.path_map[2].from': \"/x\" is already block.path_map[1]"), std::string::npos) << msg;
}

TEST(NodeConfig, RefusesPeersThatCannotWork) {
    auto p = problems(R"([node]
name = "node-a"
listen = "127.0.0.1:7410"
[[peers]]
name = "node-b"
address = "10.0.0.2:7410"
[[peers]]
name = "node-b"
address = "10.0.0.3:7410"
[[peers]]
name = "node-a"
address = "10.0.0.4"
[[peers]]
name = "node-c"
address = "10.0.0.5:0"
)");
    EXPECT_NE(p.find("n.toml:8: key 'peers[1].name': \"node-b\" is already peers[0]"), std::string::npos) << p;
    EXPECT_NE(p.find("n.toml:11: key 'peers[2].name': \"node-a\" is this node's own name"), std::string::npos) << p;
    EXPECT_NE(p.find("n.toml:12: key 'peers[2].address': \"10.0.0.4\" has no port"), std::string::npos) << p;
    EXPECT_NE(p.find("n.toml:15: key 'peers[3].address': \"10.0.0.5:0\": port '0' is not a number from 1 to 65535"),
              std::string::npos)
        << p;
    EXPECT_NE(problems("[node]\nname = \"a\"\n[[peers]]\nname = \"b\"\naddress = \"fd00::1:7410\"\n").find("in brackets"),
              std::string::npos);
    EXPECT_EQ(problems("[node]\nname = \"a\"\n[[peers]]\nname = \"b\"\naddress = \"[fd00::1]:7410\"\n"), "");
}

TEST(NodeConfig, RefusesNodeNamesNoCertificateCanCarry) {
    for (std::string bad : std::vector<std::string>{"Node A/../x", std::string("a\0b", 3), "a\u202eb", "node_a", "-a", ""}) {
        std::string escaped;
        for (char c : bad)
            escaped += c == '\0' ? std::string("\\u0000") : std::string(1, c);
        auto p = problems("[node]\nname = \"" + escaped + "\"\n");
        EXPECT_NE(p.find("key 'node.name'"), std::string::npos) << "'" << escaped << "': " << p;
    }
    EXPECT_NE(problems("[node]\nname = \"a\"\n[[peers]]\nname = \"B\"\naddress = \"1.2.3.4:1\"\n")
                  .find("'peers[0].name': \"B\" is not a valid node name"),
              std::string::npos);
}

TEST(NodeConfig, RefusesPathsThatCannotWork) {
    EXPECT_NE(problems("[node]\nname = \"a\"\ncontrol_socket = \"\"\n").find("n.toml:3: key 'node.control_socket': must not be empty"),
              std::string::npos);
    EXPECT_NE(problems("[node]\nname = \"a\"\nstate_dir = \"var/ferry\"\n").find("n.toml:3: key 'node.state_dir': \"var/ferry\" must be an absolute path"),
              std::string::npos);
    auto long_dir = "/" + std::string(80, 'd');
    auto p = problems("[node]\nname = \"a\"\nstate_dir = \"" + long_dir + "\"\n");
    EXPECT_NE(p.find("n.toml:3: key 'node.state_dir'"), std::string::npos) << p;
    EXPECT_NE(p.find("may be at most"), std::string::npos) << p;
    EXPECT_NE(problems("[node]\nname = \"a\"\ncontrol_socket = \"/" + std::string(120, 's') + "\"\n").find("holds at most 107"),
              std::string::npos);
    EXPECT_EQ(max_vm_name_length("/var/lib/ferry"), 60U);
}

TEST(NodeConfig, TlsNeedsAllThreeFilesAndAListenAddress) {
    auto partial = problems("[node]\nname = \"a\"\nlisten = \"127.0.0.1:7410\"\n[tls]\nca = \"/p/ca.pem\"\n");
    EXPECT_NE(partial.find("n.toml:4: table 'tls': missing cert, key"), std::string::npos) << partial;
    auto no_listen = problems("[node]\nname = \"a\"\n[tls]\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n");
    EXPECT_NE(no_listen.find("table 'tls' needs [node] listen"), std::string::npos) << no_listen;
    auto bad_listen = problems("[node]\nname = \"a\"\nlisten = \"0.0.0.0:99999\"\n");
    EXPECT_NE(bad_listen.find("n.toml:3: key 'node.listen'"), std::string::npos) << bad_listen;
    auto c = parse_node_config("[node]\nname = \"a\"\nlisten = \"127.0.0.1:7410\"\n[tls]\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n",
                               "n.toml");
    ASSERT_TRUE(c) << c.error().message;
    EXPECT_EQ(c->where("tls.cert"), "n.toml:6: key 'tls.cert'");
    EXPECT_EQ(c->where("node.qemu"), "n.toml: key 'node.qemu'");
}

TEST(NodeConfig, LauncherIsBuiltinOrExternalWithABoundedWait) {
    auto c = parse_node_config("[node]\nname = \"a\"\nlauncher = \"external\"\nexternal_launch_timeout = 20\n", "n.toml");
    ASSERT_TRUE(c) << c.error().message;
    EXPECT_EQ(c->node.launcher, "external");
    EXPECT_EQ(c->node.external_launch_timeout, 20);
    EXPECT_EQ(parse_node_config("[node]\nname = \"a\"\n", "n.toml")->node.launcher, "builtin");
    auto bad = problems("[node]\nname = \"a\"\nlauncher = \"wrapper\"\n");
    EXPECT_NE(bad.find("n.toml:3: key 'node.launcher': \"wrapper\" is not builtin or external (a wrapper is builtin "
                       "with qemu_wrapper)"),
              std::string::npos)
        << bad;
    auto wait = problems("[node]\nname = \"a\"\nexternal_launch_timeout = 1\n");
    EXPECT_NE(wait.find("n.toml:3: key 'node.external_launch_timeout'"), std::string::npos) << wait;
}

TEST(NodeConfig, ControlSocketWritableByOthersNeedsConsent) {
    for (auto mode : {"0666", "0602"}) {
        auto p = problems(std::string("[node]\nname = \"a\"\ncontrol_socket_mode = \"") + mode + "\"\n");
        EXPECT_NE(p.find("lets every user write the control socket"), std::string::npos) << mode << ": " << p;
    }
    auto group = problems("[node]\nname = \"a\"\ncontrol_socket_mode = \"0660\"\n");
    EXPECT_NE(group.find("lets ferryd's group write the control socket"), std::string::npos) << group;
    EXPECT_NE(group.find("(control_socket_group)"), std::string::npos) << group;
    // A group named for it may write; others still may not.
    EXPECT_EQ(problems("[node]\nname = \"a\"\ncontrol_socket_mode = \"0660\"\ncontrol_socket_group = \"ferry\"\n"), "");
    EXPECT_NE(problems("[node]\nname = \"a\"\ncontrol_socket_mode = \"0666\"\ncontrol_socket_group = \"ferry\"\n")
                  .find("lets every user write"),
              std::string::npos);
    EXPECT_EQ(problems("[node]\nname = \"a\"\ncontrol_socket_mode = \"0640\"\n"), "");
    EXPECT_EQ(problems("[node]\nname = \"a\"\ncontrol_socket_mode = \"0660\"\ninsecure_control_socket = true\n"), "");
}

TEST(NodeConfig, ADirectoryIsNotAConfigFile) {
    ferry::test::TempDir dir;
    auto c = load_node_config(dir.path());
    ASSERT_FALSE(c);
    EXPECT_NE(c.error().message.find("is a directory"), std::string::npos) << c.error().message;
}

TEST(VmSpec, RefusesQemuOptionsFerryOwns) {
    for (std::string opt : {"-daemonize", "--daemonize", "-pidfile", "-qmp", "-incoming", "-S", "-m", "-monitor",
                            "-serial", "-runas", "-chroot", "-drive"}) {
        auto s = parse_vm_spec("name = \"a\"\nmemory = \"64Mi\"\nextra_args = [\"-device\", \"x\", \"" + opt + "\"]\n",
                               "s.toml");
        ASSERT_FALSE(s) << opt;
        EXPECT_NE(s.error().message.find("s.toml:3: key 'extra_args[2]': \"" + opt + "\" is not allowed"),
                  std::string::npos)
            << s.error().message;
    }
    EXPECT_TRUE(parse_vm_spec("name = \"a\"\nmemory = \"64Mi\"\nextra_args = [\"-device\", \"virtio-rng-pci\"]\n", "s"));
}

TEST(NodeConfig, AnEmptyListenTurnsThePeerEndpointOff) {
    auto c = parse_node_config("[node]\nname = \"a\"\nlisten = \"\"\n", "n.toml");
    ASSERT_TRUE(c) << c.error().message;
    EXPECT_EQ(c->node.listen, "");
}

TEST(VmSpec, ASpecFromJsonGetsTheSameChecks) {
    auto s = parse_vm_spec("name = \"a\"\nmemory = \"64Mi\"\n", "s");
    ASSERT_TRUE(s);
    EXPECT_TRUE(validate_vm_spec(*s));
    auto daemon = *s;
    daemon.extra_args = {"-device", "x", "--daemonize"};
    auto r = validate_vm_spec(daemon);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("extra_args[2] \"--daemonize\" is not allowed"), std::string::npos)
        << r.error().message;
    auto bad_name = *s;
    bad_name.name = "../x";
    EXPECT_FALSE(validate_vm_spec(bad_name));
    auto bad_memory = *s;
    bad_memory.memory = 12345;
    EXPECT_FALSE(validate_vm_spec(bad_memory));
}

TEST(NodeConfig, ReadsNodeLabelsAndPolicies) {
    auto c = parse_node_config(R"([node]
name = "node-a"
labels = { zone = "a", disk = "ssd" }
[migration]
parallel_inbound_migrations_per_node = 1
[[policies]]
name = "databases"
vm_selector = { tier = "db" }
node_selector = { zone = "a" }
bandwidth_per_migration = "256Mi"
max_downtime_ms = 100
allow_post_copy = true
[[policies]]
name = "everything"
completion_timeout_per_gib = 0
)", "n.toml");
    ASSERT_TRUE(c) << c.error().message;
    EXPECT_EQ(c->node.labels.at("zone"), "a");
    EXPECT_EQ(c->migration.parallel_inbound_migrations_per_node, 1);
    ASSERT_EQ(c->policies.size(), 2U);
    auto& db = c->policies[0];
    EXPECT_EQ(db.name, "databases");
    EXPECT_EQ(db.vm_selector.at("tier"), "db");
    EXPECT_EQ(db.node_selector.at("zone"), "a");
    EXPECT_EQ(db.settings.bandwidth_per_migration, 256ULL << 20);
    EXPECT_EQ(db.settings.max_downtime_ms, 100);
    EXPECT_EQ(db.settings.allow_post_copy, true);
    EXPECT_FALSE(db.settings.allow_auto_converge); // unset: falls through
    EXPECT_FALSE(db.settings.progress_timeout);
    EXPECT_TRUE(c->policies[1].vm_selector.empty());
    EXPECT_EQ(c->policies[1].settings.completion_timeout_per_gib, 0);
}

TEST(NodeConfig, PolicyErrorsNameTheLineAndWhatAPolicyMayNotSet) {
    auto msg = problems(R"([node]
name = "node-a"
[[policies]]
name = "Fast"
disable_tls = true
parallel_outbound_migrations_per_node = 9
[[policies]]
vm_selector = "tier=db"
max_downtime_ms = 0
[[policies]]
name = "slow"
[[policies]]
name = "slow"
bandwith_per_migration = "1Mi"
)");
    EXPECT_NE(msg.find("n.toml:4: key 'policies[0].name': \"Fast\" is not a valid policy name"), std::string::npos)
        << msg;
    EXPECT_NE(msg.find("n.toml:5: key 'policies[0].disable_tls': a policy cannot set this"), std::string::npos) << msg;
    EXPECT_NE(msg.find("n.toml:6: key 'policies[0].parallel_outbound_migrations_per_node': a policy cannot set this"),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("n.toml:7: missing required key 'policies[1].name'"), std::string::npos) << msg;
    // In the file's order.
    EXPECT_LT(msg.find("n.toml:4:"), msg.find("n.toml:7:")) << msg;
    EXPECT_LT(msg.find("n.toml:7:"), msg.find("n.toml:13:")) << msg;
    EXPECT_NE(msg.find("n.toml:8: key 'policies[1].vm_selector'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("n.toml:9: key 'policies[1].max_downtime_ms'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("n.toml:13: key 'policies[3].name': \"slow\" is already policies[2]"), std::string::npos)
        << msg;
    EXPECT_NE(msg.find("n.toml:14: unknown key 'policies[3].bandwith_per_migration'"), std::string::npos) << msg;
}

TEST(NodeConfig, RefusesSettingsThatCannotWork) {
    auto create = problems("[node]\nname = \"a\"\n[block]\ncreate_command = \"\"\n");
    EXPECT_NE(create.find("n.toml:4: key 'block.create_command': the command is empty"), std::string::npos) << create;
    EXPECT_NE(problems("[node]\nname = \"a\"\n[block]\ncreate_command = \"  \"\n").find("the command is empty"),
              std::string::npos);
    auto both = problems("[node]\nname = \"a\"\n[migration]\nmultifd_channels = 4\nallow_post_copy = true\n");
    EXPECT_NE(both.find("n.toml:5: key 'migration.allow_post_copy': true together with key "
                        "'migration.multifd_channels' = 4 (line 4): QEMU cannot do post-copy with multifd"),
              std::string::npos)
        << both;
    EXPECT_EQ(problems("[node]\nname = \"a\"\n[migration]\nmultifd_channels = 4\nallow_post_copy = false\n"), "");
    auto policy = problems("[node]\nname = \"a\"\n[[policies]]\nname = \"pc\"\nallow_post_copy = true\n"
                           "[migration]\nmultifd_channels = 2\n");
    EXPECT_NE(policy.find("n.toml:5: key 'policies[0].allow_post_copy': true, but key 'migration.multifd_channels' "
                          "is 2: QEMU cannot do post-copy with multifd"),
              std::string::npos)
        << policy;
    EXPECT_EQ(problems("[node]\nname = \"a\"\n[[policies]]\nname = \"pc\"\nallow_post_copy = true\n"), "");
    for (auto mode : {"0000", "0400", "0200", "0060"}) {
        auto m = problems(std::string("[node]\nname = \"a\"\ncontrol_socket_mode = \"") + mode + "\"\n");
        EXPECT_NE(m.find(std::string("n.toml:3: key 'node.control_socket_mode': \"") + mode +
                         "\" does not let the socket's owner (ferryd's user) read and write it"),
                  std::string::npos)
            << mode << ": " << m;
    }
    EXPECT_EQ(problems("[node]\nname = \"a\"\ncontrol_socket_mode = \"0700\"\n"), "");
}

TEST(NodeConfig, TlsAndPeersNeedThePeerEndpoint) {
    auto tls = problems("[node]\nname = \"a\"\nlisten = \"\"\n[tls]\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n");
    EXPECT_NE(tls.find("n.toml:4: table 'tls' is set while key 'node.listen' (n.toml:3) is \"\", which turns the peer "
                       "endpoint off"),
              std::string::npos)
        << tls;
    auto peers = problems("[node]\nname = \"a\"\nlisten = \"\"\n[[peers]]\nname = \"b\"\naddress = \"10.0.0.2:7410\"\n");
    EXPECT_NE(peers.find("key 'peers' is set while key 'node.listen' (n.toml:3) is \"\""), std::string::npos) << peers;
    EXPECT_NE(peers.find("n.toml:4: key 'peers'"), std::string::npos) << peers;
    EXPECT_EQ(problems("[node]\nname = \"a\"\nlisten = \"10.0.0.1:7410\"\n[[peers]]\nname = \"b\"\naddress = "
                       "\"10.0.0.2:7410\"\n"),
              "");
}

TEST(NodeConfig, RefusesLabelsNoSelectorCanMatch) {
    auto node = problems("[node]\nname = \"a\"\nlabels = { \"\" = \"x\", zone = \"a\" }\n");
    EXPECT_NE(node.find("n.toml:3: key 'node.labels': a label key is empty"), std::string::npos) << node;
    auto space = problems("[node]\nname = \"a\"\n[node.labels]\nzone = \"a\"\n\"disk type\" = \"ssd\"\n");
    EXPECT_NE(space.find("n.toml:5: key 'node.labels': label key \"disk type\" holds whitespace"), std::string::npos)
        << space;
    auto tab = problems("[node]\nname = \"a\"\nlabels = { \"a\\tb\" = \"x\" }\n");
    EXPECT_NE(tab.find("label key \"a\\x09b\" holds whitespace"), std::string::npos) << tab;
    auto nul = problems("[node]\nname = \"a\"\nlabels = { zone = \"a\\u0000b\" }\n");
    EXPECT_NE(nul.find("n.toml:3: key 'node.labels': the value of label \"zone\" holds a NUL character"),
              std::string::npos)
        << nul;
    auto policy = problems("[node]\nname = \"a\"\n[[policies]]\nname = \"p\"\nvm_selector = { \" tier\" = \"db\" }\n"
                           "node_selector = { zone = \"\\u0000\" }\n");
    EXPECT_NE(policy.find("n.toml:5: key 'policies[0].vm_selector': label key \" tier\" holds whitespace"),
              std::string::npos)
        << policy;
    EXPECT_NE(policy.find("n.toml:6: key 'policies[0].node_selector': the value of label \"zone\" holds a NUL "
                          "character"),
              std::string::npos)
        << policy;
    EXPECT_EQ(problems("[node]\nname = \"a\"\nlabels = { \"ferry.io/zone\" = \"a b\", empty = \"\" }\n"), "");
}

TEST(VmSpec, RefusesLabelsNoSelectorCanMatch) {
    auto s = parse_vm_spec("name = \"a\"\nmemory = \"64Mi\"\nlabels = { \"\" = \"x\" }\n"
                           "node_selector = { \"zone \" = \"a\", disk = \"s\\u0000\" }\n",
                           "s.toml");
    ASSERT_FALSE(s);
    auto msg = s.error().message;
    EXPECT_NE(msg.find("s.toml:3: key 'labels': a label key is empty"), std::string::npos) << msg;
    EXPECT_NE(msg.find("s.toml:4: key 'node_selector': label key \"zone \" holds whitespace"), std::string::npos) << msg;
    EXPECT_NE(msg.find("s.toml:4: key 'node_selector': the value of label \"disk\" holds a NUL character"),
              std::string::npos)
        << msg;
    auto ok = parse_vm_spec("name = \"a\"\nmemory = \"64Mi\"\nlabels = { tier = \"db\" }\n", "s");
    ASSERT_TRUE(ok) << ok.error().message;
    auto spaced = *ok;
    spaced.labels = {{"a b", "x"}};
    auto r = validate_vm_spec(spaced);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("VM spec a: labels: label key \"a b\" holds whitespace"), std::string::npos)
        << r.error().message;
    auto nul = *ok;
    nul.node_selector = {{"zone", std::string("a\0b", 3)}};
    r = validate_vm_spec(nul);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("node_selector: the value of label \"zone\" holds a NUL character"),
              std::string::npos)
        << r.error().message;
}

TEST(VmSpec, MachineAndCpuModelAreNamesOnly) {
    auto machine = parse_vm_spec("name = \"a\"\nmemory = \"64Mi\"\nmachine = \"pc,memory-backend=x\"\n", "s.toml");
    ASSERT_FALSE(machine);
    EXPECT_NE(machine.error().message.find("s.toml:3: key 'machine': \"pc,memory-backend=x\" is not a machine type "
                                           "name (1-128 of A-Z, a-z, 0-9, '.', '_' and '-'; no options)"),
              std::string::npos)
        << machine.error().message;
    auto cpu = parse_vm_spec("name = \"a\"\nmemory = \"64Mi\"\ncpu_model = \"qemu64,+vmx\"\n", "s.toml");
    ASSERT_FALSE(cpu);
    EXPECT_NE(cpu.error().message.find("s.toml:3: key 'cpu_model': \"qemu64,+vmx\" is not a CPU model name (1-128 of "
                                       "A-Z, a-z, 0-9, '.', '_' and '-'; no options or features)"),
              std::string::npos)
        << cpu.error().message;
    for (auto bad : {"", "pc accel=kvm", "q35\n"})
        EXPECT_FALSE(parse_vm_spec(std::string("name = \"a\"\nmemory = \"64Mi\"\nmachine = \"") +
                                       (std::string(bad) == "q35\n" ? "q35\\n" : bad) + "\"\n",
                                   "s"))
            << bad;
    auto ok = parse_vm_spec("name = \"a\"\nmemory = \"64Mi\"\nmachine = \"pc-i440fx-7.2\"\ncpu_model = "
                            "\"Skylake-Server_v1.x\"\n",
                            "s");
    ASSERT_TRUE(ok) << ok.error().message;
    auto json_machine = *ok;
    json_machine.machine = "pc,memory-backend=x";
    auto r = validate_vm_spec(json_machine);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("VM spec a: machine \"pc,memory-backend=x\" is not a machine type name"),
              std::string::npos)
        << r.error().message;
    auto json_cpu = *ok;
    json_cpu.cpu_model = "qemu64,+vmx";
    r = validate_vm_spec(json_cpu);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("VM spec a: cpu_model \"qemu64,+vmx\" is not a CPU model name"), std::string::npos)
        << r.error().message;
}
