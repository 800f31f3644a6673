//! The routes and the middleware stack around them.

pub(crate) mod admin;
pub(crate) mod health;
pub(crate) mod me;
pub(crate) mod owners;
pub(crate) mod views;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::routing::{delete, get, post, put};
use axum::Router;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use crate::extract::ON_BEHALF_OF;
use crate::{ApiError, AppState};

/// The header that carries a request's id (the server's own: see [`CLIENT_REQUEST_ID`]).
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Where a client's own `x-request-id` is kept: every request gets an id of the server's
/// (returned in `x-request-id`), so a client cannot choose the id its audit record carries.
pub(crate) const CLIENT_REQUEST_ID: &str = "x-strongroom-client-request-id";

/// Moves a client's `x-request-id` aside (see [`CLIENT_REQUEST_ID`]).
fn set_client_request_id_aside(mut req: axum::extract::Request) -> axum::extract::Request {
    let headers = req.headers_mut();
    headers.remove(CLIENT_REQUEST_ID);
    if let Some(v) = headers.remove(REQUEST_ID) {
        headers.insert(CLIENT_REQUEST_ID, v);
    }
    req
}

/// Request ids: a counter through a keyed permutation (random per process): unique, cheap,
/// and telling no one how many requests came before (the counter itself, in every
/// response's `x-request-id`, `/healthz` included, did).
#[derive(Clone)]
struct Ids {
    mask: std::sync::Arc<strongroom_crypto::opaque::Permutation>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl MakeRequestId for Ids {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = self.mask.apply(u128::from(n));
        HeaderValue::from_str(&format!("{id:032x}"))
            .ok()
            .map(RequestId::new)
    }
}

/// A put through either route (user or service): the bound-host check, then the new version
/// with its audit record in one commit ([`crate::audit::Audit::put`]); 201 with the version,
/// never the value.
pub(crate) async fn put_version(
    state: &AppState,
    audit: &crate::audit::Audit,
    owner: &str,
    name: String,
    body: views::PutBody,
    created_by: &str,
) -> Result<(StatusCode, axum::Json<views::PutResponse>), ApiError> {
    strongroom_core::broker::check_bound_host(body.metadata.as_ref())
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "invalid_metadata", m))?;
    state.admit_put(owner)?;
    let request = strongroom_core::PutRequest {
        owner,
        name: &name,
        value: strongroom_crypto::SecretBytes::new(body.value.into_bytes()),
        metadata: body.metadata,
        expected_version: body.expected_version,
        created_by,
    };
    let outcome = audit.put(state, request).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(views::PutResponse {
            name,
            version: outcome.version,
            created_at: outcome.created_at,
        }),
    ))
}

/// The routes that read query parameters (each refuses the ones it does not know).
const QUERY_ROUTES: &[&str] = &[
    "/v1/me/credentials",
    "/v1/me/credentials/{name}/usage",
    "/v1/audit",
];

/// Whether the route a request matched reads a query string: the [`QUERY_ROUTES`], and a
/// description's paging (the same path puts and destroys, which read none).
fn reads_query(method: &http::Method, route: &str) -> bool {
    QUERY_ROUTES.contains(&route)
        || (route == "/v1/me/credentials/{name}"
            && (method == http::Method::GET || method == http::Method::HEAD))
}

/// What is refused from the request line and headers alone, before any handler runs (one
/// layer for both, as they run for every request):
///
/// - a body whose declared length is over the limit gets its 413 at once: the body
///   extractor would first read up to the limit, or wait out the request timeout for bytes
///   a client declared and never sends;
/// - a query string on a route that reads none is refused: `reveal?version=2` would
///   otherwise answer with the current version, not the one asked for;
/// - a body is plain JSON, said once: two `Content-Type` fields (a proxy and this server may
///   each read another one), a `Content-Encoding` (a compressed body would be read as the
///   value itself), or a transfer coding other than `chunked` (HTTP/1.1's parser drops the
///   others and reads the body as if they were not there) are refused.
async fn check_request_shape(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.limits().max_body_bytes as u64) {
        return axum::response::IntoResponse::into_response(crate::extract::payload_too_large());
    }
    if let Some(refused) = body_coding_refusal(req.headers()) {
        return axum::response::IntoResponse::into_response(refused);
    }
    if req.uri().query().is_some_and(|q| !q.is_empty()) {
        let reads_query = req
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .is_some_and(|p| reads_query(req.method(), p.as_str()));
        if !reads_query {
            return axum::response::IntoResponse::into_response(ApiError::bad_request(
                "this route takes no query parameters",
            ));
        }
    }
    next.run(req).await
}

/// What is wrong with how a request says its body is encoded, if anything (see
/// [`check_request_shape`]).
fn body_coding_refusal(headers: &http::HeaderMap) -> Option<ApiError> {
    if headers.get_all(header::CONTENT_TYPE).iter().count() > 1 {
        return Some(ApiError::bad_request(
            "the request has more than one Content-Type field",
        ));
    }
    let codings = |name| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
    };
    if codings(header::CONTENT_ENCODING)
        .iter()
        .any(|c| c != "identity")
    {
        return Some(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must not be encoded (Content-Encoding): send it as plain JSON",
        ));
    }
    if codings(header::TRANSFER_ENCODING)
        .iter()
        .any(|c| c != "chunked")
    {
        // A 400, not RFC 9112's 501: the client's doing, and no server failure to alert on.
        return Some(ApiError::bad_request(
            "the only transfer coding taken is chunked",
        ));
    }
    None
}

