//! The group-commit writer thread.
//!
//! One thread owns the only read-write connection. It blocks for the first pending job,
//! opens a transaction (`BEGIN IMMEDIATE`), runs that job and every job queued meanwhile
//! (each inside its own savepoint, so a job that fails rolls back alone), commits once (one
//! fsync of the WAL with `synchronous=FULL`), and only then acknowledges every job of the
//! batch. While it commits, new jobs queue up and form the next batch: N concurrent
//! writers share one fsync instead of each waiting for its own.
//!
//! Checkpoints (copying the WAL back into the database file, with random writes and an
//! fsync of their own) run on a separate checkpointer thread, so they never stall the
//! writer.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::cache::{Changes, VersionCache};
use super::db_err;
use crate::StoreError;

/// A write waiting for the writer thread.
pub(super) trait WriteJob: Send {
    /// What the job may change, for the reveal cache (dropped after the commit); the writer
    /// takes it once, before running the job.
    fn take_changes(&mut self) -> Changes;
    /// Runs the job inside the open transaction; returns what acknowledges it after commit.
    fn run(self: Box<Self>, conn: &Connection) -> Box<dyn Ack>;
    /// Fails the job without running it.
    fn abort(self: Box<Self>, err: StoreError);
}

/// Acknowledges one job once its batch's fate is known.
pub(super) trait Ack: Send {
    fn ack(self: Box<Self>, commit: Result<(), StoreError>);
}

pub(super) struct Job<F, T> {
    pub(super) changes: Changes,
    pub(super) f: F,
    pub(super) reply: oneshot::Sender<Result<T, StoreError>>,
}

