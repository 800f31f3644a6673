//! The configuration: file, `STRONGROOM_*` overrides, command-line overrides, and the errors
//! a mistake produces (each naming the key and where it came from).

// figment's `Jail` closures return its (large) error type.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Jail;
use strongroom_core::broker::PassedHeader;
use strongroom_server::config::{ClientAuth, Config, LogFormat, Overrides, StoreKind};
use strongroom_server::ServerError;

const MINIMAL: &str = r#"
[tls]
cert = "cert.pem"
key = "key.pem"
"#;

fn load(file: &str, overrides: &Overrides) -> Result<Config, ServerError> {
    Config::load(Some(Path::new(file)), overrides)
}

fn err_of(r: Result<Config, ServerError>) -> String {
    match r {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_fill_everything_but_tls() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("s.toml", MINIMAL)?;
        let c = load("s.toml", &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8443".parse::<SocketAddr>().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("strongroom-data"));
        assert_eq!(
            c.keyring_path(),
            PathBuf::from("strongroom-data/keyring.json")
        );
        assert_eq!(c.store.kind, StoreKind::Sqlite);
        assert_eq!(c.tls.as_ref().unwrap().client_auth, ClientAuth::Optional);
        assert_eq!(c.limits.max_connections, 1024);
        assert_eq!(c.limits.max_header_bytes, 16384);
        assert_eq!(c.limits.request_timeout_seconds, 30);
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(c.auth.jwt.is_none() && c.policy_file.is_none());
        Ok(())
    });
}

#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file(
            "s.toml",
            &format!(
                "listen = \"0.0.0.0:9000\"\ndata_dir = \"/var/lib/a\"\n{MINIMAL}\n\
                 [limits]\nmax_connections = 10\nverify_per_minute = 5\n[log]\nformat = \"text\"\n"
            ),
        )?;
        jail.set_env("STRONGROOM_LIMITS__MAX_CONNECTIONS", "77");
        jail.set_env("STRONGROOM_LIMITS__PUTS_PER_OWNER_PER_MINUTE", "1200");
        jail.set_env("STRONGROOM_DATA_DIR", "/var/lib/b");
        jail.set_env("STRONGROOM_KEYS__KEYRING", "/etc/strongroom/ring.json");
        jail.set_env("STRONGROOM_TLS__CLIENT_CA", "ca.pem");
        jail.set_env(
            "STRONGROOM_AUTH__SERVICE",
            format!(
                "[{{name=\"billing\",token_sha256=\"{}\"}}]",
                "ab".repeat(32)
            ),
        );
        // Variables that are not configuration keys are left to the command line.
        jail.set_env("STRONGROOM_KEYRING", "/elsewhere.json");
        jail.set_env("STRONGROOM_CONFIG", "s.toml");

        let c = load("s.toml", &Overrides::default()).unwrap();
        assert_eq!(
            c.listen,
            "0.0.0.0:9000".parse::<SocketAddr>().unwrap(),
            "file"
        );
        assert_eq!(c.limits.max_connections, 77, "env beats file");
        assert_eq!(
            c.limits.verify_per_minute, 5,
            "file kept where env is silent"
        );
        assert_eq!(c.limits.puts_per_owner_per_minute, 1200, "env");
        assert_eq!(c.limits.api_limits().puts_per_owner_per_minute, 1200);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/b"));
        assert_eq!(c.keyring_path(), PathBuf::from("/etc/strongroom/ring.json"));
        assert_eq!(
            c.tls.as_ref().unwrap().client_ca.as_deref(),
            Some(Path::new("ca.pem"))
        );
        assert_eq!(
            c.tls.as_ref().unwrap().cert,
            PathBuf::from("cert.pem"),
            "nested keys merge"
        );
        assert_eq!(c.auth.service.len(), 1);
        assert_eq!(c.log.format, LogFormat::Text);
        // What the environment overrides in the file is named (not its value): the keys
        // both set, to different values; not those only one sets, nor equal ones.
        jail.set_env("STRONGROOM_LIMITS__VERIFY_PER_MINUTE", "5");
        let mut named = strongroom_server::config::environment_overrides(Path::new("s.toml"));
        named.sort();
        assert_eq!(
            named,
            [
                ("STRONGROOM_DATA_DIR".to_owned(), "data_dir".to_owned()),
                (
                    "STRONGROOM_LIMITS__MAX_CONNECTIONS".to_owned(),
                    "limits.max_connections".to_owned()
                ),
            ]
        );

        let mut flags = Overrides {
            listen: Some("127.0.0.1:1234".parse().unwrap()),
            data_dir: Some("/var/lib/c".into()),
            keyring: None,
        };
        let c = load("s.toml", &flags).unwrap();
        assert_eq!(c.listen.port(), 1234);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/c"));
        assert_eq!(c.keyring_path(), PathBuf::from("/etc/strongroom/ring.json"));
        // `keys … --keyring FILE` beats the file and the environment too.
        flags.keyring = Some("/etc/ring.json".into());
        let c = load("s.toml", &flags).unwrap();
        assert_eq!(c.keyring_path(), PathBuf::from("/etc/ring.json"));
        Ok(())
    });
}

