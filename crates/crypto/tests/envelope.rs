//! Envelope format v1: binding, tamper detection, parsing and committed vectors.

use std::sync::Arc;

use proptest::prelude::*;
use strongroom_crypto::envelope::{self, EnvelopeError, Sealed};
use strongroom_crypto::testing::{FailingRandom, FakeProvider, SeededRandom};
use strongroom_crypto::{Binding, KeyProvider, OsRandom, SecretBytes};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn b(owner: &str, name: &str, version: u32) -> Binding {
    Binding::new(owner, name, version).unwrap()
}

async fn seal(p: &dyn KeyProvider, binding: &Binding, v: &[u8]) -> Sealed {
    envelope::seal(p, binding, &SecretBytes::from_slice(v), &OsRandom)
        .await
        .unwrap()
}

#[tokio::test]
async fn moved_to_another_owner_name_or_version_does_not_open() {
    let p = FakeProvider::new("k", 1);
    let home = b("alice", "zoom.api-key", 3);
    let sealed = seal(&p, &home, b"hunter2").await;
    assert_eq!(
        envelope::open(&p, &home, &sealed)
            .await
            .unwrap()
            .expose_secret(),
        b"hunter2"
    );
    for elsewhere in [
        b("bob", "zoom.api-key", 3),
        b("alice", "zoom.api-secret", 3),
        b("alice", "zoom.api-key", 2),
        b("alice", "zoom.api-key", 4),
        b("alic", "ezoom.api-key", 3),
        home.clone()
            .with_field("destinations", b"api.zoom.us")
            .unwrap(),
    ] {
        let err = envelope::open(&p, &elsewhere, &sealed).await.unwrap_err();
        assert!(
            matches!(err, EnvelopeError::Decrypt),
            "{elsewhere:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn extra_bound_fields_must_match() {
    let p = FakeProvider::new("k", 1);
    let home = b("alice", "n", 1)
        .with_field("destinations", b"api.zoom.us")
        .unwrap();
    let sealed = seal(&p, &home, b"v").await;
    assert!(envelope::open(&p, &home, &sealed).await.is_ok());
    let other = b("alice", "n", 1)
        .with_field("destinations", b"evil.example")
        .unwrap();
    assert!(matches!(
        envelope::open(&p, &other, &sealed).await,
        Err(EnvelopeError::Decrypt)
    ));
}

#[tokio::test]
async fn relabelled_or_moved_to_another_kek_does_not_open() {
    let p = FakeProvider::new("k", 1);
    let home = b("alice", "n", 1);
    let sealed = seal(&p, &home, b"v").await;
    p.rotate();
    // Same provider, the wrapped key claims version 2: the KEK and the AAD both differ.
    let mut relabelled = sealed.clone();
    relabelled.wrapped_key.kek.version = 2;
    assert!(matches!(
        envelope::open(&p, &home, &relabelled).await,
        Err(EnvelopeError::Decrypt)
    ));
    // A provider with another key id does not claim it at all.
    let stranger = FakeProvider::new("other", 1);
    assert!(matches!(
        envelope::open(&stranger, &home, &sealed).await,
        Err(EnvelopeError::UnknownKek(_))
    ));
    // Relabelled to the stranger's KEK: the stranger tries and fails to authenticate.
    let mut moved = sealed.clone();
    moved.wrapped_key.kek.key_id = "other".into();
    assert!(matches!(
        envelope::open(&stranger, &home, &moved).await,
        Err(EnvelopeError::Decrypt)
    ));
    // A wrapped key from another version of the same credential, grafted on.
    let v2 = seal(&p, &b("alice", "n", 2), b"w").await;
    let mut grafted = sealed.clone();
    grafted.wrapped_key = v2.wrapped_key;
    assert!(matches!(
        envelope::open(&p, &home, &grafted).await,
        Err(EnvelopeError::Decrypt)
    ));
}

#[tokio::test]
async fn rewrap_moves_to_the_new_kek_without_touching_the_value() {
    let p = FakeProvider::new("k", 1);
    let home = b("alice", "n", 1);
    let sealed = seal(&p, &home, b"v").await;
    p.rotate();
    let rewrapped = envelope::rewrap(&p, &p, &home, &sealed).await.unwrap();
    assert_eq!(rewrapped.wrapped_key.kek.version, 2);
    assert_eq!(
        (rewrapped.nonce, &rewrapped.ciphertext),
        (sealed.nonce, &sealed.ciphertext)
    );
    p.retire(1);
    assert_eq!(
        envelope::open(&p, &home, &rewrapped)
            .await
            .unwrap()
            .expose_secret(),
        b"v"
    );
    assert!(
        envelope::open(&p, &home, &sealed).await.is_err(),
        "retired KEK no longer opens"
    );
    // Moving to another provider is a rewrap too.
    let q = FakeProvider::new("q", 1);
    let moved = envelope::rewrap(&p, &q, &home, &rewrapped).await.unwrap();
    assert_eq!(
        envelope::open(&q, &home, &moved)
            .await
            .unwrap()
            .expose_secret(),
        b"v"
    );
}

#[tokio::test]
async fn limits_and_failing_randomness_are_errors() {
    let p = FakeProvider::new("k", 1);
    let home = b("alice", "n", 1);
    let big = SecretBytes::new(vec![0; envelope::MAX_PLAINTEXT_LEN + 1]);
    assert!(matches!(
        envelope::seal(&p, &home, &big, &OsRandom).await,
        Err(EnvelopeError::TooLarge)
    ));
    let v = SecretBytes::from_slice(b"v");
    assert!(matches!(
        envelope::seal(&p, &home, &v, &FailingRandom).await,
        Err(EnvelopeError::Random(_))
    ));
    let max = SecretBytes::new(vec![7; 64 * 1024]);
    let sealed = envelope::seal(&p, &home, &max, &OsRandom).await.unwrap();
    assert_eq!(
        envelope::open(&p, &home, &sealed)
            .await
            .unwrap()
            .expose_secret(),
        max.expose_secret()
    );
    let empty = seal(&p, &home, b"").await;
    assert!(envelope::open(&p, &home, &empty).await.unwrap().is_empty());
}

#[tokio::test]
async fn two_seals_of_one_value_share_nothing() {
    let p = FakeProvider::new("k", 1);
    let home = b("alice", "n", 1);
    let (x, y) = (
        seal(&p, &home, b"same").await,
        seal(&p, &home, b"same").await,
    );
    assert_ne!(x.ciphertext, y.ciphertext);
    assert_ne!(x.nonce, y.nonce);
    assert_ne!(x.wrapped_key.bytes, y.wrapped_key.bytes);
}

#[tokio::test]
async fn byte_encodings_round_trip() {
    let p = FakeProvider::new("k", 1);
    let sealed = seal(&p, &b("alice", "n", 1), b"value").await;
    let bytes = sealed.to_bytes().unwrap();
    assert_eq!(Sealed::from_bytes(&bytes).unwrap(), sealed);
    let parts = Sealed::from_parts(&sealed.value_bytes(), sealed.wrapped_key.clone()).unwrap();
    assert_eq!(parts, sealed);
    // No byte of the plaintext appears in either encoding.
    assert!(!bytes.windows(5).any(|w| w == b"value"));
    // Trailing bytes are part of the ciphertext, so they fail to authenticate, never ignored.
    let mut longer = bytes.clone();
    longer.push(0);
    let parsed = Sealed::from_bytes(&longer).unwrap();
    assert!(matches!(
        envelope::open(&p, &b("alice", "n", 1), &parsed).await,
        Err(EnvelopeError::Decrypt)
    ));
}

#[test]
fn debug_output_never_shows_plaintext_or_keys() {
    let secret = SecretBytes::from_slice(b"hunter2-canary");
    assert!(!format!("{secret:?}").contains("hunter2"));
    let key = strongroom_crypto::Key256::from_bytes([0xAB; 32]);
    let shown = format!("{key:?}");
    assert!(
        !shown.contains("171") && !shown.to_lowercase().contains("ab, ab"),
        "{shown}"
    );
}

// --- property tests -------------------------------------------------------------------------

fn arb_owner() -> impl Strategy<Value = String> {
    "\\PC{1,40}".prop_filter("1..=255 bytes", |s| !s.is_empty() && s.len() <= 255)
}

fn arb_name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,40}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn seal_open_round_trips(owner in arb_owner(), name in arb_name(), version in 1u32.., value in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let p = FakeProvider::new("k", 1);
        let home = Binding::new(&owner, &name, version).unwrap();
        let rt = rt();
        let sealed = rt.block_on(envelope::seal(&p, &home, &SecretBytes::from_slice(&value), &OsRandom)).unwrap();
        let reparsed = Sealed::from_bytes(&sealed.to_bytes().unwrap()).unwrap();
        let opened = rt.block_on(envelope::open(&p, &home, &reparsed)).unwrap();
        prop_assert_eq!(opened.expose_secret(), &value[..]);
    }

    #[test]
    fn any_flipped_bit_fails(value in proptest::collection::vec(any::<u8>(), 0..256), target in 0usize..4, bit in any::<prop::sample::Index>()) {
        let p = FakeProvider::new("k", 1);
        let home = Binding::new("alice", "zoom.api-key", 1).unwrap();
        let rt = rt();
        let mut sealed = rt.block_on(envelope::seal(&p, &home, &SecretBytes::from_slice(&value), &OsRandom)).unwrap();
        let mut binding = home.clone();
        match target {
            0 => { let i = bit.index(sealed.ciphertext.len() * 8); sealed.ciphertext[i / 8] ^= 1 << (i % 8); }
            1 => { let i = bit.index(96); sealed.nonce[i / 8] ^= 1 << (i % 8); }
            2 => { let i = bit.index(sealed.wrapped_key.bytes.len() * 8); sealed.wrapped_key.bytes[i / 8] ^= 1 << (i % 8); }
            _ => {
                // Associated data: flip a bit of the owner id (kept valid UTF-8 by staying ASCII).
                let mut owner = b"alice".to_vec();
                let i = bit.index(5 * 7);
                owner[i / 7] ^= 1 << (i % 7);
                if owner.iter().all(|c| *c != 0) {
                    binding = Binding::new(std::str::from_utf8(&owner).unwrap(), "zoom.api-key", 1).unwrap();
                } else {
                    binding = Binding::new("alice", "zoom.api-key", 2).unwrap();
                }
            }
        }
        prop_assert!(rt.block_on(envelope::open(&p, &binding, &sealed)).is_err());
    }

    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Sealed::from_bytes(&bytes);
        let p = FakeProvider::new("k", 1);
        let wk = rt().block_on(envelope::seal(&p, &Binding::new("o", "n", 1).unwrap(), &SecretBytes::from_slice(b"x"), &OsRandom)).unwrap().wrapped_key;
        let _ = Sealed::from_parts(&bytes, wk);
    }

    #[test]
    fn parsers_reject_every_truncation(cut in any::<prop::sample::Index>()) {
        let p = FakeProvider::new("k", 1);
        let sealed = rt().block_on(envelope::seal(&p, &Binding::new("o", "n", 1).unwrap(), &SecretBytes::from_slice(b"x"), &OsRandom)).unwrap();
        let bytes = sealed.to_bytes().unwrap();
        // Cutting into the header or the tag must be rejected by the parser or by open.
        let n = cut.index(bytes.len());
        match Sealed::from_bytes(&bytes[..n]) {
            Err(_) => {}
            Ok(s) => prop_assert!(rt().block_on(envelope::open(&p, &Binding::new("o", "n", 1).unwrap(), &s)).is_err()),
        }
    }
}

