//! `strongroom serve --dev`: a working server with zero configuration.
//!
//! Everything lives under one data directory (default `./strongroom-data`, mode 0700) and is
//! created on first start, then reused:
//!
//! | file | what |
//! |---|---|
//! | `strongroom.db` | the SQLite store |
//! | `keyring.json` | the local keyring (one active KEK) |
//! | `tls/ca.pem` | a dev CA certificate (its key is thrown away once it signed the server certificate) |
//! | `tls/cert.pem`, `tls/key.pem` | the server certificate for `localhost`, `127.0.0.1` and `::1`, and its key |
//! | `dev-jwt-secret` | the HS256 secret for user tokens (`iss` `strongroom-dev`, `aud` `strongroom`) |
//! | `dev-tokens.json` | the dev admin and service tokens |
//!
//! Every file is written with mode 0600, atomically (temporary file, `fsync`, `rename`). A
//! secret file that group or others can read is refused, with the `chmod` that fixes it. The
//! certificates are made again when the server certificate is within a day of expiring.
//!
//! Nothing here is fit for production: the tokens and the JWT secret sit next to the data.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::Serialized;
use figment::Figment;
use serde::{Deserialize, Serialize};
use strongroom_crypto::{OsRandom, SecureRandom};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::config::{merge_env, Config, Overrides};
use crate::error::ServerError;

/// The dev service principal: may write, reveal and broker any credential of any owner.
pub const DEV_SERVICE: &str = "dev-service";
/// The dev admin principal.
pub const DEV_ADMIN: &str = "dev-admin";
/// `iss` of dev user tokens.
pub const DEV_ISSUER: &str = "strongroom-dev";
/// `aud` of dev user tokens.
pub const DEV_AUDIENCE: &str = "strongroom";
/// The listen address of `--dev` unless `--listen` says otherwise.
pub const DEV_LISTEN: &str = "127.0.0.1:8443";
/// The dev JWT secret's file name under the data directory.
pub const JWT_SECRET_FILE: &str = "dev-jwt-secret";
/// Longest lifetime `mint_user_token` accepts.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The file `serve --config` leaves in a SQLite data dir it serves: `serve --dev` refuses
/// such a dir, whose every credential its dev service token could otherwise reveal.
pub const SERVED_BY_CONFIG: &str = "served-by-config";

/// Environment keys honoured in dev mode (the rest of the configuration is the dev layout).
const DEV_ENV_KEYS: &[&str] = &["policy_file", "limits", "log", "broker", "store"];

/// The dev policy: [`DEV_SERVICE`] may write, reveal and broker any credential of any owner.
pub fn policy() -> strongroom_core::policy::Policy {
    strongroom_core::policy::Policy::dev(DEV_SERVICE)
}

/// What `--dev` was asked for.
#[derive(Clone)]
pub struct DevOptions {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The listen address.
    pub listen: SocketAddr,
    /// A fixed admin token instead of the stored random one.
    pub admin_token: Option<Zeroizing<String>>,
    /// A fixed service token instead of the stored random one.
    pub service_token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for DevOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `Zeroizing`'s own Debug would print the tokens.
        let fixed = |t: &Option<Zeroizing<String>>| t.as_ref().map(|_| "[REDACTED]");
        f.debug_struct("DevOptions")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("admin_token", &fixed(&self.admin_token))
            .field("service_token", &fixed(&self.service_token))
            .finish()
    }
}

/// The dev layout, ready: paths and tokens.
pub struct DevSetup {
    /// The data directory, absolute.
    pub data_dir: PathBuf,
    /// The keyring file.
    pub keyring: PathBuf,
    /// The CA certificate clients should trust (`curl --cacert`).
    pub ca_cert: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// The server key.
    pub key: PathBuf,
    /// The HS256 secret file.
    pub jwt_secret: PathBuf,
    /// The admin token (a secret).
    pub admin_token: Zeroizing<String>,
    /// The service token (a secret).
    pub service_token: Zeroizing<String>,
    /// Files created by this bootstrap (empty on a restart).
    pub created: Vec<PathBuf>,
}

impl std::fmt::Debug for DevSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevSetup")
            .field("data_dir", &self.data_dir)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    admin_token: Zeroizing<String>,
    service_token: Zeroizing<String>,
}

