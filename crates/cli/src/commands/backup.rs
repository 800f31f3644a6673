//! `strongroom backup`: a consistent copy of the SQLite store, taken while the server runs;
//! `strongroom restore`: that copy put back, with the server stopped.

use std::path::PathBuf;

use clap::Args;

use super::{Failure, OperatorTarget};
use strongroom_core::rewrap::KekSample;

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
    // `-` is standard output to most commands; a backup is checked and fsynced where it
    // lies, so it is written to a file only.
    if args.output.as_os_str() == "-" {
        return Err(CliError::Usage(
            "--output -: a backup is written to a file (checked and made durable there), not \
             to standard output; name the file"
                .into(),
        )
        .into());
    }
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
/// Refused while anything has the store open (a server, another strongroom command), and
/// no server starts while it runs. First the backup is copied beside the database and
/// checked: a sound Strongroom database this build can open, holding only what Strongroom
/// makes (no trigger or table added), whose sealed audit log verifies under this store's
/// keys (a backup of another vault, or one the keyring cannot open, changes nothing). It
/// says what the restore would undo: credentials disabled and versions destroyed since the
/// backup was taken, which come back with it (it goes on then only with --yes: disable or
/// destroy them again after), credentials enabled and current versions chosen since, and
/// the versions written since, which go. It tries a few data keys under each KEK the backup
/// uses: versions under a KEK these keys no longer hold (retired since) would never open
/// again, and they need --yes too. The restore is recorded in the copy's
/// audit log. Then the database is replaced; what it replaces is kept (--keep, by default
/// DATA_DIR/strongroom.db.before-restore-TIME), and no -wal or -shm file of the old
/// database is left to be replayed into the copy.
/// Everything written since the backup was taken is gone (it is in the kept copy), and an
/// `audit head` saved since no longer matches: the log went back with the copy.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  systemctl stop strongroom\n  \
    strongroom restore --config /etc/strongroom/strongroom.toml --from /backups/strongroom-2026-11-27.db --dry-run\n  \
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
    /// Check the backup and say what the restore would undo; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Restore even though credentials disabled or versions destroyed since the backup would
    /// be usable again (listed first; disable or destroy them again after), or the backup
    /// holds versions under a KEK these keys do not open (listed first).
    #[arg(long)]
    yes: bool,
}

