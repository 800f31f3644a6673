//! The binary's own error type: library errors wrapped with what the operator should do.

use std::process::ExitCode;

/// Everything a command can fail with. Messages never contain keys, tokens or plaintexts.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments the parser could not catch.
    #[error("{0}")]
    Usage(String),
    /// Keyring problems.
    #[error(transparent)]
    Keyring(#[from] strongroom_keys::local::KeyringError),
    /// A Fernet key or token was rejected.
    #[error("{0}")]
    Fernet(#[from] strongroom_crypto::fernet::FernetError),
    /// An operation could not be done, or stopped; the message says why and what to do.
    #[error("{0}")]
    Operation(String),
    /// Reading input or writing output failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// Standard output was closed by its reader (`| head`): the command ends quietly with
    /// status 141, as one stopped by SIGPIPE shows in a shell (see `crate::output`).
    #[error("standard output was closed")]
    StdoutClosed,
    /// The command has given its answer on standard output and exits with this status
    /// without a message (`credential verify`: 1, does not match).
    #[error("exit status {0}")]
    Answer(u8),
}

impl CliError {
    /// Exit status: 2 for usage errors (as clap), 141 for a closed standard output (128 +
    /// SIGPIPE), an answer's own, 1 for everything else.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::StdoutClosed => ExitCode::from(141),
            CliError::Answer(code) => ExitCode::from(*code),
            _ => ExitCode::from(1),
        }
    }

    /// Whether the command ends without a message on standard error (a closed standard
    /// output, an answer given).
    pub fn is_quiet(&self) -> bool {
        matches!(self, CliError::StdoutClosed | CliError::Answer(_))
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> CliError {
        move |source| CliError::Io { context, source }
    }
}
