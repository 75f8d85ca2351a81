use crate::digest::Digest;
use std::path::{Path, PathBuf};

/// What can go wrong with an image; each says which image, file or layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Format(String),
    #[error("{what}: digest mismatch: expected {expected}, got {actual} (the image is damaged or was changed)")]
    DigestMismatch { what: String, expected: Digest, actual: Digest },
    #[error("layer: {0}")]
    Layer(String),
    #[error("layer entry '{entry}' refused: {why}")]
    UnsafeEntry { entry: String, why: String },
    #[error("{image}: {message}")]
    Image { image: String, message: String },
    #[error("{image}: not in the store, and Pull=never")]
    NotPulled { image: String },
    #[error("{image}: {message}")]
    Registry { image: String, message: String },
    #[error("{0}")]
    InUse(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.to_owned(), source }
    }

    pub fn image(image: impl std::fmt::Display, message: impl Into<String>) -> Error {
        Error::Image { image: image.to_string(), message: message.into() }
    }
}

/// An error with its causes, each said once: the tar crate wraps the error that says what
/// happened, and reqwest's own text says only "error decoding response body".
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
