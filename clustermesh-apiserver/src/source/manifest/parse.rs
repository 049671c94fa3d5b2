//! Parsing one manifest file: split into YAML documents, dispatch each on
//! `apiVersion`/`kind`, decode into the typed object and validate what meshd uses.
//!
//! Documents are numbered from 1 in file order, as YAML counts them: an explicit empty
//! document (`---` alone) takes a number, an empty preamble before the first `---` does not.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use meshd::model::{MeshNetworkPolicy, MeshNetworkPolicySpec, ModelError};
use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;

use super::jsonpath;
use super::validate::{self, Issues, NameRule};
use crate::source::{Object, ObjectRef, ServiceExport, SourceError};

/// Namespace given to namespaced objects that name none.
const DEFAULT_NAMESPACE: &str = "default";

/// An object and where it was defined (`file document N (Kind ns/name)`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Located {
    /// The object.
    pub(super) object: Object,
    /// Where it was defined.
    pub(super) location: String,
}

/// The result of parsing one file.
#[derive(Debug, Default)]
pub(super) struct Parsed {
    /// Good objects, in file order, without duplicates (the first definition wins).
    pub(super) objects: Vec<Located>,
    /// Problems; the documents they concern produced no object.
    pub(super) errors: Vec<SourceError>,
}

/// Parses every document of `text`; `path` only names the file in locations.
pub(super) fn parse_text(path: &Path, text: &str) -> Parsed {
    let mut parser = Parser {
        file: path.display().to_string(),
        parsed: Parsed::default(),
        seen: HashMap::new(),
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, (line, doc)) in split_documents(text).into_iter().enumerate() {
        parser.document(index + 1, line, doc);
    }
    parser.parsed
}

/// The supported kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Service,
    EndpointSlice,
    Pod,
    Node,
    ServiceExport,
    Policy,
}

impl Kind {
    fn of(api_version: &str, kind: &str) -> Option<Self> {
        Some(match (api_version, kind) {
            ("v1", "Namespace") => Self::Namespace,
            ("v1", "Service") => Self::Service,
            ("v1", "Pod") => Self::Pod,
            ("v1", "Node") => Self::Node,
            ("discovery.k8s.io/v1", "EndpointSlice") => Self::EndpointSlice,
            (
                "multicluster.x-k8s.io/v1alpha1" | "multicluster.x-k8s.io/v1beta1",
                "ServiceExport",
            ) => Self::ServiceExport,
            (meshd::model::POLICY_API_VERSION, meshd::model::POLICY_KIND) => Self::Policy,
            _ => return None,
        })
    }

    fn namespaced(self) -> bool {
        !matches!(self, Self::Namespace | Self::Node)
    }
}

/// `apiVersion`, `kind`, name and namespace of a document, as far as they are strings.
#[derive(Debug, Clone, Copy)]
struct Header<'a> {
    api_version: Option<&'a str>,
    kind: Option<&'a str>,
    name: Option<&'a str>,
    namespace: Option<&'a str>,
}

impl<'a> Header<'a> {
    fn read(value: &'a Value) -> Self {
        let meta = value.get("metadata");
        let text = |v: Option<&'a Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty());
        Self {
            api_version: text(value.get("apiVersion")),
            kind: text(value.get("kind")),
            name: text(meta.and_then(|m| m.get("name"))),
            namespace: text(meta.and_then(|m| m.get("namespace"))),
        }
    }
}

/// ` (Kind ns/name)` for a location, with the namespace the object will get.
#[derive(Debug)]
struct Describe<'a>(Header<'a>, Option<Kind>);

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self(header, kind) = self;
        let Some(k) = header.kind else { return Ok(()) };
        write!(f, " ({k}")?;
        if let Some(name) = header.name {
            let namespace = match kind {
                Some(kind) if kind.namespaced() => {
                    Some(header.namespace.unwrap_or(DEFAULT_NAMESPACE))
                }
                Some(_) => None,
                None => header.namespace,
            };
            match namespace {
                Some(ns) => write!(f, " {ns}/{name}")?,
                None => write!(f, " {name}")?,
            }
        }
        f.write_str(")")
    }
}

#[derive(Debug)]
struct Parser {
    file: String,
    parsed: Parsed,
    /// Where each object of the file was first defined.
    seen: HashMap<ObjectRef, String>,
}

impl Parser {
    fn error(&mut self, location: String, message: String) {
        self.parsed.errors.push(SourceError { location, message });
    }

