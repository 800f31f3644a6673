//! Fernet tokens, byte-exact with pyca/cryptography's `Fernet` and `MultiFernet`.
//!
//! A token is the URL-safe base64 (with `=` padding) of
//!
//! ```text
//! 0x80 || timestamp (u64, big endian) || IV (16) || AES-128-CBC-PKCS7(plaintext) || HMAC-SHA256
//! ```
//!
//! where the HMAC (keyed with bytes `0..16` of the [`FernetKey`]) covers everything before it
//! and the AES key is bytes `16..32`.
//!
//! Decryption follows pyca's order: base64, version byte, lengths, then (only when a TTL is
//! given) expiry and clock skew, then the HMAC in constant time, then AES-CBC and PKCS7. With no
//! TTL there is no time check at all, as django-fernet-fields reads its tokens.
//!
//! Two deliberate differences from pyca, both stricter:
//!
//! * Decoding is canonical: only URL-safe base64 with exact `=` padding and zero trailing bits
//!   is accepted. pyca's decoder also ignores whitespace and accepts `+`, `/` and surplus `=`;
//!   django-fernet-fields only ever stores canonical tokens, so nothing real is lost.
//! * Structure is checked before the time: a token whose ciphertext is empty or not a whole
//!   number of blocks is [`FernetError::Malformed`] (pyca reports every failure as
//!   `InvalidToken`; only the error variant differs, never whether a token is accepted,
//!   apart from the decoding rule above).
//!
//! Tokens longer than [`MAX_TOKEN_LEN`] characters are refused before any work is done.
//!
//! ```
//! use strongroom_crypto::fernet::{Fernet, FernetKey};
//!
//! let fernet = Fernet::new(FernetKey::from_bytes([7; 32]));
//! let token = fernet.encrypt_with_parts(b"s3cr3t", 1_700_000_000, [1; 16]);
//! let plain = fernet.decrypt(&token, None, 1_700_000_000).unwrap();
//! assert_eq!(plain.expose_secret(), b"s3cr3t");
//! ```

use std::fmt;

use aes::cipher::block_padding::{NoPadding, Pkcs7};
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::{RandomError, SecretBytes, SecureRandom};

type HmacSha256 = Hmac<Sha256>;
type Aes128CbcEnc = cbc::Encryptor<aes::Aes128>;
type Aes128CbcDec = cbc::Decryptor<aes::Aes128>;

/// The version byte every Fernet token starts with.
pub const VERSION: u8 = 0x80;

/// Largest token text accepted by [`Token::decode`] (16 MiB of characters), which bounds the
/// work an untrusted token can demand. Encrypting plaintexts larger than about 12 MiB gives
/// tokens this crate will refuse to decrypt.
pub const MAX_TOKEN_LEN: usize = 16 * 1024 * 1024;

/// How far in the future a token's timestamp may be when a TTL is checked (pyca's
/// `_MAX_CLOCK_SKEW`).
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;

const BLOCK: usize = 16;
const HEADER_LEN: usize = 1 + 8 + BLOCK; // version, timestamp, IV
const MAC_LEN: usize = 32;
/// Header, one ciphertext block and the HMAC.
const MIN_TOKEN_BYTES: usize = HEADER_LEN + BLOCK + MAC_LEN;

/// Why a Fernet operation failed.
///
/// Messages are one short line and never contain key, token or plaintext bytes.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FernetError {
    /// The key is not URL-safe base64 (with padding) of exactly 32 bytes.
    #[error("invalid Fernet key: expected URL-safe base64 of 32 bytes")]
    InvalidKey,
    /// A `MultiFernet` needs at least one key.
    #[error("no Fernet keys given")]
    NoKeys,
    /// The token is not canonical URL-safe base64, has the wrong version byte, is too short or
    /// too long, or its ciphertext is empty or not a whole number of blocks.
    #[error("malformed Fernet token")]
    Malformed,
    /// A TTL was given and the token is older than that.
    #[error("Fernet token has expired")]
    Expired,
    /// A TTL was given and the token's timestamp is more than 60 s in the future.
    #[error("Fernet token timestamp is too far in the future")]
    ClockSkew,
    /// The HMAC does not match (wrong key or tampered token) or the padding is bad. Opaque on
    /// purpose, like pyca's `InvalidToken`.
    #[error("invalid Fernet token")]
    InvalidToken,
    /// The random number generator failed; nothing was encrypted.
    #[error("the random number generator failed")]
    Random(#[from] RandomError),
}

