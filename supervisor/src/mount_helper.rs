//! Device nodes and CDI mounts put into and taken out of a running container.
//!
//! A mount namespace can only be entered by a single-threaded process, and the supervisor
//! runs threads once the control socket is up, so one helper process per container does it:
//! `gpubox-supervisor mount-helper OWNER DIR`, with the container's mount namespace on fd 3,
//! started at the first change and kept for the container's life. It stages nodes on a tmpfs
//! in a private mount namespace of its own, so nothing is left on the host however it ends,
//! and moves detached copies (`open_tree`, `move_mount`) onto descriptors resolved inside the
//! container's root, never onto a path the payload could swap. Every answer must come within
//! 5 s, since a request holds the container's lock. Requests and answers are one JSON line
//! each ([`HelperRequest`], [`HelperAnswer`] in messages.rs). See docs/architecture.md,
//! "Attach and detach".

use crate::devices::Access;
use crate::in_root::{self, Kind};
use crate::messages::{decode_line, encode_line, HelperAnswer, HelperRequest};
use crate::sys;
use anyhow::{bail, Context, Result};
use gpubox_devices::Node;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{setfsgid, setfsuid, Gid, Uid};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// How long a request may take (they take about a millisecond).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The descriptor on which the helper gets the container's mount namespace.
const HELPER_NS_FD: i32 = 3;

/// The supervisor's end: one running helper for one container.
pub struct MountHelper {
    child: Child,
    requests: ChildStdin,
    answers: BufReader<ChildStdout>,
}

