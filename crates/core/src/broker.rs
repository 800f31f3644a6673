//! Brokered use: Strongroom makes the outbound HTTPS call with the credential injected, so
//! the service never holds the value.
//!
//! The API layer runs the steps in this order, each refusing before the next:
//!
//! 1. [`Broker::prepare`]: the request's shape — method, `https` URL without user info,
//!    headers the caller may set, the injection (`{value}` exactly once), body size.
//! 2. The policy's `destinations` for the service ([`crate::policy::Policy::allows_destination`]).
//! 3. [`Broker::load`]: the credential and version (404, disabled, destroyed as for reveal)
//!    and its **bound host**, the version's `metadata.host` (a [`DestinationPattern`]); a
//!    version without one is never brokered. Only then is the value decrypted.
//! 4. [`Broker::resolve`]: DNS, and every address checked against private, loopback,
//!    link-local, multicast and unspecified ranges (unless `allow_private_networks`); the call
//!    connects only to these addresses, so a DNS answer cannot change between check and use.
//! 5. [`Broker::inject`]: the value into the request; one that cannot go there as asked
//!    (a line break in a header) is refused here, while nothing was sent.
//! 6. The audit record, durable before anything leaves (the API layer's job).
//! 7. [`Broker::send`]: send (no redirects followed, connect and total timeouts,
//!    response-size cap), and scrub the value and its usual encodings from the response.

mod client;
mod dest;
mod net;
mod scrub;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use strongroom_crypto::SecretBytes;
use strongroom_store::VersionState;
use zeroize::Zeroizing;

pub use client::{HttpsClient, Target, Transport, TransportError, UpstreamResponse};
pub use dest::{Destination, DestinationPattern};

use crate::{CoreError, ReadCheck, Vault};

/// The metadata key naming the host a version is for.
pub const BOUND_HOST_KEY: &str = "host";
/// The placeholder an injection format holds exactly once.
pub const PLACEHOLDER: &str = "{value}";
/// Most headers a caller may send.
const MAX_HEADERS: usize = 64;
/// Longest URL.
const MAX_URL_LEN: usize = 8 * 1024;

/// `[broker]` settings.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// Let calls reach private, loopback, link-local, shared and unique-local addresses.
    pub allow_private_networks: bool,
    /// PEM CA certificates trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// DNS, and then TCP connect and TLS handshake (each within `timeout`).
    pub connect_timeout: Duration,
    /// The whole call: DNS, connecting, sending and reading the whole response.
    pub timeout: Duration,
    /// Largest upstream response body.
    pub max_response_bytes: usize,
    /// Largest body the caller may have sent.
    pub max_request_body_bytes: usize,
    /// Response headers passed back besides the default ones ([`PASSED_BACK`]).
    pub pass_response_headers: Vec<PassedHeader>,
    /// Calls in flight at once, all services together (each holds up to
    /// `max_response_bytes` of answer, and copies of it while it is searched and sent on).
    /// A call keeps its place while its name lookup or the search of its answer goes on
    /// ([`CallSlot`]).
    pub max_concurrent_calls: usize,
    /// Calls in flight at once for one service, so that one cannot take every place.
    pub max_concurrent_calls_per_service: usize,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            allow_private_networks: false,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(20),
            max_response_bytes: 1024 * 1024,
            max_request_body_bytes: 256 * 1024,
            pass_response_headers: Vec::new(),
            max_concurrent_calls: 64,
            max_concurrent_calls_per_service: 16,
        }
    }
}

/// Why a brokered call was refused or failed. Messages never hold the value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The request is malformed; the message says which field.
    #[error("{0}")]
    BadRequest(String),
    /// The request body to forward is larger than allowed.
    #[error("body larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The destination is not allowed (policy, bound host, or address).
    #[error("{0}")]
    DestinationForbidden(String),
    /// The version names no bound host (`metadata.host`), or an unusable one.
    #[error("{0}")]
    Unbound(String),
    /// The value cannot be injected as asked (e.g. it is not a valid header value).
    #[error("{0}")]
    ValueUnusable(&'static str),
    /// The credential could not be used (not found, disabled, destroyed, unavailable).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The upstream could not be reached or broke HTTP: at which step, and the cause (for
    /// the server's log: it may name addresses and the upstream's own words).
    #[error("upstream: {cause}")]
    Upstream {
        /// Where the call failed.
        stage: UpstreamStage,
        /// What failed, in the resolver's, socket's, TLS library's or HTTP parser's words.
        cause: String,
    },
    /// The upstream took too long.
    #[error("upstream timed out")]
    Timeout,
    /// The upstream's response is larger than allowed.
    #[error("upstream response larger than {0} bytes")]
    TooLarge(usize),
    /// The upstream's body is content-encoded, so it cannot be checked for the value. Names
    /// the header only: its text is the upstream's, and an echoing upstream may put the value
    /// there.
    #[error("upstream response is encoded (its {0} header); it cannot be checked for the value")]
    Encoded(&'static str),
    /// The upstream's response holds so many near misses of the value that searching it
    /// for the value's spellings would take more than its budget: refused rather than
    /// passed back partly checked.
    #[error("upstream response could not be checked for the value within its budget (it holds too many near misses of it)")]
    Unchecked,
    /// As many calls are in flight as the settings allow.
    #[error("{0}")]
    Busy(Busy),
}

/// Which bound on calls in flight a call met ([`BrokerError::Busy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Busy {
    /// The service's own (`max_concurrent_calls_per_service`).
    Service(usize),
    /// The server's, for all services (`max_concurrent_calls`).
    Server(usize),
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Busy::Service(n) => write!(
                f,
                "this service has {n} brokered calls in flight, as many as it may \
                 (broker.max_concurrent_calls_per_service); retry when one has ended"
            ),
            Busy::Server(n) => write!(
                f,
                "{n} brokered calls are in flight, as many as this server makes at once \
                 (broker.max_concurrent_calls); retry shortly"
            ),
        }
    }
}

