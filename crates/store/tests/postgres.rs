//! The conformance suite against PostgreSQL, one fresh schema per test.
//!
//! Needs `STRONGROOM_TEST_POSTGRES_URL` (e.g. from `pg_start` in `scripts/lib/postgres.sh`).
//! Without it every test passes vacuously after a loud skip message, unless
//! `STRONGROOM_REQUIRE_POSTGRES=1`, in which case every test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use async_trait::async_trait;
use strongroom_store::postgres::{PostgresOptions, PostgresStore, PostgresTls};
use strongroom_store::testing::TestBackend;
use strongroom_store::{Store, StoreError};
use tokio::sync::Mutex;

struct PgBackend {
    url: String,
    schema: String,
    /// A store kept open for the raw hooks (opened while the schema version is sane).
    helper: Mutex<Option<PostgresStore>>,
}

impl PgBackend {
    fn options(&self) -> PostgresOptions {
        let mut o = PostgresOptions::default();
        o.schema = Some(self.schema.clone());
        o.max_connections = 20;
        o
    }

    async fn helper(&self) -> Result<PostgresStore, StoreError> {
        let mut h = self.helper.lock().await;
        if h.is_none() {
            *h = Some(PostgresStore::connect(&self.url, self.options()).await?);
        }
        Ok(h.as_ref().unwrap().clone())
    }
}

#[async_trait]
impl TestBackend for PgBackend {
    async fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        Ok(Arc::new(
            PostgresStore::connect(&self.url, self.options()).await?,
        ))
    }

    async fn raw_secret_columns(
        &self,
        owner: &str,
        name: &str,
        version: u32,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.helper()
            .await?
            .testing_raw_secret_columns(owner, name, version)
            .await
    }

    async fn set_schema_version(&self, version: u32) -> Result<(), StoreError> {
        self.helper()
            .await?
            .testing_set_schema_version(version)
            .await
    }

    async fn raw_audit_time_marks(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        self.helper().await?.testing_audit_time_marks().await
    }

    async fn raw_audit_late_marks(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        self.helper().await?.testing_audit_late_marks().await
    }

    async fn audit_seq_bounds(
        &self,
        since: Option<i64>,
        until: Option<i64>,
    ) -> Result<(i64, i64), StoreError> {
        self.helper()
            .await?
            .testing_audit_seq_bounds(since, until)
            .await
    }

    async fn raw_allowance_rows(&self) -> Result<u64, StoreError> {
        self.helper().await?.testing_allowance_rows().await
    }
}

static SKIP_NOTICE: Once = Once::new();
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The Postgres URL, or `None` after a loud notice; panics if Postgres is required.
pub fn postgres_url() -> Option<String> {
    match std::env::var("STRONGROOM_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("STRONGROOM_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!(
                    "STRONGROOM_REQUIRE_POSTGRES=1 but STRONGROOM_TEST_POSTGRES_URL is unset: \
                     start a cluster with pg_start from scripts/lib/postgres.sh"
                );
            }
            SKIP_NOTICE.call_once(|| {
                // Straight to the file descriptor: the test harness would capture eprintln!.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n*** SKIPPING the PostgreSQL store tests: STRONGROOM_TEST_POSTGRES_URL is \
                     unset. Run them with: source scripts/lib/postgres.sh && pg_start && \
                     cargo test -p strongroom-store ***\n"
                );
            });
            None
        }
    }
}

async fn backend() -> Option<Box<dyn TestBackend>> {
    Some(Box::new(pg_backend()?))
}

/// A backend in a fresh schema of its own.
fn pg_backend() -> Option<PgBackend> {
    let url = postgres_url()?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let schema = format!(
        "t_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos
    );
    Some(PgBackend {
        url,
        schema,
        helper: Mutex::new(None),
    })
}

strongroom_store::conformance_tests!(backend());

