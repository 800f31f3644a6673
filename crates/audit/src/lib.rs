//! # strongroom-audit
//!
//! The audit log's format and its verifier, without I/O: a store appends [`Record`]s and
//! keeps the [`Head`]; [`Verifier`] checks a log read back in order.
//!
//! * Each record holds who did what to which credential, when, from where and with what
//!   outcome: **never a value, token or key** (the fields have no room for one, and free text
//!   is limited to error codes).
//! * Records are hash-chained: `hash = SHA-256("strongroom-audit-v1\0" ‖ prev_hash ‖ body)`
//!   where `body` is the record's canonical JSON without its hash. Editing, inserting,
//!   deleting or reordering a record breaks the chain at that record.
//! * The head `(count, hash)` is kept beside the log with an HMAC-SHA256 under a key held by
//!   the key provider, updated with each append (which refuses a head whose MAC fails); the
//!   empty log's head is sealed too. Truncating the tail no longer matches the head, and the
//!   head cannot be forged without the provider. Restoring an older copy of the whole
//!   database (log and head together) is not caught by the log itself: `audit head` prints
//!   the head so it can be kept elsewhere and checked with `audit verify --expect-head`.
//! * Records at the start of the log may be archived and removed (`audit archive`): the
//!   [`Anchor`] `(seq, hash, puts)` of the last removed record carries an HMAC under the head
//!   key too (in its own domain, so a head's MAC is never an anchor's), and the log then
//!   verifies from it ([`Verifier::after`]). Removing records at the start without a genuine
//!   anchor that covers them breaks the sequence at the first record kept.
//! * The archive file gets an [`ArchiveAnchor`]: the same end, and also where the file starts
//!   (its first record's `seq` and the hash that record chains from), under a MAC in a third
//!   domain, so that a file cut or extended at the start no longer matches its anchor.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

const DOMAIN: &[u8] = b"strongroom-audit-v1\0";
const HEAD_DOMAIN: &[u8] = b"strongroom-audit-head-v1\0";
const ANCHOR_DOMAIN: &[u8] = b"strongroom-audit-anchor-v1\0";
/// The archive file's anchor, which also covers where the file starts ([`ArchiveAnchor`]).
const ARCHIVE_ANCHOR_DOMAIN: &[u8] = b"strongroom-audit-anchor-v2\0";
/// The domain of keys derived from the head key ([`HeadKey::derive`]).
const DERIVE_DOMAIN: &[u8] = b"strongroom-audit-derive-v1\0";

/// The hash before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// What a record is about. Every field is public metadata; none can hold a secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// `user`, `service`, `admin`, `operator` or `anonymous`.
    pub principal_kind: String,
    /// The principal's id (user's owner id, service or admin name); empty if unauthenticated.
    pub principal_id: String,
    /// The action: `put`, `reveal`, `broker`, `verify`, `list`, `describe`, `destroy`, ...
    pub action: String,
    /// Whose credential.
    pub owner: Option<String>,
    /// Which credential.
    pub name: Option<String>,
    /// Which version.
    pub version: Option<u32>,
    /// `ok`, `denied` or `error`.
    pub outcome: String,
    /// HTTP status (0 for operator actions).
    pub status: u16,
    /// The request id.
    pub request_id: Option<String>,
    /// The client's address.
    pub client_addr: Option<String>,
    /// For service use: the user the service acted for (delegated mode).
    pub on_behalf_of: Option<String>,
    /// For brokered use: the destination host.
    pub destination: Option<String>,
    /// A stable error code when the outcome is not `ok` (never a message that could quote
    /// input).
    pub error_code: Option<String>,
}

/// One appended record: its position, the event, and the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
    /// Hash of the previous record ([`GENESIS`] for the first).
    #[serde(with = "hex_array")]
    pub prev_hash: [u8; 32],
    /// This record's hash.
    #[serde(with = "hex_array")]
    pub hash: [u8; 32],
}

#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    #[serde(flatten)]
    event: &'a Event,
}

