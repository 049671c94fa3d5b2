//! Mesh benchmark (agent side):
//! 1. convergence — a backend added to a global service in one cluster's source until it
//!    is in another cluster's agent's merged view, p50/p99 over `--changes` changes,
//!    `--clusters` clusters, read directly and through kvstoremesh;
//! 2. cold sync — a peer with `--endpoints` endpoints and `--services` services (written
//!    straight into its etcd) until the agent is ready, against a raw etcd-client paged
//!    list of the same keys in the same run; and the agent's resident memory per remote
//!    endpoint.
//!
//! Run: `cargo run --release -p mesh-tests --bin mesh-bench [-- --clusters 8 --changes 1000 --endpoints 100000 --services 10000]`

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::Context;
use clustermesh_apiserver::source::{Object, SourceEvent};
use mesh_agent::runtime::{PeerAccess, ViewHandles};
use mesh_tests::mesh::{TestCluster, connect};
use mesh_tests::objects::{endpoint_slice, service, test_ip};
use meshd::keys::{Key, StateKey, encode};
use meshd::kv::{Op, Txn};
use meshd::model::{
    Backend, BackendPort, ClusterId, ClusterService, Identity, IdentityEntry, IpCacheEntry, Labels,
    MaxConnectedClusters, Protocol, ServicePort,
};

