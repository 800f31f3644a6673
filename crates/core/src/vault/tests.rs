use std::sync::Arc;

use strongroom_crypto::testing::FakeProvider;
use strongroom_crypto::OsRandom;
use strongroom_store::sqlite::SqliteStore;

use super::*;

async fn vault() -> (tempfile::TempDir, Arc<Vault>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    let v = Vault::new(
        store,
        Arc::new(FakeProvider::new("core", 1)),
        Arc::new(OsRandom),
        Arc::new(SystemClock),
        VaultConfig::default(),
    );
    (dir, Arc::new(v))
}

fn put<'a>(owner: &'a str, name: &'a str, value: &[u8]) -> PutRequest<'a> {
    PutRequest {
        owner,
        name,
        value: SecretBytes::from_slice(value),
        metadata: None,
        expected_version: None,
        created_by: "user:test",
    }
}

#[tokio::test]
async fn put_reveal_and_owner_isolation() {
    let (_d, v) = vault().await;
    assert_eq!(
        v.put(put("alice", "zoom.api-key", b"one"))
            .await
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        v.put(put("alice", "zoom.api-key", b"two"))
            .await
            .unwrap()
            .version,
        2
    );
    let r = v.reveal("alice", "zoom.api-key", None).await.unwrap();
    assert_eq!((r.value.expose_secret(), r.version), (&b"two"[..], 2));
    let r1 = v.reveal("alice", "zoom.api-key", Some(1)).await.unwrap();
    assert_eq!(r1.value.expose_secret(), b"one");
    for (owner, name) in [("bob", "zoom.api-key"), ("alice", "zoom.other")] {
        assert!(matches!(
            v.reveal(owner, name, None).await,
            Err(CoreError::NotFound)
        ));
        assert!(matches!(
            v.describe(owner, name).await,
            Err(CoreError::NotFound)
        ));
    }
    let listed = v.list("bob", None, 100).await.unwrap();
    assert!(listed.items.is_empty());
    let described = v.describe("alice", "zoom.api-key").await.unwrap();
    assert_eq!(described.summary.current_version, Some(2));
    assert_eq!(described.versions.len(), 2);
    assert!(!format!("{described:?}").contains("two"));
}

#[tokio::test]
async fn check_and_set() {
    let (_d, v) = vault().await;
    let mut first = put("alice", "n", b"a");
    first.expected_version = Some(0);
    assert_eq!(v.put(first).await.unwrap().version, 1);
    let mut again = put("alice", "n", b"b");
    again.expected_version = Some(0);
    assert!(matches!(
        v.put(again).await,
        Err(CoreError::VersionConflict { current: Some(1) })
    ));
    let mut stale = put("alice", "n", b"c");
    stale.expected_version = Some(7);
    assert!(matches!(
        v.put(stale).await,
        Err(CoreError::VersionConflict { .. })
    ));
    let mut fresh = put("alice", "n", b"d");
    fresh.expected_version = Some(1);
    assert_eq!(v.put(fresh).await.unwrap().version, 2);
}

/// A put answers with the creation time the stores keep (milliseconds), the one every later
/// read gives.
#[tokio::test]
async fn a_put_answers_with_the_time_reads_give() {
    let (_d, v) = vault().await;
    let outcome = v.put(put("alice", "timed", b"x")).await.unwrap();
    assert_eq!(outcome.created_at.nanosecond() % 1_000_000, 0);
    let cred = v.describe("alice", "timed").await.unwrap();
    assert_eq!(cred.versions[0].created_at, outcome.created_at);
}

#[tokio::test]
async fn concurrent_puts_each_get_their_own_version() {
    let (_d, v) = vault().await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let v = v.clone();
            tokio::spawn(async move {
                v.put(put("alice", "race", format!("v{i}").as_bytes()))
                    .await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap().unwrap().version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=16).collect::<Vec<_>>());
}

