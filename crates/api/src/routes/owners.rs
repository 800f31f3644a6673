//! `/v1/owners/{owner}/credentials/{name}...`: services acting on an owner's credentials,
//! only where policy allows. `reveal` is the one route that returns a value; `broker` uses it
//! for an outbound call and returns only the upstream's (scrubbed) answer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use strongroom_core::broker::{BrokerError, BrokerRequest, Busy, Injection};
use strongroom_core::policy::{Decision, Operation};
use strongroom_core::CoreError;
use strongroom_store::StoreError;
use zeroize::Zeroizing;

use super::views::{
    BrokerBody, BrokerResponseView, PutBody, PutResponse, RevealBody, RevealResponse,
};
use crate::audit::Audit;
use crate::extract::{ApiBytes, ApiJson, ApiPath, Service};
use crate::{ApiError, AppState, ErrorBody};

type ApiResult<T> = Result<T, ApiError>;

/// Policy first: a refusal does not depend on whether the credential exists. (A malformed
/// owner or name is refused before it, the same 400 for every caller.)
fn authorize(
    state: &AppState,
    service: &Service,
    op: Operation,
    owner: &str,
    name: &str,
) -> ApiResult<()> {
    strongroom_core::check_place(owner, name)?;
    // A service acts for the owner or for nobody: another user's token would put that
    // user in the audit record (and in the owner's usage view) of this owner's credential.
    if service
        .on_behalf_of
        .as_deref()
        .is_some_and(|user| user != owner)
    {
        return Err(ApiError::forbidden(
            "the X-Strongroom-On-Behalf-Of token is not the owner's: a service acts only for the owner of the credential",
        ));
    }
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
#[utoipa::path(put, path = "/v1/owners/{owner}/credentials/{name}", tag = "service", operation_id = "put_for_owner",
    params(("owner" = String, Path, description = "Owner id, percent-encoded"), ("name" = String, Path, description = "Credential name"),
        ("X-Strongroom-On-Behalf-Of" = Option<String>, Header, description = "Delegated mode: the owner's user token (a JWT whose sub is the owner, with auth.jwt.on_behalf_of_audience when set), required where the policy rule says delegated = true")),
    request_body = PutBody,
    responses((status = 201, description = "Stored; the value is never returned. Beyond store.max_versions (default 10) active versions, the oldest one that is not current is destroyed; destroyed versions more than store.keep_destroyed_versions (default 100) behind this one are no longer listed or readable (404)", body = PutResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, description = "rate_limited: more than limits.puts_per_owner_per_minute (default 600) puts to this owner's credentials in the last minute, by the user and services together; nothing is written", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds until the owner may put again"))), 
        (status = 403, body = ErrorBody), (status = 409, description = "version_conflict: expected_version is stale; or quota_exceeded: the put would create a credential, and the owner already has store.max_credentials_per_owner (default 1000) live ones (nothing is written; new versions of existing credentials are never refused, and destroying a credential frees its slot)", body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, description = "contended: writers on other nodes kept taking the next version number; retry after Retry-After", body = ErrorBody)),
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
    super::put_version(&state, &audit, &owner, name, body, &created_by).await
}

/// Receive the value (current version unless one is named). Never for a disabled credential.
#[utoipa::path(post, path = "/v1/owners/{owner}/credentials/{name}/reveal", tag = "service",
    params(("owner" = String, Path, description = "Owner id, percent-encoded"), ("name" = String, Path, description = "Credential name"),
        ("X-Strongroom-On-Behalf-Of" = Option<String>, Header, description = "Delegated mode: the owner's user token (a JWT whose sub is the owner, with auth.jwt.on_behalf_of_audience when set), required where the policy rule says delegated = true")),
    request_body(content = RevealBody, description = "Optional (no body, or {}, reveals the current version): {\"version\": n}"),
    responses((status = 200, body = RevealResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "credential disabled", body = ErrorBody),
        (status = 410, description = "version destroyed (version_destroyed), or past its metadata.expires_at (version_expired)", body = ErrorBody),
        (status = 503, description = "the audit record could not be written; no value is returned", body = ErrorBody)),
    security(("service_token" = [])))]
