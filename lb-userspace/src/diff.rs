//! (desired, actual) -> ordered map operations. Pure.
//!
//! Ids are chosen here: a frontend keeps its service id and a backend its backend id for as
//! long as they exist, so tracked flows stay valid. Write order never exposes half-built
//! state: backends first, then slot tables, then frontends; removals in reverse.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddrV4,
};

use lb_common::{
    BACKEND_ACTIVE, Backend, FAMILY_IPV4, Frontend, FrontendKey, MAX_BACKENDS, MAX_FRONTENDS,
    MAX_SLOTS, SCOPE_CLUSTER, SlotKey, ipv4_addr, net_port,
};

use crate::desired::{self, DesiredDataplane};

/// The content of the service maps, as read back or as last written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActualDataplane {
    pub frontends: HashMap<FrontendKey, Frontend>,
    pub slots: HashMap<SlotKey, u32>,
    /// Active backends only.
    pub backends: BTreeMap<u32, Backend>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutFrontend(FrontendKey, Frontend),
    DeleteFrontend(FrontendKey),
    DeleteSlot(SlotKey),
    ClearBackend(u32),
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

/// The operations to write, and the frontends left out for lack of room.
#[derive(Debug, Default)]
pub struct Plan {
    pub ops: Vec<MapOp>,
    pub skipped: Vec<CapacityError>,
}

pub fn frontend_key(f: &desired::Frontend) -> FrontendKey {
    FrontendKey {
        addr: f.ip.octets(),
        port: net_port(f.port),
        protocol: f.protocol.number(),
        scope: SCOPE_CLUSTER,
    }
}

fn backend(addr: SocketAddrV4, service_id: u32) -> Backend {
    Backend {
        addr: ipv4_addr(addr.ip().octets()),
        port: net_port(addr.port()),
        family: FAMILY_IPV4,
        state: BACKEND_ACTIVE,
        service_id,
    }
}

/// Hands out the lowest ids not in use, never one still present in the actual maps.
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>, first: u32, limit: u32) -> Self {
        Self {
            used: used.into_iter().collect(),
            next: first,
            limit,
        }
    }

    fn take(&mut self) -> Option<u32> {
        while self.next < self.limit {
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }
}

