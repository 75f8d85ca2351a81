//! Hotplug: the thread that follows device events for a container with devices, as LXD does
//! for its hotplugged devices, with no process per event. It hears udev's events on devices
//! gpubox's rules tag `gpubox`; with `Hotplug=yes` also the kernel's own uevents (a new GPU
//! without waiting for udev's queue) and inotify on the host nodes' directories (udev's chmod,
//! which the container's nodes follow: `Live::follow_host_modes`); and the NVIDIA driver's Xid
//! records in `/dev/kmsg`. Each burst is one reselection (`Live::hotplug`), so a GPU is never
//! attached twice, whichever source is first; the monitors are open before the first look at
//! the devices, so nothing after that look is missed. See docs/architecture.md, "Hotplug".

use crate::live::Shared;
use crate::log;
use gpubox_control::HotplugAction;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::os::fd::AsFd;
use udev::EventType;

/// The tag gpubox's udev rules give the devices it follows.
pub const TAG: &str = "gpubox";

/// What a burst of events calls for.
#[derive(Default)]
struct Due {
    added: bool,
    removed: bool,
    /// udev has (re)configured a device: host node modes may have changed.
    configured: bool,
}

/// Starts following device events for this container, once; a container that is not followed
/// yet has no devices and no selectors.
pub fn follow(live: &Shared) {
    {
        let mut l = live.lock().expect("live state lock");
        if l.followed {
            return;
        }
        l.followed = true;
    }
    let live = live.clone();
    let spawned = std::thread::Builder::new().name("hotplug".into()).spawn(move || {
        // A container whose GPUs do not come by hotplug follows only their removal, which can
        // wait a moment: the monitors are opened 100 ms after the start (the reselection below
        // catches what happened meanwhile), so that a short job does not pay for them.
        if !live.lock().expect("live state lock").hotplug {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // libudev's objects stay on the thread that made them.
        let udev = match udev::MonitorBuilder::new().and_then(|b| b.match_tag(TAG)).and_then(|b| b.listen()) {
            Ok(m) => m,
            Err(e) => {
                log::warn(&format!("no hotplug: cannot listen to udev: {e}"));
                return;
            }
        };
        // The kernel's own events only where GPUs come by hotplug (they are earlier than
        // udev's); a removal waits for udev's event, which costs nothing at start and stop.
        let hotplug = live.lock().expect("live state lock").hotplug;
        let kernel =
            (if hotplug { udev::MonitorBuilder::new_kernel() } else { Err(std::io::ErrorKind::Unsupported.into()) })
                .and_then(|b| b.match_subsystem("drm"))
                .and_then(|b| b.match_subsystem("pci"))
                .and_then(|b| b.listen())
                .map_err(|e| {
                    if hotplug {
                        log::warn(&format!("hotplug waits for udev: cannot listen to the kernel's uevents: {e}"))
                    }
                })
                .ok();
        {
            // Where GPUs come by hotplug, the mount helper and systemd's permission for the GPU
            // classes are there now rather than at the first event, which should not wait for
            // them. A container that only follows its GPUs' removal starts its helper when one
            // goes: a helper process costs every start and stop about a millisecond.
            let mut l = live.lock().expect("live state lock");
            if l.hotplug {
                if let Err(e) = l.prepare().and_then(|_| l.allow_gpu_classes()) {
                    log::warn(&format!("{e:#}"));
                }
            }
        }
        // udev sets a node's mode as it runs its rules, well before its event is sent: the
        // attribute change on the host node is the earlier sign (inotify on its directory).
        // Only where GPUs come by hotplug, whose nodes are attached before udev has run: the
        // nodes of a start or an attach by hand have their final modes already, and an inotify
        // instance costs every exit 10–20 ms (the kernel waits out an SRCU grace period to
        // tear it down), which a container of a GPU job should not pay.
        let modes = hotplug
            .then(|| {
                Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
                    .map_err(|e| log::warn(&format!("modes follow udev's events only: {e}")))
                    .ok()
            })
            .flatten();
        // The NVIDIA driver's Xid errors (a GPU fault, a fallen-off bus) on the container's GPUs
        // go to its own log, where the job's owner looks; from now on, not the boot's backlog.
        let xid = live.lock().expect("live state lock").xid.clone();
        let kmsg = (!xid.is_empty()).then(open_kmsg).flatten();
        // What changed between the container's start and the monitors being open.
        settle(&live, Due { added: true, removed: true, configured: true }, modes.as_ref());
        // Connected now, so that no event waits for it.
        if live.lock().expect("live state lock").unit.is_some() {
            let _ = crate::systemd::bus();
        }
        loop {
            let mut fds = vec![nix::poll::PollFd::new(udev.as_fd(), nix::poll::PollFlags::POLLIN)];
            if let Some(k) = &kernel {
                fds.push(nix::poll::PollFd::new(k.as_fd(), nix::poll::PollFlags::POLLIN));
            }
            if let Some(m) = &modes {
                fds.push(nix::poll::PollFd::new(m.as_fd(), nix::poll::PollFlags::POLLIN));
            }
            if let Some(k) = &kmsg {
                fds.push(nix::poll::PollFd::new(k.as_fd(), nix::poll::PollFlags::POLLIN));
            }
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    log::warn(&format!("hotplug: {e}"));
                    return;
                }
            }
            // A GPU comes as a burst of events (card, render node, changes): one reselection
            // answers all that have arrived.
            let mut due = Due::default();
            for event in kernel.iter().flat_map(|k| k.iter()) {
                if gpu_event(&event) {
                    match event.event_type() {
                        EventType::Remove | EventType::Unbind => due.removed = true,
                        EventType::Add | EventType::Bind => due.added = true,
                        _ => {}
                    }
                }
            }
            for event in udev.iter() {
                match event.event_type() {
                    EventType::Remove | EventType::Unbind => due.removed = true,
                    EventType::Add | EventType::Bind => (due.added, due.configured) = (true, true),
                    EventType::Change => due.configured = true,
                    _ => {}
                }
            }
            if let Some(k) = &kmsg {
                report_xids(k, &xid);
            }
            if modes.as_ref().is_some_and(|m| m.read_events().is_ok_and(|e| !e.is_empty())) {
                due.configured = true;
            }
            if !settle(&live, due, modes.as_ref()) {
                return;
            }
        }
    });
    if let Err(e) = spawned {
        log::warn(&format!("no hotplug: {e}"));
    }
}

