//! User keys from a JWKS URL (a real HTTPS JWKS server with a throw-away CA), and SIGHUP's
//! reload of the authentication settings.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{spawn, write_private, Fixture, Running, SERVICE_TOKEN};
use figment::providers::{Format, Toml};
use figment::Figment;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use serde_json::json;
use strongroom_server::config::{Config, Overrides};
use strongroom_server::Server;

const ISSUER: &str = "strongroom-dev";
const AUDIENCE: &str = "strongroom";

/// An ES256 signing key and its kid.
struct SigningKey {
    kid: String,
    pair: KeyPair,
}

impl SigningKey {
    fn new(kid: &str) -> Self {
        Self {
            kid: kid.to_owned(),
            pair: KeyPair::generate().unwrap(), // ECDSA P-256
        }
    }

    fn jwk(&self) -> serde_json::Value {
        let raw = self.pair.public_key_raw(); // 0x04 || x || y
        assert_eq!(raw.len(), 65);
        json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
        })
    }

    /// A valid user token for `sub`, signed by this key, naming `kid`.
    fn token_with_kid(&self, sub: &str, kid: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let key = EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims(sub), &key).unwrap()
    }

    fn token(&self, sub: &str) -> String {
        self.token_with_kid(sub, &self.kid)
    }
}