/// A database written at schema 5 (records found by time through an index on `time_ms`) is
/// migrated: the time marks and the running state are computed from the records, and later
/// appends keep them, so that queries by time and by owner answer exactly, with times out
/// of order (every fifth record 3 s late, one an hour late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_5_audit_records_are_found_by_time_and_owner_after_the_migration() {
    use strongroom_store::audit::HeadKey;
    use strongroom_store::testing::Schema5Log;
    let Some(b) = pg_backend() else { return };
    let store = b.open().await.unwrap();
    let log = store.audit_log().unwrap();
    let key = Arc::new(HeadKey::new([5; 32]));
    log.audit_seal_genesis(key.head(0, strongroom_store::audit::GENESIS))
        .await
        .unwrap();
    log.audit_append(key.clone(), (0..40).map(Schema5Log::event).collect())
        .await
        .unwrap();
    // Back to schema 5's layout, as an older Strongroom left it.
    let pg = PostgresStore::connect(&b.url, b.options()).await.unwrap();
    pg.testing_batch_execute(
        "DROP INDEX audit_records_by_owner; DROP TABLE audit_time_marks; DROP TABLE audit_anchor;
         ALTER TABLE audit_head DROP COLUMN max_time_ms; DROP TABLE audit_time_late;
         CREATE INDEX audit_records_by_time ON audit_records (time_ms);
         DROP TABLE rate_allowances;
         UPDATE schema_version SET version = 5;",
    )
    .await
    .unwrap();
    drop(pg);
    let store = b.open().await.unwrap();
    let log = store.audit_log().unwrap();
    log.audit_append(
        key,
        (40..Schema5Log::RECORDS).map(Schema5Log::event).collect(),
    )
    .await
    .unwrap();
    Schema5Log::check_queries(&*log).await;
}

/// Metadata that is no JSON object (JSONB always parses; every put stores an object) was
/// written around Strongroom: listed as unreadable, and refused naming its version when read
/// to be opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_is_no_object_is_listed_as_unreadable() {
    let Some(b) = pg_backend() else { return };
    let store = b.open().await.unwrap();
    for version in 1..=2 {
        let mut nv = strongroom_store::NewVersion::new(
            "alice",
            "zoom.api-key",
            version,
            vec![1; 40],
            vec![2; 40],
            strongroom_store::KekRef::new("local", "k", 1),
            "user:alice",
            time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(i64::from(version)),
        );
        nv.metadata = serde_json::json!({ "v": version });
        store.put_version(nv).await.unwrap();
    }
    let pg = PostgresStore::connect(&b.url, b.options()).await.unwrap();
    pg.testing_batch_execute("UPDATE versions SET metadata = '[]'::jsonb WHERE version = 2")
        .await
        .unwrap();
    drop(pg);
    let page = store.list_credentials("alice", None, 10).await.unwrap();
    assert!(page.items[0].current_metadata_unreadable);
    assert_eq!(page.items[0].current_metadata, None);
    let c = store.get_credential("alice", "zoom.api-key").await.unwrap();
    let flags: Vec<_> = c
        .versions
        .iter()
        .map(|v| (v.version, v.metadata_unreadable))
        .collect();
    assert_eq!(flags, [(2, true), (1, false)]);
    let err = store
        .get_version("alice", "zoom.api-key", None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                version: Some(2),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        store
            .get_version("alice", "zoom.api-key", Some(1))
            .await
            .unwrap()
            .metadata,
        serde_json::json!({ "v": 1 })
    );
}

/// With a statement timeout, a statement that runs longer is cancelled at the server (its
/// caller may be long gone), and the connection serves the next one; migrations, which read
/// whole tables, are exempt (a fresh schema migrates under a 1 ms limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_timeout_cancels_long_statements_at_the_server() {
    let Some(b) = pg_backend() else { return };
    let mut o = b.options();
    o.max_connections = 1;
    o.statement_timeout = Some(std::time::Duration::from_millis(1));
    PostgresStore::connect(&b.url, o.clone()).await.unwrap();
    o.statement_timeout = Some(std::time::Duration::from_millis(300));
    let store = PostgresStore::connect(&b.url, o).await.unwrap();
    let started = std::time::Instant::now();
    let err = store.testing_sleep(30.0).await.unwrap_err();
    assert!(err.to_string().contains("57014"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    store.testing_sleep(0.01).await.unwrap();
    store.testing_drop_schema().await.unwrap();
}

#[tokio::test]
async fn malformed_urls_and_schema_names_are_configuration_errors() {
    let err = PostgresStore::connect("postgresql://[bad", PostgresOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    let mut o = PostgresOptions::default();
    o.schema = Some("x\"; DROP".into());
    let err = PostgresStore::connect("postgresql://u@127.0.0.1:1/db", o)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Config(m) if m.contains("lowercase")),
        "{err:?}"
    );
}

