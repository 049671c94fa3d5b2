//! Real BPF in network namespaces: socket LB (TCP, UDP), identity policy, pinned-map reuse.
//!
//! Topology per test: a bridge in the host netns (no address, iptables hooks off) with
//! one veth per "pod" netns, pods addressed from 198.18.0.0/15 on one /24, no route off
//! the machine. The datapath is loaded by this test process in the host netns; tc
//! programs go on the host-side veths; socket programs on a cgroup the test creates,
//! into which client processes move themselves before exec. Every namespace, link,
//! cgroup, bpffs mount and child process is removed on drop, also after a panic.
//! Without root every test says so on stderr and returns.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_agent::datapath::abi::{self, verdict};
use mesh_agent::datapath::{
    AyaConfig, AyaDatapath, Backend, Change, Datapath, Direction, Endpoint, PolicyRule, Protocol,
    ServiceKey, Verdict,
};
use mesh_tests::lab::{Bpffs, Cgroup, Lab, Pod, ifindex, is_root, python};
use mesh_tests::require_root;
use mesh_tests::util::ChildGuard;

// ---------------------------------------------------------------- processes in pods

const SERVER: &str = r#"
import socket, sys, threading
name, ip = sys.argv[1], sys.argv[2]
tcp = [int(p) for p in sys.argv[3].split(',') if p]
udp = int(sys.argv[4])
def serve_tcp(s):
    while True:
        c, _ = s.accept()
        c.sendall(name.encode()); c.close()
def serve_udp(s):
    while True:
        d, a = s.recvfrom(512)
        s.sendto(name.encode(), a)
for p in tcp:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, p)); s.listen(128)
    threading.Thread(target=serve_tcp, args=(s,), daemon=True).start()
