//! `/healthz`, `/readyz`, `/metrics`, `/v1/openapi.json`: unauthenticated, value-free.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use super::views::HealthResponse;
use crate::AppState;

/// How long `/readyz` waits for the store and the key provider.
const READY_WITHIN: Duration = Duration::from_secs(5);

/// How long a verdict on the store, the key provider and the log's head stands for `/readyz`.
const BACKENDS_CHECKED_EVERY: Duration = Duration::from_secs(1);

/// The last verdict on the store, the key provider and the audit log's head, shared by
/// `/readyz` requests: at most one check runs at a time, and one at most
/// [`BACKENDS_CHECKED_EVERY`] old answers for all. `/readyz` is unauthenticated and each
/// check calls the key provider (a KMS `DescribeKey`, a Transit key read, a PKCS#11 token
/// scan) and reads the store: anyone who reaches the port could otherwise multiply probes
/// into calls that throttle the account's real key use, and bill for them.
#[derive(Default)]
pub(crate) struct BackendHealth {
    last: std::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    /// Held by the check in progress, which runs as a task of its own: a probe that hangs up
    /// mid-way does not throw its work away, and the next one waits for its verdict instead
    /// of starting another.
    running: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// When "not ready" was last logged: once a second at most, however many probes ask.
    logged: std::sync::Mutex<Option<Instant>>,
}

impl BackendHealth {
    fn fresh(&self) -> Option<Result<(), String>> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_ref() {
            Some((at, verdict)) if at.elapsed() < BACKENDS_CHECKED_EVERY => Some(verdict.clone()),
            _ => None,
        }
    }

    async fn check(state: &AppState) -> Result<(), String> {
        let health = state.backend_health();
        if let Some(verdict) = health.fresh() {
            return verdict;
        }
        let running = health.running.clone().lock_owned().await;
        // The check this one waited for has answered.
        if let Some(verdict) = health.fresh() {
            return verdict;
        }
        let state = state.clone();
        let task = tokio::spawn(async move {
            let verdict = backends_and_head(&state).await;
            *state
                .backend_health()
                .last
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), verdict.clone()));
            drop(running);
            verdict
        });
        task.await
            .unwrap_or_else(|_| Err("the readiness check failed".to_owned()))
    }

    /// Whether a "not ready" line may be logged now (and notes that it is).
    fn may_log(&self) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.is_some_and(|at| at.elapsed() < BACKENDS_CHECKED_EVERY) {
            return false;
        }
        *logged = Some(Instant::now());
        true
    }
}

/// The store and the key provider answer, and the audit log's head names its last record
/// (one deleted or rewritten is an alarm now, not at the next write); each within
/// [`READY_WITHIN`]: a hung store or provider is "not ready" within a probe's usual timeout,
/// not a request timeout 30 s later.
async fn backends_and_head(state: &AppState) -> Result<(), String> {
    match tokio::time::timeout(READY_WITHIN, state.vault().health()).await {
        Ok(checked) => checked.map_err(|e| e.to_string())?,
        Err(_) => {
            return Err(format!(
                "the store or the key provider did not answer within {} s",
                READY_WITHIN.as_secs()
            ))
        }
    }
    let head = async {
        if let Some(auditor) = state.auditor() {
            let log = strongroom_core::audit::audit_log(state.vault().store().as_ref())?;
            strongroom_core::audit::head_names_its_record(log.as_ref(), &auditor.head_key())
                .await?;
        }
        Ok::<_, strongroom_core::CoreError>(())
    };
    match tokio::time::timeout(READY_WITHIN, head).await {
        Ok(head) => head.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the store did not answer within {} s",
            READY_WITHIN.as_secs()
        )),
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = HealthResponse)))]
pub(crate) async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse { status: "ok" })
}

/// The store and the key provider are reachable and the audit log's head names its last
/// record (checked at most once a second, whatever the number of probes), and, when
/// user-token keys come from a JWKS URL, the key set in force is not older than
/// `jwks_max_stale_seconds` (past that, every user token is refused, so the server is not
/// ready to serve users).
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = HealthResponse), (status = 503, body = HealthResponse,
        headers(("Retry-After" = u64, description = "seconds before asking again (the verdict stands that long)")))))]
pub(crate) async fn readyz(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let checked = BackendHealth::check(&state).await;
    let ready = match checked {
        Err(e) => Err(e),
        Ok(()) if state.auditor().is_some_and(|a| !a.intact()) => Err(
            "the audit log refuses appends: it was changed outside Strongroom (run `strongroom \
             audit verify`)"
                .to_owned(),
        ),
        Ok(()) if state.auditor().is_some_and(|a| a.failing()) => Err(
            "the audit log's last append failed (a full disk or a store fault?): writes and \
             reveals fail until one succeeds"
                .to_owned(),
        ),
        Ok(()) => match state.auth().remote_jwks() {
            Some(jwks) if jwks.keys().is_none() => Err(format!(
                "the user-token key set from {} is older than its allowed staleness",
                jwks.source()
            )),
            _ => Ok(()),
        },
    };
    match ready {
        Ok(()) => (StatusCode::OK, Json(HealthResponse { status: "ok" })).into_response(),
        Err(e) => {
            if state.backend_health().may_log() {
                tracing::warn!(error = %e, "not ready");
            }
            (
                StatusCode::SERVICE_UNAVAILABLE,
                // As every 503 of this server: the verdict is checked again after a second.
                [(axum::http::header::RETRY_AFTER, "1")],
                Json(HealthResponse {
                    status: "unavailable",
                }),
            )
                .into_response()
        }
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus metrics in the OpenMetrics text format", content_type = "application/openmetrics-text")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics().encode(),
    )
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health", responses((status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json")))]
pub(crate) async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi_json(),
    )
}
