use std::sync::atomic::{AtomicUsize, Ordering};

use strongroom_crypto::testing::{check_provider, check_rotation, FakeProvider};
use strongroom_store::sqlite::SqliteStore;

use super::*;
use crate::rewrap::Moving;

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

/// A root provider that counts the calls that reach it, and can be taken down (its unwraps
/// then fail as unavailable).
#[derive(Debug)]
struct Counting {
    inner: FakeProvider,
    wraps: AtomicUsize,
    unwraps: AtomicUsize,
    down: std::sync::atomic::AtomicBool,
    /// Its health check never answers (a peer that hangs rather than refuses).
    hangs: std::sync::atomic::AtomicBool,
}

impl Counting {
    fn new(key_id: &str) -> Arc<Self> {
        Arc::new(Self {
            inner: FakeProvider::new(key_id, 1),
            wraps: AtomicUsize::new(0),
            unwraps: AtomicUsize::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
            hangs: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

#[async_trait]
impl KeyProvider for Counting {
    fn kind(&self) -> &str {
        self.inner.kind()
    }
    fn active_kek(&self) -> Result<KekRef, ProviderError> {
        self.inner.active_kek()
    }
    async fn wrap(
        &self,
        kek: &KekRef,
        key: &Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, ProviderError> {
        self.wraps.fetch_add(1, Ordering::SeqCst);
        self.inner.wrap(kek, key, aad).await
    }
    async fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Key256, UnwrapError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(error(ProviderErrorKind::Unavailable, "root down").into());
        }
        self.inner.unwrap(wrapped, aad).await
    }
    async fn health(&self) -> Result<(), ProviderError> {
        if self.hangs.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(error(ProviderErrorKind::Unavailable, "root down"));
        }
        self.inner.health().await
    }
}

/// A node holding the ring's active KEK is ready (puts and reveals need nothing else) while
/// the root provider is down; a node that could not unwrap it is not.
#[tokio::test]
async fn health_follows_the_ring_not_the_root_provider() {
    let (_d, s) = store().await;
    let root = Counting::new("root");
    let ring = open(&s, root.clone()).await;
    ring.health().await.unwrap();
    root.down.store(true, Ordering::SeqCst);
    ring.health().await.expect("ready with the active KEK held");
    let sealed = ring.wrap(&ring.active_kek().unwrap(), &key(), b"aad").await;
    assert!(sealed.is_ok(), "serving through the outage");
    // A root that hangs is forgiven the same, within a readiness probe's usual second.
    root.hangs.store(true, Ordering::SeqCst);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(1), ring.health()).await;
    assert!(
        matches!(answer, Ok(Ok(()))),
        "ready, in time, while the root hangs"
    );
    root.hangs.store(false, Ordering::SeqCst);
    // A node started while the root is down cannot unwrap the ring: not ready (if it
    // starts at all).
    if let Ok(cold) = KekHierarchy::open(s.clone(), root.clone(), now()).await {
        assert!(cold.health().await.is_err());
    }
}

async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    (dir, store)
}

async fn open(store: &Arc<dyn Store>, root: Arc<dyn KeyProvider>) -> Arc<KekHierarchy> {
    Arc::new(
        KekHierarchy::open(store.clone(), root, now())
            .await
            .unwrap(),
    )
}

fn key() -> Key256 {
    Key256::generate(&OsRandom).unwrap()
}

#[tokio::test]
async fn passes_the_provider_conformance_kit() {
    let (_d, s) = store().await;
    let h = open(&s, Arc::new(FakeProvider::new("root", 1))).await;
    assert_eq!(h.active_kek().unwrap(), kek_ref(1));
    check_provider(h).await;
}

#[tokio::test]
async fn rotates_per_the_conformance_kit() {
    let (_d, s) = store().await;
    let h = open(&s, Arc::new(FakeProvider::new("root", 1))).await;
    let (s2, h2) = (s.clone(), h.clone());
    check_rotation(h.clone(), || async move {
        let v = rotate(s2.as_ref(), h2.root().as_ref(), &OsRandom, now())
            .await
            .unwrap();
        assert_eq!(v, 2);
        assert!(h2.refresh().await.unwrap());
        assert!(!h2.refresh().await.unwrap(), "nothing changed since");
    })
    .await;
}

/// The point of the hierarchy: the root provider is used once per KEK, not once per request.
#[tokio::test]
async fn requests_never_reach_the_root_provider() {
    let (_d, s) = store().await;
    let root = Counting::new("root");
    let h = open(&s, root.clone()).await;
    assert_eq!(root.wraps.load(Ordering::SeqCst), 1, "the ring's v1");
    let before = (
        root.wraps.load(Ordering::SeqCst),
        root.unwraps.load(Ordering::SeqCst),
    );
    let kek = h.active_kek().unwrap();
    for i in 0..500u32 {
        let k = key();
        let aad = i.to_be_bytes();
        let w = h.wrap(&kek, &k, &aad).await.unwrap();
        assert_eq!(w.kek, kek_ref(1));
        let back = h.unwrap(&w, &aad).await.unwrap();
        assert_eq!(back.expose_secret(), k.expose_secret());
    }
    let after = (
        root.wraps.load(Ordering::SeqCst),
        root.unwraps.load(Ordering::SeqCst),
    );
    assert_eq!(before, after, "1000 operations reached the root");
}

