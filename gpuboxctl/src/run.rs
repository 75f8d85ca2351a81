//! `gpuboxctl run`: a one-off container, like `systemd-run --wait --pipe`.
//!
//! The options become a definition file `/run/gpubox/NAME.gpubox`, checked by the definition
//! crate before anything starts. Where systemd is PID 1, the supervisor runs it as the transient
//! unit `NAME.service`, with our stdin/stdout/stderr, and we wait for the unit to end; elsewhere
//! the supervisor runs as our child. Either way the file is removed afterwards and we exit with
//! the payload's status (128+N if it was killed by signal N), 125 if the container could not be
//! started, 2 for bad usage (clap).

use anyhow::{bail, Context, Result};
use gpubox_definition::{SearchPath, Sources};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

/// Where the temporary definition goes: a search path, so that `status`, `attach` and hotplug
/// find the container by name like any other.
const RUN_DIR: &str = "/run/gpubox";
/// The container could not be started (as the supervisor and `podman run` use it).
const CANNOT_START: u8 = 125;

/// The options, in Docker's and Podman's spellings where they have one, each written into the
/// definition as the key it names (gpubox.gpubox(5)). An option gpuboxctl does not know is an
/// error before the command, never the command itself.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A GPU to give the container (repeatable; [GPU] Device=): all, nvidia:INDEX, nvidia:UUID,
    /// pci:DOMAIN:BUS:DEV.FN, drm:card1, vendor:10de, cdi:VENDOR/CLASS=NAME.
    #[arg(long = "gpu", value_name = "SELECTOR", add = crate::complete::selectors(), help_heading = "GPUs")]
    pub gpus: Vec<String>,
    /// Docker's spelling: all, a count N of free GPUs (Count=N), or "device=0,1" (NVIDIA
    /// indexes or UUIDs).
    #[arg(long = "gpus", value_name = "all|N|device=LIST", value_parser = docker_gpus, help_heading = "GPUs")]
    pub docker_gpus: Option<DockerGpus>,
    /// The host's NVIDIA driver libraries and tools in the container (DriverLibraries=yes).
    #[arg(long, help_heading = "GPUs")]
    pub driver_libraries: bool,
    /// Start even when a GPU is missing (Optional=yes).
    #[arg(long = "gpu-optional", help_heading = "GPUs")]
    pub gpu_optional: bool,
    /// Follow GPUs that come and go while it runs (Hotplug=yes).
    #[arg(long, help_heading = "GPUs")]
    pub hotplug: bool,
    /// GPUs allocated by count are this container's alone (Exclusive=yes).
    #[arg(long, help_heading = "GPUs")]
    pub exclusive: bool,
    /// How long to wait for free GPUs (AllocationTimeout=, e.g. 10min, infinity).
    #[arg(long, value_name = "TIMESPAN", value_parser = timespan, help_heading = "GPUs")]
    pub allocation_timeout: Option<String>,
    /// Bind the command to its GPUs' NUMA node (NUMA=yes).
    #[arg(long, help_heading = "GPUs")]
    pub numa: bool,

    /// The container's root directory (RootDirectory=; default: the host's / read-only).
    #[arg(long, visible_alias = "rootfs", value_name = "DIR", conflicts_with = "image")]
    pub root: Option<PathBuf>,
    /// An image as the root (Image=: NAME[:TAG], docker://…, oci:DIR[:TAG], oci-archive:FILE[:TAG],
    /// docker-archive:FILE[:NAME:TAG]); without a COMMAND, the image's own runs.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// When to fetch the image (Pull=): missing (the default), always, newer, never.
    #[arg(long, value_name = "WHEN", value_parser = ["missing", "always", "newer", "never"], requires = "image")]
    pub pull: Option<String>,
    /// The root read-only (ReadOnly=yes).
    #[arg(long)]
    pub read_only: bool,
    /// Network namespace: none (the default, a private one with loopback only) or host.
    #[arg(long, visible_alias = "net", value_name = "MODE", value_parser = ["host", "none"])]
    pub network: Option<String>,
    /// The container's hostname (Hostname=).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Bind a host path into the container (repeatable; Bind=): [-]SRC[:DST].
    #[arg(long = "bind", value_name = "SRC[:DST]")]
    pub binds: Vec<String>,
    /// Docker's spelling of a bind (repeatable): SRC[:DST[:OPTIONS]], OPTIONS a comma-separated
    /// list of ro, rw and idmap (files keep their ids as seen from inside, Podman's :idmap).
    #[arg(short = 'v', long = "volume", value_name = "SRC[:DST[:ro,idmap]]")]
    pub volumes: Vec<String>,
    /// The size of /dev/shm (ShmSize=): 512M, 8G, 50% of the host's memory (the default).
    #[arg(long, value_name = "SIZE", value_parser = gpubox_definition::parse_shm_size)]
    pub shm_size: Option<String>,
    /// Set an environment variable (repeatable); NAME alone passes on this environment's value.
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]", value_parser = env_assignment)]
    pub env: Vec<String>,
    /// The working directory inside (WorkingDirectory=).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// The user the command runs as inside: a name, UID or UID:GID.
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,
    /// The user namespace: private (the default, an unprivileged id range) or host.
    #[arg(long, value_name = "MODE", value_parser = ["private", "host"])]
    pub userns: Option<String>,
    /// A minimal init as pid 1 that reaps zombies and passes signals on (Init=yes).
    #[arg(long)]
    pub init: bool,
    /// Add a capability to the default set (repeatable; AddCapability=).
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a capability, or ALL (repeatable; DropCapability=).
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// The seccomp filter: default, unconfined, or an absolute path to an OCI JSON profile.
    #[arg(long, value_name = "PROFILE")]
    pub seccomp: Option<String>,
    /// Docker's spelling: seccomp=PROFILE, no-new-privileges[=true|false] (repeatable).
    #[arg(long = "security-opt", value_name = "OPTION", value_parser = security_opt)]
    pub security_opts: Vec<(String, String)>,
    /// Name of the container and its unit NAME.service (default: gpu-run-XXXXXXXX).
    #[arg(long, value_parser = valid_name)]
    pub name: Option<String>,
    /// Accepted for Docker's habits: the container always gets a terminal of its own when
    /// run from one, and stdin is always passed on.
    #[arg(short = 't', long = "tty", hide = true)]
    pub tty: bool,
    #[arg(short = 'i', long = "interactive", hide = true)]
    pub interactive: bool,
    /// Accepted for Docker's habits: a one-off container is always removed when it ends.
    #[arg(long = "rm", hide = true)]
    pub rm: bool,
    /// The command and its arguments, passed on exactly (everything from the first word that
    /// is not an option; `--` before a command that starts with `-`).
    #[arg(required_unless_present = "image", trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `--gpus` as Docker takes it, as `[GPU]` lines.
