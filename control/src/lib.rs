//! The control protocol between `gpuboxctl` (and the udev rules) and a running supervisor:
//! D-Bus peer-to-peer over the unix socket `/run/gpubox/NAME/control`, which only root (or
//! the `gpubox` group) may use. There is no bus daemon: each supervisor serves its own socket.
//!
//! Interface `org.gpubox.Container1` at `/org/gpubox/Container`:
//! `Status() -> s`, `Attach(s selector) -> s`, `Detach(s selector) -> s`,
//! `Hotplug(s action, s devnode) -> s`, `ExecContext() -> s` (root only), and the signal
//! `Changed(s status)`. Replies are JSON documents of [`Status`] (of [`ExecContext`] for
//! `ExecContext`), so that `gpuboxctl --json` passes them on unchanged.

use serde::{Deserialize, Serialize};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

pub const INTERFACE: &str = "org.gpubox.Container1";
pub const PATH: &str = "/org/gpubox/Container";
pub const RUN_DIR: &str = "/run/gpubox";

pub mod locks;
pub mod run_dir;

pub fn socket_path(name: &str) -> PathBuf {
    PathBuf::from(RUN_DIR).join(name).join("control")
}

/// Where a running container is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    /// It was asked to stop: changes are refused from now on.
    Stopping,
}

/// How a container came by a device.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Origin {
    /// Selected by `[GPU] Device=` at the start.
    #[default]
    #[serde(rename = "start")]
    Start,
    /// Allocated by `[GPU] Count=`, the container's alone (`Exclusive=yes`) or shared.
    #[serde(rename = "allocated")]
    Allocated,
    #[serde(rename = "allocated, shared")]
    AllocatedShared,
    /// `gpuboxctl attach`.
    #[serde(rename = "hand")]
    Hand,
    /// A device that came while it ran (`Hotplug=yes`).
    #[serde(rename = "hotplug")]
    Hotplug,
}

/// A device event, as udev names its actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotplugAction {
    Add,
    Remove,
    Change,
    Bind,
    Unbind,
}

impl HotplugAction {
    pub const ALL: [HotplugAction; 5] =
        [HotplugAction::Add, HotplugAction::Remove, HotplugAction::Change, HotplugAction::Bind, HotplugAction::Unbind];

    /// Whether a device may have come (everything but a removal or an unbind).
    pub fn may_add(self) -> bool {
        !matches!(self, HotplugAction::Remove | HotplugAction::Unbind)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HotplugAction::Add => "add",
            HotplugAction::Remove => "remove",
            HotplugAction::Change => "change",
            HotplugAction::Bind => "bind",
            HotplugAction::Unbind => "unbind",
        }
    }
}

impl std::str::FromStr for HotplugAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        HotplugAction::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown device action '{s}' (add, remove, change, bind or unbind)"))
    }
}

macro_rules! display_as_json_string {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let json = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
                f.write_str(json.trim_matches('"'))
            }
        }
    )*};
}
display_as_json_string!(State, Origin);

/// A running container, as its supervisor reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub name: String,
    pub state: State,
    /// The payload's (or the init's) pid in the host's pid namespace.
    pub pid: i32,
    pub hotplug: bool,
    pub devices: Vec<Device>,
    /// With `Hotplug=yes`: the definition's selectors that match nothing yet, waited for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
}

/// A device the container holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Device {
    /// How it is named: the selector form that found it (`drm:card0`, `cdi:…`).
    pub name: String,
    pub nodes: Vec<PathBuf>,
    pub how: Origin,
    /// Paths inside where the device's CDI mounts are bound.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<PathBuf>,
}

/// What a process entering a running container (`gpuboxctl exec`) must take on to be confined
/// exactly as the payload is: the supervisor's own record of what it applied at the start, not
/// a reading of the definition, which may have changed since.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecContext {
    pub name: String,
    /// The payload's pid on the host, and its start time (field 22 of `/proc/PID/stat`), which
    /// tells a reused pid from the payload.
    pub pid: i32,
    pub start_time: u64,
    /// The payload's cgroup directory (under /sys/fs/cgroup), when it has one of its own.
    pub cgroup: Option<PathBuf>,
    pub user_namespace: bool,
    /// The host id of the container's root (0 without a user namespace).
    pub owner: u32,
    /// `User=` as written (a name, UID or UID:GID); root without it.
    pub user: Option<String>,
    /// The payload's environment beyond PATH, HOME and `container`, in order.
    pub environment: Vec<(String, String)>,
    pub working_directory: Option<PathBuf>,
    /// Capability names (`CAP_CHOWN`, …): the bounding set, and root's other sets.
    pub capabilities: Vec<String>,
    pub no_new_privileges: bool,
    /// The compiled classic BPF program the payload runs under.
    pub seccomp: Option<Vec<u8>>,
}

