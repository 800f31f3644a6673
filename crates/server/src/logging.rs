//! Structured logs with `tracing`: JSON lines (production default) or text (dev), on stderr.
//!
//! Nothing here logs request headers or bodies. A bare level more verbose than `info`
//! (`debug`, `trace`) applies to Strongroom's own crates and to its request trace layer only;
//! every dependency stays at `info` unless the directives name it. Dependencies' debug and
//! trace output dumps what they carry: hyper and h2 frames, and the AWS SDK's requests with
//! their bodies, which for KMS hold plaintext data keys.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Targets a bare `debug`/`trace` reaches: Strongroom's crates (`strongroom`,
/// `strongroom_api`, ...: targets match by prefix) and the request trace layer, configured
/// in `strongroom_api` to record no headers or bodies.
const OWN: &[&str] = &["strongroom", "tower_http::trace"];

/// Caps applied unless the directives name the target. rustls warns "Illegal SNI
/// extension: ignoring IP address" on every connection from OpenSSL-based clients (curl,
/// wrk) that send an IP as SNI (handshake failures reach us as errors anyway); cryptoki logs
/// an ERROR line for every mechanism of the token it has no name for, some thirty at each
/// PKCS#11 start, none of them a fault; tokio-postgres logs every server NOTICE at info
/// ("schema ... already exists, skipping" at each start).
const CAPS: &[(&str, &str)] = &[
    ("rustls", "error"),
    ("cryptoki::mechanism", "off"),
    ("tokio_postgres", "warn"),
];

/// The filter directives for `log.level` (see the module documentation).
fn directives(level: &str) -> Result<String, String> {
    let items: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if items.is_empty() {
        return Err("must not be empty (e.g. \"info\")".to_owned());
    }
    let mut out: Vec<String> = Vec::new();
    // Directives for some targets only would turn every other target off, errors included:
    // the others stay at `info` unless a bare level says otherwise.
    if !items.iter().any(|d| d.parse::<LevelFilter>().is_ok()) {
        out.push("info".to_owned());
    }
    for item in &items {
        match item.parse::<LevelFilter>() {
            Ok(l) if l > LevelFilter::INFO => {
                out.push("info".to_owned());
                out.extend(OWN.iter().map(|t| format!("{t}={item}")));
            }
            Ok(_) => out.push((*item).to_owned()),
            // `tracing` reads a bare word as a target at `trace` and turns everything else
            // off: a misspelt level ("warning", "verbose") would silence every log line,
            // errors included.
            Err(_) if !item.contains('=') && !item.contains('[') => {
                return Err(format!(
                    "\"{item}\" is not a level (off, error, warn, info, debug, trace); name a \
                     target with its level, as in \"info,strongroom_api=debug\""
                ))
            }
            Err(_) => out.push((*item).to_owned()),
        }
    }
    for (target, cap) in CAPS {
        let named = items.iter().any(|d| {
            d.split(['=', '['])
                .next()
                // The target itself, one below it, or a parent (`cryptoki` names
                // `cryptoki::mechanism` too).
                .is_some_and(|t| {
                    t == *target
                        || t.starts_with(&format!("{target}::"))
                        || target.starts_with(&format!("{t}::"))
                })
        });
        if !named {
            out.push(format!("{target}={cap}"));
        }
    }
    Ok(out.join(","))
}

/// Parses `log.level` (a level or `tracing` filter directives).
///
/// # Errors
///
/// A message saying what is wrong with the directives.
pub(crate) fn filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .with_regex(false)
        .parse(directives(level)?)
        .map_err(|e| format!("{e} (use a level such as \"info\", or directives such as \"info,strongroom_api=debug\")"))
}

/// Lines waiting for stderr, past which new lines are dropped (and counted) rather than wait.
const QUEUED_LINES: usize = 4_096;

/// Keeps the log's writer thread; dropping it writes out the lines still queued (waiting a
/// second at most).
pub struct LogGuard {
    _worker: tracing_appender::non_blocking::WorkerGuard,
}

