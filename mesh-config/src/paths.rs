//! Request paths as routing and policy see them and as the backend receives them: Istio's
//! path normalization modes (MeshConfig `pathNormalization`), the `%00` and malformed-escape
//! refusals, and what counts as an ambiguous path where AuthorizationPolicy matches paths.
//!
//! The steps, in Istio's order: (1) with `DECODE_AND_MERGE_SLASHES`, decode `%2F` and `%5C`;
//! (2) from `BASE` on, RFC 3986 section 6.2.2 (decode percent-encoded unreserved characters,
//! upper-case the hex digits of the other escapes, remove `.` and `..` segments) and turn
//! backslashes into slashes; (3) from `MERGE_SLASHES` on, merge repeated slashes. Each
//! escape is decoded once (`%252F` stays `%252F`); the query string is never touched.

use std::{borrow::Cow, fmt, str::FromStr};

/// How request paths are normalized (Istio's MeshConfig `pathNormalization.normalization`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Normalization {
    /// Forwarded as received (dot segments and escapes included).
    None,
    /// RFC 3986 and backslashes as slashes: Istio's default.
    Base,
    /// `BASE`, then repeated slashes merged.
    MergeSlashes,
    /// `%2F` and `%5C` decoded, then `MERGE_SLASHES`: this mesh's default.
    #[default]
    DecodeAndMergeSlashes,
}

impl Normalization {
    /// Every mode, by its Istio name.
    pub const ALL: [(&'static str, Normalization); 4] = [
        ("NONE", Normalization::None),
        ("BASE", Normalization::Base),
        ("MERGE_SLASHES", Normalization::MergeSlashes),
        (
            "DECODE_AND_MERGE_SLASHES",
            Normalization::DecodeAndMergeSlashes,
        ),
    ];
}

impl fmt::Display for Normalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Normalization::ALL
            .iter()
            .find(|(_, mode)| mode == self)
            .map_or("?", |(name, _)| name);
        f.write_str(name)
    }
}

impl FromStr for Normalization {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let wanted = text.replace('-', "_");
        Normalization::ALL
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(&wanted))
            .map(|(_, mode)| *mode)
            .ok_or_else(|| {
                let names: Vec<_> = Normalization::ALL.iter().map(|(name, _)| *name).collect();
                format!(
                    "unknown path normalization {text:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The mesh-wide path settings: the normalization mode and, beyond Istio, whether ambiguous
/// paths ([`ambiguity`]) are refused (400) on ports where AuthorizationPolicy matches paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PathSettings {
    /// How paths are normalized.
    pub normalization: Normalization,
    /// Refuse ambiguous paths where policy matches paths.
    pub reject_ambiguous: bool,
}

impl Default for PathSettings {
    fn default() -> Self {
        PathSettings {
            normalization: Normalization::default(),
            reject_ambiguous: true,
        }
    }
}

/// Why a path cannot be served at all (answered 400 in every mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// `%00`: a NUL byte, which C backends take for the path's end.
    Nul,
    /// A `%` not followed by two hex digits: no two servers agree on what it means.
    Escape,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::Nul => "the path carries %00 (an encoded NUL)",
            Malformed::Escape => "the path carries a % that starts no %HH escape",
        })
    }
}

/// `path` normalized under `mode`; borrowed when nothing changes.
pub fn normalize(path: &str, mode: Normalization) -> Result<Cow<'_, str>, Malformed> {
    check_escapes(path)?;
    // `*` (OPTIONS) and authority-form targets have no path to normalize.
    if mode == Normalization::None || !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let decode_slashes = mode == Normalization::DecodeAndMergeSlashes;
    let merge = mode != Normalization::Base;
    // (1) and (2): one pass over the escapes, so each is decoded at most once.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = &path[i + 1..i + 3];
                let byte = u8::from_str_radix(hex, 16).map_err(|_| Malformed::Escape)?;
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(byte as char);
                } else if decode_slashes && matches!(byte, b'/' | b'\\') {
                    decoded.push('/');
                } else {
                    decoded.push('%');
                    decoded.push_str(&hex.to_ascii_uppercase());
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            _ => {
                // Copy the run up to the next byte of interest whole (keeps UTF-8 intact).
                let end = bytes[i..]
                    .iter()
                    .position(|b| matches!(b, b'%' | b'\\'))
                    .map_or(bytes.len(), |n| i + n);
                decoded.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    // (2) dot segments, and (3) repeated slashes.
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (n, segment) in segments.iter().enumerate() {
        match *segment {
            "." | ".." => {
                if *segment == ".." && out.len() > 1 {
                    out.pop();
                }
                if n == last {
                    out.push("");
                }
            }
            "" if merge && n != 0 && n != last => {}
            s => out.push(s),
        }
    }
    let mut joined = out.join("/");
    if !joined.starts_with('/') {
        joined.insert(0, '/');
    }
    Ok(if joined == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(joined)
    })
}

