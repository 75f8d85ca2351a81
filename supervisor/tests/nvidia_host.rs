//! Issue #11, the real NVIDIA host: what failed there, each run as on a fresh host (an empty
//! `/run`, umask 077) with stand-ins faithful to the real thing (a driver's `/proc` tree, a
//! libnvidia-ml that starts its own thread and is never unloaded, a linker cache that lists a
//! library twice, a root owned by host root). Privileged, as container.rs.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Failure 1: the first container on a fresh host made `/run/gpubox` 0700, and the
/// container's root could not reach its staging nodes.
#[test]
fn a_gpu_container_starts_on_a_fresh_host() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::new();
    let minor = gpu.minor;
    let def = definition(
        gpu.dir.path(),
        "fresh",
        &format!(
            "[Container]\nExec=/bin/sh -c '(exec 3<> /dev/nvidia{minor}) && echo open=yes'\n[GPU]\nDevice=nvidia:0\n"
        ),
    );
    let r = run_fresh(&def, &gpu.env());
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(value(&r, "open"), "yes");
    assert!(r.err.contains("devices: nvidia:0"), "{}", r.err);

    // A /run/gpubox left 0700 by an older gpubox is repaired, and the container starts.
    let script = format!(
        "mount -t tmpfs -o mode=0755 fresh-run /run && mkdir -m 0700 /run/gpubox && umask 077 && \
         {SUPERVISOR} run --definition {} && stat -c mode=%a /run/gpubox",
        def.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", &script])
        .envs(gpu.env())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("open=yes") && stdout.contains("mode=755"), "{stdout}{stderr}");
}

