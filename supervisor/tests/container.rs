//! Privileged tests: the real supervisor, real namespaces and seccomp, checked from inside the
//! container. They need root (CI runs as root); without it they say so and pass vacuously
//! unless GPUBOX_REQUIRE_PRIVILEGED=1, which tests/run-all sets.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

#[test]
fn defaults_hold_from_inside() {
    if !privileged() {
        return;
    }
    let r = inside(
        "",
        r#"
echo pid=$$
echo hostname=$(hostname)
echo status=$(grep -E "^(CapBnd|CapEff|CapPrm|CapInh|CapAmb|NoNewPrivs|Seccomp):" /proc/self/status | tr -d "\t" | tr "\n" " ")
echo uidmap=$(cat /proc/self/uid_map)
echo gidmap=$(cat /proc/self/gid_map)
echo dev=$(ls -A /dev | tr "\n" " ")
echo pts=$(ls -A /dev/pts | tr "\n" " ")
echo procs=$(ls /proc | grep -c "^[0-9]")
echo keys=$(wc -c < /proc/keys)
echo timer_list=$(wc -c < /proc/timer_list)
echo firmware=$(ls -A /sys/firmware | wc -l)
echo sysrq=$(echo h 2>/dev/null > /proc/sysrq-trigger && echo writable || echo denied)
echo procsys=$(echo x 2>/dev/null > /proc/sys/kernel/hostname && echo writable || echo denied)
echo hostroot=$(touch /usr/.gpubox-test 2>/dev/null && echo writable || echo denied)
echo tmp=$(touch /tmp/x && echo writable || echo denied)
echo sys=$(touch /sys/kernel/.x 2>/dev/null && echo writable || echo denied)
echo mount=$(mount -t tmpfs none /tmp 2>/dev/null && echo allowed || echo denied)
echo net=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " " | tr "\n" " ")
echo lo=$(cat /sys/class/net/lo/operstate)
"#,
    );
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(value(&r, "pid"), "1", "the payload is PID 1");
    assert!(value(&r, "hostname").starts_with(&format!("t{}-", std::process::id())), "the name is the hostname");
    // Docker's default set: chown dac_override fowner fsetid kill setgid setuid setpcap
    // net_bind_service net_raw sys_chroot mknod audit_write setfcap; none inheritable.
    assert_eq!(
        value(&r, "status"),
        "CapInh:0000000000000000 CapPrm:00000000a80425fb CapEff:00000000a80425fb CapBnd:00000000a80425fb CapAmb:0000000000000000 NoNewPrivs:1 Seccomp:2"
    );
    let uidmap: Vec<u64> = value(&r, "uidmap").split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert_eq!((uidmap[0], uidmap[2]), (0, 65536), "container root maps to 65536 host ids");
    assert!(uidmap[1] >= 0x4000_0000, "an unprivileged host range, not host root: {uidmap:?}");
    assert_eq!(value(&r, "gidmap"), value(&r, "uidmap"));
    assert_eq!(value(&r, "dev"), "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero");
    assert_eq!(value(&r, "pts"), "ptmx", "a new devpts instance");
    assert!(value(&r, "procs").parse::<u32>().unwrap() <= 4, "host processes are invisible: {}", value(&r, "procs"));
    assert_eq!(value(&r, "keys"), "0");
    assert_eq!(value(&r, "timer_list"), "0");
    assert_eq!(value(&r, "firmware"), "0");
    assert_eq!(value(&r, "sysrq"), "denied");
    assert_eq!(value(&r, "procsys"), "denied");
    assert_eq!(value(&r, "hostroot"), "denied", "the host's / is read-only");
    assert_eq!(value(&r, "tmp"), "writable", "/tmp is a private tmpfs");
    assert_eq!(value(&r, "sys"), "denied");
    assert_eq!(value(&r, "mount"), "denied");
    assert_eq!(value(&r, "net"), "lo", "Network=none: only loopback");
    assert_eq!(value(&r, "lo"), "unknown", "loopback is up (operstate of lo reads 'unknown' when up)");
}

