//! Putting a backup back in place of the database (`strongroom restore`).
//!
//! The hand-made way (copy the file over `strongroom.db`) goes wrong in two quiet ways: a
//! server still running keeps writing to the file it has open, and a `strongroom.db-wal`
//! left beside the copy is replayed into it on the next open (an audit integrity failure at
//! best). Here the database is taken with an exclusive lock first (which no other
//! connection may hold meanwhile), a copy of it is kept, and the backup's pages are
//! written through SQLite itself (its backup API) into the locked database, so its own
//! write-ahead log is part of the change and nothing stale is left to replay.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::{check_backup, db_err, BackupReport, SCHEMA_VERSION};
use crate::error::{BackendError, StoreError};

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// What the restored database holds.
    pub restored: BackupReport,
    /// The database that was replaced, as it was: a copy of it (after its write-ahead log
    /// was folded in), or the files set aside as found (with their `-wal` and `-shm`) when
    /// SQLite could not open it. Empty when there was none.
    pub kept: Vec<PathBuf>,
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(BackendError::new(e))
}

/// Replaces the database at `db` with the backup `from` (a file `strongroom backup`
/// wrote), keeping what it replaces at `keep` (which must not exist). Blocking: run it off
/// the async workers.
///
/// # Errors
///
/// Nothing is changed on any error before the backup's pages are written:
/// [`StoreError::InvalidInput`] when `keep` exists, `from` is `db` itself, or the database
/// is in use (a server or another command has it open); [`StoreError::Corrupt`] when `from`
/// is no sound Strongroom database; [`StoreError::SchemaTooNew`] when a newer Strongroom
/// wrote it; [`StoreError::Unavailable`] for I/O failures.
pub fn restore(db: &Path, from: &Path, keep: &Path) -> Result<RestoreReport, StoreError> {
    if same_file(db, from) {
        return Err(StoreError::InvalidInput(
            "the backup is the database itself",
        ));
    }
    let restored = check_source(from)?;
    if keep.exists() {
        return Err(StoreError::InvalidInput(
            "the file to keep the replaced database in already exists",
        ));
    }
    let kept = if db.exists() {
        match lock(db) {
            Ok(conn) => replace_locked(conn, db, from, keep)?,
            // No SQLite connection can use it: nothing runs on it. Set aside as found.
            Err(StoreError::Corrupt { .. }) => {
                let kept = set_aside(db, keep)?;
                place_copy(from, db)?;
                kept
            }
            Err(e) => return Err(e),
        }
    } else {
        // A log or index left without its database would be replayed into the copy.
        let kept = set_aside(db, keep)?;
        place_copy(from, db)?;
        kept
    };
    Ok(RestoreReport { restored, kept })
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The backup must be a sound Strongroom database this build can open.
fn check_source(from: &Path) -> Result<BackupReport, StoreError> {
    if !from.is_file() {
        return Err(StoreError::InvalidInput("the backup file does not exist"));
    }
    let conn = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    let version: i64 = conn
        .query_row("SELECT version FROM schema_version WHERE id = 1", [], |r| {
            r.get(0)
        })
        .map_err(|e| match db_err(e) {
            StoreError::Unavailable(_) => {
                StoreError::corrupt("the backup is no Strongroom database (no schema version)")
            }
            other => other,
        })?;
    let found = u32::try_from(version).unwrap_or(u32::MAX);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    drop(conn);
    check_backup(from)
}

/// The database, opened and locked against every other connection for as long as the
/// connection lives (exclusive locking mode keeps the lock past the transaction).
fn lock(db: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    // Long enough for a reader finishing, not for a server: it never lets go.
    conn.busy_timeout(std::time::Duration::from_secs(1))
        .map_err(db_err)?;
    let taken = conn.execute_batch(
        "PRAGMA locking_mode = EXCLUSIVE;
         BEGIN EXCLUSIVE;
         COMMIT;",
    );
    match taken {
        Ok(()) => Ok(conn),
        Err(rusqlite::Error::SqliteFailure(f, _))
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Err(StoreError::InvalidInput(
                "the database is in use: stop the server (and any other strongroom command \
                 using this store) first",
            ))
        }
        Err(e) => Err(db_err(e)),
    }
}

/// With the lock held: keeps a copy of the database, then writes the backup's pages into
/// it through SQLite.
fn replace_locked(
    mut conn: Connection,
    db: &Path,
    from: &Path,
    keep: &Path,
) -> Result<Vec<PathBuf>, StoreError> {
    // Everything committed is in the main file after this, so a copy of that file alone is
    // the whole database (and SQLite's own copy would refuse a damaged one).
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(db_err)?;
    copy_new(db, keep)?;
    let source = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    {
        let backup = rusqlite::backup::Backup::new(&source, &mut conn).map_err(db_err)?;
        backup
            .run_to_completion(256, std::time::Duration::ZERO, None)
            .map_err(db_err)?;
    }
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(db_err)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(db_err)?;
    if check != "ok" {
        return Err(StoreError::corrupt(format!(
            "the restored database fails its check: {check}"
        )));
    }
    drop(conn);
    Ok(vec![keep.to_owned()])
}

/// Copies `from` to a new file `to` (mode 0600) and makes it durable.
fn copy_new(from: &Path, to: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io)?;
    let mut input = std::fs::File::open(from).map_err(io)?;
    std::io::copy(&mut input, &mut out).map_err(io)?;
    out.sync_all().map_err(io)?;
    sync_parent(to)
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io),
        None => Ok(()),
    }
}

