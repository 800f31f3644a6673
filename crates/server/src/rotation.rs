//! `POST /v1/keys/rotate` for this server's key provider: what `strongroom keys rotate` does
//! from the command line, done by the running server for an admin.

use std::path::PathBuf;
use std::sync::Arc;

use strongroom_api::{KeyRotation, RotationError};
use strongroom_core::hierarchy::{self, KekHierarchy};
use strongroom_crypto::{KekRef, KeyProvider, OsRandom};
use strongroom_keys::local::LocalKeyring;
use strongroom_store::Store;
use time::OffsetDateTime;

use crate::config::{Config, KeyProviderKind};

/// How this server rotates, by its key configuration.
pub(crate) enum ServerRotation {
    /// The local keyring file: a new version, loaded at once, and recorded in the store
    /// (see [`strongroom_core::keyring_record`]).
    Local {
        path: PathBuf,
        keyring: Arc<LocalKeyring>,
        store: Arc<dyn Store>,
    },
    /// Strongroom's KEK ring under a remote provider (`keys.mode = "hierarchy"`).
    Ring {
        store: Arc<dyn Store>,
        ring: Arc<KekHierarchy>,
    },
    /// The remote provider's own key (strict mode): PKCS#11 or Transit. `provider` is the
    /// one this server seals with, told at once (others see the new version within a second).
    Remote {
        config: Box<Config>,
        provider: Arc<dyn KeyProvider>,
    },
}

#[async_trait::async_trait]
impl KeyRotation for ServerRotation {
    async fn rotate(&self) -> Result<KekRef, RotationError> {
        let failed = |e: &dyn std::fmt::Display| RotationError::Failed(e.to_string());
        match self {
            Self::Local {
                path,
                keyring,
                store,
            } => {
                // A copy left behind would make a second version of a number in use: the
                // store read now, not the watcher's view of a second ago.
                let recorded = strongroom_core::keyring_record::newest_recorded(
                    store.as_ref(),
                    keyring.key_id(),
                )
                .await;
                match recorded {
                    Ok(Some(r)) => keyring.require_version(r.version, r.fingerprint),
                    Ok(None) => keyring.record_absent(),
                    Err(e @ strongroom_store::StoreError::Corrupt { .. }) => {
                        keyring.record_unreadable();
                        return Err(RotationError::Refused(e.to_string()));
                    }
                    Err(e) => return Err(failed(&e)),
                }
                match keyring.left_behind() {
                    None => {}
                    Some(behind @ strongroom_keys::local::LeftBehind::RecordUnreadable) => {
                        return Err(RotationError::Refused(format!(
                            "this server's keyring file {behind}"
                        )))
                    }
                    Some(behind) => {
                        return Err(RotationError::Refused(format!(
                            "this server's keyring file {behind}: copy the newest keyring \
                             file here before rotating"
                        )))
                    }
                }
                let info = match rotate_local_recorded(store.as_ref(), path).await {
                    Ok(info) => info,
                    Err(LocalRotationError::Lost(why)) => {
                        // This server's file is now behind: it stops sealing at once.
                        crate::apply_keyring_record(store.as_ref(), keyring).await;
                        return Err(RotationError::Refused(why));
                    }
                    Err(LocalRotationError::Failed(why)) => return Err(RotationError::Failed(why)),
                };
                // New data keys go under it from the next request on this server (others
                // read the file within a second).
                keyring.reload().map_err(|e| failed(&e))?;
                Ok(KekRef {
                    provider: strongroom_keys::local::KIND.to_owned(),
                    key_id: info.key_id,
                    version: info.version,
                })
            }
            Self::Ring { store, ring } => {
                // `hierarchy::rotate`'s future is not `Send` (rustc cannot prove it for its
                // async closure), so it runs on a blocking thread of this runtime.
                let (store, ring) = (store.clone(), ring.clone());
                let runtime = tokio::runtime::Handle::current();
                let version = tokio::task::spawn_blocking(move || {
                    runtime.block_on(async {
                        let version = hierarchy::rotate(
                            store.as_ref(),
                            ring.root().as_ref(),
                            &OsRandom,
                            OffsetDateTime::now_utc(),
                        )
                        .await?;
                        ring.refresh().await?;
                        Ok::<_, strongroom_crypto::ProviderError>(version)
                    })
                })
                .await
                .map_err(|e| failed(&e))?
                .map_err(|e| failed(&e))?;
                Ok(KekRef {
                    provider: hierarchy::KIND.to_owned(),
                    key_id: hierarchy::KEY_ID.to_owned(),
                    version,
                })
            }
            Self::Remote { config, provider } => {
                let rotated = match config.keys.provider {
                    KeyProviderKind::Pkcs11 => strongroom_keys::Pkcs11Provider::connect(
                        crate::pkcs11_config(config).map_err(|e| failed(&e))?,
                    )
                    .await
                    .map_err(|e| failed(&e))?
                    .rotate()
                    .await
                    .map_err(|e| failed(&e))?,
                    KeyProviderKind::Transit => strongroom_keys::TransitProvider::connect(
                        crate::transit_config(config).map_err(|e| failed(&e))?,
                    )
                    .await
                    .map_err(|e| failed(&e))?
                    .rotate()
                    .await
                    .map_err(|e| failed(&e))?,
                    _ => return Err(unsupported()),
                };
                // Sealing under the new version from the next request; if the lookup fails,
                // the once-a-second watch tries again.
                if let Err(e) = provider.reload_keks().await {
                    tracing::warn!(error = %e, "rotated, but could not load the new key version yet; retrying every second");
                }
                Ok(rotated)
            }
        }
    }
}

