//! Roles in certificates: the SAN URI `spiffe://<cluster>.meshd/<role>` ([`Principal`]), its parsing, and reading it from a peer certificate.

use std::fmt;
use std::str::FromStr;

use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

/// Scheme of role URIs.
const SCHEME: &str = "spiffe://";
/// Suffix of the trust domain: cluster `east` is `east.meshd`.
pub const TRUST_DOMAIN_SUFFIX: &str = ".meshd";

/// What a certificate's holder is to the cluster whose CA issued it. The gRPC APIs authorize
/// every call by this role (see `mesh_proto::server::authz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// An operator: `meshctl` (the admin kubeconfig's `root` certificate).
    Admin,
    /// The cluster's mesh-agent.
    Agent,
    /// The cluster's clustermesh-apiserver.
    Apiserver,
    /// Another cluster reading this one (`remote-<peer>`): its etcd only, never the gRPC APIs.
    Peer,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Agent, Role::Apiserver, Role::Peer];

    /// The name used in the SAN URI and on the command line: `admin`, `agent`, `apiserver`, `peer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Agent => "agent",
            Role::Apiserver => "apiserver",
            Role::Peer => "peer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = RoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| RoleError::UnknownRole { role: s.to_owned() })
    }
}

/// Why a role could not be parsed, issued or read from a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoleError {
    /// The role name is none of `admin`, `agent`, `apiserver`, `peer`.
    #[error("unknown role {role:?} (expected one of admin, agent, apiserver, peer)")]
    UnknownRole {
        /// The name given.
        role: String,
    },
    /// The cluster name cannot be a trust domain label.
    #[error(
        "cluster {cluster:?} is not an RFC 1123 label (lowercase alphanumerics and '-', at most 63 characters)"
    )]
    BadCluster {
        /// The name given.
        cluster: String,
    },
    /// A URI in the meshd form does not parse.
    #[error("{uri:?} is not a meshd role URI spiffe://<cluster>.meshd/<role>: {reason}")]
    Malformed {
        /// The URI.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate has no meshd role URI among its subject alternative names.
    #[error("certificate {subject} carries no role (no SAN URI spiffe://<cluster>.meshd/<role>)")]
    Missing {
        /// Subject of the certificate, e.g. `CN=root`.
        subject: String,
    },
    /// The certificate has more than one meshd role URI; none is trusted.
    #[error("certificate {subject} carries several roles ({}); expected one", uris.join(", "))]
    Ambiguous {
        /// Subject of the certificate.
        subject: String,
        /// The role URIs found.
        uris: Vec<String>,
    },
    /// The certificate (or its SAN extension) does not parse.
    #[error("parse the certificate to read its role")]
    Parse {
        /// The x509-parser error.
        #[source]
        source: X509Error,
    },
}

/// A role in a cluster, as a certificate carries it: `spiffe://<cluster>.meshd/<role>`.
///
/// The cluster is the one whose CA issued the certificate (and whose APIs it may call), not
/// necessarily the holder's: a peer credential of west for reading east says
/// `spiffe://east.meshd/peer` (its CN `remote-west` names the holder).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    cluster: String,
    role: Role,
}

impl Principal {
    /// `role` in `cluster`. The cluster name is checked by [`Principal::check`], which
    /// issuing does; parsed principals are always valid.
    pub fn new(cluster: impl Into<String>, role: Role) -> Self {
        Principal {
            cluster: cluster.into(),
            role,
        }
    }

    /// The cluster.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Checks that the cluster name is an RFC 1123 label (so the URI is well-formed).
    pub fn check(&self) -> Result<(), RoleError> {
        if crate::names::is_dns_label(&self.cluster, 63) {
            Ok(())
        } else {
            Err(RoleError::BadCluster {
                cluster: self.cluster.clone(),
            })
        }
    }

    /// The SAN URI: `spiffe://<cluster>.meshd/<role>`.
    pub fn uri(&self) -> String {
        format!(
            "{SCHEME}{}{TRUST_DOMAIN_SUFFIX}/{}",
            self.cluster, self.role
        )
    }

    /// Parses `spiffe://<cluster>.meshd/<role>` (exactly; no port, query, fragment or further
    /// path segments; lowercase).
    pub fn parse_uri(uri: &str) -> Result<Self, RoleError> {
        let bad = |reason: &str| RoleError::Malformed {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("scheme is not spiffe://"))?;
        let (domain, path) = rest.split_once('/').ok_or_else(|| bad("no /<role> path"))?;
        let cluster = domain
            .strip_suffix(TRUST_DOMAIN_SUFFIX)
            .ok_or_else(|| bad("trust domain does not end in .meshd"))?;
        if !crate::names::is_dns_label(cluster, 63) {
            return Err(bad(
                "cluster is not an RFC 1123 label (lowercase alphanumerics and '-', at most 63 characters)",
            ));
        }
        let role = path.parse::<Role>().map_err(|e| bad(&e.to_string()))?;
        Ok(Principal::new(cluster, role))
    }

    /// Whether `uri` claims to be a meshd role URI (`spiffe://….meshd/…`), well-formed or not.
    fn is_meshd_uri(uri: &str) -> bool {
        uri.strip_prefix(SCHEME)
            .and_then(|rest| rest.split('/').next())
            .is_some_and(|domain| domain.ends_with(TRUST_DOMAIN_SUFFIX))
    }

