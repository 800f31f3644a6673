//! Shared fixtures: a throw-away PKI made with rcgen at test time, a data directory with a
//! keyring and a JWT secret, a configuration over them, and an in-process server on
//! 127.0.0.1:0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::Figment;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use strongroom_server::config::{Config, Overrides};
use strongroom_server::testing::{ClientOptions, TestClient};
use strongroom_server::{Reloader, Server, ServerError};

pub const SERVICE_TOKEN: &str = "svc-token-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "adm-token-0123456789abcdef";

/// A CA that signs server and client certificates.
pub struct Pki {
    pub ca_pem: String,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Self {
            ca_pem: cert.pem(),
            ca_cert: cert,
            ca_key: key,
        }
    }

    /// (certificate PEM, key PEM) for `sans`, for a server or a client.
    pub fn leaf(&self, sans: &[&str], server: bool) -> (String, String) {
        self.leaf_with(sans, server, |_| {})
    }

    /// As [`Pki::leaf`], with `adjust` applied to the parameters (validity dates...).
    pub fn leaf_with(
        &self,
        sans: &[&str],
        server: bool,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        // rcgen makes every name a DNS name (or an IP address): a name with a scheme is a URI.
        for (san, name) in p.subject_alt_names.iter_mut().zip(sans) {
            if name.contains("://") {
                *san = rcgen::SanType::URI((*name).try_into().unwrap());
            }
        }
        p.distinguished_name.push(DnType::CommonName, sans[0]);
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        adjust(&mut p);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

pub fn write_private(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A temp folder with TLS material, a keyring, a JWT secret (the dev layout's, so
/// `dev::mint_user_token` makes tokens for it) and an mTLS client CA.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub client_pki: Pki,
    pub data_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub jwt_secret: PathBuf,
    pub policy: PathBuf,
}

pub const POLICY: &str = r#"
[[rule]]
service = "billing"
operations = ["write", "reveal"]
credentials = ["zoom.*"]
"#;

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).unwrap();
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        strongroom_keys::local::generate(
            &data_dir.join("keyring.json"),
            time::OffsetDateTime::now_utc(),
            &strongroom_crypto::OsRandom,
        )
        .unwrap();
        let pki = Pki::new("test server CA");
        let client_pki = Pki::new("test client CA");
        let (cert_pem, key_pem) = pki.leaf(&["localhost", "127.0.0.1"], true);
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let client_ca = dir.path().join("client-ca.pem");
        std::fs::write(&cert, cert_pem).unwrap();
        write_private(&key, key_pem.as_bytes());
        std::fs::write(&client_ca, &client_pki.ca_pem).unwrap();
        let jwt_secret = data_dir.join("dev-jwt-secret");
        write_private(
            &jwt_secret,
            b"0123456789abcdef0123456789abcdef-test-secret\n",
        );
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, POLICY).unwrap();
        Self {
            dir,
            pki,
            client_pki,
            data_dir,
            cert,
            key,
            client_ca,
            jwt_secret,
            policy,
        }
    }

    /// A configuration file's text: everything set, plus `extra` TOML appended.
    pub fn toml(&self, tls_extra: &str, extra: &str) -> String {
        let sha = |t: &str| hex::encode(strongroom_api::hash_token(t));
        format!(
            r#"
listen = "127.0.0.1:0"
data_dir = {data:?}
policy_file = {policy:?}

[tls]
cert = {cert:?}
key = {key:?}
{tls_extra}

[auth.jwt]
issuer = "strongroom-dev"
audience = "strongroom"
hs256_secret_file = {secret:?}

[[auth.service]]
name = "billing"
token_sha256 = "{svc}"

[[auth.admin]]
name = "ops"
token_sha256 = "{adm}"

[limits]
shutdown_grace_seconds = 5

[log]
format = "text"
level = "warn"

{extra}
"#,
            data = self.data_dir.display().to_string(),
            policy = self.policy.display().to_string(),
            cert = self.cert.display().to_string(),
            key = self.key.display().to_string(),
            secret = self.jwt_secret.display().to_string(),
            svc = sha(SERVICE_TOKEN),
            adm = sha(ADMIN_TOKEN),
        )
    }

    pub fn config_from(&self, text: &str) -> Config {
        let config =
            Config::from_figment(Figment::from(Toml::string(text)), &Overrides::default()).unwrap();
        config.validate().unwrap();
        config
    }

    pub fn config(&self) -> Config {
        self.config_from(&self.toml("", ""))
    }

    /// mTLS with `client_auth` ("optional" or "required") and SAN mappings.
    pub fn mtls_config(&self, client_auth: &str) -> Config {
        let tls_extra = format!(
            "client_ca = {:?}\nclient_auth = \"{client_auth}\"",
            self.client_ca.display().to_string()
        );
        let extra = r#"
[[auth.mtls]]
san = "spiffe://example.test/billing"
service = "billing"

[[auth.mtls]]
san = "ops.example.test"
admin = "ops"
"#;
        self.config_from(&self.toml(&tls_extra, extra))
    }

    pub fn user_token(&self, subject: &str) -> String {
        strongroom_server::dev::mint_user_token(&self.data_dir, subject, Duration::from_secs(600))
            .unwrap()
            .to_string()
    }

    pub fn client_options(&self) -> ClientOptions {
        ClientOptions::new(self.pki.ca_pem.clone())
    }
}