/// A Fernet key: bytes `0..16` sign (HMAC-SHA256), bytes `16..32` encrypt (AES-128).
///
/// Zeroized on drop; `Debug` prints `FernetKey([REDACTED])`. There is deliberately no
/// `Clone`, `Display` or `Serialize`; [`FernetKey::to_base64`] returns a secret string.
pub struct FernetKey(Box<[u8; 32]>);

impl FernetKey {
    /// Parses a key as pyca writes it: URL-safe base64, with `=` padding, of exactly 32 bytes.
    ///
    /// # Errors
    ///
    /// [`FernetError::InvalidKey`] for anything else (the input is never echoed).
    pub fn from_base64(s: &str) -> Result<Self, FernetError> {
        // 32 bytes are 44 characters; refuse anything much longer before decoding.
        if s.len() > 64 {
            return Err(FernetError::InvalidKey);
        }
        let mut buf = Zeroizing::new([0u8; 48]);
        let n = URL_SAFE
            .decode_slice(s.as_bytes(), &mut buf[..])
            .map_err(|_| FernetError::InvalidKey)?;
        if n != 32 {
            return Err(FernetError::InvalidKey);
        }
        let mut key = Self(Box::new([0u8; 32]));
        key.0.copy_from_slice(&buf[..32]);
        Ok(key)
    }

    /// Parses a key as pyca's `Fernet(key)` takes it: URL-safe base64, or the standard
    /// alphabet (`+` and `/`), which `base64.urlsafe_b64decode` takes too. For keys from a
    /// Django project's settings (`FERNET_USE_HKDF = False`), which may have been made with
    /// `openssl rand -base64 32`; [`Self::from_base64`] takes pyca's own spelling only.
    ///
    /// # Errors
    ///
    /// As [`Self::from_base64`].
    pub fn from_pyca_base64(s: &str) -> Result<Self, FernetError> {
        if s.len() > 64 {
            return Err(FernetError::InvalidKey);
        }
        let url_safe: Zeroizing<String> = Zeroizing::new(
            s.chars()
                .map(|c| match c {
                    '+' => '-',
                    '/' => '_',
                    c => c,
                })
                .collect(),
        );
        Self::from_base64(&url_safe)
    }

    /// Wraps raw key bytes. The caller should zeroize its own copy.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut bytes = bytes;
        let key = Self(Box::new(bytes));
        bytes.zeroize();
        key
    }

    /// Draws a fresh key from `rng` (pyca's `Fernet.generate_key`).
    ///
    /// # Errors
    ///
    /// [`FernetError::Random`] when the random source fails.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, FernetError> {
        let mut key = Self(Box::new([0u8; 32]));
        rng.fill(&mut key.0[..])?;
        Ok(key)
    }

    /// The key in pyca's text form (URL-safe base64 with padding). This text is the key.
    pub fn to_base64(&self) -> secrecy::SecretString {
        let mut buf = Zeroizing::new([0u8; 44]);
        // 32 bytes always encode to exactly 44 characters.
        let n = match URL_SAFE.encode_slice(&self.0[..], &mut buf[..]) {
            Ok(n) => n,
            Err(_) => unreachable!("32 bytes encode to 44 base64 characters"),
        };
        let mut text = String::with_capacity(n);
        for &b in &buf[..n] {
            text.push(char::from(b));
        }
        // `len == capacity`, so the conversion into a boxed str does not reallocate and leave
        // an unzeroized copy behind.
        secrecy::SecretString::from(text)
    }

    fn signing_key(&self) -> &[u8] {
        &self.0[..16]
    }

    fn encryption_key(&self) -> &[u8; 16] {
        let (_, enc) = self.0.split_at(16);
        match enc.try_into() {
            Ok(k) => k,
            Err(_) => unreachable!("the second half of a 32-byte key is 16 bytes"),
        }
    }

    fn mac(&self) -> HmacSha256 {
        match <HmacSha256 as Mac>::new_from_slice(self.signing_key()) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        }
    }
}

// Marker: the Drop impl below zeroizes the key.
impl zeroize::ZeroizeOnDrop for FernetKey {}

impl Drop for FernetKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for FernetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FernetKey([REDACTED])")
    }
}

/// A parsed, not yet authenticated, Fernet token.
///
/// [`Token::decode`] checks only the structure; nothing here is authentic until a key has
/// verified the HMAC.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Seconds since the Unix epoch, from the token header.
    pub timestamp: u64,
    /// The AES-CBC initialisation vector.
    pub iv: [u8; 16],
    /// The whole decoded token: version, timestamp, IV, ciphertext, HMAC.
    data: Vec<u8>,
}

