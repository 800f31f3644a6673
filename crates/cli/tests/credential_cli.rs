//! `strongroom credential …` against a real `serve --dev` child over TLS: a user stores and
//! manages a credential without ever reading it back; the dev service reveals it; tokens
//! never need to be on the command line.

mod common;

use std::path::Path;

use common::dev::{start_dev, start_dev_env};
use common::strongroom;

const VALUE: &str = "sk_live_cli-client-value-0123456789";

fn client(data: &Path, addr: std::net::SocketAddr, token: &str) -> assert_cmd::Command {
    let mut cmd = strongroom();
    cmd.env("STRONGROOM_SERVER", format!("https://{addr}"))
        .env("STRONGROOM_TOKEN", token)
        .env("STRONGROOM_DATA_DIR", data)
        .env_remove("STRONGROOM_CACERT");
    cmd
}

/// [`client`] as a `std::process::Command` (for `common::with_stdout_closed`).
fn client_process(data: &Path, addr: std::net::SocketAddr, token: &str) -> std::process::Command {
    let mut cmd = common::strongroom_process();
    cmd.env("STRONGROOM_SERVER", format!("https://{addr}"))
        .env("STRONGROOM_TOKEN", token)
        .env("STRONGROOM_DATA_DIR", data)
        .env_remove("STRONGROOM_CACERT");
    cmd
}

fn ok(cmd: &mut assert_cmd::Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        !stdout.contains(VALUE) || stdout.trim() == VALUE,
        "{stdout}"
    );
    stdout
}