#[tokio::test]
async fn a_rotation_on_one_node_reaches_the_others() {
    let (_d, s) = store().await;
    let root: Arc<dyn KeyProvider> = Arc::new(FakeProvider::new("root", 1));
    let (a, b) = (open(&s, root.clone()).await, open(&s, root.clone()).await);
    assert_eq!(
        rotate(s.as_ref(), root.as_ref(), &OsRandom, now())
            .await
            .unwrap(),
        2
    );
    a.refresh().await.unwrap();
    let k = key();
    let w = a.wrap(&a.active_kek().unwrap(), &k, b"x").await.unwrap();
    assert_eq!(w.kek.version, 2);
    // `b` has not polled yet: meeting v2 makes it reload once.
    assert_eq!(b.active_kek().unwrap().version, 1);
    let back = b.unwrap(&w, b"x").await.unwrap();
    assert_eq!(back.expose_secret(), k.expose_secret());
    assert_eq!(b.active_kek().unwrap().version, 2);
    // A version nobody made is refused, not panicked on.
    let mut forged = w.clone();
    forged.kek.version = 9;
    let e = b.unwrap(&forged, b"x").await.unwrap_err();
    assert!(
        matches!(&e, UnwrapError::Failed(e) if e.kind() == ProviderErrorKind::UnknownKek),
        "{e}"
    );
}

#[tokio::test]
async fn nodes_starting_together_on_an_empty_store_agree_on_one_ring() {
    let (_d, s) = store().await;
    let root: Arc<dyn KeyProvider> = Arc::new(FakeProvider::new("root", 1));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (s, root) = (s.clone(), root.clone());
            tokio::spawn(async move { KekHierarchy::open(s, root, now()).await.unwrap() })
        })
        .collect();
    let mut nodes = Vec::new();
    for t in tasks {
        nodes.push(t.await.unwrap());
    }
    let k = key();
    let w = nodes[0]
        .wrap(&nodes[0].active_kek().unwrap(), &k, b"a")
        .await
        .unwrap();
    for n in &nodes {
        assert_eq!(
            n.unwrap(&w, b"a").await.unwrap().expose_secret(),
            k.expose_secret()
        );
    }
    assert_eq!(list(s.as_ref()).await.unwrap().len(), 1);
}

/// A node that cannot reach the root while an operator rotates, rewraps and retires must
/// not go on sealing under the version it loaded before: the store no longer calls it
/// active, and once retired anything sealed under it would never open again.
#[tokio::test]
async fn a_node_that_cannot_unwrap_the_new_active_kek_seals_nothing_until_it_can() {
    let (_d, s) = store().await;
    let root = Counting::new("root");
    let node = open(&s, root.clone()).await;
    assert_eq!(node.active_kek().unwrap().version, 1);

    // The operator (who reaches the root) rotates while this node cannot.
    rotate(s.as_ref(), root.as_ref(), &OsRandom, now())
        .await
        .unwrap();
    root.down.store(true, Ordering::SeqCst);
    assert!(node.refresh().await.is_err());
    let e = node.active_kek().unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Unavailable, "{e}");
    let e = node.wrap(&kek_ref(1), &key(), b"x").await.unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::KekNotActive, "{e}");

    // v1 is retired meanwhile: this node drops it too, still without the root.
    retire(s.as_ref(), 1, now()).await.unwrap();
    assert!(node.refresh().await.is_err());
    let e = node.wrapper(1).unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::KekRetired, "{e}");

    // The root is back: the next refresh unwraps v2 and sealing resumes under it.
    root.down.store(false, Ordering::SeqCst);
    assert!(node.refresh().await.unwrap());
    assert_eq!(node.active_kek().unwrap().version, 2);
    let k = key();
    let w = node
        .wrap(&node.active_kek().unwrap(), &k, b"x")
        .await
        .unwrap();
    let back = node.unwrap(&w, b"x").await.unwrap();
    assert_eq!(back.expose_secret(), k.expose_secret());
}

#[tokio::test]
async fn retire_erases_the_kek_and_refuses_the_active_one() {
    let (_d, s) = store().await;
    let root: Arc<dyn KeyProvider> = Arc::new(FakeProvider::new("root", 1));
    let h = open(&s, root.clone()).await;
    let k = key();
    let w1 = h.wrap(&kek_ref(1), &k, b"r").await.unwrap();
    let e = retire(s.as_ref(), 1, now()).await.unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::KekNotActive);
    rotate(s.as_ref(), root.as_ref(), &OsRandom, now())
        .await
        .unwrap();
    retire(s.as_ref(), 1, now()).await.unwrap();
    h.refresh().await.unwrap();
    let e = h.unwrap(&w1, b"r").await.unwrap_err();
    assert!(
        matches!(&e, UnwrapError::Failed(e) if e.kind() == ProviderErrorKind::KekRetired),
        "{e}"
    );
    let infos = list(s.as_ref()).await.unwrap();
    assert_eq!(infos[0].state, KekState::Retired);
    assert_eq!(infos[0].wrapped_by, None);
    assert_eq!(infos[1].state, KekState::Active);
    let raw =
        String::from_utf8(s.get_provider_state(RING_STATE_KEY).await.unwrap().unwrap()).unwrap();
    assert_eq!(raw.matches("\"bytes\"").count(), 1, "{raw}");
    // A fresh node no longer has v1 either.
    let fresh = open(&s, root).await;
    assert!(fresh.unwrap(&w1, b"r").await.is_err());
    let e = retire(s.as_ref(), 7, now()).await.unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::UnknownKek);
}

