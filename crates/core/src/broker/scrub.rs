//! Taking the credential value (and its usual encodings) out of what an upstream returns.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use zeroize::Zeroizing;

/// A response the search for the value's spellings could not finish within its budget.
#[derive(Debug)]
pub(crate) struct Unchecked;

/// What replaces each occurrence.
pub(crate) const REDACTED: &[u8] = b"[REDACTED]";

/// Base64 runs shorter than this are not searched for out of alignment (too many false
/// positives); the full encodings always are.
const MIN_SHIFTED_B64: usize = 8;

/// The byte strings to remove: the value itself, every injected rendering of it, and their
/// percent-encoded, form-encoded, base64 (standard and URL-safe, padded or not, at each of
/// the three byte alignments, also wrapped into lines), hex, JSON-escaped (as the common
/// serializers escape), HTML-escaped (once or twice), JavaScript `escape()`, Python bytes
/// `repr`, UTF-16 and UTF-32 forms; and the value as text with any of its characters escaped
/// ([`Spelled`]). Zeroized on drop.
pub(crate) struct Needles {
    fixed: Vec<Zeroizing<Vec<u8>>>,
    /// The base64 ones, also searched for with line breaks inside (see [`Needles::unwrapped`]).
    wrapped: Vec<Zeroizing<Vec<u8>>>,
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
        // The base64 forms, searched for across line breaks too.
        let mut base64: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut push_base64 = |n: String| {
            let n = Zeroizing::new(n.into_bytes());
            if !n.is_empty() && !base64.iter().any(|o| **o == *n) {
                base64.push(n);
            }
        };
        // The injected renderings (`Bearer …`, `user:…`) hold the value, so their plain,
        // percent-encoded and JSON forms hold its forms; only their base64 forms differ.
        for s in extra {
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                push_base64(engine.encode(s));
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
                // JSON inside a JSON string (an error body quoting a request body), by the same
                // serializer twice (Python's `json.dumps` escapes non-ASCII both times, Go's
                // `<>&`).
                for style in JsonStyle::ALL {
                    let once = Zeroizing::new(json_escaped(text, style));
                    if let Ok(once) = std::str::from_utf8(&once) {
                        push(json_escaped(once, style));
                    }
                }
                // Upper- and lower-cased beyond ASCII (`CAFÉ`, `école`).
                push(case_mapped(text, char::to_uppercase));
                push(case_mapped(text, char::to_lowercase));
                for style in HtmlStyle::ALL {
                    push(html_escaped(text, style));
                    // HTML inside HTML (a template escaping what another one escaped).
                    let once = Zeroizing::new(html_escaped(text, style));
                    if let Ok(once) = std::str::from_utf8(&once) {
                        push(html_escaped(once, style));
                    }
                }
                // Forms the character-by-character search also finds, whole here for the
                // values it does not search (no anchor, over 4 KiB).
                push(js_escape(text));
                // UTF-16 and UTF-32, either byte order (a text answer in a charset the
                // service asked for, or a Windows service's default). Sized up front (at most
                // four bytes per byte) so no grown buffer leaves a copy behind.
                let utf32 = text.len() * 4;
                push(sized(utf32, text.encode_utf16().flat_map(u16::to_le_bytes)));
                push(sized(utf32, text.encode_utf16().flat_map(u16::to_be_bytes)));
                push(sized(
                    utf32,
                    text.chars().flat_map(|c| u32::from(c).to_le_bytes()),
                ));
                push(sized(
                    utf32,
                    text.chars().flat_map(|c| u32::from(c).to_be_bytes()),
                ));
            }
            push(python_bytes_repr(s));
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                push_base64(engine.encode(s));
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
                            push_base64(enc);
                        }
                    }
                }
            }
            let whole = &s[..s.len() - s.len() % 3];
            let enc = STANDARD_NO_PAD.encode(whole);
            if enc.len() >= MIN_SHIFTED_B64 {
                push_base64(enc);
                push_base64(URL_SAFE_NO_PAD.encode(whole));
            }
        }
        for n in &base64 {
            push(n.to_vec());
        }
        // Longest first, so a long form is replaced whole before a shorter one inside it.
        out.sort_by_key(|n| std::cmp::Reverse(n.len()));
        // As short as the shortest searched for out of alignment, no shorter: a few
        // characters either side of a break would match unrelated base64 text.
        base64.retain(|n| n.len() >= MIN_SHIFTED_B64);
        base64.sort_by_key(|n| std::cmp::Reverse(n.len()));
        Self {
            fixed: out,
            wrapped: base64,
            spelled: Spelled::new(value),
        }
    }

    /// `haystack` with every needle replaced by [`REDACTED`]; `true` when anything was.
    ///
    /// # Errors
    ///
    /// [`Unchecked`] when the character-by-character search ran out of its budget before the
    /// end: the rest could hold the value in a spelling nothing else looks for, and a service
    /// that controls what an echoing upstream sends back could put its budget's worth of
    /// near misses first.
    pub(crate) fn scrub_all(&self, haystack: &[u8]) -> Result<(Vec<u8>, bool), Unchecked> {
        // The escaped text first: whole, before a fixed form takes a piece of it.
        let (mut current, mut changed) = match &self.spelled {
            Some(spelled) => spelled.search(haystack)?,
            None => (haystack.to_vec(), false),
        };
        if let Some(next) = self.unwrapped(&current) {
            zeroize::Zeroize::zeroize(&mut current);
            current = next;
            changed = true;
        }
        for needle in &self.fixed {
            // Before a searcher is built for it (work in the needle's length, which for a
            // large value's long forms was most of a response's cost: every header is
            // scrubbed on its own).
            if needle.len() > current.len() {
                continue;
            }
            let finder = memchr::memmem::Finder::new(needle.as_slice());
            if finder.find(&current).is_none() {
                continue;
            }
            changed = true;
            // Where it is, first: the output is then allocated once, at its size (a buffer
            // that grows leaves copies of the body, value included, in what it frees).
            let mut hits = Vec::new();
            let mut at = 0;
            for i in finder.find_iter(&current) {
                if i >= at {
                    hits.push(i);
                    at = i + needle.len();
                }
            }
            let size = current.len() - hits.len() * needle.len() + hits.len() * REDACTED.len();
            let mut next = Vec::with_capacity(size);
            let mut at = 0;
            for i in hits {
                next.extend_from_slice(&current[at..i]);
                next.extend_from_slice(REDACTED);
                at = i + needle.len();
            }
            next.extend_from_slice(&current[at..]);
            zeroize::Zeroize::zeroize(&mut current);
            current = next;
        }
        Ok((current, changed))
    }

    /// [`Needles::scrub_all`] for bodies that stay within the budget.
    #[cfg(test)]
    pub(crate) fn scrub(&self, haystack: &[u8]) -> (Vec<u8>, bool) {
        self.scrub_all(haystack)
            .unwrap_or_else(|_| panic!("the search ran out of its budget"))
    }

    /// `haystack` with each base64 form that has line breaks inside it (MIME's and Python's
    /// `encodebytes` 76 columns, PEM's 64, any other width; `\n` or `\r\n`, or those
    /// escaped in a JSON string) replaced; `None` when none has. Searched for in a copy
    /// without those breaks, so the break may fall anywhere in it.
    fn unwrapped(&self, haystack: &[u8]) -> Option<Vec<u8>> {
        let breaks = base64_line_breaks(haystack);
        if breaks.is_empty() || self.wrapped.is_empty() {
            return None;
        }
        // Where each break was: its offset in `joined`, and the bytes removed up to it.
        let mut joined = Zeroizing::new(Vec::with_capacity(haystack.len()));
        let mut cuts = Vec::with_capacity(breaks.len());
        let (mut at, mut removed) = (0, 0);
        for b in breaks {
            joined.extend_from_slice(&haystack[at..b.start]);
            removed += b.len();
            cuts.push((joined.len(), removed));
            at = b.end;
        }
        joined.extend_from_slice(&haystack[at..]);
        let original = |j: usize| {
            let before = cuts.partition_point(|&(c, _)| c <= j);
            j + before.checked_sub(1).map_or(0, |k| cuts[k].1)
        };
        let mut found = Vec::new();
        for needle in &self.wrapped {
            if needle.len() > joined.len() {
                continue;
            }
            for i in memchr::memmem::find_iter(&joined, needle.as_slice()) {
                let end = i + needle.len();
                // Only across a break: the others are found as they are.
                let next_cut = cuts.partition_point(|&(c, _)| c <= i);
                if cuts.get(next_cut).is_some_and(|&(c, _)| c < end) {
                    found.push(original(i)..original(end - 1) + 1);
                }
            }
        }
        if found.is_empty() {
            return None;
        }
        found.sort_by_key(|r| r.start);
        let mut out = Vec::with_capacity(haystack.len() + found.len() * REDACTED.len());
        let mut copied = 0;
        for r in found {
            // Overlapping forms go under one replacement.
            if r.start < copied {
                copied = copied.max(r.end);
                continue;
            }
            out.extend_from_slice(&haystack[copied..r.start]);
            out.extend_from_slice(REDACTED);
            copied = r.end;
        }
        out.extend_from_slice(&haystack[copied..]);
        Some(out)
    }
}

