//! rustls server/client configurations for meshd's mTLS (ring provider, custom roots only).

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, InconsistentKeys, RootCertStore, ServerConfig};

use crate::inspect::{cert_info, parse_der};
use crate::pem::{parse_certs, parse_key};
use crate::{CertError, CertInfo};

/// ALPN protocols the server side offers: `h2` for gRPC (tonic clients insist on it), then `http/1.1`.
pub const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The ring crypto provider, used explicitly by every config built here, so no
/// process-wide `install_default()` is needed.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parse a certificate chain (leaf first) and its private key into a rustls [`CertifiedKey`],
/// checking that the key belongs to the leaf.
pub fn certified_key_from_pem(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<CertifiedKey>, CertError> {
    let (ck, _) = load_certified_key(
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
        "certificate",
        "private key",
    )?;
    Ok(ck)
}

/// A fixed (never reloaded) identity, usable both as [`ResolvesServerCert`] for
/// [`server_config`] and as [`ResolvesClientCert`] for [`client_config_with_resolver`].
pub fn static_identity(cert_pem: &str, key_pem: &str) -> Result<Arc<SingleCertAndKey>, CertError> {
    Ok(Arc::new(SingleCertAndKey::from(certified_key_from_pem(
        cert_pem, key_pem,
    )?)))
}

/// Parse and check a certificate chain + key; `cert_what`/`key_what` name them in errors.
pub(crate) fn load_certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_what: &str,
    key_what: &str,
) -> Result<(Arc<CertifiedKey>, CertInfo), CertError> {
    let chain = parse_certs(cert_pem, cert_what)?;
    let info =
        cert_info(&parse_der(&chain[0], cert_what, 0)?).map_err(|source| CertError::ParseCert {
            what: cert_what.to_owned(),
            index: 0,
            source,
        })?;
    let key = parse_key(key_pem, key_what)?;
    let signing_key = crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| CertError::ParseKey {
            what: key_what.to_owned(),
            source: Box::new(source),
        })?;
    let ck = CertifiedKey::new(chain, signing_key);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::Invalid {
                what: key_what.to_owned(),
                reason: format!("private key does not match certificate {cert_what}"),
            });
        }
        Err(source) => {
            return Err(CertError::Rustls {
                what: format!("check key {key_what} against certificate {cert_what}"),
                source,
            });
        }
    }
    Ok((Arc::new(ck), info))
}

/// A root store holding every certificate of `ca_pem` (at least one).
pub fn root_store(ca_pem: &str) -> Result<RootCertStore, CertError> {
    root_store_named(ca_pem, "CA bundle")
}

fn root_store_named(ca_pem: &str, what: &str) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for (i, der) in parse_certs(ca_pem.as_bytes(), what)?
        .into_iter()
        .enumerate()
    {
        roots.add(der).map_err(|source| CertError::Rustls {
            what: format!("add certificate #{i} of {what} to the root store"),
            source,
        })?;
    }
    Ok(roots)
}

/// mTLS server config: presents `identity` (pass an `Arc<ReloadingCertKey>` for hot reload, or
/// [`static_identity`]) and **requires** a client certificate that chains to `client_ca_pem`.
/// TLS 1.2 and 1.3 (rustls safe defaults), ring provider, ALPN [`SERVER_ALPN`].
pub fn server_config(
    identity: Arc<dyn ResolvesServerCert>,
    client_ca_pem: &str,
) -> Result<Arc<ServerConfig>, CertError> {
    let provider = crypto_provider();
    let roots = Arc::new(root_store_named(client_ca_pem, "client CA bundle")?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|source| CertError::ClientVerifier { source })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| CertError::Rustls {
            what: "server protocol versions".to_owned(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// [`server_config`] with a fixed certificate and key given as PEM.
pub fn server_config_from_pem(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
) -> Result<Arc<ServerConfig>, CertError> {
    server_config(static_identity(cert_pem, key_pem)?, client_ca_pem)
}

/// Client config trusting only the certificates in `ca_pem` (no system roots), optionally
/// presenting a client certificate (`(cert PEM, key PEM)`). No ALPN is set.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, CertError> {
    let builder = client_builder(ca_pem)?;
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            builder.with_client_cert_resolver(static_identity(cert_pem, key_pem)?)
        }
    };
    Ok(Arc::new(config))
}

/// Client config trusting only `ca_pem`, presenting whatever `identity` resolves to (e.g. an
/// `Arc<ReloadingCertKey>`, so the client certificate is rotated without rebuilding the config).
pub fn client_config_with_resolver(
    ca_pem: &str,
    identity: Arc<dyn ResolvesClientCert>,
) -> Result<Arc<ClientConfig>, CertError> {
    Ok(Arc::new(
        client_builder(ca_pem)?.with_client_cert_resolver(identity),
    ))
}

fn client_builder(
    ca_pem: &str,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, CertError> {
    let roots = root_store_named(ca_pem, "server CA bundle")?;
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| CertError::Rustls {
            what: "client protocol versions".to_owned(),
            source,
        })?
        .with_root_certificates(roots))
}
