//! `--dev` bootstrap: the files it writes, their modes, their reuse, and a server built from
//! them that accepts the tokens it prints.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use strongroom_server::dev::{self, DevOptions};
use strongroom_server::testing::{ClientOptions, TestClient};
use strongroom_server::Server;
use zeroize::Zeroizing;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn options(dir: &Path) -> DevOptions {
    DevOptions {
        data_dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_token: None,
        service_token: None,
    }
}

#[test]
fn bootstrap_writes_private_files_and_reuses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested/strongroom-data");
    let first = dev::bootstrap(&options(&dir)).unwrap();
    assert!(first.data_dir.is_absolute());
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("tls")), 0o700);
    let files = [
        "keyring.json",
        "dev-jwt-secret",
        "dev-tokens.json",
        "tls/ca.pem",
        "tls/cert.pem",
        "tls/key.pem",
    ];
    for f in files {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(first.created.len(), files.len());
    let secret = std::fs::read(dir.join("dev-jwt-secret")).unwrap();
    assert!(secret.len() >= 32);
    assert_ne!(first.admin_token.as_str(), first.service_token.as_str());

    let snapshot: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    let second = dev::bootstrap(&options(&dir)).unwrap();
    assert!(
        second.created.is_empty(),
        "restart created {:?}",
        second.created
    );
    let again: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    assert_eq!(snapshot, again, "restart changed a file");
    assert_eq!(first.admin_token.as_str(), second.admin_token.as_str());
    assert_eq!(first.service_token.as_str(), second.service_token.as_str());

    // Fixed tokens from the command line win, without rewriting the stored ones.
    let mut fixed = options(&dir);
    fixed.admin_token = Some(Zeroizing::new("admin-fixed-token-123".into()));
    fixed.service_token = Some(Zeroizing::new("service-fixed-token-123".into()));
    let third = dev::bootstrap(&fixed).unwrap();
    assert_eq!(third.admin_token.as_str(), "admin-fixed-token-123");
    assert_eq!(third.service_token.as_str(), "service-fixed-token-123");
    assert_eq!(
        std::fs::read(dir.join("dev-tokens.json")).unwrap(),
        snapshot[2]
    );

    let mut short = options(&dir);
    short.service_token = Some(Zeroizing::new("short".into()));
    let e = dev::bootstrap(&short).unwrap_err().to_string();
    assert!(e.contains("--dev-service-token"), "{e}");
}

/// A token flag that will be refused is refused before the data folder, its keyring and
/// tokens are made.
#[test]
fn a_bad_token_flag_leaves_no_folder_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    for (admin, service, says) in [
        (None, Some("has space in it 123"), "--dev-service-token"),
        (Some("short"), None, "--dev-admin-token"),
        (
            Some("the-same-token-1234"),
            Some("the-same-token-1234"),
            "must differ",
        ),
    ] {
        let mut bad = options(&dir);
        bad.admin_token = admin.map(|t| Zeroizing::new(t.to_owned()));
        bad.service_token = service.map(|t| Zeroizing::new(t.to_owned()));
        let e = dev::bootstrap(&bad).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        assert!(!dir.exists(), "{says}: the folder was made");
    }
}

/// Servers started together on a new folder take turns making the layout: all of them
/// start, with one keyring, and the certificate fits its key.
#[test]
fn bootstraps_racing_on_a_new_folder_agree_on_one_layout() {
    for _ in 0..10 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let runs: Vec<_> = (0..4)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || dev::bootstrap(&options(&dir)))
            })
            .collect();
        let setups: Vec<_> = runs
            .into_iter()
            .map(|r| r.join().unwrap().expect("every racing bootstrap succeeds"))
            .collect();
        assert!(setups
            .windows(2)
            .all(|w| w[0].service_token == w[1].service_token));
        let config = setups[0].config("127.0.0.1:0".parse().unwrap()).unwrap();
        strongroom_server::tls::load_certified_key(
            config.tls.as_ref().unwrap(),
            &strongroom_server::tls::provider(),
        )
        .expect("the certificate fits its key");
    }
}

