//! The conformance suite and SQLite-specific checks against the embedded SQLite backend.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use strongroom_store::sqlite::{SqliteOptions, SqliteStore, DB_FILE_NAME};
use strongroom_store::testing::{test_value, TestBackend};
use strongroom_store::{KekRef, NewVersion, Store, StoreError};
use time::OffsetDateTime;

/// One temp dir (one database file) per test.
struct SqliteBackend {
    dir: tempfile::TempDir,
    opened: Mutex<Vec<SqliteStore>>,
}

impl SqliteBackend {
    fn path(&self) -> PathBuf {
        self.dir.path().join(DB_FILE_NAME)
    }
}

#[async_trait]
impl TestBackend for SqliteBackend {
    async fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        let store = SqliteStore::open(self.path(), SqliteOptions::default()).await?;
        self.opened.lock().unwrap().push(store.clone());
        Ok(Arc::new(store))
    }

    async fn raw_secret_columns(
        &self,
        owner: &str,
        name: &str,
        version: u32,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        let store = SqliteStore::open(self.path(), SqliteOptions::default()).await?;
        let raw = store.testing_raw_secret_columns(owner, name, version).await;
        store.close().await;
        raw
    }

    async fn set_schema_version(&self, version: u32) -> Result<(), StoreError> {
        let opened: Vec<SqliteStore> = self.opened.lock().unwrap().drain(..).collect();
        for s in opened {
            s.close().await;
        }
        SqliteStore::testing_set_schema_version(&self.path(), version)
    }

    async fn raw_audit_time_marks(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        let store = SqliteStore::open(self.path(), SqliteOptions::default()).await?;
        let marks = store.testing_audit_time_marks().await;
        store.close().await;
        marks
    }

    async fn raw_audit_late_marks(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        let store = SqliteStore::open(self.path(), SqliteOptions::default()).await?;
        let marks = store.testing_audit_late_marks().await;
        store.close().await;
        marks
    }

    async fn audit_seq_bounds(
        &self,
        since: Option<i64>,
        until: Option<i64>,
    ) -> Result<(i64, i64), StoreError> {
        let store = SqliteStore::open(self.path(), SqliteOptions::default()).await?;
        let bounds = store.testing_audit_seq_bounds(since, until).await;
        store.close().await;
        bounds
    }

    async fn raw_allowance_rows(&self) -> Result<u64, StoreError> {
        let store = SqliteStore::open(self.path(), SqliteOptions::default()).await?;
        let rows = store.testing_allowance_rows().await;
        store.close().await;
        rows
    }
}

async fn backend() -> Option<Box<dyn TestBackend>> {
    Some(Box::new(SqliteBackend {
        dir: tempfile::tempdir().unwrap(),
        opened: Mutex::new(Vec::new()),
    }))
}

strongroom_store::conformance_tests!(backend());

fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
}

/// After destroy and close (which checkpoints the WAL), the value's bytes are nowhere in
/// the database files: `secure_delete` zeroed the freed pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroyed_bytes_are_gone_from_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_dir(dir.path()).await.unwrap();
    let value = test_value("o", "n", 1, 64 * 1024);
    let wrapped = test_value("wrapped", "n", 1, 48);
    let nv = NewVersion::new(
        "o",
        "n",
        1,
        value.clone(),
        wrapped.clone(),
        KekRef::new("local", "k", 1),
        "t",
        t0(),
    );
    store.put_version(nv).await.unwrap();
    store.close().await;
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let all_files = || {
        let mut bytes = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        bytes
    };
    assert!(
        contains(&all_files(), &value[1000..1064]),
        "sanity: the value is on disk"
    );

    let store = SqliteStore::open_dir(dir.path()).await.unwrap();
    assert!(store.destroy_version("o", "n", 1, t0()).await.unwrap());
    store.close().await;
    let files = all_files();
    for chunk in [
        &value[..32],
        &value[30_000..30_032],
        &value[65_000..65_032],
        &wrapped[..32],
    ] {
        assert!(!contains(&files, chunk), "destroyed bytes still on disk");
    }
}

