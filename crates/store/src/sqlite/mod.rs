//! The embedded SQLite backend: one database file under the data dir.
//!
//! - WAL journal, `synchronous=FULL` by default (a commit is fsynced before it is
//!   acknowledged), `foreign_keys=ON`, `secure_delete=ON` (freed pages are zeroed).
//! - **Group commit**: one writer thread owns the only read-write connection; see the
//!   `writer` module docs. Writers never wait for each other's fsync.
//! - Checkpoints run on a separate thread (passive, at most every 50 ms; a `RESTART`
//!   checkpoint if the WAL passes 64 MiB), so the writer never stalls on them.
//! - Reads run on a small pool of `query_only` connections on tokio's blocking threads; in
//!   WAL mode they see the last committed state and never wait for the writer. The two point
//!   lookups on the request hot path (`get_version`, `latest_version`: one indexed row, tens
//!   of microseconds) run on the calling thread instead, because the hand-off to a blocking
//!   thread and back (two context switches) cost more than the query itself.
//! - **Reveal cache** (`cache` module): `get_version` answers the current version of an
//!   enabled credential from memory once read, because every commit empties the read
//!   connections' page caches. Write jobs name what they change and the writer drops it
//!   after the commit, before the acknowledgement; commits by other processes are caught by
//!   [`Store::confirm_unchanged`]. [`SqliteOptions::reveal_cache_bytes`] bounds it.
//! - `touch_last_used` calls queued while the writer is busy are applied as one write job
//!   (one savepoint for all of them) instead of one job each.
//! - The audit log's indexes (`audit_by_credential`, `audit_by_owner`, `audit_by_name`,
//!   `audit_by_principal`, and the time marks of `crate::audit::TimeIndex`)
//!   are filled **behind** the appends: indexes on `audit_records` itself put random leaf
//!   pages into every append's commit (most of a reveal's WAL traffic, and of a put's: its
//!   principal is its user). Each append only adds its rows and
//!   moves the head; once [`AUDIT_INDEX_EVERY`] records have piled up, a background run
//!   sorts them by key and writes them in small write jobs (many entries per leaf
//!   page, and no long job holding up a commit), and every query that filters by owner,
//!   name, principal or time first indexes whatever is left, so answers are always complete.
//!   The records
//!   themselves, the chain and the head are durable with the append, as before.
//! - The file (and its `-wal` / `-shm` companions) is created with mode 0600, and
//!   [`SqliteStore::open_dir`] creates the data dir with mode 0700.

mod cache;
pub mod restore;
mod schema;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::error::BackendError;
use crate::types::{
    bound_millis, clamp_limit, from_millis, to_millis, validate_kek, validate_owner,
    validate_owner_name, validate_version, version_from_db, Change,
};
use crate::{
    allowance, validate_provider_key, Credential, CredentialSummary, Cursor, KekFilter, KekRef,
    NewVersion, Page, PutOutcome, RateLimit, ReadMark, RewrapItem, SealedVersion, ServedVersion,
    Store, StoreError, VersionInfo, VersionState, MAX_PROVIDER_STATE_LEN, MAX_WRAPPED_KEY_LEN,
    SCHEMA_VERSION, TRIM_TOMBSTONES_PER_PUT,
};
use cache::{Changes, Freshness, VersionCache};
use writer::{Job, WriteJob};

const _: () = assert!(schema::MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// The database file's name inside the data dir.
pub const DB_FILE_NAME: &str = "strongroom.db";

/// SQLite's `synchronous` setting for the write connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// `FULL` (the default): the WAL is fsynced at every commit. Durable against process
    /// crashes and power loss.
    #[default]
    Full,
    /// `EXTRA`: like `FULL`, and also fsyncs the directory when the WAL is reset.
    Extra,
    /// `NORMAL`: the WAL is only fsynced at checkpoints. Survives a process crash, but
    /// acknowledged writes **can be lost on power loss**. For benchmarks and throwaway data.
    DangerNormal,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
            Synchronous::DangerNormal => "NORMAL",
        }
    }
}

/// Tuning for [`SqliteStore::open`]; `Default` is right for production.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// The `synchronous` setting (default [`Synchronous::Full`]).
    pub synchronous: Synchronous,
    /// Most writes committed in one transaction (default 512).
    pub max_batch: usize,
    /// Most read connections, and so most reads running at once (default 8); further
    /// reads wait for one to be free.
    pub max_readers: usize,
    /// How long a connection waits on a lock held by another process (default 5 s).
    pub busy_timeout: Duration,
    /// Bytes of sealed current versions kept in memory for reveals (default 32 MiB; 0 turns
    /// the cache off). It holds only what the database holds, and stays exact (see
    /// [`Store::confirm_unchanged`]).
    pub reveal_cache_bytes: usize,
    /// Create the data dir and the database file when they are missing (default `true`).
    /// With `false` a missing file is an error, so an operator command pointed at the wrong
    /// data dir does not start an empty store there.
    pub create: bool,
    /// Size the WAL file is cut back to when it starts over (default 96 MiB, above what the
    /// checkpointer lets it reach in steady use, so it is not cut and grown again all the
    /// time). A reader that held a snapshot for long (a backup, `audit verify`) lets the WAL
    /// grow by every write meanwhile; without a limit the file kept that size for good.
    pub wal_size_limit: u64,
    /// WAL frames (4 KiB pages) past which the checkpointer also resets the WAL with a
    /// `RESTART` checkpoint (default 16,384: 64 MiB), because passive checkpoints alone did
    /// not keep up.
    pub wal_restart_frames: i64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            max_batch: 512,
            max_readers: 8,
            busy_timeout: Duration::from_secs(5),
            reveal_cache_bytes: 32 << 20,
            create: true,
            wal_size_limit: 96 << 20,
            wal_restart_frames: 16 * 1024,
        }
    }
}

/// A read running on a blocking thread, which its caller may abandon.
#[derive(Default)]
struct RunningRead {
    /// The running statement's interrupt handle, while the read runs.
    handle: Mutex<Option<rusqlite::InterruptHandle>>,
    abandoned: AtomicBool,
}

impl RunningRead {
    /// Notes that the read starts on `conn`; false when it was abandoned already.
    fn start(&self, conn: &Connection) -> bool {
        let mut handle = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        *handle = Some(conn.get_interrupt_handle());
        !self.abandoned.load(Ordering::SeqCst)
    }

    /// Notes that the read is over: an interrupt from now on would reach the connection's
    /// next user.
    fn finish(&self) {
        *self.handle.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
        if let Some(handle) = &*self.handle.lock().unwrap_or_else(|e| e.into_inner()) {
            handle.interrupt();
        }
    }
}

/// Abandons its read when dropped before the read finished (its future was dropped); `None`
/// once it finished.
struct AbandonOnDrop(Option<Arc<RunningRead>>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(read) = &self.0 {
            read.abandon();
        }
    }
}

/// The SQLite [`Store`]. Cheap to clone (all clones share one writer thread).
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: SqliteOptions,
    writer: Mutex<Option<mpsc::Sender<Box<dyn WriteJob>>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    read_permits: Arc<tokio::sync::Semaphore>,
    touches: Mutex<TouchQueue>,
    /// Audit records appended by this process since its last index run started.
    audit_unindexed: AtomicU64,
    /// A background index run is under way.
    audit_indexing: AtomicBool,
    /// Current versions of recently read credentials (see the `cache` module).
    cache: Arc<VersionCache>,
    /// Held shared while the store is open, so `restore` (which takes it exclusively) never
    /// runs under it (see [`restore::share_lock`]).
    _lock: std::fs::File,
}

/// Records appended before a background job indexes them by credential.
pub const AUDIT_INDEX_EVERY: u64 = 4096;

/// `touch_last_used` calls waiting for the writer (see [`SqliteStore::touch_last_used`]).
#[derive(Default)]
struct TouchQueue {
    pending: Vec<Touch>,
    /// A write job that will take `pending` is queued and has not started yet.
    scheduled: bool,
}