fn claims(sub: &str) -> serde_json::Value {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600})
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// An HTTPS server for one JWKS document, on a thread and runtime of its own, counting the
/// requests it answers.
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    ca_file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JwksServer {
    fn start(fx: &Fixture, doc: String) -> Self {
        use hyper_util::rt::TokioIo;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let idp = common::Pki::new("test IdP CA");
        let (cert_pem, key_pem) = idp.leaf(&["127.0.0.1"], true);
        let ca_file = fx.dir.path().join(format!("idp-ca-{}.pem", rand_suffix()));
        std::fs::write(&ca_file, &idp.ca_pem).unwrap();
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(doc));
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (d, h) = (doc.clone(), hits.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = &mut stop_rx => return,
                        r = listener.accept() => match r { Ok(p) => p, Err(_) => continue },
                    };
                    let (acceptor, d, h) = (acceptor.clone(), d.clone(), h.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |_req| {
                            h.fetch_add(1, Ordering::SeqCst);
                            let body = d.lock().unwrap().clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .header("content-type", "application/json")
                                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                        .unwrap(),
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            });
        });
        Self {
            addr,
            doc,
            hits,
            ca_file,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("https://{}/.well-known/jwks.json", self.addr)
    }

    fn serve(&self, doc: String) {
        *self.doc.lock().unwrap() = doc;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops listening: further fetches are refused.
    fn shut_down(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// The fixture's configuration with user keys from `jwks` (`extra` lines go into
/// `[auth.jwt]`).
fn jwks_toml(fx: &Fixture, url: &str, ca_file: Option<&PathBuf>, extra: &str) -> String {
    let hs256 = format!(
        "hs256_secret_file = {:?}",
        fx.jwt_secret.display().to_string()
    );
    let text = fx.toml("", "");
    assert!(text.contains(&hs256));
    let mut lines = format!("jwks_url = {url:?}\n");
    if let Some(ca) = ca_file {
        lines += &format!("jwks_ca_file = {:?}\n", ca.display().to_string());
    }
    lines += extra;
    text.replace(&hs256, &lines)
}

fn jwks_config(fx: &Fixture, idp: &JwksServer) -> Config {
    fx.config_from(&jwks_toml(fx, &idp.url(), Some(&idp.ca_file), ""))
}

async fn list_status(server: &Running, fx: &Fixture, token: &str) -> u16 {
    server
        .client(fx.client_options())
        .get("/v1/me/credentials", Some(token))
        .await
        .unwrap()
        .status
}

async fn metrics(server: &Running, fx: &Fixture) -> String {
    server
        .client(fx.client_options())
        .get("/metrics", None)
        .await
        .unwrap()
        .text()
}

#[tokio::test]
async fn jwks_url_keys_verify_rotations_are_fetched_on_demand_and_forged_kids_are_rate_limited() {
    let fx = Fixture::new();
    let a = SigningKey::new("a1");
    let b = SigningKey::new("b1");
    let stranger = SigningKey::new("b1");
    let idp = JwksServer::start(&fx, jwks(&[&a]));
    let server = spawn(jwks_config(&fx, &idp)).await;
    assert_eq!(idp.hits(), 1, "fetched once at start");

    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 200);
    let put = server
        .client(fx.client_options())
        .json(
            "PUT",
            "/v1/me/credentials/zoom.api-key",
            Some(&a.token("alice")),
            &json!({"value": "v"}),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 201, "{}", put.text());
    assert_eq!(idp.hits(), 1, "served from the cache");

    // The IdP rotates to a new key: its first token makes the server fetch again.
    idp.serve(jwks(&[&b]));
    assert_eq!(list_status(&server, &fx, &b.token("bob")).await, 200);
    assert_eq!(idp.hits(), 2, "one on-demand refresh");
    assert_eq!(list_status(&server, &fx, &b.token("bob")).await, 200);

    // A key that is not in the set, under a kid that is: refused, and no fetch.
    assert_eq!(list_status(&server, &fx, &stranger.token("bob")).await, 401);
    // The rotated-out key: its kid is unknown now, but the cooldown holds.
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 401);
    // A flood of forged kids: 401 each, and no more fetches within the cooldown.
    for i in 0..40 {
        let forged = stranger.token_with_kid("mallory", &format!("forged-{i}"));
        assert_eq!(list_status(&server, &fx, &forged).await, 401);
    }
    assert_eq!(idp.hits(), 2, "forged kids did not reach the IdP");

    let m = metrics(&server, &fx).await;
    assert!(
        m.contains("strongroom_jwks_refreshes_total{outcome=\"ok\"} 1"),
        "{m}"
    );
    assert!(m.contains("strongroom_jwks_last_success_timestamp_seconds"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn cached_keys_keep_working_while_the_jwks_server_is_down() {
    let fx = Fixture::new();
    let a = SigningKey::new("a1");
    let b = SigningKey::new("b1");
    let mut idp = JwksServer::start(&fx, jwks(&[&a]));
    let server = spawn(jwks_config(&fx, &idp)).await;
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 200);

    idp.shut_down();
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 200);
    // An unknown kid makes the server try; the refresh fails and the old keys stay.
    assert_eq!(list_status(&server, &fx, &b.token("bob")).await, 401);
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 200);
    let m = metrics(&server, &fx).await;
    assert!(
        m.contains("strongroom_jwks_refreshes_total{outcome=\"error\"} 1"),
        "{m}"
    );
    server.stop().await.unwrap();
}

/// A well-formed key set without a usable key revokes every key: the identity provider's
/// (fetched after a token names a kid it lacks) and a JWKS file emptied before a SIGHUP.
/// The last keys stayed in force (up to a day for the URL; until a restart for the file).
#[tokio::test]
async fn an_emptied_key_set_revokes_every_key() {
    let fx = Fixture::new();
    let a = SigningKey::new("a1");
    let b = SigningKey::new("b1");
    let idp = JwksServer::start(&fx, jwks(&[&a]));
    let server = spawn(jwks_config(&fx, &idp)).await;
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 200);
    idp.serve(r#"{"keys":[]}"#.into());
    // An unknown kid makes the server fetch the emptied set.
    assert_eq!(list_status(&server, &fx, &b.token("bob")).await, 401);
    assert_eq!(idp.hits(), 2);
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 401);
    server.stop().await.unwrap();

    // A JWKS file: emptied, then given a key again, each in force after a reload.
    let fx = Fixture::new();
    let jwks_file = fx.dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&a])).unwrap();
    let hs256 = format!(
        "hs256_secret_file = {:?}",
        fx.jwt_secret.display().to_string()
    );
    let text = fx.toml("", "").replace(
        &hs256,
        &format!("jwks_file = {:?}", jwks_file.display().to_string()),
    );
    let path = fx.dir.path().join("strongroom.toml");
    write_config(&fx, &path, &text, SERVICE_TOKEN);
    let server = spawn(Config::load(Some(&path), &Overrides::default()).unwrap()).await;
    server
        .reloader
        .set_config_file(Some(path.clone()), Overrides::default());
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 200);
    std::fs::write(&jwks_file, r#"{"keys":[]}"#).unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 401);
    std::fs::write(&jwks_file, jwks(&[&b])).unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 401);
    assert_eq!(list_status(&server, &fx, &b.token("bob")).await, 200);
    // Not a key set at all is still a mistake, and keeps what is in force.
    std::fs::write(&jwks_file, "not json").unwrap();
    assert!(server.reloader.reload().is_err());
    assert_eq!(list_status(&server, &fx, &b.token("bob")).await, 200);
    server.stop().await.unwrap();
}