#[tokio::test]
async fn files_are_private_and_journal_is_wal() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = SqliteStore::open_dir(&data).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join(DB_FILE_NAME)), 0o600);
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    let nv = NewVersion::new(
        "o",
        "n",
        1,
        vec![1],
        vec![2],
        KekRef::new("l", "k", 1),
        "t",
        t0(),
    );
    store.put_version(nv).await.unwrap();
    assert!(data.join(format!("{DB_FILE_NAME}-wal")).exists());
    store.close().await;
    assert!(matches!(
        store.latest_version("o", "n").await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn not_a_database_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DB_FILE_NAME), vec![0x42; 8192]).unwrap();
    let err = SqliteStore::open_dir(dir.path()).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

/// `create: false` (operator commands) opens an existing database only: a missing one is
/// an error naming it, and neither the data dir nor the file appears.
#[tokio::test]
async fn without_create_a_missing_database_is_an_error_and_nothing_is_made() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut existing_only = SqliteOptions::default();
    existing_only.create = false;
    let err = match SqliteStore::open_dir_with(&dir, existing_only.clone()).await {
        Ok(_) => panic!("opened a database that does not exist"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string().contains("no Strongroom database at"),
        "{err}"
    );
    assert!(!dir.exists());

    SqliteStore::open_dir(&dir).await.unwrap().close().await;
    let store = SqliteStore::open_dir_with(&dir, existing_only)
        .await
        .unwrap();
    store.close().await;
}

/// Concurrent `touch_last_used` calls are applied as shared write jobs: every caller still
/// gets its own answer (`NotFound` for a missing credential), every credential ends with
/// the latest time given, and a touch after close fails instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_touches_are_batched_and_each_answered() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_dir(dir.path()).await.unwrap();
    for i in 0..8 {
        let nv = NewVersion::new(
            "o",
            format!("n{i}"),
            1,
            vec![1],
            vec![2],
            KekRef::new("l", "k", 1),
            "t",
            t0(),
        );
        store.put_version(nv).await.unwrap();
    }
    // Uses out of order, within the few minutes nodes' clocks may differ by (a time further
    // ahead of a use is replaced by it: `LAST_USED_AHEAD_MS`).
    let mut tasks = Vec::new();
    for k in 0..400i64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("n{}", k % 10); // n8 and n9 do not exist
            let at = t0() + time::Duration::milliseconds(k * 500);
            (k, s.touch_last_used("o", &name, at).await)
        }));
    }
    for t in tasks {
        let (k, result) = t.await.unwrap();
        if k % 10 >= 8 {
            assert!(
                matches!(result, Err(StoreError::NotFound)),
                "{k}: {result:?}"
            );
        } else {
            result.unwrap();
        }
    }
    for i in 0..8i64 {
        let c = store.get_credential("o", &format!("n{i}")).await.unwrap();
        // The largest k with k % 10 == i below 400.
        let last = 390 + i;
        assert_eq!(
            c.summary.last_used_at,
            Some(t0() + time::Duration::milliseconds(last * 500))
        );
    }
    store.close().await;
    assert!(matches!(
        store.touch_last_used("o", "n1", t0()).await,
        Err(StoreError::Unavailable(_))
    ));
}

/// The writer waits out a write lock held elsewhere (another process, a checkpoint) with
/// fine-grained retries, and gives up after `busy_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_waits_for_a_held_lock_then_gives_up_after_busy_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE_NAME);
    // A second: twenty times the 50 ms the lock is held below, for a slow machine to wake
    // the thread that lets it go (300 ms was six times).
    let mut options = SqliteOptions::default();
    options.busy_timeout = std::time::Duration::from_secs(1);
    let store = SqliteStore::open(&path, options).await.unwrap();
    let nv = |v: u32| {
        NewVersion::new(
            "o",
            "n",
            v,
            vec![1],
            vec![2],
            KekRef::new("l", "k", 1),
            "t",
            t0(),
        )
    };

    // Held for 50 ms: the put waits and succeeds.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        other.execute_batch("COMMIT").unwrap();
        other
    });
    store.put_version(nv(1)).await.unwrap();
    let other = release.join().unwrap();

    // Held past the busy timeout: the put fails (and the lock is still held when it does).
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = std::time::Instant::now();
    let err = store.put_version(nv(2)).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(950),
        "gave up after {waited:?}"
    );
    other.execute_batch("COMMIT").unwrap();
    store.put_version(nv(2)).await.unwrap();
    store.close().await;
}

