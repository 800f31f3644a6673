//! A real HTTPS upstream on 127.0.0.1 for brokered-call tests: a throwaway CA (rcgen), a
//! certificate for `localhost` and `127.0.0.1`, hyper over tokio-rustls. It records every
//! request it receives and answers by path:
//!
//! * anything else: 200 JSON echoing the method, URI, headers and body, and the
//!   `Authorization` header again in `x-echo-authorization` and base64 in the body;
//! * `/redirect`: 302 to `https://elsewhere.example/`;
//! * `/big`: a 2 MiB body; `/big-chunked`: the same without a `Content-Length`;
//! * `/slow`: answers after 60 s, past every timeout the tests set;
//! * `/gzip`: a `Content-Encoding: gzip` body; `/gzip2`: the same behind a first
//!   `Content-Encoding: identity`; `/tegzip`: `Transfer-Encoding: gzip, chunked`;
//! * `/binary`: non-UTF-8 bytes;
//! * `/ce-echo`, `/te-echo`: the `Authorization` header's value echoed as the body's
//!   `Content-Encoding` or transfer coding (before `chunked`);
//! * `/digests`: the echo, with the headers servers compute over a body (`ETag`,
//!   `Content-MD5`, `Digest`, `Content-Digest`, `Repr-Digest`, and by names no list
//!   foresees: `x-adler32`, `x-len`, `x-latency`), a `Set-Cookie` and an `x-request-id`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper_util::rt::TokioIo;

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _dir: tempfile::TempDir,
}

impl Upstream {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port())
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request")
    }

    /// Broker settings trusting this upstream's CA, with private networks allowed.
    pub fn settings(&self) -> strongroom_core::broker::BrokerSettings {
        strongroom_core::broker::BrokerSettings {
            allow_private_networks: true,
            ca_file: Some(self.ca_file.clone()),
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            max_response_bytes: 1024 * 1024,
            max_request_body_bytes: 64 * 1024,
            // The echo of the `Authorization` header, to see header values scrubbed.
            pass_response_headers: vec![strongroom_core::broker::PassedHeader::parse(
                "x-echo-authorization",
            )
            .unwrap()],
            ..strongroom_core::broker::BrokerSettings::default()
        }
    }

    /// A broker for these settings.
    pub fn broker(
        &self,
        settings: strongroom_core::broker::BrokerSettings,
    ) -> Arc<strongroom_core::broker::Broker> {
        Arc::new(strongroom_core::broker::Broker::new(settings).unwrap())
    }
}

fn certificates() -> (String, Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    (
        ca_cert.pem(),
        leaf_cert.der().to_vec(),
        leaf_key.serialize_der(),
    )
}

pub async fn start() -> Upstream {
    let (ca_pem, cert_der, key_der) = certificates();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![rustls::pki_types::CertificateDer::from(cert_der)],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key_der.into()),
    )
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen) = (acceptor.clone(), seen2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| handle(req, seen.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        ca_file,
        seen,
        _dir: dir,
    }
}

async fn handle(
    req: http::Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<http::Response<Either<Full<Bytes>, Chunked>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let record = Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: body.to_vec(),
    };
    seen.lock().unwrap().push(record);
    let response = |status: u16| http::Response::builder().status(status);
    if parts.uri.path() == "/big-chunked" {
        return Ok(response(200)
            .body(Either::Right(Chunked(2 * 1024 * 1024)))
            .unwrap());
    }
    let r = match parts.uri.path() {
        "/redirect" => response(302)
            .header("location", "https://elsewhere.example/landing")
            .body(Full::new(Bytes::from_static(b"moved"))),
        "/big" => response(200).body(Full::new(Bytes::from(vec![b'x'; 2 * 1024 * 1024]))),
        // Far past every timeout the tests set (a few seconds), so an answer that came
        // in time never depends on how fast the machine is.
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            response(200).body(Full::new(Bytes::from_static(b"late")))
        }
        "/gzip" => response(200)
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from_static(b"\x1f\x8b\x08\x00not-really"))),
        "/gzip2" => response(200)
            .header("content-encoding", "identity")
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from_static(b"\x1f\x8b\x08\x00not-really"))),
        "/tegzip" => response(200)
            .header("transfer-encoding", "gzip, chunked")
            .body(Full::new(Bytes::from_static(b"\x1f\x8b\x08\x00not-really"))),
        "/binary" => response(200).body(Full::new(Bytes::from_static(b"\xff\xfe\x00bin"))),
        "/ce-echo" | "/te-echo" => {
            let auth = parts.headers.get("authorization").cloned();
            let auth = auth.unwrap_or(http::HeaderValue::from_static("none"));
            let r = if parts.uri.path() == "/ce-echo" {
                response(200).header("content-encoding", auth)
            } else {
                let coding = format!("{}, chunked", String::from_utf8_lossy(auth.as_bytes()));
                response(200).header("transfer-encoding", coding)
            };
            r.body(Full::new(Bytes::from_static(b"\x1f\x8b\x08\x00not-really")))
        }
        _ => {
            let headers: BTreeMap<String, String> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let auth = parts
                .headers
                .get("authorization")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let echo = serde_json::json!({
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
                "authorization_base64": base64::engine::general_purpose::STANDARD.encode(&auth),
            });
            let mut b = response(200).header("content-type", "application/json");
            if let Ok(v) = http::HeaderValue::from_str(&auth) {
                b = b.header("x-echo-authorization", v);
            }
            if parts.uri.path() == "/digests" {
                let body = echo.to_string();
                b = b
                    .header("etag", format!("W/\"{:x}-x\"", body.len()))
                    .header("content-md5", "Q2hlY2sgSW50ZWdyaXR5IQ==")
                    .header(
                        "digest",
                        "sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=",
                    )
                    .header(
                        "content-digest",
                        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
                    )
                    .header(
                        "repr-digest",
                        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
                    )
                    // Names no refusal list foresaw.
                    .header("x-adler32", "0x1c2b03e7")
                    .header("x-len", body.len().to_string())
                    .header("x-latency", "3ms")
                    .header("set-cookie", "session=opened-with-the-value")
                    .header("x-request-id", "req-1");
            }
            b.body(Full::new(Bytes::from(echo.to_string())))
        }
    };
    Ok(r.unwrap().map(Either::Left))
}

/// A body of `n` bytes of unknown length (sent chunked).
pub struct Chunked(usize);

impl hyper::body::Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.0 == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.0.min(64 * 1024);
        self.0 -= n;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![
            b'y';
            n
        ])))))
    }
}
