//! NVIDIA GPUs through NVML, which nvml-wrapper loads at run time: no libnvidia-ml or no
//! driver means the backend is absent, not an error. Each GPU brings `/dev/nvidiaN` and the
//! control nodes every CUDA process needs.

use crate::{Gpu, Node, NvidiaGpu};
use nvml_wrapper::Nvml;

/// Nodes that every NVIDIA GPU needs besides its own `/dev/nvidiaN`, where present.
pub const CONTROL_NODES: &[&str] =
    &["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"];

pub fn discover() -> Result<Vec<Gpu>, String> {
    let nvml = match std::env::var_os("GPUBOX_NVML_LIBRARY") {
        Some(path) => Nvml::builder().lib_path(&path).init(),
        // Without the kernel driver NVML has nothing to say: not loading it saves a library
        // search at every start and every hotplug event on hosts without NVIDIA GPUs.
        None if !std::path::Path::new("/sys/module/nvidia").exists() => {
            return Err("NVML unavailable (the NVIDIA driver is not loaded: no /sys/module/nvidia)".into())
        }
        None => Nvml::init(),
    }
    .map_err(|e| format!("NVML unavailable ({e})"))?;
    let count = nvml.device_count().map_err(|e| format!("NVML: {e}"))?;
    let control: Vec<Node> = CONTROL_NODES.iter().filter_map(|p| Node::stat(*p)).collect();
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = nvml.device_by_index(index).map_err(|e| format!("NVML device {index}: {e}"))?;
        let uuid = device.uuid().map_err(|e| format!("NVML device {index}: {e}"))?;
        let minor = device.minor_number().map_err(|e| format!("NVML device {index}: {e}"))?;
        let pci = device.pci_info().ok();
        let path = format!("/dev/nvidia{minor}");
        // Not there yet (nvidia-modprobe makes it), or removed: this GPU has nothing to pass.
        let Some(own) = Node::stat(&path) else { continue };
        let mut nodes = vec![own];
        nodes.extend(control.iter().cloned());
        gpus.push(Gpu {
            pci: pci.as_ref().and_then(|p| p.bus_id.to_ascii_lowercase().parse().ok()),
            vendor: Some(0x10de),
            device: pci.as_ref().map(|p| (p.pci_device_id >> 16) as u16),
            driver: Some("nvidia".into()),
            drm: Vec::new(),
            nvidia: Some(NvidiaGpu { index, uuid, name: device.name().unwrap_or_default(), minor }),
            nodes,
            syspath: None,
        });
    }
    Ok(gpus)
}
