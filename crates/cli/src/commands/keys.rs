//! `strongroom keys …`: the local keyring's KEK versions.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use strongroom_crypto::OsRandom;
use strongroom_keys::local::{self, KeyInfo, LocalKeyring};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use std::sync::Arc;

use strongroom_core::hierarchy::{self, KekHierarchy, KekState};
use strongroom_server::config::{Config, KeyMode, Overrides, DEFAULT_DATA_DIR};

use strongroom_crypto::KeyProvider;
use strongroom_server::ServerError;
use strongroom_store::{KekFilter, KekRef};

use super::{Failure, OperatorTarget};
use crate::error::CliError;
use crate::output::{errln, outln};

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
    /// Whether --config / --data-dir name a store that exists (never creates one: a SQLite
    /// store must already be there). When they name a SQLite store that is not there, says
    /// so on standard error with what is skipped (`skipped`), since a mistyped data dir
    /// looks just like a keyring that no server has used yet.
    fn names_a_store(&self, skipped: &str) -> Result<bool, Failure> {
        if self.config.is_none() && self.data_dir.is_none() && self.keyring.is_some() {
            errln!(
                "note: --keyring alone names no store: {skipped} (name it with --data-dir or --config)"
            );
            return Ok(false);
        }
        // With no flag at all, the default data dir (`serve --dev`'s layout) is the store.
        let config = self.operator_target().load()?;
        if config.store.kind != strongroom_server::config::StoreKind::Sqlite {
            return Ok(true);
        }
        let db = config.data_dir.join(strongroom_store::sqlite::DB_FILE_NAME);
        if db.exists() {
            return Ok(true);
        }
        errln!(
            "note: no Strongroom database at {} (no server has used this data dir yet, or it is mistyped): {skipped}",
            db.display()
        );
        Ok(false)
    }

    /// After `keys generate`: a SQLite store already there was made with other keys, which
    /// this new keyring is not, so it opens nothing the store holds (a server over both
    /// fails at its audit log). Most often the store's keyring was lost or mistyped.
    fn note_a_store_made_with_other_keys(&self) {
        if self.config.is_none() && self.data_dir.is_none() && self.keyring.is_some() {
            return;
        }
        let Ok(config) = self.operator_target().load() else {
            return;
        };
        let db = config.data_dir.join(strongroom_store::sqlite::DB_FILE_NAME);
        if config.store.kind == strongroom_server::config::StoreKind::Sqlite && db.exists() {
            errln!(
                "note: a store already exists at {}: what it holds is sealed under the keyring \
                 it was made with, which this new one is not, so it opens nothing there. If that \
                 keyring was lost or is elsewhere, put it back instead of this one",
                db.display()
            );
        }
    }

    /// The configuration, when --config names a provider other than the local keyring.
    fn remote(&self) -> Result<Option<Config>, Failure> {
        let Some(file) = &self.config else {
            return Ok(None);
        };
        let overrides = Overrides {
            data_dir: self.data_dir.clone(),
            ..Overrides::default()
        };
        let config = Config::load_for_operator(Some(file), &overrides)?;
        Ok(
            (config.keys.provider != strongroom_server::config::KeyProviderKind::Local)
                .then_some(config),
        )
    }

    /// The store (and keys) of the same --config / --data-dir.
    fn operator_target(&self) -> OperatorTarget {
        OperatorTarget {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            keyring: self.keyring.clone(),
        }
    }

    fn path(&self) -> Result<PathBuf, Failure> {
        super::warn_unknown_env_names();
        if let Some(k) = &self.keyring {
            return Ok(k.clone());
        }
        if let Some(file) = &self.config {
            let overrides = Overrides {
                data_dir: self.data_dir.clone(),
                ..Overrides::default()
            };
            return Ok(Config::load_for_operator(Some(file), &overrides)?.keyring_path());
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
    #[command(
        after_help = "Examples:\n  strongroom keys generate --data-dir ./strongroom-data\n  \
        strongroom keys generate --config /etc/strongroom/strongroom.toml"
    )]
    Generate {
        #[command(flatten)]
        location: KeyringLocation,
    },
    /// List KEK versions: key id, version, state, dates. Never prints key material.
    #[command(
        after_help = "Examples:\n  strongroom keys list --data-dir ./strongroom-data\n  \
        strongroom keys list --config /etc/strongroom/strongroom.toml --json"
    )]
    List {
        #[command(flatten)]
        location: KeyringLocation,
        /// Print a JSON array of {key_id, version, state, created_at, state_changed_at},
        /// plus `credential_versions` (how many active credential versions each KEK wraps)
        /// when the store is named by --config or --data-dir.
        #[arg(long)]
        json: bool,
    },
    /// Add a new active KEK version; the previous active version becomes decrypt-only, so
    /// everything it wrapped still opens.
    ///
    /// Safe while the server runs (writers serialise on a lock file): a running server
    /// notices the file changed within a second and wraps new data keys with the new version.
    /// Then run `strongroom rewrap` to move the stored data keys over.
    ///
    /// With a remote provider in `hierarchy` mode (the default) this adds a Strongroom KEK
    /// version, wrapped by the provider, to the ring in the store; every running server
    /// uses it within a second. `--root` first rotates the provider's own key (Transit,
    /// PKCS#11), then re-wraps the ring under it.
    #[command(
        after_help = "Examples:\n  strongroom keys rotate --config /etc/strongroom/strongroom.toml\n  \
        strongroom rewrap --config /etc/strongroom/strongroom.toml   # then move the data keys"
    )]
    Rotate {
        #[command(flatten)]
        location: KeyringLocation,
        /// Also rotate the remote provider's own key (Transit, PKCS#11; with `keys.mode =
        /// "strict"` that is what rotate always does).
        #[arg(long)]
        root: bool,
    },
    /// Erase a decrypt-only KEK version's material. Refuses the active version (run `keys
    /// rotate` first, then `rewrap`), and refuses while any active credential version still
    /// uses it (run `strongroom rewrap` first); afterwards a full scan of the store confirms
    /// nothing is left under it.
    #[command(after_help = "Example (after `keys rotate` and `rewrap`):\n  \
        strongroom keys retire 1 --config /etc/strongroom/strongroom.toml")]
    Retire {
        #[command(flatten)]
        location: KeyringLocation,
        /// The KEK version to retire.
        #[arg(value_name = "VERSION")]
        kek_version: u32,
    },
    /// Show the store's record of the local keyring's rotations (the newest version one made,
    /// and a fingerprint of its material), which every server and command holds its keyring
    /// file to, and how this file compares; or set it from this file.
    ///
    /// A keyring file that lacks the recorded version, or holds other material under its
    /// number, seals nothing new; so does every file while the record does not read.
    /// `--set-from-this-file` makes the record name this file's newest version: after a
    /// record that does not read (changed outside Strongroom), or one that a rotation whose
    /// file could not be written left naming a version no file holds. Hosts whose keyring
    /// file is not this one's newest then seal nothing new until it is copied to them; a
    /// running server that saw a higher version recorded keeps to it until it restarts
    /// (versions only grow, so that whoever writes the database cannot lower them).
    #[command(
        after_help = "Examples:\n  strongroom keys record --config /etc/strongroom/strongroom.toml\n  \
        strongroom keys record --config /etc/strongroom/strongroom.toml --set-from-this-file"
    )]
    Record {
        #[command(flatten)]
        location: KeyringLocation,
        /// Make the record name this keyring file's newest version and its material.
        #[arg(long)]
        set_from_this_file: bool,
    },
}