/// The shortest line of base64 a break is looked for after.
const MIN_WRAPPED_LINE: usize = 16;

/// The line breaks in `haystack` between two base64 characters (standard or URL-safe, padding
/// after): `\n`, `\r\n`, and the same escaped in a JSON string.
fn base64_line_breaks(haystack: &[u8]) -> Vec<std::ops::Range<usize>> {
    let base64 = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_');
    let mut breaks = Vec::new();
    let mut seen = 0;
    for i in memchr::memchr2_iter(b'\n', b'\\', haystack) {
        // The second backslash of an escaped `\r\n`.
        if i < seen {
            continue;
        }
        let rest = &haystack[i + 1..];
        let b = match haystack[i] {
            b'\n' if i > 0 && haystack[i - 1] == b'\r' => i - 1..i + 1,
            b'\n' => i..i + 1,
            _ if rest.starts_with(b"n") => i..i + 2,
            _ if rest.starts_with(b"r\\n") => i..i + 4,
            _ => continue,
        };
        seen = b.end;
        // After a line of base64 at least as wide as any encoder wraps (64 and 76 are the
        // usual widths): a body of short lines does not make a break, and its bookkeeping,
        // every few bytes.
        let line = haystack[..b.start]
            .iter()
            .rev()
            .take(MIN_WRAPPED_LINE)
            .take_while(|b| base64(b))
            .count();
        if line == MIN_WRAPPED_LINE && haystack.get(b.end).is_some_and(|n| base64(n) || *n == b'=')
        {
            breaks.push(b);
        }
    }
    breaks
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
/// as `&#x3D;`, PHP `'` as `&#039;`, Python's `quote` twice leaves `/`, Python's `repr` writes
/// `'` as `\'` but leaves `"`, JavaScript's `escape()` leaves `+` and `/`. Found from its
/// anchor, then character by character on both sides (see [`spells`]).
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

    /// [`Spelled::search`] for bodies that stay within the budget.
    #[cfg(test)]
    fn scrub(&self, haystack: &[u8]) -> (Vec<u8>, bool) {
        self.search(haystack)
            .unwrap_or_else(|_| panic!("the search ran out of its budget"))
    }

    /// `haystack` with each spelling of the value replaced, or [`Unchecked`] when the work
    /// it would take is past the budget.
    fn search(&self, haystack: &[u8]) -> Result<(Vec<u8>, bool), Unchecked> {
        let finder = memchr::memmem::Finder::new(self.anchor_bytes.as_slice());
        // Bounded work (an honest body never comes near it): beyond, the body is refused
        // (see `Needles::scrub_all`).
        // Counted in characters tried, each up to `MAX_SPELLING` spellings long: 64 per body
        // byte let a repeating 4 KiB value take seconds of CPU on a 1 MiB body.
        let mut budget = 4 * haystack.len() + 64 * 1024;
        let mut found = Vec::new();
        let mut copied = 0;
        let mut from = 0;
        while let Some(i) = finder.find(&haystack[from..]).map(|i| i + from) {
            let Some(steps) = budget.checked_sub(self.chars.len()) else {
                return Err(Unchecked);
            };
            budget = steps;
            match self.around(haystack, i, copied) {
                Some(at) => {
                    copied = at.end;
                    from = at.end;
                    found.push(at);
                }
                None => from = i + 1,
            }
        }
        if found.is_empty() {
            return Ok((haystack.to_vec(), false));
        }
        // Allocated once, at its size (a buffer that grows leaves copies of the body in what
        // it frees).
        let removed: usize = found.iter().map(|r| r.len()).sum();
        let mut out = Vec::with_capacity(haystack.len() - removed + found.len() * REDACTED.len());
        let mut copied = 0;
        for r in found {
            out.extend_from_slice(&haystack[copied..r.start]);
            out.extend_from_slice(REDACTED);
            copied = r.end;
        }
        out.extend_from_slice(&haystack[copied..]);
        Ok((out, true))
    }

    /// Where the whole value is spelled around its anchor found at `at`, starting no
    /// earlier than `floor`.
    fn around(&self, haystack: &[u8], at: usize, floor: usize) -> Option<std::ops::Range<usize>> {
        // The longest spelling first, as a decoder reads (`&#43;` before `&#43`).
        let mut end = at + self.anchor_bytes.len();
        for &c in &self.chars[self.anchor.end..] {
            // Only an escape is longer than a character's four bytes.
            let longest = match haystack.get(end) {
                Some(b'\\' | b'&' | b'%') => MAX_SPELLING,
                _ => 4,
            };
            end += (1..=longest).rev().find(|&n| {
                haystack
                    .get(end..end + n)
                    .is_some_and(|s| spells(s, haystack.get(end + n).copied(), c))
            })?;
        }
        let mut start = at;
        for &c in self.chars[..self.anchor.start].iter().rev() {
            start -= (1..=MAX_SPELLING).rev().find(|&n| {
                start >= floor + n
                    && spells(&haystack[start - n..start], haystack.get(start).copied(), c)
            })?;
        }
        Some(start..end)
    }
}

