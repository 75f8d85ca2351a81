//! The control socket, `/run/gpubox/NAME/control`: D-Bus peer-to-peer, one connection per
//! client, served on threads once the payload runs. Only root, or members of the `gpubox`
//! group when it exists, may connect: the socket's mode says so, and each peer's credentials
//! are checked again on accept.

use crate::live::{Live, Shared};
use crate::log;
use crate::peers::{self, announce};
use anyhow::{Context, Result};
use gpubox_control::{socket_path, HotplugAction, PATH};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};

struct Container {
    live: Shared,
    /// The connected client's uid: some methods are root's alone.
    peer_uid: u32,
}

fn fail(e: anyhow::Error) -> zbus::fdo::Error {
    zbus::fdo::Error::Failed(format!("{e:#}"))
}

impl Container {
    /// Runs `change` off the D-Bus executor (it blocks: helpers, systemd calls), then tells
    /// every connected client if anything changed.
    async fn change(&self, change: impl FnOnce(&mut Live) -> Result<()> + Send + 'static) -> zbus::fdo::Result<String> {
        let live = self.live.clone();
        let status = blocking::unblock(move || {
            let mut live = live.lock().expect("live state lock");
            let before = live.status();
            let result = change(&mut live);
            // A change that failed half-way may have changed something too.
            let status = live.status();
            if status != before {
                announce(&status);
            }
            result.map(|_| status)
        })
        .await
        .map_err(fail)?;
        serde_json::to_string(&status).map_err(|e| fail(e.into()))
    }
}

#[zbus::interface(name = "org.gpubox.Container1")]
impl Container {
    async fn status(&self) -> zbus::fdo::Result<String> {
        let status = self.live.lock().expect("live state lock").status();
        serde_json::to_string(&status).map_err(|e| fail(e.into()))
    }

    /// What `gpuboxctl exec` needs to confine a process as the payload is. Root's alone: it
    /// only serves to enter the container, which root alone may do, and it holds the
    /// payload's environment, where secrets live.
    async fn exec_context(&self) -> zbus::fdo::Result<String> {
        if self.peer_uid != 0 {
            return Err(zbus::fdo::Error::AccessDenied(format!(
                "entering a container needs root (the caller is uid {})",
                self.peer_uid
            )));
        }
        let context = self.live.lock().expect("live state lock").exec_context.clone();
        serde_json::to_string(&context).map_err(|e| fail(e.into()))
    }

    async fn attach(&self, selector: String) -> zbus::fdo::Result<String> {
        let status = self.change(move |live| live.attach(&selector, gpubox_control::Origin::Hand)).await?;
        // A device attached by hand is detached when it leaves the host.
        crate::watch::follow(&self.live);
        Ok(status)
    }

    async fn detach(&self, selector: String) -> zbus::fdo::Result<String> {
        self.change(move |live| live.detach(&selector)).await
    }

    /// `devnode` is for the log; the supervisor rediscovers rather than trusting one event.
    /// Like udev's own events, anything but a removal also brings host node modes over.
    async fn hotplug(&self, action: String, devnode: String) -> zbus::fdo::Result<String> {
        let _ = devnode;
        let action: HotplugAction = action.parse().map_err(|e: String| zbus::fdo::Error::InvalidArgs(e))?;
        self.change(move |live| {
            live.hotplug(action)?;
            if action.may_add() {
                live.follow_host_modes();
            }
            Ok(())
        })
        .await
    }
}

/// The bound socket. The supervisor's main loop polls it beside its signals and gives each
/// client a thread of its own: a container nobody talks to has no thread for this (a thread
/// would also cost every container's exit, which must wait for it).
pub struct Listener {
    listener: UnixListener,
    group: Option<nix::unistd::Gid>,
}

/// Binds the socket (in the runtime directory, which exists by now).
pub fn bind(name: &str) -> Result<Listener> {
    let path = socket_path(name);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    listener.set_nonblocking(true)?;
    let group = gpubox_group();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(if group.is_some() { 0o660 } else { 0o600 }))?;
    if let Some(gid) = group {
        nix::unistd::chown(&path, None, Some(gid))?;
    }
    Ok(Listener { listener, group })
}

impl Listener {
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    /// Accepts the clients that are waiting, each served on a thread of its own, at most
    /// [`MAX_PEERS`] at once: idle connections cannot pile up threads without end.
    pub fn accept(&self, live: &Shared) {
        while let Ok((stream, _)) = self.listener.accept() {
            if !allowed(&stream, self.group) {
                log::warn("refused a control connection from a peer that is not root");
                continue;
            }
            let Some(slot) = PeerSlot::take() else {
                log::warn(&format!("refused a control connection: {MAX_PEERS} are open"));
                continue;
            };
            let live = live.clone();
            let _ = std::thread::Builder::new().name("control-peer".into()).spawn(move || {
                let _slot = slot;
                if let Err(e) = serve_peer(stream, live) {
                    log::warn(&format!("control connection: {e:#}"));
                }
            });
        }
    }
}

/// More than any real use (gpuboxctl opens one per command, udev one per event).
pub const MAX_PEERS: usize = 64;

/// One of the [`MAX_PEERS`] connections; given back when dropped.
struct PeerSlot;

static OPEN_PEERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl PeerSlot {
    fn take() -> Option<PeerSlot> {
        use std::sync::atomic::Ordering;
        OPEN_PEERS.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_PEERS).then_some(n + 1)).ok()?;
        Some(PeerSlot)
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        OPEN_PEERS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The `gpubox` group from the host's /etc/group itself: an NSS lookup would load every module
/// that nsswitch.conf names, on the start path of every container.
fn gpubox_group() -> Option<nix::unistd::Gid> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    crate::accounts::group_id(&groups, "gpubox").map(nix::unistd::Gid::from_raw)
}

fn allowed(stream: &UnixStream, group: Option<nix::unistd::Gid>) -> bool {
    let Ok(cred) = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials) else {
        return false;
    };
    let Some(group) = group.map(|g| g.as_raw()) else { return cred.uid() == 0 };
    // The peer's supplementary groups count too.
    let groups = std::fs::read_to_string(format!("/proc/{}/status", cred.pid())).unwrap_or_default();
    let member = groups
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|id| id.parse() == Ok(group)));
    cred.uid() == 0 || cred.gid() == group || member
}

fn serve_peer(stream: UnixStream, live: Shared) -> Result<()> {
    let peer_uid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?.uid();
    let guid = zbus::Guid::generate();
    let conn = zbus::blocking::connection::Builder::async_io_unix_stream(stream)
        .server(guid)?
        .p2p()
        .serve_at(PATH, Container { live, peer_uid })?
        .build()?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    peers::add(id, conn.clone());
    // Wait for the client to go away, then forget it.
    for message in zbus::blocking::MessageIterator::from(&conn) {
        if message.is_err() {
            break;
        }
    }
    peers::remove(id);
    Ok(())
}
