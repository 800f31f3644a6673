//! `strongroom import django-fernet-fields`: moves a Django app's encrypted columns into the
//! vault. The logic lives in `strongroom-import`; this is flags, progress and the report.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use strongroom_import::{DatabaseUrl, ImportError, Mapping, Plan, Report, Source};
use zeroize::Zeroizing;

use super::{Failure, OperatorTarget, SecretArg};
use crate::error::CliError;
use crate::output::errln;

/// Importers from other systems.
#[derive(clap::Subcommand, Debug)]
pub enum ImportCommand {
    /// Import the values of django-fernet-fields columns (EncryptedTextField, ...), decrypted
    /// with the app's FERNET_KEYS (or SECRET_KEY) and stored as credential versions.
    /// Idempotent: a rerun skips what is already imported and continues an interrupted run.
    #[command(
        // The two ways to name credentials, each in full (clap would show the group alone).
        override_usage = "strongroom import django-fernet-fields [OPTIONS] --database <URL> \
        --table <TABLE> --owner-column <COLUMN> --map <COLUMN=NAME>...\n       \
        strongroom import django-fernet-fields [OPTIONS] --database <URL> --table <TABLE> \
        --owner-column <COLUMN> --name-column <COLUMN> --value-column <COLUMN>",
        after_help = "Examples:\n  strongroom import django-fernet-fields --config \
        strongroom.toml \\\n    --database sqlite:db.sqlite3 --table app_account --owner-column \
        user_id \\\n    --map zoom_key=zoom.api-key --map slack_token=slack.token \\\n    \
        --key-file fernet_keys.txt\n  \
        strongroom import django-fernet-fields --config strongroom.toml \\\n    \
        --database sqlite:db.sqlite3 --table app_secret --owner-column user_id \\\n    \
        --name-column service --value-column token --key-file fernet_keys.txt"
    )]
    DjangoFernetFields(DjangoArgs),
}

/// `COLUMN=CREDENTIAL_NAME`.
#[derive(Clone, Debug)]
pub struct ColumnMap(String, String);

impl std::str::FromStr for ColumnMap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((c, n)) if !c.is_empty() && !n.is_empty() => Ok(ColumnMap(c.into(), n.into())),
            _ => Err("expected COLUMN=CREDENTIAL_NAME".into()),
        }
    }
}

/// Flags of `import django-fernet-fields`.
#[derive(clap::Args, Debug)]
// Names come from --map, or from --name-column with --value-column: one of the two is
// required, and the usage line shows both.
#[command(group(
    clap::ArgGroup::new("names")
        .args(["map", "name_column"])
        .required(true)
))]
pub struct DjangoArgs {
    #[command(flatten)]
    target: OperatorTarget,
    /// The Django database: `sqlite:PATH` or `postgresql://user@host/db` (read only).
    #[arg(long, value_name = "URL")]
    database: String,
    /// The model's table, e.g. `app_account` (`schema.table` on PostgreSQL).
    #[arg(long, value_name = "TABLE")]
    table: String,
    /// The column whose value (as text; integers in decimal) is the credential's owner.
    #[arg(long, value_name = "COLUMN")]
    owner_column: String,
    /// The row id column (unique; the import reads in its order and records it).
    #[arg(long, value_name = "COLUMN", default_value = "id")]
    id_column: String,
    /// An encrypted column and the credential name its values become; repeat per column.
    #[arg(long = "map", value_name = "COLUMN=NAME",
          conflicts_with_all = ["name_column", "value_column"])]
    map: Vec<ColumnMap>,
    /// Instead of --map: the column holding each row's credential name...
    #[arg(long, value_name = "COLUMN", requires = "value_column")]
    name_column: Option<String>,
    /// ...and the encrypted column holding its value.
    #[arg(long, value_name = "COLUMN", requires = "name_column")]
    value_column: Option<String>,
    /// A FERNET_KEYS entry; repeat in FERNET_KEYS order (the first is the newest). Prefer
    /// --key-file: command lines are visible to other local users.
    // Hyphen values allowed: keys and Django secret keys may start with `-`.
    #[arg(
        long = "key",
        value_name = "KEY",
        allow_hyphen_values = true,
        conflicts_with = "key_file"
    )]
    keys: Vec<SecretArg>,
    /// A file holding the FERNET_KEYS entries, one per line, in order (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Django's SECRET_KEY, for apps without FERNET_KEYS (the library's fallback). Not with
    /// --key or --key-file. Without any of the three, the environment variable
    /// STRONGROOM_IMPORT_SECRET_KEY is taken (which never gets in their way).
    // Not clap's `env`: clap counts a value from the environment as given, so it could not
    // refuse `--secret-key` beside `--key` without refusing the variable there too.
    #[arg(
        long,
        value_name = "KEY",
        allow_hyphen_values = true,
        conflicts_with_all = ["keys", "key_file"]
    )]
    secret_key: Option<SecretArg>,
    /// FERNET_USE_HKDF = False: the keys are Fernet keys, used as they are.
    #[arg(long)]
    no_hkdf: bool,
    /// Decrypt and count only; write nothing (the target is not even opened).
    #[arg(long)]
    dry_run: bool,
    /// Rows read per batch.
    #[arg(long, value_name = "N", default_value_t = 500)]
    batch: u32,
}

