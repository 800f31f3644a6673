//! `strongroom credential …`: a small client of a running server's `/v1` API.
//!
//! The bearer token comes from `STRONGROOM_TOKEN` or `--token-file`, never from the command
//! line (where `ps` would show it); a value to store comes from standard input. Only
//! `reveal` (a service token) ever prints a value: its exact bytes to a pipe or a file, and
//! to a terminal only a value without control characters.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use super::Failure;
use crate::error::CliError;
use crate::output::{errprint, outln};

/// Largest value read from standard input (the server's limit).
const MAX_VALUE_LEN: u64 = 64 * 1024;

/// Which server, and how to authenticate.
#[derive(Args, Debug)]
pub struct ClientOptions {
    /// Server base URL.
    #[arg(
        long,
        value_name = "URL",
        env = "STRONGROOM_SERVER",
        default_value = "https://127.0.0.1:8443"
    )]
    server: String,
    /// CA certificate (PEM) to trust for the server. [default: DATA_DIR/tls/ca.pem when it
    /// exists (the `serve --dev` layout), else the system's CA certificates]
    #[arg(long, value_name = "FILE", env = "STRONGROOM_CACERT")]
    cacert: Option<PathBuf>,
    /// Data directory of a `serve --dev` server, for its CA certificate.
    #[arg(
        long,
        value_name = "DIR",
        env = "STRONGROOM_DATA_DIR",
        default_value = "strongroom-data"
    )]
    data_dir: PathBuf,
    /// File holding the bearer token (a user JWT, or a service token for `put --owner` and
    /// `reveal`). [default: the STRONGROOM_TOKEN environment variable]
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum CredentialCommand {
    /// Store a new version; the value is read from standard input (one trailing newline is
    /// removed). Prints the new version.
    Put {
        #[command(flatten)]
        client: ClientOptions,
        /// Credential name, e.g. `zoom.api-key`.
        name: String,
        /// Non-secret metadata, a JSON object (e.g. '{"host": "api.zoom.us"}').
        #[arg(long, value_name = "JSON")]
        metadata: Option<String>,
        /// Check-and-set: fail with a conflict unless this is the current version (0: the
        /// credential must not exist yet).
        #[arg(long, value_name = "N")]
        expected_version: Option<u32>,
        /// Store on this owner's behalf (a service token; policy must allow `write`).
        #[arg(long, value_name = "OWNER")]
        owner: Option<String>,
    },
    /// List your credentials (names and metadata, never values), one page (100) at a time:
    /// follow `next_cursor` with --cursor, or take every page with --all.
    List {
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        paging: Paging,
    },
    /// Show one credential: its state and a page of its versions, newest first (never values).
    Show {
        #[command(flatten)]
        client: ClientOptions,
        /// Credential name.
        name: String,
        /// Start at this page of versions: the `versions_next_cursor` of the previous one.
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
        /// Versions per page, 1 to 1000 (the server's default is 100).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
    /// Choose the current version.
    Current {
        #[command(flatten)]
        client: ClientOptions,
        /// Credential name.
        name: String,
        /// The version to make current.
        #[arg(value_name = "VERSION")]
        chosen: u32,
    },
    /// Disable a credential (kill switch: nothing reveals it; every version is kept).
    Disable {
        #[command(flatten)]
        client: ClientOptions,
        /// Credential name.
        name: String,
    },
    /// Enable a disabled credential again.
    Enable {
        #[command(flatten)]
        client: ClientOptions,
        /// Credential name.
        name: String,
    },
    /// Destroy a credential, or one version of it (crypto-shredding: its data key is erased).
    Destroy {
        #[command(flatten)]
        client: ClientOptions,
        /// Credential name.
        name: String,
        /// Only this version.
        #[arg(long = "version", value_name = "N")]
        only: Option<u32>,
        /// Do not ask: destroying cannot be undone, so without --yes the command asks for
        /// the name on a terminal, and refuses elsewhere.
        #[arg(long)]
        yes: bool,
    },
    /// Who used a credential, when and how (from the audit log), newest first, a page at a
    /// time (--cursor, --all as for list).
    Usage {
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        paging: Paging,
        /// Credential name.
        name: String,
    },
    /// Check a value against the current version of your credential, never revealing it:
    /// prints `matches` or `does not match`.
    ///
    /// The value is read from standard input as `put` reads it (never from the command line;
    /// one trailing newline is removed). The server allows `limits.verify_per_minute` (30)
    /// calls per owner per minute; past that it answers 429 with the seconds to wait.
    #[command(after_help = "Exit status:\n  \
        0  matches\n  \
        1  does not match\n  \
        2  no answer: a usage error, no such credential, too many calls (429), the server \
        unreachable, ...\n\n\
        Example:\n  \
        STRONGROOM_TOKEN=$ALICE strongroom credential verify zoom.api-key < candidate.txt")]
    Verify {
        #[command(flatten)]
        client: ClientOptions,
        /// Credential name.
        name: String,
    },
    /// As a service: print an owner's credential value (where policy allows `reveal`): its
    /// exact bytes to a pipe or a file; to a terminal, only a value without control characters.
    ///
    /// To a pipe or a file (`$(...)`, `| cmd`, `> file`) the value's exact bytes are written,
    /// with no newline added. To a terminal the value is printed with a newline after it,
    /// unless it holds control characters (a newline, a tab, an escape sequence, ...), which
    /// the terminal would act on rather than show: then nothing is printed and the command
    /// fails, asking for standard output to be redirected to a file or a pipe. The value is
    /// never written anywhere else.
    #[command(
        disable_version_flag = true,
        after_help = "Examples:\n  \
        ZOOM_KEY=\"$(STRONGROOM_TOKEN=$SERVICE strongroom credential reveal alice zoom.api-key)\"\n  \
        STRONGROOM_TOKEN=$SERVICE strongroom credential reveal alice zoom.api-key > value.bin"
    )]
    Reveal {
        #[command(flatten)]
        client: ClientOptions,
        /// The owner.
        owner: String,
        /// Credential name.
        name: String,
        /// A version other than the current one.
        #[arg(long = "version", value_name = "N")]
        at: Option<u32>,
    },
}

