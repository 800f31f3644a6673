//! The PKCS#11 provider (cargo feature `pkcs11`): KEKs are AES-256 keys inside a PKCS#11
//! token (an HSM, or SoftHSM2 in the tests) and never leave it; data keys are wrapped and
//! unwrapped by the token with `CKM_AES_GCM`.
//!
//! The FFI lives in the [`cryptoki`] crate; this module has no `unsafe`.
//!
//! # What is bound
//!
//! A wrapped key is `iv(12) ‖ ciphertext(32) ‖ tag(16)`: AES-256-GCM computed by the token,
//! with a fresh random 96-bit IV (from the operating system's RNG) and a 128-bit tag, and the
//! caller's associated data as GCM AAD. The token authenticates the AAD, so a wrapped key
//! only unwraps with the same associated data, and only under the same key version.
//! (`CKM_AES_KEY_WRAP_PAD` has no associated data, so it is not used.) Random IVs keep the
//! collision risk negligible below 2^32 wraps per key version; rotate well before that.
//!
//! # KEK versions and rotation
//!
//! [`KekRef`] is `{ provider: "pkcs11", key_id: KEY_LABEL, version: N }`. The token label is
//! not part of it, so the keys may move to another token (an HSM replacement restoring a
//! backup) under another token label; a key label must therefore be unique across the tokens
//! a deployment uses.
//!
//! The token holds one key object per version, labelled `KEY_LABEL.v1`, `KEY_LABEL.v2`, …
//! The highest version is active; older ones unwrap only. [`Pkcs11Provider::generate`]
//! creates `KEY_LABEL.v1`, [`Pkcs11Provider::rotate`] creates `KEY_LABEL.v{n+1}`; both create
//! a token object that is AES-256, `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`, private,
//! unmodifiable, and usable only to encrypt and decrypt. Other nodes pick a new version up at
//! their next wrap that names it, at [`Pkcs11Provider::refresh`] or at `health()`. A version
//! destroyed on the token (retired) unwraps as [`ProviderErrorKind::KekRetired`].
//!
//! # What the operator sets up
//!
//! * The module (e.g. `/usr/lib/softhsm/libsofthsm2.so`), an initialised token with a user
//!   PIN, and the PIN in a file (mode `o-rwx`) or an environment variable.
//! * The token is found by its **label** (slot numbers change between boots and devices).
//! * The token must offer `CKM_AES_GCM` and `CKM_AES_KEY_GEN`.
//! * A first key: [`Pkcs11Provider::generate`] (`strongroom keys generate`). Keys made
//!   elsewhere are accepted only if they are AES-256, private, sensitive, non-extractable,
//!   have always been so (`CKA_ALWAYS_SENSITIVE`, `CKA_NEVER_EXTRACTABLE`: made inside a
//!   token, or cloned between tokens by the vendor's means, never imported as a value), and
//!   may encrypt and decrypt. Public objects are not looked at (a session without the PIN
//!   can make them); a private key failing this stops the provider (`Misconfigured`) rather
//!   than being skipped: the newest version becomes the active KEK, and one planted by
//!   whoever can make objects on the token must not seal new data keys.
//!
//! # Failure modes
//!
//! [`Pkcs11Provider::connect`] loads the module, finds the token, logs in, finds the keys and
//! runs a wrap/unwrap self-test, so a missing module, an unknown token label, missing keys or
//! keys that could leave the token ([`ProviderErrorKind::Misconfigured`]) and a wrong or locked
//! PIN ([`ProviderErrorKind::Denied`]) stop start-up with one message. At run time a lost
//! session is reopened (and logged in) once before an error is returned; token and device
//! errors are [`ProviderErrorKind::Unavailable`]; a tag that does not verify is
//! [`ProviderErrorKind::AuthenticationFailed`]. Errors are classified by PKCS#11 return value
//! (SoftHSM2 reports a GCM tag mismatch as `CKR_GENERAL_ERROR`, which decryption therefore
//! also counts as an authentication failure).
//!
//! # Sessions and threads
//!
//! Token calls block, so they run on `tokio::task::spawn_blocking`, over a small pool of
//! read-only sessions (default 4, [`Pkcs11Config::sessions`]), each behind a mutex. PKCS#11
//! allows one `C_Initialize` per process and shares a token's login among all sessions of the
//! process, so modules are loaded and initialised once per process and kept loaded. Because a
//! token that is already logged in accepts any second `C_Login`, the provider remembers a
//! SHA-256 digest of the PIN that logged in, and refuses a second provider in the same
//! process whose PIN differs, rather than letting a wrong PIN pass until the next restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use strongroom_crypto::provider::MAX_KEK_ID_LEN;
use strongroom_crypto::{
    KekRef, Key256, KeyProvider, ProviderError, ProviderErrorKind, SecureRandom, UnwrapError,
    WrappedKey,
};
use zeroize::Zeroizing;

