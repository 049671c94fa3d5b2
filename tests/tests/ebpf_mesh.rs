//! Real BPF driven by agents: clusters on one machine (real etcd each), the syncer writing
//! the pinned maps from the merged view, pods as netns behind veths.
//!
//! Topology: one bridge in the host netns (no address), one veth per pod, pods addressed
//! from 198.18.0.0/15 (198.18.11x.0/24 per cluster, on-link /16 so clusters reach each
//! other), no route off the machine. As a routed CNI would, the test adds a host `/32`
//! route per pod through its host-side veth: that is how the syncer finds where to attach.
//! Each agent runs in-process with its own private bpffs pin dir and cgroup; clients move
//! into the cluster's cgroup before exec. Everything is removed on drop, also after a
//! panic. Without root every test says so on stderr and returns.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clustermesh_apiserver::source::{Object, SourceEvent};
use mesh_agent::datapath::iface::RouteResolver;
use mesh_agent::datapath::sync::{
    DatapathMetrics, DatapathStatus, MapState, PolicySnapshot, SyncConfig, SyncInputs, Syncer,
};
use mesh_agent::datapath::{
    AyaConfig, AyaDatapath, Backend, Change, Datapath, Endpoint, Protocol, ServiceKey,
};
use mesh_agent::runtime::{Agent, PeerAccess, ViewHandles};
use mesh_tests::init_tracing;
use mesh_tests::lab::{Bpffs, Cgroup, Lab, Pod, python};
use mesh_tests::mesh::{TestCluster, connect};
use mesh_tests::objects::{endpoint_slice, node, pod, service};
use mesh_tests::require_root;
use mesh_tests::util::ChildGuard;
use meshd::model::MaxConnectedClusters;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const CONVERGE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- processes in pods

const SERVER: &str = r#"
import socket, sys, threading
name, ip = sys.argv[1], sys.argv[2]
def serve_tcp(s):
    while True:
        c, _ = s.accept()
        c.sendall(name.encode()); c.close()
def serve_udp(s):
    while True:
        d, a = s.recvfrom(512)
        s.sendto(name.encode(), a)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, 8080)); s.listen(512)
threading.Thread(target=serve_tcp, args=(s,), daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, 5353))
threading.Thread(target=serve_udp, args=(u,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Connects `count` times (TCP or UDP) and prints one line per attempt.
const CLIENT: &str = r#"
import socket, sys
proto, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for _ in range(count):
    try:
        if proto == 'tcp':
            s = socket.socket(); s.settimeout(3)
            s.connect((host, port)); data = s.recv(512)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
            s.sendto(b'hi', (host, port)); data, _ = s.recvfrom(512)
        s.close()
        print('ok %s' % data.decode(), flush=True)
    except Exception as e:
        print('err %s' % e, flush=True)
"#;

fn server(pod: &Pod, name: &str) -> ChildGuard {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", pod.netns))
        .args(["--", &python(), "-c", SERVER, name, &pod.ip.to_string()])
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

/// `count` requests from `pod` inside `cgroup`: Ok(reply) or Err(error) per attempt.
fn requests(
    pod: &Pod,
    cgroup: &Cgroup,
    proto: &str,
    vip: Ipv4Addr,
    port: u16,
    count: usize,
) -> Vec<Result<String, String>> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", pod.netns))
        .args([
            "--",
            "sh",
            "-c",
            "echo $$ > \"$MESH_CG\" && exec \"$@\"",
            "sh",
        ])
        .env("MESH_CG", cgroup.procs())
        .args([
            &python(),
            "-c",
            CLIENT,
            proto,
            &vip.to_string(),
            &port.to_string(),
        ])
        .arg(count.to_string())
        .output()
        .expect("client");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.strip_prefix("ok ") {
            Some(r) => Ok(r.to_owned()),
            None => Err(l.to_owned()),
        })
        .collect()
}

fn replies(rs: &[Result<String, String>]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in rs {
        *m.entry(r.clone().unwrap_or_else(|e| format!("ERR {e}")))
            .or_default() += 1;
    }
    m
}

// ---------------------------------------------------------------- clusters and agents

fn ip(c: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 110 + c, i)
}