/// The longest spelling of one character (`&amp;DiacriticalGrave;`, an HTML reference
/// escaped twice).
const MAX_SPELLING: usize = 22;

/// Whether `s` is exactly one way of writing `c` (followed by the byte `next`, if any): as
/// it is; and, for a character other than an ASCII letter or digit, a backslash escape (see
/// [`backslash_escape_of`]), an HTML character reference, once or escaped again (see
/// [`html_reference_to`]: `&#43;`, `&#43`, `&plus;`, `&amp;#43;`), percent-encoded once or
/// twice (`%2B`, `%252B`, `+` for a space), or as JavaScript's `escape()` writes it (`%E9`,
/// `%u20AC`).
fn spells(s: &[u8], next: Option<u8>, c: char) -> bool {
    // Longer than four bytes, only an escape: ending in a reference's `;`, or in a hex digit
    // (`\u002B`, `%C3%A9`, a reference's number that the next byte does not continue). Most
    // lengths tried are neither, ruled out first (the search's hot path).
    if s.len() > 4 {
        let may = match (s[0], s[s.len() - 1]) {
            (b'&', b';') => true,
            (b'&', b) => {
                b.is_ascii_hexdigit() && !next.is_some_and(|n| n.is_ascii_digit() || n == b';')
            }
            (b'\\' | b'%', b) => b.is_ascii_hexdigit(),
            _ => false,
        };
        if !may {
            return false;
        }
    }
    let mut utf8 = [0u8; 4];
    let utf8 = c.encode_utf8(&mut utf8).as_bytes();
    // Most tries are not escapes: decided here, on the hot path of the search.
    if !matches!(s.first(), Some(b'\\' | b'&' | b'%')) {
        return s == utf8 || (s == b"+" && c == ' ');
    }
    if s == utf8 {
        return true;
    }
    if c.is_ascii_alphanumeric() {
        return false;
    }
    let code = c as u32;
    match s {
        [b'\\', ..] => backslash_escape_of(s, c, utf8),
        // Escaped twice (a template escaping what another one escaped).
        [b'&', b'a', b'm', b'p', b';', _, ..] => html_reference_to(&s[5..], next, code),
        [b'&', rest @ ..] => html_reference_to(rest, next, code),
        [b'%', ..] => percent_decodes_to(s, utf8) || escape_of(s, code),
        _ => false,
    }
}

/// `text` with every character mapped by `case` (`char::to_uppercase`), in a buffer sized
/// for the worst case up front (a character maps to at most three, each at most as long in
/// UTF-8 as three times it), so no grown copy is left behind.
fn case_mapped<I: Iterator<Item = char>>(text: &str, case: fn(char) -> I) -> Vec<u8> {
    let mut out = String::with_capacity(text.len() * 3);
    for c in text.chars() {
        out.extend(case(c));
    }
    out.into_bytes()
}

/// The number written in hex digits `h` (either case).
fn hex(h: &[u8]) -> Option<u32> {
    if h.is_empty() || h.len() > 8 || !h.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
}

/// The number written in decimal digits `d` (`&#` allows leading zeros, up to seven digits).
fn decimal(d: &[u8]) -> Option<u32> {
    if d.is_empty() || d.len() > 7 || !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(d).ok()?.parse().ok()
}

/// Whether the UTF-16 surrogates written in hex as `hi` and `lo` make `code`.
fn surrogates_make(hi: &[u8], lo: &[u8], code: u32) -> bool {
    let (Some(hi), Some(lo)) = (hex(hi), hex(lo)) else {
        return false;
    };
    (0xd800..0xdc00).contains(&hi)
        && (0xdc00..0xe000).contains(&lo)
        && 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00) == code
}

/// Whether `s` (starting with `\`) writes `c` (UTF-8 `utf8`) as JSON,
/// JavaScript, Python or C source does: `\u002b`, a surrogate pair, Python's `\U0001f600`,
/// `\xe9` (the code point, as Python's `repr` of a str and JavaScript write it), `\xc3\xa9`
/// (each UTF-8 byte, as `repr` of bytes and C write it), `\"`, `\'`, `\/`, `\n`, ...
fn backslash_escape_of(s: &[u8], c: char, utf8: &[u8]) -> bool {
    let code = c as u32;
    match s {
        [b'\\', b'u', h @ ..] if h.len() == 4 => hex(h) == Some(code),
        [b'\\', b'u', hi @ .., b'\\', b'u', _, _, _, _] if hi.len() == 4 => {
            surrogates_make(hi, &s[8..], code)
        }
        [b'\\', b'U', h @ ..] if h.len() == 8 => hex(h) == Some(code),
        [b'\\', b'x', h @ ..] if h.len() == 2 => hex(h) == Some(code),
        [b'\\', b'x', ..] => {
            s.len() == 4 * utf8.len()
                && s.chunks(4).zip(utf8).all(|(chunk, &b)| {
                    chunk[..2] == *b"\\x" && hex(&chunk[2..]) == Some(u32::from(b))
                })
        }
        [b'\\', e] => {
            matches!(
                (e, c),
                (b'"', '"')
                    | (b'\'', '\'')
                    | (b'\\', '\\')
                    | (b'/', '/')
                    | (b'n', '\n')
                    | (b'r', '\r')
                    | (b't', '\t')
                    | (b'b', '\u{8}')
                    | (b'f', '\u{c}')
            )
        }
        _ => false,
    }
}

