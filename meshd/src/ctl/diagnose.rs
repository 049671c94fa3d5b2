//! `meshctl diagnose`: named checks of every cluster in the admin kubeconfig, each a
//! pass/warn/fail line with a hint (in the manner of `linkerd multicluster check`).
//!
//! ```text
//!  per cluster   etcd-mtls ─ ca-key ─ admin-cert ─ admin-role ─ cluster-config ─ synced-markers
//!                ─ heartbeat ─ clock ─ peer-credentials (cert, chain, login as remote-<c>)
//!  mesh-wide     cluster-ids-unique ─ pod-cidrs-disjoint
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;
use mesh_certs::Role;
use serde::Serialize;
use time::OffsetDateTime;

use super::admin::{self, ClusterAdmin, KubeconfigArgs};
use super::output::{OutputFormat, bad, emit, good, warn};
use super::{CtlError, Status, runtime};
use crate::keys::{
    Key, StateKind, StateValue, decode_cluster_config, decode_state, decode_time, state_prefix,
};
use crate::kv::EtcdStore;

/// A heartbeat older than this fails (the apiserver refreshes it every 15 s by default).
const HEARTBEAT_MAX_AGE: Duration = Duration::from_secs(60);
/// A heartbeat this far in the future means the clocks disagree.
const CLOCK_SKEW_MAX: Duration = Duration::from_secs(5);
/// Certificates expiring sooner than this warn.
const CERT_WARN: Duration = Duration::from_secs(30 * 24 * 3600);

/// Arguments of `meshctl diagnose`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  meshctl diagnose
  meshctl diagnose -o json | jq '.checks[] | select(.result != \"pass\")'")]
