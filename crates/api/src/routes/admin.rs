//! `/v1/keys`, `/v1/audit`: admin routes. Admins see key state and audit; never values.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use strongroom_store::AuditFilter;

use super::views::{
    AuditPage, AuditQuery, AuditRecordView, KekUsage, KeyVersion, KeysResponse, RotatedKey,
};
use crate::extract::{Admin, ApiQuery, NoBody};
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

/// Makes a new active key version: new data keys are sealed under it from now on, on every
/// server within about a second; earlier versions still open what they sealed (`strongroom
/// rewrap` moves it, then `strongroom keys retire` retires them).
#[utoipa::path(post, path = "/v1/keys/rotate", tag = "admin",
    responses((status = 200, body = RotatedKey), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "rotation_unsupported: this key provider rotates by itself (AWS KMS); rotation_refused: this server's keyring file lacks a version a rotation made (a copy left behind: copy the newest file here)", body = ErrorBody),
        (status = 503, description = "the key provider or the store refused or is unavailable", body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn rotate(
    State(state): State<AppState>,
    audit: crate::audit::Audit,
    Admin(admin): Admin,
    _: NoBody,
) -> Result<Json<RotatedKey>, ApiError> {
    let Some(rotation) = state.key_rotation() else {
        return Err(ApiError::internal(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this server has no key rotation configured",
        ));
    };
    // The key provider is outside the store's transactions, so the rotation's start is
    // recorded first (one that cannot be recorded is not made), and how it ended after,
    // with the new version.
    audit.record_start(&state).await?;
    let rotated = rotation.rotate().await;
    if let Ok(kek) = &rotated {
        audit.version(kek.version);
    }
    match rotated {
        Ok(kek) => {
            tracing::info!(admin = %admin, active = %kek, "key rotated through the API");
            Ok(Json(RotatedKey {
                active: KeyVersion {
                    provider: kek.provider,
                    key_id: kek.key_id,
                    version: kek.version,
                },
                next: "run `strongroom rewrap` to move stored data keys to it, then `strongroom keys retire` for the old version",
            }))
        }
        Err(crate::RotationError::Unsupported(m)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "rotation_unsupported",
            m,
        )),
        Err(crate::RotationError::Refused(m)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "rotation_refused", m))
        }
        Err(crate::RotationError::Failed(m)) => Err(ApiError::internal(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("key rotation failed: {m}"),
        )),
    }
}

/// Parses a cursor (a record's `seq`).
fn parse_cursor(c: Option<&str>) -> Result<Option<u64>, ApiError> {
    // One spelling per cursor, as for every number in a URL (and no seq is 0).
    c.map(|c| {
        super::views::canonical_number::<u64>(c)
            .filter(|&seq| seq > 0)
            .ok_or_else(|| ApiError::bad_request("malformed cursor"))
    })
    .transpose()
}

fn parse_time(t: Option<&str>, what: &str) -> Result<Option<time::OffsetDateTime>, ApiError> {
    t.map(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map_err(|_| ApiError::bad_request(format!("{what}: expected an RFC 3339 time")))
    })
    .transpose()
}

/// One page of records matching `filter`, newest first, and the next page's cursor: the
/// last record's number (`seal` turns it into what the caller is given).
pub(crate) async fn audit_page(
    state: &AppState,
    filter: &AuditFilter,
    before: Option<u64>,
    limit: Option<u32>,
) -> Result<(Vec<strongroom_store::audit::Record>, Option<u64>), ApiError> {
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    let log = strongroom_core::audit::audit_log(state.vault().store().as_ref())?;
    // One more than the page: the last page says so (no cursor to an empty one).
    let mut records = log
        .audit_query(filter, before, limit + 1)
        .await
        .map_err(|e| ApiError::from(strongroom_core::CoreError::from(e)))?;
    let more = records.len() > limit as usize;
    records.truncate(limit as usize);
    let next = if more {
        records.last().map(|r| r.seq)
    } else {
        None
    };
    Ok((records, next))
}

/// Audit records, newest first, filtered by owner, credential name, principal and time.
#[utoipa::path(get, path = "/v1/audit", tag = "admin", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn audit(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    // Records keep a request's control characters escaped (`\u{0}`), so a filter holding
    // one matches nothing, and PostgreSQL's text cannot even hold a NUL.
    if [&q.owner, &q.name, &q.principal]
        .into_iter()
        .flatten()
        .any(|f| f.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "owner, name and principal filters must not hold control characters (records keep them escaped as \\u{..})",
        ));
    }
    // An empty filter matches no record: a mistake (`?owner=` with the id left out), not an
    // empty page. (Other values are searched as given: refused requests are recorded with
    // the owner and name they named, valid or not.)
    if [&q.owner, &q.name, &q.principal]
        .into_iter()
        .flatten()
        .any(String::is_empty)
    {
        return Err(ApiError::bad_request(
            "owner, name and principal filters must not be empty (leave the parameter out)",
        ));
    }
    let mut filter = AuditFilter::default();
    filter.owner = q.owner;
    filter.name = q.name;
    filter.principal_id = q.principal;
    filter.since = parse_time(q.since.as_deref(), "since")?;
    filter.until = parse_time(q.until.as_deref(), "until")?;
    let before = parse_cursor(q.cursor.as_deref())?;
    let (records, next) = audit_page(&state, &filter, before, q.limit).await?;
    Ok(Json(AuditPage {
        items: records.into_iter().map(AuditRecordView::from).collect(),
        next_cursor: next.map(|seq| seq.to_string()),
    }))
}
