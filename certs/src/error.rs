//! `CertError`: one variant per step that can fail, with the underlying cause kept as `source`.

use std::path::PathBuf;

use time::OffsetDateTime;
use x509_parser::error::X509Error;

/// Everything that can go wrong in this crate.
///
/// Each variant names the step that failed (and, where there is one, the file or
/// the thing being worked on); the lower-level error is kept as [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Generating a key pair or a self-signed CA certificate failed.
    #[error("generate {what}")]
    Generate {
        /// What was being generated, e.g. `key pair for "apiserver-east"`.
        what: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },

    /// Turning an existing CA certificate + key into an issuer failed.
    #[error("load CA {what}")]
    LoadCa {
        /// The CA certificate (file path or description).
        what: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },

    /// The certificate request is invalid (empty CN, bad validity, ...).
    #[error("invalid certificate request for CN {common_name:?}: {reason}")]
    Request {
        /// CN of the request.
        common_name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Signing a certificate with the CA failed.
    #[error("sign certificate for CN {common_name:?}")]
    Sign {
        /// CN of the certificate being signed.
        common_name: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },

    /// A PEM document could not be decoded.
    #[error("parse PEM {what}")]
    ParsePem {
        /// Which document: a file path or a description such as `CA certificate`.
        what: String,
        /// The PEM decoding error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },

    /// A PEM document holds no certificate.
    #[error("parse PEM {what}: no CERTIFICATE block found")]
    NoCertificate {
        /// Which document: a file path or a description.
        what: String,
    },

    /// A DER certificate could not be parsed as X.509.
    #[error("parse X.509 certificate #{index} of {what}")]
    ParseCert {
        /// Which document: a file path or a description.
        what: String,
        /// Zero-based position of the certificate in the PEM bundle.
        index: usize,
        /// The x509-parser error.
        #[source]
        source: X509Error,
    },

    /// A private key could not be parsed or loaded.
    #[error("parse private key {what}")]
    ParseKey {
        /// Which document: a file path or a description.
        what: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A certificate (or pair) is structurally fine but unusable for the requested role.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was checked, e.g. `CA certificate /etc/meshd/ca.crt`.
        what: String,
        /// Why it was rejected.
        reason: String,
    },

    /// Reading a file failed.
    #[error("read file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Writing a file (or creating its directory, or renaming it into place) failed.
    #[error("write file {path}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Setting up the file watcher failed.
    #[error("watch directory {path}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The notify error.
        #[source]
        source: notify::Error,
    },

    /// Chain verification: no certificate in the CA bundle has the leaf's issuer name as subject.
    #[error(
        "verify issuer: leaf issuer {leaf_issuer:?} matches none of the CA subjects {ca_subjects:?}"
    )]
    VerifyIssuer {
        /// Issuer name of the leaf.
        leaf_issuer: String,
        /// Subject names of the CA certificates that were tried.
        ca_subjects: Vec<String>,
    },

    /// Chain verification: the leaf's signature does not verify with the CA's public key.
    #[error("verify signature: leaf {leaf_subject:?} is not signed by CA {ca_subject:?}")]
    VerifySignature {
        /// Subject of the leaf.
        leaf_subject: String,
        /// Subject of the (last) CA whose key was tried.
        ca_subject: String,
        /// The x509-parser verification error.
        #[source]
        source: X509Error,
    },

    /// Chain verification: the issuing certificate is not a CA (basicConstraints).
    #[error("verify CA flag: {ca_subject:?} is not a CA certificate")]
    VerifyNotCa {
        /// Subject of the certificate used as issuer.
        ca_subject: String,
    },

    /// Chain verification: a certificate is outside its validity period now.
    #[error(
        "verify validity: {which} {subject:?} is valid from {not_before} to {not_after}, but now is {now}"
    )]
    VerifyValidity {
        /// `leaf` or `CA`.
        which: &'static str,
        /// Subject of that certificate.
        subject: String,
        /// Its notBefore.
        not_before: OffsetDateTime,
        /// Its notAfter.
        not_after: OffsetDateTime,
        /// The time of the check.
        now: OffsetDateTime,
    },

    /// Building a rustls configuration failed.
    #[error("build rustls config: {what}")]
    Rustls {
        /// Which step, e.g. `add CA certificate to root store`.
        what: String,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },

    /// Building the rustls client-certificate verifier failed.
    #[error("build rustls config: client certificate verifier")]
    ClientVerifier {
        /// The rustls error.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}
