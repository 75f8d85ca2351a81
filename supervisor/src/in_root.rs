//! Paths inside a container's root, resolved inside that root. The root belongs to the payload:
//! anything in it may be a symlink (`/data/work -> /etc`), a FIFO or a device where a file was
//! expected, and it may change between two starts. So every path gpubox itself opens, creates
//! or mounts on inside a root is resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//! from a descriptor of the root, one component made at a time with `mkdirat`/`openat` relative
//! to its parent's descriptor, and mounts go onto the resulting descriptor
//! (`/proc/self/fd/N`), as runc does since CVE-2021-30465: an absolute symlink means the root's
//! `/`, `..` stops at the root, and nothing is ever made or mounted outside it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path};

/// `struct open_how` of openat2(2) (libc's is non-exhaustive, so it cannot be built here).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// What a mount point must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File,
}

/// Opens `path` (absolute or relative, taken relative to the root) in the tree whose root is
/// `root`, with `flags` (`O_CLOEXEC` is added), resolving it as if `root` were `/`.
pub fn open(root: BorrowedFd, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    open_how(root, path, flags, libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS)
}

/// As [`open`], but no symlink on the way at all: for a path gpubox made itself (a mount
/// point it attached), which a link could only mean the payload has moved since.
pub fn open_strict(root: BorrowedFd, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    open_how(root, path, flags, libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_SYMLINKS)
}

fn open_how(root: BorrowedFd, path: &Path, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    let rel = relative(path);
    let c = CString::new(if rel.as_os_str().is_empty() { b".".as_slice() } else { rel.as_os_str().as_bytes() })
        .map_err(io::Error::other)?;
    let how = OpenHow { flags: (flags | libc::O_CLOEXEC) as u64, mode: 0, resolve };
    // SAFETY: c is NUL-terminated, how is a valid open_how of the size passed; the result is
    // a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// An `O_PATH` descriptor of the mount point `path` in the root, made if missing: each missing
/// directory with `mkdirat` in its parent, the last as `kind` with `mode` (umask applies). Symlinks on the way are
/// followed inside the root (an absolute one from the root's `/`), and what a dangling one
/// names is made there, as runc's securejoin does: a link can never lead the making out of
/// the root, and never makes a start fail. Something of the wrong kind already there is an
/// error, as is a FIFO, socket or device where a file is wanted.
pub fn mount_point(root: BorrowedFd, path: &Path, kind: Kind, mode: u32) -> io::Result<OwnedFd> {
    let mut todo: std::collections::VecDeque<std::ffi::OsString> = names(path);
    let mut so_far = std::path::PathBuf::from("/");
    let mut current = open(root, Path::new("."), libc::O_PATH | libc::O_DIRECTORY)?;
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            so_far.pop();
            current = open(root, &so_far, libc::O_PATH | libc::O_DIRECTORY)?;
            continue;
        }
        let candidate = so_far.join(&name);
        let want = if todo.is_empty() { kind } else { Kind::Directory };
        let fd = match open(root, &candidate, libc::O_PATH | libc::O_NOFOLLOW) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Directories on the way get 0755, as `mkdir -p` gives them; the last `mode`.
                make(&current, &name, want, if todo.is_empty() { mode } else { 0o755 })?;
                open(root, &candidate, libc::O_PATH | libc::O_NOFOLLOW)?
            }
            Err(e) => return Err(e),
        };
        if let Some(target) = link_target(&fd)? {
            links += 1;
            if links > 40 {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            if target.is_absolute() {
                so_far = std::path::PathBuf::from("/");
                current = open(root, &so_far, libc::O_PATH | libc::O_DIRECTORY)?;
            }
            let rest: Vec<_> = todo.drain(..).collect();
            todo.extend(names(&target));
            todo.extend(rest);
            continue;
        }
        check_kind(&fd, want, &candidate)?;
        so_far = candidate;
        current = fd;
    }
    check_kind(&current, kind, &so_far)?;
    Ok(current)
}

/// The normal and `..` components of a path.
fn names(path: &Path) -> std::collections::VecDeque<std::ffi::OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// Makes `name` in the directory `parent` as `kind`; one made meanwhile is fine.
fn make(parent: &OwnedFd, name: &std::ffi::OsStr, kind: Kind, mode: u32) -> io::Result<()> {
    let c = CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: parent is an open directory descriptor and c is NUL-terminated; a descriptor
    // openat returns is closed right away.
    let r = unsafe {
        match kind {
            Kind::Directory => libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), mode as libc::mode_t),
            Kind::File => {
                let flags = libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC;
                let fd = libc::openat(parent.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint);
                if fd >= 0 {
                    libc::close(fd);
                }
                fd.min(0)
            }
        }
    };
    let e = io::Error::last_os_error();
    if r < 0 && e.kind() != io::ErrorKind::AlreadyExists {
        return Err(e);
    }
    Ok(())
}

