//! Taking the credential value (and its usual encodings) out of what an upstream returns.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use zeroize::Zeroizing;

/// What replaces each occurrence.
pub(crate) const REDACTED: &[u8] = b"[REDACTED]";

/// Base64 runs shorter than this are not searched for out of alignment (too many false
/// positives); the full encodings always are.
const MIN_SHIFTED_B64: usize = 8;

/// The byte strings to remove: the value itself, every injected rendering of it, and their
/// percent-encoded, form-encoded, base64 (standard and URL-safe, padded or not, at each of
/// the three byte alignments), hex, JSON-escaped (as the common serializers escape) and
/// HTML-escaped forms; and the value as text with any of its characters escaped
/// ([`Spelled`]). Zeroized on drop.
pub(crate) struct Needles {
    fixed: Vec<Zeroizing<Vec<u8>>>,
    spelled: Option<Spelled>,
}

impl Needles {
    /// Needles for `value` and the strings it was injected as (`extra`, e.g. the header
    /// value `Bearer …` or `user:value` before base64): a plain echo of those comes back as
    /// `Bearer [REDACTED]`.
    pub(crate) fn new(value: &[u8], extra: &[&[u8]]) -> Self {
        let mut out: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut push = |n: Vec<u8>| {
            let n = Zeroizing::new(n);
            if !n.is_empty() && !out.iter().any(|o| **o == *n) {
                out.push(n);
            }
        };
        // The injected renderings (`Bearer …`, `user:…`) hold the value, so their plain,
        // percent-encoded and JSON forms hold its forms; only their base64 forms differ.
        for s in extra {
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                push(engine.encode(s).into_bytes());
            }
        }
        {
            let s = value;
            push(s.to_vec());
            // Lower-cased too: HTTP/2 and hyper lower-case header names, so a value echoed
            // into a header's name comes back that way.
            push(s.to_ascii_lowercase());
            // Upper-cased (error messages that shout what they were sent).
            push(s.to_ascii_uppercase());
            for style in PercentStyle::ALL {
                push(percent(s, style));
            }
            // Encoded twice (a URL carried inside another URL's query).
            let once = Zeroizing::new(percent(s, PercentStyle::ALL[0]));
            push(percent(&once, PercentStyle::ALL[0]));
            push(hex::encode(s).into_bytes());
            push(hex::encode_upper(s).into_bytes());
            if let Ok(text) = std::str::from_utf8(s) {
                for style in JsonStyle::ALL {
                    push(json_escaped(text, style));
                }
                // JSON inside a JSON string (an error body quoting a request body).
                let once = Zeroizing::new(json_escaped(text, JsonStyle::ALL[0]));
                if let Ok(once) = std::str::from_utf8(&once) {
                    push(json_escaped(once, JsonStyle::ALL[0]));
                }
                for style in HtmlStyle::ALL {
                    push(html_escaped(text, style));
                }
                // UTF-16, either byte order (a text answer in a charset the service asked
                // for, or a Windows service's default).
                push(text.encode_utf16().flat_map(u16::to_le_bytes).collect());
                push(text.encode_utf16().flat_map(u16::to_be_bytes).collect());
            }
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                push(engine.encode(s).into_bytes());
            }
            // Embedded in a longer base64 string, the value's bytes start at offset 0, 1 or 2
            // of a 3-byte group: the characters that depend only on the value are those of
            // the whole groups after the first partial one.
            for skip in 1..3 {
                if s.len() > skip {
                    let rest = &s[skip..];
                    let whole = &rest[..rest.len() - rest.len() % 3];
                    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
                        let enc = engine.encode(whole);
                        if enc.len() >= MIN_SHIFTED_B64 {
                            push(enc.into_bytes());
                        }
                    }
                }
            }
            let whole = &s[..s.len() - s.len() % 3];
            let enc = STANDARD_NO_PAD.encode(whole);
            if enc.len() >= MIN_SHIFTED_B64 {
                push(enc.into_bytes());
                push(URL_SAFE_NO_PAD.encode(whole).into_bytes());
            }
        }
        // Longest first, so a long form is replaced whole before a shorter one inside it.
        out.sort_by_key(|n| std::cmp::Reverse(n.len()));
        Self {
            fixed: out,
            spelled: Spelled::new(value),
        }
    }

    /// `haystack` with every needle replaced by [`REDACTED`]; `true` when anything was.
    pub(crate) fn scrub(&self, haystack: &[u8]) -> (Vec<u8>, bool) {
        // The escaped text first: whole, before a fixed form takes a piece of it.
        let (mut current, mut changed) = match &self.spelled {
            Some(spelled) => spelled.scrub(haystack),
            None => (haystack.to_vec(), false),
        };
        for needle in &self.fixed {
            let finder = memchr::memmem::Finder::new(needle.as_slice());
            if finder.find(&current).is_none() {
                continue;
            }
            changed = true;
            let mut next = Vec::with_capacity(current.len());
            let mut at = 0;
            for i in finder.find_iter(&current) {
                if i < at {
                    continue;
                }
                next.extend_from_slice(&current[at..i]);
                next.extend_from_slice(REDACTED);
                at = i + needle.len();
            }
            next.extend_from_slice(&current[at..]);
            zeroize::Zeroize::zeroize(&mut current);
            current = next;
        }
        (current, changed)
    }
}