#[tokio::test]
async fn disabled_is_never_revealed_and_verify_compares() {
    let (_d, v) = vault().await;
    v.put(put("alice", "n", b"secret")).await.unwrap();
    assert!(v
        .verify("alice", "n", &SecretBytes::from_slice(b"secret"))
        .await
        .unwrap());
    assert!(!v
        .verify("alice", "n", &SecretBytes::from_slice(b"secreT"))
        .await
        .unwrap());
    // No stored value is empty: an empty candidate is refused, as a put of it is.
    assert!(matches!(
        v.verify("alice", "n", &SecretBytes::from_slice(b"")).await,
        Err(CoreError::InvalidInput(_))
    ));
    v.set_enabled("alice", "n", false).await.unwrap();
    assert!(matches!(
        v.reveal("alice", "n", None).await,
        Err(CoreError::Disabled)
    ));
    v.set_enabled("alice", "n", true).await.unwrap();
    assert!(v.reveal("alice", "n", None).await.is_ok());
}

#[tokio::test]
async fn destroyed_versions_and_current_choice() {
    let (_d, v) = vault().await;
    for val in [b"1", b"2", b"3"] {
        v.put(put("alice", "n", val)).await.unwrap();
    }
    v.set_current("alice", "n", 1).await.unwrap();
    assert_eq!(
        v.reveal("alice", "n", None)
            .await
            .unwrap()
            .value
            .expose_secret(),
        b"1"
    );
    v.destroy_version("alice", "n", 2).await.unwrap();
    assert!(matches!(
        v.reveal("alice", "n", Some(2)).await,
        Err(CoreError::VersionDestroyed)
    ));
    assert!(matches!(
        v.set_current("alice", "n", 2).await,
        Err(CoreError::VersionDestroyed)
    ));
    v.destroy_credential("alice", "n").await.unwrap();
    assert!(matches!(
        v.reveal("alice", "n", None).await,
        Err(CoreError::NotFound)
    ));
    // Numbering continues: no slot is reused.
    assert_eq!(v.put(put("alice", "n", b"4")).await.unwrap().version, 4);
}

#[tokio::test]
async fn a_value_moved_to_another_row_fails_its_integrity_check() {
    let (_d, v) = vault().await;
    v.put(put("alice", "n", b"alice's")).await.unwrap();
    let row = v.store().get_version("alice", "n", None).await.unwrap();
    // Graft alice's sealed bytes into bob's row, version 1.
    let mut graft = NewVersion::new(
        "bob",
        "n",
        1,
        row.sealed_value,
        row.wrapped_key,
        row.kek,
        "attacker",
        v.now(),
    );
    graft.max_versions = 10;
    v.store().put_version(graft).await.unwrap();
    assert!(matches!(
        v.reveal("bob", "n", None).await,
        Err(CoreError::Integrity { .. })
    ));
}

