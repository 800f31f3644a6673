//! Prometheus metrics: requests by route template and status, and latency histograms.
//! Labels are route templates (`/v1/me/credentials/{name}`), never owner ids or names.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::Body as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::{ApiError, AppState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

/// The registry and the API's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    failures: Family<CodeLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    jwks: crate::jwks::JwksMetrics,
    unrecorded: Counter,
    unreadable_metadata: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("strongroom");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~3.3 s
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 16,
            ))
        });
        registry.register(
            "http_requests",
            "HTTP requests by route template and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route template",
            latency.clone(),
        );
        // Every failure counted, where the log has a line for the first of each code in 10 s.
        let failures = Family::<CodeLabels, Counter>::default();
        registry.register(
            "http_request_failures",
            "Requests that failed on the server's side (5xx), by error code: integrity_error \
             (stored data failed its integrity check: alert on it); the others name what did \
             not answer (unavailable, key_unavailable, audit_unavailable, broker_unavailable, \
             timeout) or internal",
            failures.clone(),
        );
        let jwks = crate::jwks::JwksMetrics::default();
        jwks.register(&mut registry);
        let unrecorded = Counter::default();
        registry.register(
            "audit_unrecorded_anonymous",
            "Requests without valid credentials past the per-address audit allowance: counted \
             here and in a warning, not recorded one by one",
            unrecorded.clone(),
        );
        let unreadable_metadata = Counter::default();
        registry.register(
            "unreadable_metadata_listed",
            "Versions listed (to their owner) whose stored metadata does not read: the database \
             was damaged or edited outside Strongroom; alert on it, as on integrity_error",
            unreadable_metadata.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            failures,
            latency,
            jwks,
            unrecorded,
            unreadable_metadata,
        }
    }

    /// Counts a version listed whose stored metadata does not read.
    pub(crate) fn unreadable_metadata_listed(&self) {
        self.unreadable_metadata.inc();
    }

    /// Counts a request without valid credentials that was not recorded in the audit log.
    pub(crate) fn unrecorded_anonymous(&self) {
        self.unrecorded.inc();
    }

    /// Adds a counter that lives outside this crate as a number `read` returns at each
    /// scrape (the server's dropped log lines, the audit copy's unwritten records); `name`
    /// gets the `strongroom_` prefix and, being a counter, the `_total` suffix.
    pub fn register_counter_fn(
        &self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(Box::new(CounterFn {
                name,
                help,
                read: Box::new(read),
            }));
    }

    pub(crate) fn jwks(&self) -> &crate::jwks::JwksMetrics {
        &self.jwks
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// See [`Metrics::register_counter_fn`].
struct CounterFn {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for CounterFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CounterFn")
            .field("name", &self.name)
            .finish()
    }
}

impl prometheus_client::collector::Collector for CounterFn {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let counter = prometheus_client::metrics::counter::ConstCounter::new((self.read)());
        let metric =
            encoder.encode_descriptor(self.name, self.help, None, counter.metric_type())?;
        counter.encode(metric)
    }
}

/// Times and counts every request, and bounds its duration with the configured timeout.
pub(crate) async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(req.method());
    let started = Instant::now();
    let (mut req, body_done) = watch_body(req);
    // How the request ends if the timeout below cuts it short: its audit record says so.
    // The request is held here, so it is dropped only after the answer is noted.
    let cut_short = crate::audit::CutShort::default();
    req.extensions_mut().insert(cut_short.clone());
    let mut request = std::pin::pin!(next.run(req));
    let response = match tokio::time::timeout(state.limits().request_timeout, &mut request).await {
        Ok(r) => r,
        // The client's doing: its body never came in whole.
        Err(_) if !body_done.load(Ordering::Relaxed) => cut_short.answer(ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within limits.request_timeout_seconds ({} s)",
                state.limits().request_timeout.as_secs()
            ),
        )),
        // Logged with the route: a hung store or key provider shows up here first.
        Err(_) => cut_short.answer(ApiError::internal(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "{method} {route} took longer than limits.request_timeout_seconds ({} s): the \
                 store or the key provider did not answer in time",
                state.limits().request_timeout.as_secs()
            ),
        )),
    };
    let m = state.metrics();
    if let Some(code) = crate::error::failure_code(&response) {
        m.failures.get_or_create(&CodeLabels { code }).inc();
    }
    m.requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    m.latency
        .get_or_create(&RouteLabels { method, route })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The request with its body watched: the flag turns true once the body has been read to its
/// end (at once for a request without one).
fn watch_body(req: Request) -> (Request, Arc<AtomicBool>) {
    let done = Arc::new(AtomicBool::new(false));
    let watched = done.clone();
    let req = req.map(|inner| {
        if inner.is_end_stream() {
            watched.store(true, Ordering::Relaxed);
            inner
        } else {
            axum::body::Body::new(WatchedBody {
                inner,
                done: watched,
            })
        }
    });
    (req, done)
}

struct WatchedBody {
    inner: axum::body::Body,
    done: Arc<AtomicBool>,
}

impl http_body::Body for WatchedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.done.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `method` label: the standard methods by name, anything else as `other`. hyper accepts
/// any token as a method, and a label per client-chosen token would let anyone grow the
/// registry (and every scrape) without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}