/// Values longer than this are not searched for escaped character by character (the fixed
/// forms still are): keys and tokens are far shorter, and the search costs up to the value's
/// length at each place its anchor appears.
const MAX_SPELLED_VALUE: usize = 4096;

/// The anchor (the value's longest run of ASCII letters and digits, which no escaping
/// changes) must be at least this long; a shorter one is everywhere in a body.
const MIN_ANCHOR: usize = 3;

/// The value as text with each of its other characters written as it is or escaped, each in
/// its own way, as serializers and templates mix them: System.Text.Json writes `+` as
/// `\u002B` but leaves `/` and `=`, Go's html/template writes `+` as `&#43;`, Handlebars `=`
/// as `&#x3D;`, PHP `'` as `&#039;`, Python's `quote` twice leaves `/`. Found from its anchor,
/// then character by character on both sides (see [`spells`]).
struct Spelled {
    chars: Zeroizing<Vec<char>>,
    anchor: std::ops::Range<usize>,
    anchor_bytes: Zeroizing<Vec<u8>>,
}

impl Spelled {
    fn new(value: &[u8]) -> Option<Self> {
        if value.len() > MAX_SPELLED_VALUE {
            return None;
        }
        let text = std::str::from_utf8(value).ok()?;
        let chars = Zeroizing::new(text.chars().collect::<Vec<char>>());
        let mut anchor = 0..0;
        let mut start = 0;
        for (i, c) in chars.iter().enumerate() {
            if !c.is_ascii_alphanumeric() {
                start = i + 1;
            } else if i + 1 - start > anchor.len() {
                anchor = start..i + 1;
            }
        }
        // Nothing escaped is left to find when the anchor is the whole value.
        if anchor.len() < MIN_ANCHOR || anchor.len() == chars.len() {
            return None;
        }
        let anchor_bytes = Zeroizing::new(chars[anchor.clone()].iter().map(|c| *c as u8).collect());
        Some(Self {
            chars,
            anchor,
            anchor_bytes,
        })
    }

    fn scrub(&self, haystack: &[u8]) -> (Vec<u8>, bool) {
        let finder = memchr::memmem::Finder::new(self.anchor_bytes.as_slice());
        // Bounded work (an honest body never comes near it): beyond, only the fixed forms
        // are searched for.
        // Counted in characters tried, each up to `MAX_SPELLING` spellings long: 64 per body
        // byte let a repeating 4 KiB value take seconds of CPU on a 1 MiB body.
        let mut budget = 4 * haystack.len() + 64 * 1024;
        let mut out = Vec::new();
        let mut copied = 0;
        let mut from = 0;
        while let Some(i) = finder.find(&haystack[from..]).map(|i| i + from) {
            let Some(steps) = budget.checked_sub(self.chars.len()) else {
                break;
            };
            budget = steps;
            match self.around(haystack, i, copied) {
                Some(found) => {
                    out.extend_from_slice(&haystack[copied..found.start]);
                    out.extend_from_slice(REDACTED);
                    copied = found.end;
                    from = found.end;
                }
                None => from = i + 1,
            }
        }
        if copied == 0 && out.is_empty() {
            return (haystack.to_vec(), false);
        }
        out.extend_from_slice(&haystack[copied..]);
        (out, true)
    }

