//! The supervisor's side of a container's life: prepare everything that can be prepared
//! before the clone (seccomp program, capability set, id range, cgroup), clone into new
//! namespaces, map ids, release the start barrier, learn whether the payload exec'd, tell
//! systemd, forward signals, stop it within the timeout, and clean up after it.

use crate::cgroup::Cgroup;
use crate::child::{self, Plan};
use crate::devices::{Access, Staging};
use crate::hooks::Hooks;
use crate::live::Live;
use crate::messages::ChildReport;
use crate::node_modes::FollowedNode;
use crate::start_devices::StartDevices;
use crate::terminal::Terminal;
use crate::{capabilities, control, devcgroup, idmap, log, seccomp, signals, sys, systemd, watch};
use anyhow::{Context, Result};
use caps::CapsHashSet;
use gpubox_control::ExecContext;
use gpubox_definition::{Bind, Definition, Network, UserNamespace};
use nix::sys::signal::{self, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the supervisor was started.
pub struct Mode {
    /// systemd runs us as a service (`INVOCATION_ID`), with a delegated cgroup.
    pub systemd: bool,
    /// Seconds between the first SIGTERM and killing the payload's cgroup.
    pub stop_timeout: Duration,
}

impl Mode {
    pub fn detect() -> Mode {
        let stop = std::env::var("GPUBOX_STOP_TIMEOUT").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(10.0);
        Mode {
            systemd: std::env::var_os("INVOCATION_ID").is_some(),
            stop_timeout: Duration::from_secs_f64(stop.max(0.0)),
        }
    }
}

fn notify(states: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(false, states);
}

/// Runs the container to its end; returns the exit status to report (the payload's own,
/// 128+signal, or 125–127 for a container that never started).
pub fn run(
    d: &Definition,
    start: StartDevices,
    driver: Option<gpubox_devices::driver::DriverFiles>,
    image: Option<&crate::image::ImageRoot>,
    mode: &Mode,
) -> Result<i32> {
    let capabilities = capabilities::for_container(&d.container)?;
    let seccomp = seccomp::compile(&d.container.seccomp, &capabilities)?;
    let mut plan = build_plan(d, &start, capabilities, seccomp);
    let ids = if plan.user_namespace { Some(idmap::reserve(&d.name)?) } else { None };
    let owner = ids.as_ref().map_or(0, |i| i.host_base);
    let mut run_dir = RuntimeDir::create(&d.name, mode.systemd)?;
    // Under the user namespace, the root and `idmap` binds keep their ownership (idmapped.rs).
    let mut idmaps = if plan.user_namespace { idmapped_trees(&mut plan, &mut run_dir)? } else { Vec::new() };
    let overlay = image.map(|i| image_root(i, &mut plan, &mut run_dir, &mut idmaps, owner)).transpose()?;
    if plan.user_namespace {
        check_reachable(&plan, owner)?;
    }
    let mut terminal = Terminal::for_stdio(owner)?;
    if let Some(t) = &terminal {
        plan.console = Some(t.slave_path.clone());
        plan.terminal = t.slave.as_ref().map(|s| (s.as_raw_fd(), t.replaces.clone()));
    }
    if let Some(files) = driver {
        plan.driver = Some((files, run_dir.scratch("driver")?));
    }
    // Only for the devices of the start: later ones are staged by the mount helper.
    let staging = if start.selection.nodes.is_empty() { None } else { Some(Staging::new(&run_dir.path, owner)?) };
    // User= is looked up in the image's /etc/passwd as the container will see it.
    let accounts_root = match image {
        Some(i) => i.dir_with("etc/passwd"),
        None => d.container.root_directory.clone(),
    };
    let host = HostSide {
        staging: staging.as_ref(),
        owner,
        terminal: terminal.as_mut(),
        idmaps: &idmaps,
        overlay: overlay.as_ref(),
        accounts_root: accounts_root.as_deref(),
    };
    let result = run_staged(d, &mut plan, start, host, mode);
    if let Some(staging) = staging {
        staging.remove();
    }
    result
}

/// The child's plan for a definition and the devices of its start: its environment (the
/// devices' variables after the definition's, a driver's library path before the definition's
/// own), its binds (the definition's, then the CDI mounts), and the rest as the definition says.
/// Pure; what the host's side adds (the terminal, the staging nodes, the driver's files) comes
/// after.
fn build_plan(d: &Definition, start: &StartDevices, capabilities: CapsHashSet, seccomp: Option<Vec<u8>>) -> Plan {
    let selection = &start.selection;
    let c = &d.container;
    let mut environment = c.environment.clone();
    for (k, v) in &selection.env {
        // The definition's own library path stays, after the driver's.
        let mut value = v.clone();
        if k == "LD_LIBRARY_PATH" {
            if let Some((_, own)) = environment.iter().find(|(n, _)| n == k) {
                value = format!("{v}:{own}");
            }
        }
        environment.retain(|(n, _)| n != k);
        environment.push((k.clone(), value));
    }
    let mut binds = c.binds.clone();
    binds.extend(selection.mounts.iter().map(|m| Bind {
        source: m.host_path.clone(),
        destination: m.container_path.clone(),
        read_only: m.options.iter().any(|o| o == "ro"),
        optional: false,
        idmap: false,
    }));
    Plan {
        root_directory: c.root_directory.clone(),
        root_mount: None,
        shm_size: c.shm_size.clone(),
        read_only: c.read_only,
        hostname: c.hostname.clone(),
        binds,
        devices: Vec::new(),
        private_network: c.network == Network::None,
        user_namespace: c.user_namespace == UserNamespace::Private,
        user: c.user.clone(),
        exec: c.exec.clone(),
        working_directory: c.working_directory.clone(),
        environment,
        capabilities,
        no_new_privileges: c.no_new_privileges,
        seccomp,
        init: c.init,
        console: None,
        terminal: None,
        hooks_barrier: false,
        driver: None,
        hidden: start.hidden.clone(),
        numa: start.numa.clone(),
    }
}

/// What the supervisor made on the host's side for the container before its start.
struct HostSide<'a> {
    /// The staging tmpfs of the start's device nodes.
    staging: Option<&'a Staging>,
    /// The host id of the container's root (0 without a user namespace).
    owner: u32,
    /// The container's own terminal, when run from one.
    terminal: Option<&'a mut Terminal>,
    /// Trees to attach idmapped, once the user namespace has its ids.
    idmaps: &'a [crate::idmapped::Idmap],
    /// An image's root, mounted after them.
    overlay: Option<&'a crate::idmapped::Overlay>,
    /// Where the container's `/etc/passwd` is read from on the host's side.
    accounts_root: Option<&'a std::path::Path>,
}

