//! `meshctl certs`: create a cluster CA, issue certificates from it, inspect and verify certificate files.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use clap::{Subcommand, ValueEnum};
use mesh_certs::{CertInfo, CertRequest, CertUsage, CertificateAuthority};
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
        /// Validity: `Nd`, `Ny`, `Nh` (also `Nm`, `Ns`).
        #[arg(long, default_value = "365d", value_parser = parse_validity)]
        validity: Duration,
        /// Overwrite existing <name>.crt / <name>.key.
        #[arg(long)]
        force: bool,
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
                validity: *validity,
                force: *force,
            },
            out,
        ),
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
    let request = CertRequest::server(a.cn, &dns, &ips)
        .with_usage(a.usage.into())
        .with_validity(a.validity);
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
    if !info.dns_names.is_empty() || !info.ip_addresses.is_empty() {
        writeln!(out, "  SANs: {}", sans(&info))?;
    }
    writeln!(out, "wrote {} (private key, mode 0600)", key.display())?;
    if a.usage != UsageArg::Client && dns.is_empty() && ips.is_empty() {
        writeln!(
            out,
            "note: server certificate without --dns or --ip SANs; TLS clients will not accept it for any host"
        )?;
    }
    Ok(Status::Ok)
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
            .collect::<Vec<_>>();
        let rows: [(&str, String); 10] = [
            ("subject", c.subject.clone()),
            ("issuer", c.issuer.clone()),
            ("serial", c.serial.clone()),
            ("SANs", join_or_none(&sans)),
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
    fn ctl_window_formatting() {
        assert_eq!(fmt_window(Duration::from_secs(30 * DAY)), "30d");
        assert_eq!(fmt_window(Duration::from_secs(7200)), "2h");
        assert_eq!(fmt_window(Duration::from_secs(61)), "61s");
    }
}
