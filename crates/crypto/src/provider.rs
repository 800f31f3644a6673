//! The [`KeyProvider`] trait: who holds the key-encryption keys (KEKs).
//!
//! A provider wraps (encrypts) a 256-bit data key under one of its KEKs, with associated data,
//! and unwraps it again. The local keyring, AWS KMS, a PKCS#11 token and Vault/OpenBao
//! Transit all plug in here; callers hold them as `Arc<dyn KeyProvider>` and never name the
//! implementation.
//!
//! Unwrap answers in three ways (as age's `Identity::unwrap_stanza`): the key, "not mine"
//! ([`UnwrapError::NotMine`], so a caller can try another provider during a migration), or
//! "mine, but it failed" ([`UnwrapError::Failed`]).

use std::fmt;

use async_trait::async_trait;

use crate::Key256;

/// Names one version of one KEK: `(provider kind, key id, version)`.
///
/// Stored beside every wrapped data key, and bound into its associated data.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct KekRef {
    /// The provider kind, e.g. `local`, `aws-kms`, `pkcs11`, `transit`.
    pub provider: String,
    /// The key's id within that provider (a keyring id, a KMS key ARN, a token label...).
    pub key_id: String,
    /// The KEK version, starting at 1.
    pub version: u32,
}

impl fmt::Display for KekRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:v{}", self.provider, self.key_id, self.version)
    }
}

/// Longest provider kind or key id accepted in a [`KekRef`].
pub const MAX_KEK_ID_LEN: usize = 255;
/// Largest wrapped key accepted from storage.
pub const MAX_WRAPPED_KEY_LEN: usize = 4096;

/// A data key wrapped by a KEK. Not secret: it only opens with the provider.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WrappedKey {
    /// Which KEK wrapped it.
    pub kek: KekRef,
    /// Provider-specific ciphertext of the data key.
    pub bytes: Vec<u8>,
}

/// Something that keeps KEKs and wraps data keys with them.
///
/// Implementations must be object safe, `Send + Sync + Debug`, never print key material in
/// `Debug`, and must authenticate `aad` (a wrap under one `aad` must not unwrap under another).
#[async_trait]
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// The provider kind, used in [`KekRef::provider`].
    fn kind(&self) -> &str;

    /// The KEK that new wraps must use.
    ///
    /// # Errors
    ///
    /// [`ProviderError`] when the provider has no active KEK or cannot be reached.
    fn active_kek(&self) -> Result<KekRef, ProviderError>;

    /// Wraps `key` under `kek` (normally the one [`KeyProvider::active_kek`] named), binding
    /// `aad`.
    ///
    /// # Errors
    ///
    /// [`ProviderErrorKind::KekNotActive`] when `kek` is no longer the active KEK (the caller
    /// asks again and retries), or another [`ProviderError`].
    async fn wrap(
        &self,
        kek: &KekRef,
        key: &Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, ProviderError>;

    /// Unwraps a data key.
    ///
    /// # Errors
    ///
    /// [`UnwrapError::NotMine`] when `wrapped` names a KEK this provider does not hold;
    /// [`UnwrapError::Failed`] when it does but the key will not unwrap (tampered bytes,
    /// other `aad`, a retired KEK, the provider down).
    async fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Key256, UnwrapError>;

    /// Checks the provider is reachable and its active KEK usable (for `/readyz`).
    ///
    /// # Errors
    ///
    /// The [`ProviderError`] that makes it unusable.
    async fn health(&self) -> Result<(), ProviderError> {
        self.active_kek().map(|_| ())
    }

    /// Looks again at which KEK versions exist, to see another process's rotation (a
    /// `keys rotate` while the server runs); returns whether the active KEK changed. For a
    /// provider that learns of rotations by itself (or never rotates), there is nothing to
    /// do: the default.
    ///
    /// # Errors
    ///
    /// The [`ProviderError`] of the lookup; the KEKs known before stay in force.
    async fn reload_keks(&self) -> Result<bool, ProviderError> {
        Ok(false)
    }
}

