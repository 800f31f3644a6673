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
                .await
                .map_err(|e| failed(&e))?;
                if let Some(r) = recorded {
                    keyring.require_version(r.version, r.fingerprint);
                }
                if let Some(behind) = keyring.left_behind() {
                    return Err(RotationError::Refused(format!(
                        "this server's keyring file {behind}: copy the newest keyring file \
                         here before rotating"
                    )));
                }
                let file = path.clone();
                let (info, made) = tokio::task::spawn_blocking(move || {
                    let info = strongroom_keys::local::rotate(
                        &file,
                        OffsetDateTime::now_utc(),
                        &OsRandom,
                    )?;
                    // The fingerprint of what was just written, for the store's record.
                    let made = LocalKeyring::open(&file)?.fingerprint(info.version);
                    Ok::<_, strongroom_keys::local::KeyringError>((info, made))
                })
                .await
                .map_err(|e| failed(&e))?
                .map_err(|e| failed(&e))?;
                // First recorded, first kept: another copy rotated at the same moment may have
                // made this number with other material.
                use strongroom_core::keyring_record::{record_newest, RecordError};
                let recorded = match made {
                    Some(fp) => record_newest(store.as_ref(), &info.key_id, info.version, fp)
                        .await
                        .map_err(|e| match e {
                            RecordError::Conflict { .. } => RotationError::Refused(format!(
                                "the keyring file was rotated, but {e}: this server seals \
                                 nothing new until the newest keyring file is copied here"
                            )),
                            RecordError::Store(e) => failed(&e),
                        }),
                    None => Err(failed(&"the new version's material could not be read back")),
                };
                match recorded {
                    Ok(()) => {}
                    Err(refused @ RotationError::Refused(_)) => {
                        // The file now holds the losing version: this server stops sealing
                        // before its watcher would notice.
                        if let Ok(Some(r)) = strongroom_core::keyring_record::newest_recorded(
                            store.as_ref(),
                            keyring.key_id(),
                        )
                        .await
                        {
                            keyring.require_version(r.version, r.fingerprint);
                        }
                        return Err(refused);
                    }
                    // Done, the rotation stands: said in the log.
                    Err(e) => {
                        tracing::warn!(error = %e, "the rotation is not recorded in the store")
                    }
                }
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

fn unsupported() -> RotationError {
    RotationError::Unsupported(
        "AWS KMS rotates a key's material itself (enable automatic rotation on the \
                     key); to move to another KMS key, name it in a second configuration and \
                     run `strongroom rewrap --to-config`"
            .into(),
    )
}
