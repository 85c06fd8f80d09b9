//! Map names, capacities and key/value layouts shared by the eBPF programs and the agent.
//!
//! This crate is the only owner of map layouts. Changing a layout renames its map (`_V2`).
//! Map contents are in network byte order: addresses as on the wire, ports as `u16` holding
//! the big-endian bytes (`u16::from_ne_bytes(port.to_be_bytes())`). Use [`net_port`] /
//! [`host_port`] at the edges.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod affinity;
pub mod checksum;
pub mod conntrack;
pub mod icmp;
pub mod maglev;
pub mod stats;

/// IPv4 frontend (service address, port, protocol) -> [`Frontend`]. IPv6 gets its own map
/// (`LB_FRONTENDS6_*`) with the same value type: per-family keys keep the per-packet hash small.
pub const FRONTENDS_MAP: &str = "LB_FRONTENDS4_V3";
/// (service id, slot) -> backend id. Slots 0..backend_count hold the backends that take new
/// flows; the next draining_count slots hold draining ones (kept so the agent can find them).
pub const SLOTS_MAP: &str = "LB_SLOTS_V2";
/// Backend id (array index) -> [`Backend`].
pub const BACKENDS_MAP: &str = "LB_BACKENDS_V2";
/// IPv4 flow 5-tuple as seen on the wire -> [`CtEntry`] (forward DNAT or reply reverse NAT).
/// IPv6 gets its own map (`LB_CONNTRACK6_*`).
pub const CONNTRACK_MAP: &str = "LB_CONNTRACK4_V4";
/// Counter index ([`stats::Counter`]) -> per-CPU packet count.
pub const STATS_MAP: &str = "LB_STATS_V5";
/// 0 -> [`Config`]: conntrack timeouts, the ICMP reply rate and the clock's tick, written by
/// the agent at load.
pub const CONFIG_MAP: &str = "LB_CONFIG_V3";
/// 0 -> per-CPU [`TokenBucket`] limiting the ICMP replies for Services without endpoints.
pub const ICMP_BUCKET_MAP: &str = "LB_ICMP_BUCKET_V1";
/// IPv4 fragment of a translated datagram ([`FragKey`]) -> its ports ([`FragPorts`]), written
/// when the first fragment passes so that later ones (which carry no ports) follow the same
/// flow. LRU: entries of datagrams whose fragments all went age out.
pub const FRAGMENTS_MAP: &str = "LB_IPFRAG4_V1";
/// ClusterIP ([`AllocationKey`]) -> the Service holding it ([`ServiceName`]). Written by the
/// agent only (the datapath never reads it): a restarted agent gives every address back to
/// the Service that held it, whoever else asks for it.
pub const CLUSTER_IPS_MAP: &str = "LB_CLUSTERIPS_V1";

/// Service id ([`Frontend::service_id`], an array index) -> per-CPU [`ServiceTraffic`]: the
/// packets and bytes of each Service port, both ways.
pub const SERVICE_TRAFFIC_MAP: &str = "LB_SERVICE_TRAFFIC_V1";
/// 0 -> the datapath events wanted ([`EVENTS_OFF`], [`EVENTS_DROPS`], [`EVENTS_FLOWS`]),
/// written by the agent at run time.
pub const EVENTS_MAP: &str = "LB_EVENTS_V1";

/// (service id, client address) -> [`Affinity`]: the endpoint a client of a Service port with
/// `sessionAffinity: ClientIP` keeps, and when it last opened a flow. LRU: idle clients go
/// when the map is full.
pub const AFFINITY_MAP: &str = "LB_AFFINITY4_V1";
/// Service id -> the Service port's Maglev table: an array of [`Frontend::maglev_table_size`]
/// backend ids, replaced whole (a new inner map) when the endpoints change.
pub const MAGLEV_MAP: &str = "LB_MAGLEV_V1";
/// This node's address ([`AllocationKey`]) -> 1, for the addresses that answer on nodePorts
/// (`--external-iface`, narrowed by `--nodeport-addresses`).
pub const NODE_ADDRS_MAP: &str = "LB_NODEADDRS4_V1";

/// (service id, client prefix) -> 1, an LPM trie: the clients a LoadBalancer address with
/// `loadBalancerSourceRanges` takes ([`FRONTEND_SOURCE_RANGES`]). The key's prefix length
/// counts the 32 bits of the service id too.
pub const SOURCE_RANGES_MAP: &str = "LB_SRCRANGES4_V1";