/// Calls in flight, counted in all and by service. Shared by the brokers a reload makes
/// ([`Broker::keeping_calls_of`]): calls under way keep counting against the new settings.
#[derive(Debug, Default)]
struct InFlight(std::sync::Mutex<Counts>);

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_service: std::collections::HashMap<String, usize>,
}

impl InFlight {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A brokered call's place among those in flight ([`Broker::admit`]). Clones share it: it
/// is given back when the last one is dropped. The call's name lookup, which the system
/// resolver cannot cancel, and the search of its answer each hold a clone until they end,
/// and the answer's body until it is sent, so that a call timed out or hung up on keeps
/// its place while any of its work goes on.
#[derive(Clone, Debug)]
#[must_use = "the place is given back when this is dropped"]
pub struct CallSlot {
    _place: Arc<Place>,
}

#[derive(Debug)]
struct Place {
    in_flight: Arc<InFlight>,
    service: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut counts = self.in_flight.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_service.get_mut(&self.service) {
            *n -= 1;
            if *n == 0 {
                counts.by_service.remove(&self.service);
            }
        }
    }
}

impl BrokerError {
    /// The version this error is about, where it names one ([`CoreError::version`]).
    #[must_use]
    pub fn version(&self) -> Option<u32> {
        match self {
            BrokerError::Core(e) => e.version(),
            _ => None,
        }
    }
}

/// Where a brokered call to the upstream failed. The calling service is told this much; the
/// cause itself goes to the server's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpstreamStage {
    /// The destination's name did not resolve, or to no address.
    Resolve,
    /// No address accepted a connection.
    Connect,
    /// The TLS handshake failed: the certificate is not trusted or not for that name, no
    /// protocol was agreed, or the peer does not speak TLS.
    Tls,
    /// The upstream broke HTTP.
    Http,
}

impl UpstreamStage {
    /// What the calling service is told.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            UpstreamStage::Resolve => "the upstream's name does not resolve",
            UpstreamStage::Connect => "the upstream did not accept a connection",
            UpstreamStage::Tls => {
                "the upstream failed the TLS handshake: its certificate is not trusted or not \
                 for its name, no protocol was agreed, or it does not speak TLS there"
            }
            UpstreamStage::Http => "the upstream broke HTTP",
        }
    }
}

/// How the value goes into the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Injection {
    /// A header; `format` holds `{value}` once (`Bearer {value}`); `None` means the value.
    Header {
        /// Header name.
        name: String,
        /// The header value with `{value}` in it.
        format: Option<String>,
    },
    /// A query parameter (form-encoded); `format` as for headers.
    Query {
        /// Parameter name.
        name: String,
        /// The parameter value with `{value}` in it.
        format: Option<String>,
    },
    /// `Authorization: Basic base64(username:value)`.
    Basic {
        /// The user name (no `:`).
        username: String,
    },
}

/// What the caller asks for.
#[derive(Clone, Debug)]
pub struct BrokerRequest {
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// `https://host[:port]/path?query`.
    pub url: String,
    /// Non-secret headers to send.
    pub headers: Vec<(String, String)>,
    /// The body to send.
    pub body: Vec<u8>,
    /// Where the value goes.
    pub inject: Injection,
    /// A version; the current one when `None`.
    pub version: Option<u32>,
}

/// A checked request, ready for a destination and a value.
#[derive(Debug)]
pub struct Prepared {
    method: Method,
    url: url::Url,
    destination: Destination,
    headers: HeaderMap,
    body: Bytes,
    inject: Injection,
    version: Option<u32>,
    slot: Option<CallSlot>,
}

impl Prepared {
    /// Where it goes.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// Makes the call's name lookup and the search of its answer hold `slot` until they end.
    pub fn hold(&mut self, slot: &CallSlot) {
        self.slot = Some(slot.clone());
    }
}

/// The value to inject, and its version.
pub struct Loaded {
    value: SecretBytes,
    version: u32,
    read: ReadCheck,
}

impl Loaded {
    /// What the read saw: pass it to [`Vault::confirm_read`] once the use is recorded.
    pub fn read(&self) -> &ReadCheck {
        &self.read
    }

