use std::sync::Arc;

use strongroom_crypto::testing::{check_provider, check_rotation};
use strongroom_crypto::{envelope, Binding, OsRandom, SecretBytes};
use time::macros::datetime;

use super::*;

const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

fn fresh() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    generate(&path, T0, &OsRandom).unwrap();
    (dir, path)
}

fn material_of(path: &Path, version: u32) -> Option<String> {
    let model = read_file(path).unwrap();
    let key = model.keys.into_iter().find(|k| k.version == version)?;
    key.material.map(|m| m.to_string())
}

#[test]
fn generate_writes_mode_0600_with_one_active_version() {
    let (_dir, path) = fresh();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let ring = LocalKeyring::open(&path).unwrap();
    let list = ring.list();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].version, list[0].state), (1, KeyState::Active));
    assert!(ring.key_id().starts_with("kr-"));
}

/// `generate` makes the keyring's folder private; every other operation on a keyring whose
/// folder does not exist fails with NotFound and makes nothing.
#[test]
fn only_generate_makes_the_folder_and_makes_it_private() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo").join("keyring.json");
    assert!(matches!(
        rotate(&typo, T0, &OsRandom),
        Err(KeyringError::NotFound(_))
    ));
    assert!(matches!(
        retire(&typo, 1, T0),
        Err(KeyringError::NotFound(_))
    ));
    assert!(
        !dir.path().join("typo").exists(),
        "a failed operation made the folder"
    );

    let path = dir.path().join("new").join("deeper").join("keyring.json");
    generate(&path, T0, &OsRandom).unwrap();
    let mode = fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn generate_refuses_to_overwrite() {
    let (_dir, path) = fresh();
    let before = fs::read(&path).unwrap();
    assert!(matches!(
        generate(&path, T0, &OsRandom),
        Err(KeyringError::AlreadyExists(_))
    ));
    assert_eq!(fs::read(&path).unwrap(), before, "file must be untouched");
}

