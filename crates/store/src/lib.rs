//! Strongroom's storage layer.
//!
//! Every credential version Strongroom keeps lives in exactly one [`Store`]: embedded
//! [SQLite](crate::sqlite) (one file under the data dir, the default) or
//! [PostgreSQL](crate::postgres) 15+ (shared by many stateless nodes). Both implement the
//! same object-safe async trait, held as `Arc<dyn Store>`, and pass the same
//! [conformance suite](crate::testing) (feature `testing`).
//!
//! # What the store knows
//!
//! The store holds **opaque bytes**: a version's sealed value and its wrapped data key are
//! encrypted by the caller (`strongroom-crypto`) before they get here, and this crate does not
//! depend on any crypto. Because a sealed value is bound through AEAD associated data to its
//! place (owner, name, version number, KEK), the caller picks the version number *before* it
//! seals: [`Store::put_version`] inserts version `N` only if `N` is `latest + 1` for that
//! credential, atomically, and otherwise fails with [`StoreError::Conflict`] naming `latest`.
//! Of two racing writers exactly one wins. Version numbers are **never reused** for a
//! credential, not even after [`Store::destroy_credential`] (numbering continues), so a stale
//! ciphertext can never be replayed into a reused slot.
//!
//! A put may carry a per-owner quota ([`NewVersion::max_credentials`]): a put that would
//! create a credential (or bring one destroyed as a whole back) while its owner already has
//! that many live ones fails with [`StoreError::QuotaExceeded`], checked in the put's own
//! transaction so that racing creators, on one node or several, never overshoot.
//!
//! Errors and `Debug` output never contain sealed values or wrapped keys.
//!
//! # Durability
//!
//! A write is acknowledged (its future resolves `Ok`) only once it is durable:
//!
//! - **SQLite**: WAL journal with `synchronous=FULL` by default, so a commit is on disk
//!   (fsync of the WAL) before it is acknowledged. Writes are *group-committed*: one writer
//!   thread drains the queue of pending writes, runs each in its own savepoint (so a failing
//!   request fails alone), commits them all with one fsync, and only then acknowledges each.
//!   Reads use separate connections and never wait for the writer.
//! - **PostgreSQL**: a write is acknowledged when its transaction's `COMMIT` returns (with the
//!   server's `synchronous_commit` at its default `on`). PostgreSQL group-commits concurrent
//!   transactions itself. Races are settled by row locks (`SELECT ... FOR UPDATE`) on the
//!   credential row and backed by unique constraints.
//!
//! A crash (`kill -9` of the process, or of the database server for PostgreSQL) loses no
//! acknowledged write; the crash test in `tests/crash.rs` checks this with repeated SIGKILLs.
//!
//! # Destroying
//!
//! Destroying a version overwrites its sealed value and wrapped key with empty byte strings
//! in the same row (a tombstone keeps the version number, its KEK reference and metadata).
//! SQLite runs with `secure_delete=ON`, so freed pages are zeroed. Old page images can
//! survive for a while in the SQLite WAL (until it is checkpointed and overwritten), in
//! PostgreSQL dead tuples (until `VACUUM`), and in backups and replicas taken earlier:
//! crypto-shredding relies on the *wrapped data key* being gone, and on KEK rotation for
//! copies made before.
//!
//! # Schema
//!
//! Migrations are embedded and applied when a store is opened; the `schema_version` table
//! records the schema. A database written by a newer Strongroom is refused with
//! [`StoreError::SchemaTooNew`]. Tables: `credentials`, `versions`, `provider_state`
//! (what key providers keep, see [`Store::put_provider_state`]) and `schema_version`
//! (schema 1), the audit log's `audit_records` and `audit_head` (schema 2, see
//! [`audit`]), and `rate_allowances` (schema 8, see [`Store::take_allowance`]). The table
//! name prefix `audit` is **reserved** for the audit log.
//!
//! # Example
//!
//! ```no_run
//! # #[cfg(feature = "sqlite")]
//! # async fn demo() -> Result<(), strongroom_store::StoreError> {
//! use std::sync::Arc;
//! use strongroom_store::{sqlite::SqliteStore, KekRef, NewVersion, Store};
//! use time::OffsetDateTime;
//!
//! let store: Arc<dyn Store> = Arc::new(SqliteStore::open_dir("./strongroom-data").await?);
//! let next = store.latest_version("alice", "zoom.api-key").await? + 1;
//! // ... seal the value for (owner, name, next, kek) with strongroom-crypto ...
//! # let (sealed, wrapped) = (vec![1u8; 40], vec![2u8; 60]);
//! let put = NewVersion::new(
//!     "alice", "zoom.api-key", next, sealed, wrapped,
//!     KekRef::new("local", "k1", 1), "user:alice", OffsetDateTime::now_utc(),
//! );
//! store.put_version(put).await?;
//! let v = store.get_version("alice", "zoom.api-key", None).await?;
//! assert_eq!(v.version, next);
//! # Ok(()) }
//! ```

