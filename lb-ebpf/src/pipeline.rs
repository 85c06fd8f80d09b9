//! Stages 2-4, shared by every entry point: conntrack, service lookup, backend selection.
//! They only read and update maps; rewriting the packet is the entry point's job.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    Affinity, AffinityKey, BACKEND_ACTIVE, BACKEND_DRAINING, Backend, CT_FORWARD, CT_REPLY, Config,
    CtEntry, CtKey, EVENTS_FLOWS, FRONTEND_MAGLEV, FragKey, FragPorts, Frontend, FrontendKey,
    PROTO_TCP, PROTO_UDP, SCOPE_CLUSTER, SlotKey, affinity,
    conntrack::{
        TCP_ACK, TCP_SYN, expired, is_hairpin_forward, is_hairpin_reply, needs_write, next_state,
        peer_key, reopens,
    },
    icmp::Quoted,
    maglev::{flow_hash, table_index},
    stats::Counter,
};

use crate::{
    Verdict, events,
    maps::{
        LB_AFFINITY4_V1, LB_BACKENDS_V2, LB_CONNTRACK4_V2, LB_FRONTENDS4_V3, LB_IPFRAG4_V1,
        LB_MAGLEV_V1, LB_SLOTS_V2, config, events_level,
    },
    parse::Flow,
};

/// What to do to the packet.
pub enum Translation {
    /// Rewrite the destination to a backend.
    Dnat {
        addr: [u8; 4],
        port: u16,
        counter: Counter,
        service_id: u32,
    },
    /// Rewrite the source back to the service address (reply of a translated flow).
    Snat {
        addr: [u8; 4],
        port: u16,
        service_id: u32,
    },
    /// The client is its own backend: swap the addresses (the backend sees the Service
    /// address as the client, so its reply comes back through the node), set the destination
    /// port, and send the packet back where it came from.
    HairpinDnat {
        port: u16,
        counter: Counter,
        service_id: u32,
    },
    /// Reply of a hairpin flow: swap the addresses, set the source port to the Service's, and
    /// send it back where it came from.
    HairpinSnat { port: u16, service_id: u32 },
    /// The service has no endpoints: answer ICMP port unreachable.
    Unreachable,
}

impl Translation {
    /// The Service port whose traffic the packet is, and whether it goes to the Service (not
    /// a reply).
    #[inline(always)]
    pub fn traffic(&self) -> Option<(u32, bool)> {
        match *self {
            Translation::Dnat { service_id, .. } | Translation::HairpinDnat { service_id, .. } => {
                Some((service_id, true))
            }
            Translation::Snat { service_id, .. } | Translation::HairpinSnat { service_id, .. } => {
                Some((service_id, false))
            }
            Translation::Unreachable => None,
        }
    }
}

#[inline(always)]
fn first4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// The conntrack clock (see [`Config::clock_ns`]).
#[inline(always)]
fn now(config: &Config) -> u64 {
    // SAFETY: a helper without arguments.
    config.clock_ns(unsafe { bpf_jiffies64() })
}

#[inline(always)]
pub fn ct_key(flow: &Flow) -> CtKey {
    CtKey {
        src: flow.saddr.to_ne_bytes(),
        dst: flow.daddr.to_ne_bytes(),
        sport: flow.sport,
        dport: flow.dport,
        protocol: flow.protocol,
        _pad1: 0,
        _pad2: 0,
    }
}

/// The backend of a tracked flow, if it is still the same backend of the same service, taking
/// new flows or draining (not ready or terminating: its established flows go on).
#[inline(always)]
fn still_valid(entry: &CtEntry) -> bool {
    match LB_BACKENDS_V2.get(entry.backend_id) {
        Some(b) => {
            (b.state == BACKEND_ACTIVE || b.state == BACKEND_DRAINING)
                && b.service_id == entry.service_id
                && b.port == entry.nat_port
                && first4(&b.addr) == entry.nat_addr
        }
        None => false,
    }
}

/// Records the packet in its flow's entry and in the other direction's, so that both age,
/// close and expire together; written only when the state changes or the time is due.
#[inline(always)]
fn touch(entry_ptr: *mut CtEntry, entry: &CtEntry, key: &CtKey, next: u8, now: u64) {
    if !needs_write(entry, next, now) {
        return;
    }
    // SAFETY: pointers into map values, valid for this program run; a racing writer on
    // another CPU can only make the time or state a little older.
    unsafe {
        (*entry_ptr).state = next;
        (*entry_ptr).last_seen_ns = now;
        if let Some(peer) = LB_CONNTRACK4_V2.get_ptr_mut(peer_key(key, entry)) {
            (*peer).state |= next;
            (*peer).last_seen_ns = now;
        }
    }
}