/// A certificate `ca.pem` does not sign, or a key of another pair (a rewrite of the three
/// files cut short, as by a full disk), is made again at the next start: the certificate
/// served was the new one and `ca.pem` the old, so every `curl --cacert` failed.
#[test]
fn a_certificate_set_left_half_rewritten_is_made_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let other = tmp.path().join("other");
    dev::bootstrap(&options(&dir)).unwrap();
    dev::bootstrap(&options(&other)).unwrap();
    let tls = |d: &Path, f: &str| d.join("tls").join(f);
    let signs = |d: &Path| {
        use rustls::client::danger::ServerCertVerifier as _;
        let leaf = strongroom_server::tls::load_certs("cert", &tls(d, "cert.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in strongroom_server::tls::load_certs("ca", &tls(d, "ca.pem")).unwrap() {
            roots.add(c).unwrap();
        }
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            strongroom_server::tls::provider(),
        )
        .build()
        .unwrap()
        .verify_server_cert(
            &leaf[0],
            &[],
            &rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .is_ok()
    };
    assert!(signs(&dir));
    for (file, what) in [("cert.pem", "the certificate"), ("key.pem", "the key")] {
        // One file of a new set written, the rest of the set not.
        std::fs::copy(tls(&other, file), tls(&dir, file)).unwrap();
        let again = dev::bootstrap(&options(&dir)).unwrap();
        assert!(!again.created.is_empty(), "{what} of another set was kept");
        assert!(signs(&dir), "{what}: ca.pem does not sign the certificate");
        let config = again.config("127.0.0.1:0".parse().unwrap()).unwrap();
        strongroom_server::tls::load_certified_key(
            config.tls.as_ref().unwrap(),
            &strongroom_server::tls::provider(),
        )
        .expect("the certificate fits its key");
    }
    // An intact set is kept.
    assert!(dev::bootstrap(&options(&dir)).unwrap().created.is_empty());
}

