//! `/v1/keys`, `/v1/audit`: admin routes. Admins see key state and audit; never values.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::views::{KekUsage, KeysResponse};
use crate::extract::Admin;
use crate::{ApiError, AppState, ErrorBody};

/// The active KEK and how many credential versions each KEK wraps.
#[utoipa::path(get, path = "/v1/keys", tag = "admin",
    responses((status = 200, body = KeysResponse), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn keys(
    State(state): State<AppState>,
    Admin(admin): Admin,
) -> Result<Json<KeysResponse>, ApiError> {
    tracing::info!(admin = %admin, "key state listed");
    let active = state.vault().keys().active_kek().map_err(|e| {
        ApiError::internal(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    })?;
    let counts = state
        .vault()
        .store()
        .count_versions_by_kek()
        .await
        .map_err(|e| ApiError::from(strongroom_core::CoreError::from(e)))?;
    let active_count = counts
        .iter()
        .find(|(k, _)| {
            k.provider == active.provider
                && k.key_id == active.key_id
                && k.version == active.version
        })
        .map_or(0, |(_, n)| *n);
    Ok(Json(KeysResponse {
        active: KekUsage {
            provider: active.provider,
            key_id: active.key_id,
            version: active.version,
            credential_versions: active_count,
        },
        in_use: counts
            .into_iter()
            .map(|(k, n)| KekUsage {
                provider: k.provider,
                key_id: k.key_id,
                version: k.version,
                credential_versions: n,
            })
            .collect(),
    }))
}

/// Audit queries. Arrive with the audit log.
#[utoipa::path(get, path = "/v1/audit", tag = "admin",
    responses((status = 501, description = "not implemented until the audit log lands", body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn audit(_admin: Admin) -> Result<Json<()>, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "the audit log is not implemented yet",
    ))
}
