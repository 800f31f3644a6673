//! The use cases over a store and a key provider.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use strongroom_crypto::binding::{is_valid_name, is_valid_owner};
use strongroom_crypto::{
    envelope, Binding, EnvelopeError, KeyProvider, Sealed, SecretBytes, SecureRandom, WrappedKey,
};
use strongroom_store::audit::{Event, HeadKey, Record};
use strongroom_store::{
    Change, Credential, CredentialSummary, Cursor, NewVersion, Page, RateLimit, RateScope,
    ReadMark, ServedVersion, Store, StoreError,
};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::usage::UsageLog;
use crate::CoreError;

/// Largest credential value, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Largest metadata document (serialized JSON), in bytes.
pub const MAX_METADATA_LEN: usize = 8 * 1024;
/// How long a put keeps re-sealing after losing the version-number race to writers on other
/// nodes (writers on this node queue on a stripe lock instead) before it answers
/// `Contended`. A count of 64 immediate retries was not enough under load: a writer the
/// scheduler starved lost round after round to racers that were always quicker.
const PUT_CONTENTION_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest random pause before a retry after losing a race; the pause's range doubles
/// from 50 µs with each round lost until it reaches this.
const PUT_BACKOFF_MAX_MICROS: u64 = 6_400;
/// Stripe locks serialising puts to one credential within this process.
const PUT_STRIPES: usize = 256;
/// Credentials whose latest version numbers a node remembers before it starts over.
const MAX_LATEST_HINTS: usize = if cfg!(test) { 64 } else { 65_536 };

/// Why a version is opened: to use it (reveal, broker: an expired one is refused), or to
/// compare the owner's guess with it (verify: it is still the owner's value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    ToUse,
    ToCompare,
}

/// The time source, injected so tests can pin it.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, in UTC.
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Tunables.
#[derive(Clone, Debug)]
pub struct VaultConfig {
    /// Active versions kept per credential; older ones are destroyed on put.
    pub max_versions: u32,
    /// How far behind the newest version a destroyed version stays listed; a put deletes
    /// the older tombstones (see `NewVersion::keep_destroyed`).
    pub keep_destroyed: u32,
    /// Live credentials an owner may have: a put that would create one more is refused
    /// ([`CoreError::QuotaExceeded`]). `None`: no quota (the server always sets one).
    pub max_credentials_per_owner: Option<u32>,
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self {
            max_versions: strongroom_store::DEFAULT_MAX_VERSIONS,
            keep_destroyed: strongroom_store::DEFAULT_KEEP_DESTROYED,
            max_credentials_per_owner: Some(strongroom_store::DEFAULT_MAX_CREDENTIALS_PER_OWNER),
        }
    }
}

/// A new value for a credential.
pub struct PutRequest<'a> {
    /// Whose credential.
    pub owner: &'a str,
    /// Its name.
    pub name: &'a str,
    /// The value; zeroized when dropped.
    pub value: SecretBytes,
    /// Non-secret metadata: a JSON object, or `None` for `{}`.
    pub metadata: Option<serde_json::Value>,
    /// Check-and-set: the version the caller believes is current (`0`: must not exist).
    pub expected_version: Option<u32>,
    /// Who writes it (`user:alice`, `service:billing`).
    pub created_by: &'a str,
}

/// What a put created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutOutcome {
    /// The new version, now current.
    pub version: u32,
    /// When it was written.
    pub created_at: OffsetDateTime,
}

/// A revealed value and the version it came from.
#[derive(Debug)]
pub struct Revealed {
    /// The plaintext.
    pub value: SecretBytes,
    /// Its version.
    pub version: u32,
    /// What the read saw; pass it to [`Vault::confirm_read`] before the value leaves.
    pub read: ReadCheck,
    /// The host its metadata names, when it is bound into the ciphertext just opened: what
    /// a brokered call may go to. `None` for a version sealed before hosts were bound (the
    /// first day's builds, when `host` was a label), for one whose host was added in the
    /// database since, and for one that names none: none is brokered.
    pub bound_host: Option<String>,
}

/// What a reveal read, for [`Vault::confirm_read`]. No secret bytes.
#[derive(Debug, Clone)]
pub struct ReadCheck {
    mark: ReadMark,
    served: ServedVersion,
}

