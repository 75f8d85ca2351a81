//! GPUs by count (`[GPU] Count=N`): which GPUs a definition may be given, what names each one
//! for locking, and which N of the free ones to take. Pure: the supervisor's allocator
//! (`supervisor/src/allocator.rs`) does the locking and the waiting.
//!
//! A GPU is one unit for this whatever way it is named: an NVIDIA or DRM GPU of the inventory,
//! or one device of a CDI kind (`cdi:VENDOR/CLASS=all` offers each device of that kind but the
//! `all` device itself). Its key, for the host-wide lock, is its PCI address where known, so
//! `nvidia:0` and a CDI device whose node is `/dev/nvidia0` are the same GPU to the allocator.
//!
//! The choice, as a person placing a job would make it: the fewest NUMA nodes first, then the
//! GPUs closest on the PCIe tree (the sum over pairs of the hops between them through their
//! deepest common bridge: two GPUs behind one PCIe switch are 2 apart, across root ports more),
//! then the lowest indices. NVLink is not seen here (it needs NVML); GPUs joined by NVLink are
//! usually behind one switch too.

use crate::{cdi, nvidia, select, Gpu, Inventory, Node};
use gpubox_definition::Selector;
use std::path::Path;

/// One GPU a `Count=` definition may be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The selector that names exactly this GPU (`pci:…`, `drm:…`, `cdi:…=NAME`).
    pub selector: Selector,
    /// How people know it (`nvidia:0`, `cdi:amd.com/gpu=1`).
    pub label: String,
    /// The host-wide lock's name: `pci-0000:65:00.0`, else `drm-card1` or `cdi-VENDOR_CLASS=NAME`.
    pub key: String,
    pub numa: Option<u32>,
    /// The GPU's sysfs device path below `/sys/devices`, by component: its PCIe ancestry.
    pub pci_path: Vec<String>,
    /// An NVIDIA GPU's PCI address, for NVML's topology (NVLink).
    pub nvidia_bus: Option<String>,
}

/// The GPUs the selectors match, each once (all of the inventory's without a selector).
pub fn candidates(inventory: &Inventory, selectors: &[Selector]) -> Result<Vec<Candidate>, crate::Error> {
    let mut out: Vec<Candidate> = Vec::new();
    let all = [Selector::All];
    let selectors = if selectors.is_empty() { &all[..] } else { selectors };
    for selector in selectors {
        match selector {
            Selector::Cdi { kind, name } => {
                let names: Vec<String> = if name == "all" {
                    let mut own: Vec<String> = inventory
                        .cdi
                        .devices()
                        .into_iter()
                        .filter(|(q, _, d)| q.starts_with(&format!("{kind}=")) && d.name != "all")
                        .map(|(_, _, d)| d.name.clone())
                        .collect();
                    own.sort();
                    own.dedup();
                    own
                } else {
                    vec![name.clone()]
                };
                for device in names {
                    let resolved = inventory
                        .cdi
                        .resolve(kind, &device)
                        .map_err(|e| crate::Error::Selection(format!("[GPU] Device={selector}: {e}")))?;
                    let nodes = cdi::combined_edits(&resolved).device_nodes;
                    let numbers: Vec<(u32, u32)> = nodes
                        .iter()
                        .filter_map(|n| match (n.major, n.minor) {
                            (Some(a), Some(b)) => Some((a, b)),
                            _ => Node::stat(&n.host_path).map(|s| (s.major, s.minor)),
                        })
                        .collect();
                    let same = inventory
                        .gpus
                        .iter()
                        .find(|g| own_nodes(g).iter().any(|n| numbers.contains(&(n.major, n.minor))));
                    let label = format!("cdi:{kind}={device}");
                    let candidate = match same {
                        Some(gpu) => Candidate {
                            selector: Selector::Cdi { kind: kind.clone(), name: device },
                            label,
                            ..of_gpu(gpu)
                        },
                        None => Candidate {
                            selector: Selector::Cdi { kind: kind.clone(), name: device.clone() },
                            key: format!("cdi-{}={device}", kind.replace('/', "_")),
                            label,
                            numa: None,
                            pci_path: Vec::new(),
                            nvidia_bus: None,
                        },
                    };
                    push(&mut out, candidate);
                }
            }
            _ => {
                for gpu in inventory.gpus.iter().filter(|g| select::matches(selector, g)) {
                    push(&mut out, of_gpu(gpu));
                }
            }
        }
    }
    Ok(out)
}

fn push(out: &mut Vec<Candidate>, c: Candidate) {
    if !out.iter().any(|o| o.key == c.key) {
        out.push(c);
    }
}