pub struct DiagnoseArgs {
    /// Which kubeconfig(s) name the clusters.
    #[command(flatten)]
    pub kube: KubeconfigArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Check {
    /// The cluster, or `mesh` for mesh-wide checks.
    scope: String,
    name: &'static str,
    result: Outcome,
    detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    hint: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    checks: Vec<Check>,
    passed: usize,
    warnings: usize,
    failed: usize,
}

struct Checks(Vec<Check>);

impl Checks {
    fn add(
        &mut self,
        scope: &str,
        name: &'static str,
        result: Result<String, (Outcome, String, &str)>,
    ) {
        let (result, detail, hint) = match result {
            Ok(detail) => (Outcome::Pass, detail, String::new()),
            Err((o, detail, hint)) => (o, detail, hint.to_owned()),
        };
        self.0.push(Check {
            scope: scope.to_owned(),
            name,
            result,
            detail,
            hint,
        });
    }
}

/// What the peer guards refused: a range conflict fails (two clusters claim one address
/// range, so one of them cannot be reached as itself), a degraded peer or refused entries
/// warn.
async fn peer_trust_check(c: &ClusterAdmin) -> Result<String, (Outcome, String, &'static str)> {
    let peers = match super::status::peer_trust(c).await {
        Ok(p) => p,
        Err(e) => {
            return Err((
                Outcome::Warn,
                format!("cannot ask the peer guards: {e}"),
                "are the agent and the apiserver running?",
            ));
        }
    };
    let conflicts: Vec<String> = peers
        .iter()
        .flat_map(|p| p.range_conflicts.iter().cloned())
        .collect();
    if !conflicts.is_empty() {
        return failed(
            conflicts.join("; "),
            "pod CIDRs and node addresses must not overlap between clusters: fix the nodes' podCIDRs of the claimant (or disconnect a peer that claims what is not its own)",
        );
    }
    let mut notes = Vec::new();
    for p in &peers {
        if !p.degraded_kinds.is_empty() {
            notes.push(format!(
                "{} over quota for {}",
                p.peer,
                p.degraded_kinds.join(", ")
            ));
        }
        let refused: u64 = p.refused.values().sum();
        if refused > 0 {
            let reasons: Vec<String> = p.refused.iter().map(|(r, n)| format!("{r}={n}")).collect();
            notes.push(format!(
                "{} refused {refused} ({})",
                p.peer,
                reasons.join(" ")
            ));
        }
    }
    if notes.is_empty() {
        Ok(format!(
            "{} peer(s): nothing refused, within quotas",
            peers.len()
        ))
    } else {
        Err((
            Outcome::Warn,
            notes.join("; "),
            "a peer may claim only its own addresses, within --peer-max-* quotas; see mesh_peer_refused on /metrics and the peer's exports",
        ))
    }
}

fn failed(detail: String, hint: &str) -> Result<String, (Outcome, String, &str)> {
    Err((Outcome::Fail, detail, hint))
}

/// Expiry and chain of a client certificate.
fn cert_check(
    what: &str,
    cert_pem: &str,
    ca_pem: &str,
) -> Result<String, (Outcome, String, &'static str)> {
    let info = match mesh_certs::inspect_pem(cert_pem) {
        Ok(v) if !v.is_empty() => v.into_iter().next().unwrap_or_else(|| unreachable!()),
        Ok(_) => {
            return Err((
                Outcome::Fail,
                format!("{what}: no certificate"),
                "reissue it",
            ));
        }
        Err(e) => {
            return Err((
                Outcome::Fail,
                format!("{what}: {}", super::error_chain(&e)),
                "reissue it",
            ));
        }
    };
    if let Err(e) = mesh_certs::verify_chain(cert_pem, ca_pem) {
        return Err((
            Outcome::Fail,
            format!("{what} ({}): {}", info.subject, super::error_chain(&e)),
            "the certificate is not signed by the CA it is paired with, or has expired; reconnect (`meshctl disconnect` + `meshctl connect`) to reissue",
        ));
    }
    let days = (info.not_after - OffsetDateTime::now_utc()).whole_days();
    if info.expires_within(CERT_WARN) {
        return Err((
            Outcome::Warn,
            format!("{what} ({}) expires in {days} d", info.subject),
            "reissue it before it expires (`meshctl disconnect` + `meshctl connect` for peer credentials)",
        ));
    }
    Ok(format!(
        "{what} ({}) valid for {days} more days, chain verifies",
        info.subject
    ))
}

/// The admin kubeconfig's client certificate must carry role admin of its cluster, or the
/// gRPC APIs refuse every meshctl call.
fn admin_role_check(c: &ClusterAdmin) -> Result<String, (Outcome, String, &'static str)> {
    const HINT: &str = "the gRPC APIs (status, services, identities, observe) refuse it: run `meshctl certs reissue --dir <the cluster's pki directory>`, or `meshctl up` again for a local mesh";
    let what = "root client certificate";
    let info = mesh_certs::inspect_pem(&c.cred.cert_pem)
        .ok()
        .and_then(|v| v.into_iter().next());
    let Some(info) = info else {
        return failed(format!("{what}: unreadable"), HINT);
    };
    match info.principal() {
        Ok(p) if p.role() == Role::Admin && p.cluster() == c.name().as_str() => {
            Ok(format!("{what} ({}) carries role {p}", info.subject))
        }
        Ok(p) => failed(
            format!(
                "{what} ({}) carries role {p}, not spiffe://{}.meshd/admin",
                info.subject,
                c.name()
            ),
            HINT,
        ),
        Err(e) => failed(format!("{what}: {e}"), HINT),
    }
}

async fn get(client: &mut etcd_client::Client, key: &str) -> Result<Option<Vec<u8>>, String> {
    client
        .get(key, None)
        .await
        .map(|r| r.kvs().first().map(|kv| kv.value().to_vec()))
        .map_err(|e| super::error_chain(&e))
}

/// Pod CIDRs of the nodes a cluster exports.
async fn pod_cidrs(
    client: &mut etcd_client::Client,
    c: &ClusterAdmin,
) -> Result<Vec<(String, IpNet)>, String> {
    let prefix = state_prefix(StateKind::Nodes, c.name());
    let resp = client
        .get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| super::error_chain(&e))?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let Ok(Key::State(sk)) = Key::parse_bytes(kv.key()) else {
            continue;
        };
        if let Ok(StateValue::Node(n)) = decode_state(&sk, kv.value(), None) {
            out.extend(n.pod_cidrs.into_iter().map(|p| (n.name.clone(), p)));
        }
    }
    Ok(out)
}

