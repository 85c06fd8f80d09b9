//! (desired, actual) -> ordered map operations. Pure.
//!
//! Ids are chosen here: a frontend keeps its service id and a backend its backend id for as
//! long as they exist, so tracked flows stay valid. Write order never exposes half-built
//! state: backends first, then slot tables, then frontends; removals in reverse.
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash as _, Hasher as _},
    net::SocketAddrV4,
    sync::Arc,
};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, Backend, FAMILY_IPV4, FRONTEND_AFFINITY, FRONTEND_MAGLEV,
    FRONTEND_SOURCE_RANGES, Frontend, FrontendKey, MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICE_ID,
    MAX_SLOTS, SCOPE_CLUSTER, SCOPE_EXTERNAL, SlotKey, ipv4_addr, maglev, net_port,
};

use ipnet::Ipv4Net;

use crate::desired::{self, Algorithm, Backends, DesiredDataplane};

/// The content of the service maps, as read back or as last written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActualDataplane {
    pub frontends: HashMap<FrontendKey, Frontend>,
    pub slots: HashMap<SlotKey, u32>,
    /// Backends in use (active or draining); free ids are left out.
    pub backends: BTreeMap<u32, Backend>,
    /// Service ids with a Maglev table -> what the table was built from
    /// ([`MaglevTable::digest`]); [`UNKNOWN_TABLE`] for a table read back from the maps,
    /// whose making this agent did not see (it is built again).
    pub maglev: HashMap<u32, u64>,
    /// Service ids with `loadBalancerSourceRanges` -> their client ranges.
    pub source_ranges: HashMap<u32, BTreeSet<Ipv4Net>>,
}

/// The digest of a Maglev table found in the maps.
pub const UNKNOWN_TABLE: u64 = 0;

/// A Service port's Maglev table: backend ids, one per entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// A hash of the table size and the serving backends (ids and addresses) it was built
    /// from: the same digest, the same table.
    pub digest: u64,
    pub backend_ids: Arc<[u32]>,
}

impl MaglevTable {
    fn digest(table_size: u32, serving: &[(u32, SocketAddrV4)]) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        table_size.hash(&mut hasher);
        serving.hash(&mut hasher);
        // Never UNKNOWN_TABLE: that one is always rebuilt.
        hasher.finish().max(1)
    }

    /// The table of `serving` (ids and addresses, sorted by address): which endpoint takes
    /// an entry depends only on the addresses, so every node builds the same one.
    fn build(table_size: u32, serving: &[(u32, SocketAddrV4)], digest: u64) -> Self {
        let endpoints: Vec<u64> = serving
            .iter()
            .map(|(_, a)| maglev::endpoint_key(a.ip().octets(), a.port()))
            .collect();
        let mut table = vec![0u32; table_size as usize];
        maglev::populate(&endpoints, &mut table);
        for entry in &mut table {
            *entry = serving[*entry as usize].0;
        }
        Self {
            digest,
            backend_ids: table.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutFrontend(FrontendKey, Frontend),
    DeleteFrontend(FrontendKey),
    DeleteSlot(SlotKey),
    ClearBackend(u32),
    /// Zeroes a service id's traffic counters before a new frontend takes the id.
    ClearTraffic(u32),
    /// Puts a new table in place of the service id's (whole: a flow sees the old one or this).
    PutMaglev(u32, MaglevTable),
    DeleteMaglev(u32),
    /// Removes the clients' affinity entries of a service id (its frontend went, or dropped
    /// affinity).
    ForgetAffinity(u32),
    /// Lets clients in the range open flows to the service id ([`FRONTEND_SOURCE_RANGES`]).
    PutSourceRange(u32, Ipv4Net),
    DeleteSourceRange(u32, Ipv4Net),
}

/// A frontend that could not be programmed because a map is full. The frontend keeps what
/// it had (or stays absent), everything else is programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("{frontend}: not programmed: the frontend map is full ({MAX_FRONTENDS} entries)")]
    Frontends { frontend: desired::Frontend },
    #[error("{frontend}: not updated: the backend map is full ({MAX_BACKENDS} entries)")]
    Backends { frontend: desired::Frontend },
    #[error("{frontend}: not updated: the slot map is full ({MAX_SLOTS} entries)")]
    Slots { frontend: desired::Frontend },
}

impl CapacityError {
    pub fn frontend(&self) -> desired::Frontend {
        match self {
            Self::Frontends { frontend }
            | Self::Backends { frontend }
            | Self::Slots { frontend } => *frontend,
        }
    }
}

/// The operations to write, and the frontends left out for lack of room.
#[derive(Debug, Default)]
pub struct Plan {
    /// The writes in the order they go to the maps, in parts of one kind each. They are
    /// written and applied part by part, each freed once done: a first sync at 100,000
    /// Services plans 2.2 million writes, and one list of them would be copied together.
    pub parts: Vec<Vec<MapOp>>,
    pub skipped: Vec<CapacityError>,
    /// Maglev tables built with fewer than [`maglev::ENTRIES_PER_ENDPOINT`] entries per
    /// endpoint (their endpoints' shares may differ by more than 1 %): frontend, endpoints.
    pub crowded_tables: Vec<(desired::Frontend, usize)>,
}

impl Plan {
    /// Every write, in order.
    pub fn ops(&self) -> Vec<MapOp> {
        self.parts.concat()
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(Vec::is_empty)
    }
}

pub fn frontend_key(f: &desired::Frontend) -> FrontendKey {
    FrontendKey {
        addr: f.ip.octets(),
        port: net_port(f.port),
        protocol: f.protocol.number(),
        scope: match f.scope {
            desired::Scope::Cluster => SCOPE_CLUSTER,
            desired::Scope::External => SCOPE_EXTERNAL,
        },
    }
}

fn backend(addr: SocketAddrV4, service_id: u32, state: u8) -> Backend {
    Backend {
        addr: ipv4_addr(addr.ip().octets()),
        port: net_port(addr.port()),
        family: FAMILY_IPV4,
        state,
        service_id,
    }
}

/// Slots a frontend uses: those that take new flows, then the draining ones.
fn slot_count(f: &Frontend) -> u32 {
    f.backend_count.saturating_add(f.draining_count)
}

