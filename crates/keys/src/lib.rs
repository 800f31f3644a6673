//! # strongroom-keys
//!
//! Key providers for Strongroom: implementations of
//! [`strongroom_crypto::KeyProvider`], each in its own module, each passing the conformance
//! kit in `strongroom_crypto::testing`. A provider is always chosen explicitly by
//! configuration; nothing here picks one by default.
//!
//! | module | cargo feature | KEKs live in | wrapping | KEK versions |
//! |---|---|---|---|---|
//! | [`local`] | (always) | a keyring file on local disk (mode 0600) | AES-256-GCM in process | keyring versions |
//! | `aws_kms` | `aws-kms` | AWS KMS (one symmetric key) | KMS `Encrypt`/`Decrypt` with an encryption context | always 1 (KMS rotates internally) |
//! | `pkcs11` | `pkcs11` | a PKCS#11 token (HSM), keys never leave it | `CKM_AES_GCM` inside the token | one token key per version, `LABEL.vN` |
//! | `transit` | `transit` | Vault/OpenBao Transit | `transit/encrypt` with `associated_data` | Transit key versions |
//!
//! The remote providers are built by an `async` constructor (`AwsKmsProvider::connect`,
//! `Pkcs11Provider::connect`, `TransitProvider::connect`) that reaches the peer and checks
//! the key: an unreachable endpoint, a wrong key id, a wrong PIN or token, or a disabled key
//! gives one [`strongroom_crypto::ProviderError`] naming the provider and what failed. Each
//! constructor ends with a wrap/unwrap self-test that also proves the associated data is
//! authenticated by the peer.
//!
//! ## What every provider binds
//!
//! The caller's associated data (which binds a data key to its record and KEK) is
//! authenticated by the peer itself: as GCM associated data in the token (PKCS#11) and in
//! Transit, and through the KMS encryption context (AWS KMS). A wrapped key moved to another
//! record, or relabelled with another KEK version, does not unwrap.
//!
//! ## Secrets in memory
//!
//! Data keys and plaintexts are held in zeroizing buffers by this crate. The HTTP clients
//! (AWS SDK, reqwest) copy request and response bodies into their own buffers, which are
//! freed but not zeroized; the PKCS#11 provider never lets the KEK leave the token. PINs and
//! tokens are read from a file or an environment variable ([`SecretSource`]), held in
//! [`secrecy`] wrappers, and never appear in errors or `Debug` output.
//!
//! ## Features
//!
//! `aws-kms`, `pkcs11` and `transit` are on by default; a build may leave any of them out.
//! All TLS is rustls with the *ring* provider (no aws-lc-rs in the graph).

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod local;

#[cfg(feature = "aws-kms")]
pub mod aws_kms;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
#[cfg(feature = "transit")]
pub mod transit;

