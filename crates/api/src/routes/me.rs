//! `/v1/me/credentials...`: a user's own credentials. The owner is always the token's `sub`;
//! no route here returns a value.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use strongroom_core::Change;
use strongroom_crypto::SecretBytes;

use strongroom_store::AuditFilter;

use super::views::{
    detail, item, parse_versions_cursor, CredentialDetail, CredentialList, CurrentBody,
    DescribeQuery, ListQuery, PathVersion, PutBody, PutResponse, StateResponse, UsageItem,
    UsageQuery, UsageResponse, VerifyBody, VerifyResponse,
};
use crate::audit::Audit;
use crate::extract::{ApiJson, ApiPath, ApiQuery, NoBody, User};
use crate::{ApiError, AppState, ErrorBody};

type ApiResult<T> = Result<T, ApiError>;

/// Store a new version of one of your credentials.
#[utoipa::path(put, path = "/v1/me/credentials/{name}", tag = "user",
    params(("name" = String, Path, description = "Credential name, [a-z0-9][a-z0-9._-]{0,127}")),
    request_body = PutBody,
    responses(
        (status = 201, description = "Stored; the value is never returned. Beyond store.max_versions (default 10) active versions, the oldest one that is not current is destroyed; destroyed versions more than store.keep_destroyed_versions (default 100) behind this one are no longer listed or readable (404)", body = PutResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, description = "rate_limited: more than limits.puts_per_owner_per_minute (default 600) puts to this owner's credentials in the last minute, by the user and services together; nothing is written", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds until the owner may put again"))), 
        (status = 409, description = "version_conflict: expected_version is stale; or quota_exceeded: the put would create a credential, and the owner already has store.max_credentials_per_owner (default 1000) live ones (nothing is written; new versions of existing credentials are never refused, and destroying a credential frees its slot)", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "contended: writers on other nodes kept taking the next version number; retry after Retry-After", body = ErrorBody)),
    security(("user_jwt" = [])))]
pub(crate) async fn put(
    State(state): State<AppState>,
    audit: Audit,
    User(owner): User,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<PutBody>,
) -> ApiResult<(StatusCode, Json<PutResponse>)> {
    let created_by = format!("user:{owner}");
    super::put_version(&state, &audit, &owner, name, body, &created_by).await
}

/// List your credentials (metadata only), a page at a time.
#[utoipa::path(get, path = "/v1/me/credentials", tag = "user", params(ListQuery),
    responses((status = 200, body = CredentialList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("user_jwt" = [])))]
pub(crate) async fn list(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    User(owner): User,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<CredentialList>> {
    let page = state
        .vault()
        .list(&owner, q.cursor.as_deref(), q.limit.unwrap_or(100))
        .await?;
    for s in page.items.iter().filter(|s| s.current_metadata_unreadable) {
        note_unreadable(&state, &headers, &s.name, s.current_version);
    }
    let now = state.vault().now();
    Ok(Json(CredentialList {
        items: page.items.into_iter().map(|s| item(s, now)).collect(),
        next_cursor: page.next.map(|c| c.as_str().to_owned()),
    }))
}

/// One credential's metadata and a page of its versions, newest first (never values).
#[utoipa::path(get, path = "/v1/me/credentials/{name}", tag = "user",
    params(("name" = String, Path, description = "Credential name"), DescribeQuery),
    responses((status = 200, description = "The credential, with one page of its versions; `versions_next_cursor` is set when older ones remain", body = CredentialDetail),
        (status = 400, description = "bad_request: a limit other than 1 to 1000, or a cursor that is not a versions_next_cursor (a version number, 1 to 2147483647, without sign or leading zeros)", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("user_jwt" = [])))]
pub(crate) async fn describe(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    User(owner): User,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<DescribeQuery>,
) -> ApiResult<Json<CredentialDetail>> {
    let before = parse_versions_cursor(q.cursor.as_deref())?;
    let credential = state
        .vault()
        .describe_page(&owner, &name, before, q.limit.unwrap_or(DESCRIBE_PAGE))
        .await?;
    for v in credential.versions.iter().filter(|v| v.metadata_unreadable) {
        note_unreadable(&state, &headers, &name, Some(v.version));
    }
    Ok(Json(detail(credential, state.vault().now())))
}

