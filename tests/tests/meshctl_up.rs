//! `meshctl up` / `meshctl down` end to end: a two-cluster mesh on this machine, started
//! by the real binaries, found ready, idempotent, and stopped without leaving a process.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use mesh_tests::bin_path;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy/examples")
}

fn meshctl(args: &[&str], dir: &Path) -> Output {
    Command::new(bin_path("meshctl"))
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .output()
        .expect("running meshctl")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn read_state(dir: &Path) -> Option<Value> {
    let b = std::fs::read(dir.join("state.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

fn pids(state: &Value) -> Vec<u32> {
    let mut v: Vec<u32> = state["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["processes"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect();
    v.sort_unstable();
    v
}

/// Whether `pid` is a live, non-zombie process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start())
            .is_some_and(|r| r.starts_with('Z') || r.starts_with('X')),
        Err(_) => false,
    }
}

/// Live processes whose command line mentions `needle`, and whose argv[0] ends in `bin`.
fn procs_with(bin: &str, needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let argv0 = cmd.split(' ').next().unwrap_or_default();
        if argv0.ends_with(bin) && cmd.contains(needle) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

fn readyz(port: u16) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `meshctl down --purge` on drop and, as a last resort, SIGKILLs whatever recorded
/// PID is still alive and any etcd/apiserver/agent naming the temp dir.
struct MeshGuard {
    dir: tempfile::TempDir,
}

impl Drop for MeshGuard {
    fn drop(&mut self) {
        let dir = self.dir.path().to_owned();
        let recorded = read_state(&dir).map(|s| pids(&s)).unwrap_or_default();
        if dir.join("state.json").exists() {
            let _ = meshctl(&["down", "--purge"], &dir);
        }
        let needle = dir.display().to_string();
        let mut left: Vec<u32> = recorded.into_iter().filter(|p| alive(*p)).collect();
        for bin in ["etcd", "clustermesh-apiserver", "mesh-agent"] {
            left.extend(procs_with(bin, &needle));
        }
        for pid in left {
            if let Ok(p) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
    }
}

#[test]
fn up_is_ready_idempotent_and_down_leaves_nothing() {
    let guard = MeshGuard {
        dir: tempfile::Builder::new()
            .prefix("meshctl-up-")
            .tempdir()
            .expect("temp dir"),
    };
    let dir = guard.dir.path().to_owned();
    let examples = examples_dir();
    let examples = examples.to_str().expect("utf-8 path");

    let started = Instant::now();
    let up = meshctl(&["up", "--clusters", "2", "--examples", examples], &dir);
    assert!(up.status.success(), "meshctl up failed:\n{}", text(&up));
    eprintln!("meshctl up took {:?}", started.elapsed());

    let state = read_state(&dir).expect("state.json after up");
    let clusters = state["clusters"].as_array().expect("clusters");
    let names: Vec<&str> = clusters.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["east", "west"]);
    let first_pids = pids(&state);
    assert_eq!(first_pids.len(), 6, "etcd, apiserver, agent per cluster");
    for pid in &first_pids {
        assert!(alive(*pid), "pid {pid} not running after up");
    }
    for c in clusters {
        let port = c["agentHealthPort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .expect("agentHealthPort");
        assert_eq!(readyz(port), Some(200), "agent of {} /readyz", c["name"]);
    }
    // Peer credentials both ways.
    assert!(dir.join("east/peers/west.kubeconfig").exists());
    assert!(dir.join("west/peers/east.kubeconfig").exists());

    // Idempotent: already up, nothing new started.
    let again = meshctl(&["up", "--clusters", "2", "--examples", examples], &dir);
    assert!(
        again.status.success(),
        "second up failed:\n{}",
        text(&again)
    );
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("already up"),
        "second up did not say already up:\n{}",
        text(&again)
    );
    let state2 = read_state(&dir).expect("state.json after second up");
    assert_eq!(pids(&state2), first_pids, "second up changed the PIDs");
    let needle = dir.display().to_string();
    assert_eq!(procs_with("etcd", &needle).len(), 2, "exactly two etcd");

    // Down: everything recorded stops, the state dir is gone.
    let down = meshctl(&["down", "--purge"], &dir);
    assert!(
        down.status.success(),
        "meshctl down failed:\n{}",
        text(&down)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while first_pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<u32> = first_pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    for bin in ["etcd", "clustermesh-apiserver", "mesh-agent"] {
        let left = procs_with(bin, &needle);
        assert!(left.is_empty(), "{bin} still running after down: {left:?}");
    }
    assert!(!dir.join("state.json").exists(), "down --purge kept state");
}

#[test]
fn up_rejects_more_clusters_than_examples() {
    let dir = tempfile::Builder::new()
        .prefix("meshctl-up-")
        .tempdir()
        .expect("temp dir");
    let examples = examples_dir();
    let out = meshctl(
        &[
            "up",
            "--clusters",
            "3",
            "--examples",
            examples.to_str().expect("utf-8 path"),
        ],
        dir.path(),
    );
    assert!(
        !out.status.success(),
        "up --clusters 3 succeeded:\n{}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--clusters") && err.contains("east, west"),
        "{err}"
    );
    assert!(!dir.path().join("state.json").exists());
}
