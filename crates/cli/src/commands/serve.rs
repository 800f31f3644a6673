//! `strongroom serve`: the HTTPS server, from a configuration file or in `--dev` mode.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use strongroom_server::config::{Config, Overrides, DEFAULT_DATA_DIR};
use strongroom_server::dev::{self, DevOptions, DEV_LISTEN};
use strongroom_server::{logging, Server, ServerError};

use super::Failure;
use crate::error::CliError;

/// Lifetime of the user token `serve --dev` prints.
const DEV_USER_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// The user the printed token and curl commands are for.
const DEV_USER: &str = "alice";

/// `strongroom serve` options.
#[derive(Args, Debug)]
#[command(after_long_help = "\
Production: `strongroom serve --config /etc/strongroom/strongroom.toml`. Every key of the file \
can also come from the environment: STRONGROOM_LISTEN, STRONGROOM_DATA_DIR, \
STRONGROOM_LIMITS__MAX_CONNECTIONS, STRONGROOM_AUTH__JWT__ISSUER, ... (`__` between levels); \
strongroom.example.toml lists every key. Without --config the environment alone configures the \
server.

Development: `strongroom serve --dev` needs nothing else. It creates ./strongroom-data (or \
--data-dir) with a SQLite store, a keyring, a dev CA and a certificate it signs for localhost and \
127.0.0.1, a JWT secret and dev tokens (all mode 0600, reused on restart), listens on \
127.0.0.1:8443, and prints the tokens and curl commands to try it.

Signals: SIGTERM or SIGINT stop accepting and let in-flight requests finish (exit status 0); \
SIGHUP reloads the policy file, the keyring, the TLS certificate, the authentication settings \
([auth]) and the brokered-call settings ([broker]) of the configuration, read again with the files \
they name; an invalid one is refused and the previous settings stay. Logs go to stderr (JSON, or text in --dev); the --dev instructions go to \
stdout.")]
pub struct ServeArgs {
    /// Configuration file (TOML); STRONGROOM_* environment variables override its keys.
    #[arg(long, value_name = "FILE", env = "STRONGROOM_CONFIG")]
    config: Option<PathBuf>,
    /// Zero-configuration development server: SQLite, a local keyring, a dev TLS
    /// certificate and dev tokens under the data directory. Not for production.
    #[arg(long)]
    dev: bool,
    /// Address and port to listen on [default: 127.0.0.1:8443, or the config's `listen`].
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./strongroom-data, or the config's `data_dir`].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// With --dev: use this admin token (16+ characters, no spaces) instead of the generated
    /// one.
    #[arg(long, value_name = "TOKEN")]
    dev_admin_token: Option<super::SecretArg>,
    /// With --dev: use this token (16+ characters, no spaces) for the service `dev-service`
    /// instead of the generated one.
    #[arg(long, value_name = "TOKEN")]
    dev_service_token: Option<super::SecretArg>,
}

/// An IP address and port; says so for a host name, which is not resolved.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "expected an IP address and port such as 127.0.0.1:8443, 0.0.0.0:8443 or [::1]:8443 \
             (host names are not resolved), not {text:?}"
        )
    })
}

