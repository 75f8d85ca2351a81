//! A CDI spec as gpubox uses it: checked, with names and paths in their final form.

use std::path::PathBuf;

/// The OCI hook stages CDI allows in `hookName`.
pub const HOOK_NAMES: &[&str] =
    &["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"];

#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub path: PathBuf,
    pub version: String,
    /// `vendor/class`, e.g. `nvidia.com/gpu`.
    pub kind: String,
    pub devices: Vec<Device>,
    /// Spec-level edits, applied when any device of this spec is used.
    pub edits: ContainerEdits,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub name: String,
    pub edits: ContainerEdits,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerEdits {
    /// `NAME=VALUE` entries split at the first `=`.
    pub env: Vec<(String, String)>,
    pub device_nodes: Vec<DeviceNode>,
    pub mounts: Vec<Mount>,
    pub hooks: Vec<Hook>,
    /// Supplementary groups (container gids) for the container's process; zeros removed.
    pub additional_gids: Vec<u32>,
    /// Edit kinds present that gpubox does not apply (`intelRdt`, `netDevices`); resolving a
    /// device whose edits list any is an error.
    pub unsupported: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceNode {
    /// Path in the container.
    pub path: PathBuf,
    /// Path on the host; `path` when the spec gives none.
    pub host_path: PathBuf,
    /// `c`, `b`, `u` (unbuffered char) or `p` (fifo); `None`: take it from the host node.
    pub kind: Option<char>,
    /// `None`: take it from the host node.
    pub major: Option<u32>,
    /// `Some` whenever `major` is (an absent minor is 0); `None` otherwise.
    pub minor: Option<u32>,
    /// As written in the spec; may carry Go `os.FileMode` type bits above `0o7777`.
    pub file_mode: Option<u32>,
    /// Device-cgroup access, some of `rwm`; `None` means `rwm`.
    pub permissions: Option<String>,
    /// Owner in the container's user namespace.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    /// OCI mount options (`ro`, `nosuid`, `nodev`, `bind`, `rbind`, `rprivate`, …).
    pub options: Vec<String>,
    /// Filesystem type (`none` for bind mounts).
    pub kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hook {
    /// One of [`HOOK_NAMES`].
    pub hook_name: String,
    /// Absolute path of the program.
    pub path: PathBuf,
    /// The whole argv: `args[0]` is argv0.
    pub args: Vec<String>,
    /// `NAME=VALUE`; the whole environment when not empty.
    pub env: Vec<String>,
    /// Seconds; always > 0 when given.
    pub timeout: Option<u32>,
}