pub fn run_restore(args: RestoreArgs) -> Result<(), Failure> {
    use strongroom_server::config::{Config, Overrides, StoreKind};
    use strongroom_store::sqlite::restore;
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
    // The data dir and the key files are trusted (owned by root or this user, writable by
    // their owner only) before anything is made in them: as for every command that opens
    // the store.
    config.check_backend_files()?;
    let db = config.data_dir.join(strongroom_store::sqlite::DB_FILE_NAME);
    let failed = |e: &dyn std::fmt::Display| -> Failure {
        CliError::Operation(format!(
            "restore of {} from {}: {e}; nothing was changed",
            db.display(),
            args.from.display()
        ))
        .into()
    };
    // Checked before the backup is: a `--keep` that cannot be used stops the run at once.
    let keep = match &args.keep {
        Some(keep) => keep.clone(),
        None => default_keep(&config.data_dir),
    };
    if let Some(dir) = keep.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(CliError::Usage(format!(
                "--keep {}: there is no folder {}; nothing was changed",
                keep.display(),
                dir.display()
            ))
            .into());
        }
    }
    if std::fs::symlink_metadata(&keep).is_ok() {
        return Err(CliError::Usage(format!(
            "--keep {}: it exists (the replaced database is kept only in a new file); \
             nothing was changed",
            keep.display()
        ))
        .into());
    }
    let staged = restore::stage(&db, &args.from).map_err(|e| failed(&e))?;
    if staged.after_an_interrupted_restore() {
        errln!(
            "warning: a restore was cut short here before (it left {}): it may have replaced \
             the database already, keeping the one before as {}/strongroom.db.before-restore-*; \
             check those before you delete any",
            staged
                .path()
                .parent()
                .map_or(String::new(), |p| p.display().to_string()),
            config.data_dir.display()
        );
    }
    let checked = staged.report().clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    // Its audit log, under this store's keys, before anything changes: a backup of another
    // vault (or one this keyring cannot open) stops here. The restore is recorded in it
    // there, so the database put in place holds its own record, whatever happens next.
    let staged_config = Config::load_for_operator(
        args.target.config.as_deref(),
        &Overrides {
            data_dir: staged.path().parent().map(std::path::Path::to_owned),
            keyring: Some(config.keyring_path()),
            ..Overrides::default()
        },
    )?;
    let (records, unopened) = runtime.block_on(async {
        let backends = strongroom_server::Backends::open_existing(&staged_config)
            .await
            .map_err(|e| {
                failed(&format!(
                    "the backup does not open with this store's keys: {e}"
                ))
            })?;
        let verified = super::audit::verify_log(&backends, None).await;
        // Whether these keys open the backup's versions: a few data keys per KEK. A KEK
        // retired since the backup was taken is gone, and so is every version under it.
        let sampled = match &verified {
            Ok(_) => Some(
                strongroom_core::rewrap::sample_keks(
                    backends.store.as_ref(),
                    backends.keyring.as_ref(),
                )
                .await,
            ),
            Err(_) => None,
        };
        let recorded = match (&verified, &sampled, args.dry_run) {
            (Ok(_), Some(Err(_)), _) => Ok(()),
            (Ok(_), _, false) => {
                strongroom_server::audit_operator_action(&backends, "restore", "ok", None, None)
                    .await
                    .map_err(|e| e.to_string())
            }
            _ => Ok(()),
        };
        backends.close().await;
        let count = verified.map(|c| c.count).map_err(|e| {
            failed(&format!(
                "the backup's audit log does not verify under this store's keys ({e}); is it \
                 a backup of this vault, with the keyring it was made with? A KEK version \
                 retired since the backup was taken no longer opens it"
            ))
        })?;
        let unopened: Vec<KekSample> = sampled
            .unwrap_or_else(|| Ok(Vec::new()))
            .map_err(|e| {
                failed(&format!(
                    "whether this store's keys open the backup's versions could not be \
                     checked: {e}"
                ))
            })?
            .into_iter()
            .filter(|s| !s.opens)
            .collect();
        recorded.map_err(|e| failed(&format!("the restore could not be recorded in it: {e}")))?;
        Ok::<_, Failure>((count, unopened))
    })?;
    outln!(
        "backup checked: {} credentials, {} versions; its audit log verifies under this \
         store's keys (through record {records})",
        checked.credentials,
        checked.versions,
    )?;
    let mut protections_undone = false;
    match staged.current() {
        restore::Current::Database => match staged.undone() {
            Ok(Some(undone)) => {
                report_undone(&undone);
                protections_undone =
                    undone.enabled_again_count > 0 || undone.readable_again_count > 0;
            }
            Ok(None) => {}
            Err(e) => errln!(
                "warning: what the restore undoes could not be listed ({e}); the database is \
                 kept as it is"
            ),
        },
        restore::Current::NotADatabase => errln!(
            "note: {} is no SQLite database: it is kept as found, with its -wal and -shm",
            db.display()
        ),
        _ => errln!(
            "note: there is no database at {}; the backup becomes it",
            db.display()
        ),
    }
    if !unopened.is_empty() {
        report_unopened(&unopened);
    }
    // Secrets destroyed, or credentials switched off, since the backup would be usable again
    // from the server's next start; values would come back that no key opens: only when
    // asked for by name.
    let mut would = Vec::new();
    if protections_undone {
        would.push("make usable again what was disabled or destroyed since the backup");
    }
    if !unopened.is_empty() {
        would.push("put back versions that this store's keys do not open");
    }
    if args.dry_run {
        if !would.is_empty() {
            outln!(
                "the restore would {} (listed above): it needs --yes",
                would.join(", and ")
            )?;
        }
        outln!("dry run: nothing was changed")?;
        return Ok(());
    }
    if !would.is_empty() && !args.yes {
        return Err(CliError::Usage(format!(
            "the restore would {} (listed above); nothing was changed. Run it again with --yes \
             to restore anyway{}",
            would.join(", and "),
            if protections_undone {
                ", then disable or destroy them again"
            } else {
                ""
            }
        ))
        .into());
    }
    // Said first: a run cut short from here on has kept the database there.
    outln!(
        "replacing {}; the database it replaces is kept as {}",
        db.display(),
        keep.display()
    )?;
    let report = staged.replace(&keep).map_err(|e| {
        CliError::Operation(format!(
            "restore of {} from {} (keeping the replaced database as {}): {e}",
            db.display(),
            args.from.display(),
            keep.display()
        ))
    })?;
    outln!(
        "restored {} from {}: {} credentials, {} versions, {} audit records (the last one \
         records this restore)",
        db.display(),
        args.from.display(),
        report.restored.credentials,
        report.restored.versions,
        report.restored.audit_records
    )?;
    for kept in &report.kept {
        outln!("the database it replaced is kept as {}", kept.display())?;
    }
    outln!(
        "an `audit head` saved after the backup was taken no longer matches (the log went \
         back with the copy)"
    )?;
    Ok(())
}

