//! `Image=`: the container's root is its image's layers, read-only and shared, stacked by
//! overlayfs under a writable layer of the container's own (docs/architecture.md, "Images").
//!
//! Before the clone: the image is fetched if `Pull=` says so (in a process of its own, since
//! the registry client starts threads and the clone needs a single-threaded supervisor), its
//! config supplies what the definition leaves out, and the writable layer is made and locked
//! as in use. After the clone, the supervisor mounts the overlay in the container's mount
//! namespace (idmapped.rs), where the child takes it as its root.

use crate::log;
use anyhow::{bail, Context, Result};
use gpubox_definition::{Definition, ImageRef, Pull, User};
use gpubox_images::store::WritableLayer;
use gpubox_images::{ImageDefaults, ImageRecord, Progress, Store};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// An image's root, ready to be mounted.
pub struct ImageRoot {
    /// `Image=…` as written, for messages.
    pub what: String,
    /// The layers' directories, top first (overlayfs's `lowerdir=` order).
    pub lower: Vec<PathBuf>,
    /// The container's writable layer, locked as in use while this lives.
    pub writable: WritableLayer,
    /// The store's root, for messages.
    pub store: PathBuf,
}

impl ImageRoot {
    /// The directory holding `relative` as the container sees it: the writable layer's if it
    /// has the file, else the topmost layer's (a whiteout or an opaque directory above it hides
    /// it). Read on the host's side, before the overlay exists: `/etc/passwd` for `User=`.
    pub fn dir_with(&self, relative: &str) -> Option<PathBuf> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        for dir in std::iter::once(&self.writable.upper).chain(&self.lower) {
            if let Ok(m) = std::fs::symlink_metadata(dir.join(relative)) {
                let whiteout = m.file_type().is_char_device() && m.rdev() == 0;
                return (!whiteout).then(|| dir.clone());
            }
        }
        None
    }
}

/// Fetches the image as `Pull=` says, applies its config's defaults to `d`, and makes the
/// container's writable layer.
pub fn prepare(d: &mut Definition) -> Result<Option<ImageRoot>> {
    let Some(image) = d.container.image.clone() else { return Ok(None) };
    let store = Store::open_default()?;
    // From the lookup to the writable layer's lock, a prune must not take the layers away.
    let lock = store.shared()?;
    let mut record = store.lookup(&image.name())?;
    let fetch = match (d.container.pull, &record) {
        (Pull::Always | Pull::Newer, _) | (Pull::Missing, None) => true,
        (Pull::Missing, Some(stored)) if gpubox_images::local::changed(stored, &image) => {
            log::info(&format!("{image} changed since it was stored"));
            true
        }
        (Pull::Never, None) => bail!(gpubox_images::Error::NotPulled { image: image.name() }),
        _ => false,
    };
    if fetch {
        match fetch_in_helper(&store, &image) {
            // Pull=newer: what the store has is good enough where no newer can be had (but a
            // stop is a stop).
            Err(e)
                if d.container.pull == Pull::Newer
                    && record.is_some()
                    && e.downcast_ref::<crate::allocator::Stopped>().is_none() =>
            {
                log::warn(&format!("{e:#}; Pull=newer: starting with the image the store has"));
            }
            fetched => fetched?,
        }
        record = store.lookup(&image.name())?;
    }
    let record: ImageRecord = record.with_context(|| format!("{image}: not in the store after it was fetched"))?;
    let defaults = ImageDefaults::parse(&store.blob(&record.config)?)?;
    apply_defaults(d, &defaults)?;
    let writable = store.writable_layer(&d.name, &record.name, &record.layers, d.container.ephemeral)?;
    if let Some(before) = &writable.made_over {
        log::warn(&format!(
            "the kept writable layer ({}) was made over other layers ({before} as it was then); it lies over \
             {image}'s as it is (remove it while stopped to start afresh)",
            writable.upper.display()
        ));
    }
    drop(lock);
    let lower = record.layers.iter().rev().map(|l| store.layer_dir(l)).collect();
    log::info(&format!("image {image} ({}, {} layers)", record.config.short(), record.layers.len()));
    Ok(Some(ImageRoot { what: format!("Image={image}"), lower, writable, store: store.root().to_owned() }))
}

