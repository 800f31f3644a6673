//! Brokered use against a real HTTPS upstream (tests/common/upstream.rs) on 127.0.0.1: the
//! value reaches the upstream as asked, never comes back to the service, and every refusal
//! happens before the upstream sees a request.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine;
use common::upstream::{self, Upstream};
use common::*;
use serde_json::{json, Value};

const PATH: &str = "/v1/owners/alice/credentials/zoom.api-key/broker";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// An audited API with a broker trusting the upstream's CA (private networks allowed), and
/// alice's `zoom.api-key` = CANARY bound to `localhost` on any port.
async fn setup() -> (TestApi, Upstream) {
    let up = upstream::start().await;
    let api = api().await;
    api.state.set_broker(up.broker(up.settings()));
    store(&api, "zoom.api-key", json!({"host": "localhost:*"})).await;
    (api, up)
}

async fn store(api: &TestApi, name: &str, metadata: Value) {
    let r = api
        .call(
            "PUT",
            &format!("/v1/me/credentials/{name}"),
            Some(&user_token("alice")),
            Some(json!({"value": CANARY, "metadata": metadata})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

fn bearer(url: &str) -> Value {
    json!({"method": "GET", "url": url, "inject": {"header": "Authorization", "format": "Bearer {value}"}})
}

async fn broker(api: &TestApi, body: Value) -> Reply {
    api.call("POST", PATH, Some(ALLOWED_SERVICE_TOKEN), Some(body))
        .await
}

/// The value in none of its usual forms.
fn assert_no_value(text: &str) {
    assert!(!text.contains(CANARY), "the value leaked: {text}");
    assert!(
        !text.contains("9f8e7d6c5b4a"),
        "part of the value leaked: {text}"
    );
    for form in [
        B64.encode(CANARY),
        B64.encode(format!("Bearer {CANARY}")),
        B64.encode(format!("bob:{CANARY}")),
    ] {
        assert!(!text.contains(&form), "a base64 form leaked: {text}");
    }
}

/// Runs `sql` on the store's database behind the server, as whoever can write it could.
fn tamper(api: &TestApi, sql: &str) {
    rusqlite::Connection::open(api.db_path())
        .unwrap()
        .execute(sql, [])
        .unwrap();
}

fn code(r: &Reply) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_value_goes_into_the_header_and_never_comes_back() {
    let (api, up) = setup().await;
    let mut req = bearer(&up.url("/echo?page=2"));
    req["headers"] = json!({"X-Trace": "t-1", "Accept": "application/json"});
    let r = broker(&api, req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // What the upstream received.
    assert_eq!(up.hits(), 1);
    let seen = up.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/echo?page=2");
    assert_eq!(seen.headers["authorization"], format!("Bearer {CANARY}"));
    assert_eq!(seen.headers["x-trace"], "t-1");
    assert_eq!(seen.headers["accept-encoding"], "identity");
    assert_eq!(seen.headers["host"], format!("localhost:{}", up.port()));
    // What the service got: the upstream's answer, with every echo of the value redacted.
    assert_no_value(&r.body);
    let v = r.json();
    assert_eq!(v["status"], 200);
    assert_eq!(v["version"], 1);
    assert_eq!(v["redacted"], true);
    assert_eq!(v["headers"]["x-echo-authorization"], "Bearer [REDACTED]");
    // The upstream's length would tell the value's: the scrubbed body speaks for itself.
    assert!(v["headers"].get("content-length").is_none(), "{v}");
    let echo: Value = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
    assert_eq!(echo["headers"]["authorization"], "Bearer [REDACTED]");
    assert_eq!(echo["headers"]["x-trace"], "t-1");
    assert!(echo["authorization_base64"]
        .as_str()
        .unwrap()
        .contains("[REDACTED]"));
}

/// An upstream answer full of near misses of the value (here the service's own body,
/// echoed) costs more to search than the budget: 502, nothing passed back, rather than the
/// rest of it searched only for the value's fixed forms.
#[tokio::test]
async fn an_answer_too_costly_to_check_is_refused() {
    let (api, up) = setup().await;
    let value = "ab1-".repeat(200);
    let r = api
        .call(
            "PUT",
            "/v1/me/credentials/zoom.long-key",
            Some(&user_token("alice")),
            Some(json!({"value": value, "metadata": {"host": "localhost:*"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let call = json!({"method": "POST", "url": up.url("/echo"), "body": "ab1 ".repeat(12 * 1024),
                      "inject": {"header": "Authorization", "format": "Bearer {value}"}});
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.long-key/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(call),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("upstream_response_unchecked")),
        "{}",
        r.body
    );
    assert!(!r.body.contains("ab1-ab1-"));
}

/// An ETag or digest of the unscrubbed body tells a short value (guessed offline against it):
/// never passed back, whether or not anything was redacted. Only the allow-listed headers
/// are (and the test upstream's `x-echo-*`, which its settings add).
#[tokio::test]
async fn headers_computed_over_the_body_are_not_passed_back() {
    let (api, up) = setup().await;
    for inject in [
        json!({"header": "Authorization"}),
        json!({"header": "X-Unechoed"}),
    ] {
        let r = broker(
            &api,
            json!({"method": "GET", "url": up.url("/digests"), "inject": inject}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let headers = &r.json()["headers"];
        assert_eq!(headers["content-type"], "application/json", "{headers}");
        assert_eq!(headers["x-request-id"], "req-1", "{headers}");
        for name in [
            "etag",
            "content-md5",
            "digest",
            "content-digest",
            "repr-digest",
            "x-adler32",
            "x-len",
            "x-latency",
            "set-cookie",
        ] {
            assert!(headers.get(name).is_none(), "{name}: {headers}");
        }
    }
}

#[tokio::test]
async fn query_and_basic_injection_and_request_bodies() {
    let (api, up) = setup().await;
    let r = broker(
        &api,
        json!({"method": "POST", "url": up.url("/echo?a=b"), "body": "{\"q\": 1}",
               "headers": {"content-type": "application/json"},
               "inject": {"query": "api_key"}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let seen = up.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, format!("/echo?a=b&api_key={CANARY}"));
    assert_eq!(seen.body, b"{\"q\": 1}");
    assert!(seen.headers.get("authorization").is_none());
    assert_no_value(&r.body);

    let r = broker(
        &api,
        json!({"method": "PUT", "url": up.url("/echo"), "body_base64": B64.encode(b"\x00\x01binary"),
               "inject": {"basic": {"username": "bob"}}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let seen = up.last();
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.body, b"\x00\x01binary");
    assert_eq!(
        seen.headers["authorization"],
        format!("Basic {}", B64.encode(format!("bob:{CANARY}")))
    );
    assert_no_value(&r.body);

    // A non-UTF-8 answer comes back in base64.
    let r = broker(&api, bearer(&up.url("/binary"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        B64.decode(r.json()["body_base64"].as_str().unwrap())
            .unwrap(),
        b"\xff\xfe\x00bin"
    );
    assert!(r.json().get("body").is_none());
}

#[tokio::test]
async fn only_the_bound_host_and_https_are_called() {
    let (api, up) = setup().await;
    // Another host than the bound one (same upstream, by IP): refused before any request.
    let r = broker(
        &api,
        bearer(&format!("https://127.0.0.1:{}/echo", up.port())),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(code(&r), "destination_not_allowed");
    // Bound to port 443 only.
    store(&api, "zoom.port443", json!({"host": "localhost"})).await;
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.port443/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(bearer(&up.url("/echo"))),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // No bound host at all: never brokered.
    store(&api, "zoom.unbound", json!({"label": "x"})).await;
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.unbound/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(bearer(&up.url("/echo"))),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(code(&r), "destination_not_bound");
    // A host written into its metadata in the database: not sealed with it, so not bound
    // (a reveal still opens it: it is the value its owner stored).
    tamper(
        &api,
        "UPDATE versions SET metadata = '{\"label\": \"x\", \"host\": \"localhost:*\"}'
         WHERE credential_id = (SELECT id FROM credentials WHERE name = 'zoom.unbound')",
    );
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.unbound/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(bearer(&up.url("/echo"))),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(code(&r), "destination_not_bound", "{}", r.body);
    assert!(r.body.contains("sealed without its host"), "{}", r.body);
    // Plain HTTP, user info, other schemes: malformed.
    for url in [
        format!("http://localhost:{}/echo", up.port()),
        format!("https://user:pw@localhost:{}/echo", up.port()),
        "ftp://localhost/".to_owned(),
        "localhost/echo".to_owned(),
        // Nothing can listen on port 0: a malformed destination, not an unreachable one.
        "https://localhost:0/echo".to_owned(),
    ] {
        let r = broker(&api, bearer(&url)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{url}: {}", r.body);
    }
    assert_eq!(up.hits(), 0, "a refused call reached the upstream");
    assert_no_value(&r.body);
    // A bound host that is not a destination is refused when stored, not when used.
    for host in [
        json!("https://api.zoom.us/"),
        json!(["api.zoom.us"]),
        json!(""),
    ] {
        let r = api
            .call(
                "PUT",
                "/v1/me/credentials/zoom.bad-host",
                Some(&user_token("alice")),
                Some(json!({"value": "v", "metadata": {"host": host}})),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{host}: {}", r.body);
        assert_eq!(code(&r), "invalid_metadata");
    }
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let up = upstream::start().await;
    let api = api().await;
    let mut settings = up.settings();
    settings.allow_private_networks = false;
    api.state.set_broker(up.broker(settings));
    store(&api, "zoom.api-key", json!({"host": "localhost:*"})).await;
    store(&api, "zoom.by-ip", json!({"host": "127.0.0.1:*"})).await;
    // By name (localhost resolves to loopback) and by IP literal.
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(code(&r), "destination_not_allowed");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("loopback"));
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.by-ip/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(bearer(&format!("https://127.0.0.1:{}/echo", up.port()))),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn policy_decides_who_may_broker_and_where() {
    let (api, up) = setup().await;
    // A service without broker in its policy.
    let r = api
        .call(
            "POST",
            PATH,
            Some(DENIED_SERVICE_TOKEN),
            Some(bearer(&up.url("/echo"))),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // The delegated service may reveal, not broker.
    let r = api
        .call(
            "POST",
            PATH,
            Some(DELEGATED_SERVICE_TOKEN),
            Some(bearer(&up.url("/echo"))),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // The credential is bound to anything, but the policy lists only localhost.
    store(&api, "zoom.anywhere", json!({"host": "*:*"})).await;
    api.state.replace_policy(
        strongroom_core::policy::Policy::from_toml(
            "[[rule]]\nservice='allowed'\noperations=['broker']\ncredentials=['zoom.*']\ndestinations=['localhost:*']",
        )
        .unwrap(),
    );
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.anywhere/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(bearer(&format!("https://127.0.0.1:{}/echo", up.port()))),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(code(&r), "destination_not_allowed");
    assert_eq!(up.hits(), 0);
    // ... and there it goes.
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.anywhere/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(bearer(&up.url("/echo"))),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn missing_foreign_disabled_and_destroyed_credentials_are_refused_like_reveal() {
    let (api, up) = setup().await;
    let other = api
        .call(
            "POST",
            "/v1/owners/bob/credentials/zoom.api-key/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(bearer(&up.url("/echo"))),
        )
        .await;
    let missing = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.nothing/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(bearer(&up.url("/echo"))),
        )
        .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND, "{}", other.body);
    assert_eq!((other.status, &other.body), (missing.status, &missing.body));
    let alice = user_token("alice");
    let r = api
        .call(
            "POST",
            "/v1/me/credentials/zoom.api-key/disable",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(code(&r), "credential_disabled");
    api.call(
        "POST",
        "/v1/me/credentials/zoom.api-key/enable",
        Some(&alice),
        None,
    )
    .await;
    store(&api, "zoom.api-key", json!({"host": "localhost:*"})).await;
    api.call(
        "DELETE",
        "/v1/me/credentials/zoom.api-key/versions/1",
        Some(&alice),
        None,
    )
    .await;
    let mut req = bearer(&up.url("/echo"));
    req["version"] = json!(1);
    let r = broker(&api, req).await;
    assert_eq!(r.status, StatusCode::GONE, "{}", r.body);
    assert_eq!(up.hits(), 0);
    // Version 2 is current and works.
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["version"], 2);
    let hits = up.hits();
    // Every version destroyed: 410 without a version named, as a reveal answers.
    api.call(
        "DELETE",
        "/v1/me/credentials/zoom.api-key/versions/2",
        Some(&alice),
        None,
    )
    .await;
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(r.status, StatusCode::GONE, "{}", r.body);
    let reveal = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            None,
        )
        .await;
    assert_eq!((reveal.status, code(&reveal)), (r.status, code(&r)));
    // A version that never existed: "no such version", as a reveal says, for a credential
    // the service may reach; another owner's still gets the plain 404.
    let mut req = bearer(&up.url("/echo"));
    req["version"] = json!(5);
    let r = broker(&api, req.clone()).await;
    let reveal = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(json!({"version": 5})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!((&r.status, &r.body), (&reveal.status, &reveal.body));
    assert!(r.body.contains("no such version"), "{}", r.body);
    let foreign = api
        .call(
            "POST",
            "/v1/owners/bob/credentials/zoom.api-key/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(req),
        )
        .await;
    assert_eq!((foreign.status, &foreign.body), (other.status, &other.body));
    assert_eq!(up.hits(), hits);
}

#[tokio::test]
async fn redirects_come_back_unfollowed_and_bad_upstreams_are_gateway_errors() {
    let (api, up) = setup().await;
    let r = broker(&api, bearer(&up.url("/redirect"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["status"], 302);
    assert_eq!(
        r.json()["headers"]["location"],
        "https://elsewhere.example/landing"
    );
    assert_eq!(up.hits(), 1, "the redirect was followed");

    let r = broker(&api, bearer(&up.url("/big"))).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
    assert_eq!(code(&r), "upstream_response_too_large");

    let r = broker(&api, bearer(&up.url("/big-chunked"))).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
    assert_eq!(code(&r), "upstream_response_too_large");

    // A compressed body cannot be scrubbed, however the compression is announced.
    for path in ["/gzip", "/gzip2", "/tegzip"] {
        let r = broker(&api, bearer(&up.url(path))).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}: {}", r.body);
        assert_eq!(code(&r), "upstream_encoded_body", "{path}");
    }

    // An upstream echoing the value as the coding: the error names the header, never its
    // text.
    for path in ["/ce-echo", "/te-echo"] {
        let r = broker(&api, bearer(&up.url(path))).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}: {}", r.body);
        assert_eq!(code(&r), "upstream_encoded_body", "{path}");
        assert_no_value(&r.body);
        assert!(
            !r.body.to_lowercase().contains("bearer"),
            "{path}: {}",
            r.body
        );
        assert!(
            !r.body.to_lowercase().contains("canary"),
            "{path}: {}",
            r.body
        );
    }

    let started = std::time::Instant::now();
    let r = broker(&api, bearer(&up.url("/slow"))).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.body);
    assert_eq!(code(&r), "upstream_timeout");
    // The broker's 2 s, not the upstream's minute.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let r = broker(&api, bearer(&format!("https://localhost:{port}/"))).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
    assert_eq!(code(&r), "upstream_unreachable");
    // Which step failed, without the socket's own words.
    assert_eq!(
        r.json()["error"]["message"],
        "the upstream did not accept a connection"
    );
    assert_no_value(&r.body);
}

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_refused() {
    let up = upstream::start().await;
    let api = api().await;
    let mut settings = up.settings();
    settings.ca_file = None;
    api.state.set_broker(up.broker(settings));
    store(&api, "zoom.api-key", json!({"host": "localhost:*"})).await;
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the upstream failed the TLS handshake"),
        "{}",
        r.body
    );
    assert_eq!(up.hits(), 0);
}

/// A version whose metadata no longer reads (the database edited by hand) is an integrity
/// error to the broker, recorded with its version: not a version without a bound host (a
/// 403 that would blame its owner). Its owner's listing still answers and points at it.
/// A host edited in the database while the store's reveal cache holds the genuine row: the
/// check of the destination reads the database, the opening may use the cached row, which
/// opens under its genuine binding. The call goes only where the host sealed with the value
/// opened says; here nowhere (it was redirected to the upstream before).
#[tokio::test]
async fn a_host_edited_behind_a_cached_row_redirects_nothing() {
    let up = upstream::start().await;
    let api = api().await;
    api.state.set_broker(up.broker(up.settings()));
    store(&api, "zoom.api-key", json!({"host": "api.zoom.us"})).await;
    // The reveal cache holds the genuine row now.
    assert_eq!(api.reveal_alices_key().await.status, StatusCode::OK);
    tamper(
        &api,
        "UPDATE versions SET metadata = '{\"host\": \"localhost:*\"}'",
    );
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "integrity_error"),
        "{}",
        r.body
    );
    assert_eq!(up.hits(), 0, "the value went to the edited host");
    assert_no_value(&r.body);
}

#[tokio::test]
async fn a_version_whose_metadata_does_not_read_is_an_integrity_error() {
    let (api, up) = setup().await;
    tamper(&api, "UPDATE versions SET metadata = '{\"host\": '");
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "integrity_error"),
        "{}",
        r.body
    );
    assert_eq!(up.hits(), 0);
    let records = broker_records(&api, "zoom.api-key", 1).await;
    assert_eq!(
        (&records[0]["error_code"], &records[0]["version"]),
        (&json!("integrity_error"), &json!(1))
    );
    // A reveal of the current version: refused too, its record naming the version.
    let r = api.reveal_alices_key().await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "integrity_error"),
        "{}",
        r.body
    );
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let record = audit_record(&api, "zoom.api-key", |i| i["request_id"] == rid.as_str()).await;
    assert_eq!(record["version"], 1);
    let alice = user_token("alice");
    let list = api
        .call("GET", "/v1/me/credentials", Some(&alice), None)
        .await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    let item = &list.json()["items"][0];
    assert_eq!(
        (&item["metadata_unreadable"], &item["metadata"]),
        (&json!(true), &Value::Null)
    );
    let detail = api
        .call("GET", "/v1/me/credentials/zoom.api-key", Some(&alice), None)
        .await;
    assert_eq!(detail.status, StatusCode::OK, "{}", detail.body);
    assert_eq!(detail.json()["versions"][0]["metadata_unreadable"], true);
    // Counted (and logged) as the integrity failure it is.
    let metrics = api.call("GET", "/metrics", None, None).await.body;
    assert!(
        metrics.contains("strongroom_unreadable_metadata_listed_total 2"),
        "{metrics}"
    );
    // Its owner destroys it, and puts a new one.
    let r = api
        .call(
            "DELETE",
            "/v1/me/credentials/zoom.api-key/versions/1",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    store(&api, "zoom.api-key", json!({"host": "localhost:*"})).await;
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn malformed_requests_are_400_before_anything_is_called() {
    let (api, up) = setup().await;
    let url = up.url("/echo");
    let cases = [
        json!({"method": "GET", "url": url}),
        json!({"method": "TRACE", "url": url, "inject": {"header": "Authorization"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "Authorization", "format": "Bearer"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "Authorization", "format": "{value}{value}"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "Authorization", "query": "k"}}),
        json!({"method": "GET", "url": url, "inject": {}}),
        json!({"method": "GET", "url": url, "inject": {"header": "Host"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "Authorization"},
               "headers": {"authorization": "Bearer mine"}}),
        json!({"method": "GET", "url": url, "inject": {"basic": {"username": "bob"}},
               "headers": {"Authorization": "x"}}),
        json!({"method": "GET", "url": url, "inject": {"basic": {"username": "a:b"}}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"transfer-encoding": "chunked"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"Range": "bytes=72-79"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key", "format": "a\r\nX-Evil: {value}"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"if-range": "x"}}),
        // Answers that depend on the body's hash, or digests of it.
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"If-Match": "W/\"2a-x\""}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"If-None-Match": "W/\"2a-x\""}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"Want-Digest": "sha-256"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"Want-Content-Digest": "sha-256=1"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"Want-Repr-Digest": "sha-256=1"}}),
        // Answers in a form the scrubber cannot read: Apache's old Range, another charset.
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"Request-Range": "bytes=72-79"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"},
               "headers": {"Accept-Charset": "utf-16"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"}, "body": "a", "body_base64": "YQ=="}),
        json!({"method": "GET", "url": format!("{url}?api_key=1"), "inject": {"query": "api_key"}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"}, "value": CANARY}),
        // Bodies are objects, versions 1 to 2^31 - 1, as on every route.
        json!(["GET", url, {}, null, null, {"header": "X-Api-Key"}, 1]),
        json!({"method": "GET", "url": url, "inject": ["X-Key", null, null, null]}),
        json!({"method": "GET", "url": url, "inject": {"basic": ["bob"]}}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"}, "version": 0}),
        json!({"method": "GET", "url": url, "inject": {"header": "X-Key"}, "version": 2_147_483_648_u64}),
    ];
    for body in cases {
        let r = broker(&api, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert_no_value(&r.body);
    }
    // The field at fault is named, nested ones by their place.
    for (body, says) in [
        (
            json!({"method": "GET", "url": url}),
            "missing field `inject`",
        ),
        (
            json!({"method": "GET", "url": url, "inject": {"header": "X-Key", "sk_x": 1}}),
            "inject has a field this endpoint does not take",
        ),
        (
            json!({"method": "GET", "url": url, "inject": {"header": 7}}),
            "inject has the wrong type or value",
        ),
    ] {
        let r = broker(&api, body.clone()).await;
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "{body}: {message}");
        assert!(!message.contains("sk_x"), "{message}");
    }
    let r = broker(
        &api,
        json!({"method": "POST", "url": url, "inject": {"header": "X-Key"}, "body": "x".repeat(65 * 1024)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn every_call_is_audited_with_its_destination_and_shown_in_usage() {
    let (api, up) = setup().await;
    let r = broker(&api, bearer(&up.url("/echo?secret-path=1"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = broker(&api, bearer(&up.url("/slow"))).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.body);
    let dest = format!("https://localhost:{}", up.port());
    let audit = api
        .call("GET", "/v1/audit?limit=100", Some(ADMIN_TOKEN), None)
        .await;
    let items = audit.json()["items"].as_array().unwrap().clone();
    let brokered: Vec<&Value> = items.iter().filter(|i| i["action"] == "broker").collect();
    // Newest first: the timed-out call (recorded before it was made, then its failure),
    // then the successful one.
    assert_eq!(brokered.len(), 3, "{brokered:?}");
    for i in &brokered {
        assert_eq!(i["destination"], dest.as_str());
        assert_eq!(i["principal_id"], "allowed");
        assert_eq!(i["version"], 1);
    }
    assert_eq!(
        (
            brokered[0]["outcome"].as_str(),
            brokered[0]["status"].as_u64()
        ),
        (Some("error"), Some(504))
    );
    assert_eq!(brokered[0]["error_code"], "upstream_timeout");
    assert_eq!(
        (
            brokered[1]["outcome"].as_str(),
            brokered[1]["status"].as_u64()
        ),
        (Some("ok"), Some(200))
    );
    assert_eq!(brokered[1]["request_id"], brokered[0]["request_id"]);
    assert_eq!(brokered[2]["outcome"], "ok");
    assert!(!audit.body.contains("secret-path"));
    assert_no_value(&audit.body);

    let usage = api
        .call(
            "GET",
            "/v1/me/credentials/zoom.api-key/usage",
            Some(&user_token("alice")),
            None,
        )
        .await;
    let items = usage.json()["items"].as_array().unwrap().clone();
    assert!(items
        .iter()
        .any(|i| i["action"] == "broker" && i["destination"] == dest.as_str()));

    // Refusals are audited too (the middleware records them).
    let r = broker(&api, bearer(&format!("https://127.0.0.1:{}/", up.port()))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let audit = api
        .call("GET", "/v1/audit?limit=1", Some(ADMIN_TOKEN), None)
        .await;
    let last = &audit.json()["items"][0];
    assert_eq!(last["action"], "broker");
    assert_eq!(last["outcome"], "denied");
    assert_eq!(
        last["destination"],
        format!("https://127.0.0.1:{}", up.port()).as_str()
    );
}

/// A value that cannot go into a header (a line break) is refused before the call is recorded
/// as made: the one record says 422.
#[tokio::test]
async fn an_unusable_value_is_refused_before_the_call_is_recorded() {
    let (api, up) = setup().await;
    let r = api
        .call(
            "PUT",
            "/v1/me/credentials/zoom.multiline",
            Some(&user_token("alice")),
            Some(json!({"value": "line-one\nline-two", "metadata": {"host": "localhost:*"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.multiline/broker",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(bearer(&up.url("/echo"))),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(code(&r), "value_unusable");
    assert_eq!(up.hits(), 0);
    let items = broker_records(&api, "zoom.multiline", 1).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(
        (&items[0]["status"], &items[0]["error_code"]),
        (&json!(422), &json!("value_unusable"))
    );
}

/// An operator's put (another process on the same database file) makes a new version of a
/// credential the server has brokered from memory: the next call sends the new value, and
/// is recorded once, with the new version (a call reads the credential's state from the
/// database before it opens a version, so the new one is what it opens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_by_another_process_is_what_the_next_call_sends() {
    let (api, up) = setup().await;
    let call = || broker(&api, bearer(&up.url("/echo")));
    let sent = || {
        up.last().headers["authorization"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    for _ in 0..2 {
        let r = call().await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(sent(), format!("Bearer {CANARY}"));
    }
    let (operator, operator_vault) = api.operator().await;
    operator_vault
        .put(strongroom_core::PutRequest {
            owner: "alice",
            name: "zoom.api-key",
            value: strongroom_crypto::SecretBytes::new(b"sk_live_newer_value".to_vec()),
            metadata: Some(json!({"host": "localhost:*"})),
            expected_version: None,
            created_by: "operator:import",
        })
        .await
        .unwrap();

    let r = call().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["version"], 2);
    assert_eq!(sent(), "Bearer sk_live_newer_value");
    let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let mine: Vec<(Value, Value)> = broker_records(&api, "zoom.api-key", 3)
        .await
        .into_iter()
        .filter(|i| i["request_id"] == id.as_str())
        .map(|i| (i["version"].clone(), i["status"].clone()))
        .collect();
    assert_eq!(mine, [(json!(2), json!(200))]);

    // Disabled by the operator: the next call is refused before anything is sent.
    strongroom_store::Store::set_enabled(
        &*operator,
        "alice",
        "zoom.api-key",
        false,
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    let hits = up.hits();
    let r = call().await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (StatusCode::CONFLICT, "credential_disabled"),
        "{}",
        r.body
    );
    assert_eq!(up.hits(), hits);
    operator.close().await;
}

/// A version past its `metadata.expires_at` is neither revealed nor brokered (410
/// `version_expired`, nothing sent), its owner's verify still answers, a later version
/// without one is used, and an expiry that is no RFC 3339 time is refused when stored.
#[tokio::test]
async fn an_expired_version_is_neither_revealed_nor_brokered() {
    let (api, up) = setup().await;
    let alice = user_token("alice");
    let put = |metadata: Value| {
        api.call(
            "PUT",
            "/v1/me/credentials/zoom.api-key",
            Some(&alice),
            Some(json!({"value": "sk_live_expired", "metadata": metadata})),
        )
    };
    for bad in [json!("tomorrow"), json!("2027-01-31"), json!(1_900_000_000)] {
        let r = put(json!({"host": "localhost:*", "expires_at": bad})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert_eq!(code(&r), "invalid_metadata");
        assert!(!r.body.contains("tomorrow"), "{}", r.body);
    }
    let r = put(json!({"host": "localhost:*", "expires_at": "2001-01-01T00:00:00Z"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let hits = up.hits();
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (StatusCode::GONE, "version_expired"),
        "{}",
        r.body
    );
    assert!(r.body.contains("2001-01-01T00:00:00Z"), "{}", r.body);
    assert_eq!(up.hits(), hits);
    let reveal = api.reveal_alices_key().await;
    assert_eq!((reveal.status, code(&reveal)), (r.status, code(&r)));
    assert!(!reveal.body.contains("sk_live_expired"));
    let verify = api
        .call(
            "POST",
            "/v1/me/credentials/zoom.api-key/verify",
            Some(&alice),
            Some(json!({"value": "sk_live_expired"})),
        )
        .await;
    assert_eq!(verify.json()["matches"], true, "{}", verify.body);
    // Its owner sees it as expired, in the listing and among the versions.
    let expiries = || async {
        let list = api
            .call("GET", "/v1/me/credentials", Some(&alice), None)
            .await
            .json();
        let detail = api
            .call("GET", "/v1/me/credentials/zoom.api-key", Some(&alice), None)
            .await
            .json();
        let versions: Vec<Value> = detail["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| json!([v["version"], v["expired"]]))
            .collect();
        (list["items"][0]["expired"].clone(), versions)
    };
    assert_eq!(
        expiries().await,
        (json!(true), vec![json!([2, true]), json!([1, false])])
    );
    // The refused reveal and broker call name the expired version, though neither asked
    // for one.
    let records = broker_records(&api, "zoom.api-key", 1).await;
    assert_eq!(
        (&records[0]["error_code"], &records[0]["version"]),
        (&json!("version_expired"), &json!(2))
    );
    let reveal_record = audit_record(&api, "zoom.api-key", |i| i["action"] == "reveal").await;
    assert_eq!(
        (&reveal_record["error_code"], &reveal_record["version"]),
        (&json!("version_expired"), &json!(2))
    );
    // The version before it has no expiry: named, it is still used.
    let mut req = bearer(&up.url("/echo"));
    req["version"] = json!(1);
    let r = broker(&api, req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // A new version with an expiry ahead is used.
    let r = put(json!({"host": "localhost:*", "expires_at": "2999-01-01T00:00:00Z"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(
        (r.status, r.json()["version"].clone()),
        (StatusCode::OK, json!(3))
    );
    assert_eq!(
        expiries().await,
        (
            json!(false),
            vec![json!([3, false]), json!([2, true]), json!([1, false])]
        )
    );
}

/// The newest of `name`'s last 20 audit records that `pick` takes, once there is one.
async fn audit_record(api: &TestApi, name: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let pick = &pick;
    eventually(&format!("an audit record of {name}"), || async move {
        api.call(
            "GET",
            &format!("/v1/audit?name={name}&limit=20"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await
        .json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| pick(i))
            .cloned()
    })
    .await
}

/// The broker records of `name`, newest first, once there are `n` of them (a request cut
/// short is recorded from a task of its own as it is dropped).
async fn broker_records(api: &TestApi, name: &str, n: usize) -> Vec<Value> {
    eventually(
        &format!("{n} broker records of {name}"),
        move || async move {
            let audit = api
                .call(
                    "GET",
                    &format!("/v1/audit?name={name}&limit=10"),
                    Some(ADMIN_TOKEN),
                    None,
                )
                .await;
            let items: Vec<Value> = audit.json()["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["action"] == "broker")
                .cloned()
                .collect();
            (items.len() >= n).then_some(items)
        },
    )
    .await
}

/// A call cut short after it was recorded as made gets a second record saying how it ended.
#[tokio::test]
async fn a_call_cut_short_gets_a_second_record() {
    // The client hangs up mid-call: its request future is dropped.
    // It hangs up once the call has reached the upstream (which answers only after a
    // minute), before the broker's own timeout: not after a fixed wait, which a slow
    // machine may spend before the call is even made.
    let (api, up) = setup().await;
    let mut settings = up.settings();
    settings.timeout = Duration::from_secs(30);
    api.state.set_broker(up.broker(settings));
    let call = broker(&api, bearer(&up.url("/slow")));
    let up_ref = &up;
    let reached = eventually("the call reached the upstream", move || async move {
        (up_ref.hits() > 0).then_some(())
    });
    tokio::select! {
        r = call => panic!("the call ended before the client hung up: {} {}", r.status, r.body),
        () = reached => {}
    }
    assert_eq!(up.hits(), 1);
    let items = broker_records(&api, "zoom.api-key", 2).await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(
        (&items[0]["status"], &items[0]["error_code"]),
        (&json!(499), &json!("client_closed"))
    );
    assert_eq!(
        (&items[1]["status"], &items[1]["outcome"]),
        (&json!(200), &json!("ok"))
    );
    assert_eq!(items[0]["request_id"], items[1]["request_id"]);
    assert_eq!(items[0]["destination"], items[1]["destination"]);

    // The server's own timeout fires mid-call (below the broker's). 3 s: the call is
    // recorded as made well before it, however slow the machine.
    let up = upstream::start().await;
    let api = api_full(
        strongroom_api::ApiLimits {
            request_timeout: Duration::from_secs(3),
            ..strongroom_api::ApiLimits::default()
        },
        Auditing::On,
    )
    .await;
    let mut settings = up.settings();
    settings.timeout = Duration::from_secs(30);
    api.state.set_broker(up.broker(settings));
    store(&api, "zoom.api-key", json!({"host": "localhost:*"})).await;
    let r = broker(&api, bearer(&up.url("/slow"))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(code(&r), "timeout");
    let items = broker_records(&api, "zoom.api-key", 2).await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(
        (&items[0]["status"], &items[0]["error_code"]),
        (&json!(503), &json!("timeout"))
    );
    assert_eq!(items[1]["status"], 200);

    // A call that went as recorded keeps its one record.
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let items = broker_records(&api, "zoom.api-key", 3).await;
    assert_eq!(items.len(), 3, "{items:?}");
    assert_eq!(
        (&items[0]["status"], &items[1]["status"]),
        (&json!(200), &json!(503))
    );
}

#[tokio::test]
async fn no_audit_record_no_call() {
    let up = upstream::start().await;
    let api = api_audited(Auditing::Failing).await;
    api.state.set_broker(up.broker(up.settings()));
    store(&api, "zoom.api-key", json!({"host": "localhost:*"})).await;
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(code(&r), "audit_unavailable");
    assert_eq!(up.hits(), 0, "the call was made without its audit record");
    assert_no_value(&r.body);
}

#[tokio::test]
async fn without_a_broker_the_route_is_unavailable() {
    let api = api().await;
    store(&api, "zoom.api-key", json!({"host": "localhost:*"})).await;
    let r = broker(&api, bearer("https://localhost:1/")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
}

#[tokio::test]
async fn the_openapi_document_describes_the_broker_route() {
    let api = api().await;
    let doc = api.call("GET", "/v1/openapi.json", None, None).await.json();
    let op = &doc["paths"]["/v1/owners/{owner}/credentials/{name}/broker"]["post"];
    assert_eq!(
        op["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/BrokerBody"
    );
    for status in ["200", "400", "403", "404", "502", "503", "504"] {
        assert!(op["responses"][status].is_object(), "{status}: {op}");
    }
    let schemas = &doc["components"]["schemas"];
    for s in [
        "BrokerBody",
        "InjectBody",
        "BasicBody",
        "BrokerResponseView",
    ] {
        assert!(schemas[s].is_object(), "{s}");
    }
    assert!(schemas["BrokerBody"]["required"]
        .as_array()
        .unwrap()
        .contains(&json!("inject")));
}

#[tokio::test]
async fn the_binding_is_per_version() {
    let (api, up) = setup().await;
    // Version 2 is current and bound nowhere: refused; version 1 is still bound.
    store(&api, "zoom.api-key", json!({"label": "rotated"})).await;
    let r = broker(&api, bearer(&up.url("/echo"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(code(&r), "destination_not_bound");
    assert_eq!(up.hits(), 0);
    let mut req = bearer(&up.url("/echo"));
    req["version"] = json!(1);
    let r = broker(&api, req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["version"], 1);
    assert_eq!(up.hits(), 1);
}

/// While a call is in flight (to `/slow`), one more over the service's share is 429 and one
/// more over the server's is 503, both `broker_busy` with `Retry-After`, before any value
/// is read or call made; once it has ended, the next call goes.
#[tokio::test]
async fn calls_in_flight_are_bounded() {
    for (per_service, in_all, status) in [
        (1, 16, StatusCode::TOO_MANY_REQUESTS),
        (16, 1, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let (api, up) = setup().await;
        // The first call ends at the broker's timeout (`/slow` answers far later).
        let mut settings = up.settings();
        settings.timeout = Duration::from_secs(8);
        settings.max_concurrent_calls = in_all;
        settings.max_concurrent_calls_per_service = per_service;
        api.state.set_broker(up.broker(settings));
        let slow = broker(&api, bearer(&up.url("/slow")));
        let up_ref = &up;
        let api_ref = &api;
        let second = async move {
            eventually("the first call reached the upstream", move || async move {
                (up_ref.hits() > 0).then_some(())
            })
            .await;
            broker(api_ref, bearer(&up_ref.url("/echo"))).await
        };
        let (first, second) = tokio::join!(slow, second);
        assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT, "{}", first.body);
        assert_eq!(second.status, status, "{}", second.body);
        assert_eq!(code(&second), "broker_busy");
        assert_eq!(second.headers["retry-after"], "1");
        assert_eq!(up.hits(), 1, "the refused call reached the upstream");
        // Its record says it was refused, and names no version (none was read).
        let refused = audit_record(&api, "zoom.api-key", |r| r["status"] == status.as_u16()).await;
        assert_eq!(refused["error_code"], "broker_busy");
        assert_eq!(refused["version"], Value::Null);
        let r = broker(&api, bearer(&up.url("/echo"))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
}
