//! The privileged network lab of the eBPF tests and benchmarks: pods as network
//! namespaces behind veths on one bridge, private bpffs mounts, test cgroups.
//!
//! ```text
//!  host netns: bridge mb<tag><pid> (no address, iptables hooks off)
//!     ├─ veth m<tag><pod><pid> ── netns meshd-<tag>-<pod>-<pid>: eth0 198.18.x.y/<prefix>, lo
//!     └─ …                        (optional host /32 route per pod: the routed-CNI signal)
//!  Bpffs:  bpf mount in a temporary directory (pin dir `<mount>/meshd`)
//!  Cgroup: <cgroup2 mount>/meshd-<tag>-<pid>; processes left inside are killed on drop
//! ```
//!
//! Addresses come from 198.18.0.0/15 only and nothing routes off the machine. Every
//! namespace, link, mount and cgroup is removed on drop, also after a panic. Callers
//! check [`is_root`] first (the [`require_root!`](crate::require_root) macro skips a test
//! loudly).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Whether this process runs as root (effective UID 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Set (to anything but `0`) by `.ci/run` through `scripts/test`: a privileged test that
/// cannot run here fails instead of skipping.
pub const REQUIRE_PRIVILEGED_ENV: &str = "MESHD_REQUIRE_PRIVILEGED";
/// A file to which every privileged test appends `RAN <test>` or `SKIPPED <test>: <why>`;
/// `scripts/test` counts them in its summary.
pub const PRIVILEGED_LOG_ENV: &str = "MESHD_PRIVILEGED_LOG";

/// What a privileged test lacks here (root, a cgroup2 mount, bpffs support), if anything.
pub fn missing_privileges() -> Option<String> {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root");
    }
    if meshd::mounts::mount_point("cgroup2").is_none() {
        missing.push("a cgroup2 mount");
    }
    let bpffs = std::fs::read_to_string("/proc/filesystems")
        .map(|f| {
            f.lines()
                .any(|l| l.split_whitespace().last() == Some("bpf"))
        })
        .unwrap_or(false);
    if !bpffs {
        missing.push("bpffs support in the kernel");
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Whether privileged tests must run (see [`REQUIRE_PRIVILEGED_ENV`]).
pub fn privileged_required() -> bool {
    std::env::var_os(REQUIRE_PRIVILEGED_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Appends one line to the privileged-test log, if one is configured.
pub fn log_privileged(line: &str) {
    use std::io::Write;
    if let Some(path) = std::env::var_os(PRIVILEGED_LOG_ENV)
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Decides whether privileged test `name` runs: `true` when it has what it needs (logged
/// as run); `false` after saying loudly that it is skipped; a panic instead of a skip
/// when [`privileged_required`].
pub fn privileged(name: &str) -> bool {
    match missing_privileges() {
        None => {
            log_privileged(&format!("RAN {name}"));
            true
        }
        Some(why) => {
            assert!(
                !privileged_required(),
                "{name} needs {why}, and {REQUIRE_PRIVILEGED_ENV} is set: a privileged test \
                 may not pass by skipping here"
            );
            log_privileged(&format!("SKIPPED {name}: needs {why}"));
            eprintln!(
                "SKIPPED {name}: needs {why} (BPF, network namespaces, cgroups, bpffs mount); \
                 run as root or in CI"
            );
            false
        }
    }
}

/// Returns from the calling test after saying on stderr that it was skipped, unless it has
/// root, a cgroup2 mount and bpffs support; under `MESHD_REQUIRE_PRIVILEGED` it fails
/// instead of skipping. See [`privileged`].
#[macro_export]
macro_rules! require_root {
    ($name:expr) => {
        if !$crate::lab::privileged($name) {
            return;
        }
    };
}

/// Runs `cmd args`; panics with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd args`, ignoring the outcome (cleanup).
pub fn run_quiet(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// This process's suffix for names (≤ 6 digits, so interface names stay under IFNAMSIZ).
pub fn suffix() -> String {
    format!("{}", std::process::id() % 1_000_000)
}

/// A private bpffs mount in a temporary directory: the agent's pin dir lives inside.
#[derive(Debug)]
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    /// Mounts a new bpffs.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("meshd-bpffs-")
            .tempdir()
            .expect("tempdir");
        run(
            "mount",
            &["-t", "bpf", "bpf", dir.path().to_str().expect("utf-8")],
        );
        Self { dir }
    }

    /// The mount point.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// `<mount>/meshd`.
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.path().join("meshd")
    }
}

impl Default for Bpffs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        run_quiet(
            "umount",
            &["-l", self.dir.path().to_str().unwrap_or("/nonexistent")],
        );
    }
}

/// A cgroup v2 directory the caller creates; processes left in it are killed on drop.
#[derive(Debug)]
pub struct Cgroup {
    /// Its directory.
    pub path: PathBuf,
}

impl Cgroup {
    /// `<cgroup2 mount>/meshd-<tag>-<pid>`.
    pub fn new(tag: &str) -> Self {
        let root = mesh_agent::datapath::cgroup2_mount().expect("a cgroup2 mount");
        let path = root.join(format!("meshd-{tag}-{}", suffix()));
        std::fs::create_dir(&path).expect("mkdir cgroup");
        Self { path }
    }

    /// Its `cgroup.procs`.
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if let Ok(procs) = std::fs::read_to_string(self.procs()) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove cgroup {}", self.path.display());
    }
}

