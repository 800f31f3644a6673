//! The local keyring provider: versioned KEKs in one JSON file.
//!
//! ```text
//! { "format": "strongroom-keyring/1", "key_id": "kr-…", "created_at": "…",
//!   "keys": [ { "version": 1, "state": "decrypt-only", "created_at": "…",
//!               "state_changed_at": "…", "material": "<base64 of 32 bytes>" }, … ] }
//! ```
//!
//! * Exactly one version is `active` (wraps new data keys); `decrypt-only` versions still
//!   unwrap; `retired` versions have had their material erased from the file.
//! * The file is written with mode 0600 and atomically: a temporary file in the same folder,
//!   `fsync`, `rename`, `fsync` of the folder. Concurrent writers (two operators, or an operator
//!   and a server) serialise on an advisory lock on `<file>.lock`.
//! * Loading refuses a file that group or others may read or write, with a message saying
//!   how to fix it.
//! * A data key is wrapped under the KEK by [`strongroom_crypto::keywrap`] (AES-256-GCM,
//!   `nonce(12) ‖ ciphertext(32) ‖ tag(16)`, with the caller's associated data).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use strongroom_crypto::keywrap::KeyWrapper;
use strongroom_crypto::{
    KekRef, Key256, KeyProvider, ProviderError, ProviderErrorKind, SecureRandom, UnwrapError,
    WrappedKey,
};
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// The provider kind in [`KekRef::provider`].
pub const KIND: &str = "local";
const FORMAT: &str = "strongroom-keyring/1";
/// Largest keyring file read (a keyring of thousands of versions is still far below this).
const MAX_FILE_LEN: u64 = 16 << 20;

/// The life-cycle state of one KEK version.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// Wraps new data keys (exactly one version) and unwraps old ones.
    Active,
    /// Unwraps only.
    DecryptOnly,
    /// Erased: neither wraps nor unwraps.
    Retired,
}

impl KeyState {
    /// The name used in the file and in `keys list`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Retired => "retired",
        }
    }
}

/// Public facts about one KEK version: never its material.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct KeyInfo {
    /// The keyring's key id.
    pub key_id: String,
    /// Version number, from 1.
    pub version: u32,
    /// Life-cycle state.
    pub state: KeyState,
    /// When the version was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When its state last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub state_changed_at: OffsetDateTime,
}

/// Errors of the local keyring. Never carry key material or file contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// Reading, writing or locking the file failed.
    #[error("keyring {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is open to group or others.
    #[error("keyring {path} has mode {mode:04o}, so group or others can reach the keys; run `chmod 600 {path}` (and check who may have read it)")]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a valid keyring.
    #[error("keyring {path} is not a valid keyring: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the file's contents).
        detail: String,
    },
    /// `generate` found a keyring already there.
    #[error("keyring {0} already exists; use `keys rotate` to add a version")]
    AlreadyExists(PathBuf),
    /// No keyring file at the path.
    #[error("no keyring at {0}; create one with `strongroom keys generate`, given the same --config or --data-dir")]
    NotFound(PathBuf),
    /// The version is not in the keyring.
    #[error("key version {0} is not in the keyring")]
    UnknownVersion(u32),
    /// The requested state change is not allowed.
    #[error("{0}")]
    InvalidTransition(String),
    /// The random source failed.
    #[error(transparent)]
    Random(#[from] strongroom_crypto::RandomError),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    format: String,
    key_id: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    keys: Vec<FileKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    version: u32,
    state: KeyState,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    state_changed_at: OffsetDateTime,
    /// Base64 of the 32 key bytes; absent once retired.
    material: Option<Zeroizing<String>>,
}

/// One KEK version held in memory.
struct Kek {
    info: KeyInfo,
    /// `None` once retired.
    wrapper: Option<KeyWrapper>,
    /// A digest of the material (`None` once retired): a reload must not change the
    /// material of a version already loaded.
    fingerprint: Option<[u8; 32]>,
}