/// Percent-encodes one path segment (owner ids are any UTF-8).
/// Which page(s) of a list to print.
#[derive(clap::Args, Debug)]
pub struct Paging {
    /// Start at this page: the `next_cursor` of the previous one.
    #[arg(long, value_name = "CURSOR", conflicts_with = "all")]
    cursor: Option<String>,
    /// Every page, printed as one `items` list.
    #[arg(long)]
    all: bool,
}

impl Paging {
    /// GETs `path` page by page as asked; with --all, one object holding every page's items.
    async fn fetch(&self, client: &Client, path: &str) -> Result<serde_json::Value, Failure> {
        let page = |cursor: Option<&str>| match cursor {
            Some(c) => format!("{path}?cursor={}", segment(c)),
            None => path.to_owned(),
        };
        let mut out = client
            .call(reqwest::Method::GET, &page(self.cursor.as_deref()), None)
            .await?;
        if !self.all {
            return Ok(out);
        }
        while let Some(next) = out["next_cursor"].as_str().map(str::to_owned) {
            let more = client
                .call(reqwest::Method::GET, &page(Some(&next)), None)
                .await?;
            let items = more["items"].as_array().cloned().unwrap_or_default();
            if let Some(all) = out["items"].as_array_mut() {
                all.extend(items);
            }
            out["next_cursor"] = more["next_cursor"].clone();
        }
        Ok(out)
    }
}

