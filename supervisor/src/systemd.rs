//! The unit's `DeviceAllow=` (and, with `NUMA=yes`, `AllowedCPUs=`/`AllowedMemoryNodes=`),
//! set through systemd's D-Bus API as runtime properties. Because systemd owns the rule, it
//! survives `systemctl daemon-reload`, unlike device rules written behind systemd's back, which
//! a reload wipes (the Docker + NVIDIA failure). systemd only bounds the unit, by device class
//! for GPUs (`char-drm`, `char-nvidia-frontend`, …, kept until the container stops, so the next
//! GPU of a kind needs no call); the exact set is the payload's own program (`devcgroup`).
//!
//! zbus starts threads and the clone must happen in a single-threaded process, so before the
//! clone these calls run in a short-lived `gpubox-supervisor device-allow` or `numa-allow`
//! process. See docs/architecture.md, "Device cgroup".

use anyhow::{Context, Result};
use gpubox_devices::Node;
use std::sync::Mutex;
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

/// The supervisor's one system-bus connection, made at the first call and kept: connecting
/// and authenticating cost more than a call, and a hotplug event should pay neither.
pub fn bus() -> Result<Connection> {
    let mut bus = BUS.lock().expect("bus lock");
    if let Some(conn) = bus.as_ref() {
        return Ok(conn.clone());
    }
    let conn = Connection::system().context("connecting to the system bus")?;
    *bus = Some(conn.clone());
    Ok(conn)
}

static BUS: Mutex<Option<Connection>> = Mutex::new(None);

/// Device classes given to systemd whole: the GPUs'.
fn gpu_class(name: &str) -> bool {
    name == "drm" || name.starts_with("nvidia")
}

/// What to ask systemd to allow for `nodes`, keeping the classes of `before`: a GPU node's
/// class, any other node's path.
pub fn device_allow_entries(nodes: &[Node], before: &[String]) -> Vec<String> {
    let classes = char_classes();
    let mut entries: Vec<String> = before.iter().filter(|e| e.starts_with("char-")).cloned().collect();
    for node in nodes {
        let entry = match classes.iter().find(|(major, _)| *major == node.major) {
            Some((_, class)) if gpu_class(class) => format!("char-{class}"),
            _ => node.path.display().to_string(),
        };
        if !entries.contains(&entry) {
            entries.push(entry);
        }
    }
    entries
}

/// The GPU classes the kernel has now (`char-drm`, `char-nvidia-frontend`, …).
pub fn gpu_classes() -> Vec<String> {
    char_classes().into_iter().filter(|(_, class)| gpu_class(class)).map(|(_, class)| format!("char-{class}")).collect()
}

/// The character device classes in /proc/devices, by major number.
fn char_classes() -> Vec<(u32, String)> {
    let text = std::fs::read_to_string("/proc/devices").unwrap_or_default();
    text.lines()
        .skip_while(|l| !l.starts_with("Character devices:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let (major, name) = l.trim().split_once(' ')?;
            Some((major.parse().ok()?, name.to_owned()))
        })
        .collect()
}

/// Sets the unit's runtime `DeviceAllow=` to exactly these entries (paths or classes),
/// read-write; with none it only resets the list, which is how the supervisor leaves nothing
/// behind on exit.
pub fn set_device_allow(unit: &str, entries: &[String]) -> Result<()> {
    let conn = bus()?;
    // "m" too: the supervisor makes the staging nodes inside the unit's cgroup.
    let allow: Vec<(String, String)> = entries.iter().map(|e| (e.clone(), "rwm".to_owned())).collect();
    // An empty assignment first, as in a unit file: it drops what an earlier run granted.
    let mut properties: Vec<(&str, Value)> = vec![("DeviceAllow", Value::from(Vec::<(String, String)>::new()))];
    if !allow.is_empty() {
        properties.push(("DeviceAllow", Value::from(allow)));
    }
    let call = |conn: &Connection| {
        manager(conn)?.call_method("SetUnitProperties", &(unit, true, &properties)).map_err(anyhow::Error::from)
    };
    if let Err(e) = call(&conn) {
        // The bus may have restarted since: once more, on a new connection.
        BUS.lock().expect("bus lock").take();
        let _ = e;
        call(&bus()?).with_context(|| format!("setting DeviceAllow= of {unit} through systemd"))?;
    }
    if entries.is_empty() {
        forget_runtime_dropin(unit);
    }
    Ok(())
}

/// The same from a short-lived `gpubox-supervisor device-allow` child, for the start, where
/// the supervisor must stay single-threaded until the clone (zbus would start threads).
pub fn set_device_allow_in_helper(unit: &str, entries: &[String]) -> Result<()> {
    let out = std::process::Command::new("/proc/self/exe")
        .args(["device-allow", unit])
        .args(entries)
        .output()
        .context("starting the device-allow helper")?;
    if out.status.success() {
        Ok(())
    } else {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
    }
}

/// systemd keeps runtime properties in a drop-in; once the list is reset in memory, that file
/// says only "DeviceAllow=" and goes too, so a stopped unit has nothing of ours left.
fn forget_runtime_dropin(unit: &str) {
    let dir = std::path::Path::new("/run/systemd/system.control").join(format!("{unit}.d"));
    let _ = std::fs::remove_file(dir.join("50-DeviceAllow.conf"));
    let _ = std::fs::remove_dir(&dir);
}

/// `NUMA=yes` under systemd: the unit's `AllowedCPUs=` and `AllowedMemoryNodes=` (cpusets that
/// systemd owns), or, with `None`, both reset and their runtime drop-ins gone, so that a
/// stopped unit keeps nothing of ours.
pub fn set_numa(unit: &str, binding: Option<&crate::numa::Binding>) -> Result<()> {
    let (cpus, nodes) = match binding {
        Some(b) => (
            crate::numa::bitmask(&b.cpus),
            crate::numa::bitmask(&b.nodes.iter().map(|&n| n as usize).collect::<Vec<_>>()),
        ),
        None => (Vec::new(), Vec::new()),
    };
    let properties: Vec<(&str, Value)> =
        vec![("AllowedCPUs", Value::from(cpus)), ("AllowedMemoryNodes", Value::from(nodes))];
    manager(&bus()?)?
        .call_method("SetUnitProperties", &(unit, true, &properties))
        .with_context(|| format!("setting AllowedCPUs=/AllowedMemoryNodes= of {unit} through systemd"))?;
    if binding.is_none() {
        let dir = std::path::Path::new("/run/systemd/system.control").join(format!("{unit}.d"));
        for file in ["50-AllowedCPUs.conf", "50-AllowedMemoryNodes.conf"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(())
}

/// The same from a short-lived `gpubox-supervisor numa-allow UNIT CPUS NODES` child, before the
/// clone (see [`set_device_allow_in_helper`]).
pub fn set_numa_in_helper(unit: &str, binding: &crate::numa::Binding) -> Result<()> {
    let nodes: Vec<usize> = binding.nodes.iter().map(|&n| n as usize).collect();
    let out = std::process::Command::new("/proc/self/exe")
        .args(["numa-allow", unit, &crate::numa::format_list(&binding.cpus), &crate::numa::format_list(&nodes)])
        .output()
        .context("starting the numa-allow helper")?;
    if out.status.success() {
        Ok(())
    } else {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
    }
}