struct Touch {
    owner: String,
    name: String,
    at: i64,
    reply: TouchReply,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// What a write to one credential may change, for the reveal cache.
fn changed(owner: &str, name: &str) -> Changes {
    Changes::Credential {
        owner: owner.to_owned(),
        name: name.to_owned(),
    }
}

/// Classifies a rusqlite error by kind, wrapping it opaquely.
pub(crate) fn db_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
        {
            StoreError::corrupt(format!("sqlite: {e}"))
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..) => StoreError::corrupt(format!("sqlite: {e}")),
        _ => StoreError::Unavailable(BackendError::new(e)),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

fn join_err(_: tokio::task::JoinError) -> StoreError {
    StoreError::unavailable("sqlite worker task failed")
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/strongroom.db` with default options, creating `dir`
    /// with mode 0700 if it does not exist.
    ///
    /// # Errors
    ///
    /// [`StoreError::SchemaTooNew`] for a database written by a newer Strongroom;
    /// [`StoreError::Unavailable`] if the directory or file cannot be created or opened;
    /// [`StoreError::Corrupt`] if the file is not a database.
    pub async fn open_dir(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_dir_with(dir, SqliteOptions::default()).await
    }

    /// As [`open_dir`](Self::open_dir), with `options`.
    ///
    /// # Errors
    ///
    /// As [`open_dir`](Self::open_dir).
    pub async fn open_dir_with(
        dir: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        if options.create {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || create_private_dir(&d))
                .await
                .map_err(join_err)??;
        }
        Self::open(dir.join(DB_FILE_NAME), options).await
    }

    /// Opens (creating if needed, unless [`SqliteOptions::create`] is off) the database file
    /// at `path` and applies migrations.
    ///
    /// # Errors
    ///
    /// As [`open_dir`](Self::open_dir).
    pub async fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(path, options))
            .await
            .map_err(join_err)?
    }

    fn open_blocking(path: PathBuf, options: SqliteOptions) -> Result<Self, StoreError> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if options.create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        } else if !path.exists() {
            return Err(StoreError::unavailable(format!(
                "no Strongroom database at {}; this command works on an existing store (the \
                 server makes it on its first start)",
                path.display()
            )));
        } else if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
            // SQLite takes an empty file for an empty database: an operator command would
            // then answer "nothing uses this key" (and retire it) over a restore that did
            // not finish.
            return Err(StoreError::unavailable(format!(
                "the database file {} is empty (0 bytes): no Strongroom store (a copy or restore \
                 that did not finish?); this command works on an existing store",
                path.display()
            )));
        }
        let lock = restore::share_lock(&path)?;
        let conn = Connection::open_with_flags(&path, flags).map_err(db_err)?;
        restrict_file_mode(&path)?;
        writer::set_busy_handler(&conn, options.busy_timeout).map_err(db_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::unavailable(format!(
                "sqlite refused WAL mode (got {mode})"
            )));
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {}; PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON;
             PRAGMA cache_size = -32768; PRAGMA temp_store = MEMORY;
             PRAGMA journal_size_limit = {};",
            options.synchronous.pragma(),
            options.wal_size_limit
        ))
        .map_err(db_err)?;
        // Room for every statement the writer runs (about 70 call sites, some with variants):
        // past the cache's capacity they are compiled again on every use. A throwaway build
        // whose puts ran four more statements spent 13 % of the writer's time compiling SQL
        // at 64 (BENCHMARKS.md, sixteenth session).
        conn.set_prepared_statement_cache_capacity(256);
        migrate(&conn)?;

        // Checkpoints run on their own thread and connection (see `writer::checkpointer`).
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0")
            .map_err(db_err)?;
        let ckpt_conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        // The same fine-grained busy handler as the writer: a `RESTART` checkpoint waits for
        // readers while it holds the write lock, so its retry spacing stalls the writer too.
        writer::set_busy_handler(&ckpt_conn, options.busy_timeout).map_err(db_err)?;
        ckpt_conn
            .execute_batch(&format!(
                "PRAGMA synchronous = {}; PRAGMA wal_autocheckpoint = 0;
                 PRAGMA journal_size_limit = {};",
                options.synchronous.pragma(),
                options.wal_size_limit
            ))
            .map_err(db_err)?;
        let (poke, pokes) = mpsc::sync_channel::<()>(1);
        let ckpt = std::thread::Builder::new()
            .name("strongroom-sqlite-checkpoint".into())
            .spawn(move || {
                writer::checkpointer(
                    ckpt_conn,
                    pokes,
                    options.busy_timeout,
                    options.wal_restart_frames,
                )
            })
            .map_err(|e| StoreError::Unavailable(BackendError::new(e)))?;

        let (tx, rx) = mpsc::channel::<Box<dyn WriteJob>>();
        let max_batch = options.max_batch.max(1);
        let busy_limit = options.busy_timeout;
        let cache = Arc::new(VersionCache::new(options.reveal_cache_bytes));
        // Taken before any read can fill the cache: a commit by another process after this
        // point is noticed by the writer's first transaction.
        let data_version = writer::data_version(&conn).map_err(db_err)?;
        let writer_cache = Arc::clone(&cache);
        let handle = std::thread::Builder::new()
            .name("strongroom-sqlite-writer".into())
            .spawn(move || {
                writer::run(
                    conn,
                    rx,
                    max_batch,
                    busy_limit,
                    Some((poke, ckpt)),
                    &writer_cache,
                    data_version,
                );
            })
            .map_err(|e| StoreError::Unavailable(BackendError::new(e)))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(Some(tx)),
                writer_thread: Mutex::new(Some(handle)),
                readers: Mutex::new(Vec::new()),
                read_permits: Arc::new(tokio::sync::Semaphore::new(options.max_readers.max(1))),
                touches: Mutex::new(TouchQueue::default()),
                audit_unindexed: AtomicU64::new(0),
                audit_indexing: AtomicBool::new(false),
                cache,
                options,
                _lock: lock,
            }),
        })
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stops the writer thread after it has finished every write already queued, and closes
    /// every connection (the last close checkpoints the WAL into the main file). Later calls
    /// on any clone of this store fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        let sender = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        drop(sender);
        let handle = self
            .inner
            .writer_thread
            .lock()
            .ok()
            .and_then(|mut h| h.take());
        self.inner.read_permits.close();
        if let Ok(mut readers) = self.inner.readers.lock() {
            readers.clear();
        }
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    /// Runs SQLite's `PRAGMA integrity_check` and returns its report (`"ok"` when healthy).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Corrupt`] if the check cannot run.
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare("PRAGMA integrity_check").map_err(db_err)?;
            let lines = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            Ok(lines.join("\n"))
        })
        .await
    }

    /// Writes a consistent copy of the database to `dest` (`VACUUM INTO` a new file of mode
    /// 0600), while writers go on, and checks the copy (`PRAGMA integrity_check`). The copy
    /// holds what the store holds: sealed values, wrapped data keys, the audit log; never a
    /// key that opens them. It is written as `DEST.partial` and takes the name `dest` only
    /// once checked and durable: a run cut short never leaves a file at `dest` that looks like
    /// a backup.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] if `dest` or `DEST.partial` exists, or `dest` is a
    /// folder; [`StoreError::Unavailable`] for an I/O failure (the partial copy is removed);
    /// [`StoreError::Corrupt`] if the copy does not pass the check (it is kept as
    /// `DEST.partial`, for inspection).
    pub async fn backup_to(&self, dest: &Path) -> Result<BackupReport, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e: std::io::Error| StoreError::Unavailable(BackendError::new(e));
        if dest.is_dir() {
            return Err(StoreError::InvalidInput(
                "the backup path is a folder: name the file to write",
            ));
        }
        if std::fs::symlink_metadata(dest).is_ok() {
            return Err(StoreError::InvalidInput("the backup file already exists"));
        }
        let partial = {
            let mut name = dest.as_os_str().to_owned();
            name.push(".partial");
            PathBuf::from(name)
        };
        // Made here, empty and private, so the copy is never readable by others, and never
        // over an existing file.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::InvalidInput(
                    "the backup file's .partial exists: left by a backup cut short (or one \
                     running now); remove it first",
                ),
                _ => io(e),
            })?;
        // On a connection of its own: the pooled readers are `query_only`, which refuses
        // even a VACUUM INTO another file.
        let (source, target) = (self.inner.path.clone(), partial.clone());
        let busy = self.inner.options.busy_timeout;
        let copied = tokio::task::spawn_blocking(move || {
            let name = target
                .to_str()
                .ok_or(StoreError::InvalidInput("the backup path is not UTF-8"))?;
            let conn = Connection::open_with_flags(
                &source,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(db_err)?;
            writer::set_busy_handler(&conn, busy).map_err(db_err)?;
            conn.execute("VACUUM INTO ?1", [name]).map_err(db_err)?;
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Unavailable(BackendError::new(e)))
        .and_then(|r| r);
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        let (checked, dest) = (partial.clone(), dest.to_owned());
        tokio::task::spawn_blocking(move || {
            let report = check_backup(&checked)?;
            std::fs::File::open(&checked)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
            // Never over a file that appeared meanwhile: a hard link fails if the name exists,
            // and so does the rename without replacing that a file system without hard
            // links gets.
            match std::fs::hard_link(&checked, &dest) {
                Ok(()) => std::fs::remove_file(&checked).map_err(io)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let _ = std::fs::remove_file(&checked);
                    return Err(StoreError::InvalidInput("the backup file already exists"));
                }
                Err(_) => rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &checked,
                    rustix::fs::CWD,
                    &dest,
                    rustix::fs::RenameFlags::NOREPLACE,
                )
                .map_err(|e| match e {
                    rustix::io::Errno::EXIST => {
                        StoreError::InvalidInput("the backup file already exists")
                    }
                    e => io(e.into()),
                })?,
            }
            let dir = match dest.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
            Ok(report)
        })
        .await
        .map_err(|e| StoreError::Unavailable(BackendError::new(e)))?
    }

    /// Runs `f` on the writer thread in the next group commit; `changes` names what it may
    /// change for the reveal cache (see the `cache` module).
    async fn write<T, F>(&self, changes: Changes, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.send_job(Box::new(Job { changes, f, reply }))?;
        rx.await
            .map_err(|_| StoreError::unavailable("sqlite writer thread stopped"))?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        // At most `max_readers` reads at once, so every read finds a pooled connection
        // instead of opening one.
        let permit = Arc::clone(&inner.read_permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::unavailable("sqlite store closed"))?;
        // A read whose caller went away (its request timed out, its client hung up) is
        // interrupted: it went on to the end, holding a read slot and an old snapshot, so
        // that a few abandoned long audit queries made every read wait (scale review).
        let running = Arc::new(RunningRead::default());
        let mut abandon = AbandonOnDrop(Some(Arc::clone(&running)));
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut conn = inner.take_reader()?;
            let result = if running.start(&conn) {
                f(&mut conn)
            } else {
                Err(StoreError::unavailable("the read was abandoned"))
            };
            running.finish();
            // An interrupted read may leave its transaction open: not for the next one.
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            inner.give_reader(conn);
            result
        })
        .await
        .map_err(join_err);
        abandon.0 = None; // finished: nothing to abandon
        result?
    }

    /// A short point read on the calling thread, with a pooled connection (see the module
    /// docs: for one indexed row the hand-off to a blocking thread costs more than the
    /// query). Only for queries that touch a handful of pages.
    fn read_inline<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.inner.read_permits.is_closed() {
            return Err(StoreError::unavailable("sqlite store closed"));
        }
        let mut conn = self.inner.take_reader()?;
        let result = f(&mut conn);
        self.inner.give_reader(conn);
        result
    }

    /// Queues a job on the writer thread without waiting for its acknowledgement.
    fn send_job(&self, job: Box<dyn WriteJob>) -> Result<(), StoreError> {
        let guard = self
            .inner
            .writer
            .lock()
            .map_err(|_| StoreError::unavailable("sqlite writer lock poisoned"))?;
        let sender = guard
            .as_ref()
            .ok_or_else(|| StoreError::unavailable("sqlite store closed"))?;
        sender
            .send(job)
            .map_err(|_| StoreError::unavailable("sqlite writer thread stopped"))
    }
}

/// The write job that applies every queued `touch_last_used` (see
/// [`SqliteStore::touch_last_used`]): one savepoint, one cached `UPDATE` per touch, and each
/// caller answered after the batch's commit.
struct TouchJob {
    inner: Arc<Inner>,
}

type TouchReply = oneshot::Sender<Result<(), StoreError>>;

struct TouchAck {
    results: Vec<(TouchReply, Result<(), StoreError>)>,
}

impl writer::WriteJob for TouchJob {
    fn take_changes(&mut self) -> Changes {
        // Last-used times are not part of a cached version.
        Changes::NoCredential
    }