async fn check_cluster(
    c: &ClusterAdmin,
    all: &[ClusterAdmin],
    checks: &mut Checks,
    cidrs: &mut Vec<(String, String, IpNet)>,
) {
    let scope = c.name().to_string();
    let scope = scope.as_str();
    // etcd over mTLS, as root.
    let mut client = match EtcdStore::connect(&c.etcd_config()).await {
        Ok(s) => {
            let mut client = s.client();
            match client.status().await {
                Ok(st) => {
                    checks.add(
                        scope,
                        "etcd-mtls",
                        Ok(format!(
                            "{} answers over mTLS (etcd {})",
                            c.cred.server,
                            st.version()
                        )),
                    );
                    Some(client)
                }
                Err(e) => {
                    checks.add(scope, "etcd-mtls", failed(format!("{}: {}", c.cred.server, super::error_chain(&e)), "is etcd running? does its certificate chain to the CA in the kubeconfig? is the root client certificate accepted?"));
                    None
                }
            }
        }
        Err(e) => {
            checks.add(
                scope,
                "etcd-mtls",
                failed(
                    format!("{}: {}", c.cred.server, super::error_chain(&e)),
                    "check the server URL and CA in the kubeconfig",
                ),
            );
            None
        }
    };
    checks.add(
        scope,
        "ca-key",
        match c.ca() {
            Ok(_) => Ok(format!(
                "{} fits the CA certificate",
                c.ext.ca_key.display()
            )),
            Err(e) => failed(
                super::error_chain(&e),
                "point caKey in the meshd.io/admin extension at the key of this cluster's CA",
            ),
        },
    );
    checks.add(
        scope,
        "admin-cert",
        cert_check("root client certificate", &c.cred.cert_pem, &c.cred.ca_pem),
    );
    checks.add(scope, "admin-role", admin_role_check(c));
    checks.add(scope, "peer-trust", peer_trust_check(c).await);

    if let Some(client) = client.as_mut() {
        // The apiserver's own view of the cluster.
        let key = Key::ClusterConfig(c.name().clone()).to_string();
        let r = match get(client, &key).await {
            Ok(Some(v)) => match decode_cluster_config(c.name(), &v) {
                Ok(cfg)
                    if cfg.id == c.cred.cluster_id
                        && cfg.max_connected_clusters == c.cred.max_connected_clusters =>
                {
                    Ok(format!(
                        "{key}: ID {}, maxConnectedClusters {}",
                        cfg.id,
                        cfg.max_connected_clusters.get()
                    ))
                }
                Ok(cfg) => failed(
                    format!(
                        "{key} says ID {} / maxConnectedClusters {}, the kubeconfig says {} / {}",
                        cfg.id,
                        cfg.max_connected_clusters.get(),
                        c.cred.cluster_id,
                        c.cred.max_connected_clusters.get()
                    ),
                    "the apiserver and the kubeconfig disagree about who this cluster is; fix one of them",
                ),
                Err(e) => failed(
                    e.to_string(),
                    "the apiserver wrote a value meshd cannot read; check versions",
                ),
            },
            Ok(None) => failed(
                format!("{key} missing"),
                "is the clustermesh-apiserver of this cluster running?",
            ),
            Err(e) => failed(e, "etcd read failed"),
        };
        checks.add(scope, "cluster-config", r);

        let mut missing = Vec::new();
        for kind in StateKind::ALL {
            let key = Key::Synced {
                cluster: c.name().clone(),
                kind,
            }
            .to_string();
            match get(client, &key).await {
                Ok(Some(_)) => {}
                Ok(None) => missing.push(kind.to_string()),
                Err(e) => missing.push(format!("{kind} ({e})")),
            }
        }
        checks.add(
            scope,
            "synced-markers",
            if missing.is_empty() {
                Ok("identities, ip, nodes, services all marked synced".into())
            } else {
                failed(format!("not synced: {}", missing.join(", ")), "peers wait for these markers; the apiserver is still exporting or failing (see its log and `meshctl status`)")
            },
        );

        let key = Key::Heartbeat;
        let now = OffsetDateTime::now_utc();
        match get(client, &key.to_string()).await {
            Ok(Some(v)) => match decode_time(&key, &v) {
                Ok(t) => {
                    let age = now - t;
                    checks.add(
                        scope,
                        "heartbeat",
                        if age > HEARTBEAT_MAX_AGE {
                            failed(format!("last heartbeat {} s ago", age.whole_seconds()), "the apiserver is not refreshing mesh/heartbeat; peers will consider this cluster stale")
                        } else {
                            Ok(format!("refreshed {} s ago", age.whole_seconds().max(0)))
                        },
                    );
                    checks.add(
                        scope,
                        "clock",
                        if -age > CLOCK_SKEW_MAX {
                            failed(
                                format!(
                                    "the heartbeat is {} s in the future",
                                    (-age).whole_seconds()
                                ),
                                "this machine's clock and the apiserver's disagree; fix NTP",
                            )
                        } else {
                            Ok("heartbeat time agrees with this machine's clock".into())
                        },
                    );
                }
                Err(e) => checks.add(
                    scope,
                    "heartbeat",
                    failed(
                        e.to_string(),
                        "the apiserver wrote a heartbeat meshd cannot read",
                    ),
                ),
            },
            Ok(None) => checks.add(
                scope,
                "heartbeat",
                failed(
                    "mesh/heartbeat missing".into(),
                    "is the clustermesh-apiserver running?",
                ),
            ),
            Err(e) => checks.add(scope, "heartbeat", failed(e, "etcd read failed")),
        }

        match pod_cidrs(client, c).await {
            Ok(v) => cidrs.extend(
                v.into_iter()
                    .map(|(node, net)| (scope.to_owned(), node, net)),
            ),
            Err(e) => checks.add(scope, "pod-cidrs", failed(e, "etcd read failed")),
        }
    }

    // Peer credentials: parse, expiry, chain, and a real login as remote-<this cluster>.
    let peers = match c.configured_peers() {
        Ok(p) => p,
        Err(e) => {
            checks.add(
                scope,
                "peer-credentials",
                failed(super::error_chain(&e), "check the peers directory"),
            );
            return;
        }
    };
    if peers.is_empty() {
        checks.add(
            scope,
            "peer-credentials",
            Ok(format!(
                "no peers configured in {}",
                c.ext.peers_dir.display()
            )),
        );
    }
    for p in peers {
        let p = match p {
            Ok(p) => p,
            Err(e) => {
                checks.add(
                    scope,
                    "peer-credentials",
                    failed(
                        e,
                        "fix or remove the file (meshctl disconnect + connect rewrites it)",
                    ),
                );
                continue;
            }
        };
        checks.add(
            scope,
            "peer-credentials",
            cert_check(
                &format!("credential for {}", p.name),
                &p.cert_pem,
                &p.ca_pem,
            ),
        );
        if let Some(other) = all.iter().find(|a| a.name() == &p.name)
            && other.cred.cluster_id != p.cluster_id
        {
            checks.add(
                scope,
                "peer-credentials",
                failed(
                    format!(
                        "credential for {} says ID {}, its admin kubeconfig says {}",
                        p.name, p.cluster_id, other.cred.cluster_id
                    ),
                    "reconnect the pair",
                ),
            );
        }
        let login = async {
            let store = EtcdStore::connect(&crate::kv::EtcdConfig {
                connect_timeout: Some(Duration::from_secs(3)),
                request_timeout: Some(Duration::from_secs(5)),
                ..p.to_etcd_config()
            })
            .await
            .map_err(|e| super::error_chain(&e))?;
            let key = Key::ClusterConfig(p.name.clone()).to_string();
            get(&mut store.client(), &key).await
        };
        checks.add(
            scope,
            "peer-login",
            match login.await {
                Ok(Some(_)) => Ok(format!("reads {} at {} as remote-{}", p.name, p.server, c.name())),
                Ok(None) => Err((Outcome::Warn, format!("logged in to {} but it has no cluster-config yet", p.name), "is the peer's apiserver running?")),
                Err(e) => failed(format!("{} at {}: {e}", p.name, p.server), "the peer is down, or revoked our user (run `meshctl connect` again after `meshctl disconnect`)"),
            },
        );
    }
}