/// The use cases. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Vault {
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyProvider>,
    rng: Arc<dyn SecureRandom>,
    clock: Arc<dyn Clock>,
    config: VaultConfig,
    put_stripes: Box<[tokio::sync::Mutex<()>]>,
    stripe_hasher: std::collections::hash_map::RandomState,
    usage: Arc<UsageLog>,
    latest_hints: LatestHints,
}

/// owner → name → the latest version this node wrote (see [`Vault::put`]), with the number
/// of (owner, name) entries.
#[derive(Default)]
struct LatestHints(std::sync::Mutex<(HintMap, usize)>);

type HintMap = HashMap<String, HashMap<String, u32>>;

impl fmt::Debug for LatestHints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.0.lock().map(|h| h.1).unwrap_or(0);
        write!(f, "LatestHints({entries} credentials)")
    }
}

/// Whether `owner` and `name` are well formed (every operation checks them first; the API
/// also before its policy check, so a malformed name gets the same 400 from every caller).
///
/// # Errors
///
/// [`CoreError::InvalidOwner`] or [`CoreError::InvalidName`].
pub fn check_place(owner: &str, name: &str) -> Result<(), CoreError> {
    if !is_valid_owner(owner) {
        return Err(CoreError::InvalidOwner);
    }
    if !is_valid_name(name) {
        return Err(CoreError::InvalidName);
    }
    Ok(())
}

/// What in a metadata value could not be stored as it was written, if anything:
/// * U+0000 in a key or string: PostgreSQL's JSONB refuses it, so both stores refuse it up
///   front (one rule, and a 400 rather than a store error);
/// * a whole number past 64 bits (or from 2^53 on written as a double, where doubles no
///   longer hold every whole number): it is read as a double, and would come back with
///   other digits (2^64 as `1.8446744073709552e19`).
fn metadata_fault(value: &serde_json::Value) -> Option<&'static str> {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => Some("metadata must not hold the character U+0000"),
        Value::Number(n)
            if n.as_f64().is_some_and(|f| {
                n.is_f64() && f.fract() == 0.0 && f.abs() >= 9_007_199_254_740_992.0
            }) =>
        {
            Some(
                "a metadata number is a whole number too large to keep exactly (past 64 \
                 bits, or from 2^53 on with a fraction or exponent): send it as a string",
            )
        }
        Value::Array(items) => items.iter().find_map(metadata_fault),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some("metadata must not hold the character U+0000")
            } else {
                metadata_fault(v)
            }
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => None,
    }
}

/// Version numbers run from 1 to 2^31 − 1 (what both stores keep).
pub(crate) fn check_version(version: u32) -> Result<(), CoreError> {
    if version == 0 || version > i32::MAX as u32 {
        return Err(CoreError::InvalidInput(
            "version numbers are 1 to 2147483647",
        ));
    }
    Ok(())
}

/// The metadata key of a version's expiry: an RFC 3339 time after which the version is
/// neither revealed nor brokered (the third party's key has run out; the owner sets a new
/// one). The owner's `verify` still answers about it.
pub const EXPIRES_AT_KEY: &str = "expires_at";

/// What a bad expiry is told (never quoting the caller's text).
const EXPIRY_FORM: &str = "metadata.expires_at must be an RFC 3339 time of at most 64 bytes \
     such as \"2027-01-31T00:00:00Z\"";

/// A new version's expiry (`metadata.expires_at`), when it has one.
///
/// # Errors
///
/// A message naming the key and the expected form (never quoting the caller's text).
pub fn expiry_of(metadata: Option<&serde_json::Value>) -> Result<Option<OffsetDateTime>, String> {
    let bad = || EXPIRY_FORM.to_owned();
    match metadata.and_then(|m| m.get(EXPIRES_AT_KEY)) {
        None | Some(serde_json::Value::Null) => Ok(None),
        // RFC 3339 allows any number of fraction digits; a time needs no more than these
        // (and what is bound into the associated data stays small).
        Some(serde_json::Value::String(s)) if s.len() > 64 => Err(bad()),
        Some(serde_json::Value::String(s)) => {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map(Some)
                .map_err(|_| bad())
        }
        Some(_) => Err(bad()),
    }
}