/// (socket cookie, backend address and port) -> [`SockService`]: the Service address a socket
/// reached that backend through, translated at connect() or per datagram, so that getpeername()
/// and recvfrom() show the Service. LRU: sockets long gone are evicted first.
pub const SOCK_REVNAT_MAP: &str = "LB_SOCK_REVNAT4_V1";
/// (service id, network namespace cookie) -> [`Affinity`]: ClientIP affinity for clients
/// translated at connect(), which have no source address yet. A namespace is one pod, or the
/// node itself: the client address a packet would have shown.
pub const SOCK_AFFINITY_MAP: &str = "LB_SOCK_AFFINITY4_V1";

/// Every map the agent pins, in the order they are created.
pub const ALL_MAPS: [&str; 17] = [
    FRONTENDS_MAP,
    SLOTS_MAP,
    BACKENDS_MAP,
    CONNTRACK_MAP,
    STATS_MAP,
    CONFIG_MAP,
    ICMP_BUCKET_MAP,
    FRAGMENTS_MAP,
    CLUSTER_IPS_MAP,
    SERVICE_TRAFFIC_MAP,
    EVENTS_MAP,
    AFFINITY_MAP,
    MAGLEV_MAP,
    NODE_ADDRS_MAP,
    SOURCE_RANGES_MAP,
    SOCK_REVNAT_MAP,
    SOCK_AFFINITY_MAP,
];

/// Maps of earlier layouts that an upgraded agent removes (their flows start over).
pub const LEGACY_MAPS: [&str; 13] = [
    "LB_FRONTENDS4_V1",
    // Without affinity and Maglev settings.
    "LB_FRONTENDS4_V2",
    // 262,144 backends and preallocated slots: too few for 100,000 Services x 10 endpoints.
    "LB_SLOTS_V1",
    "LB_BACKENDS_V1",
    "LB_CONNTRACK4_V1",
    "LB_STATS_V1",
    "LB_STATS_V2",
    "LB_CONFIG_V1",
    // Without the SNAT end of external flows, the counters of external traffic, the node's
    // address.
    "LB_CONNTRACK4_V2",
    "LB_STATS_V3",
    "LB_CONFIG_V2",
    // Without the next hops of external flows.
    "LB_CONNTRACK4_V3",
    // Without the counters of connect-time translation.
    "LB_STATS_V4",
];

pub const MAX_FRONTENDS: u32 = 131_072;
/// Slots are allocated as they are used (the map is not preallocated): a node pays for the
/// endpoints it has, not for this bound.
pub const MAX_SLOTS: u32 = 2_097_152;
/// 24 MiB of kernel memory (an array is preallocated): 100,000 Services x 10 endpoints fit.
pub const MAX_BACKENDS: u32 = 1_048_576;
pub const MAX_CONNTRACK: u32 = 262_144;
/// Service ids run from 1 to this (one per frontend, so never more than [`MAX_FRONTENDS`]):
/// they index [`SERVICE_TRAFFIC_MAP`].
pub const MAX_SERVICE_ID: u32 = MAX_FRONTENDS;
/// Clients with affinity to an endpoint at once (LRU: more evicts the longest idle).
pub const MAX_AFFINITY: u32 = 131_072;
/// Client ranges of all LoadBalancer frontends with source ranges together.
pub const MAX_SOURCE_RANGES: u32 = 65_536;
/// Sockets' (backend, Service) pairs remembered at once (LRU: more evicts the oldest).
pub const MAX_SOCK_REVNAT: u32 = 262_144;
/// Addresses of this node that answer on nodePorts.
pub const MAX_NODE_ADDRS: u32 = 64;
/// Datagrams being fragmented at once; more only evicts the oldest.
pub const MAX_FRAGMENTS: u32 = 8_192;

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Frontend scope: what clients in the cluster (pods, the node) get: at a ClusterIP the
/// endpoints `internalTrafficPolicy` allows, at an external address every endpoint.
pub const SCOPE_CLUSTER: u8 = 0;
/// Frontend scope: what clients outside the cluster get at an external address (nodePort,
/// LoadBalancer IP, externalIP) under `externalTrafficPolicy: Local`: this node's endpoints
/// only. Absent for the Cluster policy, where they get the [`SCOPE_CLUSTER`] entry.
pub const SCOPE_EXTERNAL: u8 = 1;
/// The address of a nodePort frontend: any of [`NODE_ADDRS_MAP`]'s addresses.
pub const NODE_PORT_ADDR: [u8; 4] = [0, 0, 0, 0];

