//! Writing to standard output, and notes to standard error.
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

/// `eprintln!` for notes, warnings and progress: a line standard error does not take (a
/// full disk, `2>/dev/full`, a reader gone) is dropped. `eprintln!` panicked there (status
/// 101), often after the work was done: a `rewrap` or `import` finished, a `keys rotate`
/// made, with its closing audit record and its report never written.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::note(format_args!($($arg)*), true)
    };
}
pub(crate) use errln;

/// [`errln!`] without the newline (a prompt).
macro_rules! errprint {
    ($($arg:tt)*) => {
        $crate::output::note(format_args!($($arg)*), false)
    };
}
pub(crate) use errprint;

/// Writes a note to standard error, dropping it if it cannot be written.
pub(crate) fn note(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut err = std::io::stderr().lock();
    let _ = err
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                err.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| err.flush());
}

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