#[test]
fn the_environment_alone_can_configure_the_server() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.set_env("STRONGROOM_TLS__CERT", "/etc/c.pem");
        jail.set_env("STRONGROOM_TLS__KEY", "/etc/k.pem");
        jail.set_env("STRONGROOM_STORE__KIND", "postgres");
        jail.set_env("STRONGROOM_STORE__URL", "postgresql://u:pw@127.0.0.1/db");
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.store.kind, StoreKind::Postgres);
        assert_eq!(
            c.store.url.as_deref(),
            Some("postgresql://u:pw@127.0.0.1/db")
        );
        // The URL may hold a password: Debug never shows it.
        assert!(!format!("{c:?}").contains("pw@"));
        Ok(())
    });
}

#[test]
fn mistakes_are_named_by_key_and_source() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let cases: &[(&str, &str)] = &[
            ("listen = \"nonsense\"", "key `listen` (in "),
            (
                "[limits]\nmax_conections = 3",
                "key `limits.max_conections` (in ",
            ),
            (
                "[limits]\nmax_connections = \"many\"",
                "key `limits.max_connections`",
            ),
            (
                "[limits]\nmax_connections = 0",
                "key `limits.max_connections`: must be 1 to 1000000",
            ),
            (
                "[limits]\nmax_header_bytes = 100",
                "key `limits.max_header_bytes`: must be 8192",
            ),
            (
                "[limits]\nputs_per_owner_per_minute = 0",
                "key `limits.puts_per_owner_per_minute`: must be at least 1",
            ),
            (
                "[broker]\nmax_concurrent_calls = 0",
                "key `broker.max_concurrent_calls`: must be 1 to 256",
            ),
            (
                "[broker]\nmax_concurrent_calls = 8\nmax_concurrent_calls_per_service = 9",
                "key `broker.max_concurrent_calls_per_service`: must be 1 to \
                 broker.max_concurrent_calls",
            ),
            (
                "[store]\nkind = \"postgres\"",
                "key `store.url`: is required",
            ),
            ("[store]\nkind = \"mysql\"", "key `store.kind`"),
            (
                "[store]\nurl = \"postgresql://x\"",
                "key `store.url`: is only used",
            ),
            (
                "[[auth.service]]\nname = \"b\"\ntoken_sha256 = \"xyz\"",
                "key `auth.service[0].token_sha256`: must be 64 hex",
            ),
            (
                "[[auth.admin]]\nname = \"\"\ntoken_sha256 = \"00\"",
                "key `auth.admin[0].name`",
            ),
            (
                "[[auth.mtls]]\nsan = \"a.test\"\nservice = \"s\"",
                "key `auth.mtls[0].san`: client certificates need tls.client_ca",
            ),
            (
                "[[auth.mtls]]\nsan = \"example.test/billing\"\nservice = \"s\"",
                "key `auth.mtls[0].san`: must be a DNS name (no `:` or `/`",
            ),
            (
                "[[auth.mtls]]\nsan = \"bücher.example\"\nservice = \"s\"",
                "key `auth.mtls[0].san`: a DNS name must be ASCII",
            ),
            (
                "[[auth.mtls]]\nsan = \"spiffe://bücher.example/svc\"\nservice = \"s\"",
                "key `auth.mtls[0].san`: a DNS name must be ASCII",
            ),
            ("[auth.jwt]\nissuer = \"x\"", "key `auth.jwt`: set one of"),
            (
                "[auth.jwt]\njwks_file = \"j\"\nissuer = \"i\"\naudience = \"a\"\n\
                 on_behalf_of_audience = \"a\"",
                "key `auth.jwt.on_behalf_of_audience`: must differ from auth.jwt.audience",
            ),
            (
                "[auth.jwt]\njwks_file = \"j\"\non_behalf_of_audience = \"\"",
                "key `auth.jwt.on_behalf_of_audience` (in ",
            ),
            (
                "[auth.jwt]\nhs256_secret_file = \"a\"\njwks_file = \"b\"",
                "key `auth.jwt`: set only one",
            ),
            (
                "[auth.jwt]\npublic_key_file = \"a\"",
                "key `auth.jwt.algorithm`: is required",
            ),
            (
                "[auth.jwt]\npublic_key_file = \"a\"\nalgorithm = \"none\"",
                "key `auth.jwt.algorithm`",
            ),
            ("[log]\nlevel = \"loud=[\"", "key `log.level`"),
            ("[log]\nformat = \"xml\"", "key `log.format`"),
            ("[limits\nmax_connections = 3", "bad.toml"),
        ];
        for (extra, want) in cases {
            // Top-level keys must come before the [tls] table.
            let text = if extra.starts_with('[') {
                format!("{MINIMAL}\n{extra}\n")
            } else {
                format!("{extra}\n{MINIMAL}")
            };
            jail.create_file("bad.toml", &text)?;
            let e = err_of(load("bad.toml", &Overrides::default()));
            assert!(e.contains(want), "{extra:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }

        jail.create_file("notls.toml", "listen = \"127.0.0.1:1\"\n")?;
        let e = err_of(load("notls.toml", &Overrides::default()));
        assert!(e.contains("key `tls`: is required"), "{e}");

        jail.create_file(
            "req.toml",
            &format!("{MINIMAL}client_auth = \"required\"\n"),
        )?;
        let e = err_of(load("req.toml", &Overrides::default()));
        assert!(e.contains("key `tls.client_auth`"), "{e}");

        let e = err_of(load("missing.toml", &Overrides::default()));
        assert!(
            e.contains("config file missing.toml") && e.contains("No such file"),
            "{e}"
        );
        Ok(())
    });
}

