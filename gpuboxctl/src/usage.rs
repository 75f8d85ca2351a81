//! `gpuboxctl status`: what a container's own processes use of each of its NVIDIA GPUs, from
//! NVML (here, in gpuboxctl, never in the supervisor): the GPU's running compute processes and
//! their utilisation samples, kept to those in the container's cgroup. NVML is loaded only when
//! the container holds an NVIDIA GPU; `GPUBOX_NVML_LIBRARY` names another libnvidia-ml (tests).

use gpubox_control::Status;
use gpubox_devices::Inventory;
use nvml_wrapper::Nvml;
use std::path::Path;

/// One GPU's use by the container.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Usage {
    pub gpu: String,
    pub processes: usize,
    pub memory_bytes: u64,
    /// Streaming-multiprocessor utilisation, percent, from NVML's recent samples.
    pub sm_percent: Option<u32>,
}

/// Usage of each NVIDIA GPU the container holds; an error saying why NVML cannot tell.
pub fn of(status: &Status) -> Result<Vec<Usage>, String> {
    let inventory = Inventory::discover();
    // The container's NVIDIA GPUs: those whose own node it holds.
    let held: Vec<(String, String)> = inventory
        .gpus
        .iter()
        .filter_map(|g| {
            let own = format!("/dev/nvidia{}", g.nvidia.as_ref()?.minor);
            let holds = status.devices.iter().any(|d| d.nodes.iter().any(|p| p == Path::new(&own)));
            holds.then(|| Some((selector_name(g), g.pci?.to_string()))).flatten()
        })
        .collect();
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let nvml = match std::env::var_os("GPUBOX_NVML_LIBRARY") {
        Some(path) => Nvml::builder().lib_path(&path).init(),
        None => Nvml::init(),
    }
    .map_err(|e| format!("NVML unavailable ({e})"))?;
    let cgroup = cgroup_of(status.pid).ok_or("the container's cgroup is not known")?;
    let mut out = Vec::new();
    for (name, bus) in held {
        let device = nvml.device_by_pci_bus_id(bus.as_str()).map_err(|e| format!("NVML {bus}: {e}"))?;
        let mine =
            |pid: u32| cgroup_of(pid as i32).is_some_and(|c| c == cgroup || c.starts_with(&format!("{cgroup}/")));
        let processes: Vec<_> =
            device.running_compute_processes().unwrap_or_default().into_iter().filter(|p| mine(p.pid)).collect();
        let memory_bytes = processes
            .iter()
            .map(|p| match p.used_gpu_memory {
                nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => b,
                nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => 0,
            })
            .sum();
        // The latest sample of each of the container's processes, added up.
        let mut latest: std::collections::BTreeMap<u32, (u64, u32)> = std::collections::BTreeMap::new();
        for s in device.process_utilization_stats(None).unwrap_or_default().into_iter().filter(|s| mine(s.pid)) {
            let entry = latest.entry(s.pid).or_insert((s.timestamp, s.sm_util));
            if s.timestamp >= entry.0 {
                *entry = (s.timestamp, s.sm_util);
            }
        }
        let sm: Vec<u32> = latest.values().map(|&(_, u)| u).collect();
        out.push(Usage {
            gpu: name,
            processes: processes.len(),
            memory_bytes,
            sm_percent: (!sm.is_empty()).then(|| sm.iter().sum::<u32>().min(100)),
        });
    }
    Ok(out)
}

fn selector_name(g: &gpubox_devices::Gpu) -> String {
    gpubox_devices::select::selector_forms(g).into_iter().next().unwrap_or_default()
}

/// A process's cgroup v2 path.
fn cgroup_of(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim_end_matches('/').to_owned())
}

/// `1.5 GiB`, `300 MiB`.
pub fn human(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = bytes as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}
