//! Trace context in HTTP headers: W3C trace context (`traceparent`, `tracestate`) and B3,
//! both the multi-header form (`x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`,
//! `x-b3-sampled`, `x-b3-flags`) and the single `b3` header. A request's context is read in
//! that order of preference; the proxy's own span becomes the parent of what it forwards, in
//! the format the request came with (W3C for a request that carried none).

use http::{HeaderMap, HeaderName, HeaderValue};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// How a request carried its trace context (and how it is forwarded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// `traceparent` (and `tracestate`).
    #[default]
    W3c,
    /// `x-b3-*` headers.
    B3Multi,
    /// One `b3` header.
    B3Single,
}

/// What a request said about its trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The trace; `None` when the request only carried a sampling decision (`b3: 0`).
    pub trace: Option<([u8; 16], [u8; 8])>,
    /// The caller's decision, if it made one.
    pub sampled: Option<bool>,
    /// The header format.
    pub format: Format,
    /// B3 with a 64-bit trace id: forwarded as 64 bits.
    pub short_trace_id: bool,
    /// W3C `tracestate`, passed on unchanged.
    pub tracestate: Option<HeaderValue>,
}

/// One span's place in its trace, as the proxy forwards it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanContext {
    /// The trace.
    pub trace_id: [u8; 16],
    /// This span.
    pub span_id: [u8; 8],
    /// The span it is a child of (the caller's), if any.
    pub parent: Option<[u8; 8]>,
    /// Whether the trace is sampled (spans reported).
    pub sampled: bool,
    /// The header format it is forwarded in.
    pub format: Format,
    /// See [`Incoming::short_trace_id`].
    pub short_trace_id: bool,
    /// See [`Incoming::tracestate`].
    pub tracestate: Option<HeaderValue>,
}

impl SpanContext {
    /// A span for a request that arrived with `incoming` (or none): a child of the caller's
    /// span in the same trace, or the root of a new trace. The caller's sampling decision
    /// wins; without one the request is sampled when `draw` (uniform in [0, 100)) falls below
    /// `percentage`.
    pub fn start(incoming: Option<Incoming>, percentage: f64, draw: f64) -> SpanContext {
        let incoming = incoming.unwrap_or(Incoming {
            trace: None,
            sampled: None,
            format: Format::W3c,
            short_trace_id: false,
            tracestate: None,
        });
        let sampled = incoming.sampled.unwrap_or(draw < percentage);
        let (trace_id, parent) = match incoming.trace {
            Some((trace, span)) => (trace, Some(span)),
            None => (random_trace_id(), None),
        };
        SpanContext {
            trace_id,
            span_id: random_span_id(),
            parent,
            sampled,
            format: incoming.format,
            short_trace_id: incoming.short_trace_id && incoming.trace.is_some(),
            tracestate: incoming.tracestate,
        }
    }

    /// A child of this span in the same trace (the client span of a request this span's
    /// server side forwards).
    pub fn child(&self) -> SpanContext {
        SpanContext {
            span_id: random_span_id(),
            parent: Some(self.span_id),
            ..self.clone()
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// Replaces whatever trace headers `headers` has with this span as the parent, in its
    /// format.
    pub fn inject(&self, headers: &mut HeaderMap) {
        for name in [
            TRACEPARENT,
            TRACESTATE,
            B3,
            B3_TRACE_ID,
            B3_SPAN_ID,
            B3_PARENT,
            B3_SAMPLED,
            B3_FLAGS,
        ] {
            headers.remove(name);
        }
        let trace = if self.short_trace_id {
            hex(&self.trace_id[8..])
        } else {
            hex(&self.trace_id)
        };
        let span = hex(&self.span_id);
        let flag = if self.sampled { "1" } else { "0" };
        let mut put = |name: HeaderName, value: String| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        };
        match self.format {
            Format::W3c => {
                put(TRACEPARENT, format!("00-{trace}-{span}-0{flag}"));
                if let Some(state) = &self.tracestate {
                    headers.insert(TRACESTATE, state.clone());
                }
            }
            Format::B3Single => match self.parent {
                Some(parent) => put(B3, format!("{trace}-{span}-{flag}-{}", hex(&parent))),
                None => put(B3, format!("{trace}-{span}-{flag}")),
            },
            Format::B3Multi => {
                put(B3_TRACE_ID, trace);
                put(B3_SPAN_ID, span);
                if let Some(parent) = self.parent {
                    put(B3_PARENT, hex(&parent));
                }
                put(B3_SAMPLED, flag.to_string());
            }
        }
    }
}

/// The trace context of a request, from its headers; `None` when it has none (or only
/// malformed ones, which are ignored as the specifications say).
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    w3c(headers)
        .or_else(|| b3_single(headers))
        .or_else(|| b3_multi(headers))
}

