//! The data directory, trusted only as the proxy made it: a real directory (not a symlink),
//! owned by the proxy's user and closed to everyone else (no group or other permission bits),
//! holding regular files of the same owner and mode 0600, each opened without following a
//! symlink. Anything else is refused with what is wrong and how to fix it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::StoreError;

const LOCK_FILE: &str = "LOCK";

fn unsafe_dir(path: &Path, why: String, fix: String) -> StoreError {
    StoreError::Unsafe {
        path: path.to_path_buf(),
        why,
        fix,
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates the data directory (0700) when missing; refuses one the proxy cannot trust.
pub(super) fn ensure(dir: &Path) -> Result<(), StoreError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(super::io(dir)),
        Err(e) => Err(super::io(dir)(e)),
        Ok(meta) => check(dir, &meta, true),
    }
}

/// Checks that `path` (a directory when `dir`, else a file) is the proxy's own and private.
pub(super) fn check(path: &Path, meta: &fs::Metadata, dir: bool) -> Result<(), StoreError> {
    let shown = path.display();
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            path,
            "is a symbolic link".into(),
            format!("point queue.data_dir at the real directory, or remove the link {shown}"),
        ));
    }
    if dir && !meta.is_dir() {
        return Err(unsafe_dir(
            path,
            "is not a directory".into(),
            "point queue.data_dir at a directory (it is created 0700 when missing)".into(),
        ));
    }
    if !dir && !meta.is_file() {
        return Err(unsafe_dir(
            path,
            "is not a regular file".into(),
            format!("remove {shown}; the proxy creates its files itself"),
        ));
    }
    if meta.uid() != euid() {
        return Err(unsafe_dir(
            path,
            format!(
                "is owned by user {}, not by the proxy's user {}",
                meta.uid(),
                euid()
            ),
            format!("chown {} {shown}", euid()),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        let want = if dir { "700" } else { "600" };
        return Err(unsafe_dir(
            path,
            format!(
                "is open to other users (mode {mode:o}); it holds request bodies and credentials"
            ),
            format!("chmod {want} {shown}"),
        ));
    }
    Ok(())
}

/// Opens (creating 0600) a file of the data directory without following a symlink, and checks
/// what was opened.
pub(super) fn open_file(path: &Path, read: bool, append: bool) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(read)
        .append(append)
        .create(append)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                unsafe_dir(
                    path,
                    "is a symbolic link".into(),
                    format!("remove the link {}", path.display()),
                )
            } else {
                super::io(path)(e)
            }
        })?;
    let meta = file.metadata().map_err(super::io(path))?;
    check(path, &meta, false)?;
    Ok(file)
}

/// Takes an exclusive lock on the data directory for this process's lifetime.
pub(super) fn lock(dir: &Path) -> Result<File, StoreError> {
    ensure(dir)?;
    let path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(super::io(&path))?;
    check(&path, &lock.metadata().map_err(super::io(&path))?, false)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked(dir.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(super::io(&path)(e)),
    }
}

/// Replaces `dir/name` with `contents` as one step a crash cannot tear: a new file (0600),
/// synced, renamed over the old one, the directory synced. Returns the new file, for appending.
pub(super) fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<File> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
}
