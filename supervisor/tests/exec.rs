//! `gpuboxctl exec` (issue #15): a command entering a running container has exactly the
//! payload's confinement, seen from inside: capability sets, no_new_privs, seccomp, every
//! namespace, the cgroup and the environment; its terminal is the container's own; its exit
//! status comes back; callers that are not root are refused.

mod common;

use common::{privileged, wait_for_control, SUPERVISOR};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn ctl() -> PathBuf {
    Path::new(SUPERVISOR).with_file_name("gpuboxctl")
}

/// A standalone container running `sleep`, stopped when dropped.
struct Running {
    name: String,
    supervisor: Child,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(name: &str, extra: &str) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("[Container]\nExec=sleep 300\nEnvironment=FROM_DEFINITION=yes\n{extra}");
        let path = common::definition(dir.path(), name, &text);
        let supervisor = Command::new(SUPERVISOR)
            .args(["run", "--definition"])
            .arg(&path)
            // sleep as pid 1 ignores SIGTERM: the stop goes straight on to SIGKILL.
            .env("GPUBOX_STOP_TIMEOUT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_control(name, Duration::from_secs(10));
        Running { name: name.to_owned(), supervisor, _dir: dir }
    }

    /// `gpuboxctl exec ARGS… NAME -- sh -c SCRIPT`: (exit status, stdout, stderr).
    fn exec(&self, args: &[&str], script: &str) -> (i32, String, String) {
        let out = Command::new(ctl())
            .arg("exec")
            .args(args)
            .args([&self.name, "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.supervisor.id() as i32), nix::sys::signal::SIGTERM);
        let _ = self.supervisor.wait();
    }
}

/// What must be the same for the payload (pid 1 inside) and the exec'd shell.
const CONFINEMENT: &str = r#"
for p in 1 self; do
  grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp|Seccomp_filters):' /proc/$p/status
  for ns in cgroup ipc mnt net pid user uts; do echo "$ns $(readlink /proc/$p/ns/$ns)"; done
  cat /proc/$p/cgroup
  echo ===
done"#;

fn assert_confined_as_payload(c: &Running) {
    let (code, out, err) = c.exec(&[], CONFINEMENT);
    assert_eq!(code, 0, "{err}");
    let halves: Vec<&str> = out.split("===\n").collect();
    assert_eq!(halves.len(), 3, "{out}");
    assert!(halves[0].contains("Seccomp:\t2") && halves[0].contains("NoNewPrivs:\t1"), "{out}");
    assert_eq!(halves[0], halves[1], "the exec'd process is not confined as the payload");
}

#[test]
fn an_exec_is_confined_as_the_payload() {
    if !privileged() {
        return;
    }
    let c = Running::start("exec-confined", "");
    assert_confined_as_payload(&c);
    // The payload's environment, its user, and what the seccomp filter and the capability
    // sets refuse the payload, refused here too.
    let (code, out, err) = c.exec(
        &[],
        "echo $FROM_DEFINITION $container; id -u; unshare -U true 2>/dev/null && echo unshared; \
         mount -t tmpfs none /mnt 2>/dev/null && echo mounted; ps -e -o comm= | sort | tr '\\n' ' '",
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["yes gpubox", "0"], "{out}");
    assert!(!out.contains("unshared") && !out.contains("mounted"), "{out}");
    // Only the payload and the shell's pipeline: the host's side of the exec is not in the
    // container's pid namespace. A stage of the pipeline that has not exec'd yet shows as the
    // shell it was forked from ("sh sh" rather than "sh sort").
    let names: Vec<&str> = lines.last().unwrap().split_whitespace().collect();
    assert!(names.contains(&"ps") && names.contains(&"sleep"), "{out}");
    assert!(names.iter().all(|n| ["ps", "sh", "sleep", "sort", "tr"].contains(n)), "{out}");
    // Its exit status comes back.
    assert_eq!(c.exec(&[], "exit 7").0, 7);
    assert_eq!(c.exec(&[], "kill -9 $$").0, 128 + 9);
    let out = Command::new(ctl()).args(["exec", &c.name, "no-such-command"]).output().unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", String::from_utf8_lossy(&out.stderr));
    drop(c);
    // Without a user namespace (which setns would refuse to join: it is the host's), and with
    // no_new_privs off, the same.
    let c = Running::start("exec-hostns", "UserNamespace=host\nNoNewPrivileges=no\n");
    let (code, out, err) = c.exec(&[], CONFINEMENT);
    assert_eq!(code, 0, "{err}");
    let halves: Vec<&str> = out.split("===\n").collect();
    assert_eq!(halves[0], halves[1], "the exec'd process is not confined as the payload");
}

#[test]
fn an_exec_takes_the_user_directory_environment_and_a_terminal_and_is_root_s_alone() {
    if !privileged() {
        return;
    }
    let c = Running::start("exec-options", "");
    let (code, out, err) = c.exec(
        &["-t", "-u", "1000:1000", "-w", "/tmp", "-e", "EXTRA=1", "-e", "FROM_DEFINITION=replaced"],
        "id -u; id -g; pwd; echo $EXTRA $FROM_DEFINITION; grep CapEff /proc/self/status; tty; ls /dev/pts",
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().map(str::trim_end).collect();
    assert_eq!(lines[..5], ["1000", "1000", "/tmp", "1 replaced", "CapEff:\t0000000000000000"], "{out}");
    // The container's own devpts: the terminal is one of its nodes.
    let tty = lines[5];
    assert!(tty.starts_with("/dev/pts/"), "{out}");
    assert!(lines[6..].iter().any(|l| l.split_whitespace().any(|n| Some(n) == tty.strip_prefix("/dev/pts/"))), "{out}");
    // Callers that are not root are refused (a copy of gpuboxctl that uid 1000 can execute:
    // the build tree may be private), and a container that does not run is status 3.
    let out = common::output_as(1000, &ctl(), &["exec", &c.name, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(ctl()).args(["exec", "exec-no-such", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}
