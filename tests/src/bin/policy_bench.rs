//! policy-bench: the policy engine at 10k identities × 500 policies — full computation,
//! incremental identity add/remove and policy change (p50/p99), against a from-scratch
//! recomputation (a fresh engine fed everything) measured in the same run.
//!
//! ```text
//! cargo run --release -p mesh-tests --bin policy-bench -- [--identities 10000] [--policies 500] [--samples 1000]
//! ```
//!
//! Workload: identities spread over 4 clusters (`c1` is local), 20 namespaces, 25 apps,
//! 3 tiers, each with a unique pod-template-hash label. Every local identity has one
//! endpoint (the whole cluster on one agent: the worst case). Policy `j` selects one
//! (namespace, app) pair and allows two peer selectors (one local, one naming remote
//! clusters with `In`) on 8080/TCP and the range 9000-9004/TCP; every 10th also admits
//! `world` on 443/TCP; every 25th has egress to another namespace on 53/ANY and to the
//! `cluster` entity on 5432/TCP.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshd::model::{ClusterName, Identity, Labels, MeshNetworkPolicy};
use meshd::policy::{EndpointId, PolicyDiff, PolicyEngine};

const CLUSTERS: u32 = 4;
const NAMESPACES: u32 = 20;
const APPS: u32 = 25;