fn audit_event(i: u64, owner: Option<&str>, name: Option<&str>) -> strongroom_store::audit::Event {
    strongroom_store::audit::Event {
        time: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_000 + i as i64),
        principal_kind: "service".into(),
        principal_id: "billing".into(),
        action: "reveal".into(),
        owner: owner.map(str::to_owned),
        name: name.map(str::to_owned),
        version: Some(1),
        outcome: "ok".into(),
        status: 200,
        request_id: Some(format!("req-{i}")),
        client_addr: None,
        on_behalf_of: None,
        destination: None,
        error_code: None,
    }
}

/// The per-credential audit index lags the appends (appends write no index page) and is
/// brought up to date in the background past a threshold and before every query by owner or
/// name, so queries never miss a record, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_index_lags_appends_but_queries_see_every_record() {
    use strongroom_store::audit::HeadKey;
    use strongroom_store::sqlite::AUDIT_INDEX_EVERY;
    use strongroom_store::{AuditFilter, AuditLog};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE_NAME);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let key = Arc::new(HeadKey::new([9; 32]));
    store
        .audit_seal_genesis(key.head(0, strongroom_store::audit::GENESIS))
        .await
        .unwrap();
    let owners = ["alice", "bob"];
    let mut events = Vec::new();
    for i in 0..10u64 {
        events.push(audit_event(
            i,
            Some(owners[(i % 2) as usize]),
            Some("zoom.key"),
        ));
    }
    events.push(audit_event(10, None, None)); // an anonymous 401: no owner, never indexed
    events.push(audit_event(11, Some("alice"), None)); // alice's list: no name
    store.audit_append(key.clone(), events).await.unwrap();
    assert_eq!(store.testing_audit_unindexed().await.unwrap(), 12);
    // By principal and by time first: these queries catch the index up themselves.
    let seqs =
        |rs: Vec<strongroom_store::audit::Record>| rs.iter().map(|r| r.seq).collect::<Vec<_>>();
    let mut billing = AuditFilter::default();
    billing.principal_id = Some("billing".into());
    billing.since = Some(OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_005));
    billing.until = Some(OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_008));
    assert_eq!(
        seqs(store.audit_query(&billing, None, 100).await.unwrap()),
        vec![8, 7, 6]
    );
    assert_eq!(store.testing_audit_unindexed().await.unwrap(), 0);
    let mut window = AuditFilter::default();
    window.since = billing.since;
    window.until = billing.until;
    assert_eq!(
        seqs(store.audit_query(&window, Some(8), 100).await.unwrap()),
        vec![7, 6]
    );

    let filter = |owner: Option<&str>, name: Option<&str>| {
        let mut f = AuditFilter::default();
        f.owner = owner.map(str::to_owned);
        f.name = name.map(str::to_owned);
        f
    };
    let alice = |name: Option<&str>| filter(Some("alice"), name);
    assert_eq!(
        seqs(store.audit_query(&alice(None), None, 100).await.unwrap()),
        vec![12, 9, 7, 5, 3, 1]
    );
    assert_eq!(store.testing_audit_unindexed().await.unwrap(), 0);
    assert_eq!(
        seqs(
            store
                .audit_query(&alice(Some("zoom.key")), Some(7), 2)
                .await
                .unwrap()
        ),
        vec![5, 3]
    );
    let by_name = filter(None, Some("zoom.key"));
    assert_eq!(
        store.audit_query(&by_name, None, 100).await.unwrap().len(),
        10
    );
    let empty_name = filter(None, Some(""));
    assert!(store
        .audit_query(&empty_name, None, 100)
        .await
        .unwrap()
        .is_empty());

    // Past the threshold a background job indexes without any query.
    let more: Vec<_> = (0..AUDIT_INDEX_EVERY)
        .map(|i| audit_event(100 + i, Some("carol"), Some("k")))
        .collect();
    store.audit_append(key.clone(), more).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut left = store.testing_audit_unindexed().await.unwrap();
    while left != 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        left = store.testing_audit_unindexed().await.unwrap();
    }
    assert_eq!(left, 0, "the background index job did not run");

    // Records appended and not yet indexed survive a restart and are found after it.
    store
        .audit_append(
            key.clone(),
            vec![audit_event(9000, Some("dave"), Some("k"))],
        )
        .await
        .unwrap();
    store.close().await;
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    assert_eq!(store.testing_audit_unindexed().await.unwrap(), 1);
    let dave = filter(Some("dave"), None);
    let found = store.audit_query(&dave, None, 10).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].seq, 12 + AUDIT_INDEX_EVERY + 1);
    store.close().await;

    // The index tables are outside the hash chain: rows planted there by a writer of the
    // database (here: dave's record filed under mallory, under another principal and name,
    // and marked as the first record of 1970's first seconds) return nothing that does not
    // match the record itself.
    let seq = (12 + AUDIT_INDEX_EVERY + 1) as i64;
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "INSERT INTO audit_by_credential (owner, name, seq) VALUES ('mallory', 'k', ?1)",
        [seq],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO audit_by_principal (principal_id, seq) VALUES ('planted', ?1)",
        [seq],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO audit_by_owner (owner, seq) VALUES ('mallory', ?1)",
        [seq],
    )
    .unwrap();
    raw.execute(
        "INSERT OR REPLACE INTO audit_time_marks (second, seq) VALUES (0, ?1), (2, ?1)",
        [seq],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO audit_by_name (name, seq) VALUES ('planted', ?1)",
        [seq],
    )
    .unwrap();
    drop(raw);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let mut planted = filter(Some("mallory"), None);
    assert!(store
        .audit_query(&planted, None, 10)
        .await
        .unwrap()
        .is_empty());
    planted = filter(Some("mallory"), Some("k"));
    assert!(store
        .audit_query(&planted, None, 10)
        .await
        .unwrap()
        .is_empty());
    planted = AuditFilter::default();
    planted.principal_id = Some("planted".into());
    assert!(store
        .audit_query(&planted, None, 10)
        .await
        .unwrap()
        .is_empty());
    planted = AuditFilter::default();
    planted.until = Some(OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1));
    assert!(store
        .audit_query(&planted, None, 10)
        .await
        .unwrap()
        .is_empty());
    planted = AuditFilter::default();
    planted.name = Some("planted".into());
    assert!(store
        .audit_query(&planted, None, 10)
        .await
        .unwrap()
        .is_empty());
    // A name alone is looked up by name (the per-credential index starts with the owner,
    // and scanned it whole): with dave's name entry gone, his record is not found by name,
    // though it still is by owner and name.
    let mut by_name = AuditFilter::default();
    by_name.name = Some("k".into());
    let before = store.audit_query(&by_name, None, 1000).await.unwrap();
    assert!(before.iter().any(|r| r.seq == seq as u64), "{before:?}");
    store.close().await;
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("DELETE FROM audit_by_name WHERE seq = ?1", [seq])
        .unwrap();
    drop(raw);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let after = store.audit_query(&by_name, None, 1000).await.unwrap();
    assert!(!after.is_empty());
    assert!(!after.iter().any(|r| r.seq == seq as u64));
    assert_eq!(
        store
            .audit_query(&filter(Some("dave"), Some("k")), None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    store.close().await;
}

/// A database written at schema 2 (the per-credential audit index on `audit_records`) is
/// migrated: every existing record is found by owner afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_2_audit_records_are_indexed_by_the_migration() {
    use strongroom_store::audit::HeadKey;
    use strongroom_store::{AuditFilter, AuditLog};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE_NAME);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let key = Arc::new(HeadKey::new([5; 32]));
    store
        .audit_seal_genesis(key.head(0, strongroom_store::audit::GENESIS))
        .await
        .unwrap();
    let events = (0..30u64)
        .map(|i| {
            audit_event(
                i,
                Some(if i % 3 == 0 { "erin" } else { "frank" }),
                Some("k"),
            )
        })
        .collect();
    store.audit_append(key, events).await.unwrap();
    store.close().await;
    // Back to schema 2's layout, as an older Strongroom left it.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP TABLE audit_by_credential; DROP TABLE audit_index_state;
         DROP TABLE audit_by_principal; DROP TABLE audit_by_owner; DROP TABLE audit_by_name;
         DROP TABLE audit_time_marks; DROP TABLE audit_anchor; DROP TABLE rate_allowances;
         DROP TABLE audit_time_late;
         CREATE INDEX audit_records_by_credential ON audit_records (owner, name, seq);
         CREATE INDEX audit_records_by_principal ON audit_records (principal_id, seq);
         CREATE INDEX audit_records_by_time ON audit_records (time_ms);
         UPDATE schema_version SET version = 2;",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    assert_eq!(store.testing_audit_unindexed().await.unwrap(), 0);
    let mut erin = AuditFilter::default();
    erin.owner = Some("erin".into());
    let found = store.audit_query(&erin, None, 100).await.unwrap();
    assert_eq!(found.len(), 10);
    assert!(found
        .iter()
        .all(|r| r.event.owner.as_deref() == Some("erin")));
    let mut billing = AuditFilter::default();
    billing.principal_id = Some("billing".into());
    assert_eq!(
        store.audit_query(&billing, None, 100).await.unwrap().len(),
        30
    );
    let mut late = AuditFilter::default();
    late.since = Some(OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_020));
    assert_eq!(store.audit_query(&late, None, 100).await.unwrap().len(), 10);
    store.close().await;
}

