//! Key handling of `django-fernet-fields` (0.6 and the `-v2` fork), so Strongroom can read
//! the tokens those apps stored, byte for byte.
//!
//! The library builds its key list from the Django settings:
//!
//! * `FERNET_KEYS` if the setting exists, else `[SECRET_KEY]` (`SECRET_KEY_FALLBACKS` is never
//!   consulted);
//! * with `FERNET_USE_HKDF` (default **true**) every entry, even one that already looks like a
//!   Fernet key, becomes `HKDF-SHA256(salt = HKDF_SALT, info = HKDF_INFO, ikm = UTF-8 of the
//!   entry)` of 32 bytes; with `false` each entry must itself be a Fernet key;
//! * a `MultiFernet` in list order: the first key encrypts, every key decrypts. Tokens are read
//!   without a TTL.
//!
//! ```
//! use strongroom_crypto::django::{multifernet_from_settings, DjangoSettings};
//!
//! let settings = DjangoSettings {
//!     fernet_keys: Some(vec!["new passphrase", "old passphrase"]),
//!     secret_key: Some("django-insecure-…"),
//!     use_hkdf: None,
//! };
//! let fernet = multifernet_from_settings(&settings).unwrap();
//! assert_eq!(fernet.len(), 2);
//! ```

use std::fmt;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::fernet::{Fernet, FernetError, FernetKey, MultiFernet};

/// The HKDF salt django-fernet-fields uses.
pub const HKDF_SALT: &[u8] = b"django-fernet-fields-hkdf-salt";
/// The HKDF info django-fernet-fields uses.
pub const HKDF_INFO: &[u8] = b"django-fernet-fields";

/// Derives the Fernet key django-fernet-fields builds from one key entry (its UTF-8 bytes).
pub fn derive_key(entry: &[u8]) -> FernetKey {
    let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), entry);
    let mut okm = Zeroizing::new([0u8; 32]);
    if hk.expand(HKDF_INFO, &mut okm[..]).is_err() {
        unreachable!("HKDF-SHA256 can expand to 32 bytes");
    }
    FernetKey::from_bytes(*okm)
}

/// The Django settings that decide the keys. `None` means the setting is absent.
///
/// `Debug` shows which settings are present, never their values.
#[derive(Clone, Default)]
pub struct DjangoSettings<'a> {
    /// `FERNET_KEYS`.
    pub fernet_keys: Option<Vec<&'a str>>,
    /// `SECRET_KEY`, used only when `FERNET_KEYS` is absent.
    pub secret_key: Option<&'a str>,
    /// `FERNET_USE_HKDF`; absent means `true`.
    pub use_hkdf: Option<bool>,
}

impl fmt::Debug for DjangoSettings<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DjangoSettings")
            .field("fernet_keys", &self.fernet_keys.as_ref().map(Vec::len))
            .field("secret_key", &self.secret_key.map(|_| "[REDACTED]"))
            .field("use_hkdf", &self.use_hkdf)
            .finish()
    }
}

/// The Fernet keys django-fernet-fields would build from `s`, in order.
///
/// # Errors
///
/// [`FernetError::NoKeys`] when the list is empty (or neither setting exists);
/// [`FernetError::InvalidKey`] when HKDF is off and an entry is not a Fernet key.
pub fn effective_keys(s: &DjangoSettings<'_>) -> Result<Vec<FernetKey>, FernetError> {
    let entries: Vec<&str> = match (&s.fernet_keys, s.secret_key) {
        (Some(keys), _) => keys.clone(),
        (None, Some(secret)) => vec![secret],
        (None, None) => Vec::new(),
    };
    effective_keys_from_strings(&entries, s.use_hkdf.unwrap_or(true))
}

fn effective_keys_from_strings(
    keys: &[&str],
    use_hkdf: bool,
) -> Result<Vec<FernetKey>, FernetError> {
    if keys.is_empty() {
        return Err(FernetError::NoKeys);
    }
    keys.iter()
        .map(|entry| {
            if use_hkdf {
                Ok(derive_key(entry.as_bytes()))
            } else {
                // As django-fernet-fields hands each entry to pyca's `Fernet`.
                FernetKey::from_pyca_base64(entry)
            }
        })
        .collect()
}

/// The `MultiFernet` django-fernet-fields would build from `s`.
///
/// # Errors
///
/// As [`effective_keys`].
pub fn multifernet_from_settings(s: &DjangoSettings<'_>) -> Result<MultiFernet, FernetError> {
    into_multifernet(effective_keys(s)?)
}

/// The `MultiFernet` for an explicit key list (`FERNET_KEYS`) and `FERNET_USE_HKDF` value.
///
/// # Errors
///
/// [`FernetError::NoKeys`] for an empty list; [`FernetError::InvalidKey`] when `use_hkdf` is
/// false and an entry is not a Fernet key.
pub fn keys_from_strings(keys: &[&str], use_hkdf: bool) -> Result<MultiFernet, FernetError> {
    into_multifernet(effective_keys_from_strings(keys, use_hkdf)?)
}

fn into_multifernet(keys: Vec<FernetKey>) -> Result<MultiFernet, FernetError> {
    MultiFernet::new(keys.into_iter().map(Fernet::new).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_lists_are_refused() {
        let s = DjangoSettings {
            fernet_keys: Some(vec![]),
            secret_key: Some("ignored because FERNET_KEYS exists"),
            use_hkdf: None,
        };
        assert_eq!(
            multifernet_from_settings(&s).unwrap_err(),
            FernetError::NoKeys
        );
        assert_eq!(
            multifernet_from_settings(&DjangoSettings::default()).unwrap_err(),
            FernetError::NoKeys
        );
        assert_eq!(
            keys_from_strings(&[], true).unwrap_err(),
            FernetError::NoKeys
        );
    }

    #[test]
    fn hkdf_off_needs_real_keys() {
        assert_eq!(
            keys_from_strings(&["not a key"], false).unwrap_err(),
            FernetError::InvalidKey
        );
        // With HKDF on, anything (even the empty string) is a passphrase.
        assert_eq!(keys_from_strings(&["", "x"], true).unwrap().len(), 2);
        // With it off, a key in the standard base64 alphabet (`openssl rand -base64 32`) is
        // the key pyca's Fernet takes it for.
        use secrecy::ExposeSecret;
        let url_safe = "-_-_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let standard = "+/+/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let keys = effective_keys_from_strings(&[standard], false).unwrap();
        assert_eq!(keys[0].to_base64().expose_secret(), url_safe);
    }

    #[test]
    fn derivation_differs_per_entry() {
        let a = derive_key(b"a");
        let b = derive_key(b"b");
        use secrecy::ExposeSecret;
        assert_ne!(a.to_base64().expose_secret(), b.to_base64().expose_secret());
    }
}
