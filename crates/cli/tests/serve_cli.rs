//! `strongroom serve`, `token mint` and `keys --config` as a user runs them: a child process,
//! a temp data dir, a free port, real TLS.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::dev::{
    mint, start_dev, start_dev_env, start_dev_stalled_stderr, start_dev_unwritable_stderr,
    start_dev_with_limits, start_dev_with_open_files,
};
use common::{stdout_of, strongroom};
use serde_json::json;

#[test]
fn dev_server_end_to_end_then_sigterm_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Debug logs: still no value and no token in them.
    let server = start_dev_env(&data, &[], &[("STRONGROOM_LOG__LEVEL", "debug")]);
    assert!(server.banner.contains("--cacert"), "{}", server.banner);
    for f in [
        "keyring.json",
        "dev-jwt-secret",
        "dev-tokens.json",
        "tls/key.pem",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let client = server.client(&data);
    let service = server.export("SERVICE");
    let alice_from_banner = server.export("ALICE");
    let bob = mint(&data, "bob");
    let canary = "canary-e2e-7f3a9c";

    common::rt().block_on(async {
        // As the user: store, then list (metadata only).
        let r = client
            .json(
                "PUT",
                "/v1/me/credentials/zoom.api-key",
                Some(&bob),
                &json!({"value": canary, "metadata": {"host": "api.zoom.us"}}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(r.json()["version"], 1);
        assert!(!r.text().contains(canary));
        let r = client.get("/v1/me/credentials", Some(&bob)).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.text().contains("zoom.api-key") && !r.text().contains(canary),
            "{}",
            r.text()
        );
        let r = client
            .get("/v1/me/credentials/zoom.api-key", Some(&bob))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert!(!r.text().contains(canary));

        // As the dev service: reveal.
        let r = client
            .json(
                "POST",
                "/v1/owners/bob/credentials/zoom.api-key/reveal",
                Some(&service),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["value"], canary);

        // The user cannot reveal (a service route), and another user sees nothing.
        let r = client
            .json(
                "POST",
                "/v1/owners/bob/credentials/zoom.api-key/reveal",
                Some(&bob),
                &json!({}),
            )
            .await
            .unwrap();
        assert!(matches!(r.status, 401 | 403 | 404), "{}", r.status);
        assert!(!r.text().contains(canary));
        let r = client
            .get("/v1/me/credentials/zoom.api-key", Some(&alice_from_banner))
            .await
            .unwrap();
        assert_eq!(r.status, 404, "{}", r.text());
        let r = client
            .get("/v1/me/credentials", Some("not-a-token"))
            .await
            .unwrap();
        assert_eq!(r.status, 401);
    });

    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "graceful exit");
    let logs = std::fs::read_to_string(data.with_extension("stderr.log")).unwrap();
    assert!(
        logs.contains("/v1/me/credentials"),
        "debug request logs expected:\n{logs}"
    );
    assert!(
        logs.contains("stopped"),
        "graceful shutdown logged:\n{logs}"
    );
    for secret in [
        canary,
        service.as_str(),
        bob.as_str(),
        alice_from_banner.as_str(),
    ] {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {secret}"
        );
    }
}