#[test]
fn a_bad_environment_value_names_the_variable() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("s.toml", MINIMAL)?;
        jail.set_env("STRONGROOM_LIMITS__REQUEST_TIMEOUT_SECONDS", "soon");
        let e = err_of(load("s.toml", &Overrides::default()));
        assert!(
            e.contains("limits.request_timeout_seconds")
                && e.contains("STRONGROOM_LIMITS__REQUEST_TIMEOUT_SECONDS"),
            "{e}"
        );
        // A secret put where it does not belong is named by its key, never quoted.
        jail.set_env(
            "STRONGROOM_LIMITS__REQUEST_TIMEOUT_SECONDS",
            "pw-SECRET-CANARY",
        );
        jail.set_env("STRONGROOM_STORE", "postgresql://app:SECRET-CANARY@db/app");
        jail.set_env("STRONGROOM_LOG__FORMAT", "SECRET-CANARY");
        let e = err_of(load("s.toml", &Overrides::default()));
        assert!(!e.contains("SECRET-CANARY"), "{e}");
        assert!(
            e.contains("STRONGROOM_STORE")
                || e.contains("STRONGROOM_LIMITS__REQUEST_TIMEOUT_SECONDS"),
            "{e}"
        );
        jail.clear_env();
        jail.set_env("STRONGROOM_LIMITS__REQUEST_TIMEOUT_SECONDS", "20");
        jail.set_env("STRONGROOM_LIMITS__TYPO", "1");
        let e = err_of(load("s.toml", &Overrides::default()));
        assert!(
            e.contains("STRONGROOM_LIMITS__TYPO") && e.contains("unknown field"),
            "{e}"
        );
        Ok(())
    });
}

/// This package's directory, read when the test runs: cargo sets `CARGO_MANIFEST_DIR` for the
/// tests it runs, and a test binary that cargo reused from another checkout (a shared
/// `CARGO_TARGET_DIR`) would otherwise read that checkout's files through its compiled-in path.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

#[test]
fn the_example_config_at_the_repository_root_loads() {
    let root = manifest_dir().join("../..");
    Jail::expect_with(|jail| {
        jail.clear_env();
        let c = Config::load(
            Some(&root.join("strongroom.example.toml")),
            &Overrides::default(),
        )
        .unwrap();
        assert!(c.auth.jwt.is_some());
        assert!(c.policy_file.is_some());
        Ok(())
    });
    let policy = std::fs::read_to_string(root.join("policy.example.toml")).unwrap();
    let p = strongroom_core::policy::Policy::from_toml(&policy).unwrap();
    assert!(!p.rules().is_empty());
}

