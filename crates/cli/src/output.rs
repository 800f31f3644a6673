//! Writing to standard output.
//!
//! Rust ignores SIGPIPE, so when the reader of a pipe has gone (`strongroom audit export |
//! head -2`) a write fails with EPIPE, and `println!` panics on it. Every command writes
//! through these helpers instead: a closed standard output becomes
//! [`CliError::StdoutClosed`], which ends the command without a word and with status 141,
//! what a shell shows for a Unix tool that SIGPIPE stopped (`seq 1000000 | head -1`). The
//! status is not 0: whatever was still to come was not delivered, which a script using
//! `set -o pipefail` must see, as it would for `cat`.

use std::io::Write;

use crate::error::CliError;

/// `println!` for commands: a closed standard output ends the command quietly (see the
/// module), any other write error is reported.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes one line (with `\n`) and flushes it.
pub(crate) fn line(args: std::fmt::Arguments<'_>) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(error("cannot write to standard output"))
}

/// Writes `bytes` exactly as they are (nothing added) and flushes them.
pub(crate) fn write_all(bytes: &[u8], context: &'static str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(error(context))
}

/// Maps an error writing standard output: a closed pipe to [`CliError::StdoutClosed`], any
/// other with `context`.
pub(crate) fn error(context: &'static str) -> impl FnOnce(std::io::Error) -> CliError {
    move |source| match source.kind() {
        std::io::ErrorKind::BrokenPipe => CliError::StdoutClosed,
        _ => CliError::Io { context, source },
    }
}
