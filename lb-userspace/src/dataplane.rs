//! The only code that writes BPF maps; also loads, pins and attaches the programs.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ffi::CStr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, HashOfMaps, LpmTrie, MapData, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        links::{FdLink, LinkOrder},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
};
use ipnet::Ipv4Net;
use lb_common::{
    AFFINITY_MAP, ALL_MAPS, Affinity, AffinityKey, AllocationKey, BACKENDS_MAP, Backend,
    CLUSTER_IPS_MAP, CONFIG_MAP, CONNTRACK_MAP, Config, CtEntry, CtKey, EVENTS_MAP, FRONTENDS_MAP,
    Frontend, FrontendKey, LEGACY_MAPS, MAGLEV_MAP, NODE_ADDRS_MAP, SERVICE_NAME_LEN,
    SERVICE_TRAFFIC_MAP, SLOTS_MAP, SOCK_AFFINITY_MAP, SOCK_REVNAT_MAP, SOURCE_RANGES_MAP,
    STATS_MAP, ServiceName, ServiceTraffic, SlotKey, SockAffinityKey, SockRevKey, SockService,
    SourceRange, affinity, conntrack, stats::COUNTER_COUNT,
};

use crate::{
    batch,
    diff::{ActualDataplane, MaglevTable, MapOp, UNKNOWN_TABLE},
    events::{EventsLevel, EventsSwitch},
};

/// The eBPF object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

pub const TC_INGRESS_PROGRAM: &str = "lb_tc_ingress";
pub const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";
pub const TC_EXTERNAL_PROGRAM: &str = "lb_tc_external";
pub const XDP_PROGRAM: &str = "lb_xdp_external";
pub const XDP_FLOOR_PROGRAM: &str = "lb_xdp_floor";

mod socket_lb;
mod xdp;
pub use socket_lb::{SOCK_PROGRAMS, cgroup2_root, is_cgroup2_dir};
pub use xdp::{XdpAttachment, XdpMode};
pub const TC_FLOOR_PROGRAM: &str = "lb_tc_floor";
/// Parse and one conntrack lookup: what benchmarks express the other paths' costs in.
pub const TC_REFERENCE_PROGRAM: &str = "lb_tc_reference";
/// Reads the kernel's tick counter, run with BPF_PROG_TEST_RUN (never attached).
pub const TC_CLOCK_PROGRAM: &str = "lb_tc_clock";
const LINKS_DIR: &str = "links";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// An inner map whose size may differ from the outer map's template (uapi bpf.h, 5.10).
const BPF_F_INNER_MAP: u32 = 1 << 12;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("bpffs at {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {name}: batch write: {source}")]
    Batch {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("attaching to {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// How the TC programs are attached: `--tc-attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX where the kernel has it (6.6 and later), else the clsact qdisc.
    Auto,
    /// TCX links, pinned with the maps.
    Tcx,
    /// cls_bpf filters on the clsact qdisc, through netlink (kernels before 6.6).
    Legacy,
}

impl TcAttach {
    /// TCX or legacy for this kernel.
    fn resolve(self) -> TcAttach {
        match self {
            TcAttach::Auto => {
                let tcx = aya::util::KernelVersion::current()
                    .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
                if tcx { TcAttach::Tcx } else { TcAttach::Legacy }
            }
            other => other,
        }
    }
}

/// The clsact filter the legacy path owns on every hook: replaced in place by a restarted
/// agent, so no packet ever passes without a program.
const LEGACY_PRIORITY: u16 = 1;
const LEGACY_HANDLE: TcHandle = TcHandle::new(0, 0x1b);

pub struct Dataplane {
    ebpf: Ebpf,
    /// TCX or legacy, resolved for this kernel.
    tc_attach: TcAttach,
    /// As written to the config map, the clock's tick included.
    config: Config,
    bpffs: Option<PathBuf>,
    /// Hooks this process attached to: (ifindex, hook) -> interface name.
    attached: HashMap<(u32, Hook), String>,
    /// `--xdp-mode`, for the external links attached from now on.
    xdp_mode: XdpMode,
    /// External links this process put XDP on: ifindex -> (interface, mode it runs in).
    xdp_attached: BTreeMap<u32, (String, &'static str)>,
    /// The cgroup the socket programs are attached to.
    socket_lb: Option<PathBuf>,
}

/// Where on a link a program sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// Packets entering the node: [`TC_INGRESS_PROGRAM`] (forward direction).
    Ingress,
    /// Packets leaving toward a pod: [`TC_EGRESS_PROGRAM`] (reply direction).
    Egress,
    /// Packets entering the node from other nodes and the outside: [`TC_EXTERNAL_PROGRAM`]
    /// (external frontends, and the replies of flows sent on to other nodes).
    External,
}

impl Hook {
    const ALL: [Hook; 3] = [Hook::Ingress, Hook::Egress, Hook::External];

    fn program(self) -> &'static str {
        match self {
            Hook::Ingress => TC_INGRESS_PROGRAM,
            Hook::Egress => TC_EGRESS_PROGRAM,
            Hook::External => TC_EXTERNAL_PROGRAM,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Ingress | Hook::External => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }

    /// Whether both attach at the same place of a link (one replaces the other there).
    fn same_place(self, other: Hook) -> bool {
        (self == Hook::Egress) == (other == Hook::Egress)
    }

    fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Ingress => "tc-ingress-",
            Hook::Egress => "tc-egress-",
            Hook::External => "tc-external-",
        }
    }
}

/// Which links get which programs: pod links ingress and egress (their pods are clients and
/// backends), external links the external ingress program (what arrives there is routed on
/// to a pod link or the node, or is a reply to translate and send back out).
#[derive(Clone, Debug, Default)]
pub struct LinkPatterns {
    pub pod: Vec<glob::Pattern>,
    pub external: Vec<glob::Pattern>,
}

/// What one scan of the links attached.
#[derive(Default)]
pub struct Attached {
    pub tc: Vec<(String, Hook)>,
    /// External links, with the XDP mode each got.
    pub xdp: Vec<(String, XdpAttachment)>,
}

impl LinkPatterns {
    fn is_external(&self, name: &str) -> bool {
        self.external.iter().any(|p| p.matches(name))
    }

    fn hooks(&self, name: &str) -> impl Iterator<Item = Hook> {
        let pod = self.pod.iter().any(|p| p.matches(name));
        let external = self.external.iter().any(|p| p.matches(name));
        [
            (Hook::Ingress, pod && !external),
            (Hook::External, external),
            (Hook::Egress, pod),
        ]
        .into_iter()
        .filter_map(|(hook, wanted)| wanted.then_some(hook))
    }
}