// Without a backend only the trait and types remain; their helpers go unused.
#![cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]

mod allowance;
pub mod audit;
mod error;
mod types;

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

pub use allowance::{RateLimit, RateScope};
pub use audit::{AuditFilter, AuditLog};
pub use error::{BackendError, StoreError};
pub use types::{
    Change, Credential, CredentialSummary, Cursor, KekFilter, KekRef, NewVersion, Page, PutOutcome,
    ReadMark, RewrapItem, SealedVersion, ServedVersion, VersionInfo, VersionState,
    DEFAULT_KEEP_DESTROYED, DEFAULT_MAX_CREDENTIALS_PER_OWNER, DEFAULT_MAX_VERSIONS, MAX_NAME_LEN,
    MAX_OWNER_LEN, MAX_PAGE_LIMIT, MAX_SEALED_LEN, MAX_WRAPPED_KEY_LEN, TRIM_TOMBSTONES_PER_PUT,
};

/// The newest database schema version this build knows (both backends).
pub const SCHEMA_VERSION: u32 = 9;

/// How far after a use the last-used time may already be and stay (see
/// [`Store::touch_last_used`]): clocks of nodes a few seconds apart keep the latest; a time
/// further ahead came from a clock that ran ahead, and the use replaces it.
pub const LAST_USED_AHEAD_MS: i64 = 5 * 60 * 1000;

/// Where credentials live. Every method is one atomic operation.
///
/// Every method fails with [`StoreError::InvalidInput`] for an empty or over-long owner or
/// name, and with [`StoreError::Unavailable`] when the backend fails; the `# Errors` sections
/// list the other outcomes. A credential that was destroyed as a whole
/// ([`destroy_credential`](Store::destroy_credential)) is [`StoreError::NotFound`] everywhere
/// until a new version is put.
#[async_trait]
pub trait Store: Send + Sync + Debug {
    /// Stores a new version and makes it the credential's current one, creating the
    /// credential if needed (or re-creating it, enabled, after a whole destroy).
    ///
    /// In the same transaction, retention: while the credential has more than
    /// `new.max_versions` active versions, its oldest non-current active version is
    /// destroyed (listed in [`PutOutcome::retired`]). Then the rows of destroyed versions
    /// more than `new.keep_destroyed` numbers behind the new one are deleted, oldest first,
    /// at most [`TRIM_TOMBSTONES_PER_PUT`] (their tombstones, metadata included, no longer
    /// listed; reads of them are [`StoreError::NotFound`]).
    ///
    /// # Errors
    ///
    /// - [`StoreError::Conflict`] if `new.version` is not `latest + 1`.
    /// - [`StoreError::CurrentMismatch`] if `new.expected_current` is set and does not match
    ///   (checked before the version number).
    /// - [`StoreError::InvalidInput`] for version 0, `max_versions` 0, oversized bytes.
    async fn put_version(&self, new: NewVersion) -> Result<PutOutcome, StoreError>;

    /// [`put_version`](Store::put_version) and its audit record in **one transaction**:
    /// both are committed or neither (one durable commit per put instead of two in a row).
    /// `event` is chained as the next record of the audit log (see [`audit`]) with the head
    /// MAC'd by `key`; the caller fills in the version it puts. Returns the put's outcome and
    /// the committed record.
    ///
    /// # Errors
    ///
    /// As [`put_version`](Store::put_version); nothing is written on any error.
    async fn put_version_audited(
        &self,
        new: NewVersion,
        key: Arc<audit::HeadKey>,
        event: audit::Event,
    ) -> Result<(PutOutcome, audit::Record), StoreError>;

    /// The highest version number ever allocated for `(owner, name)`: 0 if it never existed.
    /// Unlike the other reads, this also answers for a credential destroyed as a whole
    /// (numbering continues after a destroy). The next put must use this plus one.
    async fn latest_version(&self, owner: &str, name: &str) -> Result<u32, StoreError>;

