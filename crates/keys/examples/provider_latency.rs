//! Wrap and unwrap latency per key provider, against the peers the test scripts start.
//!
//! ```text
//! . scripts/lib/softhsm.sh && softhsm_start
//! . scripts/lib/moto.sh && moto_start
//! . scripts/lib/openbao.sh && openbao_start
//! cargo run --release -p strongroom-keys --example provider_latency -- [ITERATIONS] [CONCURRENCY]
//! ```
//!
//! For each provider whose peer is configured (same variables as the integration tests), it
//! creates a fresh key, runs ITERATIONS (default 300) sequential wrap+unwrap pairs after a
//! warm-up and prints the median, p90 and p99 of each operation, then runs CONCURRENCY
//! (default 16) tasks for two seconds and prints the wrap+unwrap pairs per second. The local
//! keyring runs as a baseline. Providers without a peer are skipped with a note.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strongroom_crypto::{Key256, KeyProvider, OsRandom};
use strongroom_keys::{
    AwsKmsConfig, AwsKmsProvider, Pkcs11Config, Pkcs11Provider, SecretSource, TransitAuth,
    TransitConfig, TransitProvider,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn unique(prefix: &str) -> String {
    let mut b = [0u8; 6];
    strongroom_crypto::SecureRandom::fill(&OsRandom, &mut b).expect("random");
    format!(
        "{prefix}-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

async fn measure(name: &str, p: Arc<dyn KeyProvider>, n: usize, concurrency: usize) -> Result<()> {
    let kek = p.active_kek()?;
    let key = Key256::generate(&OsRandom)?;
    let aad = b"owner=bench;name=api-key;version=1".to_vec();
    for _ in 0..20 {
        let w = p.wrap(&kek, &key, &aad).await?;
        p.unwrap(&w, &aad).await?;
    }
    let (mut wraps, mut unwraps) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        let w = p.wrap(&kek, &key, &aad).await?;
        wraps.push(t.elapsed());
        let t = Instant::now();
        p.unwrap(&w, &aad).await?;
        unwraps.push(t.elapsed());
    }
    let mut pairs: Vec<Duration> = wraps.iter().zip(&unwraps).map(|(a, b)| *a + *b).collect();
    wraps.sort();
    unwraps.sort();
    pairs.sort();

    let deadline = Instant::now() + Duration::from_secs(2);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (p, kek, aad) = (p.clone(), kek.clone(), aad.clone());
        tasks.push(tokio::spawn(async move {
            let key = Key256::generate(&OsRandom).expect("random");
            let mut done = 0u64;
            while Instant::now() < deadline {
                let w = p.wrap(&kek, &key, &aad).await.expect("wrap");
                p.unwrap(&w, &aad).await.expect("unwrap");
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    println!(
        "{name:<10} wrap p50 {} p90 {} p99 {} | unwrap p50 {} p90 {} p99 {} | pair p50 {} | \
         {concurrency} tasks: {rate:.0} pairs/s",
        ms(percentile(&wraps, 0.5)),
        ms(percentile(&wraps, 0.9)),
        ms(percentile(&wraps, 0.99)),
        ms(percentile(&unwraps, 0.5)),
        ms(percentile(&unwraps, 0.9)),
        ms(percentile(&unwraps, 0.99)),
        ms(percentile(&pairs, 0.5)),
    );
    Ok(())
}

async fn kms() -> Result<Option<Arc<dyn KeyProvider>>> {
    let Some(endpoint) = env("STRONGROOM_TEST_KMS_ENDPOINT") else {
        return Ok(None);
    };
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .endpoint_url(&endpoint)
        .load()
        .await;
    let out = aws_sdk_kms::Client::new(&sdk).create_key().send().await?;
    let arn = out
        .key_metadata()
        .and_then(|m| m.arn())
        .ok_or("no ARN")?
        .to_owned();
    let mut c = AwsKmsConfig::new(arn);
    c.endpoint_url = Some(endpoint);
    Ok(Some(Arc::new(AwsKmsProvider::connect(c).await?)))
}

async fn pkcs11() -> Result<Option<Arc<dyn KeyProvider>>> {
    let (Some(module), Some(token), Some(pin)) = (
        env("STRONGROOM_TEST_SOFTHSM_MODULE"),
        env("STRONGROOM_TEST_SOFTHSM_TOKEN"),
        env("STRONGROOM_TEST_SOFTHSM_PIN_FILE"),
    ) else {
        return Ok(None);
    };
    let c = Pkcs11Config::new(
        module,
        token,
        SecretSource::File(pin.into()),
        unique("bench"),
    );
    Ok(Some(Arc::new(Pkcs11Provider::generate(c).await?)))
}

async fn transit() -> Result<Option<Arc<dyn KeyProvider>>> {
    let (Some(addr), Some(_), Some(ca)) = (
        env("STRONGROOM_TEST_OPENBAO_ADDR"),
        env("STRONGROOM_TEST_OPENBAO_TOKEN"),
        env("STRONGROOM_TEST_OPENBAO_CACERT"),
    ) else {
        return Ok(None);
    };
    let key = unique("bench");
    // Create the key with the bao CLI that ships with OpenBao (openbao.sh exports OPENBAO_BIN).
    let bin = env("OPENBAO_BIN").unwrap_or_else(|| "bao".into());
    let status = std::process::Command::new(bin)
        .args(["write", "-f", &format!("transit/keys/{key}")])
        .env("BAO_ADDR", &addr)
        .env("BAO_CACERT", &ca)
        .env(
            "BAO_TOKEN",
            env("STRONGROOM_TEST_OPENBAO_TOKEN").unwrap_or_default(),
        )
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        return Err("bao write transit/keys failed".into());
    }
    let mut c = TransitConfig::new(
        addr,
        key,
        TransitAuth::Token(SecretSource::Env("STRONGROOM_TEST_OPENBAO_TOKEN".into())),
    );
    c.ca_file = Some(ca.into());
    Ok(Some(Arc::new(TransitProvider::connect(c).await?)))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(300);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    println!("{n} sequential wrap+unwrap pairs per provider, then {concurrency} concurrent tasks for 2 s");

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keyring.json");
    strongroom_keys::local::generate(&path, time::OffsetDateTime::now_utc(), &OsRandom)?;
    let local = strongroom_keys::local::LocalKeyring::open(&path)?;
    measure("local", Arc::new(local), n, concurrency).await?;

    for (name, provider) in [
        ("pkcs11", pkcs11().await?),
        ("aws-kms", kms().await?),
        ("transit", transit().await?),
    ] {
        match provider {
            Some(p) => measure(name, p, n, concurrency).await?,
            None => println!("{name:<10} skipped: its peer is not configured (see scripts/lib)"),
        }
    }
    Ok(())
}