#[tokio::test]
async fn unreachable_server_is_unavailable() {
    let mut o = PostgresOptions::default();
    o.timeout = std::time::Duration::from_secs(2);
    // Port 1 on loopback: connection refused.
    let err = PostgresStore::connect("postgresql://u:hunter2-pw@127.0.0.1:1/db", o)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    // Names the server it tried, never the password.
    assert!(
        err.to_string().contains("PostgreSQL at 127.0.0.1:1"),
        "{err}"
    );
    assert!(!format!("{err:?}{err}").contains("hunter2"));
    // Also when the first connection is the one that creates the schema, and for a
    // key/value string naming the server by `hostaddr` alone.
    let mut o = PostgresOptions::default();
    o.timeout = std::time::Duration::from_secs(2);
    o.schema = Some("srs".into());
    o.create = true;
    let err = PostgresStore::connect("hostaddr=127.0.0.1 port=1 user=u password=hunter2-pw", o)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("PostgreSQL at 127.0.0.1:1"),
        "{err}"
    );
    assert!(!format!("{err:?}{err}").contains("hunter2"));
}

/// What the server refused is said, not just "db error": here PostgreSQL's own reason for
/// refusing a database that does not exist.
#[tokio::test]
async fn the_servers_reason_is_in_the_error() {
    let Some(url) = postgres_url() else { return };
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}dbname=strongroom_no_such_db");
    let err = PostgresStore::connect(&url, PostgresOptions::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("3D000") && text.contains("does not exist"),
        "{text}"
    );
}

fn with_sslmode(url: &str, mode: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode={mode}")
}

/// A server that is not on this host is reached over TLS only: `sslmode=disable` is refused
/// before any connection is made.
#[tokio::test]
async fn a_remote_server_in_the_clear_is_refused() {
    for url in [
        "postgresql://u@db.example.com:5432/x?sslmode=disable",
        "host=10.0.0.7 user=u dbname=x sslmode=disable",
    ] {
        let err = PostgresStore::connect(url, PostgresOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Config(m) if m.contains("sslmode=disable")),
            "{err:?}"
        );
    }
}