impl Token {
    /// Strictly parses a token's text without any key.
    ///
    /// # Errors
    ///
    /// [`FernetError::Malformed`] when the text is longer than [`MAX_TOKEN_LEN`], is not
    /// canonical URL-safe base64 with `=` padding, does not start with version `0x80`, or
    /// the ciphertext is empty or not a whole number of 16-byte blocks.
    pub fn decode(token: &str) -> Result<Token, FernetError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(FernetError::Malformed);
        }
        let data = URL_SAFE
            .decode(token.as_bytes())
            .map_err(|_| FernetError::Malformed)?;
        if data.first() != Some(&VERSION) {
            return Err(FernetError::Malformed);
        }
        if data.len() < MIN_TOKEN_BYTES
            || !(data.len() - HEADER_LEN - MAC_LEN).is_multiple_of(BLOCK)
        {
            return Err(FernetError::Malformed);
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&data[1..9]);
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&data[9..HEADER_LEN]);
        Ok(Token {
            timestamp: u64::from_be_bytes(ts),
            iv,
            data,
        })
    }

    /// The AES-CBC ciphertext (at least one block).
    pub fn ciphertext(&self) -> &[u8] {
        &self.data[HEADER_LEN..self.data.len() - MAC_LEN]
    }

    fn signed(&self) -> &[u8] {
        &self.data[..self.data.len() - MAC_LEN]
    }

    fn tag(&self) -> &[u8] {
        &self.data[self.data.len() - MAC_LEN..]
    }

    /// pyca's TTL rule; saturating arithmetic gives the exact unbounded-integer answer.
    fn check_time(&self, ttl: Option<u64>, now_unix: u64) -> Result<(), FernetError> {
        if let Some(ttl) = ttl {
            if self.timestamp.saturating_add(ttl) < now_unix {
                return Err(FernetError::Expired);
            }
            if now_unix.saturating_add(MAX_CLOCK_SKEW_SECS) < self.timestamp {
                return Err(FernetError::ClockSkew);
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("timestamp", &self.timestamp)
            .field("ciphertext_len", &self.ciphertext().len())
            .finish_non_exhaustive()
    }
}

/// Fernet with one key (pyca's `Fernet`).
pub struct Fernet {
    key: FernetKey,
}

impl Fernet {
    /// Uses `key` for encryption and decryption.
    pub fn new(key: FernetKey) -> Self {
        Self { key }
    }

    /// Encrypts `plaintext` with a fresh random IV and the timestamp `now_unix`.
    ///
    /// # Errors
    ///
    /// [`FernetError::Random`] when the random source fails.
    pub fn encrypt(
        &self,
        plaintext: &[u8],
        now_unix: u64,
        rng: &dyn SecureRandom,
    ) -> Result<String, FernetError> {
        let mut iv = [0u8; 16];
        rng.fill(&mut iv)?;
        Ok(self.encrypt_with_parts(plaintext, now_unix, iv))
    }

    /// Encrypts with a caller-chosen timestamp and IV (pyca's `_encrypt_from_parts`).
    ///
    /// Deterministic, for test vectors and byte-exact rebuilding of stored tokens. Never reuse
    /// an IV for real data: use [`Fernet::encrypt`].
    pub fn encrypt_with_parts(&self, plaintext: &[u8], timestamp: u64, iv: [u8; 16]) -> String {
        let pad = BLOCK - plaintext.len() % BLOCK;
        let ct_len = plaintext.len() + pad;
        // The buffer holds plaintext until it is encrypted in place, so it is zeroizing.
        let mut data = Zeroizing::new(Vec::with_capacity(HEADER_LEN + ct_len + MAC_LEN));
        data.push(VERSION);
        data.extend_from_slice(&timestamp.to_be_bytes());
        data.extend_from_slice(&iv);
        data.extend_from_slice(plaintext);
        // PKCS7 is applied here, inside the zeroizing buffer, rather than by `cbc`, whose
        // padding path copies the last partial block to an unzeroized stack temporary.
        data.resize(HEADER_LEN + ct_len, pad as u8);
        let enc = Aes128CbcEnc::new(self.key.encryption_key().into(), (&iv).into());
        if enc
            .encrypt_padded_mut::<NoPadding>(&mut data[HEADER_LEN..], ct_len)
            .is_err()
        {
            unreachable!("the buffer is a whole number of blocks");
        }
        let mut mac = self.key.mac();
        mac.update(&data);
        data.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE.encode(&*data)
    }

    /// Decrypts `token`. With `ttl = Some(t)`, rejects tokens older than `t` seconds at
    /// `now_unix` or stamped more than 60 s after it; with `None` no time check is made.
    ///
    /// # Errors
    ///
    /// [`FernetError::Malformed`], [`FernetError::Expired`], [`FernetError::ClockSkew`] or
    /// [`FernetError::InvalidToken`], checked in that order.
    pub fn decrypt(
        &self,
        token: &str,
        ttl: Option<u64>,
        now_unix: u64,
    ) -> Result<SecretBytes, FernetError> {
        let token = Token::decode(token)?;
        token.check_time(ttl, now_unix)?;
        self.open(&token)
    }

    /// HMAC check in constant time, then AES-CBC decryption and PKCS7 unpadding.
    fn open(&self, token: &Token) -> Result<SecretBytes, FernetError> {
        let mut mac = self.key.mac();
        mac.update(token.signed());
        mac.verify_slice(token.tag())
            .map_err(|_| FernetError::InvalidToken)?;
        let mut buf = Zeroizing::new(token.ciphertext().to_vec());
        let dec = Aes128CbcDec::new(self.key.encryption_key().into(), (&token.iv).into());
        let len = dec
            .decrypt_padded_mut::<Pkcs7>(&mut buf)
            .map_err(|_| FernetError::InvalidToken)?
            .len();
        buf[len..].zeroize();
        buf.truncate(len);
        // Moves the allocation out; the emptied `Zeroizing` has nothing left to wipe.
        Ok(SecretBytes::new(std::mem::take(&mut *buf)))
    }
}

impl fmt::Debug for Fernet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fernet([REDACTED])")
    }
}