pub fn run(cmd: KeysCommand) -> Result<(), Failure> {
    let now = OffsetDateTime::now_utc();
    match cmd {
        KeysCommand::Generate { location } if location.remote()?.is_some() => {
            let config = location.remote()?.unwrap_or_else(|| unreachable!());
            block_on(remote_generate(config))?;
        }
        KeysCommand::Rotate { location, root } if location.remote()?.is_some() => {
            let config = location.remote()?.unwrap_or_else(|| unreachable!());
            if hierarchy_mode(&config) {
                block_on(ring_rotate(config, root))?;
            } else {
                block_on(remote_rotate(config))?;
            }
        }
        KeysCommand::List { location, json } if location.remote()?.is_some() => {
            let config = location.remote()?.unwrap_or_else(|| unreachable!());
            if hierarchy_mode(&config) {
                block_on(ring_list(config, json))?;
            } else {
                block_on(remote_list(config, json))?;
            }
        }
        KeysCommand::Retire {
            location,
            kek_version,
        } if location.remote()?.is_some() => {
            let config = location.remote()?.unwrap_or_else(|| unreachable!());
            if hierarchy_mode(&config) {
                block_on(ring_retire(config, kek_version))?;
            } else {
                block_on(remote_retire(config, kek_version))?;
            }
        }
        KeysCommand::Record { location, .. } if location.remote()?.is_some() => {
            return Err(CliError::Usage(
                "keys record is the local keyring's: a remote provider (and the KEK ring in \
                 the store) keeps its own versions"
                    .into(),
            )
            .into());
        }
        KeysCommand::Record {
            location,
            set_from_this_file,
        } => {
            let path = location.path()?;
            if !location.names_a_store("there is no record to show")? {
                return Err(CliError::Usage(
                    "keys record reads the store's record, and there is no store there (see the \
                     note above)"
                        .into(),
                )
                .into());
            }
            block_on(keyring_record(&location, &path, set_from_this_file))?;
        }
        KeysCommand::Generate { location } => {
            let path = location.path()?;
            let info = local::generate(&path, now, &OsRandom)?;
            outln!(
                "created keyring {} (key id {}, version {} active)",
                path.display(),
                info.key_id,
                info.version
            )?;
            location.note_a_store_made_with_other_keys();
        }
        KeysCommand::Rotate { location, root } => {
            if root {
                return Err(CliError::Usage(
                    "--root rotates a remote provider's own key beneath the KEK ring \
                     (keys.mode = \"hierarchy\"); the local keyring has no separate root: \
                     `keys rotate` alone rotates it"
                        .into(),
                )
                .into());
            }
            let path = location.path()?;
            let info = if location.names_a_store("this rotation is not recorded in an audit log")? {
                // The store first: when it cannot be opened (no tables, database down), the
                // command fails before the keyring changes, not after.
                block_on(async {
                    let backends = location.operator_target().open_existing().await?;
                    if let Err(e) = refuse_a_keyring_not_the_stores(&backends, &path).await {
                        backends.close().await;
                        return Err(e);
                    }
                    audit_rotation_start(&backends).await;
                    let rotated =
                        strongroom_server::rotate_local_recorded(backends.store.as_ref(), &path)
                            .await
                            .map_err(|e| Failure::from(CliError::Operation(e.to_string())));
                    audit_rotation(backends, &rotated, |k| k.version).await;
                    rotated
                })?
            } else {
                local::rotate(&path, now, &OsRandom)?
            };
            outln!(
                "key {} version {} is now active; earlier versions stay decrypt-only",
                info.key_id,
                info.version
            )?;
        }
        KeysCommand::List { location, json } => {
            let ring = LocalKeyring::open(&location.path()?)?;
            let keys = ring.list();
            let counts = if location.names_a_store("credential version counts not shown")? {
                Some(block_on(kek_counts(location.operator_target()))?)
            } else {
                None
            };
            let count_of = |k: &KeyInfo| {
                counts.as_ref().map(|c| {
                    c.iter()
                        .filter(|(r, _)| {
                            r.provider == local::KIND
                                && r.key_id == k.key_id
                                && r.version == k.version
                        })
                        .map(|(_, n)| *n)
                        .sum::<u64>()
                })
            };
            let foreign = counts.as_deref().map_or_else(Vec::new, |c| {
                strongroom_server::foreign_versions(c, &[local::KIND.to_owned()])
            });
            // Versions under a keyring version this file lacks (an older copy, another
            // keyring): listed, not left out.
            let held: Vec<u32> = keys.iter().map(|k| k.version).collect();
            let unheld = counts.as_deref().map_or_else(Vec::new, |c| {
                strongroom_server::unheld_local_versions(c, ring.key_id(), &held)
            });
            if json {
                let mut rows: Vec<serde_json::Value> = keys
                    .iter()
                    .map(|k| {
                        let mut v = serde_json::to_value(k).unwrap_or_default();
                        if let (Some(n), Some(o)) = (count_of(k), v.as_object_mut()) {
                            o.insert("credential_versions".into(), n.into());
                        }
                        v
                    })
                    .collect();
                rows.extend(foreign.iter().map(other_provider_row));
                rows.extend(unheld.iter().map(|(k, n)| {
                    serde_json::json!({
                        "provider": k.provider, "key_id": k.key_id, "version": k.version,
                        "state": NOT_IN_THIS_FILE, "credential_versions": n,
                    })
                }));
                let text = serde_json::to_string_pretty(&rows)
                    .map_err(|e| CliError::Usage(format!("cannot encode JSON: {e}")))?;
                outln!("{text}")?;
            } else {
                print_table(&keys)?;
                if counts.is_some() {
                    for k in &keys {
                        outln!(
                            "version {}: {}",
                            k.version,
                            active_versions(count_of(k).unwrap_or(0))
                        )?;
                    }
                }
                for (k, n) in &foreign {
                    outln!("{}", other_provider_line(k, *n))?;
                }
                for (k, n) in &unheld {
                    outln!(
                        "{}:{}:v{}: {} sealed under a keyring \
                         version this file does not hold (an older copy restored, or another \
                         keyring?): they cannot be opened until the file that holds it is back",
                        k.provider,
                        k.key_id,
                        k.version,
                        active_versions(*n)
                    )?;
                }
            }
        }
        KeysCommand::Retire {
            location,
            kek_version: version,
        } => {
            let path = location.path()?;
            let ring = LocalKeyring::open(&path)?;
            let kek = KekRef::new(local::KIND, ring.key_id(), version);
            if location.config.is_none() && location.data_dir.is_none() {
                return Err(CliError::Usage(
                    "keys retire needs --config or --data-dir, to check in the store that no \
                     credential version still uses the key"
                        .into(),
                )
                .into());
            }
            // Only the store can say that nothing uses the version; a data dir or config
            // without one (a typo, most likely) is never taken to mean "nothing does".
            // `open_existing` names the missing database.
            let active = ring
                .list()
                .iter()
                .any(|k| k.version == version && k.state == local::KeyState::Active);
            // Servers and operator commands take up a rotation within a second; until then
            // they may still seal under the version it replaced, and a put sealed so may
            // commit a little later. Counted only once that is over, so that it is counted.
            let since = ring
                .list()
                .iter()
                .find(|k| k.version == version && k.state == local::KeyState::DecryptOnly)
                .map_or(RETIRE_SETTLE, |k| now - k.state_changed_at);
            // At most the settling time: a change time in the future (a clock ahead where the
            // file was rotated, an edited file) must not make this wait for it.
            let wait =
                std::time::Duration::try_from(RETIRE_SETTLE - since.max(time::Duration::ZERO))
                    .unwrap_or_default();
            if !wait.is_zero() {
                let when = if since.is_negative() {
                    "at a time still to come by this host's clock".to_owned()
                } else {
                    format!("{:.0} s ago", since.as_seconds_f64())
                };
                errln!(
                    "note: version {version} stopped being active {when}; waiting {} s for \
                     servers and imports still sealing under it to finish",
                    wait.as_secs_f64().ceil()
                );
                std::thread::sleep(wait);
            }
            let now = now + wait;
            block_on(retire(&location, &path, kek, active, now))?;
        }
    }
    Ok(())
}

