//! The GPUs a host has and which of them a definition selects. Three backends, each optional
//! at run time: DRM through udev, NVIDIA through the driver's `/proc/driver/nvidia` (no
//! driver, no backend), and CDI specs. Discovery produces plain facts ([`Gpu`]), so matching is tested
//! against recorded device trees without the hardware.

pub mod allocation;
pub mod cdi;
pub mod driver;
mod drm;
mod error;
pub mod nvidia;
pub mod select;

pub use error::Error;
pub use select::{select, NodeAccess, Selection};

use gpubox_definition::PciAddress;
use serde::Serialize;
use std::path::PathBuf;

/// One GPU, with every node that belongs to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    #[serde(serialize_with = "display")]
    pub pci: Option<PciAddress>,
    pub vendor: Option<u16>,
    pub device: Option<u16>,
    pub driver: Option<String>,
    /// DRM node names: `card0`, `renderD128`.
    pub drm: Vec<String>,
    pub nvidia: Option<NvidiaGpu>,
    pub nodes: Vec<Node>,
    /// The sysfs path udev knows the GPU by, for hotplug events.
    pub syspath: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NvidiaGpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub minor: u32,
}

/// A character device node, at the same path on the host and in the container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Node {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
}

impl Node {
    /// Reads the device number of a host node; `None` if it is missing or not a char device.
    pub fn stat(path: impl Into<PathBuf>) -> Option<Node> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let path = path.into();
        let meta = std::fs::metadata(&path).ok()?;
        meta.file_type().is_char_device().then(|| Node {
            major: libc::major(meta.rdev()) as u32,
            minor: libc::minor(meta.rdev()) as u32,
            path,
        })
    }
}

fn display<S: serde::Serializer>(value: &Option<PciAddress>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// What a backend found, or why it has nothing.
#[derive(Debug, Clone, Serialize)]
pub struct Backend {
    pub name: &'static str,
    /// `None` when the backend works; otherwise one line on why it is absent.
    pub absent: Option<String>,
}

/// Everything discovery found on this host.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
    pub backends: Vec<Backend>,
    #[serde(skip)]
    pub cdi: cdi::Registry,
}

impl Inventory {
    /// Asks every backend. Never fails: a backend that cannot answer says why in `backends`.
    pub fn discover() -> Inventory {
        let mut backends = Vec::new();
        let mut gpus = match drm::discover() {
            Ok(g) => {
                backends.push(Backend { name: "drm", absent: None });
                g
            }
            Err(e) => {
                backends.push(Backend { name: "drm", absent: Some(e.to_string()) });
                Vec::new()
            }
        };
        match nvidia::discover() {
            Ok(found) => {
                backends.push(Backend { name: "nvidia", absent: None });
                merge_nvidia(&mut gpus, found);
            }
            Err(e) => backends.push(Backend { name: "nvidia", absent: Some(e.to_string()) }),
        }
        let dirs = cdi_dirs();
        let cdi = cdi::Registry::load(&dirs);
        backends.push(Backend {
            name: "cdi",
            absent: cdi.specs.is_empty().then(|| {
                format!(
                    "no CDI specs in {}",
                    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
                )
            }),
        });
        Inventory { gpus, backends, cdi }
    }
}

/// `GPUBOX_CDI_DIRS` (colon-separated) replaces CDI's default directories, for tests.
pub fn cdi_dirs() -> Vec<PathBuf> {
    match std::env::var_os("GPUBOX_CDI_DIRS") {
        Some(v) if !v.is_empty() => std::env::split_paths(&v).collect(),
        _ => cdi::DEFAULT_DIRS.iter().map(PathBuf::from).collect(),
    }
}

/// An NVIDIA GPU that DRM also knows (nvidia-drm) becomes one GPU with all nodes.
fn merge_nvidia(gpus: &mut Vec<Gpu>, found: Vec<Gpu>) {
    for n in found {
        match gpus.iter_mut().find(|g| g.pci.is_some() && g.pci == n.pci) {
            Some(g) => {
                g.nvidia = n.nvidia;
                g.nodes.extend(n.nodes);
                g.nodes.sort();
                g.nodes.dedup();
            }
            None => gpus.push(n),
        }
    }
}
