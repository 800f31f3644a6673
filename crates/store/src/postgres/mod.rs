//! The PostgreSQL 15+ backend, for many stateless nodes sharing one cluster.
//!
//! - `tokio-postgres` with a `deadpool` connection pool, runtime queries only (prepared and
//!   cached per connection).
//! - **TLS** (rustls): a server that is not on this host is reached over TLS only, its
//!   certificate verified against [`PostgresOptions::tls`] (the platform's roots, or a CA
//!   file), whatever the connection string's `sslmode` says short of `disable`, and
//!   `sslmode=disable` is refused for it. On this host (loopback or a Unix socket) the
//!   default `sslmode=prefer` connects in the clear; `sslmode=require` asks for verified TLS
//!   there too.
//! - A put locks its credential row (`SELECT ... FOR UPDATE`; a new credential is created
//!   with `INSERT ... ON CONFLICT DO NOTHING`), so racing writers serialize on that row and
//!   the loser sees the winner's version number. `UNIQUE (credential_id, version)` backs it
//!   up: a unique violation is reported as [`StoreError::Conflict`].
//! - A put that creates a credential under a quota
//!   ([`NewVersion::max_credentials`](crate::NewVersion::max_credentials)) then takes a
//!   transaction-scoped advisory lock for its owner and counts the owner's live credentials
//!   under it, so creators racing on several nodes never overshoot.
//! - A write is acknowledged when its `COMMIT` returns. With the server's default
//!   `synchronous_commit = on` and `fsync = on`, that means flushed to the server's WAL.
//!   PostgreSQL group-commits concurrent transactions by itself.
//! - Migrations run at connect, serialized across nodes by an advisory lock.
//! - [`PostgresOptions::schema`] puts every table in a schema of its own (set as the
//!   connections' `search_path`), e.g. one per test.

mod schema;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use time::OffsetDateTime;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::BackendError;
use crate::types::{
    bound_millis, clamp_limit, from_millis, to_millis, validate_kek, validate_owner,
    validate_owner_name, validate_version, version_from_db, Change,
};
use crate::{
    allowance, validate_provider_key, Credential, CredentialSummary, Cursor, KekFilter, KekRef,
    NewVersion, Page, PutOutcome, RateLimit, RewrapItem, SealedVersion, Store, StoreError,
    VersionInfo, VersionState, MAX_PROVIDER_STATE_LEN, MAX_WRAPPED_KEY_LEN, SCHEMA_VERSION,
    TRIM_TOMBSTONES_PER_PUT,
};

const _: () = assert!(schema::MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// The advisory lock key that serializes migrations ("strongrm" in ASCII).
const MIGRATION_LOCK: i64 = 0x7374_726f_6e67_726d;

/// The first key of the per-owner advisory locks that serialize credential creation for the
/// quota (`check_quota`); the second is the owner's hash. Two-key locks never meet the
/// one-key migration lock.
const QUOTA_LOCK_CLASS: i32 = 0x7371_7461; // "sqta"

/// Tuning for [`PostgresStore::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// Most pooled connections (default 16).
    pub max_connections: usize,
    /// Put the tables in this schema (created if absent) instead of the connection's
    /// default. Lowercase ASCII letters, digits and `_`, starting with a letter or `_`.
    pub schema: Option<String>,
    /// How long to wait for a pooled connection or a new one (default 10 s).
    pub timeout: Duration,
    /// Whom to trust for the server's TLS certificate (default: the platform's roots).
    pub tls: PostgresTls,
    /// Create the schema and Strongroom's tables when they are missing (default `true`).
    /// With `false` a database (or schema) without them is an error, so an operator command
    /// pointed at the wrong database does not start an empty store there.
    pub create: bool,
    /// Longest a statement may run at the server before it cancels it (default: none, the
    /// server's own `statement_timeout`). A caller that stops waiting (a request that timed
    /// out, a client that hung up) drops its query, but the server would run it to the end,
    /// holding a backend and the pooled connection; the server sets this to its request
    /// timeout. Migrations are exempt.
    pub statement_timeout: Option<Duration>,
}

/// Whom the PostgreSQL connections trust for the server's certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PostgresTls {
    /// The platform's trust store.
    #[default]
    SystemRoots,
    /// The CA certificates (PEM) in this file, and only them.
    CaFile(PathBuf),
}

impl PostgresTls {
    fn connector(&self) -> Result<MakeRustlsConnect, StoreError> {
        let mut roots = rustls::RootCertStore::empty();
        match self {
            PostgresTls::SystemRoots => {
                // Unreadable entries are skipped: an empty store then fails every handshake.
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
            PostgresTls::CaFile(path) => {
                use rustls::pki_types::pem::PemObject;
                let ca_error = |why: String| {
                    StoreError::Config(format!("PostgreSQL CA file {}: {why}", path.display()))
                };
                let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|e| ca_error(format!("cannot be read ({})", pem_reason(&e))))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ca_error(format!("is not valid PEM ({})", pem_reason(&e))))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| ca_error(format!("holds an unusable certificate ({e})")))?;
                }
                if roots.is_empty() {
                    return Err(ca_error(
                        "holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)".into(),
                    ));
                }
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Unavailable(BackendError::new(e)))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

/// Whether every host of `config` is on this machine (loopback or a Unix socket).
fn local_only(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|h| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }) && config
        .get_hostaddrs()
        .iter()
        .all(std::net::IpAddr::is_loopback)
}

/// Parses `url` and applies this module's TLS rule to it, and builds the connector that
/// verifies the server against `tls`: for every PostgreSQL client of Strongroom (the store,
/// the Django importer).
///
/// # Errors
///
/// [`StoreError::Config`] for a malformed connection string, `sslmode=disable` to a server
/// not on this host, or an unusable CA file.
pub fn client_config(
    url: &str,
    tls: &PostgresTls,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), StoreError> {
    let mut config: tokio_postgres::Config =
        with_verify_modes_as_require(url).parse().map_err(|e| {
            StoreError::Config(format!(
                "malformed PostgreSQL connection string: {}",
                parse_reason(&e)
            ))
        })?;
    enforce_tls(&mut config)?;
    Ok((config, tls.connector()?))
}

/// libpq's `sslmode=verify-full` and `verify-ca`, which tokio-postgres does not know, as
/// `require`: Strongroom's TLS always verifies the certificate chain and the host name, so
/// `require` here already means `verify-full` (and is stricter than `verify-ca`). Handles
/// both the URL form (`?sslmode=verify-full&...`) and the key/value form
/// (`sslmode = verify-ca`).
fn with_verify_modes_as_require(url: &str) -> std::borrow::Cow<'_, str> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let mut from = 0;
    while let Some(found) = url[from..].find("sslmode") {
        let key = from + found;
        from = key + "sslmode".len();
        let boundary = if is_url { ['?', '&'] } else { [' ', '\t'] };
        if key > 0 && !url[..key].ends_with(boundary) {
            continue;
        }
        let rest = &url[from..];
        let after_eq = if is_url {
            rest.strip_prefix('=')
        } else {
            rest.trim_start().strip_prefix('=').map(str::trim_start)
        };
        let Some(value) = after_eq else { continue };
        for mode in ["verify-full", "verify-ca"] {
            let ends =
                |tail: &str| tail.is_empty() || tail.starts_with(if is_url { '&' } else { ' ' });
            if value.strip_prefix(mode).is_some_and(ends) {
                let value_at = url.len() - value.len();
                return format!(
                    "{}require{}",
                    &url[..value_at],
                    &url[value_at + mode.len()..]
                )
                .into();
            }
        }
    }
    url.into()
}

/// Why tokio-postgres refused a connection string, without the string: its own messages
/// name an option ("invalid value for option `port`") but one quotes a character of the
/// input, which could be part of a password, so that one is cut short.
fn parse_reason(e: &tokio_postgres::Error) -> String {
    let Some(cause) = std::error::Error::source(e) else {
        return e.to_string();
    };
    let cause = cause.to_string();
    match cause.find(": expected") {
        Some(cut) if cause.starts_with("unexpected character") => cause[..cut].to_owned(),
        _ => cause,
    }
}

/// A PEM reading error, without the file's contents.
fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(io) => io.to_string(),
        E::MissingSectionEnd { .. } => "a BEGIN line without its END line".to_owned(),
        E::IllegalSectionStart { .. } => "a malformed BEGIN line".to_owned(),
        E::Base64Decode(_) => "bad base64".to_owned(),
        _ => "unreadable PEM".to_owned(),
    }
}

/// Applies the TLS rule (module docs): remote servers only over verified TLS.
fn enforce_tls(config: &mut tokio_postgres::Config) -> Result<(), StoreError> {
    let local = local_only(config);
    match config.get_ssl_mode() {
        SslMode::Disable if !local => Err(StoreError::Config(
            "sslmode=disable is refused for a PostgreSQL server that is not on this host: \
             sealed values and the password would cross the network in the clear"
                .to_owned(),
        )),
        SslMode::Prefer if local => {
            config.ssl_mode(SslMode::Disable);
            Ok(())
        }
        SslMode::Disable | SslMode::Require => Ok(()),
        _ => {
            config.ssl_mode(SslMode::Require);
            Ok(())
        }
    }
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 16,
            schema: None,
            timeout: Duration::from_secs(10),
            tls: PostgresTls::default(),
            create: true,
            statement_timeout: None,
        }
    }
}

/// The PostgreSQL [`Store`]. Cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct PostgresStore {
    sessions: Arc<Sessions>,
    schema: Option<String>,
    durability: Arc<Vec<String>>,
    /// Longest an operation waits for the server (see [`PostgresStore::bounded`]).
    deadline: Option<Duration>,
}

/// How much longer than the statement timeout an operation waits for the server before it
/// gives up on the connection: the server's own cancel comes first when it can.
const DEADLINE_MARGIN: Duration = Duration::from_secs(5);

/// TCP settings of every connection: a server host that stops answering (a network
/// partition, a host gone during a failover) is noticed in tens of seconds, not after the
/// kernel's defaults (two hours idle, about fifteen minutes with data unacknowledged). The
/// connection string's own settings win.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Each session's own limits at the server (see `session_setup`): a transaction idle for
/// 5 s is ended (its locks released), and a client that stopped answering is noticed within
/// about a minute.
const SERVER_SIDE_TIMEOUTS: &str = "SET idle_in_transaction_session_timeout = '5s'; \
     SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
     SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000";

/// SQLSTATE `read_only_sql_transaction`, as [`describe`] writes it into an error.
const READ_ONLY_SQLSTATE: &str = " 25006:";

/// How long a connection whose operation was given up on mid-way may take to answer a
/// trivial query before it is closed rather than pooled again.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// A pooled connection, taken for one operation. It goes back to the pool at once only when
/// the operation ran to its end ([`Conn::settle`]). Dropped before (the operation's future
/// was dropped: its request timed out, its client went away), a statement may still be
/// running on it, or stuck behind a server that stopped answering, and whoever took the
/// connection next would wait behind it: a task of its own waits up to [`DRAIN_WAIT`] for
/// the connection to answer (after the rollback of any transaction left open, which
/// tokio-postgres queues), then pools it, or closes it. Past its deadline, it is closed.
struct Conn<'p> {
    obj: Option<deadpool_postgres::Object>,
    sessions: &'p Sessions,
    deadline: Option<Duration>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &Self::Target {
        // Taken out only by `settle`, `discard` and `drop`, which end the `Conn`.
        self.obj.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.obj.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Conn<'_> {
    /// Ends the operation with its outcome (`None`: it ran past its deadline). The
    /// connection goes back to the pool, except:
    /// * past the deadline, it is closed, and the operation fails as unavailable;
    /// * when the server refused a write as read-only, it is closed, and the idle ones
    ///   with it ([`Sessions::close_idle`]): each keeps the read-only session it was opened
    ///   with (a standby, or `default_transaction_read_only`), so the store would never
    ///   take writes again once the server does.
    fn settle<T>(mut self, out: Option<Result<T, StoreError>>) -> Result<T, StoreError> {
        match out {
            None => {
                self.close_now();
                Err(StoreError::unavailable(format!(
                    "no answer from the PostgreSQL server within {} s; the connection was \
                     closed (whether the operation took effect is not known)",
                    self.deadline.unwrap_or_default().as_secs()
                )))
            }
            Some(Err(e)) if e.to_string().contains(READ_ONLY_SQLSTATE) => {
                self.close_now();
                self.sessions.close_idle();
                Err(e)
            }
            Some(out) => {
                drop(self.obj.take());
                out
            }
        }
    }

    /// Ends the operation and closes the connection rather than pooling it again.
    fn discard(mut self) {
        self.close_now();
    }

    fn close_now(&mut self) {
        if let Some(obj) = self.obj.take() {
            Self::close(obj);
        }
    }

    /// Closes the connection: out of the pool, then dropped.
    fn close(obj: deadpool_postgres::Object) {
        drop(deadpool_postgres::Object::take(obj));
    }
}

