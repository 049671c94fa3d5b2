//! `PeerCredential`: one peer kubeconfig, parsed and validated, and written back in canonical form.

use std::fmt;
use std::path::{Path, PathBuf};

use kube_client::config::{AuthInfo, Kubeconfig, NamedExtension};
use serde::Serialize;
use time::OffsetDateTime;

use super::error::{PeerConfigError, chain};
use super::{CLUSTER_EXTENSION, FILE_SUFFIX, base64};
use crate::kv::EtcdConfig;
use crate::model::{ClusterId, ClusterName, MaxConnectedClusters};

/// Largest PEM file a `certificate-authority` / `client-certificate` / `client-key` path may name.
const MAX_PEM_FILE: u64 = 1 << 20;

/// What one peer kubeconfig says: how to reach and authenticate to a remote cluster's
/// clustermesh etcd, and who that cluster is.
///
/// Built by [`PeerCredential::from_kubeconfig`], which validates everything; the fields are
/// public so that `meshctl connect` can assemble a credential before writing it.
/// `Debug` shows no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerCredential {
    /// The remote cluster: the name of the kubeconfig's one context.
    pub name: ClusterName,
    /// The remote cluster's ID (context extension `meshd.io/cluster`, `clusterId`).
    pub cluster_id: ClusterId,
    /// The mesh mode the remote cluster runs with (`maxConnectedClusters`).
    pub max_connected_clusters: MaxConnectedClusters,
    /// The remote clustermesh etcd endpoint, `https://host:port`.
    pub server: String,
    /// CA bundle (PEM) that signed the remote endpoint's server certificate.
    pub ca_pem: String,
    /// Client certificate (PEM); its CN is the etcd user (`remote-<local>`).
    pub cert_pem: String,
    /// Client private key (PEM). Secret.
    pub key_pem: String,
    /// Name to verify the server certificate against instead of the host of `server`.
    pub tls_server_name: Option<String>,
}

impl fmt::Debug for PeerCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCredential")
            .field("name", &self.name)
            .field("cluster_id", &self.cluster_id)
            .field("max_connected_clusters", &self.max_connected_clusters)
            .field("server", &self.server)
            .field("tls_server_name", &self.tls_server_name)
            .field("cert_not_after", &self.cert_not_after())
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The `meshd.io/cluster` context extension.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterExtension {
    cluster_id: u16,
    max_connected_clusters: u16,
}

// Canonical output form. Written with our own structs (not kube's) so that the key order is
// the familiar one and the secret fields need no `secrecy` round trip.
#[derive(Serialize)]
struct OutKubeconfig<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    kind: &'a str,
    clusters: [OutNamed<'a, OutCluster<'a>>; 1],
    users: [OutNamed<'a, OutUser>; 1],
    contexts: [OutNamed<'a, OutContext<'a>>; 1],
    #[serde(rename = "current-context")]
    current_context: &'a str,
}

#[derive(Serialize)]
struct OutNamed<'a, T> {
    name: &'a str,
    #[serde(rename = "cluster", skip_serializing_if = "Option::is_none")]
    cluster: Option<T>,
    #[serde(rename = "user", skip_serializing_if = "Option::is_none")]
    user: Option<T>,
    #[serde(rename = "context", skip_serializing_if = "Option::is_none")]
    context: Option<T>,
}

impl<'a, T> OutNamed<'a, T> {
    fn new(name: &'a str) -> Self {
        Self {
            name,
            cluster: None,
            user: None,
            context: None,
        }
    }
}

#[derive(Serialize)]
struct OutCluster<'a> {
    server: &'a str,
    #[serde(rename = "certificate-authority-data")]
    certificate_authority_data: String,
    #[serde(rename = "tls-server-name", skip_serializing_if = "Option::is_none")]
    tls_server_name: Option<&'a str>,
}

#[derive(Serialize)]
struct OutUser {
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: String,
    #[serde(rename = "client-key-data")]
    client_key_data: String,
}

#[derive(Serialize)]
struct OutContext<'a> {
    cluster: &'a str,
    user: &'a str,
    extensions: [OutExtension; 1],
}

#[derive(Serialize)]
struct OutExtension {
    name: &'static str,
    extension: ClusterExtension,
}

impl PeerCredential {
    /// The file name of a peer's credential in a peers directory: `<peer>.kubeconfig`.
    pub fn file_name(peer: &ClusterName) -> String {
        format!("{peer}{FILE_SUFFIX}")
    }

