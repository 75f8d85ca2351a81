//! What can go wrong finding, reading and selecting GPUs. Each message is whole, as a person
//! reads it: it names the selector, the spec file or the backend concerned.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A CDI spec file that cannot be used.
    #[error("{}: {message}", path.display())]
    Spec { path: PathBuf, message: String },
    /// A CDI device name that resolves to nothing usable.
    #[error("{0}")]
    CdiDevice(String),
    /// A selector that matches nothing here, or whose devices cannot be given.
    #[error("{0}")]
    Selection(String),
    /// A backend that cannot be asked (no udev, no NVIDIA driver).
    #[error("{0}")]
    Discovery(String),
    /// The host's NVIDIA driver files (`DriverLibraries=yes`).
    #[error("{0}")]
    Driver(String),
}
