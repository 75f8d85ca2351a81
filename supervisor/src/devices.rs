//! Device nodes for the container. A host node bound into a user namespace keeps its host
//! owner, so container root gets EACCES, and a node made with mknod inside a user namespace
//! cannot be opened. What works is LXD's way: the supervisor, still privileged in the host's
//! user namespace, makes a staging node with the container's owner and mode, and that is bound
//! in. [`stage_node`] is the one function that makes one: for the start's devices
//! ([`Staging::make_in`], on a tmpfs in the container's own mount namespace, which the host
//! never sees) and for the mount helper. See docs/architecture.md, "Staging: how a node becomes
//! usable inside".

use anyhow::{Context, Result};
use gpubox_devices::{Node, NodeAccess};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use std::path::{Path, PathBuf};

/// Who owns a node inside the container, and its mode: container root, the group of the
/// container's `User=` (so a non-root payload can open it), and the host node's own mode
/// (NVIDIA's nodes are 0666, DRM's usually 0660), 0660 when the host node cannot be read.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Access {
    /// gpubox's default for `node`, where a CDI spec (`spec`) says nothing else.
    pub fn for_node(node: &Node, group: u32, spec: &NodeAccess) -> Access {
        let mode = spec.mode.unwrap_or_else(|| host_mode(node, spec).unwrap_or(0o660));
        Access { uid: spec.uid.unwrap_or(0), gid: spec.gid.unwrap_or(group), mode }
    }
}

/// The mode of the host node that `node` takes its mode from, if it does: its own path's, a CDI
/// node's `hostPath`'s; `None` for a node with a fixed mode (CDI `fileMode`), or where the host
/// path is gone or now has another device (a path is reused by the next device that comes).
pub fn host_mode(node: &Node, spec: &NodeAccess) -> Option<u32> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if spec.mode.is_some() {
        return None;
    }
    let host = std::fs::metadata(spec.host_path.as_deref().unwrap_or(&node.path)).ok()?;
    let same = libc::major(host.rdev()) as u32 == node.major && libc::minor(host.rdev()) as u32 == node.minor;
    same.then(|| host.permissions().mode() & 0o777)
}

/// The group a container's devices belong to: `User=`'s group, looked up in the container's
/// own /etc/passwd where only a name or uid is given; root's without `User=`.
pub fn device_group(user: Option<&gpubox_definition::User>, root: Option<&Path>) -> u32 {
    if user.is_none() {
        return 0;
    }
    let passwd = std::fs::File::open(root.unwrap_or(Path::new("/")))
        .ok()
        .and_then(|r| crate::accounts::read(std::os::fd::AsFd::as_fd(&r), "/etc/passwd").ok())
        .unwrap_or_default();
    crate::accounts::primary_group(user, &passwd)
}

/// Makes the staging node of `node` in `dir`: a node of its numbers, owned as `access` says in
/// the container's terms (shifted by `host_base`, the host id of the container's root), with
/// exactly `access.mode` whatever the umask; returns its path. The one place a node for a
/// container is made: the start's staging ([`Staging::make_in`]) and the mount helper's attach.
pub fn stage_node(dir: &Path, node: &Node, access: Access, host_base: u32) -> Result<PathBuf> {
    let source = dir.join(staging_name(&node.path));
    let _ = std::fs::remove_file(&source);
    mknod(
        &source,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(access.mode),
        makedev(node.major as u64, node.minor as u64),
    )
    .with_context(|| format!("creating the staging node for {}", node.path.display()))?;
    // mknod applies the umask; the mode must be exactly what was asked for.
    std::fs::set_permissions(&source, std::os::unix::fs::PermissionsExt::from_mode(access.mode))?;
    nix::unistd::chown(
        &source,
        Some(nix::unistd::Uid::from_raw(host_base + access.uid)),
        Some(nix::unistd::Gid::from_raw(host_base + access.gid)),
    )
    .with_context(|| format!("setting the owner of {}", node.path.display()))?;
    Ok(source)
}

/// The staging node's file name for the node at `path` inside: the path, flattened.
pub fn staging_name(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches('/').replace('/', "-")
}

pub struct Staging {
    dir: PathBuf,
    /// Host ids of the container's uid 0 / gid 0 (0 without a user namespace).
    host_base: u32,
    created: Vec<PathBuf>,
}

impl Staging {
    /// The staging directory `run/devices` (`run` is the container's runtime directory, 0711:
    /// the container's root, an unprivileged host id, walks through it to its nodes).
    pub fn new(run: &Path, host_base: u32) -> Result<Staging> {
        let dir = run.join("devices");
        let mut created = Vec::new();
        if gpubox_control::run_dir::ensure_dir(&dir, gpubox_control::run_dir::BASE_MODE)? {
            created.push(dir.clone());
        }
        Ok(Staging { dir, host_base, created })
    }

    /// Where the staging node of `node` is (made by [`Staging::make_in`]).
    pub fn source_for(&self, node: &Node) -> PathBuf {
        self.dir.join(Self::file_name(node))
    }

    /// Makes the staging nodes in the container's own mount namespace `ns`, on a tmpfs there:
    /// the host never sees them, they go with the container's namespace however it ends, and
    /// the supervisor need not copy the host's mount table into a namespace of its own for
    /// them (that cost every start with a GPU ~0.8 ms). The child waits at its start barrier
    /// meanwhile. Must run single-threaded (setns of a mount namespace).
    pub fn make_in(&self, ns: std::os::fd::BorrowedFd, nodes: &[(Node, Access)]) -> Result<()> {
        use nix::sched::{setns, CloneFlags};
        let own = std::fs::File::open("/proc/self/ns/mnt").context("opening the supervisor's mount namespace")?;
        setns(ns, CloneFlags::CLONE_NEWNS).context("entering the container's mount namespace")?;
        let made = (|| {
            // With the host's user namespace the copy still propagates to the host's mounts.
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
                .context("making the container's mounts private")?;
            mount(
                Some("gpubox-devices"),
                &self.dir,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                Some("mode=0755"),
            )
            .with_context(|| format!("mounting the device staging tmpfs on {}", self.dir.display()))?;
            for (node, access) in nodes {
                self.stage(node, *access)?;
            }
            Ok(())
        })();
        setns(&own, CloneFlags::CLONE_NEWNS).context("returning to the supervisor's mount namespace")?;
        made
    }

    fn stage(&self, node: &Node, access: Access) -> Result<PathBuf> {
        stage_node(&self.dir, node, access, self.host_base)
    }

    fn file_name(node: &Node) -> String {
        staging_name(&node.path)
    }

    /// Removes the directory made on the host (the tmpfs went with the container's namespace).
    pub fn remove(&self) {
        for d in &self.created {
            let _ = std::fs::remove_dir(d);
        }
    }
}