/// The pool, and when its idle connections were last closed for being read-only.
struct Sessions {
    pool: Pool,
    last_closed: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Sessions {
    /// Closes the pool's idle connections: each keeps the session it was opened with,
    /// read-only after a failover to a standby. At most once a second, so that a burst of
    /// refused writes during a failover does not turn into a burst of reconnections (the
    /// connection that met the refusal is closed by its caller in any case).
    fn close_idle(&self) {
        let mut last = self.last_closed.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        self.pool.retain(|_, _| false);
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let Some(obj) = self.obj.take() else { return };
        // The common case, a client gone mid-query, keeps its connection: closing it would
        // make every hang-up cost a new connection (a fork, TLS and authentication at the
        // server), which anyone can cause.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    // A statement prepared mid-way (its Parse sent, its answer never read)
                    // has no handle to close it: every prepared statement goes, with the
                    // cache that names them.
                    obj.statement_cache.clear();
                    let drained = obj.simple_query("DEALLOCATE ALL");
                    match tokio::time::timeout(DRAIN_WAIT, drained).await {
                        Ok(Ok(_)) => drop(obj),
                        _ => Self::close(obj),
                    }
                });
            }
            Err(_) => Self::close(obj),
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the connection string: it may hold a password.
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .field("pool", &self.sessions.pool.status())
            .finish_non_exhaustive()
    }
}

/// Classifies a tokio-postgres error by kind, wrapping it opaquely.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(c) if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED => {
            StoreError::corrupt(describe(&e))
        }
        _ => StoreError::Unavailable(BackendError::msg(describe(&e))),
    }
}

/// What went wrong, for operators: tokio-postgres itself says only "db error" for anything
/// the server refused. The server's severity, SQLSTATE and message name the problem
/// ("permission denied for table versions"); its DETAIL and WHERE parts, which can quote row
/// values, are left out. Other errors (connection, TLS, I/O) are their chain of causes.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "postgres {} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        );
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StoreError::Unavailable(BackendError::new(other)),
    }
}

/// What the new connections' setup saw of the server's settings (see [`session_setup`]).
#[derive(Default)]
struct SettingsSeen {
    /// `synchronous_commit` was off, and this store set it on.
    synchronous_commit_raised: std::sync::atomic::AtomicBool,
    /// `fsync` is off.
    fsync_off: std::sync::atomic::AtomicBool,
    /// `full_page_writes` is off.
    full_page_writes_off: std::sync::atomic::AtomicBool,
}

/// Each new connection's setup, before the pool hands it out.
///
/// - A commit with `synchronous_commit = off` is answered before it reaches the server's WAL
///   on disk, so a crash of the PostgreSQL server could lose a put already answered 201. The
///   database, the role or the connection string may set it off; each new connection turns
///   it back on. Stronger settings (`remote_write`, `remote_apply`) and `local` stay as they
///   are. What was seen goes to `seen`, for [`PostgresStore::durability_warnings`].
/// - `statement_timeout` is set last, so that a short limit meant for requests never fails
///   the setup itself on a busy host (it once failed a 1 ms limit's connect under load).
fn session_setup(
    seen: Arc<SettingsSeen>,
    statement_timeout: Option<Duration>,
) -> deadpool_postgres::Hook {
    use std::sync::atomic::Ordering::Release;
    deadpool_postgres::Hook::async_fn(move |client, _| {
        let seen = seen.clone();
        Box::pin(async move {
            let row = client
                .query_one(
                    "SELECT current_setting('synchronous_commit'), current_setting('fsync'), \
                     current_setting('full_page_writes')",
                    &[],
                )
                .await
                .map_err(deadpool_postgres::HookError::Backend)?;
            let setting = |i: usize| -> Result<String, deadpool_postgres::HookError> {
                row.try_get(i)
                    .map_err(deadpool_postgres::HookError::Backend)
            };
            let (sync, fsync, full_pages) = (setting(0)?, setting(1)?, setting(2)?);
            if sync == "off" {
                client
                    .batch_execute("SET synchronous_commit = on")
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)?;
                seen.synchronous_commit_raised.store(true, Release);
            }
            seen.fsync_off.store(fsync == "off", Release);
            seen.full_page_writes_off
                .store(full_pages == "off", Release);
            // The server's side of a connection whose client is gone (a partition, a host
            // lost in a failover): a transaction it left open holds its locks (every put
            // takes the audit head's row) until the server notices, by default after two
            // hours of TCP keepalives. Strongroom's transactions send their statements back
            // to back, so one idle for seconds has lost its client.
            client
                .batch_execute(SERVER_SIDE_TIMEOUTS)
                .await
                .map_err(deadpool_postgres::HookError::Backend)?;
            if let Some(t) = statement_timeout {
                // At least 1 ms: 0 would mean no limit.
                client
                    .batch_execute(&format!("SET statement_timeout = {}", t.as_millis().max(1)))
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)?;
            }
            Ok(())
        })
    })
}

/// What in the server's settings, as the connections' setup saw them, would lose
/// acknowledged writes on a crash, in words for the operator.
fn durability_warnings(seen: &SettingsSeen) -> Vec<String> {
    use std::sync::atomic::Ordering::Acquire;
    let mut warnings = Vec::new();
    if seen.synchronous_commit_raised.load(Acquire) {
        warnings.push(
            "the PostgreSQL server's synchronous_commit is off for this database, role or \
             connection string; Strongroom sets it on for each of its sessions, so a write \
             is acknowledged only once it is in the server's WAL on disk (a transaction \
             pooler such as pgbouncer hands transactions to other sessions: set it on for \
             the role or database instead)"
                .to_owned(),
        );
    }
    if seen.fsync_off.load(Acquire) {
        warnings.push(
            "the PostgreSQL server runs with fsync = off: a crash of its host can lose \
             acknowledged credential versions and audit records, or corrupt the database"
                .to_owned(),
        );
    }
    if seen.full_page_writes_off.load(Acquire) {
        warnings.push(
            "the PostgreSQL server runs with full_page_writes = off: a crash of its host \
             can corrupt the database"
                .to_owned(),
        );
    }
    warnings
}

/// The servers a configuration names, as `host:port` (or the socket folder), for errors.
fn describe_target(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let mut hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| match host {
            Host::Tcp(name) => format!("{name}:{}", port(i)),
            Host::Unix(dir) => format!("{} (port {})", dir.display(), port(i)),
        })
        .collect();
    if hosts.is_empty() {
        // `hostaddr=` alone names the server by address.
        hosts = config
            .get_hostaddrs()
            .iter()
            .enumerate()
            .map(|(i, addr)| std::net::SocketAddr::new(*addr, port(i)).to_string())
            .collect();
    }
    if hosts.is_empty() {
        "the default host".to_owned()
    } else {
        hosts.join(", ")
    }
}

/// What a schema name may be, as said to the operator who chose a wrong one.
const SCHEMA_NAME_RULE: &str = "a schema name is 1 to 63 lowercase ASCII letters, digits \
    and underscores, not starting with a digit, and neither `information_schema` nor `pg_*` \
    (PostgreSQL's own)";

fn valid_schema_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
        && !s.starts_with("pg_")
        && s != "information_schema"
}

impl PostgresStore {
    /// Connects to `url` (a libpq-style URL or key/value string, e.g.
    /// `postgresql://user@127.0.0.1:5432/strongroom`), creates the schema if
    /// [`PostgresOptions::schema`] names one, and applies migrations.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for a malformed URL or schema name or an unusable CA file;
    /// [`StoreError::Unavailable`] if the server cannot be reached;
    /// [`StoreError::SchemaTooNew`] for a database written by a newer Strongroom.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let (mut config, tls) = client_config(url, &options.tls)?;
        if let Some(schema) = &options.schema {
            if !valid_schema_name(schema) {
                return Err(StoreError::Config(SCHEMA_NAME_RULE.to_owned()));
            }
        }
        let target = describe_target(&config);
        // The first connection says which server could not be reached (never the password).
        let naming = |e: StoreError| match e {
            StoreError::Unavailable(inner) => StoreError::Unavailable(BackendError::msg(format!(
                "PostgreSQL at {target}: {inner}"
            ))),
            other => other,
        };
        if let Some(schema) = options.schema.as_ref().filter(|_| options.create) {
            // Create it on a plain connection first: the pool's connections use it.
            let mut plain = config.clone();
            plain.connect_timeout(options.timeout);
            let (client, conn) = plain
                .connect(tls.clone())
                .await
                .map_err(|e| naming(pg_err(e)))?;
            let task = tokio::spawn(conn);
            let created = client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .await;
            drop(client);
            let _ = task.await;
            if let Err(e) = created {
                // Racing creators: the loser's unique violation means it exists now.
                if !is_unique_violation(&e) {
                    return Err(pg_err(e));
                }
            }
        }
        // After any options the connection string gives (`options=-c ...`), not instead.
        let mut settings: Vec<String> =
            config.get_options().map(String::from).into_iter().collect();
        if let Some(schema) = &options.schema {
            settings.push(format!("-c search_path={schema}"));
        }
        if !settings.is_empty() {
            config.options(settings.join(" "));
        }
        config.connect_timeout(options.timeout);
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        // tokio-postgres's own idle default (two hours) stands for "not set".
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let seen = Arc::new(SettingsSeen::default());
        let pool = Pool::builder(manager)
            .post_create(session_setup(seen.clone(), options.statement_timeout))
            .max_size(options.max_connections.max(1))
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unavailable(BackendError::new(e)))?;
        let mut store = PostgresStore {
            sessions: Arc::new(Sessions {
                pool,
                last_closed: std::sync::Mutex::new(None),
            }),
            schema: options.schema,
            durability: Arc::default(),
            deadline: options.statement_timeout.map(|t| t + DEADLINE_MARGIN),
        };
        store.migrate(options.create).await.map_err(naming)?;
        // The migration took a connection: its setup has seen the settings.
        store.durability = Arc::new(durability_warnings(&seen));
        Ok(store)
    }

    /// What in the server's settings would lose acknowledged writes on a crash, in words
    /// for the operator (empty when nothing does). Read at connect.
    pub fn durability_warnings(&self) -> &[String] {
        &self.durability
    }

    /// A credential and its versions numbered below `before` (all: `None`), newest first, at
    /// most `limit` of them (all: `None`). One statement, so the credential and its versions
    /// come from one snapshot; the versions are one backward range of the
    /// `(credential_id, version)` index, stopped after `limit + 1` rows (the extra one only
    /// says whether more remain).
    async fn read_credential(
        &self,
        owner: &str,
        name: &str,
        before: Option<u32>,
        limit: Option<u32>,
    ) -> Result<Credential, StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {SUMMARY_COLS}, v.version, v.state, v.kek_provider, v.kek_key_id,
                            v.kek_version, v.metadata, v.created_by, v.created_at, v.destroyed_at
                     {SUMMARY_FROM}
                     LEFT JOIN LATERAL (
                         SELECT * FROM versions
                         WHERE credential_id = c.id AND version < $3::bigint
                         ORDER BY version DESC LIMIT $4::bigint
                     ) v ON TRUE
                     WHERE c.owner = $1 AND c.name = $2 AND NOT c.deleted
                     ORDER BY v.version DESC"
                    ))
                    .await
                    .map_err(pg_err)?;
                let below = before.map_or(i64::MAX, i64::from);
                // LIMIT NULL is no limit.
                let rows_wanted = limit.map(|l| i64::from(l) + 1);
                let rows = client
                    .query(&stmt, &[&owner, &name, &below, &rows_wanted])
                    .await
                    .map_err(pg_err)?;
                let first = rows.first().ok_or(StoreError::NotFound)?;
                let summary = summary(first)?;
                let mut versions = Vec::with_capacity(rows.len());
                for r in &rows {
                    let Some(v) = r.try_get::<_, Option<i32>>(9).map_err(pg_err)? else {
                        continue;
                    };
                    let (metadata, metadata_unreadable) = listed(r.try_get(14).map_err(pg_err)?);
                    versions.push(VersionInfo {
                        version: ver_from(v)?,
                        state: VersionState::from_db(i64::from(
                            r.try_get::<_, i16>(10).map_err(pg_err)?,
                        ))?,
                        kek: kek_from(
                            r.try_get(11).map_err(pg_err)?,
                            r.try_get(12).map_err(pg_err)?,
                            r.try_get(13).map_err(pg_err)?,
                        )?,
                        metadata,
                        metadata_unreadable,
                        created_by: r.try_get(15).map_err(pg_err)?,
                        created_at: from_millis(r.try_get(16).map_err(pg_err)?)?,
                        destroyed_at: r
                            .try_get::<_, Option<i64>>(17)
                            .map_err(pg_err)?
                            .map(from_millis)
                            .transpose()?,
                    });
                }
                let versions_next = crate::types::cut_page(&mut versions, limit);
                Ok(Credential {
                    summary,
                    versions,
                    versions_next,
                })
            })
            .await;
        client.settle(out)
    }

    async fn client(&self) -> Result<Conn<'_>, StoreError> {
        let obj = self.sessions.pool.get().await.map_err(pool_err)?;
        Ok(Conn {
            obj: Some(obj),
            sessions: &self.sessions,
            deadline: self.deadline,
        })
    }

    /// Runs one operation on a connection within the store's deadline (the statement timeout
    /// and a margin; none when there is no statement timeout): `None` when it ran past it.
    /// The server cancels a statement at its timeout; this bounds what it cannot cancel (a
    /// backend or host that stopped answering), for every caller, the audit writer too.
    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Option<Result<T, StoreError>> {
        match self.deadline {
            Some(d) => tokio::time::timeout(d, op).await.ok(),
            None => Some(op.await),
        }
    }

    async fn migrate(&self, create: bool) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        // Not bounded by the store's deadline: a migration runs as long as it takes.
        let out = Some(
            async {
                let tx = client.transaction().await.map_err(pg_err)?;
                // A migration rewrites whole tables (the audit time marks read every record): it
                // runs as long as it takes, and waits as long as another node's does.
                tx.batch_execute("SET LOCAL statement_timeout = 0")
                    .await
                    .map_err(pg_err)?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await
                    .map_err(pg_err)?;
                if !create {
                    // Looked up through the search path, as every later query is.
                    let found: bool = tx
                        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
                        .await
                        .map_err(pg_err)?
                        .try_get(0)
                        .map_err(pg_err)?;
                    if !found {
                        return Err(StoreError::unavailable(
                        "no Strongroom tables in this database (or schema); this command works on \
                         an existing store (the server makes them on its first start)",
                    ));
                    }
                }
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (
                     id      INTEGER PRIMARY KEY CHECK (id = 1),
                     version INTEGER NOT NULL
                 )",
                )
                .await
                .map_err(pg_err)?;
                let found: i32 = tx
                    .query_opt("SELECT version FROM schema_version WHERE id = 1", &[])
                    .await
                    .map_err(pg_err)?
                    .map(|r| r.try_get(0))
                    .transpose()
                    .map_err(pg_err)?
                    .unwrap_or(0);
                let found = u32::try_from(found)
                    .map_err(|_| StoreError::corrupt("schema version out of range"))?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                for sql in schema::MIGRATIONS.iter().skip(found as usize) {
                    tx.batch_execute(sql).await.map_err(pg_err)?;
                }
                let v = SCHEMA_VERSION as i32;
                tx.execute(
                    "INSERT INTO schema_version (id, version) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    &[&v],
                )
                .await
                .map_err(pg_err)?;
                tx.commit().await.map_err(pg_err)
            }
            .await,
        );
        client.settle(out)
    }
}

