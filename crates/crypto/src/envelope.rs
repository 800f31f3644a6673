//! Envelope encryption, format v1.
//!
//! Each credential version gets a fresh random 256-bit **data key**. The value is sealed with
//! it under AES-256-GCM (random 96-bit nonce; the key is used exactly once). The data key is
//! then wrapped by the provider's active KEK. Both layers carry associated data in the one
//! canonical encoding of [`crate::binding`]:
//!
//! | field          | value layer | data-key layer |
//! |----------------|-------------|----------------|
//! | `format`       | `0x01`      | `0x01`         |
//! | `purpose`      | `"value"`   | `"data-key"`   |
//! | `alg`          | `0x01` (AES-256-GCM) | `0x01` |
//! | `owner`        | UTF-8       | UTF-8          |
//! | `name`         | ASCII       | ASCII          |
//! | `version`      | u32 BE      | u32 BE         |
//! | `kek.provider`, `kek.id`, `kek.version` (u32 BE) | — | yes |
//! | extra bound fields | yes     | yes            |
//!
//! So a sealed value moved to another owner, name or version fails in both layers, and a
//! wrapped key relabelled with another KEK fails to unwrap. The value layer does not name the
//! KEK on purpose: a rewrap ([`rewrap`]) replaces only the wrapped key and never sees the
//! plaintext.
//!
//! ## Byte layout
//!
//! The complete envelope ([`Sealed::to_bytes`]), all integers big-endian:
//!
//! ```text
//! "SRE" format:u8=1 alg:u8=1
//! provider_len:u8 provider   key_id_len:u8 key_id   kek_version:u32
//! wrapped_len:u16 wrapped    nonce:[u8;12]          ciphertext‖tag (the rest, >= 16 bytes)
//! ```
//!
//! Stores that keep the wrapped key and KEK in their own columns (so a rewrap touches only
//! them) keep the value layer alone ([`Sealed::value_bytes`]):
//!
//! ```text
//! "SRV" format:u8=1 alg:u8=1 nonce:[u8;12] ciphertext‖tag
//! ```
//!
//! Parsers are strict: unknown format or algorithm ids, short or oversized fields and trailing
//! bytes are all rejected with [`EnvelopeError::Malformed`] or a named variant, never a panic.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use crate::binding::{self, Binding};
use crate::provider::{
    KekRef, KeyProvider, ProviderError, ProviderErrorKind, UnwrapError, WrappedKey, MAX_KEK_ID_LEN,
    MAX_WRAPPED_KEY_LEN,
};
use crate::{Key256, RandomError, SecretBytes, SecureRandom};

/// The envelope format this crate writes.
pub const FORMAT_V1: u8 = 1;
/// Largest plaintext [`seal`] accepts (the API limits values to 64 KiB; this is the hard cap).
pub const MAX_PLAINTEXT_LEN: usize = 1 << 20;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const ENVELOPE_MAGIC: &[u8; 3] = b"SRE";
const VALUE_MAGIC: &[u8; 3] = b"SRV";

/// The value-layer AEAD.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Algorithm {
    /// AES-256-GCM, 96-bit nonce, 128-bit tag.
    Aes256Gcm,
}

impl Algorithm {
    /// The id written in the format.
    pub fn id(self) -> u8 {
        match self {
            Algorithm::Aes256Gcm => 1,
        }
    }

    fn from_id(id: u8) -> Result<Self, EnvelopeError> {
        match id {
            1 => Ok(Algorithm::Aes256Gcm),
            other => Err(EnvelopeError::UnsupportedAlgorithm(other)),
        }
    }
}

/// A sealed credential version: the encrypted value and its wrapped data key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Sealed {
    /// The value-layer AEAD.
    pub alg: Algorithm,
    /// The data key, wrapped by a KEK.
    pub wrapped_key: WrappedKey,
    /// The value-layer nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// Why sealing or opening failed. Decryption failures are opaque on purpose.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The bytes are not a well-formed envelope (the detail names the field, never a value).
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// The envelope was written in a format this build does not know.
    #[error("unsupported envelope format {0}")]
    UnsupportedFormat(u8),
    /// The value layer uses an algorithm this build does not know.
    #[error("unsupported envelope algorithm {0}")]
    UnsupportedAlgorithm(u8),
    /// The value does not open here: wrong place, wrong key, or tampered. Deliberately says
    /// no more.
    #[error(
        "the sealed value does not open here (wrong owner, name, version or key, or tampered)"
    )]
    Decrypt,
    /// No configured provider holds the KEK that wrapped the data key.
    #[error("no configured key provider holds key {0}")]
    UnknownKek(KekRef),
    /// The provider failed for a reason other than authentication.
    #[error(transparent)]
    Provider(ProviderError),
    /// The plaintext exceeds [`MAX_PLAINTEXT_LEN`].
    #[error("value too large to seal")]
    TooLarge,
    /// The random source failed.
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl From<ProviderError> for EnvelopeError {
    fn from(e: ProviderError) -> Self {
        if e.kind() == ProviderErrorKind::AuthenticationFailed {
            EnvelopeError::Decrypt
        } else {
            EnvelopeError::Provider(e)
        }
    }
}

