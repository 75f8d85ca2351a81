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
//! Hooks ([`run_hook`]) run as OCI runtimes run them: `path` executed with `args` as the whole
//! argv (`args[0]` is argv0), `env` as the whole environment (the caller's environment when
//! `env` is empty, as runc does), the OCI state JSON ([`oci_state`]) on stdin, killed (with any
//! children, through its own process group) after `timeout` seconds. NVIDIA's hooks read
//! `bundle` from that state and then `BUNDLE/config.json`'s `root.path` to find the container's
//! root filesystem, so the bundle must hold such a `config.json`.

pub use gpubox_definition::cdi_name::{validate_device_name, validate_kind};
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// CDI's spec directories, lowest priority first.
pub const DEFAULT_DIRS: &[&str] = &["/etc/cdi", "/var/run/cdi"];

/// The spec versions this module reads.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0"];

/// The OCI hook stages CDI allows in `hookName`.
pub const HOOK_NAMES: &[&str] =
    &["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"];

/// Every spec found, with overridden and conflicting devices already removed from the specs
/// that lost, and one line per file that could not be used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    pub specs: Vec<Spec>,
    /// `FILE: what is wrong`, for files (or directories) that could not be used, and for
    /// devices defined twice at the same priority.
    pub problems: Vec<String>,
}

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

/// One device that a request resolved to.
#[derive(Debug, Clone)]
pub struct Resolved<'a> {
    /// `vendor/class=name`.
    pub qualified: String,
    pub spec: &'a Spec,
    pub device: &'a Device,
}

impl Resolved<'_> {
    /// The spec-level edits followed by the device's, merged as CDI applies them.
    pub fn edits(&self) -> ContainerEdits {
        let mut merged = ContainerEdits::default();
        merged.append(&self.spec.edits);
        merged.append(&self.device.edits);
        merged.finish();
        merged
    }
}

/// The edits of several resolved devices together, as CDI injects them: each spec's
/// spec-level edits once (before its first device), then each device's own, merged.
pub fn combined_edits(resolved: &[Resolved<'_>]) -> ContainerEdits {
    let mut merged = ContainerEdits::default();
    let mut seen: Vec<*const Spec> = Vec::new();
    for r in resolved {
        let key = r.spec as *const Spec;
        if !seen.contains(&key) {
            seen.push(key);
            merged.append(&r.spec.edits);
        }
        merged.append(&r.device.edits);
    }
    merged.finish();
    merged
}

impl ContainerEdits {
    /// Appends `other`, replacing what it redefines (same env name, same device node path,
    /// same mount container path: the later one wins, moved to the end, as CDI's OCI edits do).
    fn append(&mut self, other: &ContainerEdits) {
        for (k, v) in &other.env {
            self.env.retain(|(n, _)| n != k);
            self.env.push((k.clone(), v.clone()));
        }
        for n in &other.device_nodes {
            self.device_nodes.retain(|d| d.path != n.path);
            self.device_nodes.push(n.clone());
        }
        for m in &other.mounts {
            self.mounts.retain(|x| x.container_path != m.container_path);
            self.mounts.push(m.clone());
        }
        self.hooks.extend(other.hooks.iter().cloned());
        for g in &other.additional_gids {
            if *g != 0 && !self.additional_gids.contains(g) {
                self.additional_gids.push(*g);
            }
        }
        for u in &other.unsupported {
            if !self.unsupported.contains(u) {
                self.unsupported.push(u.clone());
            }
        }
    }

    /// Orders mounts parents first (fewer path components first, stable), as CDI does.
    fn finish(&mut self) {
        self.mounts.sort_by_key(|m| m.container_path.components().count());
    }
}

impl Registry {
    /// Reads every spec in `dirs` (lowest priority first). A directory that does not exist is
    /// skipped silently; anything else that goes wrong becomes a line in `problems`, and never
    /// hides the specs that are fine.
    pub fn load(dirs: &[PathBuf]) -> Registry {
        let mut specs: Vec<(usize, Spec)> = Vec::new();
        let mut problems = Vec::new();
        for (priority, dir) in dirs.iter().enumerate() {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    problems.push(format!("{}: cannot read the directory: {e}", dir.display()));
                    continue;
                }
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| matches!(p.extension().and_then(|x| x.to_str()), Some("json" | "yaml" | "yml")))
                .filter(|p| !p.is_dir())
                .collect();
            files.sort();
            for path in files {
                match load_spec(&path) {
                    Ok(spec) => specs.push((priority, spec)),
                    Err(e) => problems.push(e),
                }
            }
        }

        // qualified name -> every (priority, spec index) defining it
        let mut defs: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        for (i, (priority, spec)) in specs.iter().enumerate() {
            for d in &spec.devices {
                defs.entry(qualified(&spec.kind, &d.name)).or_default().push((*priority, i));
            }
        }
        let mut winner: HashMap<String, usize> = HashMap::new();
        let mut names: Vec<&String> = defs.keys().collect();
        names.sort();
        for name in names {
            let list = &defs[name];
            let top = list.iter().map(|(p, _)| *p).max().unwrap_or(0);
            let at_top: Vec<usize> = list.iter().filter(|(p, _)| *p == top).map(|(_, i)| *i).collect();
            if at_top.len() == 1 {
                winner.insert(name.clone(), at_top[0]);
            } else {
                let files: Vec<String> = at_top.iter().map(|i| specs[*i].1.path.display().to_string()).collect();
                for f in &files {
                    problems.push(format!(
                        "{f}: device {name} is defined in several files of one directory ({}); none of them is used",
                        files.join(", ")
                    ));
                }
            }
        }
        let specs = specs
            .into_iter()
            .enumerate()
            .map(|(i, (_, mut spec))| {
                let kind = spec.kind.clone();
                spec.devices.retain(|d| winner.get(&qualified(&kind, &d.name)) == Some(&i));
                spec
            })
            .collect();
        Registry { specs, problems }
    }

    /// Every usable device, in file order: (`vendor/class=name`, its spec, the device).
    pub fn devices(&self) -> Vec<(String, &Spec, &Device)> {
        self.specs.iter().flat_map(|s| s.devices.iter().map(move |d| (qualified(&s.kind, &d.name), s, d))).collect()
    }

    /// The devices that `kind` (`vendor/class`) and `name` (a device name, or `all`) mean.
    /// The error says what exists instead, or which edits a device needs that gpubox lacks.
    pub fn resolve(&self, kind: &str, name: &str) -> Result<Vec<Resolved<'_>>, String> {
        validate_kind(kind).map_err(|e| format!("invalid CDI device {kind}={name}: {e}"))?;
        if name != "all" {
            validate_device_name(name).map_err(|e| format!("invalid CDI device {kind}={name}: {e}"))?;
        }
        let of_kind: Vec<(String, &Spec, &Device)> =
            self.devices().into_iter().filter(|(_, s, _)| s.kind == kind).collect();
        if of_kind.is_empty() {
            let mut text = format!("no CDI device {kind}={name}: no CDI spec provides kind {kind}");
            let all: Vec<String> = self.devices().into_iter().map(|(q, _, _)| q).collect();
            if all.is_empty() {
                text.push_str("; there are no CDI devices at all");
            } else {
                text.push_str(&format!("; CDI devices that exist: {}", all.join(", ")));
            }
            if !self.problems.is_empty() {
                text.push_str(&format!("; CDI specs that could not be used: {}", self.problems.join("; ")));
            }
            return Err(text);
        }
        let chosen: Vec<Resolved<'_>> = if name == "all" && !of_kind.iter().any(|(_, _, d)| d.name == "all") {
            of_kind.iter().map(|(q, s, d)| Resolved { qualified: q.clone(), spec: s, device: d }).collect()
        } else {
            match of_kind.iter().find(|(_, _, d)| d.name == name) {
                Some((q, s, d)) => vec![Resolved { qualified: q.clone(), spec: s, device: d }],
                None => {
                    let have: Vec<&str> = of_kind.iter().map(|(_, _, d)| d.name.as_str()).collect();
                    return Err(format!("no CDI device {kind}={name}; {kind} has: {}", have.join(", ")));
                }
            }
        };
        for r in &chosen {
            let mut unsupported = r.spec.edits.unsupported.clone();
            unsupported
                .extend(r.device.edits.unsupported.iter().filter(|u| !r.spec.edits.unsupported.contains(u)).cloned());
            if !unsupported.is_empty() {
                return Err(format!(
                    "CDI device {} ({}) needs {} edits, which gpubox does not support",
                    r.qualified,
                    r.spec.path.display(),
                    unsupported.join(" and ")
                ));
            }
        }
        Ok(chosen)
    }
}

