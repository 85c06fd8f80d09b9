//! `lb agent`: objects (a manifest folder, or the API server's watches) -> control plane ->
//! desired -> diff -> dataplane, plus the admin endpoint.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use foldhash::HashSet;
use ipnet::Ipv4Net;
use lb_common::maglev;
use notify::Watcher as _;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    api::{self, AdminState, SharedState, StatusView},
    controlplane::{Change, ControlPlane, ServiceChange},
    dataplane::{self, Dataplane, LinkPatterns},
    desired::{Algorithm, DesiredDataplane, Frontend},
    diff::{self, ActualDataplane, MapOp},
    dns::SharedZone,
    events::{self, EventsLevel},
    external::AllocationRanges,
    health_check::HealthChecks,
    model::ObjectName,
    sources::{cluster, manifests::ManifestStore},
    stale_sockets,
};

/// Where `lb get` and the agent meet by default.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:10249";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";

/// `lb agent`'s flags.
#[derive(clap::Args)]
pub struct AgentConfig {
    /// Standalone mode: a folder of Service, Pod, Endpoints and EndpointSlice manifests
    /// (*.yaml, *.yml, *.json). Without it the agent watches the API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Cluster mode: the kubeconfig to reach the API server with. Default: $KUBECONFIG, then
    /// ~/.kube/config, then the in-cluster service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name.
    #[arg(long, env = "NODE_NAME", default_value_t = hostname())]
    pub node_name: String,
    /// Interfaces facing pods, as a shell pattern; links that appear later are attached too.
    #[arg(long, default_value = "veth*")]
    pub pod_iface_glob: String,
    /// The node's links to other nodes and the outside (a name or a shell pattern;
    /// repeatable). The TC ingress program is attached to them (pod links get ingress and
    /// egress).
    #[arg(long = "external-iface", value_name = "IFACE")]
    pub external_ifaces: Vec<String>,
    /// Standalone mode: the range that ClusterIPs are allocated from and must lie in (in
    /// cluster mode the API server allocates them).
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: Ipv4Net,
    /// Standalone mode: the range that nodePorts are allocated from and must lie in (in
    /// cluster mode the API server allocates them).
    #[arg(long, default_value = "30000-32767", value_parser = port_range)]
    pub node_port_range: RangeInclusive<u16>,
    /// Standalone mode: where LoadBalancer Services without an address (no cloud writes their
    /// status here) get one, unless they ask with spec.loadBalancerIP. Without it they answer
    /// on their nodePorts only.
    #[arg(long)]
    pub loadbalancer_cidr: Option<Ipv4Net>,
    /// Which addresses of the external interfaces answer on nodePorts (CIDRs, comma
    /// separated), as kube-proxy's flag. Default: all of them.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub nodeport_addresses: Vec<Ipv4Net>,
    /// Directory on a bpf filesystem where maps and links are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// How the TC programs are attached: TCX (Linux 6.6+), the clsact qdisc (older kernels),
    /// or whichever this kernel supports.
    #[arg(long, value_enum, default_value = "auto")]
    pub tc_attach: crate::dataplane::TcAttach,
    /// XDP on the external interfaces: in the driver (falling back to generic, then to the
    /// TC program alone, each fallback logged), generic, or off.
    #[arg(long, value_enum, default_value = "native")]
    pub xdp_mode: crate::dataplane::XdpMode,
    /// Connect-time load balancing: a socket in `--cgroup` that connects (or sends a UDP
    /// datagram) to a Service gets a backend's address at once, so its packets need no
    /// translation; processes on the node itself reach Services this way. `--socket-lb=false`
    /// leaves every client to the TC programs (and detaches a previous agent's).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    pub socket_lb: bool,
    /// The cgroup v2 whose processes (with every cgroup below it) get connect-time load
    /// balancing. Default: the root of the cgroup v2 mount (every process on the node).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Address of the health endpoint (/healthz, /livez), served as kube-proxy serves it.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind: SocketAddr,
    /// Address of the local admin endpoint that `lb get` reads.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// Idle timeout of an established TCP connection.
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,
    /// Idle timeout of a TCP connection that has not completed its handshake.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub conntrack_tcp_timeout_syn: Duration,
    /// Idle timeout of a TCP connection after FIN or RST.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub conntrack_tcp_timeout_close: Duration,
    /// Idle timeout of a UDP flow.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub conntrack_udp_timeout: Duration,
    /// How often expired conntrack entries are deleted.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub conntrack_gc_interval: Duration,
    /// How often the maps are read back and compared with what the agent wrote (and, in
    /// standalone mode, the whole folder read), as kube-proxy's --sync-period: anything missed
    /// or changed behind the agent's back is mended then.
    #[arg(long, default_value = "30s", value_parser = sync_period)]
    pub sync_period: Duration,
    /// Datapath events in the agent's log: drops with their reason, or drops and every new
    /// flow's backend. Switched at run time with `lb events` (the admin endpoint's
    /// /v1/events).
    #[arg(long, value_enum, default_value = "off")]
    pub datapath_events: EventsLevel,
    /// ICMP replies per second and CPU for Services without endpoints; more are dropped.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    pub icmp_rate_limit: u64,
    /// How a new connection picks among a Service port's endpoints: at random, or by Maglev
    /// consistent hashing of its 5-tuple (every node picks the same endpoint for a flow, and
    /// a change of endpoints moves few flows; costs a table per Service port).
    #[arg(long, value_enum, default_value = "random")]
    pub lb_algorithm: LbAlgorithm,
    /// Entries of each Service port's Maglev table: a prime from 251 to 131071, at least 100
    /// times the endpoints of the largest Service (4 bytes each).
    #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = maglev_table_size)]
    pub maglev_table_size: u32,
    #[command(flatten)]
    pub dns: crate::dns::DnsConfig,
}

