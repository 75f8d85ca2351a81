//! Container Device Interface (CDI) specs: the JSON/YAML files that NVIDIA's `nvidia-ctk cdi
//! generate`, AMD's `amd-ctk cdi generate` and Intel's resource driver write to `/etc/cdi` and
//! `/var/run/cdi`, describing each device as edits to a container: device nodes, mounts,
//! environment and OCI hooks.
//!
//! What this module follows (CDI spec, github.com/cncf-tags/container-device-interface):
//! - Spec versions 0.3.0 through 1.1.0 (`v` prefix allowed). 1.0.0 is what recent NVIDIA tooling
//!   writes; 1.1.0 added `netDevices`. Older or unknown versions are rejected, naming the file.
//! - Files are `*.json` (serde_json) and `*.yaml`/`*.yml` (YAML) directly in each directory;
//!   subdirectories and other files are skipped. Unknown fields are ignored.
//! - Priority: a later directory overrides an earlier one for the same qualified device
//!   (`/var/run/cdi` over `/etc/cdi`). The same device defined twice at the highest priority
//!   it has (two files in one directory) is a conflict: neither copy is used, and both files get
//!   a problem line.
//! - `kind` is `vendor/class`: vendor and class start with a letter, end with a letter or digit,
//!   and hold letters, digits, `_`, `-`, `.`. A device name starts and ends with a letter or
//!   digit and holds letters, digits, `_`, `-`, `.`, `:`.
//! - Edits for a resolved device are the spec-level `containerEdits` followed by the device's
//!   own, merged as CDI applies them to an OCI spec: a later device node with the same container
//!   path replaces an earlier one, so does a later mount with the same container path, and a
//!   later env variable with the same name; hooks accumulate; mounts end up ordered parents
//!   first. [`combined_edits`] does the same for several devices, applying each spec's
//!   spec-level edits once (as CDI does); prefer it to concatenating [`Resolved::edits`].
//! - Device nodes: `hostPath` defaults to `path`. `major` 0 or absent means "not given" (stat
//!   the host node); when `major` is given an absent `minor` is 0 (Go's omitempty drops a zero
//!   minor, e.g. `/dev/nvidia0` is written as `major: 195` alone). `permissions` absent means
//!   `rwm`. `fileMode` is kept as written (AMD writes plain permission bits; mask with `0o7777`).
//! - `additionalGids` (0 dropped) are passed on in [`ContainerEdits::additional_gids`]: current
//!   `nvidia-ctk` puts them on every device whose DRM nodes it includes, so refusing them would
//!   refuse ordinary NVIDIA specs. `intelRdt` and `netDevices` are parsed and listed in
//!   [`ContainerEdits::unsupported`]; resolving a device whose edits carry them is an error that
//!   says so. A spec that uses them but whose affected devices are never asked for is fine.
//! - `all`: CDI itself has no wildcard. NVIDIA and AMD specs define a device named `all`; where
//!   one exists, `all` resolves to exactly that device. Where none exists (Intel's specs), `all`
//!   resolves to every device of the kind.
//!
//! Hooks run as OCI runtimes run them (the supervisor's hooks.rs runs them): `path` executed with `args` as the whole
//! argv (`args[0]` is argv0), `env` as the whole environment (the caller's environment when
//! `env` is empty, as runc does), the OCI state JSON ([`oci_state`]) on stdin, killed (with any
//! children, through its own process group) after `timeout` seconds. NVIDIA's hooks read
//! `bundle` from that state and then `BUNDLE/config.json`'s `root.path` to find the container's
//! root filesystem, so the bundle must hold such a `config.json`.

//!
//! The module by concern: [`model`] (a spec as gpubox uses it), [`file`] (reading and checking
//! spec files), [`registry`] (the spec directories, priorities and conflicts, resolving names),
//! [`edits`] (merging a device's edits as CDI applies them). CDI's name grammar is the
//! definition crate's (`gpubox_definition::cdi_name`), which `cdi:` selectors use too.

pub mod edits;
pub mod file;
pub mod model;
pub mod registry;

pub use edits::combined_edits;
pub use file::{load_spec, parse_spec, MAX_SPEC_BYTES, MAX_SPEC_DEPTH, SUPPORTED_VERSIONS};
pub use gpubox_definition::cdi_name::{validate_device_name, validate_kind};
pub use model::{ContainerEdits, Device, DeviceNode, Hook, Mount, Spec, HOOK_NAMES};
pub use registry::{qualified, Registry, Resolved, DEFAULT_DIRS};

#[cfg(test)]
mod tests;
