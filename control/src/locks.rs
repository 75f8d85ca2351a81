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

fn lock_dir() -> io::Result<PathBuf> {
    let dir = run_dir::ensure_base()?.join(".locks");
    run_dir::ensure_dir(&dir, run_dir::PRIVATE_MODE)?;
    Ok(dir)
}

fn lock_file(name: &str) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(lock_dir()?.join(name))
}

/// A held reservation; released when dropped or when the process ends.
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// Takes the lock `name` (`name-NAME`, `idrange-BASE`) without waiting: `Ok(None)` when
/// another process holds it.
pub fn try_lock(name: &str) -> io::Result<Option<Lock>> {
    let file = lock_file(name)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(locked) => Ok(Some(Lock(locked))),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// Whether a supervisor holds container `name`'s lock; `None` when this process may not look
/// (not root).
pub fn held(name: &str) -> Option<bool> {
    let path = PathBuf::from(crate::RUN_DIR).join(".locks").join(format!("name-{name}"));
    let file = File::open(path).ok();
    match file {
        None => Some(false),
        Some(file) => match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
            Ok(_) => Some(false),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Some(true),
            Err(_) => None,
        },
    }
}
