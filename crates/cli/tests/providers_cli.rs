//! Choosing the key provider in the configuration, and moving providers with
//! `rewrap --to-config`: local keyring → Transit (OpenBao), AWS KMS (moto) and PKCS#11
//! (SoftHSM2), against the real peers started by `scripts/lib/{openbao,moto,softhsm}.sh`.
//! A test whose peer is absent says SKIP loudly (and fails with STRONGROOM_REQUIRE_PEERS=1).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{operator_config, put_req, strongroom};
use strongroom_server::Backends;

fn peer(var: &str, script: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            let msg = format!("{var} is not set: start the peer with `. scripts/lib/{script}`");
            if std::env::var("STRONGROOM_REQUIRE_PEERS").as_deref() == Ok("1") {
                panic!("STRONGROOM_REQUIRE_PEERS=1 but {msg}");
            }
            let _ = std::io::stderr()
                .lock()
                .write_all(format!("\n*** SKIP: {msg} ***\n").as_bytes());
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{:x}-{}", nanos, std::process::id())
}

fn run(args: &[&str], extra: &[&std::ffi::OsStr]) -> std::process::Output {
    strongroom()
        .args(args)
        .args(extra)
        .env_remove("STRONGROOM_DATA_DIR")
        .env_remove("STRONGROOM_CONFIG")
        .output()
        .unwrap()
}

/// `keys.mode = "strict"` in a `[keys]` section (the default is the KEK hierarchy).
fn strict(keys_section: &str) -> String {
    keys_section.replacen("[keys]\n", "[keys]\nmode = \"strict\"\n", 1)
}

/// The KEK kind data keys end up under: the remote provider itself in strict mode, else
/// Strongroom's KEK ring.
fn kek_kind<'a>(provider: &'a str, keys_section: &str) -> &'a str {
    if keys_section.contains("mode = \"strict\"") {
        provider
    } else {
        "kek"
    }
}

/// Local keyring → `keys_section` by rewrap; then everything opens through the remote
/// provider, new writes go to it, and a second rewrap finds nothing to do.
fn move_to(provider: &str, keys_section: &str) -> (tempfile::TempDir, PathBuf) {
    let kind = kek_kind(provider, keys_section);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let dd = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    assert!(run(&["keys", "generate"], &dd).status.success());
    let rt = common::rt();
    const N: usize = 30;
    rt.block_on(async {
        let b = Backends::open(&operator_config(None, &data)).await.unwrap();
        // The audit log begins before any version, as under a server.
        strongroom_server::audit_operator_action(&b, "test-setup", "ok", None, None)
            .await
            .unwrap();
        let vault = b.vault();
        for i in 0..N {
            vault
                .put(put_req(&format!("cred-{i}"), &format!("value-{i}")))
                .await
                .unwrap();
        }
        b.close().await;
    });

    let remote = tmp.path().join("remote.toml");
    std::fs::write(
        &remote,
        format!(
            "data_dir = {:?}\n{keys_section}",
            data.display().to_string()
        ),
    )
    .unwrap();
    let out = run(
        &["rewrap", "--concurrency", "8", "--to-config"],
        &[remote.as_os_str(), dd[0], dd[1]],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("rewrapped {N}, skipped 0, failed 0")),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("(target {kind}:")), "{stdout}");
    // The documented catch-up run (the same command again) finds nothing to move, and is
    // audited although the head key now lives under the target's keys.
    let out = run(
        &["rewrap", "--to-config"],
        &[remote.as_os_str(), dd[0], dd[1]],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("rewrapped 0, skipped 0, failed 0"),
        "{stdout}"
    );
    assert!(!stderr.contains("not recorded"), "{stderr}");

    rt.block_on(async {
        let b = Backends::open(&operator_config(Some(&remote), &data))
            .await
            .unwrap();
        assert_eq!(b.keyring.kind(), kind);
        assert_eq!(b.hierarchy.is_some(), kind == "kek");
        // The provider as configured (the KEK ring over the real peer, or the peer itself
        // in strict mode) passes the conformance kit: round trip, bound associated data,
        // tampering refused.
        strongroom_crypto::testing::check_provider(b.keyring.clone()).await;
        assert!(b.local_keyring.is_none());
        let vault = b.vault();
        for i in 0..N {
            let r = vault
                .reveal("alice", &format!("cred-{i}"), None)
                .await
                .unwrap();
            assert_eq!(r.value.expose_secret(), format!("value-{i}").as_bytes());
        }
        vault
            .put(put_req("written-remotely", "remote"))
            .await
            .unwrap();
        let r = vault
            .reveal("alice", "written-remotely", None)
            .await
            .unwrap();
        assert_eq!(r.value.expose_secret(), b"remote");
        let counts = b.store.count_versions_by_kek().await.unwrap();
        assert_eq!(counts.len(), 1, "{counts:?}");
        assert_eq!(counts[0].0.provider, kind);
        assert_eq!(counts[0].1, N as u64 + 1);
        b.close().await;
    });
    let out = run(&["rewrap", "--config"], &[remote.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("rewrapped 0, skipped 0, failed 0"),
        "{stdout}"
    );
    (tmp, remote)
}

