//! User-token keys from a JWKS: parsing (keys that do not fit are skipped), and a key set
//! fetched from a URL ([`RemoteJwks`]) that is cached in memory, refreshed in the background,
//! refreshed on demand when a token names an unknown `kid` (at most once per cooldown, so
//! forged kids cannot make the server hammer the identity provider), and kept when a refresh
//! fails, for at most `max_stale`.
//!
//! The HTTP side is the server crate's: it implements [`JwksFetcher`] (HTTPS, timeouts, a
//! response size cap) and hands it to [`RemoteJwks::connect`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::auth::{AuthConfigError, VerifyKey};

/// What [`JwksFetcher::fetch`] returns: the document's text, or why it could not be had.
pub type JwksFetchFuture<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;

/// Fetches a JWKS document. Implemented by the server over HTTPS.
pub trait JwksFetcher: Send + Sync + 'static {
    /// One fetch of the document (bounded in time and size by the implementation).
    fn fetch(&self) -> JwksFetchFuture<'_>;
    /// Where it comes from, for logs (the URL; never a secret).
    fn source(&self) -> &str;
}

/// How a [`RemoteJwks`] keeps its keys fresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwksOptions {
    /// Time between background refreshes.
    pub refresh: Duration,
    /// Least time between two refreshes caused by tokens naming an unknown `kid`.
    pub unknown_kid_cooldown: Duration,
    /// How long the last good key set is used while refreshes fail; after that, user tokens
    /// are refused until a refresh succeeds.
    pub max_stale: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(300),
            unknown_kid_cooldown: Duration::from_secs(30),
            max_stale: Duration::from_secs(24 * 3600),
        }
    }
}

/// Parses a JWKS document into verification keys. Keys that cannot verify user tokens are
/// skipped (and logged): `use` other than `sig`, `key_ops` without `verify`, symmetric keys,
/// algorithms other than RS256, ES256 and EdDSA, an `alg` that does not fit the key type or
/// curve, and entries that do not parse. Returns the keys and how many were skipped.
///
/// A JWKS without one usable key is refused when `allow_none` is false (loading it first is
/// most likely a mistake); else it is returned, with a warning: a key set the identity
/// provider or the operator has emptied revokes every key, and must not leave the last ones
/// in force.
///
/// # Errors
///
/// [`AuthConfigError`] when the document is not a JWKS, or holds no usable key.
pub(crate) fn parse_jwks(
    json: &str,
    allow_none: bool,
) -> Result<(Vec<VerifyKey>, usize), AuthConfigError> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_str(json).map_err(|e| {
        AuthConfigError(format!(
            "JWKS: not a JWKS document ({})",
            crate::auth::one_line(&e.to_string())
        ))
    })?;
    let mut keys = Vec::new();
    let mut skipped = 0;
    for (i, value) in doc.keys.into_iter().enumerate() {
        let kid = value
            .get("kid")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        match serde_json::from_value::<Jwk>(value)
            .map_err(|e| e.to_string())
            .and_then(|jwk| usable_key(&jwk))
        {
            Ok(key) => keys.push(key),
            Err(why) => {
                skipped += 1;
                tracing::debug!(index = i, kid = ?kid, reason = %why, "JWKS key skipped");
            }
        }
    }
    if keys.is_empty() {
        let why = format!(
            "JWKS: no usable key (RS256, ES256 or EdDSA signature keys); {skipped} skipped"
        );
        if !allow_none {
            return Err(AuthConfigError(why));
        }
        tracing::warn!("{why}: every user token is refused until the key set holds one");
    }
    Ok((keys, skipped))
}

