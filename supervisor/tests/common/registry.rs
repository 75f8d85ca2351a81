//! A real registry on the loopback address: Debian's `docker-registry` (the CNCF distribution
//! registry that Docker Hub runs), with images pushed to it by `skopeo` from OCI layouts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts one, or `None` where its programs are missing (an error under
    /// GPUBOX_REQUIRE_PRIVILEGED, where tests/install-deps installed them).
    pub fn start() -> Option<Registry> {
        let (Some(registry), Some(_)) = (which("docker-registry"), which("skopeo")) else {
            assert!(
                std::env::var_os("GPUBOX_REQUIRE_PRIVILEGED").is_none(),
                "docker-registry and skopeo are needed (tests/install-deps)"
            );
            eprintln!("skipped: docker-registry and skopeo are not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        // A free port is picked, let go and then bound by the registry: another test may take
        // it in between, and then the registry exits and another port is tried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
            let config = dir.path().join("registry.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let mut child = Command::new(&registry)
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let up = std::time::Instant::now();
            while child.try_wait().unwrap().is_none() {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Registry { child, port, _dir: dir });
                }
                if up.elapsed().as_secs() >= 20 {
                    let _ = child.kill();
                    panic!("the registry did not start");
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        panic!("the registry exited at once five times")
    }

    /// Pushes `oci:LAYOUT:TAG` as `127.0.0.1:PORT/REPOSITORY:TAG` and returns that reference.
    pub fn push(&self, layout: &Path, tag: &str, repository: &str) -> String {
        let reference = format!("127.0.0.1:{}/{repository}:{tag}", self.port);
        let out = Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false", "--insecure-policy"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}
