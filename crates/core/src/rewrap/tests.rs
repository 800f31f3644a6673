use std::sync::Arc;

use strongroom_crypto::testing::FakeProvider;
use strongroom_crypto::{OsRandom, SecretBytes};
use strongroom_store::sqlite::SqliteStore;

use super::*;
use crate::{PutRequest, SystemClock, Vault, VaultConfig};

async fn setup(provider: Arc<FakeProvider>) -> (tempfile::TempDir, Arc<dyn Store>, Arc<Vault>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    let vault = vault_over(store.clone(), provider);
    (dir, store, vault)
}

fn vault_over(store: Arc<dyn Store>, provider: Arc<dyn KeyProvider>) -> Arc<Vault> {
    Arc::new(Vault::new(
        store,
        provider,
        Arc::new(OsRandom),
        Arc::new(SystemClock),
        VaultConfig::default(),
    ))
}

async fn put_many(vault: &Vault, n: u32) {
    for i in 0..n {
        let name = format!("cred-{i}");
        vault
            .put(PutRequest {
                owner: "alice",
                name: &name,
                value: SecretBytes::from_slice(format!("value-{i}").as_bytes()),
                metadata: None,
                expected_version: None,
                created_by: "user:alice",
            })
            .await
            .unwrap();
    }
}

async fn all_open(vault: &Vault, n: u32) {
    for i in 0..n {
        let r = vault
            .reveal("alice", &format!("cred-{i}"), None)
            .await
            .unwrap();
        assert_eq!(r.value.expose_secret(), format!("value-{i}").as_bytes());
    }
}

fn opts(batch: u32) -> RewrapOptions {
    RewrapOptions {
        batch_size: batch,
        ..RewrapOptions::default()
    }
}