    /// The version used.
    pub fn version(&self) -> u32 {
        self.version
    }
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// A request with the value in it, ready to send once the call is recorded.
pub struct Call {
    request: http::Request<Bytes>,
    needles: scrub::Needles,
    version: u32,
    read: ReadCheck,
    slot: Option<CallSlot>,
}

impl Call {
    /// What the read saw: pass it to [`Vault::confirm_read`] once the use is recorded.
    pub fn read(&self) -> &ReadCheck {
        &self.read
    }
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The upstream's answer, scrubbed.
#[derive(Debug)]
pub struct BrokerResponse {
    /// Upstream status (a 3xx is returned as is: redirects are never followed).
    pub status: u16,
    /// Upstream headers (hop-by-hop and body-derived ones dropped), repeated names joined
    /// with `, `.
    pub headers: Vec<(String, String)>,
    /// Upstream body.
    pub body: Vec<u8>,
    /// The version whose value was injected.
    pub version: u32,
    /// Whether anything was redacted.
    pub redacted: bool,
}

/// Headers a caller may not set: framing, hop-by-hop, proxy, `accept-encoding` (the broker
/// asks for an identity body so it can scrub it), `range`/`if-range` (slices of an echoed
/// value are too short to recognise, and a few of them rebuild it), and those asking for a
/// digest of the body or an answer that depends on its hash (`want-*digest`, `if-match`,
/// `if-none-match`): a yes/no on a guessed ETag, or a digest, tells the value; and those
/// that make an honest upstream answer in a form the scrubber cannot read
/// (`request-range`, which Apache httpd takes as `range`; `accept-charset`, with which
/// ASP.NET answers in UTF-16).
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
    "accept-encoding",
    "range",
    "if-range",
    "if-match",
    "if-none-match",
    "want-digest",
    "want-content-digest",
    "want-repr-digest",
    "request-range",
    "accept-charset",
    "x-strongroom-on-behalf-of",
];

/// The response headers handed back to the service, unless `[broker]
/// pass_response_headers` names more: what a client needs to read the answer, follow it
/// up (a redirect, pagination, a retry, an authentication challenge) and correlate it, and
/// nothing computed over the body. An allow-list, because the headers an upstream computes
/// over its body (`Content-Length`, `ETag`, digests, checksums, signatures, timings) carry
/// what the body held before it was scrubbed, under names no list of refusals can
/// foresee (`x-adler32`, `x-len`, `x-latency`). `Set-Cookie` is not here: a session an
/// upstream opens for the credential is as good as the credential while it lasts.
const PASSED_BACK: &[&str] = &[
    "content-type",
    "content-language",
    "content-location",
    "location",
    "link",
    "cache-control",
    "expires",
    "pragma",
    "vary",
    "date",
    "last-modified",
    "retry-after",
    "www-authenticate",
    "allow",
    "request-id",
    "x-request-id",
    "x-correlation-id",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-used",
    "x-ratelimit-resource",
];

/// Hop-by-hop response headers: never passed back, even when an operator names them.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-connection",
];

/// Parts of response header names that say the value is computed over the body (a length or
/// size, a slice, a hash, checksum, signature or MAC, a time that grows with it, as services
/// name theirs: `x-amz-checksum-sha256`, `x-goog-hash`, `x-amzn-remapped-content-length`,
/// `content-range`, `x-jws-signature`, `x-response-time`, `openai-processing-ms`): an
/// operator's `pass_response_headers` may not name such a header. A check of the operator's
/// choice, not the defence: names are not bound to tell what they carry, which is why only
/// listed names pass (with an upstream that echoes the value, a service can test guesses of
/// it anyway: see the README).
const BODY_DERIVED_NAME_PARTS: &[&str] = &[
    "length",
    "len",
    "size",
    "bytes",
    "range",
    "etag",
    "tag",
    "digest",
    "checksum",
    "cksum",
    "sum",
    "hash",
    "md5",
    "crc",
    "adler",
    "xxh",
    "sha",
    "blake",
    "signature",
    "-sig",
    "hmac",
    "-mac",
    "jws",
    "fingerprint",
    "integrity",
    "timing",
    "time",
    "took",
    "elapsed",
    "duration",
    "latency",
    "-ms",
];

/// A response header name that `[broker] pass_response_headers` adds to [`PASSED_BACK`].
/// Lower-case, as HTTP/2 and hyper give names. Exact names only: a pattern (`x-foo-*`) would
/// pass back whatever an upstream chooses to call a header under it, digests included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassedHeader(String);

impl PassedHeader {
    /// Checks an operator's entry: a header name, not a pattern, not a hop-by-hop header, and
    /// not one whose name says it is computed over the body.
    ///
    /// # Errors
    ///
    /// Why the entry is refused (the entry is the operator's, never a secret).
    pub fn parse(entry: &str) -> Result<Self, String> {
        let name = entry.to_ascii_lowercase();
        if name.contains('*') {
            return Err(format!(
                "{entry:?}: name each header (no patterns): a pattern passes back whatever an \
                 upstream calls a header under it, digests of the body included"
            ));
        }
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("{entry:?} is not a header name"));
        }
        if HOP_BY_HOP.contains(&name.as_str()) {
            return Err(format!("{entry:?} is a hop-by-hop header"));
        }
        if let Some(part) = BODY_DERIVED_NAME_PARTS.iter().find(|p| name.contains(*p)) {
            return Err(format!(
                "{entry:?} names a header computed over the body (its name holds {part:?}): \
                 it would tell what the body held before the value was scrubbed out"
            ));
        }
        Ok(Self(name))
    }
}

/// Whether a response header is handed back to the service: on the allow-list
/// ([`PASSED_BACK`] and the operator's `extra`).
fn passed_back(name: &str, extra: &[PassedHeader]) -> bool {
    PASSED_BACK.contains(&name) || extra.iter().any(|e| e.0 == name)
}

/// The use case. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Broker {
    settings: BrokerSettings,
    transport: Arc<dyn Transport>,
    in_flight: Arc<InFlight>,
}

impl Broker {
    /// A broker with the real HTTPS client.
    ///
    /// # Errors
    ///
    /// A message when the CA file cannot be used.
    pub fn new(settings: BrokerSettings) -> Result<Self, String> {
        let client = HttpsClient::new(settings.ca_file.as_deref(), settings.connect_timeout)?;
        Ok(Self::with_transport(settings, Arc::new(client)))
    }

    /// A broker over another transport.
    pub fn with_transport(settings: BrokerSettings, transport: Arc<dyn Transport>) -> Self {
        Self {
            settings,
            transport,
            in_flight: Arc::default(),
        }
    }

    /// This broker, counting the calls `previous` has in flight as its own: a reload's new
    /// broker, so that calls under way still count against the limits (a reload with fresh
    /// counts would let as many calls again through each time).
    #[must_use]
    pub fn keeping_calls_of(mut self, previous: &Broker) -> Self {
        self.in_flight = previous.in_flight.clone();
        self
    }

