//! `strongroom backup`: a consistent copy of the SQLite store, taken while the server runs;
//! `strongroom restore`: that copy put back, with the server stopped.

use std::path::PathBuf;

use clap::Args;

use super::{Failure, OperatorTarget};
use crate::error::CliError;
use crate::output::{errln, outln};

/// Copy the SQLite store (credentials, versions, the audit log) into one new file, while
/// the server runs, and check the copy.
///
/// The copy holds sealed values and wrapped data keys, never a key that opens them: back the
/// keyring (or the key provider's keys) up apart, and keep the two apart. To restore, stop
/// the server and run `strongroom restore --from FILE`. With PostgreSQL, use pg_dump.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  strongroom backup --data-dir ./strongroom-data --output backup.db\n  \
    strongroom backup --config /etc/strongroom/strongroom.toml --output /backups/strongroom-$(date +%F).db"
)]
pub struct BackupArgs {
    /// Where the store is.
    #[command(flatten)]
    target: OperatorTarget,
    /// The file to write (must not exist; made with mode 0600).
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
}

pub fn run(args: BackupArgs) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    runtime.block_on(async move {
        let backends = args.target.open_existing().await?;
        let Some(store) = backends.sqlite() else {
            backends.close().await;
            return Err(CliError::Usage(
                "backup copies the SQLite store; for PostgreSQL use pg_dump (see README)".into(),
            )
            .into());
        };
        let copied = store.backup_to(&args.output).await;
        let (outcome, code) = match &copied {
            Ok(_) => ("ok", None),
            Err(_) => ("error", Some("failed")),
        };
        super::rewrap::audit_action(&backends, "backup", outcome, code, None).await;
        backends.close().await;
        let report = copied.map_err(|e| {
            CliError::Operation(format!("backup to {}: {e}", args.output.display()))
        })?;
        outln!(
            "backup written to {} and checked: {} credentials, {} versions, {} audit records",
            args.output.display(),
            report.credentials,
            report.versions,
            report.audit_records
        )?;
        errln!(
            "note: the backup holds no key; back the keyring (or the key provider's keys) up \
             apart, and keep them apart"
        );
        Ok(())
    })
}

/// Put a backup (`strongroom backup`) back in place of the SQLite store, with the server
/// stopped.
///
/// Refused while anything has the database open (a server, another strongroom command).
/// The backup is checked first (a sound Strongroom database this build can open); the
/// database it replaces is kept (--keep, by default beside it as
/// strongroom.db.before-restore-TIME), and no -wal or -shm file of the old database is
/// left to be replayed into the copy. Then the restored audit log is verified and the
/// restore recorded in it. Everything written since the backup was taken is gone, and an
/// `audit head` saved since no longer matches: the log went back with the copy. The
/// keyring must hold every key the backup's versions were wrapped with (keep keyring
/// backups from the same time or later).
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  systemctl stop strongroom\n  \
    strongroom restore --config /etc/strongroom/strongroom.toml --from /backups/strongroom-2026-11-27.db\n  \
    systemctl start strongroom")]
pub struct RestoreArgs {
    /// Where the store is.
    #[command(flatten)]
    target: OperatorTarget,
    /// The backup to restore (a file `strongroom backup` wrote).
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// Where to keep the database it replaces (must not exist).
    /// [default: DATA_DIR/strongroom.db.before-restore-TIME]
    #[arg(long, value_name = "FILE")]
    keep: Option<PathBuf>,
}

pub fn run_restore(args: RestoreArgs) -> Result<(), Failure> {
    use strongroom_server::config::StoreKind;
    let config = args.target.load()?;
    if config.store.kind != StoreKind::Sqlite {
        return Err(CliError::Usage(
            "restore puts back a SQLite store; for PostgreSQL use pg_restore (see README)".into(),
        )
        .into());
    }
    if !config.data_dir.is_dir() {
        return Err(CliError::Usage(format!(
            "no data directory at {}: is it right (--data-dir, or data_dir in the \
             configuration)?",
            config.data_dir.display()
        ))
        .into());
    }
    let db = config.data_dir.join(strongroom_store::sqlite::DB_FILE_NAME);
    let keep = args.keep.clone().unwrap_or_else(|| {
        let now = time::OffsetDateTime::now_utc();
        let stamp = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        config
            .data_dir
            .join(format!("strongroom.db.before-restore-{stamp}"))
    });
    let report = strongroom_store::sqlite::restore::restore(&db, &args.from, &keep)
        .map_err(|e| CliError::Operation(format!("restore from {}: {e}", args.from.display())))?;
    outln!(
        "restored {} from {}: {} credentials, {} versions, {} audit records",
        db.display(),
        args.from.display(),
        report.restored.credentials,
        report.restored.versions,
        report.restored.audit_records
    )?;
    for kept in &report.kept {
        outln!("the database it replaced is kept as {}", kept.display())?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    runtime.block_on(async move {
        let backends = args.target.open_existing().await?;
        let verified = super::audit::verify_log(&backends, None).await;
        let outcome = if verified.is_ok() { "ok" } else { "error" };
        let code = verified.is_err().then_some("audit_integrity");
        if verified.is_ok() {
            super::rewrap::audit_action(&backends, "restore", outcome, code, None).await;
        }
        backends.close().await;
        let checked = verified.map_err(|e| {
            CliError::Operation(format!(
                "the restored audit log does not verify ({e}); the database it replaced is \
                 kept, as listed above"
            ))
        })?;
        outln!(
            "audit log verified ({} records) and the restore recorded in it; an `audit head` \
             saved after the backup was taken no longer matches",
            checked.count
        )?;
        Ok(())
    })
}
