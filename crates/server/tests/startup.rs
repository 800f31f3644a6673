//! Start-up is all or nothing, with one clear error; SIGHUP's reload keeps what fails to load.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{spawn, Fixture, SERVICE_TOKEN};
use serde_json::json;
use strongroom_core::policy::{Decision, Operation};
use strongroom_server::config::Config;
use strongroom_server::Server;

async fn start_err(config: Config) -> String {
    match Server::start(config).await {
        Ok(s) => panic!("started on {}", s.local_addr()),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "one line: {text}");
            text
        }
    }
}

/// The billing service puts alice's credential `name`; the status.
async fn service_put(client: &strongroom_server::testing::TestClient, name: &str) -> u16 {
    client
        .json(
            "PUT",
            &format!("/v1/owners/alice/credentials/{name}"),
            Some(SERVICE_TOKEN),
            &json!({"value": "v"}),
        )
        .await
        .unwrap()
        .status
}

#[tokio::test]
async fn a_port_in_use_is_one_clear_error() {
    let fx = Fixture::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = fx.config();
    config.listen = taken.local_addr().unwrap();
    let e = start_err(config).await;
    assert!(
        e.starts_with("cannot listen on 127.0.0.1:") && e.contains("in use"),
        "{e}"
    );
}

#[tokio::test]
async fn missing_or_broken_files_are_named() {
    let fx = Fixture::new();

    let mut c = fx.config();
    c.tls.as_mut().unwrap().cert = fx.dir.path().join("nope.pem");
    let e = start_err(c).await;
    assert!(
        e.contains("TLS certificate") && e.contains("nope.pem"),
        "{e}"
    );

    let garbage = fx.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem").unwrap();
    let mut c = fx.config();
    c.tls.as_mut().unwrap().cert = garbage.clone();
    let e = start_err(c).await;
    assert!(
        e.starts_with("tls: TLS certificate") && e.contains("garbage.pem"),
        "{e}"
    );

    // A key file cut short, and one with a damaged byte: the error says what is wrong in
    // words and quotes nothing of the key.
    let (_, other_key) = fx.pki.leaf(&["localhost"], true);
    let body: String = other_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let cut = fx.dir.path().join("cut-key.pem");
    let half = &other_key[..other_key.len() / 2];
    common::write_private(&cut, half.as_bytes());
    let damaged = fx.dir.path().join("damaged-key.pem");
    common::write_private(
        &damaged,
        other_key.replacen(&body[10..14], "!!!!", 1).as_bytes(),
    );
    for (file, says) in [(cut, "is the file cut short?"), (damaged, "base64")] {
        let mut c = fx.config();
        c.tls.as_mut().unwrap().key = file;
        let e = start_err(c).await;
        assert!(e.contains("TLS private key") && e.contains(says), "{e}");
        assert!(!e.contains("[45, 45"), "bytes printed: {e}");
        for window in body.as_bytes().windows(6) {
            let piece = std::str::from_utf8(window).unwrap();
            assert!(!e.contains(piece), "key material in the error: {e}");
        }
    }

    // A key that belongs to another certificate.
    let wrong = fx.dir.path().join("wrong-key.pem");
    common::write_private(&wrong, other_key.as_bytes());
    let mut c = fx.config();
    c.tls.as_mut().unwrap().key = wrong;
    let e = start_err(c).await;
    assert!(
        e.contains("does not fit certificate") && e.contains("holds another public key"),
        "{e}"
    );

    // A certificate outside its validity period: every client would refuse it.
    for (name, from, until) in [
        (
            "expired",
            rcgen::date_time_ymd(2019, 1, 1),
            rcgen::date_time_ymd(2020, 1, 1),
        ),
        (
            "future",
            rcgen::date_time_ymd(2090, 1, 1),
            rcgen::date_time_ymd(2091, 1, 1),
        ),
    ] {
        let (cert, key) = fx.pki.leaf_with(&["localhost"], true, |p| {
            p.not_before = from;
            p.not_after = until;
        });
        let (cert_path, key_path) = (
            fx.dir.path().join(format!("{name}.pem")),
            fx.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert).unwrap();
        common::write_private(&key_path, key.as_bytes());
        let mut c = fx.config();
        c.tls.as_mut().unwrap().cert = cert_path;
        c.tls.as_mut().unwrap().key = key_path;
        let e = start_err(c).await;
        assert!(
            e.contains(&format!("{name}.pem"))
                && (e.contains("expired on") || e.contains("not valid before")),
            "{e}"
        );
    }

    std::fs::write(
        &fx.policy,
        "[[rule]]\nservice = \"s\"\noperations = [\"read\"]\ncredentials = [\"*\"]\n",
    )
    .unwrap();
    let e = start_err(fx.config()).await;
    assert!(
        e.starts_with("policy file") && e.contains("policy.toml"),
        "{e}"
    );
    std::fs::write(&fx.policy, common::POLICY).unwrap();

    std::fs::write(&fx.jwt_secret, "short\n").unwrap();
    let e = start_err(fx.config()).await;
    assert!(
        e.contains("auth.jwt.hs256_secret_file") && e.contains("at least 32"),
        "{e}"
    );

    // Whoever reads the HS256 secret can mint any user's token: refused like the keyring.
    std::fs::write(
        &fx.jwt_secret,
        "0123456789abcdef0123456789abcdef-long-enough\n",
    )
    .unwrap();
    std::fs::set_permissions(&fx.jwt_secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = start_err(fx.config()).await;
    assert!(e.contains("secret file") && e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&fx.jwt_secret, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Whoever may change the policy, the configuration or the data dir decides who may do
/// what: each must be writable by its owner only, as sshd asks of `authorized_keys`.
#[tokio::test]
async fn files_others_could_change_stop_the_start() {
    let fx = Fixture::new();
    // The fixture's configuration with another HS256 secret file.
    let with_secret = |path: &std::path::Path| {
        fx.toml("", "").replace(
            &format!(
                "hs256_secret_file = {:?}",
                fx.jwt_secret.display().to_string()
            ),
            &format!("hs256_secret_file = {:?}", path.display().to_string()),
        )
    };
    let mode = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    for (path, bad, good, what) in [
        (&fx.policy, 0o666, 0o644, "policy file"),
        (&fx.policy, 0o664, 0o640, "policy file"),
        (&fx.data_dir, 0o777, 0o700, "data dir"),
        (&fx.data_dir, 0o1777, 0o755, "data dir"),
    ] {
        mode(path, bad);
        let e = start_err(fx.config()).await;
        assert!(
            e.contains(what) && e.contains("chmod go-w") && e.contains(&format!("{bad:04o}")),
            "{e}"
        );
        mode(path, good);
        let server = Server::start(fx.config()).await.unwrap();
        drop(server);
    }

    // The TLS key: others writing it is refused; reading it only warned about (certificate
    // tooling leaves keys group- or world-readable on purpose), in words that say so.
    let tls_key = fx.config().tls.unwrap().key;
    mode(&tls_key, 0o666);
    let e = start_err(fx.config()).await;
    assert!(e.contains("chmod go-w"), "{e}");
    mode(&tls_key, 0o644);
    let logs = common::LogCapture::default();
    let guard = logs.install();
    drop(Server::start(fx.config()).await.unwrap());
    drop(guard);
    assert!(
        logs.text().contains("can read the TLS private key") && !logs.text().contains("replace"),
        "{}",
        logs.text()
    );
    mode(&tls_key, 0o600);

    // The client CA decides which certificates pass for mapped services and admins.
    mode(&fx.client_ca, 0o666);
    let e = start_err(fx.mtls_config("optional")).await;
    assert!(
        e.contains("TLS client CA") && e.contains("chmod go-w"),
        "{e}"
    );
    mode(&fx.client_ca, 0o644);
    drop(Server::start(fx.mtls_config("optional")).await.unwrap());

    // Whoever can change the JWT public key can sign any user's token.
    let public_key = fx.dir.path().join("jwt-public.pem");
    std::fs::write(&public_key, &fx.pki.ca_pem).unwrap();
    mode(&public_key, 0o666);
    let text = fx.toml("", "").replace(
        &format!(
            "hs256_secret_file = {:?}",
            fx.jwt_secret.display().to_string()
        ),
        &format!(
            "public_key_file = {:?}\nalgorithm = \"ES256\"",
            public_key.display().to_string()
        ),
    );
    let e = start_err(fx.config_from(&text)).await;
    assert!(
        e.contains("JWT public key file") && e.contains("chmod go-w"),
        "{e}"
    );

    // An RSA key too small for the verifier, in either PEM form: refused at start (every
    // token got 401 with nothing said).
    mode(&public_key, 0o644);
    for pem in [RSA_1024_SPKI, RSA_1024_PKCS1, RSA_1024_CERT] {
        std::fs::write(&public_key, pem).unwrap();
        let e = start_err(fx.config_from(&text.replace("ES256", "RS256"))).await;
        assert!(
            e.contains("1024-bit RSA key") && e.contains("at least 2048"),
            "{e}"
        );
    }
    // An RSA key where `algorithm` says ES256: named in words, not by a library's variant.
    let e = start_err(fx.config_from(&text)).await;
    assert!(
        e.contains("not a PEM EC P-256 public key") && e.contains("`algorithm`"),
        "{e}"
    );

    // A folder above the policy that others may write: they could swap the file between
    // the check and the read. With the sticky bit (as /tmp) they cannot.
    let folder = fx.dir.path().join("shared");
    std::fs::create_dir(&folder).unwrap();
    let policy = folder.join("policy.toml");
    std::fs::copy(&fx.policy, &policy).unwrap();
    let mut c = fx.config();
    c.policy_file = Some(policy.clone());
    mode(&folder, 0o777);
    let e = start_err(c.clone()).await;
    assert!(
        e.contains("shared above the policy file") && e.contains("0777"),
        "{e}"
    );
    mode(&folder, 0o1777);
    drop(Server::start(c.clone()).await.unwrap());
    // ... also when the path reaches it through a symlink kept in a safe folder.
    mode(&folder, 0o777);
    let link = fx.dir.path().join("policy-link.toml");
    std::os::unix::fs::symlink(&policy, &link).unwrap();
    c.policy_file = Some(link);
    let e = start_err(c.clone()).await;
    assert!(e.contains("shared above the policy file"), "{e}");
    // ... and when a link on the way passes through it, though the file it leads to is
    // elsewhere (a link there could be swapped for another).
    let hop = folder.join("hop");
    std::os::unix::fs::symlink(&fx.policy, &hop).unwrap();
    let first = fx.dir.path().join("first-link.toml");
    std::os::unix::fs::symlink(&hop, &first).unwrap();
    c.policy_file = Some(first);
    let e = start_err(c).await;
    assert!(e.contains("shared above the policy file"), "{e}");
    mode(&folder, 0o755);

    // Owned by another user (only root can hand a file over, so only then).
    // The fixture's folder is ours: its owner is who we run as.
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata(fx.dir.path()).unwrap().uid() == 0 {
        std::os::unix::fs::chown(&fx.policy, Some(65534), None).unwrap();
        let e = start_err(fx.config()).await;
        assert!(
            e.contains("policy file") && e.contains("owned by uid 65534"),
            "{e}"
        );
        std::os::unix::fs::chown(&fx.policy, Some(0), None).unwrap();
        // Whoever owns the HS256 secret can sign any user's token.
        std::os::unix::fs::chown(&fx.jwt_secret, Some(65534), None).unwrap();
        let e = start_err(fx.config()).await;
        assert!(
            e.contains("JWT HS256 secret file") && e.contains("owned by uid 65534"),
            "{e}"
        );
        std::os::unix::fs::chown(&fx.jwt_secret, Some(0), None).unwrap();
        // A file not there yet, in a folder of another user's: they could make it between
        // the check and its reader's open, so the folder is refused all the same.
        let theirs = fx.dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let text = with_secret(&theirs.join("later.secret"));
        let e = start_err(fx.config_from(&text)).await;
        assert!(
            e.contains("theirs") && e.contains("owned by uid 65534"),
            "{e}"
        );
        // A link owned by another user decides where the path leads.
        let link = fx.dir.path().join("their-link.toml");
        std::os::unix::fs::symlink(&fx.policy, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), None).unwrap();
        let mut c = fx.config();
        c.policy_file = Some(link);
        let e = start_err(c).await;
        assert!(e.contains("symlink") && e.contains("uid 65534"), "{e}");
    }

    // A file not there yet in a folder anyone may make entries in (sticky, as /tmp): fine
    // for files there, not for a name another user could make first.
    let sticky = fx.dir.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    mode(&sticky, 0o1777);
    let text = with_secret(&sticky.join("not-yet.secret"));
    let e = start_err(fx.config_from(&text)).await;
    assert!(e.contains("anyone may make it"), "{e}");

    // The audit jsonl file: never through a link, never one others can write.
    let jsonl = fx.dir.path().join("audit.jsonl");
    let with_jsonl = format!(
        "{}\n[audit]\njsonl = {:?}\n",
        fx.toml("", ""),
        jsonl.display().to_string()
    );
    std::os::unix::fs::symlink(&fx.policy, &jsonl).unwrap();
    let e = start_err(fx.config_from(&with_jsonl)).await;
    assert!(e.contains("audit jsonl file"), "{e}");
    std::fs::remove_file(&jsonl).unwrap();
    std::fs::write(&jsonl, "").unwrap();
    mode(&jsonl, 0o666);
    let e = start_err(fx.config_from(&with_jsonl)).await;
    assert!(
        e.contains("audit jsonl file") && e.contains("chmod go-w"),
        "{e}"
    );
    mode(&jsonl, 0o600);
    drop(Server::start(fx.config_from(&with_jsonl)).await.unwrap());
    // ... nor through a linked folder on its way (another user's folder swapped in there),
    // nor into a FIFO (waiting for a reader hung the start).
    let logs = fx.dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let linked = fx.dir.path().join("logs-link");
    std::os::unix::fs::symlink(&logs, &linked).unwrap();
    let via_link = format!(
        "{}\n[audit]\njsonl = {:?}\n",
        fx.toml("", ""),
        linked.join("audit.jsonl").display().to_string()
    );
    let e = start_err(fx.config_from(&via_link)).await;
    assert!(e.contains("without following a link"), "{e}");
    let fifo = logs.join("audit.jsonl");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    mode(&fifo, 0o600);
    let in_fifo = format!(
        "{}\n[audit]\njsonl = {:?}\n",
        fx.toml("", ""),
        fifo.display().to_string()
    );
    let e = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        start_err(fx.config_from(&in_fifo)),
    )
    .await
    .expect("a FIFO as the audit file hung the start");
    assert!(e.contains("audit jsonl file"), "{e}");

    let file = fx.dir.path().join("strongroom.toml");
    std::fs::write(&file, "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n").unwrap();
    mode(&file, 0o646);
    let e = Config::load(Some(&file), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("config file") && e.contains("chmod go-w"), "{e}");
    let e = Config::load_for_operator(Some(&file), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("config file") && e.contains("chmod go-w"), "{e}");
    mode(&file, 0o600);
    Config::load(Some(&file), &Default::default()).unwrap();
}

#[tokio::test]
async fn keyring_problems_stop_the_start() {
    let fx = Fixture::new();
    let ring = fx.data_dir.join("keyring.json");
    std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = start_err(fx.config()).await;
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::remove_file(&ring).unwrap();
    let e = start_err(fx.config()).await;
    assert!(
        e.contains("no keyring at") && e.contains("keys generate"),
        "{e}"
    );
    // The keyring is opened before the store: a start that fails on it makes no database.
    assert!(
        !fx.data_dir
            .join(strongroom_store::sqlite::DB_FILE_NAME)
            .exists(),
        "a failed start left a new database behind"
    );
}

#[tokio::test]
async fn a_store_schema_from_the_future_is_refused() {
    let fx = Fixture::new();
    // Create the database, then stamp it with a schema version this build does not know.
    let store = strongroom_store::sqlite::SqliteStore::open_dir(&fx.data_dir)
        .await
        .unwrap();
    let path = store.path().to_owned();
    store.close().await;
    strongroom_store::sqlite::SqliteStore::testing_set_schema_version(&path, 9999).unwrap();
    let e = start_err(fx.config()).await;
    assert!(
        e.starts_with("store:") && e.contains("9999") && e.contains("upgrade"),
        "{e}"
    );
}

#[tokio::test]
async fn reload_swaps_the_policy_and_keeps_it_when_the_new_one_is_broken() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options());
    let put = |name: &'static str| service_put(&client, name);
    assert_eq!(put("slack.token").await, 403);

    std::fs::write(
        &fx.policy,
        "[[rule]]\nservice = \"billing\"\noperations = [\"write\"]\ncredentials = [\"slack.*\"]\n",
    )
    .unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(put("slack.token").await, 201);
    assert_eq!(put("zoom.key").await, 403);

    std::fs::write(&fx.policy, "[[rule]]\nservice = 7\n").unwrap();
    let errors = server.reloader.reload().unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("policy file")),
        "{errors:?}"
    );
    assert_eq!(
        server
            .state
            .policy()
            .decide("billing", Operation::Write, "alice", "slack.x", None),
        Decision::Allow,
        "the previous policy stays in force"
    );
    assert_eq!(put("slack.other").await, 201);
    server.stop().await.unwrap();
}

