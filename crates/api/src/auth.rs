//! Who is calling: users (JWT bearer tokens), services (bearer service tokens or mutual-TLS
//! certificates) and admins (admin tokens or certificates).
//!
//! * The configuration holds only SHA-256 digests of service and admin tokens; a presented
//!   token is hashed and compared in constant time against every entry.
//! * JWTs are checked against keys that each fix their algorithm, so `alg: none` and
//!   algorithm confusion (an RSA public key used as an HMAC secret) cannot pass: the header's
//!   `alg` must equal the algorithm of the key that verifies it. `exp` is required; `nbf`,
//!   `iat` (not in the future), `iss` and `aud` are checked (the last two when configured)
//!   with a small leeway.
//! * Keys come from an HS256 secret, a PEM public key, a JWKS document, or a JWKS URL
//!   ([`RemoteJwks`](crate::jwks::RemoteJwks): cached, refreshed in the background and,
//!   rate-limited, when a token names an unknown `kid`; see
//!   [`Authenticator::authenticate_user`]).
//! * Certificates: the server verifies the chain during the TLS handshake and hands the
//!   client certificate's subject alternative names to the router as a [`PeerCertificate`]
//!   extension; a SAN mapped in the configuration names the service or admin.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 digest of a bearer token, as kept in the configuration.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A configured token: its holder's name and the token's SHA-256 digest.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    /// Service or admin name.
    pub name: String,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
}

/// JWT algorithms Strongroom accepts for user tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret.
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256.
    Rs256,
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// Ed25519.
    EdDsa,
}

impl JwtAlgorithm {
    fn to_jwt(self) -> Algorithm {
        match self {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
            JwtAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }
}

/// Where user-token verification keys come from.
pub enum JwtKeySource {
    /// An HMAC secret (at least 32 bytes).
    Hs256Secret(zeroize::Zeroizing<Vec<u8>>),
    /// A PEM public key for an asymmetric algorithm.
    PublicKeyPem {
        /// The algorithm this key verifies (and the only one it verifies).
        algorithm: JwtAlgorithm,
        /// PEM text.
        pem: Vec<u8>,
    },
    /// A JWKS document (JSON); each key's algorithm comes from its key type (a declared
    /// `alg` must agree); keys that cannot verify user tokens are skipped.
    Jwks(String),
    /// A JWKS fetched from a URL and kept fresh.
    Remote(Arc<crate::jwks::RemoteJwks>),
}

/// User-token settings.
pub struct JwtSettings {
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// The `aud` a user token presented by a delegated service
    /// (`X-Strongroom-On-Behalf-Of`) must carry instead of `audience`, if set; a token
    /// carrying it is refused on the user's own routes, so a service holding one reaches
    /// only what its policy rule allows.
    pub on_behalf_of_audience: Option<String>,
    /// Clock leeway for `exp`, `nbf` and `iat`, in seconds.
    pub leeway_seconds: u64,
    /// Verification keys.
    pub keys: JwtKeySource,
}

/// Everything the authenticator needs.
#[derive(Default)]
pub struct AuthSettings {
    /// User tokens; `None` means no user can authenticate.
    pub jwt: Option<JwtSettings>,
    /// Service bearer tokens.
    pub service_tokens: Vec<TokenEntry>,
    /// Admin bearer tokens.
    pub admin_tokens: Vec<TokenEntry>,
    /// Client-certificate SAN → service name.
    pub mtls_services: HashMap<String, String>,
    /// Client-certificate SAN → admin name.
    pub mtls_admins: HashMap<String, String>,
}

/// A client certificate the TLS layer verified; inserted as a request extension by the server.
#[derive(Clone, Debug, Default)]
pub struct PeerCertificate {
    /// Its subject alternative names (DNS names and URIs, as text).
    pub subject_alt_names: Vec<String>,
}

/// A configuration the authenticator refuses. Names the problem, never a secret.
#[derive(Debug, thiserror::Error)]
#[error("auth configuration: {0}")]
pub struct AuthConfigError(pub String);

pub(crate) struct VerifyKey {
    pub(crate) kid: Option<String>,
    pub(crate) algorithm: Algorithm,
    pub(crate) key: DecodingKey,
}

enum Keys {
    Static(Vec<VerifyKey>),
    Remote(Arc<crate::jwks::RemoteJwks>),
}

/// What checking a user token found.
enum UserCheck {
    Valid(String),
    Invalid,
    /// The token names a `kid` the remote key set lacks (a refresh may bring it).
    UnknownKid,
}

/// Verifies bearer tokens and certificates.
pub struct Authenticator {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    on_behalf_of_audience: Option<String>,
    leeway: u64,
    service_tokens: Vec<TokenEntry>,
    admin_tokens: Vec<TokenEntry>,
    mtls_services: HashMap<String, String>,
    mtls_admins: HashMap<String, String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let jwt_keys = match &self.keys {
            Keys::Static(k) => k.len(),
            Keys::Remote(r) => r.key_count(),
        };
        f.debug_struct("Authenticator")
            .field("jwt_keys", &jwt_keys)
            .field("service_tokens", &self.service_tokens.len())
            .field("admin_tokens", &self.admin_tokens.len())
            .finish_non_exhaustive()
    }
}