    fn run(self: Box<Self>, conn: &Connection) -> Box<dyn writer::Ack> {
        let touches = {
            let mut q = self.inner.touches.lock().unwrap_or_else(|e| e.into_inner());
            q.scheduled = false;
            std::mem::take(&mut q.pending)
        };
        let (replies, items): (Vec<_>, Vec<_>) = touches
            .into_iter()
            .map(|t| (t.reply, (t.owner, t.name, t.at)))
            .unzip();
        let outcome = writer::in_savepoint(conn, |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE credentials SET last_used_at = CASE
                         WHEN last_used_at IS NULL OR last_used_at < ?3 OR last_used_at > ?3 + ?4
                         THEN ?3 ELSE last_used_at END
                     WHERE owner = ?1 AND name = ?2 AND deleted = 0",
                )
                .map_err(db_err)?;
            items
                .iter()
                .map(|(owner, name, at)| {
                    let n = stmt
                        .execute(params![owner, name, at, crate::LAST_USED_AHEAD_MS])
                        .map_err(db_err)?;
                    Ok(if n == 0 {
                        Err(StoreError::NotFound)
                    } else {
                        Ok(())
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
        });
        let results = match outcome {
            Ok(each) => replies.into_iter().zip(each).collect(),
            Err(e) => replies.into_iter().map(|r| (r, Err(e.clone()))).collect(),
        };
        Box::new(TouchAck { results })
    }

    fn abort(self: Box<Self>, err: StoreError) {
        let touches = {
            let mut q = self.inner.touches.lock().unwrap_or_else(|e| e.into_inner());
            q.scheduled = false;
            std::mem::take(&mut q.pending)
        };
        for t in touches {
            let _ = t.reply.send(Err(err.clone()));
        }
    }
}

impl writer::Ack for TouchAck {
    fn ack(self: Box<Self>, commit: Result<(), StoreError>) {
        for (reply, result) in self.results {
            let _ = reply.send(match &commit {
                Ok(()) => result,
                Err(e) => Err(e.clone()),
            });
        }
    }
}

impl Inner {
    fn take_reader(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.readers.lock().ok().and_then(|mut r| r.pop()) {
            return Ok(conn);
        }
        if self.writer.lock().map(|w| w.is_none()).unwrap_or(true) {
            return Err(StoreError::unavailable("sqlite store closed"));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(db_err)?;
        conn.busy_timeout(self.options.busy_timeout)
            .map_err(db_err)?;
        conn.execute_batch(
            "PRAGMA query_only = ON; PRAGMA foreign_keys = ON; PRAGMA cache_size = -8192;",
        )
        .map_err(db_err)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    fn give_reader(&self, conn: Connection) {
        if let Ok(mut readers) = self.readers.lock() {
            // Inline point reads take connections without a permit, one per tokio worker
            // at most: keep room for them too.
            if readers.len() < self.options.max_readers * 2 {
                readers.push(conn);
            }
        }
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(StoreError::Unavailable(BackendError::new(e))),
    }
}

/// What a backup holds, from the copy itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    /// Credentials (deleted ones included).
    pub credentials: u64,
    /// Credential versions (destroyed ones included).
    pub versions: u64,
    /// Audit records.
    pub audit_records: u64,
}

/// Makes the copy durable, then checks it and counts what it holds.
fn check_backup(dest: &Path) -> Result<BackupReport, StoreError> {
    let io = |e: std::io::Error| StoreError::Unavailable(BackendError::new(e));
    std::fs::File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    let copy = Connection::open_with_flags(
        dest,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    let check: String = copy
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(db_err)?;
    if check != "ok" {
        return Err(StoreError::corrupt(format!(
            "the backup copy fails its integrity check: {check}"
        )));
    }
    held(&copy)
}

/// What a database holds, as a backup reports it.
fn held(conn: &Connection) -> Result<BackupReport, StoreError> {
    let count = |table: &str| -> Result<u64, StoreError> {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(db_err)
        .map(|n| u64::try_from(n).unwrap_or(0))
    };
    Ok(BackupReport {
        credentials: count("credentials")?,
        versions: count("versions")?,
        audit_records: count("audit_records")?,
    })
}

fn restrict_file_mode(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| StoreError::Unavailable(BackendError::new(e)))
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(db_err)?;
    let result = (|| {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 id      INTEGER PRIMARY KEY CHECK (id = 1),
                 version INTEGER NOT NULL
             )",
        )
        .map_err(db_err)?;
        let found: i64 = conn
            .query_row("SELECT version FROM schema_version WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)?
            .unwrap_or(0);
        let found =
            u32::try_from(found).map_err(|_| StoreError::corrupt("schema version out of range"))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        for sql in schema::MIGRATIONS.iter().skip(found as usize) {
            conn.execute_batch(sql).map_err(db_err)?;
        }
        conn.execute(
            "INSERT INTO schema_version (id, version) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            [SCHEMA_VERSION],
        )
        .map_err(db_err)?;
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT").map_err(db_err),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

// ---- row helpers -------------------------------------------------------------------------

struct CredRow {
    id: i64,
    latest: u32,
    current: Option<u32>,
    deleted: bool,
}

/// The credential row, deleted or not.
fn find_credential(
    conn: &Connection,
    owner: &str,
    name: &str,
) -> Result<Option<CredRow>, StoreError> {
    let raw = conn
        .prepare_cached(
            "SELECT id, latest_version, current_version, deleted FROM credentials
             WHERE owner = ?1 AND name = ?2",
        )
        .map_err(db_err)?
        .query_row(params![owner, name], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })
        .optional()
        .map_err(db_err)?;
    raw.map(|(id, latest, current, deleted)| {
        Ok(CredRow {
            id,
            latest: version_from_db(latest)?,
            current: current.map(version_from_db).transpose()?,
            deleted,
        })
    })
    .transpose()
}

/// The live (not deleted) credential row, or `NotFound`.
fn live_credential(conn: &Connection, owner: &str, name: &str) -> Result<CredRow, StoreError> {
    match find_credential(conn, owner, name)? {
        Some(c) if !c.deleted => Ok(c),
        _ => Err(StoreError::NotFound),
    }
}

const SUMMARY_SELECT: &str = "SELECT c.owner, c.name, c.enabled, c.current_version,
        c.latest_version, c.created_at, c.updated_at, c.last_used_at, v.metadata, c.id
    FROM credentials c
    LEFT JOIN versions v ON v.credential_id = c.id AND v.version = c.current_version";

struct RawSummary {
    owner: String,
    name: String,
    enabled: bool,
    current: Option<i64>,
    latest: i64,
    created: i64,
    updated: i64,
    last_used: Option<i64>,
    /// `None` without a current version.
    metadata: Option<ListedMetadata>,
    id: i64,
}

impl RawSummary {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawSummary {
            owner: r.get(0)?,
            name: r.get(1)?,
            enabled: r.get(2)?,
            current: r.get(3)?,
            latest: r.get(4)?,
            created: r.get(5)?,
            updated: r.get(6)?,
            last_used: r.get(7)?,
            metadata: match r.get_ref(8)? {
                rusqlite::types::ValueRef::Null => None,
                stored => Some(listed_metadata(stored)),
            },
            id: r.get(9)?,
        })
    }

    fn into_summary(self) -> Result<CredentialSummary, StoreError> {
        let (current_metadata, current_metadata_unreadable) = match self.metadata {
            None => (None, false),
            Some(ListedMetadata::Read(m)) => (Some(m), false),
            Some(ListedMetadata::Unreadable) => (None, true),
        };
        Ok(CredentialSummary {
            owner: self.owner,
            name: self.name,
            enabled: self.enabled,
            current_version: self.current.map(version_from_db).transpose()?,
            latest_version: version_from_db(self.latest)?,
            current_metadata,
            current_metadata_unreadable,
            created_at: from_millis(self.created)?,
            updated_at: from_millis(self.updated)?,
            last_used_at: self.last_used.map(from_millis).transpose()?,
        })
    }
}

/// A version's metadata as a listing reads it: a row whose metadata is no JSON object
/// (damaged, or edited outside Strongroom: every put stores an object) is listed as such, so
/// that one such row does not make its owner's whole listing fail, naming nothing. Reveals
/// still refuse it, naming its version.
enum ListedMetadata {
    Read(serde_json::Value),
    Unreadable,
}

fn listed_metadata(stored: rusqlite::types::ValueRef<'_>) -> ListedMetadata {
    match stored {
        rusqlite::types::ValueRef::Text(text) => std::str::from_utf8(text)
            .ok()
            .and_then(|t| parse_json(t).ok())
            // Every put stores an object: anything else was written around Strongroom.
            .filter(serde_json::Value::is_object)
            .map_or(ListedMetadata::Unreadable, ListedMetadata::Read),
        _ => ListedMetadata::Unreadable,
    }
}

/// A rewrap's wrapped key and metadata, as read. A row whose key is no blob or whose metadata
/// is no JSON text (damaged, or edited outside Strongroom) is listed with an empty wrapped
/// key, which no provider unwraps: the rewrap names it among the versions that did not
/// unwrap and goes on, where an error would stop it at that row's page on every run.
fn readable_key_and_metadata(
    key: rusqlite::types::ValueRef<'_>,
    metadata: rusqlite::types::ValueRef<'_>,
) -> (Vec<u8>, serde_json::Value) {
    use rusqlite::types::ValueRef;
    match (key, listed_metadata(metadata)) {
        (ValueRef::Blob(key), ListedMetadata::Read(metadata)) => (key.to_vec(), metadata),
        _ => (Vec::new(), serde_json::Value::Null),
    }
}

fn parse_json(s: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(s).map_err(|_| StoreError::corrupt("metadata is not valid JSON"))
}

fn kek_from_db(provider: String, key_id: String, version: i64) -> Result<KekRef, StoreError> {
    Ok(KekRef {
        provider,
        key_id,
        version: u32::try_from(version)
            .map_err(|_| StoreError::corrupt("KEK version out of range"))?,
    })
}

/// Erases the secret columns of the given credential's active versions matching `extra`.
const DESTROY_SET: &str = "state = 1, sealed_value = X'', wrapped_key = X'', destroyed_at = ?1";

// ---- write transactions (run on the writer thread, inside a savepoint) -------------------

/// `metadata` is `nv.metadata` as JSON text, serialized by the caller (off the writer thread).
fn put_tx(conn: &Connection, nv: &NewVersion, metadata: &str) -> Result<PutOutcome, StoreError> {
    let now = to_millis(nv.created_at)?;
    let existing = find_credential(conn, &nv.owner, &nv.name)?;
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
    // A put that makes a credential live counts against its owner's quota. The writer holds
    // the database's write lock (`BEGIN IMMEDIATE`, other processes included) from this count
    // to the commit, so no other create slips in between.
    let creates = existing.as_ref().is_none_or(|c| c.deleted);
    if let Some(limit) = nv.max_credentials.filter(|_| creates) {
        if live_credentials_reach(conn, &nv.owner, limit)? {
            return Err(StoreError::QuotaExceeded { limit });
        }
    }
    let id = match &existing {
        None => {
            conn.prepare_cached(
                "INSERT INTO credentials (owner, name, enabled, deleted, current_version,
                     latest_version, created_at, updated_at)
                 VALUES (?1, ?2, 1, 0, ?3, ?3, ?4, ?4)",
            )
            .map_err(db_err)?
            .execute(params![nv.owner, nv.name, nv.version, now])
            .map_err(db_err)?;
            conn.last_insert_rowid()
        }
        Some(c) => {
            // A deleted credential starts a new life: enabled, fresh timestamps, numbering
            // continues.
            conn.prepare_cached(
                "UPDATE credentials SET
                     latest_version = ?2, current_version = ?2, updated_at = ?3,
                     enabled = CASE WHEN deleted THEN 1 ELSE enabled END,
                     created_at = CASE WHEN deleted THEN ?3 ELSE created_at END,
                     last_used_at = CASE WHEN deleted THEN NULL ELSE last_used_at END,
                     deleted = 0
                 WHERE id = ?1",
            )
            .map_err(db_err)?
            .execute(params![c.id, nv.version, now])
            .map_err(db_err)?;
            c.id
        }
    };
    let inserted = conn
        .prepare_cached(
            "INSERT INTO versions (credential_id, version, state, kek_provider, kek_key_id,
                 kek_version, metadata, created_by, created_at, wrapped_key, sealed_value)
             VALUES (?1, ?2, 0, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(db_err)?
        .execute(params![
            id,
            nv.version,
            nv.kek.provider,
            nv.kek.key_id,
            nv.kek.version,
            metadata,
            nv.created_by,
            now,
            nv.wrapped_key,
            nv.sealed_value
        ]);
    match inserted {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict { latest }),
        Err(e) => return Err(db_err(e)),
    }
    // Retention: keep the newest `max_versions - 1` non-current active versions. The
    // versions to retire are read first, in index order off the partial index of active
    // versions, then destroyed one by one by rowid: as one `UPDATE ... WHERE id IN (SELECT
    // ... OFFSET) RETURNING`, SQLite built two temporary tables (each with a pager of its own)
    // per put, a sixth of the writer's time once every put retires a version.
    let doomed = conn
        .prepare_cached(
            "SELECT id, version FROM versions
             WHERE credential_id = ?1 AND state = 0 AND version <> ?2
             ORDER BY version DESC LIMIT -1 OFFSET ?3",
        )
        .map_err(db_err)?
        .query_map(
            params![id, nv.version, i64::from(nv.max_versions) - 1],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .map_err(db_err)?
        .collect::<Result<Vec<(i64, i64)>, _>>()
        .map_err(db_err)?;
    let mut retired = Vec::with_capacity(doomed.len());
    if !doomed.is_empty() {
        let mut destroy = conn
            .prepare_cached(&format!("UPDATE versions SET {DESTROY_SET} WHERE id = ?2"))
            .map_err(db_err)?;
        for (row, version) in doomed {
            destroy.execute(params![now, row]).map_err(db_err)?;
            retired.push(version_from_db(version)?);
        }
    }
    // Tombstone retention, after the retirements so that a version retired just now counts
    // too. A range of the (credential, version) index, oldest first: the rows below the bound
    // are the tombstones that became due with this put (more after an upgrade: hence the
    // cap) and any old version still active. Read, then deleted by rowid, as retention does.
    if let Some(bound) = nv.tombstones_due_below() {
        let due = conn
            .prepare_cached(DUE_TOMBSTONES)
            .map_err(db_err)?
            .query_map(params![id, bound, TRIM_TOMBSTONES_PER_PUT], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(db_err)?
            .collect::<Result<Vec<i64>, _>>()
            .map_err(db_err)?;
        if !due.is_empty() {
            let mut delete = conn
                .prepare_cached("DELETE FROM versions WHERE id = ?1")
                .map_err(db_err)?;
            for row in due {
                delete.execute([row]).map_err(db_err)?;
            }
        }
    }
    retired.sort_unstable();
    Ok(PutOutcome {
        version: nv.version,
        retired,
    })
}

/// A put's tombstone retention (see [`NewVersion::keep_destroyed`]): the rows it deletes.
const DUE_TOMBSTONES: &str = "SELECT id FROM versions
                              WHERE credential_id = ?1 AND version < ?2 AND state = 1
                              ORDER BY version LIMIT ?3";

const COUNT_LIVE_UP_TO: &str = "SELECT count(*) FROM (SELECT 1 FROM credentials
                                   WHERE owner = ?1 AND deleted = 0 LIMIT ?2)";

/// Whether `owner` has at least `limit` live credentials. Counts at most `limit` entries of
/// the `(owner, name)` index, so a create costs no more than the quota, however many
/// credentials the owner has.
fn live_credentials_reach(conn: &Connection, owner: &str, limit: u32) -> Result<bool, StoreError> {
    let n: i64 = conn
        .prepare_cached(COUNT_LIVE_UP_TO)
        .map_err(db_err)?
        .query_row(params![owner, limit], |r| r.get(0))
        .map_err(db_err)?;
    Ok(n >= i64::from(limit))
}

fn version_state(
    conn: &Connection,
    credential_id: i64,
    version: u32,
) -> Result<Option<VersionState>, StoreError> {
    conn.prepare_cached("SELECT state FROM versions WHERE credential_id = ?1 AND version = ?2")
        .map_err(db_err)?
        .query_row(params![credential_id, version], |r| r.get::<_, i64>(0))
        .optional()
        .map_err(db_err)?
        .map(VersionState::from_db)
        .transpose()
}

fn set_current_tx(
    conn: &Connection,
    owner: &str,
    name: &str,
    version: u32,
    at: i64,
) -> Result<(), StoreError> {
    let c = live_credential(conn, owner, name)?;
    match version_state(conn, c.id, version)? {
        None => Err(StoreError::NotFound),
        Some(VersionState::Destroyed) => Err(StoreError::VersionDestroyed),
        Some(VersionState::Active) => {
            conn.prepare_cached(
                "UPDATE credentials SET current_version = ?2, updated_at = ?3 WHERE id = ?1",
            )
            .map_err(db_err)?
            .execute(params![c.id, version, at])
            .map_err(db_err)?;
            Ok(())
        }
    }
}

fn destroy_version_tx(
    conn: &Connection,
    owner: &str,
    name: &str,
    version: u32,
    at: i64,
) -> Result<bool, StoreError> {
    let c = live_credential(conn, owner, name)?;
    match version_state(conn, c.id, version)? {
        None => Err(StoreError::NotFound),
        Some(VersionState::Destroyed) => Ok(false),
        Some(VersionState::Active) => {
            conn.prepare_cached(&format!(
                "UPDATE versions SET {DESTROY_SET} WHERE credential_id = ?2 AND version = ?3"
            ))
            .map_err(db_err)?
            .execute(params![at, c.id, version])
            .map_err(db_err)?;
            let new_current = if c.current == Some(version) {
                conn.prepare_cached(
                    "SELECT max(version) FROM versions WHERE credential_id = ?1 AND state = 0",
                )
                .map_err(db_err)?
                .query_row([c.id], |r| r.get::<_, Option<i64>>(0))
                .map_err(db_err)?
            } else {
                c.current.map(i64::from)
            };
            conn.prepare_cached(
                "UPDATE credentials SET current_version = ?2, updated_at = ?3 WHERE id = ?1",
            )
            .map_err(db_err)?
            .execute(params![c.id, new_current, at])
            .map_err(db_err)?;
            Ok(true)
        }
    }
}

fn destroy_credential_tx(
    conn: &Connection,
    owner: &str,
    name: &str,
    at: i64,
) -> Result<(), StoreError> {
    let c = live_credential(conn, owner, name)?;
    conn.prepare_cached(&format!(
        "UPDATE versions SET {DESTROY_SET} WHERE credential_id = ?2 AND state = 0"
    ))
    .map_err(db_err)?
    .execute(params![at, c.id])
    .map_err(db_err)?;
    // The whole credential goes: its versions' metadata too (labels, hosts), so a credential
    // created again under the name shows nothing of the one destroyed.
    conn.prepare_cached("UPDATE versions SET metadata = '{}' WHERE credential_id = ?1")
        .map_err(db_err)?
        .execute(params![c.id])
        .map_err(db_err)?;
    conn.prepare_cached(
        "UPDATE credentials SET deleted = 1, current_version = NULL, updated_at = ?2
         WHERE id = ?1",
    )
    .map_err(db_err)?
    .execute(params![c.id, at])
    .map_err(db_err)?;
    Ok(())
}

/// The version row `get_version` answers with, read from the database.
/// Why [`read_version`] found no row: the current version was asked of a credential whose
/// every version is destroyed ([`StoreError::VersionDestroyed`]), or there is no such
/// credential or version ([`StoreError::NotFound`]).
fn missing_version(
    conn: &Connection,
    owner: &str,
    name: &str,
    version: Option<u32>,
) -> Result<StoreError, StoreError> {
    if version.is_some() {
        return Ok(StoreError::NotFound);
    }
    let exists = conn
        .prepare_cached("SELECT 1 FROM credentials WHERE owner = ?1 AND name = ?2 AND deleted = 0")
        .map_err(db_err)?
        .exists(params![owner, name])
        .map_err(db_err)?;
    Ok(if exists {
        StoreError::VersionDestroyed
    } else {
        StoreError::NotFound
    })
}

fn read_version(
    conn: &Connection,
    owner: &str,
    name: &str,
    version: Option<u32>,
) -> Result<SealedVersion, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT c.enabled, c.current_version, v.version, v.state, v.kek_provider,
                    v.kek_key_id, v.kek_version, v.metadata, v.created_by, v.created_at,
                    v.wrapped_key, v.sealed_value
             FROM credentials c
             JOIN versions v ON v.credential_id = c.id
                  AND v.version = coalesce(?3, c.current_version)
             WHERE c.owner = ?1 AND c.name = ?2 AND c.deleted = 0",
        )
        .map_err(db_err)?
        .query_row(params![owner, name, version], |r| {
            Ok((
                r.get::<_, bool>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                listed_metadata(r.get_ref(7)?),
                r.get::<_, String>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, Vec<u8>>(10)?,
                r.get::<_, Vec<u8>>(11)?,
            ))
        })
        .optional()
        .map_err(db_err)?;
    let Some(row) = row else {
        return Err(missing_version(conn, owner, name, version)?);
    };
    let (enabled, current, v, state, p, k, kv, md, by, at, wrapped, sealed) = row;
    if VersionState::from_db(state)? == VersionState::Destroyed {
        return Err(StoreError::VersionDestroyed);
    }
    let ListedMetadata::Read(metadata) = md else {
        return Err(StoreError::unreadable_metadata(version_from_db(v)?));
    };
    Ok(SealedVersion {
        owner: owner.to_owned(),
        name: name.to_owned(),
        version: version_from_db(v)?,
        credential_enabled: enabled,
        is_current: current == Some(v),
        sealed_value: sealed,
        wrapped_key: wrapped,
        kek: kek_from_db(p, k, kv)?,
        metadata,
        created_by: by,
        created_at: from_millis(at)?,
    })
}

