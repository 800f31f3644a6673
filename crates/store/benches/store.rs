//! Storage benchmarks (a small custom harness; run by `scripts/bench-store`).
//!
//! - put: 1 and 16 concurrent writers, each writing new versions of its own credential for a
//!   fixed time (retention at the default 10); reports ops/s and per-op latency.
//! - get and put at 10 k and 1 M stored versions (bulk-loaded: 10 versions per credential,
//!   512-byte values): `get_version` of the current version of a random credential with 1
//!   and 16 concurrent readers, and single-writer puts to random credentials.
//!
//! - audit queries at `--audit` records (appended through the real chain in batches of 4096;
//!   1,000 owners × 5 credential names, 20 principals, times 5 ms apart with one record in
//!   eight 0–2.5 s late): the time one page of 100 takes, newest first, by owner alone, by
//!   owner and name, by principal, by a one-minute window in the middle of the log, by the
//!   last hour, by an owner within a ten-minute window, and unfiltered.
//!
//! Every figure is the median of `--trials` runs.
//!
//! ```text
//! cargo bench -p strongroom-store --bench store -- [--backend sqlite|postgres|all]
//!     [--secs 5] [--trials 3] [--sizes 10000,1000000] [--audit 1000000] [--dir DIR]
//! ```
//! PostgreSQL runs only when `STRONGROOM_TEST_POSTGRES_URL` is set. SQLite files go under
//! `--dir` (default: the current directory), which must be on a real disk: on tmpfs an
//! fsync costs nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strongroom_store::postgres::{PostgresOptions, PostgresStore};
use strongroom_store::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use strongroom_store::testing::{bulk_name, bulk_owner, BulkSpec};
use strongroom_store::{KekRef, NewVersion, Store};
use time::OffsetDateTime;

const VALUE_LEN: usize = 512;
const VERSIONS_PER_CREDENTIAL: u32 = 10;

struct Args {
    backends: Vec<String>,
    secs: f64,
    trials: usize,
    sizes: Vec<u64>,
    audit: Vec<u64>,
    dir: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        backends: vec!["sqlite".into(), "postgres".into()],
        secs: 5.0,
        trials: 3,
        sizes: vec![10_000, 1_000_000],
        audit: vec![1_000_000],
        dir: PathBuf::from("."),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--backend" => {
                a.backends = match val.as_str() {
                    "all" => vec!["sqlite".into(), "postgres".into()],
                    b => vec![b.to_owned()],
                };
                i += 1;
            }
            "--secs" => {
                a.secs = val.parse().unwrap();
                i += 1;
            }
            "--trials" => {
                a.trials = val.parse().unwrap();
                i += 1;
            }
            "--sizes" => {
                a.sizes = match val.as_str() {
                    "none" => Vec::new(),
                    v => v.split(',').map(|s| s.parse().unwrap()).collect(),
                };
                i += 1;
            }
            "--audit" => {
                a.audit = match val.as_str() {
                    "none" => Vec::new(),
                    v => v.split(',').map(|s| s.parse().unwrap()).collect(),
                };
                i += 1;
            }
            "--dir" => {
                a.dir = PathBuf::from(val);
                i += 1;
            }
            _ => {} // cargo passes --bench
        }
        i += 1;
    }
    a
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A fresh, empty store of one backend, and how to dispose of it.
enum Fresh {
    Sqlite(SqliteStore, tempfile::TempDir),
    Postgres(PostgresStore),
}

