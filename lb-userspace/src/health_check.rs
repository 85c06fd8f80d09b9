//! `healthCheckNodePort`: for a LoadBalancer Service with `externalTrafficPolicy: Local`,
//! every node answers HTTP on that port whether it has endpoints of the Service, so that the
//! load balancer sends traffic only to nodes that do. Served as kube-proxy serves it: 200 with
//! the local endpoint count in a JSON body when there is at least one (and the agent is
//! healthy), 503 otherwise.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    api::SharedState,
    controlplane::ServiceState,
    model::{ObjectName, ServiceType, TrafficPolicy},
};

/// What one health check port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub service: ObjectName,
    /// Endpoints on this node that take new connections.
    pub local_endpoints: usize,
}

/// The health check port a Service needs, with what it answers; `None` if it needs none.
pub fn checked(state: &ServiceState) -> Option<(u16, Checked)> {
    let svc = &state.service;
    if !svc.proxied
        || svc.service_type != ServiceType::LoadBalancer
        || svc.external_traffic_policy != TrafficPolicy::Local
    {
        return None;
    }
    let port = state.external.health_check_node_port?;
    // As kube-proxy counts them: the Service's local endpoints that take new connections.
    let local_endpoints = state
        .ports
        .iter()
        .map(|p| {
            p.local()
                .serving()
                .iter()
                .map(|a| *a.ip())
                .collect::<BTreeSet<_>>()
                .len()
        })
        .max()
        .unwrap_or(0);
    Some((
        port,
        Checked {
            service: svc.id.clone(),
            local_endpoints,
        },
    ))
}

type Answers = Arc<RwLock<BTreeMap<u16, Checked>>>;

/// The health check servers of every Service that needs one.
#[derive(Default)]
pub struct HealthChecks {
    answers: Answers,
    /// Which Service has which port.
    ports: BTreeMap<ObjectName, u16>,
    servers: BTreeMap<u16, tokio::task::JoinHandle<()>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: &'a ObjectName,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

impl HealthChecks {
    /// Brings the servers in line with these Services' states (`None`: the Service is gone).
    pub fn update<'a>(
        &mut self,
        changed: impl IntoIterator<Item = (&'a ObjectName, Option<&'a ServiceState>)>,
        agent: &SharedState,
    ) {
        let mut answers = self.answers.write().unwrap_or_else(|e| e.into_inner());
        for (name, state) in changed {
            let wanted = state.and_then(checked);
            if let Some(old) = self.ports.remove(name)
                && wanted.as_ref().is_none_or(|(port, _)| *port != old)
            {
                answers.remove(&old);
                if let Some(server) = self.servers.remove(&old) {
                    server.abort();
                    info!(service = %name, port = old, "health check port closed");
                }
            }
            let Some((port, answer)) = wanted else {
                continue;
            };
            self.ports.insert(name.clone(), port);
            answers.insert(port, answer);
            if !self.servers.contains_key(&port) {
                let server = serve(port, self.answers.clone(), agent.clone());
                self.servers.insert(port, server);
                info!(service = %name, port, "health check port open");
            }
        }
    }
}

/// Serves `port` on every address of the node (kube-proxy's default) until aborted.
fn serve(port: u16, answers: Answers, agent: SharedState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                warn!("health check port {port}: {e}");
                return;
            }
        };
        let router = axum::Router::new()
            .fallback(answer)
            .with_state((port, answers, agent));
        if let Err(e) = axum::serve(listener, router).await {
            warn!("health check port {port}: {e}");
        }
    })
}

async fn answer(State((port, answers, agent)): State<(u16, Answers, SharedState)>) -> Response {
    let Some(checked) = answers
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&port)
        .cloned()
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let healthy = agent.health().healthy(std::time::Instant::now());
    let body = Body {
        service: &checked.service,
        local_endpoints: checked.local_endpoints,
        service_proxy_healthy: healthy,
    };
    let status = if checked.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (status, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(checked.local_endpoints),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::states_from_yaml;

    #[test]
    fn only_local_load_balancers_get_a_port_counting_their_local_serving_endpoints() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: local}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  selector: {app: web}\n  ports: [{port: 80}]\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: cluster}\nspec:\n  type: LoadBalancer\n  selector: {app: web}\n  ports: [{port: 80}]\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: web}}\nspec: {nodeName: node-1, containers: [{name: c}]}\nstatus: {podIP: 198.18.1.9}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: b, labels: {app: web}}\nspec: {nodeName: node-2, containers: [{name: c}]}\nstatus: {podIP: 198.18.2.9}\n";
        let states = states_from_yaml(yaml);
        let by_name = |n: &str| states.iter().find(|s| s.service.id.name == n).unwrap();
        assert_eq!(checked(by_name("cluster")), None);
        let (port, answer) = checked(by_name("local")).unwrap();
        assert_eq!(port, 32000);
        // The test control plane knows no node name: nothing is local.
        assert_eq!(answer.local_endpoints, 0);
    }
}
