//! `meshctl up` / `meshctl down` end to end: a two-cluster mesh on this machine, started
//! by the real binaries, found ready, idempotent, and stopped without leaving a process.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use mesh_tests::meshctl::{
    MeshGuard, alive, examples_dir, meshctl, meshctl_env, pids, procs_with, read_state, text,
};

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

    // The datapath: real eBPF as root (a bpffs and one cgroup per cluster, both recorded
    // for `down`), recording otherwise — and `status` says which.
    // Root: the eBPF datapath must run (under MESHD_REQUIRE_PRIVILEGED, lacking root fails).
    let root = mesh_tests::lab::privileged("meshctl_up (eBPF datapath of meshctl up)");
    let st = meshctl(&["status"], &dir);
    let st_out = String::from_utf8_lossy(&st.stdout);
    let cgroups: Vec<std::path::PathBuf> = clusters
        .iter()
        .filter_map(|c| c["cgroup"].as_str().map(std::path::PathBuf::from))
        .collect();
    let bpffs = state["bpffsMount"].as_str().map(std::path::PathBuf::from);
    if root {
        assert_eq!(state["datapath"], "ebpf", "{state:#}");
        assert_eq!(cgroups.len(), 2, "{state:#}");
        assert!(cgroups.iter().all(|c| c.is_dir()));
        assert!(
            st_out.matches("datapath ebpf").count() == 2,
            "{}",
            text(&st)
        );
        // A process run with `meshctl exec` lands in the cluster's cgroup.
        let ex = meshctl_env(
            &[
                "exec",
                "east",
                "--state-dir",
                dir.to_str().expect("utf-8"),
                "--",
                "cat",
                "/proc/self/cgroup",
            ],
            &[],
        );
        let cg_name = cgroups[0]
            .strip_prefix(cgroups[0].ancestors().nth(2).expect("cgroup root"))
            .expect("relative cgroup")
            .display()
            .to_string();
        assert!(
            String::from_utf8_lossy(&ex.stdout).contains(&cg_name),
            "{cg_name}: {}",
            text(&ex)
        );
    } else {
        eprintln!("not root: checking the recording datapath only");
        assert!(
            state["datapath"]
                .as_str()
                .unwrap_or("")
                .starts_with("recording"),
            "{state:#}"
        );
        assert!(st_out.contains("RECORDING"), "{}", text(&st));
    }

    // A mesh set up before certificates carried roles: east's admin certificate has none, so
    // the gRPC APIs refuse meshctl (and say why) until `up` on the running mesh reissues it.
    let pki = dir.join("east/pki");
    let ca = mesh_certs::CertificateAuthority::from_files(&pki.join("ca.crt"), &pki.join("ca.key"))
        .expect("east's CA");
    ca.issue(&mesh_certs::CertRequest::client("root"))
        .and_then(|c| c.write_files(&pki, "root"))
        .expect("a role-less root certificate");
    let refused = meshctl(&["status", "-o", "json"], &dir);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("CN=root carries no role"),
        "{}",
        text(&refused)
    );

    // Idempotent: already up, nothing new started; the role-less certificate is reissued.
    let again = meshctl(&["up", "--clusters", "2", "--examples", examples], &dir);
    assert!(
        again.status.success(),
        "second up failed:\n{}",
        text(&again)
    );
    let again_out = String::from_utf8_lossy(&again.stdout);
    assert!(
        again_out.contains("already up"),
        "second up did not say already up:\n{}",
        text(&again)
    );
    assert!(
        again_out.contains("root.crt (CN=root) with role admin")
            && again_out.matches("reissued").count() == 1,
        "second up did not reissue exactly the role-less certificate:\n{}",
        text(&again)
    );
    let st = meshctl(&["status"], &dir);
    assert!(st.status.success(), "{}", text(&st));
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
    for cg in &cgroups {
        assert!(!cg.exists(), "down left cgroup {}", cg.display());
    }
    if let Some(m) = &bpffs {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
        assert!(
            !mounts.contains(&m.display().to_string()),
            "down left the bpffs mounted at {}",
            m.display()
        );
    }
}

#[test]
fn up_rejects_more_clusters_than_examples() {
    // deploy/examples/clusters lists 8.
    let dir = tempfile::Builder::new()
        .prefix("meshctl-up-")
        .tempdir()
        .expect("temp dir");
    let examples = examples_dir();
    let out = meshctl(
        &[
            "up",
            "--clusters",
            "9",
            "--examples",
            examples.to_str().expect("utf-8 path"),
        ],
        dir.path(),
    );
    assert!(
        !out.status.success(),
        "up --clusters 9 succeeded:\n{}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--clusters") && err.contains("east, west, north, south"),
        "{err}"
    );
    assert!(!dir.path().join("state.json").exists());
}