/// `--lb-algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LbAlgorithm {
    Random,
    Maglev,
}

/// `--node-port-range`: `FIRST-LAST`, as the API server's `--service-node-port-range`.
fn port_range(value: &str) -> Result<RangeInclusive<u16>, String> {
    let (first, last) = value
        .split_once('-')
        .ok_or_else(|| format!("{value:?} is not a range FIRST-LAST"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port number"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!("{value:?}: the first port is above the last"));
    }
    Ok(first..=last)
}

fn sync_period(value: &str) -> Result<Duration, String> {
    let period = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if period < Duration::from_millis(100) {
        return Err(format!("{value}: at least 100ms"));
    }
    Ok(period)
}

fn maglev_table_size(value: &str) -> Result<u32, String> {
    let size: u32 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    match maglev::table_size_problem(size) {
        None => Ok(size),
        Some(problem) => Err(format!("{size}: {problem}")),
    }
}

impl AgentConfig {
    /// The datapath settings these flags give.
    pub fn datapath_config(&self) -> lb_common::Config {
        let ns = |d: Duration| d.as_nanos().min(u64::MAX as u128) as u64;
        lb_common::Config {
            tcp_established_ns: ns(self.conntrack_tcp_timeout_established),
            tcp_syn_ns: ns(self.conntrack_tcp_timeout_syn),
            tcp_closing_ns: ns(self.conntrack_tcp_timeout_close),
            udp_ns: ns(self.conntrack_udp_timeout),
            icmp_replies_per_sec: self.icmp_rate_limit,
            // The tick is measured by the dataplane when it writes the settings.
            ..lb_common::Config::DEFAULT
        }
    }

    /// How new flows pick their backend.
    pub fn algorithm(&self) -> Algorithm {
        match self.lb_algorithm {
            LbAlgorithm::Random => Algorithm::Random,
            LbAlgorithm::Maglev => Algorithm::Maglev {
                table_size: self.maglev_table_size,
            },
        }
    }

    /// The links the TC programs are attached to.
    fn link_patterns(&self) -> anyhow::Result<LinkPatterns> {
        let pattern =
            |flag: &str, p: &str| glob::Pattern::new(p).with_context(|| format!("{flag} {p:?}"));
        Ok(LinkPatterns {
            pod: vec![pattern("--pod-iface-glob", &self.pod_iface_glob)?],
            external: self
                .external_ifaces
                .iter()
                .map(|i| pattern("--external-iface", i))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// A sync that parsed more text than this leaves enough garbage behind to be worth copying the
/// store out of the parse thread's heap and handing that heap back (small edits are not).
const BIG_PARSE_BYTES: usize = 1 << 20;

/// What a sync reads of the manifest folder.
enum Read {
    /// Every file (at start, on resync, and when the watcher may have missed changes).
    Folder,
    /// The files the watcher reported.
    Paths(BTreeSet<PathBuf>),
}

impl Read {
    /// Adds what one watcher report asks for (no paths: the whole folder).
    fn add(&mut self, folder: &Path, paths: Vec<PathBuf>) {
        match self {
            Read::Paths(known) if !paths.is_empty() => {
                // Named as the folder scan names them, whatever form the watcher uses.
                known.extend(
                    paths
                        .iter()
                        .filter_map(|p| Some(folder.join(p.file_name()?))),
                );
            }
            _ => *self = Read::Folder,
        }
    }
}

/// Every frontend is planned again from the Services (not only those changes touched) when a
/// resync finds the maps changed behind the agent's back, and at least this often, as
/// kube-proxy syncs everything hourly: at 100,000 Services such a plan costs a second of CPU.
const FULL_PLAN_EVERY: Duration = Duration::from_secs(3600);
/// Interfaces are looked for this often (pods' links appear at any time).
const LINK_SCAN_EVERY: Duration = Duration::from_millis(500);
/// Events of one editor save come in bursts: wait this long for the burst to end.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Where the agent's objects come from.
enum Source {
    /// Standalone mode: a manifest folder and the objects parsed from it.
    Folder { dir: PathBuf, store: ManifestStore },
    /// Cluster mode: the API server's watches; they send their changes to the agent's loop.
    Cluster {
        /// Problems of watched objects, by object.
        problems: BTreeMap<String, String>,
    },
}

/// Kinds a cluster-mode agent waits to have listed before it first writes the maps: a sync
/// with Services but not yet their endpoints would empty every Service.
const LISTED_KINDS: [&str; 2] = ["Service", "EndpointSlice"];

struct Agent {
    config: AgentConfig,
    patterns: LinkPatterns,
    source: Source,
    desired: DesiredDataplane,
    /// Frontends a full map kept out: tried again at every sync.
    unprogrammed: BTreeSet<Frontend>,
    /// The `healthCheckNodePort` servers.
    health_checks: HealthChecks,
    /// The cluster DNS zone, with `--dns-listen`.
    dns: Option<SharedZone>,
    dataplane: Dataplane,
    actual: ActualDataplane,
    /// The control plane, and the status the admin endpoint shows.
    shared: SharedState,
    last_errors: Vec<String>,
    syncs: u64,
    /// When every frontend was last planned from the Services.
    last_full_plan: Instant,
    /// Services computed while the first lists arrived (their frontends are in `desired`):
    /// the first sync takes them with its own.
    computed_ahead: Vec<ServiceChange>,
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // Large buffers (a full sync's plan, map tables, parse trees) come from mmap and go back
    // to the system when freed. glibc otherwise raises this threshold after the first such
    // free and serves them from the heap, whose holes then stay resident.
    // SAFETY: mallopt only changes allocator tuning.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024) };
    info!(version = env!("CARGO_PKG_VERSION"), node = %config.node_name, "agent starting");
    let patterns = config.link_patterns()?;
    if let Some(dir) = &config.manifests
        && !dir.is_dir()
    {
        anyhow::bail!("--manifests {}: not a directory", dir.display());
    }
    // In cluster mode the client is made before the datapath is touched: a kubeconfig that
    // cannot be read is an error at once, an API server that cannot be reached is not (the
    // watches retry while the pinned datapath keeps serving).
    let client = match &config.manifests {
        Some(_) => None,
        None => Some(kube_client(config.kubeconfig.as_deref()).await?),
    };
    // The lists start before the datapath loads (the verifier takes seconds of one CPU): what
    // they bring waits in the channel, and nothing is written before both kinds are listed.
    let updates = client.map(|client| {
        let (tx, rx) = mpsc::unbounded_channel::<cluster::Update>();
        cluster::watch(client, &config.node_name, tx);
        info!("watching the API server");
        rx
    });
    for found in crate::coexistence::find_kube_proxy_rules() {
        warn!(
            "kube-proxy's rules are on this node ({found}): kube-proxy and this datapath would both act on Service traffic; remove kube-proxy and its rules (README, replacing kube-proxy)"
        );
    }
    if config.socket_lb
        && let Some(cgroup) = &config.cgroup
        && !dataplane::is_cgroup2_dir(cgroup)
    {
        anyhow::bail!("--cgroup {}: not a cgroup v2 directory", cgroup.display());
    }
    let dns = crate::dns::start(&config.dns)?;
    let mut dataplane = Dataplane::load_pinned(&config.bpffs, config.datapath_config())?;
    dataplane.set_tc_attach(config.tc_attach);
    dataplane.set_xdp_mode(config.xdp_mode);
    info!(tc_attach = ?dataplane.tc_attach(), "attaching TC programs");
    let actual = dataplane.read_actual()?;
    info!(
        bpffs = %config.bpffs.display(),
        frontends = actual.frontends.len(),
        backends = actual.backends.len(),
        "datapath loaded; pinned maps reused"
    );
    let counters = match dataplane.stats_reader() {
        Ok(r) => Some(r),
        Err(e) => {
            warn!("datapath counters will not be shown: {e}");
            None
        }
    };
    dataplane.set_events(config.datapath_events)?;
    let events = dataplane.events_switch()?;
    let _event_reader = events::spawn_reader(dataplane.event_reader(events::DatapathLog)?)?;
    let mut control = if updates.is_some() {
        ControlPlane::following_api_server()
    } else {
        let mut control = ControlPlane::new(config.service_cidr);
        control.set_allocation_ranges(AllocationRanges {
            node_ports: Some(config.node_port_range.clone()),
            load_balancer_cidr: config.loadbalancer_cidr,
        });
        control
    };
    control.set_node_name(Some(config.node_name.clone()));
    let held = dataplane.read_cluster_ips()?;
    control.held_before(held.iter().filter_map(|(ip, holder)| {
        let (namespace, name) = holder.split_once('/')?;
        Some((
            *ip,
            ObjectName {
                namespace: namespace.to_string(),
                name: name.to_string(),
            },
        ))
    }));
    let shared: SharedState = Arc::new(AdminState::new(control, counters, Some(events)));
    shared.status_mut().datapath_events = config.datapath_events;
    shared.status_mut().backend_choice = match config.algorithm() {
        Algorithm::Random => "random".to_string(),
        Algorithm::Maglev { table_size } => format!("maglev, tables of {table_size} entries"),
    };
    let admin = config.admin;
    let server_state = shared.clone();
    let server = tokio::spawn(async move { api::serve(admin, server_state).await });
    let health_state = shared.clone();
    let healthz = config.healthz_bind;
    tokio::spawn(async move {
        if let Err(e) = api::serve_health(healthz, health_state).await {
            error!("health endpoint: {e}");
        }
    });
    let source = match &config.manifests {
        Some(dir) => Source::Folder {
            dir: dir.clone(),
            store: ManifestStore::default(),
        },
        None => Source::Cluster {
            problems: BTreeMap::new(),
        },
    };
    let mut agent = Agent {
        desired: DesiredDataplane {
            algorithm: config.algorithm(),
            ..DesiredDataplane::default()
        },
        unprogrammed: BTreeSet::new(),
        health_checks: HealthChecks::default(),
        dns,
        patterns,
        source,
        dataplane,
        actual,
        shared,
        last_errors: Vec::new(),
        syncs: 0,
        last_full_plan: Instant::now(),
        computed_ahead: Vec::new(),
        config,
    };
    agent.scan_links();
    agent.attach_socket_lb();
    match updates {
        None => agent.run_standalone(server).await,
        Some(updates) => agent.run_in_cluster(updates, server).await,
    }?;
    info!("agent stopping; programs stay attached and maps pinned (`lb reset` removes them)");
    Ok(())
}

/// The IPv4 addresses of the external interfaces, narrowed to `--nodeport-addresses`: where
/// nodePorts answer, the first also the source of flows sent on to other nodes.
fn node_addresses(patterns: &LinkPatterns, wanted: &[Ipv4Net]) -> Vec<std::net::Ipv4Addr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut found: Vec<std::net::Ipv4Addr> = addrs
        .filter(|a| {
            patterns
                .external
                .iter()
                .any(|p| p.matches(&a.interface_name))
        })
        .filter_map(|a| Some(a.address?.as_sockaddr_in()?.ip()))
        .filter(|ip| wanted.is_empty() || wanted.iter().any(|net| net.contains(ip)))
        .collect();
    found.dedup();
    found
}

/// The maps as read back, with the digests of the Maglev tables this agent wrote and that are
/// still there (the maps only hold the tables, not what they were built from).
fn keep_table_digests(mut read: ActualDataplane, known: &ActualDataplane) -> ActualDataplane {
    for (service_id, digest) in read.maglev.iter_mut() {
        if let Some(d) = known.maglev.get(service_id) {
            *digest = *d;
        }
    }
    read
}

/// The API server client: from `kubeconfig`, or as kube infers it ($KUBECONFIG,
/// ~/.kube/config, the in-cluster service account).
async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no API server to watch: give --manifests (standalone mode), --kubeconfig, or run in a Pod",
        )?,
    };
    kube::Client::try_from(config).context("API server client")
}

type AdminServer = tokio::task::JoinHandle<anyhow::Result<()>>;

/// Link scans, conntrack garbage collection, full resyncs, and SIGTERM.
struct Timers {
    links: tokio::time::Interval,
    conntrack_gc: tokio::time::Interval,
    resync: tokio::time::Interval,
    sigterm: tokio::signal::unix::Signal,
}

impl Agent {
    /// Standalone mode: the maps follow the manifest folder.
    async fn run_standalone(&mut self, mut server: AdminServer) -> anyhow::Result<()> {
        let Source::Folder { dir, .. } = &self.source else {
            unreachable!("standalone mode reads a folder")
        };
        let dir = dir.clone();
        // Paths that changed; an empty list asks for a scan of the whole folder.
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let paths = match event {
                    // Reading the files (our own sync) raises access events: only changes
                    // count, or every sync would trigger the next one.
                    Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => return,
                    // The watcher may have missed changes.
                    Ok(e) if e.need_rescan() => Vec::new(),
                    Ok(e) => e.paths,
                    Err(_) => Vec::new(),
                };
                let _ = tx.send(paths);
            })?;
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        self.sync_folder(Read::Folder, true);
        info!(admin = %self.config.admin, manifests = %dir.display(), "agent running");

        let Timers {
            mut links,
            mut conntrack_gc,
            mut resync,
            mut sigterm,
        } = self.timers()?;
        loop {
            tokio::select! {
                Some(paths) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    let mut read = Read::Paths(BTreeSet::new());
                    for paths in std::iter::once(paths).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                        read.add(&dir, paths);
                    }
                    self.sync_folder(read, false);
                }
                _ = links.tick() => self.scan_links(),
                _ = conntrack_gc.tick() => self.collect_conntrack_garbage(),
                _ = resync.tick() => {
                    let full = self.reread_maps();
                    self.sync_folder(Read::Folder, full);
                }
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
                served = &mut server => return served?,
            }
        }
    }

    /// Cluster mode: the maps follow the API server's Services and EndpointSlices. Nothing is
    /// written before both kinds are listed; until then the pinned datapath serves as it was.
    async fn run_in_cluster(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<cluster::Update>,
        mut server: AdminServer,
    ) -> anyhow::Result<()> {
        info!(admin = %self.config.admin, "agent running");
        let mut listed: BTreeSet<&'static str> = BTreeSet::new();
        let mut pending: Vec<Change> = Vec::new();
        let mut triggers: Vec<SystemTime> = Vec::new();
        let Timers {
            mut links,
            mut conntrack_gc,
            mut resync,
            mut sigterm,
        } = self.timers()?;
        loop {
            tokio::select! {
                Some(update) = rx.recv() => {
                    // A burst of events becomes one sync: whatever is queued joins this one.
                    let first_list_done = listed.len() == LISTED_KINDS.len();
                    for update in std::iter::once(update).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                        match update {
                            cluster::Update::Changes { changes, triggers: t } => {
                                self.shared.health().queued(Instant::now());
                                triggers.extend(t);
                                if first_list_done {
                                    pending.extend(changes);
                                } else {
                                    // Taken in while the other kind is still listed; written
                                    // with the first sync.
                                    self.apply_changes(changes);
                                }
                            }
                            cluster::Update::Listed(kind) => {
                                listed.insert(kind);
                            }
                            cluster::Update::Problem { object, problem } => self.set_problem(object, problem),
                            cluster::Update::Zone(zone) => {
                                info!(zone = zone.as_deref().unwrap_or("<none>"), "this node's zone");
                                self.shared.control_mut().set_zone(zone);
                                self.shared.health().queued(Instant::now());
                            }
                        }
                    }
                    if !first_list_done && listed.len() < LISTED_KINDS.len() {
                        self.compute_ahead();
                    }
                    if listed.len() == LISTED_KINDS.len() {
                        if !first_list_done {
                            info!("Services and EndpointSlices listed; programming the datapath");
                        }
                        // The first sync compares every frontend with the pinned maps.
                        self.sync(std::mem::take(&mut pending), Vec::new(), !first_list_done);
                        let written = SystemTime::now();
                        for t in triggers.drain(..) {
                            if let Ok(took) = written.duration_since(t) {
                                self.shared.metrics.network_programming_duration.observe(took.as_secs_f64());
                            }
                        }
                    }
                }
                _ = links.tick() => self.scan_links(),
                _ = conntrack_gc.tick() => self.collect_conntrack_garbage(),
                _ = resync.tick(), if listed.len() == LISTED_KINDS.len() => {
                    if self.reread_maps() {
                        self.sync(Vec::new(), Vec::new(), true);
                    }
                }
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
                served = &mut server => return served?,
            }
        }
    }

    /// The housekeeping both modes do besides following their objects.
    fn timers(&self) -> anyhow::Result<Timers> {
        Ok(Timers {
            links: tokio::time::interval(LINK_SCAN_EVERY),
            conntrack_gc: tokio::time::interval(self.config.conntrack_gc_interval),
            // The first full resync comes one period after start (the start-up sync, or the
            // first sync after listing, compares everything already).
            resync: tokio::time::interval_at(
                tokio::time::Instant::now() + self.config.sync_period,
                self.config.sync_period,
            ),
            sigterm: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    fn set_problem(&mut self, object: String, problem: Option<String>) {
        let Source::Cluster { problems } = &mut self.source else {
            return;
        };
        match problem {
            Some(p) => {
                problems.insert(object, p);
            }
            None => {
                problems.remove(&object);
            }
        }
    }

    fn collect_conntrack_garbage(&mut self) {
        let now = match self.dataplane.clock_ns() {
            Ok(now) => now,
            Err(e) => return warn!("conntrack garbage collection: reading the clock: {e}"),
        };
        let collected = self.dataplane.collect_conntrack_garbage(now);
        let sticky: std::collections::HashMap<u32, lb_common::Frontend> = self
            .actual
            .frontends
            .values()
            .filter(|f| lb_common::affinity::enabled(f))
            .map(|f| (f.service_id, *f))
            .collect();
        let clients = self
            .dataplane
            .collect_affinity_garbage(now, &sticky)
            .unwrap_or_else(|e| {
                warn!("affinity garbage collection: {e}");
                0
            });
        match collected {
            Ok(gc) => {
                let mut status = self.shared.status_mut();
                status.conntrack_entries = gc.entries;
                status.conntrack_gc_deleted += gc.deleted as u64;
                status.affinity_entries = clients;
                status.map_fill = map_fill(&self.actual, gc.entries, clients);
            }
            Err(e) => warn!("conntrack garbage collection: {e}"),
        }
    }

    fn scan_links(&mut self) {
        let addresses = node_addresses(&self.patterns, &self.config.nodeport_addresses);
        if addresses != self.shared.status().node_addresses {
            match self.dataplane.set_node_addresses(&addresses) {
                Ok(()) => {
                    info!(?addresses, "nodePorts answer on these addresses");
                    self.shared.status_mut().node_addresses = addresses;
                }
                Err(e) => warn!("writing the node's addresses: {e}"),
            }
        }
        match self.dataplane.attach_matching(&self.patterns) {
            Ok(new) => {
                for (name, hook) in &new.tc {
                    info!(interface = %name, ?hook, "TC program attached");
                }
                for (name, xdp) in &new.xdp {
                    for failure in &xdp.failures {
                        warn!("{failure}; falling back");
                    }
                    match xdp.mode {
                        "off" => info!(interface = %name, "no XDP: the TC program serves it"),
                        mode => info!(interface = %name, mode, "XDP program attached"),
                    }
                }
                if !new.tc.is_empty() || !new.xdp.is_empty() {
                    let mut status = self.shared.status_mut();
                    status.attached_interfaces = self.dataplane.attached().into_iter().collect();
                    status.xdp = self
                        .dataplane
                        .xdp_links()
                        .into_iter()
                        .map(|(name, mode)| format!("{name} {mode}"))
                        .collect();
                }
            }
            Err(e) => warn!("{e}"),
        }
    }

    /// Attaches the socket programs (`--socket-lb`), or detaches a previous agent's. Where the
    /// kernel cannot run them, the TC programs serve every client, as with `--socket-lb=false`.
    fn attach_socket_lb(&mut self) {
        if !self.config.socket_lb {
            match self.dataplane.detach_socket_lb() {
                Ok(0) => {}
                Ok(n) => info!(
                    attachments = n,
                    "connect-time load balancing off: the previous agent's detached"
                ),
                Err(e) => warn!("detaching connect-time load balancing: {e}"),
            }
            return;
        }
        let Some(cgroup) = self.config.cgroup.clone().or_else(dataplane::cgroup2_root) else {
            warn!(
                "connect-time load balancing off: no cgroup v2 is mounted (give --cgroup, or --socket-lb=false)"
            );
            return;
        };
        match self.dataplane.attach_socket_lb(&cgroup) {
            Ok(()) => {
                info!(cgroup = %cgroup.display(), "connect-time load balancing attached");
                self.shared.status_mut().socket_lb = Some(cgroup.display().to_string());
            }
            Err(e) => warn!(
                "connect-time load balancing off ({e}); the TC programs serve every client (Linux 5.18 or later runs it)"
            ),
        }
    }

    /// Closes the connected UDP sockets that connect-time load balancing sent to a backend
    /// that is gone, and forgets every socket of such a backend.
    fn close_stale_sockets(&mut self) {
        let Some(cgroup) = self.dataplane.socket_lb().map(Path::to_path_buf) else {
            return;
        };
        let stale = match self.dataplane.sock_revnat_entries() {
            Ok(entries) => stale_sockets::stale(&entries, &self.actual.backends),
            Err(e) => return warn!("reading the sockets of connect-time load balancing: {e}"),
        };
        if stale.is_empty() {
            return;
        }
        let namespaces = stale_sockets::namespaces_in(&cgroup);
        match stale_sockets::close(namespaces, stale_sockets::targets(&stale)) {
            Ok(0) => {}
            Ok(closed) => info!(
                closed,
                "connected UDP sockets to removed backends closed (ECONNABORTED)"
            ),
            Err(e) => warn!("closing UDP sockets connected to removed backends: {e}"),
        }
        if let Err(e) = self.dataplane.forget_sock_revnat(&stale) {
            warn!("{e}");
        }
    }

    /// Reads the maps back; returns whether every frontend is to be planned again: the maps
    /// are not what this agent wrote (or could not be read), or the last full plan is old.
    fn reread_maps(&mut self) -> bool {
        match self.dataplane.read_actual() {
            Ok(actual) => {
                let actual = keep_table_digests(actual, &self.actual);
                let changed = actual != self.actual;
                if changed {
                    warn!(
                        "the maps are not as this agent wrote them: planning every frontend again"
                    );
                }
                self.actual = actual;
                changed || self.last_full_plan.elapsed() >= FULL_PLAN_EVERY
            }
            Err(e) => {
                error!("reading maps for resync: {e}");
                true
            }
        }
    }

    /// Reads the manifest folder (all of it, or the files the watcher reported) and brings the
    /// maps up to date with it.
    fn sync_folder(&mut self, read: Read, full: bool) {
        let started = Instant::now();
        let Source::Folder { dir, store } = &mut self.source else {
            return;
        };
        let mut errors = Vec::new();
        // Parsing builds large short-lived trees. Done on a thread of its own, it allocates from
        // another heap arena; the store is then copied back here and that arena is left empty
        // for malloc_trim to return, instead of fragmenting the heap the agent lives in.
        let dir = &*dir;
        let parsed = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let problems = match read {
                        Read::Folder => store.update_from_folder(dir),
                        Read::Paths(paths) => Ok(store.update_paths(paths)),
                    };
                    match problems {
                        Ok(problems) => problems.iter().map(|e| e.to_string()).collect(),
                        // The folder vanished or is unreadable: keep everything as it is.
                        Err(e) => vec![format!("{}: {e}", dir.display())],
                    }
                })
                .join()
        });
        match parsed {
            Ok(problems) => errors.extend(problems),
            Err(_) => {
                errors.push("parsing the manifests panicked; objects kept as they were".into())
            }
        }
        let big_parse = store.parsed_bytes_last_update() > BIG_PARSE_BYTES;
        if big_parse {
            *store = store.clone();
        }
        let changes = store.take_changes();
        self.sync_from(started, changes, errors, full);
        if big_parse {
            // Parsing and copying freed a lot: hand it back to the system rather than keeping
            // the peak resident (glibc keeps freed heap otherwise).
            // SAFETY: malloc_trim only releases free memory.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Applies `changes` and brings the maps up to date. Only the frontends that changed (and
    /// those a full map kept out before) are compared with the maps, unless `full`.
    fn sync(&mut self, changes: Vec<Change>, errors: Vec<String>, full: bool) {
        self.sync_from(Instant::now(), changes, errors, full);
    }

    /// Takes changes into the control plane (counted as kube-proxy counts them); the next
    /// sync computes and writes what they touched.
    fn apply_changes(&mut self, changes: Vec<Change>) {
        let metrics = &self.shared.metrics;
        for change in &changes {
            let kind = match change {
                Change::Upsert(object) => object.kind(),
                Change::Delete((kind, _)) => kind,
            };
            if kind == "Service" {
                metrics.service_changes.inc();
            } else {
                metrics.endpoint_changes.inc();
            }
        }
        let mut control = self.shared.control_mut();
        for change in changes {
            control.apply(change);
        }
    }

    /// While the first lists arrive: computes the Services that have come with their
    /// endpoints, and their frontends, so that the first sync has only the rest to compute.
    /// Nothing is written.
    fn compute_ahead(&mut self) {
        let control = &mut *self.shared.control_mut();
        let changed = control.compute_listed(SystemTime::now());
        self.desired.update(control, &changed);
        self.computed_ahead.extend(changed);
    }

    fn sync_from(
        &mut self,
        started: Instant,
        changes: Vec<Change>,
        mut errors: Vec<String>,
        full: bool,
    ) {
        if let Source::Cluster { problems } = &self.source {
            errors.extend(problems.iter().map(|(object, p)| format!("{object}: {p}")));
        }
        if !changes.is_empty() {
            self.shared.health().queued(started);
        }
        self.apply_changes(changes);
        let mut control = self.shared.control_mut();
        let applied_us = started.elapsed().as_micros() as u64;
        let mut changed = control.compute(SystemTime::now());
        let computed_us = started.elapsed().as_micros() as u64;
        let mut touched = self.desired.update(&control, &changed);
        // Services computed ahead have their frontends in `desired` already; they join the
        // changes once each (for health checks, DNS and the ClusterIP record) and every
        // frontend is planned.
        let full = full || !self.computed_ahead.is_empty();
        if !self.computed_ahead.is_empty() {
            let again: HashSet<&ObjectName> = changed.iter().map(|c| &c.name).collect();
            let mut ahead = std::mem::take(&mut self.computed_ahead);
            ahead.retain(|c| !again.contains(&c.name));
            changed.append(&mut ahead);
        }
        self.health_checks.update(
            changed.iter().map(|c| (&c.name, control.state(&c.name))),
            &self.shared,
        );
        errors.extend(
            control
                .errors()
                .map(|e| format!("Service {}: {}", e.service, e.error)),
        );
        errors.extend(record_cluster_ips(
            &mut self.dataplane,
            &control,
            &changed,
            full,
        ));
        drop(control);
        let desired_us = started.elapsed().as_micros() as u64;
        touched.append(&mut self.unprogrammed);
        let plan = if full {
            self.last_full_plan = Instant::now();
            diff::diff(&self.desired, &self.actual)
        } else {
            diff::diff_frontends(&self.desired, &self.actual, &touched)
        };
        self.unprogrammed = plan.skipped.iter().map(|e| e.frontend()).collect();
        errors.extend(plan.skipped.iter().map(|e| format!("dataplane: {e}")));
        for (frontend, endpoints) in &plan.crowded_tables {
            warn!(
                "{frontend}: {endpoints} endpoints for a Maglev table of {} entries: their shares may differ by more than 1 % (--maglev-table-size should be at least {} times the endpoints)",
                self.config.maglev_table_size,
                maglev::ENTRIES_PER_ENDPOINT
            );
        }
        let ops = plan.len();
        let backends_changed = plan
            .parts
            .iter()
            .flatten()
            .any(|op| matches!(op, MapOp::ClearBackend(_) | MapOp::PutBackend(..)));
        let planned_us = started.elapsed().as_micros() as u64;
        // Part by part, each freed once written and applied (the written parts are in the maps
        // should a later one fail: the maps are then read back).
        let written = plan.parts.into_iter().try_for_each(|part| {
            self.dataplane.write(&part)?;
            diff::apply(&mut self.actual, &part);
            Ok::<_, dataplane::DataplaneError>(())
        });
        if let Err(e) = written {
            error!("writing maps: {e}; rereading them");
            if let Ok(actual) = self.dataplane.read_actual() {
                self.actual = keep_table_digests(actual, &self.actual);
            }
        } else {
            if backends_changed {
                self.close_stale_sockets();
            }
            let now = SystemTime::now();
            self.shared.health().updated(now);
            let metrics = &self.shared.metrics;
            metrics
                .sync_duration
                .observe(started.elapsed().as_secs_f64());
            if let Ok(since_epoch) = now.duration_since(SystemTime::UNIX_EPOCH) {
                metrics.last_sync_timestamp.set(since_epoch.as_secs_f64());
            }
        }
        // Names follow the maps: a ClusterIP is answered once its frontend is written.
        if let Some(zone) = &self.dns
            && (!changed.is_empty() || self.syncs == 0)
        {
            let control = self.shared.control();
            crate::dns::update(
                zone,
                changed.iter().map(|c| (&c.name, control.state(&c.name))),
            );
        }
        if errors != self.last_errors {
            for e in &errors {
                warn!("{e}");
            }
            self.last_errors = errors.clone();
        }
        self.syncs += 1;
        let took_us = started.elapsed().as_micros() as u64;
        if ops > 0 {
            // Where the time went, as times since the sync began.
            info!(
                ops,
                services_changed = changed.len(),
                took_us,
                applied_us,
                computed_us,
                desired_us,
                planned_us,
                "maps updated"
            );
        }
        let attached_interfaces = self.dataplane.attached().into_iter().collect();
        let mut status = self.shared.status_mut();
        *status = StatusView {
            node_name: self.config.node_name.clone(),
            attached_interfaces,
            errors,
            counters: Vec::new(),
            last_sync_ops: ops,
            frontends_not_programmed: plan.skipped.len(),
            syncs: self.syncs,
            conntrack_entries: status.conntrack_entries,
            conntrack_gc_deleted: status.conntrack_gc_deleted,
            map_fill: map_fill(
                &self.actual,
                status.conntrack_entries,
                status.affinity_entries,
            ),
            datapath_events: status.datapath_events,
            affinity_entries: status.affinity_entries,
            backend_choice: std::mem::take(&mut status.backend_choice),
            node_addresses: std::mem::take(&mut status.node_addresses),
            xdp: std::mem::take(&mut status.xdp),
            socket_lb: status.socket_lb.take(),
        };
    }
}