/// The forward direction, where packets enter the node from a pod or an uplink: new flows to
/// Services get a backend, tracked ones keep theirs. Replies pass (they are translated on their
/// way out to the client), except those of hairpin flows, which go back out at once.
#[inline(always)]
pub fn decide_ingress(flow: &Flow) -> Result<Translation, Verdict> {
    let key = ct_key(flow);
    if let Some(entry_ptr) = LB_CONNTRACK4_V2.get_ptr_mut(key) {
        // SAFETY: copied out at once; a concurrent update can only make it stale.
        let entry = unsafe { *entry_ptr };
        if entry.kind == CT_REPLY && !is_hairpin_reply(&key, &entry) {
            return Err(Verdict::Pass(Counter::PassReply));
        }
        // Settings and clock only where an entry is found: packets of no flow skip them.
        let config = config();
        let now = now(&config);
        // An expired entry counts as absent: a forward one gets a new pick below, a reply
        // one passes untranslated.
        if !expired(&config, flow.protocol, &entry, now) {
            let next = next_state(entry.state, flow.protocol, flow.tcp_flags);
            if entry.kind == CT_REPLY {
                touch(entry_ptr, &entry, &key, next, now);
                return Ok(Translation::HairpinSnat {
                    port: entry.nat_port,
                    service_id: entry.service_id,
                });
            }
            if entry.kind == CT_FORWARD
                && still_valid(&entry)
                && !reopens(entry.state, flow.protocol, flow.tcp_flags)
            {
                touch(entry_ptr, &entry, &key, next, now);
                return Ok(dnat(
                    flow,
                    (entry.nat_addr, entry.nat_port),
                    Counter::DnatEstablished,
                    entry.service_id,
                ));
            }
        }
        if entry.kind == CT_FORWARD {
            // The flow starts over below (its backend left, it expired, or it reopened): its
            // old reply entry goes, or it would translate the old backend's stray packets.
            let _ = LB_CONNTRACK4_V2.remove(&peer_key(&key, &entry));
        }
    }

    let frontend_key = FrontendKey {
        addr: flow.daddr.to_ne_bytes(),
        port: flow.dport,
        protocol: flow.protocol,
        scope: SCOPE_CLUSTER,
    };
    // SAFETY: copied out at once.
    let frontend = match unsafe { LB_FRONTENDS4_V3.get(&frontend_key) } {
        Some(f) => *f,
        None => {
            forget_replaced_reply(flow, &key);
            return Err(Verdict::Pass(Counter::PassNoService));
        }
    };
    if frontend.backend_count == 0 {
        return Ok(Translation::Unreachable);
    }

    let now = now(&config());
    let (backend_id, backend) = choose(&key, &frontend, now)?;
    let state = next_state(0, flow.protocol, flow.tcp_flags);
    track(&key, frontend.service_id, backend_id, &backend, state, now)?;
    let to = (first4(&backend.addr), backend.port);
    if events_level() >= EVENTS_FLOWS {
        events::new_flow(flow, to, frontend.service_id);
    }
    Ok(dnat(flow, to, Counter::DnatNew, frontend.service_id))
}

#[inline(always)]
fn dnat(
    flow: &Flow,
    (addr, port): ([u8; 4], u16),
    counter: Counter,
    service_id: u32,
) -> Translation {
    if addr == flow.saddr.to_ne_bytes() {
        Translation::HairpinDnat {
            port,
            counter,
            service_id,
        }
    } else {
        Translation::Dnat {
            addr,
            port,
            counter,
            service_id,
        }
    }
}