    fn document(&mut self, number: usize, first_line: usize, text: &str) {
        if is_blank(text) {
            return;
        }
        let base = format!("{} document {number}", self.file);
        let value = match yaml_value(text, first_line) {
            Ok(Value::Null) => return,
            Ok(value) => value,
            Err(message) => return self.error(base, message),
        };
        let header = Header::read(&value);
        if header.api_version == Some("v1") && header.kind == Some("List") {
            return self.list(&base, &value);
        }
        self.object(base, &value);
    }

    fn list(&mut self, base: &str, value: &Value) {
        match value.get("items") {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    self.object(format!("{base} items[{i}]"), item);
                }
            }
            Some(Value::Null) | None => {}
            Some(_) => self.error(
                format!("{base} (List)"),
                "items: invalid type, expected a sequence".to_owned(),
            ),
        }
    }

    fn object(&mut self, base: String, value: &Value) {
        if !value.is_object() {
            return self.error(
                base,
                format!("expected a mapping, found {}", value_kind(value)),
            );
        }
        let header = Header::read(value);
        let (Some(api_version), Some(kind_name)) = (header.api_version, header.kind) else {
            let missing = if header.api_version.is_none() {
                "apiVersion"
            } else {
                "kind"
            };
            let location = format!("{base}{}", Describe(header, None));
            return self.error(
                location,
                format!("{missing}: required (a non-empty string)"),
            );
        };
        let kind = Kind::of(api_version, kind_name);
        let location = format!("{base}{}", Describe(header, kind));
        let Some(kind) = kind else {
            let message = format!(
                "unsupported apiVersion {api_version:?} kind {kind_name:?} (supported: v1 \
                 Namespace, Service, Pod, Node and List; discovery.k8s.io/v1 EndpointSlice; \
                 multicluster.x-k8s.io/v1alpha1 or v1beta1 ServiceExport; {} {})",
                meshd::model::POLICY_API_VERSION,
                meshd::model::POLICY_KIND
            );
            return self.error(location, message);
        };
        match decode(kind, value) {
            Ok(object) => self.push(object, location),
            Err(problems) => {
                for message in problems {
                    self.error(location.clone(), message);
                }
            }
        }
    }

    fn push(&mut self, object: Object, location: String) {
        let object_ref = object.object_ref();
        if let Some(first) = self.seen.get(&object_ref) {
            let message = format!(
                "{object_ref} is already defined at {first}; this definition is ignored (the first one wins)"
            );
            return self.error(location, message);
        }
        self.seen.insert(object_ref, location.clone());
        self.parsed.objects.push(Located { object, location });
    }
}

/// Splits a YAML stream into documents: `(first line, text)`, each starting at its `---`.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 1, 0);
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if offset > 0 && is_separator(line) {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = i + 1;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    // A preamble without `---` is a document only when it has content.
    if docs
        .first()
        .is_some_and(|(_, doc)| !is_separator(doc) && is_blank(doc))
    {
        docs.remove(0);
    }
    docs
}

fn is_separator(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.chars().next().is_none_or(char::is_whitespace))
}

/// Only separators, `...`, directives, comments and blank lines.
fn is_blank(doc: &str) -> bool {
    doc.lines().all(|line| {
        let rest = if is_separator(line) {
            &line[3..]
        } else {
            line.strip_prefix("...").unwrap_or(line)
        };
        let rest = rest.trim_start();
        rest.is_empty() || rest.starts_with('#') || line.starts_with('%')
    })
}

/// Parses one document's YAML into a JSON value; errors carry the file's line number.
fn yaml_value(text: &str, first_line: usize) -> Result<Value, String> {
    let options = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_str_with_options::<Value>(text, options).map_err(|e| {
        let e = e.without_snippet();
        let message = e.to_string();
        match e.location().filter(|l| l.line() > 0) {
            Some(l) => {
                let line = u64::try_from(first_line)
                    .unwrap_or(u64::MAX)
                    .saturating_add(l.line() - 1);
                format!(
                    "invalid YAML at line {line} column {}: {}",
                    l.column(),
                    strip_location(&message)
                )
            }
            None => format!("invalid YAML: {message}"),
        }
    })
}

