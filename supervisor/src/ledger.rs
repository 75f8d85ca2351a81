//! What a container holds: its devices (each by its selector and how it came), the nodes they
//! have inside, and their CDI mounts. Pure bookkeeping, with no system call, so that the rules
//! that matter most are unit tested without root: each change is planned here, applied by
//! `live.rs`, and recorded here only as far as it was applied. A node that would not go stays
//! on record but is never allowed again: its device may be gone and its numbers another's.
//! See docs/architecture.md, "One device model".

use gpubox_control::{Device, Origin};
use gpubox_definition::Selector;
use gpubox_devices::cdi::Mount;
use gpubox_devices::{Node, Selection};
use std::path::PathBuf;

/// One device the container holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub selector: Selector,
    pub origin: Origin,
    /// Paths inside of its nodes.
    pub nodes: Vec<PathBuf>,
    /// Paths inside where its CDI mounts are bound.
    pub mounts: Vec<PathBuf>,
}

/// An attach worked out: what to do, and what to record once it is done.
#[derive(Debug, Clone, PartialEq)]
pub struct Attach {
    pub entry: Entry,
    /// Nodes the container does not have yet: to make inside.
    pub new_nodes: Vec<Node>,
    /// Mounts no device of the container has yet: to bind inside.
    pub new_mounts: Vec<Mount>,
    /// Every node the container may use once it is done (the device cgroup's new set).
    pub allowed: Vec<Node>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    entries: Vec<Entry>,
    /// Every node inside, stuck ones too.
    nodes: Vec<Node>,
    /// Nodes still inside whose removal failed: on record, since the container has them, but
    /// never allowed again (their device may be gone, and its numbers taken by another).
    stuck: Vec<Node>,
}

impl Ledger {
    /// The devices of the start, and the nodes the container was given with them.
    pub fn with_start(entries: Vec<Entry>, nodes: Vec<Node>) -> Ledger {
        Ledger { entries, nodes, stuck: Vec::new() }
    }

