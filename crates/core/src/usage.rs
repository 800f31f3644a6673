//! Last-used bookkeeping, coalesced: a reveal notes `(owner, name, time)` in memory and at
//! most one background flush per interval writes the newest time of every credential used
//! meanwhile (one `touch_last_used` each, which the SQLite store folds into one write job).
//!
//! Under load this turns one random-page database write per reveal into one per credential
//! per interval. `last_used_at` is informational: it may lag by up to one interval, and a
//! crash loses at most that much of it. The audit log, written before every value leaves,
//! stays the authoritative record of use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strongroom_store::Store;
use time::OffsetDateTime;

/// How long usage notes wait before they are written.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

type Pending = HashMap<(String, String), OffsetDateTime>;

pub(crate) struct UsageLog {
    store: Arc<dyn Store>,
    interval: Duration,
    pending: Mutex<Pending>,
    scheduled: AtomicBool,
}

impl std::fmt::Debug for UsageLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageLog")
            .field("interval", &self.interval)
            .field("pending", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl UsageLog {
    pub(crate) fn new(store: Arc<dyn Store>, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            interval,
            pending: Mutex::new(HashMap::new()),
            scheduled: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a use; schedules a flush unless one is pending. Never fails, never waits.
    pub(crate) fn note(self: &Arc<Self>, owner: &str, name: &str, at: OffsetDateTime) {
        {
            let mut pending = self.lock();
            let t = pending
                .entry((owner.to_owned(), name.to_owned()))
                .or_insert(at);
            if at > *t {
                *t = at;
            }
        }
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(me.interval).await;
                me.flush().await;
            });
        }
    }

    /// Writes every pending note now and waits for the writes (errors are dropped: a
    /// credential destroyed meanwhile has nothing to update).
    pub(crate) async fn flush(&self) {
        // Cleared before taking the batch, so a note made during this flush schedules the next.
        self.scheduled.store(false, Ordering::Release);
        let batch = std::mem::take(&mut *self.lock());
        let writes: Vec<_> = batch
            .into_iter()
            .map(|((owner, name), at)| {
                let store = self.store.clone();
                tokio::spawn(async move { store.touch_last_used(&owner, &name, at).await })
            })
            .collect();
        for w in writes {
            let _ = w.await;
        }
    }

    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.lock().len()
    }
}
