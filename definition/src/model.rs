//! The typed definition: what each key means, its default, and how repeated and empty
//! assignments combine (systemd's rules: lists append, an empty value resets; a single-valued
//! key set twice in one file is a mistake, while a later drop-in overrides it).

use crate::image_ref::ImageRef;
use crate::selector::Selector;
use crate::syntax::Assignment;
use crate::words::{self, Specifiers};
use crate::Error;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A container definition, merged from its file and drop-ins.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub name: String,
    /// The main file, then the drop-ins in the order they were applied.
    pub sources: Vec<PathBuf>,
    pub container: Container,
    pub gpu: Gpu,
    /// `[Unit]` lines, passed to the unit as written (systemd expands their specifiers).
    pub unit: Vec<PassThrough>,
    /// `[Service]` lines, passed to the unit as written.
    pub service: Vec<PassThrough>,
    pub install: Install,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassThrough {
    pub key: String,
    pub value: String,
    /// Where it was set, for errors about it (systemd's own keys are checked by
    /// `gpuboxctl validate` against what the installed systemd knows).
    pub path: PathBuf,
    pub line: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Install {
    pub wanted_by: Vec<String>,
    pub required_by: Vec<String>,
    pub upheld_by: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    /// `None` (and no `Image=`): the host's `/`, read-only.
    pub root_directory: Option<PathBuf>,
    /// `Image=`: the root is the image's layers under a writable layer of the container's own.
    pub image: Option<ImageRef>,
    /// `Pull=`: when to fetch `Image=`.
    pub pull: Pull,
    /// `Ephemeral=`: the container's writable layer is thrown away at its stop (the default).
    pub ephemeral: bool,
    pub exec: Vec<String>,
    pub working_directory: Option<PathBuf>,
    pub environment: Vec<(String, String)>,
    pub user: Option<User>,
    pub hostname: String,
    pub user_namespace: UserNamespace,
    pub network: Network,
    pub read_only: bool,
    pub binds: Vec<Bind>,
    pub add_capabilities: Vec<String>,
    /// `ALL` stands for every capability.
    pub drop_capabilities: Vec<String>,
    pub seccomp: Seccomp,
    pub no_new_privileges: bool,
    pub init: bool,
    /// The size of the container's `/dev/shm`, as tmpfs's `size=` takes it (`8g`, `50%`).
    pub shm_size: String,
}

/// `/dev/shm`'s size without `ShmSize=`: what tmpfs itself defaults to, and the host's own
/// `/dev/shm` has, half the memory. Docker's and Podman's 64 MiB breaks PyTorch's data loaders
/// (their workers pass batches through shared memory); and the size is a limit, not a
/// reservation: pages are charged to the container's memory cgroup as they are written, so
/// `MemoryMax=` bounds them whatever this says.
pub const DEFAULT_SHM_SIZE: &str = "50%";

/// `Pull=`, as Podman's `--pull` and Quadlet's `Pull=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    /// Fetch the image when the store does not have it.
    Missing,
    /// Fetch it at every start (layers the store has are not fetched again).
    Always,
    /// Fetch it at every start, as `Always`, but start with the store's copy where the fetch
    /// fails (Podman's `newer`: a registry that cannot be reached does not stop a boot).
    Newer,
    /// Never fetch it: a start without it fails.
    Never,
}