    pub fn holds(&self, selector: &Selector) -> bool {
        self.entries.iter().any(|e| &e.selector == selector)
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    #[cfg(test)]
    pub fn stuck(&self) -> &[Node] {
        &self.stuck
    }

    /// The selectors of the devices held, for what they still name on the host.
    pub fn selectors(&self) -> Vec<Selector> {
        self.entries.iter().map(|e| e.selector.clone()).collect()
    }

    /// `nodes` of `selection` (all of them, or those a hotplug event found missing) attached
    /// under `selector`: the nodes and mounts the container lacks, and what it may use after.
    pub fn plan_attach(&self, selector: &Selector, origin: Origin, selection: &Selection, nodes: &[Node]) -> Attach {
        let new_nodes: Vec<Node> = unique(nodes.iter().filter(|n| !self.nodes.contains(n)).cloned());
        let mut new_mounts: Vec<Mount> = Vec::new();
        for m in &selection.mounts {
            let held = self.entries.iter().any(|e| e.mounts.contains(&m.container_path));
            if !held && !new_mounts.iter().any(|n| n.container_path == m.container_path) {
                new_mounts.push(m.clone());
            }
        }
        let mut after = self.nodes.clone();
        after.extend(new_nodes.iter().cloned());
        Attach {
            entry: Entry {
                selector: selector.clone(),
                origin,
                nodes: unique(nodes.iter().map(|n| n.path.clone())),
                mounts: unique(selection.mounts.iter().map(|m| m.container_path.clone())),
            },
            new_nodes,
            new_mounts,
            allowed: self.allowed(&after),
        }
    }

    /// Records an attach that was applied whole (one that failed half-way was undone, and
    /// leaves no record). A device attached again under its selector gains the new paths.
    pub fn record_attach(&mut self, attach: Attach) {
        self.nodes.extend(attach.new_nodes);
        let entry = attach.entry;
        match self.entries.iter_mut().find(|e| e.selector == entry.selector) {
            Some(held) => {
                held.nodes = unique(held.nodes.iter().chain(&entry.nodes).cloned());
                held.mounts = unique(held.mounts.iter().chain(&entry.mounts).cloned());
            }
            None => self.entries.push(entry),
        }
    }

    /// The nodes a detach of `selector` takes out of the container: its own, not those
    /// another device held still has. None when it is not held.
    pub fn plan_detach(&self, selector: &Selector) -> Option<Vec<Node>> {
        let entry = self.entries.iter().find(|e| &e.selector == selector)?;
        let others = || self.entries.iter().filter(|e| &e.selector != selector);
        Some(
            self.nodes
                .iter()
                .filter(|n| entry.nodes.contains(&n.path) && !others().any(|e| e.nodes.contains(&n.path)))
                .cloned()
                .collect(),
        )
    }

    /// After a removal on the host: the nodes inside that none of what the devices' selectors
    /// still find (`still`) has.
    pub fn plan_gone(&self, still: &[Node]) -> Vec<Node> {
        self.nodes.iter().filter(|n| !still.contains(n)).cloned().collect()
    }

    /// What the container may use while `going` leaves: everything else that is not stuck
    /// (permission goes before the node does).
    pub fn allowed_without(&self, going: &[Node]) -> Vec<Node> {
        let remaining: Vec<Node> = self.nodes.iter().filter(|n| !going.contains(n)).cloned().collect();
        self.allowed(&remaining)
    }

    /// `nodes` less the stuck ones.
    pub fn allowed(&self, nodes: &[Node]) -> Vec<Node> {
        nodes.iter().filter(|n| !self.stuck.contains(n)).cloned().collect()
    }

    /// Records the removal of `going`, of which `gone` went (the rest are stuck now). A device
    /// that had nodes and has none left is forgotten; returns the mounts that then no device
    /// has, to unbind.
    pub fn record_removed(&mut self, going: &[Node], gone: &[Node]) -> Vec<PathBuf> {
        self.nodes.retain(|n| !gone.contains(n));
        self.stuck.retain(|n| !gone.contains(n));
        for n in going {
            if !gone.contains(n) && !self.stuck.contains(n) {
                self.stuck.push(n.clone());
            }
        }
        let mut left = Vec::new();
        self.entries.retain_mut(|e| {
            let had = !e.nodes.is_empty();
            e.nodes.retain(|p| !gone.iter().any(|n| &n.path == p));
            let keep = !(had && e.nodes.is_empty());
            if !keep {
                left.push(e.clone());
            }
            keep
        });
        self.unheld_mounts(&left)
    }

    /// Forgets the device held as `selector` (its nodes are out, or shared); returns the mounts
    /// that then no device has, to unbind.
    pub fn forget(&mut self, selector: &Selector) -> Vec<PathBuf> {
        let (left, kept): (Vec<Entry>, Vec<Entry>) = self.entries.drain(..).partition(|e| &e.selector == selector);
        self.entries = kept;
        self.unheld_mounts(&left)
    }

    /// The mounts of `left` that no device held still has.
    fn unheld_mounts(&self, left: &[Entry]) -> Vec<PathBuf> {
        let mut going: Vec<PathBuf> = left
            .iter()
            .flat_map(|e| e.mounts.iter().cloned())
            .filter(|p| !self.entries.iter().any(|e| e.mounts.contains(p)))
            .collect();
        going.sort();
        going.dedup();
        going
    }

    /// The devices as `gpuboxctl status` shows them.
    pub fn devices(&self) -> Vec<Device> {
        self.entries
            .iter()
            .map(|e| Device {
                name: e.selector.to_string(),
                nodes: e.nodes.clone(),
                how: e.origin,
                mounts: e.mounts.clone(),
            })
            .collect()
    }

    /// Of `selectors`, those no device held came by (what a `Hotplug=yes` container waits for).
    pub fn waiting(&self, selectors: &[Selector]) -> Vec<String> {
        selectors.iter().filter(|s| !self.holds(s)).map(|s| s.to_string()).collect()
    }
}

fn unique<T: PartialEq>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

// `[a.clone()]` reads as the list it is meant to be; `from_ref` would hide it.
#[cfg(test)]
#[allow(clippy::cloned_ref_to_slice_refs)]
mod tests {
    use super::*;

