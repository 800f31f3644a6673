//! The one error type of this crate.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the server could not start (or stopped). Each message is one line that names the
/// setting or file at fault and never contains a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid: the message names the key (`limits.max_connections`,
    /// `tls.cert`, ...) and what is wrong with it.
    #[error("config: {0}")]
    Config(String),

    /// A file the configuration names could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// What the file is for (`TLS certificate`, `policy file`, ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },

    /// The key provider could not be opened (missing or unreadable keyring, bad permissions).
    #[error(transparent)]
    Keyring(#[from] strongroom_keys::local::KeyringError),

    /// The store could not be opened (unreachable database, schema too new, ...).
    #[error("store: {0}")]
    Store(#[from] strongroom_store::StoreError),

    /// The TLS material is unusable: the message names the file and the problem.
    #[error("tls: {0}")]
    Tls(String),

    /// The authentication settings are unusable.
    #[error(transparent)]
    Auth(#[from] strongroom_api::AuthConfigError),

    /// The policy file does not validate.
    #[error("policy file {}: {}", path.display(), one_line(&source.to_string()))]
    Policy {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the rule and field).
        source: strongroom_core::policy::PolicyError,
    },

    /// The listening socket could not be opened (port in use, no permission, ...).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },

    /// Making a development token or secret failed.
    #[error("dev: {0}")]
    Dev(String),

    /// The system random number generator failed.
    #[error(transparent)]
    Random(#[from] strongroom_crypto::RandomError),

    /// The async runtime or a signal handler could not be set up.
    #[error("runtime: {0}")]
    Runtime(String),

    /// The configured key provider cannot be used (unreachable, wrong key id or PIN,
    /// disabled key); the message names the provider and what failed.
    #[error(transparent)]
    Provider(#[from] strongroom_crypto::ProviderError),
}

impl ServerError {
    pub(crate) fn file(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ServerError {
        let path = path.into();
        move |source| ServerError::File { what, path, source }
    }
}

/// Folds a multi-line message (TOML parse errors quote the offending line with a caret) into
/// one line: the snippet lines are dropped, the others joined with ": ".
pub(crate) fn one_line(text: &str) -> String {
    let is_snippet = |l: &str| {
        let t = l.trim_start();
        t.starts_with('|')
            || t.split_once(" |")
                .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_snippet(l))
        .collect::<Vec<_>>()
        .join(": ")
}