/// x86_64 system call numbers and arguments for which an unfiltered call does not fail with
/// EPERM, so an EPERM can only come from the filter.
const PROBE: &str = r#"
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
calls = [("keyctl", 250, 0, -3, 0), ("add_key", 248, 0, 0, 0, 0, 0), ("perf_event_open", 298, 0, 0, 0, 0, 0),
         ("bpf", 321, 0, 0, 0), ("fsopen", 430, 0, 0), ("open_tree", 428, -1, 0, 0), ("mount", 165, 0, 0, 0, 0, 0),
         ("clock_settime", 227, 0, 0), ("ptrace", 101, 0, 0, 0, 0), ("userfaultfd", 323, 0),
         ("open_by_handle_at", 304, -1, 0, 0), ("init_module", 175, 0, 0, 0), ("kexec_load", 246, 0, 0, 0, 0),
         ("swapon", 167, 0, 0), ("reboot", 169, 0, 0, 0, 0), ("unshare", 272, 0x10000000)]
for name, nr, *args in calls:
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    print(name + "=" + ("ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]))
"#;

#[test]
fn seccomp_denies_with_eperm() {
    if !privileged() || !cfg!(target_arch = "x86_64") {
        return;
    }
    let probe = |extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("probe.py"), PROBE).unwrap();
        let r = run(&format!(
            "[Container]\nExec=/usr/bin/python3 /tmp/probe.py\nBindReadOnly={}:/tmp/probe.py\n{extra}",
            dir.path().join("probe.py").display()
        ));
        assert_eq!(r.code, 0, "{}", r.err);
        r
    };
    let confined = probe("");
    let unconfined = probe("Seccomp=unconfined\n");
    for name in [
        "keyctl",
        "add_key",
        "perf_event_open",
        "bpf",
        "fsopen",
        "open_tree",
        "mount",
        "clock_settime",
        "ptrace",
        "userfaultfd",
        "open_by_handle_at",
        "init_module",
        "kexec_load",
        "swapon",
        "reboot",
        "unshare",
    ] {
        assert_eq!(value(&confined, name), "EPERM", "{name} under the default profile");
    }
    // A granted capability lifts the calls it guards, as in Docker's profile.
    let ptrace = probe("AddCapability=CAP_SYS_PTRACE\n");
    assert_eq!(value(&ptrace, "ptrace"), "ok");
    assert_eq!(value(&ptrace, "keyctl"), "EPERM");
    // Where the kernel itself answers something else, the EPERM above came from the filter.
    for name in ["keyctl", "add_key", "perf_event_open", "clock_settime", "ptrace", "unshare"] {
        assert_ne!(value(&unconfined, name), "EPERM", "{name} unconfined");
    }
}

#[test]
fn oci_seccomp_profile_is_applied() {
    if !privileged() || !cfg!(target_arch = "x86_64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.json");
    fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
            "syscalls":[{"names":["uname"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
    )
    .unwrap();
    let r = inside(&format!("Seccomp={}\n", profile.display()), "uname -s; echo code=$?");
    assert_eq!(value(&r, "code"), "1", "uname(2) is denied by the profile: {}", r.err);
    assert!(r.err.contains("Function not implemented"), "{}", r.err);
    // Docker's rule conditions: a rule that excludes CAP_SYS_NICE does not apply when granted.
    fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["uname"],"action":"SCMP_ACT_ERRNO","errnoRet":38,
            "excludes":{"caps":["CAP_SYS_NICE"]}}]}"#,
    )
    .unwrap();
    let without = inside(&format!("Seccomp={}\n", profile.display()), "uname -s >/dev/null; echo code=$?");
    let with = inside(
        &format!("Seccomp={}\nAddCapability=SYS_NICE\n", profile.display()),
        "uname -s >/dev/null; echo code=$?",
    );
    assert_eq!((value(&without, "code"), value(&with, "code")), ("1", "0"));
}

