//! A running container's state and its device changes: `gpuboxctl attach`, `detach` and
//! `hotplug` over the control socket, and the hotplug thread's reselections (watch.rs). Every
//! change holds the lock, so requests are serialised, and applies the ledger's plan permission
//! first (the device cgroup, systemd's `DeviceAllow=`): a node is allowed before it appears and
//! refused before it goes. A failed attach is undone whole, and only what was applied is
//! recorded. See docs/architecture.md, "Attach and detach" and "One device model".

use crate::devcgroup::DeviceFilter;
use crate::devices::Access;
use crate::ledger::Ledger;
use crate::mount_helper::MountHelper;
use crate::node_modes::FollowedNode;
use crate::{log, systemd};
use anyhow::{bail, Result};
use gpubox_control::{HotplugAction, Origin, State, Status};
use gpubox_definition::Selector;
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
    /// What the container holds (see `ledger`).
    pub ledger: Ledger,
    /// Whether udev's events are followed (see `watch`).
    pub followed: bool,
    /// The unit's `DeviceAllow=` as last set (see `systemd`).
    pub allowed_by_systemd: Vec<String>,
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
            devices: self.ledger.devices(),
            waiting: if self.hotplug { self.ledger.waiting(&self.selectors) } else { Vec::new() },
        }
    }

    /// Attaches what `selector` names now; attaching it again changes nothing.
    pub fn attach(&mut self, selector: &str, how: Origin) -> Result<()> {
        self.check_running()?;
        let selector: Selector = selector.parse().map_err(anyhow::Error::msg)?;
        if self.ledger.holds(&selector) {
            return Ok(());
        }
        let inventory = Inventory::discover();
        let selection = select(&inventory, std::slice::from_ref(&selector), false).map_err(anyhow::Error::msg)?;
        // No GPU another container holds alone, and none of ours to another alone.
        let holds = crate::start_devices::hold_more(&self.name, &inventory, &selector, self.exclusive, &self.held)?;
        self.attach_device(&selector, &selection, &selection.nodes, how)?;
        self.held.extend(holds);
        Ok(())
    }

    /// Lets go of the GPUs that none of the devices still held names (in `inventory`, the
    /// caller's discovery: a second one would cost every change a few ms).
    fn release_unused(&mut self, inventory: &Inventory) {
        let names = self.ledger.selectors();
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
        let selector = selector.parse::<Selector>().map_err(anyhow::Error::msg)?;
        let Some(going) = self.ledger.plan_detach(&selector) else { return Ok(()) };
        // The device stays on record until its nodes are out (a device with no nodes left has
        // gone with them, mounts and all).
        self.remove_nodes(&going)?;
        let unbound = if self.ledger.holds(&selector) {
            let mounts = self.ledger.forget(&selector);
            self.unbind(&mounts)
        } else {
            Ok(())
        };
        self.release_unused(&Inventory::discover());
        unbound
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
            let held = self.ledger.nodes();
            let missing: Vec<Node> =
                selection.nodes.iter().filter(|n| !held.iter().any(|m| m.path == n.path)).cloned().collect();
            if !missing.is_empty() {
                let holds =
                    crate::start_devices::hold_more(&self.name, inventory, &selector, self.exclusive, &self.held)?;
                self.attach_device(&selector, &selection, &missing, Origin::Hotplug)?;
                self.held.extend(holds);
            }
        }
        Ok(())
    }

    /// Detaches every node its selector no longer finds.
    fn hotplug_remove(&mut self, inventory: &Inventory) -> Result<()> {
        let mut still: Vec<Node> = Vec::new();
        for selector in self.ledger.selectors() {
            still.extend(select(inventory, &[selector], true).map(|s| s.nodes).unwrap_or_default());
        }
        let gone = self.ledger.plan_gone(&still);
        let detached = self.remove_nodes(&gone);
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
    fn attach_device(&mut self, selector: &Selector, selection: &Selection, nodes: &[Node], how: Origin) -> Result<()> {
        let plan = self.ledger.plan_attach(selector, how, selection, nodes);
        self.grant(&plan.allowed)?;
        let (mut done, mut bound) = (Vec::new(), Vec::new());
        let mut failed = None;
        let mut modes = Vec::new();
        for node in &plan.new_nodes {
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
        for m in &plan.new_mounts {
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
            let before = self.ledger.allowed(self.ledger.nodes());
            let _ = self.grant(&before);
            return Err(e);
        }
        let mut what = describe(&plan.new_nodes);
        if !bound.is_empty() {
            what +=
                &format!(" (mounts: {})", bound.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "));
        }
        self.ledger.record_attach(plan);
        self.host_modes.extend(modes);
        log::info(&format!("attached {selector} ({how}): {what}"));
        Ok(())
    }

    /// Permission first, then each node out of the container. A node that will not go stays on
    /// record (the container still has it) but stuck, without permission.
    fn remove_nodes(&mut self, going: &[Node]) -> Result<()> {
        if going.is_empty() {
            return Ok(());
        }
        self.grant(&self.ledger.allowed_without(going))?;
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
        let mounts = self.ledger.record_removed(going, &gone);
        self.host_modes.retain(|f| !gone.contains(&f.node));
        if !gone.is_empty() {
            log::info(&format!("detached {}", describe(&gone)));
        }
        let unbound = self.unbind(&mounts);
        match failed {
            Some(e) => Err(e),
            None => unbound,
        }
    }

    /// Unbinds CDI mounts that no device of the container has any more.
    fn unbind(&mut self, mounts: &[PathBuf]) -> Result<()> {
        for path in mounts {
            self.helper()?.unbind(path)?;
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
        let nodes = self.ledger.allowed(nodes);
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