/// A database written at schema 5 (records found by time through `audit_by_time`, by owner
/// alone through the per-credential index) is migrated: the time marks and the owner index
/// are filled from the records indexed so far, the later ones are indexed from there on, and
/// queries by owner and time answer exactly, with times out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_5_audit_records_are_found_by_time_and_owner_after_the_migration() {
    use strongroom_store::audit::HeadKey;
    use strongroom_store::testing::Schema5Log;
    use strongroom_store::{AuditFilter, AuditLog};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE_NAME);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let key = Arc::new(HeadKey::new([5; 32]));
    store
        .audit_seal_genesis(key.head(0, strongroom_store::audit::GENESIS))
        .await
        .unwrap();
    store
        .audit_append(
            key,
            (0..Schema5Log::RECORDS).map(Schema5Log::event).collect(),
        )
        .await
        .unwrap();
    let mut erin = AuditFilter::default();
    erin.owner = Some("erin".into());
    store.audit_query(&erin, None, 1).await.unwrap(); // indexes all 60
    store.close().await;
    // Back to schema 5's layout, as an older Strongroom left it, with the last 20 records
    // not indexed yet.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP TABLE audit_by_owner; DROP TABLE audit_time_marks; DROP TABLE audit_anchor;
         DROP TABLE rate_allowances; DROP TABLE audit_time_late;
         ALTER TABLE audit_index_state DROP COLUMN max_time_ms;
         CREATE TABLE audit_by_time (time_ms INTEGER NOT NULL, seq INTEGER NOT NULL,
             PRIMARY KEY (time_ms, seq)) WITHOUT ROWID;
         INSERT INTO audit_by_time SELECT time_ms, seq FROM audit_records WHERE seq <= 40;
         UPDATE audit_index_state SET indexed_upto = 40;
         UPDATE schema_version SET version = 5;",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    assert_eq!(store.testing_audit_unindexed().await.unwrap(), 20);
    Schema5Log::check_queries(&store).await;
    assert_eq!(store.testing_audit_unindexed().await.unwrap(), 0);
    store.close().await;
}