#[test]
fn key_providers_are_chosen_with_their_settings() {
    use strongroom_server::config::KeyProviderKind;
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file(
            "kms.toml",
            &format!(
                "{MINIMAL}[keys]\nprovider = \"aws-kms\"\n[keys.aws_kms]\nkey_id = \"alias/sr\"\n\
                 region = \"eu-west-1\"\nendpoint_url = \"http://127.0.0.1:4566\"\n"
            ),
        )?;
        let c = load("kms.toml", &Overrides::default()).unwrap();
        assert_eq!(c.keys.provider, KeyProviderKind::AwsKms);
        let kms = strongroom_server::aws_kms_config(&c).unwrap();
        assert_eq!(kms.key_id, "alias/sr");
        assert_eq!(kms.region.as_deref(), Some("eu-west-1"));

        jail.create_file(
            "hsm.toml",
            &format!(
                "{MINIMAL}[keys]\nprovider = \"pkcs11\"\n[keys.pkcs11]\nmodule = \"/m.so\"\n\
                 token_label = \"t\"\nkey_label = \"sr\"\npin_env = \"HSM_PIN\"\nsessions = 2\n"
            ),
        )?;
        let c = load("hsm.toml", &Overrides::default()).unwrap();
        let hsm = strongroom_server::pkcs11_config(&c).unwrap();
        assert_eq!((hsm.key_label.as_str(), hsm.sessions), ("sr", 2));

        jail.create_file(
            "bao.toml",
            &format!(
                "{MINIMAL}[keys]\nprovider = \"transit\"\n[keys.transit]\n\
                 address = \"https://bao:8200\"\nkey = \"sr\"\napprole_role_id = \"r\"\n\
                 approle_secret_id_file = \"/run/secret-id\"\n"
            ),
        )?;
        let c = load("bao.toml", &Overrides::default()).unwrap();
        let t = strongroom_server::transit_config(&c).unwrap();
        assert_eq!((t.mount.as_str(), t.key.as_str()), ("transit", "sr"));

        // The environment picks the provider too.
        jail.set_env("STRONGROOM_KEYS__PROVIDER", "transit");
        let err = err_of(load("kms.toml", &Overrides::default()));
        assert!(err.contains("keys.transit"), "{err}");
        Ok(())
    });
}

#[test]
fn provider_mistakes_are_named() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        for (body, key) in [
            ("[keys]\nprovider = \"pkcs11\"\n", "keys.pkcs11"),
            (
                "[keys]\nprovider = \"pkcs11\"\n[keys.pkcs11]\nmodule = \"/m.so\"\n\
                 token_label = \"t\"\nkey_label = \"sr\"\n",
                "pin_file or pin_env",
            ),
            (
                "[keys]\nprovider = \"transit\"\n[keys.transit]\naddress = \"https://b\"\n\
                 key = \"k\"\ntoken_env = \"T\"\napprole_role_id = \"r\"\n",
                "exactly one of token_file, token_env or approle_role_id",
            ),
            ("[keys]\nprovider = \"aws-kms\"\n", "keys.aws_kms"),
            ("[keys]\nprovider = \"hsm\"\n", "keys.provider"),
            (
                "[keys]\nprovider = \"aws-kms\"\n[keys.aws_kms]\nkey_id = \"k\"\nregion_name = \"x\"\n",
                "region_name",
            ),
        ] {
            jail.create_file("s.toml", &format!("{MINIMAL}{body}"))?;
            let err = err_of(load("s.toml", &Overrides::default()));
            assert!(err.contains(key), "{body}: {err}");
        }
        Ok(())
    });
}