/// An image's root: mounted by overlayfs at a mount point of the runtime directory, which the
/// plan takes as its root; under the user namespace, over idmapped copies of the layers and
/// of the writable layer, so that files keep their ids as seen from inside (idmapped.rs).
fn image_root(
    image: &crate::image::ImageRoot,
    plan: &mut Plan,
    run_dir: &mut RuntimeDir,
    idmaps: &mut Vec<crate::idmapped::Idmap>,
    owner: u32,
) -> Result<crate::idmapped::Overlay> {
    let target = run_dir.scratch("root")?;
    plan.root_directory = Some(target.clone());
    plan.root_mount = Some(target.clone());
    let w = &image.writable;
    // Every layer is attached at a short mount point of the runtime directory (idmapped under
    // the user namespace, a plain copy without), so that overlayfs's options, one page, hold
    // the most layers an image may have (idmapped.rs, `Overlay::mount_now`).
    let mut lower = Vec::new();
    for (i, layer) in image.lower.iter().enumerate() {
        let at = run_dir.scratch(&format!("layer-{i}"))?;
        idmaps.push(crate::idmapped::Idmap {
            what: format!("{}: layer {}", image.what, image.lower.len() - i),
            source: layer.clone(),
            target: at.clone(),
        });
        lower.push(at);
    }
    let (upper, work) = if plan.user_namespace {
        let rw = run_dir.scratch("rw")?;
        idmaps.push(crate::idmapped::Idmap {
            what: format!("{}: writable layer", image.what),
            source: w.dir.clone(),
            target: rw.clone(),
        });
        (rw.join("upper"), rw.join("work"))
    } else {
        (w.upper.clone(), w.work.clone())
    };
    Ok(crate::idmapped::Overlay {
        what: image.what.clone(),
        lower,
        upper,
        work,
        target,
        store: image.store.clone(),
        creator: plan.user_namespace.then_some(owner),
        volatile: w.ephemeral,
    })
}

