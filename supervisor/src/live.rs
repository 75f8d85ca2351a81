//! A running container's devices, changed while it runs: `gpuboxctl attach/detach` and udev
//! hotplug events come here through the control socket. Every change holds the lock, so
//! requests are serialised, and runs permission first on attach (the device cgroup, and
//! systemd's `DeviceAllow=`) and last on detach, so the container never sees a node it cannot
//! open; a failed attach is rolled back whole.

use crate::devcgroup::DeviceFilter;
use crate::devices::Access;
use crate::mount_helper::MountHelper;
use crate::node_modes::FollowedNode;
use crate::{log, systemd};
use anyhow::{bail, Result};
use gpubox_control::{Device, HotplugAction, Origin, State, Status};
use gpubox_definition::Selector;
use gpubox_devices::cdi::Mount;
use gpubox_devices::{select, Inventory, Node, Selection};
use std::os::fd::AsFd;
use std::path::PathBuf;

/// The live state, shared by the control socket's threads and the device watch.
pub type Shared = std::sync::Arc<std::sync::Mutex<Live>>;

pub struct Live {
    pub name: String,
    pub pid: i32,
    /// The container's mount namespace, opened while the payload was surely the supervisor's
    /// child (a pid can be reused once it is reaped); the mount helper enters it.
    pub mount_ns: Option<std::os::fd::OwnedFd>,
    pub state: State,
    pub hotplug: bool,
    /// The definition's selectors, which hotplug events are matched against.
    pub selectors: Vec<Selector>,
    /// Mounts nodes inside; started at the first change.
    pub helper: Option<MountHelper>,
    /// Host id of the container's root (0 without a user namespace).
    pub owner: u32,
    /// The container's runtime directory, which the helper covers with its staging tmpfs.
    pub run_dir: PathBuf,
    pub cgroup_path: Option<PathBuf>,
    /// The device-cgroup program's allowed nodes (none without a cgroup).
    pub devices_filter: Option<DeviceFilter>,
    /// Device numbers every container may use (the standard nodes, its console).
    pub base_allowed: Vec<(u32, Option<u32>)>,
    pub unit: Option<String>,
    /// The group devices are given to inside (see `devices::device_group`).
    pub device_group: u32,
    pub devices: Vec<Device>,
    pub nodes: Vec<Node>,
    /// Whether udev's events are followed (see `watch`).
    pub followed: bool,
    /// The unit's `DeviceAllow=` as last set (see `systemd`).
    pub allowed_by_systemd: Vec<String>,
    /// Nodes still mounted inside whose detach failed: on record, since the container has
    /// them, but never allowed again (their device may be gone, and its numbers taken by
    /// another); the next removal tries again.
    pub stuck: Vec<Node>,
    /// Nodes whose mode follows a host node's (see `node_modes`).
    pub host_modes: Vec<FollowedNode>,
    /// The GPUs this container holds host-wide (see `allocator`), and whether alone.
    pub held: Vec<crate::allocator::Held>,
    pub exclusive: bool,
    /// NVIDIA GPUs whose Xid errors are logged, by the driver's name for them (see `watch`).
    pub xid: Vec<(String, String)>,
    /// What the payload was started with, for `gpuboxctl exec`.
    pub exec_context: gpubox_control::ExecContext,
}

