//! cgroup v2 for one container. Under systemd the unit's cgroup is delegated to us
//! (`Delegate=yes`): the supervisor moves itself into a `supervisor` leaf and runs the payload
//! in a `payload` leaf (no process may sit in a cgroup whose controllers are enabled for its
//! children), and enables the controllers it was given. Standalone it makes a
//! `gpubox-NAME-PID` cgroup below its own and removes it on exit; one left by a supervisor that
//! was SIGKILLed is removed by the next start once empty.
//!
//! These are a few files of the delegated subtree, written directly: cgroups-rs 0.5 would add
//! a second zbus and nix and ~47 crates, and it manages devices only on cgroup v1.

use anyhow::{Context, Result};
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Cgroup {
    pub payload: PathBuf,
    /// systemd delegated this cgroup to us: we run as a unit's main process.
    pub delegated: bool,
    payload_fd: OwnedFd,
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last one: a later mount may hide an earlier one (cgroup2 mounted over a v1 tree).
    mountinfo.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

fn own_cgroup(mount: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(rel.trim_start_matches('/')))
}

impl Cgroup {
    /// Sets up the payload's cgroup; `Ok(None)` with a warning logged when cgroup v2 is not
    /// writable here (standalone only; under systemd it is an error).
    pub fn create(name: &str, under_systemd: bool) -> Result<Option<Cgroup>> {
        let mount = cgroup2_mount();
        let own = mount.as_deref().and_then(own_cgroup);
        // systemd marks a cgroup it delegates with trusted.delegate=1; a process that merely
        // inherited INVOCATION_ID from a service must not carve up that service's cgroup.
        let delegated = under_systemd && own.as_deref().is_some_and(is_delegated);
        if under_systemd && !delegated {
            log::warn("started by systemd without a delegated cgroup (Delegate=yes): using a cgroup of our own");
        }
        let Some(_) = mount else {
            anyhow::ensure!(!delegated, "cgroup v2 is not mounted, but systemd delegated a cgroup");
            log::warn("cgroup v2 is not mounted: the container runs without a cgroup of its own");
            return Ok(None);
        };
        let own = own.context("reading /proc/self/cgroup")?;
        if delegated {
            let leaf = own.join("supervisor");
            mkdir(&leaf)?;
            fs::write(leaf.join("cgroup.procs"), "0")
                .with_context(|| format!("moving the supervisor into {}", leaf.display()))?;
            enable_controllers(&own);
            let payload = own.join("payload");
            mkdir(&payload)?;
            return Ok(Some(Cgroup { payload_fd: open_dir(&payload)?, payload, delegated: true }));
        }
        sweep_stale(&own);
        // One level: the supervisor stays where it was started, so nothing needs a sibling.
        let payload = own.join(format!("gpubox-{name}-{}", std::process::id()));
        if let Err(e) = mkdir(&payload) {
            log::warn(&format!("{e:#}: the container runs without a cgroup of its own"));
            return Ok(None);
        }
        Ok(Some(Cgroup { payload_fd: open_dir(&payload)?, payload, delegated: false }))
    }
}

impl AsRawFd for Cgroup {
    fn as_raw_fd(&self) -> i32 {
        self.payload_fd.as_raw_fd()
    }
}

impl Cgroup {
    /// Kills every process left in the payload cgroup and waits until it is empty.
    pub fn kill(&self) {
        let _ = fs::write(self.payload.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while populated(&self.payload) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills what is left and removes the cgroup we made (usually empty by now: removing it
    /// comes first, killing only if that fails).
    pub fn remove(self) {
        if fs::remove_dir(&self.payload).is_ok() {
            return;
        }
        if populated(&self.payload) {
            self.kill();
        }
        if let Err(e) = fs::remove_dir(&self.payload) {
            log::warn(&format!("cannot remove cgroup {}: {e}", self.payload.display()));
        }
    }
}

fn is_delegated(cgroup: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(cgroup.as_os_str().as_encoded_bytes()) else { return false };
    let mut value = [0u8; 8];
    // SAFETY: path is NUL-terminated; value is a buffer of the length passed.
    let n =
        unsafe { libc::getxattr(path.as_ptr(), c"trusted.delegate".as_ptr(), value.as_mut_ptr().cast(), value.len()) };
    n > 0 && value[..n as usize] == *b"1"
}

fn populated(cgroup: &Path) -> bool {
    fs::read_to_string(cgroup.join("cgroup.events")).map(|t| t.lines().any(|l| l == "populated 1")).unwrap_or(false)
}

fn mkdir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("creating cgroup {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn open_dir(path: &Path) -> Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("opening cgroup {}", path.display()))?;
    Ok(fd)
}

/// Passes every controller we were given down to the leaves; what cannot be enabled is skipped.
fn enable_controllers(cgroup: &Path) {
    let Ok(available) = fs::read_to_string(cgroup.join("cgroup.controllers")) else { return };
    for controller in available.split_whitespace() {
        if let Err(e) = fs::write(cgroup.join("cgroup.subtree_control"), format!("+{controller}")) {
            log::warn(&format!("cannot enable the {controller} controller: {e}"));
        }
    }
}

/// Removes empty `gpubox-*-PID` cgroups whose supervisor is gone (it was SIGKILLed).
fn sweep_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("gpubox-").and_then(|r| r.rsplit_once('-')).map(|(_, p)| p.to_owned()) else {
            continue;
        };
        if !Path::new("/proc").join(&pid).exists() {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

use crate::log;