/// The root and the `idmap` binds, each made an idmapped copy at a mount point of the runtime
/// directory, where the child takes it from: the plan is changed to point there.
fn idmapped_trees(plan: &mut Plan, run_dir: &mut RuntimeDir) -> Result<Vec<crate::idmapped::Idmap>> {
    let mut idmaps = Vec::new();
    if let Some(root) = &plan.root_directory {
        if !root.is_dir() {
            anyhow::bail!("RootDirectory={} is not a directory", root.display());
        }
        let target = run_dir.scratch("root")?;
        idmaps.push(crate::idmapped::Idmap {
            what: format!("RootDirectory={}", root.display()),
            source: root.clone(),
            target: target.clone(),
        });
        plan.root_mount = Some(target);
    }
    for (i, bind) in plan.binds.iter_mut().enumerate().filter(|(_, b)| b.idmap) {
        if bind.optional && !bind.source.exists() {
            continue;
        }
        let target = run_dir.scratch(&format!("bind-{i}"))?;
        idmaps.push(crate::idmapped::Idmap {
            what: format!("Bind={}", bind.source.display()),
            source: bind.source.clone(),
            target: target.clone(),
        });
        bind.source = target;
    }
    Ok(idmaps)
}

fn run_staged(d: &Definition, plan: &mut Plan, start: StartDevices, host: HostSide, mode: &Mode) -> Result<i32> {
    let HostSide { staging, owner, mut terminal, idmaps, overlay, accounts_root } = host;
    let StartDevices { selection, devices: start_devices, held, selectors, xid, .. } = start;
    let selection = &selection;
    let threads = signals::other_threads();
    if !threads.is_empty() {
        anyhow::bail!("the supervisor has other threads before the clone ({}); refusing to fork", threads.join(", "));
    }
    let device_group = crate::devices::device_group(d.container.user.as_ref(), accounts_root);
    let cgroup = Cgroup::create(&d.name, mode.systemd)?;
    // Under systemd, systemd grants the nodes (DeviceAllow=), and must before the staging nodes
    // are made: DevicePolicy=closed covers mknod too. zbus would start threads, and the clone
    // below needs a single-threaded process, so a helper process makes the call.
    let unit = cgroup.as_ref().filter(|c| c.delegated).and_then(|_| systemd::own_unit());
    // NUMA=yes under systemd: the unit's cpuset too, a bound the payload cannot widen.
    let numa_unit = unit.clone().filter(|_| plan.numa.is_some());
    // What this start changes on the host's side (and what live changes add to the unit's
    // DeviceAllow=), undone however it ends: HostChanges::drop.
    let host_changes = HostChanges { cgroup, device_allow_unit: unit.clone(), numa_unit: numa_unit.clone() };
    let cgroup = host_changes.cgroup.as_ref();
    if let (Some(unit), Some(binding)) = (&numa_unit, &plan.numa) {
        // The payload's own affinity and memory policy still bind it (child.rs); the unit's
        // cpuset is the hard bound on top, and its absence is worth a warning, not a failure.
        if let Err(e) = systemd::set_numa_in_helper(unit, binding) {
            log::warn(&format!("NUMA=yes: {e:#}; the payload is bound by its affinity and memory policy only"));
        }
    }
    let mut allowed_by_systemd = Vec::new();
    if let (Some(unit), false) = (&unit, selection.nodes.is_empty()) {
        allowed_by_systemd = systemd::device_allow_entries(&selection.nodes, &[]);
        systemd::set_device_allow_in_helper(unit, &allowed_by_systemd)?;
    }
    let mut host_modes = Vec::new();
    // Made after the clone, in the container's namespace (Staging::make_in), before it goes on.
    let mut to_stage = Vec::new();
    if let Some(staging) = staging {
        for node in &selection.nodes {
            let spec = selection.access_of(&node.path);
            let access = Access::for_node(node, device_group, &spec);
            plan.devices.push((staging.source_for(node), node.path.clone()));
            to_stage.push((node.clone(), access));
            host_modes.push((node.clone(), spec, access.mode));
        }
    }
    if !selection.names.is_empty() {
        log::info(&format!("devices: {}", selection.names.join(", ")));
    }
    let mut base_allowed = devcgroup::STANDARD.to_vec();
    if let Some(console) = plan.console.as_ref().and_then(|c| gpubox_devices::Node::stat(c.clone())) {
        base_allowed.push((console.major, Some(console.minor)));
    }
    let mut allowed = base_allowed.clone();
    allowed.extend(selection.nodes.iter().map(|n| (n.major, Some(n.minor))));
    plan.hooks_barrier = !selection.hooks.is_empty();
    let hooks = Hooks::new(&d.name, &RuntimeDir::path(&d.name), &selection.hooks)?;
    let plan = &*plan;

    // Blocked since main began (signals.rs); blocking again costs nothing and keeps this
    // function right on its own.
    signals::block()?;
    let signals = SignalFd::with_flags(&signals::handled(), SfdFlags::SFD_CLOEXEC)?;

    let (go_read, go_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut namespaces =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWCGROUP;
    if plan.user_namespace {
        namespaces |= libc::CLONE_NEWUSER;
    }
    if plan.private_network {
        namespaces |= libc::CLONE_NEWNET;
    }

    // SAFETY: the supervisor is single-threaded here (checked at the top of this function, and
    // nothing since starts a thread: helpers are processes); the child only runs child::run,
    // which execs or _exits.
    let pid = unsafe { sys::clone3(namespaces, cgroup.map(AsRawFd::as_raw_fd)) }
        .context("creating the container's namespaces")?;
    if pid == 0 {
        drop((go_write, err_read, signals));
        child::run(plan, go_read, err_write);
    }
    drop((go_read, err_write));
    if let Some(t) = terminal.as_deref_mut() {
        t.slave = None;
        t.make_raw();
    }
    // Killed and reaped on every way out before the payload's end is seen (ChildGuard::drop).
    let mut child_guard = ChildGuard(Some(Pid::from_raw(pid)));
    let child = Pid::from_raw(pid);
    let mount_ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).ok().map(std::os::fd::OwnedFd::from);
    if let Some(staging) = staging.filter(|_| !to_stage.is_empty()) {
        match &mount_ns {
            Some(ns) => staging.make_in(ns.as_fd(), &to_stage)?,
            None => anyhow::bail!("the container's mount namespace is gone"),
        };
    }

    if plan.user_namespace {
        let map = format!("0 {owner} {}\n", idmap::SIZE);
        std::fs::write(format!("/proc/{pid}/uid_map"), &map)
            .and_then(|_| std::fs::write(format!("/proc/{pid}/gid_map"), &map))
            .context("writing the user-namespace id map")?;
    }
    if !idmaps.is_empty() || overlay.is_some() {
        let userns = plan
            .user_namespace
            .then(|| File::open(format!("/proc/{pid}/ns/user")))
            .transpose()
            .context("opening the container's user namespace")?;
        match &mount_ns {
            Some(ns) => crate::idmapped::attach(ns.as_fd(), userns.as_ref().map(|u| u.as_fd()), idmaps, overlay)?,
            None => anyhow::bail!("the container's mount namespace is gone"),
        }
    }
    // A write to `go` fails only when the child is gone already: its error pipe says why, and
    // the path below reads it, reaps the child and cleans up.
    let mut go = File::from(go_write);
    let _ = go.write_all(b"1");
    // While the child builds its file system: the device program only has to be in place
    // before the payload runs, and the child waits for the second byte before it execs.
    let devices_filter = cgroup.map(|cg| devcgroup::DeviceFilter::attach(cg, &allowed)).transpose()?;
    if !plan.hooks_barrier {
        let _ = go.write_all(b"1");
    }
    // Also while the child works: the control socket, served once the payload runs.
    let socket = SocketFile(gpubox_control::socket_path(&d.name));
    let listener = control::bind(&d.name).map_err(|e| log::warn(&format!("no control socket: {e:#}"))).ok();

    // The error pipe closes on exec (success) or carries the child's failure; with hooks,
    // `created` comes first, when the file system is ready for them.
    let mut errors = std::io::BufReader::new(File::from(err_read));
    let mut report = ChildReport::read(&mut errors);
    if let Ok(Some(ChildReport::Created)) = report {
        report = match hooks.run(&["createRuntime", "prestart", "createContainer"], pid) {
            Ok(()) => {
                let _ = go.write_all(b"1");
                ChildReport::read(&mut errors)
            }
            Err(e) => {
                let _ = signal::kill(child, Signal::SIGKILL);
                Ok(Some(ChildReport::Failed { code: child::SETUP_FAILED, message: format!("{e:#}") }))
            }
        };
    }
    let failure = match report {
        Ok(None) => None,
        Ok(Some(ChildReport::Failed { code, message })) => Some((code, message)),
        Ok(Some(ChildReport::Created)) => Some((child::SETUP_FAILED, "the child said it was created twice".into())),
        Err(e) => Some((child::SETUP_FAILED, format!("{e:#}"))),
    };
    if let Some((code, message)) = failure {
        log::error(&message);
        return Ok(code);
    }
    log::info(&format!("started {} (pid {pid})", summary(&d.container.exec)));
    // A thread of its own, now that the supervisor may have threads (the staging above needed
    // it single-threaded: setns of a mount namespace).
    if let Some(t) = terminal.as_deref_mut() {
        t.start_output();
    }
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&format!("running (payload pid {pid})"))]);
    if let Err(e) = hooks.run(&["poststart"], pid) {
        log::warn(&format!("{e:#}"));
    }

    let live = Arc::new(Mutex::new(Live {
        name: d.name.clone(),
        pid,
        mount_ns,
        state: gpubox_control::State::Running,
        hotplug: d.gpu.hotplug,
        selectors,
        helper: None,
        owner,
        run_dir: RuntimeDir::path(&d.name),
        cgroup_path: cgroup.map(|c| c.payload.clone()),
        devices_filter,
        base_allowed,
        unit: unit.clone(),
        device_group,
        ledger: crate::ledger::Ledger::with_start(start_devices, selection.nodes.clone()),
        followed: false,
        allowed_by_systemd,
        host_modes: host_modes.iter().filter_map(|(n, spec, mode)| FollowedNode::open(pid, n, spec, *mode)).collect(),
        held,
        exclusive: d.gpu.exclusive(),
        xid,
        exec_context: exec_context(d, plan, pid, owner, cgroup),
    }));
    // Containers with devices follow udev's events; one without gets there at its first attach.
    if !d.gpu.devices.is_empty() || d.gpu.count.is_some() {
        watch::follow(&live);
    }

    let control = listener.as_ref().map(|l| (l, &live));
    let (status, stopping) = wait(child, &signals, control, terminal.as_deref_mut(), cgroup, mode)?;
    child_guard.0 = None;
    if let Some(t) = terminal {
        t.drain();
    }
    {
        let mut live = live.lock().expect("live state lock");
        live.state = gpubox_control::State::Stopping;
        live.helper = None;
        live.mount_ns = None;
    }
    drop(socket);
    drop(go);
    let summary = match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
        _ => "ended".into(),
    };
    log::info(&format!("payload {summary}"));
    notify(&[sd_notify::NotifyState::Status(&format!("payload {summary}"))]);
    // The payload is gone: poststop hooks get its last pid, as OCI's state keeps it.
    if let Err(e) = hooks.run(&["poststop"], pid) {
        log::warn(&format!("{e:#}"));
    }
    let code = match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => child::SETUP_FAILED,
    };
    // A payload that ended because systemd stopped the unit stopped cleanly, as a service's
    // main process dying of SIGTERM is clean to systemd: the unit ends inactive, not failed.
    let stopped_by_request = [128 + libc::SIGTERM, 128 + libc::SIGINT, 128 + libc::SIGKILL].contains(&code);
    Ok(if mode.systemd && stopping && stopped_by_request { 0 } else { code })
}