/// Converts a host-order port to the network-order representation stored in maps.
#[inline(always)]
pub const fn net_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// Converts a network-order port from a map or packet to host order.
#[inline(always)]
pub const fn host_port(port: u16) -> u16 {
    u16::from_be_bytes(port.to_ne_bytes())
}

/// An IPv4 or IPv6 address as 16 bytes: IPv4 uses the first 4, the rest are zero.
pub type Addr = [u8; 16];

#[inline(always)]
pub const fn ipv4_addr(octets: [u8; 4]) -> Addr {
    [
        octets[0], octets[1], octets[2], octets[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]
}

#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FrontendKey {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: u16,
    pub protocol: u8,
    pub scope: u8,
}

#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Frontend {
    pub service_id: u32,
    /// Slots 0..backend_count take new flows; 0 means "no endpoint to send new flows to".
    pub backend_count: u32,
    /// Slots backend_count..backend_count + draining_count: backends that take no new flow
    /// but keep their established ones (not ready, or terminating).
    pub draining_count: u32,
    /// [`FRONTEND_AFFINITY`], [`FRONTEND_MAGLEV`].
    pub flags: u32,
    /// With [`FRONTEND_AFFINITY`]: how long a client keeps its endpoint after its last new
    /// flow (`sessionAffinityConfig.clientIP.timeoutSeconds`).
    pub affinity_timeout_s: u32,
    /// With [`FRONTEND_MAGLEV`]: the entries of the service id's table in [`MAGLEV_MAP`].
    pub maglev_table_size: u32,
}

/// New flows from a client go to the endpoint its earlier ones went to ([`AFFINITY_MAP`]).
pub const FRONTEND_AFFINITY: u32 = 1;
/// New flows pick their endpoint from the Maglev table, not at random.
pub const FRONTEND_MAGLEV: u32 = 2;
/// Only clients in the frontend's [`SOURCE_RANGES_MAP`] ranges may open flows
/// (`loadBalancerSourceRanges`); others are dropped.
pub const FRONTEND_SOURCE_RANGES: u32 = 4;

/// The data of a [`SOURCE_RANGES_MAP`] key: a service id and a client address.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SourceRange {
    /// Network byte order, so that the trie compares it first, whole.
    pub service_id: u32,
    pub addr: [u8; 4],
}

#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// The backend takes new flows and keeps its tracked ones.
pub const BACKEND_ACTIVE: u8 = 1;
/// The backend takes no new flow but keeps its tracked ones (not ready, or terminating).
pub const BACKEND_DRAINING: u8 = 2;

#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    /// [`BACKEND_ACTIVE`] or [`BACKEND_DRAINING`] while the backend is in its service's
    /// endpoint set; 0 for a free id.
    pub state: u8,
    /// The service this backend belongs to; a conntrack entry is only valid for the same one.
    pub service_id: u32,
}

#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub protocol: u8,
    // Two fields, not [u8; 3]: a 3-byte array is zeroed by a call to memset in BPF code.
    pub _pad1: u8,
    pub _pad2: u16,
}

impl CtKey {
    /// The key of a packet going the other way between the same ends.
    #[inline(always)]
    pub fn reversed(&self) -> CtKey {
        CtKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            protocol: self.protocol,
            _pad1: 0,
            _pad2: 0,
        }
    }
}

/// The flow was sent to a service address: rewrite the destination to the backend.
pub const CT_FORWARD: u8 = 1;
/// The flow is a backend's reply: rewrite the source back to the service address (and, for a
/// hairpin flow, the destination back to the client).
pub const CT_REPLY: u8 = 2;