/// Whether `body` (what follows the `&`) is an HTML character reference to `code` when
/// followed by `next`: numeric (`#43;`, `#043;`, `#x2b;`, `#X2B;`), numeric without its `;`
/// as browsers read it (only where the next byte cannot continue the number: `&#43` then `9`
/// is U+01B7), or named as HTML5 and HTML 4 name it (`plus;`, `eacute;`, `QUOT;`).
fn html_reference_to(body: &[u8], next: Option<u8>, code: u32) -> bool {
    let continues = |digit: fn(&u8) -> bool| next.is_some_and(|b| digit(&b) || b == b';');
    match body {
        [b'#', b'x' | b'X', h @ .., b';'] => hex(h) == Some(code),
        [b'#', b'x' | b'X', h @ ..] => !continues(u8::is_ascii_hexdigit) && hex(h) == Some(code),
        [b'#', d @ .., b';'] => decimal(d) == Some(code),
        [b'#', d @ ..] => !continues(u8::is_ascii_digit) && decimal(d) == Some(code),
        [name @ .., b';'] => {
            let from = NAMED_REFERENCES.partition_point(|&(c, _)| c < code);
            NAMED_REFERENCES[from..]
                .iter()
                .take_while(|&&(c, _)| c == code)
                .any(|&(_, n)| n.as_bytes() == name)
        }
        _ => false,
    }
}

/// Whether `s` is JavaScript's `escape()` of the character `code`: `%XX` for one up to
/// U+00FF (`%E9`, not its UTF-8 bytes), `%uXXXX` beyond, a surrogate pair beyond the BMP.
fn escape_of(s: &[u8], code: u32) -> bool {
    match s {
        [b'%', b'u', h @ ..] if h.len() == 4 => hex(h) == Some(code),
        [b'%', b'u', hi @ .., b'%', b'u', _, _, _, _] if hi.len() == 4 => {
            surrogates_make(hi, &s[8..], code)
        }
        [b'%', h @ ..] if h.len() == 2 => hex(h) == Some(code),
        _ => false,
    }
}

