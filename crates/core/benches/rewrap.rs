//! Rewrap rate with the local keyring.
//!
//! ```text
//! STRONGROOM_BENCH_DIR=target/bench-rewrap cargo bench -p strongroom-core --bench rewrap -- [VERSIONS ...]
//! (default sizes: 100000 1000000; scripts/bench-rewrap runs this and the remote providers)
//! ```
//!
//! For each size: bulk-load VERSIONS versions into a fresh SQLite store (10 per credential,
//! the store's testing helper), give each a genuine data key wrapped by local keyring
//! version 1 (a first rewrap from a stand-in provider, also timed), `keys rotate`, then time
//! `strongroom_core::rewrap` moving every version to version 2: unwrap + wrap with the
//! keyring and a compare-and-swap per version, group-committed by the store, resume cursor
//! saved per batch of 1000. Afterwards every version must be under version 2.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use strongroom_core::{rewrap, RewrapOptions};
use strongroom_crypto::{
    KekRef, Key256, KeyProvider, OsRandom, ProviderError, ProviderErrorKind, UnwrapError,
    WrappedKey,
};
use strongroom_keys::local::{self, LocalKeyring};
use strongroom_store::sqlite::SqliteStore;
use strongroom_store::testing::BulkSpec;
use strongroom_store::Store;
use time::OffsetDateTime;

/// Stands in for the `bench/k1/1` KEK of bulk-loaded rows: every "wrapped key" unwraps to
/// one fixed data key. Only for seeding this benchmark.
#[derive(Debug)]
struct Seed;

#[async_trait]
impl KeyProvider for Seed {
    fn kind(&self) -> &str {
        "bench"
    }
    fn active_kek(&self) -> Result<KekRef, ProviderError> {
        Ok(KekRef {
            provider: "bench".into(),
            key_id: "k1".into(),
            version: 1,
        })
    }
    async fn wrap(&self, _: &KekRef, _: &Key256, _: &[u8]) -> Result<WrappedKey, ProviderError> {
        Err(ProviderError::new(
            ProviderErrorKind::Other,
            "bench",
            "seed only unwraps",
        ))
    }
    async fn unwrap(&self, _: &WrappedKey, _: &[u8]) -> Result<Key256, UnwrapError> {
        Ok(Key256::from_slice(&[7u8; 32]).expect("32 bytes"))
    }
}

fn main() {
    // `--seed-dir DIR N`: leave N versions wrapped by a fresh local keyring in DIR (the
    // `serve --dev` layout: DIR/strongroom.db, DIR/keyring.json) for `strongroom rewrap`
    // benchmarks against remote providers (scripts/bench-rewrap).
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--seed-dir") {
        let dir = std::path::PathBuf::from(&args[i + 1]);
        let n: u64 = args[i + 2].parse().expect("N");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(seed_dir(&dir, n));
        return;
    }
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100_000, 1_000_000]
    } else {
        sizes
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for n in sizes {
        rt.block_on(run(n));
    }
}

async fn seed_dir(dir: &std::path::Path, versions: u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let sqlite = SqliteStore::open_dir(dir).await.expect("store");
    sqlite
        .testing_bulk_load(BulkSpec {
            credentials: versions.div_ceil(10),
            versions_per_credential: 10,
            value_len: 64,
        })
        .await
        .expect("bulk load");
    let ring_path = dir.join("keyring.json");
    local::generate(&ring_path, OffsetDateTime::now_utc(), &OsRandom).expect("keyring");
    let ring = Arc::new(LocalKeyring::open(&ring_path).expect("open keyring"));
    let store: Arc<dyn Store> = Arc::new(sqlite.clone());
    let seed = rewrap(
        store,
        Arc::new(Seed),
        ring,
        &RewrapOptions::default(),
        &mut |_| {},
    )
    .await
    .expect("seed rewrap");
    println!(
        "seeded {} versions under local v1 in {}",
        seed.rewrapped,
        dir.display()
    );
    sqlite.close().await;
}

async fn run(versions: u64) {
    // A real disk (fsync matters): STRONGROOM_BENCH_DIR, else the system temp dir.
    let dir = match std::env::var_os("STRONGROOM_BENCH_DIR") {
        Some(d) => {
            std::fs::create_dir_all(&d).expect("bench dir");
            tempfile::tempdir_in(d)
        }
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let sqlite = SqliteStore::open_dir(dir.path()).await.expect("store");
    let t = Instant::now();
    sqlite
        .testing_bulk_load(BulkSpec {
            credentials: versions / 10,
            versions_per_credential: 10,
            value_len: 64,
        })
        .await
        .expect("bulk load");
    let store: Arc<dyn Store> = Arc::new(sqlite.clone());
    println!(
        "rewrap bench: {versions} versions bulk-loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let ring_path = dir.path().join("keyring.json");
    local::generate(&ring_path, OffsetDateTime::now_utc(), &OsRandom).expect("keyring");
    let ring = Arc::new(LocalKeyring::open(&ring_path).expect("open keyring"));
    let options = RewrapOptions::default();

    let t = Instant::now();
    let seed = rewrap(
        store.clone(),
        Arc::new(Seed),
        ring.clone(),
        &options,
        &mut |_| {},
    )
    .await
    .expect("seed rewrap");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(seed.rewrapped, versions);
    println!(
        "  seed (stand-in -> local v1, wrap only): {versions} in {secs:.1} s = {:.0}/s",
        versions as f64 / secs
    );

    local::rotate(&ring_path, OffsetDateTime::now_utc(), &OsRandom).expect("rotate");
    ring.reload().expect("reload");
    let t = Instant::now();
    let report = rewrap(
        store.clone(),
        ring.clone(),
        ring.clone(),
        &options,
        &mut |_| {},
    )
    .await
    .expect("rewrap");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(report.rewrapped, versions);
    assert_eq!((report.skipped, report.failed), (0, 0));
    let counts = store.count_versions_by_kek().await.expect("counts");
    assert_eq!(counts.len(), 1);
    assert_eq!(counts[0].1, versions);
    assert_eq!(counts[0].0.version, 2);
    println!(
        "  rewrap local v1 -> v2 (unwrap + wrap + CAS): {versions} in {secs:.1} s = {:.0}/s",
        versions as f64 / secs
    );
    sqlite.close().await;
}