/// Creates (or finds) the dev layout under `options.data_dir`.
///
/// # Errors
///
/// [`ServerError::File`] for I/O problems, [`ServerError::Dev`] for a file open to group or
/// others or malformed, [`ServerError::Keyring`], [`ServerError::Tls`].
pub fn bootstrap(options: &DevOptions) -> Result<DevSetup, ServerError> {
    // Refused before anything is made: a bad flag left a new folder with a keyring and
    // tokens behind.
    for (flag, which) in [
        (&options.admin_token, "admin"),
        (&options.service_token, "service"),
    ] {
        if flag.as_ref().is_some_and(|t| {
            t.trim().len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control())
        }) {
            return Err(ServerError::Dev(format!(
                "--dev-{which}-token must be at least 16 characters without spaces"
            )));
        }
    }
    if options.admin_token.is_some() && options.admin_token == options.service_token {
        return Err(ServerError::Dev(
            "the dev admin and service tokens must differ".into(),
        ));
    }
    let data_dir = absolute(&options.data_dir)?;
    create_private_dir(&data_dir)?;
    // Servers started together on a new folder take turns: the first makes the layout, the
    // others find it (unlocked, two could write a certificate and a key of different pairs).
    let marker = data_dir.join(SERVED_BY_CONFIG);
    if marker.exists() {
        return Err(ServerError::Dev(format!(
            "{} is served by `strongroom serve --config` ({} says so): --dev would give a dev \
             service token every credential in it. Serve it with --config, or give --dev \
             another --data-dir",
            data_dir.display(),
            marker.display()
        )));
    }
    let _layout = lock_layout(&data_dir)?;
    let mut created = Vec::new();

    let keyring = data_dir.join("keyring.json");
    if !keyring.exists() {
        // A store without its keyring holds values nothing here can open: a new keyring
        // would not bring them back, and would sit where the real one must be restored.
        let db = data_dir.join("strongroom.db");
        if db.exists() {
            return Err(ServerError::Dev(format!(
                "{} is missing but {} exists: its values are sealed under that keyring. \
                 Restore keyring.json from a backup (or move strongroom.db aside to start \
                 with an empty store)",
                keyring.display(),
                db.display()
            )));
        }
        strongroom_keys::local::generate(&keyring, OffsetDateTime::now_utc(), &OsRandom)?;
        created.push(keyring.clone());
    }

    let tls_dir = data_dir.join("tls");
    create_private_dir(&tls_dir)?;
    let (ca_cert, cert, key) = (
        tls_dir.join("ca.pem"),
        tls_dir.join("cert.pem"),
        tls_dir.join("key.pem"),
    );
    if !(ca_cert.exists() && key.exists() && dev_certificate_usable(&ca_cert, &cert, &key)) {
        let (ca_pem, cert_pem, key_pem) = generate_certificates(&data_dir)?;
        write_private(&key, key_pem.as_bytes())?;
        write_private(&cert, cert_pem.as_bytes())?;
        write_private(&ca_cert, ca_pem.as_bytes())?;
        created.extend([ca_cert.clone(), cert.clone(), key.clone()]);
    } else {
        check_private(&key)?;
    }

    let jwt_secret = data_dir.join(JWT_SECRET_FILE);
    if jwt_secret.exists() {
        check_private(&jwt_secret)?;
    } else {
        write_private(&jwt_secret, random_hex(32)?.as_bytes())?;
        created.push(jwt_secret.clone());
    }

    let tokens_path = data_dir.join("dev-tokens.json");
    let stored: TokenFile = if tokens_path.exists() {
        check_private(&tokens_path)?;
        let text = Zeroizing::new(
            fs::read_to_string(&tokens_path)
                .map_err(ServerError::file("dev tokens", &tokens_path))?,
        );
        serde_json::from_str(&text).map_err(|e| {
            ServerError::Dev(format!(
                "{} is not a dev token file ({e}); delete it to make new tokens",
                tokens_path.display()
            ))
        })?
    } else {
        let t = TokenFile {
            admin_token: Zeroizing::new(format!("sr-admin-{}", random_hex(24)?.as_str())),
            service_token: Zeroizing::new(format!("sr-svc-{}", random_hex(24)?.as_str())),
        };
        let json = Zeroizing::new(
            serde_json::to_vec_pretty(&t).map_err(|e| ServerError::Dev(e.to_string()))?,
        );
        write_private(&tokens_path, &json)?;
        created.push(tokens_path.clone());
        t
    };
    let pick = |flag: &Option<Zeroizing<String>>, stored: Zeroizing<String>| match flag {
        Some(t) => t.clone(),
        None => stored,
    };
    let admin_token = pick(&options.admin_token, stored.admin_token);
    let service_token = pick(&options.service_token, stored.service_token);
    if admin_token == service_token {
        return Err(ServerError::Dev(
            "the dev admin and service tokens must differ".into(),
        ));
    }

    Ok(DevSetup {
        data_dir,
        keyring,
        ca_cert,
        cert,
        key,
        jwt_secret,
        admin_token,
        service_token,
        created,
    })
}