async fn start_err(config: Config) -> String {
    match Server::start(config).await {
        Ok(s) => panic!("started on {}", s.local_addr()),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "one line: {text}");
            text
        }
    }
}

#[tokio::test]
async fn the_server_does_not_start_without_a_usable_jwks() {
    let fx = Fixture::new();
    let a = SigningKey::new("a1");

    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/jwks.json", closed.local_addr().unwrap());
    drop(closed);
    let idp = JwksServer::start(&fx, jwks(&[&a]));
    let e = start_err(fx.config_from(&jwks_toml(&fx, &url, Some(&idp.ca_file), ""))).await;
    assert!(
        e.starts_with("config: key `auth.jwt.jwks_url`: cannot load the JWKS") && e.contains(&url),
        "{e}"
    );

    // A server whose certificate the configured CA did not sign.
    let e = start_err(fx.config_from(&jwks_toml(&fx, &idp.url(), Some(&fx.cert), ""))).await;
    assert!(
        e.contains("auth.jwt.jwks") && e.contains("certificate"),
        "{e}"
    );

    // Not a JWKS; a JWKS without one usable key (symmetric, encryption, wrong alg).
    idp.serve("<html>hello</html>".into());
    let e = start_err(jwks_config(&fx, &idp)).await;
    assert!(e.contains("not a JWKS document"), "{e}");
    let mut enc = a.jwk();
    enc["use"] = json!("enc");
    let mut wrong_alg = a.jwk();
    wrong_alg["alg"] = json!("RS256");
    idp.serve(
        json!({"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0", "kid": "h"}, enc, wrong_alg]})
            .to_string(),
    );
    let e = start_err(jwks_config(&fx, &idp)).await;
    assert!(
        e.contains("no usable key") && e.contains("3 skipped"),
        "{e}"
    );

    // Only https:// URLs, refused before anything is fetched.
    let http = jwks_toml(&fx, &format!("http://{}/jwks.json", idp.addr), None, "");
    let config =
        Config::from_figment(Figment::from(Toml::string(&http)), &Overrides::default()).unwrap();
    let e = config.validate().unwrap_err().to_string();
    assert!(
        e.contains("key `auth.jwt.jwks_url`: must be an https:// URL"),
        "{e}"
    );
}

