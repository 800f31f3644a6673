//! Bad input, limits, versions, pagination, metrics and the OpenAPI document.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::json;
use strongroom_api::ApiLimits;

const KEY: &str = "/v1/me/credentials/zoom.api-key";

fn code(r: &Reply) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `req` with one more `name` field (beside any already there).
fn with_header(mut req: Request<Body>, name: &'static str, value: &'static str) -> Request<Body> {
    req.headers_mut()
        .append(name, axum::http::HeaderValue::from_static(value));
    req
}

#[tokio::test]
async fn malformed_requests_get_clear_json_errors_and_write_nothing() {
    let api = api().await;
    let alice = user_token("alice");
    let raw = |body: &str, ctype: Option<&str>| {
        let mut b = Request::builder()
            .method("PUT")
            .uri(KEY)
            .header("authorization", format!("Bearer {alice}"));
        if let Some(c) = ctype {
            b = b.header("content-type", c);
        }
        b.body(Body::from(body.to_owned())).unwrap()
    };
    let cases: Vec<(Request<Body>, u16, &str)> = vec![
        (
            raw("{not json", Some("application/json")),
            400,
            "bad_request",
        ),
        // A key twice in metadata, at the top or deeper: which one counts would depend on
        // the parser.
        (
            raw(
                r#"{"value": "v", "metadata": {"host": "a.example", "host": "b.example"}}"#,
                Some("application/json"),
            ),
            400,
            "invalid_metadata",
        ),
        (
            raw(
                r#"{"value": "v", "metadata": {"labels": [{"k": 1, "k": 2}]}}"#,
                Some("application/json"),
            ),
            400,
            "invalid_metadata",
        ),
        (
            raw(
                &json!({"value": CANARY, "expected_verison": 1}).to_string(),
                Some("application/json"),
            ),
            400,
            "bad_request",
        ),
        (
            raw(
                &json!({"value": 12345}).to_string(),
                Some("application/json"),
            ),
            400,
            "bad_request",
        ),
        (
            raw(
                &json!({"valu": CANARY}).to_string(),
                Some("application/json"),
            ),
            400,
            "bad_request",
        ),
        (
            raw(&json!({"value": CANARY}).to_string(), None),
            415,
            "unsupported_media_type",
        ),
        // The body is plain JSON, said once.
        (
            with_header(
                raw(
                    &json!({"value": CANARY}).to_string(),
                    Some("application/json"),
                ),
                "content-type",
                "text/plain",
            ),
            400,
            "bad_request",
        ),
        (
            raw(
                &json!({"value": CANARY}).to_string(),
                Some("application/a, text/b+json"),
            ),
            415,
            "unsupported_media_type",
        ),
        (
            with_header(
                raw(
                    &json!({"value": CANARY}).to_string(),
                    Some("application/json"),
                ),
                "content-encoding",
                "gzip",
            ),
            415,
            "unsupported_media_type",
        ),
        (
            with_header(
                raw(
                    &json!({"value": CANARY}).to_string(),
                    Some("application/json"),
                ),
                "transfer-encoding",
                "gzip, chunked",
            ),
            400,
            "bad_request",
        ),
        (
            raw(
                &json!({"value": CANARY, "metadata": [1]}).to_string(),
                Some("application/json"),
            ),
            400,
            "invalid_metadata",
        ),
        // A number that would be stored with other digits.
        (
            raw(
                &format!(
                    r#"{{"value": "{CANARY}", "metadata": {{"n": 123456789012345678901234567890}}}}"#
                ),
                Some("application/json"),
            ),
            400,
            "invalid_metadata",
        ),
        (
            raw(
                &json!({"value": CANARY, "metadata": {"k": "x".repeat(9 * 1024)}}).to_string(),
                Some("application/json"),
            ),
            400,
            "invalid_metadata",
        ),
        (
            raw(
                &json!({"value": "x".repeat(64 * 1024 + 1)}).to_string(),
                Some("application/json"),
            ),
            413,
            "value_too_large",
        ),
        (
            raw(
                &json!({"value": "x".repeat(600 * 1024)}).to_string(),
                Some("application/json"),
            ),
            413,
            "payload_too_large",
        ),
    ];
    for (req, status, want) in cases {
        let r = api.send(req).await;
        assert_eq!(
            (r.status.as_u16(), code(&r).as_str()),
            (status, want),
            "{}",
            r.body
        );
        assert!(
            !r.body.contains(CANARY) && !r.body.contains("12345"),
            "error echoes input: {}",
            r.body
        );
    }
    for bad in [
        "/v1/me/credentials/Zoom",
        "/v1/me/credentials/.hidden",
        "/v1/me/credentials/a%2Fb",
        "/v1/me/credentials/%FF",
    ] {
        let r = api
            .call("PUT", bad, Some(&alice), Some(json!({"value": "v"})))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
    }
    let long = format!("/v1/me/credentials/{}", "a".repeat(129));
    assert_eq!(
        api.call("PUT", &long, Some(&alice), Some(json!({"value": "v"})))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    // Nothing was written by any of them.
    let list = api
        .call("GET", "/v1/me/credentials", Some(&alice), None)
        .await;
    assert_eq!(list.json()["items"], json!([]));
    // Exactly 64 KiB is fine.
    let ok = api
        .call(
            "PUT",
            KEY,
            Some(&alice),
            Some(json!({"value": "x".repeat(64 * 1024)})),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED);
}

/// Each number in a request has one spelling and one range, in paths, queries and bodies;
/// bodies are JSON objects; an empty value is no credential; a bad bound host is refused
/// without being quoted back.
#[tokio::test]
async fn numbers_bodies_and_values_are_validated_one_way_everywhere() {
    let api = api().await;
    let alice = user_token("alice");
    let put = |body: serde_json::Value| api.call("PUT", KEY, Some(&alice), Some(body));
    assert_eq!(
        put(json!({"value": "v1"})).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        put(json!({"value": "v2"})).await.status,
        StatusCode::CREATED
    );

    let bad = |r: &Reply, what: &str| {
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.body);
        assert!(r.json()["error"]["code"].is_string(), "{what}: {}", r.body);
    };
    for v in [
        "+1",
        "01",
        "0",
        "1.0",
        "-1",
        "4294967296",
        "2147483648",
        "abc",
    ] {
        let path = format!("{KEY}/versions/{}", v.replace('+', "%2B"));
        let r = api.call("DELETE", &path, Some(&alice), None).await;
        bad(&r, v);
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("version"), "{v}: {message}");
    }
    for (what, body) in [
        ("reveal 0", json!({"version": 0})),
        ("reveal 2^31", json!({"version": 2_147_483_648_u64})),
    ] {
        let r = api
            .call(
                "POST",
                "/v1/owners/alice/credentials/zoom.api-key/reveal",
                Some(ALLOWED_SERVICE_TOKEN),
                Some(body),
            )
            .await;
        bad(&r, what);
    }
    let current = format!("{KEY}/current");
    bad(
        &api.call("POST", &current, Some(&alice), Some(json!({"version": 0})))
            .await,
        "current 0",
    );
    bad(
        &put(json!({"value": "v", "expected_version": 2_147_483_648_u64})).await,
        "expected_version 2^31",
    );
    for q in [
        "limit=05",
        "limit=%2B5",
        "limit=",
        "cursor=c1.%2B6",
        "cursor=c1.7A",
    ] {
        let r = api
            .call(
                "GET",
                &format!("/v1/me/credentials?{q}"),
                Some(&alice),
                None,
            )
            .await;
        bad(&r, q);
    }
    // A query that does not decode to UTF-8, or has a stray `%`, is refused (not read as
    // U+FFFD, which matches nothing); a bad parameter is named.
    for (q, says) in [
        ("owner=%FF", "UTF-8"),
        ("owner=a%zz", "UTF-8"),
        (
            "sk_live_pasted=1",
            "a parameter this endpoint does not take",
        ),
        ("limit=ten", "limit"),
    ] {
        let r = api
            .call("GET", &format!("/v1/audit?{q}"), Some(ADMIN_TOKEN), None)
            .await;
        bad(&r, q);
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "{q}: {message}");
        assert!(!message.contains("sk_live"), "{q}: {message}");
    }
    // Arrays are not objects, whatever serde would make of them.
    for body in [json!(["v3"]), json!(["v3", {"label": "x"}, null])] {
        bad(&put(body).await, "array body");
    }
    let r = api
        .call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(json!([1])),
        )
        .await;
    bad(&r, "array reveal body");
    assert!(!r.body.contains("v1"), "{}", r.body);
    // An empty value is refused; a malformed bound host is not quoted back.
    bad(&put(json!({"value": ""})).await, "empty value");
    let host = format!("https://{}.example/", "h".repeat(4000));
    let r = put(json!({"value": "v3", "metadata": {"host": host}})).await;
    bad(&r, "bad host");
    assert!(r.body.len() < 400 && !r.body.contains("hhhh"), "{}", r.body);
    // The document says so too.
    let doc = api.call("GET", "/v1/openapi.json", None, None).await.json();
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["PutBody"]["properties"]["value"]["minLength"], 1);
    assert_eq!(
        schemas["CurrentBody"]["properties"]["version"]["maximum"],
        2_147_483_647
    );
    assert_eq!(
        schemas["CurrentBody"]["properties"]["version"]["minimum"],
        1
    );
    // None of them wrote anything: still two versions, v2 current.
    let d = api.call("GET", KEY, Some(&alice), None).await.json();
    assert_eq!(
        (
            d["current_version"].clone(),
            d["versions"].as_array().unwrap().len()
        ),
        (json!(2), 2)
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let api = api().await;
    let r = api.call("GET", "/v1/nothing", None, None).await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert_eq!(r.headers["cache-control"], "no-store");
    let r = api
        .call("PATCH", KEY, Some(&user_token("alice")), None)
        .await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    assert_eq!(r.headers["cache-control"], "no-store");
    let r = api
        .call("GET", "/v1/me/credentials", Some("Basic abc"), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn versions_check_and_set_current_and_destroy() {
    let api = api().await;
    let alice = user_token("alice");
    let put = |body: serde_json::Value| api.call("PUT", KEY, Some(&alice), Some(body));
    let r = put(json!({"value": "v1", "expected_version": 0, "metadata": {"host": "api.zoom.us"}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        (r.json()["name"].as_str(), r.json()["version"].as_u64()),
        (Some("zoom.api-key"), Some(1))
    );
    assert!(r.json().get("value").is_none());
    assert!(fixed_width_time(&r.json()["created_at"]), "{}", r.body);
    // A version that does not exist, of a credential that does, is named as such.
    for (method, path, body) in [
        ("DELETE", format!("{KEY}/versions/99"), None),
        (
            "POST",
            format!("{KEY}/current"),
            Some(json!({"version": 7})),
        ),
    ] {
        let r = api.call(method, &path, Some(&alice), body).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.json()["error"]["message"], "no such version", "{path}");
    }
    let r = api
        .call(
            "DELETE",
            "/v1/me/credentials/zoom.none/versions/1",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.json()["error"]["message"], "no such credential");
    assert_eq!(
        code(&put(json!({"value": "v2", "expected_version": 0})).await),
        "version_conflict"
    );
    assert_eq!(
        put(json!({"value": "v2", "expected_version": 1}))
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        code(&put(json!({"value": "v3", "expected_version": 1})).await),
        "version_conflict"
    );
    assert_eq!(
        put(json!({"value": "v3"})).await.status,
        StatusCode::CREATED
    );

    let d = api.call("GET", KEY, Some(&alice), None).await.json();
    assert_eq!(
        (
            d["name"].as_str(),
            d["current_version"].as_u64(),
            d["state"].as_str()
        ),
        (Some("zoom.api-key"), Some(3), Some("enabled"))
    );
    let versions = d["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 3);
    for v in versions {
        assert!(
            v["version"].is_u64()
                && v["state"] == "active"
                && fixed_width_time(&v["created_at"])
                && v["metadata"].is_object()
        );
    }
    assert_eq!(
        versions.iter().find(|v| v["version"] == 1).unwrap()["metadata"]["host"],
        "api.zoom.us"
    );

    let cur = api
        .call(
            "POST",
            &format!("{KEY}/current"),
            Some(&alice),
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(cur.json()["current_version"], 1);
    let reveal = |body| {
        api.call(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            body,
        )
    };
    assert_eq!(
        reveal(None).await.json(),
        json!({"value": "v1", "version": 1})
    );
    let r = reveal(Some(json!({"version": 2}))).await;
    assert_eq!(r.json(), json!({"value": "v2", "version": 2}));
    assert_eq!(r.headers["content-type"], "application/json");

    assert_eq!(
        api.call("DELETE", &format!("{KEY}/versions/2"), Some(&alice), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let gone = reveal(Some(json!({"version": 2}))).await;
    assert_eq!(
        (gone.status, code(&gone).as_str()),
        (StatusCode::GONE, "version_destroyed")
    );
    let r = api
        .call(
            "POST",
            &format!("{KEY}/current"),
            Some(&alice),
            Some(json!({"version": 2})),
        )
        .await;
    assert_eq!(r.status, StatusCode::GONE);
    let missing = reveal(Some(json!({"version": 9}))).await;
    assert_eq!(
        (missing.status, missing.json()["error"]["message"].as_str()),
        (StatusCode::NOT_FOUND, Some("no such version"))
    );
    assert_eq!(
        reveal(Some(json!({"verson": 1}))).await.status,
        StatusCode::BAD_REQUEST
    );

    assert_eq!(
        api.call("POST", &format!("{KEY}/disable"), Some(&alice), None)
            .await
            .json()["state"],
        "disabled"
    );
    let r = reveal(None).await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (StatusCode::CONFLICT, "credential_disabled")
    );
    assert!(!r.body.contains("v1"));
    api.call("POST", &format!("{KEY}/enable"), Some(&alice), None)
        .await;
    assert_eq!(reveal(None).await.status, StatusCode::OK);

    // Every version destroyed: the credential is still there (listed, described), its
    // current value is gone, not missing.
    for v in [1, 3] {
        let path = format!("{KEY}/versions/{v}");
        let r = api.call("DELETE", &path, Some(&alice), None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    }
    let r = reveal(None).await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (StatusCode::GONE, "version_destroyed"),
        "{}",
        r.body
    );
    assert_eq!(
        api.call("GET", KEY, Some(&alice), None).await.json()["current_version"],
        json!(null)
    );

    assert_eq!(
        api.call("DELETE", KEY, Some(&alice), None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(reveal(None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        api.call("GET", KEY, Some(&alice), None).await.status,
        StatusCode::NOT_FOUND
    );
}

/// `who` verifies `value` against the seeded key.
async fn verify_as(api: &TestApi, who: String, value: &str) -> Reply {
    api.call(
        "POST",
        &format!("{KEY}/verify"),
        Some(&who),
        Some(json!({"value": value})),
    )
    .await
}

/// Asserts that `r` is 429 `rate_limited` and that its Retry-After is 1..=`at_most` seconds.
fn assert_rate_limited(r: &Reply, at_most: u64) {
    assert_eq!(
        (r.status, code(r).as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "{}",
        r.body
    );
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=at_most).contains(&retry), "Retry-After: {retry}");
}

#[tokio::test]
async fn verify_is_rate_limited_per_owner() {
    let api = api_with(ApiLimits {
        verify_per_minute: 3,
        ..ApiLimits::default()
    })
    .await;
    api.seed().await;
    let alice = user_token("alice");
    let verify = |who: String, value: &'static str| verify_as(&api, who, value);
    assert_eq!(
        verify(alice.clone(), CANARY).await.json(),
        json!({"matches": true})
    );
    assert_eq!(
        verify(alice.clone(), "wrong").await.json(),
        json!({"matches": false})
    );
    // An empty value is refused, as a put of it is (and still counts).
    let empty = verify(alice.clone(), "").await;
    assert_eq!(
        (empty.status, code(&empty).as_str()),
        (StatusCode::BAD_REQUEST, "bad_request"),
        "{}",
        empty.body
    );
    // 3 a minute: the next one is due within 20 s.
    assert_rate_limited(&verify(alice.clone(), CANARY).await, 20);
    // Another owner has their own budget.
    assert_eq!(
        verify(user_token("bob"), "x").await.status,
        StatusCode::NOT_FOUND
    );
}

/// Puts to one owner's credentials, by the user and services together, are limited per
/// minute: the one past the allowance gets 429 with Retry-After, writes nothing and is
/// audited as refused. The owner's other changes are never held back, so that a service
/// spending the allowance cannot keep the owner from the kill switch; other owners, reads
/// and reveals are not held back either.
#[tokio::test]
async fn puts_are_rate_limited_per_owner_and_the_kill_switch_never_is() {
    let api = api_with(ApiLimits {
        puts_per_owner_per_minute: 3,
        ..ApiLimits::default()
    })
    .await;
    let alice = user_token("alice");
    let call = |method: &'static str,
                path: &'static str,
                token: String,
                body: Option<serde_json::Value>| {
        let api = &api;
        async move { api.call(method, path, Some(&token), body).await }
    };
    let put = |token: String| call("PUT", KEY, token, Some(json!({"value": CANARY})));
    let service_put = || {
        call(
            "PUT",
            "/v1/owners/alice/credentials/zoom.api-key",
            ALLOWED_SERVICE_TOKEN.into(),
            Some(json!({"value": CANARY})),
        )
    };
    // Three puts through both routes share alice's allowance.
    for r in [
        put(alice.clone()).await,
        service_put().await,
        put(alice.clone()).await,
    ] {
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    // The fourth, whichever route, is refused.
    for limited in [put(alice.clone()).await, service_put().await] {
        // 3 a minute: the next one is due within 20 s.
        assert_rate_limited(&limited, 20);
        assert!(!limited.body.contains(CANARY), "{}", limited.body);
    }
    // Nothing was written.
    let described = call("GET", KEY, alice.clone(), None).await.json();
    assert_eq!(described["current_version"], 3, "{described}");
    // Every other change still goes through: the owner keeps the kill switch.
    for (method, path, body, want) in [
        (
            "POST",
            "/v1/me/credentials/zoom.api-key/current",
            Some(json!({"version": 2})),
            StatusCode::OK,
        ),
        (
            "POST",
            "/v1/me/credentials/zoom.api-key/disable",
            None,
            StatusCode::OK,
        ),
        (
            "POST",
            "/v1/me/credentials/zoom.api-key/enable",
            None,
            StatusCode::OK,
        ),
        (
            "POST",
            "/v1/me/credentials/zoom.api-key/disable",
            None,
            StatusCode::OK,
        ),
        (
            "DELETE",
            "/v1/me/credentials/zoom.api-key/versions/1",
            None,
            StatusCode::NO_CONTENT,
        ),
        ("DELETE", KEY, None, StatusCode::NO_CONTENT),
    ] {
        let r = call(method, path, alice.clone(), body).await;
        assert_eq!(r.status, want, "{method} {path}: {}", r.body);
    }
    // Reads are not puts; another owner has their own allowance.
    let list = call("GET", "/v1/me/credentials", alice.clone(), None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    let r = put(user_token("bob")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    // Each refusal is in the audit log as a failed put, with its code.
    let records = api
        .call(
            "GET",
            "/v1/audit?owner=alice&name=zoom.api-key",
            Some(ADMIN_TOKEN),
            None,
        )
        .await
        .json();
    let refused: Vec<(String, u64)> = records["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["error_code"] == "rate_limited")
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        refused,
        vec![("put".to_owned(), 429), ("put".to_owned(), 429)],
        "{records}"
    );
    // And the document lists the 429 on both put routes, and on no other write.
    let doc = put_routes_document(&api, "429", "puts_per_owner_per_minute").await;
    for (path, method) in [
        ("/v1/me/credentials/{name}", "delete"),
        ("/v1/me/credentials/{name}/current", "post"),
        ("/v1/me/credentials/{name}/disable", "post"),
        ("/v1/me/credentials/{name}/enable", "post"),
        ("/v1/me/credentials/{name}/versions/{version}", "delete"),
    ] {
        assert!(
            doc["paths"][path][method]["responses"]["429"].is_null(),
            "{method} {path}"
        );
    }
}

/// Checks that both put routes (the user's and the service's) document `status` with a
/// description naming `needle`; returns the OpenAPI document.
async fn put_routes_document(api: &TestApi, status: &str, needle: &str) -> serde_json::Value {
    let doc = api.call("GET", "/v1/openapi.json", None, None).await.json();
    for path in [
        "/v1/me/credentials/{name}",
        "/v1/owners/{owner}/credentials/{name}",
    ] {
        let text = doc["paths"][path]["put"]["responses"][status]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(text.contains(needle), "put {path} {status}: {text}");
    }
    doc
}

/// The put limiter keeps an entry per owner until pruned: pruning forgets the owners whose
/// allowance has refilled and keeps the one still limited, whose budget is not reset.
#[tokio::test]
async fn pruning_the_put_limiter_forgets_only_refilled_owners() {
    // 20 a minute: one put's allowance refills in 3 s, and an owner is forgotten once their
    // state is that of a fresh one, 6 s after their put. The 50 puts below (well under a
    // second here) have those 6 s, and the busy owner's last two steps 3 s, however slow
    // the machine.
    let api = api_with(ApiLimits {
        puts_per_owner_per_minute: 20,
        ..ApiLimits::default()
    })
    .await;
    let put = |who: String| {
        let api = &api;
        async move {
            api.call(
                "PUT",
                "/v1/me/credentials/k",
                Some(&who),
                Some(json!({"value": "v"})),
            )
            .await
            .status
        }
    };
    for i in 0..50 {
        assert_eq!(
            put(user_token(&format!("user-{i}"))).await,
            StatusCode::CREATED
        );
    }
    assert_eq!(api.state.prune_rate_limits(), 50, "none has refilled yet");
    // Past the 6 s after which each of them is forgotten.
    tokio::time::sleep(std::time::Duration::from_millis(6500)).await;
    // One owner spends their whole allowance just before the pass.
    let busy = user_token("busy");
    let mut limited = false;
    for _ in 0..40 {
        if put(busy.clone()).await == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            break;
        }
    }
    assert!(limited, "20 a minute was never reached");
    assert_eq!(
        api.state.prune_rate_limits(),
        1,
        "only the busy owner is kept"
    );
    assert_eq!(put(busy).await, StatusCode::TOO_MANY_REQUESTS);
}

/// The verify allowance is kept in the store: another node over the same database draws on
/// the same one, and so does a restarted server. (Counted per process, N nodes would allow
/// N times the guesses at a value, and every restart would refill them.)
#[tokio::test]
async fn the_verify_allowance_is_shared_by_nodes_and_kept_across_restarts() {
    let limits = ApiLimits {
        verify_per_minute: 4,
        ..ApiLimits::default()
    };
    let first = api_with(limits.clone()).await;
    first.seed().await;
    let second = first.another_node(limits.clone()).await;
    let alice = user_token("alice");
    for (i, node) in [&first, &second, &first, &second].into_iter().enumerate() {
        assert_eq!(
            verify_as(node, alice.clone(), "guess").await.json(),
            json!({"matches": false}),
            "guess {i}"
        );
    }
    for node in [&first, &second] {
        // 4 a minute: the next one is due within 15 s.
        assert_rate_limited(&verify_as(node, alice.clone(), CANARY).await, 15);
    }
    drop(second);
    let restarted = first.another_node(limits).await;
    assert_eq!(
        verify_as(&restarted, alice.clone(), CANARY).await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "a restart does not refill the allowance"
    );
    // Another owner has their own.
    assert_eq!(
        verify_as(&restarted, user_token("bob"), "x").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn list_pages_are_stable_and_owner_scoped() {
    let api = api().await;
    let alice = user_token("alice");
    for i in 0..5 {
        api.call(
            "PUT",
            &format!("/v1/me/credentials/svc-{i}.key"),
            Some(&alice),
            Some(json!({"value": format!("v{i}")})),
        )
        .await;
    }
    api.call(
        "PUT",
        "/v1/me/credentials/bobs.key",
        Some(&user_token("bob")),
        Some(json!({"value": "b"})),
    )
    .await;
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/me/credentials?limit=2&cursor={c}"),
            None => "/v1/me/credentials?limit=2".to_owned(),
        };
        let page = api.call("GET", &path, Some(&alice), None).await.json();
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["name"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        names,
        [
            "svc-0.key",
            "svc-1.key",
            "svc-2.key",
            "svc-3.key",
            "svc-4.key"
        ]
    );
    for bad in [
        "limit=0",
        "limit=1001",
        "cursor=%00garbage",
        "limit=x",
        "foo=1",
    ] {
        let r = api
            .call(
                "GET",
                &format!("/v1/me/credentials?{bad}"),
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn owner_ids_are_percent_encoded_in_paths() {
    let api = api().await;
    let owner = "tenant a/ü";
    let r = api
        .call(
            "PUT",
            "/v1/owners/tenant%20a%2F%C3%BC/credentials/zoom.x",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(json!({"value": "v"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let list = api
        .call("GET", "/v1/me/credentials", Some(&user_token(owner)), None)
        .await
        .json();
    assert_eq!(list["items"][0]["name"], "zoom.x");
    let r = api
        .call(
            "PUT",
            "/v1/owners/a/credentials/stripe.key",
            Some(ALLOWED_SERVICE_TOKEN),
            Some(json!({"value": "v"})),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "outside the policy's name patterns"
    );
    // A malformed name or owner is the same 400 for a service granted it and one granted
    // nothing: the answer does not depend on the caller's grant.
    for token in [ALLOWED_SERVICE_TOKEN, DENIED_SERVICE_TOKEN] {
        for path in [
            "/v1/owners/alice/credentials/ZOOM.x/reveal",
            "/v1/owners/%00/credentials/zoom.x/reveal",
        ] {
            let r = api.call("POST", path, Some(token), None).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
        }
    }
    // A query on a route that reads none is refused, not ignored: `?version=1` on a reveal
    // would otherwise answer with the current version.
    for (method, path) in [
        (
            "POST",
            "/v1/owners/tenant%20a%2F%C3%BC/credentials/zoom.x/reveal?version=1",
        ),
        ("GET", "/v1/keys?x=1"),
    ] {
        let token = if method == "GET" {
            ADMIN_TOKEN
        } else {
            ALLOWED_SERVICE_TOKEN
        };
        let r = api.call(method, path, Some(token), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
    }
    let r = api
        .call(
            "GET",
            "/v1/me/credentials?limit=1",
            Some(&user_token(owner)),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // A body is JSON on every route, and a route that takes none refuses one.
    let raw = |method: &str, path: &str, token: &str, ctype: Option<&str>, body: &str| {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"));
        if let Some(c) = ctype {
            b = b.header("content-type", c);
        }
        b.body(Body::from(body.to_owned())).unwrap()
    };
    let reveal = "/v1/owners/tenant%20a%2F%C3%BC/credentials/zoom.x/reveal";
    let r = api
        .send(raw(
            "POST",
            reveal,
            ALLOWED_SERVICE_TOKEN,
            Some("text/plain"),
            r#"{"version":1}"#,
        ))
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", r.body);
    let r = api
        .send(raw("POST", reveal, ALLOWED_SERVICE_TOKEN, None, ""))
        .await;
    assert_eq!(r.status, StatusCode::OK, "no body, no type: {}", r.body);
    let owner_token = user_token(owner);
    let disable = "/v1/me/credentials/zoom.x/disable";
    for (body, want) in [(r#"{"x": 1}"#, 400), ("[]", 400), ("{}", 200), ("", 200)] {
        let r = api
            .send(raw(
                "POST",
                disable,
                &owner_token,
                Some("application/json"),
                body,
            ))
            .await;
        assert_eq!(r.status.as_u16(), want, "{body}: {}", r.body);
    }
    // A token whose subject could own nothing (a control character) is no user's.
    let r = api
        .call(
            "GET",
            "/v1/me/credentials",
            Some(&user_token("a\u{0}b")),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
}

#[tokio::test]
async fn every_body_over_the_limit_gets_the_json_413() {
    let api = api().await;
    api.seed().await;
    let alice = user_token("alice");
    let big = format!("{{\"value\": \"{}\"}}", "x".repeat(600 * 1024));
    for (method, path, token) in [
        ("PUT", KEY, alice.as_str()),
        ("POST", "/v1/me/credentials/zoom.api-key/current", &alice),
        ("POST", "/v1/me/credentials/zoom.api-key/verify", &alice),
        (
            "PUT",
            "/v1/owners/alice/credentials/zoom.api-key",
            ALLOWED_SERVICE_TOKEN,
        ),
        (
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            ALLOWED_SERVICE_TOKEN,
        ),
        (
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/broker",
            ALLOWED_SERVICE_TOKEN,
        ),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(big.clone()))
            .unwrap();
        let r = api.send(req).await;
        assert_eq!(
            r.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{method} {path}: {}",
            r.body
        );
        assert_eq!(code(&r), "payload_too_large", "{method} {path}: {}", r.body);
    }
}

/// A head over `limits.max_header_bytes` (a large token or cookie, say) is answered 431
/// with a JSON error naming the limit, before authentication or any handler: nothing is
/// written, the header's content is not echoed, and the refusal is counted in the metrics.
#[tokio::test]
async fn a_head_over_the_limit_gets_the_json_431_and_writes_nothing() {
    let api = api_with(ApiLimits {
        max_header_bytes: 8192,
        ..ApiLimits::default()
    })
    .await;
    let alice = user_token("alice");
    let put = |padding: usize| {
        Request::builder()
            .method("PUT")
            .uri(KEY)
            .header("authorization", format!("Bearer {alice}"))
            .header("content-type", "application/json")
            .header("x-padding", "p".repeat(padding))
            .body(Body::from(json!({"value": CANARY}).to_string()))
            .unwrap()
    };
    let r = api.send(put(9 * 1024)).await;
    assert_eq!(
        r.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{}",
        r.body
    );
    assert_eq!(code(&r), "headers_too_large");
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("allows 8192"), "{message}");
    assert!(
        !r.body.contains("ppp") && !r.body.contains(&alice),
        "{}",
        r.body
    );
    let r = api.call("GET", KEY, Some(&alice), None).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "the refused put wrote: {}",
        r.body
    );

    // A token too large is refused the same way, not taken for a forged one (401).
    let huge_token = format!("Bearer {}", "t".repeat(9 * 1024));
    let req = Request::builder()
        .method("GET")
        .uri("/v1/me/credentials")
        .header("authorization", huge_token)
        .body(Body::empty())
        .unwrap();
    let r = api.send(req).await;
    assert_eq!(
        r.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{}",
        r.body
    );
    assert!(!r.body.contains("ttt"), "{}", r.body);

    // The limit counts the request target too, and holds for routes outside /v1.
    let r = api
        .call(
            "GET",
            &format!("/healthz?{}", "q".repeat(9 * 1024)),
            None,
            None,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{}",
        r.body
    );

    // Under the limit, the same put goes through.
    let r = api.send(put(6 * 1024)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);

    let m = api.call("GET", "/metrics", None, None).await;
    let refused = m
        .body
        .lines()
        .find(|l| {
            l.starts_with("strongroom_http_requests_total")
                && l.contains(r#"route="/v1/me/credentials/{name}""#)
                && l.contains(r#"status="431""#)
        })
        .unwrap_or_else(|| panic!("no 431 counted for the put route:\n{}", m.body));
    assert!(refused.ends_with(" 1"), "{refused}");
}

/// A body the endpoint cannot take is refused with the field at fault named, in words that
/// quote nothing the client sent (a value, or a key made of one).
#[tokio::test]
async fn body_errors_name_the_field_and_quote_nothing() {
    let api = api().await;
    let alice = user_token("alice");
    let raw = |body: &'static [u8]| {
        Request::builder()
            .method("PUT")
            .uri(KEY)
            .header("authorization", format!("Bearer {alice}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    for (body, says) in [
        (
            &br#"{"value":"sk_a","value":"sk_b"}"#[..],
            "duplicate field `value`",
        ),
        (
            br#"{"value":"sk_a","metadata":{"k":1,"k":2}}"#,
            "metadata: a key appears twice",
        ),
        (
            br#"{"value":"sk_a","sk_live_key":1}"#,
            "the body has a field this endpoint does not take",
        ),
        (br#"{"value":5}"#, "value has the wrong type or value"),
        (
            br#"{"value":"sk_a","expected_version":"sk_live_b"}"#,
            "expected_version has the wrong type or value",
        ),
        (
            br#"{"value":"sk_a","expected_version":-1}"#,
            "expected_version has the wrong type or value",
        ),
        (br#"{"metadata":{}}"#, "missing field `value`"),
        (b"{\"value\":\"\xff\xfe\"}", "UTF-8"),
        (br#"{"value":"sk_a"} {}"#, "not valid JSON"),
    ] {
        let r = api.send(raw(body)).await;
        let what = String::from_utf8_lossy(body);
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.body);
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "{what}: {message}");
        // Faults inside metadata have the metadata checks' code.
        let code = if says.starts_with("metadata") {
            "invalid_metadata"
        } else {
            "bad_request"
        };
        assert_eq!(r.json()["error"]["code"], code, "{what}");
        for secret in ["sk_a", "sk_b", "sk_live"] {
            assert!(!r.body.contains(secret), "{what}: {}", r.body);
        }
    }
    // Nothing was written.
    let r = api.call("GET", KEY, Some(&alice), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
}

/// An owner id has one spelling in a path: a `%` that starts no escape is refused rather
/// than taken literally, where it would alias the escaped `%25` form.
#[tokio::test]
async fn a_stray_percent_in_a_path_is_refused_not_aliased() {
    let api = api().await;
    let put = |owner: &str| {
        let path = format!("/v1/owners/{owner}/credentials/zoom.key");
        let api = &api;
        async move {
            api.call(
                "PUT",
                &path,
                Some(ALLOWED_SERVICE_TOKEN),
                Some(json!({"value": CANARY})),
            )
            .await
        }
    };
    for bad in ["%zz", "a%2", "a%", "%%41"] {
        let r = put(bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
    }
    assert_eq!(put("%25zz").await.status, StatusCode::CREATED);
    let r = api
        .call(
            "POST",
            "/v1/owners/%25zz/credentials/zoom.key/reveal",
            Some(ALLOWED_SERVICE_TOKEN),
            None,
        )
        .await;
    assert_eq!(r.json()["version"], 1, "a refused spelling wrote a version");
}

#[tokio::test]
async fn metrics_use_route_templates_never_owners_names_or_values() {
    let api = api().await;
    api.seed().await;
    api.call(
        "POST",
        "/v1/owners/alice/credentials/zoom.api-key/reveal",
        Some(ALLOWED_SERVICE_TOKEN),
        None,
    )
    .await;
    api.call(
        "GET",
        "/v1/me/credentials/zoom.api-key",
        Some(&user_token("mallory")),
        None,
    )
    .await;
    let m = api.call("GET", "/metrics", None, None).await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(
        m.body
            .contains(r#"route="/v1/owners/{owner}/credentials/{name}/reveal""#),
        "{}",
        m.body
    );
    assert!(m.body.contains(r#"status="404""#));
    assert!(m
        .body
        .contains("strongroom_http_request_duration_seconds_bucket"));
    for leak in ["alice", "mallory", "zoom.api-key", CANARY] {
        assert!(!m.body.contains(leak), "metrics contain {leak}");
    }
}

#[tokio::test]
async fn metrics_label_unknown_methods_other_so_clients_cannot_grow_them() {
    let api = api().await;
    for i in 0..20 {
        let r = api
            .call(&format!("ZZMETHOD{i}"), "/v1/me/credentials", None, None)
            .await;
        assert!(r.status.is_client_error(), "{}", r.status);
    }
    api.call("GET", "/healthz", None, None).await;
    let m = api.call("GET", "/metrics", None, None).await;
    assert!(
        !m.body.contains("ZZMETHOD"),
        "a client-chosen method became a label"
    );
    assert!(m.body.contains(r#"method="other""#), "{}", m.body);
    assert!(m.body.contains(r#"method="GET""#), "{}", m.body);
    let series = m
        .body
        .lines()
        .filter(|l| {
            l.starts_with("strongroom_http_requests_total{") && l.contains("method=\"other\"")
        })
        .count();
    assert_eq!(series, 1, "twenty unknown methods, one series:\n{}", m.body);
}

/// The OpenAPI document is consistent: every `{variable}` of a path is a required path
/// parameter of each of its operations and no other parameter claims to be in the path;
/// every operation that needs credentials documents the 401 and every one that takes a body
/// or a path parameter the 400.
/// What the routes answer to a query they do not read, a body over the limit, and a body
/// that is not sent as JSON is documented on every `/v1` operation: the document is checked
/// against what the server does, not against itself.
#[tokio::test]
async fn every_status_bad_input_gets_is_documented() {
    let api = api().await;
    api.seed().await;
    let doc = api.call("GET", "/v1/openapi.json", None, None).await.json();
    let alice = user_token("alice");
    let oversized = vec![b' '; ApiLimits::default().max_body_bytes + 1];
    let mut problems = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
            continue;
        }
        let concrete = path
            .replace("{owner}", "alice")
            .replace("{name}", "zoom.api-key")
            .replace("{version}", "1");
        for (method, op) in item.as_object().unwrap() {
            let token = match op["tags"][0].as_str() {
                Some("user") => alice.as_str(),
                Some("service") => ALLOWED_SERVICE_TOKEN,
                _ => ADMIN_TOKEN,
            };
            let documented = op["responses"].as_object().unwrap();
            let mut probes: Vec<(&str, String, Option<&str>, Vec<u8>)> = vec![
                (
                    "a query it does not read",
                    format!("{concrete}?unexpected=1"),
                    None,
                    vec![],
                ),
                (
                    "an oversized body",
                    concrete.clone(),
                    Some("application/json"),
                    oversized.clone(),
                ),
            ];
            if method != "get" {
                probes.push((
                    "a body not sent as JSON",
                    concrete.clone(),
                    Some("text/plain"),
                    b"{}".to_vec(),
                ));
            }
            for (what, uri, content_type, body) in probes {
                let mut req = Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&uri)
                    .header("authorization", format!("Bearer {token}"));
                if let Some(ct) = content_type {
                    req = req.header("content-type", ct);
                }
                let r = api.send(req.body(Body::from(body)).unwrap()).await;
                if !documented.contains_key(r.status.as_str()) {
                    problems.push(format!(
                        "{method} {path}: {what} answers {} ({}), not documented",
                        r.status, r.body
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // None of that destroyed anything; nor does a destroy with a body, which is refused
    // (`{"version": 1}` would otherwise destroy every version).
    let r = api
        .call("DELETE", KEY, Some(&alice), Some(json!({"version": 1})))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let kept = api.call("GET", KEY, Some(&alice), None).await;
    assert_eq!(kept.json()["current_version"], 1, "{}", kept.body);
}

/// RFC 3339 in UTC with exactly three fraction digits (`2026-11-29T05:07:45.090Z`): times
/// sort as text.
fn fixed_width_time(v: &serde_json::Value) -> bool {
    let Some(t) = v.as_str() else { return false };
    let shape = "0000-00-00T00:00:00.000Z";
    t.len() == shape.len()
        && t.bytes().zip(shape.bytes()).all(|(c, s)| {
            if s == b'0' {
                c.is_ascii_digit()
            } else {
                c == s
            }
        })
}

#[tokio::test]
async fn openapi_parameters_and_error_responses_match_the_routes() {
    let api = api().await;
    let doc = api.call("GET", "/v1/openapi.json", None, None).await.json();
    let mut problems = Vec::new();
    let mut operation_ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let vars: Vec<&str> = path
            .split('{')
            .skip(1)
            .filter_map(|rest| rest.split_once('}').map(|(v, _)| v))
            .collect();
        for (method, op) in item.as_object().unwrap() {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let in_path: Vec<&str> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            for p in &params {
                if p["in"] == "path" && p["required"] != true {
                    problems.push(format!(
                        "{method} {path}: path parameter {} optional",
                        p["name"]
                    ));
                }
            }
            let mut want = vars.clone();
            let mut got = in_path.clone();
            want.sort_unstable();
            got.sort_unstable();
            if want != got {
                problems.push(format!(
                    "{method} {path}: path parameters {got:?}, want {want:?}"
                ));
            }
            // OpenAPI requires them unique (code generators name functions after them).
            if !operation_ids.insert(op["operationId"].as_str().unwrap_or_default()) {
                problems.push(format!(
                    "{method} {path}: operationId {} used twice",
                    op["operationId"]
                ));
            }
            let responses = op["responses"].as_object().unwrap();
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if secured && !responses.contains_key("401") {
                problems.push(format!("{method} {path}: no 401"));
            }
            let takes_input = op.get("requestBody").is_some() || !vars.is_empty();
            if takes_input && !responses.contains_key("400") {
                problems.push(format!("{method} {path}: no 400"));
            }
            // What every route of a kind can answer, whatever its handler does.
            let mut must = vec!["431"];
            if path.starts_with("/v1/") && path != "/v1/openapi.json" {
                must.push("503");
                let retry = &responses["503"]["headers"]["Retry-After"];
                if retry.is_null() {
                    problems.push(format!("{method} {path}: a 503 without Retry-After"));
                }
                let said = responses["503"]["description"].as_str().unwrap_or_default();
                if !said.contains("key_unavailable") {
                    problems.push(format!("{method} {path}: a 503 without the common causes"));
                }
            }
            if path.starts_with("/v1/me/") {
                must.push("403");
            }
            if op.get("requestBody").is_some() {
                must.extend(["408", "413", "415"]);
            }
            for status in must {
                if !responses.contains_key(status) {
                    problems.push(format!("{method} {path}: no {status}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn health_openapi_and_headers() {
    let api = api().await;
    assert_eq!(
        api.call("GET", "/healthz", None, None).await.json(),
        json!({"status": "ok"})
    );
    assert_eq!(
        api.call("GET", "/readyz", None, None).await.json(),
        json!({"status": "ok"})
    );
    let doc = api.call("GET", "/v1/openapi.json", None, None).await.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/me/credentials",
        "/v1/me/credentials/{name}",
        "/v1/me/credentials/{name}/current",
        "/v1/me/credentials/{name}/disable",
        "/v1/me/credentials/{name}/enable",
        "/v1/me/credentials/{name}/verify",
        "/v1/me/credentials/{name}/usage",
        "/v1/me/credentials/{name}/versions/{version}",
        "/v1/owners/{owner}/credentials/{name}",
        "/v1/owners/{owner}/credentials/{name}/reveal",
        "/v1/owners/{owner}/credentials/{name}/broker",
        "/v1/keys",
        "/v1/audit",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/openapi.json",
    ] {
        assert!(paths.contains_key(p), "OpenAPI misses {p}");
    }
    // A reveal's body is optional but never `null` (refused with 400).
    let reveal = &paths["/v1/owners/{owner}/credentials/{name}/reveal"]["post"];
    assert_eq!(reveal["requestBody"]["required"], false, "{reveal}");
    let schema = &reveal["requestBody"]["content"]["application/json"]["schema"];
    assert!(!schema.to_string().contains("null"), "{schema}");
    // Delegated mode's header is a parameter of every service route.
    for (path, item) in paths.iter().filter(|(p, _)| p.starts_with("/v1/owners/")) {
        for (method, op) in item.as_object().unwrap() {
            let header = op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "X-Strongroom-On-Behalf-Of");
            assert!(
                header.is_some_and(|h| h["in"] == "header" && h["required"] == false),
                "{method} {path}: {op}"
            );
        }
    }
    assert!(doc["components"]["securitySchemes"]["user_jwt"].is_object());
    let r = api
        .call(
            "GET",
            "/v1/me/credentials",
            Some(&user_token("alice")),
            None,
        )
        .await;
    assert_eq!(r.headers["cache-control"], "no-store");
    assert!(r.headers.contains_key("x-request-id"));
    // Request ids are unique and do not count: a counter in every response (`/healthz`
    // included) told anyone how many requests the server had answered.
    let mut ids = Vec::new();
    for _ in 0..20 {
        let r = api.call("GET", "/healthz", None, None).await;
        let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
        ids.push(u128::from_str_radix(&id, 16).unwrap_or_else(|_| panic!("{id}")));
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    let steps = ids
        .windows(2)
        .filter(|w| w[1].wrapping_sub(w[0]) < 1000)
        .count();
    assert!(steps < 3, "request ids count: {ids:x?}");
}

#[tokio::test]
async fn admins_see_key_usage_not_values() {
    let api = api().await;
    api.seed().await;
    let r = api.call("GET", "/v1/keys", Some(ADMIN_TOKEN), None).await;
    let v = r.json();
    assert_eq!(v["active"]["provider"], "fake");
    assert_eq!(v["active"]["credential_versions"], 1);
    assert!(!r.body.contains(CANARY));
}

/// Alice's audit records of the request that got `reply`, newest first.
async fn records_of_request(api: &TestApi, reply: &Reply) -> Vec<serde_json::Value> {
    let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    let log = api
        .call(
            "GET",
            "/v1/audit?owner=alice&limit=50",
            Some(ADMIN_TOKEN),
            None,
        )
        .await
        .json();
    log["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["request_id"] == id.as_str())
        .cloned()
        .collect()
}

/// An operator's import or put (another process on the same database file) makes a new
/// version of a credential the server answers reveals for from memory: the next reveal
/// answers the new value (not a 503 to retry, nor the old value), and its records say what
/// happened: the value read from memory was recorded, did not leave, and the new one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_by_another_process_is_what_the_next_reveal_answers() {
    let api = api_audited(Auditing::On).await;
    let alice = user_token("alice");
    let put = api
        .call(
            "PUT",
            KEY,
            Some(&alice),
            Some(json!({"value": "old-value"})),
        )
        .await;
    assert_eq!(put.status, StatusCode::CREATED);
    for _ in 0..2 {
        assert_eq!(api.reveal_alices_key().await.json()["value"], "old-value");
    }
    let (operator, operator_vault) = api.operator().await;
    let operator_put = |value: &'static str| {
        operator_vault.put(strongroom_core::PutRequest {
            owner: "alice",
            name: "zoom.api-key",
            value: strongroom_crypto::SecretBytes::new(value.as_bytes().to_vec()),
            metadata: None,
            expected_version: None,
            created_by: "operator:import",
        })
    };
    operator_put("new-value").await.unwrap();

    let r = api.reveal_alices_key().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        (r.json()["value"].clone(), r.json()["version"].clone()),
        (json!("new-value"), json!(2))
    );
    let mine: Vec<_> = records_of_request(&api, &r)
        .await
        .iter()
        .map(|i| {
            (
                i["version"].clone(),
                i["status"].clone(),
                i["error_code"].clone(),
            )
        })
        .collect();
    // Newest first.
    assert_eq!(
        mine,
        [
            (json!(2), json!(200), serde_json::Value::Null),
            (json!(1), json!(503), json!("unavailable")),
            (json!(1), json!(200), serde_json::Value::Null),
        ]
    );

    // The owner's verify right after another write by the operator answers about it too.
    operator_put("newer-value").await.unwrap();
    let verify = api
        .call(
            "POST",
            &format!("{KEY}/verify"),
            Some(&alice),
            Some(json!({"value": "newer-value"})),
        )
        .await;
    assert_eq!(verify.status, StatusCode::OK, "{}", verify.body);
    assert_eq!(verify.json()["matches"], true);
    operator.close().await;
}

/// An operator command (another process on the same database file) disables a credential
/// the server answers reveals for from memory: the very next reveal does not release the
/// value, with the audit log on or off; a verify after the operator destroyed the value does
/// not answer from the remembered one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_by_another_process_stops_the_next_reveal() {
    const VALUE: &str = "sk_live_disabled_behind_the_cache";
    for auditing in [Auditing::On, Auditing::Off] {
        let api = api_audited(auditing).await;
        let alice = user_token("alice");
        let put = api
            .call("PUT", KEY, Some(&alice), Some(json!({"value": VALUE})))
            .await;
        assert_eq!(put.status, StatusCode::CREATED);
        let reveal = || api.reveal_alices_key();
        for _ in 0..2 {
            assert_eq!(reveal().await.json()["value"], VALUE);
        }
        let (operator, _) = api.operator().await;
        strongroom_store::Store::set_enabled(
            &*operator,
            "alice",
            "zoom.api-key",
            false,
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
        let first = reveal().await;
        assert!(
            first.status == StatusCode::SERVICE_UNAVAILABLE || first.status == StatusCode::CONFLICT,
            "{auditing:?}: {} {}",
            first.status,
            first.body
        );
        assert!(!first.body.contains(VALUE));
        if auditing == Auditing::On {
            // The request's last record says how it ended (read again once, the credential
            // was disabled: 409), not the overtaken attempt's 503.
            let records = records_of_request(&api, &first).await;
            assert_eq!(records[0]["status"], first.status.as_u16(), "{records:?}");
        }
        let then = reveal().await;
        assert_eq!(
            (then.status, code(&then).as_str()),
            (StatusCode::CONFLICT, "credential_disabled"),
            "{auditing:?}"
        );

        // The owner's verify answers about the current value, not a remembered one: after
        // the operator destroys it, the old value no longer "matches".
        strongroom_store::Store::set_enabled(
            &*operator,
            "alice",
            "zoom.api-key",
            true,
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
        let verify_path = format!("{KEY}/verify");
        let verify = || {
            api.call(
                "POST",
                &verify_path,
                Some(&alice),
                Some(json!({"value": VALUE})),
            )
        };
        assert_eq!(verify().await.json()["matches"], true);
        assert_eq!(verify().await.json()["matches"], true);
        strongroom_store::Store::destroy_version(
            &*operator,
            "alice",
            "zoom.api-key",
            1,
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
        let after = verify().await;
        assert_ne!(after.status, StatusCode::OK, "{auditing:?}: {}", after.body);
        operator.close().await;
    }
}

/// A put that would create one credential past the owner's quota is a 409 `quota_exceeded`
/// on the user's and the service's route alike, writes nothing and is audited as a failed
/// put; new versions, other owners and a freed slot are not refused.
#[tokio::test]
async fn the_credential_quota_refuses_new_credentials_only() {
    let api = api_with_vault(strongroom_core::VaultConfig {
        max_credentials_per_owner: Some(2),
        ..strongroom_core::VaultConfig::default()
    })
    .await;
    let alice = user_token("alice");
    let put = |path: String, token: String| {
        let api = &api;
        async move {
            api.call("PUT", &path, Some(&token), Some(json!({"value": "v"})))
                .await
        }
    };
    let mine = |name: &str| format!("/v1/me/credentials/{name}");
    for name in ["zoom.a", "zoom.b"] {
        let r = put(mine(name), alice.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let refused = put(mine("zoom.c"), alice.clone()).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert_eq!(code(&refused), "quota_exceeded");
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("quota") && message.contains('2'),
        "{message}"
    );
    // The service's route counts the same credentials.
    let by_service = put(
        "/v1/owners/alice/credentials/zoom.c".into(),
        ALLOWED_SERVICE_TOKEN.into(),
    )
    .await;
    assert_eq!(
        by_service.status,
        StatusCode::CONFLICT,
        "{}",
        by_service.body
    );
    assert_eq!(code(&by_service), "quota_exceeded");
    // Nothing was written.
    let gone = api.call("GET", &mine("zoom.c"), Some(&alice), None).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{}", gone.body);
    let list = api
        .call("GET", "/v1/me/credentials", Some(&alice), None)
        .await
        .json();
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    // New versions of existing credentials, and other owners, are not limited.
    let again = put(mine("zoom.a"), alice.clone()).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_eq!(again.json()["version"], 2);
    let bob = put(mine("zoom.c"), user_token("bob")).await;
    assert_eq!(bob.status, StatusCode::CREATED, "{}", bob.body);
    // Both refusals are in the audit log as failed puts, with their code.
    let records = api
        .call(
            "GET",
            "/v1/audit?owner=alice&name=zoom.c",
            Some(ADMIN_TOKEN),
            None,
        )
        .await
        .json();
    let seen: Vec<_> = records["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["principal_kind"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap(),
                r["error_code"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .filter(|r| r.0 == "put")
        .collect();
    let failed = |kind: &str| {
        (
            "put".to_owned(),
            kind.to_owned(),
            "error".to_owned(),
            409,
            "quota_exceeded".to_owned(),
        )
    };
    assert_eq!(seen, vec![failed("service"), failed("user")]);
    // Destroying a credential frees its slot.
    let r = api
        .call("DELETE", &mine("zoom.b"), Some(&alice), None)
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = put(mine("zoom.c"), alice.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    // And the document lists the refusal on both put routes.
    put_routes_document(&api, "409", "quota_exceeded").await;
}

/// A description pages its versions, newest first, from `versions_next_cursor`; bad limits
/// and cursors are a 400, and another owner gets the 404 of a missing credential.
#[tokio::test]
async fn a_description_pages_its_versions() {
    let api = api().await;
    let alice = user_token("alice");
    for i in 1..=102 {
        let r = api
            .call(
                "PUT",
                KEY,
                Some(&alice),
                Some(json!({"value": format!("v{i}")})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let get = |query: &str| {
        let (api, alice) = (&api, alice.clone());
        let uri = format!("{KEY}{query}");
        async move { api.call("GET", &uri, Some(&alice), None).await }
    };
    let numbers = |d: &serde_json::Value| -> Vec<u64> {
        d["versions"]
            .as_array()
            .unwrap_or_else(|| panic!("no versions in {d}"))
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect()
    };
    // By default 100, newest first, with the cursor of the rest.
    let d = get("").await.json();
    assert_eq!(numbers(&d), (3..=102).rev().collect::<Vec<_>>());
    assert_eq!(d["versions_next_cursor"], "3");
    assert_eq!(d["current_version"], 102);
    assert_eq!(d["state"], "enabled");
    let rest = get("?cursor=3").await.json();
    assert_eq!(numbers(&rest), [2]);
    assert_eq!(rest["versions_next_cursor"], serde_json::Value::Null);
    assert_eq!(rest["current_version"], 102);
    // Retention destroyed the old ones: the tombstones are listed, up to
    // `store.keep_destroyed_versions` (100) behind the newest; version 1, 101 behind, is gone.
    assert_eq!(rest["versions"][0]["state"], "destroyed");
    let destroy = |n: u32| {
        let (api, alice) = (&api, alice.clone());
        async move {
            api.call("DELETE", &format!("{KEY}/versions/{n}"), Some(&alice), None)
                .await
        }
    };
    let kept = destroy(2).await;
    assert!(kept.status.is_success(), "{}", kept.body);
    let gone = destroy(1).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{}", gone.body);
    // A smaller page; the pages follow each other without a gap or an overlap.
    let mut seen = Vec::new();
    let mut query = "?limit=7".to_owned();
    loop {
        let page = get(&query).await.json();
        let n = numbers(&page);
        assert!(n.len() <= 7);
        seen.extend(n);
        match page["versions_next_cursor"].as_str() {
            Some(c) => query = format!("?limit=7&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, (2..=102).rev().collect::<Vec<_>>());
    let most = get("?limit=1000").await.json();
    assert_eq!(numbers(&most).len(), 101);
    assert_eq!(most["versions_next_cursor"], serde_json::Value::Null);
    // Only canonical numbers, in range.
    for bad in [
        "?limit=0",
        "?limit=1001",
        "?limit=07",
        "?limit=-1",
        "?cursor=0",
        "?cursor=03",
        "?cursor=+3",
        "?cursor=3.0",
        "?cursor=abc",
        "?cursor=",
        "?cursor=2147483648",
        "?cursor=99999999999999999999",
        "?cursor=3&cursor=4",
        "?page=2",
    ] {
        let r = get(bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
        assert!(!code(&r).is_empty(), "{bad}: {}", r.body);
    }
    // The path's put and destroy still read no query.
    let r = api
        .call(
            "PUT",
            &format!("{KEY}?limit=2"),
            Some(&alice),
            Some(json!({"value": "x"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = api
        .call("DELETE", &format!("{KEY}?cursor=3"), Some(&alice), None)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(get("?limit=1").await.json()["current_version"], 102);
    // Another owner, with or without a cursor: not found, as for a missing credential.
    for query in ["", "?cursor=3", "?limit=1"] {
        let r = api
            .call(
                "GET",
                &format!("{KEY}{query}"),
                Some(&user_token("bob")),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{query}: {}", r.body);
    }
    // The document describes the parameters and the cursor.
    let doc = api.call("GET", "/v1/openapi.json", None, None).await.json();
    let params: Vec<&str> = doc["paths"]["/v1/me/credentials/{name}"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "query")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["cursor", "limit"]);
    assert!(
        doc["components"]["schemas"]["CredentialDetail"]["properties"]
            .get("versions_next_cursor")
            .is_some()
    );
}