impl Live {
    pub fn status(&self) -> Status {
        Status {
            name: self.name.clone(),
            state: self.state.to_owned(),
            pid: self.pid,
            hotplug: self.hotplug,
            devices: self.devices.clone(),
            waiting: if self.hotplug {
                self.selectors
                    .iter()
                    .map(|s| s.to_string())
                    .filter(|s| !self.devices.iter().any(|d| &d.name == s))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Attaches what `selector` names now; attaching it again changes nothing.
    pub fn attach(&mut self, selector: &str, how: Origin) -> Result<()> {
        self.check_running()?;
        let selector: Selector = selector.parse().map_err(anyhow::Error::msg)?;
        let name = selector.to_string();
        if self.devices.iter().any(|d| d.name == name) {
            return Ok(());
        }
        let inventory = Inventory::discover();
        let selection = select(&inventory, std::slice::from_ref(&selector), false).map_err(anyhow::Error::msg)?;
        // No GPU another container holds alone, and none of ours to another alone.
        let holds = crate::start_devices::hold_more(&self.name, &inventory, &selector, self.exclusive, &self.held)?;
        self.attach_device(&name, &selection, &selection.nodes, how)?;
        self.held.extend(holds);
        Ok(())
    }

    /// Lets go of the GPUs that none of the devices still held names (in `inventory`, the
    /// caller's discovery: a second one would cost every change a few ms).
    fn release_unused(&mut self, inventory: &Inventory) {
        let names: Vec<Selector> = self.devices.iter().filter_map(|d| d.name.parse().ok()).collect();
        let keys: Vec<String> = gpubox_devices::allocation::candidates(inventory, &names)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.key)
            .collect();
        self.held.retain(|h| keys.contains(&h.key));
    }

    /// Detaches what was attached as `selector`; detaching it again changes nothing.
    pub fn detach(&mut self, selector: &str) -> Result<()> {
        self.check_running()?;
        let name = selector.parse::<Selector>().map_err(anyhow::Error::msg)?.to_string();
        let Some(device) = self.devices.iter().find(|d| d.name == name) else { return Ok(()) };
        let others = || self.devices.iter().filter(|d| d.name != name);
        let going: Vec<Node> = self
            .nodes
            .iter()
            .filter(|n| device.nodes.contains(&n.path) && !others().any(|d| d.nodes.contains(&n.path)))
            .cloned()
            .collect();
        // The device stays on record until its nodes are out (a device with no nodes left has
        // gone with them, mounts and all).
        self.detach_nodes(&going)?;
        match self.devices.iter().position(|d| d.name == name) {
            Some(index) => {
                let device = self.devices.remove(index);
                let unbound = self.unbind_mounts_of(&[device]);
                self.release_unused(&Inventory::discover());
                unbound
            }
            None => Ok(()),
        }
    }

    /// A udev event. Add (with `Hotplug=yes` only): attach what the definition's selectors
    /// match now and is not attached yet. Remove (always, so that no container keeps the
    /// permission for a device that is gone): detach every node its selector no longer finds.
    pub fn hotplug(&mut self, action: HotplugAction) -> Result<()> {
        if self.state != State::Running || (action.may_add() && !self.hotplug) {
            return Ok(());
        }
        let inventory = Inventory::discover();
        if action.may_add() {
            self.hotplug_add(&inventory)
        } else {
            self.hotplug_remove(&inventory)
        }
    }

    /// Attaches what the selectors match now and is not attached yet.
    fn hotplug_add(&mut self, inventory: &Inventory) -> Result<()> {
        for selector in self.selectors.clone() {
            let selection = select(inventory, std::slice::from_ref(&selector), true).map_err(anyhow::Error::msg)?;
            let missing: Vec<Node> =
                selection.nodes.iter().filter(|n| !self.nodes.iter().any(|m| m.path == n.path)).cloned().collect();
            if !missing.is_empty() {
                let holds =
                    crate::start_devices::hold_more(&self.name, inventory, &selector, self.exclusive, &self.held)?;
                self.attach_device(&selector.to_string(), &selection, &missing, Origin::Hotplug)?;
                self.held.extend(holds);
            }
        }
        Ok(())
    }

    /// Detaches every node its selector no longer finds.
    fn hotplug_remove(&mut self, inventory: &Inventory) -> Result<()> {
        let mut still: Vec<Node> = Vec::new();
        for device in &self.devices {
            if let Ok(selector) = device.name.parse::<Selector>() {
                still.extend(select(inventory, &[selector], true).map(|s| s.nodes).unwrap_or_default());
            }
        }
        let gone: Vec<Node> = self.nodes.iter().filter(|n| !still.contains(n)).cloned().collect();
        let detached = self.detach_nodes(&gone);
        if !gone.is_empty() {
            self.release_unused(inventory);
        }
        detached
    }

    /// Starts the mount helper ahead of the first change, which then need not wait for it.
    pub fn prepare(&mut self) -> Result<()> {
        if self.state != State::Running {
            return Ok(());
        }
        self.helper().map(drop)
    }

    /// Under systemd, a `Hotplug=yes` container's unit allows the GPU classes the kernel has
    /// now, so that the first GPU of a known kind that comes later does not wait for a systemd
    /// call (a class is allowed for good at its first GPU anyway; the container's own device
    /// program stays exact). A class whose driver is not loaded yet still costs its first GPU
    /// that call.
    pub fn allow_gpu_classes(&mut self) -> Result<()> {
        let Some(unit) = self.unit.clone().filter(|_| self.hotplug && self.state == State::Running) else {
            return Ok(());
        };
        let mut entries = self.allowed_by_systemd.clone();
        for class in systemd::gpu_classes() {
            if !entries.contains(&class) {
                entries.push(class);
            }
        }
        if entries != self.allowed_by_systemd {
            systemd::set_device_allow(&unit, &entries)?;
            self.allowed_by_systemd = entries;
        }
        Ok(())
    }

    /// Gives the container's nodes the mode their host nodes have now. A hotplugged node is
    /// attached as soon as the kernel makes it, when it still has devtmpfs's 0600 (container
    /// root can open it); udev sets its mode a little later, and the container's node follows,
    /// as a non-root user on the host waits for udev too.
    pub fn follow_host_modes(&mut self) {
        if self.state != State::Running {
            return;
        }
        for followed in &mut self.host_modes {
            if let Err(e) = followed.follow() {
                log::warn(&format!("{} keeps its mode: {e}", followed.node.path.display()));
            }
        }
    }

    /// The directories of the host nodes whose modes the container's nodes follow.
    pub fn mode_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.host_modes.iter().filter_map(|f| f.host_dir().map(PathBuf::from)).collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    fn check_running(&self) -> Result<()> {
        if self.state != State::Running {
            bail!("container {} is {}", self.name, self.state);
        }
        Ok(())
    }

    /// Nodes first (permission, then each node), then the CDI mounts the container does not
    /// have yet; any failure undoes everything done, so the container never sees half a GPU.
    /// `nodes` are those of `selection` to attach; its mounts and node access come along.
    fn attach_device(&mut self, name: &str, selection: &Selection, nodes: &[Node], how: Origin) -> Result<()> {
        let mounts = &selection.mounts;
        let new: Vec<Node> = nodes.iter().filter(|n| !self.nodes.contains(n)).cloned().collect();
        let mut new_mounts: Vec<&Mount> = Vec::new();
        for m in mounts {
            if !self.devices.iter().any(|d| d.mounts.contains(&m.container_path))
                && !new_mounts.iter().any(|n| n.container_path == m.container_path)
            {
                new_mounts.push(m);
            }
        }
        let mut all = self.nodes.clone();
        all.extend(new.iter().cloned());
        self.grant(&all)?;
        let (mut done, mut bound) = (Vec::new(), Vec::new());
        let mut failed = None;
        let mut modes = Vec::new();
        for node in &new {
            let spec = selection.access_of(&node.path);
            let access = Access::for_node(node, self.device_group, &spec);
            match self.helper().and_then(|h| h.attach(node, access)) {
                Ok(()) => {
                    done.push(node.clone());
                    modes.extend(FollowedNode::open(self.pid, node, &spec, access.mode));
                }
                Err(e) => {
                    failed = Some(e.context(format!("attaching {}", node.path.display())));
                    break;
                }
            }
        }
        for m in &new_mounts {
            if failed.is_some() {
                break;
            }
            let read_only = m.options.iter().any(|o| o == "ro");
            match self.helper().and_then(|h| h.bind(&m.host_path, &m.container_path, read_only)) {
                Ok(()) => bound.push(m.container_path.clone()),
                Err(e) => failed = Some(e.context(format!("binding {}", m.container_path.display()))),
            }
        }
        if let Some(e) = failed {
            for path in &bound {
                let _ = self.helper().and_then(|h| h.unbind(path));
            }
            for n in &done {
                let _ = self.eject(n);
            }
            let before = self.nodes.clone();
            let _ = self.grant(&before);
            return Err(e);
        }
        self.nodes = all;
        self.host_modes.extend(modes);
        let paths: Vec<PathBuf> = nodes.iter().map(|n| n.path.clone()).collect();
        let mount_paths: Vec<PathBuf> = mounts.iter().map(|m| m.container_path.clone()).collect();
        let device = match self.devices.iter_mut().position(|d| d.name == name) {
            Some(i) => &mut self.devices[i],
            None => {
                self.devices.push(Device { name: name.to_owned(), how: how.to_owned(), ..Device::default() });
                self.devices.last_mut().expect("just pushed")
            }
        };
        for p in paths {
            if !device.nodes.contains(&p) {
                device.nodes.push(p);
            }
        }
        for p in mount_paths {
            if !device.mounts.contains(&p) {
                device.mounts.push(p);
            }
        }
        let mut what = describe(&new);
        if !bound.is_empty() {
            what +=
                &format!(" (mounts: {})", bound.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "));
        }
        log::info(&format!("attached {name} ({how}): {what}"));
        Ok(())
    }

    /// Permission first, then each node out of the container. A node that will not go stays on
    /// record (the container still has it) but `stuck`, without permission.
    fn detach_nodes(&mut self, going: &[Node]) -> Result<()> {
        if going.is_empty() {
            return Ok(());
        }
        let remaining: Vec<Node> = self.nodes.iter().filter(|n| !going.contains(n)).cloned().collect();
        self.grant(&remaining)?;
        let (mut gone, mut failed) = (Vec::new(), None);
        for node in going {
            self.warn_holders(node);
            match self.eject(node) {
                Ok(()) => gone.push(node.clone()),
                Err(e) => {
                    failed = Some(e.context(format!("detaching {}", node.path.display())));
                    break;
                }
            }
        }
        self.nodes.retain(|n| !gone.contains(n));
        self.stuck.retain(|n| !gone.contains(n));
        let stuck: Vec<Node> = going.iter().filter(|n| !gone.contains(n) && !self.stuck.contains(n)).cloned().collect();
        self.stuck.extend(stuck);
        self.host_modes.retain(|f| !gone.contains(&f.node));
        for d in &mut self.devices {
            d.nodes.retain(|p| !gone.iter().any(|n| &n.path == p));
        }
        let (left, kept): (Vec<Device>, Vec<Device>) = self.devices.drain(..).partition(|d| d.nodes.is_empty());
        self.devices = kept;
        if !gone.is_empty() {
            log::info(&format!("detached {}", describe(&gone)));
        }
        let unbound = self.unbind_mounts_of(&left);
        match failed {
            Some(e) => Err(e),
            None => unbound,
        }
    }

    /// Unbinds the CDI mounts of devices that went, unless a device still held has them too.
    fn unbind_mounts_of(&mut self, gone: &[Device]) -> Result<()> {
        let mut going: Vec<PathBuf> = gone
            .iter()
            .flat_map(|d| d.mounts.iter().cloned())
            .filter(|p| !self.devices.iter().any(|d| d.mounts.contains(p)))
            .collect();
        going.sort();
        going.dedup();
        for path in going {
            self.helper()?.unbind(&path)?;
        }
        Ok(())
    }

    fn eject(&mut self, node: &Node) -> Result<()> {
        self.helper()?.detach(&node.path)
    }

    /// The running mount helper, started (again) when there is none.
    fn helper(&mut self) -> Result<&mut MountHelper> {
        if !self.helper.as_mut().is_some_and(MountHelper::alive) {
            let Some(ns) = &self.mount_ns else { bail!("the container's mount namespace could not be opened") };
            self.helper = Some(MountHelper::start(ns.as_fd(), self.owner, &self.run_dir)?);
        }
        Ok(self.helper.as_mut().expect("started above"))
    }

    /// Exactly these nodes (plus the standard ones) become usable: the BPF program on the
    /// payload's cgroup, and under systemd the unit's `DeviceAllow=` (by class for GPUs, see
    /// `systemd`).
    fn grant(&mut self, nodes: &[Node]) -> Result<()> {
        let nodes: Vec<Node> = nodes.iter().filter(|n| !self.stuck.contains(n)).cloned().collect();
        let nodes = &nodes[..];
        if let Some(filter) = &mut self.devices_filter {
            let mut allowed = self.base_allowed.clone();
            allowed.extend(nodes.iter().map(|n| (n.major, Some(n.minor))));
            filter.set(&allowed)?;
        }
        if let Some(unit) = &self.unit {
            let entries = systemd::device_allow_entries(nodes, &self.allowed_by_systemd);
            if entries != self.allowed_by_systemd {
                systemd::set_device_allow(unit, &entries)?;
                self.allowed_by_systemd = entries;
            }
        }
        Ok(())
    }

    /// Open descriptors survive a detach (the kernel checks device access at open): say who
    /// holds one, so an operator knows what still uses the GPU.
    fn warn_holders(&self, node: &Node) {
        let Some(procs) = self.cgroup_path.as_ref().and_then(|c| std::fs::read_to_string(c.join("cgroup.procs")).ok())
        else {
            return;
        };
        for pid in procs.split_whitespace() {
            let holds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == node.path));
            if holds {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                log::warn(&format!(
                    "process {pid} ({}) still has {} open; it keeps that descriptor until it closes it",
                    comm.trim(),
                    node.path.display()
                ));
            }
        }
    }
}

fn describe(nodes: &[Node]) -> String {
    nodes.iter().map(|n| n.path.display().to_string()).collect::<Vec<_>>().join(" ")
}
