//! Validation of the `ClusterMesh` list requests' filters, shared by every server of the service.

use std::fmt::Display;

use tonic::Status;

/// A namespace filter: empty means none; otherwise it must be an RFC 1123 label
/// (lowercase alphanumerics and '-', at most 63 characters), else `INVALID_ARGUMENT`.
pub fn namespace(ns: &str) -> Result<Option<String>, Status> {
    match ns {
        "" => Ok(None),
        ns if mesh_certs::names::is_dns_label(ns, 63) => Ok(Some(ns.to_owned())),
        ns => Err(Status::invalid_argument(format!(
            "namespace filter {ns:?} is not an RFC 1123 label \
             (lowercase alphanumerics and '-', at most 63 characters)"
        ))),
    }
}

/// A cluster filter: empty means none; otherwise `parse` (the server's validated cluster
/// name type) must accept it, else `INVALID_ARGUMENT` with the parser's message.
pub fn cluster<'a, T, E: Display>(
    cluster: &'a str,
    parse: impl FnOnce(&'a str) -> Result<T, E>,
) -> Result<Option<T>, Status> {
    match cluster {
        "" => Ok(None),
        c => parse(c)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("cluster filter: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        assert_eq!(namespace("").unwrap(), None);
        assert_eq!(namespace("prod-1").unwrap().as_deref(), Some("prod-1"));
        for bad in ["Prod", "a/b", "-x", "x-", "a_b", &"a".repeat(64)] {
            let e = namespace(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(e.message().contains("namespace"), "{}", e.message());
        }
    }

    #[test]
    fn clusters() {
        let parse = |s: &str| {
            if s == "east" {
                Ok(s.len())
            } else {
                Err("not east")
            }
        };
        assert_eq!(cluster("", parse).unwrap(), None);
        assert_eq!(cluster("east", parse).unwrap(), Some(4));
        let e = cluster("West", parse).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "cluster filter: not east");
    }
}