    /// The principal among a certificate's URI SANs: exactly one must be a meshd role URI
    /// (other URIs, e.g. SPIFFE IDs of other trust domains, are ignored) and it must parse.
    pub fn from_uris<'a>(
        subject: &str,
        uris: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, RoleError> {
        let ours: Vec<&str> = uris
            .into_iter()
            .filter(|u| Principal::is_meshd_uri(u))
            .collect();
        match ours.as_slice() {
            [] => Err(RoleError::Missing {
                subject: subject.to_owned(),
            }),
            [one] => Principal::parse_uri(one),
            many => Err(RoleError::Ambiguous {
                subject: subject.to_owned(),
                uris: many.iter().map(|u| (*u).to_owned()).collect(),
            }),
        }
    }

    /// The principal of a DER certificate, e.g. the first of `tonic::Request::peer_certs()`
    /// (the TLS layer has already verified it against the cluster CA).
    pub fn from_der(der: &[u8]) -> Result<Self, RoleError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| RoleError::Parse {
            source: X509Error::from(e),
        })?;
        Principal::from_cert(&cert)
    }

    pub(crate) fn from_cert(cert: &X509Certificate<'_>) -> Result<Self, RoleError> {
        let uris = uri_sans(cert).map_err(|source| RoleError::Parse { source })?;
        Principal::from_uris(&cert.subject().to_string(), uris)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

impl FromStr for Principal {
    type Err = RoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Principal::parse_uri(s)
    }
}

/// The URI subject alternative names of a certificate.
pub(crate) fn uri_sans<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, X509Error> {
    Ok(cert
        .subject_alternative_name()?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
            assert_eq!(r.to_string(), r.as_str());
        }
        for bad in ["", "Admin", "root", "admin ", "peers"] {
            let e = bad.parse::<Role>().unwrap_err();
            assert!(matches!(e, RoleError::UnknownRole { .. }), "{bad:?}: {e}");
            assert!(
                e.to_string().contains("admin, agent, apiserver, peer"),
                "{e}"
            );
        }
    }

    #[test]
    fn uris_round_trip() {
        for r in Role::ALL {
            let p = Principal::new("east-1", r);
            p.check().unwrap();
            let uri = p.uri();
            assert_eq!(uri, format!("spiffe://east-1.meshd/{r}"));
            assert_eq!(Principal::parse_uri(&uri).unwrap(), p);
            assert_eq!(uri.parse::<Principal>().unwrap(), p);
            assert_eq!(p.to_string(), uri);
        }
        let p = Principal::parse_uri("spiffe://west.meshd/peer").unwrap();
        assert_eq!((p.cluster(), p.role()), ("west", Role::Peer));
    }

    #[test]
    fn malformed_uris_are_refused() {
        for bad in [
            "",
            "https://east.meshd/admin",
            "spiffe://east.meshd",
            "spiffe://east.meshd/",
            "spiffe://east.meshd/root",
            "spiffe://east.meshd/admin/",
            "spiffe://east.meshd/admin/x",
            "spiffe://east.meshd/Admin",
            "spiffe://east.meshd:443/admin",
            "spiffe://East.meshd/admin",
            "spiffe://.meshd/admin",
            "spiffe://a.b.meshd/admin",
            "spiffe://east.mesh/admin",
            "spiffe://east.meshd/admin?x=1",
            "SPIFFE://east.meshd/admin",
        ] {
            let e = Principal::parse_uri(bad).unwrap_err();
            assert!(matches!(e, RoleError::Malformed { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(matches!(
            Principal::new("East", Role::Admin).check(),
            Err(RoleError::BadCluster { .. })
        ));
        assert!(Principal::new("a".repeat(64), Role::Admin).check().is_err());
    }

    #[test]
    fn the_one_meshd_uri_among_a_certificates_uris() {
        let subject = "CN=root";
        // Other URIs (another trust domain, other schemes) are ignored.
        let p = Principal::from_uris(
            subject,
            [
                "spiffe://cluster.local/ns/x/sa/y",
                "https://example.com/",
                "spiffe://east.meshd/admin",
            ],
        )
        .unwrap();
        assert_eq!(p, Principal::new("east", Role::Admin));

        let e = Principal::from_uris(subject, ["spiffe://cluster.local/ns/x"]).unwrap_err();
        assert!(matches!(e, RoleError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("CN=root"), "{e}");
        let e = Principal::from_uris(subject, []).unwrap_err();
        assert!(matches!(e, RoleError::Missing { .. }), "{e}");

        // Two roles: neither is trusted.
        let e = Principal::from_uris(
            subject,
            ["spiffe://east.meshd/peer", "spiffe://east.meshd/admin"],
        )
        .unwrap_err();
        assert!(matches!(e, RoleError::Ambiguous { .. }), "{e}");

        // A meshd URI that does not parse is an error, not "no role".
        let e = Principal::from_uris(subject, ["spiffe://east.meshd/root"]).unwrap_err();
        assert!(matches!(e, RoleError::Malformed { .. }), "{e}");
    }
}