pub fn run(args: ServeArgs) -> Result<(), Failure> {
    if args.dev && args.config.is_some() {
        // Said apart from clap's own conflict message, which blamed a `--config` never typed.
        let from_env = std::env::var_os("STRONGROOM_CONFIG").is_some_and(|v| !v.is_empty());
        return Err(CliError::Usage(if from_env {
            "--dev takes no configuration file, but STRONGROOM_CONFIG is set in the \
             environment: unset it, or serve that file with `serve --config`"
                .into()
        } else {
            "--dev and --config exclude each other: --dev makes its own configuration".into()
        })
        .into());
    }
    // clap's `requires = "dev"` holds for a flag with a default value, so it never fired: a
    // token given without --dev was silently ignored.
    if !args.dev && (args.dev_admin_token.is_some() || args.dev_service_token.is_some()) {
        return Err(CliError::Usage(
            "--dev-admin-token and --dev-service-token apply to `serve --dev` only; with \
             --config, name tokens by their SHA-256 in [[auth.admin]] and [[auth.service]]"
                .into(),
        )
        .into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("strongroom")
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    let result = runtime.block_on(async move {
        if args.dev {
            serve_dev(args).await
        } else {
            serve_config(args).await
        }
    });
    // Connections cut at the end of the grace period may leave tasks behind: don't wait.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve_config(args: ServeArgs) -> Result<(), Failure> {
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        ..Overrides::default()
    };
    super::warn_environment_overrides(args.config.as_deref());
    let config = Config::load(args.config.as_deref(), &overrides)?;
    // Held while the server runs; dropped, it writes out the lines still queued.
    let _log = logging::init(&config.log)
        .map_err(|e| ServerError::Config(format!("key `log.level`: {e}")))?;
    let sqlite_dir = (config.store.kind == strongroom_server::config::StoreKind::Sqlite)
        .then(|| config.data_dir.clone());
    let server = Server::start(config).await?;
    if let Some(dir) = sqlite_dir {
        // So that `serve --dev` never takes this store over with its all-powerful tokens.
        dev::mark_served_by_config(&dir);
    }
    // SIGHUP reads the file and the environment again for the [auth] settings.
    server
        .reloader()
        .set_config_file(args.config.clone(), overrides);
    server.run_until_signal().await?;
    Ok(())
}

fn env_or<T: std::str::FromStr>(flag: Option<T>, var: &str, default: &str) -> Result<T, Failure>
where
    T::Err: std::fmt::Display,
{
    if let Some(v) = flag {
        return Ok(v);
    }
    let (text, from) = match std::env::var(var) {
        Ok(v) if !v.is_empty() => (v, var),
        _ => (default.to_owned(), "default"),
    };
    text.parse()
        .map_err(|e| Failure::Cli(CliError::Usage(format!("{from} {text:?}: {e}"))))
}

async fn serve_dev(args: ServeArgs) -> Result<(), Failure> {
    let listen: SocketAddr = env_or(args.listen, "STRONGROOM_LISTEN", DEV_LISTEN)?;
    let data_dir: PathBuf = env_or(args.data_dir, "STRONGROOM_DATA_DIR", DEFAULT_DATA_DIR)?;
    let options = DevOptions {
        data_dir,
        listen,
        admin_token: args.dev_admin_token.map(|t| t.expose().clone()),
        service_token: args.dev_service_token.map(|t| t.expose().clone()),
    };
    if !listen.ip().to_canonical().is_loopback() {
        crate::output::errln!(
            "strongroom: warning: --dev listens on {listen}, reachable from other hosts, with \
             printed tokens that reach every credential; use it on 127.0.0.1 or ::1 only"
        );
    }
    // A port already taken fails before the data folder, its keyring and tokens are made
    // (a mistyped second start left a new folder behind).
    std::net::TcpListener::bind(listen).map_err(|source| ServerError::Bind {
        addr: listen,
        source,
    })?;
    let setup = dev::bootstrap(&options)?;
    let config = setup.config(listen)?;
    // Held while the server runs; dropped, it writes out the lines still queued.
    let _log = logging::init(&config.log)
        .map_err(|e| ServerError::Config(format!("key `log.level`: {e}")))?;
    let server = Server::start_with_policy(config, dev::policy()).await?;
    let user_token = dev::mint_user_token(&setup.data_dir, DEV_USER, DEV_USER_TOKEN_TTL)?;
    let banner = dev::banner(&setup, server.local_addr(), &user_token, DEV_USER);
    {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the server.
        let _ = writeln!(out, "{banner}");
        let _ = out.flush();
    }
    server.run_until_signal().await?;
    Ok(())
}
