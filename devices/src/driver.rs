//! `DriverLibraries=yes`: the host's NVIDIA user-space driver, as nvidia-container-cli and
//! NVIDIA's CDI specs inject it: the libraries the host's loader would load (per soname, the
//! first entry of the host's ld cache for this ABI, so the container gets exactly the version
//! that matches the kernel module, even where the cache lists a library twice) and tools such
//! as nvidia-smi. Where they go inside the container is the supervisor's business
//! (`supervisor/src/driver_mounts.rs`): into the directories the container's own loader and
//! `PATH` search, without writing to its root.

use std::path::PathBuf;

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
/// Where a driver's tools are, besides `PATH`: the usual places, and `bin/` beside the
/// libraries' directory (a driver under `/usr/local/nvidia` has `lib64/` and `bin/`).
const TOOL_DIRS: &[&str] = &["/usr/bin", "/usr/sbin", "/bin", "/sbin"];

/// One file of the driver: the name it has inside the container's directory, and the host
/// file it is (bind-mounting follows the host path's symlinks to the real file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverFile {
    pub name: String,
    pub host: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverFiles {
    /// Libraries, named by their soname (the ld cache's key).
    pub libraries: Vec<DriverFile>,
    /// Tools, for a directory on the container's `PATH`.
    pub binaries: Vec<DriverFile>,
}

/// Finds the host's NVIDIA driver files; an error when there are none.
pub fn nvidia() -> Result<DriverFiles, crate::Error> {
    // GPUBOX_LD_CACHE: another cache file than the host's, for tests with a stand-in driver.
    let cache: Vec<std::ffi::OsString> = match std::env::var_os("GPUBOX_LD_CACHE") {
        Some(file) => vec!["-p".into(), "-C".into(), file],
        None => vec!["-p".into()],
    };
    let out = std::process::Command::new("ldconfig")
        .args(&cache)
        .output()
        .or_else(|_| std::process::Command::new("/sbin/ldconfig").args(&cache).output())
        .map_err(|e| crate::Error::Driver(format!("running ldconfig -p: {e}")))?;
    let libraries = libraries_in_ld_cache(&String::from_utf8_lossy(&out.stdout), std::env::consts::ARCH);
    if !libraries.iter().any(|l| l.name.starts_with("libnvidia-ml.so")) {
        return Err(crate::Error::Driver(
            "DriverLibraries=yes, but the host's ld cache has no NVIDIA driver (no libnvidia-ml.so)".into(),
        ));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let beside_libraries = libraries.iter().filter_map(|l| Some(l.host.parent()?.parent()?.join("bin")));
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(TOOL_DIRS.iter().map(PathBuf::from))
        .chain(beside_libraries)
        .filter(|d| d.is_absolute())
        .collect();
    let binaries = BINARIES
        .iter()
        .filter_map(|bin| {
            let host = dirs.iter().map(|d| d.join(bin)).find(|p| p.is_file())?;
            Some(DriverFile { name: bin.to_string(), host })
        })
        .collect();
    Ok(DriverFiles { libraries, binaries })
}

/// The NVIDIA libraries in `ldconfig -p` output, for this architecture only.
/// The NVIDIA libraries in `ldconfig -p` output that the loader would pick for this
/// architecture: for each soname, its first entry (the cache lists them in the order the
/// loader tries them, so a second copy further down is never loaded).
pub fn libraries_in_ld_cache(ldconfig: &str, arch: &str) -> Vec<DriverFile> {
    let tag = match arch {
        "x86_64" => "x86-64",
        "aarch64" => "AArch64",
        other => other,
    };
    let mut found: Vec<DriverFile> = Vec::new();
    for line in ldconfig.lines() {
        // "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1"
        let Some((left, path)) = line.trim().split_once(" => ") else { continue };
        let Some((name, flags)) = left.split_once(' ') else { continue };
        let native = flags.trim_start_matches('(').split(',').any(|f| f.trim().trim_end_matches(')') == tag);
        if native && LIBRARIES.iter().any(|p| name.starts_with(p)) && !found.iter().any(|f| f.name == name) {
            found.push(DriverFile { name: name.to_owned(), host: PathBuf::from(path.trim()) });
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
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
        let names: Vec<(&str, &str)> = libs.iter().map(|f| (f.name.as_str(), f.host.to_str().unwrap())).collect();
        assert_eq!(
            names,
            [
                ("libGLX_nvidia.so.0", "/lib/x86_64-linux-gnu/libGLX_nvidia.so.0"),
                ("libcuda.so.1", "/lib/x86_64-linux-gnu/libcuda.so.1"),
                ("libnvcuvid.so.1", "/lib/x86_64-linux-gnu/libnvcuvid.so.1"),
                ("libnvidia-ml.so", "/lib/x86_64-linux-gnu/libnvidia-ml.so"),
                ("libnvidia-ml.so.1", "/lib/x86_64-linux-gnu/libnvidia-ml.so.1"),
                ("libnvidia-ptxjitcompiler.so.1", "/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1"),
            ]
        );
        assert!(libraries_in_ld_cache("", "x86_64").is_empty());
    }

    /// Recorded from the H200 host of issue #11: the driver under /usr/local/nvidia, listed
    /// first, and a second copy in /lib. The loader takes the first; so must gpubox.
    #[test]
    fn a_library_listed_twice_is_the_first_copy() {
        let cache = "12 libs found in cache `/etc/ld.so.cache'
\tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/local/nvidia/lib64/libnvidia-ml.so.1
\tlibnvidia-ml.so.1 (libc6,x86-64) => /lib/libnvidia-ml.so.1
\tlibcuda.so.1 (libc6,x86-64) => /usr/local/nvidia/lib64/libcuda.so.1
\tlibcuda.so.1 (libc6,x86-64) => /lib/libcuda.so.1
\tlibcuda.so.1 (libc6) => /usr/lib32/libcuda.so.1
";
        let libs = libraries_in_ld_cache(cache, "x86_64");
        let hosts: Vec<&str> = libs.iter().map(|f| f.host.to_str().unwrap()).collect();
        assert_eq!(hosts, ["/usr/local/nvidia/lib64/libcuda.so.1", "/usr/local/nvidia/lib64/libnvidia-ml.so.1"]);
    }
}
