//! Destinations (`https://host:port`) and the patterns that allow them.

use std::fmt;
use std::net::IpAddr;

/// Where a brokered call goes: always `https`, a normalized host (lower-case, IDNA as
/// punycode, IP literals in canonical form) and a port (443 when the URL names none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The host as a URL shows it (`api.zoom.us`, `127.0.0.1`, `[::1]`).
    host: String,
    /// The host as an IP address, when the URL names one.
    ip: Option<IpAddr>,
    port: u16,
}

impl Destination {
    /// The destination of an `https` URL (the caller checked the scheme).
    pub(crate) fn of(url: &url::Url) -> Option<Self> {
        let (host, ip) = match url.host()? {
            url::Host::Domain(d) => (d.to_ascii_lowercase(), None),
            url::Host::Ipv4(a) => (a.to_string(), Some(IpAddr::V4(a))),
            url::Host::Ipv6(a) => (format!("[{a}]"), Some(IpAddr::V6(a))),
        };
        Some(Self {
            host,
            ip,
            port: url.port_or_known_default()?,
        })
    }

    /// The host (`[...]` around IPv6 addresses).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host without IPv6 brackets (for DNS and the TLS server name).
    pub(crate) fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Destination {
    /// `https://host:port`: what the audit record keeps (never a path or query).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}:{}", self.host, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// `*.example.com`: any name below `example.com` (not `example.com` itself); holds
    /// `.example.com`.
    Subdomains(String),
    Exact(String),
}

/// A destination pattern, in policy rules (`destinations`) and in a version's bound host
/// (`metadata.host`):
///
/// * `api.zoom.us` — that host, port 443 only;
/// * `api.zoom.us:8443` — that host and port;
/// * `*.stripe.com` — any name below `stripe.com` (not `stripe.com` itself), port 443;
/// * `host:*` — any port; `*` — any host on port 443; `*:*` — anything;
/// * IP literals: `127.0.0.1:8443`, `[::1]:8443`.
///
/// Host names compare after normalization (lower case, IDNA as punycode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationPattern {
    host: HostPattern,
    /// `None`: any port.
    port: Option<u16>,
    text: String,
}

impl DestinationPattern {
    /// Parses a pattern; the error says what is wrong (never echoing more than the pattern).
    ///
    /// # Errors
    ///
    /// A message for a malformed pattern.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{text:?} is not a destination: use host, host:port, host:*, *.domain or * (no scheme or path)"
            )
        };
        if text.is_empty() || text.len() > 300 || text.contains(['/', '@', '?', '#', ' ']) {
            return Err(bad());
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => Some("443"),
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            (format!("[{h}]"), port)
        } else {
            match text.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (text.to_owned(), Some("443")),
            }
        };
        let port = match port {
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
            None => None,
        };
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            match url::Host::parse(suffix) {
                Ok(url::Host::Domain(d)) if is_dns_name(&d) && d.contains('.') => {
                    HostPattern::Subdomains(format!(".{}", d.to_ascii_lowercase()))
                }
                _ => return Err(bad()),
            }
        } else {
            match url::Host::parse(&host) {
                Ok(url::Host::Domain(d)) if is_dns_name(&d) => {
                    HostPattern::Exact(d.to_ascii_lowercase())
                }
                Ok(url::Host::Domain(_)) | Err(_) => return Err(bad()),
                Ok(url::Host::Ipv4(a)) => HostPattern::Exact(a.to_string()),
                Ok(url::Host::Ipv6(a)) => HostPattern::Exact(format!("[{a}]")),
            }
        };
        Ok(Self {
            host,
            port,
            text: text.to_owned(),
        })
    }

    /// `*:*`: every destination (the `--dev` policy).
    pub fn any() -> Self {
        Self {
            host: HostPattern::Any,
            port: None,
            text: "*:*".to_owned(),
        }
    }

    /// Whether `dest` matches.
    pub fn matches(&self, dest: &Destination) -> bool {
        if self.port.is_some_and(|p| p != dest.port) {
            return false;
        }
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(h) => *h == dest.host,
            HostPattern::Subdomains(suffix) => {
                dest.ip.is_none() && dest.host.len() > suffix.len() && dest.host.ends_with(suffix)
            }
        }
    }
}

/// Whether `name` (already IDNA-normalized) is a DNS name a URL can reach: labels of 1 to 63
/// characters, 253 in all, no `*`. The URL parser accepts `a..b`, a trailing dot or a
/// 300-character name, which no destination would ever match: refused where they are
/// written (a policy, a version's `metadata.host`) instead.
fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && !name.contains('*')
        && name.split('.').all(|label| (1..=63).contains(&label.len()))
}

impl fmt::Display for DestinationPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(url: &str) -> Destination {
        Destination::of(&url::Url::parse(url).unwrap()).unwrap()
    }

    #[test]
    fn patterns_match_host_and_port_exactly() {
        let p = |t: &str| DestinationPattern::parse(t).unwrap();
        assert!(p("api.zoom.us").matches(&dest("https://API.Zoom.us/v2")));
        assert!(!p("api.zoom.us").matches(&dest("https://api.zoom.us:8443/")));
        assert!(p("api.zoom.us:8443").matches(&dest("https://api.zoom.us:8443/")));
        assert!(p("api.zoom.us:*").matches(&dest("https://api.zoom.us:8443/")));
        assert!(!p("api.zoom.us").matches(&dest("https://api.zoom.us.evil.example/")));
        assert!(!p("api.zoom.us").matches(&dest("https://evilapi.zoom.us/")));
        assert!(p("*.stripe.com").matches(&dest("https://api.stripe.com/")));
        assert!(p("*.stripe.com").matches(&dest("https://a.b.stripe.com/")));
        assert!(!p("*.stripe.com").matches(&dest("https://stripe.com/")));
        assert!(!p("*.stripe.com").matches(&dest("https://evilstripe.com/")));
        assert!(!p("*.stripe.com").matches(&dest("https://stripe.com.evil.example/")));
        assert!(p("*").matches(&dest("https://anything.example/")));
        assert!(!p("*").matches(&dest("https://anything.example:444/")));
        assert!(p("*:*").matches(&dest("https://anything.example:444/")));
        assert!(p("127.0.0.1:*").matches(&dest("https://127.0.0.1:9/")));
        // The URL parser normalizes odd IPv4 spellings before matching.
        assert!(p("127.0.0.1:*").matches(&dest("https://0x7f.1:9/")));
        assert!(p("[::1]:8443").matches(&dest("https://[0:0::1]:8443/")));
        assert!(p("bücher.example").matches(&dest("https://xn--bcher-kva.example/")));
        let longest_label = format!("{}.example", "a".repeat(63));
        assert!(p(&longest_label).matches(&dest(&format!("https://{longest_label}/"))));
        for bad in [
            "",
            "https://api.zoom.us",
            "api.zoom.us/path",
            "user@api.zoom.us",
            "api.zoom.us:0",
            "api.zoom.us:99999",
            "*.com:x",
            "a*b.example",
            "*.com",
            "[::1",
            "a..b.example",
            "api.zoom.us.",
            ".api.zoom.us",
            "*.a..b.example",
            &format!("{}.example", "a".repeat(64)),
            &format!("{}example", "a.".repeat(125)),
        ] {
            assert!(DestinationPattern::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            dest("https://API.zoom.us/x?y").to_string(),
            "https://api.zoom.us:443"
        );
        assert_eq!(dest("https://[::1]:8/").to_string(), "https://[::1]:8");
    }
}