/// The reply direction, where packets leave the node toward a pod: replies of tracked flows
/// get the Service address back as their source. Here, after the node routed the packet and
/// checked it against the link's MTU, so an ICMP error the node sends about it goes to the
/// backend that sent it, with the addresses the backend knows.
#[inline(always)]
pub fn decide_egress(flow: &Flow) -> Result<Translation, Verdict> {
    let key = ct_key(flow);
    let Some(entry_ptr) = LB_CONNTRACK4_V2.get_ptr_mut(key) else {
        return Err(Verdict::Pass(Counter::PassNoService));
    };
    // SAFETY: copied out at once; a concurrent update can only make it stale.
    let entry = unsafe { *entry_ptr };
    if entry.kind != CT_REPLY || is_hairpin_reply(&key, &entry) {
        return Err(Verdict::Pass(Counter::PassNoService));
    }
    let config = config();
    let now = now(&config);
    if expired(&config, flow.protocol, &entry, now) {
        return Err(Verdict::Pass(Counter::PassNoService));
    }
    let next = next_state(entry.state, flow.protocol, flow.tcp_flags);
    touch(entry_ptr, &entry, &key, next, now);
    Ok(Translation::Snat {
        addr: entry.nat_addr,
        port: entry.nat_port,
        service_id: entry.service_id,
    })
}

/// The address and port that replace the translated end of a flow an ICMP error quotes: at
/// ingress an error from a client about a reply it got (quoted source: the Service, becomes
/// the backend), at egress an error toward a client about what it sent (quoted destination:
/// the backend, becomes the Service). Hairpin flows are left alone.
#[inline(always)]
pub fn icmp_error_target(quoted: &Quoted, ingress: bool) -> Option<([u8; 4], u16)> {
    // The quoted datagram went the other way: its reverse is the key of the entry we want.
    let key = CtKey {
        src: quoted.src,
        dst: quoted.dst,
        sport: quoted.sport,
        dport: quoted.dport,
        protocol: quoted.protocol,
        _pad1: 0,
        _pad2: 0,
    }
    .reversed();
    // SAFETY: copied out at once.
    let entry = unsafe { *LB_CONNTRACK4_V2.get(&key)? };
    let wanted = if ingress {
        entry.kind == CT_FORWARD && !is_hairpin_forward(&key, &entry)
    } else {
        entry.kind == CT_REPLY && !is_hairpin_reply(&key, &entry)
    };
    if !wanted {
        return None;
    }
    Some((entry.nat_addr, entry.nat_port))
}

#[inline(always)]
fn fragment_key(flow: &Flow) -> FragKey {
    FragKey {
        src: flow.saddr.to_ne_bytes(),
        dst: flow.daddr.to_ne_bytes(),
        id: flow.ip_id,
        protocol: flow.protocol,
        _pad: 0,
    }
}

/// Fills in a later fragment's ports from its datagram's first fragment.
#[inline(always)]
pub fn fragment_ports(flow: &mut Flow) -> Result<(), Verdict> {
    // SAFETY: copied out at once.
    match unsafe { LB_IPFRAG4_V1.get(&fragment_key(flow)) } {
        Some(ports) => {
            flow.sport = ports.sport;
            flow.dport = ports.dport;
            Ok(())
        }
        None => Err(Verdict::Pass(Counter::PassFragment)),
    }
}

/// Records a translated first fragment's ports for the fragments that follow it.
#[inline(always)]
pub fn remember_fragment(flow: &Flow) {
    let ports = FragPorts {
        sport: flow.sport,
        dport: flow.dport,
    };
    let _ = LB_IPFRAG4_V1.insert(&fragment_key(flow), &ports, 0);
}

