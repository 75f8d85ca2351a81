//! `gpuboxctl exec`'s second half: a command joins a running container with all of the
//! payload's confinement, its cgroup and namespaces and then [`child::confine`], taken from the
//! context the supervisor recorded at the start (`ExecContext`), not from the definition.
//! `nsenter` would leave it host root in every other way.
//!
//! This is `gpubox-supervisor enter FD`, exec'd by `gpuboxctl` so that it is single-threaded,
//! as joining a user namespace requires. The process here stays on the host's side (relay,
//! signals, exit status; not dumpable: it is host root and holds the terminal's master), and
//! its child joins and executes. With a terminal, it is a pseudo-terminal of the container's
//! own devpts, opened with every path resolved inside the container's root, and its slave taken
//! from the master (`TIOCGPTPEER`), never by a path the payload could replace.
//! See docs/architecture.md, "gpuboxctl exec: entering a running container".

use crate::accounts::Account;
use crate::child::{self, Failure, NOT_EXECUTABLE, NOT_FOUND, SETUP_FAILED};
use crate::in_root;
use crate::signals;
use crate::terminal::Terminal;
use anyhow::{anyhow, bail, Context, Result};
use gpubox_control::{ExecContext, ExecRequest};
use nix::sys::signal::{self, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Gid, Pid, Uid};
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// The request is a few kilobytes (a seccomp program is the largest part); more is not ours.
const REQUEST_LIMIT: u64 = 16 << 20;

/// Runs the request read from `fd` and returns the command's exit status (128+N for signal N,
/// 125–127 when it could not be started, as for the payload).
pub fn run(fd: RawFd) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("entering a container needs root");
    }
    // SAFETY: the descriptor was handed to us by gpuboxctl for this request alone; nothing
    // else in this process owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut text = String::new();
    file.by_ref().take(REQUEST_LIMIT).read_to_string(&mut text).context("reading the exec request")?;
    drop(file);
    let request: ExecRequest = serde_json::from_str(&text).context("parsing the exec request")?;
    let payload = Payload::open(&request.context)?;
    let user = request.user.as_ref().or(request.context.user.as_ref());
    let user = user.map(|u| u.parse::<gpubox_definition::User>().map_err(|e| anyhow!("--user {e}"))).transpose()?;
    let terminal = if request.terminal { Some(payload.terminal(request.context.owner)?) } else { None };
    let affinity = nix::sched::sched_getaffinity(Pid::from_raw(payload.pid)).ok();

    // Our child is born in the payload's pid namespace; this process stays outside it, and
    // returns to its own for what it starts later (threads cannot be started otherwise).
    let own_pid_namespace = std::fs::File::open("/proc/self/ns/pid").context("opening our pid namespace")?;
    nix::sched::setns(&payload.pidfd, nix::sched::CloneFlags::CLONE_NEWPID)
        .context("joining the container's pid namespace")?;
    let signals = SignalFd::with_flags(&signals::handled(), SfdFlags::SFD_CLOEXEC)?;
    if !signals::other_threads().is_empty() {
        bail!("cannot enter the container from a process with threads: {}", signals::other_threads().join(", "));
    }
    // SAFETY: this process is single-threaded (checked just above), so the child may do
    // anything; it only runs `enter_and_exec`, which execs or _exits.
    match unsafe { nix::unistd::fork() }.context("forking the command's process")? {
        ForkResult::Child => {
            drop(signals);
            let slave = terminal.as_ref().and_then(|t| t.slave.as_ref()).map(|s| s.as_raw_fd());
            let Err(Failure(code, e)) = enter_and_exec(&request, &payload, user.as_ref(), slave, affinity);
            eprintln!("gpuboxctl exec: {e:#}");
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            if let Err(e) = nix::sched::setns(&own_pid_namespace, nix::sched::CloneFlags::CLONE_NEWPID) {
                let _ = signal::kill(child, Signal::SIGKILL);
                return Err(e).context("returning to our pid namespace");
            }
            relay_and_wait(child, &signals, terminal)
        }
    }
}

/// The running payload, held by a pidfd (its pid cannot be reused under us from here).
struct Payload {
    pid: i32,
    pidfd: OwnedFd,
    namespaces: nix::sched::CloneFlags,
    cgroup: Option<PathBuf>,
}

