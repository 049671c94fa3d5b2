//! Datapath benchmark: socket-level load balancing in eBPF against kube-proxy-style
//! iptables DNAT, everything in one run (root only; skips loudly otherwise).
//!
//! 1. **Programming**: N services × 4 backends written into the maps through
//!    `Datapath::apply` (AyaDatapath on a private bpffs, batches of 4096 as the syncer
//!    does) vs the same set as kube-proxy rules (`KUBE-SERVICES` → `KUBE-SVC-*` with
//!    `-m statistic --mode random --probability` → `KUBE-SEP-*` DNAT) loaded by one
//!    `iptables-restore` into an empty nat table of a private network namespace.
//! 2. **Per connection**: a client in a pod netns connects (TCP, then closes) round-robin
//!    to 8 probe services spread evenly over the service list (the iptables average
//!    case), whose backends are a listener in another pod netns: through socket LB
//!    (client in the cgroup the programs are attached to, no netfilter rules) and through
//!    iptables DNAT (nat OUTPUT → KUBE-SERVICES in the client's netns); p50/p99 per
//!    `connect()`. "direct" connects to the backend address with neither.
//! 3. **Map update throughput** of the syncer path: service and ipcache changes per
//!    second, 4096 per `apply` vs one per `apply`, on small and large existing state.
//!
//! Run (root): `cargo run --release -p mesh-tests --bin datapath-bench [-- --connects N]
//! [--iptables nft|legacy|both] [--quick]` after `scripts/bench-deps` (iptables). Only 198.18.0.0/15
//! addresses, only namespaces, cgroups and bpffs mounts it creates (removed on exit);
//! the host's netfilter tables are never touched. The binary re-executes itself as the
//! backend listener (`serve`) and the client (`client`) inside the pod namespaces.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use mesh_agent::datapath::{
    AyaConfig, AyaDatapath, Backend, Change, Datapath, Planner, Protocol, ServiceKey,
};
use mesh_tests::lab::{Bpffs, Cgroup, Lab, Pod, is_root, run};
use mesh_tests::util::ChildGuard;

const SIZES: [usize; 4] = [100, 1_000, 10_000, 30_000];
const BACKENDS: u16 = 4;
const PROBES: usize = 8;
const BATCH: usize = 4096;
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;

// ---------------------------------------------------------------- service set

/// VIP of service `i` (198.19.0.0/16, i < 65 000).
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + u32::try_from(i).expect("fits"))
}

/// Indices of the probe services of an `n`-service set: evenly spread, so iptables
/// matches them on average half-way down KUBE-SERVICES.
fn probes(n: usize) -> Vec<usize> {
    (0..PROBES)
        .map(|k| (k * n) / PROBES + n / (2 * PROBES))
        .collect()
}

/// The `n`-service set: 4 backends each; probes point at the real listener, the rest at
/// distinct addresses of 198.18.128.0/17 (nothing answers there).
fn service_set(n: usize, real: Ipv4Addr) -> Vec<(ServiceKey, Vec<Backend>)> {
    let probe = probes(n);
    (0..n)
        .map(|i| {
            let key = ServiceKey {
                vip: vip(i),
                port: SERVICE_PORT,
                proto: Protocol::Tcp,
            };
            let backends = (0..BACKENDS)
                .map(|j| {
                    if probe.contains(&i) {
                        Backend {
                            ip: real,
                            port: BACKEND_PORT + j,
                        }
                    } else {
                        Backend {
                            ip: Ipv4Addr::from(
                                u32::from(Ipv4Addr::new(198, 18, 128, 0))
                                    + u32::try_from(i % 32_768).expect("fits"),
                            ),
                            port: BACKEND_PORT + j,
                        }
                    }
                })
                .collect();
            (key, backends)
        })
        .collect()
}

fn upserts(set: &[(ServiceKey, Vec<Backend>)]) -> Vec<Change> {
    set.iter()
        .map(|(key, backends)| Change::UpsertService {
            key: *key,
            backends: backends.clone(),
        })
        .collect()
}

