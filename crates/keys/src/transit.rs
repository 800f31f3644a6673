//! The Vault/OpenBao Transit provider (cargo feature `transit`): data keys are wrapped by
//! `transit/encrypt/KEY` and unwrapped by `transit/decrypt/KEY`; the KEK never leaves Transit.
//!
//! Tested against a real OpenBao 2.7.2 server; works with HashiCorp Vault 1.15 or later
//! (earlier Vault ignores `associated_data`, which the start-up self-test detects and refuses).
//!
//! # What is bound
//!
//! Each request sends the data key as `plaintext` and the caller's associated data as
//! `associated_data`, which Transit authenticates as AEAD associated data (AES-GCM or
//! ChaCha20-Poly1305 keys): a wrapped key only decrypts with the same associated data. For a
//! key created with `derived=true`, the request also carries `context` = SHA-256 of the
//! associated data, so each record is wrapped under its own derived key as well. The wrapped
//! bytes are Transit's ciphertext string `vault:vN:<base64>` (about 90 bytes), checked
//! locally before it is sent: its `vN` must equal the [`KekRef::version`] and its base64 must
//! be canonical and of the expected size.
//!
//! # KEK versions and rotation
//!
//! [`KekRef`] is `{ provider: "transit", key_id: "<mount>/<key>", version: N }`, where `N` is
//! the Transit key version that encrypted (from the `vault:vN:` prefix). The active KEK is
//! the key's `latest_version`, read at start-up and refreshed whenever Transit answers an
//! encrypt with a newer version (another node rotated: the wrap then fails with
//! [`ProviderErrorKind::KekNotActive`] and the caller retries with the new KEK), at
//! [`TransitProvider::refresh`] and at `health()`. [`TransitProvider::rotate`] calls
//! `transit/keys/KEY/rotate`. Versions below the key's `min_decryption_version` unwrap as
//! [`ProviderErrorKind::KekRetired`] (that is how Transit retires a version; trimming it
//! erases it).
//!
//! # What the operator sets up
//!
//! * The transit engine at a mount (default `transit`) and a key of type `aes256-gcm96`
//!   (default) or `chacha20-poly1305` (256-bit keys, as every other KEK here: an
//!   `aes128-gcm96` key is refused unless [`TransitConfig::allow_128_bit_key`] is set, to
//!   move off it), neither `exportable` nor
//!   `allow_plaintext_backup` (the provider refuses keys that could leave Transit).
//! * A policy granting `update` on `MOUNT/encrypt/KEY` and `MOUNT/decrypt/KEY`, `read` on
//!   `MOUNT/keys/KEY`, and (for `strongroom keys rotate`) `update` on `MOUNT/keys/KEY/rotate`.
//! * Authentication: a token from a file or an environment variable (renewed with
//!   `auth/token/renew-self` when it is renewable), or AppRole (`role_id` and a `secret_id`
//!   file; the provider logs in, renews its token at two thirds of its TTL, and logs in again
//!   when renewal fails or a request is refused).
//! * HTTPS with a CA file ([`TransitConfig::ca_file`], used alone) or the system roots.
//!   Plain `http://` is refused unless [`TransitConfig::danger_allow_plain_http`] is set, and
//!   even then only for a loopback address. Redirects are not followed (the token must not
//!   travel to another host). An optional namespace is sent as `X-Vault-Namespace`.
//!
//! # Failure modes
//!
//! [`TransitProvider::connect`] authenticates, reads the key and runs a wrap/unwrap
//! self-test (including a decrypt under other associated data, which must fail), so an
//! unreachable address ([`ProviderErrorKind::Unavailable`]), a certificate that does not
//! verify, an unknown mount or key, or a key of the wrong type
//! ([`ProviderErrorKind::Misconfigured`]) and a refused token or AppRole login
//! ([`ProviderErrorKind::Denied`]) stop start-up with one message. At run time: 401/403 are
//! [`ProviderErrorKind::Denied`] (after one re-login for AppRole), 429 and 5xx (sealed,
//! standby, overloaded) and transport errors are [`ProviderErrorKind::Unavailable`], a 400 on
//! decrypt is [`ProviderErrorKind::AuthenticationFailed`]. Errors are classified by HTTP
//! status and error type; Transit's own error text is quoted in the message, never parsed.
//!
//! The data key and its base64 form are held in zeroizing buffers here, but reqwest and
//! hyper copy request and response bodies into buffers that are freed without zeroizing.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use strongroom_crypto::provider::{MAX_KEK_ID_LEN, MAX_WRAPPED_KEY_LEN};
use strongroom_crypto::{
    KekRef, Key256, KeyProvider, ProviderError, ProviderErrorKind, UnwrapError, WrappedKey,
};
use zeroize::Zeroizing;

use crate::SecretSource;

