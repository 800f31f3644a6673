//! The AWS KMS provider (cargo feature `aws-kms`): data keys are wrapped by KMS `Encrypt` under
//! one symmetric KMS key, and unwrapped by `Decrypt` with that key pinned.
//!
//! # What is bound
//!
//! Every `Encrypt` and `Decrypt` carries the encryption context
//! `{"strongroom-aad-sha256": base64(SHA-256(aad))}`, where `aad` is the associated data the
//! caller passes (it binds the data key to its record and KEK). KMS authenticates the
//! encryption context as AES-GCM associated data, so a wrapped key only decrypts with the same
//! `aad`. The digest, rather than the `aad` itself, keeps the context small and fixed-size
//! (KMS limits its size), and keeps owner and credential names out of CloudTrail, which logs
//! the context in clear; an operator who wants to match a CloudTrail entry to a record computes
//! the same digest. SHA-256 is collision resistant, so the binding is as strong as binding the
//! `aad` itself. `Decrypt` also pins `KeyId` to the configured key, so a ciphertext made under
//! another KMS key is refused (`IncorrectKeyException`) rather than silently decrypted.
//!
//! The wrapped bytes are the KMS `CiphertextBlob` as returned (about 150–200 bytes on AWS).
//!
//! # KEK versions and rotation
//!
//! [`KekRef`] is `{ provider: "aws-kms", key_id: <key id or ARN as configured>, version: 1 }`:
//! KMS rotates its key material internally (automatic or on-demand rotation) while keeping the
//! key id, and old ciphertexts keep decrypting, so Strongroom sees a single version. There is
//! nothing to `rotate()` here. Moving to another KMS key (or away from KMS) is a Strongroom
//! rewrap from one provider to another: configure the new key as a second provider and rewrap.
//!
//! Configure the key by **key ARN** (or key id) rather than an alias: the configured string is
//! stored in every [`KekRef`], and re-pointing an alias at another key would make old
//! ciphertexts fail with `IncorrectKeyException`.
//!
//! # What the operator sets up
//!
//! * A symmetric encryption key (`KeySpec` `SYMMETRIC_DEFAULT`, `KeyUsage`
//!   `ENCRYPT_DECRYPT`), enabled; automatic rotation on is recommended.
//! * For Strongroom's principal: `kms:DescribeKey`, `kms:Encrypt` and `kms:Decrypt` on that key
//!   (a key-policy condition on `kms:EncryptionContextKeys` = `strongroom-aad-sha256` is a good
//!   extra fence).
//! * Credentials from the default AWS chain (environment, profile, web identity, ECS, IMDS)
//!   and a region from the config or `AWS_REGION`. [`AwsKmsConfig::endpoint_url`] points at a
//!   VPC endpoint or an emulator (moto in the tests).
//!
//! # Failure modes
//!
//! [`AwsKmsProvider::connect`] calls `DescribeKey` and makes one wrap/unwrap round trip (plus a
//! decrypt under other associated data, which must fail), so a wrong key id
//! ([`ProviderErrorKind::Misconfigured`]), a disabled or pending-deletion key, missing
//! permissions or bad credentials ([`ProviderErrorKind::Denied`]) and an unreachable endpoint
//! ([`ProviderErrorKind::Unavailable`]) stop start-up with one message. At run time, throttling,
//! timeouts and KMS internal errors are [`ProviderErrorKind::Unavailable`] (the SDK has
//! already retried, [`AwsKmsConfig::max_attempts`] times), `InvalidCiphertextException` and
//! `IncorrectKeyException` are [`ProviderErrorKind::AuthenticationFailed`]. Errors are
//! classified by the SDK's typed variants and error codes, never by message text.
//!
//! The SDK serialises the plaintext data key into its request body and reads the response
//! into its own buffers; those are freed but not zeroized (see the crate docs).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::operation::decrypt::DecryptError;
use aws_sdk_kms::operation::describe_key::DescribeKeyError;
use aws_sdk_kms::operation::encrypt::EncryptError;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{EncryptionAlgorithmSpec, KeySpec, KeyState, KeyUsageType};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};
use strongroom_crypto::provider::{MAX_KEK_ID_LEN, MAX_WRAPPED_KEY_LEN};
use strongroom_crypto::{
    KekRef, Key256, KeyProvider, ProviderError, ProviderErrorKind, UnwrapError, WrappedKey,
};
use zeroize::Zeroizing;

