//! Auditing every request: a middleware that records who did what to which credential,
//! with what outcome, once the response is known; and the fail-closed path that reveal takes
//! (its record is durable before the value is returned).
//!
//! The record is built from the matched route (the action), the path parameters (owner,
//! name, version), what the auth extractors learned (principal, delegated user), the
//! `x-request-id` header, the client address ([`ClientAddr`] or axum's `ConnectInfo`) and the
//! response status and error code. Never from a body, a header value or a token, so it cannot
//! hold a value.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use strongroom_store::audit::Event;

use crate::{ApiError, AppState};

/// The client's address, inserted as a request extension by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The stable error code of an error response (set by [`ApiError`]'s `into_response`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ErrorCode(pub &'static str);

/// What is known about the request so far.
#[derive(Debug)]
pub(crate) struct Partial {
    event: Event,
    recorded: bool,
}

/// The request's audit record in the making, as a request extension.
#[derive(Clone, Debug)]
pub(crate) struct AuditSlot(Arc<Mutex<Partial>>);

impl AuditSlot {
    fn with<T>(&self, f: impl FnOnce(&mut Partial) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Notes the authenticated principal.
    pub(crate) fn principal(&self, kind: &str, id: &str) {
        self.with(|p| {
            p.event.principal_kind = kind.to_owned();
            p.event.principal_id = id.to_owned();
        });
    }

    /// Notes the owner (user routes: the token's subject).
    pub(crate) fn owner_if_unset(&self, owner: &str) {
        self.with(|p| {
            if p.event.owner.is_none() {
                p.event.owner = Some(owner.to_owned());
            }
        });
    }

    /// Notes the delegated user of a service.
    pub(crate) fn on_behalf_of(&self, user: Option<&str>) {
        self.with(|p| p.event.on_behalf_of = user.map(str::to_owned));
    }

    /// Notes the version acted on.
    pub(crate) fn version(&self, v: u32) {
        self.with(|p| p.event.version = Some(v));
    }

    /// Notes a brokered call's destination (`https://host:port`, never a path or query).
    pub(crate) fn destination(&self, d: &str) {
        self.with(|p| p.event.destination = Some(bounded(d, 300)));
    }

    /// After [`AuditSlot::record_now`]: lets the middleware record the request once more
    /// with its final status (a brokered call recorded before it was made, then failed).
    pub(crate) fn reopen(&self) {
        self.with(|p| p.recorded = false);
    }

    /// Undoes [`AuditSlot::reopen`]: the record already written is the request's last (a
    /// brokered call that went as recorded).
    pub(crate) fn settle(&self) {
        self.with(|p| p.recorded = true);
    }

    /// The request's record as a success with `status`, for a write that commits it in its
    /// own transaction; the middleware records nothing more unless [`AuditSlot::reopen`]ed.
    fn take_for_commit(&self, state: &AppState, status: StatusCode) -> Event {
        self.with(|p| {
            p.recorded = true;
            p.event.status = status.as_u16();
            p.event.outcome = "ok".into();
            p.event.time = state.vault().now();
            p.event.clone()
        })
    }

    /// Records the request now as a success with `status`, and waits until it is durable
    /// (fail-closed: the caller returns nothing it guards on error). The middleware then
    /// records nothing more for this request.
    pub(crate) async fn record_now(
        &self,
        state: &AppState,
        status: StatusCode,
    ) -> Result<(), ApiError> {
        let Some(auditor) = state.auditor() else {
            return Ok(());
        };
        let event = self.with(|p| {
            p.recorded = true;
            p.event.status = status.as_u16();
            p.event.outcome = "ok".into();
            p.event.time = state.vault().now();
            p.event.clone()
        });
        auditor.record(event).await.map(|_| ()).map_err(|e| {
            ApiError::internal(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                format!("audit record not written: {e}"),
            )
        })
    }
}

impl AuditSlot {
    /// Records now, durably, that what the request did so far ended in `error`, for a
    /// handler that then tries again (a reveal overtaken by another process's write: the
    /// record before said its value would leave, and it did not). Unless the handler records
    /// again, the middleware then records how the request ended (the retry may fail too).
    pub(crate) async fn record_failure_now(
        &self,
        state: &AppState,
        error: &ApiError,
    ) -> Result<(), ApiError> {
        let Some(auditor) = state.auditor() else {
            return Ok(());
        };
        let event = self.with(|p| {
            p.event.status = error.status().as_u16();
            p.event.outcome = outcome(error.status()).into();
            p.event.error_code = Some(error.code().into());
            p.event.time = state.vault().now();
            let event = p.event.clone();
            // What comes next is another attempt, not this failure.
            p.event.error_code = None;
            p.recorded = false;
            event
        });
        auditor.record(event).await.map(|_| ()).map_err(|e| {
            ApiError::internal(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                format!("audit record not written: {e}"),
            )
        })
    }

