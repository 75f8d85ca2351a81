//! Trees that keep their ownership under the user namespace: `RootDirectory=` and `Bind=`
//! sources with the `idmap` option. An ordinary tree, made by host root (as every unpacked
//! image is), is unusable to a container whose root is an unprivileged host id: its root cannot
//! write `/root`, make a cache directory or a bind's mount point. An idmapped mount (Linux
//! 5.12, `mount_setattr(MOUNT_ATTR_IDMAP)`) with the container's user namespace shows each file
//! with its ids as seen from inside: a file of host root is root's inside, a file of uid 1000
//! stays 1000's, and what container root writes is written as host root. Nothing is chowned.
//!
//! The supervisor makes them (only host root may), as detached copies of the host's trees
//! made idmapped, and attaches them in the container's mount namespace at mount points in its
//! runtime directory, which the child then takes as the root or the bind's source. A file
//! system that cannot be idmapped fails the start, naming it. See docs/architecture.md.

use crate::sys;
use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

/// A host tree and where, in the container's mount namespace, its idmapped copy goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Idmap {
    /// `RootDirectory=/srv/root` or `Bind=/srv/data`, for errors.
    pub what: String,
    pub source: PathBuf,
    /// A directory in the container's runtime directory (reachable by the container's root).
    pub target: PathBuf,
}

/// An image's root (image.rs): its layers stacked by overlayfs under the container's
/// writable layer, mounted at `target` in the container's mount namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Overlay {
    /// `Image=…`, for errors.
    pub what: String,
    /// Top first: the layers' copies (idmapped under the user namespace), all in one directory.
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub target: PathBuf,
    /// The image store's root, for messages.
    pub store: PathBuf,
    /// Under the user namespace, the host id of the container's root: the overlay is mounted
    /// with it as its file-system id, because overlayfs works in its layers with its mounter's
    /// credentials (copy-up, whiteouts, its work directory), and through idmapped layers only
    /// an id the idmapping maps can create a file. The capabilities stay the supervisor's.
    pub creator: Option<u32>,
    /// An ephemeral writable layer, thrown away at the end: overlayfs's `volatile` skips every
    /// sync to it, above all the whole file system's sync at the unmount.
    pub volatile: bool,
}

impl Overlay {
    fn mount(&self) -> Result<()> {
        let Some(id) = self.creator else { return self.mount_now() };
        // SAFETY: setfsuid/setfsgid only change this (single-threaded) process's file-system
        // ids; they are set back below whatever the mount did.
        unsafe {
            libc::setfsgid(id);
            libc::setfsuid(id);
        }
        // A file-system id other than 0 drops the file capabilities from the effective set
        // (capabilities(7)); they are still permitted, and overlayfs needs them to copy files up
        // whoever owns them.
        let restored = caps::read(None, caps::CapSet::Permitted)
            .and_then(|permitted| caps::set(None, caps::CapSet::Effective, &permitted));
        let mounted = restored.map_err(anyhow::Error::from).and_then(|_| self.mount_now());
        // SAFETY: as above; back to root's file-system ids.
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
        }
        let permitted = caps::read(None, caps::CapSet::Permitted)?;
        caps::set(None, caps::CapSet::Effective, &permitted)?;
        mounted
    }

    /// Mounts from the layers' directory, naming them relative to it (`layer-0:layer-1:…`, top
    /// first): overlayfs's options are one page, which leaves room for about 400 layers so
    /// named (Docker builds images of at most 127), where full paths into the store held 45.
    fn mount_now(&self) -> Result<()> {
        let dir = self.lower.first().and_then(|l| l.parent()).context("an image without layers")?;
        let mut lower = Vec::new();
        for l in &self.lower {
            if l.parent() != Some(dir) {
                bail!("{}: its layers are not in one directory", self.what);
            }
            lower.push(l.file_name().context("a layer without a name")?.to_string_lossy().into_owned());
        }
        let mut options =
            format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), self.upper.display(), self.work.display());
        // No index (a host's `overlay.index=Y` would otherwise tie the upper layer to the
        // lower layers it was first mounted on, and a kept layer would not mount over a new
        // image's).
        options.push_str(",index=off");
        if self.volatile {
            options.push_str(",volatile");
        }
        // In the container's mount namespace, whose setns left this process at its `/` (and the
        // setns back leaves it at the host's).
        std::env::set_current_dir(dir).with_context(|| format!("entering {}", dir.display()))?;
        let mounted = mount(Some("overlay"), &self.target, Some("overlay"), MsFlags::MS_NODEV, Some(options.as_str()));
        std::env::set_current_dir("/").context("leaving the layers' directory")?;
        mounted.with_context(|| {
            format!(
                "{}: mounting its {} layer{} with overlayfs (the store, {}, must be on a file system overlayfs \
                 can take as upper layer: ext4, xfs, btrfs, not overlayfs itself)",
                self.what,
                self.lower.len(),
                if self.lower.len() == 1 { "" } else { "s" },
                self.store.display()
            )
        })
    }
}

