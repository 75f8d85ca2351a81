//! `DriverLibraries=yes` inside the container: the host driver's libraries go into the
//! directory the container's own loader searches by default (the one holding its `libc.so.6`),
//! its tools into `/usr/bin`, so that a payload finds them with the environment it likes,
//! even an empty one (NVIDIA's toolkit updates the container's ld cache for the same reason).
//!
//! The root is never written to. Each of those directories gets an overlay whose upper layer
//! is a private tmpfs: the mount points are made there, the host files are bound onto them,
//! and the overlay is then made read-only. So this works with a root owned by host root under
//! the user namespace, with `ReadOnly=yes`, and leaves the root exactly as it was. A file of
//! the same name in the root (a stub `libcuda.so.1`) is hidden by the host's, which is what
//! the kernel module needs.

use crate::in_root;
use crate::sys;
use anyhow::{bail, Context, Result};
use gpubox_devices::driver::DriverFiles;
use nix::mount::{mount, MsFlags};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Component, Path, PathBuf};

/// Library directories a loader searches by default, most specific first.
fn library_dirs() -> &'static [&'static str] {
    match std::env::consts::ARCH {
        "x86_64" => &["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "lib64", "usr/lib", "lib"],
        "aarch64" => &["usr/lib/aarch64-linux-gnu", "lib/aarch64-linux-gnu", "usr/lib64", "lib64", "usr/lib", "lib"],
        _ => &["usr/lib64", "lib64", "usr/lib", "lib"],
    }
}
const TOOL_DIRS: &[&str] = &["usr/bin", "bin"];

/// The driver's host files, opened before the container's file system hides any of them.
pub struct Opened {
    libraries: Vec<(String, File)>,
    binaries: Vec<(String, File)>,
    /// A directory of the host (in the runtime directory) for the overlays' upper layers.
    scratch: PathBuf,
}

pub fn open(files: &DriverFiles, scratch: &Path) -> Result<Opened> {
    let open = |list: &[gpubox_devices::driver::DriverFile]| -> Result<Vec<(String, File)>> {
        list.iter()
            .map(|f| {
                let fd = nix::fcntl::open(
                    &f.host,
                    nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .with_context(|| format!("DriverLibraries=yes: opening {}", f.host.display()))?;
                Ok((f.name.clone(), File::from(fd)))
            })
            .collect()
    };
    Ok(Opened { libraries: open(&files.libraries)?, binaries: open(&files.binaries)?, scratch: scratch.to_owned() })
}

/// Puts the driver into the container's root (mounted at `root`, not yet pivoted into).
pub fn inject(root: &Path, opened: &Opened) -> Result<()> {
    let scratch = &opened.scratch;
    mount(Some("gpubox-driver"), scratch, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))
        .with_context(|| format!("DriverLibraries=yes: mounting a tmpfs on {}", scratch.display()))?;
    let Some(lib_dir) = library_dir(root) else {
        bail!(
            "DriverLibraries=yes: the root {} has none of the library directories a loader searches ({})",
            root.display(),
            library_dirs().iter().map(|d| format!("/{d}")).collect::<Vec<_>>().join(", ")
        );
    };
    overlay_with(root, lib_dir, &scratch.join("lib"), &opened.libraries)?;
    if !opened.binaries.is_empty() {
        if let Some(bin_dir) = TOOL_DIRS.iter().copied().find(|d| real_dir(root, d)) {
            overlay_with(root, bin_dir, &scratch.join("bin"), &opened.binaries)?;
        }
    }
    Ok(())
}

/// The loader's directory in this root: the first that holds `libc.so.6`, else the first there is.
fn library_dir(root: &Path) -> Option<&'static str> {
    let dirs = library_dirs();
    let exists = dirs.iter().copied().filter(|d| real_dir(root, d));
    let mut fallback = None;
    for d in exists {
        if root.join(d).join("libc.so.6").exists() {
            return Some(d);
        }
        fallback = fallback.or(Some(d));
    }
    fallback
}