    /// Where the whole value is spelled around its anchor found at `at`, starting no
    /// earlier than `floor`.
    fn around(&self, haystack: &[u8], at: usize, floor: usize) -> Option<std::ops::Range<usize>> {
        let mut end = at + self.anchor_bytes.len();
        for &c in &self.chars[self.anchor.end..] {
            end += (1..=MAX_SPELLING)
                .rev()
                .find(|&n| haystack.get(end..end + n).is_some_and(|s| spells(s, c)))?;
        }
        let mut start = at;
        for &c in self.chars[..self.anchor.start].iter().rev() {
            start -= (1..=MAX_SPELLING)
                .rev()
                .find(|&n| start >= floor + n && spells(&haystack[start - n..start], c))?;
        }
        Some(start..end)
    }
}

/// The longest spelling of one character (`%25XX` for each of four UTF-8 bytes).
const MAX_SPELLING: usize = 20;

/// Whether `s` is exactly one way of writing `c`: as it is; and, for a character other than
/// an ASCII letter or digit, a JSON escape (`\u002b`, `\u002B`, a surrogate pair, `\"`,
/// `\/`, `\n`, ...), an HTML character reference (`&#43;`, `&#043;`, `&#x2b;`, `&#X2B;`,
/// `&quot;`, ...), or percent-encoded once or twice (`%2B`, `%252B`, `+` for a space).
fn spells(s: &[u8], c: char) -> bool {
    let mut utf8 = [0u8; 4];
    let utf8 = c.encode_utf8(&mut utf8).as_bytes();
    if s == utf8 {
        return true;
    }
    if c.is_ascii_alphanumeric() {
        return false;
    }
    let code = c as u32;
    let hex = |h: &[u8]| -> Option<u32> {
        if h.is_empty() || h.len() > 6 || !h.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    match s {
        [b'\\', b'u', h @ ..] if h.len() == 4 => hex(h) == Some(code),
        [b'\\', b'u', hi @ .., b'\\', b'u', _, _, _, _] if hi.len() == 4 => {
            let (Some(hi), Some(lo)) = (hex(hi), hex(&s[8..])) else {
                return false;
            };
            (0xd800..0xdc00).contains(&hi)
                && (0xdc00..0xe000).contains(&lo)
                && 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00) == code
        }
        [b'\\', e] => {
            matches!(
                (e, c),
                (b'"', '"')
                    | (b'\\', '\\')
                    | (b'/', '/')
                    | (b'n', '\n')
                    | (b'r', '\r')
                    | (b't', '\t')
                    | (b'b', '\u{8}')
                    | (b'f', '\u{c}')
            )
        }
        [b'&', b'#', b'x' | b'X', h @ .., b';'] => hex(h) == Some(code),
        [b'&', b'#', d @ .., b';'] => {
            !d.is_empty()
                && d.len() <= 7
                && d.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(d).ok().and_then(|d| d.parse().ok()) == Some(code)
        }
        b"&amp;" => c == '&',
        b"&lt;" => c == '<',
        b"&gt;" => c == '>',
        b"&quot;" => c == '"',
        b"&apos;" => c == '\'',
        b"+" => c == ' ',
        [b'%', ..] => percent_decodes_to(s, utf8),
        _ => false,
    }
}