impl DevSetup {
    /// The server configuration of the dev layout: SQLite and the keyring under the data
    /// directory, the dev certificate, HS256 user tokens, the two dev tokens, text logs.
    /// `STRONGROOM_POLICY_FILE`, `STRONGROOM_LIMITS__*`, `STRONGROOM_LOG__*`,
    /// `STRONGROOM_STORE__*` (e.g. `STRONGROOM_STORE__SYNC=normal` for benchmarks) and
    /// `STRONGROOM_BROKER__*` (e.g. `STRONGROOM_BROKER__ALLOW_PRIVATE_NETWORKS=true` to broker
    /// to a local test server) still apply.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] for a bad environment override.
    pub fn config(&self, listen: SocketAddr) -> Result<Config, ServerError> {
        let sha = |t: &str| hex::encode(strongroom_api::hash_token(t));
        let base = serde_json::json!({
            "listen": listen.to_string(),
            "data_dir": self.data_dir,
            "store": { "kind": "sqlite" },
            "keys": { "provider": "local", "keyring": self.keyring },
            "tls": { "cert": self.cert, "key": self.key },
            "auth": {
                "jwt": {
                    "issuer": DEV_ISSUER,
                    "audience": DEV_AUDIENCE,
                    "hs256_secret_file": self.jwt_secret,
                },
                "service": [{ "name": DEV_SERVICE, "token_sha256": sha(&self.service_token) }],
                "admin": [{ "name": DEV_ADMIN, "token_sha256": sha(&self.admin_token) }],
            },
            "log": { "format": "text", "level": "info" },
        });
        let figment = merge_env(Figment::from(Serialized::defaults(base)), DEV_ENV_KEYS);
        let config = Config::from_figment(
            figment,
            &Overrides {
                listen: Some(listen),
                data_dir: Some(self.data_dir.clone()),
                keyring: None,
            },
        )?;
        config.validate()?;
        if config.store.kind != crate::config::StoreKind::Sqlite {
            return Err(ServerError::Config(
                "--dev always uses SQLite under the data dir (only `store.sync`, `store.reveal_cache_mb`, `store.max_versions`, `store.keep_destroyed_versions` and `store.max_credentials_per_owner` may be set)".into(),
            ));
        }
        Ok(config)
    }
}

#[derive(Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
}

/// A user token for `subject` that the dev server of `data_dir` accepts, valid for `ttl`.
///
/// # Errors
///
/// [`ServerError::Dev`] for a bad subject or lifetime, or when the data directory has no dev
/// JWT secret yet (start `serve --dev` once first).
pub fn mint_user_token(
    data_dir: &Path,
    subject: &str,
    ttl: Duration,
) -> Result<Zeroizing<String>, ServerError> {
    // What the server accepts as an owner id, or the token would be refused.
    if !strongroom_crypto::binding::is_valid_owner(subject) {
        return Err(ServerError::Dev(
            "the subject (owner id) must be 1 to 255 bytes without control characters".into(),
        ));
    }
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(ServerError::Dev(format!(
            "--ttl must be 1 to {} seconds",
            MAX_TOKEN_TTL.as_secs()
        )));
    }
    let path = data_dir.join(JWT_SECRET_FILE);
    if !path.exists() {
        return Err(ServerError::Dev(format!(
            "no dev JWT secret at {}: start `strongroom serve --dev --data-dir {}` once first",
            path.display(),
            data_dir.display()
        )));
    }
    let secret = read_secret_file(&path)?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let claims = DevClaims {
        sub: subject,
        iss: DEV_ISSUER,
        aud: DEV_AUDIENCE,
        iat: now,
        nbf: now,
        exp: now.saturating_add(ttl_secs),
    };
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .map_err(|e| ServerError::Dev(format!("cannot sign the token: {e}")))?;
    Ok(Zeroizing::new(token))
}

/// Reads a secret file (refused when group or others may read it, like the keyring: an
/// HS256 secret lets whoever reads it mint any user's token): its bytes with trailing
/// whitespace (a final newline) removed.
pub(crate) fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, ServerError> {
    let mut bytes = crate::trusted::read_secret(path, "secret file")?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    Ok(bytes)
}

fn absolute(path: &Path) -> Result<PathBuf, ServerError> {
    std::path::absolute(path).map_err(ServerError::file("data directory", path))
}