impl From<UnwrapError> for EnvelopeError {
    fn from(e: UnwrapError) -> Self {
        match e {
            UnwrapError::NotMine(kek) => EnvelopeError::UnknownKek(kek),
            UnwrapError::Failed(e) => e.into(),
        }
    }
}

/// Associated data of the value layer.
pub fn value_aad(binding: &Binding, alg: Algorithm) -> Vec<u8> {
    let mut fields = common_fields(binding, alg, b"value");
    fields.extend(binding.fields());
    binding::encode(&fields)
}

/// Associated data of the data-key layer (what the provider authenticates).
pub fn key_aad(binding: &Binding, alg: Algorithm, kek: &KekRef) -> Vec<u8> {
    let mut fields = common_fields(binding, alg, b"data-key");
    fields.extend(binding.fields());
    fields.push(("kek.provider", kek.provider.as_bytes().to_vec()));
    fields.push(("kek.id", kek.key_id.as_bytes().to_vec()));
    fields.push(("kek.version", kek.version.to_be_bytes().to_vec()));
    binding::encode(&fields)
}

fn common_fields(
    _binding: &Binding,
    alg: Algorithm,
    purpose: &[u8],
) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("format", vec![FORMAT_V1]),
        ("purpose", purpose.to_vec()),
        ("alg", vec![alg.id()]),
    ]
}

/// Seals `plaintext` for `binding` under a fresh data key wrapped by `provider`'s active KEK.
///
/// # Errors
///
/// [`EnvelopeError::TooLarge`], [`EnvelopeError::Random`], or the provider's error.
pub async fn seal(
    provider: &dyn KeyProvider,
    binding: &Binding,
    plaintext: &SecretBytes,
    rng: &dyn SecureRandom,
) -> Result<Sealed, EnvelopeError> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(EnvelopeError::TooLarge);
    }
    let alg = Algorithm::Aes256Gcm;
    let data_key = Key256::generate(rng)?;
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)?;
    let ciphertext = seal_value(&data_key, alg, &nonce, binding, plaintext.expose_secret())?;
    let wrapped_key = wrap_data_key(provider, binding, alg, &data_key).await?;
    Ok(Sealed {
        alg,
        wrapped_key,
        nonce,
        ciphertext,
    })
}

/// Seals with caller-chosen data key and nonce. Only for reproducible test vectors: reusing a
/// (data key, nonce) pair for two values breaks AES-GCM.
///
/// # Errors
///
/// As [`seal`].
pub async fn dangerous_seal_with_parts(
    provider: &dyn KeyProvider,
    binding: &Binding,
    plaintext: &[u8],
    data_key: &Key256,
    nonce: [u8; NONCE_LEN],
) -> Result<Sealed, EnvelopeError> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(EnvelopeError::TooLarge);
    }
    let alg = Algorithm::Aes256Gcm;
    let ciphertext = seal_value(data_key, alg, &nonce, binding, plaintext)?;
    let wrapped_key = wrap_data_key(provider, binding, alg, data_key).await?;
    Ok(Sealed {
        alg,
        wrapped_key,
        nonce,
        ciphertext,
    })
}

fn seal_value(
    data_key: &Key256,
    alg: Algorithm,
    nonce: &[u8; NONCE_LEN],
    binding: &Binding,
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let cipher = Aes256Gcm::new(data_key.expose_secret().into());
    let mut buffer = Zeroizing::new(Vec::with_capacity(plaintext.len() + TAG_LEN));
    buffer.extend_from_slice(plaintext);
    cipher
        .encrypt_in_place(
            Nonce::from_slice(nonce),
            &value_aad(binding, alg),
            &mut *buffer,
        )
        // Only fails for plaintexts beyond GCM's 64 GiB limit, far above MAX_PLAINTEXT_LEN.
        .map_err(|_| EnvelopeError::TooLarge)?;
    Ok(std::mem::take(&mut *buffer))
}

