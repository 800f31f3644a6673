//! `/v1/owners/{owner}/credentials/{name}...`: services acting on an owner's credentials,
//! only where policy allows. `reveal` is the one route that returns a value.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use strongroom_core::policy::{Decision, Operation};
use strongroom_core::PutRequest;
use strongroom_crypto::SecretBytes;
use zeroize::Zeroizing;

use super::views::{PutBody, PutResponse, RevealBody, RevealResponse};
use crate::audit::Audit;
use crate::extract::{ApiJson, ApiPath, Service};
use crate::{ApiError, AppState, ErrorBody};

type ApiResult<T> = Result<T, ApiError>;

/// Policy first: a refusal does not depend on whether the credential exists.
fn authorize(
    state: &AppState,
    service: &Service,
    op: Operation,
    owner: &str,
    name: &str,
) -> ApiResult<()> {
    match state
        .policy()
        .decide(&service.name, op, owner, name, service.on_behalf_of.as_deref())
    {
        Decision::Allow => Ok(()),
        Decision::NeedsDelegation => Err(ApiError::forbidden(format!(
            "policy allows {} here only on behalf of the owner: send their user token in X-Strongroom-On-Behalf-Of",
            op.as_str()
        ))),
        Decision::Deny => Err(ApiError::forbidden(format!(
            "policy does not allow service '{}' to {} this credential",
            service.name,
            op.as_str()
        ))),
    }
}

/// Store a new version on the owner's behalf.
#[utoipa::path(put, path = "/v1/owners/{owner}/credentials/{name}", tag = "service",
    params(("owner" = String, Path, description = "Owner id, percent-encoded"), ("name" = String, Path, description = "Credential name")),
    request_body = PutBody,
    responses((status = 201, body = PutResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("service_token" = [])))]
pub(crate) async fn put(
    State(state): State<AppState>,
    audit: Audit,
    service: Service,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<PutBody>,
) -> ApiResult<(StatusCode, Json<PutResponse>)> {
    authorize(&state, &service, Operation::Write, &owner, &name)?;
    let created_by = format!("service:{}", service.name);
    let outcome = state
        .vault()
        .put(PutRequest {
            owner: &owner,
            name: &name,
            value: SecretBytes::new(body.value.into_bytes()),
            metadata: body.metadata,
            expected_version: body.expected_version,
            created_by: &created_by,
        })
        .await?;
    audit.version(outcome.version);
    Ok((
        StatusCode::CREATED,
        Json(PutResponse {
            name,
            version: outcome.version,
            created_at: outcome.created_at,
        }),
    ))
}

/// Receive the value (current version unless one is named). Never for a disabled credential.
#[utoipa::path(post, path = "/v1/owners/{owner}/credentials/{name}/reveal", tag = "service",
    params(("owner" = String, Path, description = "Owner id, percent-encoded"), ("name" = String, Path, description = "Credential name")),
    request_body(content = Option<RevealBody>, description = "Optional: {\"version\": n}"),
    responses((status = 200, body = RevealResponse), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "credential disabled", body = ErrorBody),
        (status = 410, description = "version destroyed", body = ErrorBody),
        (status = 503, description = "the audit record could not be written; no value is returned", body = ErrorBody)),
    security(("service_token" = [])))]
pub(crate) async fn reveal(
    State(state): State<AppState>,
    audit: Audit,
    service: Service,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<RevealResponse>> {
    authorize(&state, &service, Operation::Reveal, &owner, &name)?;
    let version = crate::extract::optional_json::<RevealBody>(&body)?.version;
    let revealed = state.vault().reveal(&owner, &name, version).await?;
    let value = Zeroizing::new(
        String::from_utf8(revealed.value.expose_secret().to_vec()).map_err(|_| {
            ApiError::internal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "stored value is not UTF-8",
            )
        })?,
    );
    // Fail closed: the record is durable before the value leaves; if it cannot be written,
    // the value is dropped (zeroized) and the caller gets 503.
    audit.version(revealed.version);
    audit.record_now(&state, StatusCode::OK).await?;
    Ok(Json(RevealResponse {
        value: value.to_string(),
        version: revealed.version,
    }))
}

/// Brokered use: Strongroom makes the outbound HTTPS call with the credential injected.
#[utoipa::path(post, path = "/v1/owners/{owner}/credentials/{name}/broker", tag = "service",
    params(("owner" = String, Path, description = "Owner id, percent-encoded"), ("name" = String, Path, description = "Credential name")),
    responses((status = 403, body = ErrorBody), (status = 501, description = "not implemented yet", body = ErrorBody)),
    security(("service_token" = [])))]
pub(crate) async fn broker(
    State(state): State<AppState>,
    service: Service,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<()>> {
    authorize(&state, &service, Operation::Broker, &owner, &name)?;
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "brokered use is not implemented yet",
    ))
}