/// Whether `rel` is a directory in `root` reached without following any symlink (a link
/// could lead out of the root).
fn real_dir(root: &Path, rel: &str) -> bool {
    let mut path = root.to_owned();
    for c in Path::new(rel).components() {
        let Component::Normal(part) = c else { return false };
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// Mounts an overlay on `root/dir` (its own content below, a tmpfs directory above), binds
/// each file onto a mount point made in it, and makes the whole read-only. Everything inside
/// the root goes by descriptor, resolved with no symlink at all: another container sharing a
/// writable root could swap a directory for a link between a check and its use.
fn overlay_with(root: &Path, dir: &str, scratch: &Path, files: &[(String, File)]) -> Result<()> {
    let root_fd = File::open(root).with_context(|| format!("opening {}", root.display()))?;
    let root_fd = root_fd.as_fd();
    let lower = in_root::open_strict(root_fd, Path::new(dir), libc::O_PATH | libc::O_DIRECTORY)
        .with_context(|| format!("DriverLibraries=yes: /{dir}"))?;
    let target = PathBuf::from(in_root::fd_path(&lower));
    let (upper, work) = (scratch.join("upper"), scratch.join("work"));
    for d in [scratch, &upper, &work] {
        std::fs::create_dir(d).with_context(|| format!("DriverLibraries=yes: creating {}", d.display()))?;
    }
    let options = format!("lowerdir={},upperdir={},workdir={}", escape(&target), escape(&upper), escape(&work));
    // userxattr: the overlay's own bookkeeping in user.* attributes, as a user namespace needs.
    mount(Some("overlay"), &target, Some("overlay"), MsFlags::empty(), Some(format!("{options},userxattr").as_str()))
        .or_else(|_| mount(Some("overlay"), &target, Some("overlay"), MsFlags::empty(), Some(options.as_str())))
        .with_context(|| format!("DriverLibraries=yes: mounting an overlay on /{dir}"))?;
    // The overlay's own root now (the descriptor above names the directory under it).
    let merged = in_root::open_strict(root_fd, Path::new(dir), libc::O_PATH | libc::O_DIRECTORY)
        .with_context(|| format!("DriverLibraries=yes: /{dir} after its overlay"))?;
    let merged_dir = File::from(in_root::open_strict(root_fd, Path::new(dir), libc::O_RDONLY | libc::O_DIRECTORY)?);
    for (name, source) in files {
        let at = |flags| in_root::open(merged.as_fd(), Path::new(name), flags);
        let cname = std::ffi::CString::new(name.as_str())?;
        // Only in the overlay's upper layer: a whiteout hides the root's own file or link.
        let existing =
            at(libc::O_PATH | libc::O_NOFOLLOW).map(|fd| File::from(fd).metadata().is_ok_and(|m| m.is_file()));
        match existing {
            Ok(true) => {}
            Ok(false) => {
                // SAFETY: merged_dir is an open directory and cname is NUL-terminated; unlinkat
                // removes the entry itself, never what a link names.
                if unsafe { libc::unlinkat(merged_dir.as_raw_fd(), cname.as_ptr(), 0) } < 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("DriverLibraries=yes: replacing /{dir}/{name}"));
                }
                create_in(&merged_dir, &cname)
                    .with_context(|| format!("DriverLibraries=yes: creating /{dir}/{name}"))?;
            }
            Err(_) => create_in(&merged_dir, &cname)
                .with_context(|| format!("DriverLibraries=yes: creating /{dir}/{name}"))?,
        }
        let point =
            at(libc::O_PATH | libc::O_NOFOLLOW).with_context(|| format!("DriverLibraries=yes: /{dir}/{name}"))?;
        let via = format!("/proc/self/fd/{}", source.as_raw_fd());
        mount(Some(via.as_str()), Path::new(&in_root::fd_path(&point)), None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("DriverLibraries=yes: binding the host's {name} to /{dir}/{name}"))?;
    }
    sys::mount_setattr_fd(&merged, sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID)
        .with_context(|| format!("DriverLibraries=yes: making /{dir} read-only"))
}

/// A new, empty file `name` in `dir` (never through a link, never an existing one).
fn create_in(dir: &File, name: &std::ffi::CStr) -> std::io::Result<()> {
    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC;
    // SAFETY: dir is an open directory and name is NUL-terminated; the descriptor openat
    // returns is closed right away.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o644 as libc::c_uint) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor owned by nobody else.
    unsafe { libc::close(fd) };
    Ok(())
}

/// A path in overlayfs's option string, where `,` and `:` separate and `\` escapes.
fn escape(path: &Path) -> String {
    let mut out = String::new();
    for c in path.to_string_lossy().chars() {
        if matches!(c, '\\' | ',' | ':') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_escape_separators() {
        assert_eq!(escape(Path::new("/a,b:c\\d")), "/a\\,b\\:c\\\\d");
    }

    #[test]
    fn the_loader_directory_is_the_one_with_libc() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/lib")).unwrap();
        std::fs::create_dir_all(r.join("lib64")).unwrap();
        assert_eq!(library_dir(r), Some("lib64"));
        std::fs::write(r.join("usr/lib/libc.so.6"), "").unwrap();
        assert_eq!(library_dir(r), Some("usr/lib"));
        // A symlinked directory is not followed (it could lead out of the root).
        std::os::unix::fs::symlink("/usr/lib", r.join("usr/lib64")).unwrap();
        assert!(!real_dir(r, "usr/lib64"));
        assert!(library_dir(tempfile::tempdir().unwrap().path()).is_none());
    }
}
