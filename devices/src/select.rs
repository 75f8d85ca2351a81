//! Matching `[GPU] Device=` selectors against the host's GPUs. Selecting a GPU brings all of
//! its nodes (card and render node; an NVIDIA device and its control nodes).

use crate::Error;
use crate::{cdi, Gpu, Inventory, Node};
use gpubox_definition::Selector;
use std::path::PathBuf;

/// What a definition gets: device nodes, and for CDI devices their other edits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    pub nodes: Vec<Node>,
    pub mounts: Vec<cdi::Mount>,
    pub env: Vec<(String, String)>,
    pub hooks: Vec<cdi::Hook>,
    /// How each selected device is named, for logs and status.
    pub names: Vec<String>,
    /// Owner and mode inside that a CDI spec gives a node (by its path inside), where it does.
    pub node_access: Vec<(PathBuf, NodeAccess)>,
}

/// A CDI device node's `fileMode`, `uid` and `gid`, in the container's terms (`None` where the
/// spec leaves it to gpubox), and its `hostPath`, whose mode the node takes without a
/// `fileMode`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeAccess {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub host_path: Option<PathBuf>,
}

impl Selection {
    /// What the specs say about the node at `path` inside (nothing for a non-CDI node).
    pub fn access_of(&self, path: &std::path::Path) -> NodeAccess {
        self.node_access.iter().rev().find(|(p, _)| p == path).map(|(_, a)| a.clone()).unwrap_or_default()
    }
}

/// Resolves every selector; one that matches nothing is an error unless `optional`, and the
/// error lists what the host has.
pub fn select(inventory: &Inventory, selectors: &[Selector], optional: bool) -> Result<Selection, Error> {
    let mut selection = Selection::default();
    for selector in selectors {
        if let Selector::Cdi { kind, name } = selector {
            match inventory.cdi.resolve(kind, name) {
                // Spec-level edits once, however many of the spec's devices are selected.
                Ok(devices) => add_cdi(&mut selection, &format!("{kind}={name}"), cdi::combined_edits(&devices))?,
                Err(_) if optional => {}
                Err(e) => return Err(Error::Selection(format!("[GPU] Device={selector}: {e}"))),
            }
            continue;
        }
        let matched: Vec<&Gpu> = inventory.gpus.iter().filter(|g| matches(selector, g)).collect();
        if matched.is_empty() && !optional {
            return Err(Error::Selection(format!(
                "[GPU] Device={selector} matches no GPU on this host; {}",
                describe(inventory)
            )));
        }
        for gpu in matched {
            let name = primary_name(gpu);
            if !selection.names.contains(&name) {
                selection.names.push(name);
            }
            selection.nodes.extend(gpu.nodes.iter().cloned());
        }
    }
    selection.nodes.sort();
    selection.nodes.dedup();
    Ok(selection)
}

fn add_cdi(selection: &mut Selection, qualified: &str, edits: cdi::ContainerEdits) -> Result<(), Error> {
    for n in &edits.device_nodes {
        if n.kind.is_some_and(|k| k != 'c' && k != 'u') {
            return Err(Error::Selection(format!(
                "cdi:{qualified}: {} is not a character device; gpubox passes only those",
                n.path.display()
            )));
        }
        // The container gets a node made from the numbers, so the host path only supplies them.
        let node = match (n.major, n.minor) {
            (Some(major), Some(minor)) => Node { path: n.path.clone(), major, minor },
            _ => {
                let found = Node::stat(&n.host_path).ok_or_else(|| {
                    Error::Selection(format!(
                        "cdi:{qualified}: device node {} is missing on the host",
                        n.host_path.display()
                    ))
                })?;
                Node { path: n.path.clone(), ..found }
            }
        };
        selection.nodes.push(node);
        // Go's os.FileMode carries the file type above the permission bits. Without a
        // fileMode, CDI takes the host node's mode: the host path's, not the path inside.
        let access = NodeAccess {
            mode: n.file_mode.map(|m| m & 0o777),
            uid: n.uid,
            gid: n.gid,
            host_path: Some(n.host_path.clone()),
        };
        selection.node_access.push((n.path.clone(), access));
    }
    for m in edits.mounts {
        selection.mounts.retain(|x| x.container_path != m.container_path);
        selection.mounts.push(m);
    }
    for (k, v) in edits.env {
        selection.env.retain(|(n, _)| *n != k);
        selection.env.push((k, v));
    }
    for h in edits.hooks {
        if !selection.hooks.contains(&h) {
            selection.hooks.push(h);
        }
    }
    selection.names.push(format!("cdi:{qualified}"));
    Ok(())
}

