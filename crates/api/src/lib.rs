//! # strongroom-api
//!
//! The HTTP API v1 as an axum [`Router`]: authentication extractors, the routes of
//! `../shared/SPEC.md`, one [`ApiError`] type, Prometheus metrics and the OpenAPI document.
//! TLS, sockets, configuration and signals belong to the server crate, which builds an
//! [`AppState`] and serves [`router`].
//!
//! Rules every handler follows: users act only on their own owner id (taken from their token,
//! never from the path); services act only where [`strongroom_core::policy::Policy`] allows;
//! another owner's credential gets the same 404 as a missing one; only the service `reveal`
//! route returns a value; no value, token or key is ever logged or used as a metric label.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod audit;
pub mod auth;
mod error;
mod extract;
pub mod jwks;
mod metrics;
mod openapi;
mod rotation;
mod routes;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use strongroom_core::broker::Broker;
use strongroom_core::policy::Policy;
use strongroom_core::Vault;

pub use audit::ClientAddr;
pub use auth::{
    hash_token, AuthConfigError, AuthFailure, AuthSettings, Authenticator, JwtAlgorithm,
    JwtKeySource, JwtSettings, PeerCertificate, TokenEntry,
};
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use jwks::{JwksFetchFuture, JwksFetcher, JwksOptions, RemoteJwks};
pub use metrics::Metrics;
pub use openapi::openapi_json;
pub use rotation::{KeyRotation, RotationError};
pub use strongroom_core::audit::Auditor;

/// Limits the router enforces itself (the server adds connection and header limits).
#[derive(Clone, Debug)]
pub struct ApiLimits {
    /// Largest request line plus headers, in bytes, counted as HTTP/1.1 sends them (HTTP/2
    /// requests too); more is answered 431. The server's HTTP layer refuses heads more than
    /// 16 KiB past this on its own, without a JSON body (see `strongroom-server`).
    pub max_header_bytes: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest time a request may take before it is answered 408/503.
    pub request_timeout: Duration,
    /// `verify` calls allowed per owner per minute.
    pub verify_per_minute: u32,
    /// Puts allowed per owner per minute, whoever makes them (the user or a service). Only
    /// puts: they are what adds rows, and an owner's disable and destroys (the kill switch)
    /// must work however many puts a service has made.
    pub puts_per_owner_per_minute: u32,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 512 * 1024,
            request_timeout: Duration::from_secs(30),
            verify_per_minute: 30,
            puts_per_owner_per_minute: 600,
        }
    }
}

type KeyedLimiter = governor::DefaultKeyedRateLimiter<String>;

/// One more request for `owner` under `limiter`, or 429 `rate_limited` with when to retry.
fn admit(limiter: &KeyedLimiter, owner: &str) -> Result<(), ApiError> {
    use governor::clock::Clock;
    limiter.check_key(&owner.to_owned()).map_err(|not_until| {
        ApiError::rate_limited(not_until.wait_time_from(limiter.clock().now()))
    })
}

/// Audit records of requests without valid credentials: per client address (an IPv6 /64 as
/// one) and in all. Each such record is a durable write anyone who reaches the port could
/// otherwise multiply without end (about 200 bytes each, and a commit); past the allowance
/// they are counted (a metric, and a warning a minute) instead of recorded one by one.
/// Requests with valid credentials are always recorded.
struct AnonymousAudit {
    per_address: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    total: governor::DefaultDirectRateLimiter,
    unrecorded: std::sync::atomic::AtomicU64,
    /// Unrecorded requests by client address (at most [`UNRECORDED_ADDRESSES`] of them),
    /// so the warning names who sent them: one party filling the shared allowance should
    /// not hide others' failures without a trace.
    by_address: Mutex<std::collections::HashMap<std::net::IpAddr, u64>>,
}

/// Addresses the unrecorded-request warning keeps counts for between two warnings.
const UNRECORDED_ADDRESSES: usize = 4096;

/// Records a minute per client address without valid credentials (burst: the same).
const ANONYMOUS_PER_ADDRESS_PER_MINUTE: u32 = 60;
/// Records a second from all addresses together without valid credentials (burst: 5 s).
const ANONYMOUS_PER_SECOND: u32 = 50;

struct Shared {
    vault: Arc<Vault>,
    auth: RwLock<Arc<Authenticator>>,
    policy: RwLock<Arc<Policy>>,
    limits: ApiLimits,
    metrics: Metrics,
    /// Every put adds a version row and an audit record; tombstones are trimmed per
    /// credential, but without a bound on the rate, one owner replacing values (or creating
    /// and destroying credentials) in a loop still grows the database fast. (A refused write is still recorded in the audit log, as every request with valid
    /// credentials is, but a record is smaller and cheaper than a put.)
    put_limiter: KeyedLimiter,
    /// This process's own count of `verify` calls, in front of the store's shared one: the
    /// store counts every node's calls, so whatever this one refuses the store would refuse
    /// too, and a client hammering verify past its allowance costs no database write.
    verify_front: KeyedLimiter,
    anonymous_audit: AnonymousAudit,
    auditor: std::sync::OnceLock<Auditor>,
    broker: RwLock<Option<Arc<Broker>>>,
    rotation: std::sync::OnceLock<Arc<dyn KeyRotation>>,
    backend_health: routes::health::BackendHealth,
    /// Seals usage cursors (a key derived from the audit head key, so every node has it).
    usage_cursors: std::sync::OnceLock<strongroom_crypto::opaque::OpaqueSealer>,
}

