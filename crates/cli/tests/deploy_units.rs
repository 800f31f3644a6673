//! The systemd units under `deploy/systemd`: systemd itself reads them (`systemd-analyze
//! verify`, no warning) and rates their sandbox (`systemd-analyze security --offline`): every
//! check fails only where the service needs it to (listed below, with the reason), so a
//! hardening line removed or weakened fails this test.
//!
//! Needs `systemd-analyze` from systemd 250 or later (`security --offline`; Debian 12's
//! `systemd` package, which `scripts/test` installs); without it the tests say so and pass,
//! unless `STRONGROOM_REQUIRE_SYSTEMD_ANALYZE=1`. Analysed only: nothing here runs under
//! systemd.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 3] = [
    "strongroom.service",
    "strongroom-audit-archive.service",
    "strongroom-audit-archive.timer",
];

/// The security checks the services fail on purpose.
const ACCEPTED: [(&str, &str); 7] = [
    (
        "SystemCallFilter=~@resources",
        "the server sets its own core-file limit (setrlimit)",
    ),
    ("RootDirectory=/RootImage=", "runs from the host's tree"),
    (
        "RestrictAddressFamilies=~AF_UNIX",
        "the resolver and the journal use local sockets",
    ),
    (
        "RestrictAddressFamilies=~AF_(INET|INET6)",
        "an HTTPS server, and a client of PostgreSQL and key providers",
    ),
    ("PrivateNetwork=", "same"),
    ("IPAddressDeny=", "peers are the deployment's to choose"),
    (
        "DeviceAllow=",
        "PrivateDevices= leaves the standard pseudo-devices (and the clock, read-only)",
    ),
];

fn analyzer() -> Option<()> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(());
    }
    assert!(
        std::env::var("STRONGROOM_REQUIRE_SYSTEMD_ANALYZE").as_deref() != Ok("1"),
        "systemd-analyze is required (STRONGROOM_REQUIRE_SYSTEMD_ANALYZE=1) but absent"
    );
    eprintln!("skipped: no systemd-analyze on this machine");
    None
}

/// The units, copied with their binary path pointed at the one under test (verify checks
/// that the program exists).
fn units() -> (tempfile::TempDir, Vec<PathBuf>) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    let paths = UNITS
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(source.join(name)).unwrap();
            let text = text.replace(
                "/usr/local/bin/strongroom",
                env!("CARGO_BIN_EXE_strongroom"),
            );
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect();
    (dir, paths)
}

#[test]
fn systemd_reads_the_units_without_a_warning() {
    if analyzer().is_none() {
        return;
    }
    let (_dir, paths) = units();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
}

#[test]
fn the_services_fail_no_sandbox_check_they_do_not_need_to() {
    if analyzer().is_none() {
        return;
    }
    let (_dir, paths) = units();
    for path in paths.iter().filter(|p| p.extension().unwrap() == "service") {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(path)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let failed: Vec<&str> = report
            .lines()
            .filter_map(|l| l.strip_prefix("✗ "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let passed = report.lines().filter(|l| l.starts_with("✓ ")).count();
        assert!(passed > 50, "{report}");
        let unexpected: Vec<&&str> = failed
            .iter()
            .filter(|check| !ACCEPTED.iter().any(|(ok, _)| ok == *check))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{}: failed checks {unexpected:?}\n{report}",
            path.display()
        );
        // And systemd's own score: "OK" is up to 3.9; these sit near 1.
        let level: f64 = report
            .lines()
            .find_map(|l| l.strip_prefix("→ Overall exposure level for "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in {report}"));
        assert!(level <= 2.0, "{}: {level}", path.display());
    }
}
