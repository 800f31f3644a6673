//! Which service may do what to which credentials: deny by default.
//!
//! ```toml
//! # policy.toml
//! [[rule]]
//! service = "billing-worker"          # the service principal's name
//! operations = ["reveal", "broker"]   # write | reveal | broker
//! credentials = ["zoom.*", "stripe.secret"]   # globs over credential names (`*`, `?`)
//! owners = ["*"]                      # globs over owner ids (default: every owner)
//! delegated = true                    # also require the owner's user token
//!                                     # (X-Strongroom-On-Behalf-Of); default false
//! destinations = ["api.zoom.us", "*.stripe.com"]   # where broker may call (required
//!                                     # with broker; "*" any host on 443, "*:*" anything)
//! ```
//!
//! A request is allowed when at least one rule names the service, the operation, a pattern
//! matching the credential name and one matching the owner. A brokered call also needs such
//! a rule whose `destinations` match its destination ([`Policy::allows_destination`]),
//! besides the credential version's own bound host. If every matching rule is
//! `delegated`, the service must act on behalf of that very owner. Policies are validated when
//! loaded; errors name the rule and field, so a typo stops the server at start instead of
//! silently denying.

use serde::Deserialize;

use crate::broker::{Destination, DestinationPattern};

/// An operation a service can be allowed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Store a new version on an owner's behalf.
    Write,
    /// Receive a value.
    Reveal,
    /// Have Strongroom make an outbound call with the value injected.
    Broker,
}

impl Operation {
    /// The name used in policy files and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Write => "write",
            Operation::Reveal => "reveal",
            Operation::Broker => "broker",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default, rename = "rule")]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    service: String,
    operations: Vec<Operation>,
    credentials: Vec<String>,
    #[serde(default = "every_owner")]
    owners: Vec<String>,
    #[serde(default)]
    delegated: bool,
    #[serde(default)]
    destinations: Option<Vec<String>>,
}

fn every_owner() -> Vec<String> {
    vec!["*".to_owned()]
}

/// One validated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The service it applies to.
    pub service: String,
    /// The operations it allows.
    pub operations: Vec<Operation>,
    /// Credential-name globs.
    pub credentials: Vec<Glob>,
    /// Owner-id globs.
    pub owners: Vec<Glob>,
    /// Whether the service must act on behalf of the owner.
    pub delegated: bool,
    /// Where `broker` may call (empty when the rule does not allow broker).
    pub destinations: Vec<DestinationPattern>,
}

/// A validated policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// The answer to "may this service do this?".
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Allowed only while acting on behalf of the owner (delegated mode), which it is not.
    NeedsDelegation,
    /// No rule allows it.
    Deny,
}

/// A policy file that does not validate. The message names the rule and the field.
#[derive(Debug, thiserror::Error)]
#[error("policy: {0}")]
pub struct PolicyError(String);