struct Done<T> {
    result: Result<T, StoreError>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<F, T> WriteJob for Job<F, T>
where
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
    T: Send + 'static,
{
    fn take_changes(&mut self) -> Changes {
        std::mem::replace(&mut self.changes, Changes::NoCredential)
    }

    fn run(self: Box<Self>, conn: &Connection) -> Box<dyn Ack> {
        let result = in_savepoint(conn, self.f);
        Box::new(Done {
            result,
            reply: self.reply,
        })
    }

    fn abort(self: Box<Self>, err: StoreError) {
        // The caller may have gone away (its future dropped); nothing to do then.
        let _ = self.reply.send(Err(err));
    }
}

impl<T: Send> Ack for Done<T> {
    fn ack(self: Box<Self>, commit: Result<(), StoreError>) {
        let outcome = match commit {
            Ok(()) => self.result,
            Err(e) => Err(e),
        };
        let _ = self.reply.send(outcome);
    }
}

/// Runs `f` inside a savepoint: released on success, rolled back on error. If the rollback
/// itself fails, the error is still `f`'s; the writer notices the broken transaction through
/// `is_autocommit` or the final `COMMIT`.
pub(super) fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    exec_cached(conn, "SAVEPOINT job").map_err(db_err)?;
    match f(conn) {
        Ok(v) => match exec_cached(conn, "RELEASE job") {
            Ok(()) => Ok(v),
            Err(e) => Err(db_err(e)),
        },
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

/// Runs a parameterless statement through the connection's statement cache: the writer
/// issues `SAVEPOINT`/`RELEASE` per job and `BEGIN`/`COMMIT` per batch, and
/// `execute_batch` would parse and compile each of them again every time.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.raw_execute().map(|_| ())
}

thread_local! {
    /// How long [`busy_wait`] keeps retrying on this thread (`SqliteOptions::busy_timeout`).
    static BUSY_LIMIT: Cell<Duration> = const { Cell::new(Duration::from_secs(5)) };
}

/// Retries spaced 100 µs apart for the first 20 ms, then 1 ms apart.
const FINE_RETRIES: i32 = 200;

/// Installs [`busy_wait`] on a write or checkpoint connection, giving up after `limit` (set
/// for the calling thread; [`run`] and [`checkpointer`] set it again on their threads).
pub(super) fn set_busy_handler(conn: &Connection, limit: Duration) -> rusqlite::Result<()> {
    BUSY_LIMIT.with(|l| l.set(limit));
    conn.busy_handler(Some(busy_wait))
}

/// The busy handler of the write and checkpoint connections. SQLite's default (`busy_timeout`) sleeps 1, 2, 5,
/// 10, 15, 20, 25, ... ms between retries, so when the checkpointer held the write lock for
/// a `RESTART` checkpoint of a few milliseconds, the writer (and every request waiting for
/// a commit) stalled for 8 to 33 ms: the p99 of the HTTP benchmark. Retrying finely keeps
/// the stall close to the lock's own duration; the total wait stays bounded by the limit.
fn busy_wait(attempt: i32) -> bool {
    let limit_ms = BUSY_LIMIT.with(Cell::get).as_millis();
    let waited_ms = if attempt < FINE_RETRIES {
        i64::from(attempt) / 10
    } else {
        i64::from(FINE_RETRIES / 10) + i64::from(attempt - FINE_RETRIES)
    };
    if u128::try_from(waited_ms).unwrap_or(0) >= limit_ms {
        return false;
    }
    std::thread::sleep(if attempt < FINE_RETRIES {
        Duration::from_micros(100)
    } else {
        Duration::from_millis(1)
    });
    true
}

/// The writer thread's loop; returns when every sender is gone. After each commit it pokes
/// the checkpointer (see [`checkpointer`]); when it returns, the checkpointer has stopped.
pub(super) fn run(
    conn: Connection,
    rx: mpsc::Receiver<Box<dyn WriteJob>>,
    max_batch: usize,
    busy_limit: Duration,
    checkpoints: Option<(mpsc::SyncSender<()>, std::thread::JoinHandle<()>)>,
    cache: &VersionCache,
    mut data_version: i64,
) {
    BUSY_LIMIT.with(|l| l.set(busy_limit));
    let mut queue: VecDeque<Box<dyn WriteJob>> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => break,
            }
        }
        if run_batch(&conn, &rx, &mut queue, max_batch, cache, &mut data_version) {
            if let Some((poke, _)) = &checkpoints {
                let _ = poke.try_send(());
            }
        }
    }
    if let Some((poke, handle)) = checkpoints {
        drop(poke);
        let _ = handle.join();
    }
    // `conn` closes last: the last connection to close checkpoints the WAL into the file.
    drop(conn);
}

/// How long a `RESTART` checkpoint may wait for readers to move to the latest snapshot. It
/// holds up every writer while it waits: with the connection's busy limit (5 s), a reader
/// that kept an old snapshot for long (`backup`'s `VACUUM INTO`, a long audit query) held
/// every write and reveal 5.5 s at a time for as long as it read, and some failed with
/// "database is locked".
const RESTART_WAIT: Duration = Duration::from_millis(20);
/// After a `RESTART` that gave up, the next one waits at least this long, twice as long
/// after each further one up to [`RESTART_BACKOFF_MAX`]: while a long reader lasts, writers
/// are held up at most 20 ms a second, then less. The WAL grows meanwhile (passive
/// checkpoints go on up to the reader's snapshot), and is cut back once it starts over.
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// See [`RESTART_BACKOFF_MIN`].
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Least time between two checkpoints. Short, so each one writes and fsyncs a small burst of
/// database pages: a 200 ms interval made bursts that WAL fsyncs queued behind (put p99 about
/// 6 ms against under 5 ms at 50 ms, 4 runs each, BENCHMARKS.md).
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// The checkpointer thread: copies committed WAL frames into the database file on its own
/// connection, so the writer (whose `wal_autocheckpoint` is off) never stalls on the
/// checkpoint's random writes and fsync. Passive checkpoints never block the writer; if the
/// WAL still grows past `restart_frames`, a `RESTART` checkpoint resets it, waiting for
/// readers [`RESTART_WAIT`] at most. Returns when the writer stops poking.
pub(super) fn checkpointer(
    conn: Connection,
    pokes: mpsc::Receiver<()>,
    busy_limit: Duration,
    restart_frames: i64,
) {
    BUSY_LIMIT.with(|l| l.set(busy_limit));
    let mut restart_after = std::time::Instant::now();
    let mut backoff = RESTART_BACKOFF_MIN;
    while pokes.recv().is_ok() {
        let started = std::time::Instant::now();
        let frames = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
            .unwrap_or(0);
        if frames > restart_frames && started >= restart_after {
            BUSY_LIMIT.with(|l| l.set(RESTART_WAIT));
            // The first column says whether readers (or a writer) kept it from finishing.
            let gave_up = !matches!(
                conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0)),
                Ok(0)
            );
            BUSY_LIMIT.with(|l| l.set(busy_limit));
            if gave_up {
                restart_after = std::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
            } else {
                backoff = RESTART_BACKOFF_MIN;
            }
        }
        if let Some(rest) = CHECKPOINT_INTERVAL.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
        // Commits made meanwhile are covered by the next checkpoint.
        while pokes.try_recv().is_ok() {}
    }
}