#[test]
fn the_broker_section_has_defaults_and_reads_the_environment() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("s.toml", MINIMAL)?;
        let c = load("s.toml", &Overrides::default()).unwrap();
        let s = c.broker.settings(&c.limits);
        assert!(!s.allow_private_networks && s.ca_file.is_none());
        assert_eq!(s.timeout.as_secs(), 20);
        assert_eq!(s.connect_timeout.as_secs(), 5);
        assert_eq!(s.max_response_bytes, 1024 * 1024);
        assert_eq!(
            (s.max_concurrent_calls, s.max_concurrent_calls_per_service),
            (64, 16)
        );
        // A lower bound in all lowers the per-service default with it (rather than refusing
        // a default the operator never set).
        jail.create_file(
            "few.toml",
            &format!("{MINIMAL}[broker]\nmax_concurrent_calls = 8\n"),
        )?;
        let c = load("few.toml", &Overrides::default()).unwrap();
        let s = c.broker.settings(&c.limits);
        assert_eq!(
            (s.max_concurrent_calls, s.max_concurrent_calls_per_service),
            (8, 8)
        );

        jail.create_file(
            "b.toml",
            &format!("{MINIMAL}[broker]\nca_file = \"ca.pem\"\nmax_response_bytes = 4096\n"),
        )?;
        jail.set_env("STRONGROOM_BROKER__ALLOW_PRIVATE_NETWORKS", "true");
        jail.set_env("STRONGROOM_BROKER__TIMEOUT_SECONDS", "7");
        let c = load("b.toml", &Overrides::default()).unwrap();
        let s = c.broker.settings(&c.limits);
        assert!(s.allow_private_networks);
        assert_eq!(s.ca_file.as_deref(), Some(Path::new("ca.pem")));
        assert_eq!(s.timeout.as_secs(), 7);
        assert_eq!(s.max_response_bytes, 4096);

        // The call must end before the request does.
        jail.set_env("STRONGROOM_BROKER__TIMEOUT_SECONDS", "30");
        let e = err_of(load("b.toml", &Overrides::default()));
        assert!(e.contains("broker.timeout_seconds"), "{e}");
        jail.set_env("STRONGROOM_BROKER__TIMEOUT_SECONDS", "5");
        jail.set_env("STRONGROOM_BROKER__TYPO", "1");
        let e = err_of(load("b.toml", &Overrides::default()));
        assert!(e.contains("STRONGROOM_BROKER__TYPO"), "{e}");
        Ok(())
    });
}

/// A DNS-name `san` is matched whatever its case and trailing dot, so two spellings of one
/// name are one entry listed twice.
#[test]
fn a_dns_san_spelled_twice_is_listed_twice() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let mtls = |a: &str, b: &str| {
            format!(
                "{MINIMAL}client_ca = \"ca.pem\"\n[[auth.mtls]]\nsan = \"{a}\"\nservice = \"s\"\n\
                 [[auth.mtls]]\nsan = \"{b}\"\nservice = \"t\"\n"
            )
        };
        for (a, b) in [
            ("svc.example.test", "SVC.Example.test"),
            ("svc.example.test", "svc.example.test."),
        ] {
            jail.create_file("m.toml", &mtls(a, b))?;
            let e = err_of(load("m.toml", &Overrides::default()));
            assert!(
                e.contains("auth.mtls[1].san") && e.contains("listed twice"),
                "{e}"
            );
        }
        // URIs are matched as written (their paths are case-sensitive).
        jail.create_file(
            "m.toml",
            &mtls("spiffe://example.test/a", "spiffe://example.test/A"),
        )?;
        load("m.toml", &Overrides::default()).unwrap();
        Ok(())
    });
}

/// Response headers to pass back besides the default ones come from the file or the
/// environment; one computed over the body, a hop-by-hop one, or a bare `*` is refused with
/// the key named.
#[test]
fn extra_response_headers_are_read_and_body_derived_ones_refused() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file(
            "p.toml",
            &format!(
                "{MINIMAL}[broker]\npass_response_headers = [\"X-GitHub-Request-Id\", \"stripe-version\"]\n"
            ),
        )?;
        let c = load("p.toml", &Overrides::default()).unwrap();
        let s = c.broker.settings(&c.limits);
        assert_eq!(
            s.pass_response_headers,
            [
                PassedHeader::parse("x-github-request-id").unwrap(),
                PassedHeader::parse("stripe-version").unwrap()
            ]
        );
        jail.set_env("STRONGROOM_BROKER__PASS_RESPONSE_HEADERS", "[\"x-one\"]");
        let c = load("p.toml", &Overrides::default()).unwrap();
        assert_eq!(
            c.broker.settings(&c.limits).pass_response_headers,
            [PassedHeader::parse("x-one").unwrap()]
        );
        for refused in ["etag", "x-stripe-*", "connection", "*", "x-foo-sum"] {
            jail.set_env(
                "STRONGROOM_BROKER__PASS_RESPONSE_HEADERS",
                format!("[\"{refused}\"]"),
            );
            let e = err_of(load("p.toml", &Overrides::default()));
            assert!(e.contains("broker.pass_response_headers"), "{refused}: {e}");
        }
        Ok(())
    });
}