const VERSIONS_PAGE: &str = "SELECT version, state, kek_provider, kek_key_id, kek_version,
        metadata, created_by, created_at, destroyed_at
    FROM versions WHERE credential_id = ?1 AND version < ?2
    ORDER BY version DESC LIMIT ?3";

/// A credential and its versions numbered below `before` (all: `None`), newest first, at
/// most `limit` of them (all: `None`), from one snapshot. The versions are one range of the
/// `(credential_id, version)` index read backwards, stopped after `limit + 1` rows (the
/// extra one only says whether more remain).
fn read_credential(
    conn: &mut Connection,
    owner: &str,
    name: &str,
    before: Option<u32>,
    limit: Option<u32>,
) -> Result<Credential, StoreError> {
    let tx = conn.transaction().map_err(db_err)?;
    let raw = tx
        .prepare_cached(&format!(
            "{SUMMARY_SELECT} WHERE c.owner = ?1 AND c.name = ?2 AND c.deleted = 0"
        ))
        .map_err(db_err)?
        .query_row(params![owner, name], RawSummary::from_row)
        .optional()
        .map_err(db_err)?
        .ok_or(StoreError::NotFound)?;
    let id = raw.id;
    let summary = raw.into_summary()?;
    let mut stmt = tx.prepare_cached(VERSIONS_PAGE).map_err(db_err)?;
    let below = before.map_or(i64::MAX, i64::from);
    let rows_wanted = limit.map_or(-1, |l| i64::from(l) + 1);
    let rows = stmt
        .query_map(params![id, below, rows_wanted], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                listed_metadata(r.get_ref(5)?),
                r.get::<_, String>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, Option<i64>>(8)?,
            ))
        })
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?;
    let mut versions = rows
        .into_iter()
        .map(|(v, st, p, k, kv, md, by, at, dat)| {
            let (metadata, metadata_unreadable) = match md {
                ListedMetadata::Read(m) => (m, false),
                ListedMetadata::Unreadable => (serde_json::Value::Null, true),
            };
            Ok(VersionInfo {
                version: version_from_db(v)?,
                state: VersionState::from_db(st)?,
                kek: kek_from_db(p, k, kv)?,
                metadata,
                metadata_unreadable,
                created_by: by,
                created_at: from_millis(at)?,
                destroyed_at: dat.map(from_millis).transpose()?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let versions_next = crate::types::cut_page(&mut versions, limit);
    Ok(Credential {
        summary,
        versions,
        versions_next,
    })
}

// ---- the Store implementation ------------------------------------------------------------

#[async_trait]
impl Store for SqliteStore {
    async fn put_version(&self, new: NewVersion) -> Result<PutOutcome, StoreError> {
        new.validate()?;
        let metadata = new.metadata.to_string();
        self.write(changed(&new.owner, &new.name), move |conn| {
            put_tx(conn, &new, &metadata)
        })
        .await
    }

    async fn put_version_audited(
        &self,
        new: NewVersion,
        key: Arc<crate::audit::HeadKey>,
        event: crate::audit::Event,
    ) -> Result<(PutOutcome, crate::audit::Record), StoreError> {
        new.validate()?;
        let metadata = new.metadata.to_string();
        // One write job, so one savepoint: an error in either part rolls back both.
        let result = self
            .write(changed(&new.owner, &new.name), move |conn| {
                let outcome = put_tx(conn, &new, &metadata)?;
                let record = audit_append_one(conn, &key, event)?;
                Ok((outcome, record))
            })
            .await;
        if result.is_ok() {
            self.audit_appended(1);
        }
        result
    }

    async fn latest_version(&self, owner: &str, name: &str) -> Result<u32, StoreError> {
        validate_owner_name(owner, name)?;
        self.read_inline(|conn| Ok(find_credential(conn, owner, name)?.map_or(0, |c| c.latest)))
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
        let owner = owner.to_owned();
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(&format!(
                    "{SUMMARY_SELECT}
                     WHERE c.owner = ?1 AND c.deleted = 0 AND c.name > ?2
                     ORDER BY c.name LIMIT ?3"
                ))
                .map_err(db_err)?
                // One more than the page: the last page says so (no cursor to an empty one).
                .query_map(params![owner, after, limit + 1], RawSummary::from_row)
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            let items = rows
                .into_iter()
                .map(RawSummary::into_summary)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Page::of_one_more(items, limit, |last| {
                Cursor::for_list(&last.name)
            }))
        })
        .await
    }

    async fn get_credential(&self, owner: &str, name: &str) -> Result<Credential, StoreError> {
        validate_owner_name(owner, name)?;
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.read(move |conn| read_credential(conn, &owner, &name, None, None))
            .await
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
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.read(move |conn| read_credential(conn, &owner, &name, before, Some(limit)))
            .await
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
        let cache = &self.inner.cache;
        if let Some(hit) = cache.get(owner, name) {
            if version.is_none_or(|v| v == hit.version) {
                return Ok(hit);
            }
        }
        let generation = cache.generation();
        let row = self.read_inline(|conn| read_version(conn, owner, name, version))?;
        cache.fill(generation, &row);
        Ok(row)
    }

    fn read_mark(&self) -> ReadMark {
        self.inner.cache.mark()
    }

    async fn confirm_unchanged(
        &self,
        mark: ReadMark,
        served: &ServedVersion,
    ) -> Result<(), StoreError> {
        let cache = &self.inner.cache;
        if !cache.enabled() {
            // Every read went to the database.
            return Ok(());
        }
        let mut freshness = cache.freshness(mark);
        if freshness == Freshness::Unknown {
            // No write transaction (the one that checks for other processes' commits)
            // began since the read: run an empty one.
            self.write(Changes::NoCredential, |_| Ok(())).await?;
            freshness = cache.freshness(mark);
        }
        if freshness == Freshness::Current {
            return Ok(());
        }
        // Another process committed meanwhile (an operator command: often a rewrap, which
        // changes no value). The answer stands if the database still says the same.
        let now = self
            .read_inline(|conn| read_version(conn, &served.owner, &served.name, served.requested));
        match now {
            Ok(row) if row.served(served.requested) == *served => Ok(()),
            Ok(_) | Err(StoreError::NotFound | StoreError::VersionDestroyed) => {
                Err(StoreError::Overtaken)
            }
            Err(e) => Err(e),
        }
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        // An empty job in the next group commit: it takes the write lock (waiting as long as
        // a write would) and writes nothing.
        self.write(Changes::NoCredential, |_| Ok(())).await
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
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.write(changed(&owner, &name), move |conn| {
            set_current_tx(conn, &owner, &name, version, at)
        })
        .await
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
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.write(changed(&owner, &name), move |conn| {
            set_enabled_tx(conn, &owner, &name, enabled, at)
        })
        .await
    }

    async fn change_audited(
        &self,
        owner: &str,
        name: &str,
        change: Change,
        at: OffsetDateTime,
        key: Arc<crate::audit::HeadKey>,
        event: crate::audit::Event,
    ) -> Result<(bool, crate::audit::Record), StoreError> {
        validate_owner_name(owner, name)?;
        if let Change::SetCurrent(v) | Change::DestroyVersion(v) = change {
            validate_version(v)?;
        }
        let at = to_millis(at)?;
        let (owner, name) = (owner.to_owned(), name.to_owned());
        // One write job, so one savepoint: an error in either part rolls back both.
        let result = self
            .write(changed(&owner, &name), move |conn| {
                let done = match change {
                    Change::SetCurrent(v) => {
                        set_current_tx(conn, &owner, &name, v, at).map(|()| true)
                    }
                    Change::SetEnabled(e) => {
                        set_enabled_tx(conn, &owner, &name, e, at).map(|()| true)
                    }
                    Change::DestroyVersion(v) => destroy_version_tx(conn, &owner, &name, v, at),
                    Change::DestroyCredential => {
                        destroy_credential_tx(conn, &owner, &name, at).map(|()| true)
                    }
                }?;
                let record = audit_append_one(conn, &key, event)?;
                Ok((done, record))
            })
            .await;
        if result.is_ok() {
            self.audit_appended(1);
        }
        result
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
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.write(changed(&owner, &name), move |conn| {
            destroy_version_tx(conn, &owner, &name, version, at)
        })
        .await
    }

    async fn destroy_credential(
        &self,
        owner: &str,
        name: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        validate_owner_name(owner, name)?;
        let at = to_millis(at)?;
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.write(changed(&owner, &name), move |conn| {
            destroy_credential_tx(conn, &owner, &name, at)
        })
        .await
    }

    /// Touches queued while the writer is busy are applied together: the first one queues
    /// a write job, later ones join its list until the writer starts it.
    async fn touch_last_used(
        &self,
        owner: &str,
        name: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        validate_owner_name(owner, name)?;
        let at = to_millis(at)?;
        let (reply, rx) = oneshot::channel();
        let schedule = {
            let mut q = self.inner.touches.lock().unwrap_or_else(|e| e.into_inner());
            q.pending.push(Touch {
                owner: owner.to_owned(),
                name: name.to_owned(),
                at,
                reply,
            });
            !std::mem::replace(&mut q.scheduled, true)
        };
        if schedule {
            let job = TouchJob {
                inner: Arc::clone(&self.inner),
            };
            if let Err(e) = self.send_job(Box::new(job)) {
                // Nothing will take the list: fail it (this call's touch included).
                let touches = {
                    let mut q = self.inner.touches.lock().unwrap_or_else(|e| e.into_inner());
                    q.scheduled = false;
                    std::mem::take(&mut q.pending)
                };
                for t in touches {
                    let _ = t.reply.send(Err(e.clone()));
                }
            }
        }
        rx.await
            .map_err(|_| StoreError::unavailable("sqlite writer thread stopped"))?
    }

    async fn versions_for_rewrap(
        &self,
        filter: &KekFilter,
        after: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<RewrapItem>, StoreError> {
        let limit = clamp_limit(limit)?;
        let after = after.map(Cursor::rewrap_after).transpose()?.unwrap_or(0);
        let (cond, p, k, kv) = match filter {
            KekFilter::Exactly(kek) => (
                "v.kek_provider = ?3 AND v.kek_key_id = ?4 AND v.kek_version = ?5",
                kek.provider.clone(),
                kek.key_id.clone(),
                i64::from(kek.version),
            ),
            KekFilter::AnyVersionOf { provider, key_id } => (
                "v.kek_provider = ?3 AND v.kek_key_id = ?4 AND ?5 = ?5",
                provider.clone(),
                key_id.clone(),
                0,
            ),
            KekFilter::Not(kek) => (
                "NOT (v.kek_provider = ?3 AND v.kek_key_id = ?4 AND v.kek_version = ?5)",
                kek.provider.clone(),
                kek.key_id.clone(),
                i64::from(kek.version),
            ),
        };
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(&format!(
                    "SELECT v.id, c.owner, c.name, v.version, v.kek_provider, v.kek_key_id,
                            v.kek_version, v.wrapped_key, v.metadata
                     FROM versions v JOIN credentials c ON c.id = v.credential_id
                     WHERE v.state = 0 AND v.id > ?1 AND {cond}
                     ORDER BY v.id LIMIT ?2"
                ))
                .map_err(db_err)?
                .query_map(params![after, limit, p, k, kv], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, i64>(6)?,
                        readable_key_and_metadata(r.get_ref(7)?, r.get_ref(8)?),
                    ))
                })
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            let last_id = rows.last().map(|r| r.0);
            let items = rows
                .into_iter()
                .map(|(_, owner, name, v, p, k, kv, (wrapped_key, metadata))| {
                    Ok(RewrapItem {
                        owner,
                        name,
                        version: version_from_db(v)?,
                        wrapped_key,
                        kek: kek_from_db(p, k, kv)?,
                        metadata,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let next = match last_id {
                Some(id) if items.len() == limit as usize => Some(Cursor::for_rewrap(id)),
                _ => None,
            };
            Ok(Page { items, next })
        })
        .await
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
        let (owner, name) = (owner.to_owned(), name.to_owned());
        let (old, new) = (expected_old_kek.clone(), new_kek.clone());
        let old_key = expected_old_key.to_vec();
        self.write(changed(&owner, &name), move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE versions SET wrapped_key = ?1, kek_provider = ?2, kek_key_id = ?3,
                            kek_version = ?4
                     WHERE credential_id = (SELECT id FROM credentials
                                            WHERE owner = ?5 AND name = ?6 AND deleted = 0)
                       AND version = ?7 AND state = 0
                       AND kek_provider = ?8 AND kek_key_id = ?9 AND kek_version = ?10
                       AND wrapped_key = ?11",
                )
                .map_err(db_err)?
                .execute(params![
                    new_wrapped_key,
                    new.provider,
                    new.key_id,
                    new.version,
                    owner,
                    name,
                    version,
                    old.provider,
                    old.key_id,
                    old.version,
                    old_key
                ])
                .map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn count_versions_by_kek(&self) -> Result<Vec<(KekRef, u64)>, StoreError> {
        self.read(|conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT kek_provider, kek_key_id, kek_version, count(*) FROM versions
                     WHERE state = 0
                     GROUP BY kek_provider, kek_key_id, kek_version
                     ORDER BY kek_provider, kek_key_id, kek_version",
                )
                .map_err(db_err)?
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            rows.into_iter()
                .map(|(p, k, kv, n)| {
                    Ok((
                        kek_from_db(p, k, kv)?,
                        u64::try_from(n).map_err(|_| StoreError::corrupt("negative count"))?,
                    ))
                })
                .collect()
        })
        .await
    }

    async fn get_provider_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        validate_provider_key(key)?;
        let key = key.to_owned();
        self.read(move |conn| {
            // Text (as a hand-written `UPDATE` stores it) reads as its bytes: what the
            // caller makes of them, not a column type error.
            conn.prepare_cached("SELECT CAST(value AS BLOB) FROM provider_state WHERE key = ?1")
                .map_err(db_err)?
                .query_row([key], |r| r.get::<_, Vec<u8>>(0))
                .optional()
                .map_err(db_err)
        })
        .await
    }

    async fn put_provider_state(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        validate_provider_key(key)?;
        if value.len() > MAX_PROVIDER_STATE_LEN {
            return Err(StoreError::InvalidInput("provider state value too large"));
        }
        let key = key.to_owned();
        self.write(Changes::NoCredential, move |conn| {
            conn.prepare_cached(
                "INSERT INTO provider_state (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .map_err(db_err)?
            .execute(params![key, value])
            .map_err(db_err)?;
            Ok(())
        })
        .await
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
        let key = key.to_owned();
        let expected = expected.map(<[u8]>::to_vec);
        // The one writer thread serialises this read-compare-write with every other write.
        self.write(Changes::NoCredential, move |conn| {
            let current = conn
                .prepare_cached("SELECT CAST(value AS BLOB) FROM provider_state WHERE key = ?1")
                .map_err(db_err)?
                .query_row([&key], |r| r.get::<_, Vec<u8>>(0))
                .optional()
                .map_err(db_err)?;
            if current != expected {
                return Ok(false);
            }
            conn.prepare_cached(
                "INSERT INTO provider_state (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .map_err(db_err)?
            .execute(params![key, value])
            .map_err(db_err)?;
            Ok(true)
        })
        .await
    }

    async fn take_allowance(
        &self,
        limit: RateLimit,
        key: &str,
        now: OffsetDateTime,
    ) -> Result<Option<Duration>, StoreError> {
        validate_owner(key)?;
        let now_us = allowance::to_micros(now)?;
        let key = key.to_owned();
        // The one writer thread serialises this read-compute-write with every other take,
        // this process's; other processes wait for the write lock (`BEGIN IMMEDIATE`).
        self.write(Changes::NoCredential, move |conn| {
            let scope = limit.scope.as_str();
            let tat = conn
                .prepare_cached("SELECT tat_us FROM rate_allowances WHERE scope = ?1 AND key = ?2")
                .map_err(db_err)?
                .query_row(params![scope, key], |r| r.get::<_, i64>(0))
                .optional()
                .map_err(db_err)?;
            // Read, then deleted by rowid (none, mostly), as retention does: `DELETE ...
            // WHERE rowid IN (SELECT ...)` builds a temporary table every time.
            let idle = conn
                .prepare_cached(
                    "SELECT rowid FROM rate_allowances WHERE tat_us <= ?1 ORDER BY tat_us LIMIT ?2",
                )
                .map_err(db_err)?
                .query_map(
                    params![allowance::prune_before(now_us), allowance::PRUNE_PER_TAKE],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(db_err)?
                .collect::<Result<Vec<i64>, _>>()
                .map_err(db_err)?;
            if !idle.is_empty() {
                let mut delete = conn
                    .prepare_cached("DELETE FROM rate_allowances WHERE rowid = ?1")
                    .map_err(db_err)?;
                for row in idle {
                    delete.execute([row]).map_err(db_err)?;
                }
            }
            match limit.take(tat, now_us) {
                Ok(next) => {
                    conn.prepare_cached(
                        "INSERT INTO rate_allowances (scope, key, tat_us) VALUES (?1, ?2, ?3)
                         ON CONFLICT (scope, key) DO UPDATE SET tat_us = excluded.tat_us",
                    )
                    .map_err(db_err)?
                    .execute(params![scope, key, next])
                    .map_err(db_err)?;
                    Ok(None)
                }
                Err(wait) => {
                    if let Some(back) = limit.pulled_back(tat, now_us) {
                        conn.prepare_cached(
                            "UPDATE rate_allowances SET tat_us = ?3 WHERE scope = ?1 AND key = ?2",
                        )
                        .map_err(db_err)?
                        .execute(params![scope, key, back])
                        .map_err(db_err)?;
                    }
                    Ok(Some(wait))
                }
            }
        })
        .await
    }

    fn audit_log(&self) -> Option<Arc<dyn crate::audit::AuditLog>> {
        Some(Arc::new(self.clone()))
    }
}

// ---- test and benchmark hooks ------------------------------------------------------------

#[cfg(feature = "testing")]
impl SqliteStore {
    /// Test hook: reads a version's `(sealed_value, wrapped_key)` columns straight from the
    /// file, bypassing the store's logic (`None` if there is no such row).
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
        let path = self.inner.path.clone();
        let (owner, name) = (owner.to_owned(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(db_err)?;
            conn.query_row(
                "SELECT v.sealed_value, v.wrapped_key FROM versions v
                 JOIN credentials c ON c.id = v.credential_id
                 WHERE c.owner = ?1 AND c.name = ?2 AND v.version = ?3",
                params![owner, name, version],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
            .optional()
            .map_err(db_err)
        })
        .await
        .map_err(join_err)?
    }

    /// Test hook: every audit time mark `(second, seq)`, in `second` order, read straight
    /// from the file.
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_audit_time_marks(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        self.testing_pairs("SELECT second, seq FROM audit_time_marks ORDER BY second")
            .await
    }

    /// Test hook: every stored late mark `(second, seq)`, in `second` order, read straight
    /// from the file.
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_audit_late_marks(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        self.testing_pairs("SELECT second, seq FROM audit_time_late ORDER BY second")
            .await
    }

    /// Test hook: the `seq` range a query by time scans, after indexing every record.
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_audit_seq_bounds(
        &self,
        since: Option<i64>,
        until: Option<i64>,
    ) -> Result<(i64, i64), StoreError> {
        self.index_audit().await?;
        self.read(move |conn| time_seq_bounds(conn, since, until))
            .await
    }

    async fn testing_pairs(&self, sql: &'static str) -> Result<Vec<(i64, i64)>, StoreError> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(db_err)?;
            let mut stmt = conn.prepare(sql).map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db_err)?
                .collect::<Result<Vec<(i64, i64)>, _>>()
                .map_err(db_err);
            rows
        })
        .await
        .map_err(join_err)?
    }

    /// Test hook: how many keys have allowance state (rows of `rate_allowances`).
    ///
    /// # Errors
    ///
    /// As any read.
    pub async fn testing_allowance_rows(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT count(*) FROM rate_allowances", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(db_err)
        })
        .await
    }

    /// Test hook: overwrites the recorded schema version of the database at `path` (to test
    /// the refusal of a schema that is too new).
    ///
    /// # Errors
    ///
    /// If the file cannot be opened or written.
    pub fn testing_set_schema_version(path: &Path, version: u32) -> Result<(), StoreError> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.execute(
            "UPDATE schema_version SET version = ?1 WHERE id = 1",
            [version],
        )
        .map_err(db_err)?;
        Ok(())
    }

    /// Benchmark hook: inserts `spec.credentials` synthetic credentials with
    /// `spec.versions_per_credential` versions each (see [`crate::testing::BulkSpec`]),
    /// in large transactions, without the per-put checks. Only for an empty store.
    ///
    /// # Errors
    ///
    /// As any write.
    pub async fn testing_bulk_load(
        &self,
        spec: crate::testing::BulkSpec,
    ) -> Result<(), StoreError> {
        const CHUNK: u64 = 20_000;
        let mut start = 0;
        while start < spec.credentials {
            let end = (start + CHUNK).min(spec.credentials);
            let spec = spec.clone();
            self.write(Changes::AnyCredential, move |conn| {
                let value = vec![0xA5u8; spec.value_len];
                let wrapped = vec![0x5Au8; 40];
                let mut cred = conn
                    .prepare_cached(
                        "INSERT INTO credentials (id, owner, name, enabled, deleted,
                             current_version, latest_version, created_at, updated_at)
                         VALUES (?1, ?2, ?3, 1, 0, ?4, ?4, 0, 0)",
                    )
                    .map_err(db_err)?;
                let mut ver = conn
                    .prepare_cached(
                        "INSERT INTO versions (credential_id, version, state, kek_provider,
                             kek_key_id, kek_version, metadata, created_by, created_at,
                             wrapped_key, sealed_value)
                         VALUES (?1, ?2, 0, 'bench', 'k1', 1, '{}', 'bench', 0, ?3, ?4)",
                    )
                    .map_err(db_err)?;
                for i in start..end {
                    let id = i64::try_from(i + 1)
                        .map_err(|_| StoreError::InvalidInput("too many credentials"))?;
                    cred.execute(params![
                        id,
                        crate::testing::bulk_owner(i),
                        crate::testing::bulk_name(i),
                        spec.versions_per_credential
                    ])
                    .map_err(db_err)?;
                    for v in 1..=spec.versions_per_credential {
                        ver.execute(params![id, v, wrapped, value])
                            .map_err(db_err)?;
                    }
                }
                Ok(())
            })
            .await?;
            start = end;
        }
        Ok(())
    }
}

