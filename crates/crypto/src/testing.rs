//! Test kit (feature `testing`): the provider conformance suite every [`KeyProvider`] runs, a
//! deterministic fake provider and a seeded random source for tests and fuzzing.
//!
//! Nothing here is for production: the fake provider derives its KEKs from public names.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::provider::{
    KekRef, KeyProvider, ProviderError, ProviderErrorKind, UnwrapError, WrappedKey,
};
use crate::{Key256, RandomError, SecureRandom};

/// A deterministic, NOT secure random source: SHA-256 of a seed and a counter.
#[derive(Debug)]
pub struct SeededRandom {
    seed: [u8; 32],
    counter: AtomicU64,
}

impl SeededRandom {
    /// A source whose output depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed: Sha256::digest(seed.to_be_bytes()).into(),
            counter: AtomicU64::new(0),
        }
    }
}

impl SecureRandom for SeededRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<(), RandomError> {
        for chunk in dest.chunks_mut(32) {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let block: [u8; 32] = Sha256::new()
                .chain_update(self.seed)
                .chain_update(n.to_be_bytes())
                .finalize()
                .into();
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        Ok(())
    }
}

/// A random source that always fails, to test error paths.
#[derive(Debug, Default)]
pub struct FailingRandom;

impl SecureRandom for FailingRandom {
    fn fill(&self, _dest: &mut [u8]) -> Result<(), RandomError> {
        Err(RandomError)
    }
}

/// A deterministic in-memory provider: KEK `v` of key `id` is SHA-256 of a public label, and
/// wraps use AES-256-GCM with counter nonces. For tests and fuzzing only.
#[derive(Debug)]
pub struct FakeProvider {
    key_id: String,
    state: Mutex<FakeState>,
    nonce_counter: AtomicU64,
}

#[derive(Debug)]
struct FakeState {
    active: u32,
    retired: Vec<u32>,
}

impl FakeProvider {
    /// Kind reported in [`KekRef::provider`].
    pub const KIND: &'static str = "fake";

    /// A provider holding versions `1..=active` of key `key_id`, the last one active.
    pub fn new(key_id: &str, active: u32) -> Self {
        Self {
            key_id: key_id.to_owned(),
            state: Mutex::new(FakeState {
                active,
                retired: Vec::new(),
            }),
            nonce_counter: AtomicU64::new(0),
        }
    }

    /// Makes a new active version and returns it.
    pub fn rotate(&self) -> u32 {
        let mut state = self.state.lock().unwrap();
        state.active += 1;
        state.active
    }

    /// Retires `version`: it no longer unwraps.
    pub fn retire(&self, version: u32) {
        self.state.lock().unwrap().retired.push(version);
    }

    fn kek(&self, version: u32) -> Aes256Gcm {
        let digest: [u8; 32] = Sha256::new()
            .chain_update(b"strongroom fake KEK\x00")
            .chain_update(self.key_id.as_bytes())
            .chain_update(version.to_be_bytes())
            .finalize()
            .into();
        Aes256Gcm::new(&digest.into())
    }

    fn err(kind: ProviderErrorKind, msg: &str) -> ProviderError {
        ProviderError::new(kind, Self::KIND, msg)
    }
}

#[async_trait]
impl KeyProvider for FakeProvider {
    fn kind(&self) -> &str {
        Self::KIND
    }

    fn active_kek(&self) -> Result<KekRef, ProviderError> {
        Ok(KekRef {
            provider: Self::KIND.to_owned(),
            key_id: self.key_id.clone(),
            version: self.state.lock().unwrap().active,
        })
    }