/// The set as kube-proxy's iptables mode writes it (nat table only, one restore).
fn kube_proxy_rules(set: &[(ServiceKey, Vec<Backend>)]) -> String {
    let chain = |kind: &str, i: usize, j: Option<usize>| {
        // kube-proxy: KUBE-SVC-/KUBE-SEP- + 16 characters of a hash.
        let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ j.map_or(0, |j| j as u64 + 1);
        format!("{kind}-{h:016X}")
    };
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n",
    );
    let mut sep_rules = String::new();
    for (i, (key, backends)) in set.iter().enumerate() {
        let svc = chain("KUBE-SVC", i, None);
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"ns{}/svc{i}:http cluster IP\" -m tcp --dport {} -j {svc}",
            key.vip,
            i % 100,
            key.port
        );
        let n = backends.len();
        for (j, b) in backends.iter().enumerate() {
            let sep = chain("KUBE-SEP", i, Some(j));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            if j + 1 < n {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"ns{}/svc{i}:http -> {}:{}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    i % 100,
                    b.ip,
                    b.port,
                    1.0 / (n - j) as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"ns{}/svc{i}:http -> {}:{}\" -j {sep}",
                    i % 100,
                    b.ip,
                    b.port
                );
            }
            let _ = writeln!(
                sep_rules,
                "-A {sep} -s {}/32 -m comment --comment \"ns{}/svc{i}:http\" -j KUBE-MARK-MASQ\n-A {sep} -p tcp -m comment --comment \"ns{}/svc{i}:http\" -m tcp -j DNAT --to-destination {}:{}",
                b.ip,
                i % 100,
                i % 100,
                b.ip,
                b.port
            );
        }
    }
    chains + &rules + &sep_rules + "COMMIT\n"
}

// ---------------------------------------------------------------- iptables

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend4 {
    Nft,
    Legacy,
}

impl Backend4 {
    fn restore(self) -> &'static str {
        match self {
            Self::Nft => "iptables-nft-restore",
            Self::Legacy => "iptables-legacy-restore",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Nft => "iptables-nft",
            Self::Legacy => "iptables-legacy",
        }
    }
}

/// Runs `restore` on `rules` inside `netns`; the wall time of the process.
fn iptables_restore(tool: &str, netns: &str, rules: &Path) -> Result<Duration, String> {
    let t = Instant::now();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["--", tool])
        .arg(rules)
        .output()
        .map_err(|e| format!("{tool}: {e}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{tool} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(took)
}

/// Whether `tool` can load a DNAT rule with the statistic match in a scratch namespace.
fn iptables_works(lab: &mut Lab, b: Backend4, dir: &Path) -> Result<(), String> {
    let ns = lab.netns(&format!("probe{}", b.name().len()));
    let file = dir.join(format!("probe-{}.rules", b.name()));
    std::fs::write(
        &file,
        kube_proxy_rules(&service_set(2, Ipv4Addr::new(198, 18, 1, 1))),
    )
    .map_err(|e| e.to_string())?;
    iptables_restore(b.restore(), &ns, &file).map(drop)
}

fn tool_version(tool: &str) -> String {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("{tool}: {e}"))
}

// ---------------------------------------------------------------- pod processes