/// Waits for a process at most `limit`; kills it and fails the test if it is still there.
fn wait_or_fail(child: &mut std::process::Child, limit: Duration, what: &str) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: the supervisor hung for {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Failure 2: with a GPU selected, NVML's thread took SIGCHLD and SIGTERM from the supervisor:
/// it hung after the payload exited, and SIGTERM killed it without cleanup. Ten exits and ten
/// SIGTERMs, each with a time limit; NVML is never loaded into the supervisor.
#[test]
fn payload_exits_and_sigterms_are_seen_with_a_gpu() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::new();
    let exits = definition(gpu.dir.path(), "exits", "[Container]\nExec=/bin/sh -c 'exit 3'\n[GPU]\nDevice=nvidia:0\n");
    for i in 0..10 {
        let mut child = fresh_host(&["run".as_ref(), "--definition".as_ref(), exits.as_os_str()])
            .envs(gpu.env())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert_eq!(wait_or_fail(&mut child, Duration::from_secs(10), &format!("exit {i}")), 3);
    }
    let sleeps = definition(gpu.dir.path(), "sleeps", "[Container]\nExec=sleep 60\nInit=yes\n[GPU]\nDevice=nvidia:0\n");
    for i in 0..10 {
        let mut child = Command::new(SUPERVISOR)
            .args(["run", "--definition"])
            .arg(&sleeps)
            .envs(gpu.env())
            .env_remove("INVOCATION_ID")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Running once it has a child (the container's init).
        let t = Instant::now();
        while fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default().trim().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(10), "SIGTERM {i}: the container did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        assert!(!maps.contains("libnvidia-ml"), "NVML was loaded into the supervisor");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        let code = wait_or_fail(&mut child, Duration::from_secs(10), &format!("SIGTERM {i}"));
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        // The main loop saw it: it forwarded it and reported the payload's end.
        assert_eq!(code, 143, "SIGTERM {i}: {err}");
        assert!(err.contains("payload exited with status 143"), "SIGTERM {i}: {err}");
    }
    let name = sleeps.file_stem().unwrap();
    assert!(!Path::new("/run/gpubox").join(name).exists(), "the runtime directory was cleaned up");
}

/// A stand-in driver in two directories, and a real linker cache (made by ldconfig) that
/// lists both, the right one first, as on the H200 host: `/usr/local/nvidia/lib64` before
/// `/lib`. The libraries answer `cuDriverGetVersion` with 13000 (first) and 12000 (second).
struct TwoDrivers {
    dir: tempfile::TempDir,
    cache: PathBuf,
}

impl TwoDrivers {
    fn new() -> TwoDrivers {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut conf = String::new();
        for (sub, version) in [("first/lib64", 13000), ("second/lib", 12000)] {
            let lib = d.join(sub);
            fs::create_dir_all(&lib).unwrap();
            let source = d.join(format!("cuda{version}.c"));
            fs::write(&source, format!("int cuDriverGetVersion(int *v) {{ *v = {version}; return 0; }}\n")).unwrap();
            for soname in ["libcuda.so.1", "libnvidia-ml.so.1"] {
                let status = Command::new("cc")
                    .args(["-shared", "-fPIC", &format!("-Wl,-soname,{soname}"), "-o"])
                    .arg(lib.join(soname))
                    .arg(&source)
                    .status()
                    .unwrap();
                assert!(status.success());
            }
            conf.push_str(&format!("{}\n", lib.display()));
        }
        fs::write(d.join("ld.so.conf"), conf).unwrap();
        let cache = d.join("ld.so.cache");
        let status = Command::new("ldconfig")
            .arg("-C")
            .arg(&cache)
            .arg("-f")
            .arg(d.join("ld.so.conf"))
            .arg("-X")
            .status()
            .unwrap();
        assert!(status.success());
        let listed = Command::new("ldconfig").arg("-p").arg("-C").arg(&cache).output().unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        let first = listed.lines().find(|l| l.contains("libcuda.so.1")).unwrap_or_default();
        assert!(first.contains("first/lib64"), "the stand-in cache lists the first copy first:\n{listed}");
        assert_eq!(listed.matches("libcuda.so.1 ").count(), 2, "and lists it twice:\n{listed}");
        TwoDrivers { dir, cache }
    }
}

/// A root of our own holding only glibc and a program that loads libcuda.so.1 and prints the
/// version it answers; owned by host root, as every unpacked image is, and 0755 all the way.
fn glibc_root(parent: &Path) -> PathBuf {
    let root = parent.join("root");
    for d in ["proc", "sys", "dev", "tmp", "usr/bin"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let source = parent.join("cudaprog.c");
    fs::write(
        &source,
        r#"#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "clear") == 0) {
        char *none[] = {NULL};
        char *args[] = {argv[0], NULL};
        execve(argv[0], args, none);
        return 99;
    }
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cuda) { printf("version=none %s\n", dlerror()); return 1; }
    int (*get)(int *) = (int (*)(int *))dlsym(cuda, "cuDriverGetVersion");
    int v = 0;
    get(&v);
    printf("version=%d\n", v);
    return 0;
}
"#,
    )
    .unwrap();
    let program = root.join("usr/bin/cudaprog");
    assert!(Command::new("cc").arg("-o").arg(&program).arg(&source).status().unwrap().success());
    let ldd = Command::new("ldd").arg(&program).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
        let target = root.join(lib.trim_start_matches('/'));
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::copy(lib, &target).unwrap();
    }
    for dir in [parent, root.as_path()] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    root
}

/// Every path of a tree with its type, mode, owner, size and modification time.
fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        out.push(format!("{} {:o} {}:{} {} {}", p.display(), m.mode(), m.uid(), m.gid(), m.size(), m.mtime_nsec()));
        if m.is_dir() {
            stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out.sort();
    out
}

