//! # strongroom-crypto
//!
//! The cryptography Strongroom stands on, usable on its own:
//!
//! * [`envelope`]: envelope encryption, format v1. Each credential version is sealed with a
//!   fresh 256-bit data key (AES-256-GCM); the data key is wrapped by a key-encryption key
//!   (KEK) held by a [`KeyProvider`]. Both layers carry associated data in one canonical
//!   encoding ([`binding`]) that binds the ciphertext to its owner, credential name, version
//!   and KEK, so a sealed value moved anywhere else fails to open.
//! * [`fernet`]: the Fernet token format, byte-exact with pyca/cryptography, including
//!   MultiFernet; [`django`]: the key derivation of `django-fernet-fields`.
//!
//! ## Threat model
//!
//! An attacker who reads or edits the database (dump, replica, backup) but does not control
//! the key provider learns nothing about values beyond their length, and cannot make Strongroom
//! accept a value at a place it was not written for. Decryption and authentication failures are
//! opaque: they never say which byte was wrong. Keys and plaintexts live in zeroizing
//! containers ([`SecretBytes`], [`Key256`]) that never print their contents.
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use strongroom_crypto::{envelope, Binding, OsRandom, SecretBytes};
//! use strongroom_crypto::testing::FakeProvider;
//!
//! let provider = FakeProvider::new("example", 1);
//! let binding = Binding::new("user-42", "zoom.api-key", 1)?;
//! let sealed = envelope::seal(&provider, &binding, &SecretBytes::from_slice(b"s3cr3t"), &OsRandom).await?;
//! let opened = envelope::open(&provider, &binding, &sealed).await?;
//! assert_eq!(opened.expose_secret(), b"s3cr3t");
//!
//! // The same bytes do not open for another owner.
//! let other = Binding::new("user-43", "zoom.api-key", 1)?;
//! assert!(envelope::open(&provider, &other, &sealed).await.is_err());
//! # Ok(()) }
//! ```
//! (The example uses the `testing` feature's fake provider; real deployments use the local
//! keyring or a remote provider from `strongroom-keys`.)

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod binding;
pub mod django;
pub mod envelope;
pub mod fernet;
pub mod keywrap;
pub mod opaque;
pub mod provider;
mod random;
mod secret;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use binding::{Binding, BindingError};
pub use envelope::{EnvelopeError, Sealed};
pub use provider::{
    KekRef, KeyProvider, ProviderError, ProviderErrorKind, UnwrapError, WrappedKey,
};
pub use random::{OsRandom, RandomError, SecureRandom};
pub use secret::{Key256, SecretBytes};
