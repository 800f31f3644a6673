//! `strongroom rewrap`: move every stored data key under the active KEK, online.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use strongroom_core::{RewrapOptions, RewrapReport};
use strongroom_crypto::KeyProvider;

use strongroom_server::config::{KeyMode, KeyProviderKind};

use super::{Failure, OperatorTarget};
use crate::error::CliError;
use crate::output::{errln, outln};

/// `strongroom rewrap` options.
#[derive(Args, Debug)]
#[command(after_long_help = "\
Re-wraps the data key of every active credential version that is not yet under the active KEK \
(after `strongroom keys rotate`), without decrypting any value. Safe while servers run: each \
version is replaced by compare-and-swap, so a version written, rewrapped or destroyed meanwhile \
is skipped, never clobbered. A version whose data key does not unwrap (its KEK retired or \
unknown to the provider, or the key damaged) is left as it is, and the command then fails \
naming such versions: owner, credential and version, the first 20.

Resumable: the position is saved in the store after every batch; if the command is killed, run \
it again and it continues. When it finishes, `strongroom keys retire VERSION` can erase the old \
KEK version.

Moving to another key provider is a rewrap too: `--to-config NEW.toml` unwraps with the \
provider of --config and wraps with the provider NEW.toml names (same store). A move is not \
online: servers still running the old configuration answer 503 key_unavailable for what has \
moved. Stop them, run the move, start them with NEW.toml; if any wrote meanwhile, run the same \
command again (it moves what is left, and is audited under the new provider's keys).")]
pub struct RewrapArgs {
    #[command(flatten)]
    target: OperatorTarget,
    /// Versions per batch (1 to 1000); the resume point is saved after each.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    batch: u32,
    /// At most this many versions per second (e.g. `500` or `500/s`) [default: unlimited].
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    rate: Option<u32>,
    /// Count what would be rewrapped (checking each data key unwraps); change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Data keys re-wrapped at once (raise it for remote providers; 1 to 1024).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// Wrap with the key provider of this configuration instead (moving providers).
    #[arg(long, value_name = "FILE")]
    to_config: Option<PathBuf>,
}

fn parse_rate(s: &str) -> Result<u32, String> {
    let n = s.strip_suffix("/s").unwrap_or(s);
    match n.trim().parse::<u32>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a positive rate (e.g. 500 or 500/s)")),
        Ok(n) => Ok(n),
    }
}