/// `vendor/class=name`.
pub fn qualified(kind: &str, name: &str) -> String {
    format!("{kind}={name}")
}

/// Reads and checks one spec file; the error starts with the file's path.
pub fn load_spec(path: &Path) -> Result<Spec, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_SPEC_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse_spec(path, &text)
}

/// Larger than any vendor's spec (NVIDIA's for 8 GPUs with every library is ~60 KB). Specs are
/// read at every start, attach and hotplug event: their cost must be bounded.
pub const MAX_SPEC_BYTES: u64 = 1 << 20;
/// Deeper than any spec's real structure (about 5); a deeply nested document took the YAML
/// parser a minute.
pub const MAX_SPEC_DEPTH: usize = 32;

/// The deepest nesting of flow collections (`[`, `{`) outside quotes; block-style nesting is
/// bounded by the size (each level is at least one more column).
fn flow_depth(text: &str) -> usize {
    let (mut depth, mut max, mut quote) = (0usize, 0usize, None::<char>);
    let mut escaped = false;
    for c in text.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q == '"' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' => quote = Some(c),
                '[' | '{' => {
                    depth += 1;
                    max = max.max(depth);
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    max
}

/// Parses and checks a spec's text; `path`'s extension picks JSON (`.json`) or YAML (anything
/// else). The error starts with `path`.
pub fn parse_spec(path: &Path, text: &str) -> Result<Spec, String> {
    let file = path.display();
    if text.len() as u64 > MAX_SPEC_BYTES {
        return Err(format!("{file}: larger than {MAX_SPEC_BYTES} bytes; not read"));
    }
    if flow_depth(text) > MAX_SPEC_DEPTH {
        return Err(format!("{file}: nested deeper than {MAX_SPEC_DEPTH} levels; not read"));
    }
    let raw: RawSpec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| format!("{file}: not a valid CDI spec (JSON): {e}"))?
    } else {
        yaml_serde::from_str(text).map_err(|e| format!("{file}: not a valid CDI spec (YAML): {e}"))?
    };
    convert(path, raw).map_err(|e| format!("{file}: {e}"))
}

fn convert(path: &Path, raw: RawSpec) -> Result<Spec, String> {
    let version = raw.cdi_version.map(|t| t.0).ok_or("cdiVersion is missing")?;
    if !SUPPORTED_VERSIONS.contains(&version.strip_prefix('v').unwrap_or(&version)) {
        return Err(format!(
            "unsupported cdiVersion {version:?} (gpubox reads CDI specs {} through {})",
            SUPPORTED_VERSIONS[0],
            SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1]
        ));
    }
    let kind = raw.kind.map(|t| t.0).ok_or("kind is missing")?;
    validate_kind(&kind).map_err(|e| format!("invalid kind {kind:?}: {e}"))?;
    let edits = convert_edits(raw.container_edits.unwrap_or_default()).map_err(|e| format!("containerEdits: {e}"))?;
    let mut devices = Vec::new();
    let mut seen = HashSet::new();
    for (i, d) in raw.devices.unwrap_or_default().into_iter().enumerate() {
        let name = d.name.map(|t| t.0).ok_or_else(|| format!("device {}: name is missing", i + 1))?;
        validate_device_name(&name).map_err(|e| format!("device {name:?}: {e}"))?;
        if !seen.insert(name.clone()) {
            return Err(format!("device {name:?} is defined twice"));
        }
        let edits =
            convert_edits(d.container_edits.unwrap_or_default()).map_err(|e| format!("device {name:?}: {e}"))?;
        devices.push(Device { name, edits });
    }
    Ok(Spec { path: path.to_path_buf(), version, kind, devices, edits })
}