/// The provider kind in [`KekRef::provider`].
pub const KIND: &str = "transit";
/// Largest response body read from the server.
const MAX_RESPONSE_LEN: usize = 1 << 20;
/// Nonce, data key and tag of an AEAD Transit ciphertext.
const CIPHERTEXT_LEN: usize = 12 + Key256::LEN + 16;
/// Key types whose ciphertexts authenticate `associated_data`.
const AEAD_KEY_TYPES: [&str; 2] = ["aes256-gcm96", "chacha20-poly1305"];
/// After a failed decrypt, key facts older than this are re-read.
const STALE_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// A version outside the range known re-reads the key's facts only when they are older than
/// this: a row naming a version that never existed (written around Strongroom) must not make
/// every request a round trip to the server.
const MISS_REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// How the provider authenticates to Vault/OpenBao.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransitAuth {
    /// A token (a periodic or long-lived service token); renewed when it is renewable.
    Token(SecretSource),
    /// AppRole login.
    AppRole {
        /// Mount of the approle auth method (usually `approle`).
        mount: String,
        /// The role id (not secret on its own).
        role_id: String,
        /// Where the secret id comes from; re-read at every login, so it may be rotated.
        secret_id: SecretSource,
    },
}

impl TransitAuth {
    /// AppRole at the usual mount `approle`.
    pub fn approle(role_id: impl Into<String>, secret_id: SecretSource) -> Self {
        TransitAuth::AppRole {
            mount: "approle".to_owned(),
            role_id: role_id.into(),
            secret_id,
        }
    }
}

/// Configuration of the Transit provider.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransitConfig {
    /// Server address, e.g. `https://vault.internal:8200`.
    pub address: String,
    /// Mount of the transit engine (default `transit`).
    pub mount: String,
    /// Name of the transit key.
    pub key: String,
    /// How to authenticate.
    pub auth: TransitAuth,
    /// PEM file of the CA(s) to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Vault Enterprise / OpenBao namespace, sent as `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// TCP and TLS connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Allows `http://` for a loopback address (development only): data keys and the token
    /// would otherwise cross the network in clear.
    pub danger_allow_plain_http: bool,
    /// Allows an `aes128-gcm96` key: for moving off one (`rewrap --to-config`), since a
    /// 128-bit KEK is the weakest link over 256-bit data keys.
    pub allow_128_bit_key: bool,
}

impl TransitConfig {
    /// A configuration with mount `transit`, system roots, no namespace, 5 s connect and
    /// 30 s request timeouts, HTTPS only.
    pub fn new(address: impl Into<String>, key: impl Into<String>, auth: TransitAuth) -> Self {
        Self {
            address: address.into(),
            mount: "transit".to_owned(),
            key: key.into(),
            auth,
            ca_file: None,
            namespace: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            danger_allow_plain_http: false,
            allow_128_bit_key: false,
        }
    }
}

/// Facts about the transit key, as last read.
#[derive(Clone, Copy, Debug)]
struct KeyFacts {
    latest: u32,
    min_decryption: u32,
    derived: bool,
    read_at: Instant,
}

/// The current token and when to renew it.
struct TokenState {
    token: SecretString,
    renew_at: Option<Instant>,
    renewable: bool,
}

/// KEKs in Vault/OpenBao Transit. See the [module docs](self).
pub struct TransitProvider {
    http: reqwest::Client,
    /// `https://host:port/v1/`
    base: Url,
    address: String,
    mount: String,
    key: String,
    key_id: String,
    namespace: Option<HeaderValue>,
    auth: TransitAuth,
    token: tokio::sync::RwLock<TokenState>,
    facts: RwLock<KeyFacts>,
    /// [`TransitConfig::allow_128_bit_key`].
    allow_128_bit_key: bool,
}

impl std::fmt::Debug for TransitProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransitProvider")
            .field("address", &self.address)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn error(kind: ProviderErrorKind, message: impl Into<String>) -> ProviderError {
    ProviderError::new(kind, KIND, message)
}

/// The innermost cause's text, e.g. "Connection refused (os error 111)".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Whether a transport error comes from a certificate that does not verify.
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if matches!(
            err.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
        ) {
            return true;
        }
        // tokio-rustls and hyper wrap TLS errors in (nested) io::Errors, whose `source()`
        // skips the wrapped error itself.
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// A non-2xx answer: status and Transit's first error text (quoted, never parsed).
struct Refusal {
    status: StatusCode,
    detail: String,
}

impl Refusal {
    fn describe(&self) -> String {
        if self.detail.is_empty() {
            format!("HTTP {}", self.status)
        } else {
            format!("HTTP {}: {}", self.status, self.detail)
        }
    }

    /// The kind for statuses whose meaning does not depend on the request.
    fn kind(&self) -> ProviderErrorKind {
        match self.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ProviderErrorKind::Denied,
            StatusCode::NOT_FOUND => ProviderErrorKind::Misconfigured,
            StatusCode::TOO_MANY_REQUESTS => ProviderErrorKind::Unavailable,
            s if s.is_server_error() => ProviderErrorKind::Unavailable,
            s if s.is_redirection() => ProviderErrorKind::Misconfigured,
            _ => ProviderErrorKind::Other,
        }
    }
}

