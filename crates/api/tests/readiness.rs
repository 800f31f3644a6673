//! `/readyz` with user-token keys from a JWKS URL: ready while the key set in force is fresh
//! enough, not ready once every refresh has failed for longer than the allowed staleness (all
//! user tokens are refused then), and ready again after a refresh succeeds.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use strongroom_api::{
    AuthSettings, Authenticator, JwksFetchFuture, JwksFetcher, JwksOptions, JwtKeySource,
    JwtSettings, RemoteJwks,
};

const JWKS: &str = include_str!("fixtures/jwt-rs256-test-jwks.json");

/// An identity provider that answers with whatever the test sets.
struct Idp(Arc<Mutex<Result<String, String>>>);

impl JwksFetcher for Idp {
    fn fetch(&self) -> JwksFetchFuture<'_> {
        let answer = self.0.lock().unwrap().clone();
        Box::pin(async move { answer })
    }
    fn source(&self) -> &str {
        "https://idp.test/.well-known/jwks.json"
    }
}

async fn ready(api: &TestApi) -> (StatusCode, String) {
    let r = api.call("GET", "/readyz", None, None).await;
    (
        r.status,
        r.json()["status"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test]
async fn readyz_fails_while_the_jwks_is_older_than_its_allowed_staleness() {
    let api = api().await;
    let answer = Arc::new(Mutex::new(Ok(JWKS.to_owned())));
    let jwks = RemoteJwks::connect(
        Box::new(Idp(answer.clone())),
        // max_stale is 60 refresh periods: the look just after the provider goes down has
        // seconds to spare on a slow machine (400 ms left it 200).
        JwksOptions {
            refresh: Duration::from_millis(50),
            unknown_kid_cooldown: Duration::from_secs(3600),
            max_stale: Duration::from_secs(3),
        },
        &tokio::runtime::Handle::current(),
    )
    .await
    .unwrap();
    api.state.replace_auth(
        Authenticator::new(AuthSettings {
            jwt: Some(JwtSettings {
                issuer: None,
                audience: None,
                on_behalf_of_audience: None,
                leeway_seconds: 5,
                keys: JwtKeySource::Remote(jwks),
            }),
            ..Default::default()
        })
        .unwrap(),
    );
    assert_eq!(ready(&api).await, (StatusCode::OK, "ok".into()));

    // The provider goes down: the last good keys stay in force for max_stale, then not.
    *answer.lock().unwrap() = Err("connection refused".into());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(ready(&api).await, (StatusCode::OK, "ok".into()));
    let api = &api;
    let state = eventually(
        "not ready once the keys are older than max_stale",
        move || async move {
            let state = ready(api).await;
            (state.0 != StatusCode::OK).then_some(state)
        },
    )
    .await;
    assert_eq!(
        state,
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable".into())
    );

    // It comes back: the next refresh makes the server ready again.
    *answer.lock().unwrap() = Ok(JWKS.to_owned());
    let state = eventually("ready again after a good refresh", move || async move {
        let state = ready(api).await;
        (state.0 == StatusCode::OK).then_some(state)
    })
    .await;
    assert_eq!(state, (StatusCode::OK, "ok".into()));
}

/// A key provider whose health check counts its calls and answers as the test says, or
/// never answers (`hang`).
#[derive(Debug)]
struct Probed {
    inner: strongroom_crypto::testing::FakeProvider,
    calls: std::sync::atomic::AtomicUsize,
    down: std::sync::atomic::AtomicBool,
    /// Never answers its health check.
    hang: bool,
}

impl Probed {
    fn new(hang: bool) -> Self {
        Self {
            inner: strongroom_crypto::testing::FakeProvider::new("probed", 1),
            calls: Default::default(),
            down: Default::default(),
            hang,
        }
    }
}

#[async_trait::async_trait]
impl strongroom_crypto::KeyProvider for Probed {
    fn kind(&self) -> &str {
        self.inner.kind()
    }
    fn active_kek(&self) -> Result<strongroom_crypto::KekRef, strongroom_crypto::ProviderError> {
        self.inner.active_kek()
    }
    async fn wrap(
        &self,
        kek: &strongroom_crypto::KekRef,
        key: &strongroom_crypto::Key256,
        aad: &[u8],
    ) -> Result<strongroom_crypto::WrappedKey, strongroom_crypto::ProviderError> {
        self.inner.wrap(kek, key, aad).await
    }
    async fn unwrap(
        &self,
        wrapped: &strongroom_crypto::WrappedKey,
        aad: &[u8],
    ) -> Result<strongroom_crypto::Key256, strongroom_crypto::UnwrapError> {
        self.inner.unwrap(wrapped, aad).await
    }
    async fn health(&self) -> Result<(), strongroom_crypto::ProviderError> {
        use std::sync::atomic::Ordering;
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang {
            return std::future::pending().await;
        }
        // As long as a remote call takes: probes that arrive meanwhile wait for it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(strongroom_crypto::ProviderError::new(
                strongroom_crypto::ProviderErrorKind::Unavailable,
                "probed",
                "the provider is down",
            ));
        }
        self.inner.health().await
    }
}

/// A router over a fresh SQLite store and `provider`.
async fn router_over(
    dir: &std::path::Path,
    provider: Arc<dyn strongroom_crypto::KeyProvider>,
) -> axum::Router {
    router_with(
        dir,
        provider,
        strongroom_store::sqlite::SqliteOptions::default(),
    )
    .await
}