/// Whether `s` is `utf8` percent-encoded byte by byte, once (`%2B`) or twice (`%252B`).
fn percent_decodes_to(s: &[u8], utf8: &[u8]) -> bool {
    [3, 5].into_iter().any(|width| {
        s.len() == width * utf8.len()
            && s.chunks(width).zip(utf8).all(|(chunk, &b)| {
                let digits = &chunk[width - 2..];
                chunk[..width - 2].eq_ignore_ascii_case(&b"%25"[..width - 2])
                    && std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| u8::from_str_radix(d, 16).ok())
                        == Some(b)
                    && digits.iter().all(u8::is_ascii_hexdigit)
            })
    })
}

/// How a JSON serializer escapes a string. Serializers differ in four independent choices:
/// `<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes (Go's `encoding/json`), every non-ASCII
/// character as `\u` escapes, UTF-16 surrogate pairs beyond the BMP (Python's
/// `ensure_ascii`, PHP), `/` as `\/` (PHP), and upper- or lower-case hex digits.
#[derive(Clone, Copy)]
struct JsonStyle {
    html: bool,
    ascii: bool,
    slash: bool,
    upper: bool,
}

impl JsonStyle {
    const ALL: [JsonStyle; 16] = {
        let mut all = [JsonStyle {
            html: false,
            ascii: false,
            slash: false,
            upper: false,
        }; 16];
        let mut i = 0;
        while i < 16 {
            all[i] = JsonStyle {
                html: i & 1 != 0,
                ascii: i & 2 != 0,
                slash: i & 4 != 0,
                upper: i & 8 != 0,
            };
            i += 1;
        }
        all
    };
}

/// The inside of a JSON string holding `text`, escaped in `style` (serde_json's own output is
/// the style with every choice off).
fn json_escaped(text: &str, style: JsonStyle) -> Vec<u8> {
    fn unit(out: &mut String, u: u16, upper: bool) {
        let digits = hex_digits(upper);
        out.push_str("\\u");
        for shift in [12, 8, 4, 0] {
            out.push(char::from(digits[usize::from((u >> shift) & 15)]));
        }
    }
    // No byte takes more than six (a control character as `\u0000`), so the buffer never
    // grows, leaving no copy of the value behind in a freed allocation.
    let mut out = String::with_capacity(text.len() * 6);
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' if style.slash => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => unit(&mut out, c as u16, style.upper),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' if style.html => {
                unit(&mut out, c as u16, style.upper);
            }
            c if style.ascii && (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    unit(&mut out, *u, style.upper);
                }
            }
            c => out.push(c),
        }
    }
    out.into_bytes()
}

/// How an HTML template escapes text: `"` as `&quot;` or `&#34;`, `'` as `&#39;`, `&#x27;`
/// or left alone.
#[derive(Clone, Copy)]
struct HtmlStyle {
    quot: &'static str,
    apos: &'static str,
}

impl HtmlStyle {
    const ALL: [HtmlStyle; 6] = [
        HtmlStyle {
            quot: "&quot;",
            apos: "&#39;",
        },
        HtmlStyle {
            quot: "&quot;",
            apos: "&#x27;",
        },
        HtmlStyle {
            quot: "&quot;",
            apos: "'",
        },
        HtmlStyle {
            quot: "&#34;",
            apos: "&#39;",
        },
        HtmlStyle {
            quot: "&#34;",
            apos: "&#x27;",
        },
        HtmlStyle {
            quot: "&#34;",
            apos: "'",
        },
    ];
}

fn html_escaped(text: &str, style: HtmlStyle) -> Vec<u8> {
    // At most six bytes per byte (`&quot;`): the buffer never grows (see `json_escaped`).
    let mut out = String::with_capacity(text.len() * 6);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str(style.quot),
            '\'' => out.push_str(style.apos),
            c => out.push(c),
        }
    }
    out.into_bytes()
}

fn hex_digits(upper: bool) -> &'static [u8; 16] {
    if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    }
}

