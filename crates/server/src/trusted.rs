//! Files and folders that decide what Strongroom trusts: the configuration, the policy, the
//! data dir, and the keys and CAs that authenticate callers. Whoever can change one can grant
//! themselves reveals, so each must be owned by root or the user running Strongroom and
//! writable by that owner only, and so must every folder above it (a folder others may
//! write lets them swap the file between the check and the read). A folder with the sticky
//! bit (`/tmp`) is fine: others cannot rename or remove what they do not own there. As sshd's
//! `StrictModes` does for `authorized_keys`.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::ServerError;

/// The effective user id (what the kernel checks; no `/proc` needed).
pub(crate) fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Checks `path` (a file or a folder) and every folder above it.
///
/// # Errors
///
/// [`ServerError::Config`] saying what to run, or [`ServerError::File`] when it cannot be read.
pub(crate) fn check(path: &Path, what: &'static str) -> Result<(), ServerError> {
    // The folders first: once they are known to be nobody else's, the file cannot be
    // swapped, made or removed by anyone else between this check and its reader's open.
    check_folders_above(path, what)?;
    let meta = std::fs::metadata(path).map_err(ServerError::file(what, path))?;
    check_meta(path, &meta, what, false)
}

/// As [`check`] for a file that may not exist yet (its reader names a missing one): the
/// folders that do exist on its way are checked, so nobody else can make it meanwhile.
///
/// # Errors
///
/// As [`check`], but not for a missing file.
pub(crate) fn check_if_present(path: &Path, what: &'static str) -> Result<(), ServerError> {
    check_folders_above(path, what)?;
    match std::fs::metadata(path) {
        Ok(meta) => check_meta(path, &meta, what, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ServerError::file(what, path)(e)),
    }
}

/// Reads a trusted file through the handle that was checked (owner and mode, as [`check`]),
/// so the bytes read are those of the file checked, whatever happened to the path since its
/// folders were walked ([`check`] at start or reload). Zeroized when dropped: some are keys.
///
/// # Errors
///
/// As [`check`].
pub(crate) fn read(path: &Path, what: &'static str) -> Result<Zeroizing<Vec<u8>>, ServerError> {
    read_private(path, what, false)
}

/// As [`read`] for a secret (an HS256 secret): also refused when group or others may read it.
///
/// # Errors
///
/// As [`read`].
pub(crate) fn read_secret(
    path: &Path,
    what: &'static str,
) -> Result<Zeroizing<Vec<u8>>, ServerError> {
    read_private(path, what, true)
}

fn read_private(
    path: &Path,
    what: &'static str,
    secret: bool,
) -> Result<Zeroizing<Vec<u8>>, ServerError> {
    let mut file = File::open(path).map_err(ServerError::file(what, path))?;
    let meta = file.metadata().map_err(ServerError::file(what, path))?;
    check_meta(path, &meta, what, false)?;
    if secret {
        refuse_readable_by_others(path, &meta, what)?;
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes)
        .map_err(ServerError::file(what, path))?;
    Ok(bytes)
}

