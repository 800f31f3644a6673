//! `strongroom keys …`: the local keyring's KEK versions.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use strongroom_crypto::OsRandom;
use strongroom_keys::local::{self, KeyInfo, LocalKeyring};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use strongroom_server::config::{Config, Overrides, DEFAULT_DATA_DIR};

use super::Failure;
use crate::error::CliError;

/// Where the keyring is: `--keyring`, else the `keys.keyring` of `--config`, else
/// `DATA_DIR/keyring.json` (the `serve --dev` layout).
#[derive(Args, Debug)]
pub struct KeyringLocation {
    /// Keyring file. Defaults to the server configuration's keyring, else
    /// DATA_DIR/keyring.json.
    #[arg(long, value_name = "PATH", env = "STRONGROOM_KEYRING")]
    keyring: Option<PathBuf>,
    /// The server's configuration file (TOML, as for `strongroom serve --config`); its
    /// `keys.keyring` (default `data_dir/keyring.json`) is used, with the same
    /// STRONGROOM_* environment overrides as the server.
    #[arg(
        long,
        value_name = "FILE",
        env = "STRONGROOM_CONFIG",
        conflicts_with = "keyring"
    )]
    config: Option<PathBuf>,
    /// Data directory of the dev layout (`serve --dev --data-dir DIR`); the keyring is
    /// DATA_DIR/keyring.json. [default: strongroom-data]
    #[arg(long, value_name = "DIR", env = "STRONGROOM_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl KeyringLocation {
    fn path(&self) -> Result<PathBuf, Failure> {
        if let Some(k) = &self.keyring {
            return Ok(k.clone());
        }
        if let Some(file) = &self.config {
            let overrides = Overrides {
                data_dir: self.data_dir.clone(),
                ..Overrides::default()
            };
            return Ok(Config::load(Some(file), &overrides)?.keyring_path());
        }
        Ok(self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
            .join("keyring.json"))
    }
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a new keyring file (mode 0600) with one active KEK version.
    ///
    /// Refuses to overwrite an existing keyring. The key material never leaves the file.
    Generate {
        #[command(flatten)]
        location: KeyringLocation,
    },
    /// List KEK versions: key id, version, state, dates. Never prints key material.
    List {
        #[command(flatten)]
        location: KeyringLocation,
        /// Print a JSON array of {key_id, version, state, created_at, state_changed_at}.
        #[arg(long)]
        json: bool,
    },
    /// Add a new active KEK version; the previous active version becomes decrypt-only, so
    /// everything it wrapped still opens.
    ///
    /// Safe while the server runs (writers serialise on a lock file); send the server SIGHUP
    /// (`kill -HUP PID`) so it wraps new data keys with the new version.
    Rotate {
        #[command(flatten)]
        location: KeyringLocation,
    },
}

pub fn run(cmd: KeysCommand) -> Result<(), Failure> {
    let now = OffsetDateTime::now_utc();
    match cmd {
        KeysCommand::Generate { location } => {
            let path = location.path()?;
            let info = local::generate(&path, now, &OsRandom)?;
            println!(
                "created keyring {} (key id {}, version {} active)",
                path.display(),
                info.key_id,
                info.version
            );
        }
        KeysCommand::Rotate { location } => {
            let path = location.path()?;
            let info = local::rotate(&path, now, &OsRandom)?;
            println!(
                "key {} version {} is now active; earlier versions stay decrypt-only",
                info.key_id, info.version
            );
        }
        KeysCommand::List { location, json } => {
            let ring = LocalKeyring::open(&location.path()?)?;
            let keys = ring.list();
            if json {
                let text = serde_json::to_string_pretty(&keys)
                    .map_err(|e| CliError::Usage(format!("cannot encode JSON: {e}")))?;
                println!("{text}");
            } else {
                print_table(&keys);
            }
        }
    }
    Ok(())
}

fn print_table(keys: &[KeyInfo]) {
    let date = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_else(|_| t.to_string());
    println!(
        "{:<20} {:>7}  {:<12}  {:<25}  STATE CHANGED",
        "KEY ID", "VERSION", "STATE", "CREATED"
    );
    for k in keys {
        println!(
            "{:<20} {:>7}  {:<12}  {:<25}  {}",
            k.key_id,
            k.version,
            k.state.as_str(),
            date(k.created_at),
            date(k.state_changed_at)
        );
    }
}
