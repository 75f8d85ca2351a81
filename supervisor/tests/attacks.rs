//! Issue #12, the security review: each test is an attack the audit made, written as the
//! attack (from inside the container where it came from inside), and what must hold instead.
//! Privileged, as container.rs.

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Critical: `ioctl(0, TIOCSTI, …)` pushed a command into the terminal the container inherited,
/// and the caller's shell ran it as root once the container was gone. The supervisor runs
/// here in a terminal session of its own, as from a shell; the payload tries TIOCSTI on each
/// of its standard descriptors. Nothing may reach the caller's terminal, and `/dev/console`
/// inside is not the caller's terminal.
#[test]
fn terminal_injection_cannot_reach_the_callers_terminal() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tiocsti.py");
    fs::write(
        &script,
        r#"import fcntl, os, termios
for fd in (0, 1, 2):
    try:
        for c in b"echo INJECTED\n":
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([c]))
        print("pushed", fd)
    except OSError as e:
        print("refused", fd, e.errno)
if os.path.exists("/dev/console"):
    print("console=%d:%d" % (os.major(os.stat("/dev/console").st_rdev), os.minor(os.stat("/dev/console").st_rdev)))
else:
    print("console=none")
"#,
    )
    .unwrap();
    let def = definition(
        dir.path(),
        "tiocsti",
        &format!(
            "[Container]\nExec=/usr/bin/env python3 /tmp/tiocsti.py\nBindReadOnly={}:/tmp/tiocsti.py\n",
            script.display()
        ),
    );
    let mut direct = Command::new(SUPERVISOR);
    direct.args(["run", "--definition"]).arg(&def).env_remove("INVOCATION_ID");
    tiocsti_from_a_terminal(direct);
    // The same through `gpuboxctl run` (here without systemd: the supervisor as its child).
    let ctl = std::path::Path::new(SUPERVISOR).with_file_name("gpuboxctl");
    if ctl.is_file() {
        let mut through_ctl = Command::new(ctl);
        through_ctl
            .args(["run", "-v", &format!("{}:/tmp/tiocsti.py:ro", script.display()), "--"])
            .args(["/usr/bin/env", "python3", "/tmp/tiocsti.py"])
            .env_remove("INVOCATION_ID");
        tiocsti_from_a_terminal(through_ctl);
    } else {
        assert!(
            std::env::var_os("GPUBOX_REQUIRE_PRIVILEGED").is_none(),
            "gpuboxctl is not built beside the supervisor"
        );
    }
}

/// Runs `command` (a container running tiocsti.py) from a terminal, as a login shell would,
/// and checks that nothing was pushed into that terminal and /dev/console is not it.
fn tiocsti_from_a_terminal(mut command: Command) {
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = pty.slave.as_raw_fd();
    let rdev = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(nix::unistd::ttyname(&pty.slave).unwrap()).unwrap().rdev()
    };
    // SAFETY: between fork and exec, only async-signal-safe calls: a new session whose
    // controlling terminal is the pty, as a login shell has.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            for fd in 0..3 {
                libc::dup2(slave, fd);
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    // Read what the container writes while it runs (the terminal's buffer is small).
    let master = fs::File::from(pty.master);
    nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
    let mut shown = Vec::new();
    let read_some = |shown: &mut Vec<u8>| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = (&master).read(&mut buf) {
            if n == 0 {
                break;
            }
            shown.extend_from_slice(&buf[..n]);
        }
    };
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        read_some(&mut shown);
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the supervisor hung: {}", String::from_utf8_lossy(&shown));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    read_some(&mut shown);
    let shown = String::from_utf8_lossy(&shown).into_owned();
    // What is waiting to be read on the caller's terminal: its shell would run it.
    nix::fcntl::fcntl(&pty.slave, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
    let mut pending = [0u8; 4096];
    let n = nix::unistd::read(&pty.slave, &mut pending).unwrap_or(0);
    let pending = String::from_utf8_lossy(&pending[..n]);
    assert!(
        !pending.contains("INJECTED"),
        "the container pushed input into the caller's terminal: {pending:?}\n{shown}"
    );
    assert!(shown.contains("console="), "{shown}");
    let console = format!("console={}:{}", libc::major(rdev), libc::minor(rdev));
    assert!(!shown.contains(&console), "/dev/console is the caller's terminal: {shown}");
}