/// A schema 8 store whose prune left a removed record's time mark behind (an index run
/// that read the record before it went plants it again): migration 9 drops such marks
/// before it finds the late records among the stored ones, so a query by time still finds
/// a record that came after the removed one but before it in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_8_marks_of_removed_records_do_not_hide_records_after_the_migration() {
    use strongroom_store::audit::HeadKey;
    use strongroom_store::{AuditFilter, AuditLog};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE_NAME);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let key = Arc::new(HeadKey::new([8; 32]));
    store
        .audit_seal_genesis(key.head(0, strongroom_store::audit::GENESIS))
        .await
        .unwrap();
    // Seconds 100, 50 and 200 after the epoch of `audit_event`.
    let events = [(1, 100), (2, 50), (3, 200)]
        .map(|(i, second)| {
            let mut e = audit_event(i, Some("erin"), Some("k"));
            e.time = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_000 + second);
            e
        })
        .to_vec();
    store.audit_append(key, events).await.unwrap();
    let mut erin = AuditFilter::default();
    erin.owner = Some("erin".into());
    store.audit_query(&erin, None, 10).await.unwrap(); // indexes all 3
    assert_eq!(
        store.testing_audit_time_marks().await.unwrap(),
        [(1_700_000_100, 1), (1_700_000_200, 3)]
    );
    store.close().await;
    // Back to schema 8, with record 1 removed and its mark left behind.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DELETE FROM audit_records WHERE seq = 1; DROP TABLE audit_time_late;
         ALTER TABLE audit_index_state ADD COLUMN max_lag_ms INTEGER NOT NULL DEFAULT 50000;
         UPDATE schema_version SET version = 8;",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let until = |second: i64| {
        let mut f = AuditFilter::default();
        f.until =
            Some(OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_000 + second));
        f
    };
    let seqs = |f: AuditFilter| {
        let store = store.clone();
        async move {
            store
                .audit_query(&f, None, 10)
                .await
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<u64>>()
        }
    };
    assert_eq!(seqs(until(51)).await, [2]);
    assert_eq!(seqs(until(201)).await, [3, 2]);
    store.close().await;
}

