//! Deadlines no client can hold off: a connection's first request must begin within the
//! handshake timeout, and a connection with no request in flight is closed after the idle
//! timeout.
//!
//! hyper's HTTP/1 `header_read_timeout` covers a request's head once it is being read, but
//! nothing bounds the wait before that: a client that completes the TLS handshake and then
//! sends nothing, or one byte that could begin either protocol (`P`: `POST` or the HTTP/2
//! preface) so that the `auto` builder waits to tell them apart, or an HTTP/2 preface and
//! then only PING answers. Each holds one of `limits.max_connections` slots, so a few such
//! sockets could lock everyone out. [`Activity`] counts a connection's requests as the
//! service sees them, so only requests (not bytes, not pings) keep a connection open.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// What one connection's requests have been doing.
pub(crate) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    any: AtomicBool,
    /// When the last request ended, in milliseconds after `opened`.
    last_done_ms: AtomicU64,
}

/// One request in flight; dropping it (the response future done or dropped) ends it.
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.last_done_ms.store(ms, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Release);
    }
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            any: AtomicBool::new(false),
            last_done_ms: AtomicU64::new(0),
        })
    }

    /// A request begins.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.any.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Acquire);
        InFlight(self.clone())
    }

    /// Resolves when the connection should be closed: no request began within `first` of
    /// opening, or none has been in flight for `idle`.
    pub(crate) async fn expired(&self, first: Duration, idle: Duration) {
        loop {
            let now = Instant::now();
            let deadline = if self.in_flight.load(Ordering::Acquire) > 0 {
                now + idle
            } else if !self.any.load(Ordering::Relaxed) {
                self.opened + first
            } else {
                self.opened
                    + Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed))
                    + idle
            };
            if deadline <= now {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn no_first_request_or_a_long_idle_expires_a_request_in_flight_never() {
        let (first, idle) = (Duration::from_secs(10), Duration::from_secs(60));
        // Nothing asked: closed at the first-request deadline.
        let silent = Activity::new();
        let t0 = Instant::now();
        silent.expired(first, idle).await;
        assert_eq!(t0.elapsed(), first);

        // A request in flight for longer than both keeps it open; once it ends, the idle
        // time counts from its end.
        let busy = Activity::new();
        let request = busy.begin();
        let t0 = Instant::now();
        let watch = {
            let busy = busy.clone();
            tokio::spawn(async move { busy.expired(first, idle).await })
        };
        tokio::time::sleep(Duration::from_secs(150)).await;
        assert!(!watch.is_finished(), "closed with a request in flight");
        drop(request);
        watch.await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(150) + idle);

        // Requests that keep coming keep it open.
        let steady = Activity::new();
        let watch = {
            let steady = steady.clone();
            tokio::spawn(async move { steady.expired(first, idle).await })
        };
        for _ in 0..10 {
            drop(steady.begin());
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        assert!(!watch.is_finished(), "closed although requests kept coming");
    }
}