fn text<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn w3c(headers: &HeaderMap) -> Option<Incoming> {
    let value = text(headers, &TRACEPARENT)?;
    let mut parts = value.split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; a later version may add fields after them.
    let rest = parts.next();
    if version.len() != 2 || version == "ff" || (version == "00" && rest.is_some()) {
        return None;
    }
    let trace: [u8; 16] = unhex(trace)?;
    let span: [u8; 8] = unhex(span)?;
    let flags: [u8; 1] = unhex(flags)?;
    let _: [u8; 1] = unhex(version)?;
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some(Incoming {
        trace: Some((trace, span)),
        sampled: Some(flags[0] & 1 == 1),
        format: Format::W3c,
        short_trace_id: false,
        tracestate: tracestate(headers),
    })
}

/// The `tracestate` of `headers`, its header fields combined in order (W3C: a request may
/// carry several).
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut fields = headers.get_all(TRACESTATE).iter();
    let first = fields.next()?;
    let rest: Vec<&HeaderValue> = fields.collect();
    if rest.is_empty() {
        return Some(first.clone());
    }
    let mut combined = first.as_bytes().to_vec();
    for field in rest {
        combined.push(b',');
        combined.extend_from_slice(field.as_bytes());
    }
    HeaderValue::from_bytes(&combined).ok()
}

/// A B3 span id: 16 hex digits, not all zero.
fn b3_span_id(text: &str) -> Option<[u8; 8]> {
    unhex::<8>(text).filter(|s| *s != [0; 8])
}

/// A B3 trace id: 16 or 32 hex digits (64-bit ids are padded on the left).
fn b3_trace_id(text: &str) -> Option<([u8; 16], bool)> {
    match text.len() {
        32 => unhex(text).map(|t| (t, false)),
        16 => {
            let low: [u8; 8] = unhex(text)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            Some((id, true))
        }
        _ => None,
    }
    .filter(|(t, _)| *t != [0; 16])
}

fn b3_sampled(text: &str) -> Option<Option<bool>> {
    match text {
        "1" | "true" | "d" => Some(Some(true)),
        "0" | "false" => Some(Some(false)),
        _ => None,
    }
}

fn b3_single(headers: &HeaderMap) -> Option<Incoming> {
    let value = text(headers, &B3)?;
    let parts: Vec<&str> = value.split('-').collect();
    let only_decision = |sampled| Incoming {
        trace: None,
        sampled,
        format: Format::B3Single,
        short_trace_id: false,
        tracestate: None,
    };
    if parts.len() == 1 {
        return b3_sampled(parts[0]).map(only_decision);
    }
    let (trace, short) = b3_trace_id(parts[0])?;
    let span = b3_span_id(parts[1])?;
    let sampled = match parts.get(2) {
        Some(flag) => b3_sampled(flag)?,
        None => None,
    };
    if parts.len() > 4 || (parts.len() == 4 && unhex::<8>(parts[3]).is_none()) {
        return None;
    }
    Some(Incoming {
        trace: Some((trace, span)),
        sampled,
        format: Format::B3Single,
        short_trace_id: short,
        tracestate: None,
    })
}

fn b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let debug = text(headers, &B3_FLAGS) == Some("1");
    let sampled = match text(headers, &B3_SAMPLED) {
        _ if debug => Some(true),
        Some(flag) => b3_sampled(flag).flatten(),
        None => None,
    };
    let trace = text(headers, &B3_TRACE_ID).and_then(b3_trace_id);
    let span = text(headers, &B3_SPAN_ID).and_then(b3_span_id);
    match (trace, span) {
        (Some((trace, short)), Some(span)) => Some(Incoming {
            trace: Some((trace, span)),
            sampled,
            format: Format::B3Multi,
            short_trace_id: short,
            tracestate: None,
        }),
        // A decision alone (`x-b3-sampled: 0`) is honoured for a new trace.
        _ if sampled.is_some() && trace.is_none() => Some(Incoming {
            trace: None,
            sampled,
            format: Format::B3Multi,
            short_trace_id: false,
            tracestate: None,
        }),
        _ => None,
    }
}

