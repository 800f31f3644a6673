//! An in-process API over SQLite and the fake key provider, with tokens for every principal.
#![allow(dead_code)]

pub mod upstream;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{EncodingKey, Header};
use strongroom_api::{
    hash_token, ApiLimits, AppState, AuthSettings, Authenticator, JwtKeySource, JwtSettings,
    TokenEntry,
};
use strongroom_core::policy::Policy;
use strongroom_core::{SystemClock, Vault, VaultConfig};
use strongroom_crypto::testing::FakeProvider;
use strongroom_crypto::OsRandom;
use strongroom_store::sqlite::SqliteStore;
use tower::ServiceExt;

pub const SECRET: &[u8] = b"test-hs256-secret-of-at-least-32-bytes!!";
pub const ISSUER: &str = "https://app.test";
pub const AUDIENCE: &str = "strongroom";
pub const ALLOWED_SERVICE_TOKEN: &str = "srv-allowed-0123456789abcdef";
pub const DENIED_SERVICE_TOKEN: &str = "srv-denied-0123456789abcdef";
pub const DELEGATED_SERVICE_TOKEN: &str = "srv-delegated-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "adm-0123456789abcdef";
pub const CANARY: &str = "CANARY-sk_live_9f8e7d6c5b4a";

pub const POLICY: &str = r#"
[[rule]]
service = "allowed"
operations = ["write", "reveal", "broker"]
credentials = ["zoom.*"]
destinations = ["localhost:*", "127.0.0.1:*"]

[[rule]]
service = "delegated"
operations = ["reveal"]
credentials = ["*"]
delegated = true
"#;

pub struct TestApi {
    pub state: AppState,
    pub router: axum::Router,
    _dir: Arc<tempfile::TempDir>,
}

impl TestApi {
    /// The SQLite database file.
    pub fn db_path(&self) -> std::path::PathBuf {
        self._dir.path().join("strongroom.db")
    }

    /// An operator command's view of the same database: another process's store handle
    /// (close it when done) and a vault over it with the server's keys, for writes the
    /// server learns of only through the database.
    pub async fn operator(&self) -> (Arc<SqliteStore>, Vault) {
        let store = Arc::new(SqliteStore::open_dir(self._dir.path()).await.unwrap());
        let vault = Vault::new(
            store.clone(),
            Arc::new(FakeProvider::new("api-tests", 1)),
            Arc::new(OsRandom),
            Arc::new(SystemClock),
            VaultConfig::default(),
        );
        (store, vault)
    }

