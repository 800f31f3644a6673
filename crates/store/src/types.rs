//! Plain data passed to and returned by a [`Store`](crate::Store).

use std::fmt;

use time::OffsetDateTime;

use crate::StoreError;

/// Default for [`NewVersion::max_versions`]: how many active versions a credential keeps.
pub const DEFAULT_MAX_VERSIONS: u32 = 10;
/// Default for [`NewVersion::keep_destroyed`]: how far behind the newest version a destroyed
/// version stays listed as a tombstone. With the product's 8 KiB of metadata per version,
/// a credential's tombstones stay under 1 MiB.
pub const DEFAULT_KEEP_DESTROYED: u32 = 100;
/// The most tombstones one put deletes (see [`NewVersion::keep_destroyed`]): a backlog (the
/// first puts after an upgrade, or after the window was lowered) goes over the following
/// puts instead of in one long transaction that would hold the writer.
pub const TRIM_TOMBSTONES_PER_PUT: u32 = 256;
/// The usual per-owner quota of live credentials (see [`NewVersion::max_credentials`]): far
/// above what one user keeps (a credential per third-party service), low enough that one
/// owner cannot fill the store (at most about 640 MiB of sealed values with the product's
/// 64 KiB values and the default 10 versions kept), and a create's count stays a short index
/// range.
pub const DEFAULT_MAX_CREDENTIALS_PER_OWNER: u32 = 1000;
/// Longest owner id, in bytes (owners are any non-empty UTF-8 up to this length).
pub const MAX_OWNER_LEN: usize = 255;
/// Longest credential name, in bytes. The name grammar itself is checked by the caller.
pub const MAX_NAME_LEN: usize = 128;
/// Largest sealed value the store accepts, in bytes: a 64 KiB plaintext plus generous room
/// for the envelope. A sanity bound, not the product limit (that is the caller's).
pub const MAX_SEALED_LEN: usize = 256 * 1024;
/// Largest wrapped data key the store accepts, in bytes.
pub const MAX_WRAPPED_KEY_LEN: usize = 16 * 1024;
/// Largest page size for [`Store::list_credentials`](crate::Store::list_credentials) and
/// [`Store::versions_for_rewrap`](crate::Store::versions_for_rewrap); larger limits are clamped.
pub const MAX_PAGE_LIMIT: u32 = 1000;

/// Which key-encryption key wrapped a version's data key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KekRef {
    /// The key provider (`local`, `aws-kms`, `pkcs11`, `transit`, ...).
    pub provider: String,
    /// The provider's id for the key.
    pub key_id: String,
    /// The key's version within the provider.
    pub version: u32,
}

impl KekRef {
    /// A `KekRef` from its parts.
    pub fn new(provider: impl Into<String>, key_id: impl Into<String>, version: u32) -> Self {
        KekRef {
            provider: provider.into(),
            key_id: key_id.into(),
            version,
        }
    }
}

/// Which versions [`Store::versions_for_rewrap`](crate::Store::versions_for_rewrap) yields.
/// Only active versions are ever yielded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KekFilter {
    /// Versions wrapped by exactly this KEK (provider, key id and version).
    Exactly(KekRef),
    /// Versions wrapped by any version of this provider's key.
    AnyVersionOf {
        /// The key provider.
        provider: String,
        /// The provider's key id.
        key_id: String,
    },
    /// Versions wrapped by anything but this KEK (the usual rewrap: "move everything to the
    /// new KEK").
    Not(KekRef),
}