impl Fresh {
    async fn new(backend: &str, a: &Args) -> Fresh {
        match backend {
            "sqlite" => {
                let dir = tempfile::Builder::new()
                    .prefix("strongroom-bench-")
                    .tempdir_in(&a.dir)
                    .unwrap();
                let mut o = SqliteOptions::default();
                if std::env::var("STRONGROOM_BENCH_SQLITE_SYNC").as_deref() == Ok("normal") {
                    o.synchronous = Synchronous::DangerNormal;
                }
                let s = SqliteStore::open(dir.path().join("bench.db"), o)
                    .await
                    .unwrap();
                Fresh::Sqlite(s, dir)
            }
            _ => {
                let url = std::env::var("STRONGROOM_TEST_POSTGRES_URL").unwrap();
                let mut o = PostgresOptions::default();
                o.max_connections = 32;
                o.schema = Some(format!(
                    "bench_{}_{}",
                    std::process::id(),
                    Instant::now().elapsed().as_nanos() ^ u128::from(rand_seed())
                ));
                Fresh::Postgres(PostgresStore::connect(&url, o).await.unwrap())
            }
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        match self {
            Fresh::Sqlite(s, _) => Arc::new(s.clone()),
            Fresh::Postgres(s) => Arc::new(s.clone()),
        }
    }

    async fn bulk_load(&self, spec: BulkSpec) {
        match self {
            Fresh::Sqlite(s, _) => s.testing_bulk_load(spec).await.unwrap(),
            Fresh::Postgres(s) => s.testing_bulk_load(spec).await.unwrap(),
        }
    }

    async fn dispose(self) {
        match self {
            Fresh::Sqlite(s, dir) => {
                s.close().await;
                drop(dir);
            }
            Fresh::Postgres(s) => s.testing_drop_schema().await.unwrap(),
        }
    }
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

fn new_version(owner: String, name: String, version: u32) -> NewVersion {
    NewVersion::new(
        owner,
        name,
        version,
        vec![0xC3; VALUE_LEN],
        vec![0x3C; 40],
        KekRef::new("bench", "k1", 1),
        "bench",
        OffsetDateTime::now_utc(),
    )
}

struct Run {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn pct(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

/// `tasks` concurrent loops of `op` for `secs`.
async fn drive<F, Fut>(tasks: usize, secs: f64, op: F) -> Run
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let op = Arc::clone(&op);
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                op(t, i).await;
                lat.push(t0.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for h in handles {
        latencies.extend(h.await.unwrap());
    }
    Run {
        ops: latencies.len(),
        elapsed: start.elapsed(),
        latencies,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ms(d: f64) -> String {
    format!("{:.3} ms", d * 1e3)
}

struct Summary {
    max: f64,
    mean: f64,
    rate: f64,
    p50: f64,
    p99: f64,
}

fn summarize(runs: Vec<Run>) -> Summary {
    let mut rates = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut max: f64 = 0.0;
    let mut sum = 0.0;
    let mut n = 0usize;
    for mut r in runs {
        for l in &r.latencies {
            max = max.max(l.as_secs_f64());
            sum += l.as_secs_f64();
            n += 1;
        }
        rates.push(r.rate());
        p50.push(r.pct(0.5).as_secs_f64());
        p99.push(r.pct(0.99).as_secs_f64());
    }
    Summary {
        max,
        mean: sum / n.max(1) as f64,
        rate: median(rates),
        p50: median(p50),
        p99: median(p99),
    }
}

fn line(backend: &str, what: &str, conc: usize, s: &Summary) {
    if std::env::var("STRONGROOM_BENCH_DEBUG").is_ok() {
        eprintln!("  max {} mean {}", ms(s.max), ms(s.mean));
    }
    println!(
        "| {backend} | {what} | {conc} | {:.0} ops/s | {} | {} |",
        s.rate,
        ms(s.p50),
        ms(s.p99)
    );
}

/// Puts with 1 and with 16 writers, trials interleaved (1, 16, 1, 16, ...) so that the
/// machine's noise hits both alike.
async fn bench_put(backend: &str, a: &Args) -> Vec<(usize, Summary)> {
    let mut runs: Vec<(usize, Vec<Run>)> = vec![(1, Vec::new()), (16, Vec::new())];
    for trial in 0..a.trials {
        for (writers, runs) in runs.iter_mut() {
            let fresh = Fresh::new(backend, a).await;
            let store = fresh.store();
            let run = drive(*writers, a.secs, move |w, i| {
                let store = Arc::clone(&store);
                async move {
                    let v = u32::try_from(i + 1).unwrap();
                    store
                        .put_version(new_version(
                            format!("writer-{w}"),
                            format!("cred-{trial}"),
                            v,
                        ))
                        .await
                        .unwrap();
                }
            })
            .await;
            runs.push(run);
            fresh.dispose().await;
        }
    }
    runs.into_iter().map(|(w, r)| (w, summarize(r))).collect()
}

async fn bench_sized(backend: &str, a: &Args, versions: u64) {
    let credentials = versions / u64::from(VERSIONS_PER_CREDENTIAL);
    let fresh = Fresh::new(backend, a).await;
    let t = Instant::now();
    fresh
        .bulk_load(BulkSpec {
            credentials,
            versions_per_credential: VERSIONS_PER_CREDENTIAL,
            value_len: VALUE_LEN,
        })
        .await;
    eprintln!(
        "  {backend}: bulk-loaded {versions} versions ({credentials} credentials) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let store = fresh.store();
    for readers in [1usize, 16] {
        let mut runs = Vec::new();
        // One warm-up trial, not counted.
        for trial in 0..=a.trials {
            let store = Arc::clone(&store);
            let seed = rand_seed();
            let run = drive(readers, a.secs.min(3.0), move |r, i| {
                let store = Arc::clone(&store);
                let mut rng = Rng(seed ^ ((r as u64 + 1) << 40) ^ i.wrapping_mul(0x9e37_79b9));
                let c = rng.next() % credentials;
                async move {
                    let v = store
                        .get_version(&bulk_owner(c), &bulk_name(c), None)
                        .await
                        .unwrap();
                    assert_eq!(v.sealed_value.len(), VALUE_LEN);
                }
            })
            .await;
            if trial > 0 {
                runs.push(run);
            }
        }
        line(
            backend,
            &format!("get @ {versions} versions"),
            readers,
            &summarize(runs),
        );
    }
    // Single-writer puts into random existing credentials (retention keeps the size flat).
    let mut runs = Vec::new();
    let next: Arc<std::sync::Mutex<std::collections::HashMap<u64, u32>>> = Arc::default();
    for _ in 0..a.trials {
        let store = Arc::clone(&store);
        let next = Arc::clone(&next);
        let seed = rand_seed();
        let run = drive(1, a.secs.min(3.0), move |_, i| {
            let store = Arc::clone(&store);
            let c = Rng(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).next() % credentials;
            let v = {
                let mut n = next.lock().unwrap();
                let e = n.entry(c).or_insert(VERSIONS_PER_CREDENTIAL);
                *e += 1;
                *e
            };
            async move {
                store
                    .put_version(new_version(bulk_owner(c), bulk_name(c), v))
                    .await
                    .unwrap();
            }
        })
        .await;
        runs.push(run);
    }
    line(
        backend,
        &format!("put @ {versions} versions"),
        1,
        &summarize(runs),
    );
    fresh.dispose().await;
}

type Window = (Option<OffsetDateTime>, Option<OffsetDateTime>);

/// An audit filter (the type is non-exhaustive: built field by field).
fn filter(
    owner: Option<String>,
    name: Option<String>,
    principal: Option<String>,
    (since, until): Window,
) -> strongroom_store::AuditFilter {
    let mut f = strongroom_store::AuditFilter::default();
    f.owner = owner;
    f.name = name;
    f.principal_id = principal;
    f.since = since;
    f.until = until;
    f
}

fn owner_of(r: &mut Rng) -> String {
    format!("owner-{:04}", r.next() % 1000)
}

fn name_of(r: &mut Rng) -> String {
    format!("cred-{}", r.next() % 5)
}

/// Appends `n` audit records, then times pages of 100 for each kind of query (see the
/// module docs): the median of `--trials` × 20 pages, each with another owner, name,
/// principal or window.
async fn bench_audit(backend: &str, a: &Args, n: u64) {
    use strongroom_store::audit::{Event, HeadKey, GENESIS};
    let fresh = Fresh::new(backend, a).await;
    let log = fresh.store().audit_log().unwrap();
    let key = Arc::new(HeadKey::new([7; 32]));
    log.audit_seal_genesis(key.head(0, GENESIS)).await.unwrap();
    let base = OffsetDateTime::now_utc() - time::Duration::milliseconds((n * 5) as i64);
    let mut rng = Rng(rand_seed() | 1);
    let started = Instant::now();
    let mut seq = 0u64;
    while seq < n {
        let batch = (n - seq).min(4096);
        let events = (0..batch)
            .map(|k| {
                let i = seq + k;
                let r = rng.next();
                let late = if r.is_multiple_of(8) {
                    (r >> 8) % 2_500
                } else {
                    0
                };
                let owner = r.wrapping_mul(31) >> 40;
                Event {
                    time: base + time::Duration::milliseconds((i * 5) as i64)
                        - time::Duration::milliseconds(late as i64),
                    principal_kind: "service".into(),
                    principal_id: format!("svc-{}", (r >> 16) % 20),
                    action: "reveal".into(),
                    owner: Some(format!("owner-{:04}", owner % 1000)),
                    name: Some(format!("cred-{}", (r >> 24) % 5)),
                    version: Some(1),
                    outcome: "ok".into(),
                    status: 200,
                    request_id: None,
                    client_addr: None,
                    on_behalf_of: None,
                    destination: None,
                    error_code: None,
                }
            })
            .collect();
        log.audit_append(key.clone(), events).await.unwrap();
        seq += batch;
    }
    eprintln!(
        "{backend}: {n} audit records appended in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // SQLite indexes behind the appends; the first query by owner catches up (not timed).
    let started = Instant::now();
    log.audit_query(
        &filter(Some("owner-0000".into()), None, None, (None, None)),
        None,
        1,
    )
    .await
    .unwrap();
    eprintln!(
        "{backend}: first query (indexes caught up) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let end = base + time::Duration::milliseconds((n * 5) as i64);
    let span_ms = (n * 5) as i64;
    type Make = Box<dyn Fn(&mut Rng) -> strongroom_store::AuditFilter>;
    let window = move |r: &mut Rng, minutes: i64| {
        let start = base + time::Duration::milliseconds((r.next() % span_ms.max(1) as u64) as i64)
            - time::Duration::minutes(minutes / 2);
        (Some(start), Some(start + time::Duration::minutes(minutes)))
    };
    let kinds: Vec<(&str, Make)> = vec![
        (
            "owner alone",
            Box::new(|r| filter(Some(owner_of(r)), None, None, (None, None))),
        ),
        (
            "owner and name",
            Box::new(|r| filter(Some(owner_of(r)), Some(name_of(r)), None, (None, None))),
        ),
        (
            "principal",
            Box::new(|r| {
                let principal = format!("svc-{}", r.next() % 20);
                filter(None, None, Some(principal), (None, None))
            }),
        ),
        (
            "a minute, mid-log",
            Box::new(move |r| filter(None, None, None, window(r, 1))),
        ),
        (
            "the last hour",
            Box::new(move |_| {
                let since = Some(end - time::Duration::hours(1));
                filter(None, None, None, (since, None))
            }),
        ),
        (
            "owner, 10 minutes",
            Box::new(move |r| filter(Some(owner_of(r)), None, None, window(r, 10))),
        ),
        (
            "unfiltered",
            Box::new(|_| filter(None, None, None, (None, None))),
        ),
    ];
    for (what, make) in kinds {
        let mut medians = Vec::new();
        for _ in 0..a.trials {
            let mut times = Vec::new();
            for _ in 0..20 {
                let f = make(&mut rng);
                let t = Instant::now();
                let page = log.audit_query(&f, None, 100).await.unwrap();
                times.push(t.elapsed().as_secs_f64());
                assert!(page.windows(2).all(|w| w[0].seq > w[1].seq));
            }
            medians.push(median(times));
        }
        println!(
            "| {backend} | audit page of 100 at {n} records: {what} | 1 | — | {} | — |",
            ms(median(medians))
        );
    }
    fresh.dispose().await;
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("| backend | operation | concurrency | throughput (median) | p50 latency | p99 latency |");
        println!("|---|---|---|---|---|---|");
        for backend in &a.backends {
            if backend == "postgres" && std::env::var("STRONGROOM_TEST_POSTGRES_URL").is_err() {
                eprintln!("*** skipping postgres: STRONGROOM_TEST_POSTGRES_URL is unset ***");
                continue;
            }
            for (writers, s) in bench_put(backend, &a).await {
                line(backend, "put (own credential)", writers, &s);
            }
            for &size in &a.sizes {
                bench_sized(backend, &a, size).await;
            }
            for &n in &a.audit {
                bench_audit(backend, &a, n).await;
            }
        }
    });
}