/// `DATA_DIR/strongroom.db.before-restore-TIME`, with a number after it when a restore in
/// the same second kept one already.
fn default_keep(data_dir: &std::path::Path) -> PathBuf {
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
    let base = format!("strongroom.db.before-restore-{stamp}");
    let taken = |p: &std::path::Path| {
        ["", "-wal", "-shm"].iter().any(|suffix| {
            let mut name = p.as_os_str().to_owned();
            name.push(suffix);
            std::path::Path::new(&name).exists()
        })
    };
    let mut keep = data_dir.join(&base);
    let mut n = 2;
    while taken(&keep) {
        keep = data_dir.join(format!("{base}-{n}"));
        n += 1;
    }
    keep
}

/// Names the KEKs of the backup whose data keys this store's keys did not open.
fn report_unopened(unopened: &[KekSample]) {
    errln!(
        "warning: this store's keys did not open the data key of any of the versions of the \
         backup tried under each of these KEKs (up to three each: the KEK was retired since \
         the backup was taken, is another keyring's or key provider's, or those versions are \
         damaged; `strongroom rewrap --dry-run` over the restored store names each one that \
         does not open); after the restore they would not be revealed. Put the key back \
         first (a copy of the keyring from before the retirement), or restore and destroy \
         them:"
    );
    for sample in unopened {
        errln!(
            "  {}: {}",
            sample.kek_text(),
            super::keys::active_versions(sample.versions)
        );
    }
}

/// Says what a restore undoes (protective changes made since the backup).
fn report_undone(undone: &strongroom_store::sqlite::restore::Undone) {
    let more = |listed: usize, all: u64| {
        let rest = all.saturating_sub(listed as u64);
        if rest > 0 {
            format!(" (and {rest} more)")
        } else {
            String::new()
        }
    };
    if undone.enabled_again_count > 0 {
        errln!(
            "warning: {} credential(s) disabled since the backup are enabled in it; disable \
             them again after the restore{}:",
            undone.enabled_again_count,
            more(undone.enabled_again.len(), undone.enabled_again_count)
        );
        for (owner, name) in &undone.enabled_again {
            errln!("  owner {owner:?} credential {name}");
        }
    }
    if undone.disabled_again_count > 0 {
        errln!(
            "note: {} credential(s) enabled since the backup are disabled in it; enable them \
             again after the restore if they should be{}:",
            undone.disabled_again_count,
            more(undone.disabled_again.len(), undone.disabled_again_count)
        );
        for (owner, name) in &undone.disabled_again {
            errln!("  owner {owner:?} credential {name}");
        }
    }
    if undone.current_back_count > 0 {
        errln!(
            "note: {} credential(s) whose current version changed since the backup go back to \
             the backup's{}:",
            undone.current_back_count,
            more(undone.current_back.len(), undone.current_back_count)
        );
        let shown = |v: &Option<u32>| v.map_or("none".to_owned(), |v| v.to_string());
        for (owner, name, now, then) in &undone.current_back {
            errln!(
                "  owner {owner:?} credential {name}: current version {} now, {} after",
                shown(now),
                shown(then)
            );
        }
    }
    if undone.versions_gone > 0 {
        errln!(
            "note: {} version(s) written since the backup are not in it (or it holds another \
             of the same number): they will be gone (in the kept copy only)",
            undone.versions_gone
        );
    }
    if undone.readable_again_count > 0 {
        errln!(
            "warning: {} version(s) destroyed since the backup are readable in it; destroy \
             them again after the restore{}:",
            undone.readable_again_count,
            more(undone.readable_again.len(), undone.readable_again_count)
        );
        for (owner, name, version) in &undone.readable_again {
            errln!("  owner {owner:?} credential {name} version {version}");
        }
    }
}