/// A one-way digest of a version's material, to tell whether a re-read file changed it.
fn fingerprint(material: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::new()
        .chain_update(b"strongroom keyring version fingerprint\x00")
        .chain_update(material)
        .finalize()
        .into()
}

/// The loaded keyring: a [`KeyProvider`].
pub struct LocalKeyring {
    path: PathBuf,
    key_id: String,
    keks: RwLock<BTreeMap<u32, Kek>>,
    /// When a version this keyring did not know last made it read the file again.
    last_miss_reload: std::sync::Mutex<Option<std::time::Instant>>,
    /// Why the file no longer holds the keys loaded (set by a refused [`LocalKeyring::reload`],
    /// cleared by one that loads): while set, no new write is sealed (see `active_kek`).
    diverged: std::sync::Mutex<Option<String>>,
    /// The newest version a rotation is known to have made, and its fingerprint when known
    /// ([`LocalKeyring::require_version`]): while the file lacks it, or holds other material
    /// under its number, no new write is sealed.
    required: std::sync::Mutex<Option<Required>>,
}

/// What the store's record of rotations requires of the file.
#[derive(Clone, Copy, Debug)]
enum Required {
    /// This version, with material of this fingerprint when known.
    Version(u32, Option<[u8; 32]>),
    /// Nothing can be told: the record does not read. Holds what it required before, as the
    /// floor for a record that reads again.
    Unknown(Option<(u32, Option<[u8; 32]>)>),
}

impl Required {
    /// The version (and fingerprint) last required, whether the record reads now or not.
    fn floor(required: Option<Self>) -> Option<(u32, Option<[u8; 32]>)> {
        match required? {
            Self::Version(v, f) => Some((v, f)),
            Self::Unknown(before) => before,
        }
    }
}

/// How a keyring file falls behind the rotations recorded in the store (see
/// [`LocalKeyring::require_version`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftBehind {
    /// The file lacks this version: a copy left behind, or an older one restored.
    Lacks(u32),
    /// The file holds other material under this version than the rotation recorded: two
    /// copies of the file were rotated at once.
    OtherMaterial(u32),
    /// The store's record of rotations does not read, so whether the file is the newest
    /// cannot be told ([`LocalKeyring::record_unreadable`]).
    RecordUnreadable,
}

impl std::fmt::Display for LeftBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Lacks(v) => write!(
                f,
                "lacks version {v}, which a rotation made (a copy left behind on this host, or \
                 an older one restored)"
            ),
            Self::OtherMaterial(v) => write!(
                f,
                "holds another version {v} than the one a rotation recorded (two copies of the \
                 file rotated at once)"
            ),
            Self::RecordUnreadable => write!(
                f,
                "cannot be checked against the store's record of rotations, which does not \
                 read (changed outside Strongroom, or written by a newer version; `strongroom \
                 keys record --set-from-this-file` with the newest keyring file sets it)"
            ),
        }
    }
}