#[test]
fn refuses_a_keyring_group_or_others_can_read() {
    let (_dir, path) = fresh();
    for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = LocalKeyring::open(&path).unwrap_err();
        assert!(
            matches!(err, KeyringError::InsecurePermissions { .. }),
            "{mode:o}: {err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    LocalKeyring::open(&path).unwrap();
}

#[test]
fn missing_and_malformed_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.json");
    assert!(matches!(
        LocalKeyring::open(&path),
        Err(KeyringError::NotFound(_))
    ));
    let (_d, good) = fresh();
    let secret = material_of(&good, 1).unwrap();
    // Two active versions is invalid, and the message must not echo key material.
    let text = fs::read_to_string(&good).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dup = v["keys"][0].clone();
    let mut dup2 = dup.clone();
    dup2["version"] = 2.into();
    v["keys"] = serde_json::json!([dup, dup2]);
    fs::write(&good, serde_json::to_vec(&v).unwrap()).unwrap();
    fs::set_permissions(&good, fs::Permissions::from_mode(0o600)).unwrap();
    let err = LocalKeyring::open(&good).unwrap_err().to_string();
    assert!(err.contains("exactly one version must be active"), "{err}");
    assert!(!err.contains(&secret));
    // Garbage.
    fs::write(&good, format!("{{\"format\": \"{secret}\"")).unwrap();
    let err = LocalKeyring::open(&good).unwrap_err().to_string();
    assert!(!err.contains(&secret), "{err}");
    // Key material in a field of the wrong type: serde_json's own message would quote it.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["keys"][0]["version"] = secret.clone().into();
    fs::write(&good, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = LocalKeyring::open(&good).unwrap_err().to_string();
    assert!(err.contains("wrong type") && err.contains("line"), "{err}");
    assert!(!err.contains(&secret), "{err}");
}

#[tokio::test]
async fn passes_the_provider_conformance_kit() {
    let (_dir, path) = fresh();
    check_provider(Arc::new(LocalKeyring::open(&path).unwrap())).await;
}

#[tokio::test]
async fn rotation_keeps_old_versions_for_decryption() {
    let (_dir, path) = fresh();
    let ring = Arc::new(LocalKeyring::open(&path).unwrap());
    let (r, p) = (ring.clone(), path.clone());
    check_rotation(ring, || async move {
        rotate(&p, T0, &OsRandom).unwrap();
        r.reload().unwrap();
    })
    .await;
    let states: Vec<_> = LocalKeyring::open(&path)
        .unwrap()
        .list()
        .iter()
        .map(|k| (k.version, k.state))
        .collect();
    assert_eq!(states, [(1, KeyState::DecryptOnly), (2, KeyState::Active)]);
}

/// A data key wrapped by another process under a version rotated in after this keyring was
/// loaded (a `keys rotate` then a `rewrap`, before the server's poll) opens at once: the
/// miss makes the keyring read its file again.
#[tokio::test]
async fn a_version_rotated_in_by_another_process_opens_without_waiting_for_a_reload() {
    let (_dir, path) = fresh();
    let server = LocalKeyring::open(&path).unwrap();
    rotate(&path, T0, &OsRandom).unwrap();
    let operator = LocalKeyring::open(&path).unwrap();
    let kek = operator.active_kek().unwrap();
    assert_eq!(kek.version, 2);
    let key = Key256::generate(&OsRandom).unwrap();
    let wrapped = operator.wrap(&kek, &key, b"aad").await.unwrap();
    let opened = server.unwrap(&wrapped, b"aad").await.unwrap();
    assert_eq!(opened.expose_secret(), key.expose_secret());
    // A version that does not exist is still refused (and reads the file at most once per
    // interval).
    let mut missing = wrapped.clone();
    missing.kek.version = 9;
    assert!(matches!(
        server.unwrap(&missing, b"aad").await,
        Err(UnwrapError::Failed(e)) if e.kind() == ProviderErrorKind::UnknownKek
    ));
}

#[tokio::test]
async fn envelope_round_trip_and_binding_through_the_keyring() {
    let (_dir, path) = fresh();
    let ring = LocalKeyring::open(&path).unwrap();
    let b = Binding::new("alice", "zoom.api-key", 1).unwrap();
    let sealed = envelope::seal(&ring, &b, &SecretBytes::from_slice(b"v"), &OsRandom)
        .await
        .unwrap();
    assert_eq!(
        envelope::open(&ring, &b, &sealed)
            .await
            .unwrap()
            .expose_secret(),
        b"v"
    );
    let other = Binding::new("bob", "zoom.api-key", 1).unwrap();
    assert!(matches!(
        envelope::open(&ring, &other, &sealed).await,
        Err(envelope::EnvelopeError::Decrypt)
    ));
    // Another keyring (other key id) does not claim it.
    let (_dir2, path2) = fresh();
    let stranger = LocalKeyring::open(&path2).unwrap();
    assert!(matches!(
        envelope::open(&stranger, &b, &sealed).await,
        Err(envelope::EnvelopeError::UnknownKek(_))
    ));
}

#[tokio::test]
async fn retire_erases_material_and_refuses_the_active_version() {
    let (_dir, path) = fresh();
    let ring = LocalKeyring::open(&path).unwrap();
    let b = Binding::new("alice", "n", 1).unwrap();
    let sealed = envelope::seal(&ring, &b, &SecretBytes::from_slice(b"v"), &OsRandom)
        .await
        .unwrap();
    assert!(matches!(
        retire(&path, 1, T0),
        Err(KeyringError::InvalidTransition(_))
    ));
    assert!(matches!(
        retire(&path, 9, T0),
        Err(KeyringError::UnknownVersion(9))
    ));
    let old = material_of(&path, 1).unwrap();
    rotate(&path, T0, &OsRandom).unwrap();
    let info = retire(&path, 1, T0).unwrap();
    assert_eq!(info.state, KeyState::Retired);
    assert!(
        !fs::read_to_string(&path).unwrap().contains(&old),
        "retired material must be gone"
    );
    assert!(matches!(
        retire(&path, 1, T0),
        Err(KeyringError::InvalidTransition(_))
    ));
    ring.reload().unwrap();
    match envelope::open(&ring, &b, &sealed).await {
        Err(envelope::EnvelopeError::Provider(e)) => {
            assert_eq!(e.kind(), ProviderErrorKind::KekRetired)
        }
        other => panic!("expected a retired-key error, got {other:?}"),
    }
}

#[test]
fn debug_and_list_never_show_material() {
    let (_dir, path) = fresh();
    let secret = material_of(&path, 1).unwrap();
    let ring = LocalKeyring::open(&path).unwrap();
    let debug = format!("{ring:?}");
    let json = serde_json::to_string(&ring.list()).unwrap();
    for shown in [debug, json] {
        assert!(!shown.contains(&secret), "{shown}");
    }
}

#[test]
fn concurrent_rotations_serialise_on_the_lock() {
    let (_dir, path) = fresh();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let p = path.clone();
            std::thread::spawn(move || rotate(&p, T0, &OsRandom).unwrap().version)
        })
        .collect();
    let mut versions: Vec<u32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..=9).collect::<Vec<_>>(),
        "every rotation got its own version"
    );
    let ring = LocalKeyring::open(&path).unwrap();
    assert_eq!(ring.list().len(), 9);
    assert_eq!(
        ring.list()
            .iter()
            .filter(|k| k.state == KeyState::Active)
            .count(),
        1
    );
}