#[derive(Debug, Clone)]
pub struct DockerGpus(Vec<String>);

fn docker_gpus(value: &str) -> Result<DockerGpus, String> {
    docker_gpu_lines(value).map(DockerGpus)
}

fn docker_gpu_lines(value: &str) -> Result<Vec<String>, String> {
    let value = value.trim_matches('"');
    if value == "all" {
        return Ok(vec!["Device=all".into()]);
    }
    if let Ok(count) = value.parse::<u32>() {
        return match count {
            0 => Ok(Vec::new()),
            n => Ok(vec![format!("Count={n}")]),
        };
    }
    let devices = value
        .strip_prefix("device=")
        .or_else(|| value.strip_prefix("\"device="))
        .ok_or_else(|| format!("'{value}': expected all, a number of GPUs, or device=INDEX[,INDEX…]"))?;
    let devices: Vec<String> = devices
        .trim_matches('"')
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| format!("Device={}", quote(&format!("nvidia:{d}"))))
        .collect();
    if devices.is_empty() {
        return Err(format!("'{value}': device= names no GPU"));
    }
    Ok(devices)
}

/// A time span as AllocationTimeout= takes it, checked here so that it is written as it is.
fn timespan(value: &str) -> Result<String, String> {
    gpubox_definition::timespan::parse(value).map(|_| value.to_owned())
}

/// `--security-opt` as Docker takes it: (key, value) of the definition.
fn security_opt(value: &str) -> Result<(String, String), String> {
    let (option, setting) = value.split_once(['=', ':']).unwrap_or((value, ""));
    match option {
        "seccomp" if !setting.is_empty() => Ok(("Seccomp".into(), setting.to_owned())),
        "no-new-privileges" => match setting {
            "" | "true" => Ok(("NoNewPrivileges".into(), "yes".into())),
            "false" => Ok(("NoNewPrivileges".into(), "no".into())),
            other => Err(format!("no-new-privileges={other}: expected true or false")),
        },
        _ => Err(format!("'{value}': gpubox knows seccomp=PROFILE and no-new-privileges[=true|false]")),
    }
}