/// The outcome of one HTTP exchange that reached the server.
enum Reply {
    Ok(Zeroizing<Vec<u8>>),
    Refused(Refusal),
}

#[derive(Deserialize)]
struct Envelope<T> {
    data: Option<T>,
    auth: Option<AuthData>,
    #[serde(default)]
    warnings: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct NoData {}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Deserialize)]
struct AuthData {
    client_token: Zeroizing<String>,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

#[derive(Deserialize)]
struct TokenLookup {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

#[derive(Deserialize)]
struct KeyData {
    #[serde(rename = "type")]
    key_type: String,
    latest_version: u32,
    min_decryption_version: u32,
    #[serde(default)]
    derived: bool,
    #[serde(default)]
    exportable: bool,
    #[serde(default)]
    allow_plaintext_backup: bool,
}

#[derive(Serialize)]
struct CryptRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext: Option<&'a str>,
    associated_data: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a str>,
}

#[derive(Deserialize)]
struct EncryptData {
    ciphertext: String,
}

#[derive(Deserialize)]
struct DecryptData {
    plaintext: Zeroizing<String>,
}

#[derive(Serialize)]
struct AppRoleLogin<'a> {
    role_id: &'a str,
    secret_id: &'a str,
}

/// A path segment check: mounts and key names go into URLs.
fn valid_name(s: &str, allow_slash: bool) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || b == b'-'
                || b == b'_'
                || b == b'.'
                || (allow_slash && b == b'/')
        })
        && !s.starts_with('/')
        && !s.ends_with('/')
        && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
}

/// Parses `vault:vN:<base64>`: the version and the decoded length check.
fn parse_ciphertext(bytes: &[u8]) -> Option<(u32, &str)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let rest = text.strip_prefix("vault:v")?;
    let (digits, b64) = rest.split_once(':')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let version: u32 = digits.parse().ok()?;
    // Canonical base64 of exactly nonce ‖ key ‖ tag: anything else was altered.
    let decoded = STANDARD.decode(b64).ok()?;
    if decoded.len() != CIPHERTEXT_LEN || STANDARD.encode(&decoded) != b64 {
        return None;
    }
    Some((version, text))
}

impl TransitProvider {
    /// Authenticates, reads the key and runs a wrap/unwrap self-test.
    ///
    /// # Errors
    ///
    /// One [`ProviderError`] naming what failed: [`ProviderErrorKind::Unavailable`] when the
    /// server cannot be reached; [`ProviderErrorKind::Misconfigured`] for a bad address,
    /// mount, key name or CA file, a certificate that does not verify, an unknown key, a key
    /// that is not an AEAD key or may be exported, or a server that ignores associated data;
    /// [`ProviderErrorKind::Denied`] for a refused token or AppRole login or missing policy.
    pub async fn connect(config: TransitConfig) -> Result<Self, ProviderError> {
        let misconfigured = |m: String| error(ProviderErrorKind::Misconfigured, m);
        if !valid_name(&config.mount, true) {
            return Err(misconfigured(format!(
                "mount '{}' is not a valid path",
                config.mount
            )));
        }
        if !valid_name(&config.key, false) {
            return Err(misconfigured(format!(
                "key name '{}' is not valid",
                config.key
            )));
        }
        let key_id = format!("{}/{}", config.mount, config.key);
        if key_id.len() > MAX_KEK_ID_LEN {
            return Err(misconfigured("mount and key name are too long".into()));
        }
        // Not quoted: a malformed address may still hold a password.
        let mut base = Url::parse(config.address.trim_end_matches('/'))
            .map_err(|e| misconfigured("address is not a URL".into()).with_source(e))?;
        // Credentials belong in token_file or AppRole, not in a URL that errors and logs
        // quote.
        if !base.username().is_empty() || base.password().is_some() {
            return Err(misconfigured(
                "address must not hold a user name or password (give the token with \
                 token_file, token_env or AppRole)"
                    .into(),
            ));
        }
        match base.scheme() {
            "https" => {}
            "http" if config.danger_allow_plain_http => {
                if !base.host_str().is_some_and(crate::loopback_host) {
                    return Err(misconfigured(format!(
                        "address '{}': plain http is allowed for loopback addresses only",
                        config.address
                    )));
                }
            }
            _ => {
                return Err(misconfigured(format!(
                    "address '{}' must be https://",
                    config.address
                )))
            }
        }
        if base.query().is_some() || base.fragment().is_some() || base.cannot_be_a_base() {
            return Err(misconfigured(format!(
                "address '{}' must be scheme://host[:port][/path]",
                config.address
            )));
        }
        base.set_path(&format!("{}/v1/", base.path().trim_end_matches('/')));

        let http = build_client(&config)?;
        let namespace = match &config.namespace {
            None => None,
            Some(ns) if valid_name(ns, true) => Some(HeaderValue::from_str(ns).map_err(|e| {
                misconfigured(format!("namespace '{ns}' is not valid")).with_source(e)
            })?),
            Some(ns) => return Err(misconfigured(format!("namespace '{ns}' is not valid"))),
        };

        let provider = Self {
            http,
            base,
            address: config.address.clone(),
            mount: config.mount.clone(),
            key: config.key.clone(),
            key_id,
            namespace,
            auth: config.auth.clone(),
            token: tokio::sync::RwLock::new(TokenState {
                token: SecretString::from(String::new()),
                renew_at: None,
                renewable: false,
            }),
            facts: RwLock::new(KeyFacts {
                latest: 0,
                min_decryption: 1,
                derived: false,
                read_at: Instant::now(),
            }),
            allow_128_bit_key: config.allow_128_bit_key,
        };
        let state = provider.authenticate().await?;
        *provider.token.write().await = state;
        provider.refresh_facts(true).await?;
        strongroom_crypto::provider::self_test(&provider).await?;
        Ok(provider)
    }

