//! `[GPU] NUMA=yes`: the container's CPUs and memory on its GPUs' NUMA nodes, as a person
//! placing a GPU job by hand would pin it (host memory for DMA and the threads feeding the GPU
//! near the GPU's PCIe root). Two layers: under systemd the unit's `AllowedCPUs=` and
//! `AllowedMemoryNodes=` (cpuset, a hard bound that systemd owns, set through D-Bus at run time
//! as `DeviceAllow=` is); and in every mode the payload's CPU affinity and its memory policy
//! (`MPOL_BIND`), set by the child before exec and inherited by everything it starts.
//! `GPUBOX_SYSFS` replaces `/sys` for tests (with gpubox_devices::allocation).

use std::path::PathBuf;

/// CPUs and memory nodes to bind to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub cpus: Vec<usize>,
    pub nodes: Vec<u32>,
}

fn sysfs() -> PathBuf {
    std::env::var_os("GPUBOX_SYSFS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/sys"))
}

/// The CPUs of `nodes`; `None` when none of them has a CPU list (unknown node).
pub fn binding(nodes: &[u32]) -> Option<Binding> {
    let mut cpus = Vec::new();
    for node in nodes {
        let list = std::fs::read_to_string(sysfs().join(format!("devices/system/node/node{node}/cpulist"))).ok()?;
        cpus.extend(parse_list(&list)?);
    }
    cpus.sort_unstable();
    cpus.dedup();
    (!cpus.is_empty()).then(|| Binding { cpus, nodes: nodes.to_vec() })
}

/// The kernel's list format: `0-3,8-11`.
pub fn parse_list(text: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// The same list format back, for logs and systemd's properties.
pub fn format_list(items: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let start = items[i];
        while i + 1 < items.len() && items[i + 1] == items[i] + 1 {
            i += 1;
        }
        parts.push(if items[i] == start { start.to_string() } else { format!("{start}-{}", items[i]) });
        i += 1;
    }
    parts.join(",")
}

/// A bitmask as systemd's `AllowedCPUs=`/`AllowedMemoryNodes=` take it over D-Bus (`ay`, bit n
/// of byte n/8 for item n).
pub fn bitmask(items: &[usize]) -> Vec<u8> {
    let mut bytes = vec![0u8; items.iter().max().map_or(0, |m| m / 8 + 1)];
    for &i in items {
        bytes[i / 8] |= 1 << (i % 8);
    }
    bytes
}

/// In the child, before exec: its CPU affinity and memory policy.
pub fn apply(binding: &Binding) -> std::io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in &binding.cpus {
        set.set(cpu).map_err(std::io::Error::from)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(std::io::Error::from)?;
    let mask = bitmask(&binding.nodes.iter().map(|&n| n as usize).collect::<Vec<_>>());
    let mut words = vec![0u64; mask.len().div_ceil(8).max(1)];
    for (i, b) in mask.iter().enumerate() {
        words[i / 8] |= (*b as u64) << (8 * (i % 8));
    }
    const MPOL_BIND: libc::c_long = 2;
    // SAFETY: words holds maxnode bits (words.len() * 64); set_mempolicy only reads it.
    let r = unsafe {
        libc::syscall(libc::SYS_set_mempolicy, MPOL_BIND, words.as_ptr(), (words.len() * 64) as libc::c_ulong)
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_masks() {
        assert_eq!(parse_list("0-3,8-9,12\n").unwrap(), vec![0, 1, 2, 3, 8, 9, 12]);
        assert_eq!(format_list(&[0, 1, 2, 3, 8, 9, 12]), "0-3,8-9,12");
        assert_eq!(bitmask(&[0, 1, 9]), vec![0b11, 0b10]);
        assert!(parse_list("x").is_none());
    }
}