/// Runs the container to its end. Never returns `Err`: a failure is printed and becomes exit
/// status 125, which the caller could not tell from the payload's own status otherwise.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    Ok(ExitCode::from(run_to_end(&args).unwrap_or_else(|e| {
        eprintln!("gpuboxctl: cannot run the container: {e:#}");
        CANNOT_START
    })))
}

fn run_to_end(args: &RunArgs) -> Result<u8> {
    // Before anything that could leave the file behind, and before zbus starts threads (which
    // inherit the mask): these signals now wait for us in `Signals::wait`.
    let signals = Signals::block()?;
    let supervisor = find_supervisor()?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => random_name()?,
    };
    if let Ok(existing) = SearchPath::default().find(&name) {
        bail!("a definition named '{name}' exists already ({}); choose another --name", existing.main.display());
    }
    let file = TempFile::create(&name, &definition(args)?)?;
    Sources::from_file(&file.0)?.load()?;
    if Path::new("/run/systemd/system").exists() {
        let what = if args.command.is_empty() { args.image.iter().cloned().collect() } else { args.command.clone() };
        systemd::run(&name, &file.0, &supervisor, &what, &signals)
    } else {
        foreground(&file.0, &supervisor, &signals)
    }
}

/// The definition text for these options.
fn definition(args: &RunArgs) -> Result<String> {
    let mut text = String::from("[Container]\n");
    if !args.command.is_empty() {
        let exec: Vec<String> = args.command.iter().map(|w| quote(w)).collect();
        writeln!(text, "Exec={}", exec.join(" "))?;
    }
    if let Some(image) = &args.image {
        writeln!(text, "Image={}", quote(image))?;
    }
    if let Some(root) = &args.root {
        let root = std::path::absolute(root).with_context(|| format!("--root {}", root.display()))?;
        writeln!(text, "RootDirectory={}", quote(&root.to_string_lossy()))?;
    }
    // Free text quoted; the fixed words (yes, host, …) as they are, as the keys take them.
    let mut plain = vec![];
    if args.read_only {
        plain.push(("ReadOnly", "yes"));
    }
    if let Some(pull) = &args.pull {
        plain.push(("Pull", pull));
    }
    if let Some(network) = &args.network {
        plain.push(("Network", network));
    }
    if let Some(userns) = &args.userns {
        plain.push(("UserNamespace", userns));
    }
    if args.init {
        plain.push(("Init", "yes"));
    }
    for (key, value) in &args.security_opts {
        if key == "NoNewPrivileges" {
            plain.push(("NoNewPrivileges", value));
        }
    }
    for (key, value) in plain {
        writeln!(text, "{key}={value}")?;
    }
    let mut line = |key: &str, value: &str| writeln!(text, "{key}={}", quote(value));
    if let Some(hostname) = &args.hostname {
        line("Hostname", hostname)?;
    }
    if let Some(workdir) = &args.workdir {
        line("WorkingDirectory", &workdir.to_string_lossy())?;
    }
    if let Some(user) = &args.user {
        line("User", user)?;
    }
    for e in &args.env {
        line("Environment", e)?;
    }
    for b in &args.binds {
        line("Bind", &absolute_bind_source(b)?)?;
    }
    for v in &args.volumes {
        let mut parts = v.splitn(3, ':');
        let source = parts.next().unwrap_or_default();
        let destination = parts.next().unwrap_or(source);
        let (mut read_only, mut idmap) = (false, false);
        for option in parts.next().into_iter().flat_map(|o| o.split(',')) {
            match option {
                "ro" => read_only = true,
                "rw" => read_only = false,
                "idmap" => idmap = true,
                other => bail!("-v {v}: unknown option '{other}' (ro, rw or idmap)"),
            }
        }
        let spec = absolute_bind_source(&format!("{source}:{destination}"))?;
        let spec = if idmap { format!("{spec}:idmap") } else { spec };
        line(if read_only { "BindReadOnly" } else { "Bind" }, &spec)?;
    }
    if let Some(size) = &args.shm_size {
        line("ShmSize", size)?;
    }
    for cap in &args.cap_add {
        line("AddCapability", cap)?;
    }
    for cap in &args.cap_drop {
        line("DropCapability", cap)?;
    }
    if let Some(seccomp) = &args.seccomp {
        line("Seccomp", seccomp)?;
    }
    for (key, value) in &args.security_opts {
        if key == "Seccomp" {
            line(key, value)?;
        }
    }
    let mut gpu: Vec<String> = args.gpus.iter().map(|g| format!("Device={}", quote(g))).collect();
    gpu.extend(args.docker_gpus.iter().flat_map(|d| d.0.iter().cloned()));
    for (flag, key) in [
        (args.driver_libraries, "DriverLibraries"),
        (args.gpu_optional, "Optional"),
        (args.hotplug, "Hotplug"),
        (args.exclusive, "Exclusive"),
        (args.numa, "NUMA"),
    ] {
        if flag {
            gpu.push(format!("{key}=yes"));
        }
    }
    if let Some(timeout) = &args.allocation_timeout {
        gpu.push(format!("AllocationTimeout={timeout}"));
    }
    if !gpu.is_empty() {
        text.push_str("[GPU]\n");
        for l in gpu {
            writeln!(text, "{l}")?;
        }
    }
    Ok(text)
}

