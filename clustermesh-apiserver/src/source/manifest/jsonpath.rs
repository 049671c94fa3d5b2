//! Field paths for serde errors: re-reads a failed value from a JSON text whose every line
//! is mapped to the field path written on it, so an error's line names the field.

use std::fmt::Write as _;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Deserializes `value` into `T`; on failure the message is prefixed with the path of
/// the failing field (`spec.ports[0].port: invalid type: ...`).
pub(super) fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, String> {
    T::deserialize(value).map_err(|first| locate_error::<T>(value, &first))
}

/// The slow path: print `value` with one key or element per line, deserialize again from
/// that text and map serde_json's error line back to the path printed on it.
fn locate_error<T: DeserializeOwned>(value: &Value, first: &serde_json::Error) -> String {
    let mut printer = Printer::default();
    printer.value(value, &mut String::new());
    let Err(err) = serde_json::from_str::<T>(&printer.text) else {
        return first.to_string();
    };
    let message = strip_position(&err);
    let path = err
        .line()
        .checked_sub(1)
        .and_then(|line| printer.paths.get(line))
        .filter(|path| !path.is_empty());
    match path {
        Some(path) => format!("{path}: {message}"),
        None => message,
    }
}

/// serde_json's message without its ` at line L column C` suffix.
fn strip_position(err: &serde_json::Error) -> String {
    let full = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    match full.strip_suffix(&suffix) {
        Some(message) => message.to_owned(),
        None => full,
    }
}

/// Appends one path segment: `.key` (or `key` at the root) for plain keys, `["key"]` otherwise.
pub(super) fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        let _ = write!(path, "[{key:?}]");
    }
}

/// Pretty JSON writer that records, per output line, the path of what starts on it.
#[derive(Debug, Default)]
struct Printer {
    text: String,
    /// `paths[i]` is the path of line `i + 1`; the closing bracket of a container is on
    /// a line of its own carrying the container's path (serde reports "missing field" there).
    paths: Vec<String>,
}

impl Printer {
    fn newline(&mut self, path: &str) {
        if !self.paths.is_empty() {
            self.text.push('\n');
        }
        self.paths.push(path.to_owned());
    }

    /// Writes `value` whose path is `path`; the current line is already opened.
    fn value(&mut self, value: &Value, path: &mut String) {
        if self.paths.is_empty() {
            self.newline(path);
        }
        match value {
            Value::Object(map) if !map.is_empty() => {
                self.text.push('{');
                for (i, (key, item)) in map.iter().enumerate() {
                    if i > 0 {
                        self.text.push(',');
                    }
                    let len = path.len();
                    push_key(path, key);
                    self.newline(path);
                    self.json(key.as_str());
                    self.text.push(':');
                    self.value(item, path);
                    path.truncate(len);
                }
                self.newline(path);
                self.text.push('}');
            }
            Value::Array(items) if !items.is_empty() => {
                self.text.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.text.push(',');
                    }
                    let len = path.len();
                    let _ = write!(path, "[{i}]");
                    self.newline(path);
                    self.value(item, path);
                    path.truncate(len);
                }
                self.newline(path);
                self.text.push(']');
            }
            other => self.json(other),
        }
    }

    fn json<T: serde::Serialize + ?Sized>(&mut self, value: &T) {
        // Serializing a string or a `Value` scalar cannot fail; an empty string would only
        // make the re-read fail, which falls back to the message without a path.
        self.text
            .push_str(&serde_json::to_string(value).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Port {
        port: i32,
        name: Option<String>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Spec {
        ports: Vec<Port>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Doc {
        spec: Spec,
    }

    fn err(json: &str) -> String {
        let value: Value = serde_json::from_str(json).unwrap();
        from_value::<Doc>(&value).unwrap_err()
    }

    #[test]
    fn names_the_failing_field() {
        assert_eq!(
            err(r#"{"spec":{"ports":[{"port":80},{"port":"http"}]}}"#),
            r#"spec.ports[1].port: invalid type: string "http", expected i32"#
        );
        assert_eq!(
            err(r#"{"spec":{"ports":[{"port":80,"nmae":"x"}]}}"#),
            "spec.ports[0].nmae: unknown field `nmae`, expected `port` or `name`"
        );
        assert_eq!(
            err(r#"{"spec":{"ports":[{"name":"x"}]}}"#),
            "spec.ports[0]: missing field `port`"
        );
        assert_eq!(
            err(r#"{"spec":{"ports":{}}}"#),
            "spec.ports: invalid type: map, expected a sequence"
        );
        assert_eq!(err(r#"{}"#), "missing field `spec`");
    }

    #[test]
    fn quotes_keys_that_are_not_plain() {
        let mut path = String::from("metadata.annotations");
        push_key(&mut path, "service.meshd.io/global");
        assert_eq!(path, r#"metadata.annotations["service.meshd.io/global"]"#);
    }
}