    /// The settings.
    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// A place for one call of `service` among those in flight (step 0, before the value is
    /// read), or [`BrokerError::Busy`] at once: waiting would hold the request, and its
    /// connection, for a place that may not come before the caller's own timeout.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Busy`].
    pub fn admit(&self, service: &str) -> Result<CallSlot, BrokerError> {
        let per_service = self.settings.max_concurrent_calls_per_service.max(1);
        let in_all = self.settings.max_concurrent_calls.max(1);
        let mut counts = self.in_flight.counts();
        let mine = counts.by_service.get(service).copied().unwrap_or(0);
        if mine >= per_service {
            return Err(BrokerError::Busy(Busy::Service(per_service)));
        }
        if counts.total >= in_all {
            return Err(BrokerError::Busy(Busy::Server(in_all)));
        }
        counts.total += 1;
        counts.by_service.insert(service.to_owned(), mine + 1);
        Ok(CallSlot {
            _place: Arc::new(Place {
                in_flight: self.in_flight.clone(),
                service: service.to_owned(),
            }),
        })
    }

    /// Checks the request's shape (step 1).
    ///
    /// # Errors
    ///
    /// [`BrokerError::BadRequest`] naming the field, [`BrokerError::BodyTooLarge`].
    pub fn prepare(&self, req: BrokerRequest) -> Result<Prepared, BrokerError> {
        let bad = |m: &str| Err(BrokerError::BadRequest(m.to_owned()));
        let method = match req.method.as_str() {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            _ => return bad("method must be GET, POST, PUT, PATCH or DELETE"),
        };
        if req.url.len() > MAX_URL_LEN {
            return bad("url longer than 8 KiB");
        }
        let Ok(mut url) = url::Url::parse(&req.url) else {
            return bad("url is not an absolute URL");
        };
        if url.scheme() != "https" {
            return bad("url must use https (brokered calls never go over plain HTTP)");
        }
        if !url.username().is_empty() || url.password().is_some() {
            return bad("url must not hold a user name or password");
        }
        url.set_fragment(None);
        let Some(destination) = Destination::of(&url) else {
            return bad("url has no host");
        };
        if destination.port() == 0 {
            return bad("url port must be 1 to 65535");
        }
        // The request line must hold the path and query exactly as parsed.
        let origin = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        if http::uri::PathAndQuery::try_from(origin.as_str()).is_err() {
            return bad("url path or query holds characters that cannot be sent");
        }
        if req.body.len() > self.settings.max_request_body_bytes {
            return Err(BrokerError::BodyTooLarge(
                self.settings.max_request_body_bytes,
            ));
        }

        let injected_header = match &req.inject {
            Injection::Header { name, format } => {
                check_format(format.as_deref())?;
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    BrokerError::BadRequest("inject.header is not a header name".into())
                })?;
                if RESERVED_HEADERS.contains(&name.as_str()) {
                    return bad("inject.header names a header Strongroom sets itself");
                }
                Some(name)
            }
            Injection::Query { name, format } => {
                check_format(format.as_deref())?;
                let ok = !name.is_empty()
                    && name.len() <= 128
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~[]".contains(&b));
                if !ok {
                    return bad("inject.query must be 1 to 128 of [A-Za-z0-9-._~[]]");
                }
                if url.query_pairs().any(|(k, _)| k == name.as_str()) {
                    return bad("url already has the query parameter inject.query names");
                }
                None
            }
            Injection::Basic { username } => {
                if username.contains(':') || username.len() > 256 {
                    return bad("inject.basic.username must not contain ':' (at most 256 bytes)");
                }
                Some(http::header::AUTHORIZATION)
            }
        };

        if req.headers.len() > MAX_HEADERS {
            return bad("at most 64 headers");
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &req.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| BrokerError::BadRequest("headers: not a header name".into()))?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(BrokerError::BadRequest(format!(
                    "headers: {name} is set by Strongroom or not forwarded by it"
                )));
            }
            if injected_header.as_ref() == Some(&name) {
                return Err(BrokerError::BadRequest(format!(
                    "headers: {name} is where the credential is injected; the caller may not set it"
                )));
            }
            let value = HeaderValue::from_str(value).map_err(|_| {
                BrokerError::BadRequest(format!("headers: the value of {name} is not valid"))
            })?;
            headers.append(name, value);
        }
        Ok(Prepared {
            method,
            url,
            destination,
            headers,
            body: Bytes::from(req.body),
            inject: req.inject,
            version: req.version,
            slot: None,
        })
    }

    /// The credential version to use, checked against its bound host, and its value (step 3).
    /// Nothing is decrypted unless the destination matches the bound host.
    ///
    /// # Errors
    ///
    /// [`CoreError::NotFound`], [`CoreError::Disabled`], [`CoreError::VersionDestroyed`] (as
    /// for reveal), [`BrokerError::Unbound`], [`BrokerError::DestinationForbidden`], and
    /// store/provider errors.
    pub async fn load(
        &self,
        vault: &Vault,
        owner: &str,
        name: &str,
        prepared: &Prepared,
    ) -> Result<Loaded, BrokerError> {
        if let Some(v) = prepared.version {
            crate::vault::check_version(v)?;
        }
        // One version at a time, never the whole history: a credential may hold thousands
        // of destroyed versions, and every brokered call reads this.
        let newest = vault.describe_page(owner, name, None, 1).await?;
        if !newest.summary.enabled {
            return Err(CoreError::Disabled.into());
        }
        // No current version: every version was destroyed (410, as a reveal answers).
        let version = prepared.version.or(newest.summary.current_version).ok_or(
            if newest.versions.is_empty() {
                CoreError::NotFound
            } else {
                CoreError::VersionDestroyed
            },
        )?;
        let credential = if newest
            .versions
            .first()
            .is_some_and(|v| v.version == version)
        {
            newest
        } else {
            // The page below `version + 1` starts with `version` if it exists.
            let below = version.checked_add(1).ok_or(CoreError::NotFound)?;
            vault.describe_page(owner, name, Some(below), 1).await?
        };
        let info = credential
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or(CoreError::NotFound)?;
        if info.state == VersionState::Destroyed {
            return Err(CoreError::VersionDestroyed.into());
        }
        // Metadata that does not read names no host, but not because its owner bound none.
        if info.metadata_unreadable {
            return Err(CoreError::Integrity {
                version: Some(version),
            }
            .into());
        }
        let (bound, bound_text) = match info.metadata.get(BOUND_HOST_KEY) {
            None | Some(serde_json::Value::Null) => {
                return Err(BrokerError::Unbound(format!(
                    "version {version} names no host it is for (metadata.{BOUND_HOST_KEY}); a credential is brokered only to the host its owner bound it to"
                )))
            }
            Some(serde_json::Value::String(s)) => (
                DestinationPattern::parse(s).map_err(|e| {
                    BrokerError::Unbound(format!(
                        "version {version}: metadata.{BOUND_HOST_KEY}: {e}"
                    ))
                })?,
                s.clone(),
            ),
            Some(_) => {
                return Err(BrokerError::Unbound(format!(
                    "version {version}: metadata.{BOUND_HOST_KEY} must be a string such as \"api.zoom.us\""
                )))
            }
        };
        if !bound.matches(&prepared.destination) {
            return Err(BrokerError::DestinationForbidden(format!(
                "{} is not the host version {version} of this credential is bound to",
                prepared.destination
            )));
        }
        // Versions are immutable: the one checked is the one opened.
        let revealed = vault.reveal(owner, name, Some(version)).await?;
        // The host checked above was read apart from the row opened (the row may come from
        // the store's cache): the call goes ahead only if the host sealed with the value is
        // that one. A host edited in the database otherwise passed the check while the
        // genuine row, cached, opened.
        match revealed.bound_host.as_deref() {
            Some(sealed) if sealed == bound_text => {}
            Some(_) => {
                return Err(CoreError::Integrity {
                    version: Some(version),
                }
                .into())
            }
            None => {
                return Err(BrokerError::Unbound(format!(
                    "version {version} was sealed without its host (before hosts were bound, \
                     or its metadata.{BOUND_HOST_KEY} was added in the database since): put it \
                     again to broker it"
                )))
            }
        }
        Ok(Loaded {
            value: revealed.value,
            version: revealed.version,
            read: revealed.read,
        })
    }

    /// Resolves the destination and checks every address (step 4).
    ///
    /// # Errors
    ///
    /// [`BrokerError::DestinationForbidden`] for a refused address,
    /// [`BrokerError::Upstream`] when the name does not resolve, [`BrokerError::Timeout`].
    pub async fn resolve(&self, prepared: &Prepared) -> Result<Target, BrokerError> {
        let dest = &prepared.destination;
        // The system resolver cannot be cancelled: a lookup that times out goes on in its
        // thread, holding the call's place until it ends, so that names whose servers never
        // answer fill their service's share of places, not the blocking pool.
        let place = prepared.slot.clone();
        let (host, port) = (dest.bare_host().to_owned(), dest.port());
        let lookup = async move {
            tokio::task::spawn_blocking(move || {
                let _place = place;
                std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                    .map(Iterator::collect)
            })
            .await
            .map_err(std::io::Error::other)?
        };
        self.resolve_with(prepared, lookup).await
    }

    /// [`Broker::resolve`] with the name looked up by `lookup` (unused for an IP literal).
    async fn resolve_with(
        &self,
        prepared: &Prepared,
        lookup: impl std::future::Future<Output = std::io::Result<Vec<SocketAddr>>>,
    ) -> Result<Target, BrokerError> {
        // The broker's timeout bounds the whole call, DNS included.
        let started = tokio::time::Instant::now();
        let dest = &prepared.destination;
        let server_name = match dest.ip() {
            Some(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
            None => rustls::pki_types::ServerName::try_from(dest.bare_host().to_owned())
                .map_err(|_| BrokerError::BadRequest("url host is not a valid name".into()))?,
        };
        let addrs: Vec<SocketAddr> = match dest.ip() {
            Some(ip) => vec![SocketAddr::new(ip, dest.port())],
            None => {
                let limit = self.settings.connect_timeout.min(self.settings.timeout);
                tokio::time::timeout(limit, lookup)
                    .await
                    .map_err(|_| BrokerError::Timeout)?
                    .map_err(|e| BrokerError::Upstream {
                        stage: UpstreamStage::Resolve,
                        cause: format!("{} does not resolve: {e}", dest.host()),
                    })?
            }
        };
        if addrs.is_empty() {
            return Err(BrokerError::Upstream {
                stage: UpstreamStage::Resolve,
                cause: format!("{} has no address", dest.host()),
            });
        }
        // Every address must pass: a name that also points inside is refused as a whole.
        for a in &addrs {
            if let Some(why) = net::refused(a.ip(), self.settings.allow_private_networks) {
                return Err(BrokerError::DestinationForbidden(format!(
                    "{} resolves to {why}; brokered calls go only to public addresses",
                    dest.host()
                )));
            }
        }
        let time_left = self.settings.timeout.saturating_sub(started.elapsed());
        if time_left.is_zero() {
            return Err(BrokerError::Timeout);
        }
        Ok(Target {
            server_name,
            addrs,
            time_left,
        })
    }

    /// Builds the request with the value in it (step 5), before the call is audited as made:
    /// a value that cannot go where it was asked to is refused while nothing was sent.
    ///
    /// # Errors
    ///
    /// [`BrokerError::ValueUnusable`], [`BrokerError::BadRequest`].
    pub fn inject(&self, prepared: Prepared, loaded: Loaded) -> Result<Call, BrokerError> {
        let version = loaded.version;
        let value = loaded.value.expose_secret();
        let render = |format: &Option<String>| -> Zeroizing<Vec<u8>> {
            let format = format.as_deref().unwrap_or(PLACEHOLDER);
            let (before, after) = format.split_once(PLACEHOLDER).unwrap_or((format, ""));
            let mut out = Zeroizing::new(Vec::with_capacity(format.len() + value.len()));
            out.extend_from_slice(before.as_bytes());
            out.extend_from_slice(value);
            out.extend_from_slice(after.as_bytes());
            out
        };
        let mut path = prepared.url.path().to_owned();
        if let Some(q) = prepared.url.query() {
            path.push('?');
            path.push_str(q);
        }
        let mut path = Zeroizing::new(path);
        let mut headers = prepared.headers;
        let mut extra: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        match &prepared.inject {
            Injection::Header { name, format } => {
                let rendered = render(format);
                let mut v = HeaderValue::from_bytes(&rendered).map_err(|_| {
                    BrokerError::ValueUnusable("the value cannot be sent in a header")
                })?;
                v.set_sensitive(true);
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    BrokerError::BadRequest("inject.header is not a header name".into())
                })?;
                headers.insert(name, v);
                extra.push(rendered);
            }
            Injection::Query { name, format } => {
                let rendered = render(format);
                // Room for the worst case (every byte percent-encoded) first: a `String`
                // that grows while the value goes in leaves copies in what it frees.
                path.reserve(2 + name.len() + 3 * rendered.len());
                path.push(if prepared.url.query().is_some() {
                    '&'
                } else {
                    '?'
                });
                path.push_str(name);
                path.push('=');
                path.extend(url::form_urlencoded::byte_serialize(&rendered));
                extra.push(rendered);
            }
            Injection::Basic { username } => {
                use base64::Engine;
                let mut pair = Zeroizing::new(Vec::with_capacity(username.len() + 1 + value.len()));
                pair.extend_from_slice(username.as_bytes());
                pair.push(b':');
                pair.extend_from_slice(value);
                // Encoded straight into a buffer of its final size, zeroized on drop (a
                // temporary `String` from `encode` would be freed as it is).
                let prefix = b"Basic ";
                let mut header =
                    Zeroizing::new(vec![0u8; prefix.len() + pair.len().div_ceil(3) * 4]);
                header[..prefix.len()].copy_from_slice(prefix);
                let written = base64::engine::general_purpose::STANDARD
                    .encode_slice(&*pair, &mut header[prefix.len()..])
                    .map_err(|_| {
                        BrokerError::ValueUnusable("the value cannot be sent in a header")
                    })?;
                header.truncate(prefix.len() + written);
                let mut v = HeaderValue::from_bytes(&header).map_err(|_| {
                    BrokerError::ValueUnusable("the value cannot be sent in a header")
                })?;
                v.set_sensitive(true);
                headers.insert(http::header::AUTHORIZATION, v);
                extra.push(pair);
            }
        }
        let needles = scrub::Needles::new(
            value,
            &extra.iter().map(|e| e.as_slice()).collect::<Vec<_>>(),
        );
        drop(extra);

        let dest = &prepared.destination;
        let host = if dest.port() == 443 {
            dest.host().to_owned()
        } else {
            format!("{}:{}", dest.host(), dest.port())
        };
        headers.insert(
            http::header::HOST,
            HeaderValue::from_str(&host)
                .map_err(|_| BrokerError::BadRequest("url host is not valid".into()))?,
        );
        headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if !headers.contains_key(http::header::USER_AGENT) {
            headers.insert(
                http::header::USER_AGENT,
                HeaderValue::from_static(concat!("strongroom-broker/", env!("CARGO_PKG_VERSION"))),
            );
        }
        let mut request = http::Request::builder()
            .method(prepared.method)
            .uri(path.as_str())
            .body(prepared.body)
            .map_err(|_| BrokerError::BadRequest("url path is not valid".into()))?;
        *request.headers_mut() = headers;
        Ok(Call {
            request,
            needles,
            version,
            read: loaded.read,
            slot: prepared.slot,
        })
    }

    /// Sends, and scrubs the answer (step 7).
    ///
    /// # Errors
    ///
    /// [`BrokerError::Upstream`], [`BrokerError::Timeout`], [`BrokerError::TooLarge`],
    /// [`BrokerError::Encoded`], [`BrokerError::Unchecked`].
    pub async fn send(&self, call: Call, target: &Target) -> Result<BrokerResponse, BrokerError> {
        let Call {
            request,
            needles,
            version,
            slot,
            ..
        } = call;
        let response = tokio::time::timeout(
            target.time_left,
            self.transport
                .send(target, request, self.settings.max_response_bytes),
        )
        .await
        .map_err(|_| BrokerError::Timeout)?
        .map_err(|e| match e {
            TransportError::Timeout => BrokerError::Timeout,
            TransportError::TooLarge(n) => BrokerError::TooLarge(n),
            TransportError::Connect(cause) => BrokerError::Upstream {
                stage: UpstreamStage::Connect,
                cause,
            },
            TransportError::Tls(cause) => BrokerError::Upstream {
                stage: UpstreamStage::Tls,
                cause,
            },
            TransportError::Protocol(cause) => BrokerError::Upstream {
                stage: UpstreamStage::Http,
                cause,
            },
        })?;

        // The body must be what it looks like, or the value inside it cannot be found: every
        // `Content-Encoding` header (a second one must not hide a gzip behind "identity")
        // and every transfer coding but `chunked` (which hyper removes; `gzip, chunked`
        // would come through compressed).
        let encoded_by = [
            (http::header::CONTENT_ENCODING, "Content-Encoding"),
            (http::header::TRANSFER_ENCODING, "Transfer-Encoding"),
        ]
        .into_iter()
        .find(|(name, _)| {
            response.headers.get_all(name).iter().any(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .any(|c| !c.is_empty() && c != "identity" && c != "chunked")
            })
        });
        if let Some((_, header)) = encoded_by {
            if !response.body.is_empty() {
                return Err(BrokerError::Encoded(header));
            }
        }
        // Scrubbing a large body is CPU work: off the async workers, so other requests (and
        // other calls' timeouts) do not wait behind it.
        let status = response.status.as_u16();
        let pass_response_headers = self.settings.pass_response_headers.clone();
        tokio::task::spawn_blocking(move || {
            // Held until the search ends, even if the call was given up meanwhile.
            let _place = slot;
            let mut redacted = false;
            let mut out_headers: Vec<(String, String)> = Vec::new();
            for name in response.headers.keys() {
                if !passed_back(name.as_str(), &pass_response_headers) {
                    continue;
                }
                let joined = response
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect::<Vec<_>>()
                    .join(&b", "[..]);
                let (value, a) = needles.scrub_all(&joined)?;
                let (name, b) = needles.scrub_all(name.as_str().as_bytes())?;
                redacted |= a || b;
                out_headers.push((
                    String::from_utf8_lossy(&name).into_owned(),
                    String::from_utf8_lossy(&value).into_owned(),
                ));
            }
            let (body, changed) = needles.scrub_all(&response.body)?;
            redacted |= changed;
            Ok(BrokerResponse {
                status,
                headers: out_headers,
                body,
                version,
                redacted,
            })
        })
        .await
        .map_err(|_| CoreError::Internal("scrubbing the response failed".into()))?
        .map_err(|_: scrub::Unchecked| BrokerError::Unchecked)
    }
}

