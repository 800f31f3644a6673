//! The use cases' error type.

/// What went wrong, and whose fault it is. Never carries a value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// The credential name does not match `[a-z0-9][a-z0-9._-]{0,127}`.
    #[error("credential name must match [a-z0-9][a-z0-9._-]{{0,127}}")]
    InvalidName,
    /// The owner id is empty or longer than 255 bytes.
    #[error("owner id must be 1 to 255 bytes of UTF-8 without control characters")]
    InvalidOwner,
    /// Another malformed input; the message names the field.
    #[error("{0}")]
    InvalidInput(&'static str),
    /// A new version's metadata is not what Strongroom stores (not an object, too large, a
    /// bound host or expiry it cannot read).
    #[error("{0}")]
    InvalidMetadata(&'static str),
    /// The value is larger than the limit.
    #[error("value larger than {0} bytes")]
    ValueTooLarge(usize),
    /// No such credential or version for this owner (also for another owner's).
    #[error("credential not found")]
    NotFound,
    /// The version was destroyed.
    #[error("that version was destroyed")]
    VersionDestroyed,
    /// The version's `metadata.expires_at` has passed: it is not used (the owner sets a new
    /// version).
    #[error("version {version} expired at {expired_at} (metadata.expires_at); the owner must set a new one")]
    VersionExpired {
        /// The version.
        version: u32,
        /// When it expired (RFC 3339).
        expired_at: String,
    },
    /// Check-and-set failed: the current version is not the expected one.
    #[error("the credential changed: current version is {}", .current.map_or("none".to_owned(), |v| v.to_string()))]
    VersionConflict {
        /// The actual current version.
        current: Option<u32>,
    },
    /// The put would create a credential, and its owner already has as many live
    /// credentials as the quota allows. Nothing was written.
    #[error(
        "credential quota reached: the owner already has {limit} credentials, the most \
         allowed; delete one before creating another (new versions of existing credentials \
         are not limited)"
    )]
    QuotaExceeded {
        /// The quota in force.
        limit: u32,
    },
    /// Too many concurrent writers kept winning the race; retry.
    #[error("too many concurrent writes to this credential; retry")]
    Contended,
    /// The credential is disabled (kill switch): it is not used.
    #[error("the credential is disabled")]
    Disabled,
    /// The store or the key provider cannot be reached.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The key that wrapped the version's data key is not available to this server: retired,
    /// or held by a provider this server is not configured with (after `rewrap
    /// --to-config`, until the servers move to the new configuration).
    #[error("key unavailable: {0}")]
    KeyUnavailable(String),
    /// Stored data failed to decrypt or parse: tampering or corruption. A server-side fault.
    #[error("stored data failed its integrity check")]
    Integrity {
        /// The version that failed, when one was read (its audit record names it).
        version: Option<u32>,
    },
    /// The audit log was changed outside Strongroom (a forged or unsealed head, a removed
    /// head key): nothing is appended to it until an operator restores it.
    #[error("the audit log failed its integrity check: {0}")]
    AuditIntegrity(String),
    /// Another server-side fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoreError {
    /// The version this error is about, when it names one: an expired version, or one that
    /// failed its integrity check. A request's audit record takes it, so a failed reveal
    /// of the current version still says which version that was.
    #[must_use]
    pub fn version(&self) -> Option<u32> {
        match self {
            CoreError::VersionExpired { version, .. } => Some(*version),
            CoreError::Integrity { version } => *version,
            _ => None,
        }
    }

    /// This error, about `version`: an integrity failure that names no version yet names it.
    #[must_use]
    pub(crate) fn at_version(self, at: u32) -> Self {
        match self {
            CoreError::Integrity { version: None } => CoreError::Integrity { version: Some(at) },
            other => other,
        }
    }
}

impl From<strongroom_store::StoreError> for CoreError {
    fn from(e: strongroom_store::StoreError) -> Self {
        use strongroom_store::StoreError as S;
        match e {
            S::NotFound => CoreError::NotFound,
            S::VersionDestroyed => CoreError::VersionDestroyed,
            S::CurrentMismatch { current } => CoreError::VersionConflict { current },
            S::QuotaExceeded { limit } => CoreError::QuotaExceeded { limit },
            S::Conflict { .. } => CoreError::Contended,
            S::InvalidInput(what) => CoreError::InvalidInput(what),
            S::Unavailable(_) | S::Overtaken => CoreError::Unavailable(e.to_string()),
            S::Corrupt { version, .. } => CoreError::Integrity { version },
            S::AuditIntegrity { what } => CoreError::AuditIntegrity(what),
            other => CoreError::Internal(other.to_string()),
        }
    }
}

impl From<strongroom_crypto::EnvelopeError> for CoreError {
    fn from(e: strongroom_crypto::EnvelopeError) -> Self {
        use strongroom_crypto::{EnvelopeError as E, ProviderErrorKind as K};
        match e {
            E::Decrypt | E::Malformed(_) | E::UnsupportedFormat(_) | E::UnsupportedAlgorithm(_) => {
                CoreError::Integrity { version: None }
            }
            E::TooLarge => CoreError::ValueTooLarge(crate::MAX_VALUE_LEN),
            E::Provider(p) if matches!(p.kind(), K::Unavailable | K::Denied) => {
                CoreError::Unavailable(p.to_string())
            }
            E::UnknownKek(_) => CoreError::KeyUnavailable(e.to_string()),
            E::Provider(p)
                if matches!(p.kind(), K::KekRetired | K::UnknownKek | K::Misconfigured) =>
            {
                CoreError::KeyUnavailable(p.to_string())
            }
            // A wrapped key that does not authenticate was tampered with or moved.
            E::Provider(p) if p.kind() == K::AuthenticationFailed => {
                CoreError::Integrity { version: None }
            }
            // Rotated between choosing the KEK and wrapping, or a provider's passing fault
            // (an HSM session error): the caller may retry, and no 500 claims a bug of ours.
            E::Provider(p) if matches!(p.kind(), K::KekNotActive | K::Other) => {
                CoreError::Unavailable(p.to_string())
            }
            other => CoreError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strongroom_crypto::{EnvelopeError, ProviderError, ProviderErrorKind as K};

    /// Every provider failure is a 503 (retry, or an operator's key problem) or an integrity
    /// error; none is reported as an internal bug.
    #[test]
    fn provider_failures_map_to_what_a_caller_can_act_on() {
        let of =
            |kind| CoreError::from(EnvelopeError::Provider(ProviderError::new(kind, "p", "m")));
        for kind in [K::Unavailable, K::Denied, K::KekNotActive, K::Other] {
            assert!(matches!(of(kind), CoreError::Unavailable(_)), "{kind:?}");
        }
        for kind in [K::KekRetired, K::UnknownKek, K::Misconfigured] {
            assert!(matches!(of(kind), CoreError::KeyUnavailable(_)), "{kind:?}");
        }
        assert!(matches!(
            of(K::AuthenticationFailed),
            CoreError::Integrity { .. }
        ));
    }
}
