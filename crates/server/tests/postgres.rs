//! `store.kind = "postgres"`: the server over a real PostgreSQL (from
//! `STRONGROOM_TEST_POSTGRES_URL`, as the store's tests; `scripts/test` starts one and sets
//! `STRONGROOM_REQUIRE_POSTGRES=1`, which turns a missing URL into a failure).

mod common;

use std::io::Write;

use common::{spawn, Fixture, SERVICE_TOKEN};
use serde_json::json;

fn postgres_url() -> Option<String> {
    match std::env::var("STRONGROOM_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert_ne!(
                std::env::var("STRONGROOM_REQUIRE_POSTGRES").as_deref(),
                Ok("1"),
                "STRONGROOM_REQUIRE_POSTGRES=1 but STRONGROOM_TEST_POSTGRES_URL is unset"
            );
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPING the server-over-PostgreSQL test: STRONGROOM_TEST_POSTGRES_URL is unset ***\n"
            );
            None
        }
    }
}

#[tokio::test]
async fn serves_over_postgres() {
    let Some(url) = postgres_url() else { return };
    let fx = Fixture::new();
    let schema = format!("srv_{}", std::process::id());
    let extra = format!(
        "[store]\nkind = \"postgres\"\nurl = {url:?}\nschema = \"{schema}\"\nmax_connections = 4\n"
    );
    let server = spawn(fx.config_from(&fx.toml("", &extra))).await;
    let client = server.client(fx.client_options());
    assert_eq!(client.get("/readyz", None).await.unwrap().status, 200);
    let alice = fx.user_token("alice");
    let r = client
        .json(
            "PUT",
            "/v1/me/credentials/zoom.pg",
            Some(&alice),
            &json!({"value": "in-postgres"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = client
        .json(
            "POST",
            "/v1/owners/alice/credentials/zoom.pg/reveal",
            Some(SERVICE_TOKEN),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(r.json()["value"], "in-postgres");
    server.stop().await.unwrap();
    // Nothing was written under data_dir: SQLite was never opened.
    assert!(!fx.data_dir.join("strongroom.db").exists());
}