/// A new version to store; see [`Store::put_version`](crate::Store::put_version).
///
/// `Debug` shows the lengths of `sealed_value` and `wrapped_key`, never their bytes.
#[derive(Clone)]
pub struct NewVersion {
    /// The owner (any non-empty UTF-8 up to [`MAX_OWNER_LEN`] bytes).
    pub owner: String,
    /// The credential name (non-empty, up to [`MAX_NAME_LEN`] bytes).
    pub name: String,
    /// The version number the value was sealed for. Must be exactly `latest + 1`, where
    /// `latest` is the highest number ever allocated for this credential (0 for a new one),
    /// else the put fails with [`StoreError::Conflict`].
    pub version: u32,
    /// Check-and-set on the credential's *current* version: `None` = no check;
    /// `Some(0)` = the credential must have no current version (it does not exist yet, was
    /// destroyed, or all its versions were destroyed); `Some(n)` = its current version must
    /// be `n`. On mismatch the put fails with [`StoreError::CurrentMismatch`].
    pub expected_current: Option<u32>,
    /// The sealed (encrypted) value, opaque to the store.
    pub sealed_value: Vec<u8>,
    /// The data key, wrapped by `kek`, opaque to the store.
    pub wrapped_key: Vec<u8>,
    /// The KEK that wrapped `wrapped_key`.
    pub kek: KekRef,
    /// Non-secret metadata (labels, host, expiry, ...), stored as JSON.
    pub metadata: serde_json::Value,
    /// Who wrote it (a principal id).
    pub created_by: String,
    /// When it was written (stored with millisecond precision). Also becomes the
    /// credential's `updated_at`.
    pub created_at: OffsetDateTime,
    /// Retention: after the insert, while the credential has more than this many active
    /// versions, its oldest non-current active version is destroyed. Must be at least 1;
    /// [`DEFAULT_MAX_VERSIONS`] unless the caller says otherwise.
    pub max_versions: u32,
    /// Tombstone retention: after the insert (and the retention above), the rows of destroyed
    /// versions more than this many numbers behind the new version are deleted, metadata
    /// and all: a destroyed version `v` goes once `version - v > keep_destroyed`, the oldest
    /// first and at most [`TRIM_TOMBSTONES_PER_PUT`] per put. Active versions are never
    /// deleted, and numbering never reuses a number (the credential row keeps the latest).
    /// [`DEFAULT_KEEP_DESTROYED`] unless the caller says otherwise; 0 deletes every destroyed
    /// version's row at the next put.
    pub keep_destroyed: u32,
    /// Per-owner quota: when this put creates the credential (or re-creates one destroyed as
    /// a whole) and the owner already has this many live credentials, the put fails with
    /// [`StoreError::QuotaExceeded`] and writes nothing. New versions of a live credential
    /// are never refused by it. `None` (the default here) = no quota; `Some(0)` refuses
    /// every new credential.
    pub max_credentials: Option<u32>,
}

impl NewVersion {
    /// A new version with no check-and-set, empty metadata (`{}`) and the default retention.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        owner: impl Into<String>,
        name: impl Into<String>,
        version: u32,
        sealed_value: Vec<u8>,
        wrapped_key: Vec<u8>,
        kek: KekRef,
        created_by: impl Into<String>,
        created_at: OffsetDateTime,
    ) -> Self {
        NewVersion {
            owner: owner.into(),
            name: name.into(),
            version,
            expected_current: None,
            sealed_value,
            wrapped_key,
            kek,
            metadata: serde_json::Value::Object(serde_json::Map::new()),
            created_by: created_by.into(),
            created_at,
            max_versions: DEFAULT_MAX_VERSIONS,
            keep_destroyed: DEFAULT_KEEP_DESTROYED,
            max_credentials: None,
        }
    }

    /// Tombstone retention's bound: destroyed versions numbered below it are due (see
    /// [`NewVersion::keep_destroyed`]); `None` when no version can be.
    pub(crate) fn tombstones_due_below(&self) -> Option<u32> {
        self.version
            .checked_sub(self.keep_destroyed)
            .filter(|&bound| bound > 1)
    }

    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        validate_owner_name(&self.owner, &self.name)?;
        if self.version == 0 {
            return Err(StoreError::InvalidInput("version numbers start at 1"));
        }
        if self.version > i32::MAX as u32 {
            return Err(StoreError::InvalidInput("version number too large"));
        }
        if self.max_versions == 0 {
            return Err(StoreError::InvalidInput("max_versions must be at least 1"));
        }
        if self.sealed_value.len() > MAX_SEALED_LEN {
            return Err(StoreError::InvalidInput("sealed value too large"));
        }
        if self.wrapped_key.len() > MAX_WRAPPED_KEY_LEN {
            return Err(StoreError::InvalidInput("wrapped key too large"));
        }
        validate_kek(&self.kek)?;
        if self.created_by.len() > 1024 {
            return Err(StoreError::InvalidInput("created_by too long"));
        }
        to_millis(self.created_at)?;
        Ok(())
    }
}