/// The provider kind in [`KekRef::provider`].
pub const KIND: &str = "aws-kms";
/// The encryption-context key that carries the digest of the associated data.
pub const CONTEXT_KEY: &str = "strongroom-aad-sha256";
/// The only KEK version this provider reports (KMS rotates internally).
pub const VERSION: u32 = 1;
/// Largest `CiphertextBlob` KMS accepts.
const MAX_CIPHERTEXT_LEN: usize = 6144;

/// Configuration of the AWS KMS provider.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AwsKmsConfig {
    /// The KMS key: key ARN (recommended), key id, or alias (see the module docs).
    pub key_id: String,
    /// The AWS region; `None` takes it from the default chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Another endpoint than the region's default: a VPC endpoint, or an emulator such as
    /// `http://127.0.0.1:PORT` for moto. `https://`, or `http://` to a loopback address only:
    /// data keys and KEKs cross this connection.
    pub endpoint_url: Option<String>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one KMS call, retries included.
    pub operation_timeout: Duration,
    /// Attempts per call, first one included (the SDK's standard retry mode, with backoff).
    pub max_attempts: u32,
}

impl AwsKmsConfig {
    /// A configuration for `key_id` with the defaults: region and credentials from the
    /// default chain, the region's endpoint, 5 s connect and 30 s operation timeouts, 3
    /// attempts.
    pub fn new(key_id: impl Into<String>) -> Self {
        Self {
            key_id: key_id.into(),
            region: None,
            endpoint_url: None,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            max_attempts: 3,
        }
    }
}

/// Data keys wrapped by one AWS KMS key. See the [module docs](self).
pub struct AwsKmsProvider {
    client: aws_sdk_kms::Client,
    key_id: String,
    region: String,
}

impl std::fmt::Debug for AwsKmsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKmsProvider")
            .field("key_id", &self.key_id)
            .field("region", &self.region)
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