/// A client that opens a direct flow (a TCP SYN, or any UDP datagram) to a backend from the
/// same port as an earlier flow through a Service reuses that flow's reply key: the old reply
/// entry would rewrite the new flow's replies to the Service address. It goes.
#[inline(always)]
fn forget_replaced_reply(flow: &Flow, key: &CtKey) {
    let opens = (flow.protocol == PROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
        || flow.protocol == PROTO_UDP;
    if !opens {
        return;
    }
    let reverse = key.reversed();
    // SAFETY: copied out at once.
    if let Some(entry) = unsafe { LB_CONNTRACK4_V2.get(&reverse) }
        && entry.kind == CT_REPLY
    {
        let _ = LB_CONNTRACK4_V2.remove(&reverse);
    }
}

/// The backend of a new flow: under ClientIP affinity the client's, while its entry holds and
/// the backend takes new flows; otherwise one picked by the Service port's algorithm (and,
/// under affinity, kept for the client's next flows).
#[inline(always)]
fn choose(key: &CtKey, frontend: &Frontend, now: u64) -> Result<(u32, Backend), Verdict> {
    if !affinity::enabled(frontend) {
        return pick(key, frontend);
    }
    let client = AffinityKey {
        service_id: frontend.service_id,
        client: key.src,
    };
    if let Some(entry) = LB_AFFINITY4_V1.get_ptr_mut(&client) {
        // SAFETY: copied out at once; a racing writer on another CPU can only make the time a
        // little older or give the client the backend it picked.
        let pinned = unsafe { *entry };
        if affinity::holds(frontend, &pinned, now)
            && let Some(backend) = serving_backend(pinned.backend_id, frontend.service_id)
        {
            unsafe { (*entry).last_used_ns = now };
            return Ok((pinned.backend_id, backend));
        }
    }
    let (backend_id, backend) = pick(key, frontend)?;
    let pinned = Affinity {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    // A full map evicts its longest idle client; failing to record only loses the affinity.
    let _ = LB_AFFINITY4_V1.insert(&client, &pinned, 0);
    Ok((backend_id, backend))
}

/// The backend with this id if it belongs to the service and takes new flows.
#[inline(always)]
fn serving_backend(backend_id: u32, service_id: u32) -> Option<Backend> {
    match LB_BACKENDS_V2.get(backend_id) {
        Some(b) if b.state == BACKEND_ACTIVE && b.service_id == service_id => Some(*b),
        _ => None,
    }
}

/// Maglev: the table entry of the flow's hash. Random: a uniform choice among the slots that
/// take new flows; also where a table is missing or names a backend that no longer serves
/// (a table being replaced).
#[inline(always)]
fn pick(key: &CtKey, frontend: &Frontend) -> Result<(u32, Backend), Verdict> {
    if frontend.flags & FRONTEND_MAGLEV != 0 {
        let hash = flow_hash(key.src, key.dst, key.sport, key.dport, key.protocol);
        let index = table_index(hash, frontend.maglev_table_size);
        // SAFETY: copied out at once.
        if let Some(id) = unsafe { LB_MAGLEV_V1.get_value(&frontend.service_id, &index) }
            && let Some(backend) = serving_backend(*id, frontend.service_id)
        {
            return Ok((*id, backend));
        }
    }
    // checked: a remainder by zero would be a panic the verifier refuses.
    let Some(slot) = unsafe { bpf_get_prandom_u32() }.checked_rem(frontend.backend_count) else {
        return Err(Verdict::Drop(Counter::DropNoBackend));
    };
    // SAFETY: copied out at once.
    let backend_id = match unsafe {
        LB_SLOTS_V2.get(&SlotKey {
            service_id: frontend.service_id,
            slot,
        })
    } {
        Some(id) => *id,
        None => return Err(Verdict::Drop(Counter::DropNoBackend)),
    };
    match serving_backend(backend_id, frontend.service_id) {
        Some(b) => Ok((backend_id, b)),
        None => Err(Verdict::Drop(Counter::DropNoBackend)),
    }
}

/// Records both directions of a new flow: the forward entry keyed by the packet as sent, and
/// the reply entry keyed by the packet the backend will send back.
#[inline(always)]
fn track(
    key: &CtKey,
    service_id: u32,
    backend_id: u32,
    backend: &Backend,
    state: u8,
    now: u64,
) -> Result<(), Verdict> {
    let backend_addr = first4(&backend.addr);
    let forward = CtEntry {
        nat_addr: backend_addr,
        nat_port: backend.port,
        kind: CT_FORWARD,
        state,
        backend_id,
        service_id,
        last_seen_ns: now,
    };
    let reply = CtEntry {
        nat_addr: key.dst,
        nat_port: key.dport,
        kind: CT_REPLY,
        ..forward
    };
    if LB_CONNTRACK4_V2
        .insert(peer_key(key, &forward), &reply, 0)
        .is_err()
        || LB_CONNTRACK4_V2.insert(key, &forward, 0).is_err()
    {
        return Err(Verdict::Drop(Counter::DropConntrackFull));
    }
    Ok(())
}

/// Whether a reply for a Service without endpoints may be sent now (per-CPU token bucket).
#[inline(always)]
pub fn may_answer_unreachable(config: &Config) -> bool {
    let Some(bucket) = crate::maps::LB_ICMP_BUCKET_V1.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value, no other writer on this CPU while the program runs.
    unsafe {
        lb_common::conntrack::take_token(
            &mut *bucket,
            config.icmp_replies_per_sec,
            bpf_ktime_get_coarse_ns(),
        )
    }
}
