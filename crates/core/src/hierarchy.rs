//! The key hierarchy: a remote provider wraps Strongroom's own KEKs, and those KEKs wrap the
//! data keys.
//!
//! ```text
//! root provider (AWS KMS, PKCS#11, Transit)   holds the master key; Strongroom never sees it
//!   └─ Strongroom KEK v1, v2, …               random 256-bit keys, kept wrapped by the root in
//!        │                                    the store (provider state `kek/ring`), unwrapped
//!        │                                    once at start and held in memory
//!        └─ data key of each version          wrapped in process (AES-256-GCM, keywrap)
//! ```
//!
//! So a request never waits on the provider: the provider sees one unwrap per KEK version at
//! start (and one wrap per rotation), not one per request. [`KekHierarchy`] is itself a
//! [`KeyProvider`] whose KEKs are named `kek:strongroom:vN`; data keys that a provider wrapped
//! directly (the `strict` mode, or versions written before the hierarchy) still open through
//! the root, and a rewrap moves them under the active KEK.
//!
//! ## The ring record
//!
//! One JSON document under [`RING_STATE_KEY`], changed only by compare-and-swap
//! ([`Store::swap_provider_state`]) so operators and servers on several nodes never lose each
//! other's changes:
//!
//! ```text
//! { "format": "strongroom-kek-ring/1",
//!   "keks": [ { "version": 1, "state": "decrypt-only", "created_at": "…", "state_changed_at": "…",
//!               "wrapped": { "provider": "transit", "key_id": "transit/sr", "version": 3,
//!                            "bytes": "<base64>" } }, … ] }
//! ```
//!
//! Each KEK is wrapped by the root under associated data `"strongroom kek-ring/1" 0x00
//! "strongroom" 0x00 version:u32be`, so a wrapped KEK moved to another version does not
//! unwrap. A retired version keeps no wrapped bytes: its data keys are gone for good.
//!
//! ## Rotation
//!
//! [`rotate`] adds a version wrapped by the root's active key and makes it active; running
//! servers see it at their next [`KekHierarchy::refresh`] (the server polls every second)
//! and at once when they meet a data key under a version they do not know. It also re-wraps
//! every live KEK under the root's active key, so a rotation of the root key itself (a new
//! Transit key version, a new PKCS#11 key) is followed with `keys rotate`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use strongroom_crypto::keywrap::KeyWrapper;
use strongroom_crypto::{
    KekRef, Key256, KeyProvider, OsRandom, ProviderError, ProviderErrorKind, SecureRandom,
    UnwrapError, WrappedKey,
};
use strongroom_store::Store;
use time::OffsetDateTime;

/// [`KekRef::provider`] of Strongroom's own KEKs.
pub const KIND: &str = "kek";
/// [`KekRef::key_id`] of Strongroom's own KEKs.
pub const KEY_ID: &str = "strongroom";
/// The provider-state key holding the ring.
pub const RING_STATE_KEY: &str = "kek/ring";
const FORMAT: &str = "strongroom-kek-ring/1";
/// How often a compare-and-swap is retried when another process changed the ring meanwhile.
const SWAP_ATTEMPTS: usize = 16;
/// An unknown KEK version triggers a reload at most this often (a forged row must not make
/// every request reach the store and the provider).
const MISS_RELOAD_EVERY: Duration = Duration::from_millis(250);

/// The life-cycle state of one KEK version.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KekState {
    /// Wraps new data keys (exactly one version) and unwraps old ones.
    Active,
    /// Unwraps only.
    DecryptOnly,
    /// Erased: neither wraps nor unwraps.
    Retired,
}

impl KekState {
    /// The name used in the record and in `keys list`.
    pub fn as_str(self) -> &'static str {
        match self {
            KekState::Active => "active",
            KekState::DecryptOnly => "decrypt-only",
            KekState::Retired => "retired",
        }
    }
}

