//! Deadlines no client can hold off: a connection's first request must begin within the
//! handshake timeout, an HTTP/1 request's head must arrive within it once its first byte has,
//! and a connection with no request in flight is closed after the idle timeout.
//!
//! hyper's own HTTP/1 `header_read_timeout` is not used: it starts as soon as hyper waits for
//! the next head, so it closed every idle keep-alive connection at the handshake timeout, long
//! before the idle timeout. Nor does it bound the wait before a first request: a client that
//! completes the TLS handshake and then sends nothing, or one byte that could begin either
//! protocol (`P`: `POST` or the HTTP/2 preface) so that the `auto` builder waits to tell them
//! apart, or an HTTP/2 preface and then only PING answers. Each holds one of
//! `limits.max_connections` slots, so a few such sockets could lock everyone out.
//! [`Activity`] counts a connection's requests as the service sees them, so only requests
//! (not bytes, not pings) keep a connection open; [`Watched`] notes when the bytes of an
//! HTTP/1 head begin to arrive.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// No head under way.
const NO_HEAD: u64 = u64::MAX;

/// What one connection's requests have been doing.
pub(crate) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    any: AtomicBool,
    /// When the last request ended, in milliseconds after `opened`.
    last_done_ms: AtomicU64,
    /// When bytes began to arrive with no request in flight (an HTTP/1 head under way), in
    /// milliseconds after `opened`, or [`NO_HEAD`].
    head_began_ms: AtomicU64,
    /// Wakes [`Activity::expired`] when a head begins (an earlier deadline than it sleeps to).
    head_began: Notify,
}

/// One request in flight; dropping it (the response future done or dropped) ends it.
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_done_ms.store(a.elapsed_ms(), Ordering::Relaxed);
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
            head_began_ms: AtomicU64::new(NO_HEAD),
            head_began: Notify::new(),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(NO_HEAD - 1)
    }

    /// A request begins.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.any.store(true, Ordering::Relaxed);
        self.head_began_ms.store(NO_HEAD, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Acquire);
        InFlight(self.clone())
    }

    /// Bytes arrived on an HTTP/1 connection. With no request in flight they are the start
    /// of the next head, which must be whole within the head timeout. (Bytes that arrive
    /// during a request, its body or a pipelined head, are bounded by the idle timeout.)
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.any.load(Ordering::Relaxed)
            && self.head_began_ms.load(Ordering::Relaxed) == NO_HEAD
        {
            self.head_began_ms
                .store(self.elapsed_ms(), Ordering::Relaxed);
            self.head_began.notify_one();
        }
    }

    /// Resolves when the connection should be closed: no request began within `first` of
    /// opening, a head begun did not become a request within `head`, or no request has been
    /// in flight for `idle`.
    pub(crate) async fn expired(&self, first: Duration, head: Duration, idle: Duration) {
        loop {
            let now = Instant::now();
            let deadline = if self.in_flight.load(Ordering::Acquire) > 0 {
                now + idle
            } else if !self.any.load(Ordering::Relaxed) {
                self.opened + first
            } else {
                let idle_end = self.opened
                    + Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed))
                    + idle;
                match self.head_began_ms.load(Ordering::Relaxed) {
                    NO_HEAD => idle_end,
                    began => idle_end.min(self.opened + Duration::from_millis(began) + head),
                }
            };
            if deadline <= now {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = self.head_began.notified() => {}
            }
        }
    }
}

/// A connection's stream, telling its [`Activity`] when HTTP/1 bytes arrive.
pub(crate) struct Watched<S> {
    inner: S,
    /// `None` for HTTP/2, whose frames (pings, settings) are no request heads.
    activity: Option<Arc<Activity>>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, http1: Option<Arc<Activity>>) -> Self {
        Self {
            inner,
            activity: http1,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(activity)) = (&polled, &self.activity) {
            if buf.filled().len() > before {
                activity.bytes_arrived();
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn no_first_request_or_a_long_idle_expires_a_request_in_flight_never() {
        let (first, head, idle) = (
            Duration::from_secs(10),
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        // Nothing asked: closed at the first-request deadline.
        let silent = Activity::new();
        let t0 = Instant::now();
        silent.expired(first, head, idle).await;
        assert_eq!(t0.elapsed(), first);

        // A request in flight for longer than both keeps it open; once it ends, the idle
        // time counts from its end.
        let busy = Activity::new();
        let request = busy.begin();
        let t0 = Instant::now();
        let watch = {
            let busy = busy.clone();
            tokio::spawn(async move { busy.expired(first, head, idle).await })
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
            tokio::spawn(async move { steady.expired(first, head, idle).await })
        };
        for _ in 0..10 {
            drop(steady.begin());
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        assert!(!watch.is_finished(), "closed although requests kept coming");
    }
}