/// An identity provider's keys sign tokens for every application it serves: user tokens are
/// held to an issuer and an audience unless the configuration says, key by key, that any
/// will do.
#[test]
fn user_tokens_are_held_to_an_issuer_and_an_audience_unless_told_otherwise() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let jwt = |lines: &str| format!("{MINIMAL}[auth.jwt]\njwks_file = \"k.json\"\n{lines}\n");
        for (lines, want) in [
            ("audience = \"a\"", "key `auth.jwt.issuer`: is required"),
            ("issuer = \"i\"", "key `auth.jwt.audience`: is required"),
            (
                "issuer = \"\"\naudience = \"a\"",
                "key `auth.jwt.issuer` (in bad.toml): must not be empty",
            ),
            (
                "issuer = \"i\"\naudience = \"\"",
                "key `auth.jwt.audience` (in bad.toml): must not be empty",
            ),
            (
                "issuer = \"i\"\naccept_any_issuer = true\naudience = \"a\"",
                "key `auth.jwt.accept_any_issuer`: cannot be set with auth.jwt.issuer",
            ),
            (
                "issuer = \"i\"\naudience = \"a\"\naccept_any_audience = true",
                "key `auth.jwt.accept_any_audience`: cannot be set with auth.jwt.audience",
            ),
            (
                "issuer = \"i\"\naccept_any_audience = false",
                "key `auth.jwt.audience`: is required",
            ),
        ] {
            jail.create_file("bad.toml", &jwt(lines))?;
            let e = err_of(load("bad.toml", &Overrides::default()));
            assert!(e.contains(want), "{lines}: {e}");
        }

        jail.create_file(
            "s.toml",
            &jwt("accept_any_issuer = true\naccept_any_audience = true"),
        )?;
        let c = load("s.toml", &Overrides::default()).unwrap();
        let j = c.auth.jwt.as_ref().unwrap();
        assert!(j.accept_any_issuer && j.accept_any_audience);
        assert_eq!((j.issuer.as_deref(), j.audience.as_deref()), (None, None));

        // From the environment as well.
        jail.create_file("env.toml", &jwt(""))?;
        let e = err_of(load("env.toml", &Overrides::default()));
        assert!(e.contains("key `auth.jwt.issuer`: is required"), "{e}");
        jail.set_env("STRONGROOM_AUTH__JWT__ISSUER", "https://idp.test/");
        jail.set_env("STRONGROOM_AUTH__JWT__ACCEPT_ANY_AUDIENCE", "true");
        let c = load("env.toml", &Overrides::default()).unwrap();
        let j = c.auth.jwt.as_ref().unwrap();
        assert_eq!(j.issuer.as_deref(), Some("https://idp.test/"));
        assert!(j.accept_any_audience && !j.accept_any_issuer);
        Ok(())
    });
}

#[test]
fn jwks_url_settings_come_from_the_file_or_the_environment_and_mistakes_are_named() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file(
            "s.toml",
            &format!(
                "{MINIMAL}[auth.jwt]\njwks_url = \"https://idp.test/jwks\"\nissuer = \"i\"\n\
                 audience = \"a\"\n"
            ),
        )?;
        let c = load("s.toml", &Overrides::default()).unwrap();
        let jwt = c.auth.jwt.as_ref().unwrap();
        assert_eq!(jwt.jwks_url.as_deref(), Some("https://idp.test/jwks"));
        assert_eq!(
            (
                jwt.jwks_refresh_seconds,
                jwt.jwks_unknown_kid_cooldown_seconds,
                jwt.jwks_max_stale_seconds,
                jwt.jwks_timeout_seconds
            ),
            (300, 30, 86_400, 10)
        );

        jail.set_env("STRONGROOM_AUTH__JWT__JWKS_URL", "https://other.test/keys");
        jail.set_env("STRONGROOM_AUTH__JWT__JWKS_CA_FILE", "/etc/idp-ca.pem");
        jail.set_env("STRONGROOM_AUTH__JWT__JWKS_REFRESH_SECONDS", "120");
        let c = load("s.toml", &Overrides::default()).unwrap();
        let jwt = c.auth.jwt.as_ref().unwrap();
        assert_eq!(jwt.jwks_url.as_deref(), Some("https://other.test/keys"));
        assert_eq!(
            jwt.jwks_ca_file.as_deref(),
            Some(Path::new("/etc/idp-ca.pem"))
        );
        assert_eq!(jwt.jwks_refresh_seconds, 120);
        jail.clear_env();

        for (jwt, want) in [
            (
                "jwks_url = \"http://idp.test/jwks\"",
                "key `auth.jwt.jwks_url`: must be an https:// URL",
            ),
            (
                "jwks_url = \"not a url\"",
                "key `auth.jwt.jwks_url`: not a URL",
            ),
            (
                "jwks_url = \"https://idp.test/k\"\njwks_file = \"k.json\"",
                "key `auth.jwt`: set only one of",
            ),
            (
                "jwks_file = \"k.json\"\njwks_ca_file = \"ca.pem\"",
                "key `auth.jwt.jwks_ca_file`: is only used with jwks_url",
            ),
            (
                "jwks_url = \"https://idp.test/k\"\njwks_refresh_seconds = 1",
                "key `auth.jwt.jwks_refresh_seconds`: must be 60 to 86400",
            ),
            (
                "jwks_url = \"https://idp.test/k\"\njwks_unknown_kid_cooldown_seconds = 0",
                "key `auth.jwt.jwks_unknown_kid_cooldown_seconds`",
            ),
            (
                "jwks_url = \"https://idp.test/k\"\njwks_max_stale_seconds = 10",
                "key `auth.jwt.jwks_max_stale_seconds`",
            ),
            (
                "jwks_url = \"https://idp.test/k\"\njwks_timeout_seconds = 0",
                "key `auth.jwt.jwks_timeout_seconds`: must be 1 to 60",
            ),
        ] {
            jail.create_file("bad.toml", &format!("{MINIMAL}[auth.jwt]\n{jwt}\n"))?;
            let e = err_of(load("bad.toml", &Overrides::default()));
            assert!(e.contains(want), "{jwt}: {e}");
        }
        Ok(())
    });
}