/// [`CtEntry::flags`]: the flow came from outside the cluster to an external frontend. Its
/// replies are translated where they enter the node (a local endpoint's link, or the uplink
/// after SNAT) and sent straight out by a FIB lookup: their new source is one of the node's
/// own addresses, which the kernel would not forward.
pub const CT_EXTERNAL: u8 = 1;
/// [`CtEntry::flags`]: the flow's source is translated too ([`CtEntry::peer_addr`]): it went
/// on to another node's endpoint from this node's address, so the replies come back here.
pub const CT_SNAT: u8 = 2;
/// The entry holds its direction's next hop from a FIB lookup, forgotten whenever the entry
/// is written again (at most [`conntrack::REFRESH_NS`] apart while packets flow), so that
/// a route or neighbour change is seen within that time.
pub const CT_ROUTE: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtEntry {
    /// Forward: the backend address. Reply: the service address.
    pub nat_addr: [u8; 4],
    /// Network byte order. Forward: backend port. Reply: service port.
    pub nat_port: u16,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub kind: u8,
    /// What the flow has shown: [`conntrack::SEEN_NON_SYN`], [`conntrack::CLOSING`] bits.
    pub state: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// When a packet of the flow (either direction) was last seen, by the datapath's clock
    /// ([`Config::clock_ns`]), refreshed at most every [`conntrack::REFRESH_NS`].
    pub last_seen_ns: u64,
    /// With [`CT_SNAT`]. Forward: the source the packet gets (this node). Reply: the
    /// destination it gets (the client).
    pub peer_addr: [u8; 4],
    /// Network byte order; with [`CT_SNAT`], the port that goes with `peer_addr`.
    pub peer_port: u16,
    /// [`CT_EXTERNAL`], [`CT_SNAT`], [`CT_ROUTE`].
    pub flags: u8,
    pub _pad: u8,
    /// With [`CT_ROUTE`]: the link the flow's packets (this direction) leave by, when the
    /// datapath sends them itself (external flows: XDP_TX, bpf_redirect).
    pub route_ifindex: u32,
    /// With [`CT_ROUTE`]: the Ethernet header's 12 address bytes for them, the next hop's
    /// then the link's own, as in the header (in words: the datapath copies them whole).
    pub route_macs: [u32; 3],
}

#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityKey {
    pub service_id: u32,
    pub client: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Affinity {
    pub backend_id: u32,
    pub _pad: u32,
    /// The client's last new flow to the Service port, by the datapath's clock.
    pub last_used_ns: u64,
}

/// A socket and the backend it was sent to in place of a Service ([`SOCK_REVNAT_MAP`]).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockRevKey {
    /// The kernel's socket cookie (bpf_get_socket_cookie).
    pub cookie: u64,
    pub backend_addr: [u8; 4],
    pub backend_port: u16,
    pub _pad: u16,
}

/// The Service address and port a socket called, and the backend it got.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockService {
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
}

/// A client translated at connect() under ClientIP affinity ([`SOCK_AFFINITY_MAP`]).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockAffinityKey {
    pub service_id: u32,
    pub _pad: u32,
    /// The kernel's cookie of the socket's network namespace (bpf_get_netns_cookie).
    pub netns_cookie: u64,
}

/// A fragmented IPv4 datagram as it arrives: addresses, IP identification, protocol.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// As on the wire.
    pub id: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// The ports of a fragmented datagram, from its first fragment, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AllocationKey {
    pub addr: [u8; 4],
}

/// Longest `namespace/name` a [`ServiceName`] holds (Kubernetes: 63 + 1 + 63).
pub const SERVICE_NAME_LEN: usize = 128;

/// `namespace/name` in UTF-8, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceName {
    pub bytes: [u8; SERVICE_NAME_LEN],
}

/// Datapath settings the agent writes at load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Config {
    /// Idle timeout of a TCP flow that has shown a packet without SYN.
    pub tcp_established_ns: u64,
    /// Idle timeout of a TCP flow that has shown SYNs only.
    pub tcp_syn_ns: u64,
    /// Idle timeout of a TCP flow after FIN or RST.
    pub tcp_closing_ns: u64,
    pub udp_ns: u64,
    /// ICMP replies for Services without endpoints, per second and CPU (also the burst).
    pub icmp_replies_per_sec: u64,
    /// Length of the kernel's tick (1 s / CONFIG_HZ), measured by the agent.
    pub tick_ns: u64,
    /// The kernel's tick count at boot (INITIAL_JIFFIES, 2^32 - 300 s of ticks).
    pub tick_base: u64,
    /// The source that flows sent on to another node's endpoint get, where the client did
    /// not call one of the node's addresses (a LoadBalancer IP or externalIP): the first
    /// address of the first external interface. All zero: no such address, those drop.
    pub snat_addr: [u8; 4],
    pub _pad: u32,
}

