//! The container's file system, built inside its private mount namespace and never visible
//! to the host: the root (the definition's `RootDirectory=` or the host's `/` read-only),
//! a fresh `/proc` with runc's masked and read-only paths, `/sys` read-only, a tmpfs `/dev`
//! with only the standard nodes, a new devpts instance, the GPU nodes, the binds, and finally
//! `pivot_root` with the old root detached.

use crate::in_root;
use crate::sys;
use anyhow::{bail, Context, Result};
use gpubox_definition::Bind;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

pub struct Layout<'a> {
    pub root_directory: Option<&'a Path>,
    /// The root's idmapped copy, which the supervisor attached here (idmapped.rs), if it is one.
    pub root_mount: Option<&'a Path>,
    /// `/dev/shm`'s size, as tmpfs's `size=` takes it.
    pub shm_size: &'a str,
    pub read_only: bool,
    pub binds: &'a [Bind],
    /// Device nodes: (staging node made for this container, path inside).
    pub devices: &'a [(PathBuf, PathBuf)],
    /// A new network namespace (sysfs can be mounted fresh), rather than the host's.
    pub private_network: bool,
    /// The supervisor's terminal, bound at `/dev/console`.
    pub console: Option<PathBuf>,
    /// `DriverLibraries=yes`: the host driver's files, and the scratch directory for them.
    pub driver: Option<(&'a gpubox_devices::driver::DriverFiles, &'a Path)>,
    /// Paths in /proc hidden behind an empty directory (other GPUs' driver entries).
    pub hidden: &'a [PathBuf],
}

/// Files and directories under /proc that hide host information or allow host changes
/// (runc's and crun's defaults).
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READ_ONLY: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// Nodes a container's `/dev` holds besides its GPUs, bound from the host's.
pub const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

const HOST_ROOT_STAGING: &str = "/tmp/.gpubox-root";

fn mnt(source: Option<&str>, target: &Path, fstype: Option<&str>, flags: MsFlags, data: Option<&str>) -> Result<()> {
    mount(source, target, fstype, flags, data)
        .with_context(|| format!("mounting {} on {}", fstype.or(source).unwrap_or("(remount)"), target.display()))
}

fn bind(source: &Path, target: &Path, flags: MsFlags) -> Result<()> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND | flags, None::<&str>)
        .with_context(|| format!("binding {} to {}", source.display(), target.display()))
}