#[tokio::test]
async fn rotation_then_rewrap_moves_everything_and_is_idempotent() {
    let provider = Arc::new(FakeProvider::new("core", 1));
    let (_d, store, vault) = setup(provider.clone()).await;
    put_many(&vault, 25).await;
    provider.rotate();
    let mut calls = 0;
    let report = rewrap(
        store.clone(),
        provider.clone(),
        provider.clone(),
        &opts(7),
        &mut |_| calls += 1,
    )
    .await
    .unwrap();
    assert_eq!(report.total, 25);
    assert_eq!(report.rewrapped, 25);
    assert_eq!((report.skipped, report.failed), (0, 0));
    assert_eq!(report.target, "fake:core:v2");
    assert_eq!(calls, 4);
    let counts = store.count_versions_by_kek().await.unwrap();
    assert_eq!(counts, vec![(KekRef::new("fake", "core", 2), 25)]);
    // Version 1 can go: everything still opens without it.
    provider.retire(1);
    all_open(&vault, 25).await;

    let again = rewrap(store, provider.clone(), provider, &opts(7), &mut |_| {})
        .await
        .unwrap();
    assert_eq!((again.total, again.rewrapped, again.resumed), (0, 0, false));
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let provider = Arc::new(FakeProvider::new("core", 1));
    let (_d, store, vault) = setup(provider.clone()).await;
    put_many(&vault, 5).await;
    provider.rotate();
    let options = RewrapOptions {
        dry_run: true,
        ..opts(2)
    };
    let report = rewrap(
        store.clone(),
        provider.clone(),
        provider,
        &options,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.rewrapped, 5);
    let counts = store.count_versions_by_kek().await.unwrap();
    assert_eq!(counts, vec![(KekRef::new("fake", "core", 1), 5)]);
    assert!(store
        .get_provider_state(CURSOR_KEY)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_saved_cursor_is_resumed_and_cleared_at_the_end() {
    let provider = Arc::new(FakeProvider::new("core", 1));
    let (_d, store, vault) = setup(provider.clone()).await;
    put_many(&vault, 10).await;
    provider.rotate();
    // As if a run was killed after its first batch of 4.
    let target = KekRef::new("fake", "core", 2);
    let page = store
        .versions_for_rewrap(&KekFilter::Not(target), None, 4)
        .await
        .unwrap();
    let saved = format!(
        r#"{{"target":"fake:core:v2","cursor":"{}"}}"#,
        page.next.unwrap().as_str()
    );
    store
        .put_provider_state(CURSOR_KEY, saved.into_bytes())
        .await
        .unwrap();
    let report = rewrap(
        store.clone(),
        provider.clone(),
        provider.clone(),
        &opts(4),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert!(report.resumed);
    assert_eq!(report.rewrapped, 6);
    // The finished run cleared its cursor, so the next one scans from the start.
    let next = rewrap(
        store.clone(),
        provider.clone(),
        provider,
        &opts(4),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert!(!next.resumed);
    assert_eq!(next.rewrapped, 4);
    all_open(&vault, 10).await;
}

#[tokio::test]
async fn a_cursor_for_another_target_is_ignored() {
    let provider = Arc::new(FakeProvider::new("core", 1));
    let (_d, store, vault) = setup(provider.clone()).await;
    put_many(&vault, 3).await;
    provider.rotate();
    store
        .put_provider_state(
            CURSOR_KEY,
            br#"{"target":"fake:core:v9","cursor":"r1.99"}"#.to_vec(),
        )
        .await
        .unwrap();
    let report = rewrap(store, provider.clone(), provider, &opts(10), &mut |_| {})
        .await
        .unwrap();
    assert!(!report.resumed);
    assert_eq!(report.rewrapped, 3);
}

#[tokio::test]
async fn moving_to_another_provider_is_a_rewrap() {
    let old = Arc::new(FakeProvider::new("old", 1));
    let (_d, store, vault) = setup(old.clone()).await;
    put_many(&vault, 8).await;
    let new = Arc::new(FakeProvider::new("new", 1));
    let report = rewrap(store.clone(), old, new.clone(), &opts(3), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.rewrapped, 8);
    assert_eq!(report.target, "fake:new:v1");
    all_open(&vault_over(store, new), 8).await;
}

#[tokio::test]
async fn keys_that_do_not_unwrap_are_counted_and_left_alone() {
    let provider = Arc::new(FakeProvider::new("core", 1));
    let (_d, store, vault) = setup(provider.clone()).await;
    put_many(&vault, 4).await;
    provider.rotate();
    provider.retire(1);
    let report = rewrap(
        store.clone(),
        provider.clone(),
        provider,
        &opts(10),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!((report.rewrapped, report.failed), (0, 4));
    let counts = store.count_versions_by_kek().await.unwrap();
    assert_eq!(counts, vec![(KekRef::new("fake", "core", 1), 4)]);
}

#[tokio::test]
async fn throttle_waits_between_batches() {
    let provider = Arc::new(FakeProvider::new("core", 1));
    let (_d, store, vault) = setup(provider.clone()).await;
    put_many(&vault, 9).await;
    provider.rotate();
    let options = RewrapOptions {
        max_per_second: Some(3),
        ..opts(100)
    };
    let started = Instant::now();
    let report = rewrap(store, provider.clone(), provider, &options, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.rewrapped, 9);
    // Batches of 3 at 3/s: the third batch starts no earlier than 2 s in.
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
}

/// A provider that cannot be reached: every unwrap fails `Unavailable`.
#[derive(Debug)]
struct Unreachable(FakeProvider);

#[async_trait::async_trait]
impl KeyProvider for Unreachable {
    fn kind(&self) -> &str {
        self.0.kind()
    }
    fn active_kek(&self) -> Result<strongroom_crypto::KekRef, strongroom_crypto::ProviderError> {
        self.0.active_kek()
    }
    async fn wrap(
        &self,
        kek: &strongroom_crypto::KekRef,
        key: &strongroom_crypto::Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, strongroom_crypto::ProviderError> {
        self.0.wrap(kek, key, aad).await
    }
    async fn unwrap(
        &self,
        _wrapped: &WrappedKey,
        _aad: &[u8],
    ) -> Result<strongroom_crypto::Key256, strongroom_crypto::UnwrapError> {
        Err(strongroom_crypto::ProviderError::new(
            ProviderErrorKind::Unavailable,
            FakeProvider::KIND,
            "connection refused",
        )
        .into())
    }
    async fn health(&self) -> Result<(), strongroom_crypto::ProviderError> {
        self.0.health().await
    }
}

/// Each KEK in use is tried once: a retired one, and every one of another keyring, does not
/// open; a provider out of reach is an error, not "does not open".
#[tokio::test]
async fn a_sample_per_kek_says_which_ones_these_keys_open() {
    let provider = Arc::new(FakeProvider::new("core", 1));
    let (_d, store, vault) = setup(provider.clone()).await;
    put_many(&vault, 4).await;
    provider.rotate();
    vault
        .put(PutRequest {
            owner: "bob",
            name: "later",
            value: SecretBytes::from_slice(b"v2 value"),
            metadata: None,
            expected_version: None,
            created_by: "user:bob",
        })
        .await
        .unwrap();
    let summary = |samples: Vec<KekSample>| {
        samples
            .iter()
            .map(|s| (s.kek_text(), s.versions, s.opens))
            .collect::<Vec<_>>()
    };
    let sampled = sample_keks(store.as_ref(), provider.as_ref()).await;
    assert_eq!(
        summary(sampled.unwrap()),
        [
            ("fake:core:v1".to_owned(), 4, true),
            ("fake:core:v2".to_owned(), 1, true)
        ]
    );
    // One damaged data key under v1 does not make v1 look lost: the next version opens.
    let first = store
        .versions_for_rewrap(&KekFilter::Exactly(KekRef::new("fake", "core", 1)), None, 1)
        .await
        .unwrap()
        .items
        .remove(0);
    assert!(store
        .replace_wrapped_key(
            &first.owner,
            &first.name,
            first.version,
            &first.kek,
            &first.wrapped_key,
            vec![7; first.wrapped_key.len()],
            &first.kek,
        )
        .await
        .unwrap());
    let sampled = sample_keks(store.as_ref(), provider.as_ref()).await;
    assert_eq!(
        summary(sampled.unwrap()),
        [
            ("fake:core:v1".to_owned(), 4, true),
            ("fake:core:v2".to_owned(), 1, true)
        ]
    );
    provider.retire(1);
    let sampled = sample_keks(store.as_ref(), provider.as_ref()).await;
    assert_eq!(
        summary(sampled.unwrap()),
        [
            ("fake:core:v1".to_owned(), 4, false),
            ("fake:core:v2".to_owned(), 1, true)
        ]
    );
    // A provider of another key holds none of the KEKs these versions name.
    let other = FakeProvider::new("other", 2);
    let sampled = sample_keks(store.as_ref(), &other).await.unwrap();
    assert!(sampled.iter().all(|s| !s.opens), "{sampled:?}");
    let down = Unreachable(FakeProvider::new("core", 2));
    let err = sample_keks(store.as_ref(), &down).await.unwrap_err();
    assert!(matches!(err, CoreError::Unavailable(_)), "{err:?}");
}