    /// Parses and validates one peer kubeconfig. `path` names the file in errors, anchors
    /// relative `certificate-authority` / `client-certificate` / `client-key` paths (they are
    /// resolved against its directory), and, if its name ends in `.kubeconfig`, must be
    /// `<context name>.kubeconfig`. Other names (e.g. a Secret described as
    /// `secret/meshd-peer-west`) skip that last check.
    ///
    /// Requires exactly one cluster, one user and one context that references both; the
    /// context carries the `meshd.io/cluster` extension `{clusterId, maxConnectedClusters}`;
    /// `server` is `https://host:port`; the CA, client certificate and key parse as PEM and
    /// the key belongs to the certificate.
    pub fn from_kubeconfig(path: &Path, text: &str) -> Result<PeerCredential, PeerConfigError> {
        let kc = parse_kubeconfig(path, text)?;
        Parser { path }.credential(&kc)
    }

    /// Every context of a kubeconfig that may hold several (such as the admin kubeconfig
    /// `meshctl up` writes, one context per cluster), each resolved like
    /// [`PeerCredential::from_kubeconfig`] resolves its one context, with the context's
    /// extensions for callers that carry more than `meshd.io/cluster`. Context names must be
    /// unique.
    pub fn contexts_from_kubeconfig(
        path: &Path,
        text: &str,
    ) -> Result<Vec<(PeerCredential, Vec<NamedExtension>)>, PeerConfigError> {
        let kc = parse_kubeconfig(path, text)?;
        let parser = Parser { path };
        if kc.contexts.is_empty() {
            return Err(parser.err("contexts", "no context"));
        }
        let mut out: Vec<(PeerCredential, Vec<NamedExtension>)> = Vec::new();
        for (xi, context) in kc.contexts.iter().enumerate() {
            if out.iter().any(|(c, _)| c.name.as_str() == context.name) {
                return Err(parser.err(
                    format!("contexts[{xi}].name"),
                    format!("{:?} is defined more than once", context.name),
                ));
            }
            let cred = parser.context_credential(&kc, xi)?;
            let ext = context
                .context
                .as_ref()
                .and_then(|c| c.extensions.clone())
                .unwrap_or_default();
            out.push((cred, ext));
        }
        Ok(out)
    }

    /// The etcd client configuration for this peer: one endpoint, TLS with the client
    /// certificate; timeouts and user/password left at their defaults.
    pub fn to_etcd_config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.server.clone()],
            ca_pem: Some(self.ca_pem.clone()),
            cert_pem: Some(self.cert_pem.clone()),
            key_pem: Some(self.key_pem.clone()),
            tls_server_name: self.tls_server_name.clone(),
            ..EtcdConfig::default()
        }
    }

    /// The canonical kubeconfig for this credential (DESIGN §6): one cluster entry named after
    /// the remote cluster with `server`, `certificate-authority-data` (and `tls-server-name`),
    /// one user named `user` (conventionally `remote-<local cluster>`, the certificate CN) with
    /// `client-certificate-data` / `client-key-data`, and one context named after the remote
    /// cluster with the `meshd.io/cluster` extension, which is also the current context.
    pub fn to_kubeconfig_yaml(&self, user: &str) -> String {
        let name = self.name.as_str();
        let doc = OutKubeconfig {
            api_version: "v1",
            kind: "Config",
            clusters: [OutNamed {
                cluster: Some(OutCluster {
                    server: &self.server,
                    certificate_authority_data: base64::encode(self.ca_pem.as_bytes()),
                    tls_server_name: self.tls_server_name.as_deref(),
                }),
                ..OutNamed::new(name)
            }],
            users: [OutNamed {
                user: Some(OutUser {
                    client_certificate_data: base64::encode(self.cert_pem.as_bytes()),
                    client_key_data: base64::encode(self.key_pem.as_bytes()),
                }),
                ..OutNamed::new(user)
            }],
            contexts: [OutNamed {
                context: Some(OutContext {
                    cluster: name,
                    user,
                    extensions: [OutExtension {
                        name: CLUSTER_EXTENSION,
                        extension: ClusterExtension {
                            cluster_id: self.cluster_id.get(),
                            max_connected_clusters: self.max_connected_clusters.get(),
                        },
                    }],
                }),
                ..OutNamed::new(name)
            }],
            current_context: name,
        };
        // Base64 strings must stay plain one-line scalars (kube's decoder rejects the
        // whitespace a folded block scalar could introduce).
        let mut opts = serde_saphyr::SerializerOptions::default();
        opts.prefer_block_scalars = false;
        serde_saphyr::to_string_with_options(&doc, opts)
            // JSON is YAML too; serializing these plain structs cannot fail in practice.
            .or_else(|_| serde_json::to_string_pretty(&doc))
            .unwrap_or_default()
    }

    /// When the client certificate expires (`None` if it does not parse), for status warnings.
    pub fn cert_not_after(&self) -> Option<OffsetDateTime> {
        mesh_certs::inspect_pem(&self.cert_pem)
            .ok()?
            .first()
            .map(|info| info.not_after)
    }
}

