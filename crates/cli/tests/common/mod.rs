//! Shared helpers for the CLI tests.
#![allow(dead_code)]

pub mod dev;

use std::path::PathBuf;

/// `../shared/vectors` beside the clone (or `STRONGROOM_VECTORS_DIR`). Missing vectors fail the
/// test: they are the point of it.
pub fn vectors_dir() -> PathBuf {
    let dir = std::env::var_os("STRONGROOM_VECTORS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/vectors"
            ))
        });
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