async fn wrap_data_key(
    provider: &dyn KeyProvider,
    binding: &Binding,
    alg: Algorithm,
    data_key: &Key256,
) -> Result<WrappedKey, EnvelopeError> {
    // A rotation between `active_kek` and `wrap` makes the provider refuse the old KEK; ask
    // again. Two retries cover any realistic rotation rate.
    let mut attempts = 0;
    loop {
        let kek = provider.active_kek()?;
        let aad = key_aad(binding, alg, &kek);
        match provider.wrap(&kek, data_key, &aad).await {
            Ok(wrapped) if wrapped.kek == kek => {
                check_wrapped_key(&wrapped)?;
                return Ok(wrapped);
            }
            Ok(_) => {
                return Err(EnvelopeError::Provider(ProviderError::new(
                    ProviderErrorKind::Other,
                    provider.kind(),
                    "wrapped under another KEK than the one requested",
                )))
            }
            Err(e) if e.kind() == ProviderErrorKind::KekNotActive && attempts < 2 => attempts += 1,
            Err(e) => return Err(EnvelopeError::Provider(e)),
        }
    }
}

/// Opens `sealed`, which must have been sealed for exactly `binding`.
///
/// # Errors
///
/// [`EnvelopeError::Decrypt`] when it does not open (tampered, or another place or key);
/// [`EnvelopeError::UnknownKek`] when `provider` does not hold its KEK; provider errors.
pub async fn open(
    provider: &dyn KeyProvider,
    binding: &Binding,
    sealed: &Sealed,
) -> Result<SecretBytes, EnvelopeError> {
    let data_key = unwrap_data_key(provider, binding, sealed).await?;
    if sealed.ciphertext.len() < TAG_LEN {
        return Err(EnvelopeError::Decrypt);
    }
    let cipher = Aes256Gcm::new(data_key.expose_secret().into());
    let mut buffer = Zeroizing::new(sealed.ciphertext.clone());
    cipher
        .decrypt_in_place(
            Nonce::from_slice(&sealed.nonce),
            &value_aad(binding, sealed.alg),
            &mut *buffer,
        )
        .map_err(|_| EnvelopeError::Decrypt)?;
    Ok(SecretBytes::new(std::mem::take(&mut *buffer)))
}

/// Checks that `sealed`'s data key unwraps for exactly `binding`, and decrypts nothing. The
/// key layer's associated data carries every bound field, so this authenticates them: a
/// value that must not be used (past its expiry) is told apart from a tampered one without
/// being opened.
///
/// # Errors
///
/// As [`open`] for the unwrap.
pub async fn check_binding(
    provider: &dyn KeyProvider,
    binding: &Binding,
    sealed: &Sealed,
) -> Result<(), EnvelopeError> {
    unwrap_data_key(provider, binding, sealed).await.map(drop)
}

async fn unwrap_data_key(
    provider: &dyn KeyProvider,
    binding: &Binding,
    sealed: &Sealed,
) -> Result<Key256, EnvelopeError> {
    let aad = key_aad(binding, sealed.alg, &sealed.wrapped_key.kek);
    Ok(provider.unwrap(&sealed.wrapped_key, &aad).await?)
}

/// Re-wraps the data key of `sealed` under `to`'s active KEK, leaving the value layer as it is
/// (the plaintext is never decrypted). `from` must hold the current KEK; `from` and `to` may be
/// the same provider (rotation) or different ones (moving to another provider).
///
/// # Errors
///
/// As [`open`] for the unwrap, and as [`seal`] for the wrap.
pub async fn rewrap(
    from: &dyn KeyProvider,
    to: &dyn KeyProvider,
    binding: &Binding,
    sealed: &Sealed,
) -> Result<Sealed, EnvelopeError> {
    let data_key = unwrap_data_key(from, binding, sealed).await?;
    let wrapped_key = wrap_data_key(to, binding, sealed.alg, &data_key).await?;
    Ok(Sealed {
        wrapped_key,
        ..sealed.clone()
    })
}

impl Sealed {
    /// The complete self-describing envelope.
    ///
    /// # Errors
    ///
    /// [`EnvelopeError::Malformed`] when the KEK ids or wrapped key exceed the format's limits
    /// (never for values made by [`seal`], which checks them).
    pub fn to_bytes(&self) -> Result<Vec<u8>, EnvelopeError> {
        check_wrapped_key(&self.wrapped_key)?;
        let kek = &self.wrapped_key.kek;
        let mut out = Vec::with_capacity(
            5 + 2
                + kek.provider.len()
                + kek.key_id.len()
                + 4
                + 2
                + self.wrapped_key.bytes.len()
                + NONCE_LEN
                + self.ciphertext.len(),
        );
        out.extend_from_slice(ENVELOPE_MAGIC);
        out.push(FORMAT_V1);
        out.push(self.alg.id());
        // `check_wrapped_key` bounded every length below, so the casts cannot truncate.
        out.push(kek.provider.len() as u8);
        out.extend_from_slice(kek.provider.as_bytes());
        out.push(kek.key_id.len() as u8);
        out.extend_from_slice(kek.key_id.as_bytes());
        out.extend_from_slice(&kek.version.to_be_bytes());
        out.extend_from_slice(&(self.wrapped_key.bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.wrapped_key.bytes);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.ciphertext);
        Ok(out)
    }