/// How an encoder percent-encodes: which bytes besides ASCII letters and digits it leaves as
/// they are, whether a space becomes `+`, and the case of its hex digits. Encoders differ
/// here, and an upstream echoing the value in a link uses whichever its language has.
#[derive(Clone, Copy)]
struct PercentStyle {
    safe: &'static [u8],
    plus: bool,
    upper: bool,
}

impl PercentStyle {
    const ALL: [PercentStyle; 7] = [
        // RFC 3986 unreserved (Go's url.QueryEscape aside, most "encode everything" code).
        PercentStyle {
            safe: b"-._~",
            plus: false,
            upper: true,
        },
        PercentStyle {
            safe: b"-._~",
            plus: false,
            upper: false,
        },
        // Python urllib.parse.quote (keeps `/` by default).
        PercentStyle {
            safe: b"-._~/",
            plus: false,
            upper: true,
        },
        // JavaScript encodeURIComponent and encodeURI.
        PercentStyle {
            safe: b"-_.!~*'()",
            plus: false,
            upper: true,
        },
        PercentStyle {
            safe: b"-_.!~*'();/?:@&=+$,#",
            plus: false,
            upper: true,
        },
        // Python quote_plus / urlencode.
        PercentStyle {
            safe: b"-._~",
            plus: true,
            upper: true,
        },
        // HTML forms (application/x-www-form-urlencoded, WHATWG), Go's QueryEscape.
        PercentStyle {
            safe: b"*-._",
            plus: true,
            upper: true,
        },
    ];
}