// ---- the audit log -----------------------------------------------------------------------

fn raw_audit_row(r: &Row<'_>) -> rusqlite::Result<crate::audit::RawRecord> {
    Ok(crate::audit::RawRecord {
        seq: r.get(0)?,
        time_ms: r.get(1)?,
        principal_kind: r.get(2)?,
        principal_id: r.get(3)?,
        action: r.get(4)?,
        owner: r.get(5)?,
        name: r.get(6)?,
        version: r.get(7)?,
        outcome: r.get(8)?,
        status: r.get(9)?,
        request_id: r.get(10)?,
        client_addr: r.get(11)?,
        on_behalf_of: r.get(12)?,
        destination: r.get(13)?,
        error_code: r.get(14)?,
        prev_hash: r.get(15)?,
        hash: r.get(16)?,
    })
}

fn set_enabled_tx(
    conn: &Connection,
    owner: &str,
    name: &str,
    enabled: bool,
    at: i64,
) -> Result<(), StoreError> {
    let n = conn
        .prepare_cached(
            "UPDATE credentials SET enabled = ?3, updated_at = ?4
             WHERE owner = ?1 AND name = ?2 AND deleted = 0",
        )
        .map_err(db_err)?
        .execute(params![owner, name, enabled, at])
        .map_err(db_err)?;
    if n == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

/// One event's record, appended in the caller's transaction (a change that commits with it).
fn audit_append_one(
    conn: &Connection,
    key: &crate::audit::HeadKey,
    event: crate::audit::Event,
) -> Result<crate::audit::Record, StoreError> {
    audit_append_tx(conn, key, vec![event])?
        .pop()
        .ok_or_else(|| StoreError::corrupt("audit append returned no record"))
}

fn audit_append_tx(
    conn: &Connection,
    key: &crate::audit::HeadKey,
    events: Vec<crate::audit::Event>,
) -> Result<Vec<crate::audit::Record>, StoreError> {
    use crate::audit::{chain, checked_head, checked_tail, seq_param};
    let (count, hash, mac): (i64, Vec<u8>, Vec<u8>) = conn
        .prepare_cached("SELECT count, hash, mac FROM audit_head WHERE id = 1")
        .map_err(db_err)?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(db_err)?;
    let (count, hash) = checked_head(key, count, hash, mac)?;
    let tail = conn
        .prepare_cached("SELECT seq, hash FROM audit_records WHERE seq >= ?1 ORDER BY seq LIMIT 2")
        .map_err(db_err)?
        .query_map(params![seq_param(count)], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db_err)?
        .collect::<Result<Vec<(i64, Vec<u8>)>, _>>()
        .map_err(db_err)?;
    checked_tail(count, &hash, &tail)?;
    let chained = chain(count, hash, events)?;
    let mut insert = conn
        .prepare_cached(&format!(
            "INSERT INTO audit_records ({}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            crate::audit::COLUMNS
        ))
        .map_err(db_err)?;
    let mut records = Vec::with_capacity(chained.len());
    for (r, ms) in chained {
        let e = &r.event;
        insert
            .execute(params![
                seq_param(r.seq),
                ms,
                e.principal_kind,
                e.principal_id,
                e.action,
                e.owner,
                e.name,
                e.version,
                e.outcome,
                e.status,
                e.request_id,
                e.client_addr,
                e.on_behalf_of,
                e.destination,
                e.error_code,
                &r.prev_hash[..],
                &r.hash[..],
            ])
            .map_err(db_err)?;
        records.push(r);
    }
    if let Some(last) = records.last() {
        let head = key.head(last.seq, last.hash);
        conn.prepare_cached("UPDATE audit_head SET count = ?1, hash = ?2, mac = ?3 WHERE id = 1")
            .map_err(db_err)?
            .execute(params![
                seq_param(head.count),
                &head.hash[..],
                &head.mac[..]
            ])
            .map_err(db_err)?;
    }
    Ok(records)
}

/// The stored audit anchor, if any.
fn audit_anchor_tx(conn: &Connection) -> Result<Option<crate::audit::Anchor>, StoreError> {
    conn.prepare_cached("SELECT seq, hash, puts, mac FROM audit_anchor WHERE id = 1")
        .map_err(db_err)?
        .query_row([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })
        .optional()
        .map_err(db_err)?
        .map(|(seq, hash, puts, mac)| crate::audit::anchor_from(seq, hash, puts, mac))
        .transpose()
}

/// Index entries scanned per write job when the deferred audit indexes are swept after a
/// removal (see [`SqliteStore::sweep_audit_indexes`]).
const AUDIT_SWEEP_CHUNK: usize = 2048;

/// The deferred audit index tables (`audit_by_*`, every one with a `seq` column) and their
/// primary key columns, in key order: read from the schema, so that an index table added
/// later is swept too.
fn audit_index_tables(conn: &Connection) -> Result<Vec<(String, Vec<String>)>, StoreError> {
    let names = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table' \
             AND name LIKE 'audit\\_by\\_%' ESCAPE '\\' ORDER BY name",
        )
        .map_err(db_err)?
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(db_err)?
        .collect::<Result<Vec<String>, _>>()
        .map_err(db_err)?;
    let mut out = Vec::new();
    for name in names {
        let mut columns = conn
            .prepare("SELECT name, pk FROM pragma_table_info(?1)")
            .map_err(db_err)?
            .query_map([&name], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(db_err)?
            .collect::<Result<Vec<(String, i64)>, _>>()
            .map_err(db_err)?;
        if !columns.iter().any(|(c, _)| c == "seq") {
            continue;
        }
        columns.retain(|(_, pk)| *pk > 0);
        columns.sort_by_key(|(_, pk)| *pk);
        // The names go into SQL text: only the plain names Strongroom gives its tables. A
        // table someone else added to the file under another kind of name is refused.
        let plain =
            |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        if !plain(&name) || !columns.iter().all(|(c, _)| plain(c)) {
            return Err(StoreError::corrupt(
                "an audit_by_* table with an unexpected name is in the database: it was not \
                 made by Strongroom; remove it",
            ));
        }
        if !columns.is_empty() {
            out.push((name, columns.into_iter().map(|(c, _)| c).collect()));
        }
    }
    Ok(out)
}

/// One sweep step over `table` (key columns `key`): the next [`AUDIT_SWEEP_CHUNK`] entries
/// after `cursor`, those of them with `seq <= upto` removed; the new cursor, `None` at the end.
fn sweep_audit_index_tx(
    conn: &Connection,
    table: &str,
    key: &[String],
    cursor: Option<Vec<rusqlite::types::Value>>,
    upto: i64,
) -> Result<Option<Vec<rusqlite::types::Value>>, StoreError> {
    let cols = key.join(", ");
    let marks = |from: usize| {
        (from..from + key.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (sql, args) = match &cursor {
        None => (
            format!("SELECT {cols} FROM {table} ORDER BY {cols} LIMIT {AUDIT_SWEEP_CHUNK}"),
            Vec::new(),
        ),
        Some(c) => (
            format!(
                "SELECT {cols} FROM {table} WHERE ({cols}) > ({}) ORDER BY {cols} \
                 LIMIT {AUDIT_SWEEP_CHUNK}",
                marks(1)
            ),
            c.clone(),
        ),
    };
    let mut stmt = conn.prepare(&sql).map_err(db_err)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args.iter()), |r| {
            (0..key.len())
                .map(|i| r.get::<_, rusqlite::types::Value>(i))
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?;
    let Some(last) = rows.last().cloned() else {
        return Ok(None);
    };
    // The entries just read: after the cursor, up to the last of them.
    let mut args = Vec::new();
    let mut sql = format!("DELETE FROM {table} WHERE seq <= ?1");
    args.push(rusqlite::types::Value::Integer(upto));
    if let Some(c) = cursor {
        sql.push_str(&format!(" AND ({cols}) > ({})", marks(args.len() + 1)));
        args.extend(c);
    }
    sql.push_str(&format!(" AND ({cols}) <= ({})", marks(args.len() + 1)));
    args.extend(last.iter().cloned());
    conn.execute(&sql, rusqlite::params_from_iter(args.iter()))
        .map_err(db_err)?;
    Ok((rows.len() == AUDIT_SWEEP_CHUNK).then_some(last))
}

/// Index entries written per write job: small enough that a job adds little to the commit
/// it shares with requests, and, sorted by key, many entries per leaf page.
const AUDIT_INDEX_CHUNK: usize = 512;

/// What the deferred audit indexes need of one record.
struct IndexRow {
    seq: i64,
    time_ms: i64,
    principal_id: String,
    owner: Option<String>,
    name: Option<String>,
}

/// One deferred index: its table and the entries of a window, sorted by key.
enum IndexEntries {
    Credential(Vec<(String, String, i64)>),
    Owner(Vec<(String, i64)>),
    Name(Vec<(String, i64)>),
    Principal(Vec<(String, i64)>),
    TimeMarks(Vec<crate::audit::TimeMark>),
    /// A run's late marks, reduced to its frontier (see [`crate::audit::TimeIndex`]).
    LateMarks(Vec<crate::audit::LateMark>),
}

impl IndexEntries {
    fn len(&self) -> usize {
        match self {
            IndexEntries::Credential(v) => v.len(),
            IndexEntries::Owner(v) | IndexEntries::Name(v) | IndexEntries::Principal(v) => v.len(),
            IndexEntries::TimeMarks(v) | IndexEntries::LateMarks(v) => v.len(),
        }
    }

    /// Writes entries `range` (each `INSERT OR IGNORE`, or for late marks the frontier's
    /// own rule, so a rerun after a crash is harmless).
    fn insert(&self, conn: &Connection, range: std::ops::Range<usize>) -> Result<(), StoreError> {
        match self {
            IndexEntries::Credential(v) => {
                let mut stmt = conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO audit_by_credential (owner, name, seq)
                         VALUES (?1, ?2, ?3)",
                    )
                    .map_err(db_err)?;
                for (owner, name, seq) in &v[range] {
                    stmt.execute(params![owner, name, seq]).map_err(db_err)?;
                }
            }
            IndexEntries::Owner(v) => {
                let mut stmt = conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO audit_by_owner (owner, seq) VALUES (?1, ?2)",
                    )
                    .map_err(db_err)?;
                for (owner, seq) in &v[range] {
                    stmt.execute(params![owner, seq]).map_err(db_err)?;
                }
            }
            IndexEntries::Name(v) => {
                let mut stmt = conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO audit_by_name (name, seq) VALUES (?1, ?2)",
                    )
                    .map_err(db_err)?;
                for (name, seq) in &v[range] {
                    stmt.execute(params![name, seq]).map_err(db_err)?;
                }
            }
            IndexEntries::Principal(v) => {
                let mut stmt = conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO audit_by_principal (principal_id, seq)
                         VALUES (?1, ?2)",
                    )
                    .map_err(db_err)?;
                for (principal, seq) in &v[range] {
                    stmt.execute(params![principal, seq]).map_err(db_err)?;
                }
            }
            IndexEntries::TimeMarks(v) => {
                // Every run computes the same marks from the same records (a rerun after a
                // crash, or two runs at once, write identical rows).
                let mut stmt = conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO audit_time_marks (second, seq) VALUES (?1, ?2)",
                    )
                    .map_err(db_err)?;
                for (second, seq) in &v[range] {
                    stmt.execute(params![second, seq]).map_err(db_err)?;
                }
            }
            IndexEntries::LateMarks(v) => {
                // Added to the stored frontier: skipped when a stored mark at its second or
                // before is as late (the frontier's latest at or before its second is the
                // latest of them all), else stored, and the marks it covers removed. The
                // same marks added again, in any order, leave the same frontier, so a rerun
                // or two runs at once agree.
                let mut covered = conn
                    .prepare_cached(
                        "SELECT seq FROM audit_time_late WHERE second <= ?1
                         ORDER BY second DESC LIMIT 1",
                    )
                    .map_err(db_err)?;
                let mut remove = conn
                    .prepare_cached("DELETE FROM audit_time_late WHERE second >= ?1 AND seq <= ?2")
                    .map_err(db_err)?;
                let mut add = conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO audit_time_late (second, seq) VALUES (?1, ?2)",
                    )
                    .map_err(db_err)?;
                for &(second, seq) in &v[range] {
                    let latest: Option<i64> = covered
                        .query_row([second], |r| r.get(0))
                        .optional()
                        .map_err(db_err)?;
                    if latest.is_some_and(|latest| latest >= seq) {
                        continue;
                    }
                    remove.execute(params![second, seq]).map_err(db_err)?;
                    add.execute(params![second, seq]).map_err(db_err)?;
                }
            }
        }
        Ok(())
    }
}

