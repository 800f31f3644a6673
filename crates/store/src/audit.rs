//! The audit log's storage: the [`AuditLog`] capability both backends implement.
//!
//! Tables (migration 2): `audit_records` (one row per record: `seq`, the event's fields as
//! columns, `prev_hash`, `hash`) and `audit_head` (one row: `count`, `hash`, `mac`). An
//! append reads the head, chains the new records after it, stores them and the new head
//! (with its MAC) in **one transaction**: on SQLite inside the writer thread's group commit,
//! on PostgreSQL under a row lock on the head (`SELECT ... FOR UPDATE`), so several nodes
//! sharing one database still write one chain.
//!
//! Retention (migration 7): `audit_anchor` (at most one row: `seq`, `hash`, `puts`, `mac`;
//! on SQLite also `swept_upto`) says where the log starts once its older records were
//! archived. [`AuditLog::audit_set_anchor`] moves it forward, after the records up to it were
//! written to an archive file; [`AuditLog::audit_prune`] then removes them, a bounded batch
//! per call, so that neither backend's writers wait long. Records at or before the anchor that
//! are still there (a removal cut short) are outside the log: verify starts after the anchor.
//! The stored anchor is an [`Anchor`] (version 1: the end only). It does not need the start
//! that an archive file's [`ArchiveAnchor`] carries: it marks where the kept log starts, which
//! is all `audit verify` asks of it, and each move goes on from the one before by
//! compare-and-swap; the archived records it once followed are gone from the store anyway.
//!
//! The store never sees a value: an [`Event`] has no field that could hold one.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
pub use strongroom_audit::{
    is_counted_put, record_hash, Anchor, ArchiveAnchor, Event, Head, HeadKey, Record, Verifier,
    VerifyError, GENESIS,
};
use time::OffsetDateTime;

use crate::types::{from_millis, to_millis};
use crate::StoreError;

/// The `provider_state` key under which the wrapped head key is kept.
pub const HEAD_KEY_STATE: &str = "audit/head-key";

/// Most records one append may carry.
pub const MAX_APPEND_BATCH: usize = 4096;

/// What [`AuditLog::audit_query`] selects; every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditFilter {
    /// Records about this owner's credentials.
    pub owner: Option<String>,
    /// Records about credentials of this name.
    pub name: Option<String>,
    /// Records made by this principal id.
    pub principal_id: Option<String>,
    /// Only these actions (empty: any).
    pub actions: Vec<String>,
    /// Only records made by these kinds of principal (`user`, `service`, `admin`,
    /// `anonymous`; empty: any).
    pub principal_kinds: Vec<String>,
    /// At or after this time.
    pub since: Option<OffsetDateTime>,
    /// Before this time.
    pub until: Option<OffsetDateTime>,
}

/// What one [`AuditLog::audit_prune`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pruned {
    /// Records removed by this call.
    pub records: u64,
    /// Whether nothing at or before the anchor is left to remove (records, their time
    /// marks, and on SQLite the deferred index entries).
    pub done: bool,
}

/// The audit log's storage, beside the credentials in the same database.
#[async_trait]
pub trait AuditLog: Send + Sync + Debug {
    /// Appends `events` as consecutive records, atomically, and moves the head (MAC'd with
    /// `key`). Event times are stored with millisecond precision (the returned records
    /// carry the stored time, as the chain does).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for more than [`MAX_APPEND_BATCH`] events,
    /// [`StoreError::Unavailable`] when the backend fails (nothing was appended).
    async fn audit_append(
        &self,
        key: Arc<HeadKey>,
        events: Vec<Event>,
    ) -> Result<Vec<Record>, StoreError>;

    /// Whether concurrent [`audit_append`](AuditLog::audit_append) calls already share one
    /// commit inside the log (the SQLite writer thread's group commit), so that callers may
    /// append one event each, without a batching task in front of the log.
    fn groups_appends(&self) -> bool {
        false
    }

    /// The head, or `None` while nothing was ever appended.
    async fn audit_head(&self) -> Result<Option<Head>, StoreError>;

