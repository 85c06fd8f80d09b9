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
    /// Fragment: passed unchanged (no L4 header to translate).
    PassFragment = 5,
    /// New flow to a service: backend chosen, destination rewritten.
    DnatNew = 6,
    /// Packet of a tracked flow: destination rewritten to its backend.
    DnatEstablished = 7,
    /// Reply from a backend: source rewritten to the service address.
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
}

pub const COUNTER_COUNT: u32 = 14;

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
];
