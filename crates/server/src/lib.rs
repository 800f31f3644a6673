//! # strongroom-server
//!
//! The Strongroom daemon around the [`strongroom_api`] router: it reads the
//! [configuration](config), opens the store and the key provider the configuration names,
//! terminates TLS, limits connections, and handles signals.
//!
//! * **HTTPS only.** rustls with the `ring` provider ([`tls`]), TLS 1.2 and 1.3, ALPN `h2` and
//!   `http/1.1`, served by hyper's auto (HTTP/1.1 + HTTP/2) connection builder. A plain-HTTP
//!   request on the port fails the TLS handshake and is never answered.
//! * **Mutual TLS** when `tls.client_ca` is set: the chain is verified during the handshake
//!   and the certificate's DNS and URI SANs reach every request as a
//!   [`strongroom_api::PeerCertificate`] extension.
//! * **Limits**: concurrent connections (further clients wait in the listen backlog),
//!   handshake and header-read timeout, header size (HTTP/1 buffer, HTTP/2 header list),
//!   HTTP/2 streams per connection; body size and request time are enforced by the router.
//! * **Signals** ([`Server::run_until_signal`]): SIGTERM or SIGINT stop accepting, let
//!   in-flight requests finish within `limits.shutdown_grace_seconds`, close the store and
//!   return `Ok`. SIGHUP reloads the policy file, the local keyring, the TLS certificate, the
//!   `[broker]` settings and the authentication settings (`[auth]`; both re-read when
//!   [`Reloader::set_config_file`] named it, with the secret, key and JWKS files it names);
//!   whatever fails to load is logged and the old one kept. The local keyring is also
//!   reloaded within a second of its file changing (`keys rotate`, `keys retire`), so every
//!   running node wraps new data keys with a new KEK at once, without a signal.
//! * **Key providers** (`keys.provider`): the local keyring, AWS KMS, a PKCS#11 HSM or
//!   Vault/OpenBao Transit ([`open_key_provider`]); a remote provider is reached and
//!   self-tested before anything is served, and wraps each data key itself.
//! * **Start-up is all or nothing.** [`Server::start`] checks the configuration, loads every
//!   file, opens the keyring and the store, and binds the socket last; any failure is one
//!   [`ServerError`] whose message names the key or file at fault.
//!
//! `--dev` ([`dev`]) builds a whole configuration from a data directory.
//!
//! ```no_run
//! # async fn demo() -> Result<(), strongroom_server::ServerError> {
//! use strongroom_server::{config::Config, config::Overrides, Server};
//!
//! let config = Config::load(Some("strongroom.toml".as_ref()), &Overrides::default())?;
//! let server = Server::start(config).await?;
//! println!("listening on {}", server.local_addr());
//! server.run_until_signal().await
//! # }
//! ```

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod dev;
mod error;
mod idle;
mod jwks;
pub mod logging;
mod rotation;
pub mod tls;
mod trusted;
mod unread_body;