impl Pull {
    pub fn word(self) -> &'static str {
        match self {
            Pull::Missing => "missing",
            Pull::Always => "always",
            Pull::Newer => "newer",
            Pull::Never => "never",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserNamespace {
    /// Container root is an unprivileged range of host ids.
    Private,
    /// No user namespace: container root is host root (with the bounding set still reduced).
    Host,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// A new network namespace with only loopback, up.
    None,
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seccomp {
    Default,
    Unconfined,
    /// An OCI/Docker JSON profile.
    Profile(PathBuf),
}

/// `User=`: a name looked up in the container's `/etc/passwd`, or numeric ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    Name(String),
    Id { uid: u32, gid: Option<u32> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub read_only: bool,
    /// `-SRC`: skip the bind when the source does not exist.
    pub optional: bool,
    /// `SRC:DST:idmap`: files keep their ids as seen from inside the user namespace (an
    /// idmapped mount), as Podman's `:idmap`.
    pub idmap: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gpu {
    pub devices: Vec<Selector>,
    /// A selector that matches nothing at start is not an error.
    pub optional: bool,
    pub hotplug: bool,
    pub driver_libraries: bool,
    /// `Count=`: take this many of the GPUs the selectors match (all GPUs without a selector),
    /// chosen at start among those no other container holds exclusively.
    pub count: Option<u32>,
    /// `Exclusive=` as written; [`Gpu::exclusive`] applies its default.
    pub exclusive_setting: Option<bool>,
    /// `AllocationTimeout=`: how long a start waits for enough free GPUs (`None`, the
    /// default: for ever, as a job queue waits; `0`: not at all).
    pub allocation_timeout: Option<std::time::Duration>,
    /// `NUMA=`: bind the container's CPUs and memory to its GPUs' NUMA nodes.
    pub numa: bool,
}

impl Gpu {
    /// Whether no other container may be given this container's GPUs while it runs: as
    /// written, else yes with `Count=` and no without.
    pub fn exclusive(&self) -> bool {
        self.exclusive_setting.unwrap_or(self.count.is_some())
    }
}

impl Container {
    fn new(name: &str) -> Self {
        Container {
            root_directory: None,
            image: None,
            pull: Pull::Missing,
            ephemeral: true,
            exec: Vec::new(),
            working_directory: None,
            environment: Vec::new(),
            user: None,
            hostname: default_hostname(name),
            user_namespace: UserNamespace::Private,
            network: Network::None,
            read_only: false,
            binds: Vec::new(),
            add_capabilities: Vec::new(),
            drop_capabilities: Vec::new(),
            seccomp: Seccomp::Default,
            no_new_privileges: true,
            init: false,
            shm_size: DEFAULT_SHM_SIZE.to_owned(),
        }
    }
}

/// `[Service]` keys that would break the supervisor's contract with systemd.
const MANAGED_SERVICE_KEYS: &[(&str, &str)] = &[
    ("ExecStart", "use [Container] Exec="),
    ("Type", "the supervisor notifies systemd itself"),
    ("Delegate", "the supervisor needs its delegated cgroup"),
    ("DevicePolicy", "gpubox grants devices through [GPU] Device="),
    ("DeviceAllow", "use [GPU] Device="),
    ("KillMode", "the supervisor stops its container itself"),
    ("NotifyAccess", "the supervisor notifies systemd itself"),
    ("User", "use [Container] User="),
    ("Group", "use [Container] User="),
    ("DynamicUser", "use [Container] UserNamespace="),
    ("RootDirectory", "use [Container] RootDirectory="),
    ("RootImage", "use [Container] Image="),
    ("PrivateUsers", "use [Container] UserNamespace="),
    ("PrivateDevices", "use [GPU] Device="),
    ("CapabilityBoundingSet", "the supervisor needs its capabilities; use [Container] AddCapability=/DropCapability="),
    ("RestrictNamespaces", "the supervisor creates the container's namespaces"),
    ("SystemCallFilter", "the supervisor needs mount and clone; use [Container] Seccomp="),
    ("ProtectControlGroups", "the supervisor writes its delegated cgroup"),
    ("PrivateMounts", "the supervisor manages the container's mounts"),
    ("PrivateNetwork", "the supervisor's reservations live in the host's network namespace; use [Container] Network="),
];

/// The definition and every error in it (an assignment in error is left out and the rest
/// applied), for `gpuboxctl validate`.
pub(crate) fn build_all(name: &str, files: &[(PathBuf, Vec<Assignment>)]) -> (Definition, Vec<Error>) {
    let mut errors = Vec::new();
    let specifiers = Specifiers { instance: name };
    let mut d = Definition {
        name: name.to_owned(),
        sources: files.iter().map(|(p, _)| p.clone()).collect(),
        container: Container::new(name),
        gpu: Gpu::default(),
        unit: Vec::new(),
        service: Vec::new(),
        install: Install::default(),
    };
    let mut exec_at: Option<(PathBuf, usize)> = None;
    // An Exec= in error says so itself; that the command is then missing would only repeat it.
    let mut exec_failed = false;

    for (path, assignments) in files {
        let mut seen = HashSet::new();
        for a in assignments {
            let k = Key { path, a, specifiers: &specifiers };
            if is_single_valued(&a.section, &a.key) && !seen.insert((a.section.as_str(), a.key.as_str())) {
                errors.push(
                    k.error("set more than once in this file (it takes one value; later drop-ins may override it)"),
                );
                continue;
            }
            if let Err(e) = apply(&mut d, &k) {
                errors.push(e);
                exec_failed |= (a.section.as_str(), a.key.as_str()) == ("Container", "Exec");
                continue;
            }
            if (a.section.as_str(), a.key.as_str()) == ("Container", "Exec") {
                exec_at = Some((path.clone(), a.line));
            }
        }
    }

    let first_file = || files.first().map(|(p, _)| p.clone()).unwrap_or_default();
    if d.container.image.is_some() && d.container.root_directory.is_some() {
        errors.push(Error::Definition {
            path: first_file(),
            message: "[Container] Image= and RootDirectory= do not go together: the root is one or the other".into(),
        });
    }
    // An image's own command (Entrypoint and Cmd) stands in for Exec=.
    if d.container.exec.is_empty() && !exec_failed && d.container.image.is_none() {
        let path = first_file();
        errors.push(match exec_at {
            Some((path, line)) => Error::Key {
                path,
                line,
                section: "Container".into(),
                key: "Exec".into(),
                message: "the command is empty".into(),
            },
            None => {
                Error::Definition { path, message: "[Container] Exec= is missing: say what the container runs".into() }
            }
        });
    }
    if d.gpu.count.is_some() && d.gpu.hotplug {
        errors.push(Error::Definition {
            path: first_file(),
            message: "[GPU] Count= and Hotplug=yes do not go together: a job keeps the GPUs it was given".into(),
        });
    }
    (d, errors)
}

/// How many values a key takes: one (a repeat in the same file is an error; a later drop-in
/// replaces it) or a list (each assignment adds; an empty one resets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    One,
    List,
}

/// gpubox's own keys, one line each, as systemd's nspawn-gperf.gperf lists nspawn's: what
/// `apply` understands, which keys take one value, and the "known keys" of an error all come
/// from here (a test checks that `apply` handles exactly these).
const KEYS: &[(&str, &str, Takes)] = &[
    ("Container", "RootDirectory", Takes::One),
    ("Container", "Image", Takes::One),
    ("Container", "Pull", Takes::One),
    ("Container", "Ephemeral", Takes::One),
    ("Container", "Exec", Takes::One),
    ("Container", "WorkingDirectory", Takes::One),
    ("Container", "Environment", Takes::List),
    ("Container", "User", Takes::One),
    ("Container", "Hostname", Takes::One),
    ("Container", "UserNamespace", Takes::One),
    ("Container", "Network", Takes::One),
    ("Container", "ReadOnly", Takes::One),
    ("Container", "Bind", Takes::List),
    ("Container", "BindReadOnly", Takes::List),
    ("Container", "AddCapability", Takes::List),
    ("Container", "DropCapability", Takes::List),
    ("Container", "Seccomp", Takes::One),
    ("Container", "NoNewPrivileges", Takes::One),
    ("Container", "Init", Takes::One),
    ("Container", "ShmSize", Takes::One),
    ("GPU", "Device", Takes::List),
    ("GPU", "Optional", Takes::One),
    ("GPU", "Hotplug", Takes::One),
    ("GPU", "DriverLibraries", Takes::One),
    ("GPU", "Count", Takes::One),
    ("GPU", "Exclusive", Takes::One),
    ("GPU", "AllocationTimeout", Takes::One),
    ("GPU", "NUMA", Takes::One),
    ("Install", "WantedBy", Takes::List),
    ("Install", "RequiredBy", Takes::List),
    ("Install", "UpheldBy", Takes::List),
];

fn is_single_valued(section: &str, key: &str) -> bool {
    KEYS.iter().any(|&(s, k, takes)| (s, k) == (section, key) && takes == Takes::One)
}

/// The keys of a section of gpubox's own, in the order the manual lists them.
fn known_keys(section: &str) -> Vec<&'static str> {
    KEYS.iter().filter(|(s, _, _)| *s == section).map(|(_, k, _)| *k).collect()
}

/// One assignment being applied, with what its errors need to say.
struct Key<'a> {
    path: &'a Path,
    a: &'a Assignment,
    specifiers: &'a Specifiers<'a>,
}

impl Key<'_> {
    fn error(&self, message: impl Into<String>) -> Error {
        Error::Key {
            path: self.path.to_owned(),
            line: self.a.line,
            section: self.a.section.clone(),
            key: self.a.key.clone(),
            message: message.into(),
        }
    }