/// Quotes one word so that gpubox's systemd-style word splitting and specifier expansion
/// (definition/src/words.rs) give it back exactly.
fn quote(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '%' => out.push_str("%%"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_ascii_control() => write!(out, "\\x{:02x}", c as u32).expect("writing to a String"),
            // C1 controls too: a definition's lines may hold no control character at all.
            c if c.is_control() => write!(out, "\\u{:04x}", c as u32).expect("writing to a String"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `--bind SRC[:DST]` with a relative SRC taken from the current directory, as a person means
/// it; without DST, the container sees it at that same absolute path.
fn absolute_bind_source(bind: &str) -> Result<String> {
    let (optional, spec) = bind.strip_prefix('-').map_or(("", bind), |rest| ("-", rest));
    let (source, destination) = spec.split_once(':').map_or((spec, None), |(s, d)| (s, Some(d)));
    if source.is_empty() || source.starts_with('/') {
        return Ok(bind.to_owned());
    }
    let source = std::path::absolute(source).with_context(|| format!("--bind {bind}"))?;
    let destination = destination.map(|d| format!(":{d}")).unwrap_or_default();
    Ok(format!("{optional}{}{destination}", source.display()))
}

/// `--env NAME` alone takes the value from this environment, as `systemd-run --setenv` does.
pub fn env_assignment(arg: &str) -> Result<String, String> {
    if arg.contains('=') {
        return Ok(arg.to_owned());
    }
    match std::env::var(arg) {
        Ok(value) => Ok(format!("{arg}={value}")),
        Err(_) => Err(format!("'{arg}' has no '=' and is not set in this environment")),
    }
}

/// A name that can be a definition's and a unit's (bad usage otherwise, not a failed start).
fn valid_name(name: &str) -> Result<String, String> {
    match gpubox_definition::check_name(name, Path::new(RUN_DIR)) {
        Ok(()) => Ok(name.to_owned()),
        Err(gpubox_definition::Error::Definition { message, .. }) => Err(message),
        Err(e) => Err(e.to_string()),
    }
}

fn random_name() -> Result<String> {
    let mut bytes = [0u8; 4];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("reading /dev/urandom")?;
    Ok(format!("gpu-run-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// `gpubox-supervisor` next to this binary (an installation or a cargo build), else in `$PATH`.
pub fn find_supervisor() -> Result<PathBuf> {
    const SUPERVISOR: &str = "gpubox-supervisor";
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(SUPERVISOR)));
    let in_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    beside
        .into_iter()
        .chain(in_path.map(|dir| dir.join(SUPERVISOR)))
        .find(|p| p.is_file())
        .and_then(|p| std::path::absolute(p).ok())
        .with_context(|| format!("{SUPERVISOR} is neither next to gpuboxctl nor in $PATH"))
}

/// The temporary definition file, removed when dropped: on every way out but SIGKILL.
struct TempFile(PathBuf);

impl TempFile {
    fn create(name: &str, text: &str) -> Result<TempFile> {
        gpubox_control::run_dir::ensure_base().with_context(|| format!("preparing {RUN_DIR}"))?;
        let path = Path::new(RUN_DIR).join(format!("{name}{}", gpubox_definition::SUFFIX));
        // Never another's file; 0600 because environment values may be secrets.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let guard = TempFile(path);
        file.write_all(text.as_bytes()).with_context(|| format!("writing {}", guard.0.display()))?;
        Ok(guard)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.0) {
            eprintln!("gpuboxctl: removing {}: {e}", self.0.display());
        }
    }
}

/// Status of a process that ended, the way a shell reports it.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal) as u8,
        (None, None) => CANNOT_START,
    }
}

/// Without systemd: the supervisor as our child, in our process group (so it has the terminal
/// and gets the terminal's signals itself); signals sent to us alone are passed on.
fn foreground(file: &Path, supervisor: &Path, signals: &Signals) -> Result<u8> {
    let mut child = Command::new(supervisor)
        .args(["run", "--definition"])
        .arg(file)
        // They would name a service manager that is not the supervisor's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("INVOCATION_ID")
        .spawn()
        .with_context(|| format!("starting {}", supervisor.display()))?;
    loop {
        if let Some(status) = child.try_wait().context("waiting for the supervisor")? {
            return Ok(exit_code(status));
        }
        if let Some((signal, from_terminal)) = signals.wait(None) {
            if signal != libc::SIGCHLD && !from_terminal {
                // SAFETY: kill(2) on our own child, which we have not reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            }
        }
    }
}

/// SIGINT, SIGTERM, SIGHUP and SIGCHLD, blocked in every thread and taken when we ask.
struct Signals(libc::sigset_t);

impl Signals {
    fn block() -> Result<Signals> {
        // SAFETY: plain libc signal-set calls on a local set; pthread_sigmask changes only
        // this thread's mask (threads started later inherit it). Children get an empty mask
        // from std::process::Command.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD] {
                libc::sigaddset(&mut set, s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                bail!("blocking signals: {}", std::io::Error::from_raw_os_error(rc));
            }
            Ok(Signals(set))
        }
    }

    /// The next of our signals, waiting at most `timeout` (forever for None), and whether the
    /// terminal sent it (Ctrl-C reaches the whole foreground process group by itself).
    fn wait(&self, timeout: Option<Duration>) -> Option<(i32, bool)> {
        let timeout = timeout.map(|t| libc::timespec { tv_sec: t.as_secs() as _, tv_nsec: t.subsec_nanos() as _ });
        // SAFETY: siginfo_t is plain data; the set and the timeout outlive the call.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let signal = match &timeout {
                Some(t) => libc::sigtimedwait(&self.0, &mut info, t),
                None => libc::sigwaitinfo(&self.0, &mut info),
            };
            (signal > 0).then_some((signal, info.si_code == libc::SI_KERNEL))
        }
    }
}

