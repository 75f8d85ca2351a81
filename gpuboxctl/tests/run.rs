//! `gpuboxctl run` without systemd (the build machine): the supervisor in the foreground as
//! gpuboxctl's child. Needs root and the supervisor binary; without root these tests say so and
//! pass vacuously unless GPUBOX_REQUIRE_PRIVILEGED is set. The systemd path is checked in the VM.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const CTL: &str = env!("CARGO_BIN_EXE_gpuboxctl");

struct Run {
    code: i32,
    out: String,
    err: String,
}

/// Root and the supervisor cargo built next to gpuboxctl; else says why the tests are skipped.
fn ready() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("GPUBOX_REQUIRE_PRIVILEGED").is_none(), "`gpuboxctl run` tests need root");
        eprintln!("skipping: `gpuboxctl run` tests need root");
        return false;
    }
    let supervisor = Path::new(CTL).with_file_name("gpubox-supervisor");
    if !supervisor.is_file() {
        assert!(
            std::env::var_os("GPUBOX_REQUIRE_PRIVILEGED").is_none(),
            "{} is missing: build the workspace (cargo test --workspace)",
            supervisor.display()
        );
        eprintln!("skipping: {} is missing (cargo test --workspace builds it)", supervisor.display());
        return false;
    }
    if Path::new("/run/systemd/system").exists() {
        eprintln!("skipping: systemd is PID 1 here, so `run` would start a transient unit (the VM tests check that)");
        return false;
    }
    true
}

fn run(args: &[&str]) -> Run {
    run_in(Path::new("/"), args)
}

fn run_in(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(CTL)
        .current_dir(dir)
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .env("GPUBOX_CDI_DIRS", "/nonexistent")
        .env("GPUBOX_NVIDIA_PROC", "/nonexistent")
        .env_remove("INVOCATION_ID")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn definition_file(name: &str) -> PathBuf {
    Path::new("/run/gpubox").join(format!("{name}.gpubox"))
}

#[test]
fn exits_with_the_payloads_status() {
    if !ready() {
        return;
    }
    let r = run(&["--", "/bin/sh", "-c", "exit 3"]);
    assert_eq!(r.code, 3, "{}", r.err);
    // `--` is optional before the command.
    assert_eq!(run(&["/bin/sh", "-c", "exit 0"]).code, 0);
}

#[test]
fn arguments_and_environment_arrive_exactly() {
    if !ready() {
        return;
    }
    let words = [
        "plain",
        "two words",
        "  leading and trailing  ",
        "",
        "double \"quoted\"",
        "single 'quoted'",
        "$HOME ${PATH} $(id)",
        "100% %i %n %%",
        r"back\slash \n \x41 \\",
        r"trailing\",
        "tab\there",
        "new\nline",
        "#not a comment; nor this",
        "ünïcödé ✓",
        "-x",
    ];
    let mut args = vec!["--env", "A=b", "--env", "SPACED=x y \"z\" %i", "--", "/bin/sh", "-c"];
    args.push(r#"printf '%s\0' "$@"; printf 'A=%s\0SPACED=%s\0' "$A" "$SPACED""#);
    args.push("sh");
    args.extend(words);
    let r = run(&args);
    assert_eq!(r.code, 0, "{}", r.err);
    let got: Vec<&str> = r.out.strip_suffix('\0').unwrap_or(&r.out).split('\0').collect();
    let mut want = words.to_vec();
    want.extend(["A=b", "SPACED=x y \"z\" %i"]);
    assert_eq!(got, want);
}

#[test]
fn binds_relative_to_the_current_directory() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/f"), "hello\n").unwrap();
    let same_path = dir.path().join("data");
    let script = format!("cat /tmp/here/f {}/f", same_path.display());
    let r = run_in(dir.path(), &["--bind", "data:/tmp/here", "--bind", "data", "--", "/bin/sh", "-c", &script]);
    assert_eq!((r.code, r.out.as_str()), (0, "hello\nhello\n"), "{}", r.err);
}

#[test]
fn bad_selectors_fail_with_125_and_say_why() {
    if !ready() {
        return;
    }
    // Not a selector at all: the definition check stops it before anything starts.
    let r = run(&["--gpu", "frobnicate:7", "--", "/bin/true"]);
    assert_eq!(r.code, 125, "{}", r.err);
    assert!(r.err.contains("frobnicate:7") && r.err.contains("Device="), "{}", r.err);
    // A well-formed selector that matches no GPU here: the supervisor refuses to start.
    let r = run(&["--gpu", "pci:0000:fe:1f.7", "--", "/bin/true"]);
    assert_eq!(r.code, 125, "{}", r.err);
    assert!(r.err.contains("pci:0000:fe:1f.7"), "{}", r.err);
}

#[test]
fn bad_usage_exits_2() {
    // No root needed: clap refuses these before anything happens.
    assert_eq!(run(&[]).code, 2);
    assert_eq!(run(&["--network", "bridge", "--", "/bin/true"]).code, 2);
    assert_eq!(run(&["--env", "GPUBOX_TEST_SURELY_UNSET", "--", "/bin/true"]).code, 2);
    assert_eq!(run(&["--name", "../escape", "--", "/bin/true"]).code, 2);
}

#[test]
fn the_definition_file_is_removed_in_every_case() {
    if !ready() {
        return;
    }
    // The default name is random; the payload learns it from its hostname, which defaults to it.
    let r = run(&["--", "/bin/cat", "/proc/sys/kernel/hostname"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let name = r.out.trim();
    assert!(name.starts_with("gpu-run-") && name.len() == "gpu-run-".len() + 8, "{name}");
    assert!(!definition_file(name).exists());
    // A payload that fails, a container that never starts, and a given name.
    let name = format!("gpuboxctl-test-{}", std::process::id());
    assert_eq!(run(&["--name", &name, "--", "/bin/false"]).code, 1);
    assert!(!definition_file(&name).exists());
    assert_eq!(run(&["--name", &name, "--gpu", "bogus", "--", "/bin/true"]).code, 125);
    assert!(!definition_file(&name).exists());
    assert_eq!(run(&["--name", &name, "--", "/nonexistent/command"]).code, 127);
    assert!(!definition_file(&name).exists());
    // Interrupted: SIGTERM to gpuboxctl reaches the payload, and the file still goes.
    let mut child = Command::new(CTL)
        .args([
            "run",
            "--name",
            &name,
            "--",
            "/bin/sh",
            "-c",
            "trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The shell is the container's PID 1, which ignores SIGTERM until its trap is set: it says
    // when it is.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(std::time::Duration::from_secs(30));
    assert_eq!(ready.as_deref().map(str::trim), Ok("ready"), "the payload never started");
    assert!(definition_file(&name).exists(), "no definition file while it runs");
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!definition_file(&name).exists());
}