#[cfg(feature = "testing")]
pub mod testing;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use strongroom_api::{
    AppState, AuthSettings, Authenticator, JwtKeySource, JwtSettings, PeerCertificate, TokenEntry,
};
use strongroom_core::hierarchy::KekHierarchy;
use strongroom_core::policy::Policy;
use strongroom_core::{SystemClock, Vault, VaultConfig};
use strongroom_crypto::{KeyProvider, OsRandom};
use strongroom_keys::local::LocalKeyring;
use strongroom_store::postgres::{PostgresOptions, PostgresStore, PostgresTls};
use strongroom_store::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use strongroom_store::{KekRef, Store, StoreError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::{Config, JwtAlgorithmName, LimitsConfig, Overrides, StoreKind, TlsConfig};
pub use crate::error::ServerError;
use crate::idle::{Activity, Watched};
use crate::jwks::JwksSpec;
pub use crate::rotation::{rotate_local_recorded, LocalRotationError};
use crate::tls::CertSlot;
use crate::unread_body::SharedBody;

/// HTTP/2 streams one connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 256;

enum StoreHandle {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl StoreHandle {
    fn as_dyn(&self) -> Arc<dyn Store> {
        match self {
            StoreHandle::Sqlite(s) => Arc::new(s.clone()),
            StoreHandle::Postgres(s) => Arc::new(s.clone()),
        }
    }

    async fn close(&self) {
        if let StoreHandle::Sqlite(s) = self {
            s.close().await;
        }
    }
}

/// The store and key provider a configuration names, opened for an operator command
/// (`rewrap`, `import`, `audit verify`, ...) that runs beside, or instead of, a server.
pub struct Backends {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The key provider the configuration names (`keys.provider`; the local keyring by
    /// default).
    pub keyring: Arc<dyn KeyProvider>,
    /// The local keyring, when it is the provider (for rotation bookkeeping).
    pub local_keyring: Option<Arc<LocalKeyring>>,
    /// The KEK hierarchy, when a remote provider wraps Strongroom's KEKs (`keys.mode =
    /// "hierarchy"`); its root is the remote provider.
    pub hierarchy: Option<Arc<KekHierarchy>>,
    /// The store settings' retention and quota, for the [`Vault`] made over these backends
    /// (operator commands that write, such as an import, keep the server's).
    vault_config: VaultConfig,
    handle: StoreHandle,
    /// Reload the keyring file and the KEK ring as a server does, for as long as these
    /// backends live: an import started before a `keys rotate` seals under the new KEK
    /// within a second, not under the old one for the rest of its run (and after a
    /// `keys retire` of it, under a key that no longer exists).
    _followers: Vec<tokio_util::task::AbortOnDropHandle<()>>,
}

impl Backends {
    /// The SQLite store, when it is the one configured (for `backup`).
    pub fn sqlite(&self) -> Option<&SqliteStore> {
        match &self.handle {
            StoreHandle::Sqlite(s) => Some(s),
            StoreHandle::Postgres(_) => None,
        }
    }

    /// Opens the store and the keyring of `config` (validated first).
    ///
    /// # Errors
    ///
    /// A [`ServerError`] naming the key or file at fault.
    pub async fn open(config: &Config) -> Result<Self, ServerError> {
        Self::open_as(config, FirstStart::Allowed).await
    }

    /// As [`open`](Self::open), for operator commands that manage an existing store: a
    /// missing SQLite database, a PostgreSQL database (or schema) without Strongroom's
    /// tables, and with a remote key provider in `hierarchy` mode a store without a KEK
    /// ring, is an error instead of being made. A command pointed at the wrong data dir or
    /// database then does not start an empty store (and a new ring at the provider) there.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open); [`ServerError::Store`] naming the missing database or
    /// tables, [`ServerError::Provider`] naming the missing ring.
    pub async fn open_existing(config: &Config) -> Result<Self, ServerError> {
        Self::open_as(config, FirstStart::Refused).await
    }

    async fn open_as(config: &Config, first_start: FirstStart) -> Result<Self, ServerError> {
        config.validate_backends()?;
        config.check_backend_files()?;
        // A folder that holds nothing of Strongroom's is most often a mistyped data dir: said
        // so, rather than only "make a keyring" (which would start a new, empty vault there).
        if config.store.kind == StoreKind::Sqlite
            && config.keys.provider == config::KeyProviderKind::Local
        {
            let keyring = config.keyring_path();
            let database = config.data_dir.join(strongroom_store::sqlite::DB_FILE_NAME);
            // Both known to be absent (`exists` would say "no" for a folder it may not read).
            let absent = |p: &std::path::Path| matches!(p.try_exists(), Ok(false));
            if absent(&keyring) && database.exists() {
                return Err(ServerError::Config(format!(
                    "no keyring at {}, but a store at {}: it needs the keyring it was made with \
                     (put that file back, from a backup if it was lost); a new keyring would \
                     open nothing it holds",
                    keyring.display(),
                    database.display()
                )));
            }
            if absent(&keyring) && absent(&database) {
                return Err(ServerError::Config(format!(
                    "no keyring at {} and no database at {}: is the data directory right \
                     (--data-dir, or data_dir in the configuration)? For a new one, \
                     `strongroom keys generate` makes its keyring (or `serve --dev` all of it)",
                    keyring.display(),
                    database.display()
                )));
            }
        }
        let opened = open_key_provider(config).await?;
        let handle = open_store(config, first_start).await?;
        let keys = match open_keys_as(config, handle.as_dyn(), opened, first_start).await {
            Ok(keys) => keys,
            Err(e) => {
                handle.close().await;
                return Err(e);
            }
        };
        let mut followers = Vec::new();
        if let Some(ring) = &keys.local_keyring {
            let (ring, path, store) = (ring.clone(), config.keyring_path(), handle.as_dyn());
            followers.push(tokio::spawn(keep_watching(
                "keyring file",
                KEYRING_POLL,
                move || watch_keyring(ring.clone(), path.clone(), store.clone(), KEYRING_POLL),
            )));
        }
        if let Some(h) = &keys.hierarchy {
            let h = h.clone();
            followers.push(tokio::spawn(keep_watching(
                "key hierarchy",
                KEYRING_POLL,
                move || watch_ring(h.clone(), KEYRING_POLL),
            )));
        }
        Ok(Self {
            store: handle.as_dyn(),
            keyring: keys.provider,
            local_keyring: keys.local_keyring,
            hierarchy: keys.hierarchy,
            vault_config: config.store.vault_config(),
            handle,
            _followers: followers
                .into_iter()
                .map(tokio_util::task::AbortOnDropHandle::new)
                .collect(),
        })
    }

    /// The use cases over these backends.
    pub fn vault(&self) -> Arc<Vault> {
        Arc::new(Vault::new(
            self.store.clone(),
            self.keyring.clone(),
            Arc::new(OsRandom),
            Arc::new(SystemClock),
            self.vault_config.clone(),
        ))
    }

    /// Flushes and closes the store.
    pub async fn close(self) {
        // The ring's reloads read the store: they stop first.
        for follower in self._followers {
            let task = follower.detach();
            task.abort();
            let _ = task.await;
        }
        self.handle.close().await;
    }
}

/// A started server: everything loaded and the socket bound, not yet accepting.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    acceptor: SharedAcceptor,
    state: AppState,
    limits: LimitsConfig,
    reloader: Reloader,
    store: StoreHandle,
    keyring_path: Option<PathBuf>,
    hierarchy: Option<Arc<KekHierarchy>>,
    /// The remote provider in strict mode (no local keyring, no hierarchy).
    strict_provider: Option<Arc<dyn KeyProvider>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// Reloads what SIGHUP reloads. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<ReloaderInner>,
}

/// The TLS acceptor new connections take (a reload may swap it).
type SharedAcceptor = Arc<std::sync::RwLock<TlsAcceptor>>;

struct ReloaderInner {
    state: AppState,
    /// The policy file in force: the configuration's `policy_file` as last reloaded.
    policy_file: Mutex<Option<PathBuf>>,
    /// The configuration the server started with: what a reload cannot change is compared
    /// against it.
    started: Box<Config>,
    keyring: Option<Arc<LocalKeyring>>,
    tls: TlsConfig,
    cert: Arc<CertSlot>,
    /// What new connections handshake with; a reload swaps in one built with the client CA
    /// and `client_auth` the configuration names then.
    acceptor: SharedAcceptor,
    /// A digest of the client CA in force (its path, bytes and `client_auth`): when a
    /// reload changes it, connections that presented a certificate are closed gracefully,
    /// so a certificate the new CA refuses does not keep its identity on a kept-alive
    /// connection.
    client_trust: tokio::sync::watch::Sender<[u8; 32]>,
    /// Where a reload takes the `[auth]` settings from.
    config_source: Mutex<ConfigSource>,
    /// The JWKS fetched from `auth.jwt.jwks_url` and what it was built from.
    jwks: Mutex<Option<(JwksSpec, Arc<strongroom_api::RemoteJwks>)>>,
    /// Where JWKS refresh tasks run.
    runtime: tokio::runtime::Handle,
    /// The `[audit] jsonl` file, opened again by name on each reload.
    audit_file: Option<AuditFile>,
}

enum ConfigSource {
    /// The configuration the server started with (its files are read again).
    Fixed(Box<Config>),
    /// Read the file (if any), the environment and the overrides again, as at start.
    Load {
        file: Option<PathBuf>,
        overrides: Overrides,
    },
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field(
                "policy_file",
                &*self
                    .inner
                    .policy_file
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            )
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// From now on, each reload takes the authentication settings from the configuration
    /// `file` (if any), the `STRONGROOM_*` environment and `overrides`, read and validated
    /// again as a whole (as [`Config::load`] does). Without this call a reload re-reads the
    /// files the start-up configuration names (HS256 secret, public key, JWKS) only.
    pub fn set_config_file(&self, file: Option<PathBuf>, overrides: Overrides) {
        *self
            .inner
            .config_source
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = ConfigSource::Load { file, overrides };
    }

    /// The configuration a reload takes its settings from (see [`Reloader::set_config_file`]).
    fn config(&self) -> Result<Config, ServerError> {
        match &*self
            .inner
            .config_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            ConfigSource::Fixed(c) => {
                // The files it names are read again: checked again (as at start).
                c.check_files()?;
                Ok((**c).clone())
            }
            ConfigSource::Load { file, overrides } => {
                let config = Config::load(file.as_deref(), overrides)?;
                config.check_files()?;
                Ok(config)
            }
        }
    }

    /// Reloads the `[broker]` settings (and the CA file they name): calls in flight finish
    /// with the broker they started with.
    ///
    /// # Errors
    ///
    /// The [`ServerError`] naming the key or file at fault; the broker in force stays.
    pub fn reload_broker(&self) -> Result<(), ServerError> {
        self.apply_broker(&self.config()?)
    }

    fn apply_broker(&self, config: &Config) -> Result<(), ServerError> {
        let mut broker = build_broker(config)?;
        if let Some(previous) = self.inner.state.broker() {
            broker = broker.keeping_calls_of(&previous);
        }
        let allow_private = broker.settings().allow_private_networks;
        self.inner.state.set_broker(Arc::new(broker));
        tracing::info!(
            allow_private_networks = allow_private,
            "broker settings reloaded"
        );
        Ok(())
    }

    /// Reloads the authentication settings alone: see [`Reloader::reload`].
    ///
    /// # Errors
    ///
    /// The [`ServerError`] naming the key or file at fault; the settings in force stay.
    pub fn reload_auth(&self) -> Result<(), ServerError> {
        self.apply_auth(&self.config()?)
    }

    /// New connections verify client certificates against the `tls.client_ca` and
    /// `tls.client_auth` of `config` (the server certificate stays the one of the start
    /// configuration's files, reloaded separately). Connections already open keep theirs.
    fn apply_client_auth(&self, config: &Config) -> Result<(), ServerError> {
        let inner = &self.inner;
        let Some(new) = &config.tls else {
            return Ok(());
        };
        let tls = TlsConfig {
            client_ca: new.client_ca.clone(),
            client_auth: new.client_auth,
            ..inner.tls.clone()
        };
        let server_tls = tls::server_config(&tls, inner.cert.clone())?;
        let trust = client_trust_digest(&tls)?;
        *inner.acceptor.write().unwrap_or_else(|e| e.into_inner()) =
            TlsAcceptor::from(Arc::new(server_tls));
        let changed = inner.client_trust.send_if_modified(|was| {
            let changed = *was != trust;
            *was = trust;
            changed
        });
        tracing::info!(
            client_ca = ?tls.client_ca,
            client_auth = ?tls.client_auth,
            changed,
            "TLS client authentication reloaded{}",
            if changed {
                "; connections that presented a client certificate are closed after their \
                 requests in flight"
            } else {
                ""
            }
        );
        Ok(())
    }

    fn apply_auth(&self, config: &Config) -> Result<(), ServerError> {
        let inner = &self.inner;
        let spec = JwksSpec::of(config)?;
        let current = inner.jwks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let remote = match (&spec, current) {
            (None, _) => None,
            // Same URL, CA and timings: keep the cache and its refresh task.
            (Some(spec), Some((was, remote))) if *spec == was => Some(remote),
            (Some(spec), _) => {
                // Reloads are synchronous (SIGHUP runs them on a blocking thread, tests call
                // them directly): fetch on a runtime of our own; the refresh task goes to
                // the server's.
                let runtime = inner.runtime.clone();
                Some(block_on_own_runtime(spec.connect(&runtime))??)
            }
        };
        let authenticator = Authenticator::reloaded(auth_settings(config, remote.clone())?)?;
        let (services, admins) = (config.auth.service.len(), config.auth.admin.len());
        inner.state.replace_auth(authenticator);
        *inner.jwks.lock().unwrap_or_else(|e| e.into_inner()) = spec.zip(remote);
        if let Some(j) = &config.auth.jwt {
            warn_if_any_token_issuer_or_audience(j);
        }
        tracing::info!(
            services,
            admins,
            mtls = config.auth.mtls.len(),
            user_tokens = config.auth.jwt.is_some(),
            "authentication settings reloaded"
        );
        Ok(())
    }

    /// Reloads the policy file (if configured), the local keyring, the TLS certificate, the
    /// broker settings ([`Reloader::reload_broker`]) and the authentication settings
    /// ([`Reloader::reload_auth`]). Each part that loads
    /// replaces the old one as a whole; each that fails is logged and the old one stays in
    /// force. Requests in flight finish under the settings they started with.
    ///
    /// # Errors
    ///
    /// The messages of the parts that failed (the others were still reloaded).
    pub fn reload(&self) -> Result<(), Vec<String>> {
        let inner = &self.inner;
        let mut failed = Vec::new();
        // One reading of the configuration for every section; one that does not load keeps
        // the broker, authentication and policy file in force (the policy file is read again).
        let config = match self.config() {
            Ok(config) => {
                self.warn_restart_only(&config);
                Some(config)
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; keeping the previous broker and authentication settings and policy file");
                failed.push(e.to_string());
                None
            }
        };
        if let Err(e) = self.reload_policy(config.as_ref()) {
            tracing::error!(error = %e, "policy reload failed; keeping the previous policy");
            failed.push(e.to_string());
        }
        // The keyring and the certificate are read again only under a configuration whose
        // files passed their checks.
        if let (Some(keyring), Some(_)) = (&inner.keyring, &config) {
            match keyring.reload() {
                Ok(()) => tracing::info!(versions = keyring.list().len(), "keyring reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "keyring reload failed; keeping the keys loaded before");
                    failed.push(e.to_string());
                }
            }
        }
        if let Some(file) = &inner.audit_file {
            match file.reopen() {
                Ok(()) => tracing::info!(path = %file.path.display(), "audit jsonl file reopened"),
                Err(e) => {
                    tracing::error!(error = %e, "audit jsonl file not reopened; writing on to the one open before");
                    failed.push(e.to_string());
                }
            }
        }
        match config
            .as_ref()
            .map(|_| tls::load_certified_key(&inner.tls, &tls::provider()))
        {
            None => {}
            Some(Ok(ck)) => {
                inner.cert.replace(ck);
                tracing::info!(cert = %inner.tls.cert.display(), "TLS certificate reloaded");
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "TLS certificate reload failed; keeping the previous one");
                failed.push(e.to_string());
            }
        }
        if let Some(config) = &config {
            if let Err(e) = self.apply_client_auth(config) {
                tracing::error!(error = %e, "TLS client authentication reload failed; keeping the previous settings");
                failed.push(e.to_string());
            }
            if let Err(e) = self.apply_broker(config) {
                tracing::error!(error = %e, "broker reload failed; keeping the previous settings");
                failed.push(e.to_string());
            }
            if let Err(e) = self.apply_auth(config) {
                tracing::error!(error = %e, "authentication reload failed; keeping the previous settings");
                failed.push(e.to_string());
            }
        }
        let runtime = tokio::runtime::Handle::try_current().ok();
        if let (Some(auditor), Some(runtime)) = (inner.state.auditor(), runtime) {
            let event = operator_event(
                "reload",
                if failed.is_empty() { "ok" } else { "error" },
                (!failed.is_empty()).then_some("reload_failed"),
                None,
            );
            let auditor = auditor.clone();
            runtime.spawn(async move {
                if let Err(e) = auditor.record(event).await {
                    tracing::error!(error = %e, "audit record of the reload not written");
                }
            });
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed)
        }
    }
}

