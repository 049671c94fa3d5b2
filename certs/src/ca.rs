//! A cluster's certificate authority: generate or load it, and issue server/client certificates with rcgen.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::inspect::{cert_info, inspect_pem_named, parse_der};
use crate::pem::parse_certs;
use crate::{CertError, CertInfo, Principal, Role, files};

/// How far in the past a certificate's notBefore is put (when not given explicitly), so that
/// peers whose clocks are slightly behind still accept a freshly issued certificate.
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Default validity of issued leaf certificates: 365 days.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// What a leaf certificate may be used for. Sets extendedKeyUsage; keyUsage is always
/// digitalSignature + keyEncipherment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertUsage {
    /// TLS server (EKU serverAuth).
    Server,
    /// TLS client (EKU clientAuth); the CN is the identity (the etcd user name).
    Client,
    /// Both (EKU serverAuth + clientAuth), e.g. for etcd, which also dials itself with its server cert.
    ServerAndClient,
}

impl CertUsage {
    fn extended_key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            CertUsage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            CertUsage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            CertUsage::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        }
    }
}

/// What to put into a leaf certificate issued by [`CertificateAuthority::issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRequest {
    /// Subject CN. For client certificates this is the identity (e.g. `remote-west`, `root`).
    pub common_name: String,
    /// DNS subject alternative names (what TLS clients check for servers).
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Server, client or both.
    pub usage: CertUsage,
    /// Validity, counted from `not_before` if set, else from now.
    pub validity: Duration,
    /// Explicit notBefore. `None` means now minus [`CLOCK_SKEW_BACKDATE`]
    /// (notAfter is then now + `validity`).
    pub not_before: Option<OffsetDateTime>,
    /// The role the certificate carries, as the SAN URI `spiffe://<cluster>.meshd/<role>`
    /// (what the gRPC APIs authorize by). `None`: no role (etcd-only certificates).
    pub role: Option<Principal>,
}

impl CertRequest {
    /// A server certificate with the given DNS and IP SANs, valid for 365 days.
    pub fn server(common_name: &str, dns_names: &[&str], ips: &[IpAddr]) -> Self {
        CertRequest {
            common_name: common_name.to_owned(),
            dns_names: dns_names.iter().map(|d| (*d).to_owned()).collect(),
            ip_addresses: ips.to_vec(),
            usage: CertUsage::Server,
            validity: DEFAULT_LEAF_VALIDITY,
            not_before: None,
            role: None,
        }
    }

    /// A client certificate whose CN is the identity, valid for 365 days.
    pub fn client(common_name: &str) -> Self {
        CertRequest {
            common_name: common_name.to_owned(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            usage: CertUsage::Client,
            validity: DEFAULT_LEAF_VALIDITY,
            not_before: None,
            role: None,
        }
    }

    /// A certificate usable both as server and as client, valid for 365 days.
    pub fn server_and_client(common_name: &str, dns_names: &[&str], ips: &[IpAddr]) -> Self {
        CertRequest::server(common_name, dns_names, ips).with_usage(CertUsage::ServerAndClient)
    }

    /// Set the validity period length.
    pub fn with_validity(mut self, d: Duration) -> Self {
        self.validity = d;
        self
    }

    /// Set notBefore explicitly (notAfter becomes `t + validity`). A time in the past makes
    /// already-expired certificates, which is useful in tests.
    pub fn with_not_before(mut self, t: OffsetDateTime) -> Self {
        self.not_before = Some(t);
        self
    }

    /// Set the usage.
    pub fn with_usage(mut self, usage: CertUsage) -> Self {
        self.usage = usage;
        self
    }

    /// Carry `role` in `cluster` (the cluster whose CA issues the certificate) as the SAN URI
    /// `spiffe://<cluster>.meshd/<role>`. [`CertificateAuthority::issue`] checks the name.
    pub fn with_role(mut self, cluster: &str, role: Role) -> Self {
        self.role = Some(Principal::new(cluster, role));
        self
    }
}

/// A freshly issued leaf certificate and its private key (PKCS#8), both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The leaf certificate (only the leaf, no chain).
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM. Secret.
    pub key_pem: String,
}

impl IssuedCert {
    /// Write `<dir>/<stem>.crt` and `<dir>/<stem>.key` atomically (temp file + rename; the key
    /// with mode 0600, written first). Creates `dir` if missing. Returns (cert path, key path).
    pub fn write_files(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), CertError> {
        files::write_pair(dir, stem, &self.cert_pem, &self.key_pem)
    }