use crate::SecretSource;

/// The provider kind in [`KekRef::provider`].
pub const KIND: &str = "pkcs11";
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = IV_LEN + Key256::LEN + TAG_LEN;
/// Longest key label accepted (the version suffix must still fit in [`MAX_KEK_ID_LEN`]).
const MAX_KEY_LABEL_LEN: usize = 200;
const _: () = assert!(MAX_KEY_LABEL_LEN <= MAX_KEK_ID_LEN);

/// Configuration of the PKCS#11 provider.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (shared library).
    pub module: PathBuf,
    /// Label of the token (not the slot number, which changes).
    pub token_label: String,
    /// Where the user PIN comes from.
    pub pin: SecretSource,
    /// Label prefix of the KEKs: versions are `KEY_LABEL.v1`, `KEY_LABEL.v2`, …
    pub key_label: String,
    /// Sessions kept open for concurrent wraps (at least 1).
    pub sessions: usize,
}

impl Pkcs11Config {
    /// A configuration with 4 sessions.
    pub fn new(
        module: impl Into<PathBuf>,
        token_label: impl Into<String>,
        pin: SecretSource,
        key_label: impl Into<String>,
    ) -> Self {
        Self {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            key_label: key_label.into(),
            sessions: 4,
        }
    }
}

/// Public facts about one KEK version on the token, read from its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pkcs11KeyInfo {
    /// The object label, `KEY_LABEL.vN`.
    pub label: String,
    /// The version `N`.
    pub version: u32,
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`.
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`.
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`.
    pub never_extractable: bool,
}

/// KEKs in a PKCS#11 token. See the [module docs](self).
#[derive(Clone)]
pub struct Pkcs11Provider {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Pkcs11,
    module: PathBuf,
    objects: ObjectsLock,
    slot: Slot,
    token_label: String,
    key_label: String,
    pin: SecretString,
    pool: Vec<Mutex<Option<Session>>>,
    next: AtomicUsize,
    /// Version → key object, as last scanned.
    keys: RwLock<BTreeMap<u32, ObjectHandle>>,
    /// When a version newer than any known last made the token be scanned again.
    last_miss_rescan: Mutex<Option<std::time::Instant>>,
}

/// At most one scan of the token per this interval for versions newer than any known: a row
/// naming a version that never existed (written around Strongroom) must not make every
/// request search the token.
const MISS_RESCAN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl std::fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Provider")
            .field("module", &self.inner.module)
            .field("token_label", &self.inner.token_label)
            .field("key_label", &self.inner.key_label)
            .finish_non_exhaustive()
    }
}

fn error(kind: ProviderErrorKind, message: impl Into<String>) -> ProviderError {
    ProviderError::new(kind, KIND, message)
}

/// The kind of a PKCS#11 failure, by return value.
fn rv_kind(rv: RvError) -> ProviderErrorKind {
    use RvError::*;
    match rv {
        PinIncorrect
        | PinInvalid
        | PinLenRange
        | PinExpired
        | PinLocked
        | UserNotLoggedIn
        | UserPinNotInitialized
        | UserAnotherAlreadyLoggedIn
        | KeyFunctionNotPermitted
        | FunctionRejected
        | ActionProhibited => ProviderErrorKind::Denied,
        DeviceError
        | DeviceMemory
        | DeviceRemoved
        | TokenNotPresent
        | TokenNotRecognized
        | SessionClosed
        | SessionHandleInvalid
        | SessionCount
        | CryptokiNotInitialized
        | HostMemory
        | CantLock
        | FunctionCanceled
        | SlotIdInvalid => ProviderErrorKind::Unavailable,
        EncryptedDataInvalid | EncryptedDataLenRange | DataInvalid | DataLenRange => {
            ProviderErrorKind::AuthenticationFailed
        }
        KeyHandleInvalid | ObjectHandleInvalid => ProviderErrorKind::KekRetired,
        MechanismInvalid
        | MechanismParamInvalid
        | KeyTypeInconsistent
        | KeySizeRange
        | TemplateIncomplete
        | TemplateInconsistent
        | AttributeValueInvalid
        | AttributeTypeInvalid
        | AttributeReadOnly
        | FunctionNotSupported
        | TokenWriteProtected
        | SessionReadOnly => ProviderErrorKind::Misconfigured,
        _ => ProviderErrorKind::Other,
    }
}

fn ck_kind(e: &CkError) -> ProviderErrorKind {
    match e {
        CkError::Pkcs11(rv, _) => rv_kind(*rv),
        CkError::LibraryLoading(_) | CkError::MissingSymbol(_) | CkError::NullFunctionPointer => {
            ProviderErrorKind::Misconfigured
        }
        _ => ProviderErrorKind::Other,
    }
}

/// The kind of a failed AES-GCM decryption. A tag that does not verify should be
/// `CKR_ENCRYPTED_DATA_INVALID`, but some tokens (SoftHSM2 2.6) answer `CKR_GENERAL_ERROR` or
/// `CKR_FUNCTION_FAILED`; with a valid session, key and mechanism, only the data can be at
/// fault, so those count as authentication failures here.
fn decrypt_kind(e: &CkError) -> ProviderErrorKind {
    match e {
        CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _) => {
            ProviderErrorKind::AuthenticationFailed
        }
        _ => ck_kind(e),
    }
}

/// Wraps a cryptoki error as a [`ProviderError`] of its kind.
fn ck_error(what: impl std::fmt::Display, e: CkError) -> ProviderError {
    error(ck_kind(&e), format!("{what}")).with_source(e)
}

/// Errors after which a session is reopened once.
fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionClosed
                | RvError::SessionHandleInvalid
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

// ---------------------------------------------------------------------------------------
// Process-wide module state. PKCS#11 itself is per process: one C_Initialize per module, and
// one login state per token shared by every session. This registry mirrors that; it holds
// no key material (a PIN digest only, see the module docs).

struct LoadedModule {
    path: PathBuf,
    ctx: Pkcs11,
    /// Slot → SHA-256 of the PIN that logged the token in, from this process.
    logins: Vec<(Slot, [u8; 32])>,
    /// Serialises object searches and key creation in this module (see [`ObjectsLock`]).
    objects: ObjectsLock,
}

/// Held while searching for or creating key objects. SoftHSM2's file object store races when
/// one thread indexes the token while another creates an object (duplicate or invalid
/// handles, `CKR_GENERAL_ERROR` from `C_GenerateKey`); both are rare operations, so they are
/// serialised per module. Encryption and decryption do not take it.
type ObjectsLock = Arc<Mutex<()>>;

static MODULES: Mutex<Vec<LoadedModule>> = Mutex::new(Vec::new());

/// Loads and initialises the module once per process; returns its canonical path, context and
/// object lock.
fn load_module(path: &Path) -> Result<(PathBuf, Pkcs11, ObjectsLock), ProviderError> {
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        error(
            ProviderErrorKind::Misconfigured,
            format!("cannot find the PKCS#11 module {}", path.display()),
        )
        .with_source(e)
    })?;
    let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = modules.iter().find(|m| m.path == canonical) {
        return Ok((canonical, m.ctx.clone(), m.objects.clone()));
    }
    let ctx = Pkcs11::new(&canonical).map_err(|e| {
        ck_error(
            format_args!("cannot load the PKCS#11 module {}", path.display()),
            e,
        )
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Already initialised by other code in this process: share it.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(ck_error(
                format_args!("cannot initialise the PKCS#11 module {}", path.display()),
                e,
            ))
        }
    }
    let objects = ObjectsLock::default();
    modules.push(LoadedModule {
        path: canonical.clone(),
        ctx: ctx.clone(),
        logins: Vec::new(),
        objects: objects.clone(),
    });
    Ok((canonical, ctx, objects))
}

fn pin_digest(pin: &SecretString) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"strongroom pkcs11 pin\x00")
        .chain_update(pin.expose_secret().as_bytes())
        .finalize()
        .into()
}

/// Logs the token of `session` in, or checks the PIN against the one that already did.
fn login(
    module: &Path,
    slot: Slot,
    session: &Session,
    pin: &SecretString,
    token_label: &str,
) -> Result<(), ProviderError> {
    let digest = pin_digest(pin);
    let auth_pin = AuthPin::from(pin.expose_secret().to_owned());
    // Held across C_Login, so that no other login of this process can observe the token
    // logged in before its digest is recorded.
    let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    let result = session.login(UserType::User, Some(&auth_pin));
    drop(auth_pin);
    let loaded = modules.iter_mut().find(|m| m.path == module);
    match result {
        Ok(()) => {
            if let Some(m) = loaded {
                m.logins.retain(|(s, _)| *s != slot);
                m.logins.push((slot, digest));
            }
            Ok(())
        }
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
            let known = loaded.and_then(|m| m.logins.iter().find(|(s, _)| *s == slot));
            match known {
                Some((_, d)) if !bool::from(subtle::ConstantTimeEq::ct_eq(&d[..], &digest[..])) => {
                    Err(error(
                        ProviderErrorKind::Denied,
                        format!(
                            "wrong PIN for token '{token_label}' (this process is already \
                             logged in to it with another PIN)"
                        ),
                    ))
                }
                _ => Ok(()),
            }
        }
        Err(
            e @ CkError::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            ),
        ) => Err(error(
            ProviderErrorKind::Denied,
            format!("wrong PIN for token '{token_label}'"),
        )
        .with_source(e)),
        Err(e @ CkError::Pkcs11(RvError::PinLocked, _)) => Err(error(
            ProviderErrorKind::Denied,
            format!(
                "the user PIN of token '{token_label}' is locked; the security officer must \
                 reset it"
            ),
        )
        .with_source(e)),
        Err(e) => Err(ck_error(
            format_args!("cannot log in to token '{token_label}'"),
            e,
        )),
    }
}

/// The slot holding the token labelled `label`.
fn find_slot(ctx: &Pkcs11, label: &str, module: &Path) -> Result<Slot, ProviderError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| ck_error("cannot list the module's slots", e))?;
    let mut found = Vec::new();
    let mut labels = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| ck_error("cannot read token information", e))?;
        if info.label() == label {
            found.push((slot, info));
        } else {
            labels.push(format!("'{}'", info.label()));
        }
    }
    let (slot, info) = match found.len() {
        1 => found.remove(0),
        0 => {
            let present = if labels.is_empty() {
                "none".to_owned()
            } else {
                labels.join(", ")
            };
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "no token labelled '{label}' in module {} (tokens present: {present})",
                    module.display()
                ),
            ));
        }
        n => {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!("{n} tokens are labelled '{label}'; token labels must be unique"),
            ))
        }
    };
    if !info.token_initialized() || !info.user_pin_initialized() {
        return Err(error(
            ProviderErrorKind::Misconfigured,
            format!("token '{label}' is not initialised or has no user PIN"),
        ));
    }
    if info.user_pin_locked() {
        return Err(error(
            ProviderErrorKind::Denied,
            format!(
                "the user PIN of token '{label}' is locked; the security officer must reset it"
            ),
        ));
    }
    let mechanisms = ctx
        .get_mechanism_list(slot)
        .map_err(|e| ck_error("cannot list the token's mechanisms", e))?;
    for needed in [MechanismType::AES_GCM, MechanismType::AES_KEY_GEN] {
        if !mechanisms.contains(&needed) {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!("token '{label}' does not offer {needed}"),
            ));
        }
    }
    Ok(slot)
}

/// One KEK version found on the token.
struct FoundKey {
    handle: ObjectHandle,
    info: Pkcs11KeyInfo,
    encrypt: bool,
    decrypt: bool,
    private: bool,
    value_len: Option<u64>,
}

/// `prefix.vN` → `N` (decimal, no leading zero, at least 1).
fn parse_version(label: &str, prefix: &str) -> Option<u32> {
    let digits = label.strip_prefix(prefix)?.strip_prefix(".v")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Every private AES secret key on the token whose label is `key_label.vN`. Public objects
/// are not looked at: a session without the PIN can make them (on tokens that allow it), so
/// one labelled as the next version must neither become the active KEK nor stop the
/// provider.
fn find_keys(session: &Session, key_label: &str) -> Result<Vec<FoundKey>, CkError> {
    let handles = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Private(true),
    ])?;
    let mut found = Vec::new();
    for handle in handles {
        // An object destroyed, or still being created by another session, since the search.
        let vanished = |e: &CkError| matches!(e, CkError::Pkcs11(RvError::ObjectHandleInvalid, _));
        let attrs = match session.get_attributes(handle, &[AttributeType::Label]) {
            Err(e) if vanished(&e) => continue,
            other => other?,
        };
        let label = attrs.into_iter().find_map(|a| match a {
            Attribute::Label(l) => String::from_utf8(l).ok(),
            _ => None,
        });
        let Some((label, version)) =
            label.and_then(|l| parse_version(&l, key_label).map(|v| (l, v)))
        else {
            continue;
        };
        let mut key = FoundKey {
            handle,
            info: Pkcs11KeyInfo {
                label,
                version,
                sensitive: false,
                extractable: true,
                always_sensitive: false,
                never_extractable: false,
            },
            encrypt: false,
            decrypt: false,
            private: false,
            value_len: None,
        };
        let attrs = match session.get_attributes(
            handle,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Private,
                AttributeType::ValueLen,
            ],
        ) {
            Err(e) if vanished(&e) => continue,
            other => other?,
        };
        for a in attrs {
            match a {
                Attribute::Sensitive(b) => key.info.sensitive = b,
                Attribute::Extractable(b) => key.info.extractable = b,
                Attribute::AlwaysSensitive(b) => key.info.always_sensitive = b,
                Attribute::NeverExtractable(b) => key.info.never_extractable = b,
                Attribute::Encrypt(b) => key.encrypt = b,
                Attribute::Decrypt(b) => key.decrypt = b,
                Attribute::Private(b) => key.private = b,
                Attribute::ValueLen(n) => key.value_len = Some(u64::from(n)),
                _ => {}
            }
        }
        found.push(key);
    }
    found.sort_by_key(|k| k.info.version);
    Ok(found)
}

/// Checks the keys found and maps version → handle. The newest version becomes the active
/// KEK, so a key that anyone but the token could know is refused, not skipped: one made
/// in a session without the PIN (a public object) or made outside the token and imported
/// (`C_CreateObject`, `C_UnwrapKey`: never `CKA_ALWAYS_SENSITIVE` and
/// `CKA_NEVER_EXTRACTABLE`) would otherwise seal every new data key under a known value.
fn key_table(
    found: &[FoundKey],
    token_label: &str,
) -> Result<BTreeMap<u32, ObjectHandle>, ProviderError> {
    let mut table = BTreeMap::new();
    for k in found {
        let label = &k.info.label;
        let problem = if !k.info.sensitive || k.info.extractable {
            Some("can leave the token (it must be CKA_SENSITIVE and not CKA_EXTRACTABLE)")
        } else if !k.private {
            Some(
                "is a public object (CKA_PRIVATE false), which a session without the PIN can \
                 make: remove it; `strongroom keys rotate` makes new versions",
            )
        } else if !k.info.always_sensitive || !k.info.never_extractable {
            Some(
                "was not made inside the token, or could once leave it (CKA_ALWAYS_SENSITIVE \
                 and CKA_NEVER_EXTRACTABLE must be true), so its value may be known: remove \
                 it; `strongroom keys rotate` makes new versions",
            )
        } else if !k.encrypt || !k.decrypt {
            Some("may not encrypt and decrypt")
        } else if k.value_len != Some(32) {
            Some("is not an AES-256 key")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!("key '{label}' on token '{token_label}' {problem}"),
            ));
        }
        if table.insert(k.info.version, k.handle).is_some() {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!("token '{token_label}' holds two keys labelled '{label}'"),
            ));
        }
    }
    Ok(table)
}

impl Inner {
    /// Whether a miss may scan the token now ([`MISS_RESCAN_INTERVAL`]); notes it if so.
    fn may_rescan_for_a_miss(&self) -> bool {
        let mut last = self
            .last_miss_rescan
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < MISS_RESCAN_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }

    fn label_of(&self, version: u32) -> String {
        format!("{}.v{version}", self.key_label)
    }

    fn kek(&self, version: u32) -> KekRef {
        KekRef {
            provider: KIND.to_owned(),
            key_id: self.key_label.clone(),
            version,
        }
    }

    fn active_version(&self) -> Option<u32> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .next_back()
            .copied()
    }

    fn handle(&self, version: u32) -> Option<ObjectHandle> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&version)
            .copied()
    }

    fn new_session(&self) -> Result<Session, ProviderError> {
        let session = self.ctx.open_ro_session(self.slot).map_err(|e| {
            ck_error(
                format_args!("cannot open a session on token '{}'", self.token_label),
                e,
            )
        })?;
        login(
            &self.module,
            self.slot,
            &session,
            &self.pin,
            &self.token_label,
        )?;
        Ok(session)
    }

    /// Runs `f` on a pooled session; a lost session is reopened (and logged in) once.
    fn with_session<T>(
        &self,
        what: &str,
        kind_of: fn(&CkError) -> ProviderErrorKind,
        f: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, ProviderError> {
        let idx = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        let mut slot = self.pool[idx].lock().unwrap_or_else(|e| e.into_inner());
        let session = match slot.take() {
            Some(s) => s,
            None => self.new_session()?,
        };
        let result = match f(&session) {
            Err(e) if session_lost(&e) => {
                drop(session);
                let fresh = self.new_session()?;
                let again = f(&fresh);
                *slot = Some(fresh);
                again
            }
            other => {
                *slot = Some(session);
                other
            }
        };
        result.map_err(|e| error(kind_of(&e), what).with_source(e))
    }

    /// Re-reads the key versions from the token.
    fn rescan(&self) -> Result<Vec<FoundKey>, ProviderError> {
        let _objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let found = self.with_session("cannot list the keys on the token", ck_kind, |s| {
            find_keys(s, &self.key_label)
        })?;
        let table = key_table(&found, &self.token_label)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = table;
        Ok(found)
    }

    /// Creates `key_label.v{version}` on the token.
    fn create_version(&self, version: u32) -> Result<(), ProviderError> {
        let _objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let label = self.label_of(version);
        let session = self.ctx.open_rw_session(self.slot).map_err(|e| {
            ck_error(
                format_args!(
                    "cannot open a read-write session on token '{}'",
                    self.token_label
                ),
                e,
            )
        })?;
        login(
            &self.module,
            self.slot,
            &session,
            &self.pin,
            &self.token_label,
        )?;
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(Ulong::from(32)),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Modifiable(false),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::Id(label.clone().into_bytes()),
        ];
        let handle = session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| ck_error(format_args!("cannot generate key '{label}'"), e))?;
        let found = find_keys(&session, &self.key_label)
            .map_err(|e| ck_error("cannot list the keys on the token", e))?;
        if found.iter().filter(|k| k.info.version == version).count() > 1 {
            // Another node rotated at the same moment: keep its key, drop ours.
            let _ = session.destroy_object(handle);
            return Err(error(
                ProviderErrorKind::Other,
                format!("another rotation created '{label}' at the same time; retry"),
            ));
        }
        let table = key_table(&found, &self.token_label)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = table;
        Ok(())
    }

    fn encrypt(
        &self,
        handle: ObjectHandle,
        key: &Key256,
        aad: &[u8],
        version: u32,
    ) -> Result<Vec<u8>, ProviderError> {
        let mut iv = [0u8; IV_LEN];
        strongroom_crypto::OsRandom
            .fill(&mut iv)
            .map_err(|e| error(ProviderErrorKind::Other, "random source failed").with_source(e))?;
        let what = format!("wrap with '{}' failed", self.label_of(version));
        // A token may write an IV of its own into the buffer (FIPS-mode HSMs generate it
        // inside): what is stored is what the buffer holds after the call.
        let (iv, ct) = self.with_session(&what, ck_kind, |s| {
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, aad, Ulong::from(TAG_LEN as u64 * 8))?;
            let ct = s.encrypt(&Mechanism::AesGcm(params), handle, key.expose_secret())?;
            Ok((iv, ct))
        })?;
        if ct.len() != Key256::LEN + TAG_LEN {
            return Err(error(
                ProviderErrorKind::Other,
                format!("the token returned {} bytes for AES-GCM", ct.len()),
            ));
        }
        let mut bytes = Vec::with_capacity(WRAPPED_LEN);
        bytes.extend_from_slice(&iv);
        bytes.extend_from_slice(&ct);
        Ok(bytes)
    }

    fn decrypt(
        &self,
        handle: ObjectHandle,
        wrapped: &[u8],
        aad: &[u8],
        version: u32,
    ) -> Result<Key256, ProviderError> {
        let auth = || {
            error(
                ProviderErrorKind::AuthenticationFailed,
                "wrapped key does not authenticate",
            )
        };
        if wrapped.len() != WRAPPED_LEN {
            return Err(auth());
        }
        let (iv, ct) = wrapped.split_at(IV_LEN);
        let mut iv_bytes = [0u8; IV_LEN];
        iv_bytes.copy_from_slice(iv);
        let what = format!("unwrap with '{}' failed", self.label_of(version));
        let plain = Zeroizing::new(self.with_session(&what, decrypt_kind, |s| {
            let mut iv = iv_bytes;
            let params = GcmParams::new(&mut iv, aad, Ulong::from(TAG_LEN as u64 * 8))?;
            s.decrypt(&Mechanism::AesGcm(params), handle, ct)
        })?);
        Key256::from_slice(&plain).ok_or_else(auth)
    }
}

/// Runs blocking token work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(ProviderErrorKind::Other, "PKCS#11 worker task failed").with_source(e))?
}

impl Pkcs11Provider {
    /// Loads the module, finds the token by label, logs in, finds the keys `KEY_LABEL.vN`
    /// and runs a wrap/unwrap self-test.
    ///
    /// # Errors
    ///
    /// One [`ProviderError`] naming what failed: [`ProviderErrorKind::Misconfigured`] for a
    /// module that does not load, an unknown token label, a token without AES-GCM, no key, or
    /// keys that may leave the token; [`ProviderErrorKind::Denied`] for a wrong or locked PIN.
    pub async fn connect(config: Pkcs11Config) -> Result<Self, ProviderError> {
        let provider = Self::open(config).await?;
        if provider.inner.active_version().is_none() {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "no key '{}.v1' (or later version) on token '{}'; create one with \
                     `strongroom keys generate`",
                    provider.inner.key_label, provider.inner.token_label
                ),
            ));
        }
        strongroom_crypto::provider::self_test(&provider).await?;
        Ok(provider)
    }

    /// Creates the first KEK, `KEY_LABEL.v1`, on the token and returns the provider.
    ///
    /// # Errors
    ///
    /// As [`Pkcs11Provider::connect`]; [`ProviderErrorKind::Misconfigured`] when the token
    /// already holds a version of the key.
    pub async fn generate(config: Pkcs11Config) -> Result<Self, ProviderError> {
        let provider = Self::open(config).await?;
        if let Some(v) = provider.inner.active_version() {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "token '{}' already holds '{}'; rotate instead",
                    provider.inner.token_label,
                    provider.inner.label_of(v)
                ),
            ));
        }
        let inner = provider.inner.clone();
        blocking(move || inner.create_version(1)).await?;
        strongroom_crypto::provider::self_test(&provider).await?;
        Ok(provider)
    }

    async fn open(config: Pkcs11Config) -> Result<Self, ProviderError> {
        if config.key_label.is_empty() || config.key_label.len() > MAX_KEY_LABEL_LEN {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!("key_label must be 1 to {MAX_KEY_LABEL_LEN} bytes"),
            ));
        }
        if config.token_label.is_empty() || config.token_label.len() > 32 {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                "token_label must be 1 to 32 bytes",
            ));
        }
        if !(1..=64).contains(&config.sessions) {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                "sessions must be 1 to 64",
            ));
        }
        let pin = config.pin.read(KIND, "PIN")?;
        let inner = blocking(move || {
            let (module, ctx, objects) = load_module(&config.module)?;
            let slot = find_slot(&ctx, &config.token_label, &config.module)?;
            let mut pool = Vec::with_capacity(config.sessions);
            for i in 0..config.sessions {
                let session = ctx.open_ro_session(slot).map_err(|e| {
                    ck_error(
                        format_args!("cannot open a session on token '{}'", config.token_label),
                        e,
                    )
                })?;
                if i == 0 {
                    login(&module, slot, &session, &pin, &config.token_label)?;
                }
                pool.push(Mutex::new(Some(session)));
            }
            let inner = Inner {
                ctx,
                module,
                objects,
                slot,
                token_label: config.token_label,
                key_label: config.key_label,
                pin,
                pool,
                next: AtomicUsize::new(0),
                keys: RwLock::new(BTreeMap::new()),
                last_miss_rescan: Mutex::new(None),
            };
            inner.rescan()?;
            Ok(inner)
        })
        .await?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The key label prefix (the [`KekRef::key_id`]).
    pub fn key_label(&self) -> &str {
        &self.inner.key_label
    }

    /// Creates the next version `KEY_LABEL.v{n+1}` on the token; it becomes the active KEK
    /// at once. Returns it.
    ///
    /// # Errors
    ///
    /// Token errors, or [`ProviderErrorKind::Other`] when another node rotated at the same
    /// moment (retry).
    pub async fn rotate(&self) -> Result<KekRef, ProviderError> {
        let inner = self.inner.clone();
        let version = blocking(move || {
            inner.rescan()?;
            let next = inner
                .active_version()
                .unwrap_or(0)
                .checked_add(1)
                .ok_or_else(|| error(ProviderErrorKind::Other, "no more key versions"))?;
            inner.create_version(next)?;
            Ok(next)
        })
        .await?;
        Ok(self.inner.kek(version))
    }

    /// Re-reads the key versions from the token (to see another node's rotation) and returns
    /// the active KEK.
    ///
    /// # Errors
    ///
    /// Token errors, or keys that fail the checks of [`Pkcs11Provider::connect`].
    pub async fn refresh(&self) -> Result<KekRef, ProviderError> {
        let inner = self.inner.clone();
        blocking(move || inner.rescan().map(|_| ())).await?;
        self.active_kek()
    }

    /// Every version of the key on the token, oldest first, with its protection attributes
    /// as the token reports them.
    ///
    /// # Errors
    ///
    /// Token errors.
    pub async fn key_info(&self) -> Result<Vec<Pkcs11KeyInfo>, ProviderError> {
        let inner = self.inner.clone();
        let found = blocking(move || inner.rescan()).await?;
        Ok(found.into_iter().map(|k| k.info).collect())
    }

    /// The object handle of `kek`, rescanning once when it names a version newer than known.
    async fn handle_of(&self, kek: &KekRef) -> Result<ObjectHandle, ProviderError> {
        if let Some(h) = self.inner.handle(kek.version) {
            return Ok(h);
        }
        let newest = self.inner.active_version().unwrap_or(0);
        if kek.version > newest && self.inner.may_rescan_for_a_miss() {
            let inner = self.inner.clone();
            blocking(move || inner.rescan().map(|_| ())).await?;
            if let Some(h) = self.inner.handle(kek.version) {
                return Ok(h);
            }
        }
        let label = self.inner.label_of(kek.version);
        if kek.version >= 1 && kek.version < self.inner.active_version().unwrap_or(0) {
            Err(error(
                ProviderErrorKind::KekRetired,
                format!("'{label}' is no longer on the token (retired)"),
            ))
        } else {
            Err(error(
                ProviderErrorKind::UnknownKek,
                format!("no key '{label}' on token '{}'", self.inner.token_label),
            ))
        }
    }
}

#[async_trait]
impl KeyProvider for Pkcs11Provider {
    fn kind(&self) -> &str {
        KIND
    }

    fn active_kek(&self) -> Result<KekRef, ProviderError> {
        self.inner
            .active_version()
            .map(|v| self.inner.kek(v))
            .ok_or_else(|| {
                error(
                    ProviderErrorKind::Misconfigured,
                    format!("no version of key '{}' on the token", self.inner.key_label),
                )
            })
    }

    async fn wrap(
        &self,
        kek: &KekRef,
        key: &Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, ProviderError> {
        if kek.provider != KIND || kek.key_id != self.inner.key_label {
            return Err(error(
                ProviderErrorKind::UnknownKek,
                format!("KEK {kek} is not held by this token"),
            ));
        }
        let handle = self.handle_of(kek).await?;
        let active = self.active_kek()?;
        if kek.version != active.version {
            return Err(error(
                ProviderErrorKind::KekNotActive,
                format!("{kek} is not the active KEK ({active} is)"),
            ));
        }
        let inner = self.inner.clone();
        let key = Key256::from_slice(key.expose_secret())
            .ok_or_else(|| error(ProviderErrorKind::Other, "data key has the wrong length"))?;
        let aad = aad.to_vec();
        let version = kek.version;
        let bytes = blocking(move || inner.encrypt(handle, &key, &aad, version)).await?;
        Ok(WrappedKey {
            kek: kek.clone(),
            bytes,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Key256, UnwrapError> {
        let kek = &wrapped.kek;
        if kek.provider != KIND || kek.key_id != self.inner.key_label {
            return Err(UnwrapError::NotMine(kek.clone()));
        }
        let handle = self.handle_of(kek).await?;
        if wrapped.bytes.len() != WRAPPED_LEN {
            return Err(error(
                ProviderErrorKind::AuthenticationFailed,
                "wrapped key does not authenticate",
            )
            .into());
        }
        let inner = self.inner.clone();
        let bytes = wrapped.bytes.clone();
        let aad = aad.to_vec();
        let version = kek.version;
        let result = blocking(move || inner.decrypt(handle, &bytes, &aad, version)).await;
        match result {
            Err(e) if e.kind() == ProviderErrorKind::KekRetired => {
                // The object vanished from the token: forget it.
                let _ = self.refresh().await;
                Err(e.into())
            }
            other => other.map_err(UnwrapError::from),
        }
    }

    async fn health(&self) -> Result<(), ProviderError> {
        self.refresh().await.map(|_| ())
    }

    /// The token holds the versions: a rotation by another process shows only on a rescan
    /// (strict mode seals under the active version without ever asking the token which
    /// one that is).
    async fn reload_keks(&self) -> Result<bool, ProviderError> {
        let before = self.inner.active_version();
        self.refresh().await?;
        Ok(self.inner.active_version() != before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_strictly() {
        assert_eq!(parse_version("kek.v1", "kek"), Some(1));
        assert_eq!(parse_version("kek.v12", "kek"), Some(12));
        for bad in [
            "kek.v0", "kek.v01", "kek.v", "kek.v1x", "kek.1", "kekx.v1", "kek.v-1",
        ] {
            assert_eq!(parse_version(bad, "kek"), None, "{bad}");
        }
        assert_eq!(parse_version("kek.v1.v2", "kek.v1"), Some(2));
        assert_eq!(parse_version("kek.v99999999999", "kek"), None);
    }

    #[test]
    fn return_values_are_classified() {
        assert_eq!(rv_kind(RvError::PinIncorrect), ProviderErrorKind::Denied);
        assert_eq!(
            rv_kind(RvError::EncryptedDataInvalid),
            ProviderErrorKind::AuthenticationFailed
        );
        assert_eq!(
            rv_kind(RvError::DeviceRemoved),
            ProviderErrorKind::Unavailable
        );
        assert_eq!(
            rv_kind(RvError::KeyHandleInvalid),
            ProviderErrorKind::KekRetired
        );
        assert_eq!(
            rv_kind(RvError::MechanismInvalid),
            ProviderErrorKind::Misconfigured
        );
    }
}