fn create_private_dir(dir: &Path) -> Result<(), ServerError> {
    if dir.is_dir() {
        return Ok(());
    }
    // Racing starts may make it meanwhile: a folder already there is fine.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            if dir.exists() && !dir.is_dir() {
                ServerError::Dev(format!(
                    "{} is not a directory; --data-dir names the folder that holds the store",
                    dir.display()
                ))
            } else {
                ServerError::file("data directory", dir)(e)
            }
        })
}

/// Refuses a secret file that group or others may read or write.
pub(crate) fn check_private(path: &Path) -> Result<(), ServerError> {
    let meta = fs::metadata(path).map_err(ServerError::file("secret file", path))?;
    crate::trusted::refuse_readable_by_others(path, &meta, "secret file")
}

/// An exclusive lock on `DIR/.dev.lock`, held while the layout is made or checked.
fn lock_layout(data_dir: &Path) -> Result<fs::File, ServerError> {
    let path = data_dir.join(".dev.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(ServerError::file("dev layout lock", &path))?;
    file.lock()
        .map_err(ServerError::file("dev layout lock", &path))?;
    Ok(file)
}

/// Marks `data_dir` as served by `serve --config` (see [`SERVED_BY_CONFIG`]), once; a
/// failure is logged as a warning (the server serves on).
pub fn mark_served_by_config(data_dir: &Path) {
    let marker = data_dir.join(SERVED_BY_CONFIG);
    if marker.exists() {
        return;
    }
    if let Err(e) = write_private(
        &marker,
        b"This data dir is served by `strongroom serve --config`. `strongroom serve --dev`\n\
          refuses it: its dev service token could reveal every credential in the store.\n\
          Delete this file only to hand the store over to a development server.\n",
    ) {
        tracing::warn!(error = %e, "could not mark the data dir as served by --config (serve --dev would not refuse it)");
    }
}

/// Writes `bytes` to `path` with mode 0600, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(ServerError::file("dev file", path))
}

fn random_hex(bytes: usize) -> Result<Zeroizing<String>, ServerError> {
    let mut buf = Zeroizing::new(vec![0u8; bytes]);
    OsRandom.fill(&mut buf)?;
    Ok(Zeroizing::new(hex::encode(&*buf)))
}

/// Whether `path` holds a certificate that is valid for at least another day.
/// Whether the dev certificate may be served again: valid for a day yet, its key fits it,
/// and `ca.pem` signs it for localhost. The three files are written one after the other: a
/// rewrite cut short (a full disk) left a certificate the printed `--cacert` did not sign,
/// which every later start served.
fn dev_certificate_usable(ca: &Path, cert: &Path, key: &Path) -> bool {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{ServerName, UnixTime};
    if !cert_valid_for_a_day(cert) {
        return false;
    }
    let (Ok(chain), Ok(ca_certs), Ok(private)) = (
        crate::tls::load_certs("TLS certificate", cert),
        crate::tls::load_certs("dev CA certificate", ca),
        crate::tls::load_key(key),
    ) else {
        return false;
    };
    let provider = crate::tls::provider();
    let Some((leaf, intermediates)) = chain.split_first() else {
        return false;
    };
    let leaf = leaf.clone();
    let fits = rustls::sign::CertifiedKey::from_der(chain.clone(), private, &provider).is_ok();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(ca_certs);
    if !fits || added == 0 {
        return false;
    }
    let (Ok(verifier), Ok(name)) = (
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build(),
        ServerName::try_from(DEV_HOST_NAME),
    ) else {
        return false;
    };
    verifier
        .verify_server_cert(&leaf, intermediates, &name, &[], UnixTime::now())
        .is_ok()
}

/// The name the dev certificate is for (besides `127.0.0.1` and `::1`).
const DEV_HOST_NAME: &str = "localhost";

fn cert_valid_for_a_day(path: &Path) -> bool {
    let Ok(certs) = crate::tls::load_certs("TLS certificate", path) else {
        return false;
    };
    let Some(leaf) = certs.first() else {
        return false;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return false;
    };
    let tomorrow = OffsetDateTime::now_utc().unix_timestamp() + 24 * 3600;
    parsed.validity().not_after.timestamp() > tomorrow
}

