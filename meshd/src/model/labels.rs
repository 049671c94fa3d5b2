//! Labels (`source:key=value`) and sorted label sets.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Where a label comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LabelSource {
    /// Kubernetes object labels (pods, namespaces).
    K8s,
    /// Labels meshd adds, such as `mesh:io.meshd.cluster`.
    Mesh,
    /// Reserved identities (`reserved:host`, `reserved:world`, ...).
    Reserved,
}

impl LabelSource {
    /// The textual prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::K8s => "k8s",
            Self::Mesh => "mesh",
            Self::Reserved => "reserved",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "k8s" => Some(Self::K8s),
            "mesh" => Some(Self::Mesh),
            "reserved" => Some(Self::Reserved),
            _ => None,
        }
    }
}

/// One label: `source:key=value` (written `source:key` when the value is empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    /// Where the label comes from.
    pub source: LabelSource,
    /// A Kubernetes label key (optional DNS-subdomain prefix and `/`, then a name).
    pub key: String,
    /// A Kubernetes label value (may be empty).
    pub value: String,
}

/// The key every endpoint carries with its cluster name (`mesh:io.meshd.cluster=<cluster>`).
pub const CLUSTER_LABEL: &str = "io.meshd.cluster";
/// The key every endpoint carries with its namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Whether `s` is a valid Kubernetes label key (`[prefix/]name`).
pub(crate) fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => super::is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(s),
    }
}

/// Whether `s` is a valid Kubernetes label value (empty allowed).
pub(crate) fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

impl Label {
    /// Builds and validates a label.
    pub fn new(
        source: LabelSource,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, ModelError> {
        let (key, value) = (key.into(), value.into());
        let label = Self { source, key, value };
        if !is_label_key(&label.key) {
            return Err(ModelError::Label {
                label: label.to_string(),
                reason: "key must be [prefix/]name, name at most 63 alphanumerics, '-', '_' or '.'",
            });
        }
        if !is_label_value(&label.value) {
            return Err(ModelError::Label {
                label: label.to_string(),
                reason: "value must be empty or at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric",
            });
        }
        Ok(label)
    }

    /// The cluster label of an endpoint.
    pub fn cluster(cluster: &super::ClusterName) -> Self {
        Self {
            source: LabelSource::Mesh,
            key: CLUSTER_LABEL.to_owned(),
            value: cluster.as_str().to_owned(),
        }
    }
}

impl FromStr for Label {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (source, rest) = s.split_once(':').ok_or(ModelError::Label {
            label: s.to_owned(),
            reason: "missing source prefix (k8s:, mesh: or reserved:)",
        })?;
        let source = LabelSource::parse(source).ok_or(ModelError::Label {
            label: s.to_owned(),
            reason: "unknown source (want k8s, mesh or reserved)",
        })?;
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        Self::new(source, key, value)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source.as_str(), self.key)
        } else {
            write!(f, "{}:{}={}", self.source.as_str(), self.key, self.value)
        }
    }
}

impl Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A label set: sorted by (source, key), at most one label per (source, key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Labels(Vec<Label>);

impl Labels {
    /// Builds a set, sorting it; two labels with the same source and key are an error.
    pub fn new(mut labels: Vec<Label>) -> Result<Self, ModelError> {
        labels.sort();
        if let Some(w) = labels
            .windows(2)
            .find(|w| w[0].source == w[1].source && w[0].key == w[1].key)
        {
            return Err(ModelError::Label {
                label: w[1].to_string(),
                reason: "the same source and key appear twice in one label set",
            });
        }
        Ok(Self(labels))
    }

    /// Parses `source:key=value` strings.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, ModelError> {
        Self::new(
            items
                .into_iter()
                .map(str::parse)
                .collect::<Result<_, _>>()?,
        )
    }

    /// The labels in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Label> {
        self.0.iter()
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key` from `source`.
    pub fn get(&self, source: LabelSource, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|l| l.source == source && l.key == key)
            .map(|l| l.value.as_str())
    }

    /// Values of `key` from any source.
    pub fn values_any<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |l| l.key == key)
            .map(|l| l.value.as_str())
    }

    /// The cluster this label set belongs to, if it carries the cluster label.
    pub fn cluster(&self) -> Option<&str> {
        self.get(LabelSource::Mesh, CLUSTER_LABEL)
    }

    /// The namespace this label set belongs to, if it carries the namespace label.
    pub fn namespace(&self) -> Option<&str> {
        self.get(LabelSource::K8s, NAMESPACE_LABEL)
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = &'a Label;
    type IntoIter = std::slice::Iter<'a, Label>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<Label>::deserialize(d)?;
        Self::new(v).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let l: Label = "k8s:app=web".parse().unwrap();
        assert_eq!(l.source, LabelSource::K8s);
        assert_eq!((l.key.as_str(), l.value.as_str()), ("app", "web"));
        assert_eq!(l.to_string(), "k8s:app=web");
        let r: Label = "reserved:host".parse().unwrap();
        assert_eq!(r.to_string(), "reserved:host");
        let p: Label = "k8s:app.kubernetes.io/name=db".parse().unwrap();
        assert_eq!(p.key, "app.kubernetes.io/name");
        for bad in [
            "app=web",
            "foo:app=web",
            "k8s:=web",
            "k8s:app=-web",
            "k8s:a/b/c=x",
            "k8s:Bad_/x=y",
        ] {
            assert!(bad.parse::<Label>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sets_sort_and_reject_duplicates() {
        let set = Labels::parse(["mesh:io.meshd.cluster=east", "k8s:app=web"]).unwrap();
        assert_eq!(set.to_string(), "k8s:app=web,mesh:io.meshd.cluster=east");
        assert_eq!(set.cluster(), Some("east"));
        assert!(Labels::parse(["k8s:app=web", "k8s:app=db"]).is_err());
        // Same key from another source is allowed.
        assert!(Labels::parse(["k8s:app=web", "mesh:app=web"]).is_ok());
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(json, r#"["k8s:app=web","mesh:io.meshd.cluster=east"]"#);
        let back: Labels =
            serde_json::from_str(r#"["mesh:io.meshd.cluster=east","k8s:app=web"]"#).unwrap();
        assert_eq!(back, set);
    }
}