    /// Records that the request's action is starting (outcome `started`), durable before it
    /// is made; the middleware records how it ended as for any request. For an action
    /// outside the store's transactions (a key rotation): one that cannot be recorded is
    /// not made, and one that fails is not logged as done.
    pub(crate) async fn record_start(&self, state: &AppState) -> Result<(), ApiError> {
        let Some(auditor) = state.auditor() else {
            return Ok(());
        };
        let event = self.with(|p| {
            let mut e = p.event.clone();
            e.status = 0;
            e.outcome = "started".into();
            e.time = state.vault().now();
            e
        });
        auditor.record(event).await.map(|_| ()).map_err(|e| {
            ApiError::internal(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                format!("audit record not written: {e}"),
            )
        })
    }
}

/// The audit slot of a request (`None` when auditing is off).
pub(crate) fn slot(ext: &http::Extensions) -> Option<&AuditSlot> {
    ext.get::<AuditSlot>()
}

/// The action a route template and method stand for.
fn action(method: &Method, route: &str) -> &'static str {
    let m = method.as_str();
    match (m, route) {
        ("GET", "/v1/me/credentials") => "list",
        ("PUT", "/v1/me/credentials/{name}") => "put",
        ("GET", "/v1/me/credentials/{name}") => "describe",
        ("DELETE", "/v1/me/credentials/{name}") => "destroy",
        (_, "/v1/me/credentials/{name}/current") => "set_current",
        (_, "/v1/me/credentials/{name}/disable") => "disable",
        (_, "/v1/me/credentials/{name}/enable") => "enable",
        (_, "/v1/me/credentials/{name}/verify") => "verify",
        (_, "/v1/me/credentials/{name}/usage") => "usage",
        (_, "/v1/me/credentials/{name}/versions/{version}") => "destroy_version",
        (_, "/v1/owners/{owner}/credentials/{name}") => "put",
        (_, "/v1/owners/{owner}/credentials/{name}/reveal") => "reveal",
        (_, "/v1/owners/{owner}/credentials/{name}/broker") => "broker",
        (_, "/v1/keys/rotate") => "keys.rotate",
        (_, "/v1/keys") => "keys",
        (_, "/v1/audit") => "audit_query",
        _ => "other",
    }
}

/// `ok`, `denied` or `error` for a status.
pub(crate) fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        0..=399 => "ok",
        401 | 403 | 429 => "denied",
        _ => "error",
    }
}

/// The `request_id` of a record: this server's id (the response's `x-request-id`), then the
/// id the client sent (if any, bounded to 64 printable ASCII characters) after `client=`, so
/// a client can neither choose nor collide with the id a record is found by.
fn request_id(own: &str, client: Option<&str>) -> String {
    match client {
        None => own.to_owned(),
        Some(c) => {
            let clean: String = c
                .chars()
                .filter(|ch| ch.is_ascii_graphic())
                .take(64)
                .collect();
            format!("{own} client={clean}")
        }
    }
}

/// A request's text as the record keeps it: at most `max` bytes, control characters written
/// as escapes (`\u{0}`). A path may carry any of them (the request is then refused), and
/// neither a NUL, which PostgreSQL's text cannot hold and which would fail the append of
/// every record in its batch, nor a line break belongs in a log line.
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max && !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(max);
    for c in s.chars() {
        let before = out.len();
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
        if out.len() > max {
            out.truncate(before);
            break;
        }
    }
    out
}