    /// `<mount>/<key>`, the [`KekRef::key_id`].
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Makes a new version of the transit key (`MOUNT/keys/KEY/rotate`); it becomes the
    /// active KEK at once. Returns it.
    ///
    /// # Errors
    ///
    /// [`ProviderErrorKind::Denied`] without `update` on the rotate path; transport errors.
    pub async fn rotate(&self) -> Result<KekRef, ProviderError> {
        let path = format!("{}/keys/{}/rotate", self.mount, self.key);
        match self.request(Method::POST, &path, None).await? {
            Reply::Ok(_) => {}
            Reply::Refused(r) => {
                return Err(error(
                    r.kind(),
                    format!(
                        "rotating transit key {} failed: {}",
                        self.key_id,
                        r.describe()
                    ),
                ))
            }
        }
        self.refresh().await
    }

    /// Re-reads the key's versions (to see another node's rotation or retirement) and
    /// returns the active KEK.
    ///
    /// # Errors
    ///
    /// As [`TransitProvider::connect`] for reading the key.
    pub async fn refresh(&self) -> Result<KekRef, ProviderError> {
        self.refresh_facts(false).await?;
        self.active_kek()
    }

    fn facts(&self) -> KeyFacts {
        *self.facts.read().unwrap_or_else(|e| e.into_inner())
    }

    fn kek(&self, version: u32) -> KekRef {
        KekRef {
            provider: KIND.to_owned(),
            key_id: self.key_id.clone(),
            version,
        }
    }