impl AwsKmsProvider {
    /// Builds the client, checks the key with `DescribeKey`, and runs a wrap/unwrap
    /// self-test.
    ///
    /// # Errors
    ///
    /// One [`ProviderError`] naming what failed: [`ProviderErrorKind::Misconfigured`] for an
    /// empty or unknown key id, no region, a key of the wrong kind or missing credentials;
    /// [`ProviderErrorKind::Denied`] for a disabled key, a key pending deletion, refused
    /// credentials or missing permissions; [`ProviderErrorKind::Unavailable`] when KMS cannot be
    /// reached.
    pub async fn connect(config: AwsKmsConfig) -> Result<Self, ProviderError> {
        if config.key_id.is_empty() || config.key_id.len() > MAX_KEK_ID_LEN {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!("key_id must be 1 to {MAX_KEK_ID_LEN} bytes"),
            ));
        }
        if config.max_attempts == 0 {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                "max_attempts must be at least 1",
            ));
        }
        if let Some(url) = &config.endpoint_url {
            check_endpoint(url, "endpoint_url")?;
        }
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(config.connect_timeout)
                    .operation_timeout(config.operation_timeout)
                    .build(),
            )
            .retry_config(
                aws_config::retry::RetryConfig::standard().with_max_attempts(config.max_attempts),
            );
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        let sdk_config = loader.load().await;
        // Without `endpoint_url`, the SDK takes one from AWS_ENDPOINT_URL_KMS,
        // AWS_ENDPOINT_URL or the profile: held to the same rule.
        if config.endpoint_url.is_none() {
            if let Some(url) = configured_endpoint(&sdk_config) {
                check_endpoint(
                    &url,
                    "the endpoint from AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL or the AWS \
                     profile's endpoint_url",
                )?;
            }
        }
        let region = sdk_config.region().map(|r| r.to_string()).ok_or_else(|| {
            error(
                ProviderErrorKind::Misconfigured,
                "no AWS region: set `region` in the configuration or AWS_REGION",
            )
        })?;
        let provider = Self {
            client: aws_sdk_kms::Client::new(&sdk_config),
            key_id: config.key_id,
            region,
        };
        provider.check_key().await?;
        strongroom_crypto::provider::self_test(&provider).await?;
        Ok(provider)
    }

    /// The key id or ARN as configured (the [`KekRef::key_id`]).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// `DescribeKey`: the key exists, is enabled, and is a symmetric encryption key.
    async fn check_key(&self) -> Result<(), ProviderError> {
        let out = self
            .client
            .describe_key()
            .key_id(&self.key_id)
            .send()
            .await
            .map_err(|e| self.classify(e, "DescribeKey", describe_kind))?;
        let meta = out.key_metadata().ok_or_else(|| {
            error(
                ProviderErrorKind::Other,
                format!("DescribeKey of {} returned no key metadata", self.key_id),
            )
        })?;
        match meta.key_state() {
            Some(KeyState::Enabled) => {}
            state => {
                let state = state.map_or("unknown", |s| s.as_str());
                return Err(error(
                    ProviderErrorKind::Denied,
                    format!(
                        "key {} in {} is not enabled (key state {state}); enable it or \
                         configure another key",
                        self.key_id, self.region
                    ),
                ));
            }
        }
        // (An absent field is left to the self-test: emulators omit some.)
        if meta
            .key_usage()
            .is_some_and(|u| *u != KeyUsageType::EncryptDecrypt)
            || meta
                .key_spec()
                .is_some_and(|s| *s != KeySpec::SymmetricDefault)
        {
            return Err(error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "key {} is not a symmetric encryption key (KeySpec SYMMETRIC_DEFAULT, \
                     KeyUsage ENCRYPT_DECRYPT)",
                    self.key_id
                ),
            ));
        }
        Ok(())
    }

    fn kek(&self) -> KekRef {
        KekRef {
            provider: KIND.to_owned(),
            key_id: self.key_id.clone(),
            version: VERSION,
        }
    }

    fn context(aad: &[u8]) -> HashMap<String, String> {
        HashMap::from([(CONTEXT_KEY.to_owned(), STANDARD.encode(Sha256::digest(aad)))])
    }

    /// Turns an SDK error into an opaque [`ProviderError`], by the SDK's error kinds.
    fn classify<E>(
        &self,
        err: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
        op: &str,
        service_kind: fn(&E) -> Option<ProviderErrorKind>,
    ) -> ProviderError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let key = &self.key_id;
        let (kind, message) = match &err {
            SdkError::ServiceError(s) if s.err().code().is_none() => {
                // No AWS error in the answer: usually a proxy or load balancer between us
                // and KMS, whose status says more than "unknown error".
                let status = s.raw().status().as_u16();
                let kind = match status {
                    401 | 403 => ProviderErrorKind::Denied,
                    429 | 500..=599 => ProviderErrorKind::Unavailable,
                    _ => ProviderErrorKind::Other,
                };
                (
                    kind,
                    format!(
                        "{op} with key {key} failed: HTTP {status} with no AWS error code \
                         (is something other than KMS answering at the endpoint?)"
                    ),
                )
            }
            SdkError::ServiceError(s) => {
                let e = s.err();
                let code = e.code().unwrap_or("unknown error");
                let kind = service_kind(e).unwrap_or_else(|| code_kind(e.code()));
                let detail = e.message().map(|m| format!(": {m}")).unwrap_or_default();
                (kind, format!("{op} with key {key} failed: {code}{detail}"))
            }
            SdkError::TimeoutError(_) => (
                ProviderErrorKind::Unavailable,
                format!("{op} with key {key} timed out (KMS in {})", self.region),
            ),
            SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => (
                ProviderErrorKind::Unavailable,
                format!(
                    "cannot reach KMS in {} for {op}: {}",
                    self.region,
                    root_cause(&err)
                ),
            ),
            SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) => (
                ProviderErrorKind::Misconfigured,
                format!("{op} could not be sent: {}", root_cause(&err)),
            ),
            SdkError::ResponseError(_) => (
                ProviderErrorKind::Unavailable,
                format!("{op}: unreadable response from KMS: {}", root_cause(&err)),
            ),
            _ => (
                ProviderErrorKind::Other,
                format!("{op} with key {key} failed: {}", root_cause(&err)),
            ),
        };
        error(kind, message).with_source(err)
    }
}

/// Kinds for error codes the SDK leaves unmodelled (common AWS errors).
/// The endpoint the SDK would take from the environment or the profile, as the KMS client
/// resolves it: the service's own setting first, then the global one.
fn configured_endpoint(sdk: &aws_config::SdkConfig) -> Option<String> {
    let key = aws_types::service_config::ServiceConfigKey::builder()
        .service_id("KMS")
        .env("AWS_ENDPOINT_URL")
        .profile("endpoint_url")
        .build()
        .ok()?;
    sdk.service_config()
        .and_then(|c| c.load_config(key))
        .or_else(|| sdk.endpoint_url().map(str::to_owned))
}

