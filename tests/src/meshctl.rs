//! Helpers for tests that run the `meshctl` binary: state-dir access, process checks, and
//! a guard that tears the mesh down (and kills leftovers by PID) even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::bin_path;

/// The repository's `deploy/examples`.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy/examples")
}

/// Runs the built `meshctl` with `--state-dir dir`.
pub fn meshctl(args: &[&str], dir: &Path) -> Output {
    Command::new(bin_path("meshctl"))
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .output()
        .expect("running meshctl")
}

/// Runs the built `meshctl` with exactly `args`, plus `env` on top of the inherited
/// environment.
pub fn meshctl_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin_path("meshctl"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running meshctl")
}

/// Exit status and output of a run, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `state.json` of a state directory.
pub fn read_state(dir: &Path) -> Option<Value> {
    let b = std::fs::read(dir.join("state.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Every PID recorded in a state.
pub fn pids(state: &Value) -> Vec<u32> {
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
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start())
            .is_some_and(|r| r.starts_with('Z') || r.starts_with('X')),
        Err(_) => false,
    }
}

/// Live processes whose command line mentions `needle`, and whose argv[0] ends in `bin`.
pub fn procs_with(bin: &str, needle: &str) -> Vec<u32> {
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

/// Runs `meshctl down --purge` on drop and, as a last resort, SIGKILLs whatever recorded
/// PID is still alive and any etcd/apiserver/agent naming the temp dir.
#[derive(Debug)]
pub struct MeshGuard {
    /// The state directory (removed with the guard).
    pub dir: tempfile::TempDir,
}

impl Drop for MeshGuard {
    fn drop(&mut self) {
        let dir = self.dir.path().to_owned();
        let state = read_state(&dir);
        let recorded = state.as_ref().map(pids).unwrap_or_default();
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
        // Last resort for the eBPF datapath `up` set up: its bpffs mount and cgroups.
        let bpffs = dir.join("bpffs");
        if std::fs::read_to_string("/proc/mounts")
            .is_ok_and(|m| m.contains(&format!(" {} bpf ", bpffs.display())))
        {
            let _ = Command::new("umount").arg(&bpffs).status();
        }
        if let Some(root) = state
            .as_ref()
            .and_then(|s| s["cgroupRoot"].as_str().map(PathBuf::from))
        {
            if let Ok(rd) = std::fs::read_dir(&root) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&root);
        }
    }
}

impl MeshGuard {
    /// A guard over a fresh temp state directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp state dir"),
        }
    }
}

impl Default for MeshGuard {
    fn default() -> Self {
        Self::new()
    }
}
