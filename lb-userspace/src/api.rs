//! The agent's local admin endpoint, read by `lb get`.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    controlplane::ControlPlane,
    dataplane::StatsReader,
    desired,
    diff::frontend_key,
    events::{EventsLevel, EventsSwitch},
    views::{self, EndpointsView, ServiceView},
};
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use lb_common::stats::COUNTER_NAMES;
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabel as _, EncodeLabelSet, EncodeMetric as _, LabelSetEncoder,
        text::encode,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use serde::{Deserialize, Serialize};

/// Counters of the datapath by name, manifest problems, and attached interfaces.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusView {
    pub node_name: String,
    pub attached_interfaces: Vec<String>,
    pub errors: Vec<String>,
    pub counters: Vec<(String, u64)>,
    /// Map operations written by the last sync.
    pub last_sync_ops: usize,
    /// Frontends the last sync could not program because a map is full.
    pub frontends_not_programmed: usize,
    pub syncs: u64,
    /// Conntrack entries after the last garbage collection (two per translated flow).
    #[serde(default)]
    pub conntrack_entries: usize,
    /// Expired conntrack entries the garbage collector deleted.
    #[serde(default)]
    pub conntrack_gc_deleted: u64,
    /// How full each map is: (map, entries, capacity).
    #[serde(default)]
    pub map_fill: Vec<(String, usize, u32)>,
    /// Which datapath events the programs send to the agent's log.
    #[serde(default)]
    pub datapath_events: EventsLevel,
    /// Clients with session affinity after the last garbage collection.
    #[serde(default)]
    pub affinity_entries: usize,
    /// How new connections pick their backend (`--lb-algorithm`, and the Maglev table size).
    #[serde(default)]
    pub backend_choice: String,
    /// The addresses nodePorts answer on.
    #[serde(default)]
    pub node_addresses: Vec<std::net::Ipv4Addr>,
    /// External interfaces and how XDP runs on each ("eth0 native", "eth0 off").
    #[serde(default)]
    pub xdp: Vec<String>,
    /// The cgroup whose sockets get connect-time load balancing; none when off.
    #[serde(default)]
    pub socket_lb: Option<String>,
}

/// The metrics kube-proxy exports under the same names and meanings, so that its dashboards
/// and alerts work unchanged.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// kubeproxy_sync_proxy_rules_duration_seconds: one sync of the maps.
    pub sync_duration: Histogram,
    /// kubeproxy_network_programming_duration_seconds: from an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` to the maps written.
    pub network_programming_duration: Histogram,
    /// kubeproxy_sync_proxy_rules_last_timestamp_seconds.
    pub last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// kubeproxy_sync_proxy_rules_endpoint_changes_total.
    pub endpoint_changes: Counter,
    /// kubeproxy_sync_proxy_rules_service_changes_total.
    pub service_changes: Counter,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        // kube-proxy's buckets: 1 ms doubling to about 16 s; 0.25 s doubling to 8 min.
        Self {
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            network_programming_duration: Histogram::new(exponential_buckets(0.25, 2.0, 12)),
            last_sync_timestamp: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
        }
    }
}

/// kube-proxy's health rule: unhealthy once a change has waited longer than the timeout
/// without the maps being written.
pub struct Health {
    timeout: Duration,
    /// The oldest change not yet in the maps.
    oldest_pending: Option<Instant>,
    last_updated: Option<SystemTime>,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            oldest_pending: None,
            last_updated: None,
        }
    }

    /// Changes arrived that are not in the maps yet.
    pub fn queued(&mut self, at: Instant) {
        self.oldest_pending.get_or_insert(at);
    }

    /// The maps hold every change queued so far.
    pub fn updated(&mut self, at: SystemTime) {
        self.oldest_pending = None;
        self.last_updated = Some(at);
    }

    pub fn healthy(&self, now: Instant) -> bool {
        self.oldest_pending
            .is_none_or(|queued| now.duration_since(queued) < self.timeout)
    }
}

/// What the admin endpoint serves: the control plane itself (Services are rendered when asked,
/// not kept twice) and the agent's status. Locks are held briefly and never across an await.
pub struct AdminState {
    control: RwLock<ControlPlane>,
    status: RwLock<StatusView>,
    /// The datapath counters, read from the kernel at each request.
    counters: Option<StatsReader>,
    /// Switches the datapath events at run time.
    events: Option<Mutex<EventsSwitch>>,
    pub metrics: ProxyMetrics,
    health: Mutex<Health>,
}

