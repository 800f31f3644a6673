//! Crash test: a child process writes under load with 8 concurrent writers and prints each
//! acknowledged version *after* its acknowledgement; the parent SIGKILLs it at random
//! moments, many times. After each kill the database must pass its integrity check and
//! every acknowledged version must be present with exactly its bytes. Half the writers put
//! with the audit record in the same transaction (`put_version_audited`): after each kill
//! the audit chain must verify, and their versions and put records must match one for one.
//! A quarter of the credentials keep 3 active versions and their tombstones 4 numbers back
//! (`max_versions`, `keep_destroyed`): each put on them also destroys a version and deletes
//! a row in its transaction, and after each kill their rows must be exactly the window
//! behind their latest version, which no acknowledged version is ahead of.
//!
//! The child is this test binary re-invoked with `STRONGROOM_CRASH_CHILD` set (the test
//! `crash_child_entry_point` is a no-op otherwise).
//!
//! Knobs: `STRONGROOM_CRASH_KILLS` (default 30 for SQLite, 10 for PostgreSQL).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strongroom_store::postgres::{PostgresOptions, PostgresStore};
use strongroom_store::sqlite::{SqliteOptions, SqliteStore};
use strongroom_store::testing::test_value;
use strongroom_store::{KekRef, NewVersion, Store, StoreError, VersionState};
use time::OffsetDateTime;

const CHILD_ENV: &str = "STRONGROOM_CRASH_CHILD";
const WRITERS: usize = 8;
const CREDENTIALS: u64 = 24;

