//! `meshctl up --clusters N` wall time, from the command starting to every agent ready, with
//! the time of each phase, against a baseline measured in the same run: starting the same
//! number of bare etcd processes (TLS, client-cert auth, auth on) one after the other, which
//! is the floor of `up`'s serial etcd start.
//!
//! Run: `cargo build --release --workspace --bins && target/release/up-bench [runs]`
//! (uses the meshctl, clustermesh-apiserver and mesh-agent next to this binary).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::etcd::EtcdGuard;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy/examples")
}

#[derive(Default, Clone)]
struct Phases {
    etcds: Duration,
    peered: Duration,
    started: Duration,
    ready: Duration,
}

fn one_up(meshctl: &Path, n: usize) -> Phases {
    let dir = tempfile::Builder::new()
        .prefix("up-bench-")
        .tempdir()
        .expect("temp dir");
    let t0 = Instant::now();
    let mut child = Command::new(meshctl)
        .args(["up", "--clusters", &n.to_string(), "--state-dir"])
        .arg(dir.path())
        .arg("--examples")
        .arg(examples())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("meshctl up");
    let mut p = Phases::default();
    let (mut etcds, mut agents) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("line");
        let at = t0.elapsed();
        if line.contains(": etcd started") {
            etcds += 1;
        } else if line.starts_with("admin kubeconfig:") && p.etcds.is_zero() {
            p.etcds = at;
        } else if line.contains(": mesh-agent started") {
            agents += 1;
            if agents == n {
                p.started = at;
            }
        } else if line.contains("<->") {
            p.peered = at;
        }
    }
    let st = child.wait().expect("wait");
    p.ready = t0.elapsed();
    assert!(st.success(), "meshctl up --clusters {n} failed");
    assert_eq!(etcds, n, "not every etcd started");
    let down = Command::new(meshctl)
        .args(["down", "--purge", "--state-dir"])
        .arg(dir.path())
        .output()
        .expect("meshctl down");
    assert!(down.status.success(), "meshctl down failed");
    p
}

fn baseline(rt: &tokio::runtime::Runtime, n: usize) -> Duration {
    rt.block_on(async {
        let t0 = Instant::now();
        let mut guards: Vec<EtcdGuard> = Vec::with_capacity(n);
        for _ in 0..n {
            guards.push(EtcdGuard::start().await.expect("etcd"));
        }
        let d = t0.elapsed();
        drop(guards);
        d
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    meshd::process::install_crypto_provider().expect("crypto provider");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let exe = std::env::current_exe().expect("current exe");
    let meshctl = exe.parent().expect("bin dir").join("meshctl");
    assert!(meshctl.exists(), "{} missing", meshctl.display());
    println!(
        "meshctl up wall time ({runs} runs each, median; binaries {})",
        meshctl
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    println!(
        "| clusters | etcds up + auth | + peered | + processes started | all agents ready | N-etcd serial baseline | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for n in [2usize, 8] {
        let all: Vec<Phases> = (0..runs).map(|_| one_up(&meshctl, n)).collect();
        let base = median((0..runs).map(|_| baseline(&rt, n)).collect());
        let ready = median(all.iter().map(|p| p.ready).collect());
        println!(
            "| {n} | {} | {} | {} | {} (min {}, max {}) | {} | {:.2} |",
            ms(median(all.iter().map(|p| p.etcds).collect())),
            ms(median(all.iter().map(|p| p.peered).collect())),
            ms(median(all.iter().map(|p| p.started).collect())),
            ms(ready),
            ms(all.iter().map(|p| p.ready).min().unwrap_or_default()),
            ms(all.iter().map(|p| p.ready).max().unwrap_or_default()),
            ms(base),
            ready.as_secs_f64() / base.as_secs_f64()
        );
    }
}
