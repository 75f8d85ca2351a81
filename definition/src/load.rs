//! Where definitions live and how a definition's files are found: search paths in priority
//! order (first file of a name wins), masking by a link to `/dev/null`, and `NAME.gpubox.d/*.conf`
//! drop-ins from every search path, merged by file name (a drop-in of the same name in an
//! earlier path replaces a later one), as systemd does for units.

use crate::model::{self, Definition};
use crate::{syntax, Error};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub const SUFFIX: &str = ".gpubox";
pub const DEFAULT_PATHS: &[&str] = &["/etc/gpubox", "/run/gpubox", "/usr/lib/gpubox"];
/// Colon-separated directories that replace [`DEFAULT_PATHS`], for tests and for users.
pub const PATH_VARIABLE: &str = "GPUBOX_DEFINITIONS_PATH";

/// The directories definitions are looked up in, highest priority first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchPath(pub Vec<PathBuf>);

/// The files that make up one definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub name: String,
    pub main: PathBuf,
    /// Drop-ins in the order they apply.
    pub dropins: Vec<PathBuf>,
    /// The winning file links to `/dev/null`: the definition is switched off.
    pub masked: bool,
}

impl Default for SearchPath {
    fn default() -> Self {
        SearchPath(DEFAULT_PATHS.iter().map(PathBuf::from).collect())
    }
}

impl SearchPath {
    /// `$GPUBOX_DEFINITIONS_PATH` if set and non-empty, else the default paths.
    pub fn from_env() -> Self {
        match std::env::var_os(PATH_VARIABLE) {
            // Absolute, because paths end up in units (SourcePath=) and logs.
            Some(v) if !v.is_empty() => SearchPath(
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(|p| std::path::absolute(&p).unwrap_or(p))
                    .collect(),
            ),
            _ => SearchPath::default(),
        }
    }

    pub fn display(&self) -> String {
        self.0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":")
    }

    /// Every definition in the search path, sorted by name. Reads each directory once,
    /// so that discovering many definitions costs few system calls.
    pub fn discover(&self) -> Result<Vec<Sources>, Error> {
        let mut mains: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut dropin_dirs: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for dir in &self.0 {
            for entry in read_dir_sorted(dir)? {
                let file_name = entry.file_name().and_then(OsStr::to_str).unwrap_or_default();
                if let Some(name) = file_name.strip_suffix(SUFFIX) {
                    if entry.is_dir() {
                        continue;
                    }
                    mains.entry(name.to_owned()).or_insert(entry);
                } else if let Some(name) = file_name.strip_suffix(".gpubox.d") {
                    dropin_dirs.entry(name.to_owned()).or_default().push(entry);
                }
            }
        }
        mains
            .into_iter()
            .map(|(name, main)| {
                let dirs = dropin_dirs.remove(&name).unwrap_or_default();
                sources(name, main, &dirs)
            })
            .collect()
    }

    /// The files of the definition called `name`.
    pub fn find(&self, name: &str) -> Result<Sources, Error> {
        let file = format!("{name}{SUFFIX}");
        let main = self
            .0
            .iter()
            .map(|d| d.join(&file))
            .find(|p| p.symlink_metadata().is_ok_and(|m| !m.is_dir()))
            .ok_or_else(|| Error::NotFound { name: name.to_owned(), searched: self.display() })?;
        let dirs: Vec<PathBuf> = self.0.iter().map(|d| d.join(format!("{file}.d"))).filter(|p| p.is_dir()).collect();
        sources(name.to_owned(), main, &dirs)
    }

    /// Finds, reads and validates the definition called `name`.
    pub fn load(&self, name: &str) -> Result<Definition, Error> {
        let sources = self.find(name)?;
        if sources.masked {
            return Err(Error::Masked { name: name.to_owned(), path: sources.main });
        }
        sources.load()
    }
}

impl Sources {
    /// A definition given directly as a file (`--definition FILE`), with its `FILE.d/` drop-ins.
    pub fn from_file(path: &Path) -> Result<Sources, Error> {
        let file_name = path.file_name().and_then(OsStr::to_str).unwrap_or_default();
        let name = file_name.strip_suffix(SUFFIX).ok_or_else(|| Error::Definition {
            path: path.to_owned(),
            message: format!("a definition's file name must end in '{SUFFIX}'"),
        })?;
        let dir = PathBuf::from(format!("{}.d", path.display()));
        let dirs = if dir.is_dir() { vec![dir] } else { vec![] };
        sources(name.to_owned(), path.to_owned(), &dirs)
    }

