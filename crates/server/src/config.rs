//! The server's configuration: a TOML file, overridden by `STRONGROOM_*` environment
//! variables, checked as a whole before anything starts.
//!
//! # Keys
//!
//! Every key, its default and its meaning (`strongroom.example.toml` at the repository root is
//! a commented example):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `listen` | `127.0.0.1:8443` | address and port to serve HTTPS on |
//! | `data_dir` | `strongroom-data` | folder for the SQLite database and the default keyring |
//! | `store.kind` | `"sqlite"` | `"sqlite"` (`DATA_DIR/strongroom.db`) or `"postgres"` |
//! | `store.url` | — | PostgreSQL connection string (`kind = "postgres"` only). Each session's `statement_timeout` is `limits.request_timeout_seconds` less 1 s, and an operation that has no answer 5 s after it gives up on its connection (closed, not reused; one given up on by its request is pooled again once it answers, or closed after 2 s); TCP keepalives (30 s idle, then every 10 s, 3 tries) and a 30 s `tcp_user_timeout` notice a server host that stopped answering. The string's own `keepalives_*`/`tcp_user_timeout` win. At the server, each session sets `idle_in_transaction_session_timeout = 5s` (a transaction whose client vanished mid-way releases its locks) and the same keepalives and user timeout |
//! | `store.max_connections` | 16 | PostgreSQL pool size |
//! | `store.schema` | — | PostgreSQL schema for the tables (created if absent) |
//! | `store.tls_ca_file` | — | PostgreSQL: CA certificates (PEM) the server's certificate must chain to, instead of the platform's trust store. A server that is not on this host is reached over verified TLS only (`sslmode=disable` is refused for it); on this host `sslmode=require` in `store.url` asks for TLS too. `require`, `verify-ca` and `verify-full` all verify the certificate chain and the host name |
//! | `store.sync` | `"full"` | SQLite only. `"full"`: every commit (each put, each audit record a reveal waits for) is fsynced before it is acknowledged, so it survives power loss. `"normal"`: **relaxed**, commits are only written to the WAL (fsynced at checkpoints): survives a crash of the process (kill -9), but the last acknowledged writes and audit records **can be lost on power loss or an OS crash** |
//! | `store.max_versions` | 10 | active versions kept per credential; a put beyond it destroys (crypto-shreds) the oldest version that is not current, recorded by that put's audit record. 1 to 1000 |
//! | `store.keep_destroyed_versions` | 100 | how far behind a credential's newest version a destroyed version stays listed (a tombstone: number, dates, metadata, no value). A put deletes the rows of destroyed versions more than this many numbers behind it (the oldest first, at most 256 a put, so a backlog after an upgrade or a lowered setting goes over the next puts), so a credential's tombstones stay bounded; reads of a removed version answer 404, and numbers are never reused (the audit log, or its archives, keeps every put and destroy). `0` removes them at the next put. 0 to 100000 |
//! | `store.max_credentials_per_owner` | 1000 | live (not destroyed) credentials one owner may have, whoever writes them (the user, a service, an import); a put that would create one more is refused with 409 `quota_exceeded` and writes nothing. New versions of existing credentials are not limited, and destroying a credential frees its slot. Checked atomically with the insert on both stores (on PostgreSQL, creators of one owner take turns on an advisory lock). 1 to 100000 (each create counts up to this many index entries); lowering it below what owners hold keeps their credentials, and refuses their new ones until they are under it |
//! | `store.reveal_cache_mb` | 32 | SQLite only. MiB of sealed current versions kept in memory so a reveal needs no database read; it holds what the file holds (never a plaintext), every write of this server drops what it changed before it is acknowledged, and a write by another process (an operator command) is caught before a value leaves. `0` turns it off |
//! | `keys.provider` | `"local"` | key provider: `"local"` (keyring file), `"aws-kms"`, `"pkcs11"` or `"transit"` |
//! | `keys.mode` | `"hierarchy"` | remote providers: `"hierarchy"` (the provider wraps Strongroom's KEKs, unwrapped once at start) or `"strict"` (the provider wraps every data key: one provider call per put and reveal) |
//! | `keys.keyring` | `DATA_DIR/keyring.json` | the local keyring file (mode 0600) |
//! | `keys.aws_kms.key_id` | — | KMS key ARN, id or alias (`provider = "aws-kms"`); credentials from the AWS default chain |
//! | `keys.aws_kms.region`, `.endpoint_url` | AWS default chain / region endpoint | region; another endpoint (VPC, emulator) |
//! | `keys.aws_kms.connect_timeout_seconds`, `.operation_timeout_seconds`, `.max_attempts` | 5, 10, 3 | KMS client limits (below `limits.request_timeout_seconds`, so that a slow KMS is reported as such) |
//! | `keys.pkcs11.module`, `.token_label`, `.key_label` | — | PKCS#11 module path, token label, KEK label prefix (`LABEL.vN`) |
//! | `keys.pkcs11.pin_file` / `.pin_env` | — | where the user PIN comes from (exactly one) |
//! | `keys.pkcs11.sessions` | 4 | sessions kept open |
//! | `keys.transit.address`, `.key`, `.mount` | —, —, `transit` | Vault/OpenBao address, transit key, engine mount |
//! | `keys.transit.token_file` / `.token_env` | — | token source; or `approle_role_id` with `approle_secret_id_file` / `_env` (`approle_mount`, default `approle`) |
//! | `keys.transit.ca_file`, `.namespace` | —, — | CA to trust; namespace |
//! | `keys.transit.connect_timeout_seconds`, `.request_timeout_seconds` | 5, 10 | client limits (below `limits.request_timeout_seconds`, so that a slow server is reported as such) |
//! | `keys.transit.danger_allow_plain_http` | false | allow `http://` to loopback (development only) |
//! | `keys.transit.allow_128_bit_key` | false | open an `aes128-gcm96` key (refused otherwise: a 128-bit KEK over 256-bit data keys), to move off it with `rewrap --to-config` |
//! | `tls.cert` | **required** | PEM certificate chain, leaf first |
//! | `tls.key` | **required** | PEM private key (PKCS#8, PKCS#1 or SEC1) |
//! | `tls.client_ca` | — | PEM CA certificate(s) for client certificates: turns on mutual TLS |
//! | `tls.client_auth` | `"optional"` | with `client_ca`: `"optional"` or `"required"` |
//! | `auth.jwt.issuer` | **required** | the `iss` user tokens must carry |
//! | `auth.jwt.accept_any_issuer` | false | instead of `issuer`: accept any `iss` (keys that sign for this issuer alone) |
//! | `auth.jwt.audience` | **required** | the `aud` user tokens must carry |
//! | `auth.jwt.accept_any_audience` | false | instead of `audience`: accept any `aud` (keys that sign for Strongroom alone) |
//! | `auth.jwt.on_behalf_of_audience` | — | the `aud` a user token presented by a delegated service (`X-Strongroom-On-Behalf-Of`) must carry instead; tokens carrying it are refused on the user's own routes, so the service reaches only what its policy rule allows. Unset, delegated services present the user's own tokens (a warning when the policy has delegated rules) |
//! | `auth.jwt.leeway_seconds` | 30 | clock leeway for `exp`, `nbf` and `iat` (a token issued further in the future is refused) |
//! | `auth.jwt.hs256_secret_file` | — | HS256 secret (the file's bytes, trailing whitespace removed; 32+ bytes) |
//! | `auth.jwt.public_key_file` | — | PEM public key; needs `auth.jwt.algorithm` |
//! | `auth.jwt.algorithm` | — | `"RS256"`, `"ES256"` or `"EdDSA"` (with `public_key_file`) |
//! | `auth.jwt.jwks_file` | — | a JWKS document (JSON) |
//! | `auth.jwt.jwks_url` | — | an `https://` URL of the identity provider's JWKS: fetched at start (the server does not start without it), cached, refreshed in the background and when a token names an unknown `kid`; through the proxy `HTTPS_PROXY`/`ALL_PROXY` name unless `NO_PROXY` lists the host (TLS end to end) |
//! | `auth.jwt.jwks_ca_file` | system roots | PEM CA certificate(s) to trust, alone, for `jwks_url` |
//! | `auth.jwt.jwks_refresh_seconds` | 300 | background refresh interval (60 to 86400); after a failure, retried every 30 s |
//! | `auth.jwt.jwks_unknown_kid_cooldown_seconds` | 30 | least time between refreshes caused by unknown `kid`s (1 to 3600) |
//! | `auth.jwt.jwks_max_stale_seconds` | 86400 | how long the last good keys are used while refreshes fail (at least `jwks_refresh_seconds`, at most 30 days); then user tokens get 401 and `/readyz` 503 until a refresh succeeds |
//! | `auth.jwt.jwks_timeout_seconds` | 10 | one fetch, connecting included (1 to 60); documents over 512 KiB are refused |
//! | `[[auth.service]]` `name`, `token_sha256` | — | a service bearer token, by its SHA-256 (hex) |
//! | `[[auth.admin]]` `name`, `token_sha256` | — | an admin bearer token, by its SHA-256 (hex) |
//! | `[[auth.mtls]]` `san`, `service` or `admin` | — | a client-certificate SAN and who it is: a DNS name (matches DNS-name SANs only, whatever their case or trailing dot) or a URI with its scheme (URI SANs only); a certificate naming two identities, or one plus a bearer token, is refused |
//! | `policy_file` | — (deny all) | service policy (TOML, see `policy.example.toml`); reloaded on SIGHUP |
//! | `limits.max_connections` | 1024 | concurrent connections; more wait in the listen backlog |
//! | `limits.request_timeout_seconds` | 30 | longest time a request may take |
//! | `limits.max_header_bytes` | 16384 | request line plus headers, counted as HTTP/1.1 sends them, for HTTP/2 too (8192 to 1048576); over it: 431 `headers_too_large`. Heads more than 16 KiB over it are refused by the HTTP layer with no JSON body, as are HTTP/1.1 heads with over 100 header fields (HTTP/2 ones get the JSON 431) |
//! | `limits.max_body_bytes` | 524288 | request body |
//! | `limits.verify_per_minute` | 30 | `verify` calls per owner per minute, counted in the store: every node shares the allowance, and a restart does not refill it (keep the nodes' clocks synchronised) |
//! | `limits.puts_per_owner_per_minute` | 600 | puts to one owner's credentials per minute, by the user and services together; more get 429 `rate_limited` with `Retry-After` and write nothing. Bounds how fast one owner's version rows grow (a refused put is still recorded in the audit log, as every authenticated request is). Disables, enables, current-version changes and destroys are not limited, so that a service that spends the allowance cannot keep the owner from the kill switch. Counted by each server process (N nodes allow N times this; a restart resets the count); reveals are not limited (policy governs them) |
//! | `limits.handshake_timeout_seconds` | 10 | TLS handshake; then the start of the first request; then each HTTP/1 head, from its first byte |
//! | `limits.idle_timeout_seconds` | 60 | a connection with no request in flight for this long is closed (HTTP/1.1 keep-alive and HTTP/2 alike) |
//! | `limits.shutdown_grace_seconds` | 30 | how long in-flight requests may finish after SIGTERM (new connections are refused at once; an HTTP/1.1 request that reaches an idle keep-alive connection as it closes gets no answer and was not carried out: clients retry it, as after any closed keep-alive connection, or drain the node from the load balancer before SIGTERM) |
//! | `broker.allow_private_networks` | false | let brokered calls reach private, loopback, link-local and unique-local addresses (tests, internal APIs) |
//! | `broker.ca_file` | — | PEM CA certificates trusted for brokered calls besides the system roots |
//! | `broker.connect_timeout_seconds` | 5 | DNS, then TCP connect and TLS handshake of a brokered call (each within `broker.timeout_seconds`) |
//! | `broker.timeout_seconds` | 20 (at most `limits.request_timeout_seconds` − 1) | a whole brokered call, DNS included; must be below `limits.request_timeout_seconds` |
//! | `broker.max_response_bytes` | 1048576 | largest upstream response body (502 beyond) |
//! | `broker.max_request_body_bytes` | 262144 | largest body a service may have forwarded (413 beyond) |
//! | `broker.max_concurrent_calls` | 64 | brokered calls in flight at once, all services together (1 to 256); one more gets 503 `broker_busy` with `Retry-After: 1`. Each holds up to `max_response_bytes` of answer and copies of it while it is searched and sent on, and keeps its place until its answer has gone out; its name lookup (the system resolver cannot be cancelled) and the search of its answer keep it too, should they outlast the request. At most 256: each may hold a thread of the blocking pool (512) |
//! | `broker.max_concurrent_calls_per_service` | 16 (or `max_concurrent_calls`, if lower) | brokered calls in flight at once for one service (1 to `max_concurrent_calls`); one more gets 429 `broker_busy` with `Retry-After: 1`, so that one service cannot take every place |
//! | `broker.pass_response_headers` | `[]` | upstream response headers handed back besides the default ones, each by its name (`["x-github-request-id", "stripe-version"]`; no patterns); hop-by-hop headers and names that speak of a length, hash, checksum, digest, signature or time are refused |
//! | `audit.jsonl` | — | also append each committed audit record as a JSON line to this file (mode 0600), or `"-"` for stdout |
//! | `log.format` | `"json"` | `"json"` or `"text"` (logs go to stderr) |
//! | `log.level` | `"info"` | a level or `tracing` filter directives (`info,strongroom_api=debug`); a bare `debug` or `trace` applies to Strongroom's own crates only, dependencies stay at `info` unless named (their debug output can hold request bodies, e.g. KMS data keys) |
//!
//! Exactly one of `hs256_secret_file`, `public_key_file`, `jwks_file` or `jwks_url` is set
//! in `[auth.jwt]`. JWKS keys are used by key type (RSA: RS256, EC P-256: ES256, Ed25519:
//! EdDSA); keys with another `use`, a non-fitting `alg` or a symmetric type are skipped.
//! Relative paths are relative to the server's working directory.
//!
//! SIGHUP re-reads the configuration's `[auth]` and `[broker]` sections (with the files they
//! name) and swaps each in as a whole, or keeps the previous ones if anything in the new
//! configuration is invalid; it reads the policy from the `policy_file` named now. Other
//! sections need a restart, and a reload warns about those that changed.
//!
//! # Environment
//!
//! `STRONGROOM_<KEY>` overrides a key, with `__` between nesting levels:
//! `STRONGROOM_LISTEN=0.0.0.0:8443`, `STRONGROOM_LIMITS__MAX_CONNECTIONS=4096`,
//! `STRONGROOM_STORE__URL=postgresql://…`, `STRONGROOM_AUTH__JWT__ISSUER=https://idp`. Lists
//! take inline TOML: `STRONGROOM_AUTH__SERVICE='[{name="billing",token_sha256="…"}]'`, and
//! such a list replaces the file's list as a whole (entries are not merged). Only
//! variables whose first segment is a key above are read (`STRONGROOM_KEYRING` and
//! `STRONGROOM_CONFIG` belong to the command line); an unknown key below one of them is an
//! error, as in the file.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::Deserialize;
use strongroom_core::broker::PassedHeader;