impl Reloader {
    /// Reads the policy file the configuration names now (the one in force when `config`
    /// did not load) and puts it in force.
    fn reload_policy(&self, config: Option<&Config>) -> Result<(), ServerError> {
        let inner = &self.inner;
        let mut in_force = inner.policy_file.lock().unwrap_or_else(|e| e.into_inner());
        let path = match (config.map(|c| &c.policy_file), &*in_force) {
            (Some(Some(named)), _) => named.clone(),
            (None, Some(current)) => current.clone(),
            // No policy file at start (dev's policy, or deny-all) and none now.
            (Some(None) | None, None) => return Ok(()),
            // As at a start without one: services may do nothing (the policy in force
            // stayed until a restart, so removing the line revoked nothing).
            (Some(None), Some(current)) => {
                tracing::warn!(
                    was = %current.display(),
                    "policy_file was removed from the configuration: every service is now denied every operation"
                );
                inner.state.replace_policy(Policy::default());
                *in_force = None;
                return Ok(());
            }
        };
        let policy = load_policy(&path)?;
        warn_unknown_services(&policy, &config.unwrap_or(&inner.started).auth);
        let rules = policy.rules().len();
        if rules == 0 {
            tracing::warn!(path = %path.display(), "the reloaded policy has no rules: every service is now denied every operation");
        }
        if in_force.as_ref() != Some(&path) {
            tracing::info!(path = %path.display(), "policy_file changed in the configuration");
        }
        inner.state.replace_policy(policy);
        tracing::info!(path = %path.display(), rules, "policy reloaded");
        *in_force = Some(path);
        Ok(())
    }

    /// Warns about each setting `config` changes that only a restart applies: a reload
    /// that says nothing of them would leave an operator believing them in force.
    fn warn_restart_only(&self, config: &Config) {
        let was = &self.inner.started;
        let tls_files = |c: &Config| c.tls.as_ref().map(|t| (t.cert.clone(), t.key.clone()));
        let changed: Vec<&str> = [
            ("listen", was.listen != config.listen),
            ("data_dir", was.data_dir != config.data_dir),
            (
                "store",
                format!("{:?}", was.store) != format!("{:?}", config.store),
            ),
            (
                "keys",
                format!("{:?}", was.keys) != format!("{:?}", config.keys),
            ),
            (
                "limits",
                format!("{:?}", was.limits) != format!("{:?}", config.limits),
            ),
            (
                "log",
                format!("{:?}", was.log) != format!("{:?}", config.log),
            ),
            (
                "audit",
                format!("{:?}", was.audit) != format!("{:?}", config.audit),
            ),
            (
                "tls.cert and tls.key paths",
                tls_files(was) != tls_files(config),
            ),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect();
        if !changed.is_empty() {
            tracing::warn!(
                settings = changed.join(", "),
                "these settings changed in the configuration but take effect only at a restart"
            );
        }
    }
}

/// Who runs an operator command, as audit records name them: the process's effective user
/// id and the environment's user name (`USER`, else `LOGNAME`; at most 32 characters), as in
/// `uid 1000 (USER alice)`, or `uid 0` when the environment names nobody.
pub fn operator_name() -> String {
    // The user id is what the kernel says; the name is the environment's (absent under
    // cron, systemd or a bare container, where records used to say nobody).
    let uid = trusted::euid();
    let name: String = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(32)
        .collect();
    // The uid first and the name labelled as the environment's claim, so a USER of
    // "root (uid 0)" cannot pass for the uid.
    if name.is_empty() {
        format!("uid {uid}")
    } else {
        format!("uid {uid} (USER {name})")
    }
}

/// An operator action's audit event (principal `operator`, the OS user running it).
fn operator_event(
    action: &str,
    outcome: &str,
    error_code: Option<&str>,
    version: Option<u32>,
) -> strongroom_store::audit::Event {
    strongroom_store::audit::Event {
        time: time::OffsetDateTime::now_utc(),
        principal_kind: "operator".into(),
        principal_id: operator_name(),
        action: action.into(),
        owner: None,
        name: None,
        version,
        outcome: outcome.into(),
        status: 0,
        request_id: None,
        client_addr: None,
        on_behalf_of: None,
        destination: None,
        error_code: error_code.map(str::to_owned),
    }
}

/// Appends one audit record for an operator action run outside a server (`keys rotate`,
/// `rewrap`, `keys retire`, `import`, ...): principal `operator` (the OS user), `action` as
/// given (e.g. `"keys.rotate"`), `outcome` `started`, `ok` or `error` with a stable
/// `error_code`, and the key version it made or retired, if any. The
/// record is durable when this returns. Creates the audit head key on first use.
///
/// # Errors
///
/// [`ServerError::Runtime`] when the record cannot be written.
pub async fn audit_operator_action(
    backends: &Backends,
    action: &str,
    outcome: &str,
    error_code: Option<&str>,
    version: Option<u32>,
) -> Result<(), ServerError> {
    audit_operator_action_with(
        backends,
        backends.keyring.as_ref(),
        action,
        outcome,
        error_code,
        version,
    )
    .await
}

/// As [`audit_operator_action`], opening the audit head key with `keys` (a move to another
/// provider moves the head key too, so a catch-up run finds it under the target's).
///
/// # Errors
///
/// As [`audit_operator_action`].
pub async fn audit_operator_action_with(
    backends: &Backends,
    keys: &dyn strongroom_crypto::KeyProvider,
    action: &str,
    outcome: &str,
    error_code: Option<&str>,
    version: Option<u32>,
) -> Result<(), ServerError> {
    let err = |e: strongroom_core::CoreError| ServerError::Runtime(format!("audit: {e}"));
    let log = strongroom_core::audit::audit_log(backends.store.as_ref()).map_err(err)?;
    let key =
        strongroom_core::audit::load_or_create_head_key(backends.store.as_ref(), keys, &OsRandom)
            .await
            .map_err(err)?;
    log.audit_append(
        Arc::new(key),
        vec![operator_event(action, outcome, error_code, version)],
    )
    .await
    .map_err(|e| ServerError::Runtime(format!("audit: {e}")))?;
    Ok(())
}

/// The `[audit] jsonl` file, which SIGHUP opens again by name: logrotate (in its default
/// `create` mode) moves the file away and signals, and records kept going to the moved file,
/// which then grew without end.
#[derive(Clone)]
struct AuditFile {
    path: PathBuf,
    file: Arc<Mutex<std::fs::File>>,
}

impl AuditFile {
    fn open(path: &Path) -> Result<Self, ServerError> {
        Ok(Self {
            path: path.to_owned(),
            file: Arc::new(Mutex::new(trusted::open_append(path, "audit jsonl file")?)),
        })
    }

    /// Continues in a file opened anew under the configured name.
    fn reopen(&self) -> Result<(), ServerError> {
        let fresh = trusted::open_append(&self.path, "audit jsonl file")?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

impl std::io::Write for AuditFile {
    /// Writes all of `buf` (one line) or none of it: a line the disk took only part of is
    /// cut off again, so the file holds whole lines only.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut written = 0;
        if let Err(e) = strongroom_core::lines::write_counting(&mut *file, buf, &mut written) {
            // The file's length is read only then: nothing is added to each record's write.
            if written > 0 {
                if let Ok(meta) = file.metadata() {
                    let _ = file.set_len(meta.len().saturating_sub(written as u64));
                }
            }
            return Err(e);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens where `[audit] jsonl` says records are also written; the file, when it is one.
fn open_audit_sink(
    config: &Config,
) -> Result<
    (
        Option<strongroom_core::audit::RecordSink>,
        Option<AuditFile>,
    ),
    ServerError,
> {
    let Some(path) = &config.audit.jsonl else {
        return Ok((None, None));
    };
    if path.as_os_str() == "-" {
        return Ok((Some(Box::new(std::io::stdout())), None));
    }
    let file = AuditFile::open(path)?;
    Ok((Some(Box::new(file.clone())), Some(file)))
}

/// Starts auditing on `state`: unwraps (or creates) the head key and starts the writer.
/// Returns the JSON-lines file, if one is configured.
async fn start_auditor(
    config: &Config,
    state: &AppState,
    keys: &dyn KeyProvider,
) -> Result<Option<AuditFile>, ServerError> {
    let err = |e: strongroom_core::CoreError| ServerError::Runtime(format!("audit: {e}"));
    let store = state.vault().store().clone();
    let log = strongroom_core::audit::audit_log(store.as_ref()).map_err(err)?;
    let key = strongroom_core::audit::load_or_create_head_key(store.as_ref(), keys, &OsRandom)
        .await
        .map_err(err)?;
    let (sink, file) = open_audit_sink(config)?;
    let auditor = strongroom_core::audit::Auditor::start(log, key, sink);
    let dropped = auditor.sink_dropped();
    state.metrics().register_counter_fn(
        "audit_jsonl_records_dropped",
        "Committed audit records the [audit] jsonl copy could not take (a full disk): they are \
         in the audit log, not in the copy",
        move || dropped.load(std::sync::atomic::Ordering::Relaxed),
    );
    state.set_auditor(auditor);
    Ok(file)
}

/// Warns about each policy rule whose service no `[[auth.service]]` or `[[auth.mtls]]` entry
/// authenticates: most likely a typo, whose service would then be refused everything it was
/// meant to be allowed. (A warning, not an error: a rule may be staged before its service.)
fn warn_unknown_services(policy: &Policy, auth: &config::AuthConfig) {
    let known = |name: &str| {
        auth.service.iter().any(|t| t.name == name)
            || auth.mtls.iter().any(|m| m.service.as_deref() == Some(name))
    };
    if auth
        .jwt
        .as_ref()
        .is_some_and(|j| j.on_behalf_of_audience.is_none())
        && policy.rules().iter().any(|r| r.delegated)
    {
        tracing::warn!(
            "the policy has delegated rules but [auth.jwt] sets no on_behalf_of_audience: a \
             delegated service presents the user's own token, with which it could also call \
             the user's routes (/v1/me) directly; set it, and have the identity provider issue \
             tokens with that audience for delegation"
        );
    }
    let mut warned: Vec<&str> = Vec::new();
    for rule in policy.rules() {
        if !known(&rule.service) && !warned.contains(&rule.service.as_str()) {
            warned.push(&rule.service);
            tracing::warn!(
                service = %rule.service,
                "the policy names a service that no [[auth.service]] or [[auth.mtls]] entry authenticates; check the spelling"
            );
        }
    }
}

fn load_policy(path: &Path) -> Result<Policy, ServerError> {
    // Checked through the handle it is read from: a policy swapped in between is never read.
    let text = trusted::read_to_string(path, "policy file")?;
    Policy::from_toml(&text).map_err(|source| ServerError::Policy {
        path: path.to_owned(),
        source,
    })
}

fn token_entries(list: &[config::TokenConfig]) -> Vec<TokenEntry> {
    list.iter()
        .filter_map(|t| {
            config::parse_sha256_hex(&t.token_sha256).map(|sha256| TokenEntry {
                name: t.name.clone(),
                sha256,
            })
        })
        .collect()
}

/// Runs `fut` to completion on a current-thread runtime of its own, on a thread of its own,
/// so that it works from any context (async or not) without blocking a runtime's workers.
fn block_on_own_runtime<F>(fut: F) -> Result<F::Output, ServerError>
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| rt.block_on(fut))
                    .map_err(|e| ServerError::Runtime(format!("reload runtime: {e}")))
            })
            .join()
            .unwrap_or_else(|_| Err(ServerError::Runtime("reload thread panicked".into())))
    })
}