impl fmt::Debug for NewVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewVersion")
            .field("owner", &self.owner)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("expected_current", &self.expected_current)
            .field("sealed_value", &Redacted(self.sealed_value.len()))
            .field("wrapped_key", &Redacted(self.wrapped_key.len()))
            .field("kek", &self.kek)
            .field("metadata", &self.metadata)
            .field("created_by", &self.created_by)
            .field("created_at", &self.created_at)
            .field("max_versions", &self.max_versions)
            .field("keep_destroyed", &self.keep_destroyed)
            .field("max_credentials", &self.max_credentials)
            .finish()
    }
}

struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes redacted>", self.0)
    }
}

/// What a successful [`Store::put_version`](crate::Store::put_version) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PutOutcome {
    /// The version created (now the current one).
    pub version: u32,
    /// Versions destroyed by retention in the same transaction, oldest first.
    pub retired: Vec<u32>,
}

/// Whether a version still holds its sealed value and wrapped key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VersionState {
    /// Readable (given the KEK).
    Active,
    /// Its sealed value and wrapped data key were erased; only the tombstone row remains.
    Destroyed,
}

impl VersionState {
    pub(crate) fn from_db(v: i64) -> Result<Self, StoreError> {
        match v {
            0 => Ok(VersionState::Active),
            1 => Ok(VersionState::Destroyed),
            _ => Err(StoreError::corrupt("unknown version state")),
        }
    }
}

/// A version's non-secret facts, as listed by [`Store::get_credential`](crate::Store::get_credential).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct VersionInfo {
    /// The version number.
    pub version: u32,
    /// Active or destroyed.
    pub state: VersionState,
    /// The KEK that wrapped (or had wrapped, if destroyed) its data key.
    pub kek: KekRef,
    /// Non-secret metadata (`null` when it no longer reads: see `metadata_unreadable`).
    pub metadata: serde_json::Value,
    /// The stored metadata is no JSON (damaged, or edited outside Strongroom). The listing
    /// goes on and says so, so the owner can find the version; it does not reveal.
    pub metadata_unreadable: bool,
    /// Who wrote it.
    pub created_by: String,
    /// When it was written.
    pub created_at: OffsetDateTime,
    /// When it was destroyed, if it was.
    pub destroyed_at: Option<OffsetDateTime>,
}

/// A credential's facts without its versions, as listed by
/// [`Store::list_credentials`](crate::Store::list_credentials).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CredentialSummary {
    /// The owner.
    pub owner: String,
    /// The credential name.
    pub name: String,
    /// `false` when disabled (the kill switch): versions are kept but should not be used.
    pub enabled: bool,
    /// The current version, if any version is active and chosen.
    pub current_version: Option<u32>,
    /// The highest version number ever allocated (the next put must use `latest_version + 1`).
    pub latest_version: u32,
    /// The current version's metadata, if there is a current version and it reads.
    pub current_metadata: Option<serde_json::Value>,
    /// The current version's stored metadata is no JSON (damaged, or edited outside
    /// Strongroom): `current_metadata` is then `None`, and the listing goes on.
    pub current_metadata_unreadable: bool,
    /// When the credential was first created (or re-created after a whole destroy).
    pub created_at: OffsetDateTime,
    /// When it last changed (put, set current, enable/disable, destroy).
    pub updated_at: OffsetDateTime,
    /// When a value was last used (see [`Store::touch_last_used`](crate::Store::touch_last_used)).
    pub last_used_at: Option<OffsetDateTime>,
}

