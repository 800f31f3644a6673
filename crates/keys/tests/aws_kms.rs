//! The AWS KMS provider against a real KMS API: moto_server started by
//! `scripts/lib/moto.sh` (`STRONGROOM_TEST_KMS_ENDPOINT`, dummy `AWS_*` credentials).

#![cfg(feature = "aws-kms")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use strongroom_crypto::testing::check_provider;
use strongroom_crypto::{Key256, KeyProvider, OsRandom, ProviderErrorKind, UnwrapError};
use strongroom_keys::{AwsKmsConfig, AwsKmsProvider};

const ENDPOINT: &str = "STRONGROOM_TEST_KMS_ENDPOINT";
const SCRIPT: &str = "moto.sh";

/// An SDK client for the emulator, to create and disable keys (what an operator does).
async fn admin(endpoint: &str) -> aws_sdk_kms::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_kms::Client::new(&config)
}

/// Creates a symmetric key; returns `(key id, ARN)`.
async fn create_key(admin: &aws_sdk_kms::Client) -> (String, String) {
    let out = admin
        .create_key()
        .description("strongroom test")
        .send()
        .await
        .unwrap();
    let meta = out.key_metadata().unwrap();
    (meta.key_id().to_owned(), meta.arn().unwrap().to_owned())
}

fn config(endpoint: &str, key_id: &str) -> AwsKmsConfig {
    let mut c = AwsKmsConfig::new(key_id);
    c.endpoint_url = Some(endpoint.to_owned());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite_with_a_key_arn() {
    let endpoint = require_peer!(ENDPOINT, SCRIPT);
    let admin = admin(&endpoint).await;
    let (_, arn) = create_key(&admin).await;
    let provider = AwsKmsProvider::connect(config(&endpoint, &arn))
        .await
        .unwrap();
    let kek = provider.active_kek().unwrap();
    assert_eq!(
        (kek.provider.as_str(), kek.key_id.as_str(), kek.version),
        ("aws-kms", arn.as_str(), 1)
    );
    check_provider(Arc::new(provider)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_with_a_bare_key_id_and_an_explicit_region() {
    let endpoint = require_peer!(ENDPOINT, SCRIPT);
    let admin = admin(&endpoint).await;
    let (id, _) = create_key(&admin).await;
    let mut c = config(&endpoint, &id);
    c.region = Some("us-east-1".into());
    let provider = AwsKmsProvider::connect(c).await.unwrap();
    assert_eq!(provider.active_kek().unwrap().key_id, id);
    provider.health().await.unwrap();
    let key = Key256::generate(&OsRandom).unwrap();
    let kek = provider.active_kek().unwrap();
    let w = provider.wrap(&kek, &key, b"aad").await.unwrap();
    let back = provider.unwrap(&w, b"aad").await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
    // Wrap under a version KMS does not have.
    let mut v2 = kek.clone();
    v2.version = 2;
    let e = provider.wrap(&v2, &key, b"aad").await.unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::UnknownKek);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ciphertext_of_another_kms_key_does_not_unwrap() {
    let endpoint = require_peer!(ENDPOINT, SCRIPT);
    let admin = admin(&endpoint).await;
    let (_, arn_a) = create_key(&admin).await;
    let (_, arn_b) = create_key(&admin).await;
    let a = AwsKmsProvider::connect(config(&endpoint, &arn_a))
        .await
        .unwrap();
    let b = AwsKmsProvider::connect(config(&endpoint, &arn_b))
        .await
        .unwrap();
    let key = Key256::generate(&OsRandom).unwrap();
    let mut w = a.wrap(&a.active_kek().unwrap(), &key, b"x").await.unwrap();
    assert!(matches!(
        b.unwrap(&w, b"x").await,
        Err(UnwrapError::NotMine(_))
    ));
    // Relabelled as B's: B pins its own KeyId, so KMS refuses.
    w.kek = b.active_kek().unwrap();
    assert!(matches!(
        b.unwrap(&w, b"x").await,
        Err(UnwrapError::Failed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_stops_start_up_and_fails_health() {
    let endpoint = require_peer!(ENDPOINT, SCRIPT);
    let admin = admin(&endpoint).await;
    let (id, arn) = create_key(&admin).await;
    let provider = AwsKmsProvider::connect(config(&endpoint, &arn))
        .await
        .unwrap();
    admin.disable_key().key_id(&id).send().await.unwrap();

    let e = AwsKmsProvider::connect(config(&endpoint, &arn))
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Denied, "{e}");
    let msg = e.to_string();
    assert!(msg.starts_with("key provider 'aws-kms'"), "{msg}");
    assert!(
        msg.contains(&arn) && msg.contains("not enabled") && msg.contains("Disabled"),
        "{msg}"
    );

    let e = provider.health().await.unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Denied, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_id_stops_start_up() {
    let endpoint = require_peer!(ENDPOINT, SCRIPT);
    let id = "11111111-2222-3333-4444-555555555555";
    let e = AwsKmsProvider::connect(config(&endpoint, id))
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured, "{e}");
    let msg = e.to_string();
    assert!(msg.starts_with("key provider 'aws-kms'"), "{msg}");
    assert!(
        msg.contains("DescribeKey") && msg.contains(id) && msg.contains("NotFoundException"),
        "{msg}"
    );

    let e = AwsKmsProvider::connect(config(&endpoint, ""))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_stops_start_up_quickly() {
    // Needs the dummy credentials moto.sh exports; the endpoint itself is a closed port.
    let _ = require_peer!(ENDPOINT, SCRIPT);
    let mut c = config("http://127.0.0.1:9", "11111111-2222-3333-4444-555555555555");
    c.connect_timeout = Duration::from_secs(2);
    c.max_attempts = 2;
    let started = std::time::Instant::now();
    let e = AwsKmsProvider::connect(c).await.unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Unavailable, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("cannot reach KMS"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Something other than KMS at the endpoint (a proxy's HTML error page): the error gives the
/// HTTP status and says so, where it said "unknown error", and a 5xx is an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_an_aws_error_code_names_its_status() {
    // Needs the dummy credentials moto.sh exports; the endpoint is a stand-in proxy.
    let _ = require_peer!(ENDPOINT, SCRIPT);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let page = "<html><body>502 Bad Gateway</body></html>";
                let answer = format!(
                    "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    let mut c = config(
        &format!("http://{addr}"),
        "11111111-2222-3333-4444-555555555555",
    );
    c.max_attempts = 1;
    let e = AwsKmsProvider::connect(c).await.unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.kind(), ProviderErrorKind::Unavailable, "{msg}");
    assert!(
        msg.contains("HTTP 502") && !msg.contains("unknown error"),
        "{msg}"
    );
}