fn cached_version(owner: &str, name: &str, version: u32) -> NewVersion {
    NewVersion::new(
        owner,
        name,
        version,
        test_value(owner, name, version, 64),
        vec![version as u8; 40],
        KekRef::new("local", "k1", 1),
        "user:test",
        t0(),
    )
}

/// The reveal cache never answers with a row this process has changed: every write drops
/// what it touched before it is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reveal_cache_follows_every_write_of_this_process() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open_dir(dir.path()).await.unwrap();
    let get = |v: Option<u32>| s.get_version("alice", "k", v);
    s.put_version(cached_version("alice", "k", 1))
        .await
        .unwrap();
    assert_eq!(get(None).await.unwrap().version, 1);
    assert_eq!(get(None).await.unwrap().version, 1); // answered from memory
    s.put_version(cached_version("alice", "k", 2))
        .await
        .unwrap();
    assert_eq!(get(None).await.unwrap().version, 2);
    assert_eq!(get(Some(1)).await.unwrap().version, 1);
    s.set_current("alice", "k", 1, t0()).await.unwrap();
    let cur = get(None).await.unwrap();
    assert_eq!((cur.version, cur.is_current), (1, true));
    s.set_enabled("alice", "k", false, t0()).await.unwrap();
    assert!(!get(None).await.unwrap().credential_enabled);
    s.set_enabled("alice", "k", true, t0()).await.unwrap();
    assert!(get(None).await.unwrap().credential_enabled);
    let old = KekRef::new("local", "k1", 1);
    let new = KekRef::new("local", "k1", 2);
    assert!(s
        .replace_wrapped_key("alice", "k", 1, &old, &[1; 40], vec![9; 40], &new)
        .await
        .unwrap());
    let rewrapped = get(None).await.unwrap();
    assert_eq!((rewrapped.wrapped_key, rewrapped.kek), (vec![9; 40], new));
    s.destroy_version("alice", "k", 1, t0()).await.unwrap();
    assert_eq!(get(None).await.unwrap().version, 2); // the newest left became current
    assert!(matches!(
        get(Some(1)).await,
        Err(StoreError::VersionDestroyed)
    ));
    s.set_current("alice", "k", 2, t0()).await.unwrap();
    assert_eq!(get(None).await.unwrap().version, 2);
    s.destroy_credential("alice", "k", t0()).await.unwrap();
    assert!(matches!(get(None).await, Err(StoreError::NotFound)));
    // Another owner's credential of the same name is another entry.
    s.put_version(cached_version("alice", "k", 3))
        .await
        .unwrap();
    s.put_version(cached_version("bob", "k", 1)).await.unwrap();
    assert_eq!(get(None).await.unwrap().version, 3);
    assert!(matches!(
        s.get_version("carol", "k", None).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.get_version("bob", "k", None).await.unwrap().version, 1);
    s.close().await;
}

async fn marked_read(
    s: &SqliteStore,
    requested: Option<u32>,
) -> (
    strongroom_store::ReadMark,
    strongroom_store::ServedVersion,
    strongroom_store::SealedVersion,
) {
    let mark = s.read_mark();
    let row = s.get_version("alice", "k", requested).await.unwrap();
    (mark, row.served(requested), row)
}

