//! The devices a container starts with: those its selectors name, or `Count=` GPUs of them
//! allocated host-wide (allocator.rs), each held for the container's life; and, for status,
//! which nodes and mounts each brought.

use crate::ledger::Entry;
use crate::{allocator, log};
use anyhow::{bail, Result};
use gpubox_control::Origin;
use gpubox_definition::{Definition, Selector};
use gpubox_devices::allocation::{self, Candidate};
use gpubox_devices::{Inventory, Selection};

/// What the start gets.
#[derive(Default)]
pub struct StartDevices {
    pub selection: Selection,
    /// The ledger's first entries: one per selector (or allocated GPU) that brought something.
    pub devices: Vec<Entry>,
    /// The GPUs held, released when dropped (by the kernel, at the latest, when the
    /// supervisor ends).
    pub held: Vec<allocator::Held>,
    /// The selectors the container holds its devices by, for hotplug's reselection.
    pub selectors: Vec<Selector>,
    /// `/proc/driver/nvidia/gpus/BUS` of the host's other NVIDIA GPUs, hidden inside.
    pub hidden: Vec<std::path::PathBuf>,
    /// `NUMA=yes`: the CPUs and memory nodes of the GPUs' NUMA nodes.
    pub numa: Option<crate::numa::Binding>,
    /// The NVIDIA GPUs it holds, as the driver's Xid messages name them (`0000:65:00`), with
    /// their names: their Xid errors go to the container's log.
    pub xid: Vec<(String, String)>,
}

pub fn prepare(d: &Definition, mut waiting: impl FnMut(&str)) -> Result<StartDevices> {
    let gpu = &d.gpu;
    if gpu.devices.is_empty() && gpu.count.is_none() {
        return Ok(StartDevices::default());
    }
    let inventory = Inventory::discover();
    if let Some(n) = gpu.count {
        let candidates = allocation::candidates(&inventory, &gpu.devices).map_err(anyhow::Error::msg)?;
        let held = allocator::allocate(
            &d.name,
            &candidates,
            n as usize,
            gpu.exclusive(),
            gpu.allocation_timeout,
            &mut waiting,
        )?;
        let chosen: Vec<&Candidate> = held.iter().filter_map(|h| candidates.iter().find(|c| c.key == h.key)).collect();
        log::info(&format!(
            "allocated {} of {} ({})",
            chosen.iter().map(|c| c.label.as_str()).collect::<Vec<_>>().join(", "),
            candidates.len(),
            allocation::explain(&chosen)
        ));
        let selectors: Vec<Selector> = chosen.iter().map(|c| c.selector.clone()).collect();
        let selection = gpubox_devices::select(&inventory, &selectors, false).map_err(anyhow::Error::msg)?;
        let devices = chosen
            .iter()
            .map(|c| {
                let one =
                    gpubox_devices::select(&inventory, std::slice::from_ref(&c.selector), true).unwrap_or_default();
                entry(&c.selector, &one, if gpu.exclusive() { Origin::Allocated } else { Origin::AllocatedShared })
            })
            .collect();
        let hidden = hidden_nvidia_entries(&inventory, &selection);
        let numa = numa_binding(d, &chosen);
        let xid = xid_names(&inventory, &selection);
        return Ok(StartDevices { selection, devices, held, selectors, hidden, numa, xid });
    }
    // With Hotplug=yes a GPU that is not there yet is waited for, not an error.
    let optional = gpu.optional || gpu.hotplug;
    let selection = gpubox_devices::select(&inventory, &gpu.devices, optional).map_err(anyhow::Error::msg)?;
    let mut devices = Vec::new();
    let mut held = Vec::new();
    let mut matched_all = Vec::new();
    for selector in &gpu.devices {
        let one = gpubox_devices::select(&inventory, std::slice::from_ref(selector), true).unwrap_or_default();
        if !one.nodes.is_empty() || !one.mounts.is_empty() {
            devices.push(entry(selector, &one, Origin::Start));
        } else if gpu.hotplug {
            crate::log::info(&format!(
                "[GPU] Device={selector} matches nothing on this host yet; waiting for it (Hotplug=yes)"
            ));
        } else {
            crate::log::warn(&format!(
                "[GPU] Device={selector} matches nothing on this host; starting without it (Optional=yes)"
            ));
        }
        // Held too: shared, unless Exclusive=yes; either way none held exclusively by another.
        let matched = allocation::candidates(&inventory, std::slice::from_ref(selector)).unwrap_or_default();
        held.extend(allocator::hold_all(&d.name, &matched, gpu.exclusive())?);
        matched_all.extend(matched);
    }
    let numa = numa_binding(d, &matched_all.iter().collect::<Vec<_>>());
    let xid = xid_names(&inventory, &selection);
    Ok(StartDevices { selection, devices, held, selectors: gpu.devices.clone(), hidden: Vec::new(), numa, xid })
}