    /// Reads, parses and validates every file, in order, into one definition; the first of
    /// its errors (in file and line order) if it has any.
    pub fn load(&self) -> Result<Definition, Error> {
        let (definition, mut errors) = self.load_all();
        if errors.is_empty() {
            Ok(definition)
        } else {
            Err(errors.remove(0))
        }
    }
}

impl Sources {
    /// Every error of every file, in file and line order, as `gpuboxctl validate` reports them.
    pub fn check(&self) -> Vec<Error> {
        self.load_all().1
    }

    /// The definition as far as it is right, and every error of every file: each file is read
    /// and parsed to its end and every assignment checked, rather than stopping at the first
    /// (an assignment in error is left out of the definition).
    pub fn load_all(&self) -> (Definition, Vec<Error>) {
        let mut errors = Vec::new();
        if let Err(e) = check_name(&self.name, &self.main) {
            errors.push(e);
        }
        let mut files = Vec::new();
        for path in std::iter::once(&self.main).chain(&self.dropins) {
            match fs::read_to_string(path) {
                Ok(text) => {
                    let (assignments, mut syntax_errors) = syntax::parse_all(path, &text);
                    errors.append(&mut syntax_errors);
                    files.push((path.clone(), assignments));
                }
                Err(source) => errors.push(Error::Io { path: path.clone(), source }),
            }
        }
        let (definition, model_errors) = model::build_all(&self.name, &files);
        errors.extend(model_errors);
        // Files in the order they apply, lines in order within each, then what is about a
        // whole file (a stable sort keeps their order).
        let order = |e: &Error| {
            let file = e.path().and_then(|p| files.iter().position(|(f, _)| f == p)).unwrap_or(usize::MAX);
            (file, e.line().unwrap_or(usize::MAX))
        };
        errors.sort_by_key(order);
        (definition, errors)
    }
}

fn sources(name: String, main: PathBuf, dropin_dirs: &[PathBuf]) -> Result<Sources, Error> {
    let masked = is_masked(&main);
    // Drop-ins by file name; the first search path that has a name wins it.
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dropin_dirs {
        for path in read_dir_sorted(dir)? {
            if let Some(file) = path.file_name().and_then(OsStr::to_str) {
                if file.ends_with(".conf") {
                    by_name.entry(file.to_owned()).or_insert(path);
                }
            }
        }
    }
    let dropins = by_name.into_values().filter(|p| !is_masked(p)).collect();
    Ok(Sources { name, main, dropins, masked })
}

/// As for systemd units: a link to /dev/null, or an empty file.
fn is_masked(path: &Path) -> bool {
    fs::read_link(path).is_ok_and(|target| target == Path::new("/dev/null"))
        || fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0)
}

/// A directory's entries, sorted; a missing directory is empty, not an error.
fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => return Ok(vec![]),
        Err(source) => return Err(Error::Io { path: dir.to_owned(), source }),
    };
    let mut paths = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|source| Error::Io { path: dir.to_owned(), source })?;
    paths.sort();
    Ok(paths)
}

/// Definition names become systemd instance names (`gpu@NAME.service`), so they must be valid
/// ones. gpubox rejects rather than escapes: an escaped name (`\x20`) would differ between the
/// file, the unit and every command line, which helps nobody.
pub fn check_name(name: &str, path: &Path) -> Result<(), Error> {
    const MAX: usize = 255 - "gpu@.service".len();
    let why = if name.is_empty() {
        Some("the name is empty".to_owned())
    } else if name.len() > MAX {
        Some(format!("the name is longer than {MAX} characters"))
    } else if name.starts_with('.') || name.starts_with('-') {
        Some(format!("'{name}' must not start with '.' or '-'"))
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || ":_.-".contains(*c)))
            .map(|c| format!("'{name}' contains {c:?}; a name may hold letters, digits, ':', '_', '.' and '-' (it becomes the unit gpu@NAME.service)"))
    };
    match why {
        Some(message) => {
            Err(Error::Definition { path: path.to_owned(), message: format!("invalid definition name: {message}") })
        }
        None => Ok(()),
    }
}
