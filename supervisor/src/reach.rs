//! Whether the container's root can reach a host path. Under the user namespace the child
//! builds the container's file system as an unprivileged host id, with no capability over
//! host files: a root or bind source below a directory that id cannot search fails deep in
//! the child with a bare EACCES. Checked first here, the error can say which directory and
//! which host uid. (Mode bits only: an ACL that lets the id through is not seen, and then the
//! child's own error still names the path.)

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A directory on the way to a path that an id cannot search.
#[derive(Debug, PartialEq, Eq)]
pub struct Blocked {
    pub dir: PathBuf,
    pub mode: u32,
    pub owner: u32,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} (mode {:04o}, owner uid {}) cannot be searched by", self.dir.display(), self.mode, self.owner)
    }
}

/// The first directory from `/` to `path`'s parent that host `uid`/`gid` (no supplementary
/// groups) may not search; `None` if every one may be, or one cannot be read.
pub fn first_blocked(path: &Path, uid: u32, gid: u32) -> Option<Blocked> {
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs {
        let meta = std::fs::metadata(dir).ok()?;
        let mode = meta.mode() & 0o7777;
        let bit = if meta.uid() == uid {
            0o100
        } else if meta.gid() == gid {
            0o010
        } else {
            0o001
        };
        if mode & bit == 0 {
            return Some(Blocked { dir: dir.to_owned(), mode, owner: meta.uid() });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn finds_the_directory_that_stops_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        // Whatever the umask (an admin's may be 077): searchable but for the one under test.
        for d in [dir.path().to_path_buf(), inner.clone()] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let me = nix::unistd::geteuid().as_raw();
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let other = me.wrapping_add(12345);
        let blocked = first_blocked(&inner.join("c"), other, other).unwrap();
        assert_eq!(blocked.dir, dir.path().join("a/b").parent().unwrap());
        assert_eq!(blocked.mode, 0o700);
        // The owner itself may search it.
        assert_eq!(first_blocked(&inner.join("c"), me, me), None);
    }
}