    /// Up to `limit` records with `seq > after`, in `seq` order (for verify and export).
    /// `limit` is clamped to [`MAX_APPEND_BATCH`].
    async fn audit_scan(&self, after: u64, limit: u32) -> Result<Vec<Record>, StoreError>;

    /// Up to `limit` records matching `filter`, newest first, with `seq < before` when set
    /// (pass the last `seq` of a page to get the next). `limit` is clamped to 1001 (a page of
    /// 1000, and one more that tells whether it is the last).
    async fn audit_query(
        &self,
        filter: &AuditFilter,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Record>, StoreError>;

    /// Stores `wrapped` under [`HEAD_KEY_STATE`] unless a value is there already, and
    /// returns the value that is there now (so racing nodes agree on one key).
    async fn audit_init_head_key(&self, wrapped: Vec<u8>) -> Result<Vec<u8>, StoreError>;

    /// Seals the head of a new, empty log with `genesis` (`key.head(0, GENESIS)`), so that
    /// an empty log is authenticated too and appends, which refuse an unsealed head, may
    /// begin. Does nothing when a head is sealed already (appends and `audit verify` check
    /// its MAC).
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when the head is not sealed but the store holds audit records
    /// or credential versions: the log was reset outside Strongroom.
    async fn audit_seal_genesis(&self, genesis: Head) -> Result<(), StoreError>;

    /// The anchor the log starts after, or `None` while no record was ever removed. Its MAC
    /// is not checked here.
    async fn audit_anchor(&self) -> Result<Option<Anchor>, StoreError>;

    /// Moves the anchor to `anchor` (MAC'd with `key`), in one transaction, after checking
    /// that: the head's MAC verifies; the stored anchor (if any) verifies and is at `after`
    /// (`0`: none), so two runs never both move it; `anchor` is genuine, past `after` and
    /// before the head (the record the head names is never removed, so appends keep finding
    /// it); the stored record at `anchor.seq` has `anchor.hash` and the next one follows it;
    /// and `anchor.puts` is not below the stored anchor's. Removes nothing.
    ///
    /// # Errors
    ///
    /// [`StoreError::AuditIntegrity`] when the head or the stored anchor does not verify, or
    /// the records do not match `anchor`; [`StoreError::InvalidInput`] when `anchor` is not
    /// genuine, out of range, or the stored anchor is no longer at `after`.
    async fn audit_set_anchor(
        &self,
        key: Arc<HeadKey>,
        after: u64,
        anchor: Anchor,
    ) -> Result<(), StoreError>;

    /// Removes up to `limit` (clamped to 1 to [`MAX_APPEND_BATCH`]) of the records at or
    /// before the anchor, lowest first, and up to `limit` of the time marks at or before the
    /// last record removed (see `TimeIndex`), in one short transaction, once the anchor's MAC
    /// verifies under `key`; when none are left, SQLite also removes the deferred index
    /// entries of `seq` up to the anchor (in short write jobs). Call it until
    /// [`Pruned::done`].
    ///
    /// # Errors
    ///
    /// [`StoreError::AuditIntegrity`] when the stored anchor does not verify (nothing is
    /// removed); [`StoreError::Unavailable`] when the backend fails.
    async fn audit_prune(&self, key: Arc<HeadKey>, limit: u32) -> Result<Pruned, StoreError>;
}

/// Most records one query returns: a page of 1,000 and one more, which tells whether the
/// page is the last.
pub(crate) const MAX_QUERY_LIMIT: u32 = 1001;

/// How a query by time finds its records without sorting every match: time bounds become
/// `seq` bounds.
///
/// Records are in `seq` order, and their times nearly so: a record carries the time its
/// request began, and requests finish out of order (a clock stepped back does the same, for
/// longer). So the store keeps the running maximum `M(s)` of the times of records `1..=s`,
/// which never decreases, and notes, for each second `k` that `M` enters, the first `seq` at
/// which it did (a [`TimeMark`]; a jump over several seconds notes only the last).
///
/// - **Since.** A record `r` at or after `since` has `M(r) >= since`, so it lies at or past
///   the mark of the latest second at or before `since`.
/// - **Until.** A record `r` before `until` whose second is `M(r - 1)`'s or later (most
///   records) has `M(r)` in a second before `until`'s round-up `h`, so it lies before the
///   mark of the earliest second at or after `h`. The others, **late** records (their second
///   is before `M(r - 1)`'s: a request that finished after one begun in a later second, or a
///   clock stepped back), are noted as [`LateMark`]s: the range also reaches the latest late
///   record whose second is at or before `until`'s (the second of `until - 1 ms`).
///
/// The result is exact whatever the clocks did. A late record widens only the queries whose
/// `until` falls after its time and before the records around it, and only to itself: a
/// clock stepped back once, an hour, does not widen every later query by an hour.
///
/// Not every late record is kept: of two, one at `(k1, s1)` and a later one at `(k2, s2)`
/// with `k2 <= k1`, every query that needs the first needs the second, which reaches
/// further. The store keeps only the records no later one so covers (the **frontier**):
/// sorted by second, their `seq`s rise, so the latest late record at or before a second is
/// the frontier's last entry at or before it, one index lookup. Adding a late record skips
/// one already covered and removes those it covers, so adding the same records again, in
/// any order (a rerun after a crash, two index runs at once), leaves the same frontier.
///
/// Any mark bounds exactly, not only the nearest: for a mark `(k, s)`, the records before `s`
/// all have `M` before second `k`, and those from `s` on have `M` in `k` or later. So a
/// query with no mark at or before `since` starts at `seq` 0, and one with no mark at or
/// after `h` ends at the last `seq` (both backends): wider, never missing a record. That is
/// why [`AuditLog::audit_prune`] may remove the marks and late marks of the records it
/// removes (they can only bound ranges that hold no stored record) in the same
/// transactions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TimeIndex {
    /// `M` at the last record indexed; `None` before the first.
    pub max_time_ms: Option<i64>,
}