    fn value(&self) -> &str {
        &self.a.value
    }

    /// The value as words, unquoted, with specifiers expanded.
    fn words(&self) -> Result<Vec<String>, Error> {
        let words = words::split(self.value()).map_err(|e| self.error(e))?;
        words.iter().map(|w| self.specifiers.expand(w).map_err(|e| self.error(e))).collect()
    }

    /// The value as exactly one word.
    fn word(&self) -> Result<String, Error> {
        match &self.words()?[..] {
            [w] => Ok(w.clone()),
            _ => Err(self.error(format!("expected one value, found '{}'", self.value()))),
        }
    }

    fn boolean(&self) -> Result<bool, Error> {
        match self.value().to_ascii_lowercase().as_str() {
            "1" | "yes" | "y" | "true" | "t" | "on" => Ok(true),
            "0" | "no" | "n" | "false" | "f" | "off" => Ok(false),
            _ => {
                Err(self
                    .error(format!("expected a boolean (yes/no, true/false, on/off, 1/0), found '{}'", self.value())))
            }
        }
    }

    fn pass_through(&self) -> PassThrough {
        PassThrough {
            key: self.a.key.clone(),
            value: self.a.value.clone(),
            path: self.path.to_owned(),
            line: self.a.line,
        }
    }

    fn absolute_path(&self, word: &str) -> Result<PathBuf, Error> {
        let p = Path::new(word);
        if !p.is_absolute() {
            return Err(self.error(format!("'{word}' is not an absolute path")));
        }
        if p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(self.error(format!("'{word}' contains '..'")));
        }
        Ok(p.to_owned())
    }

    fn choice<T: Copy>(&self, choices: &[(&str, T)]) -> Result<T, Error> {
        let v = self.value();
        choices.iter().find(|(name, _)| *name == v).map(|(_, t)| *t).ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            self.error(format!("expected one of {}, found '{v}'", names.join(", ")))
        })
    }
}