/// The command, environment, working directory and user the image supplies where the
/// definition is silent (gpubox_images::config says how they combine).
fn apply_defaults(d: &mut Definition, image: &ImageDefaults) -> Result<()> {
    let c = &mut d.container;
    c.exec = image.command(&c.exec);
    if c.exec.is_empty() {
        bail!("the image has no command (Entrypoint or Cmd) and [Container] Exec= is not set");
    }
    c.environment = image.environment(&c.environment);
    if c.working_directory.is_none() {
        c.working_directory = image.working_dir.as_ref().map(PathBuf::from).filter(|p| p.is_absolute());
    }
    if c.user.is_none() {
        c.user = image.user.as_deref().map(user_of_image);
    }
    Ok(())
}

/// An image config's `User`: `NAME`, `UID`, `UID:GID` (`NAME:GROUP` takes the name's own
/// group; gpubox's `User=` names no group).
fn user_of_image(user: &str) -> User {
    let (u, g) = user.split_once(':').map_or((user, None), |(u, g)| (u, Some(g)));
    match (u.parse::<u32>(), g.map(str::parse::<u32>)) {
        (Ok(uid), None) => User::Id { uid, gid: None },
        (Ok(uid), Some(Ok(gid))) => User::Id { uid, gid: Some(gid) },
        (Ok(uid), Some(Err(_))) => User::Id { uid, gid: None },
        _ => User::Name(u.to_owned()),
    }
}

/// Runs `gpubox-supervisor fetch-image REF` and waits for it, keeping systemd's start timeout
/// away while it works and ending it at a stop.
fn fetch_in_helper(store: &Store, image: &ImageRef) -> Result<()> {
    log::info(&format!("fetching {image}"));
    let mut command = std::process::Command::new("/proc/self/exe");
    command.args(["fetch-image", &image.name()]).stdin(std::process::Stdio::null());
    // SAFETY: prctl is async-signal-safe; the fetch ends with its supervisor, even a killed one.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut helper = command.spawn().context("starting the image fetch")?;
    let mut extended = Instant::now() - Duration::from_secs(60);
    loop {
        if let Some(status) = helper.try_wait().context("waiting for the image fetch")? {
            if !status.success() {
                bail!("{image}: the fetch failed (its messages are above)");
            }
            return Ok(());
        }
        if let Some(sig) = crate::allocator::stop_requested() {
            let _ = helper.kill();
            // Killed, it left what it was unpacking: nothing of it stays. Its pid names that
            // work, so it is removed while the pid is still the helper's (ended, not reaped).
            let pid = nix::unistd::Pid::from_raw(helper.id() as i32);
            let flags = nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT;
            let _ = nix::sys::wait::waitid(nix::sys::wait::Id::Pid(pid), flags);
            if let Err(e) = store.discard_work_of(helper.id()) {
                log::warn(&format!("removing what the stopped fetch left: {e}"));
            }
            let _ = helper.wait();
            return Err(crate::allocator::Stopped(sig, "fetching the image").into());
        }
        if extended.elapsed() >= Duration::from_secs(20) {
            extended = Instant::now();
            let _ = sd_notify::notify(
                false,
                &[
                    sd_notify::NotifyState::ExtendTimeoutUsec(60_000_000),
                    sd_notify::NotifyState::Status(&format!("fetching {image}")),
                ],
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `gpubox-supervisor fetch-image REF`: the fetch itself, its progress on stderr (the
/// container's log).
pub fn fetch(reference: &str) -> Result<()> {
    let image: ImageRef = reference.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let store = Store::open_default()?;
    let started = Instant::now();
    let mut progress = |p: Progress| match p {
        Progress::Resolved { layers } => eprintln!("{image}: {layers} layers"),
        Progress::Have { index, .. } => eprintln!("{image}: layer {index}: in the store already"),
        Progress::Fetching { index, done: 0, total } => {
            eprintln!("{image}: layer {index}: fetching{}", total.map(|t| format!(" ({})", mib(t))).unwrap_or_default())
        }
        Progress::Fetching { .. } | Progress::Unpacking { .. } => {}
        Progress::Resuming { index, done, error } => {
            eprintln!("{image}: layer {index}: the download broke off after {} ({error}); resuming", mib(done))
        }
        Progress::Unpacked { index, size } => eprintln!("{image}: layer {index}: unpacked ({})", mib(size)),
    };
    let record = gpubox_images::fetch(&store, &image, &mut progress)?;
    eprintln!("{image}: stored as {} in {:.1} s", record.config.short(), started.elapsed().as_secs_f64());
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
