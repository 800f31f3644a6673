//! What the store keeps of a local keyring's rotations: the newest version one made.
//!
//! Every host (and every operator command) reads the keyring from a file of its own. A copy
//! left behind by a rotation (another host's, or a restored older one) goes on sealing
//! under the version it has; once that version is retired, what it sealed is lost. The
//! store is the one place every node and command shares, so each rotation records the
//! version it made there (`keys rotate`, `POST /v1/keys/rotate`): a keyring that lacks it
//! seals nothing new, and `keys rotate` refuses to rotate it into a second version of that
//! number.

use strongroom_store::{Store, StoreError};

/// The `provider_state` key of `key_id`'s newest version.
fn state_key(key_id: &str) -> String {
    format!("keyring/{key_id}/newest-version")
}

fn parse(raw: Option<&[u8]>) -> Option<u32> {
    std::str::from_utf8(raw?).ok()?.parse().ok()
}

/// The newest version of `key_id` a rotation recorded, if any.
///
/// # Errors
///
/// The store's.
pub async fn newest_recorded(store: &dyn Store, key_id: &str) -> Result<Option<u32>, StoreError> {
    let raw = store.get_provider_state(&state_key(key_id)).await?;
    Ok(parse(raw.as_deref()))
}

/// Records `version` as `key_id`'s newest, unless a newer one is recorded already (a
/// compare-and-swap: another rotation may record at the same moment).
///
/// # Errors
///
/// The store's.
pub async fn record_newest(
    store: &dyn Store,
    key_id: &str,
    version: u32,
) -> Result<(), StoreError> {
    let key = state_key(key_id);
    loop {
        let current = store.get_provider_state(&key).await?;
        if parse(current.as_deref()).is_some_and(|v| v >= version) {
            return Ok(());
        }
        let value = version.to_string().into_bytes();
        if store
            .swap_provider_state(&key, current.as_deref(), value)
            .await?
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_newest_version_only_grows() {
        let dir = tempfile::tempdir().unwrap();
        let store = strongroom_store::sqlite::SqliteStore::open_dir(dir.path())
            .await
            .unwrap();
        assert_eq!(newest_recorded(&store, "kr-1").await.unwrap(), None);
        record_newest(&store, "kr-1", 3).await.unwrap();
        record_newest(&store, "kr-1", 2).await.unwrap();
        assert_eq!(newest_recorded(&store, "kr-1").await.unwrap(), Some(3));
        record_newest(&store, "kr-1", 4).await.unwrap();
        assert_eq!(newest_recorded(&store, "kr-1").await.unwrap(), Some(4));
        assert_eq!(newest_recorded(&store, "kr-2").await.unwrap(), None);
    }
}
