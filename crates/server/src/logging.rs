//! Structured logs with `tracing`: JSON lines (production default) or text (dev), on stderr.
//!
//! Nothing here logs request headers or bodies; the transport crates (`h2`, `hyper`,
//! `rustls`) are held at `info` (`rustls` at `error`) unless `log.level` names them, so their
//! debug output (frame dumps, handshake details) stays out of production logs.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Transport crates capped unless the directives name them. rustls is held at `error`: it
/// warns "Illegal SNI extension: ignoring IP address" on every connection from OpenSSL-based
/// clients (curl, wrk) that send an IP as SNI; handshake failures reach us as errors anyway.
const QUIET: &[(&str, &str)] = &[
    ("h2", "info"),
    ("hyper", "info"),
    ("hyper_util", "info"),
    ("rustls", "error"),
    ("tokio_rustls", "info"),
];

/// Parses `log.level` (a level or `tracing` filter directives).
///
/// # Errors
///
/// A message saying what is wrong with the directives.
pub(crate) fn filter(level: &str) -> Result<EnvFilter, String> {
    let mut directives = level.trim().to_owned();
    if directives.is_empty() {
        return Err("must not be empty (e.g. \"info\")".to_owned());
    }
    for (target, cap) in QUIET {
        if !directives.contains(target) {
            directives.push_str(&format!(",{target}={cap}"));
        }
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(&directives)
        .map_err(|e| format!("{e} (use a level such as \"info\", or directives such as \"info,strongroom_api=debug\")"))
}

/// Installs the global subscriber. A second call (tests start several servers in one
/// process) keeps the first subscriber and returns `Ok`.
///
/// # Errors
///
/// A message when `log.level` does not parse.
pub fn init(config: &LogConfig) -> Result<(), String> {
    let filter = filter(&config.level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
    Ok(())
}
