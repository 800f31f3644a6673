//! Wrapping a 256-bit key under a 256-bit KEK held in this process.
//!
//! Used wherever Strongroom itself holds a KEK: the local keyring, and the KEK hierarchy in
//! which a remote provider wraps Strongroom's KEKs and those KEKs wrap the data keys. The
//! format is `nonce(12) ‖ ciphertext(32) ‖ tag(16)`, AES-256-GCM with the caller's
//! associated data. Random 96-bit nonces keep the collision risk negligible below 2^32 wraps
//! per KEK; rotate well before that.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use crate::{Key256, RandomError, SecureRandom};

const NONCE_LEN: usize = 12;
/// Length of a wrapped key.
pub const WRAPPED_LEN: usize = NONCE_LEN + Key256::LEN + 16;

/// Why a wrap failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WrapError {
    /// The random source failed.
    #[error(transparent)]
    Random(RandomError),
    /// AES-GCM refused to encrypt.
    #[error("key wrap failed")]
    Cipher,
}

/// A KEK ready to wrap and unwrap (its AES key schedule computed once; the `zeroize` feature
/// of `aes` erases it on drop).
pub struct KeyWrapper {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for KeyWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyWrapper(..)")
    }
}

impl KeyWrapper {
    /// A wrapper for `kek`.
    pub fn new(kek: &Key256) -> Self {
        Self {
            cipher: Aes256Gcm::new(kek.expose_secret().into()),
        }
    }

    /// Wraps `key`, binding `aad`.
    ///
    /// # Errors
    ///
    /// The random source failed, or the cipher refused (it cannot for 32 bytes).
    pub fn wrap(
        &self,
        key: &Key256,
        aad: &[u8],
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, WrapError> {
        seal(&self.cipher, key.expose_secret(), aad, rng)
    }

    /// Unwraps `wrapped`, or `None` when it does not authenticate under this KEK and `aad`
    /// (tampered, moved, wrong KEK, wrong length). Says no more on purpose.
    pub fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Option<Key256> {
        let plain = open(&self.cipher, wrapped, Key256::LEN, aad)?;
        Key256::from_slice(&plain)
    }
}

/// `nonce(12) ‖ ciphertext ‖ tag(16)` of `msg` under `cipher` with a random nonce and `aad`
/// (the format of a wrapped key, and of [`crate::opaque`]'s tokens).
pub(crate) fn seal(
    cipher: &Aes256Gcm,
    msg: &[u8],
    aad: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, WrapError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(WrapError::Random)?;
    let ct = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg, aad })
        .map_err(|_| WrapError::Cipher)?;
    let mut bytes = Vec::with_capacity(NONCE_LEN + ct.len());
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&ct);
    Ok(bytes)
}

/// The plaintext of [`seal`]'s `sealed` when it holds `len` bytes and authenticates under
/// `cipher` and `aad`; `None` otherwise, saying no more.
pub(crate) fn open(
    cipher: &Aes256Gcm,
    sealed: &[u8],
    len: usize,
    aad: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() != NONCE_LEN + len + 16 {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .ok()
        .map(Zeroizing::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OsRandom;

    #[test]
    fn round_trips_and_refuses_other_aad_other_kek_and_tampering() {
        let kek = Key256::generate(&OsRandom).unwrap();
        let w = KeyWrapper::new(&kek);
        let key = Key256::generate(&OsRandom).unwrap();
        let wrapped = w.wrap(&key, b"here", &OsRandom).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        let back = w.unwrap(&wrapped, b"here").unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());

        assert!(w.unwrap(&wrapped, b"there").is_none());
        let other = KeyWrapper::new(&Key256::generate(&OsRandom).unwrap());
        assert!(other.unwrap(&wrapped, b"here").is_none());
        for i in 0..wrapped.len() {
            let mut t = wrapped.clone();
            t[i] ^= 0x01;
            assert!(w.unwrap(&t, b"here").is_none(), "byte {i}");
        }
        assert!(w.unwrap(&wrapped[..WRAPPED_LEN - 1], b"here").is_none());
        let mut long = wrapped.clone();
        long.push(0);
        assert!(w.unwrap(&long, b"here").is_none());
    }

    #[test]
    fn two_wraps_of_one_key_differ() {
        let w = KeyWrapper::new(&Key256::generate(&OsRandom).unwrap());
        let key = Key256::generate(&OsRandom).unwrap();
        assert_ne!(
            w.wrap(&key, b"a", &OsRandom).unwrap(),
            w.wrap(&key, b"a", &OsRandom).unwrap()
        );
    }
}