/// Builds the file system and pivots into it. Runs in the child, in its own mount namespace.
pub fn build(layout: &Layout) -> Result<()> {
    // Bind sources are opened first, while the host's tree is still as the user sees it (the
    // container's /tmp will hide the host's), and bound through /proc/self/fd later.
    let sources = open_bind_sources(layout.binds)?;
    let driver = layout.driver.map(|(files, scratch)| crate::driver_mounts::open(files, scratch)).transpose()?;
    // Nothing mounted here may propagate back to the host.
    mnt(None, Path::new("/"), None, MsFlags::MS_REC | MsFlags::MS_SLAVE, None)?;

    let root = match layout.root_directory {
        Some(dir) => {
            let named = dir;
            let dir = layout.root_mount.unwrap_or(dir);
            if !dir.is_dir() {
                bail!("RootDirectory={} is not a directory", named.display());
            }
            bind(dir, dir, MsFlags::MS_REC)?;
            if layout.read_only {
                sys::mount_setattr_recursive(dir, sys::MOUNT_ATTR_RDONLY).context("making the root read-only")?;
                scratch_tmpfs(open_dir(dir)?.as_fd())?;
            }
            dir.to_owned()
        }
        None => {
            // The host's / cannot be bound onto itself and pivoted into, so it is bound below a
            // private tmpfs on /tmp; the container gets fresh tmpfs on /tmp, /run and /var/tmp.
            let tmp = Path::new("/tmp");
            mnt(Some("tmpfs"), tmp, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
            let staging = Path::new(HOST_ROOT_STAGING);
            fs::create_dir(staging).context("creating the staging directory")?;
            bind(Path::new("/"), staging, MsFlags::MS_REC)?;
            sys::mount_setattr_recursive(staging, sys::MOUNT_ATTR_RDONLY).context("making the host's / read-only")?;
            scratch_tmpfs(open_dir(staging)?.as_fd())?;
            staging.to_owned()
        }
    };

    // Every path below the root is resolved inside it from here on (in_root.rs).
    let root_fd = open_dir(&root)?;
    let root_fd = root_fd.as_fd();
    proc(root_fd, layout.hidden)?;
    sys(root_fd, layout.private_network)?;
    dev(root_fd, layout)?;
    for (b, source) in &sources {
        user_bind(root_fd, b, source)?;
    }
    if let Some(driver) = &driver {
        crate::driver_mounts::inject(&root, driver)?;
    }
    pivot(&root)?;
    if layout.root_directory.is_none() {
        let _ = fs::remove_dir(HOST_ROOT_STAGING);
    }
    Ok(())
}

/// A descriptor of a directory the supervisor trusts (the root itself), to resolve in.
fn open_dir(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
        .with_context(|| format!("opening {}", path.display()))
}

/// The directory `path` inside the root, if it is one (links followed inside the root).
fn dir_in_root(root: BorrowedFd, path: &str) -> Option<OwnedFd> {
    in_root::open(root, Path::new(path), libc::O_PATH | libc::O_DIRECTORY).ok()
}

/// A read-only root gets fresh, writable tmpfs where programs expect to write.
fn scratch_tmpfs(root: BorrowedFd) -> Result<()> {
    for dir in ["/tmp", "/run", "/var/tmp"] {
        if let Some(target) = dir_in_root(root, dir) {
            let mode = if dir == "/run" { "mode=755" } else { "mode=1777" };
            mnt(
                Some("tmpfs"),
                Path::new(&in_root::fd_path(&target)),
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(mode),
            )
            .with_context(|| format!("on {dir}"))?;
        }
    }
    Ok(())
}

/// The mount point `path` inside the root as a path for mount(2): its descriptor's.
fn point(root: BorrowedFd, path: &Path, kind: in_root::Kind) -> Result<(OwnedFd, PathBuf)> {
    let fd = in_root::mount_point(root, path, kind, if kind == in_root::Kind::Directory { 0o755 } else { 0o644 })
        .with_context(|| format!("the mount point {} in the container", path.display()))?;
    let via = PathBuf::from(in_root::fd_path(&fd));
    Ok((fd, via))
}

fn proc(root: BorrowedFd, hidden: &[PathBuf]) -> Result<()> {
    let Some(target) = dir_in_root(root, "/proc") else { bail!("the root has no /proc directory") };
    let target = PathBuf::from(in_root::fd_path(&target));
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt(Some("proc"), &target, Some("proc"), flags, None).context("on /proc")?;
    // A fresh descriptor: the one above is of the directory under the new mount.
    let proc = in_root::open(root, Path::new("/proc"), libc::O_PATH | libc::O_DIRECTORY)?;
    for path in READ_ONLY {
        let rel = Path::new(path.trim_start_matches("/proc/"));
        if let Ok(p) = in_root::open(proc.as_fd(), rel, libc::O_PATH) {
            let p = PathBuf::from(in_root::fd_path(&p));
            bind(&p, &p, MsFlags::MS_REC)?;
            // The bind's own root now (a descriptor opened before names what it covers).
            let bound = in_root::open(proc.as_fd(), rel, libc::O_PATH)?;
            let attrs =
                sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV | sys::MOUNT_ATTR_NOEXEC;
            sys::mount_setattr_fd(&bound, attrs).with_context(|| format!("making {path} read-only"))?;
        }
    }
    for path in hidden {
        let rel = path.strip_prefix("/proc").unwrap_or(path);
        if let Ok(p) = in_root::open(proc.as_fd(), rel, libc::O_PATH | libc::O_NOFOLLOW) {
            mask(&p)?;
        }
    }
    Ok(())
}

fn sys(root: BorrowedFd, private_network: bool) -> Result<()> {
    let Some(target) = dir_in_root(root, "/sys") else { bail!("the root has no /sys directory") };
    let target = PathBuf::from(in_root::fd_path(&target));
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    // sysfs can be mounted only by the owner of the network namespace; with the host's network
    // the host's /sys is bound read-only instead.
    if !private_network || mount(Some("sysfs"), &target, Some("sysfs"), flags, None::<&str>).is_err() {
        bind(Path::new("/sys"), &target, MsFlags::MS_REC)?;
        let sys = in_root::open(root, Path::new("/sys"), libc::O_PATH | libc::O_DIRECTORY)?;
        sys::mount_setattr_fd(&sys, sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID)
            .context("making /sys read-only")?;
    } else {
        let sys = in_root::open(root, Path::new("/sys"), libc::O_PATH | libc::O_DIRECTORY)?;
        if let Ok(cgroup) = in_root::open(sys.as_fd(), Path::new("fs/cgroup"), libc::O_PATH | libc::O_DIRECTORY) {
            // The container's own cgroup (its cgroup namespace's root), read-only.
            let _ = mount(Some("cgroup2"), Path::new(&in_root::fd_path(&cgroup)), Some("cgroup2"), flags, None::<&str>);
        }
    }
    for path in MASKED {
        if let Ok(p) = in_root::open(root, Path::new(path), libc::O_PATH | libc::O_NOFOLLOW) {
            mask(&p)?;
        }
    }
    Ok(())
}

/// Hides a file behind /dev/null, a directory behind an empty read-only tmpfs.
fn mask(fd: &OwnedFd) -> Result<()> {
    let path = PathBuf::from(in_root::fd_path(fd));
    match fs::metadata(&path) {
        Ok(m) if m.is_dir() => mnt(Some("tmpfs"), &path, Some("tmpfs"), MsFlags::MS_RDONLY, Some("size=0,mode=0")),
        Ok(_) => bind(Path::new("/dev/null"), &path, MsFlags::empty()),
        Err(_) => Ok(()),
    }
}

fn dev(root: BorrowedFd, layout: &Layout) -> Result<()> {
    let Some(target) = dir_in_root(root, "/dev") else { bail!("the root has no /dev directory") };
    let target = PathBuf::from(in_root::fd_path(&target));
    mnt(Some("tmpfs"), &target, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=755,size=65536k"))?;
    // Our own, fresh tmpfs from here: nothing of the root's is in it.
    let dev_fd = in_root::open(root, Path::new("/dev"), libc::O_PATH | libc::O_DIRECTORY)?;
    let dev = PathBuf::from(in_root::fd_path(&dev_fd));
    for node in DEV_NODES {
        bind_node(&Path::new("/dev").join(node), &dev.join(node))?;
    }
    if let Some(console) = &layout.console {
        bind_node(console, &dev.join("console"))?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts)?;
    mnt(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .or_else(|_| {
        mnt(
            Some("devpts"),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
    })?;
    symlink("pts/ptmx", dev.join("ptmx"))?;
    let shm = dev.join("shm");
    fs::create_dir(&shm)?;
    let options = format!("mode=1777,size={}", layout.shm_size);
    mnt(Some("shm"), &shm, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(&options))?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link))?;
    }
    for (source, path) in layout.devices {
        let (_fd, via) = point(root, path, in_root::Kind::File)?;
        bind(source, &via, MsFlags::empty())?;
    }
    Ok(())
}

/// Bind-mounts one host node; a node cannot be created with mknod in a user namespace.
fn bind_node(host: &Path, target: &Path) -> Result<()> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::File::create(target).with_context(|| format!("creating {}", target.display()))?;
    bind(host, target, MsFlags::empty())
}

