//! Property tests for Fernet: round trips, tamper detection, garbage input, MultiFernet order,
//! and that keys never print.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU8, Ordering};

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use proptest::prelude::*;
use secrecy::ExposeSecret;
use strongroom_crypto::fernet::{Fernet, FernetError, FernetKey, MultiFernet, Token};
use strongroom_crypto::{OsRandom, RandomError, SecureRandom};

/// Deterministic stand-in for the RNG: a counter.
#[derive(Debug, Default)]
struct CountingRandom(AtomicU8);

impl SecureRandom for CountingRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<(), RandomError> {
        for b in dest {
            *b = self.0.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct BrokenRandom;

impl SecureRandom for BrokenRandom {
    fn fill(&self, _: &mut [u8]) -> Result<(), RandomError> {
        Err(RandomError)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip(
        key in any::<[u8; 32]>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..2000),
        ts in any::<u64>(),
        iv in any::<[u8; 16]>(),
        ttl in any::<u64>(),
    ) {
        let f = Fernet::new(FernetKey::from_bytes(key));
        let token = f.encrypt_with_parts(&plaintext, ts, iv);
        let parsed = Token::decode(&token).unwrap();
        prop_assert_eq!((parsed.timestamp, parsed.iv), (ts, iv));
        prop_assert_eq!(parsed.ciphertext().len(), (plaintext.len() / 16 + 1) * 16);
        let plain = f.decrypt(&token, None, 0).unwrap();
        prop_assert_eq!(plain.expose_secret(), &plaintext[..]);
        // At its own timestamp a token is never expired nor skewed, whatever the TTL.
        let plain = f.decrypt(&token, Some(ttl), ts).unwrap();
        prop_assert_eq!(plain.expose_secret(), &plaintext[..]);

        // Random IVs: same plaintext, fresh token, still opens.
        let t2 = f.encrypt(&plaintext, ts, &OsRandom).unwrap();
        let plain = f.decrypt(&t2, None, 0).unwrap();
        prop_assert_eq!(plain.expose_secret(), &plaintext[..]);

        // The key survives its text form.
        let text = FernetKey::from_bytes(key).to_base64();
        let again = Fernet::new(FernetKey::from_base64(text.expose_secret()).unwrap());
        prop_assert_eq!(again.encrypt_with_parts(&plaintext, ts, iv), token);
    }

    #[test]
    fn any_flipped_bit_is_rejected(
        key in any::<[u8; 32]>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..100),
        ts in any::<u64>(),
        bit in any::<prop::sample::Index>(),
        ttl in proptest::option::of(any::<u64>()),
    ) {
        let f = Fernet::new(FernetKey::from_bytes(key));
        let token = f.encrypt_with_parts(&plaintext, ts, [7; 16]);
        let mut raw = URL_SAFE.decode(&token).unwrap();
        let i = bit.index(raw.len() * 8);
        raw[i / 8] ^= 1 << (i % 8);
        let tampered = URL_SAFE.encode(&raw);
        let err = f.decrypt(&tampered, ttl, ts).map(|_| ()).unwrap_err();
        if i / 8 == 0 {
            prop_assert_eq!(err, FernetError::Malformed); // version byte
        } else if ttl.is_none() {
            prop_assert_eq!(err, FernetError::InvalidToken);
        }
        let m = MultiFernet::new(vec![Fernet::new(FernetKey::from_bytes(key))]).unwrap();
        prop_assert!(m.decrypt(&tampered, ttl, ts).is_err());
    }

    #[test]
    fn garbage_never_panics(
        text in "\\PC{0,300}",
        b64ish in "[A-Za-z0-9_=+/ -]{0,300}",
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        now in any::<u64>(),
        ttl in any::<u64>(),
    ) {
        let f = Fernet::new(FernetKey::from_bytes([1; 32]));
        let lossy = String::from_utf8_lossy(&bytes).into_owned();
        // Valid base64 of random bytes that start like a token.
        let mut framed = vec![0x80];
        framed.extend_from_slice(&bytes);
        let framed = URL_SAFE.encode(&framed);
        for s in [&text, &b64ish, &lossy, &framed] {
            let _ = Token::decode(s);
            prop_assert!(f.decrypt(s, None, now).is_err());
            prop_assert!(f.decrypt(s, Some(ttl), now).is_err());
            let _ = FernetKey::from_base64(s);
        }
    }

    #[test]
    fn multifernet_encrypts_with_first_and_reads_old_keys(
        k1 in any::<[u8; 32]>(),
        k2 in any::<[u8; 32]>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..200),
        ts in any::<u64>(),
    ) {
        prop_assume!(k1 != k2);
        let old_token = Fernet::new(FernetKey::from_bytes(k2)).encrypt_with_parts(&plaintext, ts, [3; 16]);
        let m = MultiFernet::new(vec![
            Fernet::new(FernetKey::from_bytes(k1)),
            Fernet::new(FernetKey::from_bytes(k2)),
        ]).unwrap();
        prop_assert_eq!(m.len(), 2);

        let (plain, idx) = m.decrypt_with_index(&old_token, None, 0).unwrap();
        prop_assert_eq!((plain.expose_secret(), idx), (&plaintext[..], 1));

        let new_token = m.encrypt(&plaintext, ts, &CountingRandom::default()).unwrap();
        let (plain, idx) = m.decrypt_with_index(&new_token, None, 0).unwrap();
        prop_assert_eq!((plain.expose_secret(), idx), (&plaintext[..], 0));
        let first_only = Fernet::new(FernetKey::from_bytes(k1));
        let plain = first_only.decrypt(&new_token, None, 0).unwrap();
        prop_assert_eq!(plain.expose_secret(), &plaintext[..]);
        let second_only = Fernet::new(FernetKey::from_bytes(k2));
        prop_assert_eq!(second_only.decrypt(&new_token, None, 0).map(|_| ()).unwrap_err(), FernetError::InvalidToken);
        prop_assert_eq!(m.encrypt_with_parts(&plaintext, ts, [3; 16]), first_only.encrypt_with_parts(&plaintext, ts, [3; 16]));

        // Neither key alone in the wrong order loses data: [k2, k1] reads both.
        let reversed = MultiFernet::new(vec![
            Fernet::new(FernetKey::from_bytes(k2)),
            Fernet::new(FernetKey::from_bytes(k1)),
        ]).unwrap();
        prop_assert_eq!(reversed.decrypt_with_index(&new_token, None, 0).unwrap().1, 1);
        prop_assert_eq!(reversed.decrypt_with_index(&old_token, None, 0).unwrap().1, 0);
    }

