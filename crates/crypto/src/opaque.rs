//! Opaque tokens: a number sealed so that it can be handed to a client and taken back, neither
//! readable nor forgeable by it (a page cursor that would otherwise tell the position in a
//! log every client shares). AES-256-GCM with a random 96-bit nonce and the caller's
//! associated data (what the token is for: another owner's or credential's token does not
//! open), as `base64url(nonce(12) ‖ ciphertext(8) ‖ tag(16))`, 48 characters.

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::keywrap::WrapError;
use crate::{Key256, SecureRandom};

/// A keyed permutation of 128-bit numbers (one AES-256 block): distinct inputs give
/// distinct outputs that, without the key, say nothing of the input. For identifiers that
/// must be unique but must not count (a request id from a counter would tell anyone how
/// many requests the server has answered).
pub struct Permutation {
    cipher: aes::Aes256,
}

impl std::fmt::Debug for Permutation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permutation(..)")
    }
}

impl Permutation {
    /// A permutation under `key`.
    pub fn new(key: &Key256) -> Self {
        use aes::cipher::KeyInit;
        Self {
            cipher: aes::Aes256::new(key.expose_secret().into()),
        }
    }

    /// `n`'s image.
    pub fn apply(&self, n: u128) -> u128 {
        use aes::cipher::BlockEncrypt;
        let mut block = aes::Block::from(n.to_be_bytes());
        self.cipher.encrypt_block(&mut block);
        u128::from_be_bytes(block.into())
    }
}

/// Seals and opens numbers under one key.
pub struct OpaqueSealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for OpaqueSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpaqueSealer(..)")
    }
}

impl OpaqueSealer {
    /// A sealer under `key`.
    pub fn new(key: &Key256) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.expose_secret().into()),
        }
    }

    /// `n` as a token bound to `aad`.
    ///
    /// # Errors
    ///
    /// The random source failed (the cipher cannot refuse 8 bytes).
    pub fn seal_u64(
        &self,
        n: u64,
        aad: &[u8],
        rng: &dyn SecureRandom,
    ) -> Result<String, WrapError> {
        let bytes = crate::keywrap::seal(&self.cipher, &n.to_be_bytes(), aad, rng)?;
        Ok(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The number in `token`, or `None` when it is not one this key sealed for `aad` (another
    /// key, another purpose, edited, truncated, not base64url).
    pub fn open_u64(&self, token: &str, aad: &[u8]) -> Option<u64> {
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let plain = crate::keywrap::open(&self.cipher, &bytes, 8, aad)?;
        Some(u64::from_be_bytes(plain.as_slice().try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OsRandom;

    #[test]
    fn a_permutation_is_distinct_and_keyed() {
        let p = Permutation::new(&Key256::generate(&OsRandom).unwrap());
        let images: std::collections::HashSet<u128> = (0..1000).map(|n| p.apply(n)).collect();
        assert_eq!(images.len(), 1000);
        assert!(images.iter().all(|&i| i > 1000), "counts show through");
        let q = Permutation::new(&Key256::generate(&OsRandom).unwrap());
        assert_ne!(p.apply(7), q.apply(7));
        assert_eq!(p.apply(7), p.apply(7));
    }

    #[test]
    fn round_trips_and_refuses_other_aad_other_key_and_edits() {
        let key = Key256::generate(&OsRandom).unwrap();
        let s = OpaqueSealer::new(&key);
        let t = s.seal_u64(313, b"alice\0zoom.key", &OsRandom).unwrap();
        assert_eq!(t.len(), 48);
        assert!(!t.contains("313"));
        assert_eq!(s.open_u64(&t, b"alice\0zoom.key"), Some(313));
        // Fresh nonce: the same number never gives the same token.
        assert_ne!(t, s.seal_u64(313, b"alice\0zoom.key", &OsRandom).unwrap());

        assert_eq!(s.open_u64(&t, b"bob\0zoom.key"), None);
        let other = OpaqueSealer::new(&Key256::generate(&OsRandom).unwrap());
        assert_eq!(other.open_u64(&t, b"alice\0zoom.key"), None);
        let mut edited = t.clone().into_bytes();
        edited[20] = if edited[20] == b'A' { b'B' } else { b'A' };
        let edited = String::from_utf8(edited).unwrap();
        assert_eq!(s.open_u64(&edited, b"alice\0zoom.key"), None);
        for bad in ["", "313", &t[..47], &format!("{t}A"), "!!!!"] {
            assert_eq!(s.open_u64(bad, b"alice\0zoom.key"), None, "{bad:?}");
        }
    }
}
