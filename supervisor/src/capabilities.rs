//! The container's capability set: Docker's and Podman's default bounding set, adjusted by the
//! definition's `AddCapability=` and `DropCapability=` (drops win).

use anyhow::{anyhow, Result};
use caps::{CapSet, Capability, CapsHashSet};
use gpubox_definition::Container;
use std::str::FromStr;

/// Docker's default set (Podman's is the same less MKNOD, NET_RAW and AUDIT_WRITE).
pub const DEFAULT: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_MKNOD,
    Capability::CAP_AUDIT_WRITE,
    Capability::CAP_SETFCAP,
];

/// Docker's and Podman's rule: `DropCapability=ALL` starts from nothing and `AddCapability=`
/// still adds; otherwise the default set plus additions minus drops.
pub fn for_container(c: &Container) -> Result<CapsHashSet> {
    let parse = |name: &String| Capability::from_str(name).map_err(|_| anyhow!("unknown capability {name}"));
    let drop_all = c.drop_capabilities.iter().any(|n| n == "ALL");
    let mut set: CapsHashSet = if drop_all { CapsHashSet::new() } else { DEFAULT.iter().copied().collect() };
    let drops = c.drop_capabilities.iter().filter(|n| *n != "ALL").map(parse).collect::<Result<Vec<_>>>()?;
    for cap in c.add_capabilities.iter().map(parse) {
        set.insert(cap?);
    }
    for cap in drops {
        set.remove(&cap);
    }
    Ok(set)
}

/// Reduces the bounding set; caps the kernel does not know are skipped.
pub fn limit_bounding(keep: &CapsHashSet) -> Result<()> {
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    Ok(())
}

/// For a payload that runs as root in its namespace: exactly `keep`, also across exec.
pub fn set_for_root(keep: &CapsHashSet) -> Result<()> {
    caps::set(None, CapSet::Effective, keep)?;
    caps::set(None, CapSet::Permitted, keep)?;
    // Inheritable and ambient stay empty (CVE-2022-24769): root's capabilities across exec come
    // from the bounding set, and a file's inheritable capabilities must not add to them.
    caps::clear(None, CapSet::Inheritable)?;
    caps::clear(None, CapSet::Ambient)?;
    Ok(())
}
