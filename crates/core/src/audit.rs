//! Auditing: the head key and the group-committing [`Auditor`].
//!
//! Every request is audited and a reveal is fail-closed (its record is durable before the
//! value leaves), so appends are **group-committed**: [`Auditor::record`] hands the event to
//! one background task per process, which appends everything queued meanwhile in one
//! [`AuditLog::audit_append`] (one transaction) and then acknowledges each caller. While one
//! batch commits, the next one fills, so N concurrent requests share one commit.
//!
//! The head key (which MACs the chain head) is a random 256-bit key wrapped by the key
//! provider under the associated data [`HEAD_KEY_AAD`] and kept in the store's
//! `provider_state` under `audit/head-key`; it is created on first use (racing nodes agree on
//! the first one stored) and unwrapped once at start.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use strongroom_crypto::{KekRef, Key256, KeyProvider, SecureRandom, WrappedKey};
use strongroom_store::audit::{Event, HeadKey, HEAD_KEY_STATE};
use strongroom_store::{AuditLog, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::CoreError;

/// The associated data the head key is wrapped under.
pub const HEAD_KEY_AAD: &[u8] = b"strongroom audit head key v1";

/// Most events one append carries.
const MAX_BATCH: usize = 1024;
/// Events waiting for the writer task before callers wait to enqueue.
const QUEUE: usize = 16 * 1024;

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
    let s: StoredHeadKey = serde_json::from_slice(stored).map_err(|_| CoreError::Integrity)?;
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
    if let Some(key) = load_head_key(store, keys).await? {
        return Ok(key);
    }
    let log = audit_log(store)?;
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
#[derive(Clone, Debug)]
pub struct Auditor {
    tx: mpsc::Sender<Pending>,
}

impl Auditor {
    /// Starts the writer task on the current tokio runtime. Each committed record is also
    /// written to `sink` (if any) as a JSON line, after the commit.
    pub fn start(log: Arc<dyn AuditLog>, key: HeadKey, sink: Option<RecordSink>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(log, Arc::new(key), rx, sink.map(Mutex::new)));
        Self { tx }
    }

    /// Appends `event` and waits until its record is durable; returns its `seq`.
    ///
    /// # Errors
    ///
    /// [`CoreError::Unavailable`] when the record could not be written.
    pub async fn record(&self, event: Event) -> Result<u64, CoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Pending { event, ack })
            .await
            .map_err(|_| CoreError::Unavailable("audit writer stopped".into()))?;
        rx.await
            .map_err(|_| CoreError::Unavailable("audit writer stopped".into()))?
            .map_err(|e| unavailable("append", e))
    }
}

async fn run(
    log: Arc<dyn AuditLog>,
    key: Arc<HeadKey>,
    mut rx: mpsc::Receiver<Pending>,
    sink: Option<Mutex<RecordSink>>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (events, acks): (Vec<Event>, Vec<_>) =
            batch.drain(..).map(|p| (p.event, p.ack)).unzip();
        match log.audit_append(key.clone(), events).await {
            Ok(records) => {
                for (ack, r) in acks.into_iter().zip(&records) {
                    let _ = ack.send(Ok(r.seq));
                }
                if let Some(sink) = &sink {
                    let mut w = sink.lock().unwrap_or_else(|e| e.into_inner());
                    for r in &records {
                        if let Ok(line) = serde_json::to_string(r) {
                            let _ = writeln!(w, "{line}");
                        }
                    }
                    let _ = w.flush();
                }
            }
            Err(e) => {
                // Every caller gets the error; the API layer logs it.
                for ack in acks {
                    let _ = ack.send(Err(e.clone()));
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
    let s: StoredHeadKey = serde_json::from_slice(&stored).map_err(|_| CoreError::Integrity)?;
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
                a.record(Event {
                    time: time::OffsetDateTime::now_utc(),
                    principal_kind: "service".into(),
                    principal_id: "s".into(),
                    action: "reveal".into(),
                    owner: Some("o".into()),
                    name: Some("n".into()),
                    version: Some(i + 1),
                    outcome: "ok".into(),
                    status: 200,
                    request_id: None,
                    client_addr: None,
                    on_behalf_of: None,
                    destination: None,
                    error_code: None,
                })
                .await
                .unwrap()
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
}