/// Most header fields a request may have: HTTP/1's parser refuses more on its own (431
/// without a body); HTTP/2 bounds only their size, so this holds it to the same count.
const MAX_HEADER_FIELDS: usize = 100;

/// The request line and headers are over `limits.max_header_bytes`, or there are over
/// [`MAX_HEADER_FIELDS`] header fields: 431 with a JSON error that gives the sizes (never a
/// header's content: it may be a token). Heads up to 16 KiB over the limit reach this far
/// (the server sets its HTTP layer's own limits there), so a client that sends a large
/// token or cookie learns which limit it hit; past that, the HTTP layer answers 431 alone.
async fn check_head_size(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let fields = req.headers().len();
    if fields > MAX_HEADER_FIELDS {
        return axum::response::IntoResponse::into_response(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request has {fields} header fields; at most {MAX_HEADER_FIELDS} are read"),
        ));
    }
    let limit = state.limits().max_header_bytes;
    let size = head_size(&req);
    if size > limit {
        return axum::response::IntoResponse::into_response(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request line and headers take {size} bytes; limits.max_header_bytes \
                 allows {limit}"
            ),
        ));
    }
    next.run(req).await
}

/// A request's line and headers in bytes as HTTP/1.1 writes them (`METHOD target
/// HTTP/1.1`, `name: value` lines, CRLFs), whichever protocol carried it: one measure for
/// the one limit.
fn head_size(req: &axum::extract::Request) -> usize {
    // An authority in the target (HTTP/2's `:authority`, an HTTP/1.1 absolute-form target)
    // counts too.
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + headers + 2
}

pub(crate) fn router(state: AppState) -> Router {
    // A key the OS cannot give (it cannot fail on Linux) leaves an unkeyed but still
    // unique permutation: request ids are not secrets, only not counters.
    let key = strongroom_crypto::Key256::generate(&strongroom_crypto::OsRandom)
        .unwrap_or_else(|_| strongroom_crypto::Key256::from_bytes([0; 32]));
    let ids = Ids {
        mask: std::sync::Arc::new(strongroom_crypto::opaque::Permutation::new(&key)),
        next: Default::default(),
    };
    let v1 = Router::new()
        .route("/v1/me/credentials", get(me::list))
        .route(
            "/v1/me/credentials/{name}",
            put(me::put).get(me::describe).delete(me::destroy),
        )
        .route("/v1/me/credentials/{name}/current", post(me::set_current))
        .route("/v1/me/credentials/{name}/disable", post(me::disable))
        .route("/v1/me/credentials/{name}/enable", post(me::enable))
        .route("/v1/me/credentials/{name}/verify", post(me::verify))
        .route("/v1/me/credentials/{name}/usage", get(me::usage))
        .route(
            "/v1/me/credentials/{name}/versions/{version}",
            delete(me::destroy_version),
        )
        .route("/v1/owners/{owner}/credentials/{name}", put(owners::put))
        .route(
            "/v1/owners/{owner}/credentials/{name}/reveal",
            post(owners::reveal),
        )
        .route(
            "/v1/owners/{owner}/credentials/{name}/broker",
            post(owners::broker),
        )
        .route("/v1/keys", get(admin::keys))
        .route("/v1/keys/rotate", post(admin::rotate))
        .route("/v1/audit", get(admin::audit))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_request_shape,
        ))
        // Every /v1 request is audited (route layer: the route template and path parameters
        // are known).
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::audit::track,
        ));
    let routes = Router::new()
        .merge(v1)
        .route("/v1/openapi.json", get(health::openapi))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        // Before any handler or authentication, and counted in the metrics.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_head_size,
        ))
        // Inside the router: it labels requests by the matched route template.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ));
    let body_limit = state.limits().max_body_bytes;
    // The layers that need no route go around the router once, not around every route
    // (`Router::layer` boxes each route once per layer, cloned for every request).
    let around = tower::ServiceBuilder::new()
        // Before tracing sees them: tokens never reach a log line.
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            HeaderName::from_static(ON_BEHALF_OF),
        ]))
        .layer(tower::util::MapRequestLayer::new(
            set_client_request_id_aside,
        ))
        .layer(SetRequestIdLayer::new(REQUEST_ID, ids))
        // Outside the next layer: it sees the response's request id.
        .layer(tower::util::MapResponseLayer::new(
            crate::error::log_failure,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        // No failure line of its own: a 5xx is logged once, with its cause and request id,
        // by `log_failure` above, not three times per request through an outage.
        .layer(TraceLayer::new_for_http().on_failure(()))
        // No answer may be cached by a proxy or browser: those of /v1, and the refusals and
        // probes around them.
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .service(routes.with_state(state));
    Router::new().fallback_service(around)
}

/// A 404 for a version of a credential that exists says "no such version", not "no such
/// credential": for the owner's own credential, or for a service the policy lets reach it
/// (which may learn that it exists anyway), nothing leaks.
pub(super) async fn name_a_missing_version(
    state: &AppState,
    owner: &str,
    name: &str,
    e: ApiError,
) -> ApiError {
    if e.code() == "not_found"
        && state
            .vault()
            .describe_page(owner, name, None, 1)
            .await
            .is_ok()
    {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such version");
    }
    e
}