/// The authentication settings of `config`; `remote` is the JWKS of `auth.jwt.jwks_url`
/// (fetched by the caller).
fn auth_settings(
    config: &Config,
    remote: Option<Arc<strongroom_api::RemoteJwks>>,
) -> Result<AuthSettings, ServerError> {
    let jwt = match &config.auth.jwt {
        None => None,
        Some(j) => {
            let keys = if let Some(path) = &j.hs256_secret_file {
                let secret = dev::read_secret_file(path)?;
                if secret.len() < 32 {
                    return Err(ServerError::Config(format!(
                        "key `auth.jwt.hs256_secret_file`: {} holds {} bytes; an HS256 secret needs at least 32",
                        path.display(),
                        secret.len()
                    )));
                }
                JwtKeySource::Hs256Secret(secret)
            } else if let Some(path) = &j.public_key_file {
                // Whoever can change it can sign any user's token.
                let pem = trusted::read_to_string(path, "JWT public key file")?.into_bytes();
                let algorithm = match j.algorithm {
                    Some(JwtAlgorithmName::Rs256) => strongroom_api::JwtAlgorithm::Rs256,
                    Some(JwtAlgorithmName::Es256) => strongroom_api::JwtAlgorithm::Es256,
                    Some(JwtAlgorithmName::EdDsa) => strongroom_api::JwtAlgorithm::EdDsa,
                    // `validate` requires an asymmetric algorithm with a public key.
                    Some(JwtAlgorithmName::Hs256) | None => {
                        return Err(ServerError::Config(
                            "key `auth.jwt.algorithm`: RS256, ES256 or EdDSA is required with public_key_file".into(),
                        ))
                    }
                };
                if algorithm == strongroom_api::JwtAlgorithm::Rs256 {
                    check_rsa_size(&pem, path)?;
                }
                JwtKeySource::PublicKeyPem { algorithm, pem }
            } else if let Some(path) = &j.jwks_file {
                let json = trusted::read_to_string(path, "JWKS file")?;
                JwtKeySource::Jwks(json)
            } else if let Some(remote) = remote {
                JwtKeySource::Remote(remote)
            } else {
                return Err(ServerError::Config(
                    "key `auth.jwt`: set one of hs256_secret_file, public_key_file, jwks_file or jwks_url"
                        .into(),
                ));
            };
            Some(JwtSettings {
                issuer: j.issuer.clone(),
                audience: j.audience.clone(),
                on_behalf_of_audience: j.on_behalf_of_audience.clone(),
                leeway_seconds: j.leeway_seconds,
                keys,
            })
        }
    };
    let (mtls_services, mtls_admins) = config.mtls_maps();
    Ok(AuthSettings {
        jwt,
        service_tokens: token_entries(&config.auth.service),
        admin_tokens: token_entries(&config.auth.admin),
        mtls_services,
        mtls_admins,
    })
}

/// The fewest bits of an RSA key RS256 tokens are verified with (the verifier refuses
/// smaller keys, so every token would get 401 with nothing said).
const RSA_MIN_BITS: usize = 2048;

