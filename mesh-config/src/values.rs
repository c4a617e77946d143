//! Value types shared by the resources, with Istio's and Kubernetes' rules: durations,
//! string matches, label selectors, ports by number or name, percentages, CIDRs.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use serde_yaml_ng::Value;

use super::decode::{describe, string_enum, Cx, Decode};

/// Kubernetes labels (and any string map: annotations, selectors).
pub type Labels = std::collections::BTreeMap<String, String>;

/// A duration as Istio's CRDs accept it: Go's syntax, a sequence of decimal numbers each with
/// a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), e.g. `2s`, `1.5s`, `300ms`, `1h30m`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Parses Go duration syntax. Negative durations are refused (no Istio field takes one).
    pub fn parse(text: &str) -> Result<Duration, String> {
        let bad = |why: &str| Err(format!("invalid duration {text:?}: {why}"));
        if text.is_empty() {
            return bad("empty");
        }
        if text.starts_with('-') {
            return bad("must not be negative");
        }
        let mut rest = text.strip_prefix('+').unwrap_or(text);
        if rest == "0" {
            return Ok(Duration::default());
        }
        let mut nanos: u128 = 0;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (number, tail) = rest.split_at(number_len);
            if number.is_empty() || number == "." || number.matches('.').count() > 1 {
                return bad("expected a number followed by a unit such as 2s or 300ms");
            }
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let scale: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "" => return bad("missing unit (ns, us, ms, s, m or h)"),
                _ => {
                    return bad(&format!(
                        "unknown unit {unit:?} (use ns, us, ms, s, m or h)"
                    ))
                }
            };
            let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                match whole.parse() {
                    Ok(v) => v,
                    Err(_) => return bad("number too large"),
                }
            };
            let mut part = whole.checked_mul(scale);
            if !fraction.is_empty() {
                let digits = fraction.len().min(18) as u32;
                let frac: u128 = fraction[..digits as usize].parse().unwrap_or(0);
                let add = frac * scale / 10u128.pow(digits);
                part = part.and_then(|p| p.checked_add(add));
            }
            match part.and_then(|p| nanos.checked_add(p)) {
                Some(total) if total <= u64::MAX as u128 => nanos = total,
                _ => return bad("too large"),
            }
            rest = tail;
        }
        Ok(Duration(std::time::Duration::from_nanos(nanos as u64)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Decode for Duration {
    /// Istio's CRDs require every duration field to be at least 1ms.
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let text = String::decode(value, cx)?;
        match Duration::parse(&text) {
            Ok(d) if d.0 < std::time::Duration::from_millis(1) => {
                cx.error(format!("duration {text:?} must be at least 1ms"));
                None
            }
            Ok(d) if d.0.subsec_nanos() % 1_000_000 != 0 => {
                cx.error(format!(
                    "duration {text:?}: only millisecond precision is supported"
                ));
                None
            }
            Ok(d) => Some(d),
            Err(err) => {
                cx.error(err);
                None
            }
        }
    }
}

/// A regular expression in RE2 syntax that must match the whole input (as Istio documents:
/// `regex: "/api/.*"` does not match `/x/api/y`).
#[derive(Clone, Debug)]
pub struct FullRegex {
    /// The expression as written.
    pub source: String,
    compiled: regex::Regex,
}

impl FullRegex {
    /// Compiles `source` anchored at both ends.
    pub fn new(source: &str) -> Result<FullRegex, String> {
        if source.is_empty() {
            return Err("a regex must not be empty".into());
        }
        if source.len() > 1024 {
            return Err(format!(
                "a regex is limited to 1024 characters, this one has {}",
                source.len()
            ));
        }
        let compiled = compile_regex(&format!("^(?:{source})$"), source)?;
        Ok(FullRegex {
            source: source.to_string(),
            compiled,
        })
    }

    /// Whether the whole of `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        self.compiled.is_match(text)
    }
}