/// units/gpu@.service's `[Service]` settings, read from the template itself (built in), so that
/// a one-off container's transient unit is set up as every `gpu@NAME.service` is, and cannot
/// drift from it: a setting this does not know how to pass on fails its test.
mod template {
    use zbus::zvariant::Value;

    const UNIT: &str = include_str!("../../units/gpu@.service");

    /// The settings, for the unit of container `name` (`%i`).
    #[derive(Debug, Default)]
    pub struct Service {
        /// (D-Bus property, value), each as systemd's transient units take it.
        settings: Vec<(&'static str, Setting)>,
        pub environment: Vec<String>,
        /// Keys this does not pass on (none, as the test checks), and ExecStart.
        pub unknown: Vec<String>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub enum Setting {
        Text(String),
        Flag(bool),
        Micros(u64),
        Mode(u32),
        List(Vec<String>),
    }

    pub fn service(name: &str) -> Service {
        let mut service = Service::default();
        let mut in_service = false;
        for line in UNIT.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if line.starts_with('[') {
                in_service = line == "[Service]";
                continue;
            }
            let Some((key, value)) = line.split_once('=').filter(|_| in_service) else { continue };
            let value = value.replace("%i", name);
            let setting = match key {
                "Type" | "NotifyAccess" | "DevicePolicy" | "KillMode" | "Slice" => Setting::Text(value),
                "Delegate" => Setting::Flag(value == "yes"),
                "TimeoutStartSec" | "TimeoutStopSec" => match gpubox_definition::timespan::parse(&value) {
                    Ok(Some(t)) => Setting::Micros(t.as_micros() as u64),
                    _ => Setting::Micros(u64::MAX),
                },
                "RuntimeDirectoryMode" => match u32::from_str_radix(&value, 8) {
                    Ok(mode) => Setting::Mode(mode),
                    Err(_) => {
                        service.unknown.push(line.to_owned());
                        continue;
                    }
                },
                "RuntimeDirectory" => Setting::List(vec![value]),
                "Environment" => {
                    service.environment.push(value);
                    continue;
                }
                _ => {
                    service.unknown.push(key.to_owned());
                    continue;
                }
            };
            let property = match key {
                "TimeoutStartSec" => "TimeoutStartUSec",
                "TimeoutStopSec" => "TimeoutStopUSec",
                "Type" => "Type",
                "NotifyAccess" => "NotifyAccess",
                "DevicePolicy" => "DevicePolicy",
                "KillMode" => "KillMode",
                "Slice" => "Slice",
                "Delegate" => "Delegate",
                "RuntimeDirectoryMode" => "RuntimeDirectoryMode",
                _ => "RuntimeDirectory",
            };
            service.settings.push((property, setting));
        }
        service
    }

