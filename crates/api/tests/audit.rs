//! The audit log through the API: every request recorded (never a value), the owner's usage
//! view, admin queries, and fail-closed reveal.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};

async fn audit_items(api: &TestApi, query: &str) -> Vec<Value> {
    let r = api
        .call("GET", &format!("/v1/audit{query}"), Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.json()["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn every_request_is_recorded_with_who_what_and_outcome() {
    let api = api().await;
    api.seed().await;
    let put = api
        .call(
            "PUT",
            "/v1/me/credentials/zoom.api-key",
            Some(&user_token("alice")),
            Some(json!({"value": "v2"})),
        )
        .await;
    let rid = put.headers["x-request-id"].to_str().unwrap().to_owned();
    let reveal = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            None,
        )
        .await;
    assert_eq!(reveal.status, StatusCode::OK);
    let denied = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(DENIED_SERVICE_TOKEN),
            None,
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let anon = api
        .call("GET", "/v1/me/credentials/zoom.api-key", None, None)
        .await;
    assert_eq!(anon.status, StatusCode::UNAUTHORIZED);
    let bad = api
        .call("GET", "/v1/me/credentials", Some("forged.token.here"), None)
        .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);

    let items = audit_items(&api, "").await;
    // Newest first: the two 401s, the denial, the reveal, the puts.
    let actions: Vec<_> = items
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["principal_kind"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let s = |a: &str, k: &str, o: &str, st| (a.to_owned(), k.to_owned(), o.to_owned(), st);
    assert_eq!(
        actions,
        vec![
            s("list", "anonymous", "denied", 401),
            s("describe", "anonymous", "denied", 401),
            s("reveal", "service", "denied", 403),
            s("reveal", "service", "ok", 200),
            s("put", "user", "ok", 201),
            s("put", "user", "ok", 201),
        ]
    );
    let reveal_rec = &items[3];
    assert_eq!(reveal_rec["principal_id"], "allowed");
    assert_eq!(reveal_rec["owner"], "alice");
    assert_eq!(reveal_rec["name"], "zoom.api-key");
    assert_eq!(reveal_rec["version"], 2);
    assert_eq!(items[2]["principal_id"], "denied");
    assert_eq!(items[2]["error_code"], "forbidden");
    assert_eq!(items[1]["error_code"], "unauthenticated");
    assert_eq!(items[1]["owner"], Value::Null);
    assert_eq!(items[4]["request_id"], rid.as_str());
    assert_eq!(items[4]["version"], 2);
    assert_eq!(items[4]["owner"], "alice");

    // Filters and cursor paging.
    let alice = audit_items(&api, "?owner=alice&limit=2").await;
    assert_eq!(alice.len(), 2);
    let r = api
        .call(
            "GET",
            "/v1/audit?owner=alice&limit=2",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    let cursor = r.json()["next_cursor"].as_str().unwrap().to_owned();
    let next = audit_items(&api, &format!("?owner=alice&limit=2&cursor={cursor}")).await;
    assert_eq!(next.len(), 2);
    assert!(next[0]["seq"].as_u64() < alice[1]["seq"].as_u64());
    // A page that holds exactly what is left is the last.
    let all = audit_items(&api, "?owner=alice&limit=1000").await.len();
    let exact = api
        .call(
            "GET",
            &format!("/v1/audit?owner=alice&limit={all}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await
        .json();
    assert_eq!(exact["items"].as_array().unwrap().len(), all);
    assert_eq!(exact["next_cursor"], serde_json::Value::Null, "{exact}");
    let by_service = audit_items(&api, "?principal=allowed").await;
    assert_eq!(by_service.len(), 1);
    let future = audit_items(&api, "?since=2999-01-01T00:00:00Z").await;
    assert!(future.is_empty());
    for query in ["?since=yesterday", "?owner=", "?name=", "?principal="] {
        let bad = api
            .call("GET", &format!("/v1/audit{query}"), Some(ADMIN_TOKEN), None)
            .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{query}");
    }
    // Admin queries are themselves audited.
    let latest = audit_items(&api, "?limit=1").await;
    assert_eq!(latest[0]["action"], "audit_query");
    assert_eq!(latest[0]["principal_kind"], "admin");
}

#[tokio::test]
async fn owners_see_who_used_their_credential_and_nothing_of_others() {
    let api = api().await;
    api.seed().await;
    // Bob has a credential of the same name; a service reveals both.
    let bob = user_token("bob");
    api.call(
        "PUT",
        "/v1/me/credentials/zoom.api-key",
        Some(&bob),
        Some(json!({"value": "bobs"})),
    )
    .await;
    for owner in ["alice", "bob"] {
        let r = api
            .call(
                "POST",
                &format!("/v1/owners/{owner}/credentials/zoom.api-key/reveal"),
                Some(ALLOWED_SERVICE_TOKEN),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let delegated = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/owners/alice/credentials/zoom.api-key/reveal")
        .header("authorization", format!("Bearer {DELEGATED_SERVICE_TOKEN}"))
        .header("x-strongroom-on-behalf-of", user_token("alice"))
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(api.send(delegated).await.status, StatusCode::OK);
    // Attempts by anyone but a service (no valid credentials, another user's or an admin's
    // token): recorded for the admin, not shown to alice (they could fill her view).
    let bobs = user_token("bob");
    for token in [None, Some("forged"), Some(bobs.as_str()), Some(ADMIN_TOKEN)] {
        let r = api
            .call(
                "POST",
                "/v1/owners/alice/credentials/zoom.api-key/reveal",
                token,
                None,
            )
            .await;
        assert!(
            [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&r.status),
            "{}",
            r.body
        );
    }
    let refused = audit_items(&api, "?owner=alice")
        .await
        .iter()
        .filter(|r| r["action"] == "reveal" && r["principal_kind"] != "service")
        .count();
    assert_eq!(refused, 4);

    let alice = user_token("alice");
    let usage = api
        .call(
            "GET",
            "/v1/me/credentials/zoom.api-key/usage",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(usage.status, StatusCode::OK, "{}", usage.body);
    let v = usage.json();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{v}");
    assert_eq!(items[0]["action"], "reveal");
    assert_eq!(items[0]["principal_kind"], "service");
    assert_eq!(items[0]["principal_id"], "delegated");
    assert_eq!(items[0]["on_behalf_of"], "alice");
    assert_eq!(items[1]["principal_id"], "allowed");
    assert_eq!(items[1]["version"], 1);
    assert_eq!(items[1]["outcome"], "ok");
    assert!(!usage.body.contains("bob"), "{}", usage.body);
    assert!(!usage.body.contains(CANARY));

    // Bob sees only the one reveal of his own credential.
    let bobs = api
        .call(
            "GET",
            "/v1/me/credentials/zoom.api-key/usage",
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(bobs.json()["items"].as_array().unwrap().len(), 1);
    // A credential bob does not have: the same 404 as a missing one.
    let theirs = api
        .call(
            "GET",
            "/v1/me/credentials/zoom.other/usage",
            Some(&bob),
            None,
        )
        .await;
    api.call(
        "PUT",
        "/v1/me/credentials/zoom.other",
        Some(&alice),
        Some(json!({"value": "x"})),
    )
    .await;
    let alices_other = api
        .call(
            "GET",
            "/v1/me/credentials/zoom.other/usage",
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);
    assert_eq!(
        (alices_other.status, alices_other.body),
        (theirs.status, theirs.body)
    );

    // last_used_at stays in the metadata (written in the background, within about a second
    // of a reveal).
    let (api, alice) = (&api, &alice);
    let last_used = eventually("last_used_at set", move || async move {
        let meta = api
            .call("GET", "/v1/me/credentials/zoom.api-key", Some(alice), None)
            .await
            .json();
        (!meta["last_used_at"].is_null()).then(|| meta["last_used_at"].clone())
    })
    .await;
    assert!(last_used.is_string(), "last_used_at: {last_used}");
}

/// A usage page's cursor is sealed: it does not tell the user the record's number in the
/// log every client shares (how many requests the whole server recorded between two of
/// theirs), works only for the view that gave it, and cannot be edited into another.
#[tokio::test]
async fn usage_cursors_are_opaque_and_bound_to_their_view() {
    let api = api().await;
    api.seed().await;
    for _ in 0..3 {
        assert_eq!(api.reveal_alices_key().await.status, StatusCode::OK);
    }
    let alice = user_token("alice");
    api.call(
        "PUT",
        "/v1/me/credentials/zoom.other",
        Some(&alice),
        Some(json!({"value": "x"})),
    )
    .await;
    let usage = |name: &'static str, query: String| {
        let alice = alice.clone();
        let api = &api;
        async move {
            api.call(
                "GET",
                &format!("/v1/me/credentials/{name}/usage{query}"),
                Some(&alice),
                None,
            )
            .await
        }
    };
    let first = usage("zoom.api-key", "?limit=1".into()).await.json();
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    assert!(cursor.parse::<u64>().is_err(), "{cursor}");
    let seqs: Vec<u64> = audit_items(&api, "?owner=alice&limit=10")
        .await
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    assert!(!seqs.is_empty());

    // It pages through the view that gave it...
    let mut seen = vec![first["items"][0]["time"].clone()];
    let mut next = Some(cursor.clone());
    while let Some(c) = next {
        let page = usage("zoom.api-key", format!("?limit=1&cursor={c}")).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let page = page.json();
        // The last page says it is the last: no cursor to an empty one.
        assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["time"].clone()),
        );
        next = page["next_cursor"].as_str().map(str::to_owned);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    // ... and no other: another credential's view, an edited cursor, a record's number.
    let mut edited = cursor.clone().into_bytes();
    edited[30] = if edited[30] == b'A' { b'B' } else { b'A' };
    for (name, c) in [
        ("zoom.other", cursor.clone()),
        ("zoom.api-key", String::from_utf8(edited).unwrap()),
        ("zoom.api-key", seqs[0].to_string()),
    ] {
        let r = usage(name, format!("?cursor={c}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{name} {c}: {}", r.body);
    }
}

#[tokio::test]
async fn reveal_fails_closed_when_the_audit_record_cannot_be_written() {
    let api = api_audited(Auditing::Failing).await;
    api.seed().await;
    assert_eq!(api.call("GET", "/readyz", None, None).await.status, 200);
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "audit_unavailable");
    assert!(!r.body.contains(CANARY));
    // Every write and reveal fails now: the node says it is not ready.
    assert_eq!(
        api.call("GET", "/readyz", None, None).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // With auditing off altogether, reveal works (no auditor configured).
    let off = api_audited(Auditing::Off).await;
    off.seed().await;
    let r = off
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            None,
        )
        .await;
    assert_eq!(r.json()["value"], CANARY);
}

/// Zeroes the audit head's MAC behind the server (a writer of the database without the
/// key); returns the connection and the genuine MAC, to put back.
fn zero_head_mac(api: &TestApi) -> (rusqlite::Connection, Vec<u8>) {
    let raw = rusqlite::Connection::open(api.db_path()).unwrap();
    let genuine: Vec<u8> = raw
        .query_row("SELECT mac FROM audit_head", [], |r| r.get(0))
        .unwrap();
    raw.execute("UPDATE audit_head SET mac = zeroblob(32)", [])
        .unwrap();
    (raw, genuine)
}

/// A head changed outside Strongroom while the server runs: the next append is refused, and
/// from then on nothing is revealed or changed unaudited (503) and `/readyz` says so; reads
/// go on. Putting the genuine head back lifts it at the next append.
#[tokio::test]
async fn a_log_changed_behind_the_server_stops_writes_until_it_is_restored() {
    let api = api().await;
    api.seed().await;
    let (raw, genuine) = zero_head_mac(&api);
    let reveal = || api.reveal_alices_key();
    let r = reveal().await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "audit_unavailable");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(!r.body.contains(CANARY));
    let alice = user_token("alice");
    let key = "/v1/me/credentials/zoom.api-key";
    let put = api
        .call("PUT", key, Some(&alice), Some(json!({"value": "v2"})))
        .await;
    assert_eq!(put.status, StatusCode::SERVICE_UNAVAILABLE, "{}", put.body);
    let delete = api.call("DELETE", key, Some(&alice), None).await;
    assert_eq!(
        delete.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        delete.body
    );
    assert_eq!(
        api.call("GET", "/readyz", None, None).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Reads still answer, and nothing was changed; their unwritten records raise the alarm
    // once, not once each (a full disk fails every request: a line each filled the log's
    // disk as well).
    let (logs, guard) = Captured::install(tracing::Level::ERROR);
    for _ in 0..20 {
        let d = api.call("GET", key, Some(&alice), None).await;
        assert_eq!(d.status, StatusCode::OK);
        assert_eq!(d.json()["current_version"], 1);
    }
    drop(guard);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.matches("audit record not written").count() <= 1,
        "{text}"
    );

    raw.execute("UPDATE audit_head SET mac = ?1", [&genuine])
        .unwrap();
    // The next read's record is taken: the log is intact again.
    assert_eq!(
        api.call("GET", key, Some(&alice), None).await.status,
        StatusCode::OK
    );
    assert_eq!(reveal().await.json()["value"], CANARY);
    assert_eq!(
        api.call("DELETE", key, Some(&alice), None).await.status,
        StatusCode::NO_CONTENT
    );
    // Once the verdict on the head read while it was changed has stood its second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        api.call("GET", "/readyz", None, None).await.status,
        StatusCode::OK
    );
}

/// A request refused while the log refuses appends is recorded (once the log takes records
/// again) under the caller its credentials name, not as anonymous.
#[tokio::test]
async fn a_refusal_while_the_log_is_refused_names_the_caller() {
    let api = api().await;
    api.seed().await;
    let (raw, genuine) = zero_head_mac(&api);
    let reveal = || api.reveal_alices_key();
    assert_eq!(reveal().await.status, StatusCode::SERVICE_UNAVAILABLE);
    raw.execute("UPDATE audit_head SET mac = ?1", [&genuine])
        .unwrap();
    // Still refused (the flag lifts with the first append taken), and this refusal's record
    // is taken: under the service that asked.
    let r = reveal().await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    let items = audit_items(&api, "?limit=1").await;
    assert_eq!(items[0]["action"], "reveal", "{items:?}");
    assert_eq!(items[0]["status"], 503);
    assert_eq!(
        (&items[0]["principal_kind"], &items[0]["principal_id"]),
        (&json!("service"), &json!("allowed"))
    );
}

/// A request refused before any extractor read its credentials (a query string on a route
/// that reads none) is recorded under the caller they name, not as anonymous (whose records
/// are rationed per address).
#[tokio::test]
async fn a_request_refused_for_its_shape_names_the_caller() {
    let api = api().await;
    api.seed().await;
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal?version=2",
            Some(ALLOWED_SERVICE_TOKEN),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let items = audit_items(&api, "?limit=1").await;
    assert_eq!(items[0]["status"], 400, "{items:?}");
    assert_eq!(
        (&items[0]["principal_kind"], &items[0]["principal_id"]),
        (&json!("service"), &json!("allowed"))
    );
    // A valid service token with a user token it cannot present: refused, under the service.
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/owners/alice/credentials/zoom.api-key/reveal")
        .header("authorization", format!("Bearer {ALLOWED_SERVICE_TOKEN}"))
        .header("x-strongroom-on-behalf-of", "not-a-token")
        .body(axum::body::Body::empty())
        .unwrap();
    let r = api.send(req).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let items = audit_items(&api, "?limit=1").await;
    assert_eq!(
        (&items[0]["status"], &items[0]["principal_id"]),
        (&json!(401), &json!("allowed")),
        "{items:?}"
    );
    // A forged token stays anonymous (401: nothing verified).
    let r = api
        .call(
            "GET",
            "/v1/me/credentials?x=1",
            Some("forged.token.here"),
            None,
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.status);
    let items = audit_items(&api, "?limit=1").await;
    assert_eq!(items[0]["principal_kind"], "anonymous", "{items:?}");
}

/// Each change, and a verify's answer, as the very first request after the log was changed
/// behind the server: refused with 503, and not made (the record and the change commit
/// together, or the record comes first), where the change used to stand unaudited.
#[tokio::test]
async fn the_first_change_after_a_tamper_is_not_made_unaudited() {
    let alice = user_token("alice");
    let key = "/v1/me/credentials/zoom.api-key";
    let cases: [(&str, String, Option<Value>); 6] = [
        ("POST", format!("{key}/disable"), None),
        (
            "POST",
            format!("{key}/current"),
            Some(json!({"version": 1})),
        ),
        ("DELETE", format!("{key}/versions/1"), None),
        ("DELETE", key.to_owned(), None),
        (
            "POST",
            format!("{key}/verify"),
            Some(json!({"value": CANARY})),
        ),
        ("POST", "/v1/keys/rotate".to_owned(), None),
    ];
    for (method, path, body) in cases {
        let api = api().await;
        api.seed().await;
        let before = api.call("GET", key, Some(&alice), None).await.body;
        let keys_before = api
            .call("GET", "/v1/keys", Some(ADMIN_TOKEN), None)
            .await
            .body;
        let raw = rusqlite::Connection::open(api.db_path()).unwrap();
        raw.execute(
            "DELETE FROM audit_records WHERE seq = (SELECT MAX(seq) FROM audit_records)",
            [],
        )
        .unwrap();
        let token = if path.starts_with("/v1/keys") {
            ADMIN_TOKEN.to_owned()
        } else {
            alice.clone()
        };
        let r = api.call(method, &path, Some(&token), body).await;
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path}: {}",
            r.body
        );
        assert!(!r.body.contains("matches"), "{path}: {}", r.body);
        // Nothing changed (the reads themselves are answered: reads go on).
        let after = api.call("GET", key, Some(&alice), None).await.body;
        assert_eq!(after, before, "{method} {path} changed the credential");
        let keys_after = api
            .call("GET", "/v1/keys", Some(ADMIN_TOKEN), None)
            .await
            .body;
        assert_eq!(keys_after, keys_before, "{method} {path} rotated the key");
    }
}

/// A request the store holds up past `limits.request_timeout` gets 503 `timeout`, and the
/// operator's log says which route and why (not only the status).
#[tokio::test]
async fn a_request_past_its_timeout_is_answered_and_logged_with_its_route() {
    let (logs, _guard) = Captured::install(tracing::Level::INFO);
    let api = api_with(strongroom_api::ApiLimits {
        request_timeout: std::time::Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let alice = user_token("alice");
    // Another process holds the database's write lock for two seconds.
    let db = api.db_path();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_secs(2));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    let r = api
        .call(
            "PUT",
            "/v1/me/credentials/zoom.api-key",
            Some(&alice),
            Some(json!({"value": CANARY})),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "timeout");
    holder.join().unwrap();
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains(
            "PUT /v1/me/credentials/{name} took longer than limits.request_timeout_seconds"
        ),
        "{text}"
    );
    assert!(!text.contains(CANARY));

    // A body that never arrives whole is the client's doing: 408, and the store is not
    // blamed.
    let body = axum::body::Body::new(Stalled(Some(axum::body::Bytes::from_static(
        b"{\"value\": \"half",
    ))));
    let req = axum::http::Request::builder()
        .method("PUT")
        .uri("/v1/me/credentials/zoom.slow")
        .header("authorization", format!("Bearer {alice}"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let r = api.send(req).await;
    assert_eq!(r.status, StatusCode::REQUEST_TIMEOUT, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "request_timeout");
    // The records say what was answered (the timeout drops the request: not a 499 that
    // blamed the client for the store's delay).
    // Recorded from a task of its own as the request is dropped: wait for it.
    let api = &api;
    let items = eventually("the record of the stalled put", move || async move {
        let items = audit_items(api, "?name=zoom.slow").await;
        (!items.is_empty()).then_some(items)
    })
    .await;
    assert_eq!(
        (&items[0]["status"], &items[0]["error_code"]),
        (&json!(408), &json!("request_timeout")),
        "{items:?}"
    );
    // The put cut short by the locked store was queued with its record, and committed once
    // the lock went: its record says what the store did, never that the client gave up.
    let items = audit_items(api, "?name=zoom.api-key").await;
    assert!(!items.iter().any(|r| r["status"] == 499), "{items:?}");
}

/// A body that sends its first bytes and then nothing more, ever.
struct Stalled(Option<axum::body::Bytes>);

impl http_body::Body for Stalled {
    type Data = axum::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.0.take() {
            Some(bytes) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// The canary goes in as a value (puts, verify), as a token and as the on-behalf-of header;
/// it must appear in no audit column, no query answer, no export line, no log line and no
/// metric.
#[tokio::test]
async fn a_canary_value_appears_nowhere_in_the_audit_trail_logs_or_metrics() {
    let (logs, _guard) = Captured::install(tracing::Level::TRACE);

    let api = api().await;
    api.seed().await;
    let alice = user_token("alice");
    // Brokered calls to a real upstream that echoes the injected value back in its headers
    // and body.
    let up = common::upstream::start().await;
    api.state.set_broker(up.broker(up.settings()));
    let r = api
        .call(
            "PUT",
            "/v1/me/credentials/zoom.brokered",
            Some(&alice),
            Some(json!({"value": CANARY, "metadata": {"host": "localhost:*"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let calls: Vec<(&str, &str, Option<String>, Option<Value>)> = vec![
        (
            "POST",
            "/v1/owners/alice/credentials/zoom.brokered/broker",
            Some(ALLOWED_SERVICE_TOKEN.into()),
            Some(
                json!({"method": "POST", "url": up.url("/echo"), "body": "hello",
                        "inject": {"header": "Authorization", "format": "Bearer {value}"}}),
            ),
        ),
        (
            "POST",
            "/v1/owners/alice/credentials/zoom.brokered/broker",
            Some(ALLOWED_SERVICE_TOKEN.into()),
            Some(json!({"method": "GET", "url": up.url("/echo"), "inject": {"query": "key"}})),
        ),
        (
            "POST",
            "/v1/owners/alice/credentials/zoom.brokered/broker",
            Some(ALLOWED_SERVICE_TOKEN.into()),
            Some(
                json!({"method": "GET", "url": up.url("/slow"), "inject": {"basic": {"username": "u"}}}),
            ),
        ),
        (
            "PUT",
            "/v1/me/credentials/zoom.b",
            Some(alice.clone()),
            Some(json!({"value": CANARY})),
        ),
        (
            "POST",
            "/v1/me/credentials/zoom.api-key/verify",
            Some(alice.clone()),
            Some(json!({"value": CANARY})),
        ),
        (
            "POST",
            "/v1/me/credentials/zoom.api-key/verify",
            Some(alice.clone()),
            Some(json!({"value": "wrong"})),
        ),
        ("GET", "/v1/me/credentials", Some(alice.clone()), None),
        (
            "GET",
            "/v1/me/credentials/zoom.api-key",
            Some(alice.clone()),
            None,
        ),
        (
            "GET",
            "/v1/me/credentials/zoom.api-key/usage",
            Some(alice.clone()),
            None,
        ),
        (
            "POST",
            "/v1/me/credentials/zoom.api-key/current",
            Some(alice.clone()),
            Some(json!({"version": 1})),
        ),
        (
            "POST",
            "/v1/me/credentials/zoom.api-key/disable",
            Some(alice.clone()),
            None,
        ),
        (
            "POST",
            "/v1/me/credentials/zoom.api-key/enable",
            Some(alice.clone()),
            None,
        ),
        (
            "PUT",
            "/v1/owners/alice/credentials/zoom.c",
            Some(ALLOWED_SERVICE_TOKEN.into()),
            Some(json!({"value": CANARY})),
        ),
        (
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN.into()),
            None,
        ),
        (
            "POST",
            "/v1/owners/alice/credentials/zoom.c/reveal",
            Some(ALLOWED_SERVICE_TOKEN.into()),
            Some(json!({"version": 1})),
        ),
        (
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/broker",
            Some(ALLOWED_SERVICE_TOKEN.into()),
            Some(json!({"value": CANARY})),
        ),
        (
            "PUT",
            "/v1/me/credentials/zoom.d",
            Some(CANARY.into()),
            Some(json!({"value": CANARY})),
        ),
        (
            "PUT",
            "/v1/owners/alice/credentials/zoom.e",
            Some(DENIED_SERVICE_TOKEN.into()),
            Some(json!({"value": CANARY})),
        ),
        (
            "PUT",
            "/v1/me/credentials/zoom.f",
            Some(alice.clone()),
            Some(json!({"value": CANARY, "bogus": CANARY})),
        ),
        ("GET", "/v1/keys", Some(ADMIN_TOKEN.into()), None),
        (
            "DELETE",
            "/v1/me/credentials/zoom.b/versions/1",
            Some(alice.clone()),
            None,
        ),
        (
            "DELETE",
            "/v1/me/credentials/zoom.b",
            Some(alice.clone()),
            None,
        ),
    ];
    for (method, path, token, body) in calls {
        let r = api.call(method, path, token.as_deref(), body).await;
        if !path.ends_with("/reveal") {
            assert!(!r.body.contains(CANARY), "{method} {path}: {}", r.body);
        }
    }
    assert!(up.hits() >= 3, "the brokered calls reached the upstream");
    assert!(up.seen.lock().unwrap().iter().any(|r| r
        .headers
        .get("authorization")
        .is_some_and(|v| v.as_bytes().ends_with(CANARY.as_bytes()))));
    let delegated = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/owners/alice/credentials/zoom.api-key/reveal")
        .header("authorization", format!("Bearer {DELEGATED_SERVICE_TOKEN}"))
        .header("x-strongroom-on-behalf-of", CANARY)
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(api.send(delegated).await.status, StatusCode::UNAUTHORIZED);

    // The audit table, every column of every row, as text and bytes.
    let conn = rusqlite::Connection::open(api.db_path()).unwrap();
    let mut stmt = conn.prepare("SELECT * FROM audit_records").unwrap();
    let columns = stmt.column_count();
    let mut rows = stmt.query([]).unwrap();
    let mut n = 0;
    while let Some(row) = rows.next().unwrap() {
        n += 1;
        for i in 0..columns {
            let v: rusqlite::types::Value = row.get(i).unwrap();
            let text = format!("{v:?}");
            assert!(!text.contains(CANARY), "audit column {i}: {text}");
            if let rusqlite::types::Value::Blob(b) = v {
                assert!(!b.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()));
            }
        }
    }
    assert!(n >= 21, "only {n} records");
    // Queries (the export path serializes the same records).
    let everything = api
        .call("GET", "/v1/audit?limit=1000", Some(ADMIN_TOKEN), None)
        .await;
    assert!(!everything.body.contains(CANARY));
    let log = strongroom_store::Store::audit_log(
        &strongroom_store::sqlite::SqliteStore::open_dir(api.db_path().parent().unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    for r in log.audit_scan(0, 4096).await.unwrap() {
        assert!(!serde_json::to_string(&r).unwrap().contains(CANARY));
    }
    let metrics = api.call("GET", "/metrics", None, None).await;
    assert!(!metrics.body.contains(CANARY));
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(!logs.is_empty());
    assert!(!logs.contains(CANARY), "a log line holds the canary");
}

/// A client's `x-request-id` cannot become the id a record is found by: the server answers
/// with an id of its own, and the record keeps the client's after it.
#[tokio::test]
async fn the_server_chooses_request_ids_and_keeps_the_clients_aside() {
    let api = api().await;
    let mut ids = Vec::new();
    for client_id in ["forged-id", "forged-id"] {
        let req = axum::http::Request::builder()
            .method("GET")
            .uri("/v1/me/credentials")
            .header("authorization", format!("Bearer {}", user_token("alice")))
            .header("x-request-id", client_id)
            .header("x-strongroom-client-request-id", "also-forged")
            .body(axum::body::Body::empty())
            .unwrap();
        let r = api.send(req).await;
        assert_eq!(r.status, StatusCode::OK);
        let own = r.headers["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(own, client_id);
        ids.push(own);
    }
    assert_ne!(ids[0], ids[1], "two requests, two ids");
    let items = audit_items(&api, "").await;
    let recorded: Vec<&str> = items
        .iter()
        .filter_map(|i| i["request_id"].as_str())
        .collect();
    for own in &ids {
        assert!(
            recorded.contains(&format!("{own} client=forged-id").as_str()),
            "{recorded:?}"
        );
    }
}

/// A put's record commits with the new version (one record per put, never two), and a put
/// that fails is recorded once as failed, with no version written.
#[tokio::test]
async fn a_put_is_recorded_once_with_its_version_and_a_failed_put_once_as_failed() {
    let api = api().await;
    let alice = user_token("alice");
    let put = |body: Value| {
        let (api, alice) = (&api, alice.clone());
        async move {
            api.call(
                "PUT",
                "/v1/me/credentials/stripe.key",
                Some(&alice),
                Some(body),
            )
            .await
        }
    };
    assert_eq!(
        put(json!({"value": "one"})).await.status,
        StatusCode::CREATED
    );
    let stale = put(json!({"value": "two", "expected_version": 7})).await;
    assert_eq!(stale.status, StatusCode::CONFLICT);
    let service = api
        .call(
            "PUT",
            "/v1/owners/alice/credentials/zoom.api-key",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(json!({"value": "three"})),
        )
        .await;
    assert_eq!(service.status, StatusCode::CREATED, "{}", service.body);

    let items = audit_items(&api, "?owner=alice").await;
    let puts: Vec<_> = items
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["principal_kind"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap(),
                r["version"].clone(),
            )
        })
        .collect();
    let row =
        |n: &str, k: &str, o: &str, st, v: Value| (n.to_owned(), k.to_owned(), o.to_owned(), st, v);
    assert_eq!(
        puts,
        vec![
            row("zoom.api-key", "service", "ok", 201, json!(1)),
            row("stripe.key", "user", "error", 409, Value::Null),
            row("stripe.key", "user", "ok", 201, json!(1)),
        ]
    );
    let detail = api
        .call("GET", "/v1/me/credentials/stripe.key", Some(&alice), None)
        .await;
    assert_eq!(detail.json()["current_version"], 1);
}

/// A valid credential of the wrong kind for a route is refused with 403 and audited under
/// the principal it belongs to, not as anonymous.
#[tokio::test]
async fn a_refusal_for_the_wrong_kind_of_caller_names_the_caller() {
    let api = api().await;
    api.seed().await;
    let alice = user_token("alice");
    let reveal = "/v1/owners/alice/credentials/zoom.api-key/reveal";
    for (path, token, method) in [
        (reveal, alice.as_str(), "POST"),
        (reveal, ADMIN_TOKEN, "POST"),
        ("/v1/me/credentials", ALLOWED_SERVICE_TOKEN, "GET"),
        ("/v1/keys", alice.as_str(), "GET"),
    ] {
        let r = api.call(method, path, Some(token), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.body);
    }
    let log = api
        .call("GET", "/v1/audit?limit=100", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(log.status, StatusCode::OK, "{}", log.body);
    let refused: Vec<(String, String)> = log.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == 403)
        .map(|r| {
            (
                r["principal_kind"].as_str().unwrap_or_default().to_owned(),
                r["principal_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut want = vec![
        ("user".to_owned(), "alice".to_owned()),
        ("admin".to_owned(), "root".to_owned()),
        ("service".to_owned(), "allowed".to_owned()),
        ("user".to_owned(), "alice".to_owned()),
    ];
    let mut got = refused.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "{}", log.body);

    // Bob's view does not show a refused attempt by alice on his credential (the admin's log
    // has it, above): only services use a credential.
    let bob = user_token("bob");
    api.call(
        "PUT",
        "/v1/me/credentials/zoom.api-key",
        Some(&bob),
        Some(json!({"value": "bobs"})),
    )
    .await;
    let r = api
        .call(
            "POST",
            "/v1/owners/bob/credentials/zoom.api-key/reveal",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let usage = api
        .call(
            "GET",
            "/v1/me/credentials/zoom.api-key/usage",
            Some(&bob),
            None,
        )
        .await;
    let items = usage.json()["items"].as_array().unwrap().clone();
    assert!(items.is_empty(), "{}", usage.body);
    assert!(!usage.body.contains("alice"), "{}", usage.body);
}

/// A sealed value changed in the database answers 500 `integrity_error` (nothing of the value
/// or the cause in the body) and logs one line with the request's id; by that id the
/// operator finds the request's audit record, which names the owner and the credential.
#[tokio::test]
async fn an_integrity_error_is_logged_with_the_request_id() {
    let api = api().await;
    api.seed().await;
    let raw = rusqlite::Connection::open(api.db_path()).unwrap();
    let mut sealed: Vec<u8> = raw
        .query_row("SELECT sealed_value FROM versions", [], |r| r.get(0))
        .unwrap();
    *sealed.last_mut().unwrap() ^= 1;
    raw.execute("UPDATE versions SET sealed_value = ?1", [&sealed])
        .unwrap();

    let (logs, guard) = Captured::install(tracing::Level::ERROR);
    let r = api.reveal_alices_key().await;
    // A second within the second: counted, not logged; recorded with the version it named.
    let named = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(json!({"version": 1})),
        )
        .await;
    drop(guard);
    assert_eq!(
        named.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        named.body
    );
    let metrics = api.call("GET", "/metrics", None, None).await.body;
    assert!(
        metrics.contains("strongroom_http_request_failures_total{code=\"integrity_error\"} 2"),
        "{metrics}"
    );
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "integrity_error");
    assert!(
        !r.body.contains(CANARY) && !r.body.contains("check"),
        "{}",
        r.body
    );
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<_> = text
        .lines()
        .filter(|l| l.contains("request failed"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains(&format!("request_id=\"{rid}\"")) && lines[0].contains("integrity_error"),
        "{text}"
    );
    assert!(!text.contains(CANARY), "{text}");

    let record = eventually("the reveal's audit record", || async {
        audit_items(&api, "?owner=alice&name=zoom.api-key")
            .await
            .into_iter()
            .find(|i| i["request_id"] == rid.as_str())
    })
    .await;
    // The current version, though the request named none.
    assert_eq!(
        (
            &record["owner"],
            &record["name"],
            &record["error_code"],
            &record["version"]
        ),
        (
            &json!("alice"),
            &json!("zoom.api-key"),
            &json!("integrity_error"),
            &json!(1)
        )
    );
    let named_rid = named.headers["x-request-id"].to_str().unwrap().to_owned();
    let record = eventually("the second reveal's audit record", || async {
        audit_items(&api, "?owner=alice&name=zoom.api-key")
            .await
            .into_iter()
            .find(|i| i["request_id"] == named_rid.as_str())
    })
    .await;
    assert_eq!(record["version"], 1);
}