/// The outcome of an unwrap that did not give a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnwrapError {
    /// This provider does not hold the named KEK; another one might.
    #[error("the wrapping key {0} is not held by this provider")]
    NotMine(KekRef),
    /// This provider holds the KEK, but unwrapping failed.
    #[error(transparent)]
    Failed(#[from] ProviderError),
}

/// What went wrong in a provider, and whose fault it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProviderErrorKind {
    /// The wrapped key or its associated data does not authenticate: tampered, moved, or
    /// wrapped by another key. Opaque on purpose.
    AuthenticationFailed,
    /// The named KEK exists but may not wrap any more (rotated to decrypt-only).
    KekNotActive,
    /// The named KEK was retired: its material is gone.
    KekRetired,
    /// The named KEK version is unknown to this provider.
    UnknownKek,
    /// The provider cannot be reached or timed out; retrying may help.
    Unavailable,
    /// The provider refused: bad credentials, PIN, policy, disabled key.
    Denied,
    /// The provider's configuration or state is wrong (bad file, bad permissions).
    Misconfigured,
    /// Something else.
    Other,
}

/// An error from a key provider. Never carries key material.
#[derive(Debug)]
pub struct ProviderError {
    kind: ProviderErrorKind,
    provider: String,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProviderError {
    /// A new error of `kind` from provider `provider` (a kind such as `local`).
    pub fn new(kind: ProviderErrorKind, provider: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            provider: provider.to_owned(),
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause (an SDK or I/O error), kept opaque to callers.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ProviderErrorKind {
        self.kind
    }

    /// The provider that failed.
    pub fn provider(&self) -> &str {
        &self.provider
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key provider '{}': {}", self.provider, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProviderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The start-up check every provider runs: wrap and unwrap a fresh key under the active KEK,
/// and make sure the peer refuses other associated data. A peer that does not authenticate
/// the binding (an old Vault ignoring `associated_data`, say) stops the server here with one
/// clear error instead of silently weakening every envelope.
///
/// # Errors
///
/// The provider's own error, or [`ProviderErrorKind::Misconfigured`] naming what failed.
pub async fn self_test(provider: &dyn KeyProvider) -> Result<(), ProviderError> {
    const AAD: &[u8] = b"strongroom self-test";
    let kind = provider.kind().to_owned();
    let misconfigured =
        |msg: &str| ProviderError::new(ProviderErrorKind::Misconfigured, &kind, msg);
    let kek = provider.active_kek()?;
    let key = Key256::generate(&crate::OsRandom).map_err(|e| {
        ProviderError::new(ProviderErrorKind::Other, &kind, "random source failed").with_source(e)
    })?;
    let wrapped = provider.wrap(&kek, &key, AAD).await?;
    let back = provider.unwrap(&wrapped, AAD).await.map_err(|e| match e {
        UnwrapError::Failed(e) => e,
        other => ProviderError::new(ProviderErrorKind::Other, &kind, other.to_string()),
    })?;
    if back.expose_secret() != key.expose_secret() {
        return Err(misconfigured(
            "self-test: unwrapping returned another key than the one wrapped",
        ));
    }
    match provider
        .unwrap(&wrapped, b"strongroom self-test, other")
        .await
    {
        Err(UnwrapError::Failed(e)) if e.kind() == ProviderErrorKind::AuthenticationFailed => {
            Ok(())
        }
        Err(UnwrapError::Failed(e)) => Err(e),
        _ => Err(misconfigured(
            "self-test: the key unwrapped under other associated data, so the provider does not \
             authenticate it (for Vault Transit: version 1.15 or later is needed)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeProvider;

    #[tokio::test]
    async fn the_fake_provider_passes_the_self_test() {
        self_test(&FakeProvider::new("k", 1)).await.unwrap();
    }
}
