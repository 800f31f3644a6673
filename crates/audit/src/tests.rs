use time::macros::datetime;

use super::*;

fn event(i: u32) -> Event {
    Event {
        time: datetime!(2026-11-27 12:00 UTC) + time::Duration::seconds(i.into()),
        principal_kind: "service".into(),
        principal_id: "billing".into(),
        action: "reveal".into(),
        owner: Some(format!("user-{i}")),
        name: Some("zoom.api-key".into()),
        version: Some(i),
        outcome: "ok".into(),
        status: 200,
        request_id: Some(format!("req-{i}")),
        client_addr: Some("127.0.0.1:5000".into()),
        on_behalf_of: None,
        destination: None,
        error_code: None,
    }
}

fn log(n: u32) -> (Vec<Record>, Head, HeadKey) {
    let key = HeadKey::new([7; 32]);
    let mut records: Vec<Record> = Vec::new();
    for i in 1..=n {
        let prev = records.last().map(|r| (r.seq, r.hash));
        records.push(Record::next(prev, event(i)));
    }
    let last = records.last().map_or(GENESIS, |r| r.hash);
    let head = key.head(n.into(), last);
    (records, head, key)
}

fn verify(records: &[Record], head: &Head, key: &HeadKey) -> Result<u64, VerifyError> {
    let mut v = Verifier::new();
    for r in records {
        v.push(r)?;
    }
    v.finish(head, key)
}

#[test]
fn an_honest_log_verifies() {
    for n in [0, 1, 10] {
        let (records, head, key) = log(n);
        assert_eq!(verify(&records, &head, &key), Ok(n.into()));
    }
}

#[test]
fn an_edited_field_is_named_by_record() {
    let (mut records, head, key) = log(10);
    records[4].event.owner = Some("mallory".into());
    assert_eq!(verify(&records, &head, &key), Err(VerifyError::Tampered(5)));
    let (mut records, head, key) = log(10);
    records[6].event.outcome = "denied".into();
    assert_eq!(verify(&records, &head, &key), Err(VerifyError::Tampered(7)));
}

#[test]
fn an_edited_and_rehashed_record_breaks_the_next_link() {
    let (mut records, head, key) = log(10);
    records[4].event.action = "list".into();
    records[4].hash = record_hash(5, &records[4].event, &records[4].prev_hash);
    assert_eq!(verify(&records, &head, &key), Err(VerifyError::Chain(6)));
}

#[test]
fn deleted_inserted_and_swapped_records_are_found() {
    let (mut records, head, key) = log(10);
    records.remove(3);
    assert_eq!(
        verify(&records, &head, &key),
        Err(VerifyError::Sequence {
            expected: 4,
            found: 5
        })
    );
    let (mut records, head, key) = log(10);
    records.swap(2, 3);
    assert_eq!(
        verify(&records, &head, &key),
        Err(VerifyError::Sequence {
            expected: 3,
            found: 4
        })
    );
    let (mut records, head, key) = log(10);
    let mut fake = records[2].clone();
    fake.seq = 4;
    records.insert(3, fake);
    assert_eq!(verify(&records, &head, &key), Err(VerifyError::Chain(4)));
}

#[test]
fn truncation_and_rollback_need_the_head() {
    let (mut records, head, key) = log(10);
    records.truncate(8);
    assert_eq!(
        verify(&records, &head, &key),
        Err(VerifyError::Length { found: 8, head: 10 })
    );
    // Rolled back with a head recomputed without the key: the MAC fails.
    let forged = Head {
        count: 8,
        hash: records[7].hash,
        mac: head.mac,
    };
    assert_eq!(verify(&records, &forged, &key), Err(VerifyError::HeadMac));
    // The wrong key.
    let (records, head, _) = log(3);
    assert_eq!(
        verify(&records, &head, &HeadKey::new([8; 32])),
        Err(VerifyError::HeadMac)
    );
}