/// A credential with all its versions (newest first), as returned by
/// [`Store::get_credential`](crate::Store::get_credential), or with one page of them
/// ([`Store::get_credential_page`](crate::Store::get_credential_page)). Holds no secret bytes.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Credential {
    /// Everything [`list_credentials`](crate::Store::list_credentials) shows.
    pub summary: CredentialSummary,
    /// Every version, active or destroyed, newest first; from
    /// [`Store::get_credential_page`](crate::Store::get_credential_page), one page of them.
    pub versions: Vec<VersionInfo>,
    /// When versions older than this page remain: the `before` that asks for the next page
    /// (the number of this page's oldest version). `None` on the last page.
    pub versions_next: Option<u32>,
}

/// Cuts `versions`, read with one row more than `limit`, to the page, and says where the next
/// page starts (the page's oldest version) if that extra row was there.
pub(crate) fn cut_page(versions: &mut Vec<VersionInfo>, limit: Option<u32>) -> Option<u32> {
    let limit = limit? as usize;
    // The query stops one row past the page: reading all and cutting here is the unbounded
    // read this replaces.
    debug_assert!(versions.len() <= limit + 1, "the page read was not bounded");
    if versions.len() <= limit {
        return None;
    }
    versions.truncate(limit);
    versions.last().map(|v| v.version)
}

/// A version's sealed bytes, as returned by [`Store::get_version`](crate::Store::get_version).
///
/// `Debug` shows the lengths of `sealed_value` and `wrapped_key`, never their bytes.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct SealedVersion {
    /// The owner.
    pub owner: String,
    /// The credential name.
    pub name: String,
    /// The version number.
    pub version: u32,
    /// Whether the credential is enabled (the caller decides what a disabled one allows).
    pub credential_enabled: bool,
    /// Whether this version is the credential's current one.
    pub is_current: bool,
    /// The sealed value.
    pub sealed_value: Vec<u8>,
    /// The wrapped data key.
    pub wrapped_key: Vec<u8>,
    /// The KEK that wrapped the data key.
    pub kek: KekRef,
    /// Non-secret metadata.
    pub metadata: serde_json::Value,
    /// Who wrote it.
    pub created_by: String,
    /// When it was written.
    pub created_at: OffsetDateTime,
}

impl fmt::Debug for SealedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedVersion")
            .field("owner", &self.owner)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("credential_enabled", &self.credential_enabled)
            .field("is_current", &self.is_current)
            .field("sealed_value", &Redacted(self.sealed_value.len()))
            .field("wrapped_key", &Redacted(self.wrapped_key.len()))
            .field("kek", &self.kek)
            .field("metadata", &self.metadata)
            .field("created_by", &self.created_by)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// Taken before a read whose answer will be released (a reveal, a brokered use); see
/// [`Store::confirm_unchanged`](crate::Store::confirm_unchanged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadMark {
    pub(crate) epoch: u64,
    pub(crate) checked: u64,
}

/// What [`Store::get_version`](crate::Store::get_version) served, for
/// [`Store::confirm_unchanged`](crate::Store::confirm_unchanged). No secret bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedVersion {
    /// The owner.
    pub owner: String,
    /// The credential name.
    pub name: String,
    /// The version asked for (`None`: the current one).
    pub requested: Option<u32>,
    /// The version served.
    pub version: u32,
    /// Whether the credential was enabled.
    pub enabled: bool,
}

impl SealedVersion {
    /// What this answer to a `get_version(.., requested)` served.
    pub fn served(&self, requested: Option<u32>) -> ServedVersion {
        ServedVersion {
            owner: self.owner.clone(),
            name: self.name.clone(),
            requested,
            version: self.version,
            enabled: self.credential_enabled,
        }
    }
}