/// The same with stdin from /dev/null and stdout on the terminal (`gpubox … < /dev/null` from
/// a shell): the payload must not read what the caller types from its stdout.
#[test]
fn a_payload_cannot_read_the_callers_typing_through_stdout() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let def = definition(
        dir.path(),
        "snoop",
        "[Container]\nExec=/usr/bin/env python3 -c 'import os, select; r, _, _ = select.select([1], [], [], 3); print(\"read=\" + (os.read(1, 100).decode(errors=\"replace\").strip() if r else \"nothing\"))'\n",
    );
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = pty.slave.as_raw_fd();
    let mut command = Command::new(SUPERVISOR);
    command.args(["run", "--definition"]).arg(&def).env_remove("INVOCATION_ID").stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            libc::dup2(slave, 1);
            libc::dup2(slave, 2);
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let master = fs::File::from(pty.master);
    std::thread::sleep(Duration::from_millis(700));
    // The caller types.
    std::io::Write::write_all(&mut &master, b"SECRET\n").unwrap();
    nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
    let mut shown = Vec::new();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        let mut buf = [0u8; 4096];
        while let Ok(n) = (&master).read(&mut buf) {
            if n == 0 {
                break;
            }
            shown.extend_from_slice(&buf[..n]);
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = (&master).read(&mut buf) {
        if n == 0 {
            break;
        }
        shown.extend_from_slice(&buf[..n]);
    }
    let shown = String::from_utf8_lossy(&shown);
    assert!(shown.contains("read="), "{shown}");
    assert!(!shown.contains("read=SECRET"), "the payload read the caller's typing: {shown}");
}

/// High: a descriptor the caller left open (`exec 7</` before the start) let the payload read
/// and write host files from its own root (CVE-2024-21626 class).
#[test]
fn inherited_descriptors_do_not_reach_the_payload() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = busybox_root(dir.path());
    let def = definition(
        dir.path(),
        "leak",
        &format!(
            "[Container]\nRootDirectory={}\nExec=/bin/busybox sh -c 'echo fds=$(/bin/busybox ls /proc/self/fd | /bin/busybox tr \"\\n\" \" \"); /bin/busybox cat /proc/self/fd/7/etc/hostname && echo escaped=yes'\n",
            root.display()
        ),
    );
    let host_root = fs::File::open("/").unwrap();
    let fd = host_root.as_raw_fd();
    let mut command = Command::new(SUPERVISOR);
    command.args(["run", "--definition"]).arg(&def).env_remove("INVOCATION_ID").stdin(Stdio::null());
    // SAFETY: dup2 to a fixed number without close-on-exec, as a shell's `exec 7</` leaves it.
    unsafe {
        command.pre_exec(move || {
            libc::dup2(fd, 7);
            Ok(())
        });
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("escaped=yes"), "{stdout}");
    // 0–2, and the directory `ls` itself reads.
    assert_eq!(stdout.lines().find_map(|l| l.strip_prefix("fds=")).map(str::trim), Some("0 1 2 3"), "{stdout}");
}

