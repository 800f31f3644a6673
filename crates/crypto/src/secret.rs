//! Secret byte containers that zeroize on drop and never print their contents.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// A plaintext value (a credential, a decrypted Fernet field).
///
/// Zeroized on drop; `Debug` shows only the length. There is deliberately no `Display`,
/// `Clone` or `Serialize`: read it with [`SecretBytes::expose_secret`].
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes`; the buffer is zeroized when this is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Copies `bytes` into a new secret buffer.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }

    /// The secret bytes. Callers must not log or print them.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.0.len())
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

/// A 256-bit symmetric key (a data key or a KEK).
///
/// Zeroized on drop; no `Debug` contents, no `Clone`, no `Serialize` (rustls `AeadKey`).
pub struct Key256(Box<[u8; 32]>);

impl Key256 {
    /// Length in bytes.
    pub const LEN: usize = 32;

    /// Wraps existing key bytes. The caller should zeroize its own copy.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut b = bytes;
        let key = Self(Box::new(b));
        b.zeroize();
        key
    }

    /// Copies a 32-byte slice, or `None` when it has another length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self::from_bytes(arr))
    }

    /// Draws a fresh key from `rng`.
    ///
    /// # Errors
    ///
    /// [`crate::RandomError`] when the random source fails.
    pub fn generate(rng: &dyn crate::SecureRandom) -> Result<Self, crate::RandomError> {
        let mut key = Self(Box::new([0u8; 32]));
        rng.fill(&mut key.0[..])?;
        Ok(key)
    }

    /// The key bytes. Named so that every use is easy to audit.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for Key256 {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

// Marker: dropping a Key256 zeroizes it (see the Drop impl above).
impl zeroize::ZeroizeOnDrop for Key256 {}

// Marker: the inner `Zeroizing` wipes the buffer on drop.
impl zeroize::ZeroizeOnDrop for SecretBytes {}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key256([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}

    #[test]
    fn secrets_zeroize_on_drop_and_never_print() {
        zeroized_on_drop::<Key256>();
        zeroized_on_drop::<SecretBytes>();
        zeroized_on_drop::<crate::fernet::FernetKey>();
        let k = Key256::from_bytes([0x5a; 32]);
        let s = SecretBytes::from_slice(b"plaintext-canary");
        assert_eq!(format!("{k:?}"), "Key256([REDACTED])");
        assert_eq!(format!("{s:?}"), "SecretBytes([REDACTED; 16 bytes])");
    }
}
