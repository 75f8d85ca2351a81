//! The `.gpubox` definition format: systemd-style INI files in search paths, with drop-ins,
//! turned into a typed [`Definition`]. Every error names the file and, where it can, the line,
//! section and key.

pub mod cdi_name;
mod error;
pub mod image_ref;
mod load;
mod model;
pub mod selector;
pub mod suggest;
pub mod syntax;
pub mod timespan;
pub mod words;

pub use error::Error;
pub use image_ref::ImageRef;
pub use load::{check_name, SearchPath, Sources, DEFAULT_PATHS, PATH_VARIABLE, SUFFIX};
pub use model::{
    parse_shm_size, Bind, Container, Definition, Gpu, Install, Network, PassThrough, Pull, Seccomp, User,
    UserNamespace, DEFAULT_SHM_SIZE, KNOWN_CAPABILITIES,
};
pub use selector::{PciAddress, Selector};
