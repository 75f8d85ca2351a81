//! The container side of the clone: from a fresh set of namespaces to the payload's exec.
//! Runs in the forked child of a single-threaded supervisor. Every failure is written to the
//! error pipe, with the exit code the supervisor will report, and the child exits.

use crate::accounts::Account;
use crate::capabilities;
use crate::messages::ChildReport;
use crate::rootfs::{self, Layout};
use crate::sys;
use anyhow::{anyhow, bail, Context, Result};
use caps::CapsHashSet;
use gpubox_definition::{Bind, User};
use nix::sys::signal::{self, SigHandler, SigSet, Signal};
use nix::unistd::{Gid, Pid, Uid};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Everything the child needs, prepared by the supervisor before the clone.
pub struct Plan {
    pub root_directory: Option<PathBuf>,
    /// Where the child finds the root when it is an idmapped copy (idmapped.rs).
    pub root_mount: Option<PathBuf>,
    /// `/dev/shm`'s size, as tmpfs's `size=` takes it.
    pub shm_size: String,
    pub read_only: bool,
    pub hostname: String,
    pub binds: Vec<Bind>,
    /// (staging node, path inside) for every selected device node.
    pub devices: Vec<(PathBuf, PathBuf)>,
    pub private_network: bool,
    pub user_namespace: bool,
    pub user: Option<User>,
    pub exec: Vec<String>,
    pub working_directory: Option<PathBuf>,
    pub environment: Vec<(String, String)>,
    pub capabilities: CapsHashSet,
    pub no_new_privileges: bool,
    pub seccomp: Option<Vec<u8>>,
    pub init: bool,
    pub console: Option<PathBuf>,
    /// The container's own terminal (the pty's slave), and which of stdin, stdout and stderr
    /// it takes the place of (those that were the caller's terminal).
    pub terminal: Option<(std::os::fd::RawFd, Vec<i32>)>,
    /// `DriverLibraries=yes`: the host driver's files, and the scratch directory for them.
    pub driver: Option<(gpubox_devices::driver::DriverFiles, PathBuf)>,
    /// Paths in /proc to hide (other GPUs' driver entries).
    pub hidden: Vec<PathBuf>,
    /// `NUMA=yes`: CPU affinity and memory policy for the payload.
    pub numa: Option<crate::numa::Binding>,
    /// Stop once the file system is built, for the supervisor to run hooks.
    pub hooks_barrier: bool,
}

/// Exit codes for failures before the payload runs, as Podman uses them.
pub const SETUP_FAILED: i32 = 125;
pub const NOT_EXECUTABLE: i32 = 126;
pub const NOT_FOUND: i32 = 127;

/// A setup failure, with the exit code it maps to.
pub struct Failure(pub i32, pub anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(SETUP_FAILED, e.into())
    }
}

/// Entry point in the child. Never returns.
pub fn run(plan: &Plan, go: OwnedFd, errors: OwnedFd) -> ! {
    let mut errors = Some(File::from(errors));
    let Err(Failure(code, e)) = setup_and_exec(plan, go, &mut errors);
    if let Some(mut errors) = errors {
        let _ = errors.write_all(&ChildReport::Failed { code, message: format!("{e:#}") }.encode());
    }
    // SAFETY: _exit is always safe; it skips atexit handlers that belong to the parent.
    unsafe { libc::_exit(code) }
}