    fn node(path: &str, minor: u32) -> Node {
        Node { path: path.into(), major: 195, minor }
    }

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    fn selection(nodes: &[Node], mounts: &[&str]) -> Selection {
        Selection {
            nodes: nodes.to_vec(),
            mounts: mounts
                .iter()
                .map(|p| Mount {
                    host_path: format!("/host{p}").into(),
                    container_path: p.into(),
                    options: vec![],
                    kind: None,
                })
                .collect(),
            ..Selection::default()
        }
    }

    fn attach(l: &mut Ledger, s: &str, nodes: &[Node], mounts: &[&str]) -> Attach {
        let plan = l.plan_attach(&sel(s), Origin::Hand, &selection(nodes, mounts), nodes);
        l.record_attach(plan.clone());
        plan
    }

    /// Two GPUs share nvidiactl and nvidia-uvm: the second brings only its own node, and
    /// detaching the first leaves what the second still needs.
    #[test]
    fn shared_nodes_stay_until_the_last_device_that_has_them_goes() {
        let (ctl, uvm, gpu0, gpu1) =
            (node("/dev/nvidiactl", 255), node("/dev/nvidia-uvm", 0), node("/dev/nvidia0", 0), node("/dev/nvidia1", 1));
        let mut l = Ledger::default();
        let first = attach(&mut l, "nvidia:0", &[gpu0.clone(), ctl.clone(), uvm.clone()], &[]);
        assert_eq!(first.new_nodes.len(), 3);
        let second = attach(&mut l, "nvidia:1", &[gpu1.clone(), ctl.clone(), uvm.clone()], &[]);
        assert_eq!(second.new_nodes, [gpu1.clone()]);
        assert_eq!(second.allowed.len(), 4);
        assert_eq!(l.plan_detach(&sel("nvidia:0")).unwrap(), [gpu0.clone()]);
        let going = l.plan_detach(&sel("nvidia:0")).unwrap();
        assert_eq!(l.allowed_without(&going), [ctl.clone(), uvm.clone(), gpu1.clone()]);
        l.record_removed(&going, &going);
        assert!(l.holds(&sel("nvidia:1")));
        // Its shared nodes stay on its record too, until the detach forgets it (live.rs).
        assert!(l.holds(&sel("nvidia:0")));
        assert!(l.forget(&sel("nvidia:0")).is_empty());
        assert_eq!(l.plan_detach(&sel("nvidia:1")).unwrap(), [ctl, uvm, gpu1]);
        assert_eq!(l.plan_detach(&sel("nvidia:0")), None);
    }

    /// A CDI mount two devices bring is bound once and unbound with the last of them.
    #[test]
    fn shared_mounts_are_bound_once_and_unbound_with_the_last_device() {
        let mut l = Ledger::default();
        let a = attach(&mut l, "cdi:example.com/gpu=a", &[node("/dev/a", 1)], &["/usr/lib/driver"]);
        assert_eq!(a.new_mounts.len(), 1);
        let b = attach(&mut l, "cdi:example.com/gpu=b", &[node("/dev/b", 2)], &["/usr/lib/driver", "/opt/b"]);
        assert_eq!(
            b.new_mounts.iter().map(|m| m.container_path.clone()).collect::<Vec<_>>(),
            [PathBuf::from("/opt/b")]
        );
        let going = l.plan_detach(&sel("cdi:example.com/gpu=a")).unwrap();
        assert!(l.record_removed(&going, &going).is_empty(), "b still has /usr/lib/driver");
        let going = l.plan_detach(&sel("cdi:example.com/gpu=b")).unwrap();
        assert_eq!(l.record_removed(&going, &going), [PathBuf::from("/opt/b"), PathBuf::from("/usr/lib/driver")]);
        assert!(l.devices().is_empty());
    }

