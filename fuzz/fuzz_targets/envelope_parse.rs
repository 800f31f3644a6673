//! Envelope v1 parsing and opening on arbitrary bytes: never panics; whatever parses
//! re-encodes to the same bytes; nothing but the genuine envelope opens.
//!
//! `cargo +nightly fuzz run envelope_parse corpus/envelope_parse seeds/envelope_parse -- -max_total_time=20`

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use strongroom_crypto::testing::FakeProvider;
use strongroom_crypto::{envelope, Binding, Sealed};

/// The fake provider never waits, so one poll finishes every future.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the fake provider never pends"),
    }
}

fuzz_target!(|data: &[u8]| {
    let provider = FakeProvider::new("fuzz", 1);
    let binding = match Binding::new("owner", "name", 1) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    if let Ok(sealed) = Sealed::from_bytes(data) {
        match sealed.to_bytes() {
            Ok(bytes) => assert_eq!(bytes, data, "parse/encode must round trip"),
            Err(e) => panic!("a parsed envelope must re-encode: {e}"),
        }
        // Random bytes essentially never carry a valid tag under the fake KEK.
        let _ = block_on(envelope::open(&provider, &binding, &sealed));
        let value = sealed.value_bytes();
        let again = Sealed::from_parts(&value, sealed.wrapped_key.clone());
        assert!(again.is_ok_and(|s| s == sealed), "value layer must round trip");
    }
    if let Ok(sealed) = Sealed::from_parts(
        data,
        strongroom_crypto::WrappedKey {
            kek: strongroom_crypto::KekRef { provider: "fake".into(), key_id: "fuzz".into(), version: 1 },
            bytes: vec![0; 60],
        },
    ) {
        assert!(block_on(envelope::open(&provider, &binding, &sealed)).is_err());
    }
});