/// Refuses an RSA public key (SPKI or PKCS#1 PEM) under [`RSA_MIN_BITS`]; one that does not
/// parse here is left to the verifier, which names the problem.
fn check_rsa_size(pem: &[u8], path: &Path) -> Result<(), ServerError> {
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::{PublicKey, RSAPublicKey};
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(pem) else {
        return Ok(());
    };
    let bits = match block.label.as_str() {
        "PUBLIC KEY" => x509_parser::x509::SubjectPublicKeyInfo::from_der(&block.contents)
            .ok()
            .and_then(|(_, spki)| match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => Some(rsa.key_size()),
                _ => None,
            }),
        "RSA PUBLIC KEY" => RSAPublicKey::from_der(&block.contents)
            .ok()
            .map(|(_, rsa)| rsa.key_size()),
        // The verifier takes a certificate's key too.
        "CERTIFICATE" => x509_parser::parse_x509_certificate(&block.contents)
            .ok()
            .and_then(|(_, cert)| match cert.public_key().parsed() {
                Ok(PublicKey::RSA(rsa)) => Some(rsa.key_size()),
                _ => None,
            }),
        _ => None,
    };
    match bits {
        Some(bits) if bits < RSA_MIN_BITS => Err(ServerError::Config(format!(
            "key `auth.jwt.public_key_file`: {} is a {bits}-bit RSA key; RS256 tokens are \
             verified with keys of at least {RSA_MIN_BITS} bits",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// What decides which client certificates connections accept: the client CA's path and
/// bytes, and `client_auth`.
fn client_trust_digest(tls: &TlsConfig) -> Result<[u8; 32], ServerError> {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    digest.update(format!("{:?}\0", tls.client_auth));
    if let Some(ca) = &tls.client_ca {
        digest.update(ca.as_os_str().as_encoded_bytes());
        digest.update([0]);
        digest.update(&*trusted::read(ca, "TLS client CA")?);
    }
    Ok(digest.finalize().into())
}

fn build_broker(config: &Config) -> Result<strongroom_core::broker::Broker, ServerError> {
    strongroom_core::broker::Broker::new(config.broker.settings(&config.limits))
        .map_err(|e| ServerError::Config(format!("key `broker.ca_file`: {e}")))
}

async fn open_store(config: &Config, first_start: FirstStart) -> Result<StoreHandle, ServerError> {
    match config.store.kind {
        StoreKind::Sqlite => {
            let mut options = SqliteOptions::default();
            if let Some(mb) = config.store.reveal_cache_mb {
                options.reveal_cache_bytes = usize::try_from(mb).unwrap_or(usize::MAX) << 20;
            }
            // Never for an operator command, whatever the provider: a keyring named apart
            // from the data dir opens fine when the data dir is mistyped, and an empty store
            // made there would answer "nothing uses this key" or "the log is intact".
            options.create = first_start == FirstStart::Allowed;
            if config.store.sync == config::StoreSync::Normal {
                options.synchronous = Synchronous::DangerNormal;
                tracing::warn!(
                    "store.sync = \"normal\": commits are not fsynced; acknowledged writes and \
                     audit records survive a process crash but not power loss"
                );
            }
            let store = SqliteStore::open_dir_with(&config.data_dir, options).await?;
            // Made just now, perhaps: in a folder anyone may write (/tmp), another user could
            // have made it first.
            if let Err(e) = trusted::check(&config.data_dir, "data dir") {
                store.close().await;
                return Err(e);
            }
            Ok(StoreHandle::Sqlite(store))
        }
        StoreKind::Postgres => {
            let url = config.store.url.as_deref().ok_or_else(|| {
                ServerError::Config(
                    "key `store.url`: is required with store.kind = \"postgres\"".into(),
                )
            })?;
            let mut options = PostgresOptions::default();
            if let Some(n) = config.store.max_connections {
                options.max_connections = n;
            }
            options.schema = config.store.schema.clone();
            options.create = first_start == FirstStart::Allowed;
            // No statement outlives the request it serves: one whose request timed out would
            // otherwise run on at the server, holding a backend and a pooled connection. A
            // second under the request's own limit, so that the server cancels a slow
            // statement and the request fails with its error, its connection pooled again.
            options.statement_timeout = Some(Duration::from_secs(
                config
                    .limits
                    .request_timeout_seconds
                    .saturating_sub(1)
                    .max(1),
            ));
            if let Some(ca) = &config.store.tls_ca_file {
                options.tls = PostgresTls::CaFile(ca.clone());
            }
            let store = PostgresStore::connect(url, options).await?;
            for warning in store.durability_warnings() {
                tracing::warn!("{warning}");
            }
            Ok(StoreHandle::Postgres(store))
        }
    }
}

impl Server {
    /// Starts a server for `config`: services may do nothing unless `policy_file` says so.
    ///
    /// # Errors
    ///
    /// As [`Server::start_with_policy`].
    pub async fn start(config: Config) -> Result<Self, ServerError> {
        Self::start_with_policy(config, Policy::default()).await
    }

    /// Validates `config`, loads the TLS material, the policy (`policy_file`, or `fallback`
    /// when none is configured), the authentication keys and the keyring, opens the store,
    /// and binds the socket. Nothing is served until [`Server::run`].
    ///
    /// # Errors
    ///
    /// A [`ServerError`] naming the key or file at fault; nothing is left running.
    pub async fn start_with_policy(config: Config, fallback: Policy) -> Result<Self, ServerError> {
        config.validate()?;
        config.check_files()?;
        raise_open_file_limit(config.limits.max_connections);
        let tls_config = config
            .tls
            .clone()
            .ok_or_else(|| ServerError::Config("key `tls`: is required".into()))?;
        let cert = Arc::new(CertSlot::new(tls::load_certified_key(
            &tls_config,
            &tls::provider(),
        )?));
        let server_tls = tls::server_config(&tls_config, cert.clone())?;

        let policy = match &config.policy_file {
            Some(path) => load_policy(path)?,
            None => fallback,
        };
        let runtime = tokio::runtime::Handle::current();
        // `auth.jwt.jwks_url`: the first fetch must succeed (else one clear error).
        let jwks_spec = JwksSpec::of(&config)?;
        let remote = match &jwks_spec {
            Some(spec) => Some(spec.connect(&runtime).await?),
            None => None,
        };
        let authenticator = Authenticator::new(auth_settings(&config, remote.clone())?)?;
        match &config.auth.jwt {
            None => tracing::warn!("no [auth.jwt]: users cannot authenticate"),
            Some(j) => warn_if_any_token_issuer_or_audience(j),
        }
        match &config.policy_file {
            None if policy.rules().is_empty() => {
                tracing::warn!("no policy_file: services are denied every operation");
            }
            // As at a reload: an empty file (a save cut short) fails closed, loudly.
            Some(path) if policy.rules().is_empty() => tracing::warn!(
                path = %path.display(),
                "the policy has no rules: every service is denied every operation"
            ),
            Some(path) => tracing::info!(
                path = %path.display(),
                rules = policy.rules().len(),
                "policy loaded"
            ),
            None => {}
        }
        warn_unknown_services(&policy, &config.auth);
        let names = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
        for name in config::unknown_env_names(names) {
            tracing::warn!(
                variable = name.as_str(),
                "environment variable names no setting and is ignored (a typo? nested keys \
                 use two underscores: STRONGROOM_TLS__CLIENT_AUTH)"
            );
        }
        let broker = build_broker(&config)?;

        let opened = open_key_provider(&config).await?;
        let store = open_store(&config, FirstStart::Allowed).await?;
        let Keys {
            provider: keyring,
            local_keyring,
            hierarchy,
        } = match open_keys(&config, store.as_dyn(), opened).await {
            Ok(keys) => keys,
            Err(e) => {
                store.close().await;
                return Err(e);
            }
        };
        // Strict mode: the remote provider seals each data key itself.
        let strict_provider =
            (hierarchy.is_none() && local_keyring.is_none()).then(|| keyring.clone());
        let keyring_path = local_keyring.as_ref().map(|_| config.keyring_path());

        let vault = Arc::new(Vault::new(
            store.as_dyn(),
            keyring.clone(),
            Arc::new(OsRandom),
            Arc::new(SystemClock),
            config.store.vault_config(),
        ));
        let state = AppState::new(vault, authenticator, policy, config.limits.api_limits());
        state.metrics().register_counter_fn(
            "log_lines_dropped",
            "Log lines that could not be written to stderr (a full disk, a reader gone)",
            logging::lines_dropped,
        );
        state.set_broker(Arc::new(broker));
        let rotation = match (&local_keyring, &hierarchy) {
            (Some(keyring), _) => rotation::ServerRotation::Local {
                path: config.keyring_path(),
                keyring: keyring.clone(),
                store: store.as_dyn(),
            },
            (None, Some(ring)) => rotation::ServerRotation::Ring {
                store: store.as_dyn(),
                ring: ring.clone(),
            },
            (None, None) => rotation::ServerRotation::Remote {
                config: Box::new(config.clone()),
                provider: keyring.clone(),
            },
        };
        state.set_key_rotation(Arc::new(rotation));
        let audit_file = match start_auditor(&config, &state, keyring.as_ref()).await {
            Ok(file) => file,
            Err(e) => {
                store.close().await;
                return Err(e);
            }
        };

        let listener = match TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(source) => {
                store.close().await;
                return Err(ServerError::Bind {
                    addr: config.listen,
                    source,
                });
            }
        };
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        tracing::info!(
            listen = %local_addr,
            data_dir = %config.data_dir.display(),
            store = ?config.store.kind,
            key_provider = config.keys.provider.as_str(),
            key_mode = if hierarchy.is_some() { "hierarchy" } else { "direct" },
            active_kek = %keyring
                .active_kek()
                .map_or_else(|e| e.to_string(), |k| k.to_string()),
            mtls = tls_config.client_ca.is_some(),
            "strongroom ready"
        );

        let acceptor: SharedAcceptor = Arc::new(std::sync::RwLock::new(TlsAcceptor::from(
            Arc::new(server_tls),
        )));
        let (client_trust, _) = tokio::sync::watch::channel(client_trust_digest(&tls_config)?);
        let reloader = Reloader {
            inner: Arc::new(ReloaderInner {
                state: state.clone(),
                policy_file: Mutex::new(config.policy_file.clone()),
                started: Box::new(config.clone()),
                keyring: local_keyring,
                tls: tls_config,
                cert,
                acceptor: acceptor.clone(),
                client_trust,
                config_source: Mutex::new(ConfigSource::Fixed(Box::new(config.clone()))),
                jwks: Mutex::new(jwks_spec.zip(remote)),
                runtime,
                audit_file,
            }),
        };
        Ok(Self {
            listener,
            local_addr,
            acceptor,
            state,
            limits: config.limits.clone(),
            reloader,
            store,
            keyring_path,
            hierarchy,
            strict_provider,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The router's state (policy, vault, metrics).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// What SIGHUP does, callable directly.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves until a SIGTERM or SIGINT, reloading on SIGHUP; then shuts down gracefully.
    ///
    /// # Errors
    ///
    /// [`ServerError::Runtime`] if the signal handlers cannot be installed.
    pub async fn run_until_signal(self) -> Result<(), ServerError> {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| ServerError::Runtime(format!("cannot handle {name}: {e}")))
        };
        let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
        let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
        let mut hup = handler(SignalKind::hangup(), "SIGHUP")?;
        let reloader = self.reloader();
        let shutdown = async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                    _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading");
                        let r = reloader.clone();
                        // File reads: keep them off the async workers.
                        let _ = tokio::task::spawn_blocking(move || r.reload()).await;
                    }
                }
            }
        };
        self.run(shutdown).await
    }

    /// Serves until `shutdown` completes; then stops accepting, gives in-flight requests
    /// `limits.shutdown_grace_seconds` to finish, closes the rest and the store.
    ///
    /// # Errors
    ///
    /// None today; the `Result` leaves room for fatal accept errors.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let Server {
            listener,
            acceptor,
            state,
            limits,
            store,
            reloader,
            keyring_path,
            hierarchy,
            strict_provider,
            ..
        } = self;
        // A `keys rotate` on this host (or a shared keyring file) takes effect within a
        // second, without SIGHUP: new writes use the new KEK at once.
        let keyring_watch = match (&reloader.inner.keyring, keyring_path) {
            (Some(ring), Some(path)) => {
                let (ring, store) = (ring.clone(), state.vault().store().clone());
                Some(tokio::spawn(keep_watching(
                    "keyring file",
                    KEYRING_POLL,
                    move || watch_keyring(ring.clone(), path.clone(), store.clone(), KEYRING_POLL),
                )))
            }
            _ => None,
        };
        let foreign_check = tokio::spawn(warn_about_foreign_versions(
            state.vault().store().clone(),
            openable_kinds(state.vault().keys().as_ref(), hierarchy.as_deref()),
            reloader.inner.keyring.clone(),
        ));
        // Likewise a `keys rotate` of the KEK hierarchy, on any node sharing the store.
        // In strict mode, the provider's own versions.
        let ring_watch = match (hierarchy, strict_provider) {
            (Some(h), _) => Some(tokio::spawn(keep_watching(
                "key hierarchy",
                KEYRING_POLL,
                move || watch_ring(h.clone(), KEYRING_POLL),
            ))),
            (None, Some(p)) => Some(tokio::spawn(keep_watching(
                "key provider",
                KEYRING_POLL,
                move || watch_provider(p.clone(), KEYRING_POLL),
            ))),
            (None, None) => None,
        };
        let pruning = tokio::spawn(prune_rate_limits(state.clone(), RATE_LIMIT_PRUNE));
        let vault = state.vault().clone();
        let router = strongroom_api::router(state);
        let builder = Arc::new(http_builder(&limits));
        let handshake_timeout = Duration::from_secs(limits.handshake_timeout_seconds);
        let idle_timeout = Duration::from_secs(limits.idle_timeout_seconds);
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let graceful = GracefulShutdown::new();
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        // Tells connections still in their TLS handshake that the server is stopping: they
        // hold a shutdown watcher, and would hold the shutdown for their handshake timeout.
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let mut accept_failures = 0u64;
        let mut last_accept_warning: Option<std::time::Instant> = None;

        loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break, // never closed
                },
            };
            let (tcp, remote) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning, and
                        // say so once every 10 s, not every 50 ms.
                        accept_failures += 1;
                        if last_accept_warning.is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(10)) {
                            tracing::warn!(error = %e, failures = accept_failures, "accept failed (out of file descriptors? see `ulimit -n`)");
                            last_accept_warning = Some(std::time::Instant::now());
                            accept_failures = 0;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Subscribed before the acceptor is taken: a reload between the two is then seen
            // as a change, and the connection handshaken under the old CA is closed.
            let client_trust = reloader.inner.client_trust.subscribe();
            let trust_at_accept = *client_trust.borrow();
            let conn = Connection {
                acceptor: acceptor.read().unwrap_or_else(|e| e.into_inner()).clone(),
                builder: builder.clone(),
                router: router.clone(),
                watcher: graceful.watcher(),
                client_trust,
                trust_at_accept,
                close_grace: Duration::from_secs(limits.request_timeout_seconds),
                handshake_timeout,
                idle_timeout,
                max_body_bytes: limits.max_body_bytes,
                stopping: stopping.clone(),
            };
            tasks.spawn(async move {
                conn.serve(tcp, remote).await;
                drop(permit);
            });
        }

        drop(listener);
        let _ = stopping_tx.send(true);
        let grace = Duration::from_secs(limits.shutdown_grace_seconds);
        tracing::info!(
            connections = graceful.count(),
            grace_seconds = grace.as_secs(),
            "stopped accepting; finishing in-flight requests"
        );
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing the remaining connections");
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if let Some(watch) = keyring_watch {
            watch.abort();
        }
        if let Some(watch) = ring_watch {
            watch.abort();
        }
        foreign_check.abort();
        pruning.abort();
        vault.flush_usage().await;
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the key provider `keys.provider` names: the local keyring (also returned on its own,
/// for reloads and rotation), or a remote provider, reached and checked before anything is
/// served (its constructor ends with a wrap/unwrap self-test).
///
/// # Errors
///
/// [`ServerError::Keyring`] for the local keyring, [`ServerError::Provider`] naming the
/// provider and what failed, [`ServerError::Config`] for a missing section.
pub async fn open_key_provider(
    config: &Config,
) -> Result<(Arc<dyn KeyProvider>, Option<Arc<LocalKeyring>>), ServerError> {
    use crate::config::KeyProviderKind;
    match config.keys.provider {
        KeyProviderKind::Local => {
            let path = config.keyring_path();
            let ring = tokio::task::spawn_blocking(move || LocalKeyring::open(&path))
                .await
                .map_err(|e| ServerError::Runtime(e.to_string()))??;
            let ring = Arc::new(ring);
            Ok((ring.clone(), Some(ring)))
        }
        KeyProviderKind::AwsKms => {
            let p = strongroom_keys::AwsKmsProvider::connect(aws_kms_config(config)?).await?;
            Ok((Arc::new(p), None))
        }
        KeyProviderKind::Pkcs11 => {
            let p = strongroom_keys::Pkcs11Provider::connect(pkcs11_config(config)?).await?;
            Ok((Arc::new(p), None))
        }
        KeyProviderKind::Transit => {
            let p = strongroom_keys::TransitProvider::connect(transit_config(config)?).await?;
            Ok((Arc::new(p), None))
        }
    }
}

/// The key providers a configuration names, opened.
pub struct Keys {
    /// What seals and opens data keys: the local keyring, the KEK hierarchy over a remote
    /// provider, or (`keys.mode = "strict"`) the remote provider itself.
    pub provider: Arc<dyn KeyProvider>,
    /// The local keyring, when it is the provider.
    pub local_keyring: Option<Arc<LocalKeyring>>,
    /// The KEK hierarchy, in `hierarchy` mode with a remote provider.
    pub hierarchy: Option<Arc<KekHierarchy>>,
}

/// Over the key provider `opened` ([`open_key_provider`], called before the store is opened,
/// so that a missing keyring or an unreachable provider leaves no new database behind):
/// for a remote provider in `hierarchy` mode, the KEK hierarchy, whose KEKs are loaded from
/// `store` and unwrapped once here (made on first start).
///
/// # Errors
///
/// A KEK the provider cannot unwrap stops the start with the provider's error naming it.
pub async fn open_keys(
    config: &Config,
    store: Arc<dyn Store>,
    opened: (Arc<dyn KeyProvider>, Option<Arc<LocalKeyring>>),
) -> Result<Keys, ServerError> {
    open_keys_as(config, store, opened, FirstStart::Allowed).await
}

/// Whether opening may make what a server's first start makes (see
/// [`Backends::open_existing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstStart {
    Allowed,
    Refused,
}