    impl Service {
        pub fn properties(&self) -> Vec<(&'static str, Value<'static>)> {
            self.settings
                .iter()
                .map(|(property, setting)| {
                    let value: Value = match setting.clone() {
                        Setting::Text(t) => t.into(),
                        Setting::Flag(f) => f.into(),
                        Setting::Micros(us) => us.into(),
                        Setting::Mode(m) => m.into(),
                        Setting::List(l) => l.into(),
                    };
                    (*property, value)
                })
                .collect()
        }

        #[cfg(test)]
        pub fn get(&self, property: &str) -> Option<&Setting> {
            self.settings.iter().find(|(p, _)| *p == property).map(|(_, s)| s)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Every setting of the template reaches the transient unit (ExecStart is ours).
        #[test]
        fn the_transient_unit_has_every_setting_of_the_template() {
            let s = service("job");
            assert_eq!(s.unknown, ["ExecStart"], "settings of units/gpu@.service that gpuboxctl run does not pass on");
            assert_eq!(s.get("Type"), Some(&Setting::Text("notify".into())));
            assert_eq!(s.get("Delegate"), Some(&Setting::Flag(true)));
            assert_eq!(s.get("DevicePolicy"), Some(&Setting::Text("closed".into())));
            assert_eq!(s.get("RuntimeDirectory"), Some(&Setting::List(vec!["gpubox/job".into()])));
            assert_eq!(s.get("RuntimeDirectoryMode"), Some(&Setting::Mode(0o711)));
            assert_eq!(s.get("TimeoutStartUSec"), Some(&Setting::Micros(90_000_000)));
            assert_eq!(s.environment, ["GPUBOX_STOP_TIMEOUT=25"]);
        }
    }
}

/// The transient unit, started and watched through systemd's D-Bus API.
mod systemd {
    use super::{template, Signals, CANNOT_START};
    use anyhow::{Context, Result};
    use std::io::IsTerminal;
    use std::os::fd::AsFd;
    use std::path::Path;
    use std::time::Duration;
    use zbus::blocking::{Connection, Proxy};
    use zbus::zvariant::{Fd, OwnedObjectPath, OwnedValue, Value};

    const SYSTEMD: &str = "org.freedesktop.systemd1";
    const UNIT: &str = "org.freedesktop.systemd1.Unit";
    const SERVICE: &str = "org.freedesktop.systemd1.Service";
    const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
    /// How often the unit's state is read while it runs: often at first, so that a short
    /// command ends promptly, then every half second at most.
    const FIRST_POLL: Duration = Duration::from_millis(10);
    const LAST_POLL: Duration = Duration::from_millis(500);
    /// `si_code` values systemd reports in ExecMainCode.
    const CLD_EXITED: i32 = 1;