#[tokio::test]
async fn bad_input_is_refused_before_any_write() {
    let (_d, v) = vault().await;
    assert!(matches!(
        v.put(put("alice", "Bad/Name", b"x")).await,
        Err(CoreError::InvalidName)
    ));
    assert!(matches!(
        v.put(put("", "n", b"x")).await,
        Err(CoreError::InvalidOwner)
    ));
    let big = vec![0u8; MAX_VALUE_LEN + 1];
    assert!(matches!(
        v.put(put("alice", "n", &big)).await,
        Err(CoreError::ValueTooLarge(_))
    ));
    let mut arr = put("alice", "n", b"x");
    arr.metadata = Some(serde_json::json!([1, 2]));
    assert!(matches!(
        v.put(arr).await,
        Err(CoreError::InvalidMetadata(_))
    ));
    let mut huge = put("alice", "n", b"x");
    huge.metadata = Some(serde_json::json!({"k": "x".repeat(MAX_METADATA_LEN)}));
    assert!(matches!(
        v.put(huge).await,
        Err(CoreError::InvalidMetadata(_))
    ));
    for nul in [
        serde_json::json!({"k": "a\0b"}),
        serde_json::json!({"k\0": 1}),
        serde_json::json!({"k": [{"deep": "\0"}]}),
    ] {
        let mut m = put("alice", "n", b"x");
        m.metadata = Some(nul.clone());
        assert!(
            matches!(v.put(m).await, Err(CoreError::InvalidMetadata(_))),
            "{nul}"
        );
    }
    // Whole numbers that would come back with other digits.
    for inexact in [
        "{\"n\": 123456789012345678901234567890}",
        "{\"n\": 18446744073709551616}",
        "{\"n\": [-18446744073709551617]}",
        "{\"n\": 9007199254740993.0}",
        "{\"n\": 1e300}",
    ] {
        let mut m = put("alice", "n", b"x");
        m.metadata = Some(serde_json::from_str(inexact).unwrap());
        match v.put(m).await {
            Err(CoreError::InvalidMetadata(why)) => assert!(why.contains("as a string"), "{why}"),
            other => panic!("{inexact}: {:?}", other.map(|_| ())),
        }
    }
    // What a double or 64 bits keep exactly is stored as written.
    let exact = "{\"max\": 18446744073709551615, \"min\": -9223372036854775808, \
                 \"f\": 0.1, \"big\": 9007199254740991.0, \"e\": 1e2}";
    let mut m = put("alice", "numbers", b"x");
    m.metadata = Some(serde_json::from_str(exact).unwrap());
    v.put(m).await.unwrap();
    let d = v.describe("alice", "numbers").await.unwrap();
    let kept = &d.versions[0].metadata;
    assert_eq!(kept["max"].as_u64(), Some(u64::MAX), "{kept}");
    assert_eq!(kept["min"].as_i64(), Some(i64::MIN), "{kept}");
    assert_eq!(kept["f"].as_f64(), Some(0.1), "{kept}");
    assert_eq!(
        kept["big"].as_f64(),
        Some(9_007_199_254_740_991.0),
        "{kept}"
    );
    v.destroy_credential("alice", "numbers").await.unwrap();
    let mut escaped = put("alice", "n2", b"x");
    escaped.metadata = Some(serde_json::json!({"k": "a backslash then u0000: \\u0000"}));
    v.put(escaped).await.unwrap();
    v.destroy_credential("alice", "n2").await.unwrap();
    assert!(
        matches!(v.describe("alice", "n").await, Err(CoreError::NotFound)),
        "nothing was written"
    );
    let exact = vec![1u8; MAX_VALUE_LEN];
    v.put(put("alice", "n", &exact)).await.unwrap();
}

/// Rewraps every version of `source` to another provider; the report, and a vault over the
/// same store with that provider.
async fn rewrap_to_another_provider(source: &Vault) -> (crate::RewrapReport, Vault) {
    let to: Arc<dyn strongroom_crypto::KeyProvider> = Arc::new(FakeProvider::new("other", 1));
    let report = crate::rewrap(
        source.store().clone(),
        source.keys().clone(),
        to.clone(),
        &crate::RewrapOptions::default(),
        &mut |_| {},
    )
    .await
    .unwrap();
    let moved = Vault::new(
        source.store().clone(),
        to,
        Arc::new(OsRandom),
        Arc::new(SystemClock),
        VaultConfig::default(),
    );
    (report, moved)
}

/// Alice's `row` copied, as version 1 of the same name, into a fresh store (same provider)
/// under `metadata`, as whoever writes the database could plant it: the vault over it.
async fn graft(
    row: &strongroom_store::SealedVersion,
    metadata: serde_json::Value,
) -> (tempfile::TempDir, Arc<Vault>) {
    let (dir, copy) = vault().await;
    let mut new = NewVersion::new(
        "alice",
        &row.name,
        1,
        row.sealed_value.clone(),
        row.wrapped_key.clone(),
        row.kek.clone(),
        "attacker",
        copy.now(),
    );
    new.metadata = metadata;
    copy.store().put_version(new).await.unwrap();
    (dir, copy)
}