    #[test]
    fn debug_never_shows_the_key(key in any::<[u8; 32]>()) {
        let k = FernetKey::from_bytes(key);
        let text = k.to_base64().expose_secret().to_owned();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let shown = [
            format!("{k:?}"),
            format!("{k:#?}"),
            format!("{:?}", Fernet::new(FernetKey::from_bytes(key))),
            format!("{:?}", MultiFernet::new(vec![Fernet::new(FernetKey::from_bytes(key))]).unwrap()),
        ];
        prop_assert_eq!(&shown[0], "FernetKey([REDACTED])");
        let first_bytes = format!("{:?}", &key[..4]);
        for s in &shown {
            prop_assert!(!s.contains(&text));
            prop_assert!(!s.contains(&text[..20]));
            prop_assert!(!s.contains(&hex[..16]));
            prop_assert!(!s.contains(&first_bytes));
        }
    }
}

#[test]
fn generate_uses_the_rng() {
    let a = FernetKey::generate(&CountingRandom::default()).unwrap();
    let expected: Vec<u8> = (0..32).collect();
    let a_raw = URL_SAFE.decode(a.to_base64().expose_secret()).unwrap();
    assert_eq!(a_raw, expected);
    assert_eq!(
        FernetKey::generate(&BrokenRandom).unwrap_err(),
        FernetError::Random(RandomError)
    );
    let f = Fernet::new(FernetKey::generate(&OsRandom).unwrap());
    assert_eq!(
        f.encrypt(b"x", 0, &BrokenRandom).unwrap_err(),
        FernetError::Random(RandomError)
    );
    // The IV comes from the RNG.
    let t = f.encrypt(b"x", 9, &CountingRandom::default()).unwrap();
    let tok = Token::decode(&t).unwrap();
    assert_eq!(tok.iv, core::array::from_fn(|i| i as u8));
    assert_eq!(tok.timestamp, 9);
}

#[test]
fn error_messages_are_one_short_line() {
    for e in [
        FernetError::InvalidKey,
        FernetError::NoKeys,
        FernetError::Malformed,
        FernetError::Expired,
        FernetError::ClockSkew,
        FernetError::InvalidToken,
        FernetError::Random(RandomError),
    ] {
        let msg = e.to_string();
        assert!(!msg.contains('\n') && msg.len() < 80, "{msg:?}");
    }
}