/// Medium: a symlink left in the root (`/data/work -> /some/host/dir`) made the next start create
/// a host directory as root and mount elsewhere than asked. The first start's payload leaves
/// the link; the second start binds below it. Nothing may be made on the host, and the bind
/// lands inside the root.
#[test]
fn symlinks_in_the_root_cannot_redirect_mounts() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = busybox_root(dir.path());
    let data = root.join("data");
    fs::create_dir(&data).unwrap();
    // The container's root may write here.
    fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let host_target = dir.path().join("host-only/dir");
    let source = dir.path().join("source");
    fs::create_dir(&source).unwrap();
    fs::write(source.join("marker"), "bound").unwrap();
    let leave = definition(
        dir.path(),
        "leave",
        &format!(
            "[Container]\nRootDirectory={}\nExec=/bin/busybox ln -s {} /data/work\n",
            root.display(),
            host_target.display()
        ),
    );
    assert_eq!(run_file(&leave, &[]).code, 0);
    assert!(fs::symlink_metadata(data.join("work")).unwrap().file_type().is_symlink());
    let follow = definition(
        dir.path(),
        "follow",
        &format!(
            "[Container]\nRootDirectory={}\nBindReadOnly={}:/data/work/sub\nExec=/bin/busybox cat /data/work/sub/marker\n",
            root.display(),
            source.display()
        ),
    );
    let r = run_file(&follow, &[]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out, "bound");
    assert!(!dir.path().join("host-only").exists(), "a directory was made on the host");
    assert!(root.join(host_target.strip_prefix("/").unwrap()).join("sub").is_dir(), "made inside the root");
    // And again: the link, now resolvable inside, leads to the same place.
    assert_eq!(run_file(&follow, &[]).code, 0);
}

/// Medium: `/etc/passwd -> /dev/zero` in the root with `User=NAME` made the supervisor read
/// 2 GB before it failed. It is refused at once, naming the file.
#[test]
fn account_files_are_read_bounded_and_never_from_a_device() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = busybox_root(dir.path());
    std::os::unix::fs::symlink("/dev/zero", root.join("etc/passwd")).unwrap();
    let def = definition(
        dir.path(),
        "zero",
        &format!("[Container]\nRootDirectory={}\nUser=nobody\nExec=/bin/busybox true\n", root.display()),
    );
    let t = Instant::now();
    let r = run_file(&def, &[]);
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    assert_eq!(r.code, 125);
    assert!(r.err.contains("/etc/passwd in the container: /etc/passwd is not a regular file"), "{}", r.err);
}

/// Medium: any local user (uid 65534) bound the abstract sockets that reserved names and id
/// ranges: "a container named … is already running", "no free user-namespace id range".
/// The squatter binds all of them; the container still starts, and the user cannot take the
/// locks that reserve them now.
#[test]
fn a_local_user_cannot_squat_names_or_id_ranges() {
    if !privileged() {
        return;
    }
    let name = format!("squat{}", std::process::id());
    let squatter = format!(
        r#"import os, socket, sys, time
held = []
for addr in ["gpubox/name/{name}"] + ["gpubox/idrange/%d" % (0x40000000 + i * 65536) for i in range(4096)]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind("\0" + addr); held.append(s)
    except OSError:
        pass
try:
    open("/run/gpubox/.locks/name-{name}", "a")
    print("lock=taken", flush=True)
except OSError as e:
    print("lock=refused", flush=True)
print("squatting", len(held), flush=True)
time.sleep(30)
"#
    );
    let mut command = Command::new("python3");
    command.args(["-c", &squatter]).stdout(Stdio::piped());
    // SAFETY: only setgroups/setgid/setuid between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let none: [libc::gid_t; 0] = [];
            if libc::setgroups(0, none.as_ptr()) != 0 || libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The lock directory exists once any container ran; make sure it does.
    assert_eq!(run("[Container]\nExec=/bin/true\n").code, 0);
    let mut squatter = command.spawn().unwrap();
    let mut out = std::io::BufReader::new(squatter.stdout.take().unwrap());
    let mut lines = String::new();
    for _ in 0..2 {
        std::io::BufRead::read_line(&mut out, &mut lines).unwrap();
    }
    assert!(lines.contains("lock=refused") && lines.contains("squatting 4097"), "{lines}");
    let dir = tempfile::tempdir().unwrap();
    let r = run_file(&definition(dir.path(), &name, "[Container]\nExec=/bin/true\n"), &[]);
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert_eq!(r.code, 0, "{}", r.err);
}