/// `NUMA=yes`: the binding for these GPUs' NUMA nodes, logged; none (with a warning) where a
/// GPU's node is not known.
fn numa_binding(d: &Definition, gpus: &[&Candidate]) -> Option<crate::numa::Binding> {
    if !d.gpu.numa || gpus.is_empty() {
        return None;
    }
    let mut nodes: Vec<u32> = Vec::new();
    for c in gpus {
        match c.numa {
            Some(n) if !nodes.contains(&n) => nodes.push(n),
            Some(_) => {}
            None => {
                log::warn(&format!("NUMA=yes: the NUMA node of {} is not known; the container is not bound", c.label));
                return None;
            }
        }
    }
    nodes.sort_unstable();
    let binding = crate::numa::binding(&nodes);
    match &binding {
        Some(b) => log::info(&format!(
            "NUMA=yes: CPUs {} and memory of node {}",
            crate::numa::format_list(&b.cpus),
            nodes.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        )),
        None => log::warn("NUMA=yes: the GPUs' NUMA nodes have no CPU list; the container is not bound"),
    }
    binding
}

/// GPUs `selector` names in `inventory` (the caller's discovery, not another), held for a live
/// attach or hotplug by container `name`; an error naming the holder when one of them is
/// another container's alone.
pub fn hold_more(
    name: &str,
    inventory: &Inventory,
    selector: &Selector,
    exclusive: bool,
    have: &[allocator::Held],
) -> Result<Vec<allocator::Held>> {
    let matched = allocation::candidates(inventory, std::slice::from_ref(selector)).unwrap_or_default();
    let new: Vec<Candidate> = matched.into_iter().filter(|c| !have.iter().any(|h| h.key == c.key)).collect();
    if new.is_empty() {
        return Ok(Vec::new());
    }
    allocator::hold_all(name, &new, exclusive).or_else(|e| bail!("{selector}: {e:#}"))
}

fn entry(selector: &Selector, one: &Selection, origin: Origin) -> Entry {
    Entry {
        selector: selector.clone(),
        origin,
        nodes: one.nodes.iter().map(|n| n.path.clone()).collect(),
        mounts: one.mounts.iter().map(|m| m.container_path.clone()).collect(),
    }
}

/// The selected NVIDIA GPUs as the driver's Xid messages name them: `DDDD:BB:DD` (no function).
fn xid_names(inventory: &Inventory, selection: &Selection) -> Vec<(String, String)> {
    inventory
        .gpus
        .iter()
        .filter(|g| g.nvidia.is_some())
        .filter(|g| allocation::own_nodes(g).iter().any(|n| selection.nodes.iter().any(|s| s.path == n.path)))
        .filter_map(|g| {
            let p = g.pci?;
            let label = gpubox_devices::select::selector_forms(g).into_iter().next().unwrap_or_default();
            Some((format!("{:04x}:{:02x}:{:02x}", p.domain, p.bus, p.device), label))
        })
        .collect()
}

/// The driver's `/proc` entries of the NVIDIA GPUs the container was not given, which
/// `nvidia-container-cli` hides too: inside, `nvidia-smi` and CUDA see its GPUs only.
fn hidden_nvidia_entries(inventory: &Inventory, selection: &Selection) -> Vec<std::path::PathBuf> {
    inventory
        .gpus
        .iter()
        .filter(|g| g.nvidia.is_some())
        .filter(|g| {
            !allocation::own_nodes(g)
                .iter()
                .any(|n| selection.nodes.iter().any(|s| s.major == n.major && s.minor == n.minor))
        })
        .filter_map(|g| g.pci.map(|p| std::path::PathBuf::from(format!("/proc/driver/nvidia/gpus/{p}"))))
        .collect()
}