/// A listing answers beside a version whose stored metadata does not read: counted and
/// logged, as the integrity error it would have been (the request's audit record names the
/// owner; the log does not).
fn note_unreadable(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    name: &str,
    version: Option<u32>,
) {
    state.metrics().unreadable_metadata_listed();
    let request_id = headers
        .get(super::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::warn!(
        request_id,
        credential = name,
        version,
        "listed a version whose stored metadata does not read (the database was damaged or \
         edited outside Strongroom)"
    );
}

/// Versions in a description when the request does not say.
const DESCRIBE_PAGE: u32 = 100;

/// The credential's state after a change that committed. A request racing it (a destroy)
/// may have removed the credential since: the change still happened, and is answered as
/// such, with the state it set and no current version.
async fn state_response(
    state: &AppState,
    owner: &str,
    name: &str,
    enabled_if_gone: bool,
) -> ApiResult<Json<StateResponse>> {
    // The facts only: one version is the least a page holds.
    let (enabled, current_version) = match state.vault().describe_page(owner, name, None, 1).await {
        Ok(c) => (c.summary.enabled, c.summary.current_version),
        Err(strongroom_core::CoreError::NotFound) => (enabled_if_gone, None),
        Err(e) => return Err(e.into()),
    };
    Ok(Json(StateResponse {
        name: name.to_owned(),
        state: super::views::state_of(enabled),
        current_version,
    }))
}

/// Choose which version is current.
#[utoipa::path(post, path = "/v1/me/credentials/{name}/current", tag = "user",
    params(("name" = String, Path, description = "Credential name")), request_body = CurrentBody,
    responses((status = 200, body = StateResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),  (status = 404, body = ErrorBody), (status = 410, description = "that version was destroyed", body = ErrorBody)),
    security(("user_jwt" = [])))]
pub(crate) async fn set_current(
    State(state): State<AppState>,
    audit: Audit,
    User(owner): User,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<CurrentBody>,
) -> ApiResult<Json<StateResponse>> {
    audit.version(body.version);
    if let Err(e) = audit
        .change(
            &state,
            &owner,
            &name,
            Change::SetCurrent(body.version),
            StatusCode::OK,
        )
        .await
    {
        return Err(super::name_a_missing_version(&state, &owner, &name, e).await);
    }
    state_response(&state, &owner, &name, true).await
}

/// Kill switch: keep every version but let no service use the credential.
#[utoipa::path(post, path = "/v1/me/credentials/{name}/disable", tag = "user",
    params(("name" = String, Path, description = "Credential name")),
    responses((status = 200, body = StateResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),  (status = 404, body = ErrorBody)), security(("user_jwt" = [])))]
pub(crate) async fn disable(
    State(state): State<AppState>,
    audit: Audit,
    User(owner): User,
    ApiPath(name): ApiPath<String>,
    _: NoBody,
) -> ApiResult<Json<StateResponse>> {
    audit
        .change(
            &state,
            &owner,
            &name,
            Change::SetEnabled(false),
            StatusCode::OK,
        )
        .await?;
    state_response(&state, &owner, &name, false).await
}

/// Undo a disable.
#[utoipa::path(post, path = "/v1/me/credentials/{name}/enable", tag = "user",
    params(("name" = String, Path, description = "Credential name")),
    responses((status = 200, body = StateResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),  (status = 404, body = ErrorBody)), security(("user_jwt" = [])))]
pub(crate) async fn enable(
    State(state): State<AppState>,
    audit: Audit,
    User(owner): User,
    ApiPath(name): ApiPath<String>,
    _: NoBody,
) -> ApiResult<Json<StateResponse>> {
    audit
        .change(
            &state,
            &owner,
            &name,
            Change::SetEnabled(true),
            StatusCode::OK,
        )
        .await?;
    state_response(&state, &owner, &name, true).await
}

/// Check a candidate against the current value, in constant time. Rate-limited per owner.
#[utoipa::path(post, path = "/v1/me/credentials/{name}/verify", tag = "user",
    params(("name" = String, Path, description = "Credential name")), request_body = VerifyBody,
    responses((status = 200, body = VerifyResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 410, description = "version_destroyed: no version is left to compare with", body = ErrorBody), (status = 429, description = "rate_limited: more than limits.verify_per_minute (default 30) verify calls for this owner in the last minute, counted across every node of the deployment", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds until the owner may verify again")))),
    security(("user_jwt" = [])))]
pub(crate) async fn verify(
    State(state): State<AppState>,
    audit: Audit,
    User(owner): User,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<VerifyBody>,
) -> ApiResult<Json<VerifyResponse>> {
    state.admit_verify(&owner).await?;
    let candidate = SecretBytes::new(body.value.into_bytes());
    let matches = state.vault().verify(&owner, &name, &candidate).await?;
    // An answer about the value is recorded before it leaves, as a reveal is: a guess
    // whose record cannot be written gets 503, not its answer.
    audit.record_now(&state, StatusCode::OK).await?;
    Ok(Json(VerifyResponse { matches }))
}

