//! The datapath's maps. Layouts, names and capacities come from lb-common.
use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    Affinity, AffinityKey, AllocationKey, Backend, Config, CtEntry, CtKey, EVENTS_OFF, FragKey,
    FragPorts, Frontend, FrontendKey, MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_FRAGMENTS,
    MAX_FRONTENDS, MAX_NODE_ADDRS, MAX_SERVICE_ID, MAX_SLOTS, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES,
    ServiceName, ServiceTraffic, SlotKey, SockAffinityKey, SockRevKey, SockService, SourceRange,
    TokenBucket, maglev::DEFAULT_TABLE_SIZE, stats::COUNTER_COUNT,
};

/// IPv4 (service address, port, protocol) -> service id, backend counts, selection settings.
#[btf_map]
pub static LB_FRONTENDS4_V3: HashMap<FrontendKey, Frontend, { MAX_FRONTENDS as usize }> =
    HashMap::new();

/// (service id, client address) -> the client's endpoint under ClientIP affinity.
#[btf_map]
pub static LB_AFFINITY4_V1: LruHashMap<AffinityKey, Affinity, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// (service id, network namespace cookie) -> the endpoint of a client translated at connect()
/// under ClientIP affinity.
#[btf_map]
pub static LB_SOCK_AFFINITY4_V1: LruHashMap<SockAffinityKey, Affinity, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// (socket cookie, backend address and port) -> the Service address the socket called.
#[btf_map]
pub static LB_SOCK_REVNAT4_V1: LruHashMap<SockRevKey, SockService, { MAX_SOCK_REVNAT as usize }> =
    LruHashMap::new();

/// A Maglev table: entry -> backend id. BPF_F_INNER_MAP lets the agent create tables of any
/// size (the one here is only the template the outer map is checked against).
pub type MaglevTable = Array<u32, { DEFAULT_TABLE_SIZE as usize }, { BPF_F_INNER_MAP as usize }>;

/// Service id -> its Maglev table, replaced whole by the agent.
#[btf_map]
pub static LB_MAGLEV_V1: HashOfMaps<
    u32,
    MaglevTable,
    { MAX_FRONTENDS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashOfMaps::new();

/// (service id, slot) -> backend id.
#[btf_map]
pub static LB_SLOTS_V2: HashMap<
    SlotKey,
    u32,
    { MAX_SLOTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Backend id -> backend address and port. An array: its lookups are inlined by the kernel.
#[btf_map]
pub static LB_BACKENDS_V2: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// IPv4 flow as seen on the wire -> NAT to apply (forward DNAT or reply reverse NAT), TCP
/// state and last-seen time.
#[btf_map]
pub static LB_CONNTRACK4_V4: LruHashMap<CtKey, CtEntry, { MAX_CONNTRACK as usize }> =
    LruHashMap::new();

/// Counter index -> per-CPU packet count.
#[btf_map]
pub static LB_STATS_V5: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

/// 0 -> timeouts, rates and the clock's tick, written by the agent at load.
#[btf_map]
pub static LB_CONFIG_V3: Array<Config, 1> = Array::new();

/// 0 -> per-CPU token bucket of ICMP replies for Services without endpoints.
#[btf_map]
pub static LB_ICMP_BUCKET_V1: PerCpuArray<TokenBucket, 1> = PerCpuArray::new();

/// Fragmented datagram (addresses, IP id, protocol) -> ports from its first fragment.
#[btf_map]
pub static LB_IPFRAG4_V1: LruHashMap<FragKey, FragPorts, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// ClusterIP -> the Service holding it. The agent's record, pinned with the datapath's state
/// (no program reads it); defined here so that it is created with BTF like the others.
#[btf_map]
pub static LB_CLUSTERIPS_V1: HashMap<AllocationKey, ServiceName, { MAX_FRONTENDS as usize }> =
    HashMap::new();

/// Service id -> per-CPU packets and bytes of the Service port, both ways.
#[btf_map]
pub static LB_SERVICE_TRAFFIC_V1: PerCpuArray<ServiceTraffic, { MAX_SERVICE_ID as usize + 1 }> =
    PerCpuArray::new();

/// (service id, client prefix) -> 1: who may open flows to a LoadBalancer address with
/// source ranges.
#[btf_map]
pub static LB_SRCRANGES4_V1: LpmTrie<SourceRange, u32, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// This node's address -> 1: the addresses nodePorts answer on.
#[btf_map]
pub static LB_NODEADDRS4_V1: HashMap<AllocationKey, u32, { MAX_NODE_ADDRS as usize }> =
    HashMap::new();

/// 0 -> which datapath events to send (off, drops, new flows too).
#[btf_map]
pub static LB_EVENTS_V1: Array<u32, 1> = Array::new();

/// The events the agent asked for.
#[inline(always)]
pub fn events_level() -> u32 {
    LB_EVENTS_V1.get(0).copied().unwrap_or(EVENTS_OFF)
}

/// Adds a translated packet of `len` bytes to its Service port's traffic: `inbound` from a
/// client, otherwise a backend's reply.
#[inline(always)]
pub fn count_traffic(service_id: u32, inbound: bool, len: u64) {
    if let Some(t) = LB_SERVICE_TRAFFIC_V1.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe {
            if inbound {
                (*t).packets_in += 1;
                (*t).bytes_in += len;
            } else {
                (*t).packets_out += 1;
                (*t).bytes_out += len;
            }
        }
    }
}

/// The agent's settings (the defaults until it has written them).
#[inline(always)]
pub fn config() -> Config {
    LB_CONFIG_V3.get(0).copied().unwrap_or(Config::DEFAULT)
}

#[inline(always)]
pub fn count(counter: lb_common::stats::Counter) {
    if let Some(c) = LB_STATS_V5.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *c += 1 };
    }
}
