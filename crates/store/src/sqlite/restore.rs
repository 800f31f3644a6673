//! Putting a backup back in place of the database (`strongroom restore`).
//!
//! The hand-made way (copy the file over `strongroom.db`) goes wrong in quiet ways: a server
//! still running keeps writing to the file it has open, a `strongroom.db-wal` left beside
//! the copy is replayed into it on the next open, and a backup of another vault replaces
//! this one before anyone checks it. Here:
//!
//! 1. [`stage`] takes the data dir's lock file exclusively for the whole run (every process
//!    that opens the store holds it shared: [`share_lock`]), and copies the backup into a
//!    private staging folder beside the database, where it is checked. What is put in place
//!    is that copy, whatever happens to the backup file meanwhile; the caller checks it
//!    further (its audit log, under this vault's keys), and records the restore in it,
//!    before anything changes.
//! 2. [`Staged::replace`] takes SQLite's exclusive lock on the database too (a process of
//!    an older release takes no lock file), keeps a copy of it, and writes the staged pages
//!    through SQLite itself (its backup API) into the locked database, so its write-ahead
//!    log is part of the change and nothing stale is left to replay. A database that is
//!    missing, or that is no SQLite file, is kept as found (hard links, with its `-wal` and
//!    `-shm`), its log and index removed, and the staged copy renamed over it: at no point
//!    is there no database where there was one.
//!
//! The data dir must be trusted (owned by root or this user, writable by its owner only):
//! the caller checks it, as every command that opens the store does.

use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::{check_backup, db_err, held, BackupReport, DB_FILE_NAME, SCHEMA_VERSION};
use crate::error::{BackendError, StoreError};

/// The folder beside the database where [`stage`] puts its copy.
pub const STAGING_DIR: &str = "restore-staging";

/// At most this many credentials and versions are named in [`Undone`] (all are counted).
pub const UNDONE_LISTED: usize = 1000;

fn io(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(BackendError::new(e))
}

/// An I/O failure, naming what was being done and to which file.
fn io_at<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> StoreError + 'a {
    move |e| StoreError::unavailable(format!("{what} {}: {e}", path.display()))
}

const IN_USE: &str = "the database is in use: stop the server (and any other strongroom \
                      command using this store) first";

const KEEP_EXISTS: &str = "the file to keep the replaced database in already exists";

fn lock_path(db: &Path) -> PathBuf {
    with_suffix(db, ".lock")
}

fn open_lock_file(db: &Path) -> Result<File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    let path = lock_path(db);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_at("cannot open the lock file", &path))?;
    // Whoever else could open it could hold it, and keep every server out.
    let mode = file.metadata().map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_at("cannot make the lock file private", &path))?;
    }
    Ok(file)
}

fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The lock every process holds (shared) while it has the store at `db` open: a restore
/// takes it exclusively, so none opens the store during one, and none is open when one
/// starts. SQLite's own locks cannot say that about a database that is missing or no longer
/// opens, which is when a restore is most needed.
pub(super) fn share_lock(db: &Path) -> Result<File, StoreError> {
    let file = open_lock_file(db)?;
    match file.try_lock_shared() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::unavailable(format!(
            "a `strongroom restore` is replacing the database at {}: start again once it is \
             done",
            db.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// A backup copied beside the database and checked, with the store locked against every
/// other process until it is dropped (the copy is then removed, unless it was put in place).
#[derive(Debug)]
pub struct Staged {
    db: PathBuf,
    dir: PathBuf,
    interrupted: bool,
    report: BackupReport,
    _lock: File,
}

/// What [`Staged::replace`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// What the restored database holds.
    pub restored: BackupReport,
    /// The database that was replaced, as it was: a copy of it (after its write-ahead log
    /// was folded in), or its files as found (with their `-wal` and `-shm`) when it was no
    /// SQLite file. Empty when there was none.
    pub kept: Vec<PathBuf>,
}

/// What the database holds now, as far as a restore is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Current {
    /// No database file (a `-wal` or `-shm` left alone is kept aside).
    Missing,
    /// A file that is no SQLite database: kept as found.
    NotADatabase,
    /// A database: kept as a copy, then overwritten in place.
    Database,
}

/// What putting the backup back undoes: owners' and admins' protective changes made since
/// it was taken, which come back with it, and what was written since, which goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Undone {
    /// Credentials disabled since (the kill switch), enabled in the backup: `(owner, name)`,
    /// at most [`UNDONE_LISTED`].
    pub enabled_again: Vec<(String, String)>,
    /// How many credentials that is in all.
    pub enabled_again_count: u64,
    /// Versions destroyed since (or their credential deleted), active in the backup:
    /// `(owner, name, version)`, at most [`UNDONE_LISTED`].
    pub readable_again: Vec<(String, String, u32)>,
    /// How many versions that is in all.
    pub readable_again_count: u64,
    /// Credentials enabled since, disabled in the backup: `(owner, name)`, at most
    /// [`UNDONE_LISTED`].
    pub disabled_again: Vec<(String, String)>,
    /// How many credentials that is in all.
    pub disabled_again_count: u64,
    /// Credentials whose current version was chosen since (a put, or a choice of an older
    /// one), which go back to the backup's: `(owner, name, now, in the backup)`, at most
    /// [`UNDONE_LISTED`].
    pub current_back: Vec<(String, String, Option<u32>, Option<u32>)>,
    /// How many credentials that is in all.
    pub current_back_count: u64,
    /// Active versions written since, which the backup does not hold, or holds another
    /// version of the same number for (they stay in the kept copy only).
    pub versions_gone: u64,
}

