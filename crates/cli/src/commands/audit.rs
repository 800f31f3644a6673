//! `strongroom audit verify|head|export|archive`: check, pin, stream and trim the
//! tamper-evident audit log.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use strongroom_store::audit::{Head, Record, Verifier};

use super::{Failure, OperatorTarget};
use crate::error::CliError;
use crate::output::{errln, outln};

/// Records read per batch.
const BATCH: u32 = 4096;

/// `strongroom audit ...`.
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the whole log: every record's hash, the chain, and the MAC'd head. Names the
    /// first bad record and exits non-zero on any tampering.
    #[command(
        after_help = "Examples:\n  strongroom audit verify --config /etc/strongroom/strongroom.toml\n  \
        strongroom audit verify --config /etc/strongroom/strongroom.toml --expect-head head.json\n  \
        strongroom audit verify --config /etc/strongroom/strongroom.toml --file audit-2026-01.jsonl\n  \
        strongroom audit verify --config /etc/strongroom/strongroom.toml --file audit-2026-01.jsonl --file audit-2026-02.jsonl\n\n\
        After `audit archive`, the log starts after its anchor: the last archived record, whose \
        (seq, hash) and count of puts carry a MAC under the audit head key. Verify checks the \
        anchor's MAC and the chain from it on; records removed at the start without an anchor \
        covering them, or an anchor that was edited, fail."
    )]
    Verify {
        /// Where the store and keys are.
        #[command(flatten)]
        target: OperatorTarget,
        /// A head saved earlier by `audit head` (a JSON file): also check the log still
        /// contains it, which catches a rollback of the whole log.
        #[arg(long, value_name = "FILE", conflicts_with = "file")]
        expect_head: Option<PathBuf>,
        /// Check an archive file written by `audit archive` instead of the log: its chain,
        /// and that it starts and ends where the anchor in FILE.anchor.json says (its first
        /// record and the hash that record chains from, its last record), whose MAC the
        /// store's audit head key must verify. An anchor written before anchors covered the
        /// start (version 1) names only the end, and is refused unless
        /// --accept-version-1-anchor is given. Give it once per archive, oldest first, to
        /// also check that they follow one another without a gap (none missing, swapped or
        /// out of order), and see where the store's log goes on. One --file may take several
        /// files: `--file DIR/audit-*.jsonl` for what `audit archive --output-dir DIR` wrote
        /// (their names sort oldest first).
        #[arg(long, value_name = "FILE", num_args = 1..)]
        file: Vec<PathBuf>,
        /// With --file: also check an archive whose anchor file is version 1 (written before
        /// anchors covered the start, or made from the store's own anchor row, which has that
        /// form). Its end and chain are checked; its start is not, so check by hand that the
        /// file goes on after record 0 (the first archive) or after the seq in the previous
        /// archive's anchor file.
        #[arg(long, requires = "file")]
        accept_version_1_anchor: bool,
    },
    /// Print the chain head (count, hash, mac) as JSON, to keep it somewhere else.
    #[command(after_help = "Example (keep the file away from the store's host):\n  \
        strongroom audit head --config /etc/strongroom/strongroom.toml > head.json")]
    Head {
        /// Where the store and keys are.
        #[command(flatten)]
        target: OperatorTarget,
    },
    /// Move the older part of the log to a file and remove it from the store, keeping the
    /// rest verifiable.
    #[command(
        long_about = "Move the older part of the log to a file and remove it from the store, \
keeping the rest verifiable. Safe while servers run.\n\n\
Writes every record up to the cut (see --before) to FILE, in the format of `audit export` \
(one JSON record per line), verifying the chain as it goes, and the anchor to \
FILE.anchor.json: where the file starts (its first record's seq and the hash that record \
chains from: the previous archive's last hash) and ends (the last archived record's seq and \
hash), and how many puts the log held up to its end, with a MAC under the audit head key over \
all of them. Both are fsynced before the store changes. Then the \
log is anchored after the last archived record, and the archived records are removed from the \
store in short transactions (--batch records each), with, on SQLite, their entries in the \
audit query indexes. `audit verify` then checks the log from the anchor on; `audit verify \
--file FILE` checks the archive on its own. Keep FILE and FILE.anchor.json together.\n\n\
The cut: --before SEQ archives the records numbered below SEQ. --before TIME archives the \
newest record older than TIME and every record before it: record times follow their numbers \
only nearly (several nodes, clock steps), so a few records just before the cut may be at or \
after TIME; no record older than TIME stays. Records more than an hour after TIME before the \
cut (times that go back after them: a clock set back) are named in a warning, as they leave \
the store (and the usage views) with the rest. The newest record is never archived (the chain \
head names it). --before AGE (90d, 12h, 2w, 30min) is the time that long before now, so that a \
daily timer can run the same command (deploy/systemd has one).\n\n\
Interrupted (killed, a crash, the store gone), the log still verifies: run the same command \
again, with the same --output (or --output-dir), and it finishes. --output-dir DIR names each \
file by its first record, so a scheduled run needs no date in the name. A run holds a lock on FILE.lock throughout: \
a second run with the same --output meanwhile stops at once, recording and writing nothing. \
Recorded in the log as `audit.archive` (started, then ok or error).",
        after_help = "Examples:\n  strongroom audit archive --config /etc/strongroom/strongroom.toml \
        --before 2026-01-01T00:00:00Z --output /archive/audit-2025.jsonl\n  \
        strongroom audit archive --data-dir ./strongroom-data --before 100000 --output old.jsonl --dry-run"
    )]
    Archive(super::archive::ArchiveArgs),
    /// Stream records in order (for a SIEM).
    #[command(
        after_help = "Examples:\n  strongroom audit export --data-dir ./strongroom-data | jq .\n  \
        strongroom audit export --config /etc/strongroom/strongroom.toml --after 1000"
    )]
    Export {
        /// Where the store and keys are.
        #[command(flatten)]
        target: OperatorTarget,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Only records after this sequence number.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
    },
}