/// logrotate's `create` mode: the `[audit] jsonl` file is moved away and the server signalled;
/// records go on in a new file under the configured name, not into the moved one.
#[tokio::test]
async fn reload_reopens_the_audit_jsonl_file() {
    let fx = Fixture::new();
    let jsonl = fx.dir.path().join("audit.jsonl");
    let text = format!(
        "{}\n[audit]\njsonl = {:?}\n",
        fx.toml("", ""),
        jsonl.display().to_string()
    );
    let server = spawn(fx.config_from(&text)).await;
    let client = server.client(fx.client_options());
    let put = |name: &'static str| service_put(&client, name);
    // The sink is written after the answer: wait for the line.
    let wait_for = |path: std::path::PathBuf, needle: &'static str| async move {
        let what = format!("{needle} in {}", path.display());
        let path = &path;
        common::eventually(&what, move || async move {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .contains(needle)
                .then_some(())
        })
        .await
    };
    assert_eq!(put("zoom.before").await, 201);
    wait_for(jsonl.clone(), "zoom.before").await;
    let rotated = fx.dir.path().join("audit.jsonl.1");
    std::fs::rename(&jsonl, &rotated).unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(put("zoom.after").await, 201);
    wait_for(jsonl.clone(), "zoom.after").await;
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(!old.contains("zoom.after"), "{old}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&jsonl).unwrap().permissions().mode() & 0o777,
        0o600
    );
    server.stop().await.unwrap();
}

