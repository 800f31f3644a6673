//! The conformance checks. Each takes a fresh [`TestBackend`] and panics on a violation.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::sync::Arc;

use time::{Duration, OffsetDateTime};

use super::TestBackend;
use crate::{
    Cursor, KekFilter, KekRef, NewVersion, Store, StoreError, VersionState, MAX_OWNER_LEN,
    MAX_SEALED_LEN, SCHEMA_VERSION,
};

/// The fixed clock of the suite.
pub fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("valid timestamp")
}

/// Deterministic, distinct bytes for a version's sealed value.
pub fn test_value(owner: &str, name: &str, version: u32, len: usize) -> Vec<u8> {
    let mut x: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.bytes().chain([0xff]).chain(name.bytes()) {
        x = (x ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    x ^= u64::from(version).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn kek(n: u32) -> KekRef {
    KekRef::new("local", "k1", n)
}

pub(crate) fn new_version(owner: &str, name: &str, version: u32) -> NewVersion {
    let mut nv = NewVersion::new(
        owner,
        name,
        version,
        test_value(owner, name, version, 100),
        test_value(name, owner, version, 40),
        kek(1),
        "user:test",
        t0() + Duration::seconds(i64::from(version)),
    );
    nv.metadata = serde_json::json!({ "host": "api.example.com", "v": version });
    nv
}

async fn put(store: &dyn Store, owner: &str, name: &str, version: u32) {
    let out = store
        .put_version(new_version(owner, name, version))
        .await
        .unwrap_or_else(|e| panic!("put {owner}/{name} v{version}: {e}"));
    assert_eq!(out.version, version);
}

async fn open(b: &dyn TestBackend) -> Arc<dyn Store> {
    b.open().await.expect("open the store")
}

fn assert_conflict(r: Result<impl std::fmt::Debug, StoreError>, want_latest: u32) {
    match r {
        Err(StoreError::Conflict { latest }) => assert_eq!(latest, want_latest),
        other => panic!("expected Conflict {{ latest: {want_latest} }}, got {other:?}"),
    }
}

fn assert_not_found(r: Result<impl std::fmt::Debug, StoreError>) {
    match r {
        Err(StoreError::NotFound) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

fn assert_invalid(r: Result<impl std::fmt::Debug, StoreError>) {
    match r {
        Err(StoreError::InvalidInput(_)) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

pub async fn put_and_get_round_trip(b: &dyn TestBackend) {
    let s = open(b).await;
    assert_eq!(s.latest_version("alice", "zoom.api-key").await.unwrap(), 0);
    let nv = new_version("alice", "zoom.api-key", 1);
    let out = s.put_version(nv.clone()).await.unwrap();
    assert_eq!(out.version, 1);
    assert!(out.retired.is_empty());
    assert_eq!(s.latest_version("alice", "zoom.api-key").await.unwrap(), 1);

    for asked in [None, Some(1)] {
        let got = s.get_version("alice", "zoom.api-key", asked).await.unwrap();
        assert_eq!(got.owner, "alice");
        assert_eq!(got.name, "zoom.api-key");
        assert_eq!(got.version, 1);
        assert!(got.is_current && got.credential_enabled);
        assert_eq!(got.sealed_value, nv.sealed_value);
        assert_eq!(got.wrapped_key, nv.wrapped_key);
        assert_eq!(got.kek, nv.kek);
        assert_eq!(got.metadata, nv.metadata);
        assert_eq!(got.created_by, "user:test");
        assert_eq!(got.created_at, nv.created_at);
    }
    put(&*s, "alice", "zoom.api-key", 2).await;
    let cur = s.get_version("alice", "zoom.api-key", None).await.unwrap();
    assert_eq!(cur.version, 2);
    let old = s
        .get_version("alice", "zoom.api-key", Some(1))
        .await
        .unwrap();
    assert!(!old.is_current);
    assert_eq!(old.sealed_value, nv.sealed_value);
    assert_not_found(s.get_version("alice", "zoom.api-key", Some(3)).await);
    // Milliseconds are kept.
    let mut nv = new_version("alice", "ms", 1);
    nv.created_at = t0() + Duration::milliseconds(1234);
    s.put_version(nv).await.unwrap();
    let got = s.get_version("alice", "ms", None).await.unwrap();
    assert_eq!(got.created_at, t0() + Duration::milliseconds(1234));
}

pub async fn version_must_be_latest_plus_one(b: &dyn TestBackend) {
    let s = open(b).await;
    assert_conflict(s.put_version(new_version("o", "n", 2)).await, 0);
    put(&*s, "o", "n", 1).await;
    assert_conflict(s.put_version(new_version("o", "n", 1)).await, 1);
    assert_conflict(s.put_version(new_version("o", "n", 3)).await, 1);
    put(&*s, "o", "n", 2).await;
    // A failed put changes nothing.
    assert_eq!(s.latest_version("o", "n").await.unwrap(), 2);
    assert_eq!(s.get_credential("o", "n").await.unwrap().versions.len(), 2);
}

pub async fn racing_writers_exactly_one_wins(b: &dyn TestBackend) {
    let s = open(b).await;
    for round in 1..=5u32 {
        let mut tasks = Vec::new();
        for w in 0..16u32 {
            let s = Arc::clone(&s);
            tasks.push(tokio::spawn(async move {
                let mut nv = new_version("race", "cred", round);
                nv.sealed_value = test_value("race", &format!("writer{w}"), round, 64);
                (w, s.put_version(nv).await)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (w, r) = t.await.unwrap();
            match r {
                Ok(out) => {
                    assert_eq!(out.version, round);
                    winners.push(w);
                }
                Err(StoreError::Conflict { latest }) => assert_eq!(latest, round),
                Err(e) => panic!("unexpected error in a race: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let got = s.get_version("race", "cred", Some(round)).await.unwrap();
        let want = test_value("race", &format!("writer{}", winners[0]), round, 64);
        assert_eq!(got.sealed_value, want, "the winner's bytes are stored");
    }
    assert_eq!(
        s.get_credential("race", "cred")
            .await
            .unwrap()
            .versions
            .len(),
        5
    );
}

pub async fn expected_current_check_and_set(b: &dyn TestBackend) {
    let s = open(b).await;
    let mut nv = new_version("o", "n", 1);
    nv.expected_current = Some(0);
    s.put_version(nv.clone()).await.unwrap();

    let mut nv = new_version("o", "n", 2);
    nv.expected_current = Some(0);
    match s.put_version(nv).await {
        Err(StoreError::CurrentMismatch { current: Some(1) }) => {}
        other => panic!("expected CurrentMismatch(Some(1)), got {other:?}"),
    }
    let mut nv = new_version("o", "n", 2);
    nv.expected_current = Some(1);
    s.put_version(nv).await.unwrap();
    // The check compares the *current* version: after choosing v1, expecting 2 fails.
    s.set_current("o", "n", 1, t0()).await.unwrap();
    let mut nv = new_version("o", "n", 3);
    nv.expected_current = Some(2);
    match s.put_version(nv).await {
        Err(StoreError::CurrentMismatch { current: Some(1) }) => {}
        other => panic!("expected CurrentMismatch(Some(1)), got {other:?}"),
    }
    // The check is made before the version number.
    let mut nv = new_version("o", "n", 7);
    nv.expected_current = Some(5);
    match s.put_version(nv).await {
        Err(StoreError::CurrentMismatch { current: Some(1) }) => {}
        other => panic!("expected CurrentMismatch, got {other:?}"),
    }
    // None = no check.
    put(&*s, "o", "n", 3).await;
    // Some(0) on a credential that never existed succeeds; Some(1) fails with current None.
    let mut nv = new_version("o", "other", 1);
    nv.expected_current = Some(1);
    match s.put_version(nv).await {
        Err(StoreError::CurrentMismatch { current: None }) => {}
        other => panic!("expected CurrentMismatch(None), got {other:?}"),
    }
    assert_eq!(s.latest_version("o", "other").await.unwrap(), 0);
}

pub async fn racing_check_and_set_exactly_one_wins(b: &dyn TestBackend) {
    let s = open(b).await;
    put(&*s, "o", "n", 1).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            // Each writer read latest = 1 and current = 1, and races to make version 2.
            let mut nv = new_version("o", "n", 2);
            nv.expected_current = Some(1);
            s.put_version(nv).await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(StoreError::Conflict { latest: 2 })
            | Err(StoreError::CurrentMismatch { current: Some(2) }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(wins, 1);
}

pub async fn pagination_is_stable_and_owner_isolated(b: &dyn TestBackend) {
    let s = open(b).await;
    let mut want = BTreeSet::new();
    for i in 0..25u32 {
        let name = format!("svc{:02}.key", (i * 7) % 25);
        put(&*s, "alice", &name, 1).await;
        want.insert(name);
    }
    for i in 0..10u32 {
        put(&*s, "bob", &format!("svc{i:02}.key"), 1).await;
        put(&*s, "bob", &format!("bob-only{i}"), 1).await;
    }
    put(&*s, "alice2", "svc00.key", 1).await;
    put(&*s, "alic", "svc00.key", 1).await;

    let mut seen = Vec::new();
    let mut cursor: Option<Cursor> = None;
    let mut pages = 0;
    loop {
        let page = s
            .list_credentials("alice", cursor.as_ref(), 7)
            .await
            .unwrap();
        pages += 1;
        assert!(page.items.len() <= 7);
        for item in &page.items {
            assert_eq!(item.owner, "alice");
            assert_eq!(item.current_version, Some(1));
            assert_eq!(item.latest_version, 1);
            assert!(item.current_metadata.is_some());
            seen.push(item.name.clone());
        }
        if pages == 2 {
            // A credential created behind the cursor mid-listing is not listed twice, and
            // one ahead of it is listed once.
            put(&*s, "alice", "aaa.new", 1).await;
            put(&*s, "alice", "zzz.new", 1).await;
            want.insert("zzz.new".into());
        }
        // The cursor's text form round-trips.
        cursor = page.next.map(|c| Cursor::parse(c.as_str()).unwrap());
        if cursor.is_none() {
            break;
        }
        assert!(pages < 100, "pagination does not end");
    }
    let sorted: Vec<String> = want.iter().cloned().collect();
    assert_eq!(seen, sorted, "every name once, in byte order");

    // Bob's cursor is useless for reading Alice's credentials beyond her own.
    let bob_page = s.list_credentials("bob", None, 3).await.unwrap();
    let page = s
        .list_credentials("alice", bob_page.next.as_ref(), 1000)
        .await
        .unwrap();
    assert!(page.items.iter().all(|c| c.owner == "alice"));
    let all_bob = s.list_credentials("bob", None, 1000).await.unwrap();
    assert_eq!(all_bob.items.len(), 20);
    assert!(all_bob.next.is_none());
    assert!(s
        .list_credentials("nobody", None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
    // Exact fit: a full last page has no cursor.
    let page = s.list_credentials("alic", None, 1).await.unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.next.is_none());
    let page = s.list_credentials("bob", None, 10).await.unwrap();
    let page = s
        .list_credentials("bob", page.next.as_ref(), 10)
        .await
        .unwrap();
    assert_eq!((page.items.len(), page.next.is_none()), (10, true));
    // A rewrap cursor is not a list cursor.
    let bogus = Cursor::parse("r1.5").unwrap();
    assert_invalid(s.list_credentials("alice", Some(&bogus), 5).await);
    assert_invalid(s.list_credentials("alice", None, 0).await);
}

pub async fn get_credential_lists_versions_without_secrets(b: &dyn TestBackend) {
    let s = open(b).await;
    for v in 1..=3 {
        put(&*s, "o", "n", v).await;
    }
    s.destroy_version("o", "n", 2, t0() + Duration::hours(1))
        .await
        .unwrap();
    let c = s.get_credential("o", "n").await.unwrap();
    assert_eq!(c.summary.owner, "o");
    assert_eq!(c.summary.name, "n");
    assert!(c.summary.enabled);
    assert_eq!(c.summary.current_version, Some(3));
    assert_eq!(c.summary.latest_version, 3);
    assert_eq!(c.summary.created_at, t0() + Duration::seconds(1));
    assert_eq!(c.summary.updated_at, t0() + Duration::hours(1));
    assert_eq!(c.summary.last_used_at, None);
    assert_eq!(
        c.summary.current_metadata,
        Some(serde_json::json!({ "host": "api.example.com", "v": 3 }))
    );
    let versions: Vec<(u32, VersionState)> =
        c.versions.iter().map(|v| (v.version, v.state)).collect();
    assert_eq!(
        versions,
        vec![
            (3, VersionState::Active),
            (2, VersionState::Destroyed),
            (1, VersionState::Active)
        ]
    );
    assert_eq!(c.versions[1].destroyed_at, Some(t0() + Duration::hours(1)));
    assert_eq!(c.versions[0].destroyed_at, None);
    assert_eq!(c.versions[0].kek, kek(1));
    assert_eq!(c.versions[0].created_by, "user:test");
    assert_eq!(c.versions[2].metadata["v"], 1);
    // Debug output of what carries secret bytes shows their length only.
    let sealed = s.get_version("o", "n", None).await.unwrap();
    let text = format!("{sealed:?}");
    assert!(text.contains("100 bytes redacted"), "{text}");
    let secret = test_value("o", "n", 3, 100);
    let as_list = format!("{:?}", &secret[..4]);
    assert!(!text.contains(as_list.trim_end_matches(']')), "{text}");
}

pub async fn set_current_version(b: &dyn TestBackend) {
    let s = open(b).await;
    for v in 1..=3 {
        put(&*s, "o", "n", v).await;
    }
    s.set_current("o", "n", 1, t0() + Duration::hours(2))
        .await
        .unwrap();
    let cur = s.get_version("o", "n", None).await.unwrap();
    assert_eq!(cur.version, 1);
    assert!(cur.is_current);
    assert!(!s.get_version("o", "n", Some(3)).await.unwrap().is_current);
    let c = s.get_credential("o", "n").await.unwrap();
    assert_eq!(c.summary.current_version, Some(1));
    assert_eq!(c.summary.updated_at, t0() + Duration::hours(2));
    assert_eq!(c.summary.current_metadata.unwrap()["v"], 1);
    // The latest number is unchanged: the next put is still 4, and becomes current.
    assert_eq!(s.latest_version("o", "n").await.unwrap(), 3);
    s.destroy_version("o", "n", 2, t0()).await.unwrap();
    match s.set_current("o", "n", 2, t0()).await {
        Err(StoreError::VersionDestroyed) => {}
        other => panic!("expected VersionDestroyed, got {other:?}"),
    }
    assert_not_found(s.set_current("o", "n", 9, t0()).await);
    assert_not_found(s.set_current("o", "missing", 1, t0()).await);
    assert_not_found(s.set_current("other-owner", "n", 1, t0()).await);
    put(&*s, "o", "n", 4).await;
    assert_eq!(s.get_version("o", "n", None).await.unwrap().version, 4);
}

pub async fn disable_and_enable(b: &dyn TestBackend) {
    let s = open(b).await;
    put(&*s, "o", "n", 1).await;
    s.set_enabled("o", "n", false, t0() + Duration::hours(1))
        .await
        .unwrap();
    let c = s.get_credential("o", "n").await.unwrap();
    assert!(!c.summary.enabled);
    assert_eq!(c.summary.updated_at, t0() + Duration::hours(1));
    let list = s.list_credentials("o", None, 10).await.unwrap();
    assert!(!list.items[0].enabled);
    // Versions are kept, and the caller sees the switch on every read.
    let v = s.get_version("o", "n", None).await.unwrap();
    assert!(!v.credential_enabled);
    assert_eq!(v.sealed_value, test_value("o", "n", 1, 100));
    s.set_enabled("o", "n", true, t0()).await.unwrap();
    assert!(
        s.get_version("o", "n", None)
            .await
            .unwrap()
            .credential_enabled
    );
    assert_not_found(s.set_enabled("o", "missing", false, t0()).await);
}

pub async fn destroy_version_erases_bytes(b: &dyn TestBackend) {
    let s = open(b).await;
    for v in 1..=3 {
        put(&*s, "o", "n", v).await;
    }
    let before = b.raw_secret_columns("o", "n", 3).await.unwrap().unwrap();
    assert_eq!(before.0, test_value("o", "n", 3, 100));
    assert!(s.destroy_version("o", "n", 3, t0()).await.unwrap());
    let raw = b.raw_secret_columns("o", "n", 3).await.unwrap();
    assert_eq!(
        raw,
        Some((Vec::new(), Vec::new())),
        "the tombstone keeps no bytes"
    );
    match s.get_version("o", "n", Some(3)).await {
        Err(StoreError::VersionDestroyed) => {}
        other => panic!("expected VersionDestroyed, got {other:?}"),
    }
    // Destroying the current version makes the newest remaining active one current.
    assert_eq!(s.get_version("o", "n", None).await.unwrap().version, 2);
    assert!(
        !s.destroy_version("o", "n", 3, t0()).await.unwrap(),
        "idempotent"
    );
    // Destroying a non-current version leaves the current one alone.
    assert!(s.destroy_version("o", "n", 1, t0()).await.unwrap());
    assert_eq!(s.get_version("o", "n", None).await.unwrap().version, 2);
    assert!(s.destroy_version("o", "n", 2, t0()).await.unwrap());
    // No current version left: the credential is there, its versions are gone.
    match s.get_version("o", "n", None).await {
        Err(StoreError::VersionDestroyed) => {}
        other => panic!("expected VersionDestroyed, got {other:?}"),
    }
    let c = s.get_credential("o", "n").await.unwrap();
    assert_eq!(c.summary.current_version, None);
    assert!(c
        .versions
        .iter()
        .all(|v| v.state == VersionState::Destroyed));
    for v in 1..=3 {
        let raw = b.raw_secret_columns("o", "n", v).await.unwrap();
        assert_eq!(raw, Some((Vec::new(), Vec::new())));
    }
    assert_not_found(s.destroy_version("o", "n", 4, t0()).await);
    // The next put continues at 4 and becomes current; Some(0) matches "no current".
    let mut nv = new_version("o", "n", 4);
    nv.expected_current = Some(0);
    s.put_version(nv).await.unwrap();
    assert_eq!(s.get_version("o", "n", None).await.unwrap().version, 4);
}

pub async fn destroy_credential_continues_numbering(b: &dyn TestBackend) {
    let s = open(b).await;
    for v in 1..=3 {
        put(&*s, "o", "n", v).await;
    }
    put(&*s, "o", "keep", 1).await;
    s.set_enabled("o", "n", false, t0()).await.unwrap();
    s.touch_last_used("o", "n", t0()).await.unwrap();
    s.destroy_credential("o", "n", t0() + Duration::hours(1))
        .await
        .unwrap();
    for v in 1..=3 {
        let raw = b.raw_secret_columns("o", "n", v).await.unwrap();
        assert_eq!(raw, Some((Vec::new(), Vec::new())));
    }
    assert_not_found(s.get_credential("o", "n").await);
    assert_not_found(s.get_version("o", "n", Some(1)).await);
    assert_not_found(s.destroy_credential("o", "n", t0()).await);
    assert_not_found(s.set_enabled("o", "n", true, t0()).await);
    let list = s.list_credentials("o", None, 10).await.unwrap();
    let names: Vec<&str> = list.items.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, vec!["keep"]);
    // Numbering continues: version numbers are never reused.
    assert_eq!(s.latest_version("o", "n").await.unwrap(), 3);
    assert_conflict(s.put_version(new_version("o", "n", 1)).await, 3);
    let mut nv = new_version("o", "n", 4);
    nv.expected_current = Some(0);
    s.put_version(nv).await.unwrap();
    let c = s.get_credential("o", "n").await.unwrap();
    assert!(c.summary.enabled, "a re-created credential starts enabled");
    assert_eq!(c.summary.current_version, Some(4));
    assert_eq!(c.summary.last_used_at, None);
    assert_eq!(c.summary.created_at, t0() + Duration::seconds(4));
    assert_eq!(c.versions.len(), 4);
    assert_eq!(
        s.get_version("o", "n", None).await.unwrap().sealed_value,
        test_value("o", "n", 4, 100)
    );
    // Nothing of the destroyed credential shows through the new one: its versions are
    // tombstones without their metadata (labels, hosts).
    for v in &c.versions {
        if v.version == 4 {
            assert_eq!(v.metadata["v"], 4);
        } else {
            assert_eq!(v.state, VersionState::Destroyed, "{v:?}");
            assert_eq!(v.metadata, serde_json::json!({}), "{v:?}");
        }
    }
}

pub async fn retention_destroys_oldest_first(b: &dyn TestBackend) {
    let s = open(b).await;
    let mut retired = Vec::new();
    for v in 1..=5 {
        let mut nv = new_version("o", "n", v);
        nv.max_versions = 3;
        retired.extend(s.put_version(nv).await.unwrap().retired);
    }
    assert_eq!(retired, vec![1, 2]);
    for v in [1, 2] {
        assert_eq!(
            b.raw_secret_columns("o", "n", v).await.unwrap(),
            Some((Vec::new(), Vec::new()))
        );
    }
    // The current version is never the one retired: pick v3, then put v6 with max 2.
    s.set_current("o", "n", 3, t0()).await.unwrap();
    let mut nv = new_version("o", "n", 6);
    nv.max_versions = 2;
    let out = s.put_version(nv).await.unwrap();
    assert_eq!(out.retired, vec![3, 4]);
    let active: Vec<u32> = s
        .get_credential("o", "n")
        .await
        .unwrap()
        .versions
        .iter()
        .filter(|v| v.state == VersionState::Active)
        .map(|v| v.version)
        .collect();
    assert_eq!(active, vec![6, 5]);
    // Default retention keeps 10.
    for v in 1..=12 {
        put(&*s, "o", "default", v).await;
    }
    let c = s.get_credential("o", "default").await.unwrap();
    let active = c
        .versions
        .iter()
        .filter(|v| v.state == VersionState::Active)
        .count();
    assert_eq!(active, crate::DEFAULT_MAX_VERSIONS as usize);
    assert_eq!(c.versions.last().unwrap().state, VersionState::Destroyed);
    // max_versions = 1 keeps just the new one.
    let mut nv = new_version("o", "default", 13);
    nv.max_versions = 1;
    assert_eq!(
        s.put_version(nv).await.unwrap().retired,
        (3..=12).collect::<Vec<u32>>()
    );
}

/// A put deletes the rows of destroyed versions more than `keep_destroyed` numbers behind
/// it, whoever destroyed them (retention, the owner, a whole destroy), in the same
/// transaction, and never an active version; numbers are still never reused.
pub async fn tombstones_beyond_the_window_are_deleted(b: &dyn TestBackend) {
    let s = open(b).await;
    let put_with = |version: u32, max_versions: u32, keep_destroyed: u32| {
        let mut nv = new_version("o", "n", version);
        nv.max_versions = max_versions;
        nv.keep_destroyed = keep_destroyed;
        nv
    };
    let listed = |c: &crate::Credential| -> Vec<(u32, VersionState)> {
        c.versions.iter().map(|v| (v.version, v.state)).collect()
    };
    use VersionState::{Active, Destroyed};
    // Retention destroys 1, 2, 3; the window of 2 behind v5 keeps 3 only.
    for v in 1..=5 {
        s.put_version(put_with(v, 2, 2)).await.unwrap();
    }
    let c = s.get_credential("o", "n").await.unwrap();
    assert_eq!(listed(&c), [(5, Active), (4, Active), (3, Destroyed)]);
    assert!(matches!(
        s.get_version("o", "n", Some(3)).await,
        Err(StoreError::VersionDestroyed)
    ));
    for gone in [1, 2] {
        assert_eq!(b.raw_secret_columns("o", "n", gone).await.unwrap(), None);
        assert_not_found(s.get_version("o", "n", Some(gone)).await);
        assert_not_found(s.destroy_version("o", "n", gone, t0()).await);
        assert_not_found(s.set_current("o", "n", gone, t0()).await);
    }
    let page = s.get_credential_page("o", "n", None, 10).await.unwrap();
    assert_eq!(page.versions.len(), 3);
    assert_eq!(s.latest_version("o", "n").await.unwrap(), 5);
    assert_conflict(s.put_version(new_version("o", "n", 1)).await, 5);

    // Active versions stay however old; a version the owner destroyed goes at the next put
    // past its window, and one retired by this very put counts too (window 0).
    s.put_version(put_with(6, 10, 100)).await.unwrap();
    assert!(s.destroy_version("o", "n", 5, t0()).await.unwrap());
    let out = s.put_version(put_with(7, 3, 0)).await.unwrap();
    assert_eq!(out.retired, Vec::<u32>::new(), "7, 6 and 4 fit in 3");
    let c = s.get_credential("o", "n").await.unwrap();
    assert_eq!(listed(&c), [(7, Active), (6, Active), (4, Active)]);
    let out = s.put_version(put_with(8, 2, 0)).await.unwrap();
    assert_eq!(out.retired, vec![4, 6]);
    let c = s.get_credential("o", "n").await.unwrap();
    assert_eq!(listed(&c), [(8, Active), (7, Active)]);
    for gone in [3, 4, 5, 6] {
        assert_eq!(b.raw_secret_columns("o", "n", gone).await.unwrap(), None);
    }

    // A credential destroyed as a whole keeps its tombstones (no put runs) until it is
    // created again; the re-creating put trims them like any other.
    s.destroy_credential("o", "n", t0()).await.unwrap();
    assert_eq!(
        b.raw_secret_columns("o", "n", 8).await.unwrap(),
        Some((Vec::new(), Vec::new()))
    );
    s.put_version(put_with(9, 10, 1)).await.unwrap();
    let c = s.get_credential("o", "n").await.unwrap();
    assert_eq!(listed(&c), [(9, Active), (8, Destroyed)]);
    assert_eq!(c.summary.current_version, Some(9));

    // Another credential of the same owner, and the same name of another owner, are not
    // touched by these puts.
    for v in 1..=3 {
        let mut nv = new_version("o", "other", v);
        nv.max_versions = 1;
        s.put_version(nv).await.unwrap();
        let mut nv = new_version("p", "n", v);
        nv.max_versions = 1;
        s.put_version(nv).await.unwrap();
    }
    s.put_version(put_with(10, 1, 0)).await.unwrap();
    for (owner, name) in [("o", "other"), ("p", "n")] {
        let c = s.get_credential(owner, name).await.unwrap();
        assert_eq!(c.versions.len(), 3, "{owner}/{name}: {:?}", listed(&c));
    }
    let c = s.get_credential("o", "n").await.unwrap();
    assert_eq!(listed(&c), [(10, Active)]);

    // A backlog (tombstones kept by an older release, or under a larger window) goes at most
    // TRIM_TOMBSTONES_PER_PUT a put, oldest first, so no put holds the store for long.
    let per_put = crate::TRIM_TOMBSTONES_PER_PUT;
    let backlog = |version: u32, keep_destroyed: u32| {
        let mut nv = new_version("o", "backlog", version);
        nv.max_versions = 1;
        nv.keep_destroyed = keep_destroyed;
        nv
    };
    let n = per_put + 44;
    for v in 1..=n {
        s.put_version(backlog(v, 100_000)).await.unwrap();
    }
    s.put_version(backlog(n + 1, 0)).await.unwrap();
    let c = s.get_credential("o", "backlog").await.unwrap();
    assert_eq!(
        c.versions.len(),
        45,
        "the newest, and 44 tombstones left over"
    );
    assert_eq!(c.versions.last().unwrap().version, per_put + 1);
    assert_eq!(
        b.raw_secret_columns("o", "backlog", per_put).await.unwrap(),
        None
    );
    s.put_version(backlog(n + 2, 0)).await.unwrap();
    let c = s.get_credential("o", "backlog").await.unwrap();
    assert_eq!(listed(&c), [(n + 2, Active)]);

    // The default keeps DEFAULT_KEEP_DESTROYED numbers of history.
    let n = crate::DEFAULT_KEEP_DESTROYED + 5;
    for v in 1..=n {
        put(&*s, "o", "default", v).await;
    }
    let c = s.get_credential("o", "default").await.unwrap();
    assert_eq!(c.versions.len(), crate::DEFAULT_KEEP_DESTROYED as usize + 1);
    assert_eq!(c.versions.last().unwrap().version, 5);
    assert_eq!(c.versions.last().unwrap().state, Destroyed);
}

pub async fn rewrap_iteration_and_compare_and_swap(b: &dyn TestBackend) {
    let s = open(b).await;
    let (a1, a2, b1) = (kek(1), kek(2), KekRef::new("transit", "k9", 1));
    let mut all = BTreeSet::new();
    for i in 0..25u32 {
        let (name, k) = match i % 5 {
            0..=2 => (format!("a1-{i}"), &a1),
            3 => (format!("a2-{i}"), &a2),
            _ => (format!("b1-{i}"), &b1),
        };
        let mut nv = new_version(&format!("owner{}", i % 3), &name, 1);
        nv.kek = k.clone();
        s.put_version(nv).await.unwrap();
        all.insert((format!("owner{}", i % 3), name));
    }
    let collect = |filter: KekFilter, limit: u32| {
        let s = Arc::clone(&s);
        async move {
            let mut out = Vec::new();
            let mut cursor: Option<Cursor> = None;
            loop {
                let page = s
                    .versions_for_rewrap(&filter, cursor.as_ref(), limit)
                    .await
                    .unwrap();
                assert!(page.items.len() <= limit as usize);
                out.extend(page.items);
                match page.next {
                    Some(c) => cursor = Some(Cursor::parse(c.as_str()).unwrap()),
                    None => break,
                }
            }
            out
        }
    };
    let not_a2 = collect(KekFilter::Not(a2.clone()), 4).await;
    assert_eq!(not_a2.len(), 20);
    assert!(not_a2.iter().all(|i| i.kek != a2));
    let distinct: BTreeSet<_> = not_a2
        .iter()
        .map(|i| (i.owner.clone(), i.name.clone()))
        .collect();
    assert_eq!(distinct.len(), 20, "no item twice");
    let it = &not_a2[0];
    assert_eq!(it.wrapped_key, test_value(&it.name, &it.owner, 1, 40));
    assert_eq!(
        collect(KekFilter::Exactly(a1.clone()), 1000).await.len(),
        15
    );
    let any_local = collect(
        KekFilter::AnyVersionOf {
            provider: "local".into(),
            key_id: "k1".into(),
        },
        7,
    )
    .await;
    assert_eq!(any_local.len(), 20);

    // Rewrap everything that is not under a2, with compare-and-swap.
    for item in &not_a2 {
        let new_wrapped = test_value("rewrapped", &item.name, 1, 48);
        let ok = s
            .replace_wrapped_key(
                &item.owner,
                &item.name,
                item.version,
                &item.kek,
                &[7; 48],
                vec![2],
                &a2,
            )
            .await
            .unwrap();
        assert!(!ok, "swapped a key the version does not hold");
        let ok = s
            .replace_wrapped_key(
                &item.owner,
                &item.name,
                item.version,
                &item.kek,
                &item.wrapped_key,
                new_wrapped,
                &a2,
            )
            .await
            .unwrap();
        assert!(ok);
        // A second swap from the old KEK fails: it changed meanwhile.
        let again = s
            .replace_wrapped_key(
                &item.owner,
                &item.name,
                item.version,
                &item.kek,
                &item.wrapped_key,
                vec![1],
                &a2,
            )
            .await
            .unwrap();
        assert!(!again);
    }
    assert!(collect(KekFilter::Not(a2.clone()), 10).await.is_empty());
    let got = s
        .get_version(&not_a2[0].owner, &not_a2[0].name, Some(1))
        .await
        .unwrap();
    assert_eq!(got.kek, a2);
    assert_eq!(
        got.wrapped_key,
        test_value("rewrapped", &not_a2[0].name, 1, 48)
    );
    assert_eq!(
        got.sealed_value,
        test_value(&not_a2[0].owner, &not_a2[0].name, 1, 100)
    );
    // Destroyed or missing versions are never swapped.
    let (o, n) = all.iter().next().unwrap();
    s.destroy_version(o, n, 1, t0()).await.unwrap();
    assert!(!s
        .replace_wrapped_key(o, n, 1, &a2, &[], vec![1], &a1)
        .await
        .unwrap());
    assert!(!s
        .replace_wrapped_key("ghost", "n", 1, &a2, &[], vec![1], &a1)
        .await
        .unwrap());
    assert_eq!(
        b.raw_secret_columns(o, n, 1).await.unwrap(),
        Some((Vec::new(), Vec::new()))
    );
    assert_eq!(collect(KekFilter::Exactly(a2.clone()), 3).await.len(), 24);
    let bad = Cursor::parse("c1.61").unwrap();
    assert_invalid(
        s.versions_for_rewrap(&KekFilter::Not(a2), Some(&bad), 5)
            .await,
    );
}

pub async fn counts_by_kek_cover_active_versions_only(b: &dyn TestBackend) {
    let s = open(b).await;
    assert!(s.count_versions_by_kek().await.unwrap().is_empty());
    let (a1, a2) = (kek(1), kek(2));
    for v in 1..=4 {
        let mut nv = new_version("o", "n", v);
        nv.kek = if v <= 3 { a1.clone() } else { a2.clone() };
        s.put_version(nv).await.unwrap();
    }
    put(&*s, "p", "m", 1).await; // a1
    s.destroy_version("o", "n", 1, t0()).await.unwrap();
    assert_eq!(
        s.count_versions_by_kek().await.unwrap(),
        vec![(a1.clone(), 3), (a2.clone(), 1)]
    );
    s.destroy_credential("o", "n", t0()).await.unwrap();
    assert_eq!(s.count_versions_by_kek().await.unwrap(), vec![(a1, 1)]);
}

pub async fn schema_too_new_is_refused(b: &dyn TestBackend) {
    {
        let s = open(b).await;
        put(&*s, "o", "n", 1).await;
    }
    b.set_schema_version(SCHEMA_VERSION + 1).await.unwrap();
    match b.open().await {
        Err(e @ StoreError::SchemaTooNew { found, supported }) => {
            assert_eq!(found, SCHEMA_VERSION + 1);
            assert_eq!(supported, SCHEMA_VERSION);
            assert!(e.to_string().contains("refusing"), "{e}");
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    b.set_schema_version(SCHEMA_VERSION).await.unwrap();
    let s = open(b).await;
    assert_eq!(s.latest_version("o", "n").await.unwrap(), 1);
}

pub async fn reopen_keeps_everything(b: &dyn TestBackend) {
    {
        let s = open(b).await;
        put(&*s, "o", "n", 1).await;
        put(&*s, "o", "n", 2).await;
        s.put_provider_state("local/keyring", b"state".to_vec())
            .await
            .unwrap();
    }
    // Opening again (migrations already applied) sees every write.
    let s = open(b).await;
    let again = open(b).await;
    assert_eq!(s.get_version("o", "n", None).await.unwrap().version, 2);
    assert_eq!(
        again.get_provider_state("local/keyring").await.unwrap(),
        Some(b"state".to_vec())
    );
    put(&*again, "o", "n", 3).await;
    assert_eq!(s.latest_version("o", "n").await.unwrap(), 3);
}

pub async fn unicode_and_long_owner_ids(b: &dyn TestBackend) {
    let s = open(b).await;
    // 255 bytes of multi-byte UTF-8: 85 three-byte characters.
    let long_owner: String = "€".repeat(85);
    assert_eq!(long_owner.len(), MAX_OWNER_LEN);
    let owners = [
        long_owner.clone(),
        "user@example.com".to_owned(),
        "ü𝄞 with spaces/and%slashes".to_owned(),
        "o'quote\"; DROP TABLE credentials; --".to_owned(),
        "a".to_owned(),
    ];
    for owner in &owners {
        put(&*s, owner, "zoom.api-key", 1).await;
        let got = s.get_version(owner, "zoom.api-key", None).await.unwrap();
        assert_eq!(&got.owner, owner);
        assert_eq!(got.sealed_value, test_value(owner, "zoom.api-key", 1, 100));
        let list = s.list_credentials(owner, None, 10).await.unwrap();
        assert_eq!(list.items.len(), 1, "owner {owner:?} sees only their own");
    }
    let too_long = format!("{long_owner}x");
    assert_invalid(s.put_version(new_version(&too_long, "n", 1)).await);
    assert_invalid(s.list_credentials(&too_long, None, 10).await);
    assert_invalid(s.put_version(new_version("", "n", 1)).await);
    assert_invalid(s.get_credential("", "n").await);
    // Names in byte order, including non-ASCII (the caller restricts the grammar).
    for name in ["b", "a", "é", "z", "ab"] {
        put(&*s, "names", name, 1).await;
    }
    let list = s.list_credentials("names", None, 2).await.unwrap();
    let mut names: Vec<String> = list.items.iter().map(|c| c.name.clone()).collect();
    let rest = s
        .list_credentials("names", list.next.as_ref(), 10)
        .await
        .unwrap();
    names.extend(rest.items.iter().map(|c| c.name.clone()));
    assert_eq!(names, vec!["a", "ab", "b", "z", "é"]);
}

pub async fn values_of_64_kib_round_trip(b: &dyn TestBackend) {
    let s = open(b).await;
    for (i, len) in [0usize, 1, 64 * 1024, 64 * 1024 + 200, MAX_SEALED_LEN]
        .into_iter()
        .enumerate()
    {
        let name = format!("big{i}");
        let mut nv = new_version("o", &name, 1);
        nv.sealed_value = test_value("o", &name, 1, len);
        s.put_version(nv).await.unwrap();
        let got = s.get_version("o", &name, None).await.unwrap();
        assert_eq!(got.sealed_value.len(), len);
        assert!(
            got.sealed_value == test_value("o", &name, 1, len),
            "bytes differ at len {len}"
        );
    }
    let mut nv = new_version("o", "too-big", 1);
    nv.sealed_value = vec![0; MAX_SEALED_LEN + 1];
    assert_invalid(s.put_version(nv).await);
    // Destroying a large value leaves no bytes.
    s.destroy_version("o", "big2", 1, t0()).await.unwrap();
    assert_eq!(
        b.raw_secret_columns("o", "big2", 1).await.unwrap(),
        Some((Vec::new(), Vec::new()))
    );
}

/// Uses reported out of order (nodes a few seconds apart) keep the latest; a time far
/// ahead of a use (written under a clock that ran ahead) does not hide the uses after it.
pub async fn touch_last_used_keeps_the_latest_but_not_a_clock_far_ahead(b: &dyn TestBackend) {
    let s = open(b).await;
    put(&*s, "o", "n", 1).await;
    let last_used = async || {
        s.get_credential("o", "n")
            .await
            .unwrap()
            .summary
            .last_used_at
    };
    let at = t0() + Duration::hours(1);
    s.touch_last_used("o", "n", at + Duration::seconds(30))
        .await
        .unwrap();
    s.touch_last_used("o", "n", at).await.unwrap();
    assert_eq!(last_used().await, Some(at + Duration::seconds(30)));
    // Five minutes ahead still counts as a node's clock; past that, the use replaces it.
    let at = at + Duration::seconds(30) - Duration::minutes(5);
    s.touch_last_used("o", "n", at).await.unwrap();
    assert_eq!(last_used().await, Some(at + Duration::minutes(5)));
    s.touch_last_used("o", "n", t0() + Duration::days(365))
        .await
        .unwrap();
    s.touch_last_used("o", "n", t0() + Duration::hours(2))
        .await
        .unwrap();
    assert_eq!(last_used().await, Some(t0() + Duration::hours(2)));
    let c = s.get_credential("o", "n").await.unwrap();
    // Using a value is not a change of the credential.
    assert_eq!(c.summary.updated_at, t0() + Duration::seconds(1));
    assert_not_found(s.touch_last_used("o", "missing", t0()).await);
}

pub async fn provider_state_round_trips(b: &dyn TestBackend) {
    let s = open(b).await;
    assert_eq!(s.get_provider_state("aws-kms/cache").await.unwrap(), None);
    s.put_provider_state("aws-kms/cache", vec![1, 2, 3])
        .await
        .unwrap();
    s.put_provider_state("local/keyring", vec![9; 100_000])
        .await
        .unwrap();
    assert_eq!(
        s.get_provider_state("aws-kms/cache").await.unwrap(),
        Some(vec![1, 2, 3])
    );
    s.put_provider_state("aws-kms/cache", Vec::new())
        .await
        .unwrap();
    assert_eq!(
        s.get_provider_state("aws-kms/cache").await.unwrap(),
        Some(Vec::new())
    );
    assert_eq!(
        s.get_provider_state("local/keyring").await.unwrap(),
        Some(vec![9; 100_000])
    );
    assert_invalid(s.put_provider_state("", vec![1]).await);
    assert_invalid(s.get_provider_state(&"k".repeat(256)).await);
}

pub async fn provider_state_compare_and_swap(b: &dyn TestBackend) {
    let s = open(b).await;
    let k = "kek/ring";
    assert!(s
        .swap_provider_state(k, None, b"one".to_vec())
        .await
        .unwrap());
    // Not absent any more, and a stale expectation loses.
    assert!(!s
        .swap_provider_state(k, None, b"two".to_vec())
        .await
        .unwrap());
    assert!(!s
        .swap_provider_state(k, Some(b"zero"), b"two".to_vec())
        .await
        .unwrap());
    assert_eq!(
        s.get_provider_state(k).await.unwrap(),
        Some(b"one".to_vec())
    );
    assert!(s
        .swap_provider_state(k, Some(b"one"), b"two".to_vec())
        .await
        .unwrap());
    assert_eq!(
        s.get_provider_state(k).await.unwrap(),
        Some(b"two".to_vec())
    );

    // Racing swaps from one starting value: exactly one wins.
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.swap_provider_state(k, Some(b"two"), vec![i]).await })
        })
        .collect();
    let mut wins = Vec::new();
    for t in tasks {
        wins.push(t.await.unwrap().unwrap());
    }
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{wins:?}");
    let winner = wins.iter().position(|w| *w).unwrap() as u8;
    assert_eq!(s.get_provider_state(k).await.unwrap(), Some(vec![winner]));
    assert_invalid(s.swap_provider_state("", None, vec![1]).await);
}

pub async fn missing_credentials_are_not_found(b: &dyn TestBackend) {
    let s = open(b).await;
    put(&*s, "alice", "n", 1).await;
    // Another owner's credential looks exactly like a missing one.
    for owner in ["bob", "alice "] {
        assert_not_found(s.get_credential(owner, "n").await);
        assert_not_found(s.get_version(owner, "n", None).await);
        assert_not_found(s.get_version(owner, "n", Some(1)).await);
        assert_not_found(s.set_current(owner, "n", 1, t0()).await);
        assert_not_found(s.set_enabled(owner, "n", false, t0()).await);
        assert_not_found(s.destroy_version(owner, "n", 1, t0()).await);
        assert_not_found(s.destroy_credential(owner, "n", t0()).await);
        assert_not_found(s.touch_last_used(owner, "n", t0()).await);
        assert_eq!(s.latest_version(owner, "n").await.unwrap(), 0);
        assert!(!s
            .replace_wrapped_key(owner, "n", 1, &kek(1), &[], vec![1], &kek(2))
            .await
            .unwrap());
    }
    // Nothing of Alice's changed.
    let v = s.get_version("alice", "n", None).await.unwrap();
    assert!(v.credential_enabled);
    assert_eq!(v.kek, kek(1));
}

pub async fn invalid_input_is_rejected(b: &dyn TestBackend) {
    let s = open(b).await;
    assert_invalid(s.put_version(new_version("o", "n", 0)).await);
    let mut nv = new_version("o", "n", 1);
    nv.max_versions = 0;
    assert_invalid(s.put_version(nv).await);
    assert_invalid(s.put_version(new_version("o", "", 1)).await);
    assert_invalid(s.put_version(new_version("o", &"n".repeat(129), 1)).await);
    let mut nv = new_version("o", "n", 1);
    nv.kek = KekRef::new("", "k", 1);
    assert_invalid(s.put_version(nv).await);
    let mut nv = new_version("o", "n", 1);
    nv.wrapped_key = vec![0; crate::MAX_WRAPPED_KEY_LEN + 1];
    assert_invalid(s.put_version(nv).await);
    assert_invalid(s.get_version("o", "n", Some(0)).await);
    assert_invalid(s.set_current("o", "n", 0, t0()).await);
    assert_invalid(
        s.versions_for_rewrap(&KekFilter::Not(kek(1)), None, 0)
            .await,
    );
    // Nothing was written.
    assert_eq!(s.latest_version("o", "n").await.unwrap(), 0);
}

/// The reference model of one credential for [`random_operations_match_a_model`].
#[derive(Debug, Clone, Default)]
struct ModelCred {
    latest: u32,
    current: Option<u32>,
    enabled: bool,
    deleted: bool,
    /// version -> active?
    versions: std::collections::BTreeMap<u32, bool>,
}

impl ModelCred {
    fn live(&self) -> bool {
        self.latest > 0 && !self.deleted
    }
}

/// What an operation returned, reduced to what the model predicts.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Retired(Vec<u32>),
    Bool(bool),
    NotFound,
    Conflict(u32),
    Mismatch(Option<u32>),
    Destroyed,
}

fn outcome<T>(r: Result<T, StoreError>, ok: impl FnOnce(T) -> Outcome) -> Outcome {
    match r {
        Ok(v) => ok(v),
        Err(StoreError::NotFound) => Outcome::NotFound,
        Err(StoreError::Conflict { latest }) => Outcome::Conflict(latest),
        Err(StoreError::CurrentMismatch { current }) => Outcome::Mismatch(current),
        Err(StoreError::VersionDestroyed) => Outcome::Destroyed,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Seeded random sequences of puts (right and wrong version numbers, check-and-set,
/// retention), current-version changes, enable/disable and destroys, checked after every
/// step against a reference model: outcomes, and the credential as `get_credential` and
/// `get_version` report it.
pub async fn random_operations_match_a_model(b: &dyn TestBackend) {
    let s = open(b).await;
    let mut rng: u64 = 0x5eed_0f5e_ed00_0001;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let keys = [("a", "x"), ("a", "y"), ("b", "x")];
    let mut model: Vec<ModelCred> = vec![ModelCred::default(); keys.len()];
    for step in 0..400 {
        let k = next(keys.len() as u64) as usize;
        let (owner, name) = keys[k];
        let m = &mut model[k];
        let current = if m.live() { m.current } else { None };
        let (got, want) = match next(10) {
            0..=4 => {
                let version = match next(6) {
                    0 => m.latest,
                    1 => m.latest + 2,
                    _ => m.latest + 1,
                }
                .max(1);
                let expected = match next(4) {
                    0 => Some(current.unwrap_or(0)),
                    1 => Some(current.unwrap_or(0) + 1),
                    _ => None,
                };
                let max_versions = 1 + next(4) as u32;
                let keep_destroyed = [0, 1, 3, 8, 100][next(5) as usize];
                let mut nv = new_version(owner, name, version);
                nv.expected_current = expected;
                nv.max_versions = max_versions;
                nv.keep_destroyed = keep_destroyed;
                let got = outcome(s.put_version(nv).await, |o| Outcome::Retired(o.retired));
                let want = if expected.is_some_and(|e| e != current.unwrap_or(0)) {
                    Outcome::Mismatch(current)
                } else if version != m.latest + 1 {
                    Outcome::Conflict(m.latest)
                } else {
                    if m.deleted {
                        m.enabled = true;
                    }
                    if m.latest == 0 {
                        m.enabled = true;
                    }
                    m.deleted = false;
                    m.latest = version;
                    m.current = Some(version);
                    m.versions.insert(version, true);
                    let others: Vec<u32> = m
                        .versions
                        .iter()
                        .rev()
                        .filter(|(v, active)| **active && **v != version)
                        .map(|(v, _)| *v)
                        .collect();
                    let mut retired: Vec<u32> =
                        others.into_iter().skip(max_versions as usize - 1).collect();
                    retired.sort_unstable();
                    for v in &retired {
                        m.versions.insert(*v, false);
                    }
                    m.versions
                        .retain(|v, active| *active || *v + keep_destroyed >= version);
                    Outcome::Retired(retired)
                };
                (got, want)
            }
            5 => {
                let v = 1 + next(u64::from(m.latest) + 1) as u32;
                let got = outcome(s.set_current(owner, name, v, t0()).await, |_| Outcome::Ok);
                let want = if !m.live() {
                    Outcome::NotFound
                } else {
                    match m.versions.get(&v) {
                        None => Outcome::NotFound,
                        Some(false) => Outcome::Destroyed,
                        Some(true) => {
                            m.current = Some(v);
                            Outcome::Ok
                        }
                    }
                };
                (got, want)
            }
            6 => {
                let on = next(2) == 0;
                let got = outcome(s.set_enabled(owner, name, on, t0()).await, |_| Outcome::Ok);
                let want = if m.live() {
                    m.enabled = on;
                    Outcome::Ok
                } else {
                    Outcome::NotFound
                };
                (got, want)
            }
            7 | 8 => {
                let v = 1 + next(u64::from(m.latest) + 1) as u32;
                let got = outcome(s.destroy_version(owner, name, v, t0()).await, Outcome::Bool);
                let want = if !m.live() {
                    Outcome::NotFound
                } else {
                    match m.versions.get(&v).copied() {
                        None => Outcome::NotFound,
                        Some(false) => Outcome::Bool(false),
                        Some(true) => {
                            m.versions.insert(v, false);
                            if m.current == Some(v) {
                                m.current =
                                    m.versions.iter().rev().find(|(_, a)| **a).map(|(v, _)| *v);
                            }
                            Outcome::Bool(true)
                        }
                    }
                };
                (got, want)
            }
            _ => {
                let got = outcome(s.destroy_credential(owner, name, t0()).await, |_| {
                    Outcome::Ok
                });
                let want = if m.live() {
                    m.deleted = true;
                    m.current = None;
                    for active in m.versions.values_mut() {
                        *active = false;
                    }
                    Outcome::Ok
                } else {
                    Outcome::NotFound
                };
                (got, want)
            }
        };
        assert_eq!(got, want, "step {step} on {owner}/{name}, model {m:?}");

        // The store's view of the credential matches the model.
        assert_eq!(s.latest_version(owner, name).await.unwrap(), m.latest);
        match s.get_credential(owner, name).await {
            Ok(c) => {
                assert!(
                    m.live(),
                    "step {step}: store has a credential the model lacks"
                );
                assert_eq!(c.summary.current_version, m.current, "step {step}");
                assert_eq!(c.summary.latest_version, m.latest, "step {step}");
                assert_eq!(c.summary.enabled, m.enabled, "step {step}");
                let states: Vec<(u32, bool)> = c
                    .versions
                    .iter()
                    .rev()
                    .map(|v| (v.version, v.state == VersionState::Active))
                    .collect();
                let want: Vec<(u32, bool)> = m.versions.iter().map(|(v, a)| (*v, *a)).collect();
                assert_eq!(states, want, "step {step}");
            }
            Err(StoreError::NotFound) => assert!(!m.live(), "step {step}: credential lost"),
            Err(e) => panic!("get_credential: {e}"),
        }
        match (
            s.get_version(owner, name, None).await,
            m.live().then_some(m.current).flatten(),
        ) {
            (Ok(v), Some(cur)) => {
                assert_eq!(v.version, cur);
                assert_eq!(v.sealed_value, test_value(owner, name, cur, 100));
            }
            (Err(StoreError::NotFound), None) if !m.live() => {}
            // A live credential without a current version: every version was destroyed.
            (Err(StoreError::VersionDestroyed), None) if m.live() => {}
            (got, want) => panic!("step {step}: current {want:?}, store says {got:?}"),
        }
    }
    // Destroyed versions hold no bytes, and the tombstones trimmed away have no row.
    let mut trimmed = 0;
    for (k, m) in model.iter().enumerate() {
        let (owner, name) = keys[k];
        for v in 1..=m.latest {
            let raw = b.raw_secret_columns(owner, name, v).await.unwrap();
            match (m.versions.get(&v), raw) {
                (Some(active), Some(raw)) => {
                    assert_eq!(raw.0.is_empty(), !active, "{owner}/{name} v{v}");
                    assert_eq!(raw.1.is_empty(), !active, "{owner}/{name} v{v}");
                }
                (None, None) => trimmed += 1,
                (want, got) => panic!("{owner}/{name} v{v}: model {want:?}, row {got:?}"),
            }
        }
    }
    assert!(trimmed > 0, "the walk never trimmed a tombstone");
}

// ---- the audit log -----------------------------------------------------------------------

/// A small deterministic generator of numbers below `n` (xorshift; no dependency on a seeded
/// RNG's stream, so a test's sequence never changes under it).
fn xorshift(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut state = seed;
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    }
}

/// An audit event for the suite.
pub fn audit_event(i: u64, owner: &str, name: &str, action: &str) -> crate::audit::Event {
    crate::audit::Event {
        // Sub-millisecond precision is cut by the store; the chain covers the stored time.
        time: t0() + Duration::nanoseconds(i as i64 * 1_000_123),
        principal_kind: "service".into(),
        principal_id: format!("svc-{}", i % 3),
        action: action.into(),
        owner: Some(owner.into()),
        name: Some(name.into()),
        version: Some((i % 7) as u32 + 1),
        outcome: "ok".into(),
        status: 200,
        request_id: Some(format!("req-{i}")),
        client_addr: Some("127.0.0.1:4000".into()),
        on_behalf_of: i.is_multiple_of(2).then(|| owner.to_owned()),
        destination: None,
        error_code: None,
    }
}

fn audit_log(s: &dyn Store) -> Arc<dyn crate::AuditLog> {
    s.audit_log().expect("backend keeps an audit log")
}

/// Reads the whole log back (from the anchor on, if any) and verifies it against the head.
pub async fn audit_verify_all(
    log: &dyn crate::AuditLog,
    key: &crate::audit::HeadKey,
) -> Result<u64, crate::audit::VerifyError> {
    // After the anchor, once its MAC verifies (records before it may await removal).
    let mut v = match log.audit_anchor().await.unwrap() {
        None => crate::audit::Verifier::new(),
        Some(a) if key.check_anchor(&a) => crate::audit::Verifier::after(a.seq, a.hash),
        Some(_) => return Err(crate::audit::VerifyError::AnchorMac),
    };
    loop {
        let batch = log.audit_scan(v.count(), 1000).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for r in &batch {
            v.push(r)?;
        }
    }
    match log.audit_head().await.unwrap() {
        Some(head) => v.finish(&head, key),
        None if v.count() == 0 => Ok(0),
        None => Err(crate::audit::VerifyError::Length {
            found: v.count(),
            head: 0,
        }),
    }
}

/// A head key, with the empty log's head sealed by it (as the server does at start).
async fn sealed_key(log: &dyn crate::AuditLog, byte: u8) -> Arc<crate::audit::HeadKey> {
    let key = Arc::new(crate::audit::HeadKey::new([byte; 32]));
    log.audit_seal_genesis(key.head(0, crate::audit::GENESIS))
        .await
        .unwrap();
    key
}

pub async fn audit_append_chains_and_verifies(b: &dyn TestBackend) {
    let s = open(b).await;
    let log = audit_log(&*s);
    assert_eq!(log.audit_head().await.unwrap(), None);
    // Nothing is appended to a head that is not sealed.
    let unsealed = Arc::new(crate::audit::HeadKey::new([7; 32]));
    assert!(matches!(
        log.audit_append(unsealed, vec![audit_event(1, "alice", "n", "reveal")])
            .await,
        Err(StoreError::AuditIntegrity { .. })
    ));
    let key = sealed_key(&*log, 7).await;
    let genesis = log.audit_head().await.unwrap().unwrap();
    assert_eq!(genesis.count, 0);
    assert!(key.check(&genesis));
    // Sealing again changes nothing.
    sealed_key(&*log, 7).await;
    assert_eq!(log.audit_head().await.unwrap(), Some(genesis));
    assert_eq!(audit_verify_all(&*log, &key).await, Ok(0));
    assert!(log
        .audit_append(key.clone(), Vec::new())
        .await
        .unwrap()
        .is_empty());
    let first = log
        .audit_append(key.clone(), vec![audit_event(1, "alice", "n", "reveal")])
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].seq, 1);
    assert_eq!(first[0].prev_hash, crate::audit::GENESIS);
    let events: Vec<_> = (2..=2500)
        .map(|i| audit_event(i, "alice", &format!("n{}", i % 5), "put"))
        .collect();
    let more = log.audit_append(key.clone(), events).await.unwrap();
    assert_eq!(more.first().unwrap().seq, 2);
    assert_eq!(more.first().unwrap().prev_hash, first[0].hash);
    assert_eq!(more.last().unwrap().seq, 2500);
    let head = log.audit_head().await.unwrap().unwrap();
    assert_eq!(head.count, 2500);
    assert_eq!(head.hash, more.last().unwrap().hash);
    assert!(key.check(&head));
    // What is read back is what was returned (times at the stored precision).
    let back = log.audit_scan(0, 10).await.unwrap();
    assert_eq!(back[0], first[0]);
    assert_eq!(back[1], more[0]);
    assert_eq!(audit_verify_all(&*log, &key).await, Ok(2500));
    // Reopening keeps the log.
    drop(log);
    let s2 = b.open().await.unwrap();
    let log2 = audit_log(&*s2);
    assert_eq!(audit_verify_all(&*log2, &key).await, Ok(2500));
    // A wrong key fails the head.
    let other = crate::audit::HeadKey::new([8; 32]);
    assert_eq!(
        audit_verify_all(&*log2, &other).await,
        Err(crate::audit::VerifyError::HeadMac)
    );
    // And an append under a head whose MAC does not verify is refused, writing nothing:
    // appending would re-seal a forged head.
    assert!(matches!(
        log2.audit_append(Arc::new(other), vec![audit_event(9, "a", "n", "put")])
            .await,
        Err(StoreError::AuditIntegrity { .. })
    ));
    assert_eq!(log2.audit_head().await.unwrap().unwrap().count, 2500);
    assert_invalid(
        log2.audit_append(
            key.clone(),
            (0..crate::audit::MAX_APPEND_BATCH as u64 + 1)
                .map(|i| audit_event(i, "a", "n", "put"))
                .collect(),
        )
        .await,
    );
}

/// A log that is not sealed while the store holds credential versions was reset outside
/// Strongroom: it is not sealed anew (which would start a clean-looking log).
pub async fn audit_genesis_is_not_sealed_over_data(b: &dyn TestBackend) {
    let s = open(b).await;
    let log = audit_log(&*s);
    put(&*s, "alice", "k", 1).await;
    let key = crate::audit::HeadKey::new([2; 32]);
    assert!(matches!(
        log.audit_seal_genesis(key.head(0, crate::audit::GENESIS))
            .await,
        Err(StoreError::AuditIntegrity { .. })
    ));
    assert_eq!(log.audit_head().await.unwrap(), None);
}

pub async fn audit_query_filters_and_pages(b: &dyn TestBackend) {
    let s = open(b).await;
    let log = audit_log(&*s);
    let key = sealed_key(&*log, 1).await;
    let mut events = Vec::new();
    for i in 1..=60u64 {
        let owner = if i % 2 == 0 { "alice" } else { "bob" };
        let action = if i % 3 == 0 { "reveal" } else { "put" };
        let mut e = audit_event(i, owner, "zoom.key", action);
        if i % 5 == 0 {
            e.principal_kind = "anonymous".into();
        }
        events.push(e);
    }
    log.audit_append(key.clone(), events).await.unwrap();
    let mut f = crate::AuditFilter {
        owner: Some("alice".into()),
        ..Default::default()
    };
    let all = log.audit_query(&f, None, 1000).await.unwrap();
    assert_eq!(all.len(), 30);
    assert!(all
        .iter()
        .all(|r| r.event.owner.as_deref() == Some("alice")));
    assert!(all.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");
    // Paging by seq.
    let p1 = log.audit_query(&f, None, 7).await.unwrap();
    let p2 = log
        .audit_query(&f, Some(p1.last().unwrap().seq), 7)
        .await
        .unwrap();
    assert_eq!(p1.len(), 7);
    assert_eq!(p2[0].seq, all[7].seq);
    // Actions, principal, time.
    f.actions = vec!["reveal".into()];
    let reveals = log.audit_query(&f, None, 1000).await.unwrap();
    assert_eq!(reveals.len(), 10);
    // Kinds of principal: alice's reveals (i a multiple of 6) by services, not i = 30 or 60.
    f.principal_kinds = vec!["service".into(), "user".into()];
    let by_services = log.audit_query(&f, None, 1000).await.unwrap();
    assert_eq!(by_services.len(), 8, "{by_services:?}");
    assert!(by_services
        .iter()
        .all(|r| r.event.principal_kind == "service"));
    f.principal_kinds = vec!["anonymous".into()];
    assert_eq!(log.audit_query(&f, None, 1000).await.unwrap().len(), 2);
    f.principal_kinds.clear();
    let g = crate::AuditFilter {
        principal_id: Some("svc-0".into()),
        ..Default::default()
    };
    assert_eq!(log.audit_query(&g, None, 1000).await.unwrap().len(), 20);
    let h = crate::AuditFilter {
        since: Some(t0() + Duration::milliseconds(10)),
        until: Some(t0() + Duration::milliseconds(20)),
        ..Default::default()
    };
    let window = log.audit_query(&h, None, 1000).await.unwrap();
    assert_eq!(window.len(), 10, "{window:?}");
    // Bounds finer than the stored milliseconds: `since` takes no time before it, `until`
    // leaves out none before it.
    let fine = crate::AuditFilter {
        since: Some(t0() + Duration::microseconds(9_100)),
        until: Some(t0() + Duration::microseconds(19_100)),
        ..Default::default()
    };
    let times: Vec<OffsetDateTime> = log
        .audit_query(&fine, None, 1000)
        .await
        .unwrap()
        .iter()
        .map(|r| r.event.time)
        .collect();
    assert_eq!(
        (times.first(), times.last(), times.len()),
        (
            Some(&(t0() + Duration::milliseconds(19))),
            Some(&(t0() + Duration::milliseconds(10))),
            10
        ),
        "{times:?}"
    );
    let none = crate::AuditFilter {
        owner: Some("carol".into()),
        ..Default::default()
    };
    assert!(log.audit_query(&none, None, 10).await.unwrap().is_empty());
}

/// Queries by owner alone and by time return exactly what a filter over every record does,
/// newest first and page by page, while record times run out of order: requests that
/// finish late (lags up to 2.5 s), jumps forward over empty seconds, a clock stepped back an
/// hour, and, at the end, a time before 1970. Appended in batches, with queries between
/// them, so that indexes kept behind the appends are caught up part by part.
pub async fn audit_query_by_time_and_owner_is_exact(b: &dyn TestBackend) {
    let s = open(b).await;
    let log = audit_log(&*s);
    let key = sealed_key(&*log, 1).await;
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let owners = ["alice", "bob", "carol"];
    let names = ["zoom.key", "github.token", "smtp.password"];
    let mut clock_ms: i64 = 0;
    let mut times = Vec::new(); // every query's bounds come from times near these
    let base = t0();
    for batch in 0..6 {
        let mut events = Vec::new();
        for _ in 0..120 {
            clock_ms += next(40) as i64;
            if next(60) == 0 {
                clock_ms += 3_000 + next(4_000) as i64; // a quiet stretch
            }
            let mut t = clock_ms;
            if next(8) == 0 {
                t -= next(2_500) as i64; // a request that finished late
            }
            if batch == 3 && events.is_empty() {
                t -= 3_600_000; // a clock stepped back an hour, once
            }
            times.push(t);
            let i = next(1_000);
            let mut e = audit_event(
                i,
                owners[next(3) as usize],
                names[next(3) as usize],
                "reveal",
            );
            e.time = base + Duration::milliseconds(t);
            if next(10) == 0 {
                e.owner = None; // an admin action: no owner or name
                e.name = None;
            }
            events.push(e);
        }
        log.audit_append(key.clone(), events).await.unwrap();
        check_queries(&*log, &times, base, batch).await;
    }
    // A record from before 1970 (seconds round down there too).
    let mut e = audit_event(1, "alice", "zoom.key", "put");
    e.time = OffsetDateTime::from_unix_timestamp_nanos(-1_500_000_000).unwrap();
    log.audit_append(key.clone(), vec![e]).await.unwrap();
    let mut e = audit_event(2, "alice", "zoom.key", "put");
    e.time = base + Duration::milliseconds(clock_ms + 10);
    log.audit_append(key.clone(), vec![e]).await.unwrap();
    times.push(-1_500 - (base.unix_timestamp() * 1000));
    check_queries(&*log, &times, base, 6).await;
}

/// A clock stepped back an hour once, and a request that finished late once: queries by
/// time still find them, and each widens only the queries whose `until` falls after its
/// time and before the records around it, only as far as itself. (A bound on how far any
/// record ever lagged widened every later query by that much: past the last record here.)
pub async fn a_late_record_widens_only_the_queries_that_need_it(b: &dyn TestBackend) {
    let s = open(b).await;
    let log = audit_log(&*s);
    let key = sealed_key(&*log, 3).await;
    let base = t0();
    let base_ms = crate::types::to_millis(base).unwrap();
    // Record `i` (seq `i + 1`) at second `i` and a half; seq 101 an hour earlier, seq 151
    // begun 30 s before the records around it.
    let ms = |i: i64| match i {
        100 => 100_500 - 3_600_000,
        150 => 120_500,
        _ => i * 1_000 + 500,
    };
    let events = (0..200)
        .map(|i| {
            let mut e = audit_event(i as u64, "alice", "zoom.key", "reveal");
            e.time = base + Duration::milliseconds(ms(i));
            e
        })
        .collect();
    log.audit_append(key.clone(), events).await.unwrap();
    let bounds = |since: Option<i64>, until: Option<i64>| {
        b.audit_seq_bounds(since.map(|t| base_ms + t), until.map(|t| base_ms + t))
    };
    // Until second 180: up to the mark of second 180 (seq 181), not to the end.
    assert_eq!(bounds(None, Some(180_000)).await.unwrap(), (0, 181));
    assert_eq!(
        bounds(Some(170_000), Some(180_000)).await.unwrap(),
        (171, 181)
    );
    // Until just after the stepped-back record: the range reaches it, and no further.
    let after_step = 100_501 - 3_600_000;
    assert_eq!(bounds(None, Some(after_step)).await.unwrap(), (0, 101));
    // Until second 121, after the late request's time: it reaches that record (seq 151),
    // past the mark of second 121 (seq 122); until second 120, not.
    assert_eq!(bounds(None, Some(121_000)).await.unwrap(), (0, 151));
    assert_eq!(bounds(None, Some(120_000)).await.unwrap(), (0, 121));
    // And the queries answer exactly.
    let seqs = |since: Option<i64>, until: Option<i64>| {
        let f = crate::AuditFilter {
            since: since.map(|t| base + Duration::milliseconds(t)),
            until: until.map(|t| base + Duration::milliseconds(t)),
            ..Default::default()
        };
        let log = log.clone();
        async move {
            log.audit_query(&f, None, 1000)
                .await
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<u64>>()
        }
    };
    assert_eq!(seqs(None, Some(after_step)).await, vec![101]);
    assert_eq!(seqs(Some(120_000), Some(121_000)).await, vec![151, 121]);
    let until_180: Vec<u64> = (1..=180).rev().collect();
    assert_eq!(seqs(None, Some(180_000)).await, until_180);
}

/// Every stored record, in `seq` order.
async fn audit_scan_all(log: &dyn crate::AuditLog) -> Vec<crate::audit::Record> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = log.audit_scan(after, 4096).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        all.extend(page);
    }
    all
}

/// A time window of an audit query: `(since, until)`.
type Window = (Option<OffsetDateTime>, Option<OffsetDateTime>);

/// Compares pages of `audit_query` with a filter over every record, for windows around
/// `times` (milliseconds after `base`) and owner, name and principal filters.
async fn check_queries(
    log: &dyn crate::AuditLog,
    times: &[i64],
    base: OffsetDateTime,
    round: usize,
) {
    let at = |ms: i64| base + Duration::milliseconds(ms);
    let mut windows = vec![(None, None)];
    for (k, &t) in times.iter().enumerate().step_by(61 + round) {
        let w = times[(k * 7 + 11) % times.len()];
        let (lo, hi) = (t.min(w), t.max(w));
        windows.push((Some(at(lo)), Some(at(hi))));
        windows.push((Some(at(t)), None));
        windows.push((None, Some(at(t))));
        windows.push((Some(at(t - t.rem_euclid(1000))), Some(at(t + 1))));
        windows.push((Some(at(t)), Some(at(t))));
    }
    check_windows(log, &windows, round).await;
}

/// Compares pages of `audit_query` with a filter over every stored record, for `windows`
/// and owner, name and principal filters.
async fn check_windows(log: &dyn crate::AuditLog, windows: &[Window], round: usize) {
    let mut all = audit_scan_all(log).await;
    all.reverse(); // newest first
    for &(since, until) in windows {
        for (owner, name, principal) in [
            (None, None, None),
            (Some("alice"), None, None),
            (Some("bob"), Some("zoom.key"), None),
            (None, Some("smtp.password"), None),
            (None, None, Some("svc-1")),
            (Some("carol"), None, Some("svc-2")),
        ] {
            let f = crate::AuditFilter {
                owner: owner.map(String::from),
                name: name.map(String::from),
                principal_id: principal.map(String::from),
                since,
                until,
                ..Default::default()
            };
            let want: Vec<u64> = all
                .iter()
                .filter(|r| {
                    let e = &r.event;
                    owner.is_none_or(|o| e.owner.as_deref() == Some(o))
                        && name.is_none_or(|n| e.name.as_deref() == Some(n))
                        && principal.is_none_or(|p| e.principal_id == p)
                        && since.is_none_or(|t| e.time >= t)
                        && until.is_none_or(|t| e.time < t)
                })
                .map(|r| r.seq)
                .collect();
            // Whole, and in a few pages (each continues where the last ended).
            let whole: Vec<u64> = log
                .audit_query(&f, None, 1000)
                .await
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect();
            assert_eq!(whole, want[..want.len().min(1000)], "{f:?}, round {round}");
            let size = (want.len() / 3 + 1).max(7);
            let mut paged = Vec::new();
            let mut before = None;
            loop {
                let page = log.audit_query(&f, before, size as u32).await.unwrap();
                paged.extend(page.iter().map(|r| r.seq));
                if page.len() < size {
                    break;
                }
                before = page.last().map(|r| r.seq);
            }
            assert_eq!(paged, want, "{f:?} in pages, round {round}");
        }
    }
}

pub async fn audit_head_key_first_wins(b: &dyn TestBackend) {
    let s = open(b).await;
    let log = audit_log(&*s);
    assert_eq!(
        log.audit_init_head_key(vec![1, 2]).await.unwrap(),
        vec![1, 2]
    );
    assert_eq!(
        log.audit_init_head_key(vec![3, 4]).await.unwrap(),
        vec![1, 2]
    );
    assert_eq!(
        s.get_provider_state(crate::audit::HEAD_KEY_STATE)
            .await
            .unwrap(),
        Some(vec![1, 2])
    );
}

/// Several stores open on one database (as several server nodes) appending at once write
/// one chain.
pub async fn audit_concurrent_appends_one_chain(b: &dyn TestBackend) {
    let a = open(b).await;
    let c = b.open().await.unwrap();
    let key = sealed_key(&*audit_log(&*a), 5).await;
    let mut tasks = Vec::new();
    for node in [a.clone(), c.clone()] {
        for t in 0..8u64 {
            let log = audit_log(&*node);
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..25u64 {
                    let n = (t * 100 + i) % 4 + 1;
                    let events = (0..n)
                        .map(|j| audit_event(t * 1000 + i * 10 + j, "alice", "n", "reveal"))
                        .collect();
                    log.audit_append(key.clone(), events).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = audit_verify_all(&*audit_log(&*a), &key).await.unwrap();
    let expected: u64 = (0..2u64)
        .map(|_| {
            (0..8u64)
                .map(|t| (0..25u64).map(|i| (t * 100 + i) % 4 + 1).sum::<u64>())
                .sum::<u64>()
        })
        .sum();
    assert_eq!(total, expected);
}

/// A put and its audit record commit together, chained with the other appends, and a put
/// that fails writes neither.
pub async fn audited_put_is_one_transaction(b: &dyn TestBackend) {
    let s = open(b).await;
    let log = audit_log(&*s);
    let key = sealed_key(&*log, 3).await;
    log.audit_append(key.clone(), vec![audit_event(1, "alice", "n", "reveal")])
        .await
        .unwrap();
    let mut event = audit_event(2, "alice", "zoom.key", "put");
    event.version = Some(1);
    let (out, record) = s
        .put_version_audited(
            new_version("alice", "zoom.key", 1),
            key.clone(),
            event.clone(),
        )
        .await
        .unwrap();
    assert_eq!(out.version, 1);
    assert_eq!(record.seq, 2);
    assert_eq!(record.event.action, "put");
    assert_eq!(record.event.version, Some(1));
    assert_eq!(s.latest_version("alice", "zoom.key").await.unwrap(), 1);
    assert_eq!(log.audit_scan(1, 10).await.unwrap(), vec![record.clone()]);
    let head = log.audit_head().await.unwrap().unwrap();
    assert_eq!((head.count, head.hash), (2, record.hash));

    // A stale version number: no version, no record, the head unchanged.
    assert_conflict(
        s.put_version_audited(
            new_version("alice", "zoom.key", 1),
            key.clone(),
            event.clone(),
        )
        .await,
        1,
    );
    // A failed check-and-set: the same.
    let mut stale = new_version("alice", "zoom.key", 2);
    stale.expected_current = Some(7);
    assert!(matches!(
        s.put_version_audited(stale, key.clone(), event.clone())
            .await,
        Err(StoreError::CurrentMismatch { .. })
    ));
    // Invalid input: the same.
    assert_invalid(
        s.put_version_audited(new_version("alice", "", 2), key.clone(), event.clone())
            .await,
    );
    assert_eq!(s.latest_version("alice", "zoom.key").await.unwrap(), 1);
    assert_eq!(log.audit_head().await.unwrap().unwrap().count, 2);
    assert_eq!(log.audit_scan(2, 10).await.unwrap(), Vec::new());

    // Concurrent audited puts and plain appends still form one verifiable chain.
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let (s, put_key) = (s.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut e = audit_event(u64::from(i), "bob", &format!("k{i}"), "put");
            e.version = Some(1);
            s.put_version_audited(new_version("bob", &format!("k{i}"), 1), put_key, e)
                .await
                .map(|_| ())
        }));
        let (log, append_key) = (log.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            log.audit_append(
                append_key,
                vec![audit_event(u64::from(i), "bob", "x", "reveal")],
            )
            .await
            .map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(audit_verify_all(&*log, &key).await, Ok(34));
}

/// A change other than a put commits with its audit record: a change that fails writes no
/// record, and a record that cannot be written (a head this key did not seal) leaves the
/// change unmade.
pub async fn audited_change_is_one_transaction(b: &dyn TestBackend) {
    use crate::Change;
    let s = open(b).await;
    let log = audit_log(&*s);
    let key = sealed_key(&*log, 4).await;
    let at = OffsetDateTime::from_unix_timestamp(1_700_000_100).unwrap();
    for v in 1..=3 {
        s.put_version(new_version("alice", "k", v)).await.unwrap();
    }
    let mut seq = 0;
    for (change, action) in [
        (Change::SetEnabled(false), "disable"),
        (Change::SetEnabled(true), "enable"),
        (Change::SetCurrent(2), "set_current"),
        (Change::DestroyVersion(1), "destroy_version"),
    ] {
        seq += 1;
        let (done, record) = s
            .change_audited(
                "alice",
                "k",
                change,
                at,
                key.clone(),
                audit_event(seq, "alice", "k", action),
            )
            .await
            .unwrap();
        assert!(done, "{change:?}");
        assert_eq!((record.seq, record.event.action.as_str()), (seq, action));
    }
    let cred = s.get_credential("alice", "k").await.unwrap();
    assert_eq!(cred.summary.current_version, Some(2));
    assert!(cred.summary.enabled);
    let first = cred.versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!(first.state, VersionState::Destroyed);

    // A change that fails (no such credential, a destroyed version made current): no record.
    assert!(matches!(
        s.change_audited(
            "alice",
            "nope",
            Change::SetEnabled(false),
            at,
            key.clone(),
            audit_event(9, "alice", "nope", "disable")
        )
        .await,
        Err(StoreError::NotFound)
    ));
    assert!(s
        .change_audited(
            "alice",
            "k",
            Change::SetCurrent(1),
            at,
            key.clone(),
            audit_event(9, "alice", "k", "set_current")
        )
        .await
        .is_err());
    assert_eq!(log.audit_head().await.unwrap().unwrap().count, seq);

    // The record refused (a key that did not seal the head): the change is not made.
    let other = Arc::new(crate::audit::HeadKey::new([5; 32]));
    assert!(matches!(
        s.change_audited(
            "alice",
            "k",
            Change::DestroyCredential,
            at,
            other,
            audit_event(9, "alice", "k", "destroy")
        )
        .await,
        Err(StoreError::AuditIntegrity { .. })
    ));
    assert!(
        s.get_credential("alice", "k").await.is_ok(),
        "destroyed unaudited"
    );
    let (_, record) = s
        .change_audited(
            "alice",
            "k",
            Change::DestroyCredential,
            at,
            key.clone(),
            audit_event(seq + 1, "alice", "k", "destroy"),
        )
        .await
        .unwrap();
    assert_eq!(record.seq, seq + 1);
    assert!(matches!(
        s.get_credential("alice", "k").await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(audit_verify_all(&*log, &key).await, Ok(seq + 1));
}

/// Archiving: the anchor moves forward only over records that are there and chain on, under
/// a genuine MAC and a head that verifies, by compare-and-swap; it removes nothing itself.
/// Pruning then removes the records up to it in bounded batches, and the log verifies from
/// the anchor at every step; appends and queries go on.
pub async fn audit_archive_anchor_and_prune(b: &dyn TestBackend) {
    use crate::audit::{is_counted_put, HeadKey, Pruned};
    let s = open(b).await;
    let log = audit_log(&*s);
    let key = sealed_key(&*log, 5).await;
    assert_eq!(log.audit_anchor().await.unwrap(), None);
    // Nothing to prune without an anchor.
    assert_eq!(
        log.audit_prune(key.clone(), 10).await.unwrap(),
        Pruned {
            records: 0,
            done: true
        }
    );
    let events: Vec<_> = (1..=100)
        .map(|i| {
            let action = if i % 3 == 0 { "put" } else { "reveal" };
            audit_event(i, &format!("o{}", i % 4), &format!("n{}", i % 5), action)
        })
        .collect();
    let records = log.audit_append(key.clone(), events).await.unwrap();
    let puts_upto = |n: u64| {
        records
            .iter()
            .filter(|r| r.seq <= n && is_counted_put(r))
            .count() as u64
    };
    let at = |n: u64| &records[n as usize - 1];
    let anchor = key.anchor(40, at(40).hash, puts_upto(40));

    // Refused: another key's anchor, one at or past the head, one whose hash is not the
    // record's, one that starts after an anchor that is not there.
    let other = Arc::new(HeadKey::new([6; 32]));
    let refused = [
        (other.anchor(40, at(40).hash, puts_upto(40)), 0),
        (key.anchor(100, at(100).hash, puts_upto(100)), 0),
        (key.anchor(101, at(100).hash, puts_upto(100)), 0),
        (key.anchor(40, at(39).hash, puts_upto(40)), 0),
        (anchor.clone(), 5),
    ];
    for (a, after) in refused {
        let r = log.audit_set_anchor(key.clone(), after, a.clone()).await;
        assert!(
            matches!(
                r,
                Err(StoreError::InvalidInput(_)) | Err(StoreError::AuditIntegrity { .. })
            ),
            "{a:?} after {after}: {r:?}"
        );
    }
    // Under a key the head does not verify with.
    assert!(matches!(
        log.audit_set_anchor(other.clone(), 0, other.anchor(40, at(40).hash, 0))
            .await,
        Err(StoreError::AuditIntegrity { .. })
    ));
    assert_eq!(log.audit_anchor().await.unwrap(), None);

    log.audit_set_anchor(key.clone(), 0, anchor.clone())
        .await
        .unwrap();
    assert_eq!(log.audit_anchor().await.unwrap(), Some(anchor.clone()));
    // Nothing removed yet, and the log verifies from the anchor.
    assert_eq!(log.audit_scan(0, 1).await.unwrap()[0].seq, 1);
    assert_eq!(audit_verify_all(&*log, &key).await, Ok(100));
    // The anchor only moves from where it is, and forward.
    for (a, after) in [
        (anchor.clone(), 0),
        (key.anchor(30, at(30).hash, puts_upto(30)), 40),
        (anchor.clone(), 40),
    ] {
        assert!(
            matches!(
                log.audit_set_anchor(key.clone(), after, a).await,
                Err(StoreError::InvalidInput(_))
            ),
            "after {after}"
        );
    }
    // A prune under another key removes nothing (the anchor does not verify under it).
    assert!(matches!(
        log.audit_prune(other, 10).await,
        Err(StoreError::AuditIntegrity { .. })
    ));
    assert_eq!(log.audit_scan(0, 1).await.unwrap()[0].seq, 1);

    // Bounded batches, lowest first; the log verifies between them.
    let mut removed = 0;
    loop {
        let p = log.audit_prune(key.clone(), 16).await.unwrap();
        assert!(p.records <= 16);
        removed += p.records;
        assert_eq!(log.audit_scan(0, 1).await.unwrap()[0].seq, removed + 1);
        assert_eq!(audit_verify_all(&*log, &key).await, Ok(100));
        if p.done {
            break;
        }
    }
    assert_eq!(removed, 40);
    assert_eq!(
        log.audit_prune(key.clone(), 16).await.unwrap(),
        Pruned {
            records: 0,
            done: true
        }
    );
    // Appends go on; queries return only kept records.
    let more = log
        .audit_append(key.clone(), vec![audit_event(101, "o1", "n1", "reveal")])
        .await
        .unwrap();
    assert_eq!(more[0].seq, 101);
    assert_eq!(audit_verify_all(&*log, &key).await, Ok(101));
    let filter = crate::audit::AuditFilter {
        owner: Some("o1".into()),
        ..Default::default()
    };
    let found = log.audit_query(&filter, None, 1000).await.unwrap();
    assert!(!found.is_empty());
    assert!(found.iter().all(|r| r.seq > 40), "{found:?}");
    let all = log
        .audit_query(&Default::default(), None, 1000)
        .await
        .unwrap();
    assert_eq!(all.len(), 61);

    // A second archive continues from the first; reopening keeps the anchor.
    let second = key.anchor(70, at(70).hash, puts_upto(70));
    log.audit_set_anchor(key.clone(), 40, second.clone())
        .await
        .unwrap();
    while !log.audit_prune(key.clone(), 1000).await.unwrap().done {}
    drop(log);
    let s2 = b.open().await.unwrap();
    let log2 = audit_log(&*s2);
    assert_eq!(log2.audit_anchor().await.unwrap(), Some(second));
    assert_eq!(log2.audit_scan(0, 1).await.unwrap()[0].seq, 71);
    assert_eq!(audit_verify_all(&*log2, &key).await, Ok(101));
}

/// Asserts two lists of time marks are equal, saying briefly how they differ.
#[track_caller]
fn assert_marks(got: &[(i64, i64)], want: &[(i64, i64)], what: &str) {
    let differ = got.iter().zip(want).position(|(g, w)| g != w);
    assert!(
        got == want,
        "{what}: {} marks, want {}; first {:?} and {:?}; first difference at {differ:?}",
        got.len(),
        want.len(),
        got.first(),
        want.first()
    );
}

/// Pruning removes the time marks of the records it removes, in the same transactions, and
/// time-bounded queries stay exact: before, inside and after the pruned range, part-way
/// through and at the end, with kept records whose times lie in the pruned range (a clock
/// stepped back, requests that finished late) and queries whose bounds find no mark.
pub async fn audit_prune_removes_time_marks_and_queries_stay_exact(b: &dyn TestBackend) {
    use crate::audit::{is_counted_put, late_frontier, TimeIndex};
    let s = open(b).await;
    let log = audit_log(&*s);
    let key = sealed_key(&*log, 9).await;
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    let owners = ["alice", "bob", "carol"];
    let names = ["zoom.key", "github.token"];
    let base = t0();
    let (mut clock_ms, mut times) = (0i64, Vec::new());
    let event = |i: u64, t: i64, next: &mut dyn FnMut(u64) -> u64| {
        let action = if next(5) == 0 { "put" } else { "reveal" };
        let mut e = audit_event(i, owners[next(3) as usize], names[next(2) as usize], action);
        e.time = base + Duration::milliseconds(t);
        e
    };
    // Many seconds: about one record a second, a late one now and then, quiet stretches.
    for _ in 0..3 {
        let mut events = Vec::new();
        for _ in 0..300 {
            clock_ms += next(1_500) as i64;
            if next(50) == 0 {
                clock_ms += 5_000 + next(20_000) as i64;
            }
            let mut t = clock_ms;
            if next(8) == 0 {
                t -= next(3_000) as i64;
            }
            times.push(t);
            events.push(event(times.len() as u64, t, &mut next));
        }
        log.audit_append(key.clone(), events).await.unwrap();
    }
    check_queries(&*log, &times, base, 0).await; // also brings SQLite's marks up to date
    let records = audit_scan_all(&*log).await;
    // The marks are those of the records, one per second the running maximum entered.
    // The late marks are the frontier of the records behind the running maximum's second.
    let mut index = TimeIndex::default();
    let (mut want, mut late) = (Vec::new(), Vec::new());
    for r in &records {
        let ms = crate::types::to_millis(r.event.time).unwrap();
        index.advance(r.seq as i64, ms, &mut want, &mut late);
    }
    let want_late = late_frontier(&late);
    let before = b.raw_audit_time_marks().await.unwrap();
    assert_marks(&before, &want, "before pruning");
    assert!(before.len() > 300, "{} marks", before.len());
    let late_before = b.raw_audit_late_marks().await.unwrap();
    assert_marks(&late_before, &want_late, "late marks before pruning");
    assert!(late_before.len() > 20, "{} late marks", late_before.len());
    let kept_late = |upto: i64| -> Vec<(i64, i64)> {
        want_late
            .iter()
            .copied()
            .filter(|&(_, s)| s > upto)
            .collect()
    };

    let cut = 450u64;
    let puts = records[..cut as usize]
        .iter()
        .filter(|r| is_counted_put(r))
        .count() as u64;
    log.audit_set_anchor(
        key.clone(),
        0,
        key.anchor(cut, records[cut as usize - 1].hash, puts),
    )
    .await
    .unwrap();
    // Setting the anchor removes nothing.
    assert_marks(&b.raw_audit_time_marks().await.unwrap(), &want, "anchored");
    let kept_marks = |upto: i64| -> Vec<(i64, i64)> {
        want.iter().copied().filter(|&(_, s)| s > upto).collect()
    };
    let at = |ms: i64| Some(base + Duration::milliseconds(ms));
    let t_cut = times[cut as usize - 1];
    let (first, last) = (times[0], *times.last().unwrap());
    // Before, across and after the cut, and bounds with no mark on their side.
    let windows: Vec<Window> = vec![
        (None, at(t_cut)),
        (at(first), at(t_cut - 60_000)),
        (at(t_cut - 10_000), at(t_cut + 10_000)),
        (at(t_cut), None),
        (at(t_cut + 1), at(last)),
        (at(first - 3_600_000), at(first - 1)),
        (at(last + 60_000), None),
        (None, at(first - 1)),
        (at(first - 1), at(last + 3_600_000)),
    ];

    // Part-way: the first batch's records and their marks go together.
    let mut pruned = 0;
    let p = log.audit_prune(key.clone(), 16).await.unwrap();
    assert_eq!(p.records, 16);
    assert!(!p.done);
    pruned += p.records;
    let marks = b.raw_audit_time_marks().await.unwrap();
    assert_marks(&marks, &kept_marks(16), "after one batch");
    assert!(marks.len() < before.len());
    let late_marks = b.raw_audit_late_marks().await.unwrap();
    assert_marks(&late_marks, &kept_late(16), "late marks after one batch");
    check_windows(&*log, &windows, 1).await;
    check_queries(&*log, &times, base, 1).await;
    loop {
        let p = log.audit_prune(key.clone(), 16).await.unwrap();
        pruned += p.records;
        if p.done {
            break;
        }
    }
    assert_eq!(pruned, cut);
    assert_eq!(log.audit_scan(0, 1).await.unwrap()[0].seq, cut + 1);
    let after = b.raw_audit_time_marks().await.unwrap();
    assert_marks(&after, &kept_marks(cut as i64), "after pruning");
    let late_after = b.raw_audit_late_marks().await.unwrap();
    assert_marks(
        &late_after,
        &kept_late(cut as i64),
        "late marks after pruning",
    );
    assert!(late_after.len() < late_before.len() && !late_after.is_empty());
    assert!(
        after.len() < before.len() && !after.is_empty(),
        "{} marks of {}",
        after.len(),
        before.len()
    );
    check_windows(&*log, &windows, 2).await;
    check_queries(&*log, &times, base, 2).await;

    // Appends go on: some at times inside the pruned range (a clock stepped back), some
    // late, some after a jump; every query stays exact.
    let mut events = Vec::new();
    for k in 0..120u64 {
        let t = match k {
            0 => times[100],
            1 => first - 10_000,
            60 => {
                clock_ms += 30_000;
                clock_ms
            }
            _ => {
                clock_ms += next(1_500) as i64;
                clock_ms - next(2) as i64 * next(3_000) as i64
            }
        };
        times.push(t);
        events.push(event(times.len() as u64, t, &mut next));
    }
    log.audit_append(key.clone(), events).await.unwrap();
    check_windows(&*log, &windows, 3).await;
    check_queries(&*log, &times, base, 3).await;
    // The new records' marks are kept beside the old ones (none reappear for pruned ones).
    let now = b.raw_audit_time_marks().await.unwrap();
    assert_marks(&now[..after.len()], &after, "after appending");
    assert!(now.iter().all(|&(_, s)| s > cut as i64));
    let late_now = b.raw_audit_late_marks().await.unwrap();
    assert!(
        late_now.iter().all(|&(_, s)| s > cut as i64),
        "{late_now:?}"
    );
    // A prune with nothing left to remove changes nothing.
    assert!(log.audit_prune(key.clone(), 16).await.unwrap().done);
    assert_marks(
        &b.raw_audit_time_marks().await.unwrap(),
        &now,
        "pruned again",
    );
    assert_eq!(audit_verify_all(&*log, &key).await, Ok(900 + 120));
}

fn with_quota(owner: &str, name: &str, version: u32, limit: u32) -> NewVersion {
    let mut nv = new_version(owner, name, version);
    nv.max_credentials = Some(limit);
    nv
}

fn assert_over_quota(r: Result<impl std::fmt::Debug, StoreError>, want_limit: u32) {
    match r {
        Err(StoreError::QuotaExceeded { limit }) => assert_eq!(limit, want_limit),
        other => panic!("expected QuotaExceeded {{ limit: {want_limit} }}, got {other:?}"),
    }
}

async fn live_names(s: &dyn Store, owner: &str) -> Vec<String> {
    let page = s.list_credentials(owner, None, 1000).await.unwrap();
    assert!(page.next.is_none());
    page.items.into_iter().map(|c| c.name).collect()
}

pub async fn quota_counts_live_credentials_per_owner(b: &dyn TestBackend) {
    let s = open(b).await;
    // An audited put refused by the quota writes neither the version nor its record.
    let log = audit_log(&*s);
    let key = sealed_key(&*log, 5).await;
    let mut event = audit_event(1, "q", "a", "put");
    event.version = Some(1);
    s.put_version_audited(with_quota("q", "a", 1, 1), key.clone(), event.clone())
        .await
        .unwrap();
    assert_over_quota(
        s.put_version_audited(with_quota("q", "b", 1, 1), key, event)
            .await,
        1,
    );
    assert_eq!(s.latest_version("q", "b").await.unwrap(), 0);
    assert_eq!(log.audit_head().await.unwrap().unwrap().count, 1);

    for name in ["a", "b", "c"] {
        s.put_version(with_quota("o", name, 1, 3)).await.unwrap();
    }
    // A fourth credential is refused, and nothing of it is written.
    assert_over_quota(s.put_version(with_quota("o", "d", 1, 3)).await, 3);
    assert_eq!(s.latest_version("o", "d").await.unwrap(), 0);
    assert_not_found(s.get_credential("o", "d").await);
    assert_eq!(live_names(&*s, "o").await, ["a", "b", "c"]);
    // New versions of a live credential are not creations.
    s.put_version(with_quota("o", "a", 2, 3)).await.unwrap();
    // Another owner has a quota of their own.
    s.put_version(with_quota("p", "a", 1, 3)).await.unwrap();
    // A larger quota (the operator raised it) lets more in; the check is per put.
    s.put_version(with_quota("o", "d", 1, 4)).await.unwrap();
    assert_over_quota(s.put_version(with_quota("o", "e", 1, 4)).await, 4);
    // Destroying a credential frees its slot ...
    s.destroy_credential("o", "b", t0()).await.unwrap();
    s.put_version(with_quota("o", "e", 1, 4)).await.unwrap();
    // ... and bringing a destroyed one back is a creation like any other (numbering goes on).
    assert_over_quota(s.put_version(with_quota("o", "b", 2, 4)).await, 4);
    assert_eq!(s.latest_version("o", "b").await.unwrap(), 1);
    assert_not_found(s.get_credential("o", "b").await);
    s.destroy_credential("o", "a", t0()).await.unwrap();
    s.put_version(with_quota("o", "b", 2, 4)).await.unwrap();
    assert_eq!(live_names(&*s, "o").await, ["b", "c", "d", "e"]);
    // Disabled credentials and destroyed versions still hold their slot.
    s.set_enabled("o", "c", false, t0()).await.unwrap();
    s.destroy_version("o", "d", 1, t0()).await.unwrap();
    assert_over_quota(s.put_version(with_quota("o", "f", 1, 4)).await, 4);
    // Without a quota (the store's default) nothing is counted.
    s.put_version(new_version("o", "f", 1)).await.unwrap();
}

/// Creators racing from several stores on one database (several nodes, or a server and an
/// operator command) never take an owner past the quota: of `N` racing creates against a
/// quota of `K`, exactly `K` succeed.
pub async fn quota_holds_under_racing_creates(b: &dyn TestBackend) {
    const RACERS: u32 = 24;
    let stores = [open(b).await, open(b).await, open(b).await];
    for (round, limit) in [(0u32, 5u32), (1, 1), (2, 17)] {
        let owner = format!("racer-{round}");
        let bystander = format!("bystander-{round}");
        let mut racers = Vec::new();
        let mut bystanders = Vec::new();
        for i in 0..RACERS {
            let s = Arc::clone(&stores[i as usize % stores.len()]);
            let nv = with_quota(&owner, &format!("n{i:02}"), 1, limit);
            racers.push(tokio::spawn(async move { s.put_version(nv).await }));
            // Another owner's creates in the same race take none of this owner's slots.
            if i < limit {
                let s = Arc::clone(&stores[(i as usize + 1) % stores.len()]);
                let nv = with_quota(&bystander, &format!("n{i:02}"), 1, limit);
                bystanders.push(tokio::spawn(async move { s.put_version(nv).await }));
            }
        }
        let (mut won, mut refused) = (0u32, 0u32);
        for t in racers {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::QuotaExceeded { limit: l }) => {
                    assert_eq!(l, limit);
                    refused += 1;
                }
                Err(e) => panic!("unexpected error in a quota race: {e}"),
            }
        }
        for t in bystanders {
            t.await.unwrap().expect("a bystander's create");
        }
        assert_eq!((won, refused), (limit, RACERS - limit), "round {round}");
        assert_eq!(live_names(&*stores[0], &owner).await.len(), limit as usize);
        assert_eq!(
            live_names(&*stores[0], &bystander).await.len(),
            limit as usize
        );
    }
}

pub async fn credential_versions_come_in_pages(b: &dyn TestBackend) {
    let s = open(b).await;
    for v in 1..=7 {
        put(&*s, "o", "n", v).await;
    }
    put(&*s, "o", "other", 1).await;
    put(&*s, "p", "n", 1).await;
    assert!(s.destroy_version("o", "n", 3, t0()).await.unwrap());
    let whole = s.get_credential("o", "n").await.unwrap();
    assert_eq!(whole.versions.len(), 7);
    assert_eq!(whole.versions_next, None);

    let numbers = |c: &crate::Credential| c.versions.iter().map(|v| v.version).collect::<Vec<_>>();
    // Newest first, each page below the one before, tombstones included.
    let first = s.get_credential_page("o", "n", None, 3).await.unwrap();
    assert_eq!(numbers(&first), [7, 6, 5]);
    assert_eq!(first.versions_next, Some(5));
    assert_eq!(first.summary, whole.summary);
    assert_eq!(first.versions[..], whole.versions[..3]);
    let second = s.get_credential_page("o", "n", Some(5), 3).await.unwrap();
    assert_eq!(numbers(&second), [4, 3, 2]);
    assert_eq!(second.versions[1].state, VersionState::Destroyed);
    assert_eq!(second.versions_next, Some(2));
    let last = s.get_credential_page("o", "n", Some(2), 3).await.unwrap();
    assert_eq!(numbers(&last), [1]);
    assert_eq!(last.versions_next, None);
    // A page that ends exactly at the oldest version is the last one.
    let exact = s.get_credential_page("o", "n", None, 7).await.unwrap();
    assert_eq!(exact.versions, whole.versions);
    assert_eq!(exact.versions_next, None);
    let exact = s.get_credential_page("o", "n", Some(4), 3).await.unwrap();
    assert_eq!(
        (numbers(&exact), exact.versions_next),
        (vec![3, 2, 1], None)
    );
    // Below the oldest: an empty page, the credential's facts still there.
    let past = s.get_credential_page("o", "n", Some(1), 5).await.unwrap();
    assert!(past.versions.is_empty() && past.versions_next.is_none());
    assert_eq!(past.summary, whole.summary);
    // Above the newest: from the newest.
    let above = s
        .get_credential_page("o", "n", Some(1000), 2)
        .await
        .unwrap();
    assert_eq!(
        (numbers(&above), above.versions_next),
        (vec![7, 6], Some(6))
    );
    // Limits over the maximum are clamped; 0 and non-version cursors are refused.
    let big = s
        .get_credential_page("o", "n", None, 1_000_000)
        .await
        .unwrap();
    assert_eq!(big.versions, whole.versions);
    assert_invalid(s.get_credential_page("o", "n", None, 0).await);
    assert_invalid(s.get_credential_page("o", "n", Some(0), 3).await);
    assert_invalid(
        s.get_credential_page("o", "n", Some(i32::MAX as u32 + 1), 3)
            .await,
    );
    assert_invalid(s.get_credential_page("", "n", None, 3).await);
    // Only this owner's credential; gone once destroyed as a whole.
    let theirs = s.get_credential_page("p", "n", None, 10).await.unwrap();
    assert_eq!(numbers(&theirs), [1]);
    assert_not_found(s.get_credential_page("q", "n", None, 10).await);
    s.destroy_credential("o", "n", t0()).await.unwrap();
    assert_not_found(s.get_credential_page("o", "n", None, 10).await);
}

fn allowance(per_minute: u32) -> crate::RateLimit {
    crate::RateLimit::per_minute(
        crate::RateScope::Verify,
        std::num::NonZeroU32::new(per_minute).unwrap(),
    )
}

/// Takes `n` from `key`'s allowance at `at`, each on the next of `stores` in turn; panics on
/// a refusal.
async fn take_all(
    stores: &[Arc<dyn Store>],
    key: &str,
    limit: crate::RateLimit,
    n: usize,
    at: OffsetDateTime,
) {
    for i in 0..n {
        let wait = stores[i % stores.len()]
            .take_allowance(limit, key, at)
            .await
            .unwrap();
        assert_eq!(wait, None, "take {i} of {n} for {key} was refused");
    }
}

/// An allowance is one per key across every store handle (the nodes of a deployment), a
/// reopened store keeps it, it refills one request per interval, and spent-and-refilled
/// state is deleted as takes go on.
pub async fn allowances_are_shared_kept_and_refilled(b: &dyn TestBackend) {
    let five = allowance(5); // one every 12 s
    let nodes = [open(b).await, open(b).await, open(b).await];
    take_all(&nodes, "alice", five, 5, t0()).await;
    for node in &nodes {
        assert_eq!(
            node.take_allowance(five, "alice", t0()).await.unwrap(),
            Some(std::time::Duration::from_secs(12)),
            "spent on every node"
        );
    }
    // Another key has its own allowance.
    take_all(&nodes, "bob", five, 5, t0()).await;
    drop(nodes);

    // A restart does not refill it.
    let store = open(b).await;
    assert_eq!(
        store
            .take_allowance(five, "alice", t0() + Duration::seconds(2))
            .await
            .unwrap(),
        Some(std::time::Duration::from_secs(10))
    );
    // One more each 12 s, not more.
    let later = t0() + Duration::seconds(12);
    assert_eq!(
        store.take_allowance(five, "alice", later).await.unwrap(),
        None
    );
    assert!(store
        .take_allowance(five, "alice", later)
        .await
        .unwrap()
        .is_some());
    // A refusal takes nothing: still due at 24 s.
    let due = t0() + Duration::seconds(24);
    assert_eq!(
        store.take_allowance(five, "alice", due).await.unwrap(),
        None
    );

    // An hour on, both are full again: five at once, and the rows of full allowances go.
    assert_eq!(b.raw_allowance_rows().await.unwrap(), 2);
    let hour = t0() + Duration::hours(1);
    take_all(&[Arc::clone(&store)], "carol", five, 1, hour).await;
    assert_eq!(
        b.raw_allowance_rows().await.unwrap(),
        1,
        "alice's and bob's full allowances deleted, carol's kept"
    );
    take_all(&[Arc::clone(&store)], "alice", five, 5, hour).await;
    assert!(store
        .take_allowance(five, "alice", hour)
        .await
        .unwrap()
        .is_some());

    // A row goes once its allowance has been full for a minute, not before: erin's is full
    // from 12 s after her take.
    let t = t0() + Duration::hours(2);
    take_all(&[Arc::clone(&store)], "erin", five, 1, t).await;
    assert_eq!(
        b.raw_allowance_rows().await.unwrap(),
        1,
        "the others' rows went"
    );
    let full_59_s = t + Duration::seconds(12 + 59);
    take_all(&[Arc::clone(&store)], "frank", five, 1, full_59_s).await;
    assert_eq!(b.raw_allowance_rows().await.unwrap(), 2, "erin's row kept");
    let full_61_s = t + Duration::seconds(12 + 61);
    take_all(&[Arc::clone(&store)], "gina", five, 1, full_61_s).await;
    assert_eq!(
        b.raw_allowance_rows().await.unwrap(),
        2,
        "erin's row went, frank's and gina's kept"
    );

    // A take on a clock an hour ahead (another node's, or this one's before it was set
    // right) spends the allowance, but does not lock the key out for that hour: five minutes
    // at most, then one more request each interval, on every node.
    let now = t0() + Duration::hours(3);
    let ahead = now + Duration::hours(1);
    take_all(&[Arc::clone(&store)], "hank", five, 5, ahead).await;
    assert!(store
        .take_allowance(five, "hank", now)
        .await
        .unwrap()
        .is_some());
    let other = open(b).await;
    let later = now + Duration::minutes(5) + Duration::seconds(12);
    assert_eq!(
        other.take_allowance(five, "hank", later).await.unwrap(),
        None,
        "locked out for the hour the clock was ahead"
    );
    assert!(store
        .take_allowance(five, "hank", later)
        .await
        .unwrap()
        .is_some());
    // A node a minute behind pulls back nothing: what the others took stays taken.
    take_all(&[Arc::clone(&store)], "ivan", five, 5, now).await;
    assert!(other
        .take_allowance(five, "ivan", now - Duration::minutes(1))
        .await
        .unwrap()
        .is_some());
    assert!(
        store
            .take_allowance(five, "ivan", now)
            .await
            .unwrap()
            .is_some(),
        "a node behind gave the allowance back"
    );

    // A key is an owner id.
    for bad in ["", &"x".repeat(MAX_OWNER_LEN + 1)] {
        assert!(matches!(
            store.take_allowance(five, bad, hour).await,
            Err(StoreError::InvalidInput(_))
        ));
    }
}

/// Takes racing on several handles never let more through than the allowance, while the
/// same takes delete old rows (the racing key's own among them).
pub async fn allowance_holds_under_racing_takes(b: &dyn TestBackend) {
    const RACERS: usize = 30;
    let nodes = [open(b).await, open(b).await, open(b).await];
    for (round, per_minute) in [(0u32, 7u32), (1, 1), (2, 29)] {
        let key = format!("racer-{round}");
        let limit = allowance(per_minute);
        // Rows full for an hour by the race: every take of it may delete some.
        let then = t0() + Duration::hours(i64::from(round) * 2);
        let old: Vec<String> = (0..40).map(|i| format!("old-{round}-{i}")).collect();
        take_all(&nodes, &key, limit, 1, then).await;
        for k in &old {
            take_all(&nodes, k, limit, 1, then).await;
        }
        let at = then + Duration::hours(1);
        let takes: Vec<_> = (0..RACERS)
            .map(|i| {
                let node = Arc::clone(&nodes[i % nodes.len()]);
                let key = key.clone();
                tokio::spawn(async move { node.take_allowance(limit, &key, at).await })
            })
            .collect();
        let mut taken = 0;
        for t in takes {
            if t.await.unwrap().unwrap().is_none() {
                taken += 1;
            }
        }
        assert_eq!(taken, per_minute as usize, "round {round}");
    }
}
