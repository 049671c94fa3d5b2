//! `meshctl certs`: create a cluster CA, issue certificates (with their role) from it, reissue role-less ones, inspect and verify certificate files.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use clap::{Subcommand, ValueEnum};
use mesh_certs::{
    CLOCK_SKEW_BACKDATE, CertInfo, CertRequest, CertUsage, CertificateAuthority, Role, RoleError,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;

use super::output::{OutputFormat, emit};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{CtlError, Status, error_chain};
use crate::model::ClusterName;

const DAY: u64 = 24 * 60 * 60;
const CA_STEM: &str = "ca";

/// `meshctl certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600), CN `meshd-<cluster>-ca`.
    Init {
        /// Directory to write the CA into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Cluster name (RFC 1123 label).
        #[arg(long)]
        cluster: ClusterName,
        /// Validity of the CA certificate: `Ny`, `Nd`, `Nh` (also `Nm`, `Ns`).
        #[arg(long, default_value = "10y", value_parser = parse_validity)]
        validity: Duration,
        /// Replace an existing CA (certificates issued by the old one stop verifying).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate from DIR/ca.{crt,key} into DIR/<name>.{crt,key}.
    Issue {
        /// Directory holding ca.crt and ca.key; the new files are written here too.
        #[arg(long)]
        dir: PathBuf,
        /// File stem of the new certificate: writes <name>.crt and <name>.key.
        #[arg(long)]
        name: String,
        /// Subject CN (for client certificates: the identity, e.g. the etcd user).
        #[arg(long)]
        cn: String,
        /// DNS subject alternative names (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// IP subject alternative names (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        ip: Vec<String>,
        /// What the certificate may be used for (extended key usage).
        #[arg(long, value_enum, default_value_t = UsageArg::Server)]
        usage: UsageArg,
        /// The role the certificate carries (SAN URI `spiffe://<cluster>.meshd/<role>`), which
        /// the gRPC APIs authorize every call by: `admin` (meshctl, `root`), `agent`,
        /// `apiserver`, `peer`. Without it the gRPC APIs refuse the certificate (etcd, which
        /// goes by the CN, does not care).
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        /// Cluster of the role (default: from the CA's CN `meshd-<cluster>-ca`).
        #[arg(long, requires = "role")]
        cluster: Option<ClusterName>,
        /// Validity: `Nd`, `Ny`, `Nh` (also `Nm`, `Ns`).
        #[arg(long, default_value = "365d", value_parser = parse_validity)]
        validity: Duration,
        /// Overwrite existing <name>.crt / <name>.key.
        #[arg(long)]
        force: bool,
    },
    /// Reissue, in place, every certificate of DIR that carries no role, with the role its CN
    /// implies (`root`, `meshctl`, `admin-*` → admin; `agent-*`, `mesh-agent` → agent;
    /// `apiserver-*`, `clustermesh-apiserver` → apiserver; `remote-*` → peer) and otherwise
    /// the same CN, SANs, usage and validity length, from DIR/ca.{crt,key}.
    ///
    /// For meshes set up before certificates carried roles (the gRPC APIs refuse role-less
    /// certificates). Servers pick up their new certificate without a restart; `meshctl up`
    /// on a running mesh does this by itself. Certificates with a role, of another CA, or whose
    /// CN implies no role (e.g. `etcd`) are left alone.
    Reissue {
        /// Directory holding ca.crt, ca.key and the <name>.crt/<name>.key pairs.
        #[arg(long)]
        dir: PathBuf,
        /// Cluster of the roles (default: from the CA's CN `meshd-<cluster>-ca`).
        #[arg(long)]
        cluster: Option<ClusterName>,
        /// Only say what would be reissued.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what certificate files hold; optionally verify them against a CA.
    ///
    /// Exits with status 2 when any certificate is expired, not yet valid, fails verification
    /// or expires within the warning window.
    Inspect {
        /// PEM files; every certificate in each is shown.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// CA bundle (PEM) to verify each certificate against.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Flag certificates that expire within this window.
        #[arg(long, default_value = "30d", value_parser = parse_window)]
        warn_within: Duration,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
}

/// `--usage` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UsageArg {
    /// TLS server (serverAuth).
    Server,
    /// TLS client (clientAuth); the CN is the identity.
    Client,
    /// Both serverAuth and clientAuth.
    Both,
}

impl From<UsageArg> for CertUsage {
    fn from(u: UsageArg) -> Self {
        match u {
            UsageArg::Server => CertUsage::Server,
            UsageArg::Client => CertUsage::Client,
            UsageArg::Both => CertUsage::ServerAndClient,
        }
    }
}

/// Parses a `--role` value.
fn parse_role(s: &str) -> Result<Role, String> {
    s.parse().map_err(|e: RoleError| e.to_string())
}

/// The role a certificate with CN `cn` stands for in meshd's naming (etcd users and the
/// certificates `meshctl up` issues); `None` for names without a role (e.g. `etcd`).
pub(super) fn role_for_cn(cn: &str) -> Option<Role> {
    match cn {
        "root" | "meshctl" | "admin" => Some(Role::Admin),
        "mesh-agent" => Some(Role::Agent),
        "clustermesh-apiserver" => Some(Role::Apiserver),
        _ if cn.starts_with("admin-") => Some(Role::Admin),
        _ if cn.starts_with("agent-") => Some(Role::Agent),
        _ if cn.starts_with("apiserver-") => Some(Role::Apiserver),
        _ if cn.starts_with("remote-") => Some(Role::Peer),
        _ => None,
    }
}

/// The cluster a CA made by `meshctl certs init` or `meshctl up` belongs to: its CN is
/// `meshd-<cluster>-ca`.
fn cluster_of_ca(ca: &CertificateAuthority) -> Option<ClusterName> {
    let cn = ca.info().subject_cn.as_deref()?;
    let name = cn.strip_prefix("meshd-")?.strip_suffix("-ca")?;
    ClusterName::new(name).ok()
}

/// `--cluster`, else the CA's cluster, else an error saying to pass `--cluster`.
fn roles_cluster(
    given: Option<&ClusterName>,
    ca: &CertificateAuthority,
    ca_path: &Path,
) -> Result<ClusterName, CtlError> {
    given
        .cloned()
        .or_else(|| cluster_of_ca(ca))
        .ok_or_else(|| CtlError::InvalidArg {
            flag: "--cluster",
            value: String::new(),
            reason: format!(
                "needed with roles: the CA {} ({}) is not named meshd-<cluster>-ca",
                ca_path.display(),
                ca.info().subject
            ),
        })
}

/// Parses a validity or window length: `Ny` (365 days each), `Nd`, and everything
/// [`crate::args::parse_duration`] accepts (`Nh`, `Nm`, `Ns`, `Nms`). Must be positive.
pub fn parse_validity(s: &str) -> Result<Duration, String> {
    let d = parse_length(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be longer than zero"));
    }
    Ok(d)
}

/// Like [`parse_validity`], but zero is allowed (`--warn-within 0d` flags only expired certificates).
pub fn parse_window(s: &str) -> Result<Duration, String> {
    parse_length(s)
}

fn parse_length(s: &str) -> Result<Duration, String> {
    const EXPECTED: &str =
        "expected a whole number with a unit y, d, h, m, s or ms (e.g. 365d, 10y)";
    let t = s.trim();
    let per_unit = if let Some(n) = t.strip_suffix('y') {
        Some((n, 365 * DAY))
    } else {
        t.strip_suffix('d').map(|n| (n, DAY))
    };
    let d = match per_unit {
        Some((n, unit)) => {
            let n: u64 = n.parse().map_err(|_| format!("{s:?}: {EXPECTED}"))?;
            n.checked_mul(unit)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("{s:?}: too long"))?
        }
        None => crate::args::parse_duration(t).map_err(|_| format!("{s:?}: {EXPECTED}"))?,
    };
    Ok(d)
}

pub(super) fn run(cmd: &CertsCommand, out: &mut impl Write) -> Result<Status, CtlError> {
    match cmd {
        CertsCommand::Init {
            dir,
            cluster,
            validity,
            force,
        } => init(dir, cluster, *validity, *force, out),
        CertsCommand::Issue {
            dir,
            name,
            cn,
            dns,
            ip,
            usage,
            role,
            cluster,
            validity,
            force,
        } => issue(
            &IssueArgs {
                dir,
                name,
                cn,
                dns,
                ip,
                usage: *usage,
                role: *role,
                cluster: cluster.as_ref(),
                validity: *validity,
                force: *force,
            },
            out,
        ),
        CertsCommand::Reissue {
            dir,
            cluster,
            dry_run,
        } => {
            let outcomes = reissue_roles(dir, cluster.as_ref(), *dry_run)?;
            if outcomes.is_empty() {
                writeln!(out, "no certificates besides the CA in {}", dir.display())?;
            }
            for o in &outcomes {
                writeln!(out, "{o}")?;
            }
            Ok(Status::Ok)
        }
        CertsCommand::Inspect {
            files,
            ca,
            warn_within,
            output,
        } => inspect(files, ca.as_deref(), *warn_within, *output, out),
    }
}

fn init(
    dir: &Path,
    cluster: &ClusterName,
    validity: Duration,
    force: bool,
    out: &mut impl Write,
) -> Result<Status, CtlError> {
    let (crt, key) = pair_paths(dir, CA_STEM);
    if !force {
        for path in [&crt, &key] {
            if path.exists() {
                return Err(CtlError::CaExists { path: path.clone() });
            }
        }
    }
    let cn = format!("meshd-{cluster}-ca");
    let ca = CertificateAuthority::generate(&cn, validity).map_err(|source| CtlError::Cert {
        context: format!("generating CA {cn:?}"),
        source,
    })?;
    let (crt, key) = ca
        .write_files(dir, CA_STEM)
        .map_err(|source| CtlError::Cert {
            context: format!("writing CA into {}", dir.display()),
            source,
        })?;
    let info = ca.info();
    writeln!(
        out,
        "wrote {} (CA {}, serial {}, valid until {})",
        crt.display(),
        info.subject,
        info.serial_hex,
        fmt_time(info.not_after)
    )?;
    writeln!(out, "wrote {} (private key, mode 0600)", key.display())?;
    Ok(Status::Ok)
}

struct IssueArgs<'a> {
    dir: &'a Path,
    name: &'a str,
    cn: &'a str,
    dns: &'a [String],
    ip: &'a [String],
    usage: UsageArg,
    role: Option<Role>,
    cluster: Option<&'a ClusterName>,
    validity: Duration,
    force: bool,
}

