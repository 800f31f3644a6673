//! `strongroom audit archive` and `audit verify --file`: the older part of the log moves to a
//! file, the log is anchored after it and still verifies; a forged or rolled-back anchor,
//! records removed by hand, a tampered archive file and a crash at any point are caught or
//! survived.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use common::{manifest_dir, operator_config, put_req};
use strongroom_crypto::OsRandom;
use strongroom_store::audit::Event;

const BASE: i64 = 1_700_000_000;

fn event(i: u64, t: i64) -> Event {
    Event {
        time: time::OffsetDateTime::from_unix_timestamp(BASE + t).unwrap(),
        principal_kind: "service".into(),
        principal_id: format!("svc-{}", i % 3),
        action: "reveal".into(),
        owner: Some(format!("owner-{}", i % 4)),
        name: Some(format!("cred-{}", i % 5)),
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

/// A dev-layout data dir with a keyring and a log of `1 + records + 5 + 10 + 1` records:
/// a setup record, `records` events at `BASE + i` s (record `i + 1`), except that record 151
/// (when `records > 150`) is at `BASE + 50` s, as a node with a slow clock would write it;
/// then 5 real puts of alice's credentials (at `BASE + 500` s), 10 events at `BASE + 1000 + j` s, and one
/// more setup record.
fn populate(records: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    populate_with(&data, None, records);
    dir
}

/// [`populate`] into `data` (which exists), with the configuration file `config` if any.
fn populate_with(data: &Path, config: Option<&Path>, records: u64) {
    strongroom_keys::local::generate(
        &data.join("keyring.json"),
        time::OffsetDateTime::now_utc(),
        &OsRandom,
    )
    .unwrap();
    common::rt().block_on(async {
        let backends = strongroom_server::Backends::open(&operator_config(config, data))
            .await
            .unwrap();
        strongroom_server::audit_operator_action(&backends, "test-setup", "ok", None, None)
            .await
            .unwrap();
        let key = Arc::new(
            strongroom_core::audit::load_or_create_head_key(
                backends.store.as_ref(),
                backends.keyring.as_ref(),
                &OsRandom,
            )
            .await
            .unwrap(),
        );
        let log = backends.store.audit_log().unwrap();
        let events: Vec<Event> = (1..=records)
            .map(|i| event(i, if i == 150 { 50 } else { i as i64 }))
            .collect();
        for chunk in events.chunks(4000) {
            log.audit_append(key.clone(), chunk.to_vec()).await.unwrap();
        }
        for i in 0..5u64 {
            let mut put = event(20_000 + i, 500);
            put.principal_kind = "user".into();
            put.principal_id = "alice".into();
            put.action = "put".into();
            put.owner = Some("alice".into());
            put.name = Some(format!("k{i}"));
            backends
                .vault()
                .put_audited(put_req(&format!("k{i}"), "value"), key.clone(), put)
                .await
                .unwrap();
        }
        log.audit_append(
            key.clone(),
            (0..10)
                .map(|j| event(10_000 + j, 1000 + j as i64))
                .collect(),
        )
        .await
        .unwrap();
        strongroom_server::audit_operator_action(&backends, "test-setup", "ok", None, None)
            .await
            .unwrap();
        backends.close().await;
    });
}

fn db(data: &Path) -> PathBuf {
    data.join("strongroom.db")
}

fn sql(data: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db(data)).unwrap();
    conn.execute_batch(sql).unwrap();
}

fn query_i64(data: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(db(data)).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn strongroom() -> Command {
    let mut c = Command::cargo_bin("strongroom").unwrap();
    c.env_remove("STRONGROOM_CONFIG")
        .env_remove("STRONGROOM_DATA_DIR");
    c
}

fn run(args: &[&str], data: &Path) -> (bool, String, String) {
    let out = strongroom()
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn archive(data: &Path, before: &str, out: &Path) -> (bool, String, String) {
    run(
        &[
            "audit",
            "archive",
            "--before",
            before,
            "--output",
            out.to_str().unwrap(),
        ],
        data,
    )
}

fn verify(data: &Path) -> (bool, String) {
    let (ok, out, err) = run(&["audit", "verify"], data);
    (ok, format!("{out}{err}"))
}

fn verify_file(data: &Path, file: &Path) -> (bool, String) {
    let (ok, out, err) = run(&["audit", "verify", "--file", file.to_str().unwrap()], data);
    (ok, format!("{out}{err}"))
}

fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    dir
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The index entries at or before `seq`, in every deferred index table.
fn index_entries_upto(data: &Path, seq: i64) -> i64 {
    // Every deferred audit index there is (a new one is covered without a change here).
    let conn = rusqlite::Connection::open(db(data)).unwrap();
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table' \
             AND name LIKE 'audit\\_by\\_%' ESCAPE '\\' ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tables,
        [
            "audit_by_credential",
            "audit_by_name",
            "audit_by_owner",
            "audit_by_principal"
        ]
    );
    tables
        .iter()
        .map(|t| {
            query_i64(
                data,
                &format!("SELECT count(*) FROM {t} WHERE seq <= {seq}"),
            )
        })
        .sum()
}

#[test]
fn help_explains_the_cut_the_anchor_and_resuming() {
    let out = strongroom()
        .args(["audit", "archive", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--before",
        "--output",
        "--batch",
        "--dry-run",
        "anchor",
        "older than TIME",
        "same command",
        "Safe while servers run",
        "FILE.lock",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let out = strongroom()
        .args([
            "audit",
            "archive",
            "--before",
            "last tuesday",
            "--output",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// By time: the cut is the newest record older than the bound (record 151, written by a slow
/// clock, pulls records 102..150 along); the file is what `audit export` wrote for them; the
/// store keeps the rest, with its index entries gone and its puts still counted; `audit
/// verify` and `audit verify --file` pass; the run is recorded; a second archive goes on
/// from the first.
#[test]
fn archive_by_time_keeps_the_log_verifiable() {
    let dir = populate(300);
    let data = dir.path().join("data");
    let out_dir = tempfile::tempdir().unwrap();
    // A head saved before anything is archived, to check the log against later.
    let saved_head = out_dir.path().join("head.json");
    let (ok, out, err) = run(&["audit", "head"], &data);
    assert!(ok, "{err}");
    std::fs::write(&saved_head, out).unwrap();
    let expect_saved_head = |data: &Path| {
        run(
            &[
                "audit",
                "verify",
                "--expect-head",
                saved_head.to_str().unwrap(),
            ],
            data,
        )
    };
    let file = out_dir.path().join("audit-1.jsonl");
    let export = {
        let (ok, out, err) = run(&["audit", "export"], &data);
        assert!(ok, "{err}");
        out.lines().map(str::to_owned).collect::<Vec<_>>()
    };
    // A planted index entry (outside the chain) at or before the cut goes too.
    sql(
        &data,
        "INSERT INTO audit_by_name (name, seq) VALUES ('planted', 7)",
    );
    let before = rfc3339(BASE + 101); // older: records 2..=101 (times BASE+1..=BASE+100) and 151
    let (ok, out, err) = run(
        &[
            "audit",
            "archive",
            "--before",
            &before,
            "--output",
            file.to_str().unwrap(),
            "--dry-run",
        ],
        &data,
    );
    assert!(ok, "{err}");
    assert!(out.contains("would archive records 1..151"), "{out}");
    // The setup record (record 1, made now) is years newer than the bound: said.
    assert!(
        err.contains("takes out of the store record 1 more than an hour newer than --before"),
        "{err}"
    );
    assert!(!file.exists());

    let (ok, out, err) = archive(&data, &before, &file);
    assert!(ok, "{out}{err}");
    assert!(out.contains("archived records 1..151"), "{out}");
    assert!(err.contains("warning: the cut (record 151"), "{err}");
    // Records seconds out of order are no cause for it.
    let (ok, out, err) = run(
        &[
            "audit",
            "archive",
            "--before",
            &rfc3339(BASE + 160),
            "--output",
            out_dir.path().join("unused.jsonl").to_str().unwrap(),
            "--dry-run",
        ],
        &data,
    );
    assert!(
        ok && out.contains("would archive records 152..160"),
        "{out}{err}"
    );
    assert!(!err.contains("warning"), "{err}");
    // At the end of time: no hour after it to look for newer records in.
    let (ok, out, err) = run(
        &[
            "audit",
            "archive",
            "--before",
            "9999-12-31T23:30:00Z",
            "--output",
            out_dir.path().join("unused.jsonl").to_str().unwrap(),
            "--dry-run",
        ],
        &data,
    );
    assert!(
        ok && out.contains("would archive records 152.."),
        "{out}{err}"
    );
    let archived = lines(&file);
    assert_eq!(archived, export[..151].to_vec());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let anchor: serde_json::Value = common::read_json(&file.with_extension("jsonl.anchor.json"));
    assert_eq!(anchor["version"], 2);
    assert_eq!(anchor["from_seq"], 1);
    assert_eq!(anchor["from_hash"], "0".repeat(64));
    assert_eq!(anchor["seq"], 151);
    assert_eq!(anchor["puts"], 0);
    assert_eq!(query_i64(&data, "SELECT min(seq) FROM audit_records"), 152);
    assert_eq!(index_entries_upto(&data, 151), 0);
    assert!(index_entries_upto(&data, 1_000_000) > 0);
    // The time marks of the archived records went with them (here the first record's, at
    // the setup's time, which no record passes until the head's).
    assert_eq!(
        query_i64(
            &data,
            "SELECT count(*) FROM audit_time_marks WHERE seq <= 151"
        ),
        0
    );

    let (ok, text) = verify(&data);
    assert!(ok, "{text}");
    assert!(text.contains("1..151 archived"), "{text}");
    let (ok, text) = verify_file(&data, &file);
    assert!(ok, "{text}");
    assert!(text.contains("archive OK: 151 records"), "{text}");
    // Recorded: started and ok, in the kept log. An export from before the anchor says
    // where the records in between went; one from after it says nothing.
    let (_, out, err) = run(&["audit", "export"], &data);
    assert!(
        err.contains("note: records 1..151 were archived")
            && err.contains("starts after record 151"),
        "{err}"
    );
    let (_, _, quiet) = run(&["audit", "export", "--after", "151"], &data);
    assert!(!quiet.contains("archived"), "{quiet}");
    let actions: Vec<(String, String)> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == "audit.archive")
        .map(|r| {
            (
                r["outcome"].as_str().unwrap().to_owned(),
                r["principal_kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("started".to_owned(), "operator".to_owned()),
            ("ok".to_owned(), "operator".to_owned())
        ]
    );

    // By seq, past the puts: the anchor counts them, and verify still counts every version.
    let head = query_i64(&data, "SELECT count FROM audit_head");
    let file2 = out_dir.path().join("audit-2.jsonl");
    let (ok, out, err) = archive(&data, &(head - 3).to_string(), &file2);
    assert!(ok, "{out}{err}");
    let anchor: serde_json::Value = common::read_json(&file2.with_extension("jsonl.anchor.json"));
    assert_eq!(anchor["seq"], head - 4);
    assert_eq!(anchor["puts"], 5);
    let (ok, text) = verify(&data);
    assert!(ok, "{text}");
    let (ok, text) = verify_file(&data, &file2);
    assert!(ok, "{text}");
    assert!(text.contains("going on after record 151"), "{text}");
    // The two files chain: the second starts where the first's anchor ends.
    let first_of_2: serde_json::Value = serde_json::from_str(&lines(&file2)[0]).unwrap();
    let a1: serde_json::Value = common::read_json(&file.with_extension("jsonl.anchor.json"));
    assert_eq!(first_of_2["prev_hash"], a1["hash"]);
    // ... and the second's anchor says so.
    let a2: serde_json::Value = common::read_json(&file2.with_extension("jsonl.anchor.json"));
    assert_eq!(a2["from_seq"], 152);
    assert_eq!(a2["from_hash"], a1["hash"]);

    // Nothing older than the bound is left: nothing to do.
    let file3 = out_dir.path().join("audit-3.jsonl");
    let (ok, out, err) = archive(&data, "5", &file3);
    assert!(ok, "{err}");
    assert!(
        out.contains("nothing to archive before that bound: the log holds no record before it (it starts after record "),
        "{out}"
    );
    assert!(!file3.exists());
    // An existing file that is no interrupted run's is never overwritten.
    let (ok, out, err) = archive(&data, &head.to_string(), &file);
    assert!(!ok, "{out}");
    assert!(err.contains("choose another --output"), "{err}");
    assert_eq!(lines(&file), archived);
    // Nor the last archive, finished: named again (with a later bound) it archived nothing,
    // exited 0 and said it had finished an interrupted run. The dry run says the same.
    let records_before = query_i64(&data, "SELECT count(*) FROM audit_records");
    let file2_lines = lines(&file2);
    for dry in [false, true] {
        let mut args = vec!["audit", "archive", "--before", "1000000", "--output"];
        args.push(file2.to_str().unwrap());
        if dry {
            args.push("--dry-run");
        }
        let (ok, out, err) = run(&args, &data);
        assert!(!ok, "{out}");
        assert!(
            err.contains("is a finished archive") && err.contains("choose another --output"),
            "{err}"
        );
    }
    assert_eq!(
        query_i64(&data, "SELECT count(*) FROM audit_records"),
        records_before
    );
    assert_eq!(lines(&file2), file2_lines);

    // The saved head is past the first archives: checked against its record.
    let (ok, out, err) = expect_saved_head(&data);
    assert!(ok, "{out}{err}");
    assert!(out.contains("is part of the verified chain"), "{out}");
    // Archived since (the archives' own records came after it): the anchor vouches for the
    // log up to there, and the answer says the record itself is in the archive.
    let head = query_i64(&data, "SELECT count FROM audit_head");
    let file4 = out_dir.path().join("audit-4.jsonl");
    let (ok, out, err) = archive(&data, &head.to_string(), &file4);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = expect_saved_head(&data);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("is archived (records 1..") && out.contains("audit verify --file"),
        "{out}"
    );
    assert!(!out.contains("is part of the verified chain"), "{out}");

    // Puts counted in the anchor are part of its MAC: lowering them breaks it.
    let copy = copy_dir(&data);
    sql(copy.path(), "UPDATE audit_anchor SET puts = 0");
    let (ok, text) = verify(copy.path());
    assert!(!ok && text.contains("anchor's MAC"), "{text}");
}

/// Tampering with the anchor or with the start of the log is caught by `audit verify`, and
/// `audit archive` refuses to run over it (removing nothing).
#[test]
fn forged_anchors_and_records_removed_by_hand_are_caught() {
    let dir = populate(300);
    let data = dir.path().join("data");
    let out_dir = tempfile::tempdir().unwrap();

    // Without any archive: records removed at the start by hand.
    let copy = copy_dir(&data);
    sql(copy.path(), "DELETE FROM audit_records WHERE seq <= 10");
    let (ok, text) = verify(copy.path());
    assert!(
        !ok && text.contains("record 1: found record numbered 11"),
        "{text}"
    );
    // ... and an anchor planted over them without the key (the head's MAC reused).
    sql(
        copy.path(),
        "INSERT INTO audit_anchor (id, seq, hash, puts, mac)
         SELECT 1, 10, (SELECT prev_hash FROM audit_records WHERE seq = 11), 0, mac
         FROM audit_head",
    );
    let (ok, text) = verify(copy.path());
    assert!(
        !ok && text.contains("anchor's MAC does not verify"),
        "{text}"
    );
    let f = out_dir.path().join("refused.jsonl");
    let (ok, _, err) = archive(copy.path(), "100", &f);
    assert!(!ok && err.contains("anchor does not verify"), "{err}");
    assert!(!f.exists());

    // A tampered record is never archived (and so never laundered into a file).
    let copy = copy_dir(&data);
    sql(
        copy.path(),
        "UPDATE audit_records SET principal_id = 'mallory' WHERE seq = 5",
    );
    let (ok, _, err) = archive(copy.path(), "100", &f);
    assert!(
        !ok && err.contains("record 5: contents do not match"),
        "{err}"
    );
    assert_eq!(
        query_i64(copy.path(), "SELECT min(seq) FROM audit_records"),
        1
    );
    assert_eq!(
        query_i64(copy.path(), "SELECT count(*) FROM audit_anchor"),
        0
    );

    // Two genuine archives; then every change to the anchor or the start is caught.
    let f1 = out_dir.path().join("a1.jsonl");
    let f2 = out_dir.path().join("a2.jsonl");
    assert!(archive(&data, "101", &f1).0);
    let first_anchor: (i64, Vec<u8>, i64, Vec<u8>) = {
        let conn = rusqlite::Connection::open(db(&data)).unwrap();
        conn.query_row("SELECT seq, hash, puts, mac FROM audit_anchor", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap()
    };
    assert!(archive(&data, "201", &f2).0);
    assert!(verify(&data).0);
    let cases: Vec<(String, &str)> = vec![
        (
            "UPDATE audit_anchor SET seq = seq + 1".into(),
            "anchor's MAC does not verify",
        ),
        (
            "UPDATE audit_anchor SET hash = (SELECT hash FROM audit_records WHERE seq = 201)"
                .into(),
            "anchor's MAC does not verify",
        ),
        (
            "UPDATE audit_anchor SET mac = zeroblob(32)".into(),
            "anchor's MAC does not verify",
        ),
        // The anchor removed: the log seems to start at 1, and does not.
        (
            "DELETE FROM audit_anchor".into(),
            "record 1: found record numbered 201",
        ),
        // Rolled back to the first, genuine, anchor: records 101..200 are missing.
        (
            format!(
                "UPDATE audit_anchor SET seq = {}, hash = X'{}', puts = {}, mac = X'{}'",
                first_anchor.0,
                hex::encode(&first_anchor.1),
                first_anchor.2,
                hex::encode(&first_anchor.3)
            ),
            "record 101: found record numbered 201",
        ),
        // Records after the anchor removed by hand.
        (
            "DELETE FROM audit_records WHERE seq <= 210".into(),
            "record 201: found record numbered 211",
        ),
        // The first kept record edited.
        (
            "UPDATE audit_records SET owner = 'eve' WHERE seq = 201".into(),
            "record 201: contents do not match",
        ),
    ];
    for (tamper, needle) in cases {
        let copy = copy_dir(&data);
        sql(copy.path(), &tamper);
        let (ok, text) = verify(copy.path());
        assert!(!ok, "verify passed after `{tamper}`: {text}");
        assert!(
            text.contains(needle),
            "after `{tamper}` expected {needle:?} in: {text}"
        );
    }
}

/// An archive file checks on its own against its anchor: an edited, removed or added record,
/// a cut end, or an edited anchor file fails.
#[test]
fn a_tampered_archive_file_fails_verify_file() {
    let dir = populate(300);
    let data = dir.path().join("data");
    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("a.jsonl");
    assert!(archive(&data, "201", &file).0);
    assert!(verify_file(&data, &file).0);
    let anchor_file = file.with_extension("jsonl.anchor.json");
    let good = lines(&file);
    let good_anchor = std::fs::read_to_string(&anchor_file).unwrap();
    let write = |l: &[String]| std::fs::write(&file, l.join("\n") + "\n").unwrap();

    let mut edited = good.clone();
    edited[50] = edited[50].replace("svc-", "svx-");
    let mut removed = good.clone();
    removed.remove(50);
    let mut cut = good.clone();
    cut.pop();
    let mut added = good.clone();
    added.push(good[199].clone());
    for (what, l, needle) in [
        (
            "edited",
            edited,
            "line 51: record 51: contents do not match",
        ),
        (
            "removed",
            removed,
            "line 51: record 51: found record numbered 52",
        ),
        (
            "cut",
            cut,
            "ends at record 199 but its anchor names record 200",
        ),
        (
            "added",
            added,
            "line 201: record 201: found record numbered 200",
        ),
    ] {
        write(&l);
        let (ok, text) = verify_file(&data, &file);
        assert!(!ok, "{what}: {text}");
        assert!(
            text.contains(needle),
            "{what}: expected {needle:?} in {text}"
        );
    }
    write(&good);
    assert!(verify_file(&data, &file).0);
    let mut a: serde_json::Value = serde_json::from_str(&good_anchor).unwrap();
    a["puts"] = 7.into();
    std::fs::write(&anchor_file, a.to_string()).unwrap();
    let (ok, text) = verify_file(&data, &file);
    assert!(
        !ok && text.contains("anchor's MAC does not verify"),
        "{text}"
    );
    std::fs::remove_file(&anchor_file).unwrap();
    let (ok, text) = verify_file(&data, &file);
    assert!(!ok && text.contains("anchor.json"), "{text}");
}

/// The store's anchor row (a version 1 anchor: the end only) as an anchor file.
fn store_anchor_json(data: &Path) -> String {
    let conn = rusqlite::Connection::open(db(data)).unwrap();
    let (seq, hash, puts, mac): (i64, Vec<u8>, i64, Vec<u8>) = conn
        .query_row("SELECT seq, hash, puts, mac FROM audit_anchor", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap();
    serde_json::json!({
        "seq": seq,
        "hash": hex::encode(hash),
        "puts": puts,
        "mac": hex::encode(mac),
    })
    .to_string()
}

/// An archive's anchor (version 2) MACs where the file starts: a first or later archive with
/// its first records cut off, another archive's records put before it, its first record's
/// link replaced, or the start edited in the anchor file, all fail `verify --file` (non-zero
/// exit, a message naming the start); a file cut at the start and an anchor edited to match
/// fails on the MAC.
#[test]
fn the_start_of_an_archive_is_checked_against_its_anchor() {
    let dir = populate(300);
    let data = dir.path().join("data");
    let out_dir = tempfile::tempdir().unwrap();
    let f1 = out_dir.path().join("s1.jsonl");
    let f2 = out_dir.path().join("s2.jsonl");
    assert!(archive(&data, "101", &f1).0);
    assert!(archive(&data, "201", &f2).0);
    let (ok, text) = verify_file(&data, &f1);
    assert!(ok && text.contains("from the start of the log"), "{text}");
    assert!(text.contains("chain verified from the start"), "{text}");
    assert!(!text.contains("warning"), "{text}");
    let (ok, text) = verify_file(&data, &f2);
    assert!(ok && text.contains("going on after record 100"), "{text}");
    let (l1, l2) = (lines(&f1), lines(&f2));
    let (a1_file, a2_file) = (
        f1.with_extension("jsonl.anchor.json"),
        f2.with_extension("jsonl.anchor.json"),
    );
    let a2_text = std::fs::read_to_string(&a2_file).unwrap();
    let write = |f: &Path, l: &[String]| std::fs::write(f, l.join("\n") + "\n").unwrap();

    // The first archive with its first records cut off (under a v1 anchor, this verified as
    // "going on after record 5").
    write(&f1, &l1[5..]);
    let (ok, text) = verify_file(&data, &f1);
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "line 1: the file starts at record 6 but its anchor says it starts at record 1"
        ),
        "{text}"
    );
    write(&f1, &l1);
    assert!(verify_file(&data, &f1).0);

    // A later archive: cut at the start; the earlier archive's records put before it (a
    // whole chain from record 1 to its end); one record of the earlier archive before it.
    let mut joined = l1.clone();
    joined.extend(l2.iter().cloned());
    let mut one_more = vec![l1[99].clone()];
    one_more.extend(l2.iter().cloned());
    // Its first record rehashed over another link: the chain from there on is intact, its
    // start is not the one its anchor names.
    let mut relinked: Vec<serde_json::Value> = l2
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first_l1: serde_json::Value = serde_json::from_str(&l1[0]).unwrap();
    relinked[0]["prev_hash"] = first_l1["hash"].clone();
    let relinked: Vec<String> = relinked.iter().map(|v| v.to_string()).collect();
    for (what, l, needle) in [
        (
            "cut",
            l2[3..].to_vec(),
            "line 1: the file starts at record 104 but its anchor says it starts at record 101",
        ),
        (
            "prepended",
            joined,
            "line 1: the file starts at record 1 but its anchor says it starts at record 101",
        ),
        (
            "one prepended",
            one_more,
            "line 1: the file starts at record 100 but its anchor says it starts at record 101",
        ),
        (
            "relinked",
            relinked,
            "line 1: record 101 does not chain from the hash its anchor starts from",
        ),
    ] {
        write(&f2, &l);
        let (ok, text) = verify_file(&data, &f2);
        assert!(!ok, "{what}: {text}");
        assert!(
            text.contains(needle),
            "{what}: expected {needle:?} in {text}"
        );
    }
    write(&f2, &l2);
    assert!(verify_file(&data, &f2).0);

    // The start edited in the anchor file, alone or with the file cut to match it.
    let a2: serde_json::Value = serde_json::from_str(&a2_text).unwrap();
    let a1: serde_json::Value = common::read_json(&a1_file);
    let mut from_seq = a2.clone();
    from_seq["from_seq"] = 104.into();
    let mut from_hash = a2.clone();
    from_hash["from_hash"] = a1["from_hash"].clone();
    let mut unversioned = a2.clone();
    unversioned.as_object_mut().unwrap().remove("version");
    let mut v3 = a2.clone();
    v3["version"] = 3.into();
    for (what, anchor, file, needle) in [
        (
            "from_seq",
            &from_seq,
            &l2[..],
            "anchor's MAC does not verify",
        ),
        (
            "from_seq and cut",
            &from_seq,
            &l2[3..],
            "anchor's MAC does not verify",
        ),
        (
            "from_hash",
            &from_hash,
            &l2[..],
            "anchor's MAC does not verify",
        ),
        (
            "no version",
            &unversioned,
            &l2[..],
            "not an anchor written by `audit archive`",
        ),
        ("version 3", &v3, &l2[..], "an anchor version this build"),
    ] {
        write(&f2, file);
        std::fs::write(&a2_file, anchor.to_string()).unwrap();
        let (ok, text) = verify_file(&data, &f2);
        assert!(!ok, "{what}: {text}");
        assert!(
            text.contains(needle),
            "{what}: expected {needle:?} in {text}"
        );
    }
    // Its start removed altogether: read as a version 1 anchor, whose MAC it is not.
    let mut stripped = a2.clone();
    for field in ["version", "from_seq", "from_hash"] {
        stripped.as_object_mut().unwrap().remove(field);
    }
    write(&f2, &l2);
    std::fs::write(&a2_file, stripped.to_string()).unwrap();
    let (ok, text) = verify_file(&data, &f2);
    assert!(
        !ok && text.contains("anchor's MAC does not verify"),
        "{text}"
    );
    std::fs::write(&a2_file, &a2_text).unwrap();
    assert!(verify_file(&data, &f2).0);
}

/// A version 1 anchor file (written before anchors covered the start; the store's anchor
/// row has that form, so anyone who reads the database can make one) is refused by default.
/// With --accept-version-1-anchor such an archive still verifies, with a warning that the
/// start is not checked; and an interrupted run that left one is still finished by running
/// it again.
#[test]
fn version_1_anchor_files_are_refused_unless_accepted() {
    let dir = populate(300);
    let data = dir.path().join("data");
    let out_dir = tempfile::tempdir().unwrap();
    let f1 = out_dir.path().join("old-1.jsonl");
    assert!(archive(&data, "101", &f1).0);
    let after_first = copy_dir(&data);
    let f2 = out_dir.path().join("old-2.jsonl");
    assert!(archive(&data, "201", &f2).0);
    let a2_file = f2.with_extension("jsonl.anchor.json");
    std::fs::write(&a2_file, store_anchor_json(&data)).unwrap();
    let (ok, out, err) = run(&["audit", "verify", "--file", f2.to_str().unwrap()], &data);
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("version 1 anchor") && err.contains("--accept-version-1-anchor"),
        "{err}"
    );
    assert!(!out.contains("archive OK"), "{out}");
    let accepted = |f: &Path| {
        run(
            &[
                "audit",
                "verify",
                "--file",
                f.to_str().unwrap(),
                "--accept-version-1-anchor",
            ],
            &data,
        )
    };
    let (ok, out, err) = accepted(&f2);
    assert!(ok, "{out}{err}");
    assert!(out.contains("archive OK: 100 records, 101..200"), "{out}");
    assert!(out.contains("going on after record 100"), "{out}");
    assert!(
        out.contains("version 1 anchor, which does not cover the start"),
        "{out}"
    );
    assert!(
        err.contains("warning") && err.contains("version 1 anchor"),
        "{err}"
    );
    // What a version 1 anchor cannot show: its file cut at the start still verifies.
    let l2 = lines(&f2);
    std::fs::write(&f2, l2[5..].join("\n") + "\n").unwrap();
    let (ok, out, err) = run(&["audit", "verify", "--file", f2.to_str().unwrap()], &data);
    assert!(!ok, "{out}{err}");
    let (ok, out, err) = accepted(&f2);
    assert!(
        ok && out.contains("going on after record 105"),
        "{out}{err}"
    );
    assert!(err.contains("warning"), "{err}");
    std::fs::write(&f2, l2.join("\n") + "\n").unwrap();
    // A run that wrote these files (with a version 1 anchor) and stopped before it anchored
    // the store is finished by running it again.
    let (ok, out, err) = archive(after_first.path(), "201", &f2);
    assert!(ok, "{out}{err}");
    assert!(out.contains("finished the interrupted archive"), "{out}");
    assert_eq!(
        query_i64(after_first.path(), "SELECT min(seq) FROM audit_records"),
        201
    );
    assert!(verify(after_first.path()).0);
    // Its start checked against the store's anchor, the finished archive now has a version 2
    // anchor: it verifies without the option, and its start is covered again.
    let rewritten: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&a2_file).unwrap()).unwrap();
    assert_eq!(rewritten["version"], 2, "{rewritten}");
    assert_eq!(rewritten["from_seq"], 101, "{rewritten}");
    let (ok, out, err) = run(
        &["audit", "verify", "--file", f2.to_str().unwrap()],
        after_first.path(),
    );
    assert!(ok && !err.contains("warning"), "{out}{err}");
    std::fs::write(&f2, l2[5..].join("\n") + "\n").unwrap();
    let (ok, _, err) = run(
        &["audit", "verify", "--file", f2.to_str().unwrap()],
        after_first.path(),
    );
    assert!(!ok && err.contains("cut off"), "{err}");
}

/// Several archives given together, oldest first, are checked to follow one another (none
/// missing, swapped or out of order), and the report says where the store's log goes on.
#[test]
fn several_archives_are_checked_to_follow_one_another() {
    let dir = populate(300);
    let data = dir.path().join("data");
    let out_dir = tempfile::tempdir().unwrap();
    let f: Vec<PathBuf> = ["a.jsonl", "b.jsonl", "c.jsonl"]
        .iter()
        .map(|n| out_dir.path().join(n))
        .collect();
    for (before, file) in ["101", "201", "251"].iter().zip(&f) {
        let (ok, out, err) = archive(&data, before, file);
        assert!(ok, "{out}{err}");
    }
    let check = |files: &[&PathBuf]| {
        let mut args = vec!["audit", "verify"];
        for file in files {
            args.extend(["--file", file.to_str().unwrap()]);
        }
        run(&args, &data)
    };
    let (ok, out, err) = check(&[&f[0], &f[1], &f[2]]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("archives OK: 3 files follow one another without a gap, records 1..250"),
        "{out}"
    );
    assert!(out.contains("the store's log goes on from"), "{out}");
    // A later run of them.
    let (ok, out, err) = check(&[&f[1], &f[2]]);
    assert!(ok && out.contains("records 101..250"), "{out}{err}");
    // One alone, older than the store's anchor.
    let (ok, out, err) = check(&[&f[0]]);
    assert!(
        ok && out.contains("the store's log starts after record 250"),
        "{out}{err}"
    );
    // One missing, two swapped, one given twice: each fails, naming the file.
    for files in [
        vec![&f[0], &f[2]],
        vec![&f[1], &f[0]],
        vec![&f[0], &f[1], &f[1]],
    ] {
        let (ok, out, err) = check(&files);
        assert!(!ok, "{files:?}: {out}");
        assert!(
            err.contains("does not go on where") && err.contains("missing, swapped"),
            "{err}"
        );
        assert!(!out.contains("archives OK"), "{out}");
    }
}

/// Holds the exclusive lock a run takes on `FILE.lock`, as a run in progress would.
fn hold_lock(file: &Path) -> std::fs::File {
    let mut name = file.as_os_str().to_owned();
    name.push(".lock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(PathBuf::from(name))
        .unwrap();
    f.try_lock().unwrap();
    f
}

/// A run whose output another run is writing (its lock held) stops at once, naming the
/// output, and records and writes nothing; once the lock is free the same command archives,
/// over a leftover lock file and `.partial` as a crashed run leaves them, and removes its
/// lock file at the end.
#[test]
fn a_second_run_on_the_same_output_stops_at_once_and_writes_nothing() {
    let dir = populate(300);
    let data = dir.path().join("data");
    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("locked.jsonl");
    let lock_file = out_dir.path().join("locked.jsonl.lock");
    let head = query_i64(&data, "SELECT count FROM audit_head");
    let held = hold_lock(&file);
    let started = Instant::now();
    let out = strongroom()
        .args(["audit", "archive", "--before", "101", "--output"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "it waited");
    assert!(
        err.contains(&format!(
            "another `audit archive` run is writing {}",
            file.display()
        )),
        "{err}"
    );
    let mut names: Vec<String> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["locked.jsonl.lock"], "only the lock held here");
    assert_eq!(query_i64(&data, "SELECT count FROM audit_head"), head);
    assert_eq!(query_i64(&data, "SELECT count(*) FROM audit_anchor"), 0);
    assert_eq!(query_i64(&data, "SELECT min(seq) FROM audit_records"), 1);
    // A dry run takes no lock: it writes nothing.
    let (ok, out, err) = run(
        &[
            "audit",
            "archive",
            "--before",
            "101",
            "--dry-run",
            "--output",
            file.to_str().unwrap(),
        ],
        &data,
    );
    assert!(
        ok && out.contains("would archive records 1..100"),
        "{out}{err}"
    );

    // The holder gone (as a killed run's lock goes), leaving its lock file and a partial
    // archive behind: the same command archives.
    drop(held);
    std::fs::write(out_dir.path().join("locked.jsonl.partial"), "half a line").unwrap();
    let (ok, out, err) = archive(&data, "101", &file);
    assert!(ok, "{out}{err}");
    assert!(out.contains("archived records 1..100"), "{out}");
    assert!(verify_file(&data, &file).0);
    assert!(verify(&data).0);
    assert!(!lock_file.exists(), "the lock file is removed at the end");
    assert!(!out_dir.path().join("locked.jsonl.partial").exists());
}

/// The archive killed (SIGKILL) while it removes records: the log verifies (records at or
/// before the anchor are outside it), and the same command run again finishes. Killed while
/// it writes the file: nothing changed, and a run again archives. Killed after the files are
/// written but before the anchor is set (the store copied back from before the run): a run
/// again sets the anchor from the files and finishes.
#[test]
fn a_crash_at_any_point_leaves_a_verifiable_log_and_a_rerun_finishes() {
    let dir = populate(20_000);
    let data = dir.path().join("data");
    let pristine = copy_dir(&data);
    let export = {
        let (ok, out, err) = run(&["audit", "export"], &data);
        assert!(ok, "{err}");
        out.lines().map(str::to_owned).collect::<Vec<_>>()
    };
    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("crash.jsonl");
    let spawn = |data: &Path| {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("strongroom"))
            .env_remove("STRONGROOM_CONFIG")
            .env_remove("STRONGROOM_DATA_DIR")
            .args([
                "audit", "archive", "--before", "15001", "--batch", "1", "--output",
            ])
            .arg(&file)
            .arg("--data-dir")
            .arg(data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };

    // 1. Killed mid-removal: once the anchor is set and some records are gone.
    let mut child = spawn(&data);
    // Meanwhile, a second run on the same output stops at once: the first holds the lock
    // from before it writes the partial file until it ends.
    let partial = out_dir.path().join("crash.jsonl.partial");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !partial.exists() && !file.exists() {
        assert!(
            Instant::now() < deadline,
            "the first run never started writing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (ok, out, err) = archive(&data, "15001", &file);
    assert!(!ok, "a second run went ahead: {out}");
    assert!(
        err.contains("another `audit archive` run is writing"),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the removal never started");
        let conn = rusqlite::Connection::open_with_flags(
            db(&data),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let min: Option<i64> = conn
            .query_row("SELECT min(seq) FROM audit_records", [], |r| r.get(0))
            .unwrap_or(None);
        if min.is_some_and(|m| m > 20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let min = query_i64(&data, "SELECT min(seq) FROM audit_records");
    assert!(
        min > 1 && min <= 15_000,
        "not killed mid-removal: first record {min}"
    );
    assert_eq!(query_i64(&data, "SELECT seq FROM audit_anchor"), 15_000);
    let (ok, text) = verify(&data);
    assert!(ok, "{text}");
    assert!(text.contains("not all removed yet"), "{text}");
    let (ok, out, err) = archive(&data, "15001", &file);
    assert!(ok, "{out}{err}");
    assert!(out.contains("finished the interrupted archive"), "{out}");
    assert_eq!(
        query_i64(&data, "SELECT min(seq) FROM audit_records"),
        15_001
    );
    assert_eq!(index_entries_upto(&data, 15_000), 0);
    assert_eq!(lines(&file), export[..15_000].to_vec());
    let (ok, text) = verify(&data);
    assert!(ok && !text.contains("not all removed"), "{text}");
    assert!(verify_file(&data, &file).0);

    // 2. Killed while writing the file (or whenever it got to): the log verifies, and a run
    //    again completes with every record in the file or the store.
    let data2 = copy_dir(pristine.path());
    std::fs::remove_file(&file).unwrap();
    std::fs::remove_file(file.with_extension("jsonl.anchor.json")).unwrap();
    let mut child = spawn(data2.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !partial.exists() && !file.exists() {
        assert!(
            Instant::now() < deadline,
            "the archive never started writing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Its lock file stays behind, unlocked: it does not stop the run that finishes.
    assert!(out_dir.path().join("crash.jsonl.lock").exists());
    let (ok, text) = verify(data2.path());
    assert!(ok, "{text}");
    let (ok, out, err) = archive(data2.path(), "15001", &file);
    assert!(ok, "{out}{err}");
    assert_eq!(lines(&file), export[..15_000].to_vec());
    assert_eq!(
        query_i64(data2.path(), "SELECT min(seq) FROM audit_records"),
        15_001
    );
    assert!(verify(data2.path()).0);

    // 3. The files written, the anchor never set: another copy archived into `fresh`, and
    //    the store as it was before that run.
    let data3 = copy_dir(pristine.path());
    let data4 = copy_dir(pristine.path());
    let fresh = out_dir.path().join("fresh.jsonl");
    let (ok, out, err) = archive(data4.path(), "15001", &fresh);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = archive(data3.path(), "15001", &fresh);
    assert!(ok, "{out}{err}");
    assert!(out.contains("finished the interrupted archive"), "{out}");
    assert_eq!(
        query_i64(data3.path(), "SELECT min(seq) FROM audit_records"),
        15_001
    );
    assert_eq!(
        query_i64(data3.path(), "SELECT seq FROM audit_anchor"),
        15_000
    );
    assert!(verify(data3.path()).0);
}

/// Archives run while a server appends (puts and reveals): each removal batch is a short
/// transaction, the server's requests all succeed, and the log verifies throughout.
#[test]
fn archive_runs_beside_a_serving_server() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // One owner writes as fast as four clients can: on a fast machine, past the default
    // put allowance.
    let server = common::dev::start_dev_env(
        &data,
        &[],
        &[("STRONGROOM_LIMITS__PUTS_PER_OWNER_PER_MINUTE", "1000000")],
    );
    let service = server.export("SERVICE");
    let alice = server.export("ALICE");
    let client = server.client(&data);
    let rt = common::rt();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (stop, client) = (stop.clone(), client.clone());
            let (alice, service) = (alice.clone(), service.clone());
            rt.spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("k{w}-{}", n % 10);
                    let r = client
                        .json(
                            "PUT",
                            &format!("/v1/me/credentials/{name}"),
                            Some(&alice),
                            &serde_json::json!({"value": "v"}),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r.status, 201, "{}", r.text());
                    let r = client
                        .json(
                            "POST",
                            &format!("/v1/owners/alice/credentials/{name}/reveal"),
                            Some(&service),
                            &serde_json::json!({}),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                    n += 1;
                }
                n
            })
        })
        .collect();
    let out_dir = tempfile::tempdir().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    for round in 0..3 {
        let head = query_i64(&data, "SELECT count FROM audit_head");
        let file = out_dir.path().join(format!("live-{round}.jsonl"));
        let (ok, out, err) = run(
            &[
                "audit",
                "archive",
                "--before",
                &(head / 2 + 1).to_string(),
                "--batch",
                "50",
                "--output",
                file.to_str().unwrap(),
            ],
            &data,
        );
        assert!(ok, "round {round}: {out}{err}");
        let (ok, text) = verify(&data);
        assert!(ok, "round {round}: {text}");
        assert!(verify_file(&data, &file).0);
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds: u64 = load.into_iter().map(|t| rt.block_on(t).unwrap()).sum();
    assert!(rounds > 0);
    // The server still reports ready and its log verifies.
    let r = rt.block_on(client.get("/readyz", None)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    drop(server);
    let (ok, text) = verify(&data);
    assert!(ok, "{text}");
}

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
                 archive test did not run (scripts/lib/postgres.sh pg_start sets it)"
            );
            None
        }
    }
}

/// The same on PostgreSQL: archive by time, then by seq past the puts; the log and the files
/// verify; an edited or removed anchor, or records removed by hand, fail.
#[test]
fn archive_on_postgres() {
    let Some(url) = postgres_url() else { return };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!("cli_archive_{}_{nanos}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let config = dir.path().join("strongroom.toml");
    std::fs::write(
        &config,
        format!("[store]\nkind = \"postgres\"\nurl = {url:?}\nschema = \"{schema}\"\n"),
    )
    .unwrap();
    populate_with(&data, Some(&config), 300);
    let cfg = config.to_str().unwrap().to_owned();
    let pg = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--config", &cfg]);
        run(&all, &data)
    };
    let verify_pg = || {
        let (ok, out, err) = pg(&["audit", "verify"]);
        (ok, format!("{out}{err}"))
    };
    let out_dir = tempfile::tempdir().unwrap();
    let f1 = out_dir.path().join("pg-1.jsonl");
    let f2 = out_dir.path().join("pg-2.jsonl");
    let before = rfc3339(BASE + 101);
    let (ok, out, err) = pg(&[
        "audit",
        "archive",
        "--before",
        &before,
        "--output",
        f1.to_str().unwrap(),
        "--batch",
        "7",
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("archived records 1..151"), "{out}");
    let (ok, text) = verify_pg();
    assert!(ok && text.contains("1..151 archived"), "{text}");
    let (ok, out, err) = pg(&[
        "audit",
        "archive",
        "--before",
        "312",
        "--output",
        f2.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let anchor: serde_json::Value = common::read_json(&f2.with_extension("jsonl.anchor.json"));
    assert_eq!(anchor["seq"], 311);
    assert_eq!(anchor["puts"], 5);
    let (ok, text) = verify_pg();
    assert!(ok, "{text}");
    for f in [&f1, &f2] {
        let (ok, out, err) = pg(&["audit", "verify", "--file", f.to_str().unwrap()]);
        assert!(ok, "{out}{err}");
    }

    let rt = common::rt();
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
        .unwrap();
    rt.spawn(async move {
        let _ = conn.await;
    });
    let exec = |sql: &str| {
        rt.block_on(client.batch_execute(&format!("SET search_path TO {schema}; {sql}")))
            .unwrap()
    };
    // The archived records' time marks went with them.
    let marks: i64 = rt
        .block_on(client.query_one(
            &format!("SELECT count(*) FROM {schema}.audit_time_marks WHERE seq <= 311"),
            &[],
        ))
        .unwrap()
        .get(0);
    assert_eq!(marks, 0);
    // Each change committed (verify runs in another process), then undone.
    exec("UPDATE audit_anchor SET puts = 0");
    let (ok, text) = verify_pg();
    assert!(
        !ok && text.contains("anchor's MAC does not verify"),
        "{text}"
    );
    exec("UPDATE audit_anchor SET puts = 5");
    assert!(verify_pg().0);
    exec("CREATE TABLE saved_anchor AS SELECT * FROM audit_anchor; DELETE FROM audit_anchor");
    let (ok, text) = verify_pg();
    assert!(
        !ok && text.contains("record 1: found record numbered 312"),
        "{text}"
    );
    exec("INSERT INTO audit_anchor SELECT * FROM saved_anchor");
    exec(
        "CREATE TABLE saved_records AS SELECT * FROM audit_records WHERE seq <= 312; \
         DELETE FROM audit_records WHERE seq <= 312",
    );
    let (ok, text) = verify_pg();
    assert!(
        !ok && text.contains("record 312: found record numbered 313"),
        "{text}"
    );
    exec("INSERT INTO audit_records SELECT * FROM saved_records");
    assert!(verify_pg().0);
    exec(&format!("RESET search_path; DROP SCHEMA {schema} CASCADE"));
}

/// `--before AGE` is that long before now: a year back, the cut is what the same time
/// written out gives (every record of the 2023 setup, none of the ones written today); an
/// age past every record archives nothing; a malformed one is a usage error.
#[test]
fn archive_by_age_is_the_time_that_long_ago() {
    let dir = populate(40);
    let data = dir.path().join("data");
    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("audit.jsonl");
    let dry = |before: &str| {
        let (ok, out, err) = run(
            &[
                "audit",
                "archive",
                "--before",
                before,
                "--output",
                file.to_str().unwrap(),
                "--dry-run",
            ],
            &data,
        );
        assert!(ok, "{before}: {err}");
        out
    };
    let year_ago = time::OffsetDateTime::now_utc() - time::Duration::days(365);
    let by_age = dry("365d");
    let by_time = dry(&rfc3339(year_ago.unix_timestamp()));
    assert!(by_age.contains("would archive records 1.."), "{by_age}");
    assert_eq!(by_age, by_time);
    // The newest record older than a year, and every record before it.
    let cut = query_i64(
        &data,
        &format!(
            "SELECT max(seq) FROM audit_records WHERE time_ms < {}",
            year_ago.unix_timestamp() * 1000
        ),
    );
    let last = query_i64(&data, "SELECT max(seq) FROM audit_records");
    assert!(cut > 1 && cut < last, "{cut} of {last}");
    assert!(
        by_age.contains(&format!("would archive records 1..{cut} ")),
        "{by_age}"
    );
    // Older than every record: nothing.
    let out = dry("1000w");
    assert!(out.contains("nothing to archive"), "{out}");
    let out = strongroom()
        .args(["audit", "archive", "--before", "0d", "--output"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("age of 0"));
    assert!(!file.exists());
}

/// The command `deploy/systemd/strongroom-audit-archive.service` runs every day, as systemd
/// would run it (its `%%` unescaped, its environment set, the paths moved under temporary
/// directories): it archives what is older than 90 days into the directory's first file,
/// which verifies, and the store's log verifies from there on.
#[test]
fn the_daily_archive_unit_runs_an_archive_that_verifies() {
    let dir = populate(40);
    let data = dir.path().join("data");
    let archives = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(
        manifest_dir().join("../../deploy/systemd/strongroom-audit-archive.service"),
    )
    .unwrap();
    let moved = |s: &str| {
        s.replace("%%", "%")
            .replace(
                "/usr/local/bin/strongroom",
                env!("CARGO_BIN_EXE_strongroom"),
            )
            .replace(
                "/var/lib/strongroom-audit",
                archives.path().to_str().unwrap(),
            )
            .replace("/var/lib/strongroom", data.to_str().unwrap())
    };
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(moved(exec));
    command.env_clear().env("PATH", "/usr/bin:/bin");
    for (key, value) in unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
    {
        // No configuration file here: the data directory's dev layout stands for it.
        if key != "STRONGROOM_CONFIG" {
            command.env(key, moved(value));
        }
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("archived records 1.."), "{stdout}");
    let file = archives.path().join("audit-000000000001.jsonl");
    assert!(file.exists(), "{stdout}");
    let (ok, out, err) = run(
        &["audit", "verify", "--file", file.to_str().unwrap()],
        &data,
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(&["audit", "verify"], &data);
    assert!(ok, "{out}{err}");
    // Nothing older than 90 days is left in the store.
    let cutoff = (time::OffsetDateTime::now_utc() - time::Duration::days(90)).unix_timestamp();
    assert_eq!(
        query_i64(
            &data,
            &format!(
                "SELECT count(*) FROM audit_records WHERE time_ms < {}",
                cutoff * 1000
            )
        ),
        0
    );
}

/// `--output-dir`: each archive is named by its first record, so a later run writes the next
/// file, a run with nothing new writes none, the files verify in name order, a run stopped
/// before it anchored is finished by the same command whatever the day, and runs into one
/// directory take turns.
#[test]
fn archive_into_a_directory_names_files_by_their_first_record() {
    let dir = populate(300);
    let data = dir.path().join("data");
    // A copy of the store as it is now: below, a run on it "crashes" after writing its
    // files but before anchoring the log (its files are the first run's).
    let crashed = copy_dir(&data);
    let archives = tempfile::tempdir().unwrap();
    let into = |data: &Path, before: &str, dir: &Path| {
        run(
            &[
                "audit",
                "archive",
                "--before",
                before,
                "--output-dir",
                dir.to_str().unwrap(),
            ],
            data,
        )
    };
    let files = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".jsonl"))
            .collect();
        names.sort();
        names
    };

    let (ok, out, err) = into(&data, "101", archives.path());
    assert!(ok, "{out}{err}");
    assert!(out.contains("archived records 1..100"), "{out}");
    assert_eq!(files(archives.path()), ["audit-000000000001.jsonl"]);

    // The crashed copy: its files are there, its log is not anchored. The same command
    // finishes that archive under the same name.
    let crashed_archives = tempfile::tempdir().unwrap();
    for name in [
        "audit-000000000001.jsonl",
        "audit-000000000001.jsonl.anchor.json",
    ] {
        std::fs::copy(
            archives.path().join(name),
            crashed_archives.path().join(name),
        )
        .unwrap();
    }
    let (ok, out, err) = into(crashed.path(), "101", crashed_archives.path());
    assert!(ok, "{out}{err}");
    assert!(out.contains("finished the interrupted archive"), "{out}");
    assert_eq!(files(crashed_archives.path()), ["audit-000000000001.jsonl"]);
    assert!(verify(crashed.path()).0);

    // The next run writes the next file; one with nothing new writes none.
    let (ok, out, err) = into(&data, "201", archives.path());
    assert!(ok, "{out}{err}");
    assert!(out.contains("archived records 101..200"), "{out}");
    let (ok, out, err) = into(&data, "201", archives.path());
    assert!(ok, "{out}{err}");
    assert!(out.contains("nothing to archive"), "{out}");
    let names = files(archives.path());
    assert_eq!(
        names,
        ["audit-000000000001.jsonl", "audit-000000000101.jsonl"]
    );
    // In name order they are oldest first, as `verify --file` wants them.
    let mut args = vec!["audit".to_owned(), "verify".to_owned()];
    for name in &names {
        args.push("--file".into());
        args.push(archives.path().join(name).to_str().unwrap().to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run(&args, &data);
    assert!(ok, "{out}{err}");
    // One --file takes them all, as a shell glob gives them; swapped, they fail.
    let paths: Vec<String> = names
        .iter()
        .map(|n| archives.path().join(n).to_str().unwrap().to_owned())
        .collect();
    let (ok, glob_out, err) = run(&["audit", "verify", "--file", &paths[0], &paths[1]], &data);
    assert!(ok, "{glob_out}{err}");
    assert_eq!(glob_out, out);
    let (ok, swapped, err) = run(&["audit", "verify", "--file", &paths[1], &paths[0]], &data);
    assert!(!ok, "{swapped}{err}");
    assert!(verify(&data).0);

    // Runs into one directory take turns.
    let held = hold_lock(&archives.path().join("audit-archive"));
    let (ok, out, err) = into(&data, "301", archives.path());
    assert!(!ok, "{out}");
    assert!(
        err.contains("another `audit archive` run is writing"),
        "{err}"
    );
    drop(held);

    // A directory that is not there is a usage error, and nothing is recorded.
    let records = query_i64(&data, "SELECT count(*) FROM audit_records");
    let (ok, out, err) = into(&data, "301", &archives.path().join("missing"));
    assert!(!ok, "{out}");
    assert!(err.contains("no such directory"), "{err}");
    assert_eq!(
        query_i64(&data, "SELECT count(*) FROM audit_records"),
        records
    );

    // One of --output and --output-dir, not both, not neither.
    for extra in [
        vec!["--output-dir", "/tmp", "--output", "/tmp/x.jsonl"],
        vec![],
    ] {
        let out = strongroom()
            .args(["audit", "archive", "--before", "301"])
            .args(&extra)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
    }
}