async fn remote_generate(config: Config) -> Result<(), Failure> {
    use strongroom_server::config::KeyProviderKind as K;
    match config.keys.provider {
        K::Pkcs11 => {
            let provider = strongroom_keys::Pkcs11Provider::generate(
                strongroom_server::pkcs11_config(&config)?,
            )
            .await
            .map_err(ServerError::from)?;
            let kek = provider.active_kek().map_err(ServerError::from)?;
            outln!("created {kek} in the token (never leaves it)")?;
            Ok(())
        }
        _ if hierarchy_mode(&config) => {
            // Opening the backends makes the KEK ring if the store has none.
            let backends = strongroom_server::Backends::open(&config).await?;
            let ring = strongroom_core::hierarchy::list(backends.store.as_ref()).await;
            backends.close().await;
            let ring = ring.map_err(ServerError::from)?;
            for k in ring.iter().filter(|k| k.state == KekState::Active) {
                outln!(
                    "KEK ring ready: {}:{}:v{} active, wrapped by {}",
                    hierarchy::KIND,
                    hierarchy::KEY_ID,
                    k.version,
                    k.wrapped_by.as_deref().unwrap_or("-")
                )?;
            }
            Ok(())
        }
        K::Transit => Err(CliError::Operation(
            "create the key in Vault/OpenBao itself: `bao write -f transit/keys/NAME` \
             (type aes256-gcm96), then name it in keys.transit.key"
                .into(),
        )
        .into()),
        _ => Err(CliError::Operation(
            "create the key in AWS KMS itself (a symmetric ENCRYPT_DECRYPT key), then name it \
             in keys.aws_kms.key_id"
                .into(),
        )
        .into()),
    }
}

