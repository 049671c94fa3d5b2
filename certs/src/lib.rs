//! mesh-certs: the PKI of a meshd cluster.
//!
//! Every cluster has its own certificate authority. etcd and the gRPC API speak mutual TLS, and
//! the identity of a client is the CN of its certificate (for etcd that CN is the user name:
//! `remote-west`, `apiserver-east`, `root`, ...). This crate covers the whole path of that
//! material, using rcgen (issuing), x509-parser (inspection, verification) and rustls with the
//! ring provider (serving):
//!
//! ```text
//!  CertificateAuthority::generate / from_pem / from_files       one CA per cluster
//!        │ issue(&CertRequest::server(..) / ::client("remote-west")
//!        │        .with_role("east", Role::Peer))   SAN URI spiffe://east.meshd/peer
//!        ▼
//!  IssuedCert { cert_pem, key_pem } ── write_files(dir, stem) ──▶ <stem>.crt, <stem>.key (0600)
//!        │                                   (atomic: temp file + rename)
//!        ▼
//!  ReloadingCertKey::watch(crt, key)   notify watcher on the directory, debounced; a bad or
//!        │                             half-written pair is logged and the old one kept
//!        ▼
//!  server_config(identity, client_ca_pem)  ──▶ Arc<rustls::ServerConfig> (client cert required)
//!  client_config(ca_pem, Some((crt, key))) ──▶ Arc<rustls::ClientConfig> (custom roots only)
//! ```
//!
//! A certificate's **role** (`admin`, `agent`, `apiserver`, `peer`; [`Role`]) in the cluster
//! whose CA issued it travels as the SAN URI `spiffe://<cluster>.meshd/<role>` ([`Principal`]);
//! [`Principal::from_der`] reads it back from a TLS peer certificate, which is what the gRPC
//! APIs authorize every call by (a certificate that merely chains to the CA is not enough).
//!
//! [`inspect_pem`] and [`verify_chain`] answer "what is in this file" and "does this certificate
//! belong to that CA and is it valid now" with errors that name the failed check.
//!
//! All rustls configs are built with `rustls::crypto::ring::default_provider()` explicitly, so no
//! process-wide crypto provider needs to be installed.

mod ca;
mod error;
mod files;
mod inspect;
pub mod names;
mod pem;
mod reload;
mod role;
mod tls;

pub use ca::{
    CLOCK_SKEW_BACKDATE, CertRequest, CertUsage, CertificateAuthority, DEFAULT_LEAF_VALIDITY,
    IssuedCert,
};
pub use error::CertError;
pub use files::{FileKind, write_file_atomic};
pub use inspect::{CertInfo, inspect_der, inspect_pem, verify_chain, verify_chain_at};
pub use reload::{DEFAULT_DEBOUNCE, ReloadingCertKey};
pub use role::{Principal, Role, RoleError, TRUST_DOMAIN_SUFFIX};
pub use tls::{
    SERVER_ALPN, certified_key_from_pem, client_config, client_config_with_resolver,
    crypto_provider, root_store, server_config, server_config_from_pem, static_identity,
};