impl SqliteStore {
    /// Counts appended records; past [`AUDIT_INDEX_EVERY`], starts a background index run
    /// unless one is running (not waited for: if it fails, the next run or a query's
    /// catch-up indexes the same records).
    fn audit_appended(&self, n: u64) {
        let before = self.inner.audit_unindexed.fetch_add(n, Ordering::AcqRel);
        if before + n < AUDIT_INDEX_EVERY || self.inner.audit_indexing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.inner.audit_unindexed.store(0, Ordering::Release);
        let store = self.clone();
        tokio::spawn(async move {
            // A failed run changes nothing durable; the next run or query retries it.
            let _ = store.index_audit().await;
            store.inner.audit_indexing.store(false, Ordering::Release);
        });
    }

    /// Indexes every record appended so far (by credential, principal and time): reads the
    /// unindexed window on a reader, sorts each index's entries by key, writes them in
    /// [`AUDIT_INDEX_CHUNK`]-entry write jobs (each one shares a group commit with whatever
    /// requests are queued), then moves `indexed_upto`. A run stopped half-way (crash, error)
    /// leaves `indexed_upto` where it was; the next run writes the same entries again.
    async fn index_audit(&self) -> Result<(), StoreError> {
        let (upto, to, mut time, rows) = self
            .read(|conn| {
                let (upto, to, max_time_ms): (i64, i64, Option<i64>) = conn
                    .prepare_cached(
                        "SELECT s.indexed_upto, h.count, s.max_time_ms
                         FROM audit_index_state s, audit_head h WHERE s.id = 1 AND h.id = 1",
                    )
                    .map_err(db_err)?
                    .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(db_err)?;
                let rows = conn
                    .prepare_cached(
                        "SELECT seq, time_ms, principal_id, owner, name
                         FROM audit_records WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
                    )
                    .map_err(db_err)?
                    .query_map(params![upto, to], |r| {
                        Ok(IndexRow {
                            seq: r.get(0)?,
                            time_ms: r.get(1)?,
                            principal_id: r.get(2)?,
                            owner: r.get(3)?,
                            name: r.get(4)?,
                        })
                    })
                    .map_err(db_err)?
                    .collect::<Result<Vec<IndexRow>, _>>()
                    .map_err(db_err)?;
                let time = crate::audit::TimeIndex { max_time_ms };
                Ok((upto, to, time, rows))
            })
            .await?;
        if to <= upto {
            return Ok(());
        }
        let mut by_credential = Vec::with_capacity(rows.len());
        let mut by_owner = Vec::with_capacity(rows.len());
        let mut by_name = Vec::with_capacity(rows.len());
        let mut by_principal = Vec::with_capacity(rows.len());
        let (mut marks, mut late) = (Vec::new(), Vec::new());
        for r in rows {
            time.advance(r.seq, r.time_ms, &mut marks, &mut late);
            if let Some(owner) = r.owner {
                let name = r.name.clone().unwrap_or_default();
                by_owner.push((owner.clone(), r.seq));
                by_credential.push((owner, name, r.seq));
            }
            if let Some(name) = r.name {
                by_name.push((name, r.seq));
            }
            by_principal.push((r.principal_id, r.seq));
        }
        by_credential.sort_unstable();
        by_owner.sort_unstable();
        by_name.sort_unstable();
        by_principal.sort_unstable();
        let indexes = Arc::new([
            IndexEntries::Credential(by_credential),
            IndexEntries::Owner(by_owner),
            IndexEntries::Name(by_name),
            IndexEntries::Principal(by_principal),
            IndexEntries::TimeMarks(marks),
            IndexEntries::LateMarks(crate::audit::late_frontier(&late)),
        ]);
        for i in 0..indexes.len() {
            let len = indexes[i].len();
            for start in (0..len).step_by(AUDIT_INDEX_CHUNK) {
                let (indexes, end) = (indexes.clone(), (start + AUDIT_INDEX_CHUNK).min(len));
                self.write(Changes::NoCredential, move |conn| {
                    indexes[i].insert(conn, start..end)
                })
                .await?;
            }
        }
        // Only a run that indexed further moves the state: two runs may overlap (a query's
        // catch-up beside a background run), and the time state must stay the one computed
        // up to `indexed_upto`.
        self.write(Changes::NoCredential, move |conn| {
            conn.prepare_cached(
                "UPDATE audit_index_state SET indexed_upto = ?1, max_time_ms = ?2
                 WHERE id = 1 AND indexed_upto < ?1",
            )
            .map_err(db_err)?
            .execute(params![to, time.max_time_ms])
            .map_err(db_err)
            .map(|_| ())
        })
        .await
    }

