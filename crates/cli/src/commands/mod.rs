//! One module per top-level subcommand.

pub mod fernet;
pub mod keys;
pub mod serve;
pub mod token;

use std::process::ExitCode;

use crate::error::CliError;

/// What a command fails with: the CLI's own errors, or the server's (configuration, TLS,
/// keyring, store, socket). Every message is one line and holds no secret.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A CLI error (usage, keyring, Fernet, I/O).
    #[error(transparent)]
    Cli(#[from] CliError),
    /// A server error (configuration, TLS, store, bind, ...).
    #[error(transparent)]
    Server(#[from] strongroom_server::ServerError),
}

impl From<strongroom_keys::local::KeyringError> for Failure {
    fn from(e: strongroom_keys::local::KeyringError) -> Self {
        Failure::Cli(e.into())
    }
}

impl Failure {
    /// Exit status: 2 for usage errors (as clap), 1 for everything else.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Cli(e) => e.exit_code(),
            Failure::Server(_) => ExitCode::from(1),
        }
    }
}