async fn open_keys_as(
    config: &Config,
    store: Arc<dyn Store>,
    (provider, local_keyring): (Arc<dyn KeyProvider>, Option<Arc<LocalKeyring>>),
    first_start: FirstStart,
) -> Result<Keys, ServerError> {
    if let Some(ring) = &local_keyring {
        // Before anything is sealed, not at the watcher's first look: a copy left behind
        // seals nothing from the start (see `keyring_record`).
        apply_keyring_record(store.as_ref(), ring).await;
        return Ok(Keys {
            provider,
            local_keyring,
            hierarchy: None,
        });
    }
    if config.keys.mode == crate::config::KeyMode::Strict {
        // New data keys go to the provider itself. Those still under a KEK ring (written in
        // hierarchy mode) keep opening through it until a rewrap moves them to the provider.
        let has_ring = !strongroom_core::hierarchy::list(store.as_ref())
            .await?
            .is_empty();
        if has_ring {
            let ring = KekHierarchy::open(store, provider.clone(), time::OffsetDateTime::now_utc())
                .await?;
            let moving = strongroom_core::rewrap::Moving {
                from: Arc::new(ring),
                to: provider,
            };
            return Ok(Keys {
                provider: Arc::new(moving),
                local_keyring: None,
                hierarchy: None,
            });
        }
        return Ok(Keys {
            provider,
            local_keyring: None,
            hierarchy: None,
        });
    }
    let hierarchy = Arc::new(match first_start {
        FirstStart::Allowed => {
            KekHierarchy::open(store, provider, time::OffsetDateTime::now_utc()).await?
        }
        FirstStart::Refused => KekHierarchy::open_existing(store, provider).await?,
    });
    Ok(Keys {
        provider: hierarchy.clone(),
        local_keyring: None,
        hierarchy: Some(hierarchy),
    })
}

/// Reloads the KEK ring every `every`: a `keys rotate` or `keys retire` on any node takes
/// effect here within that time. A failed reload is logged; the keys loaded before stay.
async fn watch_ring(hierarchy: Arc<KekHierarchy>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match hierarchy.refresh().await {
            Ok(false) => failing = false,
            Ok(true) => {
                failing = false;
                tracing::info!(
                    active = hierarchy.active_kek().ok().map(|k| k.version),
                    "KEK ring changed; reloaded"
                );
            }
            Err(e) if !failing => {
                // Logged once per outage. The keys loaded before still open what they
                // wrapped, but if the active version changed, puts wait (503) for it.
                failing = true;
                tracing::error!(error = %e, "cannot reload the KEK ring: versions the store retired are dropped, and if its active version is new, nothing is sealed until the root provider unwraps it");
            }
            Err(_) => {}
        }
    }
}

/// The credential versions, by KEK, that a server whose key providers are of the kinds
/// `openable` cannot open because another provider sealed them: left behind by a move
/// between providers (`rewrap --to-config`) that missed versions written after it ran. They
/// answer 503 `key_unavailable` until rewrapped.
pub fn foreign_versions(counts: &[(KekRef, u64)], openable: &[String]) -> Vec<(KekRef, u64)> {
    counts
        .iter()
        .filter(|(kek, n)| *n > 0 && !openable.contains(&kek.provider))
        .cloned()
        .collect()
}

/// The credential versions, by KEK, sealed by the local keyring but under a key id or a
/// version the keyring file `key_id` with `held` versions does not have: an older copy of
/// the file restored, or another keyring. They answer 503 `key_unavailable` until the file
/// that has them is back.
pub fn unheld_local_versions(
    counts: &[(KekRef, u64)],
    key_id: &str,
    held: &[u32],
) -> Vec<(KekRef, u64)> {
    counts
        .iter()
        .filter(|(kek, n)| {
            *n > 0
                && kek.provider == strongroom_keys::local::KIND
                && (kek.key_id != key_id || !held.contains(&kek.version))
        })
        .cloned()
        .collect()
}

/// The provider kinds this server opens: its provider's, and in hierarchy mode also the root
/// provider's (versions it sealed directly, before the hierarchy).
fn openable_kinds(provider: &dyn KeyProvider, hierarchy: Option<&KekHierarchy>) -> Vec<String> {
    let mut kinds = vec![provider.kind().to_owned()];
    kinds.extend(hierarchy.map(|h| h.root().kind().to_owned()));
    kinds
}

/// Says at start, once, if the store holds versions this server's key provider cannot open
/// (see [`foreign_versions`]). In the background: counting reads every active version.
async fn warn_about_foreign_versions(
    store: Arc<dyn Store>,
    openable: Vec<String>,
    keyring: Option<Arc<LocalKeyring>>,
) {
    let counts = match store.count_versions_by_kek().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "could not count versions by KEK");
            return;
        }
    };
    if let Some(ring) = keyring {
        let held: Vec<u32> = ring.list().iter().map(|k| k.version).collect();
        for (kek, n) in unheld_local_versions(&counts, ring.key_id(), &held) {
            tracing::warn!(
                kek = format_args!("{}:{}:v{}", kek.provider, kek.key_id, kek.version),
                credential_versions = n,
                keyring = %ring.path().display(),
                "credential versions are sealed under a keyring version this keyring file does \
                 not hold (an older copy restored, or another keyring?): they answer 503 \
                 key_unavailable until the file that holds it is back"
            );
        }
    }
    for (kek, n) in foreign_versions(&counts, &openable) {
        tracing::warn!(
            kek = format_args!("{}:{}:v{}", kek.provider, kek.key_id, kek.version),
            credential_versions = n,
            key_providers = openable.join(",").as_str(),
            "credential versions are sealed by another key provider than this server's: \
             they answer 503 key_unavailable until moved with `strongroom rewrap --config \
             OLD.toml --to-config THIS.toml`"
        );
    }
}