    /// Parses a complete envelope written by [`Sealed::to_bytes`].
    ///
    /// # Errors
    ///
    /// [`EnvelopeError::Malformed`], [`EnvelopeError::UnsupportedFormat`] or
    /// [`EnvelopeError::UnsupportedAlgorithm`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let mut r = Reader(bytes);
        let alg = r.header(ENVELOPE_MAGIC)?;
        let provider = r.short_str("KEK provider")?;
        let key_id = r.short_str("KEK id")?;
        let version = u32::from_be_bytes(r.array("KEK version")?);
        let wrapped_len = u16::from_be_bytes(r.array("wrapped key length")?) as usize;
        if wrapped_len == 0 || wrapped_len > MAX_WRAPPED_KEY_LEN {
            return Err(EnvelopeError::Malformed("wrapped key length out of range"));
        }
        let wrapped = r.take(wrapped_len, "wrapped key")?.to_vec();
        let nonce = r.array("nonce")?;
        let ciphertext = r.rest_ciphertext()?;
        let wrapped_key = WrappedKey {
            kek: KekRef {
                provider,
                key_id,
                version,
            },
            bytes: wrapped,
        };
        check_wrapped_key(&wrapped_key)?;
        Ok(Sealed {
            alg,
            wrapped_key,
            nonce,
            ciphertext,
        })
    }

    /// The value layer alone, for stores that keep the wrapped key in its own columns.
    pub fn value_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + NONCE_LEN + self.ciphertext.len());
        out.extend_from_slice(VALUE_MAGIC);
        out.push(FORMAT_V1);
        out.push(self.alg.id());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Rebuilds a sealed value from [`Sealed::value_bytes`] and its wrapped key.
    ///
    /// # Errors
    ///
    /// As [`Sealed::from_bytes`].
    pub fn from_parts(value_bytes: &[u8], wrapped_key: WrappedKey) -> Result<Self, EnvelopeError> {
        check_wrapped_key(&wrapped_key)?;
        let mut r = Reader(value_bytes);
        let alg = r.header(VALUE_MAGIC)?;
        let nonce = r.array("nonce")?;
        let ciphertext = r.rest_ciphertext()?;
        Ok(Sealed {
            alg,
            wrapped_key,
            nonce,
            ciphertext,
        })
    }
}

fn check_wrapped_key(w: &WrappedKey) -> Result<(), EnvelopeError> {
    let ok_id = |s: &str| !s.is_empty() && s.len() <= MAX_KEK_ID_LEN;
    if !ok_id(&w.kek.provider) || !ok_id(&w.kek.key_id) {
        return Err(EnvelopeError::Malformed("KEK id length out of range"));
    }
    if w.bytes.is_empty() || w.bytes.len() > MAX_WRAPPED_KEY_LEN {
        return Err(EnvelopeError::Malformed("wrapped key length out of range"));
    }
    Ok(())
}

/// A strict cursor over untrusted bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EnvelopeError> {
        if self.0.len() < n {
            return Err(EnvelopeError::Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], EnvelopeError> {
        let bytes = self.take(N, what)?;
        bytes.try_into().map_err(|_| EnvelopeError::Malformed(what))
    }

    fn header(&mut self, magic: &[u8; 3]) -> Result<Algorithm, EnvelopeError> {
        if self.take(3, "magic")? != magic {
            return Err(EnvelopeError::Malformed("magic"));
        }
        let [format] = self.array("format")?;
        if format != FORMAT_V1 {
            return Err(EnvelopeError::UnsupportedFormat(format));
        }
        let [alg] = self.array("algorithm")?;
        Algorithm::from_id(alg)
    }

    fn short_str(&mut self, what: &'static str) -> Result<String, EnvelopeError> {
        let [len] = self.array(what)?;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| EnvelopeError::Malformed(what))
    }

    fn rest_ciphertext(&mut self) -> Result<Vec<u8>, EnvelopeError> {
        let rest = std::mem::take(&mut self.0);
        if rest.len() < TAG_LEN {
            return Err(EnvelopeError::Malformed("ciphertext shorter than its tag"));
        }
        if rest.len() > MAX_PLAINTEXT_LEN + TAG_LEN {
            return Err(EnvelopeError::Malformed("ciphertext too long"));
        }
        Ok(rest.to_vec())
    }
}