/// Hands out ids that neither the maps nor this plan use: upwards from just above the highest
/// one in use (free without looking), wrapping around to the holes below when the top is
/// reached. An id still in the maps is never handed out, even if this plan removes it.
struct IdAllocator<'a> {
    in_use: Box<dyn Fn(u32) -> bool + 'a>,
    taken: HashSet<u32>,
    next: u32,
    first: u32,
    limit: u32,
    exhausted: bool,
}

impl<'a> IdAllocator<'a> {
    fn new(
        in_use: impl Fn(u32) -> bool + 'a,
        highest_in_use: Option<u32>,
        first: u32,
        limit: u32,
    ) -> Self {
        let next = highest_in_use
            .and_then(|h| h.checked_add(1))
            .filter(|n| *n < limit)
            .unwrap_or(first);
        Self {
            in_use: Box::new(in_use),
            taken: HashSet::new(),
            next,
            first,
            limit,
            exhausted: false,
        }
    }

    fn take(&mut self) -> Option<u32> {
        // Once a whole round found nothing, none frees up within this plan: without this,
        // every frontend that does not fit would scan every id again.
        if self.exhausted {
            return None;
        }
        for _ in self.first..self.limit {
            let id = self.next;
            self.next = if id + 1 >= self.limit {
                self.first
            } else {
                id + 1
            };
            if !(self.in_use)(id) && self.taken.insert(id) {
                return Some(id);
            }
        }
        self.exhausted = true;
        None
    }
}

/// Map sizes the plan must fit in.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub frontends: usize,
    pub slots: usize,
    pub backends: u32,
}

impl Capacity {
    pub const MAPS: Capacity = Capacity {
        frontends: MAX_FRONTENDS as usize,
        slots: MAX_SLOTS as usize,
        backends: MAX_BACKENDS,
    };
}

/// Which frontends a plan looks at.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Every frontend, and every backend no frontend uses (a full resync).
    All,
    /// Only these (after a change touched them).
    Frontends(&'a BTreeSet<desired::Frontend>),
}

/// Every frontend of the maps made equal to `desired`.
pub fn diff(desired: &DesiredDataplane, actual: &ActualDataplane) -> Plan {
    plan(desired, actual, Scope::All, Capacity::MAPS)
}

/// Only `frontends` made equal to `desired`: what a change touched.
pub fn diff_frontends(
    desired: &DesiredDataplane,
    actual: &ActualDataplane,
    frontends: &BTreeSet<desired::Frontend>,
) -> Plan {
    plan(desired, actual, Scope::Frontends(frontends), Capacity::MAPS)
}

pub fn diff_with_capacity(
    desired: &DesiredDataplane,
    actual: &ActualDataplane,
    capacity: Capacity,
) -> Plan {
    plan(desired, actual, Scope::All, capacity)
}

pub fn plan(
    desired: &DesiredDataplane,
    actual: &ActualDataplane,
    scope: Scope,
    capacity: Capacity,
) -> Plan {
    let mut planner = Planner::new(actual, capacity, desired.algorithm);
    match scope {
        Scope::All => {
            planner.place(desired.frontends.iter());
            let wanted: HashSet<FrontendKey> = desired.frontends.keys().map(frontend_key).collect();
            let mut removed: Vec<_> = actual
                .frontends
                .iter()
                .filter(|(key, _)| !wanted.contains(key))
                .collect();
            removed.sort_by_key(|(_, f)| f.service_id);
            planner.remove(removed);
            planner.clear_unreferenced();
            planner.delete_orphan_slots();
            planner.delete_orphan_tables();
            planner.delete_orphan_ranges();
        }
        Scope::Frontends(frontends) => {
            planner.place(
                frontends
                    .iter()
                    .filter_map(|f| desired.frontends.get_key_value(f)),
            );
            planner.remove(
                frontends
                    .iter()
                    .filter(|f| !desired.frontends.contains_key(f))
                    .filter_map(|f| actual.frontends.get_key_value(&frontend_key(f))),
            );
        }
    }
    planner.finish()
}

/// Builds a plan frontend by frontend within the room the maps have.
struct Planner<'a> {
    actual: &'a ActualDataplane,
    algorithm: Algorithm,
    /// Removals are written last, so the maps must hold old and new entries at once: every
    /// budget counts from what is there now.
    frontend_room: usize,
    slot_room: usize,
    service_ids: Option<IdAllocator<'a>>,
    /// Running out of backend ids means the backend map is full.
    backend_ids: IdAllocator<'a>,
    /// Slots in use once the plan is written: service id -> slot count.
    slot_counts: HashMap<u32, u32>,
    /// Backends the planned maps still use, and backends already cleared.
    referenced: HashSet<u32>,
    cleared: HashSet<u32>,
    skipped: Vec<CapacityError>,
    put_backends: Vec<MapOp>,
    /// Frontends offering fewer slots to new flows: shrunk before those slots change.
    shrink_frontends: Vec<MapOp>,
    put_slots: Vec<MapOp>,
    put_frontends: Vec<MapOp>,
    /// Backends that stop taking new flows: written once no slot offers them.
    demote_backends: Vec<MapOp>,
    del_frontends: Vec<MapOp>,
    del_slots: Vec<MapOp>,
    clear_backends: Vec<MapOp>,
    /// Traffic counters of ids new frontends take (before the frontends, in a run of their
    /// own so that each kind of write goes to the maps in one batch).
    clear_traffic: Vec<MapOp>,
    /// Maglev tables: written after the backends and slots they name, before the frontends
    /// that use them; deleted once no frontend uses them.
    put_tables: Vec<MapOp>,
    del_tables: Vec<MapOp>,
    /// Service ids whose table the planned maps keep or get.
    tables_kept: HashSet<u32>,
    tables_dropped: HashSet<u32>,
    forget_affinity: Vec<MapOp>,
    /// Client ranges: added before the frontends that check them, removed after.
    put_ranges: Vec<MapOp>,
    del_ranges: Vec<MapOp>,
    crowded_tables: Vec<(desired::Frontend, usize)>,
}