/// Export formats.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
}

/// Runs an `audit` subcommand.
pub fn run(cmd: AuditCommand) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    runtime.block_on(async move {
        match cmd {
            AuditCommand::Verify {
                target,
                expect_head,
                file,
                accept_version_1_anchor,
            } => {
                if file.is_empty() {
                    verify(&target, expect_head).await
                } else {
                    super::archive::verify_files_command(&target, &file, accept_version_1_anchor)
                        .await
                }
            }
            AuditCommand::Archive(args) => super::archive::run(args).await,
            AuditCommand::Head { target } => head(&target).await,
            AuditCommand::Export {
                target,
                format: Format::Jsonl,
                after,
            } => export(&target, after).await,
        }
    })
}

fn op(e: impl std::fmt::Display) -> Failure {
    CliError::Operation(format!("audit: {e}")).into()
}

async fn verify(target: &OperatorTarget, expect_head: Option<PathBuf>) -> Result<(), Failure> {
    let expected: Option<Head> = match &expect_head {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("--expect-head {}: {e}", path.display())))?;
            Some(serde_json::from_str(&text).map_err(|_| {
                CliError::Usage("--expect-head: not a head printed by `audit head`".into())
            })?)
        }
        None => None,
    };
    let backends = target.open_existing().await?;
    let result = verify_log(&backends, expected.as_ref()).await;
    backends.close().await;
    let checked = result?;
    match checked.anchor {
        None => outln!(
            "audit log OK: {} records, chain and head verified",
            checked.count
        )?,
        Some(a) => {
            if checked.archived_left {
                errln!(
                    "note: records up to {a} are archived but not all removed yet (an \
                     interrupted `audit archive`: run it again); they are not part of the log"
                );
            }
            outln!(
                "audit log OK: records {}..{} ({} records; 1..{a} archived), anchor, chain and \
                 head verified",
                a + 1,
                checked.count,
                checked.count - a
            )?
        }
    }
    if let Some(head) = &expected {
        match checked.anchor {
            // Gone from the log: the genuine anchor past it shows the log was not rolled back
            // before it, but its own hash is only in the archive.
            Some(a) if head.count < a => outln!(
                "the head given by --expect-head (record {}) is archived (records 1..{a}): the \
                 anchor shows the log was not rolled back before it; check the record itself \
                 against the archive files (`audit verify --file ARCHIVE`)",
                head.count
            )?,
            _ => outln!(
                "the head given by --expect-head (record {}) is part of the verified chain",
                head.count
            )?,
        }
    }
    Ok(())
}

/// What [`verify_log`] checked.
pub(crate) struct Checked {
    /// The last record's `seq`.
    pub(crate) count: u64,
    /// The anchor's `seq`, when the log starts after one.
    anchor: Option<u64>,
    /// Whether records at or before the anchor are still there.
    archived_left: bool,
}

pub(crate) async fn verify_log(
    backends: &strongroom_server::Backends,
    expected: Option<&Head>,
) -> Result<Checked, Failure> {
    let log = strongroom_core::audit::audit_log(backends.store.as_ref()).map_err(op)?;
    // Read before the records (an archive moves it only forward, over records it keeps
    // until then): the records read after it go on from it.
    let mut anchor = log.audit_anchor().await.map_err(op)?;
    let mut tries = 0;
    let count = loop {
        match verify_records(backends, expected, anchor.as_ref()).await {
            Ok(n) => break n,
            Err(e) => {
                // An `audit archive` that ran meanwhile moved the anchor and removed records
                // this read expected: check again from the new anchor (a whole check).
                let now = log.audit_anchor().await.map_err(op)?;
                tries += 1;
                if now == anchor || tries == 3 {
                    return Err(e);
                }
                anchor = now;
            }
        }
    };
    let archived_left = match &anchor {
        Some(a) => log
            .audit_scan(0, 1)
            .await
            .map_err(op)?
            .first()
            .is_some_and(|r| r.seq <= a.seq),
        None => false,
    };
    Ok(Checked {
        count,
        anchor: anchor.map(|a| a.seq),
        archived_left,
    })
}