/// Runs an import command.
pub fn run(cmd: ImportCommand) -> Result<(), Failure> {
    let ImportCommand::DjangoFernetFields(args) = cmd;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    runtime.block_on(django(args))
}

fn usage(e: ImportError) -> Failure {
    match e {
        ImportError::Usage(m) => CliError::Usage(m).into(),
        other => Failure::Import(other),
    }
}

/// One key per line, `-` for standard input. A byte-order mark and trailing whitespace
/// (an editor's, never part of a Django key in practice) are dropped.
fn read_key_file(path: &std::path::Path) -> Result<Vec<Zeroizing<String>>, Failure> {
    let text = if path.as_os_str() == "-" {
        let mut text = Zeroizing::new(String::new());
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(CliError::io("cannot read the keys from standard input"))?;
        text
    } else {
        super::warn_if_readable_by_others(path, "--key-file");
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(CliError::io("cannot read --key-file"))?,
        )
    };
    Ok(text
        .trim_start_matches('\u{feff}')
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(|l| Zeroizing::new(l.to_owned()))
        .collect())
}

/// Django's SECRET_KEY from the environment, when no key is given on the command line.
const SECRET_KEY_ENV: &str = "STRONGROOM_IMPORT_SECRET_KEY";

async fn django(args: DjangoArgs) -> Result<(), Failure> {
    let entries: Vec<Zeroizing<String>> = if let Some(path) = &args.key_file {
        read_key_file(path)?
    } else if !args.keys.is_empty() {
        args.keys.iter().map(|k| k.expose().clone()).collect()
    } else if let Some(secret) = &args.secret_key {
        if secret.expose().is_empty() {
            return Err(CliError::Usage("--secret-key is empty".into()).into());
        }
        vec![secret.expose().clone()]
    } else if let Some(secret) = std::env::var_os(SECRET_KEY_ENV).filter(|v| !v.is_empty()) {
        // Empty is unset, as clap reads its own variables.
        let secret = secret
            .into_string()
            .map_err(|_| CliError::Usage(format!("{SECRET_KEY_ENV} is not valid UTF-8")))?;
        vec![Zeroizing::new(secret)]
    } else {
        return Err(CliError::Usage(format!(
            "give the Django keys: --key (repeat in FERNET_KEYS order), --key-file, \
             --secret-key or {SECRET_KEY_ENV}"
        ))
        .into());
    };
    let refs: Vec<&str> = entries.iter().map(|e| e.as_str()).collect();
    let fernet = strongroom_crypto::django::keys_from_strings(&refs, !args.no_hkdf)
        .map_err(|e| CliError::Usage(format!("Django keys: {e}")))?;

    let mapping = match (args.name_column, args.value_column) {
        (Some(name_column), Some(value_column)) => Mapping::NameValue {
            name_column,
            value_column,
        },
        _ => Mapping::Columns(args.map.into_iter().map(|m| (m.0, m.1)).collect()),
    };
    let plan = Plan {
        table: args.table,
        id_column: args.id_column,
        owner_column: args.owner_column,
        mapping,
        batch: args.batch,
    };
    plan.columns().map_err(usage)?;
    let url: DatabaseUrl = args.database.parse().map_err(usage)?;

    // Open the target first: a bad configuration should fail before any reading.
    let backends = if args.dry_run {
        None
    } else {
        Some(args.target.open().await?)
    };
    let vault = backends.as_ref().map(|b| b.vault());
    // Every version is audited with it; the head key is created (and a new log sealed)
    // before anything is written.
    let audit_key = match &backends {
        Some(b) => Some(Arc::new(
            strongroom_core::audit::load_or_create_head_key(
                b.store.as_ref(),
                b.keyring.as_ref(),
                &strongroom_crypto::OsRandom,
            )
            .await
            .map_err(|e| CliError::Operation(format!("audit: {e}")))?,
        )),
        None => None,
    };
    let target =
        vault
            .as_deref()
            .zip(audit_key)
            .map(|(vault, audit_key)| strongroom_import::Target {
                vault,
                audit_key,
                operator: strongroom_server::operator_name(),
            });

    let mut source = Source::open(&url).await.map_err(usage)?;
    let mut progress = Bar::new();
    // The first Ctrl-C stops after the batch in hand (and the report is printed); a second
    // one exits at once.
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_interrupt = {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
                errln!("\ninterrupted: stopping after this batch (Ctrl-C again to quit now)");
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        })
    };
    let result = strongroom_import::run(&mut source, &plan, &fernet, target.as_ref(), &mut |p| {
        progress.update(p);
        if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    })
    .await;
    on_interrupt.abort();
    progress.finish();
    source.close().await;
    drop(target);
    drop(vault);
    if let Some(b) = backends {
        let (outcome, code) = match &result {
            Ok(r) if r.interrupted => ("error", Some("interrupted")),
            Ok(r) if r.rows_failed > 0 => ("error", Some("rows_failed")),
            Ok(r) if r.over_quota > 0 => ("error", Some("quota_exceeded")),
            Ok(_) => ("ok", None),
            Err(_) => ("error", Some("import_failed")),
        };
        super::rewrap::audit_action(&b, "import.django-fernet-fields", outcome, code, None).await;
        b.close().await;
    }
    let report = result.map_err(Failure::Import)?;
    // The outcome counts more than a reader that went away (`| head`).
    let printed = print_report(&report);
    if report.interrupted {
        return Err(Failure::Import(ImportError::Interrupted(report.rows_read)));
    }
    if report.rows_failed > 0 {
        return Err(Failure::Import(ImportError::RowsFailed(report.rows_failed)));
    }
    if report.over_quota > 0 {
        return Err(Failure::Import(ImportError::OverQuota(report.over_quota)));
    }
    Ok(printed?)
}

