//! Where a sealed value belongs, and the ONE canonical encoding of associated data.
//!
//! A [`Binding`] names the place a value was written for: owner, credential name, version
//! number, plus optional extra bound fields (for example the destinations a credential may be
//! sent to). [`encode`] turns a set of labelled fields into associated data:
//!
//! ```text
//! aad    = "strongroom-aad" 0x00 count:u8 field*          (fields sorted by label, unique)
//! field  = label_len:u8 label:ascii value_len:u32be value
//! ```
//!
//! Every field is length-prefixed and the labels are sorted, so the encoding is injective:
//! two different field sets never give the same bytes, whatever the values contain (an owner
//! id holding `"\x00name"` cannot impersonate another owner/name split). The envelope uses
//! this one encoding for both of its layers, with a `purpose` field telling them apart
//! (see [`crate::envelope`] for the exact field list).

use std::collections::BTreeMap;

/// Longest owner id, in bytes of UTF-8.
pub const MAX_OWNER_LEN: usize = 255;
/// Longest credential name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest value of an extra bound field.
pub const MAX_EXTRA_LEN: usize = 4096;
/// Most extra bound fields on one binding.
pub const MAX_EXTRA_FIELDS: usize = 16;

const DOMAIN: &[u8] = b"strongroom-aad\x00";

/// Labels the envelope itself uses; extra fields may not take them.
pub(crate) const RESERVED_LABELS: &[&str] = &[
    "alg",
    "format",
    "purpose",
    "owner",
    "name",
    "version",
    "kek.provider",
    "kek.id",
    "kek.version",
];

/// The place a credential version lives: `(owner, name, version)` plus extra bound fields.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Binding {
    owner: String,
    name: String,
    version: u32,
    extra: BTreeMap<String, Vec<u8>>,
}

/// A binding that cannot name a credential version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    /// The owner id is empty or longer than 255 bytes.
    #[error("owner id must be 1 to 255 bytes of UTF-8 without control characters")]
    InvalidOwner,
    /// The name does not match `[a-z0-9][a-z0-9._-]{0,127}`.
    #[error("credential name must match [a-z0-9][a-z0-9._-]{{0,127}}")]
    InvalidName,
    /// Version numbers start at 1.
    #[error("version numbers start at 1")]
    InvalidVersion,
    /// An extra field's label is reserved, malformed, or its value too long.
    #[error("extra bound field label must match [a-z0-9._-]{{1,64}}, not be reserved, and hold at most 4096 bytes (16 fields at most)")]
    InvalidExtraField,
}

/// Whether `name` is a valid credential name: `[a-z0-9][a-z0-9._-]{0,127}`.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    match bytes.first() {
        Some(first) if first.is_ascii_lowercase() || first.is_ascii_digit() => {}
        _ => return false,
    }
    bytes.len() <= MAX_NAME_LEN
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Whether `owner` is a valid owner id: 1 to 255 bytes of UTF-8 without control characters
/// (an identity provider's `sub` has none; a NUL would not even fit PostgreSQL's text).
pub fn is_valid_owner(owner: &str) -> bool {
    !owner.is_empty() && owner.len() <= MAX_OWNER_LEN && !owner.chars().any(char::is_control)
}

fn is_valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 64
        && label.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && !RESERVED_LABELS.contains(&label)
}

impl Binding {
    /// A binding for version `version` of credential `name` owned by `owner`.
    ///
    /// # Errors
    ///
    /// [`BindingError`] when the owner, name or version is out of range.
    pub fn new(owner: &str, name: &str, version: u32) -> Result<Self, BindingError> {
        if !is_valid_owner(owner) {
            return Err(BindingError::InvalidOwner);
        }
        if !is_valid_name(name) {
            return Err(BindingError::InvalidName);
        }
        if version == 0 {
            return Err(BindingError::InvalidVersion);
        }
        Ok(Self {
            owner: owner.to_owned(),
            name: name.to_owned(),
            version,
            extra: BTreeMap::new(),
        })
    }