#[test]
fn store_sync_defaults_to_full_and_normal_is_sqlite_only() {
    use strongroom_server::config::StoreSync;
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("s.toml", MINIMAL)?;
        let c = load("s.toml", &Overrides::default()).unwrap();
        assert_eq!(c.store.sync, StoreSync::Full);
        jail.create_file("n.toml", &format!("{MINIMAL}[store]\nsync = \"normal\"\n"))?;
        let c = load("n.toml", &Overrides::default()).unwrap();
        assert_eq!(c.store.sync, StoreSync::Normal);
        jail.set_env("STRONGROOM_STORE__SYNC", "full");
        let c = load("n.toml", &Overrides::default()).unwrap();
        assert_eq!(c.store.sync, StoreSync::Full);
        jail.create_file(
            "pg.toml",
            &format!(
                "{MINIMAL}[store]\nkind = \"postgres\"\nurl = \"postgresql://x\"\nsync = \"normal\"\n"
            ),
        )?;
        jail.set_env("STRONGROOM_STORE__SYNC", "normal");
        assert!(err_of(load("pg.toml", &Overrides::default())).contains("key `store.sync`"));
        Ok(())
    });
}

#[test]
fn the_reveal_cache_size_is_sqlite_only_and_bounded() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("s.toml", MINIMAL)?;
        assert_eq!(
            load("s.toml", &Overrides::default())
                .unwrap()
                .store
                .reveal_cache_mb,
            None
        );
        jail.set_env("STRONGROOM_STORE__REVEAL_CACHE_MB", "0");
        assert_eq!(
            load("s.toml", &Overrides::default())
                .unwrap()
                .store
                .reveal_cache_mb,
            Some(0)
        );
        jail.set_env("STRONGROOM_STORE__REVEAL_CACHE_MB", "5000");
        assert!(err_of(load("s.toml", &Overrides::default()))
            .contains("key `store.reveal_cache_mb`: must be at most 4096"));
        jail.set_env("STRONGROOM_STORE__REVEAL_CACHE_MB", "8");
        jail.create_file(
            "pg.toml",
            &format!("{MINIMAL}[store]\nkind = \"postgres\"\nurl = \"postgresql://x\"\n"),
        )?;
        assert!(err_of(load("pg.toml", &Overrides::default()))
            .contains("key `store.reveal_cache_mb`: is SQLite only"));
        jail.clear_env();
        jail.set_env("STRONGROOM_STORE__TLS_CA_FILE", "/etc/pg-ca.pem");
        assert!(err_of(load("s.toml", &Overrides::default()))
            .contains("key `store.tls_ca_file`: is only used with store.kind = \"postgres\""));
        Ok(())
    });
}

/// `STRONGROOM_*` names that set nothing are found (to be warned about), and none of the
/// settings, the other commands' variables or the test suites' own is.
#[test]
fn misspelt_environment_variables_are_found() {
    let names = [
        "STRONGROOM_LISTN",
        "STRONGROOM_TLS_CLIENT_AUTH",
        "STRONGROOM_LISTEN",
        "STRONGROOM_TLS__CLIENT_AUTH",
        "STRONGROOM_LIMITS__MAX_CONNECTIONS",
        "STRONGROOM_CONFIG",
        "STRONGROOM_TOKEN",
        "STRONGROOM_IMPORT_SECRET_KEY",
        "STRONGROOM_TEST_POSTGRES_URL",
        "STRONGROOM_REQUIRE_POSTGRES",
        "PATH",
    ]
    .map(str::to_owned);
    assert_eq!(
        strongroom_server::config::unknown_env_names(names),
        ["STRONGROOM_LISTN", "STRONGROOM_TLS_CLIENT_AUTH"]
    );
}

