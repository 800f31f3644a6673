//! Rotation, rewrap and retire end to end while a server runs: `keys rotate` takes effect in
//! the running server without SIGHUP, `rewrap` moves every data key (and survives SIGKILLs at
//! random points while values are being written), `keys retire` refuses while versions still
//! use the KEK and then finds nothing under it.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dev::{start_dev, start_dev_env};
use common::{operator_config, put_req, strongroom};
use serde_json::json;
use strongroom_server::testing::TestClient;
use strongroom_server::Backends;

const ADMIN: &str = "admin-token-for-rewrap-tests";

fn run_ok(args: &[&str], target: &[&std::ffi::OsStr]) -> String {
    let out = strongroom()
        .args(args)
        .args(target)
        .env_remove("STRONGROOM_DATA_DIR")
        .env_remove("STRONGROOM_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run_err(args: &[&str], target: &[&std::ffi::OsStr]) -> String {
    let out = strongroom()
        .args(args)
        .args(target)
        .env_remove("STRONGROOM_DATA_DIR")
        .env_remove("STRONGROOM_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

/// `(version, credential_versions)` of every KEK version, from `keys list --json`.
fn key_counts(target: &[&std::ffi::OsStr]) -> Vec<(u64, String, u64)> {
    let out = run_ok(&["keys", "list", "--json"], target);
    let keys: serde_json::Value = serde_json::from_str(&out).unwrap();
    keys.as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["version"].as_u64().unwrap(),
                k["state"].as_str().unwrap().to_owned(),
                k["credential_versions"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no credential_versions in {k}")),
            )
        })
        .collect()
}

/// Puts alice's `(name, value)` pairs through the operator's backends, as an import would;
/// `seal` first seals the audit log, as a server's first start does.
fn put_directly(data: &std::path::Path, seal: bool, puts: &[(String, String)]) {
    common::rt().block_on(async {
        let backends = Backends::open(&operator_config(None, data)).await.unwrap();
        if seal {
            strongroom_server::audit_operator_action(&backends, "test-setup", "ok", None, None)
                .await
                .unwrap();
        }
        for (name, value) in puts {
            backends.vault().put(put_req(name, value)).await.unwrap();
        }
        backends.close().await;
    });
}

async fn active_version(client: &TestClient) -> u64 {
    let r = client.get("/v1/keys", Some(ADMIN)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["active"]["version"].as_u64().unwrap()
}

async fn wait_for_active(client: &TestClient, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while active_version(client).await != version {
        assert!(
            Instant::now() < deadline,
            "the server did not pick up KEK version {version} without SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn put(client: &TestClient, alice: &str, name: &str, value: &str) -> u64 {
    let r = client
        .json(
            "PUT",
            &format!("/v1/me/credentials/{name}"),
            Some(alice),
            &json!({ "value": value }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["version"].as_u64().unwrap()
}

async fn reveal(client: &TestClient, service: &str, name: &str) -> String {
    let r = client
        .json(
            "POST",
            &format!("/v1/owners/alice/credentials/{name}/reveal"),
            Some(service),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["value"].as_str().unwrap().to_owned()
}

#[test]
fn rotate_rewrap_retire_through_data_dir_and_config_while_the_server_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_dev(&data, &["--dev-admin-token", ADMIN]);
    let (alice, service) = (server.export("ALICE"), server.export("SERVICE"));
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    let rt = common::rt();
    let client = server.client(&data);
    rt.block_on(async {
        for i in 0..20 {
            put(&client, &alice, &format!("cred-{i}"), &format!("value-{i}")).await;
        }
        assert_eq!(active_version(&client).await, 1);
    });

    // Rotate: the running server wraps the next put with version 2, no SIGHUP.
    run_ok(&["keys", "rotate"], &dd);
    rt.block_on(async {
        wait_for_active(&client, 2).await;
        put(&client, &alice, "after-rotation", "fresh").await;
    });
    assert_eq!(
        key_counts(&dd),
        vec![(1, "decrypt-only".into(), 20), (2, "active".into(), 1)]
    );

    // Retire refuses while version 1 still wraps data keys, and says how many.
    let err = run_err(&["keys", "retire", "1"], &dd);
    assert!(err.contains("20 active credential versions"), "{err}");
    assert!(err.contains("strongroom rewrap"), "{err}");

    // The real keyring, named apart from a mistyped data dir: no store there must never
    // read as "nothing uses version 1" (retire) or as an intact, empty log (audit).
    let typo = tmp.path().join("typo-data");
    let keyring = data.join("keyring.json");
    let typo_cfg = tmp.path().join("typo.toml");
    std::fs::write(
        &typo_cfg,
        format!(
            "data_dir = {:?}\n[keys]\nkeyring = {:?}\n",
            typo.display().to_string(),
            keyring.display().to_string()
        ),
    )
    .unwrap();
    for (args, target) in [
        (
            &["keys", "retire", "1"][..],
            vec![
                std::ffi::OsStr::new("--keyring"),
                keyring.as_os_str(),
                std::ffi::OsStr::new("--data-dir"),
                typo.as_os_str(),
            ],
        ),
        (
            &["keys", "retire", "1"][..],
            vec![std::ffi::OsStr::new("--config"), typo_cfg.as_os_str()],
        ),
        (
            &["audit", "verify"][..],
            vec![std::ffi::OsStr::new("--config"), typo_cfg.as_os_str()],
        ),
        (
            &["audit", "head"][..],
            vec![std::ffi::OsStr::new("--config"), typo_cfg.as_os_str()],
        ),
    ] {
        let err = run_err(args, &target);
        assert!(err.contains("no Strongroom database"), "{args:?}: {err}");
        assert!(!typo.exists(), "{args:?} made {}", typo.display());
    }
    assert_eq!(
        key_counts(&dd),
        vec![(1, "decrypt-only".into(), 20), (2, "active".into(), 1)],
        "version 1 was retired through the mistyped data dir"
    );

    let out = run_ok(&["rewrap"], &dd);
    assert!(out.contains("rewrapped 20, skipped 0, failed 0"), "{out}");
    // Idempotent: nothing left to do.
    let out = run_ok(&["rewrap"], &dd);
    assert!(out.contains("rewrapped 0, skipped 0, failed 0"), "{out}");
    // Each run is recorded as it starts (so one cut short leaves a mark) and as it ends.
    let export = run_ok(&["audit", "export"], &dd);
    let rewraps: Vec<String> = export
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == "rewrap")
        .map(|r| r["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(rewraps, ["started", "ok", "started", "ok"], "{export}");
    assert_eq!(
        key_counts(&dd),
        vec![(1, "decrypt-only".into(), 0), (2, "active".into(), 21)]
    );
    let out = run_ok(&["keys", "retire", "1"], &dd);
    assert!(out.contains("found 0 credential versions"), "{out}");

    // The same cycle through --config (the server's own TLS files, same data dir).
    let cfg = tmp.path().join("strongroom.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[tls]\ncert = {:?}\nkey = {:?}\n",
            data.display().to_string(),
            data.join("tls/cert.pem").display().to_string(),
            data.join("tls/key.pem").display().to_string(),
        ),
    )
    .unwrap();
    let cf = [std::ffi::OsStr::new("--config"), cfg.as_os_str()];
    run_ok(&["keys", "rotate"], &cf);
    rt.block_on(async {
        wait_for_active(&client, 3).await;
        put(&client, &alice, "after-second-rotation", "fresher").await;
    });
    let err = run_err(&["keys", "retire", "2"], &cf);
    assert!(err.contains("21 active credential versions"), "{err}");
    let out = run_ok(&["rewrap", "--batch", "7", "--rate", "1000/s"], &cf);
    assert!(out.contains("rewrapped 21, skipped 0, failed 0"), "{out}");
    run_ok(&["keys", "retire", "2"], &cf);
    assert_eq!(
        key_counts(&cf),
        vec![
            (1, "retired".into(), 0),
            (2, "retired".into(), 0),
            (3, "active".into(), 22)
        ]
    );

    // Everything still opens through the running server (which dropped versions 1 and 2).
    rt.block_on(async {
        for i in 0..20 {
            assert_eq!(
                reveal(&client, &service, &format!("cred-{i}")).await,
                format!("value-{i}")
            );
        }
        assert_eq!(reveal(&client, &service, "after-rotation").await, "fresh");
        assert_eq!(
            reveal(&client, &service, "after-second-rotation").await,
            "fresher"
        );
    });
}

/// A tiny deterministic generator seeded from the clock (the seed is printed on failure).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[test]
fn rewrap_killed_at_random_points_resumes_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);

    // Seed the store in-process (the dev server creates the data dir and keyring).
    // Alice holds them all, and the server's writer adds 50 more: above the default quota of
    // live credentials per owner.
    const SEEDED: u32 = 4000;
    let quota = (SEEDED + 100).to_string();
    let server = start_dev_env(
        &data,
        &["--dev-admin-token", ADMIN],
        &[("STRONGROOM_STORE__MAX_CREDENTIALS_PER_OWNER", &quota)],
    );
    let (alice, service) = (server.export("ALICE"), server.export("SERVICE"));
    let rt = common::rt();
    let mut config = operator_config(None, &data);
    config.store.max_credentials_per_owner = Some(SEEDED + 100);
    rt.block_on(async {
        let backends = Backends::open(&config).await.unwrap();
        let vault = backends.vault();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..16u32 {
            let vault = vault.clone();
            tasks.spawn(async move {
                for i in (t..SEEDED).step_by(16) {
                    let name = format!("seed-{i}");
                    vault
                        .put(put_req(&name, &format!("seed-value-{i}")))
                        .await
                        .unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        backends.close().await;
    });
    run_ok(&["keys", "rotate"], &dd);

    // Values written through the server during the whole exercise.
    let written: Arc<Mutex<Vec<(String, u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, stop) = (written.clone(), stop.clone());
        let client = server.client(&data);
        let alice = alice.clone();
        std::thread::spawn(move || {
            common::rt().block_on(async {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("live-{}", i % 50);
                    let value = format!("live-value-{i}");
                    let v = put(&client, &alice, &name, &value).await;
                    written.lock().unwrap().push((name, v, value));
                    i += 1;
                }
            })
        })
    };

    // Kill `rewrap` (SIGKILL) at random points, several times.
    let binary = assert_cmd::cargo::cargo_bin("strongroom");
    let mut kills = 0;
    let mut last_killed = false;
    for round in 0..5 {
        let mut child = Command::new(&binary)
            .args(["rewrap", "--batch", "50", "--rate", "1000"])
            .args(dd)
            .env_remove("STRONGROOM_DATA_DIR")
            .env_remove("STRONGROOM_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let wait = Duration::from_millis(150 + rng.next(900));
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
            last_killed = true;
        } else {
            last_killed = false;
        }
        let status = child.wait().unwrap();
        eprintln!("round {round}: after {wait:?}: {status:?}");
    }
    assert!(
        kills >= 3,
        "rewrap finished too early to be killed (seed {seed})"
    );

    // The resumed run finishes the job.
    let out = run_ok(&["rewrap", "--batch", "50"], &dd);
    assert!(out.contains("failed 0"), "{out} (seed {seed})");
    if last_killed {
        assert!(out.contains("resumed"), "{out} (seed {seed})");
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // Writes raced the last run only while the server had not yet reloaded (never here, it
    // reloaded long ago); one more run must find nothing.
    let out = run_ok(&["rewrap"], &dd);
    assert!(
        out.contains("rewrapped 0, skipped 0, failed 0"),
        "{out} (seed {seed})"
    );

    let counts = key_counts(&dd);
    assert_eq!(counts[0].2, 0, "{counts:?}");
    run_ok(&["keys", "retire", "1"], &dd);

    // Every version still opens, through the Vault: the seeded ones and every value written
    // during the kills (the newest 10 versions of each live credential are kept).
    let written = written.lock().unwrap().clone();
    assert!(!written.is_empty());
    rt.block_on(async {
        let backends = Backends::open(&config).await.unwrap();
        let vault = backends.vault();
        for i in 0..SEEDED {
            let r = vault
                .reveal("alice", &format!("seed-{i}"), None)
                .await
                .unwrap_or_else(|e| panic!("seed-{i}: {e} (seed {seed})"));
            assert_eq!(
                r.value.expose_secret(),
                format!("seed-value-{i}").as_bytes()
            );
        }
        let mut checked = 0;
        for (name, version, value) in &written {
            let latest = written
                .iter()
                .filter(|(n, _, _)| n == name)
                .map(|(_, v, _)| *v)
                .max()
                .unwrap();
            if latest - version >= 10 {
                continue; // destroyed by retention, as designed
            }
            let r = vault
                .reveal("alice", name, Some(*version as u32))
                .await
                .unwrap_or_else(|e| panic!("{name} v{version}: {e} (seed {seed})"));
            assert_eq!(r.value.expose_secret(), value.as_bytes());
            checked += 1;
        }
        assert!(checked > 0);
        backends.close().await;
    });
    // And through the server.
    rt.block_on(async {
        let client = server.client(&data);
        assert_eq!(reveal(&client, &service, "seed-0").await, "seed-value-0");
    });
}

/// A restored older copy of the keyring (it lacks version 2, which the store uses, or a
/// version 3 an earlier rotation made and nothing uses yet) is not rotated: that would make
/// another version of that number, with other material, and a server would seal under it
/// what no good copy opens. The newest copy rotates.
#[test]
fn rotating_a_restored_older_keyring_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    run_ok(&["keys", "generate"], &dd);
    put_directly(&data, true, &[]); // makes the store
    let keyring = data.join("keyring.json");
    let backup = std::fs::read(&keyring).unwrap();
    run_ok(&["keys", "rotate"], &dd);
    put_directly(&data, true, &[("under-v2".into(), "v".into())]);
    let newest = std::fs::read(&keyring).unwrap();
    std::fs::write(&keyring, &backup).unwrap();
    let refused = |copy: &[u8], says: &str| {
        std::fs::write(&keyring, copy).unwrap();
        let err = run_err(&["keys", "rotate"], &dd);
        assert!(
            err.contains(says) && err.contains("restore the newest keyring file"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&keyring).unwrap(),
            copy,
            "the copy was rotated"
        );
    };
    refused(&backup, "this store uses version 2 of key");
    std::fs::write(&keyring, &newest).unwrap();
    let out = run_ok(&["keys", "rotate"], &dd);
    assert!(out.contains("version 3 is now active"), "{out}");
    // Version 3 seals nothing yet: the store's record of the rotation is what refuses the
    // copy of versions 1 and 2 that lacks it.
    let with_v3 = std::fs::read(&keyring).unwrap();
    refused(&newest, "lacks version 3, which a rotation made");
    refused(&backup, "this store uses version 2 of key");
    std::fs::write(&keyring, &with_v3).unwrap();
    let out = run_ok(&["keys", "rotate"], &dd);
    assert!(out.contains("version 4 is now active"), "{out}");
}

/// `keys record` shows the store's record of the keyring's rotations and how this file
/// compares; a record that does not read stops rotations (and all sealing) until `keys
/// record --set-from-this-file` sets it from the newest file, which is recorded in the audit
/// log.
#[test]
fn keys_record_shows_the_record_and_sets_it_from_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    run_ok(&["keys", "generate"], &dd);
    put_directly(&data, true, &[]); // makes the store
    let keyring = data.join("keyring.json");
    let v1_only = std::fs::read(&keyring).unwrap();
    run_ok(&["keys", "rotate"], &dd);
    let out = run_ok(&["keys", "record"], &dd);
    assert!(
        out.contains("record of key") && out.contains(": version 2 (material "),
        "{out}"
    );
    assert!(out.contains("this file holds it"), "{out}");

    let db = rusqlite::Connection::open(data.join(strongroom_store::sqlite::DB_FILE_NAME)).unwrap();
    db.execute(
        // As text, as a hand-written UPDATE stores it.
        "UPDATE provider_state SET value = 'garbage' WHERE key LIKE 'keyring/%'",
        [],
    )
    .unwrap();
    let out = run_ok(&["keys", "record"], &dd);
    assert!(
        out.contains("does not read") && out.contains("--set-from-this-file"),
        "{out}"
    );
    let err = run_err(&["keys", "rotate"], &dd);
    assert!(err.contains("newest-version"), "{err}");

    let out = run_ok(&["keys", "record", "--set-from-this-file"], &dd);
    assert!(out.contains("recorded version 2 of key"), "{out}");
    let out = run_ok(&["keys", "record", "--set-from-this-file"], &dd);
    assert!(out.contains("nothing changed"), "{out}");
    let out = run_ok(&["keys", "rotate"], &dd);
    assert!(out.contains("version 3 is now active"), "{out}");
    let audit = run_ok(&["audit", "export"], &dd);
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("\"action\":\"keys.record\""))
            .count(),
        1,
        "{audit}"
    );

    // An older copy, compared.
    std::fs::write(&keyring, &v1_only).unwrap();
    let out = run_ok(&["keys", "record"], &dd);
    assert!(
        out.contains("newest version 1") && out.contains("lacks version 3"),
        "{out}"
    );
}

/// `keys retire` of the active version says that the active version cannot be retired and to
/// rotate first (rewrap alone moves nothing off it), whether or not data keys use it; a
/// decrypt-only version still in use is still refused with "rewrap first".
#[test]
fn retiring_the_active_version_says_to_rotate_first() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    run_ok(&["keys", "generate"], &dd);
    put_directly(&data, true, &[]); // makes the store and seals its audit log
    let active = |version: &str| {
        let err = run_err(&["keys", "retire", version], &dd);
        assert!(
            err.contains(&format!("version {version}: it is the active version"))
                && err.contains("cannot be retired")
                && err.contains("`strongroom keys rotate` first"),
            "{err}"
        );
        assert!(!err.contains("run `strongroom rewrap` first"), "{err}");
    };
    active("1"); // no data key under it yet
    put_directly(&data, false, &[("under-v1".into(), "v".into())]);
    active("1"); // one under it
    run_ok(&["keys", "rotate"], &dd);
    let err = run_err(&["keys", "retire", "1"], &dd);
    assert!(
        err.contains("1 active credential version still uses it")
            && err.contains("run `strongroom rewrap` first"),
        "{err}"
    );
    active("2");
    run_ok(&["rewrap"], &dd);
    run_ok(&["keys", "retire", "1"], &dd);
    active("2");
}

/// Versions whose data key does not unwrap (damaged here) are left as they are, and the
/// error names them: owner, name, version and KEK, never a key or a value; the first 20,
/// then how many more.
#[test]
fn rewrap_names_the_versions_that_did_not_unwrap() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    run_ok(&["keys", "generate"], &dd);
    let puts: Vec<(String, String)> = (0..25)
        .map(|i| (format!("cred-{i:02}"), format!("secret-value-{i}")))
        .collect();
    put_directly(&data, true, &puts);
    let damage = |names: &str| {
        let conn = rusqlite::Connection::open(data.join("strongroom.db")).unwrap();
        conn.execute_batch(&format!(
            "UPDATE versions SET wrapped_key = zeroblob(length(wrapped_key)) \
             WHERE credential_id IN (SELECT id FROM credentials WHERE name LIKE '{names}')"
        ))
        .unwrap();
    };
    let rewrap = || {
        let out = strongroom()
            .args(["rewrap"])
            .args(dd)
            .env_remove("STRONGROOM_DATA_DIR")
            .env_remove("STRONGROOM_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!err.contains("secret-value"), "{err}");
        (String::from_utf8(out.stdout).unwrap(), err)
    };

    run_ok(&["keys", "rotate"], &dd);
    damage("cred-07");
    let (out, err) = rewrap();
    assert!(out.contains("rewrapped 24, skipped 0, failed 1"), "{out}");
    assert!(
        err.contains("1 version did not unwrap (its KEK is")
            && err.contains("it was left as it is: owner \"alice\" credential \"cred-07\" version 1 (under local:"),
        "{err}"
    );

    run_ok(&["keys", "rotate"], &dd);
    damage("cred-%");
    let (out, err) = rewrap();
    assert!(out.contains("rewrapped 0, skipped 0, failed 25"), "{out}");
    assert!(
        err.contains("25 versions did not unwrap (their KEK is"),
        "{err}"
    );
    assert_eq!(err.matches("credential \"cred-").count(), 20, "{err}");
    assert!(err.trim_end().ends_with("; and 5 more"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );
}

/// A row damaged past reading (a wrapped key that is no blob, metadata that is no JSON) is
/// named among the versions that did not unwrap, and the rewrap moves the rest: it used to
/// stop at that row's page with an integrity error on every run, and the old KEK could never
/// be retired.
#[test]
fn rewrap_names_a_row_that_does_not_read_and_moves_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    run_ok(&["keys", "generate"], &dd);
    let puts: Vec<(String, String)> = (0..8)
        .map(|i| (format!("cred-{i:02}"), format!("secret-value-{i}")))
        .collect();
    put_directly(&data, true, &puts);
    let conn = rusqlite::Connection::open(data.join("strongroom.db")).unwrap();
    let row =
        |name: &str| format!("credential_id = (SELECT id FROM credentials WHERE name = '{name}')");
    conn.execute_batch(&format!(
        "UPDATE versions SET wrapped_key = 'not a blob' WHERE {};
         UPDATE versions SET metadata = '{{not json' WHERE {};",
        row("cred-03"),
        row("cred-05")
    ))
    .unwrap();
    drop(conn);
    run_ok(&["keys", "rotate"], &dd);
    for args in [
        &["rewrap", "--dry-run", "--batch", "2"][..],
        &["rewrap", "--batch", "2"],
    ] {
        let out = strongroom()
            .args(args)
            .args(dd)
            .env_remove("STRONGROOM_DATA_DIR")
            .env_remove("STRONGROOM_CONFIG")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        assert!(
            stdout.contains("6, skipped 0, failed 2"),
            "{args:?}: {stdout}{stderr}"
        );
        for name in ["cred-03", "cred-05"] {
            assert!(
                stderr.contains(&format!("credential \"{name}\" version 1")),
                "{stderr}"
            );
        }
        assert!(!stderr.contains("integrity"), "{stderr}");
    }
    // Moved: the six readable versions are under the new KEK, the two damaged ones where
    // they were.
    let counts = key_counts(&dd);
    assert_eq!(
        counts,
        vec![
            (1, "decrypt-only".to_owned(), 2),
            (2, "active".to_owned(), 6)
        ],
        "{counts:?}"
    );
}

/// A data dir that holds no store (a mistyped `--data-dir`) is refused, by a dry run too,
/// and left without one: a rewrap used to make an empty store there and report success. A
/// folder with neither keyring nor database is called what it most often is.
#[test]
fn rewrap_refuses_a_data_dir_without_a_store_and_makes_none() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    let e = run_err(&["rewrap"], &dd);
    assert!(
        e.contains("no keyring at")
            && e.contains("no database at")
            && e.contains("data directory right"),
        "{e}"
    );
    assert!(!e.contains("  "), "{e}");
    assert!(!data.exists());

    run_ok(&["keys", "generate"], &dd);
    // A move to a configuration that does not load makes nothing either.
    let missing = tmp.path().join("no-such.toml");
    let e = run_err(&["rewrap", "--to-config", missing.to_str().unwrap()], &dd);
    assert!(e.contains("no-such.toml"), "{e}");
    for args in [&["rewrap", "--dry-run"][..], &["rewrap"]] {
        let e = run_err(args, &dd);
        assert!(e.contains("strongroom.db"), "{args:?}: {e}");
        assert!(
            !data.join("strongroom.db").exists(),
            "{args:?} made a store"
        );
    }

    // An empty database file (a copy or restore cut short) is no store: refused, by `keys
    // retire` above all, which would otherwise find nothing using the key and erase it.
    let keyring = || std::fs::read_to_string(data.join("keyring.json")).unwrap();
    let before = keyring();
    std::fs::write(data.join("strongroom.db"), b"").unwrap();
    for args in [
        &["rewrap"][..],
        &["keys", "rotate"],
        &["keys", "retire", "1"],
        &["audit", "verify"],
    ] {
        let e = run_err(args, &dd);
        assert!(e.contains("is empty (0 bytes)"), "{args:?}: {e}");
    }
    assert_eq!(
        std::fs::metadata(data.join("strongroom.db")).unwrap().len(),
        0
    );
    assert_eq!(keyring(), before, "the keyring changed");
}

/// Ctrl-C stops a rewrap where it is: exit 130, a line saying how far it got and how to go
/// on, and a record in the audit log that it stopped (it left only `started` before); the
/// next run goes on and finishes.
#[test]
fn an_interrupted_rewrap_says_so_and_the_next_run_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    run_ok(&["keys", "generate"], &dd);
    let puts: Vec<_> = (0..40)
        .map(|i| (format!("cred-{i}"), format!("value-{i}")))
        .collect();
    put_directly(&data, true, &puts);
    run_ok(&["keys", "rotate"], &dd);
    // Slow enough to be cut short: 4 per second, 4 per batch.
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("strongroom"))
        .args(["rewrap", "--batch", "4", "--rate", "4/s", "--data-dir"])
        .arg(&data)
        .env_remove("STRONGROOM_DATA_DIR")
        .env_remove("STRONGROOM_CONFIG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("rewrap interrupted after") && err.contains("run it again"),
        "{err}"
    );
    let export = run_ok(&["audit", "export"], &dd);
    assert!(
        export.contains("\"interrupted\"") && export.contains("\"rewrap\""),
        "{export}"
    );
    let out = run_ok(&["rewrap"], &dd);
    assert!(out.contains("failed 0"), "{out}");
    assert_eq!(key_counts(&dd)[0].2, 0);
}

/// `--concurrency 0` is a usage error (it was taken as 1 without a word), as is a value
/// past 1024.
#[test]
fn concurrency_out_of_range_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    for n in ["0", "1025"] {
        let out = strongroom()
            .args(["rewrap", "--concurrency", n, "--data-dir"])
            .arg(tmp.path())
            .env_remove("STRONGROOM_DATA_DIR")
            .env_remove("STRONGROOM_CONFIG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{n}: {err}");
        assert!(err.contains("--concurrency"), "{n}: {err}");
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