/// An attach failure on `iface`, from whatever error the attach step gave.
fn attach_error(iface: &str) -> impl Fn(&dyn std::fmt::Display) -> DataplaneError + '_ {
    move |e| DataplaneError::Attach {
        iface: iface.to_string(),
        message: e.to_string(),
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl Dataplane {
    /// Loads the programs with maps pinned under `bpffs`, reusing maps already pinned there
    /// (so flows tracked by a previous agent keep their backend), and writes `config`.
    pub fn load_pinned(bpffs: &Path, config: Config) -> Result<Self> {
        ensure_bpffs(bpffs)?;
        std::fs::create_dir_all(bpffs.join(LINKS_DIR))?;
        for name in LEGACY_MAPS {
            let path = bpffs.join(name);
            if path.exists() {
                std::fs::remove_file(path)?;
            }
        }
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|n| (*n, bpffs.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(EBPF_OBJECT)?;
        let mut dp = Self {
            ebpf,
            tc_attach: TcAttach::Auto.resolve(),
            config,
            bpffs: Some(bpffs.to_path_buf()),
            attached: HashMap::new(),
            xdp_mode: XdpMode::default(),
            xdp_attached: BTreeMap::new(),
            socket_lb: None,
        };
        dp.load_program(TC_CLOCK_PROGRAM)?;
        dp.set_config(config)?;
        dp.load_program(TC_INGRESS_PROGRAM)?;
        dp.load_program(TC_EGRESS_PROGRAM)?;
        dp.load_program(TC_EXTERNAL_PROGRAM)?;
        dp.load_xdp(XDP_PROGRAM)?;
        Ok(dp)
    }

    /// Loads the programs with fresh, unpinned maps and the default settings (tests and
    /// benchmarks).
    pub fn load_unpinned() -> Result<Self> {
        let ebpf = EbpfLoader::new().load(EBPF_OBJECT)?;
        let mut dp = Self {
            ebpf,
            tc_attach: TcAttach::Auto.resolve(),
            config: Config::DEFAULT,
            bpffs: None,
            attached: HashMap::new(),
            xdp_mode: XdpMode::default(),
            xdp_attached: BTreeMap::new(),
            socket_lb: None,
        };
        dp.load_program(TC_CLOCK_PROGRAM)?;
        dp.set_config(Config::DEFAULT)?;
        dp.load_program(TC_INGRESS_PROGRAM)?;
        dp.load_program(TC_EGRESS_PROGRAM)?;
        dp.load_program(TC_EXTERNAL_PROGRAM)?;
        dp.load_xdp(XDP_PROGRAM)?;
        dp.load_xdp(XDP_FLOOR_PROGRAM)?;
        dp.load_program(TC_FLOOR_PROGRAM)?;
        dp.load_program(TC_REFERENCE_PROGRAM)?;
        Ok(dp)
    }

    /// Writes the datapath's settings (timeouts, rates); they apply from the next packet. The
    /// clock's tick is this kernel's, whatever `config` says.
    pub fn set_config(&mut self, config: Config) -> Result<()> {
        let hz = self.tick_rate()?;
        let config = Config {
            tick_ns: 1_000_000_000 / hz,
            tick_base: Config::initial_ticks(hz),
            ..config
        };
        let mut map: Array<_, Config> =
            Array::try_from(self.map_mut(CONFIG_MAP)?).map_err(map_err(CONFIG_MAP))?;
        map.set(0, config, 0).map_err(map_err(CONFIG_MAP))?;
        self.config = config;
        Ok(())
    }

    /// The node's addresses that nodePorts answer on; the first is also the source of flows
    /// sent on to other nodes from a LoadBalancer IP or externalIP.
    pub fn set_node_addresses(&mut self, addresses: &[std::net::Ipv4Addr]) -> Result<()> {
        let mut map: BpfHashMap<_, AllocationKey, u32> =
            BpfHashMap::try_from(self.map_mut(NODE_ADDRS_MAP)?).map_err(map_err(NODE_ADDRS_MAP))?;
        let wanted: Vec<AllocationKey> = addresses
            .iter()
            .map(|a| AllocationKey { addr: a.octets() })
            .collect();
        let present: Vec<AllocationKey> = map.keys().filter_map(|k| k.ok()).collect();
        for key in present.iter().filter(|k| !wanted.contains(k)) {
            map.remove(key).map_err(map_err(NODE_ADDRS_MAP))?;
        }
        for key in &wanted {
            map.insert(key, 1, 0).map_err(map_err(NODE_ADDRS_MAP))?;
        }
        let snat_addr = wanted.first().map_or([0; 4], |k| k.addr);
        self.set_config(Config {
            snat_addr,
            ..self.config
        })
    }

    /// The kernel's tick counter (jiffies), as the datapath reads it.
    pub fn ticks(&mut self) -> Result<u64> {
        let mut out = [0u8; 64];
        let program = self.classifier(TC_CLOCK_PROGRAM)?;
        let options = TestRunOptions {
            data_in: Some(&[0u8; 64]),
            data_out: Some(&mut out),
            ..Default::default()
        };
        program
            .test_run(options)
            .map_err(|source| DataplaneError::Program {
                name: TC_CLOCK_PROGRAM,
                source,
            })?;
        Ok(u64::from_ne_bytes(out[..8].try_into().expect("8 bytes")))
    }

    /// The datapath's clock now (conntrack times), as [`Config::clock_ns`] reads it.
    pub fn clock_ns(&mut self) -> Result<u64> {
        let ticks = self.ticks()?;
        Ok(self.config.clock_ns(ticks))
    }

    /// This kernel's tick rate, counted once per process over 100 ms.
    fn tick_rate(&mut self) -> Result<u64> {
        static RATE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        if let Some(rate) = RATE.get() {
            return Ok(*rate);
        }
        let start = std::time::Instant::now();
        let first = self.ticks()?;
        std::thread::sleep(std::time::Duration::from_millis(100));
        let last = self.ticks()?;
        let rate = crate::tick::nearest_rate(last.wrapping_sub(first), start.elapsed());
        Ok(*RATE.get_or_init(|| rate))
    }

    fn load_program(&mut self, name: &'static str) -> Result<()> {
        self.classifier(name)?
            .load()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    pub fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        self.program(name)
    }

    /// The object's program `name`, as its type (TC, XDP, cgroup socket).
    fn program<T>(&mut self, name: &'static str) -> Result<&mut T>
    where
        for<'a> &'a mut T:
            TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let program = self.ebpf.program_mut(name).ok_or(DataplaneError::Program {
            name,
            source: aya::programs::ProgramError::NotLoaded,
        })?;
        program
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))
    }

    /// Every ClusterIP recorded as held, with its holder's `namespace/name`.
    pub fn read_cluster_ips(&self) -> Result<Vec<(std::net::Ipv4Addr, String)>> {
        let entries =
            match batch::lookup_all::<AllocationKey, ServiceName>(self.map_fd(CLUSTER_IPS_MAP)?) {
                Ok(entries) => entries,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let map: BpfHashMap<_, AllocationKey, ServiceName> =
                        BpfHashMap::try_from(self.map(CLUSTER_IPS_MAP)?)
                            .map_err(map_err(CLUSTER_IPS_MAP))?;
                    map.iter().filter_map(|e| e.ok()).collect()
                }
                Err(source) => {
                    return Err(DataplaneError::Batch {
                        name: CLUSTER_IPS_MAP,
                        source,
                    });
                }
            };
        Ok(entries
            .into_iter()
            .map(|(k, v)| {
                let end = v
                    .bytes
                    .iter()
                    .position(|b| *b == 0)
                    .unwrap_or(v.bytes.len());
                let holder = String::from_utf8_lossy(&v.bytes[..end]).into_owned();
                (std::net::Ipv4Addr::from(k.addr), holder)
            })
            .collect())
    }

    /// Records (`Some`) or forgets (`None`) which Service holds `ip`.
    pub fn set_cluster_ip(&mut self, ip: std::net::Ipv4Addr, holder: Option<&str>) -> Result<()> {
        let mut map: BpfHashMap<_, AllocationKey, ServiceName> =
            BpfHashMap::try_from(self.map_mut(CLUSTER_IPS_MAP)?)
                .map_err(map_err(CLUSTER_IPS_MAP))?;
        let key = AllocationKey { addr: ip.octets() };
        match holder {
            Some(name) => map
                .insert(key, service_name(name), 0)
                .map_err(map_err(CLUSTER_IPS_MAP)),
            None => ignore_missing(map.remove(&key)).map_err(map_err(CLUSTER_IPS_MAP)),
        }
    }

    /// Records the holders of many addresses at once (a full sync's); false where this
    /// kernel has no batch operations, for the caller to record them one by one.
    pub fn record_cluster_ips(&mut self, holders: &[(std::net::Ipv4Addr, &str)]) -> Result<bool> {
        let entries: Vec<(AllocationKey, ServiceName)> = holders
            .iter()
            .map(|(ip, name)| (AllocationKey { addr: ip.octets() }, service_name(name)))
            .collect();
        match batch::update(self.map_fd(CLUSTER_IPS_MAP)?, &entries) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(source) => Err(DataplaneError::Batch {
                name: CLUSTER_IPS_MAP,
                source,
            }),
        }
    }

    /// Reads the service maps back (on start, and for a full resync): in batches, the whole
    /// backend array included, in a few system calls.
    pub fn read_actual(&self) -> Result<ActualDataplane> {
        let read = |name: &'static str| move |source| DataplaneError::Batch { name, source };
        let actual = ActualDataplane {
            frontends: batch::lookup_all::<FrontendKey, Frontend>(self.map_fd(FRONTENDS_MAP)?)
                .map_err(read(FRONTENDS_MAP))?
                .into_iter()
                .collect(),
            slots: batch::lookup_all::<SlotKey, u32>(self.map_fd(SLOTS_MAP)?)
                .map_err(read(SLOTS_MAP))?
                .into_iter()
                .collect(),
            backends: batch::lookup_all::<u32, Backend>(self.map_fd(BACKENDS_MAP)?)
                .map_err(read(BACKENDS_MAP))?
                .into_iter()
                .filter(|(_, b)| b.state != 0)
                .collect(),
            maglev: batch::lookup_all::<u32, u32>(self.map_fd(MAGLEV_MAP)?)
                .map_err(read(MAGLEV_MAP))?
                .into_iter()
                .map(|(service_id, _)| (service_id, UNKNOWN_TABLE))
                .collect(),
            source_ranges: self.read_source_ranges()?.into_iter().collect(),
        };
        Ok(actual)
    }

    /// Service id -> client ranges, as the LPM trie holds them (walked key by key: tries have
    /// no batch lookup).
    fn read_source_ranges(&self) -> Result<HashMap<u32, BTreeSet<Ipv4Net>>> {
        let trie: LpmTrie<_, SourceRange, u32> =
            LpmTrie::try_from(self.map(SOURCE_RANGES_MAP)?).map_err(map_err(SOURCE_RANGES_MAP))?;
        let mut ranges: HashMap<u32, BTreeSet<Ipv4Net>> = HashMap::new();
        for key in trie.keys() {
            let key = key.map_err(map_err(SOURCE_RANGES_MAP))?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32).min(32) as u8;
            let net = Ipv4Net::new(data.addr.into(), prefix).expect("prefix within 32");
            ranges
                .entry(u32::from_be(data.service_id))
                .or_default()
                .insert(net);
        }
        Ok(ranges)
    }

    fn source_ranges(&mut self) -> Result<LpmTrie<&mut MapData, SourceRange, u32>> {
        LpmTrie::try_from(self.map_mut(SOURCE_RANGES_MAP)?).map_err(map_err(SOURCE_RANGES_MAP))
    }

    /// Writes `ops` in order, each run of writes into one map as one batch (a few system calls
    /// for a whole sync). Stops at the first failure; the caller then resyncs from the maps.
    pub fn write(&mut self, ops: &[MapOp]) -> Result<()> {
        let mut rest = ops;
        while let Some(first) = rest.first() {
            if let MapOp::PutMaglev(..) | MapOp::DeleteMaglev(_) = first {
                let puts: Vec<(u32, &MaglevTable)> = rest
                    .iter()
                    .map_while(|o| match o {
                        MapOp::PutMaglev(id, table) => Some((*id, table)),
                        _ => None,
                    })
                    .collect();
                let deletes: Vec<u32> = rest[puts.len()..]
                    .iter()
                    .map_while(|o| match o {
                        MapOp::DeleteMaglev(id) => Some(*id),
                        _ => None,
                    })
                    .collect();
                if !puts.is_empty() {
                    self.put_tables(&puts)?;
                }
                if !deletes.is_empty() {
                    self.delete_tables(&deletes)?;
                }
                rest = &rest[puts.len() + deletes.len()..];
                continue;
            }
            if let MapOp::ForgetAffinity(_) = first {
                // One pass over the clients for every service id forgotten together.
                let ids: HashSet<u32> = rest
                    .iter()
                    .map_while(|o| match o {
                        MapOp::ForgetAffinity(id) => Some(*id),
                        _ => None,
                    })
                    .collect();
                let run = rest
                    .iter()
                    .take_while(|o| matches!(o, MapOp::ForgetAffinity(_)))
                    .count();
                self.forget_affinity(&ids)?;
                rest = &rest[run..];
                continue;
            }
            let run = match batch_map(first) {
                Some(map) => rest
                    .iter()
                    .take_while(|o| batch_map(o) == Some(map))
                    .count(),
                None => 1,
            };
            let (now, later) = rest.split_at(run);
            rest = later;
            if run > 1 && self.write_batch(now)? {
                continue;
            }
            self.write_each(now)?;
        }
        Ok(())
    }

    /// Writes a run of puts into one map in batches; false where this kernel has no batch
    /// operations (before 5.6), for the caller to write them one by one.
    fn write_batch(&mut self, run: &[MapOp]) -> Result<bool> {
        let Some(name) = run.first().and_then(batch_map) else {
            return Ok(false);
        };
        let fd = self.map_fd(name)?;
        // The run's entries as the map lays them out (every op of a run has the same map).
        fn entries<K, V>(run: &[MapOp], entry: impl Fn(&MapOp) -> Option<(K, V)>) -> Vec<(K, V)> {
            run.iter().filter_map(entry).collect()
        }
        let written = match name {
            BACKENDS_MAP => batch::update(
                fd,
                &entries(run, |o| match *o {
                    MapOp::PutBackend(id, b) => Some((id, b)),
                    MapOp::ClearBackend(id) => Some((id, Backend::default())),
                    _ => None,
                }),
            ),
            SLOTS_MAP => batch::update(
                fd,
                &entries(run, |o| match *o {
                    MapOp::PutSlot(k, id) => Some((k, id)),
                    _ => None,
                }),
            ),
            FRONTENDS_MAP => batch::update(
                fd,
                &entries(run, |o| match *o {
                    MapOp::PutFrontend(k, f) => Some((k, f)),
                    _ => None,
                }),
            ),
            _ => return Ok(false),
        };
        match written {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(source) => Err(DataplaneError::Batch { name, source }),
        }
    }

    fn map_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        match self.map(name)? {
            aya::maps::Map::HashMap(m)
            | aya::maps::Map::Array(m)
            | aya::maps::Map::LruHashMap(m)
            | aya::maps::Map::HashOfMaps(m) => Ok(m.fd().as_fd()),
            _ => Err(DataplaneError::MissingMap(name)),
        }
    }

    fn write_each(&mut self, ops: &[MapOp]) -> Result<()> {
        for op in ops {
            match *op {
                MapOp::PutMaglev(service_id, ref table) => {
                    self.put_tables(&[(service_id, table)])?
                }
                MapOp::DeleteMaglev(service_id) => self.delete_tables(&[service_id])?,
                MapOp::ForgetAffinity(id) => self.forget_affinity(&HashSet::from([id]))?,
                MapOp::PutSourceRange(id, range) => self
                    .source_ranges()?
                    .insert(&source_range_key(id, range), 1, 0)
                    .map_err(map_err(SOURCE_RANGES_MAP))?,
                MapOp::DeleteSourceRange(id, range) => {
                    ignore_missing(self.source_ranges()?.remove(&source_range_key(id, range)))
                        .map_err(map_err(SOURCE_RANGES_MAP))?
                }
                MapOp::PutBackend(id, b) => self
                    .backends()?
                    .set(id, b, 0)
                    .map_err(map_err(BACKENDS_MAP))?,
                MapOp::ClearBackend(id) => self
                    .backends()?
                    .set(id, Backend::default(), 0)
                    .map_err(map_err(BACKENDS_MAP))?,
                MapOp::PutSlot(k, id) => {
                    self.slots()?.insert(k, id, 0).map_err(map_err(SLOTS_MAP))?
                }
                MapOp::DeleteSlot(k) => {
                    ignore_missing(self.slots()?.remove(&k)).map_err(map_err(SLOTS_MAP))?
                }
                MapOp::PutFrontend(k, f) => self
                    .frontends()?
                    .insert(k, f, 0)
                    .map_err(map_err(FRONTENDS_MAP))?,
                MapOp::DeleteFrontend(k) => {
                    ignore_missing(self.frontends()?.remove(&k)).map_err(map_err(FRONTENDS_MAP))?
                }
                MapOp::ClearTraffic(id) => {
                    let zeros = PerCpuValues::try_from(vec![
                        ServiceTraffic::default();
                        aya::util::nr_cpus().map_err(
                            |(_, e)| DataplaneError::Io(e)
                        )?
                    ])?;
                    self.traffic()?
                        .set(id, zeros, 0)
                        .map_err(map_err(SERVICE_TRAFFIC_MAP))?
                }
            }
        }
        Ok(())
    }

    /// New tables, each filled before it replaces its service id's old one in the outer map:
    /// a flow sees either table whole, never one half written. The outer map is written in
    /// batches: the kernel waits for an RCU grace period after every write to a map of maps
    /// (milliseconds), once per batch rather than once per table.
    fn put_tables(&mut self, tables: &[(u32, &MaglevTable)]) -> Result<()> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // Each chunk holds its tables' descriptors open until they are in the outer map.
        const TABLES_AT_ONCE: usize = 256;
        for chunk in tables.chunks(TABLES_AT_ONCE) {
            let inner: Vec<Array<MapData, u32>> = chunk
                .iter()
                .map(|(_, table)| filled_table(table))
                .collect::<Result<_>>()?;
            let entries: Vec<(u32, u32)> = chunk
                .iter()
                .zip(&inner)
                .map(|((service_id, _), table)| {
                    let fd = aya::maps::IterableMap::map(table).fd().as_fd().as_raw_fd();
                    (*service_id, fd as u32)
                })
                .collect();
            match batch::update(self.map_fd(MAGLEV_MAP)?, &entries) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let mut outer = self.maglev()?;
                    for ((service_id, _), table) in chunk.iter().zip(&inner) {
                        outer
                            .insert(service_id, table, 0)
                            .map_err(map_err(MAGLEV_MAP))?;
                    }
                }
                Err(source) => {
                    return Err(DataplaneError::Batch {
                        name: MAGLEV_MAP,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes these service ids' tables, in one batch where the kernel has them.
    fn delete_tables(&mut self, service_ids: &[u32]) -> Result<()> {
        match batch::delete(self.map_fd(MAGLEV_MAP)?, service_ids) {
            Ok(()) => Ok(()),
            Err(_) => {
                // Before 5.6, or one of them already gone: one by one.
                let mut outer = self.maglev()?;
                for id in service_ids {
                    ignore_missing(outer.remove(id)).map_err(map_err(MAGLEV_MAP))?;
                }
                Ok(())
            }
        }
    }

    fn maglev(&mut self) -> Result<HashOfMaps<&mut MapData, u32, Array<MapData, u32>>> {
        HashOfMaps::try_from(self.map_mut(MAGLEV_MAP)?).map_err(map_err(MAGLEV_MAP))
    }

    /// A service id's Maglev table as the datapath reads it (tests and diagnostics).
    pub fn maglev_table(&self, service_id: u32) -> Result<Option<Vec<u32>>> {
        let outer: HashOfMaps<&MapData, u32, Array<MapData, u32>> =
            HashOfMaps::try_from(self.map(MAGLEV_MAP)?).map_err(map_err(MAGLEV_MAP))?;
        let inner = match outer.get(&service_id, 0) {
            Ok(inner) => inner,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err(MAGLEV_MAP)(e)),
        };
        Ok(Some(
            inner
                .iter()
                .collect::<std::result::Result<_, _>>()
                .map_err(map_err(MAGLEV_MAP))?,
        ))
    }

    /// Every client's affinity entry: (service id, client) -> backend id, last use.
    pub fn affinity_entries(&self) -> Result<Vec<(AffinityKey, Affinity)>> {
        batch::lookup_all(self.map_fd(AFFINITY_MAP)?).map_err(|source| DataplaneError::Batch {
            name: AFFINITY_MAP,
            source,
        })
    }

    /// Removes every client's affinity entry of these service ids.
    fn forget_affinity(&mut self, service_ids: &HashSet<u32>) -> Result<()> {
        self.delete_affinity_where(|service_id, _| service_ids.contains(&service_id))
            .map(|_| ())
    }

    /// Deletes the affinity entries `gone` names (by service id and entry), of clients by
    /// address and of clients translated at connect(); returns the entries left.
    fn delete_affinity_where(&mut self, gone: impl Fn(u32, &Affinity) -> bool) -> Result<usize> {
        let by_address =
            self.delete_clients_where(AFFINITY_MAP, |k: &AffinityKey| k.service_id, &gone)?;
        let by_netns = self.delete_clients_where(
            SOCK_AFFINITY_MAP,
            |k: &SockAffinityKey| k.service_id,
            &gone,
        )?;
        Ok(by_address + by_netns)
    }

    /// [`Self::delete_affinity_where`] in one of the two affinity maps.
    fn delete_clients_where<K: aya::Pod + bytemuck::Pod>(
        &mut self,
        name: &'static str,
        service_id: impl Fn(&K) -> u32,
        gone: impl Fn(u32, &Affinity) -> bool,
    ) -> Result<usize> {
        let entries: Vec<(K, Affinity)> = batch::lookup_all(self.map_fd(name)?)
            .map_err(|source| DataplaneError::Batch { name, source })?;
        let doomed: Vec<K> = entries
            .iter()
            .filter(|(key, entry)| gone(service_id(key), entry))
            .map(|(key, _)| *key)
            .collect();
        let mut clients: BpfHashMap<_, K, Affinity> =
            BpfHashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for key in &doomed {
            ignore_missing(clients.remove(key)).map_err(map_err(name))?;
        }
        Ok(entries.len() - doomed.len())
    }

    /// The sockets connect-time load balancing sent to a backend: (socket cookie, backend)
    /// -> the Service they called.
    pub fn sock_revnat_entries(&self) -> Result<Vec<(SockRevKey, SockService)>> {
        batch::lookup_all(self.map_fd(SOCK_REVNAT_MAP)?).map_err(|source| DataplaneError::Batch {
            name: SOCK_REVNAT_MAP,
            source,
        })
    }

    /// Forgets these sockets' backends.
    pub fn forget_sock_revnat(&mut self, keys: &[SockRevKey]) -> Result<()> {
        let mut map: BpfHashMap<_, SockRevKey, SockService> =
            BpfHashMap::try_from(self.map_mut(SOCK_REVNAT_MAP)?)
                .map_err(map_err(SOCK_REVNAT_MAP))?;
        for key in keys {
            ignore_missing(map.remove(key)).map_err(map_err(SOCK_REVNAT_MAP))?;
        }
        Ok(())
    }

    fn backends(&mut self) -> Result<Array<&mut aya::maps::MapData, Backend>> {
        Array::try_from(self.map_mut(BACKENDS_MAP)?).map_err(map_err(BACKENDS_MAP))
    }

    fn traffic(&mut self) -> Result<PerCpuArray<&mut aya::maps::MapData, ServiceTraffic>> {
        PerCpuArray::try_from(self.map_mut(SERVICE_TRAFFIC_MAP)?)
            .map_err(map_err(SERVICE_TRAFFIC_MAP))
    }

    /// Which datapath events the programs send; applies from the next packet.
    pub fn set_events(&mut self, level: EventsLevel) -> Result<()> {
        self.events_switch()?
            .set(level)
            .map_err(map_err(EVENTS_MAP))
    }

    /// A handle that switches the datapath events apart from the dataplane.
    pub fn events_switch(&self) -> Result<EventsSwitch> {
        Ok(EventsSwitch::new(
            Array::try_from(self.reopen(EVENTS_MAP)?).map_err(map_err(EVENTS_MAP))?,
        ))
    }

    /// The reader of the programs' events, handing them to `logger`. Once only: the reader
    /// owns the events' ring buffer.
    pub fn event_reader<L: log::Log>(&mut self, logger: L) -> Result<aya_log::EbpfLogger<L>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|e| DataplaneError::Io(std::io::Error::other(format!("datapath events: {e}"))))
    }

    fn slots(&mut self) -> Result<BpfHashMap<&mut aya::maps::MapData, SlotKey, u32>> {
        BpfHashMap::try_from(self.map_mut(SLOTS_MAP)?).map_err(map_err(SLOTS_MAP))
    }

    fn frontends(&mut self) -> Result<BpfHashMap<&mut aya::maps::MapData, FrontendKey, Frontend>> {
        BpfHashMap::try_from(self.map_mut(FRONTENDS_MAP)?).map_err(map_err(FRONTENDS_MAP))
    }

    /// Entries in the conntrack map (two per translated flow: forward and reply).
    pub fn conntrack_len(&self) -> Result<usize> {
        let ct: BpfHashMap<_, CtKey, CtEntry> =
            BpfHashMap::try_from(self.map(CONNTRACK_MAP)?).map_err(map_err(CONNTRACK_MAP))?;
        Ok(ct.keys().filter(|k| k.is_ok()).count())
    }

    /// Every conntrack entry (tests and `lb` diagnostics).
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        let ct: BpfHashMap<_, CtKey, CtEntry> =
            BpfHashMap::try_from(self.map(CONNTRACK_MAP)?).map_err(map_err(CONNTRACK_MAP))?;
        Ok(ct.iter().filter_map(|e| e.ok()).collect())
    }

    /// Deletes the conntrack entries idle longer than their state allows at `now_ns`
    /// (the datapath's clock, [`Dataplane::clock_ns`]). The datapath already ignores them; this gives
    /// their room back before the LRU would.
    pub fn collect_conntrack_garbage(&mut self, now_ns: u64) -> Result<ConntrackGc> {
        let config = self.config;
        let mut ct: BpfHashMap<_, CtKey, CtEntry> =
            BpfHashMap::try_from(self.map_mut(CONNTRACK_MAP)?).map_err(map_err(CONNTRACK_MAP))?;
        let entries: Vec<(CtKey, CtEntry)> = ct.iter().filter_map(|e| e.ok()).collect();
        let mut deleted = 0;
        for (key, entry) in &entries {
            if conntrack::expired(&config, key.protocol, entry, now_ns)
                && ignore_missing(ct.remove(key)).is_ok()
            {
                deleted += 1;
            }
        }
        Ok(ConntrackGc {
            entries: entries.len() - deleted,
            deleted,
        })
    }

    /// Deletes the affinity entries that no longer hold at `now_ns` (the datapath's clock):
    /// idle past their Service port's timeout, or of a service id not among the frontends
    /// with affinity, `sticky` (the datapath never reads those). Returns the entries left.
    pub fn collect_affinity_garbage(
        &mut self,
        now_ns: u64,
        sticky: &HashMap<u32, Frontend>,
    ) -> Result<usize> {
        self.delete_affinity_where(|service_id, entry| {
            sticky
                .get(&service_id)
                .is_none_or(|f| !affinity::holds(f, entry, now_ns))
        })
    }

    /// Per-counter packet totals, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<u64>> {
        self.stats_reader()?.read()
    }

    /// A handle on the counters that reads them when asked, apart from the dataplane.
    pub fn stats_reader(&self) -> Result<StatsReader> {
        Ok(StatsReader {
            counters: PerCpuArray::try_from(self.reopen(STATS_MAP)?).map_err(map_err(STATS_MAP))?,
            frontends: match self.reopen(FRONTENDS_MAP)? {
                aya::maps::Map::HashMap(data) => data,
                _ => return Err(DataplaneError::MissingMap(FRONTENDS_MAP)),
            },
            traffic: PerCpuArray::try_from(self.reopen(SERVICE_TRAFFIC_MAP)?)
                .map_err(map_err(SERVICE_TRAFFIC_MAP))?,
        })
    }

    /// A second handle on one of the maps, owned apart from the dataplane.
    fn reopen(&self, name: &'static str) -> Result<aya::maps::Map> {
        let map = self.map(name)?;
        let info = match map {
            aya::maps::Map::PerCpuArray(m)
            | aya::maps::Map::HashMap(m)
            | aya::maps::Map::Array(m) => m.info(),
            _ => return Err(DataplaneError::MissingMap(name)),
        }
        .map_err(map_err(name))?;
        let data = MapData::from_id(info.id()).map_err(map_err(name))?;
        Ok(match map {
            aya::maps::Map::PerCpuArray(_) => aya::maps::Map::PerCpuArray(data),
            aya::maps::Map::Array(_) => aya::maps::Map::Array(data),
            _ => aya::maps::Map::HashMap(data),
        })
    }

    /// Attaches the TC programs to every interface matching `patterns` at the hooks it
    /// needs, where this process has not attached yet; forgets interfaces that are gone.
    /// Returns the (interface, hook) pairs newly attached.
    pub fn attach_matching(&mut self, patterns: &LinkPatterns) -> Result<Attached> {
        let links = interfaces();
        self.attached
            .retain(|(ifindex, _), name| links.get(ifindex) == Some(name));
        self.xdp_attached
            .retain(|ifindex, (name, _)| links.get(ifindex) == Some(name));
        let mut newly = Attached::default();
        for (ifindex, name) in &links {
            for hook in patterns.hooks(name) {
                if !self.attached.contains_key(&(*ifindex, hook)) {
                    self.attach(*ifindex, name, hook)?;
                    newly.tc.push((name.clone(), hook));
                }
            }
            if patterns.is_external(name) && !self.xdp_attached.contains_key(ifindex) {
                let attachment = self.attach_xdp(*ifindex, name, self.xdp_mode)?;
                self.xdp_attached
                    .insert(*ifindex, (name.clone(), attachment.mode));
                newly.xdp.push((name.clone(), attachment));
            }
        }
        self.remove_stale_link_pins(&links)?;
        Ok(newly)
    }

    /// `--xdp-mode` for the external links attached from now on.
    pub fn set_xdp_mode(&mut self, mode: XdpMode) {
        self.xdp_mode = mode;
    }

    /// The external links and the mode XDP runs in on each ("off": the TC program alone).
    pub fn xdp_links(&self) -> Vec<(String, &'static str)> {
        self.xdp_attached.values().cloned().collect()
    }

    /// Chooses TCX or the clsact qdisc for the attachments made from now on.
    pub fn set_tc_attach(&mut self, how: TcAttach) {
        self.tc_attach = how.resolve();
    }

    /// TCX or legacy, as resolved for this kernel.
    pub fn tc_attach(&self) -> TcAttach {
        self.tc_attach
    }

    fn attach(&mut self, ifindex: u32, name: &str, hook: Hook) -> Result<()> {
        if self.tc_attach == TcAttach::Legacy {
            return self.attach_legacy(ifindex, name, hook);
        }
        let attach_err = attach_error(name);
        let prog = self.classifier(hook.program())?;
        let prog_id = prog.info().map_err(|e| attach_err(&e))?.id();
        let link_id = prog
            .attach_with_options(
                name,
                hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| attach_err(&e))?;
        let link = prog.take_link(link_id).map_err(|e| attach_err(&e))?;
        if let Some(bpffs) = &self.bpffs {
            // Pinned, the attachment outlives the agent, as kube-proxy's rules do. Then the
            // previous agent's attachment to this hook (same maps) is released.
            let fd_link: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| attach_err(&e))?;
            let dir = bpffs.join(LINKS_DIR);
            let pin = dir.join(format!("{}{ifindex}-{prog_id}", hook.pin_prefix()));
            if pin.exists() {
                std::fs::remove_file(&pin)?;
            }
            fd_link.pin(&pin).map_err(|e| attach_err(&e))?;
            for (old_ifindex, old_hook, old_pin) in link_pins(&dir)? {
                if old_ifindex == ifindex && old_hook.same_place(hook) && old_pin != pin {
                    std::fs::remove_file(&old_pin)?;
                }
            }
            // An agent of before that used the clsact qdisc left its filter: both would act
            // on every packet. The filter goes, and the qdisc if it was only there for it.
            // Every program that sat here goes (an uplink had the pod ingress program before).
            let mut left = false;
            for old in Hook::ALL.into_iter().filter(|h| h.same_place(hook)) {
                if tc::qdisc_detach_program(name, old.attach_type(), old.program()).is_ok() {
                    left = true;
                }
            }
            if left {
                remove_empty_clsact(name);
            }
        } else {
            // Unpinned (tests): the attachment lives as long as this process.
            std::mem::forget(link);
        }
        self.attached.insert((ifindex, hook), name.to_string());
        Ok(())
    }

    /// The clsact qdisc path: a cls_bpf filter in direct-action mode at a fixed priority and
    /// handle. The filter stays when the agent exits (as a pinned TCX link does); a restarted
    /// agent replaces it in place.
    fn attach_legacy(&mut self, ifindex: u32, name: &str, hook: Hook) -> Result<()> {
        let attach_err = attach_error(name);
        match tc::qdisc_add_clsact(name) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(attach_err(&e)),
        }
        let prog = self.classifier(hook.program())?;
        let options = TcAttachOptions::Netlink(NlOptions {
            priority: LEGACY_PRIORITY,
            handle: LEGACY_HANDLE,
            classid: None,
        });
        let link_id = match prog.attach_with_options(name, hook.attach_type(), options) {
            Ok(id) => id,
            Err(aya::programs::ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                // A previous agent's filter: the program is swapped in place.
                let existing = SchedClassifierLink::attached(
                    name,
                    hook.attach_type(),
                    LEGACY_PRIORITY,
                    LEGACY_HANDLE,
                    None,
                )
                .map_err(|e| attach_err(&e))?;
                prog.attach_to_link(existing).map_err(|e| attach_err(&e))?
            }
            Err(e) => return Err(attach_err(&e)),
        };
        let link = prog.take_link(link_id).map_err(|e| attach_err(&e))?;
        // Dropping the link would remove the filter: it is left to outlive the agent (`lb
        // reset` removes it).
        std::mem::forget(link);
        // An agent of before that used TCX left its pinned link: both would act on every
        // packet. Unpinned, the link (held by no process) detaches.
        if let Some(bpffs) = &self.bpffs {
            for (old_ifindex, old_hook, old_pin) in link_pins(&bpffs.join(LINKS_DIR))? {
                if old_ifindex == ifindex && old_hook.same_place(hook) {
                    std::fs::remove_file(&old_pin)?;
                }
            }
        }
        self.attached.insert((ifindex, hook), name.to_string());
        Ok(())
    }

    fn remove_stale_link_pins(&self, links: &BTreeMap<u32, String>) -> Result<()> {
        let Some(bpffs) = &self.bpffs else {
            return Ok(());
        };
        let dir = bpffs.join(LINKS_DIR);
        let pins = link_pins(&dir)?
            .into_iter()
            .map(|(ifindex, _, path)| (ifindex, path))
            .chain(xdp::xdp_pins(&dir)?);
        for (ifindex, path) in pins {
            if !links.contains_key(&ifindex) {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }

    /// Interfaces with at least one program attached.
    pub fn attached(&self) -> BTreeSet<String> {
        self.attached.values().cloned().collect()
    }

    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// What one conntrack garbage collection found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackGc {
    /// Entries left.
    pub entries: usize,
    pub deleted: usize,
}

/// `namespace/name` as the ClusterIP record holds it (zero-padded, cut at its length).
fn service_name(name: &str) -> ServiceName {
    let mut value = ServiceName {
        bytes: [0; SERVICE_NAME_LEN],
    };
    let len = name.len().min(SERVICE_NAME_LEN);
    value.bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    value
}

/// A new Maglev table (an array map, not yet in the outer map) holding `table`.
fn filled_table(table: &MaglevTable) -> Result<Array<MapData, u32>> {
    use std::os::fd::AsFd as _;
    let size = table.backend_ids.len() as u32;
    let mut inner: Array<MapData, u32> =
        Array::create(size, BPF_F_INNER_MAP).map_err(map_err(MAGLEV_MAP))?;
    let entries: Vec<(u32, u32)> = (0..size).zip(table.backend_ids.iter().copied()).collect();
    match batch::update(aya::maps::IterableMap::map(&inner).fd().as_fd(), &entries) {
        Ok(()) => {}
        // Before 5.6: one entry at a time.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            for (index, id) in entries {
                inner.set(index, id, 0).map_err(map_err(MAGLEV_MAP))?;
            }
        }
        Err(source) => {
            return Err(DataplaneError::Batch {
                name: MAGLEV_MAP,
                source,
            });
        }
    }
    Ok(inner)
}

