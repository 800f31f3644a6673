//! Put and reveal throughput through the key provider a configuration names: run it once with
//! `keys.mode = "hierarchy"` (the default) and once with `"strict"` to see what wrapping every
//! data key at the provider costs.
//!
//! ```text
//! cargo run --release -p strongroom-server --example key_modes -- CONFIG.toml [SECONDS] [CONCURRENCY]
//! ```
//!
//! In process, through `Vault` (no HTTP, no audit), so the difference between two runs is the
//! key provider: CONCURRENCY tasks put for SECONDS (each put: a fresh data key, wrapped, then
//! a durable write), then reveal what they wrote for SECONDS (each reveal: a store read, an
//! unwrap, an AES-GCM open). Prints one markdown row: ops/s (over the wall time of each phase)
//! and p50/p99 latency of each.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use strongroom_core::PutRequest;
use strongroom_crypto::SecretBytes;
use strongroom_server::config::{Config, Overrides};
use strongroom_server::Backends;

struct Tally {
    ops: u64,
    latencies: Vec<Duration>,
}

fn summary(label: &str, tallies: Vec<Tally>, seconds: f64) -> String {
    let ops: u64 = tallies.iter().map(|t| t.ops).sum();
    let mut all: Vec<Duration> = tallies.into_iter().flat_map(|t| t.latencies).collect();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    format!(
        "{label} {:.0}/s (p50 {:.2} ms, p99 {:.2} ms)",
        ops as f64 / seconds,
        pct(0.5),
        pct(0.99)
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let config_file = PathBuf::from(
        args.next()
            .ok_or("usage: key_modes CONFIG [SECONDS] [CONCURRENCY]")?,
    );
    let seconds: f64 = args.next().map_or(Ok(5.0), |s| s.parse())?;
    let concurrency: usize = args.next().map_or(Ok(16), |s| s.parse())?;
    let config = Config::load_for_operator(Some(&config_file), &Overrides::default())?;
    let backends = Backends::open(&config).await?;
    let vault = backends.vault();
    let kek = backends.keyring.active_kek()?;
    let run = format!("{:x}", std::process::id());

    let window = Duration::from_secs_f64(seconds);
    let phase = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (vault, run) = (vault.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let owner = format!("bench-{run}-{t}");
            let mut tally = Tally {
                ops: 0,
                latencies: Vec::new(),
            };
            let start = Instant::now();
            while start.elapsed() < window {
                let name = format!("key-{}", tally.ops % 100);
                let t0 = Instant::now();
                vault
                    .put(PutRequest {
                        owner: &owner,
                        name: &name,
                        value: SecretBytes::from_slice(b"sk_live_0123456789abcdefghijklmnop"),
                        metadata: None,
                        expected_version: None,
                        created_by: "service:bench",
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                tally.latencies.push(t0.elapsed());
                tally.ops += 1;
                // A store read that needs no I/O completes without yielding: let the other
                // tasks run, as other connections would.
                tokio::task::yield_now().await;
            }
            Ok::<_, String>(tally)
        }));
    }
    let mut puts = Vec::new();
    for t in tasks {
        puts.push(t.await??);
    }
    let put_seconds = phase.elapsed().as_secs_f64();
    let phase = Instant::now();
    let written: Vec<u64> = puts.iter().map(|t| t.ops.min(100)).collect();

    let mut tasks = Vec::new();
    for (t, written) in written.into_iter().enumerate() {
        let (vault, run) = (vault.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let owner = format!("bench-{run}-{t}");
            let mut tally = Tally {
                ops: 0,
                latencies: Vec::new(),
            };
            let start = Instant::now();
            while start.elapsed() < window && written > 0 {
                let name = format!("key-{}", tally.ops % written);
                let t0 = Instant::now();
                let r = vault
                    .reveal(&owner, &name, None)
                    .await
                    .map_err(|e| e.to_string())?;
                if r.value.expose_secret() != b"sk_live_0123456789abcdefghijklmnop" {
                    return Err("revealed another value".to_owned());
                }
                tally.latencies.push(t0.elapsed());
                tally.ops += 1;
                tokio::task::yield_now().await;
            }
            Ok::<_, String>(tally)
        }));
    }
    let mut reveals = Vec::new();
    for t in tasks {
        reveals.push(t.await??);
    }
    let reveal_seconds = phase.elapsed().as_secs_f64();
    println!(
        "| {} | {} | {} | {} |",
        config.keys.provider.as_str(),
        config.keys.mode.as_str(),
        summary("put", puts, put_seconds),
        summary("reveal", reveals, reveal_seconds),
    );
    eprintln!("(active KEK {kek}, concurrency {concurrency}, {seconds} s each)");
    backends.close().await;
    Ok(())
}