/// Takes the store at `db` (a file named [`DB_FILE_NAME`]) for a restore, and copies the
/// backup `from` (a file `strongroom backup` wrote) into a staging folder beside it, where
/// it is checked. Blocking: run it off the async workers. Nothing of the store changes.
///
/// # Errors
///
/// [`StoreError::InvalidInput`] when the store is in use (a server or another command has
/// it open), `from` is the database itself, lies in the staging folder, does not exist, or
/// is no regular file;
/// [`StoreError::Corrupt`] when `from` is no sound Strongroom database;
/// [`StoreError::SchemaTooNew`] when a newer Strongroom wrote it; [`StoreError::Unavailable`]
/// for I/O failures (naming the file).
pub fn stage(db: &Path, from: &Path) -> Result<Staged, StoreError> {
    let lock = open_lock_file(db)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::InvalidInput(IN_USE)),
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    let mut source = open_backup(from)?;
    if is_file(&source, db) {
        return Err(StoreError::InvalidInput(
            "the backup is the database itself",
        ));
    }
    let dir = folder_of(db).join(STAGING_DIR);
    let resolved = std::fs::canonicalize(from).unwrap_or_else(|_| from.to_owned());
    if [from, resolved.as_path()]
        .iter()
        .any(|f| folder_of(f) == dir || same_file(folder_of(f), &dir))
    {
        return Err(StoreError::InvalidInput(
            "the backup is in the folder a restore stages its copy in (restore-staging), which \
             the restore empties first: move it elsewhere",
        ));
    }
    // Left by a restore cut short: never anything but a copy.
    let interrupted = std::fs::symlink_metadata(&dir).is_ok();
    if interrupted {
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir_all(&dir)
        } else {
            std::fs::remove_file(&dir)
        }
        .map_err(io_at("cannot remove the staging folder", &dir))?;
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_at("cannot make the staging folder", &dir))?;
    }
    let mut staged = Staged {
        db: db.to_owned(),
        dir,
        interrupted,
        report: BackupReport {
            credentials: 0,
            versions: 0,
            audit_records: 0,
        },
        _lock: lock,
    };
    write_new(&mut source, from, &staged.path())?;
    staged.report = check_source(&staged.path())?;
    Ok(staged)
}

impl Staged {
    /// The checked copy: a database file named [`DB_FILE_NAME`] in a folder of its own, which
    /// the caller may open as a store (to check it further, and to record the restore in its
    /// audit log) before [`Staged::replace`].
    #[must_use]
    pub fn path(&self) -> PathBuf {
        self.dir.join(DB_FILE_NAME)
    }

    /// What the copy holds (as staged).
    #[must_use]
    pub fn report(&self) -> &BackupReport {
        &self.report
    }

    /// Whether a restore cut short left its staging folder: it may have replaced the
    /// database already, keeping the one before under a name this run does not know.
    #[must_use]
    pub fn after_an_interrupted_restore(&self) -> bool {
        self.interrupted
    }

    /// What is there now.
    #[must_use]
    pub fn current(&self) -> Current {
        match std::fs::symlink_metadata(&self.db) {
            Err(_) => Current::Missing,
            Ok(_) if has_sqlite_header(&self.db) => Current::Database,
            Ok(_) => Current::NotADatabase,
        }
    }