#[test]
fn records_round_trip_through_json_and_hold_no_extra_fields() {
    let (records, _, _) = log(2);
    let text = serde_json::to_string(&records[1]).unwrap();
    let back: Record = serde_json::from_str(&text).unwrap();
    assert_eq!(back, records[1]);
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["value"] = "smuggled".into();
    assert!(
        serde_json::from_value::<Record>(v).is_err(),
        "unknown fields are refused"
    );
    assert!(!format!("{:?}", HeadKey::new([9; 32])).contains('9'));
}

/// Derived keys are stable for a key and label, differ by label and by key, and are not the
/// key itself.
#[test]
fn derived_keys_depend_on_the_key_and_the_label() {
    let k = HeadKey::new([7; 32]);
    let a = k.derive(b"usage-cursor/1");
    assert_eq!(*a, *HeadKey::new([7; 32]).derive(b"usage-cursor/1"));
    assert_ne!(*a, *k.derive(b"usage-cursor/2"));
    assert_ne!(*a, *HeadKey::new([8; 32]).derive(b"usage-cursor/1"));
    assert_ne!(*a, [7; 32]);
}

/// A log cut at an anchor verifies from it; the anchor's MAC covers seq, hash and puts, in a
/// domain of its own (a head's MAC is no anchor's); records removed past the anchor, or an
/// anchor rolled back, break the sequence at the first record kept.
#[test]
fn an_anchor_resumes_the_chain_and_cannot_be_forged() {
    let (records, head, key) = log(10);
    let anchor = key.anchor(4, records[3].hash, 2);
    assert!(key.check_anchor(&anchor));
    let mut v = Verifier::after(anchor.seq, anchor.hash);
    for r in &records[4..] {
        v.push(r).unwrap();
    }
    assert_eq!(v.finish(&head, &key), Ok(10));

    // Every field is covered.
    for forged in [
        Anchor {
            seq: 5,
            ..anchor.clone()
        },
        Anchor {
            hash: records[4].hash,
            ..anchor.clone()
        },
        Anchor {
            puts: 3,
            ..anchor.clone()
        },
    ] {
        assert!(!key.check_anchor(&forged), "{forged:?}");
    }
    assert!(!HeadKey::new([8; 32]).check_anchor(&anchor));
    // A genuine head over the same (count, hash) is not an anchor, and back.
    let as_head = key.head(4, records[3].hash);
    assert!(!key.check_anchor(&Anchor {
        seq: 4,
        hash: records[3].hash,
        puts: 0,
        mac: as_head.mac,
    }));
    assert!(!key.check(&Head {
        count: 4,
        hash: records[3].hash,
        mac: anchor.mac,
    }));

    // One more record removed than the anchor covers.
    let mut v = Verifier::after(anchor.seq, anchor.hash);
    assert_eq!(
        v.push(&records[5]),
        Err(VerifyError::Sequence {
            expected: 5,
            found: 6
        })
    );
    // An anchor that does not match the record after it (an earlier record's hash).
    let mut v = Verifier::after(4, records[2].hash);
    assert_eq!(v.push(&records[4]), Err(VerifyError::Chain(5)));
}

#[test]
fn anchors_round_trip_through_json() {
    let key = HeadKey::new([7; 32]);
    let anchor = key.anchor(9, [3; 32], 4);
    let text = serde_json::to_string(&anchor).unwrap();
    assert_eq!(serde_json::from_str::<Anchor>(&text).unwrap(), anchor);
    let (records, _, _) = log(2);
    assert!(!is_counted_put(&records[0]));
    let mut put = records[0].clone();
    put.event.action = "put".into();
    assert!(is_counted_put(&put));
    put.event.outcome = "denied".into();
    assert!(!is_counted_put(&put));
}