if udp:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, udp))
    threading.Thread(target=serve_udp, args=(u,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

const CLIENT: &str = r#"
import socket, sys
proto, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
try:
    family = socket.AF_INET6 if proto.endswith('6') else socket.AF_INET
    if proto.startswith('tcp'):
        s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(timeout)
        s.connect((host, port))
        peer = s.getpeername(); data = s.recv(512)
    else:
        s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(timeout)
        s.sendto(b'hi', (host, port)); data, peer = s.recvfrom(512)
    print('ok %s %s:%d' % (data.decode(), peer[0], peer[1]))
except Exception as e:
    print('err %s' % e); sys.exit(1)
"#;

/// Starts the server in `pod` and waits for "ready".
fn server(pod: &Pod, name: &str, tcp_ports: &[u16], udp_port: u16) -> ChildGuard {
    let ports: Vec<String> = tcp_ports.iter().map(u16::to_string).collect();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", pod.netns))
        .args([
            "--",
            &python(),
            "-c",
            SERVER,
            name,
            &pod.ip.to_string(),
            &ports.join(","),
        ])
        .arg(udp_port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server output");
    let guard = ChildGuard(child);
    assert_eq!(line.trim(), "ready", "server {name} did not start");
    guard
}

/// Runs one client request from `pod` (inside `cgroup` when given); Ok("<reply> <peer>").
fn client(
    pod: &Pod,
    cgroup: Option<&Cgroup>,
    proto: &str,
    host: impl std::fmt::Display,
    port: u16,
    timeout: f64,
) -> Result<String, String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", pod.netns)).arg("--");
    if let Some(cg) = cgroup {
        // Move into the cgroup first: the socket programs run for sockets its members create.
        cmd.args(["sh", "-c", "echo $$ > \"$MESH_CG\" && exec \"$@\"", "sh"])
            .env("MESH_CG", cg.procs());
    }
    let out = cmd
        .args([
            &python(),
            "-c",
            CLIENT,
            proto,
            &host.to_string(),
            &port.to_string(),
            &timeout.to_string(),
        ])
        .output()
        .expect("client");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match stdout.strip_prefix("ok ") {
        Some(rest) if out.status.success() => Ok(rest.to_owned()),
        _ => Err(format!(
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

fn open(pins: &Bpffs, cgroup: Option<&Cgroup>) -> AyaDatapath {
    AyaDatapath::open(AyaConfig {
        pin_dir: pins.pin_dir(),
        cgroup: cgroup.map(|c| c.path.clone()),
        socket_lb: cgroup.is_some(),
    })
    .expect("datapath loads")
}

// ---------------------------------------------------------------- tests

#[test]
fn ebpf_socket_lb_translates_tcp_and_udp_and_restores_the_vip() {
    require_root!("ebpf_socket_lb_translates_tcp_and_udp_and_restores_the_vip");
    let pins = Bpffs::new();
    let cg = Cgroup::new("lb");
    let mut lab = Lab::new("l");
    let client_pod = lab.pod("c", Ipv4Addr::new(198, 18, 101, 10));
    let b1 = lab.pod("b1", Ipv4Addr::new(198, 18, 101, 21));
    let b2 = lab.pod("b2", Ipv4Addr::new(198, 18, 101, 22));
    let _s1 = server(&b1, "b1", &[8080], 5353);
    let _s2 = server(&b2, "b2", &[8080], 5353);

    let mut dp = open(&pins, Some(&cg));
    assert_eq!(dp.mode().as_str(), "ebpf");
    let vip = Ipv4Addr::new(198, 19, 101, 1);
    let backends = vec![
        Backend {
            ip: b1.ip,
            port: 8080,
        },
        Backend {
            ip: b2.ip,
            port: 8080,
        },
    ];
    let udp_backends = vec![
        Backend {
            ip: b1.ip,
            port: 5353,
        },
        Backend {
            ip: b2.ip,
            port: 5353,
        },
    ];
    dp.apply(&[
        Change::UpsertService {
            key: ServiceKey {
                vip,
                port: 80,
                proto: Protocol::Tcp,
            },
            backends,
        },
        Change::UpsertService {
            key: ServiceKey {
                vip,
                port: 53,
                proto: Protocol::Udp,
            },
            backends: udp_backends,
        },
    ])
    .expect("services written");

    // Without the cgroup the VIP is just an unrouted address: proves the programs do the work.
    let outside = client(&client_pod, None, "tcp", vip, 80, 1.0);
    assert!(
        outside.is_err(),
        "a process outside the cgroup reached the VIP: {outside:?}"
    );

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = client(&client_pod, Some(&cg), "tcp", vip, 80, 3.0).expect("TCP via the VIP");
        let (name, peer) = r.split_once(' ').expect("reply and peer");
        assert_eq!(peer, "198.19.101.1:80", "getpeername4 must report the VIP");
        seen.insert(name.to_owned());
    }
    assert_eq!(
        seen.len(),
        2,
        "random slot choice reaches both backends, saw {seen:?}"
    );

    let mut seen_udp = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = client(&client_pod, Some(&cg), "udp", vip, 53, 3.0).expect("UDP via the VIP");
        let (name, peer) = r.split_once(' ').expect("reply and peer");
        assert_eq!(
            peer, "198.19.101.1:53",
            "recvmsg4 must report the reply as from the VIP"
        );
        seen_udp.insert(name.to_owned());
    }
    assert_eq!(
        seen_udp.len(),
        2,
        "UDP reaches both backends, saw {seen_udp:?}"
    );

    // Dual-stack AF_INET6 sockets reach the IPv4 service through its v4-mapped address.
    let mapped = format!("::ffff:{vip}");
    for proto in ["tcp6", "udp6"] {
        let port = if proto == "tcp6" { 80 } else { 53 };
        let r = client(&client_pod, Some(&cg), proto, &mapped, port, 3.0)
            .unwrap_or_else(|e| panic!("{proto} via {mapped}: {e}"));
        let (name, peer) = r.split_once(' ').expect("reply and peer");
        assert!(name == "b1" || name == "b2", "{r}");
        assert_eq!(
            peer,
            format!("{mapped}:{port}"),
            "{proto}: the peer must be the mapped VIP"
        );
    }
    // Outside the cgroup the mapped VIP is unreachable too.
    let outside = client(&client_pod, None, "tcp6", &mapped, 80, 1.0);
    assert!(outside.is_err(), "{outside:?}");

    // Shrink to one backend: every new connection goes there.
    dp.upsert_service(
        ServiceKey {
            vip,
            port: 80,
            proto: Protocol::Tcp,
        },
        vec![Backend {
            ip: b2.ip,
            port: 8080,
        }],
    )
    .expect("shrink");
    for _ in 0..10 {
        let r = client(&client_pod, Some(&cg), "tcp", vip, 80, 3.0).expect("TCP after shrink");
        assert!(r.starts_with("b2 "), "{r}");
    }
    // No backends: the connect is refused at once instead of timing out.
    dp.upsert_service(
        ServiceKey {
            vip,
            port: 80,
            proto: Protocol::Tcp,
        },
        vec![],
    )
    .expect("empty");
    let t = Instant::now();
    let r = client(&client_pod, Some(&cg), "tcp", vip, 80, 3.0);
    assert!(
        r.is_err() && t.elapsed() < Duration::from_secs(2),
        "{r:?} after {:?}",
        t.elapsed()
    );
    // Deleted: the VIP is an ordinary (unrouted) address again.
    dp.delete_service(ServiceKey {
        vip,
        port: 80,
        proto: Protocol::Tcp,
    })
    .expect("delete");
    let snap = dp.snapshot().expect("snapshot");
    assert!(
        snap.services.keys().all(|k| k.port() != 80),
        "TCP service entries left: {snap:?}"
    );
    assert_eq!(snap.backends.len(), 2, "only the UDP backends remain");
}

#[test]
fn ebpf_policy_allows_port_drops_others_reports_and_lets_replies_through() {
    require_root!("ebpf_policy_allows_port_drops_others_reports_and_lets_replies_through");
    let pins = Bpffs::new();
    let mut lab = Lab::new("p");
    let db = lab.pod("db", Ipv4Addr::new(198, 18, 102, 30));
    let api = lab.pod("ap", Ipv4Addr::new(198, 18, 102, 40));
    let other = lab.pod("ot", Ipv4Addr::new(198, 18, 102, 41));
    let _db = server(&db, "db", &[5432, 5433], 0);
    let _api = server(&api, "api", &[9000], 0);

    let mut dp = open(&pins, None);
    let (db_ep, db_id, api_id, other_id) = (7, 70_001, 80_001, 80_002);
    let ipcache = |ip: Ipv4Addr, identity: u32, cluster_id: u16| Change::UpsertIpcache {
        prefix: ipnet::Ipv4Net::new(ip, 32).expect("prefix"),
        identity,
        cluster_id,
    };
    dp.apply(&[
        ipcache(db.ip, db_id, 1),
        ipcache(api.ip, api_id, 2),
        ipcache(other.ip, other_id, 1),
        Change::UpsertEndpoint(Endpoint {
            ip: db.ip,
            endpoint_id: db_ep,
            identity: db_id,
            ifindex: ifindex(&db.host_if),
            enforce_ingress: true,
            // Egress enforced with no egress rule: db's replies pass only as tracked replies.
            enforce_egress: true,
        }),
        Change::UpsertPolicy {
            rule: PolicyRule {
                endpoint_id: db_ep,
                identity: api_id,
                port: 5432,
                proto: abi::PROTO_TCP,
                direction: Direction::Ingress,
            },
            verdict: Verdict::Allow,
            rule_id: 1,
        },
    ])
    .expect("policy written");

    // Before attaching, everything flows.
    client(&other, None, "tcp", db.ip, 5432, 3.0).expect("no policy before attach");
    dp.attach_interface(&db.host_if).expect("tc attach");
    assert_eq!(dp.attached_interfaces(), vec![db.host_if.clone()]);
    let before = dp.counters().expect("counters");
    let _ = dp.take_drop_events();

    // Allowed: api → db:5432, several times (the SYN-ACK and data come back through the
    // egress-enforced hook only because the flow is tracked).
    for _ in 0..3 {
        let r = client(&api, None, "tcp", db.ip, 5432, 3.0).expect("api → db:5432 allowed");
        assert!(r.starts_with("db "), "{r}");
    }
    // Other port from the allowed identity: dropped.
    let r = client(&api, None, "tcp", db.ip, 5433, 1.0);
    assert!(r.is_err(), "api → db:5433 must be dropped: {r:?}");
    // Allowed port from another identity: dropped.
    let r = client(&other, None, "tcp", db.ip, 5432, 1.0);
    assert!(r.is_err(), "other → db:5432 must be dropped: {r:?}");
    // db may not open connections (egress enforced, no rule).
    let r = client(&db, None, "tcp", api.ip, 9000, 1.0);
    assert!(r.is_err(), "db → api:9000 must be dropped: {r:?}");

    let after = dp.counters().expect("counters");
    let delta = |v| after.packets(v) - before.packets(v);
    assert!(
        delta(verdict::ALLOW_POLICY) >= 3,
        "allowed new flows: {after:?}"
    );
    assert!(
        delta(verdict::ALLOW_CT) >= 6,
        "tracked packets both ways: {after:?}"
    );
    assert!(delta(verdict::DROP_POLICY) >= 3, "dropped: {after:?}");

    let events = dp.take_drop_events();
    let find = |src: Ipv4Addr, dport: u16| {
        events
            .iter()
            .find(|e| e.src() == src && e.dst_port() == dport)
            .unwrap_or_else(|| panic!("no drop event {src} → :{dport} in {events:?}"))
    };
    let e = find(api.ip, 5433);
    assert_eq!((e.src_identity, e.dst_identity), (api_id, db_id));
    assert_eq!(
        (e.proto, e.direction, e.reason),
        (
            abi::PROTO_TCP,
            abi::direction::INGRESS,
            verdict::DROP_POLICY as u8
        )
    );
    assert_eq!(
        (e.endpoint_id, e.remote_cluster_id, e.dst()),
        (db_ep, 2, db.ip)
    );
    let e = find(other.ip, 5432);
    assert_eq!((e.src_identity, e.dst_identity), (other_id, db_id));
    let e = find(db.ip, 9000);
    assert_eq!(
        (e.src_identity, e.dst_identity, e.direction),
        (db_id, api_id, abi::direction::EGRESS)
    );
    assert!(
        events
            .iter()
            .all(|e| !(e.src() == api.ip && e.dst_port() == 5432)),
        "an allowed flow produced a drop: {events:?}"
    );

    // Detach: policy no longer applies.
    dp.detach_interface(&db.host_if).expect("detach");
    client(&other, None, "tcp", db.ip, 5432, 3.0).expect("no policy after detach");
}

/// Programs attached to `cg`, from `bpftool -j cgroup show`.
fn cgroup_programs(cg: &Cgroup) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&cg.path)
        .output()
        .expect("bpftool (scripts/deps installs it)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["name"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn pinned_links(pins: &Bpffs) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pins.pin_dir().join("links"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn ebpf_reload_with_the_same_pin_dir_keeps_maps_links_and_traffic() {
    require_root!("ebpf_reload_with_the_same_pin_dir_keeps_maps_links_and_traffic");
    let pins = Bpffs::new();
    let cg = Cgroup::new("re");
    let mut lab = Lab::new("r");
    let client_pod = lab.pod("c", Ipv4Addr::new(198, 18, 103, 10));
    let b1 = lab.pod("b1", Ipv4Addr::new(198, 18, 103, 21));
    let _s1 = server(&b1, "b1", &[8080], 0);
    let vip = Ipv4Addr::new(198, 19, 103, 1);
    let key = ServiceKey {
        vip,
        port: 80,
        proto: Protocol::Tcp,
    };
    // Policy on b1: only 8080 in. A dropped SYN times out; without policy, the closed
    // port 8081 answers with a RST ("refused") at once.
    let enforced = |label: &str| {
        let r = client(&client_pod, None, "tcp", b1.ip, 8081, 1.0);
        assert!(
            r.as_ref().is_err_and(|e| e.contains("timed out")),
            "{label}: policy must drop :8081, got {r:?}"
        );
    };
    let translated = |label: &str| {
        let r = client(&client_pod, Some(&cg), "tcp", vip, 80, 3.0)
            .unwrap_or_else(|e| panic!("{label}: VIP unreachable: {e}"));
        assert!(r.starts_with("b1 "), "{label}: {r}");
    };

    let mut dp = open(&pins, Some(&cg));
    dp.apply(&[
        Change::UpsertService {
            key,
            backends: vec![Backend {
                ip: b1.ip,
                port: 8080,
            }],
        },
        Change::UpsertIpcache {
            prefix: "198.18.103.0/24".parse().expect("prefix"),
            identity: 4242,
            cluster_id: 3,
        },
        Change::UpsertEndpoint(Endpoint {
            ip: b1.ip,
            endpoint_id: 9,
            identity: 4243,
            ifindex: 0,
            enforce_ingress: true,
            enforce_egress: false,
        }),
        Change::UpsertPolicy {
            rule: PolicyRule {
                endpoint_id: 9,
                identity: 0,
                port: 8080,
                proto: abi::PROTO_TCP,
                direction: Direction::Ingress,
            },
            verdict: Verdict::Allow,
            rule_id: 5,
        },
    ])
    .expect("written");
    dp.attach_interface(&b1.host_if).expect("tc attach");
    let before = dp.snapshot().expect("snapshot");
    assert_eq!(before.services.len(), 2, "master + 1 slot");
    translated("first agent");
    enforced("first agent");
    assert_eq!(cgroup_programs(&cg).len(), 8, "{:?}", cgroup_programs(&cg));
    let first_links = pinned_links(&pins);
    assert_eq!(
        first_links.len(),
        10,
        "8 socket + 2 tc links: {first_links:?}"
    );

    // The agent goes away (a crash is the same: nothing runs on drop).
    drop(dp);
    for m in [
        abi::map::LB4_SERVICES,
        abi::map::LB4_BACKENDS,
        abi::map::IPCACHE4,
        abi::map::ENDPOINTS,
        abi::map::POLICY,
    ] {
        assert!(
            Path::new(&pins.pin_dir().join(m)).exists(),
            "{m} not pinned"
        );
    }
    translated("no agent");
    enforced("no agent");

    // The next agent: same maps, its own links, the old generation retired.
    let mut dp = open(&pins, Some(&cg));
    let after = dp.snapshot().expect("snapshot");
    assert_eq!(
        after, before,
        "reload must reuse the pinned maps, not flush them"
    );
    assert_eq!(
        dp.services().get(&key),
        Some(&vec![Backend {
            ip: b1.ip,
            port: 8080
        }])
    );
    dp.attach_interface(&b1.host_if).expect("tc attach again");
    let second_links = pinned_links(&pins);
    assert_eq!(
        second_links.len(),
        10,
        "old links retired: {second_links:?}"
    );
    assert!(
        second_links.iter().all(|l| !first_links.contains(l)),
        "{first_links:?} → {second_links:?}"
    );
    assert_eq!(cgroup_programs(&cg).len(), 8, "{:?}", cgroup_programs(&cg));
    // No apply after the reload: the new programs work with the old entries.
    translated("second agent");
    enforced("second agent");

    dp.uninstall().expect("uninstall");
    assert!(
        cgroup_programs(&cg).is_empty(),
        "{:?}",
        cgroup_programs(&cg)
    );
    assert!(pinned_links(&pins).is_empty());
    let r = client(&client_pod, None, "tcp", b1.ip, 8081, 1.0);
    assert!(
        r.as_ref().is_err_and(|e| e.contains("refused")),
        "after uninstall nothing filters: {r:?}"
    );
    let r = client(&client_pod, Some(&cg), "tcp", vip, 80, 1.0);
    assert!(r.is_err(), "after uninstall nothing translates: {r:?}");
}

#[test]
fn ebpf_without_privileges_falls_back_to_recording() {
    const CHILD: &str = "MESHD_TEST_UNPRIVILEGED_CHILD";
    const NAME: &str = "ebpf_without_privileges_falls_back_to_recording";
    if is_root() && std::env::var_os(CHILD).is_none() {
        // Root cannot be refused: rerun this test as `nobody`.
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(std::env::current_exe().expect("test binary"))
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .expect("setpriv (util-linux)");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "unprivileged run failed:\n{all}");
        assert!(
            all.contains("recording fallback ok"),
            "the child did not run the check:\n{all}"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (dp, why) = mesh_agent::datapath::open_or_record(AyaConfig {
        pin_dir: dir.path().join("meshd"),
        cgroup: None,
        socket_lb: true,
    })
    .expect("an unprivileged open falls back instead of failing");
    assert_eq!(dp.mode().as_str(), "recording");
    let why = why.expect("the refusal is reported");
    eprintln!("recording fallback ok: {why}");
}
