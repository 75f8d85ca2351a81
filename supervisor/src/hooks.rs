//! CDI's OCI hooks, run by the supervisor as OCI runtimes run them: `path` executed with `args`
//! as the whole argv (`args[0]` is argv0), `env` as the whole environment (the caller's when
//! `env` is empty, as runc does), the OCI state JSON ([`oci_state`]) on stdin, killed (with any
//! children, through its own process group) after `timeout` seconds. NVIDIA's hooks read
//! `bundle` from that state and then `BUNDLE/config.json`'s `root.path` to find the container's
//! root filesystem, so the bundle holds such a `config.json`.

use anyhow::{bail, Result};
use gpubox_devices::cdi::Hook;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// CDI hooks, run by the supervisor at the OCI stages they name, each with the container's
/// OCI state on stdin. Hooks find the container's root through the bundle's config.json, whose
/// root is `/proc/PID/root` (the payload's root, seen from the host).
pub struct Hooks<'a> {
    name: &'a str,
    hooks: &'a [Hook],
    bundle: std::path::PathBuf,
}

impl<'a> Hooks<'a> {
    pub fn new(name: &'a str, run_dir: &Path, hooks: &'a [Hook]) -> Result<Hooks<'a>> {
        if let Some(h) = hooks.iter().find(|h| h.hook_name == "startContainer") {
            bail!(
                "CDI hook {} runs at startContainer, inside the container, which gpubox does not support",
                h.path.display()
            );
        }
        Ok(Hooks { name, hooks, bundle: run_dir.join("bundle") })
    }

    pub fn run(&self, stages: &[&str], pid: i32) -> Result<()> {
        let due: Vec<_> = self.hooks.iter().filter(|h| stages.contains(&h.hook_name.as_str())).collect();
        if due.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.bundle)?;
        let config = serde_json::json!({"ociVersion": "1.2.0", "root": {"path": format!("/proc/{pid}/root")}});
        std::fs::write(self.bundle.join("config.json"), config.to_string())?;
        let status = if stages.contains(&"poststop") {
            "stopped"
        } else if stages.contains(&"poststart") {
            "running"
        } else {
            "created"
        };
        let state = oci_state(self.name, pid as u32, &self.bundle, status);
        for hook in due {
            run_hook(hook, &state).map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }
}

impl Drop for Hooks<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bundle);
        if let Some(parent) = self.bundle.parent() {
            let _ = std::fs::remove_dir(parent); // only when empty: made for the bundle alone
        }
    }
}

/// Runs `hook` as an OCI runtime does, with `state_json` on its stdin. Fails on a spawn error,
/// a non-zero exit, a signal, or when `timeout` passes (the hook and its process group are then
/// killed); the error names the hook and ends with the tail of its stderr (or stdout).
pub fn run_hook(hook: &Hook, state_json: &str) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let what = format!("{} hook {}", hook.hook_name, hook.path.display());
    if !hook.path.is_absolute() {
        return Err(format!("{what}: the path is not absolute"));
    }
    let mut cmd = Command::new(&hook.path);
    if let Some((argv0, rest)) = hook.args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    if !hook.env.is_empty() {
        cmd.env_clear();
        for e in &hook.env {
            let (k, v) = e.split_once('=').ok_or_else(|| format!("{what}: invalid environment variable {e:?}"))?;
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("{what}: cannot start: {e}"))?;

    // Writer and readers on threads: a hook that never reads stdin or fills a pipe must not
    // block us past its timeout.
    if let Some(mut stdin) = child.stdin.take() {
        let data = state_json.as_bytes().to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut readers = 0;
    if let Some(out) = child.stdout.take() {
        spawn_reader(out, stdout.clone(), done_tx.clone());
        readers += 1;
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, stderr.clone(), done_tx.clone());
        readers += 1;
    }
    drop(done_tx);

    let (status, timed_out) = wait_with_timeout(&mut child, hook.timeout).map_err(|e| format!("{what}: {e}"))?;
    // The pipes close when every process holding them is gone; a background child the hook
    // left behind may keep them open, so wait only briefly.
    let grace = Instant::now() + Duration::from_millis(500);
    for _ in 0..readers {
        if done_rx.recv_timeout(grace.saturating_duration_since(Instant::now())).is_err() {
            break;
        }
    }
    if !timed_out && status.success() {
        return Ok(());
    }
    let why = if timed_out {
        format!("timed out after {}s and was killed", hook.timeout.unwrap_or(0))
    } else if let Some(code) = status.code() {
        format!("failed with exit status {code}")
    } else {
        use std::os::unix::process::ExitStatusExt;
        format!("was killed by signal {}", status.signal().unwrap_or(0))
    };
    let mut output = tail(&stderr.lock().unwrap_or_else(|e| e.into_inner()));
    let mut label = "stderr";
    if output.is_empty() {
        output = tail(&stdout.lock().unwrap_or_else(|e| e.into_inner()));
        label = "stdout";
    }
    if output.is_empty() {
        Err(format!("{what} {why}"))
    } else {
        Err(format!("{what} {why}; {label}: {output}"))
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut from: R, into: Arc<Mutex<Vec<u8>>>, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut v = into.lock().unwrap_or_else(|e| e.into_inner());
                    v.extend_from_slice(&buf[..n]);
                    // keep the tail only
                    if v.len() > 64 * 1024 {
                        let cut = v.len() - 16 * 1024;
                        v.drain(..cut);
                    }
                }
            }
        }
        let _ = done.send(());
    });
}

