//! The host-wide GPU allocator: which running container holds which GPU, and how.
//!
//! Every container that holds a GPU holds a lock on it, `/run/gpubox/.locks/gpu-KEY`
//! (`gpubox_devices::allocation` names the key): shared for a GPU it may share, exclusive for
//! a GPU no one else may be given (`Exclusive=yes`, the default with `Count=`). Locks are
//! `flock`s of the supervisor's, so they are taken atomically, never outlive the supervisor
//! (a SIGKILLed one's GPUs are free at once), and only root can take them. Beside each lock a
//! holder file, `holders/KEY@NAME`, says who holds it and how, for errors and for
//! `gpuboxctl devices`; it is locked by its holder too, so a stale one is known as such.
//!
//! Starts that must wait for GPUs queue in start order (`queue/`, one locked entry per waiting
//! supervisor, named by its start time): only the first in the queue may take GPUs, so a job
//! started later never overtakes one started earlier.

use anyhow::{bail, Context, Result};
use gpubox_control::locks::{self, Lock};
use gpubox_devices::allocation::{self, Candidate};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A GPU held by this supervisor.
#[derive(Debug)]
pub struct Held {
    pub key: String,
    _lock: Lock,
    _holder: HolderFile,
}

/// Who holds a GPU, as its holder files say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub container: String,
    pub exclusive: bool,
}

fn holders_dir() -> std::io::Result<PathBuf> {
    locks::private_dir(".locks/holders")
}

/// Takes GPU `c` for container `name` if no other holds it in a conflicting way.
pub fn try_hold(name: &str, c: &Candidate, exclusive: bool) -> Result<Option<Held>> {
    let lock =
        locks::try_lock_mode(&format!("gpu-{}", c.key), exclusive).with_context(|| format!("locking {}", c.label))?;
    let Some(lock) = lock else { return Ok(None) };
    let holder = HolderFile::create(&c.key, name, exclusive)?;
    Ok(Some(Held { key: c.key.clone(), _lock: lock, _holder: holder }))
}