/// Percent-encodes `s` in `style`.
fn percent(s: &[u8], style: PercentStyle) -> Vec<u8> {
    let digits = hex_digits(style.upper);
    let mut out = Vec::with_capacity(s.len() * 3);
    for &b in s {
        if b.is_ascii_alphanumeric() || style.safe.contains(&b) {
            out.push(b);
        } else if b == b' ' && style.plus {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[b'%', digits[(b >> 4) as usize], digits[(b & 15) as usize]]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_usual_encoding_is_removed() {
        let value = b"sk_live/9f8e+7d6c 5b4a\"x";
        let n = Needles::new(value, &[b"alice:sk_live/9f8e+7d6c 5b4a\"x"]);
        let raw = String::from_utf8_lossy(value).into_owned();
        let forms = [
            raw.clone(),
            percent(value, PercentStyle::ALL[0])
                .iter()
                .map(|b| *b as char)
                .collect(),
            percent(value, PercentStyle::ALL[1])
                .iter()
                .map(|b| *b as char)
                .collect(),
            url::form_urlencoded::byte_serialize(value).collect(),
            STANDARD.encode(value),
            URL_SAFE_NO_PAD.encode(value),
            hex::encode(value),
            serde_json::to_string(&raw).unwrap(),
            format!(
                "Basic {}",
                STANDARD.encode(b"alice:sk_live/9f8e+7d6c 5b4a\"x")
            ),
            // The value inside a longer base64 string, at each alignment.
            STANDARD.encode(format!("x{raw}y")),
            STANDARD.encode(format!("xy{raw}")),
            STANDARD.encode(format!("bob:{raw}")),
        ];
        for form in forms {
            let body = format!("{{\"echo\": \"before {form} after\"}}");
            let (out, changed) = n.scrub(body.as_bytes());
            let out = String::from_utf8(out).unwrap();
            assert!(changed, "{form}");
            assert!(out.starts_with("{\"echo\": \"before ") && out.ends_with(" after\"}"));
            assert!(!out.contains("9f8e"), "{form} → {out}");
            assert!(out.contains("[REDACTED]"));
        }
        let (same, changed) = n.scrub(b"nothing to see");
        assert!(!changed);
        assert_eq!(same, b"nothing to see");
    }

    /// The value as other serializers escape it inside JSON, and as HTML templates escape it:
    /// each written out by hand here, as those libraries print it.
    #[test]
    fn json_and_html_escapes_of_other_serializers_are_removed() {
        let cases: [(&str, &[&str]); 4] = [
            (
                "CANARY&pw<9>x",
                &[
                    r"CANARY\u0026pw\u003c9\u003ex", // Go encoding/json
                    r"CANARY\u0026pw\u003C9\u003Ex", // upper-case hex
                    "CANARY&amp;pw&lt;9&gt;x",       // HTML
                ],
            ),
            (
                "CANARYwörd-ü9x",
                &[
                    r"CANARYw\u00f6rd-\u00fc9x", // Python json.dumps (ensure_ascii)
                    r"CANARYw\u00F6rd-\u00FC9x",
                ],
            ),
            (
                "CANARY\u{1F600}/9x'\"",
                &[
                    r#"CANARY\ud83d\ude00/9x'\""#,  // surrogate pair
                    r#"CANARY\ud83d\ude00\/9x'\""#, // PHP json_encode
                    "CANARY\u{1F600}/9x&#39;&quot;",
                    "CANARY\u{1F600}/9x&#x27;&#34;",
                ],
            ),
            ("CANARY\u{7}\u{2028}9x", &[r"CANARY\u0007\u20289x"]),
        ];
        assert_scrubbed(&cases, |form| {
            format!("{{\"error\": \"invalid key: {form}\"}}")
        });
    }

    /// Each form of each value, echoed inside `wrap(form)`, is replaced whole.
    fn assert_scrubbed(cases: &[(&str, &[&str])], wrap: impl Fn(&str) -> String) {
        for (value, forms) in cases {
            let n = Needles::new(value.as_bytes(), &[]);
            for form in *forms {
                let (out, changed) = n.scrub(wrap(form).as_bytes());
                let out = String::from_utf8(out).unwrap();
                assert!(changed && out.contains("[REDACTED]"), "{form} -> {out}");
                assert!(!out.contains(form), "{form} -> {out}");
            }
        }
    }

    /// The value as other encoders write it into URLs and forms, and nested in JSON: each
    /// written out by hand here, as those libraries print it.
    #[test]
    fn other_encoders_percent_forms_are_removed() {
        let cases: [(&str, &[&str]); 4] = [
            (
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                &[
                    "wJalrXUtnFEMI/K7MDENG%2BbPxRfiCYEXAMPLEKEY", // Python quote
                    "wJalrXUtnFEMI%252FK7MDENG%252BbPxRfiCYEXAMPLEKEY", // twice
                ],
            ),
            ("P@ss!word(2024)", &["P%40ss!word(2024)"]), // encodeURIComponent
            (
                "tok en~with*stars",
                &[
                    "tok+en~with%2Astars", // Python quote_plus
                    "tok+en%7Ewith*stars", // HTML form
                ],
            ),
            ("say \"hi\"", &[r#"say \\\"hi\\\""#]), // JSON in JSON
        ];
        assert_scrubbed(&cases, |form| {
            format!("{{\"next\": \"https://x.example/?k={form}&p=2\"}}")
        });
    }

    /// The value with some of its characters escaped and others not, as .NET, Go and PHP
    /// templates, Handlebars and Python print it: each written out by hand here.
    #[test]
    fn values_escaped_character_by_character_are_removed() {
        let cases: [(&str, &[&str]); 2] = [
            (
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY==",
                &[
                    r"wJalrXUtnFEMI/K7MDENG\u002BbPxRfiCYEXAMPLEKEY==", // System.Text.Json
                    r"wJalrXUtnFEMI/K7MDENG\u002bbPxRfiCYEXAMPLEKEY==",
                    "wJalrXUtnFEMI/K7MDENG&#43;bPxRfiCYEXAMPLEKEY==", // Go html/template
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY&#x3D;&#x3D;", // Handlebars
                    "wJalrXUtnFEMI/K7MDENG%252BbPxRfiCYEXAMPLEKEY%253D%253D", // quote(quote())
                    "wJalrXUtnFEMI%252FK7MDENG%252BbPxRfiCYEXAMPLEKEY%253D%253D", // quote_plus twice
                    "wJalrXUtnFEMI&#47;K7MDENG&#43;bPxRfiCYEXAMPLEKEY&#61;&#61;", // XML numeric
                    "wJalrXUtnFEMI&#x2F;K7MDENG&#X2b;bPxRfiCYEXAMPLEKEY&#061;&#x3d;",
                ],
            ),
            (
                "p@ss'w\"ord+9/x=",
                &[
                    r"p@ss\u0027w\u0022ord\u002B9/x=",     // System.Text.Json
                    "p@ss&#39;w&#34;ord&#43;9/x=",         // Go html/template
                    "p@ss&#039;w&quot;ord+9/x=",           // PHP 8.1 htmlspecialchars
                    "p@ss&#x27;w&quot;ord+9/x&#x3D;",      // Handlebars
                    "p%2540ss%2527w%2522ord%252B9/x%253D", // quote(quote())
                    r#"p@ss'w\"ord+9\/x="#,                // PHP json_encode
                ],
            ),
        ];
        for (value, forms) in cases {
            let n = Needles::new(value.as_bytes(), &[]);
            for form in forms {
                let wrap = |v: &str| format!("<p data-x=\"{v}\">{{\"key\": \"{v}\"}}</p>");
                let (out, changed) = n.scrub(wrap(form).as_bytes());
                assert!(changed, "{form}");
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    wrap("[REDACTED]"),
                    "{form}"
                );
            }
            // Nearly the value is not the value: nothing around it is taken.
            let near = value.replacen('=', "-", 1).replacen('\'', "&#40;", 1);
            let (out, _) = n.scrub(near.as_bytes());
            assert_eq!(out, near.as_bytes());
        }
    }

    /// A 1 MiB body where the anchor (`ord`) is everywhere is searched to its end (the work
    /// is bounded per body; its speed is for benchmarks, not this test).
    #[test]
    fn a_large_body_full_of_the_anchor_is_scrubbed() {
        let n = Needles::new(b"p@ss'w\"ord+9/x=", &[]);
        let mut body = String::new();
        while body.len() < 1024 * 1024 {
            body.push_str("{\"word\": \"record\", \"order\": [1, 2, \"p@ss&#39;w&#34;ord\"]}, ");
        }
        body.push_str(r"p@ss\u0027w\u0022ord\u002B9/x=");
        let (out, changed) = n.scrub(body.as_bytes());
        assert!(changed && out.ends_with(REDACTED));
    }

    #[test]
    fn a_lower_cased_echo_is_removed() {
        let n = Needles::new(b"ASCIIsecretVALUE1234", &[]);
        let (out, changed) = n.scrub(b"x-asciisecretvalue1234: 1");
        assert!(changed, "{}", String::from_utf8_lossy(&out));
        assert_eq!(out, b"x-[REDACTED]: 1");
    }

    /// Shouted back, or in UTF-16 (either byte order).
    #[test]
    fn upper_cased_and_utf16_echoes_are_removed() {
        let value = "sk_live_4eC39HqLyjWDarjt";
        let n = Needles::new(value.as_bytes(), &[]);
        let (out, changed) = n.scrub(b"INVALID KEY SK_LIVE_4EC39HQLYJWDARJT.");
        assert!(changed);
        assert_eq!(out, b"INVALID KEY [REDACTED].");
        for utf16 in [
            value
                .encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect::<Vec<u8>>(),
            value.encode_utf16().flat_map(u16::to_be_bytes).collect(),
        ] {
            let mut body = b"\0k\0e\0y\0:".to_vec();
            body.extend_from_slice(&utf16);
            let (out, changed) = n.scrub(&body);
            assert!(changed);
            assert!(out.ends_with(REDACTED), "{out:?}");
        }
    }

    #[test]
    fn overlapping_and_repeated_occurrences() {
        let n = Needles::new(b"aa", &[]);
        assert_eq!(n.scrub(b"aaaaa").0, b"[REDACTED][REDACTED]a");
        let n = Needles::new(b"abcabc", &[]);
        let (out, _) = n.scrub(b"xabcabcabcabcy");
        assert!(!out.windows(6).any(|w| w == b"abcabc"));
    }
}
