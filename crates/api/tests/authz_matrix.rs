//! Every route × every kind of caller: the status, and that no body but the allowed service's
//! reveal ever contains the value.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    UserSelf,
    UserOther,
    ServiceAllowed,
    ServiceDenied,
    Admin,
    Anonymous,
    Expired,
    Forged,
    AlgNone,
    WrongAudience,
}

const EVERYONE: [Who; 10] = [
    Who::UserSelf,
    Who::UserOther,
    Who::ServiceAllowed,
    Who::ServiceDenied,
    Who::Admin,
    Who::Anonymous,
    Who::Expired,
    Who::Forged,
    Who::AlgNone,
    Who::WrongAudience,
];

fn token(who: Who) -> Option<String> {
    let t = now();
    Some(match who {
        Who::UserSelf => user_token("alice"),
        Who::UserOther => user_token("bob"),
        Who::ServiceAllowed => ALLOWED_SERVICE_TOKEN.into(),
        Who::ServiceDenied => DENIED_SERVICE_TOKEN.into(),
        Who::Admin => ADMIN_TOKEN.into(),
        Who::Anonymous => return None,
        Who::Expired => jwt_with("alice", t - 3600, SECRET, ISSUER, AUDIENCE),
        Who::Forged => jwt_with(
            "alice",
            t + 600,
            b"another-secret-that-is-long-enough-32b",
            ISSUER,
            AUDIENCE,
        ),
        Who::AlgNone => {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
            let claims = b64.encode(
                json!({"sub": "alice", "exp": t + 600, "iss": ISSUER, "aud": AUDIENCE}).to_string(),
            );
            format!("{header}.{claims}.")
        }
        Who::WrongAudience => jwt_with("alice", t + 600, SECRET, ISSUER, "someone-else"),
    })
}

struct Route {
    method: &'static str,
    path: &'static str,
    body: Option<serde_json::Value>,
    /// Status for alice herself on user routes / the allowed service on service routes /
    /// the admin on admin routes.
    ok: u16,
    kind: Kind,
}

#[derive(PartialEq)]
enum Kind {
    User,
    Service,
    Admin,
}

fn routes(broker_url: &str) -> Vec<Route> {
    use Kind::*;
    let r = |method, path, body: Option<serde_json::Value>, ok, kind| Route {
        method,
        path,
        body,
        ok,
        kind,
    };
    vec![
        r(
            "PUT",
            "/v1/me/credentials/zoom.api-key",
            Some(json!({"value": "new-value"})),
            201,
            User,
        ),
        r("GET", "/v1/me/credentials", None, 200, User),
        r("GET", "/v1/me/credentials/zoom.api-key", None, 200, User),
        r(
            "POST",
            "/v1/me/credentials/zoom.api-key/current",
            Some(json!({"version": 1})),
            200,
            User,
        ),
        r(
            "POST",
            "/v1/me/credentials/zoom.api-key/disable",
            None,
            200,
            User,
        ),
        r(
            "POST",
            "/v1/me/credentials/zoom.api-key/enable",
            None,
            200,
            User,
        ),
        r(
            "POST",
            "/v1/me/credentials/zoom.api-key/verify",
            Some(json!({"value": CANARY})),
            200,
            User,
        ),
        r(
            "GET",
            "/v1/me/credentials/zoom.api-key/usage",
            None,
            200,
            User,
        ),
        r(
            "DELETE",
            "/v1/me/credentials/zoom.api-key/versions/1",
            None,
            204,
            User,
        ),
        r("DELETE", "/v1/me/credentials/zoom.api-key", None, 204, User),
        r(
            "PUT",
            "/v1/owners/alice/credentials/zoom.api-key",
            Some(json!({"value": "svc-value"})),
            201,
            Service,
        ),
        r(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            Some(json!({})),
            200,
            Service,
        ),
        r(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/broker",
            Some(json!({"method": "GET", "url": broker_url,
                        "inject": {"header": "Authorization", "format": "Bearer {value}"}})),
            200,
            Service,
        ),
        r("GET", "/v1/keys", None, 200, Admin),
        r("POST", "/v1/keys/rotate", None, 200, Admin),
        r("GET", "/v1/audit", None, 200, Admin),
    ]
}