/// Every GPU of `candidates` for a container that names its GPUs (no `Count=`): all or an
/// error naming who holds the ones it cannot have. A lock held by no holder file is a waiting
/// job trying the free GPUs for a moment (it writes its holder file only for those it keeps),
/// or a holder on its way out: that is waited out, briefly.
pub fn hold_all(name: &str, candidates: &[Candidate], exclusive: bool) -> Result<Vec<Held>> {
    let mut held = Vec::new();
    for c in candidates {
        let mut tries = 0;
        loop {
            if let Some(h) = try_hold(name, c, exclusive)? {
                held.push(h);
                break;
            }
            let holders = holders_of(&c.key);
            tries += 1;
            if !holders.is_empty() || tries > 50 {
                bail!("{} is held {}", c.label, describe_holders(&holders));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(held)
}

/// A stop (SIGTERM or SIGINT, the signal's number) that came before the container started: while it
/// waited for GPUs or fetched its image.
#[derive(Debug, thiserror::Error)]
#[error("stopped by signal {0} while {1}")]
pub struct Stopped(pub i32, pub &'static str);

/// SIGTERM or SIGINT pending (they are blocked from the start, see signals.rs), taken.
pub fn stop_requested() -> Option<i32> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: set is a valid sigset_t, no siginfo is asked for, zero is a valid timespec;
    // sigtimedwait only takes a pending signal of the set, if any, without waiting.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &zero) };
    (sig > 0).then_some(sig)
}

/// `Count=`: `n` GPUs of `candidates`, chosen by topology among the free ones, waiting in the
/// queue up to `timeout` (`None`: for ever). `waiting` is told, every 30 s, what the start
/// waits for; a SIGTERM or SIGINT ends the wait ([`Stopped`]).
pub fn allocate(
    name: &str,
    candidates: &[Candidate],
    n: usize,
    exclusive: bool,
    timeout: Option<Duration>,
    mut waiting: impl FnMut(&str),
) -> Result<Vec<Held>> {
    if candidates.len() < n {
        bail!(
            "[GPU] Count={n}, but the selectors match only {} GPU{} on this host ({})",
            candidates.len(),
            if candidates.len() == 1 { "" } else { "s" },
            candidates.iter().map(|c| c.label.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    let started = Instant::now();
    // NVLink, which only NVML knows, for a job of several NVIDIA GPUs (from a helper process).
    let buses: Vec<String> = candidates.iter().filter_map(|c| c.nvidia_bus.clone()).collect();
    let nvml = if n >= 2 { crate::nvidia_topology::distances(&buses) } else { Default::default() };
    let distance = |a: &Candidate, b: &Candidate| match (&a.nvidia_bus, &b.nvidia_bus) {
        (Some(x), Some(y)) => nvml.get(&(x.clone(), y.clone())).copied().unwrap_or_else(|| allocation::distance(a, b)),
        _ => allocation::distance(a, b),
    };
    let keys: Vec<&str> = candidates.iter().map(|c| c.key.as_str()).collect();
    let place = QueuePlace::join(name, &keys)?;
    let mut told = None::<Instant>;
    loop {
        if place.is_first()? {
            // The locks of the free ones first, holder files only for those kept: a container
            // naming a GPU that this only tries sees no holder, and waits the moment out.
            let mut free: Vec<(Lock, &Candidate)> = Vec::new();
            for c in candidates {
                let lock = locks::try_lock_mode(&format!("gpu-{}", c.key), exclusive)
                    .with_context(|| format!("locking {}", c.label))?;
                if let Some(lock) = lock {
                    free.push((lock, c));
                }
            }
            let free_candidates: Vec<&Candidate> = free.iter().map(|(_, c)| *c).collect();
            if let Some(chosen) = allocation::choose_with(&free_candidates, n, &distance) {
                let mut taken = Vec::new();
                for (i, (lock, c)) in free.into_iter().enumerate() {
                    if chosen.contains(&i) {
                        let holder = HolderFile::create(&c.key, name, exclusive)?;
                        taken.push(Held { key: c.key.clone(), _lock: lock, _holder: holder });
                    }
                }
                return Ok(taken);
            }
        }
        let why = || {
            let busy: Vec<String> = candidates
                .iter()
                .filter_map(|c| {
                    let h = holders_of(&c.key);
                    (!h.is_empty()).then(|| format!("{} held {}", c.label, describe_holders(&h)))
                })
                .collect();
            let free = candidates.len() - busy.len();
            let ahead = if free >= n { "; earlier starts are ahead in the queue" } else { "" };
            format!(
                "{free} of {} free{ahead}{}{}",
                candidates.len(),
                if busy.is_empty() { "" } else { "; " },
                busy.join(", ")
            )
        };
        if let Some(sig) = stop_requested() {
            return Err(Stopped(sig, "waiting for GPUs").into());
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            bail!(
                "[GPU] Count={n}: not enough free GPUs within AllocationTimeout={:?} ({})",
                timeout.unwrap_or_default(),
                why()
            );
        }
        if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            waiting(&format!("waiting for {n} GPU{} ({})", if n == 1 { "" } else { "s" }, why()));
            told = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The live holders of GPU `key`.
pub fn holders_of(key: &str) -> Vec<Holder> {
    locks::holders(key).into_iter().map(|(container, exclusive)| Holder { container, exclusive }).collect()
}

fn describe_holders(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "by a container that is stopping".into();
    }
    let names: Vec<String> =
        holders.iter().map(|h| format!("{}{}", h.container, if h.exclusive { " (exclusive)" } else { "" })).collect();
    format!("by {}", names.join(", "))
}

/// `holders/KEY@NAME`, locked while held: "exclusive" or "shared".
#[derive(Debug)]
struct HolderFile {
    path: PathBuf,
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl HolderFile {
    fn create(key: &str, name: &str, exclusive: bool) -> Result<HolderFile> {
        use std::io::Write;
        let path = holders_dir()?.join(format!("{key}@{name}"));
        let mut file = locks::create_locked(&path)?;
        file.set_len(0)?;
        file.write_all(if exclusive { b"exclusive\n" } else { b"shared\n" })?;
        Ok(HolderFile { path, _file: file })
    }
}

impl Drop for HolderFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// This supervisor's place in the queue of starts waiting for GPUs. The file names the GPUs
/// it may be given, one key a line: a start waits only behind earlier ones that want some of
/// the same GPUs (a job for GPUs 0–3 does not wait behind one queued for GPUs 4–7).
struct QueuePlace {
    path: PathBuf,
    keys: Vec<String>,
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl QueuePlace {
    fn dir() -> std::io::Result<PathBuf> {
        locks::private_dir(".locks/queue")
    }

    /// Named by the supervisor's start (boot-time clock), so places sort in start order.
    fn join(name: &str, keys: &[&str]) -> Result<QueuePlace> {
        use std::io::Write;
        let started = process_start_ticks().unwrap_or(u64::MAX);
        let path = Self::dir()?.join(format!("{started:020}-{:010}-{name}", std::process::id()));
        let mut file = locks::create_locked(&path)?;
        file.write_all(format!("{}\n", keys.join("\n")).as_bytes())?;
        Ok(QueuePlace { path, keys: keys.iter().map(|k| k.to_string()).collect(), _file: file })
    }

    /// Whether no live place before this one wants any of the same GPUs (stale places are
    /// removed on the way; a place whose GPUs are not written yet counts as wanting them).
    fn is_first(&self) -> Result<bool> {
        let mut places: Vec<PathBuf> = std::fs::read_dir(Self::dir()?)?.flatten().map(|e| e.path()).collect();
        places.sort();
        for place in places {
            if place == self.path {
                return Ok(true);
            }
            match locks::is_locked(&place) {
                Some(false) => {
                    // Its supervisor is gone (a new place re-checks its file after locking it).
                    let _ = std::fs::remove_file(&place);
                }
                _ => {
                    let wants = std::fs::read_to_string(&place).unwrap_or_default();
                    let complete = wants.ends_with('\n');
                    if !complete || wants.lines().any(|k| self.keys.iter().any(|mine| mine == k)) {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// When this process started, in clock ticks since boot (`/proc/self/stat` field 22): the
/// order `systemctl start` started the supervisors in.
fn process_start_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    after_comm.split_whitespace().nth(19)?.parse().ok()
}