/// The claims as this verifier reads them, typed strictly: the JWT library takes an `iss`
/// array as matching when one element does, and an `exp`, `nbf` or `iat` that is not a
/// number as absent (a string `nbf` in the far future passed). Here either fails to decode,
/// and the token is refused.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    aud: Option<Audience>,
    // Checked by the library; typed here so that anything but a string or a number fails.
    #[serde(rename = "iss")]
    _iss: Option<String>,
    #[serde(rename = "exp")]
    _exp: Option<NumericDate>,
    #[serde(rename = "nbf")]
    _nbf: Option<NumericDate>,
    /// Checked here: the library reads it only for a maximum age.
    iat: Option<NumericDate>,
}

/// What a user token is presented for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TokenUse {
    /// The user's own requests (`Authorization` on `/v1/me`).
    Own,
    /// A delegated service's proof that it acts for the user (`X-Strongroom-On-Behalf-Of`).
    OnBehalfOf,
}

/// `aud`: one audience or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, wanted: &str) -> bool {
        match self {
            Audience::One(a) => a == wanted,
            Audience::Many(all) => all.iter().any(|a| a == wanted),
        }
    }
}

/// A time claim the JWT library can check: a number of seconds from 0 to under 2^64. The
/// library skips an `nbf` it cannot read as one (`1e20`, `-1`), so such a token was not
/// held back at all; here it fails to decode. Holds the seconds.
struct NumericDate(f64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = NumericDate;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("seconds since 1970 as a number from 0 to under 2^64")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NumericDate, E> {
                #[allow(clippy::cast_precision_loss)]
                Ok(NumericDate(v as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<NumericDate, E> {
                // The library's own bounds for a fractional time.
                #[allow(clippy::cast_precision_loss)]
                if v.is_finite() && v >= 0.0 && v < u64::MAX as f64 {
                    Ok(NumericDate(v))
                } else {
                    Err(E::custom("time claim out of range"))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Why a credential was not accepted. Deliberately coarse in what reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials were presented.
    Missing,
    /// The credentials are malformed, expired, forged or unknown.
    Invalid,
}

impl Authenticator {
    /// Builds an authenticator, checking every key.
    ///
    /// # Errors
    ///
    /// [`AuthConfigError`] for an unusable key, a short HMAC secret or duplicate names.
    pub fn new(settings: AuthSettings) -> Result<Self, AuthConfigError> {
        Self::build(settings, false)
    }

    /// As [`Authenticator::new`], for a configuration reloaded while serving: a JWKS file
    /// that now holds no usable key is put in force (every user token is refused, with a
    /// warning), not refused. Emptying the file is how an operator revokes its keys; at
    /// start the same file is refused as a mistake.
    ///
    /// # Errors
    ///
    /// As [`Authenticator::new`].
    pub fn reloaded(settings: AuthSettings) -> Result<Self, AuthConfigError> {
        Self::build(settings, true)
    }

    fn build(settings: AuthSettings, reload: bool) -> Result<Self, AuthConfigError> {
        let mut keys = Vec::new();
        let mut remote = None;
        let (mut issuer, mut audience, mut leeway) = (None, None, 30);
        let mut on_behalf_of_audience = None;
        if let Some(jwt) = settings.jwt {
            issuer = jwt.issuer;
            audience = jwt.audience;
            on_behalf_of_audience = jwt.on_behalf_of_audience;
            leeway = jwt.leeway_seconds;
            match jwt.keys {
                JwtKeySource::Hs256Secret(secret) => {
                    if secret.len() < 32 {
                        return Err(AuthConfigError(
                            "the HS256 secret must be at least 32 bytes".into(),
                        ));
                    }
                    keys.push(VerifyKey {
                        kid: None,
                        algorithm: Algorithm::HS256,
                        key: DecodingKey::from_secret(&secret),
                    });
                }
                JwtKeySource::PublicKeyPem { algorithm, pem } => {
                    // The RSA parser takes a private key too, then verifies nothing: every
                    // user would get 401 with nothing said. A private key on the server is a
                    // mistake in any case.
                    if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
                        return Err(AuthConfigError(
                            "public_key_file holds a private key: give the identity provider's public key (`openssl pkey -pubout`)"
                                .into(),
                        ));
                    }
                    let key = match algorithm {
                        JwtAlgorithm::Rs256 => DecodingKey::from_rsa_pem(&pem),
                        JwtAlgorithm::Es256 => DecodingKey::from_ec_pem(&pem),
                        JwtAlgorithm::EdDsa => DecodingKey::from_ed_pem(&pem),
                        JwtAlgorithm::Hs256 => {
                            return Err(AuthConfigError(
                                "HS256 takes a secret, not a public key".into(),
                            ))
                        }
                    }
                    // jsonwebtoken names the failure by its variant (`InvalidKeyFormat`).
                    .map_err(|e| {
                        AuthConfigError(format!(
                            "public key: the file is not a PEM {} public key, as `algorithm` \
                             says it must be ({e})",
                            match algorithm {
                                JwtAlgorithm::Rs256 => "RSA",
                                JwtAlgorithm::Es256 => "EC P-256",
                                _ => "Ed25519",
                            }
                        ))
                    })?;
                    keys.push(VerifyKey {
                        kid: None,
                        algorithm: algorithm.to_jwt(),
                        key,
                    });
                }
                JwtKeySource::Jwks(json) => {
                    let (parsed, skipped) = crate::jwks::parse_jwks(&json, reload)?;
                    if skipped > 0 {
                        tracing::warn!(
                            skipped,
                            "JWKS: keys that cannot verify user tokens were skipped"
                        );
                    }
                    keys = parsed;
                }
                JwtKeySource::Remote(r) => remote = Some(r),
            }
        }
        Ok(Self {
            keys: match remote {
                Some(r) => Keys::Remote(r),
                None => Keys::Static(keys),
            },
            issuer,
            audience,
            on_behalf_of_audience,
            leeway,
            service_tokens: settings.service_tokens,
            admin_tokens: settings.admin_tokens,
            mtls_services: settings.mtls_services,
            mtls_admins: settings.mtls_admins,
        })
    }

    /// The owner id (`sub`) of a valid user token.
    ///
    /// # Errors
    ///
    /// [`AuthFailure::Invalid`] for anything but a valid, unexpired token signed by a
    /// configured key with that key's algorithm.
    pub fn verify_user(&self, token: &str) -> Result<String, AuthFailure> {
        self.verify_user_for(token, TokenUse::Own)
    }

    fn verify_user_for(&self, token: &str, purpose: TokenUse) -> Result<String, AuthFailure> {
        match self.check_user(token, purpose) {
            UserCheck::Valid(sub) => Ok(sub),
            UserCheck::Invalid | UserCheck::UnknownKid => Err(AuthFailure::Invalid),
        }
    }

    /// As [`Authenticator::verify_user`], but a token naming a `kid` that the JWKS fetched
    /// from a URL lacks first makes it refresh (at most once per cooldown, whatever the
    /// tokens say; a refresh already in flight is waited for), so keys the identity
    /// provider has just rotated in are accepted at once.
    ///
    /// # Errors
    ///
    /// As [`Authenticator::verify_user`].
    pub async fn authenticate_user(&self, token: &str) -> Result<String, AuthFailure> {
        self.authenticate_user_for(token, TokenUse::Own).await
    }

    /// As [`Authenticator::authenticate_user`], for the user token a delegated service
    /// presents (`X-Strongroom-On-Behalf-Of`): with `on_behalf_of_audience` set, it must
    /// carry that audience.
    ///
    /// # Errors
    ///
    /// As [`Authenticator::verify_user`].
    pub async fn authenticate_on_behalf_of(&self, token: &str) -> Result<String, AuthFailure> {
        self.authenticate_user_for(token, TokenUse::OnBehalfOf)
            .await
    }

    async fn authenticate_user_for(
        &self,
        token: &str,
        purpose: TokenUse,
    ) -> Result<String, AuthFailure> {
        match self.check_user(token, purpose) {
            UserCheck::Valid(sub) => Ok(sub),
            UserCheck::Invalid => Err(AuthFailure::Invalid),
            UserCheck::UnknownKid => {
                let Keys::Remote(remote) = &self.keys else {
                    return Err(AuthFailure::Invalid);
                };
                if !remote.refresh_for_unknown_kid().await {
                    return Err(AuthFailure::Invalid);
                }
                self.verify_user_for(token, purpose)
            }
        }
    }

    /// The JWKS fetched from a URL, when user keys come from one.
    pub fn remote_jwks(&self) -> Option<&Arc<crate::jwks::RemoteJwks>> {
        match &self.keys {
            Keys::Remote(r) => Some(r),
            Keys::Static(_) => None,
        }
    }

    pub(crate) fn bind_metrics(&self, metrics: &crate::jwks::JwksMetrics) {
        if let Keys::Remote(r) = &self.keys {
            r.bind_metrics(metrics);
        }
    }

    fn check_user(&self, token: &str, purpose: TokenUse) -> UserCheck {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return UserCheck::Invalid;
        };
        if names_critical_extensions(token) {
            return UserCheck::Invalid;
        }
        let remote_keys;
        let keys: &[VerifyKey] = match &self.keys {
            Keys::Static(k) => k,
            Keys::Remote(r) => {
                // Older than max_stale: no key is trusted; a token naming a kid may still
                // cause a (rate-limited) refresh.
                remote_keys = r.keys();
                remote_keys.as_deref().unwrap_or(&[])
            }
        };
        for k in keys {
            if k.algorithm != header.alg {
                continue;
            }
            if let (Some(want), Some(got)) = (&k.kid, &header.kid) {
                if want != got {
                    continue;
                }
            }
            let mut v = Validation::new(k.algorithm);
            v.leeway = self.leeway;
            v.validate_nbf = true;
            let mut required = vec!["exp", "sub"];
            if let Some(iss) = &self.issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            let audience = match purpose {
                TokenUse::Own => self.audience.as_ref(),
                TokenUse::OnBehalfOf => self
                    .on_behalf_of_audience
                    .as_ref()
                    .or(self.audience.as_ref()),
            };
            match audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    required.push("aud");
                }
                None => v.validate_aud = false,
            }
            v.set_required_spec_claims(&required);
            if let Ok(data) = jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                // Issued in the future (beyond the leeway): a clock that cannot be trusted, or
                // a token made to outlive its `exp` check elsewhere. Refused, like an `nbf`
                // still to come.
                if let Some(iat) = &data.claims.iat {
                    #[allow(clippy::cast_precision_loss)]
                    let latest = (jsonwebtoken::get_current_timestamp() + self.leeway) as f64;
                    if iat.0 > latest {
                        return UserCheck::Invalid;
                    }
                }
                // A token for delegation is not the user's own: a service holding one would
                // otherwise reach every user route, not only what its rule allows.
                if let (TokenUse::Own, Some(delegation)) = (purpose, &self.on_behalf_of_audience) {
                    if data
                        .claims
                        .aud
                        .as_ref()
                        .is_some_and(|a| a.contains(delegation))
                    {
                        return UserCheck::Invalid;
                    }
                }
                let sub = data.claims.sub;
                // The subject is the owner id: one that could own nothing is no user.
                if !strongroom_crypto::binding::is_valid_owner(&sub) {
                    return UserCheck::Invalid;
                }
                return UserCheck::Valid(sub);
            }
        }
        // Not verified. A remote key set may lack the token's `kid` because the identity
        // provider has rotated keys since the last fetch.
        if let (Keys::Remote(_), Some(kid)) = (&self.keys, &header.kid) {
            let asymmetric = matches!(
                header.alg,
                Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
            );
            if asymmetric && !keys.iter().any(|k| k.kid.as_deref() == Some(kid.as_str())) {
                return UserCheck::UnknownKid;
            }
        }
        UserCheck::Invalid
    }

    /// The service a bearer token or certificate belongs to.
    ///
    /// # Errors
    ///
    /// [`AuthFailure::Missing`] when neither is presented, else [`AuthFailure::Invalid`].
    pub fn verify_service(
        &self,
        bearer: Option<&str>,
        peer: Option<&PeerCertificate>,
    ) -> Result<String, AuthFailure> {
        self.verify_holder("service", &self.service_tokens, bearer, peer)
    }

    /// The admin a bearer token or certificate belongs to.
    ///
    /// # Errors
    ///
    /// As [`Authenticator::verify_service`].
    pub fn verify_admin(
        &self,
        bearer: Option<&str>,
        peer: Option<&PeerCertificate>,
    ) -> Result<String, AuthFailure> {
        self.verify_holder("admin", &self.admin_tokens, bearer, peer)
    }

    /// The identity a client certificate's names map to, of either kind (service or
    /// admin): none when no name is mapped, [`AuthFailure::Invalid`] when they map to two.
    ///
    /// # Errors
    ///
    /// [`AuthFailure::Invalid`] for a certificate of two identities.
    pub fn certificate_identity(
        &self,
        peer: Option<&PeerCertificate>,
    ) -> Result<Option<(&'static str, &str)>, AuthFailure> {
        let Some(peer) = peer else {
            return Ok(None);
        };
        let mut found = None;
        for san in &peer.subject_alt_names {
            let mapped = [
                ("service", &self.mtls_services),
                ("admin", &self.mtls_admins),
            ]
            .into_iter()
            .filter_map(|(kind, map)| map.get(san).map(|name| (kind, name.as_str())));
            for identity in mapped {
                if found.is_some_and(|f| f != identity) {
                    return Err(AuthFailure::Invalid);
                }
                found = Some(identity);
            }
        }
        Ok(found)
    }

    fn verify_holder(
        &self,
        kind: &'static str,
        tokens: &[TokenEntry],
        bearer: Option<&str>,
        peer: Option<&PeerCertificate>,
    ) -> Result<String, AuthFailure> {
        // One credential per request, and one identity per certificate, whatever their
        // kinds: a certificate whose names map to two identities, or a mapped certificate
        // plus a bearer token, would leave which one acts to an order nobody wrote down (a
        // service certificate with an admin's token was served as both).
        if let Some((mapped_kind, name)) = self.certificate_identity(peer)? {
            if bearer.is_some() || mapped_kind != kind {
                return Err(AuthFailure::Invalid);
            }
            return Ok(name.to_owned());
        }
        let Some(token) = bearer else {
            return Err(AuthFailure::Missing);
        };
        let digest = hash_token(token);
        // Compare with every entry, without stopping early, so timing says nothing.
        let mut found: Option<&TokenEntry> = None;
        for entry in tokens {
            if bool::from(entry.sha256.ct_eq(&digest)) {
                found = Some(entry);
            }
        }
        found.map(|e| e.name.clone()).ok_or(AuthFailure::Invalid)
    }
}

/// `text` on one line (serde messages may span several).
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether the token's header has a `crit` member: extensions the recipient must understand
/// or reject the token (RFC 7515, 4.1.11). This verifier understands none, and the JWT
/// library ignores the member. A header that does not decode here (`crit` twice) counts as
/// naming some: the library would read it and ignore both.
fn names_critical_extensions(token: &str) -> bool {
    use base64::Engine;
    #[derive(serde::Deserialize)]
    struct Header {
        crit: Option<serde::de::IgnoredAny>,
    }
    let Some((header, _)) = token.split_once('.') else {
        return true;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|json| serde_json::from_slice::<Header>(&json).ok())
        .is_none_or(|h| h.crit.is_some())
}
