//! Reflector benchmark: list time for 100k keys and event apply rates, each against a
//! baseline measured in the same process (raw etcd-client / raw store watch, no decoding).
//!
//! Run: `cargo run --release -p mesh-tests --bin reflector-bench [-- --keys 100000]`

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::StreamExt;
use mesh_tests::EtcdGuard;
use meshd::keys::{IdentityScope, Key, StateKey, StateKind, StateValue, encode};
use meshd::kv::{KvStore, MemoryStore, Op, Txn};
use meshd::metrics::ReflectorMetrics;
use meshd::model::{ClusterId, ClusterName, Identity, IpCacheEntry, MaxConnectedClusters};
use meshd::reflector::{Event, Reflector, StateCodec};

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i))
}

fn codec() -> StateCodec {
    let m = MaxConnectedClusters::C255;
    StateCodec {
        kind: StateKind::Ip,
        cluster: ClusterName::new("east").unwrap(),
        cached: false,
        scope: Some(IdentityScope {
            cluster_id: ClusterId::new(1, m).unwrap(),
            mode: m,
        }),
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

fn entry(i: u32, stamp: u128) -> (String, Vec<u8>) {
    let m = MaxConnectedClusters::C255;
    let k = Key::State(StateKey::Ip {
        cluster: codec().cluster,
        ip: ip(i),
    })
    .to_string();
    let v = encode(&IpCacheEntry {
        ip: ip(i),
        prefix_len: 32,
        identity: Identity::cluster_scoped(ClusterId::new(1, m).unwrap(), 256 + i % 1000, m)
            .unwrap(),
        host_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))),
        node: Some("node-1".into()),
        namespace: Some("default".into()),
        pod: Some(format!("t{stamp}")),
        named_ports: Default::default(),
    });
    (k, v)
}

async fn write(
    store: &dyn KvStore,
    range: std::ops::Range<u32>,
    batch: usize,
) -> anyhow::Result<()> {
    let ids: Vec<u32> = range.collect();
    for chunk in ids.chunks(batch) {
        let stamp = now_ns();
        let success = chunk
            .iter()
            .map(|i| {
                let (key, value) = entry(*i, stamp);
                Op::Put {
                    key,
                    value,
                    lease: None,
                }
            })
            .collect();
        store
            .txn(Txn {
                success,
                ..Txn::default()
            })
            .await?;
    }
    Ok(())
}

fn reflector(store: Arc<dyn KvStore>) -> Reflector<StateCodec> {
    let c = codec();
    let cfg = c.reflector_config();
    Reflector::new(store, c.prefix(), c, cfg, ReflectorMetrics::default())
}

