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
    private_dir(".locks")
}

/// `/run/gpubox/REL`, a root-only directory, made if missing and its mode set once per
/// process: the allocator asks for its directories at every try of a wait.
pub fn private_dir(rel: &str) -> io::Result<PathBuf> {
    static MADE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let dir = PathBuf::from(crate::RUN_DIR).join(rel);
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if !made.contains(&dir) {
        run_dir::ensure_base()?;
        if let Some(parent) = std::path::Path::new(rel).parent().filter(|p| !p.as_os_str().is_empty()) {
            run_dir::ensure_dir(&PathBuf::from(crate::RUN_DIR).join(parent), run_dir::PRIVATE_MODE)?;
        }
        run_dir::ensure_dir(&dir, run_dir::PRIVATE_MODE)?;
        made.push(dir.clone());
    }
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
    is_locked(&PathBuf::from(crate::RUN_DIR).join(".locks").join(format!("name-{name}")))
}

/// Whether any process holds an `flock` on the file at `path` (`Some(false)` when there is no
/// such file; `None` when it cannot be looked at). Read from `/proc/locks` rather than by trying
/// the lock: a look that took it, even shared for a moment, would make a supervisor's own
/// non-blocking lock of it fail ("already running").
pub fn is_locked(path: &std::path::Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(false),
        Err(_) => return None,
    };
    let (major, minor, inode) = (libc::major(meta.dev()) as u64, libc::minor(meta.dev()) as u64, meta.ino());
    let table = std::fs::read_to_string("/proc/locks").ok()?;
    Some(table.lines().filter(|l| !l.contains("->")).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"FLOCK")
            && f.get(5).is_some_and(|id| {
                let mut parts = id.split(':');
                let hex = |p: Option<&str>| p.and_then(|p| u64::from_str_radix(p, 16).ok());
                hex(parts.next()) == Some(major)
                    && hex(parts.next()) == Some(minor)
                    && parts.next().and_then(|p| p.parse().ok()) == Some(inode)
            })
    }))
}

/// Takes `flock(LOCK_EX|LOCK_NB)` on a file that others may sweep away when they find it
/// unlocked (holder files, queue places): made, locked, and checked to still be the file at
/// `path` (a sweep between the making and the locking unlinks it), else made again.
pub fn create_locked(path: &std::path::Path) -> io::Result<nix::fcntl::Flock<File>> {
    use std::os::unix::fs::MetadataExt;
    for _ in 0..10 {
        let file = open_lock_file(path)?;
        let locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io::Error::new(io::ErrorKind::WouldBlock, format!("{}: {e}", path.display())))?;
        let same =
            std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == locked.metadata().map(|l| l.ino()).unwrap_or(0));
        if same {
            return Ok(locked);
        }
    }
    Err(io::Error::other(format!("{}: swept away again and again", path.display())))
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
        match is_locked(&entry.path()) {
            Some(true) => {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                found.push((container.to_owned(), text.trim() == "exclusive"));
            }
            // Its holder is gone (a new holder re-checks its file after locking it).
            Some(false) => {
                let _ = std::fs::remove_file(entry.path());
            }
            None => {}
        }
    }
    found.sort();
    found
}
