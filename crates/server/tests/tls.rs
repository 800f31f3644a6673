//! Real sockets, real TLS: an in-process server on 127.0.0.1:0 and a rustls (ring) client.

mod common;

use std::time::Duration;

use common::{spawn, Fixture, ADMIN_TOKEN, SERVICE_TOKEN};
use serde_json::json;
use strongroom_server::testing::{plain_http_exchange, ClientOptions, TestClient};

#[tokio::test]
async fn http1_and_http2_are_both_served() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;

    let h1 = server.client(fx.client_options().http1());
    assert_eq!(
        h1.handshake().await.unwrap().1.as_deref(),
        Some(&b"http/1.1"[..])
    );
    let r = h1.get("/healthz", None).await.unwrap();
    assert_eq!((r.status, r.version), (200, http::Version::HTTP_11));

    let h2 = server.client(fx.client_options().http2());
    assert_eq!(h2.handshake().await.unwrap().1.as_deref(), Some(&b"h2"[..]));
    let r = h2.get("/healthz", None).await.unwrap();
    assert_eq!((r.status, r.version), (200, http::Version::HTTP_2));

    // Both ALPN offers: the server prefers h2.
    let both = server.client(fx.client_options());
    assert_eq!(
        both.handshake().await.unwrap().1.as_deref(),
        Some(&b"h2"[..])
    );

    // A whole user round trip over HTTP/2 and then HTTP/1.1.
    let alice = fx.user_token("alice");
    let r = h2
        .json(
            "PUT",
            "/v1/me/credentials/zoom.api-key",
            Some(&alice),
            &json!({"value": "canary-h2"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = h1.get("/v1/me/credentials", Some(&alice)).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("zoom.api-key") && !r.text().contains("canary-h2"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn tls12_only_and_tls13_only_clients_connect() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        for options in [fx.client_options().http1(), fx.client_options().http2()] {
            let client = server.client(options.only(version));
            assert_eq!(client.handshake().await.unwrap().0, want);
            let r = client.get("/healthz", None).await.unwrap();
            assert_eq!(r.status, 200, "{want:?}");
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn plain_http_gets_no_http_response() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let reply = plain_http_exchange(server.addr, Duration::from_secs(3)).await;
    assert!(
        !reply.windows(5).any(|w| w == b"HTTP/"),
        "plain HTTP was answered with HTTP: {:?}",
        String::from_utf8_lossy(&reply)
    );
    // Whatever came back is at most a TLS alert record (content type 21).
    assert!(reply.is_empty() || reply[0] == 21, "{reply:?}");
    // And the server still serves TLS afterwards.
    let r = server
        .client(fx.client_options())
        .get("/healthz", None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_server_fails_the_handshake() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let other = common::Pki::new("someone else");
    let client = server.client(ClientOptions::new(other.ca_pem.clone()));
    assert!(client.get("/healthz", None).await.is_err());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn mtls_required_maps_the_certificate_san_to_a_service_and_refuses_others() {
    let logs = common::LogCapture::default();
    let _guard = logs.install();
    let fx = Fixture::new();
    let server = spawn(fx.mtls_config("required")).await;
    let (billing_cert, billing_key) = fx
        .client_pki
        .leaf(&["spiffe://example.test/billing"], false);
    let billing = server.client(
        fx.client_options()
            .with_client_cert(billing_cert.clone(), billing_key.clone()),
    );

    // The certificate alone authenticates the service "billing", which the policy lets write
    // and reveal zoom.* credentials of any owner.
    let r = billing
        .json(
            "PUT",
            "/v1/owners/alice/credentials/zoom.api-key",
            None,
            &json!({"value": "canary-mtls"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = billing
        .json(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            None,
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["value"], "canary-mtls");
    // Outside its policy: 403.
    let r = billing
        .json(
            "PUT",
            "/v1/owners/alice/credentials/slack.token",
            None,
            &json!({"value": "x"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());

    // Over HTTP/2 too.
    let billing_h2 = server.client(
        fx.client_options()
            .http2()
            .with_client_cert(billing_cert, billing_key),
    );
    let r = billing_h2
        .json(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            None,
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.version), (200, http::Version::HTTP_2));

    // A valid certificate whose SAN is not mapped authenticates nobody.
    let (c, k) = fx
        .client_pki
        .leaf(&["spiffe://example.test/stranger"], false);
    let stranger = server.client(fx.client_options().with_client_cert(c, k));
    let r = stranger
        .json(
            "POST",
            "/v1/owners/alice/credentials/zoom.api-key/reveal",
            None,
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(!r.text().contains("canary-mtls"));

    // No certificate, or one from an unknown CA: refused during the handshake, for every
    // TLS version (with TLS 1.3 the refusal arrives on the first read).
    let rogue = common::Pki::new("rogue CA");
    let (rc, rk) = rogue.leaf(&["spiffe://example.test/billing"], false);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let none = server.client(fx.client_options().only(version));
        assert!(
            none.get("/healthz", None).await.is_err(),
            "no client certificate accepted"
        );
        let bad = server.client(
            fx.client_options()
                .only(version)
                .with_client_cert(rc.clone(), rk.clone()),
        );
        let err = bad.get("/healthz", None).await.unwrap_err();
        assert!(!err.is_empty());
    }
    server.stop().await.unwrap();
    // Refused client certificates are the operator's business: logged as warnings.
    let text = logs.text();
    assert!(
        text.contains("WARN") && text.contains("client certificate refused"),
        "{text}"
    );
}

#[tokio::test]
async fn mtls_optional_lets_token_clients_in_and_maps_admin_certificates() {
    let fx = Fixture::new();
    let server = spawn(fx.mtls_config("optional")).await;
    let plain = server.client(fx.client_options());
    assert_eq!(plain.get("/healthz", None).await.unwrap().status, 200);
    let r = plain
        .json(
            "PUT",
            "/v1/owners/bob/credentials/zoom.key",
            Some(SERVICE_TOKEN),
            &json!({"value": "v"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());

    // The admin certificate reaches the admin routes; no certificate and no token does not.
    let (c, k) = fx.client_pki.leaf(&["ops.example.test"], false);
    let ops = server.client(fx.client_options().with_client_cert(c, k));
    assert_eq!(ops.get("/v1/keys", None).await.unwrap().status, 200);
    assert_eq!(plain.get("/v1/keys", None).await.unwrap().status, 401);
    // A certificate from an unknown CA is still refused at the handshake.
    let rogue = common::Pki::new("rogue CA");
    let (rc, rk) = rogue.leaf(&["ops.example.test"], false);
    let bad = server.client(fx.client_options().with_client_cert(rc, rk));
    assert!(bad.get("/healthz", None).await.is_err());
    server.stop().await.unwrap();
}

/// Over real TLS, on both protocols: a head over `limits.max_header_bytes` (16 KiB by
/// default) gets the router's JSON 431; one over twice that is refused by the HTTP layer
/// on its own (no JSON there, but never served); a smaller one is served.
#[tokio::test]
async fn oversized_heads_get_the_json_431_on_http1_and_http2() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    for (protocol, options) in [
        ("HTTP/1.1", fx.client_options().http1()),
        ("HTTP/2", fx.client_options().http2()),
    ] {
        let client = server.client(options);
        let over = "a".repeat(20 * 1024);
        let r = client
            .request("GET", "/healthz", &[("x-big", over.as_str())], None)
            .await
            .unwrap_or_else(|e| panic!("{protocol}: expected a 431, got {e}"));
        assert_eq!(r.status, 431, "{protocol}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "headers_too_large", "{protocol}");
        assert!(!r.text().contains("aaaa"), "{protocol}: {}", r.text());

        // Past the HTTP layer's backstop: refused there, with a bare 431 or (HTTP/2) a
        // reset stream, never served.
        let far_over = "a".repeat(40 * 1024);
        if let Ok(r) = client
            .request("GET", "/healthz", &[("x-big", far_over.as_str())], None)
            .await
        {
            assert_eq!(r.status, 431, "{protocol}: {}", r.text());
        }

        let small = "a".repeat(4 * 1024);
        let r = client
            .request("GET", "/healthz", &[("x-small", small.as_str())], None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{protocol}");

        // Over 100 header fields, however small: HTTP/1.1's parser refuses them itself,
        // HTTP/2 (which bounds only their size) gets the router's JSON 431.
        let names: Vec<String> = (0..120).map(|i| format!("x-h{i}")).collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let r = client
            .request("GET", "/healthz", &many, None)
            .await
            .unwrap_or_else(|e| panic!("{protocol}: expected a 431, got {e}"));
        assert_eq!(r.status, 431, "{protocol}: {}", r.text());
        if protocol == "HTTP/2" {
            assert_eq!(r.json()["error"]["code"], "headers_too_large");
        }
        let r = client
            .request("GET", "/healthz", &many[..90], None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{protocol}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn max_connections_holds_further_clients_until_a_slot_frees() {
    let fx = Fixture::new();
    let mut config = fx.config_from(
        &fx.toml("", "")
            .replace("[limits]", "[limits]\nmax_connections = 1"),
    );
    config.limits.handshake_timeout_seconds = 30;
    let server = spawn(config).await;

    // Hold the only slot with an idle TCP connection (mid-handshake).
    let held = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client: TestClient = server.client(fx.client_options());
    let waiting = tokio::spawn(async move { client.get("/healthz", None).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "a second connection was served past max_connections = 1"
    );
    drop(held);
    let r = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client was never served")
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_that_sends_nothing_after_the_handshake_is_closed() {
    use tokio::io::AsyncReadExt;
    let fx = Fixture::new();
    let mut config = fx.config_from(
        &fx.toml("", "")
            .replace("[limits]", "[limits]\nmax_connections = 2"),
    );
    config.limits.handshake_timeout_seconds = 1;
    let server = spawn(config).await;
    // Both slots held by clients that finish the handshake (one per protocol) and go
    // silent: each must be closed, or nobody else is ever served.
    for options in [fx.client_options().http1(), fx.client_options().http2()] {
        let mut idle = server.client(options).connect_raw().await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("the server kept a silent connection open past its handshake timeout");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the server sent something to a client that asked nothing: {read:?}"
        );
    }
    // Both slots filled by silent connections again: once the timeout has passed, a third
    // client is served.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            server
                .client(fx.client_options())
                .connect_raw()
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let client = server.client(fx.client_options());
    let r = tokio::time::timeout(Duration::from_secs(5), client.get("/healthz", None))
        .await
        .expect("silent connections kept every slot")
        .unwrap();
    assert_eq!(r.status, 200);
    drop(held);
    server.stop().await.unwrap();
}

/// A client that sends a byte that could begin either protocol (`P`), or the HTTP/2 preface
/// and its SETTINGS, and then no request, is closed at the handshake timeout like a silent
/// one; a connection idle after its requests is closed too.
#[tokio::test]
async fn a_connection_that_never_makes_a_request_or_stops_making_them_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::new();
    let mut config = fx.config_from(&fx.toml("", ""));
    config.limits.handshake_timeout_seconds = 1;
    config.limits.idle_timeout_seconds = 2;
    let server = spawn(config).await;
    let closed_within = |mut stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
                         secs: u64| async move {
        let mut buf = [0u8; 256];
        tokio::time::timeout(Duration::from_secs(secs), async {
            // Whatever the server sends (HTTP/2 SETTINGS) until it closes.
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await
        .is_ok()
    };
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    for (options, first) in [
        (fx.client_options().http1(), &b"P"[..]),
        (fx.client_options().http2(), preface),
    ] {
        let mut stream = server.client(options).connect_raw().await.unwrap();
        stream.write_all(first).await.unwrap();
        stream.flush().await.unwrap();
        assert!(
            closed_within(stream, 15).await,
            "a connection that began no request stayed open past the handshake timeout"
        );
    }
    // One request, then silence: open for the idle timeout, closed after it.
    let mut stream = server
        .client(fx.client_options().http1())
        .connect_raw()
        .await
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    assert!(
        closed_within(stream, 20).await,
        "an idle connection was never closed"
    );
    server.stop().await.unwrap();
}

/// An HTTP/1 keep-alive connection stays usable between requests for the idle timeout (not
/// just the handshake timeout), while a head begun and not finished is closed at the
/// handshake timeout, counted from its first byte.
#[tokio::test]
async fn keep_alive_lasts_the_idle_timeout_and_a_slow_head_does_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::new();
    let mut config = fx.config_from(&fx.toml("", ""));
    config.limits.handshake_timeout_seconds = 1;
    // Far above the 1 s the slow head gets: the bound below tells the two apart with room
    // for a slow machine.
    config.limits.idle_timeout_seconds = 20;
    let server = spawn(config).await;
    let mut stream = server
        .client(fx.client_options().http1())
        .connect_raw()
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    for pause in [0, 2500] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "after {pause} ms idle: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    // The next head trickles in a byte at a time: closed about a second after its first
    // byte, well before the idle timeout.
    let started = std::time::Instant::now();
    let trickle = async {
        for b in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" {
            if stream.write_all(&[*b]).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Then wait for the close.
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::time::timeout(Duration::from_secs(30), trickle)
        .await
        .expect("a trickled head held the connection");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed only after {:?}",
        started.elapsed()
    );
    server.stop().await.unwrap();
}

/// A service put presenting the client certificate `cert` (and the bearer `token`): its
/// status, 0 when the handshake refused the certificate.
async fn put_with_cert(
    server: &common::Running,
    fx: &Fixture,
    cert: (String, String),
    token: Option<&str>,
) -> u16 {
    server
        .client(fx.client_options().with_client_cert(cert.0, cert.1))
        .json(
            "PUT",
            "/v1/owners/alice/credentials/zoom.api-key",
            token,
            &json!({"value": "v"}),
        )
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

/// One credential per request: a mapped client certificate plus a bearer token, or a
/// certificate whose names map to two identities, of any kinds, authenticate nobody (401);
/// and a mapping matches the kind of SAN it names (DNS name or URI) only.
#[tokio::test]
async fn a_certificate_with_a_token_or_two_identities_is_refused() {
    let fx = Fixture::new();
    let tls_extra = format!(
        "client_ca = {:?}\nclient_auth = \"optional\"",
        fx.client_ca.display().to_string()
    );
    let extra = "[[auth.mtls]]\nsan = \"spiffe://example.test/billing\"\nservice = \"billing\"\n\
                 [[auth.mtls]]\nsan = \"spiffe://example.test/reports\"\nservice = \"reports\"\n\
                 [[auth.mtls]]\nsan = \"ops.example.test\"\nadmin = \"ops-cert\"\n";
    let server = spawn(fx.config_from(&fx.toml(&tls_extra, extra))).await;
    let billing = fx
        .client_pki
        .leaf(&["spiffe://example.test/billing"], false);
    assert_eq!(
        put_with_cert(&server, &fx, billing.clone(), None).await,
        201
    );
    assert_eq!(
        put_with_cert(&server, &fx, billing, Some(SERVICE_TOKEN)).await,
        401
    );
    let both = fx.client_pki.leaf(
        &[
            "spiffe://example.test/billing",
            "spiffe://example.test/reports",
        ],
        false,
    );
    assert_eq!(put_with_cert(&server, &fx, both, None).await, 401);

    // Whatever the kinds: a service's and an admin's name in one certificate, a service
    // certificate with an admin's or a user's token, an admin certificate with a service
    // token.
    let get_with_cert = |cert: (String, String), path: &'static str, token: Option<String>| {
        let client = server.client(fx.client_options().with_client_cert(cert.0, cert.1));
        async move {
            client
                .get(path, token.as_deref())
                .await
                .map(|r| r.status)
                .unwrap_or(0)
        }
    };
    let service_and_admin = fx.client_pki.leaf(
        &["spiffe://example.test/billing", "ops.example.test"],
        false,
    );
    assert_eq!(
        put_with_cert(&server, &fx, service_and_admin.clone(), None).await,
        401
    );
    assert_eq!(
        get_with_cert(service_and_admin, "/v1/keys", None).await,
        401
    );
    let billing = fx
        .client_pki
        .leaf(&["spiffe://example.test/billing"], false);
    let ops = fx.client_pki.leaf(&["ops.example.test"], false);
    assert_eq!(get_with_cert(ops.clone(), "/v1/keys", None).await, 200);
    assert_eq!(
        get_with_cert(billing.clone(), "/v1/keys", Some(ADMIN_TOKEN.into())).await,
        401
    );
    assert_eq!(
        get_with_cert(
            billing.clone(),
            "/v1/me/credentials",
            Some(fx.user_token("alice"))
        )
        .await,
        401
    );
    assert_eq!(
        put_with_cert(&server, &fx, ops, Some(SERVICE_TOKEN)).await,
        401
    );

    // A mapping names one kind of SAN: the service's URI written as a DNS name, or the
    // admin's DNS name written as a URI, is nobody.
    let as_kind = |san: rcgen::SanType| {
        fx.client_pki.leaf_with(&["x.example.test"], false, |p| {
            p.subject_alt_names = vec![san]
        })
    };
    let uri_as_dns = as_kind(rcgen::SanType::DnsName(
        "spiffe://example.test/billing".try_into().unwrap(),
    ));
    assert_eq!(put_with_cert(&server, &fx, uri_as_dns, None).await, 401);
    let dns_as_uri = as_kind(rcgen::SanType::URI("ops.example.test".try_into().unwrap()));
    assert_eq!(get_with_cert(dns_as_uri, "/v1/keys", None).await, 401);
    // DNS names match whatever their case, with or without the root's dot (RFC 4343).
    let spelled_otherwise = fx.client_pki.leaf(&["OPS.Example.Test."], false);
    assert_eq!(
        get_with_cert(spelled_otherwise, "/v1/keys", None).await,
        200
    );
    // The token alone still works.
    let r = server
        .client(fx.client_options())
        .json(
            "PUT",
            "/v1/owners/alice/credentials/zoom.api-key",
            Some(SERVICE_TOKEN),
            &json!({"value": "v"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    server.stop().await.unwrap();
}

/// SIGHUP takes a new client CA (and `client_auth`) for new connections: an operator who
/// replaces a compromised client CA is not left trusting it until a restart.
#[tokio::test]
async fn a_reload_swaps_the_client_ca() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("strongroom.toml");
    let extra = "[[auth.mtls]]\nsan = \"spiffe://example.test/billing\"\nservice = \"billing\"\n";
    let write = |ca: &std::path::Path| {
        let tls_extra = format!(
            "client_ca = {:?}\nclient_auth = \"required\"",
            ca.display().to_string()
        );
        std::fs::write(&path, fx.toml(&tls_extra, extra)).unwrap();
    };
    write(&fx.client_ca);
    let server = spawn(
        strongroom_server::config::Config::load(
            Some(&path),
            &strongroom_server::config::Overrides::default(),
        )
        .unwrap(),
    )
    .await;
    server.reloader.set_config_file(
        Some(path.clone()),
        strongroom_server::config::Overrides::default(),
    );
    let old_cert = fx
        .client_pki
        .leaf(&["spiffe://example.test/billing"], false);
    let new_pki = common::Pki::new("replacement client CA");
    let new_cert = new_pki.leaf(&["spiffe://example.test/billing"], false);
    assert_eq!(
        put_with_cert(&server, &fx, old_cert.clone(), None).await,
        201
    );
    assert_eq!(
        put_with_cert(&server, &fx, new_cert.clone(), None).await,
        0,
        "refused at the handshake"
    );

    // A connection kept alive from before, with the old certificate.
    let kept = server
        .client(
            fx.client_options()
                .http1()
                .with_client_cert(old_cert.0.clone(), old_cert.1.clone()),
        )
        .connect_raw()
        .await
        .unwrap();
    let (mut kept, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(kept))
            .await
            .unwrap();
    let kept_conn = tokio::spawn(conn);
    let healthz = || {
        http::Request::builder()
            .uri("/healthz")
            .header("host", "localhost")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    assert_eq!(kept.send_request(healthz()).await.unwrap().status(), 200);
    // A reload that changes nothing keeps it.
    server.reloader.reload().unwrap();
    assert_eq!(kept.send_request(healthz()).await.unwrap().status(), 200);

    // An HTTP/2 connection, and a TCP connection accepted but not yet handshaken, both from
    // before the change.
    let h2 = server
        .client(
            fx.client_options()
                .with_client_cert(old_cert.0.clone(), old_cert.1.clone()),
        )
        .connect_raw()
        .await
        .unwrap();
    let (mut h2, h2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(h2),
    )
    .await
    .unwrap();
    tokio::spawn(h2_conn);
    let put = || {
        http::Request::builder()
            .method("PUT")
            .uri(format!(
                "https://localhost:{}/v1/owners/alice/credentials/zoom.api-key",
                server.addr.port()
            ))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"value":"v"}"#,
            )))
            .unwrap()
    };
    assert_eq!(h2.send_request(put()).await.unwrap().status(), 201);
    let early = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // accepted

    let new_ca = fx.dir.path().join("new-client-ca.pem");
    std::fs::write(&new_ca, &new_pki.ca_pem).unwrap();
    write(&new_ca);
    server.reloader.reload().unwrap();
    // No request after the reload is served under the replaced CA's certificate: not on a
    // stream of the HTTP/2 connection (an HTTP/2 client may keep it open), not on a
    // connection whose handshake ran against the old CA while the reload happened.
    let status = h2.send_request(put()).await.map(|r| r.status().as_u16());
    assert!(!matches!(status, Ok(201)), "{status:?}");
    let old_client = server.client(
        fx.client_options()
            .http1()
            .with_client_cert(old_cert.0.clone(), old_cert.1.clone()),
    );
    if let Ok(tls) = old_client.handshake_over(early).await {
        let status = async {
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = http::Request::builder()
                .method("PUT")
                .uri("/v1/owners/alice/credentials/zoom.api-key")
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"value":"v"}"#,
                )))
                .unwrap();
            send.send_request(req)
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        }
        .await;
        assert!(!matches!(status, Ok(201)), "{status:?}");
    }
    // Its certificate was accepted under the replaced CA: the server closes it.
    tokio::time::timeout(Duration::from_secs(5), kept_conn)
        .await
        .expect("the connection of the replaced CA's certificate is still open")
        .unwrap()
        .unwrap();
    assert!(kept.send_request(healthz()).await.is_err());
    assert_eq!(put_with_cert(&server, &fx, new_cert, None).await, 201);
    assert_eq!(
        put_with_cert(&server, &fx, old_cert, None).await,
        0,
        "the replaced CA is still trusted"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_accepting_and_run_returns_ok() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let addr = server.addr;
    let client = server.client(fx.client_options());
    assert_eq!(client.get("/healthz", None).await.unwrap().status, 200);
    server.stop().await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

/// Connections that never begin their TLS handshake do not hold the shutdown for their
/// handshake timeout.
#[tokio::test]
async fn shutdown_does_not_wait_for_connections_still_in_their_handshake() {
    let fx = Fixture::new();
    let mut config = fx.config();
    config.limits.handshake_timeout_seconds = 30;
    // Nor for the grace a shutdown gives requests (5 s in the fixture, too close to the
    // bound below on a slow machine).
    config.limits.shutdown_grace_seconds = 30;
    let server = spawn(config).await;
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(25), server.stop())
        .await
        .expect("the shutdown waited for handshakes that never came")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

/// Writes the head of a PUT and half its body on a raw HTTP/1.1 connection.
async fn half_sent_put(
    client: &TestClient,
    token: &str,
    body: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut s = client.connect_raw().await.unwrap();
    let head = format!(
        "PUT /v1/me/credentials/zoom.slow HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..body.len() / 2]).await.unwrap();
    s.flush().await.unwrap();
    s
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::new();
    let mut server = spawn(fx.config()).await;
    let client = server.client(fx.client_options().http1());
    let alice = fx.user_token("alice");
    let body = br#"{"value": "finished-after-sigterm"}"#;
    let mut s = half_sent_put(&client, &alice, body).await;
    // For the server to read the head (nothing shows when it has: a connection whose head
    // is still unread at the signal is idle, and closed).
    tokio::time::sleep(Duration::from_secs(1)).await;

    server.signal_stop();
    let addr = server.addr;
    common::eventually(
        "no longer accepting after the shutdown signal",
        || async move {
            tokio::net::TcpStream::connect(addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    assert!(
        !server.is_finished(),
        "stopped while a request was in flight"
    );

    s.write_all(&body[body.len() / 2..]).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_gives_up_on_a_stalled_request_after_the_grace_period() {
    let fx = Fixture::new();
    let mut config = fx.config();
    config.limits.shutdown_grace_seconds = 1;
    config.limits.request_timeout_seconds = 60;
    let mut server = spawn(config).await;
    let client = server.client(fx.client_options().http1());
    let _stalled = half_sent_put(
        &client,
        &fx.user_token("alice"),
        br#"{"value": "never-finished"}"#,
    )
    .await;
    // For the server to read the head (see above).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = std::time::Instant::now();
    server.signal_stop();
    server.stop().await.unwrap();
    let took = started.elapsed();
    // The grace (1 s), not the request timeout (60 s).
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(30),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_body_declared_over_the_limit_gets_413_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options().http1());
    let alice = fx.user_token("alice");
    let mut s = client.connect_raw().await.unwrap();
    // 100 MB declared, 20 bytes sent: nothing more will come.
    let head = format!(
        "PUT /v1/me/credentials/zoom.huge HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{{\"value\": \"aaaaa"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut reply))
        .await
        .expect("no answer within 10 s: the server waited for the declared body")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("\"payload_too_large\""), "{reply}");

    // Nothing was written.
    let r = server
        .client(fx.client_options())
        .request(
            "GET",
            "/v1/me/credentials/zoom.huge",
            &[("authorization", &format!("Bearer {alice}"))],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    server.stop().await.unwrap();
}

/// A raw HTTP/2 client connection (the `h2` crate: it shows stream resets).
async fn raw_h2(server: &common::Running, fx: &Fixture) -> h2::client::SendRequest<bytes::Bytes> {
    let tls = server
        .client(fx.client_options().http2())
        .connect_raw()
        .await
        .unwrap();
    let (h2, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    h2
}

/// The stream of `body` ended without the server resetting it.
async fn assert_no_reset(body: &mut h2::SendStream<bytes::Bytes>, what: &str) {
    let reset = tokio::time::timeout(
        Duration::from_millis(300),
        std::future::poll_fn(|cx| body.poll_reset(cx)),
    )
    .await;
    assert!(reset.is_err(), "{what}: stream reset: {reset:?}");
}

/// An HTTP/2 answer decided from the head alone (a 404, a 401) waits for the body the client
/// is still sending, so the stream ends cleanly: after a `RST_STREAM(NO_ERROR)` some clients
/// (curl 7.88) drop the answer.
#[tokio::test]
async fn an_http2_answer_given_before_the_body_is_read_ends_without_a_reset() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let mut h2 = raw_h2(&server, &fx).await;
    for (method, path, auth, want) in [
        ("POST", "/nope", None, 404),
        (
            "PUT",
            "/v1/me/credentials/zoom.key",
            Some("Bearer wrong"),
            401,
        ),
    ] {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .header("content-type", "application/json");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let (response, mut body) = h2.send_request(request.body(()).unwrap(), false).unwrap();
        // The body follows the head a little later, as it does on a real network.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = body.send_data(bytes::Bytes::from_static(br#"{"value": "v"}"#), true);
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("no answer")
            .unwrap();
        assert_eq!(response.status(), want, "{method} {path}");
        assert_no_reset(&mut body, &format!("{method} {path}")).await;
    }
    server.stop().await.unwrap();
}

/// A body a little over the limit still gets its 413 whole over HTTP/2.
#[tokio::test]
async fn an_http2_body_over_the_limit_gets_its_413_without_a_reset() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let mut h2 = raw_h2(&server, &fx).await;
    let alice = fx.user_token("alice");
    let big = vec![b'a'; 2_000_000]; // limits.max_body_bytes defaults to 512 KiB
    let request = http::Request::builder()
        .method("PUT")
        .uri("https://localhost/v1/me/credentials/zoom.big")
        .header("content-type", "application/json")
        .header("content-length", big.len())
        .header("authorization", format!("Bearer {alice}"))
        .body(())
        .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    let sender = tokio::spawn(async move {
        for chunk in big.chunks(16 * 1024) {
            body.reserve_capacity(chunk.len());
            while body.capacity() < chunk.len() {
                match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    _ => return body,
                }
            }
            if body
                .send_data(bytes::Bytes::copy_from_slice(chunk), false)
                .is_err()
            {
                return body;
            }
        }
        let _ = body.send_data(bytes::Bytes::new(), true);
        body
    });
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(response.status(), 413);
    let mut body = sender.await.unwrap();
    assert_no_reset(&mut body, "PUT 2 MB").await;
    server.stop().await.unwrap();
}

/// Over HTTP/1.1 too, an answer decided before a large body is read (here a 404) waits for
/// the body: the client gets to send all of it and then reads the answer, where the
/// connection used to be closed under it ("broken pipe" in curl).
#[tokio::test]
async fn an_http1_answer_before_a_large_body_is_read_lets_the_client_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let client = server.client(fx.client_options().http1());
    let mut s = client.connect_raw().await.unwrap();
    let body = vec![b'a'; 64 * 1024];
    let head = format!(
        "POST /nope HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for chunk in body.chunks(4096) {
        s.write_all(chunk)
            .await
            .expect("the server closed the connection while the body was being sent");
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut reply))
        .await
        .expect("no answer")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    server.stop().await.unwrap();
}

/// A client that asks `Expect: 100-continue` and is refused from the head is not invited to
/// upload (no `100 Continue`), and gets its answer at once.
#[tokio::test]
async fn a_refused_expect_continue_request_is_not_invited_to_send_its_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let mut s = server
        .client(fx.client_options().http1())
        .connect_raw()
        .await
        .unwrap();
    s.write_all(
        b"PUT /v1/me/credentials/zoom.x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer nope\r\n\
          Content-Type: application/json\r\nContent-Length: 40000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    s.flush().await.unwrap();
    let started = std::time::Instant::now();
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut reply))
        .await
        .expect("no answer")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    // Not after waiting for the body as for other answers given before it is read (the
    // server's UNREAD_BODY_WAIT, a second at least): anything below that, on a slow machine.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    server.stop().await.unwrap();
}

/// An HTTP/2 request the client resets while its handler waits (here for the body) is
/// still recorded, under the caller its credentials name, as 499 `client_closed`: whether the
/// server drops it mid-way or its body read fails, the client went away; it sent nothing
/// malformed.
#[tokio::test]
async fn an_http2_request_reset_by_the_client_is_recorded() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let mut h2 = raw_h2(&server, &fx).await;
    let request = http::Request::builder()
        .method("POST")
        .uri("https://localhost/v1/owners/alice/credentials/zoom.reset/reveal")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", common::SERVICE_TOKEN))
        .body(())
        .unwrap();
    let (_response, mut body) = h2.send_request(request, false).unwrap();
    // For the server to take the request (nothing shows when it has).
    tokio::time::sleep(Duration::from_secs(1)).await;
    body.send_reset(h2::Reason::CANCEL);
    let client = server.client(fx.client_options());
    let records = common::wait_for_records(&client, "zoom.reset", 1).await;
    let record = records.first().expect("the reset request left no record");
    assert_eq!(record["status"], 499, "{record}");
    assert_eq!(record["error_code"], "client_closed", "{record}");
    assert_eq!(record["principal_id"], "billing", "{record}");
    server.stop().await.unwrap();
}

/// An HTTP/2 client that closes its whole connection (no stream reset) before the body it
/// announced has come is recorded as 499 `client_closed` too.
#[tokio::test]
async fn an_http2_body_cut_short_by_closing_the_connection_is_recorded_as_client_closed() {
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let tls = server
        .client(fx.client_options().http2())
        .connect_raw()
        .await
        .unwrap();
    let (mut h2, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .method("PUT")
        .uri("https://localhost/v1/me/credentials/zoom.h2cut")
        .header("content-type", "application/json")
        .header("content-length", "100")
        .header(
            "authorization",
            format!("Bearer {}", fx.user_token("alice")),
        )
        .body(())
        .unwrap();
    let (_response, mut body) = h2.send_request(request, false).unwrap();
    body.send_data(bytes::Bytes::from_static(b"{\"value\":"), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The whole connection goes: the TCP socket closes without a RST_STREAM.
    connection.abort();
    let _ = connection.await;
    let client = server.client(fx.client_options());
    let records = common::wait_for_records(&client, "zoom.h2cut", 1).await;
    let record = records.first().expect("the cut request left no record");
    assert_eq!(record["status"], 499, "{record}");
    assert_eq!(record["error_code"], "client_closed", "{record}");
    server.stop().await.unwrap();
}

/// An HTTP/1.1 client that closes its connection before the body it announced has come is
/// recorded as 499 `client_closed`, as it is counted in the metrics, not as a bad request.
#[tokio::test]
async fn an_http1_body_cut_short_by_its_client_is_recorded_as_client_closed() {
    use tokio::io::AsyncWriteExt;
    let fx = Fixture::new();
    let server = spawn(fx.config()).await;
    let alice = fx.user_token("alice");
    let mut tls = server
        .client(fx.client_options())
        .connect_raw()
        .await
        .unwrap();
    let head = format!(
        "PUT /v1/me/credentials/zoom.cut HTTP/1.1\r\nhost: localhost\r\n\
         authorization: Bearer {alice}\r\ncontent-type: application/json\r\n\
         content-length: 100\r\n\r\n{{\"value\":"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls.shutdown().await.unwrap();
    drop(tls);
    let client = server.client(fx.client_options());
    let records = common::wait_for_records(&client, "zoom.cut", 1).await;
    let record = records.first().expect("the cut request left no record");
    assert_eq!(record["status"], 499, "{record}");
    assert_eq!(record["error_code"], "client_closed", "{record}");
    assert_eq!(record["principal_id"], "alice", "{record}");
    let metrics = client.get("/metrics", None).await.unwrap();
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("strongroom_http_requests_total{")
                && l.contains("method=\"PUT\"")
                && l.contains("status=\"499\"")),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("strongroom_http_requests_total{")
                && l.contains("method=\"PUT\"")
                && l.contains("status=\"400\"")),
        "{text}"
    );
    server.stop().await.unwrap();
}
