//! Per-CPU packet counters: every verdict of the datapath has one, so no packet goes uncounted.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not IPv4 (IPv6, ARP, VLAN-tagged, ...): passed unchanged.
    PassNotIpv4 = 0,
    /// IPv4 but neither TCP nor UDP: passed unchanged.
    PassNotTcpUdp = 1,
    /// TCP/UDP not addressed to a service and not a reply of a tracked flow.
    PassNoService = 2,
    /// Frame too short for the headers it claims: passed unchanged.
    PassTruncated = 3,
    /// IPv4 header with options (IHL > 5): passed unchanged.
    PassIpOptions = 4,
    /// Non-first fragment of no translated datagram (or ahead of its first fragment): passed
    /// unchanged.
    PassFragment = 5,
    /// New flow to a service: backend chosen, destination rewritten.
    DnatNew = 6,
    /// Packet of a tracked flow: destination rewritten to its backend.
    DnatEstablished = 7,
    /// Reply from a backend: source rewritten to the service address, on its way to the client.
    ReverseNat = 8,
    /// Service without endpoints: answered with ICMP port unreachable.
    IcmpNoEndpoints = 9,
    /// A map update or packet rewrite helper failed: packet dropped.
    DropRewriteFailed = 10,
    /// The service's slot table pointed at a missing or inactive backend: packet dropped.
    DropNoBackend = 11,
    /// Conntrack insert failed (e.g. map full): packet dropped.
    DropConntrackFull = 12,
    /// Service without endpoints, over the ICMP reply rate: packet dropped unanswered.
    DropIcmpRateLimited = 13,
    /// Reply of a tracked flow where it enters the node: passed, translated on its way out to
    /// the client (after the node's own MTU check, so PMTU discovery sees the backend).
    PassReply = 14,
    /// ICMP error quoting a translated flow: quoted and outer headers translated.
    IcmpErrorTranslated = 15,
    /// ICMP error (destination unreachable, time exceeded) about no tracked flow: passed.
    PassIcmpError = 16,
    /// A pod's flow to its own Service's address picked the pod itself: both addresses
    /// rewritten and sent back to it (counted in addition to the DNAT/reverse NAT counter).
    Hairpin = 17,
    /// A client outside the cluster called an external address under
    /// `externalTrafficPolicy: Local` on a node without endpoints of the Service: dropped.
    DropNoLocalEndpoint = 18,
    /// A new flow from outside the cluster sent on to another node's endpoint: its source
    /// translated to this node's address (counted in addition to `dnat_new`).
    SnatNew = 19,
    /// No free source port on this node's address for a new flow to another node's endpoint
    /// (or no address to translate to): dropped.
    DropSnatExhausted = 20,
    /// A packet of a flow from outside the cluster sent straight out by a FIB lookup (after
    /// SNAT, or a reply whose new source is this node's address).
    FibRedirect = 21,
    /// A packet to send out by FIB lookup to a destination without a route: dropped.
    DropNoRoute = 22,
    /// A client outside a LoadBalancer Service's `loadBalancerSourceRanges`: dropped.
    DropSourceRange = 23,
    /// XDP left a packet it would translate to the TC program behind it (a hairpin, a
    /// Service without endpoints to answer, a next hop whose address is not resolved yet).
    XdpToTc = 24,
    /// A connect() to a Service rewritten to a backend (a socket in `--cgroup`): its packets
    /// go to the backend's address and need no translation on the way.
    SockConnect = 25,
    /// An unconnected UDP datagram to a Service sent to a backend (sendmsg in `--cgroup`).
    SockSendmsg = 26,
    /// A connect() or datagram to a Service without endpoints: refused with ECONNREFUSED.
    SockNoEndpoints = 27,
    /// A backend's address shown as its Service's to a socket (recvmsg, getpeername).
    SockReverseNat = 28,
}

pub const COUNTER_COUNT: u32 = 29;

pub const COUNTER_NAMES: [&str; COUNTER_COUNT as usize] = [
    "pass_not_ipv4",
    "pass_not_tcp_udp",
    "pass_no_service",
    "pass_truncated",
    "pass_ip_options",
    "pass_fragment",
    "dnat_new",
    "dnat_established",
    "reverse_nat",
    "icmp_no_endpoints",
    "drop_rewrite_failed",
    "drop_no_backend",
    "drop_conntrack_full",
    "drop_icmp_rate_limited",
    "pass_reply",
    "icmp_error_translated",
    "pass_icmp_error",
    "hairpin",
    "drop_no_local_endpoint",
    "snat_new",
    "drop_snat_exhausted",
    "fib_redirect",
    "drop_no_route",
    "drop_source_range",
    "xdp_to_tc",
    "sock_connect",
    "sock_sendmsg",
    "sock_no_endpoints",
    "sock_reverse_nat",
];
