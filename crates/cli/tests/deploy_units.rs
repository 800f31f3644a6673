//! The systemd units under `deploy/systemd`: systemd itself reads them (`systemd-analyze
//! verify`, no warning) and rates their sandbox (`systemd-analyze security --offline`): every
//! check fails only where the service needs it to (listed below, with the reason), so a
//! hardening line removed or weakened fails this test.
//!
//!
//! And what the units forbid, the server does not need: a dev server run under `strace`
//! through its day (put, describe, reveal, metrics, readiness, SIGHUP, SIGTERM) makes no
//! system call outside the units' filter and maps no memory writable and executable.
//!
//! Needs `systemd-analyze` from systemd 250 or later (`security --offline`; Debian 12's
//! `systemd` package) and `strace`, which `scripts/test` installs; without them the tests say
//! so and pass, unless `STRONGROOM_REQUIRE_SYSTEMD_ANALYZE=1`. Nothing here runs under
//! systemd itself.

mod common;
use common::manifest_dir;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

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

/// `Some` when every one of `programs` runs here; else skipped, or a failure when required.
fn tools(programs: &[&str]) -> Option<()> {
    for program in programs {
        let found = Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                std::env::var("STRONGROOM_REQUIRE_SYSTEMD_ANALYZE").as_deref() != Ok("1"),
                "{program} is required (STRONGROOM_REQUIRE_SYSTEMD_ANALYZE=1) but absent"
            );
            eprintln!("skipped: no {program} on this machine");
            return None;
        }
    }
    Some(())
}

/// `deploy/systemd` in the repository.
fn deploy_dir() -> PathBuf {
    manifest_dir().join("../../deploy/systemd")
}

/// The units, copied with their binary path pointed at the one under test (verify checks
/// that the program exists).
fn units() -> (tempfile::TempDir, Vec<PathBuf>) {
    let source = deploy_dir();
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
    if tools(&["systemd-analyze"]).is_none() {
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
    if tools(&["systemd-analyze"]).is_none() {
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

/// The system calls in `group` (`@system-service`, ...), its nested groups expanded, as
/// systemd lists them.
fn syscall_group(group: &str) -> BTreeSet<String> {
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", group])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{group}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut calls = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        if item.starts_with('@') {
            calls.extend(syscall_group(item));
        } else {
            calls.insert(item.to_owned());
        }
    }
    calls
}

/// The filter `unit` sets, read from it: its allowed groups minus its denied ones.
fn unit_filter(unit: &str) -> BTreeSet<String> {
    let unit = std::fs::read_to_string(deploy_dir().join(unit)).unwrap();
    let (mut allowed, mut denied) = (BTreeSet::new(), BTreeSet::new());
    for value in unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (into, groups) = match value.strip_prefix('~') {
            Some(rest) => (&mut denied, rest),
            None => (&mut allowed, value),
        };
        for group in groups.split_whitespace() {
            into.extend(syscall_group(group));
        }
    }
    assert!(allowed.len() > 100, "{allowed:?}");
    allowed.difference(&denied).cloned().collect()
}

#[test]
fn the_server_needs_no_system_call_or_mapping_the_unit_forbids() {
    if tools(&["systemd-analyze", "strace"]).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let trace = dir.path().join("strace.out");
    let server = common::dev::start_dev_under(
        &data,
        "strace",
        &["-f", "-qq", "-o", trace.to_str().unwrap()],
    );
    // Signals go to the server, strace's child (strace itself would not pass them on); and
    // if this test fails half-way, the server goes too (dropping `server` stops strace only).
    let tracer = server.child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children")).unwrap();
    let pid = children
        .split_whitespace()
        .next()
        .expect("strace's child")
        .to_owned();
    let _reaper = KillOnDrop(pid.clone());
    let client = server.client(&data);
    let (user, service, admin) = (
        server.export("ALICE"),
        server.export("SERVICE"),
        server.export("ADMIN"),
    );
    // The banner's user: `(user "alice", valid 12 hours; ...`.
    let alice = server
        .banner
        .split_once("(user \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(name, _)| name.to_owned())
        .unwrap_or_else(|| panic!("no user in the banner:\n{}", server.banner));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = client
            .json(
                "PUT",
                "/v1/me/credentials/zoom.key",
                Some(&user),
                &json!({"value": "v1"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        let r = client
            .get("/v1/me/credentials/zoom.key", Some(&user))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let r = client
            .json(
                "POST",
                &format!("/v1/owners/{alice}/credentials/zoom.key/reveal"),
                Some(&service),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            client.get("/metrics", Some(&admin)).await.unwrap().status,
            200
        );
        assert_eq!(client.get("/readyz", None).await.unwrap().status, 200);
    });
    // No connection left open for the graceful stop to wait for.
    drop(client);
    drop(rt);
    let signal = |name: &str| {
        assert!(Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-HUP");
    server.stderr_with("SIGHUP");
    signal("-TERM");
    let status = server.wait();
    // strace exits with its child's status: the server stopped cleanly.
    assert!(status.success(), "{status}");

    let used = assert_within_filter(&trace, "strongroom.service");
    assert!(
        used.contains("accept4") && used.contains("fsync"),
        "{used:?}"
    );

    // An archive (the daily unit's command, cut by seq: every record here is seconds old)
    // over what the server wrote.
    let archive = dir.path().join("trace-archive.out");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-o", archive.to_str().unwrap()])
        .arg(env!("CARGO_BIN_EXE_strongroom"))
        .args(["audit", "archive", "--before", "3", "--output"])
        .arg(dir.path().join("audit.jsonl"))
        .env_remove("STRONGROOM_CONFIG")
        .env("STRONGROOM_DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("archived records 1.."),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let used = assert_within_filter(&archive, "strongroom-audit-archive.service");
    assert!(
        used.contains("flock") && used.contains("rename"),
        "{used:?}"
    );
}

/// Sends SIGKILL to a process when dropped (a no-op once it has exited).
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The system calls an `strace -f` output shows, after checking them against `unit`'s filter
/// and that no mapping was both writable and executable (`MemoryDenyWriteExecute=yes`).
fn assert_within_filter(trace: &Path, unit: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(trace).unwrap();
    let mut used = BTreeSet::new();
    for line in text.lines() {
        // "PID name(args) = result", or "PID <... name resumed>".
        let rest = line.split_once(' ').map_or("", |(_, r)| r.trim_start());
        let rest = rest.strip_prefix("<... ").unwrap_or(rest);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.is_empty() {
            used.insert(name);
        }
    }
    let allowed = unit_filter(unit);
    // SQLite gives a new journal file the database's owner when it runs as root (this test
    // may, the units never do) and ignores a refusal.
    let running_as_root = rustix::process::geteuid().is_root();
    let outside: Vec<&String> = used
        .iter()
        .filter(|call| !allowed.contains(*call))
        .filter(|call| !(running_as_root && call.as_str() == "fchown"))
        .collect();
    assert!(
        outside.is_empty(),
        "system calls {unit}'s filter refuses: {outside:?}"
    );
    let wx: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("PROT_EXEC") && l.contains("PROT_WRITE"))
        .collect();
    assert!(wx.is_empty(), "writable and executable mappings: {wx:?}");
    used
}