/// A keyring gone from beside a store is not silently replaced by a new one (which could
/// open nothing in it, and would sit where the real one must be restored).
#[test]
fn a_lost_keyring_beside_a_store_is_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    dev::bootstrap(&options(tmp.path())).unwrap();
    std::fs::write(tmp.path().join("strongroom.db"), b"").unwrap();
    let keyring = tmp.path().join("keyring.json");
    let kept = std::fs::read(&keyring).unwrap();
    std::fs::remove_file(&keyring).unwrap();
    let e = dev::bootstrap(&options(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Restore keyring.json"), "{e}");
    assert!(!keyring.exists(), "a new keyring was made");
    std::fs::write(&keyring, kept).unwrap();
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();
    dev::bootstrap(&options(tmp.path())).unwrap();
}

#[test]
fn secrets_open_to_others_are_refused_with_advice() {
    let tmp = tempfile::tempdir().unwrap();
    dev::bootstrap(&options(tmp.path())).unwrap();
    for f in ["dev-jwt-secret", "tls/key.pem", "dev-tokens.json"] {
        let p = tmp.path().join(f);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = dev::bootstrap(&options(tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600") && e.contains(f), "{f}: {e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let p = tmp.path().join("dev-jwt-secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = dev::mint_user_token(tmp.path(), "alice", Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(e.contains("chmod 600"), "{e}");
}

#[test]
fn minting_needs_a_dev_data_dir_and_sane_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let e = dev::mint_user_token(tmp.path(), "alice", Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(e.contains("serve --dev"), "{e}");
    dev::bootstrap(&options(tmp.path())).unwrap();
    assert!(dev::mint_user_token(tmp.path(), "", Duration::from_secs(60)).is_err());
    assert!(dev::mint_user_token(tmp.path(), &"x".repeat(256), Duration::from_secs(60)).is_err());
    // A subject the server would refuse as an owner id (a line break).
    assert!(dev::mint_user_token(tmp.path(), "a\nb", Duration::from_secs(60)).is_err());
    assert!(dev::mint_user_token(tmp.path(), "alice", Duration::ZERO).is_err());
    assert!(
        dev::mint_user_token(tmp.path(), "alice", Duration::from_secs(31 * 24 * 3600)).is_err()
    );
    assert!(dev::mint_user_token(tmp.path(), "alice", Duration::from_secs(60)).is_ok());
}

#[tokio::test]
async fn the_dev_server_accepts_its_tokens_and_serves_the_dev_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let setup = dev::bootstrap(&options(tmp.path())).unwrap();
    let config = setup.config("127.0.0.1:0".parse().unwrap()).unwrap();
    let server = Server::start_with_policy(config, dev::policy())
        .await
        .unwrap();
    let addr = server.local_addr();
    let alice = dev::mint_user_token(tmp.path(), "alice", Duration::from_secs(60)).unwrap();
    let banner = dev::banner(&setup, addr, &alice, "alice");
    assert!(banner.contains(&format!("https://127.0.0.1:{}", addr.port())));
    assert!(!banner.contains("note "), "{banner}");
    // Where it listens, as called: all addresses through loopback, any other as it is, with
    // how to reach it under the certificate's name.
    for (listen, url, note) in [
        ("0.0.0.0:8443", "https://127.0.0.1:8443", false),
        ("[::]:8443", "https://[::1]:8443", false),
        ("[::1]:8443", "https://[::1]:8443", false),
        ("127.0.0.2:8443", "https://127.0.0.2:8443", true),
        ("10.1.2.3:8443", "https://10.1.2.3:8443", true),
    ] {
        let b = dev::banner(&setup, listen.parse().unwrap(), &alice, "alice");
        assert!(
            b.contains(&format!("listening on    {url} ")),
            "{listen}: {b}"
        );
        assert!(b.contains(&format!("export SR={url} ")), "{listen}: {b}");
        let ip = url
            .trim_start_matches("https://")
            .rsplit_once(':')
            .unwrap()
            .0;
        assert_eq!(
            b.contains(&format!("--resolve localhost:8443:{ip}")),
            note,
            "{listen}: {b}"
        );
    }
    assert!(banner.contains("--cacert") && banner.contains(setup.service_token.as_str()));
    // The paste block sets up every token and the data folder the CLI reads.
    let canonical = std::fs::canonicalize(tmp.path()).unwrap();
    for line in [
        format!("export ADMIN='{}'", setup.admin_token.as_str()),
        format!("export STRONGROOM_DATA_DIR={}", canonical.display()),
    ] {
        assert!(banner.contains(&line), "{line} not in {banner}");
    }
    let running = common::spawn_started(server);

    let ca = std::fs::read(&setup.ca_cert).unwrap();
    let client = TestClient::new(addr, ClientOptions::new(ca.clone())).unwrap();
    let r = client
        .json(
            "PUT",
            "/v1/me/credentials/zoom.api-key",
            Some(&alice),
            &json!({"value": "canary-dev"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = client
        .json(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(setup.service_token.as_str()),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["value"].as_str()),
        (200, Some("canary-dev"))
    );
    let r = client
        .get("/v1/keys", Some(setup.admin_token.as_str()))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // The certificate is for 127.0.0.1 as well as localhost.
    let mut by_ip = ClientOptions::new(ca);
    by_ip.server_name = "127.0.0.1".into();
    let r = TestClient::new(addr, by_ip)
        .unwrap()
        .get("/healthz", None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    running.stop().await.unwrap();
}

#[test]
fn a_data_dir_that_is_a_file_is_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let e = dev::bootstrap(&options(&file)).err().unwrap().to_string();
    assert!(e.contains("afile is not a directory"), "{e}");
}
