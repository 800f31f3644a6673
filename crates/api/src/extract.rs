//! Request extractors: who is calling, and JSON/path/query input with JSON errors.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use crate::auth::{AuthFailure, PeerCertificate};
use crate::{ApiError, AppState};

/// The header a delegated service uses to present the owner's user token.
pub const ON_BEHALF_OF: &str = "x-strongroom-on-behalf-of";

/// The one value of a credential-carrying header. Two are refused: proxies and servers
/// disagree on which one counts, so a proxy could vet one principal while this server
/// served another.
fn single_header<'a>(
    parts: &'a Parts,
    name: &str,
) -> Result<Option<&'a header::HeaderValue>, ApiError> {
    let mut values = parts.headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::bad_request(format!(
            "send at most one {name} header"
        )));
    }
    Ok(first)
}

fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(value) = single_header(parts, header::AUTHORIZATION.as_str())? else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| ApiError::unauthenticated())?;
    match text.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(ApiError::unauthenticated()),
    }
}

/// An authenticated end user; the string is their owner id (the token's `sub`).
pub struct User(pub String);

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?.ok_or_else(ApiError::unauthenticated)?;
        // One credential per request: a user token beside a certificate that names a service
        // or an admin is refused, as two credentials of those kinds are.
        let peer = parts.extensions.get::<PeerCertificate>();
        if !matches!(state.auth().certificate_identity(peer), Ok(None)) {
            return Err(ApiError::unauthenticated());
        }
        match state.auth().authenticate_user(token).await {
            Ok(sub) => {
                if let Some(slot) = crate::audit::slot(&parts.extensions) {
                    slot.principal("user", &sub);
                    slot.owner_if_unset(&sub);
                }
                Ok(User(sub))
            }
            // A valid service or admin credential on a user route: known, but the wrong kind.
            Err(_) => match other_principal(state, parts, Some(token)) {
                Some(who) => Err(wrong_kind(
                    parts,
                    who,
                    "this route is for users; services use /v1/owners/...",
                )),
                None => Err(ApiError::unauthenticated()),
            },
        }
    }
}

/// The principal a valid credential of another kind than the route's belongs to (a user
/// token, a service token or certificate, an admin token or certificate), if any.
fn other_principal(
    state: &AppState,
    parts: &Parts,
    token: Option<&str>,
) -> Option<(&'static str, String)> {
    let auth = state.auth();
    let peer = parts.extensions.get::<PeerCertificate>();
    if let Some(sub) = token.and_then(|t| auth.verify_user(t).ok()) {
        return Some(("user", sub));
    }
    if let Ok(name) = auth.verify_service(token, peer) {
        return Some(("service", name));
    }
    auth.verify_admin(token, peer)
        .ok()
        .map(|name| ("admin", name))
}

/// Who a request's credentials name (a user, service or admin), when they are valid: for a
/// record of a request refused before its handler ran.
pub(crate) fn identify(state: &AppState, parts: &Parts) -> Option<(&'static str, String)> {
    let token = bearer(parts).ok()?;
    other_principal(state, parts, token)
}

/// A 403 for a known principal on a route of another kind, recorded under that principal
/// (not as anonymous) in the request's audit record.
fn wrong_kind(parts: &Parts, (kind, id): (&'static str, String), message: &str) -> ApiError {
    if let Some(slot) = crate::audit::slot(&parts.extensions) {
        slot.principal(kind, &id);
    }
    ApiError::forbidden(message.to_owned())
}

/// An authenticated service, and the user it proved it acts for (delegated mode).
pub struct Service {
    /// The service name.
    pub name: String,
    /// The owner id from a valid `X-Strongroom-On-Behalf-Of` user token.
    pub on_behalf_of: Option<String>,
}

impl FromRequestParts<AppState> for Service {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let peer = parts.extensions.get::<PeerCertificate>();
        let name = match state.auth().verify_service(token, peer) {
            Ok(name) => name,
            Err(AuthFailure::Invalid) => {
                return Err(match other_principal(state, parts, token) {
                    Some(who @ ("user", _)) => {
                        wrong_kind(parts, who, "users cannot use service routes")
                    }
                    Some(who) => wrong_kind(parts, who, "admins cannot use service routes"),
                    None => ApiError::unauthenticated(),
                })
            }
            Err(AuthFailure::Missing) => return Err(ApiError::unauthenticated()),
        };
        // Named before the user token it presents is checked: a service whose on-behalf-of
        // token is refused is recorded as itself, not as anonymous (whose records are
        // rationed).
        if let Some(slot) = crate::audit::slot(&parts.extensions) {
            slot.principal("service", &name);
        }
        let on_behalf_of = match single_header(parts, ON_BEHALF_OF)? {
            None => None,
            Some(v) => {
                // The service itself is authenticated by now: it is told which of its two
                // credentials was refused (as much as a bad token's holder may learn).
                let refused = || {
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthenticated",
                        format!(
                            "the user token in {ON_BEHALF_OF} was refused: malformed, expired, \
                             not signed by a key this server trusts, or not issued for \
                             delegation (auth.jwt.on_behalf_of_audience)"
                        ),
                    )
                };
                let t = v.to_str().map_err(|_| refused())?;
                Some(
                    state
                        .auth()
                        .authenticate_on_behalf_of(t.trim())
                        .await
                        .map_err(|_| refused())?,
                )
            }
        };
        if let Some(slot) = crate::audit::slot(&parts.extensions) {
            slot.on_behalf_of(on_behalf_of.as_deref());
        }
        Ok(Service { name, on_behalf_of })
    }
}