fn convert_edits(raw: RawEdits) -> Result<ContainerEdits, String> {
    let mut edits = ContainerEdits::default();
    for e in raw.env.unwrap_or_default() {
        edits.env.push(split_env(&e.0)?);
    }
    for (i, n) in raw.device_nodes.unwrap_or_default().into_iter().enumerate() {
        edits.device_nodes.push(convert_node(n).map_err(|e| format!("device node {}: {e}", i + 1))?);
    }
    for (i, m) in raw.mounts.unwrap_or_default().into_iter().enumerate() {
        let host = nonempty(m.host_path).ok_or_else(|| format!("mount {}: hostPath is missing", i + 1))?;
        let container =
            nonempty(m.container_path).ok_or_else(|| format!("mount {}: containerPath is missing", i + 1))?;
        container_path(&container).map_err(|e| format!("mount {}: containerPath {e}", i + 1))?;
        edits.mounts.push(Mount {
            host_path: host.into(),
            container_path: container.into(),
            options: m.options.unwrap_or_default().into_iter().map(|t| t.0).collect(),
            kind: nonempty(m.kind),
        });
    }
    for (i, h) in raw.hooks.unwrap_or_default().into_iter().enumerate() {
        edits.hooks.push(convert_hook(h).map_err(|e| format!("hook {}: {e}", i + 1))?);
    }
    edits.additional_gids = raw.additional_gids.unwrap_or_default().into_iter().filter(|g| *g != 0).collect();
    if raw.intel_rdt.is_some() {
        edits.unsupported.push("intelRdt".into());
    }
    if raw.net_devices.is_some_and(|n| !n.is_empty()) {
        edits.unsupported.push("netDevices".into());
    }
    Ok(edits)
}

fn convert_node(n: RawNode) -> Result<DeviceNode, String> {
    let path: PathBuf = nonempty(n.path).ok_or("path is missing")?.into();
    container_path(&path.to_string_lossy()).map_err(|e| format!("path {e}"))?;
    let host_path = nonempty(n.host_path).map(PathBuf::from).unwrap_or_else(|| path.clone());
    let at = path.display();
    let kind = match nonempty(n.kind).as_deref() {
        None => None,
        Some(t @ ("c" | "b" | "u" | "p")) => t.chars().next(),
        Some(t) => return Err(format!("{at}: invalid type {t:?} (c, b, u or p)")),
    };
    let number = |v: Option<i64>, what: &str| -> Result<Option<u32>, String> {
        match v {
            None | Some(0) => Ok(None),
            Some(n) => u32::try_from(n).map(Some).map_err(|_| format!("{at}: invalid {what} {n}")),
        }
    };
    let major = number(n.major, "major")?;
    let minor = match major {
        Some(_) => Some(number(n.minor, "minor")?.unwrap_or(0)),
        None => None,
    };
    let permissions = nonempty(n.permissions);
    if let Some(p) = &permissions {
        if !p.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
            return Err(format!("{at}: invalid permissions {p:?} (some of r, w, m)"));
        }
    }
    Ok(DeviceNode {
        path,
        host_path,
        kind,
        major,
        minor,
        file_mode: n.file_mode.map(|m| m.0),
        permissions,
        uid: n.uid,
        gid: n.gid,
    })
}

/// A path inside the container, as `Bind=` destinations are: absolute, without `..`.
fn container_path(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("{path:?} is not absolute"));
    }
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!("{path:?} contains '..'"));
    }
    Ok(())
}

fn convert_hook(h: RawHook) -> Result<Hook, String> {
    let hook_name = nonempty(h.hook_name).ok_or("hookName is missing")?;
    if !HOOK_NAMES.contains(&hook_name.as_str()) {
        return Err(format!("invalid hookName {hook_name:?} (one of {})", HOOK_NAMES.join(", ")));
    }
    let path: PathBuf = nonempty(h.path).ok_or("path is missing")?.into();
    if !path.is_absolute() {
        return Err(format!("path {} is not absolute", path.display()));
    }
    let env: Vec<String> = h.env.unwrap_or_default().into_iter().map(|t| t.0).collect();
    for e in &env {
        split_env(e)?;
    }
    let timeout = match h.timeout {
        None => None,
        Some(t) if t > 0 => Some(u32::try_from(t).map_err(|_| format!("timeout {t} is too large"))?),
        Some(t) => return Err(format!("timeout {t} must be greater than zero")),
    };
    Ok(Hook { hook_name, path, args: h.args.unwrap_or_default().into_iter().map(|t| t.0).collect(), env, timeout })
}

fn split_env(e: &str) -> Result<(String, String), String> {
    match e.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("invalid environment variable {e:?} (NAME=VALUE)")),
    }
}

fn nonempty(t: Option<Text>) -> Option<String> {
    t.map(|t| t.0).filter(|s| !s.is_empty())
}