pub(crate) async fn reveal(
    State(state): State<AppState>,
    audit: Audit,
    service: Service,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    authorize(&state, &service, Operation::Reveal, &owner, &name)?;
    let version = crate::extract::optional_json::<RevealBody>(&body)?.version;
    // Recorded as asked, so that a failure to open it (an integrity error) names it too.
    if let Some(v) = version {
        audit.version(v);
    }
    let mut retried = false;
    loop {
        let revealed = match state.vault().reveal(&owner, &name, version).await {
            Ok(r) => r,
            Err(e) if version.is_some() => {
                return Err(super::name_a_missing_version(&state, &owner, &name, e.into()).await)
            }
            Err(e) => {
                // The current version, expired or failing its integrity check: named.
                if let Some(v) = e.version() {
                    audit.version(v);
                }
                return Err(e.into());
            }
        };
        // Checked in place: no copy of the value is made (or dropped unzeroized) here.
        let value = std::str::from_utf8(revealed.value.expose_secret()).map_err(|_| {
            ApiError::internal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "stored value is not UTF-8",
            )
        })?;
        // Fail closed: the record is durable before the value leaves; if it cannot be
        // written, the value is dropped (zeroized) and the caller gets 503.
        audit.version(revealed.version);
        audit.record_now(&state, StatusCode::OK).await?;
        if state.vault().read_still_holds(&revealed.read).await? {
            return secret_json(
                &RevealResponse {
                    value,
                    version: revealed.version,
                },
                value.len(),
            );
        }
        // Another process (an operator's import, put or disable) changed the credential
        // behind a read from memory: this value does not leave. The record just written
        // says it would; one more says it did not. Read again once (the database now), and
        // record that reveal as any other; overtaken twice, the caller retries.
        let overtaken = ApiError::from(CoreError::from(StoreError::Overtaken));
        if retried {
            audit.reopen();
            return Err(overtaken);
        }
        audit.record_failure_now(&state, &overtaken).await?;
        retried = true;
    }
}