#[tokio::test]
async fn alg_none_and_algorithm_confusion_are_refused() {
    let fx = Fixture::new();
    let a = SigningKey::new("a1");
    let idp = JwksServer::start(&fx, jwks(&[&a]));
    let server = spawn(jwks_config(&fx, &idp)).await;
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 200);

    let b64 = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let payload = b64(claims("alice"));
    // alg: none, with and without a signature.
    for header in [
        json!({"alg": "none", "typ": "JWT", "kid": "a1"}),
        json!({"alg": "none"}),
    ] {
        let unsigned = format!("{}.{payload}.", b64(header.clone()));
        assert_eq!(list_status(&server, &fx, &unsigned).await, 401);
        let signed = format!("{}.{payload}.{}", b64(header), URL_SAFE_NO_PAD.encode("x"));
        assert_eq!(list_status(&server, &fx, &signed).await, 401);
    }
    // HS256 keyed with the public key (PEM, raw point, JWK text) under its kid.
    let public_pem = a.pair.public_key_pem();
    for secret in [
        public_pem.as_bytes().to_vec(),
        a.pair.public_key_raw().to_vec(),
        a.jwk().to_string().into_bytes(),
    ] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("a1".into());
        let forged = jsonwebtoken::encode(
            &header,
            &claims("alice"),
            &EncodingKey::from_secret(&secret),
        )
        .unwrap();
        assert_eq!(list_status(&server, &fx, &forged).await, 401);
    }
    // A valid ES256 signature relabelled with another algorithm.
    let valid = a.token("alice");
    let (_, rest) = valid.split_once('.').unwrap();
    for alg in ["HS256", "RS256", "EdDSA", "ES384"] {
        let relabelled = format!("{}.{rest}", b64(json!({"alg": alg, "kid": "a1"})));
        assert_eq!(list_status(&server, &fx, &relabelled).await, 401, "{alg}");
    }
    assert_eq!(idp.hits(), 1, "known kids never refresh");
    assert_eq!(list_status(&server, &fx, &valid).await, 200);
    server.stop().await.unwrap();
}

/// A configuration file for the fixture, with the service token `service_token`.
fn write_config(fx: &Fixture, path: &PathBuf, text: &str, service_token: &str) {
    let sha = |t: &str| hex::encode(strongroom_api::hash_token(t));
    std::fs::write(path, text.replace(&sha(SERVICE_TOKEN), &sha(service_token))).unwrap();
    let _ = fx;
}

async fn service_put(server: &Running, fx: &Fixture, token: &str) -> u16 {
    server
        .client(fx.client_options())
        .json(
            "PUT",
            "/v1/owners/alice/credentials/zoom.api-key",
            Some(token),
            &json!({"value": "v"}),
        )
        .await
        .unwrap()
        .status
}

#[tokio::test]
async fn reload_swaps_the_auth_settings_and_keeps_them_when_the_new_ones_are_broken() {
    const TOKEN_B: &str = "svc-token-B-0123456789abcdef";
    let fx = Fixture::new();
    let path = fx.dir.path().join("strongroom.toml");
    let text = fx.toml("", "");
    write_config(&fx, &path, &text, SERVICE_TOKEN);
    let server = spawn(Config::load(Some(&path), &Overrides::default()).unwrap()).await;
    server
        .reloader
        .set_config_file(Some(path.clone()), Overrides::default());
    let alice = fx.user_token("alice");
    assert_eq!(service_put(&server, &fx, SERVICE_TOKEN).await, 201);
    assert_eq!(service_put(&server, &fx, TOKEN_B).await, 401);

    // Token B replaces token A, and the JWT secret is rotated.
    write_config(&fx, &path, &text, TOKEN_B);
    write_private(
        &fx.jwt_secret,
        b"a-new-secret-of-more-than-32-bytes-0123456789\n",
    );
    server.reloader.reload().unwrap();
    assert_eq!(service_put(&server, &fx, TOKEN_B).await, 201);
    assert_eq!(service_put(&server, &fx, SERVICE_TOKEN).await, 401);
    assert_eq!(list_status(&server, &fx, &alice).await, 401, "old secret");
    let alice = fx.user_token("alice");
    assert_eq!(list_status(&server, &fx, &alice).await, 200, "new secret");

    // A broken [auth]: refused with the key named; B and the new secret stay in force.
    std::fs::write(
        &path,
        text.replace(
            &hex::encode(strongroom_api::hash_token(SERVICE_TOKEN)),
            "xyz",
        ),
    )
    .unwrap();
    let errors = server.reloader.reload().unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("key `auth.service[0].token_sha256`")),
        "{errors:?}"
    );
    assert_eq!(service_put(&server, &fx, TOKEN_B).await, 201);
    assert_eq!(service_put(&server, &fx, SERVICE_TOKEN).await, 401);

    // A secret too short to use: refused, the loaded one stays.
    write_config(&fx, &path, &text, TOKEN_B);
    write_private(&fx.jwt_secret, b"short\n");
    let errors = server.reloader.reload().unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("hs256_secret_file")),
        "{errors:?}"
    );
    assert_eq!(list_status(&server, &fx, &alice).await, 200);
    assert_eq!(service_put(&server, &fx, TOKEN_B).await, 201);
    server.stop().await.unwrap();
}