fn print_report(r: &Report) -> Result<(), CliError> {
    let mut out = String::new();
    if r.dry_run {
        out.push_str("dry run: nothing was written\n");
    }
    out.push_str(&format!("rows read:                {}\n", r.rows_read));
    out.push_str(&format!(
        "values decrypted:         {}\n",
        r.values_decrypted
    ));
    if !r.dry_run {
        out.push_str(&format!(
            "values imported:          {}\n",
            r.values_imported
        ));
        out.push_str(&format!(
            "already imported:         {}\n",
            r.already_imported
        ));
        out.push_str(&format!(
            "kept (changed in Strongroom since): {}\n",
            r.kept_in_strongroom
        ));
        out.push_str(&format!(
            "deleted in Strongroom since, not re-created: {}\n",
            r.deleted_in_strongroom
        ));
        out.push_str(&format!(
            "not created, owner at its credential quota: {}\n",
            r.over_quota
        ));
    }
    out.push_str(&format!("NULL or empty, skipped:   {}\n", r.nulls_skipped));
    out.push_str(&format!("rows failed:              {}\n", r.rows_failed));
    for f in &r.failures {
        out.push_str(&format!(
            "  row {} column {}: {}\n",
            f.row_id, f.column, f.reason
        ));
    }
    crate::output::write_all(out.as_bytes(), "cannot write the report")
}

/// A progress bar on a terminal, plain lines otherwise (on stderr either way).
struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} importing [{bar:30}] {pos}/{len} rows ({per_sec}, eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Self { bar }
    }

    fn update(&mut self, p: strongroom_import::Progress) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(p.rows_total);
                bar.set_position(p.rows_done);
                bar.set_message(format!("{} imported, {} failed", p.imported, p.failed));
            }
            None => errln!(
                "import: {}/{} rows, {} imported, {} failed",
                p.rows_done,
                p.rows_total,
                p.imported,
                p.failed
            ),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