/// A second that the running maximum time entered, and the first `seq` at which it did.
pub(crate) type TimeMark = (i64, i64);

/// A late record: its second, and its `seq` (see [`TimeIndex`]).
pub(crate) type LateMark = (i64, i64);

/// The second a time in milliseconds falls in (rounded down, also before 1970).
pub(crate) fn second_of(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

impl TimeIndex {
    /// Takes the record `seq` at `time_ms` (records in `seq` order), noting a mark when the
    /// running maximum enters a new second, and a late mark when the record's second is
    /// before the running maximum's.
    pub(crate) fn advance(
        &mut self,
        seq: i64,
        time_ms: i64,
        marks: &mut Vec<TimeMark>,
        late: &mut Vec<LateMark>,
    ) {
        match self.max_time_ms {
            Some(m) if time_ms <= m => {
                if second_of(time_ms) < second_of(m) {
                    late.push((second_of(time_ms), seq));
                }
            }
            Some(m) => {
                if second_of(time_ms) > second_of(m) {
                    marks.push((second_of(time_ms), seq));
                }
                self.max_time_ms = Some(time_ms);
            }
            None => {
                marks.push((second_of(time_ms), seq));
                self.max_time_ms = Some(time_ms);
            }
        }
    }

    /// The seconds that bound a query, in the order of the lookups: the mark of the latest
    /// second `<=` the first (records at or after `since` lie at or past it); the mark of
    /// the earliest second `>=` the second, and the late mark of the latest second `<=` the
    /// third (records before `until` lie at or before one of the two).
    pub(crate) fn bound_seconds(
        since: Option<i64>,
        until: Option<i64>,
    ) -> (Option<i64>, Option<(i64, i64)>) {
        let low = since.map(second_of);
        let high = until.map(|u| {
            // The earliest second whose start is at or after `until`, and the second of the
            // last millisecond before it.
            let round_up = second_of(u) + i64::from(u.rem_euclid(1000) != 0);
            (round_up, second_of(u.saturating_sub(1)))
        });
        (low, high)
    }
}

/// Reduces late marks (in `seq` order) to the ones no later one covers (see [`TimeIndex`]):
/// what one batch adds to the stored frontier, in `seq` order, seconds rising.
pub(crate) fn late_frontier(late: &[LateMark]) -> Vec<LateMark> {
    let mut kept: Vec<LateMark> = Vec::with_capacity(late.len());
    for &(second, seq) in late {
        // A later mark covers every earlier one at its second or later.
        while kept.last().is_some_and(|&(k, _)| k >= second) {
            kept.pop();
        }
        kept.push((second, seq));
    }
    kept
}

/// The event with its time cut to what the database keeps (milliseconds, UTC).
pub(crate) fn normalize(mut e: Event) -> Result<(Event, i64), StoreError> {
    let ms = to_millis(e.time)?;
    e.time = from_millis(ms)?;
    Ok((e, ms))
}

pub(crate) fn hash_from(bytes: Vec<u8>) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::corrupt("audit hash is not 32 bytes"))
}

