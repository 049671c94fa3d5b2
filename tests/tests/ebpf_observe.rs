//! Policy enforcement and `meshctl observe` end to end: a MeshNetworkPolicy exported by
//! east's apiserver path goes through the agent's policy task (engine) into the syncer; the
//! policy program drops real packets, the syncer reads them from the ring buffer, the agent's gRPC API (real mTLS) streams them, and the real
//! `meshctl` binary, addressing the agent through an admin kubeconfig, prints them with
//! identities resolved to labels and cluster names.
//!
//! ```text
//!  west pods api (app=api), batch (app=batch) ──TCP/UDP──► east pod db (app=db)
//!     tc on db's host veth: ingress enforced, only west app=api → 5432/TCP allowed
//!  east etcd mesh/policies/v1/east/shop/db-allow-api ─► agent policy task (engine)
//!  east agent: merged view (east + west etcd) ─► Syncer(AyaDatapath, policy snapshots)
//!     ─► SyncHandles ─► AgentApi ObserveDrops over mTLS ◄── meshctl observe --kubeconfig
//! ```
//!
//! Topology as in `ebpf_mesh.rs` (one bridge, pods on-link in 198.18.0.0/16, host /32
//! routes for the syncer's resolver), with its own addresses (198.18.13x.0/24). Root only;
//! skips loudly otherwise; everything is removed on drop.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::Duration;

use clustermesh_apiserver::source::Object;
use mesh_agent::api::AgentApi;
use mesh_agent::datapath::iface::RouteResolver;
use mesh_agent::datapath::sync::{DatapathMetrics, Enforcement, SyncConfig, SyncInputs, Syncer};
use mesh_agent::datapath::{AyaConfig, AyaDatapath, Direction, PolicyRule, Verdict, abi};
use mesh_agent::runtime::PeerAccess;
use mesh_certs::{CertRequest, CertificateAuthority, Role};
use mesh_proto::server::{serve_mtls, server_tls};
use mesh_tests::lab::{Bpffs, Lab, Pod, python};
use mesh_tests::mesh::{TestCluster, connect, supervisor_config};
use mesh_tests::objects::{node, pod};
use mesh_tests::util::{ChildGuard, eventually, eventually_some};
use mesh_tests::{bin_path, init_tracing, require_root};
use meshd::ctl::admin::{AdminEntry, AdminExtension, write_kubeconfig};
use meshd::model::MaxConnectedClusters;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CONVERGE: Duration = Duration::from_secs(60);

const SERVER: &str = r#"
import socket, sys, threading
name, ip = sys.argv[1], sys.argv[2]
def serve(s):
    while True:
        c, _ = s.accept()
        c.sendall(name.encode()); c.close()
for p in (5432, 5433):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, p)); s.listen(64)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

const CLIENT: &str = r#"
import socket, sys
proto, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
try:
    if proto == 'tcp':
        s = socket.socket(); s.settimeout(timeout); s.connect((host, port)); data = s.recv(512)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
        s.sendto(b'hi', (host, port)); data, _ = s.recvfrom(512)
    print('ok %s' % data.decode())
except Exception as e:
    print('err %s' % e); sys.exit(1)
"#;

fn east_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 131, i)
}

/// West's node address (a remote-node to east; reachable on the lab's /16).
const WEST_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);

fn west_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 132, i)
}

fn server(pod: &Pod) -> ChildGuard {
    let mut child = Command::new("nsenter")
        .arg(pod.nsenter_arg())
        .args(["--", &python(), "-c", SERVER, "db", &pod.ip.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server output");
    let guard = ChildGuard(child);
    assert_eq!(line.trim(), "ready", "db server did not start");
    guard
}

/// One request from `pod`; Ok(reply) or Err(error).
async fn request(
    pod: &Pod,
    proto: &str,
    to: Ipv4Addr,
    port: u16,
    timeout: f64,
) -> Result<String, String> {
    let (pod, proto) = (pod.clone(), proto.to_owned());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("nsenter")
            .arg(pod.nsenter_arg())
            .args(["--", &python(), "-c", CLIENT, &proto, &to.to_string()])
            .args([port.to_string(), timeout.to_string()])
            .output()
            .expect("client");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match stdout.strip_prefix("ok ") {
            Some(r) if out.status.success() => Ok(r.to_owned()),
            _ => Err(stdout),
        }
    })
    .await
    .expect("client task")
}

