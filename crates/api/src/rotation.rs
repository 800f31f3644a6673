//! `POST /v1/keys/rotate`: what rotating the active key means depends on the key provider
//! the server runs with, so the server supplies it ([`AppState::set_key_rotation`]).
//!
//! [`AppState::set_key_rotation`]: crate::AppState::set_key_rotation

use strongroom_crypto::KekRef;

/// Makes a new active key version for new data keys; earlier versions stay able to open what
/// they sealed until a rewrap moves it.
#[async_trait::async_trait]
pub trait KeyRotation: Send + Sync {
    /// Rotates; returns the new active key version.
    ///
    /// # Errors
    ///
    /// [`RotationError::Unsupported`] where the provider rotates by itself (AWS KMS),
    /// [`RotationError::Refused`] when rotating here would do harm, [`RotationError::Failed`]
    /// when the provider or the store refused.
    async fn rotate(&self) -> Result<KekRef, RotationError>;
}

/// Why a rotation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// This provider is not rotated through Strongroom; the message says how it is.
    #[error("{0}")]
    Unsupported(String),
    /// The provider or the store refused or failed (no key changed, or the change is
    /// reported by the next key listing).
    #[error("{0}")]
    Failed(String),
    /// Refused before anything changed, for a reason the admin can act on (this server's
    /// keyring file is a copy left behind); the message says which.
    #[error("{0}")]
    Refused(String),
}
