//! TLS with rustls and its `ring` provider only: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`,
//! optional or required client certificates, and a certificate that SIGHUP can replace.
//!
//! The crypto provider is chosen explicitly for every config this crate builds (never the
//! process default), so a second provider elsewhere in the dependency graph cannot make rustls
//! panic or switch algorithms behind our back.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{ClientAuth, TlsConfig};
use crate::error::ServerError;

/// The one crypto provider: rustls' `ring` provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ALPN protocols offered, in preference order.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Reads every certificate in a PEM file.
///
/// # Errors
///
/// [`ServerError::File`] if it cannot be read; [`ServerError::Tls`] if it holds no
/// certificate or a malformed one.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let pem = crate::trusted::read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Tls(format!("{what} {}: {}", path.display(), pem_problem(&e))))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "{what} {}: no PEM \"CERTIFICATE\" block found",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
///
/// # Errors
///
/// [`ServerError::File`] if it cannot be read; [`ServerError::Tls`] if it holds no key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    // Warned, not refused: certificate tooling often leaves keys group-readable on purpose
    // (a `ssl-cert` group), and whoever reads it can impersonate the server, not the users.
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        // (A key others may write is refused by the read below.)
        if mode & 0o004 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "every local user can read the TLS private key (and so pose as this server); \
                 run `chmod 600` on it"
            );
        }
    }
    let pem = crate::trusted::read(path, "TLS private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        ServerError::Tls(format!(
            "TLS private key {}: {} (expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)",
            path.display(),
            pem_problem(&e)
        ))
    })
}

/// Says what is wrong with a PEM file in words, quoting none of it: the parser's own message
/// prints lines as byte arrays, and its base64 error names a character of what may be a key.
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "its PEM \"{}\" block has no END line (is the file cut short?)",
            String::from_utf8_lossy(end_marker).trim()
        ),
        Error::IllegalSectionStart { .. } => "a PEM \"-----BEGIN\" line is malformed".to_owned(),
        Error::Base64Decode(_) => "the base64 inside a PEM block is malformed".to_owned(),
        Error::NoItemsFound => "no PEM block found".to_owned(),
        Error::SectionTooLarge => "a PEM block is too large".to_owned(),
        Error::Io(io) => format!("cannot be read: {io}"),
        _ => "not valid PEM".to_owned(),
    }
}

/// Loads `tls.cert` and `tls.key` and checks that they belong together.
///
/// # Errors
///
/// As [`load_certs`] and [`load_key`], and [`ServerError::Tls`] for an unsupported or
/// mismatched key.
pub fn load_certified_key(
    tls: &TlsConfig,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, ServerError> {
    let certs = load_certs("TLS certificate", &tls.cert)?;
    if let Some(leaf) = certs.first() {
        check_validity(leaf, &tls.cert)?;
    }
    let key = load_key(&tls.key)?;
    let ck = CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        // rustls names these by their variant (`KeyMismatch`): said in words.
        let why = match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "the certificate holds another public key (a key and certificate from \
                 different pairs)"
                    .to_owned()
            }
            other => other.to_string(),
        };
        ServerError::Tls(format!(
            "TLS key {} does not fit certificate {}: {why}",
            tls.key.display(),
            tls.cert.display()
        ))
    })?;
    Ok(Arc::new(ck))
}

/// Refuses a leaf certificate outside its validity period: every client would refuse it
/// anyway, and at a reload the certificate in service is better kept.
fn check_validity(leaf: &CertificateDer<'_>, path: &std::path::Path) -> Result<(), ServerError> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Ok(()); // rustls judges the encoding
    };
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(ServerError::Tls(format!(
            "TLS certificate {} expired on {}",
            path.display(),
            validity.not_after
        )));
    }
    if now < validity.not_before {
        return Err(ServerError::Tls(format!(
            "TLS certificate {} is not valid before {}",
            path.display(),
            validity.not_before
        )));
    }
    Ok(())
}

/// The server certificate, replaceable while connections are served (SIGHUP).
#[derive(Debug)]
pub struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl CertSlot {
    /// A slot holding `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self(RwLock::new(key))
    }

    /// Swaps in a new certificate; handshakes already under way keep the old one.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Builds the rustls server configuration.
///
/// # Errors
///
/// [`ServerError::Tls`] or [`ServerError::File`] naming the file at fault.
pub fn server_config(tls: &TlsConfig, cert: Arc<CertSlot>) -> Result<ServerConfig, ServerError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ServerError::Tls(format!("protocol versions: {e}")))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            // Whoever can add a CA here can present a certificate for any mapped service.
            crate::trusted::check(ca, "TLS client CA")?;
            for c in load_certs("TLS client CA", ca)? {
                roots.add(c).map_err(|e| {
                    ServerError::Tls(format!("TLS client CA {}: {e}", ca.display()))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match tls.client_auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| ServerError::Tls(format!("TLS client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The DNS-name and URI subject alternative names of a (verified) certificate, as text.
/// A certificate that does not parse yields none. The two kinds never share a text, so a
/// `[[auth.mtls]] san` maps one kind only: a DNS name has neither `:` nor `/` (one that does
/// is dropped), a URI always has its scheme's `:` (one without is dropped). A CA that vets
/// URIs but not DNS names cannot then be used to claim a URI's identity through a DNS name.
pub fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(s) if !s.contains([':', '/']) => Some(dns_san_key(s)),
            GeneralName::URI(s) if s.contains(':') => Some((*s).to_owned()),
            _ => None,
        })
        .collect()
}

/// A DNS name as `[[auth.mtls]] san` entries and certificates are matched: DNS names are
/// case-insensitive (RFC 4343) and `svc.example.` is `svc.example`, so a certificate whose CA
/// spells the name otherwise is not refused as unknown.
pub(crate) fn dns_san_key(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// A client TLS configuration (ring, TLS 1.2 and 1.3) trusting `ca_pem` alone when given,
/// else the system's CA certificates. For the HTTPS clients Strongroom runs itself: the JWKS
/// fetcher and the `strongroom credential` client. `what` names the caller in errors.
///
/// # Errors
///
/// A one-line message: invalid or empty PEM, no system CA certificates.
pub fn client_config(ca_pem: Option<&[u8]>, what: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{what} is not valid PEM: {}", pem_problem(&e)))?;
            if certs.is_empty() {
                return Err(format!("{what} holds no certificate"));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{what} holds an unusable certificate: {e}"))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(format!("no system CA certificates found; set {what}"));
            }
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{what}: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