fn issue(a: &IssueArgs<'_>, out: &mut impl Write) -> Result<Status, CtlError> {
    check_stem(a.name)?;
    if a.cn.trim().is_empty() {
        return Err(CtlError::InvalidArg {
            flag: "--cn",
            value: a.cn.to_owned(),
            reason: "must not be empty".to_owned(),
        });
    }
    let ips =
        a.ip.iter()
            .map(|v| {
                v.trim()
                    .parse::<IpAddr>()
                    .map_err(|source| CtlError::InvalidIp {
                        value: v.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
    let dns: Vec<&str> = a.dns.iter().map(|d| d.trim()).collect();
    if let Some(bad) = dns
        .iter()
        .find(|d| d.is_empty() || d.contains(char::is_whitespace))
    {
        return Err(CtlError::InvalidArg {
            flag: "--dns",
            value: (*bad).to_owned(),
            reason: "not a DNS name".to_owned(),
        });
    }

    let (ca_crt, ca_key) = pair_paths(a.dir, CA_STEM);
    for (what, path) in [("certificate", &ca_crt), ("key", &ca_key)] {
        if !path.exists() {
            return Err(CtlError::CaMissing {
                what,
                path: path.clone(),
                dir: a.dir.to_owned(),
            });
        }
    }
    let (crt, key) = pair_paths(a.dir, a.name);
    if !a.force {
        for path in [&crt, &key] {
            if path.exists() {
                return Err(CtlError::FileExists { path: path.clone() });
            }
        }
    }
    let ca =
        CertificateAuthority::from_files(&ca_crt, &ca_key).map_err(|source| CtlError::Cert {
            context: format!("loading CA {} + {}", ca_crt.display(), ca_key.display()),
            source,
        })?;
    let mut request = CertRequest::server(a.cn, &dns, &ips)
        .with_usage(a.usage.into())
        .with_validity(a.validity);
    if let Some(role) = a.role {
        let cluster = roles_cluster(a.cluster, &ca, &ca_crt)?;
        request = request.with_role(cluster.as_str(), role);
    }
    let issued = ca.issue(&request).map_err(|source| CtlError::Cert {
        context: format!("issuing certificate for CN {:?}", a.cn),
        source,
    })?;
    let (crt, key) = issued
        .write_files(a.dir, a.name)
        .map_err(|source| CtlError::Cert {
            context: format!("writing {}", crt.display()),
            source,
        })?;
    let info = issued.info().map_err(|source| CtlError::Cert {
        context: format!("reading back {}", crt.display()),
        source,
    })?;
    writeln!(
        out,
        "wrote {} ({}, issuer {}, serial {}, EKU {}, valid until {})",
        crt.display(),
        info.subject,
        info.issuer,
        info.serial_hex,
        join_or_none(&info.extended_key_usage),
        fmt_time(info.not_after)
    )?;
    if !info.dns_names.is_empty() || !info.ip_addresses.is_empty() || !info.uris.is_empty() {
        writeln!(out, "  SANs: {}", sans(&info))?;
    }
    writeln!(out, "wrote {} (private key, mode 0600)", key.display())?;
    if a.role.is_none() && a.usage != UsageArg::Server {
        let hint = role_for_cn(a.cn).map_or_else(String::new, |r| format!(" (--role {r}?)"));
        writeln!(
            out,
            "note: no --role: the gRPC APIs of meshd refuse this certificate{hint}; etcd goes by the CN and accepts it"
        )?;
    }
    if a.usage != UsageArg::Client && dns.is_empty() && ips.is_empty() {
        writeln!(
            out,
            "note: server certificate without --dns or --ip SANs; TLS clients will not accept it for any host"
        )?;
    }
    Ok(Status::Ok)
}

/// What `reissue` did (or would do) with one certificate file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reissued {
    /// The certificate file.
    pub(super) file: PathBuf,
    /// Its subject.
    pub(super) subject: String,
    /// What happened.
    pub(super) action: ReissueAction,
}

/// See [`Reissued`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ReissueAction {
    /// Reissued with this role (or would be, in a dry run).
    Reissued { role: Role, dry_run: bool },
    /// Left alone: it carries a role already.
    HasRole(String),
    /// Left alone, and why.
    Skipped(String),
}

impl std::fmt::Display for Reissued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = self.file.display();
        let subject = &self.subject;
        match &self.action {
            ReissueAction::Reissued {
                role,
                dry_run: false,
            } => {
                write!(f, "reissued {file} ({subject}) with role {role}")
            }
            ReissueAction::Reissued {
                role,
                dry_run: true,
            } => {
                write!(f, "would reissue {file} ({subject}) with role {role}")
            }
            ReissueAction::HasRole(uri) => write!(f, "kept {file} ({subject}): has role {uri}"),
            ReissueAction::Skipped(why) => write!(f, "skipped {file} ({subject}): {why}"),
        }
    }
}