#[tokio::test]
async fn keys_wrapped_by_the_root_directly_still_open() {
    let (_d, s) = store().await;
    let root: Arc<dyn KeyProvider> = Arc::new(FakeProvider::new("root", 1));
    let k = key();
    let strict = root
        .wrap(&root.active_kek().unwrap(), &k, b"s")
        .await
        .unwrap();
    let h = open(&s, root.clone()).await;
    assert_eq!(
        h.unwrap(&strict, b"s").await.unwrap().expose_secret(),
        k.expose_secret()
    );
    let mut other = strict.clone();
    other.kek.provider = "elsewhere".into();
    assert!(matches!(
        h.unwrap(&other, b"s").await,
        Err(UnwrapError::NotMine(_))
    ));
}

#[tokio::test]
async fn the_wrong_root_or_a_tampered_ring_stops_the_start_with_a_clear_error() {
    let (_d, s) = store().await;
    open(&s, Arc::new(FakeProvider::new("root", 1))).await;

    let e = KekHierarchy::open(s.clone(), Arc::new(FakeProvider::new("other", 1)), now())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::UnknownKek);
    assert!(e.to_string().contains("KEK v1"), "{e}");
    assert!(e.to_string().contains("rewrap --to-config"), "{e}");

    let raw = s.get_provider_state(RING_STATE_KEY).await.unwrap().unwrap();
    let mut ring: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let b64 = ring["keks"][0]["wrapped"]["bytes"].as_str().unwrap();
    let mut bytes = STANDARD.decode(b64).unwrap();
    bytes[20] ^= 1;
    ring["keks"][0]["wrapped"]["bytes"] = STANDARD.encode(&bytes).into();
    s.put_provider_state(RING_STATE_KEY, serde_json::to_vec(&ring).unwrap())
        .await
        .unwrap();
    let e = KekHierarchy::open(s.clone(), Arc::new(FakeProvider::new("root", 1)), now())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::AuthenticationFailed);
    assert!(
        e.to_string().contains("cannot unwrap Strongroom KEK v1"),
        "{e}"
    );

    // A wrapped KEK relabelled as another version does not unwrap (the version is bound).
    s.put_provider_state(RING_STATE_KEY, raw.clone())
        .await
        .unwrap();
    let root: Arc<dyn KeyProvider> = Arc::new(FakeProvider::new("root", 1));
    rotate(s.as_ref(), root.as_ref(), &OsRandom, now())
        .await
        .unwrap();
    let raw = s.get_provider_state(RING_STATE_KEY).await.unwrap().unwrap();
    let mut ring: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    ring["keks"][1]["wrapped"] = ring["keks"][0]["wrapped"].clone();
    s.put_provider_state(RING_STATE_KEY, serde_json::to_vec(&ring).unwrap())
        .await
        .unwrap();
    let e = KekHierarchy::open(s.clone(), root, now())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("KEK v2"), "{e}");

    s.put_provider_state(RING_STATE_KEY, b"{\"format\":\"x\"}".to_vec())
        .await
        .unwrap();
    let e = KekHierarchy::open(s, Arc::new(FakeProvider::new("root", 1)), now())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
}

#[tokio::test]
async fn the_ring_moves_to_another_root_without_touching_data_keys() {
    let (_d, s) = store().await;
    let old: Arc<dyn KeyProvider> = Arc::new(FakeProvider::new("old-root", 1));
    let new: Arc<dyn KeyProvider> = Arc::new(FakeProvider::new("new-root", 1));
    let h = open(&s, old.clone()).await;
    let k = key();
    let w = h.wrap(&kek_ref(1), &k, b"m").await.unwrap();
    let moving = Moving {
        from: old.clone(),
        to: new.clone(),
    };
    assert_eq!(rewrap_ring(s.as_ref(), &moving).await.unwrap(), 1);
    assert_eq!(rewrap_ring(s.as_ref(), &moving).await.unwrap(), 0);
    let infos = list(s.as_ref()).await.unwrap();
    assert_eq!(infos[0].wrapped_by.as_deref(), Some("fake:new-root:v1"));
    // Only the new root is needed now, and the old data key opens.
    let moved = open(&s, new).await;
    assert_eq!(
        moved.unwrap(&w, b"m").await.unwrap().expose_secret(),
        k.expose_secret()
    );
    assert!(KekHierarchy::open(s, old, now()).await.is_err());
}