/// Another process (here, a second store on the same file: its own connections) writing
/// behind the cache: the served answer is released only if the database still says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_from_memory_is_confirmed_against_other_processes_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = SqliteStore::open_dir(dir.path()).await.unwrap();
    let operator = SqliteStore::open_dir(dir.path()).await.unwrap();
    server
        .put_version(cached_version("alice", "k", 1))
        .await
        .unwrap();

    // Nothing changed: confirmed (an empty write transaction does the check).
    let (mark, served, _) = marked_read(&server, None).await;
    server.confirm_unchanged(mark, &served).await.unwrap();

    // A rewrap by the operator changes no value: the answer stands.
    let (mark, served, _) = marked_read(&server, None).await;
    let (old, new) = (KekRef::new("local", "k1", 1), KekRef::new("local", "k1", 2));
    assert!(operator
        .replace_wrapped_key("alice", "k", 1, &old, &[1; 40], vec![7; 40], &new)
        .await
        .unwrap());
    server.confirm_unchanged(mark, &served).await.unwrap();
    // ... and the next read sees the new wrapping (the check dropped the cache).
    assert_eq!(marked_read(&server, None).await.2.kek, new);

    // The operator disables it behind a read from memory: not confirmed.
    let (mark, served, row) = marked_read(&server, None).await;
    assert!(row.credential_enabled);
    operator
        .set_enabled("alice", "k", false, t0())
        .await
        .unwrap();
    let e = server.confirm_unchanged(mark, &served).await.unwrap_err();
    assert!(matches!(e, StoreError::Overtaken), "{e:?}");
    assert!(!marked_read(&server, None).await.2.credential_enabled);
    operator
        .set_enabled("alice", "k", true, t0())
        .await
        .unwrap();

    // A new version from the operator: "the current one" no longer holds, version 1 does.
    let (mark_cur, served_cur, _) = marked_read(&server, None).await;
    let (mark_v1, served_v1, _) = marked_read(&server, Some(1)).await;
    operator
        .put_version(cached_version("alice", "k", 2))
        .await
        .unwrap();
    // The server's own writes see the operator's commit first (audit appends, here a put).
    server
        .put_version(cached_version("alice", "other", 1))
        .await
        .unwrap();
    assert!(server
        .confirm_unchanged(mark_cur, &served_cur)
        .await
        .is_err());
    server.confirm_unchanged(mark_v1, &served_v1).await.unwrap();
    assert_eq!(marked_read(&server, None).await.2.version, 2);

    // With the cache off every read goes to the database, and there is nothing to confirm.
    let mut opts = SqliteOptions::default();
    opts.reveal_cache_bytes = 0;
    let uncached = SqliteStore::open(dir.path().join(DB_FILE_NAME), opts)
        .await
        .unwrap();
    let mark = uncached.read_mark();
    let served = uncached
        .get_version("alice", "k", None)
        .await
        .unwrap()
        .served(None);
    operator
        .set_enabled("alice", "k", false, t0())
        .await
        .unwrap();
    uncached.confirm_unchanged(mark, &served).await.unwrap();
    assert!(
        !uncached
            .get_version("alice", "k", None)
            .await
            .unwrap()
            .credential_enabled
    );
    for s in [server, operator, uncached] {
        s.close().await;
    }
}

/// A reader holding a snapshot (a backup, a long `audit verify`) lets the WAL grow by every
/// write meanwhile; once it lets go, the WAL is cut back to the limit when it starts over
/// instead of keeping that size for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_shrinks_back_after_a_long_reader() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = SqliteOptions::default();
    options.wal_size_limit = 256 << 10;
    let store = SqliteStore::open_dir_with(dir.path(), options)
        .await
        .unwrap();
    let wal = dir.path().join(format!("{DB_FILE_NAME}-wal"));
    let reader = hold_a_snapshot(dir.path());
    for i in 0..200 {
        put_big(&store, i).await;
    }
    let grown = std::fs::metadata(&wal).unwrap().len();
    assert!(grown > 2 << 20, "the WAL did not grow: {grown}");
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    wait_for_the_wal_cut_back(&store, &wal, grown).await;
    store.close().await;
}

/// Puts a 16 KiB value under `big-{i}`; how long the put took.
async fn put_big(store: &SqliteStore, i: u32) -> std::time::Duration {
    let nv = NewVersion::new(
        "alice",
        format!("big-{i}"),
        1,
        test_value("alice", "big", i, 16 << 10),
        vec![1; 40],
        KekRef::new("local", "k1", 1),
        "user:test",
        t0(),
    );
    let started = std::time::Instant::now();
    store.put_version(nv).await.unwrap();
    started.elapsed()
}

/// A connection of its own holding a read snapshot of the store in `dir` until it commits.
fn hold_a_snapshot(dir: &std::path::Path) -> rusqlite::Connection {
    let reader = rusqlite::Connection::open(dir.join(DB_FILE_NAME)).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM credentials", [], |r| r.get(0))
        .unwrap();
    reader
}