/// The host a version is bound to (`metadata.host`, where brokered calls may send it) is in
/// the associated data: the same bytes under an edited host do not open, so editing the
/// database cannot redirect a value. Rewrap keeps the binding.
#[tokio::test]
async fn the_bound_host_is_part_of_the_associated_data() {
    let (_a, source) = vault().await;
    let mut req = put("alice", "zoom.api-key", b"zoom secret");
    req.metadata = Some(serde_json::json!({"host": "api.zoom.us", "label": "work"}));
    source.put(req).await.unwrap();
    let row = source
        .store()
        .get_version("alice", "zoom.api-key", None)
        .await
        .unwrap();
    assert_eq!(row.metadata["host"], "api.zoom.us");

    // The same row copied into another store (same provider), once as it was and once with
    // only the host edited.
    for (host, opens) in [("api.zoom.us", true), ("evil.example", false)] {
        let (_b, copy) = graft(&row, serde_json::json!({"host": host, "label": "work"})).await;
        let revealed = copy.reveal("alice", "zoom.api-key", None).await;
        match (opens, revealed) {
            (true, Ok(r)) => assert_eq!(r.value.expose_secret(), b"zoom secret"),
            (false, Err(CoreError::Integrity { .. })) => {}
            (_, other) => panic!("host {host}: {:?}", other.map(|r| r.version)),
        }
    }

    // A rewrap (here to another provider) re-wraps hosted versions under the same binding.
    let (report, moved) = rewrap_to_another_provider(&source).await;
    assert_eq!((report.rewrapped, report.failed), (1, 0));
    let r = moved.reveal("alice", "zoom.api-key", None).await.unwrap();
    assert_eq!(r.value.expose_secret(), b"zoom secret");
    assert_eq!(r.bound_host.as_deref(), Some("api.zoom.us"));
}

/// A version sealed under its place alone whose metadata names a host (sealed before hosts
/// were bound, when `host` was a label; or a host added in the database since) opens, and
/// names no bound host: the broker refuses it. A bound host is never lost that way:
/// a version sealed with one opens under no binding without it.
#[tokio::test]
async fn a_host_not_sealed_with_the_version_opens_but_is_not_bound() {
    let (_a, source) = vault().await;
    let mut req = put("alice", "zoom.api-key", b"zoom secret");
    req.metadata = Some(serde_json::json!({"label": "work"}));
    source.put(req).await.unwrap();
    let row = source
        .store()
        .get_version("alice", "zoom.api-key", None)
        .await
        .unwrap();
    let (_b, copy) = graft(
        &row,
        serde_json::json!({"host": "evil.example", "label": "work"}),
    )
    .await;
    let r = copy.reveal("alice", "zoom.api-key", None).await.unwrap();
    assert_eq!(r.value.expose_secret(), b"zoom secret");
    assert_eq!(r.bound_host, None);
    let (_c, copy) = graft(&row, serde_json::json!({"label": "work"})).await;
    let r = copy.reveal("alice", "zoom.api-key", None).await.unwrap();
    assert_eq!(
        (r.value.expose_secret(), r.bound_host),
        (&b"zoom secret"[..], None)
    );
}