/// With `sslmode=require` the connection is TLS, verified against the configured CA: the
/// test CA works (and the store over it), the platform's roots and another CA are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_used_and_the_server_certificate_verified() {
    let Some(url) = postgres_url() else { return };
    let Ok(ca) = std::env::var("STRONGROOM_TEST_POSTGRES_CA") else {
        assert!(
            std::env::var("STRONGROOM_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "STRONGROOM_TEST_POSTGRES_CA is unset: start the cluster with pg_start"
        );
        return;
    };
    let schema = format!("t_tls_{}", std::process::id());
    let options = |tls: PostgresTls| {
        let mut o = PostgresOptions::default();
        o.schema = Some(schema.clone());
        o.timeout = std::time::Duration::from_secs(5);
        o.tls = tls;
        o
    };
    // On this host the default (`prefer`) connects in the clear.
    let plain = PostgresStore::connect(&url, options(PostgresTls::SystemRoots))
        .await
        .unwrap();
    assert!(!plain.testing_connection_is_tls().await.unwrap());

    let require = with_sslmode(&url, "require");
    let tls = PostgresStore::connect(&require, options(PostgresTls::CaFile(ca.clone().into())))
        .await
        .unwrap();
    assert!(tls.testing_connection_is_tls().await.unwrap());
    let nv = strongroom_store::NewVersion::new(
        "alice",
        "k",
        1,
        vec![1; 48],
        vec![2; 40],
        strongroom_store::KekRef::new("local", "k1", 1),
        "user:test",
        time::OffsetDateTime::now_utc(),
    );
    tls.put_version(nv).await.unwrap();
    assert_eq!(
        tls.get_version("alice", "k", None)
            .await
            .unwrap()
            .sealed_value,
        vec![1; 48]
    );

    // The platform's roots do not hold the test CA.
    let err = PostgresStore::connect(&require, options(PostgresTls::SystemRoots))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    // Nor does another CA.
    let other = rcgen::generate_simple_self_signed(vec!["other-ca.invalid".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other_pem = dir.path().join("other.pem");
    std::fs::write(&other_pem, other.cert.pem()).unwrap();
    let err = PostgresStore::connect(&require, options(PostgresTls::CaFile(other_pem)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    // And says why, for the operator.
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
    // A CA file that holds no certificate is a configuration error.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = PostgresStore::connect(&require, options(PostgresTls::CaFile(empty)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");

    tls.testing_drop_schema().await.unwrap();
}

/// Tampering with the PostgreSQL tables directly is caught, naming the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tampering_in_postgres_is_detected() {
    use strongroom_store::audit::{HeadKey, VerifyError};
    use strongroom_store::testing::{audit_event, audit_verify_all};
    let Some(url) = postgres_url() else { return };
    let cases: Vec<(&str, VerifyError)> = vec![
        (
            "UPDATE audit_records SET principal_id = 'mallory' WHERE seq = 17",
            VerifyError::Tampered(17),
        ),
        (
            "DELETE FROM audit_records WHERE seq = 17",
            VerifyError::Sequence {
                expected: 17,
                found: 18,
            },
        ),
        (
            "UPDATE audit_records SET seq = 1000 WHERE seq = 10;
             UPDATE audit_records SET seq = 10 WHERE seq = 11;
             UPDATE audit_records SET seq = 11 WHERE seq = 1000;",
            VerifyError::Chain(10),
        ),
        (
            "DELETE FROM audit_records WHERE seq > 45",
            VerifyError::Length {
                found: 45,
                head: 50,
            },
        ),
        (
            "UPDATE audit_head SET mac = decode(repeat('00', 32), 'hex')",
            VerifyError::HeadMac,
        ),
        (
            "ROLLBACK_HEAD",
            VerifyError::Length {
                found: 50,
                head: 30,
            },
        ),
    ];
    for (n, (sql, expected)) in cases.into_iter().enumerate() {
        let schema = format!("tamper_{}_{n}", std::process::id());
        let b = PgBackend {
            url: url.clone(),
            schema: schema.clone(),
            helper: Mutex::new(None),
        };
        let s = b.open().await.unwrap();
        let log = s.audit_log().unwrap();
        let key = Arc::new(HeadKey::new([3; 32]));
        log.audit_seal_genesis(key.head(0, strongroom_store::audit::GENESIS))
            .await
            .unwrap();
        log.audit_append(
            key.clone(),
            (1..=30)
                .map(|i| audit_event(i, "alice", "n", "reveal"))
                .collect(),
        )
        .await
        .unwrap();
        let old = log.audit_head().await.unwrap().unwrap();
        log.audit_append(
            key.clone(),
            (31..=50)
                .map(|i| audit_event(i, "alice", "n", "put"))
                .collect(),
        )
        .await
        .unwrap();
        assert_eq!(audit_verify_all(&*log, &key).await, Ok(50));
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        config.options(format!("-c search_path={schema}"));
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        let task = tokio::spawn(conn);
        if sql == "ROLLBACK_HEAD" {
            client
                .execute(
                    "UPDATE audit_head SET count = $1, hash = $2, mac = $3",
                    &[&(old.count as i64), &&old.hash[..], &&old.mac[..]],
                )
                .await
                .unwrap();
        } else {
            client.batch_execute(sql).await.unwrap();
        }
        assert_eq!(audit_verify_all(&*log, &key).await, Err(expected), "{sql}");
        drop(log);
        drop(s);
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .ok();
        drop(client);
        let _ = task.await;
    }
}

fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

fn schema_options(tag: &str) -> PostgresOptions {
    let mut o = PostgresOptions::default();
    o.schema = Some(format!(
        "t_{tag}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    o
}

/// `synchronous_commit = off` (here from the connection string; a database or role default
/// works the same) would acknowledge commits before they are on disk: every connection of the
/// pool turns it back on and the store says so. A stronger setting is left alone, and the
/// connection string's other options survive the schema's `search_path`.
#[tokio::test]
async fn commits_are_durable_whatever_the_connection_defaults_say() {
    let Some(url) = postgres_url() else { return };
    let off = with_param(&url, "options=-c%20synchronous_commit%3Doff");
    let store = PostgresStore::connect(&off, schema_options("sync_off"))
        .await
        .unwrap();
    assert_eq!(
        store.testing_setting("synchronous_commit").await.unwrap(),
        "on"
    );
    assert!(
        store
            .durability_warnings()
            .iter()
            .any(|w| w.contains("synchronous_commit is off")),
        "{:?}",
        store.durability_warnings()
    );
    // The schema is still the one configured.
    assert!(store
        .testing_setting("search_path")
        .await
        .unwrap()
        .starts_with("t_sync_off_"));
    // The cluster's fsync setting is reported as it is (the test cluster may run without).
    let fsync_off = store.testing_setting("fsync").await.unwrap() == "off";
    assert_eq!(
        store
            .durability_warnings()
            .iter()
            .any(|w| w.contains("fsync = off")),
        fsync_off
    );

    let stronger = with_param(&url, "options=-c%20synchronous_commit%3Dremote_apply");
    let store = PostgresStore::connect(&stronger, schema_options("sync_strong"))
        .await
        .unwrap();
    assert_eq!(
        store.testing_setting("synchronous_commit").await.unwrap(),
        "remote_apply"
    );
    assert!(!store
        .durability_warnings()
        .iter()
        .any(|w| w.contains("synchronous_commit")));
}

/// A server that takes no writes after a failover (here: its database made read-only and
/// the pool's connections cut, as a failover to a standby does) reads fine: `check_writable`
/// says it is not writable, for readiness. Once it takes writes again, so does the store:
/// the sessions opened read-only are closed.
#[tokio::test]
async fn a_read_only_server_is_not_writable() {
    let Some(url) = postgres_url() else { return };
    let Some(base) = url.rsplit_once('/').map(|(b, _)| b.to_owned()) else {
        panic!("{url}")
    };
    let db = format!("ro_{}", std::process::id());
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // One statement per call: neither may run in the implicit transaction of a batch.
    for sql in [
        format!("DROP DATABASE IF EXISTS {db}"),
        format!("CREATE DATABASE {db}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let mut o = PostgresOptions::default();
    o.max_connections = 1;
    let store = PostgresStore::connect(&format!("{base}/{db}"), o)
        .await
        .unwrap();
    store.check_writable().await.unwrap();
    for sql in [
        format!("ALTER DATABASE {db} SET default_transaction_read_only = on"),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    // The pool notices the cut connection on its next use, then reconnects.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut readable = store.get_provider_state("x").await.is_ok();
    while !readable && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        readable = store.get_provider_state("x").await.is_ok();
    }
    assert!(readable, "reads go on");
    let e = store.check_writable().await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Unavailable(_)) && e.to_string().contains("takes no writes"),
        "{e:?}"
    );
    // Writable again: a connection opened while the server was read-only keeps that
    // session, and goes, so that the store takes writes again without a restart. Seen by a
    // write refused as read-only:
    store.get_provider_state("x").await.unwrap(); // a read-only session in the pool
    let writable = format!("ALTER DATABASE {db} RESET default_transaction_read_only");
    admin.batch_execute(&writable).await.unwrap();
    let e = store
        .put_provider_state("x", b"1".to_vec())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("25006"), "{e}");
    store.put_provider_state("x", b"1".to_vec()).await.unwrap();
    store.check_writable().await.unwrap();
    // ...or by the readiness check alone.
    for sql in [
        format!("ALTER DATABASE {db} SET default_transaction_read_only = on"),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store.get_provider_state("x").await.is_err() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    admin.batch_execute(&writable).await.unwrap();
    assert!(
        store.check_writable().await.is_err(),
        "the read-only session"
    );
    store.check_writable().await.unwrap();
    store.put_provider_state("x", b"2".to_vec()).await.unwrap();
    drop(store);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// A TCP relay to the test server that can stop relaying on the connections it has, as a
/// host gone in a partition (or a backend that stopped) looks to the client: what is sent
/// is taken and never answered. Connections made after a [`Relay::cut`] are relayed.
struct Relay {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicU64>,
    cut_below: Arc<AtomicU64>,
}

impl Relay {
    async fn to(server: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut_below = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (cut, count) = (cut_below.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let generation = count.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = tokio::net::TcpStream::connect(server).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(Self::pump(cr, uw, generation, cut.clone()));
                tokio::spawn(Self::pump(ur, cw, generation, cut.clone()));
            }
        });
        Relay {
            addr,
            accepted,
            cut_below,
        }
    }

    /// Stops relaying on every connection made so far.
    fn cut(&self) {
        self.cut_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        generation: u64,
        cut_below: Arc<AtomicU64>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                // Cut off, a side that closes is not heard of either: the other keeps its
                // socket, as across a partition (closing passed the client's close of a
                // given-up connection on to the server, which then ended the session).
                Ok(0) | Err(_) if generation < cut_below.load(Ordering::SeqCst) => {
                    std::future::pending::<()>().await;
                    return;
                }
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if generation < cut_below.load(Ordering::SeqCst) {
                // Holds both sockets open and answers nothing, for good.
                std::future::pending::<()>().await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// A server that stops answering (a host gone in a partition, a backend stopped) holds no
/// one up for long: an operation given up on mid-way (its request timed out) has its
/// connection closed when it does not answer within 2 s instead of handing it to the next
/// caller, and one that gets no answer within the statement timeout and a margin fails as
/// unavailable and closes it too. Either way the next operation runs on a fresh connection;
/// while the server answers, a caller gone mid-way costs no new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_holds_no_one_up() {
    use std::time::{Duration, Instant};
    let Some(url) = postgres_url() else { return };
    let (head, rest) = url.split_once("@127.0.0.1:").expect("a URL to 127.0.0.1");
    let port: u16 = rest.split('/').next().unwrap().parse().unwrap();
    let relay = Relay::to(([127, 0, 0, 1], port).into()).await;
    let path = &rest[rest.find('/').unwrap()..];
    let relayed = format!("{head}@127.0.0.1:{}{path}", relay.addr.port());
    let mut o = schema_options("frozen");
    o.max_connections = 1;
    o.statement_timeout = Some(Duration::from_secs(1));
    let store = PostgresStore::connect(&relayed, o).await.unwrap();
    store.get_provider_state("x").await.unwrap();

    // A caller gone mid-statement on a server that answers (a client that hung up) costs no
    // new connection: its connection is pooled again once the statement ends.
    let made = relay.accepted.load(Ordering::SeqCst);
    let given_up = tokio::time::timeout(Duration::from_millis(100), store.testing_sleep(0.5));
    assert!(given_up.await.is_err());
    store.get_provider_state("x").await.unwrap();
    assert_eq!(
        relay.accepted.load(Ordering::SeqCst),
        made,
        "a new connection"
    );

    relay.cut();
    let given_up = tokio::time::timeout(Duration::from_millis(500), store.get_provider_state("x"));
    assert!(given_up.await.is_err(), "a cut connection answered");
    tokio::time::timeout(Duration::from_secs(5), store.get_provider_state("x"))
        .await
        .expect("the next operation waited behind the cut connection")
        .unwrap();

    relay.cut();
    let started = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(20), store.get_provider_state("x"))
        .await
        .expect("no deadline")
        .unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains("no answer from the PostgreSQL server within 6 s"),
        "{e}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(5), store.get_provider_state("x"))
        .await
        .expect("the next operation waited behind the cut connection")
        .unwrap();
    store.testing_drop_schema().await.unwrap();
}

/// The server ends a session's transaction left idle (its client gone in a partition, its
/// COMMIT lost) within seconds, releasing its locks (every put takes the audit head's row),
/// and notices a client that stopped answering within about a minute: every session is set
/// so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_left_by_their_client_are_ended_at_the_server() {
    use std::time::{Duration, Instant};
    let Some(url) = postgres_url() else { return };
    let options = schema_options("idle");
    let store = PostgresStore::connect(&url, options.clone()).await.unwrap();
    for (setting, want) in [
        ("idle_in_transaction_session_timeout", "5s"),
        ("tcp_keepalives_idle", "30"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "30000"),
    ] {
        assert_eq!(
            store.testing_setting(setting).await.unwrap(),
            want,
            "{setting}"
        );
    }
    // A node cut off in a partition with a row locked in a transaction whose COMMIT never
    // arrives (here: a transaction left open, then the relay cut): the lock goes with the
    // session within seconds, and another node's write to that row goes through.
    store.put_provider_state("x", b"0".to_vec()).await.unwrap();
    let (head, rest) = url.split_once("@127.0.0.1:").expect("a URL to 127.0.0.1");
    let port: u16 = rest.split('/').next().unwrap().parse().unwrap();
    let relay = Relay::to(([127, 0, 0, 1], port).into()).await;
    let path = &rest[rest.find('/').unwrap()..];
    let relayed = format!("{head}@127.0.0.1:{}{path}", relay.addr.port());
    let cut_off = PostgresStore::connect(&relayed, options).await.unwrap();
    // Timed from before the transaction: its idle time starts after this, so a lock held to
    // the server's timeout is held 5 s from here at least, however late (a loaded machine)
    // this task sees the batch's answer.
    let started = Instant::now();
    cut_off
        .testing_batch_execute("BEGIN; UPDATE provider_state SET value = '\\x31' WHERE key = 'x'")
        .await
        .unwrap();
    relay.cut();
    tokio::time::timeout(
        Duration::from_secs(20),
        store.put_provider_state("x", b"2".to_vec()),
    )
    .await
    .expect("the cut-off session kept its lock")
    .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(4_900),
        "{:?}: no lock was held",
        started.elapsed()
    );
    assert_eq!(
        store.get_provider_state("x").await.unwrap(),
        Some(b"2".to_vec())
    );
    store.testing_drop_schema().await.unwrap();
}
