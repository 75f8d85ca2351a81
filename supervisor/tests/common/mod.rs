//! Helpers shared by the privileged test files: running the real supervisor on a definition,
//! as on a fresh host where asked, and looking at what it left behind.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const SUPERVISOR: &str = env!("CARGO_BIN_EXE_gpubox-supervisor");

pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("GPUBOX_REQUIRE_PRIVILEGED").is_none(), "privileged tests need root");
    eprintln!("skipping: privileged tests need root");
    false
}

/// A finished supervisor: what it printed and its exit status (-1 for a signal).
pub struct Run {
    pub out: String,
    pub err: String,
    pub code: i32,
}

impl From<Output> for Run {
    fn from(Output { status, stdout, stderr }: Output) -> Run {
        Run {
            out: String::from_utf8_lossy(&stdout).into_owned(),
            err: String::from_utf8_lossy(&stderr).into_owned(),
            code: status.code().unwrap_or(-1),
        }
    }
}

/// Waits until container `name` serves its control socket (it runs), at most `limit`.
pub fn wait_for_control(name: &str, limit: std::time::Duration) {
    let socket = Path::new("/run/gpubox").join(name).join("control");
    let t = std::time::Instant::now();
    while !socket.exists() {
        assert!(t.elapsed() < limit, "container {name} did not start within {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A character device with /dev/fuse's numbers at `path`, mode 0666 (umask aside): a stand-in
/// GPU node that anyone may try to open, and whose open has no side effects.
pub fn standin_node(path: &Path) {
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(10, 229),
    )
    .unwrap();
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
}

pub fn definition(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{name}.gpubox"));
    fs::write(&path, text).unwrap();
    path
}

pub fn run(text: &str) -> Run {
    // A name of its own: tests run in parallel, and a name runs once at a time.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!("t{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let dir = tempfile::tempdir().unwrap();
    run_file(&definition(dir.path(), &name, text), &[])
}

/// Runs the supervisor on a definition file, standalone, with extra environment variables.
pub fn run_file(path: &Path, env: &[(&str, &std::ffi::OsStr)]) -> Run {
    Command::new(SUPERVISOR)
        .args(["run", "--definition"])
        .arg(path)
        .stdin(Stdio::null())
        .env_remove("INVOCATION_ID")
        .env_remove("NOTIFY_SOCKET")
        .envs(env.iter().copied())
        .output()
        .unwrap()
        .into()
}

/// Runs a shell script as the payload (bound in read-only below the container's own /tmp).
pub fn inside(extra: &str, script: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("test.sh");
    fs::write(&file, script).unwrap();
    run(&format!("[Container]\nExec=/bin/sh /tmp/test.sh\nBindReadOnly={}:/tmp/test.sh\n{extra}", file.display()))
}

pub fn value<'a>(r: &'a Run, key: &str) -> &'a str {
    r.out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::trim))
        .unwrap_or_else(|| panic!("no {key}= in output:\n{}\nstderr:\n{}", r.out, r.err))
}

pub fn host_mounts() -> usize {
    fs::read_to_string("/proc/self/mountinfo").unwrap().lines().count()
}

pub fn gpubox_cgroups() -> Vec<String> {
    let mut found = Vec::new();
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let Some(rel) = own.lines().find_map(|l| l.strip_prefix("0::")) else { continue };
        let dir = Path::new(root).join(rel.trim_start_matches('/'));
        if let Ok(entries) = fs::read_dir(&dir) {
            // Only those whose supervisor is gone: other tests run at the same time.
            found.extend(entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| {
                n.starts_with("gpubox-") && !Path::new("/proc").join(n.rsplit('-').next().unwrap()).exists()
            }));
        }
    }
    found
}

/// The script that makes a fresh host around the supervisor: a mount namespace of its own
/// whose `/run` is a new, empty tmpfs (a real host's `/run` starts empty), and umask 077
/// (a careful admin's). `$0` is the supervisor, the rest its arguments.
const FRESH_HOST: &str = "mount -t tmpfs -o mode=0755 fresh-run /run && umask 077 && exec \"$0\" \"$@\"";

/// A command that runs the supervisor with `args` as on a fresh host (see [`FRESH_HOST`]).
pub fn fresh_host(args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "--", "sh", "-c", FRESH_HOST, SUPERVISOR]).args(args);
    c.env_remove("INVOCATION_ID").env_remove("NOTIFY_SOCKET");
    c
}