    /// What putting the copy in place would undo (see [`Undone`]), read without writing to
    /// the database; `None` when there is no database.
    ///
    /// # Errors
    ///
    /// When the database cannot be read (damaged, say).
    pub fn undone(&self) -> Result<Option<Undone>, StoreError> {
        if self.current() != Current::Database {
            return Ok(None);
        }
        undone_between(&self.path(), &self.db).map(Some)
    }

    /// Puts the copy in place of the database, keeping what it replaces at `keep` (which must
    /// not exist, nor its `-wal` or `-shm`).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] when `keep` exists or is one of the store's own files,
    /// or the database is in use (an older release's process holding it open); nothing is
    /// changed then, nor on any error before the kept copy is complete (later errors name
    /// it). [`StoreError::Unavailable`] for I/O failures; [`StoreError::Corrupt`] when the
    /// database written fails its check.
    pub fn replace(self, keep: &Path) -> Result<RestoreReport, StoreError> {
        if self.owns(keep) {
            return Err(StoreError::InvalidInput(
                "the replaced database cannot be kept as one of the store's own files",
            ));
        }
        for suffix in ["", "-wal", "-shm", "-journal"] {
            if std::fs::symlink_metadata(with_suffix(keep, suffix)).is_ok() {
                return Err(StoreError::InvalidInput(KEEP_EXISTS));
            }
        }
        let kept = match self.current() {
            Current::Database => match lock_database(&self.db) {
                Ok(conn) => {
                    self.write_locked(conn, keep)?;
                    vec![keep.to_owned()]
                }
                // Not a database after all, past its first page: kept as found.
                Err(StoreError::Corrupt { .. }) => self.rename_into_place(keep)?,
                Err(e) => return Err(e),
            },
            Current::NotADatabase | Current::Missing => self.rename_into_place(keep)?,
        };
        // Checked when staged (and, written in place, checked again there): counted only.
        let conn = Connection::open_with_flags(
            &self.db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        let restored = held(&conn)?;
        Ok(RestoreReport { restored, kept })
    }

    /// Whether `path` is one of the files SQLite or the store keep beside the database (which
    /// they may remove or overwrite), or in the staging folder.
    fn owns(&self, path: &Path) -> bool {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return false;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if same_file(dir, &self.dir) {
            return true;
        }
        same_file(dir, folder_of(&self.db))
            && ["", "-wal", "-shm", "-journal", ".lock"]
                .iter()
                .any(|suffix| with_suffix(&self.db, suffix).file_name() == Some(name))
    }

    /// With SQLite's lock held: keeps a copy of the database, then writes the staged pages
    /// into it through SQLite.
    fn write_locked(&self, mut conn: Connection, keep: &Path) -> Result<(), StoreError> {
        // Everything committed is in the main file after this, so a copy of that file alone
        // is the whole database (and SQLite's own copy would refuse a damaged one).
        checkpoint_all(&conn)?;
        // Whole before it has its name: a copy cut short never looks like the kept one.
        let partial = self.dir.join("kept.partial");
        copy_new(&self.db, &partial)?;
        keep_file(&partial, keep)?;
        let after_kept = |e: StoreError| {
            StoreError::unavailable(format!(
                "{e}; the database as it was is kept as {}",
                keep.display()
            ))
        };
        let source = Connection::open_with_flags(
            self.path(),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)
        .map_err(after_kept)?;
        {
            let backup = rusqlite::backup::Backup::new(&source, &mut conn)
                .map_err(db_err)
                .map_err(after_kept)?;
            backup
                .run_to_completion(256, std::time::Duration::ZERO, None)
                .map_err(db_err)
                .map_err(after_kept)?;
        }
        // Committed: from here on the database holds the backup.
        let replaced = |e: StoreError| {
            StoreError::unavailable(format!(
                "the database was replaced by the backup, but {e}; the database as it was is \
                 kept as {}",
                keep.display()
            ))
        };
        checkpoint_all(&conn).map_err(replaced)?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(db_err)
            .map_err(replaced)?;
        if check != "ok" {
            return Err(StoreError::corrupt(format!(
                "the database was replaced by the backup, but it fails its check: {check}; the \
                 database as it was is kept as {}",
                keep.display()
            )));
        }
        Ok(())
    }

    /// Keeps the database's files as found (hard links: `keep`, `keep-wal`, `keep-shm`, so
    /// they still open together), removes its log and index (which would be replayed into
    /// the copy), and renames the staged copy over the database. A database that was there
    /// is never missing on the way.
    fn rename_into_place(&self, keep: &Path) -> Result<Vec<PathBuf>, StoreError> {
        // The copy whole in its main file: the rename moves no log with it.
        let staged = Connection::open_with_flags(
            self.path(),
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        checkpoint_all(&staged)?;
        drop(staged);
        let mut kept = Vec::new();
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let path = with_suffix(&self.db, suffix);
            if std::fs::symlink_metadata(&path).is_ok() {
                let target = with_suffix(keep, suffix);
                if suffix.is_empty() {
                    // Replaced by a rename below: the kept name alone holds it then.
                    keep_file(&path, &target)?;
                } else {
                    // Removed below, but until then shared with whatever opens it: a copy.
                    let partial = self.dir.join(format!("kept{suffix}.partial"));
                    copy_new(&path, &partial)?;
                    keep_file(&partial, &target)?;
                }
                kept.push(target);
            }
        }
        for suffix in ["-wal", "-shm", "-journal"] {
            let path = with_suffix(&self.db, suffix);
            if std::fs::symlink_metadata(&path).is_ok() {
                std::fs::remove_file(&path).map_err(io_at("cannot remove", &path))?;
            }
        }
        std::fs::rename(self.path(), &self.db).map_err(|e| {
            StoreError::unavailable(format!(
                "putting the backup in place failed ({e}); the replaced files are kept as {}",
                list(&kept)
            ))
        })?;
        sync_parent(&self.db)?;
        Ok(kept)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The backup, opened once: the checks by file that follow and the copy all read this
/// file, whatever its path names meanwhile. Opened without blocking, so that a FIFO there
/// is refused rather than waited on.
fn open_backup(from: &Path) -> Result<File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(from)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                StoreError::InvalidInput("the backup file does not exist")
            }
            _ => io_at("cannot read", from)(e),
        })?;
    let meta = file.metadata().map_err(io_at("cannot read", from))?;
    if !meta.is_file() {
        return Err(StoreError::InvalidInput(
            "the backup is no regular file (a folder, a device or a FIFO)",
        ));
    }
    // Before anything is copied: a wrong file (a tarball, a disk image) would otherwise be
    // copied whole beside the database first, however large, dry run or not.
    let mut magic = [0u8; 16];
    let header = std::io::Read::read_exact(&mut &file, &mut magic);
    if header.is_err() || &magic != b"SQLite format 3\0" {
        return Err(StoreError::corrupt(
            "the backup is no SQLite database (its first bytes are not SQLite's): no \
             Strongroom database",
        ));
    }
    std::io::Seek::rewind(&mut &file).map_err(io_at("cannot read", from))?;
    Ok(file)
}

