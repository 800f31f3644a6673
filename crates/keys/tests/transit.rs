//! The Transit provider against a real OpenBao 2.7.2 server started by
//! `scripts/lib/openbao.sh` (`STRONGROOM_TEST_OPENBAO_ADDR`, `_TOKEN`, `_CACERT`), over HTTPS.

#![cfg(feature = "transit")]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use strongroom_crypto::testing::{check_provider, check_rotation};
use strongroom_crypto::{Key256, KeyProvider, OsRandom, ProviderErrorKind, UnwrapError};
use strongroom_keys::{SecretSource, TransitAuth, TransitConfig, TransitProvider};

const ADDR: &str = "STRONGROOM_TEST_OPENBAO_ADDR";
const TOKEN: &str = "STRONGROOM_TEST_OPENBAO_TOKEN";
const SCRIPT: &str = "openbao.sh";

struct Bao {
    addr: String,
    ca: PathBuf,
    root: String,
    http: reqwest::Client,
}

impl Bao {
    fn from_env() -> Option<Self> {
        let addr = common::peer_var(ADDR, SCRIPT)?;
        let root = common::peer_var(TOKEN, SCRIPT)?;
        let ca: PathBuf = common::peer_var("STRONGROOM_TEST_OPENBAO_CACERT", SCRIPT)?.into();
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .unwrap();
        Some(Self {
            addr,
            ca,
            root,
            http,
        })
    }