    pub fn run(name: &str, file: &Path, supervisor: &Path, command: &[String], signals: &Signals) -> Result<u8> {
        let unit = format!("{name}.service");
        let conn = Connection::system().context("connecting to the system bus")?;
        let manager = Proxy::new(&conn, SYSTEMD, "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")?;
        let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
        let supervisor_path = supervisor.to_string_lossy().into_owned();
        let exec_start = vec![(
            supervisor_path.clone(),
            vec![supervisor_path, "run".into(), "--definition".into(), file.to_string_lossy().into_owned()],
            false,
        )];
        // What units/gpu@.service says, plus what `systemd-run --wait --pipe` adds.
        let template = template::service(name);
        let mut environment = template.environment.clone();
        // The supervisor's own settings (test stand-ins, search paths) follow us, as they
        // would to a foreground supervisor.
        environment.extend(std::env::vars().filter(|(k, _)| k.starts_with("GPUBOX_")).map(|(k, v)| format!("{k}={v}")));
        let description = format!("gpubox one-off container: {}", command.join(" "));
        let mut properties: Vec<(&str, Value)> = vec![
            ("Description", description.chars().take(200).collect::<String>().into()),
            ("ExecStart", exec_start.into()),
            ("Environment", environment.into()),
        ];
        properties.extend(template.properties());
        properties.extend([
            ("StandardInputFileDescriptor", Fd::from(stdin.as_fd()).into()),
            ("StandardOutputFileDescriptor", Fd::from(stdout.as_fd()).into()),
            ("StandardErrorFileDescriptor", Fd::from(stderr.as_fd()).into()),
            // The unit stays loaded, for its exit status, until this connection closes.
            ("AddRef", true.into()),
            ("CollectMode", "inactive-or-failed".into()),
        ]);
        let aux: Vec<(&str, Vec<(&str, Value)>)> = Vec::new();
        let _job: OwnedObjectPath = manager
            .call("StartTransientUnit", &(&unit, "fail", properties, aux))
            .with_context(|| format!("starting {unit} through systemd"))?;
        if std::io::stderr().is_terminal() {
            eprintln!("Running as unit: {unit}");
        }
        let path: OwnedObjectPath = manager.call("GetUnit", &(&unit,)).with_context(|| format!("finding {unit}"))?;
        let get = |interface: &str, property: &str| -> Result<OwnedValue> {
            let reply = conn
                .call_method(Some(SYSTEMD), &path, Some(PROPERTIES), "Get", &(interface, property))
                .with_context(|| format!("reading {property} of {unit}"))?;
            Ok(reply.body().deserialize::<OwnedValue>()?)
        };
        let mut poll = FIRST_POLL;
        loop {
            if let Some((signal, _)) = signals.wait(Some(poll)) {
                if signal != libc::SIGCHLD {
                    // Stop it as `systemctl stop` would, and see it through to its end.
                    let stop: Result<OwnedObjectPath, _> = manager.call("StopUnit", &(&unit, "replace"));
                    if let Err(e) = stop {
                        eprintln!("gpuboxctl: stopping {unit}: {e}");
                    }
                }
            }
            let state = String::try_from(get(UNIT, "ActiveState")?)?;
            // A pending job (the start, before it runs) means it is not over yet.
            let (job, _) = <(u32, OwnedObjectPath)>::try_from(get(UNIT, "Job")?)?;
            if job == 0 && (state == "inactive" || state == "failed") {
                break;
            }
            poll = (poll * 2).min(LAST_POLL);
        }
        let code = i32::try_from(get(SERVICE, "ExecMainCode")?)?;
        let status = i32::try_from(get(SERVICE, "ExecMainStatus")?)?;
        let result = String::try_from(get(SERVICE, "Result")?)?;
        let ever_active = u64::try_from(get(UNIT, "ActiveEnterTimestampMonotonic")?)? != 0;
        // Let it go now rather than when the bus notices our exit: gone for the next systemctl.
        let _ = manager.call_method("UnrefUnit", &(&unit,));
        // The supervisor exits with the payload's status. systemd's own failures to run it
        // (no process at all, or 200–243 before it ever said READY=1) mean no container.
        if code == 0 || (code == CLD_EXITED && !ever_active && (200..=243).contains(&status)) {
            eprintln!(
                "gpuboxctl: systemd could not start {unit} (result {result}, exit status {status}); see journalctl -u {unit}"
            );
            return Ok(CANNOT_START);
        }
        Ok(if code == CLD_EXITED { status as u8 } else { (128 + status) as u8 })
    }
}

#[cfg(test)]
mod tests {
    use super::quote;
    use gpubox_definition::words::{split, Specifiers};

