//! The spec directories: every spec read, later directories overriding earlier ones, devices
//! defined twice at one priority dropped, and qualified names resolved to devices.

use super::file::load_spec;
use super::model::{ContainerEdits, Device, Spec};
use crate::Error;
use gpubox_definition::cdi_name::{validate_device_name, validate_kind};
use std::collections::HashMap;
use std::path::PathBuf;

/// CDI's spec directories, lowest priority first.
pub const DEFAULT_DIRS: &[&str] = &["/etc/cdi", "/var/run/cdi"];

/// Every spec found, with overridden and conflicting devices already removed from the specs
/// that lost, and one line per file that could not be used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    pub specs: Vec<Spec>,
    /// `FILE: what is wrong`, for files (or directories) that could not be used, and for
    /// devices defined twice at the same priority.
    pub problems: Vec<String>,
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
                    Err(e) => problems.push(e.to_string()),
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
    pub fn resolve(&self, kind: &str, name: &str) -> Result<Vec<Resolved<'_>>, Error> {
        let invalid = |e: String| Error::CdiDevice(format!("invalid CDI device {kind}={name}: {e}"));
        validate_kind(kind).map_err(invalid)?;
        if name != "all" {
            validate_device_name(name).map_err(invalid)?;
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
            return Err(Error::CdiDevice(text));
        }
        let chosen: Vec<Resolved<'_>> = if name == "all" && !of_kind.iter().any(|(_, _, d)| d.name == "all") {
            of_kind.iter().map(|(q, s, d)| Resolved { qualified: q.clone(), spec: s, device: d }).collect()
        } else {
            match of_kind.iter().find(|(_, _, d)| d.name == name) {
                Some((q, s, d)) => vec![Resolved { qualified: q.clone(), spec: s, device: d }],
                None => {
                    let have: Vec<&str> = of_kind.iter().map(|(_, _, d)| d.name.as_str()).collect();
                    return Err(Error::CdiDevice(format!(
                        "no CDI device {kind}={name}; {kind} has: {}",
                        have.join(", ")
                    )));
                }
            }
        };
        for r in &chosen {
            let mut unsupported = r.spec.edits.unsupported.clone();
            unsupported
                .extend(r.device.edits.unsupported.iter().filter(|u| !r.spec.edits.unsupported.contains(u)).cloned());
            if !unsupported.is_empty() {
                return Err(Error::CdiDevice(format!(
                    "CDI device {} ({}) needs {} edits, which gpubox does not support",
                    r.qualified,
                    r.spec.path.display(),
                    unsupported.join(" and ")
                )));
            }
        }
        Ok(chosen)
    }
}

/// `vendor/class=name`.
pub fn qualified(kind: &str, name: &str) -> String {
    format!("{kind}={name}")
}