/// The paths the child opens as the container's root (host uid `owner`), checked first for a
/// clear error: the root, and the sources of binds that must be there.
fn check_reachable(plan: &Plan, owner: u32) -> Result<()> {
    // An idmapped root is reached through the runtime directory, as its own root.
    let root = plan.root_directory.iter().filter(|_| plan.root_mount.is_none());
    let paths = root.map(|r| ("RootDirectory".to_owned(), r.as_path())).chain(
        plan.binds
            .iter()
            .filter(|b| !b.optional)
            .map(|b| (format!("Bind source {}", b.source.display()), b.source.as_path())),
    );
    for (what, path) in paths {
        if let Some(blocked) = crate::reach::first_blocked(path, owner, owner) {
            let what = if what == "RootDirectory" { format!("RootDirectory={}", path.display()) } else { what };
            anyhow::bail!("{what}: {blocked} host uid {owner}, the container's root (UserNamespace=private)");
        }
    }
    Ok(())
}

/// The control socket's file, removed when the container stops or fails to start.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `/run/gpubox/NAME`, the container's runtime directory (control socket, staging): systemd
/// makes it for a unit (`RuntimeDirectory=`); standalone, the supervisor makes what is missing
/// and removes it again at the end.
struct RuntimeDir {
    path: std::path::PathBuf,
    created: Vec<std::path::PathBuf>,
}