/// `endpoint_url` must be `https://`, or `http://` to this machine (an emulator): plain
/// HTTP elsewhere would carry data keys and KEKs readable on the wire. No user name or
/// password in it either: the SDK takes credentials from its chain.
fn check_endpoint(url: &str, what: &str) -> Result<(), ProviderError> {
    // Shown without anything before an `@` (a user name and password), with or without a
    // scheme, and without a query or fragment (a token): none may reach a log.
    let shown = {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let rest = match rest.rsplit_once('@') {
            Some((_, host)) => format!("…@{host}"),
            None => rest.to_owned(),
        };
        if scheme.is_empty() {
            rest
        } else {
            format!("{scheme}://{rest}")
        }
    };
    let bad = |why: &str| {
        error(
            ProviderErrorKind::Misconfigured,
            format!("{what} '{shown}': {why}"),
        )
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("must be https://host[:port][/path]"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(bad("must not hold a user name or password"));
    }
    // host[:port], or [v6][:port]
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    if host.is_empty() {
        return Err(bad("names no host"));
    }
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Ok(()),
        "http" if crate::loopback_host(host) => Ok(()),
        "http" => Err(bad(
            "plain http is allowed to a loopback address only (an emulator); use https://",
        )),
        _ => Err(bad("must be https://")),
    }
}

fn code_kind(code: Option<&str>) -> ProviderErrorKind {
    match code {
        Some(
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "IncompleteSignature"
            | "ExpiredTokenException"
            | "InvalidClientTokenId"
            | "MissingAuthenticationToken",
        ) => ProviderErrorKind::Denied,
        Some(
            "ThrottlingException"
            | "LimitExceededException"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "InternalFailure"
            | "RequestTimeout",
        ) => ProviderErrorKind::Unavailable,
        _ => ProviderErrorKind::Other,
    }
}

fn describe_kind(e: &DescribeKeyError) -> Option<ProviderErrorKind> {
    Some(match e {
        DescribeKeyError::NotFoundException(_) | DescribeKeyError::InvalidArnException(_) => {
            ProviderErrorKind::Misconfigured
        }
        DescribeKeyError::DependencyTimeoutException(_)
        | DescribeKeyError::KmsInternalException(_) => ProviderErrorKind::Unavailable,
        _ => return None,
    })
}

fn encrypt_kind(e: &EncryptError) -> Option<ProviderErrorKind> {
    Some(match e {
        EncryptError::DisabledException(_)
        | EncryptError::KeyUnavailableException(_)
        | EncryptError::KmsInvalidStateException(_)
        | EncryptError::InvalidGrantTokenException(_) => ProviderErrorKind::Denied,
        EncryptError::NotFoundException(_) => ProviderErrorKind::UnknownKek,
        EncryptError::InvalidKeyUsageException(_) => ProviderErrorKind::Misconfigured,
        EncryptError::DependencyTimeoutException(_) | EncryptError::KmsInternalException(_) => {
            ProviderErrorKind::Unavailable
        }
        _ => return None,
    })
}

fn decrypt_kind(e: &DecryptError) -> Option<ProviderErrorKind> {
    Some(match e {
        DecryptError::InvalidCiphertextException(_) | DecryptError::IncorrectKeyException(_) => {
            ProviderErrorKind::AuthenticationFailed
        }
        DecryptError::DisabledException(_)
        | DecryptError::KeyUnavailableException(_)
        | DecryptError::KmsInvalidStateException(_)
        | DecryptError::InvalidGrantTokenException(_) => ProviderErrorKind::Denied,
        DecryptError::NotFoundException(_) => ProviderErrorKind::UnknownKek,
        DecryptError::InvalidKeyUsageException(_) => ProviderErrorKind::Misconfigured,
        DecryptError::DependencyTimeoutException(_) | DecryptError::KmsInternalException(_) => {
            ProviderErrorKind::Unavailable
        }
        // Malformed ciphertext the service refused before trying it.
        _ if e.code() == Some("ValidationException") => ProviderErrorKind::AuthenticationFailed,
        _ => return None,
    })
}

#[async_trait]
impl KeyProvider for AwsKmsProvider {
    fn kind(&self) -> &str {
        KIND
    }

    fn active_kek(&self) -> Result<KekRef, ProviderError> {
        Ok(self.kek())
    }