/// Runs a definition file as on a fresh host, with extra environment variables.
pub fn run_fresh(path: &Path, env: &[(&str, &std::ffi::OsStr)]) -> Run {
    fresh_host(&["run".as_ref(), "--definition".as_ref(), path.as_os_str()])
        .stdin(Stdio::null())
        .envs(env.iter().copied())
        .output()
        .unwrap()
        .into()
}

/// A stand-in NVIDIA GPU, as the driver shows one: `/proc/driver/nvidia/gpus/BUS/information`
/// in a directory of its own (`GPUBOX_NVIDIA_PROC`), and a `/dev/nvidiaN` node with
/// `/dev/fuse`'s numbers at a minor number no real GPU has, removed again however the test
/// ends. The stand-in libnvidia-ml (tests/standin/fake-nvml.c: its own thread, never
/// unloaded) is built beside it and named in `GPUBOX_NVML_LIBRARY`, where a supervisor that
/// loaded NVML would take it.
pub struct NvidiaStandIn {
    pub dir: tempfile::TempDir,
    /// The first GPU's minor number; GPU i has `minor + i`.
    pub minor: u32,
    pub node: PathBuf,
    pub nodes: Vec<PathBuf>,
    pub nvml: PathBuf,
    minor_text: std::ffi::OsString,
}

impl NvidiaStandIn {
    pub fn new() -> NvidiaStandIn {
        NvidiaStandIn::with_gpus(1)
    }

    /// `n` stand-in GPUs, in bus order, at PCI addresses of their own (0000:MM:00.0, MM the
    /// minor number): the allocator's locks are host-wide, and tests run in parallel.
    pub fn with_gpus(n: u32) -> NvidiaStandIn {
        let dir = tempfile::tempdir().unwrap();
        // Minor numbers of their own per test process and call: tests run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let slot = NEXT.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        let minor = 120 + (std::process::id() * 13 + slot) % 100;
        let mut nodes = Vec::new();
        for i in 0..n {
            let bus = format!("0000:{:02x}:00.0", minor + i);
            let gpu = dir.path().join("gpus").join(&bus);
            fs::create_dir_all(&gpu).unwrap();
            fs::write(
                gpu.join("information"),
                format!(
                    "Model: \t\t gpubox stand-in GPU\nGPU UUID: \t GPU-00000000-1111-2222-3333-44444444444{i}\n\
                     Bus Location: \t {bus}\nDevice Minor: \t {}\nGPU Excluded:\t No\n",
                    minor + i
                ),
            )
            .unwrap();
            let node = PathBuf::from(format!("/dev/nvidia{}", minor + i));
            let _ = fs::remove_file(&node);
            standin_node(&node);
            nodes.push(node);
        }
        let nvml = dir.path().join("libnvidia-ml.so.1");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/standin/fake-nvml.c");
        let cc = Command::new("cc")
            .args(["-shared", "-fPIC", "-pthread", "-Wl,-z,nodelete", "-o"])
            .arg(&nvml)
            .arg(&source)
            .status()
            .expect("a C compiler");
        assert!(cc.success());
        NvidiaStandIn { dir, minor, node: nodes[0].clone(), nodes, nvml, minor_text: minor.to_string().into() }
    }

    /// The environment that points gpubox at this GPU.
    pub fn env(&self) -> Vec<(&'static str, &std::ffi::OsStr)> {
        vec![
            ("GPUBOX_NVIDIA_PROC", self.dir.path().as_os_str()),
            ("GPUBOX_NVML_LIBRARY", self.nvml.as_os_str()),
            ("FAKE_NVML_MINOR", self.minor_text.as_os_str()),
            ("GPUBOX_CDI_DIRS", self.dir.path().as_os_str()),
        ]
    }
}

impl Drop for NvidiaStandIn {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = fs::remove_file(node);
        }
    }
}

/// Runs a copy of `program` as `uid` (and gid): a copy in a directory of its own that any user
/// may run, whatever the build's umask made of target/. Another test thread's fork may hold the
/// fresh copy open for writing a moment (ETXTBSY): tried again then.
pub fn output_as(uid: u32, program: &Path, args: &[&str]) -> Output {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join(program.file_name().unwrap());
    fs::copy(program, &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    (0..50)
        .find_map(|_| match Command::new(&copy).args(args).uid(uid).gid(uid).output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                None
            }
            other => Some(other.unwrap()),
        })
        .expect("the copy stayed busy")
}

/// A root of our own: busybox, with the directories the container's mounts need.
pub fn busybox_root(parent: &Path) -> PathBuf {
    let root = parent.join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox (tests/install-deps installs busybox-static)");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    // As in every image: anyone may write in /tmp.
    fs::set_permissions(root.join("tmp"), std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    root
}

pub mod oci;
pub mod registry;
