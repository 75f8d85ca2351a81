//! `gpubox-supervisor`: the main process of `gpu@NAME.service`, or a foreground container
//! runner without systemd (`run --definition FILE`), like bwrap or systemd-nspawn.

mod accounts;
mod allocator;
mod capabilities;
mod cgroup;
mod child;
mod control;
mod devcgroup;
mod devices;
mod driver_mounts;
mod enter;
mod hooks;
mod idmap;
mod idmapped;
mod image;
mod in_root;
mod ledger;
mod live;
mod log;
mod messages;
mod mount_helper;
mod node_modes;
mod numa;
mod nvidia_topology;
mod peers;
mod reach;
mod rootfs;
mod seccomp;
mod signals;
mod start_devices;
mod supervise;
mod sys;
mod systemd;
mod terminal;
mod watch;

use anyhow::{bail, Context, Result};
use gpubox_definition::{SearchPath, Sources};
use std::path::PathBuf;
use std::process::ExitCode;

/// The most threads the control socket's blocking work may hold at once. Its calls are short
/// (a credential read, a close) or serialised by the live state's lock anyway.
const BLOCKING_THREADS: usize = 8;

const USAGE: &str = "usage: gpubox-supervisor run NAME
       gpubox-supervisor run --definition FILE

Runs the container defined in NAME.gpubox ($GPUBOX_DEFINITIONS_PATH, default
/etc/gpubox:/run/gpubox:/usr/lib/gpubox) or in FILE, in the foreground, and exits with the
payload's status (128+N if it was killed by signal N; 125 if the container could not be set up,
126 if the command cannot be executed, 127 if it was not found).";

fn main() -> ExitCode {
    // Nothing the caller left open reaches a helper, a hook or the payload (CVE-2024-21626).
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets close-on-exec flags.
    unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    // zbus does a blocking call of each control connection's handshake and close on the
    // `blocking` crate's pool, which would grow to 500 threads under a flood of connections. The
    // pool reads its cap once, at first use; the payload's environment is built apart.
    // Set while the process has one thread, so nothing can read the environment meanwhile.
    std::env::set_var("BLOCKING_MAX_THREADS", BLOCKING_THREADS.to_string());
    // Before anything can start a thread (signals.rs says why).
    if let Err(e) = signals::block() {
        eprintln!("gpubox-supervisor: blocking signals: {e}");
        return ExitCode::from(125);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["run", "--definition", file] => Target::File(PathBuf::from(file)),
        ["run", name] if !name.starts_with('-') => Target::Name(name.to_owned()),
        // The supervisor's own helpers (see mount_helper.rs, systemd.rs); not for people.
        ["mount-helper", owner, dir] => return helper(|| mount_helper::serve(owner.parse()?, dir.as_ref())),
        ["fetch-image", reference] => return helper(|| image::fetch(reference)),
        ["nvidia-topology", ref buses @ ..] => {
            let buses: Vec<String> = buses.iter().map(|b| b.to_string()).collect();
            return helper(|| nvidia_topology::print(&buses));
        }
        ["numa-allow", unit, cpus, nodes] => {
            return helper(|| {
                let parse = |l: &str| numa::parse_list(l).ok_or_else(|| anyhow::anyhow!("bad list {l}"));
                let nodes = parse(nodes)?.into_iter().map(|n| n as u32).collect();
                systemd::set_numa(unit, Some(&numa::Binding { cpus: parse(cpus)?, nodes }))
            });
        }
        ["device-allow", unit, ref entries @ ..] => {
            let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
            return helper(|| systemd::set_device_allow(unit, &entries));
        }
        // `gpuboxctl exec`'s second half (enter.rs); the request comes on the descriptor.
        ["enter", fd] => {
            return match fd.parse().map_err(anyhow::Error::from).and_then(enter::run) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("gpuboxctl exec: {e:#}");
                    ExitCode::from(child::SETUP_FAILED as u8)
                }
            };
        }
        ["-h" | "--help"] | ["run", "-h" | "--help"] => {
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
    let code = match run(&target, &mode) {
        Ok(code) => code.clamp(0, 255),
        // Stopped before it ran, as systemd asked: a clean stop to systemd, 128+N standalone.
        Err(e) if e.downcast_ref::<allocator::Stopped>().is_some() => {
            let sig = e.downcast_ref::<allocator::Stopped>().map_or(libc::SIGTERM, |s| s.0);
            log::info(&format!("{e}"));
            if mode.systemd {
                0
            } else {
                128 + sig
            }
        }
        Err(e) => {
            log::error(&format!("{e:#}"));
            child::SETUP_FAILED
        }
    };
    // Everything is cleaned up by now and the supervisor writes nothing buffered: no atexit
    // handlers of the libraries, which would only lengthen the container's exit.
    // SAFETY: _exit ends the process; nothing after it runs.
    unsafe { libc::_exit(code) }
}

fn helper(f: impl FnOnce() -> Result<()>) -> ExitCode {
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
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
    let mut definition = match target {
        Target::Name(name) => SearchPath::from_env().load(name)?,
        Target::File(file) => Sources::from_file(file)?.load()?,
    };
    // One supervisor per name, from here on (before GPUs are allocated under that name).
    let _name = idmap::claim_name(&definition.name)?;
    // Fetched before GPUs are taken: a long pull holds none. Its config fills in the definition.
    let image = image::prepare(&mut definition)?;
    let start = start_devices::prepare(&definition, |waiting| {
        log::info(waiting);
        // systemd keeps the unit "activating" while this waits, and must not time it out.
        let _ = sd_notify::notify(
            false,
            &[sd_notify::NotifyState::ExtendTimeoutUsec(60_000_000), sd_notify::NotifyState::Status(waiting)],
        );
    })?;
    // The host's root already has the driver; a root of our own gets it.
    let mut driver = None;
    let own_root = definition.container.root_directory.is_some() || image.is_some();
    if definition.gpu.driver_libraries && own_root {
        match gpubox_devices::driver::nvidia() {
            Ok(files) => driver = Some(files),
            Err(e) if definition.gpu.optional => log::warn(&format!("{e}; starting without it (Optional=yes)")),
            Err(e) => bail!(e),
        }
    }
    let result = supervise::run(&definition, start, driver, image.as_ref(), mode).context("running the container");
    if let Some(image) = image {
        // An ephemeral writable layer goes with the container.
        if let Err(e) = image.writable.finish() {
            log::warn(&format!("removing the container's writable layer: {e}"));
        }
    }
    result
}