/// Failures 3 and 4: `DriverLibraries=yes` in a root owned by host root under the default user
/// namespace, read-only or not, loads the copy the host's loader loads, finds it with an empty
/// environment too, and leaves the root exactly as it was.
#[test]
fn driver_libraries_as_the_host_loader_has_them() {
    if !privileged() {
        return;
    }
    let drivers = TwoDrivers::new();
    let root = glibc_root(drivers.dir.path());
    // An image's own stub: a libcuda.so.1 link in the loader's directory, which the host's
    // library must hide (in the overlay only) without the root changing.
    let libc_dir = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64", "lib", "usr/lib"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.join("libc.so.6").exists())
        .expect("the root's libc.so.6");
    std::os::unix::fs::symlink("libcuda.so.0-stub", libc_dir.join("libcuda.so.1")).unwrap();
    let before = snapshot(&root);
    let env = [("GPUBOX_LD_CACHE", drivers.cache.as_os_str())];
    // umask 077 (the fresh host's) must not make the loader's directory unreadable to a user.
    for (extra, exec) in [
        ("", "/usr/bin/cudaprog"),
        ("ReadOnly=yes\n", "/usr/bin/cudaprog clear"),
        ("User=65534\n", "/usr/bin/cudaprog"),
    ] {
        let def = definition(
            drivers.dir.path(),
            "driver",
            &format!("[Container]\nRootDirectory={}\nExec={exec}\n{extra}[GPU]\nDriverLibraries=yes\n", root.display()),
        );
        let r = run_fresh(&def, &env);
        assert_eq!(r.code, 0, "{extra}{exec}: {}{}", r.out, r.err);
        assert_eq!(value(&r, "version"), "13000", "{extra}{exec}: the host's loader takes the first copy");
    }
    assert_eq!(snapshot(&root), before, "the root is exactly as it was");

    // The same tree as an image (issue #14): the driver's files reach it, and no layer but
    // the container's own writable one is written.
    let layout = common::oci::layout(
        &drivers.dir.path().join("layout"),
        "v1",
        &[common::oci::tar_of(&root)],
        serde_json::json!({"Cmd": ["/usr/bin/cudaprog"]}),
        true,
    );
    let store = tempfile::tempdir().unwrap();
    let def = definition(
        drivers.dir.path(),
        "driverimg",
        &format!("[Container]\nImage=oci:{}:v1\n[GPU]\nDriverLibraries=yes\n", layout.display()),
    );
    let env = [("GPUBOX_LD_CACHE", drivers.cache.as_os_str()), ("GPUBOX_STORE", store.path().as_os_str())];
    let r = run_fresh(&def, &env);
    assert_eq!(r.code, 0, "Image=: {}{}", r.out, r.err);
    assert_eq!(value(&r, "version"), "13000", "Image=: the host's loader takes the first copy");
    let layers = snapshot(&store.path().join("layers"));
    let r = run_fresh(&def, &env);
    assert_eq!(value(&r, "version"), "13000", "Image=, again: {}", r.err);
    assert_eq!(snapshot(&store.path().join("layers")), layers, "a layer was written to");
}

/// Failure 5: a root below a directory the container's root cannot search said "is not a
/// directory". Since issue #14 the root is an idmapped copy taken from the runtime directory,
/// so such a root starts; a `Bind=` source there (without `idmap`) is still refused, naming
/// the path and the host uid that could not reach it.
#[test]
fn an_unreachable_root_starts_and_an_unreachable_source_says_who_cannot_reach_it() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let root = busybox_root(dir.path());
    let def = definition(
        dir.path(),
        "hidden",
        &format!("[Container]\nRootDirectory={}\nExec=/bin/sh -c 'echo started'\n", root.display()),
    );
    let r = run_fresh(&def, &[]);
    assert_eq!((r.code, r.out.trim()), (0, "started"), "{}", r.err);
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    let def = definition(dir.path(), "hidden", &format!("[Container]\nExec=/bin/true\nBind={}:/mnt\n", data.display()));
    let r = run_fresh(&def, &[]);
    assert_eq!(r.code, 125);
    let message = format!(
        "Bind source {}: {} (mode 0700, owner uid 0) cannot be searched by host uid",
        data.display(),
        dir.path().display()
    );
    assert!(r.err.contains(&message), "{}", r.err);
}
