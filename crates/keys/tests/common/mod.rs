//! Shared helpers of the provider integration tests: peers are found through environment
//! variables exported by `scripts/lib/{softhsm,moto,openbao}.sh`.

#![allow(dead_code)]

use std::io::Write;

/// The value of `var`, or `None` after a loud SKIP line on stderr (written past the test
/// harness's capture). With `STRONGROOM_REQUIRE_PEERS=1` a missing variable fails the test.
pub fn peer_var(var: &str, start_with: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            let msg = format!(
                "{var} is not set: start the peer with `. scripts/lib/{start_with}` (and its \
                 *_start function) before `cargo test`"
            );
            if std::env::var("STRONGROOM_REQUIRE_PEERS").as_deref() == Ok("1") {
                panic!("STRONGROOM_REQUIRE_PEERS=1 but {msg}");
            }
            // One write, so the line is not interleaved with the harness's output.
            let line = format!(
                "\n*** SKIP {}: {msg} ***\n",
                std::thread::current().name().unwrap_or("test")
            );
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            None
        }
    }
}

/// `peer_var` that returns from the test when the peer is absent.
#[macro_export]
macro_rules! require_peer {
    ($var:expr, $script:expr) => {
        match common::peer_var($var, $script) {
            Some(v) => v,
            None => return,
        }
    };
}

/// A short random hex string for unique key names.
pub fn unique(prefix: &str) -> String {
    let mut b = [0u8; 6];
    strongroom_crypto::SecureRandom::fill(&strongroom_crypto::OsRandom, &mut b).unwrap();
    format!(
        "{prefix}-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}