/// Why [`rotate_local_recorded`] did not rotate.
#[derive(Debug, thiserror::Error)]
pub enum LocalRotationError {
    /// Another rotation recorded this version (with other material) or a newer one first;
    /// the file is as it was.
    #[error("{0}")]
    Lost(String),
    /// Anything else: the keyring file, or the store (the message says what changed).
    #[error("{0}")]
    Failed(String),
}

/// Rotates the local keyring at `path`, recording the new version in the store
/// ([`strongroom_core::keyring_record`]) before the file is written: the version is made in
/// memory with the file locked ([`strongroom_keys::local::begin_rotation`]), and the first
/// rotation to record a number keeps it, so that one that lost the race leaves its file as
/// it was and no server loads a version no other copy holds. A record that cannot be made
/// refuses the rotation; a file that cannot be written takes the record back. What
/// `strongroom keys rotate` and `POST /v1/keys/rotate` both do.
///
/// # Errors
///
/// See [`LocalRotationError`].
pub async fn rotate_local_recorded(
    store: &dyn Store,
    path: &std::path::Path,
) -> Result<strongroom_keys::local::KeyInfo, LocalRotationError> {
    use strongroom_core::keyring_record::{record_newest, take_back, RecordError};
    let failed = |e: &dyn std::fmt::Display| LocalRotationError::Failed(e.to_string());
    let file = path.to_owned();
    let pending = tokio::task::spawn_blocking(move || {
        strongroom_keys::local::begin_rotation(&file, OffsetDateTime::now_utc(), &OsRandom)
    })
    .await
    .map_err(|e| failed(&e))?
    .map_err(|e| failed(&e))?;
    let (version, fp) = (pending.version(), pending.fingerprint());
    let key_id = pending.key_id().to_owned();
    let previous = match record_newest(store, &key_id, version, fp).await {
        Ok(previous) => previous,
        Err(e @ RecordError::Conflict { .. }) => {
            return Err(LocalRotationError::Lost(format!(
                "{e}; {} is unchanged: copy the newest keyring file from the host whose \
                 rotation was recorded here (servers reading this file seal nothing new until \
                 then)",
                path.display()
            )))
        }
        Err(RecordError::Store(e)) => {
            return Err(failed(&format_args!(
                "the rotation cannot be recorded in the store ({e}); {} is unchanged",
                path.display()
            )))
        }
    };
    let written = tokio::task::spawn_blocking(move || pending.commit())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match written {
        Ok(info) => Ok(info),
        Err(e)
            if take_back(store, &key_id, version, fp, previous)
                .await
                .unwrap_or(false) =>
        {
            Err(failed(&e))
        }
        Err(e) => Err(failed(&format_args!(
            "{e}; version {version} was recorded in the store but {} was not written, and the \
             record could not be taken back: no server seals until it names the version the \
             files hold (`strongroom keys record --set-from-this-file` with the newest file)",
            path.display()
        ))),
    }
}

fn unsupported() -> RotationError {
    RotationError::Unsupported(
        "AWS KMS rotates a key's material itself (enable automatic rotation on the \
                     key); to move to another KMS key, name it in a second configuration and \
                     run `strongroom rewrap --to-config`"
            .into(),
    )
}