/// Installs the global subscriber; keep the guard while the server runs. A second call
/// (tests start several servers in one process) keeps the first subscriber.
///
/// Lines go to stderr through a queue and a writer thread of their own: a reader of stderr
/// that stalls (a log shipper, journald under pressure) made every thread that logged wait
/// for it, and the whole server stopped answering once the pipe's buffer was full. Lines the
/// queue cannot take, or stderr does not, are dropped and counted
/// (`strongroom_log_lines_dropped_total`).
///
/// # Errors
///
/// A message when `log.level` does not parse.
pub fn init(config: &LogConfig) -> Result<LogGuard, String> {
    let filter = filter(&config.level)?;
    let (queue, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("strongroom-log")
        .finish(DroppingStderr(strongroom_core::lines::LineSink::new(
            std::io::stderr(),
        )));
    let _ = QUEUE_DROPPED.set(queue.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(queue)
        // By default a line that cannot be written is reported with `eprintln!`, which
        // panics when stderr cannot be written either.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    // `try_init` fails only when a subscriber is already set; keep that one.
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.compact().try_init(),
    };
    Ok(LogGuard { _worker: guard })
}

/// Log lines that stderr did not take (a full disk under `2>>file`, a reader that went
/// away), since the start.
static STDERR_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts the lines the queue to the writer thread had no room for.
static QUEUE_DROPPED: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Log lines dropped since the start, for want of room in the queue or because stderr did
/// not take them: `strongroom_log_lines_dropped_total`.
pub fn lines_dropped() -> u64 {
    let queued = QUEUE_DROPPED.get().map_or(
        0,
        tracing_appender::non_blocking::ErrorCounter::dropped_lines,
    );
    STDERR_DROPPED.load(std::sync::atomic::Ordering::Relaxed) + queued as u64
}

/// Stderr for the writer thread, where a line that cannot be written is counted and
/// dropped. `tracing` reported such a line with `eprintln!`, which panics when stderr cannot
/// be written either: with stderr on a full disk, the keyring watcher, the SIGHUP and
/// SIGTERM handlers and requests died at their first log line, and a server whose watcher
/// had died went on sealing under a key that `keys retire` then erased. Each write is one
/// whole line (the queue carries formatted lines).
struct DroppingStderr(strongroom_core::lines::LineSink<std::io::Stderr>);

impl std::io::Write for DroppingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.write_line(buf).is_err() {
            STDERR_DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_levels_reach_our_crates_only_unless_a_dependency_is_named() {
        let caps = "rustls=error,cryptoki::mechanism=off,tokio_postgres=warn";
        assert_eq!(directives("info").unwrap(), format!("info,{caps}"));
        assert_eq!(
            directives("trace").unwrap(),
            format!("info,strongroom=trace,tower_http::trace=trace,{caps}")
        );
        assert_eq!(
            directives(" debug , hyper=debug ").unwrap(),
            format!("info,strongroom=debug,tower_http::trace=debug,hyper=debug,{caps}")
        );
        assert_eq!(
            directives("warn,rustls=warn,cryptoki=info,tokio_postgres=info").unwrap(),
            "warn,rustls=warn,cryptoki=info,tokio_postgres=info"
        );
        assert!(directives(" , ").is_err());
        // A misspelt level is refused, not read as a target (which would log nothing else).
        for bad in ["warning", "verbose", "info,strongroom_api"] {
            let err = directives(bad).unwrap_err();
            assert!(err.contains("is not a level"), "{bad}: {err}");
        }
        assert!(filter("warning").is_err());
        // Targets alone keep the rest at info (they turned every other line off).
        assert_eq!(
            directives("strongroom_api=debug").unwrap(),
            format!("info,strongroom_api=debug,{caps}")
        );
        assert!(directives("strongroom[span]").is_ok());
        assert!(directives("INFO").is_ok());
    }

    /// At `trace`, what the AWS SDK logs at trace (its requests, bodies included: KMS
    /// plaintext data keys) is not written; Strongroom's own trace events are.
    #[test]
    fn trace_does_not_let_dependencies_dump_what_they_carry() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter("trace").unwrap())
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "aws_smithy_runtime::client::orchestrator", "Plaintext KEY-CANARY");
            tracing::debug!(target: "hyper::proto::h1", "frame KEY-CANARY");
            tracing::trace!(target: "strongroom_keys::aws_kms", "our own trace event");
            tracing::info!(target: "aws_config", "an info line");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("KEY-CANARY"), "{text}");
        assert!(text.contains("our own trace event"), "{text}");
        assert!(text.contains("an info line"), "{text}");
    }
}
