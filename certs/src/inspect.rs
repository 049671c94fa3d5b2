//! Certificate inspection (`CertInfo`, `inspect_pem`) and chain verification (`verify_chain`) with x509-parser.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

use crate::pem::parse_certs;
use crate::{CertError, Principal, RoleError};

/// What one certificate says, in plain Rust types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// First `CN` of the subject, if any (the etcd user name for client certificates).
    pub subject_cn: Option<String>,
    /// Whole subject in RFC 4514-like form, e.g. `CN=remote-west`.
    pub subject: String,
    /// Whole issuer name, same form.
    pub issuer: String,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// URI subject alternative names (the role: `spiffe://<cluster>.meshd/<role>`).
    pub uris: Vec<String>,
    /// Start of the validity period.
    pub not_before: OffsetDateTime,
    /// End of the validity period.
    pub not_after: OffsetDateTime,
    /// basicConstraints CA flag.
    pub is_ca: bool,
    /// Key usage bits, RFC 5280 names: `digitalSignature`, `keyEncipherment`, `keyCertSign`, `cRLSign`, ...
    pub key_usage: Vec<String>,
    /// Extended key usages: `serverAuth`, `clientAuth`, ... (unknown ones as dotted OIDs).
    pub extended_key_usage: Vec<String>,
    /// Serial number as lowercase hex, without leading zero bytes.
    pub serial_hex: String,
}

impl CertInfo {
    /// True if the certificate's notAfter is at or before now + `d` (so also if already expired).
    pub fn expires_within(&self, d: Duration) -> bool {
        let Ok(d) = time::Duration::try_from(d) else {
            return true;
        };
        match OffsetDateTime::now_utc().checked_add(d) {
            Some(deadline) => self.not_after <= deadline,
            None => true,
        }
    }

    /// True if `at` lies within `[not_before, not_after]`.
    pub fn is_valid_at(&self, at: OffsetDateTime) -> bool {
        self.not_before <= at && at <= self.not_after
    }

    /// True if the certificate is valid now.
    pub fn is_valid_now(&self) -> bool {
        self.is_valid_at(OffsetDateTime::now_utc())
    }

    /// The role the certificate carries (its one `spiffe://<cluster>.meshd/<role>` URI SAN).
    pub fn principal(&self) -> Result<Principal, RoleError> {
        Principal::from_uris(&self.subject, self.uris.iter().map(String::as_str))
    }
}

/// Inspect every certificate of a PEM bundle, in order. Fails if there is none or one is malformed.
pub fn inspect_pem(pem: &str) -> Result<Vec<CertInfo>, CertError> {
    inspect_pem_named(pem.as_bytes(), "certificate bundle")
}

pub(crate) fn inspect_pem_named(pem: &[u8], what: &str) -> Result<Vec<CertInfo>, CertError> {
    parse_certs(pem, what)?
        .iter()
        .enumerate()
        .map(|(index, der)| inspect_der_named(der, what, index))
        .collect()
}

/// Inspect one DER-encoded certificate (e.g. a TLS peer certificate).
pub fn inspect_der(der: &[u8]) -> Result<CertInfo, CertError> {
    inspect_der_named(der, "DER certificate", 0)
}

fn inspect_der_named(der: &[u8], what: &str, index: usize) -> Result<CertInfo, CertError> {
    let cert = parse_der(der, what, index)?;
    cert_info(&cert).map_err(|source| CertError::ParseCert {
        what: what.to_owned(),
        index,
        source,
    })
}

pub(crate) fn parse_der<'a>(
    der: &'a [u8],
    what: &str,
    index: usize,
) -> Result<X509Certificate<'a>, CertError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_rest, cert)| cert)
        .map_err(|e| CertError::ParseCert {
            what: what.to_owned(),
            index,
            source: X509Error::from(e),
        })
}

pub(crate) fn cert_info(cert: &X509Certificate<'_>) -> Result<CertInfo, X509Error> {
    let subject_cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);

    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    let mut uris = Vec::new();
    if let Some(san) = cert.subject_alternative_name()? {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        ip_addresses.push(ip);
                    }
                }
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                _ => {}
            }
        }
    }

    let mut key_usage = Vec::new();
    if let Some(ku) = cert.key_usage()? {
        let ku = ku.value;
        let flags = [
            (ku.digital_signature(), "digitalSignature"),
            (ku.non_repudiation(), "nonRepudiation"),
            (ku.key_encipherment(), "keyEncipherment"),
            (ku.data_encipherment(), "dataEncipherment"),
            (ku.key_agreement(), "keyAgreement"),
            (ku.key_cert_sign(), "keyCertSign"),
            (ku.crl_sign(), "cRLSign"),
            (ku.encipher_only(), "encipherOnly"),
            (ku.decipher_only(), "decipherOnly"),
        ];
        key_usage.extend(
            flags
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, n)| (*n).to_owned()),
        );
    }

    let mut extended_key_usage = Vec::new();
    if let Some(eku) = cert.extended_key_usage()? {
        let eku = eku.value;
        let flags = [
            (eku.any, "anyExtendedKeyUsage"),
            (eku.server_auth, "serverAuth"),
            (eku.client_auth, "clientAuth"),
            (eku.code_signing, "codeSigning"),
            (eku.email_protection, "emailProtection"),
            (eku.time_stamping, "timeStamping"),
            (eku.ocsp_signing, "OCSPSigning"),
        ];
        extended_key_usage.extend(
            flags
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, n)| (*n).to_owned()),
        );
        extended_key_usage.extend(eku.other.iter().map(|oid| oid.to_id_string()));
    }

    Ok(CertInfo {
        subject_cn,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        dns_names,
        ip_addresses,
        uris,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        is_ca: cert.is_ca(),
        key_usage,
        extended_key_usage,
        serial_hex: serial_hex(cert.raw_serial()),
    })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    }
}

fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Verify that the first certificate of `leaf_pem` was issued by one of the certificates in
/// `ca_pem`, and that both are valid now.
///
/// Checks, in order, each with its own [`CertError`] variant:
/// 1. issuer name: some CA certificate's subject equals the leaf's issuer ([`CertError::VerifyIssuer`]);
/// 2. signature: the leaf's signature verifies with that CA's public key ([`CertError::VerifySignature`]);
/// 3. CA flag: the issuing certificate has basicConstraints CA=true ([`CertError::VerifyNotCa`]);
/// 4. validity: now lies within the leaf's, then the CA's, validity period ([`CertError::VerifyValidity`]).
///
/// This is a single-level check (CA → leaf), which is what meshd's one-CA-per-cluster PKI uses;
/// TLS peers are verified by rustls/webpki, not by this function.
pub fn verify_chain(leaf_pem: &str, ca_pem: &str) -> Result<(), CertError> {
    verify_chain_at(leaf_pem, ca_pem, OffsetDateTime::now_utc())
}

/// [`verify_chain`] at a given time instead of now.
pub fn verify_chain_at(leaf_pem: &str, ca_pem: &str, now: OffsetDateTime) -> Result<(), CertError> {
    const LEAF: &str = "leaf certificate";
    const CA: &str = "CA bundle";
    let leaf_ders = parse_certs(leaf_pem.as_bytes(), LEAF)?;
    let ca_ders = parse_certs(ca_pem.as_bytes(), CA)?;
    let leaf = parse_der(&leaf_ders[0], LEAF, 0)?;
    let cas = ca_ders
        .iter()
        .enumerate()
        .map(|(i, der)| parse_der(der, CA, i))
        .collect::<Result<Vec<_>, _>>()?;

    // 1. issuer name
    let leaf_issuer = leaf.issuer().to_string();
    let candidates: Vec<&X509Certificate<'_>> = cas
        .iter()
        .filter(|ca| {
            ca.subject().as_raw() == leaf.issuer().as_raw()
                || ca.subject().to_string() == leaf_issuer
        })
        .collect();
    let Some(first) = candidates.first().copied() else {
        return Err(CertError::VerifyIssuer {
            leaf_issuer,
            ca_subjects: cas.iter().map(|c| c.subject().to_string()).collect(),
        });
    };

    // 2. signature (several CA certificates may share a name, e.g. during CA rotation)
    let verifies = |ca: &&X509Certificate<'_>| leaf.verify_signature(Some(ca.public_key())).is_ok();
    let Some(ca) = candidates.iter().copied().find(verifies) else {
        let source = leaf
            .verify_signature(Some(first.public_key()))
            .err()
            .unwrap_or(X509Error::SignatureVerificationError);
        return Err(CertError::VerifySignature {
            leaf_subject: leaf.subject().to_string(),
            ca_subject: first.subject().to_string(),
            source,
        });
    };

    // 3. CA flag
    if !ca.is_ca() {
        return Err(CertError::VerifyNotCa {
            ca_subject: ca.subject().to_string(),
        });
    }

    // 4. validity
    for (which, cert) in [("leaf", &leaf), ("CA", ca)] {
        let not_before = cert.validity().not_before.to_datetime();
        let not_after = cert.validity().not_after.to_datetime();
        if now < not_before || now > not_after {
            return Err(CertError::VerifyValidity {
                which,
                subject: cert.subject().to_string(),
                not_before,
                not_after,
                now,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_hex_strips_der_sign_byte() {
        assert_eq!(serial_hex(&[0x00, 0x80, 0x0a]), "800a");
        assert_eq!(serial_hex(&[0x01]), "01");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[]), "");
    }

    #[test]
    fn ip_bytes() {
        assert_eq!(
            ip_from_bytes(&[127, 0, 0, 1]),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert_eq!(
            ip_from_bytes(&Ipv6Addr::LOCALHOST.octets()),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(ip_from_bytes(&[1, 2, 3]), None);
    }
}