/// Whether the open `file` is the one at `path`.
fn is_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether the file starts as every SQLite database does (read without SQLite, which would
/// fold a write-ahead log into a file it then finds damaged).
fn has_sqlite_header(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 16];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"SQLite format 3\0")
}

/// The copy must be a sound Strongroom database this build can open.
fn check_source(copy: &Path) -> Result<BackupReport, StoreError> {
    let conn = Connection::open_with_flags(
        copy,
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
    // Whoever holds a backup file but no key can still add to it: a trigger would run in
    // the restored store on every write (a kill switch that switches itself back on, a
    // destroy that copies the value aside first). Only what Strongroom's migrations make
    // may come back.
    let allowed = schema_objects()?;
    let objects = conn
        .prepare("SELECT type, name FROM sqlite_schema")
        .map_err(db_err)?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?;
    for (kind, name) in objects {
        let known = allowed.contains(&(kind.clone(), name.clone()))
            || (matches!(kind.as_str(), "table" | "index") && name.starts_with("sqlite_"));
        if !known {
            return Err(StoreError::corrupt(format!(
                "the backup holds a {kind} named {name:?}, which Strongroom never makes: it was \
                 changed outside Strongroom, and is not restored"
            )));
        }
    }
    // Every store a server ran on has a sealed audit log.
    let heads: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit_head WHERE length(mac) > 0",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if heads == 0 {
        return Err(StoreError::corrupt(
            "the backup holds no sealed audit log: it is no copy of a store a server ran on",
        ));
    }
    drop(conn);
    check_backup(copy)
}