    /// Reads `MOUNT/keys/KEY`; at start-up also checks the key's type and exportability.
    async fn refresh_facts(&self, first: bool) -> Result<KeyFacts, ProviderError> {
        let path = format!("{}/keys/{}", self.mount, self.key);
        let body = match self.request(Method::GET, &path, None).await? {
            Reply::Ok(body) => body,
            Reply::Refused(r) => {
                let what = if r.status == StatusCode::NOT_FOUND {
                    format!(
                        "no transit key '{}' at mount '{}' on {} (or the mount does not exist)",
                        self.key, self.mount, self.address
                    )
                } else if r.kind() == ProviderErrorKind::Denied {
                    format!(
                        "reading transit key {} was refused (is the token valid, and does its \
                         policy allow read on {path}?)",
                        self.key_id
                    )
                } else {
                    format!("reading transit key {} failed", self.key_id)
                };
                return Err(error(r.kind(), format!("{what}: {}", r.describe())));
            }
        };
        let data: KeyData = parse::<KeyData>(&body, "key information")?.0;
        let allowed_128 = self.allow_128_bit_key && data.key_type == "aes128-gcm96";
        if !allowed_128 && !AEAD_KEY_TYPES.contains(&data.key_type.as_str()) {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "transit key {} has type {}; use aes256-gcm96 or chacha20-poly1305 \
                     (256-bit keys whose ciphertexts authenticate associated data); to move off \
                     an aes128-gcm96 key, allow_128_bit_key = true opens it for `rewrap \
                     --to-config`",
                    self.key_id, data.key_type
                ),
            ));
        }
        if data.exportable || data.allow_plaintext_backup {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "transit key {} is exportable or allows plaintext backup, so the KEK \
                     could leave Transit; use a key with both off",
                    self.key_id
                ),
            ));
        }
        if data.latest_version == 0 {
            return Err(error(
                ProviderErrorKind::Other,
                format!("transit key {} reports no version", self.key_id),
            ));
        }
        let facts = KeyFacts {
            latest: data.latest_version,
            min_decryption: data.min_decryption_version.max(1),
            derived: data.derived,
            read_at: Instant::now(),
        };
        let mut current = self.facts.write().unwrap_or_else(|e| e.into_inner());
        if !first && facts.latest < current.latest {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "transit key {} went back from version {} to {}: was it deleted and \
                     recreated?",
                    self.key_id, current.latest, facts.latest
                ),
            ));
        }
        *current = facts;
        Ok(facts)
    }

    // --- authentication -------------------------------------------------------------------

    /// Obtains a token: reads it, or logs in with AppRole.
    async fn authenticate(&self) -> Result<TokenState, ProviderError> {
        match &self.auth {
            TransitAuth::Token(source) => {
                let token = source.read(KIND, "Vault/OpenBao token")?;
                // When the token has a TTL and may be renewed, schedule renewal; a token
                // without the default policy cannot look itself up, which is not fatal.
                let (renew_at, renewable) = match self
                    .send(Method::GET, "auth/token/lookup-self", None, &token)
                    .await?
                {
                    Reply::Ok(body) => {
                        let info = parse::<TokenLookup>(&body, "token lookup")?.0;
                        (renew_at(info.ttl), info.renewable)
                    }
                    Reply::Refused(r) if r.status == StatusCode::FORBIDDEN => (None, false),
                    Reply::Refused(r) => {
                        return Err(error(
                            r.kind(),
                            format!("token lookup on {} failed: {}", self.address, r.describe()),
                        ))
                    }
                };
                Ok(TokenState {
                    token,
                    renew_at,
                    renewable,
                })
            }
            TransitAuth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let secret_id = secret_id.read(KIND, "AppRole secret_id")?;
                let body = Zeroizing::new(
                    serde_json::to_vec(&AppRoleLogin {
                        role_id,
                        secret_id: secret_id.expose_secret(),
                    })
                    .map_err(|e| error(ProviderErrorKind::Other, "cannot encode").with_source(e))?,
                );
                let path = format!("auth/{mount}/login");
                let no_token = SecretString::from(String::new());
                match self
                    .send(Method::POST, &path, Some(body), &no_token)
                    .await?
                {
                    Reply::Ok(body) => {
                        let auth = parse::<NoData>(&body, "AppRole login")?.1.ok_or_else(|| {
                            error(ProviderErrorKind::Other, "AppRole login returned no token")
                        })?;
                        Ok(TokenState {
                            token: SecretString::from(auth.client_token.as_str().to_owned()),
                            renew_at: renew_at(auth.lease_duration),
                            renewable: auth.renewable,
                        })
                    }
                    Reply::Refused(r) => {
                        let kind = match r.status {
                            StatusCode::BAD_REQUEST => ProviderErrorKind::Denied,
                            _ => r.kind(),
                        };
                        Err(error(
                            kind,
                            format!(
                                "AppRole login at {} (mount {mount}) failed: {}",
                                self.address,
                                r.describe()
                            ),
                        ))
                    }
                }
            }
        }
    }

    /// Renews the token if it is due; logs in again when renewal fails (AppRole).
    async fn fresh_token(&self) -> Result<SecretString, ProviderError> {
        {
            let state = self.token.read().await;
            if state.renew_at.is_none_or(|at| Instant::now() < at) {
                return Ok(state.token.clone());
            }
        }
        let mut state = self.token.write().await;
        if state.renew_at.is_none_or(|at| Instant::now() < at) {
            return Ok(state.token.clone());
        }
        if state.renewable {
            if let Reply::Ok(body) = self
                .send(Method::POST, "auth/token/renew-self", None, &state.token)
                .await?
            {
                if let Some(auth) = parse::<NoData>(&body, "token renewal")?.1 {
                    state.renew_at = renew_at(auth.lease_duration);
                    state.renewable = auth.renewable;
                    return Ok(state.token.clone());
                }
            }
        }
        match self.auth {
            TransitAuth::AppRole { .. } => {
                *state = self.authenticate().await?;
            }
            // A static token that cannot be renewed: keep using it until refused.
            TransitAuth::Token(_) => state.renew_at = None,
        }
        Ok(state.token.clone())
    }

    /// After a 403: with AppRole, log in again (once), unless another task already did; with
    /// a token, take the token source's current token if it changed (a token file rewritten
    /// by Vault Agent or an operator after the old token was revoked).
    async fn relogin(&self, used: &SecretString) -> Result<bool, ProviderError> {
        if let TransitAuth::Token(source) = &self.auth {
            let now = source.read(KIND, "Vault/OpenBao token")?;
            if now.expose_secret() == used.expose_secret() {
                return Ok(false);
            }
        }
        let mut state = self.token.write().await;
        if state.token.expose_secret() == used.expose_secret() {
            *state = self.authenticate().await?;
        }
        Ok(true)
    }

    // --- HTTP -----------------------------------------------------------------------------

    /// One authenticated request; a 403 triggers one login (AppRole) or token re-read and
    /// a retry.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Reply, ProviderError> {
        let token = self.fresh_token().await?;
        let reply = self
            .send(method.clone(), path, body.clone(), &token)
            .await?;
        match reply {
            Reply::Refused(r) if r.status == StatusCode::FORBIDDEN => {
                if self.relogin(&token).await? {
                    let token = self.fresh_token().await?;
                    self.send(method, path, body, &token).await
                } else {
                    Ok(Reply::Refused(r))
                }
            }
            other => Ok(other),
        }
    }

    /// Sends one request; transport failures are errors, HTTP statuses are replies.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Zeroizing<Vec<u8>>>,
        token: &SecretString,
    ) -> Result<Reply, ProviderError> {
        let url = self.base.join(path).map_err(|e| {
            error(
                ProviderErrorKind::Misconfigured,
                format!("bad request path {path}"),
            )
            .with_source(e)
        })?;
        let mut req = self.http.request(method, url);
        if !token.expose_secret().is_empty() {
            let mut value = HeaderValue::from_str(token.expose_secret()).map_err(|_| {
                error(
                    ProviderErrorKind::Misconfigured,
                    "the token contains characters not allowed in an HTTP header",
                )
            })?;
            value.set_sensitive(true);
            req = req.header("X-Vault-Token", value);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns.clone());
        }
        if let Some(body) = body {
            // Handed over as it is (wiped when reqwest drops it), not copied into a plain
            // `Vec`: the body holds a data key in strict mode, a KEK in hierarchy mode.
            req = req
                .header(CONTENT_TYPE, "application/json")
                .body(reqwest::Body::from(bytes::Bytes::from_owner(body)));
        }
        let transport = |e: reqwest::Error| {
            let addr = &self.address;
            let cause = root_cause(&e);
            let (kind, message) = if is_certificate_error(&e) {
                (
                    ProviderErrorKind::Misconfigured,
                    format!(
                        "the TLS certificate of {addr} does not verify (set ca_file?): {cause}"
                    ),
                )
            } else if e.is_timeout() {
                (
                    ProviderErrorKind::Unavailable,
                    format!("{addr} timed out: {cause}"),
                )
            } else {
                (
                    ProviderErrorKind::Unavailable,
                    format!("cannot reach {addr}: {cause}"),
                )
            };
            error(kind, message).with_source(e)
        };
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_LEN as u64)
        {
            return Err(error(
                ProviderErrorKind::Other,
                format!(
                    "{} sent a response larger than {MAX_RESPONSE_LEN} bytes",
                    self.address
                ),
            ));
        }
        // Sized up front so it does not reallocate (leaving copies of an unwrapped key) as
        // chunks come in; a response without a length is small (this API's answers are).
        let expected = resp.content_length().map_or(16 * 1024, |n| {
            usize::try_from(n).unwrap_or(MAX_RESPONSE_LEN)
        });
        let mut buf = Zeroizing::new(Vec::with_capacity(expected.min(MAX_RESPONSE_LEN)));
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if buf.len() + chunk.len() > MAX_RESPONSE_LEN {
                return Err(error(
                    ProviderErrorKind::Other,
                    format!(
                        "{} sent a response larger than {MAX_RESPONSE_LEN} bytes",
                        self.address
                    ),
                ));
            }
            buf.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok(Reply::Ok(buf));
        }
        let detail = serde_json::from_slice::<ErrorBody>(&buf)
            .ok()
            .and_then(|b| b.errors.into_iter().next())
            .map(|m| m.chars().take(200).collect())
            .unwrap_or_default();
        Ok(Reply::Refused(Refusal { status, detail }))
    }

    fn crypt_body(
        &self,
        plaintext: Option<&str>,
        ciphertext: Option<&str>,
        aad: &[u8],
        derived: bool,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let associated_data = STANDARD.encode(aad);
        let context = derived.then(|| STANDARD.encode(Sha256::digest(aad)));
        // Sized for all of it up front: growing would free a buffer holding the key.
        let capacity = 128
            + plaintext.map_or(0, str::len)
            + ciphertext.map_or(0, str::len)
            + associated_data.len()
            + context.as_ref().map_or(0, String::len);
        let mut body = Zeroizing::new(Vec::with_capacity(capacity));
        serde_json::to_writer(
            &mut *body,
            &CryptRequest {
                plaintext,
                ciphertext,
                associated_data: &associated_data,
                context: context.as_deref(),
            },
        )
        .map_err(|e| error(ProviderErrorKind::Other, "cannot encode the request").with_source(e))?;
        Ok(body)
    }
}

