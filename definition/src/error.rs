use std::io;
use std::path::PathBuf;

/// Everything that can be wrong with a definition. Each variant names the file, and where
/// there is one, the line, section and key, so a person can go straight to the mistake.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("{}:{line}: {message}", path.display())]
    Syntax { path: PathBuf, line: usize, message: String },

    #[error("{}:{line}: [{section}] {key}=: {message}", path.display())]
    Key { path: PathBuf, line: usize, section: String, key: String, message: String },

    #[error("{}: {message}", path.display())]
    Definition { path: PathBuf, message: String },

    #[error("no definition named '{name}' (searched {searched})")]
    NotFound { name: String, searched: String },

    #[error("definition '{name}' is masked ({} is empty or links to /dev/null)", path.display())]
    Masked { name: String, path: PathBuf },
}

impl Error {
    /// The file the error is about, if any.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Error::Io { path, .. }
            | Error::Syntax { path, .. }
            | Error::Key { path, .. }
            | Error::Definition { path, .. }
            | Error::Masked { path, .. } => Some(path),
            Error::NotFound { .. } => None,
        }
    }

    /// The line the error is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            Error::Syntax { line, .. } | Error::Key { line, .. } => Some(*line),
            _ => None,
        }
    }
}