/// An authenticated admin.
pub struct Admin(pub String);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let peer = parts.extensions.get::<PeerCertificate>();
        match state.auth().verify_admin(token, peer) {
            Ok(name) => {
                if let Some(slot) = crate::audit::slot(&parts.extensions) {
                    slot.principal("admin", &name);
                }
                Ok(Admin(name))
            }
            Err(AuthFailure::Invalid) => match other_principal(state, parts, token) {
                Some(who) => Err(wrong_kind(parts, who, "this route is for admins")),
                None => Err(ApiError::unauthenticated()),
            },
            Err(AuthFailure::Missing) => Err(ApiError::unauthenticated()),
        }
    }
}

/// A JSON body whose rejections are JSON errors that never echo the input.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            ));
        }
        let ApiBytes(body) = ApiBytes::from_request(req, state).await?;
        require_object(&body)?;
        parse_json(&body).map(ApiJson)
    }
}

/// `application/json`, or a `+json` type, with any parameters (as axum's own check).
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // One media type: `application/a, text/b+json` is two, which readers take apart
    // differently.
    if value.contains(',') {
        return false;
    }
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

/// Every request body is a JSON object: serde would also read a struct from an array of its
/// fields in order (`["value", {...}]`), a form no client means and no schema allows.
pub(crate) fn require_object(body: &[u8]) -> Result<(), ApiError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        None => Err(ApiError::bad_request("the body is not valid JSON")),
        Some(_) => Err(ApiError::bad_request("the body must be a JSON object")),
    }
}

/// A JSON object body as `T`, or a 400 that names the field at fault. serde's own messages
/// can quote the offending input (which may be a value, or a key a client made of one), so
/// only the field's place is passed on, and only for fields the endpoint has: what is wrong
/// with it is said in words of ours.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let syntax = || {
        // serde_json also stops at 128 levels of nesting, with the same kind of error.
        ApiError::bad_request(
            "the body is not valid JSON (UTF-8), or nests arrays and objects more than 128 \
             levels deep",
        )
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) if e.inner().classify() != serde_json::error::Category::Data => return Err(syntax()),
        Err(e) => return Err(data_error(&e)),
    };
    de.end().map_err(|_| syntax())?;
    Ok(value)
}

fn data_error(e: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let text = e.inner().to_string();
    // The fields above the one at fault are the endpoint's own (an unknown one is refused
    // where it appears, before anything under it is read).
    let segments: Vec<String> = e.path().iter().map(ToString::to_string).collect();
    let known = |n: usize| segments[..n.min(segments.len())].join(".");
    let message = if text.starts_with("unknown field") {
        match known(segments.len().saturating_sub(1)) {
            at if at.is_empty() => "the body has a field this endpoint does not take".to_owned(),
            at => format!("{at} has a field this endpoint does not take"),
        }
    } else if text.starts_with("missing field") || text.starts_with("duplicate field") {
        // Names one of the endpoint's own fields.
        let what = text.split(" at line ").next().unwrap_or(&text);
        match known(segments.len()) {
            at if at.is_empty() || at == "?" => what.to_owned(),
            at => format!("{at}: {what}"),
        }
    } else if text.starts_with("invalid type")
        || text.starts_with("invalid value")
        // serde quotes what it read in backticks or quotes (`unknown variant \`…\``).
        || text.contains(['`', '"'])
    {
        // The top-level field only: below it may be a map of the client's own keys
        // (`metadata`, a brokered call's `headers`).
        format!("{} has the wrong type or value for this endpoint", known(1))
    } else {
        // Our own deserializers' words (a repeated key, a non-canonical number), or serde's
        // that quote nothing (an array's length).
        let what = text.split(" at line ").next().unwrap_or(&text);
        format!("{}: {what}", known(1))
    };
    // A fault inside `metadata` gets the code the metadata checks after parsing give.
    if known(1) == "metadata" {
        return ApiError::new(StatusCode::BAD_REQUEST, "invalid_metadata", message);
    }
    ApiError::bad_request(message)
}

fn unsupported_media_type() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send the body as JSON with Content-Type: application/json",
    )
}