/// A re-read file must keep every loaded version's material: one flipped bit in the active
/// version (same key id and version) was taken in, so new writes were sealed under a key no
/// good copy holds and every value sealed before failed. Rotation and retirement still load.
#[tokio::test]
async fn a_reload_keeps_the_keys_when_the_file_changes_a_loaded_version() {
    let (_dir, path) = fresh();
    let ring = LocalKeyring::open(&path).unwrap();
    let key = Key256::generate(&OsRandom).unwrap();
    let sealed = ring
        .wrap(&ring.active_kek().unwrap(), &key, b"aad")
        .await
        .unwrap();
    let good = fs::read(&path).unwrap();
    let set_material = |version: u32, material: Option<String>| {
        let mut model = read_file(&path).unwrap();
        for k in &mut model.keys {
            if k.version == version {
                k.material = material.clone().map(Into::into);
            }
        }
        write_file(&path, &model).unwrap();
    };

    // Another 32 bytes for version 1.
    let mut flipped = STANDARD.decode(material_of(&path, 1).unwrap()).unwrap();
    flipped[0] ^= 1;
    set_material(1, Some(STANDARD.encode(&flipped)));
    let e = ring.reload().unwrap_err().to_string();
    assert!(e.contains("version 1's material differs"), "{e}");
    let opened = ring.unwrap(&sealed, b"aad").await.unwrap();
    assert_eq!(opened.expose_secret(), key.expose_secret(), "old keys kept");
    // ... but nothing new is sealed under keys no file holds, and the keyring is not healthy
    // until the file holds them again.
    let e = ring.active_kek().unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
    assert!(e.to_string().contains("no longer holds the keys"), "{e}");
    assert!(ring.health().await.is_err());
    fs::write(&path, &good).unwrap();
    ring.reload().unwrap();
    assert_eq!(ring.active_kek().unwrap().version, 1);
    ring.health().await.unwrap();

    // A version gone from the file.
    rotate(&path, T0, &OsRandom).unwrap();
    ring.reload().unwrap();
    let rotated = fs::read(&path).unwrap();
    let mut model = read_file(&path).unwrap();
    model.keys.retain(|k| k.version != 1);
    write_file(&path, &model).unwrap();
    let e = ring.reload().unwrap_err().to_string();
    assert!(e.contains("version 1 is gone"), "{e}");
    assert!(ring.active_kek().is_err());

    // A restored older copy rotated again makes another version 2: refused as well.
    fs::write(&path, &good).unwrap();
    rotate(&path, T0, &OsRandom).unwrap();
    let e = ring.reload().unwrap_err().to_string();
    assert!(e.contains("version 2's material differs"), "{e}");

    // A file gone, or not a keyring any more: nothing new is sealed until it is back.
    fs::write(&path, &rotated).unwrap();
    ring.reload().unwrap();
    fs::remove_file(&path).unwrap();
    let e = ring.reload().unwrap_err().to_string();
    assert!(e.contains("cannot be loaded"), "{e}");
    assert!(ring.active_kek().is_err());
    assert!(ring.health().await.is_err());
    let private = |bytes: &[u8]| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    };
    private(b"{ not json");
    let e = ring.reload().unwrap_err().to_string();
    // Said once, not "keyring X is not a valid keyring: ...: keyring X is not a valid ...".
    assert_eq!(e.matches("is not a valid keyring").count(), 1, "{e}");
    assert!(ring.active_kek().is_err());
    // JSON, but not a keyring: material that is not base64 (after a good reload).
    private(&rotated);
    ring.reload().unwrap();
    let mut damaged = read_file(&path).unwrap();
    for k in &mut damaged.keys {
        if k.version == 1 {
            k.material = Some("not base64!".to_owned().into());
        }
    }
    write_file(&path, &damaged).unwrap();
    ring.reload().unwrap_err();
    assert!(
        ring.active_kek().is_err(),
        "a damaged entry must stop new writes"
    );
    private(&rotated);
    ring.reload().unwrap();
    assert_eq!(ring.active_kek().unwrap().version, 2);

    // Retiring version 1 (its material erased) loads; then bringing it back does not.
    fs::write(&path, &rotated).unwrap();
    ring.reload().unwrap();
    retire(&path, 1, T0).unwrap();
    ring.reload().unwrap();
    let mut model = read_file(&path).unwrap();
    for k in &mut model.keys {
        if k.version == 1 {
            k.state = KeyState::DecryptOnly;
        }
    }
    write_file(&path, &model).unwrap();
    set_material(1, Some(STANDARD.encode(&flipped)));
    let e = ring.reload().unwrap_err().to_string();
    assert!(e.contains("was retired and has material again"), "{e}");
}