impl<'a> Planner<'a> {
    fn new(actual: &'a ActualDataplane, capacity: Capacity, algorithm: Algorithm) -> Self {
        Self {
            actual,
            algorithm,
            frontend_room: capacity.frontends.saturating_sub(actual.frontends.len()),
            slot_room: capacity.slots.saturating_sub(actual.slots.len()),
            service_ids: None,
            backend_ids: IdAllocator::new(
                |id| actual.backends.contains_key(&id),
                actual.backends.last_key_value().map(|(id, _)| *id),
                0,
                capacity.backends,
            ),
            slot_counts: HashMap::new(),
            referenced: HashSet::new(),
            cleared: HashSet::new(),
            skipped: Vec::new(),
            put_backends: Vec::new(),
            shrink_frontends: Vec::new(),
            put_slots: Vec::new(),
            put_frontends: Vec::new(),
            demote_backends: Vec::new(),
            del_frontends: Vec::new(),
            del_slots: Vec::new(),
            clear_backends: Vec::new(),
            clear_traffic: Vec::new(),
            put_tables: Vec::new(),
            del_tables: Vec::new(),
            tables_kept: HashSet::new(),
            tables_dropped: HashSet::new(),
            forget_affinity: Vec::new(),
            put_ranges: Vec::new(),
            del_ranges: Vec::new(),
            crowded_tables: Vec::new(),
        }
    }

