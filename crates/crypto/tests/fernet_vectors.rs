//! Fernet and django-fernet-fields vectors made by the real Python libraries (shared/vectors).
//!
//! The folder is found through `STRONGROOM_VECTORS_DIR`, else `shared/vectors` beside the
//! repository clone. A missing folder is a failure, never a skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use secrecy::ExposeSecret;
use serde::Deserialize;
use strongroom_crypto::django::{self, DjangoSettings};
use strongroom_crypto::fernet::{Fernet, FernetError, FernetKey, MultiFernet, Token};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// This package's directory, read when the test runs: cargo sets `CARGO_MANIFEST_DIR` for the
/// tests it runs, and a test binary that cargo reused from another checkout (a shared
/// `CARGO_TARGET_DIR`) would otherwise read that checkout's files through its compiled-in path.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn vectors_dir() -> PathBuf {
    let dir = match std::env::var_os("STRONGROOM_VECTORS_DIR") {
        Some(d) => PathBuf::from(d),
        None => manifest_dir().join("../../../shared/vectors"),
    };
    assert!(
        dir.join("fernet-spec").is_dir() && dir.join("django-fernet-fields").is_dir(),
        "Fernet test vectors not found at {}: put the shared/ folder beside the repository \
         clone or set STRONGROOM_VECTORS_DIR",
        dir.display()
    );
    dir
}

