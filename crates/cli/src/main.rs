//! `strongroom`: the one binary. The HTTPS server (`serve`), operator commands (keys, token,
//! fernet); the client joins it as it lands.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod commands;
mod error;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keeps this process's memory out of core dumps and away from other processes of the same
/// user, before anything secret is in it: values, data keys, keyrings, Fernet keys and
/// tokens all pass through it, and a crash (a panic aborts) would otherwise write them to
/// disk, or to `systemd-coredump`'s store, which ignores `RLIMIT_CORE`. Not dumpable also
/// means that no process of the same user can attach a debugger or read `/proc/PID/mem`
/// (root still can). Swap is the operator's to disable or encrypt (SECURITY.md).
/// Both steps are taken whatever the other's outcome (a sandbox may refuse one); the first
/// error is returned.
fn protect_memory() -> std::io::Result<()> {
    use rustix::process::{set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};
    let not_dumpable = set_dumpable_behavior(DumpableBehavior::NotDumpable);
    let no_core = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    );
    not_dumpable?;
    no_core?;
    Ok(())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Strongroom keeps users' third-party credentials (API keys, passwords, tokens) encrypted,
/// bound to their owner, write-only for people and usable only by the services policy allows.
#[derive(Parser, Debug)]
#[command(name = "strongroom", version, max_term_width = 100)]
#[command(
    after_help = "Run `strongroom <COMMAND> --help` for each command's options and examples."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the HTTPS server: `--config FILE` for production, `--dev` to try it with zero
    /// configuration.
    Serve(commands::serve::ServeArgs),
    /// User tokens for the dev server (`token mint --dev SUBJECT`).
    #[command(subcommand)]
    Token(commands::token::TokenCommand),
    /// Manage the key-encryption keys (KEKs): generate, list, rotate, retire (the local
    /// keyring, or the KEK ring of a remote provider named by --config).
    #[command(subcommand)]
    Keys(commands::keys::KeysCommand),
    /// Fernet tokens, byte-compatible with pyca/cryptography and django-fernet-fields.
    #[command(subcommand)]
    Fernet(commands::fernet::FernetCommand),
    /// Re-wrap every stored data key under the active KEK, online and resumable (after
    /// `keys rotate`, or to move to another key provider).
    Rewrap(commands::rewrap::RewrapArgs),
    /// Import credentials from other systems (`import django-fernet-fields`).
    #[command(subcommand)]
    Import(commands::import::ImportCommand),
    /// The tamper-evident audit log: `verify` it, print its `head`, `export` it, `archive` its
    /// older part.
    #[command(subcommand)]
    Audit(commands::audit::AuditCommand),
    // Backup and Restore take their help from their arguments' documentation, which goes on
    // past the first paragraph.
    Backup(commands::backup::BackupArgs),
    Restore(commands::backup::RestoreArgs),
    /// A client of a running server: put, list, show, verify, current, disable, enable,
    /// destroy and usage of your credentials; reveal one as a service. The token comes from
    /// STRONGROOM_TOKEN or --token-file.
    #[command(
        subcommand,
        after_help = "Examples:\n  export STRONGROOM_SERVER=https://127.0.0.1:8443\n  \
        printf %s 'zoom-secret-123' | STRONGROOM_TOKEN=$ALICE strongroom credential put zoom.api-key\n  \
        STRONGROOM_TOKEN=$ALICE strongroom credential list --all\n  \
        STRONGROOM_TOKEN=$ALICE strongroom credential verify zoom.api-key < candidate.txt\n  \
        STRONGROOM_TOKEN=$SERVICE strongroom credential reveal alice zoom.api-key"
    )]
    Credential(commands::credential::CredentialCommand),
}

fn main() -> ExitCode {
    if let Err(e) = protect_memory() {
        eprintln!("strongroom: warning: could not keep this process out of core dumps: {e}");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => commands::serve::run(args),
        Command::Token(cmd) => commands::token::run(cmd),
        Command::Keys(cmd) => commands::keys::run(cmd),
        Command::Fernet(cmd) => commands::fernet::run(cmd).map_err(Into::into),
        Command::Rewrap(args) => commands::rewrap::run(args),
        Command::Import(cmd) => commands::import::run(cmd),
        Command::Audit(cmd) => commands::audit::run(cmd),
        Command::Backup(args) => commands::backup::run(args),
        Command::Restore(args) => commands::backup::run_restore(args),
        Command::Credential(cmd) => commands::credential::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is_quiet() => err.exit_code(),
        Err(err) => {
            // One line on stderr, never a secret (the error types' messages are built to
            // hold none).
            output::errln!("strongroom: error: {err}");
            err.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// The test process itself becomes undumpable: harmless, and what main does first.
    #[test]
    fn memory_is_kept_out_of_core_dumps() {
        use rustix::process::{dumpable_behavior, getrlimit, DumpableBehavior, Resource};
        super::protect_memory().unwrap();
        assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
        let core = getrlimit(Resource::Core);
        assert_eq!((core.current, core.maximum), (Some(0), Some(0)));
    }
}
