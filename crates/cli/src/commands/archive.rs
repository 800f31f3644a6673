//! `strongroom audit archive`: write the older part of the audit log to a file, anchor the
//! log after it, and remove it from the store; and `audit verify --file`, which checks such a
//! file on its own.
//!
//! The order is what keeps every acknowledged record somewhere durable and the log
//! verifiable at every instant:
//!
//! 1. an `audit.archive` `started` record is appended (the log must take it);
//! 2. the cut `N` is chosen (see [`cut`]); always below the head, so the record the head names
//!    (at least this run's own `started` record) stays;
//! 3. records after the current anchor up to `N` are read, verified as a chain going on from
//!    the anchor, and written to `FILE.partial`; the file's anchor (version 2: where the file
//!    starts and ends, counting the `put`s, MAC'd by the head key) to
//!    `FILE.anchor.json.partial`; both are fsynced, renamed into place (the anchor file
//!    first) and the directory fsynced;
//! 4. only then the store's anchor moves to `N` (one transaction, by compare-and-swap); from
//!    then on `audit verify` starts after it, so records up to `N` still there are outside
//!    the log;
//! 5. they are removed in bounded batches (each a short transaction), then, on SQLite, their
//!    deferred index entries;
//! 6. an `audit.archive` `ok` (or `error`) record is appended.
//!
//! The whole run holds an exclusive lock (`flock`) on `FILE.lock` beside the output, so that
//! two runs with the same `--output` never write the same `FILE.partial`: the second stops
//! before it records or writes anything. The kernel drops the lock when a run dies, so a
//! crashed run's leftovers never block the run that finishes it.
//!
//! A crash before 4 leaves the log as it was (the files are only copies); one after 4
//! leaves records that the next run removes. Run again with the same `--output`, the command
//! finishes what the interrupted run started (it sets the anchor from `FILE.anchor.json` if
//! the crash came between 3 and 4, after checking the file again).

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use strongroom_store::audit::{
    is_counted_put, Anchor, ArchiveAnchor, HeadKey, Record, Verifier, GENESIS,
};
use strongroom_store::AuditLog;
use time::OffsetDateTime;

use super::{Failure, OperatorTarget};
use crate::error::CliError;
use crate::output::{errln, outln};

/// Records read per batch.
const READ_BATCH: u32 = 4096;

/// The audit action this command records.
const ACTION: &str = "audit.archive";

/// Where the cut lies: records before a time, or before a sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Before {
    /// Records older than this time (`time < T`).
    Time(OffsetDateTime),
    /// Records numbered below this (`seq < S`).
    Seq(u64),
}

/// Parses `--before`: a sequence number (digits), an RFC 3339 time, or an age (digits and a
/// unit: `90d` is 90 days before now), so that a timer can run the same command every day.
pub fn parse_before(s: &str) -> Result<Before, String> {
    parse_before_at(s, OffsetDateTime::now_utc())
}

fn parse_before_at(s: &str, now: OffsetDateTime) -> Result<Before, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Before::Seq)
            .map_err(|_| format!("{s:?}: sequence number out of range"));
    }
    if let Some(age) = parse_age(s)? {
        return now
            .checked_sub(age)
            .map(Before::Time)
            .ok_or_else(|| format!("{s:?}: age out of range"));
    }
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(Before::Time)
        .map_err(|_| {
            format!(
                "{s:?} is neither a sequence number, an RFC 3339 time (2026-01-31T00:00:00Z) nor \
                 an age (90d, 12h, 2w, 30min, 45s)"
            )
        })
}

/// `Some(age)` for digits followed by a unit (`s`, `min`, `h`, `d`, `w`; at least 1), `None`
/// for anything else (then it may be a time). Not `m`: read as months, it would archive
/// nearly everything.
fn parse_age(s: &str) -> Result<Option<time::Duration>, String> {
    let units: [(&str, i64); 5] = [
        ("min", 60),
        ("s", 1),
        ("h", 3_600),
        ("d", 86_400),
        ("w", 604_800),
    ];
    let Some((digits, seconds_per)) = units
        .iter()
        .find_map(|(unit, per)| s.strip_suffix(unit).map(|digits| (digits, *per)))
    else {
        return Ok(None);
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: age out of range"))?;
    if n == 0 {
        return Err(format!(
            "{s:?}: an age of 0 would archive up to now; give a sequence number or a time to mean that"
        ));
    }
    n.checked_mul(seconds_per)
        .map(|secs| Some(time::Duration::seconds(secs)))
        .ok_or_else(|| format!("{s:?}: age out of range"))
}

/// `audit archive` options.
#[derive(clap::Args, Debug)]
pub struct ArchiveArgs {
    /// Where the store and keys are.
    #[command(flatten)]
    pub target: OperatorTarget,
    /// Archive the records older than this RFC 3339 time (2026-01-31T00:00:00Z) or this age
    /// (digits and s, min, h, d or w: `90d` is 90 days before now, for a daily timer), or
    /// numbered below this sequence number.
    #[arg(long, value_name = "TIME|AGE|SEQ", value_parser = parse_before)]
    pub before: Before,
    /// The archive file to write (must not exist, unless it is the one an interrupted run of
    /// this command left: then that run is finished). Made with mode 0600, beside
    /// FILE.anchor.json.
    #[arg(
        long,
        visible_alias = "out",
        value_name = "FILE",
        required_unless_present = "output_dir",
        conflicts_with = "output_dir"
    )]
    pub output: Option<PathBuf>,
    /// Instead of --output: write the archive into this existing directory, named by the
    /// first record it holds (`audit-000000000001.jsonl`), so that the same command run again,
    /// on any day, finishes an interrupted run's file, a later run writes the next one, and
    /// `audit verify --file DIR/audit-*.jsonl` takes them oldest first. Runs into one
    /// directory take turns (`DIR/audit-archive.lock`).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Records removed per transaction (1 to 4096): a server keeps writing in between.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub batch: u32,
    /// Say what would be archived; write and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn op(e: impl std::fmt::Display) -> Failure {
    CliError::Operation(format!("audit archive: {e}")).into()
}

