//! `strongroom backup` end to end: taken while the server runs and writes, and `strongroom
//! restore` of it once the server stopped, after which the audit log verifies, every value
//! written before reveals, and what was written after is gone (kept in the replaced copy).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::dev::start_dev;
use common::strongroom;
use serde_json::json;
use strongroom_server::config::{Config, Overrides};
use strongroom_server::Backends;

fn run(args: &[&str], extra: &[&std::ffi::OsStr]) -> std::process::Output {
    strongroom()
        .args(args)
        .args(extra)
        .env_remove("STRONGROOM_DATA_DIR")
        .env_remove("STRONGROOM_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn a_backup_taken_while_the_server_writes_restores_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_dev(&data, &[]);
    let alice = server.export("ALICE");
    let client = server.client(&data);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let put = move |name: String, value: String| {
        let (client, alice) = (client.clone(), alice.clone());
        async move {
            let r = client
                .json(
                    "PUT",
                    &format!("/v1/me/credentials/{name}"),
                    Some(&alice),
                    &json!({ "value": value }),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{}", r.text());
        }
    };
    rt.block_on(async {
        for i in 0..30 {
            put(format!("cred-{i}"), format!("value-{i}")).await;
        }
    });
    // Writes go on while the copy is taken.
    let writer = rt.spawn({
        let put = put.clone();
        async move {
            for i in 0..200 {
                put(format!("during-{i}"), format!("d-{i}")).await;
            }
        }
    });
    let output = tmp.path().join("backup.db");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    let out = run(&["backup", "--output"], &[output.as_os_str(), dd[0], dd[1]]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("and checked"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no key"));
    assert_eq!(
        std::fs::metadata(&output).unwrap().permissions().mode() & 0o777,
        0o600
    );
    rt.block_on(writer).unwrap();
    rt.block_on(put("after-backup".into(), "later".into()));
    // Not while the server has the database open: nothing changes.
    let busy = run(&["restore", "--from"], &[output.as_os_str(), dd[0], dd[1]]);
    assert_eq!(busy.status.code(), Some(1));
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("in use: stop the server"), "{err}");
    let kept_files = || {
        std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("before-restore"))
            .collect::<Vec<_>>()
    };
    assert!(kept_files().is_empty());
    // Never over an existing file.
    let again = run(&["backup", "--output"], &[output.as_os_str(), dd[0], dd[1]]);
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already exists") && err.contains(output.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(server.terminate().code(), Some(0));
    // The backup itself is in the audit log.
    let export = run(&["audit", "export"], &dd);
    assert!(String::from_utf8_lossy(&export.stdout).contains("\"backup\""));

    // Protective changes since the backup: a dry run names what the restore undoes, and
    // changes nothing.
    rt.block_on(async {
        let config = common::operator_config(None, &data);
        let backends = Backends::open_existing(&config).await.unwrap();
        let vault = backends.vault();
        vault.set_enabled("alice", "cred-0", false).await.unwrap();
        vault.destroy_version("alice", "cred-1", 1).await.unwrap();
        backends.close().await;
    });
    let db_before = std::fs::read(data.join("strongroom.db")).unwrap();
    let dry = run(
        &["restore", "--dry-run", "--from"],
        &[output.as_os_str(), dd[0], dd[1]],
    );
    let (out, err) = (
        String::from_utf8_lossy(&dry.stdout),
        String::from_utf8_lossy(&dry.stderr),
    );
    assert!(dry.status.success(), "{out}{err}");
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert!(
        err.contains("1 credential(s) disabled since the backup")
            && err.contains("credential cred-0")
            && err.contains("1 version(s) destroyed since the backup")
            && err.contains("credential cred-1 version 1")
            && err.contains("written since the backup are not in it")
            && err.contains("credential cred-1: current version none now, 1 after"),
        "{err}"
    );
    assert!(kept_files().is_empty());
    assert_eq!(
        std::fs::read(data.join("strongroom.db")).unwrap(),
        db_before
    );
    // A backup of another vault (another keyring) changes nothing.
    let other = tmp.path().join("other");
    strongroom()
        .args(["keys", "generate", "--data-dir"])
        .arg(&other)
        .assert()
        .success();
    common::make_store(&other);
    let other_backup = tmp.path().join("other.db");
    let od = [std::ffi::OsStr::new("--data-dir"), other.as_os_str()];
    assert!(run(
        &["backup", "--output"],
        &[other_backup.as_os_str(), od[0], od[1]]
    )
    .status
    .success());
    let foreign = run(
        &["restore", "--from"],
        &[other_backup.as_os_str(), dd[0], dd[1]],
    );
    let err = String::from_utf8_lossy(&foreign.stderr);
    assert_eq!(foreign.status.code(), Some(1), "{err}");
    assert!(
        err.contains("this store's keys") && err.contains("othing was changed"),
        "{err}"
    );
    assert!(kept_files().is_empty());
    assert_eq!(
        std::fs::read(data.join("strongroom.db")).unwrap(),
        db_before
    );

    // What it would make usable again needs --yes.
    let unasked = run(&["restore", "--from"], &[output.as_os_str(), dd[0], dd[1]]);
    let err = String::from_utf8_lossy(&unasked.stderr);
    assert_eq!(unasked.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--yes") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(kept_files().is_empty());
    assert_eq!(
        std::fs::read(data.join("strongroom.db")).unwrap(),
        db_before
    );
    // Restored in place; a log left beside the database is not replayed into the copy.
    std::fs::write(data.join("strongroom.db-wal"), b"stale").unwrap();
    let out = run(
        &["restore", "--yes", "--from"],
        &[output.as_os_str(), dd[0], dd[1]],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("restored")
            && stdout.contains("its audit log verifies")
            && stdout.contains("records this restore"),
        "{stdout}"
    );
    let kept = kept_files();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        stdout.contains(&format!(
            "replacing {}",
            data.join("strongroom.db").display()
        )) && stdout.contains(&kept[0]),
        "{stdout}"
    );
    assert_eq!(
        std::fs::metadata(data.join(&kept[0]))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let verify = run(&["audit", "verify"], &dd);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let export = run(&["audit", "export"], &dd);
    assert!(String::from_utf8_lossy(&export.stdout).contains("\"restore\""));
    let reveal_all = |dir: std::path::PathBuf, after_backup: bool| {
        rt.block_on(async move {
            let config = Config::load_for_operator(
                None,
                &Overrides {
                    data_dir: Some(dir),
                    ..Overrides::default()
                },
            )
            .unwrap();
            let backends = Backends::open_existing(&config).await.unwrap();
            let vault = backends.vault();
            // The replaced copy holds cred-0 disabled and cred-1 destroyed.
            let first = if after_backup { 2 } else { 0 };
            for i in first..30 {
                let r = vault
                    .reveal("alice", &format!("cred-{i}"), None)
                    .await
                    .unwrap();
                assert_eq!(r.value.expose_secret(), format!("value-{i}").as_bytes());
            }
            let later = vault.reveal("alice", "after-backup", None).await;
            assert_eq!(later.is_ok(), after_backup, "{:?}", later.err());
            backends.close().await;
        });
    };
    reveal_all(data.clone(), false);
    // The replaced database, beside the keyring, still has what came after.
    let replaced = tmp.path().join("replaced");
    std::fs::create_dir(&replaced).unwrap();
    std::fs::set_permissions(&replaced, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(data.join(&kept[0]), replaced.join("strongroom.db")).unwrap();
    std::fs::copy(data.join("keyring.json"), replaced.join("keyring.json")).unwrap();
    reveal_all(replaced, true);
}

/// Run as root on a data dir another user owns (and so could fill with symlinks), a restore
/// is refused before it makes or changes anything there, as every command that opens the
/// store is. (Needs root to hand the folder to another user: skipped otherwise.)
#[test]
fn a_restore_into_a_data_dir_of_another_user_is_refused_before_anything() {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    strongroom()
        .args(["keys", "generate", "--data-dir"])
        .arg(&data)
        .assert()
        .success();
    common::make_store(&data);
    let backup = tmp.path().join("backup.db");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    assert!(
        run(&["backup", "--output"], &[backup.as_os_str(), dd[0], dd[1]])
            .status
            .success()
    );
    let listing = || {
        let mut names: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    // As after an upgrade from a release without one: a lock file made by root would keep
    // the owner's server out.
    std::fs::remove_file(data.join("strongroom.db.lock")).unwrap();
    let before = listing();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    let out = run(&["restore", "--from"], &[backup.as_os_str(), dd[0], dd[1]]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("owned by"), "{err}");
    assert_eq!(listing(), before);
}

/// A backup whose versions are under a KEK the store's keyring lacks (here an older copy of
/// the keyring, from before the rotation those versions were sealed under) is named before
/// anything changes, and restoring it needs --yes: those values would never open again.
#[test]
fn a_backup_holding_versions_these_keys_do_not_open_needs_yes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    let keyring = data.join("keyring.json");
    let before_rotation = tmp.path().join("keyring-v1.json");
    // A put through a dev server (so that its audit log records it), stopped after.
    let put = |name: &str| {
        let server = start_dev(&data, &[]);
        let (alice, client) = (server.export("ALICE"), server.client(&data));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let r = rt
            .block_on(client.json(
                "PUT",
                &format!("/v1/me/credentials/{name}"),
                Some(&alice),
                &json!({ "value": "sk_test_1234" }),
            ))
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(server.terminate().code(), Some(0));
    };
    put("early");
    std::fs::copy(&keyring, &before_rotation).unwrap();
    assert!(run(&["keys", "rotate"], &dd).status.success());
    put("later");
    let backup = tmp.path().join("backup.db");
    assert!(
        run(&["backup", "--output"], &[backup.as_os_str(), dd[0], dd[1]])
            .status
            .success()
    );
    let db_before = std::fs::read(data.join("strongroom.db")).unwrap();
    let from = [std::ffi::OsStr::new("--from"), backup.as_os_str()];

    // With the full keyring: nothing to say.
    let dry = run(&["restore", "--dry-run"], &[from[0], from[1], dd[0], dd[1]]);
    let err = String::from_utf8_lossy(&dry.stderr);
    assert!(dry.status.success(), "{err}");
    assert!(!err.contains("do not open"), "{err}");

    // The keyring from before the rotation: version 2 is missing.
    std::fs::copy(&before_rotation, &keyring).unwrap();
    let dry = run(&["restore", "--dry-run"], &[from[0], from[1], dd[0], dd[1]]);
    let err = String::from_utf8_lossy(&dry.stderr);
    assert!(dry.status.success(), "{err}");
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("it needs --yes"),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    assert!(
        err.contains("did not open the data key of any of the versions of the backup")
            && err.contains(":v2: 1 active credential version\n")
            && !err.contains(":v1:"),
        "{err}"
    );
    let unasked = run(&["restore"], &[from[0], from[1], dd[0], dd[1]]);
    let err = String::from_utf8_lossy(&unasked.stderr);
    assert_eq!(unasked.status.code(), Some(2), "{err}");
    assert!(
        err.contains("put back versions that this store's keys do not open")
            && err.contains("nothing was changed")
            && !err.contains("disable or destroy them again"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(data.join("strongroom.db")).unwrap(),
        db_before
    );
    // A --keep that exists stops the run before the backup is even copied.
    let keep = [std::ffi::OsStr::new("--keep"), before_rotation.as_os_str()];
    let taken = run(
        &["restore", "--yes"],
        &[from[0], from[1], dd[0], dd[1], keep[0], keep[1]],
    );
    let err = String::from_utf8_lossy(&taken.stderr);
    assert_eq!(taken.status.code(), Some(2), "{err}");
    assert!(
        err.contains("it exists") && !err.contains("replacing"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&taken.stdout).contains("replacing"));
    assert_eq!(
        std::fs::read(data.join("strongroom.db")).unwrap(),
        db_before
    );
    let asked = run(&["restore", "--yes"], &[from[0], from[1], dd[0], dd[1]]);
    assert!(
        asked.status.success(),
        "{}",
        String::from_utf8_lossy(&asked.stderr)
    );
}

/// `--output -` is no file: refused as a usage error before the store is opened, and no
/// file named `-` is made (it used to be, with exit 0).
#[test]
fn a_backup_to_standard_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = strongroom()
        .current_dir(tmp.path())
        .args(["backup", "--output", "-", "--data-dir"])
        .arg(&data)
        .env_remove("STRONGROOM_DATA_DIR")
        .env_remove("STRONGROOM_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not to standard output"), "{err}");
    assert!(!tmp.path().join("-").exists());
}