/// A JSON answer holding a secret of `secret_len` bytes, serialized into one zeroizing buffer
/// sized for the worst case up front (JSON escapes a byte in at most six), so that it never
/// reallocates, and handed to hyper as it is: it is wiped when the body is dropped, where
/// `Json` would have grown and freed plain buffers holding the value.
fn secret_json<T: serde::Serialize>(body: &T, secret_len: usize) -> ApiResult<Response> {
    let mut buf = Zeroizing::new(Vec::with_capacity(secret_len * 6 + 256));
    serde_json::to_writer(&mut *buf, body).map_err(|e| {
        ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    })?;
    let mut response = Response::new(axum::body::Body::from(axum::body::Bytes::from_owner(buf)));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Brokered use: Strongroom makes the outbound HTTPS call with the credential injected, and
/// returns the upstream's answer with the value scrubbed from it. The destination must match
/// the version's bound host (`metadata.host`) and the policy's `destinations`, and resolve to
/// public addresses only; the audit record (with the destination) is durable before the call.
#[utoipa::path(post, path = "/v1/owners/{owner}/credentials/{name}/broker", tag = "service",
    params(("owner" = String, Path, description = "Owner id, percent-encoded"), ("name" = String, Path, description = "Credential name"),
        ("X-Strongroom-On-Behalf-Of" = Option<String>, Header, description = "Delegated mode: the owner's user token (a JWT whose sub is the owner, with auth.jwt.on_behalf_of_audience when set), required where the policy rule says delegated = true")),
    request_body = BrokerBody,
    responses((status = 200, description = "the upstream answered (any status, 3xx included)", body = BrokerResponseView),
        (status = 400, description = "malformed request, non-https URL", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "policy, destination, bound host or address refused", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "credential disabled", body = ErrorBody),
        (status = 410, description = "version destroyed (version_destroyed), or past its metadata.expires_at (version_expired)", body = ErrorBody),
        (status = 413, description = "body to forward too large", body = ErrorBody),
        (status = 422, description = "the value cannot be injected as asked", body = ErrorBody),
        (status = 429, description = "broker_busy: this service has broker.max_concurrent_calls_per_service (default 16) calls in flight", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
        (status = 502, description = "upstream unreachable, TLS failure, broken HTTP, response too large, content-encoded, or too costly to check for the value", body = ErrorBody),
        (status = 503, description = "the audit record could not be written, or broker_busy: broker.max_concurrent_calls (default 64) calls are in flight; no call was made", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
        (status = 504, description = "upstream timed out", body = ErrorBody)),
    security(("service_token" = [])))]
pub(crate) async fn broker(
    State(state): State<AppState>,
    audit: Audit,
    service: Service,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    authorize(&state, &service, Operation::Broker, &owner, &name)?;
    crate::extract::require_object(&body)?;
    let body: BrokerBody = crate::extract::parse_json(&body)?;
    let asked_for_a_version = body.version.is_some();
    // Recorded as asked, so that a failure to open it (an integrity error) names it too.
    if let Some(v) = body.version {
        audit.version(v);
    }
    let broker = state.broker().ok_or_else(|| {
        ApiError::internal(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "brokered use is not configured on this server",
        )
    })?;
    // Held until the answer has been sent (it goes with the body): a call's answer and its
    // copies count against it; the lookup and the search hold it too, should they outlast
    // the request.
    let slot = broker.admit(&service.name).map_err(broker_error)?;
    let mut prepared = broker
        .prepare(broker_request(body)?)
        .map_err(broker_error)?;
    prepared.hold(&slot);
    audit.destination(&prepared.destination().to_string());
    if !state.policy().allows_destination(
        &service.name,
        &owner,
        &name,
        service.on_behalf_of.as_deref(),
        prepared.destination(),
    ) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "destination_not_allowed",
            format!(
                "policy does not allow service '{}' to broker this credential to {}",
                service.name,
                prepared.destination()
            ),
        ));
    }
    let loaded = match broker.load(state.vault(), &owner, &name, &prepared).await {
        Ok(loaded) => loaded,
        // As a reveal says: "no such version" where the credential exists.
        Err(e) if asked_for_a_version => {
            return Err(super::name_a_missing_version(&state, &owner, &name, broker_error(e)).await)
        }
        Err(e) => {
            if let Some(v) = e.version() {
                audit.version(v);
            }
            return Err(broker_error(e));
        }
    };
    audit.version(loaded.version());
    let target = broker.resolve(&prepared).await.map_err(broker_error)?;
    let call = broker.inject(prepared, loaded).map_err(broker_error)?;
    // Fail closed: the record is durable before the value leaves; if it cannot be written,
    // no call is made and the caller gets 503.
    audit.record_now(&state, StatusCode::OK).await?;
    // That record says the call is being made; until it has gone as recorded, the request
    // gets a second one saying how it ended: its error, or, cut short (the client hung up,
    // or `limits.request_timeout_seconds`), 499 `client_closed` or the server's timeout.
    audit.reopen();
    state.vault().confirm_read(call.read()).await?;
    match broker.send(call, &target).await {
        Ok(r) => {
            audit.settle();
            let (body, body_base64) = match String::from_utf8(r.body) {
                Ok(text) => (Some(text), None),
                Err(e) => {
                    use base64::Engine;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(e.as_bytes());
                    (None, Some(b64))
                }
            };
            let view = BrokerResponseView {
                status: r.status,
                headers: r.headers.into_iter().collect(),
                body,
                body_base64,
                version: r.version,
                redacted: r.redacted,
            };
            let json = serde_json::to_vec(&view).map_err(|e| {
                ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
            let mut response = Response::new(axum::body::Body::new(Held {
                rest: axum::body::Bytes::from(json),
                _slot: slot,
            }));
            response.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            );
            Ok(response)
        }
        Err(e) => Err(broker_error(e)),
    }
}

/// A brokered call's answer, handed to the HTTP layer a chunk at a time while it holds the
/// call's place. The layer asks for the next chunk only once it has written the last one
/// out, so the place is given back once (all but the last chunk of) the answer has gone to
/// a reader, however slowly it reads, not when the handler returns.
struct Held {
    rest: axum::body::Bytes,
    _slot: strongroom_core::broker::CallSlot,
}

/// The chunk size of [`Held`].
const HELD_CHUNK: usize = 64 * 1024;