fn apply(d: &mut Definition, k: &Key) -> Result<(), Error> {
    let a = k.a;
    let empty = a.value.is_empty();
    let c = &mut d.container;
    match (a.section.as_str(), a.key.as_str()) {
        ("Container", "RootDirectory") => {
            c.root_directory = if empty { None } else { Some(k.absolute_path(&k.word()?)?) }
        }
        ("Container", "Image") => {
            c.image = if empty { None } else { Some(k.word()?.parse::<ImageRef>().map_err(|e| k.error(e))?) }
        }
        ("Container", "Pull") => {
            c.pull = if empty {
                Pull::Missing
            } else {
                k.choice(&[
                    ("missing", Pull::Missing),
                    ("always", Pull::Always),
                    ("newer", Pull::Newer),
                    ("never", Pull::Never),
                ])?
            }
        }
        ("Container", "Ephemeral") => c.ephemeral = empty || k.boolean()?,
        ("Container", "Exec") => c.exec = k.words()?,
        ("Container", "WorkingDirectory") => {
            c.working_directory = if empty { None } else { Some(k.absolute_path(&k.word()?)?) }
        }
        ("Container", "Environment") => {
            if empty {
                c.environment.clear();
            }
            for word in k.words()? {
                let (name, value) =
                    word.split_once('=').ok_or_else(|| k.error(format!("'{word}' is not NAME=VALUE")))?;
                if !is_env_name(name) {
                    return Err(k.error(format!("'{name}' is not a valid environment variable name")));
                }
                c.environment.retain(|(n, _)| n != name);
                c.environment.push((name.to_owned(), value.to_owned()));
            }
        }
        ("Container", "User") => c.user = if empty { None } else { Some(parse_user(k)?) },
        ("Container", "Hostname") => {
            let h = if empty { default_hostname(&d.name) } else { k.word()? };
            if !is_hostname(&h) {
                return Err(
                    k.error(format!("'{h}' is not a valid hostname (letters, digits, '-' and '.', at most 64)"))
                );
            }
            c.hostname = h;
        }
        ("Container", "UserNamespace") => {
            c.user_namespace = if empty {
                UserNamespace::Private
            } else {
                k.choice(&[("private", UserNamespace::Private), ("host", UserNamespace::Host)])?
            }
        }
        ("Container", "Network") => {
            c.network =
                if empty { Network::None } else { k.choice(&[("none", Network::None), ("host", Network::Host)])? }
        }
        ("Container", "ReadOnly") => c.read_only = !empty && k.boolean()?,
        ("Container", key @ ("Bind" | "BindReadOnly")) => {
            if empty {
                c.binds.retain(|b| b.read_only != (key == "BindReadOnly"));
            }
            for word in k.words()? {
                c.binds.push(parse_bind(k, &word, key == "BindReadOnly")?);
            }
        }
        ("Container", key @ ("AddCapability" | "DropCapability")) => {
            let list = if key == "AddCapability" { &mut c.add_capabilities } else { &mut c.drop_capabilities };
            if empty {
                list.clear();
            }
            for word in k.words()? {
                let cap = capability_name(&word);
                if cap == "CAP_ALL" && key == "DropCapability" {
                    list.push("ALL".into());
                } else if KNOWN_CAPABILITIES.contains(&cap.as_str()) {
                    list.push(cap);
                } else {
                    return Err(k.error(format!(
                        "unknown capability '{word}' (names as in capabilities(7), e.g. CAP_NET_ADMIN)"
                    )));
                }
            }
        }
        ("Container", "Seccomp") => {
            let word = if empty { String::new() } else { k.word()? };
            c.seccomp = match word.as_str() {
                "" | "default" => Seccomp::Default,
                "unconfined" => Seccomp::Unconfined,
                path if path.starts_with('/') => Seccomp::Profile(k.absolute_path(path)?),
                other => {
                    return Err(k.error(format!(
                        "expected 'default', 'unconfined' or an absolute path to a JSON profile, found '{other}'"
                    )))
                }
            }
        }
        ("Container", "NoNewPrivileges") => c.no_new_privileges = empty || k.boolean()?,
        ("Container", "Init") => c.init = !empty && k.boolean()?,
        ("Container", "ShmSize") => {
            c.shm_size =
                if empty { DEFAULT_SHM_SIZE.to_owned() } else { parse_shm_size(&k.word()?).map_err(|e| k.error(e))? }
        }
        ("GPU", "Device") => {
            if empty {
                d.gpu.devices.clear();
            }
            for word in k.words()? {
                let selector: Selector = word.parse().map_err(|e: String| k.error(e))?;
                if !d.gpu.devices.contains(&selector) {
                    d.gpu.devices.push(selector);
                }
            }
        }
        ("GPU", "Optional") => d.gpu.optional = !empty && k.boolean()?,
        ("GPU", "Hotplug") => d.gpu.hotplug = !empty && k.boolean()?,
        ("GPU", "DriverLibraries") => d.gpu.driver_libraries = !empty && k.boolean()?,
        ("GPU", "Count") => {
            d.gpu.count = if empty {
                None
            } else {
                match k.word()?.parse::<u32>() {
                    Ok(n) if (1..=1024).contains(&n) => Some(n),
                    _ => return Err(k.error(format!("expected a number of GPUs from 1 to 1024, found '{}'", a.value))),
                }
            }
        }
        ("GPU", "Exclusive") => d.gpu.exclusive_setting = if empty { None } else { Some(k.boolean()?) },
        ("GPU", "AllocationTimeout") => {
            // Empty resets to the default (infinity), as in systemd.
            d.gpu.allocation_timeout =
                if empty { None } else { crate::timespan::parse(&a.value).map_err(|e| k.error(e))? }
        }
        ("GPU", "NUMA") => d.gpu.numa = !empty && k.boolean()?,
        ("Unit", _) => d.unit.push(k.pass_through()),
        ("Service", key) => {
            if let Some((_, why)) = MANAGED_SERVICE_KEYS.iter().find(|(k, _)| *k == key) {
                return Err(k.error(format!("is managed by gpubox and cannot be set here: {why}")));
            }
            d.service.push(k.pass_through());
        }
        ("Install", key @ ("WantedBy" | "RequiredBy" | "UpheldBy")) => {
            let list = match key {
                "WantedBy" => &mut d.install.wanted_by,
                "RequiredBy" => &mut d.install.required_by,
                _ => &mut d.install.upheld_by,
            };
            if empty {
                list.clear();
            }
            for word in k.words()? {
                if !is_unit_name(&word) {
                    return Err(k.error(format!("'{word}' is not a unit name (e.g. multi-user.target)")));
                }
                if !list.contains(&word) {
                    list.push(word);
                }
            }
        }
        ("Container" | "GPU" | "Install", key) => {
            let known = known_keys(&a.section);
            let hint = crate::suggest::did_you_mean(key, known.iter().copied())
                .map(|s| format!("did you mean {s}=? "))
                .unwrap_or_default();
            return Err(k.error(format!("unknown key in [{}] ({hint}known: {})", a.section, known.join(", "))));
        }
        (section, _) => {
            return Err(Error::Syntax {
                path: k.path.to_owned(),
                line: a.line,
                message: format!(
                    "unknown section [{section}] (expected [Container], [GPU], [Unit], [Service] or [Install])"
                ),
            })
        }
    }
    Ok(())
}