impl PartialEq for FullRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Decode for FullRegex {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let text = String::decode(value, cx)?;
        FullRegex::new(&text).map_err(|err| cx.error(err)).ok()
    }
}

/// Compiles `pattern` (written by the user as `source`) as RE2, refusing very large programs
/// as Envoy does; the error is one line saying what is wrong.
pub fn compile_regex(pattern: &str, source: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|err| {
            // The parser's message draws the position over several lines; its last line
            // says what is wrong.
            let text = err.to_string();
            let why = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .trim_start_matches("error: ");
            format!("invalid regex {source:?}: {why}")
        })
}

/// Istio's `StringMatch`: exactly one of `exact`, `prefix` or `regex`.
#[derive(Clone, Debug, PartialEq)]
pub enum StringMatch {
    /// The whole value equals this.
    Exact(String),
    /// The value starts with this.
    Prefix(String),
    /// The whole value matches this RE2 expression.
    Regex(FullRegex),
}

impl Default for StringMatch {
    fn default() -> Self {
        StringMatch::Prefix(String::new())
    }
}

impl StringMatch {
    /// Whether `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        match self {
            StringMatch::Exact(want) => text == want,
            StringMatch::Prefix(prefix) => text.starts_with(prefix.as_str()),
            StringMatch::Regex(re) => re.is_match(text),
        }
    }

    /// `true` for `prefix`, which Istio does not support in `queryParams`.
    pub fn is_prefix(&self) -> bool {
        matches!(self, StringMatch::Prefix(_))
    }
}

impl Decode for StringMatch {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let present: Vec<&str> = ["exact", "prefix", "regex"]
                .into_iter()
                .filter(|k| f.has(k))
                .collect();
            if present.len() != 1 {
                f.cx().error(format!(
                    "a string match needs exactly one of exact, prefix or regex, found {}",
                    if present.is_empty() {
                        "none".to_string()
                    } else {
                        present.join(" and ")
                    }
                ));
            }
            let exact = f.opt("exact").map(StringMatch::Exact);
            let prefix = f.opt("prefix").map(StringMatch::Prefix);
            let regex = f.opt("regex").map(StringMatch::Regex);
            (present.len() == 1)
                .then_some(exact.or(prefix).or(regex))
                .flatten()
        })
        .flatten()
    }
}

/// Istio's `WorkloadSelector` (`selector: {matchLabels: ...}`); an empty one selects every
/// workload of its namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct WorkloadSelector {
    /// Labels a workload must all have.
    pub match_labels: Labels,
}

/// Whether `labels` has every label of `wanted` with the same value (`matchLabels`, a
/// Service selector, a subset's labels).
pub fn labels_match(labels: &Labels, wanted: &Labels) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl WorkloadSelector {
    /// Whether a workload with `labels` is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        labels_match(labels, &self.match_labels)
    }
}

impl Decode for WorkloadSelector {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let match_labels: Labels = f.map("matchLabels");
            for (key, label) in &match_labels {
                check_label(f.cx(), "matchLabels", key, label);
            }
            WorkloadSelector { match_labels }
        })
    }
}

string_enum! {
    /// `LabelSelectorRequirement.operator`.
    SelectorOperator {
        /// The label's value is one of `values`.
        In = "In",
        /// The label is missing or its value is none of `values`.
        NotIn = "NotIn",
        /// The label is present.
        Exists = "Exists",
        /// The label is missing.
        DoesNotExist = "DoesNotExist",
    }
}

/// One `matchExpressions` item of a Kubernetes label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelectorRequirement {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: SelectorOperator,
    /// Values (for `In` and `NotIn`).
    pub values: Vec<String>,
}

impl Decode for SelectorRequirement {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let req = SelectorRequirement {
                key: f.req("key"),
                operator: f.req("operator"),
                values: f.list("values"),
            };
            let with_values =
                matches!(req.operator, SelectorOperator::In | SelectorOperator::NotIn);
            if with_values && req.values.is_empty() && f.has("operator") {
                f.error_at(
                    "values",
                    format!("{} needs at least one value", req.operator),
                );
            }
            if !with_values && !req.values.is_empty() {
                f.error_at("values", format!("{} takes no values", req.operator));
            }
            req
        })
    }
}