/// An owner id as a path segment. `.` and `..` are valid owner ids, but URL parsers (this
/// client's too) read them, escaped or not, as steps of the path: refused here with a
/// reason, not sent to the wrong route.
fn owner_segment(owner: &str) -> Result<String, CliError> {
    if owner == "." || owner == ".." {
        return Err(CliError::Usage(format!(
            "owner id '{owner}' cannot be sent in a URL path: URL parsers, this client's \
             included, read it as a step of the path; call the API with a client that sends \
             the path as it is (curl --path-as-is, with it written %2E)"
        )));
    }
    Ok(segment(owner))
}

fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: Zeroizing<String>,
}

impl Client {
    fn new(o: &ClientOptions) -> Result<Self, Failure> {
        let token = match &o.token_file {
            Some(path) => {
                super::warn_if_readable_by_others(path, "--token-file");
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    CliError::Usage(format!("cannot read {}: {e}", path.display()))
                })?);
                Zeroizing::new(text.trim().to_owned())
            }
            None => Zeroizing::new(std::env::var("STRONGROOM_TOKEN").unwrap_or_default()),
        };
        if token.is_empty() {
            return Err(CliError::Usage(
                "no token: set STRONGROOM_TOKEN or pass --token-file (`strongroom token mint \
                 --dev SUBJECT` prints a user token for a dev server)"
                    .into(),
            )
            .into());
        }
        // The server answers HTTPS only; say so here rather than as a client builder error.
        if !o.server.to_ascii_lowercase().starts_with("https://") {
            return Err(CliError::Usage(format!(
                "--server {}: Strongroom serves HTTPS only (https://HOST:PORT)",
                o.server
            ))
            .into());
        }
        let dev_ca = o.data_dir.join("tls/ca.pem");
        let ca = match &o.cacert {
            Some(path) => Some(path.clone()),
            None => dev_ca.exists().then_some(dev_ca),
        };
        let pem = ca
            .as_ref()
            .map(|p| {
                std::fs::read(p)
                    .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))
            })
            .transpose()?;
        let what = ca.as_ref().map_or_else(
            || "--cacert".to_owned(),
            |p| format!("--cacert {}", p.display()),
        );
        let tls = strongroom_server::tls::client_config(pem.as_deref(), &what)
            .map_err(CliError::Usage)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("strongroom-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Operation(format!("HTTPS client: {e}")))?;
        Ok(Self {
            http,
            base: o.server.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// Sends one request; returns the JSON body of a success, or the server's error as one
    /// line (`403 forbidden: …`).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, Failure> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.as_str());
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| {
            let mut msg = format!("cannot reach {}: {e}", self.base);
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            if msg.contains("UnknownIssuer") {
                msg.push_str(
                    " (the server's certificate is not trusted: for a `serve --dev` server, \
                     pass its --data-dir or set STRONGROOM_DATA_DIR, which holds tls/ca.pem; \
                     otherwise --cacert FILE)",
                );
            }
            CliError::Operation(msg)
        })?;
        let status = resp.status();
        // A server-side failure is found in the server's log and audit by this id; only the
        // server's own form (hex) is echoed.
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| {
                !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .map(str::to_owned);
        // Whole seconds only (the server's form); anything else is not echoed.
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CliError::Operation(format!("reading the response: {e}")))?;
        let json: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
        };
        if status.is_success() {
            return Ok(json);
        }
        let code = json["error"]["code"].as_str().unwrap_or("error");
        let message = json["error"]["message"].as_str().unwrap_or("");
        let mut line = format!("{} {code}: {message}", status.as_u16());
        if let (true, Some(id)) = (status.is_server_error(), &request_id) {
            line.push_str(&format!(
                " (request id {id}: the server's log and audit name it)"
            ));
        }
        // 429 (too many `verify` calls) and 503 say when to try again.
        if let Some(wait) = retry_after {
            line.push_str(&format!(
                " (Retry-After: {wait}: try again in {wait} seconds)"
            ));
        }
        Err(CliError::Operation(line).into())
    }
}

fn print_json(v: &serde_json::Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::Operation(format!("cannot encode JSON: {e}")))?;
    outln!("{text}")?;
    Ok(())
}