/// Everything the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// State over `vault`, authenticating with `auth` and authorising services with `policy`.
    pub fn new(vault: Arc<Vault>, auth: Authenticator, policy: Policy, limits: ApiLimits) -> Self {
        let per_owner = |per_minute: u32| -> KeyedLimiter {
            let per_minute =
                std::num::NonZeroU32::new(per_minute).unwrap_or(std::num::NonZeroU32::MIN);
            governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute))
        };
        let put_limiter = per_owner(limits.puts_per_owner_per_minute);
        let verify_front = per_owner(limits.verify_per_minute);
        let metrics = Metrics::new();
        auth.bind_metrics(metrics.jwks());
        Self(Arc::new(Shared {
            vault,
            auth: RwLock::new(Arc::new(auth)),
            policy: RwLock::new(Arc::new(policy)),
            limits,
            metrics,
            put_limiter,
            verify_front,
            anonymous_audit: AnonymousAudit {
                per_address: governor::RateLimiter::keyed(governor::Quota::per_minute(
                    std::num::NonZeroU32::new(ANONYMOUS_PER_ADDRESS_PER_MINUTE)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                )),
                total: governor::RateLimiter::direct(
                    governor::Quota::per_second(
                        std::num::NonZeroU32::new(ANONYMOUS_PER_SECOND)
                            .unwrap_or(std::num::NonZeroU32::MIN),
                    )
                    .allow_burst(
                        std::num::NonZeroU32::new(ANONYMOUS_PER_SECOND * 5)
                            .unwrap_or(std::num::NonZeroU32::MIN),
                    ),
                ),
                unrecorded: std::sync::atomic::AtomicU64::new(0),
                by_address: Mutex::default(),
            },
            auditor: std::sync::OnceLock::new(),
            broker: RwLock::new(None),
            rotation: std::sync::OnceLock::new(),
            backend_health: routes::health::BackendHealth::default(),
            usage_cursors: std::sync::OnceLock::new(),
        }))
    }

    /// Swaps in a new policy (SIGHUP reload); requests in flight finish under the old one.
    pub fn replace_policy(&self, policy: Policy) {
        *self.0.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Swaps in new authentication settings (SIGHUP reload); requests in flight finish
    /// under the old ones.
    pub fn replace_auth(&self, auth: Authenticator) {
        auth.bind_metrics(self.0.metrics.jwks());
        *self.0.auth.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(auth);
    }

    /// The authentication settings in force.
    pub fn authenticator(&self) -> Arc<Authenticator> {
        self.auth()
    }

    /// The last verdict on the store and the key provider (`/readyz`).
    pub(crate) fn backend_health(&self) -> &routes::health::BackendHealth {
        &self.0.backend_health
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.0
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Turns auditing on: from now on every request is recorded through `auditor`, and a
    /// reveal whose record cannot be written answers 503 without the value. Only the first
    /// call has an effect (returns `false` after).
    pub fn set_auditor(&self, auditor: Auditor) -> bool {
        let key = auditor.head_key().derive(b"usage-cursor/1");
        let sealer = strongroom_crypto::opaque::OpaqueSealer::new(
            &strongroom_crypto::Key256::from_bytes(*key),
        );
        let first = self.0.auditor.set(auditor).is_ok();
        if first {
            let _ = self.0.usage_cursors.set(sealer);
        }
        first
    }

    /// A usage cursor for record `seq`, bound to `aad` (the owner's credential); the number
    /// itself when auditing is off (no key to seal with, and no records to hide).
    pub(crate) fn seal_usage_cursor(&self, seq: u64, aad: &[u8]) -> Result<String, ApiError> {
        match self.0.usage_cursors.get() {
            None => Ok(seq.to_string()),
            Some(sealer) => sealer
                .seal_u64(seq, aad, &strongroom_crypto::OsRandom)
                .map_err(|e| {
                    ApiError::internal(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        format!("cannot seal a cursor: {e}"),
                    )
                }),
        }
    }

    /// The record number in a usage cursor this server (or another node) gave for `aad`.
    pub(crate) fn open_usage_cursor(&self, cursor: &str, aad: &[u8]) -> Option<u64> {
        match self.0.usage_cursors.get() {
            None => routes::views::canonical_number::<u64>(cursor).filter(|&s| s > 0),
            Some(sealer) => sealer.open_u64(cursor, aad).filter(|&s| s > 0),
        }
    }

    /// The auditor, when auditing is on.
    pub fn auditor(&self) -> Option<&Auditor> {
        self.0.auditor.get()
    }

    /// Turns brokered use on (`POST .../broker`; without it that route answers 503), or
    /// replaces the broker in force (a reload): calls in flight finish with the one they
    /// started with.
    pub fn set_broker(&self, broker: Arc<Broker>) {
        *self.0.broker.write().unwrap_or_else(|e| e.into_inner()) = Some(broker);
    }

    /// The broker, when brokered use is on.
    pub fn broker(&self) -> Option<Arc<Broker>> {
        self.0
            .broker
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Lets admins rotate the active key through `POST /v1/keys/rotate` (without it that
    /// route answers 503). Only the first call has an effect (returns `false` after).
    pub fn set_key_rotation(&self, rotation: Arc<dyn KeyRotation>) -> bool {
        self.0.rotation.set(rotation).is_ok()
    }

    pub(crate) fn key_rotation(&self) -> Option<&Arc<dyn KeyRotation>> {
        self.0.rotation.get()
    }

    /// The use cases.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.0.vault
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub(crate) fn auth(&self) -> Arc<Authenticator> {
        self.0
            .auth
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn limits(&self) -> &ApiLimits {
        &self.0.limits
    }

    /// One more `verify` for `owner`, or 429 with when to retry. Counted in the store (every
    /// node shares the allowance, and a restart does not refill it): each call answers
    /// whether a guess is the value, and N nodes counting apart would allow N times the
    /// guesses. This process's own count goes first, so a refusal it can make costs no write.
    pub(crate) async fn admit_verify(&self, owner: &str) -> Result<(), ApiError> {
        admit(&self.0.verify_front, owner)?;
        let per_minute = std::num::NonZeroU32::new(self.0.limits.verify_per_minute)
            .unwrap_or(std::num::NonZeroU32::MIN);
        match self
            .vault()
            .take_verify_allowance(owner, per_minute)
            .await?
        {
            None => Ok(()),
            Some(wait) => Err(ApiError::rate_limited(wait)),
        }
    }

    /// One more put to `owner`'s credentials, or 429 with when to retry.
    pub(crate) fn admit_put(&self, owner: &str) -> Result<(), ApiError> {
        admit(&self.0.put_limiter, owner)
    }

    /// The server's once-a-minute upkeep of its in-memory rate limiters: forgets the owners
    /// (puts, verify's front count) and client addresses (unauthenticated audit records) whose allowance has
    /// refilled (the state a newcomer starts with) and gives the memory back, and warns about
    /// the unauthenticated requests counted instead of recorded since the last call. Without
    /// it the limiters grew with every owner and address ever seen. Returns how many owners
    /// the put limiter and verify's front limiter still track (an owner in both counts
    /// twice). (Verify's shared allowances live in the store, which deletes refilled ones as
    /// it goes.)
    pub fn prune_rate_limits(&self) -> usize {
        let anonymous = &self.0.anonymous_audit.per_address;
        anonymous.retain_recent();
        anonymous.shrink_to_fit();
        let unrecorded = self
            .0
            .anonymous_audit
            .unrecorded
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        let by_address = std::mem::take(
            &mut *self
                .0
                .anonymous_audit
                .by_address
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        if unrecorded > 0 {
            let mut top: Vec<(std::net::IpAddr, u64)> = by_address.into_iter().collect();
            top.sort_unstable_by_key(|e| std::cmp::Reverse(e.1));
            let top: Vec<String> = top
                .iter()
                .take(5)
                .map(|(ip, n)| format!("{ip}: {n}"))
                .collect();
            tracing::warn!(
                requests = unrecorded,
                busiest = %top.join(", "),
                "requests without valid credentials past the audit allowance were counted, not recorded one by one (strongroom_audit_unrecorded_anonymous_total)"
            );
        }
        [&self.0.put_limiter, &self.0.verify_front]
            .into_iter()
            .map(|limiter| {
                limiter.retain_recent();
                limiter.shrink_to_fit();
                limiter.len()
            })
            .sum()
    }

    /// Whether to record one more request without valid credentials from `client` (see
    /// [`AnonymousAudit`]); when not, it is counted.
    pub(crate) fn admit_anonymous_record(&self, client: Option<std::net::IpAddr>) -> bool {
        let audit = &self.0.anonymous_audit;
        // One IPv6 host usually holds a whole /64.
        let key = client.map(|ip| match ip.to_canonical() {
            std::net::IpAddr::V6(v6) => {
                let mut bits = v6.octets();
                bits[8..].fill(0);
                std::net::IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
            v4 => v4,
        });
        let admitted = key.is_none_or(|k| audit.per_address.check_key(&k).is_ok())
            && audit.total.check().is_ok();
        if !admitted {
            audit
                .unrecorded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.metrics.unrecorded_anonymous();
            if let Some(ip) = key {
                let mut counts = audit.by_address.lock().unwrap_or_else(|e| e.into_inner());
                if counts.len() < UNRECORDED_ADDRESSES || counts.contains_key(&ip) {
                    *counts.entry(ip).or_default() += 1;
                }
            }
        }
        admitted
    }
}

/// The whole API: `/v1/...`, `/healthz`, `/readyz`, `/metrics`, `/v1/openapi.json`.
pub fn router(state: AppState) -> Router {
    routes::router(state)
}