fn expected(route: &Route, who: Who) -> u16 {
    use Who::*;
    match who {
        Anonymous | Expired | Forged | AlgNone | WrongAudience => 401,
        _ => match route.kind {
            Kind::User => match who {
                UserSelf => route.ok,
                // Bob's own namespace: alice's credential is invisible to him.
                UserOther => match (route.method, route.path) {
                    ("PUT", _) => 201,
                    ("GET", "/v1/me/credentials") => 200,
                    _ => 404,
                },
                _ => 403,
            },
            Kind::Service => match who {
                ServiceAllowed => route.ok,
                _ => 403,
            },
            Kind::Admin => match who {
                Admin => route.ok,
                _ => 403,
            },
        },
    }
}

#[tokio::test]
async fn every_route_for_every_caller() {
    let mut cases = 0;
    // A real HTTPS upstream that echoes what it receives (the injected header included).
    let up = common::upstream::start().await;
    for route in routes(&up.url("/echo")) {
        for who in EVERYONE {
            let api = api().await;
            api.seed().await;
            if route.path.ends_with("/broker") {
                api.state.set_broker(up.broker(up.settings()));
                // Version 2, the same value, bound to the upstream's host.
                let r = api
                    .call(
                        "PUT",
                        "/v1/me/credentials/zoom.api-key",
                        Some(&user_token("alice")),
                        Some(json!({"value": CANARY, "metadata": {"host": "localhost:*"}})),
                    )
                    .await;
                assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
            }
            let r = api
                .call(
                    route.method,
                    route.path,
                    token(who).as_deref(),
                    route.body.clone(),
                )
                .await;
            let want = expected(&route, who);
            assert_eq!(
                r.status.as_u16(),
                want,
                "{} {} as {who:?}: {}",
                route.method,
                route.path,
                r.body
            );
            // The broker's answer holds the upstream's echo of the injected header, redacted.
            let may_see_value = route.path.ends_with("/reveal") && who == Who::ServiceAllowed;
            if may_see_value {
                assert_eq!(r.json()["value"], CANARY);
            } else {
                assert!(
                    !r.body.contains(CANARY),
                    "{} {} as {who:?} leaked the value",
                    route.method,
                    route.path
                );
            }
            if !r.body.is_empty() && r.status != StatusCode::NO_CONTENT {
                let v = r.json();
                if !r.status.is_success() {
                    assert!(
                        v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                        "{}",
                        r.body
                    );
                }
            }
            if r.status == StatusCode::UNAUTHORIZED {
                assert_eq!(r.headers["www-authenticate"], "Bearer");
            }
            // Whatever happened, alice's value is intact unless she (or retention) changed it.
            if who != Who::UserSelf && who != Who::ServiceAllowed {
                let rev = api
                    .call(
                        "POST",
                        "/v1/owners/alice/credentials/zoom.api-key/reveal",
                        Some(ALLOWED_SERVICE_TOKEN),
                        None,
                    )
                    .await;
                assert_eq!(
                    rev.json()["value"],
                    CANARY,
                    "{} {} as {who:?} changed alice's value",
                    route.method,
                    route.path
                );
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 160);
}

#[tokio::test]
async fn another_owners_credential_gets_the_same_404_as_a_missing_one() {
    let api = api().await;
    api.seed().await;
    let bob = user_token("bob");
    let theirs = api
        .call("GET", "/v1/me/credentials/zoom.api-key", Some(&bob), None)
        .await;
    let missing = api
        .call("GET", "/v1/me/credentials/nothing-here", Some(&bob), None)
        .await;
    assert_eq!(
        (theirs.status, &theirs.body),
        (missing.status, &missing.body)
    );
    let list = api
        .call("GET", "/v1/me/credentials", Some(&bob), None)
        .await;
    assert_eq!(list.json()["items"], json!([]));
}

#[tokio::test]
async fn delegated_services_reach_only_the_user_they_act_for() {
    let api = api().await;
    api.seed().await;
    let reveal = |on_behalf: Option<String>| {
        let mut req = axum::http::Request::builder()
            .method("POST")
            .uri("/v1/owners/alice/credentials/zoom.api-key/reveal")
            .header("authorization", format!("Bearer {DELEGATED_SERVICE_TOKEN}"));
        if let Some(t) = on_behalf {
            req = req.header("x-strongroom-on-behalf-of", t);
        }
        req.body(axum::body::Body::empty()).unwrap()
    };
    assert_eq!(api.send(reveal(None)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(
        api.send(reveal(Some(user_token("bob")))).await.status,
        StatusCode::FORBIDDEN
    );
    // Which of the service's two credentials was refused is said (the service's own
    // token is good), as the same 401.
    let expired = api.send(reveal(token(Who::Expired))).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert!(
        expired.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the user token in x-strongroom-on-behalf-of was refused"),
        "{}",
        expired.body
    );
    let ok = api.send(reveal(Some(user_token("alice")))).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.json()["value"], CANARY);
}

/// With `on_behalf_of_audience` set, the user token a delegated service presents must carry
/// it, and such a token is refused on the user's own routes: a service holding one reaches
/// only what its rule allows (with the user's own token it could list, verify, overwrite
/// and destroy every credential of the user through /v1/me).
#[tokio::test]
async fn tokens_for_delegation_are_not_the_users_own() {
    use strongroom_api::{AuthSettings, Authenticator, JwtKeySource, JwtSettings, TokenEntry};
    const DELEGATION: &str = "strongroom-delegation";
    let api = api().await;
    api.seed().await;
    api.state.replace_auth(
        Authenticator::new(AuthSettings {
            jwt: Some(JwtSettings {
                issuer: Some(ISSUER.into()),
                audience: Some(AUDIENCE.into()),
                on_behalf_of_audience: Some(DELEGATION.into()),
                leeway_seconds: 5,
                keys: JwtKeySource::Hs256Secret(zeroize::Zeroizing::new(SECRET.to_vec())),
            }),
            service_tokens: vec![TokenEntry {
                name: "delegated".into(),
                sha256: strongroom_api::hash_token(DELEGATED_SERVICE_TOKEN),
            }],
            ..Default::default()
        })
        .unwrap(),
    );
    let reveal = |on_behalf: String| {
        axum::http::Request::builder()
            .method("POST")
            .uri("/v1/owners/alice/credentials/zoom.api-key/reveal")
            .header("authorization", format!("Bearer {DELEGATED_SERVICE_TOKEN}"))
            .header("x-strongroom-on-behalf-of", on_behalf)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let exp = now() + 600;
    let for_delegation = jwt_with("alice", exp, SECRET, ISSUER, DELEGATION);
    let ok = api.send(reveal(for_delegation.clone())).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    // The user's own token is not one for delegation.
    let own = user_token("alice");
    let r = api.send(reveal(own.clone())).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    // A token for delegation on the user's routes, alone or with both audiences.
    let both = {
        let claims =
            json!({"sub": "alice", "exp": exp, "iss": ISSUER, "aud": [AUDIENCE, DELEGATION]});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    };
    for token in [&for_delegation, &both] {
        for (method, path, body) in [
            ("GET", "/v1/me/credentials", None),
            (
                "PUT",
                "/v1/me/credentials/zoom.api-key",
                Some(json!({"value": "overwritten"})),
            ),
            (
                "POST",
                "/v1/me/credentials/zoom.api-key/verify",
                Some(json!({"value": CANARY})),
            ),
            ("DELETE", "/v1/me/credentials/zoom.api-key", None),
        ] {
            let r = api.call(method, path, Some(token), body).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path}: {}",
                r.body
            );
        }
    }
    let r = api
        .call("GET", "/v1/me/credentials", Some(&own), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let ok = api.send(reveal(for_delegation)).await;
    assert_eq!(ok.json()["value"], CANARY, "nothing was overwritten");
}

/// A service that needs no delegation may still say whom it acts for; it must then be the
/// owner, or the audit trail (and the owner's usage view) would name another user.
#[tokio::test]
async fn an_on_behalf_of_token_for_another_user_is_refused() {
    let api = api().await;
    api.seed().await;
    let call = |method: &str, path: &str, on_behalf: String, body: &str| {
        axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {ALLOWED_SERVICE_TOKEN}"))
            .header("content-type", "application/json")
            .header("x-strongroom-on-behalf-of", on_behalf)
            .body(axum::body::Body::from(body.to_owned()))
            .unwrap()
    };
    let reveal = "/v1/owners/alice/credentials/zoom.api-key/reveal";
    let put = "/v1/owners/alice/credentials/zoom.api-key";
    for (method, path, body) in [("POST", reveal, "{}"), ("PUT", put, r#"{"value":"v2"}"#)] {
        let r = api.send(call(method, path, user_token("bob"), body)).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {}",
            r.body
        );
        assert!(!r.body.contains(CANARY));
    }
    let r = api
        .send(call("POST", reveal, user_token("alice"), "{}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["value"], CANARY, "bob's refused put wrote nothing");
    let usage = api
        .call(
            "GET",
            "/v1/me/credentials/zoom.api-key/usage",
            Some(&user_token("alice")),
            None,
        )
        .await;
    assert!(
        !usage.body.contains("bob"),
        "alice's usage names bob: {}",
        usage.body
    );
}

/// Two Authorization (or On-Behalf-Of) headers are refused outright, whichever order they
/// come in: a proxy in front may read the other one.
#[tokio::test]
async fn a_repeated_credential_header_is_refused() {
    let api = api().await;
    api.seed().await;
    let (alice, bob) = (user_token("alice"), user_token("bob"));
    let (alice, bob) = (alice.as_str(), bob.as_str());
    let send = |method: &str, path: &str, auths: &[&str], on_behalf: &[&str]| {
        let mut req = axum::http::Request::builder().method(method).uri(path);
        for a in auths {
            req = req.header("authorization", format!("Bearer {a}"));
        }
        for t in on_behalf {
            req = req.header("x-strongroom-on-behalf-of", *t);
        }
        req.header("content-type", "application/json")
            .body(axum::body::Body::from("{}"))
            .unwrap()
    };
    let reveal = "/v1/owners/alice/credentials/zoom.api-key/reveal";
    let svc = ALLOWED_SERVICE_TOKEN;
    for (method, path, auths, on_behalf) in [
        (
            "GET",
            "/v1/me/credentials",
            [bob, alice].as_slice(),
            [].as_slice(),
        ),
        ("GET", "/v1/me/credentials", &[alice, alice], &[]),
        ("GET", "/v1/keys", &[ADMIN_TOKEN, svc], &[]),
        ("GET", "/v1/keys", &[svc, ADMIN_TOKEN], &[]),
        ("POST", reveal, &[svc, ADMIN_TOKEN], &[]),
        ("POST", reveal, &[svc, svc], &[]),
        ("POST", reveal, &[svc], &[alice, bob]),
        ("POST", reveal, &[svc], &[alice, alice]),
    ] {
        let r = api.send(send(method, path, auths, on_behalf)).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{method} {path}: {}",
            r.body
        );
        assert!(!r.body.contains(CANARY));
    }
    // One of each is served.
    let r = api.send(send("POST", reveal, &[svc], &[alice])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// Correctly signed tokens the JWT library would let through are refused: a header listing a
/// critical extension (RFC 7515 4.1.11: this server understands none), an `iss` array that
/// holds the right issuer among others, and time claims that are not numbers (a string
/// `nbf` in the far future counted as absent). The same token, well formed, is served.
#[tokio::test]
async fn tokens_the_jwt_library_would_misread_are_refused() {
    use base64::Engine;
    let api = api().await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let t = now();
    let signed_raw = |header: &str, claims: &str| {
        let message = format!("{}.{}", b64.encode(header), b64.encode(claims));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap();
        format!("{message}.{signature}")
    };
    let signed = |header: serde_json::Value, claims: serde_json::Value| {
        signed_raw(&header.to_string(), &claims.to_string())
    };
    let header = json!({"alg": "HS256", "typ": "JWT"});
    let claims = json!({"sub": "alice", "exp": t + 600, "iss": ISSUER, "aud": AUDIENCE});
    let with = |key: &str, value: serde_json::Value| {
        let mut c = claims.clone();
        c[key] = value;
        signed(header.clone(), c)
    };
    let refused = [
        signed(
            json!({"alg": "HS256", "typ": "JWT", "crit": ["exp-bound"], "exp-bound": 1}),
            claims.clone(),
        ),
        with("iss", json!(["https://evil.example", ISSUER])),
        with("iss", json!([ISSUER])),
        with("nbf", json!((t + 100_000).to_string())),
        with("exp", json!((t + 600).to_string())),
        with("iat", json!("yesterday")),
        // Issued in the future, beyond the leeway.
        with("iat", json!(t + 3600)),
        with("iat", json!(t as f64 + 3600.5)),
        // Out of the library's range, so it skipped the check: far in the future, or no time.
        with("nbf", json!(1e20)),
        with("nbf", json!(-1)),
        signed_raw(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &format!(
                r#"{{"sub":"alice","exp":{},"iss":"{ISSUER}","aud":"{AUDIENCE}","nbf":18446744073709551616}}"#,
                t + 600
            ),
        ),
        // `crit` twice: the library reads neither.
        signed_raw(
            r#"{"alg":"HS256","typ":"JWT","crit":["x"],"crit":["x"]}"#,
            &claims.to_string(),
        ),
    ];
    for token in &refused {
        let r = api
            .call("GET", "/v1/me/credentials", Some(token), None)
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{token}: {}", r.body);
    }
    for fine in [
        with("nbf", json!(t - 10)),
        with("nbf", json!(t as f64 - 10.5)),
        with("iat", json!(t)),
        // Within the leeway (5 s here).
        with("iat", json!(t + 2)),
    ] {
        let r = api
            .call("GET", "/v1/me/credentials", Some(&fine), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
}