// ---- row helpers -------------------------------------------------------------------------

fn ver_param(v: u32) -> i32 {
    // Invariant: every version number was checked by `validate_version` (or
    // `NewVersion::validate`) to be at most i32::MAX before it reaches SQL.
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn ver_from(v: i32) -> Result<u32, StoreError> {
    version_from_db(i64::from(v))
}

fn kek_from(provider: String, key_id: String, version: i64) -> Result<KekRef, StoreError> {
    Ok(KekRef {
        provider,
        key_id,
        version: u32::try_from(version)
            .map_err(|_| StoreError::corrupt("KEK version out of range"))?,
    })
}

struct CredRow {
    id: i64,
    latest: u32,
    current: Option<u32>,
    deleted: bool,
}

fn cred_row(r: &Row) -> Result<CredRow, StoreError> {
    Ok(CredRow {
        id: r.try_get(0).map_err(pg_err)?,
        latest: ver_from(r.try_get(1).map_err(pg_err)?)?,
        current: r
            .try_get::<_, Option<i32>>(2)
            .map_err(pg_err)?
            .map(ver_from)
            .transpose()?,
        deleted: r.try_get(3).map_err(pg_err)?,
    })
}

const LOCK_CREDENTIAL: &str = "SELECT id, latest_version, current_version, deleted
     FROM credentials WHERE owner = $1 AND name = $2 FOR UPDATE";

/// Locks the live credential row, or `NotFound`.
async fn lock_live(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    name: &str,
) -> Result<CredRow, StoreError> {
    let stmt = tx.prepare_cached(LOCK_CREDENTIAL).await.map_err(pg_err)?;
    match tx
        .query_opt(&stmt, &[&owner, &name])
        .await
        .map_err(pg_err)?
    {
        Some(r) => {
            let c = cred_row(&r)?;
            if c.deleted {
                Err(StoreError::NotFound)
            } else {
                Ok(c)
            }
        }
        None => Err(StoreError::NotFound),
    }
}

async fn version_state(
    tx: &deadpool_postgres::Transaction<'_>,
    credential_id: i64,
    version: u32,
) -> Result<Option<VersionState>, StoreError> {
    let stmt = tx
        .prepare_cached("SELECT state FROM versions WHERE credential_id = $1 AND version = $2")
        .await
        .map_err(pg_err)?;
    tx.query_opt(&stmt, &[&credential_id, &ver_param(version)])
        .await
        .map_err(pg_err)?
        .map(|r| {
            r.try_get::<_, i16>(0)
                .map_err(pg_err)
                .and_then(|s| VersionState::from_db(i64::from(s)))
        })
        .transpose()
}

const SUMMARY_COLS: &str = "c.owner, c.name, c.enabled, c.current_version, c.latest_version,
     c.created_at, c.updated_at, c.last_used_at, cv.metadata";
const SUMMARY_FROM: &str = "FROM credentials c
     LEFT JOIN versions cv ON cv.credential_id = c.id AND cv.version = c.current_version";

/// Metadata as a listing shows it: an object, or `null` and `true` when the row holds
/// anything else (JSONB always parses, but every put stores an object).
fn listed(metadata: serde_json::Value) -> (serde_json::Value, bool) {
    if metadata.is_object() {
        (metadata, false)
    } else {
        (serde_json::Value::Null, true)
    }
}

fn summary(r: &Row) -> Result<CredentialSummary, StoreError> {
    let current_metadata: Option<serde_json::Value> = r.try_get(8).map_err(pg_err)?;
    let current_metadata_unreadable = current_metadata.as_ref().is_some_and(|m| !m.is_object());
    Ok(CredentialSummary {
        owner: r.try_get(0).map_err(pg_err)?,
        name: r.try_get(1).map_err(pg_err)?,
        enabled: r.try_get(2).map_err(pg_err)?,
        current_version: r
            .try_get::<_, Option<i32>>(3)
            .map_err(pg_err)?
            .map(ver_from)
            .transpose()?,
        latest_version: ver_from(r.try_get(4).map_err(pg_err)?)?,
        created_at: from_millis(r.try_get(5).map_err(pg_err)?)?,
        updated_at: from_millis(r.try_get(6).map_err(pg_err)?)?,
        last_used_at: r
            .try_get::<_, Option<i64>>(7)
            .map_err(pg_err)?
            .map(from_millis)
            .transpose()?,
        current_metadata: current_metadata.filter(serde_json::Value::is_object),
        current_metadata_unreadable,
    })
}

const DESTROY_SET: &str =
    "state = 1, sealed_value = ''::bytea, wrapped_key = ''::bytea, destroyed_at = $1";

async fn put_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    nv: &NewVersion,
) -> Result<PutOutcome, StoreError> {
    let now = to_millis(nv.created_at)?;
    let version = ver_param(nv.version);
    let lock = tx.prepare_cached(LOCK_CREDENTIAL).await.map_err(pg_err)?;
    let mut existing = tx
        .query_opt(&lock, &[&nv.owner, &nv.name])
        .await
        .map_err(pg_err)?
        .map(|r| cred_row(&r))
        .transpose()?;
    // Whether this transaction inserted the credential row (a new credential).
    let mut inserted_here = false;
    loop {
        let (latest, current) = match &existing {
            Some(c) if c.deleted => (c.latest, None),
            Some(c) => (c.latest, c.current),
            None => (0, None),
        };
        if let Some(expected) = nv.expected_current {
            if current.unwrap_or(0) != expected {
                return Err(StoreError::CurrentMismatch { current });
            }
        }
        if u64::from(nv.version) != u64::from(latest) + 1 {
            return Err(StoreError::Conflict { latest });
        }
        if existing.is_some() {
            break;
        }
        // A new credential. If a racing writer creates it first, ON CONFLICT waits for its
        // commit and inserts nothing; we then lock its row and check again.
        let insert = tx
            .prepare_cached(
                "INSERT INTO credentials (owner, name, enabled, deleted, current_version,
                     latest_version, created_at, updated_at)
                 VALUES ($1, $2, TRUE, FALSE, NULL, 0, $3, $3)
                 ON CONFLICT (owner, name) DO NOTHING
                 RETURNING id, latest_version, current_version, deleted",
            )
            .await
            .map_err(pg_err)?;
        match tx
            .query_opt(&insert, &[&nv.owner, &nv.name, &now])
            .await
            .map_err(pg_err)?
        {
            Some(r) => {
                existing = Some(cred_row(&r)?);
                inserted_here = true;
            }
            None => {
                existing = tx
                    .query_opt(&lock, &[&nv.owner, &nv.name])
                    .await
                    .map_err(pg_err)?
                    .map(|r| cred_row(&r))
                    .transpose()?;
                if existing.is_none() {
                    return Err(StoreError::unavailable(
                        "credential row vanished during put",
                    ));
                }
            }
        }
    }
    let Some(cred) = existing else {
        return Err(StoreError::unavailable(
            "credential row vanished during put",
        ));
    };
    if let Some(limit) = nv.max_credentials.filter(|_| inserted_here || cred.deleted) {
        check_quota(tx, &nv.owner, cred.id, limit).await?;
    }
    let latest = cred.latest;
    let update = tx
        .prepare_cached(
            "UPDATE credentials SET
                 latest_version = $2, current_version = $2, updated_at = $3,
                 enabled = enabled OR deleted,
                 created_at = CASE WHEN deleted THEN $3 ELSE created_at END,
                 last_used_at = CASE WHEN deleted THEN NULL ELSE last_used_at END,
                 deleted = FALSE
             WHERE id = $1",
        )
        .await
        .map_err(pg_err)?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO versions (credential_id, version, state, kek_provider, kek_key_id,
                 kek_version, metadata, created_by, created_at, wrapped_key, sealed_value)
             VALUES ($1, $2, 0, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .await
        .map_err(pg_err)?;
    let retain = tx
        .prepare_cached(&format!(
            "UPDATE versions SET {DESTROY_SET}
             WHERE id IN (SELECT id FROM versions
                          WHERE credential_id = $2 AND state = 0 AND version <> $3
                          ORDER BY version DESC OFFSET $4)
             RETURNING version"
        ))
        .await
        .map_err(pg_err)?;
    // Tombstone retention: deletes the destroyed versions more than `keep_destroyed` numbers
    // behind this one, oldest first and at most TRIM_TOMBSTONES_PER_PUT (a backlog after an
    // upgrade goes over the following puts), after the retirement (so a version retired
    // just now counts too).
    let trim = tx
        .prepare_cached(
            "DELETE FROM versions WHERE id IN (
                 SELECT id FROM versions WHERE credential_id = $1 AND version < $2 AND state = 1
                 ORDER BY version LIMIT $3)",
        )
        .await
        .map_err(pg_err)?;
    let trim_bound = nv.tombstones_due_below();
    let trim_bound_param = ver_param(trim_bound.unwrap_or(0));
    let kek_version = i64::from(nv.kek.version);
    let keep = i64::from(nv.max_versions) - 1;
    // Send the four statements pipelined and wait once. None needs another's result, but
    // the trim must run after the retirement: tokio-postgres sends each statement when
    // `join!` first polls it, in the order written, and the server runs them in that order
    // (the suite's window-0 case fails if they are swapped).
    let update_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&cred.id, &version, &now];
    let insert_params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
        &cred.id,
        &version,
        &nv.kek.provider,
        &nv.kek.key_id,
        &kek_version,
        &nv.metadata,
        &nv.created_by,
        &now,
        &nv.wrapped_key,
        &nv.sealed_value,
    ];
    let retain_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&now, &cred.id, &version, &keep];
    let trim_limit = i64::from(TRIM_TOMBSTONES_PER_PUT);
    let trim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&cred.id, &trim_bound_param, &trim_limit];
    let (updated, inserted, retired, trimmed) = tokio::join!(
        tx.execute(&update, &update_params),
        tx.execute(&insert, &insert_params),
        tx.query(&retain, &retain_params),
        async {
            if trim_bound.is_some() {
                tx.execute(&trim, &trim_params).await.map(|_| ())
            } else {
                Ok(())
            }
        },
    );
    updated.map_err(pg_err)?;
    match inserted {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict { latest }),
        Err(e) => return Err(pg_err(e)),
    }
    // In the order sent: a failed retirement aborts the transaction, and the trim's error
    // would only say so.
    let mut retired = retired
        .map_err(pg_err)?
        .iter()
        .map(|r| r.try_get::<_, i32>(0).map_err(pg_err).and_then(ver_from))
        .collect::<Result<Vec<u32>, _>>()?;
    trimmed.map_err(pg_err)?;
    retired.sort_unstable();
    Ok(PutOutcome {
        version: nv.version,
        retired,
    })
}

