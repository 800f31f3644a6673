//! `strongroom fernet …`: Fernet tokens compatible with pyca/cryptography and
//! django-fernet-fields (FERNET_KEYS, FERNET_USE_HKDF).

use std::io::Read;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use strongroom_crypto::fernet::{FernetKey, MultiFernet};
use strongroom_crypto::{django, OsRandom};
use zeroize::Zeroizing;

use crate::error::CliError;
use crate::output::outln;

/// Largest token or plaintext read from stdin.
const MAX_INPUT: u64 = 16 << 20;

/// The key list, in MultiFernet order.
#[derive(Args, Debug)]
pub struct FernetKeys {
    /// A key, repeatable: the first encrypts, all are tried in order to decrypt (MultiFernet,
    /// like FERNET_KEYS). A urlsafe-base64 Fernet key, or with --django-hkdf any passphrase.
    /// Keys given here show in process listings: prefer --key-file on shared machines.
    // Hyphen values allowed: one urlsafe-base64 key in 64 starts with `-`.
    #[arg(long = "key", value_name = "KEY", allow_hyphen_values = true)]
    keys: Vec<super::SecretArg>,
    /// A file holding keys, one per line, appended after any --key.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Derive each key as django-fernet-fields does with FERNET_USE_HKDF=True (Django's
    /// default): HKDF-SHA256 with its fixed salt and info. Without it keys are used as-is.
    #[arg(long)]
    django_hkdf: bool,
}

#[derive(Subcommand, Debug)]
pub enum FernetCommand {
    /// Decrypt one token and write exactly the plaintext bytes to stdout (to a terminal:
    /// with a newline, and only text without control characters; redirect for the bytes).
    ///
    /// The token comes from the argument or, when absent, from stdin (surrounding whitespace
    /// is ignored; the token itself must be canonical urlsafe base64 with padding). An invalid
    /// or expired token, or one no key opens, exits 1 with one line on stderr and nothing on
    /// stdout.
    #[command(
        after_help = "Examples:\n  strongroom fernet decrypt --key \"$FERNET_KEY\" gAAAAAB...\n  \
        psql -Atc 'select enc_col from app_secret' | head -1 | strongroom fernet decrypt --django-hkdf --key-file keys.txt"
    )]
    Decrypt {
        #[command(flatten)]
        keys: FernetKeys,
        /// Reject tokens older than this many seconds (and more than 60 s in the future).
        /// Without it no time check is made, as django-fernet-fields does.
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// Evaluate --ttl as of this Unix time instead of now (tests, forensics).
        #[arg(long, value_name = "UNIX_TIME")]
        at: Option<u64>,
        /// The token; read from stdin when absent.
        token: Option<String>,
    },
    /// Encrypt stdin (all of it, byte for byte) with the first key and print the token.
    #[command(
        after_help = "Example:\n  printf %s 'the value' | strongroom fernet encrypt --django-hkdf --key-file keys.txt"
    )]
    Encrypt {
        #[command(flatten)]
        keys: FernetKeys,
    },
    /// Print a new random Fernet key (urlsafe base64 of 32 bytes).
    GenerateKey,
}

pub fn run(cmd: FernetCommand) -> Result<(), CliError> {
    match cmd {
        FernetCommand::Decrypt {
            keys,
            ttl,
            at,
            token,
        } => {
            let fernet = build(&keys)?;
            let token = match token {
                Some(t) => Zeroizing::new(t),
                None => {
                    let bytes = read_stdin()?;
                    Zeroizing::new(String::from_utf8(bytes.to_vec()).map_err(|_| {
                        CliError::Fernet(strongroom_crypto::fernet::FernetError::Malformed)
                    })?)
                }
            };
            let now = at.unwrap_or_else(now_unix);
            let plaintext = fernet.decrypt(token.trim_ascii(), ttl, now)?;
            crate::output::write_value(plaintext.expose_secret())?;
        }
        FernetCommand::Encrypt { keys } => {
            let fernet = build(&keys)?;
            let plaintext = read_stdin()?;
            let token = fernet.encrypt(&plaintext, now_unix(), &OsRandom)?;
            outln!("{token}")?;
        }
        FernetCommand::GenerateKey => {
            let key = FernetKey::generate(&OsRandom)?;
            outln!("{}", secrecy::ExposeSecret::expose_secret(&key.to_base64()))?;
        }
    }
    Ok(())
}

fn build(keys: &FernetKeys) -> Result<MultiFernet, CliError> {
    let mut all: Vec<Zeroizing<String>> = keys.keys.iter().map(|k| k.expose().clone()).collect();
    if let Some(path) = &keys.key_file {
        super::warn_if_readable_by_others(path, "--key-file");
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(CliError::io("reading --key-file"))?,
        );
        all.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| Zeroizing::new(l.to_owned())),
        );
    }
    if all.is_empty() {
        return Err(CliError::Usage(
            "give at least one --key or a --key-file".into(),
        ));
    }
    let refs: Vec<&str> = all.iter().map(|k| k.as_str()).collect();
    Ok(django::keys_from_strings(&refs, keys.django_hkdf)?)
}

fn read_stdin() -> Result<Zeroizing<Vec<u8>>, CliError> {
    let mut buf = Zeroizing::new(Vec::new());
    std::io::stdin()
        .lock()
        .take(MAX_INPUT + 1)
        .read_to_end(&mut buf)
        .map_err(CliError::io("reading stdin"))?;
    if buf.len() as u64 > MAX_INPUT {
        return Err(CliError::Usage(format!(
            "input larger than {MAX_INPUT} bytes"
        )));
    }
    Ok(buf)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
