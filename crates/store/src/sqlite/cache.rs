//! The reveal cache: the current sealed version of recently read credentials, in memory.
//!
//! Every commit changes the WAL, and SQLite then drops a read connection's whole page cache
//! at its next read, so without this cache each reveal re-reads its pages with `pread` (a
//! fifth of a reveal's CPU under load, BENCHMARKS.md). The cache holds what the database
//! holds (sealed values and wrapped keys, never a plaintext), bounded in bytes.
//!
//! It stays exact:
//! - **Writes of this process** go through the writer thread, and every write job names the
//!   credential it may change ([`Changes`]). The writer drops those entries after the commit
//!   and before acknowledging, so a caller that saw its write acknowledged never reads the
//!   version before it. A read that raced with the write does not put its older row back:
//!   fills are refused once anything was dropped after the read began (`generation`).
//! - **Writes of other processes** (operator commands on the same file) are noticed by the
//!   writer: at the start of every write transaction it compares `PRAGMA data_version`
//!   (which only changes for other connections' commits) and, if it moved, drops everything
//!   and counts an `epoch`. A reveal takes a [`ReadMark`] before its read and, once its audit
//!   record is committed, asks [`VersionCache::freshness`]: another process's commit before
//!   the read must have come before that write transaction began (it holds the write lock),
//!   so if the epoch did not move, the row read was still current. When no write
//!   transaction covered the reveal (no audit record), `confirm` runs an empty one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{ReadMark, SealedVersion};

/// What a write job may change, as far as the cache is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Changes {
    /// Nothing a cached version shows (audit records, last-used times, provider state).
    NoCredential,
    /// One credential's versions, state or current version.
    Credential { owner: String, name: String },
    /// Any credential (bulk jobs; only the test loader today).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    AnyCredential,
}

/// Whether a read taken at a [`ReadMark`] may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Freshness {
    /// No other process committed between the mark and a write transaction after it.
    Current,
    /// Another process committed since the mark: read again.
    Stale,
    /// No write transaction has begun and checked since the mark: run one, then ask again.
    Unknown,
}

struct Entry {
    version: SealedVersion,
    bytes: usize,
    /// When it was cached (its place in [`Map::order`]).
    seq: u64,
}

#[derive(Default)]
struct Map {
    entries: HashMap<String, Entry>,
    bytes: usize,
    /// Keys in the order they were cached, oldest first, with the `seq` of the entry each
    /// one stood for: an item whose entry was dropped or cached again since is skipped when
    /// it reaches the front, and [`Map::compact`] clears such items out.
    order: VecDeque<(String, u64)>,
    next_seq: u64,
}

impl Map {
    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.remove(key) {
            self.bytes -= old.bytes;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
    }

    fn current(&self, item: &(String, u64)) -> bool {
        self.entries.get(&item.0).is_some_and(|e| e.seq == item.1)
    }

    /// Evicts the oldest entries until `bytes` more fit in `max`.
    fn make_room(&mut self, bytes: usize, max: usize) {
        while self.bytes + bytes > max {
            let Some(item) = self.order.pop_front() else {
                break;
            };
            if self.current(&item) {
                self.remove(&item.0);
            }
        }
    }

    fn insert(&mut self, key: String, version: SealedVersion, bytes: usize) {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.entries.insert(
            key.clone(),
            Entry {
                version,
                bytes,
                seq,
            },
        );
        self.bytes += bytes;
        self.order.push_back((key, seq));
        self.compact();
    }

    /// Clears out items of entries dropped or cached again once they outnumber the
    /// entries, so `order` stays within twice the entries (plus a constant), amortized O(1).
    fn compact(&mut self) {
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let order = std::mem::take(&mut self.order);
            self.order = order.into_iter().filter(|i| self.current(i)).collect();
        }
    }
}

pub(super) struct VersionCache {
    map: Mutex<Map>,
    max_bytes: usize,
    /// Bumped (under the map lock) whenever entries are dropped.
    generation: AtomicU64,
    /// Bumped when the writer saw another process's commit.
    epoch: AtomicU64,
    /// Write transactions that checked for other processes' commits (bumped while the
    /// transaction still holds the write lock, after its jobs ran).
    checked: AtomicU64,
}