fn read_value() -> Result<Zeroizing<String>, Failure> {
    let mut raw = Zeroizing::new(Vec::new());
    std::io::stdin()
        .take(MAX_VALUE_LEN + 2)
        .read_to_end(&mut raw)
        .map_err(CliError::io("cannot read the value from standard input"))?;
    let mut end = raw.len();
    if raw[..end].ends_with(b"\n") {
        end -= 1;
        if raw[..end].ends_with(b"\r") {
            end -= 1;
        }
    }
    if end as u64 > MAX_VALUE_LEN {
        return Err(CliError::Usage("the value is larger than 64 KiB".into()).into());
    }
    if end == 0 {
        return Err(CliError::Usage("the value on standard input is empty".into()).into());
    }
    let text = std::str::from_utf8(&raw[..end])
        .map_err(|_| CliError::Usage("the value must be UTF-8 text".into()))?;
    Ok(Zeroizing::new(text.to_owned()))
}

pub fn run(cmd: CredentialCommand) -> Result<(), Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?
        .block_on(run_async(cmd))
}

async fn run_async(cmd: CredentialCommand) -> Result<(), Failure> {
    use reqwest::Method;
    let me = |name: &str| format!("/v1/me/credentials/{}", segment(name));
    match cmd {
        CredentialCommand::Put {
            client,
            name,
            metadata,
            expected_version,
            owner,
        } => {
            let c = Client::new(&client)?;
            let mut body = serde_json::json!({});
            if let Some(m) = metadata {
                let m: serde_json::Value = serde_json::from_str(&m)
                    .map_err(|e| CliError::Usage(format!("--metadata is not JSON: {e}")))?;
                body["metadata"] = m;
            }
            if let Some(v) = expected_version {
                body["expected_version"] = v.into();
            }
            let path = match &owner {
                Some(o) => format!(
                    "/v1/owners/{}/credentials/{}",
                    owner_segment(o)?,
                    segment(&name)
                ),
                None => me(&name),
            };
            // The value goes into the body last, in a buffer zeroized when dropped.
            let value = read_value()?;
            body["value"] = serde_json::Value::String(value.as_str().to_owned());
            let result = c.call(Method::PUT, &path, Some(&body)).await;
            if let Some(serde_json::Value::String(v)) = body.get_mut("value") {
                zeroize::Zeroize::zeroize(v);
            }
            let out = result?;
            outln!("{} version {}", name, out["version"])?;
        }
        CredentialCommand::List { client, paging } => {
            print_json(
                &paging
                    .fetch(&Client::new(&client)?, "/v1/me/credentials")
                    .await?,
            )?;
        }
        CredentialCommand::Show {
            client,
            name,
            cursor,
            limit,
        } => {
            let mut query = Vec::new();
            if let Some(c) = &cursor {
                query.push(format!("cursor={}", segment(c)));
            }
            if let Some(n) = limit {
                query.push(format!("limit={n}"));
            }
            let mut path = me(&name);
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            print_json(&Client::new(&client)?.call(Method::GET, &path, None).await?)?;
        }
        CredentialCommand::Current {
            client,
            name,
            chosen: version,
        } => {
            let path = format!("{}/current", me(&name));
            let body = serde_json::json!({ "version": version });
            Client::new(&client)?
                .call(Method::POST, &path, Some(&body))
                .await?;
            outln!("{name}: version {version} is current")?;
        }
        CredentialCommand::Disable { client, name } => {
            let path = format!("{}/disable", me(&name));
            Client::new(&client)?
                .call(Method::POST, &path, None)
                .await?;
            outln!("{name}: disabled")?;
        }
        CredentialCommand::Enable { client, name } => {
            let path = format!("{}/enable", me(&name));
            Client::new(&client)?
                .call(Method::POST, &path, None)
                .await?;
            outln!("{name}: enabled")?;
        }
        CredentialCommand::Destroy {
            client,
            name,
            only: version,
            yes,
        } => {
            if !yes {
                confirm_destroy(&name, version)?;
            }
            let path = match version {
                Some(v) => format!("{}/versions/{v}", me(&name)),
                None => me(&name),
            };
            Client::new(&client)?
                .call(Method::DELETE, &path, None)
                .await?;
            match version {
                Some(v) => outln!("{name}: version {v} destroyed")?,
                None => outln!("{name}: destroyed")?,
            }
        }
        CredentialCommand::Usage {
            client,
            paging,
            name,
        } => {
            let path = format!("{}/usage", me(&name));
            print_json(&paging.fetch(&Client::new(&client)?, &path).await?)?;
        }
        CredentialCommand::Verify { client, name } => {
            // Status 1 is the answer "does not match": any failure exits 2 instead.
            return verify(&client, &me(&name)).await.map_err(|e| {
                if e.is_quiet() {
                    e
                } else {
                    Failure::NoAnswer(Box::new(e))
                }
            });
        }
        CredentialCommand::Reveal {
            client,
            owner,
            name,
            at: version,
        } => {
            let path = format!(
                "/v1/owners/{}/credentials/{}/reveal",
                owner_segment(&owner)?,
                segment(&name)
            );
            let body = match version {
                Some(v) => serde_json::json!({ "version": v }),
                None => serde_json::json!({}),
            };
            let mut out = Client::new(&client)?
                .call(Method::POST, &path, Some(&body))
                .await?;
            let Some(serde_json::Value::String(v)) = out.get_mut("value") else {
                return Err(
                    CliError::Operation("the server's answer holds no value".into()).into(),
                );
            };
            let value = Zeroizing::new(std::mem::take(v));
            crate::output::write_value(value.as_bytes())?;
        }
    }
    Ok(())
}