impl http_body::Body for Held {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let rest = &mut self.get_mut().rest;
        if rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let chunk = rest.split_to(rest.len().min(HELD_CHUNK));
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

fn broker_request(body: BrokerBody) -> ApiResult<BrokerRequest> {
    let payload = match (body.body, body.body_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("send body or body_base64, not both"))
        }
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|_| ApiError::bad_request("body_base64 is not base64"))?
        }
        (None, None) => Vec::new(),
    };
    let i = body.inject;
    let inject = match (i.header, i.query, i.basic) {
        (Some(name), None, None) => Injection::Header {
            name,
            format: i.format,
        },
        (None, Some(name), None) => Injection::Query {
            name,
            format: i.format,
        },
        (None, None, Some(basic)) if i.format.is_none() => Injection::Basic {
            username: basic.username,
        },
        (None, None, Some(_)) => {
            return Err(ApiError::bad_request(
                "inject.format is not used with inject.basic",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "inject must name exactly one of header, query or basic",
            ))
        }
    };
    Ok(BrokerRequest {
        method: body.method,
        url: body.url,
        headers: body.headers.into_iter().collect(),
        body: payload,
        inject,
        version: body.version,
    })
}

fn broker_error(e: BrokerError) -> ApiError {
    use StatusCode as S;
    match e {
        BrokerError::BadRequest(m) => ApiError::bad_request(m),
        BrokerError::BodyTooLarge(_) => {
            ApiError::new(S::PAYLOAD_TOO_LARGE, "payload_too_large", e.to_string())
        }
        BrokerError::DestinationForbidden(m) => {
            ApiError::new(S::FORBIDDEN, "destination_not_allowed", m)
        }
        BrokerError::Unbound(m) => ApiError::new(S::FORBIDDEN, "destination_not_bound", m),
        BrokerError::ValueUnusable(m) => {
            ApiError::new(S::UNPROCESSABLE_ENTITY, "value_unusable", m)
        }
        BrokerError::Core(c) => c.into(),
        // The cause goes to the failure log, with the request's id.
        BrokerError::Upstream { stage, cause } => {
            ApiError::new(S::BAD_GATEWAY, "upstream_unreachable", stage.describe())
                .with_cause(cause)
        }
        BrokerError::Timeout => ApiError::new(
            S::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the upstream did not answer in time",
        ),
        BrokerError::TooLarge(_) => {
            ApiError::new(S::BAD_GATEWAY, "upstream_response_too_large", e.to_string())
        }
        BrokerError::Encoded(_) => {
            ApiError::new(S::BAD_GATEWAY, "upstream_encoded_body", e.to_string())
        }
        BrokerError::Unchecked => {
            ApiError::new(S::BAD_GATEWAY, "upstream_response_unchecked", e.to_string())
        }
        // Over the service's own share: it slows down. Over the server's: it is busy.
        BrokerError::Busy(busy @ Busy::Service(_)) => {
            ApiError::new(S::TOO_MANY_REQUESTS, "broker_busy", busy.to_string()).retry_in(1)
        }
        BrokerError::Busy(busy) => {
            ApiError::new(S::SERVICE_UNAVAILABLE, "broker_busy", busy.to_string()).retry_in(1)
        }
        other => ApiError::internal(S::INTERNAL_SERVER_ERROR, "internal", other.to_string()),
    }
}

#[cfg(test)]
mod held_tests {
    use http_body_util::BodyExt;
    use strongroom_core::broker::{Broker, BrokerSettings};

    use super::*;

    /// The answer goes out in chunks, and the call's place is taken until the body is done
    /// with (sent, or dropped with its connection), not when the handler returned it.
    #[tokio::test]
    async fn an_answer_keeps_its_call_place_until_it_is_sent() {
        let broker = Broker::new(BrokerSettings {
            max_concurrent_calls: 1,
            max_concurrent_calls_per_service: 1,
            ..BrokerSettings::default()
        })
        .unwrap();
        let answer = vec![b'x'; 3 * HELD_CHUNK + 5];
        let mut body = Held {
            rest: axum::body::Bytes::from(answer.clone()),
            _slot: broker.admit("billing").unwrap(),
        };
        let mut sent = Vec::new();
        while let Some(frame) = body.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            assert!(chunk.len() <= HELD_CHUNK);
            assert!(
                matches!(broker.admit("reports"), Err(BrokerError::Busy(_))),
                "the place was given back before the answer had gone"
            );
            sent.extend_from_slice(&chunk);
        }
        assert_eq!(sent, answer);
        drop(body);
        drop(broker.admit("reports").unwrap());
    }
}