/// Bytes an entry is charged beyond its blobs (strings, map slot, allocator slack).
const ENTRY_OVERHEAD: usize = 256;

fn key(owner: &str, name: &str) -> String {
    // Length-prefixed, so no (owner, name) pair collides with another.
    format!("{}:{owner}{name}", owner.len())
}

impl VersionCache {
    pub(super) fn new(max_bytes: usize) -> Self {
        VersionCache {
            map: Mutex::new(Map::default()),
            max_bytes,
            generation: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            checked: AtomicU64::new(0),
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached current version of `(owner, name)`.
    pub(super) fn get(&self, owner: &str, name: &str) -> Option<SealedVersion> {
        if !self.enabled() {
            return None;
        }
        self.lock()
            .entries
            .get(&key(owner, name))
            .map(|e| e.version.clone())
    }

    /// The generation to pass to [`fill`](Self::fill), taken before the read.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches `version` (the current one, read from the database) unless entries were
    /// dropped since `generation` was taken: the row may predate that write. Only enabled
    /// credentials are cached: a refusal is never confirmed (see the module docs), so it must
    /// not come from memory that another process's re-enable has not reached yet.
    pub(super) fn fill(&self, generation: u64, version: &SealedVersion) {
        if !self.enabled() || !version.is_current || !version.credential_enabled {
            return;
        }
        // The metadata is at most a few KiB of JSON; its text length stands for its size.
        let bytes = ENTRY_OVERHEAD
            + version.sealed_value.len()
            + version.wrapped_key.len()
            + 2 * (version.owner.len() + version.name.len())
            + version.created_by.len()
            + version.metadata.to_string().len();
        if bytes > self.max_bytes / 4 {
            return;
        }
        let mut map = self.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        let k = key(&version.owner, &version.name);
        map.remove(&k);
        map.make_room(bytes, self.max_bytes);
        map.insert(k, version.clone(), bytes);
    }

    /// Drops what `changes` names (the writer calls this after the commit, before the acks).
    pub(super) fn apply(&self, changes: &Changes) {
        if !self.enabled() {
            return;
        }
        let mut map = self.lock();
        match changes {
            Changes::NoCredential => return,
            Changes::Credential { owner, name } => {
                map.remove(&key(owner, name));
                map.compact();
            }
            Changes::AnyCredential => map.clear(),
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The writer saw another process's commit: drop everything.
    pub(super) fn external_change(&self) {
        self.lock().clear();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A write transaction that checked for other processes' commits is about to commit.
    pub(super) fn checked(&self) {
        self.checked.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) fn mark(&self) -> ReadMark {
        // `checked` first: an epoch bump always precedes the `checked` bump that covers it.
        let checked = self.checked.load(Ordering::Acquire);
        ReadMark {
            epoch: self.epoch.load(Ordering::Acquire),
            checked,
        }
    }

    pub(super) fn freshness(&self, mark: ReadMark) -> Freshness {
        let checked = self.checked.load(Ordering::Acquire);
        if self.epoch.load(Ordering::Acquire) != mark.epoch {
            Freshness::Stale
        } else if checked > mark.checked {
            Freshness::Current
        } else {
            Freshness::Unknown
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KekRef;

    fn version(owner: &str, name: &str, v: u32, value_len: usize) -> SealedVersion {
        SealedVersion {
            owner: owner.into(),
            name: name.into(),
            version: v,
            credential_enabled: true,
            is_current: true,
            sealed_value: vec![7; value_len],
            wrapped_key: vec![1; 60],
            kek: KekRef {
                provider: "local".into(),
                key_id: "k".into(),
                version: 1,
            },
            metadata: serde_json::json!({}),
            created_by: "u".into(),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_fill_that_raced_with_a_drop_is_refused() {
        let c = VersionCache::new(1 << 20);
        let g = c.generation();
        c.apply(&Changes::Credential {
            owner: "alice".into(),
            name: "k".into(),
        });
        c.fill(g, &version("alice", "k", 1, 10));
        assert!(c.get("alice", "k").is_none());
        c.fill(c.generation(), &version("alice", "k", 2, 10));
        assert_eq!(c.get("alice", "k").unwrap().version, 2);
    }

    #[test]
    fn keys_do_not_collide_and_drops_are_per_credential() {
        let c = VersionCache::new(1 << 20);
        c.fill(c.generation(), &version("ab", "c", 1, 10));
        c.fill(c.generation(), &version("a", "bc", 2, 10));
        assert_eq!(c.get("ab", "c").unwrap().version, 1);
        assert_eq!(c.get("a", "bc").unwrap().version, 2);
        c.apply(&Changes::Credential {
            owner: "a".into(),
            name: "bc".into(),
        });
        assert!(c.get("a", "bc").is_none());
        assert_eq!(c.get("ab", "c").unwrap().version, 1);
        c.apply(&Changes::NoCredential);
        assert_eq!(c.len(), 1);
        c.apply(&Changes::AnyCredential);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn only_current_enabled_versions_are_cached_and_the_byte_bound_holds() {
        let c = VersionCache::new(64 * 1024);
        let mut old = version("alice", "k", 1, 10);
        old.is_current = false;
        c.fill(c.generation(), &old);
        assert!(c.get("alice", "k").is_none());
        let mut disabled = version("alice", "k", 1, 10);
        disabled.credential_enabled = false;
        c.fill(c.generation(), &disabled);
        assert!(c.get("alice", "k").is_none());
        for i in 0..100 {
            c.fill(c.generation(), &version("alice", &format!("k{i}"), 1, 4000));
        }
        let held = c.len();
        assert!(held > 0 && held <= 64 * 1024 / 4096, "held {held}");
        assert!(c.lock().bytes <= 64 * 1024);
        // Too big for a quarter of the budget: never cached.
        c.fill(c.generation(), &version("alice", "huge", 1, 20 * 1024));
        assert!(c.get("alice", "huge").is_none());
        let off = VersionCache::new(0);
        off.fill(off.generation(), &version("alice", "k", 1, 10));
        assert!(off.get("alice", "k").is_none());
    }

    #[test]
    fn the_oldest_entries_go_first_and_dropped_keys_do_not_pile_up() {
        let one = {
            let c = VersionCache::new(1 << 20);
            c.fill(c.generation(), &version("alice", "k0", 1, 1000));
            let bytes = c.lock().bytes;
            bytes
        };
        let c = VersionCache::new(4 * one);
        for i in 0..5 {
            c.fill(c.generation(), &version("alice", &format!("k{i}"), 1, 1000));
        }
        assert!(c.get("alice", "k0").is_none(), "the oldest was evicted");
        for i in 1..5 {
            assert!(c.get("alice", &format!("k{i}")).is_some());
        }
        // Refilling one credential again and again keeps one entry and a bounded order.
        let c = VersionCache::new(1 << 20);
        for v in 1..10_000 {
            c.fill(c.generation(), &version("alice", "k", v, 10));
            c.apply(&Changes::Credential {
                owner: "bob".into(),
                name: "x".into(),
            });
        }
        assert_eq!(c.len(), 1);
        assert!(c.lock().order.len() <= 2 + 1024 + 1);
    }

    #[test]
    fn another_process_commit_makes_earlier_marks_stale() {
        let c = VersionCache::new(1 << 20);
        c.fill(c.generation(), &version("alice", "k", 1, 10));
        let mark = c.mark();
        assert_eq!(c.freshness(mark), Freshness::Unknown);
        c.checked();
        assert_eq!(c.freshness(mark), Freshness::Current);
        let mark = c.mark();
        c.external_change();
        c.checked();
        assert_eq!(c.freshness(mark), Freshness::Stale);
        assert!(c.get("alice", "k").is_none());
        assert_eq!(c.freshness(c.mark()), Freshness::Unknown);
    }
}
