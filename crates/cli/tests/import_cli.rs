//! `strongroom import django-fernet-fields` end to end: the real Django databases in
//! shared/vectors (both library versions, all four key setups), the same rows in PostgreSQL,
//! a database built here (integer owners, text columns, name-column mode), and an import into
//! the store of a running `serve --dev`, revealed over HTTPS as the dev service.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::dev::start_dev;
use common::{read_json, strongroom, vectors_dir};
use serde_json::{json, Value};
use strongroom_server::testing::{ClientOptions, TestClient};

const FOLDERS: [&str; 2] = ["dff-0.6_django-3.2", "dff-v2-0.9_django-6.1"];
const SETUPS: [&str; 4] = [
    "a_single_key_hkdf",
    "b_hkdf_off",
    "c_secret_key_fallback",
    "d_rotation",
];
const COLUMNS: [&str; 6] = [
    "enc_text",
    "enc_char",
    "enc_email",
    "enc_int",
    "enc_date",
    "enc_datetime",
];

fn cred_name(column: &str) -> String {
    column.replace('_', "-")
}

/// `--key ...`/`--secret-key`/`--no-hkdf` for a setup's final settings.
fn key_args(settings: &Value) -> Vec<String> {
    let mut args = Vec::new();
    match settings["FERNET_KEYS"].as_array() {
        Some(keys) => {
            for k in keys {
                args.push("--key".to_owned());
                args.push(k.as_str().unwrap().to_owned());
            }
        }
        None => {
            args.push("--secret-key".to_owned());
            args.push(settings["SECRET_KEY"].as_str().unwrap().to_owned());
        }
    }
    if settings["FERNET_USE_HKDF"] == json!(false) {
        args.push("--no-hkdf".to_owned());
    }
    args
}

fn map_args() -> Vec<String> {
    COLUMNS
        .iter()
        .flat_map(|c| ["--map".to_owned(), format!("{c}={}", cred_name(c))])
        .collect()
}

