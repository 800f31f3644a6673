//! `auth.jwt.jwks_url`: the HTTPS fetcher behind [`strongroom_api::RemoteJwks`].
//!
//! HTTPS only (rustls with the ring provider), trusting `jwks_ca_file` alone when it is set,
//! else the system roots; no redirects, no connection reuse (a fetch every few minutes needs
//! none, and it lets a reload fetch from a runtime of its own); `jwks_timeout_seconds` bounds
//! each fetch, and a document larger than [`MAX_JWKS_BYTES`] is refused.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use strongroom_api::{JwksFetchFuture, JwksFetcher, JwksOptions, RemoteJwks};

use crate::config::{Config, JwtConfig};
use crate::error::ServerError;

/// The largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 512 * 1024;

/// Everything a [`RemoteJwks`] is built from; a reload that leaves it unchanged keeps the
/// running one (and its cache).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct JwksSpec {
    url: String,
    ca_file: Option<PathBuf>,
    ca_pem: Option<Vec<u8>>,
    timeout: Duration,
    options: JwksOptions,
}

impl JwksSpec {
    /// The spec of `config`'s `jwks_url`, if set; reads `jwks_ca_file`.
    pub(crate) fn of(config: &Config) -> Result<Option<Self>, ServerError> {
        let Some(jwt) = &config.auth.jwt else {
            return Ok(None);
        };
        let Some(url) = &jwt.jwks_url else {
            return Ok(None);
        };
        let ca_pem = match &jwt.jwks_ca_file {
            Some(path) => Some(crate::trusted::read(path, "JWKS CA file")?.to_vec()),
            None => None,
        };
        Ok(Some(Self {
            url: url.clone(),
            ca_file: jwt.jwks_ca_file.clone(),
            ca_pem,
            timeout: Duration::from_secs(jwt.jwks_timeout_seconds),
            options: options(jwt),
        }))
    }

    /// Fetches the key set (it must load) and keeps it fresh with a task on `runtime`.
    pub(crate) async fn connect(
        &self,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<RemoteJwks>, ServerError> {
        let fetcher = HttpsFetcher::new(self)?;
        RemoteJwks::connect(Box::new(fetcher), self.options.clone(), runtime)
            .await
            .map_err(|e| {
                ServerError::Config(format!(
                    "key `auth.jwt.jwks_url`: cannot load the JWKS: {}",
                    e.0
                ))
            })
    }
}

fn options(jwt: &JwtConfig) -> JwksOptions {
    JwksOptions {
        refresh: Duration::from_secs(jwt.jwks_refresh_seconds),
        unknown_kid_cooldown: Duration::from_secs(jwt.jwks_unknown_kid_cooldown_seconds),
        max_stale: Duration::from_secs(jwt.jwks_max_stale_seconds),
    }
}

struct HttpsFetcher {
    url: reqwest::Url,
    shown: String,
    client: reqwest::Client,
}

impl HttpsFetcher {
    fn new(spec: &JwksSpec) -> Result<Self, ServerError> {
        let bad = |m: String| ServerError::Config(format!("key `auth.jwt.jwks_url`: {m}"));
        let url = reqwest::Url::parse(&spec.url).map_err(|e| bad(format!("{e}")))?;
        if url.scheme() != "https" {
            return Err(bad("must be an https:// URL".into()));
        }
        let what = match &spec.ca_file {
            Some(path) => format!("key `auth.jwt.jwks_ca_file`: {}", path.display()),
            None => "key `auth.jwt.jwks_ca_file`".to_owned(),
        };
        let ca_pem = spec.ca_pem.as_deref().filter(|_| spec.ca_file.is_some());
        let tls = crate::tls::client_config(ca_pem, &what).map_err(ServerError::Config)?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .connect_timeout(spec.timeout.min(Duration::from_secs(5)))
            .timeout(spec.timeout)
            .user_agent(concat!("strongroom/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ServerError::Runtime(format!("JWKS client: {e}")))?;
        // Query strings can carry tokens: logs show scheme, host and path only.
        let shown = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port().map(|p| format!(":{p}")).unwrap_or_default()
        ) + url.path();
        Ok(Self { url, shown, client })
    }

    async fn get(&self) -> Result<String, String> {
        let mut resp = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| transport_error(&e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("answered HTTP {}", status.as_u16()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(format!(
                "the document is larger than {MAX_JWKS_BYTES} bytes"
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(&e))? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!(
                    "the document is larger than {MAX_JWKS_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| "the document is not UTF-8".to_owned())
    }
}

impl JwksFetcher for HttpsFetcher {
    fn fetch(&self) -> JwksFetchFuture<'_> {
        Box::pin(self.get())
    }

    fn source(&self) -> &str {
        &self.shown
    }
}

/// A reqwest error as one line: what failed and its innermost cause.
fn transport_error(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    let mut certificate = false;
    while let Some(next) = cause.source() {
        if let Some(tls) = next.downcast_ref::<rustls::Error>() {
            certificate |= matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        cause = next;
    }
    let cause = crate::error::one_line(&cause.to_string());
    if certificate || cause.contains("certificate") {
        format!("its TLS certificate does not verify (set auth.jwt.jwks_ca_file?): {cause}")
    } else if e.is_timeout() {
        format!("timed out: {cause}")
    } else {
        format!("cannot fetch it: {cause}")
    }
}