/// Runs the reflector's initial list to `InitDone`; returns (entries, elapsed).
async fn reflector_list(
    store: Arc<dyn KvStore>,
) -> anyhow::Result<(usize, Duration, Reflector<StateCodec>)> {
    let mut r = reflector(store);
    let t = Instant::now();
    let mut n = 0;
    loop {
        match r.next().await? {
            Event::InitApply(..) => n += 1,
            Event::InitDone => return Ok((n, t.elapsed(), r)),
            _ => {}
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn stamp_of(value: &[u8]) -> Option<u128> {
    let e: IpCacheEntry = serde_json::from_slice(value).ok()?;
    e.pod?.strip_prefix('t')?.parse().ok()
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let keys: u32 = std::env::args()
        .skip_while(|a| a != "--keys")
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("--keys takes a number")?
        .unwrap_or(100_000);
    let live: u32 = (keys / 5).max(1000);
    println!("reflector-bench: {keys} keys listed, {live} live changes, page size 1000");

    // ---- in-memory store ----
    let mem = MemoryStore::new();
    write(&mem, 0..keys, 1000).await?;
    let mem_dyn: Arc<dyn KvStore> = Arc::new(mem.clone());
    let mut lists = Vec::new();
    let mut r = None;
    for _ in 0..3 {
        let (n, d, rr) = reflector_list(mem_dyn.clone()).await?;
        assert_eq!(n as u32, keys);
        lists.push(d);
        r = Some(rr);
    }
    let mem_list = median(lists);
    let mut r = r.context("no reflector")?;
    // Apply rate: keys changes written, then drained from the watch.
    let mut raw = mem.watch(&codec().prefix(), mem.revision() + 1).await?;
    write(&mem, 0..keys, 1000).await?;
    let t = Instant::now();
    let mut n = 0;
    while n < keys as usize {
        if let Event::Apply(..) = r.next().await? {
            n += 1;
        }
    }
    let mem_apply = t.elapsed();
    let t = Instant::now();
    let mut m = 0;
    while m < keys as usize {
        let b = raw.next().await.context("raw watch ended")??;
        m += b.events.len();
    }
    let mem_raw = t.elapsed();
    println!("\n[memory store]");
    println!(
        "  reflector list {keys} keys: median {:?} ({:.0} entries/s)",
        mem_list,
        rate(keys as usize, mem_list)
    );
    println!(
        "  reflector watch apply: {:.0} events/s; raw store watch (no decode): {:.0} events/s; ratio {:.2}",
        rate(n, mem_apply),
        rate(m, mem_raw),
        rate(n, mem_apply) / rate(m, mem_raw)
    );

    // ---- real etcd ----
    let etcd = EtcdGuard::start().await?;
    let store = etcd.root_store().await?;
    let t = Instant::now();
    write(&store, 0..keys, 100).await?;
    println!("\n[etcd 3.4, TLS + client-cert auth, 127.0.0.1]");
    println!("  wrote {keys} keys in {:?}", t.elapsed());
    let prefix = codec().prefix();

    let mut raw_lists = Vec::new();
    let mut refl_lists = Vec::new();
    let store_dyn: Arc<dyn KvStore> = Arc::new(store.clone());
    let mut r = None;
    for _ in 0..3 {
        // Baseline: raw etcd-client paged get, same page size, no decoding.
        let mut c = store.client();
        let t = Instant::now();
        let mut start = prefix.as_bytes().to_vec();
        let mut rev = 0;
        let mut total = 0;
        loop {
            let opts = etcd_client::GetOptions::new()
                .with_range(meshd::keys::prefix_end(prefix.as_bytes()))
                .with_limit(1000)
                .with_revision(rev);
            let resp = c.get(start.clone(), Some(opts)).await?;
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
        assert_eq!(total as u32, keys);
        raw_lists.push(t.elapsed());
        let (n, d, rr) = reflector_list(store_dyn.clone()).await?;
        assert_eq!(n as u32, keys);
        refl_lists.push(d);
        r = Some(rr);
    }
    let (raw_list, refl_list) = (median(raw_lists), median(refl_lists));
    println!(
        "  list {keys} keys: reflector median {:?}, raw etcd-client paged get median {:?}; ratio {:.2}",
        refl_list,
        raw_list,
        refl_list.as_secs_f64() / raw_list.as_secs_f64()
    );

    // Live changes: the reflector and a raw watch follow the same writes; delivery latency
    // is measured from the moment the batch was built to the moment the event arrives.
    let mut r = r.context("no reflector")?;
    let from = etcd.revision().await? + 1;
    let mut c = store.client();
    let mut raw = c
        .watch(
            prefix.as_str(),
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(from),
            ),
        )
        .await?;
    let raw_task = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(live as usize);
        let mut first = None;
        while lat.len() < live as usize {
            let Ok(Some(resp)) = raw.message().await else {
                break;
            };
            first.get_or_insert_with(Instant::now);
            let now = now_ns();
            for ev in resp.events() {
                if let Some(s) = ev.kv().and_then(|kv| stamp_of(kv.value())) {
                    lat.push(Duration::from_nanos((now.saturating_sub(s)) as u64));
                }
            }
        }
        (lat, first.map(|f| f.elapsed()))
    });
    let refl_task = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(live as usize);
        let mut first = None;
        while lat.len() < live as usize {
            match r.next().await {
                Ok(Event::Apply(_, StateValue::Ip(e))) => {
                    first.get_or_insert_with(Instant::now);
                    let now = now_ns();
                    if let Some(s) = e
                        .pod
                        .and_then(|p| p.strip_prefix('t')?.parse::<u128>().ok())
                    {
                        lat.push(Duration::from_nanos((now.saturating_sub(s)) as u64));
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!("reflector error: {e}"),
            }
        }
        (lat, first.map(|f| f.elapsed()))
    });
    let t = Instant::now();
    write(&store, 0..live, 100).await?;
    let write_time = t.elapsed();
    let (mut raw_lat, raw_span) = raw_task.await?;
    let (mut refl_lat, refl_span) = refl_task.await?;
    raw_lat.sort();
    refl_lat.sort();
    println!(
        "  live: {live} puts in txns of 100 took {:?} ({:.0} writes/s)",
        write_time,
        rate(live as usize, write_time)
    );
    println!(
        "  reflector: {:.0} events/s over the write span; delivery p50 {:?} p99 {:?} max {:?}",
        rate(refl_lat.len(), refl_span.unwrap_or(write_time)),
        pct(&refl_lat, 0.5),
        pct(&refl_lat, 0.99),
        pct(&refl_lat, 1.0)
    );
    println!(
        "  raw etcd watch: {:.0} events/s over the write span; delivery p50 {:?} p99 {:?} max {:?}",
        rate(raw_lat.len(), raw_span.unwrap_or(write_time)),
        pct(&raw_lat, 0.5),
        pct(&raw_lat, 0.99),
        pct(&raw_lat, 1.0)
    );
    Ok(())
}