/// Requests without valid credentials are recorded up to an allowance per client address;
/// the rest are counted (a metric), so anyone reaching the port cannot grow the log without
/// end. Requests with valid credentials are always recorded.
#[tokio::test]
async fn unauthenticated_requests_are_recorded_within_an_allowance() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options());
    let started = std::time::Instant::now();
    for _ in 0..100 {
        let r = client
            .get("/v1/me/credentials", Some("forged.jwt.token"))
            .await
            .unwrap();
        assert_eq!(r.status, 401);
    }
    // Each second these requests took may have refilled one more record (a fixed "one or
    // two" was a guess about how fast the machine sends 100 requests).
    let refilled = started.elapsed().as_secs() as usize + 3;
    assert_eq!(service_put(&client, "zoom.key").await, 201);
    let records = client
        .get("/v1/audit?limit=1000", Some(common::ADMIN_TOKEN))
        .await
        .unwrap()
        .json();
    let records = records["items"].as_array().unwrap();
    let anonymous = records
        .iter()
        .filter(|r| r["principal_kind"] == "anonymous")
        .count();
    // 60 a minute per address, plus what refilled meanwhile.
    assert!(
        (60..=60 + refilled).contains(&anonymous),
        "{anonymous} anonymous records, {refilled} refilled at most"
    );
    assert!(records
        .iter()
        .any(|r| r["principal_id"] == "billing" && r["name"] == "zoom.key"));
    let metrics = client.get("/metrics", None).await.unwrap().text();
    let counted: u64 = metrics
        .lines()
        .find(|l| l.starts_with("strongroom_audit_unrecorded_anonymous_total "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(counted as usize + anonymous, 100, "{metrics}");
    // The minute's warning says who sent them.
    let logs = common::LogCapture::default();
    let guard = logs.install();
    server.state.prune_rate_limits();
    drop(guard);
    let text = logs.text();
    assert!(
        text.contains("past the audit allowance")
            && text.contains(&format!("127.0.0.1: {counted}")),
        "{text}"
    );
    server.stop().await.unwrap();
}

/// A client that hangs up right after its request makes hyper drop the request mid-way:
/// it is still recorded, under the caller its credentials name (it used to leave no record
/// most of the time). Here a reveal the policy refuses, 20 times over.
#[tokio::test]
async fn requests_cut_short_by_the_client_are_recorded() {
    use tokio::io::AsyncWriteExt;
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options().http1());
    for _ in 0..20 {
        let mut raw = client.connect_raw().await.unwrap();
        raw.write_all(
            format!(
                "POST /v1/owners/alice/credentials/slack.cut/reveal HTTP/1.1\r\nHost: localhost\r\n\
                 Authorization: Bearer {SERVICE_TOKEN}\r\nContent-Type: application/json\r\n\
                 Content-Length: 2\r\n\r\n{{}}"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        raw.flush().await.unwrap();
        let _ = raw.shutdown().await;
        drop(raw);
    }
    let records = common::wait_for_records(&client, "slack.cut", 20).await;
    assert_eq!(records.len(), 20, "{records:?}");
    assert!(
        records
            .iter()
            .all(|r| r["principal_id"] == "billing" && (r["status"] == 403 || r["status"] == 499)),
        "{records:?}"
    );
    server.stop().await.unwrap();
}

/// User keys that accept any audience accept tokens those keys signed for other
/// applications: said at start; so is a policy file without rules.
#[tokio::test]
async fn a_jwt_section_accepting_any_audience_is_warned_about() {
    let fx = Fixture::new();
    let logs = common::LogCapture::default();
    let _guard = logs.install();
    let warning = "accepts user tokens of any issuer or audience";
    drop(Server::start(fx.config()).await.unwrap());
    assert!(!logs.text().contains(warning), "{}", logs.text());
    let text = fx.toml("", "").replace(
        "audience = \"strongroom\"\n",
        "accept_any_audience = true\n",
    );
    drop(Server::start(fx.config_from(&text)).await.unwrap());
    assert!(logs.text().contains(warning), "{}", logs.text());

    // Delegated rules without an audience for delegation: the service could use the user's
    // token on /v1/me.
    let warning = "sets no on_behalf_of_audience";
    assert!(!logs.text().contains(warning));
    std::fs::write(
        &fx.policy,
        "[[rule]]\nservice = \"billing\"\noperations = [\"reveal\"]\ncredentials = [\"*\"]\n\
         delegated = true\n",
    )
    .unwrap();
    drop(Server::start(fx.config()).await.unwrap());
    assert!(logs.text().contains(warning), "{}", logs.text());

    // A policy file without rules (a save cut short) is said at start, as at a reload.
    let warning = "the policy has no rules";
    assert!(!logs.text().contains(warning), "{}", logs.text());
    std::fs::write(&fx.policy, "").unwrap();
    drop(Server::start(fx.config()).await.unwrap());
    assert!(logs.text().contains(warning), "{}", logs.text());
}

/// A reload reads the policy file the configuration names now, warns about a rule for a
/// service nobody authenticates and about a policy that grants nothing, and names the
/// settings that only a restart applies.
#[tokio::test]
async fn reload_follows_a_moved_policy_file_and_warns_about_what_it_cannot_apply() {
    let fx = Fixture::new();
    let logs = common::LogCapture::default();
    let _guard = logs.install();
    let path = fx.dir.path().join("strongroom.toml");
    let text = fx.toml("", "");
    std::fs::write(&path, &text).unwrap();
    let overrides = strongroom_server::config::Overrides::default();
    let server = spawn(Config::load(Some(&path), &overrides).unwrap()).await;
    server
        .reloader
        .set_config_file(Some(path.clone()), overrides);
    let decide = |service: &str| {
        server
            .state
            .policy()
            .decide(service, Operation::Write, "alice", "slack.x", None)
    };
    assert_eq!(decide("billing"), Decision::Deny);

    // The configuration now names another file (and a new limit).
    let moved = fx.dir.path().join("policy-2.toml");
    std::fs::write(
        &moved,
        "[[rule]]\nservice = \"billing\"\noperations = [\"write\"]\ncredentials = [\"slack.*\"]\n\n\
         [[rule]]\nservice = \"biling\"\noperations = [\"write\"]\ncredentials = [\"*\"]\n",
    )
    .unwrap();
    let policy_line = format!("policy_file = {:?}", fx.policy.display().to_string());
    assert!(text.contains(&policy_line));
    let moved_text = text
        .replace(
            &policy_line,
            &format!("policy_file = {:?}", moved.display().to_string()),
        )
        .replace("[limits]", "[limits]\nverify_per_minute = 5");
    std::fs::write(&path, &moved_text).unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(
        decide("billing"),
        Decision::Allow,
        "the moved file is in force"
    );
    let text_now = logs.text();
    assert!(
        text_now.contains("no [[auth.service]] or [[auth.mtls]] entry")
            && text_now.contains("biling"),
        "{text_now}"
    );
    assert!(
        text_now.contains("take effect only at a restart") && text_now.contains("limits"),
        "{text_now}"
    );

    // User tokens of any audience, from a reload: said as at a start.
    let warning = "accepts user tokens of any issuer or audience";
    assert!(!logs.text().contains(warning));
    std::fs::write(
        &path,
        moved_text.replace(
            "audience = \"strongroom\"\n",
            "accept_any_audience = true\n",
        ),
    )
    .unwrap();
    server.reloader.reload().unwrap();
    assert!(logs.text().contains(warning), "{}", logs.text());
    std::fs::write(&path, &moved_text).unwrap();

    // A policy emptied (a save cut short): in force, fail closed, and said loudly.
    std::fs::write(&moved, "").unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(decide("billing"), Decision::Deny);
    assert!(logs.text().contains("has no rules"), "{}", logs.text());

    // The file allows again; then the configuration names none: as at a start without one,
    // services may do nothing (the policy in force stayed until a restart).
    std::fs::write(
        &moved,
        "[[rule]]\nservice = \"billing\"\noperations = [\"write\"]\ncredentials = [\"slack.*\"]\n",
    )
    .unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(decide("billing"), Decision::Allow);
    std::fs::write(&path, text.replace(&policy_line, "")).unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(decide("billing"), Decision::Deny, "the removed policy_file");
    assert!(
        logs.text().contains("policy_file was removed"),
        "{}",
        logs.text()
    );
    // And named again: in force again.
    std::fs::write(&path, &moved_text).unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(decide("billing"), Decision::Allow);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reload_picks_up_a_keyring_rotation() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options());
    let alice = fx.user_token("alice");
    let r = client
        .json(
            "PUT",
            "/v1/me/credentials/zoom.a",
            Some(&alice),
            &json!({"value": "before"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    strongroom_keys::local::rotate(
        &fx.data_dir.join("keyring.json"),
        time::OffsetDateTime::now_utc(),
        &strongroom_crypto::OsRandom,
    )
    .unwrap();
    server.reloader.reload().unwrap();
    let r = client
        .json(
            "PUT",
            "/v1/me/credentials/zoom.b",
            Some(&alice),
            &json!({"value": "after"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let keys = client
        .get("/v1/keys", Some(common::ADMIN_TOKEN))
        .await
        .unwrap();
    assert_eq!(keys.status, 200, "{}", keys.text());
    assert_eq!(keys.json()["active"]["version"], 2, "{}", keys.text());
    // Both values still reveal.
    for (name, want) in [("zoom.a", "before"), ("zoom.b", "after")] {
        let r = client
            .json(
                "POST",
                &format!("/v1/owners/alice/credentials/{name}/reveal"),
                Some(SERVICE_TOKEN),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(r.json()["value"], want);
    }
    server.stop().await.unwrap();
}

/// A keyring file deleted while the server runs: nothing new is sealed (a write acknowledged
/// now would be lost at the next start, which refuses to run without the file) and the node
/// says it is not ready, until the file is back.
#[tokio::test]
async fn a_keyring_file_gone_stops_new_writes_until_it_is_back() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options());
    let alice = fx.user_token("alice");
    let put = |name: &'static str| common::user_put(&client, &alice, name);
    assert_eq!(put("zoom.a").await.0, 201);
    let path = fx.data_dir.join("keyring.json");
    let kept = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    // The watcher looks every second; /readyz may answer from a verdict a second old.
    let put = &put;
    let refused = common::eventually("writes refused once the file is gone", move || async move {
        let r = put("zoom.b").await;
        (r.0 != 201).then_some(r)
    })
    .await;
    assert_eq!(refused, (503, json!("key_unavailable")));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(client.get("/readyz", None).await.unwrap().status, 503);

    // Restored as operators do: a copy (readable by others, so still refused), then chmod.
    std::fs::write(&path, &kept).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(put("zoom.c").await.0, 503);
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    common::eventually("writes resume once the file is back", move || async move {
        (put("zoom.c").await.0 == 201).then_some(())
    })
    .await;

    // Edited in place, the same size, its modification time put back: still seen.
    let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
    let at = text.find("\"material\"").unwrap() + "\"material\": \"".len() + 2;
    let mut edited = text.into_bytes();
    edited[at] = if edited[at] == b'A' { b'B' } else { b'A' };
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(&edited).unwrap();
        f.set_modified(modified).unwrap();
    }
    common::eventually(
        "a same-size edit with its mtime put back seen",
        move || async move { (put("zoom.d").await.0 == 503).then_some(()) },
    )
    .await;
    server.stop().await.unwrap();
}

/// A record of rotations that does not read (changed outside Strongroom, or written by a
/// newer version) cannot tell whether this keyring file is the newest: nothing new is
/// sealed, rotation is refused, what was sealed still opens; a record that reads again lifts
/// it.
#[tokio::test]
async fn a_keyring_record_that_does_not_read_seals_nothing_new() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options());
    let alice = fx.user_token("alice");
    let put = |name: &'static str| common::user_put(&client, &alice, name);
    assert_eq!(put("zoom.a").await.0, 201);

    let path = fx.data_dir.join("keyring.json");
    let ring = strongroom_keys::local::LocalKeyring::open(&path).unwrap();
    let key = format!("keyring/{}/newest-version", ring.key_id());
    let store = strongroom_store::sqlite::SqliteStore::open_dir(&fx.data_dir)
        .await
        .unwrap();
    let set = |value: Vec<u8>| {
        use strongroom_store::Store;
        let (store, key) = (&store, &key);
        async move {
            let now = store.get_provider_state(key).await.unwrap();
            assert!(store
                .swap_provider_state(key, now.as_deref(), value)
                .await
                .unwrap());
        }
    };
    set(b"1:not a fingerprint".to_vec()).await;

    let put = &put;
    let refused = common::eventually(
        "writes refused once the record is read",
        move || async move {
            let r = put("zoom.b").await;
            (r.0 != 201).then_some(r)
        },
    )
    .await;
    assert_eq!(refused, (503, json!("key_unavailable")));
    let r = common::admin_rotate(&client).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("newest-version"), "{}", r.text());
    let reveal = client
        .json(
            "POST",
            "/v1/owners/alice/credentials/zoom.a/reveal",
            Some(SERVICE_TOKEN),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(reveal.json()["value"], "zoom.a", "{}", reveal.text());

    // Put right (here, the version this file holds).
    let fingerprint = hex::encode(ring.fingerprint(1).unwrap());
    set(format!("1:{fingerprint}").into_bytes()).await;
    common::eventually("writes resume once the record reads", move || async move {
        (put("zoom.b").await.0 == 201).then_some(())
    })
    .await;

    // Spoiled again, then emptied (no record): writes resume too.
    set(b"x".to_vec()).await;
    common::eventually("writes refused again", move || async move {
        (put("zoom.c").await.0 == 503).then_some(())
    })
    .await;
    set(Vec::new()).await;
    common::eventually(
        "writes resume once the record is gone",
        move || async move { (put("zoom.c").await.0 == 201).then_some(()) },
    )
    .await;
    server.stop().await.unwrap();
}

/// A keyring file left behind by a rotation made elsewhere (another host's copy of the file,
/// rotated there; the store records the version it made) seals nothing new: what it sealed
/// under its old version would be lost once that version is retired. The node says it is not
/// ready and refuses to rotate its copy into a second version of that number, until the
/// newest file is copied in.
#[tokio::test]
async fn a_keyring_copy_left_behind_by_a_rotation_elsewhere_seals_nothing_new() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options());
    let alice = fx.user_token("alice");
    let put = |name: &'static str| common::user_put(&client, &alice, name);
    assert_eq!(put("zoom.a").await.0, 201);

    // Another host's copy, rotated there.
    let path = fx.data_dir.join("keyring.json");
    let elsewhere = fx.data_dir.join("other-host-keyring.json");
    std::fs::copy(&path, &elsewhere).unwrap();
    let made = strongroom_keys::local::rotate(
        &elsewhere,
        time::OffsetDateTime::now_utc(),
        &strongroom_crypto::OsRandom,
    )
    .unwrap();
    let store = strongroom_store::sqlite::SqliteStore::open_dir(&fx.data_dir)
        .await
        .unwrap();
    let fingerprint = strongroom_keys::local::LocalKeyring::open(&elsewhere)
        .unwrap()
        .fingerprint(made.version)
        .unwrap();
    strongroom_core::keyring_record::record_newest(&store, &made.key_id, made.version, fingerprint)
        .await
        .unwrap();

    let put = &put;
    let refused = common::eventually(
        "writes refused once the rotation is seen",
        move || async move {
            let r = put("zoom.b").await;
            (r.0 != 201).then_some(r)
        },
    )
    .await;
    assert_eq!(refused, (503, json!("key_unavailable")));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(client.get("/readyz", None).await.unwrap().status, 503);
    let before = std::fs::read(&path).unwrap();
    let r = common::admin_rotate(&client).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        r.json()["error"]["code"],
        "rotation_refused",
        "{}",
        r.text()
    );
    assert!(r.text().contains("lacks version 2"), "{}", r.text());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the copy was rotated"
    );

    // The newest file copied in.
    std::fs::copy(&elsewhere, &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    common::eventually("writes resume with the newest file", move || async move {
        (put("zoom.b").await.0 == 201).then_some(())
    })
    .await;
    for name in ["zoom.a", "zoom.b"] {
        let r = client
            .json(
                "POST",
                &format!("/v1/owners/alice/credentials/{name}/reveal"),
                Some(SERVICE_TOKEN),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(r.json()["value"], name, "{}", r.text());
    }
    let keys = client
        .get("/v1/keys", Some(common::ADMIN_TOKEN))
        .await
        .unwrap();
    assert_eq!(keys.json()["active"]["version"], 2, "{}", keys.text());
    server.stop().await.unwrap();
}

/// `store.max_versions` is what a credential keeps: with 2, the third put destroys the
/// first version. `store.keep_destroyed_versions` is how long its tombstone stays listed:
/// with 2, the fourth put deletes version 1's row and keeps version 2's. Out of range, the
/// server does not start.
#[tokio::test]
async fn store_max_versions_and_keep_destroyed_versions_set_retention() {
    let fx = Fixture::new();
    let server = spawn(fx.config_from(&fx.toml(
        "",
        "[store]\nmax_versions = 2\nkeep_destroyed_versions = 2\n",
    )))
    .await;
    let client = server.client(fx.client_options());
    let alice = fx.user_token("alice");
    for i in 1..=4 {
        let r = client
            .json(
                "PUT",
                "/v1/me/credentials/zoom.kept",
                Some(&alice),
                &json!({"value": format!("v{i}")}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201);
    }
    let d = client
        .get("/v1/me/credentials/zoom.kept", Some(&alice))
        .await
        .unwrap()
        .json();
    let states: Vec<(u64, String)> = d["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (4, "active".to_owned()),
            (3, "active".to_owned()),
            (2, "destroyed".to_owned())
        ],
    );
    server.stop().await.unwrap();

    for (setting, bad) in [
        ("max_versions", 0),
        ("max_versions", 1001),
        ("keep_destroyed_versions", 100_001),
    ] {
        let text = fx.toml("", &format!("[store]\n{setting} = {bad}\n"));
        let config = Config::from_figment(
            figment::Figment::from(
                <figment::providers::Toml as figment::providers::Format>::string(&text),
            ),
            &strongroom_server::config::Overrides::default(),
        )
        .unwrap();
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("store.{setting}")), "{e}");
    }
}

