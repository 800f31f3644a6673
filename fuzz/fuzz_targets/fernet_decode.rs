//! Fernet token parsing and decryption on arbitrary input: must never panic, and must keep
//! the invariants below.
//!
//! Run from `fuzz/`, with the writable (gitignored) corpus first so libFuzzer does not add
//! files to the committed seeds:
//! `cargo +nightly fuzz run fernet_decode corpus/fernet_decode seeds/fernet_decode -- -max_total_time=20`

#![no_main]

use libfuzzer_sys::fuzz_target;
use strongroom_crypto::fernet::{Fernet, FernetError, FernetKey, MultiFernet, Token};

/// The public key of the fernet/spec vectors, so seeds copied from them reach AES and
/// PKCS7 (no real secret).
const SPEC_KEY: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
/// 1985-10-26T01:20:01-07:00, the `now` of the spec vectors.
const SPEC_NOW: u64 = 499_162_801;

fn spec_fernet() -> Fernet {
    match FernetKey::from_base64(SPEC_KEY) {
        Ok(k) => Fernet::new(k),
        Err(e) => panic!("spec key: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = Token::decode(&text);

    let fixed = Fernet::new(FernetKey::from_bytes([0x42; 32]));
    let spec = spec_fernet();
    let no_ttl = spec.decrypt(&text, None, SPEC_NOW);
    let with_ttl = spec.decrypt(&text, Some(60), SPEC_NOW);
    let _ = fixed.decrypt(&text, None, SPEC_NOW);
    let _ = fixed.decrypt(&text, Some(u64::MAX), u64::MAX);
    let _ = fixed.decrypt(&text, Some(0), 0);

    let multi = match MultiFernet::new(vec![fixed, spec_fernet()]) {
        Ok(m) => m,
        Err(e) => panic!("two keys: {e}"),
    };
    let multi_no_ttl = multi.decrypt_with_index(&text, None, SPEC_NOW);

    match &parsed {
        // Anything the parser rejects is Malformed everywhere.
        Err(e) => {
            assert_eq!(*e, FernetError::Malformed);
            assert_eq!(no_ttl.as_ref().err(), Some(&FernetError::Malformed));
            assert_eq!(with_ttl.as_ref().err(), Some(&FernetError::Malformed));
            assert_eq!(multi_no_ttl.as_ref().err(), Some(&FernetError::Malformed));
        }
        Ok(token) => {
            // Accepted tokens are canonical: re-encoding gives the same text, so opening one
            // and re-encrypting it with its own timestamp and IV rebuilds it exactly.
            if let Ok(plain) = &no_ttl {
                let again =
                    spec.encrypt_with_parts(plain.expose_secret(), token.timestamp, token.iv);
                assert_eq!(again, *text);
                match &multi_no_ttl {
                    Ok((p, 1)) => assert_eq!(p.expose_secret(), plain.expose_secret()),
                    other => panic!(
                        "MultiFernet disagrees: {:?}",
                        other.as_ref().map(|(_, i)| i)
                    ),
                }
            }
            // A TTL can only add failures.
            if with_ttl.is_ok() {
                assert!(no_ttl.is_ok());
            }
        }
    }
});