pub fn diff(desired: &DesiredDataplane, actual: &ActualDataplane) -> Plan {
    diff_with_capacity(desired, actual, Capacity::MAPS)
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

pub fn diff_with_capacity(
    desired: &DesiredDataplane,
    actual: &ActualDataplane,
    capacity: Capacity,
) -> Plan {
    let mut by_service: HashMap<u32, Vec<(u32, Backend)>> = HashMap::new();
    for (id, b) in &actual.backends {
        by_service.entry(b.service_id).or_default().push((*id, *b));
    }
    // Removals are written last, so the maps must hold old and new entries at once: every
    // budget counts from what is there now. Backend ids come from the ids no present backend
    // uses; running out of them means the backend map is full.
    let mut frontend_room = capacity.frontends.saturating_sub(actual.frontends.len());
    let mut slot_room = capacity.slots.saturating_sub(actual.slots.len());
    let mut service_ids =
        IdAllocator::new(actual.frontends.values().map(|f| f.service_id), 1, u32::MAX);
    let mut backend_ids = IdAllocator::new(actual.backends.keys().copied(), 0, capacity.backends);

    let mut plan = Plan::default();
    let (mut put_backends, mut put_slots, mut put_frontends) = (Vec::new(), Vec::new(), Vec::new());
    let (mut del_frontends, mut del_slots, mut clear_backends) =
        (Vec::new(), Vec::new(), Vec::new());

    // Frontends that exist first: a full map must not stop them from following their endpoints.
    let mut order: Vec<(&desired::Frontend, &Vec<SocketAddrV4>)> =
        desired.frontends.iter().collect();
    order.sort_by_key(|(f, _)| !actual.frontends.contains_key(&frontend_key(f)));

    for (f, addrs) in order {
        let key = frontend_key(f);
        let old = actual.frontends.get(&key);
        let service_id = match old {
            Some(fe) => fe.service_id,
            None if frontend_room > 0 => match service_ids.take() {
                Some(id) => id,
                None => {
                    plan.skipped.push(CapacityError::Frontends { frontend: *f });
                    continue;
                }
            },
            None => {
                plan.skipped.push(CapacityError::Frontends { frontend: *f });
                continue;
            }
        };
        let old_count = old.map_or(0, |o| o.backend_count) as usize;
        let new_slots = addrs.len().saturating_sub(old_count);
        if new_slots > slot_room {
            plan.skipped.push(CapacityError::Slots { frontend: *f });
            continue;
        }
        let existing: HashMap<(lb_common::Addr, u16), u32> = by_service
            .get(&service_id)
            .into_iter()
            .flatten()
            .map(|(id, b)| ((b.addr, b.port), *id))
            .collect();
        let mut ids = Vec::with_capacity(addrs.len());
        let mut new_backends = Vec::new();
        for addr in addrs {
            let b = backend(*addr, service_id);
            match existing.get(&(b.addr, b.port)) {
                Some(id) => ids.push(*id),
                None => match backend_ids.take() {
                    Some(id) => {
                        new_backends.push(MapOp::PutBackend(id, b));
                        ids.push(id);
                    }
                    None => break,
                },
            }
        }
        if ids.len() < addrs.len() {
            plan.skipped.push(CapacityError::Backends { frontend: *f });
            continue;
        }
        // This frontend fits: commit its operations.
        if old.is_none() {
            frontend_room -= 1;
        }
        slot_room -= new_slots;
        put_backends.extend(new_backends);
        for (slot, id) in ids.iter().enumerate() {
            let slot_key = SlotKey {
                service_id,
                slot: slot as u32,
            };
            if actual.slots.get(&slot_key) != Some(id) {
                put_slots.push(MapOp::PutSlot(slot_key, *id));
            }
        }
        let count = ids.len() as u32;
        let wanted = Frontend {
            service_id,
            backend_count: count,
            flags: 0,
            _pad: 0,
        };
        if old != Some(&wanted) {
            put_frontends.push(MapOp::PutFrontend(key, wanted));
        }
        for slot in count..old_count as u32 {
            del_slots.push(MapOp::DeleteSlot(SlotKey { service_id, slot }));
        }
        let kept: BTreeSet<u32> = ids.into_iter().collect();
        for (id, _) in by_service.get(&service_id).into_iter().flatten() {
            if !kept.contains(id) {
                clear_backends.push(MapOp::ClearBackend(*id));
            }
        }
    }

    let wanted_keys: HashSet<FrontendKey> = desired.frontends.keys().map(frontend_key).collect();
    let mut removed: Vec<(&FrontendKey, &Frontend)> = actual
        .frontends
        .iter()
        .filter(|(k, _)| !wanted_keys.contains(k))
        .collect();
    removed.sort_by_key(|(_, f)| f.service_id);
    for (key, fe) in removed {
        del_frontends.push(MapOp::DeleteFrontend(*key));
        for slot in 0..fe.backend_count {
            del_slots.push(MapOp::DeleteSlot(SlotKey {
                service_id: fe.service_id,
                slot,
            }));
        }
        for (id, _) in by_service.get(&fe.service_id).into_iter().flatten() {
            clear_backends.push(MapOp::ClearBackend(*id));
        }
    }

    plan.ops = put_backends;
    plan.ops.extend(put_slots);
    plan.ops.extend(put_frontends);
    plan.ops.extend(del_frontends);
    plan.ops.extend(del_slots);
    plan.ops.extend(clear_backends);
    plan
}

/// The actual state after `ops` were written.
pub fn apply(actual: &mut ActualDataplane, ops: &[MapOp]) {
    for op in ops {
        match *op {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{desired::Frontend as Fe, model::Protocol};

    fn fe(last: u8, port: u16) -> Fe {
        Fe {
            ip: std::net::Ipv4Addr::new(198, 19, 0, last),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn backends(n: u8) -> Vec<SocketAddrV4> {
        (1..=n)
            .map(|i| SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 1, i), 8080))
            .collect()
    }

    fn desired(entries: &[(Fe, Vec<SocketAddrV4>)]) -> DesiredDataplane {
        DesiredDataplane {
            frontends: entries.iter().cloned().collect(),
        }
    }

    /// Every slot of every frontend points at an active backend of the same service.
    fn consistent(a: &ActualDataplane) -> bool {
        a.frontends.values().all(|f| {
            (0..f.backend_count).all(|slot| {
                a.slots
                    .get(&SlotKey {
                        service_id: f.service_id,
                        slot,
                    })
                    .and_then(|id| a.backends.get(id))
                    .is_some_and(|b| b.service_id == f.service_id && b.state == BACKEND_ACTIVE)
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
        let ops = diff(&d, &actual).ops;
        apply_checked(&mut actual, &ops);
        assert_eq!(actual.frontends.len(), 2);
        assert_eq!(actual.backends.len(), 3);
        assert!(diff(&d, &actual).ops.is_empty(), "converged");

        let ops = diff(&DesiredDataplane::default(), &actual).ops;
        apply_checked(&mut actual, &ops);
        assert_eq!(actual, ActualDataplane::default());
    }

    #[test]
    fn ids_are_kept_for_surviving_frontends_and_backends() {
        let mut actual = ActualDataplane::default();
        let ops = diff(&desired(&[(fe(1, 80), backends(3))]), &actual).ops;
        apply(&mut actual, &ops);
        let sid = actual.frontends[&frontend_key(&fe(1, 80))].service_id;
        let ids_before: BTreeMap<u32, Backend> = actual.backends.clone();

        // Remove backend 2, add backend 4.
        let mut b = backends(4);
        b.remove(1);
        let ops = diff(&desired(&[(fe(1, 80), b)]), &actual).ops;
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
        let ops = diff(&desired(&[(fe(1, 80), backends(5))]), &actual).ops;
        apply(&mut actual, &ops);
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).ops;
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
    fn new_frontend_never_reuses_an_id_being_removed() {
        let mut actual = ActualDataplane::default();
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).ops;
        apply(&mut actual, &ops);
        let old_sid = actual.frontends.values().next().unwrap().service_id;
        let ops = diff(&desired(&[(fe(2, 80), backends(2))]), &actual).ops;
        apply_checked(&mut actual, &ops);
        assert_ne!(
            actual.frontends.values().next().unwrap().service_id,
            old_sid
        );
        assert_eq!(actual.backends.len(), 2);
        assert_eq!(actual.slots.len(), 2);
    }

    fn fe_n(i: u32) -> Fe {
        Fe {
            ip: std::net::Ipv4Addr::from(0xc613_0000 + i),
            port: 80,
            protocol: Protocol::Tcp,
        }
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
        let ops = diff_with_capacity(&two, &actual, small).ops;
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
        apply_checked(&mut actual, &plan.ops);
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
        let ops = diff_with_capacity(&start, &actual, small).ops;
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
        apply_checked(&mut actual, &plan.ops);
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
        apply_checked(&mut actual, &plan.ops);
        assert_eq!(actual.frontends[&frontend_key(&fe(2, 80))].backend_count, 5);
    }

    #[test]
    fn full_slot_map_skips_growth_only() {
        let small = Capacity {
            frontends: 10,
            slots: 3,
            backends: 100,
        };
        let mut actual = ActualDataplane::default();
        let ops = diff_with_capacity(&desired(&[(fe(1, 80), backends(2))]), &actual, small).ops;
        apply_checked(&mut actual, &ops);
        let plan = diff_with_capacity(&desired(&[(fe(1, 80), backends(5))]), &actual, small);
        assert_eq!(
            plan.skipped,
            vec![CapacityError::Slots {
                frontend: fe(1, 80)
            }]
        );
        assert!(plan.ops.is_empty());
    }
}