fn arg(name: &str, default: u32) -> anyhow::Result<u32> {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .map(|s| s.parse().with_context(|| format!("{name} takes a number")))
        .transpose()
        .map(|v| v.unwrap_or(default))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn has_backend(h: &ViewHandles, ip: IpAddr) -> bool {
    let snap = h.services.borrow().clone();
    snap.service("shop", "web")
        .is_some_and(|s| s.backends.iter().any(|b| b.ip == ip))
}

fn web(c: u32, ips: &[Ipv4Addr]) -> Vec<Object> {
    vec![
        Object::Service(Box::new(service(
            "shop",
            "web",
            Ipv4Addr::new(198, 19, 200, c as u8),
            true,
        ))),
        Object::EndpointSlice(Box::new(endpoint_slice("shop", "web-x", "web", ips))),
    ]
}

async fn convergence(clusters: u32, changes: u32) -> anyhow::Result<()> {
    let mut cs = Vec::new();
    for c in 0..clusters {
        let name = format!("c{c}");
        cs.push(Box::pin(TestCluster::start(&name, c + 1, web(c, &[]))).await?);
    }
    for c in 1..clusters as usize {
        connect(&cs[0], &cs[c]).await?;
    }
    cs[0].start_kvstoremesh();
    let direct = cs[0].start_agent(PeerAccess::Direct);
    let cached = cs[0].start_agent(PeerAccess::Cached);
    let (hd, hc) = (direct.handles(), cached.handles());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(hd.status.borrow().ready && hc.status.borrow().ready) {
        anyhow::ensure!(Instant::now() < deadline, "agents not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut backends: Vec<Vec<Ipv4Addr>> = vec![Vec::new(); clusters as usize];
    let (mut ld, mut lc) = (Vec::new(), Vec::new());
    for n in 0..changes {
        let c = 1 + (n % (clusters - 1)) as usize;
        let ip = test_ip(10_000 + n);
        backends[c].push(ip);
        let t = Instant::now();
        cs[c]
            .source
            .send(SourceEvent::Apply(Object::EndpointSlice(Box::new(
                endpoint_slice("shop", "web-x", "web", &backends[c]),
            ))))
            .await?;
        let (mut d, mut k) = (None, None);
        while d.is_none() || k.is_none() {
            if d.is_none() && has_backend(&hd, ip.into()) {
                d = Some(t.elapsed());
            }
            if k.is_none() && has_backend(&hc, ip.into()) {
                k = Some(t.elapsed());
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "change {n} not seen");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        ld.extend(d);
        lc.extend(k);
    }
    ld.sort();
    lc.sort();
    println!(
        "\n[convergence: backend added in a peer's source → in c0's agent view; {clusters} clusters, {changes} changes]"
    );
    println!(
        "  direct (agent watches each peer's etcd): p50 {:?} p99 {:?} max {:?}",
        pct(&ld, 0.5),
        pct(&ld, 0.99),
        pct(&ld, 1.0)
    );
    println!(
        "  via kvstoremesh (peer etcd → c0 cache → agent): p50 {:?} p99 {:?} max {:?}",
        pct(&lc, 0.5),
        pct(&lc, 0.99),
        pct(&lc, 1.0)
    );
    direct.shutdown().await;
    cached.shutdown().await;
    cs[0].stop_kvstoremesh().await;
    Ok(())
}

/// The `i`-th generated endpoint address: IPv6 documentation space (2001:db8::/32), so a
/// million of them are unique; nothing is ever sent to them.
fn endpoint_ip(i: u32) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::new(
        0x2001,
        0xdb8,
        0,
        0,
        0,
        0,
        (i >> 16) as u16,
        i as u16,
    ))
}

/// The pod CIDR of generated node `n`: endpoints `256 n .. 256 n + 255` (a /120).
fn node_cidr(n: u32) -> ipnet::IpNet {
    match endpoint_ip(n * 256) {
        IpAddr::V6(a) => ipnet::IpNet::V6(ipnet::Ipv6Net::new(a, 120).expect("a /120")),
        IpAddr::V4(_) => unreachable!("endpoints are IPv6"),
    }
}

/// Writes `endpoints` ipcache entries (1000 identities) on nodes of 256 pods each (whose
/// pod CIDRs cover them: a peer may claim only those) and `services` services with 10
/// backends each straight into `big`'s etcd.
async fn generate(big: &TestCluster, endpoints: u32, services: u32) -> anyhow::Result<()> {
    let m = MaxConnectedClusters::C255;
    let cid = ClusterId::new(2, m)?;
    let name = big.name.clone();
    let mut ops = Vec::with_capacity(100);
    let flush = async |ops: &mut Vec<Op>| -> anyhow::Result<()> {
        if !ops.is_empty() {
            big.store
                .txn(Txn {
                    success: std::mem::take(ops),
                    ..Txn::default()
                })
                .await?;
        }
        Ok(())
    };
    for i in 0..1000u32 {
        let id = Identity::cluster_scoped(cid, 256 + i, m)?;
        let labels = Labels::parse([
            format!("k8s:app=a{i}").as_str(),
            "k8s:io.kubernetes.pod.namespace=default",
            "mesh:io.meshd.cluster=big",
        ])?;
        ops.push(Op::Put {
            key: Key::State(StateKey::Identity {
                cluster: name.clone(),
                id,
            })
            .to_string(),
            value: encode(&IdentityEntry { id, labels }),
            lease: None,
        });
        if ops.len() == 100 {
            flush(&mut ops).await?;
        }
    }
    for n in 0..endpoints.div_ceil(256) {
        let node = meshd::model::Node {
            name: format!("node-{n}"),
            cluster: name.clone(),
            cluster_id: cid,
            addresses: vec![meshd::model::NodeAddress {
                kind: meshd::model::NodeAddressType::InternalIP,
                ip: IpAddr::V6(std::net::Ipv6Addr::new(
                    0x2001, 0xdb8, 1, 0, 0, 0, 0, n as u16,
                )),
            }],
            pod_cidrs: vec![node_cidr(n)],
        };
        ops.push(Op::Put {
            key: Key::State(StateKey::Node {
                cluster: name.clone(),
                name: node.name.clone(),
            })
            .to_string(),
            value: encode(&node),
            lease: None,
        });
        if ops.len() == 100 {
            flush(&mut ops).await?;
        }
    }
    for i in 0..endpoints {
        let ip = endpoint_ip(i);
        ops.push(Op::Put {
            key: Key::State(StateKey::Ip {
                cluster: name.clone(),
                ip,
            })
            .to_string(),
            value: encode(&IpCacheEntry {
                ip,
                prefix_len: 128,
                identity: Identity::cluster_scoped(cid, 256 + i % 1000, m)?,
                host_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 2))),
                node: Some(format!("node-{}", i / 256)),
                namespace: Some("default".into()),
                pod: Some(format!("pod-{i}")),
                named_ports: Default::default(),
            }),
            lease: None,
        });
        if ops.len() == 100 {
            flush(&mut ops).await?;
        }
    }
    for s in 0..services {
        let backends = (0..10)
            .map(|b| {
                (
                    endpoint_ip((s * 10 + b) % endpoints.max(1)),
                    Backend {
                        ports: vec![BackendPort {
                            name: "http".into(),
                            port: 8080,
                            protocol: Protocol::Tcp,
                        }],
                        ready: true,
                        hostname: None,
                        node: None,
                        zone: None,
                    },
                )
            })
            .collect();
        let svc = ClusterService {
            cluster: name.clone(),
            cluster_id: cid,
            namespace: format!("ns-{}", s % 50),
            name: format!("svc-{s}"),
            global: true,
            shared: true,
            affinity: Default::default(),
            headless: false,
            frontends: vec![IpAddr::V4(Ipv4Addr::new(198, 19, 100, (s % 250) as u8))],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            backends,
            export_created: None,
        };
        ops.push(Op::Put {
            key: Key::State(StateKey::Service {
                cluster: name.clone(),
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            })
            .to_string(),
            value: encode(&svc),
            lease: None,
        });
        if ops.len() == 100 {
            flush(&mut ops).await?;
        }
    }
    flush(&mut ops).await
}

