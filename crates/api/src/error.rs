//! `ApiError`: every failure as a status, a stable code and a message that holds no secret.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use strongroom_core::CoreError;
use utoipa::ToSchema;

/// The error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code (`not_found`, `forbidden`, `version_conflict`, ...).
    pub code: &'static str,
    /// Human-readable explanation; never contains a credential value or token.
    pub message: String,
}

/// An API failure. The internal cause of a 5xx is not sent to the client: the response
/// carries it to [`log_failure`], which logs it once with the request's id.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    internal: Option<String>,
    /// Seconds for a `Retry-After` header (429).
    retry_after: Option<u64>,
}

impl ApiError {
    /// A client error with a code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            internal: None,
            retry_after: None,
        }
    }

    /// 400 with code `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401: no or bad credentials.
    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "missing, invalid or expired credentials",
        )
    }

    /// 403: authenticated but not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404, identical whether the credential does not exist or belongs to someone else.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such credential")
    }

    /// 429.
    pub fn rate_limited(retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests; slow down",
        );
        // Whole seconds, rounded up: retrying at the advertised time must succeed.
        let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
        e.retry_after = Some(ms.div_ceil(1000).max(1));
        e
    }

    /// A server-side fault: the client sees only the status and a generic message; a 503
    /// says when to retry (`Retry-After: 1`), as its message does.
    pub fn internal(status: StatusCode, code: &'static str, cause: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: match status {
                StatusCode::SERVICE_UNAVAILABLE => {
                    "a backing service is unavailable; retry later".into()
                }
                _ => "internal error".into(),
            },
            internal: Some(cause.into()),
            retry_after: (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1),
        }
    }

    /// The same answer, with a `Retry-After` of `seconds`.
    #[must_use]
    pub fn retry_in(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The same answer, with `cause` for the server's failure log (see [`log_failure`]),
    /// never sent to the client.
    #[must_use]
    pub fn with_cause(mut self, cause: impl Into<String>) -> Self {
        self.internal = Some(cause.into());
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        use StatusCode as S;
        match e {
            CoreError::InvalidName => Self::new(S::BAD_REQUEST, "invalid_name", e.to_string()),
            CoreError::InvalidOwner => Self::new(S::BAD_REQUEST, "invalid_owner", e.to_string()),
            CoreError::InvalidInput(_) => Self::new(S::BAD_REQUEST, "bad_request", e.to_string()),
            CoreError::InvalidMetadata(_) => {
                Self::new(S::BAD_REQUEST, "invalid_metadata", e.to_string())
            }
            CoreError::ValueTooLarge(_) => {
                Self::new(S::PAYLOAD_TOO_LARGE, "value_too_large", e.to_string())
            }
            CoreError::NotFound => Self::not_found(),
            CoreError::VersionDestroyed => Self::new(S::GONE, "version_destroyed", e.to_string()),
            CoreError::VersionExpired { .. } => {
                Self::new(S::GONE, "version_expired", e.to_string())
            }
            CoreError::VersionConflict { .. } => {
                Self::new(S::CONFLICT, "version_conflict", e.to_string())
            }
            // Writers on other nodes kept taking the next version number: nothing the caller
            // got wrong (409 means a stale expected_version), so retryable.
            CoreError::Contended => {
                let mut e = Self::new(S::SERVICE_UNAVAILABLE, "contended", e.to_string());
                e.retry_after = Some(1);
                e
            }
            CoreError::Disabled => Self::new(S::CONFLICT, "credential_disabled", e.to_string()),
            // 409, not 403: the caller is allowed to write here, and the request is refused
            // for the owner's present state (as many credentials as the quota allows), which
            // the caller can change (destroy one) and then retry; a 403 reads as a permission
            // problem, and is what a policy refusal answers on these routes.
            CoreError::QuotaExceeded { .. } => {
                Self::new(S::CONFLICT, "quota_exceeded", e.to_string())
            }
            CoreError::Unavailable(cause) => {
                Self::internal(S::SERVICE_UNAVAILABLE, "unavailable", cause)
            }
            // Server-side state, not the caller's doing, and not a crash: named apart from an
            // outage so an operator can tell "provider down" from "key not configured here".
            CoreError::KeyUnavailable(cause) => {
                Self::internal(S::SERVICE_UNAVAILABLE, "key_unavailable", cause)
            }
            // The log refuses appends: nothing is done unaudited.
            CoreError::AuditIntegrity(cause) => {
                Self::internal(S::SERVICE_UNAVAILABLE, "audit_unavailable", cause)
            }
            CoreError::Integrity { .. } => Self::internal(
                S::INTERNAL_SERVER_ERROR,
                "integrity_error",
                "stored data failed its integrity check",
            ),
            other => Self::internal(S::INTERNAL_SERVER_ERROR, "internal", other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(ErrorBody {
                error: ErrorDetail {
                    code: self.code,
                    message: self.message,
                },
            }),
        )
            .into_response();
        response
            .extensions_mut()
            .insert(crate::audit::ErrorCode(self.code));
        if let Some(cause) = self.internal {
            response.extensions_mut().insert(FailureCause {
                code: self.code,
                cause,
            });
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The internal cause of a failed request, from the [`ApiError`] that answered it to
/// [`log_failure`].
#[derive(Clone)]
struct FailureCause {
    code: &'static str,
    cause: String,
}

/// The error code of a response that failed on the server's side (one with an internal
/// cause), for the failure counter.
pub(crate) fn failure_code<B>(response: &Response<B>) -> Option<&'static str> {
    response
        .extensions()
        .get::<FailureCause>()
        .map(|failure| failure.code)
}

/// Logs the internal cause of a failed request (a 5xx), at most one line per error code per
/// [`ERROR_LINE_EVERY`] (the metric counts every one), with the request's id
/// (`x-request-id`): an operator finds the request's audit record by it, and there its
/// owner, credential and version (an integrity error names no row of its own). Runs around
/// the router, once the response carries the id.
pub(crate) fn log_failure<B>(mut response: Response<B>) -> Response<B> {
    if let Some(failure) = response.extensions_mut().remove::<FailureCause>() {
        if let Some(similar) = admit_error_line(failure.code) {
            let request_id = response
                .headers()
                .get(crate::routes::REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::error!(request_id, status = response.status().as_u16(),
                code = failure.code, cause = %failure.cause, similar_not_logged = similar,
                "request failed");
        }
    }
    response
}

/// At most one "request failed" line per error code per this interval: an outage (a key
/// provider down) fails every request the same way, and logged one line each (10,000 in
/// 25 s). The metrics count every request; the line says how many it stands for.
const ERROR_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

static ERROR_LINES: ErrorLines = ErrorLines(std::sync::Mutex::new(Vec::new()));

/// Whether a line about `kind` (one of a few fixed kinds of failure, such as an error code)
/// may be logged now, at most one per [`ERROR_LINE_EVERY`]: `Some(n)` with `n` lines of its
/// kind not logged since the last one.
pub(crate) fn admit_error_line(kind: &'static str) -> Option<u64> {
    ERROR_LINES.admit(kind, std::time::Instant::now())
}

/// Per error code: when its last line was logged, and how many were not logged since.
struct ErrorLines(std::sync::Mutex<Vec<(&'static str, std::time::Instant, u64)>>);

impl ErrorLines {
    /// `Some(n)` when a line for `code` may be logged at `now` (`n` like it were not since
    /// the last); `None` when it is one of those.
    fn admit(&self, code: &'static str, now: std::time::Instant) -> Option<u64> {
        let mut codes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match codes.iter_mut().find(|(c, _, _)| *c == code) {
            Some((_, last, skipped)) if now.duration_since(*last) < ERROR_LINE_EVERY => {
                *skipped += 1;
                None
            }
            Some((_, last, skipped)) => {
                *last = now;
                Some(std::mem::take(skipped))
            }
            // Error codes are a short fixed list of constants.
            None => {
                codes.push((code, now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_requests_are_logged_once_per_code_per_interval_with_a_count() {
        let lines = ErrorLines(std::sync::Mutex::new(Vec::new()));
        let t0 = std::time::Instant::now();
        assert_eq!(lines.admit("key_unavailable", t0), Some(0));
        for _ in 0..999 {
            assert_eq!(lines.admit("key_unavailable", t0), None);
        }
        // Another code has its own allowance.
        assert_eq!(lines.admit("integrity_error", t0), Some(0));
        let later = t0 + ERROR_LINE_EVERY;
        assert_eq!(lines.admit("key_unavailable", later), Some(999));
        assert_eq!(lines.admit("key_unavailable", later), None);
    }

    /// Losing the version-number race to other nodes is no fault of the caller's: 503 with
    /// Retry-After, not the 409 of a stale `expected_version`.
    #[test]
    fn contention_is_retryable_and_a_stale_version_is_a_conflict() {
        let r = ApiError::from(CoreError::Contended).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::from(CoreError::VersionConflict { current: Some(3) }).into_response();
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
