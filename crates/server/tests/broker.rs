//! Brokered use through the whole server: `[broker]` settings reach the broker, and the
//! `--dev` policy lets the dev service broker. The upstream is the dev server itself (HTTPS on
//! 127.0.0.1 with the dev CA): the credential is alice's own user token, injected as her
//! bearer token into a call to `/v1/me/credentials`.

mod common;

use std::time::Duration;

use serde_json::json;
use strongroom_server::dev::{self, DevOptions};
use strongroom_server::testing::{ClientOptions, TestClient};
use strongroom_server::Server;

/// A dev server with its data folder in `dir`, `tweak` applied to its configuration.
struct DevServer {
    running: common::Running,
    client: TestClient,
    setup: dev::DevSetup,
    addr: std::net::SocketAddr,
    reloader: strongroom_server::Reloader,
    /// alice's user token.
    alice: zeroize::Zeroizing<String>,
}

async fn dev_server(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut strongroom_server::config::Config, &dev::DevSetup),
) -> DevServer {
    let setup = dev::bootstrap(&DevOptions {
        data_dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_token: None,
        service_token: None,
    })
    .unwrap();
    let mut config = setup.config("127.0.0.1:0".parse().unwrap()).unwrap();
    tweak(&mut config, &setup);
    let server = Server::start_with_policy(config, dev::policy())
        .await
        .unwrap();
    let addr = server.local_addr();
    let reloader = server.reloader();
    let running = common::spawn_started(server);
    let client = TestClient::new(
        addr,
        ClientOptions::new(std::fs::read(&setup.ca_cert).unwrap()),
    )
    .unwrap();
    let alice = dev::mint_user_token(dir, "alice", Duration::from_secs(600)).unwrap();
    DevServer {
        running,
        client,
        setup,
        addr,
        reloader,
        alice,
    }
}

#[tokio::test]
async fn the_dev_service_brokers_to_a_bound_host_and_never_sees_the_value() {
    let tmp = tempfile::tempdir().unwrap();
    // The upstream is on 127.0.0.1 and signed by the dev CA.
    let DevServer {
        running,
        client,
        setup,
        addr,
        alice,
        ..
    } = dev_server(tmp.path(), |config, setup| {
        config.broker.allow_private_networks = true;
        config.broker.ca_file = Some(setup.ca_cert.clone());
    })
    .await;
    let service = setup.service_token.as_str();

    let r = client
        .json(
            "PUT",
            "/v1/me/credentials/self.token",
            Some(&alice),
            &json!({"value": alice.as_str(), "metadata": {"host": "localhost:*"}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let call = |url: String| {
        json!({"method": "GET", "url": url,
               "inject": {"header": "Authorization", "format": "Bearer {value}"}})
    };
    let r = client
        .json(
            "POST",
            "/v1/owners/alice/credentials/self.token/broker",
            Some(service),
            &call(format!(
                "https://localhost:{}/v1/me/credentials",
                addr.port()
            )),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], 200, "{v}");
    let listed: serde_json::Value = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
    assert_eq!(listed["items"][0]["name"], "self.token");
    assert!(!r.text().contains(alice.as_str()), "the value came back");

    // Only to the bound host: the same server by IP is another destination.
    let r = client
        .json(
            "POST",
            "/v1/owners/alice/credentials/self.token/broker",
            Some(service),
            &call(format!(
                "https://127.0.0.1:{}/v1/me/credentials",
                addr.port()
            )),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());

    // The owner sees the brokered use and where it went.
    let r = client
        .get("/v1/me/credentials/self.token/usage", Some(&alice))
        .await
        .unwrap();
    let usage = r.json();
    let items = usage["items"].as_array().unwrap();
    // Newest first: the refused call, then the one made.
    assert_eq!(
        (
            items[0]["outcome"].as_str(),
            items[0]["destination"].as_str()
        ),
        (
            Some("denied"),
            Some(format!("https://127.0.0.1:{}", addr.port()).as_str())
        )
    );
    assert_eq!(
        (items[1]["action"].as_str(), items[1]["outcome"].as_str()),
        (Some("broker"), Some("ok"))
    );
    assert_eq!(
        items[1]["destination"],
        format!("https://localhost:{}", addr.port()).as_str()
    );
    assert!(!r.text().contains(alice.as_str()));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn by_default_private_addresses_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let DevServer {
        running,
        client,
        setup,
        addr,
        alice,
        ..
    } = dev_server(tmp.path(), |config, _| {
        assert!(!config.broker.allow_private_networks);
    })
    .await;
    let r = client
        .json(
            "PUT",
            "/v1/me/credentials/self.token",
            Some(&alice),
            &json!({"value": "v-123456789", "metadata": {"host": "localhost:*"}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = client
        .json(
            "POST",
            "/v1/owners/alice/credentials/self.token/broker",
            Some(setup.service_token.as_str()),
            &json!({"method": "GET", "url": format!("https://localhost:{}/healthz", addr.port()),
                    "inject": {"header": "X-Key"}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "destination_not_allowed");
    running.stop().await.unwrap();
}

/// A reload (SIGHUP) builds a new broker that still counts the calls the old one let in:
/// with one place and a call holding it, a call after the reload is refused as before,
/// instead of being handed a fresh allowance.
#[tokio::test]
async fn a_reload_keeps_counting_the_calls_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let DevServer {
        running,
        client,
        setup,
        reloader,
        alice,
        ..
    } = dev_server(tmp.path(), |config, _| {
        config.broker.allow_private_networks = true;
        config.broker.max_concurrent_calls = 1;
        config.broker.max_concurrent_calls_per_service = Some(1);
        // Longer than this test: the first call must not give its place back on its own.
        config.broker.connect_timeout_seconds = 15;
    })
    .await;
    let r = client
        .json(
            "PUT",
            "/v1/me/credentials/slow.key",
            Some(&alice),
            &json!({"value": "v-123456789", "metadata": {"host": "localhost:*"}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());

    // An upstream that takes the connection and never answers the TLS handshake: the first
    // call holds the only place until its connect timeout (or the end of the test).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let call = json!({"method": "GET", "url": format!("https://localhost:{port}/x"),
                      "inject": {"header": "X-Key"}});
    let broker = move |client: TestClient, token: String, call: serde_json::Value| async move {
        client
            .json(
                "POST",
                "/v1/owners/alice/credentials/slow.key/broker",
                Some(&token),
                &call,
            )
            .await
    };
    let token = setup.service_token.as_str().to_owned();
    let first = tokio::spawn(broker(client.clone(), token.clone(), call.clone()));
    // A refused call answers at once; one let in waits on the silent upstream.
    let refused = |when: &'static str| {
        let (client, token, call) = (&client, &token, &call);
        async move {
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                broker(client.clone(), token.clone(), call.clone()),
            )
            .await
            .unwrap_or_else(|_| panic!("{when}: a second call was let in"))
            .unwrap();
            assert!(r.status == 429 || r.status == 503, "{when}: {}", r.text());
            assert_eq!(r.json()["error"]["code"], "broker_busy", "{}", r.text());
        }
    };
    // For the first call to take the place (nothing shows when it has).
    tokio::time::sleep(Duration::from_secs(1)).await;
    refused("before the reload").await;
    reloader.reload_broker().unwrap();
    refused("after the reload").await;
    first.abort();
    running.stop().await.unwrap();
}