/// A Kubernetes `LabelSelector`: `matchLabels` and `matchExpressions`, all ANDed. An empty
/// selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    /// Exact labels.
    pub match_labels: Labels,
    /// Set-based requirements.
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    /// Whether an object with `labels` is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        labels_match(labels, &self.match_labels)
            && self.match_expressions.iter().all(|req| {
                let value = labels.get(&req.key);
                match req.operator {
                    SelectorOperator::In => value.is_some_and(|v| req.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !req.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

impl Decode for LabelSelector {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let match_labels: Labels = f.map("matchLabels");
            for (key, label) in &match_labels {
                check_label(f.cx(), "matchLabels", key, label);
            }
            LabelSelector {
                match_labels,
                match_expressions: f.list("matchExpressions"),
            }
        })
    }
}

/// Checks a label key and value against Kubernetes' rules (optional DNS prefix and `/`, then
/// a name of at most 63 characters of alphanumerics, `-`, `_`, `.`, starting and ending
/// alphanumeric; values the same or empty).
fn check_label(cx: &mut Cx, field: &str, key: &str, value: &str) {
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
    let prefix_ok = key.rsplit_once('/').is_none()
        || (!prefix.is_empty() && prefix.len() <= 253 && prefix.split('.').all(name_ok));
    cx.at(field, |cx| {
        if !prefix_ok || !name_ok(name) {
            cx.error(format!("invalid label key {key:?}"));
        }
        if !value.is_empty() && !name_ok(value) {
            cx.error(format!("invalid label value {value:?} for key {key:?}"));
        }
    });
}

/// A Kubernetes `IntOrString`: a port number or a port name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntOrString {
    /// A number.
    Int(u16),
    /// A name.
    String(String),
}

impl Decode for IntOrString {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        match value {
            Value::Number(_) => u16::decode(value, cx).map(IntOrString::Int),
            Value::String(s) if s.is_empty() => {
                cx.error("a port name must not be empty");
                None
            }
            Value::String(s) => Some(IntOrString::String(s.clone())),
            other => {
                cx.error(format!(
                    "expected a port number or name, found {}",
                    describe(other)
                ));
                None
            }
        }
    }
}

impl Decode for Ipv4Addr {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let text = String::decode(value, cx)?;
        text.parse()
            .map_err(|_| cx.error(format!("{text:?} is not an IPv4 address")))
            .ok()
    }
}

impl Decode for IpAddr {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let text = String::decode(value, cx)?;
        text.parse()
            .map_err(|_| cx.error(format!("{text:?} is not an IP address")))
            .ok()
    }
}

/// An IP network (`10.0.0.0/8`; a bare address is a /32). IPv6 networks are accepted (for
/// dual-stack configs) but never match: the mesh carries IPv4 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Default for Cidr {
    fn default() -> Self {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix: 32,
        }
    }
}