/// Puts until checkpoints have caught up and a write started the WAL over, cutting it back
/// (30 s at most).
async fn wait_for_the_wal_cut_back(store: &SqliteStore, wal: &std::path::Path, grown: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut i = 100_000;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        put_big(store, i).await;
        i += 1;
        let now = std::fs::metadata(wal).unwrap().len();
        if now <= 512 << 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL stayed at {now} bytes (grew to {grown})"
        );
    }
}

/// A reader that keeps an old snapshot (a backup's `VACUUM INTO`, a long audit query) does
/// not hold up writes: the `RESTART` checkpoint that must wait for it gives up after a few
/// milliseconds and is tried again later. It used to wait the whole busy limit (5 s) while
/// holding every writer back, again and again for as long as the reader read. Once the
/// reader is done, the WAL is reset and cut back.
#[tokio::test]
async fn a_long_reader_does_not_hold_up_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = SqliteOptions::default();
    options.wal_restart_frames = 64;
    options.wal_size_limit = 256 << 10;
    let store = SqliteStore::open_dir_with(dir.path(), options)
        .await
        .unwrap();
    let wal = dir.path().join(format!("{DB_FILE_NAME}-wal"));
    let reader = hold_a_snapshot(dir.path());
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..150 {
        slowest = slowest.max(put_big(&store, i).await);
        // Time for the checkpointer to try (it runs at most every 50 ms).
        if i % 10 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        }
    }
    // Each wait was 5 s before; a slow machine takes well under 2 s for one put.
    assert!(
        slowest < std::time::Duration::from_secs(2),
        "a put waited {slowest:?} behind a checkpoint"
    );
    let grown = std::fs::metadata(&wal).unwrap().len();
    assert!(grown > 1 << 20, "the WAL did not grow: {grown}");
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    wait_for_the_wal_cut_back(&store, &wal, grown).await;
    store.close().await;
}

/// A file another process holds locked reads fine and takes no write: `check_writable` says
/// so (for readiness) within the busy timeout, and says it is writable again once released.
#[tokio::test]
async fn a_file_locked_by_another_process_is_not_writable() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SqliteOptions::default();
    opts.busy_timeout = std::time::Duration::from_millis(300);
    let store = SqliteStore::open(dir.path().join(DB_FILE_NAME), opts)
        .await
        .unwrap();
    store.check_writable().await.unwrap();
    let other = rusqlite::Connection::open(dir.path().join(DB_FILE_NAME)).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert!(store.get_provider_state("x").await.is_ok(), "reads go on");
    let e = store.check_writable().await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    other.execute_batch("COMMIT").unwrap();
    store.check_writable().await.unwrap();
    store.close().await;
}

/// A backup takes its name only once written, checked and durable: it is written as
/// `FILE.partial`, which a run cut short leaves behind (and the next run names), never a
/// file at FILE that looks like a backup. Never over an existing file or into a folder.
#[tokio::test]
async fn a_backup_is_named_only_once_checked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_dir(dir.path()).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("backup.db");
    let partial = out.path().join("backup.db.partial");
    let report = store.backup_to(&dest).await.unwrap();
    assert_eq!(report.credentials, 0);
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!partial.exists());
    let written = std::fs::read(&dest).unwrap();

    let invalid = |r: Result<_, StoreError>| match r {
        Err(StoreError::InvalidInput(m)) => m,
        other => panic!("{other:?}"),
    };
    assert!(invalid(store.backup_to(&dest).await).contains("already exists"));
    assert_eq!(std::fs::read(&dest).unwrap(), written);
    assert!(!partial.exists());
    assert!(invalid(store.backup_to(out.path()).await).contains("folder"));
    // What a run killed mid-copy leaves: named, and nothing at the final name.
    let again = out.path().join("again.db");
    let left = out.path().join("again.db.partial");
    std::fs::write(&left, b"half a copy").unwrap();
    assert!(invalid(store.backup_to(&again).await).contains(".partial exists"));
    assert!(!again.exists());
    assert_eq!(std::fs::read(&left).unwrap(), b"half a copy");
    std::fs::remove_file(&left).unwrap();
    store.backup_to(&again).await.unwrap();
    assert!(again.exists() && !left.exists());
    store.close().await;
}