pub fn run(args: RewrapArgs) -> Result<(), Failure> {
    if args.batch == 0 || args.batch > 1000 {
        return Err(CliError::Usage("--batch must be 1 to 1000".into()).into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    runtime.block_on(rewrap(args))
}

async fn rewrap(args: RewrapArgs) -> Result<(), Failure> {
    // Loaded once, first: a target that does not load is said before anything is opened or
    // made (and its environment warnings are said once).
    let target = match &args.to_config {
        None => None,
        Some(file) => Some(
            OperatorTarget {
                config: Some(file.clone()),
                data_dir: None,
                keyring: None,
            }
            .load()?,
        ),
    };
    // Only a move to another provider may come before the server's first start (and make
    // the store); otherwise a data dir without a store is a mistyped one, and a dry run
    // changes nothing.
    let backends = if target.is_some() && !args.dry_run {
        args.target.open().await?
    } else {
        args.target.open_existing().await?
    };
    let from: Arc<dyn KeyProvider> = backends.keyring.clone();
    let to: Arc<dyn KeyProvider> = match &target {
        None => from.clone(),
        Some(target) => {
            let mut ring_stays = false;
            if let Some(ring) = &backends.hierarchy {
                // Both sides keep a KEK ring: move the ring itself to the new provider first
                // (a handful of KEKs); data keys under the ring's KEKs then need no change.
                if target.keys.mode == KeyMode::Hierarchy
                    && target.keys.provider != KeyProviderKind::Local
                {
                    let (new_root, _) = strongroom_server::open_key_provider(target).await?;
                    if args.dry_run {
                        // Nothing moves: servers still configured for the old root would
                        // lose their KEKs. Reaching the new root is what it checks.
                        errln!(
                            "rewrap: dry run: the KEK ring would move to key provider '{}' \
                             first (nothing moved)",
                            target.keys.provider.as_str()
                        );
                        ring_stays = true;
                    } else {
                        let moving = strongroom_core::rewrap::Moving {
                            from: ring.root().clone(),
                            to: new_root,
                        };
                        let moved = strongroom_core::hierarchy::rewrap_ring(
                            backends.store.as_ref(),
                            &moving,
                        )
                        .await
                        .map_err(strongroom_server::ServerError::from)?;
                        if moved > 0 {
                            errln!(
                                "rewrap: the KEK ring moved to key provider '{}' ({moved} KEK versions re-wrapped)",
                                target.keys.provider.as_str()
                            );
                        }
                    }
                }
            }
            if ring_stays {
                // Once moved, the ring holds the same KEKs: data keys are counted against it.
                from.clone()
            } else {
                // A dry run makes nothing for the target either (no tables, no ring).
                let other = if args.dry_run {
                    strongroom_server::Backends::open_existing(target).await?
                } else {
                    strongroom_server::Backends::open(target).await?
                };
                let keys: Arc<dyn KeyProvider> = other.keyring.clone();
                other.close().await;
                keys
            }
        }
    };
    let options = RewrapOptions {
        batch_size: args.batch,
        max_per_second: args.rate,
        dry_run: args.dry_run,
        concurrency: usize::from(args.concurrency),
    };
    // Recorded before any key moves too: a run cut short (the store gone mid-way) then
    // still leaves its mark, though its closing record cannot be written. As for every
    // operator action, a log that does not take it is a warning, not a refusal: moving keys
    // off a compromised KEK must not wait for the log to be repaired.
    // A run after the head key moved to the target (a catch-up after a move) records with
    // the target's keys.
    let record = |outcome: &'static str, code: Option<&'static str>| {
        let (backends, from, to) = (&backends, from.clone(), to.clone());
        async move {
            let first = strongroom_server::audit_operator_action_with(
                backends,
                from.as_ref(),
                "rewrap",
                outcome,
                code,
                None,
            )
            .await;
            let result = match first {
                Err(_) if !Arc::ptr_eq(&from, &to) => {
                    strongroom_server::audit_operator_action_with(
                        backends,
                        to.as_ref(),
                        "rewrap",
                        outcome,
                        code,
                        None,
                    )
                    .await
                }
                other => other,
            };
            if let Err(e) = result {
                errln!("strongroom: warning: rewrap not recorded in the audit log: {e}");
            }
        }
    };
    if !args.dry_run {
        record("started", None).await;
    }
    let mut progress = Progress::new(args.dry_run);
    let mut so_far = 0;
    // Ctrl-C stops the run where it is: the batches finished are kept (their cursor saved),
    // the one under way is done again by the next run, and the log says the run stopped.
    let mut on_batch = |r: &strongroom_core::rewrap::RewrapReport| {
        so_far = r.rewrapped;
        progress.update(r);
    };
    let result = tokio::select! {
        result = strongroom_core::rewrap(
            backends.store.clone(),
            from.clone(),
            to.clone(),
            &options,
            &mut on_batch,
        ) => Some(result),
        Ok(()) = tokio::signal::ctrl_c() => None,
    };
    progress.finish();
    let Some(result) = result else {
        if !args.dry_run {
            record("error", Some("interrupted")).await;
        }
        backends.close().await;
        errln!(
            "rewrap interrupted after {so_far} data keys; run it again to continue (it goes on \
             after the last finished batch)"
        );
        return Err(CliError::Answer(130).into());
    };
    if !args.dry_run {
        let (outcome, code) = match &result {
            Ok(r) if r.failed == 0 => ("ok", None),
            Ok(_) => ("error", Some("unwrap_failed")),
            Err(_) => ("error", Some("stopped")),
        };
        // Recorded while the audit head key is still under `from` (on a first move).
        record(outcome, code).await;
    }
    if !args.dry_run && result.is_ok() {
        // The audit log's head key is wrapped by a KEK too: move it with the data keys, so
        // retiring the old KEK never strands the audit chain.
        let moving = strongroom_core::rewrap::Moving { from, to };
        match strongroom_core::audit::rewrap_head_key(backends.store.as_ref(), &moving).await {
            Ok(true) => errln!("rewrap: the audit head key moved to the target KEK too"),
            Ok(false) => {}
            Err(e) => {
                backends.close().await;
                return Err(CliError::Operation(format!(
                    "data keys rewrapped, but the audit head key was not: {e}; run it again"
                ))
                .into());
            }
        }
    }
    backends.close().await;
    let report = result.map_err(|e| {
        CliError::Operation(format!("rewrap stopped: {e}; run it again to continue"))
    })?;
    let verb = progress.verb;
    outln!(
        "{verb} {}, skipped {}, failed {} (target {}{})",
        report.rewrapped,
        report.skipped,
        report.failed,
        report.target,
        if report.resumed { ", resumed" } else { "" }
    )?;
    if report.failed > 0 {
        return Err(CliError::Operation(failed_message(&report)).into());
    }
    Ok(())
}

/// The versions that did not unwrap, named (the first
/// [`strongroom_core::MAX_FAILURES_LISTED`]: owner, name, version and KEK, never a key or a
/// value), in one line.
fn failed_message(report: &RewrapReport) -> String {
    let mut listed: Vec<String> = report
        .failures
        .iter()
        .map(|f| {
            format!(
                "owner {:?} credential {:?} version {} (under {})",
                f.owner, f.name, f.version, f.kek
            )
        })
        .collect();
    listed.sort();
    let more = report.failed.saturating_sub(listed.len() as u64);
    if more > 0 {
        listed.push(format!("and {more} more"));
    }
    let (versions, their, they) = if report.failed == 1 {
        (
            "version",
            "its KEK is",
            "it is damaged: restore it from a backup, or its owner destroys it, before the KEK \
             is retired); it was",
        )
    } else {
        (
            "versions",
            "their KEK is",
            "they are damaged: restore them from a backup, or their owners destroy them, \
             before the KEK is retired); they were",
        )
    };
    format!(
        "{} {versions} did not unwrap ({their} retired or unknown to this provider, or {they} \
         left as {}: {}",
        report.failed,
        if report.failed == 1 {
            "it is"
        } else {
            "they are"
        },
        listed.join("; ")
    )
}

/// Appends an operator record to the audit log; a failure is a warning (the action itself
/// already happened and is reported on stdout).
pub(crate) async fn audit_action(
    backends: &strongroom_server::Backends,
    action: &str,
    outcome: &str,
    code: Option<&str>,
    version: Option<u32>,
) {
    if let Err(e) =
        strongroom_server::audit_operator_action(backends, action, outcome, code, version).await
    {
        errln!("strongroom: warning: {action} not recorded in the audit log: {e}");
    }
}

/// A progress bar on a terminal; plain lines every few seconds otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    last_line: Instant,
    started: Instant,
    /// "rewrapped", or in a dry run "would rewrap".
    verb: &'static str,
}

impl Progress {
    fn new(dry_run: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Self {
            bar,
            last_line: Instant::now(),
            started: Instant::now(),
            verb: if dry_run { "would rewrap" } else { "rewrapped" },
        }
    }

    fn update(&mut self, r: &RewrapReport) {
        let done = r.rewrapped + r.skipped + r.failed;
        match &self.bar {
            Some(bar) => {
                bar.set_length(r.total.max(done));
                bar.set_position(done);
                bar.set_message(format!("skipped {} failed {}", r.skipped, r.failed));
            }
            None if self.last_line.elapsed() >= Duration::from_secs(2) => {
                self.last_line = Instant::now();
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                errln!(
                    "rewrap: {done}/{} ({:.0}/s): {} {}, skipped {}, failed {}",
                    r.total.max(done),
                    done as f64 / secs,
                    self.verb,
                    r.rewrapped,
                    r.skipped,
                    r.failed
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_parse() {
        assert_eq!(super::parse_rate("500"), Ok(500));
        assert_eq!(super::parse_rate("500/s"), Ok(500));
        assert!(super::parse_rate("0").is_err());
        assert!(super::parse_rate("fast").is_err());
    }

    #[test]
    fn failures_are_named_bounded_and_counted_in_the_right_number() {
        let failed = |i: u32| strongroom_core::FailedVersion {
            owner: "alice".into(),
            name: format!("cred-{i:02}"),
            version: 1,
            kek: "local:kr-1:v1".into(),
        };
        let mut report = strongroom_core::RewrapReport {
            failed: 1,
            failures: vec![failed(0)],
            ..Default::default()
        };
        assert_eq!(
            super::failed_message(&report),
            "1 version did not unwrap (its KEK is retired or unknown to this provider, or it is \
             damaged: restore it from a backup, or its owner destroys it, before the KEK is \
             retired); it was left as it is: owner \"alice\" credential \"cred-00\" version 1 \
             (under local:kr-1:v1)"
        );
        report.failed = 25;
        report.failures = (0..20).rev().map(failed).collect();
        let m = super::failed_message(&report);
        assert!(
            m.starts_with("25 versions did not unwrap (their KEK is"),
            "{m}"
        );
        assert!(
            m.contains("they were left as they are: owner \"alice\" credential \"cred-00\""),
            "{m}"
        );
        assert!(
            m.contains("\"cred-19\" version 1 (under local:kr-1:v1); and 5 more"),
            "{m}"
        );
        assert_eq!(m.matches("credential \"").count(), 20, "{m}");
    }
}
