//! DNS benchmark: dnsperf against the agent's `clusterset.local` server holding 10k global
//! services, and against Unbound (one thread, the same names as `local-data`) in the same
//! run: QPS, average and p99 latency, loss, and resident memory per record.
//!
//! Run: `cargo run --release -p mesh-tests --bin dns-bench [seconds]` (needs `dnsperf` and
//! `unbound`, which `scripts/deps` installs). Everything listens on 127.0.0.1 only.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mesh_agent::dns::{Bound, DnsConfig, DnsMetrics, serve};
use mesh_agent::view::{MergedService, ServiceKey, ServicesSnapshot};
use mesh_tests::util::ChildGuard;
use meshd::model::{Affinity, ClusterName, Protocol, ServicePort};
use tokio_util::sync::CancellationToken;

const SERVICES: usize = 10_000;

fn services() -> Arc<ServicesSnapshot> {
    let east = ClusterName::new("east").expect("name");
    let mut entries = BTreeMap::new();
    for i in 0..SERVICES {
        let s = MergedService {
            namespace: format!("ns{}", i % 100),
            name: format!("svc{i}"),
            headless: false,
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            frontends_local: vec![],
            // 198.19.0.0/16 has room for 65k.
            clusterset_ip: Some(std::net::IpAddr::from([
                198,
                19,
                u8::try_from(i / 250).expect("fits"),
                u8::try_from(i % 250 + 1).expect("fits"),
            ])),
            backends: vec![],
            active_backends: vec![],
            affinity: Affinity::None,
            conflicts: vec![],
            clusters: vec![east.clone()],
        };
        entries.insert(ServiceKey::new(&s.namespace, &s.name), Arc::new(s));
    }
    Arc::new(ServicesSnapshot {
        generation: 1,
        entries,
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

struct Perf {
    qps: f64,
    avg_ms: f64,
    p99_ms: f64,
    lost: u64,
    sent: u64,
}

/// Runs dnsperf with per-query output (`-v`) and computes the figures from it.
fn dnsperf(addr: SocketAddr, queries: &Path, seconds: u64) -> Perf {
    let out = Command::new("dnsperf")
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("-d")
        .arg(queries)
        .args([
            "-l",
            &seconds.to_string(),
            "-c",
            "4",
            "-q",
            "200",
            "-t",
            "2",
            "-v",
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("dnsperf (install it: scripts/deps)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lat: Vec<f64> = Vec::new();
    let (mut qps, mut lost, mut sent) = (0.0, 0, 0);
    for l in text.lines() {
        // "> NOERROR svc1.ns1.svc.clusterset.local A 0.000123"
        if let Some(rest) = l.strip_prefix("> ") {
            if let Some(s) = rest.split_whitespace().last().and_then(|v| v.parse().ok()) {
                lat.push(s);
            }
        } else if let Some(v) = l.trim().strip_prefix("Queries per second:") {
            qps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.trim().strip_prefix("Queries lost:") {
            lost = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = l.trim().strip_prefix("Queries sent:") {
            sent = v.trim().parse().unwrap_or(0);
        }
    }
    lat.sort_by(f64::total_cmp);
    let avg = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<f64>() / lat.len() as f64
    };
    let p99 = lat
        .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    Perf {
        qps,
        avg_ms: avg * 1000.0,
        p99_ms: p99 * 1000.0,
        lost,
        sent,
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_answering(addr: SocketAddr, name: &str) {
    for _ in 0..100 {
        let ok = Command::new("dig")
            .args([
                "+short",
                "+tries=1",
                "+time=1",
                "-p",
                &addr.port().to_string(),
            ])
            .arg(format!("@{}", addr.ip()))
            .arg(name)
            .output()
            .is_ok_and(|o| !o.stdout.is_empty());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr} never answered {name}");
}

/// Starts `unbound -d` with `data` as local-data; killed when the guard drops.
fn unbound(
    dir: &Path,
    tag: &str,
    data: &[(String, std::net::IpAddr)],
) -> (ChildGuard, u32, SocketAddr) {
    let port = free_port();
    let conf = dir.join(format!("unbound-{tag}.conf"));
    let mut c = std::fs::File::create(&conf).expect("unbound.conf");
    writeln!(
        c,
        "server:\n  interface: 127.0.0.1\n  port: {port}\n  num-threads: 1\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  directory: \"{}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  access-control: 127.0.0.0/8 allow\n  local-zone: \"clusterset.local.\" static",
        dir.display()
    )
    .expect("write");
    for (n, ip) in data {
        writeln!(c, "  local-data: \"{n}. 5 IN A {ip}\"").expect("write");
    }
    drop(c);
    let child = Command::new("unbound")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("unbound (install it: scripts/deps)");
    let pid = child.id();
    (
        ChildGuard(child),
        pid,
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
}

fn wait_answering_soa(addr: SocketAddr) {
    for _ in 0..100 {
        let ok = Command::new("dig")
            .args(["+tries=1", "+time=1", "-p", &addr.port().to_string()])
            .arg(format!("@{}", addr.ip()))
            .args(["clusterset.local", "SOA"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("status:"));
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr} never answered");
}

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = services();
    let names: Vec<String> = snap
        .entries
        .values()
        .map(|s| format!("{}.{}.svc.clusterset.local", s.name, s.namespace))
        .collect();
    let qfile = dir.path().join("queries");
    let mut f = std::fs::File::create(&qfile).expect("queries");
    for n in &names {
        writeln!(f, "{n} A").expect("write");
    }
    drop(f);

    // Ours, in this process (one tokio worker per core, as the agent runs).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let me = std::process::id();
    let rss_before = rss_kib(me);
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::watch::channel(snap.clone());
    let (btx, brx) = tokio::sync::oneshot::channel::<Bound>();
    let port = free_port();
    let mut cfg = DnsConfig::new(SocketAddr::from(([127, 0, 0, 1], port)));
    cfg.ttl = 5;
    rt.spawn(serve(
        cfg,
        rx,
        DnsMetrics::default(),
        Some(btx),
        stop.clone(),
    ));
    let ours = rt.block_on(brx).expect("bound").udp;
    wait_answering(ours, &names[0]);
    let ours_perf = dnsperf(ours, &qfile, seconds);
    let rss_ours = rss_kib(me).saturating_sub(rss_before);

    // Unbound, one thread: once without data (baseline RSS), once with the same names as
    // local-data.
    let (empty_guard, empty_pid, empty_addr) = unbound(dir.path(), "empty", &[]);
    wait_answering_soa(empty_addr);
    let rss_unbound_empty = rss_kib(empty_pid);
    drop(empty_guard);
    let data: Vec<(String, std::net::IpAddr)> = snap
        .entries
        .values()
        .zip(&names)
        .map(|(s, n)| (n.clone(), s.clusterset_ip.expect("ip")))
        .collect();
    let (_guard, upid, uaddr) = unbound(dir.path(), "full", &data);
    wait_answering(uaddr, &names[0]);
    let unbound_perf = dnsperf(uaddr, &qfile, seconds);
    // After the run every name has been served (pages touched), as for ours.
    let rss_unbound_full = rss_kib(upid);
    let rss_unbound = rss_unbound_full.saturating_sub(rss_unbound_empty);
    println!(
        "Unbound RSS: {rss_unbound_empty} KiB without data (just started), {rss_unbound_full} KiB with the 10k names after the run"
    );

    let records = names.len() as f64;
    println!(
        "DNS: {} names (A), dnsperf {seconds} s, 4 clients, 200 outstanding, loopback",
        names.len()
    );
    println!("| server | QPS | avg latency | p99 latency | lost/sent | RSS | RSS/record |");
    println!("|---|---|---|---|---|---|---|");
    for (who, p, rss) in [
        (
            "meshd agent DNS (hickory, multi-thread)",
            &ours_perf,
            rss_ours,
        ),
        ("Unbound 1 thread (local-data)", &unbound_perf, rss_unbound),
    ] {
        println!(
            "| {who} | {:.0} | {:.3} ms | {:.3} ms | {}/{} | {} KiB | {:.0} B |",
            p.qps,
            p.avg_ms,
            p.p99_ms,
            p.lost,
            p.sent,
            rss,
            rss as f64 * 1024.0 / records
        );
    }
    println!(
        "ratio ours/unbound: QPS {:.2}, p99 {:.2}",
        ours_perf.qps / unbound_perf.qps.max(1.0),
        ours_perf.p99_ms / unbound_perf.p99_ms.max(1e-9)
    );
    println!(
        "(RSS: growth of this process from before our server started to after its run; for Unbound, its RSS with the 10k local-data after its run minus a fresh instance's with none)"
    );
    stop.cancel();
    drop(tx);
}