/// saphyr's message without its own (document-relative) position prefix or suffix.
fn strip_location(message: &str) -> &str {
    message
        .split_once(" at line ")
        .map_or(message, |(head, _)| head)
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

/// Decodes and validates one object given as JSON with `apiVersion` and `kind`, exactly as
/// a manifest document of that kind is (the Kubernetes source uses this, so that both sources
/// turn the same object into the same [`Object`]).
pub(crate) fn decode_value(value: &Value) -> Result<Object, Vec<String>> {
    let header = Header::read(value);
    let (Some(api_version), Some(kind)) = (header.api_version, header.kind) else {
        return Err(vec!["apiVersion and kind: required".to_owned()]);
    };
    let Some(kind) = Kind::of(api_version, kind) else {
        return Err(vec![format!(
            "unsupported apiVersion {api_version:?} kind {kind:?}"
        )]);
    };
    decode(kind, value)
}

/// Decodes and validates one object of a supported kind.
fn decode(kind: Kind, value: &Value) -> Result<Object, Vec<String>> {
    Ok(match kind {
        Kind::Namespace => {
            let mut o: Namespace = typed(value)?;
            o.metadata.namespace = None;
            checked(|i| validate::metadata(i, &o.metadata, NameRule::Label))?;
            Object::Namespace(Box::new(o))
        }
        Kind::Service => {
            let mut o: Service = typed(value)?;
            default_namespace(&mut o.metadata);
            checked(|i| {
                validate::metadata(i, &o.metadata, NameRule::Label);
                validate::service(i, &o);
            })?;
            Object::Service(Box::new(o))
        }
        Kind::EndpointSlice => {
            let mut o: EndpointSlice = typed(value)?;
            default_namespace(&mut o.metadata);
            checked(|i| {
                validate::metadata(i, &o.metadata, NameRule::Subdomain);
                validate::endpoint_slice(i, &o);
            })?;
            Object::EndpointSlice(Box::new(o))
        }
        Kind::Pod => {
            let mut o: Pod = typed(value)?;
            default_namespace(&mut o.metadata);
            checked(|i| {
                validate::metadata(i, &o.metadata, NameRule::Subdomain);
                validate::pod(i, &o);
            })?;
            Object::Pod(Box::new(o))
        }
        Kind::Node => {
            let mut o: Node = typed(value)?;
            o.metadata.namespace = None;
            checked(|i| {
                validate::metadata(i, &o.metadata, NameRule::Subdomain);
                validate::node(i, &o);
            })?;
            Object::Node(Box::new(o))
        }
        Kind::ServiceExport => Object::ServiceExport(service_export(value)?),
        Kind::Policy => Object::Policy(policy(value)?),
    })
}

fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, Vec<String>> {
    jsonpath::from_value(value).map_err(|e| vec![e])
}

fn checked(check: impl FnOnce(&mut Issues)) -> Result<(), Vec<String>> {
    let mut issues = Issues::default();
    check(&mut issues);
    let issues = issues.into_vec();
    if issues.is_empty() {
        Ok(())
    } else {
        Err(issues)
    }
}

fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
}

/// The parts of a `ServiceExport` meshd uses (spec and status are ignored).
#[derive(Debug, Deserialize)]
struct ServiceExportDoc {
    metadata: ObjectMeta,
}

fn service_export(value: &Value) -> Result<ServiceExport, Vec<String>> {
    let mut doc: ServiceExportDoc = typed(value)?;
    default_namespace(&mut doc.metadata);
    checked(|i| validate::metadata(i, &doc.metadata, NameRule::Label))?;
    let created = match &doc.metadata.creation_timestamp {
        Some(t) => Some(
            time::OffsetDateTime::from_unix_timestamp_nanos(t.0.as_nanosecond())
                .map_err(|e| vec![format!("metadata.creationTimestamp: {e}")])?,
        ),
        None => None,
    };
    Ok(ServiceExport {
        namespace: doc.metadata.namespace.unwrap_or_default(),
        name: doc.metadata.name.unwrap_or_default(),
        created,
    })
}

/// A `MeshNetworkPolicy` document: unknown top-level fields are rejected, like in the spec.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyDoc {
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: ObjectMeta,
    spec: MeshNetworkPolicySpec,
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

fn policy(value: &Value) -> Result<MeshNetworkPolicy, Vec<String>> {
    let mut doc: PolicyDoc = typed(value)?;
    default_namespace(&mut doc.metadata);
    checked(|i| validate::metadata(i, &doc.metadata, NameRule::Subdomain))?;
    doc.spec.validate().map_err(|e| {
        vec![match e {
            ModelError::Field { reason, .. } => format!("spec.{reason}"),
            other => format!("spec: {other}"),
        }]
    })?;
    Ok(MeshNetworkPolicy {
        namespace: doc.metadata.namespace.unwrap_or_default(),
        name: doc.metadata.name.unwrap_or_default(),
        spec: doc.spec,
    })
}