#[test]
fn capabilities_and_user_are_adjustable() {
    if !privileged() {
        return;
    }
    let r = inside(
        "AddCapability=CAP_SYS_NICE\nDropCapability=NET_RAW MKNOD\n",
        "echo bnd=$(grep CapBnd /proc/self/status | cut -f2)",
    );
    const NET_RAW: u64 = 1 << 13;
    const SYS_NICE: u64 = 1 << 23;
    const MKNOD: u64 = 1 << 27;
    assert_eq!(value(&r, "bnd"), format!("{:016x}", (0xa80425fb | SYS_NICE) & !NET_RAW & !MKNOD), "{}", r.err);
    let r = inside("DropCapability=all\n", "echo bnd=$(grep CapBnd /proc/self/status | cut -f2)");
    assert_eq!(value(&r, "bnd"), "0000000000000000");
    // As with Docker and Podman: drop all, then add back.
    let r = inside(
        "DropCapability=all\nAddCapability=NET_BIND_SERVICE\n",
        "echo bnd=$(grep CapBnd /proc/self/status | cut -f2)",
    );
    assert_eq!(value(&r, "bnd"), "0000000000000400");
    let r = inside("User=65534:65534\n", "echo id=$(id -u):$(id -g) eff=$(grep CapEff /proc/self/status | cut -f2)");
    assert_eq!(value(&r, "id"), "65534:65534 eff=0000000000000000");
    let r = inside(
        "UserNamespace=host\nNoNewPrivileges=no\n",
        "echo map=$(cat /proc/self/uid_map) nnp=$(grep NoNewPrivs /proc/self/status | cut -f2)",
    );
    assert_eq!(value(&r, "map"), "0 0 4294967295 nnp=0");
}

#[test]
fn binds_root_directory_and_read_only() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (rw, ro) = (dir.path().join("rw"), dir.path().join("ro"));
    fs::create_dir_all(&rw).unwrap();
    fs::create_dir_all(&ro).unwrap();
    fs::write(ro.join("file"), "data").unwrap();
    // The container's root is mapped to an unprivileged host id: let it write here.
    nix::unistd::chown(&rw, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    fs::set_permissions(&rw, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let r = inside(
        &format!("Bind={}:/mnt\nBindReadOnly={}:/media\nBind=-/nonexistent/source:/srv\n", rw.display(), ro.display()),
        "echo rw=$(echo hi > /mnt/out && echo ok); echo ro=$(cat /media/file; echo x > /media/file 2>/dev/null && echo writable || echo denied)",
    );
    assert_eq!(value(&r, "rw"), "ok", "{}", r.err);
    assert_eq!(value(&r, "ro"), "datadenied");
    assert_eq!(fs::read_to_string(rw.join("out")).unwrap(), "hi\n");

    // A root file system of our own: busybox, with ReadOnly=yes.
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox (tests/install-deps installs busybox-static)");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let r = run(&format!(
        "[Container]\nRootDirectory={}\nReadOnly=yes\nExec=/bin/busybox sh -c 'echo files=$(/bin/busybox ls /bin | /bin/busybox tr \"\\n\" \" \"); /bin/busybox touch /x 2>/dev/null || echo ro=denied'\n",
        root.display()
    ));
    assert_eq!(value(&r, "files"), "busybox sh", "{}", r.err);
    assert_eq!(value(&r, "ro"), "denied");
    let r = run(&format!(
        "[Container]\nRootDirectory={}\nReadOnly=yes\nExec=/bin/busybox sh -c '/bin/busybox touch /tmp/x && echo tmp=writable'\n",
        root.display()
    ));
    assert_eq!(value(&r, "tmp"), "writable", "a read-only root gets a tmpfs /tmp: {}", r.err);
}