/// [`router_over`] with the store opened with `options`.
async fn router_with(
    dir: &std::path::Path,
    provider: Arc<dyn strongroom_crypto::KeyProvider>,
    options: strongroom_store::sqlite::SqliteOptions,
) -> axum::Router {
    let store = Arc::new(
        strongroom_store::sqlite::SqliteStore::open(
            dir.join(strongroom_store::sqlite::DB_FILE_NAME),
            options,
        )
        .await
        .unwrap(),
    );
    let vault = Arc::new(strongroom_core::Vault::new(
        store,
        provider,
        Arc::new(strongroom_crypto::OsRandom),
        Arc::new(strongroom_core::SystemClock),
        strongroom_core::VaultConfig::default(),
    ));
    let state = strongroom_api::AppState::new(
        vault,
        Authenticator::new(AuthSettings::default()).unwrap(),
        strongroom_core::policy::Policy::from_toml("").unwrap(),
        strongroom_api::ApiLimits::default(),
    );
    strongroom_api::router(state)
}

/// `n` probes at once.
async fn readyz_together(router: &axum::Router, n: usize) -> Vec<StatusCode> {
    let mut probes = tokio::task::JoinSet::new();
    for _ in 0..n {
        let router = router.clone();
        probes.spawn(async move { readyz_status(&router).await });
    }
    probes.join_all().await
}

async fn readyz_status(router: &axum::Router) -> StatusCode {
    let response = tower::ServiceExt::oneshot(
        router.clone(),
        axum::http::Request::get("/readyz")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    // Not ready says when to ask again, as every 503 does.
    let retry_after = response.headers().get("retry-after");
    match response.status() {
        StatusCode::SERVICE_UNAVAILABLE => assert_eq!(retry_after.unwrap(), "1"),
        _ => assert!(retry_after.is_none()),
    }
    response.status()
}

/// `/readyz` is unauthenticated: a flood of probes must not become a flood of key provider
/// calls (KMS quota and bill). Probes during a check wait for its verdict, and a verdict
/// stands for a second; a provider that goes down shows once it is older.
#[tokio::test]
async fn a_flood_of_probes_checks_the_provider_about_once_a_second() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Probed::new(false));
    let router = router_over(dir.path(), provider.clone()).await;

    let together = readyz_together(&router, 50).await;
    assert!(
        together.iter().all(|s| *s == StatusCode::OK),
        "{together:?}"
    );
    for _ in 0..50 {
        assert_eq!(readyz_status(&router).await, StatusCode::OK);
    }
    let calls = provider.calls.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&calls),
        "{calls} health checks for 100 probes"
    );

    // Down: seen once the verdict before is older than a second, then checked again only
    // about once a second.
    provider.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = provider.calls.load(Ordering::SeqCst);
    let (logs, guard) = Captured::install(tracing::Level::WARN);
    let together = readyz_together(&router, 50).await;
    drop(guard);
    // Nor into as many log lines.
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(text.matches("not ready").count(), 1, "{text}");
    assert!(
        together
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{together:?}"
    );
    let calls = provider.calls.load(Ordering::SeqCst) - before;
    assert!(
        (1..=2).contains(&calls),
        "{calls} health checks for 50 probes"
    );
}

/// A probe that hangs up while the check runs does not throw the check away: its verdict
/// stands for the next probes, so clients that cancel in a loop cannot make the provider
/// checks run back to back.
#[tokio::test]
async fn a_probe_that_hangs_up_mid_check_leaves_its_verdict_for_the_next() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Probed::new(false));
    let router = router_over(dir.path(), provider.clone()).await;
    // The check takes 50 ms; these probes give up after 10 (the last ones may find the
    // verdict already).
    for _ in 0..5 {
        let _ = tokio::time::timeout(Duration::from_millis(10), readyz_status(&router)).await;
    }
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(readyz_status(&router).await, StatusCode::OK);
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        1,
        "the check the first probe started answered the last"
    );
}

/// A hung provider (or store) makes `/readyz` answer "unavailable" within its own deadline,
/// not time out with the request 30 s later.
#[tokio::test]
async fn readyz_answers_unavailable_in_time_when_a_backend_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let router = router_over(dir.path(), Arc::new(Probed::new(true))).await;
    let started = std::time::Instant::now();
    assert_eq!(
        readyz_status(&router).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A store that reads but takes no write (another process holds the database locked; a
/// PostgreSQL standby) is not ready: every request but a read needs a write (its audit
/// record). Ready again once it takes writes.
#[tokio::test]
async fn a_store_that_takes_no_writes_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = strongroom_store::sqlite::SqliteOptions::default();
    options.busy_timeout = Duration::from_millis(300);
    let provider = Arc::new(strongroom_crypto::testing::FakeProvider::new("w", 1));
    let router = router_with(dir.path(), provider, options).await;
    assert_eq!(readyz_status(&router).await, StatusCode::OK);
    let other = rusqlite::Connection::open(dir.path().join(strongroom_store::sqlite::DB_FILE_NAME))
        .unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        readyz_status(&router).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    other.execute_batch("COMMIT").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(readyz_status(&router).await, StatusCode::OK);
}