/// An admin rotates the key through the API: new writes go under the new version at once,
/// what the old one sealed still opens, and the rotation is audited. Nobody else may.
#[tokio::test]
async fn admins_rotate_the_key_through_the_api() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options());
    let alice = fx.user_token("alice");
    let put = |name: &'static str| {
        let client = client.clone();
        let alice = alice.clone();
        async move {
            let r = client
                .json(
                    "PUT",
                    &format!("/v1/me/credentials/{name}"),
                    Some(&alice),
                    &json!({"value": format!("value of {name}")}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{}", r.text());
        }
    };
    put("zoom.before").await;
    let keys = client
        .get("/v1/keys", Some(common::ADMIN_TOKEN))
        .await
        .unwrap()
        .json();
    let before = keys["active"]["version"].as_u64().unwrap();

    for token in [None, Some(SERVICE_TOKEN), Some(alice.as_str())] {
        let r = client
            .json("POST", "/v1/keys/rotate", token, &json!({}))
            .await
            .unwrap();
        assert!(
            r.status == 401 || r.status == 403,
            "{token:?}: {}",
            r.status
        );
    }
    let r = common::admin_rotate(&client).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rotated = r.json();
    assert_eq!(rotated["active"]["version"].as_u64(), Some(before + 1));
    assert_eq!(rotated["active"]["provider"], keys["active"]["provider"]);
    // Recorded in the store, for copies of the keyring file elsewhere.
    let store = strongroom_store::sqlite::SqliteStore::open_dir(&fx.data_dir)
        .await
        .unwrap();
    let key_id = rotated["active"]["key_id"].as_str().unwrap();
    assert_eq!(
        strongroom_core::keyring_record::newest_recorded(&store, key_id)
            .await
            .unwrap()
            .map(|r| r.version),
        Some(u32::try_from(before + 1).unwrap())
    );

    put("zoom.after").await;
    let keys = client
        .get("/v1/keys", Some(common::ADMIN_TOKEN))
        .await
        .unwrap()
        .json();
    assert_eq!(keys["active"]["version"].as_u64(), Some(before + 1));
    assert_eq!(keys["active"]["credential_versions"], 1, "{keys}");
    for name in ["zoom.before", "zoom.after"] {
        let r = client
            .json(
                "POST",
                &format!("/v1/owners/alice/credentials/{name}/reveal"),
                Some(SERVICE_TOKEN),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(r.json()["value"], format!("value of {name}"));
    }
    let audit = client
        .get("/v1/audit", Some(common::ADMIN_TOKEN))
        .await
        .unwrap()
        .json();
    // Recorded as it started (before the key changed) and as it ended, with the version.
    let rotations: Vec<_> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "keys.rotate" && r["principal_kind"] == "admin")
        .map(|r| {
            (
                r["outcome"].clone(),
                r["status"].clone(),
                r["version"].clone(),
            )
        })
        .collect();
    assert!(
        rotations.contains(&(json!("started"), json!(0), json!(null)))
            && rotations.contains(&(json!("ok"), json!(200), json!(before + 1))),
        "{rotations:?}"
    );
    server.stop().await.unwrap();
}