fn stdout_ok(args: &[&str], cfg: &Path) -> String {
    let out = run(args, &[std::ffi::OsStr::new("--config"), cfg.as_os_str()]);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `keys rotate`, `list`, `retire` and `rewrap` with a remote provider over the KEK ring:
/// the provider wraps Strongroom's KEK versions, which `keys` manages in the store.
fn rotate_rewrap_retire_ring(remote: &Path, provider: &str) {
    let out = stdout_ok(&["keys", "rotate"], remote);
    assert!(out.contains("kek:strongroom:v2 is now active"), "{out}");
    assert!(out.contains(&format!("(wrapped by {provider}:")), "{out}");
    let out = run(&["keys", "retire", "2", "--config"], &[remote.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("active version"), "{err}");
    let out = run(&["keys", "retire", "1", "--config"], &[remote.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("31 active credential versions"), "{err}");
    let out = stdout_ok(&["rewrap"], remote);
    assert!(out.contains("rewrapped 31, skipped 0, failed 0"), "{out}");
    assert!(out.contains("(target kek:strongroom:v2)"), "{out}");
    let out = stdout_ok(&["keys", "retire", "1"], remote);
    assert!(
        out.contains("a full scan found 0 credential versions under it"),
        "{out}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&stdout_ok(&["keys", "list", "--json"], remote)).unwrap();
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(
        (rows[0]["version"].as_u64(), rows[0]["state"].as_str()),
        (Some(1), Some("retired"))
    );
    assert_eq!(rows[0]["credential_versions"], 0);
    assert_eq!(rows[0]["wrapped_by"], serde_json::Value::Null);
    assert_eq!(
        (rows[1]["version"].as_u64(), rows[1]["state"].as_str()),
        (Some(2), Some("active"))
    );
    assert_eq!(rows[1]["credential_versions"], 31);
    assert!(
        rows[1]["wrapped_by"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{provider}:")),
        "{list}"
    );
    // `--root` rotates the provider's own key too (Transit, PKCS#11) and re-wraps every live
    // ring KEK under it; AWS KMS rotates its material itself and says so.
    let out = run(
        &["keys", "rotate", "--root", "--config"],
        &[remote.as_os_str()],
    );
    if provider == "aws-kms" {
        assert_eq!(out.status.code(), Some(1));
    } else {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("kek:strongroom:v3 is now active"),
            "{stdout}"
        );
        let list: serde_json::Value =
            serde_json::from_str(&stdout_ok(&["keys", "list", "--json"], remote)).unwrap();
        let live: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["wrapped_by"].as_str())
            .collect();
        assert_eq!(live.len(), 2, "{list}");
        assert!(live.iter().all(|w| w.ends_with(":v2")), "{list}");
    }
    // Everything still opens through the provider, from a fresh start.
    let data = remote.parent().unwrap().join("data");
    common::rt().block_on(async {
        let b = Backends::open(&operator_config(Some(remote), &data))
            .await
            .unwrap();
        let r = b.vault().reveal("alice", "cred-7", None).await.unwrap();
        assert_eq!(r.value.expose_secret(), b"value-7");
        b.close().await;
    });
    // Switching the same store to strict mode: ring-wrapped data keys still open, new ones
    // go to the provider, and a rewrap moves the rest there.
    let section = std::fs::read_to_string(remote).unwrap();
    let strict_cfg = remote.with_file_name("strict.toml");
    std::fs::write(&strict_cfg, strict(&section)).unwrap();
    common::rt().block_on(async {
        let b = Backends::open(&operator_config(Some(&strict_cfg), &data))
            .await
            .unwrap();
        assert_eq!(b.keyring.active_kek().unwrap().provider, provider);
        let r = b.vault().reveal("alice", "cred-8", None).await.unwrap();
        assert_eq!(r.value.expose_secret(), b"value-8");
        b.close().await;
    });
    let out = stdout_ok(&["rewrap"], &strict_cfg);
    assert!(out.contains("rewrapped 31, skipped 0, failed 0"), "{out}");
    assert!(out.contains(&format!("(target {provider}:")), "{out}");
}

/// `keys rotate`, `list`, `retire` and `rewrap` on a remote provider in strict mode
/// (Transit, PKCS#11): the provider's own key versions.
fn rotate_rewrap_retire_remote(remote: &Path) {
    let out = stdout_ok(&["keys", "rotate"], remote);
    assert!(out.contains(":v2 is now active"), "{out}");
    let out = run(&["keys", "retire", "1", "--config"], &[remote.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("31 active credential versions"), "{err}");
    let out = stdout_ok(&["rewrap"], remote);
    assert!(out.contains("rewrapped 31, skipped 0, failed 0"), "{out}");
    let out = stdout_ok(&["keys", "retire", "1"], remote);
    assert!(out.contains("no credential version uses"), "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&stdout_ok(&["keys", "list", "--json"], remote)).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["version"], 2);
    assert_eq!(list[0]["state"], "active");
    assert_eq!(list[0]["credential_versions"], 31);
}

/// The configuration naming a key the provider does not have: one clear error naming the
/// provider, no panic.
fn wrong_key_is_one_clear_error(provider: &str, keys_section: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n{keys_section}",
            tmp.path().display().to_string()
        ),
    )
    .unwrap();
    let out = run(&["rewrap", "--config"], &[cfg.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("key provider '{provider}'")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn bao(args: &[&str]) {
    let bin = std::env::var("OPENBAO_BIN").unwrap_or_else(|_| "bao".into());
    let out = Command::new(bin)
        .args(args)
        .env(
            "BAO_ADDR",
            std::env::var("STRONGROOM_TEST_OPENBAO_ADDR").unwrap(),
        )
        .env(
            "BAO_CACERT",
            std::env::var("STRONGROOM_TEST_OPENBAO_CACERT").unwrap(),
        )
        .env(
            "BAO_TOKEN",
            std::env::var("STRONGROOM_TEST_OPENBAO_TOKEN").unwrap(),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bao {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn transit_section(key: &str) -> String {
    format!(
        "[keys]\nprovider = \"transit\"\n[keys.transit]\naddress = {:?}\nkey = {key:?}\n\
         token_env = \"STRONGROOM_TEST_OPENBAO_TOKEN\"\nca_file = {:?}\n",
        std::env::var("STRONGROOM_TEST_OPENBAO_ADDR").unwrap(),
        std::env::var("STRONGROOM_TEST_OPENBAO_CACERT").unwrap(),
    )
}

#[test]
fn local_to_transit_by_rewrap() {
    if peer("STRONGROOM_TEST_OPENBAO_ADDR", "openbao.sh").is_none() {
        return;
    }
    let key = unique("rewrap");
    bao(&["write", "-f", &format!("transit/keys/{key}")]);
    let (_tmp, remote) = move_to("transit", &transit_section(&key));
    rotate_rewrap_retire_ring(&remote, "transit");
    wrong_key_is_one_clear_error("transit", &transit_section("no-such-key"));

    let key = unique("strict");
    bao(&["write", "-f", &format!("transit/keys/{key}")]);
    let (_tmp, remote) = move_to("transit", &strict(&transit_section(&key)));
    rotate_rewrap_retire_remote(&remote);
    wrong_key_is_one_clear_error("transit", &strict(&transit_section("no-such-key")));
}

/// Operator commands never make a store or a KEK ring by accident. Pointed at a data dir
/// with no database, they fail and leave it as it was. On a store without a ring (made in
/// strict mode), `keys list` fails and makes none, until `keys generate` makes it on purpose.
#[test]
fn operator_commands_never_make_a_store_or_a_ring() {
    if peer("STRONGROOM_TEST_OPENBAO_ADDR", "openbao.sh").is_none() {
        return;
    }
    let key = unique("existing");
    bao(&["write", "-f", &format!("transit/keys/{key}")]);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let write_cfg = |file: &str, keys_section: &str| {
        let cfg = tmp.path().join(file);
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n{keys_section}",
                data.display().to_string()
            ),
        )
        .unwrap();
        cfg
    };
    let cfg = write_cfg("ring.toml", &transit_section(&key));
    let strict_cfg = write_cfg("strict.toml", &strict(&transit_section(&key)));
    let with_cfg =
        |args: &[&str], cfg: &Path| run(args, &[std::ffi::OsStr::new("--config"), cfg.as_os_str()]);

    for args in [
        &["keys", "list"][..],
        &["keys", "rotate"],
        &["audit", "verify"],
        &["rewrap"],
        &["rewrap", "--dry-run"],
    ] {
        for cfg in [&cfg, &strict_cfg] {
            let out = with_cfg(args, cfg);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.contains("no Strongroom database at"), "{args:?}: {err}");
            assert!(!data.exists(), "{args:?} made the data dir");
        }
    }

    // A store without a ring: strict mode puts data keys under the provider itself.
    std::fs::create_dir(&data).unwrap();
    let rt = common::rt();
    let ring_versions = || {
        rt.block_on(async {
            let b = Backends::open(&operator_config(Some(&strict_cfg), &data))
                .await
                .unwrap();
            let ring = strongroom_core::hierarchy::list(b.store.as_ref())
                .await
                .unwrap();
            b.close().await;
            ring.len()
        })
    };
    assert_eq!(ring_versions(), 0);
    assert!(with_cfg(&["keys", "list"], &strict_cfg).status.success());
    for args in [
        &["keys", "list"][..],
        &["keys", "rotate"],
        &["audit", "verify"],
        &["rewrap"],
        &["rewrap", "--dry-run"],
    ] {
        let out = with_cfg(args, &cfg);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("no KEK ring yet"), "{args:?}: {err}");
        assert_eq!(ring_versions(), 0, "{args:?} made a ring");
    }
    // A dry run of a move to the ring makes no ring for the target either (the real run
    // does).
    let out = run(
        &["rewrap", "--dry-run", "--to-config"],
        &[
            cfg.as_os_str(),
            std::ffi::OsStr::new("--config"),
            strict_cfg.as_os_str(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no KEK ring yet"), "{err}");
    assert_eq!(ring_versions(), 0, "a dry run made a ring");

    let out = stdout_ok(&["keys", "generate"], &cfg);
    assert!(
        out.contains("KEK ring ready: kek:strongroom:v1 active"),
        "{out}"
    );
    assert_eq!(ring_versions(), 1);
    let out = stdout_ok(&["keys", "list"], &cfg);
    assert!(out.contains("kek:strongroom"), "{out}");

    // A dry run of a move of the ring to another root moves nothing: the ring still opens
    // under its root, not under the other.
    let other_key = unique("other-root");
    bao(&["write", "-f", &format!("transit/keys/{other_key}")]);
    let other_cfg = write_cfg("other.toml", &transit_section(&other_key));
    let out = run(
        &["rewrap", "--dry-run", "--to-config"],
        &[
            other_cfg.as_os_str(),
            std::ffi::OsStr::new("--config"),
            cfg.as_os_str(),
        ],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("dry run: the KEK ring would move to key provider 'transit'"),
        "{stderr}"
    );
    assert!(stdout.contains("would rewrap 0"), "{stdout}");
    assert!(with_cfg(&["keys", "list"], &cfg).status.success());
    assert!(!with_cfg(&["keys", "list"], &other_cfg).status.success());
}

fn kms_section(key_id: &str) -> String {
    format!(
        "[keys]\nprovider = \"aws-kms\"\n[keys.aws_kms]\nkey_id = {key_id:?}\n\
         region = \"us-east-1\"\nendpoint_url = {:?}\nmax_attempts = 1\n",
        std::env::var("STRONGROOM_TEST_KMS_ENDPOINT").unwrap(),
    )
}

#[test]
fn local_to_aws_kms_by_rewrap() {
    let Some(endpoint) = peer("STRONGROOM_TEST_KMS_ENDPOINT", "moto.sh") else {
        return;
    };
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, boto3; print(boto3.client('kms', endpoint_url=sys.argv[1], \
             region_name='us-east-1').create_key()['KeyMetadata']['Arn'])",
            &endpoint,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let arn = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (_tmp, remote) = move_to("aws-kms", &kms_section(&arn));
    rotate_rewrap_retire_ring(&remote, "aws-kms");
    move_to("aws-kms", &strict(&kms_section(&arn)));
    wrong_key_is_one_clear_error(
        "aws-kms",
        &kms_section("arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"),
    );
}

fn pkcs11_section(label: &str) -> String {
    format!(
        "[keys]\nprovider = \"pkcs11\"\n[keys.pkcs11]\nmodule = {:?}\ntoken_label = {:?}\n\
         key_label = {label:?}\npin_file = {:?}\n",
        std::env::var("STRONGROOM_TEST_SOFTHSM_MODULE").unwrap(),
        std::env::var("STRONGROOM_TEST_SOFTHSM_TOKEN").unwrap(),
        std::env::var("STRONGROOM_TEST_SOFTHSM_PIN_FILE").unwrap(),
    )
}

#[test]
fn local_to_pkcs11_by_rewrap() {
    if peer("STRONGROOM_TEST_SOFTHSM_MODULE", "softhsm.sh").is_none() {
        return;
    }
    let label = unique("rewrap");
    let gen = tempfile::tempdir().unwrap();
    let cfg = gen.path().join("gen.toml");
    std::fs::write(&cfg, pkcs11_section(&label)).unwrap();
    let out = stdout_ok(&["keys", "generate"], &cfg);
    assert!(out.contains(&format!("pkcs11:{label}")), "{out}");
    let (_tmp, remote) = move_to("pkcs11", &pkcs11_section(&label));
    rotate_rewrap_retire_ring(&remote, "pkcs11");
    wrong_key_is_one_clear_error("pkcs11", &pkcs11_section("no-such-label"));

    let label = unique("strict");
    std::fs::write(&cfg, pkcs11_section(&label)).unwrap();
    stdout_ok(&["keys", "generate"], &cfg);
    let (_tmp, remote) = move_to("pkcs11", &strict(&pkcs11_section(&label)));
    rotate_rewrap_retire_remote(&remote);
}

const ADMIN: &str = "admin-token-for-provider-tests";
const SERVICE: &str = "service-token-for-provider-tests";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// A configuration for `serve --config` on a free port in `dir`: TLS from the dev layout, an
/// admin token, a service token allowed to write and reveal every credential, and
/// `keys_section`. Returns the configuration for any `keys_section`, and the CA.
fn serve_config(dir: &Path) -> (impl Fn(&str) -> String, Vec<u8>, std::net::SocketAddr) {
    let setup = strongroom_server::dev::bootstrap(&strongroom_server::dev::DevOptions {
        data_dir: dir.join("dev"),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_token: Some(zeroize::Zeroizing::new(ADMIN.to_owned())),
        service_token: None,
    })
    .unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[[rule]]\nservice = \"app\"\noperations = [\"write\", \"reveal\"]\ncredentials = [\"*\"]\n",
    )
    .unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (data, policy) = (dir.join("data"), dir.join("policy.toml"));
    let (cert, key) = (setup.cert.clone(), setup.key.clone());
    let config = move |keys_section: &str| {
        format!(
            "listen = \"{addr}\"\ndata_dir = {:?}\npolicy_file = {:?}\n[tls]\ncert = {:?}\nkey = {:?}\n\
             [[auth.admin]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\n\
             [[auth.service]]\nname = \"app\"\ntoken_sha256 = \"{}\"\n{keys_section}",
            data.display().to_string(),
            policy.display().to_string(),
            cert.display().to_string(),
            key.display().to_string(),
            sha256_hex(ADMIN),
            sha256_hex(SERVICE),
        )
    };
    (config, std::fs::read(&setup.ca_cert).unwrap(), addr)
}

/// `strongroom serve --config cfg`, killed on drop.
struct Served(std::process::Child);

impl Served {
    fn start(cfg: &Path) -> Self {
        Self(
            Command::new(assert_cmd::cargo::cargo_bin("strongroom"))
                .args(["serve", "--config"])
                .arg(cfg)
                .env_remove("STRONGROOM_DATA_DIR")
                .env_remove("STRONGROOM_CONFIG")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_ready(client: &strongroom_server::testing::TestClient) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get("/readyz", None).await {
            if r.status == 200 {
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            return Err("not ready within 30 s".to_owned());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Strict mode over `serve --config` (the provider seals every data key itself, here
/// `keys_section`'s key, made by `make_key`): `POST /v1/keys/rotate` rotates the provider's
/// own key, the server seals under the new version from the next request, and what the old
/// version sealed still reveals.
fn rotate_strict_through_the_api(provider: &str, keys_section: &str, key_id: &str) {
    use serde_json::json;
    let tmp = tempfile::tempdir().unwrap();
    let (config, ca, addr) = serve_config(tmp.path());
    let cfg = tmp.path().join("s.toml");
    std::fs::write(&cfg, config(&strict(keys_section))).unwrap();
    let server = Served::start(&cfg);
    let client = strongroom_server::testing::TestClient::new(
        addr,
        strongroom_server::testing::ClientOptions::new(ca),
    )
    .unwrap();
    const CRED: &str = "/v1/owners/alice/credentials/api.key";
    let result = common::rt().block_on(async {
        wait_ready(&client).await?;
        let put = |value: &'static str| {
            let client = &client;
            async move {
                let r = client
                    .json("PUT", CRED, Some(SERVICE), &json!({ "value": value }))
                    .await?;
                match r.status {
                    201 => Ok(r.json()["version"].clone()),
                    s => Err(format!("put: {s} {}", r.text())),
                }
            }
        };
        let reveal = |version: serde_json::Value| {
            let client = &client;
            async move {
                let r = client
                    .json(
                        "POST",
                        &format!("{CRED}/reveal"),
                        Some(SERVICE),
                        &json!({ "version": version }),
                    )
                    .await?;
                Ok::<_, String>((r.status, r.json()["value"].clone()))
            }
        };
        let v1 = put("sealed-before").await?;
        let before = client.get("/v1/keys", Some(ADMIN)).await?.json();
        let r = client
            .json("POST", "/v1/keys/rotate", Some(ADMIN), &json!({}))
            .await?;
        let rotated = (r.status, r.json());
        // At once, not after the once-a-second watch.
        let v2 = put("sealed-after").await?;
        let after = client.get("/v1/keys", Some(ADMIN)).await?.json();
        Ok::<_, String>((before, rotated, after, reveal(v1).await?, reveal(v2).await?))
    });
    drop(server);
    let (before, (status, rotated), after, old, new) = result.unwrap();
    assert_eq!(before["active"]["provider"], provider, "{before}");
    assert_eq!(before["active"]["key_id"], key_id, "{before}");
    let v = before["active"]["version"].as_u64().unwrap();
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["active"]["provider"], provider, "{rotated}");
    assert_eq!(rotated["active"]["version"], v + 1, "{rotated}");
    assert_eq!(after["active"]["version"], v + 1, "{after}");
    assert_eq!(
        after["active"]["credential_versions"], 1,
        "the put after the rotation was not sealed under the new version: {after}"
    );
    let in_use = after["in_use"].as_array().unwrap();
    assert!(
        in_use
            .iter()
            .any(|k| k["version"] == v && k["credential_versions"] == 1),
        "{after}"
    );
    assert_eq!(old, (200, json!("sealed-before")));
    assert_eq!(new, (200, json!("sealed-after")));
}

#[test]
fn strict_pkcs11_rotates_through_the_api() {
    if peer("STRONGROOM_TEST_SOFTHSM_MODULE", "softhsm.sh").is_none() {
        return;
    }
    let label = unique("api-rotate");
    let gen = tempfile::tempdir().unwrap();
    let cfg = gen.path().join("gen.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n{}",
            gen.path().display().to_string(),
            strict(&pkcs11_section(&label))
        ),
    )
    .unwrap();
    stdout_ok(&["keys", "generate"], &cfg);
    rotate_strict_through_the_api("pkcs11", &pkcs11_section(&label), &label);
}

#[test]
fn strict_transit_rotates_through_the_api() {
    if peer("STRONGROOM_TEST_OPENBAO_ADDR", "openbao.sh").is_none() {
        return;
    }
    let key = unique("api-rotate");
    bao(&["write", "-f", &format!("transit/keys/{key}")]);
    rotate_strict_through_the_api("transit", &transit_section(&key), &format!("transit/{key}"));
}

/// `serve --config` with `keys.provider = "transit"`: ready, `/v1/keys` names the KEK ring's
/// version that Transit wraps; `keys rotate` reaches the running server within seconds; a
/// wrong key name stops the server at start with one line naming the provider.
#[test]
fn serve_with_transit_as_the_key_provider() {
    use std::time::{Duration, Instant};
    if peer("STRONGROOM_TEST_OPENBAO_ADDR", "openbao.sh").is_none() {
        return;
    }
    let key = unique("serve");
    bao(&["write", "-f", &format!("transit/keys/{key}")]);
    let tmp = tempfile::tempdir().unwrap();
    let (config, ca, addr) = serve_config(tmp.path());
    let config = |key: &str| config(&transit_section(key));
    let admin = ADMIN;
    let cfg = tmp.path().join("s.toml");
    std::fs::write(&cfg, config(&key)).unwrap();
    let server = Served::start(&cfg);
    let client = strongroom_server::testing::TestClient::new(
        addr,
        strongroom_server::testing::ClientOptions::new(ca),
    )
    .unwrap();
    let result = common::rt().block_on(async {
        wait_ready(&client).await?;
        let first = client.get("/v1/keys", Some(admin)).await?.json();
        // `keys rotate` beside the running server: it wraps new data keys with the new KEK
        // version within a second, without a restart or SIGHUP.
        let out = run(&["keys", "rotate", "--config"], &[cfg.as_os_str()]);
        if !out.status.success() {
            return Err(format!(
                "keys rotate: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = client.get("/v1/keys", Some(admin)).await?.json();
            if now["active"]["version"] == 2 {
                // And through the API, by an admin: the ring's next version, in force at
                // once on this server.
                let r = client
                    .json(
                        "POST",
                        "/v1/keys/rotate",
                        Some(admin),
                        &serde_json::json!({}),
                    )
                    .await?;
                if r.status != 200 || r.json()["active"]["version"] != 3 {
                    return Err(format!("POST /v1/keys/rotate: {} {}", r.status, r.text()));
                }
                let after = client.get("/v1/keys", Some(admin)).await?.json();
                if after["active"]["version"] != 3 {
                    return Err(format!("after the API rotation: {after}"));
                }
                return Ok((first, now));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the running server still uses {now} 10 s after keys rotate"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    drop(server);
    let (keys, rotated) = result.unwrap();
    assert_eq!(keys["active"]["provider"], "kek", "{keys}");
    assert_eq!(keys["active"]["key_id"], "strongroom", "{keys}");
    assert_eq!(keys["active"]["version"], 1, "{keys}");
    assert_eq!(rotated["active"]["provider"], "kek", "{rotated}");

    std::fs::write(&cfg, config("no-such-key")).unwrap();
    let out = strongroom()
        .args(["serve", "--config"])
        .arg(&cfg)
        .env_remove("STRONGROOM_DATA_DIR")
        .env_remove("STRONGROOM_CONFIG")
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("strongroom: error: key provider 'transit'"),
        "{err}"
    );
}

/// Without `keys.aws_kms.endpoint_url`, the AWS SDK takes an endpoint from the environment
/// (or the profile): plain HTTP to another host is refused there too, before any call, and
/// the endpoint is named without the user name and password it held.
#[test]
fn an_endpoint_from_the_environment_is_held_to_the_same_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("kms.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[keys]\nprovider = \"aws-kms\"\n[keys.aws_kms]\n\
             key_id = \"alias/strongroom\"\nregion = \"us-east-1\"\nmax_attempts = 1\n",
            tmp.path().display().to_string()
        ),
    )
    .unwrap();
    for var in ["AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL"] {
        let out = strongroom()
            .args(["rewrap", "--config"])
            .arg(&cfg)
            .env_remove("STRONGROOM_DATA_DIR")
            .env_remove("STRONGROOM_CONFIG")
            .env_remove("AWS_ENDPOINT_URL_KMS")
            .env_remove("AWS_ENDPOINT_URL")
            .env(var, "http://AKIA:secret-canary@10.0.0.1:4566")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL or the AWS profile")
                && err.contains("user name or password"),
            "{var}: {err}"
        );
        assert!(!err.contains("secret-canary"), "{var}: {err}");
    }
}