/// Same deserialization as `Kubeconfig::from_yaml`, minus its silent multi-document merge.
fn parse_kubeconfig(path: &Path, text: &str) -> Result<Kubeconfig, PeerConfigError> {
    let parse_err = |message: String| PeerConfigError::Parse {
        path: path.to_owned(),
        message,
    };
    let mut docs = serde_saphyr::from_multiple::<Kubeconfig>(text)
        .map_err(|e| parse_err(e.without_snippet().to_string()))?;
    match docs.len() {
        0 => Err(parse_err("empty document".into())),
        1 => Ok(docs.swap_remove(0)),
        n => Err(parse_err(format!("expected one YAML document, found {n}"))),
    }
}

/// Validation with the file path at hand for error messages.
struct Parser<'a> {
    path: &'a Path,
}

impl Parser<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> PeerConfigError {
        PeerConfigError::invalid(self.path, field, reason)
    }

    fn credential(&self, kc: &Kubeconfig) -> Result<PeerCredential, PeerConfigError> {
        exactly_one(&kc.clusters, "cluster").map_err(|r| self.err("clusters", r))?;
        exactly_one(&kc.auth_infos, "user").map_err(|r| self.err("users", r))?;
        let context = exactly_one(&kc.contexts, "context").map_err(|r| self.err("contexts", r))?;
        if let Some(current) = &kc.current_context
            && current != &context.name
        {
            return Err(self.err(
                "current-context",
                format!("{current:?} is not the one context {:?}", context.name),
            ));
        }
        let cred = self.context_credential(kc, 0)?;
        self.check_file_stem(&cred.name)?;
        Ok(cred)
    }

    /// The credential of context number `xi`, with the cluster and user entries it names.
    fn context_credential(
        &self,
        kc: &Kubeconfig,
        xi: usize,
    ) -> Result<PeerCredential, PeerConfigError> {
        let context = &kc.contexts[xi];
        let name = ClusterName::new(context.name.clone())
            .map_err(|e| self.err(format!("contexts[{xi}].name"), e.to_string()))?;
        let ctx = context
            .context
            .as_ref()
            .ok_or_else(|| self.err(format!("contexts[{xi}].context"), "missing"))?;
        let ci = kc
            .clusters
            .iter()
            .position(|c| c.name == ctx.cluster)
            .ok_or_else(|| {
                self.err(
                    format!("contexts[{xi}].context.cluster"),
                    format!(
                        "{:?} does not name the cluster entry {}",
                        ctx.cluster,
                        entry_names(kc.clusters.iter().map(|c| c.name.as_str()))
                    ),
                )
            })?;
        let cluster = &kc.clusters[ci];
        let ui = match &ctx.user {
            Some(u) => kc
                .auth_infos
                .iter()
                .position(|a| a.name == *u)
                .ok_or_else(|| {
                    self.err(
                        format!("contexts[{xi}].context.user"),
                        format!(
                            "{u:?} does not name the user entry {}",
                            entry_names(kc.auth_infos.iter().map(|a| a.name.as_str()))
                        ),
                    )
                })?,
            None => return Err(self.err(format!("contexts[{xi}].context.user"), "missing")),
        };
        let user = &kc.auth_infos[ui];
        let (cluster_id, max_connected_clusters) =
            self.extension(xi, ctx.extensions.as_deref().unwrap_or_default())?;

        // The cluster entry: server, CA, TLS server name.
        let c = cluster
            .cluster
            .as_ref()
            .ok_or_else(|| self.err(format!("clusters[{ci}].cluster"), "missing"))?;
        let server = c
            .server
            .clone()
            .ok_or_else(|| self.err(format!("clusters[{ci}].cluster.server"), "missing"))?;
        check_server(&server).map_err(|r| self.err(format!("clusters[{ci}].cluster.server"), r))?;
        if c.insecure_skip_tls_verify == Some(true) {
            return Err(self.err(
                format!("clusters[{ci}].cluster.insecure-skip-tls-verify"),
                "must not be true: peers are always verified against their CA",
            ));
        }
        let tls_server_name = match &c.tls_server_name {
            Some(n) if n.trim().is_empty() => {
                return Err(self.err(format!("clusters[{ci}].cluster.tls-server-name"), "empty"));
            }
            other => other.clone(),
        };
        let ca = self.pem_source(
            &format!("clusters[{ci}].cluster.certificate-authority"),
            c.certificate_authority_data.as_deref(),
            c.certificate_authority.as_deref(),
        )?;
        mesh_certs::inspect_pem(&ca.pem)
            .map_err(|e| self.err(&ca.field, format!("not a PEM certificate: {}", chain(&e))))?;

        // The user entry: client certificate and key.
        let auth = user
            .auth_info
            .as_ref()
            .ok_or_else(|| self.err(format!("users[{ui}].user"), "missing"))?;
        let cert = self.pem_source(
            &format!("users[{ui}].user.client-certificate"),
            auth.client_certificate_data.as_deref(),
            auth.client_certificate.as_deref(),
        )?;
        let key_data = client_key_data(auth);
        let key = self.pem_source(
            &format!("users[{ui}].user.client-key"),
            key_data.as_deref(),
            auth.client_key.as_deref(),
        )?;
        mesh_certs::inspect_pem(&cert.pem)
            .map_err(|e| self.err(&cert.field, format!("not a PEM certificate: {}", chain(&e))))?;
        mesh_certs::certified_key_from_pem(&cert.pem, &key.pem).map_err(|e| match e {
            mesh_certs::CertError::Invalid { .. } => self.err(
                &key.field,
                format!("does not belong to the certificate in {}", cert.field),
            ),
            other => self.err(
                &key.field,
                format!("not a PEM private key: {}", chain(&other)),
            ),
        })?;

        Ok(PeerCredential {
            name,
            cluster_id,
            max_connected_clusters,
            server,
            ca_pem: ca.pem,
            cert_pem: cert.pem,
            key_pem: key.pem,
            tls_server_name,
        })
    }

    fn check_file_stem(&self, name: &ClusterName) -> Result<(), PeerConfigError> {
        let Some(file) = self.path.file_name().and_then(|f| f.to_str()) else {
            return Ok(());
        };
        let Some(stem) = file.strip_suffix(FILE_SUFFIX) else {
            return Ok(());
        };
        if stem != name.as_str() {
            return Err(self.err(
                "contexts[0].name",
                format!(
                    "{:?} does not match the file name (expected {:?} in {file})",
                    name.as_str(),
                    stem
                ),
            ));
        }
        Ok(())
    }

    fn extension(
        &self,
        xi: usize,
        extensions: &[NamedExtension],
    ) -> Result<(ClusterId, MaxConnectedClusters), PeerConfigError> {
        let base = format!("contexts[{xi}].context.extensions[{CLUSTER_EXTENSION}]");
        let mut found = extensions.iter().filter(|e| e.name == CLUSTER_EXTENSION);
        let ext = found
            .next()
            .ok_or_else(|| self.err(&base, "missing (needs {clusterId, maxConnectedClusters})"))?;
        if found.next().is_some() {
            return Err(self.err(&base, "given more than once"));
        }
        let obj = ext
            .extension
            .as_object()
            .ok_or_else(|| self.err(format!("{base}.extension"), "must be a mapping"))?;
        let number = |key: &str| -> Result<u64, PeerConfigError> {
            let field = format!("{base}.{key}");
            let v = obj.get(key).ok_or_else(|| self.err(&field, "missing"))?;
            v.as_u64()
                .ok_or_else(|| self.err(&field, format!("{v} is not a non-negative integer")))
        };
        let mcc_raw = number("maxConnectedClusters")?;
        let mcc = u32::try_from(mcc_raw)
            .ok()
            .and_then(|n| MaxConnectedClusters::from_u32(n).ok())
            .ok_or_else(|| {
                self.err(
                    format!("{base}.maxConnectedClusters"),
                    format!("{mcc_raw} is not 255 or 511"),
                )
            })?;
        let id_raw = number("clusterId")?;
        let id = u32::try_from(id_raw)
            .ok()
            .and_then(|n| ClusterId::new(n, mcc).ok())
            .ok_or_else(|| {
                self.err(
                    format!("{base}.clusterId"),
                    format!(
                        "{id_raw} is not a valid cluster ID (must be 1..={} with maxConnectedClusters {})",
                        mcc.get(),
                        mcc.get()
                    ),
                )
            })?;
        Ok((id, mcc))
    }

    /// A PEM document given either inline (`<field>-data`, base64) or as a file path
    /// (`<field>`, relative to the kubeconfig's directory). `field` is the path variant's name.
    fn pem_source(
        &self,
        field: &str,
        data: Option<&str>,
        file: Option<&str>,
    ) -> Result<PemSource, PeerConfigError> {
        let data_field = format!("{field}-data");
        match (data, file) {
            (Some(_), Some(_)) => Err(self.err(
                field,
                format!("both {field} and {data_field} are set; give one"),
            )),
            (None, None) => Err(self.err(&data_field, "missing")),
            (Some(b64), None) => {
                let bytes = base64::decode(b64).map_err(|r| self.err(&data_field, r))?;
                let pem = String::from_utf8(bytes)
                    .map_err(|_| self.err(&data_field, "not PEM text (decodes to non-UTF-8)"))?;
                Ok(PemSource {
                    field: data_field,
                    pem,
                })
            }
            (None, Some(file)) => {
                let resolved = self.resolve(file);
                let pem = read_pem_file(&resolved).map_err(|r| self.err(field, r))?;
                Ok(PemSource {
                    field: field.to_owned(),
                    pem,
                })
            }
        }
    }

    fn resolve(&self, file: &str) -> PathBuf {
        let p = Path::new(file);
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_owned(),
        }
    }
}

