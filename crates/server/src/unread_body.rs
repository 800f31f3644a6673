//! HTTP/2 answers that come before the request body is read (a 401, 403, 404 or 413 decided
//! from the head) reach every client whole.
//!
//! When a handler answers without reading the body, h2 ends the stream with
//! `RST_STREAM(NO_ERROR)` after the response, as RFC 9113 §8.1 allows. Some clients treat that
//! as a failure and drop the answer: curl 7.88 (Debian 12's) reports "(92) Stream error in the
//! HTTP/2 framing layer" instead of the 401. So on HTTP/2 the service keeps a handle on the
//! body and, once the handler has answered, reads what is left of it (bounded in bytes and
//! time) before the response goes out; only a body past those bounds still gets the reset.
//!
//! HTTP/1.1 has the same problem with bodies larger than what hyper reads ahead: it answers,
//! then closes the connection with the rest of the body unread, and a client still sending
//! it sees "broken pipe" instead of the answer. So a large HTTP/1 body is drained the same
//! way (small ones, most requests, are in hyper's buffer already and cost nothing here).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Bodies up to this size arrive with their HTTP/1 head, or nearly: hyper deals with what
/// is left of them itself.
const SMALL_HTTP1_BODY: u64 = 16 * 1024;

/// Whether what the handler leaves of this request's body should be read before the answer
/// goes out: every HTTP/2 body, and an HTTP/1 body that may be too large for hyper to drop
/// quietly (declared over [`SMALL_HTTP1_BODY`], or chunked). Never one sent only after
/// `Expect: 100-continue`: reading it would invite a client the server has refused to upload
/// it, and such a client waits for the answer instead of sending.
pub(crate) fn worth_draining<B>(req: &http::Request<B>, http2: bool) -> bool {
    let headers = req.headers();
    if headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        return false;
    }
    http2
        || headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > SMALL_HTTP1_BODY)
}

/// A request body shared between the handler and the service that drains what it left.
pub(crate) struct SharedBody(Arc<Mutex<Incoming>>);

impl SharedBody {
    /// The body to hand to the router, and the service's handle on it.
    pub(crate) fn new(body: Incoming) -> (Self, Leftover) {
        let shared = Arc::new(Mutex::new(body));
        (Self(shared.clone()), Leftover(shared))
    }
}

fn poll_shared(
    body: &Mutex<Incoming>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
    let mut body = body.lock().unwrap_or_else(|e| e.into_inner());
    Pin::new(&mut *body).poll_frame(cx)
}

impl Body for SharedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        poll_shared(&self.0, cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).size_hint()
    }
}

/// The service's handle on a request body.
pub(crate) struct Leftover(Arc<Mutex<Incoming>>);

impl Leftover {
    /// Reads and drops what the handler left of the body: at most `max_bytes`, for at most
    /// `max_wait`. Returns at once when the body was read to its end.
    pub(crate) async fn drain(self, max_bytes: usize, max_wait: Duration) {
        let declared = {
            let body = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if body.is_end_stream() {
                return;
            }
            body.size_hint().exact()
        };
        if declared.is_some_and(|n| n > max_bytes as u64) {
            return;
        }
        let mut read = 0usize;
        let _ = tokio::time::timeout(max_wait, async {
            while read <= max_bytes {
                match std::future::poll_fn(|cx| poll_shared(&self.0, cx)).await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                    Some(Err(_)) | None => return,
                }
            }
        })
        .await;
    }
}
