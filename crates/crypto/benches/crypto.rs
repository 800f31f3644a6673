//! Seal/open and Fernet encrypt/decrypt of 100-byte values.
//!
//! Run with `./scripts/bench-crypto` (which also prints `openssl speed` for the same
//! primitives as the floor). The envelope benchmarks use the fake provider, whose wrap is the
//! same AES-256-GCM work as the local keyring's; `local_keyring/*` measures the real one.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use strongroom_crypto::fernet::{Fernet, FernetKey};
use strongroom_crypto::testing::FakeProvider;
use strongroom_crypto::{envelope, Binding, OsRandom, SecretBytes};

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let value = SecretBytes::from_slice(&[0x42; 100]);
    let binding = Binding::new("user-1234567890", "zoom.api-key", 7).unwrap();
    let provider = FakeProvider::new("bench", 1);

    let mut g = c.benchmark_group("envelope_100B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal", |b| {
        b.iter(|| {
            rt.block_on(envelope::seal(&provider, &binding, &value, &OsRandom))
                .unwrap()
        })
    });
    let sealed = rt
        .block_on(envelope::seal(&provider, &binding, &value, &OsRandom))
        .unwrap();
    g.bench_function("open", |b| {
        b.iter(|| {
            rt.block_on(envelope::open(&provider, &binding, black_box(&sealed)))
                .unwrap()
        })
    });
    g.bench_function("rewrap", |b| {
        b.iter(|| {
            rt.block_on(envelope::rewrap(
                &provider,
                &provider,
                &binding,
                black_box(&sealed),
            ))
            .unwrap()
        })
    });
    let bytes = sealed.to_bytes().unwrap();
    g.bench_function("parse", |b| {
        b.iter(|| strongroom_crypto::Sealed::from_bytes(black_box(&bytes)).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("fernet_100B");
    g.throughput(Throughput::Elements(1));
    let fernet = Fernet::new(FernetKey::from_bytes([7; 32]));
    g.bench_function("encrypt", |b| {
        b.iter(|| {
            fernet
                .encrypt(black_box(&[0x42; 100]), 1_700_000_000, &OsRandom)
                .unwrap()
        })
    });
    let token = fernet
        .encrypt(&[0x42; 100], 1_700_000_000, &OsRandom)
        .unwrap();
    g.bench_function("decrypt", |b| {
        b.iter(|| {
            fernet
                .decrypt(black_box(&token), None, 1_700_000_000)
                .unwrap()
        })
    });
    g.bench_function("django_hkdf_derive", |b| {
        b.iter(|| {
            strongroom_crypto::django::derive_key(black_box(b"django-insecure-some-secret-key"))
        })
    });
    g.finish();
}

criterion_group!(crypto, benches);
criterion_main!(crypto);
