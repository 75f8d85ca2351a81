//! User-namespace id ranges. Each container with `UserNamespace=private` gets 65536 host ids
//! that no other running gpubox container holds. The reservation is a root-only lock held for
//! the supervisor's lifetime (`gpubox_control::locks`): the kernel releases it when the
//! supervisor exits, even by SIGKILL, so there is nothing to clean up and nothing to go stale,
//! and no unprivileged process can take one.
//!
//! The first candidate is derived from the name, so a container gets the same ids across
//! restarts (files it wrote stay its own) unless another container holds them.

use anyhow::{bail, Context, Result};
use gpubox_control::locks::{try_lock, Lock};

pub const SIZE: u32 = 65536;
const FIRST: u32 = 0x4000_0000;
const SLOTS: u32 = 4096;

pub struct IdRange {
    pub host_base: u32,
    _reservation: Lock,
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
        match try_lock(&format!("idrange-{base}")).context("reserving a user-namespace id range")? {
            Some(reservation) => return Ok(IdRange { host_base: base, _reservation: reservation }),
            None => continue,
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
pub fn claim_name(name: &str) -> Result<Lock> {
    try_lock(&format!("name-{name}"))
        .context("claiming the container's name")?
        .ok_or_else(|| anyhow::anyhow!("a container named {name} is already running"))
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}
