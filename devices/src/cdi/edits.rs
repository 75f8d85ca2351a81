//! A device's edits, merged as CDI applies them to an OCI spec.

use super::model::{ContainerEdits, Spec};
use super::registry::Resolved;

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
    pub(super) fn append(&mut self, other: &ContainerEdits) {
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
    pub(super) fn finish(&mut self) {
        self.mounts.sort_by_key(|m| m.container_path.components().count());
    }
}