/// How full the maps are, from what the agent wrote and what the last GC counted.
fn map_fill(
    actual: &ActualDataplane,
    conntrack_entries: usize,
    affinity_entries: usize,
) -> Vec<(String, usize, u32)> {
    use lb_common::*;
    [
        (FRONTENDS_MAP, actual.frontends.len(), MAX_FRONTENDS),
        (SLOTS_MAP, actual.slots.len(), MAX_SLOTS),
        (BACKENDS_MAP, actual.backends.len(), MAX_BACKENDS),
        (CONNTRACK_MAP, conntrack_entries, MAX_CONNTRACK),
        (MAGLEV_MAP, actual.maglev.len(), MAX_FRONTENDS),
        (AFFINITY_MAP, affinity_entries, MAX_AFFINITY),
    ]
    .into_iter()
    .map(|(map, used, capacity)| (map.to_string(), used, capacity))
    .collect()
}

/// Keeps the pinned record of which Service holds which ClusterIP equal to the control
/// plane's: the addresses of the Services that changed, or (`full`) every one. Returns errors.
fn record_cluster_ips(
    dataplane: &mut Dataplane,
    control: &ControlPlane,
    changed: &[ServiceChange],
    full: bool,
) -> Vec<String> {
    let mut writes: Vec<(Ipv4Addr, Option<String>)> = Vec::new();
    if full {
        let recorded: BTreeMap<Ipv4Addr, String> = match dataplane.read_cluster_ips() {
            Ok(r) => r.into_iter().collect(),
            Err(e) => return vec![format!("reading the ClusterIP record: {e}")],
        };
        let held: BTreeMap<Ipv4Addr, String> = control
            .states()
            .filter_map(|s| Some((s.cluster_ip?, s.service.id.to_string())))
            .collect();
        for (ip, holder) in &held {
            if recorded.get(ip) != Some(holder) {
                writes.push((*ip, Some(holder.clone())));
            }
        }
        for ip in recorded.keys().filter(|ip| !held.contains_key(ip)) {
            writes.push((*ip, None));
        }
    } else {
        for change in changed {
            let before = change.before.as_ref().and_then(|s| s.cluster_ip);
            let now = control.state(&change.name).and_then(|s| s.cluster_ip);
            if before == now {
                continue;
            }
            if let Some(ip) = before {
                writes.push((ip, None));
            }
            if let Some(ip) = now {
                writes.push((ip, Some(change.name.to_string())));
            }
        }
    }
    // Releases first: an address one Service gave up may be the one another just took.
    writes.sort_by_key(|(_, holder)| holder.is_some());
    let (releases, records): (Vec<_>, Vec<_>) =
        writes.into_iter().partition(|(_, holder)| holder.is_none());
    let mut problems: Vec<String> = releases
        .into_iter()
        .filter_map(|(ip, _)| {
            dataplane
                .set_cluster_ip(ip, None)
                .err()
                .map(|e| format!("recording ClusterIP {ip}: {e}"))
        })
        .collect();
    let holders: Vec<(Ipv4Addr, &str)> = records
        .iter()
        .filter_map(|(ip, holder)| Some((*ip, holder.as_deref()?)))
        .collect();
    // A full sync records every address: in batches where the kernel has them.
    match dataplane.record_cluster_ips(&holders) {
        Ok(true) => {}
        Ok(false) => problems.extend(holders.iter().filter_map(|(ip, holder)| {
            dataplane
                .set_cluster_ip(*ip, Some(holder))
                .err()
                .map(|e| format!("recording ClusterIP {ip}: {e}"))
        })),
        Err(e) => problems.push(format!("recording ClusterIPs: {e}")),
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        agent: AgentConfig,
    }

    /// The backend choice these flags give, or clap's error.
    fn parse(args: &[&str]) -> Result<Algorithm, String> {
        Flags::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
            .map(|f| f.agent.algorithm())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_backend_choice_flags_default_to_random_and_take_maglev() {
        assert_eq!(parse(&[]).unwrap(), Algorithm::Random);
        assert_eq!(
            parse(&["--lb-algorithm", "maglev"]).unwrap(),
            Algorithm::Maglev {
                table_size: maglev::DEFAULT_TABLE_SIZE
            }
        );
        assert_eq!(
            parse(&["--lb-algorithm", "maglev", "--maglev-table-size", "65521"]).unwrap(),
            Algorithm::Maglev { table_size: 65_521 }
        );
    }

    #[test]
    fn the_sync_period_defaults_to_kube_proxys_and_refuses_a_busy_loop() {
        let period = |args: &[&str]| {
            Flags::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
                .map(|f| f.agent.sync_period)
                .map_err(|e| e.to_string())
        };
        assert_eq!(period(&[]).unwrap(), Duration::from_secs(30));
        assert_eq!(
            period(&["--sync-period", "1m"]).unwrap(),
            Duration::from_secs(60)
        );
        for value in ["0s", "10ms", "soon"] {
            let e = period(&["--sync-period", value]).unwrap_err();
            assert!(e.contains("--sync-period"), "{value}: {e}");
        }
    }

    #[test]
    fn a_table_size_that_is_not_a_prime_in_range_is_refused_by_name() {
        for (value, problem) in [
            ("16000", "not a prime"),
            ("131", "out of range"),
            ("262147", "out of range"),
            ("lots", "not a number"),
        ] {
            let e = parse(&["--lb-algorithm", "maglev", "--maglev-table-size", value]).unwrap_err();
            assert!(
                e.contains("--maglev-table-size") && e.contains(problem),
                "{value}: {e}"
            );
        }
        let e = parse(&["--lb-algorithm", "round-robin"]).unwrap_err();
        assert!(e.contains("--lb-algorithm") && e.contains("maglev"), "{e}");
    }
}
