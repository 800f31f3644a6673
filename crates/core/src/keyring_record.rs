//! What the store keeps of a local keyring's rotations: the newest version one made, and a
//! fingerprint of its material.
//!
//! Every host (and every operator command) reads the keyring from a file of its own. A copy
//! left behind by a rotation (another host's, or a restored older one) goes on sealing
//! under the version it has; once that version is retired, what it sealed is lost. Two
//! copies rotated at once each make a version of the same number with other material, and
//! what either sealed opens only with its own file. The store is the one place every node
//! and command shares, so each rotation records the version it makes there, with the
//! fingerprint of its material, before it writes its file (`keys rotate`,
//! `POST /v1/keys/rotate`), and the first to record a number keeps it (the others leave
//! their file as it was): a keyring that lacks the version, or holds other material under
//! its number, seals nothing new (`LocalKeyring::require_version` in `strongroom-keys`), and
//! `keys rotate` refuses to rotate it.

use strongroom_store::{Store, StoreError};

/// The newest version a rotation recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The version.
    pub version: u32,
    /// The fingerprint of its material (`LocalKeyring::fingerprint`; none in a record
    /// without one).
    pub fingerprint: Option<[u8; 32]>,
}

/// Why a rotation could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Another rotation recorded this version (with other material) or a newer one first.
    #[error(
        "another rotation recorded version {recorded} first: this keyring file's version \
         {made} is not the one in use"
    )]
    Conflict {
        /// The version this rotation made.
        made: u32,
        /// The version recorded.
        recorded: u32,
    },
    /// The store's error.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The `provider_state` key of `key_id`'s newest version.
fn state_key(key_id: &str) -> String {
    format!("keyring/{key_id}/newest-version")
}

/// `N` or `N:<fingerprint in hex>`; none when there is no record (or an empty one, as
/// [`take_back`] leaves). Anything else was written outside Strongroom (or by a newer
/// version): an error, so that a keyring seals nothing rather than go unchecked.
fn parse(key_id: &str, raw: Option<&[u8]>) -> Result<Option<Recorded>, StoreError> {
    let raw = match raw {
        None | Some([]) => return Ok(None),
        Some(raw) => raw,
    };
    let read = || {
        let text = std::str::from_utf8(raw).ok()?;
        let (version, fingerprint) = match text.split_once(':') {
            Some((v, f)) => {
                let mut fp = [0u8; 32];
                hex::decode_to_slice(f, &mut fp).ok()?;
                (v, Some(fp))
            }
            None => (text, None),
        };
        // Digits only: `+3` or ` 3` is not what Strongroom writes.
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Recorded {
            version: version.parse().ok()?,
            fingerprint,
        })
    };
    read().map(Some).ok_or_else(|| StoreError::Corrupt {
        what: format!(
            "the store's record of key {key_id:?}'s newest version ({}) is not `N:<SHA-256 in \
             hex>`",
            state_key(key_id)
        ),
        version: None,
    })
}

/// The newest version of `key_id` a rotation recorded, if any.
///
/// # Errors
///
/// The store's; [`StoreError::Corrupt`] for a record that does not read.
pub async fn newest_recorded(
    store: &dyn Store,
    key_id: &str,
) -> Result<Option<Recorded>, StoreError> {
    let raw = store.get_provider_state(&state_key(key_id)).await?;
    parse(key_id, raw.as_deref())
}

fn encode(version: u32, fingerprint: [u8; 32]) -> Vec<u8> {
    format!("{version}:{}", hex::encode(fingerprint)).into_bytes()
}

/// Records `version`, whose material has `fingerprint`, as `key_id`'s newest (a
/// compare-and-swap: another rotation may record at the same moment), before the rotation
/// writes its file. Recording the same version and material again is no change. Returns the
/// record it replaced, for [`take_back`].
///
/// # Errors
///
/// [`RecordError::Conflict`] when a newer version is recorded, or this one with other
/// material; the store's error ([`StoreError::Corrupt`] for a record that does not read).
pub async fn record_newest(
    store: &dyn Store,
    key_id: &str,
    version: u32,
    fingerprint: [u8; 32],
) -> Result<Option<Vec<u8>>, RecordError> {
    let key = state_key(key_id);
    loop {
        let current = store.get_provider_state(&key).await?;
        // A record that does not read is not replaced: whichever rotation it stands for
        // would be lost sight of.
        if let Some(r) = parse(key_id, current.as_deref())? {
            let same = r.version == version && r.fingerprint.is_none_or(|f| f == fingerprint);
            if same && r.fingerprint.is_some() {
                return Ok(current);
            }
            if r.version > version || (r.version == version && !same) {
                return Err(RecordError::Conflict {
                    made: version,
                    recorded: r.version,
                });
            }
        }
        if store
            .swap_provider_state(&key, current.as_deref(), encode(version, fingerprint))
            .await?
        {
            return Ok(current);
        }
    }
}

/// Puts back the record `previous` that [`record_newest`] replaced with `version` and
/// `fingerprint`, when the rotation could not write its file after all: only if the record
/// is still that one. Returns whether the record is back as it was.
///
/// # Errors
///
/// The store's.
pub async fn take_back(
    store: &dyn Store,
    key_id: &str,
    version: u32,
    fingerprint: [u8; 32],
    previous: Option<Vec<u8>>,
) -> Result<bool, StoreError> {
    let ours = encode(version, fingerprint);
    if previous.as_deref() == Some(ours.as_slice()) {
        return Ok(true);
    }
    store
        .swap_provider_state(
            &state_key(key_id),
            Some(&ours),
            previous.unwrap_or_default(),
        )
        .await
}