/// Where a run writes: `--output`, or a file in `--output-dir` (clap requires exactly one).
enum Destination<'a> {
    File(&'a Path),
    Dir(&'a Path),
}

impl ArchiveArgs {
    fn destination(&self) -> Destination<'_> {
        match (&self.output, &self.output_dir) {
            (Some(file), _) => Destination::File(file),
            (None, Some(dir)) => Destination::Dir(dir),
            (None, None) => unreachable!("clap requires --output or --output-dir"),
        }
    }
}

impl Destination<'_> {
    /// What the run locks before it records or writes anything: the file's lock, or with
    /// --output-dir (whose file name depends on the store) the directory's.
    fn lock_target(&self) -> PathBuf {
        match self {
            Destination::File(file) => file.to_path_buf(),
            Destination::Dir(dir) => dir.join("audit-archive"),
        }
    }

    /// The archive file: `--output`, or in `--output-dir` the name of the first record after
    /// the store's anchor (where this run's file starts), zero-padded so that names sort in
    /// order.
    fn file(&self, anchor: Option<&Anchor>) -> PathBuf {
        match self {
            Destination::File(file) => file.to_path_buf(),
            Destination::Dir(dir) => {
                let first = anchor.map_or(0, |a| a.seq) + 1;
                dir.join(format!("audit-{first:012}.jsonl"))
            }
        }
    }
}

/// `FILE.anchor.json`.
pub fn anchor_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".anchor.json");
    PathBuf::from(name)
}