/// The associated data of a version: its place, plus what its metadata says about where and
/// until when it may be used: the third-party host (`metadata.host`, where brokered calls may
/// take it) and the expiry (`metadata.expires_at`). So a host or an expiry edited in the
/// database makes the version fail to open, instead of sending the value elsewhere or using
/// it past its time.
pub(crate) fn binding_for(
    owner: &str,
    name: &str,
    version: u32,
    metadata: &serde_json::Value,
) -> Result<Binding, strongroom_crypto::BindingError> {
    let binding = binding_without_expiry(owner, name, version, metadata)?;
    match metadata.get(EXPIRES_AT_KEY) {
        None | Some(serde_json::Value::Null) => Ok(binding),
        Some(serde_json::Value::String(at)) => binding.with_field("expires-at", at.as_bytes()),
        // Not a string: a put refuses it; a stored one no longer matches what was bound.
        Some(other) => binding.with_field("expires-at-json", other.to_string().as_bytes()),
    }
}

/// The associated data versions were sealed with before their expiry was bound: place and
/// host only.
fn binding_without_expiry(
    owner: &str,
    name: &str,
    version: u32,
    metadata: &serde_json::Value,
) -> Result<Binding, strongroom_crypto::BindingError> {
    let binding = Binding::new(owner, name, version)?;
    match metadata.get(crate::broker::BOUND_HOST_KEY) {
        Some(serde_json::Value::String(host)) => binding.with_field("host", host.as_bytes()),
        // Not a string: a put refuses it; a stored one no longer matches what was bound.
        Some(other) => binding.with_field("host-json", other.to_string().as_bytes()),
        None => Ok(binding),
    }
}

/// Runs `open` (a decryption or a rewrap) under a version's associated data; also says
/// whether the host its metadata names (if any) was part of it. A version whose metadata
/// names an expiry and that does not open so gets one more try without the expiry: it was
/// sealed before expiries were bound. One that names a host gets a last try under its place
/// alone: it was sealed before hosts were bound (its `host` a label then). Neither try can
/// move a later version's expiry or host: sealed with them, a version opens under no binding
/// that lacks them. A host added in the database to a version sealed without one opens so
/// too, and is reported as not bound: nothing is brokered to it.
pub(crate) async fn open_bound<T, F, Fut>(
    owner: &str,
    name: &str,
    version: u32,
    metadata: &serde_json::Value,
    open: F,
) -> Result<(T, bool), EnvelopeError>
where
    F: Fn(Binding) -> Fut,
    Fut: std::future::Future<Output = Result<T, EnvelopeError>>,
{
    // A binding that cannot be made is a place or metadata nothing was sealed for.
    let first = match binding_for(owner, name, version, metadata) {
        Ok(binding) => open(binding).await,
        Err(_) => Err(EnvelopeError::Decrypt),
    };
    let names_an_expiry = !matches!(
        metadata.get(EXPIRES_AT_KEY),
        None | Some(serde_json::Value::Null)
    );
    let second = match first {
        Err(EnvelopeError::Decrypt) if names_an_expiry => {
            match binding_without_expiry(owner, name, version, metadata) {
                Ok(binding) => open(binding).await,
                Err(_) => Err(EnvelopeError::Decrypt),
            }
        }
        other => other,
    };
    let names_a_host = !matches!(
        metadata.get(crate::broker::BOUND_HOST_KEY),
        None | Some(serde_json::Value::Null)
    );
    match second {
        Err(EnvelopeError::Decrypt) if names_a_host => {
            let binding = Binding::new(owner, name, version).map_err(|_| EnvelopeError::Decrypt)?;
            Ok((open(binding).await?, false))
        }
        other => other.map(|value| (value, true)),
    }
}

fn to_store_kek(k: &strongroom_crypto::KekRef) -> strongroom_store::KekRef {
    strongroom_store::KekRef::new(k.provider.clone(), k.key_id.clone(), k.version)
}

fn to_crypto_kek(k: &strongroom_store::KekRef) -> strongroom_crypto::KekRef {
    strongroom_crypto::KekRef {
        provider: k.provider.clone(),
        key_id: k.key_id.clone(),
        version: k.version,
    }
}

