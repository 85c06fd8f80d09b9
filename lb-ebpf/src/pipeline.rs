//! Stages 2-4, shared by every entry point: conntrack, service lookup, backend selection.
//! They only read and update maps; rewriting the packet is the entry point's job.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    btf_maps::{LruHashMap, lpm_trie::Key},
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    Affinity, AffinityKey, AllocationKey, BACKEND_ACTIVE, BACKEND_DRAINING, Backend, CT_EXTERNAL,
    CT_FORWARD, CT_REPLY, CT_ROUTE, CT_SNAT, Config, CtEntry, CtKey, FRONTEND_MAGLEV,
    FRONTEND_SOURCE_RANGES, FragKey, FragPorts, Frontend, FrontendKey, MAX_AFFINITY,
    NODE_PORT_ADDR, PROTO_TCP, PROTO_UDP, SCOPE_CLUSTER, SCOPE_EXTERNAL, SlotKey, SockAffinityKey,
    SourceRange, affinity,
    conntrack::{
        TCP_ACK, TCP_SYN, expired, is_hairpin_forward, is_hairpin_reply, needs_write, next_state,
        peer_key, reopens,
    },
    icmp::Quoted,
    maglev::{flow_hash, table_index},
    stats::Counter,
};

use crate::{
    Verdict, fib,
    maps::{
        LB_AFFINITY4_V1, LB_BACKENDS_V2, LB_CONNTRACK4_V4, LB_FRONTENDS4_V3, LB_IPFRAG4_V1,
        LB_MAGLEV_V1, LB_NODEADDRS4_V1, LB_SLOTS_V2, LB_SOCK_AFFINITY4_V1, LB_SRCRANGES4_V1,
        config, count,
    },
    parse::Flow,
};

/// An address and a port (network byte order), as a packet's source or destination.
pub type Endpoint = ([u8; 4], u16);

/// How the entry point sends a translated packet on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Rewritten, then on its way as the kernel routes it.
    Rewrite,
    /// The client is its own backend (or this is such a flow's reply): rewritten (the backend
    /// sees the Service address as the client, so its reply comes back through the node) and
    /// sent back out of the link it came in on.
    Hairpin,
    /// A packet of a flow from outside the cluster whose new source is one of the node's
    /// addresses (which the kernel would not forward): rewritten and sent out by a FIB lookup.
    /// A forward packet sent on to another node's endpoint, or a reply.
    Routed,
    /// The service has no endpoints: answer ICMP port unreachable (nothing else is set).
    Unreachable,
    /// A new flow from outside the cluster, its backend chosen but not recorded yet: the entry
    /// point finds out where the backend is and records the flow with [`track_external`].
    NewExternal,
}

/// What to do to the packet: its new source and destination, and how to send it on.
/// One plain struct, every field set whatever the action: an enum with fields per variant
/// leaves some bytes unset when returned from a subprogram, and the verifier refuses to copy
/// unset registers.
#[derive(Clone, Copy)]
pub struct Translation {
    pub action: Action,
    pub src: Endpoint,
    pub dst: Endpoint,
    pub counter: Counter,
    pub service_id: u32,
    /// The backend's id ([`Action::NewExternal`] only).
    pub backend_id: u32,
    /// Sent to the Service (not a reply).
    pub inbound: bool,
    /// [`Action::Routed`]: the next hop its conntrack entry holds, if any.
    pub next_hop: NextHop,
}

/// A next hop as a conntrack entry caches it ([`CT_ROUTE`]).
#[derive(Clone, Copy)]
pub struct NextHop {
    /// The link to send by; 0: none held.
    pub ifindex: u32,
    /// The Ethernet header's 12 address bytes, the next hop's then the link's own, as in the
    /// header (in words).
    pub macs: [u32; 3],
}

impl NextHop {
    /// None held. Its addresses are not zero: a run of 12 or more zero bytes is written by a
    /// call to memset on this target (a subprogram call), here once per translation built.
    pub const NONE: NextHop = NextHop {
        ifindex: 0,
        macs: [1; 3],
    };

