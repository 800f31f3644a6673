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
                // Made in memory, the file locked; recorded in the store first (the first
                // rotation to record a number keeps it), and written only then, so that a
                // version that lost the race is never where a server could load it.
                use strongroom_core::keyring_record::{record_newest, take_back, RecordError};
                let file = path.clone();
                let pending = tokio::task::spawn_blocking(move || {
                    strongroom_keys::local::begin_rotation(
                        &file,
                        OffsetDateTime::now_utc(),
                        &OsRandom,
                    )
                })
                .await
                .map_err(|e| failed(&e))?
                .map_err(|e| failed(&e))?;
                let (version, fp) = (pending.version(), pending.fingerprint());
                let previous =
                    match record_newest(store.as_ref(), pending.key_id(), version, fp).await {
                        Ok(previous) => previous,
                        Err(e @ RecordError::Conflict { .. }) => {
                            drop(pending);
                            // This server's file is now behind: it stops sealing at once.
                            if let Ok(Some(r)) = strongroom_core::keyring_record::newest_recorded(
                                store.as_ref(),
                                keyring.key_id(),
                            )
                            .await
                            {
                                keyring.require_version(r.version, r.fingerprint);
                            }
                            return Err(RotationError::Refused(format!(
                                "{e}; this server's keyring file is unchanged, and seals nothing \
                             new until the newest keyring file is copied here"
                            )));
                        }
                        Err(RecordError::Store(e)) => {
                            return Err(failed(&format_args!(
                            "the rotation cannot be recorded in the store ({e}); nothing changed"
                        )))
                        }
                    };
                let key_id = pending.key_id().to_owned();
                let written = tokio::task::spawn_blocking(move || pending.commit())
                    .await
                    .map_err(|e| failed(&e))
                    .and_then(|r| r.map_err(|e| failed(&e)));
                let info = match written {
                    Ok(info) => info,
                    Err(e) => {
                        if !take_back(store.as_ref(), &key_id, version, fp, previous)
                            .await
                            .unwrap_or(false)
                        {
                            tracing::error!(
                                version,
                                key_id = %key_id,
                                "the rotation was recorded but its keyring file not written, \
                                 and the record could not be taken back: no server seals until \
                                 the store's provider_state row keyring/<key id>/newest-version \
                                 is set back to the version the files hold"
                            );
                        }
                        return Err(e);
                    }
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

fn unsupported() -> RotationError {
    RotationError::Unsupported(
        "AWS KMS rotates a key's material itself (enable automatic rotation on the \
                     key); to move to another KMS key, name it in a second configuration and \
                     run `strongroom rewrap --to-config`"
            .into(),
    )
}