/// Refuses a put that makes credential `id` live when `owner` already has `limit` other live
/// credentials.
///
/// Creators of one owner's credentials, on every node, take turns on a transaction-scoped
/// advisory lock for that owner, held to their commit; each counts only once it holds it,
/// with a statement that (at READ COMMITTED, the isolation every transaction here relies on)
/// sees what the previous holder committed. So racing creators never overshoot. Lock order:
/// the credential row (inserted or locked above), then this lock, then the audit head; no
/// transaction waits for a credential row while holding it, so there is no deadlock. Owners
/// whose hashes collide only share turns.
async fn check_quota(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    id: i64,
    limit: u32,
) -> Result<(), StoreError> {
    let lock = tx
        .prepare_cached("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .await
        .map_err(pg_err)?;
    tx.execute(&lock, &[&QUOTA_LOCK_CLASS, &owner])
        .await
        .map_err(pg_err)?;
    // At most `limit` rows of the (owner, name) index are visited, whatever the owner has.
    let count = tx
        .prepare_cached(
            "SELECT count(*) FROM (SELECT 1 FROM credentials
                                   WHERE owner = $1 AND NOT deleted AND id <> $2 LIMIT $3) q",
        )
        .await
        .map_err(pg_err)?;
    let others: i64 = tx
        .query_one(&count, &[&owner, &id, &i64::from(limit)])
        .await
        .map_err(pg_err)?
        .try_get(0)
        .map_err(pg_err)?;
    if others >= i64::from(limit) {
        return Err(StoreError::QuotaExceeded { limit });
    }
    Ok(())
}

