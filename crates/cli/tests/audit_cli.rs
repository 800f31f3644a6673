//! `strongroom audit verify|head|export` on an honest log and on logs tampered with directly
//! in the SQLite database (change a field, delete, swap, truncate, roll back the head).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use assert_cmd::Command;
use strongroom_crypto::OsRandom;
use strongroom_server::config::{Config, Overrides};
use strongroom_store::audit::Event;

fn event(i: u64) -> Event {
    Event {
        time: time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
            + time::Duration::seconds(i as i64),
        principal_kind: "service".into(),
        principal_id: "billing".into(),
        action: if i.is_multiple_of(2) { "reveal" } else { "put" }.into(),
        owner: Some("alice".into()),
        name: Some("zoom.api-key".into()),
        version: Some(1),
        outcome: "ok".into(),
        status: 200,
        request_id: Some(format!("req-{i}")),
        client_addr: Some("127.0.0.1:5000".into()),
        on_behalf_of: None,
        destination: None,
        error_code: None,
    }
}

/// A dev-layout data dir holding a keyring and a log of 50 records; returns the dir and the
/// raw head row after the first 30 records (a genuine, older head).
fn populate() -> (tempfile::TempDir, (i64, Vec<u8>, Vec<u8>)) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    strongroom_keys::local::generate(
        &data.join("keyring.json"),
        time::OffsetDateTime::now_utc(),
        &OsRandom,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let old_head = rt.block_on(async {
        let config = Config::load_for_operator(
            None,
            &Overrides {
                data_dir: Some(data.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let backends = strongroom_server::Backends::open(&config).await.unwrap();
        let key = strongroom_core::audit::load_or_create_head_key(
            backends.store.as_ref(),
            backends.keyring.as_ref(),
            &OsRandom,
        )
        .await
        .unwrap();
        let key = Arc::new(key);
        let log = backends.store.audit_log().unwrap();
        log.audit_append(key.clone(), (1..=30).map(event).collect())
            .await
            .unwrap();
        let old = raw_head(&db(&data));
        for i in 31..=50 {
            log.audit_append(key.clone(), vec![event(i)]).await.unwrap();
        }
        backends.close().await;
        old
    });
    (dir, old_head)
}

fn db(data: &Path) -> PathBuf {
    data.join("strongroom.db")
}

fn raw_head(path: &Path) -> (i64, Vec<u8>, Vec<u8>) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT count, hash, mac FROM audit_head", [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
    .unwrap()
}

fn tamper(data: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db(data)).unwrap();
    conn.execute_batch(sql).unwrap();
}

fn strongroom() -> Command {
    let mut c = Command::cargo_bin("strongroom").unwrap();
    c.env_remove("STRONGROOM_CONFIG")
        .env_remove("STRONGROOM_DATA_DIR");
    c
}

fn verify(data: &Path) -> (bool, String) {
    let out = strongroom()
        .args(["audit", "verify", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn copy_of(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn expect_failure(data: &Path, sql: &str, needle: &str) {
    let copy = copy_of(data);
    tamper(copy.path(), sql);
    let (ok, text) = verify(copy.path());
    assert!(!ok, "verify passed after `{sql}`: {text}");
    assert!(
        text.contains(needle),
        "after `{sql}` expected {needle:?} in: {text}"
    );
}

/// Starts `serve --dev` on `data` and returns its failure output; panics if it stays up.
fn start_fails(data: &Path) -> String {
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg(assert_cmd::cargo::cargo_bin("strongroom"))
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env_remove("STRONGROOM_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "the server started: {text}"
    );
    text
}

/// A writer of the database without the head key cannot make a server re-seal a forged
/// head: it refuses to start, and appends refuse it too. An empty log is sealed as well, so
/// wiping it is caught.
#[test]
fn a_forged_head_is_never_sealed_again() {
    let (dir, _) = populate();
    let data = dir.path().join("data");

    // Truncated to 21 records, the head's count and hash fixed up, the MAC zeroed.
    let forged = copy_of(&data);
    tamper(
        forged.path(),
        "DELETE FROM audit_records WHERE seq > 21; \
         UPDATE audit_head SET count = 21, hash = (SELECT hash FROM audit_records WHERE seq = 21), \
         mac = zeroblob(32);",
    );
    let text = start_fails(forged.path());
    assert!(
        text.contains("audit log failed its integrity check") && text.contains("MAC"),
        "{text}"
    );
    let (ok, text) = verify(forged.path());
    assert!(!ok && text.contains("MAC does not verify"), "{text}");

    // The head key removed: no new key is made over a sealed head.
    let keyless = copy_of(&data);
    tamper(
        keyless.path(),
        "DELETE FROM provider_state WHERE key = 'audit/head-key';",
    );
    let text = start_fails(keyless.path());
    assert!(text.contains("head key is missing"), "{text}");

    // The whole log wiped and its head reset to the unsealed empty head.
    let wiped = copy_of(&data);
    tamper(
        wiped.path(),
        "DELETE FROM audit_records; UPDATE audit_head SET count = 0, hash = zeroblob(32), mac = X'';",
    );
    let (ok, text) = verify(wiped.path());
    assert!(!ok && text.contains("not sealed"), "{text}");
    // With credential versions in the store, a server does not seal such a log anew. (With
    // none, a wiped log cannot be told from a new one that crashed before its sealing.)
    tamper(
        wiped.path(),
        "INSERT INTO credentials (id, owner, name, latest_version, created_at, updated_at) \
             VALUES (1, 'alice', 'k', 1, 0, 0); \
         INSERT INTO versions (credential_id, version, state, kek_provider, kek_key_id, \
             kek_version, metadata, created_by, created_at, wrapped_key, sealed_value) \
             VALUES (1, 1, 0, 'local', 'k', 1, '{}', 'user:alice', 0, X'00', X'00');",
    );
    let text = start_fails(wiped.path());
    assert!(text.contains("reset outside Strongroom"), "{text}");

    // More versions than put records (the log cut back to an earlier genuine head, down to
    // the sealed empty one, while versions were hidden): the chain verifies, the count not.
    // The log holds 25 puts; the store gets 30 versions.
    let hidden = copy_of(&data);
    tamper(
        hidden.path(),
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30) \
         INSERT INTO credentials (id, owner, name, latest_version, created_at, updated_at) \
             SELECT i, 'alice', 'k' || i, 1, 0, 0 FROM n; \
         INSERT INTO versions (credential_id, version, state, kek_provider, kek_key_id, \
             kek_version, metadata, created_by, created_at, wrapped_key, sealed_value) \
             SELECT id, 1, 0, 'local', 'k', 1, '{}', 'user:alice', 0, X'00', X'00' \
             FROM credentials;",
    );
    let (ok, text) = verify(hidden.path());
    assert!(
        !ok && text.contains("30 active credential versions but the log records only 25 puts"),
        "{text}"
    );
}

#[test]
fn honest_log_verifies_and_every_tampering_is_named() {
    let (dir, (old_count, old_hash, old_mac)) = populate();
    let data = dir.path().join("data");

    let (ok, text) = verify(&data);
    assert!(ok, "{text}");
    assert!(text.contains("50 records"), "{text}");

    // head: JSON with count, hash, mac.
    let out = strongroom()
        .args(["audit", "head", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let head: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(head["count"], 50);
    assert_eq!(head["hash"].as_str().unwrap().len(), 64);
    assert_eq!(head["mac"].as_str().unwrap().len(), 64);
    let pinned = dir.path().join("head.json");
    std::fs::write(&pinned, &out.stdout).unwrap();

    // export: 50 JSON lines in order.
    let out = strongroom()
        .args(["audit", "export", "--format", "jsonl", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 50);
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[49]["seq"], 50);
    assert_eq!(lines[49]["hash"], head["hash"]);

    // Each kind of tampering fails at the right record.
    expect_failure(
        &data,
        "UPDATE audit_records SET principal_id = 'mallory' WHERE seq = 17",
        "record 17: contents do not match its hash",
    );
    // A row that cannot even be read is named too.
    expect_failure(
        &data,
        "UPDATE audit_records SET status = 70000 WHERE seq = 23",
        "audit record 23: audit status out of range",
    );
    expect_failure(
        &data,
        "UPDATE audit_records SET status = 404 WHERE seq = 1",
        "record 1: contents do not match its hash",
    );
    expect_failure(
        &data,
        "DELETE FROM audit_records WHERE seq = 17",
        "record 17: found record numbered 18",
    );
    expect_failure(
        &data,
        "UPDATE audit_records SET seq = 1000 WHERE seq = 10;
         UPDATE audit_records SET seq = 10 WHERE seq = 11;
         UPDATE audit_records SET seq = 11 WHERE seq = 1000;",
        "record 10: does not follow the previous record",
    );
    expect_failure(
        &data,
        "DELETE FROM audit_records WHERE seq > 45",
        "the log has 45 records but the head says 50",
    );
    expect_failure(
        &data,
        "DELETE FROM audit_records WHERE seq = 50",
        "the log has 49 records but the head says 50",
    );
    expect_failure(
        &data,
        "UPDATE audit_head SET mac = zeroblob(32)",
        "MAC does not verify",
    );
    expect_failure(
        &data,
        "UPDATE audit_head SET count = 0, mac = X''",
        "no chain head",
    );
    // The head rolled back to a genuine older head: the records after it are extra.
    expect_failure(
        &data,
        &format!(
            "UPDATE audit_head SET count = {old_count}, hash = X'{}', mac = X'{}'",
            hex(&old_hash),
            hex(&old_mac)
        ),
        "the log has 50 records but the head says 30",
    );

    // The whole log rolled back consistently (records and head) verifies on its own; the
    // head pinned elsewhere catches it.
    let copy = copy_of(&data);
    tamper(
        copy.path(),
        &format!(
            "DELETE FROM audit_records WHERE seq > 30;
             UPDATE audit_head SET count = {old_count}, hash = X'{}', mac = X'{}'",
            hex(&old_hash),
            hex(&old_mac)
        ),
    );
    let (ok, text) = verify(copy.path());
    assert!(ok, "{text}");
    let out = strongroom()
        .args(["audit", "verify", "--data-dir"])
        .arg(copy.path())
        .arg("--expect-head")
        .arg(&pinned)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("30 records but the expected head counts 50"),
        "{err}"
    );
    // And against the honest log the pinned head is fine, and said to be checked.
    let out = strongroom()
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .arg("--expect-head")
        .arg(&pinned)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the head given by --expect-head (record 50) is part of the verified chain"),
        "{text}"
    );
    // A head file that is not there is named.
    let missing = copy.path().join("no-such-head.json");
    let out = strongroom()
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .arg("--expect-head")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-head.json"), "{err}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `audit verify` next to a server that keeps appending: the head it reads and the records
/// after it are one consistent view, so it passes (it used to report the records appended
/// meanwhile as a truncation), while a log cut short still fails.
#[test]
fn verify_passes_while_a_server_appends_and_still_catches_a_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = common::dev::start_dev(&data, &[]);
    let service = server.export("SERVICE");
    let alice = server.export("ALICE");
    let client = server.client(&data);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Eight clients, so that records land while verify scans.
    let load: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            let rounds = rounds.clone();
            let client = client.clone();
            let (alice, service) = (alice.clone(), service.clone());
            rt.spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = client
                        .json(
                            "PUT",
                            &format!("/v1/me/credentials/k{}", n % 20),
                            Some(&alice),
                            &serde_json::json!({"value": "v"}),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r.status, 201);
                    let r = client
                        .json(
                            "POST",
                            &format!("/v1/owners/alice/credentials/k{}/reveal", n % 20),
                            Some(&service),
                            &serde_json::json!({}),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r.status, 200);
                    n += 1;
                    rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                n
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(2000));
    let before = rounds.load(std::sync::atomic::Ordering::Relaxed);
    for round in 0..5 {
        let (ok, text) = verify(&data);
        assert!(ok, "round {round}, under load: {text}");
    }
    // What makes the test: records landed while verify scanned (however fast this machine).
    let during = rounds.load(std::sync::atomic::Ordering::Relaxed) - before;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        rt.block_on(task).unwrap();
    }
    assert!(during > 0, "no records landed while verify ran");
    drop(server);

    // Still caught: the last record gone.
    let (ok, text) = verify(&data);
    assert!(ok, "{text}");
    tamper(
        &data,
        "DELETE FROM audit_records WHERE seq = (SELECT MAX(seq) FROM audit_records)",
    );
    let (ok, text) = verify(&data);
    assert!(!ok && text.contains("truncated"), "{text}");
}

/// A writer of the database that swaps the head row between two genuine heads (an older one
/// and the newest) while verify runs, over a log cut back between them, never gets a pass:
/// whichever heads verify reads, the records must reach each of them.
#[test]
fn swapping_genuine_heads_over_a_cut_log_never_passes() {
    let (dir, (old_count, old_hash, old_mac)) = populate();
    let data = dir.path().join("data");
    let (new_count, new_hash, new_mac) = raw_head(&db(&data));
    assert_eq!((old_count, new_count), (30, 50));
    tamper(&data, "DELETE FROM audit_records WHERE seq > 40");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        let path = db(&data);
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .unwrap();
            let heads = [
                (old_count, old_hash, old_mac),
                (new_count, new_hash, new_mac),
            ];
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (count, hash, mac) = &heads[i % 2];
                conn.execute(
                    "UPDATE audit_head SET count = ?1, hash = ?2, mac = ?3",
                    rusqlite::params![count, hash, mac],
                )
                .unwrap();
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    for run in 0..40 {
        let (ok, text) = verify(&data);
        assert!(!ok, "run {run}: a cut log passed: {text}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
}

/// An append never seals over a gap: not after the last record was deleted (the head names a
/// record that is gone), and not after the head was rolled back to an earlier genuine one
/// with later records kept. Either is refused as an integrity failure (the server then
/// stays not ready), not taken as a passing store fault.
#[test]
fn appends_refuse_a_head_that_does_not_end_the_records() {
    let append = |data: &Path| -> Result<(), strongroom_store::StoreError> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let config = Config::load_for_operator(
                None,
                &Overrides {
                    data_dir: Some(data.to_owned()),
                    ..Default::default()
                },
            )
            .unwrap();
            let backends = strongroom_server::Backends::open_existing(&config)
                .await
                .unwrap();
            let key = strongroom_core::audit::load_head_key(
                backends.store.as_ref(),
                backends.keyring.as_ref(),
            )
            .await
            .unwrap()
            .unwrap();
            let log = backends.store.audit_log().unwrap();
            let result = log
                .audit_append(Arc::new(key), vec![event(99)])
                .await
                .map(|_| ());
            backends.close().await;
            result
        })
    };
    // The last record deleted: the head names a record that is gone.
    let (dir, _) = populate();
    let data = dir.path().join("data");
    tamper(&data, "DELETE FROM audit_records WHERE seq = 50");
    let start = start_fails(&data);
    assert!(start.contains("names record 50"), "{start}");
    let e = append(&data).unwrap_err();
    assert!(
        matches!(e, strongroom_store::StoreError::AuditIntegrity { .. }),
        "{e}"
    );
    // The head rolled back to an earlier genuine one, later records kept.
    let (dir, (count, hash, mac)) = populate();
    let data = dir.path().join("data");
    let conn = rusqlite::Connection::open(db(&data)).unwrap();
    conn.execute(
        "UPDATE audit_head SET count = ?1, hash = ?2, mac = ?3",
        rusqlite::params![count, hash, mac],
    )
    .unwrap();
    drop(conn);
    let e = append(&data).unwrap_err();
    assert!(
        matches!(e, strongroom_store::StoreError::AuditIntegrity { .. }),
        "{e}"
    );
    // The last record's contents edited (its stored hash kept): refused at start.
    let (dir, _) = populate();
    let data = dir.path().join("data");
    tamper(
        &data,
        "UPDATE audit_records SET outcome = 'denied' WHERE seq = 50",
    );
    let start = start_fails(&data);
    assert!(start.contains("names record 50"), "{start}");
    // An honest log takes the append.
    let (dir, _) = populate();
    append(&dir.path().join("data")).unwrap();
}

/// `audit export | head -2`: once the reader has gone, export and head end as `cat` would
/// (status 141, nothing on stderr), not with "error: Broken pipe".
#[test]
fn a_reader_that_goes_away_ends_the_export_quietly() {
    let (dir, _) = populate();
    let data = dir.path().join("data");
    for args in [
        &["audit", "export"][..],
        &["audit", "head"],
        &["audit", "verify"],
    ] {
        let out = common::with_stdout_closed(
            common::strongroom_process()
                .args(args)
                .arg("--data-dir")
                .arg(&data),
            b"",
        );
        common::assert_ends_quietly(&out, &format!("{args:?}"));
    }
}