use crate::error::ServerError;

/// Top-level keys read from `STRONGROOM_*` variables.
const ENV_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "store",
    "keys",
    "tls",
    "auth",
    "policy_file",
    "limits",
    "log",
    "audit",
    "broker",
];

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// The default data directory (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "strongroom-data";

/// The whole configuration. See the [module docs](self) for every key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Address to serve HTTPS on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Folder for the SQLite database and the default keyring.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where credentials are stored.
    #[serde(default)]
    pub store: StoreConfig,
    /// The key provider.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Certificate and key; required.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Who can authenticate, and how.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The service policy file; none means services may do nothing.
    #[serde(default)]
    pub policy_file: Option<PathBuf>,
    /// Resource limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Brokered calls.
    #[serde(default)]
    pub broker: BrokerConfig,
}

/// `[broker]`: the outbound calls of `POST .../broker`. Where a call may go is decided by
/// the policy's `destinations` and each version's bound host (`metadata.host`); these keys
/// set how calls are made.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// Let calls reach private, loopback, link-local, shared and unique-local addresses.
    pub allow_private_networks: bool,
    /// PEM CA certificates trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// DNS, TCP connect and TLS handshake, in seconds.
    pub connect_timeout_seconds: u64,
    /// A whole call, DNS included, in seconds (default: 20, or less to stay below the request
    /// timeout).
    pub timeout_seconds: Option<u64>,
    /// Largest upstream response body, in bytes.
    pub max_response_bytes: usize,
    /// Largest body a service may have forwarded, in bytes.
    pub max_request_body_bytes: usize,
    /// Upstream response headers handed back besides the default ones, each by its name.
    pub pass_response_headers: Vec<String>,
    /// Brokered calls in flight at once, all services together (a call keeps its place while
    /// its name lookup, the search of its answer or the sending of it goes on).
    pub max_concurrent_calls: usize,
    /// Brokered calls in flight at once for one service (default: 16, or
    /// `max_concurrent_calls` if that is lower).
    pub max_concurrent_calls_per_service: Option<usize>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            allow_private_networks: false,
            ca_file: None,
            connect_timeout_seconds: 5,
            timeout_seconds: None,
            max_response_bytes: 1024 * 1024,
            max_request_body_bytes: 256 * 1024,
            pass_response_headers: Vec::new(),
            max_concurrent_calls: 64,
            max_concurrent_calls_per_service: None,
        }
    }
}

