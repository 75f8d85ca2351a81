//! NVIDIA GPUs from what the kernel module itself publishes: `/proc/driver/nvidia/gpus/BUS/information`
//! gives each GPU's model, UUID, PCI address and minor number. Reading a few small files takes
//! well under a millisecond; loading libnvidia-ml took 20 ms and left a thread of its own in
//! the supervisor, which must stay single-threaded until its clone (supervisor/src/signals.rs).
//!
//! `nvidia:N` numbers GPUs as NVML and `nvidia-smi` do: in PCI bus order (NVML enumerates the
//! PCI bus; `tests/gpu-check` compares the two on a real host).
//! `GPUBOX_NVIDIA_PROC` replaces `/proc/driver/nvidia`, for tests with a stand-in tree.

use crate::{Gpu, Node, NvidiaGpu};
use gpubox_definition::PciAddress;
use std::path::{Path, PathBuf};

/// Nodes that every NVIDIA GPU needs besides its own `/dev/nvidiaN`, where present.
pub const CONTROL_NODES: &[&str] =
    &["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"];

/// What the driver says of one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Information {
    pub pci: PciAddress,
    pub model: String,
    pub uuid: String,
    pub minor: u32,
}

fn proc_dir() -> PathBuf {
    std::env::var_os("GPUBOX_NVIDIA_PROC").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/proc/driver/nvidia"))
}

pub fn discover() -> Result<Vec<Gpu>, crate::Error> {
    let dir = proc_dir();
    let gpus_dir = dir.join("gpus");
    let entries = std::fs::read_dir(&gpus_dir)
        .map_err(|e| crate::Error::Discovery(format!("no NVIDIA driver ({}: {})", gpus_dir.display(), e.kind())))?;
    let mut found: Vec<Information> = entries
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join("information")).ok()?;
            parse_information(&text)
        })
        .collect();
    found.sort_by_key(|i| i.pci);
    let control: Vec<Node> = CONTROL_NODES.iter().filter_map(|p| Node::stat(*p)).collect();
    let mut gpus = Vec::new();
    for (index, info) in found.into_iter().enumerate() {
        // Not there yet (nvidia-modprobe makes it), or removed: this GPU has nothing to pass.
        let Some(own) = Node::stat(format!("/dev/nvidia{}", info.minor)) else { continue };
        let mut nodes = vec![own];
        nodes.extend(control.iter().cloned());
        gpus.push(Gpu {
            pci: Some(info.pci),
            vendor: Some(0x10de),
            device: pci_device_id(&info.pci),
            driver: Some("nvidia".into()),
            drm: Vec::new(),
            nvidia: Some(NvidiaGpu { index: index as u32, uuid: info.uuid, name: info.model, minor: info.minor }),
            nodes,
            syspath: None,
        });
    }
    Ok(gpus)
}

fn pci_device_id(pci: &PciAddress) -> Option<u16> {
    let text = std::fs::read_to_string(Path::new("/sys/bus/pci/devices").join(pci.to_string()).join("device")).ok()?;
    u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Parses one `information` file ("Key: \t value" lines); `None` without the keys gpubox needs.
pub fn parse_information(text: &str) -> Option<Information> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
    };
    Some(Information {
        pci: value("Bus Location")?.to_ascii_lowercase().parse().ok()?,
        model: value("Model").unwrap_or_default(),
        uuid: value("GPU UUID")?,
        minor: value("Device Minor")?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As driver 580 writes it on the H200 host of issue #11.
    const H200: &str = "Model: \t\t NVIDIA H200
IRQ:   \t\t 0
GPU UUID: \t GPU-5a3a0c3e-4b8f-2d1e-9c6a-0f1e2d3c4b5a
Video BIOS: \t 96.00.af.00.01
Bus Type: \t PCIe
DMA Size: \t 52 bits
DMA Mask: \t 0xfffffffffffff
Bus Location: \t 0000:00:06.0
Device Minor: \t 0
GPU Excluded:\t No
";

    #[test]
    fn reads_the_drivers_information_file() {
        let info = parse_information(H200).unwrap();
        assert_eq!(info.model, "NVIDIA H200");
        assert_eq!(info.uuid, "GPU-5a3a0c3e-4b8f-2d1e-9c6a-0f1e2d3c4b5a");
        assert_eq!(info.pci.to_string(), "0000:00:06.0");
        assert_eq!(info.minor, 0);
        assert!(parse_information("Model: x\n").is_none());
    }
}