/// One version to rewrap, as yielded by
/// [`Store::versions_for_rewrap`](crate::Store::versions_for_rewrap).
///
/// `Debug` shows the length of `wrapped_key`, never its bytes.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct RewrapItem {
    /// The owner.
    pub owner: String,
    /// The credential name.
    pub name: String,
    /// The version number.
    pub version: u32,
    /// The wrapped data key to unwrap and wrap again.
    pub wrapped_key: Vec<u8>,
    /// The KEK that wrapped it (pass it as `expected_old_kek` to
    /// [`Store::replace_wrapped_key`](crate::Store::replace_wrapped_key)).
    pub kek: KekRef,
    /// The version's non-secret metadata (parts of it, such as the bound host, are in the
    /// associated data).
    pub metadata: serde_json::Value,
}

impl fmt::Debug for RewrapItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RewrapItem")
            .field("owner", &self.owner)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("wrapped_key", &Redacted(self.wrapped_key.len()))
            .field("kek", &self.kek)
            .finish()
    }
}

/// One page of results plus the cursor for the next page (`None` when this was the last).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Pass this to the next call to continue; `None` when there is nothing more.
    pub next: Option<Cursor>,
}

impl<T> Page<T> {
    /// A page of at most `limit` from `items`, read with a limit of `limit + 1`: the cursor
    /// (of the page's last item) only when there was one more, so that the last page says
    /// it is the last.
    pub(crate) fn of_one_more(
        mut items: Vec<T>,
        limit: u32,
        cursor: impl FnOnce(&T) -> Cursor,
    ) -> Self {
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next = if more { items.last().map(cursor) } else { None };
        Self { items, next }
    }
}

/// An opaque pagination cursor. Its text form ([`Cursor::as_str`]) is safe to hand to a
/// client or persist (for a resumable rewrap) and to parse back with [`Cursor::parse`].
/// A cursor from one operation is rejected by the other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cursor(String);

const LIST_PREFIX: &str = "c1.";
const REWRAP_PREFIX: &str = "r1.";

impl Cursor {
    /// The cursor's text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a cursor's text form. Only a syntax check: a cursor is validated fully when
    /// it is used.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] if `s` is not a cursor.
    pub fn parse(s: &str) -> Result<Cursor, StoreError> {
        let c = Cursor(s.to_owned());
        if c.list_after().is_ok() || c.rewrap_after().is_ok() {
            Ok(c)
        } else {
            Err(StoreError::InvalidInput("malformed cursor"))
        }
    }

    pub(crate) fn for_list(after_name: &str) -> Cursor {
        let mut s = String::with_capacity(LIST_PREFIX.len() + 2 * after_name.len());
        s.push_str(LIST_PREFIX);
        for b in after_name.as_bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        Cursor(s)
    }

    pub(crate) fn list_after(&self) -> Result<String, StoreError> {
        const BAD: StoreError = StoreError::InvalidInput("malformed cursor");
        let hex = self.0.strip_prefix(LIST_PREFIX).ok_or(BAD)?;
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * MAX_NAME_LEN {
            return Err(BAD);
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    // Lower case only, as the cursors are written: one spelling each.
                    .filter(|h| h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(BAD)
            })
            .collect::<Result<Vec<u8>, _>>()?;
        String::from_utf8(bytes).map_err(|_| BAD)
    }

    pub(crate) fn for_rewrap(after_row: i64) -> Cursor {
        Cursor(format!("{REWRAP_PREFIX}{after_row}"))
    }

