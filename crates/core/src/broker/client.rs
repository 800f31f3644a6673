//! The outbound HTTPS client: one HTTP/1.1 connection per call, to an address the broker
//! checked, over rustls (ring) verifying the certificate for the URL's host.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Where to connect: the addresses the broker resolved and checked, and the name the
/// certificate must be valid for.
#[derive(Clone, Debug)]
pub struct Target {
    /// The host name (or IP literal) the certificate is verified against (SNI).
    pub server_name: ServerName<'static>,
    /// Checked addresses, tried in order.
    pub addrs: Vec<SocketAddr>,
    /// What is left of the broker's timeout once the name was resolved: connecting, sending
    /// and reading the answer fit in it.
    pub time_left: Duration,
}

/// What the upstream answered.
#[derive(Debug)]
pub struct UpstreamResponse {
    /// The status.
    pub status: http::StatusCode,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The whole body (at most the configured size).
    pub body: Bytes,
}

/// Why the call failed. The messages never hold the request (which holds the value).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No address accepted a connection.
    #[error("connect: {0}")]
    Connect(String),
    /// The TLS handshake failed (certificate not trusted, wrong name, protocol).
    #[error("TLS: {0}")]
    Tls(String),
    /// Connecting or the whole exchange took too long.
    #[error("timed out")]
    Timeout,
    /// The response body is larger than allowed.
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    /// The upstream broke HTTP.
    #[error("HTTP: {0}")]
    Protocol(String),
}

/// Sends one request to a checked target. [`HttpsClient`] is the real one; the trait keeps
/// the broker's use case independent of sockets.
#[async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Sends `request` (origin-form URI, `Host` set) to `target` and reads the whole
    /// response, at most `max_body` bytes of body.
    async fn send(
        &self,
        target: &Target,
        request: http::Request<Bytes>,
        max_body: usize,
    ) -> Result<UpstreamResponse, TransportError>;
}

/// HTTPS/1.1 over rustls with the ring provider; trusts the system roots plus an optional
/// CA bundle. No proxy, no redirects, no connection reuse.
pub struct HttpsClient {
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl HttpsClient {
    /// A client trusting the system roots and the certificates of `ca_file` (PEM), with a
    /// timeout for connecting (TCP and TLS handshake).
    ///
    /// # Errors
    ///
    /// A message when `ca_file` cannot be read or holds no usable certificate.
    pub fn new(ca_file: Option<&Path>, connect_timeout: Duration) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            use rustls::pki_types::pem::PemObject;
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read CA file {shown}: {e}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("CA file {shown} is not valid PEM: {e}"))?;
            if certs.is_empty() {
                return Err(format!("CA file {shown} holds no certificate"));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {shown} holds an unusable certificate: {e}"))?;
            }
        }
        if roots.is_empty() {
            // Not fatal: a server that never brokers needs no roots; calls fail TLS (502).
            tracing::warn!("broker: no system CA certificates found and no ca_file; brokered calls will fail certificate verification");
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            connect_timeout,
        })
    }

    async fn connect(
        &self,
        target: &Target,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TransportError> {
        let mut last = None;
        let mut tcp = None;
        for addr in &target.addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(format!("{addr}: {e}")),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            TransportError::Connect(last.unwrap_or_else(|| "no address to connect to".into()))
        })?;
        let _ = tcp.set_nodelay(true);
        self.tls
            .connect(target.server_name.clone(), tcp)
            .await
            .map_err(|e| TransportError::Tls(e.to_string()))
    }
}

#[async_trait]
impl Transport for HttpsClient {
    async fn send(
        &self,
        target: &Target,
        request: http::Request<Bytes>,
        max_body: usize,
    ) -> Result<UpstreamResponse, TransportError> {
        let stream = tokio::time::timeout(self.connect_timeout, self.connect(target))
            .await
            .map_err(|_| TransportError::Timeout)??;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        // The connection task ends when `sender` is dropped or the peer closes; aborted on
        // the way out in any case.
        let conn = tokio::spawn(conn);
        let _abort = AbortOnDrop(conn);
        let response = sender
            .send_request(request.map(Full::new))
            .await
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body as u64) {
            return Err(TransportError::TooLarge(max_body));
        }
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    TransportError::TooLarge(max_body)
                } else {
                    TransportError::Protocol(e.to_string())
                }
            })?
            .to_bytes();
        Ok(UpstreamResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