/// A pod: a network namespace with `eth0`, its host-side veth on the lab bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Namespace name (`/run/netns/<netns>`).
    pub netns: String,
    /// Host-side interface.
    pub host_if: String,
    /// Its address.
    pub ip: Ipv4Addr,
}

impl Pod {
    /// `--net=/run/netns/<netns>`, for `nsenter`.
    pub fn nsenter_arg(&self) -> String {
        format!("--net=/run/netns/{}", self.netns)
    }
}

/// A bridge with pods; everything deleted on drop.
#[derive(Debug)]
pub struct Lab {
    tag: String,
    bridge: String,
    netns: Vec<String>,
    links: Vec<String>,
    prefix_len: u8,
    host_routes: bool,
}

impl Lab {
    /// A bridge `mb<tag><pid>`; pods get a /24 and no host route.
    pub fn new(tag: &str) -> Self {
        let bridge = format!("mb{tag}{}", suffix());
        assert!(bridge.len() < 16, "{bridge}: name too long");
        run(
            "ip",
            &[
                "link",
                "add",
                &bridge,
                "type",
                "bridge",
                "nf_call_iptables",
                "0",
                "nf_call_ip6tables",
                "0",
                "nf_call_arptables",
                "0",
            ],
        );
        let lab = Self {
            tag: tag.to_owned(),
            bridge: bridge.clone(),
            netns: Vec::new(),
            links: vec![bridge],
            prefix_len: 24,
            host_routes: false,
        };
        run("ip", &["link", "set", &lab.bridge, "up"]);
        lab
    }

    /// Pods get this prefix length on `eth0` (on-link reach of other pods).
    #[must_use]
    pub fn prefix_len(mut self, len: u8) -> Self {
        self.prefix_len = len;
        self
    }

    /// Adds a host `/32` route per pod through its host-side veth, as a routed CNI does
    /// (what the syncer's interface resolver reads).
    #[must_use]
    pub fn host_routes(mut self, on: bool) -> Self {
        self.host_routes = on;
        self
    }

    /// A bare namespace `meshd-<tag>-<name>-<pid>` (loopback up, no interface), deleted
    /// on drop.
    pub fn netns(&mut self, name: &str) -> String {
        let netns = format!("meshd-{}-{name}-{}", self.tag, suffix());
        run("ip", &["netns", "add", &netns]);
        self.netns.push(netns.clone());
        run("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        netns
    }

    /// A pod `name` at `ip`.
    pub fn pod(&mut self, name: &str, ip: Ipv4Addr) -> Pod {
        let s = suffix();
        let host_if = format!("m{}{name}{s}", self.tag);
        let peer = format!("p{}{name}{s}", self.tag);
        assert!(
            host_if.len() < 16 && peer.len() < 16,
            "{host_if}: name too long"
        );
        let netns = self.netns(name);
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
            ],
        );
        self.links.push(host_if.clone());
        run("ip", &["link", "set", &peer, "netns", &netns]);
        run("ip", &["-n", &netns, "link", "set", &peer, "name", "eth0"]);
        run(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip}/{}", self.prefix_len),
                "dev",
                "eth0",
            ],
        );
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        run("ip", &["link", "set", &host_if, "master", &self.bridge]);
        run("ip", &["link", "set", &host_if, "up"]);
        if self.host_routes {
            // Deleted with the link.
            run(
                "ip",
                &["route", "add", &format!("{ip}/32"), "dev", &host_if],
            );
        }
        Pod { netns, host_if, ip }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.netns {
            run_quiet("ip", &["netns", "del", ns]);
        }
        for l in self.links.iter().rev() {
            run_quiet("ip", &["link", "del", l]);
        }
    }
}

/// The interface index of `ifname` in this namespace.
pub fn ifindex(ifname: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
        .expect("ifindex")
        .trim()
        .parse()
        .expect("number")
}

/// The python3 interpreter (the tests' small servers and clients run in it).
pub fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed by the datapath tests");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}
