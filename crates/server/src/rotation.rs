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
                // A copy left behind would make a second version of a number in use.
                if let Some(version) = keyring.missing_version() {
                    return Err(RotationError::Refused(format!(
                        "this server's keyring file lacks version {version}, which a rotation \
                         made: copy the newest keyring file here before rotating"
                    )));
                }
                let path = path.clone();
                let info = tokio::task::spawn_blocking(move || {
                    strongroom_keys::local::rotate(&path, OffsetDateTime::now_utc(), &OsRandom)
                })
                .await
                .map_err(|e| failed(&e))?
                .map_err(|e| failed(&e))?;
                // New data keys go under it from the next request on this server (others
                // read the file within a second).
                keyring.reload().map_err(|e| failed(&e))?;
                // Copies of the file on other hosts stop sealing once they see it. Done, the
                // rotation stands even when the record fails: said in the log.
                if let Err(e) = strongroom_core::keyring_record::record_newest(
                    store.as_ref(),
                    &info.key_id,
                    info.version,
                )
                .await
                {
                    tracing::warn!(error = %e, "the rotation is not recorded in the store");
                }
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
