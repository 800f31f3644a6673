//! The PKCS#11 provider against a real token: SoftHSM2 initialised by
//! `scripts/lib/softhsm.sh` (`STRONGROOM_TEST_SOFTHSM_*`, `SOFTHSM2_CONF`).

#![cfg(feature = "pkcs11")]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use strongroom_crypto::testing::{check_provider, check_rotation};
use strongroom_crypto::{Key256, KeyProvider, OsRandom, ProviderErrorKind, UnwrapError};
use strongroom_keys::{Pkcs11Config, Pkcs11Provider, SecretSource};

const MODULE: &str = "STRONGROOM_TEST_SOFTHSM_MODULE";
const SCRIPT: &str = "softhsm.sh";

struct Token {
    module: String,
    label: String,
    pin_file: PathBuf,
}

/// The token from the environment, or `None` (after a SKIP line).
fn token() -> Option<Token> {
    let module = common::peer_var(MODULE, SCRIPT)?;
    let conf = common::peer_var("STRONGROOM_TEST_SOFTHSM_CONF", SCRIPT)?;
    // SoftHSM reads SOFTHSM2_CONF when the module is initialised; softhsm.sh exports it.
    assert_eq!(
        std::env::var("SOFTHSM2_CONF").ok().as_deref(),
        Some(conf.as_str()),
        "SOFTHSM2_CONF must name the test token's softhsm2.conf"
    );
    Some(Token {
        module,
        label: common::peer_var("STRONGROOM_TEST_SOFTHSM_TOKEN", SCRIPT)?,
        pin_file: common::peer_var("STRONGROOM_TEST_SOFTHSM_PIN_FILE", SCRIPT)?.into(),
    })
}

macro_rules! token {
    () => {
        match token() {
            Some(t) => t,
            None => return,
        }
    };
}