impl AdminState {
    pub fn new(
        control: ControlPlane,
        counters: Option<StatsReader>,
        events: Option<EventsSwitch>,
    ) -> Self {
        Self {
            control: RwLock::new(control),
            status: RwLock::new(StatusView::default()),
            counters,
            events: events.map(Mutex::new),
            metrics: ProxyMetrics::default(),
            health: Mutex::new(Health::new(DEFAULT_HEALTH_TIMEOUT)),
        }
    }

    /// Switches the datapath events; the status shows the new level.
    pub fn set_events(&self, level: EventsLevel) -> anyhow::Result<()> {
        let Some(switch) = &self.events else {
            anyhow::bail!("this agent has no datapath events map");
        };
        switch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set(level)
            .map_err(|e| anyhow::anyhow!("map {}: {e}", lb_common::EVENTS_MAP))?;
        self.status_mut().datapath_events = level;
        Ok(())
    }

    pub fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The agent's status with the datapath counters as they are now.
    pub fn current_status(&self) -> StatusView {
        let mut status = self.status().clone();
        if let Some(values) = self.counters.as_ref().and_then(|r| r.read().ok()) {
            status.counters = COUNTER_NAMES
                .iter()
                .map(|n| n.to_string())
                .zip(values)
                .collect();
        }
        status
    }

    // A panic while holding a lock leaves data that is still whole (every update is a
    // single assignment or a complete control plane step), so poisoning is ignored.
    pub fn control(&self) -> RwLockReadGuard<'_, ControlPlane> {
        self.control.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn control_mut(&self) -> RwLockWriteGuard<'_, ControlPlane> {
        self.control.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn status(&self) -> RwLockReadGuard<'_, StatusView> {
        self.status.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn status_mut(&self) -> RwLockWriteGuard<'_, StatusView> {
        self.status.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn services(&self) -> Vec<ServiceView> {
        self.control()
            .states()
            .filter(|s| s.service.proxied)
            .map(views::service_view)
            .collect()
    }

    fn endpoints(&self) -> Vec<EndpointsView> {
        self.control()
            .states()
            .filter(|s| s.service.proxied)
            .filter_map(views::endpoints_view)
            .collect()
    }
}

pub type SharedState = Arc<AdminState>;

pub const SERVICES_PATH: &str = "/v1/services";
pub const ENDPOINTS_PATH: &str = "/v1/endpoints";
pub const STATUS_PATH: &str = "/v1/status";
pub const METRICS_PATH: &str = "/metrics";
/// GET: the datapath events level; PUT with `off`, `drops` or `flows`: switches it.
pub const EVENTS_PATH: &str = "/v1/events";
/// kube-proxy's: twice its default sync period.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

/// A Service port as its traffic is labelled: the Service, the port (number and name), the
/// protocol, the address it is reached at, and which way the packets went.
#[derive(Debug)]
struct ServicePortLabel<'a> {
    namespace: &'a str,
    service: &'a str,
    port: u16,
    port_name: &'a str,
    protocol: &'static str,
    address: &'a str,
    /// `in`: from clients to the Service; `out`: the backends' replies.
    direction: &'static str,
}

// By hand: the derive takes no borrowed fields.
impl EncodeLabelSet for ServicePortLabel<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        ("namespace", self.namespace).encode(encoder.encode_label())?;
        ("service", self.service).encode(encoder.encode_label())?;
        ("port", self.port).encode(encoder.encode_label())?;
        ("port_name", self.port_name).encode(encoder.encode_label())?;
        ("protocol", self.protocol).encode(encoder.encode_label())?;
        ("address", self.address).encode(encoder.encode_label())?;
        ("direction", self.direction).encode(encoder.encode_label())
    }
}

/// A Service port's traffic counters as read for one scrape.
#[derive(Debug)]
struct ServicePortTraffic {
    namespace: String,
    service: String,
    port: u16,
    port_name: String,
    protocol: &'static str,
    address: String,
    traffic: lb_common::ServiceTraffic,
}

/// Packets and bytes of every Service port, both ways, encoded straight from what was read: at
/// 100,000 Service ports, metric families would hold 400,000 label sets in hash maps for
/// each scrape.
#[derive(Debug)]
struct ServiceTrafficCollector(Vec<ServicePortTraffic>);

