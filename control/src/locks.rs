//! Reservations that only root can take: a container's name and its user-namespace id range.
//! Each is an `flock` on a root-owned file in `/run/gpubox/.locks` (0700), held by the
//! supervisor for its life. The kernel drops the lock when the supervisor's last descriptor
//! goes, even by SIGKILL, so nothing goes stale; and no local user or payload can take one,
//! as anyone could bind the abstract sockets used before.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::run_dir;

/// `/run/gpubox/.locks`, made (0700) if missing.
pub fn lock_dir() -> io::Result<PathBuf> {
    let dir = run_dir::ensure_base()?.join(".locks");
    run_dir::ensure_dir(&dir, run_dir::PRIVATE_MODE)?;
    Ok(dir)
}

fn lock_file(name: &str) -> io::Result<File> {
    open_lock_file(&lock_dir()?.join(name))
}

/// Opens (making it, 0600) a lock file at `path`, never through a symlink.
pub fn open_lock_file(path: &std::path::Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// A held reservation; released when dropped or when the process ends.
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// Takes the lock `name` (`name-NAME`, `idrange-BASE`) without waiting: `Ok(None)` when
/// another process holds it.
pub fn try_lock(name: &str) -> io::Result<Option<Lock>> {
    try_lock_mode(name, true)
}

/// As [`try_lock`], exclusive or shared (many shared holders at once, none beside an exclusive).
pub fn try_lock_mode(name: &str, exclusive: bool) -> io::Result<Option<Lock>> {
    let file = lock_file(name)?;
    let how =
        if exclusive { nix::fcntl::FlockArg::LockExclusiveNonblock } else { nix::fcntl::FlockArg::LockSharedNonblock };
    match nix::fcntl::Flock::lock(file, how) {
        Ok(locked) => Ok(Some(Lock(locked))),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// Whether a supervisor holds container `name`'s lock; `None` when this process may not look
/// (not root).
pub fn held(name: &str) -> Option<bool> {
    let path = PathBuf::from(crate::RUN_DIR).join(".locks").join(format!("name-{name}"));
    let file = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        // Not root (the lock directory is 0700): cannot tell.
        Err(_) => return None,
    };
    match file {
        None => Some(false),
        Some(file) => match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
            Ok(_) => Some(false),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Some(true),
            Err(_) => None,
        },
    }
}

/// Who holds GPU `key` (see the supervisor's allocator): `(container, exclusive)` for each live
/// holder file `holders/KEY@NAME`; stale ones (their holder gone) are removed on the way.
/// Empty for a caller that may not look (not root).
pub fn holders(key: &str) -> Vec<(String, bool)> {
    let dir = PathBuf::from(crate::RUN_DIR).join(".locks/holders");
    let prefix = format!("{key}@");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(container) = file.strip_prefix(&prefix) else { continue };
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let live =
            File::open(entry.path()).ok().map(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock));
        match live {
            Some(Err((_, nix::errno::Errno::EWOULDBLOCK))) => {
                found.push((container.to_owned(), text.trim() == "exclusive"))
            }
            Some(_) => {
                let _ = std::fs::remove_file(entry.path());
            }
            None => {}
        }
    }
    found.sort();
    found
}
