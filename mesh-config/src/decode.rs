//! Decoding YAML values into the typed model while collecting every problem.
//!
//! serde stops at the first error of a document; users fixing a VirtualService want all of its
//! mistakes at once. [`Decode`] walks a parsed [`Value`] instead, records each error and
//! warning with the field path it concerns (`spec.http[0].route[1].weight`), and keeps going.
//! A document with any error is rejected as a whole by the loader.
//!
//! Objects are decoded through [`Fields`], which also reports the fields nobody asked for:
//! for the kinds the mesh models completely (the Istio kinds and NetworkPolicy) an unknown
//! field is a warning, because the mesh ignores it while `kubectl apply` would refuse it.

use std::{collections::BTreeMap, fmt, fmt::Write as _};

use serde_yaml_ng::{Mapping, Value};

/// How bad a [`Diagnostic`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The file cannot be used.
    Error,
    /// The file is used; something in it is ignored or suspicious.
    Warning,
}

/// One problem found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file, as given on the command line.
    pub file: String,
    /// The document: its 1-based position in the file, plus `.items[i]` inside a `List`.
    pub document: String,
    /// The field path inside the document (`spec.ports[0].port`), empty for the whole document.
    pub field: String,
    /// What is wrong, including the resource it concerns when known.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {level}: {}",
            self.file, self.document, self.field, self.message
        )
    }
}

/// One segment of a field path.
#[derive(Clone, Debug)]
enum Segment {
    Key(String),
    Index(usize),
    Entry(String),
}

/// A problem found while decoding one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// The field path, empty for the whole document.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// The decoding context: the current field path and everything found so far.
#[derive(Debug, Default)]
pub struct Cx {
    path: Vec<Segment>,
    findings: Vec<Finding>,
}

impl Cx {
    /// The current field path, as users write it (`spec.ports[0].port`, `labels["app"]`).
    pub fn field(&self) -> String {
        let mut out = String::new();
        for segment in &self.path {
            match segment {
                Segment::Key(key) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                }
                Segment::Index(i) => {
                    let _ = write!(out, "[{i}]");
                }
                Segment::Entry(key) => {
                    let _ = write!(out, "[{key:?}]");
                }
            }
        }
        out
    }

    /// Records an error at the current field.
    pub fn error(&mut self, message: impl Into<String>) {
        self.push(Severity::Error, message.into());
    }

    /// Records a warning at the current field.
    pub fn warn(&mut self, message: impl Into<String>) {
        self.push(Severity::Warning, message.into());
    }

    fn push(&mut self, severity: Severity, message: String) {
        let field = self.field();
        self.findings.push(Finding {
            severity,
            field,
            message,
        });
    }

    /// Number of errors so far.
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count()
    }

    /// Everything found, in order.
    pub fn into_findings(self) -> Vec<Finding> {
        self.findings
    }

    fn within<T>(&mut self, segment: Segment, f: impl FnOnce(&mut Self) -> T) -> T {
        self.path.push(segment);
        let out = f(self);
        self.path.pop();
        out
    }

    /// Runs `f` with `key` appended to the current path.
    pub fn at<T>(&mut self, key: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        self.within(Segment::Key(key.to_string()), f)
    }

    /// Runs `f` with list index `i` appended to the current path.
    pub fn item<T>(&mut self, i: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        self.within(Segment::Index(i), f)
    }

    /// Runs `f` with map entry `key` appended to the current path.
    pub fn entry<T>(&mut self, key: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        self.within(Segment::Entry(key.to_string()), f)
    }

    /// Decodes a mapping through [`Fields`]; `strict` warns about fields `build` did not read.
    /// `None` (after recording an error) when `value` is not a mapping.
    pub fn object<T>(
        &mut self,
        value: &Value,
        strict: bool,
        build: impl FnOnce(&mut Fields<'_, '_>) -> T,
    ) -> Option<T> {
        let Value::Mapping(map) = value else {
            self.error(format!("expected an object, found {}", describe(value)));
            return None;
        };
        let mut fields = Fields {
            map,
            cx: self,
            used: Vec::new(),
            failed: Vec::new(),
        };
        let out = build(&mut fields);
        if strict {
            fields.warn_unknown();
        }
        Some(out)
    }
}

/// A type that can be decoded from a YAML value.
pub trait Decode: Sized {
    /// Decodes `value`, recording problems in `cx`; `None` when it cannot be used at all.
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self>;
}

/// The fields of one mapping being decoded.
pub struct Fields<'v, 'c> {
    map: &'v Mapping,
    cx: &'c mut Cx,
    used: Vec<String>,
    /// Fields whose value was present but had an error.
    failed: Vec<String>,
}

impl Fields<'_, '_> {
    /// The decoding context (for errors about the object as a whole).
    pub fn cx(&mut self) -> &mut Cx {
        self.cx
    }