/// `meshctl diagnose`.
pub(super) fn diagnose(args: &DiagnoseArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let admins = admin::load(&args.kube.files())?;
    let rt = runtime()?;
    let mut checks = Checks(Vec::new());
    let mut cidrs = Vec::new();
    rt.block_on(async {
        for c in &admins {
            Box::pin(check_cluster(c, &admins, &mut checks, &mut cidrs)).await;
        }
    });

    // Cluster IDs: every cluster in the kubeconfig and every peer any of them has.
    let mut ids: BTreeMap<u16, std::collections::BTreeSet<String>> = BTreeMap::new();
    for c in &admins {
        ids.entry(c.cred.cluster_id.get())
            .or_default()
            .insert(c.name().to_string());
        for p in c
            .configured_peers()
            .unwrap_or_default()
            .into_iter()
            .flatten()
        {
            ids.entry(p.cluster_id.get())
                .or_default()
                .insert(p.name.to_string());
        }
    }
    let clashes: Vec<String> = ids
        .iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|(id, names)| {
            format!(
                "ID {id}: {}",
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    checks.add(
        "mesh",
        "cluster-ids-unique",
        if clashes.is_empty() {
            Ok(format!(
                "{} cluster(s), IDs unique",
                ids.values()
                    .map(std::collections::BTreeSet::len)
                    .sum::<usize>()
            ))
        } else {
            failed(
                clashes.join("; "),
                "every cluster of a mesh needs its own ID; disconnect one of the clashing clusters",
            )
        },
    );

    let mut overlaps = Vec::new();
    for (i, (ca, na, a)) in cidrs.iter().enumerate() {
        for (cb, nb, b) in &cidrs[i + 1..] {
            if ca != cb && (a.contains(&b.network()) || b.contains(&a.network())) {
                overlaps.push(format!("{a} ({ca}/{na}) and {b} ({cb}/{nb})"));
            }
        }
    }
    checks.add(
        "mesh",
        "pod-cidrs-disjoint",
        if overlaps.is_empty() {
            Ok(format!(
                "{} pod CIDR(s) across clusters, none overlap",
                cidrs.len()
            ))
        } else {
            failed(
                overlaps.join("; "),
                "overlapping pod CIDRs make remote endpoint IPs ambiguous; renumber one cluster",
            )
        },
    );

    let count = |o| checks.0.iter().filter(|c| c.result == o).count();
    let report = Report {
        passed: count(Outcome::Pass),
        warnings: count(Outcome::Warn),
        failed: count(Outcome::Fail),
        checks: checks.0,
    };
    emit(out, args.output, &report, |out| {
        for c in &report.checks {
            let mark = match c.result {
                Outcome::Pass => good("✔"),
                Outcome::Warn => warn("‼"),
                Outcome::Fail => bad("✘"),
            };
            writeln!(out, "{mark} {:<10} {:<20} {}", c.scope, c.name, c.detail)?;
            if !c.hint.is_empty() {
                writeln!(out, "    hint: {}", c.hint)?;
            }
        }
        let summary = format!(
            "{} passed, {} warnings, {} failed",
            report.passed, report.warnings, report.failed
        );
        writeln!(
            out,
            "{}",
            if report.failed == 0 {
                good(&summary)
            } else {
                bad(&summary)
            }
        )
    })?;
    Ok(if report.failed == 0 {
        Status::Ok
    } else {
        Status::Problems
    })
}