    /// One page of `owner`'s credentials ordered by name (byte order), starting after
    /// `cursor`. Never another owner's. `limit` is clamped to [`MAX_PAGE_LIMIT`].
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for `limit` 0 or a malformed cursor.
    async fn list_credentials(
        &self,
        owner: &str,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<CredentialSummary>, StoreError>;

    /// A credential's facts and all its versions (newest first), without secret bytes.
    /// Destroyed versions stay listed as tombstones until a put removes them (see
    /// [`NewVersion::keep_destroyed`], up to 100,000 behind the newest), so this can hold
    /// that many versions: for answers to clients, use
    /// [`get_credential_page`](Store::get_credential_page).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    async fn get_credential(&self, owner: &str, name: &str) -> Result<Credential, StoreError>;

    /// A credential's facts and one page of its versions, newest first: at most `limit`
    /// versions (clamped to [`MAX_PAGE_LIMIT`]) numbered below `before` (from the newest when
    /// `None`). [`Credential::versions_next`] is the `before` of the next page when older
    /// versions remain. The facts and the page come from one snapshot, and the versions are
    /// read as one bounded index range, however many the credential has.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`]; [`StoreError::InvalidInput`] for `limit` 0 or a `before`
    /// that is no version number (0, or above 2^31 − 1).
    async fn get_credential_page(
        &self,
        owner: &str,
        name: &str,
        before: Option<u32>,
        limit: u32,
    ) -> Result<Credential, StoreError>;

    /// A version's sealed value and wrapped key; `version: None` means the current one.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] (no such credential or version),
    /// [`StoreError::VersionDestroyed`] (that version, or with `None` every version, was
    /// destroyed).
    async fn get_version(
        &self,
        owner: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<SealedVersion, StoreError>;

    /// A mark to take right before a [`get_version`](Store::get_version) whose answer will
    /// be released; pass it to [`confirm_unchanged`](Store::confirm_unchanged).
    fn read_mark(&self) -> ReadMark {
        ReadMark::default()
    }

    /// Confirms that what [`get_version`](Store::get_version) served after `mark` may still
    /// be released. Call it after the use's audit record is committed and before the value
    /// leaves. A store that answers a read from memory (the SQLite reveal cache) checks here
    /// that no other process changed the credential behind it; when one did, the credential
    /// is read again and the answer stands only if the same version, equally enabled (and,
    /// for `requested: None`, still current), is what the database holds now. Stores that
    /// read their database every time have nothing to check.
    ///
    /// # Errors
    ///
    /// [`StoreError::Overtaken`] when the credential changed (the value never leaves; the
    /// caller may read again), [`StoreError::Unavailable`] when the check could not run.
    async fn confirm_unchanged(
        &self,
        mark: ReadMark,
        served: &ServedVersion,
    ) -> Result<(), StoreError> {
        let _ = (mark, served);
        Ok(())
    }

    /// Whether the store takes writes now, for readiness: an SQLite file another process holds
    /// locked, or a PostgreSQL server that is a read-only standby (after a failover, say),
    /// reads fine and refuses every write.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] saying why not.
    async fn check_writable(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Makes `version` the current one.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`], [`StoreError::VersionDestroyed`].
    async fn set_current(
        &self,
        owner: &str,
        name: &str,
        version: u32,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Disables (`false`) or enables (`true`) a credential; versions are kept either way.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    async fn set_enabled(
        &self,
        owner: &str,
        name: &str,
        enabled: bool,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Destroys one version: erases its sealed value and wrapped key, keeps a tombstone.
    /// If it was current, the newest remaining active version becomes current (or none).
    /// Returns `false` if it was already destroyed (idempotent).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`], also for a destroyed version whose tombstone a later put
    /// removed.
    async fn destroy_version(
        &self,
        owner: &str,
        name: &str,
        version: u32,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Destroys every version of a credential and marks the credential deleted: it is
    /// [`NotFound`](StoreError::NotFound) from then on, until a new put re-creates it. Version
    /// numbering **continues** (a new put must use [`latest_version`](Store::latest_version)
    /// `+ 1`), so no version number is ever reused.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    async fn destroy_credential(
        &self,
        owner: &str,
        name: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Makes `change` to `(owner, name)` at `at` and appends `event` to the audit log (as
    /// [`put_version_audited`](Store::put_version_audited) does) in one transaction: a change
    /// whose record cannot be written is not made. Returns what the plain operation returns
    /// (for [`Change::DestroyVersion`], whether a version was destroyed; else `true`) and the
    /// committed record.
    ///
    /// # Errors
    ///
    /// As the plain operation, and the audit append's; nothing is written on any error.
    async fn change_audited(
        &self,
        owner: &str,
        name: &str,
        change: Change,
        at: OffsetDateTime,
        key: Arc<audit::HeadKey>,
        event: audit::Event,
    ) -> Result<(bool, audit::Record), StoreError>;

    /// Records that a value of the credential was used at `at`. It never moves backwards
    /// (nodes report uses out of order), except from a time more than
    /// [`LAST_USED_AHEAD_MS`] after `at`: one a clock that ran ahead wrote, which would
    /// otherwise hide every later use.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    async fn touch_last_used(
        &self,
        owner: &str,
        name: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// One batch of active versions matching `filter`, in a stable order, starting after
    /// `after` (a cursor from a previous batch; persist it to resume a rewrap). `limit` is
    /// clamped to [`MAX_PAGE_LIMIT`].
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for `limit` 0 or a malformed cursor.
    async fn versions_for_rewrap(
        &self,
        filter: &KekFilter,
        after: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<RewrapItem>, StoreError>;

    /// Compare-and-swap of a version's wrapped key: replaces it with `new_wrapped_key`
    /// (wrapped by `new_kek`) only if the version is still active and still holds
    /// `expected_old_key` wrapped by `expected_old_kek`, the key the caller unwrapped. Returns
    /// `false`, changing nothing, if it changed meanwhile (or was destroyed, or does not
    /// exist). The old key's bytes pin the row: a credential destroyed and made again under
    /// the same name can hold the same version number under the same KEK.
    #[allow(clippy::too_many_arguments)]
    async fn replace_wrapped_key(
        &self,
        owner: &str,
        name: &str,
        version: u32,
        expected_old_kek: &KekRef,
        expected_old_key: &[u8],
        new_wrapped_key: Vec<u8>,
        new_kek: &KekRef,
    ) -> Result<bool, StoreError>;

    /// How many **active** versions each KEK wraps (KEKs with none are absent), ordered by
    /// KEK. A KEK can be retired when its count is 0.
    async fn count_versions_by_kek(&self) -> Result<Vec<(KekRef, u64)>, StoreError>;

    /// A value a key provider stored under `key`, if any.
    async fn get_provider_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores (inserts or replaces) a key provider's value under `key`. Keys are
    /// namespaced by the caller, e.g. `"aws-kms/…"`.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for an empty key, a key over 255 bytes, or a value over
    /// 1 MiB.
    async fn put_provider_state(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError>;

    /// Compare-and-swap on a key provider's value: stores `value` under `key` only if the
    /// value there is still `expected` (`None`: only if there is none), and says whether it
    /// did. What several processes that share one store (servers and operator commands) use
    /// to change one record without losing each other's changes.
    ///
    /// # Errors
    ///
    /// As [`Store::put_provider_state`].
    async fn swap_provider_state(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Vec<u8>,
    ) -> Result<bool, StoreError>;

    /// Takes one request from `key`'s allowance under `limit` at `now`: `Ok(None)` when
    /// taken, `Ok(Some(wait))` when none is left (nothing taken; `wait` is how long until one
    /// is). The allowance lives in the store, so every process sharing it (the nodes of a
    /// PostgreSQL deployment) draws on the same one, and a restart does not refill it. The
    /// rule is GCRA (see the `allowance` module); takes racing on one key, from any
    /// process, are applied one after the other.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for a key that is not a valid owner id.
    async fn take_allowance(
        &self,
        limit: RateLimit,
        key: &str,
        now: OffsetDateTime,
    ) -> Result<Option<std::time::Duration>, StoreError>;

    /// The audit log kept in the same database, if this store keeps one (both built-in
    /// backends do; see [`audit`]).
    fn audit_log(&self) -> Option<Arc<dyn AuditLog>> {
        None
    }
}

/// Largest provider-state value, in bytes.
pub(crate) const MAX_PROVIDER_STATE_LEN: usize = 1024 * 1024;

pub(crate) fn validate_provider_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > 255 {
        return Err(StoreError::InvalidInput(
            "provider state key empty or longer than 255 bytes",
        ));
    }
    Ok(())
}