/// The hash a record with these contents must carry.
pub fn record_hash(seq: u64, event: &Event, prev_hash: &[u8; 32]) -> [u8; 32] {
    // Serialising a struct of strings and integers to a Vec cannot fail.
    let body = serde_json::to_vec(&Body { seq, event }).unwrap_or_default();
    Sha256::new()
        .chain_update(DOMAIN)
        .chain_update(prev_hash)
        .chain_update(&body)
        .finalize()
        .into()
}

impl Record {
    /// The record that follows `prev` (or starts the log when `prev` is `None`).
    pub fn next(prev: Option<(u64, [u8; 32])>, event: Event) -> Self {
        let (seq, prev_hash) = match prev {
            Some((seq, hash)) => (seq + 1, hash),
            None => (1, GENESIS),
        };
        let hash = record_hash(seq, &event, &prev_hash);
        Record {
            seq,
            event,
            prev_hash,
            hash,
        }
    }
}

/// The chain head: how many records, the last hash, and a MAC over both.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Number of records.
    pub count: u64,
    /// Hash of the last record ([`GENESIS`] when empty).
    #[serde(with = "hex_array")]
    pub hash: [u8; 32],
    /// HMAC-SHA256 over `(count, hash)` under the head key.
    #[serde(with = "hex_array")]
    pub mac: [u8; 32],
}

/// Where the log starts once its older records were archived and removed: the last removed
/// record's `seq` and `hash`, how many `put` records with outcome `ok` the log held up to it
/// (so that `audit verify` can still count puts against the versions the store holds), and an
/// HMAC-SHA256 over the three under the head key, in a domain of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// The last removed record's position; the log goes on at `seq + 1`.
    pub seq: u64,
    /// The last removed record's hash: the next record's `prev_hash`.
    #[serde(with = "hex_array")]
    pub hash: [u8; 32],
    /// `put` records with outcome `ok` at or before `seq`.
    pub puts: u64,
    /// HMAC-SHA256 over `(seq, hash, puts)` under the head key.
    #[serde(with = "hex_array")]
    pub mac: [u8; 32],
}

/// The anchor written beside an archive file (`FILE.anchor.json`, version 2): where the file
/// starts as well as where it ends. Its first record is `from_seq` and chains from
/// `from_hash` (the previous archive's last hash, or [`GENESIS`] for the first archive); its
/// last is `seq` with `hash`, as in [`Anchor`]. The MAC covers all five, in a domain of its
/// own: it is never a head's MAC, nor an [`Anchor`]'s (version 1, which covers only the end
/// and is what the store keeps).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveAnchor {
    /// The format: [`ArchiveAnchor::VERSION`].
    pub version: u32,
    /// The file's first record.
    pub from_seq: u64,
    /// The hash the file's first record chains from (its `prev_hash`).
    #[serde(with = "hex_array")]
    pub from_hash: [u8; 32],
    /// The file's last record.
    pub seq: u64,
    /// The file's last record's hash.
    #[serde(with = "hex_array")]
    pub hash: [u8; 32],
    /// `put` records with outcome `ok` at or before `seq` (in this file and every earlier one).
    pub puts: u64,
    /// HMAC-SHA256 over `(from_seq, from_hash, seq, hash, puts)` under the head key.
    #[serde(with = "hex_array")]
    pub mac: [u8; 32],
}

impl ArchiveAnchor {
    /// The only version this crate writes and reads (an [`Anchor`] is version 1).
    pub const VERSION: u32 = 2;
}

/// Whether a record counts in [`Anchor::puts`]: a `put` that succeeded (each one wrote a
/// credential version in the same transaction).
pub fn is_counted_put(r: &Record) -> bool {
    r.event.action == "put" && r.event.outcome == "ok"
}

/// The key that MACs the head. Zeroized on drop; no `Debug` contents.
pub struct HeadKey(zeroize::Zeroizing<[u8; 32]>);

impl std::fmt::Debug for HeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeadKey([REDACTED])")
    }
}