fn drain(
    rx: &mpsc::Receiver<Box<dyn WriteJob>>,
    queue: &mut VecDeque<Box<dyn WriteJob>>,
    max: usize,
) {
    while queue.len() < max {
        match rx.try_recv() {
            Ok(job) => queue.push_back(job),
            Err(_) => break,
        }
    }
}

/// `PRAGMA data_version` of the writer's connection: it moves only when another
/// connection (another process: the writer is this process's only one) committed.
pub(super) fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))
}

/// Runs one batch; returns whether it committed anything.
fn run_batch(
    conn: &Connection,
    rx: &mpsc::Receiver<Box<dyn WriteJob>>,
    queue: &mut VecDeque<Box<dyn WriteJob>>,
    max_batch: usize,
    cache: &VersionCache,
    seen_version: &mut i64,
) -> bool {
    let begun = exec_cached(conn, "BEGIN IMMEDIATE").and_then(|()| data_version(conn));
    let version = match begun {
        Ok(v) => v,
        Err(e) => {
            // Cannot even start: fail what is queued now; later jobs get a fresh try.
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            let err = db_err(e);
            for job in queue.drain(..) {
                job.abort(err.clone());
            }
            return false;
        }
    };
    // Holding the write lock: every other process's commit so far is visible now.
    if version != *seen_version {
        *seen_version = version;
        cache.external_change();
    }
    let mut acks: Vec<Box<dyn Ack>> = Vec::new();
    let mut changes: Vec<Changes> = Vec::new();
    loop {
        drain(rx, queue, max_batch.saturating_sub(acks.len()));
        let Some(mut job) = queue.pop_front() else {
            break;
        };
        let change = job.take_changes();
        if change != Changes::NoCredential {
            changes.push(change);
        }
        acks.push(job.run(conn));
        if conn.is_autocommit() {
            // The database rolled the whole transaction back (disk full, I/O error, ...):
            // every job of this batch so far is lost. Fail them; the rest of the queue is
            // retried in the next batch.
            let err = StoreError::unavailable("the database aborted the write transaction");
            drop_changed(cache, &changes);
            for ack in acks.drain(..) {
                ack.ack(Err(err.clone()));
            }
            return false;
        }
        if acks.len() >= max_batch {
            break;
        }
    }
    cache.checked();
    let committed = exec_cached(conn, "COMMIT");
    // Whatever the commit's fate, drop what the jobs named before anyone hears back.
    drop_changed(cache, &changes);
    match committed {
        Ok(()) => {
            for ack in acks {
                ack.ack(Ok(()));
            }
            true
        }
        Err(e) => {
            let err = db_err(e);
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            for ack in acks {
                ack.ack(Err(err.clone()));
            }
            false
        }
    }
}

fn drop_changed(cache: &VersionCache, changes: &[Changes]) {
    for c in changes {
        cache.apply(c);
    }
}