/// Every table and index Strongroom's migrations make, at any schema version.
fn schema_objects() -> Result<std::collections::HashSet<(String, String)>, StoreError> {
    let conn = Connection::open_in_memory().map_err(db_err)?;
    let mut seen = std::collections::HashSet::new();
    seen.insert(("table".to_owned(), "schema_version".to_owned()));
    for sql in super::schema::MIGRATIONS {
        conn.execute_batch(sql).map_err(db_err)?;
        let objects = conn
            .prepare("SELECT type, name FROM sqlite_schema")
            .map_err(db_err)?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(db_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_err)?;
        seen.extend(objects);
    }
    Ok(seen)
}

/// The database, opened and locked against every other SQLite connection for as long as the
/// connection lives (exclusive locking mode keeps the lock past the transaction).
fn lock_database(db: &Path) -> Result<Connection, StoreError> {
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
            Err(StoreError::InvalidInput(IN_USE))
        }
        Err(e) => Err(db_err(e)),
    }
}

/// Folds the write-ahead log into the database file; refuses when it could not all be.
fn checkpoint_all(conn: &Connection) -> Result<(), StoreError> {
    let (busy, log, done): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(db_err)?;
    if busy != 0 || log != done {
        return Err(StoreError::InvalidInput(IN_USE));
    }
    Ok(())
}

/// Gives the file at `from` the name `to` too, never over an existing file (or symlink): a
/// hard link. Across file systems, a copy, whole under `to.partial` before it takes its
/// name.
fn keep_file(from: &Path, to: &Path) -> Result<(), StoreError> {
    match std::fs::hard_link(from, to) {
        Ok(()) => sync_parent(to),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(StoreError::InvalidInput(KEEP_EXISTS))
        }
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            let partial = with_suffix(to, ".partial");
            if std::fs::symlink_metadata(&partial).is_ok() {
                return Err(StoreError::unavailable(format!(
                    "{} exists (a copy a restore cut short?): remove it, or keep the database \
                     elsewhere",
                    partial.display()
                )));
            }
            if let Err(e) = copy_new(from, &partial) {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
            let linked = std::fs::hard_link(&partial, to);
            let _ = std::fs::remove_file(&partial);
            match linked {
                Ok(()) => sync_parent(to),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Err(StoreError::InvalidInput(KEEP_EXISTS))
                }
                Err(e) => Err(io_at("cannot keep the database as", to)(e)),
            }
        }
        Err(e) => Err(io_at("cannot keep the database as", to)(e)),
    }
}

/// Copies `from` to a new file `to` (mode 0600) and makes it durable.
fn copy_new(from: &Path, to: &Path) -> Result<(), StoreError> {
    let mut input = File::open(from).map_err(io_at("cannot read", from))?;
    write_new(&mut input, from, to)
}

/// Copies what is left to read of `input` (the file at `from`) to a new file `to` (mode
/// 0600) and makes it durable.
fn write_new(input: &mut File, from: &Path, to: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => StoreError::InvalidInput(KEEP_EXISTS),
            _ => io_at("cannot create", to)(e),
        })?;
    std::io::copy(input, &mut out).map_err(|e| {
        StoreError::unavailable(format!(
            "cannot copy {} into {}: {e}",
            from.display(),
            to.display()
        ))
    })?;
    out.sync_all().map_err(io_at("cannot write", to))?;
    sync_parent(to)
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let dir = folder_of(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at("cannot sync the folder", dir))
}