impl MountHelper {
    /// Starts the helper for the container whose mount namespace is `ns` and whose root is host
    /// id `owner`; `dir` is any directory, covered by the helper's staging tmpfs in its own
    /// namespace only.
    pub fn start(ns: BorrowedFd, owner: u32, dir: &Path) -> Result<MountHelper> {
        let ns = ns.as_raw_fd();
        let mut command = Command::new("/proc/self/exe");
        command.arg("mount-helper").arg(owner.to_string()).arg(dir).stdin(Stdio::piped()).stdout(Stdio::piped());
        // SAFETY: runs in the forked child before exec and only makes async-signal-safe calls.
        // dup2 leaves the new descriptor open across exec; when `ns` is fd 3 already, the
        // close-on-exec flag is cleared instead.
        unsafe {
            command.pre_exec(move || {
                let done =
                    if ns == HELPER_NS_FD { libc::fcntl(ns, libc::F_SETFD, 0) } else { libc::dup2(ns, HELPER_NS_FD) };
                if done < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().context("starting the mount helper")?;
        let requests = child.stdin.take().expect("piped stdin");
        let answers = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut helper = MountHelper { child, requests, answers };
        helper.answer().context("starting the mount helper")?;
        Ok(helper)
    }

    /// Mounts a node with `access` at the node's own path inside.
    pub fn attach(&mut self, node: &Node, access: Access) -> Result<()> {
        self.call(&HelperRequest::attach(node.major, node.minor, access, node.path.clone()))
    }

    /// Unmounts what is at `path` inside and removes the mount point.
    pub fn detach(&mut self, path: &Path) -> Result<()> {
        self.call(&HelperRequest::Detach { path: path.to_owned() })
    }

    /// Binds the host's `source` at `target` inside (recursively; read-only if asked).
    pub fn bind(&mut self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        self.call(&HelperRequest::Bind { source: source.to_owned(), target: target.to_owned(), read_only })
    }

    /// Unmounts a bind; its mount point goes only if the helper made it.
    pub fn unbind(&mut self, target: &Path) -> Result<()> {
        self.call(&HelperRequest::Unbind { target: target.to_owned() })
    }

    fn call(&mut self, request: &HelperRequest) -> Result<()> {
        self.requests.write_all(encode_line(request)?.as_bytes()).context("the mount helper is gone")?;
        self.answer()
    }

    fn answer(&mut self) -> Result<()> {
        // Every answer comes within the timeout, or the helper is stopped: a request must never
        // hold the container's lock (and with it status, attach and the supervisor's stop) for
        // ever, whatever the payload put in its way.
        if !self.answers.buffer().contains(&b'\n') {
            let fd = self.answers.get_ref().as_fd();
            let mut poll = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            let ready = nix::poll::poll(
                &mut poll,
                nix::poll::PollTimeout::try_from(ANSWER_TIMEOUT).unwrap_or(nix::poll::PollTimeout::MAX),
            );
            if !matches!(ready, Ok(n) if n > 0) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the mount helper did not answer within {ANSWER_TIMEOUT:?}; it was stopped");
            }
        }
        let mut line = String::new();
        if self.answers.read_line(&mut line).context("reading the mount helper's answer")? == 0 {
            bail!("the mount helper ended");
        }
        match decode_line(&line)? {
            HelperAnswer::Ok => Ok(()),
            HelperAnswer::Error { message } => bail!("{message}"),
        }
    }

    /// Whether the helper still runs (a dead one is replaced by the next change).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for MountHelper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The helper itself (`gpubox-supervisor mount-helper`): serves requests until its stdin
/// closes, which is also how it learns that the supervisor died (only the supervisor holds the
/// other end). Not a parent-death signal: that follows the thread that started the helper, and
/// the supervisor's worker threads come and go.
pub fn serve(owner: u32, dir: &Path) -> Result<()> {
    // SAFETY: the supervisor starts the helper with the container's mount namespace on this
    // descriptor (see `MountHelper::start`), which nothing else here owns.
    let container = unsafe { File::from_raw_fd(HELPER_NS_FD) };
    // Mount points it makes inside get the modes the child's get, whatever the caller's umask;
    // and none of the supervisor's supplementary groups goes inside with it.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    nix::unistd::setgroups(&[]).context("clearing supplementary groups")?;
    unshare(CloneFlags::CLONE_NEWNS).context("a private mount namespace")?;
    // A slave: host mounts made later (a driver's directory) still show here, for binds.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)?;
    mount(Some("gpubox-staging"), dir, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0700"))
        .with_context(|| format!("mounting the staging tmpfs on {}", dir.display()))?;
    let own = File::open("/proc/self/ns/mnt")?;
    let mut helper = Helper { container, own, owner, staging: dir.to_owned(), made: Vec::new() };
    let mut out = std::io::stdout().lock();
    out.write_all(encode_line(&HelperAnswer::Ok)?.as_bytes())?;
    out.flush()?;
    for request in std::io::stdin().lock().lines() {
        let result = decode_line(&request?).and_then(|request| helper.handle(request));
        // Between requests the helper is always back in its own namespace.
        setns(&helper.own, CloneFlags::CLONE_NEWNS)?;
        let answer = match result {
            Ok(()) => HelperAnswer::Ok,
            Err(e) => HelperAnswer::Error { message: format!("{e:#}") },
        };
        out.write_all(encode_line(&answer)?.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

struct Helper {
    container: File,
    own: File,
    /// Host id of the container's root: mount points inside are made as that id.
    owner: u32,
    staging: PathBuf,
    /// Mount points of binds that this helper made inside (and may remove again).
    made: Vec<PathBuf>,
}

impl Helper {
    fn handle(&mut self, request: HelperRequest) -> Result<()> {
        match request {
            HelperRequest::Attach { major, minor, uid, gid, mode, path } => {
                self.attach(major, minor, Access { uid, gid, mode }, &path)
            }
            HelperRequest::Detach { path } => self.detach(&path),
            HelperRequest::Bind { source, target, read_only } => self.bind(&source, &target, read_only),
            HelperRequest::Unbind { target } => self.unbind(&target),
        }
    }

    fn bind(&mut self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        setns(&self.own, CloneFlags::CLONE_NEWNS)?;
        let tree = sys::open_tree_clone_recursive(source).with_context(|| format!("cloning {}", source.display()))?;
        if read_only {
            sys::mount_setattr_fd(&tree, sys::MOUNT_ATTR_RDONLY)
                .with_context(|| format!("making {} read-only", source.display()))?;
        }
        let kind = if source.is_dir() { Kind::Directory } else { Kind::File };
        setns(&self.container, CloneFlags::CLONE_NEWNS).context("entering the container's mount namespace")?;
        // Inside the root, by descriptor: the payload controls every path in it.
        let (point, made) = self.as_container_root(|| {
            let root = File::open("/").context("opening the container's root")?;
            let existed = in_root::open(root.as_fd(), target, libc::O_PATH).is_ok();
            let point =
                in_root::mount_point(root.as_fd(), target, kind, if kind == Kind::Directory { 0o755 } else { 0o644 })
                    .with_context(|| format!("the mount point {} in the container", target.display()))?;
            Ok((point, !existed))
        })?;
        if let Err(e) = sys::move_mount_onto(&tree, &point) {
            if made {
                let _ = self.remove_inside(target);
            }
            return Err(e)
                .with_context(|| format!("mounting {} at {} in the container", source.display(), target.display()));
        }
        if made {
            self.made.push(target.to_owned());
        }
        Ok(())
    }

    fn unbind(&mut self, target: &Path) -> Result<()> {
        setns(&self.container, CloneFlags::CLONE_NEWNS).context("entering the container's mount namespace")?;
        self.unmount_inside(target)?;
        if let Some(i) = self.made.iter().position(|m| m == target) {
            self.made.remove(i);
            let _ = self.remove_inside(target);
        }
        Ok(())
    }

    fn attach(&self, major: u32, minor: u32, access: Access, path: &Path) -> Result<()> {
        setns(&self.own, CloneFlags::CLONE_NEWNS)?;
        let node = Node { path: path.to_owned(), major, minor };
        let source = crate::devices::stage_node(&self.staging, &node, access, self.owner)?;
        let tree = sys::open_tree_clone(&source).with_context(|| format!("cloning {}", source.display()))?;
        // setns leaves us at the namespace's root, which is the container's `/`.
        setns(&self.container, CloneFlags::CLONE_NEWNS).context("entering the container's mount namespace")?;
        // Inside the root, by descriptor: a FIFO or a link the payload put at the node's path
        // is refused or stays inside, and nothing here can block on it.
        let point = self.as_container_root(|| {
            let root = File::open("/").context("opening the container's root")?;
            in_root::mount_point(root.as_fd(), path, Kind::File, 0o644)
                .with_context(|| format!("the mount point {} in the container", path.display()))
        })?;
        sys::move_mount_onto(&tree, &point).with_context(|| format!("mounting {} in the container", path.display()))
    }

    fn detach(&self, path: &Path) -> Result<()> {
        setns(&self.container, CloneFlags::CLONE_NEWNS).context("entering the container's mount namespace")?;
        self.unmount_inside(path)?;
        let _ = self.remove_inside(path);
        setns(&self.own, CloneFlags::CLONE_NEWNS)?;
        let _ = fs::remove_file(self.staging_node(path));
        Ok(())
    }

    /// The directory that holds `path` inside, and `path`'s last component. The helper made
    /// that path itself, so no component may be a symlink now: one there means the payload
    /// moved a directory since, and whatever the path names then is not what was mounted
    /// (it could be one of gpubox's own masks in /proc).
    fn parent_inside(&self, path: &Path) -> Result<(OwnedFd, std::ffi::CString)> {
        let root = File::open("/").context("opening the container's root")?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        let dir = in_root::open_strict(root.as_fd(), parent, libc::O_PATH | libc::O_DIRECTORY)
            .with_context(|| format!("{} in the container (moved since it was attached?)", parent.display()))?;
        let name = path.file_name().with_context(|| format!("{} has no name", path.display()))?;
        Ok((dir, std::ffi::CString::new(name.as_encoded_bytes())?))
    }

    /// Unmounts what is at `path` inside, by its parent's descriptor (never through a link).
    fn unmount_inside(&self, path: &Path) -> Result<()> {
        let (dir, name) = match self.parent_inside(path) {
            Ok(found) => found,
            // Gone with its directory: nothing is mounted there any more.
            Err(e)
                if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        nix::unistd::fchdir(&dir).context("entering the mount point's directory")?;
        match umount2(name.as_c_str(), MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("unmounting {} in the container", path.display())),
        }
    }

    /// Removes a mount point inside, by its parent's descriptor and as the container's root.
    fn remove_inside(&self, path: &Path) -> Result<()> {
        let (dir, name) = self.parent_inside(path)?;
        self.as_container_root(|| {
            // SAFETY: dir is an open directory descriptor and name is NUL-terminated; unlinkat
            // only removes the entry, never follows it.
            let r = unsafe {
                let file = libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0);
                if file == 0 {
                    0
                } else {
                    libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR)
                }
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            Ok(())
        })
    }

    fn staging_node(&self, path: &Path) -> PathBuf {
        self.staging.join(crate::devices::staging_name(path))
    }

    /// The container's file systems belong to its user namespace, where host root's ids do not
    /// exist: files are made as the container's root. A non-zero fsuid also drops CAP_MKNOD
    /// and friends, so it is set only for this.
    fn as_container_root<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        setfsgid(Gid::from_raw(self.owner));
        setfsuid(Uid::from_raw(self.owner));
        let result = f();
        setfsuid(Uid::from_raw(0));
        setfsgid(Gid::from_raw(0));
        result
    }
}