    /// Removes the deferred audit index entries of records up to `upto` (removed already),
    /// in every `audit_by_*` table: each table walked in key order, [`AUDIT_SWEEP_CHUNK`]
    /// entries per write job (each shares a group commit with whatever requests are queued),
    /// then notes `swept_upto`. The tables are keyed by what queries look up, not by `seq`,
    /// so the entries are found by walking them; an entry that an index run planted after a
    /// walk passed it (that run read its record before the removal) matches no record, so no
    /// query returns it, and the next archive's walk removes it.
    async fn sweep_audit_indexes(&self, upto: i64) -> Result<(), StoreError> {
        let tables = self.read(|conn| audit_index_tables(conn)).await?;
        for (table, key) in tables {
            let (table, key) = (Arc::new(table), Arc::new(key));
            let mut cursor = None;
            loop {
                let (t, k) = (table.clone(), key.clone());
                cursor = self
                    .write(Changes::NoCredential, move |conn| {
                        sweep_audit_index_tx(conn, &t, &k, cursor, upto)
                    })
                    .await?;
                if cursor.is_none() {
                    break;
                }
            }
        }
        self.write(Changes::NoCredential, move |conn| {
            conn.prepare_cached(
                "UPDATE audit_anchor SET swept_upto = max(swept_upto, ?1) WHERE id = 1",
            )
            .map_err(db_err)?
            .execute([upto])
            .map_err(db_err)
            .map(|_| ())
        })
        .await
    }

    /// How many records wait for the deferred audit indexes (for tests).
    #[doc(hidden)]
    pub async fn testing_audit_unindexed(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT h.count - s.indexed_upto FROM audit_index_state s, audit_head h
                 WHERE s.id = 1 AND h.id = 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(db_err)
            .map(|n| u64::try_from(n).unwrap_or(0))
        })
        .await
    }
}

/// An audit query as SQL: the deferred index that narrows it most drives it.
struct AuditQuerySql {
    sql: String,
    args: Vec<rusqlite::types::Value>,
    /// Whether it reads a deferred index (which must be brought up to date first).
    needs_index: bool,
    /// `since`, `until` and the index in `args` of the first of the two seq bounds they
    /// become.
    time: Option<(Option<i64>, Option<i64>, usize)>,
}

impl AuditQuerySql {
    fn new(
        filter: &crate::audit::AuditFilter,
        before: Option<u64>,
        limit: i64,
    ) -> Result<Self, StoreError> {
        // The deferred index that narrows the query most drives it (`x`); the other filters
        // apply to the record (`r`). Every such query first indexes what is left. Each
        // driver's key is followed by `seq`, so the newest matches come first off the index,
        // without sorting. A time range narrows `seq` (see `TimeIndex`) for either.
        let driver = match (&filter.owner, &filter.name, &filter.principal_id) {
            (Some(_), Some(_), _) => Some("audit_by_credential"),
            (Some(_), None, _) => Some("audit_by_owner"),
            (None, Some(_), _) => Some("audit_by_name"),
            (None, None, Some(_)) => Some("audit_by_principal"),
            (None, None, None) => None,
        };
        let by_time = filter.since.is_some() || filter.until.is_some();
        let columns = crate::audit::COLUMNS
            .split(", ")
            .map(|c| format!("r.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut sql = match driver {
            Some(table) => format!(
                "SELECT {columns} FROM {table} x \
                     JOIN audit_records r ON r.seq = x.seq WHERE 1 = 1"
            ),
            None => format!("SELECT {columns} FROM audit_records r WHERE 1 = 1"),
        };
        // Each filter applies to the record itself, and also to the driving index so that
        // the index narrows the scan. The index tables are outside the hash chain: a row
        // planted there must not return a record that does not match.
        let on = |column: &str, n: usize, indexed: bool| {
            if indexed {
                format!("x.{column} = ?{n} AND r.{column} = ?{n}")
            } else {
                format!("r.{column} = ?{n}")
            }
        };
        use rusqlite::types::Value;
        let mut args: Vec<Value> = Vec::new();
        for (column, value, indexed_by) in [
            (
                "owner",
                &filter.owner,
                ["audit_by_credential", "audit_by_owner"],
            ),
            (
                "name",
                &filter.name,
                ["audit_by_credential", "audit_by_name"],
            ),
            (
                "principal_id",
                &filter.principal_id,
                ["audit_by_principal"; 2],
            ),
        ] {
            if let Some(v) = value {
                args.push(Value::Text(v.clone()));
                let indexed = driver.is_some_and(|d| indexed_by.contains(&d));
                sql.push_str(&format!(" AND {}", on(column, args.len(), indexed)));
            }
        }
        let since = filter.since.map(bound_millis).transpose()?;
        let until = filter.until.map(bound_millis).transpose()?;
        if let Some(t) = since {
            args.push(Value::Integer(t));
            sql.push_str(&format!(" AND r.time_ms >= ?{}", args.len()));
        }
        if let Some(t) = until {
            args.push(Value::Integer(t));
            sql.push_str(&format!(" AND r.time_ms < ?{}", args.len()));
        }
        let seq = if driver.is_some() { "x.seq" } else { "r.seq" };
        if let Some(b) = before {
            args.push(Value::Integer(crate::audit::seq_param(b)));
            sql.push_str(&format!(" AND {seq} < ?{}", args.len()));
        }
        if !filter.actions.is_empty() {
            let mut marks = Vec::new();
            for a in &filter.actions {
                args.push(Value::Text(a.clone()));
                marks.push(format!("?{}", args.len()));
            }
            sql.push_str(&format!(" AND r.action IN ({})", marks.join(", ")));
        }
        if !filter.principal_kinds.is_empty() {
            let mut marks = Vec::new();
            for k in &filter.principal_kinds {
                args.push(Value::Text(k.clone()));
                marks.push(format!("?{}", args.len()));
            }
            sql.push_str(&format!(" AND r.principal_kind IN ({})", marks.join(", ")));
        }
        // The seq bounds of a time range are looked up when the query runs (placeholders
        // until then).
        let low_at = args.len();
        if by_time {
            args.extend([Value::Null, Value::Null]);
            sql.push_str(&format!(
                " AND {seq} >= ?{} AND {seq} <= ?{}",
                low_at + 1,
                low_at + 2
            ));
        }
        args.push(Value::Integer(limit));
        sql.push_str(&format!(" ORDER BY {seq} DESC LIMIT ?{}", args.len()));
        Ok(AuditQuerySql {
            sql,
            args,
            needs_index: driver.is_some() || by_time,
            time: by_time.then_some((since, until, low_at)),
        })
    }

    /// Looks up the seq bounds of a time range on the reader, just before the query runs.
    /// They hold for every record indexed by then, which includes every record appended
    /// before the query began.
    fn bind_time_bounds(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if let Some((since, until, at)) = self.time.take() {
            let (low, high) = time_seq_bounds(conn, since, until)?;
            self.args[at] = rusqlite::types::Value::Integer(low);
            self.args[at + 1] = rusqlite::types::Value::Integer(high);
        }
        Ok(())
    }
}

/// Remove the oldest time marks and late marks, at most `?2` of each, of records at or
/// before `?1`: a range of each table's key (`second`, the rowid), read in order, never the
/// whole table. (Late marks' `seq`s rise with their seconds, a frontier, so those of removed
/// records are the oldest too.)
const PRUNE_MARKS: [&str; 2] = [
    "DELETE FROM audit_time_marks WHERE seq <= ?1 AND second <= \
     (SELECT max(second) FROM (SELECT second FROM audit_time_marks ORDER BY second LIMIT ?2))",
    "DELETE FROM audit_time_late WHERE seq <= ?1 AND second <= \
     (SELECT max(second) FROM (SELECT second FROM audit_time_late ORDER BY second LIMIT ?2))",
];

/// How far a prune has removed records, from how far it may (`upto`) and the lowest record
/// still stored (`kept`): records go lowest first, so every record below `kept` is gone. The
/// time marks at or before it go with them: they can only bound ranges that hold no stored
/// record (see [`crate::audit::TimeIndex`]).
fn removed_upto(upto: i64, kept: Option<i64>) -> i64 {
    kept.map_or(upto, |k| upto.min(k.saturating_sub(1)))
}

/// The `seq` range that holds every indexed record in `[since, until)` (see
/// [`crate::audit::TimeIndex`]).
fn time_seq_bounds(
    conn: &Connection,
    since: Option<i64>,
    until: Option<i64>,
) -> Result<(i64, i64), StoreError> {
    let lookup = |sql: &str, second: i64| -> Result<Option<i64>, StoreError> {
        conn.prepare_cached(sql)
            .map_err(db_err)?
            .query_row([second], |r| r.get(0))
            .optional()
            .map_err(db_err)
    };
    let (low, high) = crate::audit::TimeIndex::bound_seconds(since, until);
    let low = match low {
        Some(second) => lookup(
            "SELECT seq FROM audit_time_marks WHERE second <= ?1 ORDER BY second DESC LIMIT 1",
            second,
        )?
        .unwrap_or(0),
        None => 0,
    };
    let high = match high {
        Some((mark_second, late_second)) => {
            let mark = lookup(
                "SELECT seq FROM audit_time_marks WHERE second >= ?1 ORDER BY second LIMIT 1",
                mark_second,
            )?
            .unwrap_or(i64::MAX);
            let late = lookup(
                "SELECT seq FROM audit_time_late WHERE second <= ?1 ORDER BY second DESC LIMIT 1",
                late_second,
            )?
            .unwrap_or(0);
            mark.max(late)
        }
        None => i64::MAX,
    };
    Ok((low, high))
}

#[async_trait]
impl crate::audit::AuditLog for SqliteStore {
    async fn audit_append(
        &self,
        key: Arc<crate::audit::HeadKey>,
        events: Vec<crate::audit::Event>,
    ) -> Result<Vec<crate::audit::Record>, StoreError> {
        crate::audit::check_batch(events.len())?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // One job of the writer thread: it shares the group commit with other writes.
        let records = self
            .write(Changes::NoCredential, move |conn| {
                audit_append_tx(conn, &key, events)
            })
            .await?;
        self.audit_appended(records.len() as u64);
        Ok(records)
    }

    fn groups_appends(&self) -> bool {
        true
    }

    async fn audit_head(&self) -> Result<Option<crate::audit::Head>, StoreError> {
        self.read(|conn| {
            let (count, hash, mac): (i64, Vec<u8>, Vec<u8>) = conn
                .prepare_cached("SELECT count, hash, mac FROM audit_head WHERE id = 1")
                .map_err(db_err)?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
                .map_err(db_err)?
                .ok_or_else(|| StoreError::corrupt("audit head row missing"))?;
            crate::audit::head_from(count, hash, mac)
        })
        .await
    }