impl Payload {
    fn open(context: &ExecContext) -> Result<Payload> {
        let pid = context.pid;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            bail!("container '{}' has ended (pid {pid}: {})", context.name, std::io::Error::last_os_error());
        }
        // SAFETY: fd is the new descriptor pidfd_open returned, owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // The pid was the payload's when the supervisor answered; still is if it started then.
        if start_time(pid).ok() != Some(context.start_time) {
            bail!("container '{}' has ended (pid {pid} is another process now)", context.name);
        }
        Ok(Payload { pid, pidfd, namespaces: differing_namespaces(pid)?, cgroup: context.cgroup.clone() })
    }

    /// A pseudo-terminal of the container's own devpts: the master for us, the slave for the
    /// command, owned (as the payload's terminal is) by the container's root.
    fn terminal(&self, owner: u32) -> Result<Terminal> {
        let root = std::fs::File::open(format!("/proc/{}/root", self.pid)).context("opening the container's root")?;
        let master = in_root::open(root.as_fd(), Path::new("/dev/pts/ptmx"), libc::O_RDWR | libc::O_NOCTTY)
            .context("opening /dev/pts/ptmx in the container")?;
        let stat = nix::sys::stat::fstat(&master)?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFCHR || stat.st_rdev != libc::makedev(5, 2) {
            bail!("/dev/pts/ptmx in the container is not the pty multiplexer");
        }
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads an int; TIOCGPTPEER returns a new descriptor or -1. Both act
        // on the master, which we hold open.
        let slave = unsafe {
            if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) < 0 {
                return Err(std::io::Error::last_os_error()).context("unlocking the container's terminal");
            }
            libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
        };
        if slave < 0 {
            return Err(std::io::Error::last_os_error()).context("opening the container's terminal");
        }
        // SAFETY: slave is the new descriptor TIOCGPTPEER returned, owned by nobody else.
        let slave = unsafe { OwnedFd::from_raw_fd(slave) };
        let mut number: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes the pty's number into the uint it is given.
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) };
        let path = PathBuf::from(format!("/dev/pts/{number}"));
        Terminal::relaying(master, slave, path, vec![0, 1, 2], owner)
    }
}

/// The namespaces the payload has and we do not (all of them for a container; without a user
/// namespace, `UserNamespace=host`, that one is the host's, and setns would refuse it).
fn differing_namespaces(pid: i32) -> Result<nix::sched::CloneFlags> {
    use nix::sched::CloneFlags as F;
    let mut flags = F::empty();
    for (name, flag) in [
        ("user", F::CLONE_NEWUSER),
        ("mnt", F::CLONE_NEWNS),
        ("net", F::CLONE_NEWNET),
        ("ipc", F::CLONE_NEWIPC),
        ("uts", F::CLONE_NEWUTS),
        ("cgroup", F::CLONE_NEWCGROUP),
    ] {
        let theirs = std::fs::metadata(format!("/proc/{pid}/ns/{name}"))
            .with_context(|| format!("the payload's {name} namespace"))?;
        let ours = std::fs::metadata(format!("/proc/self/ns/{name}"))?;
        use std::os::unix::fs::MetadataExt;
        if (theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()) {
            flags |= flag;
        }
    }
    Ok(flags)
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
pub fn start_time(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    rest.split_whitespace().nth(19).and_then(|f| f.parse().ok()).context("reading the process's start time")
}

/// In the child: join the payload's cgroup and namespaces, become what the payload is, exec.
fn enter_and_exec(
    request: &ExecRequest,
    payload: &Payload,
    user: Option<&gpubox_definition::User>,
    terminal: Option<RawFd>,
    affinity: Option<nix::sched::CpuSet>,
) -> Result<std::convert::Infallible, Failure> {
    let context = &request.context;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    if let Some(cgroup) = &payload.cgroup {
        if !cgroup.starts_with("/sys/fs/cgroup") {
            return Err(anyhow!("the payload's cgroup {} is not under /sys/fs/cgroup", cgroup.display()).into());
        }
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, "0").with_context(|| format!("joining the payload's cgroup {}", procs.display()))?;
    }
    if let Some(cpus) = affinity {
        nix::sched::sched_setaffinity(Pid::from_raw(0), &cpus).context("taking the payload's CPU affinity")?;
    }
    nix::sched::setns(&payload.pidfd, payload.namespaces).context("joining the container's namespaces")?;
    if context.user_namespace {
        let root = (Gid::from_raw(0), Uid::from_raw(0));
        nix::unistd::setresgid(root.0, root.0, root.0).context("becoming root in the user namespace")?;
        nix::unistd::setresuid(root.1, root.1, root.1).context("becoming root in the user namespace")?;
        nix::unistd::setgroups(&[]).context("clearing supplementary groups")?;
    }
    nix::unistd::setsid().context("starting a session")?;
    if let Some(tty) = terminal {
        // SAFETY: TIOCSCTTY takes an int (0: do not steal); dup2 onto 0–2 replaces our stdio
        // with the container's terminal, which stays open for the exec.
        unsafe {
            if libc::ioctl(tty, libc::TIOCSCTTY, 0) < 0 {
                return Err(anyhow!("taking the container's terminal: {}", std::io::Error::last_os_error()).into());
            }
            for fd in 0..3 {
                if libc::dup2(tty, fd) < 0 {
                    return Err(anyhow!("taking the container's terminal: {}", std::io::Error::last_os_error()).into());
                }
            }
        }
    }
    child::close_all_but(&[]);
    nix::unistd::chdir("/").context("entering the container's root")?;

    let account: Account = child::resolve_user(user)?;
    let mut own = context.environment.clone();
    for (k, v) in &request.environment {
        own.retain(|(n, _)| n != k);
        own.push((k.clone(), v.clone()));
    }
    let env = child::payload_environment(&own, terminal.is_some(), &account);
    let program = child::find_program(&request.command[0], &env)?;
    let cwd =
        request.working_directory.clone().or_else(|| context.working_directory.clone()).unwrap_or_else(|| "/".into());
    nix::unistd::chdir(&cwd).map_err(|e| Failure(SETUP_FAILED, anyhow!("--workdir {}: {e}", cwd.display())))?;

    let capabilities = context
        .capabilities
        .iter()
        .map(|c| c.parse::<caps::Capability>().map_err(|e| anyhow!("capability {c}: {e}")))
        .collect::<Result<caps::CapsHashSet>>()?;
    child::confine(&capabilities, context.no_new_privileges, context.seccomp.as_deref(), &account)?;
    // Credentials are final, so the parent-death signal sticks now.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;

    let argv: Vec<CString> = request.command.iter().map(|a| child::cstring(a)).collect::<Result<_>>()?;
    let envp: Vec<CString> = env.iter().map(|(k, v)| child::cstring(&format!("{k}={v}"))).collect::<Result<_>>()?;
    signals::restore();
    let e = nix::unistd::execve(&program, &argv, &envp).unwrap_err();
    let code = if e == nix::errno::Errno::ENOENT { NOT_FOUND } else { NOT_EXECUTABLE };
    Err(Failure(code, anyhow!("cannot execute {}: {}", program.to_string_lossy(), e.desc())))
}

