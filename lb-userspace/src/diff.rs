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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("{wanted} frontends (service ports) wanted, the frontend map holds {MAX_FRONTENDS}")]
    Frontends { wanted: usize },
    #[error("{wanted} backends wanted, the backend map holds {MAX_BACKENDS}")]
    Backends { wanted: usize },
    #[error("{wanted} backend slots wanted, the slot map holds {MAX_SLOTS}")]
    Slots { wanted: usize },
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

pub fn diff(
    desired: &DesiredDataplane,
    actual: &ActualDataplane,
) -> Result<Vec<MapOp>, CapacityError> {
    let wanted_backends: usize = desired.frontends.values().map(Vec::len).sum();
    if desired.frontends.len() > MAX_FRONTENDS as usize {
        return Err(CapacityError::Frontends {
            wanted: desired.frontends.len(),
        });
    }
    if wanted_backends > MAX_SLOTS as usize {
        return Err(CapacityError::Slots {
            wanted: wanted_backends,
        });
    }
    // Backend ids come from the space not used by any backend present now (old and new
    // backends coexist until the old ones are cleared): running out of it is the capacity error.
    let mut by_service: HashMap<u32, Vec<(u32, Backend)>> = HashMap::new();
    for (id, b) in &actual.backends {
        by_service.entry(b.service_id).or_default().push((*id, *b));
    }
    let mut service_ids =
        IdAllocator::new(actual.frontends.values().map(|f| f.service_id), 1, u32::MAX);
    let mut backend_ids = IdAllocator::new(actual.backends.keys().copied(), 0, MAX_BACKENDS);

    let (mut put_backends, mut put_slots, mut put_frontends) = (Vec::new(), Vec::new(), Vec::new());
    let (mut del_frontends, mut del_slots, mut clear_backends) =
        (Vec::new(), Vec::new(), Vec::new());

    for (f, addrs) in &desired.frontends {
        let key = frontend_key(f);
        let old = actual.frontends.get(&key);
        let service_id = match old {
            Some(fe) => fe.service_id,
            None => service_ids.take().ok_or(CapacityError::Frontends {
                wanted: desired.frontends.len(),
            })?,
        };
        let existing: HashMap<(lb_common::Addr, u16), u32> = by_service
            .get(&service_id)
            .into_iter()
            .flatten()
            .map(|(id, b)| ((b.addr, b.port), *id))
            .collect();
        let mut ids = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let b = backend(*addr, service_id);
            let id = match existing.get(&(b.addr, b.port)) {
                Some(id) => *id,
                None => {
                    let id = backend_ids.take().ok_or(CapacityError::Backends {
                        wanted: wanted_backends,
                    })?;
                    put_backends.push(MapOp::PutBackend(id, b));
                    id
                }
            };
            ids.push(id);
        }
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
        let old_count = old.map_or(0, |o| o.backend_count);
        for slot in count..old_count {
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

    let mut ops = put_backends;
    ops.extend(put_slots);
    ops.extend(put_frontends);
    ops.extend(del_frontends);
    ops.extend(del_slots);
    ops.extend(clear_backends);
    Ok(ops)
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
        let ops = diff(&d, &actual).unwrap();
        apply_checked(&mut actual, &ops);
        assert_eq!(actual.frontends.len(), 2);
        assert_eq!(actual.backends.len(), 3);
        assert!(diff(&d, &actual).unwrap().is_empty(), "converged");

        let ops = diff(&DesiredDataplane::default(), &actual).unwrap();
        apply_checked(&mut actual, &ops);
        assert_eq!(actual, ActualDataplane::default());
    }

    #[test]
    fn ids_are_kept_for_surviving_frontends_and_backends() {
        let mut actual = ActualDataplane::default();
        let ops = diff(&desired(&[(fe(1, 80), backends(3))]), &actual).unwrap();
        apply(&mut actual, &ops);
        let sid = actual.frontends[&frontend_key(&fe(1, 80))].service_id;
        let ids_before: BTreeMap<u32, Backend> = actual.backends.clone();

        // Remove backend 2, add backend 4.
        let mut b = backends(4);
        b.remove(1);
        let ops = diff(&desired(&[(fe(1, 80), b)]), &actual).unwrap();
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
        let ops = diff(&desired(&[(fe(1, 80), backends(5))]), &actual).unwrap();
        apply(&mut actual, &ops);
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).unwrap();
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
        let ops = diff(&desired(&[(fe(1, 80), backends(2))]), &actual).unwrap();
        apply(&mut actual, &ops);
        let old_sid = actual.frontends.values().next().unwrap().service_id;
        let ops = diff(&desired(&[(fe(2, 80), backends(2))]), &actual).unwrap();
        apply_checked(&mut actual, &ops);
        assert_ne!(
            actual.frontends.values().next().unwrap().service_id,
            old_sid
        );
        assert_eq!(actual.backends.len(), 2);
        assert_eq!(actual.slots.len(), 2);
    }

    #[test]
    fn capacity_is_checked_before_writing() {
        let many: BTreeMap<Fe, Vec<SocketAddrV4>> = (0..=MAX_FRONTENDS)
            .map(|i| {
                (
                    Fe {
                        ip: std::net::Ipv4Addr::from(0xc6130000 + i),
                        port: 80,
                        protocol: Protocol::Tcp,
                    },
                    vec![],
                )
            })
            .collect();
        let err = diff(
            &DesiredDataplane { frontends: many },
            &ActualDataplane::default(),
        )
        .unwrap_err();
        assert!(matches!(err, CapacityError::Frontends { .. }));
    }
}