fn partial_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// `FILE.lock`: a run that writes `FILE` holds an exclusive lock on it throughout.
pub fn lock_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The lock of a run on its output; the lock file goes when the run ends.
struct OutputLock {
    path: PathBuf,
    // Held (and so locked) until dropped.
    _file: std::fs::File,
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked: a run that opened it meanwhile either fails to lock it
        // now or, once it gets the lock, finds it no longer at the path and takes a new one
        // (see `lock_output`). A crash leaves it; the next run locks it as any other.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes the exclusive lock on `FILE.lock`, or fails at once when another run holds it.
fn lock_output(file: &Path) -> Result<OutputLock, Failure> {
    use std::os::unix::fs::MetadataExt;
    let path = lock_path(file);
    let io = |e: std::io::Error| {
        op(format!(
            "cannot lock {} for {}: {e}",
            path.display(),
            file.display()
        ))
    };
    // A few tries: each one can only lose to a run that ended (and removed the file)
    // between our open and our lock.
    for _ in 0..5 {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(op(format!(
                    "another `audit archive` run is writing {} (it holds {}): nothing was \
                     done; wait for it to end (if it stops, run the same command again)",
                    file.display(),
                    path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // Still the file at the path (not one a finished run removed after we opened it)?
        let held = f.metadata().map_err(io)?;
        match std::fs::metadata(&path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                return Ok(OutputLock { path, _file: f });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
    }
    Err(op(format!(
        "cannot lock {} for {}: other runs keep replacing it",
        path.display(),
        file.display()
    )))
}

fn bar(len: u64, what: &str) -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{what} {{bar:40}} {{pos}}/{{len}} records ({{per_sec}}, eta {{eta}})"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    })
}

/// Runs `audit archive`.
pub async fn run(args: ArchiveArgs) -> Result<(), Failure> {
    if args.batch == 0 || args.batch > 4096 {
        return Err(CliError::Usage("--batch must be 1 to 4096".into()).into());
    }
    if let Destination::Dir(dir) = args.destination() {
        if !dir.is_dir() {
            return Err(CliError::Usage(format!(
                "--output-dir {}: no such directory (create it first, owner-only)",
                dir.display()
            ))
            .into());
        }
    }
    // Before anything is recorded or written; held until the run's last record is in.
    let _lock = if args.dry_run {
        None
    } else {
        Some(lock_output(&args.destination().lock_target())?)
    };
    let backends = args.target.open_existing().await?;
    let result = archive(&backends, &args).await;
    if !args.dry_run {
        let (outcome, code) = match &result {
            Ok(_) => ("ok", None),
            Err(_) => ("error", Some("stopped")),
        };
        // The start was recorded (or nothing changed): the end is a warning if it fails.
        if !matches!(result, Err(Stop::NotStarted(_))) {
            super::rewrap::audit_action(&backends, ACTION, outcome, code, None).await;
        }
    }
    backends.close().await;
    match result {
        Ok(line) => {
            outln!("{line}")?;
            Ok(())
        }
        Err(Stop::NotStarted(e) | Stop::Failed(e)) => Err(e),
    }
}

enum Stop {
    /// Nothing was recorded or changed.
    NotStarted(Failure),
    /// Stopped after the `started` record.
    Failed(Failure),
}

async fn archive(
    backends: &strongroom_server::Backends,
    args: &ArchiveArgs,
) -> Result<String, Stop> {
    let store = backends.store.as_ref();
    let log = strongroom_core::audit::audit_log(store)
        .map_err(op)
        .map_err(Stop::NotStarted)?;
    let key = strongroom_core::audit::load_head_key(store, backends.keyring.as_ref())
        .await
        .map_err(op)
        .map_err(Stop::NotStarted)?
        .ok_or_else(|| {
            Stop::NotStarted(op("the audit log was never started: nothing to archive"))
        })?;
    let key = Arc::new(key);
    let anchor = current_anchor(log.as_ref(), &key)
        .await
        .map_err(Stop::NotStarted)?;
    let file = &args.destination().file(anchor.as_ref());
    let resuming = file.exists();
    // An existing file is checked before the run is recorded: an interrupted run's archive
    // is finished, anything else refused (a finished archive among them: naming it again
    // would archive nothing and say it finished something).
    let resumed = if resuming {
        Some(
            resume_checked(log.as_ref(), &key, anchor.as_ref(), file, args.dry_run)
                .await
                .map_err(Stop::NotStarted)?,
        )
    } else {
        None
    };
    if args.dry_run {
        if let Some(target) = &resumed {
            return Ok(format!(
                "{} holds an interrupted run's archive of records up to {}: a run would finish \
                 it (by its own bound, not --before's) and remove them from the store",
                file.display(),
                target.seq
            ));
        }
        return dry_run(log.as_ref(), &args.before, anchor.as_ref(), file)
            .await
            .map_err(Stop::NotStarted);
    }
    // Recorded before anything changes; a log that refuses it is not archived.
    strongroom_server::audit_operator_action(backends, ACTION, "started", None, None)
        .await
        .map_err(|e| Stop::NotStarted(op(format!("the log refused this run's record: {e}"))))?;
    let fail = Stop::Failed;
    let after = anchor.as_ref().map_or(0, |a| a.seq);
    let (target, written) = if let Some(target) = resumed {
        (target, None)
    } else {
        let head = log.audit_head().await.map_err(op).map_err(fail)?;
        let count = head.map_or(0, |h| h.count);
        let n = cut(log.as_ref(), &args.before, count).await.map_err(fail)?;
        if n <= after {
            // Nothing new; finish removing what an earlier run anchored, if anything is left.
            let removed = prune(log.as_ref(), &key, args.batch, after)
                .await
                .map_err(|e| fail(op(e)))?;
            return Ok(nothing_line(after, removed));
        }
        let new = write_archive(log.as_ref(), &key, anchor.as_ref(), n, file)
            .await
            .map_err(fail)?;
        let first = after + 1;
        (new, Some(first))
    };
    if anchor.as_ref() != Some(&target) {
        log.audit_set_anchor(key.clone(), after, target.clone())
            .await
            .map_err(|e| {
                fail(op(format!(
                    "{} is written, but the log was not anchored after it ({e}); run the \
                     same command again",
                    file.display()
                )))
            })?;
    }
    let removed = prune(log.as_ref(), &key, args.batch, target.seq)
        .await
        .map_err(|e| {
            fail(op(format!(
                "records up to {} are in {} and the log is anchored after them, but removing \
                 them stopped ({e}); run the same command again to finish",
                target.seq,
                file.display()
            )))
        })?;
    let what = match written {
        Some(first) => format!(
            "archived records {first}..{} to {} ({} records)",
            target.seq,
            file.display(),
            target.seq + 1 - first
        ),
        None => format!(
            "finished the interrupted archive of records up to {} in {} (by its own bound; \
             --before applies to the next run)",
            target.seq,
            file.display()
        ),
    };
    Ok(format!(
        "{what}; the log now starts after record {} (anchor hash {}); removed {removed} records \
         from the store",
        target.seq,
        hex::encode(target.hash)
    ))
}

fn nothing_line(after: u64, removed: u64) -> String {
    let mut line = if after == 0 {
        "nothing to archive before that bound: the log holds no record before it".to_owned()
    } else {
        format!(
            "nothing to archive before that bound: the log holds no record before it (it \
             starts after record {after}; the records up to there were archived)"
        )
    };
    if removed > 0 {
        line.push_str(&format!(
            " (removed {removed} records left by an interrupted run)"
        ));
    }
    line
}

/// The stored anchor, once its MAC verifies.
async fn current_anchor(log: &dyn AuditLog, key: &HeadKey) -> Result<Option<Anchor>, Failure> {
    match log.audit_anchor().await.map_err(op)? {
        Some(a) if !key.check_anchor(&a) => Err(op(
            "the log's anchor does not verify (it was changed outside Strongroom): nothing is \
             archived; run `strongroom audit verify`",
        )),
        other => Ok(other),
    }
}

/// The cut: the highest `seq` to archive, below `count` (the head's record stays).
///
/// * `--before SEQ`: records numbered below `SEQ`.
/// * `--before TIME`: the newest record older than `TIME`, and every record before it. Times
///   follow `seq` only nearly (several nodes, group commits, clock steps), so a record just
///   before the cut may be at or after `TIME` and is archived with the rest, but no record
///   older than `TIME` stays (except the head's).
async fn cut(log: &dyn AuditLog, before: &Before, count: u64) -> Result<u64, Failure> {
    let n = match before {
        Before::Seq(s) => s.saturating_sub(1),
        Before::Time(t) => {
            let mut filter = strongroom_store::AuditFilter::default();
            filter.until = Some(*t);
            let n = log
                .audit_query(&filter, None, 1)
                .await
                .map_err(op)?
                .first()
                .map_or(0, |r| r.seq);
            warn_of_newer_records(log, *t, n.min(count.saturating_sub(1))).await?;
            n
        }
    };
    Ok(n.min(count.saturating_sub(1)))
}

/// How much newer than `--before TIME` a record before the cut may be before it is said:
/// nodes' clocks and group commits put records seconds out of order, a clock set back puts
/// them hours or years.
const NEWER_WARNING_MARGIN: time::Duration = time::Duration::hours(1);

/// Says so when records well after `before` lie before the cut `n`: a record written under a
/// clock set back (a node whose clock reset) makes the cut take every newer record before it
/// out of the store, and out of the usage views (into the archive: nothing is lost).
async fn warn_of_newer_records(
    log: &dyn AuditLog,
    before: time::OffsetDateTime,
    n: u64,
) -> Result<(), Failure> {
    if n == 0 {
        return Ok(());
    }
    // An hour after the end of time: no record can be newer.
    let Some(since) = before.checked_add(NEWER_WARNING_MARGIN) else {
        return Ok(());
    };
    let mut newer = strongroom_store::AuditFilter::default();
    newer.since = Some(since);
    let page = log
        .audit_query(&newer, Some(n + 1), 1000)
        .await
        .map_err(op)?;
    if let (Some(newest), Some(oldest)) = (page.first(), page.last()) {
        let which = match page.len() {
            1 => format!("record {}", oldest.seq),
            1000 => format!("at least 1000 records, {}..{}", oldest.seq, newest.seq),
            k => format!("{k} records, {}..{}", oldest.seq, newest.seq),
        };
        errln!(
            "warning: the cut (record {n}, the newest older than --before) takes out of the \
             store {which} more than an hour newer than --before: record times go back after \
             them (a clock set back?). They go into the archive; --dry-run shows the cut, \
             --before SEQ chooses another."
        );
    }
    Ok(())
}

async fn dry_run(
    log: &dyn AuditLog,
    before: &Before,
    anchor: Option<&Anchor>,
    file: &Path,
) -> Result<String, Failure> {
    let after = anchor.map_or(0, |a| a.seq);
    let count = log.audit_head().await.map_err(op)?.map_or(0, |h| h.count);
    // A real run's own `started` record adds one to the head first.
    let n = cut(log, before, count + 1).await?;
    if n <= after {
        return Ok(nothing_line(after, 0));
    }
    Ok(format!(
        "would archive records {}..{n} ({} records) to {} and remove them from the store",
        after + 1,
        n - after,
        file.display()
    ))
}

fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn sync_dir(file: &Path) -> std::io::Result<()> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Step 3: records `after+1..=n` to `file` and the anchor to `FILE.anchor.json`, both
/// durable; returns the anchor.
async fn write_archive(
    log: &dyn AuditLog,
    key: &HeadKey,
    anchor: Option<&Anchor>,
    n: u64,
    file: &Path,
) -> Result<Anchor, Failure> {
    let io = |what: &'static str| CliError::io(what);
    let (after, mut puts) = anchor.map_or((0, 0), |a| (a.seq, a.puts));
    let mut verifier = match anchor {
        Some(a) => Verifier::after(a.seq, a.hash),
        None => Verifier::new(),
    };
    let partial = partial_path(file);
    let out = create_private(&partial).map_err(io("cannot create the archive file"))?;
    let mut out = std::io::BufWriter::new(out);
    let progress = bar(n - after, "archiving");
    while verifier.count() < n {
        let want = u32::try_from(n - verifier.count())
            .unwrap_or(u32::MAX)
            .min(READ_BATCH);
        let batch = log.audit_scan(verifier.count(), want).await.map_err(op)?;
        if batch.is_empty() {
            return Err(op(format!(
                "record {} is missing: run `strongroom audit verify`",
                verifier.count() + 1
            )));
        }
        for r in batch.iter().take_while(|r| r.seq <= n) {
            // Nothing is archived, and so laundered, that does not verify.
            verifier.push(r).map_err(|e| {
                op(format!(
                    "the log does not verify ({e}): nothing is archived; run `strongroom audit \
                     verify`"
                ))
            })?;
            if is_counted_put(r) {
                puts += 1;
            }
            super::audit::write_record(&mut out, r).map_err(io("cannot write the archive file"))?;
        }
        if let Some(bar) = &progress {
            bar.set_position(verifier.count() - after);
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let out = out
        .into_inner()
        .map_err(|e| CliError::io("cannot write the archive file")(e.into_error()))?;
    out.sync_all()
        .map_err(io("cannot write the archive file (fsync)"))?;
    drop(out);
    let new = key.anchor(n, verifier.last_hash(), puts);
    // The file's anchor also MACs where the file starts: after the stored anchor.
    let from_hash = anchor.map_or(GENESIS, |a| a.hash);
    // The anchor file first: an archive file in place always has its anchor beside it.
    write_anchor_file(file, &key.archive_anchor(after + 1, from_hash, &new))?;
    // Not over a file that appeared meanwhile (hard_link fails if the name exists).
    std::fs::hard_link(&partial, file).map_err(io("cannot put the archive file in place"))?;
    std::fs::remove_file(&partial).map_err(io("cannot remove the partial archive file"))?;
    sync_dir(file).map_err(io("cannot sync the archive's directory"))?;
    Ok(new)
}

/// Writes `anchor` to FILE.anchor.json durably: a partial file, fsynced, renamed into place
/// (over an older anchor file, if any), and the directory fsynced.
fn write_anchor_file(file: &Path, anchor: &ArchiveAnchor) -> Result<(), Failure> {
    let io = |what: &'static str| CliError::io(what);
    let anchor_file = anchor_path(file);
    let anchor_partial = partial_path(&anchor_file);
    let mut a = create_private(&anchor_partial).map_err(io("cannot create the anchor file"))?;
    let text = serde_json::to_string(anchor).map_err(op)?;
    writeln!(a, "{text}").map_err(io("cannot write the anchor file"))?;
    a.sync_all()
        .map_err(io("cannot write the anchor file (fsync)"))?;
    drop(a);
    std::fs::rename(&anchor_partial, &anchor_file)
        .map_err(io("cannot rename the anchor file into place"))?;
    sync_dir(file).map_err(io("cannot sync the archive's directory"))?;
    Ok(())
}

/// [`resume`], refusing a finished archive too: the log anchored after its end and none of
/// its records left in the store.
async fn resume_checked(
    log: &dyn AuditLog,
    key: &HeadKey,
    anchor: Option<&Anchor>,
    file: &Path,
    dry_run: bool,
) -> Result<Anchor, Failure> {
    let target = resume(key, anchor, file, dry_run)?;
    if anchor == Some(&target) {
        let first = log
            .audit_scan(0, 1)
            .await
            .map_err(op)?
            .first()
            .map(|r| r.seq);
        if first.is_none_or(|seq| seq > target.seq) {
            return Err(op(format!(
                "{} is a finished archive (records up to {}, removed from the store): choose \
                 another --output, or --output-dir (each run names its own file there)",
                file.display(),
                target.seq
            )));
        }
    }
    Ok(target)
}

/// A run with `--output` naming an existing file: finishes the run that wrote it, if it is
/// that (its anchor file names the stored anchor, or one that goes on from it over records
/// the file holds and verifies), and refuses otherwise. A dry run only checks: it syncs and
/// upgrades nothing.
fn resume(
    key: &HeadKey,
    anchor: Option<&Anchor>,
    file: &Path,
    dry_run: bool,
) -> Result<Anchor, Failure> {
    let refuse = |why: String| {
        op(format!(
            "{} exists and is not the archive of an interrupted run ({why}): choose another \
             --output",
            file.display()
        ))
    };
    let checked = verify_file(file, key).map_err(|e| refuse(e.to_string()))?;
    // Durable before the log is anchored after it (the run that wrote it may have stopped
    // before its directory was synced).
    let sync = |path: &Path| std::fs::File::open(path).and_then(|f| f.sync_all());
    if !dry_run {
        sync(file)
            .and_then(|()| sync(&anchor_path(file)))
            .and_then(|()| sync_dir(file))
            .map_err(CliError::io("cannot sync the archive file"))?;
    }
    let target = checked.end;
    let after = anchor.map_or(0, |a| a.seq);
    if anchor == Some(&target) {
        return Ok(target);
    }
    if target.seq <= after {
        return Err(refuse(format!(
            "the log already starts after record {after}; the file ends at record {}",
            target.seq
        )));
    }
    // The anchor was never set: the file must go on from the stored one.
    let (start_seq, start_hash) = anchor.map_or((0, GENESIS), |a| (a.seq, a.hash));
    let start_puts = anchor.map_or(0, |a| a.puts);
    if checked.first_after != (start_seq, start_hash) || start_puts + checked.puts != target.puts {
        return Err(refuse(format!(
            "it does not start where the log does, after record {start_seq}"
        )));
    }
    if !checked.start_checked && !dry_run {
        // An older build wrote a version 1 anchor, which names only the end. The start has
        // just been checked against the stored anchor, so the file gets the version 2 anchor
        // this build would have written, before the log is anchored after it (afterwards
        // nothing could check the start any more).
        write_anchor_file(
            file,
            &key.archive_anchor(start_seq + 1, start_hash, &target),
        )?;
    }
    Ok(target)
}

/// Step 5: removes records up to the anchor, and their index entries; how many records.
async fn prune(
    log: &dyn AuditLog,
    key: &Arc<HeadKey>,
    batch: u32,
    upto: u64,
) -> Result<u64, strongroom_store::StoreError> {
    if upto == 0 {
        return Ok(0);
    }
    let first = log
        .audit_scan(0, 1)
        .await?
        .first()
        .map_or(upto + 1, |r| r.seq);
    let progress = (first <= upto)
        .then(|| bar(upto + 1 - first, "removing"))
        .flatten();
    let mut removed = 0;
    loop {
        let p = log.audit_prune(key.clone(), batch).await?;
        removed += p.records;
        if let Some(bar) = &progress {
            bar.set_position(removed);
        }
        if p.done {
            break;
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(removed)
}

/// What [`verify_file`] found.
#[derive(Debug)]
pub struct CheckedFile {
    /// Where the file ends, as the store keeps it (a version 1 anchor under the head key):
    /// the file's own anchor when it is version 1, else made from its version 2 anchor once
    /// that verified.
    pub end: Anchor,
    /// Whether the anchor file also MACs where the file starts (version 2).
    pub start_checked: bool,
    /// Where the file starts: after this record, with this hash (`(0, GENESIS)` from the
    /// start of the log).
    pub first_after: (u64, [u8; 32]),
    /// Records in the file.
    pub records: u64,
    /// Counted puts in the file.
    pub puts: u64,
}

/// An anchor file as `audit archive` wrote it: version 2 now, version 1 before anchors
/// covered the start (still read, so that older archives stay verifiable).
enum FileAnchor {
    V1(Anchor),
    V2(ArchiveAnchor),
}

fn read_anchor_file(anchor_file: &Path, key: &HeadKey) -> Result<FileAnchor, String> {
    let text = std::fs::read_to_string(anchor_file)
        .map_err(|e| format!("{}: {e}", anchor_file.display()))?;
    let not_ours = || {
        format!(
            "{}: not an anchor written by `audit archive`",
            anchor_file.display()
        )
    };
    let value: serde_json::Value = serde_json::from_str(text.trim()).map_err(|_| not_ours())?;
    // Each version refuses the other's fields, so a file is read as one of them only.
    let anchor = match value.get("version") {
        None => FileAnchor::V1(serde_json::from_value(value).map_err(|_| not_ours())?),
        Some(v) if v.as_u64() == Some(u64::from(ArchiveAnchor::VERSION)) => {
            FileAnchor::V2(serde_json::from_value(value).map_err(|_| not_ours())?)
        }
        Some(_) => {
            return Err(format!(
                "{}: an anchor version this build of Strongroom does not read",
                anchor_file.display()
            ))
        }
    };
    let genuine = match &anchor {
        FileAnchor::V1(a) => key.check_anchor(a),
        FileAnchor::V2(a) => key.check_archive_anchor(a),
    };
    if !genuine {
        return Err(format!(
            "{}: the anchor's MAC does not verify (forged or edited, or another log's)",
            anchor_file.display()
        ));
    }
    Ok(anchor)
}

/// Checks an archive file on its own: one record per line, numbered without gaps, each
/// hashing to its hash and chained to the one before, and ending at the anchor in
/// `FILE.anchor.json`, whose MAC verifies under the log's head key. A version 2 anchor also
/// names where the file starts: the first record must be the one it names and chain from
/// the hash it names. A version 1 anchor does not: the file starts wherever its first line
/// says ([`CheckedFile::start_checked`] is false).
///
/// # Errors
///
/// A message naming the first problem (line and record).
pub fn verify_file(file: &Path, key: &HeadKey) -> Result<CheckedFile, String> {
    let anchor = read_anchor_file(&anchor_path(file), key)?;
    let (end, start) = match anchor {
        FileAnchor::V1(a) => (a, None),
        FileAnchor::V2(a) => {
            // Genuine, so written by `audit archive`; still never trusted to be sane.
            if a.from_seq == 0 || a.from_seq > a.seq {
                return Err(format!(
                    "{}: the anchor names no record",
                    anchor_path(file).display()
                ));
            }
            (
                key.anchor(a.seq, a.hash, a.puts),
                Some((a.from_seq - 1, a.from_hash)),
            )
        }
    };
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut verifier: Option<Verifier> = None;
    let mut first_after = start.unwrap_or((0, GENESIS));
    let (mut records, mut puts) = (0u64, 0u64);
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", file.display()))?;
        let r: Record = serde_json::from_str(&line)
            .map_err(|_| format!("line {}: not an audit record", i + 1))?;
        if verifier.is_none() {
            if let Some((after, hash)) = start {
                if r.seq != after + 1 {
                    return Err(format!(
                        "line 1: the file starts at record {} but its anchor says it starts at \
                         record {} (records cut off or added at the start)",
                        r.seq,
                        after + 1
                    ));
                }
                if r.prev_hash != hash {
                    return Err(format!(
                        "line 1: record {} does not chain from the hash its anchor starts from \
                         (the start was replaced, e.g. by another archive's records)",
                        r.seq
                    ));
                }
            } else {
                first_after = (r.seq.saturating_sub(1), r.prev_hash);
            }
        }
        let v = verifier.get_or_insert_with(|| Verifier::after(first_after.0, first_after.1));
        v.push(&r).map_err(|e| format!("line {}: {e}", i + 1))?;
        records += 1;
        if is_counted_put(&r) {
            puts += 1;
        }
    }
    let Some(v) = verifier else {
        return Err(format!("{}: holds no record", file.display()));
    };
    if v.count() != end.seq || v.last_hash() != end.hash {
        return Err(format!(
            "the file ends at record {} but its anchor names record {} (truncated, extended or \
             rewritten)",
            v.count(),
            end.seq
        ));
    }
    if puts > end.puts {
        return Err("the file holds more puts than its anchor counts".into());
    }
    Ok(CheckedFile {
        end,
        start_checked: start.is_some(),
        first_after,
        records,
        puts,
    })
}

/// `audit verify --file FILE...`: each file on its own ([`verify_file`]), then, given several,
/// that each goes on where the one before ends (its start, MAC'd in a version 2 anchor,
/// against the previous end), and how the last relates to the store's anchor. A version 1
/// anchor is refused unless `accept_version_1`: the store's own anchor row is a genuine one,
/// so anyone who can read the database could put it beside an archive whose first records
/// they cut, and only a version 2 anchor shows that.
pub async fn verify_files_command(
    target: &OperatorTarget,
    files: &[std::path::PathBuf],
    accept_version_1: bool,
) -> Result<(), Failure> {
    let backends = target.open_existing().await?;
    let key =
        strongroom_core::audit::load_head_key(backends.store.as_ref(), backends.keyring.as_ref())
            .await;
    let stored = match backends.store.audit_log() {
        Some(log) => log.audit_anchor().await.map_err(op),
        None => Ok(None),
    };
    backends.close().await;
    let key = key.map_err(op)?.ok_or_else(|| {
        op("this store has no audit head key: the file's anchor cannot be checked")
    })?;
    let stored = stored?;
    let failed =
        |e: String| Failure::from(CliError::Operation(format!("audit verify FAILED: {e}")));
    if stored.as_ref().is_some_and(|a| !key.check_anchor(a)) {
        return Err(failed(
            "the store's anchor does not verify (it was changed outside Strongroom): run \
             `strongroom audit verify`"
                .into(),
        ));
    }
    let mut previous: Option<(&std::path::PathBuf, CheckedFile)> = None;
    let mut first_start = 0;
    for file in files {
        let checked = verify_file_and_report(file, &key, accept_version_1)?;
        if previous.is_none() {
            first_start = checked.first_after.0;
        }
        if let Some((before, prev)) = &previous {
            if checked.first_after != (prev.end.seq, prev.end.hash)
                || prev.end.puts + checked.puts != checked.end.puts
            {
                return Err(failed(format!(
                    "{} does not go on where {} ends: it starts after record {}, the one before \
                     ends at record {} (an archive missing, swapped or given out of order)",
                    file.display(),
                    before.display(),
                    checked.first_after.0,
                    prev.end.seq
                )));
            }
        }
        previous = Some((file, checked));
    }
    let Some((last, last_checked)) = previous else {
        return Ok(());
    };
    if files.len() > 1 {
        outln!(
            "archives OK: {} files follow one another without a gap, records {}..{}",
            files.len(),
            first_start + 1,
            last_checked.end.seq
        )?;
    }
    match stored {
        Some(a) if a == last_checked.end => outln!(
            "the store's log goes on from {}: its anchor is that file's end",
            last.display()
        )?,
        Some(a) if a.seq > last_checked.end.seq => outln!(
            "the store's log starts after record {}: archives after {} hold records {}..{}",
            a.seq,
            last.display(),
            last_checked.end.seq + 1,
            a.seq
        )?,
        Some(a) => outln!(
            "the store's anchor is at record {}, before this archive's end: the run that wrote \
             it has not anchored the log yet (running it again finishes it)",
            a.seq
        )?,
        None => outln!(
            "the store has no anchor: no archive of it has been finished (these files are of \
             another copy of the log, or their run has not anchored it yet)"
        )?,
    }
    Ok(())
}

/// One file's check and its report (see [`verify_files_command`]).
fn verify_file_and_report(
    file: &Path,
    key: &HeadKey,
    accept_version_1: bool,
) -> Result<CheckedFile, Failure> {
    let checked = verify_file(file, key)
        .map_err(|e| Failure::from(CliError::Operation(format!("audit verify FAILED: {e}"))))?;
    if !checked.start_checked && !accept_version_1 {
        return Err(CliError::Operation(format!(
            "audit verify FAILED: {} is a version 1 anchor, which does not cover the start of \
             the file (written before anchors did, or made from the store's own anchor row): \
             a file with its first records cut off would pass. `audit archive` writes version \
             2 anchors. To check an archive written before them, pass \
             --accept-version-1-anchor and check its start by hand",
            anchor_path(file).display()
        ))
        .into());
    }
    let (start, hash) = checked.first_after;
    let origin = if start == 0 {
        "from the start of the log".to_owned()
    } else {
        format!(
            "going on after record {start} (hash {}: the previous archive's anchor)",
            hex::encode(hash)
        )
    };
    let checks = if checked.start_checked {
        "chain verified from the start to the end its anchor names (MAC verified)"
    } else {
        "chain verified and ends at its anchor (MAC verified; a version 1 anchor, which does \
         not cover the start)"
    };
    outln!(
        "archive OK: {} records, {}..{}, {origin}; {checks}, anchor hash {}",
        checked.records,
        start + 1,
        checked.end.seq,
        hex::encode(checked.end.hash)
    )?;
    if !checked.start_checked {
        errln!(
            "warning: {} is a version 1 anchor (written before anchors covered the start of \
             the file): a file with its first records cut off still verifies. Check that the \
             file goes on after record 0 if it is the first archive, else after the seq and \
             hash in the previous archive's anchor file. `audit archive` now writes version 2 \
             anchors: a version 1 anchor beside a newer archive was replaced.",
            anchor_path(file).display()
        );
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Result<Before, String> {
        parse_before_at(
            s,
            OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap(),
        )
    }

    fn time(unix: i64) -> Before {
        Before::Time(OffsetDateTime::from_unix_timestamp(unix).unwrap())
    }

    #[test]
    fn before_takes_a_seq_a_time_or_an_age() {
        assert_eq!(at("101"), Ok(Before::Seq(101)));
        assert_eq!(at("2026-01-31T00:00:00Z"), Ok(time(1_769_817_600)));
        assert_eq!(at("90d"), Ok(time(2_000_000_000 - 90 * 86_400)));
        assert_eq!(at("2w"), Ok(time(2_000_000_000 - 2 * 604_800)));
        assert_eq!(at("12h"), Ok(time(2_000_000_000 - 12 * 3_600)));
        assert_eq!(at("30min"), Ok(time(2_000_000_000 - 1_800)));
        assert_eq!(at("45s"), Ok(time(2_000_000_000 - 45)));
        // The clock is read when the command starts.
        let Ok(Before::Time(t)) = parse_before("1d") else {
            panic!("1d")
        };
        let age = OffsetDateTime::now_utc() - t;
        assert!(
            age >= time::Duration::days(1)
                && age < time::Duration::days(1) + time::Duration::minutes(1),
            "{age}"
        );
    }

    #[test]
    fn before_refuses_what_it_cannot_read() {
        for bad in [
            "",
            "0d",
            "d",
            "-5d",
            "5 d",
            "5D",
            "5y",
            "6m",
            "5mins",
            "min",
            "1.5d",
            "d5",
            "90dd",
            "99999999999999999999d",
            "9223372036854775807w",
            "2026-01-31",
        ] {
            let e = at(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(at("0d").unwrap_err().contains("age of 0"));
        // An age that reaches before the year -9999 is out of range, not a panic.
        assert!(at("99999999w").unwrap_err().contains("out of range"));
    }
}