/// Where and what kind of JSON problem `e` is, without its text: serde_json's messages quote
/// the offending string (`invalid type: string "…"`), which in a keyring file or a provider's
/// answer can be key material.
pub(crate) fn json_problem(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "a field is missing, unknown or of the wrong type",
        serde_json::error::Category::Eof => "cut short",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

#[cfg(feature = "aws-kms")]
pub use aws_kms::{AwsKmsConfig, AwsKmsProvider};
#[cfg(feature = "pkcs11")]
pub use pkcs11::{Pkcs11Config, Pkcs11Provider};
#[cfg(feature = "transit")]
pub use transit::{TransitAuth, TransitConfig, TransitProvider};

#[cfg(any(feature = "pkcs11", feature = "transit"))]
pub use secret_source::SecretSource;

/// Whether a URL's host (`localhost`, an IP literal, IPv6 in brackets or not) is this
/// machine: the one place a remote provider may be reached over plain HTTP (an emulator, a
/// development server), since nothing else on the path can read the keys it carries.
#[cfg(any(feature = "aws-kms", feature = "transit"))]
fn loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

#[cfg(any(feature = "pkcs11", feature = "transit"))]
mod secret_source {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use secrecy::SecretString;
    use strongroom_crypto::{ProviderError, ProviderErrorKind};
    use zeroize::Zeroizing;

    /// Largest secret file read.
    const MAX_SECRET_FILE_LEN: u64 = 64 << 10;

    /// Where a provider credential (a PKCS#11 PIN, a Vault token, an AppRole secret id) comes
    /// from. Never the secret itself, so configuration files and `Debug` output stay clean.
    #[derive(Clone, Debug, PartialEq, Eq)]
    #[non_exhaustive]
    pub enum SecretSource {
        /// A file holding the secret; one trailing newline (`\n` or `\r\n`) is removed. The
        /// file must not be readable or writable by "others" (mode `o-rwx`): group access is
        /// allowed, for secrets mounted by an orchestrator.
        File(PathBuf),
        /// An environment variable holding the secret.
        Env(String),
    }

    impl SecretSource {
        /// Reads the secret. `provider` and `what` name it in errors (never its value).
        pub(crate) fn read(
            &self,
            provider: &str,
            what: &str,
        ) -> Result<SecretString, ProviderError> {
            let misconfigured =
                |msg: String| ProviderError::new(ProviderErrorKind::Misconfigured, provider, msg);
            let text = match self {
                SecretSource::Env(name) => match std::env::var(name) {
                    Ok(v) => Zeroizing::new(v),
                    Err(std::env::VarError::NotPresent) => {
                        return Err(misconfigured(format!(
                            "{what}: environment variable {name} is not set"
                        )))
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(misconfigured(format!(
                            "{what}: environment variable {name} is not valid UTF-8"
                        )))
                    }
                },
                SecretSource::File(path) => {
                    let shown = path.display();
                    let mut file = std::fs::File::open(path).map_err(|e| {
                        misconfigured(format!("{what}: cannot open {shown}")).with_source(e)
                    })?;
                    let meta = file.metadata().map_err(|e| {
                        misconfigured(format!("{what}: cannot stat {shown}")).with_source(e)
                    })?;
                    let mode = meta.permissions().mode() & 0o777;
                    if mode & 0o007 != 0 {
                        return Err(misconfigured(format!(
                            "{what}: {shown} has mode {mode:04o}, so any local user can reach it; \
                             run `chmod o-rwx {shown}`"
                        )));
                    }
                    if meta.len() > MAX_SECRET_FILE_LEN {
                        return Err(misconfigured(format!("{what}: {shown} is too large")));
                    }
                    let mut text = Zeroizing::new(String::new());
                    file.read_to_string(&mut text).map_err(|e| {
                        misconfigured(format!("{what}: cannot read {shown} as UTF-8 text"))
                            .with_source(e)
                    })?;
                    text
                }
            };
            let trimmed = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text);
            if trimmed.is_empty() {
                return Err(misconfigured(format!("{what} is empty")));
            }
            Ok(SecretString::from(trimmed.to_owned()))
        }
    }

    #[cfg(test)]
    mod tests {
        use std::io::Write;

        use secrecy::ExposeSecret;

        use super::*;

        #[test]
        fn reads_files_trims_one_newline_and_refuses_world_access() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("pin");
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(b"12 34\r\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let s = SecretSource::File(path.clone()).read("p", "PIN").unwrap();
            assert_eq!(s.expose_secret(), "12 34");

            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = SecretSource::File(path.clone())
                .read("p", "PIN")
                .unwrap_err();
            assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
            assert!(e.to_string().contains("chmod o-rwx"), "{e}");
            assert!(!e.to_string().contains("12 34"));

            std::fs::write(&path, "\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = SecretSource::File(path).read("p", "PIN").unwrap_err();
            assert!(e.to_string().contains("PIN is empty"), "{e}");

            let e = SecretSource::File(dir.path().join("absent"))
                .read("p", "PIN")
                .unwrap_err();
            assert_eq!(e.kind(), ProviderErrorKind::Misconfigured);
        }

        #[test]
        fn missing_env_var_is_named() {
            let e = SecretSource::Env("STRONGROOM_TEST_SURELY_UNSET_VAR".into())
                .read("transit", "token")
                .unwrap_err();
            assert!(
                e.to_string().contains("STRONGROOM_TEST_SURELY_UNSET_VAR"),
                "{e}"
            );
            assert!(e.to_string().contains("key provider 'transit'"), "{e}");
        }
    }
}
