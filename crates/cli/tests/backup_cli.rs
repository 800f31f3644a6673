//! `strongroom backup` end to end: taken while the server runs and writes, restored into a
//! new data dir beside the keyring, where the audit log verifies and every value reveals.

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

    // Restored beside the keyring: the log verifies, every value written before reveals.
    let restored = tmp.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::set_permissions(&restored, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(&output, restored.join("strongroom.db")).unwrap();
    std::fs::copy(data.join("keyring.json"), restored.join("keyring.json")).unwrap();
    let rd = [std::ffi::OsStr::new("--data-dir"), restored.as_os_str()];
    let verify = run(&["audit", "verify"], &rd);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    rt.block_on(async {
        let config = Config::load_for_operator(
            None,
            &Overrides {
                data_dir: Some(restored.clone()),
                ..Overrides::default()
            },
        )
        .unwrap();
        let backends = Backends::open_existing(&config).await.unwrap();
        let vault = backends.vault();
        for i in 0..30 {
            let r = vault
                .reveal("alice", &format!("cred-{i}"), None)
                .await
                .unwrap();
            assert_eq!(r.value.expose_secret(), format!("value-{i}").as_bytes());
        }
        backends.close().await;
    });
}
