//! `strongroom keys generate|list|rotate` end to end.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{make_store, stdout_of, strongroom};
use serde_json::Value;

fn list_json(dir: &std::path::Path) -> Vec<Value> {
    let out = stdout_of(
        strongroom()
            .args(["keys", "list", "--json", "--data-dir"])
            .arg(dir),
    );
    serde_json::from_slice::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// A keyring and a store at `dir`, its audit log sealed, as a first server start leaves them.
fn new_vault(dir: &std::path::Path) {
    strongroom()
        .args(["keys", "generate", "--data-dir"])
        .arg(dir)
        .assert()
        .success();
    make_store(dir);
}

fn material(path: &std::path::Path) -> Vec<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["material"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn generate_list_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    strongroom()
        .args(["keys", "generate", "--data-dir"])
        .arg(&data)
        .assert()
        .success();
    let file = data.join("keyring.json");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let keys = list_json(&data);
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (keys[0]["version"].as_u64(), keys[0]["state"].as_str()),
        (Some(1), Some("active"))
    );

    strongroom()
        .args(["keys", "rotate", "--data-dir"])
        .arg(&data)
        .assert()
        .success();
    assert_eq!(
        common::key_states(&Value::from(list_json(&data))),
        [(1, "decrypt-only".to_owned()), (2, "active".to_owned())]
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600,
        "rotate keeps 0600"
    );

    // Neither the table nor the JSON shows key material.
    let secrets = material(&file);
    assert_eq!(secrets.len(), 2);
    let table = strongroom()
        .args(["keys", "list", "--keyring"])
        .arg(&file)
        .output()
        .unwrap();
    let shown = [
        String::from_utf8(table.stdout).unwrap(),
        serde_json::to_string(&keys).unwrap(),
    ];
    for s in &secrets {
        for out in &shown {
            assert!(!out.contains(s.as_str()), "material shown");
        }
    }
    assert!(shown[0].contains("decrypt-only") && shown[0].contains("active"));
}