/// Reissues every role-less certificate `<stem>.crt` (with its `<stem>.key`) of `dir` that
/// `dir/ca.crt` issued, with the role its CN implies ([`role_for_cn`]) in `cluster` (default:
/// the CA's), keeping CN, DNS/IP SANs, usage and validity length. Keys are new; both files are
/// replaced atomically (key first). Files in name order.
pub(super) fn reissue_roles(
    dir: &Path,
    cluster: Option<&ClusterName>,
    dry_run: bool,
) -> Result<Vec<Reissued>, CtlError> {
    let (ca_crt, ca_key) = pair_paths(dir, CA_STEM);
    for (what, path) in [("certificate", &ca_crt), ("key", &ca_key)] {
        if !path.exists() {
            return Err(CtlError::CaMissing {
                what,
                path: path.clone(),
                dir: dir.to_owned(),
            });
        }
    }
    let ca =
        CertificateAuthority::from_files(&ca_crt, &ca_key).map_err(|source| CtlError::Cert {
            context: format!("loading CA {} + {}", ca_crt.display(), ca_key.display()),
            source,
        })?;
    let cluster = roles_cluster(cluster, &ca, &ca_crt)?;
    let rd = std::fs::read_dir(dir).map_err(|source| CtlError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut stems = Vec::new();
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".crt")
            && stem != CA_STEM
            && !stem.starts_with('.')
            && entry.file_type()?.is_file()
        {
            stems.push(stem.to_owned());
        }
    }
    stems.sort();
    let mut out = Vec::new();
    for stem in stems {
        let (crt, key) = pair_paths(dir, &stem);
        let pem = read(&crt)?;
        let done = |subject: String, action| Reissued {
            file: crt.clone(),
            subject,
            action,
        };
        let info = match mesh_certs::inspect_pem(&pem) {
            Ok(infos) => match infos.into_iter().next() {
                Some(i) => i,
                None => continue,
            },
            Err(e) => {
                out.push(done(
                    "?".into(),
                    ReissueAction::Skipped(format!("unreadable: {}", error_chain(&e))),
                ));
                continue;
            }
        };
        let skip = |why: String| done(info.subject.clone(), ReissueAction::Skipped(why));
        if info.is_ca {
            out.push(skip("a CA certificate".into()));
            continue;
        }
        if !key.exists() {
            out.push(skip(format!("no key {} next to it", key.display())));
            continue;
        }
        if let Err(e) = mesh_certs::verify_chain(&pem, ca.cert_pem()) {
            out.push(skip(format!(
                "not a valid certificate of {}: {}",
                ca_crt.display(),
                error_chain(&e)
            )));
            continue;
        }
        // No role, a malformed one or several: replaced by the one the CN implies.
        if let Ok(p) = info.principal() {
            out.push(done(info.subject.clone(), ReissueAction::HasRole(p.uri())));
            continue;
        }
        let cn = info.subject_cn.clone().unwrap_or_default();
        let Some(role) = role_for_cn(&cn) else {
            out.push(skip(format!("CN {cn:?} implies no role")));
            continue;
        };
        if dry_run {
            out.push(done(
                info.subject.clone(),
                ReissueAction::Reissued {
                    role,
                    dry_run: true,
                },
            ));
            continue;
        }
        let issued = ca
            .issue(&same_request(&info, &cn).with_role(cluster.as_str(), role))
            .map_err(|source| CtlError::Cert {
                context: format!("reissuing {} ({})", crt.display(), info.subject),
                source,
            })?;
        issued
            .write_files(dir, &stem)
            .map_err(|source| CtlError::Cert {
                context: format!("writing {}", crt.display()),
                source,
            })?;
        out.push(done(
            info.subject.clone(),
            ReissueAction::Reissued {
                role,
                dry_run: false,
            },
        ));
    }
    Ok(out)
}