/// When to renew a token with `ttl` seconds left: at two thirds of it.
fn renew_at(ttl: u64) -> Option<Instant> {
    (ttl > 0).then(|| Instant::now() + Duration::from_secs(ttl) * 2 / 3)
}

/// Parses a JSON envelope, returning its `data` and `auth`.
fn parse<T: for<'de> Deserialize<'de>>(
    body: &[u8],
    what: &str,
) -> Result<(T, Option<AuthData>), ProviderError> {
    let bad = || {
        error(
            ProviderErrorKind::Other,
            format!("unexpected {what} response"),
        )
    };
    let env: Envelope<T> = serde_json::from_slice(body).map_err(|e| {
        error(
            ProviderErrorKind::Other,
            format!("unexpected {what} response: {}", crate::json_problem(&e)),
        )
    })?;
    if let Some(warnings) = &env.warnings {
        if warnings
            .iter()
            .any(|w| w.contains("unrecognized parameters"))
        {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "the server ignored parameters of the {what} request (Vault before 1.15?): {}",
                    warnings.join("; ")
                ),
            ));
        }
    }
    match (env.data, env.auth) {
        (Some(data), auth) => Ok((data, auth)),
        (None, auth) => {
            // Login and renewal answers carry `auth` and no `data`.
            let data: T = serde_json::from_slice(b"{}").map_err(|_| bad())?;
            Ok((data, auth))
        }
    }
}