/// The expiry (`metadata.expires_at`) is in the associated data too: a version whose expiry
/// was moved, removed or nulled in the database does not open, so editing the database cannot
/// keep a dead key in use. A version sealed before expiries were bound (no expiry in its
/// associated data, one in its metadata) still opens, and still expires. Rewrap keeps each
/// version's binding.
#[tokio::test]
async fn the_expiry_is_part_of_the_associated_data() {
    let (source_dir, source) = vault().await;
    let far = "2099-01-01T00:00:00Z";
    let mut req = put("alice", "bound", b"bound secret");
    req.metadata = Some(serde_json::json!({"expires_at": far, "label": "work"}));
    source.put(req).await.unwrap();
    let mut req = put("alice", "legacy", b"legacy secret");
    req.metadata = Some(serde_json::json!({"label": "work"}));
    source.put(req).await.unwrap();
    let row_of = |name: &'static str| {
        let source = source.clone();
        async move {
            source
                .store()
                .get_version("alice", name, None)
                .await
                .unwrap()
        }
    };
    let (bound, legacy) = (row_of("bound").await, row_of("legacy").await);

    // A row copied into another store (same provider) under the metadata given, revealed.
    let graft_revealed = |row: &strongroom_store::SealedVersion, metadata: serde_json::Value| {
        let row = row.clone();
        async move {
            let (dir, copy) = graft(&row, metadata).await;
            let revealed = copy.reveal("alice", &row.name, None).await;
            (dir, revealed)
        }
    };
    let opened = |r: Result<Revealed, CoreError>| r.map(|r| r.value.expose_secret().to_vec());

    let (_d, r) = graft_revealed(
        &bound,
        serde_json::json!({"expires_at": far, "label": "work"}),
    )
    .await;
    assert_eq!(opened(r).unwrap(), b"bound secret");
    for edited in [
        serde_json::json!({"expires_at": "2100-01-01T00:00:00Z", "label": "work"}),
        // Moved into the past: tampering too, not an expiry.
        serde_json::json!({"expires_at": "2000-01-01T00:00:00Z", "label": "work"}),
        serde_json::json!({"expires_at": "2099-01-01T00:00:00+00:00", "label": "work"}),
        serde_json::json!({"label": "work"}),
        serde_json::json!({"expires_at": null, "label": "work"}),
        serde_json::json!({"expires_at": 4_070_908_800_i64, "label": "work"}),
    ] {
        let (_d, r) = graft_revealed(&bound, edited.clone()).await;
        assert!(
            matches!(r, Err(CoreError::Integrity { .. })),
            "{edited}: {:?}",
            opened(r)
        );
    }

    // Sealed without an expiry: opens under one added later, which still applies (text that
    // is no time is no expiry).
    for (metadata, value) in [
        (
            serde_json::json!({"label": "work"}),
            Some(&b"legacy secret"[..]),
        ),
        (
            serde_json::json!({"expires_at": far}),
            Some(b"legacy secret"),
        ),
        (
            serde_json::json!({"expires_at": "soon"}),
            Some(b"legacy secret"),
        ),
        (
            serde_json::json!({"expires_at": "2000-01-01T00:00:00Z"}),
            None,
        ),
    ] {
        let (_d, r) = graft_revealed(&legacy, metadata.clone()).await;
        match (value, r) {
            (Some(v), Ok(r)) => assert_eq!(r.value.expose_secret(), v, "{metadata}"),
            (None, Err(CoreError::VersionExpired { .. })) => {}
            (_, r) => panic!("{metadata}: {:?}", opened(r)),
        }
    }

    // A rewrap (here to another provider) moves both kinds, each under the binding it was
    // sealed with: the version sealed without an expiry is given one first.
    rusqlite::Connection::open(
        source_dir
            .path()
            .join(strongroom_store::sqlite::DB_FILE_NAME),
    )
    .unwrap()
    .execute(
        "UPDATE versions SET metadata = ?1 WHERE credential_id = \
             (SELECT id FROM credentials WHERE name = 'legacy')",
        [serde_json::json!({"expires_at": far}).to_string()],
    )
    .unwrap();
    let (report, moved) = rewrap_to_another_provider(&source).await;
    assert_eq!((report.rewrapped, report.failed), (2, 0));
    let r = moved.reveal("alice", "bound", None).await.unwrap();
    assert_eq!(r.value.expose_secret(), b"bound secret");
    let r = moved.reveal("alice", "legacy", None).await.unwrap();
    assert_eq!(r.value.expose_secret(), b"legacy secret");
}

