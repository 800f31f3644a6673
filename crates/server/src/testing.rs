//! A small HTTPS client for tests (feature `testing`): rustls with the `ring` provider and
//! hyper's HTTP/1.1 and HTTP/2 client connections, so a test controls the TLS version, the
//! ALPN offer and the client certificate exactly. One connection per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How a [`TestClient`] is set up.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// PEM of the CA certificate(s) to trust.
    pub ca_pem: Vec<u8>,
    /// TLS versions offered (default both).
    pub versions: Vec<&'static SupportedProtocolVersion>,
    /// ALPN protocols offered (default `h2`, `http/1.1`).
    pub alpn: Vec<Vec<u8>>,
    /// A client certificate chain and key, PEM.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify (default `localhost`).
    pub server_name: String,
}

impl ClientOptions {
    /// Trust `ca_pem`; TLS 1.2 and 1.3; offer `h2` and `http/1.1`; no client certificate.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            ca_pem: ca_pem.into(),
            versions: vec![&rustls::version::TLS13, &rustls::version::TLS12],
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            client_cert: None,
            server_name: "localhost".to_owned(),
        }
    }

    /// Only HTTP/1.1 in ALPN.
    pub fn http1(mut self) -> Self {
        self.alpn = vec![b"http/1.1".to_vec()];
        self
    }

    /// Only `h2` in ALPN.
    pub fn http2(mut self) -> Self {
        self.alpn = vec![b"h2".to_vec()];
        self
    }

    /// Only this TLS version.
    pub fn only(mut self, version: &'static SupportedProtocolVersion) -> Self {
        self.versions = vec![version];
        self
    }

    /// Present this certificate chain and key (PEM).
    pub fn with_client_cert(
        mut self,
        chain_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_cert = Some((chain_pem.into(), key_pem.into()));
        self
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct TestResponse {
    /// Status code.
    pub status: u16,
    /// The HTTP version used.
    pub version: http::Version,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Vec<u8>,
}

impl TestResponse {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTPS client for one server.
#[derive(Clone)]
pub struct TestClient {
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    host: String,
}

impl std::fmt::Debug for TestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TestClient {
    /// A client for `addr`.
    ///
    /// # Errors
    ///
    /// A message when the CA or client certificate PEM is unusable.
    pub fn new(addr: SocketAddr, options: ClientOptions) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&options.ca_pem) {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&options.versions)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match &options.client_cert {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = CertificateDer::pem_slice_iter(chain)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| e.to_string())?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| e.to_string())?
            }
        };
        config.alpn_protocols = options.alpn.clone();
        let server_name =
            ServerName::try_from(options.server_name.clone()).map_err(|e| e.to_string())?;
        Ok(Self {
            config: Arc::new(config),
            addr,
            server_name,
            host: format!("{}:{}", options.server_name, addr.port()),
        })
    }

    /// Opens a connection and completes the TLS handshake; returns the negotiated TLS
    /// version and ALPN protocol.
    ///
    /// # Errors
    ///
    /// The handshake error, as text.
    pub async fn handshake(&self) -> Result<(rustls::ProtocolVersion, Option<Vec<u8>>), String> {
        let stream = self.connect().await?;
        let conn = stream.get_ref().1;
        let version = conn.protocol_version().ok_or("no protocol version")?;
        Ok((version, conn.alpn_protocol().map(<[u8]>::to_vec)))
    }

    /// Opens a connection and completes the TLS handshake, for tests that speak raw
    /// HTTP/1.1 on it (slow requests, partial bodies).
    ///
    /// # Errors
    ///
    /// Connection or handshake errors, as text.
    pub async fn connect_raw(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        self.connect().await
    }

    /// As [`TestClient::connect_raw`], over a TCP connection opened earlier (to hold a
    /// connection accepted before something changes, and handshake after).
    ///
    /// # Errors
    ///
    /// Handshake errors, as text.
    pub async fn handshake_over(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        self.handshake_on(tcp).await
    }

    async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        self.handshake_on(tcp).await
    }

    async fn handshake_on(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let connector = TlsConnector::from(self.config.clone());
        let fut = connector.connect(self.server_name.clone(), tcp);
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(Ok(s)) => {
                // TLS 1.3: a server that rejects the client certificate says so after the
                // client's Finished; a read surfaces that alert.
                Ok(s)
            }
            Ok(Err(e)) => Err(format!("handshake: {e}")),
            Err(_) => Err("handshake: timed out".to_owned()),
        }
    }

    /// Sends one request on a new connection, using HTTP/2 if the server chose `h2`.
    ///
    /// # Errors
    ///
    /// Connection, handshake or protocol errors, as text.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<TestResponse, String> {
        let stream = self.connect().await?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let mut req = http::Request::builder().method(method);
        req = if h2 {
            req.uri(format!("https://{}{path}", self.host))
        } else {
            req.uri(path).header(http::header::HOST, &self.host)
        };
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(
                body.map(<[u8]>::to_vec).unwrap_or_default(),
            )))
            .map_err(|e| e.to_string())?;
        let io = TokioIo::new(stream);
        let resp = if h2 {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            send.send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("http1 handshake: {e}"))?;
            tokio::spawn(conn);
            send.send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?
        };
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes()
            .to_vec();
        Ok(TestResponse {
            status: parts.status.as_u16(),
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    /// `GET path`.
    ///
    /// # Errors
    ///
    /// As [`TestClient::request`].
    pub async fn get(&self, path: &str, bearer: Option<&str>) -> Result<TestResponse, String> {
        let auth = bearer.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        self.request("GET", path, &headers, None).await
    }

    /// `method path` with a JSON body.
    ///
    /// # Errors
    ///
    /// As [`TestClient::request`].
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<TestResponse, String> {
        let auth = bearer.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let body = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        self.request(method, path, &headers, Some(&body)).await
    }
}

/// Sends a plain-HTTP request to `addr` and returns whatever comes back within `wait`
/// (until the server closes): a TLS server must not answer it with HTTP.
pub async fn plain_http_exchange(addr: SocketAddr, wait: Duration) -> Vec<u8> {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return Vec::new();
    };
    let _ = tcp
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, tcp.read_to_end(&mut out)).await;
    out
}