/// Several Fernet keys in order (pyca's `MultiFernet`): encrypts with the first, decrypts with
/// whichever opens the token, trying them in order.
pub struct MultiFernet {
    fernets: Vec<Fernet>,
}

impl MultiFernet {
    /// Builds from a non-empty, ordered list.
    ///
    /// # Errors
    ///
    /// [`FernetError::NoKeys`] when `fernets` is empty.
    pub fn new(fernets: Vec<Fernet>) -> Result<Self, FernetError> {
        if fernets.is_empty() {
            return Err(FernetError::NoKeys);
        }
        Ok(Self { fernets })
    }

    fn first(&self) -> &Fernet {
        // Invariant: `new` refuses an empty list and nothing removes entries.
        match self.fernets.first() {
            Some(f) => f,
            None => unreachable!("MultiFernet is never empty"),
        }
    }

    /// Encrypts with the first key; see [`Fernet::encrypt`].
    ///
    /// # Errors
    ///
    /// [`FernetError::Random`] when the random source fails.
    pub fn encrypt(
        &self,
        plaintext: &[u8],
        now_unix: u64,
        rng: &dyn SecureRandom,
    ) -> Result<String, FernetError> {
        self.first().encrypt(plaintext, now_unix, rng)
    }

    /// Deterministic encryption with the first key; see [`Fernet::encrypt_with_parts`].
    pub fn encrypt_with_parts(&self, plaintext: &[u8], timestamp: u64, iv: [u8; 16]) -> String {
        self.first().encrypt_with_parts(plaintext, timestamp, iv)
    }

    /// Decrypts with the first key that opens `token`; see [`Fernet::decrypt`].
    ///
    /// # Errors
    ///
    /// As [`Fernet::decrypt`]; [`FernetError::InvalidToken`] when no key opens the token.
    pub fn decrypt(
        &self,
        token: &str,
        ttl: Option<u64>,
        now_unix: u64,
    ) -> Result<SecretBytes, FernetError> {
        self.decrypt_with_index(token, ttl, now_unix)
            .map(|(plain, _)| plain)
    }

    /// As [`MultiFernet::decrypt`], also returning the index of the key that opened the token.
    ///
    /// # Errors
    ///
    /// As [`MultiFernet::decrypt`].
    pub fn decrypt_with_index(
        &self,
        token: &str,
        ttl: Option<u64>,
        now_unix: u64,
    ) -> Result<(SecretBytes, usize), FernetError> {
        // Parsing and the time check do not depend on the key: do them once.
        let token = Token::decode(token)?;
        token.check_time(ttl, now_unix)?;
        for (i, fernet) in self.fernets.iter().enumerate() {
            // Like pyca, any failure (HMAC or padding) moves on to the next key.
            if let Ok(plain) = fernet.open(&token) {
                return Ok((plain, i));
            }
        }
        Err(FernetError::InvalidToken)
    }

