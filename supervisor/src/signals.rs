//! The signals the supervisor handles, and blocking them before anything can start a thread.
//!
//! A library may start threads of its own (NVIDIA's libnvidia-ml does, and is never unloaded).
//! A process-directed signal goes to any thread that does not block it, so if such a thread
//! started before the signals were blocked, it would take SIGCHLD and SIGTERM away from the
//! signalfd: a payload's exit would go unseen and SIGTERM would kill the supervisor without
//! its cleanup. Blocking them first thing in `main` makes every later thread inherit the mask.

use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};

/// Signals passed on to the payload (SIGTERM and SIGINT also start the stop timeout).
pub const FORWARDED: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Everything the supervisor takes from its signalfd: the forwarded signals and SIGCHLD.
pub fn handled() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    FORWARDED.iter().for_each(|&s| set.add(s));
    set
}

/// Blocks [`handled`] in the calling thread and every thread it starts later.
pub fn block() -> nix::Result<()> {
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None)
}

/// The payload starts with no signal blocked.
pub fn restore() {
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// The threads of this process, by name: the clone's child may only be made from a process
/// of one thread, as a thread holding a lock at the clone would leave the child waiting on
/// it for ever (the child allocates, and clone3 runs none of glibc's fork handlers).
pub fn other_threads() -> Vec<String> {
    let own = nix::unistd::gettid().as_raw().to_string();
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy() != own)
        .map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            format!("{} ({})", e.file_name().to_string_lossy(), comm.trim())
        })
        .collect()
}