    async fn audit_scan(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<crate::audit::Record>, StoreError> {
        let limit = i64::from(limit.clamp(1, crate::audit::MAX_APPEND_BATCH as u32));
        let after = crate::audit::seq_param(after);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {} FROM audit_records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                    crate::audit::COLUMNS
                ))
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![after, limit], raw_audit_row)
                .map_err(db_err)?;
            rows.map(|r| r.map_err(db_err)?.into_record()).collect()
        })
        .await
    }

    async fn audit_query(
        &self,
        filter: &crate::audit::AuditFilter,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<crate::audit::Record>, StoreError> {
        let limit = i64::from(limit.clamp(1, crate::audit::MAX_QUERY_LIMIT));
        if filter.name.as_deref() == Some("") || filter.owner.as_deref() == Some("") {
            return Ok(Vec::new()); // no credential has an empty owner or name
        }
        let mut q = AuditQuerySql::new(filter, before, limit)?;
        if q.needs_index {
            self.index_audit().await?;
        }
        self.read(move |conn| {
            q.bind_time_bounds(conn)?;
            let mut stmt = conn.prepare_cached(&q.sql).map_err(db_err)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(q.args), raw_audit_row)
                .map_err(db_err)?;
            rows.map(|r| r.map_err(db_err)?.into_record()).collect()
        })
        .await
    }

    async fn audit_seal_genesis(&self, genesis: crate::audit::Head) -> Result<(), StoreError> {
        self.write(Changes::NoCredential, move |conn| {
            let (count, mac): (i64, Vec<u8>) = conn
                .prepare_cached("SELECT count, mac FROM audit_head WHERE id = 1")
                .map_err(db_err)?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(db_err)?
                .ok_or_else(|| StoreError::corrupt("audit head row missing"))?;
            if !mac.is_empty() {
                return Ok(());
            }
            let has_data: bool = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM audit_records) \
                     OR EXISTS (SELECT 1 FROM versions)",
                )
                .map_err(db_err)?
                .query_row([], |r| r.get(0))
                .map_err(db_err)?;
            if count != 0 || has_data {
                return Err(crate::audit::reset_log());
            }
            conn.prepare_cached("UPDATE audit_head SET hash = ?1, mac = ?2 WHERE id = 1")
                .map_err(db_err)?
                .execute(params![&genesis.hash[..], &genesis.mac[..]])
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn audit_anchor(&self) -> Result<Option<crate::audit::Anchor>, StoreError> {
        self.read(|conn| audit_anchor_tx(conn)).await
    }

    async fn audit_set_anchor(
        &self,
        key: Arc<crate::audit::HeadKey>,
        after: u64,
        anchor: crate::audit::Anchor,
    ) -> Result<(), StoreError> {
        use crate::audit::seq_param;
        self.write(Changes::NoCredential, move |conn| {
            let (count, hash, mac): (i64, Vec<u8>, Vec<u8>) = conn
                .prepare_cached("SELECT count, hash, mac FROM audit_head WHERE id = 1")
                .map_err(db_err)?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(db_err)?;
            let (count, _) = crate::audit::checked_head(&key, count, hash, mac)?;
            let stored = audit_anchor_tx(conn)?;
            let at = conn
                .prepare_cached(
                    "SELECT seq, hash, prev_hash FROM audit_records WHERE seq >= ?1 \
                     ORDER BY seq LIMIT 2",
                )
                .map_err(db_err)?
                .query_map(params![seq_param(anchor.seq)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .map_err(db_err)?
                .collect::<Result<Vec<(i64, Vec<u8>, Vec<u8>)>, _>>()
                .map_err(db_err)?;
            crate::audit::check_new_anchor(&key, count, stored.as_ref(), after, &anchor, &at)?;
            conn.prepare_cached(
                "INSERT INTO audit_anchor (id, seq, hash, puts, mac) VALUES (1, ?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,
                     puts = excluded.puts, mac = excluded.mac",
            )
            .map_err(db_err)?
            .execute(params![
                seq_param(anchor.seq),
                &anchor.hash[..],
                seq_param(anchor.puts),
                &anchor.mac[..]
            ])
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn audit_prune(
        &self,
        key: Arc<crate::audit::HeadKey>,
        limit: u32,
    ) -> Result<crate::audit::Pruned, StoreError> {
        let limit = i64::from(limit.clamp(1, crate::audit::MAX_APPEND_BATCH as u32));
        // The deferred indexes (the time marks and lag above all) are computed from the
        // records in order: an index run must never see some of the records it indexes
        // removed and others not. So every record up to the anchor is indexed first, and
        // only indexed records are removed.
        self.index_audit().await?;
        // `(removed, anchor seq, swept_upto)`; no anchor: nothing to do.
        let step = self
            .write(Changes::NoCredential, move |conn| {
                let Some(anchor) = audit_anchor_tx(conn)? else {
                    return Ok(None);
                };
                crate::audit::checked_anchor(&key, Some(&anchor))?;
                let indexed: i64 = conn
                    .prepare_cached("SELECT indexed_upto FROM audit_index_state WHERE id = 1")
                    .map_err(db_err)?
                    .query_row([], |r| r.get(0))
                    .map_err(db_err)?;
                let upto = crate::audit::seq_param(anchor.seq).min(indexed);
                let removed = conn
                    .prepare_cached(
                        "DELETE FROM audit_records WHERE seq IN \
                         (SELECT seq FROM audit_records WHERE seq <= ?1 ORDER BY seq LIMIT ?2)",
                    )
                    .map_err(db_err)?
                    .execute(params![upto, limit])
                    .map_err(db_err)?;
                // The removed records' time marks, in the same transaction. (An index run that
                // read the records before they went may plant some again: they still bound
                // queries exactly, and the next prune removes them.)
                let kept: Option<i64> = conn
                    .prepare_cached("SELECT min(seq) FROM audit_records")
                    .map_err(db_err)?
                    .query_row([], |r| r.get(0))
                    .map_err(db_err)?;
                let gone = removed_upto(upto, kept);
                let mut marks = 0;
                for sql in PRUNE_MARKS {
                    let n = conn
                        .prepare_cached(sql)
                        .map_err(db_err)?
                        .execute(params![gone, limit])
                        .map_err(db_err)?;
                    marks = marks.max(n);
                }
                let swept: i64 = conn
                    .prepare_cached("SELECT swept_upto FROM audit_anchor WHERE id = 1")
                    .map_err(db_err)?
                    .query_row([], |r| r.get(0))
                    .map_err(db_err)?;
                Ok(Some((removed as u64, marks as i64, upto, swept)))
            })
            .await?;
        let Some((removed, marks, upto, swept)) = step else {
            return Ok(crate::audit::Pruned {
                records: 0,
                done: true,
            });
        };
        if removed as i64 == limit || marks == limit {
            return Ok(crate::audit::Pruned {
                records: removed,
                done: false,
            });
        }
        if swept < upto {
            self.sweep_audit_indexes(upto).await?;
        }
        Ok(crate::audit::Pruned {
            records: removed,
            done: true,
        })
    }

    async fn audit_init_head_key(&self, wrapped: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.write(Changes::NoCredential, move |conn| {
            conn.prepare_cached(
                "INSERT INTO provider_state (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO NOTHING",
            )
            .map_err(db_err)?
            .execute(params![crate::audit::HEAD_KEY_STATE, wrapped])
            .map_err(db_err)?;
            conn.prepare_cached("SELECT value FROM provider_state WHERE key = ?1")
                .map_err(db_err)?
                .query_row([crate::audit::HEAD_KEY_STATE], |r| r.get::<_, Vec<u8>>(0))
                .map_err(db_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's plan for `sql`, one line per step.
    async fn plan(store: &SqliteStore, sql: &'static str) -> String {
        store
            .read(move |conn| {
                let mut stmt = conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .map_err(db_err)?;
                // The plan does not depend on the values: bind NULLs.
                let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                Ok(rows.join("\n"))
            })
            .await
            .unwrap()
    }

    /// A page of versions and a put's tombstone trim are each one range of the
    /// `(credential_id, version)` index, in index order (no sort, so the LIMIT stops the
    /// scan), and a create's quota count walks the owner's part of the `(owner, name)` index:
    /// none reads what it does not answer.
    #[tokio::test]
    async fn bounded_reads_use_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_dir(dir.path()).await.unwrap();
        let page = plan(&store, VERSIONS_PAGE).await;
        assert!(
            page.contains("SEARCH versions USING")
                && page.contains("(credential_id=? AND version<?)")
                && !page.contains("TEMP B-TREE"),
            "{page}"
        );
        // A put's tombstone retention: the rows below its bound, not the credential's all.
        let trim = plan(&store, DUE_TOMBSTONES).await;
        assert!(
            trim.contains("SEARCH versions USING")
                && trim.contains("(credential_id=? AND version<?)")
                && !trim.contains("TEMP B-TREE"),
            "{trim}"
        );
        let count = plan(&store, COUNT_LIVE_UP_TO).await;
        assert!(
            count.contains("SEARCH credentials USING INDEX") && count.contains("(owner=?)"),
            "{count}"
        );
        // A prune's time marks: a range of the key, its bound read off the key in order.
        for (sql, table) in PRUNE_MARKS
            .into_iter()
            .zip(["audit_time_marks", "audit_time_late"])
        {
            let marks = plan(&store, sql).await;
            assert!(
                marks.contains(&format!(
                    "SEARCH {table} USING INTEGER PRIMARY KEY (rowid<?)"
                )) && !marks.contains("TEMP B-TREE"),
                "{marks}"
            );
        }
    }

    /// A read whose caller went away (a request timed out) is interrupted and gives its slot
    /// back: it ran to the end, and a few long ones made every other read wait.
    #[tokio::test]
    async fn an_abandoned_read_is_interrupted_and_frees_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions {
            max_readers: 1,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open_dir_with(dir.path(), options)
            .await
            .unwrap();
        // Seconds of counting, unless interrupted.
        let long = |conn: &mut Connection| {
            conn.query_row(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1e8) \
                 SELECT count(*) FROM c",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(db_err)
        };
        let abandoned = tokio::time::timeout(Duration::from_millis(200), store.read(long)).await;
        assert!(abandoned.is_err(), "the long read finished: {abandoned:?}");
        let one = |conn: &mut Connection| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map_err(db_err)
        };
        let next = tokio::time::timeout(Duration::from_secs(10), store.read(one))
            .await
            .expect("the abandoned read still holds the only read slot");
        assert_eq!(next.unwrap(), 1);
        store.close().await;
    }

    /// Every audit query reads its newest matches straight off an index whose key ends in
    /// `seq`: none sorts its matches (a temporary B-tree), which made a page cost as much as
    /// every match (11 s a page by owner alone or by time, at 8 M records).
    #[tokio::test]
    async fn audit_queries_never_sort_their_matches() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_dir(dir.path()).await.unwrap();
        let t = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_000);
        let filters = [
            (Some("alice"), None, None, false),
            (Some("alice"), None, None, true),
            (Some("alice"), Some("k"), None, true),
            (None, Some("k"), None, true),
            (None, None, Some("svc"), true),
            (None, None, None, true),
            (None, None, None, false),
        ];
        for (owner, name, principal, by_time) in filters {
            let f = crate::audit::AuditFilter {
                owner: owner.map(String::from),
                name: name.map(String::from),
                principal_id: principal.map(String::from),
                since: by_time.then_some(t),
                until: by_time.then_some(t + time::Duration::hours(1)),
                actions: vec!["reveal".into()],
                ..Default::default()
            };
            let mut q = AuditQuerySql::new(&f, Some(1_000), 100).unwrap();
            let plan = store
                .read(move |conn| {
                    q.bind_time_bounds(conn)?;
                    let mut stmt = conn
                        .prepare(&format!("EXPLAIN QUERY PLAN {}", q.sql))
                        .map_err(db_err)?;
                    let rows = stmt
                        .query_map(rusqlite::params_from_iter(q.args), |r| {
                            r.get::<_, String>(3)
                        })
                        .map_err(db_err)?;
                    rows.map(|r| r.map_err(db_err))
                        .collect::<Result<Vec<_>, _>>()
                })
                .await
                .unwrap()
                .join("; ");
            assert!(!plan.contains("TEMP B-TREE"), "{f:?}: {plan}");
            assert!(!plan.starts_with("SCAN x"), "{f:?}: {plan}");
        }
        store.close().await;
    }

    /// A version whose stored metadata is no JSON (the file damaged, or edited by hand) is
    /// listed as unreadable, with the rest of its owner's credentials and its credential's
    /// other versions, where it made the whole listing fail naming nothing; it still does not
    /// reveal.
    #[tokio::test]
    async fn a_version_whose_metadata_does_not_read_is_listed_as_such() {
        use crate::testing::suite::new_version;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_dir(dir.path()).await.unwrap();
        for (name, version) in [("a", 1), ("a", 2), ("b", 1), ("c", 1), ("d", 1)] {
            store
                .put_version(new_version("alice", name, version))
                .await
                .unwrap();
        }
        store.close().await;
        let conn = Connection::open(dir.path().join("strongroom.db")).unwrap();
        conn.execute_batch(
            "UPDATE versions SET metadata = '{not json' WHERE version = 2 AND credential_id =
                 (SELECT id FROM credentials WHERE name = 'a');
             UPDATE versions SET metadata = X'00' WHERE credential_id =
                 (SELECT id FROM credentials WHERE name = 'b');
             UPDATE versions SET metadata = '[]' WHERE credential_id =
                 (SELECT id FROM credentials WHERE name = 'd');",
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open_dir(dir.path()).await.unwrap();
        let page = store.list_credentials("alice", None, 10).await.unwrap();
        let listed: Vec<_> = page
            .items
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.current_metadata_unreadable,
                    s.current_metadata.is_some(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            [
                ("a", true, false),
                ("b", true, false),
                ("c", false, true),
                ("d", true, false)
            ]
        );
        let a = store.get_credential("alice", "a").await.unwrap();
        let versions: Vec<_> = a
            .versions
            .iter()
            .map(|v| (v.version, v.metadata_unreadable, v.metadata.is_null()))
            .collect();
        assert_eq!(versions, [(2, true, true), (1, false, false)]);
        for (name, version) in [("a", None), ("a", Some(2)), ("b", None), ("d", None)] {
            let err = store.get_version("alice", name, version).await.unwrap_err();
            let named = if name == "a" { 2 } else { 1 };
            assert!(
                matches!(err, StoreError::Corrupt { version: Some(v), .. } if v == named),
                "{err:?}"
            );
        }
        assert_eq!(
            store
                .get_version("alice", "a", Some(1))
                .await
                .unwrap()
                .version,
            1
        );
        store.close().await;
    }

    /// The archive's sweep finds the deferred audit indexes from the schema and puts their
    /// names into SQL: it takes Strongroom's own, and refuses a table whose name is not a
    /// plain one (planted by someone who could write the file).
    #[test]
    fn the_audit_index_sweep_takes_only_plain_table_names() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        migrate(&conn).unwrap();
        let tables: Vec<String> = audit_index_tables(&conn)
            .unwrap()
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(
            tables,
            [
                "audit_by_credential",
                "audit_by_name",
                "audit_by_owner",
                "audit_by_principal"
            ]
        );
        conn.execute_batch(
            "CREATE TABLE \"audit_by_x; DROP TABLE versions\" (seq INTEGER PRIMARY KEY)",
        )
        .unwrap();
        let err = audit_index_tables(&conn).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }
}