impl BrokerConfig {
    /// The broker's settings under `limits` (the call must end before the request does).
    pub fn settings(&self, limits: &LimitsConfig) -> strongroom_core::broker::BrokerSettings {
        let timeout = self.timeout_seconds.unwrap_or_else(|| {
            20.min(limits.request_timeout_seconds.saturating_sub(1))
                .max(1)
        });
        strongroom_core::broker::BrokerSettings {
            allow_private_networks: self.allow_private_networks,
            ca_file: self.ca_file.clone(),
            connect_timeout: Duration::from_secs(self.connect_timeout_seconds),
            timeout: Duration::from_secs(timeout),
            max_response_bytes: self.max_response_bytes,
            max_request_body_bytes: self.max_request_body_bytes,
            // Checked by `validate`; an entry refused there never reaches here.
            pass_response_headers: self
                .pass_response_headers
                .iter()
                .filter_map(|e| PassedHeader::parse(e).ok())
                .collect(),
            max_concurrent_calls: self.max_concurrent_calls,
            max_concurrent_calls_per_service: self
                .max_concurrent_calls_per_service
                .unwrap_or(16.min(self.max_concurrent_calls)),
        }
    }
}

/// `[audit]`. Records always go to the store; this adds a copy as JSON lines.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AuditConfig {
    /// Also write each record, once committed, as one JSON line to this file (appended,
    /// created with mode 0600) or to stdout (`"-"`).
    #[serde(default)]
    pub jsonl: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

/// `[store]`.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StoreConfig {
    /// Which backend.
    #[serde(default)]
    pub kind: StoreKind,
    /// PostgreSQL connection string (may hold a password: never logged).
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL pool size.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// PostgreSQL schema.
    #[serde(default)]
    pub schema: Option<String>,
    /// PostgreSQL: the CA certificates (PEM) the server's TLS certificate must chain to
    /// (default: the platform's trust store).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// SQLite durability of a commit (see [`StoreSync`]).
    #[serde(default)]
    pub sync: StoreSync,
    /// SQLite: MiB of sealed current versions kept in memory for reveals (default 32; 0 turns
    /// the cache off). It holds what the database holds, never a plaintext.
    #[serde(default)]
    pub reveal_cache_mb: Option<u32>,
    /// Active versions kept per credential (default 10): a put beyond it destroys
    /// (crypto-shreds) the oldest version that is not current.
    #[serde(default)]
    pub max_versions: Option<u32>,
    /// How far behind a credential's newest version a destroyed version stays listed as a
    /// tombstone (default 100); a put deletes the older ones.
    #[serde(default)]
    pub keep_destroyed_versions: Option<u32>,
    /// Live credentials one owner may have (default 1000): a put that would create one more
    /// is refused with 409 `quota_exceeded`.
    #[serde(default)]
    pub max_credentials_per_owner: Option<u32>,
}

/// The largest `store.keep_destroyed_versions`: a bound on a credential's tombstones is the
/// point of the setting.
pub const MAX_KEEP_DESTROYED_VERSIONS: u32 = 100_000;

/// The largest `store.max_credentials_per_owner`: each create counts the owner's live
/// credentials up to the quota, so the quota bounds that count too.
pub const MAX_CREDENTIALS_PER_OWNER_LIMIT: u32 = 100_000;

impl StoreConfig {
    /// `store.max_versions`, or its default.
    pub fn max_versions(&self) -> u32 {
        self.max_versions
            .unwrap_or(strongroom_store::DEFAULT_MAX_VERSIONS)
    }

    /// `store.max_credentials_per_owner`, or its default.
    pub fn max_credentials_per_owner(&self) -> u32 {
        self.max_credentials_per_owner
            .unwrap_or(strongroom_store::DEFAULT_MAX_CREDENTIALS_PER_OWNER)
    }

    /// The [`VaultConfig`](strongroom_core::VaultConfig) these settings ask for (retention,
    /// tombstones, quota): the server's and every operator command's that writes.
    pub fn vault_config(&self) -> strongroom_core::VaultConfig {
        strongroom_core::VaultConfig {
            max_versions: self.max_versions(),
            keep_destroyed: self
                .keep_destroyed_versions
                .unwrap_or(strongroom_store::DEFAULT_KEEP_DESTROYED),
            max_credentials_per_owner: Some(self.max_credentials_per_owner()),
        }
    }
}

/// `store.sync`: how durable an acknowledged SQLite commit is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreSync {
    /// `synchronous = FULL` (WAL): fsync at every commit; survives power loss.
    #[default]
    Full,
    /// `synchronous = NORMAL` (WAL): no fsync at commit. Survives a process crash, **not**
    /// power loss or an OS crash (the last acknowledged commits can be lost).
    Normal,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("kind", &self.kind)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("max_connections", &self.max_connections)
            .field("schema", &self.schema)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("sync", &self.sync)
            .field("reveal_cache_mb", &self.reveal_cache_mb)
            .field("max_versions", &self.max_versions)
            .field("keep_destroyed_versions", &self.keep_destroyed_versions)
            .field("max_credentials_per_owner", &self.max_credentials_per_owner)
            .finish()
    }
}

/// `store.kind`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded SQLite under `data_dir`.
    #[default]
    Sqlite,
    /// PostgreSQL 15+ at `store.url`.
    Postgres,
}

/// `[keys]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KeysConfig {
    /// Which provider.
    #[serde(default)]
    pub provider: KeyProviderKind,
    /// How a remote provider is used: it wraps Strongroom's KEKs (`hierarchy`, the default) or
    /// every data key (`strict`).
    #[serde(default)]
    pub mode: KeyMode,
    /// The local keyring file (default `DATA_DIR/keyring.json`).
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    /// `[keys.aws_kms]`, with `provider = "aws-kms"`.
    #[serde(default)]
    pub aws_kms: Option<AwsKmsSettings>,
    /// `[keys.pkcs11]`, with `provider = "pkcs11"`.
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Settings>,
    /// `[keys.transit]`, with `provider = "transit"`.
    #[serde(default)]
    pub transit: Option<TransitSettings>,
}

/// `keys.mode`: how a remote provider protects the data keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum KeyMode {
    /// The provider wraps Strongroom's KEKs (kept wrapped in the store, unwrapped once at
    /// start); the KEKs wrap the data keys in process, so no request waits on the provider.
    #[default]
    Hierarchy,
    /// The provider wraps every data key itself: each put and reveal is one provider call,
    /// and shows in the provider's own audit log.
    Strict,
}

impl KeyMode {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMode::Hierarchy => "hierarchy",
            KeyMode::Strict => "strict",
        }
    }
}

