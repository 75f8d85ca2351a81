//! `DriverLibraries=yes`: the host's NVIDIA user-space driver, as nvidia-container-cli and
//! NVIDIA's CDI specs inject it — the libraries (found through the host's ld cache, so the
//! container gets exactly the version that matches the kernel module), the tools such as
//! nvidia-smi, the GSP firmware and the daemons' sockets. They are bound read-only at their
//! host paths, and the library directories go on `LD_LIBRARY_PATH`, because the container's
//! own ld cache does not know them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Library name prefixes of NVIDIA's driver (nvidia-container-toolkit's list).
const LIBRARIES: &[&str] = &[
    "libnvidia-ml.so",
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libnvidia-gpucomp.so",
    "libnvidia-allocator.so",
    "libnvidia-cfg.so",
    "libnvidia-opencl.so",
    "libnvcuvid.so",
    "libnvidia-encode.so",
    "libnvidia-opticalflow.so",
    "libnvoptix.so",
    "libnvidia-rtcore.so",
    "libnvidia-ngx.so",
    "libnvidia-eglcore.so",
    "libnvidia-glcore.so",
    "libnvidia-tls.so",
    "libnvidia-glsi.so",
    "libnvidia-glvkspirv.so",
    "libnvidia-fbc.so",
    "libnvidia-pkcs11.so",
    "libnvidia-pkcs11-openssl3.so",
    "libGLX_nvidia.so",
    "libEGL_nvidia.so",
    "libGLESv2_nvidia.so",
    "libGLESv1_CM_nvidia.so",
    "libvdpau_nvidia.so",
];
const BINARIES: &[&str] =
    &["nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control", "nvidia-cuda-mps-server"];
const OTHER: &[&str] = &["/lib/firmware/nvidia", "/run/nvidia-persistenced/socket", "/run/nvidia-fabricmanager/socket"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverFiles {
    /// Every file or directory to bind read-only at its host path.
    pub paths: Vec<PathBuf>,
    /// Directories that hold the libraries, for `LD_LIBRARY_PATH`.
    pub library_dirs: Vec<PathBuf>,
}

/// Finds the host's NVIDIA driver files; an error when there are none.
pub fn nvidia() -> Result<DriverFiles, String> {
    let out = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .or_else(|_| std::process::Command::new("/sbin/ldconfig").arg("-p").output())
        .map_err(|e| format!("running ldconfig -p: {e}"))?;
    let libraries = libraries_in_ld_cache(&String::from_utf8_lossy(&out.stdout), std::env::consts::ARCH);
    if !libraries.iter().any(|l| l.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libnvidia-ml.so"))) {
        return Err("DriverLibraries=yes, but the host's ld cache has no NVIDIA driver (no libnvidia-ml.so)".into());
    }
    let mut files = DriverFiles {
        library_dirs: libraries
            .iter()
            .filter_map(|l| l.parent().map(Path::to_owned))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        paths: libraries,
    };
    for bin in BINARIES {
        if let Some(path) =
            ["/usr/bin", "/usr/sbin", "/bin"].iter().map(|d| Path::new(d).join(bin)).find(|p| p.exists())
        {
            files.paths.push(path);
        }
    }
    files.paths.extend(OTHER.iter().map(PathBuf::from).filter(|p| p.exists()));
    Ok(files)
}

/// The NVIDIA libraries in `ldconfig -p` output, for this architecture only.
pub fn libraries_in_ld_cache(ldconfig: &str, arch: &str) -> Vec<PathBuf> {
    let tag = match arch {
        "x86_64" => "x86-64",
        "aarch64" => "AArch64",
        other => other,
    };
    let mut found: Vec<PathBuf> = ldconfig
        .lines()
        .filter_map(|line| {
            // "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1"
            let (left, path) = line.trim().split_once(" => ")?;
            let (name, flags) = left.split_once(' ')?;
            let wanted = LIBRARIES.iter().any(|p| name.starts_with(p)) && flags.contains(tag);
            wanted.then(|| PathBuf::from(path.trim()))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from an Ubuntu 22.04 host with driver 535 (abridged), with the 32-bit copies
    /// and an unrelated library that must not be picked.
    const LDCONFIG: &str = "1432 libs found in cache `/etc/ld.so.cache'
\tlibnvidia-ptxjitcompiler.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1
\tlibnvidia-ml.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-ml.so.1 (libc6) => /lib/i386-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-ml.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ml.so
\tlibnvcuvid.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvcuvid.so.1
\tlibcudart.so.12 (libc6,x86-64) => /usr/local/cuda/lib64/libcudart.so.12
\tlibcuda.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so.1
\tlibcuda.so.1 (libc6) => /lib/i386-linux-gnu/libcuda.so.1
\tlibGLX_nvidia.so.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libGLX_nvidia.so.0
\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6
";

    #[test]
    fn picks_the_native_driver_libraries_only() {
        let libs = libraries_in_ld_cache(LDCONFIG, "x86_64");
        let names: Vec<&str> = libs.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "/lib/x86_64-linux-gnu/libGLX_nvidia.so.0",
                "/lib/x86_64-linux-gnu/libcuda.so.1",
                "/lib/x86_64-linux-gnu/libnvcuvid.so.1",
                "/lib/x86_64-linux-gnu/libnvidia-ml.so",
                "/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
                "/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1",
            ]
        );
        assert!(libraries_in_ld_cache("", "x86_64").is_empty());
    }
}