/// The middleware (a route layer, so the route template and path parameters are known).
pub(crate) async fn track(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(auditor) = state.auditor().cloned() else {
        return next.run(req).await;
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let client = req
        .extensions()
        .get::<ClientAddr>()
        .map(|a| a.0)
        .or_else(|| {
            req.extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0)
        });
    let client_ip = client.map(|a| a.ip());
    let mut event = Event {
        time: state.vault().now(),
        principal_kind: "anonymous".into(),
        principal_id: String::new(),
        action: action(req.method(), &route).into(),
        owner: None,
        name: None,
        version: None,
        outcome: String::new(),
        status: 0,
        request_id: req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(|own| {
                request_id(
                    own,
                    req.headers()
                        .get(crate::routes::CLIENT_REQUEST_ID)
                        .and_then(|v| v.to_str().ok()),
                )
            }),
        client_addr: client.map(|a| a.to_string()),
        on_behalf_of: None,
        destination: None,
        error_code: None,
    };
    let (mut parts, body) = req.into_parts();
    if let Ok(params) =
        <RawPathParams as axum::extract::FromRequestParts<()>>::from_request_parts(&mut parts, &())
            .await
    {
        for (k, v) in &params {
            match k {
                "owner" => event.owner = Some(bounded(v, 255)),
                "name" => event.name = Some(bounded(v, 128)),
                // Only the spelling the route accepts: `+2` or `002` was refused, not version 2.
                "version" => event.version = crate::routes::views::canonical_number(v),
                _ => {}
            }
        }
    }
    // What identifies the caller, kept for a request refused before any extractor named it
    // (a 400 for its query, a 413 for its declared length): cheap copies, used only then.
    let credentials = (
        parts.headers.get(http::header::AUTHORIZATION).cloned(),
        parts.extensions.get::<crate::PeerCertificate>().cloned(),
    );
    req = Request::from_parts(parts, body);
    let slot = AuditSlot(Arc::new(Mutex::new(Partial {
        event,
        recorded: false,
    })));
    req.extensions_mut().insert(slot.clone());
    // A client that hangs up makes hyper drop this future mid-request: the guard records
    // what is known then (status 499, `client_closed`) instead of nothing.
    let mut guard = RecordOnDrop {
        armed: true,
        cut_short: req.extensions().get::<CutShort>().cloned(),
        slot: slot.clone(),
        auditor: auditor.clone(),
        state: state.clone(),
        client_ip,
    };
    // While the log refuses appends (changed outside Strongroom), nothing is changed or
    // revealed unaudited: only reads run. The refusal itself is still offered to the log,
    // and the first append it takes again lifts this.
    let response = if auditor.intact() || matches!(*req.method(), Method::GET | Method::HEAD) {
        next.run(req).await
    } else {
        // Refused before any handler runs; the record still names who asked.
        let (parts, _) = req.into_parts();
        if let Some((kind, id)) = crate::extract::identify(&state, &parts) {
            slot.principal(kind, &id);
        }
        ApiError::internal(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the audit log refuses appends (changed outside Strongroom)",
        )
        .into_response()
    };
    let status = response.status();
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
    // The append below queues its job at its first poll, which follows at once: from here a
    // drop no longer loses the record.
    guard.armed = false;
    let event = slot.with(|p| {
        if p.recorded {
            return None;
        }
        p.event.status = status.as_u16();
        p.event.outcome = outcome(status).into();
        p.event.error_code = code.map(str::to_owned);
        Some(p.event.clone())
    });
    let Some(mut event) = event else {
        return response;
    };
    // Refused before an extractor looked at the credentials: name the caller they identify.
    // (Not for a 401: its credentials did not verify.)
    if event.principal_kind == "anonymous"
        && status != StatusCode::UNAUTHORIZED
        && (credentials.0.is_some() || credentials.1.is_some())
    {
        let mut probe = http::Request::new(());
        if let Some(auth) = credentials.0 {
            probe
                .headers_mut()
                .insert(http::header::AUTHORIZATION, auth);
        }
        if let Some(peer) = credentials.1 {
            probe.extensions_mut().insert(peer);
        }
        let (probe, ()) = probe.into_parts();
        if let Some((kind, id)) = crate::extract::identify(&state, &probe) {
            event.principal_kind = kind.into();
            event.principal_id = id;
        }
    }
    // Without valid credentials nobody is accountable, and the records would be anyone's
    // to multiply: bounded per address and in all (see `AppState::admit_anonymous_record`).
    if event.principal_kind == "anonymous" && !state.admit_anonymous_record(client_ip) {
        return response;
    }
    if let Err(e) = auditor.record(event).await {
        // The request already happened (a write is committed): answer as it went, and
        // raise the operator alarm, once per 10 s at most (a full disk fails every request;
        // one line each filled the log's disk too). Only reveal is fail-closed (see
        // `AuditSlot::record_now`).
        if let Some(similar) = crate::error::admit_error_line("audit record not written") {
            tracing::error!(error = %e, similar_not_logged = similar, "audit record not written");
        }
    }
    response
}