/// SIGHUP swaps the `[broker]` settings in as a whole, and keeps them when the new ones
/// do not load.
#[tokio::test]
async fn reload_swaps_the_broker_settings_and_keeps_them_when_the_new_ones_are_broken() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("strongroom.toml");
    let text = fx.toml("", "");
    std::fs::write(&path, &text).unwrap();
    let server = spawn(Config::load(Some(&path), &Overrides::default()).unwrap()).await;
    server
        .reloader
        .set_config_file(Some(path.clone()), Overrides::default());
    let settings = || server.state.broker().unwrap().settings().clone();
    assert!(!settings().allow_private_networks);
    assert_eq!(settings().timeout, std::time::Duration::from_secs(20));

    std::fs::write(
        &path,
        format!("{text}\n[broker]\nallow_private_networks = true\ntimeout_seconds = 7\n"),
    )
    .unwrap();
    server.reloader.reload().unwrap();
    assert!(settings().allow_private_networks);
    assert_eq!(settings().timeout, std::time::Duration::from_secs(7));

    // A CA file that does not exist: refused, naming the key; the settings in force stay.
    std::fs::write(
        &path,
        format!("{text}\n[broker]\nca_file = \"/nonexistent/ca.pem\"\n"),
    )
    .unwrap();
    let errors = server.reloader.reload().unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("broker.ca_file")),
        "{errors:?}"
    );
    assert!(settings().allow_private_networks);
    assert_eq!(settings().timeout, std::time::Duration::from_secs(7));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reload_can_switch_user_keys_to_a_jwks_url_and_refuses_an_unreachable_one() {
    let fx = Fixture::new();
    let a = SigningKey::new("a1");
    let b = SigningKey::new("b1");
    let idp = JwksServer::start(&fx, jwks(&[&a]));
    let path = fx.dir.path().join("strongroom.toml");
    std::fs::write(&path, fx.toml("", "")).unwrap();
    let server = spawn(Config::load(Some(&path), &Overrides::default()).unwrap()).await;
    server
        .reloader
        .set_config_file(Some(path.clone()), Overrides::default());
    let hs_alice = fx.user_token("alice");
    assert_eq!(list_status(&server, &fx, &hs_alice).await, 200);

    // An unreachable JWKS URL: the reload is refused, HS256 tokens still work.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/jwks.json", closed.local_addr().unwrap());
    drop(closed);
    std::fs::write(&path, jwks_toml(&fx, &url, Some(&idp.ca_file), "")).unwrap();
    let errors = server.reloader.reload().unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("auth.jwt.jwks_url")),
        "{errors:?}"
    );
    assert_eq!(list_status(&server, &fx, &hs_alice).await, 200);

    // The IdP's JWKS: fetched by the reload, kept fresh afterwards.
    std::fs::write(&path, jwks_toml(&fx, &idp.url(), Some(&idp.ca_file), "")).unwrap();
    server.reloader.reload().unwrap();
    assert_eq!(idp.hits(), 1);
    assert_eq!(list_status(&server, &fx, &hs_alice).await, 401);
    assert_eq!(list_status(&server, &fx, &a.token("alice")).await, 200);
    idp.serve(jwks(&[&a, &b]));
    assert_eq!(list_status(&server, &fx, &b.token("bob")).await, 200);
    assert_eq!(idp.hits(), 2);

    // A reload that leaves the JWKS settings alone keeps the cache (no fetch).
    server.reloader.reload().unwrap();
    assert_eq!(idp.hits(), 2);
    assert_eq!(list_status(&server, &fx, &b.token("bob")).await, 200);
    server.stop().await.unwrap();
}