/// `ShmSize=`: bytes, with a K, M, G or T suffix (1024-based, as systemd's sizes), or a
/// percentage of the host's memory; as tmpfs's `size=` option takes them.
pub fn parse_shm_size(v: &str) -> Result<String, String> {
    let bad = || format!("'{v}': expected a size such as 512M, 8G or 50% (of the host's memory)");
    if let Some(percent) = v.strip_suffix('%') {
        return match percent.parse::<u32>() {
            Ok(p) if (1..=100).contains(&p) => Ok(format!("{p}%")),
            _ => Err(bad()),
        };
    }
    let (number, unit) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&v[..i], Some(c.to_ascii_lowercase())),
        _ => (v, None),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    if n == 0 || !matches!(unit, None | Some('k' | 'm' | 'g' | 't')) {
        return Err(bad());
    }
    Ok(format!("{n}{}", unit.map(String::from).unwrap_or_default()))
}

fn parse_user(k: &Key) -> Result<User, Error> {
    k.word()?.parse().map_err(|e: String| k.error(e))
}

/// `User=`'s grammar, also for `gpuboxctl exec --user`: a user name, UID, or UID:GID.
impl std::str::FromStr for User {
    type Err = String;

    fn from_str(v: &str) -> Result<User, String> {
        let id = |s: &str| s.parse::<u32>().ok().filter(|&n| n != u32::MAX);
        let invalid = || format!("'{v}': expected a user name, UID, or UID:GID");
        if let Some((u, g)) = v.split_once(':') {
            return match (id(u), id(g)) {
                (Some(uid), Some(gid)) => Ok(User::Id { uid, gid: Some(gid) }),
                _ => Err(invalid()),
            };
        }
        if let Some(uid) = id(v) {
            return Ok(User::Id { uid, gid: None });
        }
        let valid = v.len() <= 32
            && v.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && v.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if valid {
            Ok(User::Name(v.to_owned()))
        } else {
            Err(invalid())
        }
    }
}