    async fn wrap(
        &self,
        kek: &KekRef,
        key: &Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, ProviderError> {
        if kek.provider != KIND || kek.key_id != self.key_id || kek.version != VERSION {
            return Err(error(
                ProviderErrorKind::UnknownKek,
                format!("KEK {kek} is not this provider's key {}", self.kek()),
            ));
        }
        let out = self
            .client
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(key.expose_secret().to_vec()))
            .set_encryption_context(Some(Self::context(aad)))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|e| self.classify(e, "Encrypt", encrypt_kind))?;
        let bytes = out
            .ciphertext_blob
            .map(Blob::into_inner)
            .filter(|b| !b.is_empty() && b.len() <= MAX_WRAPPED_KEY_LEN)
            .ok_or_else(|| {
                error(
                    ProviderErrorKind::Other,
                    "Encrypt returned no ciphertext, or one too large to store",
                )
            })?;
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
        if kek.version != VERSION {
            return Err(error(
                ProviderErrorKind::UnknownKek,
                format!(
                    "AWS KMS keys have only version {VERSION}, not {}",
                    kek.version
                ),
            )
            .into());
        }
        let auth = || {
            error(
                ProviderErrorKind::AuthenticationFailed,
                "wrapped key does not authenticate",
            )
        };
        if wrapped.bytes.is_empty() || wrapped.bytes.len() > MAX_CIPHERTEXT_LEN {
            return Err(auth().into());
        }
        let mut out = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(wrapped.bytes.clone()))
            .set_encryption_context(Some(Self::context(aad)))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|e| self.classify(e, "Decrypt", decrypt_kind))?;
        let plain = Zeroizing::new(
            out.plaintext
                .take()
                .map(Blob::into_inner)
                .unwrap_or_default(),
        );
        Key256::from_slice(&plain).ok_or_else(|| auth().into())
    }

    async fn health(&self) -> Result<(), ProviderError> {
        self.check_key().await
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_kms::types::error::{
        DisabledException, IncorrectKeyException, InvalidCiphertextException, NotFoundException,
    };

    use super::*;

    #[test]
    fn context_is_a_fixed_size_digest_of_the_aad() {
        let a = AwsKmsProvider::context(b"owner/name/v1");
        assert_eq!(a.len(), 1);
        let v = &a[CONTEXT_KEY];
        assert_eq!(v.len(), 44);
        assert_ne!(a, AwsKmsProvider::context(b"owner/name/v2"));
        assert_eq!(AwsKmsProvider::context(b"").len(), 1);
    }

    #[test]
    fn endpoints_are_https_or_plain_http_to_this_machine() {
        for ok in [
            "https://kms.eu-west-1.amazonaws.com",
            "https://vpce-1.kms.eu-west-1.vpce.amazonaws.com:443/",
            "http://127.0.0.1:4566",
            "http://localhost:4566/",
            "HTTP://[::1]:5000",
            "http://[::ffff:127.0.0.1]:5000",
        ] {
            check_endpoint(ok, "endpoint_url").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, says) in [
            ("http://kms.internal:4566", "loopback address only"),
            ("http://10.0.0.5", "loopback address only"),
            ("http://127.0.0.1.evil.example", "loopback address only"),
            ("http://user:pw@127.0.0.1:4566", "user name or password"),
            (
                "https://AKIA:secret-canary@kms.example",
                "user name or password",
            ),
            ("ftp://127.0.0.1", "must be https://"),
            ("AKIA:secret-canary@kms.example", "must be https://"),
            (
                "http://kms.example/?token=secret-canary",
                "loopback address only",
            ),
            ("kms.eu-west-1.amazonaws.com", "must be https://"),
            ("https://", "names no host"),
        ] {
            let e = check_endpoint(bad, "endpoint_url").unwrap_err();
            assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
            assert!(e.to_string().contains(says), "{bad}: {e}");
            assert!(!e.to_string().contains("secret-canary"), "{e}");
        }
    }

    #[test]
    fn decrypt_errors_are_classified_by_kind() {
        let k = |e| decrypt_kind(&e);
        assert_eq!(
            k(DecryptError::InvalidCiphertextException(
                InvalidCiphertextException::builder().build()
            )),
            Some(ProviderErrorKind::AuthenticationFailed)
        );
        assert_eq!(
            k(DecryptError::IncorrectKeyException(
                IncorrectKeyException::builder().build()
            )),
            Some(ProviderErrorKind::AuthenticationFailed)
        );
        assert_eq!(
            k(DecryptError::DisabledException(
                DisabledException::builder().build()
            )),
            Some(ProviderErrorKind::Denied)
        );
        assert_eq!(
            k(DecryptError::NotFoundException(
                NotFoundException::builder().build()
            )),
            Some(ProviderErrorKind::UnknownKek)
        );
        assert_eq!(
            encrypt_kind(&EncryptError::DisabledException(
                DisabledException::builder().build()
            )),
            Some(ProviderErrorKind::Denied)
        );
        assert_eq!(
            code_kind(Some("AccessDeniedException")),
            ProviderErrorKind::Denied
        );
        assert_eq!(
            code_kind(Some("ThrottlingException")),
            ProviderErrorKind::Unavailable
        );
        assert_eq!(code_kind(None), ProviderErrorKind::Other);
    }
}