/// A GPU's own nodes: not the control nodes every NVIDIA GPU shares.
pub fn own_nodes(gpu: &Gpu) -> Vec<&Node> {
    gpu.nodes.iter().filter(|n| !nvidia::CONTROL_NODES.iter().any(|c| n.path == Path::new(c))).collect()
}

/// The host-wide key of an inventory GPU.
pub fn key_of(gpu: &Gpu) -> String {
    match (&gpu.pci, gpu.drm.first()) {
        (Some(pci), _) => format!("pci-{pci}"),
        (None, Some(drm)) => format!("drm-{drm}"),
        (None, None) => format!(
            "node-{}",
            gpu.nodes.first().map(|n| n.path.display().to_string()).unwrap_or_default().replace('/', "_")
        ),
    }
}

fn of_gpu(gpu: &Gpu) -> Candidate {
    let selector = match (&gpu.pci, gpu.drm.first()) {
        (Some(pci), _) => Selector::Pci(*pci),
        (None, Some(drm)) => Selector::Drm(drm.clone()),
        (None, None) => Selector::All,
    };
    let label = select::selector_forms(gpu).into_iter().next().unwrap_or_else(|| selector.to_string());
    // GPUBOX_SYSFS replaces /sys, for tests with a stand-in topology.
    let root = std::env::var_os("GPUBOX_SYSFS").map(std::path::PathBuf::from).unwrap_or_else(|| "/sys".into());
    let sysfs = gpu.pci.map(|p| root.join("bus/pci/devices").join(p.to_string()));
    let numa = sysfs
        .as_ref()
        .and_then(|s| std::fs::read_to_string(s.join("numa_node")).ok())
        .and_then(|t| t.trim().parse::<i64>().ok())
        .and_then(|n| u32::try_from(n).ok());
    let pci_path = sysfs
        .and_then(|s| std::fs::canonicalize(s).ok())
        .map(|p| {
            p.strip_prefix(root.join("devices"))
                .unwrap_or(&p)
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let nvidia_bus = gpu.nvidia.as_ref().and(gpu.pci).map(|p| p.to_string());
    Candidate { selector, label, key: key_of(gpu), numa, pci_path, nvidia_bus }
}

/// Hops between two GPUs on the PCIe tree, through their deepest common ancestor; GPUs whose
/// place is unknown are far apart.
pub fn distance(a: &Candidate, b: &Candidate) -> usize {
    if a.pci_path.is_empty() || b.pci_path.is_empty() {
        return 64;
    }
    let common = a.pci_path.iter().zip(&b.pci_path).take_while(|(x, y)| x == y).count();
    a.pci_path.len() + b.pci_path.len() - 2 * common
}

/// The best `n` of `free` (indices into it), or `None` when there are fewer.
pub fn choose(free: &[&Candidate], n: usize) -> Option<Vec<usize>> {
    choose_with(free, n, &distance)
}

/// [`choose`] with another measure of how far apart two GPUs are (NVML's, where it knows).
pub fn choose_with(
    free: &[&Candidate],
    n: usize,
    distance: &dyn Fn(&Candidate, &Candidate) -> usize,
) -> Option<Vec<usize>> {
    if free.len() < n {
        return None;
    }
    let cost = |set: &[usize]| {
        let mut numa: Vec<Option<u32>> = set.iter().map(|&i| free[i].numa).collect();
        numa.sort();
        numa.dedup();
        let mut hops = 0;
        for (x, &i) in set.iter().enumerate() {
            for &j in &set[x + 1..] {
                hops += distance(free[i], free[j]);
            }
        }
        (numa.len(), hops)
    };
    // Every combination for the sizes hosts have (8 GPUs, 4 of them: 70 sets); beyond that, the
    // greedy choice: the best start, then the nearest one at a time.
    if combinations(free.len(), n) <= 5000 {
        let mut best: Option<(Vec<usize>, (usize, usize))> = None;
        for_each_combination(free.len(), n, &mut |set| {
            let c = cost(set);
            if best.as_ref().is_none_or(|(_, b)| c < *b) {
                best = Some((set.to_vec(), c));
            }
        });
        return best.map(|(s, _)| s);
    }
    let mut chosen = vec![0];
    while chosen.len() < n {
        let next = (0..free.len()).filter(|i| !chosen.contains(i)).min_by_key(|&i| {
            let mut with = chosen.clone();
            with.push(i);
            cost(&with)
        })?;
        chosen.push(next);
    }
    chosen.sort();
    Some(chosen)
}

fn combinations(n: usize, k: usize) -> u128 {
    (0..k as u128).fold(1u128, |acc, i| acc.saturating_mul(n as u128 - i) / (i + 1))
}

fn for_each_combination(n: usize, k: usize, f: &mut dyn FnMut(&[usize])) {
    fn go(start: usize, n: usize, k: usize, set: &mut Vec<usize>, f: &mut dyn FnMut(&[usize])) {
        if set.len() == k {
            f(set);
            return;
        }
        for i in start..n {
            set.push(i);
            go(i + 1, n, k, set, f);
            set.pop();
        }
    }
    go(0, n, k, &mut Vec::with_capacity(k), f);
}

/// Why these: "NUMA node 1; one PCIe switch" and the like, for the log.
pub fn explain(chosen: &[&Candidate]) -> String {
    let mut numa: Vec<String> = chosen.iter().map(|c| c.numa.map_or("?".into(), |n| n.to_string())).collect();
    numa.sort();
    numa.dedup();
    let common = chosen
        .iter()
        .map(|c| c.pci_path.len())
        .min()
        .map(|shortest| {
            (0..shortest).take_while(|&i| chosen.iter().all(|c| c.pci_path[i] == chosen[0].pci_path[i])).count()
        })
        .unwrap_or(0);
    let place = match common {
        _ if chosen.len() < 2 => String::new(),
        0 => "; across PCIe root complexes".into(),
        1 => "; one PCIe root complex".into(),
        _ => format!("; below {}", chosen[0].pci_path[common - 1]),
    };
    format!("NUMA node {}{place}", numa.join("+"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(i: usize, numa: u32, path: &str) -> Candidate {
        Candidate {
            selector: Selector::NvidiaIndex(i as u32),
            label: format!("nvidia:{i}"),
            key: format!("k{i}"),
            numa: Some(numa),
            pci_path: path.split('/').map(str::to_owned).collect(),
            nvidia_bus: None,
        }
    }

    /// An 8-GPU host as DGX-class machines are laid out: two sockets, two PCIe switches each,
    /// two GPUs behind each switch.
    fn host() -> Vec<Candidate> {
        (0..8)
            .map(|i| {
                let socket = i / 4;
                let switch = i / 2;
                gpu(i, socket as u32, &format!("pci0000:{socket}0/0000:{socket}0:01.0/sw{switch}/gpu{i}"))
            })
            .collect()
    }

    #[test]
    fn two_gpus_come_from_one_switch_and_four_from_one_socket() {
        let all = host();
        let free: Vec<&Candidate> = all.iter().collect();
        assert_eq!(choose(&free, 2), Some(vec![0, 1]));
        assert_eq!(choose(&free, 4), Some(vec![0, 1, 2, 3]));
        // GPU 0 and 2 are taken: the pair behind one switch that is free, not 1 and 3.
        let free: Vec<&Candidate> =
            all.iter().enumerate().filter(|(i, _)| ![0, 2].contains(i)).map(|(_, c)| c).collect();
        let pair: Vec<&str> = choose(&free, 2).unwrap().iter().map(|&i| free[i].label.as_str()).collect();
        assert_eq!(pair, ["nvidia:4", "nvidia:5"]);
        // Three on socket 0 are free but one is taken on socket 1: 4 come from socket 1? No:
        // socket 1 has 3 free, socket 0 has 3 free; 4 must span both.
        let free: Vec<&Candidate> =
            all.iter().enumerate().filter(|(i, _)| ![0, 7].contains(i)).map(|(_, c)| c).collect();
        let four = choose(&free, 4).unwrap();
        assert_eq!(four.len(), 4);
        assert!(choose(&free, 7).is_none());
        let chosen: Vec<&Candidate> = [0, 1].iter().map(|&i| &all[i]).collect();
        assert_eq!(explain(&chosen), "NUMA node 0; below sw0");
    }

    /// NVML's word wins: GPUs 1 and 3 joined by NVLink are a better pair than 0 and 1 behind
    /// one switch.
    #[test]
    fn nvlink_pairs_come_first() {
        let all = host();
        let free: Vec<&Candidate> = all.iter().collect();
        let nvlinked = |a: &Candidate, b: &Candidate| {
            let pair = [a.label.as_str(), b.label.as_str()];
            if pair == ["nvidia:1", "nvidia:3"] || pair == ["nvidia:3", "nvidia:1"] {
                1
            } else {
                distance(a, b)
            }
        };
        assert_eq!(choose_with(&free, 2, &nvlinked), Some(vec![1, 3]));
    }

    #[test]
    fn many_gpus_are_chosen_greedily_and_still_near() {
        let all: Vec<Candidate> =
            (0..64).map(|i| gpu(i, (i / 32) as u32, &format!("root{}/sw{}/gpu{i}", i / 32, i / 4))).collect();
        let free: Vec<&Candidate> = all.iter().collect();
        let chosen = choose(&free, 4).unwrap();
        assert!(chosen.iter().all(|&i| free[i].numa == Some(0)), "{chosen:?}");
    }
}
