//! Data directories that older builds wrote open with this one: every value still reveals,
//! nothing disabled or destroyed comes back, and the audit log still verifies.
//!
//! Each `tests/fixtures/upgrade/<fixture>/data` is a `serve --dev` data directory that an old
//! build wrote through its own API (`make_fixture.py` there, and its README: which commit,
//! which commands); `manifest.json` beside it says what each credential and version holds and
//! what the old server answered. The test copies one to a temp dir, serves it with this
//! build's `serve --dev` (which migrates the store), and holds every answer to the manifest.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::dev::{mint, start_dev, DevServer};
use common::{manifest_dir, read_json, rt, stdout_of, strongroom};
use serde_json::{json, Value};
use strongroom_server::testing::{TestClient, TestResponse};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Every fixture, oldest first; [`every_fixture_has_a_test`] keeps this list whole.
const FIXTURES: &[&str] = &["schema2-5c1361c", "schema4-4e2c131", "schema8-1ddada7"];

fn fixture_dir(name: &str) -> PathBuf {
    manifest_dir().join("tests/fixtures/upgrade").join(name)
}

/// The fixture's data directory, copied to `to` with the modes the server insists on (git
/// keeps neither 0700 nor 0600).
fn copy_data(name: &str, to: &Path) {
    std::fs::create_dir(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
    for entry in std::fs::read_dir(fixture_dir(name).join("data")).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        std::fs::copy(entry.path(), &dest).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A running upgraded server and its callers' tokens.
struct Upgraded {
    rt: tokio::runtime::Runtime,
    server: DevServer,
    client: TestClient,
    service: String,
    admin: String,
    users: BTreeMap<String, String>,
}

impl Upgraded {
    fn start(data: &Path) -> Self {
        let server = start_dev(data, &[]);
        let client = server.client(data);
        // The tokens the old build stored in dev-tokens.json, read by this build.
        let service = server.export("SERVICE");
        let admin = server.export("ADMIN");
        let users = ["alice", "bob"]
            .into_iter()
            .map(|u| (u.to_owned(), mint(data, u)))
            .collect();
        Self {
            rt: rt(),
            server,
            client,
            service,
            admin,
            users,
        }
    }

    fn get(&self, path: &str, token: &str) -> TestResponse {
        self.rt
            .block_on(self.client.get(path, Some(token)))
            .unwrap()
    }

    fn send(&self, method: &str, path: &str, token: &str, body: Value) -> TestResponse {
        self.rt
            .block_on(self.client.json(method, path, Some(token), &body))
            .unwrap()
    }

    fn user(&self, owner: &str) -> &str {
        &self.users[owner]
    }

    fn reveal(&self, owner: &str, name: &str, version: Option<u64>) -> TestResponse {
        let body = match version {
            Some(v) => json!({ "version": v }),
            None => json!({}),
        };
        self.send(
            "POST",
            &format!("/v1/owners/{owner}/credentials/{name}/reveal"),
            &self.service,
            body,
        )
    }
}

fn time_of(v: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(v.as_str().unwrap(), &Rfc3339).unwrap()
}

/// What a version's listing says that the upgrade must keep.
fn version_facts(v: &Value) -> Value {
    json!({
        "version": v["version"],
        "state": v["state"],
        "created_by": v["created_by"],
        "metadata": v["metadata"],
        "created_at": time_of(&v["created_at"]).unix_timestamp_nanos().to_string(),
    })
}

/// What an audit record says that the upgrade must keep.
fn audit_facts(r: &Value) -> Value {
    json!([
        r["seq"],
        time_of(&r["time"]).unix_timestamp_nanos().to_string(),
        r["principal_kind"],
        r["principal_id"],
        r["action"],
        r["owner"],
        r["name"],
        r["version"],
        r["outcome"],
        r["status"],
    ])
}

/// Every record of `GET /v1/audit?{query}` numbered up to `upto`, oldest first.
fn audit_upto(up: &Upgraded, query: &str, upto: u64) -> Vec<Value> {
    let sep = if query.is_empty() { "" } else { "&" };
    let r = up.get(&format!("/v1/audit?{query}{sep}limit=1000"), &up.admin);
    assert_eq!(r.status, 200, "{query}: {}", r.text());
    let page = r.json();
    assert!(page["next_cursor"].is_null(), "{query}: more than a page");
    let mut records: Vec<Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["seq"].as_u64().unwrap() <= upto)
        .map(audit_facts)
        .collect();
    records.reverse();
    records
}

fn check_credentials(up: &Upgraded, manifest: &Value, fixture: &str) {
    let credentials = manifest["credentials"].as_array().unwrap();
    let old_views = &manifest["old_views"];
    for c in credentials {
        let (owner, name) = (c["owner"].as_str().unwrap(), c["name"].as_str().unwrap());
        let at = format!("{fixture}: {owner}/{name}");
        let describe = up.get(&format!("/v1/me/credentials/{name}"), up.user(owner));
        let versions = c["versions"].as_object().unwrap();
        let values: Vec<&str> = versions
            .values()
            .filter_map(|v| v["value"].as_str())
            .collect();
        let leaks = |r: &TestResponse| values.iter().any(|v| r.text().contains(v));

        if c["state"] == "deleted" {
            // Destroyed as a whole: gone, and nothing reveals.
            assert_eq!(describe.status, 404, "{at}: {}", describe.text());
            let r = up.reveal(owner, name, None);
            assert!(
                matches!(r.status, 404 | 410),
                "{at}: {} {}",
                r.status,
                r.text()
            );
            assert!(!leaks(&r), "{at}");
            for v in versions.keys() {
                let r = up.reveal(owner, name, Some(v.parse().unwrap()));
                assert!(matches!(r.status, 404 | 410), "{at} v{v}: {}", r.status);
                assert!(!leaks(&r), "{at} v{v}");
            }
            continue;
        }

        // The credential and its versions read as the old server showed them.
        assert_eq!(describe.status, 200, "{at}: {}", describe.text());
        let now = describe.json();
        let old = &old_views[format!("{owner}/{name}")]["body"];
        assert_eq!(now["state"], c["state"], "{at}");
        assert_eq!(now["current_version"], c["current_version"], "{at}");
        assert_eq!(now["state"], old["state"], "{at}");
        assert_eq!(now["current_version"], old["current_version"], "{at}");
        assert_eq!(
            time_of(&now["created_at"]),
            time_of(&old["created_at"]),
            "{at}"
        );
        assert!(now["versions_next_cursor"].is_null(), "{at}");
        let now_versions: Vec<Value> = now["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(version_facts)
            .collect();
        let old_versions: Vec<Value> = old["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(version_facts)
            .collect();
        assert_eq!(now_versions, old_versions, "{at}: versions");
        for v in now["versions"].as_array().unwrap() {
            assert_eq!(v["expired"], false, "{at}: {v}");
            assert_eq!(v["metadata_unreadable"], false, "{at}: {v}");
        }
        // And as the manifest says (what was written, independently of any view).
        let listed: BTreeSet<String> = now["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].to_string())
            .collect();
        assert_eq!(
            listed,
            versions.keys().cloned().collect::<BTreeSet<_>>(),
            "{at}"
        );
        for v in now["versions"].as_array().unwrap() {
            let want = &versions[&v["version"].to_string()];
            assert_eq!(v["state"], want["state"], "{at}: {v}");
            let metadata = match &want["metadata"] {
                Value::Null => json!({}),
                m => m.clone(),
            };
            assert_eq!(v["metadata"], metadata, "{at}: {v}");
            assert_eq!(v["created_by"], want["created_by"], "{at}: {v}");
        }

        // Every value reveals to exactly what was written; nothing else does.
        let disabled = c["state"] == "disabled";
        let r = up.reveal(owner, name, None);
        if disabled {
            assert_eq!(r.status, 409, "{at}: {}", r.text());
            assert_eq!(r.json()["error"]["code"], "credential_disabled", "{at}");
            assert!(!leaks(&r), "{at}");
        } else {
            assert_eq!(r.status, 200, "{at}: {}", r.text());
            let current = &versions[&c["current_version"].to_string()];
            assert_eq!(r.json()["value"], current["value"], "{at}");
            assert_eq!(r.json()["version"], c["current_version"], "{at}");
        }
        for (v, want) in versions {
            let r = up.reveal(owner, name, Some(v.parse().unwrap()));
            let at = format!("{at} v{v}");
            if disabled {
                assert_eq!(r.status, 409, "{at}: {}", r.text());
                assert!(!leaks(&r), "{at}");
            } else if want["state"] == "destroyed" {
                assert_eq!(r.status, 410, "{at}: {}", r.text());
                assert_eq!(r.json()["error"]["code"], "version_destroyed", "{at}");
                assert!(!leaks(&r), "{at}");
            } else {
                assert_eq!(r.status, 200, "{at}: {}", r.text());
                assert_eq!(r.json()["value"], want["value"], "{at}");
                assert_eq!(r.json()["version"].to_string(), *v, "{at}");
            }
        }
    }

    // Each owner's list: every credential not destroyed, in the state the manifest says.
    for owner in ["alice", "bob"] {
        let r = up.get("/v1/me/credentials?limit=1000", up.user(owner));
        assert_eq!(r.status, 200, "{}", r.text());
        let listed: BTreeMap<String, Value> = r.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let facts = json!([i["state"], i["current_version"], i["metadata"]]);
                (i["name"].as_str().unwrap().to_owned(), facts)
            })
            .collect();
        let want: BTreeMap<String, Value> = credentials
            .iter()
            .filter(|c| c["owner"] == owner && c["state"] != "deleted")
            .map(|c| {
                let current = &c["versions"][c["current_version"].to_string()];
                let metadata = match &current["metadata"] {
                    Value::Null => json!({}),
                    m => m.clone(),
                };
                let facts = json!([c["state"], c["current_version"], metadata]);
                (c["name"].as_str().unwrap().to_owned(), facts)
            })
            .collect();
        assert_eq!(listed, want, "{fixture}: {owner}'s list");
    }
}

/// The old build's audit records, found by this build's queries: every filter (each reads
/// its own index, which the migrations filled from the old log) finds what the old full
/// listing holds.
fn check_old_audit(up: &Upgraded, manifest: &Value, fixture: &str) {
    let old: Vec<&Value> = manifest["old_audit"].as_array().unwrap().iter().collect();
    let upto = old.last().unwrap()["seq"].as_u64().unwrap();
    let facts = |keep: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        old.iter()
            .filter(|r| keep(r))
            .map(|r| audit_facts(r))
            .collect()
    };
    assert_eq!(audit_upto(up, "", upto), facts(&|_| true), "{fixture}: all");
    let (since, until) = (&old[old.len() / 4]["time"], &old[old.len() * 3 / 4]["time"]);
    let (since_t, until_t) = (time_of(since), time_of(until));
    for (query, keep) in [
        (
            "owner=alice",
            &(|r: &Value| r["owner"] == "alice") as &dyn Fn(&Value) -> bool,
        ),
        ("owner=bob", &|r: &Value| r["owner"] == "bob"),
        ("name=zoom.api-key", &|r: &Value| {
            r["name"] == "zoom.api-key"
        }),
        ("owner=alice&name=github.token", &|r: &Value| {
            r["owner"] == "alice" && r["name"] == "github.token"
        }),
        ("principal=dev-service", &|r: &Value| {
            r["principal_id"] == "dev-service"
        }),
        ("principal=bob", &|r: &Value| r["principal_id"] == "bob"),
    ] {
        let want = facts(keep);
        assert!(!want.is_empty(), "{fixture}: {query} matches nothing");
        assert_eq!(audit_upto(up, query, upto), want, "{fixture}: {query}");
    }
    let window = format!(
        "since={}&until={}",
        since.as_str().unwrap(),
        until.as_str().unwrap()
    );
    let want = facts(&|r: &Value| {
        let t = time_of(&r["time"]);
        t >= since_t && t < until_t
    });
    assert!(!want.is_empty());
    assert_eq!(audit_upto(up, &window, upto), want, "{fixture}: {window}");
}

/// `audit verify` with this build: OK, and how many records.
fn audit_verify(data: &Path) -> u64 {
    let out = stdout_of(
        strongroom()
            .args(["audit", "verify", "--data-dir"])
            .arg(data),
    );
    let out = String::from_utf8(out).unwrap();
    let n = out
        .strip_prefix("audit log OK: ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("audit verify said {out}"));
    n.parse().unwrap()
}

fn upgrade(fixture: &str) {
    let manifest = read_json(&fixture_dir(fixture).join("manifest.json"));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_data(fixture, &data);
    let old_records: u64 = manifest["old_audit_verify"]
        .as_str()
        .and_then(|s| s.strip_prefix("audit log OK: "))
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();

    let up = Upgraded::start(&data);
    check_credentials(&up, &manifest, fixture);
    check_old_audit(&up, &manifest, fixture);

    // Writes go on: a new credential, a new version of an old one, the disabled one enabled.
    let alice = up.user("alice").to_owned();
    let r = up.send(
        "PUT",
        "/v1/me/credentials/after.upgrade",
        &alice,
        json!({"value": "new-after-upgrade", "metadata": {"host": "api.example.com"}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = up.reveal("alice", "after.upgrade", None);
    assert_eq!(
        (r.status, r.json()["value"].clone()),
        (200, json!("new-after-upgrade"))
    );
    let zoom = manifest["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["owner"] == "alice" && c["name"] == "zoom.api-key")
        .unwrap();
    let next = zoom["current_version"].as_u64().unwrap() + 1;
    let r = up.send(
        "PUT",
        "/v1/me/credentials/zoom.api-key",
        &alice,
        json!({"value": "zoom-after-upgrade", "expected_version": next - 1}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["version"], next);
    let r = up.reveal("alice", "zoom.api-key", None);
    assert_eq!(
        (r.status, r.json()["value"].clone()),
        (200, json!("zoom-after-upgrade"))
    );
    let r = up.send(
        "POST",
        "/v1/me/credentials/stripe.secret/enable",
        &alice,
        json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let stripe = manifest["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["owner"] == "alice" && c["name"] == "stripe.secret")
        .unwrap();
    let r = up.reveal("alice", "stripe.secret", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["value"], stripe["versions"]["1"]["value"]);
    let r = up.send(
        "POST",
        "/v1/me/credentials/zoom.api-key/verify",
        &alice,
        json!({"value": "zoom-after-upgrade"}),
    );
    assert_eq!((r.status, r.json()["matches"].clone()), (200, json!(true)));
    let status = up.server.terminate();
    assert!(status.success(), "{status:?}");

    // The log verifies with its old records and this build's.
    let records = audit_verify(&data);
    assert!(
        records > old_records + 20,
        "{fixture}: {records} records after the upgrade, {old_records} before"
    );
    // The keyring the old build rotated: both versions, the second active.
    let keys: Value = serde_json::from_slice(&stdout_of(
        strongroom()
            .args(["keys", "list", "--json", "--data-dir"])
            .arg(&data),
    ))
    .unwrap();
    assert_eq!(
        common::key_states(&keys),
        [(1, "decrypt-only".to_owned()), (2, "active".to_owned())],
        "{fixture}: {keys}"
    );

    // A second start of the upgraded directory: nothing left to migrate, the same values.
    let again = Upgraded::start(&data);
    check_credentials_after_restart(&again, &manifest, fixture);
    assert!(again.server.terminate().success());
    assert!(audit_verify(&data) > records);
}

fn check_credentials_after_restart(up: &Upgraded, manifest: &Value, fixture: &str) {
    for c in manifest["credentials"].as_array().unwrap() {
        let (owner, name) = (c["owner"].as_str().unwrap(), c["name"].as_str().unwrap());
        for (v, want) in c["versions"].as_object().unwrap() {
            if want["state"] != "active" || c["state"] == "deleted" {
                continue;
            }
            let r = up.reveal(owner, name, Some(v.parse().unwrap()));
            assert_eq!(
                r.status,
                200,
                "{fixture}: {owner}/{name} v{v}: {}",
                r.text()
            );
            assert_eq!(
                r.json()["value"],
                want["value"],
                "{fixture}: {owner}/{name} v{v}"
            );
        }
    }
}

#[test]
fn every_fixture_has_a_test() {
    let mut found: Vec<String> = std::fs::read_dir(manifest_dir().join("tests/fixtures/upgrade"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().join("manifest.json").is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    found.sort();
    assert_eq!(found, FIXTURES);
}

/// 5c1361c sealed values under their place alone, before hosts were bound (13daf9e): its
/// versions whose metadata names a host (alice's and bob's `zoom.api-key`) reveal too.
#[test]
fn upgrade_from_schema_2_5c1361c() {
    upgrade("schema2-5c1361c");
}

#[test]
fn upgrade_from_schema_4_4e2c131() {
    upgrade("schema4-4e2c131");
}

#[test]
fn upgrade_from_schema_8_1ddada7() {
    upgrade("schema8-1ddada7");
}