/// Whether a body stopped because its client went away (an HTTP/1.1 connection closed
/// before the body's end, an HTTP/2 stream reset by the client) rather than because what came
/// was malformed: the request's record then says `client_closed`, as for a client that hangs
/// up at any other moment, not that it sent a bad request.
fn client_went_away(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
                return true;
            }
        }
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            // A connection gone under its streams shows as the h2 error's I/O error, which
            // it does not give as its source.
            if e.is_reset() && e.is_remote()
                || e.is_go_away() && e.is_remote()
                || e.get_io().is_some_and(connection_gone)
            {
                return true;
            }
        }
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(connection_gone)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// An I/O error that says the peer closed or dropped the connection.
fn connection_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
    )
}

/// The answer to a request whose client went away: nobody reads it; its status (nginx's 499)
/// and code are what its audit record and metrics say.
fn client_closed() -> ApiError {
    ApiError::new(
        StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        "client_closed",
        "the client closed the request before its body's end",
    )
}

pub(crate) fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "request body too large",
    )
}

/// Path parameters with JSON errors.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let malformed = || {
            ApiError::bad_request(
                "malformed path parameter: percent-encode it as UTF-8 (each % followed by two hex digits)",
            )
        };
        // The decoder passes a `%` without two hex digits through as it is, so `%zz` and
        // `%25zz` would name the same owner: one spelling per id, or none.
        if !well_formed_escapes(parts.uri.path().as_bytes()) {
            return Err(malformed());
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|rejection| match rejection {
                // A parameter that decoded but is not what the route takes (a version
                // number): our deserializer's words say why. axum's other kinds quote the
                // parameter, which may be an owner id: never passed on.
                axum::extract::rejection::PathRejection::FailedToDeserializePathParams(e) => {
                    match e.into_kind() {
                        axum::extract::path::ErrorKind::Message(why) => {
                            ApiError::bad_request(format!("malformed path parameter: {why}"))
                        }
                        _ => malformed(),
                    }
                }
                _ => malformed(),
            })
    }
}

/// Whether every `%` in `path` starts a `%XX` escape.
fn well_formed_escapes(path: &[u8]) -> bool {
    path.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || path
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    })
}

/// Query parameters with JSON errors.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // The decoder replaces bytes that are not UTF-8 (`owner=%FF` would filter by U+FFFD
        // and find nothing) and passes a stray `%` through: refused, as in a path.
        let query = parts.uri.query().unwrap_or_default();
        if !well_formed_escapes(query.as_bytes())
            || query.split(['&', '=']).any(|part| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8()
                    .is_err()
            })
        {
            return Err(ApiError::bad_request(
                "malformed query string: percent-encode parameters as UTF-8 (each % followed \
                 by two hex digits)",
            ));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|rejection| {
                // As for bodies, nothing the client wrote is quoted back: serde's words are
                // passed on only where they name the endpoint's own parameters (a missing or
                // repeated one) or are ours (a number's form); an unknown name may be
                // anything, a secret pasted in the wrong place included.
                let text = rejection.body_text();
                let why = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                // axum puts the parameter's name in front (`name: reason`): for an unknown
                // one, that is the client's text too.
                let reason = why.split_once(": ").map_or(why, |(_, reason)| reason);
                let why = if why.contains("unknown field") {
                    "a parameter this endpoint does not take".to_owned()
                } else if reason.starts_with("missing field")
                    || reason.starts_with("duplicate field")
                    || reason.starts_with("limit is a decimal number")
                {
                    why.to_owned()
                } else {
                    "a parameter has a value this endpoint does not take".to_owned()
                };
                ApiError::bad_request(format!("malformed query string: {why}"))
            })
    }
}

/// A raw body (read for [`optional_json`] or a handler's own parsing), with axum's plain-text
/// rejections (length limit, broken body) turned into JSON errors.
pub struct ApiBytes(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // A body, when there is one, is JSON here as on every route.
        let json = json_content_type(req.headers());
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(payload_too_large())
            }
            Err(r) if client_went_away(&r) => return Err(client_closed()),
            Err(_) => return Err(ApiError::bad_request("could not read the request body")),
        };
        if !json && !bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(unsupported_media_type());
        }
        Ok(ApiBytes(bytes))
    }
}

/// For a route that takes no body: nothing, or an empty JSON object, is accepted; anything
/// else is refused rather than ignored.
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ApiBytes(body) = ApiBytes::from_request(req, state).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(NoBody);
        }
        match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body) {
            Ok(fields) if fields.is_empty() => Ok(NoBody),
            _ => Err(ApiError::bad_request(
                "this route takes no body (send none, or {})",
            )),
        }
    }
}

/// An optional JSON body: empty (or whitespace) means `T::default()`.
pub fn optional_json<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    require_object(body)?;
    parse_json(body)
}