fn setup_and_exec(plan: &Plan, go: OwnedFd, errors: &mut Option<File>) -> Result<std::convert::Infallible, Failure> {
    // Dies with the supervisor from the first moment (a change of credentials clears this,
    // so it is set again once they are final). A supervisor killed before this line closed
    // `go`, and the read below ends the child.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    // Modes of what gpubox makes inside (mount points, the overlays' layers) and the payload's
    // own umask do not depend on the caller's (an admin's may be 077): Docker's 022.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // A session of its own, never the caller's terminal (terminal.rs says why); its own
    // terminal when there is one.
    nix::unistd::setsid().context("starting a session")?;
    if let Some((tty, replaces)) = &plan.terminal {
        let tty = *tty;
        // SAFETY: TIOCSCTTY takes an int argument (0: do not steal); tty is the pty's slave.
        if unsafe { libc::ioctl(tty, libc::TIOCSCTTY, 0) } < 0 {
            return Err(anyhow!(
                "making the container's terminal its controlling terminal: {}",
                std::io::Error::last_os_error()
            )
            .into());
        }
        for &fd in replaces {
            // SAFETY: dup2 onto 0–2 replaces the child's stdio; tty is the pty slave the
            // supervisor left open for it.
            if unsafe { libc::dup2(tty, fd) } < 0 {
                return Err(anyhow!("giving the container its terminal: {}", std::io::Error::last_os_error()).into());
            }
        }
    }
    // Nothing the caller had open reaches the payload: only stdin, stdout, stderr and the
    // two pipes to the supervisor (close-on-exec) stay.
    close_all_but(&[go.as_raw_fd(), errors.as_ref().map_or(-1, AsRawFd::as_raw_fd)]);
    // The start barrier: wait until the supervisor has mapped our ids and placed us.
    let mut go = File::from(go);
    let mut byte = [0u8; 1];
    if go.read(&mut byte)? != 1 {
        return Err(anyhow!("the supervisor went away during setup").into());
    }
    if plan.user_namespace {
        nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
            .context("becoming root in the user namespace")?;
        nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
            .context("becoming root in the user namespace")?;
    }
    nix::unistd::setgroups(&[]).context("clearing supplementary groups")?;
    nix::unistd::sethostname(&plan.hostname).context("setting the hostname")?;
    if plan.private_network {
        loopback_up().context("bringing up lo")?;
    }
    rootfs::build(&Layout {
        root_directory: plan.root_directory.as_deref(),
        root_mount: plan.root_mount.as_deref(),
        shm_size: &plan.shm_size,
        read_only: plan.read_only,
        binds: &plan.binds,
        devices: &plan.devices,
        private_network: plan.private_network,
        console: plan.console.clone(),
        driver: plan.driver.as_ref().map(|(files, scratch)| (files, scratch.as_path())),
        hidden: &plan.hidden,
    })?;
    // OCI's "created" state: the file system is in place, nothing of the payload runs yet.
    // CDI hooks (createRuntime, createContainer) run now, in the supervisor.
    if plan.hooks_barrier {
        errors.as_mut().expect("the error pipe is open").write_all(&ChildReport::Created.encode())?;
        if go.read(&mut byte)? != 1 {
            return Err(anyhow!("the supervisor went away during setup").into());
        }
    }

    let account = resolve_user(plan.user.as_ref())?;
    let env = environment(plan, &account);
    let program = find_program(&plan.exec[0], &env)?;
    let cwd = plan.working_directory.clone().unwrap_or_else(|| PathBuf::from("/"));
    nix::unistd::chdir(&cwd).map_err(|e| Failure(SETUP_FAILED, anyhow!("WorkingDirectory={}: {e}", cwd.display())))?;

    if let Some(binding) = &plan.numa {
        crate::numa::apply(binding).context("NUMA=yes: binding the payload's CPUs and memory")?;
    }
    confine(&plan.capabilities, plan.no_new_privileges, plan.seccomp.as_deref(), &account)?;

    // The exec barrier (with hooks, their barrier above was it): the supervisor has put
    // the device program in place while we built the file system.
    if !plan.hooks_barrier && go.read(&mut byte)? != 1 {
        return Err(anyhow!("the supervisor went away during setup").into());
    }
    // Credentials are final, so the parent-death signal sticks; then make sure the
    // supervisor did not die before it was set.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    let mut poll = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&go), nix::poll::PollFlags::POLLIN)];
    if nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0 {
        return Err(anyhow!("the supervisor went away during setup").into());
    }

    let argv: Vec<CString> = plan.exec.iter().map(|a| cstring(a)).collect::<Result<_>>()?;
    let envp: Vec<CString> = env.iter().map(|(k, v)| cstring(&format!("{k}={v}"))).collect::<Result<_>>()?;
    if plan.init {
        let errors = errors.take().expect("the error pipe is still open");
        init::run(&program, &argv, &envp, errors);
    }
    crate::signals::restore();
    let e = nix::unistd::execve(&program, &argv, &envp).unwrap_err();
    let code = if e == nix::errno::Errno::ENOENT { NOT_FOUND } else { NOT_EXECUTABLE };
    Err(Failure(code, anyhow!("cannot execute {}: {}", program.to_string_lossy(), e.desc())))
}

