//! The agent's local admin endpoint, read by `lb get`.
use std::{net::SocketAddr, sync::Arc};

use axum::{Json, Router, extract::State, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::views::{EndpointsView, ServiceView};

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
}

#[derive(Clone, Debug, Default)]
pub struct AdminState {
    pub services: Vec<ServiceView>,
    pub endpoints: Vec<EndpointsView>,
    pub status: StatusView,
}

pub type SharedState = Arc<RwLock<AdminState>>;

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
    let mut registry = Registry::default();
    let packets = Family::<VerdictLabel, Counter>::default();
    for (name, value) in &state.status.counters {
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
    syncs.inc_by(state.status.syncs);
    registry.register("lb_syncs", "Syncs of the maps with the manifests", syncs);
    let gauges: [(&str, &str, usize); 5] = [
        ("lb_services", "Services known", state.services.len()),
        (
            "lb_manifest_problems",
            "Manifest files or objects with errors",
            state.status.errors.len(),
        ),
        (
            "lb_frontends_not_programmed",
            "Frontends left out because a map is full",
            state.status.frontends_not_programmed,
        ),
        (
            "lb_attached_interfaces",
            "Interfaces the TC program is attached to",
            state.status.attached_interfaces.len(),
        ),
        (
            "lb_last_sync_map_operations",
            "Map writes of the last sync",
            state.status.last_sync_ops,
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
        .route(SERVICES_PATH, get(|State(s): State<SharedState>| async move { Json(s.read().await.services.clone()) }))
        .route(ENDPOINTS_PATH, get(|State(s): State<SharedState>| async move { Json(s.read().await.endpoints.clone()) }))
        .route(STATUS_PATH, get(|State(s): State<SharedState>| async move { Json(s.read().await.status.clone()) }))
        .route(METRICS_PATH, get(|State(s): State<SharedState>| async move { metrics(&*s.read().await) }))
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