/// On the host's side: relay the terminal, pass signals on, and return the command's status.
fn relay_and_wait(child: Pid, signals: &SignalFd, mut terminal: Option<Terminal>) -> Result<i32> {
    // Nothing in the container may trace or read this process (it holds the terminal's master
    // and is host root); it is not in their pid namespace either.
    let _ = nix::sys::prctl::set_dumpable(false);
    if let Some(t) = terminal.as_mut() {
        // The command has its end; ours must close for its end of file to reach us.
        t.slave = None;
        t.make_raw();
        t.start_output();
    }
    loop {
        let mut fds = vec![nix::poll::PollFd::new(signals.as_fd(), nix::poll::PollFlags::POLLIN)];
        let input: Vec<RawFd> =
            terminal.as_ref().map(|t| t.poll_fds().iter().map(|f| f.as_raw_fd()).collect()).unwrap_or_default();
        for &fd in &input {
            // SAFETY: the terminal's descriptors stay open while it lives, past this poll.
            fds.push(nix::poll::PollFd::new(
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                nix::poll::PollFlags::POLLIN,
            ));
        }
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let ready = |fd: &nix::poll::PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if let Some(t) = terminal.as_mut() {
            for (fd, raw) in fds[1..].iter().zip(&input) {
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
        match sig {
            Signal::SIGCHLD => match waitpid(child, Some(WaitPidFlag::WNOHANG))? {
                WaitStatus::Exited(_, code) => return Ok(finish(terminal, code)),
                WaitStatus::Signaled(_, sig, _) => return Ok(finish(terminal, 128 + sig as i32)),
                _ => {}
            },
            Signal::SIGWINCH => {
                if let Some(t) = &terminal {
                    t.resize();
                }
            }
            sig => {
                let _ = signal::kill(child, sig);
            }
        }
    }
}

/// Lets the terminal's output reach the caller before the status does.
fn finish(terminal: Option<Terminal>, code: i32) -> i32 {
    if let Some(mut t) = terminal {
        t.drain();
    }
    code
}