/// Commits on `Ok`, rolls back on `Err` (dropping the transaction would roll back too, but
/// lazily; rolling back now returns the connection to the pool clean).
async fn finish<T>(
    tx: deadpool_postgres::Transaction<'_>,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match result {
        Ok(v) => {
            tx.commit().await.map_err(pg_err)?;
            Ok(v)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

async fn set_enabled_tx<C: deadpool_postgres::GenericClient>(
    client: &C,
    owner: &str,
    name: &str,
    enabled: bool,
    at: i64,
) -> Result<(), StoreError> {
    let n = client
        .execute(
            "UPDATE credentials SET enabled = $3, updated_at = $4
             WHERE owner = $1 AND name = $2 AND NOT deleted",
            &[&owner, &name, &enabled, &at],
        )
        .await
        .map_err(pg_err)?;
    if n == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

async fn set_current_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    name: &str,
    version: u32,
    at: i64,
) -> Result<(), StoreError> {
    let c = lock_live(tx, owner, name).await?;
    match version_state(tx, c.id, version).await? {
        None => Err(StoreError::NotFound),
        Some(VersionState::Destroyed) => Err(StoreError::VersionDestroyed),
        Some(VersionState::Active) => {
            tx.execute(
                "UPDATE credentials SET current_version = $2, updated_at = $3 WHERE id = $1",
                &[&c.id, &ver_param(version), &at],
            )
            .await
            .map_err(pg_err)?;
            Ok(())
        }
    }
}

async fn destroy_version_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    name: &str,
    version: u32,
    at: i64,
) -> Result<bool, StoreError> {
    let c = lock_live(tx, owner, name).await?;
    match version_state(tx, c.id, version).await? {
        None => Err(StoreError::NotFound),
        Some(VersionState::Destroyed) => Ok(false),
        Some(VersionState::Active) => {
            tx.execute(
                &format!(
                    "UPDATE versions SET {DESTROY_SET} WHERE credential_id = $2 AND version = $3"
                ),
                &[&at, &c.id, &ver_param(version)],
            )
            .await
            .map_err(pg_err)?;
            let new_current: Option<i32> = if c.current == Some(version) {
                tx.query_one(
                    "SELECT max(version) FROM versions WHERE credential_id = $1 AND state = 0",
                    &[&c.id],
                )
                .await
                .map_err(pg_err)?
                .try_get(0)
                .map_err(pg_err)?
            } else {
                c.current.map(ver_param)
            };
            tx.execute(
                "UPDATE credentials SET current_version = $2, updated_at = $3 WHERE id = $1",
                &[&c.id, &new_current, &at],
            )
            .await
            .map_err(pg_err)?;
            Ok(true)
        }
    }
}

async fn destroy_credential_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    name: &str,
    at: i64,
) -> Result<(), StoreError> {
    let c = lock_live(tx, owner, name).await?;
    tx.execute(
        &format!("UPDATE versions SET {DESTROY_SET} WHERE credential_id = $2 AND state = 0"),
        &[&at, &c.id],
    )
    .await
    .map_err(pg_err)?;
    // The whole credential goes: its versions' metadata too (labels, hosts), so a credential
    // created again under the name shows nothing of the one destroyed.
    tx.execute(
        "UPDATE versions SET metadata = '{}' WHERE credential_id = $1",
        &[&c.id],
    )
    .await
    .map_err(pg_err)?;
    tx.execute(
        "UPDATE credentials SET deleted = TRUE, current_version = NULL, updated_at = $2
         WHERE id = $1",
        &[&c.id, &at],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

// ---- the Store implementation ------------------------------------------------------------

#[async_trait]
impl Store for PostgresStore {
    async fn put_version(&self, new: NewVersion) -> Result<PutOutcome, StoreError> {
        new.validate()?;
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let tx = client.transaction().await.map_err(pg_err)?;
                let result = put_tx(&tx, &new).await;
                finish(tx, result).await
            })
            .await;
        client.settle(out)
    }

    async fn put_version_audited(
        &self,
        new: NewVersion,
        key: std::sync::Arc<crate::audit::HeadKey>,
        event: crate::audit::Event,
    ) -> Result<(PutOutcome, crate::audit::Record), StoreError> {
        new.validate()?;
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let tx = client.transaction().await.map_err(pg_err)?;
                // The version row first, then the audit head's row lock: the lock is held only
                // for the rest of this transaction, as for any other append.
                let result = async {
                    let outcome = put_tx(&tx, &new).await?;
                    let record = audit_append_one(&tx, &key, event).await?;
                    Ok((outcome, record))
                }
                .await;
                finish(tx, result).await
            })
            .await;
        client.settle(out)
    }

    async fn latest_version(&self, owner: &str, name: &str) -> Result<u32, StoreError> {
        validate_owner_name(owner, name)?;
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let stmt = client
                    .prepare_cached(
                        "SELECT latest_version FROM credentials WHERE owner = $1 AND name = $2",
                    )
                    .await
                    .map_err(pg_err)?;
                match client
                    .query_opt(&stmt, &[&owner, &name])
                    .await
                    .map_err(pg_err)?
                {
                    Some(r) => ver_from(r.try_get(0).map_err(pg_err)?),
                    None => Ok(0),
                }
            })
            .await;
        client.settle(out)
    }

    async fn list_credentials(
        &self,
        owner: &str,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<CredentialSummary>, StoreError> {
        validate_owner(owner)?;
        let limit = clamp_limit(limit)?;
        let after = cursor
            .map(Cursor::list_after)
            .transpose()?
            .unwrap_or_default();
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {SUMMARY_COLS} {SUMMARY_FROM}
                     WHERE c.owner = $1 AND NOT c.deleted AND c.name > $2
                     ORDER BY c.name LIMIT $3"
                    ))
                    .await
                    .map_err(pg_err)?;
                // One more than the page: the last page says so (no cursor to an empty one).
                let rows = client
                    .query(&stmt, &[&owner, &after, &(i64::from(limit) + 1)])
                    .await
                    .map_err(pg_err)?;
                let items = rows.iter().map(summary).collect::<Result<Vec<_>, _>>()?;
                Ok(Page::of_one_more(items, limit, |last| {
                    Cursor::for_list(&last.name)
                }))
            })
            .await;
        client.settle(out)
    }

    async fn get_credential(&self, owner: &str, name: &str) -> Result<Credential, StoreError> {
        validate_owner_name(owner, name)?;
        self.read_credential(owner, name, None, None).await
    }

    async fn get_credential_page(
        &self,
        owner: &str,
        name: &str,
        before: Option<u32>,
        limit: u32,
    ) -> Result<Credential, StoreError> {
        validate_owner_name(owner, name)?;
        if let Some(v) = before {
            validate_version(v)?;
        }
        let limit = clamp_limit(limit)?;
        self.read_credential(owner, name, before, Some(limit)).await
    }

    async fn get_version(
        &self,
        owner: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<SealedVersion, StoreError> {
        validate_owner_name(owner, name)?;
        if let Some(v) = version {
            validate_version(v)?;
        }
        let asked: Option<i32> = version.map(ver_param);
        let client = self.client().await?;
        let out = self.bounded(async {
            let stmt = client
                .prepare_cached(
                    "SELECT c.enabled, c.current_version, v.version, v.state, v.kek_provider,
                            v.kek_key_id, v.kek_version, v.metadata, v.created_by, v.created_at,
                            v.wrapped_key, v.sealed_value
                     FROM credentials c
                     JOIN versions v ON v.credential_id = c.id
                          AND v.version = coalesce($3::integer, c.current_version)
                     WHERE c.owner = $1 AND c.name = $2 AND NOT c.deleted",
                )
                .await
                .map_err(pg_err)?;
            let row = client
                .query_opt(&stmt, &[&owner, &name, &asked])
                .await
                .map_err(pg_err)?;
            let Some(r) = row else {
                // No current version of a credential that exists: every version is destroyed.
                if version.is_none() {
                    let exists = client
                        .query_opt(
                            "SELECT 1 FROM credentials WHERE owner = $1 AND name = $2 AND NOT deleted",
                            &[&owner, &name],
                        )
                        .await
                        .map_err(pg_err)?
                        .is_some();
                    if exists {
                        return Err(StoreError::VersionDestroyed);
                    }
                }
                return Err(StoreError::NotFound);
            };
            let state = VersionState::from_db(i64::from(r.try_get::<_, i16>(3).map_err(pg_err)?))?;
            if state == VersionState::Destroyed {
                return Err(StoreError::VersionDestroyed);
            }
            let current: Option<i32> = r.try_get(1).map_err(pg_err)?;
            let v: i32 = r.try_get(2).map_err(pg_err)?;
            let metadata: serde_json::Value = r.try_get(7).map_err(pg_err)?;
            // Every put stores an object: anything else was written around Strongroom.
            if !metadata.is_object() {
                return Err(StoreError::unreadable_metadata(ver_from(v)?));
            }
            Ok(SealedVersion {
                owner: owner.to_owned(),
                name: name.to_owned(),
                version: ver_from(v)?,
                credential_enabled: r.try_get(0).map_err(pg_err)?,
                is_current: current == Some(v),
                kek: kek_from(
                    r.try_get(4).map_err(pg_err)?,
                    r.try_get(5).map_err(pg_err)?,
                    r.try_get(6).map_err(pg_err)?,
                )?,
                metadata,
                created_by: r.try_get(8).map_err(pg_err)?,
                created_at: from_millis(r.try_get(9).map_err(pg_err)?)?,
                wrapped_key: r.try_get(10).map_err(pg_err)?,
                sealed_value: r.try_get(11).map_err(pg_err)?,
            })
        })
        .await;
        client.settle(out)
    }

    async fn set_current(
        &self,
        owner: &str,
        name: &str,
        version: u32,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        validate_owner_name(owner, name)?;
        validate_version(version)?;
        let at = to_millis(at)?;
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let tx = client.transaction().await.map_err(pg_err)?;
                let result = set_current_tx(&tx, owner, name, version, at).await;
                finish(tx, result).await
            })
            .await;
        client.settle(out)
    }

    async fn set_enabled(
        &self,
        owner: &str,
        name: &str,
        enabled: bool,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        validate_owner_name(owner, name)?;
        let at = to_millis(at)?;
        let client = self.client().await?;
        let out = self
            .bounded(async { set_enabled_tx(&*client, owner, name, enabled, at).await })
            .await;
        client.settle(out)
    }

    async fn change_audited(
        &self,
        owner: &str,
        name: &str,
        change: Change,
        at: OffsetDateTime,
        key: std::sync::Arc<crate::audit::HeadKey>,
        event: crate::audit::Event,
    ) -> Result<(bool, crate::audit::Record), StoreError> {
        validate_owner_name(owner, name)?;
        if let Change::SetCurrent(v) | Change::DestroyVersion(v) = change {
            validate_version(v)?;
        }
        let at = to_millis(at)?;
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let tx = client.transaction().await.map_err(pg_err)?;
                // The change first, then the audit head's row lock, as for a put.
                let result = async {
                    let done = match change {
                        Change::SetCurrent(v) => {
                            set_current_tx(&tx, owner, name, v, at).await.map(|()| true)
                        }
                        Change::SetEnabled(e) => {
                            set_enabled_tx(&tx, owner, name, e, at).await.map(|()| true)
                        }
                        Change::DestroyVersion(v) => {
                            destroy_version_tx(&tx, owner, name, v, at).await
                        }
                        Change::DestroyCredential => destroy_credential_tx(&tx, owner, name, at)
                            .await
                            .map(|()| true),
                    }?;
                    let record = audit_append_one(&tx, &key, event).await?;
                    Ok((done, record))
                }
                .await;
                finish(tx, result).await
            })
            .await;
        client.settle(out)
    }

    async fn destroy_version(
        &self,
        owner: &str,
        name: &str,
        version: u32,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        validate_owner_name(owner, name)?;
        validate_version(version)?;
        let at = to_millis(at)?;
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let tx = client.transaction().await.map_err(pg_err)?;
                let result = destroy_version_tx(&tx, owner, name, version, at).await;
                finish(tx, result).await
            })
            .await;
        client.settle(out)
    }

    async fn destroy_credential(
        &self,
        owner: &str,
        name: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        validate_owner_name(owner, name)?;
        let at = to_millis(at)?;
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let tx = client.transaction().await.map_err(pg_err)?;
                let result = destroy_credential_tx(&tx, owner, name, at).await;
                finish(tx, result).await
            })
            .await;
        client.settle(out)
    }

    async fn touch_last_used(
        &self,
        owner: &str,
        name: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        validate_owner_name(owner, name)?;
        let at = to_millis(at)?;
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let stmt = client
                    .prepare_cached(
                        "UPDATE credentials SET last_used_at = CASE
                         WHEN last_used_at IS NULL OR last_used_at < $3
                             OR last_used_at > $3::bigint + $4::bigint
                         THEN $3 ELSE last_used_at END
                     WHERE owner = $1 AND name = $2 AND NOT deleted",
                    )
                    .await
                    .map_err(pg_err)?;
                let n = client
                    .execute(&stmt, &[&owner, &name, &at, &crate::LAST_USED_AHEAD_MS])
                    .await
                    .map_err(pg_err)?;
                if n == 0 {
                    Err(StoreError::NotFound)
                } else {
                    Ok(())
                }
            })
            .await;
        client.settle(out)
    }

    async fn versions_for_rewrap(
        &self,
        filter: &KekFilter,
        after: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<RewrapItem>, StoreError> {
        let limit = clamp_limit(limit)?;
        let after = after.map(Cursor::rewrap_after).transpose()?.unwrap_or(0);
        let (cond, p, k, kv): (&str, &str, &str, i64) = match filter {
            KekFilter::Exactly(kek) => (
                "v.kek_provider = $3 AND v.kek_key_id = $4 AND v.kek_version = $5",
                &kek.provider,
                &kek.key_id,
                i64::from(kek.version),
            ),
            KekFilter::AnyVersionOf { provider, key_id } => (
                "v.kek_provider = $3 AND v.kek_key_id = $4 AND $5::bigint IS NOT NULL",
                provider,
                key_id,
                0,
            ),
            KekFilter::Not(kek) => (
                "NOT (v.kek_provider = $3 AND v.kek_key_id = $4 AND v.kek_version = $5)",
                &kek.provider,
                &kek.key_id,
                i64::from(kek.version),
            ),
        };
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT v.id, c.owner, c.name, v.version, v.kek_provider, v.kek_key_id,
                            v.kek_version, v.wrapped_key, v.metadata
                     FROM versions v JOIN credentials c ON c.id = v.credential_id
                     WHERE v.state = 0 AND v.id > $1 AND {cond}
                     ORDER BY v.id LIMIT $2"
                    ))
                    .await
                    .map_err(pg_err)?;
                let rows = client
                    .query(&stmt, &[&after, &i64::from(limit), &p, &k, &kv])
                    .await
                    .map_err(pg_err)?;
                let mut last_id = None;
                let mut items = Vec::with_capacity(rows.len());
                for r in &rows {
                    last_id = Some(r.try_get::<_, i64>(0).map_err(pg_err)?);
                    items.push(RewrapItem {
                        owner: r.try_get(1).map_err(pg_err)?,
                        name: r.try_get(2).map_err(pg_err)?,
                        version: ver_from(r.try_get(3).map_err(pg_err)?)?,
                        kek: kek_from(
                            r.try_get(4).map_err(pg_err)?,
                            r.try_get(5).map_err(pg_err)?,
                            r.try_get(6).map_err(pg_err)?,
                        )?,
                        wrapped_key: r.try_get(7).map_err(pg_err)?,
                        metadata: r.try_get(8).map_err(pg_err)?,
                    });
                }
                let next = match last_id {
                    Some(id) if items.len() == limit as usize => Some(Cursor::for_rewrap(id)),
                    _ => None,
                };
                Ok(Page { items, next })
            })
            .await;
        client.settle(out)
    }

    async fn replace_wrapped_key(
        &self,
        owner: &str,
        name: &str,
        version: u32,
        expected_old_kek: &KekRef,
        expected_old_key: &[u8],
        new_wrapped_key: Vec<u8>,
        new_kek: &KekRef,
    ) -> Result<bool, StoreError> {
        validate_owner_name(owner, name)?;
        validate_version(version)?;
        validate_kek(new_kek)?;
        if new_wrapped_key.len() > MAX_WRAPPED_KEY_LEN {
            return Err(StoreError::InvalidInput("wrapped key too large"));
        }
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let stmt = client
                    .prepare_cached(
                        "UPDATE versions SET wrapped_key = $1, kek_provider = $2, kek_key_id = $3,
                            kek_version = $4
                     WHERE credential_id = (SELECT id FROM credentials
                                            WHERE owner = $5 AND name = $6 AND NOT deleted)
                       AND version = $7 AND state = 0
                       AND kek_provider = $8 AND kek_key_id = $9 AND kek_version = $10
                       AND wrapped_key = $11",
                    )
                    .await
                    .map_err(pg_err)?;
                let n = client
                    .execute(
                        &stmt,
                        &[
                            &new_wrapped_key,
                            &new_kek.provider,
                            &new_kek.key_id,
                            &i64::from(new_kek.version),
                            &owner,
                            &name,
                            &ver_param(version),
                            &expected_old_kek.provider,
                            &expected_old_kek.key_id,
                            &i64::from(expected_old_kek.version),
                            &expected_old_key,
                        ],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(n == 1)
            })
            .await;
        client.settle(out)
    }

    async fn count_versions_by_kek(&self) -> Result<Vec<(KekRef, u64)>, StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let rows = client
                    .query(
                        "SELECT kek_provider, kek_key_id, kek_version, count(*) FROM versions
                     WHERE state = 0
                     GROUP BY kek_provider, kek_key_id, kek_version
                     ORDER BY kek_provider, kek_key_id, kek_version",
                        &[],
                    )
                    .await
                    .map_err(pg_err)?;
                rows.iter()
                    .map(|r| {
                        Ok((
                            kek_from(
                                r.try_get(0).map_err(pg_err)?,
                                r.try_get(1).map_err(pg_err)?,
                                r.try_get(2).map_err(pg_err)?,
                            )?,
                            u64::try_from(r.try_get::<_, i64>(3).map_err(pg_err)?)
                                .map_err(|_| StoreError::corrupt("negative count"))?,
                        ))
                    })
                    .collect()
            })
            .await;
        client.settle(out)
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let read_only: String = client
                    .query_one("SHOW transaction_read_only", &[])
                    .await
                    .map_err(pg_err)?
                    .try_get(0)
                    .map_err(pg_err)?;
                Ok(read_only == "on")
            })
            .await;
        if let Some(Ok(true)) = out {
            // Each connection keeps the session it was opened with: this one and the idle
            // ones go, so that the store takes writes again as soon as the server does (as
            // `settle` does for a write refused as read-only).
            client.discard();
            self.sessions.close_idle();
            return Err(StoreError::unavailable(
                "the PostgreSQL server takes no writes (transaction_read_only is on: a standby, \
                 or default_transaction_read_only)",
            ));
        }
        client.settle(out).map(|_| ())
    }

    async fn get_provider_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        validate_provider_key(key)?;
        let client = self.client().await?;
        let out = self
            .bounded(async {
                client
                    .query_opt("SELECT value FROM provider_state WHERE key = $1", &[&key])
                    .await
                    .map_err(pg_err)?
                    .map(|r| r.try_get(0).map_err(pg_err))
                    .transpose()
            })
            .await;
        client.settle(out)
    }

    async fn put_provider_state(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        validate_provider_key(key)?;
        if value.len() > MAX_PROVIDER_STATE_LEN {
            return Err(StoreError::InvalidInput("provider state value too large"));
        }
        let client = self.client().await?;
        let out = self
            .bounded(async {
                client
                    .execute(
                        "INSERT INTO provider_state (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        &[&key, &value],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(())
            })
            .await;
        client.settle(out)
    }

    async fn swap_provider_state(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        validate_provider_key(key)?;
        if value.len() > MAX_PROVIDER_STATE_LEN {
            return Err(StoreError::InvalidInput("provider state value too large"));
        }
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let changed = match expected {
                    None => client
                        .execute(
                            "INSERT INTO provider_state (key, value) VALUES ($1, $2)
                         ON CONFLICT (key) DO NOTHING",
                            &[&key, &value],
                        )
                        .await
                        .map_err(pg_err)?,
                    Some(old) => client
                        .execute(
                            "UPDATE provider_state SET value = $3 WHERE key = $1 AND value = $2",
                            &[&key, &old, &value],
                        )
                        .await
                        .map_err(pg_err)?,
                };
                Ok(changed == 1)
            })
            .await;
        client.settle(out)
    }

    async fn take_allowance(
        &self,
        limit: RateLimit,
        key: &str,
        now: OffsetDateTime,
    ) -> Result<Option<std::time::Duration>, StoreError> {
        validate_owner(key)?;
        let now_us = allowance::to_micros(now)?;
        let scope = limit.scope.as_str();
        let client = self.client().await?;
        let out = self.bounded(async {
            let (interval, tolerance) = (limit.interval_us(), limit.tolerance_us());
            // One statement under the row's lock, so racing nodes queue on the key (a read then
            // a compare-and-swap lost races under contention): the rule of `RateLimit::take`, in
            // SQL (a fresh row is a full allowance: always taken; a TAT past the tolerance counts
            // as at it). No row back: refused, nothing changed.
            let take_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                [&scope, &key, &now_us, &interval, &tolerance];
            let prune_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                [&allowance::prune_before(now_us), &allowance::PRUNE_PER_TAKE];
            // Prepared once per connection, as the other hot statements are (a plain string is
            // parsed again on every call).
            let prune = client
                .prepare_cached(
                    "DELETE FROM rate_allowances WHERE tat_us <= $1 AND ctid IN (
                         SELECT ctid FROM rate_allowances WHERE tat_us <= $1 ORDER BY tat_us LIMIT $2)",
                )
                .await
                .map_err(pg_err)?;
            let take = client
                .prepare_cached(
                    "INSERT INTO rate_allowances AS a (scope, key, tat_us)
                         VALUES ($1, $2, $3::bigint + $4::bigint)
                     ON CONFLICT (scope, key) DO UPDATE
                         SET tat_us = greatest(least(a.tat_us, $3::bigint + $5::bigint), $3::bigint)
                             + $4::bigint
                         WHERE greatest(least(a.tat_us, $3::bigint + $5::bigint), $3::bigint)
                             + $4::bigint - $3::bigint <= $5::bigint
                     RETURNING tat_us",
                )
                .await
                .map_err(pg_err)?;
            // Allowances full for a minute go, a few per take (pipelined with it). `tat_us` is
            // checked again on the row found: a take that moved it forward meanwhile keeps it.
            let (pruned, taken) = tokio::join!(
                client.execute(&prune, &prune_params),
                client.query_opt(&take, &take_params)
            );
            // A prune that failed (a lock wait cut short, say) is left to the next take: the
            // take's own answer stands.
            let _ = pruned;
            if taken.map_err(pg_err)?.is_some() {
                return Ok(None);
            }
            // Refused. A TAT past the tolerance (a clock that ran ahead, this node's or
            // another's) comes back to it, so that the allowance refills from now on (see
            // `RateLimit::pulled_back`).
            let most = tolerance.saturating_add(allowance::PULL_BACK_MARGIN_US);
            client
                .execute(
                    "UPDATE rate_allowances SET tat_us = $3::bigint + $4::bigint
                     WHERE scope = $1 AND key = $2 AND tat_us > $3::bigint + $4::bigint",
                    &[&scope, &key, &now_us, &most],
                )
                .await
                .map_err(pg_err)?;
            let tat: Option<i64> = client
                .query_opt(
                    "SELECT tat_us FROM rate_allowances WHERE scope = $1 AND key = $2",
                    &[&scope, &key],
                )
                .await
                .map_err(pg_err)?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(pg_err)?;
            // Refused: the wait from the state now (had it refilled meanwhile, one interval).
            Ok(Some(limit.take(tat, now_us).err().unwrap_or(
                std::time::Duration::from_micros(u64::try_from(interval).unwrap_or(1)),
            )))
        })
        .await;
        client.settle(out)
    }

    fn audit_log(&self) -> Option<std::sync::Arc<dyn crate::audit::AuditLog>> {
        Some(std::sync::Arc::new(self.clone()))
    }
}