/// A command to run in a running container: its context and the caller's choices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecRequest {
    pub context: ExecContext,
    pub command: Vec<String>,
    /// A pseudo-terminal of the container's own, relayed to the caller's.
    pub terminal: bool,
    /// In place of the context's user, environment (added to it) and working directory.
    pub user: Option<String>,
    pub environment: Vec<(String, String)>,
    pub working_directory: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container '{0}' is not running (no control socket at {1})")]
    NotRunning(String, PathBuf),
    #[error("{0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("{0}")]
    Call(String),
    #[error("unexpected reply: {0}")]
    Reply(#[from] serde_json::Error),
}

/// A connection to one supervisor.
pub struct Client {
    conn: zbus::blocking::Connection,
}

impl Client {
    pub fn connect(name: &str) -> Result<Client, Error> {
        let path = socket_path(name);
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(Error::NotRunning(name.to_owned(), path))
            }
            Err(e) => return Err(Error::Connect(path, e)),
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| Error::Connect(path.clone(), e))?;
        let conn = zbus::blocking::connection::Builder::async_io_unix_stream(stream)
            .p2p()
            .build()
            .map_err(|e| Error::Call(format!("{}: {e}", path.display())))?;
        Ok(Client { conn })
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        args: &(impl Serialize + zbus::zvariant::DynamicType),
    ) -> Result<T, Error> {
        let reply = self.conn.call_method(None::<&str>, PATH, Some(INTERFACE), method, args).map_err(|e| {
            Error::Call(match e {
                zbus::Error::MethodError(_, Some(text), _) => text,
                other => other.to_string(),
            })
        })?;
        let json: String = reply.body().deserialize().map_err(|e| Error::Call(e.to_string()))?;
        Ok(serde_json::from_str(&json)?)
    }

    pub fn status(&self) -> Result<Status, Error> {
        self.call("Status", &())
    }

    pub fn attach(&self, selector: &str) -> Result<Status, Error> {
        self.call("Attach", &(selector,))
    }

    pub fn detach(&self, selector: &str) -> Result<Status, Error> {
        self.call("Detach", &(selector,))
    }

    pub fn hotplug(&self, action: &str, devnode: &str) -> Result<Status, Error> {
        self.call("Hotplug", &(action, devnode))
    }

    /// What `gpuboxctl exec` needs to confine a process as the payload is (root only).
    pub fn exec_context(&self) -> Result<ExecContext, Error> {
        self.call("ExecContext", &())
    }

    /// The container's `Changed` signals from now on, each with its new status, as they come;
    /// the iterator blocks, and ends when the connection does.
    pub fn changes(&self) -> impl Iterator<Item = Status> + '_ {
        zbus::blocking::MessageIterator::from(&self.conn).map_while(Result::ok).filter_map(|m| {
            let header = m.header();
            let signal = header.message_type() == zbus::message::Type::Signal
                && header.member().is_some_and(|n| n.as_str() == "Changed");
            let json: String = if signal { m.body().deserialize().ok()? } else { return None };
            serde_json::from_str(&json).ok()
        })
    }
}

/// Names of the containers whose supervisors have a control socket.
pub fn running() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("control").exists())
        // A socket left by a SIGKILLed supervisor is not a running container (root can tell).
        .filter(|e| locks::held(&e.file_name().to_string_lossy()) != Some(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod wire {
    use super::*;

    /// The enums are the same words on the wire as the strings they replaced, so scripts that
    /// read `--json` see no change; and they read back.
    #[test]
    fn states_origins_and_actions_keep_their_words() {
        for (origin, word) in [
            (Origin::Start, "start"),
            (Origin::Allocated, "allocated"),
            (Origin::AllocatedShared, "allocated, shared"),
            (Origin::Hand, "hand"),
            (Origin::Hotplug, "hotplug"),
        ] {
            assert_eq!(serde_json::to_string(&origin).unwrap(), format!("\"{word}\""));
            assert_eq!(origin.to_string(), word);
            assert_eq!(serde_json::from_str::<Origin>(&format!("\"{word}\"")).unwrap(), origin);
        }
        assert_eq!(State::Stopping.to_string(), "stopping");
        assert_eq!(serde_json::from_str::<State>("\"running\"").unwrap(), State::Running);
        for action in HotplugAction::ALL {
            assert_eq!(action.as_str().parse::<HotplugAction>().unwrap(), action);
        }
        assert!("frob".parse::<HotplugAction>().is_err());
        assert!(HotplugAction::Change.may_add() && !HotplugAction::Unbind.may_add());
    }
}