    /// Inspect the issued certificate.
    pub fn info(&self) -> Result<CertInfo, CertError> {
        first_info(self.cert_pem.as_bytes(), "issued certificate")
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.info().ok();
        f.debug_struct("IssuedCert")
            .field("subject", &info.as_ref().map(|i| &i.subject))
            .field("serial_hex", &info.as_ref().map(|i| &i.serial_hex))
            .field("not_after", &info.as_ref().map(|i| i.not_after))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A cluster CA: its certificate and key (PEM) and the rcgen issuer that signs leaves.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    info: CertInfo,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.info.subject)
            .field("serial_hex", &self.info.serial_hex)
            .field("not_after", &self.info.not_after)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// Generate a new self-signed CA (ECDSA P-256, basicConstraints CA with pathLen 0,
    /// keyUsage keyCertSign + cRLSign + digitalSignature) with subject `CN=<common_name>`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, CertError> {
        check_common_name(common_name)?;
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: format!("CA key pair for {common_name:?}"),
            source,
        })?;
        let mut params = base_params(common_name, None, validity)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertError::Generate {
                what: format!("self-signed CA certificate {common_name:?}"),
                source,
            })?;
        let what = "generated CA certificate";
        let info =
            cert_info(&parse_der(cert.der(), what, 0)?).map_err(|source| CertError::ParseCert {
                what: what.to_owned(),
                index: 0,
                source,
            })?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            info,
            issuer: Issuer::new(params, key),
        })
    }

    /// Load a CA from its certificate and private key PEM. The first certificate of `cert_pem`
    /// is the issuing CA. Checks that it is a CA, that the key belongs to it, and that
    /// certificates issued with it chain back to it (issuer name encoded identically).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        Self::from_pem_named(cert_pem, key_pem, "CA certificate", "CA key")
    }

    /// [`CertificateAuthority::from_pem`] reading both files; errors name the file.
    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let cert_pem = files::read_string(cert_path)?;
        let key_pem = files::read_string(key_path)?;
        Self::from_pem_named(
            &cert_pem,
            &key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    /// Load `<dir>/<stem>.crt` + `.key` if the certificate file exists, else generate a new CA
    /// with `common_name` and `validity` and write it there.
    pub fn load_or_generate(
        dir: &Path,
        stem: &str,
        common_name: &str,
        validity: Duration,
    ) -> Result<Self, CertError> {
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        if cert_path.exists() {
            return Self::from_files(&cert_path, &key_path);
        }
        let ca = Self::generate(common_name, validity)?;
        ca.write_files(dir, stem)?;
        Ok(ca)
    }

    fn from_pem_named(
        cert_pem: &str,
        key_pem: &str,
        cert_what: &str,
        key_what: &str,
    ) -> Result<Self, CertError> {
        let invalid = |reason: &str| CertError::Invalid {
            what: cert_what.to_owned(),
            reason: reason.to_owned(),
        };
        let ders = parse_certs(cert_pem.as_bytes(), cert_what)?;
        let der = &ders[0];
        let x509 = parse_der(der, cert_what, 0)?;
        let info = cert_info(&x509).map_err(|source| CertError::ParseCert {
            what: cert_what.to_owned(),
            index: 0,
            source,
        })?;
        if !x509.is_ca() {
            return Err(invalid(
                "not a CA certificate (basicConstraints CA is not true)",
            ));
        }
        // rcgen panics on an empty RDN set; reject such names before handing the cert to it.
        if x509.subject().iter().any(|rdn| rdn.iter().next().is_none()) {
            return Err(invalid("subject has an empty relative distinguished name"));
        }

        let key = KeyPair::from_pem(key_pem).map_err(|source| CertError::ParseKey {
            what: key_what.to_owned(),
            source: Box::new(source),
        })?;
        if key.subject_public_key_info() != x509.public_key().raw {
            return Err(CertError::Invalid {
                what: key_what.to_owned(),
                reason: format!("private key does not belong to CA certificate {cert_what}"),
            });
        }
        let issuer = Issuer::from_ca_cert_der(der, key).map_err(|source| CertError::LoadCa {
            what: cert_what.to_owned(),
            source,
        })?;
        let ca = CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            info,
            issuer,
        };

        // Self-test: a certificate issued now must name this CA exactly as its subject is
        // encoded (chain building compares raw bytes) and verify with its key.
        let probe = ca.issue(
            &CertRequest::client("mesh-certs-probe").with_validity(Duration::from_secs(60)),
        )?;
        let probe_ders = parse_certs(probe.cert_pem.as_bytes(), "probe certificate")?;
        let probe_x509 = parse_der(&probe_ders[0], "probe certificate", 0)?;
        if probe_x509.issuer().as_raw() != x509.subject().as_raw() {
            return Err(invalid(
                "subject name cannot be reproduced exactly (multi-valued or repeated attributes), \
                 so issued certificates would not chain to it",
            ));
        }
        probe_x509
            .verify_signature(Some(x509.public_key()))
            .map_err(|source| CertError::VerifySignature {
                leaf_subject: probe_x509.subject().to_string(),
                ca_subject: x509.subject().to_string(),
                source,
            })?;
        if !ca.info.is_valid_now() {
            tracing::warn!(
                ca = cert_what,
                not_before = %ca.info.not_before,
                not_after = %ca.info.not_after,
                "CA certificate is outside its validity period; certificates it issues will not verify"
            );
        }
        Ok(ca)
    }

    /// The CA certificate, PEM (as generated or as loaded).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. Secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// What the CA certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Issue a leaf certificate (new ECDSA P-256 key, random serial, basicConstraints CA=false,
    /// keyUsage digitalSignature + keyEncipherment, EKU from `req.usage`, authorityKeyIdentifier,
    /// and the role SAN URI of `req.role`).
    pub fn issue(&self, req: &CertRequest) -> Result<IssuedCert, CertError> {
        check_common_name(&req.common_name)?;
        let cn = &req.common_name;
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: format!("key pair for {cn:?}"),
            source,
        })?;
        let mut params = base_params(cn, req.not_before, req.validity)?;
        for dns in &req.dns_names {
            let name = dns.clone().try_into().map_err(|source| CertError::Sign {
                common_name: cn.clone(),
                source,
            })?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(req.ip_addresses.iter().map(|ip| SanType::IpAddress(*ip)));
        if let Some(principal) = &req.role {
            principal.check().map_err(|e| CertError::Request {
                common_name: cn.clone(),
                reason: format!("role SAN: {e}"),
            })?;
            let uri = principal
                .uri()
                .try_into()
                .map_err(|source| CertError::Sign {
                    common_name: cn.clone(),
                    source,
                })?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = req.usage.extended_key_usages();
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertError::Sign {
                common_name: cn.clone(),
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Write `<dir>/<stem>.crt` and `<dir>/<stem>.key` (mode 0600) atomically; creates `dir`.
    pub fn write_files(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), CertError> {
        files::write_pair(dir, stem, &self.cert_pem, &self.key_pem)
    }
}

fn check_common_name(cn: &str) -> Result<(), CertError> {
    if cn.trim().is_empty() {
        return Err(CertError::Request {
            common_name: cn.to_owned(),
            reason: "common name is empty".to_owned(),
        });
    }
    Ok(())
}

/// Subject `CN=<cn>`, validity window and random serial.
fn base_params(
    cn: &str,
    not_before: Option<OffsetDateTime>,
    validity: Duration,
) -> Result<CertificateParams, CertError> {
    let request_err = |reason: String| CertError::Request {
        common_name: cn.to_owned(),
        reason,
    };
    // X.509 times have second precision.
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let (start, nb) = match not_before {
        Some(t) => (t, t),
        None => (now, now - CLOCK_SKEW_BACKDATE),
    };
    let na = time::Duration::try_from(validity)
        .ok()
        .and_then(|v| start.checked_add(v))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| request_err(format!("validity {validity:?} from {start} is too long")))?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.not_before = nb;
    params.not_after = na;
    params.serial_number = random_serial();
    Ok(params)
}

/// 16 random bytes, positive and with a fixed length. `None` (rcgen then derives the serial
/// from the public key hash, unique per key) if the system RNG fails.
fn random_serial() -> Option<SerialNumber> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .ok()?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Some(SerialNumber::from_slice(&bytes))
}

fn first_info(pem: &[u8], what: &str) -> Result<CertInfo, CertError> {
    inspect_pem_named(pem, what)?
        .into_iter()
        .next()
        .ok_or_else(|| CertError::NoCertificate {
            what: what.to_owned(),
        })
}