/// The payload's credentials, capability sets, no_new_privs and seccomp filter, in the order
/// the kernel needs them. Shared by the payload's start and `gpuboxctl exec` (enter.rs), so
/// that a process entering the container is confined exactly as the payload is.
pub fn confine(
    capabilities: &CapsHashSet,
    no_new_privileges: bool,
    seccomp: Option<&[u8]>,
    account: &Account,
) -> Result<()> {
    let load_seccomp = || match seccomp {
        Some(program) => sys::seccomp_load(program).context("loading the seccomp filter"),
        None => Ok(()),
    };
    // With no_new_privs off, a seccomp filter needs CAP_SYS_ADMIN (in our namespace), so it
    // goes in before the capabilities are dropped; otherwise as late as possible.
    if !no_new_privileges {
        load_seccomp()?;
    }
    capabilities::limit_bounding(capabilities).context("reducing the capability bounding set")?;
    // Empty for every user: a non-root payload keeps the inheritable set across setuid.
    caps::clear(None, caps::CapSet::Inheritable).context("clearing the inheritable capabilities")?;
    if account.uid != 0 {
        let groups: Vec<Gid> = account.groups.iter().map(|&g| Gid::from_raw(g)).collect();
        nix::unistd::setgroups(&groups).context("setting supplementary groups")?;
        let (u, g) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
        nix::unistd::setresgid(g, g, g).with_context(|| format!("switching to gid {g}"))?;
        nix::unistd::setresuid(u, u, u).with_context(|| format!("switching to uid {u}"))?;
    } else {
        capabilities::set_for_root(capabilities).context("setting capabilities")?;
    }
    if no_new_privileges {
        nix::sys::prctl::set_no_new_privs().context("setting no_new_privs")?;
        load_seccomp()?;
    }
    Ok(())
}

/// Closes every descriptor from 3 up but those in `keep`.
pub fn close_all_but(keep: &[std::os::fd::RawFd]) {
    let mut keep: Vec<u32> = keep.iter().filter(|&&fd| fd >= 3).map(|&fd| fd as u32).collect();
    keep.sort_unstable();
    let mut first = 3u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > first {
            // SAFETY: close_range only closes descriptors; none in this range is owned by
            // anything that will use it again (the child is single-threaded and keeps none).
            unsafe { libc::close_range(first, fd - 1, 0) };
        }
        first = fd.saturating_add(1);
    }
}

pub fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow!("'{s}' contains a NUL byte"))
}

/// Resolves `User=` in the container's own /etc/passwd and /etc/group (accounts.rs).
pub fn resolve_user(user: Option<&User>) -> Result<Account, Failure> {
    if user.is_none() {
        return crate::accounts::resolve(None, "", "").map_err(|e| Failure(SETUP_FAILED, anyhow!(e)));
    }
    let root = File::open("/").context("opening the container's root")?;
    let root = std::os::fd::AsFd::as_fd(&root);
    let read = |file| crate::accounts::read(root, file).map_err(|e| Failure(SETUP_FAILED, anyhow!(e)));
    let (passwd, group) = (read("/etc/passwd")?, read("/etc/group")?);
    crate::accounts::resolve(user, &passwd, &group).map_err(|e| Failure(SETUP_FAILED, anyhow!(e)))
}

fn environment(plan: &Plan, account: &Account) -> Vec<(String, String)> {
    payload_environment(&plan.environment, plan.console.is_some(), account)
}