/// Refuses a secret file (`meta` is its metadata) that group or others may read: whoever
/// reads it holds the secret.
///
/// # Errors
///
/// [`ServerError::Config`] with the `chmod` that fixes it.
pub(crate) fn refuse_readable_by_others(
    path: &Path,
    meta: &std::fs::Metadata,
    what: &str,
) -> Result<(), ServerError> {
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ServerError::Config(format!(
            "{what} {} has mode {mode:04o}, so group or others can read it; run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Reads a trusted text file: checked through the handle it is read from, and its folders.
///
/// # Errors
///
/// As [`check`].
pub(crate) fn read_to_string(path: &Path, what: &'static str) -> Result<String, ServerError> {
    check_folders_above(path, what)?;
    let mut bytes = read(path, what)?;
    // Not secret (a policy, public keys): the text need not stay zeroizing.
    String::from_utf8(std::mem::take(&mut *bytes))
        .map_err(|_| ServerError::Config(format!("{what} {}: not UTF-8 text", path.display())))
}

/// Opens `path` to append to, creating it with mode 0600: folder by folder from the root
/// without following any link, each folder root's or this user's (a shared folder such as a
/// group-writable `/var/log` may hold it, but another user's folder swapped in on the way is
/// refused); then only a regular file, with one name, under the owner and mode rule of
/// [`check`]. Never blocks (a FIFO put in its place is refused, not waited on). For files
/// Strongroom writes, whose folder it does not own.
///
/// # Errors
///
/// [`ServerError::Config`] saying what is wrong, or [`ServerError::File`].
pub(crate) fn open_append(path: &Path, what: &'static str) -> Result<File, ServerError> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, fstat, openat, Mode, OFlags, CWD};
    let refuse = |why: String| ServerError::Config(format!("{what} {}: {why}", path.display()));
    let io = |e: rustix::io::Errno| ServerError::file(what, path)(e.into());
    let absolute = std::path::absolute(path).map_err(ServerError::file(what, path))?;
    let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return Err(refuse("not a file path".into()));
    };
    let folder_flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
    let me = euid();
    let mut dir = openat(CWD, "/", folder_flags, Mode::empty()).map_err(io)?;
    for part in parent.components() {
        match part {
            std::path::Component::RootDir => {}
            std::path::Component::Normal(step) => {
                let next = openat(&dir, step, folder_flags, Mode::empty()).map_err(|e| {
                    refuse(format!(
                        "cannot open the folder {step:?} on its way without following a link ({e})"
                    ))
                })?;
                let owner = fstat(&next).map_err(io)?.st_uid;
                if owner != 0 && owner != me {
                    return Err(refuse(format!(
                        "the folder {step:?} on its way is owned by uid {owner}, neither root \
                         nor uid {me}"
                    )));
                }
                dir = next;
            }
            _ => return Err(refuse("no `.` or `..` in the path, please".into())),
        }
    }
    let fd = openat(
        &dir,
        name,
        OFlags::WRONLY
            | OFlags::APPEND
            | OFlags::CREATE
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(io)?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(ServerError::file(what, path))?;
    if !meta.file_type().is_file() {
        return Err(refuse("not a regular file".into()));
    }
    check_meta(path, &meta, what, false)?;
    if meta.nlink() != 1 {
        return Err(refuse(
            "it has other names (hard links); give it one".into(),
        ));
    }
    let flags = fcntl_getfl(&file).map_err(io)?;
    fcntl_setfl(&file, flags - OFlags::NONBLOCK).map_err(io)?;
    Ok(file)
}

fn check_meta(
    path: &Path,
    meta: &std::fs::Metadata,
    what: &str,
    above: bool,
) -> Result<(), ServerError> {
    let mode = meta.permissions().mode() & 0o7777;
    let sticky_folder = above && meta.is_dir() && mode & 0o1000 != 0;
    let role = if above {
        format!("folder {} above the {what}", path.display())
    } else {
        format!("{what} {}", path.display())
    };
    if mode & 0o022 != 0 && !sticky_folder {
        return Err(ServerError::Config(format!(
            "{role} has mode {mode:04o}, so group or others can change it (and with it what \
             Strongroom trusts); run `chmod go-w {}`",
            path.display()
        )));
    }
    let me = euid();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(ServerError::Config(format!(
            "{role} is owned by uid {owner}, neither root nor the user running Strongroom (uid \
             {me}); run Strongroom as uid {owner} (e.g. `sudo -u '#{owner}' strongroom ...`), or \
             give it to root or uid {me} with `chown`",
            owner = meta.uid()
        )));
    }
    Ok(())
}

/// Walks `path` from the root as the kernel resolves it, checking every folder passed
/// through and every symlink met (a link's owner decides where it leads; its mode does not
/// matter), so nobody but root and this user can change what the path names between the
/// check and a later open.
fn check_folders_above(path: &Path, what: &str) -> Result<(), ServerError> {
    use std::collections::VecDeque;
    use std::path::Component;
    let absolute = std::path::absolute(path).map_err(ServerError::file("path", path))?;
    let mut todo: VecDeque<PathBuf> = VecDeque::new();
    let push_front = |todo: &mut VecDeque<PathBuf>, p: &Path| {
        for c in p.components().rev() {
            todo.push_front(c.as_os_str().into());
        }
    };
    push_front(&mut todo, &absolute);
    let root = PathBuf::from("/");
    let mut at = root.clone();
    let mut links = 0;
    let me = euid();
    let mut checked_root = false;
    // Whether the folder reached last lets anyone make entries (sticky, as /tmp): fine for
    // what is there, not for a name that is not there yet.
    let mut open_to_all = false;
    let shared = |meta: &std::fs::Metadata| meta.permissions().mode() & 0o022 != 0;
    while let Some(part) = todo.pop_front() {
        let component = part.components().next();
        match component {
            Some(Component::RootDir) => {
                at = root.clone();
                if !checked_root {
                    let meta =
                        std::fs::metadata(&root).map_err(ServerError::file("folder", &root))?;
                    check_meta(&root, &meta, what, true)?;
                    checked_root = true;
                }
                open_to_all = std::fs::metadata(&root).is_ok_and(|m| shared(&m));
            }
            Some(Component::ParentDir) => {
                at.pop();
                open_to_all = std::fs::metadata(&at).is_ok_and(|m| shared(&m));
            }
            Some(Component::Normal(name)) => {
                let next = at.join(name);
                let meta = match std::fs::symlink_metadata(&next) {
                    Ok(meta) => meta,
                    // Nothing past here exists; what leads to it was checked, so only its
                    // owners could make it -- unless anyone may make entries there.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        if open_to_all {
                            return Err(ServerError::Config(format!(
                                "{} (on the way to the {what} {}) does not exist, and anyone may \
                                 make it in {}; make it first, or keep the {what} in a folder \
                                 only root or this user can write",
                                next.display(),
                                path.display(),
                                at.display()
                            )));
                        }
                        return Ok(());
                    }
                    Err(e) => return Err(ServerError::file("path", &next)(e)),
                };
                if meta.file_type().is_symlink() {
                    links += 1;
                    if links > 40 {
                        return Err(ServerError::Config(format!(
                            "{what} {}: too many symlinks",
                            path.display()
                        )));
                    }
                    if meta.uid() != 0 && meta.uid() != me {
                        return Err(ServerError::Config(format!(
                            "symlink {} on the way to the {what} {} is owned by uid {}, neither \
                             root nor the user running Strongroom (uid {me}); whoever owns it \
                             decides where it leads",
                            next.display(),
                            path.display(),
                            meta.uid()
                        )));
                    }
                    let target =
                        std::fs::read_link(&next).map_err(ServerError::file("symlink", &next))?;
                    push_front(&mut todo, &target);
                    continue;
                }
                if !todo.is_empty() {
                    // A folder on the way (the last component is checked by the caller).
                    check_meta(&next, &meta, what, true)?;
                }
                open_to_all = meta.is_dir() && shared(&meta);
                at = next;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, b"bytes\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn reads_check_the_handle_they_read_from() {
        let dir = tempfile::tempdir().unwrap();
        let fine = file(dir.path(), "fine", 0o644);
        assert_eq!(&read(&fine, "x").unwrap()[..], b"bytes\n");
        assert_eq!(read_to_string(&fine, "x").unwrap(), "bytes\n");
        let shared = file(dir.path(), "shared", 0o664);
        let e = read(&shared, "CA file").unwrap_err().to_string();
        assert!(e.contains("CA file") && e.contains("chmod go-w"), "{e}");
        // A secret must not be readable by others either; a private one reads.
        let e = read_secret(&fine, "secret file").unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let private = file(dir.path(), "private", 0o600);
        assert_eq!(&read_secret(&private, "x").unwrap()[..], b"bytes\n");
        let text = file(dir.path(), "binary", 0o644);
        std::fs::write(&text, [0xff, 0xfe]).unwrap();
        let e = read_to_string(&text, "policy file")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        if euid() == 0 {
            // Another user's file, in a folder of ours.
            rustix::fs::chown(&private, Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
            let e = read_secret(&private, "secret file")
                .unwrap_err()
                .to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
            assert!(read(&private, "x").is_err());
        }
    }
}