// ---- test and benchmark hooks ------------------------------------------------------------

#[cfg(feature = "testing")]
impl PostgresStore {
    /// Test hook: every audit time mark `(second, seq)`, in `second` order.
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_audit_time_marks(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        self.testing_pairs("SELECT second, seq FROM audit_time_marks ORDER BY second")
            .await
    }

    /// Test hook: every stored late mark `(second, seq)`, in `second` order.
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_audit_late_marks(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        self.testing_pairs("SELECT second, seq FROM audit_time_late ORDER BY second")
            .await
    }

    /// Test hook: the `seq` range a query by time scans (`i64::MAX` for no upper end, 0
    /// for no lower one).
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_audit_seq_bounds(
        &self,
        since: Option<i64>,
        until: Option<i64>,
    ) -> Result<(i64, i64), StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let (low, high) = time_seq_bounds(&*client, since, until).await?;
                Ok((low.unwrap_or(0), high.unwrap_or(i64::MAX)))
            })
            .await;
        client.settle(out)
    }

    async fn testing_pairs(&self, sql: &str) -> Result<Vec<(i64, i64)>, StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async {
                client
                    .query(sql, &[])
                    .await
                    .map_err(pg_err)?
                    .iter()
                    .map(|r| Ok((r.try_get(0).map_err(pg_err)?, r.try_get(1).map_err(pg_err)?)))
                    .collect()
            })
            .await;
        client.settle(out)
    }

    /// Test hook: how many keys have allowance state (rows of `rate_allowances`).
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_allowance_rows(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let n: i64 = client
                    .query_one("SELECT count(*) FROM rate_allowances", &[])
                    .await
                    .map_err(pg_err)?
                    .try_get(0)
                    .map_err(pg_err)?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await;
        client.settle(out)
    }

    /// Test hook: reads a version's `(sealed_value, wrapped_key)` columns straight from the
    /// table (`None` if there is no such row).
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_raw_secret_columns(
        &self,
        owner: &str,
        name: &str,
        version: u32,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async {
                client
                    .query_opt(
                        "SELECT v.sealed_value, v.wrapped_key FROM versions v
                     JOIN credentials c ON c.id = v.credential_id
                     WHERE c.owner = $1 AND c.name = $2 AND v.version = $3",
                        &[&owner, &name, &ver_param(version)],
                    )
                    .await
                    .map_err(pg_err)?
                    .map(|r| Ok((r.try_get(0).map_err(pg_err)?, r.try_get(1).map_err(pg_err)?)))
                    .transpose()
            })
            .await;
        client.settle(out)
    }

    /// Test hook: whether a pooled connection runs over TLS (`pg_stat_ssl`).
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_connection_is_tls(&self) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let out = self.bounded(async {
            client
                .query_one(
                    "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
                    &[],
                )
                .await
                .map_err(pg_err)?
                .try_get(0)
                .map_err(pg_err)
        })
        .await;
        client.settle(out)
    }

    /// Test hook: a server setting as one of the pool's connections sees it.
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_setting(&self, name: &str) -> Result<String, StoreError> {
        self.client()
            .await?
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(pg_err)
    }

    /// Test hook: overwrites the recorded schema version.
    ///
    /// # Errors
    ///
    /// As any write.
    pub async fn testing_set_schema_version(&self, version: u32) -> Result<(), StoreError> {
        let v = i32::try_from(version).map_err(|_| StoreError::InvalidInput("version"))?;
        let client = self.client().await?;
        let out = self
            .bounded(async {
                client
                    .execute("UPDATE schema_version SET version = $1 WHERE id = 1", &[&v])
                    .await
                    .map_err(pg_err)?;
                Ok(())
            })
            .await;
        client.settle(out)
    }

    /// Test hook: the server's answer to `SELECT pg_sleep(seconds)` on a pooled connection.
    ///
    /// # Errors
    ///
    /// As any read; [`StoreError::Unavailable`] when the statement timeout cancels it.
    pub async fn testing_sleep(&self, seconds: f64) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("SELECT pg_sleep($1)", &[&seconds])
            .await
            .map(|_| ())
            .map_err(pg_err)
    }

    /// Test hook: runs `sql` (statements separated by `;`) on one of the store's connections
    /// (in its schema).
    ///
    /// # Errors
    ///
    /// As any write.
    pub async fn testing_batch_execute(&self, sql: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .batch_execute(sql)
            .await
            .map_err(pg_err)
    }

    /// Test hook: drops this store's schema (see [`PostgresOptions::schema`]) and everything
    /// in it.
    ///
    /// # Errors
    ///
    /// As any write; [`StoreError::InvalidInput`] if the store has no schema of its own.
    pub async fn testing_drop_schema(&self) -> Result<(), StoreError> {
        let schema = self
            .schema
            .as_deref()
            .ok_or(StoreError::InvalidInput("no schema of its own"))?;
        let client = self.client().await?;
        let out = self
            .bounded(async {
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .await
                    .map_err(pg_err)
            })
            .await;
        client.settle(out)
    }

    /// Benchmark hook: inserts `spec.credentials` synthetic credentials with
    /// `spec.versions_per_credential` versions each (see [`crate::testing::BulkSpec`]) with
    /// set-based SQL in large transactions, without the per-put checks. Only for an empty
    /// store.
    ///
    /// # Errors
    ///
    /// As any write.
    pub async fn testing_bulk_load(
        &self,
        spec: crate::testing::BulkSpec,
    ) -> Result<(), StoreError> {
        const CHUNK: i64 = 50_000;
        let total = i64::try_from(spec.credentials)
            .map_err(|_| StoreError::InvalidInput("too many credentials"))?;
        let per = i32::try_from(spec.versions_per_credential)
            .map_err(|_| StoreError::InvalidInput("too many versions"))?;
        let value = vec![0xA5u8; spec.value_len];
        let wrapped = vec![0x5Au8; 40];
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let mut start = 0i64;
                while start < total {
                    let end = (start + CHUNK).min(total);
                    client
                        .execute(
                            "WITH c AS (
                             INSERT INTO credentials (owner, name, enabled, deleted,
                                 current_version, latest_version, created_at, updated_at)
                             SELECT 'bench-owner-' || (g / 100), 'cred-' || lpad(g::text, 8, '0'),
                                    TRUE, FALSE, $3, $3, 0, 0
                             FROM generate_series($1::bigint, $2::bigint - 1) g
                             RETURNING id)
                         INSERT INTO versions (credential_id, version, state, kek_provider,
                             kek_key_id, kek_version, metadata, created_by, created_at,
                             wrapped_key, sealed_value)
                         SELECT c.id, v, 0, 'bench', 'k1', 1, '{}'::jsonb, 'bench', 0, $4, $5
                         FROM c CROSS JOIN generate_series(1, $3::integer) v",
                            &[&start, &end, &per, &wrapped, &value],
                        )
                        .await
                        .map_err(pg_err)?;
                    start = end;
                }
                client
                    .batch_execute("ANALYZE credentials; ANALYZE versions;")
                    .await
                    .map_err(pg_err)
            })
            .await;
        client.settle(out)
    }
}

// ---- the audit log -----------------------------------------------------------------------

fn raw_audit_row(r: &Row) -> Result<crate::audit::RawRecord, StoreError> {
    let status: i32 = r.try_get(9).map_err(pg_err)?;
    Ok(crate::audit::RawRecord {
        seq: r.try_get(0).map_err(pg_err)?,
        time_ms: r.try_get(1).map_err(pg_err)?,
        principal_kind: r.try_get(2).map_err(pg_err)?,
        principal_id: r.try_get(3).map_err(pg_err)?,
        action: r.try_get(4).map_err(pg_err)?,
        owner: r.try_get(5).map_err(pg_err)?,
        name: r.try_get(6).map_err(pg_err)?,
        version: r.try_get(7).map_err(pg_err)?,
        outcome: r.try_get(8).map_err(pg_err)?,
        status: i64::from(status),
        request_id: r.try_get(10).map_err(pg_err)?,
        client_addr: r.try_get(11).map_err(pg_err)?,
        on_behalf_of: r.try_get(12).map_err(pg_err)?,
        destination: r.try_get(13).map_err(pg_err)?,
        error_code: r.try_get(14).map_err(pg_err)?,
        prev_hash: r.try_get(15).map_err(pg_err)?,
        hash: r.try_get(16).map_err(pg_err)?,
    })
}