/// `meshctl observe <args>` against the admin kubeconfig; (exit success, stdout).
async fn observe(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(bin_path("meshctl"))
        .arg("observe")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("meshctl observe returns")
        .expect("meshctl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_observe_meshctl_shows_policy_drops_with_labels_and_clusters() {
    require_root!("ebpf_observe_meshctl_shows_policy_drops_with_labels_and_clusters");
    init_tracing();
    let mut lab = Lab::new("o").prefix_len(16).host_routes(true);
    let db = lab.pod("db", east_ip(30));
    let api = lab.pod("ap", west_ip(40));
    let batch = lab.pod("bt", west_ip(41));
    // West's node, as a namespace of its own: its address is a remote-node to east.
    let west_node = lab.pod("nw", WEST_NODE);
    let _db = server(&db);

    // Only app=api of west may reach app=db on 5432/TCP (db becomes default-deny ingress).
    let policy: meshd::model::MeshNetworkPolicy = serde_json::from_value(serde_json::json!({
        "namespace": "shop", "name": "db-allow-api",
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"app": "api", "io.meshd.cluster": "west"}}],
                "toPorts": [{"port": 5432, "protocol": "TCP"}]
            }, {
                "fromEntities": ["remote-node"],
                "toPorts": [{"port": 5432, "protocol": "TCP"}]
            }]
        }
    }))
    .unwrap();
    // Each cluster's node advertises the pod CIDR its pods are in (a peer may claim only
    // addresses inside its own nodes' ranges).
    let east_objects = vec![
        Object::Node(Box::new(node(
            "node-e",
            Ipv4Addr::new(198, 19, 0, 1),
            "198.18.131.0/24",
        ))),
        Object::Pod(Box::new(pod(
            "shop",
            "db-0",
            &[("app", "db")],
            db.ip,
            "node-e",
        ))),
        Object::Policy(policy),
    ];
    let west_objects = vec![
        Object::Node(Box::new(node("node-w", WEST_NODE, "198.18.132.0/24"))),
        Object::Pod(Box::new(pod(
            "shop",
            "api-0",
            &[("app", "api")],
            api.ip,
            "node-w",
        ))),
        Object::Pod(Box::new(pod(
            "shop",
            "batch-0",
            &[("app", "batch")],
            batch.ip,
            "node-w",
        ))),
    ];
    let east = Box::pin(TestCluster::start("east", 1, east_objects))
        .await
        .unwrap();
    let west = Box::pin(TestCluster::start("west", 2, west_objects))
        .await
        .unwrap();
    connect(&east, &west).await.unwrap();
    let agent = east.start_agent(PeerAccess::Direct);
    let h = agent.handles();

    // Identities of the three pods as east's merged view has them.
    let ids: BTreeMap<Ipv4Addr, (String, u32)> =
        eventually_some("east's view has all three pods", CONVERGE, async || {
            let snap = h.ipcache.borrow().clone();
            let mut m = BTreeMap::new();
            for p in [&db, &api, &batch] {
                let e = snap.entries.get(&IpAddr::V4(p.ip))?;
                m.insert(p.ip, (e.cluster.to_string(), e.value.identity.get()));
            }
            Some(m)
        })
        .await;
    assert_eq!(ids[&db.ip].0, "east");
    assert_eq!(ids[&api.ip].0, "west");
    let (db_id, api_id, batch_id) = (ids[&db.ip].1, ids[&api.ip].1, ids[&batch.ip].1);
    assert!(
        db_id != api_id && api_id != batch_id,
        "distinct identities: {ids:?}"
    );

    // The agent's policy task: the exported policy + the view → the engine's snapshots.
    let policy_stop = CancellationToken::new();
    let (policy, _policy_task) = mesh_agent::policy::start(
        east.store.clone(),
        east.name.clone(),
        h.identities.clone(),
        h.ipcache.clone(),
        meshd::metrics::ReflectorMetrics::default(),
        policy_stop.clone(),
    );
    let expected = PolicyRule {
        endpoint_id: db_id,
        identity: api_id,
        port: 5432,
        proto: abi::PROTO_TCP,
        direction: Direction::Ingress,
    };
    let remote_node = PolicyRule {
        identity: meshd::model::ReservedIdentity::RemoteNode.identity().get(),
        ..expected
    };
    let mut snaps = policy.snapshots.clone();
    eventually(
        "the engine allows west api and remote nodes → db 5432/TCP",
        CONVERGE,
        async || {
            let s = snaps.borrow_and_update().clone();
            let mut want = [&remote_node, &expected];
            want.sort();
            s.rules.keys().eq(want)
                && s.rules[&expected].verdict == Verdict::Allow
                && s.enforce.get(&db_id)
                    == Some(&Enforcement {
                        ingress: true,
                        egress: false,
                    })
        },
    )
    .await;
    let policy_rx = policy.snapshots.clone();

    // The east agent's datapath and syncer.
    let pins = Bpffs::new();
    let dp = AyaDatapath::open(AyaConfig {
        pin_dir: pins.pin_dir(),
        cgroup: None,
        socket_lb: false,
    })
    .expect("datapath loads");
    let mut cfg = SyncConfig::new(east.name.clone(), MaxConnectedClusters::C255);
    cfg.rescan_interval = Duration::from_millis(200);
    let syncer = Syncer::new(
        Box::new(dp),
        None,
        Box::new(RouteResolver::new()),
        cfg,
        DatapathMetrics::default(),
    );
    let sync_handles = syncer.handles();
    let status = sync_handles.status.clone();
    let stop = CancellationToken::new();
    let sync_task =
        tokio::spawn(syncer.run(SyncInputs::from_handles(&h, Some(policy_rx)), stop.clone()));
    eventually(
        "db's interface attached and policy written",
        CONVERGE,
        async || {
            let s = status.borrow();
            s.reconciled
                && s.interfaces == [db.host_if.clone()]
                && s.policy >= 1
                && s.endpoints == 1
        },
    )
    .await;

    // The agent's gRPC API over mTLS, with the datapath's drop stream.
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("east-ca", Duration::from_secs(86_400)).unwrap();
    let (ca_file, ca_key) = ca.write_files(dir.path(), "ca").unwrap();
    let (crt, key) = ca
        .issue(&CertRequest::server(
            "mesh-agent",
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        ))
        .unwrap()
        .write_files(dir.path(), "agent")
        .unwrap();
    let (root_crt, root_key) = ca
        .issue(&CertRequest::client("root").with_role(east.name.as_str(), Role::Admin))
        .unwrap()
        .write_files(dir.path(), "root")
        .unwrap();
    let (tls, _pair) = server_tls(crt, key, ca.cert_pem()).unwrap();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let api_server = AgentApi::new(&supervisor_config(&east.name, east.id), h.clone())
        .with_datapath(sync_handles.clone());
    let authz = api_server.authorizer();
    let grpc = tokio::spawn(serve_mtls(
        listener,
        tls,
        api_server.routes(),
        authz,
        stop.clone(),
    ));

    // How meshctl addresses the cluster: an admin kubeconfig naming the agent's endpoint.
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(
        &kubeconfig,
        &[AdminEntry {
            name: east.name.clone(),
            cluster_id: 1,
            max_connected_clusters: MaxConnectedClusters::C255,
            server: east.etcd.endpoint(),
            tls_server_name: Some("localhost".into()),
            ca_file,
            cert_file: root_crt,
            key_file: root_key,
            ext: AdminExtension {
                peers_dir: east.peers_dir.path().to_owned(),
                ca_key,
                apiserver_grpc: None,
                agent_grpc: Some(grpc_addr.to_string()),
                peer_endpoint: None,
            },
        }],
    )
    .unwrap();

    // Nothing dropped yet.
    let (ok, text) = observe(&kubeconfig, &["--cluster", "east"]).await;
    assert!(ok, "{text}");
    assert!(text.contains("no drops"), "{text}");

    // Allowed: west app=api → db:5432. Dropped: api → 5433 (port), batch → 5432 (identity).
    let r = request(&api, "tcp", db.ip, 5432, 3.0).await;
    assert_eq!(r.as_deref(), Ok("db"), "api → db:5432 is allowed");
    // fromEntities: [remote-node] matches in the kernel: west's node address carries the
    // remote-node identity in the ipcache (without it, it would be `world` and dropped).
    let r = request(&west_node, "tcp", db.ip, 5432, 3.0).await;
    assert_eq!(
        r.as_deref(),
        Ok("db"),
        "west's node → db:5432 is allowed (remote-node)"
    );
    let r = request(&api, "tcp", db.ip, 5433, 1.0).await;
    assert!(r.is_err(), "api → db:5433 must be dropped: {r:?}");
    let r = request(&batch, "tcp", db.ip, 5432, 1.0).await;
    assert!(r.is_err(), "batch → db:5432 must be dropped: {r:?}");
    eventually(
        "both drops read from the ring buffer",
        CONVERGE,
        async || sync_handles.subscribe_drops().0.len() >= 2,
    )
    .await;

    // The table: one line per drop, both sides with cluster/ip:port [identity labels].
    let (ok, text) = observe(&kubeconfig, &["--cluster", "east"]).await;
    assert!(ok, "{text}");
    eprintln!("meshctl observe --cluster east:\n{text}");
    let line_of = |src: &Pod, dport: u16| {
        let from = format!("west/{}:", src.ip);
        let to = format!("-> east/{}:{dport} [{db_id} k8s:app=db]", db.ip);
        text.lines()
            .find(|l| l.contains(&from) && l.contains(&to))
            .unwrap_or_else(|| panic!("no drop line {from}… {to} in:\n{text}"))
            .to_owned()
    };
    let l = line_of(&api, 5433);
    assert!(l.contains("DROPPED (policy)"), "{l}");
    assert!(l.contains(&format!("[{api_id} k8s:app=api]")), "{l}");
    assert!(l.contains("TCP ingress"), "{l}");
    assert!(l.contains(&db.host_if), "the interface is named: {l}");
    let l = line_of(&batch, 5432);
    assert!(l.contains(&format!("[{batch_id} k8s:app=batch]")), "{l}");
    assert!(l.contains("TCP ingress"), "{l}");
    assert!(
        !text
            .lines()
            .any(|l| l.contains(&format!("west/{}:", api.ip))
                && l.contains(&format!("-> east/{}:5432 ", db.ip))),
        "the allowed flow must not show up as a drop:\n{text}"
    );

    // JSON: the same facts as fields, with the namespace and cluster labels kept.
    let (ok, text) = observe(&kubeconfig, &["--cluster", "east", "-o", "json"]).await;
    assert!(ok, "{text}");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let e = events
        .iter()
        .find(|e| e["source"]["ip"] == api.ip.to_string() && e["destination"]["port"] == 5433)
        .unwrap_or_else(|| panic!("no api → :5433 event in {events:#?}"));
    // Drops carry the time they happened (the kernel stamp), not the time of the query.
    let times: std::collections::BTreeSet<i64> = events
        .iter()
        .filter_map(|e| e["timeUnixMs"].as_i64())
        .collect();
    assert!(
        events.len() < 2 || times.len() > 1,
        "every drop has the same time: {events:#?}"
    );
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    assert!(
        times.iter().all(|t| *t <= now_ms && now_ms - *t < 120_000),
        "drop times not within the last two minutes: {times:?} (now {now_ms})"
    );
    assert_eq!(e["source"]["cluster"], "west", "{e}");
    assert_eq!(e["destination"]["cluster"], "east", "{e}");
    assert_eq!(e["destination"]["ip"], db.ip.to_string(), "{e}");
    assert_eq!(e["source"]["identity"], api_id, "{e}");
    assert_eq!(e["destination"]["identity"], db_id, "{e}");
    let labels = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let src_labels = labels(&e["source"]["labels"]);
    for want in [
        "k8s:app=api",
        "k8s:io.kubernetes.pod.namespace=shop",
        "mesh:io.meshd.cluster=west",
    ] {
        assert!(
            src_labels.iter().any(|l| l == want),
            "{want} in {src_labels:?}"
        );
    }
    assert!(
        labels(&e["destination"]["labels"])
            .iter()
            .any(|l| l == "mesh:io.meshd.cluster=east"),
        "{e}"
    );
    assert_eq!(
        (&e["protocol"], &e["direction"], &e["reason"]),
        (&"TCP".into(), &"ingress".into(), &"policy".into()),
        "{e}"
    );
    assert!(
        e["source"]["port"].as_u64().is_some_and(|p| p >= 1024),
        "the client's ephemeral port: {e}"
    );

    // --follow streams a new drop as it happens (UDP this time), --from filters by cluster.
    let mut follow = tokio::process::Command::new(bin_path("meshctl"))
        .args(["observe", "--follow", "--from", "west", "--kubeconfig"])
        .arg(&kubeconfig)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("meshctl observe --follow");
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().expect("stdout")).lines();
    // The remembered drops come first: once the last one is printed, the stream is live.
    let mut recent = sync_handles.subscribe_drops().0.len();
    // Settled: no late events (retransmitted SYNs) still on their way from the ring buffer.
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sync_handles.subscribe_drops().0.len();
        if now == recent {
            break;
        }
        recent = now;
    }
    for _ in 0..recent {
        tokio::time::timeout(CONVERGE, lines.next_line())
            .await
            .expect("remembered drops printed")
            .expect("read")
            .expect("a line");
    }
    let r = request(&batch, "udp", db.ip, 5353, 1.0).await;
    assert!(r.is_err(), "batch → db:5353/UDP must be dropped: {r:?}");
    let want_from = format!("west/{}:", batch.ip);
    let want_to = format!("-> east/{}:5353 [{db_id} k8s:app=db]  UDP ingress", db.ip);
    let line = tokio::time::timeout(CONVERGE, async {
        loop {
            let l = lines
                .next_line()
                .await
                .expect("read")
                .expect("meshctl observe --follow ended early");
            if l.contains(&want_from) && l.contains(&want_to) {
                return l;
            }
        }
    })
    .await
    .expect("the UDP drop streamed by --follow");
    assert!(
        line.contains(&format!("[{batch_id} k8s:app=batch]")),
        "{line}"
    );
    drop(follow);

    // --from a cluster no drop involves: nothing.
    let (ok, text) = observe(&kubeconfig, &["--from", "north"]).await;
    assert!(ok, "{text}");
    assert!(text.contains("no drops"), "{text}");

    stop.cancel();
    let _ = sync_task.await;
    let _ = grpc.await;
    agent.shutdown().await;
}