impl HeadKey {
    /// Wraps key bytes (unwrapped from the key provider).
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(zeroize::Zeroizing::new(bytes))
    }

    fn mac(&self, count: u64, hash: &[u8; 32]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref())
            .unwrap_or_else(|_| unreachable!());
        m.update(HEAD_DOMAIN);
        m.update(&count.to_be_bytes());
        m.update(hash);
        m
    }

    /// A key for another purpose named by `label`, derived from this one (HMAC-SHA256 under
    /// a domain the head's MACs never use): every node that shares the log shares it, and it
    /// tells nothing of this key.
    pub fn derive(&self, label: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref())
            .unwrap_or_else(|_| unreachable!());
        m.update(DERIVE_DOMAIN);
        m.update(label);
        zeroize::Zeroizing::new(m.finalize().into_bytes().into())
    }

    /// The head after `count` records ending in `hash`.
    pub fn head(&self, count: u64, hash: [u8; 32]) -> Head {
        Head {
            count,
            hash,
            mac: self.mac(count, &hash).finalize().into_bytes().into(),
        }
    }

    fn anchor_mac(&self, seq: u64, hash: &[u8; 32], puts: u64) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref())
            .unwrap_or_else(|_| unreachable!());
        m.update(ANCHOR_DOMAIN);
        m.update(&seq.to_be_bytes());
        m.update(hash);
        m.update(&puts.to_be_bytes());
        m
    }

    /// The anchor after removing records up to `seq`, the last of which hashes to `hash`,
    /// `puts` of them counted puts ([`is_counted_put`]).
    pub fn anchor(&self, seq: u64, hash: [u8; 32], puts: u64) -> Anchor {
        Anchor {
            seq,
            hash,
            puts,
            mac: self
                .anchor_mac(seq, &hash, puts)
                .finalize()
                .into_bytes()
                .into(),
        }
    }

    /// Whether `anchor`'s MAC is genuine (constant time).
    pub fn check_anchor(&self, anchor: &Anchor) -> bool {
        self.anchor_mac(anchor.seq, &anchor.hash, anchor.puts)
            .verify_slice(&anchor.mac)
            .is_ok()
    }

    fn archive_anchor_mac(
        &self,
        from_seq: u64,
        from_hash: &[u8; 32],
        seq: u64,
        hash: &[u8; 32],
        puts: u64,
    ) -> Hmac<Sha256> {
        // HMAC accepts keys of any length. Every field has a fixed length, so the input
        // encodes one tuple only.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref())
            .unwrap_or_else(|_| unreachable!());
        m.update(ARCHIVE_ANCHOR_DOMAIN);
        m.update(&from_seq.to_be_bytes());
        m.update(from_hash);
        m.update(&seq.to_be_bytes());
        m.update(hash);
        m.update(&puts.to_be_bytes());
        m
    }

    /// The anchor of an archive file holding records `from_seq..=end.seq`, the first of
    /// which chains from `from_hash`, ending at `end` (whose MAC is not needed here).
    pub fn archive_anchor(
        &self,
        from_seq: u64,
        from_hash: [u8; 32],
        end: &Anchor,
    ) -> ArchiveAnchor {
        ArchiveAnchor {
            version: ArchiveAnchor::VERSION,
            from_seq,
            from_hash,
            seq: end.seq,
            hash: end.hash,
            puts: end.puts,
            mac: self
                .archive_anchor_mac(from_seq, &from_hash, end.seq, &end.hash, end.puts)
                .finalize()
                .into_bytes()
                .into(),
        }
    }

    /// Whether `anchor` is of [`ArchiveAnchor::VERSION`] and its MAC is genuine (constant
    /// time).
    pub fn check_archive_anchor(&self, anchor: &ArchiveAnchor) -> bool {
        anchor.version == ArchiveAnchor::VERSION
            && self
                .archive_anchor_mac(
                    anchor.from_seq,
                    &anchor.from_hash,
                    anchor.seq,
                    &anchor.hash,
                    anchor.puts,
                )
                .verify_slice(&anchor.mac)
                .is_ok()
    }

    /// Whether `head`'s MAC is genuine (constant time).
    pub fn check(&self, head: &Head) -> bool {
        self.mac(head.count, &head.hash)
            .verify_slice(&head.mac)
            .is_ok()
    }
}