    pub(crate) fn rewrap_after(&self) -> Result<i64, StoreError> {
        self.0
            .strip_prefix(REWRAP_PREFIX)
            .and_then(|n| n.parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or(StoreError::InvalidInput("malformed cursor"))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn validate_owner_name(owner: &str, name: &str) -> Result<(), StoreError> {
    if owner.is_empty() {
        return Err(StoreError::InvalidInput("owner is empty"));
    }
    if owner.len() > MAX_OWNER_LEN {
        return Err(StoreError::InvalidInput("owner longer than 255 bytes"));
    }
    validate_name(name)
}

pub(crate) fn validate_owner(owner: &str) -> Result<(), StoreError> {
    validate_owner_name(owner, "x")
}

pub(crate) fn validate_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty() {
        return Err(StoreError::InvalidInput("name is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StoreError::InvalidInput("name longer than 128 bytes"));
    }
    Ok(())
}

pub(crate) fn validate_kek(kek: &KekRef) -> Result<(), StoreError> {
    if kek.provider.is_empty() || kek.provider.len() > 64 {
        return Err(StoreError::InvalidInput("KEK provider empty or too long"));
    }
    if kek.key_id.is_empty() || kek.key_id.len() > 2048 {
        return Err(StoreError::InvalidInput("KEK key id empty or too long"));
    }
    Ok(())
}

pub(crate) fn validate_version(version: u32) -> Result<(), StoreError> {
    if version == 0 || version > i32::MAX as u32 {
        return Err(StoreError::InvalidInput("version number out of range"));
    }
    Ok(())
}

pub(crate) fn clamp_limit(limit: u32) -> Result<u32, StoreError> {
    if limit == 0 {
        return Err(StoreError::InvalidInput("limit must be at least 1"));
    }
    Ok(limit.min(MAX_PAGE_LIMIT))
}

/// A time bound of a query in Unix milliseconds, rounded up: times are stored to the
/// millisecond, so a bound between two (`since` inclusive, `until` exclusive) takes exactly
/// the stored times at or after it (truncated, `since` took one before it and `until` left
/// out one before it).
pub(crate) fn bound_millis(t: OffsetDateTime) -> Result<i64, StoreError> {
    let nanos = t.unix_timestamp_nanos();
    i64::try_from(nanos.div_euclid(1_000_000) + i128::from(nanos.rem_euclid(1_000_000) != 0))
        .map_err(|_| StoreError::InvalidInput("timestamp out of range"))
}

/// Unix milliseconds, the storage form of every timestamp.
pub(crate) fn to_millis(t: OffsetDateTime) -> Result<i64, StoreError> {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| StoreError::InvalidInput("timestamp out of range"))
}

pub(crate) fn from_millis(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|_| StoreError::corrupt("timestamp out of range"))
}

pub(crate) fn version_from_db(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::corrupt("version number out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cursor_round_trips_unicode() {
        for name in ["a", "zoom.api-key", "ü-€-𝄞", &"z".repeat(MAX_NAME_LEN)] {
            let c = Cursor::for_list(name);
            let parsed = Cursor::parse(c.as_str()).unwrap();
            assert_eq!(parsed.list_after().unwrap(), name);
            assert!(parsed.rewrap_after().is_err());
        }
    }

    #[test]
    fn rewrap_cursor_round_trips() {
        let c = Cursor::for_rewrap(42);
        assert_eq!(
            Cursor::parse(c.as_str()).unwrap().rewrap_after().unwrap(),
            42
        );
        assert!(c.list_after().is_err());
    }

    #[test]
    fn bad_cursors_are_rejected() {
        for s in [
            "", "c1.", "c1.0", "c1.zz", "c1.ff", "r1.-1", "r1.x", "x", "c2.61",
        ] {
            assert!(Cursor::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn debug_never_shows_secret_bytes() {
        let nv = NewVersion::new(
            "o",
            "n",
            1,
            b"SEALEDSECRET".to_vec(),
            b"WRAPPEDSECRET".to_vec(),
            KekRef::new("local", "k", 1),
            "me",
            OffsetDateTime::UNIX_EPOCH,
        );
        let s = format!("{nv:?}");
        assert!(!s.contains("SECRET") && !s.contains("83, 69"), "{s}");
        assert!(s.contains("12 bytes redacted"));
    }

    #[test]
    fn millis_round_trip() {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        assert_eq!(from_millis(to_millis(t).unwrap()).unwrap(), t);
    }
}

/// A change to a credential other than a new version (see [`crate::Store::change_audited`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Make this version the current one ([`crate::Store::set_current`]).
    SetCurrent(u32),
    /// Disable (`false`) or enable (`true`) ([`crate::Store::set_enabled`]).
    SetEnabled(bool),
    /// Destroy one version ([`crate::Store::destroy_version`]).
    DestroyVersion(u32),
    /// Destroy every version ([`crate::Store::destroy_credential`]).
    DestroyCredential,
}
