//! Hotplug. gpubox's udev rules tag GPU devices `gpubox`; every supervisor whose container
//! has devices listens on udev's monitor for events on that tag, the way logind follows the
//! devices tagged `seat`. So a GPU that comes or goes reaches each running container straight
//! from udev, once udev has finished with it, with no process started per event. (`gpuboxctl
//! hotplug` does the same by hand, over the control socket.)
//!
//! The monitor is open before the first look at the devices, so nothing that happens after
//! that look is missed, and each change is a reselection (see `Live::hotplug`), so nothing is
//! attached twice.

use crate::control::Shared;
use crate::log;
use std::os::fd::AsFd;

/// The tag gpubox's udev rules give the devices it follows.
pub const TAG: &str = "gpubox";

/// Starts following udev's events for this container, once; a container that is not
/// followed yet has no devices and no selectors.
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
        // libudev's objects stay on the thread that made them.
        let monitor = match udev::MonitorBuilder::new().and_then(|b| b.match_tag(TAG)).and_then(|b| b.listen()) {
            Ok(m) => m,
            Err(e) => {
                log::warn(&format!("no hotplug: cannot listen to udev: {e}"));
                return;
            }
        };
        // What changed between the container's start and the monitor being open.
        settle(&live, true, true);
        // Connected now, so that no event waits for it.
        if live.lock().expect("live state lock").unit.is_some() {
            let _ = crate::systemd::bus();
        }
        loop {
            let mut fds = [nix::poll::PollFd::new(monitor.as_fd(), nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    log::warn(&format!("hotplug: {e}"));
                    return;
                }
            }
            // A GPU comes as a burst of events (card, render node, changes): one reselection
            // answers all that have arrived.
            let (mut added, mut removed) = (false, false);
            for event in monitor.iter() {
                match event.event_type() {
                    udev::EventType::Remove | udev::EventType::Unbind => removed = true,
                    udev::EventType::Add | udev::EventType::Change | udev::EventType::Bind => added = true,
                    _ => {}
                }
            }
            if !settle(&live, added, removed) {
                return;
            }
        }
    });
    if let Err(e) = spawned {
        log::warn(&format!("no hotplug: {e}"));
    }
}

/// Reselects after events; false once the container is no longer running.
/// Clients of the control socket hear of what changed, as after a change they asked for.
fn settle(live: &Shared, added: bool, removed: bool) -> bool {
    let mut live = live.lock().expect("live state lock");
    let before = live.devices.clone();
    for (happened, action) in [(removed, "remove"), (added, "add")] {
        if happened {
            if let Err(e) = live.hotplug(action) {
                log::warn(&format!("hotplug {action}: {e:#}"));
            }
        }
    }
    if live.devices != before {
        crate::control::announce(&live.status());
    }
    live.state == "running"
}