#[test]
fn exit_status_and_signals_propagate() {
    if !privileged() {
        return;
    }
    assert_eq!(inside("", "exit 7").code, 7);
    // Init=yes: the shell is not PID 1, so it can die of its own SIGTERM.
    assert_eq!(inside("Init=yes\n", "kill -TERM $$; sleep 5").code, 143);

    let dir = tempfile::tempdir().unwrap();
    let start = |text: &str, timeout: &str| {
        Command::new(SUPERVISOR)
            .args(["run", "--definition"])
            .arg(definition(dir.path(), "sig", text))
            .env("GPUBOX_STOP_TIMEOUT", timeout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let stop = |child: std::process::Child| {
        // The control socket comes once the payload runs, long after signals are blocked.
        wait_for_control("sig", Duration::from_secs(30));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let t = Instant::now();
        let out = child.wait_with_output().unwrap();
        (out.status.code().unwrap(), t.elapsed(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // SIGTERM is forwarded; the init passes it to the payload.
    let (code, _, _) = stop(start("[Container]\nExec=sleep 30\nInit=yes\n", "10"));
    assert_eq!(code, 143);
    // A PID 1 without a SIGTERM handler ignores it: killed after the stop timeout.
    let (code, took, err) = stop(start("[Container]\nExec=sleep 30\n", "0.5"));
    assert_eq!(code, 137, "{err}");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_secs(5), "{took:?}");
    assert!(err.contains("killing it"), "{err}");
}

#[test]
fn failures_are_clear_and_leave_nothing_behind() {
    if !privileged() {
        return;
    }
    let mounts = host_mounts();
    let cases: &[(&str, i32, &str)] = &[
        ("Exec=/no/such/program\n", 127, "cannot execute /no/such/program: No such file or directory"),
        ("Exec=no-such-program\n", 127, "cannot execute no-such-program: not found in PATH="),
        ("Exec=/bin/true\nWorkingDirectory=/no/such/dir\n", 125, "WorkingDirectory=/no/such/dir: ENOENT"),
        ("Exec=/bin/true\nRootDirectory=/no/such/root\n", 125, "RootDirectory=/no/such/root is not a directory"),
        ("Exec=/bin/true\nBind=/no/such/source:/mnt\n", 125, "Bind source /no/such/source"),
        ("Exec=/bin/true\nUser=nosuchuser\n", 125, "User=nosuchuser: no such user"),
        ("Exec=/bin/true\nNetwork=bridge\n", 125, ".gpubox:3: [Container] Network=: expected one of none, host"),
    ];
    for (keys, code, message) in cases {
        let r = run(&format!("[Container]\n{keys}"));
        assert_eq!(r.code, *code, "{keys}: {}", r.err);
        assert!(r.err.contains(message), "{keys}: {}", r.err);
    }
    assert_eq!(host_mounts(), mounts, "no mount leaked to the host");
    assert_eq!(gpubox_cgroups(), Vec::<String>::new(), "no cgroup left behind");
}

#[test]
fn sigkill_of_the_supervisor_takes_the_payload_with_it() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = definition(dir.path(), "orphan", "[Container]\nExec=/bin/sh -c 'sleep 300 & sleep 300'\n");
    let mut sup =
        Command::new(SUPERVISOR).args(["run", "--definition"]).arg(&path).stderr(Stdio::null()).spawn().unwrap();
    let sup_pid = sup.id();
    let payload = (0..1000)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            let kids = fs::read_to_string(format!("/proc/{sup_pid}/task/{sup_pid}/children")).unwrap_or_default();
            kids.split_whitespace().next().map(str::to_owned)
        })
        .expect("the payload started");
    sup.kill().unwrap();
    sup.wait().unwrap();
    let t = Instant::now();
    while Path::new(&format!("/proc/{payload}")).exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!Path::new(&format!("/proc/{payload}")).exists(), "payload {payload} outlived its supervisor");
    // The id-range reservation died with the process; the empty cgroup goes at the next start.
    assert_eq!(run("[Container]\nExec=/bin/true\n").code, 0);
    assert_eq!(gpubox_cgroups(), Vec::<String>::new(), "the SIGKILLed supervisor's cgroup was swept");
}

