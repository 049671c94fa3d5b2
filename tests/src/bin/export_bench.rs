//! Export benchmark: cold export of a generated cluster (100k pods, 10k services, 1k nodes)
//! into a real etcd, against a baseline of raw etcd-client transactions writing the same
//! keys and values into a second etcd in the same run; then single-pod-change latency
//! (source event → change visible on an etcd watch), against a raw put → watch baseline.
//!
//! Run: `cargo run --release -p mesh-tests --bin export-bench [-- --pods 100000 --services 10000 --nodes 1000]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::source::{ChannelSource, Object, SourceEvent};
use futures::StreamExt;
use mesh_tests::EtcdGuard;
use mesh_tests::exporter::RunningExporter;
use mesh_tests::objects::{endpoint_slice, node, pod, service, test_ip};
use meshd::keys::{Key, StateKey};
use meshd::kv::{KvStore, Op, Txn};
use meshd::model::{ClusterId, ClusterName, MaxConnectedClusters};

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

fn pod_obj(i: u32, app: u32) -> Object {
    Object::Pod(Box::new(pod(
        &format!("ns-{}", i % 50),
        &format!("pod-{i}"),
        &[("app", &format!("app-{app}")), ("tier", "bench")],
        test_ip(i),
        &format!("node-{}", i % 1000),
    )))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let pods = arg("--pods", 100_000)?;
    let services = arg("--services", 10_000)?;
    let nodes = arg("--nodes", 1_000)?;
    let samples = arg("--samples", 200)?;
    println!("export-bench: {pods} pods, {services} global services, {nodes} nodes");

    let mut objs = Vec::with_capacity((pods + 2 * services + nodes) as usize);
    for n in 0..nodes {
        objs.push(Object::Node(Box::new(node(
            &format!("node-{n}"),
            test_ip(120_000 + n),
            &format!("198.18.{}.0/24", n % 256),
        ))));
    }
    for i in 0..pods {
        objs.push(pod_obj(i, i % 1000));
    }
    for s in 0..services {
        let ns = format!("ns-{}", s % 50);
        let name = format!("svc-{s}");
        objs.push(Object::Service(Box::new(service(
            &ns,
            &name,
            test_ip(110_000 + s),
            true,
        ))));
        let backends: Vec<_> = (0..10)
            .map(|b| test_ip((s * 10 + b) % pods.max(1)))
            .collect();
        objs.push(Object::EndpointSlice(Box::new(endpoint_slice(
            &ns,
            &format!("{name}-x"),
            &name,
            &backends,
        ))));
    }

    // ---- cold export ----
    let etcd = EtcdGuard::start().await?;
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await?);
    let m = MaxConnectedClusters::C255;
    let cluster = ClusterName::new("east")?;
    let cfg = ExportConfig::new(cluster.clone(), ClusterId::new(1, m)?, m);
    let (tx, src) = ChannelSource::new(4096);
    let t = Instant::now();
    let mut ex = RunningExporter::start(store.clone(), cfg, Box::new(src));
    for o in objs {
        tx.send(SourceEvent::Apply(o)).await?;
    }
    tx.send(SourceEvent::Synced).await?;
    let status = ex.wait_ready(Duration::from_secs(1800)).await?;
    let cold = t.elapsed();
    let exported = store.list_all("mesh/state/", 10_000).await?;
    let keys = exported.kvs.len();
    println!("\n[cold export into etcd 3.4 (TLS + auth, 127.0.0.1)]");
    println!("  counts: {:?}", status.counts);
    println!(
        "  exporter: {keys} keys in {:?} = {:.0} keys/s (includes identity allocation txns)",
        cold,
        keys as f64 / cold.as_secs_f64()
    );

    // Baseline: the same keys and values, raw etcd-client txns of 100 puts, fresh etcd.
    let base = EtcdGuard::start().await?;
    let mut c = base.root_store().await?.client();
    let t = Instant::now();
    for chunk in exported.kvs.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|kv| etcd_client::TxnOp::put(kv.key.clone(), kv.value.clone(), None))
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    let raw = t.elapsed();
    println!(
        "  baseline raw etcd-client txns (100 puts each), same keys/values: {:?} = {:.0} keys/s",
        raw,
        keys as f64 / raw.as_secs_f64()
    );
    println!(
        "  ratio exporter/baseline wall time: {:.2}",
        cold.as_secs_f64() / raw.as_secs_f64()
    );
    drop(base);

    // ---- incremental: one pod change → time until its ipcache key changes in etcd ----
    let ip_key = Key::State(StateKey::Ip {
        cluster: cluster.clone(),
        ip: test_ip(7).into(),
    })
    .to_string();
    let rev = store
        .list_page("mesh/heartbeat", None, 1, 0)
        .await?
        .revision;
    let mut watch = store.watch(&ip_key, rev + 1).await?;
    // (a) between label sets other pods also use (no identity allocation): app-7 ↔ app-57
    //     (pods 7, 57, 1007… share namespace ns-7); (b) to a brand-new label set each time.
    for (name, fresh) in [("existing identity", false), ("new identity", true)] {
        let mut lat = Vec::with_capacity(samples as usize);
        for n in 0..samples {
            let obj = if fresh {
                Object::Pod(Box::new(pod(
                    "ns-7",
                    "pod-7",
                    &[("app", &format!("fresh-{n}")), ("tier", "bench")],
                    test_ip(7),
                    "node-7",
                )))
            } else {
                pod_obj(7, if n % 2 == 0 { 57 } else { 7 })
            };
            let t = Instant::now();
            tx.send(SourceEvent::Apply(obj)).await?;
            loop {
                let b = tokio::time::timeout(Duration::from_secs(30), watch.next())
                    .await
                    .context("no watch event within 30 s")?
                    .context("watch ended")??;
                if !b.events.is_empty() {
                    break;
                }
            }
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "\n[incremental: one pod label change ({name}) → its ipcache key updated in etcd]"
        );
        println!(
            "  exporter: p50 {:?} p99 {:?} max {:?} over {samples} changes",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        );
    }
    let mut base_lat = Vec::with_capacity(samples as usize);
    let key2 = format!("{ip_key}-baseline");
    let rev = store
        .list_page("mesh/heartbeat", None, 1, 0)
        .await?
        .revision;
    let mut watch = store.watch(&key2, rev + 1).await?;
    let value = store.get(&ip_key).await?.context("ip key")?.value;
    for _ in 0..samples {
        let t = Instant::now();
        store
            .txn(Txn {
                success: vec![Op::Put {
                    key: key2.clone(),
                    value: value.clone(),
                    lease: None,
                }],
                ..Txn::default()
            })
            .await?;
        let _ = watch.next().await.context("watch ended")??;
        base_lat.push(t.elapsed());
    }
    base_lat.sort();
    println!(
        "  baseline raw txn put → watch: p50 {:?} p99 {:?} max {:?}",
        pct(&base_lat, 0.5),
        pct(&base_lat, 0.99),
        pct(&base_lat, 1.0)
    );
    ex.stop().await?;
    Ok(())
}