fn config(t: &Token, key_label: &str) -> Pkcs11Config {
    Pkcs11Config::new(
        &t.module,
        &t.label,
        SecretSource::File(t.pin_file.clone()),
        key_label,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let t = token!();
    let provider = Pkcs11Provider::generate(config(&t, &common::unique("conf")))
        .await
        .unwrap();
    assert_eq!(provider.active_kek().unwrap().version, 1);
    check_provider(Arc::new(provider)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_to_new_non_extractable_token_keys() {
    let t = token!();
    let label = common::unique("rot");
    let provider = Arc::new(Pkcs11Provider::generate(config(&t, &label)).await.unwrap());
    let p2 = provider.clone();
    check_rotation(provider.clone(), || async move {
        let kek = p2.rotate().await.unwrap();
        assert_eq!(kek.version, 2);
    })
    .await;

    let info = provider.key_info().await.unwrap();
    assert_eq!(
        info.iter().map(|k| k.label.as_str()).collect::<Vec<_>>(),
        [format!("{label}.v1"), format!("{label}.v2")]
    );
    for k in &info {
        assert!(k.sensitive && !k.extractable, "{k:?}");
        assert!(k.always_sensitive && k.never_extractable, "{k:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_sees_a_rotation() {
    let t = token!();
    let label = common::unique("nodes");
    let a = Pkcs11Provider::generate(config(&t, &label)).await.unwrap();
    let b = Pkcs11Provider::connect(config(&t, &label)).await.unwrap();
    let v2 = a.rotate().await.unwrap();
    assert_eq!(b.active_kek().unwrap().version, 1, "b has not looked yet");

    // A key wrapped by A under v2 opens on B (B rescans for the newer version).
    let key = Key256::generate(&OsRandom).unwrap();
    let w = a.wrap(&v2, &key, b"n").await.unwrap();
    let back = b.unwrap(&w, b"n").await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
    assert_eq!(b.active_kek().unwrap(), v2);

    // B wraps under v1 no more; health keeps it current too.
    let mut v1 = v2.clone();
    v1.version = 1;
    let e = b.wrap(&v1, &key, b"n").await.unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::KekNotActive);
    a.rotate().await.unwrap();
    b.health().await.unwrap();
    assert_eq!(b.active_kek().unwrap().version, 3);
    // What the server polls in strict mode: it reports the change once.
    a.rotate().await.unwrap();
    assert!(b.reload_keks().await.unwrap());
    assert_eq!(b.active_kek().unwrap().version, 4);
    assert!(!b.reload_keks().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_from_an_environment_variable() {
    let t = token!();
    let Some(_) = common::peer_var("STRONGROOM_TEST_SOFTHSM_PIN", SCRIPT) else {
        return;
    };
    let label = common::unique("env");
    Pkcs11Provider::generate(config(&t, &label)).await.unwrap();
    let mut c = config(&t, &label);
    c.pin = SecretSource::Env("STRONGROOM_TEST_SOFTHSM_PIN".into());
    c.sessions = 1;
    let p = Pkcs11Provider::connect(c).await.unwrap();
    p.health().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_denied_with_a_clear_message() {
    let t = token!();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.pin");
    std::fs::write(&wrong, "000000-wrong\n").unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut c = config(&t, "any");
    c.pin = SecretSource::File(wrong);
    let e = Pkcs11Provider::connect(c).await.unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Denied, "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("key provider 'pkcs11': wrong PIN for token"),
        "{msg}"
    );
    assert!(msg.contains(&t.label), "{msg}");
    assert!(
        !msg.contains("000000-wrong"),
        "the PIN must not appear: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_token_label_is_named() {
    let t = token!();
    let mut c = config(&t, "any");
    c.token_label = "no-such-token".into();
    let e = Pkcs11Provider::connect(c).await.unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("no token labelled 'no-such-token'"), "{msg}");
    assert!(
        msg.contains(&format!("'{}'", t.label)),
        "lists the tokens present: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_modules_and_duplicates_are_refused() {
    let t = token!();
    let label = common::unique("none");
    let e = Pkcs11Provider::connect(config(&t, &label))
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
    assert!(
        e.to_string().contains(&format!("no key '{label}.v1'")),
        "{e}"
    );

    Pkcs11Provider::generate(config(&t, &label)).await.unwrap();
    let e = Pkcs11Provider::generate(config(&t, &label))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
    assert!(e.to_string().contains("already holds"), "{e}");

    let mut c = config(&t, &label);
    c.module = "/nonexistent/libpkcs11.so".into();
    let e = Pkcs11Provider::connect(c).await.unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
    assert!(e.to_string().contains("/nonexistent/libpkcs11.so"), "{e}");

    let mut c = config(&t, &label);
    c.pin = SecretSource::File("/nonexistent/pin".into());
    let e = Pkcs11Provider::connect(c).await.unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_keys_are_bound_to_their_version() {
    let t = token!();
    let label = common::unique("bind");
    let p = Pkcs11Provider::generate(config(&t, &label)).await.unwrap();
    let key = Key256::generate(&OsRandom).unwrap();
    let w1 = p.wrap(&p.active_kek().unwrap(), &key, b"a").await.unwrap();
    let v2 = p.rotate().await.unwrap();
    let mut moved = w1.clone();
    moved.kek = v2;
    match p.unwrap(&moved, b"a").await {
        Err(UnwrapError::Failed(e)) => {
            assert_eq!(e.kind(), ProviderErrorKind::AuthenticationFailed, "{e:?}")
        }
        other => panic!(
            "relabelled to v2 must fail authentication, got {other:?}",
            other = other.map(|_| ())
        ),
    }
    let mut future = w1.clone();
    future.kek.version = 9;
    match p.unwrap(&future, b"a").await {
        Err(UnwrapError::Failed(e)) => assert_eq!(e.kind(), ProviderErrorKind::UnknownKek),
        _ => panic!("unknown version"),
    }
}

/// Makes an AES-256 key with a value this test knows on the token, as whoever can create
/// objects there could: a public object (made without the PIN on tokens that allow it), or
/// a private one imported with `C_CreateObject`. Sensitive and not extractable, so only the
/// way it was made tells it from a key the token generated.
fn plant_key(t: &Token, label: &str, private: bool) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error, RvError};
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;

    let ctx = Pkcs11::new(&t.module).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = ctx
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == t.label)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    let pin = std::fs::read_to_string(&t.pin_file).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from(pin.trim().to_owned()))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("{e}"),
    }
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![0x42; 32]),
            Attribute::Token(true),
            Attribute::Private(private),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap();
    drop(session);
    // Dropping the last handle on a context finalises the module, under the providers of
    // the other tests in this process: keep it.
    std::mem::forget(ctx);
}

/// A key whose value may be known is never taken for the next KEK version: a public object
/// (which a session without the PIN can make) is not looked at, so it neither becomes the
/// active KEK nor stops the provider; a private one imported rather than generated on the
/// token (only a PIN holder can make it) makes a provider refuse to start, or to go on once
/// it sees one, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_planted_on_the_token_never_becomes_the_active_kek() {
    let t = token!();
    let key = Key256::generate(&OsRandom).unwrap();

    let label = common::unique("planted");
    let running = Pkcs11Provider::generate(config(&t, &label)).await.unwrap();
    plant_key(&t, &format!("{label}.v2"), false);
    let fresh = Pkcs11Provider::connect(config(&t, &label)).await.unwrap();
    for p in [&running, &fresh] {
        p.health().await.unwrap();
        assert_eq!(p.active_kek().unwrap().version, 1);
        let w = p.wrap(&p.active_kek().unwrap(), &key, b"a").await.unwrap();
        assert_eq!(w.kek.version, 1);
    }

    let label = common::unique("imported");
    let running = Pkcs11Provider::generate(config(&t, &label)).await.unwrap();
    plant_key(&t, &format!("{label}.v2"), true);
    let e = Pkcs11Provider::connect(config(&t, &label))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ProviderErrorKind::Misconfigured, "{e}");
    let says = "was not made inside the token";
    assert!(
        e.to_string().contains(&format!("'{label}.v2'")) && e.to_string().contains(says),
        "{e}"
    );
    let e = running.health().await.unwrap_err();
    assert!(e.to_string().contains(says), "{e}");
    assert_eq!(running.active_kek().unwrap().version, 1);
    let w = running
        .wrap(&running.active_kek().unwrap(), &key, b"a")
        .await
        .unwrap();
    assert_eq!(w.kek.version, 1);
}