#[test]
fn concurrent_containers_get_distinct_id_ranges() {
    if !privileged() {
        return;
    }
    // Two names whose preferred range is the same (the supervisor starts from a hash of the
    // name): the second must get another one.
    let fnv = |s: &str| s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193)) % 4096;
    let first = format!("idr{}", std::process::id());
    let second = (0..100_000).map(|i| format!("idr{i}x")).find(|n| fnv(n) == fnv(&first)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spawn = |name: &str| {
        Command::new(SUPERVISOR)
            .args(["run", "--definition"])
            .arg(definition(dir.path(), name, "[Container]\nExec=/bin/sh -c 'cat /proc/self/uid_map; sleep 60'\n"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Both run at once: each has printed its map while the other still runs.
    let (mut a, mut b) = (spawn(&first), spawn(&second));
    let base = |child: &mut std::process::Child| {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        line.split_whitespace().nth(1).unwrap_or_else(|| panic!("no uid_map: {line:?}")).to_owned()
    };
    let (base_a, base_b) = (base(&mut a), base(&mut b));
    for mut child in [a, b] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_ne!(base_a, base_b);
}

#[test]
fn a_name_runs_once_at_a_time() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = format!("once{}", std::process::id());
    let def = definition(dir.path(), &name, "[Container]\nExec=sleep 60\n");
    let mut first =
        Command::new(SUPERVISOR).args(["run", "--definition"]).arg(&def).stderr(Stdio::null()).spawn().unwrap();
    wait_for_control(&name, Duration::from_secs(30));
    let second = Command::new(SUPERVISOR).args(["run", "--definition"]).arg(&def).output().unwrap();
    assert_eq!(second.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&second.stderr).contains("is already running"));
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn device_cgroup_denies_a_node_that_was_not_selected() {
    if !privileged() {
        return;
    }
    // /dev/fuse's numbers: opening it has no side effects, and mode 0666 lets anyone try.
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("fuse");
    standin_node(&node);
    let script = "if (exec 3<> /tmp/fuse); then echo open=yes; else echo open=no; fi";
    let r = inside(&format!("UserNamespace=host\nBind={}:/tmp/fuse\n", node.display()), script);
    assert_eq!(value(&r, "open"), "no", "{}", r.err);
    // Root with a mode-0666 node: only the device cgroup can say no, and it says EPERM.
    assert!(r.err.contains("Operation not permitted"), "denied by the device cgroup: {}", r.err);
    let r = inside(&format!("Bind={}:/tmp/fuse\n", node.display()), script);
    assert_eq!(value(&r, "open"), "no", "{}", r.err);
}

/// A CDI spec naming stand-in devices (nodes with /dev/fuse's numbers, harmless to open), as
/// a vendor's tool would write one for its GPUs.
#[test]
fn cdi_device_passes_through_with_its_edits() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for n in ["standin0", "standin1"] {
        nix::sys::stat::mknod(
            &d.join(n),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o660),
            nix::sys::stat::makedev(10, 229),
        )
        .unwrap();
        // The mode the spec leaves to the host node (mknod applies the umask).
        fs::set_permissions(d.join(n), std::os::unix::fs::PermissionsExt::from_mode(0o660)).unwrap();
    }
    fs::create_dir_all(d.join("libs")).unwrap();
    fs::write(d.join("libs/libstandin.so.1"), "not really a library").unwrap();
    fs::write(
        d.join("hook.sh"),
        format!("#!/bin/sh\ncat > {}/hook-state.json\necho \"$1\" > {}/hook-arg\n", d.display(), d.display()),
    )
    .unwrap();
    fs::set_permissions(d.join("hook.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fs::create_dir_all(d.join("cdi")).unwrap();
    fs::write(
        d.join("cdi/example.yaml"),
        format!(
            r#"cdiVersion: "0.6.0"
kind: example.com/gpu
devices:
  - name: first
    containerEdits:
      deviceNodes:
        - path: /dev/standin0
          hostPath: {d}/standin0
  - name: second
    containerEdits:
      deviceNodes:
        - path: /dev/standin1
          hostPath: {d}/standin1
  - name: owned
    containerEdits:
      deviceNodes:
        - path: /dev/standin2
          hostPath: {d}/standin0
          fileMode: 416
          uid: 0
          gid: 44
containerEdits:
  env:
    - STANDIN_VISIBLE=yes
  mounts:
    - hostPath: {d}/libs
      containerPath: /tmp/standin-libs
      options: [ro, nosuid, nodev, bind]
  hooks:
    - hookName: createContainer
      path: {d}/hook.sh
      args: [hook.sh, created]
"#,
            d = d.display()
        ),
    )
    .unwrap();
    let script = "echo nodes=$(ls /dev | grep standin | tr '\\n' ' '); \
        if (exec 3<> /dev/standin0); then echo open=yes; else echo open=no; fi; \
        echo owner=$(stat -c %u:%g:%a /dev/standin0); echo env=$STANDIN_VISIBLE; \
        echo lib=$(cat /tmp/standin-libs/libstandin.so.1); \
        echo ro=$(touch /tmp/standin-libs/x 2>/dev/null && echo writable || echo denied)";
    let file = d.join("test.sh");
    fs::write(&file, script).unwrap();
    let cdi = d.join("cdi");
    let def = definition(d, "cdi", &format!("[Container]\nExec=/bin/sh /tmp/test.sh\nBindReadOnly={}:/tmp/test.sh\n[GPU]\nDevice=cdi:example.com/gpu=first\n", file.display()));
    let r = run_file(&def, &[("GPUBOX_CDI_DIRS", cdi.as_os_str())]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(value(&r, "nodes"), "standin0", "the selected device only");
    assert_eq!(value(&r, "open"), "yes", "usable by container root: {}", r.err);
    assert_eq!(value(&r, "owner"), "0:0:660", "owned by container root, not host root");
    assert_eq!(value(&r, "env"), "yes");
    assert_eq!(value(&r, "lib"), "not really a library");
    assert_eq!(value(&r, "ro"), "denied");
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(d.join("hook-state.json")).unwrap()).unwrap();
    assert_eq!((state["id"].as_str(), state["status"].as_str()), (Some("cdi"), Some("created")), "{state}");
    assert!(state["pid"].as_u64().unwrap() > 1);
    assert_eq!(fs::read_to_string(d.join("hook-arg")).unwrap(), "created\n");
    assert!(!Path::new("/run/gpubox/cdi").exists(), "staging and bundle directories are gone");

    // A payload that is not root opens it too: the node's group is User='s.
    let def = definition(d, "cdi-user", &format!("[Container]\nExec=/bin/sh /tmp/test.sh\nBindReadOnly={}:/tmp/test.sh\nUser=65534:65534\n[GPU]\nDevice=cdi:example.com/gpu=first\n", file.display()));
    let r = run_file(&def, &[("GPUBOX_CDI_DIRS", cdi.as_os_str())]);
    assert_eq!((value(&r, "open"), value(&r, "owner")), ("yes", "0:65534:660"), "{}", r.err);

    // The spec's fileMode (0640, as Go writes it: decimal 416), uid and gid, in the container's
    // terms.
    let owned = d.join("owned.sh");
    fs::write(&owned, "echo owner=$(stat -c %u:%g:%a /dev/standin2)").unwrap();
    let def = definition(d, "cdi-owned", &format!("[Container]\nExec=/bin/sh /tmp/owned.sh\nBindReadOnly={}:/tmp/owned.sh\n[GPU]\nDevice=cdi:example.com/gpu=owned\n", owned.display()));
    let r = run_file(&def, &[("GPUBOX_CDI_DIRS", cdi.as_os_str())]);
    assert_eq!(value(&r, "owner"), "0:44:640", "{}", r.err);

    // A device that does not exist: the error lists what does.
    let def = definition(d, "cdi2", "[Container]\nExec=/bin/true\n[GPU]\nDevice=cdi:example.com/gpu=third\n");
    let r = run_file(&def, &[("GPUBOX_CDI_DIRS", cdi.as_os_str())]);
    assert_eq!(r.code, 125);
    let err = &r.err;
    assert!(err.contains("example.com/gpu=third") && err.contains("first") && err.contains("second"), "{err}");
}

/// The NVIDIA path with a stand-in GPU (the driver's /proc tree and a /dev/nvidiaN node).
#[test]
fn nvidia_gpu_with_a_stand_in() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::new();
    let (dir, minor) = (gpu.dir.path(), gpu.minor);
    let def = definition(
        dir,
        "nv",
        &format!("[Container]\nExec=/bin/sh -c 'ls /dev | grep nvidia; (exec 3<> /dev/nvidia{minor}) && echo open=yes'\n[GPU]\nDevice=nvidia:0\n"),
    );
    let r = run_file(&def, &gpu.env());
    let (stdout, stderr) = (&r.out, &r.err);
    assert_eq!(r.code, 0, "{stderr}");
    assert!(stdout.lines().any(|l| l == format!("nvidia{minor}")), "{stdout}");
    assert!(stdout.contains("open=yes"), "{stdout}{stderr}");
    assert!(stderr.contains("devices: nvidia:0"), "{stderr}");

    // A selector for a GPU that is not there lists the one that is.
    let def = definition(dir, "nv1", "[Container]\nExec=/bin/true\n[GPU]\nDevice=nvidia:1\n");
    let r = run_file(&def, &gpu.env());
    let stderr = &r.err;
    assert_eq!(r.code, 125);
    assert!(
        stderr.contains("nvidia:1 matches no GPU")
            && stderr.contains("nvidia:GPU-00000000-1111-2222-3333-444444444440"),
        "{stderr}"
    );
}
