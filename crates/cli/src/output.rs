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

/// Writes a secret value (a revealed credential, a decrypted Fernet token) to standard
/// output: its exact bytes to a pipe or a file; to a terminal, followed by a newline, and
/// only when it is text without control characters.
pub(crate) fn write_value(value: &[u8]) -> Result<(), CliError> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return write_all(value, "cannot write the value");
    }
    // Refused rather than shown escaped: whoever set the value chose its bytes, and escape
    // sequences written to a terminal act on it (retitle it, rewrite what is on screen,
    // answer queries as typed input). An escaped rendering would be safe to show but is not
    // the value: `\x1b` on screen cannot be told from those four characters in a value, and
    // one copied from the screen is wrong without a sign. Refusing keeps one rule, what is
    // printed is the value byte for byte, and the way out is one redirect. Bytes that are
    // not UTF-8 are refused too: a terminal reads some of them as controls (C1).
    let printable =
        std::str::from_utf8(value).is_ok_and(|text| !text.chars().any(char::is_control));
    if !printable {
        return Err(CliError::Operation(
            "the value holds control characters (a newline, a tab or an escape sequence) or \
             bytes that are not UTF-8, which a terminal would act on rather than show: \
             nothing was printed; redirect standard output to a file or a pipe to get its \
             exact bytes (`... > value.bin`, `... | od -c`)"
                .into(),
        ));
    }
    write_all(value, "cannot write the value")?;
    write_all(b"\n", "cannot write the value")
}
