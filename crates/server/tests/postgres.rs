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

/// Over TLS when the cluster offers it (`pg_start` does): `sslmode=require` and the test CA
/// as `store.tls_ca_file`.
#[tokio::test]
async fn serves_over_postgres() {
    let Some(url) = postgres_url() else { return };
    let fx = Fixture::new();
    let schema = format!("srv_{}", std::process::id());
    let tls = match std::env::var("STRONGROOM_TEST_POSTGRES_CA") {
        Ok(ca) => format!("tls_ca_file = {ca:?}\n"),
        Err(_) => String::new(),
    };
    let url = if tls.is_empty() {
        url
    } else {
        format!("{url}?sslmode=require")
    };
    let extra = format!(
        "[store]\nkind = \"postgres\"\nurl = {url:?}\nschema = \"{schema}\"\nmax_connections = 4\n{tls}"
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

    // PostgreSQL's text and JSONB cannot hold U+0000. A NUL in a path (even from nobody:
    // every /v1 request is audited) or in metadata is a 400 or 401, and the audit log
    // keeps taking records: the reveal after them still works.
    for (method, path, token, body) in [
        (
            "POST",
            "/v1/owners/a%00b/credentials/zoom.pg/reveal",
            None,
            json!({}),
        ),
        (
            "POST",
            "/v1/owners/a%00b/credentials/zoom.pg/reveal",
            Some(SERVICE_TOKEN),
            json!({}),
        ),
        (
            "PUT",
            "/v1/owners/a%00b/credentials/zoom.pg",
            Some(SERVICE_TOKEN),
            json!({"value": "v"}),
        ),
        (
            "PUT",
            "/v1/me/credentials/zoom.pg",
            Some(alice.as_str()),
            json!({"value": "v", "metadata": {"k": "a\u{0}b"}}),
        ),
    ] {
        let r = client.json(method, path, token, &body).await.unwrap();
        assert!(
            r.status == 400 || r.status == 401,
            "{method} {path}: {} {}",
            r.status,
            r.text()
        );
    }
    let r = client
        .json(
            "POST",
            "/v1/owners/alice/credentials/zoom.pg/reveal",
            Some(SERVICE_TOKEN),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(client.get("/readyz", None).await.unwrap().status, 200);
    let r = client
        .get("/v1/audit?owner=a%00b", Some(common::ADMIN_TOKEN))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let r = client
        .get("/v1/audit", Some(common::ADMIN_TOKEN))
        .await
        .unwrap();
    assert!(
        r.text().contains(r"a\\u{0}b"),
        "the refused request is recorded, its NUL escaped: {}",
        r.text()
    );
    server.stop().await.unwrap();
    // Nothing was written under data_dir: SQLite was never opened.
    assert!(!fx.data_dir.join("strongroom.db").exists());
}

/// Operator commands open an existing store only. On a schema without Strongroom's tables,
/// `Backends::open_existing` fails and makes nothing (a second try fails the same way). Once
/// the server's own open has made them, it opens.
#[tokio::test]
async fn operator_open_makes_no_tables() {
    let Some(url) = postgres_url() else { return };
    let fx = Fixture::new();
    let schema = format!("srv_existing_{}", std::process::id());
    let store = format!(
        "[store]\nkind = \"postgres\"\nurl = {url:?}\nschema = \"{schema}\"\nmax_connections = 2\n"
    );
    let config = fx.config_from(&fx.toml("", &store));
    for _ in 0..2 {
        let err = strongroom_server::Backends::open_existing(&config)
            .await
            .err()
            .expect("there are no tables yet")
            .to_string();
        assert!(err.contains("no Strongroom tables"), "{err}");
    }
    strongroom_server::Backends::open(&config)
        .await
        .unwrap()
        .close()
        .await;
    strongroom_server::Backends::open_existing(&config)
        .await
        .unwrap()
        .close()
        .await;
}

/// Two server nodes sharing one PostgreSQL, under concurrent load on both, write one audit
/// chain that verifies; node B's `[audit] jsonl` copy holds exactly its records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_write_one_audit_chain() {
    let Some(url) = postgres_url() else { return };
    let fx = Fixture::new();
    let schema = format!("srv_audit_{}", std::process::id());
    let jsonl = fx.data_dir.parent().unwrap().join("node-b-audit.jsonl");
    let store = format!(
        "[store]\nkind = \"postgres\"\nurl = {url:?}\nschema = \"{schema}\"\nmax_connections = 8\n"
    );
    let a = spawn(fx.config_from(&fx.toml("", &store))).await;
    let b = spawn(fx.config_from(&fx.toml(
        "",
        &format!(
            "{store}\n[audit]\njsonl = {:?}\n",
            jsonl.display().to_string()
        ),
    )))
    .await;
    let alice = fx.user_token("alice");
    let mut tasks = Vec::new();
    for (n, node) in [&a, &b].into_iter().enumerate() {
        for t in 0..4 {
            let client = node.client(fx.client_options());
            let alice = alice.clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("zoom.n{n}t{t}");
                for i in 0..15 {
                    let r = client
                        .json(
                            "PUT",
                            &format!("/v1/me/credentials/{name}"),
                            Some(&alice),
                            &json!({"value": format!("v{i}")}),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r.status, 201, "{}", r.text());
                    let r = client
                        .json(
                            "POST",
                            &format!("/v1/owners/alice/credentials/{name}/reveal"),
                            Some(SERVICE_TOKEN),
                            &json!({}),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A usage cursor one node gave works on the other: its key comes from the audit head key
    // they share.
    let first = a
        .client(fx.client_options())
        .get("/v1/me/credentials/zoom.n0t0/usage?limit=2", Some(&alice))
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    let cursor = first.json()["next_cursor"].as_str().unwrap().to_owned();
    let next = b
        .client(fx.client_options())
        .get(
            &format!("/v1/me/credentials/zoom.n0t0/usage?limit=2&cursor={cursor}"),
            Some(&alice),
        )
        .await
        .unwrap();
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.json()["items"].as_array().unwrap().len(), 2);
    // SIGHUP's reload is an operator action with a record of its own.
    a.reloader.reload().unwrap();
    let log = a.state.vault().store().audit_log().unwrap();
    let log_ref = &log;
    let reload = common::eventually("the reload was audited", move || async move {
        let mut f = strongroom_store::AuditFilter::default();
        f.actions = vec!["reload".into()];
        log_ref.audit_query(&f, None, 10).await.unwrap().pop()
    })
    .await;
    assert_eq!(reload.event.principal_kind, "operator");
    assert_eq!(reload.event.outcome, "ok");
    drop(log);
    a.stop().await.unwrap();
    b.stop().await.unwrap();

    let backends = strongroom_server::Backends::open(&fx.config_from(&fx.toml("", &store)))
        .await
        .unwrap();
    let log = backends.store.audit_log().unwrap();
    let key =
        strongroom_core::audit::load_head_key(backends.store.as_ref(), backends.keyring.as_ref())
            .await
            .unwrap()
            .expect("head key created at start");
    let mut v = strongroom_store::audit::Verifier::new();
    loop {
        let batch = log.audit_scan(v.count(), 1000).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for r in &batch {
            v.push(r).unwrap();
        }
    }
    let head = log.audit_head().await.unwrap().unwrap();
    let total = v.finish(&head, &key).unwrap();
    assert_eq!(
        total,
        2 * 4 * 15 * 2 + 2 + 1,
        "one record per request (the two usage queries too), and the reload"
    );
    let lines = std::fs::read_to_string(&jsonl).unwrap();
    // Its requests and its usage query.
    assert_eq!(lines.lines().count(), 4 * 15 * 2 + 1, "node B's JSON lines");
    for line in lines.lines() {
        let r: strongroom_store::audit::Record = serde_json::from_str(line).unwrap();
        assert!(!line.contains("\"value\""));
        assert!(r.seq <= total);
    }
    backends.close().await;
}

/// Two nodes on one PostgreSQL, each with its own copy of the keyring file, rotated through
/// the API at the same moment: the first to record its version keeps it; the other answers
/// 409 `rotation_refused` (or refuses before rotating, having seen the record), leaves its
/// file as it was, and seals nothing new until the winner's file is copied to it, so that no
/// acknowledged write is sealed under a version no good copy holds. Every value then reveals
/// on both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_rotating_their_own_keyring_copies_at_once_keep_one_version() {
    use std::os::unix::fs::PermissionsExt;
    let Some(url) = postgres_url() else { return };
    let fx = Fixture::new();
    let schema = format!("srv_rot_{}", std::process::id());
    let store = format!(
        "[store]\nkind = \"postgres\"\nurl = {url:?}\nschema = \"{schema}\"\nmax_connections = 4\n"
    );
    let a_ring = fx.data_dir.join("keyring.json");
    let b_ring = fx.data_dir.join("keyring-b.json");
    std::fs::copy(&a_ring, &b_ring).unwrap();
    let a = spawn(fx.config_from(&fx.toml("", &store))).await;
    let b = spawn(fx.config_from(&fx.toml(
        "",
        &format!(
            "{store}\n[keys]\nkeyring = {:?}\n",
            b_ring.display().to_string()
        ),
    )))
    .await;
    let (ca, cb) = (a.client(fx.client_options()), b.client(fx.client_options()));
    let alice = fx.user_token("alice");
    let put = |client, name: &'static str| common::user_put(client, &alice, name);
    assert_eq!(put(&ca, "zoom.a0").await.0, 201);
    assert_eq!(put(&cb, "zoom.b0").await.0, 201);

    let rotate = |client: &strongroom_server::testing::TestClient| {
        let client = client.clone();
        async move {
            let r = common::admin_rotate(&client).await;
            (r.status, r.json())
        }
    };
    let before = std::fs::read(&a_ring).unwrap();
    let (ra, rb) = tokio::join!(rotate(&ca), rotate(&cb));
    let outcomes = [ra.0, rb.0];
    assert!(
        outcomes.contains(&200) && outcomes.contains(&409),
        "{ra:?} {rb:?}"
    );
    let (winner, loser, winner_ring, loser_ring) = if ra.0 == 200 {
        (&ca, &cb, &a_ring, &b_ring)
    } else {
        (&cb, &ca, &b_ring, &a_ring)
    };
    let loser_answer = if ra.0 == 409 { &ra.1 } else { &rb.1 };
    assert_eq!(
        loser_answer["error"]["code"], "rotation_refused",
        "{loser_answer}"
    );
    // The loser's file is as it was: its version of that number was never written where a
    // server could load it.
    assert_eq!(std::fs::read(loser_ring).unwrap(), before);

    // The loser seals nothing new; the winner goes on under the new version.
    let acknowledged = std::sync::Mutex::new(vec!["zoom.a0".to_owned(), "zoom.b0".to_owned()]);
    assert_eq!(
        put(loser, "zoom.loser1").await.0,
        503,
        "the losing copy sealed"
    );
    assert_eq!(put(winner, "zoom.winner1").await.0, 201);
    acknowledged.lock().unwrap().push("zoom.winner1".to_owned());
    // The winner's file copied to the loser, after its watcher has looked again (an
    // operator takes longer than a second): it seals again.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(put(loser, "zoom.loser1").await.0, 503);
    std::fs::copy(winner_ring, loser_ring).unwrap();
    std::fs::set_permissions(loser_ring, std::fs::Permissions::from_mode(0o600)).unwrap();
    common::eventually("the loser seals again with the newest file", || async {
        (put(loser, "zoom.loser2").await.0 == 201).then_some(())
    })
    .await;
    acknowledged.lock().unwrap().push("zoom.loser2".to_owned());
    for name in acknowledged.into_inner().unwrap() {
        for node in [&ca, &cb] {
            let r = node
                .json(
                    "POST",
                    &format!("/v1/owners/alice/credentials/{name}/reveal"),
                    Some(SERVICE_TOKEN),
                    &json!({}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{name}: {}", r.text());
            assert_eq!(r.json()["value"], name.as_str());
        }
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
