//! The agent's local admin endpoint, read by `lb get`.
use std::{
    net::SocketAddr,
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use crate::{
    controlplane::ControlPlane,
    dataplane::StatsReader,
    views::{self, EndpointsView, ServiceView},
};
use axum::{Json, Router, extract::State, routing::get};
use lb_common::stats::COUNTER_NAMES;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
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
}

/// What the admin endpoint serves: the control plane itself (Services are rendered when asked,
/// not kept twice) and the agent's status. Locks are held briefly and never across an await.
pub struct AdminState {
    control: RwLock<ControlPlane>,
    status: RwLock<StatusView>,
    /// The datapath counters, read from the kernel at each request.
    counters: Option<StatsReader>,
}

impl AdminState {
    pub fn new(control: ControlPlane, counters: Option<StatsReader>) -> Self {
        Self {
            control: RwLock::new(control),
            status: RwLock::new(StatusView::default()),
            counters,
        }
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
        self.control().states().map(views::service_view).collect()
    }

    fn endpoints(&self) -> Vec<EndpointsView> {
        self.control()
            .states()
            .filter_map(views::endpoints_view)
            .collect()
    }
}

pub type SharedState = Arc<AdminState>;

pub const SERVICES_PATH: &str = "/v1/services";
pub const ENDPOINTS_PATH: &str = "/v1/endpoints";
pub const STATUS_PATH: &str = "/v1/status";
pub const METRICS_PATH: &str = "/metrics";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: String,
}

/// Prometheus text exposition of the agent's state and the datapath counters.
fn metrics(state: &AdminState) -> String {
    let services = state.control().services_len();
    let status = state.current_status();
    let mut registry = Registry::default();
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
    let gauges: [(&str, &str, usize); 6] = [
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
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

pub async fn serve(addr: SocketAddr, state: SharedState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin endpoint {addr}: {e}"))?;
    axum::serve(listener, router(state)).await?;
    Ok(())
}

/// Fetches one admin path from a running agent.
pub fn fetch<T: for<'de> Deserialize<'de>>(admin: &str, path: &str) -> anyhow::Result<T> {
    let url = format!("http://{admin}{path}");
    let mut response = ureq::get(&url).call().map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the agent at {admin} ({e}); is `lb agent` running with --admin {admin}?"
        )
    })?;
    Ok(response.body_mut().read_json()?)
}