impl Config {
    pub const DEFAULT: Config = Config {
        tcp_established_ns: 6 * 3600 * 1_000_000_000,
        tcp_syn_ns: 60 * 1_000_000_000,
        tcp_closing_ns: 10 * 1_000_000_000,
        udp_ns: 60 * 1_000_000_000,
        icmp_replies_per_sec: 1000,
        tick_ns: 1_000_000_000 / Self::DEFAULT_HZ,
        tick_base: Self::initial_ticks(Self::DEFAULT_HZ),
        snat_addr: [0; 4],
        _pad: 0,
    };
    /// The tick rate assumed until the agent has measured it.
    pub const DEFAULT_HZ: u64 = 250;

    /// What the tick counter (jiffies) holds at boot with `hz` ticks a second.
    pub const fn initial_ticks(hz: u64) -> u64 {
        (1 << 32) - 300 * hz
    }

    /// The datapath's clock, ns since boot to a tick, from the tick counter: the counter is
    /// read without a helper call (the verifier inlines bpf_jiffies64), where
    /// bpf_ktime_get_coarse_ns is a call into the kernel on every tracked packet. It tracks
    /// CLOCK_MONOTONIC_COARSE to within a few ticks, so entries written with that clock by an
    /// earlier agent age correctly.
    #[inline(always)]
    pub fn clock_ns(&self, ticks: u64) -> u64 {
        ticks
            .wrapping_sub(self.tick_base)
            .wrapping_mul(self.tick_ns)
    }
}

/// Traffic of one Service port on one CPU: "in" is what clients sent to the Service, "out" the
/// backends' replies. Bytes are whole frames as the program sees them (Ethernet header
/// included), as `ip -s link` counts them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceTraffic {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
}

/// No datapath events (the default).
pub const EVENTS_OFF: u32 = 0;
/// An event for every dropped packet, with its reason.
pub const EVENTS_DROPS: u32 = 1;
/// Drops, and the backend chosen for every new flow.
pub const EVENTS_FLOWS: u32 = 2;

/// A per-CPU token bucket: `tokens` left at `updated_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TokenBucket {
    pub tokens: u64,
    pub updated_ns: u64,
}

const _: () = {
    assert!(core::mem::size_of::<FrontendKey>() == 8);
    assert!(core::mem::size_of::<Frontend>() == 24);
    assert!(core::mem::size_of::<AffinityKey>() == 8);
    assert!(core::mem::size_of::<Affinity>() == 16);
    assert!(core::mem::size_of::<SockRevKey>() == 16);
    assert!(core::mem::size_of::<SockService>() == 16);
    assert!(core::mem::size_of::<SockAffinityKey>() == 16);
    assert!(core::mem::size_of::<SlotKey>() == 8);
    assert!(core::mem::size_of::<SourceRange>() == 8);
    assert!(core::mem::size_of::<Backend>() == 24);
    assert!(core::mem::size_of::<CtKey>() == 16);
    assert!(core::mem::size_of::<CtEntry>() == 48);
    assert!(core::mem::size_of::<Config>() == 64);
    assert!(core::mem::size_of::<TokenBucket>() == 16);
    assert!(core::mem::size_of::<ServiceTraffic>() == 32);
    assert!(core::mem::size_of::<FragKey>() == 12);
    assert!(core::mem::size_of::<FragPorts>() == 4);
    assert!(core::mem::size_of::<AllocationKey>() == 4);
    assert!(core::mem::size_of::<ServiceName>() == SERVICE_NAME_LEN);
};

#[cfg(feature = "user")]
mod user_pod {
    // SAFETY: every type is #[repr(C)] with explicit padding and only integer fields.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::Frontend {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::TokenBucket {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragPorts {}
    unsafe impl aya::Pod for super::AllocationKey {}
    unsafe impl aya::Pod for super::ServiceName {}
    unsafe impl aya::Pod for super::ServiceTraffic {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::Affinity {}
    unsafe impl aya::Pod for super::SockRevKey {}
    unsafe impl aya::Pod for super::SockService {}
    unsafe impl aya::Pod for super::SockAffinityKey {}
    unsafe impl aya::Pod for super::SourceRange {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_round_trip_is_big_endian_on_the_wire() {
        let p = net_port(8080);
        assert_eq!(p.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(host_port(p), 8080);
    }

    #[test]
    fn ipv4_addr_fills_first_four_bytes() {
        let a = ipv4_addr([198, 18, 0, 1]);
        assert_eq!(&a[..4], &[198, 18, 0, 1]);
        assert!(a[4..].iter().all(|b| *b == 0));
    }
}