/// One event's record, appended in the caller's transaction (a change that commits with it).
async fn audit_append_one(
    tx: &deadpool_postgres::Transaction<'_>,
    key: &crate::audit::HeadKey,
    event: crate::audit::Event,
) -> Result<crate::audit::Record, StoreError> {
    audit_append_tx(tx, key, vec![event])
        .await?
        .pop()
        .ok_or_else(|| StoreError::corrupt("audit append returned no record"))
}

async fn audit_append_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    key: &crate::audit::HeadKey,
    events: Vec<crate::audit::Event>,
) -> Result<Vec<crate::audit::Record>, StoreError> {
    use crate::audit::{chain, checked_head, checked_tail, seq_param};
    // The row lock serializes appends across every node sharing this database.
    let row = tx
        .query_one(
            "SELECT count, hash, mac, max_time_ms FROM audit_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg_err)?;
    let mut time_index = crate::audit::TimeIndex {
        max_time_ms: row.try_get(3).map_err(pg_err)?,
    };
    let (count, hash) = checked_head(
        key,
        row.try_get(0).map_err(pg_err)?,
        row.try_get(1).map_err(pg_err)?,
        row.try_get(2).map_err(pg_err)?,
    )?;
    let tail = tx
        .query(
            "SELECT seq, hash FROM audit_records WHERE seq >= $1 ORDER BY seq LIMIT 2",
            &[&seq_param(count)],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(i64, Vec<u8>)>, tokio_postgres::Error>>()
        .map_err(pg_err)?;
    checked_tail(count, &hash, &tail)?;
    let chained = chain(count, hash, events)?;
    let insert = tx
        .prepare_cached(&format!(
            "INSERT INTO audit_records ({}) SELECT * FROM UNNEST(\
             $1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], \
             $7::text[], $8::bigint[], $9::text[], $10::int[], $11::text[], $12::text[], \
             $13::text[], $14::text[], $15::text[], $16::bytea[], $17::bytea[])",
            crate::audit::COLUMNS
        ))
        .await
        .map_err(pg_err)?;
    let n = chained.len();
    let mut seq = Vec::with_capacity(n);
    let mut time = Vec::with_capacity(n);
    let mut pk = Vec::with_capacity(n);
    let mut pid = Vec::with_capacity(n);
    let mut action = Vec::with_capacity(n);
    let mut owner = Vec::with_capacity(n);
    let mut name = Vec::with_capacity(n);
    let mut version: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut outcome = Vec::with_capacity(n);
    let mut status: Vec<i32> = Vec::with_capacity(n);
    let mut rid = Vec::with_capacity(n);
    let mut addr = Vec::with_capacity(n);
    let mut obo = Vec::with_capacity(n);
    let mut dest = Vec::with_capacity(n);
    let mut code = Vec::with_capacity(n);
    let mut prev = Vec::with_capacity(n);
    let mut hashes = Vec::with_capacity(n);
    let mut records = Vec::with_capacity(n);
    let (mut marks, mut late) = (Vec::new(), Vec::new());
    for (r, ms) in chained {
        let e = &r.event;
        time_index.advance(seq_param(r.seq), ms, &mut marks, &mut late);
        seq.push(seq_param(r.seq));
        time.push(ms);
        pk.push(e.principal_kind.clone());
        pid.push(e.principal_id.clone());
        action.push(e.action.clone());
        owner.push(e.owner.clone());
        name.push(e.name.clone());
        version.push(e.version.map(i64::from));
        outcome.push(e.outcome.clone());
        status.push(i32::from(e.status));
        rid.push(e.request_id.clone());
        addr.push(e.client_addr.clone());
        obo.push(e.on_behalf_of.clone());
        dest.push(e.destination.clone());
        code.push(e.error_code.clone());
        prev.push(r.prev_hash.to_vec());
        hashes.push(r.hash.to_vec());
        records.push(r);
    }
    tx.execute(
        &insert,
        &[
            &seq, &time, &pk, &pid, &action, &owner, &name, &version, &outcome, &status, &rid,
            &addr, &obo, &dest, &code, &prev, &hashes,
        ],
    )
    .await
    .map_err(pg_err)?;
    if !marks.is_empty() {
        let (seconds, seqs): (Vec<i64>, Vec<i64>) = marks.into_iter().unzip();
        tx.execute(
            "INSERT INTO audit_time_marks (second, seq)
             SELECT * FROM UNNEST($1::bigint[], $2::bigint[])",
            &[&seconds, &seqs],
        )
        .await
        .map_err(pg_err)?;
    }
    // Late marks join the frontier (see `TimeIndex`). Appends hold the head's lock, so every
    // stored mark is older than this batch's: each stored at the batch's earliest second or
    // later is covered, and none covers the batch's.
    let late = crate::audit::late_frontier(&late);
    if let Some(&(earliest, _)) = late.first() {
        let (seconds, seqs): (Vec<i64>, Vec<i64>) = late.into_iter().unzip();
        tx.execute(
            "DELETE FROM audit_time_late WHERE second >= $1",
            &[&earliest],
        )
        .await
        .map_err(pg_err)?;
        tx.execute(
            "INSERT INTO audit_time_late (second, seq)
             SELECT * FROM UNNEST($1::bigint[], $2::bigint[])",
            &[&seconds, &seqs],
        )
        .await
        .map_err(pg_err)?;
    }
    if let Some(last) = records.last() {
        let head = key.head(last.seq, last.hash);
        tx.execute(
            "UPDATE audit_head SET count = $1, hash = $2, mac = $3, max_time_ms = $4
             WHERE id = 1",
            &[
                &seq_param(head.count),
                &&head.hash[..],
                &&head.mac[..],
                &time_index.max_time_ms,
            ],
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(records)
}

/// [`Store::audit_query`]'s parameters, read by [`audit_query_tx`].
struct AuditQuery<'a> {
    filter: &'a crate::audit::AuditFilter,
    since: Option<i64>,
    until: Option<i64>,
    before: Option<i64>,
    actions: Option<&'a Vec<String>>,
    kinds: Option<&'a Vec<String>>,
    limit: i64,
}

/// The `seq` range that holds every record in `[since, until)` (see `TimeIndex`); `None`
/// for an open end.
async fn time_seq_bounds<C: deadpool_postgres::GenericClient>(
    client: &C,
    since: Option<i64>,
    until: Option<i64>,
) -> Result<(Option<i64>, Option<i64>), StoreError> {
    let (low, high) = crate::audit::TimeIndex::bound_seconds(since, until);
    let (mark_second, late_second) = high.unzip();
    let row = client
        .query_one(
            "SELECT
                 CASE WHEN $1::bigint IS NOT NULL THEN coalesce((SELECT seq FROM audit_time_marks
                     WHERE second <= $1 ORDER BY second DESC LIMIT 1), 0) END,
                 CASE WHEN $2::bigint IS NOT NULL THEN greatest(
                     coalesce((SELECT seq FROM audit_time_marks
                         WHERE second >= $2 ORDER BY second LIMIT 1), 9223372036854775807),
                     coalesce((SELECT seq FROM audit_time_late
                         WHERE second <= $3 ORDER BY second DESC LIMIT 1), 0)) END",
            &[&low, &mark_second, &late_second],
        )
        .await
        .map_err(pg_err)?;
    Ok((
        row.try_get(0).map_err(pg_err)?,
        row.try_get(1).map_err(pg_err)?,
    ))
}

/// The rows of an audit query; with a time range, its `seq` bounds first (see `TimeIndex`),
/// so that every filter reads the newest matches first off an index whose key ends in `seq`.
async fn audit_query_tx<C: deadpool_postgres::GenericClient>(
    client: &C,
    q: &AuditQuery<'_>,
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let (low_seq, high_seq) = if q.since.is_some() || q.until.is_some() {
        time_seq_bounds(client, q.since, q.until).await?
    } else {
        (None, None)
    };
    client
        .query(
            &format!(
                "SELECT {} FROM audit_records
                 WHERE ($1::text IS NULL OR owner = $1)
                   AND ($2::text IS NULL OR name = $2)
                   AND ($3::text IS NULL OR principal_id = $3)
                   AND ($4::bigint IS NULL OR time_ms >= $4)
                   AND ($5::bigint IS NULL OR time_ms < $5)
                   AND ($6::bigint IS NULL OR seq < $6)
                   AND ($7::text[] IS NULL OR action = ANY($7))
                   AND ($8::text[] IS NULL OR principal_kind = ANY($8))
                   AND ($10::bigint IS NULL OR seq >= $10)
                   AND ($11::bigint IS NULL OR seq <= $11)
                 ORDER BY seq DESC LIMIT $9",
                crate::audit::COLUMNS
            ),
            &[
                &q.filter.owner,
                &q.filter.name,
                &q.filter.principal_id,
                &q.since,
                &q.until,
                &q.before,
                &q.actions,
                &q.kinds,
                &q.limit,
                &low_seq,
                &high_seq,
            ],
        )
        .await
        .map_err(pg_err)
}

/// The stored audit anchor, if any (`FOR UPDATE` when `lock`: an anchor move).
async fn audit_anchor_tx<C: deadpool_postgres::GenericClient>(
    client: &C,
    lock: bool,
) -> Result<Option<crate::audit::Anchor>, StoreError> {
    let sql = if lock {
        "SELECT seq, hash, puts, mac FROM audit_anchor WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT seq, hash, puts, mac FROM audit_anchor WHERE id = 1"
    };
    let Some(row) = client.query_opt(sql, &[]).await.map_err(pg_err)? else {
        return Ok(None);
    };
    crate::audit::anchor_from(
        row.try_get(0).map_err(pg_err)?,
        row.try_get(1).map_err(pg_err)?,
        row.try_get(2).map_err(pg_err)?,
        row.try_get(3).map_err(pg_err)?,
    )
    .map(Some)
}

#[async_trait]
impl crate::audit::AuditLog for PostgresStore {
    async fn audit_append(
        &self,
        key: std::sync::Arc<crate::audit::HeadKey>,
        events: Vec<crate::audit::Event>,
    ) -> Result<Vec<crate::audit::Record>, StoreError> {
        crate::audit::check_batch(events.len())?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let tx = client.transaction().await.map_err(pg_err)?;
                let result = audit_append_tx(&tx, &key, events).await;
                finish(tx, result).await
            })
            .await;
        client.settle(out)
    }

    async fn audit_head(&self) -> Result<Option<crate::audit::Head>, StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let row = client
                    .query_opt("SELECT count, hash, mac FROM audit_head WHERE id = 1", &[])
                    .await
                    .map_err(pg_err)?
                    .ok_or_else(|| StoreError::corrupt("audit head row missing"))?;
                crate::audit::head_from(
                    row.try_get(0).map_err(pg_err)?,
                    row.try_get(1).map_err(pg_err)?,
                    row.try_get(2).map_err(pg_err)?,
                )
            })
            .await;
        client.settle(out)
    }

    async fn audit_scan(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<crate::audit::Record>, StoreError> {
        let limit = i64::from(limit.clamp(1, crate::audit::MAX_APPEND_BATCH as u32));
        let after = crate::audit::seq_param(after);
        let client = self.client().await?;
        let out = self
            .bounded(async {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {} FROM audit_records WHERE seq > $1 ORDER BY seq LIMIT $2",
                            crate::audit::COLUMNS
                        ),
                        &[&after, &limit],
                    )
                    .await
                    .map_err(pg_err)?;
                rows.iter()
                    .map(|r| raw_audit_row(r)?.into_record())
                    .collect()
            })
            .await;
        client.settle(out)
    }

    async fn audit_query(
        &self,
        filter: &crate::audit::AuditFilter,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<crate::audit::Record>, StoreError> {
        let limit = i64::from(limit.clamp(1, crate::audit::MAX_QUERY_LIMIT));
        let since = filter.since.map(bound_millis).transpose()?;
        let until = filter.until.map(bound_millis).transpose()?;
        let before = before.map(crate::audit::seq_param);
        let actions: Option<&Vec<String>> = (!filter.actions.is_empty()).then_some(&filter.actions);
        let kinds: Option<&Vec<String>> =
            (!filter.principal_kinds.is_empty()).then_some(&filter.principal_kinds);
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let query = AuditQuery {
                    filter,
                    since,
                    until,
                    before,
                    actions,
                    kinds,
                    limit,
                };
                let rows = if since.is_some() || until.is_some() {
                    // The time bounds come from the head's lag: read it and the records in one
                    // snapshot, so that a batch appended in between is seen whole or not at all.
                    let tx = client
                        .build_transaction()
                        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start()
                        .await
                        .map_err(pg_err)?;
                    let rows = audit_query_tx(&tx, &query).await;
                    finish(tx, rows).await?
                } else {
                    audit_query_tx(&*client, &query).await?
                };
                rows.iter()
                    .map(|r| raw_audit_row(r)?.into_record())
                    .collect()
            })
            .await;
        client.settle(out)
    }

    async fn audit_seal_genesis(&self, genesis: crate::audit::Head) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let tx = client.transaction().await.map_err(pg_err)?;
                let result = async {
                    let row = tx
                        .query_opt(
                            "SELECT count, mac FROM audit_head WHERE id = 1 FOR UPDATE",
                            &[],
                        )
                        .await
                        .map_err(pg_err)?
                        .ok_or_else(|| StoreError::corrupt("audit head row missing"))?;
                    let count: i64 = row.try_get(0).map_err(pg_err)?;
                    let mac: Vec<u8> = row.try_get(1).map_err(pg_err)?;
                    if !mac.is_empty() {
                        return Ok(());
                    }
                    let has_data: bool = tx
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM audit_records) \
                         OR EXISTS (SELECT 1 FROM versions)",
                            &[],
                        )
                        .await
                        .map_err(pg_err)?
                        .try_get(0)
                        .map_err(pg_err)?;
                    if count != 0 || has_data {
                        return Err(crate::audit::reset_log());
                    }
                    tx.execute(
                        "UPDATE audit_head SET hash = $1, mac = $2 WHERE id = 1",
                        &[&&genesis.hash[..], &&genesis.mac[..]],
                    )
                    .await
                    .map_err(pg_err)?;
                    Ok(())
                }
                .await;
                finish(tx, result).await
            })
            .await;
        client.settle(out)
    }

    async fn audit_anchor(&self) -> Result<Option<crate::audit::Anchor>, StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async { audit_anchor_tx(&*client, false).await })
            .await;
        client.settle(out)
    }

    async fn audit_set_anchor(
        &self,
        key: std::sync::Arc<crate::audit::HeadKey>,
        after: u64,
        anchor: crate::audit::Anchor,
    ) -> Result<(), StoreError> {
        use crate::audit::seq_param;
        let mut client = self.client().await?;
        let out = self.bounded(async {
            let tx = client.transaction().await.map_err(pg_err)?;
            let result = async {
                // The head is only read (appends go on meanwhile: it only grows). Two archives
                // racing: the first to insert or lock the anchor row wins, the other finds it
                // moved (an empty table has no row to lock: the insert's key conflict decides).
                let row = tx
                    .query_one("SELECT count, hash, mac FROM audit_head WHERE id = 1", &[])
                    .await
                    .map_err(pg_err)?;
                let (count, _) = crate::audit::checked_head(
                    &key,
                    row.try_get(0).map_err(pg_err)?,
                    row.try_get(1).map_err(pg_err)?,
                    row.try_get(2).map_err(pg_err)?,
                )?;
                let stored = audit_anchor_tx(&tx, true).await?;
                let at = tx
                    .query(
                        "SELECT seq, hash, prev_hash FROM audit_records WHERE seq >= $1 \
                         ORDER BY seq LIMIT 2",
                        &[&seq_param(anchor.seq)],
                    )
                    .await
                    .map_err(pg_err)?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect::<Result<Vec<(i64, Vec<u8>, Vec<u8>)>, tokio_postgres::Error>>()
                    .map_err(pg_err)?;
                crate::audit::check_new_anchor(&key, count, stored.as_ref(), after, &anchor, &at)?;
                let (seq, puts) = (seq_param(anchor.seq), seq_param(anchor.puts));
                let (hash, mac) = (&anchor.hash[..], &anchor.mac[..]);
                let written = if stored.is_some() {
                    tx.execute(
                        "UPDATE audit_anchor SET seq = $1, hash = $2, puts = $3, mac = $4 \
                         WHERE id = 1",
                        &[&seq, &hash, &puts, &mac],
                    )
                    .await
                } else {
                    tx.execute(
                        "INSERT INTO audit_anchor (id, seq, hash, puts, mac) \
                         VALUES (1, $1, $2, $3, $4)",
                        &[&seq, &hash, &puts, &mac],
                    )
                    .await
                };
                match written {
                    Ok(_) => Ok(()),
                    Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                        Err(StoreError::InvalidInput(
                            "the audit anchor moved meanwhile (another archive ran): run it again",
                        ))
                    }
                    Err(e) => Err(pg_err(e)),
                }
            }
            .await;
            finish(tx, result).await
        })
        .await;
        client.settle(out)
    }

    async fn audit_prune(
        &self,
        key: std::sync::Arc<crate::audit::HeadKey>,
        limit: u32,
    ) -> Result<crate::audit::Pruned, StoreError> {
        let limit = i64::from(limit.clamp(1, crate::audit::MAX_APPEND_BATCH as u32));
        let mut client = self.client().await?;
        let out = self
            .bounded(async {
                let tx = client.transaction().await.map_err(pg_err)?;
                let result = async {
                    let Some(anchor) = audit_anchor_tx(&tx, false).await? else {
                        return Ok(crate::audit::Pruned {
                            records: 0,
                            done: true,
                        });
                    };
                    crate::audit::checked_anchor(&key, Some(&anchor))?;
                    let upto = crate::audit::seq_param(anchor.seq);
                    let row = tx
                        .query_one(
                            "WITH gone AS (DELETE FROM audit_records WHERE seq IN \
                         (SELECT seq FROM audit_records WHERE seq <= $1 ORDER BY seq LIMIT $2) \
                         RETURNING seq) SELECT count(*), max(seq) FROM gone",
                            &[&upto, &limit],
                        )
                        .await
                        .map_err(pg_err)?;
                    let removed: i64 = row.try_get(0).map_err(pg_err)?;
                    let highest: Option<i64> = row.try_get(1).map_err(pg_err)?;
                    // The removed records' time marks, in the same transaction: records go lowest
                    // first, so none is left below the highest removed, and none at or before the
                    // anchor after a short batch. (Not `min(seq)` of the rest: it would walk the
                    // index entries of every record removed since the last vacuum.)
                    let gone = match highest {
                        Some(h) if removed == limit => h,
                        _ => upto,
                    };
                    // And their late marks: `seq`s rise with seconds there too (a frontier), so
                    // those of removed records are the oldest.
                    let mut marks = 0;
                    for table in ["audit_time_marks", "audit_time_late"] {
                        let n = tx
                            .execute(
                                &format!(
                                    "DELETE FROM {table} WHERE seq <= $1 AND second <= \
                                 (SELECT max(second) FROM \
                                  (SELECT second FROM {table} ORDER BY second LIMIT $2) AS oldest)"
                                ),
                                &[&gone, &limit],
                            )
                            .await
                            .map_err(pg_err)?;
                        marks = marks.max(n);
                    }
                    Ok(crate::audit::Pruned {
                        records: u64::try_from(removed).unwrap_or(0),
                        done: removed < limit && (marks as i64) < limit,
                    })
                }
                .await;
                finish(tx, result).await
            })
            .await;
        client.settle(out)
    }

    async fn audit_init_head_key(&self, wrapped: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let client = self.client().await?;
        let out = self
            .bounded(async {
                client
                    .execute(
                        "INSERT INTO provider_state (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO NOTHING",
                        &[&crate::audit::HEAD_KEY_STATE, &wrapped],
                    )
                    .await
                    .map_err(pg_err)?;
                client
                    .query_one(
                        "SELECT value FROM provider_state WHERE key = $1",
                        &[&crate::audit::HEAD_KEY_STATE],
                    )
                    .await
                    .map_err(pg_err)?
                    .try_get(0)
                    .map_err(pg_err)
            })
            .await;
        client.settle(out)
    }
}