/// Where a symlink (opened `O_PATH | O_NOFOLLOW`) points; `None` for anything else.
fn link_target(fd: &OwnedFd) -> io::Result<Option<std::path::PathBuf>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: fd is open; the empty path names it (an O_PATH symlink descriptor); buf has the
    // length passed.
    let n = unsafe { libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // Not a symlink.
        return if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    buf.truncate(n as usize);
    Ok(Some(std::path::PathBuf::from(std::ffi::OsString::from_vec(buf))))
}

/// `/proc/self/fd/N` for a descriptor: a path that mount(2) and friends resolve to the very
/// file the descriptor is, whatever happens to the path it was opened by.
pub fn fd_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Reads a regular file of at most `limit` bytes from the root, never following a link out
/// of it, never blocking on a FIFO or device (`/etc/passwd -> /dev/zero`).
pub fn read_small(root: BorrowedFd, path: &Path, limit: u64) -> io::Result<String> {
    // The type first, by an O_PATH descriptor: a device node is never opened (an open has
    // effects of its own), nor a FIFO.
    let located = File::from(open(root, path, libc::O_PATH)?);
    let meta = located.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a regular file", path.display())));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(fd_path(&located))?;
    if meta.size() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {limit} bytes ({})", path.display(), meta.size()),
        ));
    }
    let mut text = String::new();
    io::Read::read_to_string(&mut io::Read::take(file, limit), &mut text)?;
    Ok(text)
}

fn check_kind(fd: &OwnedFd, want: Kind, path: &Path) -> io::Result<()> {
    // SAFETY: fd is open for the duration of this borrow.
    let file = unsafe { std::mem::ManuallyDrop::new(File::from_raw_fd(fd.as_raw_fd())) };
    let t = file.metadata()?.file_type();
    let ok = match want {
        Kind::Directory => t.is_dir(),
        Kind::File => t.is_file() || t.is_char_device(),
    };
    if ok {
        Ok(())
    } else {
        let what = if t.is_dir() {
            "a directory"
        } else if t.is_symlink() {
            "a symlink"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not what a mount point needs"
        };
        Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is {what}", path.display())))
    }
}

/// `path` without its leading `/`, `.` and `..` kept for openat2 to confine.
fn relative(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_inside_the_root_and_mount_points_are_made_there() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = File::open(root.path()).unwrap();
        std::fs::create_dir(root.path().join("data")).unwrap();
        // An absolute link to a directory outside: inside the root it means the root's own.
        std::os::unix::fs::symlink(outside.path(), root.path().join("data/work")).unwrap();
        let fd = mount_point(r.as_fd_borrowed(), Path::new("/data/work/x"), Kind::Directory, 0o755).unwrap();
        // The link led to the same path inside the root: made there, nothing outside.
        assert!(root.path().join(outside.path().strip_prefix("/").unwrap()).join("x").is_dir());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_link(fd_path(&fd)).unwrap(),
            root.path().join(outside.path().strip_prefix("/").unwrap()).join("x")
        );
        // A dangling link: what it names is made, inside.
        std::os::unix::fs::symlink("/nowhere/at/all", root.path().join("dangling")).unwrap();
        mount_point(r.as_fd_borrowed(), Path::new("/dangling"), Kind::Directory, 0o755).unwrap();
        assert!(root.path().join("nowhere/at/all").is_dir());
        assert!(!Path::new("/nowhere").exists());
        // A relative link with `..` too many stays in.
        std::os::unix::fs::symlink("../../../../etc", root.path().join("up")).unwrap();
        mount_point(r.as_fd_borrowed(), Path::new("/up/cron.d"), Kind::Directory, 0o755).unwrap();
        assert!(root.path().join("etc/cron.d").is_dir());
        // `..` stops at the root.
        let fd = mount_point(r.as_fd_borrowed(), Path::new("/../../made"), Kind::File, 0o644).unwrap();
        assert!(root.path().join("made").is_file());
        let _ = fd;
        // A FIFO is not a file to read, and is not opened.
        nix::unistd::mkfifo(&root.path().join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let e = read_small(r.as_fd_borrowed(), Path::new("/fifo"), 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(mount_point(r.as_fd_borrowed(), Path::new("/fifo"), Kind::File, 0).is_err());
        std::fs::write(root.path().join("big"), vec![b'x'; 200]).unwrap();
        assert!(read_small(r.as_fd_borrowed(), Path::new("big"), 100).unwrap_err().to_string().contains("larger"));
        assert_eq!(read_small(r.as_fd_borrowed(), Path::new("big"), 1000).unwrap().len(), 200);
    }

    trait Borrow {
        fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
    }
    impl Borrow for File {
        fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
            std::os::fd::AsFd::as_fd(self)
        }
    }
}