/// A keyring told that a rotation made a version its file lacks (a copy left behind), or
/// that holds other material under that version (two copies rotated at once), seals nothing
/// new, and still opens what it sealed; once the file holds that version with that material
/// it seals under it. A lower version changes nothing.
#[tokio::test]
async fn a_copy_left_behind_by_a_rotation_seals_nothing_new() {
    let (dir, path) = fresh();
    let ring = LocalKeyring::open(&path).unwrap();
    let v1 = ring.active_kek().unwrap();
    let key = Key256::generate(&OsRandom).unwrap();
    let wrapped = ring.wrap(&v1, &key, b"aad").await.unwrap();
    ring.require_version(1, ring.fingerprint(1));
    assert_eq!(ring.left_behind(), None);
    ring.require_version(2, None);
    ring.require_version(1, None);
    assert_eq!(ring.left_behind(), Some(LeftBehind::Lacks(2)));
    let e = ring.active_kek().unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
    assert!(e.to_string().contains("lacks version 2"), "{e}");
    assert!(ring.health().await.is_err());
    let back = ring.unwrap(&wrapped, b"aad").await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());

    // Another copy rotated to its own version 2 at the same moment, and recorded first.
    let other = dir.path().join("other.json");
    std::fs::copy(&path, &other).unwrap();
    rotate(&other, T0, &OsRandom).unwrap();
    let recorded = LocalKeyring::open(&other).unwrap().fingerprint(2);
    ring.require_version(2, recorded);
    rotate(&path, T0, &OsRandom).unwrap();
    ring.reload().unwrap();
    assert_eq!(ring.left_behind(), Some(LeftBehind::OtherMaterial(2)));
    let e = ring.active_kek().unwrap_err();
    assert!(e.to_string().contains("holds another version 2"), "{e}");

    // A record that does not read seals nothing; one that reads again lower than before
    // (written by whoever could write the database) does not lift the floor.
    ring.record_unreadable();
    assert_eq!(ring.left_behind(), Some(LeftBehind::RecordUnreadable));
    ring.require_version(1, None);
    assert_eq!(ring.left_behind(), Some(LeftBehind::OtherMaterial(2)));

    // The recorded file copied in: sealing again, under version 2.
    std::fs::copy(&other, &path).unwrap();
    let ring = LocalKeyring::open(&path).unwrap();
    ring.require_version(2, recorded);
    assert_eq!(ring.left_behind(), None);
    assert_eq!(ring.active_kek().unwrap().version, 2);
    ring.health().await.unwrap();
}