    /// A root-token API call (what an operator does); panics on failure.
    async fn api(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .request(method, format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", &self.root)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn create_key(&self, name: &str, params: Value) {
        self.api(
            reqwest::Method::POST,
            &format!("transit/keys/{name}"),
            params,
        )
        .await;
    }

    fn config(&self, key: &str, auth: TransitAuth) -> TransitConfig {
        let mut c = TransitConfig::new(&self.addr, key, auth);
        c.ca_file = Some(self.ca.clone());
        c
    }

    fn root_auth(&self) -> TransitAuth {
        TransitAuth::Token(SecretSource::Env(TOKEN.into()))
    }
}

macro_rules! bao {
    () => {
        match Bao::from_env() {
            Some(b) => b,
            None => return,
        }
    };
}

/// A file with mode 0600 holding `text`.
fn secret_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let bao = bao!();
    let key = common::unique("conf");
    bao.create_key(&key, json!({})).await;
    let p = TransitProvider::connect(bao.config(&key, bao.root_auth()))
        .await
        .unwrap();
    let kek = p.active_kek().unwrap();
    assert_eq!(
        (kek.provider.as_str(), kek.key_id.clone(), kek.version),
        ("transit", format!("transit/{key}"), 1)
    );
    check_provider(Arc::new(p)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite_with_a_derived_chacha_key() {
    let bao = bao!();
    let key = common::unique("derived");
    bao.create_key(&key, json!({"derived": true, "type": "chacha20-poly1305"}))
        .await;
    let p = TransitProvider::connect(bao.config(&key, bao.root_auth()))
        .await
        .unwrap();
    check_provider(Arc::new(p)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_and_retires_versions() {
    let bao = bao!();
    let key = common::unique("rot");
    bao.create_key(&key, json!({})).await;
    let p = Arc::new(
        TransitProvider::connect(bao.config(&key, bao.root_auth()))
            .await
            .unwrap(),
    );
    let p2 = p.clone();
    check_rotation(p.clone(), || async move {
        assert_eq!(p2.rotate().await.unwrap().version, 2);
    })
    .await;

    // Retire v1 the Transit way: raise min_decryption_version.
    let k = Key256::generate(&OsRandom).unwrap();
    let v2 = p.active_kek().unwrap();
    let mut v1 = v2.clone();
    v1.version = 1;
    let w2 = p.wrap(&v2, &k, b"r").await.unwrap();
    p.rotate().await.unwrap();
    let w3 = p.wrap(&p.active_kek().unwrap(), &k, b"r").await.unwrap();
    bao.api(
        reqwest::Method::POST,
        &format!("transit/keys/{key}/config"),
        json!({"min_decryption_version": 3}),
    )
    .await;
    p.refresh().await.unwrap();
    for w in [&w2] {
        match p.unwrap(w, b"r").await {
            Err(UnwrapError::Failed(e)) => {
                assert_eq!(e.kind(), ProviderErrorKind::KekRetired, "{e}")
            }
            other => panic!("v2 below min_decryption_version: {:?}", other.map(|_| ())),
        }
    }
    let mut old = w2.clone();
    old.kek = v1;
    assert!(p.unwrap(&old, b"r").await.is_err());
    assert_eq!(
        p.unwrap(&w3, b"r").await.unwrap().expose_secret(),
        k.expose_secret()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_rotating_is_seen_at_the_next_wrap() {
    let bao = bao!();
    let key = common::unique("nodes");
    bao.create_key(&key, json!({})).await;
    let a = TransitProvider::connect(bao.config(&key, bao.root_auth()))
        .await
        .unwrap();
    let b = TransitProvider::connect(bao.config(&key, bao.root_auth()))
        .await
        .unwrap();
    let v1 = b.active_kek().unwrap();
    let v2 = a.rotate().await.unwrap();
    let k = Key256::generate(&OsRandom).unwrap();
    let e = b.wrap(&v1, &k, b"x").await.unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::KekNotActive, "{e}");
    assert_eq!(b.active_kek().unwrap(), v2, "b learnt the new version");
    let w = b.wrap(&v2, &k, b"x").await.unwrap();
    assert_eq!(
        a.unwrap(&w, b"x").await.unwrap().expose_secret(),
        k.expose_secret()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_login_survives_token_expiry() {
    let bao = bao!();
    let key = common::unique("approle");
    bao.create_key(&key, json!({})).await;
    let policy = format!(
        r#"path "transit/encrypt/{key}" {{ capabilities = ["update"] }}
path "transit/decrypt/{key}" {{ capabilities = ["update"] }}
path "transit/keys/{key}" {{ capabilities = ["read"] }}"#
    );
    bao.api(
        reqwest::Method::PUT,
        &format!("sys/policies/acl/{key}"),
        json!({ "policy": policy }),
    )
    .await;
    bao.api(
        reqwest::Method::POST,
        &format!("auth/approle/role/{key}"),
        json!({"token_policies": [key], "token_ttl": "2s", "token_max_ttl": "3s"}),
    )
    .await;
    let role_id = bao
        .api(
            reqwest::Method::GET,
            &format!("auth/approle/role/{key}/role-id"),
            json!({}),
        )
        .await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id = bao
        .api(
            reqwest::Method::POST,
            &format!("auth/approle/role/{key}/secret-id"),
            json!({}),
        )
        .await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(&dir, "secret-id", &secret_id);
    let p = TransitProvider::connect(bao.config(
        &key,
        TransitAuth::approle(&role_id, SecretSource::File(file.clone())),
    ))
    .await
    .unwrap();
    let k = Key256::generate(&OsRandom).unwrap();
    let w = p.wrap(&p.active_kek().unwrap(), &k, b"a").await.unwrap();
    // Past the token's max TTL: renewal cannot help, the provider logs in again.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        p.unwrap(&w, b"a").await.unwrap().expose_secret(),
        k.expose_secret()
    );
    let w = p.wrap(&p.active_kek().unwrap(), &k, b"b").await.unwrap();
    assert_eq!(
        p.unwrap(&w, b"b").await.unwrap().expose_secret(),
        k.expose_secret()
    );
    // The policy does not allow rotation: a clear Denied.
    let e = p.rotate().await.unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Denied, "{e}");

    // A wrong secret id is refused at start-up.
    let bad = secret_file(&dir, "bad", "00000000-0000-0000-0000-000000000000");
    let e = TransitProvider::connect(bao.config(
        &key,
        TransitAuth::approle(&role_id, SecretSource::File(bad)),
    ))
    .await
    .unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Denied, "{e}");
    assert!(e.to_string().contains("AppRole login"), "{e}");
    assert!(!e.to_string().contains(&secret_id));
}

/// A new token (root policy, an hour) from the test server.
async fn child_token(bao: &Bao) -> String {
    bao.api(
        reqwest::Method::POST,
        "auth/token/create",
        json!({"policies": ["root"], "ttl": "1h"}),
    )
    .await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A token file rewritten after its token was revoked (Vault Agent's sink, an operator) is
/// read again at the next refusal: no restart needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_token_file_is_picked_up_after_a_refusal() {
    let bao = bao!();
    let key = common::unique("tokfile");
    bao.create_key(&key, json!({})).await;
    let first = child_token(&bao).await;
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(&dir, "token", &first);
    let p = TransitProvider::connect(
        bao.config(&key, TransitAuth::Token(SecretSource::File(file.clone()))),
    )
    .await
    .unwrap();
    let k = Key256::generate(&OsRandom).unwrap();
    let w = p.wrap(&p.active_kek().unwrap(), &k, b"a").await.unwrap();
    bao.api(
        reqwest::Method::POST,
        "auth/token/revoke",
        json!({ "token": first }),
    )
    .await;
    // Revoked, the file not yet rewritten: refused.
    let e = p.unwrap(&w, b"a").await.unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    let second = child_token(&bao).await;
    secret_file(&dir, "token", &second);
    assert_eq!(
        p.unwrap(&w, b"a").await.unwrap().expose_secret(),
        k.expose_secret()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_denied() {
    let bao = bao!();
    let key = common::unique("deny");
    bao.create_key(&key, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(&dir, "token", "s.not-a-real-token");
    let e =
        TransitProvider::connect(bao.config(&key, TransitAuth::Token(SecretSource::File(file))))
            .await
            .unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Denied, "{e}");
    let msg = e.to_string();
    assert!(msg.starts_with("key provider 'transit'"), "{msg}");
    assert!(
        msg.contains("403") && msg.contains("is the token valid"),
        "{msg}"
    );
    assert!(!msg.contains("not-a-real-token"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_address_is_unavailable() {
    let bao = bao!();
    let mut c = bao.config("k", bao.root_auth());
    c.address = "https://127.0.0.1:9".into();
    c.connect_timeout = Duration::from_secs(2);
    let e = TransitProvider::connect(c).await.unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Unavailable, "{e}");
    assert!(
        e.to_string().contains("cannot reach https://127.0.0.1:9"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigurations_are_named() {
    let bao = bao!();
    // Unknown key.
    let e = TransitProvider::connect(bao.config("no-such-key", bao.root_auth()))
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured, "{e}");
    assert!(
        e.to_string().contains("no transit key 'no-such-key'"),
        "{e}"
    );

    // A certificate the system roots do not know.
    let key = common::unique("tls");
    bao.create_key(&key, json!({})).await;
    let mut c = bao.config(&key, bao.root_auth());
    c.ca_file = None;
    let e = TransitProvider::connect(c).await.unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured, "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");

    // An exportable key, and a key that cannot take associated data.
    let key = common::unique("export");
    bao.create_key(&key, json!({"exportable": true})).await;
    let e = TransitProvider::connect(bao.config(&key, bao.root_auth()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("exportable"), "{e}");
    let key = common::unique("rsa");
    bao.create_key(&key, json!({"type": "rsa-2048"})).await;
    let e = TransitProvider::connect(bao.config(&key, bao.root_auth()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("rsa-2048"), "{e}");
    // A 128-bit key would be the weakest link under 256-bit data keys.
    let key = common::unique("aes128");
    bao.create_key(&key, json!({"type": "aes128-gcm96"})).await;
    let e = TransitProvider::connect(bao.config(&key, bao.root_auth()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured, "{e}");
    assert!(e.to_string().contains("aes128-gcm96"), "{e}");
    // Allowed by name, to move what it wraps to another key.
    let mut c = bao.config(&key, bao.root_auth());
    c.allow_128_bit_key = true;
    let p = TransitProvider::connect(c).await.unwrap();
    let k = Key256::generate(&OsRandom).unwrap();
    let w = p.wrap(&p.active_kek().unwrap(), &k, b"aad").await.unwrap();
    assert_eq!(
        p.unwrap(&w, b"aad").await.unwrap().expose_secret(),
        k.expose_secret()
    );

    // Token variable unset.
    let e = TransitProvider::connect(bao.config(
        &key,
        TransitAuth::Token(SecretSource::Env("STRONGROOM_TEST_NO_SUCH_VAR".into())),
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("STRONGROOM_TEST_NO_SUCH_VAR"), "{e}");
}