/// A 1024-bit RSA public key (made with `openssl genrsa 1024`; public, so it may sit here).
const RSA_1024_SPKI: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCvc2V8DSC8/I5UwapmtjKV9eFr
12DdWAe9Guh45+NSEWhW6yVCP9Ilta3yno0z/mONca3fwpNW+aI+V804aG/fESsS
60HcpWpGS74KtJJR8ED/x3qUBxavA4VlbL9usXb9CgXn/lm4vPMpfsu/nq7QLkMr
0DVD5BctZeNBPUgRiwIDAQAB
-----END PUBLIC KEY-----
";

/// The same key as PKCS#1.
const RSA_1024_PKCS1: &str = "-----BEGIN RSA PUBLIC KEY-----
MIGJAoGBAK9zZXwNILz8jlTBqma2MpX14WvXYN1YB70a6Hjn41IRaFbrJUI/0iW1
rfKejTP+Y41xrd/Ck1b5oj5XzThob98RKxLrQdylakZLvgq0klHwQP/HepQHFq8D
hWVsv26xdv0KBef+Wbi88yl+y7+ertAuQyvQNUPkFy1l40E9SBGLAgMBAAE=
-----END RSA PUBLIC KEY-----
";

/// A self-signed certificate of the same key (the verifier takes a certificate's key too).
const RSA_1024_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIB+DCCAWGgAwIBAgIUcxfliTEJGVPAkhmYdZJlb1pdNUswDQYJKoZIhvcNAQEL
BQAwDjEMMAoGA1UEAwwDaWRwMB4XDTI2MTEyODAxMDIxMFoXDTM2MTEyNTAxMDIx
MFowDjEMMAoGA1UEAwwDaWRwMIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCv
c2V8DSC8/I5UwapmtjKV9eFr12DdWAe9Guh45+NSEWhW6yVCP9Ilta3yno0z/mON
ca3fwpNW+aI+V804aG/fESsS60HcpWpGS74KtJJR8ED/x3qUBxavA4VlbL9usXb9
CgXn/lm4vPMpfsu/nq7QLkMr0DVD5BctZeNBPUgRiwIDAQABo1MwUTAdBgNVHQ4E
FgQUCoz+iGKfI6O/gPUfjWqTKhmrvwQwHwYDVR0jBBgwFoAUCoz+iGKfI6O/gPUf
jWqTKhmrvwQwDwYDVR0TAQH/BAUwAwEB/zANBgkqhkiG9w0BAQsFAAOBgQA02G/e
Y+vKeHVmyMmsMRPDE7iYp6FKIDPVCxwVQbhElAEaJ6S1AQ7x5+d5qFOOCqIkhDjW
efVNILCbHBKz0hl/t/5PYZcAWQVaLqxdfSKUpnUL6Stj0mIfYPuKPSy1jbMbfKAc
qD+PLYIHVcC4iLcwKSy4hyelW34sWD62o9LvNQ==
-----END CERTIFICATE-----
";