#[test]
fn a_user_stores_and_manages_and_the_service_reveals() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let server = start_dev(&data, &[]);
    let (alice, service) = (server.export("ALICE"), server.export("SERVICE"));
    let addr = server.addr;

    let out = ok(client(&data, addr, &alice)
        .args(["credential", "put", "zoom.api-key", "--metadata"])
        .arg(r#"{"host": "api.zoom.us"}"#)
        .write_stdin(format!("{VALUE}\n")));
    assert_eq!(out.trim(), "zoom.api-key version 1");
    let out = ok(client(&data, addr, &alice)
        .args([
            "credential",
            "put",
            "zoom.api-key",
            "--expected-version",
            "1",
        ])
        .write_stdin("second value"));
    assert_eq!(out.trim(), "zoom.api-key version 2");

    // A stale check-and-set is a conflict, reported in one line.
    let out = client(&data, addr, &alice)
        .args([
            "credential",
            "put",
            "zoom.api-key",
            "--expected-version",
            "1",
        ])
        .write_stdin("third")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("409"), "{err}");

    let list: serde_json::Value =
        serde_json::from_str(&ok(client(&data, addr, &alice).args(["credential", "list"])))
            .unwrap();
    assert!(list.to_string().contains("zoom.api-key"), "{list}");
    let show: serde_json::Value = serde_json::from_str(&ok(client(&data, addr, &alice).args([
        "credential",
        "show",
        "zoom.api-key",
    ])))
    .unwrap();
    assert_eq!(show["current_version"], 2, "{show}");
    assert_eq!(show["versions"].as_array().unwrap().len(), 2, "{show}");
    assert_eq!(
        show["versions_next_cursor"],
        serde_json::Value::Null,
        "{show}"
    );
    // A page at a time: the newest, then from its cursor the rest.
    let page = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["credential", "show", "zoom.api-key"];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(client(&data, addr, &alice).args(&args))).unwrap()
    };
    let first = page(&["--limit", "1"]);
    assert_eq!(first["versions"][0]["version"], 2, "{first}");
    assert_eq!(first["versions_next_cursor"], "2", "{first}");
    let rest = page(&["--limit", "1", "--cursor", "2"]);
    assert_eq!(rest["versions"][0]["version"], 1, "{rest}");
    assert_eq!(
        rest["versions_next_cursor"],
        serde_json::Value::Null,
        "{rest}"
    );

    ok(client(&data, addr, &alice).args(["credential", "current", "zoom.api-key", "1"]));

    // The service reveals the current version (1, chosen above) to stdout, nothing else.
    let out =
        ok(client(&data, addr, &service).args(["credential", "reveal", "alice", "zoom.api-key"]));
    assert_eq!(out, VALUE, "exactly the value's bytes, no newline added");
    // A reader that has gone away (`| head -c 0`) ends list, show and reveal quietly, as it
    // would a Unix tool.
    for (token, args) in [
        (&alice, &["credential", "list"][..]),
        (&alice, &["credential", "show", "zoom.api-key"]),
        (&service, &["credential", "reveal", "alice", "zoom.api-key"]),
    ] {
        let out = common::with_stdout_closed(client_process(&data, addr, token).args(args), b"");
        common::assert_ends_quietly(&out, &args.join(" "));
        assert!(!String::from_utf8_lossy(&out.stderr).contains(VALUE));
    }
    // A user token cannot reveal.
    let out = client(&data, addr, &alice)
        .args(["credential", "reveal", "alice", "zoom.api-key"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(VALUE));

    // Disabled: the service gets nothing; enabled again: it does.
    ok(client(&data, addr, &alice).args(["credential", "disable", "zoom.api-key"]));
    let out = client(&data, addr, &service)
        .args(["credential", "reveal", "alice", "zoom.api-key"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    ok(client(&data, addr, &alice).args(["credential", "enable", "zoom.api-key"]));
    ok(client(&data, addr, &service).args(["credential", "reveal", "alice", "zoom.api-key"]));

    let usage = ok(client(&data, addr, &alice).args(["credential", "usage", "zoom.api-key"]));
    assert!(usage.contains("reveal"), "{usage}");

    // Cannot be undone: refused without --yes when nobody can be asked.
    let out = client(&data, addr, &alice)
        .args(["credential", "destroy", "zoom.api-key"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("add --yes"));
    ok(client(&data, addr, &alice).args(["credential", "show", "zoom.api-key"]));
    ok(client(&data, addr, &alice).args(["credential", "destroy", "zoom.api-key", "--yes"]));
    let out = client(&data, addr, &alice)
        .args(["credential", "show", "zoom.api-key"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
}

#[test]
fn bad_tokens_certificates_and_input_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let server = start_dev(&data, &[]);
    let addr = server.addr;

    let out = client(&data, addr, "not-a-token")
        .args(["credential", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("request id"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A server-side failure (a sealed value damaged in the database) names the request, by
    // which the server's log line and audit record are found.
    ok(client(&data, addr, &server.export("ALICE"))
        .args(["credential", "put", "damaged"])
        .write_stdin(VALUE));
    let db = rusqlite::Connection::open(data.join("strongroom.db")).unwrap();
    let sealed: Vec<u8> = db
        .query_row(
            "SELECT sealed_value FROM versions WHERE credential_id = \
             (SELECT id FROM credentials WHERE name = 'damaged')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut flipped = sealed.clone();
    *flipped.last_mut().unwrap() ^= 1;
    db.execute(
        "UPDATE versions SET sealed_value = ?1 WHERE sealed_value = ?2",
        [&flipped, &sealed],
    )
    .unwrap();
    drop(db);
    let out = client(&data, addr, &server.export("SERVICE"))
        .args(["credential", "reveal", "alice", "damaged"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("500 integrity_error") && err.contains("(request id "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Without the dev CA the server's certificate is not trusted.
    let other = tmp.path().join("elsewhere");
    std::fs::create_dir(&other).unwrap();
    let out = client(&other, addr, &server.export("ALICE"))
        .args(["credential", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach"), "{err}");
    assert!(
        err.contains("--data-dir") && err.contains("--cacert"),
        "no hint: {err}"
    );

    let out = strongroom()
        .env_remove("STRONGROOM_TOKEN")
        .args(["credential", "list", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("STRONGROOM_TOKEN"));
    // An empty token file is no token, and plain HTTP is refused here, both before any call.
    // A token file others may read is also named (whoever reads it holds the token); a
    // private one is not.
    let empty = tmp.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = strongroom()
            .env_remove("STRONGROOM_TOKEN")
            .args(["credential", "list", "--token-file"])
            .arg(&empty)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no token"), "{err}");
        assert_eq!(
            err.contains("--token-file") && err.contains("readable by group or others"),
            warned,
            "mode {mode:o}: {err}"
        );
    }
    let out = client(&data, addr, &server.export("ALICE"))
        .env("STRONGROOM_SERVER", format!("http://{addr}"))
        .args(["credential", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTPS only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = client(&data, addr, &server.export("ALICE"))
        .args(["credential", "put", "empty"])
        .write_stdin("")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = client(&data, addr, &server.export("ALICE"))
        .args(["credential", "put", "big"])
        .write_stdin(vec![b'x'; 64 * 1024 + 1])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 KiB"));
}

/// `credential list` prints one page (100); `--cursor` continues, `--all` takes them all.
#[test]
fn list_pages_with_cursor_and_all() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let server = start_dev(&data, &[]);
    let alice = server.export("ALICE");
    let addr = server.addr;
    let http = server.client(&data);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            for i in 0..130 {
                let r = http
                    .json(
                        "PUT",
                        &format!("/v1/me/credentials/bulk-{i:03}"),
                        Some(&alice),
                        &serde_json::json!({"value": "v"}),
                    )
                    .await
                    .unwrap();
                assert_eq!(r.status, 201, "{}", r.text());
            }
        });
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&ok(client(&data, addr, &alice).args(args))).unwrap()
    };
    let first = json(&["credential", "list"]);
    assert_eq!(names(&first).len(), 100);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next_cursor")
        .to_owned();
    let second = json(&["credential", "list", "--cursor", &cursor]);
    assert_eq!(names(&second).len(), 30);
    assert!(second["next_cursor"].is_null(), "{second}");
    let all = json(&["credential", "list", "--all"]);
    let mut want: Vec<String> = (0..130).map(|i| format!("bulk-{i:03}")).collect();
    let mut got = names(&all);
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert_eq!([names(&first), names(&second)].concat().len(), 130);
}

/// Runs the client with `token` with its standard output (and error) a terminal, through
/// `script` (util-linux); its exit code and what the terminal got.
fn on_a_terminal(
    data: &Path,
    addr: std::net::SocketAddr,
    token: &str,
    args: &[&str],
) -> (Option<i32>, String) {
    let bin = assert_cmd::cargo::cargo_bin("strongroom");
    let line = std::iter::once(bin.to_str().unwrap())
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let client = client_process(data, addr, token);
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &line, "/dev/null"]);
    for (k, v) in client.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let out = script.stdin(std::process::Stdio::null()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `reveal` writes the value's exact bytes to a pipe, whatever they are; to a terminal it
/// prints a plain value, and refuses one whose control characters the terminal would act on
/// (a value is whatever its owner set), without printing any of it.
#[test]
fn reveal_is_byte_exact_to_a_pipe_and_keeps_control_characters_off_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let server = start_dev(&data, &[]);
    let (alice, service) = (server.export("ALICE"), server.export("SERVICE"));
    let addr = server.addr;
    // Retitles the terminal and clears the screen; put drops one trailing newline.
    let tricky = "line one\n\x1b]0;pwned\x07\x1b[2J\tend\n";
    ok(client(&data, addr, &alice)
        .args(["credential", "put", "tricky"])
        .write_stdin(format!("{tricky}\n")));
    ok(client(&data, addr, &alice)
        .args(["credential", "put", "plain"])
        .write_stdin(VALUE));

    let out = client(&data, addr, &service)
        .args(["credential", "reveal", "alice", "tricky"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, tricky.as_bytes());
    assert!(out.stderr.is_empty());

    let (code, screen) = on_a_terminal(
        &data,
        addr,
        &service,
        &["credential", "reveal", "alice", "tricky"],
    );
    assert_eq!(code, Some(1), "{screen:?}");
    assert!(
        screen.contains("control characters") && screen.contains("redirect"),
        "{screen:?}"
    );
    assert!(
        !screen.contains("pwned") && !screen.contains("line one") && !screen.contains('\x1b'),
        "part of the value reached the terminal: {screen:?}"
    );
    let (code, screen) = on_a_terminal(
        &data,
        addr,
        &service,
        &["credential", "reveal", "alice", "plain"],
    );
    assert_eq!(code, Some(0), "{screen:?}");
    assert_eq!(screen, format!("{VALUE}\r\n"));
}

/// The help says what `reveal` writes where.
#[test]
fn help_says_what_reveal_writes() {
    for args in [
        &["credential", "--help"][..],
        &["credential", "reveal", "--help"],
    ] {
        let out = strongroom().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            help.contains("exact") && help.contains("control characters"),
            "{args:?}: {help}"
        );
    }
}

/// `credential verify` reads the value as `put` does and answers with its exit status: 0
/// matches, 1 does not, 2 no answer (here a missing credential, an empty value, and the 429
/// past the server's per-owner limit, which says when to try again).
#[test]
fn verify_answers_with_its_exit_status() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let server = start_dev_env(&data, &[], &[("STRONGROOM_LIMITS__VERIFY_PER_MINUTE", "3")]);
    let alice = server.export("ALICE");
    let addr = server.addr;
    ok(client(&data, addr, &alice)
        .args(["credential", "put", "zoom.api-key"])
        .write_stdin(VALUE));
    let verify = |name: &str, candidate: &str| {
        let out = client(&data, addr, &alice)
            .args(["credential", "verify", name])
            .write_stdin(candidate.to_owned())
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        assert!(!stdout.contains(VALUE) && !stderr.contains(VALUE));
        (out.status.code(), stdout, stderr)
    };
    // As put reads it: one trailing newline is not part of the value.
    assert_eq!(
        verify("zoom.api-key", &format!("{VALUE}\n")),
        (Some(0), "matches\n".into(), String::new())
    );
    assert_eq!(
        verify("zoom.api-key", "not-the-value"),
        (Some(1), "does not match\n".into(), String::new())
    );
    // Refused before any call (the limit is not spent on it).
    let (code, stdout, stderr) = verify("zoom.api-key", "");
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "{stderr}");
    assert!(stderr.contains("empty"), "{stderr}");
    let (code, stdout, stderr) = verify("no-such-credential", VALUE);
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "{stderr}");
    assert!(stderr.contains("404"), "{stderr}");
    // The fourth call in the minute.
    let (code, stdout, stderr) = verify("zoom.api-key", VALUE);
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "{stderr}");
    assert!(
        stderr.contains("429") && stderr.contains("Retry-After: ") && stderr.contains("seconds"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