/// Runs `hook` as an OCI runtime does, with `state_json` on its stdin. Fails on a spawn error,
/// a non-zero exit, a signal, or when `timeout` passes (the hook and its process group are then
/// killed); the error names the hook and ends with the tail of its stderr (or stdout).
pub fn run_hook(hook: &Hook, state_json: &str) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let what = format!("{} hook {}", hook.hook_name, hook.path.display());
    if !hook.path.is_absolute() {
        return Err(format!("{what}: the path is not absolute"));
    }
    let mut cmd = Command::new(&hook.path);
    if let Some((argv0, rest)) = hook.args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    if !hook.env.is_empty() {
        cmd.env_clear();
        for e in &hook.env {
            let (k, v) = split_env(e).map_err(|e| format!("{what}: {e}"))?;
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("{what}: cannot start: {e}"))?;

    // Writer and readers on threads: a hook that never reads stdin or fills a pipe must not
    // block us past its timeout.
    if let Some(mut stdin) = child.stdin.take() {
        let data = state_json.as_bytes().to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut readers = 0;
    if let Some(out) = child.stdout.take() {
        spawn_reader(out, stdout.clone(), done_tx.clone());
        readers += 1;
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, stderr.clone(), done_tx.clone());
        readers += 1;
    }
    drop(done_tx);

    let (status, timed_out) = wait_with_timeout(&mut child, hook.timeout).map_err(|e| format!("{what}: {e}"))?;
    // The pipes close when every process holding them is gone; a background child the hook
    // left behind may keep them open, so wait only briefly.
    let grace = Instant::now() + Duration::from_millis(500);
    for _ in 0..readers {
        if done_rx.recv_timeout(grace.saturating_duration_since(Instant::now())).is_err() {
            break;
        }
    }
    if !timed_out && status.success() {
        return Ok(());
    }
    let why = if timed_out {
        format!("timed out after {}s and was killed", hook.timeout.unwrap_or(0))
    } else if let Some(code) = status.code() {
        format!("failed with exit status {code}")
    } else {
        use std::os::unix::process::ExitStatusExt;
        format!("was killed by signal {}", status.signal().unwrap_or(0))
    };
    let mut output = tail(&stderr.lock().unwrap_or_else(|e| e.into_inner()));
    let mut label = "stderr";
    if output.is_empty() {
        output = tail(&stdout.lock().unwrap_or_else(|e| e.into_inner()));
        label = "stdout";
    }
    if output.is_empty() {
        Err(format!("{what} {why}"))
    } else {
        Err(format!("{what} {why}; {label}: {output}"))
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut from: R, into: Arc<Mutex<Vec<u8>>>, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut v = into.lock().unwrap_or_else(|e| e.into_inner());
                    v.extend_from_slice(&buf[..n]);
                    // keep the tail only
                    if v.len() > 64 * 1024 {
                        let cut = v.len() - 16 * 1024;
                        v.drain(..cut);
                    }
                }
            }
        }
        let _ = done.send(());
    });
}

