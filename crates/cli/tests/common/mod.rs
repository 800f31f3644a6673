//! Shared helpers for the CLI tests.
#![allow(dead_code)]

pub mod dev;

use std::path::PathBuf;

/// A runtime for a test that drives a store or a server in process.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// This package's directory, read when the test runs: cargo sets `CARGO_MANIFEST_DIR` for the
/// tests it runs, and a test binary that cargo reused from another checkout (a shared
/// `CARGO_TARGET_DIR`) would otherwise read that checkout's files through its compiled-in path.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// `../shared/vectors` beside the clone (or `STRONGROOM_VECTORS_DIR`). Missing vectors fail the
/// test: they are the point of it.
pub fn vectors_dir() -> PathBuf {
    let dir = std::env::var_os("STRONGROOM_VECTORS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../../../shared/vectors"));
    assert!(
        dir.join("README.md").is_file(),
        "test vectors not found at {} (set STRONGROOM_VECTORS_DIR)",
        dir.display()
    );
    dir
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn strongroom() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("strongroom").unwrap();
    cmd.env_remove("STRONGROOM_KEYRING")
        .env_remove("STRONGROOM_DATA_DIR");
    cmd
}

/// Runs `cmd`, which must succeed (else the test fails showing its stderr); its stdout.
pub fn stdout_of(cmd: &mut assert_cmd::Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// RFC 3339 time as Unix seconds.
pub fn unix(rfc3339: &str) -> u64 {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap();
    t.unix_timestamp() as u64
}

/// Runs `cmd` with its standard output a pipe whose reader is gone before it starts (as
/// when `| head` has read all it wanted), `stdin` on its standard input.
pub fn with_stdout_closed(cmd: &mut std::process::Command, stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // The command may end before reading it all.
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().unwrap()
}

/// `strongroom` as a `std::process::Command` (for [`with_stdout_closed`]).
pub fn strongroom_process() -> std::process::Command {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("strongroom"));
    cmd.env_remove("STRONGROOM_KEYRING")
        .env_remove("STRONGROOM_DATA_DIR")
        .env_remove("STRONGROOM_CONFIG");
    cmd
}

/// A command whose reader went away ends as a Unix tool stopped by SIGPIPE shows in a shell:
/// status 141, no error and no panic on stderr.
pub fn assert_ends_quietly(out: &std::process::Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{what}: {stderr}");
    assert!(
        !stderr.contains("error") && !stderr.contains("panicked"),
        "{what}: {stderr}"
    );
}

/// The configuration operator commands use: `file` (if any) with `data` as the data folder
/// (the dev layout alone when `file` is `None`).
pub fn operator_config(
    file: Option<&std::path::Path>,
    data: &std::path::Path,
) -> strongroom_server::config::Config {
    strongroom_server::config::Config::load_for_operator(
        file,
        &strongroom_server::config::Overrides {
            data_dir: Some(data.to_owned()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Makes the store of the dev layout at `data` (its keyring there already) and seals its
/// audit log, as a server's first start does.
pub fn make_store(data: &std::path::Path) {
    rt().block_on(async {
        let backends = strongroom_server::Backends::open(&operator_config(None, data))
            .await
            .unwrap();
        strongroom_server::audit_operator_action(&backends, "test-setup", "ok", None, None)
            .await
            .unwrap();
        backends.close().await;
    });
}

/// Alice's put of `value` as `name`, as the operator's backends take it.
pub fn put_req<'a>(name: &'a str, value: &'a str) -> strongroom_core::PutRequest<'a> {
    strongroom_core::PutRequest {
        owner: "alice",
        name,
        value: strongroom_crypto::SecretBytes::from_slice(value.as_bytes()),
        metadata: None,
        expected_version: None,
        created_by: "user:alice",
    }
}

/// `(version, state)` of each key in `keys list --json` output.
pub fn key_states(keys: &serde_json::Value) -> Vec<(u64, String)> {
    keys.as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["version"].as_u64().unwrap(),
                k["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}
