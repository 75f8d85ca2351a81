//! `gpubox-supervisor`: the main process of `gpu@NAME.service`, or a foreground container
//! runner without systemd (`run --definition FILE`), like bwrap or systemd-nspawn.

mod capabilities;
mod cgroup;
mod child;
mod idmap;
mod log;
mod rootfs;
mod seccomp;
mod supervise;
mod sys;

use anyhow::{bail, Context, Result};
use gpubox_definition::{SearchPath, Sources};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: gpubox-supervisor run NAME
       gpubox-supervisor run --definition FILE

Runs the container defined in NAME.gpubox ($GPUBOX_DEFINITIONS_PATH, default
/etc/gpubox:/run/gpubox:/usr/lib/gpubox) or in FILE, in the foreground, and exits with the
payload's status (128+N if it was killed by signal N; 125 if the container could not be set up,
126 if the command cannot be executed, 127 if it was not found).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["run", "--definition", file] => Target::File(PathBuf::from(file)),
        ["run", name] if !name.starts_with('-') => Target::Name(name.to_owned()),
        ["-h" | "--help"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        ["--version"] => {
            println!("gpubox-supervisor {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mode = supervise::Mode::detect();
    log::init(target.name(), mode.systemd);
    match run(&target, &mode) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            log::error(&format!("{e:#}"));
            ExitCode::from(child::SETUP_FAILED as u8)
        }
    }
}

enum Target {
    Name(String),
    File(PathBuf),
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Name(n) => n,
            Target::File(f) => f.file_stem().and_then(|s| s.to_str()).unwrap_or("?"),
        }
    }
}

fn run(target: &Target, mode: &supervise::Mode) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("gpubox-supervisor must run as root (it creates namespaces, mounts and cgroups)");
    }
    let definition = match target {
        Target::Name(name) => SearchPath::from_env().load(name)?,
        Target::File(file) => Sources::from_file(file)?.load()?,
    };
    // GPU discovery and passthrough come with the devices crate; until then only optional
    // selectors are accepted, and they match nothing.
    let devices = Vec::new();
    if !definition.gpu.devices.is_empty() {
        if !definition.gpu.optional {
            bail!(
                "[GPU] Device= needs GPU passthrough, which this build does not have yet (Optional=yes runs without)"
            );
        }
        log::warn("GPU passthrough is not in this build yet: starting without GPUs (Optional=yes)");
    }
    supervise::run(&definition, devices, mode).context("running the container")
}