/// The answer the server gave a request it dropped itself (its timeout), for that request's
/// audit record; unset, a dropped request is one its client gave up.
#[derive(Clone, Debug, Default)]
pub(crate) struct CutShort(Arc<Mutex<Option<(u16, &'static str)>>>);

impl CutShort {
    /// Notes `error` as the request's answer, and gives it as a response.
    pub(crate) fn answer(&self, error: ApiError) -> Response {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((error.status().as_u16(), error.code()));
        error.into_response()
    }

    fn get(&self) -> Option<(u16, &'static str)> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Records a request whose future was dropped before its answer (the client hung up), with
/// status 499 and error code `client_closed`: what it had done by then (a put, a reveal) was
/// recorded on its own, and the slot says so.
struct RecordOnDrop {
    armed: bool,
    cut_short: Option<CutShort>,
    slot: AuditSlot,
    auditor: strongroom_core::audit::Auditor,
    state: AppState,
    client_ip: Option<std::net::IpAddr>,
}

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let event = self.slot.with(|p| {
            if p.recorded {
                return None;
            }
            p.recorded = true;
            let (status, code) = self
                .cut_short
                .as_ref()
                .and_then(CutShort::get)
                .unwrap_or((499, "client_closed"));
            p.event.status = status;
            p.event.outcome = "error".into();
            p.event.error_code = Some(code.into());
            Some(p.event.clone())
        });
        let Some(event) = event else { return };
        if event.principal_kind == "anonymous" && !self.state.admit_anonymous_record(self.client_ip)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let auditor = self.auditor.clone();
        runtime.spawn(async move {
            if let Err(e) = auditor.record(event).await {
                tracing::error!(error = %e, "audit record of a request cut short not written");
            }
        });
    }
}

/// The request's audit slot, for handlers that add to the record or record fail-closed.
pub(crate) struct Audit(pub Option<AuditSlot>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Audit {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Audit(parts.extensions.get::<AuditSlot>().cloned()))
    }
}

impl Audit {
    /// Notes the version acted on.
    pub(crate) fn version(&self, v: u32) {
        if let Some(s) = &self.0 {
            s.version(v);
        }
    }

    /// Notes a brokered call's destination.
    pub(crate) fn destination(&self, d: &str) {
        if let Some(s) = &self.0 {
            s.destination(d);
        }
    }

    /// See [`AuditSlot::record_start`]; with auditing on but no slot, refuses.
    pub(crate) async fn record_start(&self, state: &AppState) -> Result<(), ApiError> {
        match (&self.0, state.auditor()) {
            (Some(slot), _) => slot.record_start(state).await,
            (None, None) => Ok(()),
            (None, Some(_)) => Err(ApiError::internal(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "route outside the audit layer",
            )),
        }
    }

    /// See [`AuditSlot::record_failure_now`].
    pub(crate) async fn record_failure_now(
        &self,
        state: &AppState,
        error: &ApiError,
    ) -> Result<(), ApiError> {
        match &self.0 {
            Some(slot) => slot.record_failure_now(state, error).await,
            None => Ok(()),
        }
    }

    /// See [`AuditSlot::reopen`].
    pub(crate) fn reopen(&self) {
        if let Some(s) = &self.0 {
            s.reopen();
        }
    }

    /// See [`AuditSlot::settle`].
    pub(crate) fn settle(&self) {
        if let Some(s) = &self.0 {
            s.settle();
        }
    }

    /// A put whose 201 record commits in the same transaction as the new version (one
    /// durable commit instead of two in a row). If the put fails, nothing was written and the
    /// middleware records the failure as for any request.
    pub(crate) async fn put(
        &self,
        state: &AppState,
        req: strongroom_core::PutRequest<'_>,
    ) -> Result<strongroom_core::PutOutcome, ApiError> {
        let (Some(slot), Some(auditor)) = (&self.0, state.auditor()) else {
            return Ok(state.vault().put(req).await?);
        };
        let event = slot.take_for_commit(state, StatusCode::CREATED);
        match state
            .vault()
            .put_audited(req, auditor.head_key(), event)
            .await
        {
            Ok((outcome, record)) => {
                auditor.note_append(Ok(()));
                auditor.committed(&record);
                Ok(outcome)
            }
            Err(e) => {
                auditor.note_append(Err(&e));
                slot.reopen();
                Err(e.into())
            }
        }
    }

    /// A change other than a put, committed with its audit record (as [`Audit::put`]): a
    /// change whose record cannot be written is not made. `status` is the one the route
    /// answers with when it succeeds.
    pub(crate) async fn change(
        &self,
        state: &AppState,
        owner: &str,
        name: &str,
        change: strongroom_core::Change,
        status: StatusCode,
    ) -> Result<(), ApiError> {
        let (Some(slot), Some(auditor)) = (&self.0, state.auditor()) else {
            return Ok(state.vault().change(owner, name, change).await?);
        };
        let event = slot.take_for_commit(state, status);
        match state
            .vault()
            .change_audited(owner, name, change, auditor.head_key(), event)
            .await
        {
            Ok(record) => {
                auditor.note_append(Ok(()));
                auditor.committed(&record);
                Ok(())
            }
            Err(e) => {
                auditor.note_append(Err(&e));
                slot.reopen();
                Err(e.into())
            }
        }
    }

    /// Fail-closed recording (see [`AuditSlot::record_now`]); with auditing on but no slot
    /// (a route outside the audit layer), refuses.
    pub(crate) async fn record_now(
        &self,
        state: &AppState,
        status: StatusCode,
    ) -> Result<(), ApiError> {
        match (&self.0, state.auditor()) {
            (Some(slot), _) => slot.record_now(state, status).await,
            (None, None) => Ok(()),
            (None, Some(_)) => Err(ApiError::internal(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "route outside the audit layer",
            )),
        }
    }
}
