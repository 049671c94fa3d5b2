//! Authorization of every gRPC call by the role in the caller's certificate: one access table, one tower service in front of all routes.
//!
//! ```text
//!  TLS (client certificate chains to the cluster CA)
//!    ─► Authorized::call: method path + peer certificate (what tonic::Request::peer_certs reads)
//!         ─► Principal::from_der: spiffe://<cluster>.meshd/<role>
//!         ─► cluster == this cluster, role ∈ ACCESS[method]   else PERMISSION_DENIED
//!    ─► routes (the service's handlers; the Principal is in the request's extensions)
//! ```
//!
//! [`serve_mtls`](super::serve_mtls) always wraps the routes in [`Authorized`], so no server
//! can be started without it; a method missing from [`ACCESS`] is denied to every role.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use mesh_certs::{Principal, Role};
use rustls::pki_types::CertificateDer;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The components of the cluster: they may read what their etcd users may read anyway.
const IN_CLUSTER: &[Role] = &[Role::Admin, Role::Agent, Role::Apiserver];
/// Operators only.
const ADMIN: &[Role] = &[Role::Admin];

/// Who may call what: gRPC method path → the roles allowed. Every method of
/// `proto/mesh/v1/*.proto` has exactly one row (a unit test checks); a path not listed is
/// denied to every role, and role `peer` is in no row: a peer credential opens the cluster's
/// etcd (read-only) and nothing else.
///
/// The list and status calls show nothing an in-cluster component cannot already read in
/// its own etcd (the agent reads all of `mesh/`, the apiserver writes it), so `agent` and
/// `apiserver` may call them (e.g. one component checking another); `ObserveDrops` streams
/// the datapath's dropped flows, which are nowhere in etcd: operators only.
pub const ACCESS: &[(&str, &[Role])] = &[
    ("/mesh.v1.ClusterMesh/GetStatus", IN_CLUSTER),
    ("/mesh.v1.ClusterMesh/ListServices", IN_CLUSTER),
    ("/mesh.v1.ClusterMesh/ListIdentities", IN_CLUSTER),
    ("/mesh.v1.ClusterMesh/ListIpCache", IN_CLUSTER),
    ("/mesh.v1.ClusterMesh/ObserveDrops", ADMIN),
    ("/mesh.v1.Health/Check", IN_CLUSTER),
];

/// The roles allowed to call `method` (a gRPC path, `/package.Service/Method`); `None` when
/// the method is unknown (then nobody may call it).
pub fn allowed_roles(method: &str) -> Option<&'static [Role]> {
    ACCESS
        .iter()
        .find(|(m, _)| *m == method)
        .map(|(_, roles)| *roles)
}

/// Decides each call of one cluster's server from the method and the caller's certificate.
#[derive(Debug, Clone)]
pub struct Authorizer {
    cluster: Arc<str>,
}

impl Authorizer {
    /// Authorizes calls to a server of `cluster`: a certificate's role must name this cluster.
    pub fn new(cluster: &str) -> Self {
        Authorizer {
            cluster: cluster.into(),
        }
    }

