//! User tokens signed with each asymmetric algorithm Strongroom accepts (RS256, ES256, EdDSA),
//! from a PEM public key and from a JWKS document: the right key verifies, and the wrong key,
//! another algorithm, a tampered token and an expired one do not.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use strongroom_api::{
    AuthFailure, AuthSettings, Authenticator, JwtAlgorithm, JwtKeySource, JwtSettings,
};

const RSA_KEY: &str = include_str!("fixtures/jwt-rs256-test-key.pem");
const RSA_PUB: &str = include_str!("fixtures/jwt-rs256-test-pub.pem");
const RSA_JWKS: &str = include_str!("fixtures/jwt-rs256-test-jwks.json");

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, sub: &str, exp: u64) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let claims =
        serde_json::json!({"sub": sub, "exp": exp, "iss": "https://idp.test", "aud": "strongroom"});
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn authenticator(keys: JwtKeySource) -> Authenticator {
    Authenticator::new(AuthSettings {
        jwt: Some(JwtSettings {
            issuer: Some("https://idp.test".into()),
            audience: Some("strongroom".into()),
            on_behalf_of_audience: None,
            leeway_seconds: 5,
            keys,
        }),
        ..Default::default()
    })
    .unwrap()
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Flips one character of the signature part.
fn tampered(token: &str) -> String {
    let mut t = token.to_owned().into_bytes();
    let i = t.len() - 5;
    t[i] = if t[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(t).unwrap()
}

struct Signer {
    alg: Algorithm,
    kid: &'static str,
    key: EncodingKey,
}

impl Signer {
    fn token(&self, sub: &str) -> String {
        sign(self.alg, Some(self.kid), &self.key, sub, now() + 600)
    }
}

fn rsa() -> Signer {
    Signer {
        alg: Algorithm::RS256,
        kid: "rsa-test-1",
        key: EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap(),
    }
}

fn ed25519() -> (Signer, KeyPair) {
    let pair = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let key = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap();
    (
        Signer {
            alg: Algorithm::EdDSA,
            kid: "ed-test-1",
            key,
        },
        pair,
    )
}

fn p256() -> (Signer, KeyPair) {
    let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    (
        Signer {
            alg: Algorithm::ES256,
            kid: "ec-test-1",
            key,
        },
        pair,
    )
}

/// Every check a verifier for `good` must pass; `other` signs with another key, which the
/// verifier must never take for `good`'s (and must refuse outright unless it trusts it too).
fn assert_verifies(auth: &Authenticator, good: &Signer, other: &Signer, other_trusted: bool) {
    assert_eq!(
        auth.verify_user(&good.token("alice")).as_deref(),
        Ok("alice")
    );
    assert_eq!(
        auth.verify_user(&tampered(&good.token("alice"))),
        Err(AuthFailure::Invalid)
    );
    let expired = sign(good.alg, Some(good.kid), &good.key, "alice", now() - 3600);
    assert_eq!(auth.verify_user(&expired), Err(AuthFailure::Invalid));
    // Another key (of another algorithm), even claiming the good key's id.
    let own = auth.verify_user(&other.token("mallory"));
    if other_trusted {
        assert_eq!(own.as_deref(), Ok("mallory"));
    } else {
        assert_eq!(own, Err(AuthFailure::Invalid));
    }
    let posing = sign(
        other.alg,
        Some(good.kid),
        &other.key,
        "mallory",
        now() + 600,
    );
    assert_eq!(auth.verify_user(&posing), Err(AuthFailure::Invalid));
}

#[test]
fn rs256_from_a_pem_public_key() {
    let auth = authenticator(JwtKeySource::PublicKeyPem {
        algorithm: JwtAlgorithm::Rs256,
        pem: RSA_PUB.as_bytes().to_vec(),
    });
    assert_verifies(&auth, &rsa(), &ed25519().0, false);
    // A token without a kid is verified by the one configured key.
    let no_kid = sign(Algorithm::RS256, None, &rsa().key, "bob", now() + 600);
    assert_eq!(auth.verify_user(&no_kid).as_deref(), Ok("bob"));
}

/// The RSA parser would take the private key too and then verify nothing (every user 401,
/// nothing said): refused when the settings are built, at start or on reload.
#[test]
fn a_private_key_given_as_the_public_key_is_refused() {
    let err = Authenticator::new(AuthSettings {
        jwt: Some(JwtSettings {
            issuer: None,
            audience: None,
            on_behalf_of_audience: None,
            leeway_seconds: 5,
            keys: JwtKeySource::PublicKeyPem {
                algorithm: JwtAlgorithm::Rs256,
                pem: RSA_KEY.as_bytes().to_vec(),
            },
        }),
        ..Default::default()
    })
    .map(|_| ())
    .expect_err("a private key was accepted as the public key");
    assert!(err.to_string().contains("private key"), "{err}");
}

#[test]
fn eddsa_from_a_pem_public_key() {
    let (ed, pair) = ed25519();
    let auth = authenticator(JwtKeySource::PublicKeyPem {
        algorithm: JwtAlgorithm::EdDsa,
        pem: pair.public_key_pem().into_bytes(),
    });
    assert_verifies(&auth, &ed, &rsa(), false);
    // Another Ed25519 key is still the wrong key.
    assert_eq!(
        auth.verify_user(&ed25519().0.token("mallory")),
        Err(AuthFailure::Invalid)
    );
}

#[test]
fn rs256_es256_and_eddsa_side_by_side_in_one_jwks() {
    let (ed, ed_pair) = ed25519();
    let (ec, ec_pair) = p256();
    let mut jwks: serde_json::Value = serde_json::from_str(RSA_JWKS).unwrap();
    let ec_point = ec_pair.public_key_raw(); // uncompressed: 0x04 || x || y
    let keys = jwks["keys"].as_array_mut().unwrap();
    keys.push(serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "kid": ed.kid, "alg": "EdDSA",
        "x": b64url(ed_pair.public_key_raw()),
    }));
    keys.push(serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": ec.kid, "alg": "ES256",
        "x": b64url(&ec_point[1..33]), "y": b64url(&ec_point[33..65]),
    }));
    let auth = authenticator(JwtKeySource::Jwks(jwks.to_string()));
    let rs = rsa();
    for (good, other) in [(&rs, &ed), (&ed, &ec), (&ec, &rs)] {
        assert_verifies(&auth, good, other, true);
    }
    // A key the JWKS does not hold, under an id it does not know.
    let (stranger, _) = ed25519();
    let unknown = sign(
        stranger.alg,
        Some("nobody"),
        &stranger.key,
        "mallory",
        now() + 600,
    );
    assert_eq!(auth.verify_user(&unknown), Err(AuthFailure::Invalid));
}