fn wait_with_timeout(child: &mut std::process::Child, timeout: Option<u32>) -> Result<(ExitStatus, bool), String> {
    let Some(secs) = timeout else {
        return child.wait().map(|s| (s, false)).map_err(|e| format!("cannot wait: {e}"));
    };
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs));
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("cannot wait: {e}"))? {
            return Ok((status, false));
        }
        let now = Instant::now();
        if now >= deadline {
            // Not reaped yet, so the process group still exists and is ours.
            let pgid = child.id() as libc::pid_t;
            // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let status = child.wait().map_err(|e| format!("cannot wait: {e}"))?;
            return Ok((status, true));
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

fn tail(bytes: &[u8]) -> String {
    const MAX: usize = 2000;
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut start = text.len() - MAX;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// The OCI runtime state a hook reads on stdin: `ociVersion`, `id`, `status` (`creating`,
/// `created`, `running`, `stopped`), `pid` (left out when 0), `bundle`, `annotations`.
pub fn oci_state(id: &str, pid: u32, bundle: &Path, status: &str) -> String {
    let mut state = serde_json::json!({
        "ociVersion": "1.2.0",
        "id": id,
        "status": status,
        "bundle": bundle.to_string_lossy(),
        "annotations": {},
    });
    if pid != 0 {
        state["pid"] = pid.into();
    }
    state.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    /// An executable script at `dir/name`, written by `cp` rather than by this process: a
    /// child that another test thread forks while this process holds the file open for
    /// writing would keep it open, and executing it would fail with ETXTBSY.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let (source, path) = (dir.join(format!("{name}.source")), dir.join(name));
        std::fs::write(&source, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(std::process::Command::new("cp").arg(&source).arg(&path).status().unwrap().success());
        path
    }

    fn hook(path: PathBuf, args: &[&str], env: &[&str], timeout: Option<u32>) -> Hook {
        Hook {
            hook_name: "createContainer".into(),
            path,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            timeout,
        }
    }

    #[test]
    fn run_hook_passes_state_args_and_env() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("state");
        let env_out = tmp.path().join("env");
        let path = script(tmp.path(), "hook.sh", "/bin/cat > \"$1\"\necho \"FOO=$FOO HOME=${HOME:-unset}\" > \"$2\"\n");
        let state = oci_state("box-1", 4242, Path::new("/run/gpubox/box-1"), "created");
        let h = hook(path, &["my-hook", out.to_str().unwrap(), env_out.to_str().unwrap()], &["FOO=bar"], Some(10));
        run_hook(&h, &state).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), state);
        assert_eq!(std::fs::read_to_string(&env_out).unwrap().trim(), "FOO=bar HOME=unset");

        // args[0] is argv0, not a parameter
        let cmdline = tmp.path().join("cmdline");
        let h = hook(
            PathBuf::from("/bin/sh"),
            &["custom-argv0", "-c", &format!("/bin/cat /proc/$$/cmdline > {}", cmdline.display())],
            &[],
            None,
        );
        run_hook(&h, "{}").unwrap();
        let got = std::fs::read(&cmdline).unwrap();
        assert!(got.starts_with(b"custom-argv0\0-c\0"), "{:?}", String::from_utf8_lossy(&got));
    }

    #[test]
    fn run_hook_reports_failure_with_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let path = script(tmp.path(), "fail.sh", "echo 'cannot update ldcache' >&2\nexit 3\n");
        let e = run_hook(&hook(path.clone(), &["fail"], &[], None), "{}").unwrap_err();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("exit status 3") && e.contains("cannot update ldcache"), "{e}");
        let e = run_hook(&hook(tmp.path().join("absent"), &[], &[], None), "{}").unwrap_err();
        assert!(e.contains("cannot start"), "{e}");
        let e = run_hook(&hook("relative".into(), &[], &[], None), "{}").unwrap_err();
        assert!(e.contains("not absolute"), "{e}");
    }

    #[test]
    fn run_hook_kills_a_hook_past_its_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        // the sleep is a child of the shell: the whole process group must go
        let path = script(tmp.path(), "slow.sh", "echo started >&2\n/bin/sleep 30\necho done\n");
        let start = Instant::now();
        let e = run_hook(&hook(path, &["slow"], &[], Some(2)), "{}").unwrap_err();
        let took = start.elapsed();
        assert!(e.contains("timed out after 2s"), "{e}");
        assert!(e.contains("started"), "{e}");
        assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(15), "{took:?}");
    }

    #[test]
    fn run_hook_ignores_a_hook_that_does_not_read_stdin() {
        let big = format!("{{\"x\":\"{}\"}}", "a".repeat(1 << 20));
        run_hook(&hook(PathBuf::from("/bin/true"), &["true"], &[], Some(5)), &big).unwrap();
    }

    #[test]
    fn oci_state_json() {
        let v: serde_json::Value = serde_json::from_str(&oci_state("c1", 77, Path::new("/b"), "creating")).unwrap();
        assert_eq!(v["ociVersion"], "1.2.0");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["pid"], 77);
        assert_eq!(v["bundle"], "/b");
        assert_eq!(v["status"], "creating");
        assert!(v["annotations"].as_object().unwrap().is_empty());
        let v: serde_json::Value = serde_json::from_str(&oci_state("c1", 0, Path::new("/b"), "stopped")).unwrap();
        assert!(v.get("pid").is_none());
    }
}