/// The named character references, by code point: every HTML5 name for a character up to
/// U+00FF (`&plus;`, `&lowbar;`, `&nbsp;`, `&NonBreakingSpace;`) and every HTML 4 name (what
/// PHP's `htmlentities` and Java's `escapeHtml4` write: `&eacute;`, `&euro;`, `&lang;` for
/// U+2329 as HTML 4 had it). Generated from Python's `html.entities`.
#[rustfmt::skip]
const NAMED_REFERENCES: &[(u32, &str)] = &[
    (0x09, "Tab"), (0x0A, "NewLine"), (0x21, "excl"), (0x22, "QUOT"), (0x22, "quot"),
    (0x23, "num"), (0x24, "dollar"), (0x25, "percnt"), (0x26, "AMP"), (0x26, "amp"),
    (0x27, "apos"), (0x28, "lpar"), (0x29, "rpar"), (0x2A, "ast"), (0x2A, "midast"),
    (0x2B, "plus"), (0x2C, "comma"), (0x2E, "period"), (0x2F, "sol"), (0x3A, "colon"),
    (0x3B, "semi"), (0x3C, "LT"), (0x3C, "lt"), (0x3D, "equals"), (0x3E, "GT"), (0x3E, "gt"),
    (0x3F, "quest"), (0x40, "commat"), (0x5B, "lbrack"), (0x5B, "lsqb"), (0x5C, "bsol"),
    (0x5D, "rbrack"), (0x5D, "rsqb"), (0x5E, "Hat"), (0x5F, "UnderBar"), (0x5F, "lowbar"),
    (0x60, "DiacriticalGrave"), (0x60, "grave"), (0x7B, "lbrace"), (0x7B, "lcub"),
    (0x7C, "VerticalLine"), (0x7C, "verbar"), (0x7C, "vert"), (0x7D, "rbrace"), (0x7D, "rcub"),
    (0xA0, "NonBreakingSpace"), (0xA0, "nbsp"), (0xA1, "iexcl"), (0xA2, "cent"), (0xA3, "pound"),
    (0xA4, "curren"), (0xA5, "yen"), (0xA6, "brvbar"), (0xA7, "sect"), (0xA8, "Dot"),
    (0xA8, "DoubleDot"), (0xA8, "die"), (0xA8, "uml"), (0xA9, "COPY"), (0xA9, "copy"),
    (0xAA, "ordf"), (0xAB, "laquo"), (0xAC, "not"), (0xAD, "shy"), (0xAE, "REG"),
    (0xAE, "circledR"), (0xAE, "reg"), (0xAF, "macr"), (0xAF, "strns"), (0xB0, "deg"),
    (0xB1, "PlusMinus"), (0xB1, "plusmn"), (0xB1, "pm"), (0xB2, "sup2"), (0xB3, "sup3"),
    (0xB4, "DiacriticalAcute"), (0xB4, "acute"), (0xB5, "micro"), (0xB6, "para"),
    (0xB7, "CenterDot"), (0xB7, "centerdot"), (0xB7, "middot"), (0xB8, "Cedilla"),
    (0xB8, "cedil"), (0xB9, "sup1"), (0xBA, "ordm"), (0xBB, "raquo"), (0xBC, "frac14"),
    (0xBD, "frac12"), (0xBD, "half"), (0xBE, "frac34"), (0xBF, "iquest"), (0xC0, "Agrave"),
    (0xC1, "Aacute"), (0xC2, "Acirc"), (0xC3, "Atilde"), (0xC4, "Auml"), (0xC5, "Aring"),
    (0xC5, "angst"), (0xC6, "AElig"), (0xC7, "Ccedil"), (0xC8, "Egrave"), (0xC9, "Eacute"),
    (0xCA, "Ecirc"), (0xCB, "Euml"), (0xCC, "Igrave"), (0xCD, "Iacute"), (0xCE, "Icirc"),
    (0xCF, "Iuml"), (0xD0, "ETH"), (0xD1, "Ntilde"), (0xD2, "Ograve"), (0xD3, "Oacute"),
    (0xD4, "Ocirc"), (0xD5, "Otilde"), (0xD6, "Ouml"), (0xD7, "times"), (0xD8, "Oslash"),
    (0xD9, "Ugrave"), (0xDA, "Uacute"), (0xDB, "Ucirc"), (0xDC, "Uuml"), (0xDD, "Yacute"),
    (0xDE, "THORN"), (0xDF, "szlig"), (0xE0, "agrave"), (0xE1, "aacute"), (0xE2, "acirc"),
    (0xE3, "atilde"), (0xE4, "auml"), (0xE5, "aring"), (0xE6, "aelig"), (0xE7, "ccedil"),
    (0xE8, "egrave"), (0xE9, "eacute"), (0xEA, "ecirc"), (0xEB, "euml"), (0xEC, "igrave"),
    (0xED, "iacute"), (0xEE, "icirc"), (0xEF, "iuml"), (0xF0, "eth"), (0xF1, "ntilde"),
    (0xF2, "ograve"), (0xF3, "oacute"), (0xF4, "ocirc"), (0xF5, "otilde"), (0xF6, "ouml"),
    (0xF7, "div"), (0xF7, "divide"), (0xF8, "oslash"), (0xF9, "ugrave"), (0xFA, "uacute"),
    (0xFB, "ucirc"), (0xFC, "uuml"), (0xFD, "yacute"), (0xFE, "thorn"), (0xFF, "yuml"),
    (0x152, "OElig"), (0x153, "oelig"), (0x160, "Scaron"), (0x161, "scaron"), (0x178, "Yuml"),
    (0x192, "fnof"), (0x2C6, "circ"), (0x2DC, "tilde"), (0x391, "Alpha"), (0x392, "Beta"),
    (0x393, "Gamma"), (0x394, "Delta"), (0x395, "Epsilon"), (0x396, "Zeta"), (0x397, "Eta"),
    (0x398, "Theta"), (0x399, "Iota"), (0x39A, "Kappa"), (0x39B, "Lambda"), (0x39C, "Mu"),
    (0x39D, "Nu"), (0x39E, "Xi"), (0x39F, "Omicron"), (0x3A0, "Pi"), (0x3A1, "Rho"),
    (0x3A3, "Sigma"), (0x3A4, "Tau"), (0x3A5, "Upsilon"), (0x3A6, "Phi"), (0x3A7, "Chi"),
    (0x3A8, "Psi"), (0x3A9, "Omega"), (0x3B1, "alpha"), (0x3B2, "beta"), (0x3B3, "gamma"),
    (0x3B4, "delta"), (0x3B5, "epsilon"), (0x3B6, "zeta"), (0x3B7, "eta"), (0x3B8, "theta"),
    (0x3B9, "iota"), (0x3BA, "kappa"), (0x3BB, "lambda"), (0x3BC, "mu"), (0x3BD, "nu"),
    (0x3BE, "xi"), (0x3BF, "omicron"), (0x3C0, "pi"), (0x3C1, "rho"), (0x3C2, "sigmaf"),
    (0x3C3, "sigma"), (0x3C4, "tau"), (0x3C5, "upsilon"), (0x3C6, "phi"), (0x3C7, "chi"),
    (0x3C8, "psi"), (0x3C9, "omega"), (0x3D1, "thetasym"), (0x3D2, "upsih"), (0x3D6, "piv"),
    (0x2002, "ensp"), (0x2003, "emsp"), (0x2009, "thinsp"), (0x200C, "zwnj"), (0x200D, "zwj"),
    (0x200E, "lrm"), (0x200F, "rlm"), (0x2013, "ndash"), (0x2014, "mdash"), (0x2018, "lsquo"),
    (0x2019, "rsquo"), (0x201A, "sbquo"), (0x201C, "ldquo"), (0x201D, "rdquo"), (0x201E, "bdquo"),
    (0x2020, "dagger"), (0x2021, "Dagger"), (0x2022, "bull"), (0x2026, "hellip"),
    (0x2030, "permil"), (0x2032, "prime"), (0x2033, "Prime"), (0x2039, "lsaquo"),
    (0x203A, "rsaquo"), (0x203E, "oline"), (0x2044, "frasl"), (0x20AC, "euro"), (0x2111, "image"),
    (0x2118, "weierp"), (0x211C, "real"), (0x2122, "trade"), (0x2135, "alefsym"),
    (0x2190, "larr"), (0x2191, "uarr"), (0x2192, "rarr"), (0x2193, "darr"), (0x2194, "harr"),
    (0x21B5, "crarr"), (0x21D0, "lArr"), (0x21D1, "uArr"), (0x21D2, "rArr"), (0x21D3, "dArr"),
    (0x21D4, "hArr"), (0x2200, "forall"), (0x2202, "part"), (0x2203, "exist"), (0x2205, "empty"),
    (0x2207, "nabla"), (0x2208, "isin"), (0x2209, "notin"), (0x220B, "ni"), (0x220F, "prod"),
    (0x2211, "sum"), (0x2212, "minus"), (0x2217, "lowast"), (0x221A, "radic"), (0x221D, "prop"),
    (0x221E, "infin"), (0x2220, "ang"), (0x2227, "and"), (0x2228, "or"), (0x2229, "cap"),
    (0x222A, "cup"), (0x222B, "int"), (0x2234, "there4"), (0x223C, "sim"), (0x2245, "cong"),
    (0x2248, "asymp"), (0x2260, "ne"), (0x2261, "equiv"), (0x2264, "le"), (0x2265, "ge"),
    (0x2282, "sub"), (0x2283, "sup"), (0x2284, "nsub"), (0x2286, "sube"), (0x2287, "supe"),
    (0x2295, "oplus"), (0x2297, "otimes"), (0x22A5, "perp"), (0x22C5, "sdot"), (0x2308, "lceil"),
    (0x2309, "rceil"), (0x230A, "lfloor"), (0x230B, "rfloor"), (0x2329, "lang"), (0x232A, "rang"),
    (0x25CA, "loz"), (0x2660, "spades"), (0x2663, "clubs"), (0x2665, "hearts"), (0x2666, "diams"),
    (0x27E8, "lang"), (0x27E9, "rang"),
];

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

/// `bytes` in a buffer of `capacity`, which they must not exceed (a grown buffer would leave
/// a copy behind in a freed allocation).
fn sized(capacity: usize, bytes: impl Iterator<Item = u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    out.extend(bytes);
    out
}

/// JavaScript's `escape()`: letters, digits and `@*_+-./` as they are, other characters up
/// to U+00FF as `%XX` (`é` as `%E9`), the rest as `%uXXXX` (UTF-16 units).
fn js_escape(text: &str) -> Vec<u8> {
    let digits = hex_digits(true);
    let hex = |out: &mut Vec<u8>, u: u16, width: u32| {
        for shift in (0..width).rev() {
            out.push(digits[usize::from((u >> (4 * shift)) & 15)]);
        }
    };
    // At most three bytes per byte (`%uXXXX` for a two- or three-byte character, two of them
    // for a four-byte one): the buffer never grows (see `json_escaped`).
    let mut out = Vec::with_capacity(text.len() * 3);
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || "@*_+-./".contains(c) {
            out.push(c as u8);
        } else if let Ok(b) = u8::try_from(c) {
            out.push(b'%');
            hex(&mut out, u16::from(b), 2);
        } else {
            for u in c.encode_utf16(&mut [0u16; 2]) {
                out.extend_from_slice(b"%u");
                hex(&mut out, *u, 4);
            }
        }
    }
    out
}

