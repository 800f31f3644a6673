//! A deadline for a connection's first byte of HTTP.
//!
//! hyper's HTTP/1 `header_read_timeout` starts only once a request has begun, and hyper
//! waits for the HTTP/2 preface (or, under the `auto` builder, for the bytes that tell the
//! two apart) without any timeout. A client that completes the TLS handshake and then sends
//! nothing would hold one of `limits.max_connections` slots for ever, so a few idle sockets
//! could lock everyone out. [`FirstByteDeadline`] fails the read with `TimedOut` when no
//! byte has arrived by the deadline; once one has, it only passes reads and writes through
//! (hyper's own timeouts take over).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub(crate) struct FirstByteDeadline<S> {
    inner: S,
    /// `None` once the first byte has been read.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> FirstByteDeadline<S> {
    pub(crate) fn new(inner: S, deadline: Instant) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(deadline) = &mut this.deadline {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > filled => this.deadline = None,
                Poll::Ready(_) => {}
                // Registers the timer's waker too, so an idle connection is woken to fail.
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no request within the handshake timeout",
                        )));
                    }
                }
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_idle_stream_times_out_and_one_that_spoke_does_not() {
        let (client, server) = tokio::io::duplex(64);
        let mut idle = FirstByteDeadline::new(server, Instant::now() + Duration::from_millis(50));
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("the deadline never fired")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);

        let (mut client, server) = tokio::io::duplex(64);
        let mut spoke = FirstByteDeadline::new(server, Instant::now() + Duration::from_millis(50));
        client.write_all(b"G").await.unwrap();
        assert_eq!(spoke.read(&mut buf).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b"ET").await.unwrap();
        assert_eq!(
            spoke.read(&mut buf).await.unwrap(),
            2,
            "timed out after a byte came"
        );
    }
}
