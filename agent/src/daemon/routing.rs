//! Pure: which targets a sampled process's events go to. Each selected container gets a slot
//! number in the kernel's target map, so a child forked between two scans (added in kernel by
//! the fork follower with its parent's slot) is attributed at once; other unknown pids are
//! resolved from their cgroup on first sight (by the caller's `resolve`).
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::k8s::{TargetKey, TargetPlan};

/// Containers → targets, container ↔ slot, and pid → container.
#[derive(Debug)]
pub struct Routing {
    /// container id → targets selecting it.
    routes: HashMap<String, Vec<TargetKey>>,
    /// container id ↔ slot in the kernel's target map.
    slots: HashMap<String, u32>,
    slot_ids: HashMap<u32, String>,
    next_slot: u32,
    /// pid → container id, for the processes of selected containers (as of the last scan).
    pids: HashMap<u32, String>,
    /// pid → container id of processes first seen in events since the last scan (forks).
    lazy: HashMap<u32, Option<String>>,
    /// Containers some target asks allocation probes for.
    probed: std::collections::HashSet<String>,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            routes: HashMap::new(),
            slots: HashMap::new(),
            slot_ids: HashMap::new(),
            next_slot: 1,
            pids: HashMap::new(),
            probed: Default::default(),
            lazy: HashMap::new(),
        }
    }
}

impl Routing {
    /// Takes the plan's containers (a slot for each new one; slots are never reused).
    pub fn set_plan(&mut self, wanted: &BTreeMap<TargetKey, TargetPlan>) {
        self.routes.clear();
        self.probed.clear();
        for p in wanted.values() {
            for c in &p.containers {
                if p.settings.alloc_probes {
                    self.probed.insert(c.id.id.clone());
                }
                self.routes
                    .entry(c.id.id.clone())
                    .or_default()
                    .push(p.key.clone());
                if !self.slots.contains_key(&c.id.id) {
                    let slot = self.next_slot;
                    self.next_slot = self.next_slot.wrapping_add(1).max(1);
                    self.slots.insert(c.id.id.clone(), slot);
                    self.slot_ids.insert(slot, c.id.id.clone());
                }
            }
        }
    }

    /// Whether some target selecting container `cid` asks for allocation probes.
    pub fn wants_alloc_probes(&self, cid: &str) -> bool {
        self.probed.contains(cid)
    }

    /// The containers some target selects.
    pub fn wanted(&self) -> BTreeSet<String> {
        self.routes.keys().cloned().collect()
    }

    /// Whether some target selects container `cid`.
    pub fn is_wanted(&self, cid: &str) -> bool {
        self.routes.contains_key(cid)
    }

    /// The targets selecting container `cid`.
    pub fn targets_of(&self, cid: &str) -> &[TargetKey] {
        self.routes.get(cid).map_or(&[], Vec::as_slice)
    }

    /// The kernel slot of container `cid` (0: none).
    pub fn slot_of(&self, cid: &str) -> u32 {
        self.slots.get(cid).copied().unwrap_or(0)
    }

    /// Whether `pid` was placed by the last scan.
    pub fn is_known(&self, pid: u32) -> bool {
        self.pids.contains_key(&pid)
    }

    /// The result of a scan: pid → container; forget what was learnt from events since.
    pub fn set_pids(&mut self, pids: HashMap<u32, String>) {
        self.pids = pids;
        self.lazy.clear();
    }

    /// Forget every placed pid (new programs: every pid is added again by the next scan).
    pub fn forget_pids(&mut self) {
        self.pids.clear();
    }

    /// Which selected container a sampled process belongs to: from the last scan, else its
    /// slot, else `resolve` (its cgroup), remembered until the next scan.
    pub fn container_of_event(
        &mut self,
        tgid: u32,
        slot: u32,
        resolve: impl FnOnce(u32) -> Option<String>,
    ) -> Option<String> {
        if let Some(c) = self.pids.get(&tgid) {
            return Some(c.clone());
        }
        if let Some(c) = self.lazy.get(&tgid) {
            return c.clone();
        }
        let c = self
            .slot_ids
            .get(&slot)
            .cloned()
            .filter(|c| self.routes.contains_key(c))
            .or_else(|| resolve(tgid).filter(|c| self.routes.contains_key(c)));
        self.lazy.insert(tgid, c.clone());
        c
    }
}