/// Text settings keep the text of their variable: a numeric audience, a label that looks
/// like a number (with its leading zeros) or like a boolean; a quoted value as before.
#[test]
fn text_settings_from_the_environment_stay_text() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file(
            "s.toml",
            &format!(
                "{MINIMAL}\n[auth.jwt]\nhs256_secret_file = \"jwt\"\n[keys]\nprovider = \"pkcs11\"\n\
                 [keys.pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\n\
                 token_label = \"t\"\nkey_label = \"k\"\npin_env = \"PIN\"\n"
            ),
        )?;
        jail.set_env("strongroom_auth__jwt__audience", " 12345 ");
        jail.set_env("STRONGROOM_AUTH__JWT__ISSUER", "true");
        jail.set_env("STRONGROOM_KEYS__PKCS11__TOKEN_LABEL", "007");
        jail.set_env("STRONGROOM_KEYS__PKCS11__KEY_LABEL", "\"1.50\"");
        jail.set_env("STRONGROOM_LIMITS__MAX_CONNECTIONS", "77");
        let c = load("s.toml", &Overrides::default()).unwrap();
        let jwt = c.auth.jwt.as_ref().unwrap();
        assert_eq!(jwt.audience.as_deref(), Some("12345"));
        assert_eq!(jwt.issuer.as_deref(), Some("true"));
        let pkcs11 = c.keys.pkcs11.as_ref().unwrap();
        assert_eq!(pkcs11.token_label, "007");
        assert_eq!(pkcs11.key_label, "1.50");
        // Numbers stay numbers where the setting is one.
        assert_eq!(c.limits.max_connections, 77);
        Ok(())
    });
}

/// An empty text setting is refused by name, from the environment or the file, instead of
/// being read as the working directory or a name nothing has.
#[test]
fn empty_text_settings_are_refused() {
    for (var, key) in [
        ("STRONGROOM_POLICY_FILE", "policy_file"),
        ("STRONGROOM_DATA_DIR", "data_dir"),
        ("STRONGROOM_TLS__CERT", "tls.cert"),
        ("STRONGROOM_AUDIT__JSONL", "audit.jsonl"),
        ("STRONGROOM_KEYS__KEYRING", "keys.keyring"),
    ] {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("s.toml", MINIMAL)?;
            jail.set_env(var, "");
            let e = err_of(load("s.toml", &Overrides::default()));
            assert!(
                e.contains(&format!(
                    "key `{key}` (from environment variable {var}): must not be empty"
                )),
                "{var}: {e}"
            );
            Ok(())
        });
    }
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("s.toml", &format!("policy_file = \" \"\n{MINIMAL}"))?;
        let e = err_of(load("s.toml", &Overrides::default()));
        assert!(
            e.contains("key `policy_file` (in ") && e.contains("must not be empty"),
            "{e}"
        );
        Ok(())
    });
}

/// `store.max_credentials_per_owner`: 1000 unless set, from the file or the environment
/// like every key, and refused out of range (0 would let no owner store anything).
#[test]
fn the_credential_quota_has_a_default_and_a_range() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("s.toml", MINIMAL)?;
        let c = load("s.toml", &Overrides::default()).unwrap();
        assert_eq!(c.store.max_credentials_per_owner(), 1000);
        jail.create_file(
            "q.toml",
            &format!("{MINIMAL}[store]\nmax_credentials_per_owner = 10\n"),
        )?;
        let c = load("q.toml", &Overrides::default()).unwrap();
        assert_eq!(c.store.max_credentials_per_owner(), 10);
        jail.set_env("STRONGROOM_STORE__MAX_CREDENTIALS_PER_OWNER", "25");
        let c = load("q.toml", &Overrides::default()).unwrap();
        assert_eq!(c.store.max_credentials_per_owner(), 25, "env beats file");
        for bad in ["0", "100001", "-1"] {
            jail.set_env("STRONGROOM_STORE__MAX_CREDENTIALS_PER_OWNER", bad);
            let e = err_of(load("q.toml", &Overrides::default()));
            assert!(
                e.contains("max_credentials_per_owner")
                    || e.contains("STRONGROOM_STORE__MAX_CREDENTIALS_PER_OWNER"),
                "{bad}: {e}"
            );
        }
        Ok(())
    });
}