/// What replacing `live` by `restored` undoes (see [`Undone`]). The live database is opened
/// read-only: it is neither checkpointed nor changed.
fn undone_between(restored: &Path, live: &Path) -> Result<Undone, StoreError> {
    let conn = Connection::open_with_flags(
        live,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    let name = restored
        .to_str()
        .ok_or(StoreError::InvalidInput("the database path is not UTF-8"))?;
    conn.execute("ATTACH DATABASE ?1 AS restored", [name])
        .map_err(db_err)?;
    // A credential live in both: `r` as restored, `l` as it is now.
    let in_both = |condition: &str| {
        format!(
            "FROM restored.credentials r JOIN main.credentials l
                 ON l.owner = r.owner AND l.name = r.name
             WHERE r.deleted = 0 AND l.deleted = 0 AND {condition}"
        )
    };
    let mut undone = Undone::default();
    (undone.enabled_again_count, undone.enabled_again) = counted(
        &conn,
        "r.owner, r.name",
        &in_both("r.enabled = 1 AND l.enabled = 0"),
        "r.owner, r.name",
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    (undone.readable_again_count, undone.readable_again) = counted(
        &conn,
        "rc.owner, rc.name, rv.version",
        "FROM restored.versions rv
         JOIN restored.credentials rc ON rc.id = rv.credential_id
         JOIN main.credentials lc ON lc.owner = rc.owner AND lc.name = rc.name
         LEFT JOIN main.versions lv ON lv.credential_id = lc.id AND lv.version = rv.version
         WHERE rc.deleted = 0 AND rv.state = 0
           AND (lv.state = 1 OR (lv.version IS NULL AND lc.latest_version >= rv.version))",
        "rc.owner, rc.name, rv.version",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    (undone.disabled_again_count, undone.disabled_again) = counted(
        &conn,
        "r.owner, r.name",
        &in_both("r.enabled = 0 AND l.enabled = 1"),
        "r.owner, r.name",
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    (undone.current_back_count, undone.current_back) = counted(
        &conn,
        "r.owner, r.name, l.current_version, r.current_version",
        &in_both("r.current_version IS NOT l.current_version"),
        "r.owner, r.name",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    undone.versions_gone = count(
        &conn,
        "FROM main.versions lv
         JOIN main.credentials lc ON lc.id = lv.credential_id
         LEFT JOIN restored.credentials rc ON rc.owner = lc.owner AND rc.name = lc.name
         LEFT JOIN restored.versions rv ON rv.credential_id = rc.id AND rv.version = lv.version
         WHERE lc.deleted = 0 AND lv.state = 0
           AND (rv.version IS NULL OR rv.created_at IS NOT lv.created_at)",
    )?;
    Ok(undone)
}

/// How many rows `from_where` finds, and the first [`UNDONE_LISTED`] of them (`columns`,
/// ordered by `order`).
fn counted<T>(
    conn: &Connection,
    columns: &str,
    from_where: &str,
    order: &str,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<(u64, Vec<T>), StoreError> {
    let all = count(conn, from_where)?;
    let limit = i64::try_from(UNDONE_LISTED).unwrap_or(i64::MAX);
    let listed = conn
        .prepare(&format!(
            "SELECT {columns} {from_where} ORDER BY {order} LIMIT ?1"
        ))
        .map_err(db_err)?
        .query_map([limit], row)
        .map_err(db_err)?
        .collect::<Result<_, _>>()
        .map_err(db_err)?;
    Ok((all, listed))
}

fn count(conn: &Connection, from_where: &str) -> Result<u64, StoreError> {
    conn.query_row(&format!("SELECT count(*) {from_where}"), [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(db_err)
    .map(|n| u64::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;
    use crate::testing::suite::new_version;
    use crate::Store;

    /// A store as a server leaves it (its audit log sealed), holding `names`.
    async fn store_with(dir: &Path, names: &[&str]) {
        let store = SqliteStore::open_dir(dir).await.unwrap();
        let key = crate::audit::HeadKey::new([5; 32]);
        store
            .audit_log()
            .unwrap()
            .audit_seal_genesis(key.head(0, crate::audit::GENESIS))
            .await
            .unwrap();
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

    fn restore(db: &Path, from: &Path, keep: &Path) -> Result<RestoreReport, StoreError> {
        stage(db, from)?.replace(keep)
    }

    async fn backup_of(live: &Path, to: &Path) {
        let store = SqliteStore::open_dir(live).await.unwrap();
        store.backup_to(to).await.unwrap();
        store.close().await;
    }

    /// The backup replaces the database; what it replaced is kept and still opens; a
    /// database a store holds open is refused, and a store does not open during a restore;
    /// what the restore undoes is named.
    #[tokio::test]
    async fn a_backup_replaces_the_database_and_the_old_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        store_with(&live, &["before", "shredded", "switched-off"]).await;
        let backup = dir.path().join("backup.db");
        backup_of(&live, &backup).await;
        let db = live.join("strongroom.db");
        let keep = dir.path().join("kept.db");
        {
            let store = SqliteStore::open_dir(&live).await.unwrap();
            store
                .put_version(new_version("alice", "after", 1))
                .await
                .unwrap();
            let t = crate::testing::suite::t0();
            store
                .destroy_version("alice", "shredded", 1, t)
                .await
                .unwrap();
            store
                .set_enabled("alice", "switched-off", false, t)
                .await
                .unwrap();
            // Open: refused, and nothing moves.
            let err = restore(&db, &backup, &keep).unwrap_err();
            assert!(err.to_string().contains("in use: stop the server"), "{err}");
            assert!(!keep.exists());
            assert!(!live.join(STAGING_DIR).exists());
            store.close().await;
        }
        assert_eq!(
            names(&live).await,
            ["after", "before", "shredded", "switched-off"]
        );
        // A process that takes no lock file (an older release) but has the database open.
        let older = Connection::open(&db).unwrap();
        older
            .query_row("SELECT count(*) FROM credentials", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap();
        let err = stage(&db, &backup).unwrap().replace(&keep).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        assert!(!keep.exists());
        drop(older);
        let staged = stage(&db, &backup).unwrap();
        // A store does not open while a restore holds it.
        let err = SqliteStore::open_dir(&live).await.unwrap_err();
        assert!(err.to_string().contains("restore"), "{err}");
        let undone = staged.undone().unwrap().unwrap();
        assert_eq!(
            undone.enabled_again,
            [("alice".to_owned(), "switched-off".to_owned())]
        );
        assert_eq!(
            undone.readable_again,
            [("alice".to_owned(), "shredded".to_owned(), 1)]
        );
        assert_eq!(undone.versions_gone, 1);
        assert!(undone.disabled_again.is_empty());
        assert_eq!(
            undone.current_back,
            [("alice".to_owned(), "shredded".to_owned(), None, Some(1))]
        );
        assert!(!staged.after_an_interrupted_restore());
        assert_eq!(staged.current(), Current::Database);
        let report = staged.replace(&keep).unwrap();
        assert_eq!(report.restored.credentials, 3);
        assert_eq!(report.kept, std::slice::from_ref(&keep));
        assert!(!live.join(STAGING_DIR).exists());
        assert_eq!(names(&live).await, ["before", "shredded", "switched-off"]);
        // The replaced database, as it was.
        let kept_dir = dir.path().join("kept");
        std::fs::create_dir(&kept_dir).unwrap();
        std::fs::rename(&keep, kept_dir.join("strongroom.db")).unwrap();
        assert_eq!(
            names(&kept_dir).await,
            ["after", "before", "shredded", "switched-off"]
        );
        // Never as one of the store's own files.
        for own in [
            "strongroom.db-shm",
            "strongroom.db-wal",
            "strongroom.db.lock",
        ] {
            let err = restore(&db, &backup, &live.join(own)).unwrap_err();
            assert!(err.to_string().contains("own files"), "{own}: {err}");
        }
        // Never over an existing file, nor beside a log of that name.
        for suffix in ["", "-wal"] {
            let taken = with_suffix(&keep, suffix);
            std::fs::write(&taken, b"mine").unwrap();
            let err = restore(&db, &backup, &keep).unwrap_err();
            assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
            assert_eq!(std::fs::read(&taken).unwrap(), b"mine");
            std::fs::remove_file(&taken).unwrap();
        }
    }

    /// A `-wal` left beside a missing database is set aside, not replayed into the copy; a
    /// file that is no SQLite database is set aside as found.
    #[tokio::test]
    async fn leftovers_beside_the_database_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        store_with(&live, &["a"]).await;
        let backup = dir.path().join("backup.db");
        backup_of(&live, &backup).await;
        let db = live.join("strongroom.db");
        std::fs::remove_file(&db).unwrap();
        std::fs::write(live.join("strongroom.db-wal"), b"stale log").unwrap();
        let keep = dir.path().join("kept.db");
        let report = restore(&db, &backup, &keep).unwrap();
        assert_eq!(report.kept, [dir.path().join("kept.db-wal")]);
        assert!(!live.join("strongroom.db-wal").exists());
        assert_eq!(names(&live).await, ["a"]);

        // No SQLite file (its header overwritten), with a log beside it: nothing reads or
        // folds the log in, not even what the restore would undo; both are kept as found.
        let damaged = b"not a database at all, but long enough to be read as one".repeat(100);
        std::fs::write(&db, &damaged).unwrap();
        std::fs::write(live.join("strongroom.db-wal"), b"its log").unwrap();
        let keep = dir.path().join("kept-2.db");
        let staged = stage(&db, &backup).unwrap();
        assert_eq!(staged.current(), Current::NotADatabase);
        assert_eq!(staged.undone().unwrap(), None);
        assert_eq!(std::fs::read(&db).unwrap(), damaged);
        assert_eq!(
            std::fs::read(live.join("strongroom.db-wal")).unwrap(),
            b"its log"
        );
        let report = staged.replace(&keep).unwrap();
        assert_eq!(report.kept, [keep.clone(), with_suffix(&keep, "-wal")]);
        assert_eq!(std::fs::read(&keep).unwrap(), damaged);
        assert_eq!(
            std::fs::read(with_suffix(&keep, "-wal")).unwrap(),
            b"its log"
        );
        assert!(!live.join("strongroom.db-wal").exists());
        assert_eq!(names(&live).await, ["a"]);
        // A backup in the staging folder (a copy a restore cut short left) is refused, not
        // emptied away.
        let staging = live.join(STAGING_DIR);
        std::fs::create_dir(&staging).unwrap();
        std::fs::copy(&backup, staging.join("strongroom.db")).unwrap();
        let err = restore(
            &db,
            &staging.join("strongroom.db"),
            &dir.path().join("k3.db"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("restore-staging"), "{err}");
        // Also by a symlink to it.
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(staging.join("strongroom.db"), &link).unwrap();
        let err = restore(&db, &link, &dir.path().join("k3.db")).unwrap_err();
        assert!(err.to_string().contains("restore-staging"), "{err}");
        assert!(staging.join("strongroom.db").exists());
        // Left there, the folder says a restore was cut short.
        std::fs::remove_file(staging.join("strongroom.db")).unwrap();
        let staged = stage(&db, &backup).unwrap();
        assert!(staged.after_an_interrupted_restore());
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
        backup_of(&live, &newer).await;
        Connection::open(&newer)
            .unwrap()
            .execute("UPDATE schema_version SET version = version + 1", [])
            .unwrap();
        // What Strongroom never makes: a trigger (or any object it does not know) planted in
        // a backup by whoever held the file.
        let planted = dir.path().join("planted.db");
        backup_of(&live, &planted).await;
        Connection::open(&planted)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER keep_on AFTER UPDATE OF enabled ON credentials
                 BEGIN UPDATE credentials SET enabled = 1 WHERE id = NEW.id; END",
            )
            .unwrap();
        let extra = dir.path().join("extra.db");
        backup_of(&live, &extra).await;
        Connection::open(&extra)
            .unwrap()
            .execute_batch("CREATE TABLE copies (v BLOB)")
            .unwrap();
        // A store no server ran on: no sealed audit log to check it by.
        let unsealed = dir.path().join("unsealed.db");
        backup_of(&live, &unsealed).await;
        Connection::open(&unsealed)
            .unwrap()
            .execute_batch("UPDATE audit_head SET mac = X''")
            .unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
        let missing = dir.path().join("missing.db");
        // Refused at once, not waited on until something writes to it.
        let fifo = dir.path().join("fifo.db");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let folder = dir.path().join("folder.db");
        std::fs::create_dir(&folder).unwrap();
        let linked_db = dir.path().join("linked.db");
        std::os::unix::fs::symlink(&db, &linked_db).unwrap();
        for (from, want) in [
            (fifo.as_path(), "no regular file"),
            (folder.as_path(), "no regular file"),
            (linked_db.as_path(), "the database itself"),
            (other.as_path(), "no Strongroom database"),
            (newer.as_path(), "schema version"),
            (planted.as_path(), "trigger named \"keep_on\""),
            (extra.as_path(), "table named \"copies\""),
            (unsealed.as_path(), "no sealed audit log"),
            // Refused on its first bytes, before it is copied beside the database.
            (garbage.as_path(), "first bytes are not SQLite's"),
            (missing.as_path(), "does not exist"),
            (db.as_path(), "the database itself"),
        ] {
            let err = restore(&db, from, &keep).unwrap_err();
            assert!(err.to_string().contains(want), "{from:?}: {err}");
            assert!(!keep.exists(), "{from:?}");
            assert!(!live.join(STAGING_DIR).exists(), "{from:?}");
        }
        assert_eq!(names(&live).await, ["a"]);
    }
}