fn load<T: for<'de> Deserialize<'de>>(rel: &str) -> T {
    let path = vectors_dir().join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

fn unix(rfc3339: &str) -> u64 {
    let t = OffsetDateTime::parse(rfc3339, &Rfc3339)
        .unwrap_or_else(|e| panic!("bad RFC 3339 time {rfc3339:?}: {e}"));
    u64::try_from(t.unix_timestamp()).expect("vector times are after 1970")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex16(s: &str) -> [u8; 16] {
    assert_eq!(s.len(), 32, "IV hex {s:?}");
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex digit");
    }
    out
}

fn key(b64: &str) -> FernetKey {
    FernetKey::from_base64(b64).expect("vector key is a valid Fernet key")
}

fn b64(k: &FernetKey) -> String {
    k.to_base64().expose_secret().to_owned()
}

// ---------------------------------------------------------------------------------------------
// fernet-spec
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Generate {
    token: String,
    now: String,
    iv: Vec<u8>,
    src: String,
    secret: String,
}

#[derive(Deserialize)]
struct Verify {
    token: String,
    now: String,
    ttl_sec: u64,
    src: String,
    secret: String,
}

#[derive(Deserialize)]
struct Invalid {
    desc: String,
    token: String,
    now: String,
    ttl_sec: u64,
    secret: String,
}

#[derive(Deserialize)]
struct Quirk {
    desc: String,
    token: String,
    secret: String,
    src: String,
    pyca_accepts: bool,
}

#[test]
fn spec_generate() {
    let mut n = 0;
    for file in [
        "fernet-spec/generate.json",
        "fernet-spec/generated/generate.json",
    ] {
        let cases: Vec<Generate> = load(file);
        assert!(!cases.is_empty(), "{file} is empty");
        for c in cases {
            let iv: [u8; 16] = c.iv.as_slice().try_into().expect("16-byte IV");
            let ts = unix(&c.now);
            let f = Fernet::new(key(&c.secret));
            assert_eq!(
                f.encrypt_with_parts(c.src.as_bytes(), ts, iv),
                c.token,
                "{file}: token for {:?}",
                c.now
            );
            let tok = Token::decode(&c.token).expect("generated token parses");
            assert_eq!((tok.timestamp, tok.iv), (ts, iv));
            let plain = f.decrypt(&c.token, None, 0).expect("generated token opens");
            assert_eq!(plain.expose_secret(), c.src.as_bytes());
            n += 1;
        }
    }
    assert!(n >= 2);
}

#[test]
fn spec_verify() {
    let mut n = 0;
    for file in [
        "fernet-spec/verify.json",
        "fernet-spec/generated/verify.json",
    ] {
        let cases: Vec<Verify> = load(file);
        assert!(!cases.is_empty(), "{file} is empty");
        for c in cases {
            let now = unix(&c.now);
            let plain = Fernet::new(key(&c.secret))
                .decrypt(&c.token, Some(c.ttl_sec), now)
                .unwrap_or_else(|e| panic!("{file}: {} at {}: {e}", c.token, c.now));
            assert_eq!(plain.expose_secret(), c.src.as_bytes(), "{file}");

            // Behind an unrelated key, MultiFernet finds it with the second key.
            let m = MultiFernet::new(vec![
                Fernet::new(FernetKey::from_bytes([0x5a; 32])),
                Fernet::new(key(&c.secret)),
            ])
            .expect("two keys");
            let (plain, idx) = m
                .decrypt_with_index(&c.token, Some(c.ttl_sec), now)
                .expect("MultiFernet opens it");
            assert_eq!((plain.expose_secret(), idx), (c.src.as_bytes(), 1));
            n += 1;
        }
    }
    assert!(n >= 2);
}

/// The error kind an invalid vector must produce, from its description. Unknown descriptions
/// fail the test so that new kinds of vectors get a deliberate mapping.
fn expected_kind(desc: &str) -> FernetError {
    let d = desc.to_ascii_lowercase();
    let rules: &[(&str, FernetError)] = &[
        ("expired", FernetError::Expired),
        ("skew", FernetError::ClockSkew),
        // Cut to 31 bytes, the HMAC leaves a length that is not header + blocks + 32.
        ("hmac truncated", FernetError::Malformed),
        ("incorrect mac", FernetError::InvalidToken),
        ("wrong key", FernetError::InvalidToken),
        ("padding error", FernetError::InvalidToken),
        ("invalid base64", FernetError::Malformed),
        ("'=' padding", FernetError::Malformed),
        ("too short", FernetError::Malformed),
        ("empty token", FernetError::Malformed),
        ("version byte", FernetError::Malformed),
        ("not multiple of block size", FernetError::Malformed),
        ("no ciphertext block", FernetError::Malformed),
    ];
    rules
        .iter()
        .find(|(needle, _)| d.contains(needle))
        .map(|(_, kind)| kind.clone())
        .unwrap_or_else(|| panic!("no expected error kind for invalid vector {desc:?}"))
}

#[test]
fn spec_invalid() {
    let mut n = 0;
    for file in [
        "fernet-spec/invalid.json",
        "fernet-spec/generated/invalid.json",
    ] {
        let cases: Vec<Invalid> = load(file);
        assert!(!cases.is_empty(), "{file} is empty");
        for c in cases {
            let now = unix(&c.now);
            let want = expected_kind(&c.desc);
            let got = Fernet::new(key(&c.secret))
                .decrypt(&c.token, Some(c.ttl_sec), now)
                .map(|_| ())
                .expect_err(&format!("{file}: {:?} must be rejected", c.desc));
            assert_eq!(got, want, "{file}: {:?}", c.desc);

            let m = MultiFernet::new(vec![
                Fernet::new(FernetKey::from_bytes([0x5a; 32])),
                Fernet::new(key(&c.secret)),
            ])
            .expect("two keys");
            let got = m
                .decrypt_with_index(&c.token, Some(c.ttl_sec), now)
                .map(|_| ())
                .expect_err("MultiFernet rejects it too");
            assert_eq!(got, want, "{file} (MultiFernet): {:?}", c.desc);

            // Structural failures are exactly the ones the key-less parser sees.
            assert_eq!(
                Token::decode(&c.token).is_err(),
                want == FernetError::Malformed,
                "{file}: Token::decode on {:?}",
                c.desc
            );
            n += 1;
        }
    }
    assert!(n >= 16);
}

/// pyca decodes with Python's lenient `urlsafe_b64decode` (it skips whitespace, takes `+` and
/// `/`, ignores surplus `=`). We deliberately accept only the canonical spelling: it is the
/// only one django-fernet-fields stores, and a single spelling per token keeps the parser
/// small and its behaviour easy to fuzz and reason about. So the canonical quirk must open and
/// every other spelling, whatever pyca does with it, must be `Malformed`.
#[test]
fn decoding_quirks() {
    let cases: Vec<Quirk> = load("fernet-spec/decoding_quirks.json");
    let canonical: Vec<&Quirk> = cases
        .iter()
        .filter(|c| c.desc == "canonical token")
        .collect();
    assert_eq!(canonical.len(), 1, "exactly one canonical spelling");
    let canonical = canonical[0];
    assert!(canonical.pyca_accepts);
    let plain = Fernet::new(key(&canonical.secret))
        .decrypt(&canonical.token, None, 0)
        .expect("canonical token opens");
    assert_eq!(plain.expose_secret(), canonical.src.as_bytes());

    let mut rejected = 0;
    for c in cases.iter().filter(|c| c.desc != "canonical token") {
        assert_ne!(c.token, canonical.token, "{:?}", c.desc);
        let got = Fernet::new(key(&c.secret))
            .decrypt(&c.token, None, 0)
            .map(|_| ())
            .expect_err(&format!(
                "{:?} (pyca accepts: {}) must be rejected",
                c.desc, c.pyca_accepts
            ));
        assert_eq!(got, FernetError::Malformed, "{:?}", c.desc);
        assert_eq!(Token::decode(&c.token).err(), Some(FernetError::Malformed));
        rejected += 1;
    }
    assert!(rejected >= 6);
}

// ---------------------------------------------------------------------------------------------
// django-fernet-fields
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct HkdfFile {
    algorithm: BTreeMap<String, serde_json::Value>,
    vectors: Vec<HkdfVector>,
}

#[derive(Deserialize)]
struct HkdfVector {
    input_key: String,
    input_utf8_hex: String,
    derived_fernet_key: String,
    signing_key_hex: String,
    encryption_key_hex: String,
}

#[test]
fn hkdf_derivation() {
    let file: HkdfFile = load("django-fernet-fields/hkdf_derivation.json");
    let salt = file.algorithm["salt_ascii"].as_str().expect("salt_ascii");
    let info = file.algorithm["info_ascii"].as_str().expect("info_ascii");
    assert_eq!(salt.as_bytes(), django::HKDF_SALT);
    assert_eq!(info.as_bytes(), django::HKDF_INFO);
    assert!(file.vectors.len() >= 3);
    for v in &file.vectors {
        assert_eq!(hex(v.input_key.as_bytes()), v.input_utf8_hex);
        let k = django::derive_key(v.input_key.as_bytes());
        assert_eq!(b64(&k), v.derived_fernet_key, "input {:?}", v.input_key);
        let raw = URL_SAFE.decode(b64(&k)).expect("base64");
        assert_eq!(hex(&raw[..16]), v.signing_key_hex);
        assert_eq!(hex(&raw[16..]), v.encryption_key_hex);
    }
}

#[derive(Deserialize)]
struct Setup {
    setup: String,
    settings: Settings,
    effective_fernet_keys: Vec<String>,
    fernet_class: String,
    phases: Vec<Phase>,
    #[serde(default)]
    read_checks: Vec<ReadCheck>,
    vectors: Vec<DjangoVector>,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct Settings {
    SECRET_KEY: Option<String>,
    FERNET_KEYS: Option<Vec<String>>,
    FERNET_USE_HKDF: Option<bool>,
}

impl Settings {
    fn django(&self) -> DjangoSettings<'_> {
        DjangoSettings {
            fernet_keys: self
                .FERNET_KEYS
                .as_ref()
                .map(|keys| keys.iter().map(String::as_str).collect()),
            secret_key: self.SECRET_KEY.as_deref(),
            use_hkdf: self.FERNET_USE_HKDF,
        }
    }

    fn multifernet(&self) -> MultiFernet {
        django::multifernet_from_settings(&self.django()).expect("settings give keys")
    }
}

#[derive(Deserialize)]
struct Phase {
    name: String,
    settings: Settings,
    effective_fernet_keys: Vec<String>,
}

#[derive(Deserialize)]
struct ReadCheck {
    name: String,
    settings: Settings,
    effective_fernet_keys: Vec<String>,
    results: Vec<ReadResult>,
}

#[derive(Deserialize)]
struct ReadResult {
    row_id: u64,
    label: String,
    readable: bool,
    error: Option<String>,
}

#[derive(Deserialize)]
struct DjangoVector {
    row_id: u64,
    label: String,
    column: String,
    stored_sqlite_type: String,
    token: Option<String>,
    plaintext_utf8: Option<String>,
    token_timestamp: Option<u64>,
    token_iv_hex: Option<String>,
    key_index: Option<usize>,
    /// Absent for NULL cells.
    written_in_phase: Option<String>,
}

fn combos() -> Vec<PathBuf> {
    let root = vectors_dir().join("django-fernet-fields");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert_eq!(
        dirs.len(),
        2,
        "two library/Django combinations in {}",
        root.display()
    );
    dirs
}

fn load_setup(dir: &Path, setup: &str) -> Setup {
    let path = dir.join(format!("{setup}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let s: Setup =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    assert_eq!(s.setup, setup);
    s
}

fn effective(settings: &Settings) -> Vec<String> {
    django::effective_keys(&settings.django())
        .expect("settings give keys")
        .iter()
        .map(b64)
        .collect()
}

/// Checks one setup in every library/Django combination.
fn django_setup(setup: &str) {
    let (mut tokens, mut nulls) = (0, 0);
    for dir in combos() {
        let s = load_setup(&dir, setup);
        let ctx = format!("{}/{setup}", dir.display());

        // Key derivation, for the final settings and every write phase.
        assert_eq!(effective(&s.settings), s.effective_fernet_keys, "{ctx}");
        assert_eq!(
            s.fernet_class == "MultiFernet",
            s.effective_fernet_keys.len() > 1,
            "{ctx}"
        );
        let phases: BTreeMap<&str, &Phase> =
            s.phases.iter().map(|p| (p.name.as_str(), p)).collect();
        for p in &s.phases {
            assert_eq!(
                effective(&p.settings),
                p.effective_fernet_keys,
                "{ctx} {}",
                p.name
            );
        }

        let m = s.settings.multifernet();
        assert_eq!(m.len(), s.effective_fernet_keys.len());
        for v in &s.vectors {
            let Some(token) = &v.token else {
                // SQL NULL: nothing was encrypted, so there is nothing to decrypt.
                assert_eq!(v.stored_sqlite_type, "null", "{ctx} {}", v.label);
                assert!(v.plaintext_utf8.is_none() && v.key_index.is_none());
                assert!(v.written_in_phase.is_none() && v.token_timestamp.is_none());
                nulls += 1;
                continue;
            };
            let what = format!("{ctx} row {} {} {}", v.row_id, v.label, v.column);
            assert_eq!(v.stored_sqlite_type, "blob", "{what}");
            let plaintext = v.plaintext_utf8.as_deref().expect("plaintext");
            let idx = v.key_index.expect("key_index");
            let ts = v.token_timestamp.expect("token_timestamp");
            let iv = unhex16(v.token_iv_hex.as_deref().expect("token_iv_hex"));

            // django-fernet-fields reads with no TTL: any `now` works, even 0.
            let (plain, got_idx) = m
                .decrypt_with_index(token, None, 0)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(plain.expose_secret(), plaintext.as_bytes(), "{what}");
            assert_eq!(got_idx, idx, "{what}");

            let parsed = Token::decode(token).expect("token parses");
            assert_eq!((parsed.timestamp, parsed.iv), (ts, iv), "{what}");

            // Rebuilt byte for byte from (key, timestamp, IV, plaintext).
            let f = Fernet::new(key(&s.effective_fernet_keys[idx]));
            assert_eq!(
                f.encrypt_with_parts(plaintext.as_bytes(), ts, iv),
                *token,
                "{what}"
            );

            // The phase that wrote it encrypted with its first key.
            let phase = phases[v.written_in_phase.as_deref().expect("written_in_phase")];
            assert_eq!(
                phase.effective_fernet_keys[0], s.effective_fernet_keys[idx],
                "{what}"
            );
            tokens += 1;
        }
        if setup == "d_rotation" {
            assert!(!s.read_checks.is_empty(), "{ctx}: rotation has read checks");
            check_reads(&ctx, &s);
        } else {
            assert!(s.read_checks.is_empty(), "{ctx}");
        }
    }
    assert!(tokens >= 2 * 42, "{setup}: only {tokens} tokens checked");
    assert!(nulls > 0, "{setup}: NULL vectors are present and skipped");
}

#[test]
fn django_a_single_key_hkdf() {
    django_setup("a_single_key_hkdf");
}

#[test]
fn django_b_hkdf_off() {
    django_setup("b_hkdf_off");
}

#[test]
fn django_c_secret_key_fallback() {
    django_setup("c_secret_key_fallback");
}

/// Includes the `read_checks` under other key lists.
#[test]
fn django_d_rotation() {
    django_setup("d_rotation");
}

/// Each read check opened every row under another key list; a row is readable when all its
/// non-NULL columns decrypt.
fn check_reads(ctx: &str, s: &Setup) {
    for check in &s.read_checks {
        assert_eq!(
            effective(&check.settings),
            check.effective_fernet_keys,
            "{ctx} {}",
            check.name
        );
        let m = check.settings.multifernet();
        assert!(!check.results.is_empty());
        for r in &check.results {
            let what = format!("{ctx} {} row {} {}", check.name, r.row_id, r.label);
            let cells: Vec<&DjangoVector> =
                s.vectors.iter().filter(|v| v.row_id == r.row_id).collect();
            assert!(!cells.is_empty(), "{what}: no vectors for this row");
            let mut readable = true;
            for v in &cells {
                assert_eq!(v.label, r.label, "{what}");
                let Some(token) = &v.token else { continue };
                match m.decrypt(token, None, 0) {
                    Ok(plain) => assert_eq!(
                        Some(plain.expose_secret()),
                        v.plaintext_utf8.as_deref().map(str::as_bytes),
                        "{what}"
                    ),
                    Err(e) => {
                        assert_eq!(e, FernetError::InvalidToken, "{what}");
                        readable = false;
                    }
                }
            }
            assert_eq!(readable, r.readable, "{what}");
            if !r.readable {
                assert_eq!(r.error.as_deref(), Some("cryptography.fernet.InvalidToken"));
            }
        }
    }
}