#[test]
fn generate_refuses_to_overwrite_and_env_picks_the_keyring() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ring.json");
    strongroom()
        .args(["keys", "generate", "--keyring"])
        .arg(&file)
        .assert()
        .success();
    let before = std::fs::read(&file).unwrap();
    let out = strongroom()
        .args(["keys", "generate", "--keyring"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&file).unwrap(), before);
    let out = strongroom()
        .args(["keys", "list", "--json"])
        .env("STRONGROOM_KEYRING", &file)
        .output()
        .unwrap();
    assert!(out.status.success());
    // --root means a remote provider's key: with the local keyring it is refused, not
    // silently ignored, and nothing rotates.
    let out = strongroom()
        .args(["keys", "rotate", "--root", "--keyring"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--root"));
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

#[test]
fn a_readable_keyring_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ring.json");
    strongroom()
        .args(["keys", "generate", "--keyring"])
        .arg(&file)
        .assert()
        .success();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    for cmd in ["list", "rotate"] {
        let out = strongroom()
            .args(["keys", cmd, "--keyring"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("chmod 600") && err.contains("0644"),
            "{cmd}: {err}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn missing_keyring_says_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = strongroom()
        .args(["keys", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("strongroom keys generate"));
}

#[test]
fn help_explains_every_command() {
    for args in [
        &["--help"][..],
        &["keys", "--help"],
        &["fernet", "--help"],
        &["fernet", "decrypt", "--help"],
        &["keys", "list", "--help"],
    ] {
        let out = strongroom().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8(out.stdout).unwrap().len() > 200,
            "{args:?}: help too thin"
        );
    }
}

/// `--version` prints the release on `strongroom` alone. On a subcommand it is no flag: `keys
/// retire --version 1` printed the release and exited 0, having retired nothing, to an
/// operator who meant KEK version 1.
#[test]
fn version_is_a_flag_of_strongroom_alone() {
    let out = strongroom().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("strongroom "));
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["keys", "retire", "--version", "1"][..],
        &["keys", "rotate", "--version"],
        &["serve", "--version"],
    ] {
        let out = strongroom()
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unexpected argument '--version'"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A store that cannot be opened fails `keys rotate` before the keyring changes (it rotated
/// first and then reported the store's error, so each retry added a version).
#[test]
fn rotate_fails_before_touching_the_keyring_when_the_store_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    strongroom()
        .args(["keys", "generate", "--data-dir"])
        .arg(dir.path())
        .assert()
        .success();
    std::fs::write(
        dir.path().join("strongroom.db"),
        b"this is not a SQLite database, not at all",
    )
    .unwrap();
    let before = std::fs::read(dir.path().join("keyring.json")).unwrap();
    let out = strongroom()
        .args(["keys", "rotate", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        std::fs::read(dir.path().join("keyring.json")).unwrap(),
        before,
        "the keyring rotated although the command failed"
    );
}

/// The `keys.rotate` records: (outcome, version).
fn rotations_recorded(dir: &std::path::Path) -> Vec<(String, serde_json::Value)> {
    let out = stdout_of(
        strongroom()
            .current_dir(dir)
            .env_remove("STRONGROOM_CONFIG")
            .args(["audit", "export", "--data-dir", "strongroom-data"]),
    );
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == "keys.rotate")
        .map(|r| {
            (
                r["outcome"].as_str().unwrap().to_owned(),
                r["version"].clone(),
            )
        })
        .collect()
}

/// With no flag at all, `keys rotate` works on the default data dir, the store included:
/// it is audited as with `--data-dir strongroom-data` (it was not, and said nothing). A
/// keyring named alone names no store, and the command says so.
#[test]
fn rotate_without_flags_is_audited_in_the_default_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let bare = |args: &[&str]| {
        strongroom()
            .current_dir(dir.path())
            .env_remove("STRONGROOM_CONFIG")
            .env_remove("USER")
            .env_remove("LOGNAME")
            .args(args)
            .output()
            .unwrap()
    };
    assert!(bare(&["keys", "generate"]).status.success());
    make_store(&dir.path().join("strongroom-data"));
    assert_eq!(rotations_recorded(dir.path()), []);

    let out = bare(&["keys", "rotate"]);
    assert!(out.status.success());
    // As it starts, and as it ends with the version it made (as through the API).
    assert_eq!(
        rotations_recorded(dir.path()),
        [
            ("started".to_owned(), serde_json::Value::Null),
            ("ok".to_owned(), serde_json::json!(2))
        ]
    );
    // Named by user id, even where the environment has no user name (cron, containers).
    let export = stdout_of(
        strongroom()
            .current_dir(dir.path())
            .env_remove("STRONGROOM_CONFIG")
            .args(["audit", "export", "--data-dir", "strongroom-data"]),
    );
    let record = String::from_utf8(export).unwrap();
    let record = record
        .lines()
        .find(|l| l.contains("\"keys.rotate\""))
        .unwrap();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    assert!(
        record.contains(&format!("\"principal_id\":\"uid {uid}\"")),
        "{record}"
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A misspelt variable is pointed out, as the server does at start.
    let out = strongroom()
        .current_dir(dir.path())
        .env_remove("STRONGROOM_CONFIG")
        .env("STRONGROOM_DATADIR", "/elsewhere")
        .args(["keys", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("STRONGROOM_DATADIR names no setting"),
        "{err}"
    );

    let out = bare(&[
        "keys",
        "rotate",
        "--keyring",
        "strongroom-data/keyring.json",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--keyring alone names no store"), "{err}");
    assert_eq!(
        rotations_recorded(dir.path()).len(),
        2,
        "no record for a keyring alone"
    );
}

/// `keys list | head -1`: a reader that has gone away ends it quietly with 141, as it would
/// a Unix tool, in both formats and for the commands that only report.
#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ring.json");
    let out = common::with_stdout_closed(
        common::strongroom_process()
            .args(["keys", "generate", "--keyring"])
            .arg(&file),
        b"",
    );
    common::assert_ends_quietly(&out, "keys generate");
    assert!(file.exists(), "the keyring is made before the report");
    for args in [&["keys", "list"][..], &["keys", "list", "--json"]] {
        let out = common::with_stdout_closed(
            common::strongroom_process()
                .args(args)
                .arg("--keyring")
                .arg(&file),
            b"",
        );
        common::assert_ends_quietly(&out, &format!("{args:?}"));
    }
}

/// The `keys list` table: every header starts where its column does (right-aligned
/// versions end where theirs does), whatever the widths of key ids and dates.
#[test]
fn the_table_header_is_aligned_with_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ring.json");
    for command in ["generate", "rotate", "rotate"] {
        strongroom()
            .args(["keys", command, "--keyring"])
            .arg(&file)
            .assert()
            .success();
    }
    let table = String::from_utf8(stdout_of(
        strongroom().args(["keys", "list", "--keyring"]).arg(&file),
    ))
    .unwrap();
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let starts = [
        header.find("KEY ID").unwrap(),
        header.find("STATE ").unwrap(),
        header.find("CREATED").unwrap(),
        header.find("STATE CHANGED").unwrap(),
    ];
    let version_end = header.find("VERSION").unwrap() + "VERSION".len();
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 3, "{table}");
    for row in rows {
        // The cells, with where each starts: key id, version, state, created, changed.
        let cells: Vec<(usize, &str)> = row
            .split(' ')
            .scan(0, |at, cell| {
                let start = *at;
                *at += cell.len() + 1;
                Some((start, cell))
            })
            .filter(|(_, cell)| !cell.is_empty())
            .collect();
        assert_eq!(cells.len(), 5, "{row}");
        assert_eq!(
            [cells[0].0, cells[2].0, cells[3].0, cells[4].0],
            starts,
            "\n{header}\n{row}"
        );
        assert_eq!(
            cells[1].0 + cells[1].1.len(),
            version_end,
            "\n{header}\n{row}"
        );
        assert!(!row.ends_with(' '), "{row:?}");
    }
}

/// Notes on stderr that cannot be written (`2>/dev/full`: a full disk) are dropped: the
/// command ends with its own status. `eprintln!` panicked there with 101, after a rewrap had
/// finished (its summary and closing record never written), and before a rotation through
/// `--keyring` alone said it was not recorded.
#[test]
fn notes_stderr_cannot_take_do_not_change_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        common::strongroom_process()
            .args(args)
            .stderr(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .unwrap(),
            )
            .output()
            .unwrap()
    };
    let data_arg = data.to_str().unwrap();
    let out = run(&["keys", "generate", "--data-dir", data_arg]);
    assert_eq!(out.status.code(), Some(0), "keys generate");
    make_store(&data);
    for args in [
        &["rewrap", "--data-dir", data_arg][..],
        &["keys", "rotate", "--data-dir", data_arg],
        // The first rewrap after a rotation notes that the audit head key moved too.
        &["rewrap", "--data-dir", data_arg],
        // A keyring named alone: noted as not recorded in any audit log.
        &[
            "keys",
            "rotate",
            "--keyring",
            data.join("keyring.json").to_str().unwrap(),
        ],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
    }
    let out = run(&["keys", "retire", "99", "--data-dir", data_arg]);
    assert_eq!(out.status.code(), Some(1), "a failure stays a failure");
    // The rewrap's closing record was written.
    let export = String::from_utf8(stdout_of(strongroom().args([
        "audit",
        "export",
        "--data-dir",
        data_arg,
    ])))
    .unwrap();
    let rewraps: Vec<&str> = export
        .lines()
        .filter(|l| l.contains("\"rewrap\""))
        .collect();
    assert!(
        rewraps.last().is_some_and(|l| l.contains("\"ok\"")),
        "{export}"
    );
}

/// A store whose keyring is gone: commands say to put that keyring back; one generated
/// anew beside it is noted by `keys generate`, and what opens the store then says the
/// keyring is not the store's, not only that a key is "not held".
#[test]
fn a_new_keyring_beside_an_existing_store_is_called_out() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dd = ["--data-dir", data.to_str().unwrap()];
    let run = |args: &[&str]| {
        strongroom()
            .args(args)
            .args(dd)
            .env_remove("STRONGROOM_DATA_DIR")
            .env_remove("STRONGROOM_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&["keys", "generate"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("already exists"));
    make_store(&data);
    std::fs::remove_file(data.join("keyring.json")).unwrap();

    // Before a new one is made, commands say the store needs its own keyring back (not
    // "create one").
    for args in [&["audit", "verify"][..], &["rewrap"], &["keys", "rotate"]] {
        let out = run(args);
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains("it needs the keyring it was made with") && !err.contains("create one"),
            "{args:?}: {err}"
        );
    }

    let out = run(&["keys", "generate"]);
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("note: a store already exists at") && err.contains("put it back instead"),
        "{err}"
    );
    let out = run(&["audit", "verify"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("is this the keyring (or provider) the store was made with?"),
        "{err}"
    );
}

/// Operator commands' backends follow the keyring file as a server does: a `keys rotate`
/// made while one runs (a long import) is taken up within a second or two, and what it
/// seals next goes under the new version, not under the old one for the rest of its run
/// (where a `keys retire` of that version would lose it).
#[test]
fn operator_backends_take_up_a_rotation_made_while_they_are_open() {
    let dir = tempfile::tempdir().unwrap();
    new_vault(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = common::operator_config(None, dir.path());
    let backends = rt.block_on(strongroom_server::Backends::open_existing(&config));
    let backends = backends.unwrap();
    assert_eq!(backends.keyring.active_kek().unwrap().version, 1);
    strongroom()
        .args(["keys", "rotate", "--data-dir"])
        .arg(dir.path())
        .assert()
        .success();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while backends.keyring.active_kek().unwrap().version != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotation was not taken up"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    rt.block_on(async {
        backends
            .vault()
            .put(strongroom_core::PutRequest {
                owner: "alice",
                name: "imported",
                value: strongroom_crypto::SecretBytes::from_slice(b"sk_test_1234"),
                metadata: None,
                expected_version: None,
                created_by: "import",
            })
            .await
            .unwrap();
        let counts = backends.store.count_versions_by_kek().await.unwrap();
        assert_eq!(counts.len(), 1, "{counts:?}");
        assert_eq!(counts[0].0.version, 2, "{counts:?}");
        backends.close().await;
    });
}

