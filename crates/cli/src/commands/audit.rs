//! `strongroom audit verify|head|export`: check, pin and stream the tamper-evident audit log.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use strongroom_store::audit::{Head, Verifier};

use super::{Failure, OperatorTarget};
use crate::error::CliError;
use crate::output::outln;

/// Records read per batch.
const BATCH: u32 = 4096;

/// `strongroom audit ...`.
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the whole log: every record's hash, the chain, and the MAC'd head. Names the
    /// first bad record and exits non-zero on any tampering.
    #[command(
        after_help = "Examples:\n  strongroom audit verify --config /etc/strongroom/strongroom.toml\n  \
        strongroom audit verify --config /etc/strongroom/strongroom.toml --expect-head head.json"
    )]
    Verify {
        /// Where the store and keys are.
        #[command(flatten)]
        target: OperatorTarget,
        /// A head saved earlier by `audit head` (a JSON file): also check the log still
        /// contains it, which catches a rollback of the whole log.
        #[arg(long, value_name = "FILE")]
        expect_head: Option<PathBuf>,
    },
    /// Print the chain head (count, hash, mac) as JSON, to keep it somewhere else.
    #[command(after_help = "Example (keep the file away from the store's host):\n  \
        strongroom audit head --config /etc/strongroom/strongroom.toml > head.json")]
    Head {
        /// Where the store and keys are.
        #[command(flatten)]
        target: OperatorTarget,
    },
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
            } => verify(&target, expect_head).await,
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
    let n = result?;
    outln!("audit log OK: {n} records, chain and head verified")?;
    Ok(())
}

async fn verify_log(
    backends: &strongroom_server::Backends,
    expected: Option<&Head>,
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
    let mut verifier = Verifier::new();
    let mut pinned_seen = false;
    // Every credential version is written with its `put` record, in one transaction.
    let mut puts = 0u64;
    let failed =
        |e: String| -> Failure { CliError::Operation(format!("audit verify FAILED: {e}")).into() };
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
    loop {
        let batch = log.audit_scan(verifier.count(), BATCH).await.map_err(op)?;
        if batch.is_empty() {
            break;
        }
        for r in &batch {
            verifier.push(r).map_err(|e| failed(e.to_string()))?;
            head_checked |= at_head(&verifier)?;
            if r.event.action == "put" && r.event.outcome == "ok" {
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
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut next = after;
    loop {
        let batch = log.audit_scan(next, BATCH).await.map_err(op)?;
        let Some(last) = batch.last() else { break };
        next = last.seq;
        for r in &batch {
            let line = serde_json::to_string(r).map_err(op)?;
            writeln!(out, "{line}").map_err(crate::output::error("cannot write the export"))?;
        }
    }
    out.flush()
        .map_err(crate::output::error("cannot write the export"))?;
    Ok(())
}
