//! `gpuboxctl image pull|import|list|remove|prune`: the image store (gpubox_images) for people,
//! with progress on a terminal and `--json` for scripts.

use crate::pull_progress::{human, PullProgress};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use gpubox_images::{ImageRef, Progress, Store};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Fetches an image into the store: REFERENCE as Image= takes it (a registry's
    /// NAME[:TAG], docker://…, oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG]).
    /// Layers the store has are not fetched again.
    Pull { reference: String },
    /// Imports an image from a file or directory: an OCI layout, an OCI archive or a
    /// `docker save` archive (found by what it holds).
    Import {
        path: PathBuf,
        /// The tag in an OCI layout or archive, or the NAME:TAG in a docker archive.
        #[arg(long)]
        tag: Option<String>,
    },
    /// The images in the store, their sizes (all, and unique to each) and who runs from them.
    #[command(alias = "ls")]
    List,
    /// Removes images' names; their layers go at the next prune (refused while in use).
    #[command(alias = "rm")]
    Remove {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Removes what no image names and no running container uses.
    Prune,
}

pub fn run(command: ImageCommand, json: bool) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the image store is root's: run as root");
    }
    let store = Store::open_default()?;
    match command {
        ImageCommand::Pull { reference } => {
            let image: ImageRef = reference.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            fetch(&store, &image, json)
        }
        ImageCommand::Import { path, tag } => {
            let image = import_reference(&path, tag.as_deref())?;
            fetch(&store, &image, json)
        }
        ImageCommand::List => list(&store, json),
        ImageCommand::Remove { names } => {
            let mut failed = false;
            for name in names {
                // As written or as Image= would spell it (`busybox` is docker.io/library/busybox:latest).
                let canonical = name.parse::<ImageRef>().map(|r| r.name()).unwrap_or_else(|_| name.clone());
                let target = if store.lookup(&name)?.is_some() { name.clone() } else { canonical };
                match store.remove(&target) {
                    Ok(r) => println!("removed {} ({})", r.name, r.config.short()),
                    Err(e) => {
                        eprintln!("gpuboxctl: {e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        ImageCommand::Prune => {
            let freed = store.prune()?;
            if json {
                println!("{}", serde_json::json!({ "freed": freed }));
            } else {
                println!("freed {}", human(freed));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What an import path is: an OCI layout directory, or an archive with `index.json` (OCI) or
/// `manifest.json` (docker save) at its top.
fn import_reference(path: &std::path::Path, tag: Option<&str>) -> Result<ImageRef> {
    let path = std::path::absolute(path).with_context(|| format!("{}", path.display()))?;
    let spelled = |transport: &str| match tag {
        Some(t) => format!("{transport}:{}:{t}", path.display()),
        None => format!("{transport}:{}", path.display()),
    };
    let spelling = if path.is_dir() {
        spelled("oci")
    } else {
        let file = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
        let mut archive = tar::Archive::new(file);
        let mut kind = None;
        for entry in archive.entries().with_context(|| format!("{}: not a tar archive", path.display()))? {
            let entry = entry?;
            match entry.path()?.to_str().map(|p| p.trim_start_matches("./")) {
                Some("manifest.json") => kind = Some("docker-archive"),
                Some("index.json") if kind.is_none() => kind = Some("oci-archive"),
                _ => {}
            }
        }
        match kind {
            // A docker save archive of recent Docker holds both; manifest.json says more.
            Some(kind) => spelled(kind),
            None => bail!(
                "{}: neither an OCI archive (index.json) nor a docker save archive (manifest.json)",
                path.display()
            ),
        }
    };
    spelling.parse().map_err(|e: String| anyhow::anyhow!(e))
}

fn fetch(store: &Store, image: &ImageRef, json: bool) -> Result<ExitCode> {
    let terminal = std::io::stderr().is_terminal() && !json;
    let started = std::time::Instant::now();
    let mut layers = 0;
    let mut summary = PullProgress::default();
    let mut progress = |p: Progress| {
        if let (Progress::Resuming { index, done, error }, false) = (&p, json) {
            // Said on a line of its own, above the progress line.
            let above = if terminal { "\r\x1b[K" } else { "" };
            eprintln!(
                "{above}{image}: layer {index}: the download broke off after {} ({error}); resuming",
                human(*done)
            );
        }
        if terminal {
            // One line, rewritten, as podman pull does; it sums up the layers that come at once.
            summary.update(&p);
            eprint!("\r\x1b[K{image}: {}", summary.line());
            let _ = std::io::stderr().flush();
            return;
        }
        let line = match p {
            Progress::Resolved { layers: n } => {
                layers = n;
                return;
            }
            Progress::Have { index, .. } => format!("layer {index}/{layers}: in the store already"),
            // The start of a layer's download, not each step of it: a log is no progress bar.
            Progress::Fetching { index, done: 0, total } => match total {
                Some(t) => format!("layer {index}/{layers}: fetching {}", human(t)),
                None => format!("layer {index}/{layers}: fetching"),
            },
            Progress::Fetching { .. } | Progress::Resuming { .. } => return,
            Progress::Unpacking { index } => format!("layer {index}/{layers}: unpacking"),
            Progress::Unpacked { index, size } => format!("layer {index}/{layers}: unpacked, {}", human(size)),
        };
        if !json {
            eprintln!("{image}: {line}");
        }
    };
    let result = gpubox_images::fetch(store, image, &mut progress);
    if terminal {
        eprintln!();
    }
    let record = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        println!("{} {} ({:.1} s)", record.name, record.config.short(), started.elapsed().as_secs_f64());
    }
    Ok(ExitCode::SUCCESS)
}

fn list(store: &Store, json: bool) -> Result<ExitCode> {
    let images = store.list()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(ExitCode::SUCCESS);
    }
    let width = images.iter().map(|i| i.record.name.len()).max().unwrap_or(0).max(5);
    println!("{:width$}  {:12}  {:>6}  {:>10}  {:>10}  IN USE BY", "IMAGE", "ID", "LAYERS", "SIZE", "UNIQUE");
    for i in &images {
        println!(
            "{:width$}  {:12}  {:>6}  {:>10}  {:>10}  {}",
            i.record.name,
            i.record.config.short(),
            i.record.layers.len(),
            human(i.size),
            human(i.unique),
            if i.in_use_by.is_empty() { "-".into() } else { i.in_use_by.join(",") }
        );
    }
    Ok(ExitCode::SUCCESS)
}