/// `credential verify`: sends the value read from standard input to `{path}/verify`; prints
/// the answer, and fails with status 1 (quietly) when it does not match.
async fn verify(client: &ClientOptions, path: &str) -> Result<(), Failure> {
    let c = Client::new(client)?;
    let value = read_value()?;
    let mut body = serde_json::json!({ "value": value.as_str() });
    let result = c
        .call(
            reqwest::Method::POST,
            &format!("{path}/verify"),
            Some(&body),
        )
        .await;
    if let Some(serde_json::Value::String(v)) = body.get_mut("value") {
        zeroize::Zeroize::zeroize(v);
    }
    match result?["matches"].as_bool() {
        Some(true) => Ok(outln!("matches")?),
        Some(false) => {
            outln!("does not match")?;
            Err(CliError::Answer(1).into())
        }
        None => Err(CliError::Operation("the server's answer holds no `matches`".into()).into()),
    }
}

/// Asks for the credential's name on a terminal before an irreversible destroy; elsewhere
/// (a script, a pipe) refuses without `--yes`.
fn confirm_destroy(name: &str, version: Option<u32>) -> Result<(), Failure> {
    use std::io::{BufRead, IsTerminal};
    let what = match version {
        Some(v) => format!("version {v} of {name}"),
        None => format!("every version of {name}"),
    };
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(format!(
            "destroying {what} cannot be undone: add --yes to confirm"
        ))
        .into());
    }
    errprint!("Destroy {what}? Its data keys are erased; this cannot be undone. Type the name to confirm: ");
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(CliError::io("reading the confirmation"))?;
    if answer.trim() != name {
        return Err(CliError::Usage("not confirmed; nothing was destroyed".into()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ids_are_escaped_and_dot_segments_refused() {
        assert_eq!(owner_segment("alice").unwrap(), "alice");
        assert_eq!(owner_segment("a/b c").unwrap(), "a%2Fb%20c");
        assert_eq!(owner_segment("...").unwrap(), "...");
        for dots in [".", ".."] {
            match owner_segment(dots) {
                Err(CliError::Usage(m)) => assert!(m.contains("URL path"), "{m}"),
                other => panic!("{dots}: {other:?}"),
            }
        }
    }
}