/// The map a write goes to, for writes that go in batches.
/// The trie key of a service id's client range: the id's 32 bits, then the range's prefix.
fn source_range_key(service_id: u32, range: Ipv4Net) -> aya::maps::lpm_trie::Key<SourceRange> {
    aya::maps::lpm_trie::Key::new(
        32 + u32::from(range.prefix_len()),
        SourceRange {
            service_id: service_id.to_be(),
            addr: range.network().octets(),
        },
    )
}

fn batch_map(op: &MapOp) -> Option<&'static str> {
    match op {
        MapOp::PutBackend(..) | MapOp::ClearBackend(_) => Some(BACKENDS_MAP),
        MapOp::PutSlot(..) => Some(SLOTS_MAP),
        MapOp::PutFrontend(..) => Some(FRONTENDS_MAP),
        _ => None,
    }
}

/// The datapath's packet counters, read from the kernel each time.
pub struct StatsReader {
    counters: PerCpuArray<MapData, u64>,
    frontends: MapData,
    traffic: PerCpuArray<MapData, ServiceTraffic>,
}

impl StatsReader {
    /// Per-counter packet totals, summed over CPUs.
    pub fn read(&self) -> Result<Vec<u64>> {
        (0..COUNTER_COUNT)
            .map(|i| {
                Ok(self
                    .counters
                    .get(&i, 0)
                    .map_err(map_err(STATS_MAP))?
                    .iter()
                    .sum())
            })
            .collect()
    }