/// The key, when it can verify user tokens; else why not.
fn usable_key(jwk: &Jwk) -> Result<VerifyKey, String> {
    let common = &jwk.common;
    match &common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(other) => return Err(format!("use {other:?} is not \"sig\"")),
    }
    if let Some(ops) = &common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("key_ops lacks \"verify\"".into());
        }
    }
    // The algorithm follows from the key type (and curve); a declared `alg` must agree.
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            // The verifier refuses smaller moduli; skipped here, with the reason logged.
            use base64::Engine;
            let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map_err(|_| "RSA modulus is not base64url".to_owned())?;
            let bytes = n.iter().skip_while(|b| **b == 0).count();
            if bytes * 8 < 2048 {
                return Err(format!(
                    "RSA key of {} bits (at least 2048 are needed)",
                    bytes * 8
                ));
            }
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::EllipticCurve(p) => {
            return Err(format!("curve {:?} is not accepted (P-256)", p.curve))
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            return Err(format!("curve {:?} is not accepted (Ed25519)", p.curve))
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric keys are not accepted from a JWKS".into())
        }
    };
    if let Some(declared) = common.key_algorithm {
        let fits = matches!(
            (declared, by_type),
            (KeyAlgorithm::RS256, Algorithm::RS256)
                | (KeyAlgorithm::ES256, Algorithm::ES256)
                | (KeyAlgorithm::EdDSA, Algorithm::EdDSA)
        );
        if !fits {
            return Err(format!(
                "alg {declared} does not fit the key type, or is not accepted (RS256, ES256, EdDSA)"
            ));
        }
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(VerifyKey {
        kid: common.key_id.clone(),
        algorithm: by_type,
        key,
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The JWKS metrics (registered once per [`crate::Metrics`]).
#[derive(Clone, Default)]
pub(crate) struct JwksMetrics {
    refreshes: Family<OutcomeLabels, Counter>,
    last_success: Gauge,
}

impl JwksMetrics {
    pub(crate) fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "jwks_refreshes",
            "JWKS refreshes by outcome (ok, error); a failed refresh keeps the last good keys",
            self.refreshes.clone(),
        );
        registry.register(
            "jwks_last_success_timestamp_seconds",
            "Unix time of the last successful JWKS fetch",
            self.last_success.clone(),
        );
    }
}

struct Cached {
    keys: Arc<[VerifyKey]>,
    fetched_at: Instant,
    fetched_unix: i64,
}

/// A JWKS fetched from a URL and kept fresh. Shared (through an `Arc`) by the
/// authenticators built from the same settings, so a reload that does not change them keeps
/// the cache. Dropping the last reference stops its background refresh.
pub struct RemoteJwks {
    fetcher: Box<dyn JwksFetcher>,
    options: JwksOptions,
    cached: RwLock<Cached>,
    /// Bumped by every successful refresh.
    generation: AtomicU64,
    /// One refresh at a time; waiters learn whether it brought new keys.
    refreshing: tokio::sync::Mutex<()>,
    last_on_demand: Mutex<Option<Instant>>,
    metrics: OnceLock<JwksMetrics>,
    task: OnceLock<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("source", &self.fetcher.source())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for RemoteJwks {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl RemoteJwks {
    /// Fetches the key set once (it must load and hold a usable key), then keeps it fresh
    /// with a task on `runtime`.
    ///
    /// # Errors
    ///
    /// [`AuthConfigError`] naming the source and why the first fetch failed.
    pub async fn connect(
        fetcher: Box<dyn JwksFetcher>,
        options: JwksOptions,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<Self>, AuthConfigError> {
        let source = fetcher.source().to_owned();
        let doc = fetcher
            .fetch()
            .await
            .map_err(|e| AuthConfigError(format!("JWKS {source}: {e}")))?;
        let (keys, skipped) =
            parse_jwks(&doc, false).map_err(|e| AuthConfigError(format!("{source}: {}", e.0)))?;
        tracing::info!(source = %source, keys = keys.len(), skipped, "JWKS loaded");
        let this = Arc::new(Self {
            fetcher,
            cached: RwLock::new(Cached {
                keys: keys.into(),
                fetched_at: Instant::now(),
                fetched_unix: unix_now(),
            }),
            options,
            generation: AtomicU64::new(0),
            refreshing: tokio::sync::Mutex::new(()),
            last_on_demand: Mutex::new(None),
            metrics: OnceLock::new(),
            task: OnceLock::new(),
        });
        let task = runtime.spawn(refresh_loop(Arc::downgrade(&this)));
        let _ = this.task.set(task.abort_handle());
        Ok(this)
    }

    /// Where the keys come from.
    pub fn source(&self) -> &str {
        self.fetcher.source()
    }

    /// The refresh settings.
    pub fn options(&self) -> &JwksOptions {
        &self.options
    }

    /// How many keys are cached.
    pub fn key_count(&self) -> usize {
        self.read().keys.len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cached> {
        self.cached.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn bind_metrics(&self, metrics: &JwksMetrics) {
        let m = self.metrics.get_or_init(|| metrics.clone());
        m.last_success.set(self.read().fetched_unix);
    }

    /// The keys in force: `None` once the last good fetch is older than `max_stale`.
    pub(crate) fn keys(&self) -> Option<Arc<[VerifyKey]>> {
        let c = self.read();
        (c.fetched_at.elapsed() <= self.options.max_stale).then(|| c.keys.clone())
    }

    fn is_stale(&self) -> bool {
        self.read().fetched_at.elapsed() > self.options.max_stale
    }

    /// Fetches the key set now; on failure the last good one stays. Returns whether new keys
    /// are in force.
    pub async fn refresh(&self, reason: &'static str) -> bool {
        let _one_at_a_time = self.refreshing.lock().await;
        let result = match self.fetcher.fetch().await {
            // A well-formed set without a usable key is a revocation, not an outage.
            Ok(doc) => parse_jwks(&doc, true).map_err(|e| e.0),
            Err(e) => Err(e),
        };
        let outcome = match result {
            Ok((keys, skipped)) => {
                let count = keys.len();
                let fetched_unix = unix_now();
                *self.cached.write().unwrap_or_else(|e| e.into_inner()) = Cached {
                    keys: keys.into(),
                    fetched_at: Instant::now(),
                    fetched_unix,
                };
                self.generation.fetch_add(1, Ordering::AcqRel);
                if let Some(m) = self.metrics.get() {
                    m.last_success.set(fetched_unix);
                }
                tracing::debug!(source = %self.source(), keys = count, skipped, reason, "JWKS refreshed");
                "ok"
            }
            Err(e) => {
                let age = self.read().fetched_at.elapsed().as_secs();
                if self.is_stale() {
                    tracing::error!(source = %self.source(), error = %e, age_seconds = age, reason,
                        "JWKS refresh failed and the last good key set is older than jwks_max_stale_seconds: user tokens are refused until a refresh succeeds");
                } else {
                    tracing::warn!(source = %self.source(), error = %e, age_seconds = age, reason,
                        "JWKS refresh failed; keeping the last good key set");
                }
                "error"
            }
        };
        if let Some(m) = self.metrics.get() {
            m.refreshes.get_or_create(&OutcomeLabels { outcome }).inc();
        }
        outcome == "ok"
    }

    /// A token named a `kid` the set lacks: refresh, unless one was made for this reason
    /// within the cooldown. Returns whether new keys are in force (also when another
    /// request's refresh, in flight meanwhile, brought them).
    pub(crate) async fn refresh_for_unknown_kid(&self) -> bool {
        let seen = self.generation.load(Ordering::Acquire);
        let allowed = {
            let mut last = self
                .last_on_demand
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match *last {
                Some(t) if t.elapsed() < self.options.unknown_kid_cooldown => false,
                _ => {
                    *last = Some(Instant::now());
                    true
                }
            }
        };
        if allowed {
            return self.refresh("unknown kid").await;
        }
        // Rate-limited: wait for a refresh in flight, if any, and see what it brought.
        drop(self.refreshing.lock().await);
        self.generation.load(Ordering::Acquire) != seen
    }
}

/// Refreshes every `refresh`; after a failure, retries sooner (every 30 s at most).
async fn refresh_loop(this: Weak<RemoteJwks>) {
    let Some(mut wait) = this.upgrade().map(|t| t.options.refresh) else {
        return;
    };
    loop {
        tokio::time::sleep(wait).await;
        let Some(jwks) = this.upgrade() else {
            return;
        };
        wait = if jwks.refresh("scheduled").await {
            jwks.options.refresh
        } else {
            jwks.options.refresh.min(Duration::from_secs(30))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EC_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const EC_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";

    fn ec(extra: &str) -> String {
        format!(r#"{{"kty":"EC","crv":"P-256","x":"{EC_X}","y":"{EC_Y}"{extra}}}"#)
    }

    /// An RSA key under 2048 bits is skipped with its size named (the verifier refuses it,
    /// so every token it signed got 401 with nothing said); one of 2048 bits is used.
    #[test]
    fn small_rsa_keys_are_skipped() {
        use base64::Engine;
        let rsa = |bytes: usize| {
            let mut n = vec![0xc5u8; bytes];
            n.insert(0, 0); // a DER-style leading zero does not count
            let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n);
            serde_json::from_value::<Jwk>(serde_json::json!({"kty":"RSA","n":n,"e":"AQAB"}))
                .unwrap()
        };
        let Err(why) = usable_key(&rsa(128)) else {
            panic!("a 1024-bit RSA key was used");
        };
        assert!(why.contains("1024 bits"), "{why}");
        assert_eq!(usable_key(&rsa(256)).unwrap().algorithm, Algorithm::RS256);
    }

    #[test]
    fn keys_that_do_not_fit_are_skipped() {
        let doc = format!(
            r#"{{"keys":[{},{},{},{},{},{},{}]}}"#,
            ec(r#","kid":"good","alg":"ES256","use":"sig""#),
            ec(r#","kid":"enc","use":"enc""#),
            ec(r#","kid":"rs","alg":"RS256""#),
            ec(r#","kid":"hs","alg":"HS256""#),
            r#"{"kty":"oct","k":"c2VjcmV0","kid":"oct"}"#,
            r#"{"kty":"weird","kid":"weird"}"#,
            ec(r#","kid":"ops","key_ops":["sign"]"#),
        );
        let (keys, skipped) = parse_jwks(&doc, false).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("good"));
        assert_eq!(keys[0].algorithm, Algorithm::ES256);
        assert_eq!(skipped, 6);
        let Err(e) = parse_jwks(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, false) else {
            panic!("a JWKS without a usable key was accepted");
        };
        assert!(e.0.contains("no usable key"), "{e}");
        assert!(parse_jwks("[]", true).is_err());
        assert!(parse_jwks("not json", true).is_err());
        let (none, skipped) =
            parse_jwks(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, true).unwrap();
        assert!(none.is_empty() && skipped == 1);
    }

    struct Counting {
        calls: Arc<AtomicU64>,
        doc: Arc<Mutex<Result<String, String>>>,
    }

    impl JwksFetcher for Counting {
        fn fetch(&self) -> JwksFetchFuture<'_> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let doc = self.doc.lock().unwrap().clone();
            Box::pin(async move { doc })
        }
        fn source(&self) -> &str {
            "test"
        }
    }

    #[tokio::test]
    async fn unknown_kid_refreshes_are_rate_limited_and_failures_keep_the_keys() {
        let calls = Arc::new(AtomicU64::new(0));
        let doc = Arc::new(Mutex::new(Ok(format!(r#"{{"keys":[{}]}}"#, ec("")))));
        let fetcher = Counting {
            calls: calls.clone(),
            doc: doc.clone(),
        };
        let options = JwksOptions {
            refresh: Duration::from_secs(3600),
            unknown_kid_cooldown: Duration::from_secs(3600),
            max_stale: Duration::from_secs(3600),
        };
        let jwks = RemoteJwks::connect(
            Box::new(fetcher),
            options,
            &tokio::runtime::Handle::current(),
        )
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        *doc.lock().unwrap() = Err("down".into());
        assert!(!jwks.refresh_for_unknown_kid().await);
        for _ in 0..20 {
            assert!(!jwks.refresh_for_unknown_kid().await);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one fetch per cooldown");
        assert_eq!(
            jwks.keys().map(|k| k.len()),
            Some(1),
            "kept after a failure"
        );
    }

    /// Polls `done` until it holds, for at most 30 s (the background task runs on the same
    /// runtime, whenever a slow machine lets it).
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_background_refresh_picks_up_new_keys_and_stale_keys_expire() {
        let calls = Arc::new(AtomicU64::new(0));
        let one = format!(r#"{{"keys":[{}]}}"#, ec(r#","kid":"one""#));
        let two = format!(
            r#"{{"keys":[{},{}]}}"#,
            ec(r#","kid":"one""#),
            ec(r#","kid":"two""#)
        );
        let doc = Arc::new(Mutex::new(Ok(one)));
        let fetcher = Counting {
            calls: calls.clone(),
            doc: doc.clone(),
        };
        // max_stale is 60 refresh periods: the check that the keys outlive a few failed
        // refreshes has seconds to spare however slow the machine.
        let options = JwksOptions {
            refresh: Duration::from_millis(50),
            unknown_kid_cooldown: Duration::from_secs(3600),
            max_stale: Duration::from_secs(3),
        };
        let jwks = RemoteJwks::connect(
            Box::new(fetcher),
            options,
            &tokio::runtime::Handle::current(),
        )
        .await
        .unwrap();
        *doc.lock().unwrap() = Ok(two);
        until("refreshed in the background", || {
            calls.load(Ordering::SeqCst) >= 3
        })
        .await;
        assert_eq!(jwks.keys().map(|k| k.len()), Some(2));

        // Failures keep the keys until they are older than max_stale; then none is trusted.
        *doc.lock().unwrap() = Err("down".into());
        let before = calls.load(Ordering::SeqCst);
        until("refreshes failed", || {
            calls.load(Ordering::SeqCst) >= before + 2
        })
        .await;
        assert_eq!(jwks.keys().map(|k| k.len()), Some(2));
        until("stale keys are not trusted", || jwks.keys().is_none()).await;

        // Dropping the last reference stops the refresh task.
        drop(jwks);
        let after = calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(calls.load(Ordering::SeqCst), after);
    }
}
