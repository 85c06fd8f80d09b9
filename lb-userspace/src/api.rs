//! The agent's local admin endpoint, read by `lb get`.
use std::{net::SocketAddr, sync::Arc};

use axum::{Json, Router, extract::State, routing::get};
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
    /// Map operations of the last sync that changed anything.
    pub last_sync_ops: usize,
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

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route(SERVICES_PATH, get(|State(s): State<SharedState>| async move { Json(s.read().await.services.clone()) }))
        .route(ENDPOINTS_PATH, get(|State(s): State<SharedState>| async move { Json(s.read().await.endpoints.clone()) }))
        .route(STATUS_PATH, get(|State(s): State<SharedState>| async move { Json(s.read().await.status.clone()) }))
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