    /// A node that would not go is never allowed again, stays on record, and goes at a later try.
    #[test]
    fn a_node_that_would_not_go_is_stuck_and_never_allowed_again() {
        let (a, b) = (node("/dev/dri/card1", 1), node("/dev/dri/renderD129", 129));
        let mut l = Ledger::default();
        attach(&mut l, "drm:card1", &[a.clone(), b.clone()], &[]);
        let going = l.plan_detach(&sel("drm:card1")).unwrap();
        // a went, b would not.
        l.record_removed(&going, std::slice::from_ref(&a));
        assert_eq!(l.stuck(), [b.clone()]);
        assert_eq!(l.nodes(), [b.clone()]);
        assert!(l.holds(&sel("drm:card1")), "the container still has one of its nodes");
        assert!(l.allowed(l.nodes()).is_empty());
        // Attached again: b is not made again, and not allowed.
        let again = l.plan_attach(
            &sel("drm:card1"),
            Origin::Hand,
            &selection(&[a.clone(), b.clone()], &[]),
            &[a.clone(), b.clone()],
        );
        assert_eq!(again.new_nodes, [a.clone()]);
        assert_eq!(again.allowed, [a.clone()]);
        // The next removal goes through.
        l.record_removed(std::slice::from_ref(&b), std::slice::from_ref(&b));
        assert!(l.stuck().is_empty() && l.nodes().is_empty());
    }

    /// An attach is only planned until it is recorded: one that failed half-way (and was
    /// undone by live.rs) leaves the ledger as it was.
    #[test]
    fn an_attach_that_is_not_recorded_leaves_nothing() {
        let mut l = Ledger::default();
        attach(&mut l, "nvidia:0", &[node("/dev/nvidia0", 0)], &[]);
        let before = l.clone();
        let plan = l.plan_attach(
            &sel("nvidia:1"),
            Origin::Hand,
            &selection(&[node("/dev/nvidia1", 1)], &["/x"]),
            &[node("/dev/nvidia1", 1)],
        );
        assert_eq!(plan.new_nodes.len(), 1);
        assert_eq!(l, before);
    }

    /// Hotplug: a removal takes out what the selectors no longer find; an add brings what is
    /// missing under the definition's selector, which then no longer waits.
    #[test]
    fn reselection_after_removal_and_addition() {
        let (card1, card2) = (node("/dev/dri/card1", 1), node("/dev/dri/card2", 2));
        let selectors = [sel("vendor:1234")];
        let mut l = Ledger::with_start(Vec::new(), Vec::new());
        assert_eq!(l.waiting(&selectors), ["vendor:1234"]);
        let add = l.plan_attach(
            &selectors[0],
            Origin::Hotplug,
            &selection(&[card1.clone(), card2.clone()], &[]),
            &[card1.clone(), card2.clone()],
        );
        l.record_attach(add);
        assert!(l.waiting(&selectors).is_empty());
        assert_eq!(l.devices()[0].how, Origin::Hotplug);
        // card2 left the host.
        let gone = l.plan_gone(std::slice::from_ref(&card1));
        assert_eq!(gone, [card2.clone()]);
        l.record_removed(&gone, &gone);
        assert_eq!(l.devices()[0].nodes, [PathBuf::from("/dev/dri/card1")]);
        // It came back: only it is new.
        let missing: Vec<Node> = vec![card2.clone()];
        let add =
            l.plan_attach(&selectors[0], Origin::Hotplug, &selection(&[card1.clone(), card2.clone()], &[]), &missing);
        assert_eq!(add.new_nodes, [card2]);
        l.record_attach(add);
        assert_eq!(l.devices().len(), 1);
        assert_eq!(l.devices()[0].nodes.len(), 2);
    }

    /// A device with mounts only (a CDI device without nodes) is not forgotten when another
    /// device's nodes go.
    #[test]
    fn a_device_without_nodes_stays_when_others_go() {
        let mut l = Ledger::default();
        attach(&mut l, "cdi:example.com/lib=all", &[], &["/usr/lib/x"]);
        attach(&mut l, "nvidia:0", &[node("/dev/nvidia0", 0)], &[]);
        let going = l.plan_detach(&sel("nvidia:0")).unwrap();
        assert!(l.record_removed(&going, &going).is_empty());
        assert!(l.holds(&sel("cdi:example.com/lib=all")));
        assert_eq!(l.forget(&sel("cdi:example.com/lib=all")), [PathBuf::from("/usr/lib/x")]);
    }
}