    fn raw(&mut self, key: &str) -> Option<&Value> {
        self.used.push(key.to_string());
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(value),
        }
    }

    /// Whether `key` is present (and not null). Does not mark it as read.
    pub fn has(&self, key: &str) -> bool {
        !matches!(self.map.get(key), None | Some(Value::Null))
    }

    /// An optional field; `None` when missing, null or invalid (the error is recorded).
    pub fn opt<T: Decode>(&mut self, key: &str) -> Option<T> {
        let value = self.raw(key)?.clone();
        let before = self.cx.errors();
        let decoded = self.cx.at(key, |cx| T::decode(&value, cx));
        if self.cx.errors() > before {
            self.failed.push(key.to_string());
        }
        decoded
    }

    /// Whether field `key` (already read) was present with an error: checks that depend on
    /// its value are skipped, so one mistake is reported once.
    pub fn failed(&self, key: &str) -> bool {
        self.failed.iter().any(|k| k == key)
    }

    /// A required field; records "required field is missing" when absent.
    pub fn req<T: Decode + Default>(&mut self, key: &str) -> T {
        if !self.has(key) {
            self.used.push(key.to_string());
            self.cx.at(key, |cx| cx.error("required field is missing"));
            return T::default();
        }
        self.opt(key).unwrap_or_default()
    }

    /// A list field; empty when missing.
    pub fn list<T: Decode>(&mut self, key: &str) -> Vec<T> {
        self.opt(key).unwrap_or_default()
    }

    /// A map field (string keys); empty when missing.
    pub fn map<T: Decode>(&mut self, key: &str) -> BTreeMap<String, T> {
        self.opt(key).unwrap_or_default()
    }

    /// A boolean field; `false` when missing.
    pub fn flag(&mut self, key: &str) -> bool {
        self.opt(key).unwrap_or_default()
    }

    /// Marks `key` as known without decoding it (fields the mesh accepts and never reads).
    pub fn skip(&mut self, key: &str) {
        self.used.push(key.to_string());
    }

    /// Warns, when `key` is present, that Istio deprecates it, with what to use instead.
    pub fn deprecated(&mut self, key: &str, instead: &str) {
        if self.has(key) {
            self.cx
                .at(key, |cx| cx.warn(format!("deprecated by Istio; {instead}")));
        }
    }

    /// Records an error at field `key` of this object.
    pub fn error_at(&mut self, key: &str, message: impl Into<String>) {
        let message = message.into();
        self.cx.at(key, |cx| cx.error(message));
    }

    /// Records an error at item `i` of list field `key` (`key[i]`).
    pub fn error_item(&mut self, key: &str, i: usize, message: impl Into<String>) {
        let message = message.into();
        self.cx.at(key, |cx| cx.item(i, |cx| cx.error(message)));
    }

    /// Records an error at entry `entry` of map field `key` (`key["entry"]`).
    pub fn error_entry(&mut self, key: &str, entry: &str, message: impl Into<String>) {
        let message = message.into();
        self.cx
            .at(key, |cx| cx.entry(entry, |cx| cx.error(message)));
    }

    /// Records a warning at field `key` of this object.
    pub fn warn_at(&mut self, key: &str, message: impl Into<String>) {
        let message = message.into();
        self.cx.at(key, |cx| cx.warn(message));
    }

    fn warn_unknown(&mut self) {
        for key in self.map.keys() {
            let name = match key {
                Value::String(name) => name.clone(),
                other => format!("{other:?}"),
            };
            if self.used.contains(&name) {
                continue;
            }
            self.cx.at(&name, |cx| {
                cx.warn(
                    "unknown field, ignored by the mesh; `kubectl apply` (strict field \
                     validation by default) would refuse it",
                )
            });
        }
    }
}

/// Decodes YAML text as `T` for tests: the value and every finding as `field: message`.
#[cfg(test)]
pub fn decode_yaml<T: Decode>(yaml: &str) -> (Option<T>, Vec<String>) {
    let value: Value = serde_yaml_ng::from_str(yaml).expect("test YAML parses");
    let mut cx = Cx::default();
    let out = T::decode(&value, &mut cx);
    let found = cx
        .into_findings()
        .into_iter()
        .map(|f| format!("{}: {}", f.field, f.message))
        .collect();
    (out, found)
}

/// What kind of value `value` is, for messages.
pub fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "an object",
        Value::Tagged(_) => "a tagged value",
    }
}

impl Decode for String {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        match value {
            Value::String(s) => Some(s.clone()),
            other => {
                cx.error(format!("expected a string, found {}", describe(other)));
                None
            }
        }
    }
}

impl Decode for bool {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        match value {
            Value::Bool(b) => Some(*b),
            other => {
                cx.error(format!("expected true or false, found {}", describe(other)));
                None
            }
        }
    }
}

