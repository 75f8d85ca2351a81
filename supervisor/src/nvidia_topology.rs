//! NVML's view of how NVIDIA GPUs are joined (NVLink, and the PCIe level of their common
//! ancestor), for choosing a multi-GPU job's GPUs. NVML starts a thread of its own and is never
//! unloaded, so the supervisor, which must stay single-threaded until its clone, asks a
//! short-lived `gpubox-supervisor nvidia-topology BUS…` process, which loads it and prints one
//! line per pair: `I J NVLINK LEVEL` (NVLINK 1 or 0; LEVEL NVML's topology level, 0 internal to
//! 50 across sockets). `GPUBOX_NVML_LIBRARY` names another libnvidia-ml (tests).

use anyhow::{Context, Result};
use std::collections::HashMap;

/// The helper's side: prints the pairs of `buses`.
pub fn print(buses: &[String]) -> Result<()> {
    use nvml_wrapper::enum_wrappers::device::{P2pCapabilitiesIndex, P2pStatus, TopologyLevel};
    let nvml = match std::env::var_os("GPUBOX_NVML_LIBRARY") {
        Some(path) => nvml_wrapper::Nvml::builder().lib_path(&path).init(),
        None => nvml_wrapper::Nvml::init(),
    }
    .context("NVML")?;
    let devices: Vec<_> = buses
        .iter()
        .map(|b| nvml.device_by_pci_bus_id(b.as_str()).with_context(|| format!("NVML {b}")))
        .collect::<Result<_>>()?;
    for (i, a) in devices.iter().enumerate() {
        for (j, b) in devices.iter().enumerate().skip(i + 1) {
            let nvlink = matches!(a.p2p_status(b, P2pCapabilitiesIndex::NvLink), Ok(P2pStatus::Ok));
            // It takes the other device by value: a handle of its own.
            let other = nvml.device_by_pci_bus_id(buses[j].as_str());
            let level = match other.and_then(|o| a.topology_common_ancestor(o)) {
                Ok(TopologyLevel::Internal) => 0,
                Ok(TopologyLevel::Single) => 10,
                Ok(TopologyLevel::Multiple) => 20,
                Ok(TopologyLevel::HostBridge) => 30,
                Ok(TopologyLevel::Node) => 40,
                _ => 50,
            };
            println!("{i} {j} {} {level}", u8::from(nvlink));
        }
    }
    Ok(())
}

/// How far apart NVML says two GPUs are, by PCI address: 1 over NVLink, else 2 (one PCIe
/// switch) to 8 (across sockets). Empty when NVML cannot tell (no driver, one GPU).
pub fn distances(buses: &[String]) -> HashMap<(String, String), usize> {
    let mut out = HashMap::new();
    if buses.len() < 2 {
        return out;
    }
    let Ok(answer) = std::process::Command::new("/proc/self/exe").arg("nvidia-topology").args(buses).output() else {
        return out;
    };
    for line in String::from_utf8_lossy(&answer.stdout).lines() {
        let f: Vec<usize> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        let [i, j, nvlink, level] = f[..] else { continue };
        let (Some(a), Some(b)) = (buses.get(i), buses.get(j)) else { continue };
        let d = if nvlink == 1 {
            1
        } else {
            match level {
                0 | 10 => 2,
                20 => 3,
                30 => 4,
                40 => 6,
                _ => 8,
            }
        };
        out.insert((a.clone(), b.clone()), d);
        out.insert((b.clone(), a.clone()), d);
    }
    out
}