/// A request for a certificate like `info` (CN, DNS/IP SANs, usage, validity length; the
/// backdating of its notBefore is not counted twice).
fn same_request(info: &CertInfo, cn: &str) -> CertRequest {
    let has = |eku: &str| info.extended_key_usage.iter().any(|e| e == eku);
    let usage = match (has("serverAuth"), has("clientAuth")) {
        (true, true) => CertUsage::ServerAndClient,
        (false, true) => CertUsage::Client,
        _ => CertUsage::Server,
    };
    let length = Duration::try_from(info.not_after - info.not_before).unwrap_or(Duration::ZERO);
    let validity = length
        .checked_sub(CLOCK_SKEW_BACKDATE)
        .filter(|d| !d.is_zero())
        .unwrap_or(length)
        .max(Duration::from_secs(3600));
    let dns: Vec<&str> = info.dns_names.iter().map(String::as_str).collect();
    CertRequest::server(cn, &dns, &info.ip_addresses)
        .with_usage(usage)
        .with_validity(validity)
}

/// A file stem for `issue --name`: a plain file name that is not the CA's.
fn check_stem(name: &str) -> Result<(), CtlError> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.contains(['/', '\\']) || name == "." || name == ".." {
        Some("must be a file name stem, not a path (use --dir for the directory)")
    } else if name == CA_STEM {
        Some("would overwrite the CA")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CtlError::InvalidArg {
            flag: "--name",
            value: name.to_owned(),
            reason: reason.to_owned(),
        }),
        None => Ok(()),
    }
}