/// `keys.provider`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum KeyProviderKind {
    /// The local keyring file.
    #[default]
    Local,
    /// AWS KMS (`[keys.aws_kms]`): each data key is wrapped by KMS.
    #[serde(rename = "aws-kms", alias = "aws_kms")]
    AwsKms,
    /// A PKCS#11 HSM (`[keys.pkcs11]`): each data key is wrapped inside the token.
    Pkcs11,
    /// Vault/OpenBao Transit (`[keys.transit]`): each data key is wrapped by Transit.
    Transit,
}

impl KeyProviderKind {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyProviderKind::Local => "local",
            KeyProviderKind::AwsKms => "aws-kms",
            KeyProviderKind::Pkcs11 => "pkcs11",
            KeyProviderKind::Transit => "transit",
        }
    }
}

/// `[keys.aws_kms]`. Credentials come from the AWS default chain (environment, profile,
/// instance role), never from this file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AwsKmsSettings {
    /// Key ARN (recommended), key id or alias.
    pub key_id: String,
    /// Region (default: the AWS default chain).
    #[serde(default)]
    pub region: Option<String>,
    /// Another endpoint: a VPC endpoint, or an emulator such as `http://127.0.0.1:PORT`.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// TCP connect timeout (default 5).
    #[serde(default)]
    pub connect_timeout_seconds: Option<u64>,
    /// One KMS call, retries included (default 10).
    #[serde(default)]
    pub operation_timeout_seconds: Option<u64>,
    /// Attempts per call (default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
}

/// `[keys.pkcs11]`. The PIN comes from `pin_file` or `pin_env`, never from this file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Pkcs11Settings {
    /// The PKCS#11 module (shared library).
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// Label prefix of the KEKs (`LABEL.v1`, `LABEL.v2`, ...).
    pub key_label: String,
    /// A file holding the user PIN (not readable by others).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Sessions kept open (default 4).
    #[serde(default)]
    pub sessions: Option<usize>,
}

/// `[keys.transit]`. Authenticates with a token (`token_file` / `token_env`) or AppRole
/// (`approle_role_id` plus `approle_secret_id_file` / `approle_secret_id_env`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TransitSettings {
    /// Server address, e.g. `https://vault.internal:8200`.
    pub address: String,
    /// Name of the transit key.
    pub key: String,
    /// Mount of the transit engine (default `transit`).
    #[serde(default)]
    pub mount: Option<String>,
    /// A file holding the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// AppRole role id.
    #[serde(default)]
    pub approle_role_id: Option<String>,
    /// A file holding the AppRole secret id.
    #[serde(default)]
    pub approle_secret_id_file: Option<PathBuf>,
    /// An environment variable holding the AppRole secret id.
    #[serde(default)]
    pub approle_secret_id_env: Option<String>,
    /// Mount of the approle auth method (default `approle`).
    #[serde(default)]
    pub approle_mount: Option<String>,
    /// PEM CA file to trust instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Namespace (`X-Vault-Namespace`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// TCP and TLS connect timeout (default 5).
    #[serde(default)]
    pub connect_timeout_seconds: Option<u64>,
    /// One request (default 10).
    #[serde(default)]
    pub request_timeout_seconds: Option<u64>,
    /// Allow `http://` to a loopback address (development only).
    #[serde(default)]
    pub danger_allow_plain_http: bool,
    /// Allow an `aes128-gcm96` key (to move off it with `rewrap --to-config`).
    #[serde(default)]
    pub allow_128_bit_key: bool,
}

/// `[tls]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Whether a client certificate is required (with `client_ca`).
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// `tls.client_auth`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Clients may present a certificate; those without one use tokens.
    #[default]
    Optional,
    /// Every client must present a certificate the CA signed.
    Required,
}

/// `[auth]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthConfig {
    /// User tokens.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Service bearer tokens.
    #[serde(default)]
    pub service: Vec<TokenConfig>,
    /// Admin bearer tokens.
    #[serde(default)]
    pub admin: Vec<TokenConfig>,
    /// Client-certificate SANs.
    #[serde(default)]
    pub mtls: Vec<MtlsConfig>,
}

/// `[auth.jwt]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct JwtConfig {
    /// Required `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accept user tokens of any `iss` (instead of setting `issuer`): only for keys that
    /// sign for this one issuer alone.
    #[serde(default)]
    pub accept_any_issuer: bool,
    /// Required `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// Accept user tokens of any `aud` (instead of setting `audience`): only for keys that
    /// sign tokens for Strongroom alone.
    #[serde(default)]
    pub accept_any_audience: bool,
    /// The `aud` of user tokens delegated services present (`X-Strongroom-On-Behalf-Of`),
    /// refused on the user's own routes.
    #[serde(default)]
    pub on_behalf_of_audience: Option<String>,
    /// Leeway for `exp`/`nbf`/`iat`.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// HS256 secret file.
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public key file.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// The algorithm of `public_key_file`.
    #[serde(default)]
    pub algorithm: Option<JwtAlgorithmName>,
    /// JWKS file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL (`https://` only).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM CA certificates trusted (alone) for `jwks_url`.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// Background refresh interval of `jwks_url`, in seconds.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_seconds: u64,
    /// Least time between refreshes caused by tokens naming an unknown `kid`, in seconds.
    #[serde(default = "default_jwks_cooldown")]
    pub jwks_unknown_kid_cooldown_seconds: u64,
    /// How long the last good JWKS is used while refreshes fail, in seconds.
    #[serde(default = "default_jwks_max_stale")]
    pub jwks_max_stale_seconds: u64,
    /// One JWKS fetch, in seconds.
    #[serde(default = "default_jwks_timeout")]
    pub jwks_timeout_seconds: u64,
}

fn default_leeway() -> u64 {
    30
}

fn default_jwks_refresh() -> u64 {
    300
}

fn default_jwks_cooldown() -> u64 {
    30
}

fn default_jwks_max_stale() -> u64 {
    24 * 3600
}

fn default_jwks_timeout() -> u64 {
    10
}

/// `auth.jwt.algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithmName {
    /// HMAC-SHA256 (use `hs256_secret_file`).
    #[serde(rename = "HS256", alias = "hs256")]
    Hs256,
    /// RSA PKCS#1 v1.5 SHA-256.
    #[serde(rename = "RS256", alias = "rs256")]
    Rs256,
    /// ECDSA P-256 SHA-256.
    #[serde(rename = "ES256", alias = "es256")]
    Es256,
    /// Ed25519.
    #[serde(rename = "EdDSA", alias = "eddsa", alias = "EDDSA")]
    EdDsa,
}

/// `[[auth.service]]` and `[[auth.admin]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TokenConfig {
    /// Service or admin name.
    pub name: String,
    /// SHA-256 of the token, 64 hex digits (`printf %s "$TOKEN" | sha256sum`).
    pub token_sha256: String,
}

impl TokenConfig {
    /// An entry for `name` with the token's SHA-256 in hex.
    pub fn new(name: impl Into<String>, token_sha256: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            token_sha256: token_sha256.into(),
        }
    }
}

/// `[[auth.mtls]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MtlsConfig {
    /// A DNS or URI subject alternative name of the client certificate.
    pub san: String,
    /// The service it authenticates.
    #[serde(default)]
    pub service: Option<String>,
    /// The admin it authenticates.
    #[serde(default)]
    pub admin: Option<String>,
}

/// `[limits]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Concurrent connections.
    pub max_connections: usize,
    /// Longest request, in seconds.
    pub request_timeout_seconds: u64,
    /// Request line plus headers, in bytes.
    pub max_header_bytes: usize,
    /// Request body, in bytes.
    pub max_body_bytes: usize,
    /// `verify` calls per owner per minute.
    pub verify_per_minute: u32,
    /// Puts to one owner's credentials per minute.
    pub puts_per_owner_per_minute: u32,
    /// TLS handshake, first-request (after the handshake) and request-header read timeout, in
    /// seconds.
    pub handshake_timeout_seconds: u64,
    /// A connection with no request in flight for this long is closed, in seconds.
    pub idle_timeout_seconds: u64,
    /// Grace period for in-flight requests on shutdown, in seconds.
    pub shutdown_grace_seconds: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            request_timeout_seconds: 30,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 512 * 1024,
            verify_per_minute: 30,
            puts_per_owner_per_minute: 600,
            handshake_timeout_seconds: 10,
            idle_timeout_seconds: 60,
            shutdown_grace_seconds: 30,
        }
    }
}