#[test]
fn a_restart_reuses_the_certificate_tokens_and_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let first = start_dev(&data, &[]);
    let service = first.export("SERVICE");
    let ca = std::fs::read(data.join("tls/ca.pem")).unwrap();
    let alice = mint(&data, "alice");
    common::rt().block_on(async {
        let r = first
            .client(&data)
            .json(
                "PUT",
                "/v1/me/credentials/k",
                Some(&alice),
                &json!({"value": "persisted"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201);
    });
    assert_eq!(first.terminate().code(), Some(0));

    let second = start_dev(&data, &[]);
    assert_eq!(
        std::fs::read(data.join("tls/ca.pem")).unwrap(),
        ca,
        "certificate reused"
    );
    assert_eq!(second.export("SERVICE"), service, "token reused");
    common::rt().block_on(async {
        // A token minted before the restart still works, and the value survived.
        let client = second.client(&data);
        let r = client
            .get("/v1/me/credentials/k", Some(&alice))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let r = client
            .json(
                "POST",
                "/v1/owners/alice/credentials/k/reveal",
                Some(&service),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(r.json()["value"], "persisted");
    });
    assert_eq!(second.terminate().code(), Some(0));
}

#[test]
fn fixed_dev_tokens_from_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_dev(
        &data,
        &[
            "--dev-admin-token",
            "admin-token-for-tests",
            "--dev-service-token",
            "service-token-for-tests",
        ],
    );
    assert_eq!(server.export("SERVICE"), "service-token-for-tests");
    common::rt().block_on(async {
        let client = server.client(&data);
        let r = client
            .get("/v1/keys", Some("admin-token-for-tests"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let r = client
            .json(
                "PUT",
                "/v1/owners/carol/credentials/x",
                Some("service-token-for-tests"),
                &json!({"value": "v"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    });
    assert_eq!(server.terminate().code(), Some(0));
}

fn one_line_failure(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(101), "panicked");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("strongroom: error: "), "{err}");
    err
}

#[test]
fn startup_failures_are_one_line_and_non_zero() {
    let tmp = tempfile::tempdir().unwrap();

    // A bad key in the config file.
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[limits]\nmax_connections = 0\n",
    )
    .unwrap();
    let out = strongroom()
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = one_line_failure(&out);
    assert!(err.contains("key `limits.max_connections`"), "{err}");

    // An environment override that does not parse.
    std::fs::write(&cfg, "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n").unwrap();
    let out = strongroom()
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("STRONGROOM_LISTEN", "not-an-address")
        .output()
        .unwrap();
    let err = one_line_failure(&out);
    assert!(err.contains("STRONGROOM_LISTEN"), "{err}");

    // Valid config, missing certificate file.
    let out = strongroom()
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = one_line_failure(&out);
    assert!(err.contains("c.pem"), "{err}");

    // No such config file.
    let out = strongroom()
        .args(["serve", "--config", "/nonexistent/strongroom.toml"])
        .output()
        .unwrap();
    let err = one_line_failure(&out);
    assert!(err.contains("/nonexistent/strongroom.toml"), "{err}");

    // The port is taken: nothing starts, and the data dir's files are still fine to reuse.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = strongroom()
        .args(["serve", "--dev", "--listen", &addr, "--data-dir"])
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    let err = one_line_failure(&out);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(
        out.stdout.is_empty(),
        "printed instructions for a server that did not start"
    );
    // ... and a new data dir is not made for it (a mistyped second start left one behind).
    let fresh = tmp.path().join("never-made");
    let out = strongroom()
        .args(["serve", "--dev", "--listen", &addr, "--data-dir"])
        .arg(&fresh)
        .output()
        .unwrap();
    let err = one_line_failure(&out);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(
        !fresh.exists(),
        "a data dir was made for a server that did not start"
    );

    // --dev and --config together: a usage error.
    let out = strongroom()
        .args(["serve", "--dev", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // ... and with the file named by the environment, the message says so.
    let out = strongroom()
        .args(["serve", "--dev"])
        .env("STRONGROOM_CONFIG", &cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("STRONGROOM_CONFIG is set in the environment"),
        "{err}"
    );

    // A host name where an address belongs.
    let out = strongroom()
        .args(["serve", "--dev", "--listen", "localhost:9443"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("host names are not resolved"), "{err}");

    // A dev token without --dev (it was silently ignored: the operator believed it set).
    for flag in ["--dev-admin-token", "--dev-service-token"] {
        let out = strongroom()
            .args(["serve", flag, "a-token-of-enough-length", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("apply to `serve --dev` only"), "{err}");
        assert!(!err.contains("a-token-of-enough-length"), "{err}");
    }
}

#[test]
fn token_mint_needs_dev_and_an_existing_dev_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let out = strongroom()
        .args(["token", "mint", "alice"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("identity provider"));
    let out = strongroom()
        .args(["token", "mint", "--dev", "--data-dir"])
        .arg(tmp.path())
        .arg("alice")
        .output()
        .unwrap();
    let err = one_line_failure(&out);
    assert!(err.contains("serve --dev"), "{err}");
    // Bad arguments are usage errors, exit 2, before the data dir is looked at.
    for args in [
        &["--ttl", "0", "alice"][..],
        &["--ttl", "99999999", "alice"],
        &[""],
    ] {
        let out = strongroom()
            .args(["token", "mint", "--dev", "--data-dir"])
            .arg(tmp.path())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn keys_commands_follow_the_server_config() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = tmp.path().join("keys/ring.json");
    std::fs::create_dir_all(ring.parent().unwrap()).unwrap();
    let cfg = tmp.path().join("strongroom.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[keys]\nkeyring = {:?}\n",
            ring.display().to_string()
        ),
    )
    .unwrap();
    strongroom()
        .args(["keys", "generate", "--config"])
        .arg(&cfg)
        .assert()
        .success();
    assert!(ring.is_file());
    strongroom()
        .args(["keys", "rotate", "--config"])
        .arg(&cfg)
        .assert()
        .success();
    let out = strongroom()
        .args(["keys", "list", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success());
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);

    // Without keys.keyring: DATA_DIR/keyring.json, with data_dir from the file or the env.
    let data = tmp.path().join("data");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    strongroom()
        .args(["keys", "generate", "--config"])
        .arg(&cfg)
        .assert()
        .success();
    assert!(data.join("keyring.json").is_file());
    let data2 = tmp.path().join("data2");
    std::fs::create_dir(&data2).unwrap();
    strongroom()
        .args(["keys", "generate", "--config"])
        .arg(&cfg)
        .env("STRONGROOM_DATA_DIR", &data2)
        .assert()
        .success();
    assert!(data2.join("keyring.json").is_file());

    // A broken config is reported as such.
    std::fs::write(&cfg, "[keys]\nkeyring = 3\n").unwrap();
    let out = strongroom()
        .args(["keys", "list", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = one_line_failure(&out);
    assert!(err.contains("keys.keyring"), "{err}");

    // --config and --keyring together: a usage error.
    let out = strongroom()
        .args(["keys", "list", "--config"])
        .arg(&cfg)
        .arg("--keyring")
        .arg(&ring)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn keys_work_on_the_dev_layout_while_the_server_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_dev(&data, &[]);
    strongroom()
        .args(["keys", "rotate", "--data-dir"])
        .arg(&data)
        .assert()
        .success();
    // SIGHUP: the server reloads the keyring and keeps serving.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let alice = mint(&data, "alice");
    let service = server.export("SERVICE");
    common::rt().block_on(async {
        let client = server.client(&data);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = client.get("/v1/keys", Some(&service)).await.unwrap();
            // The service token is not an admin's: 403. What matters is the reload below.
            assert!(matches!(r.status, 401 | 403));
            if server.stderr().contains("keyring reloaded") || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = client
            .json(
                "PUT",
                "/v1/me/credentials/after-rotation",
                Some(&alice),
                &json!({"value": "v2"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201);
    });
    assert!(
        server.stderr().contains("keyring reloaded"),
        "{}",
        server.stderr()
    );
    let out = strongroom()
        .args(["keys", "list", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert_eq!(server.terminate().code(), Some(0));
}

/// Log lines that cannot be written (stderr on a full disk) are dropped and counted, never a
/// panic: the server starts, takes a rotation (the watcher's log line), a SIGHUP and a
/// SIGTERM. It used to die at its "ready" line; a server started with a working stderr that
/// later filled lost its keyring watcher at its first line, and went on sealing under the
/// key `keys retire` then erased.
#[test]
fn a_log_that_cannot_be_written_stops_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_dev_unwritable_stderr(&data);
    let alice = mint(&data, "alice");
    let pid = server.child.id().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    strongroom()
        .args(["keys", "rotate", "--data-dir"])
        .arg(&data)
        .assert()
        .success();
    common::rt().block_on(async {
        let client = server.client(&data);
        let put = |i: u32| {
            let (client, alice) = (&client, &alice);
            async move {
                client
                    .json(
                        "PUT",
                        &format!("/v1/me/credentials/after-rotation-{i}"),
                        Some(alice),
                        &json!({"value": "v"}),
                    )
                    .await
                    .unwrap()
                    .status
            }
        };
        // The watcher takes the rotation (and logs it, into the full disk): puts are sealed
        // under version 2.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut i = 0;
        while versions_under(&data, 2) == 0 {
            assert!(Instant::now() < deadline, "never sealed under version 2");
            assert_eq!(put(i).await, 201);
            i += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let dropped_now = || async {
            let r = client.get("/metrics", None).await.unwrap();
            assert_eq!(r.status, 200);
            let page = String::from_utf8(r.body).unwrap();
            dropped(&page).unwrap_or_else(|| panic!("no dropped-lines counter in {page}"))
        };
        let before = dropped_now().await;
        assert!(
            before > 0,
            "the start's and the rotation's lines were dropped"
        );
        // The reload logs, into the full disk: the counter moves, and the server still
        // answers.
        signal("-HUP");
        while dropped_now().await == before {
            assert!(Instant::now() < deadline, "SIGHUP logged nothing");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(put(i).await, 201);
    });
    assert_eq!(server.terminate().code(), Some(0));
}

/// How many active credential versions `keys list` counts under keyring version `version`.
fn versions_under(data: &Path, version: u64) -> u64 {
    let out = stdout_of(
        strongroom()
            .args(["keys", "list", "--json", "--data-dir"])
            .arg(data),
    );
    let keys: serde_json::Value = serde_json::from_slice(&out).unwrap();
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["version"] == version)
        .and_then(|k| k["credential_versions"].as_u64())
        .unwrap_or(0)
}

/// A keyring file the server cannot read for a while (out of file descriptors when a
/// rotation lands) is read again at the next check: writes used to stop (503
/// `key_unavailable`) until a SIGHUP, the file having been noted as seen.
#[test]
fn a_keyring_reload_that_failed_for_want_of_files_is_tried_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_dev_with_open_files(&data, 64, 64);
    let stderr = server.stderr_with("strongroom ready");
    assert!(
        stderr.contains("exceed the open-file limit"),
        "no warning that 1024 connections do not fit in 64 files:\n{stderr}"
    );
    let alice = mint(&data, "alice");
    // Connections that never say a word take every descriptor left (the rest wait in the
    // listen queue, taking the place of any the server closes).
    let held: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| std::net::TcpStream::connect(server.addr).ok())
        .collect();
    strongroom()
        .args(["keys", "rotate", "--data-dir"])
        .arg(&data)
        .assert()
        .success();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.stderr().contains("does not load") {
        assert!(
            Instant::now() < deadline,
            "the reload did not fail:\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Said as it is: the file is fine, the server is out of descriptors.
    let stderr = server.stderr();
    assert!(
        stderr.contains("Too many open files") && !stderr.contains("is not a valid keyring"),
        "{stderr}"
    );
    drop(held);
    common::rt().block_on(async {
        let client = server.client(&data);
        let mut i = 0;
        loop {
            let r = client
                .json(
                    "PUT",
                    &format!("/v1/me/credentials/after-rotation-{i}"),
                    Some(&alice),
                    &json!({"value": "v"}),
                )
                .await;
            if r.is_ok_and(|r| r.status == 201) && versions_under(&data, 2) > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "writes did not resume under version 2:\n{}",
                server.stderr()
            );
            i += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert_eq!(server.terminate().code(), Some(0));
}

/// The server raises its open-file soft limit to the hard one (a soft limit of 1024 did not
/// hold the default 1024 connections and the server's own files), and says nothing then.
#[test]
fn the_open_file_soft_limit_is_raised_to_the_hard_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_dev_with_open_files(&data, 256, 4096);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(open_files[3..5], ["4096", "4096"], "{limits}");
    let stderr = server.stderr_with("strongroom ready");
    assert!(!stderr.contains("open-file limit"), "{stderr}");
}

/// The server keeps its memory out of core dumps: started where they are allowed, it lowers
/// its own `RLIMIT_CORE` to 0 (and makes itself not dumpable, which main's unit test checks).
#[test]
fn the_server_writes_no_core_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_dev_with_limits(&data, &["--core=unlimited:unlimited"]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let core: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(core[4..6], ["0", "0"], "{limits}");
}

/// A reader of stderr that stalls (a log shipper, journald under pressure) does not stop the
/// server: once the pipe was full, every thread that logged waited on it and nothing was
/// answered, `/healthz` included. Lines past the queue are dropped and counted.
#[test]
fn a_stalled_log_reader_stops_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (server, _unread) = start_dev_stalled_stderr(&data);
    common::rt().block_on(async {
        let client = server.client(&data);
        // Each request logs at debug: far more than a pipe's 64 KiB, and than the queue.
        let mut i = 0;
        loop {
            let r = tokio::time::timeout(Duration::from_secs(10), client.get("/healthz", None))
                .await
                .expect("no answer within 10 s: the server waits for its log")
                .unwrap();
            assert_eq!(r.status, 200);
            i += 1;
            if i % 500 == 0 {
                let page = client.get("/metrics", None).await.unwrap();
                let page = String::from_utf8(page.body).unwrap();
                if dropped(&page).is_some_and(|n| n > 0) {
                    break;
                }
                assert!(i < 100_000, "no line dropped after {i} requests");
            }
        }
    });
    assert_eq!(server.terminate().code(), Some(0));
}

/// `strongroom_log_lines_dropped_total` in a metrics page.
fn dropped(metrics: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("strongroom_log_lines_dropped_total "))
        .and_then(|n| n.trim().parse().ok())
}

/// Versions sealed by a key provider this server does not use (left behind by a move between
/// providers that missed late writes) answer 503; the server says so at start, and `keys
/// list` shows them.
#[test]
fn versions_under_another_key_provider_are_pointed_out() {
    use strongroom_store::{KekRef, NewVersion, Store};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_dev(&data, &[]);
    let alice = mint(&data, "alice");
    common::rt().block_on(async {
        let r = server
            .client(&data)
            .json(
                "PUT",
                "/v1/me/credentials/here.key",
                Some(&alice),
                &json!({"value": "v"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201);
    });
    assert_eq!(server.terminate().code(), Some(0));
    assert!(!server_warned_of_other_providers(&data));
    common::rt().block_on(async {
        let store = strongroom_store::sqlite::SqliteStore::open_dir(&data)
            .await
            .unwrap();
        let moved = NewVersion::new(
            "alice",
            "moved.key",
            1,
            vec![1; 48],
            vec![2; 40],
            KekRef::new("transit", "app-key", 3),
            "user:alice",
            time::OffsetDateTime::now_utc(),
        );
        store.put_version(moved).await.unwrap();
        // Under a version this keyring file does not hold (an older copy restored), and
        // under another keyring.
        let keyring: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(data.join("keyring.json")).unwrap())
                .unwrap();
        let key_id = keyring["key_id"].as_str().unwrap();
        for (name, kek) in [
            ("later.key", KekRef::new("local", key_id, 7)),
            ("elsewhere.key", KekRef::new("local", "kr-another", 1)),
        ] {
            let v = NewVersion::new(
                "alice",
                name,
                1,
                vec![1; 48],
                vec![2; 40],
                kek,
                "user:alice",
                time::OffsetDateTime::now_utc(),
            );
            store.put_version(v).await.unwrap();
        }
        store.close().await;
    });

    let server = start_dev(&data, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server_warned_of_other_providers(&data) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stderr = server.stderr();
    let warned: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sealed by another key provider"))
        .collect();
    assert!(
        warned.len() == 1
            && warned[0].contains("transit:app-key:v3")
            && warned[0].contains("credential_versions=1"),
        "{stderr}"
    );
    let unheld: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("this keyring file does not hold"))
        .collect();
    assert!(
        unheld.len() == 2
            && unheld.iter().any(|l| l.contains(":v7"))
            && unheld.iter().any(|l| l.contains("local:kr-another:v1")),
        "{stderr}"
    );
    let list = |json: bool| {
        let mut cmd = strongroom();
        cmd.args(["keys", "list", "--data-dir"]).arg(&data);
        if json {
            cmd.arg("--json");
        }
        String::from_utf8(stdout_of(&mut cmd)).unwrap()
    };
    let text = list(false);
    assert!(
        text.contains(
            "transit:app-key:v3: 1 active credential version sealed by another key provider"
        ),
        "{text}"
    );
    let rows: serde_json::Value = serde_json::from_str(&list(true)).unwrap();
    let other: Vec<&serde_json::Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "other-provider")
        .collect();
    assert_eq!(other.len(), 1, "{rows}");
    assert_eq!(other[0]["credential_versions"], 1);
    let unheld = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "not-in-this-file")
        .count();
    assert_eq!(unheld, 2, "{rows}");
    assert!(text.contains(":v7: 1 active credential version sealed under a keyring version this file does not hold"), "{text}");
    assert_eq!(server.terminate().code(), Some(0));
}

fn server_warned_of_other_providers(data: &Path) -> bool {
    std::fs::read_to_string(data.with_extension("stderr.log"))
        .unwrap_or_default()
        .contains("sealed by another key provider")
}

#[test]
fn help_explains_serve_and_token() {
    for args in [
        &["serve", "--help"][..],
        &["token", "mint", "--help"],
        &["keys", "generate", "--help"],
    ] {
        let out = strongroom().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.len() > 400, "{args:?}: help too thin");
    }
    let out = strongroom().args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "--config",
        "--dev",
        "--listen",
        "--data-dir",
        "--dev-admin-token",
        "STRONGROOM_",
        "SIGTERM",
    ] {
        assert!(text.contains(want), "serve --help lacks {want}");
    }
    let out = strongroom()
        .args(["keys", "list", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().contains("--config"));
}

/// `serve --config`: SIGHUP re-reads the file's `[auth]`; a broken one is refused and the
/// settings in force stay.
#[test]
fn sighup_reloads_the_auth_settings_of_the_config_file() {
    use strongroom_server::dev::{bootstrap, DevOptions};

    const TOKEN_A: &str = "service-token-A-for-reload-tests";
    const TOKEN_B: &str = "service-token-B-for-reload-tests";
    // printf %s "$TOKEN" | sha256sum
    const SHA_A: &str = "b6afe863a2e033ceeb30ff424869d0c1e773f78450b62f9961e1624d6937552c";
    const SHA_B: &str = "0639dac0e734398c855d29cb1841abe21b259e0d28cfa78f39fe867d7de05ee2";
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let setup = bootstrap(&DevOptions {
        data_dir: data.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_token: None,
        service_token: None,
    })
    .unwrap();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nservice = \"billing\"\noperations = [\"write\"]\ncredentials = [\"*\"]\n\
         [[rule]]\nservice = \"imprter\"\noperations = [\"write\"]\ncredentials = [\"*\"]\n",
    )
    .unwrap();
    let cfg = tmp.path().join("strongroom.toml");
    let write_cfg = |token_sha256: &str| {
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = {:?}\npolicy_file = {:?}\n\
                 [tls]\ncert = {:?}\nkey = {:?}\n\
                 [[auth.service]]\nname = \"billing\"\ntoken_sha256 = \"{token_sha256}\"\n\
                 [log]\nformat = \"text\"\n",
                data.display().to_string(),
                policy.display().to_string(),
                setup.cert.display().to_string(),
                setup.key.display().to_string(),
            ),
        )
        .unwrap();
    };
    write_cfg(SHA_A);
    /// Kills the server if the test fails half-way.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = tmp.path().join("serve.stderr");
    let mut child = Child(
        Command::new(assert_cmd::cargo::cargo_bin("strongroom"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env_remove("STRONGROOM_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    };
    let ca = std::fs::read(data.join("tls/ca.pem")).unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = strongroom_server::testing::TestClient::new(
        addr,
        strongroom_server::testing::ClientOptions::new(ca),
    )
    .unwrap();
    let put = |token: &str| {
        let client = client.clone();
        let token = token.to_owned();
        common::rt().block_on(async move {
            client
                .json(
                    "PUT",
                    "/v1/owners/alice/credentials/zoom.key",
                    Some(&token),
                    &json!({"value": "v"}),
                )
                .await
                .map(|r| r.status)
                .unwrap_or(0)
        })
    };
    // Until it listens, then until a reload has taken effect.
    let wait_for = |token: &str, want: u16| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = put(token);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still {got} (want {want}); stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(TOKEN_A, 201);
    assert_eq!(put(TOKEN_B), 401);
    // A rule for a service nothing authenticates (a typo) is pointed out at start.
    let started = std::fs::read_to_string(&stderr).unwrap();
    let warned: Vec<&str> = started
        .lines()
        .filter(|l| l.contains("no [[auth.service]] or [[auth.mtls]] entry"))
        .collect();
    assert!(
        warned.len() == 1 && warned[0].contains("imprter"),
        "{started}"
    );

    write_cfg(SHA_B);
    hup();
    wait_for(TOKEN_B, 201);
    assert_eq!(put(TOKEN_A), 401);

    // A broken [auth]: the configuration is refused as a whole (logged), token B stays in force.
    write_cfg("not-a-digest");
    hup();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&stderr)
        .unwrap_or_default()
        .contains(
            "configuration reload failed; keeping the previous broker and authentication settings",
        )
    {
        assert!(Instant::now() < deadline, "no reload failure logged");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(log.contains("auth.service[0].token_sha256"), "{log}");
    assert_eq!(put(TOKEN_B), 201);
    assert_eq!(put(TOKEN_A), 401);

    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A data dir served by --config is never taken over by --dev, whose dev service token
    // may reveal every credential: refused before it writes anything there.
    assert!(data.join("served-by-config").exists());
    std::fs::remove_file(data.join("dev-tokens.json")).unwrap();
    let out = strongroom()
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .timeout(Duration::from_secs(30))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_failure(&out);
    assert!(
        err.contains("is served by `strongroom serve --config`"),
        "{err}"
    );
    assert!(!data.join("dev-tokens.json").exists());
}
