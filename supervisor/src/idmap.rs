//! User-namespace id ranges. Each container with `UserNamespace=private` gets 65536 host ids
//! that no other running gpubox container holds. The reservation is an abstract unix socket
//! bound for the supervisor's lifetime: the kernel releases it when the supervisor exits, even
//! by SIGKILL, so there is nothing to clean up and nothing to go stale.
//!
//! The first candidate is derived from the name, so a container gets the same ids across
//! restarts (files it wrote stay its own) unless another container holds them.

use anyhow::{bail, Context, Result};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

pub const SIZE: u32 = 65536;
const FIRST: u32 = 0x4000_0000;
const SLOTS: u32 = 4096;

pub struct IdRange {
    pub host_base: u32,
    _reservation: UnixListener,
}

pub fn reserve(name: &str) -> Result<IdRange> {
    let taken = subordinate_ranges();
    let start = fnv1a(name) % SLOTS;
    for i in 0..SLOTS {
        let slot = (start + i) % SLOTS;
        let base = FIRST + slot * SIZE;
        if taken.iter().any(|&(b, n)| base < b.saturating_add(n) && b < base + SIZE) {
            continue;
        }
        let addr = SocketAddr::from_abstract_name(format!("gpubox/idrange/{base}"))?;
        match UnixListener::bind_addr(&addr) {
            Ok(reservation) => return Ok(IdRange { host_base: base, _reservation: reservation }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e).context("reserving a user-namespace id range"),
        }
    }
    bail!("no free user-namespace id range: {SLOTS} containers are running")
}

/// Ranges that /etc/subuid and /etc/subgid give to users, which gpubox must not hand out.
fn subordinate_ranges() -> Vec<(u32, u32)> {
    ["/etc/subuid", "/etc/subgid"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| {
                    let mut parts = l.split(':').skip(1);
                    Some((parts.next()?.trim().parse().ok()?, parts.next()?.trim().parse().ok()?))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Held while a container of this name runs: a second supervisor for the same name would
/// share its runtime directory and control socket. Released by the kernel, as above.
pub fn claim_name(name: &str) -> Result<UnixListener> {
    let addr = SocketAddr::from_abstract_name(format!("gpubox/name/{name}"))?;
    UnixListener::bind_addr(&addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!("a container named {name} is already running"),
        _ => anyhow::Error::new(e).context("claiming the container's name"),
    })
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}