struct PemSource {
    /// The field it came from (for errors about its content).
    field: String,
    pem: String,
}

/// `"a"` or `"a", "b"` for error messages (`(none)` when empty).
fn entry_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<String> = names.map(|n| format!("{n:?}")).collect();
    if v.is_empty() {
        "(none)".to_owned()
    } else {
        v.join(", ")
    }
}

fn read_pem_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_PEM_FILE {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| format!("{} is not PEM text (not UTF-8)", path.display()))
}

/// `client-key-data` is a `secrecy::SecretString` in kube's types; serializing exposes it
/// without a direct dependency on `secrecy`.
fn client_key_data(auth: &AuthInfo) -> Option<String> {
    auth.client_key_data.as_ref()?;
    match serde_json::to_value(auth)
        .ok()?
        .get_mut("client-key-data")?
        .take()
    {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

fn exactly_one<'a, T>(items: &'a [T], what: &str) -> Result<&'a T, String> {
    match items {
        [one] => Ok(one),
        [] => Err(format!("expected exactly one {what}, found none")),
        many => Err(format!("expected exactly one {what}, found {}", many.len())),
    }
}

/// `https://host:port`, nothing else (no user info, path, query or fragment).
fn check_server(server: &str) -> Result<(), String> {
    let Some(rest) = server.strip_prefix("https://") else {
        return Err(format!("{server:?} must be https (https://host:port)"));
    };
    let bad = || format!("{server:?} is not of the form https://host:port");
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.contains(char::is_whitespace)
    {
        return Err(bad());
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        (host, after.strip_prefix(':').ok_or_else(bad)?)
    } else {
        rest.rsplit_once(':').ok_or_else(bad)?
    };
    if host.is_empty() || (!rest.starts_with('[') && host.contains(':')) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !port.starts_with('+') => Ok(()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::check_server;

    #[test]
    fn server_urls() {
        for ok in [
            "https://127.0.0.1:2379",
            "https://etcd.example.com:32379",
            "https://[::1]:2379",
        ] {
            assert_eq!(check_server(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://127.0.0.1:2379",
            "https://127.0.0.1",
            "https://127.0.0.1:2379/",
            "https://127.0.0.1:0",
            "https://127.0.0.1:99999",
            "https://:2379",
            "https://u@h:1",
            "https://::1:2379",
            "https://[::1]",
            "127.0.0.1:2379",
        ] {
            assert!(check_server(bad).is_err(), "{bad}");
        }
    }
}