fn value_len(version: u32) -> usize {
    if version.checked_rem(13) == Some(0) {
        64 * 1024
    } else {
        100 + (version as usize * 797) % 6000
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn owner_of(i: u64) -> String {
    format!("crash-owner-{}", i % 3)
}

fn name_of(i: u64) -> String {
    format!("cred.{i}")
}

/// Active versions a retained credential keeps (see [`retained`]).
const RETAINED_ACTIVE: u32 = 3;
/// How many numbers behind its latest version a retained credential keeps tombstones.
const RETAINED_TOMBSTONES: u32 = 4;

/// Whether credential `i` is put under retention and tombstone trimming. Its puts carry no
/// audit record, so that the audited ones still match their records one for one (trimming
/// deletes rows their records outlive).
fn retained(i: u64) -> bool {
    i.is_multiple_of(4)
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

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ (u64::from(std::process::id()) << 32) | 1
}

async fn open_target(target: &str) -> Arc<dyn Store> {
    if let Some(path) = target.strip_prefix("sqlite:") {
        Arc::new(
            SqliteStore::open(path, SqliteOptions::default())
                .await
                .unwrap(),
        )
    } else if let Some(rest) = target.strip_prefix("postgres:") {
        let (schema, url) = rest.split_once('|').unwrap();
        let mut o = PostgresOptions::default();
        o.schema = Some(schema.to_owned());
        o.max_connections = WRITERS + 2;
        Arc::new(PostgresStore::connect(url, o).await.unwrap())
    } else {
        panic!("unknown crash target {target}")
    }
}

/// The child: writes until killed.
#[test]
fn crash_child_entry_point() {
    let Ok(target) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = open_target(&target).await;
        // Sealed before any write, as a server does at start (a no-op once sealed).
        store
            .audit_log()
            .unwrap()
            .audit_seal_genesis(audit_key().head(0, strongroom_store::audit::GENESIS))
            .await
            .unwrap();
        let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        {
            // Start on a fresh line: the test harness may have printed a partial line.
            let mut out = stdout.lock().unwrap();
            writeln!(out).unwrap();
            out.flush().unwrap();
        }
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let store = Arc::clone(&store);
            let stdout = Arc::clone(&stdout);
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(seed() ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                loop {
                    let i = rng.next() % CREDENTIALS;
                    let (owner, name) = (owner_of(i), name_of(i));
                    let latest = match store.latest_version(&owner, &name).await {
                        Ok(l) => l,
                        Err(_) => {
                            // The database may be restarting (server-crash variant).
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    let version = latest + 1;
                    let value = test_value(&owner, &name, version, value_len(version));
                    let hash = fnv(&value);
                    let mut nv = NewVersion::new(
                        owner.as_str(),
                        name.as_str(),
                        version,
                        value,
                        test_value(&name, &owner, version, 40),
                        KekRef::new("local", "k1", 1),
                        format!("writer{w}"),
                        OffsetDateTime::now_utc(),
                    );
                    if retained(i) {
                        nv.max_versions = RETAINED_ACTIVE;
                        nv.keep_destroyed = RETAINED_TOMBSTONES;
                    } else {
                        nv.max_versions = 1_000_000;
                    }
                    // Odd writers put with the audit record in the same transaction.
                    let put = if w % 2 == 1 && !retained(i) {
                        let mut e = audit_event(&owner, &name, version);
                        e.principal_id = format!("writer{w}");
                        store
                            .put_version_audited(nv, Arc::new(audit_key()), e)
                            .await
                            .map(|_| ())
                    } else {
                        store.put_version(nv).await.map(|_| ())
                    };
                    match put {
                        Ok(_) => {
                            let mut out = stdout.lock().unwrap();
                            writeln!(out, "ACK {owner} {name} {version} {hash:016x}").unwrap();
                            out.flush().unwrap();
                        }
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) if e.is_transient() => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Ack {
    owner: String,
    name: String,
    version: u32,
    hash: u64,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let line = line.trim_end();
    let rest = &line[line.find("ACK ")? + 4..];
    let mut parts = rest.split(' ');
    let ack = Ack {
        owner: parts.next()?.to_owned(),
        name: parts.next()?.to_owned(),
        version: parts.next()?.parse().ok()?,
        hash: u64::from_str_radix(parts.next()?, 16).ok()?,
    };
    Some(ack)
}

/// Runs the child against `target` until a random moment after its first ack, SIGKILLs it,
/// and returns the complete ack lines it printed.
fn run_and_kill(target: &str, rng: &mut Rng) -> Vec<Ack> {
    run_and_kill_with(target, rng, || {})
}

/// As [`run_and_kill`], running `at_crash` at the random moment, before the child is killed.
fn run_and_kill_with(target: &str, rng: &mut Rng, at_crash: impl FnOnce()) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, target)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (first_tx, first_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        let mut first = Some(first_tx);
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // A line cut by the kill has no newline: it was never fully printed.
            if buf.last() != Some(&b'\n') {
                break;
            }
            if let Some(ack) = parse_ack(&String::from_utf8_lossy(&buf)) {
                acks.push(ack);
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
        }
        acks
    });
    first_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the child acknowledged nothing within 60 s");
    std::thread::sleep(Duration::from_millis(30 + rng.next() % 900));
    at_crash();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap()
}

fn audit_key() -> strongroom_store::audit::HeadKey {
    strongroom_store::audit::HeadKey::new([4; 32])
}

fn audit_event(owner: &str, name: &str, version: u32) -> strongroom_store::audit::Event {
    strongroom_store::audit::Event {
        time: OffsetDateTime::now_utc(),
        principal_kind: "user".into(),
        principal_id: String::new(),
        action: "put".into(),
        owner: Some(owner.into()),
        name: Some(name.into()),
        version: Some(version),
        outcome: "ok".into(),
        status: 201,
        request_id: None,
        client_addr: None,
        on_behalf_of: None,
        destination: None,
        error_code: None,
    }
}

/// The audit chain verifies, and the audited writers' versions and their put records match
/// one for one: neither was ever committed without the other.
async fn verify_audited_puts(store: &dyn Store) {
    let log = store.audit_log().unwrap();
    let records = strongroom_store::testing::audit_verify_all(&*log, &audit_key())
        .await
        .expect("the audit chain verifies after the kill");
    let mut recorded = std::collections::BTreeSet::new();
    let mut after = 0;
    loop {
        let batch = log.audit_scan(after, 1000).await.unwrap();
        let Some(last) = batch.last() else { break };
        after = last.seq;
        for r in &batch {
            let e = &r.event;
            recorded.insert((
                e.owner.clone().unwrap(),
                e.name.clone().unwrap(),
                e.version.unwrap(),
                e.principal_id.clone(),
            ));
        }
    }
    assert_eq!(recorded.len() as u64, records);
    let mut stored = std::collections::BTreeSet::new();
    for i in (0..CREDENTIALS).filter(|&i| !retained(i)) {
        let (owner, name) = (owner_of(i), name_of(i));
        let Ok(c) = store.get_credential(&owner, &name).await else {
            continue;
        };
        for v in c.versions {
            let w: usize = v.created_by.trim_start_matches("writer").parse().unwrap();
            if w % 2 == 1 {
                stored.insert((owner.clone(), name.clone(), v.version, v.created_by.clone()));
            }
        }
    }
    assert_eq!(stored, recorded, "audited puts and their records differ");
}

/// A retained credential's rows are exactly the window behind its latest version: the newest
/// [`RETAINED_ACTIVE`] active, tombstones back to [`RETAINED_TOMBSTONES`] numbers behind, none
/// older; no acknowledged version is past the latest. Returns the versions still active
/// (`None`: the credential has none, and no version of it was acknowledged).
async fn verify_retained(
    store: &dyn Store,
    i: u64,
    acks: &[Ack],
) -> Option<std::ops::RangeInclusive<u32>> {
    let (owner, name) = (owner_of(i), name_of(i));
    let acked = acks
        .iter()
        .filter(|a| a.owner == owner && a.name == name)
        .map(|a| a.version)
        .max();
    let c = match store.get_credential(&owner, &name).await {
        Ok(c) => c,
        Err(StoreError::NotFound) => {
            assert_eq!(
                acked, None,
                "LOST: {name} is gone, but versions were acknowledged"
            );
            return None;
        }
        Err(e) => panic!("{name}: {e}"),
    };
    let latest = c.summary.latest_version;
    assert!(
        acked <= Some(latest),
        "LOST: {name} acknowledged {acked:?}, latest {latest}"
    );
    assert_eq!(c.summary.current_version, Some(latest), "{name}");
    let active = latest.saturating_sub(RETAINED_ACTIVE - 1).max(1)..=latest;
    let kept = latest.saturating_sub(RETAINED_TOMBSTONES).max(1)..=latest;
    let mut rows: Vec<(u32, VersionState)> =
        c.versions.iter().map(|v| (v.version, v.state)).collect();
    let want: Vec<(u32, VersionState)> = kept
        .rev()
        .map(|v| {
            let state = if active.contains(&v) {
                VersionState::Active
            } else {
                VersionState::Destroyed
            };
            (v, state)
        })
        .collect();
    rows.sort_by_key(|&(v, _)| std::cmp::Reverse(v));
    assert_eq!(rows, want, "{name}: rows after the kill (latest {latest})");
    Some(active)
}

async fn verify(store: &dyn Store, acks: &[Ack]) {
    verify_audited_puts(store).await;
    let mut active = BTreeMap::new();
    for i in (0..CREDENTIALS).filter(|&i| retained(i)) {
        active.insert(name_of(i), verify_retained(store, i, acks).await);
    }
    for a in acks {
        // Retention may have destroyed an acknowledged version of a retained credential
        // since (by a later put); what is still active must hold its bytes.
        if active
            .get(&a.name)
            .is_some_and(|live| !live.as_ref().is_some_and(|l| l.contains(&a.version)))
        {
            continue;
        }
        let got = store
            .get_version(&a.owner, &a.name, Some(a.version))
            .await
            .unwrap_or_else(|e| panic!("LOST acknowledged {a:?}: {e}"));
        assert_eq!(fnv(&got.sealed_value), a.hash, "bytes differ for {a:?}");
        assert_eq!(
            got.sealed_value,
            test_value(&a.owner, &a.name, a.version, value_len(a.version))
        );
        assert_eq!(
            got.wrapped_key,
            test_value(&a.name, &a.owner, a.version, 40)
        );
    }
}

fn kills(default: usize) -> usize {
    std::env::var("STRONGROOM_CRASH_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(default)
}

/// Folds one run's acks into `all`, asserting no version was acknowledged twice.
fn record(all: &mut BTreeMap<(String, String, u32), u64>, acks: &[Ack]) {
    for a in acks {
        let prev = all.insert((a.owner.clone(), a.name.clone(), a.version), a.hash);
        assert!(prev.is_none(), "version acknowledged twice: {a:?}");
    }
}

fn report(backend: &str, kills: usize, all: &BTreeMap<(String, String, u32), u64>, t: Instant) {
    // Straight to the descriptor so it shows even when the harness captures output.
    let _ = writeln!(
        std::io::stderr(),
        "crash test ({backend}): {kills} SIGKILLs, {} acknowledged versions verified, 0 lost, \
         audit chain verified, audited puts and their records one for one, retained \
         credentials' rows exactly their window, {:.1} s",
        all.len(),
        t.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_loses_no_acknowledged_write_under_sigkill() {
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let target = format!("sqlite:{}", path.display());
    let mut rng = Rng(seed());
    let mut all = BTreeMap::new();
    let n = kills(30);
    for round in 0..n {
        let acks = tokio::task::block_in_place(|| run_and_kill(&target, &mut rng));
        assert!(!acks.is_empty(), "round {round}: no acks");
        record(&mut all, &acks);
        let store = SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap();
        assert_eq!(
            store.integrity_check().await.unwrap(),
            "ok",
            "round {round}"
        );
        verify(&store, &acks).await;
        store.close().await;
    }
    // Finally, everything acknowledged in any round is still there.
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let acks: Vec<Ack> = all
        .iter()
        .map(|((owner, name, version), hash)| Ack {
            owner: owner.clone(),
            name: name.clone(),
            version: *version,
            hash: *hash,
        })
        .collect();
    verify(&store, &acks).await;
    store.close().await;
    report(
        "sqlite, PRAGMA integrity_check ok after each kill",
        n,
        &all,
        t,
    );
}

/// The Postgres URL, or `None` after a loud notice; panics if Postgres is required.
fn postgres_url(what: &str) -> Option<String> {
    match std::env::var("STRONGROOM_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("STRONGROOM_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "STRONGROOM_REQUIRE_POSTGRES=1 but STRONGROOM_TEST_POSTGRES_URL is unset"
            );
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPING {what}: STRONGROOM_TEST_POSTGRES_URL is unset ***\n"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_loses_no_acknowledged_write_when_the_client_is_killed() {
    let Some(url) = postgres_url("the PostgreSQL client-kill crash test") else {
        return;
    };
    let t = Instant::now();
    let schema = format!("crash_{}_{}", std::process::id(), seed() % 1_000_000);
    let target = format!("postgres:{schema}|{url}");
    let mut rng = Rng(seed());
    let mut all = BTreeMap::new();
    let n = kills(10);
    let mut o = PostgresOptions::default();
    o.schema = Some(schema.clone());
    for _ in 0..n {
        let acks = tokio::task::block_in_place(|| run_and_kill(&target, &mut rng));
        record(&mut all, &acks);
        let store = PostgresStore::connect(&url, o.clone()).await.unwrap();
        verify(&store, &acks).await;
    }
    let store = PostgresStore::connect(&url, o).await.unwrap();
    let acks: Vec<Ack> = all
        .iter()
        .map(|((owner, name, version), hash)| Ack {
            owner: owner.clone(),
            name: name.clone(),
            version: *version,
            hash: *hash,
        })
        .collect();
    verify(&store, &acks).await;
    store.testing_drop_schema().await.unwrap();
    report("postgres, client killed", n, &all, t);
}

/// A PostgreSQL cluster of this test's own (fsync ON), started and crashed through
/// `scripts/lib/postgres.sh`, stopped on drop.
struct OwnCluster {
    tmp: String,
    pid: String,
    url: String,
}

/// This package's directory, read when the test runs: cargo sets `CARGO_MANIFEST_DIR` for the
/// tests it runs, and a test binary that cargo reused from another checkout (a shared
/// `CARGO_TARGET_DIR`) would otherwise read that checkout's files through its compiled-in path.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn postgres_sh() -> PathBuf {
    manifest_dir().join("../../scripts/lib/postgres.sh")
}

fn bash(script: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("bash")
        .arg(postgres_sh())
        .args(args)
        // Never the cluster the caller's environment points at: this one is our own.
        .env_remove("PG_PID")
        .env_remove("PG_TMP")
        .env_remove("PG_PORT")
        .env_remove("STRONGROOM_TEST_POSTGRES_URL")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "bash helper failed: {script}");
    String::from_utf8(out.stdout).unwrap()
}

impl OwnCluster {
    fn start() -> OwnCluster {
        let out = bash(
            r#"source "$1" && pg_start on >&2 && printf '%s\n%s\n%s\n' "$PG_TMP" "$PG_PID" "$STRONGROOM_TEST_POSTGRES_URL" && "$PG_BIN/psql" "$STRONGROOM_TEST_POSTGRES_URL" -Atc 'SHOW fsync'"#,
            &[],
        );
        let mut lines = out.lines().map(str::to_owned);
        let cluster = OwnCluster {
            tmp: lines.next().unwrap(),
            pid: lines.next().unwrap(),
            url: lines.next().unwrap(),
        };
        assert_eq!(
            lines.next().as_deref(),
            Some("on"),
            "the crashed server must fsync"
        );
        cluster
    }

    /// SIGKILLs the server and its children, then starts it again (crash recovery).
    fn crash_restart(&mut self) {
        let out = bash(
            r#"source "$1" && PG_TMP=$2 && PG_PID=$3 && pg_crash_restart >&2 && echo "$PG_PID""#,
            &[&self.tmp, &self.pid],
        );
        self.pid = out.trim().to_owned();
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg("-c")
            .arg(r#"source "$1" && PG_TMP=$2 && PG_PID=$3 && pg_stop"#)
            .arg("bash")
            .arg(postgres_sh())
            .args([&self.tmp, &self.pid])
            .env_remove("PG_PID")
            .env_remove("PG_TMP")
            .stdin(Stdio::null())
            .status();
    }
}

/// The server itself is SIGKILLed (its own cluster, fsync ON) while the child writes, then
/// restarted while the child keeps writing; then the child is killed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_loses_no_acknowledged_write_when_the_server_is_killed() {
    if postgres_url("the PostgreSQL server-crash test").is_none() {
        return;
    }
    let t = Instant::now();
    let mut cluster = tokio::task::block_in_place(OwnCluster::start);
    let url = cluster.url.clone();
    let target = format!("postgres:crash_server|{url}");
    let mut rng = Rng(seed());
    let mut all = BTreeMap::new();
    let n = kills(6);
    let mut o = PostgresOptions::default();
    o.schema = Some("crash_server".into());
    for _ in 0..n {
        let acks = tokio::task::block_in_place(|| {
            run_and_kill_with(&target, &mut rng, || {
                cluster.crash_restart();
                // Let the child reconnect and write to the recovered server for a moment.
                std::thread::sleep(Duration::from_millis(300));
            })
        });
        record(&mut all, &acks);
        let store = PostgresStore::connect(&url, o.clone()).await.unwrap();
        verify(&store, &acks).await;
    }
    let acks: Vec<Ack> = all
        .iter()
        .map(|((owner, name, version), hash)| Ack {
            owner: owner.clone(),
            name: name.clone(),
            version: *version,
            hash: *hash,
        })
        .collect();
    let store = PostgresStore::connect(&url, o).await.unwrap();
    verify(&store, &acks).await;
    drop(store);
    tokio::task::block_in_place(move || drop(cluster));
    report(
        "postgres, server SIGKILLed and restarted, fsync on",
        n,
        &all,
        t,
    );
}