/// Sets the record to `version` with `fingerprint`, whatever it held (one that does not
/// read, or one a failed rotation left naming a version no file holds): an operator's
/// decision (`strongroom keys record --set-from-this-file`), not a rotation's. Returns what
/// it replaced.
///
/// # Errors
///
/// The store's.
pub async fn replace(
    store: &dyn Store,
    key_id: &str,
    version: u32,
    fingerprint: [u8; 32],
) -> Result<Option<Vec<u8>>, StoreError> {
    let key = state_key(key_id);
    loop {
        let current = store.get_provider_state(&key).await?;
        if store
            .swap_provider_state(&key, current.as_deref(), encode(version, fingerprint))
            .await?
        {
            return Ok(current);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_rotation_to_record_a_version_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = strongroom_store::sqlite::SqliteStore::open_dir(dir.path())
            .await
            .unwrap();
        assert_eq!(newest_recorded(&store, "kr-1").await.unwrap(), None);
        record_newest(&store, "kr-1", 3, [3; 32]).await.unwrap();
        // Again, the same: no change.
        record_newest(&store, "kr-1", 3, [3; 32]).await.unwrap();
        let conflict = |e: RecordError| match e {
            RecordError::Conflict { made, recorded } => (made, recorded),
            other => panic!("{other}"),
        };
        // The same number with other material, or an older one: refused.
        assert_eq!(
            conflict(record_newest(&store, "kr-1", 3, [9; 32]).await.unwrap_err()),
            (3, 3)
        );
        assert_eq!(
            conflict(record_newest(&store, "kr-1", 2, [2; 32]).await.unwrap_err()),
            (2, 3)
        );
        assert_eq!(
            newest_recorded(&store, "kr-1").await.unwrap(),
            Some(Recorded {
                version: 3,
                fingerprint: Some([3; 32])
            })
        );
        let previous = record_newest(&store, "kr-1", 4, [4; 32]).await.unwrap();
        let newest = async || newest_recorded(&store, "kr-1").await.unwrap().unwrap();
        assert_eq!(newest().await.version, 4);
        // Its file could not be written: the record it replaced comes back.
        assert!(take_back(&store, "kr-1", 4, [4; 32], previous)
            .await
            .unwrap());
        assert_eq!(newest().await.version, 3);
        // Taking back a record another rotation has replaced since changes nothing.
        record_newest(&store, "kr-1", 4, [5; 32]).await.unwrap();
        assert!(!take_back(&store, "kr-1", 4, [4; 32], None).await.unwrap());
        assert_eq!(newest().await.fingerprint, Some([5; 32]));
        assert_eq!(newest_recorded(&store, "kr-2").await.unwrap(), None);
    }

    /// A record that does not read (written outside Strongroom, or by a newer version) is an
    /// error, not "no record": a copy left behind would otherwise go on sealing. No rotation
    /// replaces it.
    #[tokio::test]
    async fn a_record_that_does_not_read_is_an_error_not_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = strongroom_store::sqlite::SqliteStore::open_dir(dir.path())
            .await
            .unwrap();
        let fp = hex::encode([7u8; 32]);
        for bad in [
            "x".to_owned(),
            "3:".to_owned(),
            format!("3:{}", &fp[..62]),
            format!("3:{fp}:more"),
            format!("+3:{fp}"),
            format!(":{fp}"),
            "99999999999".to_owned(),
        ] {
            let key = state_key("kr-1");
            let now = store.get_provider_state(&key).await.unwrap();
            assert!(store
                .swap_provider_state(&key, now.as_deref(), bad.clone().into_bytes())
                .await
                .unwrap());
            let e = newest_recorded(&store, "kr-1").await.unwrap_err();
            assert!(
                matches!(&e, StoreError::Corrupt { what, .. } if what.contains("keyring/kr-1/newest-version")),
                "{bad}: {e}"
            );
            let e = record_newest(&store, "kr-1", 1_000, [1; 32])
                .await
                .unwrap_err();
            assert!(
                matches!(e, RecordError::Store(StoreError::Corrupt { .. })),
                "{bad}: {e}"
            );
            assert_eq!(
                store.get_provider_state(&key).await.unwrap().unwrap(),
                bad.as_bytes()
            );
        }
        // An operator sets it from a keyring file: it reads again.
        let replaced = replace(&store, "kr-1", 3, [7; 32]).await.unwrap();
        assert_eq!(replaced.as_deref(), Some(b"99999999999".as_slice()));
        assert_eq!(
            newest_recorded(&store, "kr-1").await.unwrap(),
            Some(Recorded {
                version: 3,
                fingerprint: Some([7; 32])
            })
        );
        // Empty, as a rotation taken back leaves it: no record.
        let key = state_key("kr-1");
        let now = store.get_provider_state(&key).await.unwrap();
        assert!(store
            .swap_provider_state(&key, now.as_deref(), Vec::new())
            .await
            .unwrap());
        assert_eq!(newest_recorded(&store, "kr-1").await.unwrap(), None);
        assert_eq!(
            newest_recorded(&store, "kr-3").await.unwrap(),
            None,
            "no record at all"
        );
    }
}