/// Low: after a SIGKILL of a standalone supervisor, `/run/gpubox/NAME/{control,devices}` stayed:
/// `gpuboxctl list` showed a ghost and `gpuboxctl hotplug` failed on it. Now the ghost is not
/// listed, hotplug passes it by, and the next start of that name cleans up after it.
#[test]
fn a_killed_supervisor_leaves_no_ghost() {
    if !privileged() {
        return;
    }
    let ctl = Path::new(SUPERVISOR).with_file_name("gpuboxctl");
    let name = format!("ghost{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let def = definition(dir.path(), &name, "[Container]\nExec=sleep 60\n");
    let mut sup =
        Command::new(SUPERVISOR).args(["run", "--definition"]).arg(&def).stderr(Stdio::null()).spawn().unwrap();
    let control = Path::new("/run/gpubox").join(&name).join("control");
    wait_for_control(&name, Duration::from_secs(10));
    sup.kill().unwrap();
    sup.wait().unwrap();
    assert!(control.exists(), "SIGKILL skips the cleanup (the premise of this test)");
    let list = Command::new(&ctl).args(["list", "--json"]).env("GPUBOX_DEFINITIONS_PATH", dir.path()).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let entry: serde_json::Value = serde_json::from_str::<serde_json::Value>(&list)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name.as_str())
        .cloned()
        .unwrap_or_default();
    assert_ne!(entry["state"], "running", "{list}");
    let hotplug = Command::new(&ctl).args(["hotplug", "add", "/dev/null"]).output().unwrap();
    let err = String::from_utf8_lossy(&hotplug.stderr);
    assert!(!err.contains(&name), "{err}");
    // The next start (a short one) removes what was left, and its own stop leaves nothing.
    fs::write(&def, "[Container]\nExec=/bin/true\n").unwrap();
    let r = run_file(&def, &[]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(!Path::new("/run/gpubox").join(&name).exists(), "the runtime directory is gone");
}

/// Low: inheritable capabilities were left set (CVE-2022-24769 class); `io_uring_setup` and
/// `personality(ADDR_NO_RANDOMIZE)` were allowed. Checked from inside, as root and as a user.
#[test]
fn no_inheritable_capabilities_no_io_uring_no_aslr_off() {
    if !privileged() {
        return;
    }
    let script = r#"
echo inh=$(grep CapInh /proc/self/status | cut -f2)
python3 - <<'PY'
import ctypes, ctypes.util, os
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
r = libc.syscall(425, 8, params)
print("io_uring=%s" % ("errno%d" % ctypes.get_errno() if r < 0 else "allowed"))
r = libc.personality(0x0040000)
print("aslr_off=%s" % ("errno%d" % ctypes.get_errno() if r < 0 else "allowed"))
print("query=%s" % ("ok" if libc.personality(0xffffffff) >= 0 else "refused"))
PY
"#;
    for user in ["", "User=65534\n"] {
        let r = inside(user, script);
        assert_eq!(value(&r, "inh"), "0000000000000000", "{user}{}", r.err);
        assert_eq!(value(&r, "io_uring"), "errno1", "{user}");
        assert_eq!(value(&r, "aslr_off"), "errno1", "{user}");
        assert_eq!(value(&r, "query"), "ok", "{user}");
    }
}

/// Issue #12 review: looking at the locks (`gpuboxctl list`, another supervisor's scan) must
/// never make a start fail: a look that took a lock for a moment made a supervisor's own
/// non-blocking lock fail ("already running").
#[test]
fn looking_at_the_locks_never_fails_a_start() {
    if !privileged() {
        return;
    }
    let ctl = Path::new(SUPERVISOR).with_file_name("gpuboxctl");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lookers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ctl) = (stop.clone(), ctl.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = Command::new(&ctl).args(["list"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
                    // Often, not so often that the starts it watches starve of CPU.
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let def = definition(dir.path(), &format!("looked{}", std::process::id()), "[Container]\nExec=/bin/true\n");
    let failed: Vec<String> = (0..30).map(|_| run_file(&def, &[])).filter(|r| r.code != 0).map(|r| r.err).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    lookers.into_iter().for_each(|l| l.join().unwrap());
    assert!(failed.is_empty(), "{failed:?}");
}