// --- committed vectors ----------------------------------------------------------------------

mod vectors {
    use super::*;
    use serde::{Deserialize, Serialize};

    /// Read when the test runs (cargo sets `CARGO_MANIFEST_DIR` for the tests it runs): a
    /// test binary reused from another checkout (a shared `CARGO_TARGET_DIR`) would otherwise
    /// read that checkout's file through its compiled-in path.
    fn vector_file() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
            .join("tests/vectors/envelope-v1.json")
    }

    #[derive(Serialize, Deserialize)]
    struct VectorFile {
        format: String,
        description: String,
        valid: Vec<Valid>,
        invalid: Vec<Invalid>,
    }

    #[derive(Serialize, Deserialize)]
    struct Valid {
        owner: String,
        name: String,
        version: u32,
        kek_key_id: String,
        kek_version: u32,
        data_key_hex: String,
        value_nonce_hex: String,
        plaintext_hex: String,
        value_aad_hex: String,
        key_aad_hex: String,
        envelope_hex: String,
    }

    /// A vector that must not open; `defect` names what is wrong with it.
    #[derive(Serialize, Deserialize)]
    struct Invalid {
        defect: String,
        owner: String,
        name: String,
        version: u32,
        envelope_hex: String,
        expected_error: String,
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn error_name(e: &EnvelopeError) -> &'static str {
        match e {
            EnvelopeError::Malformed(_) => "malformed",
            EnvelopeError::UnsupportedFormat(_) => "unsupported_format",
            EnvelopeError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            EnvelopeError::Decrypt => "decrypt",
            EnvelopeError::UnknownKek(_) => "unknown_kek",
            _ => "other",
        }
    }

    /// The provider the vectors use: `FakeProvider::new(kek_key_id, kek_version)` whose KEK
    /// is SHA-256("strongroom fake KEK\0" ‖ key id ‖ version u32be) and whose first wrap nonce
    /// is 12 zero bytes.
    fn provider(v: &Valid) -> FakeProvider {
        FakeProvider::new(&v.kek_key_id, v.kek_version)
    }

    async fn build_valid(
        owner: &str,
        name: &str,
        version: u32,
        plaintext: &[u8],
        seed: u64,
    ) -> Valid {
        let rng = SeededRandom::new(seed);
        let dk = strongroom_crypto::Key256::generate(&rng).unwrap();
        let mut nonce = [0u8; 12];
        strongroom_crypto::SecureRandom::fill(&rng, &mut nonce).unwrap();
        let p = FakeProvider::new("vectors", 2);
        let binding = Binding::new(owner, name, version).unwrap();
        let sealed = envelope::dangerous_seal_with_parts(&p, &binding, plaintext, &dk, nonce)
            .await
            .unwrap();
        Valid {
            owner: owner.into(),
            name: name.into(),
            version,
            kek_key_id: "vectors".into(),
            kek_version: 2,
            data_key_hex: hex(dk.expose_secret()),
            value_nonce_hex: hex(&nonce),
            plaintext_hex: hex(plaintext),
            value_aad_hex: hex(&envelope::value_aad(&binding, sealed.alg)),
            key_aad_hex: hex(&envelope::key_aad(
                &binding,
                sealed.alg,
                &sealed.wrapped_key.kek,
            )),
            envelope_hex: hex(&sealed.to_bytes().unwrap()),
        }
    }

    fn invalid_from(
        v: &Valid,
        defect: &str,
        expected: &str,
        edit: impl FnOnce(&mut Vec<u8>, &mut Invalid),
    ) -> Invalid {
        let mut bytes = unhex(&v.envelope_hex);
        let mut inv = Invalid {
            defect: defect.into(),
            owner: v.owner.clone(),
            name: v.name.clone(),
            version: v.version,
            envelope_hex: String::new(),
            expected_error: expected.into(),
        };
        edit(&mut bytes, &mut inv);
        inv.envelope_hex = hex(&bytes);
        inv
    }

    async fn generate() -> VectorFile {
        let valid = vec![
            build_valid("alice", "zoom.api-key", 1, b"sk_live_0123456789", 1).await,
            build_valid("\u{00fc}ser \u{1F510}", "a", 4_000_000_000, b"", 2).await,
            build_valid("o", "stripe.secret", 7, &[0u8; 100], 3).await,
        ];
        let v = &valid[0];
        let len = unhex(&v.envelope_hex).len();
        // Offsets in the v1 layout for this vector: 5-byte header, provider "fake" (1+4),
        // key id "vectors" (1+7), version (4), wrapped length (2) = 24 bytes before the key.
        let wrapped_at = 24;
        let wrapped_len = 12 + 32 + 16;
        let nonce_at = wrapped_at + wrapped_len;
        let invalid = vec![
            invalid_from(v, "wrong_owner", "decrypt", |_, i| {
                i.owner = "mallory".into()
            }),
            invalid_from(v, "wrong_name", "decrypt", |_, i| {
                i.name = "zoom.api-secret".into()
            }),
            invalid_from(v, "wrong_version", "decrypt", |_, i| i.version = 2),
            invalid_from(v, "kek_version_relabelled", "decrypt", |b, _| b[21] = 1),
            invalid_from(v, "kek_id_relabelled", "unknown_kek", |b, _| b[11] = b'X'),
            invalid_from(v, "flipped_wrapped_key_bit", "decrypt", |b, _| {
                b[wrapped_at + 20] ^= 0x10
            }),
            invalid_from(v, "flipped_nonce_bit", "decrypt", |b, _| {
                b[nonce_at] ^= 0x01
            }),
            invalid_from(v, "flipped_ciphertext_bit", "decrypt", |b, _| {
                b[nonce_at + 12] ^= 0x80
            }),
            invalid_from(v, "flipped_tag_bit", "decrypt", |b, _| b[len - 1] ^= 0x01),
            invalid_from(v, "truncated_tag", "decrypt", |b, _| b.truncate(len - 1)),
            invalid_from(v, "trailing_garbage", "decrypt", |b, _| b.push(0)),
            invalid_from(
                v,
                "tag_only_ciphertext_missing_bytes",
                "malformed",
                |b, _| b.truncate(nonce_at + 12 + 15),
            ),
            invalid_from(v, "unknown_format_version", "unsupported_format", |b, _| {
                b[3] = 2
            }),
            invalid_from(v, "unknown_algorithm", "unsupported_algorithm", |b, _| {
                b[4] = 9
            }),
            invalid_from(v, "bad_magic", "malformed", |b, _| b[0] = b'X'),
            invalid_from(v, "wrapped_key_length_overruns", "malformed", |b, _| {
                b[wrapped_at - 2] = 0xff
            }),
            invalid_from(v, "wrapped_key_length_zero", "malformed", |b, _| {
                b[wrapped_at - 2] = 0;
                b[wrapped_at - 1] = 0;
            }),
            invalid_from(v, "empty", "malformed", |b, _| b.clear()),
        ];
        VectorFile {
            format: "strongroom-envelope-vectors/1".into(),
            description: "Envelope format v1 (see strongroom_crypto::envelope). Provider: FakeProvider(kek_key_id, kek_version); KEK = SHA-256(\"strongroom fake KEK\\0\" || key id || version u32be); wrap = nonce(12) || AES-256-GCM(KEK, data key, key_aad). Invalid vectors are named after their defect and must fail with expected_error.".into(),
            valid,
            invalid,
        }
    }

    /// Regenerates the file: `STRONGROOM_WRITE_VECTORS=1 cargo test -p strongroom-crypto --test envelope vectors`.
    /// The check below then pins every byte.
    #[tokio::test]
    async fn committed_vectors_hold() {
        if std::env::var_os("STRONGROOM_WRITE_VECTORS").is_some() {
            let file = generate().await;
            std::fs::write(
                vector_file(),
                serde_json::to_string_pretty(&file).unwrap() + "\n",
            )
            .unwrap();
        }
        let file: VectorFile =
            serde_json::from_str(&std::fs::read_to_string(vector_file()).unwrap()).unwrap();
        assert_eq!(file.format, "strongroom-envelope-vectors/1");
        assert!(file.valid.len() >= 3 && file.invalid.len() >= 15);
        for v in &file.valid {
            let p = provider(v);
            let binding = Binding::new(&v.owner, &v.name, v.version).unwrap();
            let sealed = Sealed::from_bytes(&unhex(&v.envelope_hex)).unwrap();
            // The canonical AAD encoding is pinned byte for byte.
            assert_eq!(
                hex(&envelope::value_aad(&binding, sealed.alg)),
                v.value_aad_hex
            );
            assert_eq!(
                hex(&envelope::key_aad(
                    &binding,
                    sealed.alg,
                    &sealed.wrapped_key.kek
                )),
                v.key_aad_hex
            );
            let opened = envelope::open(&p, &binding, &sealed).await.unwrap();
            assert_eq!(hex(opened.expose_secret()), v.plaintext_hex);
            // Sealing again from the recorded parts rebuilds the same bytes.
            let dk = strongroom_crypto::Key256::from_slice(&unhex(&v.data_key_hex)).unwrap();
            let nonce: [u8; 12] = unhex(&v.value_nonce_hex).try_into().unwrap();
            let again = envelope::dangerous_seal_with_parts(
                &FakeProvider::new(&v.kek_key_id, v.kek_version),
                &binding,
                &unhex(&v.plaintext_hex),
                &dk,
                nonce,
            )
            .await
            .unwrap();
            assert_eq!(hex(&again.to_bytes().unwrap()), v.envelope_hex);
        }
        let p = provider(&file.valid[0]);
        for inv in &file.invalid {
            let binding = Binding::new(&inv.owner, &inv.name, inv.version).unwrap();
            let result = match Sealed::from_bytes(&unhex(&inv.envelope_hex)) {
                Ok(sealed) => envelope::open(&p, &binding, &sealed).await.map(|_| ()),
                Err(e) => Err(e),
            };
            let err = result.expect_err(&inv.defect);
            assert_eq!(
                error_name(&err),
                inv.expected_error,
                "vector {}",
                inv.defect
            );
        }
    }
}

#[tokio::test]
async fn provider_kit_runs_on_the_fake() {
    strongroom_crypto::testing::check_provider(Arc::new(FakeProvider::new("kit", 3))).await;
}