    /// What `entry` holds, unless it was just written (which forgets it, see [`CT_ROUTE`]).
    #[inline(always)]
    fn cached(entry: &CtEntry, written: bool) -> NextHop {
        if entry.flags & CT_ROUTE == 0 || written {
            return NextHop::NONE;
        }
        NextHop {
            ifindex: entry.route_ifindex,
            macs: entry.route_macs,
        }
    }
}

impl Translation {
    pub const UNREACHABLE: Translation = Translation {
        action: Action::Unreachable,
        src: ([0; 4], 0),
        dst: ([0; 4], 0),
        counter: Counter::IcmpNoEndpoints,
        service_id: 0,
        backend_id: 0,
        inbound: false,
        next_hop: NextHop::NONE,
    };

    /// The Service port whose traffic the packet is, and whether it goes to the Service (not
    /// a reply).
    #[inline(always)]
    pub fn traffic(&self) -> Option<(u32, bool)> {
        (self.action != Action::Unreachable).then_some((self.service_id, self.inbound))
    }

    /// A new flow's backend and Service port.
    #[inline(always)]
    pub fn new_flow(&self) -> Option<(Endpoint, u32)> {
        (self.counter == Counter::DnatNew).then_some((self.dst, self.service_id))
    }
}

#[inline(always)]
pub fn first4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// The conntrack clock (see [`Config::clock_ns`]).
#[inline(always)]
pub fn now(config: &Config) -> u64 {
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
/// Both forget their cached next hops then. Returns whether it wrote.
#[inline(always)]
fn touch(entry_ptr: *mut CtEntry, entry: &CtEntry, key: &CtKey, next: u8, now: u64) -> bool {
    if !needs_write(entry, next, now) {
        return false;
    }
    // SAFETY: pointers into map values, valid for this program run; a racing writer on
    // another CPU can only make the time or state a little older.
    unsafe {
        (*entry_ptr).state = next;
        (*entry_ptr).last_seen_ns = now;
        (*entry_ptr).flags &= !CT_ROUTE;
        if let Some(peer) = LB_CONNTRACK4_V4.get_ptr_mut(peer_key(key, entry)) {
            (*peer).state |= next;
            (*peer).last_seen_ns = now;
            (*peer).flags &= !CT_ROUTE;
        }
    }
    true
}

/// Where an [`Action::Routed`] packet goes: the next hop its entry holds, or else `lookup`'s
/// (a FIB lookup), which the entry then keeps if resolved. Only established packets find one
/// held; the FIB lookup costs several times all the rest of their way.
#[inline(always)]
pub fn next_hop(
    flow: &Flow,
    t: &Translation,
    lookup: impl FnOnce() -> Option<fib::Route>,
) -> Option<fib::Route> {
    if t.next_hop.ifindex != 0 {
        return Some(fib::Route {
            ifindex: t.next_hop.ifindex,
            macs: Some(t.next_hop.macs),
        });
    }
    let route = lookup()?;
    if let Some(macs) = route.macs
        && let Some(entry) = LB_CONNTRACK4_V4.get_ptr_mut(ct_key(flow))
    {
        // SAFETY: a pointer into a map value, valid for this program run; a racing writer
        // can only have the next hop forgotten or written twice alike.
        unsafe {
            (*entry).route_ifindex = route.ifindex;
            (*entry).route_macs = macs;
            (*entry).flags |= CT_ROUTE;
        }
    }
    Some(route)
}

/// The forward direction, where packets enter the node from a pod (`EXTERNAL` false) or from
/// other nodes and the outside (`EXTERNAL`): new flows to Services get a backend, tracked ones
/// keep theirs. Replies pass (they are translated on their way out to the client), except
/// those of hairpin flows, which go back out at once, and those of flows from outside the
/// cluster, which are translated here and routed out.
/// `BEFORE_TC`: the XDP program, whose packets of no flow and no Service meet the TC program
/// next, which does what they need.
/// A subprogram of its own: inlined, its frame and the ICMP reply's would not fit in one
/// 512-byte stack together.
#[inline(never)]
pub fn decide_ingress<const EXTERNAL: bool, const BEFORE_TC: bool>(
    flow: &Flow,
) -> Result<Translation, Verdict> {
    let key = ct_key(flow);
    if let Some(entry_ptr) = LB_CONNTRACK4_V4.get_ptr_mut(key) {
        // SAFETY: copied out at once; a concurrent update can only make it stale.
        let entry = unsafe { *entry_ptr };
        let external_reply = entry.kind == CT_REPLY && entry.flags & CT_EXTERNAL != 0;
        if entry.kind == CT_REPLY && !external_reply && !is_hairpin_reply(&key, &entry) {
            return Err(Verdict::Pass(Counter::PassReply));
        }
        // Settings and clock only where an entry is found: packets of no flow skip them.
        let config = config();
        let now = now(&config);
        // An expired entry counts as absent: a forward one gets a new pick below, a reply
        // one passes untranslated.
        if !expired(&config, flow.protocol, &entry, now) {
            let next = next_state(entry.state, flow.protocol, flow.tcp_flags);
            if external_reply {
                let written = touch(entry_ptr, &entry, &key, next, now);
                return Ok(routed_reply(flow, &entry, written));
            }
            if entry.kind == CT_REPLY {
                touch(entry_ptr, &entry, &key, next, now);
                // A hairpin reply: from the Service address (the client's, to the backend) back
                // to the client, from the Service port.
                return Ok(Translation {
                    action: Action::Hairpin,
                    src: (flow.daddr.to_ne_bytes(), entry.nat_port),
                    dst: (flow.saddr.to_ne_bytes(), flow.dport),
                    counter: Counter::ReverseNat,
                    service_id: entry.service_id,
                    backend_id: entry.backend_id,
                    inbound: false,
                    next_hop: NextHop::NONE,
                });
            }
            if entry.kind == CT_FORWARD
                && still_valid(&entry)
                && !reopens(entry.state, flow.protocol, flow.tcp_flags)
            {
                let written = touch(entry_ptr, &entry, &key, next, now);
                let to = (entry.nat_addr, entry.nat_port);
                if entry.flags & CT_SNAT != 0 {
                    return Ok(Translation {
                        action: Action::Routed,
                        src: (entry.peer_addr, entry.peer_port),
                        dst: to,
                        counter: Counter::DnatEstablished,
                        service_id: entry.service_id,
                        backend_id: entry.backend_id,
                        inbound: true,
                        next_hop: NextHop::cached(&entry, written),
                    });
                }
                return Ok(dnat(flow, to, Counter::DnatEstablished, entry.service_id));
            }
        }
        if entry.kind == CT_FORWARD {
            // The flow starts over below (its backend left, it expired, or it reopened): its
            // old reply entry goes, or it would translate the old backend's stray packets.
            let _ = LB_CONNTRACK4_V4.remove(&peer_key(&key, &entry));
        }
    }

    let Some((frontend, scope)) = find_frontend::<EXTERNAL>(flow) else {
        if !BEFORE_TC {
            forget_replaced_reply(flow, &key);
        }
        return Err(Verdict::Pass(Counter::PassNoService));
    };
    if frontend.flags & FRONTEND_SOURCE_RANGES != 0 && !in_source_ranges(&frontend, flow) {
        return Err(Verdict::Drop(Counter::DropSourceRange));
    }
    if frontend.backend_count == 0 {
        if scope == SCOPE_EXTERNAL {
            return Err(Verdict::Drop(Counter::DropNoLocalEndpoint));
        }
        return Ok(Translation::UNREACHABLE);
    }

    let config = config();
    let now = now(&config);
    let (backend_id, backend) = choose(Client::Address(key.src), &key, &frontend, now)?;
    let to = (first4(&backend.addr), backend.port);
    if EXTERNAL {
        return Ok(Translation {
            action: Action::NewExternal,
            src: (flow.saddr.to_ne_bytes(), flow.sport),
            dst: to,
            counter: Counter::DnatNew,
            service_id: frontend.service_id,
            backend_id,
            inbound: true,
            next_hop: NextHop::NONE,
        });
    }
    let new = Tracked {
        service_id: frontend.service_id,
        backend_id,
        to,
        state: next_state(0, flow.protocol, flow.tcp_flags),
        now,
    };
    track(&key, &new, 0, None)?;
    Ok(dnat(flow, to, Counter::DnatNew, frontend.service_id))
}

/// Records a new flow from outside the cluster ([`Action::NewExternal`]) and says how to
/// send it: to an endpoint on this node translated and routed by the kernel; to one on
/// another node (`remote`: behind the link the client came from) from this node's address,
/// so that the replies come back here to be translated, and sent out by FIB lookup.
/// A subprogram of its own: its frame and the one deciding the flow's backend would not fit
/// in one 512-byte stack together.
#[inline(never)]
pub fn track_external(
    flow: &Flow,
    chosen: &Translation,
    remote: bool,
) -> Result<Translation, Verdict> {
    let key = ct_key(flow);
    let config = config();
    let new = Tracked {
        service_id: chosen.service_id,
        backend_id: chosen.backend_id,
        to: chosen.dst,
        state: next_state(0, flow.protocol, flow.tcp_flags),
        now: now(&config),
    };
    let mut translation = Translation {
        action: Action::Rewrite,
        ..*chosen
    };
    if remote {
        translation.action = Action::Routed;
        translation.src = track_source_nated(&key, &new, &config)?;
        count(Counter::SnatNew);
    } else {
        track(&key, &new, CT_EXTERNAL, None)?;
    }
    Ok(translation)
}

/// The reply of a flow from outside the cluster: from the address the client called, to the
/// client (the packet's destination already, unless the flow was source-NATed).
#[inline(always)]
fn routed_reply(flow: &Flow, entry: &CtEntry, written: bool) -> Translation {
    let dst = if entry.flags & CT_SNAT != 0 {
        (entry.peer_addr, entry.peer_port)
    } else {
        (flow.daddr.to_ne_bytes(), flow.dport)
    };
    Translation {
        action: Action::Routed,
        src: (entry.nat_addr, entry.nat_port),
        dst,
        counter: Counter::ReverseNat,
        service_id: entry.service_id,
        backend_id: entry.backend_id,
        inbound: false,
        next_hop: NextHop::cached(entry, written),
    }
}

/// Whether the client is in the frontend's `loadBalancerSourceRanges`.
#[inline(always)]
fn in_source_ranges(frontend: &Frontend, flow: &Flow) -> bool {
    let key = Key::new(
        64,
        SourceRange {
            service_id: frontend.service_id.to_be(),
            addr: flow.saddr.to_ne_bytes(),
        },
    );
    LB_SRCRANGES4_V1.get(&key).is_some()
}

/// The frontend a new flow is addressed to, and the scope it was found in. A client outside
/// the cluster gets the [`SCOPE_EXTERNAL`] entry where there is one (only this node's
/// endpoints), otherwise everyone gets the [`SCOPE_CLUSTER`] one. A nodePort answers on every
/// address of [`LB_NODEADDRS4_V1`].
#[inline(always)]
fn find_frontend<const EXTERNAL: bool>(flow: &Flow) -> Option<(Frontend, u8)> {
    service_frontend::<EXTERNAL>(flow.daddr.to_ne_bytes(), flow.dport, flow.protocol)
}

/// [`find_frontend`] for a destination address, port and protocol (network byte order).
#[inline(always)]
pub fn service_frontend<const EXTERNAL: bool>(
    addr: [u8; 4],
    port: u16,
    protocol: u8,
) -> Option<(Frontend, u8)> {
    if let Some(found) = frontend_at::<EXTERNAL>(addr, port, protocol) {
        return Some(found);
    }
    // SAFETY: only tested for presence.
    unsafe { LB_NODEADDRS4_V1.get(&AllocationKey { addr }) }?;
    frontend_at::<EXTERNAL>(NODE_PORT_ADDR, port, protocol)
}

#[inline(always)]
fn frontend_at<const EXTERNAL: bool>(
    addr: [u8; 4],
    port: u16,
    protocol: u8,
) -> Option<(Frontend, u8)> {
    let mut key = FrontendKey {
        addr,
        port,
        protocol,
        scope: SCOPE_EXTERNAL,
    };
    // SAFETY (both lookups): copied out at once.
    if EXTERNAL && let Some(f) = unsafe { LB_FRONTENDS4_V3.get(&key) } {
        return Some((*f, SCOPE_EXTERNAL));
    }
    key.scope = SCOPE_CLUSTER;
    unsafe { LB_FRONTENDS4_V3.get(&key) }.map(|f| (*f, SCOPE_CLUSTER))
}

/// A forward packet to a backend: the client's own address is a hairpin flow (both ends
/// swapped: the backend sees the Service address as its client).
#[inline(always)]
fn dnat(flow: &Flow, to: Endpoint, counter: Counter, service_id: u32) -> Translation {
    let client = flow.saddr.to_ne_bytes();
    let hairpin = to.0 == client;
    Translation {
        action: if hairpin {
            Action::Hairpin
        } else {
            Action::Rewrite
        },
        src: if hairpin {
            (flow.daddr.to_ne_bytes(), flow.sport)
        } else {
            (client, flow.sport)
        },
        dst: to,
        counter,
        service_id,
        backend_id: 0,
        inbound: true,
        next_hop: NextHop::NONE,
    }
}

/// The reply direction, where packets leave the node toward a pod: replies of tracked flows
/// get the Service address back as their source. Here, after the node routed the packet and
/// checked it against the link's MTU, so an ICMP error the node sends about it goes to the
/// backend that sent it, with the addresses the backend knows.
#[inline(always)]
pub fn decide_egress(flow: &Flow) -> Result<Translation, Verdict> {
    let key = ct_key(flow);
    let Some(entry_ptr) = LB_CONNTRACK4_V4.get_ptr_mut(key) else {
        return Err(Verdict::Pass(Counter::PassNoService));
    };
    // SAFETY: copied out at once; a concurrent update can only make it stale.
    let entry = unsafe { *entry_ptr };
    // Replies of flows from outside the cluster were translated where they entered.
    if entry.kind != CT_REPLY || entry.flags & CT_EXTERNAL != 0 || is_hairpin_reply(&key, &entry) {
        return Err(Verdict::Pass(Counter::PassNoService));
    }
    let config = config();
    let now = now(&config);
    if expired(&config, flow.protocol, &entry, now) {
        return Err(Verdict::Pass(Counter::PassNoService));
    }
    let next = next_state(entry.state, flow.protocol, flow.tcp_flags);
    touch(entry_ptr, &entry, &key, next, now);
    Ok(Translation {
        action: Action::Rewrite,
        src: (entry.nat_addr, entry.nat_port),
        dst: (flow.daddr.to_ne_bytes(), flow.dport),
        counter: Counter::ReverseNat,
        service_id: entry.service_id,
        backend_id: entry.backend_id,
        inbound: false,
        next_hop: NextHop::NONE,
    })
}

/// What an ICMP error about a translated flow becomes: the quoted datagram's ends to rewrite
/// (each with the outer address on its side where it is the same, see `icmp::translate`),
/// and whether the program must send it out by FIB lookup (its new source may be one of this
/// node's addresses, which the kernel drops on a forwarded packet).
#[derive(Clone, Copy)]
pub struct IcmpTarget {
    pub source: Option<Endpoint>,
    pub destination: Option<Endpoint>,
    pub routed: bool,
}

/// How to translate an ICMP error whose quoted datagram belongs to a translated flow, so that
/// its receiver knows the addresses:
/// - at ingress, from a client about a reply it got (quoted source: the Service, becomes the
///   backend; for a flow source-NATed toward another node, the quoted client becomes this
///   node's address and port the backend knows, and the error is routed there);
/// - at ingress, from a backend of a flow from outside the cluster (or a router on its way)
///   about what the client sent (quoted destination: the backend, becomes the address the
///   client called; source-NATed, this node's end becomes the client again); routed out;
/// - at egress, toward a pod client about what it sent (quoted destination: the backend,
///   becomes the Service).
///
/// Hairpin flows are left alone.
#[inline(always)]
pub fn icmp_error_target(quoted: &Quoted, ingress: bool) -> Option<IcmpTarget> {
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
    let entry = unsafe { *LB_CONNTRACK4_V4.get(&key)? };
    let nat = Some((entry.nat_addr, entry.nat_port));
    let snat = entry.flags & CT_SNAT != 0;
    let peer = if snat {
        Some((entry.peer_addr, entry.peer_port))
    } else {
        None
    };
    if entry.flags & CT_EXTERNAL != 0 {
        if !ingress {
            return None;
        }
        return Some(if entry.kind == CT_FORWARD {
            IcmpTarget {
                source: nat,
                destination: peer,
                routed: snat,
            }
        } else {
            IcmpTarget {
                source: peer,
                destination: nat,
                routed: true,
            }
        });
    }
    let target = if ingress {
        (entry.kind == CT_FORWARD && !is_hairpin_forward(&key, &entry)).then_some(IcmpTarget {
            source: nat,
            destination: None,
            routed: false,
        })
    } else {
        (entry.kind == CT_REPLY && !is_hairpin_reply(&key, &entry)).then_some(IcmpTarget {
            source: None,
            destination: nat,
            routed: false,
        })
    };
    target
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
    // Not a flow from outside the cluster's: on an external link the packet may be that
    // flow's own, already translated by XDP (the TC program behind it then sees it as direct).
    if let Some(entry) = unsafe { LB_CONNTRACK4_V4.get(&reverse) }
        && entry.kind == CT_REPLY
        && entry.flags & CT_EXTERNAL == 0
    {
        let _ = LB_CONNTRACK4_V4.remove(&reverse);
    }
}

/// Who opens a new flow, as ClientIP affinity tells clients apart.
#[derive(Clone, Copy)]
pub enum Client {
    /// The packet's source address (the TC and XDP programs).
    Address([u8; 4]),
    /// The socket's network namespace (at connect(), before the socket has a source address):
    /// one pod, or the node itself.
    Netns(u64),
}

/// The backend of a new flow: under ClientIP affinity the client's, while its entry holds and
/// the backend takes new flows; otherwise one picked by the Service port's algorithm (and,
/// under affinity, kept for the client's next flows). `key`: the flow Maglev hashes.
/// Shared by the packet path and the socket path.
#[inline(always)]
pub fn choose(
    client: Client,
    key: &CtKey,
    frontend: &Frontend,
    now: u64,
) -> Result<(u32, Backend), Verdict> {
    if !affinity::enabled(frontend) {
        return pick(key, frontend);
    }
    match client {
        Client::Address(addr) => {
            let client = AffinityKey {
                service_id: frontend.service_id,
                client: addr,
            };
            sticky(&LB_AFFINITY4_V1, &client, key, frontend, now)
        }
        Client::Netns(cookie) => {
            let client = SockAffinityKey {
                service_id: frontend.service_id,
                _pad: 0,
                netns_cookie: cookie,
            };
            sticky(&LB_SOCK_AFFINITY4_V1, &client, key, frontend, now)
        }
    }
}

/// [`choose`] under affinity, with the client's entry in `clients`.
#[inline(always)]
fn sticky<K>(
    clients: &LruHashMap<K, Affinity, { MAX_AFFINITY as usize }>,
    client: &K,
    key: &CtKey,
    frontend: &Frontend,
    now: u64,
) -> Result<(u32, Backend), Verdict> {
    if let Some(entry) = clients.get_ptr_mut(client) {
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
    let _ = clients.insert(client, &pinned, 0);
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

/// A new flow's backend.
struct Tracked {
    service_id: u32,
    backend_id: u32,
    /// The backend's address and port.
    to: ([u8; 4], u16),
    state: u8,
    now: u64,
}

impl Tracked {
    /// The flow's entry of `kind`: the packet gets `nat` in place of one end (forward: the
    /// destination, reply: the source) and with [`CT_SNAT`] `peer` in place of the other.
    #[inline(always)]
    fn entry(&self, kind: u8, nat: ([u8; 4], u16), peer: ([u8; 4], u16), flags: u8) -> CtEntry {
        CtEntry {
            nat_addr: nat.0,
            nat_port: nat.1,
            kind,
            state: self.state,
            backend_id: self.backend_id,
            service_id: self.service_id,
            last_seen_ns: self.now,
            peer_addr: peer.0,
            peer_port: peer.1,
            flags,
            _pad: 0,
            // Meaningless without CT_ROUTE. Not zero: with the zero fields before them, a
            // run of zero bytes that becomes a call to memset (see NextHop::NONE).
            route_ifindex: u32::MAX,
            route_macs: NextHop::NONE.macs,
        }
    }
}

/// Records both directions of a new flow: the forward entry keyed by the packet as sent, and
/// the reply entry keyed by the packet the backend will send back. With a `source` (SNAT),
/// the forward packets leave from it and the replies come back to it.
#[inline(always)]
fn track(
    key: &CtKey,
    new: &Tracked,
    flags: u8,
    source: Option<([u8; 4], u16)>,
) -> Result<(), Verdict> {
    let peer = source.unwrap_or_default();
    // Each entry is built where it is written, so that the two share a stack slot.
    let reply_key = peer_key(key, &new.entry(CT_FORWARD, new.to, peer, flags));
    let reply = new.entry(CT_REPLY, (key.dst, key.dport), (key.src, key.sport), flags);
    // A source-NATed flow's reply key must be new: its port is what tells flows apart.
    let reply_flags = u64::from(if source.is_some() {
        BPF_NOEXIST
    } else {
        BPF_ANY
    });
    if LB_CONNTRACK4_V4
        .insert(reply_key, &reply, reply_flags)
        .is_err()
    {
        return Err(Verdict::Drop(if source.is_some() {
            Counter::DropSnatExhausted
        } else {
            Counter::DropConntrackFull
        }));
    }
    let forward = new.entry(CT_FORWARD, new.to, peer, flags);
    if LB_CONNTRACK4_V4
        .insert(key, &forward, BPF_ANY as u64)
        .is_err()
    {
        return Err(Verdict::Drop(Counter::DropConntrackFull));
    }
    Ok(())
}

/// Source ports tried for a flow sent on to another node: the client's own first (as
/// netfilter's masquerading keeps it where it can), then random ones. Even with half the
/// ports to an endpoint taken, all 16 are taken once in 65,536 new flows.
const SNAT_TRIES: u32 = 16;
/// The lowest random source port (below are the well-known ports).
const SNAT_PORT_MIN: u32 = 1024;

/// Records a flow from outside the cluster sent on to another node's endpoint, from this
/// node's address (the one the client called, or the node's first external address for a
/// LoadBalancer IP or externalIP) and a port no other such flow to the endpoint uses.
/// Returns that source.
#[inline(always)]
fn track_source_nated(
    key: &CtKey,
    new: &Tracked,
    config: &Config,
) -> Result<([u8; 4], u16), Verdict> {
    // SAFETY: only tested for presence.
    let own = unsafe { LB_NODEADDRS4_V1.get(&AllocationKey { addr: key.dst }) }.is_some();
    let addr = if own { key.dst } else { config.snat_addr };
    if addr == [0; 4] {
        return Err(Verdict::Drop(Counter::DropSnatExhausted));
    }
    let mut port = key.sport;
    for _ in 0..SNAT_TRIES {
        match track(key, new, CT_EXTERNAL | CT_SNAT, Some((addr, port))) {
            Ok(()) => return Ok((addr, port)),
            Err(Verdict::Drop(Counter::DropSnatExhausted)) => {}
            Err(v) => return Err(v),
        }
        // SAFETY: a helper without arguments.
        let random = unsafe { bpf_get_prandom_u32() };
        port = ((SNAT_PORT_MIN + random % (65536 - SNAT_PORT_MIN)) as u16).to_be();
    }
    Err(Verdict::Drop(Counter::DropSnatExhausted))
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