impl RuntimeDir {
    fn path(name: &str) -> std::path::PathBuf {
        std::path::Path::new(gpubox_control::RUN_DIR).join(name)
    }

    /// Called with the container's name claimed: standalone, a directory already there was
    /// left by a supervisor that was killed (SIGKILL skips all cleanup), and is made anew.
    fn create(name: &str, systemd: bool) -> Result<RuntimeDir> {
        use gpubox_control::run_dir;
        let path = RuntimeDir::path(name);
        if !systemd && std::fs::symlink_metadata(&path).is_ok() {
            log::info(&format!("removing {}, left by a supervisor that was killed", path.display()));
            std::fs::remove_dir_all(&path).with_context(|| format!("removing the stale {}", path.display()))?;
        }
        let mut created = Vec::new();
        for (d, mode) in [(path.parent().expect("has a parent"), run_dir::BASE_MODE), (&path, run_dir::CONTAINER_MODE)]
        {
            if run_dir::ensure_dir(d, mode)? {
                created.push(d.to_owned());
            }
        }
        created.reverse();
        Ok(RuntimeDir { path, created })
    }

    /// An empty directory in it for the child to mount a tmpfs on (invisible to the host: the
    /// child's mounts stay in its namespace); removed at the end.
    fn scratch(&mut self, name: &str) -> Result<std::path::PathBuf> {
        let dir = self.path.join(name);
        if gpubox_control::run_dir::ensure_dir(&dir, gpubox_control::run_dir::BASE_MODE)? {
            self.created.insert(0, dir.clone());
        }
        Ok(dir)
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        for d in &self.created {
            let _ = std::fs::remove_dir(d); // only when empty: another container may use /run/gpubox
        }
    }
}