pub(crate) fn seq_from(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::corrupt("audit seq out of range"))
}

pub(crate) fn seq_param(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The columns, in order, of a stored record (both backends).
pub(crate) const COLUMNS: &str = "seq, time_ms, principal_kind, principal_id, action, owner, \
     name, version, outcome, status, request_id, client_addr, on_behalf_of, destination, \
     error_code, prev_hash, hash";

/// A record as raw column values, shared by both backends' row decoding.
pub(crate) struct RawRecord {
    pub seq: i64,
    pub time_ms: i64,
    pub principal_kind: String,
    pub principal_id: String,
    pub action: String,
    pub owner: Option<String>,
    pub name: Option<String>,
    pub version: Option<i64>,
    pub outcome: String,
    pub status: i64,
    pub request_id: Option<String>,
    pub client_addr: Option<String>,
    pub on_behalf_of: Option<String>,
    pub destination: Option<String>,
    pub error_code: Option<String>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl RawRecord {
    /// The record, or an error naming it (`audit verify` and queries say which row is bad).
    pub(crate) fn into_record(self) -> Result<Record, StoreError> {
        let seq = self.seq;
        self.decode().map_err(|e| match e {
            StoreError::Corrupt { what, .. } => {
                StoreError::corrupt(format!("audit record {seq}: {what}"))
            }
            other => other,
        })
    }

    fn decode(self) -> Result<Record, StoreError> {
        Ok(Record {
            seq: seq_from(self.seq)?,
            event: Event {
                time: from_millis(self.time_ms)?,
                principal_kind: self.principal_kind,
                principal_id: self.principal_id,
                action: self.action,
                owner: self.owner,
                name: self.name,
                version: self
                    .version
                    .map(|v| {
                        u32::try_from(v).map_err(|_| StoreError::corrupt("audit version range"))
                    })
                    .transpose()?,
                outcome: self.outcome,
                status: u16::try_from(self.status)
                    .map_err(|_| StoreError::corrupt("audit status out of range"))?,
                request_id: self.request_id,
                client_addr: self.client_addr,
                on_behalf_of: self.on_behalf_of,
                destination: self.destination,
                error_code: self.error_code,
            },
            prev_hash: hash_from(self.prev_hash)?,
            hash: hash_from(self.hash)?,
        })
    }
}

pub(crate) fn head_from(
    count: i64,
    hash: Vec<u8>,
    mac: Vec<u8>,
) -> Result<Option<Head>, StoreError> {
    if count == 0 && mac.is_empty() {
        return Ok(None);
    }
    Ok(Some(Head {
        count: seq_from(count)?,
        hash: hash_from(hash)?,
        mac: hash_from(mac)?,
    }))
}

/// The head an append continues from, as `(count, hash)`, once its MAC verifies under `key`.
/// A head changed outside Strongroom (a truncated or rewritten log, a zeroed MAC) or never
/// sealed refuses every append: appending would re-seal a forged head with a genuine MAC.
pub(crate) fn checked_head(
    key: &HeadKey,
    count: i64,
    hash: Vec<u8>,
    mac: Vec<u8>,
) -> Result<(u64, [u8; 32]), StoreError> {
    let refused = || StoreError::AuditIntegrity {
        what: "the audit chain head's MAC does not verify (the log was changed outside \
               Strongroom, or its head was never sealed): appends are refused; run `strongroom \
               audit verify`"
            .into(),
    };
    let head = Head {
        count: seq_from(count).map_err(|_| refused())?,
        hash: hash_from(hash).map_err(|_| refused())?,
        mac: mac.try_into().map_err(|_| refused())?,
    };
    if !key.check(&head) {
        return Err(refused());
    }
    Ok((head.count, head.hash))
}

/// Refuses an append whose verified head does not end the records: the record it names is
/// missing or differs (the log was cut, or its last records rewritten), or records lie past
/// it (the head was rolled back to an earlier genuine one). `tail` is the records from seq
/// `count` on, at most two, as `(seq, hash)`. Appending would otherwise seal a chain over the
/// gap with a genuine MAC.
pub(crate) fn checked_tail(
    count: u64,
    hash: &[u8; 32],
    tail: &[(i64, Vec<u8>)],
) -> Result<(), StoreError> {
    let ends_here = match (count, tail) {
        (0, []) => true,
        (_, [(seq, h)]) => u64::try_from(*seq).ok() == Some(count) && h.as_slice() == hash,
        _ => false,
    };
    if ends_here {
        Ok(())
    } else {
        Err(StoreError::AuditIntegrity {
            what: "the audit chain head does not end the records (records were deleted or \
                   rewritten, or the head was rolled back): appends are refused; run \
                   `strongroom audit verify`"
                .into(),
        })
    }
}

/// What [`AuditLog::audit_seal_genesis`] says when an unsealed head sits over data.
pub(crate) fn reset_log() -> StoreError {
    StoreError::AuditIntegrity {
        what: "the audit head is not sealed although the store holds audit records or \
               credential versions: the audit log was reset outside Strongroom"
            .into(),
    }
}

/// Chains `events` after `(count, hash)`; returns the records and their time columns.
pub(crate) fn chain(
    count: u64,
    hash: [u8; 32],
    events: Vec<Event>,
) -> Result<Vec<(Record, i64)>, StoreError> {
    let mut prev = (count > 0).then_some((count, hash));
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let (e, ms) = normalize(e)?;
        let r = Record::next(prev, e);
        prev = Some((r.seq, r.hash));
        out.push((r, ms));
    }
    Ok(out)
}

/// The stored anchor, from its columns.
pub(crate) fn anchor_from(
    seq: i64,
    hash: Vec<u8>,
    puts: i64,
    mac: Vec<u8>,
) -> Result<Anchor, StoreError> {
    Ok(Anchor {
        seq: seq_from(seq)?,
        hash: hash_from(hash)?,
        puts: u64::try_from(puts).map_err(|_| StoreError::corrupt("audit anchor puts range"))?,
        mac: hash_from(mac)?,
    })
}

/// What a write that trusts the anchor says when it does not verify.
pub(crate) fn forged_anchor() -> StoreError {
    StoreError::AuditIntegrity {
        what: "the audit anchor's MAC does not verify (it was changed outside Strongroom): \
               nothing is removed; run `strongroom audit verify`"
            .into(),
    }
}

/// The stored anchor's `(seq, puts)` (`(0, 0)` for none) once its MAC verifies under `key`.
pub(crate) fn checked_anchor(
    key: &HeadKey,
    stored: Option<&Anchor>,
) -> Result<(u64, u64), StoreError> {
    match stored {
        None => Ok((0, 0)),
        Some(a) if key.check_anchor(a) => Ok((a.seq, a.puts)),
        Some(_) => Err(forged_anchor()),
    }
}

/// The checks of [`AuditLog::audit_set_anchor`] once the backend has read, in its
/// transaction: the head (checked already: `head_count`), the stored anchor, and the records
/// at `anchor.seq` and `anchor.seq + 1` as `(seq, hash, prev_hash)`.
pub(crate) fn check_new_anchor(
    key: &HeadKey,
    head_count: u64,
    stored: Option<&Anchor>,
    after: u64,
    anchor: &Anchor,
    at: &[(i64, Vec<u8>, Vec<u8>)],
) -> Result<(), StoreError> {
    let (stored_seq, stored_puts) = checked_anchor(key, stored)?;
    if stored_seq != after {
        return Err(StoreError::InvalidInput(
            "the audit anchor moved meanwhile (another archive ran): run it again",
        ));
    }
    if !key.check_anchor(anchor) {
        return Err(StoreError::InvalidInput(
            "the new audit anchor's MAC is wrong",
        ));
    }
    if anchor.seq <= after || anchor.seq >= head_count || anchor.puts < stored_puts {
        return Err(StoreError::InvalidInput(
            "the new audit anchor must lie past the current one and before the chain head",
        ));
    }
    let follows = match at {
        [(s1, h1, _), (s2, _, p2)] => {
            u64::try_from(*s1).ok() == Some(anchor.seq)
                && u64::try_from(*s2).ok() == Some(anchor.seq + 1)
                && h1.as_slice() == anchor.hash
                && p2.as_slice() == anchor.hash
        }
        _ => false,
    };
    if !follows {
        return Err(StoreError::AuditIntegrity {
            what: format!(
                "audit record {} or the one after it is missing or does not match the \
                 archived chain: nothing is removed; run `strongroom audit verify`",
                anchor.seq
            ),
        });
    }
    Ok(())
}

/// Checks a batch size.
pub(crate) fn check_batch(n: usize) -> Result<(), StoreError> {
    if n > MAX_APPEND_BATCH {
        return Err(StoreError::InvalidInput(
            "too many audit events in one append",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod time_index_tests {
    use super::*;

    /// Marks fall where the running maximum enters a new second (once per jump); late marks
    /// name the records whose second is before the running maximum's.
    #[test]
    fn marks_and_late_marks_follow_the_running_maximum() {
        let mut t = TimeIndex::default();
        let (mut marks, mut late) = (Vec::new(), Vec::new());
        for (seq, ms) in [
            (1, 1_500),
            (2, 1_900),
            (3, 1_200), // behind, in the same second: not late
            (4, 2_000),
            (5, 7_300),
            (6, -400),  // a clock stepped back
            (7, 6_999), // a request begun in an earlier second
            (8, 7_000), // behind, in the same second
        ] {
            t.advance(seq, ms, &mut marks, &mut late);
        }
        assert_eq!(marks, vec![(1, 1), (2, 4), (7, 5)]);
        assert_eq!(late, vec![(-1, 6), (6, 7)]);
        assert_eq!(t.max_time_ms, Some(7_300));
        assert_eq!(second_of(-400), -1);
        assert_eq!(second_of(-1_000), -1);
        assert_eq!(second_of(-1_001), -2);
    }

    /// A later late mark at the same or an earlier second covers an earlier one.
    #[test]
    fn the_frontier_keeps_what_no_later_mark_covers() {
        assert_eq!(late_frontier(&[]), vec![]);
        assert_eq!(
            late_frontier(&[(5, 10), (7, 11), (9, 12), (7, 13), (8, 14)]),
            vec![(5, 10), (7, 13), (8, 14)]
        );
        assert_eq!(late_frontier(&[(5, 10), (3, 11)]), vec![(3, 11)]);
        assert_eq!(late_frontier(&[(5, 10), (5, 11)]), vec![(5, 11)]);
    }

    /// `since` rounds down to its second; `until` rounds up for the marks, and to the
    /// second of its last millisecond before for the late marks.
    #[test]
    fn query_bound_seconds() {
        let b = TimeIndex::bound_seconds;
        assert_eq!(b(Some(5_500), Some(7_200)), (Some(5), Some((8, 7))));
        assert_eq!(b(Some(5_000), Some(7_000)), (Some(5), Some((7, 6))));
        assert_eq!(b(None, Some(7_001)), (None, Some((8, 7))));
        assert_eq!(b(Some(-1), None), (Some(-1), None));
        assert_eq!(b(None, Some(0)), (None, Some((0, -1))));
    }
}
