//! The cost of auditing on put and reveal throughput: the in-process router over SQLite
//! (`synchronous=FULL`) and the fake key provider, `C` concurrent callers for a fixed time,
//! with auditing off and on.
//!
//! `cargo run --release -p strongroom-api --example audit_cost [-- SECONDS CONCURRENCY]`
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use strongroom_api::{hash_token, ApiLimits, AppState, AuthSettings, Authenticator, TokenEntry};
use strongroom_core::policy::Policy;
use strongroom_core::{SystemClock, Vault, VaultConfig};
use strongroom_crypto::testing::FakeProvider;
use strongroom_crypto::OsRandom;
use strongroom_store::sqlite::SqliteStore;
use tower::ServiceExt;

const SERVICE: &str = "svc-bench-0123456789abcdef";

async fn router(audit: bool, dir: &std::path::Path) -> axum::Router {
    let store = Arc::new(SqliteStore::open_dir(dir).await.unwrap());
    let keys = Arc::new(FakeProvider::new("bench", 1));
    let vault = Arc::new(Vault::new(
        store.clone(),
        keys.clone(),
        Arc::new(OsRandom),
        Arc::new(SystemClock),
        VaultConfig::default(),
    ));
    let auth = Authenticator::new(AuthSettings {
        service_tokens: vec![TokenEntry {
            name: "bench".into(),
            sha256: hash_token(SERVICE),
        }],
        ..Default::default()
    })
    .unwrap();
    let policy = Policy::from_toml(
        "[[rule]]\nservice = \"bench\"\noperations = [\"write\", \"reveal\"]\ncredentials = [\"*\"]\n",
    )
    .unwrap();
    let state = AppState::new(vault, auth, policy, ApiLimits::default());
    if audit {
        let key = strongroom_core::audit::load_or_create_head_key(&*store, &*keys, &OsRandom)
            .await
            .unwrap();
        state.set_auditor(strongroom_core::audit::Auditor::start(
            Arc::new((*store).clone()),
            key,
            None,
        ));
    }
    strongroom_api::router(state)
}

fn req(method: &str, path: String, body: String) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {SERVICE}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

async fn run(r: &axum::Router, reveal: bool, secs: u64, conc: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for t in 0..conc {
        let r = r.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < until {
                let name = format!("bench.c{t}");
                let resp = if reveal {
                    r.clone()
                        .oneshot(req(
                            "POST",
                            format!("/v1/owners/owner{t}/credentials/{name}/reveal"),
                            String::new(),
                        ))
                        .await
                        .unwrap()
                } else {
                    r.clone()
                        .oneshot(req(
                            "PUT",
                            format!("/v1/owners/owner{t}/credentials/{name}"),
                            format!("{{\"value\":\"value-{i}\"}}"),
                        ))
                        .await
                        .unwrap()
                };
                assert!(resp.status().is_success(), "{}", resp.status());
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let conc = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    println!("{secs} s per run, {conc} concurrent callers, SQLite synchronous=FULL");
    for audit in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let r = router(audit, dir.path()).await;
        let puts = run(&r, false, secs, conc).await;
        let reveals = run(&r, true, secs, conc).await;
        println!(
            "audit {:>3}: put {puts:>8.0}/s   reveal {reveals:>8.0}/s",
            if audit { "on" } else { "off" }
        );
    }
}