/// The kernel's events that gpubox's udev rules would tag: a DRM card or render node (not a
/// connector, which has no node), the nvidia driver binding to a PCI device, or a display
/// controller's driver leaving it or the device going (those events no longer name the driver).
fn gpu_event(event: &udev::Event) -> bool {
    match event.subsystem().and_then(|s| s.to_str()) {
        Some("drm") => {
            let name = event.sysname().to_string_lossy();
            event.property_value("DEVNAME").is_some() && (name.starts_with("card") || name.starts_with("renderD"))
        }
        Some("pci") => match event.event_type() {
            EventType::Bind => event.property_value("DRIVER").is_some_and(|d| d == "nvidia"),
            EventType::Unbind | EventType::Remove => {
                event.property_value("PCI_CLASS").and_then(|c| c.to_str()).is_some_and(display_class)
            }
            _ => false,
        },
        _ => false,
    }
}

/// PCI class 0x03xxxx (display controllers: VGA, 3D, …), as the kernel writes `PCI_CLASS`
/// (`%04X` of the 24-bit class: `30000`, `30200`).
fn display_class(class: &str) -> bool {
    class.len() == 5 && class.starts_with('3')
}

/// Reselects after events; false once the container is no longer running.
/// Clients of the control socket hear of what changed, as after a change they asked for.
fn settle(live: &Shared, due: Due, modes: Option<&Inotify>) -> bool {
    let mut live = live.lock().expect("live state lock");
    let before = live.ledger.clone();
    // Modes first: for udev's event on a GPU the kernel's event brought already, that is what
    // a non-root user inside waits for; the reselection after it is the backstop.
    if due.configured {
        live.follow_host_modes();
    }
    for (happened, action) in [(due.removed, HotplugAction::Remove), (due.added, HotplugAction::Add)] {
        if happened {
            if let Err(e) = live.hotplug(action) {
                log::warn(&format!("hotplug {}: {e:#}", action.as_str()));
            }
        }
    }
    if due.added {
        // New nodes: their host directories watched (adding a watch again changes nothing; a
        // directory that went and came back is watched anew), and udev may have set their
        // modes before that.
        if let Some(modes) = modes {
            for dir in live.mode_dirs() {
                let _ = modes.add_watch(&dir, AddWatchFlags::IN_ATTRIB);
            }
        }
        live.follow_host_modes();
    }
    if live.ledger != before {
        crate::peers::announce(&live.status());
    }
    live.state == gpubox_control::State::Running
}

/// `/dev/kmsg`, at its end, not blocking.
fn open_kmsg() -> Option<std::fs::File> {
    use std::io::Seek;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok()?;
    file.seek(std::io::SeekFrom::End(0)).ok()?;
    Some(file)
}

/// Logs the driver's Xid messages about `gpus` among the kernel's new records.
fn report_xids(kmsg: &std::fs::File, gpus: &[(String, String)]) {
    use std::io::Read;
    let mut buf = [0u8; 8192];
    // One record per read; EAGAIN at the end, EPIPE when records were overwritten (go on).
    loop {
        match (&*kmsg).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if let Some((bus, label, message)) = xid_of(&String::from_utf8_lossy(&buf[..n]), gpus) {
                    log::warn(&format!("NVIDIA Xid on {label} ({bus}): {message}"));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => return,
        }
    }
}

/// The GPU and message of an Xid record (`…;NVRM: Xid (PCI:0000:65:00): 79, pid=…, GPU has
/// fallen off the bus.`) about one of `gpus`.
fn xid_of<'a>(record: &'a str, gpus: &'a [(String, String)]) -> Option<(&'a str, &'a str, &'a str)> {
    let message = record.split_once(';')?.1.lines().next()?;
    let rest = message.split_once("NVRM: Xid (PCI:")?.1;
    let (bus, _) = rest.split_once(')')?;
    let (_, label) = gpus.iter().find(|(b, _)| b.eq_ignore_ascii_case(bus))?;
    Some((bus, label.as_str(), message.split_once("NVRM: ")?.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xid_records_of_the_containers_gpus() {
        let gpus = vec![("0000:65:00".to_owned(), "nvidia:1".to_owned())];
        let record =
            "4,1234,5678,-;NVRM: Xid (PCI:0000:65:00): 79, pid=4242, name=python3, GPU has fallen off the bus.\n";
        assert_eq!(
            xid_of(record, &gpus),
            Some((
                "0000:65:00",
                "nvidia:1",
                "Xid (PCI:0000:65:00): 79, pid=4242, name=python3, GPU has fallen off the bus."
            ))
        );
        assert_eq!(xid_of("4,1,2,-;NVRM: Xid (PCI:0000:66:00): 13, Graphics Exception\n", &gpus), None);
        assert_eq!(xid_of("6,1,2,-;usb 1-1: new device\n", &gpus), None);
    }
}