#[tokio::test]
async fn reveals_note_last_use_and_one_flush_writes_the_newest() {
    let (_d, v) = vault().await;
    v.put(put("alice", "a", b"1")).await.unwrap();
    v.put(put("alice", "b", b"2")).await.unwrap();
    let last_used = |c: Credential| c.summary.last_used_at;
    for _ in 0..20 {
        v.reveal("alice", "a", None).await.unwrap();
    }
    v.reveal("alice", "b", None).await.unwrap();
    // Coalesced in memory: one note per credential, nothing written yet.
    assert_eq!(v.usage.pending(), 2);
    assert_eq!(last_used(v.describe("alice", "a").await.unwrap()), None);
    let before_flush = v.clock.now();
    v.flush_usage().await;
    assert_eq!(v.usage.pending(), 0);
    for name in ["a", "b"] {
        let at = last_used(v.describe("alice", name).await.unwrap()).expect("written");
        assert!(at <= before_flush);
    }
    // Without an explicit flush, the background one writes within the interval.
    let first = last_used(v.describe("alice", "a").await.unwrap()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    v.reveal("alice", "a", None).await.unwrap();
    // Polled for up to 30 s: the interval plus whatever a slow machine adds.
    let mut later = first;
    for _ in 0..1000 {
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        later = last_used(v.describe("alice", "a").await.unwrap()).unwrap();
        if later > first {
            break;
        }
    }
    assert!(
        later > first,
        "background flush did not write the newer use"
    );
}

#[tokio::test]
async fn a_stale_version_guess_costs_one_retry_and_never_a_wrong_version() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    let vault = |store: &Arc<dyn Store>| {
        Vault::new(
            store.clone(),
            Arc::new(FakeProvider::new("core", 1)),
            Arc::new(OsRandom),
            Arc::new(SystemClock),
            VaultConfig::default(),
        )
    };
    // Two nodes over one store: each remembers the numbers it wrote, not the other's.
    let (a, b) = (vault(&store), vault(&store));
    assert_eq!(a.put(put("alice", "k", b"a1")).await.unwrap().version, 1);
    assert_eq!(b.put(put("alice", "k", b"b2")).await.unwrap().version, 2);
    assert_eq!(b.put(put("alice", "k", b"b3")).await.unwrap().version, 3);
    // a's guess (1) is stale: the store's conflict answer sets it right.
    assert_eq!(a.put(put("alice", "k", b"a4")).await.unwrap().version, 4);
    for (v, value) in [(1, &b"a1"[..]), (2, b"b2"), (3, b"b3"), (4, b"a4")] {
        let r = b.reveal("alice", "k", Some(v)).await.unwrap();
        assert_eq!(r.value.expose_secret(), value);
    }
    // Numbering continues after a destroy, so the guess stays a lower bound.
    a.destroy_credential("alice", "k").await.unwrap();
    assert_eq!(a.put(put("alice", "k", b"a5")).await.unwrap().version, 5);
}

/// Unconditional puts to one credential from several nodes at once all succeed, each with
/// its own version number: losers of a race back off and try again rather than give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_racing_from_several_nodes_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    let nodes: Vec<Arc<Vault>> = (0..4)
        .map(|_| {
            Arc::new(Vault::new(
                store.clone(),
                Arc::new(FakeProvider::new("core", 1)),
                Arc::new(OsRandom),
                Arc::new(SystemClock),
                VaultConfig {
                    max_versions: 1000,
                    ..VaultConfig::default()
                },
            ))
        })
        .collect();
    const EACH: u32 = 60;
    let tasks: Vec<_> = nodes
        .iter()
        .enumerate()
        .flat_map(|(n, node)| {
            (0..2).map(move |w| {
                let node = node.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    for i in 0..EACH {
                        let value = format!("n{n}w{w}i{i}");
                        let r = node.put(put("alice", "hot", value.as_bytes())).await;
                        got.push((r.map(|o| o.version), value));
                        // A client's round trip before its next request.
                        tokio::time::sleep(std::time::Duration::from_micros(300)).await;
                    }
                    got
                })
            })
        })
        .collect();
    let mut versions = Vec::new();
    let mut failed = Vec::new();
    for t in tasks {
        for (r, value) in t.await.unwrap() {
            match r {
                Ok(version) => versions.push((version, value)),
                Err(e) => failed.push(format!("{value}: {e}")),
            }
        }
    }
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    versions.sort();
    assert_eq!(
        versions.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
        (1..=8 * EACH).collect::<Vec<_>>()
    );
    for (version, value) in versions.iter().step_by(37) {
        let r = nodes[0]
            .reveal("alice", "hot", Some(*version))
            .await
            .unwrap();
        assert_eq!(r.value.expose_secret(), value.as_bytes());
    }
}

/// A version whose key no configured provider holds (a server left on the old configuration
/// after `rewrap --to-config`) is `KeyUnavailable` (503 `key_unavailable`), not an internal
/// error.
#[tokio::test]
async fn a_version_under_a_key_no_provider_here_holds_is_key_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    let vault = |key_id: &str| {
        Vault::new(
            store.clone(),
            Arc::new(FakeProvider::new(key_id, 1)),
            Arc::new(OsRandom),
            Arc::new(SystemClock),
            VaultConfig::default(),
        )
    };
    vault("old").put(put("alice", "k", b"v")).await.unwrap();
    match vault("new").reveal("alice", "k", None).await {
        Err(CoreError::KeyUnavailable(msg)) => assert!(msg.contains("old"), "{msg}"),
        other => panic!(
            "expected KeyUnavailable, got {:?}",
            other.map(|r| r.version)
        ),
    }
}

