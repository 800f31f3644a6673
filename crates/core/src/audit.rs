//! Auditing: the head key and the group-committing [`Auditor`].
//!
//! Every request is audited and a reveal is fail-closed (its record is durable before the
//! value leaves), so appends are **group-committed**: [`Auditor::record`] hands the event to
//! one background task per process, which appends everything queued meanwhile in one
//! [`AuditLog::audit_append`] (one transaction) and then acknowledges each caller. While one
//! batch commits, the next one fills, so N concurrent requests share one commit. Up to
//! [`PIPELINE`] appends are in flight at once, started in order, so the next batch is
//! already queued at the store when the previous commit ends (with one append in flight,
//! every batch also waited for a round trip through this task after the previous commit).
//! Callers are answered and the sink is written batch by batch in the order the appends
//! started. On PostgreSQL two appends in flight may take the head's row lock in either
//! order, and the sink may then hold two adjacent batches swapped (every line carries its
//! `seq`).
//!
//! A log that already group-commits concurrent appends itself ([`AuditLog::groups_appends`]:
//! SQLite, whose one writer thread folds every queued job into one commit) gets each event
//! straight from [`Auditor::record`] and no task is started: one hand-off fewer per
//! request. Each caller then writes its own sink line after its commit, so lines of one
//! commit may come in any order.
//!
//! The head key (which MACs the chain head) is a random 256-bit key wrapped by the key
//! provider under the associated data [`HEAD_KEY_AAD`] and kept in the store's
//! `provider_state` under `audit/head-key`; it is created on first use (racing nodes agree on
//! the first one stored) and unwrapped once at start.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use serde::{Deserialize, Serialize};
use strongroom_crypto::{KekRef, Key256, KeyProvider, SecureRandom, WrappedKey};
use strongroom_store::audit::{Event, HeadKey, Record, GENESIS, HEAD_KEY_STATE};
use strongroom_store::{AuditLog, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::CoreError;

/// The associated data the head key is wrapped under.
pub const HEAD_KEY_AAD: &[u8] = b"strongroom audit head key v1";

/// Most events one append carries.
const MAX_BATCH: usize = 1024;
/// Events waiting for the writer task before callers wait to enqueue.
const QUEUE: usize = 16 * 1024;
/// Most appends in flight at once.
pub const PIPELINE: usize = 2;

#[derive(Serialize, Deserialize)]
struct StoredHeadKey {
    v: u8,
    provider: String,
    key_id: String,
    version: u32,
    wrapped: Vec<u8>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> CoreError {
    CoreError::Unavailable(format!("audit {what}: {e}"))
}

async fn unwrap_head_key(keys: &dyn KeyProvider, stored: &[u8]) -> Result<HeadKey, CoreError> {
    let s: StoredHeadKey =
        serde_json::from_slice(stored).map_err(|_| CoreError::Integrity { version: None })?;
    let wrapped = WrappedKey {
        kek: KekRef {
            provider: s.provider,
            key_id: s.key_id,
            version: s.version,
        },
        bytes: s.wrapped,
    };
    let kek = wrapped.kek.clone();
    let key = keys
        .unwrap(&wrapped, HEAD_KEY_AAD)
        .await
        .map_err(|e| match &e {
            // Not an outage: the key that sealed it is gone, and waiting will not help.
            strongroom_crypto::UnwrapError::Failed(p)
                if p.kind() == strongroom_crypto::ProviderErrorKind::AuthenticationFailed =>
            {
                unavailable(
                    "head key unwrap",
                    format!(
                        "{kek} does not open the audit head key this store holds: a key of \
                         that name was deleted and recreated since, the store belongs to another \
                         deployment, or its copy of the head key was altered ({e})"
                    ),
                )
            }
            // Most often a keyring made anew (or an older copy restored) beside a store
            // sealed under the lost one.
            strongroom_crypto::UnwrapError::NotMine(_) => unavailable(
                "head key unwrap",
                format!(
                    "the store's audit head key is sealed under {kek}, which this key provider \
                     does not hold: is this the keyring (or provider) the store was made with? \
                     A keyring generated anew, or an older copy, cannot open what the store \
                     holds; put the store's own keyring back"
                ),
            ),
            _ => unavailable("head key unwrap", e),
        })?;
    Ok(HeadKey::new(*key.expose_secret()))
}

/// The audit log of `store`, or an error when it keeps none.
///
/// # Errors
///
/// [`CoreError::Unavailable`] when the store has no audit log.
pub fn audit_log(store: &dyn Store) -> Result<Arc<dyn AuditLog>, CoreError> {
    store
        .audit_log()
        .ok_or_else(|| CoreError::Unavailable("this store keeps no audit log".into()))
}

/// The head key, if one was ever created (for `audit verify`, which must not create one).
///
/// # Errors
///
/// [`CoreError::Unavailable`] when the store or the key provider fails.
pub async fn load_head_key(
    store: &dyn Store,
    keys: &dyn KeyProvider,
) -> Result<Option<HeadKey>, CoreError> {
    match store
        .get_provider_state(HEAD_KEY_STATE)
        .await
        .map_err(|e| unavailable("head key", e))?
    {
        Some(stored) => Ok(Some(unwrap_head_key(keys, &stored).await?)),
        None => Ok(None),
    }
}

/// The head key, created (and wrapped by `keys`) on first use.
///
/// # Errors
///
/// [`CoreError::Unavailable`] when the store, the key provider or the RNG fails.
pub async fn load_or_create_head_key(
    store: &dyn Store,
    keys: &dyn KeyProvider,
    rng: &dyn SecureRandom,
) -> Result<HeadKey, CoreError> {
    let log = audit_log(store)?;
    // The head first, then the key: a key is always stored before the head is sealed with
    // it, so a head found sealed here has a key stored before, unless it was removed (a node
    // that made both in between is no alarm).
    let sealed = log
        .audit_head()
        .await
        .map_err(|e| unavailable("head", e))?
        .is_some();
    let key = match load_head_key(store, keys).await? {
        Some(key) => key,
        // A new key would re-seal whatever the log holds now.
        None if sealed => {
            return Err(CoreError::AuditIntegrity(
                "the audit head key is missing from provider_state although the log has a \
                 sealed head: it was removed outside Strongroom (restore it from a backup)"
                    .into(),
            ))
        }
        None => create_head_key(log.as_ref(), keys, rng).await?,
    };
    // A new log's empty head is sealed before its first append (refused over existing data).
    log.audit_seal_genesis(key.head(0, GENESIS)).await?;
    // Appends refuse a head whose MAC fails: say so at start rather than at every request.
    let head = log.audit_head().await.map_err(|e| unavailable("head", e))?;
    if !head.is_some_and(|h| key.check(&h)) {
        return Err(CoreError::AuditIntegrity(
            "the audit chain head's MAC does not verify (the log was truncated or rewritten \
             outside Strongroom): run `strongroom audit verify`"
                .into(),
        ));
    }
    head_names_its_record(log.as_ref(), &key).await?;
    Ok(key)
}

/// Whether the chain head's MAC verifies under `key` and the record it names is there, the
/// one it names: a last record deleted or rewritten under a genuine head is seen at start and
/// by the readiness probe, not only at the next append. (Records past the head, which a
/// concurrent append may have just added, are left to the append's own check.)
///
/// # Errors
///
/// [`CoreError::AuditIntegrity`] naming what is wrong; [`CoreError::Unavailable`] when the
/// log cannot be read.
pub async fn head_names_its_record(log: &dyn AuditLog, key: &HeadKey) -> Result<(), CoreError> {
    let Some(head) = log.audit_head().await.map_err(|e| unavailable("head", e))? else {
        return Ok(());
    };
    if !key.check(&head) {
        return Err(CoreError::AuditIntegrity(
            "the audit chain head's MAC does not verify: run `strongroom audit verify`".into(),
        ));
    }
    if head.count == 0 {
        return Ok(());
    }
    let last = log
        .audit_scan(head.count - 1, 1)
        .await
        .map_err(|e| unavailable("scan", e))?;
    match last.first() {
        // Its contents too, not only its stored hash.
        Some(r)
            if r.seq == head.count
                && r.hash == head.hash
                && strongroom_store::audit::record_hash(r.seq, &r.event, &r.prev_hash)
                    == r.hash =>
        {
            Ok(())
        }
        _ => Err(CoreError::AuditIntegrity(format!(
            "the audit chain head names record {} but it is missing or differs (the log was \
             cut or rewritten outside Strongroom): run `strongroom audit verify`",
            head.count
        ))),
    }
}

/// Creates the head key, wrapped by `keys`; racing nodes all end up with the first stored.
async fn create_head_key(
    log: &dyn AuditLog,
    keys: &dyn KeyProvider,
    rng: &dyn SecureRandom,
) -> Result<HeadKey, CoreError> {
    let key = Key256::generate(rng).map_err(|e| unavailable("head key", e))?;
    let kek = keys
        .active_kek()
        .map_err(|e| unavailable("head key wrap", e))?;
    let wrapped = keys
        .wrap(&kek, &key, HEAD_KEY_AAD)
        .await
        .map_err(|e| unavailable("head key wrap", e))?;
    let stored = serde_json::to_vec(&StoredHeadKey {
        v: 1,
        provider: wrapped.kek.provider,
        key_id: wrapped.kek.key_id,
        version: wrapped.kek.version,
        wrapped: wrapped.bytes,
    })
    .map_err(|e| unavailable("head key", e))?;
    // Another node may have stored one first: everyone uses the one stored.
    let winner = log
        .audit_init_head_key(stored)
        .await
        .map_err(|e| unavailable("head key", e))?;
    unwrap_head_key(keys, &winner).await
}

struct Pending {
    event: Event,
    ack: oneshot::Sender<Result<u64, StoreError>>,
}

/// Where the server also writes each committed record, as one JSON line.
pub type RecordSink = Box<dyn Write + Send>;

/// The group-committing audit writer. Cheap to clone; the task stops when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Auditor {
    route: Route,
    key: Arc<HeadKey>,
    sink: Option<Arc<Mutex<SinkWriter>>>,
    /// Records the sink could not take, since the start.
    sink_dropped: Arc<std::sync::atomic::AtomicU64>,
    /// False since an append found the log changed outside Strongroom, until one succeeds.
    intact: Arc<std::sync::atomic::AtomicBool>,
    /// When the last append failed for want of the store (a full disk, an outage), in
    /// milliseconds after `started` plus one; 0 once one has succeeded since.
    failed_at: Arc<std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
}

/// How long after a failed append, with none succeeding since, [`Auditor::failing`] holds:
/// long enough for a load balancer to take the node out, short enough that a node with no
/// traffic to prove it has recovered is tried again.
const FAILING_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// Where [`Auditor::record`] sends an event.
#[derive(Clone)]
enum Route {
    /// Straight to a log that group-commits concurrent appends itself (SQLite): one
    /// hand-off fewer per request.
    Direct(Arc<dyn AuditLog>),
    /// To the batching task.
    Task(mpsc::Sender<Pending>),
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("sink", &self.sink.is_some())
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Starts the writer task on the current tokio runtime. Each committed record is also
    /// written to `sink` (if any) as a JSON line, after the commit.
    pub fn start(log: Arc<dyn AuditLog>, key: HeadKey, sink: Option<RecordSink>) -> Self {
        let key = Arc::new(key);
        let sink_dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sink = sink.map(|out| {
            Arc::new(Mutex::new(SinkWriter {
                out: crate::lines::LineSink::new(out),
                missing: None,
                dropped: sink_dropped.clone(),
            }))
        });
        let route = if log.groups_appends() {
            Route::Direct(log)
        } else {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(run(log, key.clone(), rx, sink.clone()));
            Route::Task(tx)
        };
        Self {
            route,
            key,
            sink,
            sink_dropped,
            intact: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            failed_at: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            started: std::time::Instant::now(),
        }
    }

    /// Whether an append failed for want of the store (a full disk, an outage) within the
    /// last 15 s with none succeeding since: every write and reveal then fails, so the
    /// node reports not ready.
    pub fn failing(&self) -> bool {
        let failed_at = self.failed_at.load(std::sync::atomic::Ordering::Relaxed);
        failed_at != 0
            && self.elapsed_ms().saturating_sub(failed_at - 1) < FAILING_FOR.as_millis() as u64
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn set_failed(&self, failed: bool) {
        let value = if failed { self.elapsed_ms() + 1 } else { 0 };
        self.failed_at
            .store(value, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the log took the last append: false after one was refused because the log was
    /// changed outside Strongroom ([`StoreError::AuditIntegrity`]), until one succeeds again.
    /// The server then refuses writes and reports not ready, rather than act unaudited.
    pub fn intact(&self) -> bool {
        self.intact.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Notes how an append that went around [`Auditor::record`] (a put's own transaction)
    /// ended.
    pub fn note_append(&self, outcome: Result<(), &CoreError>) {
        match outcome {
            Ok(()) => {
                self.set_intact(true);
                self.set_failed(false);
            }
            Err(CoreError::AuditIntegrity(_)) => self.set_intact(false),
            Err(CoreError::Unavailable(_)) => self.set_failed(true),
            Err(_) => {}
        }
    }

    fn set_intact(&self, intact: bool) {
        self.intact
            .store(intact, std::sync::atomic::Ordering::Relaxed);
    }

    fn note_store_append<T>(&self, outcome: &Result<T, StoreError>) {
        match outcome {
            Ok(_) => {
                self.set_intact(true);
                self.set_failed(false);
            }
            Err(StoreError::AuditIntegrity { .. }) => self.set_intact(false),
            Err(StoreError::Unavailable(_)) => self.set_failed(true),
            Err(_) => {}
        }
    }

    /// How many committed records the sink (`[audit] jsonl`) could not take since the start
    /// (a full disk): they are in the log, not in the copy.
    pub fn sink_dropped(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.sink_dropped.clone()
    }

    /// The key that MACs the chain head, for a write that commits its own record in its
    /// own transaction (a put: [`Store::put_version_audited`]).
    pub fn head_key(&self) -> Arc<HeadKey> {
        self.key.clone()
    }

    /// Copies a record committed outside this writer (a put's) to the sink. It may land
    /// beside a batch committed at the same moment in either order; each line has its `seq`.
    pub fn committed(&self, record: &Record) {
        if let Some(sink) = &self.sink {
            write_lines(sink, std::slice::from_ref(record));
        }
    }

    /// Appends `event` and waits until its record is durable; returns its `seq`.
    ///
    /// # Errors
    ///
    /// [`CoreError::Unavailable`] when the record could not be written.
    pub async fn record(&self, event: Event) -> Result<u64, CoreError> {
        let tx = match &self.route {
            Route::Direct(log) => {
                let appended = log.audit_append(self.key.clone(), vec![event]).await;
                self.note_store_append(&appended);
                let record = appended
                    .map_err(|e| unavailable("append", e))?
                    .pop()
                    .ok_or_else(|| {
                        CoreError::Unavailable("audit append returned no record".into())
                    })?;
                self.committed(&record);
                return Ok(record.seq);
            }
            Route::Task(tx) => tx,
        };
        let (ack, rx) = oneshot::channel();
        tx.send(Pending { event, ack })
            .await
            .map_err(|_| CoreError::Unavailable("audit writer stopped".into()))?;
        let appended = rx
            .await
            .map_err(|_| CoreError::Unavailable("audit writer stopped".into()))?;
        self.note_store_append(&appended);
        appended.map_err(|e| unavailable("append", e))
    }
}

type Append = Pin<Box<dyn Future<Output = Result<Vec<Record>, StoreError>> + Send>>;

/// One append in flight: its future (until it finishes), its outcome, its callers.
struct InFlight {
    append: Option<Append>,
    outcome: Option<Result<Vec<Record>, StoreError>>,
    acks: Vec<oneshot::Sender<Result<u64, StoreError>>>,
}

/// Polls every append in flight, oldest first (so a new one is started after those before
/// it: the SQLite store queues its job at the first poll, and the chain follows that order);
/// ready when the oldest has finished.
fn poll_oldest(flights: &mut VecDeque<InFlight>, cx: &mut std::task::Context<'_>) -> Poll<()> {
    for f in flights.iter_mut() {
        if let Some(append) = &mut f.append {
            if let Poll::Ready(outcome) = append.as_mut().poll(cx) {
                f.append = None;
                f.outcome = Some(outcome);
            }
        }
    }
    match flights.front() {
        Some(f) if f.outcome.is_some() => Poll::Ready(()),
        _ => Poll::Pending,
    }
}

async fn run(
    log: Arc<dyn AuditLog>,
    key: Arc<HeadKey>,
    mut rx: mpsc::Receiver<Pending>,
    sink: Option<Arc<Mutex<SinkWriter>>>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    let mut flights: VecDeque<InFlight> = VecDeque::with_capacity(PIPELINE);
    let mut open = true;
    while open || !flights.is_empty() {
        tokio::select! {
            biased;
            () = std::future::poll_fn(|cx| poll_oldest(&mut flights, cx)), if !flights.is_empty() => {
                if let Some(done) = flights.pop_front() {
                    finish(done, sink.as_deref());
                }
            }
            n = rx.recv_many(&mut batch, MAX_BATCH), if open && flights.len() < PIPELINE => {
                if n == 0 {
                    open = false;
                    continue;
                }
                let (events, acks): (Vec<Event>, Vec<_>) =
                    batch.drain(..).map(|p| (p.event, p.ack)).unzip();
                let (log, key) = (log.clone(), key.clone());
                flights.push_back(InFlight {
                    append: Some(Box::pin(async move { log.audit_append(key, events).await })),
                    outcome: None,
                    acks,
                });
            }
        }
    }
}

/// Acknowledges the callers of a finished append and copies its records to the sink.
fn finish(done: InFlight, sink: Option<&Mutex<SinkWriter>>) {
    match done.outcome {
        Some(Ok(records)) => {
            for (ack, r) in done.acks.into_iter().zip(&records) {
                let _ = ack.send(Ok(r.seq));
            }
            if let Some(sink) = sink {
                write_lines(sink, &records);
            }
        }
        Some(Err(e)) => {
            // Every caller gets the error; the API layer logs it.
            for ack in done.acks {
                let _ = ack.send(Err(e.clone()));
            }
        }
        // Not reached (only finished appends are popped); dropping the acks fails the
        // callers ("audit writer stopped").
        None => {}
    }
}

/// Writes `records` to the sink as JSON lines, in one locked run.
fn write_lines(sink: &Mutex<SinkWriter>, records: &[Record]) {
    let mut w = sink.lock().unwrap_or_else(|e| e.into_inner());
    for r in records {
        if let Ok(mut line) = serde_json::to_vec(r) {
            line.push(b'\n');
            w.write_line(r.seq, &line);
        }
    }
    let _ = w.out.flush();
}

/// The sink, and what became of the lines it could not take: a full disk used to drop them
/// without a word and glue the lines on either side of the gap into one, so the copy was
/// no longer JSON lines.
struct SinkWriter {
    out: crate::lines::LineSink<RecordSink>,
    /// Records not written since the last one that was: (how many, the first's seq).
    missing: Option<(u64, u64)>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl SinkWriter {
    fn write_line(&mut self, seq: u64, line: &[u8]) {
        match self.out.write_line(line) {
            Ok(()) => {
                if let Some((records, from_seq)) = self.missing.take() {
                    tracing::warn!(
                        records,
                        from_seq,
                        "the [audit] jsonl copy takes records again; those it could not take \
                         are in the audit log (strongroom audit export)"
                    );
                }
            }
            Err(e) => {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match &mut self.missing {
                    Some((records, _)) => *records += 1,
                    None => {
                        self.missing = Some((1, seq));
                        tracing::error!(
                            seq,
                            error = %e,
                            "the [audit] jsonl copy could not take a record; it is in the audit \
                             log (strongroom audit export), and the copy misses records from \
                             here until one is written \
                             (strongroom_audit_jsonl_records_dropped_total)"
                        );
                    }
                }
            }
        }
    }
}

/// Re-wraps the stored head key under the provider's active KEK (for `rewrap` after a
/// rotation, before the old KEK is retired). Returns `false` when there is no head key or it
/// is already wrapped by the active KEK.
///
/// # Errors
///
/// [`CoreError::Unavailable`] when the store or the key provider fails.
pub async fn rewrap_head_key(store: &dyn Store, keys: &dyn KeyProvider) -> Result<bool, CoreError> {
    let Some(stored) = store
        .get_provider_state(HEAD_KEY_STATE)
        .await
        .map_err(|e| unavailable("head key", e))?
    else {
        return Ok(false);
    };
    let s: StoredHeadKey =
        serde_json::from_slice(&stored).map_err(|_| CoreError::Integrity { version: None })?;
    let active = keys
        .active_kek()
        .map_err(|e| unavailable("head key wrap", e))?;
    if s.provider == active.provider && s.key_id == active.key_id && s.version == active.version {
        return Ok(false);
    }
    let wrapped = WrappedKey {
        kek: KekRef {
            provider: s.provider,
            key_id: s.key_id,
            version: s.version,
        },
        bytes: s.wrapped,
    };
    let key = keys
        .unwrap(&wrapped, HEAD_KEY_AAD)
        .await
        .map_err(|e| unavailable("head key unwrap", e))?;
    let rewrapped = keys
        .wrap(&active, &key, HEAD_KEY_AAD)
        .await
        .map_err(|e| unavailable("head key wrap", e))?;
    let bytes = serde_json::to_vec(&StoredHeadKey {
        v: 1,
        provider: rewrapped.kek.provider,
        key_id: rewrapped.kek.key_id,
        version: rewrapped.kek.version,
        wrapped: rewrapped.bytes,
    })
    .map_err(|e| unavailable("head key", e))?;
    store
        .put_provider_state(HEAD_KEY_STATE, bytes)
        .await
        .map_err(|e| unavailable("head key", e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use strongroom_crypto::testing::FakeProvider;
    use strongroom_crypto::OsRandom;
    use strongroom_store::sqlite::SqliteStore;

    use super::*;

    /// A service's reveal of version `version` of `o`/`n`.
    fn reveal_event(version: u32) -> Event {
        Event {
            time: time::OffsetDateTime::now_utc(),
            principal_kind: "service".into(),
            principal_id: "s".into(),
            action: "reveal".into(),
            owner: Some("o".into()),
            name: Some("n".into()),
            version: Some(version),
            outcome: "ok".into(),
            status: 200,
            request_id: None,
            client_addr: None,
            on_behalf_of: None,
            destination: None,
            error_code: None,
        }
    }

    /// Nodes starting together on a new store (each its own connection) all start: one makes
    /// the key and seals the head, and a node that looked for the key before then, and finds
    /// the head sealed after, takes that key instead of calling the log tampered with.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_starting_together_agree_on_one_key() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            SqliteStore::open_dir(dir.path())
                .await
                .unwrap()
                .close()
                .await;
            let mut nodes = Vec::new();
            for _ in 0..6 {
                let path = dir.path().to_owned();
                nodes.push(tokio::spawn(async move {
                    let store = SqliteStore::open_dir(&path).await.unwrap();
                    let keys = FakeProvider::new("audit-tests", 1);
                    let key = load_or_create_head_key(&store, &keys, &OsRandom).await;
                    store.close().await;
                    key.map(|k| k.head(1, [1; 32]))
                }));
            }
            let mut heads = Vec::new();
            for n in nodes {
                heads.push(n.await.unwrap().expect("every node starts"));
            }
            assert!(heads.windows(2).all(|w| w[0] == w[1]), "one key");
        }
    }

    /// The SQLite log as a log that does not group-commit by itself (as PostgreSQL), so the
    /// batching task runs in front of it; its appends fail while `down` is set (a full disk).
    #[derive(Debug)]
    struct TestLog {
        store: SqliteStore,
        down: Arc<std::sync::atomic::AtomicBool>,
    }

    impl TestLog {
        fn new(store: SqliteStore) -> Self {
            Self {
                store,
                down: Arc::default(),
            }
        }
    }

    #[async_trait::async_trait]
    impl AuditLog for TestLog {
        async fn audit_append(
            &self,
            key: Arc<HeadKey>,
            events: Vec<Event>,
        ) -> Result<Vec<Record>, StoreError> {
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Unavailable(
                    strongroom_store::BackendError::msg("database or disk is full"),
                ));
            }
            self.store.audit_append(key, events).await
        }
        async fn audit_head(&self) -> Result<Option<strongroom_store::audit::Head>, StoreError> {
            self.store.audit_head().await
        }
        async fn audit_scan(&self, after: u64, limit: u32) -> Result<Vec<Record>, StoreError> {
            self.store.audit_scan(after, limit).await
        }
        async fn audit_query(
            &self,
            filter: &strongroom_store::AuditFilter,
            before: Option<u64>,
            limit: u32,
        ) -> Result<Vec<Record>, StoreError> {
            self.store.audit_query(filter, before, limit).await
        }
        async fn audit_init_head_key(&self, wrapped: Vec<u8>) -> Result<Vec<u8>, StoreError> {
            self.store.audit_init_head_key(wrapped).await
        }
        async fn audit_seal_genesis(
            &self,
            genesis: strongroom_store::audit::Head,
        ) -> Result<(), StoreError> {
            self.store.audit_seal_genesis(genesis).await
        }
        async fn audit_anchor(
            &self,
        ) -> Result<Option<strongroom_store::audit::Anchor>, StoreError> {
            self.store.audit_anchor().await
        }
        async fn audit_set_anchor(
            &self,
            key: Arc<HeadKey>,
            after: u64,
            anchor: strongroom_store::audit::Anchor,
        ) -> Result<(), StoreError> {
            self.store.audit_set_anchor(key, after, anchor).await
        }
        async fn audit_prune(
            &self,
            key: Arc<HeadKey>,
            limit: u32,
        ) -> Result<strongroom_store::audit::Pruned, StoreError> {
            self.store.audit_prune(key, limit).await
        }
    }

    /// A failed append marks the writer failing (the node reports not ready) until one
    /// succeeds; a failure long past no longer counts.
    #[tokio::test]
    async fn a_failed_append_marks_the_auditor_failing_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_dir(dir.path()).await.unwrap();
        let keys = FakeProvider::new("audit-tests", 1);
        let key = load_or_create_head_key(&store, &keys, &OsRandom)
            .await
            .unwrap();
        let log = Arc::new(TestLog::new(store));
        let down = log.down.clone();
        let auditor = Auditor::start(log, key, None);
        auditor.record(reveal_event(1)).await.unwrap();
        assert!(!auditor.failing());
        down.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(auditor.record(reveal_event(2)).await.is_err());
        assert!(auditor.failing());
        assert!(auditor.intact(), "a full disk is no tampering");
        down.store(false, std::sync::atomic::Ordering::Relaxed);
        auditor.record(reveal_event(3)).await.unwrap();
        assert!(!auditor.failing());
        // A put's own append reports the same way.
        auditor.note_append(Err(&CoreError::Unavailable("disk full".into())));
        assert!(auditor.failing());
        auditor.note_append(Ok(()));
        assert!(!auditor.failing());
    }

    /// A head key the provider's key no longer opens (the key recreated under its name, or
    /// the stored copy altered) stops the start with a message saying so, not a bare
    /// "does not authenticate".
    #[tokio::test]
    async fn a_head_key_the_provider_does_not_open_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_dir(dir.path()).await.unwrap();
        let keys = FakeProvider::new("audit-tests", 1);
        load_or_create_head_key(&store, &keys, &OsRandom)
            .await
            .unwrap();
        let stored = store
            .get_provider_state(HEAD_KEY_STATE)
            .await
            .unwrap()
            .unwrap();
        let mut s: StoredHeadKey = serde_json::from_slice(&stored).unwrap();
        s.wrapped[20] ^= 1;
        store
            .put_provider_state(HEAD_KEY_STATE, serde_json::to_vec(&s).unwrap())
            .await
            .unwrap();
        let e = load_or_create_head_key(&store, &keys, &OsRandom)
            .await
            .expect_err("the altered head key was accepted")
            .to_string();
        assert!(
            e.contains("fake:audit-tests:v1 does not open the audit head key")
                && e.contains("recreated"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn head_key_is_created_once_and_group_commits_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
        let keys = FakeProvider::new("audit-tests", 1);
        assert!(load_head_key(&*store, &keys).await.unwrap().is_none());
        let k1 = load_or_create_head_key(&*store, &keys, &OsRandom)
            .await
            .unwrap();
        let k2 = load_or_create_head_key(&*store, &keys, &OsRandom)
            .await
            .unwrap();
        let head = k1.head(1, [9; 32]);
        assert!(k2.check(&head), "the second load unwraps the same key");
        assert!(!rewrap_head_key(&*store, &keys).await.unwrap());

        let auditor = Auditor::start(Arc::new((*store).clone()), k1, None);
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let a = auditor.clone();
            tasks.push(tokio::spawn(async move {
                a.record(reveal_event(i + 1)).await.unwrap()
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
        let log = store.audit_log().unwrap();
        let mut v = strongroom_store::audit::Verifier::new();
        for r in log.audit_scan(0, 1000).await.unwrap() {
            v.push(&r).unwrap();
        }
        let head = log.audit_head().await.unwrap().unwrap();
        assert_eq!(v.finish(&head, &k2).unwrap(), 200);
    }

    #[derive(Clone, Default)]
    struct SharedSink(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An SQLite store in a temp dir (kept while the first value lives), the provider that
    /// wraps its head key, and the key.
    async fn store_with_head_key() -> (tempfile::TempDir, Arc<SqliteStore>, FakeProvider, HeadKey) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
        let keys = FakeProvider::new("audit-tests", 1);
        let key = load_or_create_head_key(&*store, &keys, &OsRandom)
            .await
            .unwrap();
        (dir, store, keys, key)
    }

    /// A sink that takes `room` more bytes, then fails as a full disk does (`None`: any).
    #[derive(Clone, Default)]
    struct FillingSink {
        taken: Arc<Mutex<Vec<u8>>>,
        room: Arc<Mutex<Option<usize>>>,
    }

    impl Write for FillingSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            let n = room.map_or(buf.len(), |r| r.min(buf.len()));
            if n == 0 {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            if let Some(r) = room.as_mut() {
                *r -= n;
            }
            self.taken.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Records the sink cannot take (a full disk) are counted, and the one it took part of
    /// does not swallow the next: every line but the cut one is a whole record, and the
    /// records after the gap are all there. They used to go without a word, and the lines
    /// on either side of the gap ran together into one.
    #[tokio::test]
    async fn a_sink_that_fills_up_keeps_whole_lines_and_counts_what_it_missed() {
        let (_dir, store, _keys, key) = store_with_head_key().await;
        let sink = FillingSink::default();
        let auditor = Auditor::start(
            Arc::new((*store).clone()),
            key,
            Some(Box::new(sink.clone())),
        );
        let dropped = auditor.sink_dropped();
        for i in 1..=2 {
            auditor.record(reveal_event(i)).await.unwrap();
        }
        // Room for part of the third line only.
        *sink.room.lock().unwrap() = Some(20);
        for i in 3..=5 {
            auditor.record(reveal_event(i)).await.unwrap();
        }
        assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 3);
        *sink.room.lock().unwrap() = None;
        for i in 6..=7 {
            auditor.record(reveal_event(i)).await.unwrap();
        }
        assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 3);
        let text = String::from_utf8(sink.taken.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(serde_json::from_str::<serde_json::Value>(lines[2]).is_err());
        let seqs: Vec<u64> = [0, 1, 3, 4]
            .iter()
            .map(|&i| {
                serde_json::from_str::<serde_json::Value>(lines[i]).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, [1, 2, 6, 7]);
    }

    /// Through the batching task (a log that does not group-commit by itself) with several
    /// appends in flight, and straight to the SQLite log: callers get consecutive seqs, the
    /// chain verifies, and the sink gets every record once (in seq order through the task).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_appends_keep_the_chain_and_the_sink_in_order() {
        for grouped in [false, true] {
            concurrent_appends(grouped).await;
        }
    }

    async fn concurrent_appends(grouped: bool) {
        let (_dir, store, keys, key) = store_with_head_key().await;
        let check = key.head(1, [9; 32]);
        let sink = SharedSink::default();
        let log: Arc<dyn AuditLog> = if grouped {
            Arc::new((*store).clone())
        } else {
            Arc::new(TestLog::new((*store).clone()))
        };
        assert_eq!(log.groups_appends(), grouped);
        let auditor = Auditor::start(log, key, Some(Box::new(sink.clone())));
        let mut tasks = Vec::new();
        for i in 0..2000u32 {
            let a = auditor.clone();
            tasks.push(tokio::spawn(async move {
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
                a.record(reveal_event(i + 1)).await.unwrap()
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=2000).collect::<Vec<u64>>());
        drop(auditor);
        let log = store.audit_log().unwrap();
        let mut v = strongroom_store::audit::Verifier::new();
        let mut after = 0;
        loop {
            let page = log.audit_scan(after, 1000).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.seq;
            for r in &page {
                v.push(r).unwrap();
            }
        }
        let head = log.audit_head().await.unwrap().unwrap();
        let key2 = load_head_key(&*store, &keys).await.unwrap().unwrap();
        assert!(key2.check(&check));
        assert_eq!(v.finish(&head, &key2).unwrap(), 2000);
        // The sink is written after the callers are answered: wait for the last lines.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        while text.lines().count() < 2000 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        }
        let mut sunk: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        if grouped {
            // Each caller writes its own line after its commit.
            sunk.sort_unstable();
        }
        assert_eq!(sunk, (1..=2000).collect::<Vec<u64>>(), "grouped: {grouped}");
    }
}