/// What a start changes on the host's side, undone when it is dropped, on every way out of
/// [`run_staged`] (an error at any step, or the payload's end): the unit's `DeviceAllow=` and
/// NUMA settings reset, then the payload's cgroup removed (killing what is left in it).
struct HostChanges {
    cgroup: Option<Cgroup>,
    device_allow_unit: Option<String>,
    numa_unit: Option<String>,
}

impl Drop for HostChanges {
    fn drop(&mut self) {
        if let Some(unit) = &self.device_allow_unit {
            if let Err(e) = systemd::set_device_allow(unit, &[]) {
                log::warn(&format!("{e:#}"));
            }
        }
        if let Some(unit) = &self.numa_unit {
            if let Err(e) = systemd::set_numa(unit, None) {
                log::warn(&format!("{e:#}"));
            }
        }
        if let Some(cg) = self.cgroup.take() {
            cg.remove();
        }
    }
}

/// The container's first process until its end has been seen: killed and reaped when dropped
/// (a failed start), so no error path can leave it behind. Declared after [`HostChanges`], so
/// that it goes first and the cgroup is empty when that is removed.
struct ChildGuard(Option<Pid>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            let _ = signal::kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
        }
    }
}

/// Forwards signals until the payload ends. After SIGTERM or SIGINT, a payload still running
/// after the stop timeout is killed, with everything in its cgroup.
/// Also says whether a stop was asked for (SIGTERM or SIGINT came).
/// The control socket's clients are accepted here too.
fn wait(
    child: Pid,
    signals: &SignalFd,
    control: Option<(&control::Listener, &crate::live::Shared)>,
    mut terminal: Option<&mut Terminal>,
    cgroup: Option<&Cgroup>,
    mode: &Mode,
) -> Result<(WaitStatus, bool)> {
    let mut deadline: Option<Instant> = None;
    let mut stopping = false;
    loop {
        let timeout = match deadline {
            Some(d) => nix::poll::PollTimeout::try_from(d.saturating_duration_since(Instant::now()))
                .unwrap_or(nix::poll::PollTimeout::MAX),
            None => nix::poll::PollTimeout::NONE,
        };
        let mut fds = vec![nix::poll::PollFd::new(signals.as_fd(), nix::poll::PollFlags::POLLIN)];
        if let Some((listener, _)) = control {
            fds.push(nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN));
        }
        let control_fds = fds.len();
        let terminal_fds: Vec<i32> =
            terminal.as_ref().map(|t| t.poll_fds().iter().map(|f| f.as_raw_fd()).collect()).unwrap_or_default();
        for &fd in &terminal_fds {
            // SAFETY: the terminal's descriptors stay open while it lives, past this poll.
            fds.push(nix::poll::PollFd::new(
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                nix::poll::PollFlags::POLLIN,
            ));
        }
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => {
                log::warn(&format!("payload still running {:?} after SIGTERM; killing it", mode.stop_timeout));
                let _ = signal::kill(child, Signal::SIGKILL);
                if let Some(cg) = cgroup {
                    cg.kill();
                }
                deadline = None;
                continue;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let ready = |fd: &nix::poll::PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if let (Some((listener, live)), Some(fd)) = (control, fds.get(1)) {
            if ready(fd) {
                listener.accept(live);
            }
        }
        if let Some(t) = terminal.as_deref_mut() {
            for (fd, raw) in fds[control_fds..].iter().zip(&terminal_fds) {
                if ready(fd) {
                    t.pump(*raw);
                }
            }
        }
        if !ready(&fds[0]) {
            continue;
        }
        let Some(info) = signals.read_signal()? else { continue };
        let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else { continue };
        if sig == Signal::SIGCHLD {
            match waitpid(child, Some(WaitPidFlag::WNOHANG))? {
                status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return Ok((status, stopping)),
                _ => continue,
            }
        }
        if let (Signal::SIGWINCH, Some(t)) = (sig, terminal.as_deref()) {
            // The container's terminal takes the new size; the kernel tells the payload.
            t.resize();
            continue;
        }
        let _ = signal::kill(child, sig);
        if matches!(sig, Signal::SIGTERM | Signal::SIGINT) && !stopping {
            stopping = true;
            notify(&[sd_notify::NotifyState::Stopping]);
            deadline = Some(Instant::now() + mode.stop_timeout);
        }
    }
}