/// Writes `User=` back as it parses.
impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            User::Name(n) => f.write_str(n),
            User::Id { uid, gid: None } => write!(f, "{uid}"),
            User::Id { uid, gid: Some(gid) } => write!(f, "{uid}:{gid}"),
        }
    }
}

fn parse_bind(k: &Key, word: &str, read_only: bool) -> Result<Bind, Error> {
    let (optional, spec) = match word.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, word),
    };
    let mut parts = spec.splitn(3, ':');
    let source = parts.next().unwrap_or_default();
    let destination = parts.next().unwrap_or(source);
    let mut idmap = false;
    for option in parts.next().map(|o| o.split(',').collect::<Vec<_>>()).unwrap_or_default() {
        match option {
            "idmap" => idmap = true,
            other => {
                let expected = "expected SOURCE[:DESTINATION[:idmap]]";
                return Err(k.error(format!("'{word}': unknown bind option '{other}' ({expected})")));
            }
        }
    }
    Ok(Bind {
        source: k.absolute_path(source)?,
        destination: k.absolute_path(destination)?,
        read_only,
        optional,
        idmap,
    })
}

fn capability_name(word: &str) -> String {
    let upper = word.to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

/// capabilities(7), Linux 6.x.
pub const KNOWN_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The definition's name as a hostname: characters a hostname cannot hold become '-', and it
/// is cut to 64 characters (a name may be longer than a hostname).
fn default_hostname(name: &str) -> String {
    let h: String =
        name.chars().take(64).map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
    // Each dot-separated label must start and end with a letter or digit.
    let labels: Vec<&str> = h.split('.').map(|l| l.trim_matches('-')).filter(|l| !l.is_empty()).collect();
    let h = labels.join(".");
    if h.is_empty() {
        "gpubox".to_owned()
    } else {
        h
    }
}

fn is_env_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn is_unit_name(name: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        ".service",
        ".socket",
        ".device",
        ".mount",
        ".automount",
        ".swap",
        ".target",
        ".path",
        ".timer",
        ".slice",
        ".scope",
    ];
    SUFFIXES.iter().any(|s| name.len() > s.len() && name.ends_with(s))
        && name.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(text: &str) -> Vec<String> {
        let path = Path::new("/etc/gpubox/t.gpubox");
        let (assignments, errors) = crate::syntax::parse_all(path, text);
        assert!(errors.is_empty(), "{errors:?}");
        build_all("t", &[(path.to_owned(), assignments)]).1.iter().map(|e| e.to_string()).collect()
    }

    /// Every key of the table is one `apply` knows (an empty value resets it, never "unknown
    /// key"), and a key that takes one value is refused twice in a file.
    #[test]
    fn the_key_table_is_what_apply_knows() {
        for &(section, key, takes) in KEYS {
            let errors = errors_of(&format!("[Container]\nExec=/bin/true\n[{section}]\n{key}=\n{key}=\n"));
            assert!(!errors.iter().any(|e| e.contains("unknown key")), "[{section}] {key}: {errors:?}");
            let repeated = errors.iter().any(|e| e.contains("set more than once"));
            assert_eq!(repeated, takes == Takes::One, "[{section}] {key}: {errors:?}");
        }
        let errors = errors_of("[Container]\nExec=/bin/true\nFrobnicate=1\n");
        assert!(
            errors[0].contains("unknown key in [Container]")
                && errors[0].contains("RootDirectory, Image, Pull, Ephemeral, Exec,"),
            "{errors:?}"
        );
    }

    /// `Image=`: its reference checked where it is written, exclusive with `RootDirectory=`,
    /// and the image's own command standing in for `Exec=`.
    #[test]
    fn image_keys() {
        assert!(errors_of("[Container]\nImage=busybox\n").is_empty(), "no Exec= needed with an image");
        let e = errors_of("[Container]\nImage=busybox\nRootDirectory=/srv/root\n");
        assert!(e.iter().any(|e| e.contains("Image= and RootDirectory= do not go together")), "{e:?}");
        let e = errors_of("[Container]\nImage=Busybox\n");
        assert!(e[0].contains("t.gpubox:2") && e[0].contains("Image") && e[0].contains("lowercase"), "{e:?}");
        let e = errors_of("[Container]\nImage=busybox\nPull=sometimes\n");
        assert!(e[0].contains("expected one of missing, always, newer, never"), "{e:?}");
        assert!(errors_of("[Container]\nImage=busybox\nPull=newer\n").is_empty());
        let e = errors_of("[Container]\nExec=/bin/true\nEphemeral=perhaps\n");
        assert!(e[0].contains("boolean"), "{e:?}");
    }
}