impl Vault {
    /// A vault over `store`, sealing with `keys`.
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyProvider>,
        rng: Arc<dyn SecureRandom>,
        clock: Arc<dyn Clock>,
        config: VaultConfig,
    ) -> Self {
        Self {
            usage: UsageLog::new(store.clone(), crate::usage::FLUSH_INTERVAL),
            latest_hints: LatestHints::default(),
            store,
            keys,
            rng,
            clock,
            config,
            put_stripes: (0..PUT_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            // Random keys, so nobody can aim many credentials at one stripe.
            stripe_hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The latest version number this node wrote for `(owner, name)`, if it remembers one.
    fn latest_hint(&self, owner: &str, name: &str) -> Option<u32> {
        let hints = self
            .latest_hints
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        hints
            .0
            .get(owner)
            .and_then(|names| names.get(name))
            .copied()
    }

    fn note_latest(&self, owner: &str, name: &str, version: u32) {
        let mut hints = self
            .latest_hints
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (map, entries) = &mut *hints;
        if let Some(known) = map.get_mut(owner).and_then(|names| names.get_mut(name)) {
            *known = version;
            return;
        }
        // Bounded by credentials, not owners (one owner's names are not capped otherwise);
        // the hints are only guesses, so all go at once.
        if *entries >= MAX_LATEST_HINTS {
            map.clear();
            *entries = 0;
        }
        map.entry(owner.to_owned())
            .or_default()
            .insert(name.to_owned(), version);
        *entries += 1;
    }

    #[cfg(test)]
    fn testing_latest_hints(&self) -> usize {
        self.latest_hints.0.lock().map(|h| h.1).unwrap_or(0)
    }

    fn put_stripe(&self, owner: &str, name: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::BuildHasher;
        let h = self.stripe_hasher.hash_one((owner, name)) as usize;
        &self.put_stripes[h % self.put_stripes.len()]
    }

    /// The store (for operator tasks such as rewrap).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The key provider.
    pub fn keys(&self) -> &Arc<dyn KeyProvider> {
        &self.keys
    }

    /// Now, by the injected clock.
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// Seals and stores a new version, which becomes current.
    ///
    /// # Errors
    ///
    /// Input errors, [`CoreError::VersionConflict`] when `expected_version` is stale,
    /// [`CoreError::QuotaExceeded`] when it would create a credential beyond the owner's
    /// quota, [`CoreError::Contended`], store and provider errors.
    pub async fn put(&self, req: PutRequest<'_>) -> Result<PutOutcome, CoreError> {
        self.put_inner(req, None).await.map(|(outcome, _)| outcome)
    }

    /// [`Vault::put`] with the put's audit record committed in the same transaction
    /// ([`Store::put_version_audited`]): `event` gets the new version number and is chained
    /// with `key`. On any error neither the version nor the record is written.
    ///
    /// # Errors
    ///
    /// As [`Vault::put`].
    pub async fn put_audited(
        &self,
        req: PutRequest<'_>,
        key: Arc<HeadKey>,
        event: Event,
    ) -> Result<(PutOutcome, Record), CoreError> {
        let (outcome, record) = self.put_inner(req, Some((key, event))).await?;
        let record = record.ok_or_else(|| CoreError::Unavailable("audit record missing".into()))?;
        Ok((outcome, record))
    }

    async fn put_inner(
        &self,
        req: PutRequest<'_>,
        audit: Option<(Arc<HeadKey>, Event)>,
    ) -> Result<(PutOutcome, Option<Record>), CoreError> {
        check_place(req.owner, req.name)?;
        if req.value.len() > MAX_VALUE_LEN {
            return Err(CoreError::ValueTooLarge(MAX_VALUE_LEN));
        }
        // An empty secret is no credential: a broker would inject nothing, and verify("")
        // would match it.
        if req.value.is_empty() {
            return Err(CoreError::InvalidInput("value must not be empty"));
        }
        // 0 means "no current version"; above the largest version number it can only be a
        // mistake, not a stale view.
        if let Some(v) = req.expected_version.filter(|&v| v != 0) {
            check_version(v)?;
        }
        let metadata = match req.metadata {
            None => serde_json::Value::Object(serde_json::Map::new()),
            Some(m @ serde_json::Value::Object(_)) => m,
            Some(_) => return Err(CoreError::InvalidMetadata("metadata must be a JSON object")),
        };
        // Checked here, so every writer (the API, an import, an operator) stores an expiry
        // the reveal path can read, or none.
        if expiry_of(Some(&metadata)).is_err() {
            return Err(CoreError::InvalidMetadata(EXPIRY_FORM));
        }
        if let Some(fault) = metadata_fault(&metadata) {
            return Err(CoreError::InvalidMetadata(fault));
        }
        if serde_json::to_vec(&metadata)
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
            > MAX_METADATA_LEN
        {
            return Err(CoreError::InvalidMetadata("metadata larger than 8 KiB"));
        }
        // Writers to one credential on this node take turns, so they never race each other
        // for a version number; the retry below settles races with other nodes.
        let _turn = self.put_stripe(req.owner, req.name).lock().await;
        // The version number is sealed into the value, so it is chosen before the write: the
        // number this node last wrote (a guess the store checks; a conflict answers with the
        // real one), else a read.
        let mut latest = match self.latest_hint(req.owner, req.name) {
            Some(v) => v,
            None => self.store.latest_version(req.owner, req.name).await?,
        };
        let started = std::time::Instant::now();
        let mut lost = 0u32;
        loop {
            let version = latest
                .checked_add(1)
                .filter(|v| *v <= i32::MAX as u32)
                .ok_or(CoreError::InvalidInput("version numbers exhausted"))?;
            // The owner and name are checked above, the expiry's form too: only the bound
            // host can fail here.
            let binding = binding_for(req.owner, req.name, version, &metadata)
                .map_err(|_| CoreError::InvalidMetadata("metadata.host is too long"))?;
            let sealed =
                envelope::seal(self.keys.as_ref(), &binding, &req.value, self.rng.as_ref()).await?;
            // At the precision the stores keep, so that the put's answer and every later
            // read give the same time.
            let now = self.clock.now();
            let created_at = now
                .replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
                .unwrap_or(now);
            let mut new = NewVersion::new(
                req.owner,
                req.name,
                version,
                sealed.value_bytes(),
                sealed.wrapped_key.bytes.clone(),
                to_store_kek(&sealed.wrapped_key.kek),
                req.created_by,
                created_at,
            );
            new.expected_current = req.expected_version;
            new.metadata = metadata.clone();
            new.max_versions = self.config.max_versions;
            new.keep_destroyed = self.config.keep_destroyed;
            new.max_credentials = self.config.max_credentials_per_owner;
            let stored = match &audit {
                None => self.store.put_version(new).await.map(|o| (o, None)),
                Some((key, event)) => {
                    let mut event = event.clone();
                    event.version = Some(version);
                    self.store
                        .put_version_audited(new, key.clone(), event)
                        .await
                        .map(|(o, r)| (o, Some(r)))
                }
            };
            match stored {
                Ok((outcome, record)) => {
                    self.note_latest(req.owner, req.name, outcome.version);
                    let outcome = PutOutcome {
                        version: outcome.version,
                        created_at,
                    };
                    return Ok((outcome, record));
                }
                // Another writer took this version number (or the guess was stale): seal
                // again for the one after the store's latest, at once the first time (a
                // stale guess), then after a random pause, so that racers stop colliding.
                Err(StoreError::Conflict { latest: actual }) => {
                    latest = actual;
                    if started.elapsed() >= PUT_CONTENTION_BUDGET {
                        return Err(CoreError::Contended);
                    }
                    if lost > 0 {
                        tokio::time::sleep(self.backoff(lost)).await;
                    }
                    lost += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A random pause before a put's retry after `lost` races lost: up to 50 µs × 2^(lost-1),
    /// at most [`PUT_BACKOFF_MAX_MICROS`].
    fn backoff(&self, lost: u32) -> std::time::Duration {
        let range = (50u64 << (lost - 1).min(16)).min(PUT_BACKOFF_MAX_MICROS);
        let mut random = [0u8; 8];
        // Without randomness the pause is the whole range (still a back-off).
        let micros = match self.rng.fill(&mut random) {
            Ok(()) => u64::from_le_bytes(random) % (range + 1),
            Err(_) => range,
        };
        std::time::Duration::from_micros(micros)
    }

    /// One page of `owner`'s credentials, metadata only.
    ///
    /// # Errors
    ///
    /// [`CoreError::InvalidInput`] for a bad cursor or limit; store errors.
    pub async fn list(
        &self,
        owner: &str,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<Page<CredentialSummary>, CoreError> {
        if !is_valid_owner(owner) {
            return Err(CoreError::InvalidOwner);
        }
        if limit == 0 || limit > strongroom_store::MAX_PAGE_LIMIT {
            return Err(CoreError::InvalidInput("limit must be 1 to 1000"));
        }
        let cursor = cursor
            .map(Cursor::parse)
            .transpose()
            .map_err(|_| CoreError::InvalidInput("malformed cursor"))?;
        Ok(self
            .store
            .list_credentials(owner, cursor.as_ref(), limit)
            .await?)
    }

    /// A credential's metadata and **every** version it ever had, no values. For operator
    /// tools that must see the whole history (an import looking for what it wrote); what
    /// answers a client is [`Vault::describe_page`].
    ///
    /// # Errors
    ///
    /// [`CoreError::NotFound`] and input/store errors.
    pub async fn describe(&self, owner: &str, name: &str) -> Result<Credential, CoreError> {
        check_place(owner, name)?;
        Ok(self.store.get_credential(owner, name).await?)
    }

    /// A credential's metadata and one page of its versions, newest first, no values: at
    /// most `limit` (1 to [`strongroom_store::MAX_PAGE_LIMIT`]) versions numbered below
    /// `before` (the newest when `None`); [`Credential::versions_next`] is the next page's
    /// `before` when older versions remain.
    ///
    /// # Errors
    ///
    /// [`CoreError::InvalidInput`] for a limit or `before` out of range,
    /// [`CoreError::NotFound`], and input/store errors.
    pub async fn describe_page(
        &self,
        owner: &str,
        name: &str,
        before: Option<u32>,
        limit: u32,
    ) -> Result<Credential, CoreError> {
        check_place(owner, name)?;
        if limit == 0 || limit > strongroom_store::MAX_PAGE_LIMIT {
            return Err(CoreError::InvalidInput("limit must be 1 to 1000"));
        }
        if let Some(v) = before {
            check_version(v).map_err(|_| {
                CoreError::InvalidInput("cursor must be a version number, 1 to 2147483647")
            })?;
        }
        Ok(self
            .store
            .get_credential_page(owner, name, before, limit)
            .await?)
    }

    /// Chooses the current version.
    ///
    /// # Errors
    ///
    /// [`CoreError::NotFound`], [`CoreError::VersionDestroyed`], input/store errors.
    pub async fn set_current(
        &self,
        owner: &str,
        name: &str,
        version: u32,
    ) -> Result<(), CoreError> {
        check_place(owner, name)?;
        check_version(version)?;
        Ok(self
            .store
            .set_current(owner, name, version, self.clock.now())
            .await?)
    }

    /// The kill switch: disable (`false`) or enable (`true`), keeping every version.
    ///
    /// # Errors
    ///
    /// [`CoreError::NotFound`], input/store errors.
    pub async fn set_enabled(
        &self,
        owner: &str,
        name: &str,
        enabled: bool,
    ) -> Result<(), CoreError> {
        check_place(owner, name)?;
        Ok(self
            .store
            .set_enabled(owner, name, enabled, self.clock.now())
            .await?)
    }

    /// Destroys one version (crypto-shredding its data key).
    ///
    /// # Errors
    ///
    /// [`CoreError::NotFound`], input/store errors.
    pub async fn destroy_version(
        &self,
        owner: &str,
        name: &str,
        version: u32,
    ) -> Result<(), CoreError> {
        check_place(owner, name)?;
        check_version(version)?;
        self.store
            .destroy_version(owner, name, version, self.clock.now())
            .await?;
        Ok(())
    }

    /// Destroys every version of a credential.
    ///
    /// # Errors
    ///
    /// [`CoreError::NotFound`], input/store errors.
    pub async fn destroy_credential(&self, owner: &str, name: &str) -> Result<(), CoreError> {
        check_place(owner, name)?;
        Ok(self
            .store
            .destroy_credential(owner, name, self.clock.now())
            .await?)
    }

    /// Makes `change` and commits `event`'s audit record with it, in one transaction: a
    /// change whose record cannot be written is not made (as [`Vault::put_audited`]).
    ///
    /// # Errors
    ///
    /// As the plain operation ([`Vault::set_current`], [`Vault::set_enabled`],
    /// [`Vault::destroy_version`], [`Vault::destroy_credential`]), and the audit append's.
    pub async fn change_audited(
        &self,
        owner: &str,
        name: &str,
        change: Change,
        key: Arc<HeadKey>,
        event: Event,
    ) -> Result<Record, CoreError> {
        check_place(owner, name)?;
        if let Change::SetCurrent(v) | Change::DestroyVersion(v) = change {
            check_version(v)?;
        }
        let (_, record) = self
            .store
            .change_audited(owner, name, change, self.clock.now(), key, event)
            .await?;
        Ok(record)
    }

    /// Makes `change` without an audit record (auditing off).
    ///
    /// # Errors
    ///
    /// As the plain operation.
    pub async fn change(&self, owner: &str, name: &str, change: Change) -> Result<(), CoreError> {
        match change {
            Change::SetCurrent(v) => self.set_current(owner, name, v).await,
            Change::SetEnabled(e) => self.set_enabled(owner, name, e).await,
            Change::DestroyVersion(v) => self.destroy_version(owner, name, v).await,
            Change::DestroyCredential => self.destroy_credential(owner, name).await,
        }
    }

    async fn open(
        &self,
        owner: &str,
        name: &str,
        version: Option<u32>,
        purpose: Open,
    ) -> Result<(Revealed, bool), CoreError> {
        check_place(owner, name)?;
        version.map(check_version).transpose()?;
        let mark = self.store.read_mark();
        let row = self.store.get_version(owner, name, version).await?;
        // Refused without being decrypted. A disabled credential is refused as such by the
        // caller; a version stored before expiries were checked may hold another text
        // under the key, which is no expiry.
        let expired = match expiry_of(Some(&row.metadata)) {
            Ok(Some(at))
                if purpose == Open::ToUse && row.credential_enabled && at <= self.clock.now() =>
            {
                Some(CoreError::VersionExpired {
                    version: row.version,
                    expired_at: at
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                })
            }
            _ => None,
        };
        let read = ReadCheck {
            mark,
            served: row.served(version),
        };
        let wrapped = WrappedKey {
            kek: to_crypto_kek(&row.kek),
            bytes: row.wrapped_key,
        };
        let sealed = Sealed::from_parts(&row.sealed_value, wrapped)
            .map_err(|e| CoreError::from(e).at_version(row.version))?;
        let keys = self.keys.as_ref();
        if let Some(expired) = expired {
            // Only its data key is unwrapped, which authenticates the expiry: one moved
            // earlier in the database is tampering (an integrity error), not an expiry.
            open_bound(owner, name, row.version, &row.metadata, |binding| {
                let sealed = &sealed;
                async move { envelope::check_binding(keys, &binding, sealed).await }
            })
            .await
            .map_err(|e| CoreError::from(e).at_version(row.version))?;
            return Err(expired);
        }
        let (value, host_in_binding) =
            open_bound(owner, name, row.version, &row.metadata, |binding| {
                let sealed = &sealed;
                async move { envelope::open(keys, &binding, sealed).await }
            })
            .await
            .map_err(|e| CoreError::from(e).at_version(row.version))?;
        Ok((
            Revealed {
                value,
                version: row.version,
                read,
                // The row opened, which may be a cached copy of what the database held:
                // the host to hold a brokered call to is this one, not one read before.
                bound_host: host_in_binding
                    .then(|| row.metadata.get(crate::broker::BOUND_HOST_KEY))
                    .flatten()
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned),
            },
            row.credential_enabled,
        ))
    }

    /// Whether `candidate` equals the current value. Compares SHA-256 digests in constant
    /// time, so neither the content nor the length of the stored value leaks through timing.
    ///
    /// # Errors
    ///
    /// [`CoreError::NotFound`] for no such credential, [`CoreError::VersionDestroyed`] when every
    /// version was destroyed; input/store/provider errors.
    pub async fn verify(
        &self,
        owner: &str,
        name: &str,
        candidate: &SecretBytes,
    ) -> Result<bool, CoreError> {
        if candidate.len() > MAX_VALUE_LEN {
            return Err(CoreError::ValueTooLarge(MAX_VALUE_LEN));
        }
        // No stored value is empty: refused as a put of it is, not answered "no match".
        if candidate.is_empty() {
            return Err(CoreError::InvalidInput("value must not be empty"));
        }
        // The answer says something about the value: it must be about the current one even
        // when another process changed it behind a read from memory (no audit record
        // precedes this answer, so the store may run an empty write transaction to know).
        // Overtaken once (an operator's import or put just before), it reads again.
        let mut retried = false;
        loop {
            let (revealed, _) = self.open(owner, name, None, Open::ToCompare).await?;
            let stored: [u8; 32] = Sha256::digest(revealed.value.expose_secret()).into();
            let given: [u8; 32] = Sha256::digest(candidate.expose_secret()).into();
            if self.read_still_holds(&revealed.read).await? {
                return Ok(bool::from(stored.ct_eq(&given)));
            }
            if retried {
                return Err(strongroom_store::StoreError::Overtaken.into());
            }
            retried = true;
        }
    }

    /// Takes one `verify` from `owner`'s allowance of `per_minute` a minute: `Ok(None)` when
    /// taken, else how long until one is free. The allowance is kept in the store, so every
    /// node of a deployment draws on the same one and a restart does not refill it.
    ///
    /// # Errors
    ///
    /// Store errors.
    pub async fn take_verify_allowance(
        &self,
        owner: &str,
        per_minute: std::num::NonZeroU32,
    ) -> Result<Option<std::time::Duration>, CoreError> {
        let limit = RateLimit::per_minute(RateScope::Verify, per_minute);
        Ok(self
            .store
            .take_allowance(limit, owner, self.clock.now())
            .await?)
    }

    /// Decrypts a version (`None`: the current one) for a service that policy allows.
    /// A disabled credential is never revealed.
    ///
    /// # Errors
    ///
    /// [`CoreError::Disabled`], [`CoreError::NotFound`], [`CoreError::VersionDestroyed`],
    /// input/store/provider errors.
    pub async fn reveal(
        &self,
        owner: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<Revealed, CoreError> {
        let (revealed, enabled) = self.open(owner, name, version, Open::ToUse).await?;
        if !enabled {
            return Err(CoreError::Disabled);
        }
        // Usage bookkeeping must neither fail nor slow a reveal: it is noted in memory and
        // written in the background, coalesced (the audit log is the authoritative record).
        self.usage.note(owner, name, self.clock.now());
        Ok(revealed)
    }

    /// Confirms that what a reveal read may still be released: call it after the use's audit
    /// record is committed and before the value leaves. It only does work when the store
    /// answered from memory and another process changed the store meanwhile (see
    /// [`Store::confirm_unchanged`]).
    ///
    /// # Errors
    ///
    /// [`CoreError::Unavailable`] when the credential changed behind the read (the caller
    /// answers "retry"; the value must not leave) or the check could not run.
    pub async fn confirm_read(&self, read: &ReadCheck) -> Result<(), CoreError> {
        self.store
            .confirm_unchanged(read.mark, &read.served)
            .await
            .map_err(CoreError::from)
    }

    /// [`Vault::confirm_read`], telling a read another process overtook (`Ok(false)`: the
    /// value must not leave, and reading again gets what the database holds now) from a
    /// check that could not run.
    ///
    /// # Errors
    ///
    /// [`CoreError::Unavailable`] when the check could not run.
    pub async fn read_still_holds(&self, read: &ReadCheck) -> Result<bool, CoreError> {
        match self.store.confirm_unchanged(read.mark, &read.served).await {
            Ok(()) => Ok(true),
            Err(strongroom_store::StoreError::Overtaken) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the pending last-used times now (they are otherwise written within a second;
    /// the server calls this on shutdown).
    pub async fn flush_usage(&self) {
        self.usage.flush().await;
    }

    /// Whether the store and the key provider are usable (for `/readyz`).
    ///
    /// # Errors
    ///
    /// [`CoreError::Unavailable`] naming what is down.
    pub async fn health(&self) -> Result<(), CoreError> {
        self.store
            .get_provider_state("strongroom/health")
            .await
            .map_err(|e| CoreError::Unavailable(format!("store: {e}")))?;
        // Reads are not enough: every request but a read is written (its audit record).
        self.store
            .check_writable()
            .await
            .map_err(|e| CoreError::Unavailable(format!("store: {e}")))?;
        self.keys
            .health()
            .await
            .map_err(|e| CoreError::Unavailable(e.to_string()))
    }
}

#[cfg(test)]
mod tests;