/// Checks a new version's `metadata.host` (when present): a [`DestinationPattern`], so a
/// mistake such as `"https://api.zoom.us/"` is refused when stored rather than when used.
///
/// # Errors
///
/// A message naming the key and the expected form.
pub fn check_bound_host(metadata: Option<&serde_json::Value>) -> Result<(), String> {
    match metadata.and_then(|m| m.get(BOUND_HOST_KEY)) {
        None | Some(serde_json::Value::Null) => Ok(()),
        // Not the parser's message: it quotes the text, which is the caller's own input here.
        Some(serde_json::Value::String(s)) => {
            DestinationPattern::parse(s).map(|_| ()).map_err(|_| {
                format!(
                    "metadata.{BOUND_HOST_KEY} is not a destination: use host, host:port, host:*, \
                 *.domain or * (no scheme or path)"
                )
            })
        }
        Some(_) => Err(format!(
            "metadata.{BOUND_HOST_KEY} must be a string such as \"api.zoom.us\""
        )),
    }
}

fn check_format(format: Option<&str>) -> Result<(), BrokerError> {
    let Some(f) = format else { return Ok(()) };
    if f.len() > 256 {
        return Err(BrokerError::BadRequest(
            "inject.format longer than 256 bytes".into(),
        ));
    }
    if f.matches(PLACEHOLDER).count() != 1 {
        return Err(BrokerError::BadRequest(
            "inject.format must hold {value} exactly once".into(),
        ));
    }
    // Refused with the request's shape, before the value is opened (and the use audited),
    // rather than later as a value that "cannot be sent in a header".
    if f.chars().any(|c| c.is_control() && c != '\t') {
        return Err(BrokerError::BadRequest(
            "inject.format must not hold control characters (CR, LF, ...)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the allow-listed response headers are handed back: not those computed over the
    /// body (by whatever name), nor any other an upstream invents.
    #[test]
    fn only_allow_listed_headers_are_passed_back() {
        for name in [
            "content-length",
            "etag",
            "x-amz-checksum-sha256",
            "x-goog-hash",
            "content-range",
            "content-md5",
            "repr-digest",
            "server-timing",
            // Body-derived names no refusal list caught.
            "x-adler32",
            "x-len",
            "x-latency",
            "x-anything",
            "set-cookie",
            "connection",
        ] {
            assert!(!passed_back(name, &[]), "{name}");
        }
        for name in [
            "content-type",
            "date",
            "location",
            "link",
            "retry-after",
            "www-authenticate",
            "x-request-id",
            "x-ratelimit-remaining",
        ] {
            assert!(passed_back(name, &[]), "{name}");
        }
        // The defaults themselves are neither hop-by-hop nor body-derived by name.
        for name in PASSED_BACK {
            assert!(PassedHeader::parse(name).is_ok(), "{name}");
        }
    }

    /// An operator's extra names are passed back; patterns, hop-by-hop headers and names
    /// that speak of the body are refused as entries.
    #[test]
    fn operator_extras_are_exact_names_and_never_body_derived_ones() {
        let extra: Vec<PassedHeader> = ["X-GitHub-Request-Id", "x-amz-request-id"]
            .iter()
            .map(|e| PassedHeader::parse(e).unwrap())
            .collect();
        assert!(passed_back("x-github-request-id", &extra));
        assert!(passed_back("x-amz-request-id", &extra));
        assert!(!passed_back("x-amz-checksum-crc32", &extra));
        assert!(!passed_back("x-github-other", &extra));

        for refused in [
            "etag",
            "Content-Length",
            "x-amz-*",
            "x-foo-*",
            "*",
            "x-*-id",
            "x-response-time",
            "openai-processing-ms",
            "x-foo-sum",
            "x-foo-len",
            "x-foo-adler32",
            "x-foo-latency",
            "x-foo-tag",
            "x-foo-cksum",
            "x-foo-xxh64",
            "connection",
            "x y",
            "",
        ] {
            assert!(PassedHeader::parse(refused).is_err(), "{refused:?}");
        }
    }

    #[derive(Debug)]
    struct NoTransport;

    #[async_trait::async_trait]
    impl Transport for NoTransport {
        async fn send(
            &self,
            _: &Target,
            _: http::Request<Bytes>,
            _: usize,
        ) -> Result<UpstreamResponse, TransportError> {
            Err(TransportError::Connect("not in these tests".into()))
        }
    }

    /// A broker whose `timeout` is shorter than its `connect_timeout`, and a request for it.
    fn broker_and_request(timeout: Duration) -> (Broker, Prepared) {
        let settings = BrokerSettings {
            connect_timeout: Duration::from_secs(300),
            timeout,
            ..BrokerSettings::default()
        };
        let broker = Broker::with_transport(settings, Arc::new(NoTransport));
        let prepared = broker.prepare(get("https://api.example.com/")).unwrap();
        (broker, prepared)
    }

    /// A GET of `url` with the value in `X-Api-Key`.
    fn get(url: &str) -> BrokerRequest {
        BrokerRequest {
            method: "GET".into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            inject: Injection::Header {
                name: "X-Api-Key".into(),
                format: None,
            },
            version: None,
        }
    }

    async fn slow_lookup(delay: Duration) -> std::io::Result<Vec<SocketAddr>> {
        tokio::time::sleep(delay).await;
        Ok(vec!["93.184.216.34:443".parse().unwrap()])
    }

    #[tokio::test]
    async fn the_name_lookup_counts_in_the_broker_timeout() {
        // A lookup longer than the whole call's timeout (though within connect_timeout).
        let (broker, prepared) = broker_and_request(Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        let r = broker
            .resolve_with(&prepared, slow_lookup(Duration::from_secs(5)))
            .await;
        assert!(matches!(r, Err(BrokerError::Timeout)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));

        // A slow one leaves only the rest of the timeout to the call.
        let (broker, prepared) = broker_and_request(Duration::from_secs(1));
        let target = broker
            .resolve_with(&prepared, slow_lookup(Duration::from_millis(400)))
            .await
            .unwrap();
        assert!(target.time_left <= Duration::from_millis(600), "{target:?}");
    }

    /// Places for calls: one service cannot take more than its share, all together no more
    /// than the server's, and a place dropped is free again.
    #[test]
    fn calls_in_flight_are_bounded_per_service_and_in_all() {
        let settings = BrokerSettings {
            max_concurrent_calls: 3,
            max_concurrent_calls_per_service: 2,
            ..BrokerSettings::default()
        };
        let broker = Broker::with_transport(settings, Arc::new(NoTransport));
        let a1 = broker.admit("billing").unwrap();
        let a2 = broker.admit("billing").unwrap();
        let busy = |r: Result<CallSlot, BrokerError>| match r {
            Err(BrokerError::Busy(b)) => b,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("admitted"),
        };
        assert_eq!(busy(broker.admit("billing")), Busy::Service(2));
        let b1 = broker.admit("reports").unwrap();
        assert_eq!(busy(broker.admit("reports")), Busy::Server(3));
        // A refusal by the server's bound took no place of the service's.
        drop(a1);
        let b2 = broker.admit("reports").unwrap();
        assert_eq!(busy(broker.admit("billing")), Busy::Server(3));
        drop((a2, b1, b2));
        let again: Vec<_> = (0..2).map(|_| broker.admit("billing").unwrap()).collect();
        assert_eq!(again.len(), 2);
        assert!(broker.in_flight.counts().by_service["billing"] == 2);
        drop(again);
        assert!(broker.in_flight.counts().by_service.is_empty());
    }

    /// A reload's new broker counts the calls the old one has in flight: they hold their
    /// places against the new limits, and give them back to it.
    #[test]
    fn a_reloaded_broker_counts_the_calls_already_in_flight() {
        let limits = |in_all, per_service| BrokerSettings {
            max_concurrent_calls: in_all,
            max_concurrent_calls_per_service: per_service,
            ..BrokerSettings::default()
        };
        let old = Broker::with_transport(limits(3, 2), Arc::new(NoTransport));
        let running = [old.admit("billing").unwrap(), old.admit("billing").unwrap()];
        let new =
            Broker::with_transport(limits(3, 2), Arc::new(NoTransport)).keeping_calls_of(&old);
        assert!(matches!(
            new.admit("billing"),
            Err(BrokerError::Busy(Busy::Service(2)))
        ));
        let lower =
            Broker::with_transport(limits(2, 2), Arc::new(NoTransport)).keeping_calls_of(&new);
        assert!(matches!(
            lower.admit("reports"),
            Err(BrokerError::Busy(Busy::Server(2)))
        ));
        drop(running);
        drop(lower.admit("billing").unwrap());
    }

    /// A place is shared by the call's parts: held by the prepared request (and from it by
    /// the name lookup, the call and the search of its answer), it stays taken after the
    /// handler's own handle is gone, and is given back with the last one.
    #[tokio::test]
    async fn a_call_keeps_its_place_while_any_part_of_it_runs() {
        let settings = BrokerSettings {
            max_concurrent_calls: 1,
            allow_private_networks: true,
            ..BrokerSettings::default()
        };
        let broker = Broker::with_transport(settings, Arc::new(NoTransport));
        let slot = broker.admit("billing").unwrap();
        let mut prepared = broker.prepare(get("https://localhost/")).unwrap();
        prepared.hold(&slot);
        drop(slot);
        assert!(matches!(
            broker.admit("reports"),
            Err(BrokerError::Busy(Busy::Server(1)))
        ));
        // The lookup holds a share of it while it runs, and gives it back when it ends.
        broker.resolve(&prepared).await.unwrap();
        assert_eq!(broker.in_flight.counts().by_service["billing"], 1);
        drop(prepared);
        assert!(broker.in_flight.counts().by_service.is_empty());
        drop(broker.admit("reports").unwrap());
    }
}