/// How long a keyring version must have been decrypt-only before `keys retire` counts what
/// still uses it: the time servers and operator commands take to reload the keyring (a
/// second), and a put's seal-to-commit, with room to spare. (Whatever lands later still
/// shows in the full scan after the erase.)
const RETIRE_SETTLE: time::Duration = time::Duration::seconds(5);

/// Active KEK and the KEKs in use, with counts, for a remote provider.
async fn remote_list(config: Config, json: bool) -> Result<(), Failure> {
    let backends = strongroom_server::Backends::open_existing(&config).await?;
    let active = backends.keyring.active_kek().map_err(ServerError::from);
    let counts = backends.store.count_versions_by_kek().await;
    backends.close().await;
    let active = active?;
    let counts =
        counts.map_err(|e| CliError::Operation(format!("counting versions by KEK: {e}")))?;
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let is_active = |p: &str, k: &str, v: u32| {
        p == active.provider && k == active.key_id && v == active.version
    };
    if !counts
        .iter()
        .any(|(k, _)| is_active(&k.provider, &k.key_id, k.version))
    {
        rows.push(
            serde_json::json!({"provider": active.provider, "key_id": active.key_id,
            "version": active.version, "state": "active", "credential_versions": 0}),
        );
    }
    for (k, n) in &counts {
        let state = if is_active(&k.provider, &k.key_id, k.version) {
            "active"
        } else if k.provider != active.provider {
            OTHER_PROVIDER
        } else {
            "in-use"
        };
        rows.push(
            serde_json::json!({"provider": k.provider, "key_id": k.key_id,
            "version": k.version, "state": state, "credential_versions": n}),
        );
    }
    print_kek_rows(&rows, json)
}

/// The `keys list` state of versions sealed by a key provider this configuration does not
/// use: they answer 503 until moved (`rewrap --to-config`).
const OTHER_PROVIDER: &str = "other-provider";

/// The `state` of a `keys list --json` row for a keyring version the file lacks.
const NOT_IN_THIS_FILE: &str = "not-in-this-file";

fn other_provider_row((k, n): &(KekRef, u64)) -> serde_json::Value {
    serde_json::json!({
        "provider": k.provider, "key_id": k.key_id, "version": k.version,
        "state": OTHER_PROVIDER, "credential_versions": n,
    })
}

fn other_provider_line(k: &KekRef, n: u64) -> String {
    format!(
        "{}:{}:v{}: {} sealed by another key provider, which this configuration cannot open \
         (move them with `strongroom rewrap --config OLD.toml --to-config THIS.toml`)",
        k.provider,
        k.key_id,
        k.version,
        active_versions(n)
    )
}

/// "1 active credential version", "2 active credential versions".
pub(super) fn active_versions(n: u64) -> String {
    format!(
        "{n} active credential version{}",
        if n == 1 { "" } else { "s" }
    )
}