impl Decode for f64 {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        match value.as_f64() {
            Some(v) if v.is_finite() => Some(v),
            _ => {
                cx.error(format!("expected a number, found {}", describe(value)));
                None
            }
        }
    }
}

macro_rules! decode_int {
    ($($t:ty),*) => {$(
        impl Decode for $t {
            fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
                let Value::Number(n) = value else {
                    cx.error(format!("expected an integer, found {}", describe(value)));
                    return None;
                };
                let parsed = n.as_i64().and_then(|v| <$t>::try_from(v).ok());
                if parsed.is_none() {
                    cx.error(format!(
                        "{n} is not an integer between {} and {}",
                        <$t>::MIN,
                        <$t>::MAX
                    ));
                }
                parsed
            }
        }
    )*};
}
decode_int!(u16, u32, i32, i64, u64);

impl<T: Decode> Decode for Vec<T> {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let Value::Sequence(items) = value else {
            cx.error(format!("expected a list, found {}", describe(value)));
            return None;
        };
        Some(
            items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| cx.within(Segment::Index(i), |cx| T::decode(item, cx)))
                .collect(),
        )
    }
}

impl<T: Decode> Decode for BTreeMap<String, T> {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let Value::Mapping(map) = value else {
            cx.error(format!("expected an object, found {}", describe(value)));
            return None;
        };
        let mut out = BTreeMap::new();
        for (key, item) in map {
            // YAML allows non-string keys; Kubernetes maps are keyed by strings, but a bare
            // number (portLevelMtls: {8080: ...}) is what people write.
            let key = match key {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    cx.error(format!(
                        "map keys must be strings, found {}",
                        describe(other)
                    ));
                    continue;
                }
            };
            let decoded = cx.within(Segment::Entry(key.clone()), |cx| T::decode(item, cx));
            if let Some(decoded) = decoded {
                out.insert(key, decoded);
            }
        }
        Some(out)
    }
}

/// Declares a string enumeration as the API spells it (`ROUND_ROBIN`), with its decoder.
/// The first variant is the default. Unknown values are errors listing the allowed ones.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            #[default]
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value as the API spells it.
            pub const VALUES: &'static [&'static str] = &[$($text),+];

            /// The value as the API spells it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl $crate::decode::Decode for $name {
            fn decode(
                value: &serde_yaml_ng::Value,
                cx: &mut $crate::decode::Cx,
            ) -> Option<Self> {
                let text = <String as $crate::decode::Decode>::decode(value, cx)?;
                match text.as_str() {
                    $($text => Some(Self::$variant),)+
                    other => {
                        cx.error(format!(
                            "unknown value {other:?}; expected one of {}",
                            Self::VALUES.join(", ")
                        ));
                        None
                    }
                }
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({"type": "string", "enum": Self::VALUES})
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }
    };
}
pub(crate) use string_enum;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    struct Thing {
        name: String,
        port: Option<u16>,
        tags: Vec<String>,
    }

    impl Decode for Thing {
        fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
            cx.object(value, true, |f| Thing {
                name: f.req("name"),
                port: f.opt("port"),
                tags: f.list("tags"),
            })
        }
    }

    fn run<T: Decode>(yaml: &str) -> (Option<T>, Vec<String>) {
        let value: Value = serde_yaml_ng::from_str(yaml).unwrap();
        let mut cx = Cx::default();
        let out = cx.at("spec", |cx| T::decode(&value, cx));
        let found = cx
            .into_findings()
            .into_iter()
            .map(|f| format!("{:?} {}: {}", f.severity, f.field, f.message))
            .collect();
        (out, found)
    }

    #[test]
    fn reports_every_problem_of_an_object_with_its_path() {
        let (_, found) = run::<Thing>("{port: 70000, tags: [a, 3, b], extra: 1}");
        assert_eq!(
            found,
            [
                "Error spec.name: required field is missing",
                "Error spec.port: 70000 is not an integer between 0 and 65535",
                "Error spec.tags[1]: expected a string, found a number",
                "Warning spec.extra: unknown field, ignored by the mesh; `kubectl apply` (strict field validation by default) would refuse it",
            ]
        );
    }

    #[test]
    fn decodes_a_valid_object() {
        let (thing, found) = run::<Thing>("{name: x, port: 80, tags: [a]}");
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(
            thing.unwrap(),
            Thing {
                name: "x".into(),
                port: Some(80),
                tags: vec!["a".into()]
            }
        );
    }

    #[test]
    fn map_entries_are_named_in_paths() {
        let (_, found) = run::<BTreeMap<String, u32>>("{a: 1, b.c/d: x, 8080: 2}");
        assert_eq!(
            found,
            ["Error spec[\"b.c/d\"]: expected an integer, found a string"]
        );
    }
}