    /// Adds an extra bound field (for example `destinations`). Sealing and opening must use
    /// the same extra fields.
    ///
    /// # Errors
    ///
    /// [`BindingError::InvalidExtraField`] for a reserved or malformed label, an oversized
    /// value, or too many fields.
    pub fn with_field(mut self, label: &str, value: &[u8]) -> Result<Self, BindingError> {
        if !is_valid_label(label)
            || value.len() > MAX_EXTRA_LEN
            || (self.extra.len() >= MAX_EXTRA_FIELDS && !self.extra.contains_key(label))
        {
            return Err(BindingError::InvalidExtraField);
        }
        self.extra.insert(label.to_owned(), value.to_vec());
        Ok(self)
    }

    /// The owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The credential name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version number.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The binding's own fields (owner, name, version, extras) as labelled values.
    pub(crate) fn fields(&self) -> Vec<(&str, Vec<u8>)> {
        let mut out: Vec<(&str, Vec<u8>)> = vec![
            ("owner", self.owner.as_bytes().to_vec()),
            ("name", self.name.as_bytes().to_vec()),
            ("version", self.version.to_be_bytes().to_vec()),
        ];
        out.extend(self.extra.iter().map(|(k, v)| (k.as_str(), v.clone())));
        out
    }
}

/// Encodes labelled fields canonically (sorted by label). Labels must be unique, ASCII and at
/// most 255 bytes; values at most `u32::MAX` bytes. Callers inside this crate guarantee both.
pub(crate) fn encode(fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut sorted: Vec<&(&str, Vec<u8>)> = fields.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    debug_assert!(
        sorted.windows(2).all(|w| w[0].0 != w[1].0),
        "duplicate label"
    );
    let len = DOMAIN.len()
        + 1
        + sorted
            .iter()
            .map(|(l, v)| 5 + l.len() + v.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(DOMAIN);
    // At most 9 reserved + 16 extra fields, so the count fits in a byte.
    out.push(sorted.len() as u8);
    for (label, value) in sorted {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        for ok in ["a", "zoom.api-key", "0", "a_b-c.d", &"a".repeat(128)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "A",
            ".a",
            "-a",
            "a/b",
            "a b",
            "é",
            &"a".repeat(129),
            "a%2f",
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn owners_are_bounded_utf8() {
        assert!(Binding::new("ü", "n", 1).is_ok());
        assert!(Binding::new(&"o".repeat(255), "n", 1).is_ok());
        assert_eq!(Binding::new("", "n", 1), Err(BindingError::InvalidOwner));
        assert_eq!(
            Binding::new(&"o".repeat(256), "n", 1),
            Err(BindingError::InvalidOwner)
        );
        assert_eq!(Binding::new("o", "n", 0), Err(BindingError::InvalidVersion));
        for control in ["a\0b", "tab\there", "line\n", "del\u{7f}", "c1\u{85}"] {
            assert_eq!(
                Binding::new(control, "n", 1),
                Err(BindingError::InvalidOwner),
                "{control:?}"
            );
        }
        assert!(Binding::new("tenant a:bob@example.com", "n", 1).is_ok());
    }

    #[test]
    fn extra_fields_cannot_shadow_reserved_ones() {
        let b = Binding::new("o", "n", 1).unwrap();
        for label in RESERVED_LABELS {
            assert_eq!(
                b.clone().with_field(label, b"x"),
                Err(BindingError::InvalidExtraField)
            );
        }
        assert!(b.clone().with_field("destinations", b"api.zoom.us").is_ok());
        assert!(b.with_field("d", &[0; MAX_EXTRA_LEN + 1]).is_err());
    }

    #[test]
    fn encoding_is_injective_across_field_boundaries() {
        // "ab" + "c" must not collide with "a" + "bc".
        let one = encode(&[("owner", b"ab".to_vec()), ("name", b"c".to_vec())]);
        let two = encode(&[("owner", b"a".to_vec()), ("name", b"bc".to_vec())]);
        assert_ne!(one, two);
        // Order of the input does not matter: the encoding sorts.
        let three = encode(&[("name", b"c".to_vec()), ("owner", b"ab".to_vec())]);
        assert_eq!(one, three);
    }

    #[test]
    fn encoding_matches_the_documented_layout() {
        let got = encode(&[("b", vec![1]), ("a", vec![])]);
        let mut want = b"strongroom-aad\x00".to_vec();
        want.push(2);
        want.extend_from_slice(&[1, b'a', 0, 0, 0, 0]);
        want.extend_from_slice(&[1, b'b', 0, 0, 0, 1, 1]);
        assert_eq!(got, want);
    }
}