/// A reqwest client on rustls with the ring provider, trusting the CA file or system roots.
fn build_client(config: &TransitConfig) -> Result<reqwest::Client, ProviderError> {
    let misconfigured = |m: String| error(ProviderErrorKind::Misconfigured, m);
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let shown = path.display();
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| misconfigured(format!("cannot read CA file {shown}")).with_source(e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    misconfigured(format!("CA file {shown} is not valid PEM")).with_source(e)
                })?;
            if certs.is_empty() {
                return Err(misconfigured(format!(
                    "CA file {shown} holds no certificate"
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    misconfigured(format!("CA file {shown} holds an unusable certificate"))
                        .with_source(e)
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(misconfigured(
                    "no system CA certificates found; set ca_file".to_owned(),
                ));
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| error(ProviderErrorKind::Other, "TLS setup failed").with_source(e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .https_only(!config.danger_allow_plain_http)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .user_agent(concat!("strongroom/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| error(ProviderErrorKind::Other, "HTTP client setup failed").with_source(e))
}

#[async_trait]
impl KeyProvider for TransitProvider {
    fn kind(&self) -> &str {
        KIND
    }

    fn active_kek(&self) -> Result<KekRef, ProviderError> {
        Ok(self.kek(self.facts().latest))
    }

    async fn wrap(
        &self,
        kek: &KekRef,
        key: &Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, ProviderError> {
        if kek.provider != KIND || kek.key_id != self.key_id {
            return Err(error(
                ProviderErrorKind::UnknownKek,
                format!("KEK {kek} is not transit key {}", self.key_id),
            ));
        }
        let mut facts = self.facts();
        if kek.version > facts.latest {
            facts = self.refresh_facts(false).await?;
        }
        if kek.version > facts.latest {
            return Err(error(
                ProviderErrorKind::UnknownKek,
                format!("transit key {} has no version {}", self.key_id, kek.version),
            ));
        }
        if kek.version < facts.latest {
            return Err(error(
                ProviderErrorKind::KekNotActive,
                format!("{kek} is not the active KEK (v{} is)", facts.latest),
            ));
        }
        let plaintext = Zeroizing::new(STANDARD.encode(key.expose_secret()));
        let body = self.crypt_body(Some(&plaintext), None, aad, facts.derived)?;
        let path = format!("{}/encrypt/{}", self.mount, self.key);
        let body = match self.request(Method::POST, &path, Some(body)).await? {
            Reply::Ok(body) => body,
            Reply::Refused(r) => {
                return Err(error(
                    r.kind(),
                    format!(
                        "encrypt with transit key {} failed: {}",
                        self.key_id,
                        r.describe()
                    ),
                ))
            }
        };
        let data = parse::<EncryptData>(&body, "encrypt")?.0;
        let (version, _) = parse_ciphertext(data.ciphertext.as_bytes()).ok_or_else(|| {
            error(
                ProviderErrorKind::Other,
                "encrypt returned a ciphertext of an unexpected form",
            )
        })?;
        if version != kek.version {
            // Another node rotated: learn the new version, let the caller retry with it.
            let now = self.refresh_facts(false).await?;
            return Err(error(
                ProviderErrorKind::KekNotActive,
                format!(
                    "{kek} is not the active KEK any more (transit key {} is at v{})",
                    self.key_id, now.latest
                ),
            ));
        }
        let bytes = data.ciphertext.into_bytes();
        if bytes.len() > MAX_WRAPPED_KEY_LEN {
            return Err(error(
                ProviderErrorKind::Other,
                "ciphertext too large to store",
            ));
        }
        Ok(WrappedKey {
            kek: kek.clone(),
            bytes,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Key256, UnwrapError> {
        let kek = &wrapped.kek;
        if kek.provider != KIND || kek.key_id != self.key_id {
            return Err(UnwrapError::NotMine(kek.clone()));
        }
        let auth = || {
            error(
                ProviderErrorKind::AuthenticationFailed,
                "wrapped key does not authenticate",
            )
        };
        let mut facts = self.facts();
        if (kek.version > facts.latest || kek.version < facts.min_decryption)
            && facts.read_at.elapsed() >= MISS_REFRESH_INTERVAL
        {
            facts = self.refresh_facts(false).await?;
        }
        if kek.version == 0 || kek.version > facts.latest {
            return Err(error(
                ProviderErrorKind::UnknownKek,
                format!("transit key {} has no version {}", self.key_id, kek.version),
            )
            .into());
        }
        if kek.version < facts.min_decryption {
            return Err(error(
                ProviderErrorKind::KekRetired,
                format!(
                    "{kek} is retired (transit key {} decrypts from v{} on)",
                    self.key_id, facts.min_decryption
                ),
            )
            .into());
        }
        let ciphertext = match parse_ciphertext(&wrapped.bytes) {
            Some((version, text)) if version == kek.version => text,
            _ => return Err(auth().into()),
        };
        let body = self.crypt_body(None, Some(ciphertext), aad, facts.derived)?;
        let path = format!("{}/decrypt/{}", self.mount, self.key);
        let body = match self.request(Method::POST, &path, Some(body)).await? {
            Reply::Ok(body) => body,
            Reply::Refused(r) if r.status == StatusCode::BAD_REQUEST => {
                // Retired meanwhile (min_decryption_version raised), or does not authenticate.
                if facts.read_at.elapsed() > STALE_AFTER_FAILURE {
                    let now = self.refresh_facts(false).await?;
                    if kek.version < now.min_decryption {
                        return Err(error(
                            ProviderErrorKind::KekRetired,
                            format!("{kek} is retired"),
                        )
                        .into());
                    }
                }
                return Err(auth().into());
            }
            Reply::Refused(r) => {
                return Err(error(
                    r.kind(),
                    format!(
                        "decrypt with transit key {} failed: {}",
                        self.key_id,
                        r.describe()
                    ),
                )
                .into())
            }
        };
        let data = parse::<DecryptData>(&body, "decrypt")?.0;
        let plain = Zeroizing::new(
            STANDARD
                .decode(data.plaintext.as_bytes())
                .map_err(|_| auth())?,
        );
        Key256::from_slice(&plain).ok_or_else(|| auth().into())
    }

    async fn health(&self) -> Result<(), ProviderError> {
        self.refresh_facts(false).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertexts_parse_strictly() {
        let body = STANDARD.encode([7u8; CIPHERTEXT_LEN]);
        let ct = format!("vault:v3:{body}");
        assert_eq!(parse_ciphertext(ct.as_bytes()).map(|p| p.0), Some(3));
        for bad in [
            format!("vault:v03:{body}"),
            format!("vault:v:{body}"),
            format!("vault:3:{body}"),
            format!("vault:v3:{body}="),
            format!("vault:v3:{}", &body[1..]),
            format!("vault:v3:{body}\n"),
            format!("vault:v99999999999:{body}"),
            "vault:v3:".to_owned(),
        ] {
            assert!(parse_ciphertext(bad.as_bytes()).is_none(), "{bad}");
        }
        // Non-canonical trailing bits are refused too.
        let short = STANDARD.encode([1u8; 2]);
        assert!(parse_ciphertext(format!("vault:v1:{short}").as_bytes()).is_none());
    }

    #[test]
    fn names_go_into_urls_safely() {
        assert!(valid_name("transit", true));
        assert!(valid_name("team-a/transit", true));
        assert!(!valid_name("team-a/transit", false));
        for bad in ["", "../sys", "a//b", "/a", "a/", "a b", "a?b", "a%2f"] {
            assert!(!valid_name(bad, true), "{bad}");
        }
    }

    #[test]
    fn refusals_are_classified_by_status() {
        let r = |s: u16| Refusal {
            status: StatusCode::from_u16(s).unwrap(),
            detail: String::new(),
        };
        assert_eq!(r(403).kind(), ProviderErrorKind::Denied);
        assert_eq!(r(401).kind(), ProviderErrorKind::Denied);
        assert_eq!(r(503).kind(), ProviderErrorKind::Unavailable);
        assert_eq!(r(429).kind(), ProviderErrorKind::Unavailable);
        assert_eq!(r(404).kind(), ProviderErrorKind::Misconfigured);
        assert_eq!(r(307).kind(), ProviderErrorKind::Misconfigured);
        assert_eq!(r(400).kind(), ProviderErrorKind::Other);
    }

    #[tokio::test]
    async fn plain_http_is_refused_unless_allowed_for_loopback() {
        let auth = TransitAuth::Token(SecretSource::Env("UNUSED".into()));
        let e =
            TransitProvider::connect(TransitConfig::new("http://127.0.0.1:1", "k", auth.clone()))
                .await
                .unwrap_err();
        assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
        assert!(e.to_string().contains("must be https://"), "{e}");
        let mut c = TransitConfig::new("http://10.1.2.3:8200", "k", auth);
        c.danger_allow_plain_http = true;
        let e = TransitProvider::connect(c).await.unwrap_err();
        assert!(e.to_string().contains("loopback addresses only"), "{e}");
    }

    /// A password in the address would be quoted by every error that names the address.
    #[tokio::test]
    async fn credentials_in_the_address_are_refused_unquoted() {
        let auth = TransitAuth::Token(SecretSource::Env("UNUSED".into()));
        for address in [
            "https://u:S3cretPw@127.0.0.1:1",
            "https://S3cretPw@127.0.0.1:1",
            "https://u:S3cretPw@[::1",
        ] {
            let e = TransitProvider::connect(TransitConfig::new(address, "k", auth.clone()))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ProviderErrorKind::Misconfigured, "{address}");
            assert!(!e.to_string().contains("S3cretPw"), "{e}");
        }
    }
}