async fn cold_sync(endpoints: u32, services: u32) -> anyhow::Result<()> {
    let local = Box::pin(TestCluster::start("local", 1, Vec::new())).await?;
    let big = Box::pin(TestCluster::start("big", 2, Vec::new())).await?;
    let t = Instant::now();
    generate(&big, endpoints, services).await?;
    println!(
        "\n[cold sync: peer with {endpoints} endpoints, {services} services, 1000 identities]"
    );
    println!("  generated into the peer's etcd in {:?}", t.elapsed());
    connect(&local, &big).await?;
    // Baseline: raw etcd-client paged lists of the same prefixes with the same credential.
    let cred = big.credential_for(&local.name).await?;
    let raw = meshd::kv::EtcdStore::connect(&cred.to_etcd_config()).await?;
    let mut c = raw.client();
    let t = Instant::now();
    let mut total = 0usize;
    for kind in ["identities", "ip", "nodes", "services"] {
        let prefix = format!("mesh/state/{kind}/v1/big/");
        let end = meshd::keys::prefix_end(prefix.as_bytes());
        let mut start = prefix.as_bytes().to_vec();
        let mut rev = 0;
        let mut page: i64 = 10_000;
        loop {
            let opts = etcd_client::GetOptions::new()
                .with_range(end.clone())
                .with_limit(page)
                .with_revision(rev);
            let resp = match c.get(start.clone(), Some(opts)).await {
                Ok(r) => r,
                // Same rule as the agent's store: halve pages that exceed a message.
                Err(e) if e.to_string().contains("message length too large") && page > 1 => {
                    page /= 2;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            rev = resp.header().map_or(0, |h| h.revision());
            total += resp.kvs().len();
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
    }
    let raw_time = t.elapsed();
    drop(c);
    drop(raw);
    let before = rss_bytes();
    let t = Instant::now();
    let agent = local.start_agent(PeerAccess::Direct);
    let h = agent.handles();
    // The view holding every entry (the guard's and the view's work) and the agent
    // reporting ready (its status is sampled every 100 ms, so that figure moves in steps).
    let mut full: Option<Duration> = None;
    loop {
        let ready = h.status.borrow().ready;
        let complete = h.ipcache.borrow().len() == endpoints as usize;
        if complete && full.is_none() {
            full = Some(t.elapsed());
        }
        if ready && complete {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(900), "agent never synced");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sync = t.elapsed();
    let full = full.unwrap_or(sync);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    println!("  agent (direct) view holds every endpoint: {full:?}");
    println!(
        "  agent (direct) ready with all entries: {sync:?}; raw etcd-client paged list (pages of 10 000, halved when too large, like the agent) of the same {total} keys: {raw_time:?}; ratio {:.2}",
        sync.as_secs_f64() / raw_time.as_secs_f64()
    );
    println!(
        "  agent resident memory: +{:.1} MiB = {:.0} bytes per remote endpoint (whole process RSS delta, services and identities included)",
        (after.saturating_sub(before)) as f64 / 1048576.0,
        (after.saturating_sub(before)) as f64 / f64::from(endpoints)
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let clusters = arg("--clusters", 8)?;
    let changes = arg("--changes", 1000)?;
    let endpoints = arg("--endpoints", 100_000)?;
    let services = arg("--services", 10_000)?;
    println!(
        "mesh-bench: {clusters} clusters, {changes} changes; cold sync {endpoints} endpoints + {services} services"
    );
    if std::env::args().all(|a| a != "--skip-convergence") {
        Box::pin(convergence(clusters, changes)).await?;
    }
    Box::pin(cold_sync(endpoints, services)).await
}