impl Policy {
    /// Parses and validates a policy file's text.
    ///
    /// # Errors
    ///
    /// [`PolicyError`] naming the first problem (TOML syntax, unknown field or operation,
    /// empty list, malformed glob).
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError(e.to_string()))?;
        let mut rules = Vec::with_capacity(file.rules.len());
        for (i, r) in file.rules.into_iter().enumerate() {
            let at =
                |field: &str, msg: &str| PolicyError(format!("rule {} ({field}): {msg}", i + 1));
            if r.service.is_empty() || r.service.len() > 128 {
                return Err(at("service", "must be 1 to 128 characters"));
            }
            if r.operations.is_empty() {
                return Err(at(
                    "operations",
                    "must list at least one of write, reveal, broker",
                ));
            }
            if r.credentials.is_empty() {
                return Err(at("credentials", "must list at least one name pattern"));
            }
            if r.owners.is_empty() {
                return Err(at(
                    "owners",
                    "must list at least one owner pattern (\"*\" for all)",
                ));
            }
            let credentials = r
                .credentials
                .iter()
                .map(|p| Glob::credential_pattern(p).map_err(|m| at("credentials", &m)))
                .collect::<Result<_, _>>()?;
            let owners = r
                .owners
                .iter()
                .map(|p| Glob::owner_pattern(p).map_err(|m| at("owners", &m)))
                .collect::<Result<_, _>>()?;
            let brokers = r.operations.contains(&Operation::Broker);
            let destinations = match (brokers, r.destinations) {
                (true, None) => {
                    return Err(at(
                        "destinations",
                        "a rule allowing broker must list the destinations it may call, e.g. [\"api.zoom.us\", \"*.stripe.com\"] (\"*\": any host on port 443)",
                    ))
                }
                (true, Some(d)) if d.is_empty() => {
                    return Err(at("destinations", "must list at least one destination"))
                }
                (false, Some(_)) => {
                    return Err(at("destinations", "is only used with the broker operation"))
                }
                (true, Some(d)) => d
                    .iter()
                    .map(|p| DestinationPattern::parse(p).map_err(|m| at("destinations", &m)))
                    .collect::<Result<_, _>>()?,
                (false, None) => Vec::new(),
            };
            rules.push(Rule {
                service: r.service,
                operations: r.operations,
                credentials,
                owners,
                delegated: r.delegated,
                destinations,
            });
        }
        Ok(Self { rules })
    }

    /// A policy with the given rules (already validated globs).
    pub fn from_rules(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    /// The `--dev` policy: service `service` may write, reveal and broker any credential of
    /// any owner, brokering to any destination (`*:*`; each version's bound host still
    /// applies).
    pub fn dev(service: &str) -> Self {
        Self {
            rules: vec![Rule {
                service: service.to_owned(),
                operations: vec![Operation::Write, Operation::Reveal, Operation::Broker],
                credentials: vec![Glob("*".into())],
                owners: vec![Glob("*".into())],
                delegated: false,
                destinations: vec![DestinationPattern::any()],
            }],
        }
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// May `service` do `op` on `owner`'s credential `name`? `on_behalf_of` is the user the
    /// service proved it acts for (a verified user token), if any.
    pub fn decide(
        &self,
        service: &str,
        op: Operation,
        owner: &str,
        name: &str,
        on_behalf_of: Option<&str>,
    ) -> Decision {
        let mut needs_delegation = false;
        for rule in &self.rules {
            if rule.service != service
                || !rule.operations.contains(&op)
                || !rule.credentials.iter().any(|g| g.matches(name))
                || !rule.owners.iter().any(|g| g.matches(owner))
            {
                continue;
            }
            if !rule.delegated || on_behalf_of == Some(owner) {
                return Decision::Allow;
            }
            needs_delegation = true;
        }
        if needs_delegation {
            Decision::NeedsDelegation
        } else {
            Decision::Deny
        }
    }
}

impl Policy {
    /// May `service` broker `owner`'s credential `name` to `dest`? True when a rule that
    /// allows the brokered use (see [`Policy::decide`]) lists a matching destination.
    pub fn allows_destination(
        &self,
        service: &str,
        owner: &str,
        name: &str,
        on_behalf_of: Option<&str>,
        dest: &Destination,
    ) -> bool {
        self.rules.iter().any(|rule| {
            rule.service == service
                && rule.operations.contains(&Operation::Broker)
                && rule.credentials.iter().any(|g| g.matches(name))
                && rule.owners.iter().any(|g| g.matches(owner))
                && (!rule.delegated || on_behalf_of == Some(owner))
                && rule.destinations.iter().any(|d| d.matches(dest))
        })
    }
}

/// A glob with `*` (any run of characters) and `?` (one character).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    fn credential_pattern(p: &str) -> Result<Self, String> {
        let ok = !p.is_empty()
            && p.len() <= 128
            && p.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'-' | b'*' | b'?')
            });
        if ok {
            Ok(Self(p.to_owned()))
        } else {
            Err(format!(
                "{p:?} is not a name pattern ([a-z0-9._-] plus * and ?)"
            ))
        }
    }

    fn owner_pattern(p: &str) -> Result<Self, String> {
        if p.is_empty() || p.len() > 255 {
            Err("owner patterns must be 1 to 255 bytes".into())
        } else {
            Ok(Self(p.to_owned()))
        }
    }

    /// Whether `text` matches. Linear-time (no backtracking blow-up on many `*`).
    pub fn matches(&self, text: &str) -> bool {
        let (p, t): (Vec<char>, Vec<char>) = (self.0.chars().collect(), text.chars().collect());
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            // A `*` in the pattern is a wildcard even where the text holds a `*` (an owner id
            // may): taken as a literal first, `tenant-a:*` refused `tenant-a:*x`.
            if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ti));
                pi += 1;
            } else if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
                pi += 1;
                ti += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|c| *c == '*')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        [[rule]]
        service = "billing"
        operations = ["reveal"]
        credentials = ["zoom.*", "stripe.secret"]

        [[rule]]
        service = "assistant"
        operations = ["reveal", "write"]
        credentials = ["*"]
        owners = ["tenant-a:*"]
        delegated = true

        [[rule]]
        service = "billing"
        operations = ["broker"]
        credentials = ["zoom.*"]
        destinations = ["api.zoom.us", "*.zoom.us:8443"]
    "#;

    #[test]
    fn globs() {
        let g = |p: &str| Glob(p.into());
        assert!(g("zoom.*").matches("zoom.api-key"));
        assert!(g("zoom.*").matches("zoom."));
        assert!(!g("zoom.*").matches("zoomx"));
        assert!(!g("zoom.*").matches("slack.zoom.key"));
        assert!(g("*.key").matches("a.b.key"));
        assert!(g("a?c").matches("abc") && !g("a?c").matches("ac"));
        assert!(g("*").matches("") && g("*").matches("anything"));
        assert!(!g("abc").matches("abcd") && !g("abcd").matches("abc"));
        assert!(g("*a*a*a*a*b").matches(&format!("{}b", "a".repeat(200))));
        assert!(!g("*a*a*a*a*b").matches(&"a".repeat(5000)));
        // A `*` in the text (owner ids may hold one) is matched by the pattern's wildcard.
        assert!(g("tenant-a:*").matches("tenant-a:*x"));
        assert!(g("tenant-a:*").matches("tenant-a:*"));
        assert!(g("a*c").matches("a*c") && g("a*c").matches("a**c"));
        assert!(!g("tenant-a:*").matches("tenant-b:*x"));
    }

    #[test]
    fn deny_by_default_and_rules_allow_exactly_what_they_say() {
        let p = Policy::from_toml(EXAMPLE).unwrap();
        use Decision::*;
        assert_eq!(
            p.decide("billing", Operation::Reveal, "alice", "zoom.api-key", None),
            Allow
        );
        assert_eq!(
            p.decide("billing", Operation::Reveal, "alice", "stripe.secret", None),
            Allow
        );
        assert_eq!(
            p.decide(
                "billing",
                Operation::Reveal,
                "alice",
                "stripe.secret2",
                None
            ),
            Deny
        );
        assert_eq!(
            p.decide("billing", Operation::Write, "alice", "zoom.api-key", None),
            Deny
        );
        assert_eq!(
            p.decide("billing", Operation::Broker, "alice", "stripe.secret", None),
            Deny
        );
        assert_eq!(
            p.decide("unknown", Operation::Reveal, "alice", "zoom.api-key", None),
            Deny
        );
        assert_eq!(
            p.decide("Billing", Operation::Reveal, "alice", "zoom.api-key", None),
            Deny
        );
        assert_eq!(
            Policy::default().decide("billing", Operation::Reveal, "a", "b", None),
            Deny
        );
    }

    #[test]
    fn broker_destinations_come_from_the_allowing_rules() {
        let p = Policy::from_toml(EXAMPLE).unwrap();
        let d = |u: &str| Destination::of(&url::Url::parse(u).unwrap()).unwrap();
        let ok =
            |svc: &str, name: &str, u: &str| p.allows_destination(svc, "alice", name, None, &d(u));
        assert!(ok(
            "billing",
            "zoom.api-key",
            "https://api.zoom.us/v2/users"
        ));
        assert!(ok("billing", "zoom.api-key", "https://eu.zoom.us:8443/"));
        assert!(!ok("billing", "zoom.api-key", "https://eu.zoom.us/"));
        assert!(!ok("billing", "zoom.api-key", "https://zoom.us:8443/"));
        assert!(!ok("billing", "zoom.api-key", "https://api.zoom.us:444/"));
        assert!(!ok("billing", "zoom.api-key", "https://evil.example/"));
        assert!(!ok("billing", "stripe.secret", "https://api.zoom.us/"));
        assert!(!ok("assistant", "zoom.api-key", "https://api.zoom.us/"));
        let dev = Policy::dev("dev");
        assert!(dev.allows_destination("dev", "o", "n", None, &d("https://x.example:9/")));
        assert!(!dev.allows_destination("other", "o", "n", None, &d("https://x.example/")));
    }

    #[test]
    fn delegated_rules_need_the_owner_itself() {
        let p = Policy::from_toml(EXAMPLE).unwrap();
        use Decision::*;
        let (op, owner) = (Operation::Reveal, "tenant-a:u1");
        assert_eq!(p.decide("assistant", op, owner, "x", None), NeedsDelegation);
        assert_eq!(
            p.decide("assistant", op, owner, "x", Some("tenant-a:u2")),
            NeedsDelegation
        );
        assert_eq!(p.decide("assistant", op, owner, "x", Some(owner)), Allow);
        assert_eq!(
            p.decide("assistant", op, "tenant-b:u1", "x", Some("tenant-b:u1")),
            Deny
        );
    }

    #[test]
    fn invalid_policies_name_rule_and_field() {
        let cases = [
            (
                "[[rule]]\nservice='s'\noperations=['read']\ncredentials=['*']",
                "unknown variant",
            ),
            (
                "[[rule]]\nservice='s'\noperations=[]\ncredentials=['*']",
                "rule 1 (operations)",
            ),
            (
                "[[rule]]\nservice='s'\noperations=['reveal']\ncredentials=[]",
                "rule 1 (credentials)",
            ),
            (
                "[[rule]]\nservice='s'\noperations=['reveal']\ncredentials=['Zoom.*']",
                "rule 1 (credentials)",
            ),
            (
                "[[rule]]\nservice=''\noperations=['reveal']\ncredentials=['*']",
                "rule 1 (service)",
            ),
            (
                "[[rule]]\nservice='s'\noperations=['reveal']\ncredentials=['*']\nowner=['x']",
                "unknown field",
            ),
            (
                "[[rule]]\nservice='s'\noperations=['reveal']\ncredentials=['*']\nowners=[]",
                "rule 1 (owners)",
            ),
            ("[[rule]\n", "TOML"),
            (
                "[[rule]]\nservice='s'\noperations=['broker']\ncredentials=['*']",
                "rule 1 (destinations): a rule allowing broker must list",
            ),
            (
                "[[rule]]\nservice='s'\noperations=['broker']\ncredentials=['*']\ndestinations=[]",
                "rule 1 (destinations)",
            ),
            (
                "[[rule]]\nservice='s'\noperations=['reveal']\ncredentials=['*']\ndestinations=['*']",
                "rule 1 (destinations): is only used with the broker",
            ),
            (
                "[[rule]]\nservice='s'\noperations=['broker']\ncredentials=['*']\ndestinations=['https://x.example/']",
                "rule 1 (destinations)",
            ),
        ];
        for (text, want) in cases {
            let err = Policy::from_toml(text).unwrap_err().to_string();
            assert!(
                err.contains(want) || (want == "TOML" && err.starts_with("policy:")),
                "{text}: {err}"
            );
        }
        assert_eq!(Policy::from_toml("").unwrap().rules().len(), 0);
    }
}
