//! `strongroom backup`: a consistent copy of the SQLite store, taken while the server runs.

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
/// the server, put the copy in place as DATA_DIR/strongroom.db (with no strongroom.db-wal or
/// -shm beside it), start the server, and run `strongroom audit verify` (an `audit head`
/// saved after the backup was taken no longer matches: the log went back with the copy).
/// With PostgreSQL, use pg_dump.
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
