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
    let meta = std::fs::metadata(path).map_err(ServerError::file(what, path))?;
    check_meta(path, &meta, what, false)?;
    check_folders_above(path, what)
}

/// Reads a trusted text file: checked through the handle it is read from, and its folders.
///
/// # Errors
///
/// As [`check`].
pub(crate) fn read_to_string(path: &Path, what: &'static str) -> Result<String, ServerError> {
    let mut file = File::open(path).map_err(ServerError::file(what, path))?;
    let meta = file.metadata().map_err(ServerError::file(what, path))?;
    check_meta(path, &meta, what, false)?;
    check_folders_above(path, what)?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(ServerError::file(what, path))?;
    Ok(text)
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

/// The folders above `path` as written (a symlink's own folder counts) and above where it
/// leads.
fn check_folders_above(path: &Path, what: &str) -> Result<(), ServerError> {
    let absolute = std::path::absolute(path).map_err(ServerError::file("path", path))?;
    let mut seen: Vec<PathBuf> = Vec::new();
    let resolved = std::fs::canonicalize(path).ok();
    for start in std::iter::once(absolute).chain(resolved) {
        for folder in start.ancestors().skip(1) {
            if folder.as_os_str().is_empty() || seen.iter().any(|s| s == folder) {
                continue;
            }
            let meta = std::fs::metadata(folder).map_err(ServerError::file("folder", folder))?;
            check_meta(folder, &meta, what, true)?;
            seen.push(folder.to_owned());
        }
    }
    Ok(())
}