/// Prints `keys list` rows of a remote provider or the KEK ring: JSON, or one line each.
fn print_kek_rows(rows: &[serde_json::Value], json: bool) -> Result<(), Failure> {
    if json {
        let text = serde_json::to_string_pretty(rows)
            .map_err(|e| CliError::Usage(format!("cannot encode JSON: {e}")))?;
        outln!("{text}")?;
        return Ok(());
    }
    for r in rows {
        outln!(
            "{}:{}:v{}  {:<12}  {} credential versions{}",
            r["provider"].as_str().unwrap_or_default(),
            r["key_id"].as_str().unwrap_or_default(),
            r["version"],
            r["state"].as_str().unwrap_or_default(),
            r["credential_versions"],
            r["wrapped_by"]
                .as_str()
                .map(|w| format!("  (wrapped by {w})"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// A remote KEK version is retired in the provider itself; this checks it is unused.
async fn remote_retire(config: Config, version: u32) -> Result<(), Failure> {
    let backends = strongroom_server::Backends::open_existing(&config).await?;
    let active = backends.keyring.active_kek().map_err(ServerError::from);
    let counts = backends.store.count_versions_by_kek().await;
    backends.close().await;
    let active = active?;
    let kek = KekRef::new(active.provider.clone(), active.key_id.clone(), version);
    if version == active.version {
        return Err(active_refusal(&kek));
    }
    let in_use: u64 = counts
        .map_err(|e| CliError::Operation(format!("counting versions by KEK: {e}")))?
        .into_iter()
        .filter(|(k, _)| *k == kek)
        .map(|(_, n)| n)
        .sum();
    if in_use > 0 {
        return Err(CliError::Operation(format!(
            "refusing to retire key {} version {version}: {} still {} it; run `strongroom \
             rewrap` first, then retire again",
            kek.key_id,
            active_versions(in_use),
            if in_use == 1 { "uses" } else { "use" }
        ))
        .into());
    }
    outln!(
        "no credential version uses {}:{}:v{version}; retire it in the provider itself \
         (Transit: raise min_decryption_version; PKCS#11: destroy the token key; AWS KMS: \
         disable or schedule deletion of an unused key)",
        kek.provider,
        kek.key_id
    )?;
    Ok(())
}

async fn remote_rotate(config: Config) -> Result<(), Failure> {
    use strongroom_server::config::KeyProviderKind as K;
    // The store first: the rotation is audited there, and a configuration that names no
    // existing store is refused before the provider changes anything.
    let backends = strongroom_server::Backends::open_existing(&config).await?;
    audit_rotation_start(&backends).await;
    let rotated: Result<_, Failure> = async {
        let kek = match config.keys.provider {
            K::Pkcs11 => {
                strongroom_keys::Pkcs11Provider::connect(strongroom_server::pkcs11_config(&config)?)
                    .await
                    .map_err(ServerError::from)?
                    .rotate()
                    .await
            }
            K::Transit => {
                strongroom_keys::TransitProvider::connect(strongroom_server::transit_config(
                    &config,
                )?)
                .await
                .map_err(ServerError::from)?
                .rotate()
                .await
            }
            _ => {
                return Err(CliError::Operation(
                    "AWS KMS rotates a key's material itself (enable automatic rotation on the \
                     key); to move to another KMS key, name it in a second configuration and \
                     run `strongroom rewrap --to-config`"
                        .into(),
                )
                .into())
            }
        };
        Ok(kek.map_err(ServerError::from)?)
    }
    .await;
    audit_rotation(backends, &rotated, |k| k.version).await;
    outln!(
        "{} is now active; run `strongroom rewrap` to move stored data keys to it",
        rotated?
    )?;
    Ok(())
}

/// Records that a `keys rotate` starts (outcome `started`), before anything changes, as a
/// rotation through the API is. A log that does not take it is a warning, not a refusal, as
/// for `rewrap`: moving off a compromised key must not wait for the log to be repaired.
async fn audit_rotation_start(backends: &strongroom_server::Backends) {
    super::rewrap::audit_action(backends, "keys.rotate", "started", None, None).await;
}

/// Records how a `keys rotate` ended (with the version it made), then closes the store.
async fn audit_rotation<T>(
    backends: strongroom_server::Backends,
    result: &Result<T, Failure>,
    version: impl Fn(&T) -> u32,
) {
    let (outcome, code, made) = match result {
        Ok(done) => ("ok", None, Some(version(done))),
        Err(_) => ("error", Some("failed"), None),
    };
    super::rewrap::audit_action(&backends, "keys.rotate", outcome, code, made).await;
    backends.close().await;
}

/// Whether `config` puts a remote provider over Strongroom's KEK ring.
fn hierarchy_mode(config: &Config) -> bool {
    config.keys.mode == KeyMode::Hierarchy
        && config.keys.provider != strongroom_server::config::KeyProviderKind::Local
}

fn ring_of(backends: &strongroom_server::Backends) -> Result<Arc<KekHierarchy>, Failure> {
    backends.hierarchy.clone().ok_or_else(|| {
        CliError::Operation("the configuration has no KEK hierarchy (keys.mode)".into()).into()
    })
}

/// `keys rotate` in hierarchy mode: a new Strongroom KEK version wrapped by the provider.
async fn ring_rotate(config: Config, root: bool) -> Result<(), Failure> {
    if root {
        remote_rotate(config.clone()).await?;
    }
    let backends = strongroom_server::Backends::open_existing(&config).await?;
    audit_rotation_start(&backends).await;
    let result = async {
        let ring = ring_of(&backends)?;
        let version = hierarchy::rotate(
            backends.store.as_ref(),
            ring.root().as_ref(),
            &OsRandom,
            OffsetDateTime::now_utc(),
        )
        .await
        .map_err(ServerError::from)?;
        Ok::<_, Failure>((
            version,
            ring.root().active_kek().map_err(ServerError::from)?,
        ))
    }
    .await;
    audit_rotation(backends, &result, |(version, _)| *version).await;
    let (version, root_kek) = result?;
    outln!(
        "{}:{}:v{version} is now active (wrapped by {root_kek}); running servers use it within \
         a second; run `strongroom rewrap` to move stored data keys to it",
        hierarchy::KIND,
        hierarchy::KEY_ID
    )?;
    Ok(())
}

/// `keys list` in hierarchy mode: the ring's versions and, per KEK, the credential versions
/// it wraps (plus any data keys the provider wrapped directly, from strict mode).
async fn ring_list(config: Config, json: bool) -> Result<(), Failure> {
    let backends = strongroom_server::Backends::open_existing(&config).await?;
    let root_kind = ring_of(&backends)?.root().kind().to_owned();
    let ring = hierarchy::list(backends.store.as_ref()).await;
    let counts = backends.store.count_versions_by_kek().await;
    backends.close().await;
    let ring = ring.map_err(ServerError::from)?;
    let counts =
        counts.map_err(|e| CliError::Operation(format!("counting versions by KEK: {e}")))?;
    let count_of = |provider: &str, key_id: &str, version: u32| {
        counts
            .iter()
            .filter(|(k, _)| k.provider == provider && k.key_id == key_id && k.version == version)
            .map(|(_, n)| *n)
            .sum::<u64>()
    };
    let date = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_else(|_| t.to_string());
    let mut rows: Vec<serde_json::Value> = ring
        .iter()
        .map(|k| {
            serde_json::json!({
                "provider": hierarchy::KIND, "key_id": hierarchy::KEY_ID,
                "version": k.version, "state": k.state.as_str(),
                "created_at": date(k.created_at), "state_changed_at": date(k.state_changed_at),
                "wrapped_by": k.wrapped_by,
                "credential_versions": count_of(hierarchy::KIND, hierarchy::KEY_ID, k.version),
            })
        })
        .collect();
    for (k, n) in counts.iter().filter(|(k, _)| k.provider != hierarchy::KIND) {
        // Sealed by the root provider itself (before the hierarchy) opens; by another not.
        let state = if k.provider == root_kind {
            "direct"
        } else {
            OTHER_PROVIDER
        };
        rows.push(serde_json::json!({
            "provider": k.provider, "key_id": k.key_id, "version": k.version,
            "state": state, "credential_versions": n,
        }));
    }
    print_kek_rows(&rows, json)
}

/// `keys retire` in hierarchy mode: refuses while any credential version uses the KEK,
/// erases it from the ring, then scans.
async fn ring_retire(config: Config, version: u32) -> Result<(), Failure> {
    let backends = strongroom_server::Backends::open_existing(&config).await?;
    let kek = KekRef::new(
        hierarchy::KIND.to_owned(),
        hierarchy::KEY_ID.to_owned(),
        version,
    );
    let store = backends.store.clone();
    let active = match hierarchy::list(store.as_ref()).await {
        Ok(ring) => ring
            .iter()
            .any(|k| k.version == version && k.state == KekState::Active),
        Err(e) => {
            backends.close().await;
            return Err(ServerError::from(e).into());
        }
    };
    retire_audited(backends, &kek, active, async || {
        hierarchy::retire(store.as_ref(), version, OffsetDateTime::now_utc())
            .await
            .map_err(|e| ServerError::from(e).into())
    })
    .await
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?
        .block_on(f)
}

/// Refuses to rotate a keyring file that is not the store's, or not all of it, before
/// either changes:
/// * another vault's (`--keyring` or `STRONGROOM_KEYRING` naming it): the store's credential
///   versions are under another key id, or its audit head key does not open with it.
///   Rotated, that file would change while the store's own key stayed as it was, the
///   rotation reported done;
/// * a restored older copy, lacking versions the store already uses or an earlier rotation
///   made (recorded in the store): its rotation would make a second version of that number,
///   with other material, and a server would seal under it what no good copy opens.
async fn refuse_a_keyring_not_the_stores(
    backends: &strongroom_server::Backends,
    path: &std::path::Path,
) -> Result<(), Failure> {
    let ring = LocalKeyring::open(path)?;
    let counts = backends
        .store
        .count_versions_by_kek()
        .await
        .map_err(|e| CliError::Operation(format!("counting versions by KEK: {e}")))?;
    let local: Vec<&KekRef> = counts
        .iter()
        .filter(|(k, n)| *n > 0 && k.provider == local::KIND)
        .map(|(k, _)| k)
        .collect();
    let refuse = |why: String| -> Failure {
        CliError::Operation(format!(
            "refusing to rotate {}: {why}. Is it this store's keyring? --keyring and \
             STRONGROOM_KEYRING name the file to rotate",
            path.display()
        ))
        .into()
    };
    if !local.is_empty() && !local.iter().any(|k| k.key_id == ring.key_id()) {
        let ids: std::collections::BTreeSet<&str> =
            local.iter().map(|k| k.key_id.as_str()).collect();
        return Err(refuse(format!(
            "the store's credential versions are under key {}, and this keyring is key {}",
            ids.into_iter().collect::<Vec<_>>().join(", "),
            ring.key_id()
        )));
    }
    let newest = ring.list().iter().map(|k| k.version).max().unwrap_or(0);
    let missing = local
        .iter()
        .filter(|k| k.key_id == ring.key_id() && k.version > newest)
        .map(|k| k.version)
        .max();
    // The versions in use say nothing of a version made since and not used yet: the store
    // also keeps the newest version its rotations made.
    let recorded =
        strongroom_core::keyring_record::newest_recorded(backends.store.as_ref(), ring.key_id())
            .await
            .map_err(|e| {
                CliError::Operation(format!("reading the keyring's newest version: {e}"))
            })?;
    if let Some(version) = missing {
        return Err(CliError::Operation(format!(
            "this store uses version {version} of key {} (credential versions are sealed under \
             it), which {} does not have (a restored older copy?): restore the newest keyring \
             file instead; rotating this one would make another version {} with other material",
            ring.key_id(),
            path.display(),
            newest + 1
        ))
        .into());
    }
    if let Some(r) = recorded {
        ring.require_version(r.version, r.fingerprint);
    }
    if let Some(behind) = ring.left_behind() {
        return Err(CliError::Operation(format!(
            "refusing to rotate {}: it {behind}; restore the newest keyring file instead \
             (rotating this one would make a version {} with other material than the one in use)",
            path.display(),
            newest + 1
        ))
        .into());
    }
    strongroom_core::audit::load_head_key(backends.store.as_ref(), &ring)
        .await
        .map_err(|e| refuse(format!("it does not open the store's audit head key ({e})")))?;
    Ok(())
}

/// `keys record`: the store's record of the keyring's rotations against the file at `path`;
/// with `set`, the record made to name the file's newest version.
async fn keyring_record(
    location: &KeyringLocation,
    path: &std::path::Path,
    set: bool,
) -> Result<(), Failure> {
    use strongroom_core::keyring_record::{newest_recorded, replace};
    let short = |fp: [u8; 32]| hex::encode(&fp[..8]);
    let ring = LocalKeyring::open(path)?;
    let newest = ring
        .active_kek()
        .map_err(|e| CliError::Operation(e.to_string()))?;
    let fingerprint = ring.fingerprint(newest.version).ok_or_else(|| {
        CliError::Operation(format!(
            "{} holds no material for its version {}",
            path.display(),
            newest.version
        ))
    })?;
    let backends = location.operator_target().open_existing().await?;
    let done = async {
        let recorded = match newest_recorded(backends.store.as_ref(), ring.key_id()).await {
            Ok(r) => Ok(r),
            Err(e @ strongroom_store::StoreError::Corrupt { .. }) => Err(e.to_string()),
            Err(e) => {
                return Err(Failure::from(CliError::Operation(format!(
                    "reading the record: {e}"
                ))))
            }
        };
        let said = match &recorded {
            Ok(Some(r)) => format!(
                "version {} (material {})",
                r.version,
                r.fingerprint.map_or("not recorded".to_owned(), short)
            ),
            Ok(None) => "none (no rotation recorded yet)".to_owned(),
            Err(why) => format!("does not read: {why}"),
        };
        outln!("the store's record of key {}: {said}", ring.key_id())?;
        outln!(
            "{}: newest version {} (material {})",
            path.display(),
            newest.version,
            short(fingerprint)
        )?;
        let same = matches!(&recorded, Ok(Some(r))
            if r.version == newest.version && r.fingerprint == Some(fingerprint));
        if !set {
            match &recorded {
                Ok(Some(r)) => {
                    ring.require_version(r.version, r.fingerprint);
                    match ring.left_behind() {
                        Some(behind) => outln!("this file {behind}: it seals nothing new")?,
                        None if same => outln!("this file holds it")?,
                        None => outln!("this file holds it, and newer versions")?,
                    }
                }
                Ok(None) => outln!("nothing to hold this file to")?,
                Err(_) => outln!(
                    "no keyring file seals anything new until the record reads: \
                     `strongroom keys record --set-from-this-file` with the newest keyring file"
                )?,
            }
            return Ok(());
        }
        if same {
            outln!("the record already names this file's newest version: nothing changed")?;
            return Ok(());
        }
        replace(
            backends.store.as_ref(),
            ring.key_id(),
            newest.version,
            fingerprint,
        )
        .await
        .map_err(|e| CliError::Operation(format!("setting the record: {e}")))?;
        super::rewrap::audit_action(&backends, "keys.record", "ok", None, Some(newest.version))
            .await;
        outln!(
            "recorded version {} of key {} from {}: hosts whose keyring file is not this one's \
             newest seal nothing new until it is copied to them",
            newest.version,
            ring.key_id(),
            path.display()
        )?;
        Ok(())
    }
    .await;
    backends.close().await;
    done
}

async fn kek_counts(target: OperatorTarget) -> Result<Vec<(KekRef, u64)>, Failure> {
    let config = target.load()?;
    let store = strongroom_server::Backends::open_existing(&config).await?;
    let counts = store.store.count_versions_by_kek().await;
    store.close().await;
    counts.map_err(|e| CliError::Operation(format!("counting versions by KEK: {e}")).into())
}

async fn retire(
    location: &KeyringLocation,
    path: &std::path::Path,
    kek: KekRef,
    active: bool,
    now: OffsetDateTime,
) -> Result<(), Failure> {
    let backends = location.operator_target().open_existing().await?;
    retire_audited(backends, &kek, active, async || {
        local::retire(path, kek.version, now)?;
        Ok(())
    })
    .await
}

/// [`retire_checked`], recorded in the audit log (`keys.retire`), then closes the backends.
async fn retire_audited(
    backends: strongroom_server::Backends,
    kek: &KekRef,
    active: bool,
    erase: impl AsyncFnOnce() -> Result<(), Failure>,
) -> Result<(), Failure> {
    let result = retire_checked(&backends, kek, active, erase).await;
    let (outcome, code) = match &result {
        Ok(()) => ("ok", None),
        Err(_) => ("error", Some("refused")),
    };
    super::rewrap::audit_action(&backends, "keys.retire", outcome, code, Some(kek.version)).await;
    backends.close().await;
    result
}

/// Retires `kek` with `erase` once no active credential version uses it, then confirms with
/// a full scan. The `active` version is never retired.
async fn retire_checked(
    backends: &strongroom_server::Backends,
    kek: &KekRef,
    active: bool,
    erase: impl AsyncFnOnce() -> Result<(), Failure>,
) -> Result<(), Failure> {
    if active {
        return Err(active_refusal(kek));
    }
    let store = &backends.store;
    let runtime = |e: strongroom_store::StoreError| CliError::Operation(e.to_string());
    let in_use: u64 = store
        .count_versions_by_kek()
        .await
        .map_err(runtime)?
        .into_iter()
        .filter(|(k, _)| k == kek)
        .map(|(_, n)| n)
        .sum();
    if in_use > 0 {
        return Err(CliError::Operation(format!(
            "refusing to retire key {} version {}: {} still {} it; run `strongroom rewrap` first (it moves them to the active version), then retire again",
            kek.key_id,
            kek.version,
            active_versions(in_use),
            if in_use == 1 { "uses" } else { "use" }
        ))
        .into());
    }
    // The audit head key is wrapped by a KEK as well: make sure it is not under this one.
    strongroom_core::audit::rewrap_head_key(store.as_ref(), backends.keyring.as_ref())
        .await
        .map_err(|e| CliError::Operation(format!("moving the audit head key first: {e}")))?;
    erase().await?;
    // The count above is a snapshot: confirm with a full scan that nothing is left under it.
    let mut left = 0u64;
    let mut cursor = None;
    let filter = KekFilter::Exactly(kek.clone());
    loop {
        let page = store
            .versions_for_rewrap(&filter, cursor.as_ref(), 1000)
            .await
            .map_err(runtime)?;
        left += page.items.len() as u64;
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
    }
    if left > 0 {
        return Err(CliError::Operation(format!(
            "key {} version {} is retired, but a full scan found {left} credential versions still under it (written while retiring, by a server that had not reloaded its keys); they no longer open",
            kek.key_id, kek.version
        ))
        .into());
    }
    outln!(
        "key {} version {} retired: its material is erased; a full scan found 0 credential versions under it",
        kek.key_id, kek.version
    )?;
    Ok(())
}

/// Why the active version is not retired, and the way to get there: rewrap alone would
/// move nothing off it, as it is what rewrap moves data keys to.
fn active_refusal(kek: &KekRef) -> Failure {
    CliError::Operation(format!(
        "refusing to retire key {} version {}: it is the active version, which wraps every new \
         data key, and the active version cannot be retired; run `strongroom keys rotate` \
         first (a new version becomes active), then `strongroom rewrap` (it moves the data \
         keys off version {}), then retire it",
        kek.key_id, kek.version, kek.version
    ))
    .into()
}

/// The `keys list` table, each column as wide as its widest cell (dates carry nanoseconds,
/// key ids vary in length), versions right-aligned.
fn print_table(keys: &[KeyInfo]) -> Result<(), Failure> {
    let date = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_else(|_| t.to_string());
    let header = ["KEY ID", "VERSION", "STATE", "CREATED", "STATE CHANGED"].map(str::to_owned);
    let rows: Vec<[String; 5]> = keys
        .iter()
        .map(|k| {
            [
                k.key_id.clone(),
                k.version.to_string(),
                k.state.as_str().to_owned(),
                date(k.created_at),
                date(k.state_changed_at),
            ]
        })
        .collect();
    let width = |column: usize| {
        std::iter::once(&header)
            .chain(&rows)
            .map(|r| r[column].chars().count())
            .max()
            .unwrap_or(0)
    };
    let (id, version, state, created) = (width(0), width(1), width(2), width(3));
    for [a, b, c, d, e] in std::iter::once(&header).chain(&rows) {
        outln!("{a:<id$}  {b:>version$}  {c:<state$}  {d:<created$}  {e}")?;
    }
    Ok(())
}