/// A version that stopped being active a moment ago is retired only once servers and
/// operator commands have had time to take up the rotation (and to commit what they sealed
/// under it just before): the retire waits, says so, then goes on.
#[test]
fn a_retire_right_after_a_rotation_waits_for_writers_to_take_it_up() {
    let dir = tempfile::tempdir().unwrap();
    new_vault(dir.path());
    let run = |args: &[&str]| {
        strongroom()
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    assert!(run(&["keys", "rotate"]).status.success());
    let started = std::time::Instant::now();
    let out = run(&["keys", "retire", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("stopped being active") && err.contains("waiting"),
        "{err}"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// `--keyring` (or `STRONGROOM_KEYRING`) naming another vault's keyring beside `--data-dir`
/// is refused before either keyring changes: rotated, it would report done while this
/// store's key stayed as it was.
#[test]
fn rotating_another_vaults_keyring_against_this_store_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (mine, other) = (tmp.path().join("mine"), tmp.path().join("other"));
    for dir in [&mine, &other] {
        new_vault(dir);
    }
    let (my_ring, other_ring) = (mine.join("keyring.json"), other.join("keyring.json"));
    let before = (
        std::fs::read(&my_ring).unwrap(),
        std::fs::read(&other_ring).unwrap(),
    );
    let by_flag = strongroom()
        .args(["keys", "rotate", "--keyring"])
        .arg(&other_ring)
        .arg("--data-dir")
        .arg(&mine)
        .output()
        .unwrap();
    let by_env = strongroom()
        .args(["keys", "rotate", "--data-dir"])
        .arg(&mine)
        .env("STRONGROOM_KEYRING", &other_ring)
        .output()
        .unwrap();
    for out in [by_flag, by_env] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("refusing to rotate") && err.contains("audit head key"),
            "{err}"
        );
    }
    assert_eq!(
        (
            std::fs::read(&my_ring).unwrap(),
            std::fs::read(&other_ring).unwrap()
        ),
        before
    );
    // Its own keyring, named the same way, rotates.
    strongroom()
        .args(["keys", "rotate", "--keyring"])
        .arg(&my_ring)
        .arg("--data-dir")
        .arg(&mine)
        .assert()
        .success();
    assert_eq!(list_json(&mine).len(), 2);
}

/// The wait is bounded by the settling time, whatever the file says: a version whose change
/// time lies in the future (the keyring rotated on a host whose clock runs ahead) does not
/// make `keys retire` wait until then.
#[test]
fn a_change_time_in_the_future_does_not_stretch_the_retire_wait() {
    let dir = tempfile::tempdir().unwrap();
    new_vault(dir.path());
    strongroom()
        .args(["keys", "rotate", "--data-dir"])
        .arg(dir.path())
        .assert()
        .success();
    let path = dir.path().join("keyring.json");
    let mut ring: Value = common::read_json(&path);
    for key in ring["keys"].as_array_mut().unwrap() {
        if key["version"] == 1 {
            key["state_changed_at"] = "2100-01-01T00:00:00Z".into();
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&ring).unwrap()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let started = std::time::Instant::now();
    let out = strongroom()
        .args(["keys", "retire", "1", "--data-dir"])
        .arg(dir.path())
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at a time still to come"), "{err}");
}
