//! Kubernetes-style label selectors (`matchLabels`, `matchExpressions`) over label sets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::labels::{is_label_key, is_label_value};
use super::{LabelSource, Labels, ModelError};

/// A selector operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SelectorOperator {
    /// The key exists with one of the values.
    In,
    /// The key is absent, or its value is none of the values.
    NotIn,
    /// The key exists.
    Exists,
    /// The key does not exist.
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    /// Label key, optionally with a source (`k8s:app`); without one it matches any source.
    pub key: String,
    /// How the values are used.
    pub operator: SelectorOperator,
    /// Values for `In`/`NotIn`; empty for `Exists`/`DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A label selector. The empty selector matches every label set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Every key must have exactly this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Every expression must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// A selector key split into an optional source and the label key.
fn split_key(key: &str) -> (Option<LabelSource>, &str) {
    match key.split_once(':') {
        Some(("k8s", k)) => (Some(LabelSource::K8s), k),
        Some(("mesh", k)) => (Some(LabelSource::Mesh), k),
        Some(("reserved", k)) => (Some(LabelSource::Reserved), k),
        Some(("any", k)) => (None, k),
        _ => (None, key),
    }
}

fn values_of<'a>(labels: &'a Labels, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let (source, key) = split_key(key);
    labels
        .iter()
        .filter(move |l| l.key == key && source.is_none_or(|s| s == l.source))
        .map(|l| l.value.as_str())
}

impl LabelSelector {
    /// Checks keys, values and operator/value combinations.
    pub fn validate(&self) -> Result<(), ModelError> {
        let check_key = |k: &str| {
            let (_, key) = split_key(k);
            if k.split_once(':')
                .is_some_and(|(s, _)| !matches!(s, "k8s" | "mesh" | "reserved" | "any"))
                || !is_label_key(key)
            {
                return Err(ModelError::Selector(format!("invalid key {k:?}")));
            }
            Ok(())
        };
        for (k, v) in &self.match_labels {
            check_key(k)?;
            if !is_label_value(v) {
                return Err(ModelError::Selector(format!(
                    "invalid value {v:?} for key {k:?} in matchLabels"
                )));
            }
        }
        for (i, e) in self.match_expressions.iter().enumerate() {
            check_key(&e.key)?;
            match e.operator {
                SelectorOperator::In | SelectorOperator::NotIn if e.values.is_empty() => {
                    return Err(ModelError::Selector(format!(
                        "matchExpressions[{i}] ({}): operator {:?} needs at least one value",
                        e.key, e.operator
                    )));
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !e.values.is_empty() =>
                {
                    return Err(ModelError::Selector(format!(
                        "matchExpressions[{i}] ({}): operator {:?} takes no values",
                        e.key, e.operator
                    )));
                }
                _ => {}
            }
            if let Some(v) = e.values.iter().find(|v| !is_label_value(v)) {
                return Err(ModelError::Selector(format!(
                    "matchExpressions[{i}] ({}): invalid value {v:?}",
                    e.key
                )));
            }
        }
        Ok(())
    }

    /// Whether the selector has no requirements (matches everything).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether the selector names `key` (with any source) in a label or expression.
    pub fn mentions(&self, key: &str) -> bool {
        self.match_labels.keys().any(|k| split_key(k).1 == key)
            || self
                .match_expressions
                .iter()
                .any(|e| split_key(&e.key).1 == key)
    }

    /// Whether `labels` satisfies every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| values_of(labels, k).any(|have| have == v))
            && self.match_expressions.iter().all(|e| {
                let mut have = values_of(labels, &e.key);
                match e.operator {
                    SelectorOperator::In => have.any(|h| e.values.iter().any(|v| v == h)),
                    SelectorOperator::NotIn => have.all(|h| e.values.iter().all(|v| v != h)),
                    SelectorOperator::Exists => have.next().is_some(),
                    SelectorOperator::DoesNotExist => have.next().is_none(),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(json: &str) -> LabelSelector {
        let s: LabelSelector = serde_json::from_str(json).unwrap();
        s.validate().unwrap();
        s
    }

    #[test]
    fn matching() {
        let web = Labels::parse([
            "k8s:app=web",
            "k8s:tier=front",
            "mesh:io.meshd.cluster=east",
        ])
        .unwrap();
        assert!(LabelSelector::default().matches(&web));
        assert!(sel(r#"{"matchLabels":{"app":"web"}}"#).matches(&web));
        assert!(sel(r#"{"matchLabels":{"k8s:app":"web"}}"#).matches(&web));
        assert!(!sel(r#"{"matchLabels":{"mesh:app":"web"}}"#).matches(&web));
        assert!(sel(r#"{"matchLabels":{"io.meshd.cluster":"east"}}"#).matches(&web));
        let expr = |op: &str, vals: &str| {
            sel(&format!(
                r#"{{"matchExpressions":[{{"key":"tier","operator":"{op}","values":{vals}}}]}}"#
            ))
        };
        assert!(expr("In", r#"["front","back"]"#).matches(&web));
        assert!(!expr("In", r#"["back"]"#).matches(&web));
        assert!(expr("NotIn", r#"["back"]"#).matches(&web));
        assert!(!expr("NotIn", r#"["front"]"#).matches(&web));
        assert!(expr("Exists", "[]").matches(&web));
        assert!(!expr("DoesNotExist", "[]").matches(&web));
        let db = Labels::parse(["k8s:app=db"]).unwrap();
        assert!(expr("NotIn", r#"["front"]"#).matches(&db));
        assert!(expr("DoesNotExist", "[]").matches(&db));
    }

    #[test]
    fn validation_errors_are_clear() {
        let bad: LabelSelector = serde_json::from_str(
            r#"{"matchExpressions":[{"key":"tier","operator":"In","values":[]}]}"#,
        )
        .unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.contains("matchExpressions[0] (tier)") && e.contains("at least one value"),
            "{e}"
        );
        let bad: LabelSelector = serde_json::from_str(
            r#"{"matchExpressions":[{"key":"tier","operator":"Exists","values":["x"]}]}"#,
        )
        .unwrap();
        assert!(bad.validate().is_err());
        let bad: LabelSelector =
            serde_json::from_str(r#"{"matchLabels":{"foo:app":"x"}}"#).unwrap();
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<LabelSelector>(r#"{"matchLabel":{}}"#).is_err());
        assert!(
            serde_json::from_str::<LabelSelector>(
                r#"{"matchExpressions":[{"key":"a","operator":"Maybe"}]}"#
            )
            .is_err()
        );
    }
}