/// The put hints are bounded by credentials: one owner writing ever more names used to grow
/// them without limit (the cap counted owners).
#[tokio::test]
async fn put_hints_are_bounded_by_credentials() {
    let (_d, v) = vault().await;
    for i in 0..MAX_LATEST_HINTS {
        v.put(put("alice", &format!("k{i}"), b"v")).await.unwrap();
    }
    assert_eq!(v.testing_latest_hints(), MAX_LATEST_HINTS);
    // A known credential is updated in place; a new one past the cap starts over.
    v.put(put("alice", "k0", b"w")).await.unwrap();
    assert_eq!(v.testing_latest_hints(), MAX_LATEST_HINTS);
    v.put(put("alice", "one-more", b"v")).await.unwrap();
    assert_eq!(v.testing_latest_hints(), 1);
    // The hints are guesses: puts after starting over still number versions right.
    let r = v.put(put("alice", "k0", b"x")).await.unwrap();
    assert_eq!(r.version, 3);
}

/// The configured quota reaches the store: a put creating one credential too many is
/// refused, new versions and other owners are not, and a destroy frees a slot.
#[tokio::test]
async fn the_owner_quota_refuses_only_new_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    let v = Vault::new(
        store,
        Arc::new(FakeProvider::new("core", 1)),
        Arc::new(OsRandom),
        Arc::new(SystemClock),
        VaultConfig {
            max_credentials_per_owner: Some(2),
            ..VaultConfig::default()
        },
    );
    v.put(put("alice", "a", b"1")).await.unwrap();
    v.put(put("alice", "b", b"1")).await.unwrap();
    assert!(matches!(
        v.put(put("alice", "c", b"1")).await,
        Err(CoreError::QuotaExceeded { limit: 2 })
    ));
    assert!(matches!(
        v.describe("alice", "c").await,
        Err(CoreError::NotFound)
    ));
    assert_eq!(v.put(put("alice", "a", b"2")).await.unwrap().version, 2);
    v.put(put("bob", "c", b"1")).await.unwrap();
    v.destroy_credential("alice", "b").await.unwrap();
    v.put(put("alice", "c", b"1")).await.unwrap();
}

#[tokio::test]
async fn describe_pages_check_their_bounds() {
    let (_d, v) = vault().await;
    for i in 0..5 {
        v.put(put("alice", "k", format!("v{i}").as_bytes()))
            .await
            .unwrap();
    }
    let page = v.describe_page("alice", "k", None, 2).await.unwrap();
    let numbers: Vec<u32> = page.versions.iter().map(|x| x.version).collect();
    assert_eq!((numbers, page.versions_next), (vec![5, 4], Some(4)));
    let page = v.describe_page("alice", "k", Some(4), 1000).await.unwrap();
    assert_eq!(page.versions.len(), 3);
    for (before, limit) in [(None, 0), (None, 1001), (Some(0), 10), (Some(1 << 31), 10)] {
        assert!(
            matches!(
                v.describe_page("alice", "k", before, limit).await,
                Err(CoreError::InvalidInput(_))
            ),
            "{before:?} {limit}"
        );
    }
    assert!(matches!(
        v.describe_page("bob", "k", None, 10).await,
        Err(CoreError::NotFound)
    ));
}

/// A clock the test moves.
#[derive(Debug)]
struct SetClock(std::sync::Mutex<time::OffsetDateTime>);