/// `serve <ip> <port>…`: accept and close, forever (killed by the parent).
fn serve(args: &[String]) -> ExitCode {
    let ip: Ipv4Addr = args[0].parse().expect("ip");
    let mut threads = Vec::new();
    for p in &args[1..] {
        let l = TcpListener::bind((ip, p.parse::<u16>().expect("port"))).expect("bind");
        threads.push(std::thread::spawn(move || {
            for c in l.incoming() {
                drop(c);
            }
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

/// `client <count> <ip:port>…`: `count` blocking connects round-robin, each closed at
/// once; prints one line per connect: `ok <ns>` or `err <error>`.
fn client(args: &[String]) -> ExitCode {
    let count: usize = args[0].parse().expect("count");
    let targets: Vec<SocketAddrV4> = args[1..]
        .iter()
        .map(|a| a.parse().expect("ip:port"))
        .collect();
    let mut out = String::with_capacity(count * 12);
    for i in 0..count {
        let to = targets[i % targets.len()];
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2));
        let ns = t.elapsed().as_nanos();
        match r {
            Ok(s) => {
                drop(s);
                let _ = writeln!(out, "ok {ns}");
            }
            Err(e) => {
                let _ = writeln!(out, "err {to}: {e}");
            }
        }
    }
    print!("{out}");
    ExitCode::SUCCESS
}

fn self_exe() -> String {
    std::env::current_exe()
        .expect("own path")
        .to_string_lossy()
        .into_owned()
}

fn start_server(pod: &Pod) -> ChildGuard {
    let mut cmd = Command::new("nsenter");
    cmd.arg(pod.nsenter_arg())
        .args(["--", &self_exe(), "serve", &pod.ip.to_string()]);
    for j in 0..BACKENDS {
        cmd.arg((BACKEND_PORT + j).to_string());
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server output");
    let guard = ChildGuard(child);
    assert_eq!(line.trim(), "ready", "backend listener did not start");
    guard
}

/// Per-connect latencies (µs, sorted) of `count` connects from `pod` (inside `cgroup`
/// when given) to `targets`; an error if any connect failed.
fn connects(
    pod: &Pod,
    cgroup: Option<&Cgroup>,
    targets: &[SocketAddrV4],
    count: usize,
) -> Result<Vec<f64>, String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(pod.nsenter_arg()).arg("--");
    if let Some(cg) = cgroup {
        cmd.args(["sh", "-c", "echo $$ > \"$MESH_CG\" && exec \"$@\"", "sh"])
            .env("MESH_CG", cg.procs());
    }
    cmd.args([&self_exe(), "client", &count.to_string()]);
    for t in targets {
        cmd.arg(t.to_string());
    }
    let out = cmd.output().map_err(|e| format!("client: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lat = Vec::with_capacity(count);
    let mut errors = Vec::new();
    for l in text.lines() {
        match l.strip_prefix("ok ") {
            Some(ns) => lat.push(ns.parse::<f64>().map_err(|e| e.to_string())? / 1000.0),
            None => errors.push(l.to_owned()),
        }
    }
    if !errors.is_empty() || lat.len() != count {
        return Err(format!(
            "{} of {count} connects failed (first: {:?}); stderr: {}",
            count - lat.len(),
            errors.first(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Debug, Clone, Copy)]
struct Lat {
    p50: f64,
    p99: f64,
}

fn lat(sorted: &[f64]) -> Lat {
    Lat {
        p50: pct(sorted, 0.50),
        p99: pct(sorted, 0.99),
    }
}

// ---------------------------------------------------------------- helpers

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn open(pins: &Bpffs, name: &str, cgroup: Option<&Cgroup>) -> AyaDatapath {
    AyaDatapath::open(AyaConfig {
        pin_dir: pins.path().join(name),
        cgroup: cgroup.map(|c| c.path.clone()),
        socket_lb: cgroup.is_some(),
    })
    .expect("datapath loads (is this kernel BPF-capable?)")
}

fn apply_batched(dp: &mut AyaDatapath, changes: &[Change], batch: usize) -> Duration {
    let t = Instant::now();
    for chunk in changes.chunks(batch) {
        dp.apply(chunk).expect("apply");
    }
    t.elapsed()
}

/// How many raw map writes `changes` cost on top of `planner`'s state (advances it).
fn map_writes(planner: &mut Planner, changes: &[Change]) -> usize {
    planner.plan(changes).expect("plan").len()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn n_label(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

// ---------------------------------------------------------------- main

struct Options {
    connects: usize,
    sizes: Vec<usize>,
    iptables: Vec<Backend4>,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        connects: 2000,
        sizes: SIZES.to_vec(),
        iptables: vec![Backend4::Nft, Backend4::Legacy],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--connects" => {
                o.connects = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or("--connects takes 1..=100000")?;
            }
            // A smoke run of the whole flow: small sizes, few connects.
            "--quick" => {
                o.sizes = vec![100, 1000];
                o.connects = 200;
            }
            "--iptables" => {
                o.iptables = match it.next().map(String::as_str) {
                    Some("nft") => vec![Backend4::Nft],
                    Some("legacy") => vec![Backend4::Legacy],
                    Some("both") => vec![Backend4::Nft, Backend4::Legacy],
                    _ => return Err("--iptables takes nft, legacy or both".into()),
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => return serve(&args[1..]),
        Some("client") => return client(&args[1..]),
        _ => {}
    }
    let opts = match options(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("datapath-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !is_root() {
        eprintln!(
            "SKIPPED datapath-bench: needs root (BPF, network namespaces, cgroups, bpffs mount, iptables in a private netns); nothing was measured"
        );
        return ExitCode::SUCCESS;
    }
    bench(&opts);
    ExitCode::SUCCESS
}

#[derive(Debug, Default, Clone, Copy)]
struct Row {
    ours: Duration,
    ours_writes: usize,
}

fn bench(opts: &Options) {
    let load_start = loadavg();
    println!("datapath-bench");
    println!(
        "  kernel {}, {} CPUs, load average at start {load_start}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut lab = Lab::new("db");
    let mut tools = Vec::new();
    for b in &opts.iptables {
        match iptables_works(&mut lab, *b, tmp.path()) {
            Ok(()) => tools.push(*b),
            Err(e) => println!("  {} unusable in a private netns, skipped: {e}", b.name()),
        }
    }
    for t in &tools {
        println!("  {}: {}", t.name(), tool_version(t.restore()));
    }
    if tools.is_empty() {
        println!(
            "  no iptables backend works (run scripts/bench-deps); eBPF figures only, no ratios"
        );
    }

    // Pods: the backend listener; a socket-LB client (no netfilter rules at all); one
    // client per iptables backend (its nat table holds the rules). Same bridge, same /24;
    // every client routes 198.19.0.0/16 on-link (as a node's default route would), so a
    // VIP reaches nothing unless translated.
    let backend = lab.pod("b", Ipv4Addr::new(198, 18, 200, 10));
    let lb_client = lab.pod("cb", Ipv4Addr::new(198, 18, 200, 20));
    let ipt_clients: Vec<(Backend4, Pod)> = tools
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let ip = Ipv4Addr::new(198, 18, 200, 30 + u8::try_from(k).expect("fits"));
            (*t, lab.pod(&format!("c{k}"), ip))
        })
        .collect();
    for p in std::iter::once(&lb_client).chain(ipt_clients.iter().map(|(_, p)| p)) {
        run(
            "ip",
            &[
                "-n",
                &p.netns,
                "route",
                "add",
                "198.19.0.0/16",
                "dev",
                "eth0",
            ],
        );
    }
    let _server = start_server(&backend);
    let pins = Bpffs::new();
    let cg = Cgroup::new("dpbench");

    // Reference: straight to the backend (no translation, no rules).
    let direct_targets: Vec<SocketAddrV4> = (0..BACKENDS)
        .map(|j| SocketAddrV4::new(backend.ip, BACKEND_PORT + j))
        .collect();
    let _ = connects(&lb_client, None, &direct_targets, 200).expect("warm-up");
    let direct = lat(&connects(&lb_client, None, &direct_targets, opts.connects)
        .expect("direct connects to the backend"));

    let mut prog: BTreeMap<usize, Row> = BTreeMap::new();
    let mut ipt_prog: BTreeMap<(usize, &'static str), Duration> = BTreeMap::new();
    let mut conn: BTreeMap<(usize, &'static str), Lat> = BTreeMap::new();
    let empty_rules = tmp.path().join("empty.rules");
    std::fs::write(&empty_rules, "*nat\nCOMMIT\n").expect("write");

    for &n in &opts.sizes {
        eprintln!("… {} services", n_label(n));
        let set = service_set(n, backend.ip);
        let changes = upserts(&set);
        let targets: Vec<SocketAddrV4> = probes(n)
            .into_iter()
            .map(|i| SocketAddrV4::new(vip(i), SERVICE_PORT))
            .collect();

        // eBPF: program, then connect through socket LB.
        let mut dp = open(&pins, &format!("n{n}"), Some(&cg));
        let took = apply_batched(&mut dp, &changes, BATCH);
        let writes = map_writes(&mut Planner::new(), &changes);
        prog.insert(
            n,
            Row {
                ours: took,
                ours_writes: writes,
            },
        );
        let _ = connects(&lb_client, Some(&cg), &targets, 200).expect("warm-up");
        let l = connects(&lb_client, Some(&cg), &targets, opts.connects)
            .unwrap_or_else(|e| panic!("socket-LB connects at {n} services: {e}"));
        conn.insert((n, "socket-LB (eBPF)"), lat(&l));
        dp.uninstall().expect("uninstall");

        // iptables: empty nat table, then one restore of the whole set; then connect.
        if !ipt_clients.is_empty() {
            let file = tmp.path().join(format!("kube-proxy-{n}.rules"));
            std::fs::write(&file, kube_proxy_rules(&set)).expect("write rules");
            for (t, pod) in &ipt_clients {
                iptables_restore(t.restore(), &pod.netns, &empty_rules).expect("empty nat");
                let took = iptables_restore(t.restore(), &pod.netns, &file)
                    .unwrap_or_else(|e| panic!("loading {n} services: {e}"));
                ipt_prog.insert((n, t.name()), took);
                let _ = connects(pod, None, &targets, 200).expect("warm-up");
                let l = connects(pod, None, &targets, opts.connects)
                    .unwrap_or_else(|e| panic!("{} DNAT connects at {n} services: {e}", t.name()));
                conn.insert((n, t.name()), lat(&l));
            }
            for (t, pod) in &ipt_clients {
                iptables_restore(t.restore(), &pod.netns, &empty_rules).expect("empty nat");
            }
        }
    }

    // ------------------------------------------------------------ tables 1 and 2
    println!();
    println!(
        "1. Programming N services × {BACKENDS} backends (wall time; eBPF: Datapath::apply in batches of {BATCH} into fresh pinned maps; iptables: one restore into an empty nat table of a private netns)"
    );
    let mut h = format!("{:>8} {:>12} {:>12}", "services", "eBPF ms", "map writes");
    for t in &tools {
        let _ = write!(h, " {:>20} {:>10}", format!("{} ms", t.name()), "ratio");
    }
    println!("{h}");
    for (n, r) in &prog {
        let mut line = format!(
            "{:>8} {:>12.1} {:>12}",
            n_label(*n),
            ms(r.ours),
            r.ours_writes
        );
        for t in &tools {
            let i = ipt_prog.get(&(*n, t.name())).copied().unwrap_or_default();
            let _ = write!(
                line,
                " {:>20.1} {:>9.1}x",
                ms(i),
                i.as_secs_f64() / r.ours.as_secs_f64()
            );
        }
        println!("{line}");
    }
    println!("   (ratio = iptables time / eBPF time; > 1: eBPF programs faster)");

    println!();
    println!(
        "2. Per connect() (TCP connect + close, {} per row, round-robin over {PROBES} services spread over the list; µs)",
        opts.connects
    );
    println!(
        "   direct to the backend (no translation): p50 {:.1}  p99 {:.1}",
        direct.p50, direct.p99
    );
    let mut h = format!(
        "{:>8} {:>18} {:>9} {:>9}",
        "services", "path", "p50 µs", "p99 µs"
    );
    let _ = write!(h, " {:>14} {:>14}", "p50 vs eBPF", "p50 vs 100");
    println!("{h}");
    let mut paths = vec!["socket-LB (eBPF)"];
    paths.extend(tools.iter().map(|t| t.name()));
    for &n in &opts.sizes {
        let ours = conn.get(&(n, "socket-LB (eBPF)")).copied();
        for p in &paths {
            let Some(l) = conn.get(&(n, *p)) else {
                continue;
            };
            let base = conn.get(&(opts.sizes[0], *p)).map_or(f64::NAN, |b| b.p50);
            println!(
                "{:>8} {:>18} {:>9.1} {:>9.1} {:>13.2}x {:>13.2}x",
                n_label(n),
                p,
                l.p50,
                l.p99,
                ours.map_or(f64::NAN, |o| l.p50 / o.p50),
                l.p50 / base
            );
        }
    }
    println!(
        "   (p50 vs eBPF = this path's p50 / socket-LB p50 at the same size; p50 vs 100 = this path's p50 / its own p50 at 100 services)"
    );

    // ------------------------------------------------------------ table 3
    println!();
    println!(
        "3. Map update throughput of the syncer path (Datapath::apply; writes = raw map writes the planner issues)"
    );
    println!(
        "{:>10} {:>8} {:>10} {:>9} {:>10} {:>12} {:>14} {:>8}",
        "state", "change", "per apply", "changes", "ms", "changes/s", "map writes/s", "ratio"
    );
    for base in [100usize, *opts.sizes.last().unwrap_or(&100)] {
        throughput(&pins, base, backend.ip);
    }
    println!(
        "   (service change: a service's 4 backends replaced by 4 new ones; ipcache change: a new /32; ratio = batched / single changes/s)"
    );
    println!();
    println!("load average at start {load_start}, at end {}", loadavg());
}

/// Rows of table 3 for an existing state of `base` services.
fn throughput(pins: &Bpffs, base: usize, real: Ipv4Addr) {
    let set = service_set(base, real);
    let mut dp = open(pins, &format!("tp{base}"), None);
    let mut shadow = Planner::new();
    let initial = upserts(&set);
    apply_batched(&mut dp, &initial, BATCH);
    map_writes(&mut shadow, &initial);

    // Service changes: rotate every service's backends to new addresses (generation g).
    let svc_changes = |g: usize, count: usize| -> Vec<Change> {
        (0..count)
            .map(|k| {
                let (key, _) = &set[k % set.len()];
                let i = u32::try_from(k % set.len()).expect("fits");
                Change::UpsertService {
                    key: *key,
                    backends: (0..BACKENDS)
                        .map(|j| Backend {
                            ip: Ipv4Addr::from(
                                u32::from(Ipv4Addr::new(198, 18, 128, 0)) + (i % 32_768),
                            ),
                            // A new port per round over the set: every change moves.
                            port: 10_000
                                + u16::try_from((g * 37 + k / set.len()) % 5000).expect("fits")
                                    * BACKENDS
                                + j,
                        })
                        .collect(),
                }
            })
            .collect()
    };
    let ipc_changes = |offset: u32, count: usize| -> Vec<Change> {
        (0..count)
            .map(|k| Change::UpsertIpcache {
                prefix: ipnet::Ipv4Net::new(
                    Ipv4Addr::from(
                        u32::from(Ipv4Addr::new(198, 18, 0, 0))
                            + (offset + u32::try_from(k).expect("fits")) % (1 << 17),
                    ),
                    32,
                )
                .expect("prefix"),
                identity: 70_000 + u32::try_from(k % 1000).expect("fits"),
                cluster_id: 1,
            })
            .collect()
    };
    let state = format!("{} svc", n_label(base));
    let mut row = |kind: &str, changes: Vec<Change>, per: usize, single_rate: &mut f64| {
        let writes = map_writes(&mut shadow, &changes);
        let took = apply_batched(&mut dp, &changes, per);
        let rate = changes.len() as f64 / took.as_secs_f64();
        let ratio = if per == 1 {
            *single_rate = rate;
            String::from("1.0x")
        } else {
            format!("{:.1}x", rate / *single_rate)
        };
        println!(
            "{:>10} {:>8} {:>10} {:>9} {:>10.1} {:>12.0} {:>14.0} {:>8}",
            state,
            kind,
            per,
            changes.len(),
            ms(took),
            rate,
            writes as f64 / took.as_secs_f64(),
            ratio
        );
    };
    // One change per apply: bounded counts (each apply re-plans on a copy of the state).
    let single = if base > 1000 { 500 } else { 2000 };
    let mut r = 0.0;
    row("service", svc_changes(1, single), 1, &mut r);
    row("service", svc_changes(2, 16_384), BATCH, &mut r);
    row("ipcache", ipc_changes(0, single), 1, &mut r);
    row("ipcache", ipc_changes(20_000, 65_536), BATCH, &mut r);
}