impl LimitsConfig {
    /// The limits the router enforces.
    pub fn api_limits(&self) -> strongroom_api::ApiLimits {
        strongroom_api::ApiLimits {
            max_header_bytes: self.max_header_bytes,
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_secs(self.request_timeout_seconds),
            verify_per_minute: self.verify_per_minute,
            puts_per_owner_per_minute: self.puts_per_owner_per_minute,
        }
    }
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Level or filter directives.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".to_owned(),
        }
    }
}

/// `log.format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// Values from the command line, which beat the file and the environment.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--keyring` (the `keys` commands): the local keyring file, instead of `keys.keyring`.
    pub keyring: Option<PathBuf>,
}

impl Config {
    /// Checks every file the store and key provider sections name (see [`crate::trusted`]):
    /// owned by root or this user, writable by that owner only, and so every folder and
    /// symlink on the way. A PKCS#11 module is code this process loads; a CA decides whom a
    /// connection trusts; a keyring or a token opens everything.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] naming the file and what to run.
    pub fn check_backend_files(&self) -> Result<(), ServerError> {
        // A file that is not there is left to its reader, which names it; the folders on its
        // way are checked all the same, so nobody else can make it meanwhile.
        let check = crate::trusted::check_if_present;
        if self.store.kind == StoreKind::Sqlite && self.data_dir.exists() {
            // Whoever can write there can swap the database or the keyring. (One not there
            // yet is made by the store, and checked once made.)
            check(&self.data_dir, "data dir")?;
        }
        if let Some(ca) = &self.store.tls_ca_file {
            check(ca, "store.tls_ca_file")?;
        }
        let keyring = self.keyring_path();
        if self.keys.provider == KeyProviderKind::Local {
            check(&keyring, "keyring")?;
        }
        if let Some(p) = &self.keys.pkcs11 {
            check(&p.module, "PKCS#11 module")?;
            if let Some(pin) = &p.pin_file {
                check(pin, "PKCS#11 PIN file")?;
            }
        }
        if let Some(t) = &self.keys.transit {
            for (file, what) in [
                (&t.token_file, "Transit token file"),
                (&t.approle_secret_id_file, "Transit AppRole secret id file"),
                (&t.ca_file, "Transit CA file"),
            ] {
                if let Some(file) = file {
                    check(file, what)?;
                }
            }
        }
        Ok(())
    }

    /// [`Config::check_backend_files`], and every file the server itself reads: TLS, the
    /// authentication keys and CAs, the broker's CA, the folder of the audit file.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] naming the file and what to run.
    pub fn check_files(&self) -> Result<(), ServerError> {
        // A file that is not there is left to its reader, which names it; the folders on its
        // way are checked all the same, so nobody else can make it meanwhile.
        let check = crate::trusted::check_if_present;
        self.check_backend_files()?;
        if let Some(tls) = &self.tls {
            check(&tls.cert, "TLS certificate")?;
            check(&tls.key, "TLS private key")?;
            if let Some(ca) = &tls.client_ca {
                check(ca, "TLS client CA")?;
            }
        }
        if let Some(jwt) = &self.auth.jwt {
            for (file, what) in [
                (&jwt.hs256_secret_file, "JWT HS256 secret file"),
                (&jwt.public_key_file, "JWT public key file"),
                (&jwt.jwks_file, "JWKS file"),
                (&jwt.jwks_ca_file, "JWKS CA file"),
            ] {
                if let Some(file) = file {
                    check(file, what)?;
                }
            }
        }
        if let Some(ca) = &self.broker.ca_file {
            check(ca, "broker CA file")?;
        }
        Ok(())
    }