fn cluster_ip(c: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 110 + c, 10)
}

/// A global service `shop/<name>` on 80/TCP → 8080 and 53/UDP → 5353.
fn web_service(c: u8, name: &str, affinity: &str, backends: &[Ipv4Addr]) -> Vec<Object> {
    let mut s = service(
        "shop",
        name,
        Ipv4Addr::new(198, 19, 110 + c, 10 + name.len() as u8),
        true,
    );
    if name == "web" {
        s = service("shop", name, cluster_ip(c), true);
    }
    s.metadata
        .annotations
        .get_or_insert_default()
        .insert("service.meshd.io/affinity".into(), affinity.into());
    if let Some(spec) = s.spec.as_mut() {
        spec.ports
            .get_or_insert_default()
            .push(k8s_openapi::api::core::v1::ServicePort {
                name: Some("dns".into()),
                port: 53,
                protocol: Some("UDP".into()),
                ..Default::default()
            });
    }
    vec![
        Object::Service(Box::new(s)),
        Object::EndpointSlice(Box::new(slice(name, backends))),
    ]
}

fn slice(name: &str, backends: &[Ipv4Addr]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let mut es = endpoint_slice("shop", &format!("{name}-x"), name, backends);
    es.ports
        .get_or_insert_default()
        .push(k8s_openapi::api::discovery::v1::EndpointPort {
            name: Some("dns".into()),
            port: Some(5353),
            protocol: Some("UDP".into()),
            ..Default::default()
        });
    es
}

fn objects(c: u8) -> Vec<Object> {
    let mut v = vec![
        // The node advertises the pod CIDR its pods are in (a peer may claim only those).
        Object::Node(Box::new(node(
            "node",
            Ipv4Addr::new(198, 19, 0, c),
            &format!("198.18.{}.0/24", 110 + c),
        ))),
        Object::Pod(Box::new(pod(
            "shop",
            &format!("web-{c}"),
            &[("app", "web")],
            ip(c, 11),
            "node",
        ))),
        Object::Pod(Box::new(pod(
            "shop",
            &format!("client-{c}"),
            &[("app", "client")],
            ip(c, 5),
            "node",
        ))),
    ];
    v.extend(web_service(c, "web", "none", &[ip(c, 11)]));
    v.extend(web_service(c, "web-local", "local", &[ip(c, 11)]));
    v
}

/// An in-process agent with the eBPF syncer.
struct RunningAgent {
    agent: Agent,
    stop: CancellationToken,
    syncer: tokio::task::JoinHandle<()>,
    status: watch::Receiver<DatapathStatus>,
}

impl RunningAgent {
    fn start(c: &TestCluster, pins: &Bpffs, cg: &Cgroup) -> Self {
        let agent = c.start_agent(PeerAccess::Direct);
        let dp = AyaDatapath::open(AyaConfig {
            pin_dir: pins.pin_dir(),
            cgroup: Some(cg.path.clone()),
            socket_lb: true,
        })
        .expect("datapath loads");
        let mut cfg = SyncConfig::new(c.name.clone(), MaxConnectedClusters::C255);
        cfg.rescan_interval = Duration::from_millis(200);
        let syncer = Syncer::new(
            Box::new(dp),
            None,
            Box::new(RouteResolver::new()),
            cfg,
            DatapathMetrics::default(),
        );
        let status = syncer.handles().status;
        let stop = CancellationToken::new();
        let inputs = SyncInputs::from_handles(&agent.handles(), None);
        let syncer = tokio::spawn(syncer.run(inputs, stop.clone()));
        Self {
            agent,
            stop,
            syncer,
            status,
        }
    }

    fn view(&self) -> ViewHandles {
        self.agent.handles()
    }