/// What `keys list` shows of one KEK version (never key material).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KekInfo {
    /// The version.
    pub version: u32,
    /// Its state.
    pub state: KekState,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When its state last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub state_changed_at: OffsetDateTime,
    /// The root key version that wraps it (`None` once retired).
    pub wrapped_by: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RingFile {
    format: String,
    keks: Vec<EntryFile>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    version: u32,
    state: KekState,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    state_changed_at: OffsetDateTime,
    #[serde(default)]
    wrapped: Option<WrappedFile>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WrappedFile {
    provider: String,
    key_id: String,
    version: u32,
    bytes: String,
}

impl WrappedFile {
    fn to_wrapped(&self) -> Result<WrappedKey, String> {
        Ok(WrappedKey {
            kek: KekRef {
                provider: self.provider.clone(),
                key_id: self.key_id.clone(),
                version: self.version,
            },
            bytes: STANDARD
                .decode(&self.bytes)
                .map_err(|_| "wrapped bytes are not base64".to_owned())?,
        })
    }

    fn from_wrapped(w: &WrappedKey) -> Self {
        Self {
            provider: w.kek.provider.clone(),
            key_id: w.kek.key_id.clone(),
            version: w.kek.version,
            bytes: STANDARD.encode(&w.bytes),
        }
    }
}

impl RingFile {
    fn parse(bytes: &[u8]) -> Result<Self, ProviderError> {
        let ring: RingFile = serde_json::from_slice(bytes)
            .map_err(|e| misconfigured(format!("the KEK ring record does not parse: {e}")))?;
        if ring.format != FORMAT {
            return Err(misconfigured(format!(
                "the KEK ring record has format {:?}, this build reads {FORMAT:?}",
                ring.format
            )));
        }
        let mut active = 0;
        let mut seen = std::collections::BTreeSet::new();
        for e in &ring.keks {
            if e.version == 0 || !seen.insert(e.version) {
                return Err(misconfigured(format!(
                    "the KEK ring record has version {} twice or a version 0",
                    e.version
                )));
            }
            if e.state == KekState::Active {
                active += 1;
            }
            if (e.state == KekState::Retired) != e.wrapped.is_none() {
                return Err(misconfigured(format!(
                    "KEK v{} is {} but {} wrapped bytes",
                    e.version,
                    e.state.as_str(),
                    if e.wrapped.is_some() {
                        "holds"
                    } else {
                        "has no"
                    }
                )));
            }
        }
        if active != 1 {
            return Err(misconfigured(format!(
                "the KEK ring record must have exactly one active version, it has {active}"
            )));
        }
        Ok(ring)
    }

    fn to_bytes(&self) -> Result<Vec<u8>, ProviderError> {
        serde_json::to_vec_pretty(self)
            .map_err(|e| misconfigured(format!("cannot encode the KEK ring: {e}")))
    }

    fn next_version(&self) -> u32 {
        self.keks.iter().map(|e| e.version).max().unwrap_or(0) + 1
    }
}

/// How long the health check waits for the root provider's own, when the node does not
/// hold the active KEK (then it is not ready without the root anyway).
const ROOT_HEALTH_WITHIN: Duration = Duration::from_secs(2);

/// As [`ROOT_HEALTH_WITHIN`] when the node holds the active KEK: it is ready either way, and
/// only waits to see an outage to log.
const ROOT_HEALTH_WHILE_HELD: Duration = Duration::from_millis(200);

fn error(kind: ProviderErrorKind, message: impl Into<String>) -> ProviderError {
    ProviderError::new(kind, KIND, message)
}

fn misconfigured(message: impl Into<String>) -> ProviderError {
    error(ProviderErrorKind::Misconfigured, message)
}

/// The associated data binding a wrapped KEK to its version.
fn kek_aad(version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(40);
    aad.extend_from_slice(FORMAT.as_bytes());
    aad.push(0);
    aad.extend_from_slice(KEY_ID.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn kek_ref(version: u32) -> KekRef {
    KekRef {
        provider: KIND.to_owned(),
        key_id: KEY_ID.to_owned(),
        version,
    }
}

/// Adds context to a root provider's error, keeping its kind (and so its provider name).
fn root_error(e: ProviderError, what: String) -> ProviderError {
    let kind = e.kind();
    let provider = e.provider().to_owned();
    ProviderError::new(kind, &provider, what).with_source(e)
}

async fn unwrap_kek(
    root: &dyn KeyProvider,
    version: u32,
    wrapped: &WrappedFile,
) -> Result<Key256, ProviderError> {
    let w = wrapped
        .to_wrapped()
        .map_err(|e| misconfigured(format!("KEK v{version}: {e}")))?;
    root.unwrap(&w, &kek_aad(version))
        .await
        .map_err(|e| match e {
            UnwrapError::NotMine(k) => error(
                ProviderErrorKind::UnknownKek,
                format!(
                    "Strongroom KEK v{version} is wrapped by {k}, which the configured provider \
                     '{}' does not hold (moving providers: `strongroom rewrap --to-config`)",
                    root.kind()
                ),
            ),
            UnwrapError::Failed(e) => root_error(
                e,
                format!(
                    "cannot unwrap Strongroom KEK v{version} (wrapped by {})",
                    w.kek
                ),
            ),
            other => error(ProviderErrorKind::Other, other.to_string()),
        })
}

async fn wrap_kek(
    root: &dyn KeyProvider,
    version: u32,
    kek: &Key256,
) -> Result<WrappedFile, ProviderError> {
    let active = root.active_kek()?;
    let w = root
        .wrap(&active, kek, &kek_aad(version))
        .await
        .map_err(|e| root_error(e, format!("cannot wrap Strongroom KEK v{version}")))?;
    Ok(WrappedFile::from_wrapped(&w))
}

struct Loaded {
    state: KekState,
    /// `None` once retired.
    wrapper: Option<Arc<KeyWrapper>>,
}

/// `Ring::active` when this node cannot seal: the record's active version is not unwrapped.
const NO_ACTIVE: u32 = 0;

struct Ring {
    /// The record these keys came from, to skip reloads that change nothing.
    raw: Vec<u8>,
    /// The version new data keys are sealed under, or [`NO_ACTIVE`].
    active: u32,
    keks: BTreeMap<u32, Loaded>,
}

/// Strongroom's KEKs, unwrapped once by a root provider and held in memory. See the module
/// documentation.
pub struct KekHierarchy {
    root: Arc<dyn KeyProvider>,
    store: Arc<dyn Store>,
    ring: RwLock<Ring>,
    /// Serialises reloads, and remembers the last one forced by an unknown version.
    reload: tokio::sync::Mutex<Option<Instant>>,
    /// When a root provider outage was last logged by [`KeyProvider::health`].
    root_outage_logged: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for KekHierarchy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekHierarchy")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl KekHierarchy {
    /// Loads the ring from `store` and unwraps every live KEK with `root`; makes the ring
    /// (one active KEK wrapped by `root`) if the store has none yet. Several processes
    /// starting at once on an empty store agree on one ring.
    ///
    /// # Errors
    ///
    /// The root provider's error (unreachable, denied, wrong key), naming the KEK it could
    /// not unwrap; [`ProviderErrorKind::Misconfigured`] for a damaged ring record;
    /// [`ProviderErrorKind::Unavailable`] when the store fails.
    pub async fn open(
        store: Arc<dyn Store>,
        root: Arc<dyn KeyProvider>,
        now: OffsetDateTime,
    ) -> Result<Self, ProviderError> {
        let raw = match get_ring(store.as_ref()).await? {
            Some(raw) => raw,
            None => {
                let first = new_ring(root.as_ref(), now).await?;
                let bytes = first.to_bytes()?;
                if swap_ring(store.as_ref(), None, bytes.clone()).await? {
                    bytes
                } else {
                    // Another process made it first: use theirs.
                    get_ring(store.as_ref())
                        .await?
                        .ok_or_else(|| misconfigured("the KEK ring record vanished"))?
                }
            }
        };
        Self::from_record(store, root, raw).await
    }

    /// As [`open`](Self::open), but never makes a ring: an operator command pointed at the
    /// wrong store must not start a new ring there.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open); [`ProviderErrorKind::Misconfigured`] when the store has no
    /// ring yet.
    pub async fn open_existing(
        store: Arc<dyn Store>,
        root: Arc<dyn KeyProvider>,
    ) -> Result<Self, ProviderError> {
        let raw = get_ring(store.as_ref()).await?.ok_or_else(|| {
            misconfigured(
                "this store has no KEK ring yet: the server makes one on its first start with \
                 this configuration, as does `strongroom keys generate`; check that the \
                 configuration names the right store",
            )
        })?;
        Self::from_record(store, root, raw).await
    }

    async fn from_record(
        store: Arc<dyn Store>,
        root: Arc<dyn KeyProvider>,
        raw: Vec<u8>,
    ) -> Result<Self, ProviderError> {
        let ring = load(root.as_ref(), raw, None).await?;
        Ok(Self {
            root,
            store,
            ring: RwLock::new(ring),
            reload: tokio::sync::Mutex::new(None),
            root_outage_logged: std::sync::Mutex::new(None),
        })
    }

    /// The provider that wraps the KEKs.
    pub fn root(&self) -> &Arc<dyn KeyProvider> {
        &self.root
    }

    /// Re-reads the ring record and unwraps versions not loaded yet (a rotation by
    /// `keys rotate` on any node); versions retired since are dropped from memory. Returns
    /// whether anything changed. On error the keys loaded before stay in force.
    ///
    /// # Errors
    ///
    /// The store's or the root provider's error.
    pub async fn refresh(&self) -> Result<bool, ProviderError> {
        let _serial = self.reload.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<bool, ProviderError> {
        let Some(raw) = get_ring(self.store.as_ref()).await? else {
            return Err(misconfigured("the KEK ring record is gone from the store"));
        };
        let known: BTreeMap<u32, Arc<KeyWrapper>> = {
            let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
            if ring.raw == raw {
                return Ok(false);
            }
            ring.keks
                .iter()
                .filter_map(|(v, l)| l.wrapper.clone().map(|w| (*v, w)))
                .collect()
        };
        let ring = match load(self.root.as_ref(), raw.clone(), Some(&known)).await {
            Ok(ring) => ring,
            Err(e) => {
                self.apply_states_only(&raw, &known)?;
                return Err(e);
            }
        };
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = ring;
        Ok(true)
    }

    /// When the root cannot unwrap what the ring record now holds (usually: it is
    /// unreachable), the record's states still apply, since they need no provider: versions
    /// retired are dropped, and if the active version is one this node cannot unwrap, it
    /// seals nothing until it can ([`KeyProvider::active_kek`] is unavailable). Sealing on
    /// under the version loaded before would write under a version the store no longer calls
    /// active, which an operator may rewrap and retire meanwhile: an acknowledged write
    /// that then never opens again. The old record stays the one "loaded", so the next
    /// refresh tries the unwrap again.
    fn apply_states_only(
        &self,
        raw: &[u8],
        known: &BTreeMap<u32, Arc<KeyWrapper>>,
    ) -> Result<(), ProviderError> {
        let file = RingFile::parse(raw)?;
        let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
        let mut active = NO_ACTIVE;
        let mut keks = BTreeMap::new();
        for e in &file.keks {
            let wrapper = match e.state {
                KekState::Retired => None,
                _ => known.get(&e.version).cloned(),
            };
            if e.state == KekState::Active && wrapper.is_some() {
                active = e.version;
            }
            keks.insert(
                e.version,
                Loaded {
                    state: e.state,
                    wrapper,
                },
            );
        }
        ring.active = active;
        ring.keks = keks;
        Ok(())
    }

    /// Reloads after meeting an unknown version, at most once per [`MISS_RELOAD_EVERY`].
    async fn reload_on_miss(&self) {
        let mut last = self.reload.lock().await;
        if last.is_some_and(|t| t.elapsed() < MISS_RELOAD_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let _ = self.refresh_locked().await;
    }

    fn wrapper(&self, version: u32) -> Result<Option<Arc<KeyWrapper>>, ProviderError> {
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
        match ring.keks.get(&version) {
            None => Ok(None),
            Some(l) => match &l.wrapper {
                Some(w) => Ok(Some(w.clone())),
                None if l.state == KekState::Retired => Err(error(
                    ProviderErrorKind::KekRetired,
                    format!("KEK v{version} is retired"),
                )),
                // In the record but not unwrapped here yet (see `apply_states_only`).
                None => Ok(None),
            },
        }
    }
}

/// Unwraps every live KEK of `raw`, reusing the ones in `known` (already unwrapped).
async fn load(
    root: &dyn KeyProvider,
    raw: Vec<u8>,
    known: Option<&BTreeMap<u32, Arc<KeyWrapper>>>,
) -> Result<Ring, ProviderError> {
    let file = RingFile::parse(&raw)?;
    let mut keks = BTreeMap::new();
    let mut active = 0;
    for e in &file.keks {
        if e.state == KekState::Active {
            active = e.version;
        }
        let wrapper = match (&e.wrapped, known.and_then(|k| k.get(&e.version))) {
            (None, _) => None,
            (Some(_), Some(w)) => Some(w.clone()),
            (Some(w), None) => {
                let key = unwrap_kek(root, e.version, w).await?;
                Some(Arc::new(KeyWrapper::new(&key)))
            }
        };
        keks.insert(
            e.version,
            Loaded {
                state: e.state,
                wrapper,
            },
        );
    }
    Ok(Ring { raw, active, keks })
}

async fn new_ring(root: &dyn KeyProvider, now: OffsetDateTime) -> Result<RingFile, ProviderError> {
    let kek = Key256::generate(&OsRandom)
        .map_err(|e| error(ProviderErrorKind::Other, "random source failed").with_source(e))?;
    Ok(RingFile {
        format: FORMAT.to_owned(),
        keks: vec![EntryFile {
            version: 1,
            state: KekState::Active,
            created_at: now,
            state_changed_at: now,
            wrapped: Some(wrap_kek(root, 1, &kek).await?),
        }],
    })
}

fn store_error(e: strongroom_store::StoreError) -> ProviderError {
    error(
        ProviderErrorKind::Unavailable,
        "cannot reach the store holding the KEK ring",
    )
    .with_source(e)
}

async fn get_ring(store: &dyn Store) -> Result<Option<Vec<u8>>, ProviderError> {
    store
        .get_provider_state(RING_STATE_KEY)
        .await
        .map_err(store_error)
}

async fn swap_ring(
    store: &dyn Store,
    expected: Option<&[u8]>,
    bytes: Vec<u8>,
) -> Result<bool, ProviderError> {
    store
        .swap_provider_state(RING_STATE_KEY, expected, bytes)
        .await
        .map_err(store_error)
}

#[async_trait]
impl KeyProvider for KekHierarchy {
    fn kind(&self) -> &str {
        KIND
    }

    fn active_kek(&self) -> Result<KekRef, ProviderError> {
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
        if ring.active == NO_ACTIVE {
            return Err(error(
                ProviderErrorKind::Unavailable,
                "the KEK ring's active version is not unwrapped on this node yet (the root \
                 provider is unreachable); nothing is sealed until it is",
            ));
        }
        Ok(kek_ref(ring.active))
    }

    async fn wrap(
        &self,
        kek: &KekRef,
        key: &Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, ProviderError> {
        if kek.provider != KIND || kek.key_id != KEY_ID {
            return Err(error(
                ProviderErrorKind::UnknownKek,
                format!("{kek} is not a Strongroom KEK"),
            ));
        }
        let wrapper = {
            let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
            match ring.keks.get(&kek.version) {
                None => {
                    return Err(error(
                        ProviderErrorKind::UnknownKek,
                        format!("no KEK v{}", kek.version),
                    ))
                }
                Some(l) if l.state != KekState::Active => {
                    return Err(error(
                        ProviderErrorKind::KekNotActive,
                        format!("KEK v{} is {}", kek.version, l.state.as_str()),
                    ))
                }
                Some(l) => l
                    .wrapper
                    .clone()
                    .ok_or_else(|| error(ProviderErrorKind::KekRetired, "retired"))?,
            }
        };
        let bytes = wrapper
            .wrap(key, aad, &OsRandom)
            .map_err(|e| error(ProviderErrorKind::Other, "wrap failed").with_source(e))?;
        Ok(WrappedKey {
            kek: kek.clone(),
            bytes,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Key256, UnwrapError> {
        let kek = &wrapped.kek;
        if kek.provider != KIND {
            // Wrapped by a provider directly (strict mode, or before the hierarchy).
            return self.root.unwrap(wrapped, aad).await;
        }
        if kek.key_id != KEY_ID {
            return Err(UnwrapError::NotMine(kek.clone()));
        }
        let wrapper = match self.wrapper(kek.version)? {
            Some(w) => w,
            None => {
                // Written by a node that rotated before this one noticed.
                self.reload_on_miss().await;
                self.wrapper(kek.version)?.ok_or_else(|| {
                    error(
                        ProviderErrorKind::UnknownKek,
                        format!("no KEK v{}", kek.version),
                    )
                })?
            }
        };
        wrapper.unwrap(&wrapped.bytes, aad).ok_or_else(|| {
            error(
                ProviderErrorKind::AuthenticationFailed,
                "wrapped key does not authenticate",
            )
            .into()
        })
    }

    /// Ready while this node holds the ring's active KEK unwrapped: puts and reveals need
    /// nothing else, so a root provider outage (which stops rotations and rewraps, and is
    /// logged here at most once a minute) does not take every node out of rotation.
    async fn health(&self) -> Result<(), ProviderError> {
        // A node holding the ring's active KEK needs nothing else to serve: it is ready
        // whatever the root says, and waits for the root only briefly (readiness probes
        // time out after a second or so; a root that hangs rather than refusing, behind a
        // partition or a stuck load balancer, held every answer), to log an outage it sees.
        if self.active_kek().is_ok() {
            if let Ok(Err(e)) =
                tokio::time::timeout(ROOT_HEALTH_WHILE_HELD, self.root.health()).await
            {
                let now = std::time::Instant::now();
                let mut last = self
                    .root_outage_logged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(60))
                {
                    *last = Some(now);
                    tracing::warn!(
                        error = %e,
                        "the root key provider is unavailable; serving with the KEK ring \
                         unwrapped at start (rotations and rewraps wait for it)"
                    );
                }
            }
            return Ok(());
        }
        tokio::time::timeout(ROOT_HEALTH_WITHIN, self.root.health())
            .await
            .unwrap_or_else(|_| {
                Err(error(
                    ProviderErrorKind::Unavailable,
                    format!(
                        "the root key provider did not answer its health check within {} s",
                        ROOT_HEALTH_WITHIN.as_secs()
                    ),
                ))
            })
            .and_then(|()| self.active_kek().map(|_| ()))
    }
}

/// The KEK versions of the ring in `store` (empty when there is none yet).
///
/// # Errors
///
/// Store errors, a damaged record.
pub async fn list(store: &dyn Store) -> Result<Vec<KekInfo>, ProviderError> {
    let Some(raw) = get_ring(store).await? else {
        return Ok(Vec::new());
    };
    Ok(RingFile::parse(&raw)?
        .keks
        .iter()
        .map(|e| KekInfo {
            version: e.version,
            state: e.state,
            created_at: e.created_at,
            state_changed_at: e.state_changed_at,
            wrapped_by: e
                .wrapped
                .as_ref()
                .map(|w| format!("{}:{}:v{}", w.provider, w.key_id, w.version)),
        })
        .collect())
}

/// Changes the ring by compare-and-swap, retrying from a fresh read when another process
/// changed it meanwhile. `change` edits the parsed ring and returns what to report.
async fn change_ring<T>(
    store: &dyn Store,
    mut change: impl AsyncFnMut(&mut RingFile) -> Result<T, ProviderError>,
) -> Result<T, ProviderError> {
    for _ in 0..SWAP_ATTEMPTS {
        let raw = get_ring(store).await?.ok_or_else(|| {
            misconfigured("there is no KEK ring yet: start the server once, or run `keys generate`")
        })?;
        let mut ring = RingFile::parse(&raw)?;
        let out = change(&mut ring).await?;
        if swap_ring(store, Some(&raw), ring.to_bytes()?).await? {
            return Ok(out);
        }
    }
    Err(error(
        ProviderErrorKind::Unavailable,
        "the KEK ring kept changing under this command; try again",
    ))
}

/// Makes the ring in `store` if there is none (one active KEK wrapped by `root`). Returns
/// whether it made one.
///
/// # Errors
///
/// As [`KekHierarchy::open`].
pub async fn generate(
    store: &dyn Store,
    root: &dyn KeyProvider,
    now: OffsetDateTime,
) -> Result<bool, ProviderError> {
    if get_ring(store).await?.is_some() {
        return Ok(false);
    }
    let bytes = new_ring(root, now).await?.to_bytes()?;
    swap_ring(store, None, bytes).await
}

/// Adds a KEK version wrapped by `root`'s active key and makes it active (the old one becomes
/// decrypt-only), and re-wraps every live KEK under `root`'s active key. Returns the new
/// version.
///
/// # Errors
///
/// The root provider's or the store's error; nothing changes then.
pub async fn rotate(
    store: &dyn Store,
    root: &dyn KeyProvider,
    rng: &dyn SecureRandom,
    now: OffsetDateTime,
) -> Result<u32, ProviderError> {
    let kek = Key256::generate(rng)
        .map_err(|e| error(ProviderErrorKind::Other, "random source failed").with_source(e))?;
    change_ring(store, async |ring: &mut RingFile| {
        rewrap_entries(ring, root).await?;
        let version = ring.next_version();
        for e in &mut ring.keks {
            if e.state == KekState::Active {
                e.state = KekState::DecryptOnly;
                e.state_changed_at = now;
            }
        }
        ring.keks.push(EntryFile {
            version,
            state: KekState::Active,
            created_at: now,
            state_changed_at: now,
            wrapped: Some(wrap_kek(root, version, &kek).await?),
        });
        Ok(version)
    })
    .await
}

/// Re-wraps every live KEK not under `root`'s active key (after the root key rotated, or to
/// move the ring to another provider with a `Moving` root). Returns how many moved.
///
/// # Errors
///
/// The root provider's or the store's error; nothing changes then.
pub async fn rewrap_ring(store: &dyn Store, root: &dyn KeyProvider) -> Result<u32, ProviderError> {
    change_ring(store, async |ring: &mut RingFile| {
        rewrap_entries(ring, root).await
    })
    .await
}

async fn rewrap_entries(ring: &mut RingFile, root: &dyn KeyProvider) -> Result<u32, ProviderError> {
    let target = root.active_kek()?;
    let mut moved = 0;
    for e in &mut ring.keks {
        let Some(w) = &e.wrapped else { continue };
        if w.provider == target.provider && w.key_id == target.key_id && w.version == target.version
        {
            continue;
        }
        let key = unwrap_kek(root, e.version, w).await?;
        e.wrapped = Some(wrap_kek(root, e.version, &key).await?);
        moved += 1;
    }
    Ok(moved)
}

/// Retires KEK `version`: its wrapped bytes are erased from the ring, so every data key
/// under it is gone for good. The caller checks first that no credential version uses it.
///
/// # Errors
///
/// [`ProviderErrorKind::KekNotActive`] for the active version (rotate first),
/// [`ProviderErrorKind::UnknownKek`] for a version the ring does not have; store errors.
pub async fn retire(
    store: &dyn Store,
    version: u32,
    now: OffsetDateTime,
) -> Result<(), ProviderError> {
    change_ring(store, async |ring: &mut RingFile| {
        let e = ring
            .keks
            .iter_mut()
            .find(|e| e.version == version)
            .ok_or_else(|| {
                error(
                    ProviderErrorKind::UnknownKek,
                    format!("the KEK ring has no version {version}"),
                )
            })?;
        match e.state {
            KekState::Active => Err(error(
                ProviderErrorKind::KekNotActive,
                format!("KEK v{version} is the active version: rotate first"),
            )),
            KekState::Retired => Ok(()),
            KekState::DecryptOnly => {
                e.state = KekState::Retired;
                e.state_changed_at = now;
                e.wrapped = None;
                Ok(())
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests;