    /// Backend ids in a frontend's slots (its backends, as far as the maps say).
    fn slot_backends(&self, service_id: u32, count: u32) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..count)
            .filter_map(|slot| {
                self.actual
                    .slots
                    .get(&SlotKey { service_id, slot })
                    .copied()
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn new_service_id(&mut self) -> Option<u32> {
        let actual = self.actual;
        self.service_ids
            .get_or_insert_with(|| {
                // Only a new frontend needs this scan.
                let used: HashSet<u32> = actual.frontends.values().map(|f| f.service_id).collect();
                let highest = used.iter().max().copied();
                // Ids index the traffic counters: 1..=MAX_SERVICE_ID.
                IdAllocator::new(move |id| used.contains(&id), highest, 1, MAX_SERVICE_ID + 1)
            })
            .take()
    }

    fn clear(&mut self, id: u32) {
        if self.cleared.insert(id) {
            self.clear_backends.push(MapOp::ClearBackend(id));
        }
    }

    /// Programs these frontends, existing ones first: a full map must not stop them from
    /// following their endpoints.
    fn place<'d>(&mut self, wanted: impl Iterator<Item = (&'d desired::Frontend, &'d Backends)>) {
        let mut order: Vec<_> = wanted.collect();
        order.sort_by_key(|(f, _)| !self.actual.frontends.contains_key(&frontend_key(f)));
        for (f, backends) in order {
            self.place_one(f, backends);
        }
    }

    fn place_one(&mut self, f: &desired::Frontend, backends: &Backends) {
        let key = frontend_key(f);
        let old = self.actual.frontends.get(&key);
        let old_count = old.map_or(0, slot_count);
        let old_ids = old.map_or(Vec::new(), |o| self.slot_backends(o.service_id, old_count));
        let skip = |planner: &mut Self, error: CapacityError| {
            planner.referenced.extend(&old_ids);
            if let Some(o) = old {
                planner.slot_counts.insert(o.service_id, old_count);
                planner.tables_kept.insert(o.service_id);
            }
            planner.skipped.push(error);
        };
        let service_id = match old {
            Some(fe) => fe.service_id,
            None => match (self.frontend_room > 0)
                .then(|| self.new_service_id())
                .flatten()
            {
                Some(id) => id,
                None => return skip(self, CapacityError::Frontends { frontend: *f }),
            },
        };
        let wanted: Vec<Backend> = (backends.serving.iter().map(|a| (a, BACKEND_ACTIVE)))
            .chain(backends.draining.iter().map(|a| (a, BACKEND_DRAINING)))
            .map(|(addr, state)| backend(*addr, service_id, state))
            .collect();
        let new_slots = wanted.len().saturating_sub(old_count as usize);
        if new_slots > self.slot_room {
            return skip(self, CapacityError::Slots { frontend: *f });
        }
        let existing: HashMap<(lb_common::Addr, u16), (u32, &Backend)> = old_ids
            .iter()
            .filter_map(|id| {
                let b = self.actual.backends.get(id)?;
                (b.service_id == service_id).then_some(((b.addr, b.port), (*id, b)))
            })
            .collect();
        let mut ids = Vec::with_capacity(wanted.len());
        let (mut new_backends, mut demoted) = (Vec::new(), Vec::new());
        for b in &wanted {
            match existing.get(&(b.addr, b.port)) {
                Some((id, old)) if old.state == b.state => ids.push(*id),
                Some((id, old)) => {
                    // Promoted before the slots offer it; demoted after they stop.
                    if old.state == BACKEND_ACTIVE {
                        demoted.push(MapOp::PutBackend(*id, *b));
                    } else {
                        new_backends.push(MapOp::PutBackend(*id, *b));
                    }
                    ids.push(*id);
                }
                None => match self.backend_ids.take() {
                    Some(id) => {
                        new_backends.push(MapOp::PutBackend(id, *b));
                        ids.push(id);
                    }
                    None => break,
                },
            }
        }
        if ids.len() < wanted.len() {
            return skip(self, CapacityError::Backends { frontend: *f });
        }
        // This frontend fits: commit its operations.
        if old.is_none() {
            self.frontend_room -= 1;
        }
        self.slot_room -= new_slots;
        self.put_backends.extend(new_backends);
        self.demote_backends.extend(demoted);
        let slots_before = self.put_slots.len();
        for (slot, id) in ids.iter().enumerate() {
            let slot_key = SlotKey {
                service_id,
                slot: slot as u32,
            };
            if self.actual.slots.get(&slot_key) != Some(id) {
                self.put_slots.push(MapOp::PutSlot(slot_key, *id));
            }
        }
        let count = ids.len() as u32;
        let mut wanted = Frontend {
            service_id,
            backend_count: backends.serving.len() as u32,
            draining_count: backends.draining.len() as u32,
            ..Frontend::default()
        };
        if let Some(timeout_s) = backends.affinity_timeout_s {
            wanted.flags |= FRONTEND_AFFINITY;
            wanted.affinity_timeout_s = timeout_s;
        }
        if let Algorithm::Maglev { table_size } = self.algorithm
            && !backends.serving.is_empty()
        {
            wanted.flags |= FRONTEND_MAGLEV;
            wanted.maglev_table_size = table_size;
            let serving: Vec<(u32, SocketAddrV4)> = ids
                .iter()
                .copied()
                .zip(backends.serving.iter().copied())
                .collect();
            self.plan_table(f, service_id, table_size, &serving);
        } else {
            self.drop_table(service_id);
        }
        if !backends.source_ranges.is_empty() {
            wanted.flags |= FRONTEND_SOURCE_RANGES;
        }
        self.plan_ranges(service_id, &backends.source_ranges);
        if let Some(o) = old
            && o.flags & FRONTEND_AFFINITY != 0
            && wanted.flags & FRONTEND_AFFINITY == 0
        {
            self.forget_affinity.push(MapOp::ForgetAffinity(service_id));
        }
        if let Some(o) = old
            && wanted.backend_count < o.backend_count
            && self.put_slots.len() > slots_before
        {
            // Slots past the new count may now get draining backends: first stop offering
            // them to new flows (as draining slots they hold the old backends meanwhile).
            // Only the counts change: it keeps its old selection (table, affinity) meanwhile.
            let shrunk = Frontend {
                backend_count: wanted.backend_count,
                draining_count: slot_count(o) - wanted.backend_count,
                ..*o
            };
            self.shrink_frontends.push(MapOp::PutFrontend(key, shrunk));
        }
        if old.is_none() {
            self.clear_traffic.push(MapOp::ClearTraffic(service_id));
        }
        if old != Some(&wanted) {
            self.put_frontends.push(MapOp::PutFrontend(key, wanted));
        }
        for slot in count..old_count {
            self.del_slots
                .push(MapOp::DeleteSlot(SlotKey { service_id, slot }));
        }
        self.slot_counts.insert(service_id, count);
        self.referenced.extend(&ids);
        for id in old_ids {
            if !ids.contains(&id) {
                self.clear(id);
            }
        }
    }

    /// A Maglev table for the service id unless the maps have this one already.
    fn plan_table(
        &mut self,
        f: &desired::Frontend,
        service_id: u32,
        table_size: u32,
        serving: &[(u32, SocketAddrV4)],
    ) {
        self.tables_kept.insert(service_id);
        let digest = MaglevTable::digest(table_size, serving);
        if self.actual.maglev.get(&service_id) == Some(&digest) {
            return;
        }
        if (serving.len() as u64) * maglev::ENTRIES_PER_ENDPOINT as u64 > table_size as u64 {
            self.crowded_tables.push((*f, serving.len()));
        }
        let table = MaglevTable::build(table_size, serving, digest);
        self.put_tables.push(MapOp::PutMaglev(service_id, table));
    }

    /// Makes the service id's client ranges `wanted`.
    fn plan_ranges(&mut self, service_id: u32, wanted: &[Ipv4Net]) {
        let old = self.actual.source_ranges.get(&service_id);
        for range in wanted {
            if !old.is_some_and(|o| o.contains(range)) {
                self.put_ranges
                    .push(MapOp::PutSourceRange(service_id, *range));
            }
        }
        for range in old.into_iter().flatten() {
            if !wanted.contains(range) {
                self.del_ranges
                    .push(MapOp::DeleteSourceRange(service_id, *range));
            }
        }
    }

    /// Deletes the client ranges of service ids no planned frontend has.
    fn delete_orphan_ranges(&mut self) {
        let mut orphans: Vec<u32> = self
            .actual
            .source_ranges
            .keys()
            .filter(|id| !self.slot_counts.contains_key(id))
            .copied()
            .collect();
        orphans.sort_unstable();
        for id in orphans {
            self.plan_ranges(id, &[]);
        }
    }

    /// Deletes the service id's table, if it has one (once the frontend no longer uses it).
    fn drop_table(&mut self, service_id: u32) {
        if self.actual.maglev.contains_key(&service_id) && self.tables_dropped.insert(service_id) {
            self.del_tables.push(MapOp::DeleteMaglev(service_id));
        }
    }

    /// Deletes every table no planned frontend uses.
    fn delete_orphan_tables(&mut self) {
        let mut orphans: Vec<u32> = self
            .actual
            .maglev
            .keys()
            .filter(|id| !self.tables_kept.contains(id))
            .copied()
            .collect();
        orphans.sort_unstable();
        for id in orphans {
            self.drop_table(id);
        }
    }

    fn remove<'k>(&mut self, removed: impl IntoIterator<Item = (&'k FrontendKey, &'k Frontend)>) {
        for (key, fe) in removed {
            self.del_frontends.push(MapOp::DeleteFrontend(*key));
            if fe.flags & FRONTEND_AFFINITY != 0 {
                self.forget_affinity
                    .push(MapOp::ForgetAffinity(fe.service_id));
            }
            self.drop_table(fe.service_id);
            self.plan_ranges(fe.service_id, &[]);
            for slot in 0..slot_count(fe) {
                self.del_slots.push(MapOp::DeleteSlot(SlotKey {
                    service_id: fe.service_id,
                    slot,
                }));
            }
            for id in self.slot_backends(fe.service_id, slot_count(fe)) {
                self.clear(id);
            }
        }
    }

    /// Clears every backend that no frontend uses (left behind by a write that failed half
    /// way, or by another writer).
    fn clear_unreferenced(&mut self) {
        let unreferenced: Vec<u32> = self
            .actual
            .backends
            .keys()
            .filter(|id| !self.referenced.contains(id))
            .copied()
            .collect();
        for id in unreferenced {
            self.clear(id);
        }
    }

    /// Deletes every slot that no planned frontend uses: past a frontend's count, or of a
    /// service id no frontend has (left by a write that failed half way, or another writer).
    fn delete_orphan_slots(&mut self) {
        let planned: HashSet<SlotKey> = self
            .del_slots
            .iter()
            .filter_map(|op| match op {
                MapOp::DeleteSlot(k) => Some(*k),
                _ => None,
            })
            .collect();
        let mut orphans: Vec<SlotKey> = self
            .actual
            .slots
            .keys()
            .filter(|k| {
                self.slot_counts
                    .get(&k.service_id)
                    .is_none_or(|count| k.slot >= *count)
                    && !planned.contains(k)
            })
            .copied()
            .collect();
        orphans.sort();
        self.del_slots
            .extend(orphans.into_iter().map(MapOp::DeleteSlot));
    }

    fn finish(self) -> Plan {
        let parts = [
            self.put_backends,
            self.shrink_frontends,
            self.put_slots,
            self.put_tables,
            self.put_ranges,
            self.clear_traffic,
            self.put_frontends,
            self.demote_backends,
            self.del_frontends,
            self.forget_affinity,
            self.del_slots,
            self.del_tables,
            self.del_ranges,
            self.clear_backends,
        ];
        Plan {
            parts: parts.into_iter().filter(|p| !p.is_empty()).collect(),
            skipped: self.skipped,
            crowded_tables: self.crowded_tables,
        }
    }
}