struct Args {
    identities: u32,
    policies: u32,
    samples: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        identities: 10_000,
        policies: 500,
        samples: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || -> anyhow::Result<String> {
            it.next().with_context(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--identities" => a.identities = val()?.parse()?,
            "--policies" => a.policies = val()?.parse()?,
            "--samples" => a.samples = val()?.parse()?,
            "-h" | "--help" => {
                println!("policy-bench [--identities N] [--policies N] [--samples N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn cluster_of(i: u32) -> u32 {
    i % CLUSTERS + 1
}

fn identity(i: u32) -> Identity {
    // Cluster-scoped layout (255 mode): cluster << 16 | local (≥ 256).
    Identity::from_raw(cluster_of(i) << 16 | (256 + i / CLUSTERS)).expect("fits 24 bits")
}

fn labels(i: u32, salt: &str) -> Labels {
    let v = [
        format!("mesh:io.meshd.cluster=c{}", cluster_of(i)),
        format!(
            "k8s:io.kubernetes.pod.namespace=ns{}",
            (i / CLUSTERS) % NAMESPACES
        ),
        format!("k8s:app=app{}", (i / (CLUSTERS * NAMESPACES)) % APPS),
        format!("k8s:tier=t{}", i % 3),
        format!("k8s:pod-template-hash=h{i}{salt}"),
    ];
    Labels::parse(v.iter().map(String::as_str)).expect("valid labels")
}

fn policy(j: u32, port: u16) -> MeshNetworkPolicy {
    let ns = j % NAMESPACES;
    let app = (j / NAMESPACES) % APPS;
    let mut ingress = vec![format!(
        r#"{{"fromEndpoints":[{{"matchLabels":{{"app":"app{a1}"}}}},
              {{"matchLabels":{{"app":"app{a2}"}},"matchExpressions":[{{"key":"io.meshd.cluster","operator":"In","values":["c2","c3"]}}]}}],
            "toPorts":[{{"port":{port},"protocol":"TCP"}},{{"port":9000,"endPort":9004,"protocol":"TCP"}}]}}"#,
        a1 = (app + 1) % APPS,
        a2 = (app + 2) % APPS,
    )];
    if j.is_multiple_of(10) {
        ingress
            .push(r#"{"fromEntities":["world"],"toPorts":[{"port":443,"protocol":"TCP"}]}"#.into());
    }
    let egress = if j.is_multiple_of(25) {
        format!(
            r#","egress":[{{"toEndpoints":[{{"matchLabels":{{"io.kubernetes.pod.namespace":"ns{n}"}}}}],"toPorts":[{{"port":53}}]}},
                          {{"toEntities":["cluster"],"toPorts":[{{"port":5432,"protocol":"TCP"}}]}}]"#,
            n = (ns + 3) % NAMESPACES
        )
    } else {
        String::new()
    };
    let spec = format!(
        r#"{{"endpointSelector":{{"matchLabels":{{"app":"app{app}"}}}},"ingress":[{}]{egress}}}"#,
        ingress.join(",")
    );
    MeshNetworkPolicy {
        namespace: format!("ns{ns}"),
        name: format!("p{j}"),
        spec: serde_json::from_str(&spec).expect("bench policy parses"),
    }
}

/// Builds an engine from everything and drains its diffs: the from-scratch computation.
fn full(
    a: &Args,
    local: &ClusterName,
    sink: &mut Vec<PolicyDiff>,
) -> anyhow::Result<(PolicyEngine, Duration)> {
    let start = Instant::now();
    let mut e = PolicyEngine::new(local.clone());
    for i in 0..a.identities {
        e.upsert_identity(identity(i), labels(i, ""))?;
        if cluster_of(i) == 1 {
            e.upsert_endpoint(EndpointId(i), identity(i));
        }
    }
    for j in 0..a.policies {
        e.upsert_policy(policy(j, 8080))?;
    }
    e.drain_diffs(sink);
    Ok((e, start.elapsed()))
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let local = ClusterName::new("c1")?;
    let mut sink = Vec::new();

    // Warm-up, then the full computation (best of 3).
    let (_, _) = full(&a, &local, &mut sink)?;
    let mut best = Duration::MAX;
    let mut engine = None;
    let mut full_diffs = 0;
    for _ in 0..3 {
        sink.clear();
        let (e, t) = full(&a, &local, &mut sink)?;
        full_diffs = sink.len();
        best = best.min(t);
        engine = Some(e);
    }
    let mut e = engine.expect("ran");
    let stats = e.stats();
    println!(
        "policy-bench: {} identities ({} local endpoints), {} policies, {} selectors",
        stats.identities, stats.endpoints, stats.policies, stats.selectors
    );
    println!(
        "full computation (from scratch): {:.1} ms, {} entries, {} diffs",
        best.as_secs_f64() * 1e3,
        stats.entries,
        full_diffs
    );

    // Incremental identity add + remove: new pods with fresh label sets, local and remote.
    let mut add = Vec::with_capacity(a.samples);
    let mut del = Vec::with_capacity(a.samples);
    let mut touched = 0usize;
    for s in 0..a.samples as u32 {
        let i = (s * 7919) % a.identities;
        let id = Identity::from_raw(cluster_of(i) << 16 | (60_000 + s % 5000))?;
        let l = labels(i, "-new");
        sink.clear();
        let t = Instant::now();
        e.upsert_identity(id, l)?;
        e.drain_diffs(&mut sink);
        add.push(t.elapsed());
        touched += sink.len();
        sink.clear();
        let t = Instant::now();
        e.remove_identity(id);
        e.drain_diffs(&mut sink);
        del.push(t.elapsed());
    }

    // Incremental policy change: one policy's port changes (and back).
    let mut pol = Vec::with_capacity(a.samples);
    for s in 0..a.samples as u32 {
        let j = (s * 31) % a.policies;
        sink.clear();
        let t = Instant::now();
        e.upsert_policy(policy(j, 8081))?;
        e.drain_diffs(&mut sink);
        pol.push(t.elapsed());
        e.upsert_policy(policy(j, 8080))?;
        e.drain_diffs(&mut sink);
    }

    // The incremental engine must still equal a fresh one.
    sink.clear();
    let (fresh, _) = full(&a, &local, &mut sink)?;
    if fresh.state() != e.state() {
        bail!("incremental state diverged from the from-scratch state");
    }

    let report = |name: &str, v: &mut Vec<Duration>| {
        let (p50, p99) = (pct(v, 0.50), pct(v, 0.99));
        println!(
            "{name:<22} p50 {:>9.1} µs  p99 {:>9.1} µs   from-scratch / p50 = {:>8.0}x   / p99 = {:>8.0}x",
            us(p50),
            us(p99),
            best.as_secs_f64() / p50.as_secs_f64(),
            best.as_secs_f64() / p99.as_secs_f64()
        );
    };
    report("identity add", &mut add);
    report("identity remove", &mut del);
    report("policy change", &mut pol);
    println!(
        "({} samples each; identity adds produced {:.1} diffs on average; state after all changes == fresh engine)",
        a.samples,
        touched as f64 / a.samples as f64
    );
    Ok(())
}