pub fn matches(selector: &Selector, gpu: &Gpu) -> bool {
    match selector {
        Selector::All => true,
        Selector::NvidiaIndex(i) => gpu.nvidia.as_ref().is_some_and(|n| n.index == *i),
        Selector::NvidiaUuid(u) => gpu.nvidia.as_ref().is_some_and(|n| n.uuid.eq_ignore_ascii_case(u)),
        Selector::Pci(a) => gpu.pci.as_ref() == Some(a),
        Selector::Drm(name) => gpu.drm.iter().any(|d| d == name),
        Selector::Vendor(v) => gpu.vendor == Some(*v),
        Selector::Cdi { .. } => false,
    }
}

/// The selector forms that name this GPU, most specific first (for `gpuboxctl devices`).
pub fn selector_forms(gpu: &Gpu) -> Vec<String> {
    let mut forms = Vec::new();
    if let Some(n) = &gpu.nvidia {
        forms.push(format!("nvidia:{}", n.index));
        forms.push(format!("nvidia:{}", n.uuid));
    }
    if let Some(a) = gpu.pci {
        forms.push(format!("pci:{a}"));
    }
    forms.extend(gpu.drm.iter().map(|d| format!("drm:{d}")));
    if let Some(v) = gpu.vendor {
        forms.push(format!("vendor:{v:04x}"));
    }
    forms
}

fn primary_name(gpu: &Gpu) -> String {
    selector_forms(gpu).into_iter().next().unwrap_or_else(|| "gpu".into())
}