    /// The traffic of every programmed frontend, summed over CPUs.
    pub fn traffic(&self) -> Result<HashMap<FrontendKey, ServiceTraffic>> {
        use std::os::fd::AsFd as _;
        let frontends = batch::lookup_all::<FrontendKey, Frontend>(self.frontends.fd().as_fd())
            .map_err(|source| DataplaneError::Batch {
                name: FRONTENDS_MAP,
                source,
            })?;
        let mut out = HashMap::new();
        for (key, frontend) in frontends {
            let per_cpu = match self.traffic.get(&frontend.service_id, 0) {
                Ok(v) => v,
                // An id past the array (written by an agent of before the counters).
                Err(aya::maps::MapError::OutOfBounds { .. }) => continue,
                Err(e) => return Err(map_err(SERVICE_TRAFFIC_MAP)(e)),
            };
            let sum = per_cpu
                .iter()
                .fold(ServiceTraffic::default(), |a, t| ServiceTraffic {
                    packets_in: a.packets_in + t.packets_in,
                    bytes_in: a.bytes_in + t.bytes_in,
                    packets_out: a.packets_out + t.packets_out,
                    bytes_out: a.bytes_out + t.bytes_out,
                });
            out.insert(key, sum);
        }
        Ok(out)
    }
}

fn ignore_missing(
    r: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Pinned TC links under `dir`: (ifindex, hook, path).
fn link_pins(dir: &Path) -> Result<Vec<(u32, Hook, PathBuf)>> {
    let mut pins = Vec::new();
    for hook in Hook::ALL {
        pins.extend(
            pins_named(dir, hook.pin_prefix())?
                .into_iter()
                .map(|(ifindex, path)| (ifindex, hook, path)),
        );
    }
    Ok(pins)
}

/// Pins under `dir` named `<prefix><ifindex>-...`: (ifindex, path).
fn pins_named(dir: &Path, prefix: &str) -> Result<Vec<(u32, PathBuf)>> {
    let mut pins = Vec::new();
    if !dir.exists() {
        return Ok(pins);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(ifindex) = name
            .strip_prefix(prefix)
            .and_then(|r| r.split('-').next())
            .and_then(|i| i.parse().ok())
        {
            pins.push((ifindex, path.clone()));
        }
    }
    Ok(pins)
}

/// Interfaces of this process's network namespace: ifindex -> name.
pub fn interfaces() -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.insert((*p).if_index, name);
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `dir` lies on a bpf filesystem, mounting one at /sys/fs/bpf if needed.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mount_point = Path::new("/sys/fs/bpf");
    let on_bpffs = |p: &Path| p.ancestors().find(|a| a.exists()).is_some_and(is_bpffs);
    if on_bpffs(dir) {
        return Ok(());
    }
    if dir.starts_with(mount_point) && !is_bpffs(mount_point) {
        std::fs::create_dir_all(mount_point)?;
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        // SAFETY: plain mount(2) with valid C strings.
        let rc = unsafe {
            libc::mount(
                c("bpf").as_ptr(),
                c("/sys/fs/bpf").as_ptr(),
                c("bpf").as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(DataplaneError::Bpffs {
                path: mount_point.into(),
                message: format!("mounting bpffs failed: {}", std::io::Error::last_os_error()),
            });
        }
        return Ok(());
    }
    Err(DataplaneError::Bpffs {
        path: dir.into(),
        message: "not on a bpf filesystem (mount -t bpf bpf <dir>)".into(),
    })
}

/// Removes every link and map the agent pinned under `bpffs`: the programs detach.
pub fn reset(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    remove_legacy_filters();
    let links = bpffs.join(LINKS_DIR);
    let pins = link_pins(&links)?
        .into_iter()
        .map(|(_, _, path)| path)
        .chain(xdp::xdp_pins(&links)?.into_iter().map(|(_, path)| path))
        .chain(socket_lb::sock_pins(&links)?);
    for path in pins {
        std::fs::remove_file(&path)?;
        removed.push(path);
    }
    for name in ALL_MAPS {
        let path = bpffs.join(name);
        if path.exists() {
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
    }
    for dir in [links.as_path(), bpffs] {
        if dir.exists() {
            std::fs::remove_dir(dir)?;
            removed.push(dir.to_path_buf());
        }
    }
    Ok(removed)
}

/// Removes the clsact filters of the legacy path from every interface, and the clsact qdisc
/// where nothing else is left on it. Interfaces without them are left alone.
fn remove_legacy_filters() {
    for name in interfaces().into_values() {
        let mut ours = false;
        for hook in Hook::ALL {
            // Filters carry their program's name.
            if tc::qdisc_detach_program(&name, hook.attach_type(), hook.program()).is_ok() {
                ours = true;
            }
        }
        if ours {
            remove_empty_clsact(&name);
        }
    }
}

/// Deletes the clsact qdisc of `iface` if no filter is left on it (ours were the only ones).
fn remove_empty_clsact(iface: &str) {
    let filters = |direction: &str| {
        std::process::Command::new("tc")
            .args(["filter", "show", "dev", iface, direction])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| o.stdout.is_empty())
    };
    if filters("ingress") == Some(true) && filters("egress") == Some(true) {
        let _ = std::process::Command::new("tc")
            .args(["qdisc", "del", "dev", iface, "clsact"])
            .status();
    }
}