    /// Reads `file` (if any), then `STRONGROOM_*` variables, then `overrides`, and
    /// [validates](Config::validate) the result.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] naming the key (and the file or variable it came from), or
    /// [`ServerError::File`] when `file` cannot be read.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ServerError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            // Check it ourselves for a clear error on a missing file; `file_exact` never
            // searches parent folders (as figment's `Toml::file` would).
            std::fs::File::open(file).map_err(ServerError::file("config file", file))?;
            crate::trusted::check(file, "config file")?;
            figment = figment.merge(Toml::file_exact(file));
        }
        let config = Self::from_figment(merge_env(figment, ENV_KEYS), overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// Extracts a configuration from `figment` with `overrides` on top, without validating.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] naming the key.
    pub fn from_figment(figment: Figment, overrides: &Overrides) -> Result<Self, ServerError> {
        // An empty text (`STRONGROOM_POLICY_FILE=` left blank) would be read as a path to
        // the working directory, or as a name no provider has.
        for setting in TEXT_SETTINGS {
            if let Ok(value) = figment.find_value(setting) {
                if value.as_str().is_some_and(|v| v.trim().is_empty()) {
                    let from = match figment.find_metadata(setting) {
                        Some(md) if md.name.contains("environment") => format!(
                            " (from environment variable STRONGROOM_{})",
                            setting.replace('.', "__").to_ascii_uppercase()
                        ),
                        Some(md) => match &md.source {
                            Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
                            _ => String::new(),
                        },
                        None => String::new(),
                    };
                    // Two settings have no default to fall back on.
                    let advice = match *setting {
                        "auth.jwt.issuer" | "auth.jwt.audience" => "",
                        _ => " (leave it out for the default)",
                    };
                    return Err(ServerError::Config(format!(
                        "key `{setting}`{from}: must not be empty{advice}"
                    )));
                }
            }
        }
        let mut config: Config = figment.extract().map_err(config_error)?;
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(dir) = &overrides.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(keyring) = &overrides.keyring {
            config.keys.keyring = Some(keyring.clone());
        }
        Ok(config)
    }

    /// The local keyring file: `keys.keyring`, or `DATA_DIR/keyring.json`.
    pub fn keyring_path(&self) -> PathBuf {
        self.keys
            .keyring
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keyring.json"))
    }

    /// Like [`Config::load`], but checks only what operator commands (`rewrap`, `keys`,
    /// imports) need: the store and keys sections. TLS and auth may be absent, as in the
    /// `serve --dev` layout addressed by `--data-dir` alone.
    ///
    /// # Errors
    ///
    /// As [`Config::load`].
    pub fn load_for_operator(
        file: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Self, ServerError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            std::fs::File::open(file).map_err(ServerError::file("config file", file))?;
            crate::trusted::check(file, "config file")?;
            figment = figment.merge(Toml::file_exact(file));
        }
        let config = Self::from_figment(merge_env(figment, ENV_KEYS), overrides)?;
        config.validate_backends()?;
        Ok(config)
    }

    /// Checks the store and keys sections alone (part of [`Config::validate`]).
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] naming the first key at fault.
    pub fn validate_backends(&self) -> Result<(), ServerError> {
        let bad = |key: &str, msg: &str| Err(ServerError::Config(format!("key `{key}`: {msg}")));
        match (self.store.kind, &self.store.url) {
            (StoreKind::Postgres, None) => {
                return bad(
                    "store.url",
                    "is required with store.kind = \"postgres\" (e.g. postgresql://user@host/db)",
                )
            }
            (StoreKind::Sqlite, Some(_)) => {
                return bad(
                    "store.url",
                    "is only used with store.kind = \"postgres\"; SQLite lives in data_dir",
                )
            }
            _ => {}
        }
        if self.store.max_connections == Some(0) {
            return bad("store.max_connections", "must be at least 1");
        }
        if self.store.kind == StoreKind::Postgres && self.store.sync != StoreSync::Full {
            return bad(
                "store.sync",
                "is SQLite only; PostgreSQL durability is its own synchronous_commit",
            );
        }
        if self.store.kind == StoreKind::Sqlite && self.store.tls_ca_file.is_some() {
            return bad(
                "store.tls_ca_file",
                "is only used with store.kind = \"postgres\"",
            );
        }
        if self.store.kind == StoreKind::Postgres && self.store.reveal_cache_mb.is_some() {
            return bad(
                "store.reveal_cache_mb",
                "is SQLite only: with PostgreSQL, other servers write too, so every reveal reads the database",
            );
        }
        if self
            .store
            .max_versions
            .is_some_and(|n| !(1..=1000).contains(&n))
        {
            return bad("store.max_versions", "must be 1 to 1000");
        }
        if self
            .store
            .keep_destroyed_versions
            .is_some_and(|n| n > MAX_KEEP_DESTROYED_VERSIONS)
        {
            return bad(
                "store.keep_destroyed_versions",
                "must be 0 to 100000 (tombstones kept per credential)",
            );
        }
        // 0 has no use (no owner could store anything) and "unlimited" is the hole the quota
        // closes: a deployment that needs more sets a larger number.
        if self
            .store
            .max_credentials_per_owner
            .is_some_and(|n| !(1..=MAX_CREDENTIALS_PER_OWNER_LIMIT).contains(&n))
        {
            return bad("store.max_credentials_per_owner", "must be 1 to 100000");
        }
        if self.store.reveal_cache_mb.is_some_and(|mb| mb > 4096) {
            return bad("store.reveal_cache_mb", "must be at most 4096");
        }
        let keys = &self.keys;
        let one_of = |a: bool, b: bool| a as u8 + b as u8 == 1;
        if keys.provider == KeyProviderKind::Local && keys.mode == KeyMode::Strict {
            return bad(
                "keys.mode",
                "\"strict\" applies to remote providers; the local keyring wraps every data key itself",
            );
        }
        match keys.provider {
            KeyProviderKind::Local => {}
            KeyProviderKind::AwsKms => match &keys.aws_kms {
                None => {
                    return bad(
                        "keys.aws_kms",
                        "is required with keys.provider = \"aws-kms\"",
                    )
                }
                Some(k) if k.key_id.is_empty() => {
                    return bad("keys.aws_kms.key_id", "must not be empty")
                }
                Some(_) => {}
            },
            KeyProviderKind::Pkcs11 => match &keys.pkcs11 {
                None => return bad("keys.pkcs11", "is required with keys.provider = \"pkcs11\""),
                Some(p) if !one_of(p.pin_file.is_some(), p.pin_env.is_some()) => {
                    return bad("keys.pkcs11", "set exactly one of pin_file or pin_env")
                }
                Some(p) if p.sessions == Some(0) => {
                    return bad("keys.pkcs11.sessions", "must be at least 1")
                }
                Some(_) => {}
            },
            KeyProviderKind::Transit => match &keys.transit {
                None => {
                    return bad(
                        "keys.transit",
                        "is required with keys.provider = \"transit\"",
                    )
                }
                Some(t) => {
                    let token = t.token_file.is_some() || t.token_env.is_some();
                    let approle = t.approle_role_id.is_some();
                    if !one_of(token, approle) || (t.token_file.is_some() && t.token_env.is_some())
                    {
                        return bad(
                            "keys.transit",
                            "set exactly one of token_file, token_env or approle_role_id",
                        );
                    }
                    if approle
                        && !one_of(
                            t.approle_secret_id_file.is_some(),
                            t.approle_secret_id_env.is_some(),
                        )
                    {
                        return bad(
                            "keys.transit",
                            "approle_role_id needs exactly one of approle_secret_id_file or approle_secret_id_env",
                        );
                    }
                }
            },
        }
        Ok(())
    }

    /// Checks everything that can be checked without opening files, so a mistake stops the
    /// server before it starts.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] naming the first key at fault.
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |key: &str, msg: &str| Err(ServerError::Config(format!("key `{key}`: {msg}")));

        self.validate_backends()?;

        let Some(tls) = &self.tls else {
            return bad(
                "tls",
                "is required: set tls.cert and tls.key (PEM files), or run `strongroom serve --dev`",
            );
        };
        if tls.client_auth == ClientAuth::Required && tls.client_ca.is_none() {
            return bad(
                "tls.client_auth",
                "\"required\" needs tls.client_ca (the CA client certificates chain to)",
            );
        }

        if let Some(jwt) = &self.auth.jwt {
            let sources = [
                jwt.hs256_secret_file.is_some(),
                jwt.public_key_file.is_some(),
                jwt.jwks_file.is_some(),
                jwt.jwks_url.is_some(),
            ];
            match sources.iter().filter(|s| **s).count() {
                0 => {
                    return bad(
                        "auth.jwt",
                        "set one of hs256_secret_file, public_key_file, jwks_file or jwks_url",
                    )
                }
                1 => {}
                _ => {
                    return bad(
                        "auth.jwt",
                        "set only one of hs256_secret_file, public_key_file, jwks_file or jwks_url",
                    )
                }
            }
            if let Some(url) = &jwt.jwks_url {
                match reqwest::Url::parse(url) {
                    Ok(u) if u.scheme() == "https" && u.host_str().is_some() => {}
                    Ok(_) => {
                        return bad(
                            "auth.jwt.jwks_url",
                            "must be an https:// URL (the identity provider's JWKS endpoint)",
                        )
                    }
                    Err(e) => return bad("auth.jwt.jwks_url", &format!("not a URL: {e}")),
                }
            } else if jwt.jwks_ca_file.is_some() {
                return bad("auth.jwt.jwks_ca_file", "is only used with jwks_url");
            }
            if !(60..=86_400).contains(&jwt.jwks_refresh_seconds) {
                return bad("auth.jwt.jwks_refresh_seconds", "must be 60 to 86400");
            }
            if !(1..=3600).contains(&jwt.jwks_unknown_kid_cooldown_seconds) {
                return bad(
                    "auth.jwt.jwks_unknown_kid_cooldown_seconds",
                    "must be 1 to 3600",
                );
            }
            if jwt.jwks_max_stale_seconds < jwt.jwks_refresh_seconds
                || jwt.jwks_max_stale_seconds > 30 * 86_400
            {
                return bad(
                    "auth.jwt.jwks_max_stale_seconds",
                    "must be at least jwks_refresh_seconds and at most 2592000 (30 days)",
                );
            }
            if !(1..=60).contains(&jwt.jwks_timeout_seconds) {
                return bad("auth.jwt.jwks_timeout_seconds", "must be 1 to 60");
            }
            match (jwt.public_key_file.is_some(), jwt.algorithm) {
                (true, None) => {
                    return bad(
                        "auth.jwt.algorithm",
                        "is required with public_key_file: RS256, ES256 or EdDSA",
                    )
                }
                (true, Some(JwtAlgorithmName::Hs256)) => {
                    return bad(
                        "auth.jwt.algorithm",
                        "HS256 takes hs256_secret_file, not a public key",
                    )
                }
                (false, Some(a))
                    if !(a == JwtAlgorithmName::Hs256 && jwt.hs256_secret_file.is_some()) =>
                {
                    return bad("auth.jwt.algorithm", "is only used with public_key_file")
                }
                _ => {}
            }
            if jwt.leeway_seconds > 300 {
                return bad("auth.jwt.leeway_seconds", "must be at most 300");
            }
            // Keys an identity provider holds sign tokens for every application it serves
            // (and, multi-tenant, for every tenant): without both checks a token another
            // application was given would open this one. Accepting any is said explicitly.
            for (key, value, any, claim) in [
                ("issuer", &jwt.issuer, jwt.accept_any_issuer, "iss"),
                ("audience", &jwt.audience, jwt.accept_any_audience, "aud"),
            ] {
                match (value, any) {
                    (Some(s), _) if s.is_empty() => {
                        return bad(
                            &format!("auth.jwt.{key}"),
                            &format!(
                                "must not be empty (set accept_any_{key} = true to accept any)"
                            ),
                        )
                    }
                    (Some(_), true) => {
                        return bad(
                            &format!("auth.jwt.accept_any_{key}"),
                            &format!("cannot be set with auth.jwt.{key}"),
                        )
                    }
                    (None, false) => {
                        return bad(
                            &format!("auth.jwt.{key}"),
                            &format!(
                                "is required: the `{claim}` user tokens must carry, so that \
                                 tokens the same keys signed for other applications are refused \
                                 (or accept_any_{key} = true, when these keys sign for \
                                 Strongroom alone)"
                            ),
                        )
                    }
                    _ => {}
                }
            }
            if jwt.on_behalf_of_audience.is_some() && jwt.on_behalf_of_audience == jwt.audience {
                return bad(
                    "auth.jwt.on_behalf_of_audience",
                    "must differ from auth.jwt.audience (a token for delegation must not be one \
                     for the user's own requests)",
                );
            }
        }

        let mut digests = HashSet::new();
        for (section, list) in [
            ("auth.service", &self.auth.service),
            ("auth.admin", &self.auth.admin),
        ] {
            let mut names = HashSet::new();
            for (i, t) in list.iter().enumerate() {
                let at = |field: &str| format!("{section}[{i}].{field}");
                if !valid_principal_name(&t.name) {
                    return bad(&at("name"), "must be 1 to 128 characters of [A-Za-z0-9._-]");
                }
                if !names.insert(t.name.as_str()) {
                    return bad(&at("name"), &format!("{:?} is listed twice", t.name));
                }
                let Some(digest) = parse_sha256_hex(&t.token_sha256) else {
                    return bad(
                        &at("token_sha256"),
                        "must be 64 hex digits: the SHA-256 of the token (`printf %s \"$TOKEN\" | sha256sum`)",
                    );
                };
                if !digests.insert(digest) {
                    return bad(&at("token_sha256"), "the same token is configured twice");
                }
            }
        }

        let mut sans = HashSet::new();
        for (i, m) in self.auth.mtls.iter().enumerate() {
            let at = |field: &str| format!("auth.mtls[{i}].{field}");
            if m.san.is_empty() || m.san.len() > 1024 {
                return bad(
                    &at("san"),
                    "must be a DNS name or URI of 1 to 1024 characters",
                );
            }
            // Which kind of SAN it maps (see `tls::subject_alt_names`): a text that is
            // neither a DNS name nor a URI could never match.
            if m.san.contains('/') && !m.san.contains(':') {
                return bad(
                    &at("san"),
                    "must be a DNS name (no `:` or `/`, matched against DNS-name SANs) or a URI \
                     with its scheme (`spiffe://...`, matched against URI SANs)",
                );
            }
            // Certificates carry SANs in ASCII (IA5String): internationalised names as
            // A-labels (`xn--…`), URIs percent-encoded. Anything else could never match.
            if !m.san.is_ascii() {
                return bad(
                    &at("san"),
                    "a DNS name must be ASCII: write an internationalised one as certificates \
                     carry it, in its xn-- form (and a URI percent-encoded)",
                );
            }
            if !sans.insert(mtls_key(&m.san)) {
                return bad(&at("san"), &format!("{:?} is listed twice", m.san));
            }
            match (&m.service, &m.admin) {
                (Some(n), None) | (None, Some(n)) => {
                    if !valid_principal_name(n) {
                        let field = if m.service.is_some() {
                            "service"
                        } else {
                            "admin"
                        };
                        return bad(&at(field), "must be 1 to 128 characters of [A-Za-z0-9._-]");
                    }
                }
                _ => return bad(&at("service"), "set exactly one of `service` or `admin`"),
            }
            if tls.client_ca.is_none() {
                return bad(&at("san"), "client certificates need tls.client_ca");
            }
        }

        let l = &self.limits;
        if !(1..=1_000_000).contains(&l.max_connections) {
            return bad("limits.max_connections", "must be 1 to 1000000");
        }
        if !(1..=3600).contains(&l.request_timeout_seconds) {
            return bad("limits.request_timeout_seconds", "must be 1 to 3600");
        }
        if !(8192..=1024 * 1024).contains(&l.max_header_bytes) {
            return bad("limits.max_header_bytes", "must be 8192 to 1048576");
        }
        if !(4096..=64 * 1024 * 1024).contains(&l.max_body_bytes) {
            return bad("limits.max_body_bytes", "must be 4096 to 67108864");
        }
        if l.verify_per_minute == 0 {
            return bad("limits.verify_per_minute", "must be at least 1");
        }
        if l.puts_per_owner_per_minute == 0 {
            return bad("limits.puts_per_owner_per_minute", "must be at least 1");
        }
        if !(1..=300).contains(&l.handshake_timeout_seconds) {
            return bad("limits.handshake_timeout_seconds", "must be 1 to 300");
        }
        if !(1..=3600).contains(&l.idle_timeout_seconds) {
            return bad("limits.idle_timeout_seconds", "must be 1 to 3600");
        }
        if l.shutdown_grace_seconds > 3600 {
            return bad("limits.shutdown_grace_seconds", "must be at most 3600");
        }
        let b = &self.broker;
        if !(1..=300).contains(&b.connect_timeout_seconds) {
            return bad("broker.connect_timeout_seconds", "must be 1 to 300");
        }
        if let Some(t) = b.timeout_seconds {
            if t == 0 || t >= l.request_timeout_seconds {
                return bad(
                    "broker.timeout_seconds",
                    "must be at least 1 and below limits.request_timeout_seconds",
                );
            }
        }
        if !(1024..=64 * 1024 * 1024).contains(&b.max_response_bytes) {
            return bad("broker.max_response_bytes", "must be 1024 to 67108864");
        }
        if b.max_request_body_bytes > 64 * 1024 * 1024 {
            return bad("broker.max_request_body_bytes", "must be at most 67108864");
        }
        if !(1..=256).contains(&b.max_concurrent_calls) {
            return bad("broker.max_concurrent_calls", "must be 1 to 256");
        }
        if b.max_concurrent_calls_per_service
            .is_some_and(|n| !(1..=b.max_concurrent_calls).contains(&n))
        {
            return bad(
                "broker.max_concurrent_calls_per_service",
                "must be 1 to broker.max_concurrent_calls",
            );
        }
        for entry in &b.pass_response_headers {
            if let Err(e) = PassedHeader::parse(entry) {
                return bad("broker.pass_response_headers", &e);
            }
        }
        if let Err(e) = crate::logging::filter(&self.log.level) {
            return bad("log.level", &e);
        }
        Ok(())
    }

    /// The `[[auth.mtls]]` entries as two maps: SAN → service, SAN → admin.
    pub(crate) fn mtls_maps(&self) -> (HashMap<String, String>, HashMap<String, String>) {
        let (mut services, mut admins) = (HashMap::new(), HashMap::new());
        for m in &self.auth.mtls {
            if let Some(s) = &m.service {
                services.insert(mtls_key(&m.san), s.clone());
            } else if let Some(a) = &m.admin {
                admins.insert(mtls_key(&m.san), a.clone());
            }
        }
        (services, admins)
    }
}