/// The database file and its `-wal` and `-shm`, each that exists, renamed to `keep` and
/// `keep-wal`, `keep-shm` (so they still open together).
fn set_aside(db: &Path, keep: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut kept = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = PathBuf::from(name);
        if path.exists() {
            let mut target = keep.as_os_str().to_owned();
            target.push(suffix);
            let target = PathBuf::from(target);
            if target.exists() {
                return Err(StoreError::InvalidInput(
                    "the file to keep the replaced database in already exists",
                ));
            }
            std::fs::rename(&path, &target).map_err(io)?;
            kept.push(target);
        }
    }
    sync_parent(db)?;
    Ok(kept)
}

/// Puts a copy of `from` at `db`, whole or not at all (a temporary name, then a rename).
fn place_copy(from: &Path, db: &Path) -> Result<(), StoreError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".restoring");
    let partial = PathBuf::from(name);
    // Left by a restore cut short: never the database.
    let _ = std::fs::remove_file(&partial);
    copy_new(from, &partial)?;
    std::fs::rename(&partial, db).map_err(io)?;
    sync_parent(db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;
    use crate::testing::suite::new_version;
    use crate::Store;

    async fn store_with(dir: &Path, names: &[&str]) {
        let store = SqliteStore::open_dir(dir).await.unwrap();
        for name in names {
            store
                .put_version(new_version("alice", name, 1))
                .await
                .unwrap();
        }
        store.close().await;
    }

    async fn names(dir: &Path) -> Vec<String> {
        let store = SqliteStore::open_dir(dir).await.unwrap();
        let page = store.list_credentials("alice", None, 100).await.unwrap();
        store.close().await;
        page.items.into_iter().map(|s| s.name).collect()
    }

    /// The backup replaces the database; what it replaced is kept and still opens; and a
    /// database some connection holds open is refused, with nothing changed.
    #[tokio::test]
    async fn a_backup_replaces_the_database_and_the_old_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        store_with(&live, &["before"]).await;
        let backup = dir.path().join("backup.db");
        {
            let store = SqliteStore::open_dir(&live).await.unwrap();
            store.backup_to(&backup).await.unwrap();
            store
                .put_version(new_version("alice", "after", 1))
                .await
                .unwrap();
            // Open: refused, and nothing moves.
            let db = live.join("strongroom.db");
            let err = restore(&db, &backup, &dir.path().join("kept.db")).unwrap_err();
            assert!(err.to_string().contains("in use: stop the server"), "{err}");
            assert!(!dir.path().join("kept.db").exists());
            store.close().await;
        }
        assert_eq!(names(&live).await, ["after", "before"]);
        let db = live.join("strongroom.db");
        let keep = dir.path().join("kept.db");
        let report = restore(&db, &backup, &keep).unwrap();
        assert_eq!(report.restored.credentials, 1);
        assert_eq!(report.kept, std::slice::from_ref(&keep));
        assert_eq!(names(&live).await, ["before"]);
        // The replaced database, as it was.
        let kept_dir = dir.path().join("kept");
        std::fs::create_dir(&kept_dir).unwrap();
        std::fs::rename(&keep, kept_dir.join("strongroom.db")).unwrap();
        assert_eq!(names(&kept_dir).await, ["after", "before"]);
        // Never over an existing file.
        std::fs::write(&keep, b"mine").unwrap();
        let err = restore(&db, &backup, &keep).unwrap_err();
        assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
        assert_eq!(std::fs::read(&keep).unwrap(), b"mine");
    }

    /// A `-wal` left beside a missing database is set aside, not replayed into the copy; a
    /// file that is no SQLite database is set aside as found.
    #[tokio::test]
    async fn leftovers_beside_the_database_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        store_with(&live, &["a"]).await;
        let backup = dir.path().join("backup.db");
        {
            let store = SqliteStore::open_dir(&live).await.unwrap();
            store.backup_to(&backup).await.unwrap();
            store.close().await;
        }
        let db = live.join("strongroom.db");
        std::fs::remove_file(&db).unwrap();
        std::fs::write(live.join("strongroom.db-wal"), b"stale log").unwrap();
        let keep = dir.path().join("kept.db");
        let report = restore(&db, &backup, &keep).unwrap();
        assert_eq!(report.kept, [dir.path().join("kept.db-wal")]);
        assert!(!live.join("strongroom.db-wal").exists());
        assert_eq!(names(&live).await, ["a"]);

        std::fs::write(
            &db,
            b"not a database at all, but long enough to be read as one",
        )
        .unwrap();
        let keep = dir.path().join("kept-2.db");
        let report = restore(&db, &backup, &keep).unwrap();
        assert_eq!(report.kept, std::slice::from_ref(&keep));
        assert!(std::fs::read(&keep).unwrap().starts_with(b"not a database"));
        assert_eq!(names(&live).await, ["a"]);
    }

    /// What is no Strongroom backup is refused before anything is touched.
    #[tokio::test]
    async fn only_a_sound_backup_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        store_with(&live, &["a"]).await;
        let db = live.join("strongroom.db");
        let keep = dir.path().join("kept.db");
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let newer = dir.path().join("newer.db");
        {
            let store = SqliteStore::open_dir(&live).await.unwrap();
            store.backup_to(&newer).await.unwrap();
            store.close().await;
        }
        Connection::open(&newer)
            .unwrap()
            .execute("UPDATE schema_version SET version = version + 1", [])
            .unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
        let missing = dir.path().join("missing.db");
        for (from, want) in [
            (other.as_path(), "no Strongroom database"),
            (newer.as_path(), "schema version"),
            (garbage.as_path(), ""),
            (missing.as_path(), "does not exist"),
            (db.as_path(), "the database itself"),
        ] {
            let err = restore(&db, from, &keep).unwrap_err();
            assert!(err.to_string().contains(want), "{from:?}: {err}");
            assert!(!keep.exists(), "{from:?}");
        }
        assert_eq!(names(&live).await, ["a"]);
    }
}
