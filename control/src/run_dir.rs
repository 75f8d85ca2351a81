//! `/run/gpubox` and what lives in it, made with explicit modes. A real host's `/run` starts
//! empty and an admin's umask may be 077: whoever comes first (a unit's `RuntimeDirectory=`,
//! a standalone supervisor, `gpuboxctl run`) must leave the directory usable by the others.
//! The container's root is an unprivileged host id that has to walk to its staging nodes in
//! `/run/gpubox/NAME/devices`, so `/run/gpubox` is 0755 and `NAME` 0711; only the seccomp
//! cache is private.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::RUN_DIR;

/// Mode of `/run/gpubox`: everyone may walk to a container's runtime directory.
pub const BASE_MODE: u32 = 0o755;
/// Mode of `/run/gpubox/NAME`: walkable (staging nodes) but not listable.
pub const CONTAINER_MODE: u32 = 0o711;
/// Mode of directories only root may read (the seccomp cache).
pub const PRIVATE_MODE: u32 = 0o700;

/// Makes `/run/gpubox` (0755, root's) if it is missing and repairs the mode of one left 0700
/// by an older gpubox. Refuses a symlink or a directory root does not own.
pub fn ensure_base() -> io::Result<PathBuf> {
    let base = PathBuf::from(RUN_DIR);
    ensure_dir(&base, BASE_MODE)?;
    Ok(base)
}

/// Makes `dir` (whose parent exists) with exactly `mode`, whatever the umask; an existing
/// directory gets `mode` too. Returns whether it was made now.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<bool> {
    let made = match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(io::Error::new(e.kind(), format!("creating {}: {e}", dir.display()))),
    };
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a directory owned by root (uid {}); refusing to use it", dir.display(), meta.uid()),
        ));
    }
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io::Error::new(e.kind(), format!("setting the mode of {}: {e}", dir.display())))?;
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_exact_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        use nix::sys::stat::{umask, Mode};
        let old = umask(Mode::from_bits_truncate(0o077));
        let d = dir.path().join("x");
        let made = ensure_dir(&d, 0o755);
        umask(old);
        if nix::unistd::geteuid().is_root() {
            assert!(made.unwrap());
            assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o755);
            // An existing 0700 one is repaired.
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
            assert!(!ensure_dir(&d, 0o755).unwrap());
            assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o755);
        } else {
            // Not root's: refused rather than used.
            assert!(made.unwrap_err().to_string().contains("not a directory owned by root"));
        }
    }
}