/// The actual state after `ops` were written.
pub fn apply(actual: &mut ActualDataplane, ops: &[MapOp]) {
    for op in ops {
        match *op {
            MapOp::PutMaglev(id, ref table) => {
                actual.maglev.insert(id, table.digest);
            }
            MapOp::DeleteMaglev(id) => {
                actual.maglev.remove(&id);
            }
            MapOp::ForgetAffinity(_) => {}
            MapOp::PutSourceRange(id, range) => {
                actual.source_ranges.entry(id).or_default().insert(range);
            }
            MapOp::DeleteSourceRange(id, range) => {
                if let Some(ranges) = actual.source_ranges.get_mut(&id) {
                    ranges.remove(&range);
                    if ranges.is_empty() {
                        actual.source_ranges.remove(&id);
                    }
                }
            }
            MapOp::PutBackend(id, b) => {
                actual.backends.insert(id, b);
            }
            MapOp::PutSlot(k, id) => {
                actual.slots.insert(k, id);
            }
            MapOp::PutFrontend(k, f) => {
                actual.frontends.insert(k, f);
            }
            MapOp::DeleteFrontend(k) => {
                actual.frontends.remove(&k);
            }
            MapOp::DeleteSlot(k) => {
                actual.slots.remove(&k);
            }
            MapOp::ClearBackend(id) => {
                actual.backends.remove(&id);
            }
            MapOp::ClearTraffic(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{desired::Frontend as Fe, model::Protocol};

    fn fe(last: u8, port: u16) -> Fe {
        Fe::cluster(
            std::net::Ipv4Addr::new(198, 19, 0, last),
            port,
            Protocol::Tcp,
        )
    }

    fn backends(n: u8) -> Vec<SocketAddrV4> {
        (1..=n)
            .map(|i| SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 1, i), 8080))
            .collect()
    }

    fn desired(entries: &[(Fe, Vec<SocketAddrV4>)]) -> DesiredDataplane {
        DesiredDataplane {
            frontends: entries
                .iter()
                .map(|(f, b)| (*f, Backends::serving(b.clone())))
                .collect(),
            ..DesiredDataplane::default()
        }
    }

    /// Every slot of every frontend points at a backend of the same service: active for the
    /// slots that take new flows, in use for the draining ones.
    fn consistent(a: &ActualDataplane) -> bool {
        a.frontends.values().all(|f| {
            (0..slot_count(f)).all(|slot| {
                a.slots
                    .get(&SlotKey {
                        service_id: f.service_id,
                        slot,
                    })
                    .and_then(|id| a.backends.get(id))
                    .is_some_and(|b| {
                        b.service_id == f.service_id
                            && (b.state == BACKEND_ACTIVE || slot >= f.backend_count)
                    })
            })
        })
    }

    /// Applies ops one at a time, checking the state is consistent after every single write.
    fn apply_checked(actual: &mut ActualDataplane, ops: &[MapOp]) {
        for op in ops {
            apply(actual, std::slice::from_ref(op));
            assert!(consistent(actual), "inconsistent after {op:?}: {actual:?}");
        }
    }

    #[test]
    fn empty_to_full_and_back_stays_consistent_at_every_step() {
        let mut actual = ActualDataplane::default();
        let d = desired(&[(fe(1, 80), backends(3)), (fe(2, 53), vec![])]);
        let ops = diff(&d, &actual).ops();
        apply_checked(&mut actual, &ops);
        assert_eq!(actual.frontends.len(), 2);
        assert_eq!(actual.backends.len(), 3);
        assert!(diff(&d, &actual).ops().is_empty(), "converged");

        let ops = diff(&DesiredDataplane::default(), &actual).ops();
        apply_checked(&mut actual, &ops);
        assert_eq!(actual, ActualDataplane::default());
    }

    fn with_maglev(mut d: DesiredDataplane) -> DesiredDataplane {
        d.algorithm = Algorithm::Maglev { table_size: 251 };
        d
    }

    /// The backend ids a planned table names.
    fn table_ids(ops: &[MapOp]) -> BTreeSet<u32> {
        ops.iter()
            .find_map(|o| match o {
                MapOp::PutMaglev(_, t) => Some(t.backend_ids.iter().copied().collect()),
                _ => None,
            })
            .expect("a table")
    }

    #[test]
    fn maglev_tables_follow_the_serving_backends_and_are_written_before_their_frontend() {
        let mut actual = ActualDataplane::default();
        let d = with_maglev(desired(&[(fe(1, 80), backends(3))]));
        let ops = diff(&d, &actual).ops();
        let at = |kind: fn(&MapOp) -> bool| ops.iter().position(kind).unwrap();
        let table = at(|o| matches!(o, MapOp::PutMaglev(..)));
        assert!(at(|o| matches!(o, MapOp::PutSlot(..))) < table);
        assert!(at(|o| matches!(o, MapOp::PutBackend(..))) < table);
        assert!(table < at(|o| matches!(o, MapOp::PutFrontend(..))));
        apply_checked(&mut actual, &ops);
        let ids: BTreeSet<u32> = actual.backends.keys().copied().collect();
        assert_eq!(
            table_ids(&ops),
            ids,
            "every backend has entries, no other id does"
        );
        let f = actual.frontends[&frontend_key(&fe(1, 80))];
        assert_eq!(f.flags, FRONTEND_MAGLEV);
        assert_eq!(f.maglev_table_size, 251);
        assert!(
            diff(&d, &actual).ops().is_empty(),
            "an unchanged table is not rewritten"
        );

        // One backend goes: a new table without it.
        let d = with_maglev(desired(&[(fe(1, 80), backends(2))]));
        let ops = diff(&d, &actual).ops();
        apply_checked(&mut actual, &ops);
        let ids: BTreeSet<u32> = actual.backends.keys().copied().collect();
        assert_eq!(table_ids(&ops), ids);

        // Back to random: the table goes once the frontend no longer uses it.
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).ops();
        let put = ops.iter().position(|o| matches!(o, MapOp::PutFrontend(..)));
        let del = ops.iter().position(|o| matches!(o, MapOp::DeleteMaglev(_)));
        assert!(put.unwrap() < del.unwrap(), "{ops:?}");
        apply_checked(&mut actual, &ops);
        assert!(actual.maglev.is_empty());

        // A table nobody uses (left by another agent) goes at a full resync.
        actual.maglev.insert(999, UNKNOWN_TABLE);
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).ops();
        assert_eq!(ops, vec![MapOp::DeleteMaglev(999)]);
    }

    #[test]
    fn a_table_read_back_from_the_maps_is_built_again() {
        let mut actual = ActualDataplane::default();
        let d = with_maglev(desired(&[(fe(1, 80), backends(3))]));
        let ops = diff(&d, &actual).ops();
        apply_checked(&mut actual, &ops);
        for digest in actual.maglev.values_mut() {
            *digest = UNKNOWN_TABLE;
        }
        let ops = diff(&d, &actual).ops();
        assert!(matches!(ops[..], [MapOp::PutMaglev(..)]), "{ops:?}");
    }

    #[test]
    fn affinity_entries_are_forgotten_when_affinity_or_the_frontend_goes() {
        let mut actual = ActualDataplane::default();
        let sticky = |n| {
            let mut d = desired(&[(fe(1, 80), backends(n))]);
            for b in d.frontends.values_mut() {
                b.affinity_timeout_s = Some(60);
            }
            d
        };
        let ops = diff(&sticky(2), &actual).ops();
        apply_checked(&mut actual, &ops);
        let f = actual.frontends[&frontend_key(&fe(1, 80))];
        assert_eq!((f.flags, f.affinity_timeout_s), (FRONTEND_AFFINITY, 60));
        let forgets = |ops: &[MapOp]| {
            ops.iter()
                .filter(|o| matches!(o, MapOp::ForgetAffinity(_)))
                .count()
        };
        // Endpoints change: clients keep their entries (a moved client is re-pinned).
        assert_eq!(forgets(&diff(&sticky(3), &actual).ops()), 0);
        // Affinity off: forgotten after the frontend stops reading them.
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).ops();
        assert_eq!(ops.last(), Some(&MapOp::ForgetAffinity(f.service_id)));
        // The frontend goes: the same.
        let ops = diff(&DesiredDataplane::default(), &actual).ops();
        assert_eq!(forgets(&ops), 1);
        let del = ops
            .iter()
            .position(|o| matches!(o, MapOp::DeleteFrontend(_)));
        let forget = ops
            .iter()
            .position(|o| matches!(o, MapOp::ForgetAffinity(_)));
        assert!(del < forget);
    }

    #[test]
    fn source_ranges_are_in_place_before_the_frontend_checks_them_and_go_after() {
        let mut actual = ActualDataplane::default();
        let ranged = |ranges: &[&str]| {
            let mut d = desired(&[(fe(1, 80), backends(2))]);
            for b in d.frontends.values_mut() {
                b.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
            }
            d
        };
        let position = |ops: &[MapOp], what: fn(&MapOp) -> bool| ops.iter().position(what);
        let ops = diff(&ranged(&["198.18.254.0/24", "203.0.113.0/24"]), &actual).ops();
        let put = position(&ops, |o| matches!(o, MapOp::PutSourceRange(..)));
        let frontend = position(&ops, |o| matches!(o, MapOp::PutFrontend(..)));
        assert!(put < frontend, "{ops:?}");
        apply_checked(&mut actual, &ops);
        let f = actual.frontends[&frontend_key(&fe(1, 80))];
        assert_eq!(f.flags, FRONTEND_SOURCE_RANGES);
        assert_eq!(actual.source_ranges[&f.service_id].len(), 2);
        // One range goes, one comes: only those two writes.
        let ops = diff(&ranged(&["198.18.254.0/24", "198.51.100.0/24"]), &actual).ops();
        assert_eq!(ops.len(), 2, "{ops:?}");
        apply_checked(&mut actual, &ops);
        // No ranges: the frontend stops checking, then the ranges go.
        let ops = diff(&ranged(&[]), &actual).ops();
        let frontend = position(&ops, |o| matches!(o, MapOp::PutFrontend(..)));
        let deleted = position(&ops, |o| matches!(o, MapOp::DeleteSourceRange(..)));
        assert!(frontend < deleted, "{ops:?}");
        apply_checked(&mut actual, &ops);
        assert!(actual.source_ranges.is_empty());
        // The frontend goes with its ranges.
        let ops = diff(&ranged(&["10.0.0.0/8"]), &actual).ops();
        apply_checked(&mut actual, &ops);
        let ops = diff(&DesiredDataplane::default(), &actual).ops();
        apply_checked(&mut actual, &ops);
        assert!(actual.source_ranges.is_empty());
    }

    #[test]
    fn ids_are_kept_for_surviving_frontends_and_backends() {
        let mut actual = ActualDataplane::default();
        let ops = diff(&desired(&[(fe(1, 80), backends(3))]), &actual).ops();
        apply(&mut actual, &ops);
        let sid = actual.frontends[&frontend_key(&fe(1, 80))].service_id;
        let ids_before: BTreeMap<u32, Backend> = actual.backends.clone();

        // Remove backend 2, add backend 4.
        let mut b = backends(4);
        b.remove(1);
        let ops = diff(&desired(&[(fe(1, 80), b)]), &actual).ops();
        apply_checked(&mut actual, &ops);
        assert_eq!(actual.frontends[&frontend_key(&fe(1, 80))].service_id, sid);
        for (id, old) in &ids_before {
            if old.addr[3] != 2 {
                assert_eq!(
                    actual.backends.get(id),
                    Some(old),
                    "surviving backend keeps its id"
                );
            }
        }
        assert_eq!(actual.backends.len(), 3);
        assert!(actual.backends.values().all(|b| b.addr[3] != 2));
    }

    #[test]
    fn shrink_updates_count_before_deleting_slots() {
        let mut actual = ActualDataplane::default();
        let ops = diff(&desired(&[(fe(1, 80), backends(5))]), &actual).ops();
        apply(&mut actual, &ops);
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).ops();
        let frontend_at = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutFrontend(..)))
            .unwrap();
        let first_delete = ops
            .iter()
            .position(|o| matches!(o, MapOp::DeleteSlot(..)))
            .unwrap();
        assert!(frontend_at < first_delete);
        apply_checked(&mut actual, &ops);
        assert_eq!(actual.slots.len(), 2);
    }

    #[test]
    fn a_new_frontend_starts_its_traffic_counters_at_zero() {
        let mut actual = ActualDataplane::default();
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).ops();
        let put = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutFrontend(..)))
            .unwrap();
        let MapOp::PutFrontend(_, f) = ops[put] else {
            unreachable!()
        };
        assert!(
            ops[..put].contains(&MapOp::ClearTraffic(f.service_id)),
            "{ops:?}"
        );
        apply(&mut actual, &ops);
        // A frontend that stays keeps its counters.
        let ops = diff(&desired(&[(fe(1, 80), backends(3))]), &actual).ops();
        assert!(
            !ops.iter().any(|o| matches!(o, MapOp::ClearTraffic(..))),
            "{ops:?}"
        );
    }

    #[test]
    fn service_ids_stay_within_the_traffic_counters() {
        let mut actual = ActualDataplane::default();
        actual.frontends.insert(
            frontend_key(&fe(9, 80)),
            Frontend {
                service_id: MAX_SERVICE_ID,
                ..Default::default()
            },
        );
        let wanted = desired(&[(fe(9, 80), backends(0)), (fe(1, 80), backends(1))]);
        let ops = diff(&wanted, &actual).ops();
        let ids: Vec<u32> = ops
            .iter()
            .filter_map(|o| match o {
                MapOp::PutFrontend(_, f) => Some(f.service_id),
                _ => None,
            })
            .collect();
        assert!(ids.contains(&1), "wraps to the first id: {ids:?}");
    }

    #[test]
    fn new_frontend_never_reuses_an_id_being_removed() {
        let mut actual = ActualDataplane::default();
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).ops();
        apply(&mut actual, &ops);
        let old_sid = actual.frontends.values().next().unwrap().service_id;
        let ops = diff(&desired(&[(fe(2, 80), backends(2))]), &actual).ops();
        apply_checked(&mut actual, &ops);
        assert_ne!(
            actual.frontends.values().next().unwrap().service_id,
            old_sid
        );
        assert_eq!(actual.backends.len(), 2);
        assert_eq!(actual.slots.len(), 2);
    }

    fn fe_n(i: u32) -> Fe {
        Fe::cluster(std::net::Ipv4Addr::from(0xc613_0000 + i), 80, Protocol::Tcp)
    }

    #[test]
    fn full_frontend_map_skips_new_frontends_and_keeps_the_rest_working() {
        let small = Capacity {
            frontends: 3,
            slots: 100,
            backends: 100,
        };
        let mut actual = ActualDataplane::default();
        let two = desired(&[(fe_n(1), backends(1)), (fe_n(2), backends(1))]);
        let ops = diff_with_capacity(&two, &actual, small).ops();
        apply_checked(&mut actual, &ops);
        // Two more wanted, one fits; the existing ones still follow their endpoints.
        let four = desired(&[
            (fe_n(1), backends(2)),
            (fe_n(2), backends(1)),
            (fe_n(3), backends(1)),
            (fe_n(4), backends(1)),
        ]);
        let plan = diff_with_capacity(&four, &actual, small);
        assert_eq!(
            plan.skipped,
            vec![CapacityError::Frontends { frontend: fe_n(4) }]
        );
        assert!(plan.skipped[0].to_string().contains("frontend map is full"));
        apply_checked(&mut actual, &plan.ops());
        assert_eq!(actual.frontends.len(), 3);
        assert_eq!(actual.frontends[&frontend_key(&fe_n(1))].backend_count, 2);
    }

    #[test]
    fn full_backend_map_leaves_that_frontend_as_it_was() {
        let small = Capacity {
            frontends: 10,
            slots: 100,
            backends: 4,
        };
        let mut actual = ActualDataplane::default();
        let start = desired(&[(fe(1, 80), backends(2)), (fe(2, 80), backends(2))]);
        let ops = diff_with_capacity(&start, &actual, small).ops();
        apply_checked(&mut actual, &ops);
        let before = actual.frontends[&frontend_key(&fe(2, 80))];
        // fe(2) wants 3 new backends: no room. fe(1) loses one: still done.
        let next = desired(&[(fe(1, 80), backends(1)), (fe(2, 80), backends(5))]);
        let plan = diff_with_capacity(&next, &actual, small);
        assert_eq!(
            plan.skipped,
            vec![CapacityError::Backends {
                frontend: fe(2, 80)
            }]
        );
        apply_checked(&mut actual, &plan.ops());
        assert_eq!(actual.frontends[&frontend_key(&fe(2, 80))], before);
        assert_eq!(actual.frontends[&frontend_key(&fe(1, 80))].backend_count, 1);
        // Room appears later: the next sync programs it.
        let plan = diff_with_capacity(
            &next,
            &actual,
            Capacity {
                backends: 8,
                ..small
            },
        );
        assert!(plan.skipped.is_empty());
        apply_checked(&mut actual, &plan.ops());
        assert_eq!(actual.frontends[&frontend_key(&fe(2, 80))].backend_count, 5);
    }

    #[test]
    fn a_full_backend_map_skips_every_frontend_that_does_not_fit() {
        let small = Capacity {
            frontends: 10_000,
            slots: 100_000,
            backends: 20_000,
        };
        let wanted = DesiredDataplane {
            frontends: (0..4_000u32)
                .map(|i| {
                    let ip = std::net::Ipv4Addr::from(0xc613_0000 + i);
                    let f = Fe::cluster(ip, 80, Protocol::Tcp);
                    let b = (0..10u32)
                        .map(|k| {
                            SocketAddrV4::new(
                                std::net::Ipv4Addr::from(0xc612_0000 + i * 10 + k),
                                8080,
                            )
                        })
                        .collect();
                    (f, Backends::serving(b))
                })
                .collect(),
            ..DesiredDataplane::default()
        };
        let plan = diff_with_capacity(&wanted, &ActualDataplane::default(), small);
        assert_eq!(plan.skipped.len(), 2_000, "half fit");
    }

    #[test]
    fn full_slot_map_skips_growth_only() {
        let small = Capacity {
            frontends: 10,
            slots: 3,
            backends: 100,
        };
        let mut actual = ActualDataplane::default();
        let ops = diff_with_capacity(&desired(&[(fe(1, 80), backends(2))]), &actual, small).ops();
        apply_checked(&mut actual, &ops);
        let plan = diff_with_capacity(&desired(&[(fe(1, 80), backends(5))]), &actual, small);
        assert_eq!(
            plan.skipped,
            vec![CapacityError::Slots {
                frontend: fe(1, 80)
            }]
        );
        assert!(plan.ops().is_empty());
    }

    /// Planning only the frontends a change touched keeps the maps what a full plan makes
    /// them, consistent after every single write, over a random sequence of changes.
    #[test]
    fn touched_frontends_only_converge_like_a_full_plan() {
        let mut next = crate::test_random(0x2545_f491_4f6c_dd1du64);
        let mut want = DesiredDataplane::default();
        let mut actual = ActualDataplane::default();
        for step in 0..2000 {
            let mut touched = BTreeSet::new();
            for _ in 0..1 + next() % 3 {
                let f = fe(1 + (next() % 20) as u8, 80);
                touched.insert(f);
                if next().is_multiple_of(5) {
                    want.frontends.remove(&f);
                } else {
                    let addrs: BTreeSet<SocketAddrV4> = (0..next() % 6)
                        .map(|_| {
                            let host = std::net::Ipv4Addr::new(198, 18, 1, (next() % 8) as u8);
                            SocketAddrV4::new(host, 8080)
                        })
                        .collect();
                    // Some of them draining, moving between the two at random.
                    let (serving, draining) =
                        addrs.into_iter().partition(|_| !next().is_multiple_of(3));
                    want.frontends.insert(
                        f,
                        Backends {
                            serving,
                            draining,
                            ..Backends::default()
                        },
                    );
                }
            }
            let plan = diff_frontends(&want, &actual, &touched);
            assert!(plan.skipped.is_empty());
            apply_checked(&mut actual, &plan.ops());
            assert!(diff(&want, &actual).ops().is_empty(), "step {step}");
        }
    }

    #[test]
    fn full_plan_clears_backends_no_frontend_uses() {
        let mut actual = ActualDataplane::default();
        let d = desired(&[(fe(1, 80), backends(2))]);
        let ops = diff(&d, &actual).ops();
        apply_checked(&mut actual, &ops);
        // Left behind by a write that stopped half way.
        let orphan = backend(
            SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 9, 9), 1),
            77,
            BACKEND_ACTIVE,
        );
        actual.backends.insert(1000, orphan);
        let touched = BTreeSet::from([fe(1, 80)]);
        assert!(diff_frontends(&d, &actual, &touched).ops().is_empty());
        assert_eq!(diff(&d, &actual).ops(), vec![MapOp::ClearBackend(1000)]);
    }

    #[test]
    fn full_plan_deletes_orphan_slots() {
        let mut actual = ActualDataplane::default();
        let d = desired(&[(fe(1, 80), backends(2))]);
        let ops = diff(&d, &actual).ops();
        apply_checked(&mut actual, &ops);
        let service_id = actual.frontends.values().next().unwrap().service_id;
        // Left behind: a slot past the frontend's count, and one of an unknown service.
        let past = SlotKey {
            service_id,
            slot: 5,
        };
        let unknown = SlotKey {
            service_id: 999,
            slot: 0,
        };
        actual.slots.insert(past, 0);
        actual.slots.insert(unknown, 0);
        let ops = diff(&d, &actual).ops();
        assert_eq!(
            ops,
            vec![MapOp::DeleteSlot(past), MapOp::DeleteSlot(unknown)]
        );
        apply_checked(&mut actual, &ops);
        assert_eq!(actual.slots.len(), 2);
    }

    #[test]
    fn draining_backends_keep_their_ids_and_leave_the_new_flow_slots() {
        let mut actual = ActualDataplane::default();
        let all = backends(3);
        let d = desired(&[(fe(1, 80), all.clone())]);
        let ops = diff(&d, &actual).ops();
        apply_checked(&mut actual, &ops);
        let ids_before: BTreeMap<_, _> = actual
            .backends
            .iter()
            .map(|(id, b)| ((b.addr, b.port), *id))
            .collect();
        let mut d = d;
        d.frontends.insert(
            fe(1, 80),
            Backends {
                serving: vec![all[0], all[2]],
                draining: vec![all[1]],
                ..Backends::default()
            },
        );
        let ops = diff(&d, &actual).ops();
        // The draining backend changes state only after the slots stop offering it.
        let demote = ops
            .iter()
            .position(|op| matches!(op, MapOp::PutBackend(_, b) if b.state == BACKEND_DRAINING))
            .expect("demotion");
        let frontend = ops
            .iter()
            .position(|op| matches!(op, MapOp::PutFrontend(..)))
            .expect("frontend");
        assert!(demote > frontend, "{ops:?}");
        apply_checked(&mut actual, &ops);
        let f = actual.frontends.values().next().unwrap();
        assert_eq!((f.backend_count, f.draining_count), (2, 1));
        let ids_after: BTreeMap<_, _> = actual
            .backends
            .iter()
            .map(|(id, b)| ((b.addr, b.port), *id))
            .collect();
        assert_eq!(ids_before, ids_after, "no backend changes id");
        // Back to serving, then gone.
        let back = desired(&[(fe(1, 80), all.clone())]);
        let ops = diff(&back, &actual).ops();
        apply_checked(&mut actual, &ops);
        assert!(actual.backends.values().all(|b| b.state == BACKEND_ACTIVE));
        let gone = desired(&[(fe(1, 80), vec![all[0]])]);
        let ops = diff(&gone, &actual).ops();
        apply_checked(&mut actual, &ops);
        assert_eq!(actual.backends.len(), 1);
        assert_eq!(actual.slots.len(), 1);
    }
}