/// Between the quotes of Python's `repr` of `bytes`: `\\`, the quote as `\'` (in `'…'`,
/// chosen unless only `'` is present), `\t`, `\n`, `\r`, printable ASCII as it is, any other
/// byte as `\xhh`.
fn python_bytes_repr(s: &[u8]) -> Vec<u8> {
    let quote = if s.contains(&b'\'') && !s.contains(&b'"') {
        b'"'
    } else {
        b'\''
    };
    let digits = hex_digits(false);
    // At most four bytes per byte: the buffer never grows (see `json_escaped`).
    let mut out = Vec::with_capacity(s.len() * 4);
    for &b in s {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b if b == quote => out.extend_from_slice(&[b'\\', b]),
            b' '..=b'~' => out.push(b),
            b => out.extend_from_slice(&[
                b'\\',
                b'x',
                digits[usize::from(b >> 4)],
                digits[usize::from(b & 15)],
            ]),
        }
    }
    out
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

    /// Breaks are looked for only after a line of base64 as wide as encoders wrap: a body
    /// of short lines (a hostile upstream's, or ordinary text) makes none, and no
    /// bookkeeping either.
    #[test]
    fn only_lines_of_base64_make_breaks() {
        let short = "ab\ncd\n".repeat(1000);
        assert!(base64_line_breaks(short.as_bytes()).is_empty());
        let line = "QUJDREVGR0hJSktMTU5PUA==".trim_end_matches('=');
        let wrapped = format!("{line}\n{line}\r\n{line}\\n{line}");
        assert_eq!(base64_line_breaks(wrapped.as_bytes()).len(), 3);
        let narrow = format!("{}\n{}", &line[..15], &line[..15]);
        assert!(base64_line_breaks(narrow.as_bytes()).is_empty());
    }

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

    /// Each form of each value, inside `wrap(form)`, is found by [`Spelled`] alone (no fixed
    /// form helps) and replaced exactly.
    fn assert_spelled(cases: &[(&str, &[&str])], wrap: impl Fn(&str) -> String) {
        for (value, forms) in cases {
            let spelled = Spelled::new(value.as_bytes()).unwrap();
            for form in *forms {
                let (out, changed) = spelled.scrub(wrap(form).as_bytes());
                assert!(changed, "{form}");
                let out = String::from_utf8(out).unwrap();
                assert_eq!(out, wrap("[REDACTED]"), "{form}");
            }
        }
    }

    /// Backslash escapes of Python and JavaScript, and JavaScript's `escape()`: each printed
    /// by the encoder named (Python 3.11, Node 18).
    #[test]
    fn python_and_javascript_escapes_are_spelled() {
        let cases: [(&str, &[&str]); 2] = [
            (
                "s3cr+t/key=9é\"'<>&",
                &[
                    r#"s3cr+t/key=9é"\'<>&"#,           // Python repr(str), both quotes
                    r#"s3cr+t/key=9\xe9"\'<>&"#,        // Python ascii(str)
                    r#"s3cr+t/key=9\xc3\xa9"\'<>&"#,    // Python repr(bytes)
                    r#"s3cr+t/key=9\xC3\xA9\"\'<>&"#,   // C, upper-case hex
                    "s3cr+t/key%3D9%E9%22%27%3C%3E%26", // JavaScript escape()
                ],
            ),
            (
                "CANARY\u{20AC}\u{1F600}/9x",
                &[
                    r"CANARY\u20ac\U0001f600/9x",             // Python ascii(str)
                    r"CANARY\xe2\x82\xac\xf0\x9f\x98\x80/9x", // Python repr(bytes)
                    "CANARY%u20AC%uD83D%uDE00/9x",            // JavaScript escape()
                ],
            ),
        ];
        assert_spelled(&cases, |form| format!("<pre>KeyError({form})</pre>"));
    }

    /// HTML references without their `;`, named, and escaped twice: written by hand (no
    /// encoder at hand writes the first two; PHP's `htmlentities` with `ENT_HTML5` and Java's
    /// `escapeHtml4` use such names) and each checked with Python's `html.unescape`, applied
    /// twice to those escaped twice; the others printed by Python's `html.escape`.
    #[test]
    fn html_references_without_semicolon_named_and_twice_are_spelled() {
        let cases: [(&str, &[&str]); 2] = [
            (
                "s3cr+t/key=9é\"'<>&",
                &[
                    "s3cr&#43t&#x2fkey&#61;9&#233&#34&#39&#60&#62&#38",
                    "s3cr&plus;t&sol;key&equals;9&eacute;&quot;&apos;&lt;&gt;&amp;",
                    "s3cr+t/key=9&eacute;&quot;'&lt;&gt;&amp;", // as escapeHtml4
                    "s3cr+t/key=9&#233;&quot;&#x27;&lt;&gt;&amp;", // xmlcharrefreplace
                    "s3cr+t/key=9é&amp;quot;&amp;#x27;&amp;lt;&amp;gt;&amp;amp;", // twice
                    "s3cr&amp;#43t&amp;sol;key&amp;equals;9&amp;#233;&amp;QUOT;'&amp;lt;>&amp;AMP;",
                ],
            ),
            (
                "CANARY\u{20AC}\u{1F600}/9x",
                &["CANARY&#x20ac&#x1f600/9x", "CANARY&euro;&#128512;/9x"],
            ),
        ];
        assert_spelled(&cases, |form| format!("<pre>KeyError({form})</pre>"));
    }

    /// What a decoder reads as another character is not the value: a reference without its
    /// `;` that the next byte continues (`&#439` is U+01B7), a name in the wrong case, an
    /// escape of a neighbouring character, and another value with the same anchor.
    #[test]
    fn near_misses_of_the_new_spellings_are_left() {
        let n = Needles::new(b"tok+9=end", &[]);
        for near in [
            "tok&#439=end",
            "tok&#x2b9=end",
            "tok+9&#x3dend",
            "tok&PLUS;9=end",
            "tok&plus9=end",
            "tok&amp;#44;9=end",
            "tok&amp;amp;#43;9=end",
            r"tok\x2c9=end",
            r"tok\\x2b9=end",
            "tok%u002C9=end",
            "tok%2C9=end",
            "tok+8=end",
            "tok&#43;9&equals;enD",
        ] {
            let (out, changed) = n.scrub(near.as_bytes());
            assert!(!changed, "{near}");
            assert_eq!(out, near.as_bytes());
        }
        // The same spellings of the value itself are found.
        for form in ["tok&#43;9=end", "tok&#x2b;9&#61end", r"tok\x2B9\x3dend"] {
            assert_eq!(n.scrub(form.as_bytes()).0, REDACTED, "{form}");
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
            body.push_str(r#"p@ss\'w"ord&#43;9&amp;sol;x%u003E "#);
        }
        body.push_str(r#"p@ss\u0027w\u0022ord\u002B9/x= p@ss\'w"ord&#43;9&amp;sol;x&#61"#);
        let (out, changed) = n.scrub(body.as_bytes());
        assert!(changed && out.ends_with(b"[REDACTED] [REDACTED]"));
    }

    /// JSON escaped twice by one serializer that escapes more than serde does (Python's
    /// non-ASCII, Go's `<>&`), and case changes beyond ASCII.
    #[test]
    fn twice_escaped_json_of_other_serializers_and_unicode_case_are_removed() {
        let cases: [(&str, &[&str]); 3] = [
            (
                "café Secret99",
                // Python 3.11: json.dumps(json.dumps(v)); v.upper(); v.lower()
                &[
                    r#"\"caf\\u00e9 Secret99\""#,
                    "CAFÉ SECRET99",
                    "café secret99",
                ],
            ),
            (
                "pass<word>Xyz&123",
                // Go 1.22: json.Marshal of json.Marshal(v) as a string
                &[r#"\"pass\\u003cword\\u003eXyz\\u0026123\""#],
            ),
            ("ÉCOLEsecret99", &["écolesecret99", "ÉCOLESECRET99"]),
        ];
        for (value, forms) in cases {
            let n = Needles::new(value.as_bytes(), &[]);
            for form in forms {
                let body = format!("{{\"error\": \"{form}\"}}");
                let (out, changed) = n.scrub(body.as_bytes());
                let rest = String::from_utf8_lossy(&out).replace("[REDACTED]", "");
                assert!(
                    changed
                        && rest
                            .replace("error", "")
                            .chars()
                            .all(|c| !c.is_alphanumeric()),
                    "{value}: {rest}"
                );
            }
        }
    }

    /// Random bodies mixing pieces of the value's forms, escape starts, line breaks, stray
    /// bytes and the value itself: the scrubber (its slicing around anchors, escapes and
    /// line breaks is intricate) never panics, and the raw value never survives it.
    #[test]
    fn random_bodies_never_panic_and_never_keep_the_raw_value() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % 1_000_003).unwrap()
        };
        let pieces: &[&[u8]] = &[
            b"&#", b"&#x", b";", b"&amp;", b"\\u00", b"\\u", b"\\x", b"\\", b"%", b"%u", b"%25",
            b"\n", b"\r\n", b"\\n", b"=", b"+", b"/", b"&", b"ab1", b"\xff", b"\xc3", b"&plus",
            b"&#43", b"9", b"QUJD",
        ];
        for value in [
            "p@ss'w\"ord+9/x=",
            "ab1-",
            "caf\u{e9} Secret99",
            "x",
            "AAAAAAAAAAAAAAAAAAAAAAAA",
            "\u{e9}\u{20ac}\u{1f600}<>&ab1",
        ] {
            let n = Needles::new(value.as_bytes(), &[]);
            let forms: Vec<Vec<u8>> = n.fixed.iter().map(|f| f.to_vec()).collect();
            for _ in 0..1500 {
                let mut body = Vec::new();
                for _ in 0..next() % 40 {
                    match next() % 4 {
                        0 => body.extend_from_slice(pieces[next() % pieces.len()]),
                        1 => {
                            let f = &forms[next() % forms.len()];
                            let a = next() % (f.len() + 1);
                            let b = a + next() % (f.len() - a + 1);
                            body.extend_from_slice(&f[a..b]);
                        }
                        2 => body.push(u8::try_from(next() % 256).unwrap()),
                        _ => body.extend_from_slice(value.as_bytes()),
                    }
                }
                if let Ok((out, _)) = n.scrub_all(&body) {
                    assert!(
                        memchr::memmem::find(&out, value.as_bytes()).is_none(),
                        "{value:?} kept in {:?} from {:?}",
                        String::from_utf8_lossy(&out),
                        String::from_utf8_lossy(&body)
                    );
                }
            }
        }
    }

    /// The named references are sorted by code point: the lookup's binary search relies on
    /// it (a name out of order would never be found).
    #[test]
    fn named_references_are_sorted_by_code_point() {
        assert!(NAMED_REFERENCES.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(html_reference_to(b"plus;", None, u32::from('+')));
        assert!(html_reference_to(b"euro;", None, 0x20AC));
    }

    /// A body of near misses costing more than the budget is refused as unchecked, not
    /// passed back searched in part: a service that has an echoing upstream send them
    /// first could otherwise have the value come back spelled after them.
    #[test]
    fn a_body_past_the_budget_is_unchecked() {
        let value = "ab1-".repeat(200);
        let n = Needles::new(value.as_bytes(), &[]);
        let mut body = "ab1 ".repeat(64 * 1024);
        body.push_str(&value.replace('-', "\\u002d"));
        assert!(n.scrub_all(body.as_bytes()).is_err());
        // The same near misses, fewer of them, are searched to the end.
        let mut body = "ab1 ".repeat(64);
        body.push_str(&value.replace('-', "\\u002d"));
        let (out, changed) = n.scrub(body.as_bytes());
        assert!(
            changed && out.ends_with(REDACTED),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    /// Whole-value forms of a value the character-by-character search does not take (no run
    /// of three letters or digits): each printed by the encoder named (Python 3.11, Node 18).
    #[test]
    fn whole_value_forms_are_removed_without_an_anchor() {
        let value = "a+b/c=\"d'é<9>&€";
        assert!(Spelled::new(value.as_bytes()).is_none());
        let n = Needles::new(value.as_bytes(), &[]);
        let forms = [
            // Python repr(value.encode()), between the quotes
            br#"a+b/c="d\'\xc3\xa9<9>&\xe2\x82\xac"#.to_vec(),
            // JavaScript escape()
            b"a+b/c%3D%22d%27%E9%3C9%3E%26%u20AC".to_vec(),
            // Python html.escape(html.escape(value))
            "a+b/c=&amp;quot;d&amp;#x27;é&amp;lt;9&amp;gt;&amp;amp;€".into(),
            // Python value.encode("utf-32-le") and "utf-32-be"
            hex::decode(
                "610000002b000000620000002f000000630000003d000000220000006400000027000000\
                 e90000003c000000390000003e00000026000000ac200000",
            )
            .unwrap(),
            hex::decode(
                "000000610000002b000000620000002f000000630000003d000000220000006400000027\
                 000000e90000003c000000390000003e00000026000020ac",
            )
            .unwrap(),
        ];
        for form in forms {
            let body = [&b"{\"echo\": \""[..], &form, b"\"}"].concat();
            let (out, changed) = n.scrub(&body);
            assert!(changed, "{}", String::from_utf8_lossy(&form));
            assert_eq!(out, b"{\"echo\": \"[REDACTED]\"}");
        }
        // Nor does any of them take text that only resembles the value.
        for near in [
            &br#"a+b/c="d\'\xc3\xa9<9>&\xe2\x82\xad"#[..],
            b"a+b/c%3D%22d%27%E9%3C9%3E%26%u20AD",
            "a+b/c=&amp;quot;d&amp;#x27;é&amp;lt;9&amp;gt;&amp;amp;¢".as_bytes(),
        ] {
            assert_eq!(n.scrub(near), (near.to_vec(), false));
        }
    }

    /// The value inside base64 wrapped into lines, a break falling inside its part: each
    /// printed by the encoder named (Python 3.11, OpenSSL 3), of
    /// `{"user": "alice", "key": "<value>"}`.
    #[test]
    fn base64_wrapped_into_lines_is_removed() {
        let value = b"sk_live_51H8xQ2eZvKYlo2C0aB3dE4fG5hI6jK7lM8nO9pQ0rS1tU2vW3xY4z";
        let forms: [&[u8]; 5] = [
            // Python base64.encodebytes (76 columns)
            b"eyJ1c2VyIjogImFsaWNlIiwgImtleSI6ICJza19saXZlXzUxSDh4UTJlWnZLWWxvMkMwYUIzZEU0\n\
              Zkc1aEk2aks3bE04bk85cFEwclMxdFUydlczeFk0eiJ9\n",
            // Python email.base64mime.body_encode(eol="\r\n") (MIME)
            b"eyJ1c2VyIjogImFsaWNlIiwgImtleSI6ICJza19saXZlXzUxSDh4UTJlWnZLWWxvMkMwYUIzZEU0\r\n\
              Zkc1aEk2aks3bE04bk85cFEwclMxdFUydlczeFk0eiJ9\r\n",
            // openssl base64 (64 columns, as PEM)
            b"eyJ1c2VyIjogImFsaWNlIiwgImtleSI6ICJza19saXZlXzUxSDh4UTJlWnZLWWxv\n\
              MkMwYUIzZEU0Zkc1aEk2aks3bE04bk85cFEwclMxdFUydlczeFk0eiJ9\n",
            // json.dumps of the first two
            br#"{"mail": "eyJ1c2VyIjogImFsaWNlIiwgImtleSI6ICJza19saXZlXzUxSDh4UTJlWnZLWWxvMkMwYUIzZEU0\nZkc1aEk2aks3bE04bk85cFEwclMxdFUydlczeFk0eiJ9\n"}"#,
            br#"{"mail": "eyJ1c2VyIjogImFsaWNlIiwgImtleSI6ICJza19saXZlXzUxSDh4UTJlWnZLWWxvMkMwYUIzZEU0\r\nZkc1aEk2aks3bE04bk85cFEwclMxdFUydlczeFk0eiJ9\r\n"}"#,
        ];
        let joined = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .replace("\\r\\n", "")
                .replace("\\n", "")
                .replace(['\r', '\n'], "")
        };
        // The value starts at byte 26, the third of a 3-byte group: its whole groups after.
        let part = STANDARD_NO_PAD.encode(&value[1..61]);
        let n = Needles::new(value, &[]);
        for form in forms {
            // A break falls inside the value's part.
            assert!(joined(form).contains(&part));
            assert!(!String::from_utf8_lossy(form).contains(&part));
            let (out, changed) = n.scrub(form);
            let text = String::from_utf8(out.clone()).unwrap();
            assert!(changed, "{text}");
            assert_eq!(text.matches("[REDACTED]").count(), 1, "{text}");
            // Exactly the value's part is replaced, with the line breaks inside it.
            let expected = joined(form).replacen(&part, "[REDACTED]", 1);
            assert_eq!(joined(&out), expected, "{text}");
        }
    }

    /// Base64 with line breaks that does not hold the value is left as it is: another value
    /// (one character differs in the middle) and random bytes (Python base64.encodebytes),
    /// and ordinary text broken into lines.
    #[test]
    fn other_base64_wrapped_into_lines_is_left() {
        let n = Needles::new(
            b"sk_live_51H8xQ2eZvKYlo2C0aB3dE4fG5hI6jK7lM8nO9pQ0rS1tU2vW3xY4z",
            &[],
        );
        for body in [
            // `…fG5hJ6…` instead of `…fG5hI6…`
            &b"eyJ1c2VyIjogImFsaWNlIiwgImtleSI6ICJza19saXZlXzUxSDh4UTJlWnZLWWxvMkMwYUIzZEU0\n\
               Zkc1aEo2aks3bE04bk85cFEwclMxdFUydlczeFk0eiJ9\n"[..],
            b"pU3KGCUwux1tEyze1iN7LtkeP3IfyxlxF0SU1kk8nVw0YL4xIB5p/tqg7ui5mX9cfCmZ/a/lkyU8\n\
              1lSvTfrXFCegrrP+6SMvivIhH57kkcWxC+y1Vjv8Hm+TQn7LyP4pVeXNjkbcjtS3wnZNKlpNdncG\n\
              +F2GkAJK1r2jQBvpyMvMyTX2zR9hImrhUziuGjQATTO6DSRqwEyBsbryPjv57vX3nytJNK+H9VIL\n\
              ablLDZguhbtVtnKocmN6zXRm/LYODo/xhGOw5LK6KXA0dPBkrGj3APWwKz3GZvRb3qosyu3NK1FX\n\
              QQ5N7krys09DCgc0R95jbA6AbJV7poTWQx+16tdCTQnhXQJMWEjyPR+m9zYdf2GNFTLnDiDipmaN\n\
              5/R+hGflRtU+yOKhJXvb\n",
            b"sk_live\nkey\r\nsk\\nlive\\r\\n51H8xQ2eZvKYlo2C0aB3dE4f\nG5hI6jK7lM8nO9pQ0rS1tU2vW3xY4z",
        ] {
            let text = String::from_utf8_lossy(body);
            assert_eq!(n.scrub(body), (body.to_vec(), false), "{text}");
        }
        // A form shorter than 8 characters is not searched for across a break (only as it
        // is): `k9!` is `azkh`.
        let n = Needles::new(b"k9!", &[]);
        let body = b"TWFueSBoYW5kcyBtYWtlIGxpZ2h0IHdvcmsuaz\nkhTWFueSBoYW5kcyBtYWtl\n";
        assert_eq!(n.scrub(body), (body.to_vec(), false));
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