    #[test]
    fn quoted_words_split_back_exactly() {
        let specifiers = Specifiers { instance: "x" };
        for word in ["", "a b", " \x01\x1b\x7f\r\n\t \u{85}\u{9b}", "%i %% 100%", r#"\"'\x41\\"#, "é ✓", "#;"] {
            let words = split(&quote(word)).unwrap();
            assert_eq!(words.len(), 1, "{word:?}");
            assert_eq!(specifiers.expand(&words[0]).unwrap(), word);
        }
    }
}

#[cfg(test)]
mod options {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn definition_of(args: &[&str]) -> Result<String, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))?;
        let text = definition(&cli.run).unwrap();
        // What it writes is a valid definition with these keys.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.gpubox");
        fs::write(&file, &text).unwrap();
        Sources::from_file(&file).unwrap().load().unwrap_or_else(|e| panic!("{e}\n{text}"));
        Ok(text)
    }

    #[test]
    fn docker_spellings_become_keys() {
        let text = definition_of(&[
            "--gpus",
            "all",
            "-e",
            "A=1",
            "-v",
            "/srv/data:/data:ro",
            "-v",
            "/srv/out:/out",
            "-v",
            "/srv/home:/home:rw,idmap",
            "--shm-size",
            "8G",
            "-w",
            "/work",
            "-u",
            "1000",
            "-it",
            "--rm",
            "--init",
            "--userns",
            "host",
            "--cap-add",
            "net_admin",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges=false",
            "--security-opt",
            "seccomp=unconfined",
            "--read-only",
            "--hostname",
            "box",
            "--driver-libraries",
            "--exclusive",
            "--numa",
            "--allocation-timeout",
            "5min",
            "nvidia-smi",
            "-L",
        ])
        .unwrap();
        for line in [
            "Exec=\"nvidia-smi\" \"-L\"",
            "Environment=\"A=1\"",
            "BindReadOnly=\"/srv/data:/data\"",
            "Bind=\"/srv/out:/out\"",
            "Bind=\"/srv/home:/home:idmap\"",
            "ShmSize=\"8g\"",
            "WorkingDirectory=\"/work\"",
            "User=\"1000\"",
            "Init=yes",
            "UserNamespace=host",
            "AddCapability=\"net_admin\"",
            "DropCapability=\"ALL\"",
            "NoNewPrivileges=no",
            "Seccomp=\"unconfined\"",
            "ReadOnly=yes",
            "Hostname=\"box\"",
            "Device=all",
            "DriverLibraries=yes",
            "Exclusive=yes",
            "NUMA=yes",
            "AllocationTimeout=5min",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        assert!(definition_of(&["--gpus", "2", "true"]).unwrap().contains("Count=2"));
        let text = definition_of(&["--gpus", "\"device=0,GPU-8e3c6a1e-7b1d-4c2a-9f3e-2a1b3c4d5e6f\"", "true"]).unwrap();
        assert!(
            text.contains("Device=\"nvidia:0\"")
                && text.contains("Device=\"nvidia:GPU-8e3c6a1e-7b1d-4c2a-9f3e-2a1b3c4d5e6f\""),
            "{text}"
        );
    }

    /// The command starts at the first word that is not an option; an unknown option before it
    /// is an error, never the command (`run --gpus all -- nvidia-smi` ran `--gpus` once).
    #[test]
    fn options_stop_at_the_command_and_unknown_ones_are_errors() {
        let cli = Cli::try_parse_from(["run", "--gpus", "all", "--", "nvidia-smi"]).unwrap();
        assert_eq!(cli.run.command, ["nvidia-smi"]);
        let cli = Cli::try_parse_from(["run", "sh", "-c", "--gpus"]).unwrap();
        assert_eq!(cli.run.command, ["sh", "-c", "--gpus"]);
        let cli = Cli::try_parse_from(["run", "--", "-weird"]).unwrap();
        assert_eq!(cli.run.command, ["-weird"]);
        for bad in [
            &["run", "--frobnicate", "true"][..],
            &["run", "--gpus", "many", "true"],
            &["run", "--security-opt", "label=x", "true"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    /// `--image` as `podman run IMAGE [COMMAND]`: the command is optional, replaces the image's
    /// own, and the root cannot also be a directory.
    #[test]
    fn an_image_with_or_without_a_command() {
        let cli = Cli::try_parse_from(["run", "--image", "pytorch/pytorch", "--pull", "never"]).unwrap();
        let text = definition(&cli.run).unwrap();
        assert!(!text.contains("Exec="), "{text}");
        assert!(text.contains("Image=\"pytorch/pytorch\"") && text.contains("Pull=never"), "{text}");
        let cli = Cli::try_parse_from(["run", "--image", "busybox", "sh", "-c", "true"]).unwrap();
        assert!(definition(&cli.run).unwrap().contains("Exec=\"sh\" \"-c\" \"true\""));
        assert!(Cli::try_parse_from(["run", "--image", "busybox", "--root", "/srv", "true"]).is_err());
        assert!(Cli::try_parse_from(["run"]).is_err(), "a command or an image");
    }
}
