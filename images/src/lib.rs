//! OCI images for gpubox: where `Image=` comes from and the store it is kept in.
//!
//! - [`digest`]: content digests, verified as blobs are read;
//! - [`unpack`]: a layer's tar unpacked safely, whiteouts as overlayfs has them;
//! - [`store`]: the content-addressed store under `/var/lib/gpubox` (layers unpacked once and
//!   shared, image records, the containers' writable layers), changed atomically;
//! - [`local`]: OCI layouts, OCI archives and `docker save` archives;
//! - [`registry`]: the OCI distribution API (through `oci-client`), with containers-auth.json;
//! - [`config`]: what an image's config supplies to a container.
//!
//! [`fetch`] brings an image into the store from wherever its reference says. It is the only
//! part that may start threads (the registry client's runtime), so the supervisor runs it in
//! a process of its own; reading the store is plain file access.

pub mod config;
pub mod digest;
mod error;
pub mod local;
pub mod registry;
pub mod store;
pub mod unpack;

pub use config::ImageDefaults;
pub use digest::Digest;
pub use error::Error;
pub use gpubox_definition::ImageRef;
pub use store::{ImageRecord, Store};

/// What a fetch reports as it goes, for a progress line or a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The image's manifest and config are in; `layers` layers to go through.
    Resolved { layers: usize },
    /// Layer `index` (from 1) is in the store already: nothing fetched.
    Have { index: usize, diff_id: Digest },
    /// Layer `index` is being fetched (from a registry: downloaded; from a file: read and
    /// unpacked): `done` of `total` bytes (compressed).
    Fetching { index: usize, done: u64, total: Option<u64> },
    /// Layer `index`'s download broke off after `done` bytes (`error` says how), and is
    /// resumed from there after a pause.
    Resuming { index: usize, done: u64, error: String },
    /// Layer `index` is downloaded, and being unpacked.
    Unpacking { index: usize },
    /// Layer `index` is unpacked: `size` bytes of files.
    Unpacked { index: usize, size: u64 },
}

/// Brings `image` into the store (all of it or nothing: a failure leaves no half-written
/// layer or record) and returns its record. Layers the store has are not fetched again.
pub fn fetch(store: &Store, image: &ImageRef, progress: &mut dyn FnMut(Progress)) -> Result<ImageRecord, Error> {
    match image {
        ImageRef::Registry(r) => registry::pull(store, image, r, progress),
        _ => local::import(store, image, progress),
    }
}
