//! A container's device nodes keep the mode of the host nodes they stand for. A hotplugged node
//! is attached on the kernel's uevent, while devtmpfs's host node is still 0600; udev sets its
//! mode a little later, and the container's node must follow (see `watch`).
//!
//! The supervisor changes the node inside itself, through a descriptor of the very inode it
//! mounted (`O_PATH`, opened inside the root `/proc/PID/root` names, right after the mount,
//! and checked to be that character device): no request to the mount helper, and no path the container could
//! redirect later. The mode given is always the host node's own, so even a descriptor that
//! somehow named the host's node would change nothing.

use crate::devices::host_mode;
use gpubox_devices::{Node, NodeAccess};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};

/// A node inside whose mode follows a host node's.
pub struct FollowedNode {
    pub node: Node,
    spec: NodeAccess,
    /// Its mode now.
    mode: u32,
    inside: OwnedFd,
}

impl FollowedNode {
    /// The node at `node.path` inside the container of `pid`, given `mode` a moment ago; `None`
    /// for a node with a fixed mode (a CDI `fileMode`), or when what is there is not that device.
    pub fn open(pid: i32, node: &Node, spec: &NodeAccess, mode: u32) -> Option<FollowedNode> {
        if spec.mode.is_some() {
            return None;
        }
        // Resolved inside the container's root, every component: an absolute symlink the
        // payload put on the way would otherwise be resolved from the host's root.
        let root = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(format!("/proc/{pid}/root"))
            .ok()?;
        let file = std::fs::File::from(
            crate::in_root::open(std::os::fd::AsFd::as_fd(&root), &node.path, libc::O_PATH | libc::O_NOFOLLOW).ok()?,
        );
        let meta = file.metadata().ok()?;
        let same = meta.file_type().is_char_device()
            && libc::major(meta.rdev()) as u32 == node.major
            && libc::minor(meta.rdev()) as u32 == node.minor;
        same.then(|| FollowedNode { node: node.clone(), spec: spec.clone(), mode, inside: file.into() })
    }

    /// Gives the node inside its host node's mode, if that changed; the mode given, if any.
    pub fn follow(&mut self) -> std::io::Result<Option<u32>> {
        let Some(host) = host_mode(&self.node, &self.spec).filter(|m| *m != self.mode) else { return Ok(None) };
        // chmod through the descriptor's /proc link: fchmod does not take an O_PATH descriptor.
        let link = format!("/proc/self/fd/{}", self.inside.as_raw_fd());
        std::fs::set_permissions(link, std::fs::Permissions::from_mode(host))?;
        self.mode = host;
        Ok(Some(host))
    }

    /// The host node's directory, where udev's chmod shows (see `watch`).
    pub fn host_dir(&self) -> Option<&std::path::Path> {
        self.spec.host_path.as_deref().unwrap_or(&self.node.path).parent()
    }
}