    /// Number of keys (at least 1).
    #[allow(clippy::len_without_is_empty)] // never empty by construction
    pub fn len(&self) -> usize {
        self.fernets.len()
    }
}

impl fmt::Debug for MultiFernet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MultiFernet([REDACTED; {} keys])", self.fernets.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn err<T>(r: Result<T, FernetError>) -> FernetError {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    fn fernet() -> Fernet {
        Fernet::new(FernetKey::from_bytes([0x42; 32]))
    }

    /// A valid token with the given timestamp.
    fn with_timestamp(f: &Fernet, ts: u64) -> String {
        f.encrypt_with_parts(b"edge", ts, [9; 16])
    }

    #[test]
    fn max_timestamp_with_ttl_does_not_overflow() {
        let f = fernet();
        let t = with_timestamp(&f, u64::MAX);
        // Far in the future: clock skew, not a panic.
        assert_eq!(err(f.decrypt(&t, Some(60), 0)), FernetError::ClockSkew);
        assert_eq!(
            err(f.decrypt(&t, Some(u64::MAX), 1_000)),
            FernetError::ClockSkew
        );
        // now + 60 saturates at u64::MAX, which is not below the timestamp.
        let plain = f.decrypt(&t, Some(1), u64::MAX).unwrap();
        assert_eq!(plain.expose_secret(), b"edge");
        assert_eq!(
            f.decrypt(&t, Some(0), u64::MAX - 60)
                .unwrap()
                .expose_secret(),
            b"edge"
        );
        assert_eq!(
            err(f.decrypt(&t, Some(0), u64::MAX - 61)),
            FernetError::ClockSkew
        );
        // Without a TTL there is no time check at all.
        assert_eq!(f.decrypt(&t, None, 0).unwrap().expose_secret(), b"edge");
    }

    #[test]
    fn huge_ttl_never_expires_and_zero_timestamp() {
        let f = fernet();
        let t = with_timestamp(&f, 0);
        assert!(f.decrypt(&t, Some(u64::MAX), u64::MAX).is_ok());
        assert_eq!(
            err(f.decrypt(&t, Some(u64::MAX - 1), u64::MAX)),
            FernetError::Expired
        );
        assert_eq!(err(f.decrypt(&t, Some(0), 1)), FernetError::Expired);
        assert!(f.decrypt(&t, Some(0), 0).is_ok());
        assert!(f.decrypt(&t, None, u64::MAX).is_ok());
    }

    #[test]
    fn ttl_boundaries() {
        let f = fernet();
        let t = with_timestamp(&f, 1_000);
        assert!(f.decrypt(&t, Some(10), 1_010).is_ok());
        assert_eq!(err(f.decrypt(&t, Some(10), 1_011)), FernetError::Expired);
        assert!(f.decrypt(&t, Some(10), 940).is_ok());
        assert_eq!(err(f.decrypt(&t, Some(10), 939)), FernetError::ClockSkew);
    }

    #[test]
    fn time_is_checked_before_the_hmac() {
        let f = fernet();
        let other = Fernet::new(FernetKey::from_bytes([0x43; 32]));
        let t = with_timestamp(&other, 1_000);
        assert_eq!(err(f.decrypt(&t, Some(10), 2_000)), FernetError::Expired);
        assert_eq!(err(f.decrypt(&t, Some(10), 0)), FernetError::ClockSkew);
        assert_eq!(err(f.decrypt(&t, None, 0)), FernetError::InvalidToken);
    }

    #[test]
    fn empty_plaintext_round_trips_as_one_padding_block() {
        let f = fernet();
        let t = f.encrypt_with_parts(b"", 5, [0; 16]);
        let tok = Token::decode(&t).unwrap();
        assert_eq!(tok.ciphertext().len(), 16);
        assert_eq!(tok.timestamp, 5);
        assert!(f.decrypt(&t, None, 0).unwrap().is_empty());
    }

    #[test]
    fn block_sized_plaintext_gets_a_full_padding_block() {
        let f = fernet();
        for len in [15usize, 16, 17, 32] {
            let pt = vec![0xAB; len];
            let t = f.encrypt_with_parts(&pt, 5, [3; 16]);
            let tok = Token::decode(&t).unwrap();
            assert_eq!(tok.ciphertext().len(), (len / 16 + 1) * 16);
            assert_eq!(f.decrypt(&t, None, 0).unwrap().expose_secret(), &pt[..]);
        }
    }

    fn resign(key: &FernetKey, body: &[u8]) -> String {
        let mut mac = key.mac();
        mac.update(body);
        let mut data = body.to_vec();
        data.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE.encode(data)
    }

    #[test]
    fn zero_length_and_partial_ciphertext_are_malformed() {
        let key = FernetKey::from_bytes([0x42; 32]);
        let mut body = vec![VERSION];
        body.extend_from_slice(&7u64.to_be_bytes());
        body.extend_from_slice(&[0; 16]);
        // Correctly signed, but no ciphertext at all.
        let t = resign(&key, &body);
        assert_eq!(err(Token::decode(&t)), FernetError::Malformed);
        assert_eq!(
            err(Fernet::new(key).decrypt(&t, None, 0)),
            FernetError::Malformed
        );
        let key = FernetKey::from_bytes([0x42; 32]);
        body.extend_from_slice(&[1; 17]);
        let t = resign(&key, &body);
        assert_eq!(err(Token::decode(&t)), FernetError::Malformed);
    }

    #[test]
    fn bad_padding_under_a_valid_hmac_is_invalid_token() {
        let key = FernetKey::from_bytes([0x42; 32]);
        let mut body = vec![VERSION];
        body.extend_from_slice(&7u64.to_be_bytes());
        body.extend_from_slice(&[0; 16]);
        // Encrypt a block whose last byte is 0: never valid PKCS7.
        let mut block = [0u8; 16];
        let enc = Aes128CbcEnc::new(key.encryption_key().into(), (&[0u8; 16]).into());
        enc.encrypt_padded_mut::<NoPadding>(&mut block, 16).unwrap();
        body.extend_from_slice(&block);
        let t = resign(&key, &body);
        assert_eq!(
            err(Fernet::new(key).decrypt(&t, None, 0)),
            FernetError::InvalidToken
        );
    }

    #[test]
    fn version_and_length_checks() {
        assert_eq!(err(Token::decode("")), FernetError::Malformed);
        assert_eq!(err(Token::decode("gA==")), FernetError::Malformed);
        let f = fernet();
        let t = f.encrypt_with_parts(b"x", 1, [0; 16]);
        let mut raw = URL_SAFE.decode(&t).unwrap();
        raw[0] = 0x81;
        assert_eq!(
            err(Token::decode(&URL_SAFE.encode(&raw))),
            FernetError::Malformed
        );
        let long = "A".repeat(MAX_TOKEN_LEN + 4);
        assert_eq!(err(Token::decode(&long)), FernetError::Malformed);
    }

    #[test]
    fn keys() {
        assert_eq!(
            FernetKey::from_base64("").unwrap_err(),
            FernetError::InvalidKey
        );
        let k = FernetKey::from_bytes([0xFB; 32]);
        let text = k.to_base64();
        use secrecy::ExposeSecret;
        let s = text.expose_secret();
        assert_eq!(s.len(), 44);
        assert!(FernetKey::from_base64(s).is_ok());
        assert_eq!(
            FernetKey::from_base64(s.trim_end_matches('=')).unwrap_err(),
            FernetError::InvalidKey
        );
        let standard = s.replace('-', "+").replace('_', "/");
        assert_ne!(&standard, s, "the key has a '-' or '_' to spell otherwise");
        assert_eq!(
            FernetKey::from_base64(&standard).unwrap_err(),
            FernetError::InvalidKey
        );
        // As pyca's Fernet(key) takes it: the same key.
        let pyca = FernetKey::from_pyca_base64(&standard).unwrap();
        assert_eq!(
            pyca.to_base64().expose_secret(),
            k.to_base64().expose_secret()
        );
        assert!(FernetKey::from_pyca_base64(s.trim_end_matches('=')).is_err());
        // 31 and 33 bytes.
        assert!(FernetKey::from_base64(&URL_SAFE.encode([1u8; 31])).is_err());
        assert!(FernetKey::from_base64(&URL_SAFE.encode([1u8; 33])).is_err());
        assert_eq!(format!("{k:?}"), "FernetKey([REDACTED])");
        let msg = FernetError::InvalidKey.to_string();
        assert!(!msg.contains(s));
    }

    #[test]
    fn multifernet_needs_a_key() {
        assert_eq!(
            MultiFernet::new(Vec::new()).unwrap_err(),
            FernetError::NoKeys
        );
        let m = MultiFernet::new(vec![fernet()]).unwrap();
        assert_eq!(m.len(), 1);
    }
}