/// What makes an already normalized path ambiguous (servers disagree on what it names), for
/// ports where AuthorizationPolicy matches paths: anything the strictest mode would still
/// change (an encoded slash or backslash, a repeated slash, a dot segment, a backslash, an
/// escape of an unreserved character) and `;` path parameters, which many servers strip
/// (`/admin;jsessionid=1` is `/admin` to a Java servlet container). `path` was normalized
/// under `mode`: under the strictest one, normalizing again changes nothing (it is
/// idempotent), so only `;` is looked for.
pub fn ambiguity(path: &str, mode: Normalization) -> Option<&'static str> {
    if path.contains(';') {
        return Some("a path parameter (;)");
    }
    if mode == Normalization::DecodeAndMergeSlashes {
        return None;
    }
    match normalize(path, Normalization::DecodeAndMergeSlashes) {
        Ok(strict) if strict == path => None,
        Ok(_) => Some(
            "an encoded slash or backslash, a repeated slash, a dot segment, a backslash or an \
             escaped unreserved character",
        ),
        Err(_) => Some("a malformed escape"),
    }
}

fn check_escapes(path: &str) -> Result<(), Malformed> {
    let bytes = path.as_bytes();
    let mut i = 0;
    while let Some(n) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + n;
        let hex = bytes.get(at + 1..at + 3).ok_or(Malformed::Escape)?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err(Malformed::Escape);
        }
        if hex == b"00" {
            return Err(Malformed::Nul);
        }
        i = at + 3;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use Normalization::{Base, DecodeAndMergeSlashes as Strict, MergeSlashes, None as Raw};

    #[test]
    fn each_mode_normalizes_as_istio_documents() {
        // (path, NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
        for (raw, none, base, merge, strict) in [
            ("/a/b", "/a/b", "/a/b", "/a/b", "/a/b"),
            (
                "/public/../admin",
                "/public/../admin",
                "/admin",
                "/admin",
                "/admin",
            ),
            ("/a/./b/.", "/a/./b/.", "/a/b/", "/a/b/", "/a/b/"),
            ("/../../x", "/../../x", "/x", "/x", "/x"),
            ("/%61dmin", "/%61dmin", "/admin", "/admin", "/admin"),
            (
                "/%2e%2e/admin",
                "/%2e%2e/admin",
                "/admin",
                "/admin",
                "/admin",
            ),
            ("/a/b/..", "/a/b/..", "/a/", "/a/", "/a/"),
            ("/", "/", "/", "/", "/"),
            ("*", "*", "*", "*", "*"),
            // The variants of a DENY on /admin and /admin/*.
            ("//admin", "//admin", "//admin", "/admin", "/admin"),
            (
                "/admin%2Fx",
                "/admin%2Fx",
                "/admin%2Fx",
                "/admin%2Fx",
                "/admin/x",
            ),
            (
                "/admin%2fx",
                "/admin%2fx",
                "/admin%2Fx",
                "/admin%2Fx",
                "/admin/x",
            ),
            ("/%2Fadmin", "/%2Fadmin", "/%2Fadmin", "/%2Fadmin", "/admin"),
            (
                "/admin%5Cx",
                "/admin%5Cx",
                "/admin%5Cx",
                "/admin%5Cx",
                "/admin/x",
            ),
            ("/admin\\x", "/admin\\x", "/admin/x", "/admin/x", "/admin/x"),
            (
                "/admin;jsessionid=1",
                "/admin;jsessionid=1",
                "/admin;jsessionid=1",
                "/admin;jsessionid=1",
                "/admin;jsessionid=1",
            ),
            // Decoded once: an encoded percent stays encoded.
            ("/%252F", "/%252F", "/%252F", "/%252F", "/%252F"),
            ("/a//b//", "/a//b//", "/a//b//", "/a/b/", "/a/b/"),
            ("/a/%2F/../b", "/a/%2F/../b", "/a/b", "/a/b", "/b"),
            (
                "/caf\u{e9}/%3f",
                "/caf\u{e9}/%3f",
                "/caf\u{e9}/%3F",
                "/caf\u{e9}/%3F",
                "/caf\u{e9}/%3F",
            ),
        ] {
            for (mode, want) in [
                (Raw, none),
                (Base, base),
                (MergeSlashes, merge),
                (Strict, strict),
            ] {
                assert_eq!(normalize(raw, mode).unwrap(), want, "{raw} under {mode}");
            }
        }
    }

    #[test]
    fn nul_and_malformed_escapes_are_refused_in_every_mode() {
        for mode in [Raw, Base, MergeSlashes, Strict] {
            assert_eq!(normalize("/a%00b", mode), Err(Malformed::Nul));
            for bad in ["/a%", "/a%2", "/a%zz", "/%%32F"] {
                assert_eq!(normalize(bad, mode), Err(Malformed::Escape), "{bad}");
            }
        }
    }

    #[test]
    fn ambiguous_paths_are_what_the_strict_mode_would_still_change() {
        assert_eq!(ambiguity("/admin/x", Base), None);
        assert_eq!(ambiguity("/a%3Fb", Base), None);
        for path in [
            "/admin;jsessionid=1",
            "//admin",
            "/admin%2Fx",
            "/a/../b",
            "/a\\b",
            "/%61",
        ] {
            assert!(ambiguity(path, Base).is_some(), "{path}");
        }
    }

    #[test]
    fn modes_parse_by_their_istio_names() {
        assert_eq!("DECODE_AND_MERGE_SLASHES".parse(), Ok(Strict));
        assert_eq!("merge-slashes".parse(), Ok(MergeSlashes));
        assert_eq!(Base.to_string(), "BASE");
        let err = "STRICT".parse::<Normalization>().unwrap_err();
        assert!(
            err.contains("NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES"),
            "{err}"
        );
        assert_eq!(PathSettings::default().normalization, Strict);
    }

    /// Paths built from the characters that matter to normalization.
    fn paths() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/"),
            Just("//"),
            Just("."),
            Just(".."),
            Just("\\"),
            Just(";"),
            Just("a"),
            Just("admin"),
            Just("%"),
            Just("%2"),
            Just("%2F"),
            Just("%2f"),
            Just("%5C"),
            Just("%2e"),
            Just("%25"),
            Just("%00"),
            Just("%61"),
            Just("%3F"),
            Just("\u{e9}"),
            Just("~"),
            Just("-"),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    proptest! {
        // CI runs the default 256 cases per test; `PROPTEST_CASES=1000000 cargo test -p
        // mesh-config --release paths::` runs a million (docs/traffic.md).
        #[test]
        fn normalization_never_panics_and_is_idempotent(path in paths()) {
            for mode in [Raw, Base, MergeSlashes, Strict] {
                if let Ok(once) = normalize(&path, mode) {
                    let twice = normalize(&once, mode).expect("a normalized path stays well formed");
                    prop_assert_eq!(&twice, &once, "{} under {}", path, mode);
                    prop_assert!(once.starts_with('/'));
                    if mode == Strict {
                        prop_assert!(!once.contains("//") && !once.contains('\\'));
                        // What the strict mode leaves is ambiguous only by its `;`, whichever
                        // mode the caller says it came from.
                        for said in [Raw, Base, MergeSlashes, Strict] {
                            prop_assert_eq!(ambiguity(&once, said).is_some(), once.contains(';'));
                        }
                    }
                }
            }
        }
    }
}