/// The payload's environment: the standard variables, TERM when it has a terminal, then the
/// definition's (and its devices') in order.
pub fn payload_environment(own: &[(String, String)], terminal: bool, account: &Account) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_owned(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()),
        ("HOME".to_owned(), account.home.clone()),
        ("container".to_owned(), "gpubox".to_owned()),
    ];
    if terminal {
        if let Ok(term) = std::env::var("TERM") {
            env.push(("TERM".into(), term));
        }
    }
    for (k, v) in own {
        env.retain(|(n, _)| n != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// Finds the program as execvp would, but in the container's PATH.
pub fn find_program(name: &str, env: &[(String, String)]) -> Result<CString, Failure> {
    if name.contains('/') {
        return Ok(cstring(name)?);
    }
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok() && candidate.is_file() {
            return Ok(CString::new(candidate.as_os_str().as_bytes())?);
        }
    }
    Err(Failure(NOT_FOUND, anyhow!("cannot execute {name}: not found in PATH={path}")))
}

/// Brings up the loopback interface of a new network namespace.
fn loopback_up() -> Result<()> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in ifr into ifr.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        bail!("SIOCGIFFLAGS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the union member ifru_flags is what SIOCGIFFLAGS filled in.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS sets the flags in ifr on the interface named in it.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        bail!("SIOCSIFFLAGS: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `Init=yes`: a minimal PID 1 that starts the payload, forwards signals to it and reaps
/// every orphan, for payloads that are not written to be PID 1.
mod init {
    use super::*;
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

    /// The signals the supervisor forwards, which the init passes on to the payload.
    use crate::signals::FORWARDED;

    extern "C" fn noop(_: libc::c_int) {}

    pub fn run(program: &CString, argv: &[CString], envp: &[CString], mut errors: File) -> ! {
        // PID 1 only receives signals it has a handler for; the handler never runs, as the
        // signals stay blocked and are taken with sigwait.
        for &s in FORWARDED {
            // SAFETY: noop is async-signal-safe (it does nothing).
            let _ = unsafe { signal::signal(s, SigHandler::Handler(noop)) };
        }
        // Closes when the payload execs; only then may the supervisor's error pipe close.
        let Ok((exec_read, exec_write)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
            let _ = write!(errors, "{SETUP_FAILED}\ninit: cannot create a pipe");
            exit(SETUP_FAILED)
        };
        // SAFETY: single-threaded; the child only resets signals and execs.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                drop(exec_read);
                for &s in FORWARDED {
                    // SAFETY: restoring the default disposition is always safe.
                    let _ = unsafe { signal::signal(s, SigHandler::SigDfl) };
                }
                crate::signals::restore();
                let e = nix::unistd::execve(program, argv, envp).unwrap_err();
                let code = if e == nix::errno::Errno::ENOENT { NOT_FOUND } else { NOT_EXECUTABLE };
                let _ = write!(errors, "{code}\ncannot execute {}: {}", program.to_string_lossy(), e.desc());
                exit(code)
            }
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                drop(exec_write);
                let _ = File::from(exec_read).read(&mut [0u8; 1]);
                drop(errors);
                supervise(child)
            }
            Err(e) => {
                let _ = write!(errors, "{SETUP_FAILED}\ninit: fork: {e}");
                exit(SETUP_FAILED)
            }
        }
    }

    fn supervise(payload: Pid) -> ! {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        FORWARDED.iter().for_each(|&s| set.add(s));
        loop {
            match set.wait() {
                Ok(Signal::SIGCHLD) => loop {
                    match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::Exited(pid, code)) if pid == payload => exit(code),
                        Ok(WaitStatus::Signaled(pid, sig, _)) if pid == payload => exit(128 + sig as i32),
                        Ok(WaitStatus::StillAlive) | Err(_) => break,
                        Ok(_) => continue,
                    }
                },
                Ok(s) => {
                    let _ = signal::kill(payload, s);
                }
                Err(_) => {}
            }
        }
    }

    fn exit(code: i32) -> ! {
        // SAFETY: _exit is always safe; as PID 1 exiting, the kernel kills what is left.
        unsafe { libc::_exit(code) }
    }
}
