//! Spec files as read: JSON or YAML, bounded in size and nesting, every field checked and
//! converted to the model (model.rs), each error starting with the file's path.

use super::model::{ContainerEdits, Device, DeviceNode, Hook, Mount, Spec, HOOK_NAMES};
use crate::Error;
use gpubox_definition::cdi_name::{validate_device_name, validate_kind};
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// The spec versions this module reads.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0"];

/// Reads and checks one spec file; the error starts with the file's path.
pub fn load_spec(path: &Path) -> Result<Spec, Error> {
    use std::io::Read;
    let unreadable = |e: std::io::Error| Error::Spec { path: path.to_owned(), message: format!("cannot read: {e}") };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut text = String::new();
    file.take(MAX_SPEC_BYTES + 1).read_to_string(&mut text).map_err(unreadable)?;
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
pub(super) fn flow_depth(text: &str) -> usize {
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
pub fn parse_spec(path: &Path, text: &str) -> Result<Spec, Error> {
    let error = |message: String| Error::Spec { path: path.to_owned(), message };
    if text.len() as u64 > MAX_SPEC_BYTES {
        return Err(error(format!("larger than {MAX_SPEC_BYTES} bytes; not read")));
    }
    if flow_depth(text) > MAX_SPEC_DEPTH {
        return Err(error(format!("nested deeper than {MAX_SPEC_DEPTH} levels; not read")));
    }
    let raw: RawSpec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| error(format!("not a valid CDI spec (JSON): {e}")))?
    } else {
        yaml_serde::from_str(text).map_err(|e| error(format!("not a valid CDI spec (YAML): {e}")))?
    };
    convert(path, raw).map_err(error)
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