    /// Another node of the same deployment (or this one restarted): an audited API with
    /// `limits` and a store of its own over the same database.
    pub async fn another_node(&self, limits: ApiLimits) -> TestApi {
        api_in(
            Arc::clone(&self._dir),
            limits,
            Auditing::On,
            VaultConfig::default(),
        )
        .await
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn jwt_with(sub: &str, exp: u64, secret: &[u8], iss: &str, aud: &str) -> String {
    let claims = serde_json::json!({"sub": sub, "exp": exp, "iat": now(), "iss": iss, "aud": aud});
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

pub fn user_token(sub: &str) -> String {
    jwt_with(sub, now() + 600, SECRET, ISSUER, AUDIENCE)
}

/// How a test API audits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auditing {
    /// Into the SQLite store, as the server does.
    On,
    /// Not at all.
    Off,
    /// Into a log whose every append fails.
    Failing,
}

/// An audit log that is always down.
#[derive(Debug)]
pub struct FailingLog;

#[async_trait::async_trait]
impl strongroom_store::AuditLog for FailingLog {
    async fn audit_append(
        &self,
        _: Arc<strongroom_store::audit::HeadKey>,
        _: Vec<strongroom_store::audit::Event>,
    ) -> Result<Vec<strongroom_store::audit::Record>, strongroom_store::StoreError> {
        Err(strongroom_store::StoreError::Unavailable(
            strongroom_store::BackendError::msg("audit log down"),
        ))
    }
    async fn audit_head(
        &self,
    ) -> Result<Option<strongroom_store::audit::Head>, strongroom_store::StoreError> {
        Ok(None)
    }
    async fn audit_scan(
        &self,
        _: u64,
        _: u32,
    ) -> Result<Vec<strongroom_store::audit::Record>, strongroom_store::StoreError> {
        Ok(Vec::new())
    }
    async fn audit_query(
        &self,
        _: &strongroom_store::AuditFilter,
        _: Option<u64>,
        _: u32,
    ) -> Result<Vec<strongroom_store::audit::Record>, strongroom_store::StoreError> {
        Ok(Vec::new())
    }
    async fn audit_init_head_key(
        &self,
        w: Vec<u8>,
    ) -> Result<Vec<u8>, strongroom_store::StoreError> {
        Ok(w)
    }
    async fn audit_seal_genesis(
        &self,
        _: strongroom_store::audit::Head,
    ) -> Result<(), strongroom_store::StoreError> {
        Ok(())
    }
    async fn audit_anchor(
        &self,
    ) -> Result<Option<strongroom_store::audit::Anchor>, strongroom_store::StoreError> {
        Ok(None)
    }
    async fn audit_set_anchor(
        &self,
        _: Arc<strongroom_store::audit::HeadKey>,
        _: u64,
        _: strongroom_store::audit::Anchor,
    ) -> Result<(), strongroom_store::StoreError> {
        Err(strongroom_store::StoreError::Unavailable(
            strongroom_store::BackendError::msg("audit log down"),
        ))
    }
    async fn audit_prune(
        &self,
        _: Arc<strongroom_store::audit::HeadKey>,
        _: u32,
    ) -> Result<strongroom_store::audit::Pruned, strongroom_store::StoreError> {
        Err(strongroom_store::StoreError::Unavailable(
            strongroom_store::BackendError::msg("audit log down"),
        ))
    }
}

/// Rotation for the routes' tests: the fake provider's next version (the servers' real
/// rotations are tested in the server crate).
struct FakeRotation(Arc<FakeProvider>);

#[async_trait::async_trait]
impl strongroom_api::KeyRotation for FakeRotation {
    async fn rotate(&self) -> Result<strongroom_crypto::KekRef, strongroom_api::RotationError> {
        let version = self.0.rotate();
        Ok(strongroom_crypto::KekRef {
            provider: FakeProvider::KIND.into(),
            key_id: "api-tests".into(),
            version,
        })
    }
}

pub async fn api_with(limits: ApiLimits) -> TestApi {
    api_full(limits, Auditing::On).await
}

pub async fn api_audited(auditing: Auditing) -> TestApi {
    api_full(ApiLimits::default(), auditing).await
}

pub async fn api_full(limits: ApiLimits, auditing: Auditing) -> TestApi {
    api_configured(limits, auditing, VaultConfig::default()).await
}

/// An audited API whose vault has `config` (a small quota, say).
pub async fn api_with_vault(config: VaultConfig) -> TestApi {
    api_configured(ApiLimits::default(), Auditing::On, config).await
}

pub async fn api_configured(
    limits: ApiLimits,
    auditing: Auditing,
    vault_config: VaultConfig,
) -> TestApi {
    api_in(
        Arc::new(tempfile::tempdir().unwrap()),
        limits,
        auditing,
        vault_config,
    )
    .await
}

async fn api_in(
    dir: Arc<tempfile::TempDir>,
    limits: ApiLimits,
    auditing: Auditing,
    vault_config: VaultConfig,
) -> TestApi {
    let store = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    let keys = Arc::new(FakeProvider::new("api-tests", 1));
    let rotating = keys.clone();
    let auditor = match auditing {
        Auditing::Off => None,
        Auditing::On | Auditing::Failing => {
            let key = strongroom_core::audit::load_or_create_head_key(&*store, &*keys, &OsRandom)
                .await
                .unwrap();
            let log: Arc<dyn strongroom_store::AuditLog> = if auditing == Auditing::On {
                Arc::new((*store).clone())
            } else {
                Arc::new(FailingLog)
            };
            Some(strongroom_core::audit::Auditor::start(log, key, None))
        }
    };
    let vault = Arc::new(Vault::new(
        store,
        keys,
        Arc::new(OsRandom),
        Arc::new(SystemClock),
        vault_config,
    ));
    let entry = |name: &str, token: &str| TokenEntry {
        name: name.into(),
        sha256: hash_token(token),
    };
    let auth = Authenticator::new(AuthSettings {
        jwt: Some(JwtSettings {
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            on_behalf_of_audience: None,
            leeway_seconds: 5,
            keys: JwtKeySource::Hs256Secret(zeroize::Zeroizing::new(SECRET.to_vec())),
        }),
        service_tokens: vec![
            entry("allowed", ALLOWED_SERVICE_TOKEN),
            entry("denied", DENIED_SERVICE_TOKEN),
            entry("delegated", DELEGATED_SERVICE_TOKEN),
        ],
        admin_tokens: vec![entry("root", ADMIN_TOKEN)],
        ..Default::default()
    })
    .unwrap();
    let state = AppState::new(vault, auth, Policy::from_toml(POLICY).unwrap(), limits);
    state.set_key_rotation(Arc::new(FakeRotation(rotating)));
    if let Some(a) = auditor {
        state.set_auditor(a);
    }
    let router = strongroom_api::router(state.clone());
    TestApi {
        state,
        router,
        _dir: dir,
    }
}

pub async fn api() -> TestApi {
    api_with(ApiLimits::default()).await
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl TestApi {
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.send(req).await
    }

    pub async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// Alice stores `CANARY` as `zoom.api-key` version 1.
    /// The allowed service reveals alice's `zoom.api-key` (the credential `seed` stores).
    pub async fn reveal_alices_key(&self) -> Reply {
        self.call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            None,
        )
        .await
    }

    pub async fn seed(&self) {
        let r = self
            .call(
                "PUT",
                "/v1/me/credentials/zoom.api-key",
                Some(&user_token("alice")),
                Some(serde_json::json!({"value": CANARY})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
}

/// How long [`eventually`] waits: far more than anything it waits for takes, even on a slow,
/// busy machine (it returns as soon as the condition holds).
pub const EVENTUALLY: std::time::Duration = std::time::Duration::from_secs(30);

/// Calls `check` every 50 ms until it returns `Some`, and returns that; panics naming `what`
/// after [`EVENTUALLY`]. For what a background task does (a refresh, a record written after
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
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Log lines written while a [`Captured::install`] guard lives.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Captures this thread's log lines up to `level` while the guard lives (the tests'
    /// runtime runs the router on the test's thread).
    pub fn install(level: tracing::Level) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