impl Cidr {
    /// Parses `address/length` or a bare address, IPv4 or IPv6.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let addr: IpAddr = text
            .split_once('/')
            .map_or(text, |(addr, _)| addr)
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = match text.split_once('/') {
            None => max,
            Some((_, len)) => len
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether IPv4 address `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let IpAddr::V4(net) = self.addr else {
            return false;
        };
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(net) & mask
    }
}

impl Decode for Cidr {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let text = String::decode(value, cx)?;
        let cidr = Cidr::parse(&text).map_err(|err| cx.error(err)).ok()?;
        if cidr.addr.is_ipv6() {
            cx.warn(format!(
                "{text:?} is IPv6; the mesh carries IPv4 only, so it never matches"
            ));
        }
        Some(cidr)
    }
}

/// Istio's `Percent`: a value between 0 and 100.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percent(pub f64);

impl Decode for Percent {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| f.opt::<f64>("value").unwrap_or(0.0))
            .and_then(|v| {
                if (0.0..=100.0).contains(&v) {
                    Some(Percent(v))
                } else {
                    cx.at("value", |cx| {
                        cx.error(format!("{v} is not between 0 and 100"))
                    });
                    None
                }
            })
    }
}

/// An AuthorizationPolicy string: exact, `prefix*`, `*suffix`, or `*` (anything present);
/// for paths also Istio's templates, `/api/{*}/info` (one segment) and `/data/{**}` (zero or
/// more segments, last only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Equal to this.
    Exact(String),
    /// Starts with this.
    Prefix(String),
    /// Ends with this.
    Suffix(String),
    /// Any non-empty value.
    Any,
    /// A path template, by segment (`{*}`, `{**}` or literal).
    Template(Vec<String>),
}

impl Pattern {
    /// Reads Istio's syntax (without checking it: see the decoder).
    pub fn parse(text: &str) -> Pattern {
        if text.contains("{*}") || text.contains("{**}") {
            Pattern::Template(text.split('/').map(str::to_string).collect())
        } else if text == "*" {
            Pattern::Any
        } else if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.to_string())
        } else if let Some(suffix) = text.strip_prefix('*') {
            Pattern::Suffix(suffix.to_string())
        } else {
            Pattern::Exact(text.to_string())
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(want) => value == want,
            Pattern::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Pattern::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Pattern::Any => !value.is_empty(),
            Pattern::Template(segments) => {
                let got: Vec<&str> = value.split('/').collect();
                let mut i = 0;
                for (n, want) in segments.iter().enumerate() {
                    match want.as_str() {
                        // Zero or more segments: the rest, whatever it is.
                        "{**}" => return n == segments.len() - 1,
                        "{*}" if got.get(i).is_some_and(|g| !g.is_empty()) => {}
                        literal if got.get(i) == Some(&literal) => {}
                        _ => return false,
                    }
                    i += 1;
                }
                i == got.len()
            }
        }
    }
}

impl Decode for Pattern {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let text = String::decode(value, cx)?;
        if text.is_empty() {
            cx.error("must not be empty");
            return None;
        }
        if text.contains("{*}") || text.contains("{**}") {
            let segments: Vec<&str> = text.split('/').collect();
            let bad = !text.starts_with('/')
                || segments.iter().enumerate().any(|(i, seg)| match *seg {
                    "{*}" => false,
                    "{**}" => i != segments.len() - 1,
                    literal => literal.contains(['*', '{', '}']),
                });
            if bad {
                cx.error(format!(
                    "{text:?}: a path template starts with `/`, uses `{{*}}` for one segment and \
                     `{{**}}` only as the last segment, and no other `*`"
                ));
                return None;
            }
            return Some(Pattern::parse(&text));
        }
        let inner = text.strip_prefix('*').unwrap_or(&text);
        let inner = inner.strip_suffix('*').unwrap_or(inner);
        if text != "*" && inner.contains('*') {
            cx.error(format!(
                "{text:?}: `*` is only allowed at the start or the end (or alone)"
            ));
            return None;
        }
        Some(Pattern::parse(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode<T: Decode>(yaml: &str) -> Result<T, String> {
        match crate::decode::decode_yaml::<T>(yaml) {
            (Some(v), errors) if errors.is_empty() => Ok(v),
            (_, errors) => Err(errors.join("; ")),
        }
    }

    #[test]
    fn durations_follow_go_syntax() {
        let ms = |n: u64| Duration(std::time::Duration::from_millis(n));
        let table = [
            ("2s", Ok(ms(2000))),
            ("1.5s", Ok(ms(1500))),
            ("300ms", Ok(ms(300))),
            ("1h30m", Ok(ms(5_400_000))),
            ("1m0.25s", Ok(ms(60_250))),
            (".5s", Ok(ms(500))),
            (
                "1500us",
                Ok(Duration(std::time::Duration::from_micros(1500))),
            ),
        ];
        for (text, want) in table {
            assert_eq!(Duration::parse(text), want, "{text}");
        }
        for bad in [
            "",
            "5",
            "-1s",
            "1.2.3s",
            "s",
            "1d",
            "1 s",
            "2sec",
            "99999999999999h",
        ] {
            assert!(Duration::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(Duration::parse("0"), Ok(Duration::default()));
        // Istio's CRDs want at least 1ms in every duration field.
        assert!(decode::<Duration>("500us")
            .unwrap_err()
            .contains("at least 1ms"));
        assert!(decode::<Duration>("0s").is_err());
        assert!(decode::<Duration>("1500us")
            .unwrap_err()
            .contains("millisecond precision"));
        assert!(decode::<Duration>("10")
            .unwrap_err()
            .contains("expected a string"));
    }

    #[test]
    fn durations_round_trip_through_every_unit_combination() {
        // A property over a grid of values: h/m/s/ms components, printed the way people
        // write them, parse back to the same total.
        for h in [0u64, 1, 25] {
            for m in [0u64, 1, 59] {
                for s in [0u64, 1, 30] {
                    for ms in [0u64, 1, 250, 999] {
                        let mut text = String::new();
                        for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
                            if n > 0 {
                                text.push_str(&format!("{n}{unit}"));
                            }
                        }
                        if text.is_empty() {
                            continue;
                        }
                        let want = ((h * 60 + m) * 60 + s) * 1000 + ms;
                        let got = Duration::parse(&text).unwrap();
                        assert_eq!(got.0.as_millis() as u64, want, "{text}");
                        // The same total as fractional seconds.
                        let seconds = format!("{}.{:03}s", want / 1000, want % 1000);
                        assert_eq!(Duration::parse(&seconds), Ok(got), "{seconds}");
                    }
                }
            }
        }
    }

    #[test]
    fn regex_is_an_anchored_full_match() {
        let re = FullRegex::new("/api/.*").unwrap();
        assert!(re.is_match("/api/v1"));
        assert!(!re.is_match("/x/api/v1"), "must be anchored at the start");
        let chrome = FullRegex::new(".*Chrome.*").unwrap();
        assert!(chrome.is_match("Mozilla/5.0 Chrome/120"));
        let alt = FullRegex::new("a|b").unwrap();
        assert!(alt.is_match("a") && alt.is_match("b"));
        assert!(!alt.is_match("ab"), "alternation is anchored as a whole");
        assert!(!FullRegex::new("v1").unwrap().is_match("v10"));
        assert!(FullRegex::new("(").is_err());
        // RE2 has no backreferences or lookaround.
        assert!(FullRegex::new(r"(a)\1").is_err());
        assert!(FullRegex::new("(?=a)").is_err());
    }

    #[test]
    fn string_match_needs_exactly_one_form() {
        let m: StringMatch = decode("{prefix: /api}").unwrap();
        assert!(m.matches("/api/x") && !m.matches("/ap"));
        let m: StringMatch = decode("{exact: GET}").unwrap();
        assert!(m.matches("GET") && !m.matches("GETX"));
        let m: StringMatch = decode("{regex: 'v[12]'}").unwrap();
        assert!(m.matches("v2") && !m.matches("v21"));
        assert!(decode::<StringMatch>("{}")
            .unwrap_err()
            .contains("found none"));
        assert!(decode::<StringMatch>("{exact: a, prefix: b}")
            .unwrap_err()
            .contains("found exact and prefix"));
        assert!(decode::<StringMatch>("{regex: '['}")
            .unwrap_err()
            .contains("regex: invalid regex"));
    }

    #[test]
    fn label_selectors_match_as_kubernetes_does() {
        let labels: Labels = [("app", "web"), ("version", "v1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cases = [
            ("{}", true),
            ("{matchLabels: {app: web}}", true),
            ("{matchLabels: {app: web, version: v2}}", false),
            (
                "{matchExpressions: [{key: version, operator: In, values: [v1, v2]}]}",
                true,
            ),
            (
                "{matchExpressions: [{key: version, operator: NotIn, values: [v1]}]}",
                false,
            ),
            (
                "{matchExpressions: [{key: tier, operator: NotIn, values: [db]}]}",
                true,
            ),
            ("{matchExpressions: [{key: app, operator: Exists}]}", true),
            (
                "{matchExpressions: [{key: app, operator: DoesNotExist}]}",
                false,
            ),
            (
                "{matchLabels: {app: web}, matchExpressions: [{key: tier, operator: Exists}]}",
                false,
            ),
        ];
        for (yaml, want) in cases {
            let selector: LabelSelector = decode(yaml).unwrap();
            assert_eq!(selector.matches(&labels), want, "{yaml}");
        }
        let workload: WorkloadSelector = decode("{matchLabels: {app: web}}").unwrap();
        assert!(workload.matches(&labels));
        assert!(WorkloadSelector::default().matches(&labels));
        assert!(
            decode::<LabelSelector>("{matchExpressions: [{key: a, operator: In}]}")
                .unwrap_err()
                .contains("needs at least one value")
        );
        assert!(
            decode::<LabelSelector>("{matchExpressions: [{key: a, operator: Has}]}")
                .unwrap_err()
                .contains("expected one of In, NotIn, Exists, DoesNotExist")
        );
        assert!(decode::<LabelSelector>("{matchLabels: {'bad key!': x}}")
            .unwrap_err()
            .contains("invalid label key"));
    }

    #[test]
    fn ports_by_number_or_name_and_cidrs() {
        assert_eq!(decode::<IntOrString>("8080"), Ok(IntOrString::Int(8080)));
        assert_eq!(
            decode::<IntOrString>("http"),
            Ok(IntOrString::String("http".into()))
        );
        assert!(decode::<IntOrString>("70000").is_err());
        let cidr = Cidr::parse("100.64.0.0/10").unwrap();
        assert!(cidr.contains("100.127.1.1".parse().unwrap()));
        assert!(!cidr.contains("100.128.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("1.2.3.4/33").is_err());
        let v6 = Cidr::parse("::/0").unwrap();
        assert!(
            !v6.contains("1.2.3.4".parse().unwrap()),
            "IPv6 never matches"
        );
        assert!(Cidr::parse("fd00::/129").is_err());
    }

    #[test]
    fn authorization_patterns() {
        let p = |s: &str| Pattern::parse(s);
        assert!(p("cluster.local/ns/default/sa/api").matches("cluster.local/ns/default/sa/api"));
        assert!(p("cluster.local/ns/default/*").matches("cluster.local/ns/default/sa/x"));
        assert!(p("*/sa/admin").matches("td/ns/a/sa/admin"));
        assert!(p("*").matches("x") && !p("*").matches(""));
        assert!(decode::<Pattern>("'a*b'").is_err());
        // Multi-byte characters at either end must not trip the `*` check.
        assert_eq!(
            decode::<Pattern>("/café"),
            Ok(Pattern::Exact("/café".into()))
        );
        assert_eq!(decode::<Pattern>("é*"), Ok(Pattern::Prefix("é".into())));
        let one = decode::<Pattern>("'/api/{*}/info'").unwrap();
        assert!(one.matches("/api/v1/info") && !one.matches("/api/v1/x/info"));
        assert!(!one.matches("/api//info"));
        let rest = decode::<Pattern>("'/data/{**}'").unwrap();
        assert!(rest.matches("/data/a/b/c") && rest.matches("/data/") && !rest.matches("/other/a"));
        assert!(decode::<Pattern>("'/data/{**}/x'").is_err());
        assert!(decode::<Pattern>("'/a*/{*}'").is_err());
    }
}
