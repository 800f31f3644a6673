//! `strongroom token …`: user tokens for the dev server.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use strongroom_server::config::DEFAULT_DATA_DIR;
use strongroom_server::dev;

use super::Failure;
use crate::error::CliError;
use crate::output::outln;

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a user token (JWT) that the `serve --dev` server of DATA_DIR accepts.
    ///
    /// The token is signed (HS256) with DATA_DIR/dev-jwt-secret, which `serve --dev` creates
    /// on its first start; its `sub` is SUBJECT (the owner id), `iss` strongroom-dev, `aud`
    /// strongroom. Production user tokens come from your identity provider, never from here.
    ///
    /// Example: `curl --cacert DATA_DIR/tls/ca.pem -H "Authorization: Bearer $(strongroom
    /// token mint --dev bob)" https://127.0.0.1:8443/v1/me/credentials`
    Mint(MintArgs),
}

/// `token mint` options.
#[derive(Args, Debug)]
pub struct MintArgs {
    /// Mint for the dev server (required: the only kind of token this command makes).
    #[arg(long)]
    dev: bool,
    /// Data directory of the dev server.
    #[arg(
        long,
        value_name = "DIR",
        env = "STRONGROOM_DATA_DIR",
        default_value = DEFAULT_DATA_DIR
    )]
    data_dir: PathBuf,
    /// Lifetime in seconds (at most 30 days).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    ttl: u64,
    /// The user (owner id) the token is for: its `sub` claim.
    #[arg(value_name = "SUBJECT")]
    subject: String,
}

pub fn run(cmd: TokenCommand) -> Result<(), Failure> {
    match cmd {
        TokenCommand::Mint(args) => {
            if !args.dev {
                return Err(CliError::Usage(
                    "`token mint` needs --dev: it only makes tokens for the dev server; \
                     production user tokens come from your identity provider"
                        .into(),
                )
                .into());
            }
            // Bad arguments are usage errors (exit 2), as clap's own are.
            if args.ttl == 0 || args.ttl > dev::MAX_TOKEN_TTL.as_secs() {
                return Err(CliError::Usage(format!(
                    "--ttl must be 1 to {} seconds (30 days)",
                    dev::MAX_TOKEN_TTL.as_secs()
                ))
                .into());
            }
            if !strongroom_crypto::binding::is_valid_owner(&args.subject) {
                return Err(CliError::Usage(
                    "SUBJECT (the owner id) must be 1 to 255 bytes without control characters"
                        .into(),
                )
                .into());
            }
            let token =
                dev::mint_user_token(&args.data_dir, &args.subject, Duration::from_secs(args.ttl))?;
            outln!("{}", token.as_str())?;
            Ok(())
        }
    }
}