/// Attaches each tree at its target in the container's mount namespace `ns`, idmapped with
/// the user namespace `userns` (a plain copy without one: an image's layers under
/// `UserNamespace=host`), then mounts an image's overlay there. Must run single-threaded
/// (setns of a mount namespace).
pub fn attach(ns: BorrowedFd, userns: Option<BorrowedFd>, maps: &[Idmap], overlay: Option<&Overlay>) -> Result<()> {
    let mut trees = Vec::new();
    for m in maps {
        let tree = sys::open_tree_clone_recursive(&m.source).with_context(|| format!("{}: cloning it", m.what))?;
        if let Some(userns) = userns {
            sys::mount_setattr_idmap(&tree, userns).map_err(|e| cannot_idmap(m, e))?;
        }
        trees.push(tree);
    }
    let own = File::open("/proc/self/ns/mnt").context("opening the supervisor's mount namespace")?;
    setns(ns, CloneFlags::CLONE_NEWNS).context("entering the container's mount namespace")?;
    let attached = (|| {
        // Nothing attached here may propagate to the host's mounts.
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
            .context("making the container's mounts private")?;
        for (m, tree) in maps.iter().zip(&trees) {
            // The supervisor's own directory, by descriptor: no link is followed to it.
            let target = nix::fcntl::open(
                &m.target,
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_NOFOLLOW,
                nix::sys::stat::Mode::empty(),
            )
            .with_context(|| format!("opening {}", m.target.display()))?;
            sys::move_mount_onto(tree, &target).with_context(|| format!("{}: attaching its idmapped copy", m.what))?;
        }
        overlay.map_or(Ok(()), Overlay::mount)
    })();
    setns(&own, CloneFlags::CLONE_NEWNS).context("returning to the supervisor's mount namespace")?;
    attached
}

/// The clear error for a tree whose file system cannot be idmapped (or a kernel without them).
fn cannot_idmap(m: &Idmap, e: std::io::Error) -> anyhow::Error {
    let fs = fs_type(&m.source).unwrap_or_else(|| "unknown".into());
    anyhow::anyhow!(
        "{}: its file system ({fs}) cannot be idmapped here ({e}); gpubox does not chown a tree to fit \
         the user namespace: put it on a file system that can be (ext4, xfs, btrfs, tmpfs on Linux \
         6.3+, …), or use UserNamespace=host",
        m.what
    )
}

/// The type of the file system `path` is on, from /proc/self/mountinfo (the mount whose mount
/// point is the longest prefix of the path).
fn fs_type(path: &std::path::Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo
        .lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let point = head.split(' ').nth(4)?;
            Some((PathBuf::from(point.replace("\\040", " ")), tail.split(' ').next()?.to_owned()))
        })
        .filter(|(point, _)| path.starts_with(point))
        .max_by_key(|(point, _)| point.components().count())
        .map(|(_, fs)| fs)
}