/// At most one re-read of the keyring file per this interval for versions it does not know,
/// so requests naming a version that never existed cannot make every request read the file.
const MISS_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl std::fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyring")
            .field("path", &self.path)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyringError + '_ {
    move |source| KeyringError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, detail: impl Into<String>) -> KeyringError {
    KeyringError::Invalid {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

impl LocalKeyring {
    /// Loads the keyring at `path`.
    ///
    /// # Errors
    ///
    /// [`KeyringError::NotFound`], [`KeyringError::InsecurePermissions`],
    /// [`KeyringError::Invalid`] or [`KeyringError::Io`].
    pub fn open(path: &Path) -> Result<Self, KeyringError> {
        let model = read_file(path)?;
        let keks = build_keks(path, &model)?;
        Ok(Self {
            path: path.to_owned(),
            key_id: model.key_id,
            keks: RwLock::new(keks),
            last_miss_reload: std::sync::Mutex::new(None),
            diverged: std::sync::Mutex::new(None),
            required: std::sync::Mutex::new(None),
        })
    }

    /// Notes that a rotation made `version`, with material of this `fingerprint` when known
    /// (the store records each one): until the file holds that version with that material,
    /// this keyring is a copy left behind (another host's, a restored older one) and seals
    /// nothing new. Its active version is already decrypt-only elsewhere, soon retired, and
    /// what it sealed would then be lost. Versions only grow: a lower one is ignored.
    /// A record read again after [`Self::record_unreadable`] holds from then on.
    pub fn require_version(&self, version: u32, fingerprint: Option<[u8; 32]>) {
        let mut required = self.required.lock().unwrap_or_else(|e| e.into_inner());
        // Versions only grow, across a spell of a record that did not read too.
        *required = Some(match Required::floor(*required) {
            Some((v, f)) if v > version => Required::Version(v, f),
            Some((v, Some(f))) if v == version && fingerprint.is_none() => {
                Required::Version(v, Some(f))
            }
            _ => Required::Version(version, fingerprint),
        });
    }

    /// Notes that the store's record of rotations does not read: whether this file is the
    /// newest cannot be told, so it seals nothing new (fail closed) until a record reads
    /// again ([`Self::require_version`]).
    pub fn record_unreadable(&self) {
        let mut required = self.required.lock().unwrap_or_else(|e| e.into_inner());
        *required = Some(Required::Unknown(Required::floor(*required)));
    }

    /// Notes that the store holds no record of rotations (an empty one, or none): a record
    /// that did not read is gone, so the floor from before it holds again.
    pub fn record_absent(&self) {
        let mut required = self.required.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Required::Unknown(before)) = *required {
            *required = before.map(|(v, f)| Required::Version(v, f));
        }
    }

    /// How the file falls behind the newest rotation recorded, if it does.
    pub fn left_behind(&self) -> Option<LeftBehind> {
        let required = *self.required.lock().unwrap_or_else(|e| e.into_inner());
        let (version, wanted) = match required? {
            Required::Version(version, wanted) => (version, wanted),
            Required::Unknown(_) => return Some(LeftBehind::RecordUnreadable),
        };
        let keks = self.keks.read().unwrap_or_else(|e| e.into_inner());
        match keks.get(&version) {
            // Retired here: its material is gone, and it is not the newest either.
            Some(k) => match (wanted, k.fingerprint) {
                (Some(w), Some(have)) if w != have => Some(LeftBehind::OtherMaterial(version)),
                _ => None,
            },
            None if keks.keys().next_back().is_some_and(|&n| n > version) => None,
            None => Some(LeftBehind::Lacks(version)),
        }
    }

    /// The fingerprint of `version`'s material (a one-way digest, as the store records it),
    /// if this keyring holds its material.
    pub fn fingerprint(&self, version: u32) -> Option<[u8; 32]> {
        self.keks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&version)
            .and_then(|k| k.fingerprint)
    }

    /// A version met in the store that this keyring does not hold was most likely made by
    /// a `keys rotate` on this host since the last reload (the server's poll runs every
    /// second, a `rewrap` may already have moved data under it): read the file again now,
    /// at most once per [`MISS_RELOAD_INTERVAL`].
    fn reload_on_miss(&self) {
        let now = std::time::Instant::now();
        {
            let mut last = self
                .last_miss_reload
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| now.duration_since(t) < MISS_RELOAD_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        // A failed read keeps the keys loaded; the server's poll reports it.
        let _ = self.reload();
    }

    /// Re-reads the file, so a running server picks up a rotation made by `keys rotate`.
    ///
    /// # Errors
    ///
    /// As [`LocalKeyring::open`]; also when the file now holds another keyring.
    pub fn reload(&self) -> Result<(), KeyringError> {
        // A file gone, unreadable or unparsable no longer holds the keys either: a write
        // sealed now would be lost at the next start, which refuses such a file.
        let model = match read_file(&self.path) {
            Ok(model) => model,
            // Unreadable for now (too many open files, say): said as it is, not as a
            // damaged keyring, which an operator might go and "repair".
            Err(e @ KeyringError::Io { .. }) => {
                *self.diverged.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                return Err(e);
            }
            // Not "keyring X is not a valid keyring" twice over.
            Err(KeyringError::Invalid { detail, .. }) => {
                return Err(self.diverge(format!("the file cannot be loaded: {detail}")))
            }
            Err(e) => return Err(self.diverge(format!("the file cannot be loaded: {e}"))),
        };
        if model.key_id != self.key_id {
            return Err(self.diverge("the file now holds another keyring (key id changed)"));
        }
        // Entries that do not make a keyring (material that is not base64 or not 32 bytes,
        // a version twice or 0, retired with material) are a damaged file as well.
        let keks = match build_keks(&self.path, &model) {
            Ok(keks) => keks,
            Err(KeyringError::Invalid { detail, .. }) => {
                return Err(self.diverge(format!("the file cannot be loaded: {detail}")))
            }
            Err(e) => return Err(self.diverge(format!("the file cannot be loaded: {e}"))),
        };
        let mut loaded = self.keks.write().unwrap_or_else(|e| e.into_inner());
        // Rotation adds versions and retirement erases material; nothing changes the
        // material of a version or removes one. A file that does (a damaged or tampered
        // copy) would seal new writes under a key no good copy holds, and fail every value
        // sealed before: keep the keys loaded.
        for (version, was) in loaded.iter() {
            let Some(now) = keks.get(version) else {
                return Err(self.diverge(format!("version {version} is gone from the file")));
            };
            if let (Some(was), Some(now)) = (was.fingerprint, now.fingerprint) {
                if was != now {
                    return Err(self.diverge(format!(
                        "version {version}'s material differs from the one loaded (a damaged \
                         file, or a restored copy rotated again?)"
                    )));
                }
            }
            if was.fingerprint.is_none() && now.fingerprint.is_some() {
                return Err(self.diverge(format!(
                    "version {version} was retired and has material again (a restored copy?)"
                )));
            }
        }
        *loaded = keks;
        *self.diverged.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// Notes that the file no longer holds the keys loaded, and says so: the keys stay
    /// loaded for what they sealed, but nothing new is sealed (a write sealed under a key no
    /// file holds is lost at the next restart) until the file holds them again.
    fn diverge(&self, why: impl Into<String>) -> KeyringError {
        let why = why.into();
        *self.diverged.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
        invalid(
            &self.path,
            format!(
                "{why}; keeping the keys loaded, and sealing nothing new until the file holds \
                 them again (restore the file this server loaded, or restart with the right one)"
            ),
        )
    }

    /// The keyring file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keyring's key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Every version's public facts, oldest first.
    pub fn list(&self) -> Vec<KeyInfo> {
        let keks = self.keks.read().unwrap_or_else(|e| e.into_inner());
        keks.values().map(|k| k.info.clone()).collect()
    }

    fn error(kind: ProviderErrorKind, message: impl Into<String>) -> ProviderError {
        ProviderError::new(kind, KIND, message)
    }
}

fn read_file(path: &Path) -> Result<FileModel, KeyringError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyringError::NotFound(path.to_owned()))
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(invalid(path, "not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyringError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(invalid(path, "file too large"));
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text).map_err(io_err(path))?;
    let model: FileModel =
        serde_json::from_str(&text).map_err(|e| invalid(path, crate::json_problem(&e)))?;
    if model.format != FORMAT {
        return Err(invalid(
            path,
            format!("unsupported format (expected {FORMAT})"),
        ));
    }
    Ok(model)
}

fn build_keks(path: &Path, model: &FileModel) -> Result<BTreeMap<u32, Kek>, KeyringError> {
    if model.key_id.is_empty() || model.key_id.len() > 255 {
        return Err(invalid(path, "key_id must be 1 to 255 bytes"));
    }
    let mut keks = BTreeMap::new();
    let mut active = 0;
    for k in &model.keys {
        if k.version == 0 {
            return Err(invalid(path, "versions start at 1"));
        }
        let (wrapper, fingerprint) = match (&k.material, k.state) {
            (None, KeyState::Retired) => (None, None),
            (Some(_), KeyState::Retired) => {
                return Err(invalid(
                    path,
                    format!("version {} is retired but still holds material", k.version),
                ))
            }
            (None, _) => {
                return Err(invalid(
                    path,
                    format!("version {} has no material", k.version),
                ))
            }
            (Some(b64), _) => {
                let bytes = Zeroizing::new(STANDARD.decode(b64.as_bytes()).map_err(|_| {
                    invalid(
                        path,
                        format!("version {} material is not base64", k.version),
                    )
                })?);
                let key = Key256::from_slice(&bytes).ok_or_else(|| {
                    invalid(
                        path,
                        format!("version {} material is not 32 bytes", k.version),
                    )
                })?;
                (Some(KeyWrapper::new(&key)), Some(fingerprint(&bytes)))
            }
        };
        if k.state == KeyState::Active {
            active += 1;
        }
        let info = KeyInfo {
            key_id: model.key_id.clone(),
            version: k.version,
            state: k.state,
            created_at: k.created_at,
            state_changed_at: k.state_changed_at,
        };
        let kek = Kek {
            info,
            wrapper,
            fingerprint,
        };
        if keks.insert(k.version, kek).is_some() {
            return Err(invalid(
                path,
                format!("version {} appears twice", k.version),
            ));
        }
    }
    if active != 1 {
        return Err(invalid(
            path,
            format!("exactly one version must be active, found {active}"),
        ));
    }
    Ok(keks)
}

#[async_trait]
impl KeyProvider for LocalKeyring {
    fn kind(&self) -> &str {
        KIND
    }

    fn active_kek(&self) -> Result<KekRef, ProviderError> {
        if let Some(why) = &*self.diverged.lock().unwrap_or_else(|e| e.into_inner()) {
            return Err(Self::error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "the keyring file {} no longer holds the keys this server loaded ({why}): \
                     no new write is sealed until it does",
                    self.path.display()
                ),
            ));
        }
        if let Some(behind) = self.left_behind() {
            return Err(Self::error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "the keyring file {} (key {}) {behind}: no new write is sealed until it \
                     holds the newest keyring file (copy it here)",
                    self.path.display(),
                    self.key_id
                ),
            ));
        }
        let keks = self.keks.read().unwrap_or_else(|e| e.into_inner());
        keks.values()
            .find(|k| k.info.state == KeyState::Active)
            .map(|k| KekRef {
                provider: KIND.to_owned(),
                key_id: self.key_id.clone(),
                version: k.info.version,
            })
            .ok_or_else(|| Self::error(ProviderErrorKind::Misconfigured, "no active key version"))
    }

    async fn wrap(
        &self,
        kek: &KekRef,
        key: &Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, ProviderError> {
        if kek.provider != KIND || kek.key_id != self.key_id {
            return Err(Self::error(
                ProviderErrorKind::UnknownKek,
                format!("key {kek} is not in this keyring"),
            ));
        }
        let keks = self.keks.read().unwrap_or_else(|e| e.into_inner());
        let entry = keks.get(&kek.version).ok_or_else(|| {
            Self::error(
                ProviderErrorKind::UnknownKek,
                format!("no version {}", kek.version),
            )
        })?;
        if entry.info.state != KeyState::Active {
            return Err(Self::error(
                ProviderErrorKind::KekNotActive,
                format!("version {} is {}", kek.version, entry.info.state.as_str()),
            ));
        }
        let wrapper = entry
            .wrapper
            .as_ref()
            .ok_or_else(|| Self::error(ProviderErrorKind::KekRetired, "retired"))?;
        let bytes = wrapper
            .wrap(key, aad, &strongroom_crypto::OsRandom)
            .map_err(|e| Self::error(ProviderErrorKind::Other, "wrap failed").with_source(e))?;
        Ok(WrappedKey {
            kek: kek.clone(),
            bytes,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Key256, UnwrapError> {
        let kek = &wrapped.kek;
        if kek.provider != KIND || kek.key_id != self.key_id {
            return Err(UnwrapError::NotMine(kek.clone()));
        }
        let known = self
            .keks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&kek.version);
        if !known {
            self.reload_on_miss();
        }
        let keks = self.keks.read().unwrap_or_else(|e| e.into_inner());
        let entry = keks.get(&kek.version).ok_or_else(|| {
            Self::error(
                ProviderErrorKind::UnknownKek,
                format!("no version {} in the keyring", kek.version),
            )
        })?;
        let wrapper = entry.wrapper.as_ref().ok_or_else(|| {
            Self::error(
                ProviderErrorKind::KekRetired,
                format!("version {} is retired", kek.version),
            )
        })?;
        wrapper.unwrap(&wrapped.bytes, aad).ok_or_else(|| {
            Self::error(
                ProviderErrorKind::AuthenticationFailed,
                "wrapped key does not authenticate",
            )
            .into()
        })
    }
}

/// Creates a new keyring at `path` with one active version.
///
/// # Errors
///
/// [`KeyringError::AlreadyExists`] if a file is there; I/O and random errors.
pub fn generate(
    path: &Path,
    now: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<KeyInfo, KeyringError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Private like the file: it will hold the store and its backups too (dev layout).
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
    }
    let _lock = lock(path)?;
    if path.exists() {
        return Err(KeyringError::AlreadyExists(path.to_owned()));
    }
    let mut id = [0u8; 8];
    rng.fill(&mut id)?;
    let key_id = format!(
        "kr-{}",
        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let model = FileModel {
        format: FORMAT.to_owned(),
        key_id,
        created_at: now,
        keys: vec![new_version(1, now, rng)?],
    };
    write_file(path, &model)?;
    info_of(&model, 1)
}

/// Adds a new active version; the previous active one becomes decrypt-only.
///
/// # Errors
///
/// As [`LocalKeyring::open`], and I/O errors writing the file.
pub fn rotate(
    path: &Path,
    now: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<KeyInfo, KeyringError> {
    begin_rotation(path, now, rng)?.commit()
}

/// A rotation made in memory, the keyring file locked ([`begin_rotation`]): nothing is
/// written until [`PendingRotation::commit`]; dropped, it leaves the file as it was. What a
/// caller that must record the new version elsewhere first (the store, which every copy of
/// the file is checked against) uses, so that a version whose record was refused is never
/// written where a server could load it.
pub struct PendingRotation {
    _lock: LockGuard,
    path: PathBuf,
    model: FileModel,
    version: u32,
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for PendingRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRotation")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl PendingRotation {
    /// The keyring's key id.
    pub fn key_id(&self) -> &str {
        &self.model.key_id
    }

    /// The version the rotation makes.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The fingerprint of the new version's material (as [`LocalKeyring::fingerprint`]).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Writes the rotation to the file, and releases the lock.
    ///
    /// # Errors
    ///
    /// I/O errors writing the file (which then stays as it was).
    pub fn commit(self) -> Result<KeyInfo, KeyringError> {
        write_file(&self.path, &self.model)?;
        info_of(&self.model, self.version)
    }
}

/// Prepares a rotation of the keyring at `path`: see [`PendingRotation`].
///
/// # Errors
///
/// As [`LocalKeyring::open`], and the random source's.
pub fn begin_rotation(
    path: &Path,
    now: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<PendingRotation, KeyringError> {
    let lock = lock(path)?;
    let mut model = read_file(path)?;
    build_keks(path, &model)?;
    let next = model.keys.iter().map(|k| k.version).max().unwrap_or(0) + 1;
    for k in &mut model.keys {
        if k.state == KeyState::Active {
            k.state = KeyState::DecryptOnly;
            k.state_changed_at = now;
        }
    }
    let (key, fingerprint) = new_version_with_fingerprint(next, now, rng)?;
    model.keys.push(key);
    Ok(PendingRotation {
        _lock: lock,
        path: path.to_owned(),
        model,
        version: next,
        fingerprint,
    })
}

/// Retires `version`: erases its material from the file, so nothing it wrapped opens again.
/// The caller must first make sure no stored data key still uses it (`rewrap`).
///
/// # Errors
///
/// [`KeyringError::UnknownVersion`], [`KeyringError::InvalidTransition`] for the active
/// version, and I/O errors.
pub fn retire(path: &Path, version: u32, now: OffsetDateTime) -> Result<KeyInfo, KeyringError> {
    let _lock = lock(path)?;
    let mut model = read_file(path)?;
    build_keks(path, &model)?;
    let key = model
        .keys
        .iter_mut()
        .find(|k| k.version == version)
        .ok_or(KeyringError::UnknownVersion(version))?;
    match key.state {
        KeyState::Active => {
            return Err(KeyringError::InvalidTransition(format!(
                "version {version} is active; rotate first so another version takes over"
            )))
        }
        KeyState::Retired => {
            return Err(KeyringError::InvalidTransition(format!(
                "version {version} is already retired"
            )))
        }
        KeyState::DecryptOnly => {}
    }
    key.state = KeyState::Retired;
    key.state_changed_at = now;
    key.material = None;
    write_file(path, &model)?;
    info_of(&model, version)
}

fn new_version(
    version: u32,
    now: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<FileKey, KeyringError> {
    new_version_with_fingerprint(version, now, rng).map(|(key, _)| key)
}

fn new_version_with_fingerprint(
    version: u32,
    now: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<(FileKey, [u8; 32]), KeyringError> {
    let key = Key256::generate(rng)?;
    let file_key = FileKey {
        version,
        state: KeyState::Active,
        created_at: now,
        state_changed_at: now,
        material: Some(Zeroizing::new(STANDARD.encode(key.expose_secret()))),
    };
    Ok((file_key, fingerprint(key.expose_secret())))
}

fn info_of(model: &FileModel, version: u32) -> Result<KeyInfo, KeyringError> {
    model
        .keys
        .iter()
        .find(|k| k.version == version)
        .map(|k| KeyInfo {
            key_id: model.key_id.clone(),
            version: k.version,
            state: k.state,
            created_at: k.created_at,
            state_changed_at: k.state_changed_at,
        })
        .ok_or(KeyringError::UnknownVersion(version))
}

/// Holds the advisory lock on `<path>.lock` until dropped.
struct LockGuard(File);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Locks the keyring at `path`, whose folder must exist: only [`generate`] makes it, so that
/// a command given a mistyped path fails without leaving an empty folder behind.
fn lock(path: &Path) -> Result<LockGuard, KeyringError> {
    let lock_path = sibling(path, ".lock");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(KeyringError::NotFound(path.to_owned()));
        }
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    file.lock().map_err(io_err(&lock_path))?;
    Ok(LockGuard(file))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Writes the whole file atomically with mode 0600: temp file, fsync, rename, fsync folder.
fn write_file(path: &Path, model: &FileModel) -> Result<(), KeyringError> {
    let json = Zeroizing::new(
        serde_json::to_vec_pretty(model)
            .map_err(|e| invalid(path, format!("cannot encode: {e}")))?,
    );
    let tmp = sibling(path, &format!(".tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&json)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

#[cfg(test)]
mod tests;
