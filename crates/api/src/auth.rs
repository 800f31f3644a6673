//! Who is calling: users (JWT bearer tokens), services (bearer service tokens or mutual-TLS
//! certificates) and admins (admin tokens or certificates).
//!
//! * The configuration holds only SHA-256 digests of service and admin tokens; a presented
//!   token is hashed and compared in constant time against every entry.
//! * JWTs are checked against keys that each fix their algorithm, so `alg: none` and
//!   algorithm confusion (an RSA public key used as an HMAC secret) cannot pass: the header's
//!   `alg` must equal the algorithm of the key that verifies it. `exp` is required; `nbf`,
//!   `iss` and `aud` are checked (the last two when configured) with a small leeway.
//! * Certificates: the server verifies the chain during the TLS handshake and hands the
//!   client certificate's subject alternative names to the router as a [`PeerCertificate`]
//!   extension; a SAN mapped in the configuration names the service or admin.

use std::collections::HashMap;

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
    /// A JWKS document (JSON); each key's algorithm comes from its `alg` or key type.
    Jwks(String),
}

/// User-token settings.
pub struct JwtSettings {
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock leeway for `exp` and `nbf`, in seconds.
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

struct VerifyKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer tokens and certificates.
pub struct Authenticator {
    keys: Vec<VerifyKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    service_tokens: Vec<TokenEntry>,
    admin_tokens: Vec<TokenEntry>,
    mtls_services: HashMap<String, String>,
    mtls_admins: HashMap<String, String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt_keys", &self.keys.len())
            .field("service_tokens", &self.service_tokens.len())
            .field("admin_tokens", &self.admin_tokens.len())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
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
        let mut keys = Vec::new();
        let (mut issuer, mut audience, mut leeway) = (None, None, 30);
        if let Some(jwt) = settings.jwt {
            issuer = jwt.issuer;
            audience = jwt.audience;
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
                    .map_err(|e| AuthConfigError(format!("public key: {e}")))?;
                    keys.push(VerifyKey {
                        kid: None,
                        algorithm: algorithm.to_jwt(),
                        key,
                    });
                }
                JwtKeySource::Jwks(json) => {
                    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&json)
                        .map_err(|e| AuthConfigError(format!("JWKS: {e}")))?;
                    for jwk in &set.keys {
                        let algorithm = jwk_algorithm(jwk)?;
                        let key = DecodingKey::from_jwk(jwk)
                            .map_err(|e| AuthConfigError(format!("JWKS key: {e}")))?;
                        keys.push(VerifyKey {
                            kid: jwk.common.key_id.clone(),
                            algorithm,
                            key,
                        });
                    }
                    if keys.is_empty() {
                        return Err(AuthConfigError("the JWKS holds no keys".into()));
                    }
                }
            }
        }
        Ok(Self {
            keys,
            issuer,
            audience,
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
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Invalid)?;
        for k in &self.keys {
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
            match &self.audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    required.push("aud");
                }
                None => v.validate_aud = false,
            }
            v.set_required_spec_claims(&required);
            if let Ok(data) = jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                let sub = data.claims.sub;
                if sub.is_empty() || sub.len() > 255 {
                    return Err(AuthFailure::Invalid);
                }
                return Ok(sub);
            }
        }
        Err(AuthFailure::Invalid)
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
        Self::verify_holder(&self.service_tokens, &self.mtls_services, bearer, peer)
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
        Self::verify_holder(&self.admin_tokens, &self.mtls_admins, bearer, peer)
    }

    fn verify_holder(
        tokens: &[TokenEntry],
        by_san: &HashMap<String, String>,
        bearer: Option<&str>,
        peer: Option<&PeerCertificate>,
    ) -> Result<String, AuthFailure> {
        if let Some(peer) = peer {
            if let Some(name) = peer
                .subject_alt_names
                .iter()
                .find_map(|san| by_san.get(san))
            {
                return Ok(name.clone());
            }
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

fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Result<Algorithm, AuthConfigError> {
    use jsonwebtoken::jwk::{AlgorithmParameters, KeyAlgorithm};
    let declared = jwk.common.key_algorithm.map(|a| match a {
        KeyAlgorithm::RS256 => Ok(Algorithm::RS256),
        KeyAlgorithm::ES256 => Ok(Algorithm::ES256),
        KeyAlgorithm::EdDSA => Ok(Algorithm::EdDSA),
        other => Err(AuthConfigError(format!(
            "JWKS key algorithm {other:?} is not accepted (RS256, ES256, EdDSA)"
        ))),
    });
    match (declared, &jwk.algorithm) {
        (Some(alg), _) => alg,
        (None, AlgorithmParameters::RSA(_)) => Ok(Algorithm::RS256),
        (None, AlgorithmParameters::EllipticCurve(_)) => Ok(Algorithm::ES256),
        (None, AlgorithmParameters::OctetKeyPair(_)) => Ok(Algorithm::EdDSA),
        (None, AlgorithmParameters::OctetKey(_)) => Err(AuthConfigError(
            "symmetric keys in a JWKS are not accepted; configure an HS256 secret instead".into(),
        )),
    }
}