/// A throw-away dev CA and a server certificate it signs: (CA PEM, certificate PEM, key PEM).
fn generate_certificates(
    data_dir: &Path,
) -> Result<(String, String, Zeroizing<String>), ServerError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| ServerError::Tls(format!("cannot make the dev certificate: {e}"));
    let now = OffsetDateTime::now_utc();

    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("Strongroom dev CA ({})", data_dir.display()),
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(825);
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;

    let mut leaf = CertificateParams::new(vec![
        DEV_HOST_NAME.to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(err)?;
    leaf.distinguished_name
        .push(DnType::CommonName, DEV_HOST_NAME);
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + time::Duration::days(397);
    let leaf_key = KeyPair::generate().map_err(err)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).map_err(err)?;
    // `ca_key` is dropped here and never written: nobody can sign more certificates under a
    // CA that someone may have added to a trust store.
    Ok((
        ca_cert.pem(),
        leaf_cert.pem(),
        Zeroizing::new(leaf_key.serialize_pem()),
    ))
}

/// The lines `serve --dev` prints on start: where it listens, what to trust, the tokens, and
/// curl commands to paste.
pub fn banner(setup: &DevSetup, addr: SocketAddr, user_token: &str, user: &str) -> String {
    // All addresses (0.0.0.0, ::) include this machine's loopback, which the certificate
    // names; any other is called as it is.
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let url = format!("https://{}", SocketAddr::new(ip, addr.port()));
    let named = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    let not_named = if named.contains(&ip) {
        String::new()
    } else {
        format!(
            "  note            the dev certificate names {DEV_HOST_NAME}, 127.0.0.1 and ::1 \
             only: for {ip}, curl needs `--resolve {DEV_HOST_NAME}:{port}:{ip}` and \
             https://{DEV_HOST_NAME}:{port}\n",
            port = addr.port()
        )
    };
    let ca = shell_quote(&setup.ca_cert.display().to_string());
    let dir = shell_quote(&setup.data_dir.display().to_string());
    // Absolute in the paste block, so the `strongroom` commands it sets up for work from any
    // folder.
    let absolute_dir = shell_quote(
        &std::fs::canonicalize(&setup.data_dir)
            .unwrap_or_else(|_| setup.data_dir.clone())
            .display()
            .to_string(),
    );
    format!(
        "\
Strongroom dev server — for trying things out only: keys, tokens and certificates live in {dir}

  listening on    {url}   (HTTPS only; TLS 1.2 and 1.3, HTTP/1.1 and HTTP/2)
{not_named}  CA certificate  {ca}
  admin token     {admin}   (admin \"{DEV_ADMIN}\")
  service token   {service}   (service \"{DEV_SERVICE}\": may write, reveal and broker any credential)
  user token      {user_token}
                  (user \"{user}\", valid 12 hours; more with `strongroom token mint --dev --data-dir {dir} SUBJECT`)

Try it (paste into a shell):

  export SR={url} CA={ca}
  export ALICE='{user_token}'
  export SERVICE='{service}'
  export ADMIN='{admin}'
  export STRONGROOM_DATA_DIR={absolute_dir}   # for `strongroom credential`, `keys`, `audit` (not for `serve --config`)

  # 1. store a credential as {user} (write-only: {user} can never read it back)
  curl -sS -w '\\n' --cacert \"$CA\" -X PUT \"$SR/v1/me/credentials/zoom.api-key\" -H \"Authorization: Bearer $ALICE\" -H 'Content-Type: application/json' -d '{{\"value\": \"zoom-secret-123\"}}'

  # 2. list {user}'s credentials (names and metadata, never values)
  curl -sS -w '\\n' --cacert \"$CA\" \"$SR/v1/me/credentials\" -H \"Authorization: Bearer $ALICE\"

  # 3. reveal it as the dev service
  curl -sS -w '\\n' --cacert \"$CA\" -X POST \"$SR/v1/owners/{user}/credentials/zoom.api-key/reveal\" -H \"Authorization: Bearer $SERVICE\" -H 'Content-Type: application/json' -d '{{}}'

API description: $SR/v1/openapi.json · health: $SR/healthz · metrics: $SR/metrics
Stop with Ctrl-C (graceful).",
        admin = setup.admin_token.as_str(),
        service = setup.service_token.as_str(),
    )
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-:@%+=,".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn dev_options_debug_hides_the_tokens() {
        let o = DevOptions {
            data_dir: PathBuf::from("d"),
            listen: "127.0.0.1:1".parse().unwrap(),
            admin_token: Some(Zeroizing::new("adm-TOKEN-CANARY".into())),
            service_token: Some(Zeroizing::new("svc-TOKEN-CANARY".into())),
        };
        let text = format!("{o:?}");
        assert!(
            !text.contains("TOKEN-CANARY") && text.contains("REDACTED"),
            "{text}"
        );
    }
}
