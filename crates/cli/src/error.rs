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
}

impl CliError {
    /// Exit status: 2 for usage errors (as clap), 1 for everything else.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            _ => ExitCode::from(1),
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> CliError {
        move |source| CliError::Io { context, source }
    }
}
