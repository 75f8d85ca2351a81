//! The unit's `DeviceAllow=`, set through systemd's D-Bus API as a runtime property, so that
//! systemd itself grants the selected nodes on top of `DevicePolicy=closed`. Because systemd
//! owns the rule, it survives `systemctl daemon-reload` — unlike device rules written behind
//! systemd's back, which a reload wipes (the Docker + NVIDIA failure).
//!
//! zbus starts threads, so this runs only after the clone, while the child waits at the start
//! barrier: the clone must happen in a single-threaded process.

use anyhow::{Context, Result};
use std::path::Path;
use zbus::blocking::{Connection, Proxy};
use zbus::zvariant::Value;

/// The unit this process runs in, from its cgroup path (`…/gpu@job.service[/supervisor]`).
pub fn own_unit() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.split('/').rev().find(|c| c.ends_with(".service")).map(str::to_owned)
}

fn manager(conn: &Connection) -> Result<Proxy<'_>> {
    Ok(Proxy::new(conn, "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")?)
}

/// Sets the unit's runtime `DeviceAllow=` to exactly these nodes, read-write; with no nodes
/// it only resets the list, which is how the supervisor leaves nothing behind on exit.
pub fn set_device_allow(unit: &str, nodes: &[&Path]) -> Result<()> {
    let conn = Connection::system().context("connecting to the system bus")?;
    // "m" too: the supervisor makes the staging nodes inside the unit's cgroup.
    let allow: Vec<(String, String)> = nodes.iter().map(|n| (n.display().to_string(), "rwm".to_owned())).collect();
    // An empty assignment first, as in a unit file: it drops what an earlier run granted.
    let mut properties: Vec<(&str, Value)> = vec![("DeviceAllow", Value::from(Vec::<(String, String)>::new()))];
    if !allow.is_empty() {
        properties.push(("DeviceAllow", Value::from(allow)));
    }
    manager(&conn)?
        .call_method("SetUnitProperties", &(unit, true, properties))
        .with_context(|| format!("setting DeviceAllow= of {unit} through systemd"))?;
    if nodes.is_empty() {
        forget_runtime_dropin(unit);
    }
    Ok(())
}

/// systemd keeps runtime properties in a drop-in; once the list is reset in memory, that file
/// says only "DeviceAllow=" and goes too, so a stopped unit has nothing of ours left.
fn forget_runtime_dropin(unit: &str) {
    let dir = std::path::Path::new("/run/systemd/system.control").join(format!("{unit}.d"));
    let _ = std::fs::remove_file(dir.join("50-DeviceAllow.conf"));
    let _ = std::fs::remove_dir(&dir);
}