    /// The cluster whose roles are accepted.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The caller of `method` with `peer_certs` (leaf first, as `tonic::Request::peer_certs`
    /// returns them), if allowed; else `PERMISSION_DENIED` (`UNAUTHENTICATED` without a
    /// certificate) with a message naming the method, the role and what would be allowed.
    pub fn authorize(
        &self,
        method: &str,
        peer_certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Principal, Status> {
        let Some(allowed) = allowed_roles(method) else {
            return Err(Status::permission_denied(format!(
                "{method}: unknown method; no role may call it"
            )));
        };
        let allowed_text = || {
            allowed
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(leaf) = peer_certs.and_then(<[_]>::first) else {
            return Err(Status::unauthenticated(format!(
                "{method}: no client certificate"
            )));
        };
        let principal = Principal::from_der(leaf).map_err(|e| {
            Status::permission_denied(format!(
                "{method} needs role {} in cluster {}: {e}; issue the certificate with a role \
                 (`meshctl certs reissue`, or `meshctl certs issue --role …`)",
                allowed_text(),
                self.cluster
            ))
        })?;
        if principal.cluster() != &*self.cluster {
            return Err(Status::permission_denied(format!(
                "{method}: the certificate's role {principal} is of cluster {}, this is cluster {}",
                principal.cluster(),
                self.cluster
            )));
        }
        if !allowed.contains(&principal.role()) {
            let peer_note = if principal.role() == Role::Peer {
                " (a peer credential opens this cluster's etcd, read-only, and nothing else)"
            } else {
                ""
            };
            return Err(Status::permission_denied(format!(
                "role {} ({principal}) may not call {method}; allowed: {}{peer_note}",
                principal.role(),
                allowed_text()
            )));
        }
        Ok(principal)
    }
}

/// A gRPC service (all routes of a server) that lets through only the calls its
/// [`Authorizer`] allows, and answers the others with the authorizer's status. An allowed
/// call carries the caller's [`Principal`] in its extensions
/// (`request.extensions().get::<Principal>()` in a handler).
#[derive(Debug, Clone)]
pub struct Authorized<S> {
    inner: S,
    authz: Authorizer,
}

impl<S> Authorized<S> {
    /// Wraps `inner` (e.g. `tonic::service::Routes`).
    pub fn new(inner: S, authz: Authorizer) -> Self {
        Authorized { inner, authz }
    }
}

impl<S, B> Service<http::Request<B>> for Authorized<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Exactly what tonic::Request::peer_certs() reads: the connection info tonic's
        // server puts on every request of a TLS connection.
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        let method = req.uri().path();
        match self
            .authz
            .authorize(method, certs.as_deref().map(Vec::as_slice))
        {
            Ok(principal) => {
                tracing::trace!(method, %principal, "gRPC call authorized");
                req.extensions_mut().insert(principal);
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                tracing::info!(
                    method,
                    code = ?status.code(),
                    reason = status.message(),
                    "gRPC call denied"
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use mesh_certs::{CertRequest, CertificateAuthority};
    use rustls::pki_types::pem::PemObject;

    use super::*;

    /// Every `rpc` of every `service` in the .proto files, as gRPC paths.
    fn proto_methods() -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for text in [
            include_str!("../../proto/mesh/v1/clustermesh.proto"),
            include_str!("../../proto/mesh/v1/health.proto"),
        ] {
            let package = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("package "))
                .and_then(|p| p.strip_suffix(';'))
                .expect("package line");
            let mut service = None;
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.split_whitespace().next();
                } else if let Some(rest) = line.strip_prefix("rpc ") {
                    let name = rest.split('(').next().expect("rpc name").trim();
                    let service = service.expect("rpc outside a service");
                    out.insert(format!("/{package}.{service}/{name}"));
                }
            }
        }
        out
    }

    #[test]
    fn every_rpc_has_exactly_one_row_and_no_row_admits_peers() {
        let methods = proto_methods();
        assert!(
            methods.contains("/mesh.v1.ClusterMesh/ListServices"),
            "{methods:?}"
        );
        let rows: Vec<&str> = ACCESS.iter().map(|(m, _)| *m).collect();
        let unique: BTreeSet<String> = rows.iter().map(|m| (*m).to_owned()).collect();
        assert_eq!(unique.len(), rows.len(), "a method listed twice: {rows:?}");
        assert_eq!(unique, methods, "ACCESS and the .proto files disagree");
        for (m, roles) in ACCESS {
            assert!(!roles.contains(&Role::Peer), "{m} admits peers");
            assert!(roles.contains(&Role::Admin), "{m} locks out meshctl");
        }
    }

    fn der(ca: &CertificateAuthority, req: &CertRequest) -> CertificateDer<'static> {
        let pem = ca.issue(req).unwrap().cert_pem;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn decisions() {
        let ca = CertificateAuthority::generate("meshd-east-ca", Duration::from_secs(600)).unwrap();
        let authz = Authorizer::new("east");
        let status = "/mesh.v1.ClusterMesh/GetStatus";
        let drops = "/mesh.v1.ClusterMesh/ObserveDrops";
        let as_role = |role| der(&ca, &CertRequest::client("x").with_role("east", role));

        let admin = as_role(Role::Admin);
        let p = authz
            .authorize(drops, Some(std::slice::from_ref(&admin)))
            .unwrap();
        assert_eq!(p, Principal::new("east", Role::Admin));
        authz.authorize(status, Some(&[admin])).unwrap();
        for role in [Role::Agent, Role::Apiserver] {
            authz.authorize(status, Some(&[as_role(role)])).unwrap();
            let e = authz.authorize(drops, Some(&[as_role(role)])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains(drops) && e.message().contains(role.as_str()));
        }

        let peer = der(
            &ca,
            &CertRequest::client("remote-west").with_role("east", Role::Peer),
        );
        let e = authz.authorize(status, Some(&[peer])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let m = e.message();
        assert!(m.contains("role peer") && m.contains(status), "{m}");

        let plain = der(&ca, &CertRequest::client("root"));
        let e = authz.authorize(status, Some(&[plain])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let m = e.message();
        assert!(
            m.contains("carries no role") && m.contains("CN=root"),
            "{m}"
        );
        assert!(
            m.contains(status) && m.contains("meshctl certs reissue"),
            "{m}"
        );

        let west = der(
            &ca,
            &CertRequest::client("x").with_role("west", Role::Admin),
        );
        let e = authz.authorize(status, Some(&[west])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("cluster west, this is cluster east"),
            "{e:?}"
        );

        let admin = as_role(Role::Admin);
        let e = authz
            .authorize("/mesh.v1.ClusterMesh/DeleteEverything", Some(&[admin]))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("unknown method"), "{e:?}");

        let e = authz.authorize(status, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = authz.authorize(status, Some(&[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
}
