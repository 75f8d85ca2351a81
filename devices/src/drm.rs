//! DRM GPUs through libudev: card and render nodes grouped by the device they belong to (a
//! PCI function, or a platform device such as vkms), with PCI address, ids and driver.

use crate::{Gpu, Node};
use std::path::PathBuf;

pub fn discover() -> Result<Vec<Gpu>, crate::Error> {
    let mut enumerator = udev::Enumerator::new().map_err(|e| crate::Error::Discovery(format!("udev: {e}")))?;
    enumerator.match_subsystem("drm").map_err(|e| crate::Error::Discovery(format!("udev: {e}")))?;
    // Card and render nodes only: libudev checks names before it reads a device, so the
    // connectors (card0-DP-1, …, several per GPU) cost nothing. Discovery runs on every
    // hotplug event.
    for pattern in ["card[0-9]", "card[0-9][0-9]", "card[0-9][0-9][0-9]", "renderD*"] {
        enumerator.match_sysname(pattern).map_err(|e| crate::Error::Discovery(format!("udev: {e}")))?;
    }
    let mut gpus: Vec<Gpu> = Vec::new();
    for dev in enumerator.scan_devices().map_err(|e| crate::Error::Discovery(format!("udev: {e}")))? {
        let name = dev.sysname().to_string_lossy().into_owned();
        if !(name.starts_with("card") || name.starts_with("renderD")) || name.contains('-') {
            continue;
        }
        let (Some(devnode), Some(devnum)) = (dev.devnode(), dev.devnum()) else { continue };
        let parent = dev.parent();
        let syspath = parent.as_ref().map(|p| p.syspath().to_owned()).unwrap_or_else(|| dev.syspath().to_owned());
        let hex = |attr: &str| -> Option<u16> {
            let v = parent.as_ref()?.attribute_value(attr)?.to_str()?.trim().trim_start_matches("0x").to_owned();
            u16::from_str_radix(&v, 16).ok()
        };
        let pci = parent
            .as_ref()
            .filter(|p| p.subsystem().is_some_and(|s| s == "pci"))
            .and_then(|p| p.sysname().to_str()?.parse().ok());
        let node =
            Node { path: PathBuf::from(devnode), major: libc::major(devnum) as u32, minor: libc::minor(devnum) as u32 };
        let gpu = match gpus.iter_mut().find(|g| g.syspath.as_deref() == Some(&syspath)) {
            Some(g) => g,
            None => {
                gpus.push(Gpu {
                    pci,
                    vendor: hex("vendor"),
                    device: hex("device"),
                    driver: parent.as_ref().and_then(|p| p.driver()).map(|d| d.to_string_lossy().into_owned()),
                    drm: Vec::new(),
                    nvidia: None,
                    nodes: Vec::new(),
                    syspath: Some(syspath),
                });
                gpus.last_mut().expect("just pushed")
            }
        };
        gpu.drm.push(name);
        gpu.nodes.push(node);
    }
    for g in &mut gpus {
        g.drm.sort();
        g.nodes.sort();
    }
    gpus.sort_by(|a, b| a.drm.cmp(&b.drm));
    Ok(gpus)
}