fn describe(inventory: &Inventory) -> String {
    let mut have: Vec<String> = inventory.gpus.iter().map(|g| selector_forms(g).join(" ")).collect();
    have.extend(inventory.cdi.devices().into_iter().map(|(q, _, _)| format!("cdi:{q}")));
    let absent: Vec<String> =
        inventory.backends.iter().filter_map(|b| b.absent.as_ref().map(|why| format!("{}: {why}", b.name))).collect();
    let mut text = if have.is_empty() { "it has none".to_owned() } else { format!("it has: {}", have.join("; ")) };
    if !absent.is_empty() {
        text.push_str(&format!(" ({})", absent.join("; ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, NvidiaGpu};

    fn node(path: &str, major: u32, minor: u32) -> Node {
        Node { path: path.into(), major, minor }
    }

    /// A host with an Intel iGPU, an NVIDIA GPU driven by nvidia + nvidia-drm, and an AMD GPU,
    /// as udev and the NVIDIA driver describe them.
    fn host() -> Inventory {
        let nvidia_control = [node("/dev/nvidiactl", 195, 255), node("/dev/nvidia-uvm", 508, 0)];
        Inventory {
            gpus: vec![
                Gpu {
                    pci: Some("0000:00:02.0".parse().unwrap()),
                    vendor: Some(0x8086),
                    device: Some(0x46a6),
                    driver: Some("i915".into()),
                    drm: vec!["card0".into(), "renderD128".into()],
                    nvidia: None,
                    nodes: vec![node("/dev/dri/card0", 226, 0), node("/dev/dri/renderD128", 226, 128)],
                    syspath: Some("/sys/devices/pci0000:00/0000:00:02.0".into()),
                },
                Gpu {
                    pci: Some("0000:01:00.0".parse().unwrap()),
                    vendor: Some(0x10de),
                    device: Some(0x2335),
                    driver: Some("nvidia".into()),
                    drm: vec!["card1".into(), "renderD129".into()],
                    nvidia: Some(NvidiaGpu {
                        index: 0,
                        uuid: "GPU-5a6e1f3c-8d2b-4e39-9f0a-1b2c3d4e5f60".into(),
                        name: "NVIDIA H200".into(),
                        minor: 0,
                    }),
                    nodes: [
                        node("/dev/dri/card1", 226, 1),
                        node("/dev/dri/renderD129", 226, 129),
                        node("/dev/nvidia0", 195, 0),
                    ]
                    .into_iter()
                    .chain(nvidia_control)
                    .collect(),
                    syspath: Some("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0".into()),
                },
                Gpu {
                    pci: Some("0000:03:00.0".parse().unwrap()),
                    vendor: Some(0x1002),
                    device: Some(0x744c),
                    driver: Some("amdgpu".into()),
                    drm: vec!["card2".into(), "renderD130".into()],
                    nvidia: None,
                    nodes: vec![node("/dev/dri/card2", 226, 2), node("/dev/dri/renderD130", 226, 130)],
                    syspath: None,
                },
            ],
            backends: vec![Backend { name: "drm", absent: None }, Backend { name: "nvidia", absent: None }],
            cdi: cdi::Registry::default(),
        }
    }

    fn pick(selectors: &[&str]) -> Result<Vec<String>, String> {
        let selectors: Vec<Selector> = selectors.iter().map(|s| s.parse().unwrap()).collect();
        select(&host(), &selectors, false)
            .map(|s| s.nodes.iter().map(|n| n.path.display().to_string()).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn each_selector_brings_all_nodes_of_its_gpu() {
        let nvidia = ["/dev/dri/card1", "/dev/dri/renderD129", "/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidiactl"];
        assert_eq!(pick(&["nvidia:0"]).unwrap(), nvidia);
        assert_eq!(pick(&["nvidia:GPU-5A6E1F3C-8D2B-4E39-9F0A-1B2C3D4E5F60"]).unwrap(), nvidia);
        assert_eq!(pick(&["pci:01:00.0"]).unwrap(), nvidia);
        assert_eq!(pick(&["drm:renderD129"]).unwrap(), nvidia);
        assert_eq!(pick(&["vendor:10de"]).unwrap(), nvidia);
        assert_eq!(pick(&["drm:card0"]).unwrap(), ["/dev/dri/card0", "/dev/dri/renderD128"]);
        assert_eq!(pick(&["all"]).unwrap().len(), 9);
    }

    #[test]
    fn overlapping_selectors_do_not_duplicate_nodes() {
        assert_eq!(pick(&["nvidia:0", "vendor:10de", "drm:card1"]).unwrap().len(), 5);
        assert_eq!(pick(&["drm:card0", "vendor:1002"]).unwrap().len(), 4);
    }

    #[test]
    fn no_match_lists_what_exists_unless_optional() {
        let e = pick(&["nvidia:1"]).unwrap_err().to_string();
        assert!(
            e.starts_with("[GPU] Device=nvidia:1 matches no GPU on this host; it has: pci:0000:00:02.0 drm:card0"),
            "{e}"
        );
        assert!(e.contains("nvidia:0 nvidia:GPU-5a6e1f3c"), "{e}");
        let optional = select(&host(), &["nvidia:1".parse().unwrap()], true).unwrap();
        assert!(optional.nodes.is_empty());
        let mut empty = host();
        empty.gpus.clear();
        empty.backends[1].absent = Some("no NVIDIA driver (/proc/driver/nvidia/gpus: NotFound)".into());
        let e = select(&empty, &["all".parse().unwrap()], false).unwrap_err().to_string();
        assert_eq!(
            e,
            "[GPU] Device=all matches no GPU on this host; it has none (nvidia: no NVIDIA driver (/proc/driver/nvidia/gpus: NotFound))"
        );
    }

    #[test]
    fn selector_forms_name_each_gpu() {
        let h = host();
        assert_eq!(
            selector_forms(&h.gpus[1]),
            [
                "nvidia:0",
                "nvidia:GPU-5a6e1f3c-8d2b-4e39-9f0a-1b2c3d4e5f60",
                "pci:0000:01:00.0",
                "drm:card1",
                "drm:renderD129",
                "vendor:10de"
            ]
        );
        for form in selector_forms(&h.gpus[1]) {
            assert!(matches(&form.parse().unwrap(), &h.gpus[1]), "{form}");
            assert!(!matches(&form.parse().unwrap(), &h.gpus[0]) || form == "all", "{form}");
        }
    }
}