/// What the payload was started with, recorded for `gpuboxctl exec` (enter.rs).
fn exec_context(d: &Definition, plan: &Plan, pid: i32, owner: u32, cgroup: Option<&Cgroup>) -> ExecContext {
    let mut capabilities: Vec<String> = plan.capabilities.iter().map(|c| c.to_string()).collect();
    capabilities.sort();
    ExecContext {
        name: d.name.clone(),
        pid,
        start_time: crate::enter::start_time(pid).unwrap_or(0),
        cgroup: cgroup.map(|c| c.payload.clone()),
        user_namespace: plan.user_namespace,
        owner,
        user: plan.user.as_ref().map(|u| u.to_string()),
        environment: plan.environment.clone(),
        working_directory: plan.working_directory.clone(),
        capabilities,
        no_new_privileges: plan.no_new_privileges,
        seccomp: plan.seccomp.clone(),
    }
}

/// The command line for a log line: quoted where needed, shortened when long.
fn summary(words: &[String]) -> String {
    let quoted: Vec<String> = words
        .iter()
        .map(|w| {
            if w.is_empty() || w.contains(|c: char| c.is_whitespace() || "'\"\\$".contains(c)) {
                format!("{w:?}")
            } else {
                w.clone()
            }
        })
        .collect();
    let line = quoted.join(" ");
    match line.char_indices().nth(100) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpubox_devices::cdi::Mount;

    fn definition(text: &str) -> Definition {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.gpubox");
        std::fs::write(&path, text).unwrap();
        gpubox_definition::Sources::from_file(&path).unwrap().load().unwrap()
    }

    /// The devices' environment comes after the definition's, a driver's library path before
    /// the definition's own; CDI mounts follow the definition's binds, read-only where the
    /// spec says `ro`; the rest is the definition's.
    #[test]
    fn the_plan_takes_the_definition_and_the_devices_of_the_start() {
        let d = definition(
            "[Container]\nExec=/bin/run a\nEnvironment=LD_LIBRARY_PATH=/opt/own FOO=1 NVIDIA_VISIBLE_DEVICES=void\n\
             Bind=/srv/data:/data\nUserNamespace=host\nNetwork=host\nReadOnly=yes\nInit=yes\n",
        );
        let mut start = StartDevices::default();
        start.selection.env =
            vec![("LD_LIBRARY_PATH".into(), "/usr/lib/nvidia".into()), ("NVIDIA_VISIBLE_DEVICES".into(), "0".into())];
        start.selection.mounts = vec![
            Mount {
                host_path: "/h/lib".into(),
                container_path: "/usr/lib/x".into(),
                options: vec!["ro".into(), "bind".into()],
                kind: None,
            },
            Mount {
                host_path: "/h/bin".into(),
                container_path: "/usr/bin/y".into(),
                options: vec!["bind".into()],
                kind: None,
            },
        ];
        let plan = build_plan(&d, &start, CapsHashSet::new(), Some(vec![1, 2]));
        assert_eq!(
            plan.environment,
            [
                ("FOO".to_owned(), "1".to_owned()),
                ("LD_LIBRARY_PATH".into(), "/usr/lib/nvidia:/opt/own".into()),
                ("NVIDIA_VISIBLE_DEVICES".into(), "0".into()),
            ]
        );
        let binds: Vec<(&str, &str, bool)> = plan
            .binds
            .iter()
            .map(|b| (b.source.to_str().unwrap(), b.destination.to_str().unwrap(), b.read_only))
            .collect();
        assert_eq!(
            binds,
            [("/srv/data", "/data", false), ("/h/lib", "/usr/lib/x", true), ("/h/bin", "/usr/bin/y", false)]
        );
        assert!(!plan.user_namespace && !plan.private_network && plan.read_only && plan.init);
        assert_eq!(plan.exec, ["/bin/run", "a"]);
        assert_eq!(plan.seccomp, Some(vec![1, 2]));
        // Least privilege by default.
        let plan = build_plan(
            &definition("[Container]\nExec=/bin/true\n"),
            &StartDevices::default(),
            CapsHashSet::new(),
            None,
        );
        assert!(plan.user_namespace && plan.private_network && plan.no_new_privileges && !plan.read_only);
        assert!(plan.environment.is_empty() && plan.binds.is_empty() && plan.devices.is_empty());
    }
}