    async fn wrap(
        &self,
        kek: &KekRef,
        key: &Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, ProviderError> {
        let active = self.active_kek()?;
        if kek.provider != active.provider || kek.key_id != active.key_id {
            return Err(Self::err(ProviderErrorKind::UnknownKek, "unknown key"));
        }
        if kek.version != active.version {
            return Err(Self::err(
                ProviderErrorKind::KekNotActive,
                "not the active version",
            ));
        }
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(
            &self
                .nonce_counter
                .fetch_add(1, Ordering::Relaxed)
                .to_be_bytes(),
        );
        let ct = self
            .kek(kek.version)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key.expose_secret(),
                    aad,
                },
            )
            .map_err(|_| Self::err(ProviderErrorKind::Other, "wrap failed"))?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&ct);
        Ok(WrappedKey {
            kek: kek.clone(),
            bytes,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Key256, UnwrapError> {
        let kek = &wrapped.kek;
        if kek.provider != Self::KIND || kek.key_id != self.key_id {
            return Err(UnwrapError::NotMine(kek.clone()));
        }
        {
            let state = self.state.lock().unwrap();
            if kek.version == 0 || kek.version > state.active {
                return Err(Self::err(ProviderErrorKind::UnknownKek, "unknown version").into());
            }
            if state.retired.contains(&kek.version) {
                return Err(Self::err(ProviderErrorKind::KekRetired, "retired").into());
            }
        }
        let auth = || Self::err(ProviderErrorKind::AuthenticationFailed, "does not unwrap");
        if wrapped.bytes.len() < 12 {
            return Err(auth().into());
        }
        let (nonce, ct) = wrapped.bytes.split_at(12);
        let plain = zeroize::Zeroizing::new(
            self.kek(kek.version)
                .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
                .map_err(|_| auth())?,
        );
        Key256::from_slice(&plain).ok_or_else(|| auth().into())
    }
}

/// The conformance suite every [`KeyProvider`] must pass. Panics with a message naming the
/// broken rule.
///
/// `provider` must have an active KEK and be able to wrap and unwrap. It checks: round trips;
/// associated data is authenticated; every flipped byte and truncation of a wrapped key fails
/// as `Failed`, never as success or panic; relabelling a wrapped key with another provider or
/// key id gives `NotMine`, and with another version does not unwrap; wrapping under a KEK the
/// provider does not hold fails; concurrent use works.
pub async fn check_provider(provider: Arc<dyn KeyProvider>) {
    let kek = provider.active_kek().expect("active_kek");
    assert_eq!(
        kek.provider,
        provider.kind(),
        "KekRef.provider must equal kind()"
    );
    assert!(kek.version >= 1, "KEK versions start at 1");
    provider
        .health()
        .await
        .expect("health of a working provider");

    let rng = crate::OsRandom;
    let key = Key256::generate(&rng).unwrap();
    let aad = b"conformance aad".to_vec();
    let wrapped = provider.wrap(&kek, &key, &aad).await.expect("wrap");
    assert_eq!(wrapped.kek, kek, "wrap must report the KEK it used");
    assert!(
        !contains(&wrapped.bytes, key.expose_secret()),
        "wrapped bytes must not contain the key"
    );
    let back = provider
        .unwrap(&wrapped, &aad)
        .await
        .expect("unwrap round trip");
    assert_eq!(
        back.expose_secret(),
        key.expose_secret(),
        "round trip changed the key"
    );

    // Associated data is authenticated.
    for other_aad in [
        b"conformance aaD".to_vec(),
        Vec::new(),
        [aad.clone(), vec![0]].concat(),
    ] {
        match provider.unwrap(&wrapped, &other_aad).await {
            Err(UnwrapError::Failed(_)) => {}
            Ok(_) => panic!("unwrap succeeded under other associated data"),
            Err(e) => panic!("other aad must fail as Failed, got {e}"),
        }
    }

    // Tampering: flip bits across the wrapped key (every byte for short ones).
    let n = wrapped.bytes.len();
    let step = (n / 64).max(1);
    for i in (0..n).step_by(step).chain([n - 1]) {
        let mut bad = wrapped.clone();
        bad.bytes[i] ^= 0x01;
        assert!(
            matches!(
                provider.unwrap(&bad, &aad).await,
                Err(UnwrapError::Failed(_))
            ),
            "flipped byte {i} of the wrapped key must fail as Failed"
        );
    }
    for len in [0, 1, n / 2, n - 1] {
        let mut bad = wrapped.clone();
        bad.bytes.truncate(len);
        assert!(
            matches!(
                provider.unwrap(&bad, &aad).await,
                Err(UnwrapError::Failed(_))
            ),
            "wrapped key truncated to {len} bytes must fail as Failed"
        );
    }
    let mut longer = wrapped.clone();
    longer.bytes.push(0);
    assert!(
        provider.unwrap(&longer, &aad).await.is_err(),
        "appended byte must fail"
    );

    // Relabelling.
    let mut other_provider = wrapped.clone();
    other_provider.kek.provider = format!("{}-other", kek.provider);
    assert!(
        matches!(
            provider.unwrap(&other_provider, &aad).await,
            Err(UnwrapError::NotMine(_))
        ),
        "another provider kind must be NotMine"
    );
    let mut other_id = wrapped.clone();
    other_id.kek.key_id = format!("{}-other", kek.key_id);
    assert!(
        matches!(
            provider.unwrap(&other_id, &aad).await,
            Err(UnwrapError::NotMine(_))
        ),
        "another key id must be NotMine"
    );
    let mut other_version = wrapped.clone();
    other_version.kek.version = kek.version + 1000;
    assert!(
        provider.unwrap(&other_version, &aad).await.is_err(),
        "another KEK version must not unwrap"
    );

    // Wrapping under a KEK it does not hold fails.
    let mut foreign = kek.clone();
    foreign.key_id = format!("{}-other", kek.key_id);
    assert!(
        provider.wrap(&foreign, &key, &aad).await.is_err(),
        "wrap under a foreign KEK"
    );

    // Concurrent use.
    let mut tasks = Vec::new();
    for i in 0..32u32 {
        let provider = provider.clone();
        let kek = kek.clone();
        tasks.push(tokio::spawn(async move {
            let key = Key256::generate(&crate::OsRandom).unwrap();
            let aad = i.to_be_bytes();
            let w = provider
                .wrap(&kek, &key, &aad)
                .await
                .expect("concurrent wrap");
            let k = provider.unwrap(&w, &aad).await.expect("concurrent unwrap");
            assert_eq!(k.expose_secret(), key.expose_secret());
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

/// Rotation conformance: after `rotate` makes a new KEK version, new wraps use it, keys
/// wrapped under the old version still unwrap, and wrapping under the old version is refused
/// as [`ProviderErrorKind::KekNotActive`].
pub async fn check_rotation<F, Fut>(provider: Arc<dyn KeyProvider>, rotate: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let old = provider.active_kek().unwrap();
    let key = Key256::generate(&crate::OsRandom).unwrap();
    let wrapped_old = provider.wrap(&old, &key, b"r").await.unwrap();
    rotate().await;
    let new = provider.active_kek().unwrap();
    assert_ne!(new, old, "rotation must change the active KEK");
    assert_eq!(
        (new.provider.as_str(), new.key_id.as_str()),
        (old.provider.as_str(), old.key_id.as_str())
    );
    let err = provider
        .wrap(&old, &key, b"r")
        .await
        .expect_err("wrap under a rotated-out KEK");
    assert_eq!(err.kind(), ProviderErrorKind::KekNotActive);
    let back = provider
        .unwrap(&wrapped_old, b"r")
        .await
        .expect("old version still unwraps");
    assert_eq!(back.expose_secret(), key.expose_secret());
    let wrapped_new = provider.wrap(&new, &key, b"r").await.unwrap();
    assert_eq!(wrapped_new.kek, new);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fake_provider_passes_conformance() {
        check_provider(Arc::new(FakeProvider::new("k", 1))).await;
    }

    #[tokio::test]
    async fn fake_provider_rotates() {
        let p = Arc::new(FakeProvider::new("k", 1));
        let p2 = p.clone();
        check_rotation(p, || async move {
            p2.rotate();
        })
        .await;
    }

    #[test]
    fn seeded_random_is_deterministic_and_fills_odd_lengths() {
        let (a, b) = (SeededRandom::new(7), SeededRandom::new(7));
        let (mut x, mut y) = ([0u8; 45], [0u8; 45]);
        a.fill(&mut x).unwrap();
        b.fill(&mut y).unwrap();
        assert_eq!(x, y);
        assert_ne!(x, [0u8; 45]);
        let mut z = [0u8; 45];
        SeededRandom::new(8).fill(&mut z).unwrap();
        assert_ne!(x, z);
    }
}