    /// Stops the agent the way a crash or restart does: maps and links stay pinned.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.syncer.await;
        self.agent.shutdown().await;
    }

    async fn wait_reconciled(&self, endpoints: usize) {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            {
                let s = self.status.borrow();
                if s.reconciled && s.endpoints >= endpoints && s.interfaces.len() >= endpoints {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "datapath not reconciled: {s:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn active(h: &ViewHandles, name: &str) -> BTreeSet<(String, IpAddr)> {
    let snap = h.services.borrow().clone();
    snap.service("shop", name)
        .map(|s| s.active().map(|b| (b.cluster.to_string(), b.ip)).collect())
        .unwrap_or_default()
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn block<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_mesh_global_service_affinity_removal_and_agent_restart() {
    require_root!("ebpf_mesh_global_service_affinity_removal_and_agent_restart");
    init_tracing();
    let mut lab = Lab::new("g").prefix_len(16).host_routes(true);
    let client_pod = lab.pod("c", ip(1, 5));
    let east_web = lab.pod("e", ip(1, 11));
    let west_web = lab.pod("w", ip(2, 11));
    let _s1 = server(&east_web, "east");
    let _s2 = server(&west_web, "west");

    let mut east = Box::pin(TestCluster::start("east", 1, objects(1)))
        .await
        .unwrap();
    let west = Box::pin(TestCluster::start("west", 2, objects(2)))
        .await
        .unwrap();
    connect(&east, &west).await.unwrap();
    east.start_clusterset("198.19.128.0/20").unwrap();

    let (east_pins, west_pins) = (Bpffs::new(), Bpffs::new());
    let (east_cg, west_cg) = (Arc::new(Cgroup::new("east")), Cgroup::new("west"));
    let east_agent = RunningAgent::start(&east, &east_pins, &east_cg);
    let west_agent = RunningAgent::start(&west, &west_pins, &west_cg);
    let h = east_agent.view();
    wait_for("east sees both backends of web", || {
        active(&h, "web").len() == 2
    })
    .await;
    wait_for("ClusterSetIP of web", || {
        h.services
            .borrow()
            .service("shop", "web")
            .is_some_and(|s| s.clusterset_ip.is_some())
    })
    .await;
    let csip = match h
        .services
        .borrow()
        .service("shop", "web")
        .and_then(|s| s.clusterset_ip)
    {
        Some(IpAddr::V4(v4)) => v4,
        other => panic!("ClusterSetIP {other:?}"),
    };
    // Each agent attaches to its own cluster's pods only (client + web in east).
    east_agent.wait_reconciled(2).await;
    west_agent.wait_reconciled(1).await;
    assert_eq!(
        west_agent.status.borrow().interfaces,
        std::slice::from_ref(&west_web.host_if),
        "west's agent attaches to west's pod"
    );

    // The maps converge on the view shortly after it publishes: poll until both
    // clusters answer through the ClusterIP and the ClusterSetIP, TCP and UDP.
    let cg = Arc::clone(&east_cg);
    for (vip, what) in [(cluster_ip(1), "ClusterIP"), (csip, "ClusterSetIP")] {
        for (proto, port) in [("tcp", 80), ("udp", 53)] {
            let (p, cg2) = (client_pod.clone(), Arc::clone(&cg));
            let rs = block(move || requests(&p, &cg2, proto, vip, port, 40))
                .await
                .unwrap();
            let r = replies(&rs);
            assert_eq!(
                r.keys().cloned().collect::<Vec<_>>(),
                ["east", "west"],
                "affinity none via the {what} {vip}:{port}/{proto} reaches both clusters, no failure: {r:?}"
            );
        }
    }
    // Affinity local: only east's backend while it is ready.
    let local_vip = match h
        .services
        .borrow()
        .service("shop", "web-local")
        .map(|s| s.frontends_local.clone())
    {
        Some(f) => match f.first() {
            Some(IpAddr::V4(v)) => *v,
            _ => panic!("web-local has no ClusterIP"),
        },
        None => panic!("no web-local"),
    };
    let (p, cg2) = (client_pod.clone(), Arc::clone(&cg));
    let rs = block(move || requests(&p, &cg2, "tcp", local_vip, 80, 20))
        .await
        .unwrap();
    assert_eq!(
        replies(&rs),
        BTreeMap::from([("east".to_owned(), 20)]),
        "affinity local"
    );

    // West's backends go: once east's view has converged, every new connection works
    // and goes to east.
    west.source
        .send(SourceEvent::Apply(Object::EndpointSlice(Box::new(slice(
            "web",
            &[],
        )))))
        .await
        .unwrap();
    wait_for("west's backend gone from east's view", || {
        active(&h, "web") == BTreeSet::from([("east".to_owned(), IpAddr::V4(ip(1, 11)))])
    })
    .await;
    // The syncer writes within one round after the publish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (proto, port) in [("tcp", 80), ("udp", 53)] {
        let (p, cg2) = (client_pod.clone(), Arc::clone(&cg));
        let rs = block(move || requests(&p, &cg2, proto, cluster_ip(1), port, 30))
            .await
            .unwrap();
        assert_eq!(
            replies(&rs),
            BTreeMap::from([("east".to_owned(), 30)]),
            "after removal, {proto}: east only, no failed connection"
        );
    }
    // And back: west's backend returns.
    west.source
        .send(SourceEvent::Apply(Object::EndpointSlice(Box::new(slice(
            "web",
            &[ip(2, 11)],
        )))))
        .await
        .unwrap();
    wait_for("west's backend back", || active(&h, "web").len() == 2).await;

    // Agent restart under a steady loop of connections: 0 failures.
    let stop_loop = Arc::new(AtomicBool::new(false));
    let looper = {
        let (p, cg2, stop) = (client_pod.clone(), Arc::clone(&cg), Arc::clone(&stop_loop));
        block(move || {
            let mut all = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                all.extend(requests(&p, &cg2, "tcp", cluster_ip(1), 80, 10));
            }
            all
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = east_pins.pin_dir();
    east_agent.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let east_agent = RunningAgent::start(&east, &east_pins, &east_cg);
    east_agent.wait_reconciled(2).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_loop.store(true, Ordering::Relaxed);
    let all = looper.await.unwrap();
    let r = replies(&all);
    assert!(
        all.len() >= 20,
        "too few connections during the restart: {r:?}"
    );
    assert!(
        all.iter().all(Result::is_ok),
        "failed connections across the restart: {r:?}"
    );
    assert_eq!(before, east_pins.pin_dir());

    east_agent.stop().await;
    west_agent.stop().await;
    east.stop_kvstoremesh().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_mesh_reconcile_removes_stale_pinned_entries_and_keeps_live_ones() {
    require_root!("ebpf_mesh_reconcile_removes_stale_pinned_entries_and_keeps_live_ones");
    init_tracing();
    let pins = Bpffs::new();
    let cfg = AyaConfig {
        pin_dir: pins.pin_dir(),
        cgroup: None,
        socket_lb: false,
    };
    let live = ServiceKey {
        vip: Ipv4Addr::new(198, 19, 120, 1),
        port: 80,
        proto: Protocol::Tcp,
    };
    let stale = ServiceKey {
        vip: Ipv4Addr::new(198, 19, 120, 2),
        port: 80,
        proto: Protocol::Tcp,
    };
    let be = |i| Backend {
        ip: Ipv4Addr::new(198, 18, 120, i),
        port: 8080,
    };
    let id = 1 << 16 | 300;
    // A previous agent's state: a live and a stale service, ipcache entries, an endpoint.
    {
        let mut dp = AyaDatapath::open(cfg.clone()).expect("datapath loads");
        dp.apply(&[
            Change::UpsertService {
                key: live,
                backends: vec![be(1), be(2)],
            },
            Change::UpsertService {
                key: stale,
                backends: vec![be(3)],
            },
            Change::UpsertIpcache {
                prefix: "198.18.120.1/32".parse().unwrap(),
                identity: id,
                cluster_id: 1,
            },
            Change::UpsertIpcache {
                prefix: "198.18.120.9/32".parse().unwrap(),
                identity: id,
                cluster_id: 1,
            },
            Change::UpsertEndpoint(Endpoint {
                ip: Ipv4Addr::new(198, 18, 120, 9),
                endpoint_id: id,
                identity: id,
                ifindex: 0,
                enforce_ingress: false,
                enforce_egress: false,
            }),
        ])
        .unwrap();
    }
    let before = AyaDatapath::open(cfg.clone()).unwrap().snapshot().unwrap();
    let live_entries: std::collections::HashMap<_, _> = before
        .services
        .iter()
        .filter(|(k, _)| k.ip() == live.vip)
        .map(|(k, v)| (*k, *v))
        .collect();

    // The view now: only `live` (same backends, same order) and the first ipcache entry.
    let east = meshd::model::ClusterName::new("east").unwrap();
    let backend = |i: u8| mesh_agent::view::MergedBackend {
        cluster: east.clone(),
        ip: IpAddr::V4(be(i).ip),
        ports: vec![meshd::model::BackendPort {
            name: "http".into(),
            port: 8080,
            protocol: meshd::model::Protocol::Tcp,
        }],
        hostname: None,
        node: None,
        zone: None,
        ready: true,
    };
    let svc = mesh_agent::view::MergedService {
        namespace: "shop".into(),
        name: "web".into(),
        headless: false,
        ports: vec![meshd::model::ServicePort {
            name: "http".into(),
            port: 80,
            protocol: meshd::model::Protocol::Tcp,
        }],
        frontends_local: vec![IpAddr::V4(live.vip)],
        clusterset_ip: None,
        backends: vec![backend(1), backend(2)],
        active_backends: vec![0, 1],
        affinity: meshd::model::Affinity::None,
        conflicts: vec![],
        clusters: vec![east.clone()],
    };
    let services = mesh_agent::view::ServicesSnapshot {
        generation: 1,
        entries: BTreeMap::from([(svc.key(), Arc::new(svc))]),
    };
    let entry = mesh_agent::view::ClusterEntry {
        cluster: meshd::model::ClusterName::new("west").unwrap(),
        value: meshd::model::IpCacheEntry {
            ip: IpAddr::V4(Ipv4Addr::new(198, 18, 120, 1)),
            prefix_len: 32,
            identity: meshd::model::Identity::from_raw(id).unwrap(),
            host_ip: None,
            node: None,
            namespace: None,
            pod: None,
            named_ports: BTreeMap::new(),
        },
    };
    let ipcache = mesh_agent::view::IpCacheSnapshot {
        generation: 1,
        entries: BTreeMap::from([(entry.value.ip, Arc::new(entry))]),
    };
    let (_s_tx, s_rx) = watch::channel(Arc::new(services));
    let (_i_tx, i_rx) = watch::channel(Arc::new(ipcache));
    let (_st_tx, st_rx) = watch::channel(mesh_agent::runtime::AgentStatus {
        ready: true,
        ..Default::default()
    });
    let (_p_tx, _p_rx) = watch::channel(Arc::new(PolicySnapshot::default()));

    let dp = AyaDatapath::open(cfg.clone()).expect("datapath reopens the pinned maps");
    let syncer = Syncer::new(
        Box::new(dp),
        None,
        Box::new(RouteResolver::new()),
        SyncConfig::new(east.clone(), MaxConnectedClusters::C255),
        DatapathMetrics::default(),
    );
    let mut status = syncer.handles().status;
    let stop = CancellationToken::new();
    let task = tokio::spawn(syncer.run(
        SyncInputs {
            services: s_rx,
            ipcache: i_rx,
            status: st_rx,
            policy: None,
            nodes: None,
        },
        stop.clone(),
    ));
    tokio::time::timeout(CONVERGE, status.wait_for(|s| s.reconciled))
        .await
        .expect("reconciled in time")
        .expect("syncer running");
    stop.cancel();
    task.await.unwrap();

    let after = AyaDatapath::open(cfg).unwrap().snapshot().unwrap();
    let state = MapState::from_snapshot(&after);
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        [live],
        "the stale service is gone"
    );
    let after_live: std::collections::HashMap<_, _> =
        after.services.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(
        after_live, live_entries,
        "the live service's slots and backend ids are untouched"
    );
    assert_eq!(
        after.backends.len(),
        2,
        "the stale service's backend is gone"
    );
    // This machine's own addresses are in the ipcache too, as `host` (identity 1).
    let host = meshd::model::ReservedIdentity::Host.identity().get();
    assert_eq!(
        state
            .ipcache
            .iter()
            .filter(|(_, (identity, _))| *identity != host)
            .map(|(p, _)| p.to_string())
            .collect::<Vec<_>>(),
        ["198.18.120.1/32"],
        "stale ipcache entry removed, live one kept"
    );
    assert!(state.endpoints.is_empty(), "stale endpoint removed");
}