async fn verify_records(
    backends: &strongroom_server::Backends,
    expected: Option<&Head>,
    anchor: Option<&strongroom_store::audit::Anchor>,
) -> Result<u64, Failure> {
    let store = backends.store.as_ref();
    let log = strongroom_core::audit::audit_log(store).map_err(op)?;
    // A server may be appending while this runs. So, in this order: the versions (each put
    // commits with its record, so the records read later cover at least these), then the
    // head, then the records, checked against the head where they reach its count; those
    // appended after it are checked as a chain going on from it.
    let versions: u64 = store
        .count_versions_by_kek()
        .await
        .map_err(op)?
        .iter()
        .map(|(_, n)| n)
        .sum();
    let head = log.audit_head().await.map_err(op)?;
    let key = strongroom_core::audit::load_head_key(store, backends.keyring.as_ref())
        .await
        .map_err(op)?;
    let bar = (std::io::stderr().is_terminal() && head.as_ref().is_some_and(|h| h.count > 10_000))
        .then(|| {
            let bar = ProgressBar::new(head.as_ref().map_or(0, |h| h.count));
            bar.set_style(
                ProgressStyle::with_template(
                    "verifying {bar:40} {pos}/{len} records ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
    let failed =
        |e: String| -> Failure { CliError::Operation(format!("audit verify FAILED: {e}")).into() };
    // After an archive the log goes on from its anchor, once the anchor's MAC verifies:
    // records before it are in the archive file (or about to be removed), and the puts they
    // held are counted in it.
    let (mut verifier, mut puts) = match (anchor, &key) {
        (None, _) => (Verifier::new(), 0u64),
        (Some(a), Some(key)) if key.check_anchor(a) => (Verifier::after(a.seq, a.hash), a.puts),
        (Some(_), Some(_)) => {
            return Err(failed(
                strongroom_store::audit::VerifyError::AnchorMac.to_string(),
            ))
        }
        (Some(_), None) => {
            return Err(failed(
                "the log has an anchor but the head key is missing from provider_state".into(),
            ))
        }
    };
    let mut pinned_seen = false;
    // A saved head is only evidence if this log's key sealed it.
    if let (Some(exp), Some(key)) = (expected, &key) {
        if !key.check(exp) {
            return Err(failed(
                "the expected head's MAC does not verify (it is not a head of this log, or it \
                 was edited)"
                    .into(),
            ));
        }
    }
    // Whether the records so far end exactly at the head, and it checks.
    let at_head = |verifier: &Verifier| -> Result<bool, Failure> {
        match (&head, &key) {
            (Some(head), Some(key)) if verifier.count() == head.count => verifier
                .check_head(head, key)
                .map(|_| true)
                .map_err(|e| failed(e.to_string())),
            _ => Ok(false),
        }
    };
    let mut head_checked = at_head(&verifier)?;
    // A saved head at or before the anchor names an archived record: the anchor, genuine and
    // past it, shows the log was not rolled back before it (the same record: the same hash).
    if let (Some(exp), Some(a)) = (expected, anchor) {
        if exp.count <= a.seq {
            if exp.count == a.seq && exp.hash != a.hash {
                return Err(failed(format!(
                    "record {}: differs from the expected head (the log was rewritten)",
                    a.seq
                )));
            }
            pinned_seen = true;
        }
    }
    loop {
        let batch = log.audit_scan(verifier.count(), BATCH).await.map_err(op)?;
        if batch.is_empty() {
            break;
        }
        for r in &batch {
            verifier.push(r).map_err(|e| failed(e.to_string()))?;
            head_checked |= at_head(&verifier)?;
            if strongroom_store::audit::is_counted_put(r) {
                puts += 1;
            }
            if let Some(exp) = expected {
                if r.seq == exp.count {
                    if r.hash != exp.hash {
                        return Err(failed(format!(
                            "record {}: differs from the expected head (the log was rewritten)",
                            r.seq
                        )));
                    }
                    pinned_seen = true;
                }
            }
        }
        if let Some(bar) = &bar {
            bar.set_position(verifier.count());
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(exp) = expected {
        if exp.count > 0 && !pinned_seen {
            return Err(failed(format!(
                "the log has {} records but the expected head counts {} (truncated or rolled back)",
                verifier.count(),
                exp.count
            )));
        }
    }
    // A log cut back to an earlier genuine head (down to the sealed empty one) verifies as a
    // chain, but it no longer covers the versions the store holds.
    if versions > puts {
        return Err(failed(format!(
            "the store holds {versions} active credential versions but the log records only \
             {puts} puts (records were removed, or the log was rolled back)"
        )));
    }
    match (head, key) {
        // Never started: no key, no sealed head, no records (and, checked above, no versions:
        // a server or an import only writes them after sealing the log).
        (None, None) if verifier.count() == 0 => Ok(0),
        (None, Some(_)) if verifier.count() == 0 => Err(failed(
            "the head key exists but the chain head is not sealed (the log was reset)".into(),
        )),
        (None, _) => Err(failed(format!(
            "the log has {} records but no chain head (the head was removed)",
            verifier.count()
        ))),
        (Some(_), None) => Err(failed(
            "the chain head exists but the head key is missing from provider_state".into(),
        )),
        // Fewer records than the head counts: the scan never reached it.
        (Some(head), Some(key)) if !head_checked => verifier
            .finish(&head, &key)
            .map_err(|e| failed(e.to_string())),
        (Some(_), Some(key)) => {
            // Records past the first head are appends made meanwhile only if a head read now
            // covers them, and the records reach it: else the head was rolled back under
            // records kept (or swapped between two genuine heads while this ran), and those
            // could have been rewritten as a chain no MAC covers.
            let now = log.audit_head().await.map_err(op)?;
            let Some(now) = now else {
                return Err(failed("the chain head was removed during the check".into()));
            };
            let length = |found: u64| {
                failed(
                    strongroom_store::audit::VerifyError::Length {
                        found,
                        head: now.count,
                    }
                    .to_string(),
                )
            };
            if verifier.count() > now.count {
                return Err(length(verifier.count()));
            }
            // Every record up to the head read now was committed before it was read.
            while verifier.count() < now.count {
                let want = u32::try_from(now.count - verifier.count())
                    .unwrap_or(u32::MAX)
                    .min(BATCH);
                let batch = log.audit_scan(verifier.count(), want).await.map_err(op)?;
                if batch.is_empty() {
                    return Err(length(verifier.count()));
                }
                for r in batch.iter().take_while(|r| r.seq <= now.count) {
                    verifier.push(r).map_err(|e| failed(e.to_string()))?;
                }
            }
            verifier
                .check_head(&now, &key)
                .map_err(|e| failed(e.to_string()))?;
            Ok(verifier.count())
        }
    }
}

async fn head(target: &OperatorTarget) -> Result<(), Failure> {
    let backends = target.open_existing().await?;
    let log = strongroom_core::audit::audit_log(backends.store.as_ref()).map_err(op);
    let head = match log {
        Ok(log) => log.audit_head().await.map_err(op),
        Err(e) => Err(e),
    };
    backends.close().await;
    let text = match head? {
        Some(h) => serde_json::to_string(&h).map_err(op)?,
        None => serde_json::json!({ "count": 0, "hash": hex_zero(), "mac": null }).to_string(),
    };
    outln!("{text}")?;
    Ok(())
}

fn hex_zero() -> String {
    "0".repeat(64)
}

async fn export(target: &OperatorTarget, after: u64) -> Result<(), Failure> {
    let backends = target.open_existing().await?;
    let result = export_records(&backends, after).await;
    backends.close().await;
    result
}

async fn export_records(backends: &strongroom_server::Backends, after: u64) -> Result<(), Failure> {
    let log = strongroom_core::audit::audit_log(backends.store.as_ref()).map_err(op)?;
    // A consumer resuming after a record that was archived since would otherwise miss the
    // records between without a word.
    if let Some(anchor) = log.audit_anchor().await.map_err(op)? {
        if anchor.seq > after {
            errln!(
                "note: records {}..{} were archived (`audit archive`) and are no longer in the \
                 store: the export starts after record {}; take the earlier ones from the \
                 archive files",
                after + 1,
                anchor.seq,
                anchor.seq
            );
        }
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut next = after;
    loop {
        let batch = log.audit_scan(next, BATCH).await.map_err(op)?;
        let Some(last) = batch.last() else { break };
        next = last.seq;
        for r in &batch {
            write_record(&mut out, r).map_err(crate::output::error("cannot write the export"))?;
        }
    }
    out.flush()
        .map_err(crate::output::error("cannot write the export"))?;
    Ok(())
}

/// Writes one record as `audit export` does: its JSON on one line.
pub(crate) fn write_record(out: &mut impl Write, r: &Record) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, r)?;
    out.write_all(b"\n")
}