impl Clock for SetClock {
    fn now(&self) -> time::OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

/// A version past its `metadata.expires_at` is neither revealed nor brokered (the broker
/// reveals through the same call), from the instant named on; before it, and for another
/// version or the owner's verify, nothing changes. Text under the key that is no time (from
/// before expiries were checked) is no expiry.
#[tokio::test]
async fn an_expired_version_is_not_revealed() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    let start = time::macros::datetime!(2027-01-31 00:00 UTC);
    let clock = Arc::new(SetClock(std::sync::Mutex::new(
        start - time::Duration::seconds(1),
    )));
    let v = Vault::new(
        store,
        Arc::new(FakeProvider::new("core", 1)),
        Arc::new(OsRandom),
        clock.clone(),
        VaultConfig::default(),
    );
    let with = |value: &'static [u8], metadata: serde_json::Value| PutRequest {
        metadata: Some(metadata),
        ..put("alice", "n", value)
    };
    v.put(with(b"old", serde_json::json!({"label": "x"})))
        .await
        .unwrap();
    v.put(with(
        b"expiring",
        serde_json::json!({"expires_at": "2027-01-31T00:00:00Z"}),
    ))
    .await
    .unwrap();
    let revealed = v.reveal("alice", "n", None).await.unwrap();
    assert_eq!(revealed.value.expose_secret(), b"expiring");

    *clock.0.lock().unwrap() = start;
    match v.reveal("alice", "n", None).await {
        Err(CoreError::VersionExpired {
            version,
            expired_at,
        }) => assert_eq!((version, expired_at.as_str()), (2, "2027-01-31T00:00:00Z")),
        other => panic!("{:?}", other.map(|r| r.version)),
    }
    assert!(matches!(
        v.reveal("alice", "n", Some(2)).await,
        Err(CoreError::VersionExpired { .. })
    ));
    // Version 1 has no expiry; the owner's verify still answers about version 2.
    assert_eq!(
        v.reveal("alice", "n", Some(1))
            .await
            .unwrap()
            .value
            .expose_secret(),
        b"old"
    );
    assert!(v
        .verify("alice", "n", &SecretBytes::from_slice(b"expiring"))
        .await
        .unwrap());
    // A disabled credential is refused as disabled, expired or not.
    v.set_enabled("alice", "n", false).await.unwrap();
    assert!(matches!(
        v.reveal("alice", "n", None).await,
        Err(CoreError::Disabled)
    ));
    v.set_enabled("alice", "n", true).await.unwrap();
    // An expiry that is no RFC 3339 time is refused when stored...
    assert!(matches!(
        v.put(with(b"bad", serde_json::json!({"expires_at": "soon"})))
            .await,
        Err(CoreError::InvalidMetadata(_))
    ));
    // ...and one stored before expiries were checked is no expiry: a version sealed without
    // an expiry (before expiries were bound) and given such text behind the vault is
    // revealed.
    v.put(with(b"legacy", serde_json::json!({"label": "x"})))
        .await
        .unwrap();
    rusqlite::Connection::open(dir.path().join(strongroom_store::sqlite::DB_FILE_NAME))
        .unwrap()
        .execute(
            "UPDATE versions SET metadata = '{\"expires_at\": \"soon\"}' WHERE version = 3",
            [],
        )
        .unwrap();
    assert_eq!(
        v.reveal("alice", "n", None)
            .await
            .unwrap()
            .value
            .expose_secret(),
        b"legacy"
    );
}

#[test]
fn expiries_are_rfc_3339_times() {
    use crate::expiry_of;
    assert_eq!(expiry_of(None), Ok(None));
    assert_eq!(expiry_of(Some(&serde_json::json!({}))), Ok(None));
    assert_eq!(
        expiry_of(Some(&serde_json::json!({"expires_at": null}))),
        Ok(None)
    );
    assert_eq!(
        expiry_of(Some(
            &serde_json::json!({"expires_at": "2027-01-31T01:00:00+01:00"})
        )),
        Ok(Some(time::macros::datetime!(2027-01-31 00:00 UTC)))
    );
    for bad in [
        serde_json::json!("2027-01-31"),
        serde_json::json!("soon"),
        // A valid time, but with 5000 fraction digits.
        serde_json::json!(format!("2027-01-31T00:00:00.{}Z", "0".repeat(5000))),
        serde_json::json!(1_800_000_000),
    ] {
        let e = expiry_of(Some(&serde_json::json!({ "expires_at": bad }))).unwrap_err();
        assert!(e.contains("RFC 3339") && !e.contains("soon"), "{e}");
    }
}