#[cfg(test)]
mod tls_rule_tests {
    use super::*;

    fn mode_after(url: &str) -> Result<SslMode, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        enforce_tls(&mut config).map(|()| config.get_ssl_mode())
    }

    #[test]
    fn remote_servers_get_tls_and_local_ones_may_go_without() {
        // Not on this host: TLS whatever `prefer` or `require` says; `disable` refused.
        for url in [
            "postgresql://u@db.example.com/x",
            "postgresql://u@db.example.com/x?sslmode=prefer",
            "postgresql://u@db.example.com/x?sslmode=require",
            "host=10.1.2.3 user=u",
            "host=localhost,db.example.com user=u",
            "host=localhost hostaddr=10.1.2.3 user=u",
        ] {
            assert!(matches!(mode_after(url), Ok(SslMode::Require)), "{url}");
        }
        assert!(matches!(
            mode_after("postgresql://u@db.example.com/x?sslmode=disable"),
            Err(StoreError::Config(_))
        ));
        // On this host: the default goes in the clear, `require` still asks for TLS.
        for url in [
            "postgresql://u@127.0.0.1/x",
            "postgresql://u@localhost/x",
            "postgresql://u@[::1]/x",
            "host=/var/run/postgresql user=u",
            "postgresql://u@127.0.0.1/x?sslmode=disable",
        ] {
            assert!(matches!(mode_after(url), Ok(SslMode::Disable)), "{url}");
        }
        assert!(matches!(
            mode_after("postgresql://u@127.0.0.1/x?sslmode=require"),
            Ok(SslMode::Require)
        ));
    }

    /// libpq's verifying modes are accepted and mean verified TLS, on this host too.
    #[test]
    fn verify_full_and_verify_ca_mean_verified_tls() {
        for url in [
            "postgresql://u@127.0.0.1/x?sslmode=verify-full",
            "postgresql://u@127.0.0.1/x?connect_timeout=3&sslmode=verify-ca",
            "postgres://u@db.example.com/x?sslmode=verify-full&application_name=a",
            "host=127.0.0.1 user=u sslmode=verify-full",
            "host=127.0.0.1 sslmode = verify-ca user=u",
        ] {
            let (config, _) = client_config(url, &PostgresTls::SystemRoots)
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(config.get_ssl_mode(), SslMode::Require, "{url}");
        }
        // Other values are left to tokio-postgres, which refuses them by name.
        let err = client_config(
            "postgresql://u@h/x?sslmode=verify",
            &PostgresTls::SystemRoots,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("option `sslmode`"), "{err}");
    }

    /// A malformed connection string says why, and never quotes the string (a password).
    #[test]
    fn connection_string_errors_say_why_without_the_string() {
        for (url, why) in [
            ("postgresql://u@h:port/x", "option `port`"),
            (
                "host=h user=u nosuchoption=1",
                "unknown option `nosuchoption`",
            ),
            ("host=h user S3cretPw", "unexpected character at byte"),
            ("host=h password='S3cretPw", "unterminated"),
        ] {
            let text = client_config(url, &PostgresTls::SystemRoots)
                .err()
                .unwrap()
                .to_string();
            assert!(text.contains(why), "{url}: {text}");
            assert!(!text.contains("S3cret") && !text.contains("`S`"), "{text}");
        }
    }

    #[test]
    fn schema_names_follow_the_stated_rule() {
        for ok in ["strongroom", "_x", "t_tls_123", "public"] {
            assert!(valid_schema_name(ok), "{ok}");
        }
        for bad in [
            "",
            "1x",
            "X",
            "a-b",
            "pg_catalog",
            "pg_x",
            "information_schema",
        ] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
        assert!(valid_schema_name(&"a".repeat(63)) && !valid_schema_name(&"a".repeat(64)));
    }

    /// A CA file problem names the file and the reason.
    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing-ca.pem");
        let text = PostgresTls::CaFile(missing.clone())
            .connector()
            .err()
            .unwrap()
            .to_string();
        assert!(
            text.contains(&missing.display().to_string()) && text.contains("cannot be read"),
            "{text}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let text = PostgresTls::CaFile(empty)
            .connector()
            .err()
            .unwrap()
            .to_string();
        assert!(
            text.contains("empty.pem") && text.contains("no certificate"),
            "{text}"
        );
    }
}
