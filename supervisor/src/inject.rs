//! Mounting into and out of a running container. A mount namespace can only be entered by a
//! single-threaded process, and the supervisor runs threads once the control socket is up, so
//! each change runs in a short-lived `gpubox-supervisor inject|eject` child: it takes a
//! detached copy of the staging node (`open_tree`) in the supervisor's namespace, enters the
//! container's mount namespace, and attaches it there (`move_mount`). This works under the
//! user namespace, where the container itself could not mount the node.

use crate::sys;
use anyhow::{Context, Result};
use std::fs;
use std::path::Path;
use std::process::Command;

fn enter(pid: i32) -> Result<()> {
    let ns = fs::File::open(format!("/proc/{pid}/ns/mnt")).with_context(|| format!("container process {pid}"))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNS).context("entering the container's mount namespace")?;
    // setns leaves us at the namespace's root, which is the container's `/`.
    Ok(())
}

/// In the helper: binds `source` (a path in the supervisor's namespace) at `target` inside.
/// Mount points are created as the container's root (host id `owner`): the container's
/// file systems belong to its user namespace, where host root's ids do not exist.
pub fn inject(pid: i32, owner: u32, source: &Path, target: &Path) -> Result<()> {
    let tree = sys::open_tree_clone(source).with_context(|| format!("cloning {}", source.display()))?;
    let is_dir = source.is_dir();
    enter(pid)?;
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(owner));
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(owner));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {} in the container", parent.display()))?;
    }
    if !target.exists() {
        if is_dir { fs::create_dir(target) } else { fs::File::create(target).map(drop) }
            .with_context(|| format!("creating the mount point {} in the container", target.display()))?;
    }
    sys::move_mount_to(&tree, target).with_context(|| format!("mounting {} in the container", target.display()))
}

/// In the helper: unmounts `target` inside and removes the mount point it left.
pub fn eject(pid: i32, target: &Path) -> Result<()> {
    enter(pid)?;
    match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("unmounting {} in the container", target.display())),
    }
    let _ = fs::remove_file(target);
    Ok(())
}

/// In the supervisor: runs the helper and waits for it.
pub fn run_helper(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new("/proc/self/exe").args(args).output().context("starting the mount helper")?;
    if out.status.success() {
        Ok(())
    } else {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
    }
}