/// A `[[auth.mtls]] san` as certificates' SANs are matched against it: a DNS name in the
/// form `tls::subject_alt_names` gives them, a URI as written.
fn mtls_key(san: &str) -> String {
    if san.contains(':') {
        san.to_owned()
    } else {
        crate::tls::dns_san_key(san)
    }
}

fn valid_principal_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// 64 hex digits → 32 bytes.
pub(crate) fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

/// `STRONGROOM_*` variables whose first segment is in `keys`, split on `__`.
/// `STRONGROOM_*` variables other commands read (the CLI client, operator commands), and the
/// prefixes of the test suites' own: none of them is a misspelt setting.
const OTHER_ENV: &[&str] = &[
    "CONFIG",
    "TOKEN",
    "SERVER",
    "CACERT",
    "KEYRING",
    "IMPORT_SECRET_KEY",
    "BIN",
    "APT_UPDATED",
    "FUZZ_SECONDS",
    "VECTORS_DIR",
];
const OTHER_ENV_PREFIXES: &[&str] = &["TEST_", "REQUIRE_", "BENCH_"];

/// The settings that both `file` and a `STRONGROOM_*` variable set, to different values:
/// `(variable, key)` pairs, the variable winning. An exported `STRONGROOM_DATA_DIR` (the dev
/// server suggests one) would otherwise move a `serve --config` onto another store without
/// a word. Only names: a value may be a secret.
#[must_use]
pub fn environment_overrides(file: &Path) -> Vec<(String, String)> {
    fn leaves(prefix: &str, value: &figment::value::Value, out: &mut Vec<String>) {
        match value {
            figment::value::Value::Dict(_, dict) => {
                for (k, v) in dict {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&key, v, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }
    let from_file = Figment::from(Toml::file_exact(file));
    let from_env = merge_env(Figment::new(), ENV_KEYS);
    let Ok(env_values) = from_env.extract::<figment::value::Value>() else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    leaves("", &env_values, &mut keys);
    // Compared as plain data: figment's values carry their source in a tag.
    let plain = |v: &figment::value::Value| v.deserialize::<serde_json::Value>().ok();
    keys.into_iter()
        .filter(|key| {
            matches!(
                (from_file.find_value(key), from_env.find_value(key)),
                (Ok(f), Ok(e)) if plain(&f) != plain(&e)
            )
        })
        .map(|key| {
            let variable = format!("STRONGROOM_{}", key.replace('.', "__").to_ascii_uppercase());
            (variable, key)
        })
        .collect()
}

/// The `STRONGROOM_*` variables in `vars` that name no setting (a typo such as
/// `STRONGROOM_LISTN` or `STRONGROOM_TLS_CLIENT_AUTH` with one underscore), which the
/// configuration would otherwise ignore without a word.
pub fn unknown_env_names(vars: impl IntoIterator<Item = String>) -> Vec<String> {
    vars.into_iter()
        .filter(|name| {
            let Some(rest) = name.strip_prefix("STRONGROOM_") else {
                return false;
            };
            let first = rest.split("__").next().unwrap_or_default();
            !ENV_KEYS.iter().any(|k| first.eq_ignore_ascii_case(k))
                && !OTHER_ENV.iter().any(|k| rest.eq_ignore_ascii_case(k))
                && !OTHER_ENV_PREFIXES.iter().any(|p| rest.starts_with(p))
        })
        .collect()
}

/// Settings that are text whatever they look like. figment reads `STRONGROOM_*` values as
/// TOML-ish scalars, so `STRONGROOM_AUTH__JWT__AUDIENCE=12345` became a number (refused for a
/// text setting) and `007` would lose its zeros: for these, the variable's text is taken as
/// it is (a value figment reads as text, such as `"12345"` in quotes, stays as figment reads it).
const TEXT_SETTINGS: &[&str] = &[
    "data_dir",
    "policy_file",
    "store.url",
    "store.schema",
    "store.tls_ca_file",
    "keys.keyring",
    "keys.aws_kms.key_id",
    "keys.aws_kms.region",
    "keys.aws_kms.endpoint_url",
    "keys.pkcs11.module",
    "keys.pkcs11.token_label",
    "keys.pkcs11.key_label",
    "keys.pkcs11.pin_file",
    "keys.pkcs11.pin_env",
    "keys.transit.address",
    "keys.transit.key",
    "keys.transit.mount",
    "keys.transit.token_file",
    "keys.transit.token_env",
    "keys.transit.approle_role_id",
    "keys.transit.approle_secret_id_file",
    "keys.transit.approle_secret_id_env",
    "keys.transit.approle_mount",
    "keys.transit.ca_file",
    "keys.transit.namespace",
    "tls.cert",
    "tls.key",
    "tls.client_ca",
    "auth.jwt.issuer",
    "auth.jwt.audience",
    "auth.jwt.on_behalf_of_audience",
    "auth.jwt.hs256_secret_file",
    "auth.jwt.public_key_file",
    "auth.jwt.jwks_file",
    "auth.jwt.jwks_url",
    "auth.jwt.jwks_ca_file",
    "log.level",
    "audit.jsonl",
    "broker.ca_file",
];

/// `STRONGROOM_*` variables for the sections in `keys`, merged onto `figment`: figment's
/// reading of them, then [`TEXT_SETTINGS`] as the text they hold.
pub(crate) fn merge_env(figment: Figment, keys: &'static [&'static str]) -> Figment {
    let mut figment = figment.merge(env_provider(keys));
    for setting in TEXT_SETTINGS {
        let first = setting.split('.').next().unwrap_or_default();
        if !keys.contains(&first) {
            continue;
        }
        let name = format!("STRONGROOM_{}", setting.replace('.', "__"));
        // figment matches names in any case; so does this.
        let Some(raw) = std::env::vars()
            .find(|(k, _)| k.eq_ignore_ascii_case(&name))
            .map(|(_, v)| v)
        else {
            continue;
        };
        let read: figment::value::Value = raw.parse().unwrap_or_else(|never| match never {});
        if read.as_str().is_none() {
            // Trimmed as figment trims the text it reads.
            figment = figment.merge(Serialized::global(setting, raw.trim()));
        }
    }
    figment
}

pub(crate) fn env_provider(keys: &'static [&'static str]) -> Env {
    Env::prefixed("STRONGROOM_")
        .filter(move |k| {
            let first = k.as_str().split("__").next().unwrap_or_default();
            keys.iter().any(|want| first.eq_ignore_ascii_case(want))
        })
        .split("__")
}

/// What is wrong, without the offending value: figment's own text quotes it (`found string
/// "postgresql://user:PASSWORD@…"`), and a misplaced secret must not reach stderr or the
/// journal. Key names and the expected forms are kept.
fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    fn found(actual: &Actual) -> String {
        match actual {
            Actual::Bool(b) => format!("boolean `{b}`"),
            Actual::Unsigned(n) => format!("integer `{n}`"),
            Actual::Signed(n) => format!("integer `{n}`"),
            Actual::Float(f) => format!("number `{f}`"),
            Actual::Str(_) | Actual::Char(_) => "a string".to_owned(),
            Actual::Bytes(_) => "bytes".to_owned(),
            Actual::Seq => "a list".to_owned(),
            Actual::Map => "a table".to_owned(),
            _ => "another kind of value".to_owned(),
        }
    }
    match kind {
        Kind::InvalidType(actual, expected) => {
            format!("invalid type: found {}, expected {expected}", found(actual))
        }
        Kind::InvalidValue(actual, expected) => {
            format!(
                "invalid value: found {}, expected {expected}",
                found(actual)
            )
        }
        Kind::UnknownVariant(_, expected) => {
            format!("unknown variant, expected one of: {}", expected.join(", "))
        }
        Kind::Unsupported(actual) => format!("unsupported value: {}", found(actual)),
        Kind::UnsupportedKey(actual, expected) => {
            format!(
                "unsupported key: found {}, expected {expected}",
                found(actual)
            )
        }
        // Key names, lengths and our own messages: no value in them.
        other => other.to_string(),
    }
}