/// An archive file's anchor covers where the file starts as well as where it ends: every
/// field is in its MAC, and its version must be 2.
#[test]
fn an_archive_anchor_covers_the_start_and_the_end() {
    let (records, _, key) = log(10);
    let end = key.anchor(8, records[7].hash, 3);
    let a = key.archive_anchor(5, records[3].hash, &end);
    assert_eq!(
        (a.version, a.from_seq, a.from_hash, a.seq, a.hash, a.puts),
        (2, 5, records[3].hash, 8, records[7].hash, 3)
    );
    assert!(key.check_archive_anchor(&a));
    for forged in [
        ArchiveAnchor {
            from_seq: 4,
            ..a.clone()
        },
        ArchiveAnchor {
            from_seq: 6,
            ..a.clone()
        },
        ArchiveAnchor {
            from_hash: records[2].hash,
            ..a.clone()
        },
        ArchiveAnchor {
            from_hash: GENESIS,
            ..a.clone()
        },
        ArchiveAnchor {
            seq: 9,
            ..a.clone()
        },
        ArchiveAnchor {
            hash: records[8].hash,
            ..a.clone()
        },
        ArchiveAnchor {
            puts: 4,
            ..a.clone()
        },
        ArchiveAnchor {
            version: 3,
            ..a.clone()
        },
    ] {
        assert!(!key.check_archive_anchor(&forged), "{forged:?}");
    }
    assert!(!HeadKey::new([8; 32]).check_archive_anchor(&a));
    // The first archive starts at record 1, after the genesis hash.
    let first = key.archive_anchor(1, GENESIS, &end);
    assert!(key.check_archive_anchor(&first));
    assert_ne!(first.mac, a.mac);
}

/// Heads, store anchors (v1) and archive anchors (v2) are MAC'd in three domains: no MAC of
/// one verifies as another's over the same numbers, either way.
#[test]
fn heads_and_both_anchor_versions_never_verify_as_one_another() {
    let (records, _, key) = log(10);
    let hash = records[5].hash;
    let head = key.head(6, hash);
    let v1 = key.anchor(6, hash, 0);
    // A v2 anchor whose extra fields are zero, so its numbers are as close to the others'
    // as they can be.
    let v2 = key.archive_anchor(0, [0; 32], &v1);
    let v2_genuine = key.archive_anchor(1, GENESIS, &v1);
    assert!(key.check(&head) && key.check_anchor(&v1));
    assert!(key.check_archive_anchor(&v2) && key.check_archive_anchor(&v2_genuine));
    for mac in [head.mac, v2.mac, v2_genuine.mac] {
        assert!(!key.check_anchor(&Anchor { mac, ..v1.clone() }));
    }
    for mac in [v1.mac, v2.mac, v2_genuine.mac] {
        assert!(!key.check(&Head {
            mac,
            ..head.clone()
        }));
    }
    for mac in [head.mac, v1.mac] {
        assert!(!key.check_archive_anchor(&ArchiveAnchor { mac, ..v2.clone() }));
        assert!(!key.check_archive_anchor(&ArchiveAnchor {
            mac,
            ..v2_genuine.clone()
        }));
    }
    // The three MACs differ pairwise, and none is a derived key.
    assert_ne!(head.mac, v1.mac);
    assert_ne!(v1.mac, v2.mac);
    assert_ne!(head.mac, v2.mac);
    assert_ne!(*key.derive(b"strongroom-audit-anchor-v2"), v2.mac);
}

/// The two anchor files never parse as each other: a v2 anchor with its start removed is
/// not a v1 anchor unless its version goes too (and then its MAC, v2's, fails as v1's).
#[test]
fn archive_anchors_round_trip_and_never_parse_as_v1() {
    let (records, _, key) = log(4);
    let end = key.anchor(4, records[3].hash, 0);
    let a = key.archive_anchor(1, GENESIS, &end);
    let text = serde_json::to_string(&a).unwrap();
    assert!(text.contains("\"version\":2"), "{text}");
    assert_eq!(serde_json::from_str::<ArchiveAnchor>(&text).unwrap(), a);
    assert!(serde_json::from_str::<Anchor>(&text).is_err());
    let v1 = serde_json::to_string(&end).unwrap();
    assert!(serde_json::from_str::<ArchiveAnchor>(&v1).is_err());
    let mut stripped: serde_json::Value = serde_json::from_str(&text).unwrap();
    for field in ["version", "from_seq", "from_hash"] {
        stripped.as_object_mut().unwrap().remove(field);
    }
    let downgraded: Anchor = serde_json::from_value(stripped).unwrap();
    assert!(!key.check_anchor(&downgraded));
}