fn pair_paths(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    )
}

/// One certificate in the `certs inspect` report (also its JSON form).
#[derive(Debug, Serialize)]
struct CertReport {
    file: String,
    index: usize,
    subject: String,
    subject_cn: Option<String>,
    issuer: String,
    serial: String,
    not_before: String,
    not_after: String,
    remaining_days: i64,
    is_ca: bool,
    key_usage: Vec<String>,
    extended_key_usage: Vec<String>,
    dns_names: Vec<String>,
    ip_addresses: Vec<String>,
    uris: Vec<String>,
    /// The role (`spiffe://<cluster>.meshd/<role>`), if it carries one.
    role: Option<String>,
    /// `None` without `--ca`.
    chain: Option<ChainReport>,
    expired: bool,
    not_yet_valid: bool,
    expires_soon: bool,
    /// Empty when the certificate is fine.
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ChainReport {
    ca: String,
    ok: bool,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct InspectReport {
    warn_within_days: u64,
    certificates: Vec<CertReport>,
    problems: usize,
}

fn inspect(
    files: &[PathBuf],
    ca: Option<&Path>,
    warn_within: Duration,
    output: OutputFormat,
    out: &mut impl Write,
) -> Result<Status, CtlError> {
    let ca_pem = ca
        .map(|path| {
            let pem = read(path)?;
            // Fail early (naming the file) if the bundle is unusable, not once per certificate.
            certificates(path, &pem)?;
            Ok::<_, CtlError>((path, pem))
        })
        .transpose()?;
    let now = OffsetDateTime::now_utc();
    let mut reports = Vec::new();
    for file in files {
        let pem = read(file)?;
        for (index, der) in certificates(file, &pem)?.iter().enumerate() {
            let info = mesh_certs::inspect_der(der).map_err(|source| CtlError::Cert {
                context: format!("{} certificate #{index}", file.display()),
                source,
            })?;
            let chain = ca_pem.as_ref().map(|(ca_path, ca_pem)| {
                let result = mesh_certs::verify_chain(&der_to_pem(der), ca_pem);
                ChainReport {
                    ca: ca_path.display().to_string(),
                    ok: result.is_ok(),
                    error: result.err().map(|e| error_chain(&e)),
                }
            });
            reports.push(report(file, index, &info, chain, now, warn_within));
        }
    }
    let problems = reports.iter().filter(|r| !r.problems.is_empty()).count();
    let report = InspectReport {
        warn_within_days: warn_within.as_secs() / DAY,
        certificates: reports,
        problems,
    };
    emit(out, output, &report, |out| {
        write_table(&report, warn_within, out)
    })?;
    Ok(if problems == 0 {
        Status::Ok
    } else {
        Status::Problems
    })
}

fn report(
    file: &Path,
    index: usize,
    info: &CertInfo,
    chain: Option<ChainReport>,
    now: OffsetDateTime,
    warn_within: Duration,
) -> CertReport {
    let expired = now > info.not_after;
    let not_yet_valid = now < info.not_before;
    let expires_soon = !expired && info.expires_within(warn_within);
    let mut problems = Vec::new();
    if expired {
        problems.push(format!("expired on {}", fmt_time(info.not_after)));
    }
    if not_yet_valid {
        problems.push(format!("not valid before {}", fmt_time(info.not_before)));
    }
    if expires_soon {
        problems.push(format!(
            "expires within {} ({})",
            fmt_window(warn_within),
            fmt_time(info.not_after)
        ));
    }
    if let Some(ChainReport { error: Some(e), .. }) = &chain {
        problems.push(format!("chain verification failed: {e}"));
    }
    CertReport {
        file: file.display().to_string(),
        index,
        subject: info.subject.clone(),
        subject_cn: info.subject_cn.clone(),
        issuer: info.issuer.clone(),
        serial: info.serial_hex.clone(),
        not_before: fmt_time(info.not_before),
        not_after: fmt_time(info.not_after),
        remaining_days: (info.not_after - now).whole_days(),
        is_ca: info.is_ca,
        key_usage: info.key_usage.clone(),
        extended_key_usage: info.extended_key_usage.clone(),
        dns_names: info.dns_names.clone(),
        ip_addresses: info.ip_addresses.iter().map(ToString::to_string).collect(),
        uris: info.uris.clone(),
        role: info.principal().ok().map(|p| p.uri()),
        chain,
        expired,
        not_yet_valid,
        expires_soon,
        problems,
    }
}

fn write_table(
    report: &InspectReport,
    warn_within: Duration,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    for (i, c) in report.certificates.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        writeln!(out, "{} #{}", c.file, c.index)?;
        let sans = c
            .dns_names
            .iter()
            .map(|d| format!("DNS:{d}"))
            .chain(c.ip_addresses.iter().map(|ip| format!("IP:{ip}")))
            .chain(c.uris.iter().map(|u| format!("URI:{u}")))
            .collect::<Vec<_>>();
        let role = match &c.role {
            Some(uri) => uri.clone(),
            None if c.is_ca => "-".to_owned(),
            None => "none (the gRPC APIs refuse it)".to_owned(),
        };
        let rows: [(&str, String); 11] = [
            ("subject", c.subject.clone()),
            ("issuer", c.issuer.clone()),
            ("serial", c.serial.clone()),
            ("SANs", join_or_none(&sans)),
            ("role", role),
            ("not before", c.not_before.clone()),
            (
                "not after",
                format!("{} ({} days left)", c.not_after, c.remaining_days),
            ),
            ("CA", if c.is_ca { "yes" } else { "no" }.to_owned()),
            ("key usage", join_or_none(&c.key_usage)),
            ("ext key usage", join_or_none(&c.extended_key_usage)),
            (
                "chain",
                match &c.chain {
                    None => "not checked (no --ca)".to_owned(),
                    Some(ch) => match &ch.error {
                        None => format!("OK (verified against {})", ch.ca),
                        Some(e) => format!("FAILED against {}: {e}", ch.ca),
                    },
                },
            ),
        ];
        for (k, v) in rows {
            writeln!(out, "  {:<14} {v}", format!("{k}:"))?;
        }
        let status = if c.problems.is_empty() {
            "OK".to_owned()
        } else {
            let mut tags = Vec::new();
            if c.expired {
                tags.push("EXPIRED");
            }
            if c.not_yet_valid {
                tags.push("NOT YET VALID");
            }
            if c.expires_soon {
                tags.push("EXPIRES SOON");
            }
            if c.chain.as_ref().is_some_and(|ch| !ch.ok) {
                tags.push("VERIFY FAILED");
            }
            format!("{} - {}", tags.join(", "), c.problems.join("; "))
        };
        writeln!(out, "  {:<14} {status}", "status:")?;
    }
    writeln!(
        out,
        "\n{} certificate(s) checked, {} with problems (warning window {})",
        report.certificates.len(),
        report.problems,
        fmt_window(warn_within)
    )?;
    Ok(())
}

fn read(path: &Path) -> Result<String, CtlError> {
    std::fs::read_to_string(path).map_err(|source| CtlError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every CERTIFICATE block of `pem` (from `path`), at least one.
fn certificates(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, CtlError> {
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CtlError::BadPem {
            path: path.to_owned(),
            reason: format!("malformed PEM: {e}"),
        })?;
    if ders.is_empty() {
        return Err(CtlError::BadPem {
            path: path.to_owned(),
            reason: "no CERTIFICATE block found".to_owned(),
        });
    }
    Ok(ders)
}

fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn fmt_window(d: Duration) -> String {
    let secs = d.as_secs();
    if secs.is_multiple_of(DAY) {
        format!("{}d", secs / DAY)
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else {
        format!("{secs}s")
    }
}

fn sans(info: &CertInfo) -> String {
    info.dns_names
        .iter()
        .map(|d| format!("DNS:{d}"))
        .chain(info.ip_addresses.iter().map(|ip| format!("IP:{ip}")))
        .chain(info.uris.iter().map(|u| format!("URI:{u}")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn join_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctl_validity_units() {
        assert_eq!(parse_validity("10y"), Ok(Duration::from_secs(3650 * DAY)));
        assert_eq!(parse_validity("3650d"), Ok(Duration::from_secs(3650 * DAY)));
        assert_eq!(parse_validity("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_validity("90s"), Ok(Duration::from_secs(90)));
        for bad in [
            "",
            "5",
            "d",
            "-1d",
            "1.5d",
            "5x",
            "0d",
            "99999999999999999y",
        ] {
            assert!(parse_validity(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_window("0d"), Ok(Duration::ZERO));
        assert!(parse_window("1w").is_err());
    }

    #[test]
    fn ctl_stem_checks() {
        assert!(check_stem("apiserver-east").is_ok());
        for bad in ["", "ca", "../x", "a/b", ".."] {
            assert!(check_stem(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ctl_roles_from_common_names() {
        for (cn, role) in [
            ("root", Some(Role::Admin)),
            ("meshctl", Some(Role::Admin)),
            ("admin-east", Some(Role::Admin)),
            ("agent-east", Some(Role::Agent)),
            ("mesh-agent", Some(Role::Agent)),
            ("apiserver-east", Some(Role::Apiserver)),
            ("clustermesh-apiserver", Some(Role::Apiserver)),
            ("remote-west", Some(Role::Peer)),
            ("etcd", None),
            ("rooted", None),
        ] {
            assert_eq!(role_for_cn(cn), role, "{cn}");
        }
    }

    /// A pki directory of role-less certificates (as `meshctl up` wrote them before roles):
    /// reissue gives each the role its CN implies, keeps the rest, and is idempotent.
    #[test]
    fn ctl_reissue_adds_roles_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca =
            CertificateAuthority::generate("meshd-east-ca", Duration::from_secs(86_400)).unwrap();
        ca.write_files(d, CA_STEM).unwrap();
        let lo = [IpAddr::from([127, 0, 0, 1])];
        for (stem, req) in [
            ("root", CertRequest::client("root")),
            ("agent", CertRequest::client("agent-east")),
            (
                "agent-grpc",
                CertRequest::server("mesh-agent", &["localhost"], &lo),
            ),
            (
                "etcd-server",
                CertRequest::server_and_client("etcd", &["localhost"], &lo),
            ),
            (
                "meshctl",
                CertRequest::client("meshctl").with_role("east", Role::Admin),
            ),
        ] {
            ca.issue(&req.with_validity(Duration::from_secs(30 * DAY)))
                .unwrap()
                .write_files(d, stem)
                .unwrap();
        }
        let other =
            CertificateAuthority::generate("meshd-west-ca", Duration::from_secs(3600)).unwrap();
        other
            .issue(&CertRequest::client("root"))
            .unwrap()
            .write_files(d, "foreign")
            .unwrap();
        let before = std::fs::read_to_string(d.join("agent-grpc.crt")).unwrap();

        let dry = reissue_roles(d, None, true).unwrap();
        assert!(dry.iter().any(|r| r.action
            == ReissueAction::Reissued {
                role: Role::Admin,
                dry_run: true
            }));
        assert_eq!(
            std::fs::read_to_string(d.join("agent-grpc.crt")).unwrap(),
            before
        );

        let done = reissue_roles(d, None, false).unwrap();
        let action = |stem: &str| {
            done.iter()
                .find(|r| r.file == d.join(format!("{stem}.crt")))
                .map(|r| r.action.clone())
                .unwrap()
        };
        let reissued = |role| ReissueAction::Reissued {
            role,
            dry_run: false,
        };
        assert_eq!(action("root"), reissued(Role::Admin));
        assert_eq!(action("agent"), reissued(Role::Agent));
        assert_eq!(action("agent-grpc"), reissued(Role::Agent));
        assert!(matches!(action("etcd-server"), ReissueAction::Skipped(_)));
        assert!(matches!(action("foreign"), ReissueAction::Skipped(_)));
        assert_eq!(
            action("meshctl"),
            ReissueAction::HasRole("spiffe://east.meshd/admin".into())
        );

        let info = |stem: &str| {
            mesh_certs::inspect_pem(
                &std::fs::read_to_string(d.join(format!("{stem}.crt"))).unwrap(),
            )
            .unwrap()
            .remove(0)
        };
        let grpc = info("agent-grpc");
        assert_eq!(grpc.subject_cn.as_deref(), Some("mesh-agent"));
        assert_eq!(grpc.dns_names, ["localhost"]);
        assert_eq!(grpc.ip_addresses, lo);
        assert_eq!(grpc.extended_key_usage, ["serverAuth"]);
        assert_eq!(grpc.uris, ["spiffe://east.meshd/agent"]);
        assert!(!grpc.expires_within(Duration::from_secs(29 * DAY)));
        assert!(grpc.expires_within(Duration::from_secs(31 * DAY)));
        let root = info("root");
        assert_eq!(root.extended_key_usage, ["clientAuth"]);
        assert_eq!(root.principal().unwrap().role(), Role::Admin);
        // The new key fits the new certificate.
        mesh_certs::certified_key_from_pem(
            &std::fs::read_to_string(d.join("root.crt")).unwrap(),
            &std::fs::read_to_string(d.join("root.key")).unwrap(),
        )
        .unwrap();
        assert!(info("etcd-server").uris.is_empty());

        // Idempotent: nothing left to do.
        let again = reissue_roles(d, None, false).unwrap();
        assert!(
            again
                .iter()
                .all(|r| !matches!(r.action, ReissueAction::Reissued { .. })),
            "{again:?}"
        );

        // A CA not named meshd-<cluster>-ca needs --cluster.
        let d2 = tempfile::tempdir().unwrap();
        CertificateAuthority::generate("corp-ca", Duration::from_secs(3600))
            .unwrap()
            .write_files(d2.path(), CA_STEM)
            .unwrap();
        let e = reissue_roles(d2.path(), None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cluster"), "{e}");
        let east = ClusterName::new("east").unwrap();
        assert!(
            reissue_roles(d2.path(), Some(&east), false)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn ctl_window_formatting() {
        assert_eq!(fmt_window(Duration::from_secs(30 * DAY)), "30d");
        assert_eq!(fmt_window(Duration::from_secs(7200)), "2h");
        assert_eq!(fmt_window(Duration::from_secs(61)), "61s");
    }
}