/// One line per problem, naming the key and where its value came from.
fn config_error(err: figment::Error) -> ServerError {
    let lines: Vec<String> = err
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let from = match &e.metadata {
                Some(md) if md.name.contains("environment") => {
                    if e.path.is_empty() {
                        " (from a STRONGROOM_ environment variable)".to_owned()
                    } else {
                        format!(
                            " (from environment variable STRONGROOM_{})",
                            e.path.join("__").to_ascii_uppercase()
                        )
                    }
                }
                Some(md) => match &md.source {
                    Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
                    Some(figment::Source::Custom(s)) => format!(" (in {s})"),
                    _ => String::new(),
                },
                None => String::new(),
            };
            let kind = crate::error::one_line(&describe_kind(&e.kind));
            if key.is_empty() {
                format!("{kind}{from}")
            } else {
                format!("key `{key}`{from}: {kind}")
            }
        })
        .collect();
    ServerError::Config(lines.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every text setting names a real key: a misspelt one would be an unknown field
    /// whenever its variable is set.
    #[test]
    fn text_settings_are_keys_of_the_configuration() {
        for setting in TEXT_SETTINGS {
            let figment = Figment::new().merge(Serialized::global(setting, "x"));
            if let Err(e) = figment.extract::<Config>() {
                for e in e {
                    assert!(
                        !matches!(e.kind, figment::error::Kind::UnknownField(..)),
                        "{setting}: {e}"
                    );
                }
            }
        }
    }
}