/// `N` bytes from exactly `2N` lowercase or uppercase hex digits.
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn random_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn w3c_is_joined_and_forwarded_with_the_proxy_as_parent() {
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let incoming = extract(&h).unwrap();
        assert_eq!(incoming.sampled, Some(true));
        let span = SpanContext::start(Some(incoming), 0.0, 99.0);
        assert!(span.sampled, "the caller's decision wins over 0%");
        assert_eq!(span.trace_hex(), TRACE);
        assert_eq!(span.parent.map(|p| hex(&p)).as_deref(), Some(SPAN));
        let mut out = headers(&[("x-b3-traceid", TRACE)]);
        span.inject(&mut out);
        assert_eq!(
            out["traceparent"],
            format!("00-{TRACE}-{}-01", span.span_hex()).as_str()
        );
        assert_eq!(out["tracestate"], "congo=t61rcWkgMzE");
        assert!(out.get("x-b3-traceid").is_none(), "one format out");
        // Not sampled upstream: not sampled here, whatever the percentage.
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]);
        assert!(!SpanContext::start(extract(&h), 100.0, 0.0).sampled);
    }

    #[test]
    fn malformed_w3c_is_ignored() {
        for bad in [
            format!("00-{TRACE}-{SPAN}"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("00-{}-{SPAN}-01", &TRACE[..30]),
            format!("00-{TRACE}-{SPAN}-0g"),
        ] {
            assert_eq!(extract(&headers(&[("traceparent", &bad)])), None, "{bad}");
        }
        // A later version may carry more fields.
        let later = format!("01-{TRACE}-{SPAN}-01-future");
        assert!(extract(&headers(&[("traceparent", &later)])).is_some());
    }

    #[test]
    fn several_tracestate_fields_are_combined_in_order() {
        let mut h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        h.append("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
        h.append(
            "tracestate",
            HeaderValue::from_static("rojo=00f067aa0ba902b7"),
        );
        let span = SpanContext::start(extract(&h), 0.0, 0.0);
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        let forwarded: Vec<&HeaderValue> = out.get_all("tracestate").iter().collect();
        assert_eq!(forwarded, ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]);
    }

    #[test]
    fn a_b3_span_id_of_zeros_is_malformed() {
        let zeros = "0".repeat(16);
        assert_eq!(
            extract(&headers(&[("b3", &format!("{TRACE}-{zeros}-1"))])),
            None
        );
        assert_eq!(
            extract(&headers(&[
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", &zeros),
                ("x-b3-sampled", "1"),
            ])),
            None
        );
    }

    #[test]
    fn b3_single_and_multi_round_trip_in_their_own_format() {
        let single = headers(&[("b3", &format!("{TRACE}-{SPAN}-1"))]);
        let span = SpanContext::start(extract(&single), 0.0, 50.0);
        assert!(span.sampled);
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        assert_eq!(
            out["b3"],
            format!("{TRACE}-{}-1-{SPAN}", span.span_hex()).as_str()
        );
        let multi = headers(&[
            ("x-b3-traceid", &TRACE[16..]),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
        ]);
        let span = SpanContext::start(extract(&multi), 100.0, 0.0);
        assert!(!span.sampled);
        assert!(span.short_trace_id);
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        assert_eq!(out["x-b3-traceid"], &TRACE[16..]);
        assert_eq!(out["x-b3-parentspanid"], SPAN);
        assert_eq!(out["x-b3-sampled"], "0");
        assert!(out.get("traceparent").is_none());
        // Debug forces sampling; a bare decision starts a new trace with it.
        let debug = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]);
        assert_eq!(extract(&debug).unwrap().sampled, Some(true));
        let deny = SpanContext::start(extract(&headers(&[("b3", "0")])), 100.0, 0.0);
        assert!(!deny.sampled && deny.parent.is_none());
    }

    #[test]
    fn without_context_the_percentage_decides_and_a_new_trace_starts() {
        let span = SpanContext::start(None, 10.0, 9.99);
        assert!(span.sampled && span.parent.is_none());
        assert_eq!(span.format, Format::W3c);
        assert!(!SpanContext::start(None, 10.0, 10.0).sampled);
        assert!(!SpanContext::start(None, 0.0, 0.0).sampled);
        let child = span.child();
        assert_eq!(
            (child.trace_id, child.parent),
            (span.trace_id, Some(span.span_id))
        );
    }
}