impl Collector for ServiceTrafficCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        type Counts = fn(&lb_common::ServiceTraffic) -> [u64; 2];
        let families: [(&str, &str, Counts); 2] = [
            (
                "lb_service_packets",
                "Packets of each Service port translated by the datapath: in from clients, out the replies",
                |t| [t.packets_in, t.packets_out],
            ),
            (
                "lb_service_bytes",
                "Bytes (whole frames) of each Service port translated by the datapath: in from clients, out the replies",
                |t| [t.bytes_in, t.bytes_out],
            ),
        ];
        for (name, help, counts) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for port in &self.0 {
                for (direction, value) in ["in", "out"].into_iter().zip(counts(&port.traffic)) {
                    let label = ServicePortLabel {
                        namespace: &port.namespace,
                        service: &port.service,
                        port: port.port,
                        port_name: &port.port_name,
                        protocol: port.protocol,
                        address: &port.address,
                        direction,
                    };
                    ConstCounter::new(value).encode(family.encode_family(&label)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Packets and bytes of every Service port, both ways.
fn service_traffic(state: &AdminState, registry: &mut Registry) {
    let Some(traffic) = state.counters.as_ref().and_then(|r| r.traffic().ok()) else {
        return;
    };
    // Read under the control plane's lock, encoded after it: a scrape of 100,000 Service
    // ports must not hold back a sync.
    let ports: Vec<ServicePortTraffic> = {
        let control = state.control();
        control
            .states()
            .flat_map(|service| {
                desired::frontend_ports(service).filter_map(|(frontend, port)| {
                    Some(ServicePortTraffic {
                        namespace: service.service.id.namespace.clone(),
                        service: service.service.id.name.clone(),
                        port: port.port,
                        port_name: port.name.clone(),
                        protocol: port.protocol.as_str(),
                        address: frontend.ip.to_string(),
                        traffic: *traffic.get(&frontend_key(&frontend))?,
                    })
                })
            })
            .collect()
    };
    registry.register_collector(Box::new(ServiceTrafficCollector(ports)));
}

/// Prometheus text exposition of the agent's state and the datapath counters.
fn metrics(state: &AdminState) -> String {
    let services = state.control().services_len();
    let status = state.current_status();
    let mut registry = Registry::default();
    let m = &state.metrics;
    registry.register(
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds",
        m.sync_duration.clone(),
    );
    registry.register(
        "kubeproxy_network_programming_duration_seconds",
        "In Cluster Network Programming Latency in seconds",
        m.network_programming_duration.clone(),
    );
    registry.register(
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "The last time proxy rules were successfully synced",
        m.last_sync_timestamp.clone(),
    );
    // Registered without the suffix: the encoder adds `_total` to counters.
    registry.register(
        "kubeproxy_sync_proxy_rules_endpoint_changes",
        "Cumulative proxy rules Endpoint changes",
        m.endpoint_changes.clone(),
    );
    registry.register(
        "kubeproxy_sync_proxy_rules_service_changes",
        "Cumulative proxy rules Service changes",
        m.service_changes.clone(),
    );
    let packets = Family::<VerdictLabel, Counter>::default();
    for (name, value) in &status.counters {
        packets
            .get_or_create(&VerdictLabel {
                verdict: name.clone(),
            })
            .inc_by(*value);
    }
    registry.register(
        "lb_datapath_packets",
        "Packets seen by the datapath, by verdict",
        packets,
    );
    service_traffic(state, &mut registry);
    let entries = Family::<MapLabel, Gauge>::default();
    let capacity = Family::<MapLabel, Gauge>::default();
    for (map, used, size) in &status.map_fill {
        let label = MapLabel { map: map.clone() };
        entries.get_or_create(&label).set(*used as i64);
        capacity.get_or_create(&label).set(*size as i64);
    }
    registry.register("lb_map_entries", "Entries in each datapath map", entries);
    registry.register(
        "lb_map_capacity",
        "Entries each datapath map can hold",
        capacity,
    );
    let syncs = Counter::<u64>::default();
    syncs.inc_by(status.syncs);
    registry.register("lb_syncs", "Syncs of the maps with the manifests", syncs);
    let gc_deleted = Counter::<u64>::default();
    gc_deleted.inc_by(status.conntrack_gc_deleted);
    registry.register(
        "lb_conntrack_gc_deleted",
        "Expired conntrack entries deleted by the garbage collector",
        gc_deleted,
    );
    let gauges: [(&str, &str, usize); 7] = [
        ("lb_services", "Services known", services),
        (
            "lb_manifest_problems",
            "Manifest files or objects with errors",
            status.errors.len(),
        ),
        (
            "lb_frontends_not_programmed",
            "Frontends left out because a map is full",
            status.frontends_not_programmed,
        ),
        (
            "lb_attached_interfaces",
            "Interfaces the TC program is attached to",
            status.attached_interfaces.len(),
        ),
        (
            "lb_last_sync_map_operations",
            "Map writes of the last sync",
            status.last_sync_ops,
        ),
        (
            "lb_conntrack_entries",
            "Conntrack entries after the last garbage collection (two per flow)",
            status.conntrack_entries,
        ),
        (
            "lb_affinity_entries",
            "Clients kept on an endpoint by session affinity, after the last garbage collection",
            status.affinity_entries,
        ),
    ];
    for (name, help, value) in gauges {
        let gauge = Gauge::<i64>::default();
        gauge.set(value as i64);
        registry.register(name, help, gauge);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route(
            SERVICES_PATH,
            get(|State(s): State<SharedState>| async move { Json(s.services()) }),
        )
        .route(
            ENDPOINTS_PATH,
            get(|State(s): State<SharedState>| async move { Json(s.endpoints()) }),
        )
        .route(
            STATUS_PATH,
            get(|State(s): State<SharedState>| async move { Json(s.current_status()) }),
        )
        .route(
            METRICS_PATH,
            get(|State(s): State<SharedState>| async move { metrics(&s) }),
        )
        .route(
            EVENTS_PATH,
            get(|State(s): State<SharedState>| async move { s.status().datapath_events.as_str() })
                .put(|State(s): State<SharedState>, body: String| async move {
                    let level: EventsLevel = match body.parse() {
                        Ok(l) => l,
                        Err(e) => return (StatusCode::BAD_REQUEST, e),
                    };
                    match s.set_events(level) {
                        Ok(()) => (StatusCode::OK, level.as_str().to_string()),
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
                    }
                }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// kube-proxy's health endpoint: `/healthz` and `/livez`, 200 or 503 with the same JSON body.
pub fn health_router(state: SharedState) -> Router {
    let answer = |State(s): State<SharedState>| async move {
        let (healthy, last_updated) = {
            let health = s.health();
            (health.healthy(Instant::now()), health.last_updated)
        };
        let rfc3339 = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        let body = serde_json::json!({
            "lastUpdated": last_updated.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(SystemTime::now()),
            "nodeEligible": true,
        });
        let code = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (
            code,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    };
    Router::new()
        .route("/healthz", get(answer))
        .route("/livez", get(answer))
        .with_state(state)
}

pub async fn serve_health(addr: SocketAddr, state: SharedState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--healthz-bind {addr}: {e}"))?;
    axum::serve(listener, health_router(state)).await?;
    Ok(())
}

pub async fn serve(addr: SocketAddr, state: SharedState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin endpoint {addr}: {e}"))?;
    axum::serve(listener, router(state)).await?;
    Ok(())
}

fn unreachable(admin: &str) -> impl Fn(ureq::Error) -> anyhow::Error + '_ {
    move |e| {
        anyhow::anyhow!(
            "cannot reach the agent at {admin} ({e}); is `lb agent` running with --admin {admin}?"
        )
    }
}

/// Fetches one admin path from a running agent.
pub fn fetch<T: for<'de> Deserialize<'de>>(admin: &str, path: &str) -> anyhow::Result<T> {
    let url = format!("http://{admin}{path}");
    let mut response = ureq::get(&url).call().map_err(unreachable(admin))?;
    Ok(response.body_mut().read_json()?)
}

/// Fetches one admin path that answers in plain text.
pub fn fetch_text(admin: &str, path: &str) -> anyhow::Result<String> {
    let url = format!("http://{admin}{path}");
    let mut response = ureq::get(&url).call().map_err(unreachable(admin))?;
    Ok(response.body_mut().read_to_string()?)
}

/// Sends `body` to one admin path; the agent's answer, or its refusal as the error.
pub fn put_text(admin: &str, path: &str, body: &str) -> anyhow::Result<String> {
    let url = format!("http://{admin}{path}");
    let mut response = ureq::put(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .send(body)
        .map_err(unreachable(admin))?;
    let text = response.body_mut().read_to_string()?;
    if !response.status().is_success() {
        anyhow::bail!("the agent refused: {text}");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_fails_only_when_a_change_waits_longer_than_the_timeout() {
        let start = Instant::now();
        let mut health = Health::new(Duration::from_secs(60));
        assert!(health.healthy(start), "nothing queued");
        health.queued(start);
        assert!(health.healthy(start + Duration::from_secs(59)));
        health.queued(start + Duration::from_secs(30));
        assert!(
            !health.healthy(start + Duration::from_secs(61)),
            "the oldest change counts"
        );
        health.updated(SystemTime::now());
        assert!(health.healthy(start + Duration::from_secs(3600)));
        assert!(health.last_updated.is_some());
    }
}