fn open_bind_sources(binds: &[Bind]) -> Result<Vec<(&Bind, std::fs::File)>> {
    let mut opened = Vec::new();
    for b in binds {
        let flags = nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC;
        match nix::fcntl::open(&b.source, flags, nix::sys::stat::Mode::empty()) {
            Ok(fd) => opened.push((b, std::fs::File::from(fd))),
            Err(_) if b.optional => {}
            Err(e) => bail!("Bind source {}: {}", b.source.display(), e.desc()),
        }
    }
    Ok(opened)
}

fn user_bind(root: BorrowedFd, b: &Bind, source: &std::fs::File) -> Result<()> {
    use std::os::fd::AsRawFd;
    let via = PathBuf::from(format!("/proc/self/fd/{}", source.as_raw_fd()));
    let source_meta = fs::metadata(&via).with_context(|| format!("Bind source {}", b.source.display()))?;
    let kind = if source_meta.is_dir() { in_root::Kind::Directory } else { in_root::Kind::File };
    let (_target, target) = point(root, &b.destination, kind).with_context(|| {
        format!(
            "Bind={}:{} (is the root read-only, or not writable by the container's root?)",
            b.source.display(),
            b.destination.display()
        )
    })?;
    mount(Some(&via), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .with_context(|| format!("binding {} to {}", b.source.display(), b.destination.display()))?;
    if b.read_only {
        // The descriptor above is of the mount point under the bind: the bind's own root.
        let bound = in_root::open(root, &b.destination, libc::O_PATH)?;
        sys::mount_setattr_fd(&bound, sys::MOUNT_ATTR_RDONLY)
            .with_context(|| format!("making {} read-only", b.destination.display()))?;
    }
    Ok(())
}

fn pivot(root: &Path) -> Result<()> {
    nix::unistd::chdir(root).with_context(|| format!("entering {}", root.display()))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    // only the new root, without needing a directory for the old one.
    nix::unistd::pivot_root(".", ".").context("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
    nix::unistd::chdir("/").context("entering /")?;
    Ok(())
}
