//! Stages 2-4, shared by every entry point: conntrack, service lookup, backend selection.
//! They only read and update maps; rewriting the packet is the entry point's job.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    BACKEND_ACTIVE, Backend, CT_FORWARD, CT_REPLY, CtEntry, CtKey, FrontendKey, SCOPE_CLUSTER,
    SlotKey, stats::Counter,
};

use crate::{
    Verdict,
    maps::{LB_BACKENDS_V1, LB_CONNTRACK4_V1, LB_FRONTENDS4_V1, LB_SLOTS_V1},
    parse::Flow,
};

/// What to do to the packet.
pub enum Translation {
    /// Rewrite the destination to a backend.
    Dnat {
        addr: [u8; 4],
        port: u16,
        counter: Counter,
    },
    /// Rewrite the source back to the service address (reply of a translated flow).
    Snat { addr: [u8; 4], port: u16 },
    /// The service has no endpoints: answer ICMP port unreachable.
    Unreachable,
}

#[inline(always)]
fn first4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

#[inline(always)]
fn ct_key(flow: &Flow) -> CtKey {
    CtKey {
        src: flow.saddr.to_ne_bytes(),
        dst: flow.daddr.to_ne_bytes(),
        sport: flow.sport,
        dport: flow.dport,
        protocol: flow.protocol,
        _pad: [0; 3],
    }
}

/// The backend of a tracked flow, if it is still the same active backend of the same service.
#[inline(always)]
fn still_valid(entry: &CtEntry) -> bool {
    match LB_BACKENDS_V1.get(entry.backend_id) {
        Some(b) => {
            b.state == BACKEND_ACTIVE
                && b.service_id == entry.service_id
                && b.port == entry.nat_port
                && first4(&b.addr) == entry.nat_addr
        }
        None => false,
    }
}

#[inline(always)]
pub fn decide(flow: &Flow) -> Result<Translation, Verdict> {
    let key = ct_key(flow);
    // SAFETY: the entry is copied out at once; a concurrent update can only make it stale.
    if let Some(entry) = unsafe { LB_CONNTRACK4_V1.get(&key) }.copied() {
        if entry.kind == CT_REPLY {
            return Ok(Translation::Snat {
                addr: entry.nat_addr,
                port: entry.nat_port,
            });
        }
        if entry.kind == CT_FORWARD && still_valid(&entry) {
            return Ok(Translation::Dnat {
                addr: entry.nat_addr,
                port: entry.nat_port,
                counter: Counter::DnatEstablished,
            });
        }
        // A backend that left its service never gets the flow again: choose anew below.
    }

    let frontend_key = FrontendKey {
        addr: flow.daddr.to_ne_bytes(),
        port: flow.dport,
        protocol: flow.protocol,
        scope: SCOPE_CLUSTER,
    };
    // SAFETY: copied out at once.
    let frontend = match unsafe { LB_FRONTENDS4_V1.get(&frontend_key) } {
        Some(f) => *f,
        None => return Err(Verdict::Pass(Counter::PassNoService)),
    };
    if frontend.backend_count == 0 {
        return Ok(Translation::Unreachable);
    }

    let (backend_id, backend) = select(frontend.service_id, frontend.backend_count)?;
    track(&key, frontend.service_id, backend_id, &backend)?;
    Ok(Translation::Dnat {
        addr: first4(&backend.addr),
        port: backend.port,
        counter: Counter::DnatNew,
    })
}

/// Uniform random choice among the service's slots.
#[inline(always)]
fn select(service_id: u32, backend_count: u32) -> Result<(u32, Backend), Verdict> {
    let slot = unsafe { bpf_get_prandom_u32() } % backend_count;
    // SAFETY: copied out at once.
    let backend_id = match unsafe { LB_SLOTS_V1.get(&SlotKey { service_id, slot }) } {
        Some(id) => *id,
        None => return Err(Verdict::Drop(Counter::DropNoBackend)),
    };
    match LB_BACKENDS_V1.get(backend_id) {
        Some(b) if b.state == BACKEND_ACTIVE => Ok((backend_id, *b)),
        _ => Err(Verdict::Drop(Counter::DropNoBackend)),
    }
}

/// Records both directions of a new flow: the forward entry keyed by the packet as sent, and
/// the reply entry keyed by the packet the backend will send back.
#[inline(always)]
fn track(key: &CtKey, service_id: u32, backend_id: u32, backend: &Backend) -> Result<(), Verdict> {
    let backend_addr = first4(&backend.addr);
    let forward = CtEntry {
        nat_addr: backend_addr,
        nat_port: backend.port,
        kind: CT_FORWARD,
        _pad: 0,
        backend_id,
        service_id,
    };
    let reply_key = CtKey {
        src: backend_addr,
        dst: key.src,
        sport: backend.port,
        dport: key.sport,
        protocol: key.protocol,
        _pad: [0; 3],
    };
    let reply = CtEntry {
        nat_addr: key.dst,
        nat_port: key.dport,
        kind: CT_REPLY,
        _pad: 0,
        backend_id,
        service_id,
    };
    if LB_CONNTRACK4_V1.insert(&reply_key, &reply, 0).is_err()
        || LB_CONNTRACK4_V1.insert(key, &forward, 0).is_err()
    {
        return Err(Verdict::Drop(Counter::DropConntrackFull));
    }
    Ok(())
}