/// What is wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A record is missing or extra at this position (deleted, inserted or reordered).
    #[error("record {expected}: found record numbered {found} (a record was deleted, inserted or reordered)")]
    Sequence {
        /// The position expected.
        expected: u64,
        /// The number found there.
        found: u64,
    },
    /// The record's `prev_hash` does not match the record before it.
    #[error("record {0}: does not follow the previous record (chain broken)")]
    Chain(u64),
    /// The record's contents do not match its hash (edited).
    #[error("record {0}: contents do not match its hash (edited)")]
    Tampered(u64),
    /// The head's MAC does not verify (the head was forged, or the wrong key).
    #[error("the chain head's MAC does not verify (forged head or wrong key)")]
    HeadMac,
    /// The log ends before or after the head says (truncated, or records appended without
    /// the head).
    #[error("the log has {found} records but the head says {head} (truncated or rolled back)")]
    Length {
        /// Records found.
        found: u64,
        /// Records the head counts.
        head: u64,
    },
    /// The last record's hash differs from the head's.
    #[error("record {0}: the last record does not match the chain head")]
    HeadHash(u64),
    /// The anchor's MAC does not verify (forged or edited anchor, or the wrong key).
    #[error(
        "the audit anchor's MAC does not verify (a forged or edited anchor, or the wrong key)"
    )]
    AnchorMac,
}

/// Checks records one at a time, in order, then the head.
#[derive(Debug)]
pub struct Verifier {
    count: u64,
    last: [u8; 32],
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    /// A verifier at the start of the log.
    pub fn new() -> Self {
        Self {
            count: 0,
            last: GENESIS,
        }
    }

    /// A verifier that goes on after `seq` records, the last hashing to `hash`: after an
    /// [`Anchor`] (whose MAC the caller checked), or in an archive file that starts there.
    pub fn after(seq: u64, hash: [u8; 32]) -> Self {
        Self {
            count: seq,
            last: hash,
        }
    }

    /// The hash of the last record checked ([`GENESIS`] or the starting hash before any).
    pub fn last_hash(&self) -> [u8; 32] {
        self.last
    }

    /// Checks the next record.
    ///
    /// # Errors
    ///
    /// The first problem, naming the record.
    pub fn push(&mut self, r: &Record) -> Result<(), VerifyError> {
        let expected = self.count + 1;
        if r.seq != expected {
            return Err(VerifyError::Sequence {
                expected,
                found: r.seq,
            });
        }
        if r.prev_hash != self.last {
            return Err(VerifyError::Chain(r.seq));
        }
        if record_hash(r.seq, &r.event, &r.prev_hash) != r.hash {
            return Err(VerifyError::Tampered(r.seq));
        }
        self.count = r.seq;
        self.last = r.hash;
        Ok(())
    }

    /// Records checked so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Checks the end of the log against the head.
    ///
    /// # Errors
    ///
    /// [`VerifyError::HeadMac`], [`VerifyError::Length`] or [`VerifyError::HeadHash`].
    pub fn finish(self, head: &Head, key: &HeadKey) -> Result<u64, VerifyError> {
        self.check_head(head, key)
    }

    /// Checks the records so far against `head`, and goes on: for a log still being
    /// appended to, whose head was read before its records.
    ///
    /// # Errors
    ///
    /// As [`Verifier::finish`].
    pub fn check_head(&self, head: &Head, key: &HeadKey) -> Result<u64, VerifyError> {
        if !key.check(head) {
            return Err(VerifyError::HeadMac);
        }
        if head.count != self.count {
            return Err(VerifyError::Length {
                found: self.count,
                head: head.count,
            });
        }
        if head.hash != self.last {
            return Err(VerifyError::HeadHash(self.count));
        }
        Ok(self.count)
    }
}

mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

#[cfg(test)]
mod tests;