/// A server running in this process.
pub struct Running {
    pub addr: SocketAddr,
    pub reloader: Reloader,
    pub state: strongroom_api::AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), ServerError>>,
}

pub async fn spawn(config: Config) -> Running {
    let server = Server::start(config).await.unwrap();
    spawn_started(server)
}

pub fn spawn_started(server: Server) -> Running {
    let addr = server.local_addr();
    let reloader = server.reloader();
    let state = server.state().clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        reloader,
        state,
        stop: Some(tx),
        handle,
    }
}

impl Running {
    pub fn client(&self, options: ClientOptions) -> TestClient {
        TestClient::new(self.addr, options).unwrap()
    }

    /// Signals shutdown without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Whether `run` has returned.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.signal_stop();
        tokio::time::timeout(Duration::from_secs(20), &mut self.handle)
            .await
            .expect("server did not stop")
            .unwrap()
    }
}

/// The log lines written on this thread while installed (the tests' runtime runs the server's
/// tasks on the test's thread).
#[derive(Clone, Default)]
pub struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// How long [`eventually`] waits: far more than anything it waits for takes, even on a slow,
/// busy machine (it returns as soon as the condition holds).
pub const EVENTUALLY: Duration = Duration::from_secs(30);

/// Calls `check` every 50 ms until it returns `Some`, and returns that; panics naming `what`
/// after [`EVENTUALLY`]. For what a background task does (a watcher, a record written after
/// the answer): poll for it rather than sleep a fixed time and look once.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + EVENTUALLY;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {EVENTUALLY:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The audit records about credentials named `name`, newest first, once there are at least
/// `want` of them (records of requests cut short are written by a task of their own), or
/// what there is after [`EVENTUALLY`].
pub async fn wait_for_records(
    client: &strongroom_server::testing::TestClient,
    name: &str,
    want: usize,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + EVENTUALLY;
    loop {
        let page = client
            .get(&format!("/v1/audit?name={name}"), Some(ADMIN_TOKEN))
            .await
            .unwrap()
            .json();
        let records = page["items"].as_array().cloned().unwrap_or_default();
        if records.len() >= want || std::time::Instant::now() >= deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An admin rotates the key through the API: the answer.
pub async fn admin_rotate(
    client: &strongroom_server::testing::TestClient,
) -> strongroom_server::testing::TestResponse {
    client
        .json(
            "POST",
            "/v1/keys/rotate",
            Some(ADMIN_TOKEN),
            &serde_json::json!({}),
        )
        .await
        .unwrap()
}

/// A user puts their credential `name`, its value its name: the status and error code.
pub async fn user_put(
    client: &strongroom_server::testing::TestClient,
    token: &str,
    name: &str,
) -> (u16, serde_json::Value) {
    let r = client
        .json(
            "PUT",
            &format!("/v1/me/credentials/{name}"),
            Some(token),
            &serde_json::json!({"value": name}),
        )
        .await
        .unwrap();
    (r.status, r.json()["error"]["code"].clone())
}