fn wait_with_timeout(child: &mut std::process::Child, timeout: Option<u32>) -> Result<(ExitStatus, bool), String> {
    let Some(secs) = timeout else {
        return child.wait().map(|s| (s, false)).map_err(|e| format!("cannot wait: {e}"));
    };
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs));
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("cannot wait: {e}"))? {
            return Ok((status, false));
        }
        let now = Instant::now();
        if now >= deadline {
            // Not reaped yet, so the process group still exists and is ours.
            let pgid = child.id() as libc::pid_t;
            // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let status = child.wait().map_err(|e| format!("cannot wait: {e}"))?;
            return Ok((status, true));
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

fn tail(bytes: &[u8]) -> String {
    const MAX: usize = 2000;
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut start = text.len() - MAX;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// The OCI runtime state a hook reads on stdin: `ociVersion`, `id`, `status` (`creating`,
/// `created`, `running`, `stopped`), `pid` (left out when 0), `bundle`, `annotations`.
pub fn oci_state(id: &str, pid: u32, bundle: &Path, status: &str) -> String {
    let mut state = serde_json::json!({
        "ociVersion": "1.2.0",
        "id": id,
        "status": status,
        "bundle": bundle.to_string_lossy(),
        "annotations": {},
    });
    if pid != 0 {
        state["pid"] = pid.into();
    }
    state.to_string()
}

// ---- the file format, as read ----

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    cdi_version: Option<Text>,
    kind: Option<Text>,
    devices: Option<Vec<RawDevice>>,
    container_edits: Option<RawEdits>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawDevice {
    name: Option<Text>,
    container_edits: Option<RawEdits>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawEdits {
    env: Option<Vec<Text>>,
    device_nodes: Option<Vec<RawNode>>,
    mounts: Option<Vec<RawMount>>,
    hooks: Option<Vec<RawHook>>,
    // Go's encoding/json matches keys case-insensitively, and SPEC.md spells it additionalGIDs.
    #[serde(alias = "additionalGIDs")]
    additional_gids: Option<Vec<u32>>,
    intel_rdt: Option<IgnoredAny>,
    net_devices: Option<Vec<IgnoredAny>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNode {
    path: Option<Text>,
    host_path: Option<Text>,
    #[serde(rename = "type")]
    kind: Option<Text>,
    major: Option<i64>,
    minor: Option<i64>,
    file_mode: Option<Mode>,
    permissions: Option<Text>,
    uid: Option<u32>,
    gid: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMount {
    host_path: Option<Text>,
    container_path: Option<Text>,
    options: Option<Vec<Text>>,
    #[serde(rename = "type")]
    kind: Option<Text>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHook {
    hook_name: Option<Text>,
    path: Option<Text>,
    args: Option<Vec<Text>>,
    env: Option<Vec<Text>>,
    timeout: Option<i64>,
}

/// A string that YAML may have written as a bare number or boolean (`name: 0`), as Go's YAML
/// reader accepts for string fields.
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A file mode: a number, or (YAML 1.1 style, which Go's reader takes as octal) `0666`/`0o666`.
struct Mode(u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a file mode (a number, or an octal string such as 0666)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Mode, E> {
                u32::try_from(v).map(Mode).map_err(|_| E::custom(format!("file mode {v} is too large")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mode, E> {
                u32::try_from(v).map(Mode).map_err(|_| E::custom(format!("invalid file mode {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                let digits = v.strip_prefix("0o").or_else(|| v.strip_prefix('0')).filter(|d| !d.is_empty());
                match digits.map(|d| u32::from_str_radix(d, 8)) {
                    Some(Ok(m)) => Ok(Mode(m)),
                    _ => Err(E::custom(format!("invalid file mode {v:?}"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cdi")
    }

    fn registry() -> Registry {
        Registry::load(&[fixtures().join("etc-cdi"), fixtures().join("var-run-cdi"), fixtures().join("missing")])
    }

    fn spec(name: &str, text: &str) -> Result<Spec, String> {
        parse_spec(Path::new(name), text)
    }

    fn node_paths(e: &ContainerEdits) -> Vec<String> {
        e.device_nodes.iter().map(|n| n.path.display().to_string()).collect()
    }

    const UUID: &str = "GPU-3a6b1f1e-8c1d-4b9a-9f57-0e2d7c5b4a11";

    #[test]
    fn good_specs_load_beside_broken_ones() {
        let r = registry();
        let kinds: Vec<&str> = r.specs.iter().map(|s| s.kind.as_str()).collect();
        for k in ["nvidia.com/gpu", "amd.com/gpu", "intel.com/gpu"] {
            assert!(kinds.contains(&k), "{k} missing from {kinds:?}; problems: {:?}", r.problems);
        }
        let problem = |file: &str| r.problems.iter().find(|p| p.contains(file)).cloned();
        let broken = problem("broken.json").expect("broken.json reported");
        assert!(broken.starts_with(&fixtures().join("etc-cdi/broken.json").display().to_string()), "{broken}");
        assert!(broken.contains("JSON"), "{broken}");
        let old = problem("old-version.yaml").expect("old-version.yaml reported");
        assert!(old.contains("unsupported cdiVersion \"0.2.0\""), "{old}");
        let kind = problem("bad-kind.json").expect("bad-kind.json reported");
        assert!(kind.contains("invalid kind"), "{kind}");
        assert!(!r.problems.iter().any(|p| p.contains("README") || p.contains("subdir")), "{:?}", r.problems);
        assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
    }

    #[test]
    fn devices_lists_each_qualified_name_once() {
        let r = registry();
        let names: Vec<String> = r.devices().into_iter().map(|(q, _, _)| q).collect();
        for want in [
            "nvidia.com/gpu=0",
            &format!("nvidia.com/gpu={UUID}"),
            "nvidia.com/gpu=all",
            "amd.com/gpu=0",
            "amd.com/gpu=all",
        ] {
            assert_eq!(names.iter().filter(|n| *n == want).count(), 1, "{want} in {names:?}");
        }
        assert!(names.contains(&"intel.com/gpu=0000-00-02-0-0x46a6".to_owned()), "{names:?}");
    }

    #[test]
    fn later_directory_overrides_earlier() {
        let r = registry();
        let got = r.resolve("nvidia.com/gpu", "0").unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].spec.path.starts_with(fixtures().join("var-run-cdi")), "{}", got[0].spec.path.display());
        let e = got[0].edits();
        let n0 = e.device_nodes.iter().find(|n| n.path == Path::new("/dev/nvidia0")).unwrap();
        // major alone, as nvidia-ctk writes minor 0
        assert_eq!((n0.major, n0.minor, n0.file_mode), (Some(195), Some(0), Some(0o666)));
        assert_eq!(e.additional_gids, vec![39]);
        assert!(e.env.contains(&("NVIDIA_CTK_LIBCUDA_DIR".into(), "/usr/lib/x86_64-linux-gnu".into())), "{:?}", e.env);
        // the other devices still come from /etc/cdi
        let uuid = r.resolve("nvidia.com/gpu", UUID).unwrap();
        assert!(uuid[0].spec.path.starts_with(fixtures().join("etc-cdi")));
    }

    #[test]
    fn nvidia_device_gets_spec_level_edits() {
        let r = registry();
        let got = r.resolve("nvidia.com/gpu", UUID).unwrap();
        assert_eq!(got[0].qualified, format!("nvidia.com/gpu={UUID}"));
        let e = got[0].edits();
        assert_eq!(
            node_paths(&e),
            ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset", "/dev/nvidia0"]
        );
        let ctl = &e.device_nodes[0];
        assert_eq!(ctl.host_path, Path::new("/dev/nvidiactl"));
        assert_eq!((ctl.kind, ctl.major, ctl.minor, ctl.permissions.as_deref()), (None, None, None, None));
        assert_eq!(e.env, vec![("NVIDIA_VISIBLE_DEVICES".to_owned(), "void".to_owned())]);
        assert!(e.mounts.iter().any(|m| m.container_path.to_string_lossy().contains("libcuda.so.")), "{:?}", e.mounts);
        let m = &e.mounts[0];
        assert_eq!(m.options, ["ro", "nosuid", "nodev", "bind"]);
        assert_eq!(e.hooks.len(), 2);
        assert!(e.hooks.iter().all(|h| h.hook_name == "createContainer" && h.path == Path::new("/usr/bin/nvidia-ctk")));
        assert_eq!(e.hooks[0].args[..3], ["nvidia-ctk", "hook", "create-symlinks"]);
        assert_eq!(e.hooks[1].args[..3], ["nvidia-ctk", "hook", "update-ldcache"]);
        assert!(e.unsupported.is_empty());
    }

    #[test]
    fn all_means_the_vendors_all_device_when_there_is_one() {
        let r = registry();
        let got = r.resolve("nvidia.com/gpu", "all").unwrap();
        assert_eq!(got.iter().map(|d| d.qualified.as_str()).collect::<Vec<_>>(), ["nvidia.com/gpu=all"]);
        let paths = node_paths(&got[0].edits());
        for p in ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"] {
            assert!(paths.contains(&p.to_owned()), "{p} in {paths:?}");
        }
    }

    #[test]
    fn all_means_every_device_when_the_spec_has_no_all() {
        let r = registry();
        let got = r.resolve("intel.com/gpu", "all").unwrap();
        let names: Vec<&str> = got.iter().map(|d| d.device.name.as_str()).collect();
        assert_eq!(names, ["0000-00-02-0-0x46a6", "0000-03-00-0-0x56a0"]);
        let e = combined_edits(&got);
        assert_eq!(node_paths(&e), ["/dev/dri/card0", "/dev/dri/renderD128", "/dev/dri/card1", "/dev/dri/renderD129"]);
        assert_eq!(e.device_nodes[0].kind, Some('c'));
        assert_eq!(e.mounts[0].kind.as_deref(), Some("none"));
        assert_eq!(e.mounts[0].options, ["bind", "rw"]);
    }

    #[test]
    fn amd_json_spec() {
        let r = registry();
        let got = r.resolve("amd.com/gpu", "0").unwrap();
        let e = got[0].edits();
        assert_eq!(node_paths(&e), ["/dev/dri/card1", "/dev/dri/renderD128", "/dev/kfd"]);
        let render = &e.device_nodes[1];
        assert_eq!(render.kind, Some('c'));
        assert_eq!((render.major, render.minor), (Some(226), Some(128)));
        assert_eq!((render.file_mode, render.uid, render.gid), (Some(0o660), Some(0), Some(109)));
        assert_eq!(render.permissions.as_deref(), Some("rwm"));
        let kfd = &e.device_nodes[2];
        assert_eq!((kfd.major, kfd.minor), (Some(235), Some(0)));
        assert!(e.env.is_empty() && e.mounts.is_empty() && e.hooks.is_empty());
    }

    #[test]
    fn unknown_device_lists_what_exists() {
        let r = registry();
        let e = r.resolve("nvidia.com/gpu", "7").unwrap_err();
        assert!(e.contains("nvidia.com/gpu=7"), "{e}");
        for have in ["0", UUID, "all"] {
            assert!(e.contains(have), "{have} in {e}");
        }
        assert!(!e.contains("amd.com"), "{e}");
        let e = r.resolve("example.com/fpga", "0").unwrap_err();
        assert!(e.contains("no CDI spec provides kind example.com/fpga"), "{e}");
        assert!(e.contains("amd.com/gpu=0") && e.contains("nvidia.com/gpu=all"), "{e}");
        assert!(e.contains("broken.json"), "{e}");
        assert!(r.resolve("nvidia.com", "0").unwrap_err().contains("invalid CDI device"));
        assert!(r.resolve("nvidia.com/gpu", "-0").unwrap_err().contains("invalid CDI device"));
        let empty = Registry::default();
        assert!(empty.resolve("nvidia.com/gpu", "all").unwrap_err().contains("no CDI devices at all"));
    }

    #[test]
    fn versions() {
        let body = |v: &str| {
            format!("cdiVersion: {v}\nkind: vendor.com/dev\ndevices:\n- name: a\n  containerEdits:\n    env: [A=1]\n")
        };
        for v in ["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "\"1.1.0\"", "v0.6.0"] {
            assert!(spec("/x/v.yaml", &body(v)).is_ok(), "{v}");
        }
        for v in ["0.1.0", "0.2.0", "0.9.0", "2.0.0", "1.0"] {
            let e = spec("/x/v.yaml", &body(v)).unwrap_err();
            assert!(e.starts_with("/x/v.yaml: unsupported cdiVersion"), "{e}");
        }
        assert!(spec("/x/v.json", r#"{"kind":"a.com/b","devices":[]}"#).unwrap_err().contains("cdiVersion is missing"));
    }

    #[test]
    fn kind_syntax() {
        for k in ["vendor.com/foo", "foo.bar.baz/foo-bar123.B_az", "a/b", "nvidia.com/gpu"] {
            assert!(validate_kind(k).is_ok(), "{k}");
        }
        for k in [
            "foo",
            "vendor.com/foo/",
            "vendor.com/foo/bar",
            "/foo",
            "vendor.com/",
            "1vendor/foo",
            "vendor-/foo",
            "ven dor/foo",
        ] {
            assert!(validate_kind(k).is_err(), "{k}");
        }
        let e = spec("/x/k.json", r#"{"cdiVersion":"0.6.0","kind":"nvidia.com/gpu/x","devices":[]}"#).unwrap_err();
        assert!(e.starts_with("/x/k.json: invalid kind"), "{e}");
    }

    #[test]
    fn device_name_syntax() {
        for n in ["0", "a", "all", UUID, "MIG-1:0", "0000-00-02-0-0x46a6", "gpu_0.1"] {
            assert!(validate_device_name(n).is_ok(), "{n}");
        }
        for n in ["", "-0", "0-", "a b", "a/b", "a=b", ":x"] {
            assert!(validate_device_name(n).is_err(), "{n}");
        }
        let e = spec("/x/n.yaml", "cdiVersion: 0.5.0\nkind: a.com/b\ndevices:\n- name: bad name\n").unwrap_err();
        assert!(e.contains("device \"bad name\""), "{e}");
        let e = spec("/x/n.yaml", "cdiVersion: 0.5.0\nkind: a.com/b\ndevices:\n- name: x\n- name: x\n").unwrap_err();
        assert!(e.contains("defined twice"), "{e}");
    }

    /// The audit's attacks: paths that lead out of the root, a spec nested 100 000 deep.
    #[test]
    fn paths_stay_in_the_root_and_specs_are_bounded() {
        let bad = |edits: &str| {
            spec(
                "x.yaml",
                &format!("cdiVersion: 0.6.0\nkind: a.com/b\ndevices: [{{name: d, containerEdits: {edits}}}]\n"),
            )
            .unwrap_err()
        };
        assert!(bad("{mounts: [{hostPath: /a, containerPath: /../../etc/x}]}")
            .contains("containerPath \"/../../etc/x\" contains '..'"));
        assert!(bad("{mounts: [{hostPath: /a, containerPath: relative}]}").contains("is not absolute"));
        assert!(bad("{deviceNodes: [{path: /dev/../../x}]}").contains("path \"/dev/../../x\" contains '..'"));
        let deep =
            format!("cdiVersion: 0.6.0\nkind: a.com/b\ndevices: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let t = std::time::Instant::now();
        assert!(spec("x.yaml", &deep).unwrap_err().contains("nested deeper than 32 levels"));
        assert!(t.elapsed() < std::time::Duration::from_millis(100), "{:?}", t.elapsed());
        assert!(spec("x.yaml", &" ".repeat(2 << 20)).unwrap_err().contains("larger than"));
        // Brackets in quoted strings are text.
        assert_eq!(flow_depth(r#"a: "[[[[" b: '{{{' c: [ {d: 1} ]"#), 2);
    }

    #[test]
    fn yaml_leniency_and_field_checks() {
        // bare number as a name, octal file mode as YAML 1.1 writes it, unknown fields, nulls
        let s = spec(
            "/x/l.yaml",
            "cdiVersion: 0.6.0\nkind: a.com/b\nfuture: {x: 1}\ncontainerEdits: null\nannotations: {k: v}\n\
             devices:\n- name: 0\n  somethingNew: true\n  containerEdits:\n    deviceNodes:\n    - path: /dev/x\n      fileMode: 0666\n      type: b\n",
        )
        .unwrap();
        assert_eq!(s.devices[0].name, "0");
        assert_eq!(s.devices[0].edits.device_nodes[0].file_mode, Some(0o666));
        assert_eq!(s.devices[0].edits.device_nodes[0].kind, Some('b'));
        let bad = |edits: &str| {
            spec(
                "/x/f.json",
                &format!(
                    r#"{{"cdiVersion":"0.6.0","kind":"a.com/b","devices":[{{"name":"d","containerEdits":{edits}}}]}}"#
                ),
            )
            .unwrap_err()
        };
        assert!(bad(r#"{"env":["NOEQUALS"]}"#).contains("invalid environment variable"));
        assert!(bad(r#"{"deviceNodes":[{"path":"/dev/x","type":"x"}]}"#).contains("invalid type"));
        assert!(bad(r#"{"deviceNodes":[{"path":"/dev/x","permissions":"rwx"}]}"#).contains("invalid permissions"));
        assert!(bad(r#"{"deviceNodes":[{"hostPath":"/dev/x"}]}"#).contains("path is missing"));
        assert!(bad(r#"{"mounts":[{"hostPath":"/a"}]}"#).contains("containerPath is missing"));
        assert!(bad(r#"{"hooks":[{"hookName":"preStart","path":"/bin/true"}]}"#).contains("invalid hookName"));
        assert!(bad(r#"{"hooks":[{"hookName":"poststop","path":"true"}]}"#).contains("not absolute"));
        assert!(
            bad(r#"{"hooks":[{"hookName":"poststop","path":"/bin/true","timeout":0}]}"#).contains("greater than zero")
        );
        assert!(bad(r#"{"deviceNodes":[{"path":"/dev/x","major":-1}]}"#).contains("invalid major"));
    }

    #[test]
    fn unsupported_edits_fail_only_the_devices_that_use_them() {
        let s = spec(
            "/x/u.yaml",
            "cdiVersion: 1.1.0\nkind: a.com/b\ndevices:\n\
             - name: plain\n  containerEdits:\n    env: [A=1]\n    additionalGIDs: [0, 44]\n\
             - name: rdt\n  containerEdits:\n    intelRdt: {closID: c1}\n\
             - name: net\n  containerEdits:\n    netDevices: [{hostInterfaceName: eth1, name: net0}]\n",
        )
        .unwrap();
        let r = Registry { specs: vec![s], problems: vec![] };
        let plain = r.resolve("a.com/b", "plain").unwrap();
        assert_eq!(plain[0].edits().additional_gids, vec![44]);
        let e = r.resolve("a.com/b", "rdt").unwrap_err();
        assert!(e.contains("a.com/b=rdt") && e.contains("intelRdt") && e.contains("not support"), "{e}");
        let e = r.resolve("a.com/b", "net").unwrap_err();
        assert!(e.contains("netDevices"), "{e}");
        assert!(r.resolve("a.com/b", "all").is_err());
    }

    #[test]
    fn merge_follows_cdi() {
        let s = spec(
            "/x/m.yaml",
            "cdiVersion: 0.5.0\nkind: a.com/b\n\
             containerEdits:\n  env: [A=spec, B=spec]\n  deviceNodes: [{path: /dev/ctl}, {path: /dev/x, permissions: r}]\n\
             \x20 mounts: [{hostPath: /h/lib/a, containerPath: /usr/lib/a}, {hostPath: /h1, containerPath: /opt}]\n\
             \x20 hooks: [{hookName: createContainer, path: /bin/true}]\n\
             devices:\n- name: d1\n  containerEdits:\n    env: [A=dev]\n    deviceNodes: [{path: /dev/x, permissions: rw}]\n\
             \x20   mounts: [{hostPath: /h2, containerPath: /opt}]\n\
             - name: d2\n  containerEdits:\n    deviceNodes: [{path: /dev/y}]\n",
        )
        .unwrap();
        let r = Registry { specs: vec![s], problems: vec![] };
        let d1 = r.resolve("a.com/b", "d1").unwrap();
        let e = d1[0].edits();
        assert_eq!(e.env, [("B".to_owned(), "spec".to_owned()), ("A".to_owned(), "dev".to_owned())]);
        assert_eq!(node_paths(&e), ["/dev/ctl", "/dev/x"]);
        assert_eq!(e.device_nodes[1].permissions.as_deref(), Some("rw"));
        let mounts: Vec<(&Path, &Path)> =
            e.mounts.iter().map(|m| (m.container_path.as_path(), m.host_path.as_path())).collect();
        assert_eq!(mounts, [(Path::new("/opt"), Path::new("/h2")), (Path::new("/usr/lib/a"), Path::new("/h/lib/a"))]);
        let all = r.resolve("a.com/b", "all").unwrap();
        assert_eq!(all.len(), 2);
        let both = combined_edits(&all);
        assert_eq!(both.hooks.len(), 1, "spec-level hooks once");
        assert_eq!(node_paths(&both), ["/dev/ctl", "/dev/x", "/dev/y"]);
        assert_eq!(all.iter().map(|d| d.edits().hooks.len()).sum::<usize>(), 2, "each device alone gets them");
    }

    #[test]
    fn same_directory_conflict_drops_the_device() {
        let tmp = tempfile::tempdir().unwrap();
        let (low, high) = (tmp.path().join("low"), tmp.path().join("high"));
        std::fs::create_dir_all(&low).unwrap();
        std::fs::create_dir_all(&high).unwrap();
        let body = |dev: &str, node: &str| {
            format!(
                r#"{{"cdiVersion":"0.5.0","kind":"a.com/b","devices":[{{"name":"{dev}","containerEdits":{{"deviceNodes":[{{"path":"{node}"}}]}}}}]}}"#
            )
        };
        std::fs::write(low.join("1.json"), body("x", "/dev/one")).unwrap();
        std::fs::write(low.join("2.json"), body("x", "/dev/two")).unwrap();
        std::fs::write(low.join("3.json"), body("y", "/dev/y1")).unwrap();
        std::fs::write(low.join("4.json"), body("y", "/dev/y2")).unwrap();
        std::fs::write(high.join("5.json"), body("y", "/dev/y3")).unwrap();
        let r = Registry::load(&[low.clone(), high]);
        let e = r.resolve("a.com/b", "x").unwrap_err();
        assert!(e.contains("a.com/b has: y"), "{e}");
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        assert!(r.problems.iter().all(|p| p.contains("a.com/b=x") && p.contains("1.json") && p.contains("2.json")));
        // a higher directory settles a conflict below it
        let y = r.resolve("a.com/b", "y").unwrap();
        assert_eq!(node_paths(&y[0].edits()), ["/dev/y3"]);
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn hook(path: PathBuf, args: &[&str], env: &[&str], timeout: Option<u32>) -> Hook {
        Hook {
            hook_name: "createContainer".into(),
            path,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            timeout,
        }
    }

    #[test]
    fn run_hook_passes_state_args_and_env() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("state");
        let env_out = tmp.path().join("env");
        let path = script(tmp.path(), "hook.sh", "/bin/cat > \"$1\"\necho \"FOO=$FOO HOME=${HOME:-unset}\" > \"$2\"\n");
        let state = oci_state("box-1", 4242, Path::new("/run/gpubox/box-1"), "created");
        let h = hook(path, &["my-hook", out.to_str().unwrap(), env_out.to_str().unwrap()], &["FOO=bar"], Some(10));
        run_hook(&h, &state).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), state);
        assert_eq!(std::fs::read_to_string(&env_out).unwrap().trim(), "FOO=bar HOME=unset");

        // args[0] is argv0, not a parameter
        let cmdline = tmp.path().join("cmdline");
        let h = hook(
            PathBuf::from("/bin/sh"),
            &["custom-argv0", "-c", &format!("/bin/cat /proc/$$/cmdline > {}", cmdline.display())],
            &[],
            None,
        );
        run_hook(&h, "{}").unwrap();
        let got = std::fs::read(&cmdline).unwrap();
        assert!(got.starts_with(b"custom-argv0\0-c\0"), "{:?}", String::from_utf8_lossy(&got));
    }

    #[test]
    fn run_hook_reports_failure_with_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let path = script(tmp.path(), "fail.sh", "echo 'cannot update ldcache' >&2\nexit 3\n");
        let e = run_hook(&hook(path.clone(), &["fail"], &[], None), "{}").unwrap_err();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("exit status 3") && e.contains("cannot update ldcache"), "{e}");
        let e = run_hook(&hook(tmp.path().join("absent"), &[], &[], None), "{}").unwrap_err();
        assert!(e.contains("cannot start"), "{e}");
        let e = run_hook(&hook("relative".into(), &[], &[], None), "{}").unwrap_err();
        assert!(e.contains("not absolute"), "{e}");
    }

    #[test]
    fn run_hook_kills_a_hook_past_its_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        // the sleep is a child of the shell: the whole process group must go
        let path = script(tmp.path(), "slow.sh", "echo started >&2\n/bin/sleep 30\necho done\n");
        let start = Instant::now();
        let e = run_hook(&hook(path, &["slow"], &[], Some(1)), "{}").unwrap_err();
        let took = start.elapsed();
        assert!(e.contains("timed out after 1s"), "{e}");
        assert!(e.contains("started"), "{e}");
        assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn run_hook_ignores_a_hook_that_does_not_read_stdin() {
        let big = format!("{{\"x\":\"{}\"}}", "a".repeat(1 << 20));
        run_hook(&hook(PathBuf::from("/bin/true"), &["true"], &[], Some(5)), &big).unwrap();
    }

    #[test]
    fn oci_state_json() {
        let v: serde_json::Value = serde_json::from_str(&oci_state("c1", 77, Path::new("/b"), "creating")).unwrap();
        assert_eq!(v["ociVersion"], "1.2.0");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["pid"], 77);
        assert_eq!(v["bundle"], "/b");
        assert_eq!(v["status"], "creating");
        assert!(v["annotations"].as_object().unwrap().is_empty());
        let v: serde_json::Value = serde_json::from_str(&oci_state("c1", 0, Path::new("/b"), "stopped")).unwrap();
        assert!(v.get("pid").is_none());
    }
}
