//! The one error type of this crate.

use std::fmt;
use std::sync::Arc;

/// Everything a [`Store`](crate::Store) operation can fail with.
///
/// Variants say what happened and whose fault it is. None of them ever carries a credential
/// value, a wrapped key or any other secret byte: `Display` and `Debug` are safe to log.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The credential (or the version asked for) does not exist for this owner, or was
    /// destroyed as a whole. Another owner's credential is indistinguishable from one that
    /// does not exist.
    #[error("not found")]
    NotFound,

    /// The caller asked to create version number `N`, but `N` is not `latest + 1` for this
    /// credential: another writer got there first (or the caller's view was stale).
    ///
    /// Retryable: re-seal the value for `latest + 1` and try again.
    #[error("version conflict: the latest version number is {latest}")]
    Conflict {
        /// The highest version number ever allocated for the credential (0 if none).
        latest: u32,
    },

    /// The check-and-set in [`NewVersion::expected_current`](crate::NewVersion::expected_current)
    /// failed: the credential's current version is not the expected one.
    ///
    /// Not retryable without asking the user: somebody else changed the credential.
    #[error("the current version is {}, not the expected one", fmt_current(*current))]
    CurrentMismatch {
        /// The credential's current version (`None`: no current version, or no credential).
        current: Option<u32>,
    },

    /// The put would create a credential, but its owner already has as many live credentials
    /// as [`NewVersion::max_credentials`](crate::NewVersion::max_credentials) allows. Nothing
    /// was written. Not retryable as such: the owner must destroy a credential first.
    #[error("the owner already has {limit} credentials, the most allowed")]
    QuotaExceeded {
        /// The quota in force.
        limit: u32,
    },

    /// The version exists but was destroyed (its sealed value and wrapped key are erased).
    #[error("version destroyed")]
    VersionDestroyed,

    /// The caller passed an argument the store refuses (empty owner, owner over 255 bytes,
    /// version number 0, a malformed cursor, ...). The message names the argument, never
    /// its value.
    #[error("invalid input: {0}")]
    InvalidInput(&'static str),

    /// The store's own configuration is unusable (a connection string, a CA file, a schema
    /// name), found before any data is touched. The message says which setting and why, for
    /// the operator; it may name a file path, never a password or key.
    #[error("invalid store configuration: {0}")]
    Config(String),

    /// The database's schema was written by a newer Strongroom than this one. Refusing to
    /// touch it; upgrade this binary (or restore a backup).
    #[error(
        "the database schema version is {found}, but this build of Strongroom only knows \
         schema versions up to {supported}: refusing to open it (upgrade Strongroom)"
    )]
    SchemaTooNew {
        /// The schema version found in the database.
        found: u32,
        /// The newest schema version this build knows.
        supported: u32,
    },

    /// The backend could not be reached or failed transiently (I/O error, disk full,
    /// connection lost, pool timeout, writer stopped, ...). Whether the operation took effect
    /// is unknown only if it was a write whose commit failed; otherwise nothing was written.
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] BackendError),

    /// What a read answered from memory was changed by another process before it could be
    /// released ([`Store::confirm_unchanged`](crate::Store::confirm_unchanged)): the answer
    /// must not leave; reading again gets what the database holds now.
    #[error("the credential was changed by another process during this request; retry")]
    Overtaken,

    /// The audit log was changed outside Strongroom: its head's MAC does not verify, or an
    /// unsealed head sits over existing data. Nothing is appended until an operator restores
    /// the database. `what` says what was found, never a value.
    #[error("{what}")]
    AuditIntegrity {
        /// What was found.
        what: String,
    },

    /// The database holds something this code cannot interpret (a corrupt file, a value out
    /// of range, an unknown state). `what` says what, never a value.
    #[error("storage corrupt: {what}")]
    Corrupt {
        /// What was found to be corrupt.
        what: String,
        /// The credential version it was found in, when one was being read.
        version: Option<u32>,
    },
}

fn fmt_current(current: Option<u32>) -> String {
    match current {
        Some(v) => v.to_string(),
        None => "none".to_owned(),
    }
}

/// An opaque backend error (SQLite, PostgreSQL, pool, I/O). Callers can display it and walk
/// its `source()` chain, but never name the backend's types.
#[derive(Clone)]
pub struct BackendError(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl BackendError {
    pub(crate) fn new<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        BackendError(Arc::new(e))
    }

    /// An error carrying only a message (for a backend outside this crate, or a test).
    pub fn msg(m: impl Into<String>) -> Self {
        BackendError(Arc::new(Message(m.into())))
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Backend errors carry SQL text and parameters' *types*, never bound values: the
        // backends never interpolate values into SQL.
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

impl StoreError {
    pub(crate) fn unavailable(m: impl Into<String>) -> Self {
        StoreError::Unavailable(BackendError::msg(m))
    }

    /// A version read to be opened whose metadata is no JSON object (every put stores one:
    /// the row was written around Strongroom).
    pub(crate) fn unreadable_metadata(version: u32) -> Self {
        StoreError::Corrupt {
            what: format!("the metadata of version {version} is not a JSON object"),
            version: Some(version),
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            version: None,
        }
    }

    /// Whether retrying the same call later may succeed (the backend was unavailable).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_clear() {
        let e = StoreError::SchemaTooNew {
            found: 7,
            supported: 1,
        };
        let s = e.to_string();
        assert!(s.contains("7") && s.contains("up to 1") && s.contains("upgrade"));
        assert_eq!(
            StoreError::CurrentMismatch { current: None }.to_string(),
            "the current version is none, not the expected one"
        );
        assert!(StoreError::unavailable("x").is_transient());
    }
}
