//! One module per top-level subcommand.

pub mod archive;
pub mod audit;
pub mod backup;
pub mod credential;
pub mod fernet;
pub mod import;
pub mod keys;
pub mod rewrap;
pub mod serve;
pub mod token;

use std::process::ExitCode;

use crate::error::CliError;
use crate::output::errln;

/// A secret flag value: `Debug` never shows it.
#[derive(Clone)]
pub struct SecretArg(zeroize::Zeroizing<String>);

impl SecretArg {
    /// The value.
    pub fn expose(&self) -> &zeroize::Zeroizing<String> {
        &self.0
    }
}

impl std::str::FromStr for SecretArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretArg(zeroize::Zeroizing::new(s.to_owned())))
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

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
    /// An import failed (source unreadable, target refused a write, or rows failed).
    #[error(transparent)]
    Import(#[from] strongroom_import::ImportError),
    /// A failure of a command whose status 1 is an answer (`credential verify`: does not
    /// match), which therefore exits 2, as `cmp` and `grep` do on trouble.
    #[error(transparent)]
    NoAnswer(Box<Failure>),
}

impl From<strongroom_keys::local::KeyringError> for Failure {
    fn from(e: strongroom_keys::local::KeyringError) -> Self {
        Failure::Cli(e.into())
    }
}

impl Failure {
    /// Whether the command ends without a message on standard error (see
    /// [`CliError::is_quiet`]).
    pub fn is_quiet(&self) -> bool {
        matches!(self, Failure::Cli(e) if e.is_quiet())
    }

    /// Exit status: 2 for usage errors (as clap), 1 for everything else.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Cli(e) => e.exit_code(),
            Failure::Server(_) => ExitCode::from(1),
            Failure::NoAnswer(_) => ExitCode::from(2),
            Failure::Import(strongroom_import::ImportError::Usage(_)) => ExitCode::from(2),
            // As a shell reports a process ended by SIGINT.
            Failure::Import(strongroom_import::ImportError::Interrupted(_)) => ExitCode::from(130),
            Failure::Import(_) => ExitCode::from(1),
        }
    }
}

/// Says once on standard error which `STRONGROOM_*` variables name no setting, as the
/// server logs at start: `STRONGROOM_DATADIR=...` would otherwise send an operator command to
/// the default data dir without a word.
pub(crate) fn warn_unknown_env_names() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let names = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
        for name in strongroom_server::config::unknown_env_names(names) {
            errln!(
                "strongroom: warning: {name} names no setting and is ignored (a typo? nested \
                 keys use two underscores: STRONGROOM_TLS__CLIENT_AUTH)"
            );
        }
    });
}

/// Warns on standard error, once, for each setting of the configuration `file` that a
/// `STRONGROOM_*` variable overrides (say an exported `STRONGROOM_DATA_DIR` left from a dev
/// server): the variable wins, and the file's value is not what runs.
pub(crate) fn warn_environment_overrides(file: Option<&std::path::Path>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let Some(file) = file else { return };
    ONCE.call_once(|| {
        for (variable, key) in strongroom_server::config::environment_overrides(file) {
            errln!(
                "strongroom: warning: {variable} overrides `{key}` in {} (the environment \
                 wins; unset it to use the file's)",
                file.display()
            );
        }
    });
}

/// Warns on standard error when group or others may read a file holding a secret (a token
/// or keys): whoever reads it holds the secret too. A warning, not a refusal, as the file is
/// the caller's own choice and the harm is already done; the server refuses its own.
pub(crate) fn warn_if_readable_by_others(path: &std::path::Path, flag: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o044 != 0 {
            errln!(
                "strongroom: warning: {flag} {} is readable by group or others (chmod 600 it)",
                path.display()
            );
        }
    }
}

/// Where an operator command finds the store and keys: the server's `--config`, or the
/// `serve --dev` layout under `--data-dir`. Works while the server runs.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorTarget {
    /// The server's configuration file (TOML, as for `strongroom serve --config`), with the
    /// same STRONGROOM_* environment overrides.
    #[arg(long, value_name = "FILE", env = "STRONGROOM_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Data directory of the dev layout (`serve --dev --data-dir DIR`), or an override of
    /// the configuration's `data_dir`. [default: strongroom-data]
    #[arg(long, value_name = "DIR", env = "STRONGROOM_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// A keyring named apart (`keys … --keyring FILE`), instead of the configuration's.
    #[arg(skip)]
    pub keyring: Option<std::path::PathBuf>,
}

impl OperatorTarget {
    /// The server configuration these flags name.
    pub fn load(&self) -> Result<strongroom_server::config::Config, Failure> {
        warn_unknown_env_names();
        warn_environment_overrides(self.config.as_deref());
        let overrides = strongroom_server::config::Overrides {
            data_dir: self.data_dir.clone(),
            keyring: self.keyring.clone(),
            ..Default::default()
        };
        Ok(strongroom_server::config::Config::load_for_operator(
            self.config.as_deref(),
            &overrides,
        )?)
    }

    /// Opens the store and key provider, making them as a server's first start would when
    /// missing (`import` and `rewrap --to-config` may run before the server ever started).
    pub async fn open(&self) -> Result<strongroom_server::Backends, Failure> {
        let config = self.load()?;
        Ok(strongroom_server::Backends::open(&config).await?)
    }

    /// Opens an existing store and its key provider (see
    /// [`strongroom_server::Backends::open_existing`]).
    pub async fn open_existing(&self) -> Result<strongroom_server::Backends, Failure> {
        let config = self.load()?;
        Ok(strongroom_server::Backends::open_existing(&config).await?)
    }
}