/// Strict mode: asks the provider every `every` whether its KEK versions changed (a
/// `keys rotate` by an operator), so this server seals under the new version within that
/// time instead of at its next restart.
async fn watch_provider(provider: Arc<dyn KeyProvider>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match provider.reload_keks().await {
            Ok(changed) => {
                failing = false;
                if changed {
                    tracing::info!(
                        active = provider.active_kek().ok().map(|k| k.to_string()),
                        "the key provider's active KEK changed"
                    );
                }
            }
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot look up the key provider's KEK versions; keeping the ones known before");
            }
            Err(_) => {}
        }
    }
}

fn missing_key(what: &str) -> ServerError {
    ServerError::Config(format!("key `keys.{what}`: is required"))
}

fn seconds(v: Option<u64>, default: u64) -> Duration {
    Duration::from_secs(v.unwrap_or(default))
}

fn secret_source(
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Option<strongroom_keys::SecretSource> {
    match (file, env) {
        (Some(f), _) => Some(strongroom_keys::SecretSource::File(f.clone())),
        (None, Some(e)) => Some(strongroom_keys::SecretSource::Env(e.clone())),
        (None, None) => None,
    }
}

/// The AWS KMS provider settings of `[keys.aws_kms]`.
///
/// # Errors
///
/// [`ServerError::Config`] when the section is missing.
pub fn aws_kms_config(config: &Config) -> Result<strongroom_keys::AwsKmsConfig, ServerError> {
    let s = config
        .keys
        .aws_kms
        .as_ref()
        .ok_or_else(|| missing_key("aws_kms"))?;
    let mut c = strongroom_keys::AwsKmsConfig::new(s.key_id.clone());
    c.region = s.region.clone();
    c.endpoint_url = s.endpoint_url.clone();
    c.connect_timeout = seconds(s.connect_timeout_seconds, 5);
    c.operation_timeout = seconds(s.operation_timeout_seconds, 10);
    c.max_attempts = s.max_attempts.unwrap_or(3);
    Ok(c)
}

/// The PKCS#11 provider settings of `[keys.pkcs11]`.
///
/// # Errors
///
/// [`ServerError::Config`] when the section or the PIN source is missing.
pub fn pkcs11_config(config: &Config) -> Result<strongroom_keys::Pkcs11Config, ServerError> {
    let s = config
        .keys
        .pkcs11
        .as_ref()
        .ok_or_else(|| missing_key("pkcs11"))?;
    let pin =
        secret_source(&s.pin_file, &s.pin_env).ok_or_else(|| missing_key("pkcs11.pin_file"))?;
    let mut c = strongroom_keys::Pkcs11Config::new(
        s.module.clone(),
        s.token_label.clone(),
        pin,
        s.key_label.clone(),
    );
    if let Some(n) = s.sessions {
        c.sessions = n;
    }
    Ok(c)
}

/// The Transit provider settings of `[keys.transit]`.
///
/// # Errors
///
/// [`ServerError::Config`] when the section or the credentials are missing.
pub fn transit_config(config: &Config) -> Result<strongroom_keys::TransitConfig, ServerError> {
    let s = config
        .keys
        .transit
        .as_ref()
        .ok_or_else(|| missing_key("transit"))?;
    let auth = match (
        &s.approle_role_id,
        secret_source(&s.token_file, &s.token_env),
    ) {
        (None, Some(token)) => strongroom_keys::TransitAuth::Token(token),
        (Some(role), None) => strongroom_keys::TransitAuth::AppRole {
            mount: s.approle_mount.clone().unwrap_or_else(|| "approle".into()),
            role_id: role.clone(),
            secret_id: secret_source(&s.approle_secret_id_file, &s.approle_secret_id_env)
                .ok_or_else(|| missing_key("transit.approle_secret_id_file"))?,
        },
        _ => return Err(missing_key("transit.token_file")),
    };
    let mut c = strongroom_keys::TransitConfig::new(s.address.clone(), s.key.clone(), auth);
    if let Some(m) = &s.mount {
        c.mount = m.clone();
    }
    c.ca_file = s.ca_file.clone();
    c.namespace = s.namespace.clone();
    c.connect_timeout = seconds(s.connect_timeout_seconds, 5);
    c.request_timeout = seconds(s.request_timeout_seconds, 10);
    c.danger_allow_plain_http = s.danger_allow_plain_http;
    c.allow_128_bit_key = s.allow_128_bit_key;
    Ok(c)
}

/// How often a running server looks at its keyring file for a rotation.
const KEYRING_POLL: Duration = Duration::from_secs(1);

/// How often the per-owner rate limiters forget owners whose allowance has refilled.
const RATE_LIMIT_PRUNE: Duration = Duration::from_secs(60);

/// Prunes `state`'s rate limiters every `every`, on the blocking pool: a pass walks every
/// tracked owner, which should not hold a request thread.
async fn prune_rate_limits(state: AppState, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let state = state.clone();
        let _ = tokio::task::spawn_blocking(move || state.prune_rate_limits()).await;
    }
}

/// What identifies one version of the keyring file: an atomic rewrite (as `keys rotate` and
/// `keys retire` do) changes the inode, and any edit the length or modification time.
/// What says a file changed: inode, length, modification time, mode, change time.
type FileStamp = (u64, u64, std::time::SystemTime, u32, (i64, i64));

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    // The mode too: a file restored with `cp` (refused: others may read it) and then
    // `chmod 600` has changed although its bytes have not. And the inode's change time,
    // which no one can set back: a same-size edit in place with its mtime restored.
    Some((
        meta.ino(),
        meta.len(),
        meta.modified().ok()?,
        meta.mode(),
        (meta.ctime(), meta.ctime_nsec()),
    ))
}

/// Files a server keeps open besides its connections: store and log files, the database
/// pools, a keyring read, the broker's and JWKS fetches' outbound connections.
const FILES_BESIDES_CONNECTIONS: u64 = 128;

/// Raises the open-file soft limit to the hard one (as Go and nginx servers do), and warns
/// when `limits.max_connections` still does not fit under it: the usual soft limit of 1024
/// was below the default of 1024 connections plus the server's own files, so a burst of
/// idle connections took the descriptors a keyring reload or a database file needed.
fn raise_open_file_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit is not one the kernel takes for open files.
    let ceiling = limit.maximum.unwrap_or(1 << 20);
    if limit.current.is_some_and(|soft| soft < ceiling) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(ceiling),
                maximum: limit.maximum,
            },
        );
    }
    let Some(files) = getrlimit(Resource::Nofile).current else {
        return;
    };
    let wanted = max_connections as u64 + FILES_BESIDES_CONNECTIONS;
    if files < wanted {
        tracing::warn!(
            open_files = files,
            max_connections,
            "limits.max_connections plus the server's own files ({wanted}) exceed the open-file \
             limit: when connections take them all, new ones wait and a keyring reload or a \
             database file can fail; raise the limit (`ulimit -n`, systemd LimitNOFILE=) or \
             lower limits.max_connections"
        );
    }
}

/// Runs the watcher `start` makes, and a new one after a panic: a server whose keyring
/// watcher died went on sealing under the key it had, and after `keys rotate`, `rewrap` and
/// `keys retire` of that key its acknowledged writes were lost at the next start. Each
/// watcher begins with a reload. Aborting this task stops the watcher.
async fn keep_watching<F, W>(what: &'static str, every: Duration, start: F)
where
    F: Fn() -> W,
    W: Future<Output = ()> + Send + 'static,
{
    loop {
        // Aborting this task drops the handle, which aborts the watcher.
        match tokio_util::task::AbortOnDropHandle::new(tokio::spawn(start())).await {
            Err(e) if e.is_panic() => {
                tracing::error!(
                    watcher = what,
                    "a key watcher stopped (a panic); starting it again"
                );
                tokio::time::sleep(every).await;
            }
            _ => return,
        }
    }
}

/// Reloads `keyring` at once, then whenever its file changes or goes (checked every `every`):
/// the first reload catches a rotation made between the start's load and the watcher's
/// start. A file that fails to load is logged once per change, and the keys loaded before
/// stay in force for what they sealed, as for SIGHUP; nothing new is sealed until the file
/// holds them again. A failure is tried again at every check, since some pass without the
/// file changing (too many open files: a burst of connections at the moment of a rotation
/// used to stop every write until SIGHUP).
///
/// At every check it also reads the newest version a rotation recorded in the store
/// ([`strongroom_core::keyring_record`]): a file that lacks it is a copy left behind (this
/// host's, when the rotation ran on another), and the keyring seals nothing new until the
/// file holds it.
async fn watch_keyring(
    keyring: Arc<LocalKeyring>,
    path: PathBuf,
    store: Arc<dyn strongroom_store::Store>,
    every: Duration,
) {
    // The stamp of the file last loaded (`None`: none yet), and of the last one whose
    // failure was logged.
    let mut loaded: Option<Option<FileStamp>> = None;
    let mut reported: Option<Option<FileStamp>> = None;
    let mut missing: Option<strongroom_keys::local::LeftBehind> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        apply_keyring_record(store.as_ref(), &keyring).await;
        let (ring, p, before) = (keyring.clone(), path.clone(), loaded);
        let checked = tokio::task::spawn_blocking(move || {
            // A file gone (`None`) is a change too: the keyring stops sealing until it is back.
            let now = file_stamp(&p);
            if before == Some(now) {
                return (now, None);
            }
            (now, Some(ring.reload()))
        })
        .await;
        let Ok((stamp, reloaded)) = checked else {
            continue;
        };
        match reloaded {
            None => {}
            Some(Ok(())) => {
                if loaded.is_some() || reported.is_some() {
                    tracing::info!(
                        versions = keyring.list().len(),
                        active = keyring.active_kek().ok().map(|k| k.version),
                        "keyring file changed; reloaded"
                    );
                }
                loaded = Some(stamp);
                reported = None;
            }
            Some(Err(e)) if reported != Some(stamp) => {
                reported = Some(stamp);
                tracing::error!(error = %e, "keyring file changed but does not load; keeping the keys loaded before");
            }
            // Logged already for this state of the file.
            Some(Err(_)) => {}
        }
        let now_missing = keyring.left_behind();
        if now_missing != missing {
            match now_missing {
                Some(behind @ strongroom_keys::local::LeftBehind::RecordUnreadable) => {
                    tracing::error!(
                        path = %path.display(),
                        "the keyring file {behind}: sealing nothing new until it reads"
                    )
                }
                Some(behind) => tracing::error!(
                    path = %path.display(),
                    "the keyring file {behind}: sealing nothing new until it holds the \
                     newest keyring file; copy it here"
                ),
                None => tracing::info!(
                    path = %path.display(),
                    "the keyring file holds the newest version again; sealing"
                ),
            }
            missing = now_missing;
        }
    }
}

