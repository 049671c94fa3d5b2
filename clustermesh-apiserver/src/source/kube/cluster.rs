//! This cluster's name from the KEP-2149 `ClusterProperty` (`cluster.clusterset.k8s.io`, else `id.k8s.io`).

use kube::Client;
use kube::api::{Api, DynamicObject};
use meshd::model::ClusterName;

/// The KEP-2149 property holding the cluster's name within its clusterset.
pub const CLUSTER_PROPERTY: &str = "cluster.clusterset.k8s.io";
/// The property's name in earlier revisions of KEP-2149.
pub const LEGACY_CLUSTER_PROPERTY: &str = "id.k8s.io";

/// Why the cluster name could not be read from a `ClusterProperty`.
#[derive(Debug, thiserror::Error)]
pub enum ClusterPropertyError {
    /// Reading the property failed (retrying may help).
    #[error("reading ClusterProperty {name}: {source}")]
    Read {
        /// The property.
        name: &'static str,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The property's value is not a valid cluster name (fix the object).
    #[error("ClusterProperty {name}: spec.value {value:?}: {reason}")]
    Invalid {
        /// The property.
        name: &'static str,
        /// The value found.
        value: String,
        /// Why it is not a cluster name.
        reason: String,
    },
}

/// The cluster name from `ClusterProperty` [`CLUSTER_PROPERTY`], else
/// [`LEGACY_CLUSTER_PROPERTY`]; `None` when neither exists (or the CRD is not installed).
/// Returns the property's name with the value.
pub async fn cluster_name(
    client: &Client,
) -> Result<Option<(&'static str, ClusterName)>, ClusterPropertyError> {
    let ar = super::api_resource(
        "about.k8s.io",
        "v1alpha1",
        "ClusterProperty",
        "clusterproperties",
    );
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    for name in [CLUSTER_PROPERTY, LEGACY_CLUSTER_PROPERTY] {
        let found = match api.get_opt(name).await {
            Ok(found) => found,
            // The CRD itself is not installed.
            Err(kube::Error::Api(s)) if s.code == 404 => None,
            Err(source) => return Err(ClusterPropertyError::Read { name, source }),
        };
        let Some(obj) = found else { continue };
        let value = obj
            .data
            .pointer("/spec/value")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        return match ClusterName::new(&value) {
            Ok(n) => Ok(Some((name, n))),
            Err(e) => Err(ClusterPropertyError::Invalid {
                name,
                value,
                reason: e.to_string(),
            }),
        };
    }
    Ok(None)
}