/// Runs the import; returns (success, stdout, stderr).
fn import(data: &Path, database: &str, table: &str, extra: &[String]) -> (bool, String, String) {
    let out = strongroom()
        .args(["import", "django-fernet-fields", "--data-dir"])
        .arg(data)
        .args(["--database", database, "--table", table])
        .args(["--owner-column", "label"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The number after `label:` in the report.
fn count(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in report:\n{report}"))
}

fn new_target(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    strongroom()
        .args(["keys", "generate", "--data-dir"])
        .arg(&data)
        .assert()
        .success();
    data
}

async fn backends(data: &Path) -> strongroom_server::Backends {
    let config = strongroom_server::config::Config::load_for_operator(
        None,
        &strongroom_server::config::Overrides {
            data_dir: Some(data.to_owned()),
            ..Default::default()
        },
    )
    .unwrap();
    strongroom_server::Backends::open(&config).await.unwrap()
}

/// Per (owner, name): (number of versions, current value) in the target, for the given
/// owners and names; missing credentials are absent from the map.
fn contents(
    data: &Path,
    owners: &[String],
    names: &[String],
) -> BTreeMap<(String, String), (usize, Vec<u8>, Value)> {
    let mut found = BTreeMap::new();
    common::rt().block_on(async {
        let b = backends(data).await;
        let vault = b.vault();
        for owner in owners {
            for name in names {
                match vault.describe(owner, name).await {
                    Ok(cred) => {
                        let revealed = vault.reveal(owner, name, None).await.unwrap();
                        found.insert(
                            (owner.clone(), name.clone()),
                            (
                                cred.versions.len(),
                                revealed.value.expose_secret().to_vec(),
                                cred.versions[0].metadata.clone(),
                            ),
                        );
                    }
                    Err(strongroom_core::CoreError::NotFound) => {}
                    Err(e) => panic!("{owner}/{name}: {e}"),
                }
            }
        }
        drop(vault);
        b.close().await;
    });
    found
}

struct Vectors {
    json: Value,
    sqlite: PathBuf,
}

fn vectors(folder: &str, setup: &str) -> Vectors {
    let dir = vectors_dir().join("django-fernet-fields").join(folder);
    let json = read_json(&dir.join(format!("{setup}.json")));
    let sqlite = dir.join(format!("{setup}.sqlite3"));
    assert!(sqlite.is_file(), "missing {}", sqlite.display());
    Vectors { json, sqlite }
}

fn labels(json: &Value) -> Vec<String> {
    let mut l: Vec<String> = json["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["label"].as_str().unwrap().to_owned())
        .collect();
    l.sort();
    l.dedup();
    l
}

fn names() -> Vec<String> {
    COLUMNS.iter().map(|c| cred_name(c)).collect()
}

/// Whether the import skips this vector: a NULL, or an empty value (no credential).
fn skipped(v: &Value) -> bool {
    v["token"].is_null() || v["plaintext_utf8"] == ""
}

/// Checks the target holds exactly the non-empty vectors whose row is not in `failed_rows`,
/// one version each, byte for byte, with the source recorded.
fn check_target(data: &Path, json: &Value, table: &str, failed_rows: &[u64]) {
    let found = contents(data, &labels(json), &names());
    let mut expected = 0;
    for v in json["vectors"].as_array().unwrap() {
        let (label, column) = (v["label"].as_str().unwrap(), v["column"].as_str().unwrap());
        let row_id = v["row_id"].as_u64().unwrap();
        let key = (label.to_owned(), cred_name(column));
        let got = found.get(&key);
        if skipped(v) || failed_rows.contains(&row_id) {
            assert!(got.is_none(), "{key:?} should not exist");
            continue;
        }
        expected += 1;
        let (versions, value, metadata) = got.unwrap_or_else(|| panic!("{key:?} was not imported"));
        assert_eq!(*versions, 1, "{key:?}");
        assert!(
            value.as_slice() == v["plaintext_utf8"].as_str().unwrap().as_bytes(),
            "{key:?}: value differs"
        );
        let from = &metadata["imported_from"];
        assert_eq!(
            (&from["table"], &from["row_id"], &from["column"]),
            (&json!(table), &json!(row_id), &json!(column)),
            "{key:?}"
        );
        // The token's fingerprint: a re-run after the app saved the field again imports anew.
        assert_eq!(
            from["token_sha256"].as_str().map(str::len),
            Some(32),
            "{key:?}"
        );
    }
    assert_eq!(found.len(), expected);
}

#[test]
fn imports_every_vector_setup_idempotently() {
    for folder in FOLDERS {
        for setup in SETUPS {
            let what = format!("{folder}/{setup}");
            let v = vectors(folder, setup);
            let tmp = tempfile::tempdir().unwrap();
            let db = tmp.path().join("django.sqlite3");
            std::fs::copy(&v.sqlite, &db).unwrap();
            let database = format!("sqlite:{}", db.display());
            let data = new_target(tmp.path());
            let mut args = key_args(&v.json["settings"]);
            args.extend(map_args());
            args.extend(["--batch".to_owned(), "4".to_owned()]);

            let non_null = v.json["vectors"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| !skipped(x))
                .count() as u64;
            let nulls = v.json["vectors"].as_array().unwrap().len() as u64 - non_null;
            let rows = labels(&v.json).len() as u64;

            // Dry run: decrypts everything, writes nothing.
            let mut dry = args.clone();
            dry.push("--dry-run".to_owned());
            let (ok, out, err) = import(&data, &database, "vault_secret", &dry);
            assert!(ok, "{what}: {out}\n{err}");
            assert!(out.contains("dry run"), "{what}: {out}");
            assert_eq!(count(&out, "values decrypted:"), non_null, "{what}");
            assert_eq!(count(&out, "rows failed:"), 0, "{what}");
            assert!(
                contents(&data, &labels(&v.json), &names()).is_empty(),
                "{what}: dry run wrote"
            );

            // The import.
            let (ok, out, err) = import(&data, &database, "vault_secret", &args);
            assert!(ok, "{what}: {out}\n{err}");
            assert_eq!(count(&out, "rows read:"), rows, "{what}");
            assert_eq!(count(&out, "values imported:"), non_null, "{what}");
            assert_eq!(count(&out, "NULL or empty, skipped:"), nulls, "{what}");
            assert_eq!(count(&out, "already imported:"), 0, "{what}");
            assert!(
                err.contains("import: "),
                "{what}: no plain progress lines: {err}"
            );
            check_target(&data, &v.json, "vault_secret", &[]);

            // A rerun adds nothing.
            let (ok, out, err) = import(&data, &database, "vault_secret", &args);
            assert!(ok, "{what}: {out}\n{err}");
            assert_eq!(count(&out, "values imported:"), 0, "{what}");
            assert_eq!(count(&out, "already imported:"), non_null, "{what}");
            check_target(&data, &v.json, "vault_secret", &[]);

            // Nothing of any value leaks into the output.
            for x in v.json["vectors"].as_array().unwrap() {
                let p = x["plaintext_utf8"].as_str().unwrap_or("");
                if p.len() >= 8 {
                    assert!(
                        !out.contains(p) && !err.contains(p),
                        "{what}: value in output"
                    );
                }
            }
        }
    }
}

/// A version whose metadata no longer reads (the target's database edited by hand) may be
/// an earlier run's import: a rerun cannot tell "already imported" from "set in Strongroom",
/// so it stops naming an integrity failure, and writes nothing over it.
#[test]
fn a_rerun_stops_at_a_version_whose_metadata_does_not_read() {
    let v = vectors(FOLDERS[0], SETUPS[0]);
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("django.sqlite3");
    std::fs::copy(&v.sqlite, &db).unwrap();
    let database = format!("sqlite:{}", db.display());
    let data = new_target(tmp.path());
    let mut args = key_args(&v.json["settings"]);
    args.extend(map_args());
    let (ok, out, err) = import(&data, &database, "vault_secret", &args);
    assert!(ok, "{out}\n{err}");
    let target = rusqlite::Connection::open(data.join("strongroom.db")).unwrap();
    let versions = |conn: &rusqlite::Connection| -> i64 {
        conn.query_row("SELECT count(*) FROM versions", [], |r| r.get(0))
            .unwrap()
    };
    let before = versions(&target);
    target
        .execute(
            "UPDATE versions SET metadata = 'not json' WHERE id = (SELECT min(id) FROM versions)",
            [],
        )
        .unwrap();
    let (ok, out, err) = import(&data, &database, "vault_secret", &args);
    assert!(!ok, "{out}\n{err}");
    assert!(err.contains("integrity"), "{out}\n{err}");
    assert_eq!(versions(&target), before);
}

#[test]
fn rotation_with_only_the_new_key_fails_the_old_rows_and_writes_none_of_them() {
    for folder in FOLDERS {
        let v = vectors(folder, "d_rotation");
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("django.sqlite3");
        std::fs::copy(&v.sqlite, &db).unwrap();
        let database = format!("sqlite:{}", db.display());
        let data = new_target(tmp.path());
        let new_key = v.json["settings"]["FERNET_KEYS"][0].as_str().unwrap();
        let mut args = vec!["--key".to_owned(), new_key.to_owned()];
        args.extend(map_args());

        // Rows whose tokens only the old key (index 1) opens.
        let mut old: Vec<(u64, String)> = v.json["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["key_index"] == json!(1))
            .map(|x| {
                (
                    x["row_id"].as_u64().unwrap(),
                    x["column"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        old.sort();
        let mut old_rows: Vec<u64> = old.iter().map(|(r, _)| *r).collect();
        old_rows.dedup();
        assert!(!old_rows.is_empty());

        for _ in 0..2 {
            let (ok, out, err) = import(&data, &database, "vault_secret", &args);
            assert!(!ok, "{folder}: must fail: {out}");
            assert!(err.contains("could not be imported"), "{folder}: {err}");
            assert_eq!(
                count(&out, "rows failed:"),
                old_rows.len() as u64,
                "{folder}"
            );
            for (row, column) in &old {
                assert!(
                    out.contains(&format!(
                        "row {row} column {column}: no key opens the token"
                    )),
                    "{folder}: row {row} {column} not listed:\n{out}"
                );
            }
            check_target(&data, &v.json, "vault_secret", &old_rows);
        }

        // With both keys, the rest follows and nothing is duplicated.
        let mut all = key_args(&v.json["settings"]);
        all.extend(map_args());
        let (ok, out, err) = import(&data, &database, "vault_secret", &all);
        assert!(ok, "{folder}: {out}\n{err}");
        let old_non_empty = v.json["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["key_index"] == json!(1) && !skipped(x))
            .count();
        assert_eq!(
            count(&out, "values imported:"),
            old_non_empty as u64,
            "{folder}"
        );
        check_target(&data, &v.json, "vault_secret", &[]);

        // Each run left an operator record in the audit log: two failed, one clean.
        let export = strongroom()
            .args(["audit", "export", "--format", "jsonl", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(export.status.success());
        let outcomes: Vec<String> = String::from_utf8(export.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["action"] == "import.django-fernet-fields")
            .map(|r| r["outcome"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(outcomes, ["error", "error", "ok"], "{folder}");
    }
}

/// A database built here: integer owners, tokens in TEXT and BLOB columns, names from a
/// column, a NULL, a non-token and a row id that is not an integer.
#[test]
fn name_column_mode_with_integer_owners_and_text_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.sqlite3");
    let fernet = strongroom_crypto::django::keys_from_strings(&["app passphrase"], true).unwrap();
    let rng = strongroom_crypto::OsRandom;
    let enc = |s: &str| fernet.encrypt(s.as_bytes(), 1_700_000_000, &rng).unwrap();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL,
                 service TEXT, token TEXT, blob_token BLOB)",
        )
        .unwrap();
        let rows: [(i64, i64, &str, Option<String>); 5] = [
            (1, 42, "zoom.api-key", Some(enc("zoom-secret"))),
            (
                2,
                42,
                "slack.token",
                Some(enc("2024-01-02 03:04:05.123456+05:30")),
            ),
            (3, 7, "zoom.api-key", Some(enc(""))),
            (4, 7, "github.token", None),
            (5, 9, "broken", Some("not-a-token".to_owned())),
        ];
        for (id, user, service, token) in rows {
            conn.execute(
                "INSERT INTO accounts VALUES (?1, ?2, ?3, ?4, CAST(?4 AS BLOB))",
                rusqlite::params![id, user, service, token],
            )
            .unwrap();
        }
    }
    let database = format!("sqlite:{}", db.display());
    for column in ["token", "blob_token"] {
        let target = tempfile::tempdir().unwrap();
        let data = new_target(target.path());
        // The keys by flag, or from a file (blank lines ignored).
        let key_file = target.path().join("keys.txt");
        std::fs::write(&key_file, "app passphrase\n\n").unwrap();
        let key_flags: Vec<String> = if column == "token" {
            vec!["--key".into(), "app passphrase".into()]
        } else {
            vec!["--key-file".into(), key_file.display().to_string()]
        };
        for run in 0..2 {
            let out = strongroom()
                .args(["import", "django-fernet-fields", "--data-dir"])
                .arg(&data)
                .args(["--database", &database, "--table", "accounts"])
                .args(["--owner-column", "user_id", "--name-column", "service"])
                .args(["--value-column", column])
                .args(key_flags.iter().map(String::as_str))
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert_eq!(out.status.code(), Some(1), "{stdout}");
            assert!(
                stdout.contains(&format!("row 5 column {column}: not a valid Fernet token")),
                "{stdout}"
            );
            // Row 4's NULL and row 3's empty value; row 5 failed, so its cells are not counted.
            assert_eq!(count(&stdout, "NULL or empty, skipped:"), 2);
            assert!(!stdout.contains("not-a-token") && !stdout.contains("zoom-secret"));
            let imported = count(&stdout, "values imported:");
            assert_eq!(imported, if run == 0 { 2 } else { 0 }, "{stdout}");
            assert_eq!(count(&stdout, "already imported:"), 2 - imported);
        }
        let found = contents(
            &data,
            &["42".to_owned(), "7".to_owned(), "9".to_owned()],
            &[
                "zoom.api-key".to_owned(),
                "slack.token".to_owned(),
                "github.token".to_owned(),
                "broken".to_owned(),
            ],
        );
        let values: Vec<_> = found
            .iter()
            .map(|((o, n), (versions, v, meta))| {
                (
                    o.as_str(),
                    n.as_str(),
                    *versions,
                    String::from_utf8(v.clone()).unwrap(),
                    meta["imported_from"]["column"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let c = column.to_owned();
        assert_eq!(
            values,
            [
                (
                    "42",
                    "slack.token",
                    1,
                    "2024-01-02 03:04:05.123456+05:30".to_owned(),
                    c.clone()
                ),
                ("42", "zoom.api-key", 1, "zoom-secret".to_owned(), c),
            ]
        );
    }
}

/// The app saving a field again (a new token) makes a re-run import the new value; every
/// version written is audited with it; a value that is not UTF-8 fails its row; an id
/// column that is not unique is refused before anything is read.
#[test]
fn reruns_follow_the_app_audit_each_version_and_refuse_what_they_cannot_keep() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.sqlite3");
    let fernet = strongroom_crypto::django::keys_from_strings(&["app passphrase"], true).unwrap();
    let enc = |s: &[u8]| {
        fernet
            .encrypt(s, 1_700_000_000, &strongroom_crypto::OsRandom)
            .unwrap()
    };
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, user_id INTEGER, token TEXT, dup INTEGER)",
    )
    .unwrap();
    for (id, user, value) in [(1, 42, &b"first-value"[..]), (2, 7, b"\xff\xfe not text")] {
        conn.execute(
            "INSERT INTO accounts VALUES (?1, ?2, ?3, 1)",
            rusqlite::params![id, user, enc(value)],
        )
        .unwrap();
    }
    let database = format!("sqlite:{}", db.display());
    let data = new_target(tmp.path());
    let run = |extra: &[&str]| {
        let out = strongroom()
            .args(["import", "django-fernet-fields", "--data-dir"])
            .arg(&data)
            .args(["--database", &database, "--table", "accounts"])
            .args(["--owner-column", "user_id", "--map", "token=zoom.api-key"])
            .args(["--key", "app passphrase"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("row 2 column token: value is not UTF-8 text"),
        "{out}"
    );
    assert_eq!(count(&out, "values imported:"), 1, "{out}");

    // The app saves row 1 again: a new token, a new value.
    conn.execute(
        "UPDATE accounts SET token = ?1 WHERE id = 1",
        rusqlite::params![enc(b"second-value")],
    )
    .unwrap();
    let (_, out, _) = run(&[]);
    assert_eq!(count(&out, "values imported:"), 1, "{out}");
    assert_eq!(count(&out, "already imported:"), 0, "{out}");
    let owners = ["42".to_owned(), "7".to_owned()];
    let found = contents(&data, &owners, &["zoom.api-key".to_owned()]);
    let (versions, value, _) = &found[&("42".to_owned(), "zoom.api-key".to_owned())];
    assert_eq!((*versions, value.as_slice()), (2, &b"second-value"[..]));
    assert!(!found.contains_key(&("7".to_owned(), "zoom.api-key".to_owned())));
    let (_, out, _) = run(&[]);
    assert_eq!(count(&out, "already imported:"), 1, "{out}");
    // Another (unique) id column finds the same tokens: nothing is imported twice.
    let (_, out, _) = run(&["--id-column", "user_id"]);
    assert_eq!(count(&out, "values imported:"), 0, "{out}");
    assert_eq!(count(&out, "already imported:"), 1, "{out}");
    // A token column as the row id would copy tokens into metadata owners read: refused.
    let (code, _, err) = run(&["--id-column", "token"]);
    assert_eq!(code, Some(2), "{err}");

    // Once the value is set in Strongroom, the Django copy is the stale one: a later run
    // (after the app saved the field once more) keeps Strongroom's.
    common::rt().block_on(async {
        // As the API writes it: the version with its put record.
        let b = backends(&data).await;
        let key = strongroom_core::audit::load_or_create_head_key(
            b.store.as_ref(),
            b.keyring.as_ref(),
            &strongroom_crypto::OsRandom,
        )
        .await
        .unwrap();
        let event = strongroom_store::audit::Event {
            time: time::OffsetDateTime::now_utc(),
            principal_kind: "user".into(),
            principal_id: "42".into(),
            action: "put".into(),
            owner: Some("42".into()),
            name: Some("zoom.api-key".into()),
            version: None,
            outcome: "ok".into(),
            status: 201,
            request_id: None,
            client_addr: None,
            on_behalf_of: None,
            destination: None,
            error_code: None,
        };
        b.vault()
            .put_audited(
                strongroom_core::PutRequest {
                    owner: "42",
                    name: "zoom.api-key",
                    value: strongroom_crypto::SecretBytes::from_slice(b"set-in-strongroom"),
                    metadata: None,
                    expected_version: None,
                    created_by: "user:42",
                },
                std::sync::Arc::new(key),
                event,
            )
            .await
            .unwrap();
        b.close().await;
    });
    conn.execute(
        "UPDATE accounts SET token = ?1 WHERE id = 1",
        rusqlite::params![enc(b"third-value")],
    )
    .unwrap();
    let (_, out, _) = run(&[]);
    assert_eq!(count(&out, "values imported:"), 0, "{out}");
    assert_eq!(
        count(&out, "kept (changed in Strongroom since):"),
        1,
        "{out}"
    );
    let found = contents(&data, &owners, &["zoom.api-key".to_owned()]);
    let (versions, value, _) = &found[&("42".to_owned(), "zoom.api-key".to_owned())];
    assert_eq!(
        (*versions, value.as_slice()),
        (3, &b"set-in-strongroom"[..])
    );

    // Each version has its own record, committed with it; the chain verifies.
    let export = strongroom()
        .args(["audit", "export", "--format", "jsonl", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let puts: Vec<Value> = String::from_utf8(export.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["action"] == "put")
        .collect();
    let puts: Vec<&Value> = puts
        .iter()
        .filter(|r| r["principal_kind"] == "operator")
        .collect();
    assert_eq!(puts.len(), 2, "{puts:?}");
    for (r, version) in puts.iter().zip([1, 2]) {
        assert_eq!(
            (&r["owner"], &r["name"]),
            (&json!("42"), &json!("zoom.api-key"))
        );
        assert_eq!(r["version"], version);
    }
    strongroom()
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .assert()
        .success();

    // Paging by a column that is not unique would skip rows: refused, nothing read.
    let (code, _, err) = run(&["--id-column", "dup"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--id-column dup is not unique"), "{err}");

    // Deleted in Strongroom (its owner deleted it): a later run does not bring it back.
    common::rt().block_on(async {
        let b = backends(&data).await;
        b.vault()
            .destroy_credential("42", "zoom.api-key")
            .await
            .unwrap();
        b.close().await;
    });
    let (_, out, _) = run(&[]);
    assert_eq!(count(&out, "values imported:"), 0, "{out}");
    assert_eq!(
        count(&out, "deleted in Strongroom since, not re-created:"),
        1,
        "{out}"
    );
    let found = contents(&data, &owners, &["zoom.api-key".to_owned()]);
    assert!(
        !found.contains_key(&("42".to_owned(), "zoom.api-key".to_owned())),
        "re-created: {found:?}"
    );
}

/// A mistyped column fails the import, named with its flag, before anything is written:
/// SQLite would otherwise read `"uid"` as the string 'uid' (one owner for every row, or
/// every credential named after the typo).
#[test]
fn a_mistyped_column_is_an_error_not_a_string() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.sqlite3");
    let fernet = strongroom_crypto::django::keys_from_strings(&["app passphrase"], true).unwrap();
    let token = fernet
        .encrypt(b"zoom-secret", 1_700_000_000, &strongroom_crypto::OsRandom)
        .unwrap();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, user_id INTEGER, service TEXT, token TEXT)",
        )
        .unwrap();
        for (id, user) in [(1, 42), (2, 7)] {
            conn.execute(
                "INSERT INTO accounts VALUES (?1, ?2, 'zoom.api-key', ?3)",
                rusqlite::params![id, user, token],
            )
            .unwrap();
        }
    }
    let database = format!("sqlite:{}", db.display());
    let target = tempfile::tempdir().unwrap();
    let data = new_target(target.path());
    let good = [
        "--owner-column",
        "user_id",
        "--name-column",
        "service",
        "--value-column",
        "token",
    ];
    for (flag, typo) in [
        ("--owner-column", "uid"),
        ("--name-column", "cnme"),
        ("--value-column", "tokn"),
        ("--id-column", "idd"),
    ] {
        let mut args: Vec<&str> = good.to_vec();
        match args.iter().position(|a| *a == flag) {
            Some(i) => args[i + 1] = typo,
            None => args.extend([flag, typo]),
        }
        let out = strongroom()
            .args(["import", "django-fernet-fields", "--data-dir"])
            .arg(&data)
            .args(["--database", &database, "--table", "accounts"])
            .args(&args)
            .args(["--key", "app passphrase"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{flag} {typo}: {text}");
        assert!(
            text.contains(&format!("{typo}: table accounts has no such column")),
            "{flag} {typo}: {text}"
        );
    }
    // A mistyped table is named as such.
    let out = strongroom()
        .args(["import", "django-fernet-fields", "--data-dir"])
        .arg(&data)
        .args(["--database", &database, "--table", "acounts"])
        .args(good)
        .args(["--key", "app passphrase"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("--table acounts: no such table"), "{text}");
    let names = ["zoom.api-key".to_owned(), "cnme".to_owned()];
    let owners = ["42".to_owned(), "7".to_owned(), "uid".to_owned()];
    assert!(
        contents(&data, &owners, &names).is_empty(),
        "a mistyped import wrote"
    );
}

/// Ctrl-C, then SIGKILL in the middle of an import, then a rerun: every value ends up
/// exactly once.
#[test]
fn an_interrupted_import_continues_without_duplicates() {
    const ROWS: i64 = 400;
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("big.sqlite3");
    let fernet = strongroom_crypto::django::keys_from_strings(&["k"], true).unwrap();
    let rng = strongroom_crypto::OsRandom;
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE s (id INTEGER PRIMARY KEY, label TEXT, v BLOB)")
            .unwrap();
        let tx = conn.transaction().unwrap();
        for id in 1..=ROWS {
            let token = fernet
                .encrypt(format!("value-{id}").as_bytes(), 1_700_000_000, &rng)
                .unwrap();
            tx.execute(
                "INSERT INTO s VALUES (?1, ?2, ?3)",
                rusqlite::params![id, format!("user-{}", id % 37), token.into_bytes()],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let data = new_target(tmp.path());
    let database = format!("sqlite:{}", db.display());
    let args = |cmd: &mut Command| {
        cmd.args(["import", "django-fernet-fields", "--data-dir"])
            .arg(&data)
            .args([
                "--database",
                &database,
                "--table",
                "s",
                "--owner-column",
                "label",
            ])
            .args(["--map", "v=api-key", "--key", "k", "--batch", "1"])
            .env_remove("STRONGROOM_DATA_DIR")
            .env_remove("STRONGROOM_CONFIG");
    };
    // Ctrl-C once some rows are in: it stops after the batch in hand, prints its report
    // and exits 130.
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("strongroom"));
    args(&mut cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 && !line.starts_with("import: 10/") {
        line.clear();
    }
    let interrupt = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupt.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(130), "{stdout}\n{rest}");
    assert!(rest.contains("interrupted after"), "{rest}");
    let first = count(&stdout, "values imported:");
    assert!((10..ROWS as u64).contains(&first), "{stdout}");
    assert_eq!(count(&stdout, "rows read:"), first, "{stdout}");

    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("strongroom"));
    args(&mut cmd);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill it once some rows are in.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.starts_with("import: 20/") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("strongroom"));
    args(&mut cmd);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let imported = count(&stdout, "values imported:");
    let already = count(&stdout, "already imported:");
    assert!(already >= 20 && imported < ROWS as u64, "{stdout}");
    assert_eq!(imported + already, ROWS as u64, "{stdout}");

    // Every row's value is a version of its owner's credential, exactly once.
    common::rt().block_on(async {
        let b = backends(&data).await;
        let vault = b.vault();
        let mut seen = std::collections::BTreeSet::new();
        for owner in 0..37 {
            let owner = format!("user-{owner}");
            let cred = vault.describe(&owner, "api-key").await.unwrap();
            for v in &cred.versions {
                let row = v.metadata["imported_from"]["row_id"].as_i64().unwrap();
                assert!(seen.insert(row), "row {row} imported twice");
                assert_eq!(row % 37, owner[5..].parse::<i64>().unwrap());
            }
            // The current version is the highest row of this owner.
            let current = vault.reveal(&owner, "api-key", None).await.unwrap();
            let last = (1..=ROWS)
                .filter(|i| format!("user-{}", i % 37) == owner)
                .max();
            assert_eq!(
                current.value.expose_secret(),
                format!("value-{}", last.unwrap()).as_bytes()
            );
        }
        assert_eq!(seen.len(), ROWS as usize);
        drop(vault);
        b.close().await;
    });
}

#[test]
fn usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = |extra: &[&str]| {
        strongroom()
            .args(["import", "django-fernet-fields", "--data-dir"])
            .arg(tmp.path().join("data"))
            .args(["--table", "t", "--owner-column", "o"])
            .args(extra)
            .output()
            .unwrap()
    };
    // No keys.
    let out = base(&["--database", "sqlite:/nonexistent", "--map", "c=n"]);
    assert_eq!(out.status.code(), Some(2));
    // No names: the error and usage show both ways to give them, each in full.
    for extra in [&[][..], &["--value-column", "v"]] {
        let out = base(&[&["--database", "sqlite:/x", "--key", "k"][..], extra].concat());
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--map <COLUMN=NAME>")
                && err.contains("--name-column <COLUMN> --value-column <COLUMN>"),
            "{err}"
        );
    }
    let out = base(&[
        "--database",
        "sqlite:/x",
        "--key",
        "k",
        "--name-column",
        "n",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--value-column"), "{err}");
    // Bad credential name.
    let out = base(&[
        "--database",
        "sqlite:/x",
        "--map",
        "c=Bad Name",
        "--key",
        "k",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // Unknown database scheme.
    let out = base(&["--database", "mysql://x", "--map", "c=n", "--key", "k"]);
    assert_eq!(out.status.code(), Some(2));
    // HKDF off needs real Fernet keys; the key is never echoed.
    let out = base(&[
        "--database",
        "sqlite:/x",
        "--map",
        "c=n",
        "--key",
        "passphrase-canary",
        "--no-hkdf",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("passphrase-canary"));
    // SECRET_KEY in the environment does not get in the way of explicit keys (a dry run:
    // the source below is missing, so the run fails on it, not on the arguments).
    let out = strongroom()
        .args(["import", "django-fernet-fields", "--dry-run"])
        .args(["--database", "sqlite:/nonexistent.sqlite3", "--table", "t"])
        .args(["--owner-column", "o", "--map", "c=n", "--key", "k"])
        .env("STRONGROOM_IMPORT_SECRET_KEY", "env-secret-canary")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("cannot be used with"), "{err}");
    assert!(!err.contains("env-secret-canary"), "{err}");
    // ...while --secret-key beside --key or --key-file is refused, not dropped.
    for other in [["--key", "k"], ["--key-file", "/nonexistent/keys"]] {
        let out = strongroom()
            .args(["import", "django-fernet-fields", "--dry-run"])
            .args(["--database", "sqlite:/nonexistent.sqlite3", "--table", "t"])
            .args(["--owner-column", "o", "--map", "c=n"])
            .args(other)
            .args(["--secret-key", "flag-secret-canary"])
            .env_remove("STRONGROOM_IMPORT_SECRET_KEY")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot be used with"), "{err}");
        assert!(!err.contains("flag-secret-canary"), "{err}");
    }
    // The variable alone is a key (the run goes on to fail on the missing source); with
    // nothing, the error names every way to give one.
    let keyless = |env: Option<&str>| {
        let mut cmd = strongroom();
        cmd.args(["import", "django-fernet-fields", "--dry-run"])
            .args(["--database", "sqlite:/nonexistent.sqlite3", "--table", "t"])
            .args(["--owner-column", "o", "--map", "c=n"])
            .env_remove("STRONGROOM_IMPORT_SECRET_KEY");
        if let Some(v) = env {
            cmd.env("STRONGROOM_IMPORT_SECRET_KEY", v);
        }
        String::from_utf8_lossy(&cmd.output().unwrap().stderr).into_owned()
    };
    let err = keyless(Some("env-secret-canary"));
    assert!(!err.contains("give the Django keys"), "{err}");
    assert!(err.contains("nonexistent.sqlite3"), "{err}");
    assert!(!err.contains("env-secret-canary"), "{err}");
    let out = strongroom()
        .args(["import", "django-fernet-fields", "--dry-run"])
        .args(["--database", "sqlite:/nonexistent.sqlite3", "--table", "t"])
        .args(["--owner-column", "o", "--map", "c=n", "--secret-key", ""])
        .env_remove("STRONGROOM_IMPORT_SECRET_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret-key is empty"));
    for unset in [None, Some("")] {
        let err = keyless(unset);
        assert!(
            err.contains("give the Django keys") && err.contains("STRONGROOM_IMPORT_SECRET_KEY"),
            "{unset:?}: {err}"
        );
    }
    // An unreachable PostgreSQL source says why.
    let out = base(&[
        "--database",
        "postgresql://u@127.0.0.1:1/db",
        "--map",
        "c=n",
        "--key",
        "k",
        "--dry-run",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Online: into the store of a running `serve --dev`, revealed over HTTPS by the dev service.

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn imports_into_a_running_server_and_reveals_over_https() {
    let v = vectors("dff-v2-0.9_django-6.1", "a_single_key_hkdf");
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("django.sqlite3");
    std::fs::copy(&v.sqlite, &db).unwrap();
    let data = tmp.path().join("data");
    let server = start_dev(&data, &[]);
    let service = server.export("SERVICE");

    let mut args = key_args(&v.json["settings"]);
    args.extend(map_args());
    let database = format!("sqlite:{}", db.display());
    let (ok, out, err) = import(&data, &database, "vault_secret", &args);
    assert!(ok, "{out}\n{err}");
    let (ok, out, err) = import(&data, &database, "vault_secret", &args);
    assert!(ok, "{out}\n{err}");
    assert_eq!(count(&out, "values imported:"), 0);

    let ca = std::fs::read(data.join("tls/ca.pem")).unwrap();
    let client = TestClient::new(server.addr, ClientOptions::new(ca)).unwrap();
    common::rt().block_on(async {
        for x in v.json["vectors"].as_array().unwrap() {
            let (label, column) = (x["label"].as_str().unwrap(), x["column"].as_str().unwrap());
            let path = format!(
                "/v1/owners/{}/credentials/{}/reveal",
                percent(label),
                cred_name(column)
            );
            let r = client
                .json("POST", &path, Some(&service), &json!({}))
                .await
                .unwrap();
            if skipped(x) {
                assert_eq!(r.status, 404, "{label}/{column}");
                continue;
            }
            assert_eq!(r.status, 200, "{label}/{column}: {}", r.text());
            assert_eq!(r.json()["version"], 1, "{label}/{column}");
            assert!(
                r.json()["value"] == x["plaintext_utf8"],
                "{label}/{column}: value differs"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// PostgreSQL: the same rows in bytea (and text) columns.

fn postgres_url() -> Option<String> {
    match std::env::var("STRONGROOM_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("STRONGROOM_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "STRONGROOM_REQUIRE_POSTGRES=1 but STRONGROOM_TEST_POSTGRES_URL is unset"
            );
            eprintln!(
                "SKIPPED (loudly): STRONGROOM_TEST_POSTGRES_URL is unset; the PostgreSQL \
                 import test did not run (scripts/lib/postgres.sh pg_start sets it)"
            );
            None
        }
    }
}

#[test]
fn imports_the_vectors_from_postgres_bytea_and_text_columns() {
    let Some(url) = postgres_url() else { return };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!("dff_import_{}_{nanos}", std::process::id());
    let rt = common::rt();
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
        .unwrap();
    rt.spawn(async move {
        let _ = conn.await;
    });
    rt.block_on(client.batch_execute(&format!("CREATE SCHEMA {schema}")))
        .unwrap();

    for folder in FOLDERS {
        for setup in SETUPS {
            for column_type in ["bytea", "text"] {
                let what = format!("{folder}/{setup}/{column_type}");
                let v = vectors(folder, setup);
                let table = format!("{schema}.t_{}_{setup}_{column_type}", folder.len());
                // Django's DDL for the model on PostgreSQL (columns `bytea NULL`).
                let cols: Vec<String> = COLUMNS
                    .iter()
                    .map(|c| format!("\"{c}\" {column_type} NULL"))
                    .collect();
                rt.block_on(client.batch_execute(&format!(
                    "CREATE TABLE {table} (\"id\" integer NOT NULL PRIMARY KEY \
                     GENERATED BY DEFAULT AS IDENTITY, \"label\" varchar(100) NOT NULL, {})",
                    cols.join(", ")
                )))
                .unwrap();
                let mut rows: BTreeMap<u64, (String, BTreeMap<String, Option<String>>)> =
                    BTreeMap::new();
                for x in v.json["vectors"].as_array().unwrap() {
                    let e = rows
                        .entry(x["row_id"].as_u64().unwrap())
                        .or_insert_with(|| {
                            (x["label"].as_str().unwrap().to_owned(), BTreeMap::new())
                        });
                    e.1.insert(
                        x["column"].as_str().unwrap().to_owned(),
                        x["token"].as_str().map(str::to_owned),
                    );
                }
                let placeholders: Vec<String> =
                    (3..3 + COLUMNS.len()).map(|i| format!("${i}")).collect();
                let insert = format!(
                    "INSERT INTO {table} (id, label, {}) VALUES ($1, $2, {})",
                    COLUMNS
                        .iter()
                        .map(|c| format!("\"{c}\""))
                        .collect::<Vec<_>>()
                        .join(", "),
                    placeholders.join(", ")
                );
                rt.block_on(async {
                    for (id, (label, tokens)) in &rows {
                        let id = *id as i32;
                        let bytes: Vec<Option<Vec<u8>>> = COLUMNS
                            .iter()
                            .map(|c| tokens[*c].as_ref().map(|t| t.as_bytes().to_vec()))
                            .collect();
                        let texts: Vec<Option<String>> =
                            COLUMNS.iter().map(|c| tokens[*c].clone()).collect();
                        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                            vec![&id, label];
                        if column_type == "bytea" {
                            params.extend(
                                bytes
                                    .iter()
                                    .map(|b| b as &(dyn tokio_postgres::types::ToSql + Sync)),
                            );
                        } else {
                            params.extend(
                                texts
                                    .iter()
                                    .map(|t| t as &(dyn tokio_postgres::types::ToSql + Sync)),
                            );
                        }
                        client.execute(&insert, &params).await.unwrap();
                    }
                });

                let tmp = tempfile::tempdir().unwrap();
                let data = new_target(tmp.path());
                let mut args = key_args(&v.json["settings"]);
                args.extend(map_args());
                args.extend(["--batch".to_owned(), "5".to_owned()]);
                let (ok, out, err) = import(&data, &url, &table, &args);
                assert!(ok, "{what}: {out}\n{err}");
                check_target(&data, &v.json, &table, &[]);
                let (ok, out, err) = import(&data, &url, &table, &args);
                assert!(ok, "{what}: {out}\n{err}");
                assert_eq!(count(&out, "values imported:"), 0, "{what}");
            }
        }
    }
    rt.block_on(client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")))
        .unwrap();
}

/// An owner at `store.max_credentials_per_owner` gets no new credential from an import: the
/// value is listed as not created, the other values (other owners, and new versions of what
/// the owner has) go on, the command fails saying why, and a re-run under a larger quota
/// imports what was left.
#[test]
fn an_import_reports_the_values_its_quota_refuses_and_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.sqlite3");
    let fernet = strongroom_crypto::django::keys_from_strings(&["app passphrase"], true).unwrap();
    let rng = strongroom_crypto::OsRandom;
    let enc = |s: &str| fernet.encrypt(s.as_bytes(), 1_700_000_000, &rng).unwrap();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL,
                 service TEXT, token TEXT)",
        )
        .unwrap();
        let rows = [
            (1, 42, "zoom.api-key", "s1"),
            (2, 42, "slack.token", "s2"),
            (3, 42, "github.token", "s3"),
            (4, 7, "zoom.api-key", "s4"),
        ];
        for (id, user, service, token) in rows {
            conn.execute(
                "INSERT INTO accounts VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![id, user, service, enc(token)],
            )
            .unwrap();
        }
    }
    let database = format!("sqlite:{}", db.display());
    let data = new_target(tmp.path());
    let run = |quota: &str| {
        let out = strongroom()
            .env("STRONGROOM_STORE__MAX_CREDENTIALS_PER_OWNER", quota)
            .args(["import", "django-fernet-fields", "--data-dir"])
            .arg(&data)
            .args(["--database", &database, "--table", "accounts"])
            .args(["--owner-column", "user_id", "--name-column", "service"])
            .args(["--value-column", "token", "--key", "app passphrase"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run("2");
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert_eq!(count(&stdout, "values imported:"), 3, "{stdout}");
    assert_eq!(
        count(&stdout, "not created, owner at its credential quota:"),
        1
    );
    assert_eq!(count(&stdout, "rows failed:"), 0);
    assert!(
        stdout.contains("row 3 column token: not created: the owner already has"),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 value(s) not imported") && stderr.contains("max_credentials_per_owner"),
        "{stderr}"
    );
    assert!(!stdout.contains("s3") && !stderr.contains("s3"));
    let names = ["zoom.api-key", "slack.token", "github.token"].map(str::to_owned);
    let found = contents(&data, &["42".to_owned(), "7".to_owned()], &names);
    let keys: Vec<_> = found.keys().map(|(o, n)| format!("{o}/{n}")).collect();
    assert_eq!(
        keys,
        ["42/slack.token", "42/zoom.api-key", "7/zoom.api-key"]
    );

    // A larger quota: the rest comes in, nothing twice.
    let (code, stdout, stderr) = run("3");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert_eq!(count(&stdout, "values imported:"), 1, "{stdout}");
    assert_eq!(count(&stdout, "already imported:"), 3, "{stdout}");
    assert_eq!(
        count(&stdout, "not created, owner at its credential quota:"),
        0
    );
    let found = contents(&data, &["42".to_owned()], &names);
    assert_eq!(found.len(), 3);
}