/// Said at start and at every reload that keeps it: user tokens of any issuer or audience.
fn warn_if_any_token_issuer_or_audience(j: &crate::config::JwtConfig) {
    if j.accept_any_issuer || j.accept_any_audience {
        tracing::warn!(
            accept_any_issuer = j.accept_any_issuer,
            accept_any_audience = j.accept_any_audience,
            "[auth.jwt] accepts user tokens of any issuer or audience: tokens the same keys \
             signed for other applications are accepted as users"
        );
    }
}

/// Holds `keyring` to the newest version the store's record of rotations names (see
/// `keyring_record`); a record that does not read makes it seal nothing. A store that does
/// not answer changes nothing: the next look tries again, and the store's own failures are
/// reported where they happen.
pub(crate) async fn apply_keyring_record(store: &dyn Store, keyring: &LocalKeyring) {
    match strongroom_core::keyring_record::newest_recorded(store, keyring.key_id()).await {
        Ok(Some(r)) => keyring.require_version(r.version, r.fingerprint),
        Ok(None) => keyring.record_absent(),
        Err(StoreError::Corrupt { .. }) => keyring.record_unreadable(),
        Err(_) => {}
    }
}

fn http_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No `header_read_timeout`: `idle::Activity` bounds each head from its first byte
    // (hyper's timer started while the connection idled between requests).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        // A client that closes (or half-closes) right after its request still has it carried
        // out and recorded: by default hyper dropped a request whose connection reached end
        // of file before its handler first ran, leaving no audit record of it.
        .half_close(true)
        // Bounds the request line plus headers at 16 KiB over `limits.max_header_bytes`:
        // the router answers heads over the limit itself, 431 with a JSON error saying which
        // limit (hyper's own 431 has no body); past this backstop hyper answers alone.
        // (`validate` keeps the limit >= 8192, hyper's floor.)
        .max_buf_size(head_backstop(limits));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_backstop(limits)).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// How large a request head the HTTP layer reads before refusing it on its own: the router
/// refuses those over `limits.max_header_bytes`, with a JSON error. A fixed margin, not a
/// multiple: every open connection (and each of an HTTP/2 connection's streams) may hold
/// this much. 16 KiB covers what an HTTP/2 header list counts beyond HTTP/1.1's lines
/// (32 bytes more per field, for up to 100 fields the router takes) and a head a little
/// over the limit, a large token, say, which gets the JSON answer.
fn head_backstop(limits: &LimitsConfig) -> usize {
    limits.max_header_bytes.saturating_add(16 * 1024)
}

struct Connection {
    acceptor: TlsAcceptor,
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: axum::Router,
    watcher: Watcher,
    /// Changes when a reload changes the client CA (see `ReloaderInner::client_trust`).
    client_trust: tokio::sync::watch::Receiver<[u8; 32]>,
    /// The client CA digest when the connection was accepted (its handshake ran under it).
    trust_at_accept: [u8; 32],
    /// How long a connection asked to close may finish its requests in flight (an HTTP/2
    /// client that never acknowledges the closing GOAWAY's PING would keep it open).
    close_grace: Duration,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    max_body_bytes: usize,
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// How long an HTTP/2 answer waits for the rest of a body its handler did not read.
const UNREAD_BODY_WAIT: Duration = Duration::from_secs(1);

impl Connection {
    async fn serve(mut self, tcp: TcpStream, remote: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let handshake = tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp));
        let stopping = self.stopping.wait_for(|stop| *stop);
        let handshake = tokio::select! {
            done = handshake => done,
            _ = stopping => return,
        };
        let stream = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                // A client certificate refused is an operator's business (a wrong or
                // revoked CA, an expired certificate); other failures are mostly scanners.
                let refused_certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| {
                        matches!(
                            r,
                            rustls::Error::InvalidCertificate(_)
                                | rustls::Error::NoCertificatesPresented
                        )
                    });
                if refused_certificate {
                    tracing::warn!(%remote, error = %e, "client certificate refused");
                } else {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                }
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "TLS handshake timed out");
                return;
            }
        };
        // Only a certificate the verifier accepted gets this far.
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| PeerCertificate {
                subject_alt_names: tls::subject_alt_names(leaf),
            });
        let peer_presented = peer.is_some();
        // Once the client CA that accepted this certificate is replaced, requests carry no
        // certificate identity (HTTP/2 streams opened while the connection closes included).
        // Checked at each request, not when this task next runs: a request read right after
        // the reload returned must not slip in first.
        let trust_now = self.client_trust.clone();
        let trust_at_accept = self.trust_at_accept;
        let router = self.router;
        let activity = Activity::new();
        let requests = activity.clone();
        // Over TLS a client speaks HTTP/2 only after choosing it by ALPN.
        let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        // Enough for a body a few times over the limit to still get its 413 whole.
        let drain_bytes = self.max_body_bytes.saturating_mul(4);
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            if let Some(peer) = &peer {
                if *trust_now.borrow() == trust_at_accept {
                    req.extensions_mut().insert(peer.clone());
                }
            }
            req.extensions_mut().insert(ConnectInfo(remote));
            req.extensions_mut()
                .insert(strongroom_api::ClientAddr(remote));
            let in_flight = requests.begin();
            let (req, leftover) = if unread_body::worth_draining(&req, http2) {
                let (parts, body) = req.into_parts();
                let (body, leftover) = SharedBody::new(body);
                (
                    http::Request::from_parts(parts, axum::body::Body::new(body)),
                    Some(leftover),
                )
            } else {
                (req.map(axum::body::Body::new), None)
            };
            let response = router.clone().oneshot(req);
            async move {
                let response = response.await;
                if let Some(leftover) = leftover {
                    leftover.drain(drain_bytes, UNREAD_BODY_WAIT).await;
                }
                drop(in_flight);
                response
            }
        });
        let stream = Watched::new(stream, (!http2).then(|| activity.clone()));
        let conn = self
            .builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let mut conn = std::pin::pin!(conn);
        // Held until the connection ends, so the server's shutdown waits for it; the shutdown
        // itself comes through `stopping`, sent first.
        let _watching = self.watcher;
        let expired = activity.expired(
            self.handshake_timeout,
            self.handshake_timeout,
            self.idle_timeout,
        );
        let mut expired = std::pin::pin!(expired);
        let mut closing = false;
        // A change since the connection was accepted (during its handshake, under the old
        // CA) counts too: not marked seen here.
        let mut client_trust = self.client_trust;
        let closed_by = tokio::time::sleep(Duration::MAX / 4);
        let mut closed_by = std::pin::pin!(closed_by);
        loop {
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(%remote, error = %e, "connection ended with an error");
                    }
                    break;
                }
                // Dropping the connection closes it.
                () = expired.as_mut() => {
                    tracing::debug!(%remote, "connection closed: no request within its time");
                    break;
                }
                _ = self.stopping.wait_for(|stop| *stop), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                // Its certificate was accepted under a client CA no longer in force.
                changed = client_trust.changed(), if !closing && peer_presented => {
                    if changed.is_ok() {
                        tracing::debug!(%remote, "client CA changed: closing a connection that presented a certificate");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                        closed_by
                            .as_mut()
                            .reset(tokio::time::Instant::now() + self.close_grace);
                    }
                }
                () = closed_by.as_mut(), if closing => {
                    tracing::debug!(%remote, "connection closed: its requests outlasted the grace to close");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A key watcher that panics is started again, and aborting the task that keeps it
    /// stops the watcher too (shutdown).
    #[tokio::test]
    async fn a_key_watcher_that_panics_is_started_again() {
        let starts = Arc::new(AtomicU32::new(0));
        let ticks = Arc::new(AtomicU32::new(0));
        let (s, t) = (starts.clone(), ticks.clone());
        let keeper = tokio::spawn(keep_watching(
            "test",
            Duration::from_millis(10),
            move || {
                let first = s.fetch_add(1, Ordering::SeqCst) == 0;
                let t = t.clone();
                async move {
                    assert!(!first, "the first watcher dies");
                    loop {
                        t.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            },
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ticks.load(Ordering::SeqCst) < 3 {
            assert!(std::time::Instant::now() < deadline, "no second watcher");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        keeper.abort();
        assert!(keeper.await.unwrap_err().is_cancelled());
        let stopped_at = ticks.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            ticks.load(Ordering::SeqCst),
            stopped_at,
            "the watcher outlived its keeper"
        );
    }
}