/// Who used the credential, when and how (reveals and brokered calls, newest first): the
/// services' uses and attempts; anyone else's attempts (refused) are in the admin's audit
/// log only.
#[utoipa::path(get, path = "/v1/me/credentials/{name}/usage", tag = "user",
    params(("name" = String, Path, description = "Credential name"), UsageQuery),
    responses((status = 200, body = UsageResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("user_jwt" = [])))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    User(owner): User,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<UsageResponse>> {
    // Existence first, so another owner still gets the 404 a missing credential gets.
    let credential = state.vault().describe_page(&owner, &name, None, 1).await?;
    let mut filter = AuditFilter::default();
    filter.owner = Some(owner.clone());
    filter.name = Some(name.clone());
    filter.actions = vec!["reveal".into(), "broker".into()];
    // Services' uses and attempts only: reveal and broker are theirs. Attempts by anyone
    // else (no valid credentials, another user's or an admin's token, all refused) stay in
    // the admin's audit log: they could otherwise fill this owner's view (the newest first)
    // and bury the uses that matter.
    filter.principal_kinds = vec!["service".into()];
    // The cursor is sealed: a record's number would tell a user how many requests the whole
    // server has recorded between two of theirs.
    let aad = usage_cursor_aad(&owner, &name);
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            state.open_usage_cursor(c, &aad).ok_or_else(|| {
                ApiError::bad_request("malformed cursor: pass a next_cursor this view gave")
            })
        })
        .transpose()?;
    let (records, next) = super::admin::audit_page(&state, &filter, before, q.limit).await?;
    let next_cursor = next
        .map(|seq| state.seal_usage_cursor(seq, &aad))
        .transpose()?;
    Ok(Json(UsageResponse {
        name,
        last_used_at: credential.summary.last_used_at,
        items: records
            .into_iter()
            .map(|r| UsageItem {
                time: r.event.time,
                action: r.event.action,
                principal_id: r.event.principal_id,
                principal_kind: r.event.principal_kind,
                on_behalf_of: r.event.on_behalf_of.filter(|user| *user == owner),
                destination: r.event.destination,
                version: r.event.version,
                outcome: r.event.outcome,
                status: r.event.status,
            })
            .collect(),
        next_cursor,
    }))
}

/// What a usage cursor is bound to: this owner's credential of this name.
fn usage_cursor_aad(owner: &str, name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(owner.len() + name.len() + 24);
    aad.extend_from_slice(b"strongroom-usage-cursor\0");
    aad.extend_from_slice(owner.as_bytes());
    aad.push(0);
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Destroy one version (its data key is erased: crypto-shredding).
#[utoipa::path(delete, path = "/v1/me/credentials/{name}/versions/{version}", tag = "user",
    params(("name" = String, Path, description = "Credential name"), ("version" = u32, Path, minimum = 1, maximum = 2147483647, description = "Version")),
    responses((status = 204, description = "Destroyed"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),  (status = 404, body = ErrorBody)), security(("user_jwt" = [])))]
pub(crate) async fn destroy_version(
    State(state): State<AppState>,
    audit: Audit,
    User(owner): User,
    ApiPath((name, version)): ApiPath<(String, PathVersion)>,
    _: NoBody,
) -> ApiResult<StatusCode> {
    if let Err(e) = audit
        .change(
            &state,
            &owner,
            &name,
            Change::DestroyVersion(version.0),
            StatusCode::NO_CONTENT,
        )
        .await
    {
        return Err(super::name_a_missing_version(&state, &owner, &name, e).await);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Destroy a credential and every version.
#[utoipa::path(delete, path = "/v1/me/credentials/{name}", tag = "user",
    params(("name" = String, Path, description = "Credential name")),
    responses((status = 204, description = "Destroyed"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),  (status = 404, body = ErrorBody)), security(("user_jwt" = [])))]
pub(crate) async fn destroy(
    State(state): State<AppState>,
    audit: Audit,
    User(owner): User,
    ApiPath(name): ApiPath<String>,
    // A body is refused, not ignored: `{"version": 3}` sent here would otherwise destroy
    // every version.
    _: NoBody,
) -> ApiResult<StatusCode> {
    audit
        .change(
            &state,
            &owner,
            &name,
            Change::DestroyCredential,
            StatusCode::NO_CONTENT,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
